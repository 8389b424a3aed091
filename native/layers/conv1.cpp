// 1x1(x1) convolution with bias: the segmentation head and the CM heads.
#include <algorithm>
#include <cstring>
#include <vector>

#include "cmseg/layers.hpp"
#include "cmseg/profile.hpp"
#include "cmseg/threads.hpp"
#include "vec8.hpp"

namespace cmseg {
namespace {
int chunk_width(int n, int64_t V) {
  int64_t c = std::min<int64_t>(V, 2048);
  const int64_t want = 2LL * num_threads();
  if (n * ((V + c - 1) / c) < want) c = std::max<int64_t>(16, (n * V + want - 1) / want);
  return (int)std::min<int64_t>(c, V);
}
}  // namespace

// The heads read few input channels (the base width) and write many outputs, so
// they are bound by memory, not arithmetic. Direct vector loops over 16 positions
// at a time, several output rows per pass, on packed copies of short runs of the
// input rows, replaced one small packed GEMM per head and chunk: on brats3d-cpu's
// heads (16 -> 4 + 3 x 16 channels, 64^3, one image) forward 9 -> 6 ms and
// backward 23 -> 14 ms on 2 cores.
namespace {

using vec::load8;
using vec::splat;
using vec::store8;
using vec::v8;

// y[o][j] = b[o] + sum_c w[o][c] x[c][j] for T rows o0.. and j in [0, cnt);
// rows of x and y are V apart.
// Sub-chunks of kSub positions, packed kPad floats apart (not a power of two).
constexpr int kSub = 256;
constexpr int kPad = kSub + 16;

// dst[r * kPad + j] = src[r * stride + j] for r < rows, j < m.
void pack_rows(const float* src, int64_t stride, int rows, int m, float* dst) {
  for (int r = 0; r < rows; ++r) std::memcpy(dst + (size_t)r * kPad, src + r * stride, sizeof(float) * m);
}

template <int T>
void forward_rows(const float* x, int64_t xs, const float* w, const float* b, float* y, int64_t V, int o0, int cin,
                  int cnt) {
  int j = 0;
  for (; j + 16 <= cnt; j += 16) {
    v8 acc[T][2];
    for (int t = 0; t < T; ++t) acc[t][0] = acc[t][1] = splat(b[o0 + t]);
    for (int c = 0; c < cin; ++c) {
      const v8 xa = load8(x + c * xs + j), xb = load8(x + c * xs + j + 8);
      for (int t = 0; t < T; ++t) {
        const v8 wt = splat(w[(o0 + t) * cin + c]);
        acc[t][0] += wt * xa, acc[t][1] += wt * xb;
      }
    }
    for (int t = 0; t < T; ++t) store8(y + (o0 + t) * V + j, acc[t][0]), store8(y + (o0 + t) * V + j + 8, acc[t][1]);
  }
  for (; j < cnt; ++j)
    for (int t = 0; t < T; ++t) {
      float s = b[o0 + t];
      for (int c = 0; c < cin; ++c) s += w[(o0 + t) * cin + c] * x[c * xs + j];
      y[(o0 + t) * V + j] = s;
    }
}

// dx[c][j] += sum over heads and rows o of w[o][c] dy[o][j], for T input rows c0..
template <int T>
void data_rows(const std::vector<Conv1Head>& heads, const std::vector<const float*>& dys, int64_t ds, float* dx,
               int64_t V, int c0, int cin, int cnt) {
  int j = 0;
  for (; j + 16 <= cnt; j += 16) {
    v8 acc[T][2];
    for (int t = 0; t < T; ++t) acc[t][0] = load8(dx + (c0 + t) * V + j), acc[t][1] = load8(dx + (c0 + t) * V + j + 8);
    for (size_t k = 0; k < heads.size(); ++k) {
      const float* w = heads[k].w;
      const float* dy = dys[k];
      for (int o = 0; o < heads[k].cout; ++o) {
        const v8 da = load8(dy + o * ds + j), db = load8(dy + o * ds + j + 8);
        for (int t = 0; t < T; ++t) {
          const v8 wt = splat(w[o * cin + c0 + t]);
          acc[t][0] += wt * da, acc[t][1] += wt * db;
        }
      }
    }
    for (int t = 0; t < T; ++t)
      store8(dx + (c0 + t) * V + j, acc[t][0]), store8(dx + (c0 + t) * V + j + 8, acc[t][1]);
  }
  for (; j < cnt; ++j)
    for (int t = 0; t < T; ++t) {
      float s = dx[(c0 + t) * V + j];
      for (size_t k = 0; k < heads.size(); ++k)
        for (int o = 0; o < heads[k].cout; ++o) s += heads[k].w[o * cin + c0 + t] * dys[k][o * ds + j];
      dx[(c0 + t) * V + j] = s;
    }
}

// dw[o][c] += sum_j dy[o][j] x[c][j] for rows o0..o0+TO-1, columns c0..c0+TC-1;
// db[o] += sum_j dy[o][j] alongside (with_db).
template <int TO, int TC>
void weight_rows(const float* x, const float* dy, int64_t V, float* dw, float* db, int o0, int c0, int cin, int cnt,
                 bool with_db) {
  v8 acc[TO][TC], sb[TO];
  for (int a = 0; a < TO; ++a) {
    sb[a] = splat(0.f);
    for (int t = 0; t < TC; ++t) acc[a][t] = splat(0.f);
  }
  int j = 0;
  for (; j + 8 <= cnt; j += 8) {
    v8 d[TO];
    for (int a = 0; a < TO; ++a) d[a] = load8(dy + (o0 + a) * V + j), sb[a] += d[a];
    for (int t = 0; t < TC; ++t) {
      const v8 xv = load8(x + (c0 + t) * V + j);
      for (int a = 0; a < TO; ++a) acc[a][t] += d[a] * xv;
    }
  }
  for (int a = 0; a < TO; ++a) {
    float s = vec::sum8(sb[a]);
    for (int t = 0; t < TC; ++t) {
      float g = vec::sum8(acc[a][t]);
      for (int jj = j; jj < cnt; ++jj) g += dy[(o0 + a) * V + jj] * x[(c0 + t) * V + jj];
      dw[(o0 + a) * cin + c0 + t] += g;
    }
    for (int jj = j; jj < cnt; ++jj) s += dy[(o0 + a) * V + jj];
    if (with_db) db[o0 + a] += s;
  }
}

}  // namespace

void conv1_forward_heads(const float* x, const std::vector<Conv1Head>& heads, int n, int cin, int64_t V) {
  ProfileScope prof("conv1_forward");
  const int ch = chunk_width(n, V);
  const int64_t chunks = (V + ch - 1) / ch;
  parallel_for(n * chunks, [&](int64_t item, int) {
    const int64_t img = item / chunks, v0 = (item % chunks) * ch;
    const int cnt = (int)std::min<int64_t>(ch, V - v0);
    // Rows of one image are V floats apart, often a power of two: reading 16 of
    // them at once thrashed the L1 sets. A packed copy of the sub-chunk, rows kPad
    // floats apart, is read instead.
    thread_local std::vector<float> xp;
    xp.resize((size_t)cin * kPad);
    for (int s0 = 0; s0 < cnt; s0 += kSub) {
      const int m = std::min(kSub, cnt - s0);
      pack_rows(x + img * cin * V + v0 + s0, V, cin, m, xp.data());
      for (const Conv1Head& h : heads) {
        float* yi = h.y + img * h.cout * V + v0 + s0;
        int o = 0;
        for (; o + 4 <= h.cout; o += 4) forward_rows<4>(xp.data(), kPad, h.w, h.b, yi, V, o, cin, m);
        for (; o < h.cout; ++o) forward_rows<1>(xp.data(), kPad, h.w, h.b, yi, V, o, cin, m);
      }
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
  int out_rows = 0;  // every head's output channels
  for (size_t k = 0; k < heads.size(); ++k) {
    offset[k + 1] = offset[k] + (size_t)heads[k].cout * (cin + 1);
    out_rows += heads[k].cout;
  }
  std::vector<std::vector<float>> partial(static_parts(n * chunks));
  parallel_for_static(n * chunks, [&](int64_t item, int thread) {
    const int64_t img = item / chunks, v0 = (item % chunks) * ch;
    const int cnt = (int)std::min<int64_t>(ch, V - v0);
    auto& acc = partial[thread];
    if (acc.empty()) acc.assign(offset.back(), 0.f);
    // Packed copies of the sub-chunk's x and dy rows (see the forward).
    thread_local std::vector<float> xp, dyp;
    xp.resize((size_t)cin * kPad);
    dyp.resize((size_t)out_rows * kPad);
    std::vector<const float*> dys(heads.size());
    for (int s0 = 0; s0 < cnt; s0 += kSub) {
      const int m = std::min(kSub, cnt - s0);
      pack_rows(x + img * cin * V + v0 + s0, V, cin, m, xp.data());
      size_t row = 0;
      for (size_t k = 0; k < heads.size(); ++k) {
        pack_rows(heads[k].dy + img * heads[k].cout * V + v0 + s0, V, heads[k].cout, m, dyp.data() + row * kPad);
        dys[k] = dyp.data() + row * kPad;
        row += heads[k].cout;
      }
      if (dx_accumulate) {
        float* dxi = dx_accumulate + img * cin * V + v0 + s0;
        int c = 0;
        for (; c + 4 <= cin; c += 4) data_rows<4>(heads, dys, kPad, dxi, V, c, cin, m);
        for (; c < cin; ++c) data_rows<1>(heads, dys, kPad, dxi, V, c, cin, m);
      }
      for (size_t k = 0; k < heads.size(); ++k) {
        const int cout = heads[k].cout;
        float* dw = &acc[offset[k]];
        float* db = dw + (size_t)cout * cin;
        int o = 0;
        for (; o + 2 <= cout; o += 2) {
          int c = 0;
          for (; c + 4 <= cin; c += 4) weight_rows<2, 4>(xp.data(), dys[k], kPad, dw, db, o, c, cin, m, c == 0);
          for (; c < cin; ++c) weight_rows<2, 1>(xp.data(), dys[k], kPad, dw, db, o, c, cin, m, c == 0);
        }
        for (; o < cout; ++o)
          for (int c = 0; c < cin; ++c) weight_rows<1, 1>(xp.data(), dys[k], kPad, dw, db, o, c, cin, m, c == 0);
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
