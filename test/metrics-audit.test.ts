// An audit of the scores (src/eval/metrics.ts, surface-distance.ts, brats-regions.ts,
// src/train/evaluate.ts) where the other metric tests do not look, against hand-computed values.
import t, { type Test } from 'tap';
import { hausdorff95, surfaceDistances, surfaceOf, type Dims3 } from '../src/eval/surface-distance';
import { bratsDice, bratsHausdorff95 } from '../src/eval/brats-regions';
import { evaluateVolumes, type AnnotatedVolume } from '../src/train/evaluate';
import type { SlidingWindowModel } from '../src/model/sliding-window';
import { argmaxAnnotatorProbs, estimatedReliability, iouDistance, type IouMode, SegmentationEvaluator } from '../src/eval/metrics';

const near = (t: Test, got: number, want: number, what: string, tol = 1e-9) => t.ok(Math.abs(got - want) <= tol * Math.max(1, Math.abs(want)), `${what}: ${got} vs ${want}`);

t.test('HD95 masks are bytes: a Float32Array or Uint16Array mask is refused, not cut to bytes (NaN, or a wrong distance)', async (t) => {
  // [1, 4, 4] image. P = pixels (1,1), (1,2); Y = (1,1), (2,2). Every pixel of both is surface.
  // P -> Y: {0, 1}; Y -> P: {0, 1}: p95 = 0.95 by hand.
  const dims: Dims3 = [1, 4, 4];
  const p = new Uint8Array(16);
  p[5] = p[6] = 1;
  const y = new Uint8Array(16);
  y[5] = y[10] = 1;
  near(t, hausdorff95(p, y, dims), 0.95, 'bytes');
  // The same masks as probabilities 0.6: they were found by the bounding box but copied into
  // a byte box as 0, so P looked empty and HD95 came out NaN ("exactly one mask empty").
  const probs = Float32Array.from(p, (x) => 0.6 * x);
  t.throws(() => hausdorff95(probs as unknown as Uint8Array, y, dims), { name: 'TypeError', message: /hausdorff95: pred is Float32Array.*Uint8Array/ });
  // A Uint16Array 256 became 0 in the byte box: HD95 1 instead of 0.95.
  const wide = Uint16Array.from(p, (x, i) => (i === 5 ? 256 : x));
  t.throws(() => hausdorff95(wide as unknown as Uint8Array, y, dims), { name: 'TypeError', message: /pred is Uint16Array/ });
  t.throws(() => hausdorff95(p, Array.from(y) as unknown as Uint8Array, dims), { name: 'TypeError', message: /truth is a plain array/ });
  t.throws(() => surfaceDistances(p, probs as unknown as Uint8Array, dims), { name: 'TypeError', message: /surfaceDistances: to is Float32Array/ });
  t.throws(() => surfaceOf(probs as unknown as Uint8Array, dims), { name: 'TypeError', message: /surfaceOf: mask is Float32Array/ });
});

t.test('HD95 takes spacing and dims as typed arrays too (NIfTI pixdim is a Float32Array), not refused with a message that shows good values', async (t) => {
  // Two voxels of a [3, 1, 4] volume: (0, 0, 0) and (2, 0, 3); 2 x 1 x 0.5 mm voxels.
  const dims: Dims3 = [3, 1, 4];
  const p = new Uint8Array(12);
  p[0] = 1;
  const y = new Uint8Array(12);
  y[2 * 4 + 3] = 1;
  const want = Math.hypot(2 * 2, 3 * 0.5);
  near(t, hausdorff95(p, y, dims, [2, 1, 0.5]), want, 'array spacing');
  near(t, hausdorff95(p, y, dims, Float32Array.from([2, 1, 0.5]) as unknown as [number, number, number]), want, 'Float32Array spacing');
  near(t, hausdorff95(p, y, Int32Array.from(dims) as unknown as Dims3, [2, 1, 0.5]), want, 'Int32Array dims');
  // A bad typed spacing still says which value is bad.
  t.throws(() => hausdorff95(p, y, dims, Float64Array.from([2, 0, 0.5]) as unknown as [number, number, number]), /voxel spacing 2, 0, 0.5 must be finite and > 0/);
});

t.test('a volume whose reference labels no voxel (all 255) has no HD95 (NaN, left out), as it has no Dice, not a perfect 0', async (t) => {
  const dims: Dims3 = [2, 3, 3];
  const truth = new Uint8Array(18).fill(255);
  const pred = new Uint8Array(18); // no tumour predicted either
  const dice = bratsDice(pred, truth, 1);
  t.ok(Number.isNaN(dice.perImage.wholeTumour[0]), 'Dice: NaN (README: left out of every per-image figure)');
  const hd = bratsHausdorff95(pred, truth, dims);
  for (const region of ['wholeTumour', 'tumourCore', 'enhancingTumour'] as const) t.ok(Number.isNaN(hd[region]), `${region} HD95 NaN, got ${hd[region]}`);
  // One labelled background voxel is a reference: both maps without a region agree there (0).
  truth[0] = 0;
  t.same(bratsHausdorff95(pred, truth, dims), { wholeTumour: 0, tumourCore: 0, enhancingTumour: 0 });
});

t.test('bratsDice on a raw 2018-2021 map (enhancing tumour 4) says how to map it, as bratsHausdorff95 does', async (t) => {
  const raw = Uint8Array.from([0, 1, 2, 4]);
  const pred = Uint8Array.from([0, 1, 2, 3]);
  t.throws(() => bratsDice(pred, raw, 1), { name: 'RangeError', message: /^truth: label 4 at index 3 >= classes \(4\): BraTS maps must be in contiguous labels 0\.\.3 \(mapBratsLabels maps BraTS 4 to 3\)$/ });
  t.throws(() => bratsDice(raw, pred, 1), /^pred: label 4 at index 3 >= classes \(4\): .*mapBratsLabels/);
  t.throws(() => bratsHausdorff95(pred, raw, [1, 2, 2]), /mapBratsLabels maps BraTS 4 to 3/);
  // Other errors pass unchanged.
  t.throws(() => bratsDice(pred, raw, 3), /^truth has 4 elements, not a positive multiple of n = 3 images$/);
});

t.test('argmaxAnnotatorProbs and estimatedReliability name a bad annotator count (it returned [] for -1, or crashed with "Invalid array length")', async (t) => {
  for (const R of [1.5, -1, 0, NaN]) {
    t.throws(() => argmaxAnnotatorProbs(new Float32Array(12), 2, R, 2), { name: 'RangeError', message: new RegExp(`^annotators = ${R} must be a positive integer`) }, `argmax R = ${R}`);
    t.throws(() => estimatedReliability(new Float32Array(12), 1, R, 2), { name: 'RangeError', message: new RegExp(`^annotators = ${R} must be a positive integer`) }, `reliability R = ${R}`);
  }
  // A good count still works: q of 2 annotators, 1 image, 2 classes, 3 voxels; A's diagonals.
  const q = Float32Array.from([0.9, 0.2, 0.5, 0.1, 0.8, 0.5, /* r1 */ 0.3, 0.6, 0.7, 0.7, 0.4, 0.3]);
  t.same(argmaxAnnotatorProbs(q, 1, 2, 2).map((m) => [...m]), [[0, 1, 0], [1, 0, 0]], 'ties to the lower class');
  const cms = new Float32Array(1 * 2 * 4 * 1); // [N, R, L, L, V=1]
  cms.set([0.8, 0.2, 0.2, 0.6], 0);
  cms.set([0.5, 0.5, 0.5, 0.5], 4);
  const rel = estimatedReliability(cms, 1, 2, 2);
  near(t, rel[0], 0.7, 'trace/L annotator 0', 1e-6);
  near(t, rel[1], 0.5, 'trace/L annotator 1');
});

t.test("iouDistance refuses a mode it does not know (a misspelt 'Foreground' was scored per class), as GED does", async (t) => {
  // Classes 1 and 2 swapped: per class, no overlap (d = 1); as foreground, identical (d = 0).
  const a = Uint8Array.from([0, 1, 2]);
  const b = Uint8Array.from([0, 2, 1]);
  t.equal(iouDistance(a, b, 3, 'per-class'), 1);
  t.equal(iouDistance(a, b, 3, 'foreground'), 0);
  t.throws(() => iouDistance(a, b, 3, 'Foreground' as IouMode), { name: 'RangeError', message: /mode 'Foreground' is not 'per-class' or 'foreground'/ });
  t.throws(() => new SegmentationEvaluator(3, { gedMode: 'fg' as IouMode }), /mode 'fg' is not 'per-class' or 'foreground'/);
});

t.test('evaluateVolumes: a volume whose reference is all 255 is left out of the HD95 means, as of the Dice means', async (t) => {
  // A model that predicts background everywhere; no annotators scored.
  const model: SlidingWindowModel = {
    config: { classes: 4, annotators: 1, inChannels: 1, ndim: 3, depth: 1 },
    predict: async (_images, shape) => {
      const V = shape.slice(2).reduce((a, b) => a * b, 1);
      const probs = new Float32Array(shape[0] * 4 * V);
      for (let n = 0; n < shape[0]; n++) probs.fill(1, n * 4 * V, n * 4 * V + V);
      return { probs };
    },
  };
  const extent = { d: 2, h: 3, w: 3 };
  const volumes: Record<string, AnnotatedVolume> = {
    unlabelled: { id: 'unlabelled', images: new Float32Array(18), extent, consensus: new Uint8Array(18).fill(255), labels: [], present: new Uint8Array(0) },
    healthy: { id: 'healthy', images: new Float32Array(18), extent, consensus: new Uint8Array(18), labels: [], present: new Uint8Array(0) },
  };
  const summary = await evaluateVolumes(model, ['unlabelled', 'healthy'], async (id) => volumes[id], { patch: [2, 3, 3], annotators: false, annotatorNames: [], bratsRegions: true });
  const [unlabelled, healthy] = summary.perCase!;
  t.ok(Number.isNaN(unlabelled.regions!.wholeTumour), 'no Dice for the unlabelled volume');
  t.ok(Number.isNaN(unlabelled.hd95!.wholeTumour), `no HD95 for it either (got ${unlabelled.hd95!.wholeTumour})`);
  t.equal(healthy.hd95!.wholeTumour, 0, 'no tumour in either map: 0');
  t.same(summary.brats!.regions.wholeTumour, { mean: 1, std: 0, count: 1 }, 'Dice: one volume counted');
  t.same(summary.brats!.hd95.wholeTumour, { mean: 0, std: 0, count: 1 }, 'HD95: the same one volume counted');
});
