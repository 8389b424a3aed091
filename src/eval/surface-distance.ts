// Surface distances between two binary masks on a voxel grid, and the 95th-percentile
// Hausdorff distance (HD95) that BraTS reports beside Dice for its tumour regions.
//
// Definitions (MONAI's compute_hausdorff_distance with percentile=95 and the voxel spacing;
// SciPy's binary_erosion with the cross and distance_transform_edt with `sampling`):
//   surface(M)   the voxels of M with a 6-neighbour outside M (the volume's edge counts as
//                outside): M minus its erosion by the 3D cross. A [1, H, W] grid is a 2D
//                image: its surface is M minus its erosion by the 2D cross (4-neighbours in
//                the plane), as every tool computes HD95 on a 2D array; the 3D cross would
//                make every pixel surface (nothing lies above or below a single slice).
//   d(a, B)      the Euclidean distance, in mm (the voxel spacing), from voxel a to the
//                nearest voxel of surface(B);
//   HD95(P, Y)   max(p95 {d(a, Y): a in surface(P)}, p95 {d(b, P): b in surface(Y)}), p95
//                the 95th percentile with linear interpolation between order statistics.
// Not MedPy's hd95, which takes the 95th percentile of both directions' distances pooled
// into one set: that differs (usually it is smaller), e.g. P = {0}, Y = {0, 4} on a line
// of 1 mm voxels: 3.8 here (the p95 of {0, 4}), 3.6 in MedPy (the p95 of {0, 0, 4}).
// Both masks empty: 0 (they agree). Exactly one empty: NaN (no surface to measure to;
// BraTS's own scorer writes a fixed penalty there instead; reports leave NaN out of the
// mean and say how many were left out).
//
// The distances come from an exact Euclidean distance transform (Felzenszwalb and
// Huttenlocher's lower envelope of parabolas, one pass per axis, each axis scaled by its
// spacing), run on the bounding box of the two masks only: the nearest surface voxel of
// either mask lies inside that box, so the box's transform is the whole volume's there.

import { arrayKind } from '../errors';

/** [D, H, W] sizes of a volume (W varies fastest). */
export type Dims3 = readonly [number, number, number];

/**
 * Squared distances along one line: out[p] = min over q of (p - q)^2 * s2 + f[q] (f[q] = Infinity:
 * no feature), for n samples at stride `stride` from `base` in f (read) and out (written).
 */
function lineTransform(f: Float64Array, out: Float64Array, base: number, stride: number, n: number, s2: number, v: Int32Array, z: Float64Array, g: Float64Array): void {
  for (let q = 0; q < n; q++) g[q] = f[base + q * stride] / s2; // in units of the axis's spacing
  let k = -1;
  for (let q = 0; q < n; q++) {
    if (g[q] === Infinity) continue;
    // Drop parabolas of the envelope that the new one (vertex at q) hides.
    let s = -Infinity;
    while (k >= 0) {
      const r = v[k];
      s = (g[q] + q * q - (g[r] + r * r)) / (2 * (q - r));
      if (s <= z[k]) k--;
      else break;
    }
    k++;
    v[k] = q;
    z[k] = k === 0 ? -Infinity : s;
    z[k + 1] = Infinity;
  }
  if (k < 0) {
    for (let p = 0; p < n; p++) out[base + p * stride] = Infinity;
    return;
  }
  let j = 0;
  for (let p = 0; p < n; p++) {
    while (z[j + 1] < p) j++;
    const d = p - v[j];
    out[base + p * stride] = (d * d + g[v[j]]) * s2;
  }
}

/** dims must be whole: fractional ones whose product matches the length would still index. */
function checkDims(who: string, dims: Dims3): void {
  // A typed array (Int32Array.from(shape)) is three numbers as well: it was refused with a
  // message showing three good values.
  const list = numberList(dims);
  if (list === undefined || list.length !== 3 || !list.every((d) => Number.isInteger(d) && (d as number) >= 1)) {
    throw new RangeError(`${who}: dims [${list !== undefined ? list.join(', ') : String(dims)}] must be three integers >= 1`);
  }
}

/** The entries of an array or a typed array (e.g. a NIfTI header's Float32Array pixdim); undefined for anything else. */
function numberList(value: unknown): unknown[] | undefined {
  if (Array.isArray(value)) return value;
  if (ArrayBuffer.isView(value) && !(value instanceof DataView)) return Array.from(value as unknown as ArrayLike<unknown>);
  return undefined;
}

/**
 * The spacing must be three finite numbers > 0, one per axis [d, h, w]: a missing axis made
 * every distance NaN, a fourth value was ignored, and 0 made distances Infinity, all silently.
 */
function checkSpacing(who: string, spacing: readonly number[]): void {
  // Typed arrays are taken too (a NIfTI pixdim is a Float32Array): they were refused with a
  // message that showed three good values.
  const list = numberList(spacing);
  if (list === undefined || list.length !== 3 || !list.every((v) => typeof v === 'number' && v > 0 && Number.isFinite(v))) {
    const shown = list !== undefined ? list.map((v) => (typeof v === 'number' ? String(v) : JSON.stringify(v))).join(', ') : String(spacing);
    throw new RangeError(`${who}: voxel spacing ${shown} must be finite and > 0 along each of d, h, w (three numbers, mm)`);
  }
}

/** Each mask must have the grid's voxel count: a shorter one was read past its end (as outside), silently. */
function checkMasks(who: string, dims: Dims3, masks: Record<string, ArrayLike<number>>): void {
  const V = dims[0] * dims[1] * dims[2];
  for (const [name, m] of Object.entries(masks)) {
    // Bytes only, as every label-map scorer (metrics.ts checkLabelMap): hausdorff95 copies the
    // masks' bounding box into bytes, so a Float32Array of probabilities (0.6) became 0 there
    // and HD95 came out NaN ("one mask empty"), a Uint16Array's 256 became 0 (a wrong distance),
    // and a plain array failed with "m.subarray is not a function".
    if (!(m instanceof Uint8Array)) {
      throw new TypeError(`${who}: ${name} is ${arrayKind(m)}: a mask is a Uint8Array (nonzero = inside; e.g. Uint8Array.from(probs, (p) => (p >= 0.5 ? 1 : 0)))`);
    }
    if (m.length !== V) throw new RangeError(`${who}: ${name} has ${m.length} voxels, dims ${dims.join('x')} make ${V}`);
  }
}

/**
 * Squared Euclidean distance (in the spacing's units) from every voxel to the nearest voxel
 * with `feature[v]` set; Infinity everywhere when there is none.
 */
export function squaredDistanceTransform(feature: Uint8Array, dims: Dims3, spacing: readonly [number, number, number] = [1, 1, 1]): Float64Array {
  checkDims('squaredDistanceTransform', dims);
  checkSpacing('squaredDistanceTransform', spacing);
  const [D, H, W] = dims;
  if (feature.length !== D * H * W) throw new RangeError(`feature has ${feature.length} voxels, dims ${dims.join('x')} make ${D * H * W}`);
  let a = Float64Array.from(feature, (x) => (x ? 0 : Infinity));
  let b = new Float64Array(a.length);
  const longest = Math.max(D, H, W);
  const v = new Int32Array(longest);
  const z = new Float64Array(longest + 1);
  const g = new Float64Array(longest);
  // W (stride 1), then H (stride W), then D (stride H * W).
  for (let d = 0; d < D; d++) for (let h = 0; h < H; h++) lineTransform(a, b, (d * H + h) * W, 1, W, spacing[2] ** 2, v, z, g);
  [a, b] = [b, a];
  for (let d = 0; d < D; d++) for (let w = 0; w < W; w++) lineTransform(a, b, d * H * W + w, W, H, spacing[1] ** 2, v, z, g);
  [a, b] = [b, a];
  for (let h = 0; h < H; h++) for (let w = 0; w < W; w++) lineTransform(a, b, h * W + w, H * W, D, spacing[0] ** 2, v, z, g);
  return b;
}

/**
 * The voxels of `mask` with a 6-neighbour outside it (the volume's edge is outside). `planar`
 * (default: dims[0] === 1, a 2D image): only the 4 in-plane neighbours count.
 */
export function surfaceOf(mask: Uint8Array, dims: Dims3, planar = dims[0] === 1): Uint8Array {
  checkDims('surfaceOf', dims);
  checkMasks('surfaceOf', dims, { mask });
  const [D, H, W] = dims;
  const out = new Uint8Array(mask.length);
  const at = (d: number, h: number, w: number) => d >= 0 && d < D && h >= 0 && h < H && w >= 0 && w < W && mask[(d * H + h) * W + w] !== 0;
  for (let d = 0; d < D; d++)
    for (let h = 0; h < H; h++)
      for (let w = 0; w < W; w++) {
        const i = (d * H + h) * W + w;
        if (!mask[i]) continue;
        const inside = (planar || (at(d - 1, h, w) && at(d + 1, h, w))) && at(d, h - 1, w) && at(d, h + 1, w) && at(d, h, w - 1) && at(d, h, w + 1);
        out[i] = inside ? 0 : 1;
      }
  return out;
}

/** The p-th percentile (0..100) of `values`, linear between order statistics (numpy's default). */
export function percentile(values: Float64Array, p: number): number {
  if (values.length === 0) return NaN;
  const sorted = Float64Array.from(values).sort();
  const pos = (p / 100) * (sorted.length - 1);
  const lo = Math.floor(pos);
  const hi = Math.min(lo + 1, sorted.length - 1);
  return sorted[lo] + (pos - lo) * (sorted[hi] - sorted[lo]);
}

/** The smallest box [lo, hi) per axis holding every set voxel of a and b; null when both are empty. */
function boundingBox(a: Uint8Array, b: Uint8Array, dims: Dims3): { lo: number[]; hi: number[] } | null {
  const [D, H, W] = dims;
  const lo = [D, H, W];
  const hi = [0, 0, 0];
  for (let d = 0; d < D; d++)
    for (let h = 0; h < H; h++)
      for (let w = 0; w < W; w++) {
        const i = (d * H + h) * W + w;
        if (!a[i] && !b[i]) continue;
        lo[0] = Math.min(lo[0], d), lo[1] = Math.min(lo[1], h), lo[2] = Math.min(lo[2], w);
        hi[0] = Math.max(hi[0], d + 1), hi[1] = Math.max(hi[1], h + 1), hi[2] = Math.max(hi[2], w + 1);
      }
  return hi[0] > 0 ? { lo, hi } : null;
}

function cropped(m: Uint8Array, dims: Dims3, lo: number[], box: Dims3): Uint8Array {
  const [, H, W] = dims;
  const out = new Uint8Array(box[0] * box[1] * box[2]);
  for (let d = 0; d < box[0]; d++)
    for (let h = 0; h < box[1]; h++) {
      const src = ((lo[0] + d) * H + lo[1] + h) * W + lo[2];
      out.set(m.subarray(src, src + box[2]), (d * box[1] + h) * box[2]);
    }
  return out;
}

/** Distances (mm) from each surface voxel of `from` to the surface of `to` (both [D, H, W] masks; [1, H, W]: 2D). */
export function surfaceDistances(from: Uint8Array, to: Uint8Array, dims: Dims3, spacing: readonly [number, number, number] = [1, 1, 1]): Float64Array {
  checkDims('surfaceDistances', dims);
  checkMasks('surfaceDistances', dims, { from, to });
  checkSpacing('surfaceDistances', spacing);
  return distancesBetweenSurfaces(surfaceOf(from, dims), surfaceOf(to, dims), dims, spacing);
}

/** Distances (mm) from each voxel of one surface to the nearest voxel of another. */
function distancesBetweenSurfaces(from: Uint8Array, to: Uint8Array, dims: Dims3, spacing: readonly [number, number, number]): Float64Array {
  const dt = squaredDistanceTransform(to, dims, spacing);
  const out: number[] = [];
  for (let i = 0; i < from.length; i++) if (from[i]) out.push(Math.sqrt(dt[i]));
  return Float64Array.from(out);
}

/**
 * HD95 between two binary masks ([D, H, W], nonzero = inside; [1, H, W]: a 2D image, see the
 * top of this file) in mm: 0 when both are empty, NaN when exactly one is. `spacing`: voxel
 * size [d, h, w] in mm (NIfTI's [z, y, x] pixdim).
 */
export function hausdorff95(pred: Uint8Array, truth: Uint8Array, dims: Dims3, spacing: readonly [number, number, number] = [1, 1, 1]): number {
  checkDims('hausdorff95', dims);
  const [D, H, W] = dims;
  checkMasks('hausdorff95', dims, { pred, truth });
  checkSpacing('hausdorff95', spacing);
  // 2D or 3D is the grid's, not the box's: masks within one slice of a volume stay 3D.
  const planar = D === 1;
  const box = boundingBox(pred, truth, dims);
  if (!box) return 0;
  const size: Dims3 = [box.hi[0] - box.lo[0], box.hi[1] - box.lo[1], box.hi[2] - box.lo[2]];
  const p = cropped(pred, dims, box.lo, size);
  const y = cropped(truth, dims, box.lo, size);
  if (!p.some((x) => x !== 0) || !y.some((x) => x !== 0)) return NaN;
  const sp = surfaceOf(p, size, planar);
  const sy = surfaceOf(y, size, planar);
  return Math.max(percentile(distancesBetweenSurfaces(sp, sy, size, spacing), 95), percentile(distancesBetweenSurfaces(sy, sp, size, spacing), 95));
}
