// Multi-tensor Adam / AdamW on the device: every parameter tensor of the model is
// updated by one launch (a U-Net has ~50 tensors, many of them tiny, so one launch
// per tensor would be mostly launch overhead). The update is the CPU reference's
// (native/model/adam.cpp) expression for expression, bias correction included.
#include "common.cuh"

#include <cmath>

namespace cmseg {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunk = 1 << 14;  // elements per block-sized piece of work

struct TensorDesc {
  float* w;
  const float* g;
  float* m;
  float* v;
  int64_t numel;
};
struct ChunkDesc {
  int tensor;
  int64_t start;
};
struct AdamScalars {
  float lr, beta1, beta2, eps, weight_decay, step_size, rbc2;
  bool decoupled;  // AdamW
};

__global__ void adam_kernel(const TensorDesc* __restrict__ tensors, const ChunkDesc* __restrict__ chunks, int nchunks,
                            AdamScalars s, const unsigned long long* __restrict__ refused) {
  if (refused && *refused) return;  // the guard found a gradient Adam cannot square: nothing changes
  for (int c = blockIdx.x; c < nchunks; c += gridDim.x) {
    const ChunkDesc cd = chunks[c];
    const TensorDesc t = tensors[cd.tensor];
    const int64_t end = min(t.numel, cd.start + kChunk);
    for (int64_t k = cd.start + threadIdx.x; k < end; k += blockDim.x) {
      float w = t.w[k], gk = t.g[k];
      if (!s.decoupled)
        gk += s.weight_decay * w;
      else
        w -= s.lr * s.weight_decay * w;
      const float m = s.beta1 * t.m[k] + (1.f - s.beta1) * gk;
      const float v = s.beta2 * t.v[k] + (1.f - s.beta2) * gk * gk;
      t.m[k] = m;
      t.v[k] = v;
      t.w[k] = w - s.step_size * m / (sqrtf(v) * s.rbc2 + s.eps);
    }
  }
}

// Bad gradients are rare (a diverging run): a thread that meets one raises the flag
// itself, with no block reduction in the common path.
__global__ void find_unsquarable_kernel(const float* __restrict__ g, const float* __restrict__ w, int64_t n, float l2,
                                        float limit, unsigned long long* __restrict__ flag) {
  unsigned long long first = 0;  // n - k of the thread's first bad k (its largest)
  for (int64_t k = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; k < n; k += (int64_t)gridDim.x * blockDim.x)
    if (!(fabsf(g[k] + l2 * w[k]) <= limit)) {
      first = (unsigned long long)(n - k);
      break;
    }
  if (first) atomicMax(flag, first);
}

}  // namespace

void find_unsquarable(Context& ctx, const float* g, const float* w, int64_t n, float l2, float limit,
                      unsigned long long* flag) {
  if (n <= 0) return;
  const int64_t blocks = std::min<int64_t>((n + kThreads - 1) / kThreads, (int64_t)ctx.impl().multiprocessors * 8);
  find_unsquarable_kernel<<<(int)blocks, kThreads, 0, stream_of(ctx)>>>(g, w, n, l2, limit, flag);
  CMSEG_CUDA_LAUNCHED("find_unsquarable");
}

void adam_step(Context& ctx, const std::vector<AdamTensor>& tensors, const OptimConfig& o, int64_t step,
               const unsigned long long* refused) {
  ProfileScope prof_(ctx, "adam_step");
  if (step < 1) fail("adam_step: step must be >= 1 (the step number after the increment), got ", step);
  std::vector<TensorDesc> descs;
  std::vector<ChunkDesc> chunks;
  for (const AdamTensor& t : tensors) {
    if (t.numel <= 0) continue;
    if (!t.w || !t.g || !t.m || !t.v) fail("adam_step: tensor ", descs.size(), " has a null pointer");
    for (int64_t s = 0; s < t.numel; s += kChunk) chunks.push_back({(int)descs.size(), s});
    descs.push_back({t.w, t.g, t.m, t.v, t.numel});
  }
  if (chunks.empty()) return;
  // The same float expressions as Model::apply_optimizer.
  const float bc1 = 1.f - std::pow(o.beta1, (float)step), bc2 = 1.f - std::pow(o.beta2, (float)step);
  AdamScalars s{o.lr, o.beta1, o.beta2, o.eps, o.weight_decay, o.lr / bc1, 1.f / std::sqrt(bc2),
                o.kind == OptimKind::AdamW};
  Buffer<TensorDesc> d_descs(ctx, descs);
  Buffer<ChunkDesc> d_chunks(ctx, chunks);
  const int grid = (int)std::min<size_t>(chunks.size(), (size_t)ctx.impl().multiprocessors * 16);
  adam_kernel<<<grid, kThreads, 0, stream_of(ctx)>>>(d_descs.data(), d_chunks.data(), (int)chunks.size(), s, refused);
  CMSEG_CUDA_LAUNCHED("adam_step");
}

namespace host {

void adam_step(Context& ctx, std::vector<Param>& params, const OptimConfig& o, int64_t step) {
  std::vector<Buffer<float>> bufs;
  std::vector<AdamTensor> tensors;
  bufs.reserve(params.size() * 4);
  for (Param& p : params) {
    if (p.grad.size() != p.value.size() || p.m.size() != p.value.size() || p.v.size() != p.value.size())
      fail("adam_step: parameter ", p.name, " has mismatched value/grad/moment sizes");
    for (auto* h : {&p.value, &p.grad, &p.m, &p.v}) bufs.emplace_back(ctx, *h);
    const size_t b = bufs.size() - 4;
    tensors.push_back({bufs[b].data(), bufs[b + 1].data(), bufs[b + 2].data(), bufs[b + 3].data(), p.numel()});
  }
  cuda::adam_step(ctx, tensors, o, step);
  for (size_t i = 0; i < params.size(); ++i) {
    bufs[4 * i].download(params[i].value.data());
    bufs[4 * i + 2].download(params[i].m.data());
    bufs[4 * i + 3].download(params[i].v.data());
  }
}

}  // namespace host
}  // namespace cuda
}  // namespace cmseg
