// Sliding-window stitching: see cmseg/stitch.hpp.
#include "cmseg/stitch.hpp"

#include "cmseg/threads.hpp"

#include <algorithm>

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

template <class Sum>
void divide(const Sum* sum, const double* weight_sum, int64_t channels, int64_t V, float* mean) {
  // Chunks of a channel's voxels: a 2D image's few channels still spread over every thread.
  constexpr int64_t kChunk = 1 << 16;
  const int64_t chunks = (V + kChunk - 1) / kChunk;
  parallel_for(channels * chunks, [&](int64_t item, int) {
    const int64_t k = item / chunks, v0 = (item % chunks) * kChunk, v1 = std::min(V, v0 + kChunk);
    const Sum* s = sum + k * V;
    float* m = mean + k * V;
    for (int64_t v = v0; v < v1; v++) m[v] = (float)((double)s[v] / weight_sum[v]);
  });
}

}  // namespace

void divide_by_weights(const float* sum, const double* weight_sum, int64_t channels, int64_t V, float* mean) {
  divide(sum, weight_sum, channels, V, mean);
}

void divide_by_weights(const double* sum, const double* weight_sum, int64_t channels, int64_t V, float* mean) {
  divide(sum, weight_sum, channels, V, mean);
}

void stitch_window(float* sum, const int64_t volume[3], const float* values, const double* weights,
                   const int64_t patch[3], int64_t channels, const WindowPlacement& at) {
  stitch(sum, volume, values, weights, patch, channels, at);
}

void stitch_window(double* sum, const int64_t volume[3], const float* values, const double* weights,
                   const int64_t patch[3], int64_t channels, const WindowPlacement& at) {
  stitch(sum, volume, values, weights, patch, channels, at);
}

}  // namespace cmseg
