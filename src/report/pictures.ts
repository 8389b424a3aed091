// Pictures of predictions as 8-bit images for src/data/png.ts: gray inputs, label maps
// laid over their image in class colours, heat maps of pixel-wise confusion-matrix
// entries, and grids that put several of them side by side. 2D only: 3D callers pass a slice.

import type { PngImage } from '../data/png';
import { drawText, fitText, textHeight, textWidth } from './font';

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

/**
 * Class c's colour. Past the palette the colours go round again darker, then lighter, and
 * never to black: that is background's, and class 8 drawn in it would vanish from a label map.
 */
export function classColor(c: number): readonly [number, number, number] {
  if (c === 0) return CLASS_COLORS[0];
  const n = CLASS_COLORS.length - 1;
  const base = CLASS_COLORS[1 + ((c - 1) % n)];
  const round = Math.floor((c - 1) / n) % 3;
  if (round === 0) return base;
  const toward = round === 1 ? 0 : 255;
  return base.map((v) => Math.round((v + toward) / 2)) as unknown as readonly [number, number, number];
}

function checkSize(what: string, length: number, h: number, w: number): void {
  if (length !== h * w) throw new RangeError(`${what} has ${length} pixels, expected ${h}x${w} = ${h * w}`);
}

/**
 * Intensities scaled from their own finite min..max to 0..255 (a constant image becomes
 * black). Non-finite pixels are left out of the range: with them in it, one NaN (Math.min
 * returns NaN) or one Infinity (a scale of 0) turned the whole picture black. NaN is drawn
 * black, +Infinity white and -Infinity black, as values past either end would be.
 */
export function grayImage(values: ArrayLike<number>, h: number, w: number): PngImage {
  checkSize('image', values.length, h, w);
  let lo = Infinity;
  let hi = -Infinity;
  for (let i = 0; i < values.length; i++) {
    const v = values[i];
    if (!Number.isFinite(v)) continue;
    if (v < lo) lo = v;
    if (v > hi) hi = v;
  }
  const scale = hi > lo ? 255 / (hi - lo) : 0;
  const data = new Uint8Array(h * w);
  for (let i = 0; i < data.length; i++) {
    const v = values[i];
    data[i] = Number.isFinite(v) ? Math.round((v - lo) * scale) : v === Infinity ? 255 : 0;
  }
  return { width: w, height: h, channels: 1, data };
}

/** The gray image in RGB with every non-background label blended in its class colour; 255 (unlabelled) is left gray. */
/**
 * An RGB picture of three planes [3, h, w] (R, G, B), scaled together from their finite
 * min..max to 0..255, so the colours keep their balance (non-finite values as grayImage).
 */
export function colorImage(planes: ArrayLike<number>, h: number, w: number): PngImage {
  const V = h * w;
  checkSize('colour image', planes.length / 3, h, w);
  const scaled = grayImage(planes, 3, V).data; // one range for the three planes
  const data = new Uint8Array(V * 3);
  for (let i = 0; i < V; i++) for (let k = 0; k < 3; k++) data[i * 3 + k] = scaled[k * V + i];
  return { width: w, height: h, channels: 3, data };
}

/** Rec. 601 luma of three planes [3, h, w] (as image folders read colour PNGs as gray): [h, w]. */
export function luminance(planes: ArrayLike<number>, V: number): Float32Array {
  const out = new Float32Array(V);
  for (let i = 0; i < V; i++) out[i] = 0.299 * planes[i] + 0.587 * planes[V + i] + 0.114 * planes[2 * V + i];
  return out;
}

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

/** What heat maps draw for NaN (no value, e.g. a diverged model's CM): a gray that viridis never takes. */
export const NAN_COLOR: readonly [number, number, number] = [128, 128, 128];

/** Viridis at t, clamped to 0..1: +Infinity is 1, -Infinity 0 (NaN is the caller's to draw: see NAN_COLOR). */
export function viridis(t: number): [number, number, number] {
  // Math.min/max clamp +-Infinity to the ends; only NaN is not a place on the scale.
  const x = Math.min(1, Math.max(0, Number.isNaN(t) ? 0 : t)) * (VIRIDIS.length - 1);
  const i = Math.min(VIRIDIS.length - 2, Math.floor(x));
  const f = x - i;
  const a = VIRIDIS[i];
  const b = VIRIDIS[i + 1];
  return [0, 1, 2].map((k) => Math.round(a[k] + f * (b[k] - a[k]))) as [number, number, number];
}

/**
 * Values in [vmin, vmax] coloured with viridis (CM entries: 0..1), values past the ends as
 * the ends (+Infinity too). NaN is drawn in NAN_COLOR: as viridis(0) it looked like a CM
 * entry of exactly 0, so a diverged model's CMs read as confident ones.
 */
export function heatMap(values: ArrayLike<number>, h: number, w: number, vmin = 0, vmax = 1): PngImage {
  checkSize('heat map', values.length, h, w);
  const data = new Uint8Array(h * w * 3);
  const span = vmax - vmin || 1;
  // viridis() inlined, the same arithmetic without its arrays: a call, a map and a set per
  // pixel made the CM pictures of one 1024x1024 image (R * L * L tiles) take seconds.
  const last = VIRIDIS.length - 1;
  for (let i = 0; i < h * w; i++) {
    const v = values[i];
    if (Number.isNaN(v)) {
      data[i * 3] = NAN_COLOR[0];
      data[i * 3 + 1] = NAN_COLOR[1];
      data[i * 3 + 2] = NAN_COLOR[2];
      continue;
    }
    const t = (v - vmin) / span;
    const x = Math.min(1, Math.max(0, Number.isNaN(t) ? 0 : t)) * last;
    const k = Math.min(last - 1, Math.floor(x));
    const f = x - k;
    const a = VIRIDIS[k];
    const b = VIRIDIS[k + 1];
    data[i * 3] = Math.round(a[0] + f * (b[0] - a[0]));
    data[i * 3 + 1] = Math.round(a[1] + f * (b[1] - a[1]));
    data[i * 3 + 2] = Math.round(a[2] + f * (b[2] - a[2]));
  }
  return { width: w, height: h, channels: 3, data };
}

/** Nearest-neighbour enlargement, so that 32-pixel digits are visible. */
export function upscale(image: PngImage, factor: number): PngImage {
  if (!Number.isInteger(factor) || factor < 1) throw new RangeError(`upscale factor ${factor} must be an integer >= 1`);
  if (factor === 1) return image;
  const { width, height, channels } = image;
  const W = width * factor;
  const rowBytes = W * channels;
  const data = new Uint8Array(rowBytes * height * factor);
  const src = image.data;
  // Each source row is widened once, byte by byte, then copied down factor - 1 times (a
  // subarray and a set per output pixel made upscaling a 1024x1024 picture take ~100 ms).
  for (let y = 0; y < height; y++) {
    const top = y * factor * rowBytes;
    let at = top;
    for (let x = 0; x < width; x++) {
      const from = (y * width + x) * channels;
      for (let k = 0; k < factor; k++) for (let c = 0; c < channels; c++) data[at++] = src[from + c];
    }
    for (let k = 1; k < factor; k++) data.copyWithin(top + k * rowBytes, top, top + rowBytes);
  }
  return { width: W, height: height * factor, channels, data };
}

/** A white RGB picture. */
export function blank(width: number, height: number): PngImage {
  return { width, height, channels: 3, data: new Uint8Array(width * height * 3).fill(255) };
}

/** Copies `src` (gray or RGB) into the RGB picture `dst` with its top-left corner at (x, y). */
function paste(dst: PngImage, src: PngImage, x: number, y: number): void {
  const rgb = toRgb(src);
  for (let row = 0; row < rgb.height; row++) {
    dst.data.set(rgb.data.subarray(row * rgb.width * 3, (row + 1) * rgb.width * 3), ((y + row) * dst.width + x) * 3);
  }
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
  const out = blank(W, H);
  rows.forEach((row, r) => row.forEach((cell, c) => cell && paste(out, cell, c * (cellW + gap), r * (cellH + gap))));
  return out;
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

// --- Captions, legends and labelled CM figures -------------------------------------------

const INK = [0, 0, 0] as const;

/** Text scale for the captions of pictures `width` pixels wide: 2 from 120 pixels, else 1. */
export function captionScale(width: number): number {
  return width >= 120 ? 2 : 1;
}

/** Margin around a line of text at `scale`, in pixels. */
const pad = (scale: number) => 2 * scale;

/**
 * A white strip `width` pixels wide, as high as a line at `scale`, with `text` on it left-aligned:
 * at `scale` when it fits, else in the smallest type, cut to fit (ending in '..').
 */
export function textStrip(text: string, width: number, scale: number): PngImage {
  const strip = blank(width, textHeight(scale) + 2 * pad(scale));
  const s = textWidth(text, scale) <= width - 2 * pad(scale) ? scale : 1;
  drawText(strip, pad(scale), Math.round((strip.height - textHeight(s)) / 2), fitText(text, width - 2 * pad(scale), s), INK, s);
  return strip;
}

/** Pictures (gray or RGB) one under the other, left-aligned on white, `gap` pixels apart. */
export function stack(images: readonly PngImage[], gap = 0): PngImage {
  if (images.length === 0) throw new RangeError('stack: no images');
  const out = blank(Math.max(...images.map((im) => im.width)), images.reduce((sum, im) => sum + im.height, 0) + gap * (images.length - 1));
  let y = 0;
  for (const im of images) {
    paste(out, im, 0, y);
    y += im.height + gap;
  }
  return out;
}

/**
 * `image` with `caption` written above it at `scale` (null stays null: a gap in a grid). A
 * caption too long for the picture even in the smallest type widens the strip (a grid then
 * widens every cell alike): tiny images at --scale 1 would otherwise keep no word of it.
 */
export function captioned(image: PngImage | null, caption: string, scale = captionScale(image?.width ?? 0)): PngImage | null {
  return image && stack([textStrip(caption, Math.max(image.width, textWidth(caption, 1) + 2 * pad(1)), scale), image]);
}

export interface LegendEntry {
  color: readonly [number, number, number];
  text: string;
}

/** Colour swatches with their names, as many to a line as fit `width`. */
export function legend(entries: readonly LegendEntry[], width: number, scale: number): PngImage {
  const swatch = textHeight(scale);
  const lineH = swatch + 2 * pad(scale);
  const items = entries.map((e) => ({ ...e, text: fitText(e.text, width - swatch - 4 * pad(scale), scale) }));
  const itemW = (e: { text: string }) => swatch + pad(scale) + textWidth(e.text, scale) + 3 * pad(scale);
  const lines: (typeof items)[] = [[]];
  let used = pad(scale);
  for (const item of items) {
    if (lines[lines.length - 1].length > 0 && used + itemW(item) > width) {
      lines.push([]);
      used = pad(scale);
    }
    lines[lines.length - 1].push(item);
    used += itemW(item);
  }
  const out = blank(width, lines.length * lineH);
  lines.forEach((line, k) => {
    let x = pad(scale);
    const y = k * lineH + pad(scale);
    for (const item of line) {
      for (let sy = 0; sy < swatch; sy++) for (let sx = 0; sx < swatch && x + sx < width; sx++) out.data.set(item.color, ((y + sy) * width + x + sx) * 3);
      drawText(out, x + swatch + pad(scale), y, item.text, INK, scale);
      x += itemW(item);
    }
  });
  return out;
}

/** The legend entries of a label picture: each foreground class in its colour, and unlabelled pixels' gray when `unlabelled`. */
export function classLegend(classNames: readonly string[], unlabelled = false): LegendEntry[] {
  const entries: LegendEntry[] = classNames.slice(1).map((text, k) => ({ color: classColor(k + 1), text }));
  return unlabelled ? [...entries, { color: [128, 128, 128], text: 'unlabelled' }] : entries;
}

/** A class's short name for tight labels: the abbreviation in brackets when it has one ("edema (ED)" -> "ED"). */
export function shortClassName(name: string): string {
  return /\(([^()]+)\)\s*$/.exec(name)?.[1] ?? name;
}

/** A viridis bar from 0 (left) to 1 (right) with its ends and middle written under it. */
export function colorBar(width: number, scale: number): PngImage {
  const barH = textHeight(scale) + pad(scale);
  const bar = blank(width, barH + textHeight(scale) + 2 * pad(scale));
  const inner = width - 2 * pad(scale);
  for (let x = 0; x < inner; x++) {
    const c = viridis(inner > 1 ? x / (inner - 1) : 0);
    for (let y = 0; y < barH; y++) bar.data.set(c, (y * width + pad(scale) + x) * 3);
  }
  const y = barH + pad(scale);
  drawText(bar, pad(scale), y, '0', INK, scale);
  // The middle label only where it clears both ends' (a narrow bar under small tiles would overprint them).
  const mid = Math.round((width - textWidth('0.5', scale)) / 2);
  if (mid >= pad(scale) + textWidth('0', scale) + 2 * scale && mid + textWidth('0.5', scale) + 2 * scale <= width - pad(scale) - textWidth('1', scale)) {
    drawText(bar, mid, y, '0.5', INK, scale);
  }
  drawText(bar, width - pad(scale) - textWidth('1', scale), y, '1', INK, scale);
  return bar;
}

/** Where cmFigure put the heat-map grid: its top-left corner in the figure. */
export interface CmFigureLayout {
  gridX: number;
  gridY: number;
}

/**
 * cmHeatMaps' L x L grid with its axes named: a title, "true <class>" over each column,
 * "says <class>" left of each row, and a colour bar for 0..1 under the grid.
 */
export function cmFigure(
  cms: Float32Array, image: number, annotator: number, annotators: number, classes: number, h: number, w: number,
  scale: number, names: { annotator: string; classes: readonly string[] },
): PngImage & CmFigureLayout {
  const tiles = cmHeatMaps(cms, image, annotator, annotators, classes, h, w, scale);
  const gap = Math.max(2, scale);
  const tileW = w * scale;
  const tileH = h * scale;
  const s = captionScale(tileW);
  const cls = (c: number) => shortClassName(names.classes[c] ?? `class ${c}`);
  // Column headers in smaller type when a class name does not fit its tile at the caption's
  // size; tiles too narrow for "true <class>" even so (small images) are headed by the class
  // number, which the row names then give, so that no column is left unnamed.
  const named = Array.from({ length: classes }, (_, j) => `true ${cls(j)}`);
  const numbered = !named.every((t) => textWidth(t, 1) <= tileW);
  const headers = numbered ? named.map((_, j) => String(j)) : named;
  const hs = headers.every((t) => textWidth(t, s) <= tileW) ? s : 1;
  const rowLabels = Array.from({ length: classes }, (_, i) => (numbered ? `says ${cls(i)} (${i})` : `says ${cls(i)}`));
  const labelW = Math.max(...rowLabels.map((t) => textWidth(t, s))) + 2 * pad(s);
  const lineH = textHeight(s) + 2 * pad(s);
  const titleText = `${names.annotator}: p(says row | true column)`;
  // At least as wide as the title in the smallest type (a 2x2 CM of small tiles is narrower).
  const width = Math.max(labelW + tiles.width, textWidth(titleText, 1) + 2 * pad(s));
  const title = textStrip(titleText, width, s);
  const gridY = title.height + lineH;
  // NaN entries (heatMap draws them gray, a colour off the bar) are named under the bar.
  const V = h * w;
  const base = (image * annotators + annotator) * classes * classes * V;
  // A plain loop: TypedArray.some with a callback per entry took ~50 ns each (9 million for a 3x3 CM of 1024x1024).
  let hasNaN = false;
  for (let i = base, end = base + classes * classes * V; i < end && !hasNaN; i++) hasNaN = cms[i] !== cms[i];
  const bar = hasNaN ? stack([colorBar(tiles.width, s), legend([{ color: NAN_COLOR, text: 'NaN (no value)' }], tiles.width, s)]) : colorBar(tiles.width, s);
  const out = blank(width, gridY + tiles.height + bar.height);
  paste(out, title, 0, 0);
  headers.forEach((header, j) => {
    const text = numbered ? header : fitText(header, tileW, hs);
    drawText(out, labelW + j * (tileW + gap) + Math.max(0, Math.round((tileW - textWidth(text, hs)) / 2)), title.height + pad(s), text, INK, hs);
  });
  for (let i = 0; i < classes; i++) {
    drawText(out, pad(s), gridY + i * (tileH + gap) + Math.max(0, Math.round((tileH - textHeight(s)) / 2)), rowLabels[i], INK, s);
  }
  paste(out, tiles, labelW, gridY);
  paste(out, bar, labelW, gridY + tiles.height);
  return { ...out, gridX: labelW, gridY };
}
