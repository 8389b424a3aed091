// Matrix products as plain data, so that the device (cuBLAS) and the host (a
// reference GEMM, for the emulation and the tests) run the same calls: used by the
// GEMM transposed convolution (upconv2_gemm.hpp) and the 1x1 heads' weight
// gradients (conv1_cublas.cu).
#pragma once
#include <algorithm>
#include <cstdint>

#ifdef __CUDACC__
#define CMSEG_HD __host__ __device__ __forceinline__
#else
#define CMSEG_HD inline
#endif

namespace cmseg {
namespace cuda {

// One column-major GEMM, C = op(A) op(B) + beta C (cuBLAS's convention), with the
// matrices given as offsets from the base pointers the caller names.
struct GemmCall {
  bool ta = false, tb = false;
  int m = 0, n = 0, k = 0;
  int64_t a_off = 0, b_off = 0, c_off = 0;
  int lda = 0, ldb = 0, ldc = 0;
  float beta = 0.f;
};
// C[m, n] (ldc) = op(A)[m, k] (lda) op(B)[k, n] (ldb) + beta C, at the given offsets.
inline GemmCall gemm_call(bool ta, bool tb, int m, int n, int k, int64_t a_off, int lda, int64_t b_off, int ldb,
                          int64_t c_off, int ldc, float beta = 0.f) {
  GemmCall c;
  c.ta = ta, c.tb = tb, c.m = m, c.n = n, c.k = k;
  c.a_off = a_off, c.lda = lda, c.b_off = b_off, c.ldb = ldb, c.c_off = c_off, c.ldc = ldc, c.beta = beta;
  return c;
}

// A weight gradient is a product with a long inner dimension (the positions, 10^5
// to 10^7) and a small output (channels x channels): one GEMM would run on a
// handful of thread blocks. So the positions are split into `batches` runs of k,
// run as one strided batch of GEMMs into separate slots of a partial buffer (slot
// stride m * n floats), plus one more GEMM for the remainder when the split is not
// even. The caller adds the slots to the gradient in slot order (add_slots), so the
// result does not depend on timing.
struct FilterSplit {
  GemmCall batch;       // batch b: A + b * stride, B + b * stride, C + b * slot
  int batches = 1;
  int64_t stride = 0;   // along A and B between batches (k positions)
  int64_t slot = 0;     // floats per partial slot (m * n)
  bool has_rest = false;
  GemmCall rest;        // the remaining positions, into the slot after the batches
  int slots() const { return batches + (has_rest ? 1 : 0); }
};
constexpr int kFilterSplitMin = 8192;  // positions per batch, at least (by default)
constexpr int kFilterSplitMax = 32;    // batches, at most

// c: op(A) = A^T and op(B) = B, A stored [k, m] and B [k, n] (column-major), both
// one element further per step along k: true of X^T-style operands whose rows are
// positions. Its slots start at first_slot of the partial buffer (ldc = m).
inline FilterSplit split_long_k(const GemmCall& c, int split_min, int first_slot) {
  FilterSplit f;
  f.batches = std::max(1, std::min(kFilterSplitMax, c.k / std::max(1, split_min)));
  const int k = c.k / f.batches, rest = c.k - k * f.batches;
  f.batch = c;
  f.batch.k = k;
  f.batch.ldc = c.m;
  f.slot = (int64_t)c.m * c.n;
  f.batch.c_off = f.slot * first_slot;
  f.batch.beta = 0.f;
  f.stride = k;
  f.has_rest = rest > 0;
  if (f.has_rest) {
    f.rest = f.batch;
    f.rest.k = rest;
    f.rest.a_off += (int64_t)k * f.batches;
    f.rest.b_off += (int64_t)k * f.batches;
    f.rest.c_off = f.slot * (first_slot + f.batches);
  }
  return f;
}

// The reference of a GemmCall on the host (alpha = 1), for the emulation and tests.
inline void gemm_reference(const GemmCall& c, const float* A, const float* B, float* C) {
  A += c.a_off, B += c.b_off, C += c.c_off;
  for (int j = 0; j < c.n; ++j)
    for (int i = 0; i < c.m; ++i) {
      double s = 0;
      for (int l = 0; l < c.k; ++l) {
        const float a = c.ta ? A[l + (int64_t)i * c.lda] : A[i + (int64_t)l * c.lda];
        const float b = c.tb ? B[j + (int64_t)l * c.ldb] : B[l + (int64_t)j * c.ldb];
        s += (double)a * b;
      }
      float& out = C[i + (int64_t)j * c.ldc];
      out = (float)(s + (c.beta != 0.f ? (double)c.beta * out : 0.0));
    }
}

inline void split_reference(const FilterSplit& f, const float* A, const float* B, float* partial) {
  for (int b = 0; b < f.batches; ++b) {
    GemmCall c = f.batch;
    c.a_off += b * f.stride, c.b_off += b * f.stride, c.c_off += b * f.slot;
    gemm_reference(c, A, B, partial);
  }
  if (f.has_rest) gemm_reference(f.rest, A, B, partial);
}

// dst[e] += the slots' entries e, in slot order (summed in double).
inline void add_slots_reference(const float* partial, int slots, int64_t slot, float* dst) {
  for (int64_t e = 0; e < slot; ++e) {
    double s = 0;
    for (int b = 0; b < slots; ++b) s += partial[b * slot + e];
    dst[e] += (float)s;
  }
}

}  // namespace cuda
}  // namespace cmseg
