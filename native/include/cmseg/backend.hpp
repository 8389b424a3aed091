// Which backends this build of the native library contains.
#pragma once
#include <functional>
#include <string>

namespace cmseg {

struct BackendInfo {
  bool cpu = true;
  bool onednn = false;
  bool cuda = false;
  bool cudnn = false;
  int threads = 1;             // the pool's threads now
  int default_threads = 1;     // what it starts with: CMSEG_NUM_THREADS, else usable_cpus()
  int usable_cpus = 1;         // usable_cpus().cpus
  std::string threads_reason;  // why that many: "CMSEG_NUM_THREADS=4", "the machine's 16 cores", ...
  // CUDA, when built: whether a device is usable now, its name, the cuDNN version,
  // or why no device can be used.
  bool gpu_available = false;
  std::string gpu;
  size_t cudnn_version = 0;
  std::string gpu_unavailable_reason;
  // The whole training step and prediction can run on the GPU (Device::Cuda): true
  // when the CUDA backend is built; gpu_available says whether a device is there now.
  bool cuda_training = false;
  std::string simd;      // vector ISA the CPU reference was compiled for
  std::string compiler;
};

BackendInfo backend_info();

// This machine's physical memory in bytes, or the process's cgroup memory limit where
// that is lower (a container's --memory, a batch job's allocation: past it the kernel
// kills the process as it would past the RAM); 0 where the system does not say. Requests
// larger than it are refused up front: with Linux's overcommit a larger allocation
// "succeeds" and the process is killed later, when the pages are touched.
double physical_memory_bytes();
// The memory limit in /proc/self/cgroup's text `proc_cgroup`: the smallest memory.max (v2,
// under /sys/fs/cgroup) or memory.limit_in_bytes (v1, under /sys/fs/cgroup/memory) of the
// process's cgroup and its ancestors, files read by `read` (false: no such file); 0 when
// none sets one. Separate from physical_memory_bytes() so that tests can give it files.
double cgroup_memory_limit(const std::string& proc_cgroup,
                           const std::function<bool(const std::string& path, std::string& text)>& read);
// The CPU limit in /proc/self/cgroup's text `proc_cgroup`, in CPUs (2.5 for a quota of 250 ms
// a 100 ms period): the smallest cpu.max (v2) or cpu.cfs_quota_us / cpu.cfs_period_us (v1,
// under /sys/fs/cgroup/cpu) of the process's cgroup and its ancestors; 0 when none sets one.
double cgroup_cpu_limit(const std::string& proc_cgroup,
                        const std::function<bool(const std::string& path, std::string& text)>& read);

// The CPUs this process can keep busy: the machine's cores, or fewer where its affinity mask
// (taskset, numactl, a batch scheduler's cpuset) or its cgroup CPU quota (a container's
// --cpus, rounded up) says so. Threads past it only take turns.
struct UsableCpus {
  int cpus = 1;
  int cores = 1;           // std::thread::hardware_concurrency()
  std::string limited_by;  // empty when cpus == cores; else what limits them, with the numbers
};
UsableCpus usable_cpus();

// A byte count as errors show it: "23.5 GiB" (three decimals under 0.1 GiB).
std::string gib_text(double bytes);

}  // namespace cmseg
