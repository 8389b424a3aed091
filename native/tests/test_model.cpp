// The U-Net model: SPEC parameter names and shapes, whole-model gradients
// against central finite differences (every CM mode, 2D and 3D, R = 2, some
// unlabelled pixels, one annotator absent from one image), warm-up sign, Adam,
// overfitting a tiny batch, prediction outputs, forward-only runs (evaluate,
// predict) bit-identical to training's forward, and input validation.
//
// Whole-model gradient tolerance: |analytic - numeric| <= 1e-3 + 5e-2 |numeric|
// with float32 central differences of step 5e-4 on a sample of entries per
// parameter (gradients here are ~1e-2; float32 rounding of the loss alone puts
// ~1e-4 of noise on each difference). ReLU and max-pool kinks can make an individual finite difference
// wrong, so an entry also passes when it matches a one-sided difference, and a
// tensor passes when at least 90% of its sampled entries agree (a wrong
// backward fails nearly all of them).
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>

#include "check.hpp"
#include "cmseg/backend.hpp"
#include "cmseg/error.hpp"
#include "cmseg/gpu_support.hpp"
#include "cmseg/model.hpp"
#include "cmseg/onednn.hpp"
#include "cmseg/threads.hpp"

#if defined(__linux__)
#include <sys/resource.h>
#include <unistd.h>

#include <atomic>
#include <fstream>
#endif

using namespace cmseg;

namespace {

struct Data {
  int n;
  Spatial s;
  std::vector<float> images;
  std::vector<std::vector<uint8_t>> labels;
  std::vector<uint8_t> present;
  Batch batch() const {
    Batch b;
    b.n = n, b.s = s, b.images = images.data();
    for (auto& l : labels) b.labels.push_back(l.data());
    b.present = present.empty() ? nullptr : present.data();
    return b;
  }
};

Data make_data(const ModelConfig& c, int n, Spatial s, uint32_t seed) {
  Data d{n, s, check::random_vector((size_t)n * c.in_channels * s.size(), seed), {}, {}};
  std::mt19937 g(seed + 1);
  for (int r = 0; r < c.annotators; ++r) {
    std::vector<uint8_t> lab((size_t)n * s.size());
    for (auto& x : lab) x = g() % 7 == 0 ? kUnlabelled : (uint8_t)(g() % c.classes);
    d.labels.push_back(lab);
  }
  d.present.assign((size_t)n * c.annotators, 1);
  if (n > 1) d.present[1 * c.annotators + 0] = 0;
  return d;
}

// The whole tensor's gradient g against the loss's slope along it: moving every entry by
// h * g / |g| changes the loss at the rate |g|. Entry by entry, a tensor whose gradients
// are ~1e-3 sits under the float32 noise of the differences above (a bottleneck's
// gradient twice too large would pass); along g the slope sums every entry's share.
void directional_check(Model& m, const Batch& b, Param& p, const ModelConfig& c) {
  double norm = 0;
  for (int64_t i = 0; i < p.numel(); ++i) norm += (double)p.grad[i] * p.grad[i];
  norm = std::sqrt(norm);
  if (norm == 0) return;  // e.g. a bias under instance norm
  const std::vector<float> keep = p.value;
  // Small enough that few ReLU / max-pool kinks are crossed (at 1e-2, enc.0's norm
  // parameters, which shift every full-resolution voxel of a channel, were 20-30% off),
  // large enough that float32 rounding of the loss stays ~1e-4 of the slope.
  const double h = 1e-3;
  auto loss_at = [&](double t) {
    for (int64_t i = 0; i < p.numel(); ++i) p.value[i] = (float)(keep[i] + t * p.grad[i] / norm);
    return m.evaluate(b).loss;
  };
  const double up = loss_at(h), mid = loss_at(0), down = loss_at(-h);
  p.value = keep;
  const double central = (up - down) / (2 * h), right = (up - mid) / h, left = (mid - down) / h;
  const double tol = 0.1;  // a gradient off by a factor (the worry above) is off by 50% or more
  if (!check::close(central, norm, tol, 1e-5) && !check::close(right, norm, tol, 1e-5) &&
      !check::close(left, norm, tol, 1e-5)) {
    std::printf("  %s %dD: %s: |g| %.6e but the loss's slope along g is %.6e (left %.6e, right %.6e)\n",
                cm_mode_name(c.cm_mode), c.ndim, p.name.c_str(), norm, central, left, right);
    ++check::failures();
  }
}

void model_gradient_case(ModelConfig c, Spatial s) {
  Model m(c);
  m.loss.lambda = 0.05f;
  Data d = make_data(c, 2, s, 1234 + c.ndim * 10 + (int)c.cm_mode);
  Batch b = d.batch();
  m.compute_gradients(b);
  std::mt19937 g(99);
  const float h = 5e-4f;
  for (auto& p : m.params()) {
    const int samples = std::min<int64_t>(p.numel(), 12);
    int ok = 0;
    std::vector<std::string> msgs;
    for (int k = 0; k < samples; ++k) {
      const int64_t i = samples == p.numel() ? k : g() % p.numel();
      const float keep = p.value[i];
      const double mid = m.evaluate(b).loss;
      p.value[i] = keep + h;
      const double up = m.evaluate(b).loss;
      p.value[i] = keep - h;
      const double down = m.evaluate(b).loss;
      p.value[i] = keep;
      // At a ReLU / max-pool kink the loss has two one-sided derivatives and the
      // analytic gradient is one of them: accept the central or either one-sided difference.
      const double central = (up - down) / (2 * h), right = (up - mid) / h, left = (mid - down) / h;
      if (check::close(p.grad[i], central, 5e-2, 1e-3) || check::close(p.grad[i], right, 5e-2, 1e-3) ||
          check::close(p.grad[i], left, 5e-2, 1e-3))
        ++ok;
      else
        msgs.push_back(str(p.name, "[", i, "]: analytic ", p.grad[i], " central ", central, " left ", left, " right ", right));
    }
    if (ok < 0.9 * samples) {
      std::printf("  %s %dD: %s: %d/%d agree\n", cm_mode_name(c.cm_mode), c.ndim, p.name.c_str(), ok, samples);
      for (size_t k = 0; k < std::min<size_t>(3, msgs.size()); ++k) std::printf("    %s\n", msgs[k].c_str());
      ++check::failures();
    }
    directional_check(m, b, p, c);
  }
}

ModelConfig small(int ndim, CmMode mode) {
  ModelConfig c;
  c.ndim = ndim, c.in_channels = 2, c.classes = 3, c.annotators = 2, c.depth = 2, c.base = 3, c.cm_mode = mode;
  c.cm_rank = 2, c.seed = 5;
  return c;
}

}  // namespace

TEST(parameter_names_and_shapes_follow_spec) {
  ModelConfig c;
  c.ndim = 3, c.in_channels = 4, c.classes = 4, c.annotators = 2, c.depth = 3, c.base = 8;
  Model m(c);
  std::map<std::string, std::vector<int64_t>> want = {
      {"enc.0.conv1.weight", {8, 4, 3, 3, 3}}, {"enc.0.norm1.weight", {8}},   {"enc.0.norm2.bias", {8}},
      {"enc.2.conv2.weight", {32, 32, 3, 3, 3}}, {"up.0.weight", {32, 16, 2, 2, 2}}, {"up.0.bias", {16}},
      {"dec.0.conv1.weight", {16, 32, 3, 3, 3}}, {"up.1.weight", {16, 8, 2, 2, 2}}, {"dec.1.conv2.weight", {8, 8, 3, 3, 3}},
      {"seg.weight", {4, 8, 1, 1, 1}},          {"seg.bias", {4}},             {"cm.1.weight", {16, 8, 1, 1, 1}},
      {"cm.0.bias", {16}}};
  for (auto& [name, shape] : want) {
    Param* p = m.find(name);
    CHECK(p != nullptr);
    if (p) CHECK(p->shape == shape);
  }
  // 3 encoder blocks + 2 decoder blocks (6 tensors each) + 2 up (2 each) + seg (2) + 2 cm heads (2 each).
  CHECK(m.params().size() == 5 * 6 + 4 + 2 + 4);
  c.cm_mode = CmMode::Global;
  c.ndim = 2;
  Model g(c);
  CHECK(g.find("gcm.1") && g.find("gcm.1")->shape == std::vector<int64_t>({4, 4}));
  CHECK(g.find("cm.0.weight") == nullptr);
  CHECK(g.find("enc.0.conv1.weight")->shape == std::vector<int64_t>({8, 4, 3, 3}));
  c.cm_mode = CmMode::LowRank, c.cm_rank = 2, c.cm_head_blocks = 1;
  Model l(c);
  CHECK(l.find("cm.0.weight")->shape == std::vector<int64_t>({2 * 4 * 2 + 1, 8, 1, 1}));
  CHECK(l.find("cmblock.1.0.conv2.weight") != nullptr);
}

TEST(identity_init_gives_diagonal_08) {
  for (CmMode mode : {CmMode::Full, CmMode::LowRank, CmMode::Global}) {
    ModelConfig c = small(2, mode);
    Model m(c);
    Data d = make_data(c, 1, {1, 4, 4}, 3);
    std::vector<float> probs(3 * 16), cms(2 * 9 * 16), q(2 * 3 * 16);
    m.predict(d.images.data(), 1, d.s, probs.data(), cms.data(), q.data());
    for (int r = 0; r < 2; ++r)
      for (int v = 0; v < 16; ++v) {
        for (int j = 0; j < 3; ++j) {
          double col = 0;
          for (int i = 0; i < 3; ++i) col += cms[((size_t)r * 9 + i * 3 + j) * 16 + v];
          CHECK_CLOSE(col, 1.0, 1e-5, 0);
          CHECK_CLOSE(cms[((size_t)r * 9 + j * 3 + j) * 16 + v], 0.8, 0, 0.05);
        }
        // q = A p
        for (int i = 0; i < 3; ++i) {
          double want = 0;
          for (int j = 0; j < 3; ++j) want += cms[((size_t)r * 9 + i * 3 + j) * 16 + v] * probs[j * 16 + v];
          CHECK_CLOSE(q[((size_t)r * 3 + i) * 16 + v], want, 1e-5, 1e-6);
        }
      }
  }
}

// cmInit 'uniform': no bias towards the identity. Global CMs start exactly uniform
// (raw 0 everywhere); the pixel-wise heads start from their default random
// initialisation, so full CMs are columns of about 1/L each, with no diagonal lead, and
// low-rank ones lead only by their own softplus(s) term.
TEST(uniform_init_has_no_diagonal_bias) {
  for (CmMode mode : {CmMode::Full, CmMode::LowRank, CmMode::Global}) {
    ModelConfig c = small(2, mode);
    c.cm_init = CmInit::Uniform;
    Model m(c);
    Data d = make_data(c, 1, {1, 4, 4}, 3);
    std::vector<float> probs(3 * 16), cms(2 * 9 * 16), q(2 * 3 * 16);
    m.predict(d.images.data(), 1, d.s, probs.data(), cms.data(), q.data());
    double diag = 0, off = 0;
    for (int r = 0; r < 2; ++r)
      for (int v = 0; v < 16; ++v)
        for (int j = 0; j < 3; ++j) {
          double col = 0;
          for (int i = 0; i < 3; ++i) {
            const double a = cms[((size_t)r * 9 + i * 3 + j) * 16 + v];
            col += a;
            (i == j ? diag : off) += a;
            if (mode == CmMode::Global) CHECK_CLOSE(a, 1.0 / 3, 1e-6, 0);
          }
          CHECK_CLOSE(col, 1.0, 1e-5, 0);
        }
    diag /= 2 * 16 * 3, off /= 2 * 16 * 6;
    std::printf("  uniform init, %s: mean diagonal %.3f, mean off-diagonal %.3f\n", cm_mode_name(mode), diag, off);
    if (mode == CmMode::LowRank) {
      // softplus(s) [i == j] is part of the parametrisation: a lead, well short of 0.8.
      CHECK(diag > 1.0 / 3 && diag < 0.6);
    } else {
      CHECK_CLOSE(diag, 1.0 / 3, 0, 0.1);
      CHECK_CLOSE(off, 1.0 / 3, 0, 0.05);
    }
  }
}

TEST(model_gradients_full_2d) { model_gradient_case(small(2, CmMode::Full), {1, 8, 8}); }
TEST(model_gradients_lowrank_2d) { model_gradient_case(small(2, CmMode::LowRank), {1, 8, 12}); }
TEST(model_gradients_global_2d) { model_gradient_case(small(2, CmMode::Global), {1, 12, 8}); }
TEST(model_gradients_full_3d) { model_gradient_case(small(3, CmMode::Full), {4, 8, 8}); }
TEST(model_gradients_lowrank_3d) { model_gradient_case(small(3, CmMode::LowRank), {4, 4, 8}); }
TEST(model_gradients_global_3d) { model_gradient_case(small(3, CmMode::Global), {8, 4, 4}); }
TEST(model_gradients_cm_head_blocks) {
  ModelConfig c = small(2, CmMode::Full);
  c.cm_head_blocks = 1;
  model_gradient_case(c, {1, 8, 8});
}

TEST(plain_ce_target_gradients) {
  ModelConfig c = small(2, CmMode::Full);
  Model m(c);
  Data d = make_data(c, 2, {1, 8, 8}, 77);
  Batch b = d.batch();
  b.target = d.labels[1].data();
  m.compute_gradients(b);
  Param& p = *m.find("enc.0.conv1.weight");
  int ok = 0;
  for (int i = 0; i < 10; ++i) {
    const float keep = p.value[i], h = 5e-4f;
    const double mid = m.evaluate(b).loss;
    p.value[i] = keep + h;
    const double up = m.evaluate(b).loss;
    p.value[i] = keep - h;
    const double down = m.evaluate(b).loss;
    p.value[i] = keep;
    ok += check::close(p.grad[i], (up - down) / (2 * h), 5e-2, 1e-3) || check::close(p.grad[i], (up - mid) / h, 5e-2, 1e-3) ||
          check::close(p.grad[i], (mid - down) / h, 5e-2, 1e-3);
  }
  CHECK(ok >= 9);
  CHECK(m.find("cm.0.weight")->grad[0] == 0.f);  // heads unused by plain CE
}

TEST(trace_warmup_sign_switch) {
  ModelConfig c = small(2, CmMode::Global);
  Model m(c);
  m.loss.lambda = 0.1f, m.loss.lambda_warmup = 0.2f, m.loss.warmup_steps = 2;
  Data d = make_data(c, 1, {1, 4, 4}, 8);
  Batch b = d.batch();
  std::vector<float> tw;
  for (int i = 0; i < 4; ++i) tw.push_back(m.train_step(b).trace_weight);
  CHECK(tw[0] == -0.2f && tw[1] == -0.2f && tw[2] == 0.1f && tw[3] == 0.1f);
  CHECK(m.step == 4);
  // loss = sum CE + lambda_eff * sum T
  StepResult r = m.evaluate(b);
  CHECK_CLOSE(r.loss, r.ce[0] + r.ce[1] + 0.1 * (r.trace[0] + r.trace[1]), 1e-6, 1e-7);
}

TEST(adam_and_adamw_first_steps_by_hand) {
  ModelConfig c = small(2, CmMode::Global);
  Model m(c);
  Param& p = *m.find("gcm.0");
  const float w0 = p.value[0];
  for (auto& q : m.params()) std::fill(q.grad.begin(), q.grad.end(), 0.f);
  p.grad[0] = 0.5f;
  m.optim.lr = 0.1f, m.optim.eps = 0.f;
  m.apply_optimizer();
  // Step 1: m = 0.05, v = 0.00025; corrected m/sqrt(v) = 1 -> w -= lr.
  CHECK_CLOSE(p.value[0], w0 - 0.1f, 1e-6, 1e-6);
  // AdamW with decay 0.5: w <- w (1 - lr * wd) then the Adam step.
  Model m2(c);
  Param& p2 = *m2.find("gcm.0");
  const float v0 = p2.value[0];
  for (auto& q : m2.params()) std::fill(q.grad.begin(), q.grad.end(), 0.f);
  p2.grad[0] = -2.f;
  m2.optim.kind = OptimKind::AdamW, m2.optim.lr = 0.1f, m2.optim.weight_decay = 0.5f, m2.optim.eps = 0.f;
  m2.apply_optimizer();
  CHECK_CLOSE(p2.value[0], v0 * (1 - 0.05f) + 0.1f, 1e-6, 1e-6);
}

// Two Adam steps with other betas, L2 decay and different gradients: from the second step
// on, the betas and the bias corrections shape the step (the first is lr * sign(g)).
TEST(adam_two_steps_by_hand) {
  Model m(small(2, CmMode::Global));
  Param& p = *m.find("gcm.0");
  const double w0 = p.value[0];
  const double lr = 0.1, b1 = 0.8, b2 = 0.9, eps = 1e-3, wd = 0.25;
  m.optim.lr = (float)lr, m.optim.beta1 = (float)b1, m.optim.beta2 = (float)b2, m.optim.eps = (float)eps;
  m.optim.weight_decay = (float)wd;  // Adam: wd * w added to the gradient
  double w = w0, mom = 0, vel = 0;
  int t = 0;
  for (double g : {0.5, -1.5}) {
    for (auto& q : m.params()) std::fill(q.grad.begin(), q.grad.end(), 0.f);
    p.grad[0] = (float)g;
    m.apply_optimizer();
    const double ge = g + wd * w;
    ++t;
    mom = b1 * mom + (1 - b1) * ge;
    vel = b2 * vel + (1 - b2) * ge * ge;
    w -= lr * (mom / (1 - std::pow(b1, t))) / (std::sqrt(vel / (1 - std::pow(b2, t))) + eps);
    CHECK_CLOSE(p.value[0], w, 1e-5, 1e-6);
  }
  CHECK(std::fabs(w - w0) > 0.05);  // the steps moved it
}

static double overfit(ModelConfig c, Spatial s, int steps) {
  Model m(c);
  m.optim.lr = 1e-2f;
  m.loss.lambda = 0.01f;
  // One fixed batch: two noisy annotators of a blob.
  Data d = make_data(c, 2, s, 4);
  for (int r = 0; r < c.annotators; ++r)
    for (int64_t v = 0; v < (int64_t)2 * s.size(); ++v) d.labels[r][v] = (d.images[v] > 0.2f) ? 1 : 0;
  Batch b = d.batch();
  const double first = m.train_step(b).loss;
  double last = first;
  for (int i = 1; i < steps; ++i) last = m.train_step(b).loss;
  std::printf("  overfit %dD: loss %.4f -> %.4f after %d steps\n", c.ndim, first, last, steps);
  return last / first;
}

TEST(overfits_tiny_batch_2d) {
  ModelConfig c = small(2, CmMode::Full);
  c.base = 8, c.in_channels = 2;
  CHECK(overfit(c, {1, 16, 16}, 60) < 0.3);
}

TEST(overfits_tiny_batch_3d) {
  ModelConfig c = small(3, CmMode::Full);
  c.base = 4;
  CHECK(overfit(c, {8, 8, 8}, 80) < 0.3);
}

namespace {

// ---- Forward-only runs. evaluate() and predict() run the training forward into
// shared scratch instead of the backward pass's caches (native/model/unet.cpp):
// the same arithmetic, so their results must match training's to the bit.

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

struct Prediction {
  std::vector<float> probs, cms, annotator_probs;
  bool operator==(const Prediction& o) const {
    return same_bits(probs, o.probs) && same_bits(cms, o.cms) && same_bits(annotator_probs, o.annotator_probs);
  }
};

Prediction predict_all(Model& m, const Data& d) {
  const ModelConfig& c = m.config();
  const int64_t V = d.s.size();
  Prediction p;
  p.probs.resize((size_t)d.n * c.classes * V);
  p.cms.resize((size_t)d.n * c.annotators * c.classes * c.classes * V);
  p.annotator_probs.resize((size_t)d.n * c.annotators * c.classes * V);
  m.predict(d.images.data(), d.n, d.s, p.probs.data(), p.cms.data(), p.annotator_probs.data());
  return p;
}

bool same_result(const StepResult& a, const StepResult& b) {
  return a.loss == b.loss && a.ce == b.ce && a.trace == b.trace && a.trace_weight == b.trace_weight;
}

// The configurations below: plain trunk 2D and 3D, CM-head blocks, and oneDNN's
// channel-blocked trunk where this build and machine have it (base 16 is a
// multiple of either block, 8 or 16).
std::vector<std::pair<ModelConfig, Spatial>> forward_only_cases() {
  std::vector<std::pair<ModelConfig, Spatial>> cases;
  cases.push_back({small(3, CmMode::Full), {4, 8, 8}});
  cases.push_back({small(2, CmMode::LowRank), {1, 8, 12}});
  ModelConfig blocks = small(2, CmMode::Full);
  blocks.cm_head_blocks = 2;
  cases.push_back({blocks, {1, 8, 8}});
  for (int nd : {2, 3}) {
    if (!onednn::activation_block(nd)) continue;
    ModelConfig c = small(nd, CmMode::Full);
    c.base = 16, c.cm_head_blocks = nd == 3 ? 1 : 0;
    cases.push_back({c, nd == 3 ? Spatial{8, 8, 8} : Spatial{1, 16, 16}});
  }
  return cases;
}

std::string describe(const ModelConfig& c) {
  return str(c.ndim, "D ", cm_mode_name(c.cm_mode), " base ", c.base, " cmHeadBlocks ", c.cm_head_blocks);
}

void expect(bool ok, const ModelConfig& c, const char* what) {
  if (ok) return;
  std::printf("  %s: %s\n", describe(c).c_str(), what);
  ++check::failures();
}

}  // namespace

TEST(forward_only_runs_match_the_training_forward) {
  for (auto& [c, s] : forward_only_cases()) {
    Model m(c);
    Data d = make_data(c, 2, s, 31);
    Batch b = d.batch();
    const Prediction first = predict_all(m, d);  // a model that never ran a backward pass
    const StepResult eval = m.evaluate(b);
    expect(same_result(eval, m.compute_gradients(b)), c, "evaluate() differs from compute_gradients()");
    Batch plain = b;
    plain.target = d.labels[0].data();
    expect(same_result(m.evaluate(plain), m.compute_gradients(plain)), c, "evaluate() differs on a plain-CE target");
    expect(predict_all(m, d) == first, c, "predict() differs after compute_gradients()");
    expect(same_result(m.evaluate(b), eval), c, "evaluate() differs after compute_gradients()");
  }
}

// Forward-only runs (of another size too) between training steps leave the
// training caches as training needs them, and a model's predictions after
// training match those of a model that never trained with the same parameters.
TEST(training_and_prediction_interleave_without_corrupting_either) {
  for (auto& [c, s] : forward_only_cases()) {
    Model fresh(c), mixed(c);
    Data d = make_data(c, 2, s, 41);
    const Spatial bigger = {c.ndim == 3 ? 2 * s.d : 1, 2 * s.h, s.w};
    Data other = make_data(c, 1, bigger, 42);
    Batch b = d.batch();
    bool same_steps = true;
    for (int i = 0; i < 3; ++i) {
      predict_all(mixed, other);
      mixed.evaluate(other.batch());
      same_steps = same_steps && same_result(mixed.train_step(b), fresh.train_step(b));
    }
    expect(same_steps, c, "training steps after forward-only runs differ from a fresh model's");
    bool same_params = true;
    for (size_t i = 0; i < fresh.params().size(); ++i)
      same_params = same_params && same_bits(fresh.params()[i].value, mixed.params()[i].value);
    expect(same_params, c, "parameters after interleaved training differ from a fresh model's");
    Model untrained(c);
    for (size_t i = 0; i < untrained.params().size(); ++i) untrained.params()[i].value = mixed.params()[i].value;
    expect(predict_all(mixed, d) == predict_all(untrained, d), c,
           "predict() right after training differs from an untrained model's with the same parameters");
  }
}

// release_buffers() between calls (as ensemble members do) changes no result: buffers
// are rebuilt on demand, bit for bit the same steps, parameters and predictions as a
// model that kept its buffers. Also right after construction and twice in a row.
TEST(released_buffers_are_rebuilt_alike) {
  for (auto& [c, s] : forward_only_cases()) {
    Model kept(c), released(c);
    released.release_buffers();
    Data d = make_data(c, 2, s, 51);
    Batch b = d.batch();
    bool same_steps = true, same_predictions = true;
    for (int i = 0; i < 3; ++i) {
      same_steps = same_steps && same_result(released.train_step(b), kept.train_step(b));
      released.release_buffers();
      same_predictions = same_predictions && predict_all(released, d) == predict_all(kept, d);
      released.release_buffers();
      released.release_buffers();
    }
    expect(same_steps, c, "training steps after release_buffers() differ from a model that kept its buffers");
    expect(same_predictions, c, "predictions after release_buffers() differ from a model that kept its buffers");
  }
}

#if defined(__linux__) && !defined(__SANITIZE_ADDRESS__)
namespace {
double resident_mb() {
  long pages = 0, resident = 0;
  std::ifstream statm("/proc/self/statm");
  statm >> pages >> resident;
  return (double)resident * (double)sysconf(_SC_PAGESIZE) / 1048576.0;
}
}  // namespace

// The memory a 3D step and prediction leave in the model's buffers (tens of MB here)
// leaves the process with release_buffers(): at least half of what the calls added.
TEST(release_buffers_returns_the_activations_memory) {
  ModelConfig c = small(3, CmMode::Full);
  c.base = 8, c.depth = 3, c.in_channels = 4, c.classes = 4, c.annotators = 3;
  Model m(c);
  Data d = make_data(c, 2, {32, 32, 32}, 61);
  const double before = resident_mb();
  m.train_step(d.batch());
  { Prediction p = predict_all(m, d); }
  const double held = resident_mb();
  m.release_buffers();
  const double after = resident_mb();
  std::printf("  resident: %.1f MB before, %.1f MB after a step and a prediction, %.1f MB released\n", before, held, after);
  CHECK(held - before > 20);
  CHECK(held - after >= 0.5 * (held - before));
}
#endif

TEST(invalid_inputs_are_rejected_with_messages) {
  ModelConfig c = small(2, CmMode::Full);
  c.depth = 3;
  Model m(c);
  Data d = make_data(c, 1, {1, 8, 8}, 6);
  Batch b = d.batch();
  b.s = {1, 8, 6};
  CHECK_THROWS_WITH(m.evaluate(b), "width 6 is not divisible by 2^(depth-1) = 4");
  b.s = {1, 4, 4};  // 1x1 at the deepest level: instance norm over one position
  CHECK_THROWS_WITH(m.evaluate(b), "the deepest level (depth 3) of a 4x4 input has a single position");
  b = d.batch();
  d.images[5] = std::nanf("");
  CHECK_THROWS_WITH(m.evaluate(b), "images contain NaN at index 5");
  d.images[5] = 0.f;
  d.labels[1][9] = 7;
  CHECK_THROWS_WITH(m.evaluate(b), "labels of annotator 1: label 7 at index 9 (image 0) is >= classes (3)");
  d.labels[1][9] = 255;
  CHECK(std::isfinite(m.evaluate(b).loss));
  // Inputs larger than one chunk of the parallel scan: the first bad value is named,
  // whichever chunk finishes first.
  {
    Data big = make_data(c, 2, {1, 512, 512}, 8);  // 2 x 2 x 512 x 512 images: 1 M values
    Batch bb = big.batch();
    big.images[900000] = INFINITY, big.images[300001] = std::nanf(""), big.images[700000] = std::nanf("");
    CHECK_THROWS_WITH(m.evaluate(bb), "images contain NaN at index 300001 (image 0, channel 1)");
    big.images[900000] = big.images[300001] = big.images[700000] = 0.f;
    big.labels[0][400000] = 9, big.labels[0][270000] = 3, big.labels[0][500000] = 4;
    CHECK_THROWS_WITH(m.evaluate(bb), "labels of annotator 0: label 3 at index 270000 (image 1) is >= classes (3)");
  }
  ModelConfig bad = c;
  bad.classes = 1;
  CHECK_THROWS_WITH(Model x(bad), "classes must be in 2..16");
  bad = c;
  bad.ndim = 4;
  CHECK_THROWS_WITH(Model x(bad), "ndim must be 2 or 3");
}

TEST(thread_count_syntax) {
  CHECK(parse_thread_count("4") == 4);
  CHECK(parse_thread_count(" 8 ") == 8);
  CHECK(parse_thread_count("1024") == 1024);
  for (const char* bad : {"", "abc", "0", "-3", "1.5", "2x", "1025", "99999", "99999999999999999999"})
    CHECK(parse_thread_count(bad) == 0);
  CHECK(parse_thread_count(nullptr) == 0);
}

// A process that may not start more threads (here: an address-space limit that
// leaves room for a few 8 MiB stacks) keeps the threads it got instead of ending
// on an uncaught std::system_error.
TEST(thread_pool_survives_refused_threads) {
#if defined(__linux__) && !defined(__SANITIZE_ADDRESS__) && !defined(__SANITIZE_THREAD__)
  const int before = num_threads();
  set_num_threads(1);
  long pages = 0;
  {
    std::ifstream statm("/proc/self/statm");
    statm >> pages;
  }
  rlimit old{};
  getrlimit(RLIMIT_AS, &old);
  rlimit tight = old;
  tight.rlim_cur = (rlim_t)pages * (rlim_t)sysconf(_SC_PAGESIZE) + (rlim_t)48 * 1024 * 1024;
  if (old.rlim_cur != RLIM_INFINITY && old.rlim_cur < tight.rlim_cur) tight.rlim_cur = old.rlim_cur;
  CHECK(setrlimit(RLIMIT_AS, &tight) == 0);
  set_num_threads(kMaxThreads);
  const int got = num_threads();
  setrlimit(RLIMIT_AS, &old);
  CHECK(got >= 1);
  CHECK(got < kMaxThreads);
  std::atomic<int64_t> sum{0};
  parallel_for(1000, [&](int64_t i, int thread) {
    CHECK(thread >= 0 && thread < got);
    sum += i;
  });
  CHECK(sum.load() == 999 * 1000 / 2);
  set_num_threads(before);
  CHECK(num_threads() == before);
#endif
}

// A reader over `files` (path -> text) in place of the system's, for the cgroup parsers.
std::function<bool(const std::string&, std::string&)> reader_of(const std::map<std::string, std::string>& files) {
  return [&files](const std::string& path, std::string& out) {
    auto it = files.find(path);
    if (it == files.end()) return false;
    out = it->second;
    return true;
  };
}

// A container's or batch job's memory limit (cgroups) is the memory a request must fit,
// not the host's: past it the kernel kills the process as it would past the RAM. The
// limit is the smallest of the process's cgroup and its ancestors, v2 (memory.max) and
// v1 (memory.limit_in_bytes); "max" and v1's huge "unlimited" value are no limit.
TEST(cgroup_memory_limit_reads_v1_and_v2_with_ancestors) {
  std::map<std::string, std::string> files;
  const auto read = reader_of(files);
  // v2: the job's own limit is "max", its parent's 8 GiB.
  files = {{"/sys/fs/cgroup/job/step/memory.max", "max\n"}, {"/sys/fs/cgroup/job/memory.max", "8589934592\n"}};
  CHECK(cgroup_memory_limit("0::/job/step\n", read) == 8589934592.0);
  // v2 in a container (cgroup namespace): "/" and the mount's own file.
  files = {{"/sys/fs/cgroup/memory.max", "2147483648\n"}};
  CHECK(cgroup_memory_limit("0::/\n", read) == 2147483648.0);
  // v1: the memory controller's line; unlimited is 2^63 rounded to pages.
  files = {{"/sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes", "9223372036854771712\n"},
           {"/sys/fs/cgroup/memory/docker/memory.limit_in_bytes", "4294967296\n"}};
  CHECK(cgroup_memory_limit("12:pids:/docker/abc\n4:memory:/docker/abc\n0::/\n", read) == 4294967296.0);
  // v1 in a container without a cgroup namespace: the path is the host's, the mount the container's.
  files = {{"/sys/fs/cgroup/memory/memory.limit_in_bytes", "1073741824\n"}};
  CHECK(cgroup_memory_limit("5:cpuacct,memory:/docker/abc\n", read) == 1073741824.0);
  // No limit anywhere, or no cgroup file at all: 0.
  files = {{"/sys/fs/cgroup/memory.max", "max\n"}, {"/sys/fs/cgroup/memory/memory.limit_in_bytes", "9223372036854771712\n"}};
  CHECK(cgroup_memory_limit("0::/\n4:memory:/\n", read) == 0.0);
  files = {};
  CHECK(cgroup_memory_limit("0::/user.slice\n", read) == 0.0);
  CHECK(cgroup_memory_limit("", read) == 0.0);
  // physical_memory_bytes() never exceeds the host's RAM and is positive on Linux.
#if defined(__linux__)
  CHECK(physical_memory_bytes() > 0);
#endif
}

// A container's --cpus or a batch job's CPU quota is the parallelism the threads get: past
// it they take turns being throttled. The quota is in CPUs (quota / period), the smallest
// of the process's cgroup and its ancestors; v2's "max" and v1's -1 are no limit.
TEST(cgroup_cpu_limit_reads_v1_and_v2_with_ancestors) {
  std::map<std::string, std::string> files;
  const auto read = reader_of(files);
  // v2: the job's own cpu.max is "max", its parent's 4 CPUs, the grandparent's 8.
  files = {{"/sys/fs/cgroup/batch/job/step/cpu.max", "max 100000\n"},
           {"/sys/fs/cgroup/batch/job/cpu.max", "400000 100000\n"},
           {"/sys/fs/cgroup/batch/cpu.max", "800000 100000\n"}};
  CHECK(cgroup_cpu_limit("0::/batch/job/step\n", read) == 4.0);
  // v2 in a container (cgroup namespace), a fractional quota with another period.
  files = {{"/sys/fs/cgroup/cpu.max", "125000 50000\n"}};
  CHECK(cgroup_cpu_limit("0::/\n", read) == 2.5);
  // v1: the cpu controller's hierarchy mounted as "cpu,cpuacct" (the line lists both).
  files = {{"/sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_quota_us", "150000\n"},
           {"/sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_period_us", "100000\n"}};
  CHECK(cgroup_cpu_limit("11:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n", read) == 1.5);
  // v1 through the "cpu" name, without a cgroup namespace (only the mount's root exists);
  // -1 is no limit, and the memory hierarchy's files are not read for CPUs.
  files = {{"/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "200000\n"},
           {"/sys/fs/cgroup/cpu/cpu.cfs_period_us", "100000\n"},
           {"/sys/fs/cgroup/memory/cpu.cfs_quota_us", "100000\n"},
           {"/sys/fs/cgroup/memory/cpu.cfs_period_us", "100000\n"}};
  CHECK(cgroup_cpu_limit("2:cpu:/docker/abc\n3:memory:/docker/abc\n", read) == 2.0);
  files = {{"/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "-1\n"}, {"/sys/fs/cgroup/cpu/cpu.cfs_period_us", "100000\n"}};
  CHECK(cgroup_cpu_limit("1:cpu:/\n", read) == 0.0);
  // cpuacct alone is not the cpu controller; no file at all, or an empty text: 0.
  files = {{"/sys/fs/cgroup/cpuacct/cpu.cfs_quota_us", "100000\n"}, {"/sys/fs/cgroup/cpuacct/cpu.cfs_period_us", "100000\n"}};
  CHECK(cgroup_cpu_limit("2:cpuacct:/\n", read) == 0.0);
  files = {{"/sys/fs/cgroup/cpu.max", "max 100000\n"}};
  CHECK(cgroup_cpu_limit("0::/\n", read) == 0.0);
  files = {};
  CHECK(cgroup_cpu_limit("0::/user.slice\n", read) == 0.0);
  CHECK(cgroup_cpu_limit("", read) == 0.0);
  // The memory limit still reads its own files only.
  files = {{"/sys/fs/cgroup/cpu.max", "200000 100000\n"}};
  CHECK(cgroup_memory_limit("0::/\n", read) == 0.0);
}

// The CPUs this process can keep busy never exceed the cores, and the pool's default
// follows them unless CMSEG_NUM_THREADS says otherwise.
TEST(usable_cpus_bound_the_default_threads) {
  const UsableCpus u = usable_cpus();
  CHECK(u.cpus >= 1 && u.cpus <= u.cores);
  CHECK(u.limited_by.empty() == (u.cpus == u.cores));
  const char* env = std::getenv("CMSEG_NUM_THREADS");
  const std::string saved = env ? env : "";
  unsetenv("CMSEG_NUM_THREADS");
  ThreadDefault d = default_threads();
  CHECK(d.threads == std::min(u.cpus, kMaxThreads));
  CHECK(d.why == (u.limited_by.empty() ? "the machine's " + std::to_string(u.cores) + " cores" : u.limited_by));
  setenv("CMSEG_NUM_THREADS", " 3 ", 1);
  d = default_threads();
  CHECK(d.threads == 3 && d.why == "CMSEG_NUM_THREADS=3");
  setenv("CMSEG_NUM_THREADS", "lots", 1);
  d = default_threads();
  CHECK(d.threads == std::min(u.cpus, kMaxThreads));
  CHECK(d.why.find("CMSEG_NUM_THREADS='lots' ignored") != std::string::npos);
  if (env) setenv("CMSEG_NUM_THREADS", saved.c_str(), 1); else unsetenv("CMSEG_NUM_THREADS");
}

// A GPU this build has no kernels for is refused by the device probe with a reason, before a
// step fails at its first launch. The rule: compute capability 8.0 or newer (the kernels'
// floor), and the build's architectures cover it (machine code of the same major and a
// minor at most the GPU's, or PTX of an architecture at most the GPU's).
TEST(gpu_support_problem_follows_the_built_architectures) {
  const std::string dflt = "80;90";  // CMSEG_CUDA_ARCHITECTURES' default (CMake lists real + PTX)
  std::string why = gpu_support_problem("Tesla T4", 7, 5, dflt);
  CHECK(why.find("Tesla T4 has compute capability 7.5; cmseg's CUDA kernels need 8.0 or newer") == 0);
  CHECK(gpu_support_problem("Tesla V100", 7, 0, "70;80;90").find("need 8.0 or newer") != std::string::npos);
  CHECK(gpu_support_problem("A100", 8, 0, dflt).empty());
  CHECK(gpu_support_problem("RTX 4090", 8, 9, dflt).empty());   // sm_80 code runs on 8.9
  CHECK(gpu_support_problem("H200", 9, 0, dflt).empty());
  CHECK(gpu_support_problem("B200", 10, 0, dflt).empty());      // compute_90 PTX, compiled by the driver
  CHECK(gpu_support_problem("H200", 9, 0, "80,90").empty());     // the define's separator
  CHECK(gpu_support_problem("H200", 9, 0, "80-virtual").empty());
  CHECK(gpu_support_problem("RTX 4090", 8, 9, "86-real").empty());
  why = gpu_support_problem("B200", 10, 0, "80-real;90-real");  // machine code only: none for 10.0
  CHECK(why == "B200 (compute capability 10.0) has no code in this build (CUDA architectures 80-real;90-real): "
               "rebuild with -DCMSEG_CUDA_ARCHITECTURES=100 added");
  CHECK(!gpu_support_problem("A10", 8, 6, "90").empty());        // 9.0 code cannot run on 8.6
  CHECK(!gpu_support_problem("A100", 8, 0, "86-real").empty());  // a newer minor's machine code
  // CMake's own choices ("native", "all", "all-major") or no list: nothing to tell from.
  CHECK(gpu_support_problem("A100", 8, 0, "native").empty());
  CHECK(gpu_support_problem("B200", 10, 0, "all-major").empty());
  CHECK(gpu_support_problem("A100", 8, 0, "").empty());
  CHECK(!gpu_support_problem("T4", 7, 5, "native").empty());  // below the kernels' floor all the same
}

TEST_MAIN()
