// Pieces shared by the fusion algorithms in this folder; not part of the public API.
#pragma once
#include <array>
#include <cstdint>
#include <vector>

#include "cmseg/fusion.hpp"

namespace cmseg {
namespace fusion {

// ---- options checks (fusion_input.cpp) ----
void check_undecided(int undecided, const char* who);
void check_em_options(double threshold, int max_iterations, const char* who);

// ---- label patterns (label_patterns.cpp) ----
//
// With global rater parameters, STAPLE's E- and M-steps depend on a voxel only
// through the tuple of labels the raters gave it. Grouping voxels by that tuple
// (at most (L+1)^R of them: 125 for 3 raters and 4 classes) makes each EM
// iteration cost O(patterns) instead of O(voxels), with the same result. Up to
// 2^16 possible tuples they are indexed by their code directly; beyond that (many
// raters) the distinct tuples are found by sorting.
struct LabelPatterns {
  int L = 0;
  std::vector<int> raters;         // R' present raters: pattern column -> index into in.raters
  std::vector<uint8_t> labels;     // [P, R'] class given by each present rater, kUnlabelled if none
  std::vector<double> count;       // [P] voxels with this pattern (may be 0)
  std::vector<uint32_t> of_voxel;  // [V] pattern of each voxel
  int64_t size() const { return (int64_t)count.size(); }
  int width() const { return (int)raters.size(); }
  const uint8_t* row(int64_t p) const { return labels.data() + p * width(); }
};

// Groups the voxels of the present raters' maps after mapping every label through
// `relabel` (a 256-entry table; classes 0..L-1 or kUnlabelled).
LabelPatterns group_label_patterns(const FusionInput& in, int L, const std::array<uint8_t, 256>& relabel);

// A caller's class prior, checked (L entries, finite, >= 0, not all zero) and normalised.
std::vector<double> normalised_prior(const std::vector<double>& given, int L, const char* who);
// The default class prior (ITK's): the relative frequencies of the labels over every
// labelled voxel of the present raters.
std::vector<double> label_frequencies(const LabelPatterns& pat);

// ---- EM on patterns (staple_em.cpp) ----

// E-step for one label tuple d[0..width): w[j] ∝ prior[j] prod_c cm[(c * L + d[c]) * L + j]
// over the labelled entries; the prior itself where no entry is labelled or every
// class is impossible. Returns whether any entry is labelled.
bool tuple_posterior(const uint8_t* d, int width, const double* cm, const double* prior, int L, double* w);

// Posterior over the true class of every pattern, W[p * L + j], from the present
// raters' CMs cm[(r' * L + i) * L + j] (r' = pattern column) and the prior.
void pattern_posteriors(const LabelPatterns& pat, const std::vector<double>& cm, const std::vector<double>& prior,
                        std::vector<double>& W);

// M-step: cm[r'][i][j] = sum over voxels rater r' labelled i of W[j] / sum over
// voxels r' labelled of W[j]. A column with no weight keeps its value in `previous`.
std::vector<double> estimate_confusion(const LabelPatterns& pat, const std::vector<double>& W,
                                       const std::vector<double>& previous);

struct EmRun {
  std::vector<double> cm;  // [R', L, L]
  std::vector<double> W;   // [P, L] posteriors from the final cm
  int iterations = 0;
  bool converged = false;
};
// Alternates E- and M-steps from cm0 until no CM entry moves by more than threshold.
EmRun run_staple_em(const LabelPatterns& pat, const std::vector<double>& prior, std::vector<double> cm0,
                    double threshold, int max_iterations);

// Multi-label STAPLE on patterns (multi_label_staple.cpp): CMs initialised from the
// agreement with the majority vote, then run_staple_em.
EmRun multi_label_em(const LabelPatterns& pat, const std::vector<double>& prior, double threshold,
                     int max_iterations);
std::array<uint8_t, 256> identity_labels();

// Identity CMs [R', L, L]: the value of a column nothing has been learnt about.
std::vector<double> identity_cms(int raters, int L);

// Expands per-pattern posteriors to [L, V] and labels [V] (argmax, ties to
// `undecided` or the lowest class, kUnlabelled where the pattern has no label).
void scatter_posteriors(const LabelPatterns& pat, const std::vector<double>& W, int undecided,
                        std::vector<float>& posterior, std::vector<uint8_t>& labels);

// Argmax of w[0..L-1] with fuse_mode's tie rule.
uint8_t decide(const double* w, int L, int undecided);

// CMs of the present raters [R', L, L] placed into [R, L, L], NaN for absent raters.
std::vector<double> cms_for_all_raters(const LabelPatterns& pat, int R, const std::vector<double>& cm);

}  // namespace fusion
}  // namespace cmseg
