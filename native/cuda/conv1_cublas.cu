// The 1x1(x1) heads (seg and one CM head per annotator, SPEC section 2) on the
// device. CPU reference: native/layers/conv1.cpp.
//
// Heads that read the same features (the consensus head and the CM heads without
// extra blocks) run together: one kernel reads each position's features once and
// writes every head's outputs (weights in shared memory, exact fp32), and in the
// backward one kernel reads every head's gradient once and writes the features'
// gradient. Apart, each head read the features (and read and wrote their gradient)
// once per head: 4 GEMMs forward and backward took 5.6 ms of the brats3d-gpu step
// on an H200. A single head, or features of a width the kernels are not built for,
// runs as cuBLAS GEMMs:
//
// cuBLAS is column-major. A row-major [c, V] activation of one image is the
// column-major V x c matrix with leading dimension V, and the row-major weight
// [cout, cin] is the column-major cin x cout matrix with leading dimension cin, so
//   forward          Y (V x cout)  = X (V x cin) * W (cin x cout)
//   backward data    DX (V x cin) += DY (V x cout) * W^T
//   backward weight  dW (cin x cout) += sum_i X_i^T * DY_i
// The weight gradient's inner dimension is every position of an image, so it runs
// split into batches (gemm_plan.hpp), added in a fixed order; the bias gradient is a
// deterministic two-pass reduction (fixed grid and order). Both paths share them.
#include <type_traits>

#include "common.cuh"

namespace cmseg {
namespace cuda {
namespace {

constexpr int kThreads = 256;

void check_dims(const char* what, int n, int cin, int cout, int64_t V) {
  if (n < 1 || cin < 1 || cout < 1 || V < 1) fail(what, ": empty shape (n ", n, ", cin ", cin, ", cout ", cout, ", V ", V, ")");
  if (V > INT32_MAX) fail(what, ": ", V, " positions per image exceed cuBLAS's 32-bit dimensions");
}

__global__ void add_channel_bias_kernel(float* __restrict__ y, const float* __restrict__ b, int cout, int64_t V,
                                        int64_t total) {
  for (int64_t k = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; k < total; k += (int64_t)gridDim.x * blockDim.x)
    y[k] += b[(k / V) % cout];
}

// Pass 1, grid (blocks, cout): each block sums its grid-stride share of channel co
// over all images and positions, in double.
__global__ void bias_partial_kernel(const float* __restrict__ dy, int n, int cout, int64_t V,
                                    double* __restrict__ partial) {
  __shared__ double scratch[32];
  const int co = blockIdx.y;
  const int64_t total = (int64_t)n * V;
  double s = 0;
  for (int64_t k = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; k < total; k += (int64_t)gridDim.x * blockDim.x) {
    const int64_t i = k / V, v = k - i * V;
    s += dy[(i * cout + co) * V + v];
  }
  s = block_sum(s, scratch);
  if (threadIdx.x == 0) partial[(int64_t)co * gridDim.x + blockIdx.x] = s;
}

// Pass 2: one thread per channel adds the blocks' sums in index order.
__global__ void bias_finish_kernel(const double* __restrict__ partial, int blocks, int cout, float* __restrict__ db) {
  const int co = blockIdx.x * blockDim.x + threadIdx.x;
  if (co >= cout) return;
  double s = 0;
  for (int b = 0; b < blocks; ++b) s += partial[(int64_t)co * blocks + b];
  db[co] += (float)s;
}


// ---- fused heads ------------------------------------------------------------------

constexpr int kMaxHeads = 17;  // the consensus head and up to 16 annotators' CM heads
constexpr size_t kHeadsSmemMax = 48 << 10;

struct HeadsParams {
  float* y[kMaxHeads];         // forward: outputs [n, cout, V]
  const float* dy[kMaxHeads];  // backward: their gradients
  int cout[kMaxHeads];
  int heads = 0, rows = 0;     // rows: every head's output channels, the packed weights' rows
};

// The packed weights ([rows, CIN], head after head) and biases into shared memory.
template <int CIN>
__device__ inline void load_weights(const float* __restrict__ wpack, const float* __restrict__ bpack, int rows,
                                    float* ws, float* bs) {
  for (int e = threadIdx.x; e < rows * CIN; e += blockDim.x) ws[e] = wpack[e];
  if (bs)
    for (int e = threadIdx.x; e < rows; e += blockDim.x) bs[e] = bpack[e];
  __syncthreads();
}

// One thread per position of image blockIdx.y: its CIN features once, every head's
// outputs from them.
template <int CIN>
__global__ void __launch_bounds__(kThreads) heads_forward_kernel(const float* __restrict__ x,
                                                                 const float* __restrict__ wpack,
                                                                 const float* __restrict__ bpack, HeadsParams P,
                                                                 int64_t V) {
  extern __shared__ float4 smem4[];
  float* ws = reinterpret_cast<float*>(smem4);
  float* bs = ws + P.rows * CIN;
  load_weights<CIN>(wpack, bpack, P.rows, ws, bs);
  const int i = blockIdx.y;
  const float* xi = x + (int64_t)i * CIN * V;
  for (int64_t v = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; v < V; v += (int64_t)gridDim.x * blockDim.x) {
    float xr[CIN];
#pragma unroll
    for (int c = 0; c < CIN; ++c) xr[c] = __ldg(xi + (int64_t)c * V + v);
    int row = 0;
    for (int h = 0; h < P.heads; ++h) {
      float* yh = P.y[h] + (int64_t)i * P.cout[h] * V + v;
      for (int k = 0; k < P.cout[h]; ++k, ++row) {
        const float4* w4 = reinterpret_cast<const float4*>(ws + row * CIN);
        float acc = bs[row];
#pragma unroll
        for (int c = 0; c < CIN / 4; ++c) {
          const float4 w = w4[c];
          acc = fmaf(w.x, xr[4 * c], acc);
          acc = fmaf(w.y, xr[4 * c + 1], acc);
          acc = fmaf(w.z, xr[4 * c + 2], acc);
          acc = fmaf(w.w, xr[4 * c + 3], acc);
        }
        yh[(int64_t)k * V] = acc;
      }
    }
  }
}

// One thread per position: every head's gradient there once, dx (+)= W^T dy.
template <int CIN>
__global__ void __launch_bounds__(kThreads) heads_backward_data_kernel(const float* __restrict__ wpack, HeadsParams P,
                                                                       float* __restrict__ dx, int64_t V) {
  extern __shared__ float4 smem4[];
  float* ws = reinterpret_cast<float*>(smem4);
  load_weights<CIN>(wpack, nullptr, P.rows, ws, nullptr);
  const int i = blockIdx.y;
  float* dxi = dx + (int64_t)i * CIN * V;
  for (int64_t v = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; v < V; v += (int64_t)gridDim.x * blockDim.x) {
    float acc[CIN];
#pragma unroll
    for (int c = 0; c < CIN; ++c) acc[c] = 0.f;
    int row = 0;
    for (int h = 0; h < P.heads; ++h) {
      const float* dyh = P.dy[h] + (int64_t)i * P.cout[h] * V + v;
      const int K = P.cout[h];
      for (int k0 = 0; k0 < K; k0 += 4) {
        // Up to four gradient channels loaded before they are used (loads in flight).
        float d[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) d[j] = k0 + j < K ? __ldg(dyh + (int64_t)(k0 + j) * V) : 0.f;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          if (k0 + j >= K) break;
          const float4* w4 = reinterpret_cast<const float4*>(ws + (row + j) * CIN);
#pragma unroll
          for (int c = 0; c < CIN / 4; ++c) {
            const float4 w = w4[c];
            acc[4 * c] = fmaf(w.x, d[j], acc[4 * c]);
            acc[4 * c + 1] = fmaf(w.y, d[j], acc[4 * c + 1]);
            acc[4 * c + 2] = fmaf(w.z, d[j], acc[4 * c + 2]);
            acc[4 * c + 3] = fmaf(w.w, d[j], acc[4 * c + 3]);
          }
        }
        row += min(4, K - k0);
      }
    }
#pragma unroll
    for (int c = 0; c < CIN; ++c) dxi[(int64_t)c * V + v] += acc[c];
  }
}

// dst[e] += the slots' entries e, in slot order (FilterSplit).
__global__ void add_slots_kernel(const float* __restrict__ partial, int slots, int64_t slot, float* __restrict__ dst) {
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < slot; e += (int64_t)gridDim.x * blockDim.x) {
    double s = 0;
    for (int b = 0; b < slots; ++b) s += partial[b * slot + e];
    dst[e] += (float)s;
  }
}

// dw (cout x cin, accumulated) += sum_i DY_i X_i^T, split along the positions.
void weight_grad(Context& ctx, const float* x, const float* dy, int n, int cin, int cout, int64_t V, float* dw) {
  std::vector<FilterSplit> parts;
  int slots = 0;
  for (int i = 0; i < n; ++i) {
    const GemmCall c = gemm_call(true, false, cin, cout, (int)V, (int64_t)i * cin * V, (int)V, (int64_t)i * cout * V,
                                 (int)V, 0, cin);
    parts.push_back(split_long_k(c, kFilterSplitMin, slots));
    slots += parts.back().slots();
  }
  Buffer<float> partial(ctx, (size_t)slots * cin * cout);
  for (const FilterSplit& f : parts) run_split(ctx, f, x, dy, partial.data());
  add_slots(ctx, partial.data(), slots, (int64_t)cin * cout, dw);
}

void bias_grad(Context& ctx, const float* dy, int n, int cout, int64_t V, float* db) {
  Context::Impl& im = ctx.impl();
  const int blocks = im.grid_for((int64_t)n * V, kThreads, 4);
  Buffer<double> partial(ctx, (size_t)blocks * cout);
  bias_partial_kernel<<<dim3((unsigned)blocks, (unsigned)cout), kThreads, 0, stream_of(ctx)>>>(dy, n, cout, V,
                                                                                               partial.data());
  CMSEG_CUDA_LAUNCHED("conv1 bias partial");
  bias_finish_kernel<<<blocks_for(cout, 128), 128, 0, stream_of(ctx)>>>(partial.data(), blocks, cout, db);
  CMSEG_CUDA_LAUNCHED("conv1 bias finish");
}

// The fused kernels' feature widths (CIN a multiple of 4 with its registers in
// budget): f(CIN) for one of them, false for any other width.
template <class F>
bool with_cin(int cin, F&& f) {
  switch (cin) {
    case 8: f(std::integral_constant<int, 8>{}); return true;
    case 16: f(std::integral_constant<int, 16>{}); return true;
    case 32: f(std::integral_constant<int, 32>{}); return true;
    case 64: f(std::integral_constant<int, 64>{}); return true;
    default: return false;
  }
}

// The heads packed for the fused kernels (weights [rows, cin] and biases, head
// after head, copied on the stream), or none when they do not fit them (one head,
// more than kMaxHeads, another width, too many rows for shared memory, more images
// than a grid's y).
struct PackedHeads {
  HeadsParams P{};
  Buffer<float> w, b;
  size_t smem = 0;
  bool fused = false;
  PackedHeads(Context& ctx, const std::vector<Conv1Head>& heads, int n, int cin, bool biases) {
    if (heads.size() < 2 || heads.size() > (size_t)kMaxHeads || !with_cin(cin, [](auto) {}) || n > 65535) return;
    int rows = 0;
    for (const Conv1Head& h : heads) rows += h.cout;
    smem = sizeof(float) * ((size_t)rows * cin + (biases ? rows : 0));
    if (smem > kHeadsSmemMax) return;
    w = Buffer<float>(ctx, (size_t)rows * cin);
    if (biases) b = Buffer<float>(ctx, (size_t)rows);
    P.heads = (int)heads.size(), P.rows = rows;
    int row = 0;
    for (size_t k = 0; k < heads.size(); ++k) {
      const Conv1Head& h = heads[k];
      P.y[k] = h.y, P.dy[k] = h.dy, P.cout[k] = h.cout;
      ctx.copy(w.data() + (size_t)row * cin, h.w, sizeof(float) * h.cout * cin);
      if (biases) ctx.copy(b.data() + row, h.b, sizeof(float) * h.cout);
      row += h.cout;
    }
    fused = true;
  }
};

}  // namespace

void run_gemm(Context& ctx, const GemmCall& c, const float* A, const float* B, float* C) {
  cublas_math(ctx);
  const float one = 1.f;
  CMSEG_CUBLAS(cublasSgemm(ctx.impl().cublas(), c.ta ? CUBLAS_OP_T : CUBLAS_OP_N, c.tb ? CUBLAS_OP_T : CUBLAS_OP_N,
                           c.m, c.n, c.k, &one, A + c.a_off, c.lda, B + c.b_off, c.ldb, &c.beta, C + c.c_off, c.ldc));
}

void run_split(Context& ctx, const FilterSplit& f, const float* A, const float* B, float* partial) {
  cublas_math(ctx);
  const GemmCall& b = f.batch;
  const float one = 1.f;
  CMSEG_CUBLAS(cublasSgemmStridedBatched(ctx.impl().cublas(), b.ta ? CUBLAS_OP_T : CUBLAS_OP_N,
                                         b.tb ? CUBLAS_OP_T : CUBLAS_OP_N, b.m, b.n, b.k, &one, A + b.a_off, b.lda,
                                         f.stride, B + b.b_off, b.ldb, f.stride, &b.beta, partial + b.c_off, b.ldc,
                                         f.slot, f.batches));
  if (f.has_rest) run_gemm(ctx, f.rest, A, B, partial);
}

void add_slots(Context& ctx, const float* partial, int slots, int64_t slot, float* dst) {
  add_slots_kernel<<<ctx.impl().grid_for(slot, kThreads, 4), kThreads, 0, stream_of(ctx)>>>(partial, slots, slot, dst);
  CMSEG_CUDA_LAUNCHED("add_slots");
}

void conv1_forward(Context& ctx, const float* x, const float* w, const float* b, float* y, int n, int cin, int cout,
                   int64_t V) {
  ProfileScope prof_(ctx, "conv1_forward");
  check_dims("conv1_forward", n, cin, cout, V);
  cublas_math(ctx);
  const float one = 1.f, zero = 0.f;
  CMSEG_CUBLAS(cublasSgemmStridedBatched(ctx.impl().cublas(), CUBLAS_OP_N, CUBLAS_OP_N, (int)V, cout, cin, &one, x,
                                         (int)V, (long long)cin * V, w, cin, 0, &zero, y, (int)V, (long long)cout * V,
                                         n));
  const int64_t total = (int64_t)n * cout * V;
  add_channel_bias_kernel<<<ctx.impl().grid_for(total, kThreads, 16), kThreads, 0, stream_of(ctx)>>>(y, b, cout, V,
                                                                                                     total);
  CMSEG_CUDA_LAUNCHED("conv1 bias");
}

void conv1_backward(Context& ctx, const float* x, const float* w, const float* dy, float* dx_accumulate, float* dw,
                    float* db, int n, int cin, int cout, int64_t V) {
  ProfileScope prof_(ctx, "conv1_backward");
  check_dims("conv1_backward", n, cin, cout, V);
  cublas_math(ctx);
  const float one = 1.f;
  if (dx_accumulate)
    CMSEG_CUBLAS(cublasSgemmStridedBatched(ctx.impl().cublas(), CUBLAS_OP_N, CUBLAS_OP_T, (int)V, cin, cout, &one, dy,
                                           (int)V, (long long)cout * V, w, cin, 0, &one, dx_accumulate, (int)V,
                                           (long long)cin * V, n));
  weight_grad(ctx, x, dy, n, cin, cout, V, dw);
  bias_grad(ctx, dy, n, cout, V, db);
}

void conv1_forward_heads(Context& ctx, const float* x, const std::vector<Conv1Head>& heads, int n, int cin,
                         int64_t V) {
  for (const Conv1Head& h : heads) check_dims("conv1_forward_heads", n, cin, h.cout, V);
  PackedHeads ph(ctx, heads, n, cin, true);
  if (!ph.fused) {
    for (const Conv1Head& h : heads) conv1_forward(ctx, x, h.w, h.b, h.y, n, cin, h.cout, V);
    return;
  }
  ProfileScope prof_(ctx, "conv1_forward (heads fused)");
  const dim3 grid((unsigned)ctx.impl().grid_for(V, kThreads, 4), (unsigned)n);
  with_cin(cin, [&](auto C) {
    heads_forward_kernel<decltype(C)::value><<<grid, kThreads, ph.smem, stream_of(ctx)>>>(x, ph.w.data(), ph.b.data(), ph.P, V);
  });
  CMSEG_CUDA_LAUNCHED("conv1 heads forward");
}

void conv1_backward_heads(Context& ctx, const float* x, const std::vector<Conv1Head>& heads, float* dx_accumulate,
                          int n, int cin, int64_t V) {
  for (const Conv1Head& h : heads) check_dims("conv1_backward_heads", n, cin, h.cout, V);
  PackedHeads ph(ctx, heads, n, cin, false);
  if (!ph.fused) {
    for (const Conv1Head& h : heads) conv1_backward(ctx, x, h.w, h.dy, dx_accumulate, h.dw, h.db, n, cin, h.cout, V);
    return;
  }
  ProfileScope prof_(ctx, "conv1_backward (heads fused)");
  if (dx_accumulate) {
    const dim3 grid((unsigned)ctx.impl().grid_for(V, kThreads, 4), (unsigned)n);
    with_cin(cin, [&](auto C) {
      heads_backward_data_kernel<decltype(C)::value><<<grid, kThreads, ph.smem, stream_of(ctx)>>>(ph.w.data(), ph.P,
                                                                                       dx_accumulate, V);
    });
    CMSEG_CUDA_LAUNCHED("conv1 heads backward data");
  }
  for (const Conv1Head& h : heads) {
    weight_grad(ctx, x, h.dy, n, cin, h.cout, V, h.dw);
    bias_grad(ctx, h.dy, n, h.cout, V, h.db);
  }
}

}  // namespace cuda
}  // namespace cmseg
