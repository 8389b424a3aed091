// Pictures of predictions as 8-bit images for src/data/png.ts: gray inputs, label maps
// laid over their image in class colours, heat maps of pixel-wise confusion-matrix
// entries, and grids that put several of them side by side. 2D only: 3D callers pass a slice.

import type { PngImage } from '../data/png';

/** RGB per class: background black, then colours that stay apart for colour-blind readers (Okabe-Ito). */
export const CLASS_COLORS: readonly (readonly [number, number, number])[] = [
  [0, 0, 0],
  [230, 159, 0],
  [86, 180, 233],
  [0, 158, 115],
  [240, 228, 66],
  [0, 114, 178],
  [213, 94, 0],
  [204, 121, 167],
];

export function classColor(c: number): readonly [number, number, number] {
  return CLASS_COLORS[c % CLASS_COLORS.length];
}

function checkSize(what: string, length: number, h: number, w: number): void {
  if (length !== h * w) throw new RangeError(`${what} has ${length} pixels, expected ${h}x${w} = ${h * w}`);
}

/** Intensities scaled from their own min..max to 0..255 (a constant image becomes black). */
export function grayImage(values: ArrayLike<number>, h: number, w: number): PngImage {
  checkSize('image', values.length, h, w);
  let lo = Infinity;
  let hi = -Infinity;
  for (let i = 0; i < values.length; i++) {
    lo = Math.min(lo, values[i]);
    hi = Math.max(hi, values[i]);
  }
  const scale = hi > lo ? 255 / (hi - lo) : 0;
  const data = new Uint8Array(h * w);
  for (let i = 0; i < data.length; i++) data[i] = Math.round((values[i] - lo) * scale);
  return { width: w, height: h, channels: 1, data };
}

/** The gray image in RGB with every non-background label blended in its class colour; 255 (unlabelled) is left gray. */
export function labelOverlay(image: ArrayLike<number>, labels: Uint8Array, h: number, w: number, alpha = 0.6): PngImage {
  checkSize('labels', labels.length, h, w);
  const gray = grayImage(image, h, w).data;
  const data = new Uint8Array(h * w * 3);
  for (let i = 0; i < h * w; i++) {
    const g = gray[i];
    const label = labels[i];
    const blend = label !== 0 && label !== 255;
    const color = classColor(label);
    for (let k = 0; k < 3; k++) data[i * 3 + k] = blend ? Math.round((1 - alpha) * g + alpha * color[k]) : g;
  }
  return { width: w, height: h, channels: 3, data };
}

/** A label map alone: class colours on black, 255 (unlabelled) in mid gray. */
export function labelImage(labels: Uint8Array, h: number, w: number): PngImage {
  checkSize('labels', labels.length, h, w);
  const data = new Uint8Array(h * w * 3);
  for (let i = 0; i < h * w; i++) {
    const color = labels[i] === 255 ? ([128, 128, 128] as const) : classColor(labels[i]);
    data.set(color, i * 3);
  }
  return { width: w, height: h, channels: 3, data };
}

// Anchor colours of the viridis colour map at 0, 0.25, 0.5, 0.75, 1 (linear in between).
const VIRIDIS: readonly (readonly [number, number, number])[] = [
  [68, 1, 84],
  [59, 82, 139],
  [33, 145, 140],
  [94, 201, 98],
  [253, 231, 37],
];

export function viridis(t: number): [number, number, number] {
  const x = Math.min(1, Math.max(0, Number.isFinite(t) ? t : 0)) * (VIRIDIS.length - 1);
  const i = Math.min(VIRIDIS.length - 2, Math.floor(x));
  const f = x - i;
  const a = VIRIDIS[i];
  const b = VIRIDIS[i + 1];
  return [0, 1, 2].map((k) => Math.round(a[k] + f * (b[k] - a[k]))) as [number, number, number];
}

/** Values in [vmin, vmax] coloured with viridis (CM entries: 0..1). */
export function heatMap(values: ArrayLike<number>, h: number, w: number, vmin = 0, vmax = 1): PngImage {
  checkSize('heat map', values.length, h, w);
  const data = new Uint8Array(h * w * 3);
  const span = vmax - vmin || 1;
  for (let i = 0; i < h * w; i++) data.set(viridis((values[i] - vmin) / span), i * 3);
  return { width: w, height: h, channels: 3, data };
}

/** Nearest-neighbour enlargement, so that 32-pixel digits are visible. */
export function upscale(image: PngImage, factor: number): PngImage {
  if (!Number.isInteger(factor) || factor < 1) throw new RangeError(`upscale factor ${factor} must be an integer >= 1`);
  if (factor === 1) return image;
  const { width, height, channels } = image;
  const W = width * factor;
  const data = new Uint8Array(W * height * factor * channels);
  for (let y = 0; y < height * factor; y++) {
    for (let x = 0; x < W; x++) {
      const from = (Math.floor(y / factor) * width + Math.floor(x / factor)) * channels;
      data.set(image.data.subarray(from, from + channels), (y * W + x) * channels);
    }
  }
  return { width: W, height: height * factor, channels, data };
}

function toRgb(image: PngImage): PngImage {
  if (image.channels === 3) return image;
  if (image.channels !== 1) throw new RangeError(`cannot lay out a ${image.channels}-channel image in a grid`);
  const data = new Uint8Array(image.width * image.height * 3);
  for (let i = 0; i < image.width * image.height; i++) data.fill(image.data[i], i * 3, i * 3 + 3);
  return { ...image, channels: 3, data };
}

/** Rows of images (gray or RGB; null leaves a gap) in one RGB picture, `gap` white pixels apart. */
export function grid(rows: readonly (readonly (PngImage | null)[])[], gap = 2): PngImage {
  const columns = Math.max(...rows.map((r) => r.length));
  const cellW = Math.max(...rows.flat().map((im) => im?.width ?? 0));
  const cellH = Math.max(...rows.flat().map((im) => im?.height ?? 0));
  if (columns < 1 || cellW < 1) throw new RangeError('grid: no images to lay out');
  const W = columns * cellW + (columns - 1) * gap;
  const H = rows.length * cellH + (rows.length - 1) * gap;
  const data = new Uint8Array(W * H * 3).fill(255);
  rows.forEach((row, r) =>
    row.forEach((cell, c) => {
      if (!cell) return;
      const rgb = toRgb(cell);
      const x0 = c * (cellW + gap);
      const y0 = r * (cellH + gap);
      for (let y = 0; y < rgb.height; y++) {
        data.set(rgb.data.subarray(y * rgb.width * 3, (y + 1) * rgb.width * 3), ((y0 + y) * W + x0) * 3);
      }
    }),
  );
  return { width: W, height: H, channels: 3, data };
}

/**
 * One annotator's pixel-wise CM on one image as an L x L grid of heat maps: tile (i, j)
 * shows A[i][j](v) = p(annotator says i | true class j) at every pixel, 0 dark to 1 bright.
 * `cms` is the model's [N, R, L, L, H, W] output.
 */
export function cmHeatMaps(cms: Float32Array, image: number, annotator: number, annotators: number, classes: number, h: number, w: number, scale = 1): PngImage {
  const V = h * w;
  const L = classes;
  const base = (image * annotators + annotator) * L * L * V;
  if (base + L * L * V > cms.length) throw new RangeError(`cms has ${cms.length} values; image ${image}, annotator ${annotator} is out of range`);
  const rows: PngImage[][] = [];
  for (let i = 0; i < L; i++) {
    const row: PngImage[] = [];
    for (let j = 0; j < L; j++) row.push(upscale(heatMap(cms.subarray(base + (i * L + j) * V, base + (i * L + j + 1) * V), h, w), scale));
    rows.push(row);
  }
  return grid(rows, Math.max(2, scale));
}
