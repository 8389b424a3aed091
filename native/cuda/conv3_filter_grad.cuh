// conv3's filter gradient as our own TF32 tensor-core kernel (ContextOptions::conv_wgrad):
//
//   dW[co][ci][kd][kh][kw] += sum over n, d, h, w of
//                             dy[n][co][d][h][w] * x[n][ci][d + kd - 1][h + kh - 1][w + kw - 1]
//
// a GEMM with M = output channels, N = input channels x 27 taps and K = every voxel of
// the batch, on the NCDHW tensors (no channels-last copies). Why our own: cuDNN's 3D
// filter gradient is the largest line of the brats3d-gpu step (33 of 78 ms on an H200,
// at 37 TFLOP/s where its forward runs the same shapes at 130; BENCHMARKS.md), and
// PyTorch calls the same kernels.
//
// Work split. A block owns 32 output channels (blockIdx.z) and 32 input channels
// (blockIdx.y); it walks "runs": a kTileH x kTileW patch of (h, w) in one image, through
// up to run_d consecutive planes along d (kRunD; CMSEG_WGRAD_RUN_D for the device
// check's sweep). Per plane d it needs the x planes d-1, d, d+1 (each with a one-voxel
// halo in h and w) and the dy plane d in shared memory. The x planes rotate through a
// ring of four slots, so each is copied once per run, and the copies of plane d+2 (and
// dy d+1) are in flight (cp.async) while the tensor cores work on plane d. Each thread
// rounds what it copied to TF32 once, after its wait and before the block's sync.
//
// Warp w of the twelve owns the taps kd = w / 4 (all nine kh, kw), eight input channels
// (w % 4) and all 32 output channels: 2 x 3 x 3 tiles of mma.m16n8k8, 72 accumulators
// a thread, kept across runs. Twelve warps put three on each of an SM's four
// tensor-core partitions (nine would leave one partition a third more work), and the
// loop over halo rows loads each B fragment once for all three kh: 68 shared-memory
// loads per 72 mma a warp and patch column. Each block then writes its sums to its own
// partial, and a second kernel adds the partials in block order into dW: the result
// repeats bit for bit.
//
// This header is the kernel's body, compiled twice: by nvcc with DeviceOps
// (conv3_filter_grad.cu), and by the host compiler with a SIMT emulation of the same
// operations (native/cuda/emulation/simt_host.hpp, run by
// native/tests/test_conv3_filter_grad.cpp), so that a machine without a GPU checks the
// indexing, the ring of slots, the waits and the rounding against the CPU reference.
// Ops supplies: tid(), block(axis), grid(axis), sync(), copy4(dst, src, valid) (cp.async
// of 4 bytes, zeros when !valid), copy16 (the same for 16 bytes, both addresses 16-byte
// aligned), commit(), wait_all_but_one(), round(float) (to TF32, cvt.rna), and the
// warp's tensor-core step: fragments FragA / FragB, load_a(frag, base, ld) (A(r, k) =
// base[r * ld + k]), load_b(frag, base, ld) (B(k, n) = base[k + n * ld]), of values
// already rounded, and mma(acc, a, b) (mma.sync.m16n8k8.row.col.f32.tf32.tf32.f32). The
// device loads each lane's elements of the fragments; the emulation gives every thread
// the whole tiles (the lanes' layouts are the PTX ISA's, written out in DeviceOps).
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define CMSEG_WGRAD_FN __device__ __forceinline__
#define CMSEG_WGRAD_UNROLL _Pragma("unroll")
#else
#define CMSEG_WGRAD_FN inline
#define CMSEG_WGRAD_UNROLL
#endif

namespace cmseg {
namespace cuda {
namespace wgrad {

constexpr int kCo = 32, kCi = 32;        // channels per block (M) and per block (N / 27)
constexpr int kTileH = 4, kTileW = 32;   // a run's (h, w) patch
constexpr int kRunD = 16;                // planes per run, by default (Params::run_d)
constexpr int kWarps = 12, kThreads = kWarps * 32;  // 3 per SM sub-partition
constexpr int kTaps = 27;
constexpr int kHaloH = kTileH + 2;
// x slot: [kCi][kHaloH rows of kXRow] + 4: a halo row holds x at w0 - 1 .. w0 + 32 from
// column kXCore - 1, so that its 32-float core starts 16-byte aligned for 16-byte
// copies; 244 floats a channel, 20 mod 32: the eight channels of a B fragment land on
// distinct banks. dy slot: [kCo][kDyLd], 132 = 4 mod 32: the eight rows of an A fragment
// likewise. Columns outside the halo rows are never read.
constexpr int kXRow = 40, kXCore = 4;
constexpr int kXLd = kHaloH * kXRow + 4;
constexpr int kXSlot = kCi * kXLd;
constexpr int kXSlots = 4;
constexpr int kDyLd = kTileH * kTileW + 4;
constexpr int kDySlot = kCo * kDyLd;
constexpr int kDySlots = 2;
constexpr int kSmemFloats = kXSlots * kXSlot + kDySlots * kDySlot;
constexpr int kPartial = kCo * kCi * kTaps;  // one block's sums: [co][ci][tap]
// A slot is copied in pieces: an x halo row as its left halo, 8 quads of core and its
// right halo; a dy row as 8 quads. Each thread copies, and later rounds, the same pieces.
constexpr int kQuads = kTileW / 4;
constexpr int kXPieces = kCi * kHaloH * (kQuads + 2);
constexpr int kDyPieces = kCo * kTileH * kQuads;

struct Params {
  const float* x;   // [n, cin, D, H, W]
  const float* dy;  // [n, cout, D, H, W]
  float* partial;   // [gridDim.z][gridDim.y][gridDim.x][kPartial]
  int cin, cout, D, H, W;
  int run_d;                   // planes per run: longer runs copy the two halo planes less often,
                               // shorter ones make more runs to spread over the blocks
  int tiles_h, tiles_w, runs;  // per image: ceil(H / kTileH), ceil(W / kTileW), ceil(D / run_d)
  int64_t units;               // n * tiles_h * tiles_w * runs
  bool quads;  // W % 4 == 0 and x, dy 16-byte aligned: quads of 4 floats copied at once
};

// Where piece `it` of an x slot goes and what it covers: smem offset, first w, count.
struct XPiece {
  int c, hh, col, dw, count;  // channel, halo row, slot column, w - w0, floats
};
CMSEG_WGRAD_FN XPiece x_piece(int it) {
  const int row = it / (kQuads + 2), k = it - row * (kQuads + 2);
  XPiece q;
  q.c = row / kHaloH, q.hh = row - q.c * kHaloH;
  if (k == 0) {
    q.col = kXCore - 1, q.dw = -1, q.count = 1;
  } else if (k == kQuads + 1) {
    q.col = kXCore + kTileW, q.dw = kTileW, q.count = 1;
  } else {
    q.col = kXCore + 4 * (k - 1), q.dw = 4 * (k - 1), q.count = 4;
  }
  return q;
}

template <class Ops>
CMSEG_WGRAD_FN void load_x_plane(const Params& P, Ops& ops, float* slot, int img, int ci0, int p, int h0, int w0) {
  const bool plane_ok = p >= 0 && p < P.D;
  for (int it = ops.tid(); it < kXPieces; it += kThreads) {
    const XPiece q = x_piece(it);
    const int h = h0 + q.hh - 1, w = w0 + q.dw;
    const bool row_ok = plane_ok && ci0 + q.c < P.cin && h >= 0 && h < P.H;
    const float* row = row_ok ? P.x + ((((int64_t)img * P.cin + ci0 + q.c) * P.D + p) * P.H + h) * P.W : P.x;
    float* dst = slot + q.c * kXLd + q.hh * kXRow + q.col;
    if (q.count == 4 && P.quads) {
      const bool ok = row_ok && w < P.W;  // a quad is all in or all out (W % 4 == 0)
      ops.copy16(dst, ok ? row + w : P.x, ok);
    } else {
      for (int e = 0; e < q.count; ++e) {
        const bool ok = row_ok && w + e >= 0 && w + e < P.W;
        ops.copy4(dst + e, ok ? row + w + e : P.x, ok);
      }
    }
  }
}

template <class Ops>
CMSEG_WGRAD_FN void load_dy_plane(const Params& P, Ops& ops, float* slot, int img, int co0, int d, int h0, int w0) {
  for (int it = ops.tid(); it < kDyPieces; it += kThreads) {
    const int row = it / kQuads, k = it - row * kQuads;
    const int c = row / kTileH, hh = row - c * kTileH;
    const int h = h0 + hh, w = w0 + 4 * k;
    const bool row_ok = co0 + c < P.cout && h < P.H;
    const float* src = row_ok ? P.dy + ((((int64_t)img * P.cout + co0 + c) * P.D + d) * P.H + h) * P.W : P.dy;
    float* dst = slot + c * kDyLd + hh * kTileW + 4 * k;
    if (P.quads) {
      const bool ok = row_ok && w < P.W;
      ops.copy16(dst, ok ? src + w : P.dy, ok);
    } else {
      for (int e = 0; e < 4; ++e) {
        const bool ok = row_ok && w + e < P.W;
        ops.copy4(dst + e, ok ? src + w + e : P.dy, ok);
      }
    }
  }
}

// Rounds this thread's pieces of a slot (those the loads above gave it) to TF32 in
// place: once per plane, where each element then feeds up to 27 fragments. Its own
// copies are visible to a thread after its wait; the block's sync then shows the
// rounded values to every warp.
template <class Ops>
CMSEG_WGRAD_FN void round_x_plane(Ops& ops, float* slot) {
  for (int it = ops.tid(); it < kXPieces; it += kThreads) {
    const XPiece q = x_piece(it);
    float* v = slot + q.c * kXLd + q.hh * kXRow + q.col;
    for (int e = 0; e < q.count; ++e) v[e] = ops.round(v[e]);
  }
}

template <class Ops>
CMSEG_WGRAD_FN void round_dy_plane(Ops& ops, float* slot) {
  for (int it = ops.tid(); it < kDyPieces; it += kThreads) {
    const int row = it / kQuads, k = it - row * kQuads;
    const int c = row / kTileH, hh = row - c * kTileH;
    float* v = slot + c * kDyLd + hh * kTileW + 4 * k;
    for (int e = 0; e < 4; ++e) v[e] = ops.round(v[e]);
  }
}

// Where accumulator i of a lane sits in the 16 x 8 tile C of mma.m16n8k8 (PTX ISA):
// c0 (g, 2t), c1 (g, 2t + 1), c2 (g + 8, 2t), c3 (g + 8, 2t + 1), g = lane / 4, t = lane % 4.
CMSEG_WGRAD_FN int acc_row(int lane, int i) { return (lane >> 2) + (i >= 2 ? 8 : 0); }
CMSEG_WGRAD_FN int acc_col(int lane, int i) { return 2 * (lane & 3) + (i & 1); }

// One plane's products for warp w: taps kd = w / 4 (all kh, kw) and input channels
// nt * 8 .. nt * 8 + 7, nt = w % 4, against all 32 output channels. xs: the x slot of
// plane d + kd - 1; ys: the dy slot of plane d. A is 16 x 8 (rows: output channels,
// columns: the 8 voxels (hh, w8..w8+7)), row-major in the dy slot; B is 8 x 8 (rows: the
// same voxels shifted by the tap, columns: the 8 input channels), the voxels contiguous in
// the x slot at halo row hh + kh from w0 + w8 + kw - 1, the channels kXLd apart. The loop runs over the
// halo rows r: B at row r, column shift kw, serves output rows hh = r - kh for all three
// kh, so each B fragment is loaded once; each output row's A fragments are loaded at its
// first halo row and kept for its three (a ring of three rows, indexed at compile time).
template <class Ops>
CMSEG_WGRAD_FN void plane_products(Ops& ops, const float* xs, const float* ys, int nt, float (&acc)[2][3][3][4]) {
  const float* xn = xs + nt * 8 * kXLd;
  CMSEG_WGRAD_UNROLL
  for (int w8 = 0; w8 < kTileW; w8 += 8) {
    typename Ops::FragA a[3][2];
    CMSEG_WGRAD_UNROLL
    for (int r = 0; r < kHaloH; ++r) {
      if (r < kTileH) {
        CMSEG_WGRAD_UNROLL
        for (int m = 0; m < 2; ++m) ops.load_a(a[r % 3][m], ys + m * 16 * kDyLd + r * kTileW + w8, kDyLd);
      }
      CMSEG_WGRAD_UNROLL
      for (int kw = 0; kw < 3; ++kw) {
        typename Ops::FragB b;
        ops.load_b(b, xn + r * kXRow + kXCore - 1 + w8 + kw, kXLd);
        CMSEG_WGRAD_UNROLL
        for (int kh = 0; kh < 3; ++kh) {
          const int hh = r - kh;
          if (hh < 0 || hh >= kTileH) continue;
          ops.mma(acc[0][kh][kw], a[hh % 3][0], b);
          ops.mma(acc[1][kh][kw], a[hh % 3][1], b);
        }
      }
    }
  }
}

// f(m, kh, kw, i) for each of a thread's accumulators acc[m][kh][kw][i], unrolled so
// that every index is a constant and the accumulators stay in registers.
template <class F>
CMSEG_WGRAD_FN void for_each_acc(F&& f) {
  CMSEG_WGRAD_UNROLL
  for (int m = 0; m < 2; ++m)
    CMSEG_WGRAD_UNROLL
    for (int kh = 0; kh < 3; ++kh)
      CMSEG_WGRAD_UNROLL
      for (int kw = 0; kw < 3; ++kw)
        CMSEG_WGRAD_UNROLL
        for (int i = 0; i < 4; ++i) f(m, kh, kw, i);
}

// The whole block: every run it owns, then its partial.
template <class Ops>
CMSEG_WGRAD_FN void block_body(const Params& P, Ops& ops, float* smem) {
  const int tid = ops.tid(), warp = tid >> 5, lane = tid & 31;
  const int kd = warp / 4, nt = warp % 4;
  const int ci0 = ops.block(1) * kCi, co0 = ops.block(2) * kCo;
  float* xslots = smem;
  float* yslots = smem + kXSlots * kXSlot;
  float acc[2][3][3][4];  // [m-tile][kh][kw][fragment element]
  for_each_acc([&](int m, int kh, int kw, int i) { acc[m][kh][kw][i] = 0.f; });

  for (int64_t u = ops.block(0); u < P.units; u += ops.grid(0)) {
    const int run = (int)(u % P.runs);
    const int64_t column = u / P.runs;
    const int tw = (int)(column % P.tiles_w);
    const int th = (int)((column / P.tiles_w) % P.tiles_h);
    const int img = (int)(column / ((int64_t)P.tiles_w * P.tiles_h));
    const int h0 = th * kTileH, w0 = tw * kTileW;
    const int d0 = run * P.run_d, d1 = d0 + P.run_d < P.D ? d0 + P.run_d : P.D;
    // x plane p lives in slot (p - d0 + 1) mod 4, dy plane d in slot (d - d0) mod 2.
    for (int p = d0 - 1; p <= d0 + 1; ++p)
      load_x_plane(P, ops, xslots + ((p - d0 + 1) & 3) * kXSlot, img, ci0, p, h0, w0);
    load_dy_plane(P, ops, yslots, img, co0, d0, h0, w0);
    ops.commit();
    for (int d = d0; d < d1; ++d) {
      if (d + 1 < d1) {  // the next plane's copies, in flight during this plane's products
        load_x_plane(P, ops, xslots + ((d + 2 - d0 + 1) & 3) * kXSlot, img, ci0, d + 2, h0, w0);
        load_dy_plane(P, ops, yslots + ((d + 1 - d0) & 1) * kDySlot, img, co0, d + 1, h0, w0);
      }
      ops.commit();  // possibly empty: the group count stays uniform
      ops.wait_all_but_one();
      // Complete now: the prologue's copies (first plane), else x plane d + 1 and dy d.
      if (d == d0) {
        round_x_plane(ops, xslots);
        round_x_plane(ops, xslots + kXSlot);
      }
      round_x_plane(ops, xslots + ((d + 1 - d0 + 1) & 3) * kXSlot);
      round_dy_plane(ops, yslots + ((d - d0) & 1) * kDySlot);
      ops.sync();
      plane_products(ops, xslots + ((d + kd - d0) & 3) * kXSlot, yslots + ((d - d0) & 1) * kDySlot, nt, acc);
      ops.sync();  // before the next iteration's copies overwrite these slots
    }
  }

  // C's rows are output channels, its columns input channels.
  float* out = P.partial + (((int64_t)ops.block(2) * ops.grid(1) + ops.block(1)) * ops.grid(0) + ops.block(0)) *
                               (int64_t)kPartial;
  for_each_acc([&](int m, int kh, int kw, int i) {
    const int co = m * 16 + acc_row(lane, i), ci = nt * 8 + acc_col(lane, i);
    out[(co * kCi + ci) * kTaps + (kd * 3 + kh) * 3 + kw] = acc[m][kh][kw][i];
  });
}

// Blocks along the runs (gridDim.x) for `units` runs, `channel_blocks` = gridDim.y *
// gridDim.z and `wave` blocks resident at once: the fewest that reach the shortest
// time, counted as waves x runs per block (each block's runs take the same time). A
// grid one block past a wave costs a second wave for that block; too few blocks leave
// SMs idle. At most two waves of blocks in all: each block keeps a 108 KiB partial.
// Host code.
inline int64_t blocks_along_runs(int64_t units, int64_t channel_blocks, int64_t wave) {
  int64_t best = 1, best_cost = -1;
  int64_t most = 2 * wave / channel_blocks;
  most = most < 1 ? 1 : most > units ? units : most;
  for (int64_t gx = 1; gx <= most; ++gx) {
    const int64_t waves = (gx * channel_blocks + wave - 1) / wave, per_block = (units + gx - 1) / gx;
    const int64_t cost = waves * per_block;
    if (best_cost < 0 || cost < best_cost) best = gx, best_cost = cost;
  }
  return best;
}

// dw[co][ci][tap] += the partials' sum over blocks in order; element e of block
// (z, y): co = z * kCo + e / (kCi * kTaps), ci = y * kCi + (e / kTaps) % kCi.
CMSEG_WGRAD_FN void add_partials(const float* partial, int blocks_x, int grid_y, int cin, int cout, int64_t item,
                                 float* dw) {
  const int64_t e = item % kPartial, zy = item / kPartial;
  const int y = (int)(zy % grid_y), z = (int)(zy / grid_y);
  const int col = (int)(e / (kCi * kTaps)), cil = (int)((e / kTaps) % kCi), tap = (int)(e % kTaps);
  const int co = z * kCo + col, ci = y * kCi + cil;
  if (co >= cout || ci >= cin) return;
  const float* p = partial + zy * blocks_x * (int64_t)kPartial + e;
  float s = 0.f;
  for (int b = 0; b < blocks_x; ++b) s += p[(int64_t)b * kPartial];
  dw[((int64_t)co * cin + ci) * kTaps + tap] += s;
}

}  // namespace wgrad
}  // namespace cuda
}  // namespace cmseg
