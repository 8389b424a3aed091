// 1x1(x1) convolution with bias: the segmentation head and the CM heads.
#include <algorithm>
#include <vector>

#include "cmseg/gemm.hpp"
#include "cmseg/layers.hpp"
#include "cmseg/profile.hpp"
#include "cmseg/threads.hpp"

namespace cmseg {
namespace {
int chunk_width(int n, int64_t V) {
  int64_t c = std::min<int64_t>(V, 2048);
  const int64_t want = 2LL * num_threads();
  if (n * ((V + c - 1) / c) < want) c = std::max<int64_t>(16, (n * V + want - 1) / want);
  return (int)std::min<int64_t>(c, V);
}
}  // namespace

void conv1_forward_heads(const float* x, const std::vector<Conv1Head>& heads, int n, int cin, int64_t V) {
  ProfileScope prof("conv1_forward");
  const int ch = chunk_width(n, V);
  const int64_t chunks = (V + ch - 1) / ch;
  parallel_for(n * chunks, [&](int64_t item, int) {
    const int64_t img = item / chunks, v0 = (item % chunks) * ch;
    const int cnt = (int)std::min<int64_t>(ch, V - v0);
    const float* xi = x + img * cin * V + v0;
    for (const Conv1Head& h : heads) {
      float* yi = h.y + img * h.cout * V + v0;
      for (int co = 0; co < h.cout; ++co) std::fill(yi + co * V, yi + co * V + cnt, h.b[co]);
      sgemm(false, false, h.cout, cnt, cin, 1.f, h.w, cin, xi, (int)V, 1.f, yi, (int)V);
    }
  });
}

void conv1_backward_heads(const float* x, const std::vector<Conv1Head>& heads, float* dx_accumulate, int n, int cin,
                          int64_t V) {
  ProfileScope prof("conv1_backward");
  const int ch = chunk_width(n, V);
  const int64_t chunks = (V + ch - 1) / ch;
  // Per thread part: every head's dw then db, summed in part order (deterministic).
  std::vector<size_t> offset(heads.size() + 1, 0);
  for (size_t k = 0; k < heads.size(); ++k) offset[k + 1] = offset[k] + (size_t)heads[k].cout * (cin + 1);
  std::vector<std::vector<float>> partial(static_parts(n * chunks));
  parallel_for_static(n * chunks, [&](int64_t item, int thread) {
    const int64_t img = item / chunks, v0 = (item % chunks) * ch;
    const int cnt = (int)std::min<int64_t>(ch, V - v0);
    const float* xi = x + img * cin * V + v0;
    auto& acc = partial[thread];
    if (acc.empty()) acc.assign(offset.back(), 0.f);
    for (size_t k = 0; k < heads.size(); ++k) {
      const Conv1Head& h = heads[k];
      const float* dyi = h.dy + img * h.cout * V + v0;
      if (dx_accumulate)
        sgemm(true, false, cin, cnt, h.cout, 1.f, h.w, cin, dyi, (int)V, 1.f, dx_accumulate + img * cin * V + v0,
              (int)V);
      float* dw = &acc[offset[k]];
      float* db = dw + (size_t)h.cout * cin;
      sgemm(false, true, h.cout, cin, cnt, 1.f, dyi, (int)V, xi, (int)V, 1.f, dw, cin);
      for (int co = 0; co < h.cout; ++co) {
        float s = 0.f;
        for (int j = 0; j < cnt; ++j) s += dyi[co * V + j];
        db[co] += s;
      }
    }
  });
  for (auto& acc : partial)
    if (!acc.empty())
      for (size_t k = 0; k < heads.size(); ++k) {
        const Conv1Head& h = heads[k];
        const float* dw = &acc[offset[k]];
        for (int i = 0; i < h.cout * cin; ++i) h.dw[i] += dw[i];
        for (int co = 0; co < h.cout; ++co) h.db[co] += dw[(size_t)h.cout * cin + co];
      }
}

void conv1_forward(const float* x, const float* w, const float* b, float* y, int n, int cin, int cout, int64_t V) {
  Conv1Head h;
  h.cout = cout, h.w = w, h.b = b, h.y = y;
  conv1_forward_heads(x, {h}, n, cin, V);
}

void conv1_backward(const float* x, const float* w, const float* dy, float* dx_accumulate, float* dw, float* db, int n,
                    int cin, int cout, int64_t V) {
  Conv1Head h;
  h.cout = cout, h.w = w, h.dy = dy, h.dw = dw, h.db = db;
  conv1_backward_heads(x, {h}, dx_accumulate, n, cin, V);
}

}  // namespace cmseg
