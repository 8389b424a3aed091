// Plain cross-entropy on the consensus logits on the device: the `naive` (fused
// label map, hard or soft) and `oracle` methods of SPEC section 4. CPU reference:
// native/loss/ce_loss.cpp, whose per-pixel expressions (log-softmax, then p from
// exp(log p); weights as float of the double 1/count) are repeated here.
//
// Hard labels: count the labelled pixels (integer atomics: order-free), then one
// thread per pixel writes d/d logits and adds -log p[c] into a per-block double sum;
// the blocks' sums are added in index order. Soft targets likewise, counting the pixels
// whose row has a nonzero entry.
#include <type_traits>

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

__global__ void count_soft_labelled_kernel(const float* __restrict__ target, int n, int L, int64_t V,
                                           unsigned long long* __restrict__ count) {
  __shared__ double scratch[32];
  const int64_t total = (int64_t)n * V;
  double c = 0;
  for (int64_t pix = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; pix < total;
       pix += (int64_t)gridDim.x * blockDim.x) {
    const int64_t i = pix / V, v = pix - i * V;
    bool any = false;
    for (int k = 0; k < L; ++k) any = any || target[(i * L + k) * V + v] != 0.f;
    c += any;
  }
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

// out = the sum of the blocks' sums in index order / count (0 when nothing is labelled).
__global__ void ce_finish_kernel(const double* __restrict__ partial, int blocks,
                                 const unsigned long long* __restrict__ count, double* __restrict__ out) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  double s = 0;
  for (int b = 0; b < blocks; ++b) s += partial[b];
  *out = s * (*count ? 1.0 / (double)*count : 0.0);
}

void check(const char* what, int n, int L, int64_t V) {
  if (L < 2 || L > kMaxClasses) fail(what, ": classes must be in 2..", kMaxClasses, ", got ", L);
  if (n < 1 || V < 1) fail(what, ": empty batch (n ", n, ", V ", V, ")");
}

// f(std::integral_constant<int, CAP>{}) with the smallest of the kernels' class caps that
// holds L (the per-pixel arrays are sized by it).
template <class F>
void with_class_cap(int L, F f) {
  if (L <= 2)
    f(std::integral_constant<int, 2>{});
  else if (L <= 4)
    f(std::integral_constant<int, 4>{});
  else
    f(std::integral_constant<int, kMaxClasses>{});
}

// The launches both losses share: count the labelled pixels, one thread per pixel
// (count_pixels(grid, stream, count) and per_pixel(grid, stream, count, partial) launch
// the kernels), then the ordered sum. The loss comes back to the host.
template <class CountPixels, class PerPixel>
double run_loss(Context& ctx, int64_t total, CountPixels count_pixels, PerPixel per_pixel) {
  cudaStream_t st = stream_of(ctx);
  Context::Impl& im = ctx.impl();
  Buffer<unsigned long long> count(ctx, 1);
  Buffer<double> result(ctx, 1);
  count.zero();
  count_pixels(im.grid_for(total, 256, 4), st, count.data());
  CMSEG_CUDA_LAUNCHED("plain CE count");
  const int grid = im.grid_for(total, kThreads, 8);
  Buffer<double> partial(ctx, (size_t)grid);
  per_pixel(grid, st, count.data(), partial.data());
  CMSEG_CUDA_LAUNCHED("plain CE main");
  ce_finish_kernel<<<1, 1, 0, st>>>(partial.data(), grid, count.data(), result.data());
  CMSEG_CUDA_LAUNCHED("plain CE finish");
  double loss = 0;
  result.download(&loss);  // waits for the stream
  return loss;
}

}  // namespace

double ce_loss_hard(Context& ctx, const float* logits, const uint8_t* labels, int n, int L, int64_t V,
                    float* d_logits) {
  ProfileScope prof_(ctx, "ce_loss_hard");
  check("ce_loss_hard", n, L, V);
  const int64_t total = (int64_t)n * V;
  auto count = [&](int grid, cudaStream_t st, unsigned long long* c) {
    count_labelled_kernel<<<grid, 256, 0, st>>>(labels, total, c);
  };
  auto per_pixel = [&](int grid, cudaStream_t st, const unsigned long long* c, double* partial) {
    with_class_cap(L, [&](auto cap) {
      ce_hard_kernel<decltype(cap)::value><<<grid, kThreads, 0, st>>>(logits, labels, n, L, V, c, d_logits, partial);
    });
  };
  return run_loss(ctx, total, count, per_pixel);
}

double ce_loss_soft(Context& ctx, const float* logits, const float* target, int n, int L, int64_t V,
                    float* d_logits) {
  ProfileScope prof_(ctx, "ce_loss_soft");
  check("ce_loss_soft", n, L, V);
  auto count = [&](int grid, cudaStream_t st, unsigned long long* c) {
    count_soft_labelled_kernel<<<grid, 256, 0, st>>>(target, n, L, V, c);
  };
  auto per_pixel = [&](int grid, cudaStream_t st, const unsigned long long* c, double* partial) {
    with_class_cap(L, [&](auto cap) {
      ce_soft_kernel<decltype(cap)::value><<<grid, kThreads, 0, st>>>(logits, target, n, L, V, c, d_logits, partial);
    });
  };
  return run_loss(ctx, (int64_t)n * V, count, per_pixel);
}

}  // namespace cuda
}  // namespace cmseg
