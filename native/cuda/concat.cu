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

// y[i, e] += x[i, e] for e < run, image i = blockIdx.y, with the image strides of y
// and x: float4 when run, the strides and both pointers allow (the level-0 split
// of brats3d-gpu moves 2^26 floats per image), no division per element.
__global__ void add_rows_kernel(float* __restrict__ y, int64_t y_stride, const float* __restrict__ x, int64_t x_stride,
                                int64_t run, bool vec) {
  float* yi = y + blockIdx.y * y_stride;
  const float* xi = x + blockIdx.y * x_stride;
  const int64_t step = (int64_t)gridDim.x * blockDim.x, first = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (vec) {
    float4* y4 = reinterpret_cast<float4*>(yi);
    const float4* x4 = reinterpret_cast<const float4*>(xi);
    for (int64_t k = first; k < run / 4; k += step) {
      float4 a = y4[k];
      const float4 b = x4[k];
      a.x += b.x, a.y += b.y, a.z += b.z, a.w += b.w;
      y4[k] = a;
    }
  } else {
    for (int64_t k = first; k < run; k += step) yi[k] += xi[k];
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

__global__ void copy_rows_kernel(float* __restrict__ y, int64_t y_stride, const float* __restrict__ x,
                                 int64_t x_stride, int64_t run, int64_t total) {
  for (int64_t k = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; k < total; k += (int64_t)gridDim.x * blockDim.x) {
    const int64_t i = k / run, e = k - i * run;
    y[i * y_stride + e] = x[i * x_stride + e];
  }
}

}  // namespace

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

namespace {

// n rows of `run` floats of src added into dst (row strides as copy_rows).
void add_rows(Context& ctx, float* dst, int64_t dst_stride, const float* src, int64_t src_stride, int64_t run, int n) {
  if (n > 65535) fail("add_rows: ", n, " rows exceed the CUDA grid's 65535");
  const bool vec = run % 4 == 0 && dst_stride % 4 == 0 && src_stride % 4 == 0 && aligned16(dst) && aligned16(src);
  const int per_sm = std::max(1, 16 / n);
  const dim3 grid((unsigned)ctx.impl().grid_for(vec ? run / 4 : run, kThreads, per_sm), (unsigned)n);
  add_rows_kernel<<<grid, kThreads, 0, stream_of(ctx)>>>(dst, dst_stride, src, src_stride, run, vec);
  CMSEG_CUDA_LAUNCHED("add_rows");
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
  if (b) copy_rows(ctx, y + (int64_t)ca * V, row, b, (int64_t)cb * V, (int64_t)cb * V, n);
}

void concat_backward(Context& ctx, const float* dy, float* da, int ca, float* db, int cb, int n, int64_t V,
                     bool da_accumulate) {
  ProfileScope prof_(ctx, "concat_backward");
  check("concat_backward", ca, cb, n, V);
  const int64_t row = (int64_t)(ca + cb) * V;
  if (da) {
    const int64_t run = (int64_t)ca * V;
    if (da_accumulate) {
      if (run > 0) add_rows(ctx, da, run, dy, row, run, n);
    } else {
      copy_rows(ctx, da, run, dy, row, run, n);
    }
  }
  if (db) copy_rows(ctx, db, (int64_t)cb * V, dy + (int64_t)ca * V, row, (int64_t)cb * V, n);
}

void add_inplace(Context& ctx, float* y, const float* x, int64_t count) {
  ProfileScope prof_(ctx, "add_inplace");
  if (count <= 0) return;
  add_rows(ctx, y, count, x, count, count, 1);
}

}  // namespace cuda
}  // namespace cmseg
