// Plain cross-entropy on the consensus logits on the device: the `naive` (fused
// label map, hard or soft) and `oracle` methods of SPEC section 4. CPU reference:
// native/loss/ce_loss.cpp, whose per-pixel expressions (log-softmax, then p from
// exp(log p); weights as float of the double 1/count) are repeated here.
//
// Hard labels: count the labelled pixels (integer atomics: order-free), then one
// thread per pixel writes d/d logits and adds -log p[c] into a per-block double sum;
// the blocks' sums are added in index order. Soft targets need no count.
#include "common.cuh"

namespace cmseg {
namespace cuda {
namespace {

constexpr int kThreads = 128;

__global__ void count_labelled_kernel(const uint8_t* __restrict__ labels, int64_t total,
                                      unsigned long long* __restrict__ count) {
  __shared__ double scratch[32];
  double c = 0;
  for (int64_t k = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; k < total; k += (int64_t)gridDim.x * blockDim.x)
    c += labels[k] != kUnlabelled;
  c = block_sum(c, scratch);
  if (threadIdx.x == 0 && c > 0) atomicAdd(count, (unsigned long long)c);
}

// lp = log softmax(z), p = exp(lp) over the L channels of one pixel (stride V).
template <int CAP>
__device__ __forceinline__ void log_softmax(const float* z, int64_t V, int L, float* lp, float* p) {
  float m = z[0];
#pragma unroll
  for (int k = 1; k < CAP; ++k)
    if (k < L) m = fmaxf(m, z[k * V]);
  float s = 0.f;
#pragma unroll
  for (int k = 0; k < CAP; ++k)
    if (k < L) s += expf(z[k * V] - m);
  const float ls = logf(s);
#pragma unroll
  for (int k = 0; k < CAP; ++k)
    if (k < L) {
      lp[k] = z[k * V] - m - ls;
      p[k] = expf(lp[k]);
    }
}

template <int CAP>
__global__ void __launch_bounds__(kThreads) ce_hard_kernel(const float* __restrict__ logits,
                                                           const uint8_t* __restrict__ labels, int n, int L, int64_t V,
                                                           const unsigned long long* __restrict__ count,
                                                           float* __restrict__ d_logits, double* __restrict__ partial) {
  __shared__ double scratch[32];
  const unsigned long long cnt = *count;
  const float w = (float)(cnt ? 1.0 / (double)cnt : 0.0);
  const int64_t total = (int64_t)n * V;
  double acc = 0;
  for (int64_t pix = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; pix < total;
       pix += (int64_t)gridDim.x * blockDim.x) {
    const int64_t i = pix / V, v = pix - i * V;
    const int c = labels[pix];
    float* dz = d_logits ? d_logits + i * L * V + v : nullptr;
    if (c == kUnlabelled) {
      if (dz)
        for (int k = 0; k < L; ++k) dz[k * V] = 0.f;
      continue;
    }
    float lp[CAP], p[CAP];
    log_softmax<CAP>(logits + i * L * V + v, V, L, lp, p);
#pragma unroll
    for (int k = 0; k < CAP; ++k)
      if (k < L && k == c) acc -= lp[k];
    if (dz) {
#pragma unroll
      for (int k = 0; k < CAP; ++k)
        if (k < L) dz[k * V] = w * (p[k] - (k == c ? 1.f : 0.f));
    }
  }
  acc = block_sum(acc, scratch);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

template <int CAP>
__global__ void __launch_bounds__(kThreads) ce_soft_kernel(const float* __restrict__ logits,
                                                           const float* __restrict__ target, int n, int L, int64_t V,
                                                           float w, float* __restrict__ d_logits,
                                                           double* __restrict__ partial) {
  __shared__ double scratch[32];
  const int64_t total = (int64_t)n * V;
  double acc = 0;
  for (int64_t pix = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; pix < total;
       pix += (int64_t)gridDim.x * blockDim.x) {
    const int64_t i = pix / V, v = pix - i * V;
    const float* t = target + i * L * V + v;
    float lp[CAP], p[CAP];
    log_softmax<CAP>(logits + i * L * V + v, V, L, lp, p);
    float tsum = 0.f;
#pragma unroll
    for (int k = 0; k < CAP; ++k)
      if (k < L) {
        acc -= (double)t[k * V] * lp[k];
        tsum += t[k * V];
      }
    if (d_logits) {
      float* dz = d_logits + i * L * V + v;
#pragma unroll
      for (int k = 0; k < CAP; ++k)
        if (k < L) dz[k * V] = w * (tsum * p[k] - t[k * V]);
    }
  }
  acc = block_sum(acc, scratch);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// out = scale * sum of the blocks' sums in index order; scale from the count when
// `count` is set (hard labels), else the given one.
__global__ void ce_finish_kernel(const double* __restrict__ partial, int blocks,
                                 const unsigned long long* __restrict__ count, double scale, double* __restrict__ out) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  double s = 0;
  for (int b = 0; b < blocks; ++b) s += partial[b];
  if (count) scale = *count ? 1.0 / (double)*count : 0.0;
  *out = s * scale;
}

void check(const char* what, int n, int L, int64_t V) {
  if (L < 2 || L > kMaxClasses) fail(what, ": classes must be in 2..", kMaxClasses, ", got ", L);
  if (n < 1 || V < 1) fail(what, ": empty batch (n ", n, ", V ", V, ")");
}

}  // namespace

double ce_loss_hard(Context& ctx, const float* logits, const uint8_t* labels, int n, int L, int64_t V,
                    float* d_logits) {
  ProfileScope prof_(ctx, "ce_loss_hard");
  check("ce_loss_hard", n, L, V);
  cudaStream_t st = stream_of(ctx);
  Context::Impl& im = ctx.impl();
  const int64_t total = (int64_t)n * V;
  Buffer<unsigned long long> count(ctx, 1);
  Buffer<double> result(ctx, 1);
  count.zero();
  count_labelled_kernel<<<im.grid_for(total, 256, 4), 256, 0, st>>>(labels, total, count.data());
  CMSEG_CUDA_LAUNCHED("ce_loss_hard count");
  const int grid = im.grid_for(total, kThreads, 8);
  Buffer<double> partial(ctx, (size_t)grid);
  if (L <= 2)
    ce_hard_kernel<2><<<grid, kThreads, 0, st>>>(logits, labels, n, L, V, count.data(), d_logits, partial.data());
  else if (L <= 4)
    ce_hard_kernel<4><<<grid, kThreads, 0, st>>>(logits, labels, n, L, V, count.data(), d_logits, partial.data());
  else
    ce_hard_kernel<kMaxClasses><<<grid, kThreads, 0, st>>>(logits, labels, n, L, V, count.data(), d_logits,
                                                           partial.data());
  CMSEG_CUDA_LAUNCHED("ce_loss_hard main");
  ce_finish_kernel<<<1, 1, 0, st>>>(partial.data(), grid, count.data(), 0.0, result.data());
  CMSEG_CUDA_LAUNCHED("ce_loss_hard finish");
  double loss = 0;
  result.download(&loss);  // waits for the stream
  return loss;
}

double ce_loss_soft(Context& ctx, const float* logits, const float* target, int n, int L, int64_t V,
                    float* d_logits) {
  ProfileScope prof_(ctx, "ce_loss_soft");
  check("ce_loss_soft", n, L, V);
  cudaStream_t st = stream_of(ctx);
  const int64_t total = (int64_t)n * V;
  const double w = 1.0 / ((double)n * V);
  const int grid = ctx.impl().grid_for(total, kThreads, 8);
  Buffer<double> partial(ctx, (size_t)grid), result(ctx, 1);
  if (L <= 2)
    ce_soft_kernel<2><<<grid, kThreads, 0, st>>>(logits, target, n, L, V, (float)w, d_logits, partial.data());
  else if (L <= 4)
    ce_soft_kernel<4><<<grid, kThreads, 0, st>>>(logits, target, n, L, V, (float)w, d_logits, partial.data());
  else
    ce_soft_kernel<kMaxClasses><<<grid, kThreads, 0, st>>>(logits, target, n, L, V, (float)w, d_logits,
                                                           partial.data());
  CMSEG_CUDA_LAUNCHED("ce_loss_soft main");
  ce_finish_kernel<<<1, 1, 0, st>>>(partial.data(), grid, nullptr, w, result.data());
  CMSEG_CUDA_LAUNCHED("ce_loss_soft finish");
  double loss = 0;
  result.download(&loss);
  return loss;
}

}  // namespace cuda
}  // namespace cmseg
