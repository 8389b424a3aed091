// sgemm against a naive triple loop, every transpose combination, ragged sizes.
#include "check.hpp"
#include "cmseg/gemm.hpp"

using namespace cmseg;

static void run_case(bool ta, bool tb, int M, int N, int K, float alpha, float beta, bool parallel) {
  auto A = check::random_vector((size_t)M * K, 1 + M + N + K);
  auto B = check::random_vector((size_t)K * N, 2 + M * N);
  auto C = check::random_vector((size_t)M * N, 3 + K);
  std::vector<float> ref = C;
  const int lda = ta ? M : K, ldb = tb ? K : N;
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      double s = 0;
      for (int k = 0; k < K; ++k)
        s += (double)(ta ? A[(size_t)k * lda + i] : A[(size_t)i * lda + k]) *
             (tb ? B[(size_t)j * ldb + k] : B[(size_t)k * ldb + j]);
      ref[(size_t)i * N + j] = (float)(alpha * s + beta * ref[(size_t)i * N + j]);
    }
  if (parallel)
    sgemm_parallel(ta, tb, M, N, K, alpha, A.data(), lda, B.data(), ldb, beta, C.data(), N);
  else
    sgemm(ta, tb, M, N, K, alpha, A.data(), lda, B.data(), ldb, beta, C.data(), N);
  double worst = 0;
  for (size_t i = 0; i < C.size(); ++i) worst = std::max(worst, std::fabs((double)C[i] - ref[i]));
  if (worst > 1e-4 * std::sqrt((double)K + 1)) {
    std::printf("  gemm ta=%d tb=%d %dx%dx%d: max error %g\n", ta, tb, M, N, K, worst);
    ++check::failures();
  }
}

TEST(gemm_matches_naive_all_transposes) {
  const int sizes[][3] = {{1, 1, 1}, {6, 16, 7}, {7, 17, 300}, {130, 45, 513}, {33, 2100, 19}, {5, 3, 0}};
  for (auto& s : sizes)
    for (int ta = 0; ta < 2; ++ta)
      for (int tb = 0; tb < 2; ++tb) {
        run_case(ta, tb, s[0], s[1], s[2], 1.f, 0.f, false);
        run_case(ta, tb, s[0], s[1], s[2], 0.5f, 1.f, false);
        run_case(ta, tb, s[0], s[1], s[2], 1.f, 0.25f, true);
      }
}

TEST_MAIN()
