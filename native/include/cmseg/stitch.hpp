// Sliding-window stitching (src/model/sliding-window.ts): one window's outputs, times the
// window's importance weights, added into the whole-volume sums. Native because a BraTS
// case's CMs and q (64 channels, 60 windows of 64^3) took 5-6 s of JavaScript, a fifth of
// the case's prediction on a CPU and most of it on a GPU.
#pragma once
#include <cstdint>

namespace cmseg {

// Where one window lands, per axis (z, y, x): the window-local voxels [from, to) that fall
// inside the volume, and the volume coordinate `origin` of the window's voxel 0.
struct WindowPlacement {
  int64_t from[3], to[3], origin[3];
};

// For every channel k < channels and window voxel (z, y, x) in the placement:
//   sum[k*V + ((origin_z+z)*H + origin_y+y)*W + origin_x+x] += weights[(z*ph + y)*pw + x] * values[k*Pv + ...]
// with V = D*H*W and Pv = pd*ph*pw, computed in double and rounded once into the sum's type,
// as JavaScript's `f32[i] += w * v` does: the sums are bit for bit the TypeScript loop's.
// Channels run in parallel (each writes its own part of `sum`). The caller checks the ranges.
void stitch_window(float* sum, const int64_t volume[3], const float* values, const double* weights,
                   const int64_t patch[3], int64_t channels, const WindowPlacement& at);
void stitch_window(double* sum, const int64_t volume[3], const float* values, const double* weights,
                   const int64_t patch[3], int64_t channels, const WindowPlacement& at);

// The weighted means once every window is in: mean[k*V + v] = sum[k*V + v] / weight_sum[v],
// divided in double and rounded once to float, as JavaScript's `f32[i] = sum[i] / w[v]` does.
// `mean` may be `sum` itself (a float sum divided in place). Chunks of voxels run in parallel.
void divide_by_weights(const float* sum, const double* weight_sum, int64_t channels, int64_t V, float* mean);
void divide_by_weights(const double* sum, const double* weight_sum, int64_t channels, int64_t V, float* mean);

}  // namespace cmseg
