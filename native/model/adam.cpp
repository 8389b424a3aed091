// Adam and AdamW (Kingma & Ba 2015; Loshchilov & Hutter 2019), bias-corrected.
// Adam adds weight_decay * w to the gradient (L2); AdamW decays the weights directly.
#include <algorithm>
#include <cmath>
#include <vector>

#include "cmseg/error.hpp"
#include "cmseg/model.hpp"
#include "cmseg/profile.hpp"
#include "cmseg/threads.hpp"

namespace cmseg {

// kLargestSquarable (model.hpp): past it Adam's second moment becomes Inf, the update 0, and
// the weights stop changing without a word, while the saved optimiser state (Inf) can no
// longer be loaded. PyTorch's float32 Adam does the same.
std::string unsquarable_gradient_message(const std::string& param, int64_t index, float grad) {
  // A NaN is no overflow: it comes from a model that diverged (weights so large that the
  // forward pass overflowed, e.g. a far too high learning rate), and "-nan: beyond 1.8e+19
  // its square overflows" sent the user looking for a large gradient.
  if (std::isnan(grad))
    return str("the gradient of ", param, "[", index, "] is NaN (not a number): the model diverged, its outputs or loss",
               " overflowed; lower the learning rate or lambda");
  return str("the gradient of ", param, "[", index, "] is ", grad, ": beyond ", kLargestSquarable,
             " its square overflows float32 and Adam would stop updating; lower the learning rate, lambda or the",
             " loss scale");
}

void Model::apply_optimizer() {
  if (gpu_) return apply_optimizer_device();  // Device::Cuda (model_device.cpp)
  ProfileScope prof("adam");
  check_gradients_squarable();
  ++step;
  const OptimConfig& o = optim;
  const float bc1 = 1.f - std::pow(o.beta1, (float)step), bc2 = 1.f - std::pow(o.beta2, (float)step);
  const float step_size = o.lr / bc1, rbc2 = 1.f / std::sqrt(bc2);
  constexpr int64_t kChunk = 1 << 16;
  std::vector<std::pair<int, int64_t>> work;  // (param, chunk start)
  for (int i = 0; i < (int)params_.size(); ++i)
    for (int64_t s = 0; s < params_[i].numel(); s += kChunk) work.push_back({i, s});
  // Scalars in locals and restrict pointers: otherwise every store to w, m or v
  // could alias the OptimConfig fields, which blocks vectorising the loop.
  const float beta1 = o.beta1, beta2 = o.beta2, eps = o.eps, lr = o.lr, wd = o.weight_decay;
  const bool decoupled = o.kind == OptimKind::AdamW;
  parallel_for((int64_t)work.size(), [&](int64_t item, int) {
    Param& p = params_[work[item].first];
    const int64_t b = work[item].second, e = std::min(p.numel(), b + kChunk);
    float* __restrict w = p.value.data();
    const float* __restrict g = p.grad.data();
    float* __restrict m = p.m.data();
    float* __restrict v = p.v.data();
    const float l2 = decoupled ? 0.f : wd;
    for (int64_t k = b; k < e; ++k) {
      // Adam: g + wd * w (L2 in the gradient); AdamW: w * (1 - lr * wd) first.
      const float gk = g[k] + l2 * w[k];
      const float wk = decoupled ? w[k] - lr * wd * w[k] : w[k];
      const float mk = beta1 * m[k] + (1.f - beta1) * gk;
      const float vk = beta2 * v[k] + (1.f - beta2) * gk * gk;
      m[k] = mk;
      v[k] = vk;
      w[k] = wk - step_size * mk / (std::sqrt(vk) * rbc2 + eps);
    }
  });
}

// Refuses the update, before anything changes, when a gradient (with Adam's L2 term) is not a
// finite number whose square fits a float (kLargestSquarable): the step fails with the
// parameter named instead of leaving Inf in the optimiser state.
void Model::check_gradients_squarable() const {
  const float l2 = optim.kind == OptimKind::AdamW ? 0.f : optim.weight_decay;
  // One entry per parameter, each written only by the task of that parameter.
  std::vector<int64_t> first_bad(params_.size(), -1);
  parallel_for((int64_t)params_.size(), [&](int64_t i, int) {
    const Param& p = params_[i];
    const float* g = p.grad.data();
    const float* w = p.value.data();
    for (int64_t k = 0; k < p.numel(); ++k)
      if (!(std::fabs(g[k] + l2 * w[k]) <= kLargestSquarable)) {
        first_bad[i] = k;
        return;
      }
  });
  for (size_t i = 0; i < params_.size(); ++i) {
    const int64_t k = first_bad[i];
    if (k < 0) continue;
    const Param& p = params_[i];
    throw Error(unsquarable_gradient_message(p.name, k, p.grad[k]) + " (the weights were left unchanged)");
  }
}

}  // namespace cmseg
