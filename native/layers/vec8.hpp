// Eight-float vectors for the CPU layers' hand-vectorised loops (GCC/Clang vector
// extensions: one AVX register, two SSE registers without AVX). Used where the
// compiler's own vectorisation of the lane loops fell short (measured in the
// callers' comments). Not a public header.
#pragma once
#include <cstring>

namespace cmseg {
namespace vec {

typedef float v8 __attribute__((vector_size(32)));
#if defined(__GNUC__) && !defined(__clang__)
// v8 values pass only between inline helpers; without AVX (CMSEG_NATIVE_ARCH=OFF)
// GCC warns that their calling convention differs, which cannot matter here.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

inline v8 load8(const float* p) {
  v8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store8(float* p, v8 v) { std::memcpy(p, &v, sizeof v); }
inline v8 splat(float f) { return v8{f, f, f, f, f, f, f, f}; }
inline v8 max0(v8 a) { return a > 0.f ? a : splat(0.f); }
inline float sum8(v8 a) {
  float s = 0.f;
  for (int k = 0; k < 8; ++k) s += a[k];
  return s;
}

}  // namespace vec
}  // namespace cmseg
