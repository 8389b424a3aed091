// Whether this build's CUDA kernels can run on a GPU, decided before the first launch: a GPU
// the build has no code for fails only at its first kernel ("no kernel image is available"),
// mid-step. Header-only so the host tests check the rule without a GPU.
#pragma once
#include <cstdlib>
#include <sstream>
#include <string>

namespace cmseg {

// The oldest compute capability cmseg's kernels are written for (cp.async, TF32 and bf16
// tensor-core paths): 8.0, the A100. Turing (T4, 7.5) and Volta (V100, 7.0) are not.
constexpr int kMinComputeCapability = 80;

// Why a GPU of compute capability major.minor cannot run code built for `architectures`
// (CMake's CUDA_ARCHITECTURES list, split by ';' or ',': "80;90", "86-real", "90-virtual"), or
// "" when it can.
// A real architecture's machine code (entries without "-virtual") runs on GPUs of its major
// version and a minor at least its own; PTX (entries without "-real") is compiled by the
// driver for any GPU at least that architecture.
inline std::string gpu_support_problem(const std::string& gpu, int major, int minor, const std::string& architectures) {
  const int cc = major * 10 + minor;
  std::ostringstream why;
  if (cc < kMinComputeCapability) {
    why << gpu << " has compute capability " << major << "." << minor << "; cmseg's CUDA kernels need "
        << kMinComputeCapability / 10 << "." << kMinComputeCapability % 10
        << " or newer (A100, A10, L4, L40, RTX 30xx/40xx, H100 and later)";
    return why.str();
  }
  std::string listed = architectures;
  for (char& ch : listed)
    if (ch == ',') ch = ';';
  std::istringstream list(listed);
  std::string entry;
  while (std::getline(list, entry, ';')) {
    if (entry.empty()) continue;
    const bool real_only = entry.size() > 5 && entry.compare(entry.size() - 5, 5, "-real") == 0;
    const bool virtual_only = entry.size() > 8 && entry.compare(entry.size() - 8, 8, "-virtual") == 0;
    const int arch = std::atoi(entry.c_str());
    if (arch <= 0) return "";  // "native", "all", "all-major": CMake chose; the launch will tell
    if (!virtual_only && arch / 10 == cc / 10 && arch <= cc) return "";  // its machine code
    if (!real_only && arch <= cc) return "";                            // its PTX, compiled by the driver
  }
  if (listed.find_first_not_of(';') == std::string::npos) return "";  // no list given: cannot tell
  why << gpu << " (compute capability " << major << "." << minor << ") has no code in this build (CUDA architectures "
      << architectures << "): rebuild with -DCMSEG_CUDA_ARCHITECTURES=" << cc << " added";
  return why.str();
}

}  // namespace cmseg
