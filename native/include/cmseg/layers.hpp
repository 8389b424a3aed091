// CPU reference layers (SPEC section 2). Activations are float32 in N, C, *S
// layout; 2D maps are handled as 3D with depth 1, so one code path serves both.
//
// Conventions for every backward:
//   - activation gradients (dx) are overwritten, unless the argument is named
//     dx_accumulate;
//   - parameter gradients (dw, db, dgamma, dbeta) are accumulated (+=), so that
//     a parameter used by several paths or batches sums its gradients.
#pragma once
#include <cstdint>
#include <vector>

namespace cmseg {

// Spatial extent of one channel. 2D: d == 1 and ndim == 2.
struct Spatial {
  int d = 1, h = 1, w = 1;
  int64_t size() const { return (int64_t)d * h * w; }
  bool operator==(const Spatial& o) const { return d == o.d && h == o.h && w == o.w; }
};

// Kernel taps of the 3x3(x3) convolution and the 2x2(x2) pool / up-convolution.
inline int conv3_taps(int ndim) { return ndim == 3 ? 27 : 9; }
inline int pool2_taps(int ndim) { return ndim == 3 ? 8 : 4; }
Spatial halve(Spatial s, int ndim);
Spatial twice(Spatial s, int ndim);

// ---- 3x3(x3) convolution, stride 1, zero padding 1, no bias. w: [cout, cin, k^ndim]
void conv3_forward(const float* x, const float* w, float* y, int n, int cin, int cout, Spatial s, int ndim);
// dx may be null (first layer: no input gradient needed).
void conv3_backward(const float* x, const float* w, const float* dy, float* dx, float* dw, int n, int cin,
                    int cout, Spatial s, int ndim);

// ---- transposed convolution, kernel 2, stride 2, with bias. w: [cin, cout, 2^ndim]
// s is the input extent; the output extent is twice(s).
void upconv2_forward(const float* x, const float* w, const float* b, float* y, int n, int cin, int cout, Spatial s,
                     int ndim);
void upconv2_backward(const float* x, const float* w, const float* dy, float* dx, float* dw, float* db, int n,
                      int cin, int cout, Spatial s, int ndim);

// ---- max-pool 2, stride 2. s is the input extent (divisible by 2). arg stores
// the winning tap per output element for the backward pass.
void maxpool2_forward(const float* x, float* y, uint8_t* arg, int nc, Spatial s, int ndim);
void maxpool2_backward(const float* dy, const uint8_t* arg, float* dx, int nc, Spatial s, int ndim);

// ---- instance norm (affine), per (n, c) over space, biased variance.
// With relu = true the output is relu(norm(x)) and the backward masks dy by y > 0:
// the block's norm and ReLU run as one pass without a stored pre-ReLU tensor.
constexpr float kInstanceNormEps = 1e-5f;
void instance_norm_forward(const float* x, const float* gamma, const float* beta, float* y, float* mean, float* rstd,
                           int n, int c, int64_t V, bool relu);
void instance_norm_backward(const float* x, const float* y, const float* mean, const float* rstd, const float* gamma,
                            const float* dy, float* dx, float* dgamma, float* dbeta, int n, int c, int64_t V,
                            bool relu);

// The same on channel-blocked activations, [n][c / block][V][block] with block
// 8 or 16 and c a multiple of it: the layout of the model's oneDNN trunk
// (issue 7). mean and rstd are indexed n * c + channel as above.
void instance_norm_forward_blocked(const float* x, const float* gamma, const float* beta, float* y, float* mean,
                                   float* rstd, int n, int c, int64_t V, bool relu, int block);
void instance_norm_backward_blocked(const float* x, const float* y, const float* mean, const float* rstd,
                                    const float* gamma, const float* dy, float* dx, float* dgamma, float* dbeta, int n,
                                    int c, int64_t V, bool relu, int block);

// ---- ReLU
void relu_forward(const float* x, float* y, int64_t count);
void relu_backward(const float* y, const float* dy, float* dx, int64_t count);

// ---- channel concat: y = cat([a, b], channel); b may be null (y's second part written already)
void concat_forward(const float* a, int ca, const float* b, int cb, float* y, int n, int64_t V);
void concat_backward(const float* dy, float* da, int ca, float* db, int cb, int n, int64_t V);

// ---- 1x1(x1) convolution with bias (the heads). w: [cout, cin]
void conv1_forward(const float* x, const float* w, const float* b, float* y, int n, int cin, int cout, int64_t V);
void conv1_backward(const float* x, const float* w, const float* dy, float* dx_accumulate, float* dw, float* db, int n,
                    int cin, int cout, int64_t V);
// Several heads on the same input in one pass over it (the consensus head and
// the CM heads read the same features): each chunk of x, and of dx in the
// backward, is loaded once for all heads. Same results as one call per head.
struct Conv1Head {
  int cout = 0;
  const float* w = nullptr;
  const float* b = nullptr;
  float* y = nullptr;         // forward output [n, cout, V]
  const float* dy = nullptr;  // backward: gradient of y
  float* dw = nullptr;        // backward: accumulated
  float* db = nullptr;        // backward: accumulated
};
void conv1_forward_heads(const float* x, const std::vector<Conv1Head>& heads, int n, int cin, int64_t V);
void conv1_backward_heads(const float* x, const std::vector<Conv1Head>& heads, float* dx_accumulate, int n, int cin,
                          int64_t V);

// ---- softmax over channels at each position
void softmax_forward(const float* z, float* p, int n, int c, int64_t V);
void softmax_backward(const float* p, const float* dp, float* dz, int n, int c, int64_t V);

}  // namespace cmseg
