// Instance norm with affine parameters (SPEC section 2): per (n, c) over all
// positions, biased variance, eps 1e-5, no running statistics. Optionally fused
// with the ReLU that follows it in every block.
#include <cmath>
#include <vector>

#include "cmseg/layers.hpp"
#include "cmseg/profile.hpp"
#include "cmseg/threads.hpp"

namespace cmseg {

void instance_norm_forward(const float* x, const float* gamma, const float* beta, float* y, float* mean, float* rstd,
                           int n, int c, int64_t V, bool relu) {
  ProfileScope prof("instance_norm_forward");
  parallel_for((int64_t)n * c, [&](int64_t nc, int) {
    const float* xi = x + nc * V;
    float* yi = y + nc * V;
    double s = 0, ss = 0;
    for (int64_t v = 0; v < V; ++v) s += xi[v];
    const double mu = s / V;
    for (int64_t v = 0; v < V; ++v) {
      const double d = xi[v] - mu;
      ss += d * d;
    }
    const float r = (float)(1.0 / std::sqrt(ss / V + kInstanceNormEps));
    const int ch = (int)(nc % c);
    const float g = gamma[ch] * r, b = beta[ch] - (float)mu * gamma[ch] * r;
    if (relu)
      for (int64_t v = 0; v < V; ++v) {
        const float o = xi[v] * g + b;
        yi[v] = o > 0.f ? o : 0.f;
      }
    else
      for (int64_t v = 0; v < V; ++v) yi[v] = xi[v] * g + b;
    mean[nc] = (float)mu;
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
    double sum_dy = 0, sum_dy_xhat = 0;
    for (int64_t v = 0; v < V; ++v) {
      const float g = (!relu || yi[v] > 0.f) ? dyi[v] : 0.f;
      sum_dy += g;
      sum_dy_xhat += (double)g * ((xi[v] - mu) * r);
    }
    dg[nc] = sum_dy_xhat;
    db[nc] = sum_dy;
    if (dx) {
      const int ch = (int)(nc % c);
      const float k = gamma[ch] * r;
      const float m_dy = (float)(sum_dy / V), m_dyx = (float)(sum_dy_xhat / V);
      float* dxi = dx + nc * V;
      for (int64_t v = 0; v < V; ++v) {
        const float g = (!relu || yi[v] > 0.f) ? dyi[v] : 0.f;
        dxi[v] = k * (g - m_dy - (xi[v] - mu) * r * m_dyx);
      }
    }
  });
  for (int i = 0; i < n; ++i)
    for (int ch = 0; ch < c; ++ch) {
      dgamma[ch] += (float)dg[(size_t)i * c + ch];
      dbeta[ch] += (float)db[(size_t)i * c + ch];
    }
}

}  // namespace cmseg
