// Instance norm with affine parameters (SPEC section 2): per (n, c) over all
// positions, biased variance, eps 1e-5, no running statistics. Optionally fused
// with the ReLU that follows it in every block.
//
// The reductions run in kLanes independent float partial sums over blocks of
// kBlock positions, folded into doubles after each block: the compiler turns
// the fixed-width lane loops into vector code (a plain double accumulator would
// stay scalar), and the blocks keep float rounding error bounded for 3D maps of
// 10^5-10^6 positions.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "cmseg/error.hpp"
#include "cmseg/layers.hpp"
#include "cmseg/profile.hpp"
#include "cmseg/threads.hpp"
#include "vec8.hpp"

namespace cmseg {
namespace {

constexpr int kLanes = 16;
constexpr int64_t kBlock = 1024;

// Sum over v of f(v), with f returning float; vectorised lanes, double blocks.
template <class F>
double lane_sum(int64_t V, F f) {
  double total = 0;
  for (int64_t b0 = 0; b0 < V; b0 += kBlock) {
    const int64_t b1 = std::min(V, b0 + kBlock);
    float acc[kLanes] = {};
    int64_t v = b0;
    for (; v + kLanes <= b1; v += kLanes)
      for (int l = 0; l < kLanes; ++l) acc[l] += f(v + l);
    float tail = 0.f;
    for (; v < b1; ++v) tail += f(v);
    double s = tail;
    for (int l = 0; l < kLanes; ++l) s += acc[l];
    total += s;
  }
  return total;
}

// Two sums at once (the backward pass needs sum(dy) and sum(dy * xhat)).
template <class F>
void lane_sum2(int64_t V, F f, double& s1, double& s2) {
  s1 = s2 = 0;
  for (int64_t b0 = 0; b0 < V; b0 += kBlock) {
    const int64_t b1 = std::min(V, b0 + kBlock);
    float a1[kLanes] = {}, a2[kLanes] = {};
    int64_t v = b0;
    for (; v + kLanes <= b1; v += kLanes)
      for (int l = 0; l < kLanes; ++l) f(v + l, a1[l], a2[l]);
    float t1 = 0.f, t2 = 0.f;
    for (; v < b1; ++v) f(v, t1, t2);
    double b1s = t1, b2s = t2;
    for (int l = 0; l < kLanes; ++l) b1s += a1[l], b2s += a2[l];
    s1 += b1s, s2 += b2s;
  }
}

}  // namespace

void instance_norm_forward(const float* x, const float* gamma, const float* beta, float* y, float* mean, float* rstd,
                           int n, int c, int64_t V, bool relu) {
  ProfileScope prof("instance_norm_forward");
  parallel_for((int64_t)n * c, [&](int64_t nc, int) {
    const float* xi = x + nc * V;
    float* yi = y + nc * V;
    const double mu = lane_sum(V, [&](int64_t v) { return xi[v]; }) / V;
    // Two passes (mean, then squared deviations): no cancellation for maps whose
    // mean is large against their spread.
    const float muf = (float)mu;
    const double ss = lane_sum(V, [&](int64_t v) {
      const float d = xi[v] - muf;
      return d * d;
    });
    const float r = (float)(1.0 / std::sqrt(ss / V + kInstanceNormEps));
    const int ch = (int)(nc % c);
    const float g = gamma[ch] * r, b = beta[ch] - muf * gamma[ch] * r;
    if (relu)
      for (int64_t v = 0; v < V; ++v) yi[v] = std::max(xi[v] * g + b, 0.f);
    else
      for (int64_t v = 0; v < V; ++v) yi[v] = xi[v] * g + b;
    mean[nc] = muf;
    rstd[nc] = r;
  });
}

void instance_norm_backward(const float* x, const float* y, const float* mean, const float* rstd, const float* gamma,
                            const float* dy, float* dx, float* dgamma, float* dbeta, int n, int c, int64_t V,
                            bool relu) {
  ProfileScope prof("instance_norm_backward");
  // Per (n, c): dx = gamma * rstd * (dy - mean(dy) - xhat * mean(dy * xhat)),
  // with dy masked by y > 0 when the ReLU is fused.
  std::vector<double> dg((size_t)n * c), db((size_t)n * c);
  parallel_for((int64_t)n * c, [&](int64_t nc, int) {
    const float* xi = x + nc * V;
    const float* dyi = dy + nc * V;
    const float* yi = relu ? y + nc * V : nullptr;
    const float mu = mean[nc], r = rstd[nc];
    auto masked = [&](int64_t v) { return (!relu || yi[v] > 0.f) ? dyi[v] : 0.f; };
    double sum_dy, sum_dy_xhat;
    lane_sum2(
        V,
        [&](int64_t v, float& a, float& b) {
          const float g = masked(v);
          a += g;
          b += g * ((xi[v] - mu) * r);
        },
        sum_dy, sum_dy_xhat);
    dg[nc] = sum_dy_xhat;
    db[nc] = sum_dy;
    if (dx) {
      const int ch = (int)(nc % c);
      const float k = gamma[ch] * r;
      const float m_dy = (float)(sum_dy / V), m_dyx = (float)(sum_dy_xhat / V);
      float* dxi = dx + nc * V;
      for (int64_t v = 0; v < V; ++v) dxi[v] = k * (masked(v) - m_dy - (xi[v] - mu) * r * m_dyx);
    }
  });
  for (int i = 0; i < n; ++i)
    for (int ch = 0; ch < c; ++ch) {
      dgamma[ch] += (float)dg[(size_t)i * c + ch];
      dbeta[ch] += (float)db[(size_t)i * c + ch];
    }
}

}  // namespace cmseg

// ---- Channel-blocked layout ([n][c / B][V][B]): each vector lane is one
// channel, so a channel's statistics are lane-wise sums with no horizontal
// reduction. The positions of one (image, channel block) item are split into
// parts, so that a batch of one image with few channel blocks still keeps
// every thread busy; the parts' double sums are added in a fixed order.
// Written with GCC/Clang vector extensions (8 floats, one AVX register; a
// block of 16 is two): the compiler's own vectorisation of the lane loops
// left them 1.5-1.8x slower than the plain layout's code.
namespace cmseg {
namespace {

using vec::load8;
using vec::splat;
using vec::store8;
using vec::v8;

// Positions summed in float per lane before the sums fold into doubles. Each lane is one
// channel here, so a lane adds every position (the plain layout's 16 lanes share a row:
// kBlock / 16 each). At kBlock the float sums lost the backward's small means to rounding:
// a 3D model's gradients came out 0.4% off the plain layout's where no FMA contracts the
// products (a build without -march=native); 128 keeps them within 3e-6 (test_layers:
// instance_norm_blocked_sums_that_cancel reproduces the error on one norm).
constexpr int64_t kLaneBlock = 128;

// W vectors of 8 lanes: one block's worth of per-channel values.
template <int W>
struct Lanes {
  v8 v[W];
  static Lanes zero() {
    Lanes l;
    for (int w = 0; w < W; ++w) l.v[w] = splat(0.f);
    return l;
  }
  static Lanes of(const float* p) {  // B = 8 W floats
    Lanes l;
    for (int w = 0; w < W; ++w) l.v[w] = load8(p + 8 * w);
    return l;
  }
  void add_to(double* out) const {
    for (int w = 0; w < W; ++w)
      for (int k = 0; k < 8; ++k) out[8 * w + k] += v[w][k];
  }
};

int parts_for(int64_t items, int64_t V) {
  const int64_t want = 4 * (int64_t)num_threads();
  const int64_t p = std::min<int64_t>((want + items - 1) / items, std::max<int64_t>(1, V / 4096));
  return (int)std::max<int64_t>(1, p);
}

struct Split {
  int64_t items, V;
  int parts;
  int64_t begin(int p) const { return V * p / parts; }
  int64_t end(int p) const { return V * (p + 1) / parts; }
};

// out += per-lane sums over positions [v0, v1) of f(v) (a v8 for each of the
// W vectors): float sums in two interleaved accumulators, folded into doubles
// every kLaneBlock positions. f(v, w) returns vector w of position v.
template <int W, class F>
void lane_sums(int64_t v0, int64_t v1, F f, double* out) {
  for (int64_t b0 = v0; b0 < v1; b0 += kLaneBlock) {
    const int64_t b1 = std::min(v1, b0 + kLaneBlock);
    Lanes<W> a0 = Lanes<W>::zero(), a1 = Lanes<W>::zero();
    int64_t v = b0;
    for (; v + 2 <= b1; v += 2)
      for (int w = 0; w < W; ++w) a0.v[w] += f(v, w), a1.v[w] += f(v + 1, w);
    for (; v < b1; ++v)
      for (int w = 0; w < W; ++w) a0.v[w] += f(v, w);
    for (int w = 0; w < W; ++w) a0.v[w] += a1.v[w];
    a0.add_to(out);
  }
}

// Per-item, per-lane totals of the parts' sums (added in part order).
template <int B>
void fold_parts(const Split& sp, const std::vector<double>& part_sums, std::vector<double>& total) {
  total.assign((size_t)sp.items * B, 0.0);
  for (int64_t it = 0; it < sp.items; ++it)
    for (int p = 0; p < sp.parts; ++p)
      for (int l = 0; l < B; ++l) total[it * B + l] += part_sums[((size_t)it * sp.parts + p) * B + l];
}

// fn(item, part, index of (item, part)) for every part of every item, in parallel.
template <class F>
void each_part(const Split& sp, F fn) {
  parallel_for(sp.items * sp.parts, [&](int64_t t, int) { fn(t / sp.parts, (int)(t % sp.parts), t); });
}

template <int W>
void forward_blocked(const float* x, const float* gamma, const float* beta, float* y, float* mean, float* rstd, int n,
                     int c, int64_t V, bool relu) {
  constexpr int B = 8 * W;
  const int cb = c / B;
  const Split sp{(int64_t)n * cb, V, parts_for((int64_t)n * cb, V)};
  std::vector<double> part((size_t)sp.items * sp.parts * B), total;
  // Two passes (mean, then squared deviations): no cancellation for maps whose
  // mean is large against their spread.
  each_part(sp, [&](int64_t it, int p, int64_t t) {
    const float* xi = x + it * V * B;
    lane_sums<W>(sp.begin(p), sp.end(p), [&](int64_t v, int w) { return load8(xi + v * B + 8 * w); }, &part[t * B]);
  });
  fold_parts<B>(sp, part, total);
  std::vector<float> mu(total.size());
  for (size_t k = 0; k < total.size(); ++k) mu[k] = (float)(total[k] / V);
  std::fill(part.begin(), part.end(), 0.0);
  each_part(sp, [&](int64_t it, int p, int64_t t) {
    const float* xi = x + it * V * B;
    const Lanes<W> m = Lanes<W>::of(&mu[it * B]);
    lane_sums<W>(sp.begin(p), sp.end(p),
                 [&](int64_t v, int w) {
                   const v8 d = load8(xi + v * B + 8 * w) - m.v[w];
                   return d * d;
                 },
                 &part[t * B]);
  });
  fold_parts<B>(sp, part, total);
  std::vector<float> scale(total.size()), shift(total.size());
  for (int64_t it = 0; it < sp.items; ++it)
    for (int l = 0; l < B; ++l) {
      const int64_t k = it * B + l;  // == image * c + channel
      const int ch = (int)((it % cb) * B + l);
      const float r = (float)(1.0 / std::sqrt(total[k] / V + kInstanceNormEps));
      scale[k] = gamma[ch] * r, shift[k] = beta[ch] - mu[k] * gamma[ch] * r;
      mean[k] = mu[k], rstd[k] = r;
    }
  each_part(sp, [&](int64_t it, int p, int64_t) {
    const float* xi = x + it * V * B;
    float* yi = y + it * V * B;
    const Lanes<W> g = Lanes<W>::of(&scale[it * B]), b = Lanes<W>::of(&shift[it * B]);
    for (int64_t v = sp.begin(p); v < sp.end(p); ++v)
      for (int w = 0; w < W; ++w) {
        const v8 t = load8(xi + v * B + 8 * w) * g.v[w] + b.v[w];
        store8(yi + v * B + 8 * w, relu ? vec::max0(t) : t);
      }
  });
}

template <int W>
void backward_blocked(const float* x, const float* y, const float* mean, const float* rstd, const float* gamma,
                      const float* dy, float* dx, float* dgamma, float* dbeta, int n, int c, int64_t V, bool relu) {
  constexpr int B = 8 * W;
  const int cb = c / B;
  const Split sp{(int64_t)n * cb, V, parts_for((int64_t)n * cb, V)};
  std::vector<double> part_dy((size_t)sp.items * sp.parts * B), part_dyx(part_dy.size()), sum_dy, sum_dyx;
  // dy masked by y > 0 when the ReLU is fused.
  auto masked = [relu](const float* yi, const float* dyi, int64_t e) {
    const v8 g = load8(dyi + e);
    return relu ? (load8(yi + e) > 0.f ? g : splat(0.f)) : g;
  };
  each_part(sp, [&](int64_t it, int p, int64_t t) {
    const int64_t o = it * V * B;
    const float *xi = x + o, *yi = y + o, *dyi = dy + o;
    const Lanes<W> m = Lanes<W>::of(mean + it * B), r = Lanes<W>::of(rstd + it * B);
    for (int64_t b0 = sp.begin(p); b0 < sp.end(p); b0 += kLaneBlock) {
      const int64_t b1 = std::min(sp.end(p), b0 + kLaneBlock);
      Lanes<W> s1 = Lanes<W>::zero(), s2 = Lanes<W>::zero();
      for (int64_t v = b0; v < b1; ++v)
        for (int w = 0; w < W; ++w) {
          const int64_t e = v * B + 8 * w;
          const v8 g = masked(yi, dyi, e);
          s1.v[w] += g;
          s2.v[w] += g * ((load8(xi + e) - m.v[w]) * r.v[w]);
        }
      s1.add_to(&part_dy[t * B]);
      s2.add_to(&part_dyx[t * B]);
    }
  });
  fold_parts<B>(sp, part_dy, sum_dy);
  fold_parts<B>(sp, part_dyx, sum_dyx);
  if (dx) {
    std::vector<float> k(sum_dy.size()), m_dy(sum_dy.size()), m_dyx(sum_dy.size());
    for (int64_t it = 0; it < sp.items; ++it)
      for (int l = 0; l < B; ++l) {
        const int64_t q = it * B + l;
        k[q] = gamma[(it % cb) * B + l] * rstd[q];
        m_dy[q] = (float)(sum_dy[q] / V), m_dyx[q] = (float)(sum_dyx[q] / V);
      }
    // dx = gamma * rstd * (dy - mean(dy) - xhat * mean(dy * xhat))
    each_part(sp, [&](int64_t it, int p, int64_t) {
      const int64_t o = it * V * B;
      const float *xi = x + o, *yi = y + o, *dyi = dy + o;
      float* dxi = dx + o;
      const Lanes<W> m = Lanes<W>::of(mean + it * B), r = Lanes<W>::of(rstd + it * B);
      const Lanes<W> kk = Lanes<W>::of(&k[it * B]), md = Lanes<W>::of(&m_dy[it * B]),
                     mx = Lanes<W>::of(&m_dyx[it * B]);
      for (int64_t v = sp.begin(p); v < sp.end(p); ++v)
        for (int w = 0; w < W; ++w) {
          const int64_t e = v * B + 8 * w;
          const v8 xhat = (load8(xi + e) - m.v[w]) * r.v[w];
          store8(dxi + e, kk.v[w] * (masked(yi, dyi, e) - md.v[w] - xhat * mx.v[w]));
        }
    });
  }
  for (int64_t it = 0; it < sp.items; ++it)
    for (int l = 0; l < B; ++l) {
      const int ch = (int)((it % cb) * B + l);
      dgamma[ch] += (float)sum_dyx[it * B + l];
      dbeta[ch] += (float)sum_dy[it * B + l];
    }
}

void check_block(int c, int block) {
  if ((block != 8 && block != 16) || c % block)
    fail("instance norm: channel block ", block, " is not 8 or 16 or does not divide ", c, " channels");
}

}  // namespace

void instance_norm_forward_blocked(const float* x, const float* gamma, const float* beta, float* y, float* mean,
                                   float* rstd, int n, int c, int64_t V, bool relu, int block) {
  ProfileScope prof("instance_norm_forward");
  check_block(c, block);
  if (block == 8) return forward_blocked<1>(x, gamma, beta, y, mean, rstd, n, c, V, relu);
  forward_blocked<2>(x, gamma, beta, y, mean, rstd, n, c, V, relu);
}

void instance_norm_backward_blocked(const float* x, const float* y, const float* mean, const float* rstd,
                                    const float* gamma, const float* dy, float* dx, float* dgamma, float* dbeta, int n,
                                    int c, int64_t V, bool relu, int block) {
  ProfileScope prof("instance_norm_backward");
  check_block(c, block);
  if (block == 8) return backward_blocked<1>(x, y, mean, rstd, gamma, dy, dx, dgamma, dbeta, n, c, V, relu);
  backward_blocked<2>(x, y, mean, rstd, gamma, dy, dx, dgamma, dbeta, n, c, V, relu);
}

}  // namespace cmseg
