// Binary STAPLE: Warfield, Zou, Wells, "Simultaneous truth and performance level
// estimation (STAPLE): an algorithm for the validation of image segmentation",
// IEEE TMI 23(7) 2004, eqs. 12-20 (E-step W, M-step sensitivity p and specificity q).
//
// Run as the L = 2 case of the shared EM (staple_em.cpp): cm[1][1] = p, cm[0][0] = q.
// Like ITK's STAPLEImageFilter, EM starts from the truth estimate W0 = the raters'
// mean vote, so iteration 1 is an M-step from W0 followed by an E-step; and the
// foreground prior is the mean over raters of their foreground fraction.
#include <cmath>
#include <limits>

#include "cmseg/error.hpp"
#include "cmseg/threads.hpp"
#include "fusion_internal.hpp"

namespace cmseg {

namespace {

// Foreground -> 1, any other class -> 0, unlabelled stays unlabelled.
std::array<uint8_t, 256> binary_labels(int foreground) {
  std::array<uint8_t, 256> t;
  for (int x = 0; x < 256; ++x) t[x] = x == kUnlabelled ? kUnlabelled : (uint8_t)(x == foreground);
  return t;
}

// Mean over present raters of (foreground voxels / voxels they labelled).
double mean_foreground_fraction(const fusion::LabelPatterns& pat) {
  const int width = pat.width();
  double sum = 0;
  int raters = 0;
  for (int c = 0; c < width; ++c) {
    double fg = 0, labelled = 0;
    for (int64_t p = 0; p < pat.size(); ++p) {
      const uint8_t d = pat.row(p)[c];
      if (d == kUnlabelled) continue;
      labelled += pat.count[p];
      fg += d * pat.count[p];
    }
    if (labelled > 0) {
      sum += fg / labelled;
      ++raters;
    }
  }
  return raters ? sum / raters : 0.5;
}

// W0: share of foreground votes among the raters who labelled the pattern.
std::vector<double> mean_vote_weights(const fusion::LabelPatterns& pat, double prior) {
  const int width = pat.width();
  std::vector<double> W(pat.size() * 2);
  for (int64_t p = 0; p < pat.size(); ++p) {
    double fg = 0, voters = 0;
    for (int c = 0; c < width; ++c) {
      const uint8_t d = pat.row(p)[c];
      if (d == kUnlabelled) continue;
      fg += d;
      voters += 1;
    }
    const double w = voters > 0 ? fg / voters : prior;
    W[p * 2 + 0] = 1 - w;
    W[p * 2 + 1] = w;
  }
  return W;
}

}  // namespace

StapleResult staple(const FusionInput& in, const StapleOptions& opt) {
  const char* who = "staple";
  validate_fusion_input(in, who);
  // Before the shared check, whose bound (>= 0) is the multi-label methods': binary STAPLE's
  // first iteration is the M-step from the mean vote, so it needs at least one.
  if (opt.max_iterations < 1) fail(who, ": max_iterations = ", opt.max_iterations, ", expected >= 1");
  fusion::check_em_options(opt.threshold, opt.max_iterations, who);
  if (opt.foreground < 0 || opt.foreground >= in.L)
    fail(who, ": foreground = ", opt.foreground, ", expected a class 0..", in.L - 1);
  // NaN compares false both ways: without this it would silently mean "automatic".
  if (std::isnan(opt.prior) || (opt.prior >= 0 && !(opt.prior <= 1)))
    fail(who, ": prior = ", opt.prior, ", expected 0..1 (or < 0 for automatic)");

  const fusion::LabelPatterns pat = fusion::group_label_patterns(in, 2, binary_labels(opt.foreground));
  StapleResult res;
  res.prior = opt.prior >= 0 ? opt.prior : mean_foreground_fraction(pat);
  const std::vector<double> prior = {1 - res.prior, res.prior};

  // Iteration 1's M-step from W0; the remaining iterations alternate E and M.
  const std::vector<double> cm1 =
      fusion::estimate_confusion(pat, mean_vote_weights(pat, res.prior), fusion::identity_cms(pat.width(), 2));
  fusion::EmRun run = fusion::run_staple_em(pat, prior, cm1, opt.threshold, opt.max_iterations - 1);
  res.iterations = 1 + run.iterations;
  res.converged = run.converged;

  const int R = (int)in.raters.size();
  const double nan = std::numeric_limits<double>::quiet_NaN();
  res.sensitivity.assign(R, nan);
  res.specificity.assign(R, nan);
  for (int c = 0; c < pat.width(); ++c) {
    res.sensitivity[pat.raters[c]] = run.cm[c * 4 + 1 * 2 + 1];
    res.specificity[pat.raters[c]] = run.cm[c * 4 + 0 * 2 + 0];
  }

  // Per pattern: W and the label (unlabelled where no rater labelled the voxel).
  std::vector<float> w(pat.size());
  std::vector<uint8_t> label(pat.size());
  for (int64_t p = 0; p < pat.size(); ++p) {
    w[p] = (float)run.W[p * 2 + 1];
    bool seen = false;
    for (int c = 0; c < pat.width(); ++c) seen |= pat.row(p)[c] != kUnlabelled;
    label[p] = seen ? (uint8_t)(run.W[p * 2 + 1] > 0.5) : kUnlabelled;
  }
  res.posterior.resize(in.V);
  res.labels.resize(in.V);
  parallel_range(in.V, [&](int64_t b, int64_t e, int) {
    for (int64_t v = b; v < e; ++v) {
      res.posterior[v] = w[pat.of_voxel[v]];
      res.labels[v] = label[pat.of_voxel[v]];
    }
  });
  return res;
}

}  // namespace cmseg
