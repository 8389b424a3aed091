// The 1x1(x1) heads (seg and one CM head per annotator, SPEC section 2) on the
// device: a 1x1 convolution is one matrix product per image, so it runs as a cuBLAS
// strided-batched GEMM over the batch. CPU reference: native/layers/conv1.cpp.
//
// cuBLAS is column-major. A row-major [c, V] activation of one image is the
// column-major V x c matrix with leading dimension V, and the row-major weight
// [cout, cin] is the column-major cin x cout matrix with leading dimension cin, so
//   forward          Y (V x cout)  = X (V x cin) * W (cin x cout)
//   backward data    DX (V x cin) += DY (V x cout) * W^T
//   backward weight  dW (cin x cout) += sum_i X_i^T * DY_i
// The bias gradient is a deterministic two-pass reduction (fixed grid and order).
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

}  // namespace

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
  cublasHandle_t h = ctx.impl().cublas();
  const float one = 1.f;
  if (dx_accumulate)
    CMSEG_CUBLAS(cublasSgemmStridedBatched(h, CUBLAS_OP_N, CUBLAS_OP_T, (int)V, cin, cout, &one, dy, (int)V,
                                           (long long)cout * V, w, cin, 0, &one, dx_accumulate, (int)V,
                                           (long long)cin * V, n));
  // One GEMM per image into the same dW (beta = 1): the images' terms add in order.
  for (int i = 0; i < n; ++i)
    CMSEG_CUBLAS(cublasSgemm(h, CUBLAS_OP_T, CUBLAS_OP_N, cin, cout, (int)V, &one, x + (int64_t)i * cin * V, (int)V,
                             dy + (int64_t)i * cout * V, (int)V, &one, dw, cin));
  Context::Impl& im = ctx.impl();
  const int blocks = im.grid_for((int64_t)n * V, kThreads, 4);
  Buffer<double> partial(ctx, (size_t)blocks * cout);
  bias_partial_kernel<<<dim3((unsigned)blocks, (unsigned)cout), kThreads, 0, stream_of(ctx)>>>(dy, n, cout, V,
                                                                                               partial.data());
  CMSEG_CUDA_LAUNCHED("conv1 bias partial");
  bias_finish_kernel<<<blocks_for(cout, 128), 128, 0, stream_of(ctx)>>>(partial.data(), blocks, cout, db);
  CMSEG_CUDA_LAUNCHED("conv1 bias finish");
}

}  // namespace cuda
}  // namespace cmseg
