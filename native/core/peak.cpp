#include "cmseg/peak.hpp"

#include <chrono>

#include "cmseg/threads.hpp"

namespace cmseg {
namespace {

#if defined(__GNUC__) || defined(__clang__)
typedef float v8 __attribute__((vector_size(32)));
constexpr int kLanes = 8;
#define LANE(v, l) (v)[l]
#else
typedef float v8;
constexpr int kLanes = 1;
#define LANE(v, l) (v)
#endif
constexpr int kChains = 12;  // enough independent chains to cover the FMA latency

// Runs `iters` rounds of kChains independent FMAs (register-resident chains);
// returns a value so the work is not optimised away.
float fma_chains(long iters, float seed) {
  v8 mul = {}, add = {};
  mul += 0.999999f;
  add += 1e-7f;
  v8 a0 = mul * seed, a1 = a0 + 1, a2 = a0 + 2, a3 = a0 + 3, a4 = a0 + 4, a5 = a0 + 5;
  v8 a6 = a0 + 6, a7 = a0 + 7, a8 = a0 + 8, a9 = a0 + 9, a10 = a0 + 10, a11 = a0 + 11;
  for (long i = 0; i < iters; ++i) {
    a0 = a0 * mul + add, a1 = a1 * mul + add, a2 = a2 * mul + add, a3 = a3 * mul + add;
    a4 = a4 * mul + add, a5 = a5 * mul + add, a6 = a6 * mul + add, a7 = a7 * mul + add;
    a8 = a8 * mul + add, a9 = a9 * mul + add, a10 = a10 * mul + add, a11 = a11 * mul + add;
  }
  const v8 sum = ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7)) + ((a8 + a9) + (a10 + a11));
  float s = 0.f;
  for (int l = 0; l < kLanes; ++l) s += LANE(sum, l);
  return s;
}

}  // namespace

double measure_peak_gflops(double seconds) {
  // Calibrate on one thread, then run every thread for about `seconds`.
  long iters = 1 << 16;
  for (;;) {
    auto t0 = std::chrono::steady_clock::now();
    volatile float sink = fma_chains(iters, 1.f);
    (void)sink;
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (dt > 0.05 || iters > (1L << 34)) {
      iters = (long)(iters * seconds / dt) + 1;
      break;
    }
    iters *= 4;
  }
  const int threads = num_threads();
  auto t0 = std::chrono::steady_clock::now();
  parallel_for(threads, [&](int64_t t, int) {
    volatile float sink = fma_chains(iters, (float)t);
    (void)sink;
  });
  const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return 2.0 * kLanes * kChains * (double)iters * threads / dt / 1e9;
}

}  // namespace cmseg
