// Softmax over channels at each position (consensus probabilities p(y|x)).
#include <algorithm>
#include <cmath>

#include "cmseg/layers.hpp"
#include "cmseg/threads.hpp"

namespace cmseg {

void softmax_forward(const float* z, float* p, int n, int c, int64_t V) {
  parallel_for(n, [&](int64_t i, int) {
    const float* zi = z + i * c * V;
    float* pi = p + i * c * V;
    for (int64_t v = 0; v < V; ++v) {
      float m = zi[v];
      for (int k = 1; k < c; ++k) m = std::max(m, zi[k * V + v]);
      float s = 0.f;
      for (int k = 0; k < c; ++k) s += (pi[k * V + v] = std::exp(zi[k * V + v] - m));
      const float inv = 1.f / s;
      for (int k = 0; k < c; ++k) pi[k * V + v] *= inv;
    }
  });
}

void softmax_backward(const float* p, const float* dp, float* dz, int n, int c, int64_t V) {
  // dz_j = p_j * (dp_j - sum_k p_k dp_k)
  parallel_for(n, [&](int64_t i, int) {
    const int64_t o = i * c * V;
    for (int64_t v = 0; v < V; ++v) {
      float dot = 0.f;
      for (int k = 0; k < c; ++k) dot += p[o + k * V + v] * dp[o + k * V + v];
      for (int k = 0; k < c; ++k) dz[o + k * V + v] = p[o + k * V + v] * (dp[o + k * V + v] - dot);
    }
  });
}

}  // namespace cmseg
