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
  float* dw[kMaxHeads];        // backward: weight gradients [cout, cin], accumulated
  float* db[kMaxHeads];        // backward: bias gradients [cout], accumulated
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

// ---- fused heads weight and bias gradients (ContextOptions::heads_fused_weight_grad) --
// Every head's dW (+)= sum over positions of dy x^T and db (+)= sum of dy, in one pass
// over the features and the heads' gradients (cuBLAS reads the features once per
// head, and the bias sums read each gradient again: 4.3 ms of the brats3d-gpu step with
// the data gradient on an H200, for about 1 ms of bytes).
//
// A block takes tiles of kWgTile positions of one image into shared memory: the
// features transposed ([position][channel], padded against bank conflicts) and the
// heads' gradient rows ([row][position]). Warp w owns rows w, w + kWgWarps, ...; lane l
// owns feature channels l, l + 32, ...: per four positions a lane loads its four
// feature values once and one float4 of each of its rows (a broadcast), then 4 FMAs
// per row and channel. Sums run in fp32 per tile and are added into fp32 totals per
// block (a tile's 64 terms, then a block's few hundred tiles); blocks' totals go to
// a partial buffer and one thread per output adds them in block order in double
// (deterministic: the grid depends only on the device).
constexpr int kWgWarps = 4, kWgThreads = 32 * kWgWarps, kWgTile = 64, kWgRowsPerWarp = 16;
constexpr int kWgMaxRows = kWgWarps * kWgRowsPerWarp;
// The widest case (64 channels, kWgMaxRows rows) within the 48 KB a launch gets without opting in.
static_assert(sizeof(float) * (kWgTile * 65 + kWgMaxRows * kWgTile) + sizeof(void*) * kWgMaxRows <= 48 * 1024,
              "heads_weight_grad_kernel's shared memory");

// The head of packed row r; k becomes the row's channel within that head.
__device__ inline int head_of_row(const HeadsParams& P, int& k) {
  int h = 0;
  while (k >= P.cout[h]) k -= P.cout[h++];
  return h;
}

template <int CIN>
__global__ void __launch_bounds__(kWgThreads) heads_weight_grad_kernel(const float* __restrict__ x, HeadsParams P,
                                                                       int64_t V, float* __restrict__ partial) {
  constexpr int CPL = CIN / 32;  // channels per lane
  constexpr int XS = CIN + 1;    // padded row of the transposed feature tile
  extern __shared__ float4 smem4[];
  float* xs = reinterpret_cast<float*>(smem4);           // [kWgTile][XS]
  float* ds = xs + kWgTile * XS;                          // [rows][kWgTile], 16-byte aligned rows
  const float** rowp = reinterpret_cast<const float**>(ds + P.rows * kWgTile);  // each row's gradient, this image
  const int i = blockIdx.y, lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int r = threadIdx.x; r < P.rows; r += kWgThreads) {
    int k = r;
    const int h = head_of_row(P, k);
    rowp[r] = P.dy[h] + ((int64_t)i * P.cout[h] + k) * V;
  }
  const int nr = (P.rows - warp + kWgWarps - 1) / kWgWarps;  // rows this warp owns
  float acc[kWgRowsPerWarp][CPL];
  double bacc[kWgRowsPerWarp];  // the bias sums run over every position of the block: in double, as bias_grad's
#pragma unroll
  for (int j = 0; j < kWgRowsPerWarp; ++j) {
    bacc[j] = 0.f;
#pragma unroll
    for (int cc = 0; cc < CPL; ++cc) acc[j][cc] = 0.f;
  }
  const float* xi = x + (int64_t)i * CIN * V;
  for (int64_t v0 = (int64_t)blockIdx.x * kWgTile; v0 < V; v0 += (int64_t)gridDim.x * kWgTile) {
    __syncthreads();  // the previous tile is read (and rowp written, the first time)
    for (int e = threadIdx.x; e < CIN * kWgTile; e += kWgThreads) {
      const int c = e / kWgTile, p = e % kWgTile;
      xs[p * XS + c] = v0 + p < V ? __ldg(xi + (int64_t)c * V + v0 + p) : 0.f;
    }
    for (int e = threadIdx.x; e < P.rows * kWgTile; e += kWgThreads) {
      const int r = e / kWgTile, p = e % kWgTile;
      ds[r * kWgTile + p] = v0 + p < V ? __ldg(rowp[r] + v0 + p) : 0.f;
    }
    __syncthreads();
    float tacc[kWgRowsPerWarp][CPL], tb[kWgRowsPerWarp];
#pragma unroll
    for (int j = 0; j < kWgRowsPerWarp; ++j) {
      tb[j] = 0.f;
#pragma unroll
      for (int cc = 0; cc < CPL; ++cc) tacc[j][cc] = 0.f;
    }
    for (int p = 0; p < kWgTile; p += 4) {
      float xv[4][CPL];
#pragma unroll
      for (int q = 0; q < 4; ++q)
#pragma unroll
        for (int cc = 0; cc < CPL; ++cc) xv[q][cc] = xs[(p + q) * XS + lane + 32 * cc];
#pragma unroll
      for (int j = 0; j < kWgRowsPerWarp; ++j) {
        if (j >= nr) break;
        const float4 d = *reinterpret_cast<const float4*>(ds + (warp + j * kWgWarps) * kWgTile + p);
#pragma unroll
        for (int cc = 0; cc < CPL; ++cc)
          tacc[j][cc] = fmaf(d.w, xv[3][cc], fmaf(d.z, xv[2][cc], fmaf(d.y, xv[1][cc], fmaf(d.x, xv[0][cc], tacc[j][cc]))));
        tb[j] += (d.x + d.y) + (d.z + d.w);
      }
    }
#pragma unroll
    for (int j = 0; j < kWgRowsPerWarp; ++j) {
      bacc[j] += (double)tb[j];
#pragma unroll
      for (int cc = 0; cc < CPL; ++cc) acc[j][cc] += tacc[j][cc];
    }
  }
  const int64_t b = (int64_t)blockIdx.y * gridDim.x + blockIdx.x;
#pragma unroll
  for (int j = 0; j < kWgRowsPerWarp; ++j) {
    if (j >= nr) break;
    float* out = partial + (b * P.rows + warp + j * kWgWarps) * XS;
#pragma unroll
    for (int cc = 0; cc < CPL; ++cc) out[lane + 32 * cc] = acc[j][cc];
    if (lane == 0) out[CIN] = (float)bacc[j];
  }
}

// One thread per output (row, channel or bias): the blocks' totals added in block
// order, in double, into the head's dw or db.
__global__ void heads_weight_grad_finish_kernel(const float* __restrict__ partial, int blocks, HeadsParams P, int cin) {
  const int o = blockIdx.x * blockDim.x + threadIdx.x, per_row = cin + 1;
  if (o >= P.rows * per_row) return;
  double s = 0;
  for (int b = 0; b < blocks; ++b) s += partial[(int64_t)b * P.rows * per_row + o];
  int k = o / per_row;
  const int c = o % per_row, h = head_of_row(P, k);
  if (c < cin)
    P.dw[h][k * cin + c] += (float)s;
  else
    P.db[h][k] += (float)s;
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
      P.y[k] = h.y, P.dy[k] = h.dy, P.dw[k] = h.dw, P.db[k] = h.db, P.cout[k] = h.cout;
      ctx.copy(w.data() + (size_t)row * cin, h.w, sizeof(float) * h.cout * cin);
      if (biases) ctx.copy(b.data() + row, h.b, sizeof(float) * h.cout);
      row += h.cout;
    }
    fused = true;
  }
};

// The fused weight and bias gradients of packed heads, when the features are 32 or 64
// wide and every row fits the warps (kWgMaxRows); false (nothing written) otherwise.
bool heads_weight_grad_fused(Context& ctx, const float* x, const PackedHeads& ph, int n, int cin, int64_t V) {
  if ((cin != 32 && cin != 64) || ph.P.rows > kWgMaxRows) return false;
  const size_t smem = sizeof(float) * ((size_t)kWgTile * (cin + 1) + (size_t)ph.P.rows * kWgTile) +
                      sizeof(const float*) * ph.P.rows;
  // Blocks per image: about 4 per SM over all images (n per SM from 5 images on), never
  // more than an image's tiles.
  const int blocks_x = ctx.impl().grid_for(V, kWgTile, std::max(1, 4 / n));
  const int blocks = blocks_x * n;
  Buffer<float> partial(ctx, (size_t)blocks * ph.P.rows * (cin + 1));
  const dim3 grid((unsigned)blocks_x, (unsigned)n);
  if (cin == 32)
    heads_weight_grad_kernel<32><<<grid, kWgThreads, smem, stream_of(ctx)>>>(x, ph.P, V, partial.data());
  else
    heads_weight_grad_kernel<64><<<grid, kWgThreads, smem, stream_of(ctx)>>>(x, ph.P, V, partial.data());
  CMSEG_CUDA_LAUNCHED("conv1 heads weight gradients");
  const int outputs = ph.P.rows * (cin + 1);
  heads_weight_grad_finish_kernel<<<blocks_for(outputs, 128), 128, 0, stream_of(ctx)>>>(partial.data(), blocks, ph.P,
                                                                                      cin);
  CMSEG_CUDA_LAUNCHED("conv1 heads weight gradients finish");
  return true;
}

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
  if (ctx.options().heads_fused_weight_grad && heads_weight_grad_fused(ctx, x, ph, n, cin, V)) return;
  for (const Conv1Head& h : heads) {
    weight_grad(ctx, x, h.dy, n, cin, h.cout, V, h.dw);
    bias_grad(ctx, h.dy, n, h.cout, V, h.db);
  }
}

}  // namespace cuda
}  // namespace cmseg
