// Opt-in per-layer timing: with CMSEG_PROFILE=1 in the environment, every
// ProfileScope adds its wall time to a named bucket, and profile_report()
// prints and clears the buckets (the model calls it after each step).
#pragma once
#include <chrono>
#include <string>

namespace cmseg {

bool profiling_enabled();
void profile_add(const char* name, double seconds);
std::string profile_report();  // "name: ms (calls)" lines, sorted by time; clears the buckets

class ProfileScope {
 public:
  explicit ProfileScope(const char* name) : name_(name), on_(profiling_enabled()) {
    if (on_) start_ = std::chrono::steady_clock::now();
  }
  ~ProfileScope() {
    if (on_) profile_add(name_, std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count());
  }

 private:
  const char* name_;
  bool on_;
  std::chrono::steady_clock::time_point start_;
};

}  // namespace cmseg
