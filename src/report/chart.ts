// Line charts as RGB pictures (src/data/png.ts), for training curves: a framed plot area
// with "nice" ticks on both axes, a title, axis names and a legend, drawn with the 5x7
// font of src/report/font.ts. No plotting library: a run folder gets its picture from
// the package alone.

import type { PngImage } from '../data/png';
import { drawText, fitText, textHeight, textWidth } from './font';
import { blank } from './pictures';

export type Rgb = readonly [number, number, number];

export interface Series {
  name: string;
  color: Rgb;
  /** [x, y] in data units; non-finite points break the line. */
  points: readonly (readonly [number, number])[];
  /** Line width in pixels (default 2); 1 suits a noisy series drawn under its average. */
  width?: number;
  /** Left out of the legend (e.g. the raw points under a smoothed line). */
  hideInLegend?: boolean;
  /** A square of this many pixels at each point (for series of few points, e.g. one per validation). */
  marker?: number;
}

export interface ChartOptions {
  width: number;
  height: number;
  title: string;
  xLabel: string;
  /** Fixed y range; default: the data's, widened to nice ticks. */
  yRange?: readonly [number, number];
}

const INK: Rgb = [0, 0, 0];
const GRID: Rgb = [225, 225, 225];
const TEXT_SCALE = 2;

/**
 * Tick values covering [lo, hi] with about `count` steps of 1, 2 or 5 times a power of ten
 * (the first at or below lo, the last at or above hi). A zero-width range is widened.
 */
export function niceTicks(lo: number, hi: number, count = 5): number[] {
  if (!Number.isFinite(lo) || !Number.isFinite(hi)) throw new RangeError(`niceTicks needs a finite range, got ${lo}..${hi}`);
  if (hi < lo) [lo, hi] = [hi, lo];
  // A range within rounding of one value (a flat loss averaged: 0.1 and 0.10000000000000002)
  // is one value: steps of an ulp would never reach hi, as k * step stops changing.
  if (hi - lo <= Math.max(Math.abs(lo), Math.abs(hi)) * 1e-9) {
    // Halves, and the padded ends kept finite: values near Number.MAX_VALUE overflowed to Infinity.
    const mid = lo / 2 + hi / 2;
    const pad = mid === 0 ? 1 : Math.abs(mid) * 0.1;
    [lo, hi] = [Math.max(mid - pad, -Number.MAX_VALUE), Math.min(mid + pad, Number.MAX_VALUE)];
  }
  // hi / n - lo / n, not (hi - lo) / n: the difference of -1e308 and 1e308 is Infinity (NaN ticks).
  const n = Math.max(1, count);
  const raw = hi / n - lo / n;
  // Subnormal ranges (5e-324..1e-323) underflow to a step of 0: their ends are the ticks.
  if (!(raw > 0) || !Number.isFinite(10 ** Math.floor(Math.log10(raw)))) return [lo, hi];
  const power = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * power).find((s) => s >= raw * 0.999) ?? 10 * power;
  // Ticks as whole multiples of the step, printed to its decimals (no 0.1 + 0.2 residue). Steps
  // under 1e-20 are rounded to 12 significant digits instead: toFixed takes at most 100 digits
  // and threw (a chart of values around 1e-101 failed with "toFixed() digits argument").
  const decimals = Math.max(0, -Math.floor(Math.log10(step) + 1e-9));
  const tick = (k: number) => (decimals <= 20 ? Number((k * step).toFixed(decimals)) : Number((k * step).toPrecision(12))) + 0; // + 0: no -0
  const ticks: number[] = [];
  for (let k = Math.floor(lo / step + 1e-9); ; k++) {
    const v = tick(k);
    // A multiple of the step past Number.MAX_VALUE is Infinity: the range ends at hi instead.
    if (!Number.isFinite(v)) {
      ticks.push(hi);
      break;
    }
    ticks.push(v);
    if (k * step >= hi - step * 1e-9) break;
  }
  return ticks;
}

/** A tick's label: no trailing zeros, k/M for large whole numbers, a power of ten from 1e9 (1e30, not "1e+24M"). */
export function tickLabel(v: number): string {
  if (Math.abs(v) >= 1e9) return v.toExponential(2).replace(/\.?0+e/, 'e').replace('e+', 'e');
  if (Math.abs(v) >= 1e6 && Number.isInteger(v / 1e5)) return `${Number((v / 1e6).toPrecision(3))}M`;
  if (Math.abs(v) >= 1e4 && Number.isInteger(v / 100)) return `${Number((v / 1e3).toPrecision(3))}k`;
  return String(Number(v.toPrecision(4)));
}

/** The least and greatest finite value (undefined for none), by a loop that takes any number of values. */
function extent(values: readonly number[]): [number | undefined, number | undefined] {
  let lo: number | undefined;
  let hi: number | undefined;
  for (const v of values) {
    if (!Number.isFinite(v)) continue;
    if (lo === undefined || v < lo) lo = v;
    if (hi === undefined || v > hi) hi = v;
  }
  return [lo, hi];
}

function setPixel(image: PngImage, x: number, y: number, color: Rgb): void {
  if (x >= 0 && y >= 0 && x < image.width && y < image.height) image.data.set(color, (y * image.width + x) * 3);
}

/** A line from (x0, y0) to (x1, y1), `width` pixels thick, clipped to `clip` (x, y, w, h). */
export function drawLine(image: PngImage, x0: number, y0: number, x1: number, y1: number, color: Rgb, width = 1, clip?: readonly [number, number, number, number]): void {
  const steps = Math.max(Math.abs(x1 - x0), Math.abs(y1 - y0), 1);
  const [cx, cy, cw, ch] = clip ?? [0, 0, image.width, image.height];
  const lo = -Math.floor((width - 1) / 2);
  for (let k = 0; k <= steps; k++) {
    const x = Math.round(x0 + ((x1 - x0) * k) / steps);
    const y = Math.round(y0 + ((y1 - y0) * k) / steps);
    for (let dy = lo; dy < lo + width; dy++) {
      for (let dx = lo; dx < lo + width; dx++) {
        const px = x + dx;
        const py = y + dy;
        if (px >= cx && py >= cy && px < cx + cw && py < cy + ch) setPixel(image, px, py, color);
      }
    }
  }
}

/** Where a chart put its plot area and how it maps data to pixels (for tests and overlays). */
export interface ChartLayout {
  plot: { x: number; y: number; width: number; height: number };
  xRange: [number, number];
  yRange: [number, number];
  /** Pixel column of data x, pixel row of data y. */
  toPixel(x: number, y: number): [number, number];
}

/** The series as a line chart on white: title on top, legend under it, y ticks left, x ticks and name under the plot. */
export function lineChart(series: readonly Series[], options: ChartOptions): PngImage & { layout: ChartLayout } {
  const { width, height } = options;
  const s = TEXT_SCALE;
  const lineH = textHeight(s) + 4 * s;
  const image = blank(width, height);
  // The x axis spans every point with an x, NaN y included (a diverged run's steps still show
  // how far it went); the y axis the finite points. Loops, not Math.min(...xs): a long run's
  // points overflow the call stack as arguments.
  const points = series.flatMap((se) => se.points);
  const [xLo, xHi] = extent(points.map(([x]) => x));
  const [yLo, yHi] = extent(points.filter(([x]) => Number.isFinite(x)).map(([, y]) => y));
  const xTicks = niceTicks(xLo ?? 0, xHi ?? 1);
  const yTicks = options.yRange ? niceTicks(options.yRange[0], options.yRange[1]) : niceTicks(yLo ?? 0, yHi ?? 1);
  // The x axis ends at the last point (a run's last step), not at the next round tick; a
  // single x (a one-step log) keeps the ticks around it, so that its point is not on the frame.
  const xRange: [number, number] = [xTicks[0], xHi !== undefined && xHi > xLo! ? xHi : xTicks[xTicks.length - 1]];
  const yRange: [number, number] = options.yRange ? [options.yRange[0], options.yRange[1]] : [yTicks[0], yTicks[yTicks.length - 1]];

  // Title, then the legend's entries on as many lines as they need.
  drawText(image, 2 * s, 2 * s, fitText(options.title, width - 4 * s, s), INK, s);
  const legendItems = series.filter((se) => !se.hideInLegend);
  let lx = 2 * s;
  let ly = lineH;
  for (const item of legendItems) {
    const w = 4 * textHeight(s) + 2 * s + textWidth(item.name, s) + 6 * s;
    if (lx > 2 * s && lx + w > width) {
      lx = 2 * s;
      ly += lineH;
    }
    const mid = ly + Math.floor(textHeight(s) / 2);
    drawLine(image, lx, mid, lx + 4 * textHeight(s) - 1, mid, item.color, 3);
    drawText(image, lx + 4 * textHeight(s) + 2 * s, ly, fitText(item.name, width - lx - 4 * textHeight(s) - 4 * s, s), INK, s);
    lx += w;
  }
  const top = ly + (legendItems.length ? lineH : 0) + 2 * s;
  const left = Math.max(...yTicks.map((v) => textWidth(tickLabel(v), s))) + 6 * s;
  const bottom = 2 * lineH + 2 * s;
  const right = textWidth(tickLabel(xTicks[xTicks.length - 1]), s) / 2 + 4 * s;
  const plot = { x: left, y: top, width: Math.max(10, width - left - right), height: Math.max(10, height - top - bottom) };
  const toPixel = (x: number, y: number): [number, number] => [
    plot.x + ((x - xRange[0]) / (xRange[1] - xRange[0])) * (plot.width - 1),
    plot.y + plot.height - 1 - ((y - yRange[0]) / (yRange[1] - yRange[0])) * (plot.height - 1),
  ];

  // Grid lines and ticks, then the frame.
  for (const v of yTicks) {
    if (v < yRange[0] || v > yRange[1]) continue;
    const [, py] = toPixel(xRange[0], v);
    drawLine(image, plot.x, Math.round(py), plot.x + plot.width - 1, Math.round(py), GRID);
    const label = tickLabel(v);
    drawText(image, plot.x - 3 * s - textWidth(label, s), Math.round(py) - Math.floor(textHeight(s) / 2), label, INK, s);
  }
  for (const v of xTicks) {
    if (v > xRange[1]) continue;
    const [px] = toPixel(v, yRange[0]);
    drawLine(image, Math.round(px), plot.y, Math.round(px), plot.y + plot.height - 1, GRID);
    const label = tickLabel(v);
    drawText(image, Math.round(px - textWidth(label, s) / 2), plot.y + plot.height + 2 * s, label, INK, s);
  }
  drawText(image, Math.round(plot.x + (plot.width - textWidth(options.xLabel, s)) / 2), plot.y + plot.height + lineH + s, options.xLabel, INK, s);
  const frame: [number, number][] = [[plot.x, plot.y], [plot.x + plot.width - 1, plot.y], [plot.x + plot.width - 1, plot.y + plot.height - 1], [plot.x, plot.y + plot.height - 1]];
  frame.forEach(([x0, y0], k) => drawLine(image, x0, y0, frame[(k + 1) % 4][0], frame[(k + 1) % 4][1], INK));

  // The series, in order (later ones on top), clipped to the plot area.
  const clip: [number, number, number, number] = [plot.x, plot.y, plot.width, plot.height];
  const finite = (p?: readonly [number, number]) => p !== undefined && Number.isFinite(p[0]) && Number.isFinite(p[1]);
  for (const se of series) {
    let previous: [number, number] | undefined;
    se.points.forEach((point, k) => {
      if (!finite(point)) {
        previous = undefined;
        return;
      }
      const width = se.width ?? 2;
      const p = toPixel(point[0], point[1]).map(Math.round) as [number, number];
      if (previous) drawLine(image, previous[0], previous[1], p[0], p[1], se.color, width, clip);
      else drawLine(image, p[0], p[1], p[0], p[1], se.color, width, clip);
      // A point with no line to either neighbour (a one-step log, a step between NaNs) gets a square to be seen.
      const lone = !finite(se.points[k - 1]) && !finite(se.points[k + 1]);
      const marker = se.marker ?? (lone ? Math.max(5, 2 * width + 1) : 0);
      if (marker) drawLine(image, p[0], p[1], p[0], p[1], se.color, marker, clip);
      previous = p;
    });
  }
  return { ...image, layout: { plot, xRange, yRange, toPixel } };
}
