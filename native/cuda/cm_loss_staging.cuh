// The fused CM loss's "staged" kernel (CMSEG_CM_LOSS_KERNEL=staged): how it brings each
// tile of pixels into shared memory. The math per pixel is the pixel kernel's
// (cm_loss.cu); this header is the part that differs, the walk over tiles.
//
// Why: the loss is a streaming pass (every pixel's logits, R annotators' L*L raw CM
// channels and labels in; the gradients of all of them out; 1.77 GB per brats3d-gpu
// step), and a thread of the pixel kernel keeps one annotator's loads in flight at a
// time, in registers: 2.4 of an H200's 4.8 TB/s (BENCHMARKS.md). Here a block of kTile
// threads owns kTile consecutive pixels at a time, and copies whole tiles into shared
// memory with cp.async: the next kStages - 1 tiles' copies are in flight while the
// threads compute on this one, without holding a register each. A thread computes the
// pixel of its index in the tile from the tile's slot and writes its gradients straight
// to global memory.
//
// A slot, in floats: [L][kTile] logits, then [R][K][kTile] raw CM channels (K = L*L),
// then the labels as bytes [R][kTile] (R * kTile / 4 floats). A thread copies its own
// pixel's logits and channels (4 bytes each; an absent annotator's channels are zero
// filled, never read); the labels go 4 pixels to a copy (their arrays are [n, V], so a
// tile's labels are kTile consecutive bytes; the caller makes sure every label array is
// 4-byte aligned). Tiles run across image boundaries: each copy finds its pixel's image.
//
// The walk, for a block's tiles first, first + stride, ... (first = blockIdx.x, stride =
// gridDim.x): the first kStages - 1 tiles are issued up front, one commit group each;
// each step issues the tile kStages - 1 ahead into the slot the previous step used,
// commits (a group, empty or not, every step), waits until only the newest kStages - 1
// groups may be pending (this tile's has landed, for this thread's own copies), syncs
// (everyone's), computes, and syncs again before the slot can be refilled.
//
// Compiled twice, as conv3_filter_grad.cuh: by nvcc with the device's operations
// (cm_loss.cu) and by the host compiler with the SIMT emulation
// (native/cuda/emulation/simt_host.hpp; native/tests/test_cm_loss_staging.cpp checks
// that each pixel's compute sees exactly its values, every pixel once). Ops supplies:
// tid(), block(0), grid(0), sync(), copy4(dst, src, valid) (cp.async of a float, zero
// when !valid), copy_bytes(dst, src, bytes) (cp.async of 4 bytes of which the first
// `bytes` are read), commit(), wait_pending<N>() (cp.async.wait_group N).
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define CMSEG_STAGE_FN __device__ __forceinline__
#define CMSEG_STAGE_HD __host__ __device__ __forceinline__
#else
#define CMSEG_STAGE_FN inline
#define CMSEG_STAGE_HD inline
#endif

namespace cmseg {
namespace cuda {
namespace cmstage {

constexpr int kTile = 128;  // pixels per tile = threads per block

// Where a slot keeps what (offsets in floats from the slot's start; the host sizes the slots).
struct Slot {
  int L, R, K;
  CMSEG_STAGE_HD int logit(int k) const { return k * kTile; }
  CMSEG_STAGE_HD int channel(int r, int e) const { return (L + r * K + e) * kTile; }
  CMSEG_STAGE_HD int labels() const { return (L + R * K) * kTile; }  // bytes [R][kTile] from here
  CMSEG_STAGE_HD int floats() const { return (L + R * K) * kTile + R * kTile / 4; }
};

// Issues the copies of tile `tile` into `slot` (this thread's share of them).
// Params: z [n, L, V], raw[r] [n, K, V], labels[r] [n, V], present [n, R] or null, n, V.
template <class Ops, class Params>
CMSEG_STAGE_FN void issue_tile(const Params& P, const Slot& S, Ops& ops, float* slot, int64_t tile) {
  const int64_t V = P.V, total = (int64_t)P.n * V, pix0 = tile * kTile;
  const int t = ops.tid();
  const int64_t pix = pix0 + t;
  const bool in = pix < total;
  const int64_t i = in ? pix / V : 0, v = in ? pix - i * V : 0;
  for (int k = 0; k < S.L; ++k) ops.copy4(slot + S.logit(k) + t, in ? P.z + (i * S.L + k) * V + v : P.z, in);
  for (int r = 0; r < S.R; ++r) {
    const bool here = in && (!P.present || P.present[i * S.R + r] != 0);
    const float* raw = here ? P.raw[r] + i * S.K * V + v : P.raw[r];
    for (int e = 0; e < S.K; ++e) ops.copy4(slot + S.channel(r, e) + t, here ? raw + (int64_t)e * V : raw, here);
  }
  uint8_t* labels = reinterpret_cast<uint8_t*>(slot + S.labels());
  for (int q = t; q < S.R * (kTile / 4); q += kTile) {
    const int r = q / (kTile / 4), k = 4 * (q % (kTile / 4));
    const int64_t left = total - (pix0 + k);
    const int bytes = left >= 4 ? 4 : left > 0 ? (int)left : 0;
    ops.copy_bytes(labels + r * kTile + k, bytes ? P.labels[r] + pix0 + k : P.labels[r], bytes);
  }
}

// Runs compute(slot, t, pix) for every pixel pix = tile * kTile + t of this block's tiles
// (t: this thread's index), with the tile's values in `slot`. stages: kStages slots of
// S.floats() each.
template <int kStages, class Ops, class Params, class Compute>
CMSEG_STAGE_FN void walk(const Params& P, const Slot& S, Ops& ops, float* stages, Compute compute) {
  static_assert(kStages >= 2, "one slot computed while the next is filled, at least");
  const int64_t total = (int64_t)P.n * P.V, tiles = (total + kTile - 1) / kTile;
  const int64_t first = ops.block(0), stride = ops.grid(0);
  const int floats = S.floats();
  for (int s = 0; s < kStages - 1; ++s) {
    const int64_t tile = first + s * stride;
    if (tile < tiles) issue_tile(P, S, ops, stages + s * floats, tile);
    ops.commit();
  }
  int s = 0;
  for (int64_t tile = first; tile < tiles; tile += stride) {
    const int64_t ahead = tile + (kStages - 1) * stride;
    if (ahead < tiles) issue_tile(P, S, ops, stages + ((s + kStages - 1) % kStages) * floats, ahead);
    ops.commit();
    ops.template wait_pending<kStages - 1>();
    ops.sync();
    const int64_t pix = tile * kTile + ops.tid();
    if (pix < total) compute(stages + s * floats, ops.tid(), pix);
    ops.sync();  // the next step's issue refills this slot
    s = (s + 1) % kStages;
  }
}

}  // namespace cmstage
}  // namespace cuda
}  // namespace cmseg
