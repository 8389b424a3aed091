// The EM iteration shared by binary and multi-label STAPLE, run on label patterns
// (see LabelPatterns). Notation of Warfield et al. 2004 / Rohlfing et al. 2004:
//   E-step  W[v][j] ∝ prior[j] * prod_r cm_r[D_rv][j]          (raters who labelled v)
//   M-step  cm_r[i][j] = sum_{v: D_rv = i} W[v][j] / sum_{v labelled by r} W[v][j]
// Binary STAPLE is the case L = 2 with p = cm[1][1] and q = cm[0][0].
#include <algorithm>
#include <cmath>
#include <limits>

#include "cmseg/threads.hpp"
#include "fusion_internal.hpp"

namespace cmseg {
namespace fusion {

std::vector<double> identity_cms(int raters, int L) {
  std::vector<double> cm((size_t)raters * L * L, 0.0);
  for (int r = 0; r < raters; ++r)
    for (int j = 0; j < L; ++j) cm[((size_t)r * L + j) * L + j] = 1.0;
  return cm;
}

bool tuple_posterior(const uint8_t* d, int width, const double* cm, const double* prior, int L, double* w) {
  for (int j = 0; j < L; ++j) w[j] = prior[j];
  bool seen = false;
  for (int c = 0; c < width; ++c) {
    if (d[c] == kUnlabelled) continue;
    seen = true;
    const double* a = cm + ((size_t)c * L + d[c]) * L;
    double sum = 0;
    for (int j = 0; j < L; ++j) sum += (w[j] *= a[j]);
    if (sum == 0) break;
    // Renormalising as we go keeps hundreds of raters from underflowing.
    for (int j = 0; j < L; ++j) w[j] /= sum;
  }
  double sum = 0;
  for (int j = 0; j < L; ++j) sum += w[j];
  // An observation the current CMs call impossible (every class has a zero factor)
  // carries no usable information: fall back to the prior, so that the M-step can
  // move the zero entries away from zero.
  if (sum > 0)
    for (int j = 0; j < L; ++j) w[j] /= sum;
  else
    for (int j = 0; j < L; ++j) w[j] = prior[j];
  return seen;
}

void pattern_posteriors(const LabelPatterns& pat, const std::vector<double>& cm, const std::vector<double>& prior,
                        std::vector<double>& W) {
  const int L = pat.L;
  W.resize(pat.size() * L);
  parallel_range(pat.size(), [&](int64_t b, int64_t e, int) {
    for (int64_t p = b; p < e; ++p) tuple_posterior(pat.row(p), pat.width(), cm.data(), prior.data(), L, &W[p * L]);
  });
}

std::vector<double> estimate_confusion(const LabelPatterns& pat, const std::vector<double>& W,
                                       const std::vector<double>& previous) {
  const int L = pat.L, width = pat.width();
  const size_t cm_size = (size_t)width * L * L;
  // Partial sums over fixed chunks of patterns, added in chunk order: the result is
  // the same whatever the thread count or scheduling.
  constexpr int64_t kChunk = 4096;
  const int64_t chunks = (pat.size() + kChunk - 1) / kChunk;
  std::vector<std::vector<double>> acc(chunks, std::vector<double>(cm_size, 0.0));
  parallel_for(chunks, [&](int64_t chunk, int) {
    double* a = acc[chunk].data();
    for (int64_t p = chunk * kChunk; p < std::min(pat.size(), (chunk + 1) * kChunk); ++p) {
      const double n = pat.count[p];
      if (n == 0) continue;
      const uint8_t* d = pat.row(p);
      const double* w = W.data() + p * L;
      for (int c = 0; c < width; ++c) {
        if (d[c] == kUnlabelled) continue;
        double* row = a + ((size_t)c * L + d[c]) * L;
        for (int j = 0; j < L; ++j) row[j] += n * w[j];
      }
    }
  });
  std::vector<double> cm(cm_size, 0.0);
  for (auto& a : acc)
    for (size_t k = 0; k < cm_size; ++k) cm[k] += a[k];
  for (int c = 0; c < width; ++c)
    for (int j = 0; j < L; ++j) {
      double sum = 0;
      for (int i = 0; i < L; ++i) sum += cm[((size_t)c * L + i) * L + j];
      for (int i = 0; i < L; ++i) {
        const size_t k = ((size_t)c * L + i) * L + j;
        cm[k] = sum > 0 ? cm[k] / sum : previous[k];
      }
    }
  return cm;
}

EmRun run_staple_em(const LabelPatterns& pat, const std::vector<double>& prior, std::vector<double> cm0,
                    double threshold, int max_iterations) {
  EmRun run;
  run.cm = std::move(cm0);
  while (run.iterations < max_iterations) {
    pattern_posteriors(pat, run.cm, prior, run.W);
    std::vector<double> next = estimate_confusion(pat, run.W, run.cm);
    double change = 0;
    for (size_t k = 0; k < next.size(); ++k) change = std::max(change, std::fabs(next[k] - run.cm[k]));
    run.cm = std::move(next);
    ++run.iterations;
    if (change < threshold) {
      run.converged = true;
      break;
    }
  }
  pattern_posteriors(pat, run.cm, prior, run.W);  // the posterior of the final parameters
  return run;
}

void scatter_posteriors(const LabelPatterns& pat, const std::vector<double>& W, int undecided,
                        std::vector<float>& posterior, std::vector<uint8_t>& labels) {
  const int L = pat.L, width = pat.width();
  const int64_t V = (int64_t)pat.of_voxel.size();
  std::vector<uint8_t> decision(pat.size());
  for (int64_t p = 0; p < pat.size(); ++p) {
    const uint8_t* d = pat.row(p);
    const bool seen = std::any_of(d, d + width, [](uint8_t x) { return x != kUnlabelled; });
    decision[p] = seen ? decide(W.data() + p * L, L, undecided) : kUnlabelled;
  }
  std::vector<float> Wf(W.begin(), W.end());
  posterior.resize((size_t)L * V);
  labels.resize(V);
  parallel_range(V, [&](int64_t b, int64_t e, int) {
    for (int64_t v = b; v < e; ++v) {
      const uint32_t p = pat.of_voxel[v];
      labels[v] = decision[p];
      for (int j = 0; j < L; ++j) posterior[(size_t)j * V + v] = Wf[(size_t)p * L + j];
    }
  });
}

std::vector<double> cms_for_all_raters(const LabelPatterns& pat, int R, const std::vector<double>& cm) {
  const int L = pat.L;
  const size_t LL = (size_t)L * L;
  std::vector<double> all((size_t)R * LL, std::numeric_limits<double>::quiet_NaN());
  for (int c = 0; c < pat.width(); ++c)
    std::copy(cm.begin() + c * LL, cm.begin() + (c + 1) * LL, all.begin() + pat.raters[c] * LL);
  return all;
}

}  // namespace fusion
}  // namespace cmseg
