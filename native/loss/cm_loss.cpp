// The fused confusion-matrix loss (SPEC sections 3 and 4).
//
// For each pixel: p = softmax(z); for each annotator r who labelled the image,
// A_r = column-normalised softplus of the head's raw channels; q_r = A_r p;
// CE_r += -log(max(q_r[c], 1e-12)) when the pixel is labelled c; T_r += trace(A_r).
// The gradients follow SPEC section 4 in the same pass:
//   g[i][j]   = w_ce * (-[i == c] p[j] / q[c]) + w_tr * lambda * [i == j]
//   dL/da[k][j] = (g[k][j] - sum_i g[i][j] A[i][j]) / S_j
//   dL/dp[j]  += w_ce * (-A[c][j] / q[c]),   dz = p * (dp - <p, dp>)
// with w_ce = 1/|P_r| and w_tr = 1/|V_r| (the averaging weights).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>

#include "cmseg/error.hpp"
#include "cmseg/loss.hpp"
#include "cmseg/profile.hpp"
#include "cmseg/threads.hpp"

namespace cmseg {

// softplus_rows.cpp: sp[i] = softplus(x[i]), sg[i] = sigmoid(x[i]), vectorised.
void softplus_sigmoid_rows(const float* x, float* sp, float* sg, int64_t count);
void exp_inplace(float* x, int64_t count);
void log_inplace(float* x, int64_t count);

namespace {

constexpr int kMaxRank = 8;
constexpr int kLanes = 8;  // pixels per vector step of the full-CM pass (AVX2 width)

// softplus(x) = log(1 + e^x) and its derivative sigmoid(x) from one exp. Above
// 20, log1p(e^x) equals x and sigmoid equals 1 in float32.
inline void softplus_sigmoid(float x, float& sp, float& sg) {
  if (x > 20.f) {
    sp = x, sg = 1.f;
    return;
  }
  const float e = std::exp(x);
  sp = std::log1p(e);
  sg = e / (1.f + e);
}

// One pixel's CM and the intermediates its backward pass needs.
struct PixelCm {
  int L = 0, rank = 1;
  CmMode mode = CmMode::Full;
  float a[kMaxClasses * kMaxClasses];     // unnormalised entries
  float A[kMaxClasses * kMaxClasses];     // column-normalised
  float S[kMaxClasses];                   // column sums of a
  float sig[kMaxClasses * kMaxClasses];   // full/global: sigmoid(u[i][j])
  float spU[kMaxClasses * kMaxRank], spW[kMaxClasses * kMaxRank];
  float sigU[kMaxClasses * kMaxRank], sigW[kMaxClasses * kMaxRank];
  float sp_s = 0, sig_s = 0;

  void compute(const float* raw, int64_t stride) {
    if (mode == CmMode::LowRank) {
      const int l = rank;
      for (int i = 0; i < L * l; ++i) {
        softplus_sigmoid(raw[i * stride], spU[i], sigU[i]);
        softplus_sigmoid(raw[(L * l + i) * stride], spW[i], sigW[i]);
      }
      softplus_sigmoid(raw[(2 * L * l) * stride], sp_s, sig_s);
      for (int i = 0; i < L; ++i)
        for (int j = 0; j < L; ++j) {
          float v = i == j ? sp_s : 0.f;
          for (int k = 0; k < l; ++k) v += spU[i * l + k] * spW[j * l + k];
          a[i * L + j] = v;
        }
    } else {
      for (int e = 0; e < L * L; ++e) softplus_sigmoid(raw[e * stride], a[e], sig[e]);
    }
    normalise();
  }

  // The same as compute() from precomputed softplus / sigmoid rows of the raw
  // channels (channel k of this pixel at sp[k * stride]).
  void load(const float* sp, const float* sg, int64_t stride) {
    if (mode == CmMode::LowRank) {
      const int l = rank;
      for (int i = 0; i < L * l; ++i) {
        spU[i] = sp[i * stride], sigU[i] = sg[i * stride];
        spW[i] = sp[(L * l + i) * stride], sigW[i] = sg[(L * l + i) * stride];
      }
      sp_s = sp[(2 * L * l) * stride], sig_s = sg[(2 * L * l) * stride];
      for (int i = 0; i < L; ++i)
        for (int j = 0; j < L; ++j) {
          float v = i == j ? sp_s : 0.f;
          for (int k = 0; k < l; ++k) v += spU[i * l + k] * spW[j * l + k];
          a[i * L + j] = v;
        }
    } else {
      for (int e = 0; e < L * L; ++e) a[e] = sp[e * stride], sig[e] = sg[e * stride];
    }
    normalise();
  }

  void normalise() {
    for (int j = 0; j < L; ++j) {
      float s = 0.f;
      for (int i = 0; i < L; ++i) s += a[i * L + j];
      S[j] = s;
      const float inv = 1.f / s;
      for (int i = 0; i < L; ++i) A[i * L + j] = a[i * L + j] * inv;
    }
  }

  // Given g = dL/dA, writes dL/d(raw) (strided) or accumulates it (global).
  void backward(const float* g, float* draw, int64_t stride, bool accumulate) const {
    float da[kMaxClasses * kMaxClasses];
    for (int j = 0; j < L; ++j) {
      float dot = 0.f;
      for (int i = 0; i < L; ++i) dot += g[i * L + j] * A[i * L + j];
      const float inv = 1.f / S[j];
      for (int k = 0; k < L; ++k) da[k * L + j] = (g[k * L + j] - dot) * inv;
    }
    if (mode == CmMode::LowRank) {
      const int l = rank;
      for (int i = 0; i < L; ++i)
        for (int k = 0; k < l; ++k) {
          float su = 0.f, sw = 0.f;
          for (int j = 0; j < L; ++j) {
            su += da[i * L + j] * spW[j * l + k];  // d a[i][j] / d spU[i][k]
            sw += da[j * L + i] * spU[j * l + k];  // d a[j][i] / d spW[i][k]
          }
          put(draw, (i * l + k) * stride, su * sigU[i * l + k], accumulate);
          put(draw, (L * l + i * l + k) * stride, sw * sigW[i * l + k], accumulate);
        }
      float ds = 0.f;
      for (int i = 0; i < L; ++i) ds += da[i * L + i];
      put(draw, (2 * L * l) * stride, ds * sig_s, accumulate);
    } else {
      for (int e = 0; e < L * L; ++e) put(draw, e * stride, da[e] * sig[e], accumulate);
    }
  }

  static void put(float* p, int64_t at, float v, bool accumulate) {
    if (accumulate)
      p[at] += v;
    else
      p[at] = v;
  }
};


// Whether a row holds only finite values. The softplus rows (softplus_rows.cpp,
// fast-math, clamped at 20) would turn a NaN raw channel into a finite CM and hide
// a diverged head from the trainer's non-finite-loss check; x * 0 is 0 only for
// finite x. Vectorised through independent lanes (this file is not fast-math).
bool row_finite(const float* x, int64_t n) {
  float lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) lanes[l] += x[i + l] * 0.f;
  float t = 0.f;
  for (; i < n; ++i) t += x[i] * 0.f;
  for (int l = 0; l < kLanes; ++l) t += lanes[l];
  return t == 0.f;
}

// Softmax over L channel rows (row k at z[k * zstride]) of `cnt` pixels into p[k * cnt + v].
void softmax_rows(const float* z, int64_t zstride, int L, int64_t cnt, float* p) {
  thread_local std::vector<float> m, s;
  m.assign(z, z + cnt);
  for (int k = 1; k < L; ++k)
    for (int64_t v = 0; v < cnt; ++v) m[v] = std::max(m[v], z[k * zstride + v]);
  for (int k = 0; k < L; ++k)
    for (int64_t v = 0; v < cnt; ++v) p[k * cnt + v] = z[k * zstride + v] - m[v];
  exp_inplace(p, (int64_t)L * cnt);
  s.assign(cnt, 0.f);
  for (int k = 0; k < L; ++k)
    for (int64_t v = 0; v < cnt; ++v) s[v] += p[k * cnt + v];
  for (int64_t v = 0; v < cnt; ++v) s[v] = 1.f / s[v];
  for (int k = 0; k < L; ++k)
    for (int64_t v = 0; v < cnt; ++v) p[k * cnt + v] *= s[v];
}

// The full-CM pass for kLanes neighbouring pixels at once, every quantity a
// [entry][lane] array so that the fixed-width lane loops become vector code.
// sp/sg/p/dp are chunk rows (stride `rs`), draw the head gradient (stride V).
// Same math as PixelCm::compute/backward, with g = dL/dA expanded:
//   g[k][j] = diag [k == j] - [k == c] p[j] inv,   inv = w_ce / q_c (0 if unlabelled)
//   dot[j]  = sum_k g[k][j] A[k][j] = diag A[j][j] - inv p[j] A[c][j]
void full_cm_lanes(int L, const float* sp, const float* sg, int64_t rs, const float* p, float* dp, const uint8_t* lab,
                   bool grads, float wce, float diag, float* q, float* draw, int64_t V, double* tr) {
  constexpr int W = kLanes;
  float A[kMaxClasses * kMaxClasses][W], invS[kMaxClasses][W], pl[kMaxClasses][W];
  // onehot[k][l] = [label of lane l == k]: float masks keep every lane loop below
  // in vector arithmetic (integer compares mixed in left the stores scalar).
  float onehot[kMaxClasses][W];
  for (int k = 0; k < L; ++k)
    for (int l = 0; l < W; ++l) onehot[k][l] = lab[l] == k ? 1.f : 0.f;
  for (int e = 0; e < L * L; ++e)
    for (int l = 0; l < W; ++l) A[e][l] = sp[e * rs + l];
  for (int j = 0; j < L; ++j) {
    float s[W] = {};
    for (int k = 0; k < L; ++k)
      for (int l = 0; l < W; ++l) s[l] += A[k * L + j][l];
    for (int l = 0; l < W; ++l) invS[j][l] = 1.f / s[l];
    for (int k = 0; k < L; ++k)
      for (int l = 0; l < W; ++l) A[k * L + j][l] *= invS[j][l];
    for (int l = 0; l < W; ++l) pl[j][l] = p[j * rs + l];
  }
  {
    float t[W] = {};
    for (int k = 0; k < L; ++k)
      for (int l = 0; l < W; ++l) t[l] += A[k * L + k][l];
    for (int l = 0; l < W; ++l) tr[l] += t[l];  // double: the loss is a mean over ~10^5 pixels
  }
  // q_c = (A p)[c]: every row's product, the labelled one kept.
  float qc[W] = {};
  for (int k = 0; k < L; ++k) {
    float t[W] = {};
    for (int j = 0; j < L; ++j)
      for (int l = 0; l < W; ++l) t[l] += A[k * L + j][l] * pl[j][l];
    for (int l = 0; l < W; ++l) qc[l] += onehot[k][l] * t[l];
  }
  float inv[W];
  for (int l = 0; l < W; ++l) {
    const bool labelled = lab[l] != kUnlabelled;
    q[l] = labelled ? std::max(qc[l], kProbFloor) : 1.f;
    inv[l] = labelled && qc[l] > kProbFloor ? wce / qc[l] : 0.f;  // the clamp has zero gradient
  }
  if (!grads) return;
  for (int j = 0; j < L; ++j) {
    float acj[W] = {}, dot[W], pinv[W], dpj[W];
    for (int k = 0; k < L; ++k)
      for (int l = 0; l < W; ++l) acj[l] += onehot[k][l] * A[k * L + j][l];
    std::memcpy(dpj, dp + j * rs, sizeof dpj);
    for (int l = 0; l < W; ++l) {
      pinv[l] = pl[j][l] * inv[l];
      dot[l] = diag * A[j * L + j][l] - pinv[l] * acj[l];
      dpj[l] -= acj[l] * inv[l];
    }
    std::memcpy(dp + j * rs, dpj, sizeof dpj);
    for (int k = 0; k < L; ++k) {
      const float* sgk = sg + (k * L + j) * rs;
      const float dk = k == j ? diag : 0.f;
      float d[W];
      for (int l = 0; l < W; ++l) d[l] = (dk - onehot[k][l] * pinv[l] - dot[l]) * invS[j][l] * sgk[l];
      std::memcpy(draw + (int64_t)(k * L + j) * V, d, sizeof d);
    }
  }
}

}  // namespace

CmMode parse_cm_mode(const std::string& s) {
  if (s == "full") return CmMode::Full;
  if (s == "lowrank") return CmMode::LowRank;
  if (s == "global") return CmMode::Global;
  fail("unknown cmMode '", s, "' (expected full, lowrank or global)");
}

const char* cm_mode_name(CmMode m) {
  switch (m) {
    case CmMode::Full: return "full";
    case CmMode::LowRank: return "lowrank";
    default: return "global";
  }
}

int cm_head_channels(CmMode mode, int L, int rank) {
  switch (mode) {
    case CmMode::Full: return L * L;
    case CmMode::LowRank: return 2 * L * rank + 1;
    default: return 0;
  }
}

void cm_from_raw(CmMode mode, int L, int rank, const float* raw, int64_t stride, float* A) {
  PixelCm cm;
  cm.L = L, cm.rank = rank, cm.mode = mode;
  cm.compute(raw, stride);
  std::memcpy(A, cm.A, sizeof(float) * L * L);
}

void cm_rows_from_raw(CmMode mode, int L, int rank, const float* raw, int64_t stride, int64_t count, float* A,
                      int64_t out_stride) {
  const int64_t os = out_stride > 0 ? out_stride : count;
  const int K = cm_head_channels(mode, L, rank);
  if (K == 0) fail("cm_rows_from_raw: a global CM has no per-pixel raw channels");
  thread_local std::vector<float> sp, sg;
  sp.resize((size_t)K * count);
  sg.resize((size_t)K * count);
  bool finite = true;
  for (int k = 0; k < K; ++k) {
    const float* row = raw + k * stride;
    finite = finite && row_finite(row, count);
    softplus_sigmoid_rows(row, &sp[(size_t)k * count], &sg[(size_t)k * count], count);
  }
  PixelCm cm;
  cm.L = L, cm.rank = rank, cm.mode = mode;
  if (!finite) {
    // The fast rows clamp a NaN into a finite CM: the pixel path keeps it NaN.
    for (int64_t v = 0; v < count; ++v) {
      cm.compute(raw + v, stride);
      for (int e = 0; e < L * L; ++e) A[e * os + v] = cm.A[e];
    }
    return;
  }
  if (mode == CmMode::Full) {
    // PixelCm::normalise along the run: the same operations in the same order, per pixel.
    for (int j = 0; j < L; ++j) {
      for (int64_t v = 0; v < count; ++v) {
        float s = 0.f;
        for (int i = 0; i < L; ++i) s += sp[(size_t)(i * L + j) * count + v];
        const float inv = 1.f / s;
        for (int i = 0; i < L; ++i) A[(i * L + j) * os + v] = sp[(size_t)(i * L + j) * count + v] * inv;
      }
    }
    return;
  }
  for (int64_t v = 0; v < count; ++v) {
    cm.load(&sp[v], &sg[v], count);
    for (int e = 0; e < L * L; ++e) A[e * os + v] = cm.A[e];
  }
}

void cm_loss(const CmLossInput& in, CmLossOutput& out) {
  ProfileScope prof("cm_loss");
  const int n = in.n, L = in.L, R = in.R;
  const int64_t V = in.V;
  if (L < 2 || L > kMaxClasses) fail("classes must be in 2..", kMaxClasses, ", got ", L);
  if (in.mode == CmMode::LowRank && (in.rank < 1 || in.rank > kMaxRank))
    fail("cmRank must be in 1..", kMaxRank, ", got ", in.rank);
  if ((int)in.cm_raw.size() != R || (int)in.labels.size() != R) fail("cm_loss: expected ", R, " annotators");
  const bool global = in.mode == CmMode::Global;
  const int K = global ? L * L : cm_head_channels(in.mode, L, in.rank);
  auto present = [&](int i, int r) { return !in.present || in.present[i * R + r] != 0; };

  // Averaging weights: |P_r| labelled pixels, |V_r| pixels of the images r labelled.
  std::vector<int64_t> labelled((size_t)n * R, 0);
  parallel_for((int64_t)n * R, [&](int64_t item, int) {
    const int i = (int)(item / R), r = (int)(item % R);
    if (!present(i, r)) return;
    const uint8_t* lab = in.labels[r] + (int64_t)i * V;
    int64_t c = 0;
    for (int64_t v = 0; v < V; ++v) c += lab[v] != kUnlabelled;
    labelled[item] = c;
  });
  std::vector<double> w_ce(R, 0.0), w_tr(R, 0.0);
  for (int r = 0; r < R; ++r) {
    int64_t p = 0, imgs = 0;
    for (int i = 0; i < n; ++i) {
      p += labelled[(size_t)i * R + r];
      imgs += present(i, r);
    }
    // SPEC 4: an annotator with no labelled pixel in the batch contributes to neither term.
    w_ce[r] = p ? 1.0 / p : 0.0;
    w_tr[r] = p && imgs ? 1.0 / ((double)imgs * V) : 0.0;
  }

  const bool grads = out.d_seg_logits != nullptr;
  const float lam = in.trace_weight;
  // Chunks small enough that their softplus/sigmoid rows (R x K x kChunk x 2) stay in L2.
  constexpr int64_t kChunk = 512;
  const int64_t chunks = (V + kChunk - 1) / kChunk;
  const int threads = static_parts((int64_t)n * chunks);  // partial sums per part: deterministic
  std::vector<double> ce_part((size_t)threads * R, 0.0), tr_part((size_t)threads * R, 0.0);
  // Annotators whose head produced NaN or Inf somewhere (set by any thread; only ever to 1).
  std::vector<std::atomic<int>> nonfinite(R);
  for (auto& f : nonfinite) f = 0;
  // Per-thread partials of the global CM gradient, summed after the pass. Double: each is a
  // sum of one term a pixel over a thread's share of the batch (10^5..10^6 voxels in 3D),
  // which in float drifted by ~1e-4 relative; each chunk sums its own pixels in float first.
  std::vector<double> gcm_part(global && grads ? (size_t)threads * R * L * L : 0, 0.0);

  parallel_for_static((int64_t)n * chunks, [&](int64_t item, int thread) {
    const int i = (int)(item / chunks);
    const int64_t v0 = (item % chunks) * kChunk, v1 = std::min(V, v0 + kChunk);
    const int64_t cnt = v1 - v0;
    // Per-chunk rows, [channel][pixel of the chunk]: vectorised along the pixels.
    thread_local std::vector<float> sp_rows, sg_rows, p_rows, dp_rows, q_rows;
    p_rows.resize((size_t)L * cnt);
    q_rows.resize((size_t)R * cnt);
    softmax_rows(in.seg_logits + (int64_t)i * L * V + v0, V, L, cnt, p_rows.data());
    if (grads) dp_rows.assign((size_t)L * cnt, 0.f);
    // A global CM is the same at every pixel: compute it once per chunk.
    PixelCm cm;
    cm.L = L, cm.rank = in.rank, cm.mode = in.mode;
    std::vector<PixelCm> gcm;
    if (global) {
      gcm.assign(R, cm);
      for (int r = 0; r < R; ++r) gcm[r].compute(in.cm_raw[r], 1);
    }
    // Softplus and sigmoid of every raw channel of this chunk, one vectorised row at a time.
    if (!global) {
      sp_rows.resize((size_t)R * K * cnt);
      sg_rows.resize((size_t)R * K * cnt);
      for (int r = 0; r < R; ++r) {
        if (!present(i, r)) continue;
        for (int k = 0; k < K; ++k) {
          const size_t row = ((size_t)r * K + k) * cnt;
          const float* raw = in.cm_raw[r] + ((int64_t)i * K + k) * V + v0;
          if (!row_finite(raw, cnt)) nonfinite[r] = 1;
          softplus_sigmoid_rows(raw, &sp_rows[row], &sg_rows[row], cnt);
        }
      }
    }
    double* tr_acc = &tr_part[(size_t)thread * R];
    for (int r = 0; r < R; ++r) {
      float* q = &q_rows[(size_t)r * cnt];
      const int64_t head = (int64_t)i * K * V + v0;  // raw channel 0 of the chunk's first pixel
      if (!present(i, r)) {
        std::fill(q, q + cnt, 1.f);  // log 1 = 0: no CE
        if (grads && !global)
          for (int k = 0; k < K; ++k) std::fill_n(out.d_cm_raw[r] + head + k * V, cnt, 0.f);
        continue;
      }
      const uint8_t* lab = in.labels[r] + (int64_t)i * V + v0;
      const float wce = (float)w_ce[r], diag = (float)w_tr[r] * lam;
      const float* sp = global ? nullptr : &sp_rows[(size_t)r * K * cnt];
      const float* sg = global ? nullptr : &sg_rows[(size_t)r * K * cnt];
      int64_t v = 0;
      if (in.mode == CmMode::Full) {
        double tr_lanes[kLanes] = {};
        for (; v + kLanes <= cnt; v += kLanes)
          full_cm_lanes(L, sp + v, sg + v, cnt, p_rows.data() + v, grads ? dp_rows.data() + v : nullptr, lab + v,
                        grads, wce, diag, q + v, grads ? out.d_cm_raw[r] + head + v : nullptr, V, tr_lanes);
        for (int l = 0; l < kLanes; ++l) tr_acc[r] += tr_lanes[l];
      }
      float p[kMaxClasses], g[kMaxClasses * kMaxClasses];
      float gcm_chunk[kMaxClasses * kMaxClasses] = {};  // global: this chunk's dL/d(raw), <= kChunk terms
      for (; v < cnt; ++v) {
        for (int k = 0; k < L; ++k) p[k] = p_rows[k * cnt + v];
        PixelCm& A = global ? gcm[r] : cm;
        if (!global) A.load(sp + v, sg + v, cnt);
        float tr = 0.f;
        for (int k = 0; k < L; ++k) tr += A.A[k * L + k];
        tr_acc[r] += tr;

        const int c = lab[v];
        float qc = 0.f;
        q[v] = 1.f;
        bool ce_grad = false;
        if (c != kUnlabelled) {
          for (int j = 0; j < L; ++j) qc += A.A[c * L + j] * p[j];
          q[v] = std::max(qc, kProbFloor);
          ce_grad = qc > kProbFloor;  // the clamp has zero gradient
        }
        if (!grads) continue;
        for (int e = 0; e < L * L; ++e) g[e] = 0.f;
        for (int k = 0; k < L; ++k) g[k * L + k] = diag;
        if (ce_grad) {
          const float inv = wce / qc;
          for (int j = 0; j < L; ++j) {
            g[c * L + j] -= p[j] * inv;
            dp_rows[j * cnt + v] -= A.A[c * L + j] * inv;
          }
        }
        if (global)
          A.backward(g, gcm_chunk, 1, true);
        else
          A.backward(g, out.d_cm_raw[r] + head + v, V, false);
      }
      if (global && grads) {
        double* part = &gcm_part[((size_t)thread * R + r) * L * L];
        for (int e = 0; e < L * L; ++e) part[e] += gcm_chunk[e];
      }
    }
    // CE_r = sum of -log q over the chunk (q = 1 where nothing is labelled).
    log_inplace(q_rows.data(), (int64_t)R * cnt);
    double* ce_acc = &ce_part[(size_t)thread * R];
    for (int r = 0; r < R; ++r) {
      double s = 0;  // double, as the FD tests of the loss need it
      for (int64_t v = 0; v < cnt; ++v) s -= q_rows[(size_t)r * cnt + v];
      ce_acc[r] += s;
    }
    if (grads) {
      // dz = p * (dp - <p, dp>)
      float* dz = out.d_seg_logits + (int64_t)i * L * V + v0;
      thread_local std::vector<float> dot;
      dot.assign(cnt, 0.f);
      for (int k = 0; k < L; ++k)
        for (int64_t v = 0; v < cnt; ++v) dot[v] += p_rows[k * cnt + v] * dp_rows[k * cnt + v];
      for (int k = 0; k < L; ++k)
        for (int64_t v = 0; v < cnt; ++v) dz[k * V + v] = p_rows[k * cnt + v] * (dp_rows[k * cnt + v] - dot[v]);
    }
  });

  out.ce.assign(R, 0.0);
  out.trace.assign(R, 0.0);
  for (int t = 0; t < threads; ++t)
    for (int r = 0; r < R; ++r) {
      out.ce[r] += ce_part[(size_t)t * R + r];
      out.trace[r] += tr_part[(size_t)t * R + r];
    }
  out.loss = 0;
  for (int r = 0; r < R; ++r) {
    out.ce[r] *= w_ce[r];
    out.trace[r] *= w_tr[r];
    if (nonfinite[r]) out.ce[r] = out.trace[r] = std::nan("");  // as the unfused loss would report it
    out.loss += out.ce[r] + (double)lam * out.trace[r];
  }
  if (global && grads)
    for (int r = 0; r < R; ++r) {
      float* d = out.d_cm_raw[r];
      for (int e = 0; e < L * L; ++e) {
        double s = 0;
        for (int t = 0; t < threads; ++t) s += gcm_part[((size_t)t * R + r) * L * L + e];
        d[e] = (float)s;
      }
    }
}

}  // namespace cmseg
