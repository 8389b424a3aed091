// Label fusion (native/fusion): hand-computed cases, invariants, recovery of known
// rater behaviour, a plain per-voxel STAPLE written here as the reference for the
// pattern-grouped one, and agreement with SimpleITK when python3 has it
// (scripts/fusion_oracle.py; otherwise that case is reported as skipped).
#include <stdlib.h>  // mkdtemp

#include <algorithm>
#include <cmath>
#include <limits>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <string>

#include "check.hpp"
#include "cmseg/fusion.hpp"
#include "cmseg/threads.hpp"

using namespace cmseg;

namespace {

constexpr uint8_t U = kUnlabelled;
using Map = std::vector<uint8_t>;

FusionInput input_of(const std::vector<const Map*>& maps, int L, std::vector<int64_t> extent = {}) {
  FusionInput in;
  for (const Map* m : maps) in.raters.push_back(m ? m->data() : nullptr);
  for (const Map* m : maps)
    if (m) in.V = (int64_t)m->size();
  in.L = L;
  in.extent = std::move(extent);
  return in;
}

// Truth: discs/balls of classes 1..L-1 on background 0, so every class is present.
Map blob_truth(const std::vector<int64_t>& extent, int L, uint32_t seed) {
  std::mt19937 g(seed);
  const int64_t D = extent.size() == 3 ? extent[0] : 1, H = extent[extent.size() - 2], W = extent.back();
  Map t((size_t)(D * H * W), 0);
  for (int blob = 0; blob < 3 * (L - 1); ++blob) {
    const int label = 1 + blob % (L - 1);
    std::uniform_real_distribution<double> u(0, 1);
    const double cz = u(g) * D, cy = u(g) * H, cx = u(g) * W, rad = (0.15 + 0.15 * u(g)) * std::min(H, W);
    for (int64_t z = 0; z < D; ++z)
      for (int64_t y = 0; y < H; ++y)
        for (int64_t x = 0; x < W; ++x) {
          const double dz = D > 1 ? z - cz : 0, dy = y - cy, dx = x - cx;
          if (dz * dz + dy * dy + dx * dx < rad * rad) t[(z * H + y) * W + x] = (uint8_t)label;
        }
  }
  return t;
}

// A rater who replaces the true label, with probability flip, by another class
// chosen uniformly.
Map noisy_rater(const Map& truth, int L, double flip, uint32_t seed) {
  std::mt19937 g(seed);
  std::uniform_real_distribution<double> u(0, 1);
  std::uniform_int_distribution<int> other(1, L - 1);
  Map m(truth);
  for (auto& x : m)
    if (u(g) < flip) x = (uint8_t)((x + other(g)) % L);
  return m;
}

// Empirical CM of a rater against the truth: A[i][j] = #{rater i, truth j} / #{truth j}.
std::vector<double> empirical_cm(const Map& rater, const Map& truth, int L) {
  std::vector<double> A((size_t)L * L, 0.0), n(L, 0.0);
  for (size_t v = 0; v < truth.size(); ++v) {
    A[rater[v] * L + truth[v]] += 1;
    n[truth[v]] += 1;
  }
  for (int i = 0; i < L; ++i)
    for (int j = 0; j < L; ++j) A[i * L + j] /= n[j];
  return A;
}

double fraction_equal(const Map& a, const Map& b) {
  size_t same = 0;
  for (size_t v = 0; v < a.size(); ++v) same += a[v] == b[v];
  return (double)same / (double)a.size();
}

// ---- a plain per-voxel multi-label STAPLE, the reference for the pattern version ----
// Same model, initialisation and stopping rule as multi_label_staple.cpp, written
// directly from Rohlfing et al. 2004 without grouping voxels.
struct RefStaple {
  std::vector<double> cm;  // [R, L, L]
  Map labels;
  int iterations = 0;
};

RefStaple reference_staple(const std::vector<Map>& maps, int L, double threshold, int max_iterations) {
  const int R = (int)maps.size();
  const size_t V = maps[0].size();
  std::vector<double> prior(L, 0.0);
  for (const Map& m : maps)
    for (uint8_t x : m) prior[x] += 1.0 / (double)(R * V);
  std::vector<double> W(V * L, 0.0);
  for (size_t v = 0; v < V; ++v) {  // one-hot majority vote, ties get no weight
    std::vector<int> votes(L, 0);
    for (const Map& m : maps) ++votes[m[v]];
    const int best = (int)(std::max_element(votes.begin(), votes.end()) - votes.begin());
    if (std::count(votes.begin(), votes.end(), votes[best]) == 1) W[v * L + best] = 1;
  }
  auto m_step = [&](const std::vector<double>& previous) {
    std::vector<double> cm((size_t)R * L * L, 0.0);
    for (int r = 0; r < R; ++r)
      for (size_t v = 0; v < V; ++v)
        for (int j = 0; j < L; ++j) cm[((size_t)r * L + maps[r][v]) * L + j] += W[v * L + j];
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < L; ++j) {
        double s = 0;
        for (int i = 0; i < L; ++i) s += cm[((size_t)r * L + i) * L + j];
        for (int i = 0; i < L; ++i) {
          const size_t k = ((size_t)r * L + i) * L + j;
          cm[k] = s > 0 ? cm[k] / s : previous[k];
        }
      }
    return cm;
  };
  auto e_step = [&](const std::vector<double>& cm) {
    for (size_t v = 0; v < V; ++v) {
      double s = 0;
      for (int j = 0; j < L; ++j) {
        double w = prior[j];
        for (int r = 0; r < R; ++r) w *= cm[((size_t)r * L + maps[r][v]) * L + j];
        W[v * L + j] = w;
        s += w;
      }
      for (int j = 0; j < L; ++j) W[v * L + j] = s > 0 ? W[v * L + j] / s : prior[j];
    }
  };
  std::vector<double> identity((size_t)R * L * L, 0.0);
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < L; ++j) identity[((size_t)r * L + j) * L + j] = 1;
  RefStaple ref;
  ref.cm = m_step(identity);
  while (ref.iterations < max_iterations) {
    e_step(ref.cm);
    std::vector<double> next = m_step(ref.cm);
    double change = 0;
    for (size_t k = 0; k < next.size(); ++k) change = std::max(change, std::fabs(next[k] - ref.cm[k]));
    ref.cm = next;
    ++ref.iterations;
    if (change < threshold) break;
  }
  e_step(ref.cm);
  ref.labels.resize(V);
  for (size_t v = 0; v < V; ++v)
    ref.labels[v] = (uint8_t)(std::max_element(W.begin() + v * L, W.begin() + (v + 1) * L) - (W.begin() + v * L));
  return ref;
}

}  // namespace

// ---- mean and mode -----------------------------------------------------------

TEST(mean_counts_only_the_raters_who_labelled) {
  // voxel:       0  1  2  3
  const Map a = {0, 1, 2, U};
  const Map b = {0, 2, 2, U};
  const Map c = {1, U, 2, U};
  const auto out = fuse_mean(input_of({&a, &b, nullptr, &c}, 3));
  const int64_t V = 4;
  // voxel 0: votes 0,0,1 -> (2/3, 1/3, 0); voxel 1: 1,2 -> (0, 1/2, 1/2);
  // voxel 2: 2,2,2 -> (0, 0, 1); voxel 3: nobody -> zeros.
  const double expect[3][4] = {{2. / 3, 0, 0, 0}, {1. / 3, .5, 0, 0}, {0, .5, 1, 0}};
  for (int j = 0; j < 3; ++j)
    for (int v = 0; v < V; ++v) CHECK_CLOSE(out[j * V + v], expect[j][v], 1e-6, 1e-7);
}

TEST(mode_ties_go_to_undecided_or_lowest_class) {
  // voxel: 0 (clear 2), 1 (tie 1 vs 2), 2 (tie 0 vs 2), 3 (one vote), 4 (nobody)
  const Map a = {2, 1, 2, U, U};
  const Map b = {2, 2, 0, U, U};
  const Map c = {1, U, U, 1, U};
  const auto in = input_of({&a, &b, &c}, 3);
  CHECK((fuse_mode(in) == Map{2, 1, 0, 1, U}));           // -1: lowest tied class
  CHECK((fuse_mode(in, 7) == Map{2, 7, 7, 1, U}));        // a chosen undecided label
  CHECK((fuse_mode(in, U) == Map{2, U, U, 1, U}));        // ties left out of training
  const Map d = {1, 1, 1, 1, 1};  // a fourth rater makes a tie of voxel 0, breaks voxel 1's
  CHECK((fuse_mode(input_of({&a, &b, &c, &d}, 3), 7) == Map{7, 1, 7, 1, 1}));
}

// ---- binary STAPLE by hand ------------------------------------------------------

TEST(staple_one_iteration_by_hand) {
  // Raters A, B, C over 4 voxels:   A = 1 1 0 0,  B = 1 0 1 0,  C = 1 1 1 0.
  // Prior g = mean foreground fraction = (2/4 + 2/4 + 3/4) / 3 = 7/12.
  // W0 = mean vote = (1, 2/3, 2/3, 0); sum W0 = 7/3, sum (1 - W0) = 5/3.
  // M-step: p_r = sum_{D_r=1} W0 / sum W0,  q_r = sum_{D_r=0} (1-W0) / sum (1-W0):
  //   p_A = (1 + 2/3) / (7/3) = 5/7    q_A = (1/3 + 1) / (5/3) = 4/5
  //   p_B = 5/7 (same as A)            q_B = 4/5
  //   p_C = (1 + 2/3 + 2/3) / (7/3) = 1  q_C = 1 / (5/3) = 3/5
  // E-step: W = a / (a + b), a = g prod_r (p_r or 1-p_r), b = (1-g) prod_r (1-q_r or q_r):
  //   voxel 0 (1,1,1): a = 7/12 * 5/7 * 5/7 * 1 = 25/84, b = 5/12 * 1/5 * 1/5 * 2/5 = 1/150
  //                    W = 3750 / 3834
  //   voxel 1 (1,0,1): a = 7/12 * 5/7 * 2/7 * 1 = 5/42,  b = 5/12 * 1/5 * 4/5 * 2/5 = 2/75
  //                    W = 375 / 459;  voxel 2 (0,1,1) the same by symmetry
  //   voxel 3 (0,0,0): a = 0 (p_C = 1) -> W = 0
  const Map A = {1, 1, 0, 0}, B = {1, 0, 1, 0}, C = {1, 1, 1, 0};
  StapleOptions opt;
  opt.max_iterations = 1;
  const StapleResult r = staple(input_of({&A, &B, &C}, 2), opt);
  CHECK(r.iterations == 1);
  CHECK_CLOSE(r.prior, 7. / 12, 1e-12, 0);
  const double p[3] = {5. / 7, 5. / 7, 1}, q[3] = {4. / 5, 4. / 5, 3. / 5};
  for (int k = 0; k < 3; ++k) {
    CHECK_CLOSE(r.sensitivity[k], p[k], 1e-12, 1e-12);
    CHECK_CLOSE(r.specificity[k], q[k], 1e-12, 1e-12);
  }
  const double W[4] = {3750. / 3834, 375. / 459, 375. / 459, 0};
  for (int v = 0; v < 4; ++v) CHECK_CLOSE(r.posterior[v], W[v], 1e-6, 1e-7);
  CHECK((r.labels == Map{1, 1, 1, 0}));
}

// ---- invariants ------------------------------------------------------------------

TEST(unanimous_raters_return_the_input) {
  const std::vector<int64_t> extent = {12, 17};
  Map truth = blob_truth(extent, 3, 5);
  for (size_t v = 0; v < truth.size(); v += 7) truth[v] = U;  // unlabelled by everyone
  const auto in = input_of({&truth, nullptr, &truth, &truth}, 3, extent);
  const int64_t V = in.V;

  CHECK(fuse_mode(in) == truth);
  const auto mean = fuse_mean(in);
  for (int64_t v = 0; v < V; ++v)
    for (int j = 0; j < 3; ++j) CHECK(mean[j * V + v] == (truth[v] == j ? 1.f : 0.f));

  const auto ml = multi_label_staple(in);
  CHECK(ml.labels == truth);
  const auto sp = spatial_staple(in);
  CHECK(sp.labels == truth);
  for (int64_t v = 0; v < V; ++v)
    if (truth[v] != U) {
      CHECK_CLOSE(ml.posterior[truth[v] * V + v], 1, 0, 1e-6);
      CHECK_CLOSE(sp.posterior[truth[v] * V + v], 1, 0, 1e-6);
    }

  // Binary STAPLE: foreground = class 2, everything else labelled is background.
  Map fg2(truth);
  for (auto& x : fg2)
    if (x != U) x = x == 2;
  const auto st = staple(input_of({&truth, nullptr, &truth}, 3), StapleOptions{2});
  CHECK(st.labels == fg2);
  for (int64_t v = 0; v < V; ++v)
    if (truth[v] != U) CHECK_CLOSE(st.posterior[v], fg2[v], 0, 1e-6);
}

TEST(absent_raters_and_unlabelled_voxels_are_missing_observations) {
  const std::vector<int64_t> extent = {40, 50};
  const Map truth = blob_truth(extent, 4, 9);
  Map a = noisy_rater(truth, 4, 0.1, 1), b = noisy_rater(truth, 4, 0.2, 2), c = noisy_rater(truth, 4, 0.15, 3);
  for (size_t v = 0; v < a.size(); v += 5) a[v] = U;   // a skipped some voxels
  for (size_t v = 0; v < 40; ++v) a[v] = b[v] = c[v] = U;  // nobody labelled the first 40
  const auto with_absent = multi_label_staple(input_of({&a, nullptr, &b, &c}, 4));
  const auto without = multi_label_staple(input_of({&a, &b, &c}, 4));
  CHECK(with_absent.labels == without.labels);
  CHECK(std::isnan(with_absent.cm[1 * 16 + 5]));
  for (int k = 0; k < 16; ++k) CHECK_CLOSE(with_absent.cm[2 * 16 + k], without.cm[1 * 16 + k], 0, 1e-12);
  const int64_t V = (int64_t)a.size();
  for (int v = 0; v < 40; ++v) {
    CHECK(with_absent.labels[v] == U);
    for (int j = 0; j < 4; ++j) CHECK_CLOSE(with_absent.posterior[j * V + v], with_absent.prior[j], 1e-6, 0);
  }
  const auto sp = spatial_staple(input_of({&a, nullptr, &b, &c}, 4, extent));
  CHECK(std::isnan(sp.global_cm[1 * 16]));
  CHECK(fraction_equal(sp.labels, without.labels) > 0.97);
  const auto st = staple(input_of({nullptr, &a, &b}, 4));
  CHECK(std::isnan(st.sensitivity[0]) && std::isnan(st.specificity[0]));
  CHECK(st.labels[0] == U && st.labels[41] != U);
  CHECK(fuse_mode(input_of({&a, nullptr, &b, &c}, 4)) == fuse_mode(input_of({&a, &b, &c}, 4)));
}

// ---- recovery of known rater behaviour ---------------------------------------------

// STAPLE keeps its class prior fixed. The automatic one (raters' label frequencies,
// as ITK) is biased by the raters' own flips, which biases the CMs by about 0.02
// here; with the true prior the estimates match the raters' empirical CMs to < 0.01.

TEST(staple_recovers_sensitivity_and_specificity) {
  // 100k voxels, 30% foreground; raters flip a voxel with probability 5%, 10%, 20%.
  const int64_t V = 100000;
  std::mt19937 g(3);
  std::bernoulli_distribution fg(0.3);
  Map truth(V);
  for (auto& x : truth) x = fg(g);
  const double flips[3] = {0.05, 0.1, 0.2};
  std::vector<Map> maps;
  for (int r = 0; r < 3; ++r) maps.push_back(noisy_rater(truth, 2, flips[r], 10 + r));
  const auto in = input_of({&maps[0], &maps[1], &maps[2]}, 2);
  StapleOptions opt;
  opt.prior = (double)std::count(truth.begin(), truth.end(), 1) / (double)V;
  for (bool true_prior : {false, true}) {
    const auto res = staple(in, true_prior ? opt : StapleOptions{});
    CHECK(res.converged);
    double worst = 0;
    for (int r = 0; r < 3; ++r) {
      const auto A = empirical_cm(maps[r], truth, 2);  // p = A[1][1], q = A[0][0]
      worst = std::max({worst, std::fabs(res.sensitivity[r] - A[3]), std::fabs(res.specificity[r] - A[0])});
    }
    std::printf("  binary STAPLE, %s prior %.3f: worst |p, q - empirical| = %.4f after %d iterations\n",
                true_prior ? "true" : "automatic", res.prior, worst, res.iterations);
    if (true_prior) CHECK(worst < 0.01);
  }
}

TEST(multi_label_staple_recovers_known_cms) {
  // 100k voxels, 4 classes with frequencies 0.55/0.2/0.15/0.1; each rater replaces the
  // true label by a uniformly chosen other class with probability 5%, 10%, 20%.
  const int64_t V = 100000;
  const int L = 4;
  std::mt19937 g(4);
  std::discrete_distribution<int> cls({0.55, 0.2, 0.15, 0.1});
  Map truth(V);
  for (auto& x : truth) x = (uint8_t)cls(g);
  const double flips[3] = {0.05, 0.1, 0.2};
  std::vector<Map> maps;
  for (int r = 0; r < 3; ++r) maps.push_back(noisy_rater(truth, L, flips[r], 20 + r));
  const auto in = input_of({&maps[0], &maps[1], &maps[2]}, L);
  MultiLabelStapleOptions opt;
  opt.prior.assign(L, 0.0);
  for (uint8_t x : truth) opt.prior[x] += 1;
  for (bool true_prior : {false, true}) {
    const auto res = multi_label_staple(in, true_prior ? opt : MultiLabelStapleOptions{});
    CHECK(res.converged);
    double worst = 0;
    for (int r = 0; r < 3; ++r) {
      const auto A = empirical_cm(maps[r], truth, L);
      for (int k = 0; k < L * L; ++k) worst = std::max(worst, std::fabs(res.cm[r * L * L + k] - A[k]));
      for (int j = 0; j < L; ++j) {  // columns sum to 1
        double s = 0;
        for (int i = 0; i < L; ++i) s += res.cm[(r * L + i) * L + j];
        CHECK_CLOSE(s, 1, 0, 1e-9);
      }
    }
    std::printf("  multi-label STAPLE, %s prior: worst |A - empirical| = %.4f after %d iterations, %.2f%% right\n",
                true_prior ? "true" : "automatic", worst, res.iterations, 100 * fraction_equal(res.labels, truth));
    if (true_prior) CHECK(worst < 0.01);
  }
}

TEST(pattern_grouping_matches_a_per_voxel_reference) {
  // 3 raters use the dense pattern table; 8 raters (5^8 tuples) the sorted one.
  for (int R : {3, 8}) {
    const std::vector<int64_t> extent = {30, 41};
    const Map truth = blob_truth(extent, 4, 7);
    std::vector<Map> maps;
    for (int r = 0; r < R; ++r) maps.push_back(noisy_rater(truth, 4, 0.05 + 0.04 * r, 30 + r));
    FusionInput in;
    in.V = (int64_t)truth.size();
    in.L = 4;
    for (const Map& m : maps) in.raters.push_back(m.data());
    const auto res = multi_label_staple(in);
    const RefStaple ref = reference_staple(maps, 4, 1e-5, 1000);
    double worst = 0;
    for (size_t k = 0; k < ref.cm.size(); ++k) worst = std::max(worst, std::fabs(res.cm[k] - ref.cm[k]));
    CHECK(res.iterations == ref.iterations);
    CHECK(worst < 1e-9);
    CHECK(res.labels == ref.labels);
  }
}

TEST(spatial_staple_follows_spatially_varying_raters) {
  // 2D 96 x 96: discs of classes 1 and 2 alternating on a 12-pixel lattice, so every
  // window sees every class. Rater 0 is poor on the left half (40% flips) and good
  // on the right (2%); rater 1 the other way round; raters 2 and 3 are 15% everywhere.
  const int64_t H = 96, W = 96;
  const int L = 3;
  Map truth(H * W, 0);
  for (int64_t y = 0; y < H; ++y)
    for (int64_t x = 0; x < W; ++x) {
      const int64_t dy = y % 12 - 6, dx = x % 12 - 6;
      if (dy * dy + dx * dx < 16) truth[y * W + x] = (uint8_t)(1 + (y / 12 + x / 12) % 2);
    }
  const Map left0 = noisy_rater(truth, L, 0.40, 40), right0 = noisy_rater(truth, L, 0.02, 41);
  const Map left1 = noisy_rater(truth, L, 0.02, 42), right1 = noisy_rater(truth, L, 0.40, 43);
  Map r0(truth), r1(truth);
  for (int64_t v = 0; v < H * W; ++v) {
    const bool left = v % W < W / 2;
    r0[v] = left ? left0[v] : right0[v];
    r1[v] = left ? left1[v] : right1[v];
  }
  const Map r2 = noisy_rater(truth, L, 0.15, 44), r3 = noisy_rater(truth, L, 0.15, 45);
  const auto in = input_of({&r0, &r1, &r2, &r3}, L, {H, W});
  // Windows of 3 x 3 cells of 8 pixels, and a weak pull towards the whole-image CMs:
  // each window holds every class, so local estimates can be trusted.
  SpatialStapleOptions opt;
  opt.stride = 8;
  opt.window = 24;
  opt.prior_weight = 0.25;
  const auto sp = spatial_staple(in, opt);
  const auto global = multi_label_staple(in);
  const double acc_sp = fraction_equal(sp.labels, truth), acc_gl = fraction_equal(global.labels, truth);
  std::printf("  accuracy: spatial STAPLE %.4f, STAPLE %.4f, majority vote %.4f (%d iterations)\n", acc_sp, acc_gl,
              fraction_equal(fuse_mode(in), truth), sp.iterations);
  CHECK(sp.converged);
  CHECK(acc_sp > acc_gl + 0.005);
  CHECK((sp.grid == std::vector<int64_t>{12, 12}));
  // Rater 0's local p(says 0 | true 0) (true: 0.6 left, 0.98 right), pulled towards
  // the whole-image value by the prior.
  double left = 0, right = 0;
  for (int64_t cell = 0; cell < 144; ++cell) (cell % 12 < 6 ? left : right) += sp.local_cm[cell * 9] / 72;
  std::printf("  rater 0, mean local A[0][0]: left %.3f, right %.3f (whole image %.3f)\n", left, right, sp.global_cm[0]);
  CHECK(left < sp.global_cm[0] - 0.1 && right > sp.global_cm[0] + 0.1);
}

// Spatial STAPLE's cells, box-filtered window sums and per-cell E-step against a
// direct loop over every voxel of every window, on a 3D volume whose size is not a
// multiple of the stride.
TEST(spatial_staple_matches_a_per_voxel_reference_in_3d) {
  const std::vector<int64_t> extent = {9, 14, 19};
  const int64_t D = 9, H = 14, W = 19, V = D * H * W;
  const int L = 3, stride = 3, window = 9, radius = 1, iterations = 3;
  const double prior_weight = 0.5;
  const Map truth = blob_truth(extent, L, 21);
  std::vector<Map> maps;
  for (int r = 0; r < 3; ++r) maps.push_back(noisy_rater(truth, L, 0.1 + 0.1 * r, 50 + r));
  const auto in = input_of({&maps[0], &maps[1], &maps[2]}, L, extent);
  SpatialStapleOptions opt;
  opt.stride = stride;
  opt.window = window;
  opt.prior_weight = prior_weight;
  opt.max_iterations = iterations;
  opt.threshold = 0;
  const auto res = spatial_staple(in, opt);
  CHECK(res.iterations == iterations);
  CHECK((res.grid == std::vector<int64_t>{3, 5, 7}));

  // Reference: the whole-image CMs and prior are multi-label STAPLE's (run to the
  // same threshold, here 0: all 1000 iterations).
  MultiLabelStapleOptions whole_opt;
  whole_opt.threshold = 0;
  const auto whole = multi_label_staple(in, whole_opt);
  for (size_t k = 0; k < whole.cm.size(); ++k) CHECK_CLOSE(res.global_cm[k], whole.cm[k], 0, 1e-12);
  const int64_t gz = 3, gy = 5, gx = 7, cells = gz * gy * gx;
  const size_t K = 3 * L * L;
  auto cell_of = [&](int64_t z, int64_t y, int64_t x) { return ((z / stride) * gy + y / stride) * gx + x / stride; };
  std::vector<double> local(cells * K);
  for (int64_t c = 0; c < cells; ++c) std::copy(whole.cm.begin(), whole.cm.end(), local.begin() + c * K);
  const double kappa = prior_weight * window * window * window;  // every axis >= window
  for (int it = 0; it < iterations; ++it) {
    std::vector<double> Wv(V * L);  // E-step, each voxel with its cell's CMs
    for (int64_t z = 0; z < D; ++z)
      for (int64_t y = 0; y < H; ++y)
        for (int64_t x = 0; x < W; ++x) {
          const int64_t v = (z * H + y) * W + x;
          const double* cm = local.data() + cell_of(z, y, x) * K;
          double s = 0;
          for (int j = 0; j < L; ++j) {
            double w = whole.prior[j];
            for (int r = 0; r < 3; ++r) w *= cm[(r * L + maps[r][v]) * L + j];
            Wv[v * L + j] = w;
            s += w;
          }
          for (int j = 0; j < L; ++j) Wv[v * L + j] /= s;
        }
    std::vector<double> next(cells * K);
    for (int64_t cz = 0; cz < gz; ++cz)
      for (int64_t cy = 0; cy < gy; ++cy)
        for (int64_t cx = 0; cx < gx; ++cx) {
          std::vector<double> N(K, 0.0);  // every voxel whose cell is within `radius` cells
          for (int64_t z = 0; z < D; ++z)
            for (int64_t y = 0; y < H; ++y)
              for (int64_t x = 0; x < W; ++x) {
                if (std::abs(z / stride - cz) > radius || std::abs(y / stride - cy) > radius ||
                    std::abs(x / stride - cx) > radius)
                  continue;
                const int64_t v = (z * H + y) * W + x;
                for (int r = 0; r < 3; ++r)
                  for (int j = 0; j < L; ++j) N[(r * L + maps[r][v]) * L + j] += Wv[v * L + j];
              }
          const int64_t c = (cz * gy + cy) * gx + cx;
          for (int r = 0; r < 3; ++r)
            for (int j = 0; j < L; ++j) {
              double s = kappa;
              for (int i = 0; i < L; ++i) s += N[(r * L + i) * L + j];
              for (int i = 0; i < L; ++i) {
                const size_t k = (r * L + i) * L + j;
                next[c * K + k] = (N[k] + kappa * whole.cm[k]) / s;
              }
            }
        }
    local = next;
  }
  double worst = 0;
  for (int r = 0; r < 3; ++r)
    for (int64_t c = 0; c < cells; ++c)
      for (int k = 0; k < L * L; ++k)
        worst = std::max(worst, std::fabs(res.local_cm[((size_t)r * cells + c) * L * L + k] - local[c * K + r * L * L + k]));
  std::printf("  worst |local CM - reference| = %.2e\n", worst);
  CHECK(worst < 1e-6);
}

TEST(results_do_not_depend_on_the_thread_count) {
  const std::vector<int64_t> extent = {20, 30, 40};
  const Map truth = blob_truth(extent, 4, 31);
  std::vector<Map> maps;
  for (int r = 0; r < 9; ++r) maps.push_back(noisy_rater(truth, 4, 0.05 + 0.03 * r, 60 + r));
  const auto in3 = input_of({&maps[0], &maps[1], &maps[2]}, 4, extent);  // dense patterns
  FusionInput in9 = in3;                                                 // sorted patterns
  for (int r = 3; r < 9; ++r) in9.raters.push_back(maps[r].data());
  const int keep = num_threads();
  std::vector<std::vector<float>> post;
  for (int threads : {1, 3}) {
    set_num_threads(threads);
    post.push_back(multi_label_staple(in3).posterior);
    post.push_back(multi_label_staple(in9).posterior);
    post.push_back(spatial_staple(in3).posterior);
    post.push_back(staple(in9).posterior);
  }
  set_num_threads(keep);
  for (size_t k = 0; k < 4; ++k) CHECK(post[k] == post[k + 4]);
}

// ---- invalid inputs ----------------------------------------------------------------

TEST(invalid_inputs_are_rejected_with_the_offending_value) {
  const Map a = {0, 1, 2, U}, bad = {0, 1, 7, 1};
  CHECK_THROWS_WITH(fuse_mean(FusionInput{}), "no raters (R = 0)");
  CHECK_THROWS_WITH(fuse_mode(input_of({nullptr, nullptr}, 3)), "every one of the 2 raters is absent");
  FusionInput in = input_of({&a, &bad}, 3);
  CHECK_THROWS_WITH(multi_label_staple(in), "rater 1: label 7 at index 2 >= classes (3)");
  CHECK_THROWS_WITH(fuse_mean(input_of({&a}, 1)), "L = 1 classes");
  CHECK_THROWS_WITH(fuse_mode(input_of({&a}, 3), 300), "undecided = 300");
  CHECK_THROWS_WITH(spatial_staple(input_of({&a}, 3)), "needs the image extent");
  CHECK_THROWS_WITH(spatial_staple(input_of({&a}, 3, {3, 2})), "extent holds 6 voxels but V = 4");
  // (2^62 + 1) x 4 wraps around to 4 in int64 arithmetic.
  CHECK_THROWS_WITH(spatial_staple(input_of({&a}, 3, {(int64_t(1) << 62) + 1, 4})), "voxels but V = 4");
  SpatialStapleOptions sp;
  sp.window = 16;
  CHECK_THROWS_WITH(spatial_staple(input_of({&a}, 3, {2, 2}), sp), "window = 16 is not an odd multiple of stride = 8");
  MultiLabelStapleOptions ml;
  ml.prior = {0.5, 0.5};
  CHECK_THROWS_WITH(multi_label_staple(input_of({&a}, 3), ml), "prior has 2 entries, expected L = 3");
  ml.prior = {0.5, -1, 0.5};
  CHECK_THROWS_WITH(multi_label_staple(input_of({&a}, 3), ml), "prior[1] = -1");
  StapleOptions st;
  st.foreground = 3;
  CHECK_THROWS_WITH(staple(input_of({&a}, 3), st), "foreground = 3");
  st = StapleOptions{};
  st.prior = std::numeric_limits<double>::quiet_NaN();
  CHECK_THROWS_WITH(staple(input_of({&a}, 3), st), "prior = nan");
  st = StapleOptions{};
  st.max_iterations = 0;
  CHECK_THROWS_WITH(staple(input_of({&a}, 3), st), "max_iterations = 0, expected >= 1");
  // Binary STAPLE needs one M-step: -1 was answered "expected >= 0", and then 0 was refused too.
  st.max_iterations = -1;
  CHECK_THROWS_WITH(staple(input_of({&a}, 3), st), "max_iterations = -1, expected >= 1");
  // 10^6 cells of 2 raters' 255x255 CMs: petabytes, refused before the work (it was a
  // bad_alloc after the whole-image EM, whose message spoke of batches and patches).
  {
    const Map big(1000000, 0);
    SpatialStapleOptions fine;
    fine.window = fine.stride = 1;
    CHECK_THROWS_WITH(spatial_staple(input_of({&big, &big}, 255, {1000, 1000}), fine),
                      "spatial_staple: 1000000 cells (stride 1) of 2 raters' 255x255 CMs need more than");
    CHECK_THROWS_WITH(spatial_staple(input_of({&big, &big}, 255, {1000, 1000}), fine), "use a larger stride");
  }
  FusionInput empty = input_of({&a}, 3);
  empty.V = 0;
  CHECK_THROWS_WITH(fuse_mode(empty), "V = 0 voxels");
}

// ---- agreement with SimpleITK ---------------------------------------------------------

namespace {

std::string source_dir() {
  if (const char* env = std::getenv("CMSEG_SOURCE_DIR")) return env;
  const std::string here = __FILE__;  // <source>/native/tests/test_fusion.cpp
  return here.substr(0, here.rfind("/native/tests/"));
}

void write_file(const std::string& path, const void* data, size_t bytes) {
  std::ofstream f(path, std::ios::binary);
  f.write((const char*)data, (std::streamsize)bytes);
}

template <class T>
std::vector<T> read_file(const std::string& path, size_t n) {
  std::vector<T> out(n);
  std::ifstream f(path, std::ios::binary);
  f.read((char*)out.data(), (std::streamsize)(n * sizeof(T)));
  if (!f) out.clear();
  return out;
}

std::vector<double> read_params(const std::string& path) {
  std::ifstream f(path);
  std::vector<double> out;
  double x;
  while (f >> x) out.push_back(x);
  return out;
}

struct OracleCase {
  std::string dir, method;
  std::vector<int64_t> extent;
  int L;
  std::vector<Map> maps;
};

OracleCase make_case(const std::string& root, const std::string& name, const std::string& method,
                     std::vector<int64_t> extent, int L, int R, uint32_t seed) {
  OracleCase c{root + "/" + name, method, extent, L, {}};
  std::filesystem::create_directories(c.dir);
  const Map truth = blob_truth(extent, L, seed);
  std::string shape, raters;
  for (size_t a = 0; a < extent.size(); ++a) shape += (a ? "," : "") + std::to_string(extent[a]);
  for (int r = 0; r < R; ++r) {
    c.maps.push_back(noisy_rater(truth, L, 0.05 + 0.07 * r, seed * 10 + r));
    const std::string file = "rater" + std::to_string(r) + ".u8";
    write_file(c.dir + "/" + file, c.maps.back().data(), c.maps.back().size());
    raters += (r ? "," : "") + file;
  }
  std::ofstream cfg(c.dir + "/case.txt");
  cfg << "method=" << method << "\nshape=" << shape << "\nraters=" << raters << "\n";
  if (method == "multilabel") cfg << "undecided=" << L << "\n";
  return c;
}

}  // namespace

TEST(simpleitk_agreement) {
  if (std::system("python3 -c 'import SimpleITK, numpy' > /dev/null 2>&1") != 0) {
    check::skip("SimpleITK not installed (pip install simpleitk numpy)");
    return;
  }
  char tmpl[] = "/tmp/cmseg_fusion_XXXXXX";
  const std::string root = mkdtemp(tmpl);
  std::vector<OracleCase> cases = {
      make_case(root, "ml2d", "multilabel", {64, 80}, 4, 3, 1),
      make_case(root, "ml3d", "multilabel", {24, 32, 40}, 3, 4, 2),
      make_case(root, "st2d", "staple", {64, 80}, 2, 3, 3),
      make_case(root, "st3d", "staple", {24, 32, 40}, 2, 5, 4),
  };
  std::string cmd = "python3 '" + source_dir() + "/scripts/fusion_oracle.py'";
  for (const auto& c : cases) cmd += " '" + c.dir + "'";
  if (std::system((cmd + " > '" + root + "/oracle.log' 2>&1").c_str()) != 0) {
    std::ifstream log(root + "/oracle.log");
    std::printf("  %s failed:\n%s\n", cmd.c_str(), std::string(std::istreambuf_iterator<char>(log), {}).c_str());
    ++check::failures();
    return;
  }

  for (const auto& c : cases) {
    std::vector<const Map*> ptrs;
    for (const Map& m : c.maps) ptrs.push_back(&m);
    const FusionInput in = input_of(ptrs, c.L, c.extent);
    const size_t V = (size_t)in.V, R = c.maps.size();
    const Map theirs = read_file<uint8_t>(c.dir + "/oracle_labels.u8", V);
    const auto params = read_params(c.dir + "/oracle_params.txt");
    CHECK(theirs.size() == V);
    if (theirs.size() != V) continue;
    Map ours;
    double cm_diff = 0;
    if (c.method == "multilabel") {
      MultiLabelStapleOptions opt;
      opt.undecided = c.L;  // ITK's default
      const auto res = multi_label_staple(in, opt);
      ours = res.labels;
      CHECK(params.size() == 1 + res.cm.size());
      for (size_t k = 0; k < res.cm.size() && k + 1 < params.size(); ++k)
        cm_diff = std::max(cm_diff, std::fabs(res.cm[k] - params[1 + k]));
    } else {
      const auto res = staple(in);
      ours = res.labels;
      CHECK(params.size() == 1 + 2 * R);
      for (size_t r = 0; r < R && 1 + R + r < params.size(); ++r)
        cm_diff = std::max({cm_diff, std::fabs(res.sensitivity[r] - params[1 + r]),
                            std::fabs(res.specificity[r] - params[1 + R + r])});
      const auto W = read_file<float>(c.dir + "/oracle_posterior.f32", V);
      CHECK(W.size() == V);  // a short file would compare nothing
      double w_diff = 0;
      for (size_t v = 0; v < W.size(); ++v) w_diff = std::max(w_diff, (double)std::fabs(res.posterior[v] - W[v]));
      std::printf("  %s: max |W - ITK W| = %.2e (ours %d iterations, ITK %d)\n", c.dir.c_str(), w_diff, res.iterations,
                  params.empty() ? -1 : (int)params[0]);
      CHECK(w_diff < 1e-3);
    }
    const double same = fraction_equal(ours, theirs);
    std::printf("  %s: %zu voxels, %zu raters: same label on %.4f%%, max parameter difference %.2e\n", c.dir.c_str(), V,
                R, 100 * same, cm_diff);
    CHECK(same >= 0.999);
    CHECK(cm_diff < 1e-3);
  }
  std::filesystem::remove_all(root);
}

TEST_MAIN()
