// oneDNN fast paths (STYLE: native/onednn/ beside the CPU reference in
// native/layers/). Same signatures and conventions as cmseg/layers.hpp; the
// reference layers dispatch here at their top when enabled() is true, so the
// model code does not change. Built only with CMSEG_HAVE_ONEDNN=1; otherwise
// the inline stubs below keep callers (tests, benchmarks) compiling.
//
// Layouts: every call takes the layout of its activations, plain N, C, *S or
// channel-blocked (Blocks below), and reorders only what the primitive wants
// differently. The model keeps its trunk in the blocked layout the direct
// kernels prefer (8 channels on AVX2, 16 on AVX-512), so that activations are
// reordered only at the model's boundaries: the images in, the features out to
// the heads and their gradient back (native/model/unet.cpp). 3D backward-weights, which oneDNN only offers as
// im2col + GEMM on AVX2, runs as 2D kernels over depth slices; any other
// GEMM-only direction runs the reference (native/onednn/conv3_onednn.cpp;
// CMSEG_ONEDNN_LAYOUT=any|nhwc|plain overrides this policy for measurements).
#pragma once
#include <string>

#include "cmseg/layers.hpp"

namespace cmseg {
namespace onednn {

// Channel block B of activations: a tensor [n, c, *S] stored as
// [n][c / B][*S][B] (oneDNN's nCdhw8c / nChw8c for B = 8); 0 = plain.
// x: the layer's input side (x, dx); y: its output side (y, dy).
struct Blocks {
  int x = 0, y = 0;
};

#if CMSEG_HAVE_ONEDNN

// True unless CMSEG_ONEDNN=0 in the environment (read once) or set_enabled(false).
bool enabled();
void set_enabled(bool on);
// "oneDNN 3.13.2 (cpu runtime SYCL, threading TBB, 2 threads)"
std::string describe();
// Number of cached primitives (tests: creation happens once per shape and direction).
size_t cached_primitives();

// The block the direct convolution kernels prefer on this machine (8 on AVX2,
// 16 on AVX-512), or 0 when they prefer something else or the layout policy is
// nhwc/plain or CMSEG_ONEDNN_TRUNK=plain. Probed once per ndim.
int activation_block(int ndim);
// The block of the model's trunk (native/model/unet.cpp): activation_block(ndim)
// when every level's width base << k (k < depth) is a multiple of it, else 0 (plain).
inline int trunk_block(int ndim, int base, int depth) {
  const int b = activation_block(ndim);
  for (int k = 0; b && k < depth; ++k)
    if ((base << k) % b) return 0;
  return b;
}
// Layout conversions at the model's boundaries (c must be a multiple of block).
void to_blocked(const float* plain, float* blocked, int n, int c, Spatial s, int ndim, int block);
void to_plain(const float* blocked, float* plain, int n, int c, Spatial s, int ndim, int block);
// Number of activation reorders so far, this process (tests: the blocked trunk
// reorders only at its boundaries; the depth-sliced weight gradients' own
// reorders are not counted).
long long activation_reorders();

void conv3_forward(const float* x, const float* w, float* y, int n, int cin, int cout, Spatial s, int ndim,
                   Blocks b = {});
void conv3_backward(const float* x, const float* w, const float* dy, float* dx, float* dw, int n, int cin, int cout,
                    Spatial s, int ndim, Blocks b = {});
void upconv2_forward(const float* x, const float* w, const float* b, float* y, int n, int cin, int cout, Spatial s,
                     int ndim, Blocks blocks = {});
void upconv2_backward(const float* x, const float* w, const float* dy, float* dx, float* dw, float* db, int n, int cin,
                      int cout, Spatial s, int ndim, Blocks blocks = {});

// Max-pool 2, stride 2 on blocked activations (block > 0) through oneDNN's
// pooling primitives. The workspace (the winning tap of each output element)
// carries from forward to backward; s is the input extent.
size_t maxpool2_workspace_bytes(int n, int c, Spatial s, int ndim, int block);
void maxpool2_forward(const float* x, float* y, void* workspace, int n, int c, Spatial s, int ndim, int block);
void maxpool2_backward(const float* dy, const void* workspace, float* dx, int n, int c, Spatial s, int ndim, int block);

#else

inline bool enabled() { return false; }
inline void set_enabled(bool) {}
inline std::string describe() { return "built without oneDNN"; }
inline size_t cached_primitives() { return 0; }
inline int activation_block(int) { return 0; }
inline int trunk_block(int, int, int) { return 0; }
inline long long activation_reorders() { return 0; }
// activation_block() is 0 here, so callers never reach the blocked layers.
[[noreturn]] void unavailable(const char* what);
inline void to_blocked(const float*, float*, int, int, Spatial, int, int) { unavailable("to_blocked"); }
inline void to_plain(const float*, float*, int, int, Spatial, int, int) { unavailable("to_plain"); }
inline void conv3_forward(const float*, const float*, float*, int, int, int, Spatial, int, Blocks) {
  unavailable("conv3_forward");
}
inline void conv3_backward(const float*, const float*, const float*, float*, float*, int, int, int, Spatial, int,
                           Blocks) {
  unavailable("conv3_backward");
}
inline void upconv2_forward(const float*, const float*, const float*, float*, int, int, int, Spatial, int, Blocks) {
  unavailable("upconv2_forward");
}
inline void upconv2_backward(const float*, const float*, const float*, float*, float*, float*, int, int, int, Spatial,
                             int, Blocks) {
  unavailable("upconv2_backward");
}
inline size_t maxpool2_workspace_bytes(int, int, Spatial, int, int) { return 0; }
inline void maxpool2_forward(const float*, float*, void*, int, int, Spatial, int, int) {
  unavailable("maxpool2_forward");
}
inline void maxpool2_backward(const float*, const void*, float*, int, int, Spatial, int, int) {
  unavailable("maxpool2_backward");
}

#endif

}  // namespace onednn
}  // namespace cmseg
