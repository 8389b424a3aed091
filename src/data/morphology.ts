// Binary and per-class morphology on label maps, for the synthetic annotators of SPEC
// section 7 (over-segmentation = dilation, under-segmentation = erosion, fractures cut
// across a stroke's skeleton).
//
// Masks are Uint8Array volumes in C order with extent {d, h, w}; a 2D image is d = 1, and
// then the structuring element is a disk rather than a ball. Radii are Euclidean: the
// element holds every offset with dz^2 + dy^2 + dx^2 <= r^2. Pixels outside the volume
// count as background, as in scipy.ndimage's default (border_value = 0).

/** Spatial extent of one volume; 2D images have d = 1. */
export interface Extent {
  d: number;
  h: number;
  w: number;
}

export function voxelCount(extent: Extent): number {
  return extent.d * extent.h * extent.w;
}

export function checkExtent(extent: Extent): void {
  for (const axis of ['d', 'h', 'w'] as const) {
    const size = extent[axis];
    if (!Number.isInteger(size) || size < 1) {
      throw new RangeError(`extent.${axis} = ${size} must be a positive integer`);
    }
  }
}

function checkVolume(name: string, data: Uint8Array, extent: Extent): void {
  checkExtent(extent);
  const expected = voxelCount(extent);
  if (data.length !== expected) {
    throw new RangeError(
      `${name} has ${data.length} voxels, extent ${extent.d}x${extent.h}x${extent.w} needs ${expected}`,
    );
  }
}

function checkRadius(radius: number): void {
  if (!Number.isFinite(radius) || radius < 0) {
    throw new RangeError(`radius ${radius} must be a finite number >= 0`);
  }
}

/** Offsets (dz, dy, dx) of a disk (d = 1) or ball of Euclidean radius `radius`. */
export interface StructuringElement {
  dz: Int32Array;
  dy: Int32Array;
  dx: Int32Array;
}

export function ballElement(radius: number, threeD: boolean, extent?: Extent): StructuringElement {
  checkRadius(radius);
  const [zReach, yReach, xReach] = elementReach(radius, threeD, extent);
  const dz: number[] = [];
  const dy: number[] = [];
  const dx: number[] = [];
  // A tiny slack so that radius sqrt(2) computed in floating point still includes (1, 1).
  const limit = radius * radius + 1e-9;
  for (let z = -zReach; z <= zReach; z++) {
    for (let y = -yReach; y <= yReach; y++) {
      for (let x = -xReach; x <= xReach; x++) {
        if (z * z + y * y + x * x <= limit) {
          dz.push(z);
          dy.push(y);
          dx.push(x);
        }
      }
    }
  }
  return { dz: Int32Array.from(dz), dy: Int32Array.from(dy), dx: Int32Array.from(dx) };
}

/**
 * How far the element reaches along z, y, x. Given the volume's extent, each reach is
 * clipped to that axis's size: an offset of at least the size lands outside the volume
 * from every voxel, so dropping longer ones changes neither a dilation nor an erosion
 * (which the offset of exactly the size, kept, still empties). Without the clip a disk of
 * radius 1e6 was a 4e12-offset element that ran the process out of memory.
 */
function elementReach(radius: number, threeD: boolean, extent?: Extent): [number, number, number] {
  const reach = Math.floor(radius);
  const clip = (size: number | undefined) => (size === undefined ? reach : Math.min(reach, size));
  return [threeD ? clip(extent?.d) : 0, clip(extent?.h), clip(extent?.w)];
}

/**
 * Whether stamping the element voxel by voxel costs more than a distance transform of the
 * whole volume (a few passes over every voxel): large radii, such as a dilation by 300 in a
 * 40^3 volume, which took foreground x element = 2e4 x 1.1e8 steps, go by distance instead.
 */
function distanceIsCheaper(mask: Uint8Array, extent: Extent, radius: number): boolean {
  const [rz, ry, rx] = elementReach(radius, extent.d > 1, extent);
  const elementBound = (2 * rz + 1) * (2 * ry + 1) * (2 * rx + 1);
  let foreground = 0;
  for (let i = 0; i < mask.length; i++) if (mask[i] !== 0) foreground++;
  return elementBound * foreground > 32 * mask.length;
}

/** Dilation of the non-zero voxels of `mask` by a disk/ball; returns a 0/1 mask. */
export function dilateBinary(mask: Uint8Array, extent: Extent, radius: number): Uint8Array {
  checkVolume('mask', mask, extent);
  checkRadius(radius);
  const out = new Uint8Array(mask.length);
  if (distanceIsCheaper(mask, extent, radius)) {
    // The element is symmetric: a voxel is in the dilation iff some foreground voxel lies
    // within the radius of it (voxels outside the volume are not foreground).
    const distance2 = squaredDistanceTo(mask, extent, true, false);
    const limit = radius * radius + 1e-9;
    for (let i = 0; i < out.length; i++) out[i] = distance2[i] <= limit ? 1 : 0;
    return out;
  }
  const element = ballElement(radius, extent.d > 1, extent);
  const { d, h, w } = extent;
  for (let z = 0, i = 0; z < d; z++) {
    for (let y = 0; y < h; y++) {
      for (let x = 0; x < w; x++, i++) {
        if (mask[i] === 0) continue;
        // Stamp the element around every foreground voxel: the union of shifted elements.
        for (let k = 0; k < element.dx.length; k++) {
          const zz = z + element.dz[k];
          const yy = y + element.dy[k];
          const xx = x + element.dx[k];
          if (zz < 0 || zz >= d || yy < 0 || yy >= h || xx < 0 || xx >= w) continue;
          out[(zz * h + yy) * w + xx] = 1;
        }
      }
    }
  }
  return out;
}

/** Erosion of the non-zero voxels of `mask` by a disk/ball; returns a 0/1 mask. */
export function erodeBinary(mask: Uint8Array, extent: Extent, radius: number): Uint8Array {
  checkVolume('mask', mask, extent);
  checkRadius(radius);
  const out = new Uint8Array(mask.length);
  if (distanceIsCheaper(mask, extent, radius)) {
    // A voxel survives iff no background voxel (outside the volume included) lies within
    // the radius of it.
    const distance2 = squaredDistanceTo(mask, extent, false, true);
    const limit = radius * radius + 1e-9;
    for (let i = 0; i < out.length; i++) out[i] = mask[i] !== 0 && distance2[i] > limit ? 1 : 0;
    return out;
  }
  const element = ballElement(radius, extent.d > 1, extent);
  const { d, h, w } = extent;
  for (let z = 0, i = 0; z < d; z++) {
    for (let y = 0; y < h; y++) {
      for (let x = 0; x < w; x++, i++) {
        if (mask[i] === 0) continue;
        let inside = 1;
        // A voxel survives only if the whole element placed on it lies in the foreground.
        for (let k = 0; k < element.dx.length && inside; k++) {
          const zz = z + element.dz[k];
          const yy = y + element.dy[k];
          const xx = x + element.dx[k];
          if (zz < 0 || zz >= d || yy < 0 || yy >= h || xx < 0 || xx >= w) inside = 0;
          else if (mask[(zz * h + yy) * w + xx] === 0) inside = 0;
        }
        out[i] = inside;
      }
    }
  }
  return out;
}

function classMask(labels: Uint8Array, label: number): Uint8Array {
  const mask = new Uint8Array(labels.length);
  for (let i = 0; i < labels.length; i++) mask[i] = labels[i] === label ? 1 : 0;
  return mask;
}

function foregroundClasses(labels: Uint8Array): number[] {
  const seen = new Uint8Array(256);
  for (let i = 0; i < labels.length; i++) seen[labels[i]] = 1;
  const classes: number[] = [];
  // 0 is background and 255 means "unlabelled" (SPEC section 1): neither is a class to grow.
  for (let c = 1; c < 255; c++) if (seen[c]) classes.push(c);
  return classes;
}

/**
 * Dilates every foreground class of a label map separately.
 * Overlaps: a voxel that already has a foreground label keeps it (an over-segmenter
 * only claims background), and a background voxel reached by several classes takes the
 * highest of them. Unlabelled voxels (255) are left alone.
 */
export function dilateLabels(labels: Uint8Array, extent: Extent, radius: number): Uint8Array {
  checkVolume('labels', labels, extent);
  const out = Uint8Array.from(labels);
  // Ascending order, so a later (higher) class overwrites background claimed by a lower one.
  for (const label of foregroundClasses(labels)) {
    const grown = dilateBinary(classMask(labels, label), extent, radius);
    for (let i = 0; i < out.length; i++) {
      if (grown[i] && labels[i] === 0) out[i] = label;
    }
  }
  return out;
}

/**
 * Erodes every foreground class of a label map separately: a class's voxel survives if
 * the element placed on it lies within that class. Voxels eroded away become background
 * (0), also where they border another foreground class. Unlabelled voxels (255) are kept.
 */
export function erodeLabels(labels: Uint8Array, extent: Extent, radius: number): Uint8Array {
  checkVolume('labels', labels, extent);
  const out = Uint8Array.from(labels);
  for (const label of foregroundClasses(labels)) {
    const kept = erodeBinary(classMask(labels, label), extent, radius);
    for (let i = 0; i < out.length; i++) {
      if (labels[i] === label && !kept[i]) out[i] = 0;
    }
  }
  return out;
}

/**
 * Skeleton of a 2D binary mask by Zhang-Suen thinning (8-connected, one pixel wide).
 * Used to find where a stroke runs, so a fracture can be cut perpendicular to it.
 */
export function skeletonize2d(mask: Uint8Array, extent: Extent): Uint8Array {
  checkVolume('mask', mask, extent);
  if (extent.d !== 1) throw new RangeError(`skeletonize2d needs d = 1, got d = ${extent.d}`);
  const { h, w } = extent;
  const img = new Uint8Array(mask.length);
  for (let i = 0; i < mask.length; i++) img[i] = mask[i] ? 1 : 0;
  const at = (y: number, x: number): number =>
    y < 0 || y >= h || x < 0 || x >= w ? 0 : img[y * w + x];
  const toDelete: number[] = [];
  let changed = true;
  while (changed) {
    changed = false;
    for (let pass = 0; pass < 2; pass++) {
      toDelete.length = 0;
      for (let y = 0; y < h; y++) {
        for (let x = 0; x < w; x++) {
          if (!img[y * w + x]) continue;
          // Neighbours clockwise from north: P2..P9 in Zhang and Suen's notation.
          const p = [
            at(y - 1, x), at(y - 1, x + 1), at(y, x + 1), at(y + 1, x + 1),
            at(y + 1, x), at(y + 1, x - 1), at(y, x - 1), at(y - 1, x - 1),
          ];
          let neighbours = 0;
          let transitions = 0;
          for (let k = 0; k < 8; k++) {
            neighbours += p[k];
            if (p[k] === 0 && p[(k + 1) % 8] === 1) transitions++;
          }
          if (neighbours < 2 || neighbours > 6 || transitions !== 1) continue;
          const [n, , e, , s, , wv] = p;
          const removable = pass === 0
            ? n * e * s === 0 && e * s * wv === 0
            : n * e * wv === 0 && n * s * wv === 0;
          if (removable) toDelete.push(y * w + x);
        }
      }
      for (const i of toDelete) img[i] = 0;
      if (toDelete.length > 0) changed = true;
    }
  }
  return img;
}

/**
 * Exact squared Euclidean distance from every voxel to the nearest background voxel
 * (0 on background), by separable lower envelopes of parabolas (Felzenszwalb and
 * Huttenlocher 2012). Outside the volume counts as background, matching the erosion
 * convention above, so a voxel on the border is at distance 1. `sqrt` of it is the local
 * half-thickness of a stroke.
 */
export function squaredDistanceToBackground(mask: Uint8Array, extent: Extent): Float64Array {
  checkVolume('mask', mask, extent);
  return squaredDistanceTo(mask, extent, false, true);
}

/**
 * Squared distance from every voxel to the nearest voxel whose mask value is non-zero
 * (`toForeground`) or zero, with the outside of the volume counted as such a voxel or
 * not (`outsideCounts`). With no such voxel anywhere, every distance is at least `far`.
 */
function squaredDistanceTo(mask: Uint8Array, extent: Extent, toForeground: boolean, outsideCounts: boolean): Float64Array {
  const { d, h, w } = extent;
  // Larger than any squared distance inside the volume, and exact in a double.
  const far = (d + h + w + 2) ** 2;
  const pad = outsideCounts ? 0 : far;
  const dist = new Float64Array(mask.length);
  for (let i = 0; i < mask.length; i++) dist[i] = (mask[i] !== 0) === toForeground ? 0 : far;
  const axes: Array<{ length: number; stride: number; lines: number[] }> = [];
  const lineStarts = (length: number, stride: number): number[] => {
    const starts: number[] = [];
    for (let i = 0; i < dist.length; i++) {
      // A line starts at every voxel whose coordinate along this axis is 0.
      if (Math.floor(i / stride) % length === 0) starts.push(i);
    }
    return starts;
  };
  axes.push({ length: w, stride: 1, lines: lineStarts(w, 1) });
  axes.push({ length: h, stride: w, lines: lineStarts(h, w) });
  if (d > 1) axes.push({ length: d, stride: h * w, lines: lineStarts(d, h * w) });
  for (const axis of axes) {
    // Pad one sample at each end: 0 where the outside of the volume counts as a target
    // voxel, else `far` (no target there).
    const n = axis.length + 2;
    const f = new Float64Array(n);
    const out = new Float64Array(n);
    for (const start of axis.lines) {
      f[0] = pad;
      f[n - 1] = pad;
      for (let k = 0; k < axis.length; k++) f[k + 1] = dist[start + k * axis.stride];
      lowerEnvelope(f, out);
      for (let k = 0; k < axis.length; k++) dist[start + k * axis.stride] = out[k + 1];
    }
  }
  return dist;
}

/** One-dimensional squared distance transform: out[q] = min_p (q - p)^2 + f[p]. */
function lowerEnvelope(f: Float64Array, out: Float64Array): void {
  const n = f.length;
  const vertex = new Int32Array(n); // positions of the parabolas in the envelope
  const bound = new Float64Array(n + 1); // bound[k]: where parabola k starts to be lowest
  const intersect = (q: number, p: number): number =>
    (f[q] + q * q - (f[p] + p * p)) / (2 * q - 2 * p);
  let k = 0;
  vertex[0] = 0;
  bound[0] = -Infinity;
  bound[1] = Infinity;
  for (let q = 1; q < n; q++) {
    let s = intersect(q, vertex[k]);
    // bound[0] is -Infinity, so this stops at k = 0 at the latest.
    while (s <= bound[k]) {
      k--;
      s = intersect(q, vertex[k]);
    }
    k++;
    vertex[k] = q;
    bound[k] = s;
    bound[k + 1] = Infinity;
  }
  k = 0;
  for (let q = 0; q < n; q++) {
    while (bound[k + 1] < q) k++;
    const p = vertex[k];
    out[q] = (q - p) * (q - p) + f[p];
  }
}

/** Number of foreground voxels: non-zero and not 255 ("unlabelled", SPEC section 1). */
export function countForeground(mask: Uint8Array): number {
  let count = 0;
  for (let i = 0; i < mask.length; i++) if (mask[i] !== 0 && mask[i] !== 255) count++;
  return count;
}

/**
 * Connected components of the non-zero voxels (8-connected in 2D, 26-connected in 3D,
 * the connectivity a fracture must break). Returns the number of components.
 */
export function countComponents(mask: Uint8Array, extent: Extent): number {
  checkVolume('mask', mask, extent);
  const { d, h, w } = extent;
  const seen = new Uint8Array(mask.length);
  const stack: number[] = [];
  let components = 0;
  for (let start = 0; start < mask.length; start++) {
    if (!mask[start] || seen[start]) continue;
    components++;
    seen[start] = 1;
    stack.push(start);
    while (stack.length > 0) {
      const i = stack.pop() as number;
      const x = i % w;
      const y = Math.floor(i / w) % h;
      const z = Math.floor(i / (w * h));
      for (let dz = -1; dz <= 1; dz++) {
        const zz = z + dz;
        if (zz < 0 || zz >= d) continue;
        for (let dy = -1; dy <= 1; dy++) {
          const yy = y + dy;
          if (yy < 0 || yy >= h) continue;
          for (let dx = -1; dx <= 1; dx++) {
            const xx = x + dx;
            if (xx < 0 || xx >= w) continue;
            const j = (zz * h + yy) * w + xx;
            if (mask[j] && !seen[j]) {
              seen[j] = 1;
              stack.push(j);
            }
          }
        }
      }
    }
  }
  return components;
}
