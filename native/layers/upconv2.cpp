// Transposed convolution, kernel 2, stride 2, with bias (SPEC section 2, `up.k`).
// Each output voxel receives exactly one tap, so the layer is a GEMM
// W^T[cout*T, cin] x X[cin, voxels] followed by a scatter (and a gather in the
// backward pass).
#include <algorithm>
#include <vector>

#include "cmseg/gemm.hpp"
#include "cmseg/layers.hpp"
#include "cmseg/onednn.hpp"  // issue 7: oneDNN dispatch
#include "cmseg/profile.hpp"
#include "cmseg/threads.hpp"

namespace cmseg {
namespace {

// Output offset of input voxel v under tap t (kernel extent (kd, 2, 2)).
struct UpIndex {
  Spatial in, out;
  int64_t base(int64_t v) const {
    const int64_t HW = (int64_t)in.h * in.w;
    const int z = (int)(v / HW), y = (int)((v % HW) / in.w), x = (int)(v % in.w);
    const int zo = out.d == in.d ? z : 2 * z;
    return ((int64_t)zo * out.h + 2 * y) * out.w + 2 * x;
  }
  int64_t tap(int t) const { return ((int64_t)(t / 4) * out.h + (t / 2) % 2) * out.w + t % 2; }
};

int chunk_width(int n, int64_t V) {
  int64_t c = std::min<int64_t>(V, 1024);
  const int64_t want = 2LL * num_threads();
  if (n * ((V + c - 1) / c) < want) c = std::max<int64_t>(16, (n * V + want - 1) / want);
  return (int)std::min<int64_t>(c, V);
}

}  // namespace

void upconv2_forward(const float* x, const float* w, const float* b, float* y, int n, int cin, int cout, Spatial s,
                     int ndim) {
#if CMSEG_HAVE_ONEDNN  // issue 7: oneDNN fast path (native/onednn/), same contract
  if (onednn::enabled()) return onednn::upconv2_forward(x, w, b, y, n, cin, cout, s, ndim);
#endif
  ProfileScope prof("upconv2_forward");
  const int T = pool2_taps(ndim), M = cout * T;
  const Spatial so = twice(s, ndim);
  const int64_t V = s.size(), Vo = so.size();
  const UpIndex idx{s, so};
  const int ch = chunk_width(n, V);
  const int64_t chunks = (V + ch - 1) / ch;
  parallel_for(n * chunks, [&](int64_t item, int) {
    const int64_t img = item / chunks, v0 = (item % chunks) * ch;
    const int cnt = (int)std::min<int64_t>(ch, V - v0);
    thread_local std::vector<float> ycol;
    ycol.resize((size_t)M * cnt);
    sgemm(true, false, M, cnt, cin, 1.f, w, M, x + img * cin * V + v0, (int)V, 0.f, ycol.data(), cnt);
    float* yi = y + img * cout * Vo;
    for (int co = 0; co < cout; ++co)
      for (int t = 0; t < T; ++t) {
        const float* src = ycol.data() + ((size_t)co * T + t) * cnt;
        float* dst = yi + co * Vo + idx.tap(t);
        for (int j = 0; j < cnt; ++j) dst[idx.base(v0 + j)] = src[j] + b[co];
      }
  });
}

void upconv2_backward(const float* x, const float* w, const float* dy, float* dx, float* dw, float* db, int n, int cin,
                      int cout, Spatial s, int ndim) {
#if CMSEG_HAVE_ONEDNN  // issue 7: oneDNN fast path (native/onednn/), same contract
  if (onednn::enabled()) return onednn::upconv2_backward(x, w, dy, dx, dw, db, n, cin, cout, s, ndim);
#endif
  ProfileScope prof("upconv2_backward");
  const int T = pool2_taps(ndim), M = cout * T;
  const Spatial so = twice(s, ndim);
  const int64_t V = s.size(), Vo = so.size();
  const UpIndex idx{s, so};
  const int ch = chunk_width(n, V);
  const int64_t chunks = (V + ch - 1) / ch;
  std::vector<std::vector<float>> partial(static_parts(n * chunks));  // per part: deterministic sums
  parallel_for_static(n * chunks, [&](int64_t item, int thread) {
    const int64_t img = item / chunks, v0 = (item % chunks) * ch;
    const int cnt = (int)std::min<int64_t>(ch, V - v0);
    thread_local std::vector<float> dycol;
    dycol.resize((size_t)M * cnt);
    const float* dyi = dy + img * cout * Vo;
    for (int co = 0; co < cout; ++co)
      for (int t = 0; t < T; ++t) {
        float* dst = dycol.data() + ((size_t)co * T + t) * cnt;
        const float* src = dyi + co * Vo + idx.tap(t);
        for (int j = 0; j < cnt; ++j) dst[j] = src[idx.base(v0 + j)];
      }
    if (dx) sgemm(false, false, cin, cnt, M, 1.f, w, M, dycol.data(), cnt, 0.f, dx + img * cin * V + v0, (int)V);
    auto& acc = partial[thread];
    if (acc.empty()) acc.assign((size_t)cin * M, 0.f);
    sgemm(false, true, cin, M, cnt, 1.f, x + img * cin * V + v0, (int)V, dycol.data(), cnt, 1.f, acc.data(), M);
  });
  for (auto& acc : partial)
    if (!acc.empty())
      for (size_t i = 0; i < acc.size(); ++i) dw[i] += acc[i];
  parallel_for(cout, [&](int64_t co, int) {
    double sum = 0;
    for (int img = 0; img < n; ++img) {
      const float* d = dy + ((int64_t)img * cout + co) * Vo;
      for (int64_t v = 0; v < Vo; ++v) sum += d[v];
    }
    db[co] += (float)sum;
  });
}

}  // namespace cmseg
