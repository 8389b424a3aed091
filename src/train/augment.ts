// Data augmentation that keeps labels exact: random flips along every spatial axis and,
// in 2D, rotations by multiples of 90 degrees. These only permute pixels, so the image
// channels, every annotator's map and the consensus are moved by the same permutation
// and no label is interpolated. 3D volumes are flipped only (a 90-degree turn would swap
// anisotropic axes). Non-square 2D images are turned by 0 or 180 degrees only.

import { Rng } from '../data/random';
import type { AnnotatedBatch } from './data';
import { voxelsOf } from './data';

export interface AugmentOptions {
  /** Random flip of each spatial axis with probability 1/2. */
  flips: boolean;
  /** 2D only: rotation by k * 90 degrees, k uniform in 0..3. */
  rotations: boolean;
}

export const NO_AUGMENTATION: AugmentOptions = { flips: false, rotations: false };

/** One image's transform: flip per spatial axis (in S order), then counter-clockwise quarter turns (2D). */
export interface SpatialTransform {
  flips: boolean[];
  quarterTurns: number;
}

export function drawTransform(spatial: readonly number[], options: AugmentOptions, rng: Rng): SpatialTransform {
  const flips = spatial.map(() => (options.flips ? rng.int(2) === 1 : false));
  let quarterTurns = 0;
  if (options.rotations && spatial.length === 2) {
    const square = spatial[0] === spatial[1];
    quarterTurns = square ? rng.int(4) : 2 * rng.int(2);
  }
  return { flips, quarterTurns };
}

/**
 * For every output voxel, the input voxel it comes from. The output is the input turned
 * `quarterTurns` times counter-clockwise (numpy.rot90 on the (H, W) axes) and then
 * flipped along the marked axes.
 */
export function sourceIndices(spatial: readonly number[], t: SpatialTransform): Int32Array {
  const V = voxelsOf(spatial);
  const out = new Int32Array(V);
  const turns = ((t.quarterTurns % 4) + 4) % 4;
  if (spatial.length === 2) {
    const [H, W] = spatial;
    if (turns % 2 === 1 && H !== W) throw new RangeError(`a quarter turn needs a square image, got ${H}x${W}`);
    for (let y = 0; y < H; y++) {
      for (let x = 0; x < W; x++) {
        let sy = t.flips[0] ? H - 1 - y : y;
        let sx = t.flips[1] ? W - 1 - x : x;
        // rot90 once: out[y][x] = in[x][w-1-y], where w is the width of that turn's input,
        // i.e. the height h of its output. Applying it `turns` times composes the inverse
        // maps, from the last turn back; each turn's output is (h, w) and its input (w, h).
        // (Using the final W for every turn made a non-square image turned by 180 degrees
        // read rows of its neighbours in the batch, or past the batch's ends: NaN pixels.)
        let h = H;
        let w = W;
        for (let k = 0; k < turns; k++) {
          [sy, sx] = [sx, h - 1 - sy];
          [h, w] = [w, h];
        }
        out[y * W + x] = sy * W + sx;
      }
    }
    return out;
  }
  if (spatial.length === 3) {
    if (turns !== 0) throw new RangeError('3D volumes are flipped only, not rotated');
    const [D, H, W] = spatial;
    for (let z = 0; z < D; z++) {
      const sz = t.flips[0] ? D - 1 - z : z;
      for (let y = 0; y < H; y++) {
        const sy = t.flips[1] ? H - 1 - y : y;
        for (let x = 0; x < W; x++) {
          const sx = t.flips[2] ? W - 1 - x : x;
          out[(z * H + y) * W + x] = (sz * H + sy) * W + sx;
        }
      }
    }
    return out;
  }
  throw new RangeError(`spatial shape [${spatial.join(', ')}] must have 2 or 3 axes`);
}

function isIdentity(t: SpatialTransform): boolean {
  return t.quarterTurns % 4 === 0 && !t.flips.some(Boolean);
}

function permuteInto<T extends Float32Array | Uint8Array>(src: T, dst: T, offset: number, map: Int32Array): void {
  for (let v = 0; v < map.length; v++) dst[offset + v] = src[offset + map[v]];
}

/**
 * A new batch with each image transformed independently: the images' channels, every
 * label map and the consensus move alike. The transforms are drawn from `rng` in image order.
 */
export function augmentBatch(batch: AnnotatedBatch, options: AugmentOptions, rng: Rng): AnnotatedBatch {
  if (!options.flips && !options.rotations) return batch;
  const [N, C, ...spatial] = batch.shape;
  const V = voxelsOf(spatial);
  const images = new Float32Array(batch.images.length);
  const labels = batch.labels.map((map) => new Uint8Array(map.length));
  const consensus = batch.consensus ? new Uint8Array(batch.consensus.length) : undefined;
  const fused = batch.fused ? new Uint8Array(batch.fused.length) : undefined;
  for (let n = 0; n < N; n++) {
    const t = drawTransform(spatial, options, rng);
    if (isIdentity(t)) {
      images.set(batch.images.subarray(n * C * V, (n + 1) * C * V), n * C * V);
      batch.labels.forEach((map, r) => labels[r].set(map.subarray(n * V, (n + 1) * V), n * V));
      consensus?.set(batch.consensus!.subarray(n * V, (n + 1) * V), n * V);
      fused?.set(batch.fused!.subarray(n * V, (n + 1) * V), n * V);
      continue;
    }
    const map = sourceIndices(spatial, t);
    for (let c = 0; c < C; c++) permuteInto(batch.images, images, (n * C + c) * V, map);
    batch.labels.forEach((src, r) => permuteInto(src, labels[r], n * V, map));
    if (consensus) permuteInto(batch.consensus!, consensus, n * V, map);
    if (fused) permuteInto(batch.fused!, fused, n * V, map);
  }
  return { ...batch, images, labels, ...(consensus ? { consensus } : {}), ...(fused ? { fused } : {}) };
}
