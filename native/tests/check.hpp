// A minimal test harness for the native tests: TEST(name) registers a case,
// CHECK* record failures with file:line, main() runs every case and reports.
#pragma once
#include <cmath>
#include <cstdio>
#include <functional>
#include <random>
#include <string>
#include <vector>

namespace check {

struct Case {
  const char* name;
  std::function<void()> fn;
};
inline std::vector<Case>& cases() {
  static std::vector<Case> c;
  return c;
}
inline int& failures() {
  static int f = 0;
  return f;
}
struct Register {
  Register(const char* n, std::function<void()> f) { cases().push_back({n, std::move(f)}); }
};

// A case that cannot run here (a missing tool or device) calls skip(why) and returns:
// it is reported as skipped, with the reason, not as passed.
inline std::string& skip_reason() {
  static std::string r;
  return r;
}
inline void skip(const std::string& why) { skip_reason() = why; }

inline int run_all(int argc, char** argv) {
  int failed_cases = 0, run = 0, skipped = 0;
  for (auto& c : cases()) {
    // Arguments select cases: those whose name contains any of them (none: all).
    bool selected = argc <= 1;
    for (int a = 1; a < argc && !selected; ++a) selected = std::string(c.name).find(argv[a]) != std::string::npos;
    if (!selected) continue;
    const int before = failures();
    skip_reason().clear();
    try {
      c.fn();
    } catch (const std::exception& e) {
      std::printf("  unexpected exception: %s\n", e.what());
      ++failures();
    }
    const bool ok = failures() == before;
    if (ok && !skip_reason().empty()) {
      ++skipped;
      std::printf("skip %s: %s\n", c.name, skip_reason().c_str());
      std::fflush(stdout);
      continue;
    }
    ++run;
    failed_cases += !ok;
    std::printf("%s %s\n", ok ? "ok" : "FAIL", c.name);
    std::fflush(stdout);
  }
  std::printf("# %d passed, %d failed, %d skipped\n", run - failed_cases, failed_cases, skipped);
  return failed_cases ? 1 : 0;
}

// Every case (those the arguments select, as run_all) reported as skipped for `why`: a
// program whose cases all need something this machine lacks (test_cuda without a GPU).
inline int skip_all(int argc, char** argv, const std::string& why) {
  int skipped = 0;
  for (auto& c : cases()) {
    bool selected = argc <= 1;
    for (int a = 1; a < argc && !selected; ++a) selected = std::string(c.name).find(argv[a]) != std::string::npos;
    if (!selected) continue;
    std::printf("skip %s: %s\n", c.name, why.c_str());
    ++skipped;
  }
  std::printf("# 0 passed, 0 failed, %d skipped\n", skipped);
  return 0;
}

// ||a - b|| / ||b|| over n values (||a - b|| where b is all zeros).
inline double rel_l2(const float* a, const float* b, size_t n) {
  double num = 0, den = 0;
  for (size_t i = 0; i < n; ++i) {
    const double d = (double)a[i] - (double)b[i];
    num += d * d;
    den += (double)b[i] * b[i];
  }
  return den == 0 ? std::sqrt(num) : std::sqrt(num / den);
}

// |a - b| <= atol + rtol * max(|a|, |b|)
inline bool close(double a, double b, double rtol, double atol) {
  return std::fabs(a - b) <= atol + rtol * std::max(std::fabs(a), std::fabs(b));
}

// [n][c][V] <-> [n][c / B][V][B], written out by index (independent of oneDNN).
inline int64_t blocked_index(int i, int ch, int64_t v, int c, int64_t V, int B) {
  return (((int64_t)i * (c / B) + ch / B) * V + v) * B + ch % B;
}
inline std::vector<float> block_channels(const std::vector<float>& x, int n, int c, int64_t V, int B) {
  std::vector<float> y(x.size());
  for (int i = 0; i < n; ++i)
    for (int ch = 0; ch < c; ++ch)
      for (int64_t v = 0; v < V; ++v) y[blocked_index(i, ch, v, c, V, B)] = x[((int64_t)i * c + ch) * V + v];
  return y;
}
inline std::vector<float> unblock_channels(const std::vector<float>& y, int n, int c, int64_t V, int B) {
  std::vector<float> x(y.size());
  for (int i = 0; i < n; ++i)
    for (int ch = 0; ch < c; ++ch)
      for (int64_t v = 0; v < V; ++v) x[((int64_t)i * c + ch) * V + v] = y[blocked_index(i, ch, v, c, V, B)];
  return x;
}

inline std::vector<float> random_vector(size_t n, uint32_t seed, float lo = -1.f, float hi = 1.f) {
  std::mt19937 g(seed);
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<float> v(n);
  for (auto& x : v) x = d(g);
  return v;
}

}  // namespace check

#define TEST(name)                                   \
  static void test_##name();                         \
  static check::Register reg_##name(#name, test_##name); \
  static void test_##name()

#define CHECK(cond)                                                          \
  do {                                                                       \
    if (!(cond)) {                                                           \
      std::printf("  %s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #cond); \
      ++check::failures();                                                   \
    }                                                                        \
  } while (0)

#define CHECK_CLOSE(a, b, rtol, atol)                                                                         \
  do {                                                                                                        \
    const double va_ = (a), vb_ = (b);                                                                        \
    if (!check::close(va_, vb_, rtol, atol)) {                                                                \
      std::printf("  %s:%d: %s = %.9g vs %s = %.9g (rtol %g, atol %g)\n", __FILE__, __LINE__, #a, va_, #b, vb_, \
                  (double)(rtol), (double)(atol));                                                            \
      ++check::failures();                                                                                    \
    }                                                                                                         \
  } while (0)

#define CHECK_THROWS_WITH(expr, fragment)                                                                    \
  do {                                                                                                       \
    bool thrown_ = false;                                                                                    \
    try {                                                                                                    \
      expr;                                                                                                  \
    } catch (const std::exception& e_) {                                                                     \
      thrown_ = true;                                                                                        \
      if (std::string(e_.what()).find(fragment) == std::string::npos) {                                      \
        std::printf("  %s:%d: message '%s' lacks '%s'\n", __FILE__, __LINE__, e_.what(), fragment);           \
        ++check::failures();                                                                                 \
      }                                                                                                      \
    }                                                                                                        \
    if (!thrown_) {                                                                                          \
      std::printf("  %s:%d: %s did not throw\n", __FILE__, __LINE__, #expr);                                  \
      ++check::failures();                                                                                   \
    }                                                                                                        \
  } while (0)

#define TEST_MAIN() \
  int main(int argc, char** argv) { return check::run_all(argc, argv); }
