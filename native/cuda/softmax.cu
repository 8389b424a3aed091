// Softmax over channels at each position on the device: the consensus
// probabilities p(y|x) of prediction (SPEC section 5). CPU reference:
// native/layers/softmax.cpp (exp(z - max), then times 1 / sum).
#include "common.cuh"

namespace cmseg {
namespace cuda {
namespace {

constexpr int kThreads = 256;

__global__ void softmax_kernel(const float* __restrict__ z, float* __restrict__ p, int n, int c, int64_t V) {
  const int64_t total = (int64_t)n * V;
  for (int64_t pix = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; pix < total;
       pix += (int64_t)gridDim.x * blockDim.x) {
    const int64_t i = pix / V, v = pix - i * V;
    const float* zi = z + i * c * V + v;
    float* pi = p + i * c * V + v;
    float m = zi[0];
    for (int k = 1; k < c; ++k) m = fmaxf(m, zi[k * V]);
    float s = 0.f;
    for (int k = 0; k < c; ++k) s += (pi[k * V] = expf(zi[k * V] - m));
    const float inv = 1.f / s;
    for (int k = 0; k < c; ++k) pi[k * V] *= inv;
  }
}

}  // namespace

void softmax_forward(Context& ctx, const float* z, float* p, int n, int c, int64_t V) {
  ProfileScope prof_(ctx, "softmax_forward");
  if (n < 1 || c < 1 || V < 1) fail("softmax_forward: empty shape (n ", n, ", c ", c, ", V ", V, ")");
  const int64_t total = (int64_t)n * V;
  softmax_kernel<<<ctx.impl().grid_for(total, kThreads, 16), kThreads, 0, stream_of(ctx)>>>(z, p, n, c, V);
  CMSEG_CUDA_LAUNCHED("softmax_forward");
}

}  // namespace cuda
}  // namespace cmseg
