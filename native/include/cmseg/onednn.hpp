// oneDNN fast paths (STYLE: native/onednn/ beside the CPU reference in
// native/layers/). Same signatures and conventions as cmseg/layers.hpp; the
// reference layers dispatch here at their top when enabled() is true, so the
// model code does not change. Built only with CMSEG_HAVE_ONEDNN=1; otherwise
// the inline stubs below keep callers (tests, benchmarks) compiling.
//
// Layouts: our activations stay plain N, C, *S between layers; each call
// reorders into the layout the primitive prefers (format_tag::any, 8-channel
// blocked on AVX2) and back. 3D backward-weights, which oneDNN only offers as
// im2col + GEMM on AVX2, runs as 2D kernels over depth slices; any other
// GEMM-only direction runs the reference (native/onednn/conv3_onednn.cpp;
// CMSEG_ONEDNN_LAYOUT=any|nhwc|plain overrides this policy for measurements).
#pragma once
#include <string>

#include "cmseg/layers.hpp"

namespace cmseg {
namespace onednn {

#if CMSEG_HAVE_ONEDNN

// True unless CMSEG_ONEDNN=0 in the environment (read once) or set_enabled(false).
bool enabled();
void set_enabled(bool on);
// "oneDNN 3.13.2 (cpu runtime SYCL, threading TBB, 2 threads)"
std::string describe();
// Number of cached primitives (tests: creation happens once per shape and direction).
size_t cached_primitives();

void conv3_forward(const float* x, const float* w, float* y, int n, int cin, int cout, Spatial s, int ndim);
void conv3_backward(const float* x, const float* w, const float* dy, float* dx, float* dw, int n, int cin, int cout,
                    Spatial s, int ndim);
void upconv2_forward(const float* x, const float* w, const float* b, float* y, int n, int cin, int cout, Spatial s,
                     int ndim);
void upconv2_backward(const float* x, const float* w, const float* dy, float* dx, float* dw, float* db, int n, int cin,
                      int cout, Spatial s, int ndim);

#else

inline bool enabled() { return false; }
inline void set_enabled(bool) {}
inline std::string describe() { return "built without oneDNN"; }
inline size_t cached_primitives() { return 0; }

#endif

}  // namespace onednn
}  // namespace cmseg
