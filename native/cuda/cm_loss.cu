// The fused confusion-matrix loss on the device (SPEC sections 3 and 4), forward and
// backward in one pass. CPU reference: native/loss/cm_loss.cpp, whose per-pixel
// arithmetic this file repeats expression for expression.
//
// Launch sequence (all on the context's stream, one host wait at the end):
//   count    |P_r| per (image, annotator): labelled pixels of present images;
//   weights  w_ce = 1/|P_r|, w_tr = 1/|V_r|, both 0 for an annotator with no
//            labelled pixel in the batch (SPEC 4);
//   [global] the R normalised global CMs, once;
//   main     one thread per pixel, all annotators: softmax, A_r, q_r = A_r p, CE with
//            the 1e-12 floor, trace, d/d logits and (pixel-wise modes) d/d raw CM
//            channels; per-block sums of CE_r and T_r in double (the default "pixel"
//            kernel; CMSEG_CM_LOSS_KERNEL picks another way to the same per-pixel math:
//            "prefetch", "staged" (cm_loss_staging.cuh) or "pairs");
//   finish   the blocks' sums added in a fixed order (a fixed-shape tree), scaled by the weights;
//   [global] d/d raw global CM: per-block sums of dL/dA over pixels, added in a
//            fixed order, then one backward through normalisation and softplus.
// Every reduction has a fixed shape and order, so results repeat bit for bit.
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <tuple>
#include <set>
#include <string>

#include "cm_loss_staging.cuh"
#include "common.cuh"

namespace cmseg {
namespace cuda {
namespace {

constexpr int kMaxAnnotators = 16;  // annotators per call on the device
constexpr int kMaxRank = 8;         // as the CPU reference
constexpr int kLossThreads = 128;

enum Mode { kFull = 0, kLowRank = 1, kGlobal = 2 };

struct LossParams {
  const float* z;  // [n, L, V]
  float* dz;       // [n, L, V] or null (no gradients)
  const float* raw[kMaxAnnotators];      // [n, K, V] (pixel-wise modes)
  float* draw[kMaxAnnotators];           // same shape, or null
  const uint8_t* labels[kMaxAnnotators]; // [n, V]
  const uint8_t* present;  // [n, R] or null
  const double* w;         // [3R]: w_ce, w_tr, pixels of the images r labelled
  const float* gA;         // global mode: [R, L*L] normalised CMs
  double* partial;         // [gridDim.x, 2R]: CE_r, T_r per block
  int n, L, R, rank;
  int64_t V;
  float lam;
};

__device__ inline float softplus(float x) { return x > 20.f ? x : log1pf(expf(x)); }
__device__ inline float sigmoid(float x) { return x >= 0.f ? 1.f / (1.f + expf(-x)) : expf(x) / (1.f + expf(x)); }
// Both from one exp (the main pass evaluates them for every raw CM channel): with
// e = exp(-|x|), softplus(x) = max(x, 0) + log1p(e) and sigmoid(x) = 1 / (1 + e) for
// x >= 0, e / (1 + e) below. Above 20, max(x, 0) + log1p(e) rounds to x, as above.
// 1 + e lies in [1, 2], where the fast division is within 2 ulp and has no slow
// path (an IEEE division's slow path is a call, and loads are not moved across it).
// log1p(e) for e in (0, 1] as 2 atanh(s), s = e / (2 + e) in (0, 1/3]: the odd
// series to s^13 (truncation below 2e-8 relative), a dozen operations against
// log1pf's ~20 (run for the 16 channels of every pixel and annotator). Its error is
// relative at every scale, as the CPU's log1p: a fast log's error is absolute, and the
// column normalisation turns that into a large relative error for a column whose raw
// channels are all very negative.
__device__ inline float log1p_unit(float e) {
  const float s = __fdividef(e, 2.f + e);
  const float s2 = s * s;
  float p = 1.f / 13;
  p = fmaf(p, s2, 1.f / 11);
  p = fmaf(p, s2, 1.f / 9);
  p = fmaf(p, s2, 1.f / 7);
  p = fmaf(p, s2, 1.f / 5);
  p = fmaf(p, s2, 1.f / 3);
  p = fmaf(p, s2, 1.f);
  return 2.f * s * p;
}
__device__ inline void softplus_sigmoid(float x, float& sp, float& sg) {
  const float e = expf(-fabsf(x));
  const float inv = __fdividef(1.f, 1.f + e);
  sp = fmaxf(x, 0.f) + log1p_unit(e);
  sg = x >= 0.f ? inv : e * inv;
}
__device__ inline bool is_present(const LossParams& P, int i, int r) {
  return !P.present || P.present[(int64_t)i * P.R + r] != 0;
}

// ---- count and weights ----------------------------------------------------------

__global__ void count_kernel(LossParams P, unsigned long long* __restrict__ counts) {
  __shared__ double scratch[32];
  const int i = blockIdx.y;
  const int64_t V = P.V;
  for (int r = 0; r < P.R; ++r) {
    if (!is_present(P, i, r)) continue;  // uniform across the block
    const uint8_t* lab = P.labels[r] + (int64_t)i * V;
    double c = 0;
    for (int64_t v = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; v < V; v += (int64_t)gridDim.x * blockDim.x)
      c += lab[v] != kUnlabelled;
    c = block_sum(c, scratch);
    // Integer atomics: the total does not depend on the order blocks finish in.
    if (threadIdx.x == 0 && c > 0) atomicAdd(&counts[(int64_t)i * P.R + r], (unsigned long long)c);
  }
}

// The same counts 16 labels at a time (uint4 loads from the first 16-byte boundary,
// bytes before it and after the last whole 16 one by one), on a grid sized for the
// quads: the kernel above loads one byte per thread and iteration on at most 64 blocks
// per image, latency-bound (the call's 0.16 ms outside its main kernel on an H200 are
// mostly it). Runs with the prefetch kernel (CMSEG_CM_LOSS_KERNEL=prefetch) until a
// device run has timed both.
__device__ inline unsigned labelled_in(uint32_t w) { return 4u - (__popc(__vcmpeq4(w, 0xffffffffu)) >> 3); }

__global__ void count16_kernel(LossParams P, unsigned long long* __restrict__ counts) {
  __shared__ double scratch[32];
  const int i = blockIdx.y;
  const int64_t V = P.V;
  const int64_t first = blockIdx.x * (int64_t)blockDim.x + threadIdx.x, stride = (int64_t)gridDim.x * blockDim.x;
  for (int r = 0; r < P.R; ++r) {
    if (!is_present(P, i, r)) continue;  // uniform across the block
    const uint8_t* lab = P.labels[r] + (int64_t)i * V;
    const int64_t head = min(V, (int64_t)((16 - ((uintptr_t)lab & 15)) & 15));
    const int64_t quads = (V - head) / 16, tail = head + quads * 16;
    const uint4* q = reinterpret_cast<const uint4*>(lab + head);
    unsigned long long c = 0;
    for (int64_t k = first; k < quads; k += stride) {
      const uint4 w = q[k];
      c += labelled_in(w.x) + labelled_in(w.y) + labelled_in(w.z) + labelled_in(w.w);
    }
    for (int64_t v = first; v < head; v += stride) c += lab[v] != kUnlabelled;
    for (int64_t v = tail + first; v < V; v += stride) c += lab[v] != kUnlabelled;
    const double t = block_sum((double)c, scratch);  // exact: counts stay far below 2^53
    if (threadIdx.x == 0 && t > 0) atomicAdd(&counts[(int64_t)i * P.R + r], (unsigned long long)t);
  }
}

__global__ void weights_kernel(LossParams P, const unsigned long long* __restrict__ counts, double* __restrict__ w) {
  const int r = threadIdx.x;
  if (r >= P.R) return;
  unsigned long long labelled = 0, images = 0;
  for (int i = 0; i < P.n; ++i) {
    labelled += counts[(int64_t)i * P.R + r];
    images += is_present(P, i, r);
  }
  // SPEC 4: an annotator with no labelled pixel in the batch contributes to neither term.
  w[r] = labelled ? 1.0 / (double)labelled : 0.0;
  w[P.R + r] = labelled && images ? 1.0 / ((double)images * (double)P.V) : 0.0;
  w[2 * P.R + r] = (double)images * (double)P.V;
}

// ---- one pixel's CM -------------------------------------------------------------
// CAP: compile-time bound on L (the exact L for the specialised kernels, so loops
// unroll and the arrays live in registers).
template <int CAP, int MODE>
struct PixelCm {
  float A[CAP * CAP];     // column-normalised
  float invS[CAP];        // 1 / column sums of the unnormalised entries
  float sig[MODE == kFull ? CAP * CAP : 1];  // sigmoid(u) (full)
  float spU[MODE == kLowRank ? CAP * kMaxRank : 1], spW[MODE == kLowRank ? CAP * kMaxRank : 1];
  float sigU[MODE == kLowRank ? CAP * kMaxRank : 1], sigW[MODE == kLowRank ? CAP * kMaxRank : 1];
  float sig_s;

  __device__ __forceinline__ void compute(const float* raw, int64_t stride, int L, int l) {
    if constexpr (MODE == kLowRank) {
      for (int e = 0; e < L * l; ++e) {
        softplus_sigmoid(raw[e * stride], spU[e], sigU[e]);
        softplus_sigmoid(raw[(L * l + e) * stride], spW[e], sigW[e]);
      }
      float sp_s;
      softplus_sigmoid(raw[(2 * L * l) * stride], sp_s, sig_s);
#pragma unroll
      for (int i = 0; i < L; ++i) {
#pragma unroll
        for (int j = 0; j < L; ++j) {
          float v = i == j ? sp_s : 0.f;
          for (int k = 0; k < l; ++k) v += spU[i * l + k] * spW[j * l + k];
          A[i * L + j] = v;
        }
      }
      normalise(L);
    } else {
      // Every raw channel of the pixel is loaded before the first is used, so a
      // thread has L*L loads in flight. Interleaved with the math (as the compiler
      // left them) a thread waited for each load in turn, and the kernel ran at
      // ~15% of an H200's bandwidth. Plain loads: the gradient may overwrite these
      // channels later in the same kernel (loss.hpp). Only with L known at compile
      // time: in the generic kernel the array would live in local memory.
      if constexpr (CAP != kMaxClasses) {
        float v[CAP * CAP];
#pragma unroll
        for (int e = 0; e < L * L; ++e)
          v[e] = raw[e * stride];
        from_values(v, L);
      } else {
        for (int e = 0; e < L * L; ++e) {
          if constexpr (MODE == kFull)
            softplus_sigmoid(raw[e * stride], A[e], sig[e]);
          else
            A[e] = softplus(raw[e * stride]);
        }
        normalise(L);
      }
    }
  }

  // The CM from its L*L raw channels already in registers (v), full or softplus-only
  // modes; the prefetch kernel loads them one annotator ahead.
  __device__ __forceinline__ void from_values(const float* v, int L) {
#pragma unroll
    for (int e = 0; e < L * L; ++e) {
      if constexpr (MODE == kFull)
        softplus_sigmoid(v[e], A[e], sig[e]);
      else
        A[e] = softplus(v[e]);
    }
    normalise(L);
  }

  // Columns divided by their sums (SPEC 4).
  __device__ __forceinline__ void normalise(int L) {
#pragma unroll
    for (int j = 0; j < L; ++j) {
      float s = 0.f;
#pragma unroll
      for (int i = 0; i < L; ++i) s += A[i * L + j];
      const float inv = __fdividef(1.f, s);  // within 2 ulp for any sum up to 2^126; no slow-path call
      invS[j] = inv;
#pragma unroll
      for (int i = 0; i < L; ++i) A[i * L + j] *= inv;
    }
  }
};

// g = dL/dA of one pixel: w_tr * lambda on the diagonal, minus p[j] * w_ce / q[c] on
// row c when the CE term has a gradient (the CPU reference's g array, entry by entry).
__device__ __forceinline__ float g_entry(int k, int j, int c, bool ce_grad, float tl, float pj_inv) {
  float g = k == j ? tl : 0.f;
  if (ce_grad && k == c) g -= pj_inv;
  return g;
}

// ---- main pass ------------------------------------------------------------------

// One annotator's part of one pixel, shared by both main kernels: its CM, its trace
// added to tr and its CE to ce (shared-memory sums or registers), its contribution to d/dp into dp (the pixel's softmax
// probabilities p), and in the pixel-wise modes the raw CM channels' gradient,
// written out.
// PRE: the raw CM channels (pv) and the label (pc) were loaded ahead by the caller
// (the prefetch kernel; full CMs with L known at compile time).
template <int CAP, int MODE, bool PRE = false>
__device__ __forceinline__ void annotator_pixel(const LossParams& P, int L, int l, int K, bool grads, int i,
                                                int64_t v, int r, const float* p, float* dp, double& ce, double& tr,
                                                const float* pv = nullptr, int pc = 0) {
  const int64_t V = P.V;
  const int R = P.R;
  const int64_t head = (int64_t)i * K * V + v;
  if (!is_present(P, i, r)) {
    if (grads && MODE != kGlobal)
      for (int k = 0; k < K; ++k) P.draw[r][head + k * V] = 0.f;
    return;
  }
  // The label and the weights are read before the CM's math, so their loads are in
  // flight with the CM's (after it, a thread waited for them).
  const int c = PRE ? pc : P.labels[r][(int64_t)i * V + v];
  const float wce = grads ? (float)P.w[r] : 0.f, wtr = grads ? (float)P.w[R + r] : 0.f;
  PixelCm<CAP, MODE> cm;
  if constexpr (MODE == kGlobal) {
#pragma unroll
    for (int e = 0; e < L * L; ++e)
      cm.A[e] = P.gA[r * L * L + e];
  } else if constexpr (PRE) {
    cm.from_values(pv, L);
  } else {
    cm.compute(P.raw[r] + head, V, L, l);
  }
  float t = 0.f;
#pragma unroll
  for (int k = 0; k < L; ++k)
    t += cm.A[k * L + k];
  tr += t;

  // Row c of A, selected without a run-time register index.
  float Ac[CAP];
#pragma unroll
  for (int j = 0; j < L; ++j) {
    Ac[j] = 0.f;
#pragma unroll
    for (int ii = 0; ii < L; ++ii)
      if (ii == c) Ac[j] = cm.A[ii * L + j];
  }
  float qc = 0.f;
  bool ce_grad = false;
  if (c != kUnlabelled) {
#pragma unroll
    for (int j = 0; j < L; ++j)
      qc += Ac[j] * p[j];
    // max(q, floor) as the CPU's std::max: a NaN q (a diverged model's logits) stays NaN in
    // the loss, where fmaxf would return the floor and a finite loss.
    ce += -logf(qc < kProbFloor ? kProbFloor : qc);
    ce_grad = qc > kProbFloor;  // the clamp has zero gradient
  }
  if (!grads) return;
  const float tl = wtr * P.lam;
  const float inv = ce_grad ? wce / qc : 0.f;
  if (ce_grad) {
#pragma unroll
    for (int j = 0; j < L; ++j)
      dp[j] -= Ac[j] * inv;
  }
  if constexpr (MODE != kGlobal) {  // global: reduced across pixels by global_grad_kernel
    // dL/da[k][j] = (g[k][j] - sum_i g[i][j] A[i][j]) / S_j  (SPEC 4)
    float* draw = P.draw[r] + head;
    float da[MODE == kLowRank ? CAP * CAP : 1];
#pragma unroll
    for (int j = 0; j < L; ++j) {
      const float pj_inv = p[j] * inv;
      float dot = 0.f;
#pragma unroll
      for (int ii = 0; ii < L; ++ii)
        dot += g_entry(ii, j, c, ce_grad, tl, pj_inv) * cm.A[ii * L + j];
#pragma unroll
      for (int k = 0; k < L; ++k) {
        const float d = (g_entry(k, j, c, ce_grad, tl, pj_inv) - dot) * cm.invS[j];
        if constexpr (MODE == kFull)
          draw[(int64_t)(k * L + j) * V] = d * cm.sig[k * L + j];
        else
          da[k * L + j] = d;
      }
    }
    if constexpr (MODE == kLowRank) {
      for (int ii = 0; ii < L; ++ii)
        for (int k = 0; k < l; ++k) {
          float su = 0.f, sw = 0.f;
          for (int j = 0; j < L; ++j) {
            su += da[ii * L + j] * cm.spW[j * l + k];
            sw += da[j * L + ii] * cm.spU[j * l + k];
          }
          draw[(int64_t)(ii * l + k) * V] = su * cm.sigU[ii * l + k];
          draw[(int64_t)(L * l + ii * l + k) * V] = sw * cm.sigW[ii * l + k];
        }
      float ds = 0.f;
      for (int ii = 0; ii < L; ++ii) ds += da[ii * L + ii];
      draw[(int64_t)(2 * L * l) * V] = ds * cm.sig_s;
    }
  }
}

// Softmax over L logits at z, z + stride, ...
template <int CAP>
__device__ __forceinline__ void softmax_of(const float* z, int64_t stride, int L, float* p) {
  float m = z[0];
#pragma unroll
  for (int k = 1; k < L; ++k)
    m = fmaxf(m, z[k * stride]);
  float s = 0.f;
#pragma unroll
  for (int k = 0; k < L; ++k)
    s += (p[k] = expf(z[k * stride] - m));
  const float inv = __fdividef(1.f, s);  // s in [1, L]
#pragma unroll
  for (int k = 0; k < L; ++k)
    p[k] *= inv;
}

// Softmax over the L logits of pixel v of image i.
template <int CAP>
__device__ __forceinline__ void pixel_softmax(const LossParams& P, int L, int i, int64_t v, float* p) {
  softmax_of<CAP>(P.z + (int64_t)i * L * P.V + v, P.V, L, p);
}

// dz = p * (dp - <p, dp>) for pixel v of image i.
template <int CAP>
__device__ __forceinline__ void write_dz(const LossParams& P, int L, int i, int64_t v, const float* p,
                                         const float* dp) {
  float dot = 0.f;
#pragma unroll
  for (int k = 0; k < L; ++k)
    dot += p[k] * dp[k];
  float* dz = P.dz + (int64_t)i * L * P.V + v;
#pragma unroll
  for (int k = 0; k < L; ++k)
    dz[k * P.V] = p[k] * (dp[k] - dot);
}

// The pixel and prefetch kernels' per-thread sums of CE_r and T_r (acc: [2R][blockDim.x]
// doubles of shared memory), zeroed, and at the end added over the block in a fixed
// order into this block's partials. (Their grid-stride loops stay written out: through a
// lambda, nvcc gave the pixel kernel 80 registers instead of the 96 it was measured with.)
__device__ __forceinline__ void zero_thread_sums(double* acc, int R) {
  for (int k = 0; k < 2 * R; ++k) acc[k * blockDim.x + threadIdx.x] = 0.0;
}
__device__ __forceinline__ void store_block_sums(const LossParams& P, int R, const double* acc, double* scratch) {
  for (int k = 0; k < 2 * R; ++k) {
    const double t = block_sum(acc[k * blockDim.x + threadIdx.x], scratch);
    if (threadIdx.x == 0) P.partial[(int64_t)blockIdx.x * 2 * R + k] = t;
  }
}

// The "pixel" kernel (default): one thread per pixel, all annotators in turn.
template <int LT, int MODE>
__global__ void __launch_bounds__(kLossThreads) cm_loss_kernel(LossParams P) {
  constexpr int CAP = LT ? LT : kMaxClasses;
  const int L = LT ? LT : P.L;
  const int R = P.R, l = P.rank;
  const int64_t V = P.V;
  const int K = MODE == kFull ? L * L : MODE == kLowRank ? 2 * L * l + 1 : 0;
  const bool grads = P.dz != nullptr;

  extern __shared__ double acc[];  // [2R][blockDim.x]: this thread's CE_r and T_r sums
  __shared__ double scratch[32];
  zero_thread_sums(acc, R);

  const int64_t total = (int64_t)P.n * V;
  for (int64_t pix = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; pix < total;
       pix += (int64_t)gridDim.x * blockDim.x) {
    const int i = (int)(pix / V);
    const int64_t v = pix - (int64_t)i * V;
    float p[CAP], dp[CAP];
    pixel_softmax<CAP>(P, L, i, v, p);
#pragma unroll
    for (int k = 0; k < L; ++k)
      dp[k] = 0.f;
    for (int r = 0; r < R; ++r)
      annotator_pixel<CAP, MODE>(P, L, l, K, grads, i, v, r, p, dp, acc[r * blockDim.x + threadIdx.x],
                                 acc[(R + r) * blockDim.x + threadIdx.x]);
    if (grads) write_dz<CAP>(P, L, i, v, p, dp);
  }
  store_block_sums(P, R, acc, scratch);
}

// The "prefetch" kernel (CMSEG_CM_LOSS_KERNEL=prefetch; full CMs, 2-4 classes): the
// pixel kernel with the next annotator's raw CM channels and label loaded before this
// annotator's math, so that a thread has loads in flight while it computes. The pixel
// kernel waits for each annotator's loads in turn (96 registers, 5 blocks per SM on an
// H200, 2.4 TB/s of 4.8). The same arithmetic in the same order: its results are the
// pixel kernel's, bit for bit. Annotators in pairs: va / vb alternate without a
// run-time register index.
template <int LT>
__device__ __forceinline__ void load_annotator(const LossParams& P, int i, int64_t v, int r, float (&dst)[LT * LT],
                                               int& c) {
  if (!is_present(P, i, r)) return;  // annotator_pixel writes zeros and reads neither
  c = P.labels[r][(int64_t)i * P.V + v];
  const float* raw = P.raw[r] + (int64_t)i * LT * LT * P.V + v;
#pragma unroll
  for (int e = 0; e < LT * LT; ++e)
    dst[e] = raw[e * P.V];
}

template <int LT>
__global__ void __launch_bounds__(kLossThreads) cm_loss_prefetch_kernel(LossParams P) {
  constexpr int CAP = LT, K = LT * LT;
  const int R = P.R;
  const int64_t V = P.V;
  const bool grads = P.dz != nullptr;

  extern __shared__ double acc[];  // [2R][blockDim.x], as the pixel kernel
  __shared__ double scratch[32];
  zero_thread_sums(acc, R);

  const int64_t total = (int64_t)P.n * V;
  for (int64_t pix = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; pix < total;
       pix += (int64_t)gridDim.x * blockDim.x) {
    const int i = (int)(pix / V);
    const int64_t v = pix - (int64_t)i * V;
    float va[K], vb[K];
    int ca = 0, cb = 0;
    load_annotator<LT>(P, i, v, 0, va, ca);  // in flight during the softmax
    float p[CAP], dp[CAP];
    pixel_softmax<CAP>(P, LT, i, v, p);
#pragma unroll
    for (int k = 0; k < LT; ++k)
      dp[k] = 0.f;
    for (int r = 0; r < R; r += 2) {
      if (r + 1 < R) load_annotator<LT>(P, i, v, r + 1, vb, cb);
      annotator_pixel<CAP, kFull, true>(P, LT, 0, K, grads, i, v, r, p, dp, acc[r * blockDim.x + threadIdx.x],
                                        acc[(R + r) * blockDim.x + threadIdx.x], va, ca);
      if (r + 1 < R) {
        if (r + 2 < R) load_annotator<LT>(P, i, v, r + 2, va, ca);
        annotator_pixel<CAP, kFull, true>(P, LT, 0, K, grads, i, v, r + 1, p, dp,
                                          acc[(r + 1) * blockDim.x + threadIdx.x],
                                          acc[(R + r + 1) * blockDim.x + threadIdx.x], vb, cb);
      }
    }
    if (grads) write_dz<CAP>(P, LT, i, v, p, dp);
  }
  store_block_sums(P, R, acc, scratch);
}

// The "staged" kernel (CMSEG_CM_LOSS_KERNEL=staged; full CMs, 2-4 classes): tiles of
// kTile pixels copied into shared memory by cp.async, kStages - 1 tiles ahead of the
// one computed (cm_loss_staging.cuh says how), then the pixel kernel's arithmetic on
// each pixel from the tile's slot: the same gradients; the CE and trace sums run over
// another grid (one wave of blocks), so the loss may differ in its last bits.
struct StageOps {
  __device__ __forceinline__ int tid() const { return threadIdx.x; }
  __device__ __forceinline__ int block(int) const { return blockIdx.x; }
  __device__ __forceinline__ int grid(int) const { return gridDim.x; }
  __device__ __forceinline__ void sync() const { __syncthreads(); }
  __device__ __forceinline__ void copy4(float* dst, const float* src, bool valid) const {
    const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(d), "l"(src), "r"(valid ? 4 : 0) : "memory");
  }
  __device__ __forceinline__ void copy_bytes(void* dst, const void* src, int bytes) const {
    const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(d), "l"(src), "r"(bytes) : "memory");
  }
  __device__ __forceinline__ void commit() const { asm volatile("cp.async.commit_group;\n" ::); }
  template <int N>
  __device__ __forceinline__ void wait_pending() const {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
  }
};

template <int LT, int kStages>
__global__ void __launch_bounds__(cmstage::kTile) cm_loss_staged_kernel(LossParams P) {
  constexpr int CAP = LT, K = LT * LT, T = cmstage::kTile;
  const int R = P.R;
  const int64_t V = P.V;
  const bool grads = P.dz != nullptr;
  extern __shared__ double acc[];  // [2R][T] per-thread sums, then the slots
  __shared__ double scratch[32];
  zero_thread_sums(acc, R);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const cmstage::Slot S{LT, R, K};
  StageOps ops;
  cmstage::walk<kStages>(P, S, ops, reinterpret_cast<float*>(acc + 2 * R * T), [&](const float* slot, int t, int64_t pix) {
    const int i = (int)(pix / V);
    const int64_t v = pix - (int64_t)i * V;
    float p[CAP], dp[CAP];
    softmax_of<CAP>(slot + S.logit(0) + t, T, LT, p);
#pragma unroll
    for (int k = 0; k < LT; ++k)
      dp[k] = 0.f;
    const uint8_t* labels = reinterpret_cast<const uint8_t*>(slot + S.labels());
    for (int r = 0; r < R; ++r) {
      float pv[K];
#pragma unroll
      for (int e = 0; e < K; ++e)
        pv[e] = slot[S.channel(r, e) + t];
      annotator_pixel<CAP, kFull, true>(P, LT, 0, K, grads, i, v, r, p, dp, acc[r * T + t], acc[(R + r) * T + t], pv,
                                        labels[r * T + t]);
    }
    if (grads) write_dz<CAP>(P, LT, i, v, p, dp);
  });
#else
  __trap();  // never launched there (staged_fits)
#endif
  store_block_sums(P, R, acc, scratch);
}

// The "pairs" kernel (CMSEG_CM_LOSS_KERNEL=pairs, pixel-wise modes, R <= 8): one
// thread per (pixel, annotator), a block of kPairPixels pixels x R annotators. Each
// thread holds one CM instead of running through R of them, so it needs fewer
// registers and R times as many threads keep loads in flight. The annotators' dp
// meet in shared memory; the annotator-0 threads add them in annotator order and
// write dz. Its results match the pixel kernel's to rounding, not bit for bit (the
// per-annotator products are rounded before the sum; the block sums have another
// shape); each kernel repeats its own results bit for bit.
constexpr int kPairPixels = 64;
constexpr int kMaxPairAnnotators = 8;

template <int LT, int MODE>
__global__ void __launch_bounds__(kPairPixels* kMaxPairAnnotators) cm_loss_pairs_kernel(LossParams P) {
  constexpr int CAP = LT ? LT : kMaxClasses;
  const int L = LT ? LT : P.L;
  const int R = P.R, l = P.rank;
  const int64_t V = P.V;
  const int K = MODE == kFull ? L * L : 2 * L * l + 1;
  const bool grads = P.dz != nullptr;
  const int tx = threadIdx.x, r = threadIdx.y;

  extern __shared__ float dp_sh[];  // [R][L][kPairPixels]
  __shared__ double red[kMaxPairAnnotators][kPairPixels];
  double ce = 0.0, tr = 0.0;
  const int64_t total = (int64_t)P.n * V;
  for (int64_t base = (int64_t)blockIdx.x * kPairPixels; base < total; base += (int64_t)gridDim.x * kPairPixels) {
    const int64_t pix = base + tx;
    const bool valid = pix < total;
    const int i = valid ? (int)(pix / V) : 0;
    const int64_t v = valid ? pix - (int64_t)i * V : 0;
    float p[CAP], dp[CAP];
    if (valid) {
      pixel_softmax<CAP>(P, L, i, v, p);
#pragma unroll
      for (int k = 0; k < L; ++k)
        dp[k] = 0.f;
      annotator_pixel<CAP, MODE>(P, L, l, K, grads, i, v, r, p, dp, ce, tr);
      if (grads)
        for (int k = 0; k < L; ++k) dp_sh[(r * L + k) * kPairPixels + tx] = dp[k];
    }
    if (!grads) continue;  // the same for every thread of the block
    __syncthreads();
    if (r == 0 && valid) {
      float d[CAP];
#pragma unroll
      for (int k = 0; k < L; ++k)
        d[k] = 0.f;
      for (int a = 0; a < R; ++a)
#pragma unroll
        for (int k = 0; k < L; ++k)
          d[k] += dp_sh[(a * L + k) * kPairPixels + tx];
      write_dz<CAP>(P, L, i, v, p, d);
    }
    __syncthreads();  // dp_sh is refilled by the next tile
  }
  // This block's CE_r and T_r: annotator r's row of threads, a fixed tree.
  for (int term = 0; term < 2; ++term) {
    red[r][tx] = term == 0 ? ce : tr;
    __syncthreads();
    for (int s = kPairPixels / 2; s > 0; s >>= 1) {
      if (tx < s) red[r][tx] += red[r][tx + s];
      __syncthreads();
    }
    if (tx == 0) P.partial[(int64_t)blockIdx.x * 2 * R + term * R + r] = red[r][0];
    __syncthreads();
  }
}

// out[k] for k < 2R (CE_r, then T_r): one block per k adds the main kernel's block
// sums, each thread a fixed stride of them, then a fixed-shape tree, so the result
// repeats bit for bit. A single thread walking ~1000 partials in order cost more
// than the main pass on an H200.
constexpr int kFinishThreads = 256;
__global__ void __launch_bounds__(kFinishThreads) finish_terms_kernel(const double* __restrict__ partial, int blocks,
                                                                      const double* __restrict__ w, int R,
                                                                      double* __restrict__ out) {
  __shared__ double scratch[32];
  const int k = blockIdx.x;
  double s = 0;
  for (int b = threadIdx.x; b < blocks; b += blockDim.x) s += partial[(int64_t)b * 2 * R + k];
  s = block_sum(s, scratch);
  if (threadIdx.x == 0) out[k] = s * w[k];  // w_ce for k < R, w_tr for R <= k < 2R
}

// out[2R] = sum_r CE_r + lambda T_r, in annotator order.
__global__ void finish_loss_kernel(int R, float lam, double* __restrict__ out) {
  double loss = 0;
  for (int r = 0; r < R; ++r) loss += out[r] + (double)lam * out[R + r];
  out[2 * R] = loss;
}

// ---- global mode ----------------------------------------------------------------

template <int CAP>
__device__ inline void global_cm(const float* raw, int L, float* A, float* a, float* S) {
  for (int e = 0; e < L * L; ++e) a[e] = softplus(raw[e]);
  for (int j = 0; j < L; ++j) {
    float s = 0.f;
    for (int i = 0; i < L; ++i) s += a[i * L + j];
    S[j] = s;
    const float inv = 1.f / s;
    for (int i = 0; i < L; ++i) A[i * L + j] = a[i * L + j] * inv;
  }
}

__global__ void global_prepare_kernel(LossParams P, float* __restrict__ gA) {
  const int r = threadIdx.x;
  if (r >= P.R) return;
  float a[kMaxClasses * kMaxClasses], S[kMaxClasses];
  global_cm<kMaxClasses>(P.raw[r], P.L, gA + r * P.L * P.L, a, S);
}

// Per block and annotator (blockIdx.y): G[c][j] = sum over labelled pixels of
// p[j] * w_ce / q[c], the CE part of sum_v dL/dA (with the opposite sign).
template <int LT>
__global__ void __launch_bounds__(kLossThreads) global_grad_kernel(LossParams P, double* __restrict__ gpartial) {
  constexpr int CAP = LT ? LT : kMaxClasses;
  __shared__ double scratch[32];
  const int L = LT ? LT : P.L;
  const int r = blockIdx.y;
  const int64_t V = P.V, total = (int64_t)P.n * V;
  const float wce = (float)P.w[r];
  float Ag[CAP * CAP];
#pragma unroll
  for (int e = 0; e < L * L; ++e)
    Ag[e] = P.gA[r * L * L + e];
  float G[CAP * CAP];
#pragma unroll
  for (int e = 0; e < L * L; ++e) G[e] = 0.f;
  for (int64_t pix = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; pix < total;
       pix += (int64_t)gridDim.x * blockDim.x) {
    const int i = (int)(pix / V);
    const int64_t v = pix - (int64_t)i * V;
    if (!is_present(P, i, r)) continue;
    const int c = P.labels[r][(int64_t)i * V + v];
    if (c == kUnlabelled) continue;
    float p[CAP];
    pixel_softmax<CAP>(P, L, i, v, p);  // as the main kernel computes it
    float qc = 0.f;
#pragma unroll
    for (int j = 0; j < L; ++j) {
      float acj = 0.f;
#pragma unroll
      for (int ii = 0; ii < L; ++ii)
        if (ii == c) acj = Ag[ii * L + j];
      qc += acj * p[j];
    }
    if (!(qc > kProbFloor)) continue;
    const float inv = wce / qc;
#pragma unroll
    for (int ii = 0; ii < L; ++ii)
#pragma unroll
      for (int j = 0; j < L; ++j)
        if (ii == c) G[ii * L + j] += p[j] * inv;
  }
  for (int e = 0; e < L * L; ++e) {
    const double t = block_sum(G[e], scratch);
    if (threadIdx.x == 0) gpartial[((int64_t)r * gridDim.x + blockIdx.x) * L * L + e] = t;
  }
}

// One block per annotator: adds the blocks' G in order, adds the trace term
// (w_tr * lambda on the diagonal at every pixel of the images r labelled), and runs
// the backward through column normalisation and softplus once.
__global__ void global_grad_finish_kernel(LossParams P, const double* __restrict__ gpartial, int blocks) {
  __shared__ float g[kMaxClasses * kMaxClasses];
  const int r = blockIdx.x, L = P.L;
  const float wtr = (float)P.w[P.R + r];
  const double pixels = P.w[2 * P.R + r];
  for (int e = threadIdx.x; e < L * L; e += blockDim.x) {
    double s = 0;
    for (int b = 0; b < blocks; ++b) s += gpartial[((int64_t)r * blocks + b) * L * L + e];
    const int k = e / L, j = e % L;
    g[e] = (float)((k == j ? (double)(wtr * P.lam) * pixels : 0.0) - s);
  }
  __syncthreads();
  if (threadIdx.x != 0) return;
  float a[kMaxClasses * kMaxClasses], A[kMaxClasses * kMaxClasses], S[kMaxClasses];
  global_cm<kMaxClasses>(P.raw[r], L, A, a, S);
  for (int j = 0; j < L; ++j) {
    float dot = 0.f;
    for (int i = 0; i < L; ++i) dot += g[i * L + j] * A[i * L + j];
    const float inv = 1.f / S[j];
    for (int k = 0; k < L; ++k)
      P.draw[r][k * L + j] = (g[k * L + j] - dot) * inv * sigmoid(P.raw[r][k * L + j]);
  }
}

// Blocks per SM the main kernel's grid asks for: CMSEG_CM_LOSS_BLOCKS_PER_SM (1..64,
// for measuring how the kernel scales with the grid: the device check tries several),
// else 0: 8 for the pixel kernel, one wave of resident blocks for the pairs kernel.
int main_blocks_per_sm() {
  const char* e = std::getenv("CMSEG_CM_LOSS_BLOCKS_PER_SM");
  const int v = e ? std::atoi(e) : 0;
  return v >= 1 && v <= 64 ? v : 0;
}

thread_local const char* tl_last_kernel = "none";

// With profiling on, a main kernel's launch shape once per kernel: registers,
// resident blocks per SM against the blocks per SM the grid asks for (waves).
void say_launch(void (*kernel)(LossParams), const char* name, int L, int mode, unsigned grid, int threads,
                size_t smem, int sms) {
  static std::mutex mu;
  static std::set<void (*)(LossParams)> said;
  {
    std::lock_guard<std::mutex> lk(mu);
    if (!said.insert(kernel).second) return;
  }
  cudaFuncAttributes fa{};
  int resident = 0;
  if (cudaFuncGetAttributes(&fa, kernel) != cudaSuccess ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, kernel, threads, smem) != cudaSuccess) {
    cudaGetLastError();
    return;
  }
  std::fprintf(stderr,
               "cmseg: cm_loss %s kernel (L %d, mode %d): %d registers, %zu B local, %d blocks/SM resident; grid "
               "%u blocks of %d = %.2f waves on %d SMs\n",
               name, L, mode, fa.numRegs, (size_t)fa.localSizeBytes, resident, grid, threads,
               resident > 0 ? (double)grid / ((double)resident * sms) : 0.0, sms);
}

template <int MODE>
void launch_main(int L, unsigned grid, size_t smem, cudaStream_t st, const LossParams& P) {
  switch (L) {
    case 2: cm_loss_kernel<2, MODE><<<grid, kLossThreads, smem, st>>>(P); break;
    case 3: cm_loss_kernel<3, MODE><<<grid, kLossThreads, smem, st>>>(P); break;
    case 4: cm_loss_kernel<4, MODE><<<grid, kLossThreads, smem, st>>>(P); break;
    default: cm_loss_kernel<0, MODE><<<grid, kLossThreads, smem, st>>>(P); break;
  }
}

// Blocks of the pairs kernel resident per SM for this L, mode and R (at least 1).
template <int LT, int MODE>
int pairs_resident_for(int R, size_t smem) {
  int resident = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, cm_loss_pairs_kernel<LT, MODE>, kPairPixels * R,
                                                    smem) != cudaSuccess) {
    cudaGetLastError();
    resident = 0;
  }
  return resident > 0 ? resident : 1;
}
template <int MODE>
int pairs_resident(int L, int R, size_t smem) {
  switch (L) {
    case 2: return pairs_resident_for<2, MODE>(R, smem);
    case 3: return pairs_resident_for<3, MODE>(R, smem);
    case 4: return pairs_resident_for<4, MODE>(R, smem);
    default: return pairs_resident_for<0, MODE>(R, smem);
  }
}

template <int MODE>
void launch_pairs(int L, unsigned grid, size_t smem, cudaStream_t st, const LossParams& P) {
  const dim3 block(kPairPixels, (unsigned)P.R);
  switch (L) {
    case 2: cm_loss_pairs_kernel<2, MODE><<<grid, block, smem, st>>>(P); break;
    case 3: cm_loss_pairs_kernel<3, MODE><<<grid, block, smem, st>>>(P); break;
    case 4: cm_loss_pairs_kernel<4, MODE><<<grid, block, smem, st>>>(P); break;
    default: cm_loss_pairs_kernel<0, MODE><<<grid, block, smem, st>>>(P); break;
  }
}

enum class MainKernel { Pixel, Pairs, Prefetch, Staged };

// CMSEG_CM_LOSS_KERNEL=pairs: the pairs kernel where it applies (pixel-wise modes,
// at most kMaxPairAnnotators annotators); =prefetch or =staged: that kernel where it
// applies (full CMs, 2-4 classes; staged also needs staged_fits); otherwise, and by
// default, the pixel kernel. Read at each call, so tests can run each.
MainKernel main_kernel(int mode, int L, int R) {
  const char* e = std::getenv("CMSEG_CM_LOSS_KERNEL");
  const std::string k = e ? e : "";
  if (k == "pairs" && mode != kGlobal && R <= kMaxPairAnnotators) return MainKernel::Pairs;
  if (k == "prefetch" && mode == kFull && L >= 2 && L <= 4) return MainKernel::Prefetch;
  if (k == "staged" && mode == kFull && L >= 2 && L <= 4) return MainKernel::Staged;
  return MainKernel::Pixel;
}

// The staged kernel's slots in flight: CMSEG_CM_LOSS_STAGES (2 or 3, for the device
// check's comparison), else 3.
int staged_stages() {
  const char* e = std::getenv("CMSEG_CM_LOSS_STAGES");
  return e && std::atoi(e) == 2 ? 2 : 3;
}

// Its dynamic shared memory: the per-thread sums and `stages` slots.
size_t staged_smem(int L, int R, int stages) {
  const cmstage::Slot S{L, R, L * L};
  return sizeof(double) * 2 * R * cmstage::kTile + sizeof(float) * (size_t)stages * S.floats();
}

// staged_resident has opted the kernel in to the device's shared memory per block.
template <int LT, int kStages>
void launch_staged_for(unsigned grid, size_t smem, cudaStream_t st, const LossParams& P) {
  cm_loss_staged_kernel<LT, kStages><<<grid, cmstage::kTile, smem, st>>>(P);
}
template <int kStages>
void launch_staged(int L, unsigned grid, size_t smem, cudaStream_t st, const LossParams& P) {
  switch (L) {
    case 2: launch_staged_for<2, kStages>(grid, smem, st, P); break;
    case 3: launch_staged_for<3, kStages>(grid, smem, st, P); break;
    default: launch_staged_for<4, kStages>(grid, smem, st, P); break;
  }
}

// Blocks of the staged kernel resident per SM (0 where it cannot run: compute capability
// below 8.0, its shared memory above the device's per-block limit, or a binary without
// code for 8.0 or newer), once per device, class count and size. It also opts the kernel
// in to all the shared memory a block may have on the device (so no size asked later is
// refused), which every launch relies on.
template <int kStages>
int staged_resident(int device, int L, size_t smem) {
  static std::mutex mu;
  static std::map<std::tuple<int, int, size_t>, int> known;
  std::lock_guard<std::mutex> lk(mu);
  const auto key = std::make_tuple(device, L, smem);
  if (auto it = known.find(key); it != known.end()) return it->second;
  int major = 0, optin = 0, resident = 0;
  cudaFuncAttributes fa{};
  auto kernel = L == 2 ? cm_loss_staged_kernel<2, kStages> : L == 3 ? cm_loss_staged_kernel<3, kStages>
                                                                    : cm_loss_staged_kernel<4, kStages>;
  // The opt-in bounds the static shared memory (block_sum's scratch) and the dynamic
  // together: the dynamic limit asked is what the static part leaves (asking for the whole
  // opt-in is refused with cudaErrorInvalidValue, and the staged kernel would never run).
  const bool ok = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess &&
                  major >= 8 &&
                  cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) == cudaSuccess &&
                  cudaFuncGetAttributes(&fa, kernel) == cudaSuccess && fa.binaryVersion >= 80 &&
                  fa.sharedSizeBytes + smem <= (size_t)optin &&
                  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       optin - (int)fa.sharedSizeBytes) == cudaSuccess &&
                  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, kernel, cmstage::kTile, smem) == cudaSuccess;
  cudaGetLastError();  // a refusal above is an answer, not an error for the next launch
  return known[key] = ok ? resident : 0;
}

// Whether every label array is 4-byte aligned (the staged kernel copies labels 4 at a time).
bool labels_aligned(const LossParams& P) {
  for (int r = 0; r < P.R; ++r)
    if (reinterpret_cast<uintptr_t>(P.labels[r]) % 4) return false;
  return true;
}

void launch_prefetch(int L, unsigned grid, size_t smem, cudaStream_t st, const LossParams& P) {
  switch (L) {
    case 2: cm_loss_prefetch_kernel<2><<<grid, kLossThreads, smem, st>>>(P); break;
    case 3: cm_loss_prefetch_kernel<3><<<grid, kLossThreads, smem, st>>>(P); break;
    default: cm_loss_prefetch_kernel<4><<<grid, kLossThreads, smem, st>>>(P); break;
  }
}

// ---- prediction: per-pixel CMs and q_r = A_r p ------------------------------------

struct PredictParams {
  const float* raw[kMaxAnnotators];  // [n, K, V], or [L, L] (global)
  const float* probs;                // [n, L, V]
  float* cms;                        // [n, R, L*L, V] or null
  float* q;                          // [n, R, L, V] or null
  int n, L, R, rank;
  int64_t V;
};

template <int LT, int MODE>
__global__ void __launch_bounds__(kLossThreads) cm_predict_kernel(PredictParams P) {
  constexpr int CAP = LT ? LT : kMaxClasses;
  const int L = LT ? LT : P.L;
  const int R = P.R, l = P.rank;
  const int64_t V = P.V;
  const int K = MODE == kFull ? L * L : MODE == kLowRank ? 2 * L * l + 1 : 0;
  const int64_t total = (int64_t)P.n * V;
  for (int64_t pix = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; pix < total;
       pix += (int64_t)gridDim.x * blockDim.x) {
    const int i = (int)(pix / V);
    const int64_t v = pix - (int64_t)i * V;
    float p[CAP];
#pragma unroll
    for (int j = 0; j < L; ++j)
      p[j] = P.probs[((int64_t)i * L + j) * V + v];
    for (int r = 0; r < R; ++r) {
      PixelCm<CAP, MODE> cm;
      if constexpr (MODE == kGlobal)
        cm.compute(P.raw[r], 1, L, l);
      else
        cm.compute(P.raw[r] + (int64_t)i * K * V + v, V, L, l);
      const int64_t item = (int64_t)i * R + r;
      if (P.cms) {
#pragma unroll
        for (int e = 0; e < L * L; ++e)
          P.cms[(item * L * L + e) * V + v] = cm.A[e];
      }
      if (P.q) {
#pragma unroll
        for (int a = 0; a < L; ++a) {
          float q = 0.f;
#pragma unroll
          for (int j = 0; j < L; ++j)
            q += cm.A[a * L + j] * p[j];
          P.q[(item * L + a) * V + v] = q;
        }
      }
    }
  }
}

template <int MODE>
void launch_predict(int L, unsigned grid, cudaStream_t st, const PredictParams& P) {
  switch (L) {
    case 2: cm_predict_kernel<2, MODE><<<grid, kLossThreads, 0, st>>>(P); break;
    case 3: cm_predict_kernel<3, MODE><<<grid, kLossThreads, 0, st>>>(P); break;
    case 4: cm_predict_kernel<4, MODE><<<grid, kLossThreads, 0, st>>>(P); break;
    default: cm_predict_kernel<0, MODE><<<grid, kLossThreads, 0, st>>>(P); break;
  }
}

}  // namespace

void cm_loss(Context& ctx, const CmLossInput& in, CmLossOutput& out) {
  ProfileScope prof_(ctx, "cm_loss");
  const int n = in.n, L = in.L, R = in.R;
  const int64_t V = in.V;
  if (L < 2 || L > kMaxClasses) fail("classes must be in 2..", kMaxClasses, ", got ", L);
  if (in.mode == CmMode::LowRank && (in.rank < 1 || in.rank > kMaxRank))
    fail("cmRank must be in 1..", kMaxRank, ", got ", in.rank);
  if (R < 1 || R > kMaxAnnotators) fail("the CUDA CM loss takes 1..", kMaxAnnotators, " annotators, got ", R);
  if ((int)in.cm_raw.size() != R || (int)in.labels.size() != R) fail("cm_loss: expected ", R, " annotators");
  if (n < 1 || V < 1) fail("cm_loss: empty batch (n ", n, ", V ", V, ")");
  if (n > 65535) fail("cm_loss: batch of ", n, " images exceeds the CUDA grid limit of 65535");
  const bool grads = out.d_seg_logits != nullptr;
  if (grads && (int)out.d_cm_raw.size() != R) fail("cm_loss: expected ", R, " CM gradient arrays");
  const int mode = in.mode == CmMode::Full ? kFull : in.mode == CmMode::LowRank ? kLowRank : kGlobal;

  LossParams P{};
  P.z = in.seg_logits;
  P.dz = out.d_seg_logits;
  for (int r = 0; r < R; ++r) {
    P.raw[r] = in.cm_raw[r];
    P.labels[r] = in.labels[r];
    P.draw[r] = grads ? out.d_cm_raw[r] : nullptr;
  }
  P.present = in.present;
  P.n = n, P.L = L, P.R = R, P.rank = in.rank, P.V = V, P.lam = in.trace_weight;

  cudaStream_t st = stream_of(ctx);
  Context::Impl& im = ctx.impl();
  Buffer<unsigned long long> counts(ctx, (size_t)n * R);
  Buffer<double> w(ctx, (size_t)3 * R), result(ctx, (size_t)2 * R + 1);
  Buffer<float> gA(ctx, mode == kGlobal ? (size_t)R * L * L : 0);
  counts.zero();
  P.w = w.data();
  P.gA = gA.data();

  MainKernel kernel = main_kernel(mode, L, R);
  const int stages = staged_stages();
  const size_t stage_smem = staged_smem(L, R, stages);
  int stage_resident = 0;
  if (kernel == MainKernel::Staged) {
    stage_resident = labels_aligned(P) ? stages == 2 ? staged_resident<2>(ctx.device(), L, stage_smem)
                                                     : staged_resident<3>(ctx.device(), L, stage_smem)
                                       : 0;
    if (!stage_resident) kernel = MainKernel::Pixel;  // the default kernel where it cannot run
  }
  if (kernel == MainKernel::Prefetch || kernel == MainKernel::Staged) {
    const int per_image = std::max(1, im.grid_for((int64_t)n * ((V + 15) / 16), 256, 8) / n);
    count16_kernel<<<dim3((unsigned)per_image, (unsigned)n), 256, 0, st>>>(P, counts.data());
  } else {
    const dim3 count_grid((unsigned)std::min<int64_t>((V + 1023) / 1024, 64), (unsigned)n);
    count_kernel<<<count_grid, 256, 0, st>>>(P, counts.data());
  }
  CMSEG_CUDA_LAUNCHED("cm_loss count");
  weights_kernel<<<1, 32, 0, st>>>(P, counts.data(), w.data());
  CMSEG_CUDA_LAUNCHED("cm_loss weights");
  if (mode == kGlobal) {
    global_prepare_kernel<<<1, 32, 0, st>>>(P, gA.data());
    CMSEG_CUDA_LAUNCHED("cm_loss global prepare");
  }

  ProfileScope prof_main_(ctx, "cm_loss: main+finish");
  const bool pairs = kernel == MainKernel::Pairs;
  tl_last_kernel = pairs                           ? "pairs"
                   : kernel == MainKernel::Prefetch ? "prefetch"
                   : kernel == MainKernel::Staged   ? "staged"
                                                    : "pixel";
  const size_t pairs_smem = sizeof(float) * R * L * kPairPixels;  // at most 32 KiB
  int per_sm = main_blocks_per_sm();
  if (!per_sm)
    per_sm = kernel == MainKernel::Staged ? stage_resident  // one wave: each block walks many tiles
             : !pairs                     ? 8
             : mode == kFull              ? pairs_resident<kFull>(L, R, pairs_smem)
                                          : pairs_resident<kLowRank>(L, R, pairs_smem);
  const unsigned grid = (unsigned)im.grid_for((int64_t)n * V, pairs ? kPairPixels : kLossThreads, per_sm);
  Buffer<double> partial(ctx, (size_t)grid * 2 * R);
  P.partial = partial.data();
  if (pairs) {
    const size_t smem = pairs_smem;
    if (im.profiler.on && mode == kFull && L == 4)
      say_launch(cm_loss_pairs_kernel<4, kFull>, "pairs", 4, kFull, grid, kPairPixels * R, smem,
                 im.multiprocessors);
    if (mode == kFull)
      launch_pairs<kFull>(L, grid, smem, st, P);
    else
      launch_pairs<kLowRank>(L, grid, smem, st, P);
  } else if (kernel == MainKernel::Staged) {
    if (im.profiler.on && L == 4)
      say_launch(stages == 2 ? cm_loss_staged_kernel<4, 2> : cm_loss_staged_kernel<4, 3>, "staged", 4, kFull, grid,
                 cmstage::kTile, stage_smem, im.multiprocessors);
    if (stages == 2)
      launch_staged<2>(L, grid, stage_smem, st, P);
    else
      launch_staged<3>(L, grid, stage_smem, st, P);
  } else if (kernel == MainKernel::Prefetch) {
    const size_t smem = sizeof(double) * 2 * R * kLossThreads;
    if (im.profiler.on && L == 4)
      say_launch(cm_loss_prefetch_kernel<4>, "prefetch", 4, kFull, grid, kLossThreads, smem, im.multiprocessors);
    launch_prefetch(L, grid, smem, st, P);
  } else {
    const size_t smem = sizeof(double) * 2 * R * kLossThreads;  // at most 32 KiB
    if (im.profiler.on && mode == kFull && L == 4)
      say_launch(cm_loss_kernel<4, kFull>, "main", 4, kFull, grid, kLossThreads, smem, im.multiprocessors);
    if (mode == kFull)
      launch_main<kFull>(L, grid, smem, st, P);
    else if (mode == kLowRank)
      launch_main<kLowRank>(L, grid, smem, st, P);
    else
      launch_main<kGlobal>(L, grid, smem, st, P);
  }
  CMSEG_CUDA_LAUNCHED("cm_loss main");
  finish_terms_kernel<<<(unsigned)(2 * R), kFinishThreads, 0, st>>>(partial.data(), (int)grid, w.data(), R,
                                                                    result.data());
  CMSEG_CUDA_LAUNCHED("cm_loss finish");
  finish_loss_kernel<<<1, 1, 0, st>>>(R, in.trace_weight, result.data());
  CMSEG_CUDA_LAUNCHED("cm_loss finish");

  if (mode == kGlobal && grads) {
    const unsigned ggrid = (unsigned)im.grid_for((int64_t)n * V, kLossThreads, 2);
    Buffer<double> gpartial(ctx, (size_t)R * ggrid * L * L);
    const dim3 g2(ggrid, (unsigned)R);
    switch (L) {
      case 2: global_grad_kernel<2><<<g2, kLossThreads, 0, st>>>(P, gpartial.data()); break;
      case 3: global_grad_kernel<3><<<g2, kLossThreads, 0, st>>>(P, gpartial.data()); break;
      case 4: global_grad_kernel<4><<<g2, kLossThreads, 0, st>>>(P, gpartial.data()); break;
      default: global_grad_kernel<0><<<g2, kLossThreads, 0, st>>>(P, gpartial.data()); break;
    }
    CMSEG_CUDA_LAUNCHED("cm_loss global grad");
    global_grad_finish_kernel<<<(unsigned)R, 64, 0, st>>>(P, gpartial.data(), (int)ggrid);
    CMSEG_CUDA_LAUNCHED("cm_loss global grad finish");
  }

  std::vector<double> h(2 * R + 1);
  result.download(h.data());  // waits for the stream
  out.ce.assign(h.begin(), h.begin() + R);
  out.trace.assign(h.begin() + R, h.begin() + 2 * R);
  out.loss = h[2 * R];
}

const char* last_cm_loss_kernel() { return tl_last_kernel; }

void cm_predict(Context& ctx, CmMode mode, int L, int rank, const std::vector<const float*>& cm_raw,
                const float* probs, int n, int R, int64_t V, float* cms, float* annotator_probs) {
  ProfileScope prof_(ctx, "cm_predict");
  if (L < 2 || L > kMaxClasses) fail("classes must be in 2..", kMaxClasses, ", got ", L);
  if (mode == CmMode::LowRank && (rank < 1 || rank > kMaxRank)) fail("cmRank must be in 1..", kMaxRank, ", got ", rank);
  if (R < 1 || R > kMaxAnnotators) fail("the CUDA CM prediction takes 1..", kMaxAnnotators, " annotators, got ", R);
  if ((int)cm_raw.size() != R) fail("cm_predict: expected ", R, " raw CM arrays, got ", cm_raw.size());
  if (n < 1 || V < 1) fail("cm_predict: empty batch (n ", n, ", V ", V, ")");
  if (!cms && !annotator_probs) return;
  PredictParams P{};
  for (int r = 0; r < R; ++r) P.raw[r] = cm_raw[r];
  P.probs = probs, P.cms = cms, P.q = annotator_probs;
  P.n = n, P.L = L, P.R = R, P.rank = rank, P.V = V;
  const unsigned grid = (unsigned)ctx.impl().grid_for((int64_t)n * V, kLossThreads, 8);
  cudaStream_t st = stream_of(ctx);
  if (mode == CmMode::Full)
    launch_predict<kFull>(L, grid, st, P);
  else if (mode == CmMode::LowRank)
    launch_predict<kLowRank>(L, grid, st, P);
  else
    launch_predict<kGlobal>(L, grid, st, P);
  CMSEG_CUDA_LAUNCHED("cm_predict");
}

namespace host {

void cm_loss(Context& ctx, const CmLossInput& in, CmLossOutput& out) {
  const int n = in.n, L = in.L, R = in.R;
  const int64_t V = in.V;
  const bool global = in.mode == CmMode::Global;
  const size_t K = global ? (size_t)L * L : (size_t)cm_head_channels(in.mode, L, in.rank);
  const size_t raw_count = global ? K : (size_t)n * K * V;
  if ((int)in.cm_raw.size() != R || (int)in.labels.size() != R) fail("cm_loss: expected ", R, " annotators");
  const bool grads = out.d_seg_logits != nullptr;

  Buffer<float> z(ctx, (size_t)n * L * V), dz(ctx, grads ? (size_t)n * L * V : 0);
  Buffer<uint8_t> present(ctx, in.present ? (size_t)n * R : 0);
  std::vector<Buffer<float>> raw, draw;
  std::vector<Buffer<uint8_t>> labels;
  z.upload(in.seg_logits);
  if (in.present) present.upload(in.present);
  CmLossInput din = in;
  CmLossOutput dout;
  din.seg_logits = z.data();
  din.present = in.present ? present.data() : nullptr;
  for (int r = 0; r < R; ++r) {
    raw.emplace_back(ctx, raw_count);
    raw.back().upload(in.cm_raw[r]);
    labels.emplace_back(ctx, (size_t)n * V);
    labels.back().upload(in.labels[r]);
    din.cm_raw[r] = raw.back().data();
    din.labels[r] = labels.back().data();
    if (grads) {
      draw.emplace_back(ctx, raw_count);
      dout.d_cm_raw.push_back(draw.back().data());
    }
  }
  dout.d_seg_logits = grads ? dz.data() : nullptr;
  cuda::cm_loss(ctx, din, dout);
  out.loss = dout.loss;
  out.ce = dout.ce;
  out.trace = dout.trace;
  if (grads) {
    dz.download(out.d_seg_logits);
    for (int r = 0; r < R; ++r) draw[r].download(out.d_cm_raw[r]);
  }
}

}  // namespace host
}  // namespace cuda
}  // namespace cmseg
