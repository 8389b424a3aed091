// Max-pool 2, stride 2 on the device (SPEC section 2), forward and backward: one
// thread per output element. Same rule as native/layers/maxpool2.cpp: the first
// tap starts the window's maximum and a later tap wins only if strictly larger
// (so the first maximum is kept, like PyTorch); `arg` stores the winning tap.
#include "common.cuh"

namespace cmseg {
namespace cuda {
namespace {

constexpr int kThreads = 256;

struct PoolGeom {
  int d, h, w;     // input extent
  int od, oh, ow;  // output extent
  int kd;          // 2 in 3D, 1 in 2D
};

__device__ inline int64_t window_origin(const PoolGeom& g, int64_t o, int64_t& plane) {
  const int64_t ohw = (int64_t)g.oh * g.ow, ov = (int64_t)g.od * ohw;
  plane = o / ov;
  const int64_t r = o % ov;
  const int z = (int)(r / ohw), y = (int)((r % ohw) / g.ow), x = (int)(r % g.ow);
  return ((int64_t)(g.kd * z) * g.h + 2 * y) * g.w + 2 * x;
}

__global__ void maxpool2_forward_kernel(const float* __restrict__ x, float* __restrict__ y, uint8_t* __restrict__ arg,
                                        PoolGeom g, int64_t total) {
  const int64_t V = (int64_t)g.d * g.h * g.w, HW = (int64_t)g.h * g.w;
  for (int64_t o = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; o < total; o += (int64_t)gridDim.x * blockDim.x) {
    int64_t plane;
    const float* xc = x + window_origin(g, o, plane);
    xc += plane * V;
    float best = xc[0];
    int bt = 0;
    for (int a = 0; a < g.kd; ++a)
      for (int b = 0; b < 2; ++b)
        for (int e = 0; e < 2; ++e) {
          const float v = xc[a * HW + b * g.w + e];
          if (v > best) best = v, bt = (a * 2 + b) * 2 + e;
        }
    y[o] = best;
    arg[o] = (uint8_t)bt;
  }
}

// Each window covers its own input elements, so every input element is written by
// exactly one thread (the winner gets dy, the rest 0) and no memset is needed.
__global__ void maxpool2_backward_kernel(const float* __restrict__ dy, const uint8_t* __restrict__ arg,
                                         float* __restrict__ dx, PoolGeom g, int64_t total) {
  const int64_t V = (int64_t)g.d * g.h * g.w, HW = (int64_t)g.h * g.w;
  for (int64_t o = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; o < total; o += (int64_t)gridDim.x * blockDim.x) {
    int64_t plane;
    float* dxc = dx + window_origin(g, o, plane);
    dxc += plane * V;
    const int t = arg[o];
    const float d = dy[o];
    for (int a = 0; a < g.kd; ++a)
      for (int b = 0; b < 2; ++b)
        for (int e = 0; e < 2; ++e) dxc[a * HW + b * g.w + e] = ((a * 2 + b) * 2 + e) == t ? d : 0.f;
  }
}

PoolGeom geometry(Spatial s, int ndim) {
  if (s.h % 2 || s.w % 2 || (ndim == 3 && s.d % 2))
    fail("maxpool2: spatial extent ", s.d, "x", s.h, "x", s.w, " is not divisible by 2");
  const int kd = ndim == 3 ? 2 : 1;
  return PoolGeom{s.d, s.h, s.w, s.d / kd, s.h / 2, s.w / 2, kd};
}

}  // namespace

void maxpool2_forward(Context& ctx, const float* x, float* y, uint8_t* arg, int nc, Spatial s, int ndim) {
  ProfileScope prof_(ctx, "maxpool2_forward");
  const PoolGeom g = geometry(s, ndim);
  const int64_t total = (int64_t)nc * g.od * g.oh * g.ow;
  if (!total) return;
  maxpool2_forward_kernel<<<ctx.impl().grid_for(total, kThreads, 16), kThreads, 0, stream_of(ctx)>>>(x, y, arg, g,
                                                                                                      total);
  CMSEG_CUDA_LAUNCHED("maxpool2_forward");
}

void maxpool2_backward(Context& ctx, const float* dy, const uint8_t* arg, float* dx, int nc, Spatial s, int ndim) {
  ProfileScope prof_(ctx, "maxpool2_backward");
  const PoolGeom g = geometry(s, ndim);
  const int64_t total = (int64_t)nc * g.od * g.oh * g.ow;
  if (!total) return;
  maxpool2_backward_kernel<<<ctx.impl().grid_for(total, kThreads, 16), kThreads, 0, stream_of(ctx)>>>(dy, arg, dx, g,
                                                                                                       total);
  CMSEG_CUDA_LAUNCHED("maxpool2_backward");
}

namespace host {

void maxpool2_forward(Context& ctx, const float* x, float* y, uint8_t* arg, int nc, Spatial s, int ndim) {
  const int64_t V = s.size(), Vo = V / (ndim == 3 ? 8 : 4);
  Buffer<float> dx_(ctx, (size_t)nc * V), dy_(ctx, (size_t)nc * Vo);
  Buffer<uint8_t> da(ctx, (size_t)nc * Vo);
  dx_.upload(x);
  cuda::maxpool2_forward(ctx, dx_.data(), dy_.data(), da.data(), nc, s, ndim);
  dy_.download(y);
  da.download(arg);
}

void maxpool2_backward(Context& ctx, const float* dy, const uint8_t* arg, float* dx, int nc, Spatial s, int ndim) {
  const int64_t V = s.size(), Vo = V / (ndim == 3 ? 8 : 4);
  Buffer<float> ddy(ctx, (size_t)nc * Vo), ddx(ctx, (size_t)nc * V);
  Buffer<uint8_t> da(ctx, (size_t)nc * Vo);
  ddy.upload(dy);
  da.upload(arg);
  cuda::maxpool2_backward(ctx, ddy.data(), da.data(), ddx.data(), nc, s, ndim);
  ddx.download(dx);
}

}  // namespace host
}  // namespace cuda
}  // namespace cmseg
