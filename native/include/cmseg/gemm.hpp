// Single-precision matrix multiply used by every CPU reference layer.
// C[M,N] = alpha * op(A)[M,K] * op(B)[K,N] + beta * C, row-major, op = transpose if flagged.
#pragma once

namespace cmseg {

// Runs on the calling thread; layers call it from their own parallel loops.
void sgemm(bool trans_a, bool trans_b, int M, int N, int K, float alpha, const float* A, int lda,
           const float* B, int ldb, float beta, float* C, int ldc);

// The same product with the columns of C split across the thread pool.
void sgemm_parallel(bool trans_a, bool trans_b, int M, int N, int K, float alpha, const float* A,
                    int lda, const float* B, int ldb, float beta, float* C, int ldc);

}  // namespace cmseg
