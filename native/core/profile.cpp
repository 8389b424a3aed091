#include "cmseg/profile.hpp"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <vector>

namespace cmseg {
namespace {
std::mutex mu;
std::map<std::string, std::pair<double, long>>& buckets() {
  static std::map<std::string, std::pair<double, long>> b;
  return b;
}
}  // namespace

bool profiling_enabled() {
  static const bool on = [] {
    const char* e = std::getenv("CMSEG_PROFILE");
    return e && *e && std::string(e) != "0";
  }();
  return on;
}

void profile_add(const char* name, double seconds) {
  std::lock_guard<std::mutex> lk(mu);
  auto& b = buckets()[name];
  b.first += seconds;
  b.second += 1;
}

std::string profile_report() {
  std::lock_guard<std::mutex> lk(mu);
  std::vector<std::pair<std::string, std::pair<double, long>>> rows(buckets().begin(), buckets().end());
  std::sort(rows.begin(), rows.end(), [](auto& a, auto& b) { return a.second.first > b.second.first; });
  std::string out;
  char line[160];
  for (auto& [name, v] : rows) {
    std::snprintf(line, sizeof line, "  %-28s %9.1f ms  (%ld calls)\n", name.c_str(), v.first * 1e3, v.second);
    out += line;
  }
  buckets().clear();
  return out;
}

}  // namespace cmseg
