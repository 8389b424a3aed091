// evaluateModel against the same figures computed here in one piece: its batches, its
// slices of the CMs and annotator probabilities, and its pairing of labels, presence
// flags and consensus with images must not change a number.
import t from 'tap';
import { argmaxAnnotatorProbs, argmaxClasses, createModel, evaluateSegmentation, type MeanStd } from '../src/index';
import { evaluateModel, evaluateVolumes, type AnnotatedVolume } from '../src/train/evaluate';
import type { SlidingWindowModel } from '../src/model/sliding-window';
import { hausdorff95 } from '../src/eval/surface-distance';
import type { AnnotatedSet } from '../src/train/data';

function rng(seed: number) {
  let s = seed >>> 0;
  return () => (s = (s * 1664525 + 1013904223) >>> 0) / 4294967296;
}

t.test('evaluateModel in batches equals the figures of the whole set at once', async (t) => {
  const rand = rng(7);
  const count = 7;
  const L = 3;
  const R = 2;
  const spatial = [8, 8];
  const V = 64;
  const images = Float32Array.from({ length: count * V }, () => rand() * 2 - 1);
  // Annotators agree with the consensus most of the time, each differently; 255 here and there.
  const consensus = Uint8Array.from({ length: count * V }, () => Math.floor(rand() * L));
  const labels = [0, 1].map(() => consensus.map((c) => (rand() < 0.1 ? 255 : rand() < 0.7 ? c : Math.floor(rand() * L))));
  const present = new Uint8Array(count * R).fill(1);
  present[3 * R + 1] = 0; // annotator 1 did not label image 3
  const set: AnnotatedSet = { count, channels: 1, classes: L, spatial, images, labels, present, consensus, annotatorNames: ['a', 'b'] };
  const model = createModel({ ndim: 2, inChannels: 1, classes: L, annotators: R, depth: 2, baseChannels: 4, seed: 3 });

  const summary = await evaluateModel(model, set, { batchSize: 3 });

  // The same predictions (batches of the same images: the model's numbers do not depend on
  // how evaluateModel slices them), scored in one call.
  const probs = new Float32Array(count * L * V);
  const cms = new Float32Array(count * R * L * L * V);
  const q = new Float32Array(count * R * L * V);
  for (let start = 0; start < count; start += 3) {
    const n = Math.min(3, count - start);
    const p = await model.predict(images.slice(start * V, (start + n) * V), [n, 1, ...spatial], { cms: true, annotatorProbs: true });
    probs.set(p.probs, start * L * V);
    cms.set(p.cms!, start * R * L * L * V);
    q.set(p.annotatorProbs!, start * R * L * V);
  }
  const report = evaluateSegmentation({
    pred: argmaxClasses(probs, count, L),
    truth: consensus,
    n: count,
    classes: L,
    cms,
    annotatorLabels: labels,
    present,
    annotatorPreds: argmaxAnnotatorProbs(q, count, R, L),
  });

  const same = (a: MeanStd | undefined, b: MeanStd | undefined, what: string) =>
    t.ok(a && b && Math.abs(a.mean - b.mean) < 1e-12 && Math.abs(a.std - b.std) < 1e-12, `${what}: ${a?.mean} vs ${b?.mean}`);
  t.equal(summary.images, count);
  summary.dicePerClass.forEach((d, k) => same(d, report.dicePerClass[k], `Dice of class ${k}`));
  same(summary.averageDice, report.averageDice, 'average Dice');
  same(summary.totalDice, report.totalDice, 'Total Dice');
  same(summary.cmError, report.cmError, 'CM error');
  summary.cmErrorPerAnnotator!.forEach((e, r) => same(e, report.cmErrorPerAnnotator![r], `CM error of annotator ${r}`));
  same(summary.ged, report.ged, 'GED');
  t.same(summary.reliability, report.reliability, 'reliability');
  t.same(summary.incompetence, report.incompetence, 'incompetence');
  t.same(summary.annotatorNames, ['a', 'b']);
  t.ok(summary.cmError!.mean > 0 && summary.averageDice.mean > 0, 'the figures are not trivially 0');
});

// A model whose outputs at a voxel depend on that voxel's first channel only: overlapping
// windows agree, so a volume's stitched outputs are these functions of its voxels.
function perVoxel(x: number, L: number, R: number) {
  const z = Array.from({ length: L }, (_, k) => Math.sin(3 * x + k) * 2);
  const m = Math.max(...z);
  const e = z.map((v) => Math.exp(v - m));
  const sum = e.reduce((a, b) => a + b, 0);
  const p = e.map((v) => v / sum);
  const A: number[][] = []; // per annotator, [i * L + j], columns sum to 1
  for (let r = 0; r < R; r++) {
    const a = Array.from({ length: L * L }, (_, k) => (Math.floor(k / L) === k % L ? 2 + Math.cos(x + r) : 0.5 + 0.4 * Math.sin(x * (k + 1) + r)));
    for (let j = 0; j < L; j++) {
      let col = 0;
      for (let i = 0; i < L; i++) col += a[i * L + j];
      for (let i = 0; i < L; i++) a[i * L + j] /= col;
    }
    A.push(a);
  }
  const q = A.map((a) => Array.from({ length: L }, (_, i) => p.reduce((s, pj, j) => s + a[i * L + j] * pj, 0)));
  return { p, A, q };
}

class PerVoxelModel implements SlidingWindowModel {
  constructor(readonly config: SlidingWindowModel['config']) {}
  async predict(images: Float32Array, shape: number[]) {
    const [n, C, ...s] = shape;
    const V = s.reduce((a, b) => a * b, 1);
    const { classes: L, annotators: R } = this.config;
    const probs = new Float32Array(n * L * V);
    const cms = new Float32Array(n * R * L * L * V);
    const q = new Float32Array(n * R * L * V);
    for (let b = 0; b < n; b++)
      for (let v = 0; v < V; v++) {
        const out = perVoxel(images[b * C * V + v], L, R);
        out.p.forEach((y, k) => (probs[(b * L + k) * V + v] = y));
        out.A.forEach((a, r) => a.forEach((y, k) => (cms[((b * R + r) * L * L + k) * V + v] = y)));
        out.q.forEach((qr, r) => qr.forEach((y, k) => (q[((b * R + r) * L + k) * V + v] = y)));
      }
    return { probs, cms, annotatorProbs: q };
  }
}

/** Dice of the voxels in `region` (both empty: 1), written out here. */
function regionDiceByHand(pred: Uint8Array, truth: Uint8Array, region: number[]): number {
  let both = 0;
  let p = 0;
  let y = 0;
  for (let v = 0; v < pred.length; v++) {
    const inP = region.includes(pred[v]);
    const inY = region.includes(truth[v]);
    both += Number(inP && inY);
    p += Number(inP);
    y += Number(inY);
  }
  return p + y === 0 ? 1 : (2 * both) / (p + y);
}

t.test('evaluateVolumes equals each volume scored on its own, BraTS regions included', async (t) => {
  const rand = rng(11);
  const L = 4;
  const R = 2;
  const model = new PerVoxelModel({ classes: L, annotators: R, inChannels: 2, ndim: 3, depth: 2 });
  const extents = [
    { d: 9, h: 10, w: 7 },
    { d: 6, h: 12, w: 11 },
    { d: 5, h: 5, w: 9 },
  ];
  const volumes: AnnotatedVolume[] = extents.map((extent, k) => {
    const V = extent.d * extent.h * extent.w;
    const consensus = Uint8Array.from({ length: V }, () => Math.floor(rand() * L));
    return {
      id: `case-${k}`,
      images: Float32Array.from({ length: 2 * V }, () => rand() * 2 - 1),
      extent,
      consensus,
      labels: [0, 1].map(() => consensus.map((c) => (rand() < 0.1 ? 255 : rand() < 0.6 ? c : Math.floor(rand() * L)))),
      present: Uint8Array.from([1, k === 1 ? 0 : 1]), // annotator 1 did not label case-1
      // case-2's voxels are 1 x 2 x 0.5 mm (NIfTI x, y, z): its HD95 in mm, axes in [d, h, w] = [z, y, x]
      ...(k === 2 ? { original: { spacing: [1, 2, 0.5] as const } } : {}),
    };
  });
  const ids = volumes.map((v) => v.id);
  const loaded: string[] = [];
  const summary = await evaluateVolumes(model, ids, async (id) => (loaded.push(id), volumes[ids.indexOf(id)]), {
    patch: [4, 8, 4],
    annotatorNames: ['a', 'b'],
    bratsRegions: true,
  });
  t.same(loaded, ids, 'each volume loaded once, in order');

  // Each volume's figures from its voxels' outputs, directly.
  const reports = [];
  const regions = { wholeTumour: [] as number[], tumourCore: [] as number[], enhancingTumour: [] as number[] };
  const hd95 = { wholeTumour: [] as number[], tumourCore: [] as number[], enhancingTumour: [] as number[] };
  for (const vol of volumes) {
    const V = vol.consensus.length;
    const full = await model.predict(vol.images, [1, 2, vol.extent.d, vol.extent.h, vol.extent.w]);
    const pred = argmaxClasses(full.probs, 1, L);
    reports.push(
      evaluateSegmentation({
        pred,
        truth: vol.consensus,
        n: 1,
        classes: L,
        cms: full.cms,
        annotatorLabels: vol.labels,
        present: vol.present,
        annotatorPreds: argmaxAnnotatorProbs(full.annotatorProbs, 1, R, L),
      }),
    );
    regions.wholeTumour.push(regionDiceByHand(pred, vol.consensus, [1, 2, 3]));
    regions.tumourCore.push(regionDiceByHand(pred, vol.consensus, [1, 3]));
    regions.enhancingTumour.push(regionDiceByHand(pred, vol.consensus, [3]));
    const dims = [vol.extent.d, vol.extent.h, vol.extent.w] as const;
    const spacing = vol.original ? ([vol.original.spacing[2], vol.original.spacing[1], vol.original.spacing[0]] as const) : ([1, 1, 1] as const);
    const mask = (m: Uint8Array, region: number[]) => m.map((c) => (region.includes(c) ? 1 : 0));
    hd95.wholeTumour.push(hausdorff95(mask(pred, [1, 2, 3]), mask(vol.consensus, [1, 2, 3]), dims, spacing));
    hd95.tumourCore.push(hausdorff95(mask(pred, [1, 3]), mask(vol.consensus, [1, 3]), dims, spacing));
    hd95.enhancingTumour.push(hausdorff95(mask(pred, [3]), mask(vol.consensus, [3]), dims, spacing));
    t.equal(V, pred.length);
  }
  const mean = (xs: number[]) => xs.reduce((a, b) => a + b, 0) / xs.length;
  const nanMean = (xs: number[]) => mean(xs.filter((x) => !Number.isNaN(x)));
  const near = (a: number, b: number, what: string, tol = 1e-6) => t.ok(Math.abs(a - b) < tol, `${what}: ${a} vs ${b}`);
  for (let k = 0; k < L; k++) near(summary.dicePerClass[k].mean, mean(reports.map((r) => r.perImage.dice[k])), `Dice of class ${k}`);
  near(summary.totalDice.mean, mean(reports.map((r) => r.perImage.totalDice[0])), 'Total Dice');
  near(summary.cmErrorPerAnnotator![1].mean, nanMean(reports.map((r) => r.perImage.cmError![1])), 'CM error of annotator 1 (absent from case-1)');
  t.equal(summary.cmErrorPerAnnotator![1].count, 2, 'annotator 1 scored on its two volumes');
  near(summary.ged!.mean, mean(reports.map((r) => r.perImage.ged![0])), 'GED');
  for (const name of ['wholeTumour', 'tumourCore', 'enhancingTumour'] as const) {
    near(summary.brats!.regions[name].mean, mean(regions[name]), `${name} Dice`);
    summary.perCase!.forEach((c, k) => near(c.regions![name], regions[name][k], `${name} of ${c.id}`));
    near(summary.brats!.hd95[name].mean, mean(hd95[name]), `${name} HD95 (mm)`);
    summary.perCase!.forEach((c, k) => near(c.hd95![name], hd95[name][k], `${name} HD95 of ${c.id}`, 1e-9));
  }
  t.ok(hd95.wholeTumour.every((x) => x > 0), 'random maps: every HD95 positive');
});
