// SPEC section 6 metrics on hand-computed cases: Dice, Total Dice, IoU distance, GED,
// CM estimation error, incompetence, reliability, BraTS regions, the one-call evaluator.
// Tolerance: 1e-9 for arithmetic on counts, 1e-6 where Float32 CMs enter.
import t from 'tap';
import { trueConfusionMatrix } from '../src/data/annotators';
import {
  argmaxAnnotatorProbs,
  cmEstimationError,
  dicePerClass,
  diceSummary,
  estimatedReliability,
  evaluateSegmentation,
  fusedLabelDice,
  generalisedEnergyDistance,
  imageConfusionMatrices,
  iouDistance,
  meanStd,
  regionDice,
  SegmentationEvaluator,
  totalDice,
} from '../src/eval/metrics';
import { bratsDice } from '../src/eval/brats-regions';
import { classesLearntAsOthers, formatAnnotatorCms, formatBratsReport, formatClassConfusion, formatMeanStd, formatSegmentationReport } from '../src/eval/report';
import { unpadded } from './helpers/tables';
import { missingPythonModules, runPythonJson } from './helpers/python';

const u8 = (...values: number[]) => Uint8Array.from(values);
const close = (t: { ok(condition: boolean, message: string): unknown }, actual: number, expected: number, message: string, tol = 1e-9) =>
  t.ok(Math.abs(actual - expected) <= tol, `${message}: ${actual} vs ${expected}`);

/** CMs [N, R, L, L, V] with every voxel of image n, annotator r set to matrix(n, r) (row-major [L*L]). */
function constantCms(n: number, R: number, L: number, V: number, matrix: (img: number, r: number) => ArrayLike<number>): Float32Array {
  const cms = new Float32Array(n * R * L * L * V);
  for (let img = 0; img < n; img++)
    for (let r = 0; r < R; r++) {
      const m = matrix(img, r);
      for (let k = 0; k < L * L; k++) cms.fill(m[k], ((img * R + r) * L * L + k) * V, ((img * R + r) * L * L + k + 1) * V);
    }
  return cms;
}

t.test('meanStd is the population std over finite values', async (t) => {
  const s = meanStd([1, 2, 3, 4]);
  // mean 2.5; squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5, / 4 = 1.25
  close(t, s.mean, 2.5, 'mean');
  close(t, s.std, Math.sqrt(1.25), 'std');
  t.equal(s.count, 4);
  t.same(meanStd([NaN, 3]), { mean: 3, std: 0, count: 1 }, 'NaN skipped');
  t.equal(meanStd([]).count, 0);
  t.ok(Number.isNaN(meanStd([]).mean));
});

t.test('Dice per class, Average and Total Dice by hand', async (t) => {
  // Image 0, L = 3:  pred  0 1 1 2 2 0
  //                  truth 0 1 2 2 0 0
  //   class 0: P = {0,5}, Y = {0,4,5}, |P&Y| = 2 -> 2*2/(2+3) = 0.8
  //   class 1: P = {1,2}, Y = {1},     |P&Y| = 1 -> 2*1/(2+1) = 2/3
  //   class 2: P = {3,4}, Y = {2,3},   |P&Y| = 1 -> 2*1/(2+2) = 0.5
  //   Average (classes 1, 2) = (2/3 + 0.5) / 2 = 7/12; Total = 4 correct / 6 = 2/3
  // Image 1:         pred  0 0 1 1 0 0
  //                  truth 0 0 1 0 0 0
  //   class 0: P = 4, Y = 5, |P&Y| = 4 -> 8/9; class 1: 2/(2+1) = 2/3; class 2: both empty -> 1
  //   Average = (2/3 + 1) / 2 = 5/6; Total = 5/6
  const pred = u8(0, 1, 1, 2, 2, 0, 0, 0, 1, 1, 0, 0);
  const truth = u8(0, 1, 2, 2, 0, 0, 0, 0, 1, 0, 0, 0);
  const dice = dicePerClass(pred, truth, 2, 3);
  const expected = [0.8, 2 / 3, 0.5, 8 / 9, 2 / 3, 1];
  expected.forEach((e, i) => close(t, dice[i], e, `dice[${i}]`));
  const total = totalDice(pred, truth, 2, 3);
  close(t, total[0], 2 / 3, 'total dice image 0');
  close(t, total[1], 5 / 6, 'total dice image 1');
  const s = diceSummary(pred, truth, 2, 3);
  close(t, s.perClass[1].mean, 2 / 3, 'class 1 mean');
  close(t, s.perClass[1].std, 0, 'class 1 std');
  // class 2 over images: 0.5 and 1 -> mean 0.75, population std 0.25
  close(t, s.perClass[2].mean, 0.75, 'class 2 mean');
  close(t, s.perClass[2].std, 0.25, 'class 2 std');
  close(t, s.average.mean, (7 / 12 + 5 / 6) / 2, 'average dice');
  close(t, s.total.mean, (2 / 3 + 5 / 6) / 2, 'total dice');
});

t.test('binary Dice reports the foreground; 255 in the truth is not scored', async (t) => {
  // pred 1 1 0 0, truth 1 255 0 1: voxel 1 ignored.
  // foreground: P = {0}, Y = {0, 3} -> 2*1/(1+2) = 2/3; Total: correct {0, 2} of 3 -> 2/3
  const s = diceSummary(u8(1, 1, 0, 0), u8(1, 255, 0, 1), 1, 2);
  close(t, s.average.mean, 2 / 3, 'average = foreground Dice');
  close(t, s.perClass[1].mean, 2 / 3, 'foreground Dice');
  close(t, s.total.mean, 2 / 3, 'Total Dice');
  t.throws(() => dicePerClass(u8(0, 2), u8(0, 1), 1, 2), /pred: label 2 at index 1 >= classes \(2\)/);
  t.throws(() => dicePerClass(u8(0, 1), u8(0, 7), 1, 2), /truth: label 7 at index 1/);
  t.throws(() => dicePerClass(u8(0, 1, 0), u8(0, 1), 1, 2), /pred has 3 elements/);
});

t.test('fusedLabelDice: a fused map scored like a prediction, 255 = no vote = miss', async (t) => {
  const same = fusedLabelDice(u8(1, 1, 0, 0), u8(1, 0, 0, 0), 1, 2);
  t.same(same.perImage, diceSummary(u8(1, 1, 0, 0), u8(1, 0, 0, 0), 1, 2).perImage, 'same as Dice');
  // fused 1 255 0 0 vs truth 1 1 0 0: foreground P = {0}, Y = {0, 1} -> 2/3;
  // background P = {2, 3}, Y = {2, 3} -> 1; Total: 3 correct of 4 -> 0.75
  const s = fusedLabelDice(u8(1, 255, 0, 0), u8(1, 1, 0, 0), 1, 2);
  close(t, s.perClass[1].mean, 2 / 3, 'foreground');
  close(t, s.perClass[0].mean, 1, 'background');
  close(t, s.total.mean, 0.75, 'total');
  t.throws(() => fusedLabelDice(u8(2, 0), u8(1, 0), 1, 2), /fused: label 2 at index 0/);
});

t.test('region Dice unions classes', async (t) => {
  // pred 1 2 3 0, truth 2 2 0 0 (L = 4), region {1, 2, 3}: P = {0,1,2}, Y = {0,1} -> 2*2/5 = 0.8
  close(t, regionDice(u8(1, 2, 3, 0), u8(2, 2, 0, 0), 1, 4, [1, 2, 3])[0], 0.8, 'union region');
  // region {3}: P = {2}, Y = {} -> 0
  close(t, regionDice(u8(1, 2, 3, 0), u8(2, 2, 0, 0), 1, 4, [3])[0], 0, 'single class');
  t.throws(() => regionDice(u8(0), u8(0), 1, 4, [4]), /region class 4/);
});

t.test('IoU distance: both empty is 0; per-class vs foreground', async (t) => {
  t.equal(iouDistance(u8(0, 0, 0), u8(0, 0, 0), 2), 0, 'two empty masks agree');
  // binary: a = 1 1 0 0, b = 1 0 0 0 -> IoU 1/2 -> d = 0.5
  close(t, iouDistance(u8(1, 1, 0, 0), u8(1, 0, 0, 0), 2), 0.5, 'binary');
  // a class swap: a = 1 2 0 0, b = 2 1 0 0. per-class: IoU_1 = 0, IoU_2 = 0 -> d = 1;
  // foreground: both {0, 1} -> d = 0
  close(t, iouDistance(u8(1, 2, 0, 0), u8(2, 1, 0, 0), 3, 'per-class'), 1, 'swap per-class');
  close(t, iouDistance(u8(1, 2, 0, 0), u8(2, 1, 0, 0), 3, 'foreground'), 0, 'swap foreground');
  // a = 1 1 2 0, b = 1 0 2 2 (L = 4, class 3 absent from both, so left out):
  // IoU_1 = 1/2, IoU_2 = 1/2 -> d = 0.5; foreground {0,1,2} vs {0,2,3} -> 2/4 -> d = 0.5
  close(t, iouDistance(u8(1, 1, 2, 0), u8(1, 0, 2, 2), 4, 'per-class'), 0.5, 'per-class mean');
  close(t, iouDistance(u8(1, 1, 2, 0), u8(1, 0, 2, 2), 4, 'foreground'), 0.5, 'foreground');
  // 255 in either map: voxel ignored. a = 1 255, b = 1 0 -> IoU 1
  t.equal(iouDistance(u8(1, 255), u8(1, 0), 2), 0);
});

t.test('GED by hand', async (t) => {
  const A = u8(1, 1, 0, 0);
  // Two identical annotators, perfect predictions: every d is 0 -> GED = 0.
  const zero = generalisedEnergyDistance({ samples: [A, A], observed: [A, A], n: 1, classes: 2 });
  t.equal(zero.perImage[0], 0, 'identical sets');

  // Y1 = 1 1 0 0, Y2 = 1 0 0 0; S1 = Y1, S2 = empty.
  //   d(S1,Y1) = 0, d(S1,Y2) = 0.5, d(S2,Y1) = 1, d(S2,Y2) = 1, d(S1,S2) = 1, d(Y1,Y2) = 0.5
  //   E[d(S,Y)] = (0 + 0.5 + 1 + 1)/4 = 0.625; E[d(S,S')] = 2*1/4 = 0.5; E[d(Y,Y')] = 2*0.5/4 = 0.25
  //   GED = 2*0.625 - 0.5 - 0.25 = 0.5
  const Y1 = u8(1, 1, 0, 0);
  const Y2 = u8(1, 0, 0, 0);
  const S2 = u8(0, 0, 0, 0);
  const g = generalisedEnergyDistance({ samples: [Y1, S2], observed: [Y1, Y2], n: 1, classes: 2 });
  close(t, g.perImage[0], 0.5, 'known d values');

  // Annotator 0 absent: Y = {Y2}. E[d(S,Y)] = (0.5 + 1)/2 = 0.75; E[d(S,S')] = 0.5; E[d(Y,Y')] = 0
  //   GED = 1.5 - 0.5 - 0 = 1.0
  const absent = generalisedEnergyDistance({ samples: [Y1, S2], observed: [Y1, Y2], present: u8(0, 1), n: 1, classes: 2 });
  close(t, absent.perImage[0], 1, 'absent annotator left out of Y');

  // Two images packed as [R, N, V]: image 0 the case above (0.5), image 1 all identical (0).
  const samples = new Uint8Array([...Y1, ...A, ...S2, ...A]);
  const observed = new Uint8Array([...Y1, ...A, ...Y2, ...A]);
  const both = generalisedEnergyDistance({ samples, observed, annotators: 2, n: 2, classes: 2 });
  close(t, both.perImage[0], 0.5, 'packed image 0');
  close(t, both.perImage[1], 0, 'packed image 1');
  close(t, both.ged.mean, 0.25, 'mean over images');
  // No annotation present: NaN, not counted.
  const none = generalisedEnergyDistance({ samples: [Y1], observed: [Y1], present: u8(0), n: 1, classes: 2 });
  t.ok(Number.isNaN(none.perImage[0]));
  t.equal(none.ged.count, 0);
});

t.test('CM error is 0 when the estimated CMs are the true ones everywhere', async (t) => {
  // 2 images, 3 classes, 6 voxels, 2 annotators with some disagreement.
  const truth = u8(0, 1, 2, 2, 1, 0, /**/ 0, 0, 1, 1, 1, 0);
  const labels = [u8(0, 2, 2, 1, 1, 0, /**/ 0, 1, 1, 0, 1, 0), u8(1, 1, 2, 2, 1, 0, /**/ 0, 0, 1, 1, 2, 0)];
  const n = 2;
  const L = 3;
  const V = 6;
  const truths = labels.map((lab) =>
    [0, 1].map((img) => trueConfusionMatrix(lab.subarray(img * V, (img + 1) * V), truth.subarray(img * V, (img + 1) * V), L).matrix),
  );
  // Columns the image lacks (NaN in T) get any valid column: they are not scored.
  const cms = constantCms(n, 2, L, V, (img, r) => truths[r][img].map((x, k) => (Number.isNaN(x) ? (Math.floor(k / L) === k % L ? 1 : 0) : x)));
  const res = cmEstimationError({ cms, truth, annotatorLabels: labels, n, classes: L });
  for (const e of res.errorPerImage) close(t, e, 0, 'per image', 1e-6);
  close(t, res.error.mean, 0, 'mean', 1e-6);
  res.incompetence.forEach((x) => close(t, x, 0, 'incompetence', 1e-6));
  // imageConfusionMatrices' T agrees with trueConfusionMatrix of src/data/annotators.ts.
  const m = imageConfusionMatrices(cms, truth, labels[0], 1, 0, { n, annotators: 2, classes: L });
  t.same(Array.from(m.trueMatrix, (x) => (Number.isNaN(x) ? 'nan' : x)), Array.from(truths[0][1], (x) => (Number.isNaN(x) ? 'nan' : x)));
});

t.test('CM error, incompetence and reliability by hand', async (t) => {
  // Image 0: y = 0 0 1 1, label = 0 1 1 1.
  //   T column 0 (v0, v1 labelled 0, 1): [0.5, 0.5]; column 1 (v2, v3 both 1): [0, 1]
  //   E = identity everywhere. E - T = [[0.5, 0], [-0.5, 0]]
  //   RMSE = sqrt((0.25 + 0.25) / 4) = sqrt(0.125); MAE = (0.5 + 0.5) / 4 = 0.25
  // Image 1: y = 0 0 0 0, label = 0 1 0 0: only column 0 scored, T = [0.75, 0.25]
  //   E - T = [0.25, -0.25] -> RMSE = 0.25, MAE = 0.25
  const truth = u8(0, 0, 1, 1, 0, 0, 0, 0);
  const labels = u8(0, 1, 1, 1, 0, 1, 0, 0);
  const I = [1, 0, 0, 1];
  const cms = constantCms(2, 1, 2, 4, () => I);
  const res = cmEstimationError({ cms, truth, annotatorLabels: [labels], n: 2, classes: 2 });
  close(t, res.errorPerImage[0], Math.sqrt(0.125), 'image 0 RMSE');
  close(t, res.errorPerImage[1], 0.25, 'image 1 RMSE');
  close(t, res.absoluteErrorPerImage[0], 0.25, 'image 0 MAE');
  close(t, res.absoluteErrorPerImage[1], 0.25, 'image 1 MAE');
  // mean over images: (0.353553 + 0.25)/2; std: |0.353553 - 0.25|/2
  close(t, res.error.mean, (Math.sqrt(0.125) + 0.25) / 2, 'mean');
  close(t, res.error.std, (Math.sqrt(0.125) - 0.25) / 2, 'std');
  close(t, res.incompetence[0], 0.25, 'incompetence');
  // Reliability: trace(I)/2 = 1 everywhere; a CM [[0.6, 0.3], [0.4, 0.7]] gives (0.6 + 0.7)/2 = 0.65.
  close(t, estimatedReliability(cms, 2, 1, 2)[0], 1, 'reliability of I');
  const soft = constantCms(2, 1, 2, 4, () => [0.6, 0.3, 0.4, 0.7]);
  close(t, estimatedReliability(soft, 2, 1, 2)[0], 0.65, 'reliability', 1e-6);
  // With the soft CM on image 0: E = [[0.6, 0.3], [0.4, 0.7]], T = [[0.5, 0], [0.5, 1]]
  //   diffs 0.1, 0.3, -0.1, -0.3 -> RMSE = sqrt((0.01 + 0.09 + 0.01 + 0.09)/4) = sqrt(0.05)
  const softRes = cmEstimationError({ cms: soft, truth, annotatorLabels: labels, present: u8(1, 1), n: 2, classes: 2 });
  close(t, softRes.errorPerImage[0], Math.sqrt(0.05), 'soft CM RMSE', 1e-6);
});

t.test('CM error over R = 2 annotators: the mean and the std over images, each averaged over annotators', async (t) => {
  // Two images, y = 0 0 1 1 and 0 0 0 0, CMs = I everywhere.
  //   annotator 0 (as above): RMSE sqrt(0.125) and 0.25 -> mean 0.301777, std 0.051777
  //   annotator 1: labels 1 1 0 0 (T = [[0, 1], [1, 0]] vs I: RMSE 1) and 0 0 0 0 (T col 0 = [1, 0]: RMSE 0)
  //     -> mean 0.5, std 0.5
  //   figure: mean (0.301777 + 0.5) / 2 = 0.400888, std (0.051777 + 0.5) / 2 = 0.275888
  //   (the std of the four pairs pooled would be 0.369005; the std of the two means 0.099112)
  const truth = u8(0, 0, 1, 1, 0, 0, 0, 0);
  const labels = [u8(0, 1, 1, 1, 0, 1, 0, 0), u8(1, 1, 0, 0, 0, 0, 0, 0)];
  const cms = constantCms(2, 2, 2, 4, () => [1, 0, 0, 1]);
  const res = cmEstimationError({ cms, truth, annotatorLabels: labels, n: 2, classes: 2 });
  const a0 = { mean: (Math.sqrt(0.125) + 0.25) / 2, std: (Math.sqrt(0.125) - 0.25) / 2 };
  close(t, res.errorPerAnnotator[0].mean, a0.mean, 'annotator 0 mean');
  close(t, res.errorPerAnnotator[0].std, a0.std, 'annotator 0 std');
  close(t, res.errorPerAnnotator[1].mean, 0.5, 'annotator 1 mean');
  close(t, res.errorPerAnnotator[1].std, 0.5, 'annotator 1 std');
  close(t, res.error.mean, (a0.mean + 0.5) / 2, 'mean of the annotators\' means');
  close(t, res.error.std, (a0.std + 0.5) / 2, 'mean of the annotators\' stds');
  t.equal(res.error.count, 2, 'counted over annotators');
});

t.test('CM error over R = 3 annotators against NumPy', { skip: missingPythonModules('numpy') }, async (t) => {
  // Random per-voxel CMs (columns summing to 1), random y and labels with some 255s; one
  // annotator absent from one image. NumPy computes SPEC section 6 from the arrays alone:
  // T and E over the voxels the annotator labelled, RMSE over the columns present, then
  // per annotator mean and population std over its images, then each averaged over annotators.
  const n = 4, R = 3, L = 3, V = 12;
  let s = 12345;
  const rand = () => ((s = (s * 1664525 + 1013904223) >>> 0) / 4294967296);
  const truth = Uint8Array.from({ length: n * V }, () => Math.floor(rand() * L));
  const labels = Array.from({ length: R }, () => Uint8Array.from({ length: n * V }, () => (rand() < 0.15 ? 255 : Math.floor(rand() * L))));
  const present = Uint8Array.from({ length: n * R }, (_, k) => (k === 2 * R + 1 ? 0 : 1));
  const cms = new Float64Array(n * R * L * L * V);
  for (let img = 0; img < n; img++)
    for (let r = 0; r < R; r++)
      for (let v = 0; v < V; v++)
        for (let j = 0; j < L; j++) {
          const col = Array.from({ length: L }, () => rand() + 0.05);
          const sum = col.reduce((a, b) => a + b, 0);
          col.forEach((x, i) => (cms[((img * R + r) * L * L + i * L + j) * V + v] = x / sum));
        }
  const res = cmEstimationError({ cms, truth, annotatorLabels: labels, present, n, classes: L });
  const want = runPythonJson<{ perImage: (number | null)[]; means: number[]; stds: number[]; mean: number; std: number }>(
    [
      'import json, sys',
      'import numpy as np',
      'd = json.loads(sys.argv[1])',
      'n, R, L, V = d["n"], d["R"], d["L"], d["V"]',
      'A = np.array(d["cms"]).reshape(n, R, L, L, V)',
      'y = np.array(d["truth"]).reshape(n, V)',
      'lab = np.array(d["labels"]).reshape(R, n, V)',
      'present = np.array(d["present"]).reshape(n, R)',
      'err = np.full((n, R), np.nan)',
      'for b in range(n):',
      '    for r in range(R):',
      '        if not present[b, r]: continue',
      '        used = lab[r, b] != 255',
      '        diffs = []',
      '        for j in range(L):',
      '            sel = used & (y[b] == j)',
      '            if sel.sum() == 0: continue',
      '            T = np.bincount(lab[r, b][sel], minlength=L) / sel.sum()',
      '            E = A[b, r, :, j, :][:, sel].mean(axis=1)',
      '            diffs.extend(E - T)',
      '        if diffs: err[b, r] = np.sqrt(np.mean(np.square(diffs)))',
      'means = np.nanmean(err, axis=0); stds = np.nanstd(err, axis=0)',
      'print(json.dumps({"perImage": [None if np.isnan(x) else float(x) for x in err.ravel()], "means": means.tolist(),',
      '                  "stds": stds.tolist(), "mean": float(means.mean()), "std": float(stds.mean())}))',
    ].join('\n'),
    [JSON.stringify({ n, R, L, V, cms: Array.from(cms), truth: Array.from(truth), labels: labels.flatMap((m) => Array.from(m)), present: Array.from(present) })],
  );
  want.perImage.forEach((x, k) => (x === null ? t.ok(Number.isNaN(res.errorPerImage[k]), `pair ${k} skipped`) : close(t, res.errorPerImage[k], x, `pair ${k}`)));
  for (let r = 0; r < R; r++) {
    close(t, res.errorPerAnnotator[r].mean, want.means[r], `annotator ${r} mean`);
    close(t, res.errorPerAnnotator[r].std, want.stds[r], `annotator ${r} std`);
  }
  close(t, res.error.mean, want.mean, 'figure mean');
  close(t, res.error.std, want.std, 'figure std');
});

t.test('CM error and reliability with CMs that differ between voxels', async (t) => {
  // One image, y = 0 0 1 1, a perfect annotator (T = I). A(v) = I at v0, v1 and all 0.5
  // at v2, v3 ([N, R, L, L, V], entry (i, j) at channel i * L + j).
  //   E column 0 averages the voxels with y = 0 (v0, v1): [1, 0]; column 1 those with
  //   y = 1 (v2, v3): [0.5, 0.5]. E - T = [[0, 0.5], [0, -0.5]]: RMSE sqrt(0.5 / 4),
  //   MAE 0.25. (Averaging every voxel would give 0.25, reading v0 alone 0.)
  //   Reliability: mean of trace(A) / L = (1 + 1 + 0.5 + 0.5) / 4 = 0.75.
  const V = 4;
  const perVoxel = [
    [1, 0, 0, 1],
    [1, 0, 0, 1],
    [0.5, 0.5, 0.5, 0.5],
    [0.5, 0.5, 0.5, 0.5],
  ];
  const cms = new Float32Array(4 * V);
  perVoxel.forEach((A, v) => A.forEach((a, k) => (cms[k * V + v] = a)));
  const truth = u8(0, 0, 1, 1);
  const res = cmEstimationError({ cms, truth, annotatorLabels: [u8(0, 0, 1, 1)], n: 1, classes: 2 });
  close(t, res.errorPerImage[0], Math.sqrt(0.125), 'RMSE of the voxel-averaged E');
  close(t, res.absoluteErrorPerImage[0], 0.25, 'MAE');
  close(t, estimatedReliability(cms, 1, 1, 2)[0], 0.75, 'reliability averages every voxel');
  const m = imageConfusionMatrices(cms, truth, u8(0, 0, 1, 1), 0, 0, { n: 1, annotators: 1, classes: 2 });
  t.same(Array.from(m.estimatedMatrix), [1, 0.5, 0, 0.5], 'E itself');
  t.same(Array.from(m.trueMatrix), [1, 0, 0, 1], 'T = I');
});

t.test('CM error skips absent annotators and 255 voxels', async (t) => {
  // R = 2, one image: y = 0 0 1 1.
  //   annotator 0: 0 255 1 255 -> only v0 (y 0 -> 0) and v2 (y 1 -> 1): T = identity, E = I -> 0
  //   annotator 1: absent (present = 0) -> NaN, left out of the averages
  const truth = u8(0, 0, 1, 1);
  const labels = [u8(0, 255, 1, 255), u8(1, 1, 0, 0)];
  const cms = constantCms(1, 2, 2, 4, () => [1, 0, 0, 1]);
  const res = cmEstimationError({ cms, truth, annotatorLabels: labels, present: u8(1, 0), n: 1, classes: 2 });
  t.equal(res.errorPerImage[0], 0, '255 voxels ignored');
  t.ok(Number.isNaN(res.errorPerImage[1]), 'absent annotator is NaN');
  t.equal(res.errorPerAnnotator[1].count, 0);
  t.equal(res.error.mean, 0, 'average over annotators with images');
  t.equal(res.error.count, 1);
  // With annotator 1 present, its swapped labels give T = [[0, 1], [1, 0]] vs I: RMSE = 1.
  const all = cmEstimationError({ cms, truth, annotatorLabels: labels, n: 1, classes: 2 });
  close(t, all.errorPerImage[1], 1, 'swapped annotator');
  close(t, all.error.mean, 0.5, 'averaged over annotators');
  t.throws(() => cmEstimationError({ cms, truth, annotatorLabels: [u8(0, 3, 0, 0), labels[1]], n: 1, classes: 2 }), /annotatorLabels\[0\]: label 3 at index 1/);
  t.throws(() => cmEstimationError({ cms: cms.subarray(1), truth, annotatorLabels: labels, n: 1, classes: 2 }), /cms has 31 elements/);
});

t.test('argmaxAnnotatorProbs turns q [N, R, L, V] into R maps', async (t) => {
  // N = 1, R = 2, L = 2, V = 2: q_0 = [[0.9, 0.2], [0.1, 0.8]] -> 0 1; q_1 = [[0.3, 0.6], [0.7, 0.4]] -> 1 0
  const q = Float32Array.from([0.9, 0.2, 0.1, 0.8, 0.3, 0.6, 0.7, 0.4]);
  const maps = argmaxAnnotatorProbs(q, 1, 2, 2);
  t.same(Array.from(maps[0]), [0, 1]);
  t.same(Array.from(maps[1]), [1, 0]);
});

t.test('evaluateSegmentation combines every figure; the evaluator accumulates', async (t) => {
  const truth = u8(0, 0, 1, 1, 0, 0, 0, 0);
  const pred = u8(0, 1, 1, 1, 0, 0, 0, 0);
  const labels = [u8(0, 1, 1, 1, 0, 1, 0, 0), u8(0, 0, 1, 1, 0, 0, 0, 0)];
  const preds = [u8(0, 1, 1, 1, 0, 1, 0, 0), u8(0, 0, 1, 1, 0, 0, 0, 0)];
  const cms = constantCms(2, 2, 2, 4, () => [1, 0, 0, 1]);
  const report = evaluateSegmentation({ pred, truth, n: 2, classes: 2, cms, annotatorLabels: labels, annotatorPreds: preds });
  // Image 0: foreground P = {1,2,3}, Y = {2,3} -> 4/5; image 1: both empty -> 1
  close(t, report.dicePerClass[1].mean, 0.9, 'foreground Dice');
  close(t, report.averageDice.mean, 0.9, 'binary average = foreground');
  close(t, report.totalDice.mean, (3 / 4 + 1) / 2, 'Total Dice');
  // Predictions equal observations -> GED 0 in both images.
  t.equal(report.ged?.mean, 0);
  // Annotator 0 as in the hand case above, annotator 1 perfect (error 0).
  close(t, report.cmErrorPerAnnotator![0].mean, (Math.sqrt(0.125) + 0.25) / 2, 'annotator 0');
  close(t, report.cmErrorPerAnnotator![1].mean, 0, 'annotator 1');
  close(t, report.cmError!.mean, (Math.sqrt(0.125) + 0.25) / 4, 'averaged over annotators');
  t.same(report.reliability, [1, 1]);
  t.same(report.incompetence, [0.25, 0]);
  t.equal(report.perImage.cmError!.length, 4);

  // One image at a time gives the same report.
  const ev = new SegmentationEvaluator(2);
  for (const img of [0, 1]) {
    const part = (a: Uint8Array) => a.subarray(img * 4, (img + 1) * 4);
    ev.add({
      pred: part(pred),
      truth: part(truth),
      n: 1,
      classes: 2,
      cms: cms.subarray(img * 32, (img + 1) * 32),
      annotatorLabels: labels.map(part),
      annotatorPreds: preds.map(part),
    });
  }
  const again = ev.report();
  t.same(again.dicePerClass, report.dicePerClass);
  t.same(again.cmErrorPerAnnotator, report.cmErrorPerAnnotator);
  t.same(again.reliability, report.reliability);
  t.same(again.ged, report.ged);
  t.same(again.classConfusion, report.classConfusion, 'the pooled class confusion too');
  t.same(again.annotatorCms, report.annotatorCms, 'and the pooled annotator CMs');
  // Pooled T of annotator 0 over both images: of the 6 background voxels it calls 2 foreground,
  // both foreground voxels foreground; the identity CMs estimate the identity. Annotator 1 is perfect.
  const [a0, a1] = report.annotatorCms!;
  [[2 / 3, 0], [1 / 3, 1]].forEach((row, i) => row.forEach((x, j) => close(t, a0.trueMatrix[i][j]!, x, `T[${i}][${j}] of annotator 0`)));
  t.same(a0.estimatedMatrix, [[1, 0], [0, 1]], 'E of annotator 0');
  t.same(a1.trueMatrix, [[1, 0], [0, 1]], 'T of annotator 1');
  // Pooled over both images: truth 0 predicted 0 at 5 voxels and 1 at one, truth 1 predicted 1 twice.
  t.same(report.classConfusion, [[5, 0], [1, 2]], 'classConfusion[predicted][reference]');

  const text = unpadded(formatSegmentationReport(report, { classNames: ['background', 'digit'], annotatorNames: ['over', 'good'] }));
  t.match(text, /\| Dice digit \| 0\.9000 ± 0\.1000 \|/);
  t.match(text, /\| over \| 0\.3018 ± 0\.0518 \| 0\.2500 \| 1\.0000 \|/);
  t.match(text, /\| over: estimated \(true\) % \| true background \| true digit \|\n\| --- \| --- \| --- \|\n\| says background \| 100\.0 \(66\.7\) \| 0\.0 \(0\.0\) \|\n\| says digit \| 0\.0 \(33\.3\) \| 100\.0 \(100\.0\) \|/, "the first annotator's pooled CM, estimate (truth)");
  // The class confusion as % of each reference column: background 5 of 6 voxels kept (83.3%).
  t.match(text, /\| consensus vs reference \(% of column\) \| background \| digit \|\n\| --- \| --- \| --- \|\n\| predicted background \| 83\.3% \| 0\.0% \|\n\| predicted digit \| 16\.7% \| 100\.0% \|\n\| voxels \| 6 \| 2 \|/);
  t.throws(() => evaluateSegmentation({ pred, truth: truth.subarray(1), n: 2, classes: 2 }), /truth has 7 elements/);
});

t.test('class confusion: a swapped pair of classes shows, unlabelled voxels do not count', async (t) => {
  // 3 classes; class 1 always predicted as 2, class 2 as 2; a voxel with truth 255 is left out
  // whatever it is predicted as; no voxel of class 0... except one, predicted 0.
  const truth = u8(1, 1, 1, 2, 2, 255, 0);
  const pred = u8(2, 2, 2, 2, 2, 1, 0);
  const report = evaluateSegmentation({ pred, truth, n: 1, classes: 3 });
  t.same(report.classConfusion, [[1, 0, 0], [0, 0, 0], [0, 3, 2]]);
  const text = unpadded(formatClassConfusion(report.classConfusion, (c) => ['bg', 'A', 'B'][c]));
  t.match(text, /\| predicted A \| 0\.0% \| 0\.0% \| 0\.0% \|/, 'nothing predicted as A');
  t.match(text, /\| predicted B \| 0\.0% \| 100\.0% \| 100\.0% \|/, 'A learnt as B');
  t.match(text, /\| voxels \| 1 \| 3 \| 2 \|/, 'the 255 voxel is not counted');
  t.match(text, /\nNote: A was predicted as B in 100\.0% of its voxels \(as itself in 0\.0%\): the model may have learnt one class as the other\.$/, 'the swap named under the table');
  // Over half of a foreground class as one other foreground class is named; half, a miss (as
  // background) or a class absent from the reference is not. Columns: bg, A, B, C.
  t.same(
    classesLearntAsOthers([
      [9, 1, 0, 6],
      [0, 4, 5, 0],
      [0, 5, 5, 0],
      [0, 0, 0, 0],
    ]),
    [],
    'A half as B, B half as A, C (6 voxels) all as background: none',
  );
  t.same(classesLearntAsOthers([[1, 0, 0], [0, 0, 0], [0, 3, 2]]), [{ reference: 1, predicted: 2, share: 1, recall: 0 }]);
  t.same(classesLearntAsOthers([[5, 0, 0], [0, 1, 2], [0, 4, 8]]), [{ reference: 1, predicted: 2, share: 0.8, recall: 0.2 }], 'B as itself 80%: only A named');
  t.notMatch(formatClassConfusion([[5, 0, 0], [0, 1, 0], [0, 0, 3]], (c) => `c${c}`), /Note/, 'no note when every class is learnt');
  // An annotator CM column of a class absent from the reference: n/a.
  const cmsText = unpadded(formatAnnotatorCms([{ trueMatrix: [[1, null], [0, null]], estimatedMatrix: [[0.9, null], [0.1, null]] }], () => 'r', (c) => `c${c}`));
  t.match(cmsText, /\| says c0 \| 90\.0 \(100\.0\) \| n\/a \|\n\| says c1 \| 10\.0 \(0\.0\) \| n\/a \|/);
  const absent = unpadded(formatClassConfusion([[4, 0], [0, 0]], (c) => `c${c}`));
  t.match(absent, /\| predicted c0 \| 100\.0% \| n\/a \|/, 'a class absent from the reference: n/a, not 0%');
});

t.test('BraTS regions and classes on a tiny volume', async (t) => {
  // One 2x2x2 volume (flattened):
  //   truth 0 1 1 2 2 3 3 0
  //   pred  0 1 3 2 0 3 2 2
  // WT {1,2,3}: P = {1,2,3,5,6,7}, Y = {1..6}, both {1,2,3,5,6} -> 2*5/(6+6) = 10/12
  // TC {1,3}:   P = {1,2,5},       Y = {1,2,5,6}, both {1,2,5} -> 6/7
  // ET {3}:     P = {2,5},         Y = {5,6},     both {5}     -> 2/4
  // necrosis 1: P = {1}, Y = {1,2} -> 2/3; edema 2: P = {3,6,7}, Y = {3,4} -> 2/5; enhancing = ET
  const truth = u8(0, 1, 1, 2, 2, 3, 3, 0);
  const pred = u8(0, 1, 3, 2, 0, 3, 2, 2);
  const b = bratsDice(pred, truth, 1);
  close(t, b.regions.wholeTumour.mean, 10 / 12, 'whole tumour');
  close(t, b.regions.tumourCore.mean, 6 / 7, 'tumour core');
  close(t, b.regions.enhancingTumour.mean, 0.5, 'enhancing tumour');
  close(t, b.classes.necrosis.mean, 2 / 3, 'necrosis');
  close(t, b.classes.edema.mean, 0.4, 'edema');
  close(t, b.classes.enhancing.mean, 0.5, 'enhancing');
  // One volume: the mean alone, no "± 0.0000" spread.
  t.match(unpadded(formatBratsReport(b)), /\| whole tumour \(1, 2, 3\) \| 0\.8333 \|/);
  t.match(unpadded(formatBratsReport(b)), /\| necrotic \/ non-enhancing core \(1\) \| 0\.6667 \|/, "class 1 named for BraTS's NCR/NET and PEDs' NET + CC alike");
});

t.test('an image whose reference labels no voxel is left out of Dice, as of Total Dice', async (t) => {
  // Image 0: every truth voxel unlabelled. Image 1: truth 0 1 1 0, prediction 0 1 0 0.
  const truth = Uint8Array.from([255, 255, 255, 255, 0, 1, 1, 0]);
  const pred = Uint8Array.from([1, 1, 0, 0, 0, 1, 0, 0]);
  const d = diceSummary(pred, truth, 2, 2);
  t.ok(Number.isNaN(d.perImage[0]) && Number.isNaN(d.perImage[1]), 'image 0: NaN for every class');
  t.ok(Math.abs(d.perImage[3] - 2 / 3) < 1e-12, 'image 1 foreground: 2*1 / (1 + 2)');
  t.equal(d.perClass[1].count, 1, 'one image scored');
  t.ok(Math.abs(d.perClass[1].mean - 2 / 3) < 1e-12, `foreground mean ${d.perClass[1].mean}`);
  t.equal(d.total.count, 1);
  t.ok(Math.abs(d.total.mean - 0.75) < 1e-12);
  const region = regionDice(pred, truth, 2, 2, [1]);
  t.ok(Number.isNaN(region[0]), 'a region of image 0: NaN too');
  t.ok(Math.abs(region[1] - 2 / 3) < 1e-12);
});

t.test('a mean that rounds to zero prints without a minus sign', async (t) => {
  t.equal(formatMeanStd({ mean: -1e-6, std: 2e-6, count: 3 }), '0.0000 ± 0.0000');
  t.equal(formatMeanStd({ mean: -0.00006, std: 0, count: 3 }), '-0.0001 ± 0.0000');
});

t.test('trueConfusionMatrix skips voxels the consensus leaves unlabelled', async (t) => {
  const cm = trueConfusionMatrix(Uint8Array.from([0, 1, 1, 0]), Uint8Array.from([0, 1, 255, 255]), 2);
  t.same(Array.from(cm.counts), [1, 0, 0, 1], 'only the two labelled voxels count');
});
