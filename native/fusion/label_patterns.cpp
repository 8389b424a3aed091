// Grouping voxels by the tuple of labels the raters gave them (see LabelPatterns).
#include <algorithm>
#include <cstring>
#include <numeric>

#include "cmseg/error.hpp"
#include "cmseg/threads.hpp"
#include "fusion_internal.hpp"

namespace cmseg {
namespace fusion {

namespace {

// Up to this many possible tuples, patterns are indexed directly by their code.
constexpr int64_t kMaxDensePatterns = 1 << 16;

std::vector<int> present_raters(const FusionInput& in) {
  std::vector<int> idx;
  for (int r = 0; r < (int)in.raters.size(); ++r)
    if (in.raters[r]) idx.push_back(r);
  return idx;
}

// (L+1)^R', or -1 when that exceeds kMaxDensePatterns.
int64_t dense_pattern_count(int L, int width) {
  int64_t k = 1;
  for (int r = 0; r < width; ++r) {
    k *= L + 1;
    if (k > kMaxDensePatterns) return -1;
  }
  return k;
}

// Code = sum_r c_r (L+1)^r, with c_r the class of rater r or L for unlabelled.
LabelPatterns group_dense(const FusionInput& in, LabelPatterns pat, int64_t K,
                          const std::array<uint8_t, 256>& relabel) {
  const int L = pat.L, width = pat.width();
  std::array<uint8_t, 256> digit;
  for (int x = 0; x < 256; ++x) digit[x] = relabel[x] == kUnlabelled ? (uint8_t)L : relabel[x];
  const int T = num_threads();
  std::vector<std::vector<int64_t>> hist(T, std::vector<int64_t>(K, 0));
  pat.of_voxel.resize(in.V);
  parallel_range(in.V, [&](int64_t b, int64_t e, int t) {
    int64_t* h = hist[t].data();
    for (int64_t v = b; v < e; ++v) {
      uint32_t code = 0, place = 1;
      for (int c = 0; c < width; ++c) {
        code += digit[in.raters[pat.raters[c]][v]] * place;
        place *= L + 1;
      }
      pat.of_voxel[v] = code;
      ++h[code];
    }
  });
  pat.count.assign(K, 0.0);
  pat.labels.resize(K * width);
  for (int64_t k = 0; k < K; ++k) {
    for (int t = 0; t < T; ++t) pat.count[k] += (double)hist[t][k];
    int64_t rest = k;
    for (int c = 0; c < width; ++c) {
      const int d = (int)(rest % (L + 1));
      rest /= L + 1;
      pat.labels[k * width + c] = d == L ? kUnlabelled : (uint8_t)d;
    }
  }
  return pat;
}

// Many raters: sort the voxels by their label rows and keep the distinct rows.
LabelPatterns group_sorted(const FusionInput& in, LabelPatterns pat, const std::array<uint8_t, 256>& relabel) {
  const int width = pat.width();
  const int64_t V = in.V;
  std::vector<uint8_t> rows((size_t)V * width);
  parallel_range(V, [&](int64_t b, int64_t e, int) {
    for (int64_t v = b; v < e; ++v)
      for (int c = 0; c < width; ++c) rows[(size_t)v * width + c] = relabel[in.raters[pat.raters[c]][v]];
  });
  auto row = [&](int64_t v) { return rows.data() + (size_t)v * width; };
  std::vector<int64_t> order(V);
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return std::memcmp(row(a), row(b), width) < 0; });
  pat.of_voxel.resize(V);
  for (int64_t k = 0; k < V; ++k) {
    const int64_t v = order[k];
    if (k == 0 || std::memcmp(row(v), row(order[k - 1]), width) != 0) {
      pat.labels.insert(pat.labels.end(), row(v), row(v) + width);
      pat.count.push_back(0.0);
    }
    pat.count.back() += 1;
    pat.of_voxel[v] = (uint32_t)(pat.count.size() - 1);
  }
  return pat;
}

}  // namespace

LabelPatterns group_label_patterns(const FusionInput& in, int L, const std::array<uint8_t, 256>& relabel) {
  if (in.V > (int64_t)UINT32_MAX) fail("STAPLE: V = ", in.V, " voxels, at most 2^32 - 1 supported");
  LabelPatterns pat;
  pat.L = L;
  pat.raters = present_raters(in);
  const int64_t K = dense_pattern_count(L, pat.width());
  return K > 0 ? group_dense(in, std::move(pat), K, relabel) : group_sorted(in, std::move(pat), relabel);
}

}  // namespace fusion
}  // namespace cmseg
