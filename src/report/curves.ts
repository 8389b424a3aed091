// A run's training curves (<run>/curves.png) from its train-log.jsonl: the loss and its
// cross-entropy per step (raw, and a moving average that shows the trend through the
// batch-to-batch noise), and the validation score and CM error per validation.

import type { PngImage } from '../data/png';
import { lineChart, type Rgb, type Series } from './chart';
import { stack } from './pictures';

const BLUE: Rgb = [0, 114, 178];
const LIGHT_BLUE: Rgb = [178, 210, 235];
const ORANGE: Rgb = [213, 94, 0];
const GREEN: Rgb = [0, 158, 115];
const PURPLE: Rgb = [204, 121, 167];

/**
 * The mean of each point's window of `window` points ending at it (shorter at the start),
 * over the window's finite values: a NaN loss (a diverged step, written as null) leaves a
 * gap where no finite value is in reach instead of blanking the rest of the curve.
 */
export function movingAverage(values: readonly number[], window: number): number[] {
  if (!Number.isInteger(window) || window < 1) throw new RangeError(`moving average window ${window} must be an integer >= 1`);
  const out: number[] = [];
  let sum = 0;
  let count = 0;
  for (let i = 0; i < values.length; i++) {
    if (Number.isFinite(values[i])) {
      sum += values[i];
      count++;
    }
    if (i >= window && Number.isFinite(values[i - window])) {
      sum -= values[i - window];
      count--;
    }
    out.push(count > 0 ? sum / count : NaN);
  }
  return out;
}

/** Entries of `event` kind, one per step: a resumed run repeats the steps after its last checkpoint, the later entry counts. */
function byStep(events: readonly Record<string, unknown>[], event: string): Record<string, unknown>[] {
  // The usual log (a resume drops the entries past its checkpoint) has each step once, in order:
  // taken as it is, without a map of a long run's 250,000 steps.
  const kept = events.filter((e) => e.event === event && typeof e.step === 'number');
  if (kept.every((e, i) => i === 0 || (e.step as number) > (kept[i - 1].step as number))) return kept;
  const last = new Map<number, Record<string, unknown>>();
  for (const e of events) if (e.event === event && typeof e.step === 'number') last.set(e.step, e);
  return [...last.entries()].sort((a, b) => a[0] - b[0]).map(([, e]) => e);
}

const num = (x: unknown) => (typeof x === 'number' ? x : NaN);
/**
 * The sum over annotators of a step's CE: NaN for a null entry (JSON's NaN) and for none at
 * all (the naive methods log `ce: []`), never a 0 that would draw as a perfect loss.
 */
const sum = (x: unknown) => (Array.isArray(x) ? (x.length ? x.reduce((a: number, b) => a + num(b), 0) : NaN) : num(x));

/**
 * What trainingCurves reads of a log entry, the rest left out: a step's CE as its sum over
 * annotators, a validation's score and CM error. A long run's log is read entry by entry
 * into these (`cmseg curves`), not kept whole.
 */
export function drawnPart(e: Record<string, unknown>): Record<string, unknown> {
  if (e.event === 'step') return { event: e.event, step: e.step, loss: e.loss, ce: sum(e.ce) };
  if (e.event === 'validation') return { event: e.event, step: e.step, score: e.score, cmError: e.cmError };
  return { event: e.event, step: e.step };
}

/**
 * The points (x[i], y[i]) in order, or, when there are more than 4 * buckets, for each of
 * `buckets` runs of consecutive points its first and last point and those of least and
 * greatest finite y, in their order: the line through them covers what the line through every
 * point covers, at the picture's resolution. A run with no finite y keeps its (NaN) ends: a gap.
 */
export function envelope(x: readonly number[], y: readonly number[], buckets: number): (readonly [number, number])[] {
  const n = Math.min(x.length, y.length);
  if (n <= 4 * buckets) return Array.from({ length: n }, (_, i) => [x[i], y[i]] as const);
  const out: (readonly [number, number])[] = [];
  for (let b = 0; b < buckets; b++) {
    const from = Math.floor((b * n) / buckets);
    const to = Math.floor(((b + 1) * n) / buckets);
    let lo = -1;
    let hi = -1;
    for (let i = from; i < to; i++) {
      if (!Number.isFinite(y[i])) continue;
      if (lo < 0 || y[i] < y[lo]) lo = i;
      if (hi < 0 || y[i] > y[hi]) hi = i;
    }
    // The run's first and last points too: the line goes on from run to run, and the chart's
    // x axis still spans the first step to the last (it ends at the last point's x).
    const kept = [...new Set([from, lo, hi, to - 1])].filter((i) => i >= 0).sort((a, b) => a - b);
    for (const i of kept) out.push([x[i], y[i]]);
  }
  return out;
}

/**
 * The loss panel's y range when the first steps' loss would squash the rest of a long run
 * against the bottom (a loss of 3 at the start, 0.1-0.3 for the remaining 249,000 steps: the
 * curve a few pixels high): up to a little above the highest smoothed value after the first 5%
 * of the steps (and two smoothing windows, which carry the start along), the earlier steps
 * drawn cut at the top; undefined when nothing needs cutting (short runs, or a loss that does
 * not fall by half).
 */
export function lossPanelRange(raw: readonly number[], smoothed: readonly (readonly number[])[], window = 1): { range: [number, number]; highest: number } | undefined {
  const n = raw.length;
  if (n < 200) return undefined;
  const skip = Math.max(Math.ceil(0.05 * n), 2 * window);
  let hi = -Infinity;
  let lo = Infinity;
  for (const s of smoothed)
    for (let i = 0; i < s.length; i++) {
      if (!Number.isFinite(s[i])) continue;
      if (i >= skip) hi = Math.max(hi, s[i]);
      lo = Math.min(lo, s[i]);
    }
  let highest = -Infinity;
  for (const v of raw) {
    if (!Number.isFinite(v)) continue;
    highest = Math.max(highest, v);
    lo = Math.min(lo, v);
  }
  if (!Number.isFinite(hi) || !(highest > 2 * hi)) return undefined;
  // Room above the smoothed curve for the per-step band's usual spread.
  return { range: [Math.min(lo, 0), hi * 1.25], highest };
}

export interface CurvesOptions {
  /** Picture width in pixels (default 900); each panel is 0.45 of it high. */
  width?: number;
  /** What the title calls the run (e.g. its folder). */
  title?: string;
}

/** The curves of a run's log entries; throws when the log has no training step. */
export function trainingCurves(events: readonly Record<string, unknown>[], options: CurvesOptions = {}): PngImage {
  const width = options.width ?? 900;
  const height = Math.round(width * 0.45);
  const steps = byStep(events, 'step');
  if (steps.length === 0) throw new RangeError('the training log has no step entries to draw');
  const x = steps.map((e) => e.step as number);
  const loss = steps.map((e) => num(e.loss));
  const ce = steps.map((e) => sum(e.ce));
  const window = Math.max(1, Math.round(steps.length / 50));
  // A long run has many more steps than the picture has pixel columns (250,000 steps, 900
  // columns): each series is drawn as its least and greatest value in each of 2 * width runs of
  // steps, which draws the same band. All points were drawn, 250,000 [x, y] pairs a series,
  // copied again by the chart: 150 MB of heap and 2 s for a BraTS-length log.
  const zip = (ys: readonly number[]) => envelope(x, ys, 2 * width);
  const name = options.title ? `${options.title}: ` : '';
  const lossSeries: Series[] = [
    { name: 'loss per step', color: LIGHT_BLUE, points: zip(loss), width: 1, hideInLegend: true },
    { name: window > 1 ? `loss (mean of ${window} steps)` : 'loss', color: BLUE, points: zip(movingAverage(loss, window)) },
  ];
  // Methods without annotator CEs (naive, oracle) log none: no line for them.
  if (ce.some(Number.isFinite)) {
    lossSeries.push({ name: window > 1 ? `cross-entropy, sum over annotators (mean of ${window})` : 'cross-entropy, sum over annotators', color: ORANGE, points: zip(movingAverage(ce, window)) });
  }
  const cut = lossPanelRange(loss, [movingAverage(loss, window), ...(ce.some(Number.isFinite) ? [movingAverage(ce, window)] : [])], window);
  const title = cut ? `${name}training loss (cut at ${cut.range[1].toPrecision(2)}: the first steps reach ${cut.highest.toPrecision(2)})` : `${name}training loss`;
  const panels: PngImage[] = [lineChart(lossSeries, { width, height, title, xLabel: 'step', ...(cut ? { yRange: cut.range } : {}) })];

  const validations = byStep(events, 'validation');
  if (validations.length > 0) {
    const vx = validations.map((e) => e.step as number);
    const points = (key: string) => validations.map((e, i) => [vx[i], num(e[key])] as const);
    const series: Series[] = [{ name: 'validation score (Dice)', color: GREEN, points: points('score'), marker: 7 }];
    if (validations.some((e) => typeof e.cmError === 'number')) series.push({ name: 'CM estimation error', color: PURPLE, points: points('cmError'), marker: 7 });
    panels.push(lineChart(series, { width, height, title: `${name}validation`, xLabel: 'step', yRange: [0, 1] }));
  }
  return stack(panels, 8);
}
