// Which backends this build of the native library contains.
#pragma once
#include <string>

namespace cmseg {

struct BackendInfo {
  bool cpu = true;
  bool onednn = false;
  bool cuda = false;
  bool cudnn = false;
  int threads = 1;
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

// This machine's physical memory in bytes; 0 where the system does not say. Requests
// larger than it are refused up front: with Linux's overcommit a larger allocation
// "succeeds" and the process is killed later, when the pages are touched.
double physical_memory_bytes();
// A byte count as errors show it: "23.5 GiB" (three decimals under 0.1 GiB).
std::string gib_text(double bytes);

}  // namespace cmseg
