// A packed, cache-blocked GEMM (the Goto/BLIS scheme): op(B) is packed into
// KC x NR column panels, op(A) into MR x KC row panels, and a register-blocked
// MR x NR micro-kernel accumulates each tile. Written with GCC/Clang vector
// extensions so that -march=native turns it into FMA code; a scalar loop
// stands in for other compilers.
#include "cmseg/gemm.hpp"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>

#include "cmseg/threads.hpp"

namespace cmseg {
namespace {

constexpr int MR = 6;
constexpr int NR = 16;
constexpr int KC = 256;
constexpr int MC = 120;   // multiple of MR
constexpr int NC = 2048;  // multiple of NR

struct AlignedFree {
  void operator()(float* p) const { std::free(p); }
};
using Buffer = std::unique_ptr<float, AlignedFree>;

Buffer alloc_aligned(size_t floats) {
  void* p = std::aligned_alloc(64, ((floats * sizeof(float) + 63) / 64) * 64);
  if (!p) throw std::bad_alloc();
  return Buffer(static_cast<float*>(p));
}

// Packs rows [i0, i0+mc) x cols [k0, k0+kc) of op(A) as MR-row panels, k-major.
// Loops run along the source's contiguous axis.
void pack_a(bool ta, const float* A, int lda, int i0, int mc, int k0, int kc, float* out) {
  for (int ip = 0; ip < mc; ip += MR) {
    const int rows = std::min(MR, mc - ip);
    if (ta) {
      for (int k = 0; k < kc; ++k) {
        const float* src = A + (size_t)(k0 + k) * lda + i0 + ip;
        for (int r = 0; r < rows; ++r) out[k * MR + r] = src[r];
        for (int r = rows; r < MR; ++r) out[k * MR + r] = 0.f;
      }
    } else {
      for (int r = 0; r < rows; ++r) {
        const float* src = A + (size_t)(i0 + ip + r) * lda + k0;
        for (int k = 0; k < kc; ++k) out[k * MR + r] = src[k];
      }
      for (int r = rows; r < MR; ++r)
        for (int k = 0; k < kc; ++k) out[k * MR + r] = 0.f;
    }
    out += (size_t)kc * MR;
  }
}

// Packs rows [k0, k0+kc) x cols [j0, j0+nc) of op(B) as NR-column panels, k-major.
void pack_b(bool tb, const float* B, int ldb, int k0, int kc, int j0, int nc, float* out) {
  for (int jp = 0; jp < nc; jp += NR) {
    const int cols = std::min(NR, nc - jp);
    if (!tb) {
      for (int k = 0; k < kc; ++k) {
        const float* src = B + (size_t)(k0 + k) * ldb + j0 + jp;
        if (cols == NR) {
          std::memcpy(out + k * NR, src, NR * sizeof(float));
        } else {
          for (int c = 0; c < cols; ++c) out[k * NR + c] = src[c];
          for (int c = cols; c < NR; ++c) out[k * NR + c] = 0.f;
        }
      }
    } else {
      for (int c = 0; c < cols; ++c) {
        const float* src = B + (size_t)(j0 + jp + c) * ldb + k0;
        for (int k = 0; k < kc; ++k) out[k * NR + c] = src[k];
      }
      for (int c = cols; c < NR; ++c)
        for (int k = 0; k < kc; ++k) out[k * NR + c] = 0.f;
    }
    out += (size_t)kc * NR;
  }
}

#if defined(__GNUC__) || defined(__clang__)
typedef float v8 __attribute__((vector_size(32)));

// acc[MR x NR] = Ap(MR x kc) * Bp(kc x NR). Bp is 64-byte aligned (packed
// panels start at multiples of NR floats), so its rows load as aligned vectors.
inline void micro_kernel(int kc, const float* Ap, const float* Bp, float* acc) {
  v8 c00 = {}, c01 = {}, c10 = {}, c11 = {}, c20 = {}, c21 = {};
  v8 c30 = {}, c31 = {}, c40 = {}, c41 = {}, c50 = {}, c51 = {};
  const v8* B = reinterpret_cast<const v8*>(__builtin_assume_aligned(Bp, 32));
  for (int k = 0; k < kc; ++k) {
    const v8 b0 = B[0], b1 = B[1];
    float a;
    a = Ap[0]; c00 += a * b0; c01 += a * b1;
    a = Ap[1]; c10 += a * b0; c11 += a * b1;
    a = Ap[2]; c20 += a * b0; c21 += a * b1;
    a = Ap[3]; c30 += a * b0; c31 += a * b1;
    a = Ap[4]; c40 += a * b0; c41 += a * b1;
    a = Ap[5]; c50 += a * b0; c51 += a * b1;
    Ap += MR;
    B += 2;
  }
  v8* out = reinterpret_cast<v8*>(__builtin_assume_aligned(acc, 32));
  out[0] = c00, out[1] = c01, out[2] = c10, out[3] = c11, out[4] = c20, out[5] = c21;
  out[6] = c30, out[7] = c31, out[8] = c40, out[9] = c41, out[10] = c50, out[11] = c51;
}
#else
inline void micro_kernel(int kc, const float* Ap, const float* Bp, float* acc) {
  for (int i = 0; i < MR * NR; ++i) acc[i] = 0.f;
  for (int k = 0; k < kc; ++k)
    for (int r = 0; r < MR; ++r)
      for (int c = 0; c < NR; ++c) acc[r * NR + c] += Ap[k * MR + r] * Bp[k * NR + c];
}
#endif

}  // namespace

void sgemm(bool ta, bool tb, int M, int N, int K, float alpha, const float* A, int lda, const float* B, int ldb,
           float beta, float* C, int ldc) {
  if (M <= 0 || N <= 0) return;
  if (beta != 1.f) {
    for (int i = 0; i < M; ++i) {
      float* row = C + (size_t)i * ldc;
      if (beta == 0.f)
        std::fill(row, row + N, 0.f);
      else
        for (int j = 0; j < N; ++j) row[j] *= beta;
    }
  }
  if (K <= 0 || alpha == 0.f) return;

  thread_local Buffer a_buf, b_buf;
  if (!a_buf) a_buf = alloc_aligned((size_t)MC * KC);
  if (!b_buf) b_buf = alloc_aligned((size_t)KC * NC);
  alignas(64) float acc[MR * NR];

  for (int j0 = 0; j0 < N; j0 += NC) {
    int nc = std::min(NC, N - j0);
    for (int k0 = 0; k0 < K; k0 += KC) {
      int kc = std::min(KC, K - k0);
      pack_b(tb, B, ldb, k0, kc, j0, nc, b_buf.get());
      for (int i0 = 0; i0 < M; i0 += MC) {
        int mc = std::min(MC, M - i0);
        pack_a(ta, A, lda, i0, mc, k0, kc, a_buf.get());
        for (int jr = 0; jr < nc; jr += NR) {
          int cols = std::min(NR, nc - jr);
          const float* Bp = b_buf.get() + (size_t)(jr / NR) * kc * NR;
          for (int ir = 0; ir < mc; ir += MR) {
            int rows = std::min(MR, mc - ir);
            micro_kernel(kc, a_buf.get() + (size_t)(ir / MR) * kc * MR, Bp, acc);
            float* Ct = C + (size_t)(i0 + ir) * ldc + j0 + jr;
            for (int r = 0; r < rows; ++r) {
              float* crow = Ct + (size_t)r * ldc;
              const float* arow = acc + r * NR;
              if (alpha == 1.f)
                for (int c = 0; c < cols; ++c) crow[c] += arow[c];
              else
                for (int c = 0; c < cols; ++c) crow[c] += alpha * arow[c];
            }
          }
        }
      }
    }
  }
}

void sgemm_parallel(bool ta, bool tb, int M, int N, int K, float alpha, const float* A, int lda, const float* B,
                    int ldb, float beta, float* C, int ldc) {
  // Split C's columns in NR-aligned slabs, one or more per thread.
  int slabs = std::max(1, std::min(num_threads() * 2, (N + NR * 4 - 1) / (NR * 4)));
  int per = ((N + slabs - 1) / slabs + NR - 1) / NR * NR;
  parallel_for(slabs, [&](int64_t s, int) {
    int j0 = (int)s * per;
    int nc = std::min(per, N - j0);
    if (nc <= 0) return;
    const float* Bs = tb ? B + (size_t)j0 * ldb : B + j0;
    sgemm(ta, tb, M, nc, K, alpha, A, lda, Bs, ldb, beta, C + j0, ldc);
  });
}

}  // namespace cmseg
