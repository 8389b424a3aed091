// The decoder's channel concat cat([skip, up], channel) (SPEC section 2) and the
// elementwise sums of the backward pass (skip gradients, CM-head gradients into
// the shared features). CPU reference: native/layers/concat.cpp.
//
// In N, C, *S layout each image's part of a and of b is one contiguous run, so the
// concat and its plain split are strided 2D copies (one row per image); only the
// accumulating split needs a kernel.
#include "common.cuh"

namespace cmseg {
namespace cuda {
namespace {

constexpr int kThreads = 256;

// y[i, e] += x[i, e] for e < run, with the image strides of y and x.
__global__ void add_rows_kernel(float* __restrict__ y, int64_t y_stride, const float* __restrict__ x, int64_t x_stride,
                                int64_t run, int64_t total) {
  for (int64_t k = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; k < total; k += (int64_t)gridDim.x * blockDim.x) {
    const int64_t i = k / run, e = k - i * run;
    y[i * y_stride + e] += x[i * x_stride + e];
  }
}

__global__ void copy_rows_kernel(float* __restrict__ y, int64_t y_stride, const float* __restrict__ x,
                                 int64_t x_stride, int64_t run, int64_t total) {
  for (int64_t k = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; k < total; k += (int64_t)gridDim.x * blockDim.x) {
    const int64_t i = k / run, e = k - i * run;
    y[i * y_stride + e] = x[i * x_stride + e];
  }
}

__global__ void add_kernel(float* __restrict__ y, const float* __restrict__ x, int64_t count) {
  for (int64_t k = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; k < count; k += (int64_t)gridDim.x * blockDim.x)
    y[k] += x[k];
}

// n rows of `run` floats from src (row stride src_stride) to dst (row stride dst_stride).
void copy_rows(Context& ctx, float* dst, int64_t dst_stride, const float* src, int64_t src_stride, int64_t run, int n) {
  if (run == 0 || n == 0) return;
  // cudaMemcpy2D limits pitches to the device's memPitch (2^31 - 1 bytes): larger
  // rows (very large volumes) take the kernel.
  const int64_t limit = (int64_t)INT32_MAX / (int64_t)sizeof(float);
  if (dst_stride > limit || src_stride > limit) {
    const int64_t total = run * n;
    copy_rows_kernel<<<ctx.impl().grid_for(total, kThreads, 16), kThreads, 0, stream_of(ctx)>>>(dst, dst_stride, src,
                                                                                               src_stride, run, total);
    CMSEG_CUDA_LAUNCHED("concat copy rows");
    return;
  }
  CMSEG_CUDA(cudaMemcpy2DAsync(dst, (size_t)dst_stride * sizeof(float), src, (size_t)src_stride * sizeof(float),
                               (size_t)run * sizeof(float), (size_t)n, cudaMemcpyDeviceToDevice, stream_of(ctx)));
}

void check(const char* what, int ca, int cb, int n, int64_t V) {
  if (ca < 0 || cb < 0 || n < 1 || V < 1) fail(what, ": bad shape (ca ", ca, ", cb ", cb, ", n ", n, ", V ", V, ")");
}

}  // namespace

void concat_forward(Context& ctx, const float* a, int ca, const float* b, int cb, float* y, int n, int64_t V) {
  ProfileScope prof_(ctx, "concat_forward");
  check("concat_forward", ca, cb, n, V);
  const int64_t row = (int64_t)(ca + cb) * V;
  copy_rows(ctx, y, row, a, (int64_t)ca * V, (int64_t)ca * V, n);
  copy_rows(ctx, y + (int64_t)ca * V, row, b, (int64_t)cb * V, (int64_t)cb * V, n);
}

void concat_backward(Context& ctx, const float* dy, float* da, int ca, float* db, int cb, int n, int64_t V,
                     bool da_accumulate) {
  ProfileScope prof_(ctx, "concat_backward");
  check("concat_backward", ca, cb, n, V);
  const int64_t row = (int64_t)(ca + cb) * V;
  if (da) {
    const int64_t run = (int64_t)ca * V;
    if (da_accumulate) {
      const int64_t total = run * n;
      if (total > 0) {
        add_rows_kernel<<<ctx.impl().grid_for(total, kThreads, 16), kThreads, 0, stream_of(ctx)>>>(da, run, dy, row,
                                                                                                   run, total);
        CMSEG_CUDA_LAUNCHED("concat_backward accumulate");
      }
    } else {
      copy_rows(ctx, da, run, dy, row, run, n);
    }
  }
  if (db) copy_rows(ctx, db, (int64_t)cb * V, dy + (int64_t)ca * V, row, (int64_t)cb * V, n);
}

void add_inplace(Context& ctx, float* y, const float* x, int64_t count) {
  ProfileScope prof_(ctx, "add_inplace");
  if (count <= 0) return;
  add_kernel<<<ctx.impl().grid_for(count, kThreads, 16), kThreads, 0, stream_of(ctx)>>>(y, x, count);
  CMSEG_CUDA_LAUNCHED("add_inplace");
}

}  // namespace cuda
}  // namespace cmseg
