// Soft label: each class's share of the votes of the raters who labelled a voxel
// (the `naive mean` baseline of SPEC section 4).
#include <algorithm>

#include "cmseg/threads.hpp"
#include "fusion_internal.hpp"

namespace cmseg {

std::vector<float> fuse_mean(const FusionInput& in) {
  validate_fusion_input(in, "fuse_mean");
  const int64_t V = in.V;
  const int L = in.L;
  std::vector<float> out((size_t)L * V, 0.f);
  parallel_range(V, [&](int64_t b, int64_t e, int) {
    std::vector<int> votes(L);
    for (int64_t v = b; v < e; ++v) {
      std::fill(votes.begin(), votes.end(), 0);
      int voters = 0;
      for (const uint8_t* map : in.raters) {
        if (!map || map[v] == kUnlabelled) continue;
        ++votes[map[v]];
        ++voters;
      }
      if (voters == 0) continue;  // stays all zeros: no information, no loss
      for (int j = 0; j < L; ++j) out[(size_t)j * V + v] = (float)votes[j] / (float)voters;
    }
  });
  return out;
}

}  // namespace cmseg
