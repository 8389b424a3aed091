// Input and option checks shared by every fusion method (SPEC section 1: a caller
// mistake is rejected before any work, with a message naming the offending value).
#include <algorithm>
#include <cmath>

#include "cmseg/error.hpp"
#include "cmseg/threads.hpp"
#include "fusion_internal.hpp"

namespace cmseg {

namespace {

// Index of the first voxel whose label is neither a class nor kUnlabelled, or -1.
int64_t first_invalid_label(const uint8_t* map, int64_t V, int L) {
  std::vector<int64_t> first(num_threads(), -1);
  parallel_range(V, [&](int64_t b, int64_t e, int t) {
    for (int64_t v = b; v < e; ++v)
      if (map[v] >= L && map[v] != kUnlabelled) {
        if (first[t] < 0 || v < first[t]) first[t] = v;
        return;
      }
  });
  int64_t best = -1;
  for (int64_t f : first)
    if (f >= 0 && (best < 0 || f < best)) best = f;
  return best;
}

}  // namespace

void validate_fusion_input(const FusionInput& in, const char* who) {
  const int64_t R = (int64_t)in.raters.size();
  if (R == 0) fail(who, ": no raters (R = 0)");
  if (std::none_of(in.raters.begin(), in.raters.end(), [](const uint8_t* m) { return m != nullptr; }))
    fail(who, ": every one of the ", R, " raters is absent (null map): nothing to fuse");
  if (in.V <= 0) fail(who, ": V = ", in.V, " voxels, expected > 0");
  if (in.L < 2 || in.L > 255) fail(who, ": L = ", in.L, " classes, expected 2..255 (255 marks unlabelled voxels)");
  if (!in.extent.empty()) {
    if (in.extent.size() > 3) fail(who, ": extent has ", in.extent.size(), " axes, expected 1 to 3");
    // The product in double: in int64 three large axes can wrap around to V itself.
    double n = 1;
    for (size_t a = 0; a < in.extent.size(); ++a) {
      if (in.extent[a] <= 0) fail(who, ": extent[", a, "] = ", in.extent[a], ", expected > 0");
      n *= (double)in.extent[a];
    }
    if (n != (double)in.V) fail(who, ": extent holds ", n, " voxels but V = ", in.V);
  }
  for (int64_t r = 0; r < R; ++r) {
    const uint8_t* map = in.raters[r];
    if (!map) continue;
    const int64_t v = first_invalid_label(map, in.V, in.L);
    if (v >= 0)
      fail(who, ": rater ", r, ": label ", (int)map[v], " at index ", v, " >= classes (", in.L,
           ") and not 255 (unlabelled)");
  }
}

namespace fusion {

void check_undecided(int undecided, const char* who) {
  if (undecided < -1 || undecided > 255)
    fail(who, ": undecided = ", undecided, ", expected -1 (lowest tied class) or a label 0..255");
}

void check_em_options(double threshold, int max_iterations, const char* who) {
  if (!(threshold >= 0) || !std::isfinite(threshold))
    fail(who, ": threshold = ", threshold, ", expected a finite value >= 0");
  if (max_iterations < 0) fail(who, ": max_iterations = ", max_iterations, ", expected >= 0");
}

std::vector<double> normalised_prior(const std::vector<double>& given, int L, const char* who) {
  if ((int)given.size() != L) fail(who, ": prior has ", given.size(), " entries, expected L = ", L);
  double sum = 0;
  for (int j = 0; j < L; ++j) {
    if (!(given[j] >= 0) || !std::isfinite(given[j]))
      fail(who, ": prior[", j, "] = ", given[j], ", expected a finite value >= 0");
    sum += given[j];
  }
  if (sum <= 0) fail(who, ": prior sums to 0");
  std::vector<double> p(given);
  for (double& x : p) x /= sum;
  return p;
}

std::vector<double> label_frequencies(const LabelPatterns& pat) {
  std::vector<double> p(pat.L, 0.0);
  double total = 0;
  for (int64_t k = 0; k < pat.size(); ++k)
    for (int c = 0; c < pat.width(); ++c) {
      const uint8_t d = pat.row(k)[c];
      if (d == kUnlabelled) continue;
      p[d] += pat.count[k];
      total += pat.count[k];
    }
  if (total == 0) return std::vector<double>(pat.L, 1.0 / pat.L);  // nobody labelled anything
  for (double& x : p) x /= total;
  return p;
}

}  // namespace fusion
}  // namespace cmseg
