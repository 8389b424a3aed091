// Instance norm (affine) with the optional fused ReLU on the device, forward and
// backward (SPEC section 2; CPU reference: native/layers/instance_norm.cpp).
//
// A (n, c) plane can hold millions of voxels while n * c is small (64 planes for the
// top level of brats3d-gpu), so each plane is split into chunks over several blocks:
//   1. reduce:   each block sums its chunk in double into a partial,
//   2. finalize: one thread per plane adds its partials in a fixed order,
//   3. apply:    elementwise, float4 where the plane length allows.
// Fixed chunking and fixed-order sums make every result reproducible run to run.
// The backward's two passes (sums, then dx) read x and dy only: the fused ReLU's
// mask is the forward's pre-activation recomputed from x (affine_of and
// pre_activation, explicitly rounded, give the forward's values bit for bit), so y
// is not read (5 tensor passes instead of 7).
// Forward statistics are shifted by the plane's first value, so the one-pass
// variance keeps its precision when |mean| >> std.
#include "common.cuh"

namespace cmseg {
namespace cuda {
namespace {

constexpr int kThreads = 256;

struct Chunks {
  int per_plane = 1;
  int64_t len = 0;  // elements per chunk, a multiple of 4
};

Chunks chunking(Context& ctx, int64_t planes, int64_t V) {
  Chunks c;
  // blocks in the reduce pass (ContextOptions::instance_norm_blocks_per_sm says why 4)
  const int64_t want = (int64_t)ctx.options().instance_norm_blocks_per_sm * ctx.impl().multiprocessors;
  const int64_t most = std::max<int64_t>(1, V / (kThreads * 8));
  c.per_plane = (int)std::max<int64_t>(1, std::min(most, (want + planes - 1) / planes));
  c.len = ((V + c.per_plane - 1) / c.per_plane + 3) / 4 * 4;
  c.per_plane = (int)((V + c.len - 1) / c.len);
  return c;
}

// Sums f(v) over one chunk of one plane: float4 loads when the plane is 16-byte
// aligned throughout (V % 4 == 0).
template <class F>
__device__ inline void for_chunk(int64_t v0, int64_t v1, bool vec, F&& f) {
  if (vec) {
    for (int64_t v = v0 + 4 * threadIdx.x; v < v1; v += 4 * blockDim.x) f(v, 4);
  } else {
    for (int64_t v = v0 + threadIdx.x; v < v1; v += blockDim.x) f(v, 1);
  }
}

__device__ inline float4 load4(const float* p) { return *reinterpret_cast<const float4*>(p); }

// y = x * a.x + a.y (before the ReLU), with a = affine_of(...): the affine in the
// CPU reference's order of operations, and every rounding explicit (the affine's
// products and difference rounded one by one, the pre-activation one fused
// multiply-add), so that nothing is left to the compiler's contraction and the
// backward recomputes the forward's pre-activations, and its ReLU mask, bit for bit.
__device__ inline float2 affine_of(float gamma, float beta, float mean, float rstd) {
  return make_float2(__fmul_rn(gamma, rstd), __fsub_rn(beta, __fmul_rn(__fmul_rn(mean, gamma), rstd)));
}
__device__ inline float pre_activation(float x, float2 a) { return __fmaf_rn(x, a.x, a.y); }

// ---- forward ----

__global__ void stats_kernel(const float* __restrict__ x, int64_t V, Chunks ch, double2* __restrict__ partial) {
  __shared__ double scratch[32];
  const int64_t plane = blockIdx.y;
  const int chunk = blockIdx.x;
  const float* xp = x + plane * V;
  const double shift = xp[0];
  const int64_t v0 = chunk * ch.len, v1 = min(V, v0 + ch.len);
  double s1 = 0, s2 = 0;
  for_chunk(v0, v1, V % 4 == 0, [&](int64_t v, int k) {
    if (k == 4) {
      const float4 q = load4(xp + v);
      const double a = (double)q.x - shift, b = (double)q.y - shift, c = (double)q.z - shift, d = (double)q.w - shift;
      s1 += (a + b) + (c + d);
      s2 += (a * a + b * b) + (c * c + d * d);
    } else {
      const double a = (double)xp[v] - shift;
      s1 += a;
      s2 += a * a;
    }
  });
  s1 = block_sum(s1, scratch);
  s2 = block_sum(s2, scratch);
  if (threadIdx.x == 0) partial[plane * ch.per_plane + chunk] = make_double2(s1, s2);
}

__global__ void stats_finalize_kernel(const float* __restrict__ x, const double2* __restrict__ partial,
                                      int64_t planes, int64_t V, int chunks, float* __restrict__ mean,
                                      float* __restrict__ rstd) {
  const int64_t p = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (p >= planes) return;
  double s1 = 0, s2 = 0;
  for (int k = 0; k < chunks; ++k) {
    const double2 q = partial[p * chunks + k];
    s1 += q.x, s2 += q.y;
  }
  const double shifted_mean = s1 / V;
  const double mu = (double)x[p * V] + shifted_mean;
  const double var = max(0.0, s2 / V - shifted_mean * shifted_mean);
  mean[p] = (float)mu;
  rstd[p] = (float)(1.0 / sqrt(var + (double)kInstanceNormEps));
}

// y from x and the plane's statistics: the forward's output, and the same again
// when the backward recomputes it (instance_norm_apply).
template <bool RELU>
__global__ void apply_kernel(const float* __restrict__ x, const float* __restrict__ mean,
                             const float* __restrict__ rstd, const float* __restrict__ gamma,
                             const float* __restrict__ beta, int c, float* __restrict__ y, int64_t V, Chunks ch) {
  const int64_t plane = blockIdx.y;
  const int64_t v0 = blockIdx.x * ch.len, v1 = min(V, v0 + ch.len);
  const float2 gb = affine_of(gamma[plane % c], beta[plane % c], mean[plane], rstd[plane]);
  const float* xp = x + plane * V;
  float* yp = y + plane * V;
  auto f = [&](float v) {
    const float o = pre_activation(v, gb);
    return RELU ? (o > 0.f ? o : 0.f) : o;
  };
  for_chunk(v0, v1, V % 4 == 0, [&](int64_t v, int k) {
    if (k == 4) {
      const float4 q = load4(xp + v);
      *reinterpret_cast<float4*>(yp + v) = make_float4(f(q.x), f(q.y), f(q.z), f(q.w));
    } else {
      yp[v] = f(xp[v]);
    }
  });
}

// ---- backward ----

// dy masked by the fused ReLU: where the forward's pre-activation (recomputed from
// x and the plane's affine, bit for bit) was not positive, y was 0 and its gradient
// is 0, as the CPU reference's (y > 0) test.
template <bool RELU>
__device__ inline float masked(float dy, float x, float2 a) {
  return (!RELU || pre_activation(x, a) > 0.f) ? dy : 0.f;
}

template <bool RELU>
__global__ void grad_sums_kernel(const float* __restrict__ x, const float* __restrict__ dy,
                                 const float* __restrict__ mean, const float* __restrict__ rstd,
                                 const float* __restrict__ gamma, const float* __restrict__ beta, int c, int64_t V,
                                 Chunks ch, double2* __restrict__ partial) {
  __shared__ double scratch[32];
  const int64_t plane = blockIdx.y;
  const int chunk = blockIdx.x;
  const int64_t v0 = chunk * ch.len, v1 = min(V, v0 + ch.len);
  const float mu = mean[plane], r = rstd[plane];
  const float2 a = RELU ? affine_of(gamma[plane % c], beta[plane % c], mu, r) : make_float2(0.f, 0.f);
  const float* xp = x + plane * V;
  const float* dyp = dy + plane * V;
  double s_dy = 0, s_dyx = 0;
  auto add = [&](float xv, float dyv) {
    const float g = masked<RELU>(dyv, xv, a);
    s_dy += g;
    s_dyx += (double)g * ((xv - mu) * r);
  };
  for_chunk(v0, v1, V % 4 == 0, [&](int64_t v, int k) {
    if (k == 4) {
      const float4 xv = load4(xp + v), dv = load4(dyp + v);
      add(xv.x, dv.x), add(xv.y, dv.y), add(xv.z, dv.z), add(xv.w, dv.w);
    } else {
      add(xp[v], dyp[v]);
    }
  });
  s_dy = block_sum(s_dy, scratch);
  s_dyx = block_sum(s_dyx, scratch);
  if (threadIdx.x == 0) partial[plane * ch.per_plane + chunk] = make_double2(s_dy, s_dyx);
}

// Per plane: the two means the dx formula needs, and the plane's dgamma / dbeta terms.
__global__ void grad_finalize_kernel(const double2* __restrict__ partial, int64_t planes, int chunks, int64_t V,
                                     double2* __restrict__ sums, float2* __restrict__ means) {
  const int64_t p = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (p >= planes) return;
  double a = 0, b = 0;
  for (int k = 0; k < chunks; ++k) {
    const double2 q = partial[p * chunks + k];
    a += q.x, b += q.y;
  }
  sums[p] = make_double2(a, b);
  means[p] = make_float2((float)(a / V), (float)(b / V));
}

// dgamma[ch] += sum over images of sum(dy * xhat); dbeta[ch] += sum(dy). Images are
// added one at a time in float, in order, as the CPU reference does.
__global__ void param_grad_kernel(const double2* __restrict__ sums, int n, int c, float* __restrict__ dgamma,
                                  float* __restrict__ dbeta) {
  const int ch = blockIdx.x * blockDim.x + threadIdx.x;
  if (ch >= c) return;
  float g = dgamma[ch], b = dbeta[ch];
  for (int i = 0; i < n; ++i) {
    const double2 s = sums[(int64_t)i * c + ch];
    g += (float)s.y;
    b += (float)s.x;
  }
  dgamma[ch] = g;
  dbeta[ch] = b;
}

// dx may be dy (in place): each element of dy is read by the thread that then
// writes that element of dx, and by no other (hence no __restrict__ on the two).
template <bool RELU>
__global__ void grad_apply_kernel(const float* __restrict__ x, const float* dy, const float* __restrict__ mean,
                                  const float* __restrict__ rstd, const float* __restrict__ gamma,
                                  const float* __restrict__ beta, const float2* __restrict__ means, int c, int64_t V,
                                  Chunks ch, float* dx) {
  const int64_t plane = blockIdx.y;
  const int64_t v0 = blockIdx.x * ch.len, v1 = min(V, v0 + ch.len);
  const float mu = mean[plane], r = rstd[plane];
  const float k = gamma[plane % c] * r;
  const float2 a = RELU ? affine_of(gamma[plane % c], beta[plane % c], mu, r) : make_float2(0.f, 0.f);
  const float2 m = means[plane];
  const float* xp = x + plane * V;
  const float* dyp = dy + plane * V;
  float* dxp = dx + plane * V;
  auto f = [&](float xv, float dyv) {
    const float g = masked<RELU>(dyv, xv, a);
    return k * (g - m.x - (xv - mu) * r * m.y);
  };
  for_chunk(v0, v1, V % 4 == 0, [&](int64_t v, int kk) {
    if (kk == 4) {
      const float4 xv = load4(xp + v), dv = load4(dyp + v);
      *reinterpret_cast<float4*>(dxp + v) = make_float4(f(xv.x, dv.x), f(xv.y, dv.y), f(xv.z, dv.z), f(xv.w, dv.w));
    } else {
      dxp[v] = f(xp[v], dyp[v]);
    }
  });
}

void launch_apply(Context& ctx, const float* x, const float* mean, const float* rstd, const float* gamma,
                  const float* beta, float* y, int64_t planes, int c, int64_t V, const Chunks& ch, bool relu) {
  const dim3 grid((unsigned)ch.per_plane, (unsigned)planes);
  if (relu)
    apply_kernel<true><<<grid, kThreads, 0, stream_of(ctx)>>>(x, mean, rstd, gamma, beta, c, y, V, ch);
  else
    apply_kernel<false><<<grid, kThreads, 0, stream_of(ctx)>>>(x, mean, rstd, gamma, beta, c, y, V, ch);
  CMSEG_CUDA_LAUNCHED("instance_norm apply");
}

void check_planes(int64_t planes) {
  if (planes > 65535) fail("instance norm: n * c = ", planes, " exceeds the CUDA grid limit of 65535 planes");
}

}  // namespace

void instance_norm_forward(Context& ctx, const float* x, const float* gamma, const float* beta, float* y, float* mean,
                           float* rstd, int n, int c, int64_t V, bool relu) {
  ProfileScope prof_(ctx, "instance_norm_forward");
  const int64_t planes = (int64_t)n * c;
  if (!planes || !V) return;
  check_planes(planes);
  const Chunks ch = chunking(ctx, planes, V);
  cudaStream_t st = stream_of(ctx);
  Buffer<double2> partial(ctx, (size_t)planes * ch.per_plane);
  const dim3 grid((unsigned)ch.per_plane, (unsigned)planes);
  stats_kernel<<<grid, kThreads, 0, st>>>(x, V, ch, partial.data());
  CMSEG_CUDA_LAUNCHED("instance_norm stats");
  stats_finalize_kernel<<<blocks_for(planes, 128), 128, 0, st>>>(x, partial.data(), planes, V, ch.per_plane, mean,
                                                                  rstd);
  CMSEG_CUDA_LAUNCHED("instance_norm finalize");
  launch_apply(ctx, x, mean, rstd, gamma, beta, y, planes, c, V, ch, relu);
}

void instance_norm_apply(Context& ctx, const float* x, const float* mean, const float* rstd, const float* gamma,
                         const float* beta, float* y, int n, int c, int64_t V, bool relu) {
  ProfileScope prof_(ctx, "instance_norm_apply");
  const int64_t planes = (int64_t)n * c;
  if (!planes || !V) return;
  check_planes(planes);
  if (!gamma || !beta) fail("instance_norm_apply: needs gamma and beta");
  launch_apply(ctx, x, mean, rstd, gamma, beta, y, planes, c, V, chunking(ctx, planes, V), relu);
}

void instance_norm_backward(Context& ctx, const float* x, const float* mean, const float* rstd, const float* gamma,
                            const float* beta, const float* dy, float* dx, float* dgamma, float* dbeta, int n, int c,
                            int64_t V, bool relu) {
  ProfileScope prof_(ctx, "instance_norm_backward");
  const int64_t planes = (int64_t)n * c;
  if (!planes || !V) return;
  check_planes(planes);
  if (relu && !beta) fail("instance_norm_backward: the fused ReLU's mask needs beta");
  const Chunks ch = chunking(ctx, planes, V);
  cudaStream_t st = stream_of(ctx);
  Buffer<double2> partial(ctx, (size_t)planes * ch.per_plane), sums(ctx, (size_t)planes);
  Buffer<float2> means(ctx, (size_t)planes);
  const dim3 grid((unsigned)ch.per_plane, (unsigned)planes);
  if (relu)
    grad_sums_kernel<true><<<grid, kThreads, 0, st>>>(x, dy, mean, rstd, gamma, beta, c, V, ch, partial.data());
  else
    grad_sums_kernel<false><<<grid, kThreads, 0, st>>>(x, dy, mean, rstd, gamma, beta, c, V, ch, partial.data());
  CMSEG_CUDA_LAUNCHED("instance_norm grad sums");
  grad_finalize_kernel<<<blocks_for(planes, 128), 128, 0, st>>>(partial.data(), planes, ch.per_plane, V, sums.data(),
                                                                 means.data());
  CMSEG_CUDA_LAUNCHED("instance_norm grad finalize");
  param_grad_kernel<<<blocks_for(c, 128), 128, 0, st>>>(sums.data(), n, c, dgamma, dbeta);
  CMSEG_CUDA_LAUNCHED("instance_norm param grads");
  if (dx) {
    if (relu)
      grad_apply_kernel<true><<<grid, kThreads, 0, st>>>(x, dy, mean, rstd, gamma, beta, means.data(), c, V, ch, dx);
    else
      grad_apply_kernel<false><<<grid, kThreads, 0, st>>>(x, dy, mean, rstd, gamma, beta, means.data(), c, V, ch, dx);
    CMSEG_CUDA_LAUNCHED("instance_norm grad apply");
  }
}

namespace host {

void instance_norm_forward(Context& ctx, const float* x, const float* gamma, const float* beta, float* y, float* mean,
                           float* rstd, int n, int c, int64_t V, bool relu) {
  const size_t count = (size_t)n * c * V, planes = (size_t)n * c;
  Buffer<float> dx_(ctx, count), dy_(ctx, count), dg(ctx, (size_t)c), db(ctx, (size_t)c), dm(ctx, planes),
      dr(ctx, planes);
  dx_.upload(x), dg.upload(gamma), db.upload(beta);
  cuda::instance_norm_forward(ctx, dx_.data(), dg.data(), db.data(), dy_.data(), dm.data(), dr.data(), n, c, V, relu);
  dy_.download(y), dm.download(mean), dr.download(rstd);
}

void instance_norm_backward(Context& ctx, const float* x, const float* mean, const float* rstd, const float* gamma,
                            const float* beta, const float* dy, float* dx, float* dgamma, float* dbeta, int n, int c,
                            int64_t V, bool relu) {
  const size_t count = (size_t)n * c * V, planes = (size_t)n * c;
  Buffer<float> bx(ctx, count), bdy(ctx, count), bdx(ctx, dx ? count : 0), bm(ctx, planes), br(ctx, planes),
      bg(ctx, (size_t)c), bb(ctx, (size_t)c), bdg(ctx, (size_t)c), bdb(ctx, (size_t)c);
  bx.upload(x), bdy.upload(dy), bm.upload(mean), br.upload(rstd), bg.upload(gamma);
  if (beta) bb.upload(beta);
  bdg.upload(dgamma), bdb.upload(dbeta);  // accumulated into
  cuda::instance_norm_backward(ctx, bx.data(), bm.data(), br.data(), bg.data(), beta ? bb.data() : nullptr, bdy.data(),
                               dx ? bdx.data() : nullptr, bdg.data(), bdb.data(), n, c, V, relu);
  if (dx) bdx.download(dx);
  bdg.download(dgamma), bdb.download(dbeta);
}

}  // namespace host
}  // namespace cuda
}  // namespace cmseg
