// Adam and AdamW (Kingma & Ba 2015; Loshchilov & Hutter 2019), bias-corrected.
// Adam adds weight_decay * w to the gradient (L2); AdamW decays the weights directly.
#include <algorithm>
#include <cmath>

#include "cmseg/model.hpp"
#include "cmseg/profile.hpp"
#include "cmseg/threads.hpp"

namespace cmseg {

void Model::apply_optimizer() {
  if (gpu_) return apply_optimizer_device();  // Device::Cuda (model_device.cpp)
  ProfileScope prof("adam");
  ++step;
  const OptimConfig& o = optim;
  const float bc1 = 1.f - std::pow(o.beta1, (float)step), bc2 = 1.f - std::pow(o.beta2, (float)step);
  const float step_size = o.lr / bc1, rbc2 = 1.f / std::sqrt(bc2);
  constexpr int64_t kChunk = 1 << 16;
  std::vector<std::pair<int, int64_t>> work;  // (param, chunk start)
  for (int i = 0; i < (int)params_.size(); ++i)
    for (int64_t s = 0; s < params_[i].numel(); s += kChunk) work.push_back({i, s});
  parallel_for((int64_t)work.size(), [&](int64_t item, int) {
    Param& p = params_[work[item].first];
    const int64_t b = work[item].second, e = std::min(p.numel(), b + kChunk);
    float* w = p.value.data();
    const float* g = p.grad.data();
    float* m = p.m.data();
    float* v = p.v.data();
    for (int64_t k = b; k < e; ++k) {
      float gk = g[k];
      if (o.kind == OptimKind::Adam)
        gk += o.weight_decay * w[k];
      else
        w[k] -= o.lr * o.weight_decay * w[k];
      m[k] = o.beta1 * m[k] + (1.f - o.beta1) * gk;
      v[k] = o.beta2 * v[k] + (1.f - o.beta2) * gk * gk;
      w[k] -= step_size * m[k] / (std::sqrt(v[k]) * rbc2 + o.eps);
    }
  });
}

}  // namespace cmseg
