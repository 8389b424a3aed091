#include "cmseg/backend.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <thread>
#if !defined(_WIN32)
#include <unistd.h>
#endif
#if defined(__linux__)
#include <sched.h>
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
  const ThreadDefault d = default_threads();
  b.default_threads = d.threads;
  b.threads_reason = d.why;
  b.usable_cpus = d.usable_cpus;
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

namespace {

// Calls fn(dir) for every directory of the process's cgroups that may hold a limit of
// `v1_controller`: in the unified hierarchy (v2, "0::path") and in each v1 hierarchy that
// has the controller, the process's cgroup and each ancestor up to the mount's root (a
// parent's limit binds its children). In a container without a cgroup namespace the path is
// the host's and only the mount's root (the container's own cgroup) exists. v1 mounts a
// hierarchy under its controllers' names ("cpu,cpuacct", with "cpu" as a link to it).
void for_each_cgroup_dir(const std::string& proc_cgroup, const std::string& v1_controller,
                         const std::function<void(const std::string& dir, bool v2)>& fn) {
  auto walk = [&](const std::string& mount, std::string dir, bool v2) {
    for (;;) {
      fn(mount + dir, v2);
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
    const std::string listed = line.substr(a + 1, b - a - 1);
    std::string path = line.substr(b + 1);
    if (path == "/") path.clear();
    if (path.size() > 1 && path.back() == '/') path.pop_back();
    if (listed.empty()) {
      walk("/sys/fs/cgroup", path, true);
    } else if (("," + listed + ",").find("," + v1_controller + ",") != std::string::npos) {
      walk("/sys/fs/cgroup/" + v1_controller, path, false);
      if (listed != v1_controller) walk("/sys/fs/cgroup/" + listed, path, false);
    }
  }
}

// The number at the start of `text` (after spaces), or NaN when there is none ("max").
double leading_number(const std::string& text) {
  char* end = nullptr;
  const double v = std::strtod(text.c_str(), &end);
  return end == text.c_str() ? std::nan("") : v;
}

}  // namespace

double cgroup_memory_limit(const std::string& proc_cgroup,
                           const std::function<bool(const std::string& path, std::string& text)>& read) {
  double limit = 0;
  for_each_cgroup_dir(proc_cgroup, "memory", [&](const std::string& dir, bool v2) {
    std::string text;
    if (!read(dir + (v2 ? "/memory.max" : "/memory.limit_in_bytes"), text)) return;
    // "max" (v2) does not parse; v1's unlimited is 2^63 rounded down to a page.
    const double v = leading_number(text);
    if (v > 0 && v < 4.6e18 && (limit == 0 || v < limit)) limit = v;
  });
  return limit;
}

double cgroup_cpu_limit(const std::string& proc_cgroup,
                        const std::function<bool(const std::string& path, std::string& text)>& read) {
  double limit = 0;
  for_each_cgroup_dir(proc_cgroup, "cpu", [&](const std::string& dir, bool v2) {
    double quota = NAN, period = NAN;
    std::string text;
    if (v2) {
      // cpu.max: "$QUOTA $PERIOD" in microseconds, or "max $PERIOD" for none.
      if (!read(dir + "/cpu.max", text)) return;
      std::istringstream fields(text);
      std::string q, p;
      fields >> q >> p;
      quota = leading_number(q);
      period = p.empty() ? 100000.0 : leading_number(p);
    } else {
      // cpu.cfs_quota_us is -1 for none.
      if (!read(dir + "/cpu.cfs_quota_us", text)) return;
      quota = leading_number(text);
      if (!read(dir + "/cpu.cfs_period_us", text)) return;
      period = leading_number(text);
    }
    if (!(quota > 0 && period > 0)) return;
    const double cpus = quota / period;
    if (limit == 0 || cpus < limit) limit = cpus;
  });
  return limit;
}

namespace {

// A whole file's text, or false when it cannot be read.
bool read_text_file(const std::string& path, std::string& text) {
  std::ifstream f(path);
  if (!f) return false;
  std::ostringstream s;
  s << f.rdbuf();
  text = s.str();
  return true;
}

}  // namespace

UsableCpus usable_cpus() {
  UsableCpus u;
  const unsigned hw = std::thread::hardware_concurrency();
  u.cores = hw ? (int)hw : 1;
  u.cpus = u.cores;
#if defined(__linux__)
  // A taskset, numactl or batch scheduler's cpuset: the threads could only share these.
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof set, &set) == 0) {
    const int allowed = CPU_COUNT(&set);
    if (allowed > 0 && allowed < u.cpus) {
      u.cpus = allowed;
      u.limited_by = "the process's CPU affinity: " + std::to_string(allowed) + " of " + std::to_string(u.cores) + " cores";
    }
  }
  // A container's --cpus or a batch job's CPU quota: more threads than the quota's CPUs
  // take turns being throttled (each period's time runs out early), which slows every step.
  // A fractional quota is rounded up: 2.5 CPUs keep three threads busy most of the time.
  static const double quota = [] {
    std::string self;
    return read_text_file("/proc/self/cgroup", self) ? cgroup_cpu_limit(self, read_text_file) : 0.0;
  }();
  if (quota > 0 && std::ceil(quota - 1e-9) < u.cpus) {
    u.cpus = std::max(1, (int)std::ceil(quota - 1e-9));
    char text[32];
    std::snprintf(text, sizeof text, "%g", quota);
    u.limited_by = std::string("the cgroup CPU quota: ") + text + " CPUs of " + std::to_string(u.cores) + " cores";
  }
#endif
  return u;
}

double physical_memory_bytes() {
  double ram = 0;
#if defined(_SC_PHYS_PAGES) && defined(_SC_PAGESIZE)
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
  if (pages > 0 && page > 0) ram = (double)pages * (double)page;
#endif
#if defined(__linux__)
  static const double cgroup = [] {  // fixed for the process's life, read once
    std::string self;
    return read_text_file("/proc/self/cgroup", self) ? cgroup_memory_limit(self, read_text_file) : 0.0;
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
