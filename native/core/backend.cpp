#include "cmseg/backend.hpp"

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
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

double cgroup_memory_limit(const std::string& proc_cgroup,
                           const std::function<bool(const std::string& path, std::string& text)>& read) {
  double limit = 0;
  // Every limit file of `dir` and its ancestors up to the mount's root: the smallest
  // counts. In a container without a cgroup namespace the path is the host's and only the
  // mount's root (the container's own cgroup) exists.
  auto visit = [&](const std::string& mount, std::string dir, const char* file) {
    for (;;) {
      std::string text;
      if (read(mount + dir + "/" + file, text)) {
        char* end = nullptr;
        const double v = std::strtod(text.c_str(), &end);
        // "max" (v2) does not parse; v1's unlimited is 2^63 rounded down to a page.
        if (end != text.c_str() && v > 0 && v < 4.6e18 && (limit == 0 || v < limit)) limit = v;
      }
      if (dir.empty()) break;
      const size_t slash = dir.rfind('/');
      dir.erase(slash == std::string::npos ? 0 : slash);
    }
  };
  std::istringstream lines(proc_cgroup);
  std::string line;
  while (std::getline(lines, line)) {
    // "hierarchy-id:controllers:path"; v2's line is "0::path".
    const size_t a = line.find(':'), b = a == std::string::npos ? a : line.find(':', a + 1);
    if (b == std::string::npos) continue;
    const std::string controllers = "," + line.substr(a + 1, b - a - 1) + ",";
    std::string path = line.substr(b + 1);
    if (path == "/") path.clear();
    if (path.size() > 1 && path.back() == '/') path.pop_back();
    if (controllers == ",,")
      visit("/sys/fs/cgroup", path, "memory.max");
    else if (controllers.find(",memory,") != std::string::npos)
      visit("/sys/fs/cgroup/memory", path, "memory.limit_in_bytes");
  }
  return limit;
}

double physical_memory_bytes() {
  double ram = 0;
#if defined(_SC_PHYS_PAGES) && defined(_SC_PAGESIZE)
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
  if (pages > 0 && page > 0) ram = (double)pages * (double)page;
#endif
#if defined(__linux__)
  static const double cgroup = [] {  // fixed for the process's life, read once
    auto read = [](const std::string& path, std::string& text) {
      std::ifstream f(path);
      if (!f) return false;
      std::ostringstream s;
      s << f.rdbuf();
      text = s.str();
      return true;
    };
    std::string self;
    return read("/proc/self/cgroup", self) ? cgroup_memory_limit(self, read) : 0.0;
  }();
  if (cgroup > 0 && (ram == 0 || cgroup < ram)) ram = cgroup;
#endif
  return ram;
}

std::string gib_text(double bytes) {
  char buf[32];
  std::snprintf(buf, sizeof buf, bytes < 0.1 * 1073741824.0 ? "%.3f" : "%.1f", bytes / 1073741824.0);
  return std::string(buf) + " GiB";
}

}  // namespace cmseg
