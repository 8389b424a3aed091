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
#include <vector>

#include "cmseg/layers.hpp"
#include "cmseg/profile.hpp"
#include "cmseg/threads.hpp"

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
