// Vector math over contiguous rows for the CM loss: softplus(x) = log(1 + e^x)
// with sigmoid(x), exp and log, written so
// the compiler vectorises it (CMake compiles this one file with -ffast-math,
// which lets GCC call glibc's vector expf/log1pf). Above 20, softplus equals x
// and sigmoid 1 in float32. Inputs are finite (the network's head outputs).
#include <cmath>
#include <cstdint>

namespace cmseg {

void softplus_sigmoid_rows(const float* __restrict x, float* __restrict sp, float* __restrict sg, int64_t count) {
  for (int64_t i = 0; i < count; ++i) {
    const float xi = x[i];
    const float e = std::exp(std::fmin(xi, 20.f));
    sp[i] = xi > 20.f ? xi : std::log1p(e);
    sg[i] = xi > 20.f ? 1.f : e / (1.f + e);
  }
}

// In place (one pointer, so the compiler needs no aliasing check).
void exp_inplace(float* x, int64_t count) {
  for (int64_t i = 0; i < count; ++i) x[i] = std::exp(x[i]);
}

// Inputs are positive (clamped probabilities).
void log_inplace(float* x, int64_t count) {
  for (int64_t i = 0; i < count; ++i) x[i] = std::log(x[i]);
}

}  // namespace cmseg
