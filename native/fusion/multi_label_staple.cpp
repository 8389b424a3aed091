// Multi-label STAPLE: Rohlfing, Russakoff, Maurer, "Performance-based classifier
// combination in atlas-based image segmentation using expectation-maximization
// parameter estimation", IEEE TMI 23(8) 2004, with the conventions of ITK's
// MultiLabelSTAPLEImageFilter:
// - class prior: the labels' relative frequencies over all raters' maps, unless given;
// - initial CMs: each rater's agreement with the majority vote;
// - iterate until no CM entry changes by more than the threshold (default 1e-5);
// - output: argmax of the posterior, ties to an "undecided" label.
// Where this departs from ITK (5.4): ITK row-normalises its initial CMs and counts a
// rater's labels at majority-vote ties in the next row of its matrix; we column-
// normalise (the model's p(rater says i | true j)) and leave tied voxels out. From
// the same EM fixed point the results agree (test_fusion checks against SimpleITK).
#include <algorithm>

#include "cmseg/threads.hpp"
#include "fusion_internal.hpp"

namespace cmseg {

namespace {

// One-hot majority vote of every pattern; patterns with a tie (or no label) get no
// weight at all, so they do not bias the initial CMs towards either class.
std::vector<double> majority_vote_weights(const fusion::LabelPatterns& pat) {
  const int L = pat.L, width = pat.width();
  std::vector<double> W(pat.size() * L, 0.0), votes(L);
  for (int64_t p = 0; p < pat.size(); ++p) {
    std::fill(votes.begin(), votes.end(), 0.0);
    const uint8_t* d = pat.row(p);
    for (int c = 0; c < width; ++c)
      if (d[c] != kUnlabelled) votes[d[c]] += 1;
    const uint8_t winner = fusion::decide(votes.data(), L, kUnlabelled);
    if (winner != kUnlabelled && votes[winner] > 0) W[p * L + winner] = 1.0;
  }
  return W;
}

}  // namespace

namespace fusion {

std::array<uint8_t, 256> identity_labels() {
  std::array<uint8_t, 256> t;
  for (int x = 0; x < 256; ++x) t[x] = (uint8_t)x;
  return t;
}

EmRun multi_label_em(const LabelPatterns& pat, const std::vector<double>& prior, double threshold,
                     int max_iterations) {
  const std::vector<double> cm0 = estimate_confusion(pat, majority_vote_weights(pat), identity_cms(pat.width(), pat.L));
  return run_staple_em(pat, prior, cm0, threshold, max_iterations);
}

}  // namespace fusion

MultiLabelStapleResult multi_label_staple(const FusionInput& in, const MultiLabelStapleOptions& opt) {
  const char* who = "multi_label_staple";
  validate_fusion_input(in, who);
  fusion::check_undecided(opt.undecided, who);
  fusion::check_em_options(opt.threshold, opt.max_iterations, who);

  MultiLabelStapleResult res;
  if (!opt.prior.empty()) res.prior = fusion::normalised_prior(opt.prior, in.L, who);

  const fusion::LabelPatterns pat = fusion::group_label_patterns(in, in.L, fusion::identity_labels());
  if (res.prior.empty()) res.prior = fusion::label_frequencies(pat);
  const fusion::EmRun run = fusion::multi_label_em(pat, res.prior, opt.threshold, opt.max_iterations);

  fusion::scatter_posteriors(pat, run.W, opt.undecided, res.posterior, res.labels);
  res.cm = fusion::cms_for_all_raters(pat, (int)in.raters.size(), run.cm);
  res.iterations = run.iterations;
  res.converged = run.converged;
  return res;
}

}  // namespace cmseg
