// The fused CM loss (SPEC section 4): hand-computed values, the identity-CM
// limit, and finite-difference gradients for every CM mode with unlabelled
// pixels and an absent annotator.
//
// Gradient tolerance: |analytic - numeric| <= 2e-4 + 2e-2 |numeric|, central
// differences with step 1e-3 in float32 (the loss is smooth in the raw inputs).
#include <cmath>
#include <cstring>

#include "check.hpp"
#include "cmseg/loss.hpp"

using namespace cmseg;

namespace {
float inv_softplus(double y) { return (float)(y + std::log(-std::expm1(-y))); }

struct Case {
  int n, L, R, rank;
  int64_t V;
  CmMode mode;
  std::vector<float> logits;
  std::vector<std::vector<float>> raw;
  std::vector<std::vector<uint8_t>> labels;
  std::vector<uint8_t> present;
  float lambda;

  CmLossInput input() const {
    CmLossInput in;
    in.n = n, in.L = L, in.R = R, in.V = V, in.mode = mode, in.rank = rank, in.trace_weight = lambda;
    in.seg_logits = logits.data();
    for (int r = 0; r < R; ++r) in.cm_raw.push_back(raw[r].data()), in.labels.push_back(labels[r].data());
    in.present = present.empty() ? nullptr : present.data();
    return in;
  }
  double loss() const {
    CmLossOutput out;
    cm_loss(input(), out);
    return out.loss;
  }
};

Case random_case(CmMode mode, int n, int L, int R, int64_t V, int rank, uint32_t seed) {
  Case c{n, L, R, rank, V, mode, {}, {}, {}, {}, 0.3f};
  c.logits = check::random_vector((size_t)n * L * V, seed, -2.f, 2.f);
  const int K = mode == CmMode::Global ? L * L : cm_head_channels(mode, L, rank);
  for (int r = 0; r < R; ++r) {
    c.raw.push_back(check::random_vector(mode == CmMode::Global ? (size_t)K : (size_t)n * K * V, seed + 10 + r, -2.f, 2.f));
    std::mt19937 g(seed + 20 + r);
    std::vector<uint8_t> lab((size_t)n * V);
    for (auto& x : lab) x = g() % 5 == 0 ? kUnlabelled : (uint8_t)(g() % L);
    c.labels.push_back(lab);
  }
  c.present.assign((size_t)n * R, 1);
  c.present[1 * R + 0] = 0;  // annotator 0 did not label image 1
  return c;
}

// V = 21: two 8-pixel vector groups of the full-CM pass plus a scalar tail.
void gradient_case(CmMode mode, int rank, int L = 3, int64_t V = 21) {
  Case c = random_case(mode, 2, L, 2, V, rank, 100 + (int)mode + L);
  CmLossInput in = c.input();
  CmLossOutput out;
  std::vector<float> dz(c.logits.size());
  std::vector<std::vector<float>> draw;
  for (int r = 0; r < c.R; ++r) draw.emplace_back(c.raw[r].size(), -7.f);
  out.d_seg_logits = dz.data();
  for (auto& d : draw) out.d_cm_raw.push_back(d.data());
  cm_loss(in, out);
  CHECK(std::isfinite(out.loss));
  const float h = 1e-3f;
  auto fd = [&](std::vector<float>& x, const std::vector<float>& g, const char* what) {
    int bad = 0;
    for (size_t i = 0; i < x.size(); ++i) {
      const float keep = x[i];
      x[i] = keep + h;
      const double up = c.loss();
      x[i] = keep - h;
      const double down = c.loss();
      x[i] = keep;
      const double num = (up - down) / (2 * h);
      if (!check::close(g[i], num, 2e-2, 2e-4) && bad++ < 3)
        std::printf("  %s %s[%zu]: analytic %.6g numeric %.6g\n", cm_mode_name(mode), what, i, g[i], num);
    }
    if (bad) ++check::failures();
  };
  fd(c.logits, dz, "dlogits");
  for (int r = 0; r < c.R; ++r) fd(c.raw[r], draw[r], "draw");
  // The absent annotator's head gets exactly zero gradient on the image it did not label.
  if (mode != CmMode::Global) {
    const int K = cm_head_channels(mode, c.L, rank);
    for (int64_t e = 0; e < (int64_t)K * c.V; ++e) CHECK(draw[0][(size_t)1 * K * c.V + e] == 0.f);
  }
}
// One pixel, 2 classes, one annotator with a full CM (the hand-computed cases).
CmLossInput one_pixel_two_classes(const std::vector<float>& z, const std::vector<float>& raw,
                                  const std::vector<uint8_t>& label, float trace_weight) {
  CmLossInput in;
  in.n = 1, in.L = 2, in.R = 1, in.V = 1, in.mode = CmMode::Full, in.trace_weight = trace_weight;
  in.seg_logits = z.data();
  in.cm_raw = {raw.data()};
  in.labels = {label.data()};
  return in;
}
}  // namespace

TEST(hand_computed_full_cm_single_pixel) {
  // softplus(u) = [[3, 1], [1, 1]] -> A = [[3/4, 1/2], [1/4, 1/2]] (columns sum to 1).
  // logits [0, ln 3] -> p = [1/4, 3/4];  q = A p = [9/16, 7/16].
  // Label 1: CE = -ln(7/16); trace = 3/4 + 1/2 = 5/4; loss = CE + 0.1 * 5/4.
  std::vector<float> z = {0.f, std::log(3.f)};
  std::vector<float> raw = {inv_softplus(3), inv_softplus(1), inv_softplus(1), inv_softplus(1)};
  std::vector<uint8_t> lab = {1};
  const CmLossInput in = one_pixel_two_classes(z, raw, lab, 0.1f);
  CmLossOutput out;
  cm_loss(in, out);
  CHECK_CLOSE(out.ce[0], -std::log(7.0 / 16.0), 1e-6, 1e-7);
  CHECK_CLOSE(out.trace[0], 1.25, 1e-6, 1e-7);
  CHECK_CLOSE(out.loss, -std::log(7.0 / 16.0) + 0.125, 1e-6, 1e-7);
  float A[4];
  cm_from_raw(CmMode::Full, 2, 1, raw.data(), 1, A);
  CHECK_CLOSE(A[0], 0.75, 1e-6, 0);
  CHECK_CLOSE(A[1], 0.5, 1e-6, 0);
  CHECK_CLOSE(A[2], 0.25, 1e-6, 0);
  // Lowrank, L = 2, rank 1: sp(U) = [1, 2], sp(W) = [1, 1], sp(s) = 2:
  // a = [[1+2, 1], [2, 2+2]] -> A = [[3/5, 1/5], [2/5, 4/5]].
  std::vector<float> lr = {inv_softplus(1), inv_softplus(2), inv_softplus(1), inv_softplus(1), inv_softplus(2)};
  cm_from_raw(CmMode::LowRank, 2, 1, lr.data(), 1, A);
  CHECK_CLOSE(A[0], 0.6, 1e-6, 0);
  CHECK_CLOSE(A[1], 0.2, 1e-6, 0);
  CHECK_CLOSE(A[2], 0.4, 1e-6, 0);
  CHECK_CLOSE(A[3], 0.8, 1e-6, 0);
}

// A run of pixels' CMs as rows (prediction) against each pixel's own cm_from_raw: the
// vectorised softplus agrees within float rounding, every column sums to 1, the run length
// need not be a multiple of the vector width, and a NaN raw value stays NaN in that
// pixel's CM (a diverged head must not predict finite CMs).
TEST(cm_rows_match_pixel_cms_and_keep_nan) {
  for (CmMode mode : {CmMode::Full, CmMode::LowRank}) {
    const int L = 4, rank = 2, K = cm_head_channels(mode, L, rank);
    const int64_t count = 37, stride = 53;  // channel k of pixel v at raw[k * stride + v]
    std::vector<float> raw((size_t)K * stride);
    uint32_t state = 12345;
    for (float& x : raw) {
      state = state * 1664525u + 1013904223u;
      x = ((state >> 8) / 16777216.f) * 30.f - 12.f;  // -12..18: softplus's tail and its linear part
    }
    raw[3] = 25.f;  // above 20: softplus(x) = x
    std::vector<float> rows((size_t)L * L * count);
    cm_rows_from_raw(mode, L, rank, raw.data(), stride, count, rows.data());
    float worst = 0.f;
    for (int64_t v = 0; v < count; ++v) {
      float A[16];
      cm_from_raw(mode, L, rank, raw.data() + v, stride, A);
      for (int j = 0; j < L; ++j) {
        float column = 0.f;
        for (int i = 0; i < L; ++i) {
          const float got = rows[(size_t)(i * L + j) * count + v];
          worst = std::max(worst, std::fabs(got - A[i * L + j]));
          column += got;
        }
        CHECK_CLOSE(column, 1.0, 1e-6, 0);
      }
    }
    CHECK(worst < 2e-6f);
    raw[(size_t)2 * stride + 5] = std::nanf("");
    cm_rows_from_raw(mode, L, rank, raw.data(), stride, count, rows.data());
    bool nan_at_5 = false, finite_elsewhere = true;
    for (int e = 0; e < L * L; ++e)
      for (int64_t v = 0; v < count; ++v) {
        const float x = rows[(size_t)e * count + v];
        if (v == 5) nan_at_5 = nan_at_5 || std::isnan(x);
        else finite_elsewhere = finite_elsewhere && std::isfinite(x);
      }
    CHECK(nan_at_5);
    CHECK(finite_elsewhere);
    // Rows written at a wider stride (straight into a [L*L, V] output) hold the same bits,
    // the NaN run included, and nothing between the rows is touched.
    const int64_t wide = count + 11;
    for (int pass = 0; pass < 2; ++pass) {
      if (pass == 1) raw[(size_t)2 * stride + 5] = 0.5f;  // the vectorised path too
      cm_rows_from_raw(mode, L, rank, raw.data(), stride, count, rows.data());
      std::vector<float> placed((size_t)L * L * wide, -7.f);
      cm_rows_from_raw(mode, L, rank, raw.data(), stride, count, placed.data(), wide);
      bool same = true, gaps_kept = true;
      for (int e = 0; e < L * L; ++e)
        for (int64_t v = 0; v < wide; ++v) {
          const float x = placed[(size_t)e * wide + v];
          if (v >= count) gaps_kept = gaps_kept && x == -7.f;
          else same = same && std::memcmp(&x, &rows[(size_t)e * count + v], sizeof x) == 0;
        }
      CHECK(same);
      CHECK(gaps_kept);
    }
  }
}

// SPEC section 4: CE uses log(max(q, 1e-12)). An annotator whose CM gives the observed
// label no probability (row 1 of A ~ 4e-18 here) costs -log(1e-12) per pixel, not
// infinity, and the clamp passes no gradient.
TEST(cross_entropy_clamped_at_1e_12) {
  std::vector<float> z = {0.3f, -0.2f};
  // a = [[1, 1], [sp(-40), sp(-40)]]: A[1][j] = 4.2e-18 / (1 + 4.2e-18), so q[1] ~ 4e-18.
  std::vector<float> raw = {inv_softplus(1), inv_softplus(1), -40.f, -40.f};
  std::vector<uint8_t> lab = {1};
  const CmLossInput in = one_pixel_two_classes(z, raw, lab, 0.f);
  std::vector<float> dz(2, 7.f), draw(4, 7.f);
  CmLossOutput out;
  out.d_seg_logits = dz.data();
  out.d_cm_raw = {draw.data()};
  cm_loss(in, out);
  CHECK_CLOSE(out.ce[0], -std::log(1e-12), 1e-5, 0);
  for (float g : dz) CHECK(g == 0.f);
  for (float g : draw) CHECK(g == 0.f);
}

TEST(identity_cms_reduce_to_plain_cross_entropy) {
  // softplus(30) = 30 and softplus(-30) ~ 1e-13: A is the identity to ~1e-14,
  // so with lambda = 0 each CE_r equals the plain CE of p on r's labels.
  Case c = random_case(CmMode::Full, 2, 4, 2, 50, 1, 7);
  c.present.clear();
  c.lambda = 0.f;
  for (auto& raw : c.raw)
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j)
        for (int n = 0; n < 2; ++n)
          for (int v = 0; v < 50; ++v) raw[((size_t)n * 16 + i * 4 + j) * 50 + v] = i == j ? 30.f : -30.f;
  CmLossOutput out;
  cm_loss(c.input(), out);
  for (int r = 0; r < 2; ++r) {
    const double plain = ce_loss_hard(c.logits.data(), c.labels[r].data(), 2, 4, 50, nullptr);
    CHECK_CLOSE(out.ce[r], plain, 1e-5, 1e-6);
    CHECK_CLOSE(out.trace[r], 4.0, 1e-6, 0);
  }
}

TEST(averaging_and_absent_annotators) {
  // Annotator 1 labels nothing (all 255): it contributes to neither term (SPEC 4).
  // Annotator 0 is absent from image 1: its trace averages over image 0 only.
  Case c = random_case(CmMode::Full, 2, 2, 2, 10, 1, 9);
  std::fill(c.labels[1].begin(), c.labels[1].end(), kUnlabelled);
  CmLossOutput out;
  cm_loss(c.input(), out);
  CHECK(out.ce[1] == 0.0);
  CHECK(out.trace[1] == 0.0);
  double tr0 = 0;
  float A[4];
  for (int v = 0; v < 10; ++v) {
    cm_from_raw(CmMode::Full, 2, 1, c.raw[0].data() + v, 10, A);
    tr0 += A[0] + A[3];
  }
  CHECK_CLOSE(out.trace[0], tr0 / 10, 1e-5, 1e-7);
  // Nobody present: everything zero.
  std::fill(c.present.begin(), c.present.end(), 0);
  CmLossOutput none;
  cm_loss(c.input(), none);
  CHECK(none.loss == 0.0);
}

TEST(nonfinite_head_values_make_the_loss_nan) {
  // A diverged CM head must show in the loss (the trainer stops on a non-finite
  // loss), although the vectorised softplus clamps its inputs.
  for (CmMode mode : {CmMode::Full, CmMode::LowRank}) {
    Case c = random_case(mode, 2, 3, 2, 21, 2, 31);
    CmLossOutput ok;
    cm_loss(c.input(), ok);
    CHECK(std::isfinite(ok.loss));
    c.raw[1][17] = std::nanf("");
    CmLossOutput bad;
    cm_loss(c.input(), bad);
    CHECK(std::isnan(bad.loss));
    CHECK(std::isnan(bad.ce[1]) && std::isfinite(bad.ce[0]));
    c.raw[1][17] = INFINITY;
    CmLossOutput inf;
    cm_loss(c.input(), inf);
    CHECK(!std::isfinite(inf.loss));
  }
}

TEST(gradients_full) { gradient_case(CmMode::Full, 1); }
TEST(gradients_full_5_classes) { gradient_case(CmMode::Full, 1, 5, 19); }
TEST(gradients_lowrank) { gradient_case(CmMode::LowRank, 2); }
TEST(gradients_global) { gradient_case(CmMode::Global, 1); }

// The gradient may overwrite the raw channels (loss.hpp; the GPU model does):
// the same loss and bit-identical gradients as into separate arrays. Long rows
// (several chunks and the vector groups' scalar tails), an absent annotator.
TEST(gradient_in_place_of_raw_channels) {
  for (CmMode mode : {CmMode::Full, CmMode::LowRank}) {
    Case c = random_case(mode, 2, 4, 3, 1500, 2, 300 + (int)mode);
    std::vector<float> dz(c.logits.size()), dz2(c.logits.size());
    std::vector<std::vector<float>> draw;
    CmLossOutput apart, inplace;
    apart.d_seg_logits = dz.data();
    for (int r = 0; r < c.R; ++r) draw.emplace_back(c.raw[r].size()), apart.d_cm_raw.push_back(draw[r].data());
    cm_loss(c.input(), apart);
    Case d = c;  // raw overwritten below
    inplace.d_seg_logits = dz2.data();
    for (int r = 0; r < d.R; ++r) inplace.d_cm_raw.push_back(d.raw[r].data());
    cm_loss(d.input(), inplace);
    CHECK(inplace.loss == apart.loss);
    CHECK(dz2 == dz);
    for (int r = 0; r < c.R; ++r) CHECK(d.raw[r] == draw[r]);
  }
}

// Hand-computed plain cross-entropy with an unlabelled pixel: both forms are the mean
// over labelled pixels, so one-hot rows (a row of zeros where nobody labelled) give the
// hard labels' loss, and a fractional row weights the two classes' -log p.
TEST(plain_cross_entropy_by_hand) {
  const int n = 1, L = 2;
  const int64_t V = 3;
  const std::vector<float> z = {0.f, 1.f, -2.f,   // class 0 logits of the three pixels
                                1.f, 1.f, 0.5f};  // class 1
  auto log_p = [&](int k, int v) {  // log softmax, in double
    const double a = z[v], b = z[V + v];
    return (k == 0 ? a : b) - std::log(std::exp(a) + std::exp(b));
  };
  const std::vector<uint8_t> lab = {0, kUnlabelled, 1};
  const double want = -(log_p(0, 0) + log_p(1, 2)) / 2;
  std::vector<float> dh(z.size(), 9.f), ds(z.size(), 9.f);
  CHECK_CLOSE(ce_loss_hard(z.data(), lab.data(), n, L, V, dh.data()), want, 1e-6, 0);
  const std::vector<float> one_hot = {1.f, 0.f, 0.f, 0.f, 0.f, 1.f};
  CHECK_CLOSE(ce_loss_soft(z.data(), one_hot.data(), n, L, V, ds.data()), want, 1e-6, 0);
  // d/dz = (p - t) / |labelled|, zero at the unlabelled pixel.
  for (int k = 0; k < L; ++k)
    for (int v = 0; v < V; ++v) {
      const double t = v == 1 ? 0.0 : (v == 0 ? k == 0 : k == 1);
      const double g = v == 1 ? 0.0 : (std::exp(log_p(k, v)) - t) / 2;
      CHECK_CLOSE(dh[k * V + v], g, 1e-5, 1e-7);
      CHECK_CLOSE(ds[k * V + v], g, 1e-5, 1e-7);
    }
  const std::vector<float> soft = {0.25f, 0.f, 0.f, 0.75f, 0.f, 1.f};
  const double want_soft = -(0.25 * log_p(0, 0) + 0.75 * log_p(1, 0) + log_p(1, 2)) / 2;
  CHECK_CLOSE(ce_loss_soft(z.data(), soft.data(), n, L, V, nullptr), want_soft, 1e-6, 0);
  // Nobody labelled anything: 0 and zero gradients.
  const std::vector<float> none(z.size(), 0.f);
  CHECK(ce_loss_soft(z.data(), none.data(), n, L, V, ds.data()) == 0.0);
  for (float g : ds) CHECK(g == 0.f);
}

TEST(plain_cross_entropy_gradients) {
  const int n = 2, L = 3;
  const int64_t V = 6;
  auto z = check::random_vector(n * L * V, 3, -2, 2);
  std::vector<uint8_t> lab = {0, 1, 2, 255, 1, 0, 2, 2, 255, 0, 1, 1};
  auto soft = check::random_vector(n * L * V, 4, 0, 1);
  std::vector<float> dh(z.size()), ds(z.size());
  ce_loss_hard(z.data(), lab.data(), n, L, V, dh.data());
  ce_loss_soft(z.data(), soft.data(), n, L, V, ds.data());
  for (size_t i = 0; i < z.size(); ++i) {
    const float keep = z[i], h = 1e-3f;
    z[i] = keep + h;
    const double uh = ce_loss_hard(z.data(), lab.data(), n, L, V, nullptr), us = ce_loss_soft(z.data(), soft.data(), n, L, V, nullptr);
    z[i] = keep - h;
    const double dhn = ce_loss_hard(z.data(), lab.data(), n, L, V, nullptr), dsn = ce_loss_soft(z.data(), soft.data(), n, L, V, nullptr);
    z[i] = keep;
    CHECK_CLOSE(dh[i], (uh - dhn) / (2 * h), 2e-2, 2e-4);
    CHECK_CLOSE(ds[i], (us - dsn) / (2 * h), 2e-2, 2e-4);
  }
}

TEST_MAIN()
