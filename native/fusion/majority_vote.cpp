// Majority vote (the `naive mode` baseline of SPEC section 4), and the tie rule
// that every consensus label map in this folder shares.
#include <algorithm>

#include "cmseg/threads.hpp"
#include "fusion_internal.hpp"

namespace cmseg {

namespace fusion {

uint8_t decide(const double* w, int L, int undecided) {
  int best = 0;
  bool tied = false;
  for (int j = 1; j < L; ++j) {
    if (w[j] > w[best]) {
      best = j;
      tied = false;
    } else if (w[j] == w[best]) {
      tied = true;  // keeps the lowest tied class in `best`
    }
  }
  if (tied && undecided >= 0) return (uint8_t)undecided;
  return (uint8_t)best;
}

}  // namespace fusion

std::vector<uint8_t> fuse_mode(const FusionInput& in, int undecided) {
  validate_fusion_input(in, "fuse_mode");
  fusion::check_undecided(undecided, "fuse_mode");
  const int64_t V = in.V;
  const int L = in.L;
  std::vector<uint8_t> out(V);
  parallel_range(V, [&](int64_t b, int64_t e, int) {
    std::vector<double> votes(L);
    for (int64_t v = b; v < e; ++v) {
      std::fill(votes.begin(), votes.end(), 0.0);
      int voters = 0;
      for (const uint8_t* map : in.raters) {
        if (!map || map[v] == kUnlabelled) continue;
        votes[map[v]] += 1;
        ++voters;
      }
      out[v] = voters ? fusion::decide(votes.data(), L, undecided) : kUnlabelled;
    }
  });
  return out;
}

}  // namespace cmseg
