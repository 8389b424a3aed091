// Plain cross-entropy on the consensus logits: the `naive` (trained on a fused
// label map) and `oracle` (trained on the expert label) methods of SPEC section 4.
#include <algorithm>
#include <cmath>
#include <vector>

#include "cmseg/loss.hpp"
#include "cmseg/threads.hpp"

namespace cmseg {
namespace {

// log-softmax of one pixel into lp, softmax into p.
inline void log_softmax(const float* z, int64_t V, int L, float* lp, float* p) {
  float m = z[0];
  for (int k = 1; k < L; ++k) m = std::max(m, z[k * V]);
  float s = 0.f;
  for (int k = 0; k < L; ++k) s += std::exp(z[k * V] - m);
  const float ls = std::log(s);
  for (int k = 0; k < L; ++k) {
    lp[k] = z[k * V] - m - ls;
    p[k] = std::exp(lp[k]);
  }
}

// Pixels whose soft row has a nonzero entry (labelled by someone).
int64_t soft_labelled(const float* target, int n, int L, int64_t V) {
  int64_t count = 0;
  for (int i = 0; i < n; ++i)
    for (int64_t v = 0; v < V; ++v) {
      bool any = false;
      for (int k = 0; k < L; ++k) any = any || target[((int64_t)i * L + k) * V + v] != 0.f;
      count += any;
    }
  return count;
}

}  // namespace

double ce_loss_hard(const float* logits, const uint8_t* labels, int n, int L, int64_t V, float* d_logits) {
  int64_t count = 0;
  for (int64_t i = 0; i < (int64_t)n * V; ++i) count += labels[i] != kUnlabelled;
  const double w = count ? 1.0 / count : 0.0;
  std::vector<double> part(static_parts(n), 0.0);
  parallel_for_static(n, [&](int64_t i, int thread) {
    float lp[kMaxClasses], p[kMaxClasses];
    const float* z = logits + i * L * V;
    for (int64_t v = 0; v < V; ++v) {
      const int c = labels[i * V + v];
      if (c == kUnlabelled) {
        if (d_logits)
          for (int k = 0; k < L; ++k) d_logits[i * L * V + k * V + v] = 0.f;
        continue;
      }
      log_softmax(z + v, V, L, lp, p);
      part[thread] -= lp[c];
      if (d_logits)
        for (int k = 0; k < L; ++k) d_logits[i * L * V + k * V + v] = (float)w * (p[k] - (k == c ? 1.f : 0.f));
    }
  });
  double s = 0;
  for (double x : part) s += x;
  return s * w;
}

double ce_loss_soft(const float* logits, const float* target, int n, int L, int64_t V, float* d_logits) {
  const int64_t count = soft_labelled(target, n, L, V);
  const double w = count ? 1.0 / count : 0.0;
  std::vector<double> part(static_parts(n), 0.0);
  parallel_for_static(n, [&](int64_t i, int thread) {
    float lp[kMaxClasses], p[kMaxClasses];
    const float* z = logits + i * L * V;
    const float* t = target + i * L * V;
    for (int64_t v = 0; v < V; ++v) {
      log_softmax(z + v, V, L, lp, p);
      float tsum = 0.f;
      for (int k = 0; k < L; ++k) {
        part[thread] -= (double)t[k * V + v] * lp[k];
        tsum += t[k * V + v];
      }
      if (d_logits)
        for (int k = 0; k < L; ++k) d_logits[i * L * V + k * V + v] = (float)w * (tsum * p[k] - t[k * V + v]);
    }
  });
  double s = 0;
  for (double x : part) s += x;
  return s * w;
}

}  // namespace cmseg
