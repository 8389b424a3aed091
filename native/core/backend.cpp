#include "cmseg/backend.hpp"

#include "cmseg/threads.hpp"

namespace cmseg {

BackendInfo backend_info() {
  BackendInfo b;
  b.onednn = CMSEG_HAVE_ONEDNN != 0;
  b.cuda = CMSEG_HAVE_CUDA != 0;
  b.cudnn = CMSEG_HAVE_CUDNN != 0;
  b.threads = num_threads();
#if defined(__AVX512F__)
  b.simd = "avx512";
#elif defined(__AVX2__)
  b.simd = "avx2";
#elif defined(__SSE2__)
  b.simd = "sse2";
#else
  b.simd = "scalar";
#endif
#if defined(__clang__)
  b.compiler = "clang " __clang_version__;
#elif defined(__GNUC__)
  b.compiler = "gcc " __VERSION__;
#else
  b.compiler = "unknown";
#endif
  return b;
}

}  // namespace cmseg
