#include "cmseg/backend.hpp"

#include <cstdio>
#if !defined(_WIN32)
#include <unistd.h>
#endif

#include "cmseg/cuda.hpp"
#include "cmseg/error.hpp"
#include "cmseg/onednn.hpp"
#include "cmseg/threads.hpp"

namespace cmseg {

#if !CMSEG_HAVE_ONEDNN
void onednn::unavailable(const char* what) {
  throw Error(std::string("onednn::") + what + " called in a build without oneDNN");
}
#endif

BackendInfo backend_info() {
  BackendInfo b;
  b.onednn = CMSEG_HAVE_ONEDNN != 0;
  b.cuda = CMSEG_HAVE_CUDA != 0;
  b.cudnn = CMSEG_HAVE_CUDNN != 0;
  // The whole step (forward, loss, backward, Adam) and predict run on the GPU for
  // ModelConfig::device == Device::Cuda whenever the backend is built.
  b.cuda_training = b.cuda;
  b.threads = num_threads();
  b.gpu_available = b.cuda && cuda::available();
  if (b.gpu_available) {
    b.gpu = cuda::device_info().name;
    b.cudnn_version = cuda::cudnn_version();
  } else {
    b.gpu_unavailable_reason = cuda::unavailable_reason();  // a CPU-only build says so too
  }
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

double physical_memory_bytes() {
#if defined(_SC_PHYS_PAGES) && defined(_SC_PAGESIZE)
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
  if (pages > 0 && page > 0) return (double)pages * (double)page;
#endif
  return 0;
}

std::string gib_text(double bytes) {
  char buf[32];
  std::snprintf(buf, sizeof buf, bytes < 0.1 * 1073741824.0 ? "%.3f" : "%.1f", bytes / 1073741824.0);
  return std::string(buf) + " GiB";
}

}  // namespace cmseg
