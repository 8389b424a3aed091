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

void conv1_forward(const float* x, const float* w, const float* b, float* y, int n, int cin, int cout, int64_t V) {
  ProfileScope prof("conv1_forward");
  const int ch = chunk_width(n, V);
  const int64_t chunks = (V + ch - 1) / ch;
  parallel_for(n * chunks, [&](int64_t item, int) {
    const int64_t img = item / chunks, v0 = (item % chunks) * ch;
    const int cnt = (int)std::min<int64_t>(ch, V - v0);
    float* yi = y + img * cout * V + v0;
    for (int co = 0; co < cout; ++co) std::fill(yi + co * V, yi + co * V + cnt, b[co]);
    sgemm(false, false, cout, cnt, cin, 1.f, w, cin, x + img * cin * V + v0, (int)V, 1.f, yi, (int)V);
  });
}

void conv1_backward(const float* x, const float* w, const float* dy, float* dx_accumulate, float* dw, float* db, int n,
                    int cin, int cout, int64_t V) {
  ProfileScope prof("conv1_backward");
  const int ch = chunk_width(n, V);
  const int64_t chunks = (V + ch - 1) / ch;
  std::vector<std::vector<float>> partial(static_parts(n * chunks));
  parallel_for_static(n * chunks, [&](int64_t item, int thread) {
    const int64_t img = item / chunks, v0 = (item % chunks) * ch;
    const int cnt = (int)std::min<int64_t>(ch, V - v0);
    const float* dyi = dy + img * cout * V + v0;
    if (dx_accumulate)
      sgemm(true, false, cin, cnt, cout, 1.f, w, cin, dyi, (int)V, 1.f, dx_accumulate + img * cin * V + v0, (int)V);
    auto& acc = partial[thread];
    if (acc.empty()) acc.assign((size_t)cout * cin + cout, 0.f);
    sgemm(false, true, cout, cin, cnt, 1.f, dyi, (int)V, x + img * cin * V + v0, (int)V, 1.f, acc.data(), cin);
    for (int co = 0; co < cout; ++co) {
      float s = 0.f;
      for (int j = 0; j < cnt; ++j) s += dyi[co * V + j];
      acc[(size_t)cout * cin + co] += s;
    }
  });
  for (auto& acc : partial)
    if (!acc.empty()) {
      for (int i = 0; i < cout * cin; ++i) dw[i] += acc[i];
      for (int co = 0; co < cout; ++co) db[co] += acc[(size_t)cout * cin + co];
    }
}

}  // namespace cmseg
