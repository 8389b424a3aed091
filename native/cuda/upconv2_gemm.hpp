// The transposed convolution (upconv2: kernel 2, stride 2, SPEC section 2) as
// matrix products: the plan shared by the device (native/cuda/upconv2.cu: cuBLAS
// plus our scatter and gather kernels) and the host (the CUDA emulation and
// native/tests/test_upconv_gemm.cpp run the same plan with a reference GEMM, so
// the index arithmetic and the GEMM arguments are checked without a GPU).
//
// Each output voxel takes exactly one tap, so for one image, with M = cout * T rows
// (channel co, tap t) and W stored [cin, cout, T] (PyTorch's layout, the row-major
// [cin, M] matrix):
//   forward          Ycol[M, V] = W^T X           y[co, out(v, t)] = Ycol[co*T + t, v] + b[co]
//   backward data    dYcol[co*T + t, v] = dy[co, out(v, t)]        dX = W dYcol
//   backward filter  dW += X dYcol^T               db[co] += sum of dy[co, .]
// cuDNN runs this layer as the data gradient of a strided convolution, which cost
// 8.9 ms of the brats3d-gpu step's backward on an H200 (BENCHMARKS.md); as GEMMs it
// is a few passes over memory.
//
// The work is cut into chunks of whole input "units" (3D: depth slices; 2D: rows)
// so that a chunk's Ycol / dYcol (M floats per input voxel) stays under a byte
// budget. A chunk's output is then one run of whole output rows in every channel,
// which the scatter and gather kernels walk with a warp along each row.
#pragma once
#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "gemm_plan.hpp"

namespace cmseg {
namespace cuda {

struct UpGemmGeom {
  int ndim = 3, n = 1, cin = 1, cout = 1;
  int T = 8, M = 8;               // taps (3D 8, 2D 4); GEMM rows cout * T
  int H = 1, W = 1;               // input plane: 3D one depth slice H x W; 2D the image H x W
  int Ho = 1, Wo = 1;             // output plane, the same way
  int64_t V = 1, Vo = 1;          // voxels per image, input and output
  int unit = 1;                   // input voxels per unit (3D: H * W, 2D: W)
  int units = 1;                  // units per image (3D: depth, 2D: H)
  int rows_per_unit = 2;          // output rows per unit (3D: 2 * Ho, 2D: 2)
  int units_per_chunk = 1, chunks = 1;
  int split_min = kFilterSplitMin;  // the filter gradient's positions per batch, at least (FilterSplit)
};

// One chunk of one image: input voxels [v0, v0 + cnt), output rows [row0, row0 + rows)
// of every channel (a row: Wo voxels; 3D row index zo * Ho + yo, 2D yo).
struct UpChunk {
  int64_t v0 = 0;
  int cnt = 0;
  int64_t row0 = 0;
  int rows = 0;
};

// The chunk budget when ContextOptions::upconv_chunk_bytes is 0: at most a few
// percent of the brats3d-gpu step's peak, and chunks long enough (K or M of 10^5
// and more) that cuBLAS runs at full speed.
constexpr size_t kUpconvChunkBytes = size_t(128) << 20;

// d, h, w: the input's spatial size (2D: d == 1). chunk_bytes bounds a chunk's
// Ycol (at least one unit per chunk; 0: kUpconvChunkBytes).
inline UpGemmGeom up_gemm_geom(int ndim, int n, int cin, int cout, int d, int h, int w, size_t chunk_bytes) {
  if (chunk_bytes == 0) chunk_bytes = kUpconvChunkBytes;
  UpGemmGeom g;
  g.ndim = ndim, g.n = n, g.cin = cin, g.cout = cout;
  g.T = ndim == 3 ? 8 : 4;
  g.M = cout * g.T;
  g.H = h, g.W = w, g.Ho = 2 * h, g.Wo = 2 * w;
  g.V = (int64_t)d * h * w;
  g.Vo = g.V * g.T;
  g.unit = ndim == 3 ? h * w : w;
  g.units = ndim == 3 ? d : h;
  g.rows_per_unit = ndim == 3 ? 2 * g.Ho : 2;
  const size_t unit_bytes = (size_t)g.M * g.unit * sizeof(float);
  g.units_per_chunk = (int)std::max<size_t>(1, std::min<size_t>(g.units, chunk_bytes / unit_bytes));
  g.chunks = (g.units + g.units_per_chunk - 1) / g.units_per_chunk;
  return g;
}

inline UpChunk up_chunk(const UpGemmGeom& g, int c) {
  const int u0 = c * g.units_per_chunk, uc = std::min(g.units_per_chunk, g.units - u0);
  UpChunk ch;
  ch.v0 = (int64_t)u0 * g.unit;
  ch.cnt = uc * g.unit;
  ch.row0 = (int64_t)u0 * g.rows_per_unit;
  ch.rows = uc * g.rows_per_unit;
  return ch;
}

// For output row ro of an image: the input voxel under its even columns (column xo
// reads input voxel vrow + xo / 2) and the tap of its even columns (odd: t + 1).
CMSEG_HD void up_locate(const UpGemmGeom& g, int64_t ro, int64_t& vrow, int& t) {
  if (g.ndim == 3) {
    const int64_t zo = ro / g.Ho;
    const int yo = (int)(ro - zo * g.Ho);
    vrow = ((zo >> 1) * g.H + (yo >> 1)) * (int64_t)g.W;
    t = (int)(zo & 1) * 4 + (yo & 1) * 2;
  } else {
    vrow = (ro >> 1) * (int64_t)g.W;
    t = (int)(ro & 1) * 2;
  }
}

// Index in a chunk's Ycol / dYcol ([M, cnt], row co * T + tap) of output voxel
// (co, row ro, column xo), given up_locate's vrow and t for ro.
CMSEG_HD int64_t up_col_index(const UpGemmGeom& g, const UpChunk& ch, int co, int64_t vrow, int t, int xo) {
  return (int64_t)(co * g.T + t + (xo & 1)) * ch.cnt + (vrow - ch.v0) + (xo >> 1);
}

// Row-major [rows, cols] with row stride ld is column-major [cols, rows] with
// leading dimension ld; the three products below are written in those terms.

// Offset of the chunk's first input voxel of image i in x (and dx): [n, cin, V].
inline int64_t image_x(const UpGemmGeom& g, int i, const UpChunk& ch) { return (int64_t)i * g.cin * g.V + ch.v0; }

// Forward, image i, chunk ch: A = x, B = w, C = ycol. Ycol^T[cnt, M] = X^T[cnt, cin] W[cin, M]
// (W row-major [cin, M] is column-major [M, cin]: transposed).
inline GemmCall up_forward_gemm(const UpGemmGeom& g, int i, const UpChunk& ch) {
  return gemm_call(false, true, ch.cnt, g.M, g.cin, image_x(g, i, ch), (int)g.V, 0, g.M, 0, ch.cnt);
}

// Backward data: A = dycol, B = w, C = dx. dX^T[cnt, cin] = dYcol^T[cnt, M] W^T[M, cin].
inline GemmCall up_backward_data_gemm(const UpGemmGeom& g, int i, const UpChunk& ch) {
  return gemm_call(false, false, ch.cnt, g.cin, g.M, 0, ch.cnt, 0, g.M, image_x(g, i, ch), (int)g.V);
}

// Backward filter: A = dycol, B = x. dW^T[M, cin] += dYcol[M, cnt] X^T[cnt, cin], its
// long inner dimension (the chunk's positions) split into batches (gemm_plan.hpp)
// written to partial slots, which the caller adds to dW in order.
inline FilterSplit up_backward_filter_split(const UpGemmGeom& g, int i, const UpChunk& ch) {
  return split_long_k(gemm_call(true, false, g.M, g.cin, ch.cnt, 0, ch.cnt, image_x(g, i, ch), (int)g.V, 0, g.M),
                      g.split_min, 0);
}

// f(co, index in y / dy, index in the chunk's Ycol / dYcol) for every output voxel of
// image i that chunk ch covers: the host's scatter and gather (the kernels walk the
// same rows, a warp along each).
template <class F>
inline void up_each_output(const UpGemmGeom& g, int i, const UpChunk& ch, F&& f) {
  for (int co = 0; co < g.cout; ++co)
    for (int r = 0; r < ch.rows; ++r) {
      const int64_t ro = ch.row0 + r;
      int64_t vrow;
      int t;
      up_locate(g, ro, vrow, t);
      const int64_t row = ((int64_t)i * g.cout + co) * g.Vo + ro * g.Wo;
      for (int xo = 0; xo < g.Wo; ++xo) f(co, row + xo, up_col_index(g, ch, co, vrow, t, xo));
    }
}

// The plan run on the host with gemm_reference (the emulation's upconv2 and
// test_upconv_gemm): the device code does the same calls in the same order.
inline void up_gemm_forward_host(const UpGemmGeom& g, const float* x, const float* w, const float* b, float* y,
                                 float* ycol) {
  for (int i = 0; i < g.n; ++i)
    for (int c = 0; c < g.chunks; ++c) {
      const UpChunk ch = up_chunk(g, c);
      gemm_reference(up_forward_gemm(g, i, ch), x, w, ycol);
      up_each_output(g, i, ch, [&](int co, int64_t yi, int64_t ci) { y[yi] = ycol[ci] + b[co]; });
    }
}

// dx may be null (no data gradient); dw and db are accumulated into. partial holds
// kFilterSplitMax + 1 slots of M * cin floats.
inline void up_gemm_backward_host(const UpGemmGeom& g, const float* x, const float* w, const float* dy, float* dx,
                                  float* dw, float* db, float* dycol, float* partial) {
  for (int co = 0; co < g.cout; ++co) {
    double s = 0;
    for (int i = 0; i < g.n; ++i)
      for (int64_t v = 0; v < g.Vo; ++v) s += dy[((int64_t)i * g.cout + co) * g.Vo + v];
    db[co] += (float)s;
  }
  for (int i = 0; i < g.n; ++i)
    for (int c = 0; c < g.chunks; ++c) {
      const UpChunk ch = up_chunk(g, c);
      up_each_output(g, i, ch, [&](int, int64_t yi, int64_t ci) { dycol[ci] = dy[yi]; });
      if (dx) gemm_reference(up_backward_data_gemm(g, i, ch), dycol, w, dx);
      const FilterSplit f = up_backward_filter_split(g, i, ch);
      split_reference(f, dycol, x, partial);
      add_slots_reference(partial, f.slots(), f.slot, dw);
    }
}

}  // namespace cuda
}  // namespace cmseg
