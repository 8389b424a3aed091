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
  std::string simd;      // vector ISA the CPU reference was compiled for
  std::string compiler;
};

BackendInfo backend_info();

}  // namespace cmseg
