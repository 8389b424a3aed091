// 3x3(x3) convolution, stride 1, zero padding 1, no bias (SPEC section 2).
// Forward: im2col over tiles of output voxels, then W[cout, cin*T] x col[cin*T, tile].
// Backward data is the forward convolution of dy with the flipped, transposed
// kernel (exact for stride 1, pad 1); backward weights is dy x col^T per tile.
#include <algorithm>
#include <cstring>
#include <vector>

#include "cmseg/gemm.hpp"
#include "cmseg/layers.hpp"
#include "cmseg/onednn.hpp"  // issue 7: oneDNN dispatch
#include "cmseg/profile.hpp"
#include "cmseg/threads.hpp"

namespace cmseg {

Spatial halve(Spatial s, int ndim) { return {ndim == 3 ? s.d / 2 : s.d, s.h / 2, s.w / 2}; }
Spatial twice(Spatial s, int ndim) { return {ndim == 3 ? s.d * 2 : s.d, s.h * 2, s.w * 2}; }

namespace {

// col[(ci*T + t) * nt + j] = x[ci, v0 + j shifted by tap t], zero outside the volume.
void im2col3(const float* x, int cin, Spatial s, int ndim, int64_t v0, int nt, float* col) {
  const int kd = ndim == 3 ? 3 : 1;
  const int T = conv3_taps(ndim);
  const int64_t HW = (int64_t)s.h * s.w, V = s.size();
  for (int ci = 0; ci < cin; ++ci) {
    const float* xc = x + (int64_t)ci * V;
    for (int a = 0; a < kd; ++a)
      for (int b = 0; b < 3; ++b)
        for (int c = 0; c < 3; ++c) {
          const int dz = kd == 3 ? a - 1 : 0, dy = b - 1, dx = c - 1;
          float* row = col + ((int64_t)ci * T + (a * 3 + b) * 3 + c) * nt;
          int64_t v = v0;
          for (int j = 0; j < nt;) {
            const int z = (int)(v / HW), y = (int)((v % HW) / s.w), xx = (int)(v % s.w);
            const int seg = (int)std::min<int64_t>(s.w - xx, nt - j);
            const int zz = z + dz, yy = y + dy;
            if (zz < 0 || zz >= s.d || yy < 0 || yy >= s.h) {
              std::fill(row + j, row + j + seg, 0.f);
            } else {
              const float* src = xc + zz * HW + (int64_t)yy * s.w + xx + dx;
              // valid k: 0 <= xx + k + dx < w
              const int lo = std::max(0, -(xx + dx)), hi = std::min(seg, s.w - xx - dx);
              std::fill(row + j, row + j + std::min(lo, seg), 0.f);
              if (hi > lo) std::memcpy(row + j + lo, src + lo, (size_t)(hi - lo) * sizeof(float));
              if (hi < seg) std::fill(row + j + std::max(hi, lo), row + j + seg, 0.f);
            }
            j += seg;
            v += seg;
          }
        }
  }
}

// Tile width: keep col (K x nt) near 512 KiB, but leave at least two items per thread.
int tile_width(int K, int n, int64_t V) {
  int64_t nt = std::max<int64_t>(64, (131072 / std::max(K, 1)) / 16 * 16);
  nt = std::min<int64_t>(nt, 2048);
  const int64_t want_items = 2LL * num_threads();
  if (n * ((V + nt - 1) / nt) < want_items) nt = std::max<int64_t>(16, (n * V + want_items - 1) / want_items);
  return (int)std::min<int64_t>(nt, V);
}

}  // namespace

void conv3_forward(const float* x, const float* w, float* y, int n, int cin, int cout, Spatial s, int ndim) {
#if CMSEG_HAVE_ONEDNN  // issue 7: oneDNN fast path (native/onednn/), same contract
  if (onednn::enabled()) return onednn::conv3_forward(x, w, y, n, cin, cout, s, ndim);
#endif
  ProfileScope prof("conv3_forward");
  const int K = cin * conv3_taps(ndim);
  const int64_t V = s.size();
  const int nt = tile_width(K, n, V);
  const int64_t tiles = (V + nt - 1) / nt;
  parallel_for(n * tiles, [&](int64_t item, int) {
    const int64_t img = item / tiles, v0 = (item % tiles) * nt;
    const int cnt = (int)std::min<int64_t>(nt, V - v0);
    thread_local std::vector<float> col;
    col.resize((size_t)K * cnt);
    im2col3(x + img * cin * V, cin, s, ndim, v0, cnt, col.data());
    sgemm(false, false, cout, cnt, K, 1.f, w, K, col.data(), cnt, 0.f, y + img * cout * V + v0, (int)V);
  });
}

void conv3_backward(const float* x, const float* w, const float* dy, float* dx, float* dw, int n, int cin, int cout,
                    Spatial s, int ndim) {
#if CMSEG_HAVE_ONEDNN  // issue 7: oneDNN fast path (native/onednn/), same contract
  if (onednn::enabled()) return onednn::conv3_backward(x, w, dy, dx, dw, n, cin, cout, s, ndim);
#endif
  const int T = conv3_taps(ndim);
  const int K = cin * T;
  const int64_t V = s.size();
  if (dx) {
    std::vector<float> flipped((size_t)cin * cout * T);
    for (int co = 0; co < cout; ++co)
      for (int ci = 0; ci < cin; ++ci)
        for (int t = 0; t < T; ++t) flipped[((size_t)ci * cout + co) * T + t] = w[((size_t)co * cin + ci) * T + (T - 1 - t)];
    ProfileScope prof("conv3_backward_data");
    conv3_forward(dy, flipped.data(), dx, n, cout, cin, s, ndim);
  }
  ProfileScope prof("conv3_backward_weights");
  const int nt = tile_width(K, n, V);
  const int64_t tiles = (V + nt - 1) / nt;
  std::vector<std::vector<float>> partial(static_parts(n * tiles));  // per part: deterministic sums
  parallel_for_static(n * tiles, [&](int64_t item, int thread) {
    const int64_t img = item / tiles, v0 = (item % tiles) * nt;
    const int cnt = (int)std::min<int64_t>(nt, V - v0);
    thread_local std::vector<float> col;
    col.resize((size_t)K * cnt);
    im2col3(x + img * cin * V, cin, s, ndim, v0, cnt, col.data());
    auto& acc = partial[thread];
    if (acc.empty()) acc.assign((size_t)cout * K, 0.f);
    sgemm(false, true, cout, K, cnt, 1.f, dy + img * cout * V + v0, (int)V, col.data(), cnt, 1.f, acc.data(), K);
  });
  for (auto& acc : partial)
    if (!acc.empty())
      for (size_t i = 0; i < acc.size(); ++i) dw[i] += acc[i];
}

}  // namespace cmseg
