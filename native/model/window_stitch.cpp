// Sliding-window stitching: see cmseg/stitch.hpp.
#include "cmseg/stitch.hpp"

#include "cmseg/threads.hpp"

namespace cmseg {
namespace {

template <class Sum>
void stitch(Sum* sum, const int64_t volume[3], const float* values, const double* weights, const int64_t patch[3],
            int64_t channels, const WindowPlacement& at) {
  const int64_t H = volume[1], W = volume[2], V = volume[0] * H * W;
  const int64_t ph = patch[1], pw = patch[2], Pv = patch[0] * ph * pw;
  const int64_t x0 = at.from[2], x1 = at.to[2];
  parallel_for(channels, [&](int64_t k, int) {
    Sum* dst_channel = sum + k * V;
    const float* src_channel = values + k * Pv;
    for (int64_t z = at.from[0]; z < at.to[0]; z++) {
      for (int64_t y = at.from[1]; y < at.to[1]; y++) {
        Sum* dst = dst_channel + ((at.origin[0] + z) * H + at.origin[1] + y) * W + at.origin[2];
        const int64_t row = (z * ph + y) * pw;
        const float* src = src_channel + row;
        const double* w = weights + row;
        for (int64_t x = x0; x < x1; x++) dst[x] = (Sum)((double)dst[x] + w[x] * (double)src[x]);
      }
    }
  });
}

}  // namespace

void stitch_window(float* sum, const int64_t volume[3], const float* values, const double* weights,
                   const int64_t patch[3], int64_t channels, const WindowPlacement& at) {
  stitch(sum, volume, values, weights, patch, channels, at);
}

void stitch_window(double* sum, const int64_t volume[3], const float* values, const double* weights,
                   const int64_t patch[3], int64_t channels, const WindowPlacement& at) {
  stitch(sum, volume, values, weights, patch, channels, at);
}

}  // namespace cmseg
