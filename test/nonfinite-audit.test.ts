// An audit of scoring bad model outputs and bad label maps (src/eval/metrics.ts, report.ts,
// src/train/evaluate.ts, src/cli/eval.ts, predict.ts): an out-of-range label at a voxel the
// reference leaves out, and NaN/Inf in a model's probabilities, CMs or annotator distributions.
// A non-finite output must never be scored as if it were a prediction (argmax of NaN is class 0)
// nor be dropped from a mean without a word: its figures are NaN and the report names it.
// Expected values are computed by hand in the comments.
import * as fs from 'fs';
import * as path from 'path';
import t, { type Test } from 'tap';
import { runCli } from './helpers/cli';
import { tempDir } from './helpers/files';
import { missingPythonModules, runPython } from './helpers/python';
import {
  cmEstimationError,
  dicePerClass,
  evaluateSegmentation,
  generalisedEnergyDistance,
  imageConfusionMatrices,
  iouDistance,
  labelConfusionCounts,
  totalDice,
} from '../src/eval/metrics';
import { formatBratsReport, formatSegmentationReport } from '../src/eval/report';
import { type AnnotatedVolume, evaluateModel, evaluateVolumes } from '../src/train/evaluate';
import type { AnnotatedSet } from '../src/train/data';
import type { SlidingWindowModel } from '../src/model/sliding-window';
import { createModel } from '../src/model/model';
import { saveCheckpoint } from '../src/model/checkpoint';

const near = (t: Test, got: number, want: number, what: string, tol = 1e-9) => t.ok(Math.abs(got - want) <= tol * Math.max(1, Math.abs(want)), `${what}: ${got} vs ${want}`);

t.test('an out-of-range label is an error even at a voxel the reference (or the other map) leaves out as 255', async (t) => {
  // Voxel 1 of the reference is 255; the prediction says 7 there, with 2 classes: a caller's
  // bug (a raw label map, the wrong class count) that was skipped because the 255 was seen first.
  const truth = Uint8Array.of(0, 255, 1, 1);
  const pred = Uint8Array.of(0, 7, 1, 1);
  const bad = { name: 'RangeError', message: /pred: label 7 at index 1 >= classes \(2\)/ };
  t.throws(() => labelConfusionCounts(pred, truth, 1, 2), bad);
  t.throws(() => dicePerClass(pred, truth, 1, 2), bad);
  t.throws(() => totalDice(pred, truth, 1, 2), bad);
  t.throws(() => evaluateSegmentation({ pred, truth, n: 1, classes: 2 }), bad);
  // 255 itself at a voxel the reference leaves out stays allowed (a prediction masked like it).
  t.same(Array.from(labelConfusionCounts(Uint8Array.of(0, 255, 1, 1), truth, 1, 2)), [1, 0, 0, 2]);

  // The CM matrices: an annotator's 7 where the reference is 255, and the reference's 7 where
  // the annotator is 255.
  const cms = new Float32Array(1 * 1 * 4 * 4).fill(0.5);
  const shape = { n: 1, annotators: 1, classes: 2 };
  t.throws(() => imageConfusionMatrices(cms, truth, Uint8Array.of(0, 7, 1, 1), 0, 0, shape), { message: /annotatorLabels\[0\]: label 7 at index 1/ });
  t.throws(() => imageConfusionMatrices(cms, Uint8Array.of(0, 7, 1, 1), Uint8Array.of(0, 255, 1, 1), 0, 0, shape), { message: /truth: label 7 at index 1/ });
  t.throws(() => cmEstimationError({ cms, truth, annotatorLabels: [Uint8Array.of(0, 7, 1, 1)], n: 1, classes: 2 }), { message: /label 7 at index 1/ });
  // An absent annotator's map (present 0) is not scored, but a 9 in it is still not a label.
  const cms2 = new Float32Array(2 * 4 * 4).fill(0.5);
  t.throws(
    () => cmEstimationError({ cms: cms2, truth, annotatorLabels: [Uint8Array.of(0, 0, 1, 1), Uint8Array.of(255, 9, 255, 255)], present: Uint8Array.of(1, 0), n: 1, classes: 2 }),
    { message: /annotatorLabels\[1\]: label 9 at index 1/ },
  );

  // IoU distance and GED: one map's 255 hid the other's 7.
  t.throws(() => iouDistance(Uint8Array.of(255, 0), Uint8Array.of(7, 0), 2), { message: /b: label 7 at index 0/ });
  t.throws(
    () => generalisedEnergyDistance({ samples: [Uint8Array.of(0, 7, 1, 1)], observed: [Uint8Array.of(0, 255, 1, 1)], n: 1, classes: 2 }),
    { message: /samples\[0\]: label 7 at index 1/ },
  );
  // A voxel outside the one every present annotation labels was never looked at.
  t.throws(
    () => generalisedEnergyDistance({ samples: [Uint8Array.of(0, 0, 1, 1)], observed: [Uint8Array.of(0, 255, 1, 1), Uint8Array.of(0, 8, 1, 1)], n: 1, classes: 2 }),
    { message: /observed\[1\]: label 8 at index 1/ },
  );
});

t.test('cmEstimationError: a NaN or Inf CM makes the CM error NaN and names the pair; deliberate skips stay skipped', async (t) => {
  // 3 images of 2 voxels, y = [0, 1] each; annotator 0 copies y (T = I), annotator 1 swaps it
  // (T = [[0, 1], [1, 0]]). Every estimated CM is I: RMSE 0 for annotator 0, 1 for annotator 1.
  const n = 3;
  const R = 2;
  const L = 2;
  const V = 2;
  const truth = Uint8Array.of(0, 1, 0, 1, 0, 1);
  const copy = truth.slice();
  const swap = truth.map((x) => 1 - x);
  const cms = new Float32Array(n * R * L * L * V);
  for (let img = 0; img < n; img++) for (let r = 0; r < R; r++) for (let v = 0; v < V; v++) {
    const base = (img * R + r) * L * L * V;
    cms[base + 0 * V + v] = 1; // A[0][0]
    cms[base + 3 * V + v] = 1; // A[1][1]
  }
  // Annotator 1 did not label image 0 (a deliberate skip). Image 1's CM of annotator 0 is NaN at
  // voxel 1 (column y = 1), image 2's is +Inf at voxel 0.
  const present = Uint8Array.of(1, 0, 1, 1, 1, 1);
  cms[(1 * R + 0) * L * L * V + 3 * V + 1] = NaN;
  cms[(2 * R + 0) * L * L * V + 0 * V + 0] = Infinity;
  const result = cmEstimationError({ cms, truth, annotatorLabels: [copy, swap], present, n, classes: L });
  t.ok(Number.isNaN(result.errorPerImage[0 * R + 1]), 'the skipped pair is NaN');
  t.ok(Number.isNaN(result.errorPerImage[1 * R + 0]), 'the NaN CM: NaN error');
  t.ok(Number.isNaN(result.errorPerImage[2 * R + 0]), 'the Inf CM: NaN error, not Infinity (which the mean dropped)');
  near(t, result.errorPerImage[0 * R + 0], 0, 'image 0, annotator 0');
  // Annotator 1: images 1 and 2 scored (image 0 deliberately skipped): RMSE 1 over 2 images.
  t.match(result.errorPerAnnotator[1], { mean: 1, std: 0, count: 2 });
  t.notOk(result.errorPerAnnotator[1].nonFinite, 'a deliberate skip is not a non-finite output');
  // Annotator 0: the mean over image 0 alone (0) was reported; 2 of its 3 images were non-finite.
  t.ok(Number.isNaN(result.errorPerAnnotator[0].mean), `annotator 0's mean is NaN (got ${result.errorPerAnnotator[0].mean})`);
  t.equal(result.errorPerAnnotator[0].nonFinite, 2);
  t.equal(result.errorPerAnnotator[0].count, 1, 'count: the finite values');
  // The SPEC figure averages annotators: it was 0.5 from (0 + 1) / 2, over the good images only.
  t.ok(Number.isNaN(result.error.mean), `the CM error is NaN (got ${result.error.mean})`);
  t.equal(result.error.nonFinite, 2);
  t.ok(Number.isNaN(result.incompetence[0]), 'incompetence of annotator 0 is NaN');
  near(t, result.incompetence[1], 1, 'incompetence of annotator 1');
  t.same(result.nonFinite, [{ image: 1, annotator: 0 }, { image: 2, annotator: 0 }]);
});

/**
 * A fake model over 2x2 images whose first pixel holds the image's index: it predicts the
 * consensus exactly (one-hot p), identity CMs (q_r = p), with `poison` changing the outputs.
 */
function fakeModel(consensus: Uint8Array, R: number, poison: (image: number, out: { probs: Float32Array; cms: Float32Array; q: Float32Array }) => void): SlidingWindowModel {
  const L = 2;
  const V = 4;
  return {
    config: { classes: L, annotators: R, inChannels: 1, ndim: 2, depth: 1 },
    predict: async (images, shape) => {
      const n = shape[0];
      const probs = new Float32Array(n * L * V);
      const cms = new Float32Array(n * R * L * L * V);
      const q = new Float32Array(n * R * L * V);
      for (let k = 0; k < n; k++) {
        const image = Math.round(images[k * V]);
        const one = { probs: new Float32Array(L * V), cms: new Float32Array(R * L * L * V), q: new Float32Array(R * L * V) };
        for (let v = 0; v < V; v++) {
          const c = consensus[image * V + v];
          one.probs[c * V + v] = 1;
          for (let r = 0; r < R; r++) {
            one.cms[(r * L * L + 0) * V + v] = 1;
            one.cms[(r * L * L + 3) * V + v] = 1;
            one.q[(r * L + c) * V + v] = 1;
          }
        }
        poison(image, one);
        probs.set(one.probs, k * L * V);
        cms.set(one.cms, k * R * L * L * V);
        q.set(one.q, k * R * L * V);
      }
      return { probs, cms, annotatorProbs: q };
    },
  };
}

/** 3 images, y = [0, 1, 1, 0]; annotator 0 copies y, annotator 1 swaps it. */
function threeImages(): AnnotatedSet {
  const consensus = Uint8Array.of(0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 0);
  const images = new Float32Array(12);
  for (let k = 0; k < 3; k++) images[k * 4] = k;
  return {
    count: 3,
    channels: 1,
    classes: 2,
    spatial: [2, 2],
    images,
    labels: [consensus.slice(), consensus.map((x) => 1 - x)],
    present: new Uint8Array(6).fill(1),
    consensus,
    annotatorNames: ['copy', 'swap'],
  };
}

t.test('evaluateModel: NaN consensus probabilities give NaN Dice for that image, not the Dice of "class 0 everywhere"', async (t) => {
  const set = threeImages();
  // Image 1's p is NaN at every voxel (a diverged forward pass): argmax picked class 0 at each,
  // and the image scored foreground Dice 0, total Dice 0.5; the means were (1 + 0 + 1) / 3.
  const model = fakeModel(set.consensus!, 2, (image, out) => {
    if (image === 1) out.probs.fill(NaN);
  });
  const summary = await evaluateModel(model, set);
  t.ok(Number.isNaN(summary.averageDice.mean), `average Dice NaN (got ${summary.averageDice.mean})`);
  t.equal(summary.averageDice.nonFinite, 1);
  t.equal(summary.averageDice.count, 2);
  t.ok(Number.isNaN(summary.totalDice.mean), `total Dice NaN (got ${summary.totalDice.mean})`);
  t.ok(Number.isNaN(summary.dicePerClass[1].mean), 'Dice of class 1 NaN');
  t.same(summary.nonFinite?.consensus, [1], 'the image is named');
  // The confusion table counts only the images with a prediction: 2 images of 2 + 2 voxels.
  t.same(summary.classConfusion, [[4, 0], [0, 4]]);
  // The CM figures do not use p: they stay (annotator 0: 0, annotator 1: 1, mean 0.5).
  near(t, summary.cmError!.mean, 0.5, 'CM error');
  const text = formatSegmentationReport({ ...summary, perImage: undefined } as never);
  t.match(text, /Average Dice|Dice class 1/);
  t.match(text, /n\/a \(non-finite/, 'the table says why the figure is missing');
  t.match(text, /non-finite \(NaN or Inf\) model output/i);
  t.match(text, /consensus probabilities: 1 of 3 images \(image 1\)/);
});

t.test('evaluateModel: a NaN or Inf CM or annotator distribution makes CM error, reliability and GED NaN, with the pair named', async (t) => {
  const set = threeImages();
  // Image 2, annotator 0: A(v)[0][0] = Inf at voxel 0, and q_0 NaN there (q = A p).
  const model = fakeModel(set.consensus!, 2, (image, out) => {
    if (image === 2) {
      out.cms[0] = Infinity;
      out.q[0] = NaN;
    }
  });
  const summary = await evaluateModel(model, set);
  // Dice is untouched: p is finite and exact.
  t.match(summary.averageDice, { mean: 1, count: 3 });
  t.notOk(summary.averageDice.nonFinite);
  // Annotator 0's CM error was 0 over images 0 and 1, the CM error (0 + 1) / 2 = 0.5.
  t.ok(Number.isNaN(summary.cmError!.mean), `CM error NaN (got ${summary.cmError!.mean})`);
  t.ok(Number.isNaN(summary.cmErrorPerAnnotator![0].mean));
  t.equal(summary.cmErrorPerAnnotator![0].nonFinite, 1);
  t.match(summary.cmErrorPerAnnotator![1], { mean: 1, count: 3 });
  t.ok(Number.isNaN(summary.reliability![0]), 'reliability of annotator 0 NaN');
  near(t, summary.reliability![1], 1, 'reliability of annotator 1 (trace I / 2)');
  // GED of images 0 and 1: S = {y, y}, Y = {y, 1 - y}: 2 * 0.5 - 0 - 0.5 = 0.5; image 2 NaN.
  t.ok(Number.isNaN(summary.ged!.mean), `GED NaN (got ${summary.ged!.mean})`);
  t.equal(summary.ged!.nonFinite, 1);
  t.same(summary.nonFinite?.cms, [{ image: 2, annotator: 0 }]);
  t.same(summary.nonFinite?.annotatorProbs, [2]);
  t.same(summary.nonFinite?.consensus, []);
  const text = formatSegmentationReport(summary as never, { annotatorNames: set.annotatorNames });
  t.match(text, /annotator CMs: 1 of 6 image-annotator pairs \(image 2: copy\)/);
  t.match(text, /annotator distributions: 1 of 3 images \(image 2\)/);
});

t.test('finite outputs: no nonFinite fields, and deliberate skips still leave a finite mean', async (t) => {
  const set = threeImages();
  set.present = Uint8Array.of(1, 0, 1, 1, 1, 1); // annotator 1 did not label image 0
  set.labels[1].fill(255, 0, 4);
  const summary = await evaluateModel(fakeModel(set.consensus!, 2, () => {}), set);
  t.equal(summary.nonFinite, undefined);
  t.match(summary.cmErrorPerAnnotator![1], { mean: 1, count: 2 });
  t.notOk(summary.cmErrorPerAnnotator![1].nonFinite);
  near(t, summary.cmError!.mean, 0.5, 'CM error');
  const text = formatSegmentationReport(summary as never);
  t.notMatch(text, /non-finite/);
});

t.test('cmseg eval and predict on a checkpoint whose finite weights give NaN outputs: n/a with a warning, not the scores of "background everywhere"', async (t) => {
  const skip = missingPythonModules('numpy', 'safetensors');
  if (skip) return t.skip(skip);
  const dir = tempDir(t, 'cmseg-nonfinite-');
  const train = await runCli(['train', '--preset', 'mnist-tiny', '--steps', '1', '--no-test', '--quiet', '--out', 'run'], dir);
  t.equal(train.exitCode, 0, train.stderr);
  // Every weight finite (the loader refuses NaN/Inf weights), but a norm scale of 3e38
  // overflows the next convolution to Inf, and its instance norm makes NaN of every output.
  runPython(
    `import sys, numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file
f = safe_open(sys.argv[1], 'np')
t = {k: f.get_tensor(k) for k in f.keys()}
t['enc.0.norm1.weight'] = np.full_like(t['enc.0.norm1.weight'], 3e38)
assert all(np.isfinite(v).all() for v in t.values())
save_file(t, sys.argv[2], metadata=f.metadata())`,
    [path.join(dir, 'run', 'last.safetensors'), path.join(dir, 'big.safetensors')],
  );
  const evaluated = await runCli(['eval', '--checkpoint', 'big.safetensors', '--out', 'eval.json'], dir);
  t.equal(evaluated.exitCode, 0, evaluated.stderr);
  // Before: "Dice digit 0.0000", "Total Dice 0.87": the argmax of NaN is background everywhere.
  t.match(evaluated.stdout, /\| Dice digit\s+\| n\/a \(non-finite: 32\)/);
  t.match(evaluated.stdout, /\| Total Dice\s+\| n\/a \(non-finite: 32\)/);
  t.match(evaluated.stdout, /Warning: non-finite \(NaN or Inf\) model output/);
  t.match(evaluated.stdout, /consensus probabilities: 32 of 32 images/);
  const record = JSON.parse(fs.readFileSync(path.join(dir, 'eval.json'), 'utf8'));
  t.match(record.metrics.averageDice, { mean: null, std: null, nonFinite: 32 });
  t.match(record.metrics.cmError, { mean: null, nonFinite: 128 });
  t.equal(record.metrics.nonFinite.consensus.length, 32);
  t.same(record.metrics.nonFinite.cms[0], { image: 0, annotator: 0 });

  const predicted = await runCli(['predict', '--checkpoint', 'big.safetensors', '--out', 'pictures', '--count', '2'], dir);
  t.equal(predicted.exitCode, 0, predicted.stderr);
  t.match(predicted.stderr, /warning: the model's output is non-finite \(NaN or Inf: a diverged model\?\) on 2 of 2 images \(image-000, image-001\)/);
  t.match(fs.readFileSync(path.join(dir, 'pictures', 'README.txt'), 'utf8'), /non-finite .* on 2 of 2 images/);
});

t.test('evaluateVolumes: a volume with NaN probabilities is not scored as "no tumour" (Dice 1, HD95 0), and is named by its id', async (t) => {
  // A model that predicts background everywhere, except NaN for a volume whose images are 1.
  const model: SlidingWindowModel = {
    config: { classes: 4, annotators: 1, inChannels: 1, ndim: 3, depth: 1 },
    predict: async (images, shape) => {
      const V = shape.slice(2).reduce((a, b) => a * b, 1);
      const probs = new Float32Array(shape[0] * 4 * V);
      for (let n = 0; n < shape[0]; n++) {
        if (images[n * V] === 1) probs.fill(NaN, n * 4 * V, (n + 1) * 4 * V);
        else probs.fill(1, n * 4 * V, n * 4 * V + V);
      }
      return { probs };
    },
  };
  const extent = { d: 2, h: 3, w: 3 };
  const volumes: Record<string, AnnotatedVolume> = {
    diverged: { id: 'diverged', images: new Float32Array(18).fill(1), extent, consensus: new Uint8Array(18), labels: [], present: new Uint8Array(0) },
    healthy: { id: 'healthy', images: new Float32Array(18), extent, consensus: new Uint8Array(18), labels: [], present: new Uint8Array(0) },
  };
  const lines: string[] = [];
  const summary = await evaluateVolumes(model, ['diverged', 'healthy'], async (id) => volumes[id], {
    patch: [2, 3, 3],
    annotators: false,
    annotatorNames: [],
    bratsRegions: true,
    onVolume: (score) => lines.push(`${score.id} ${score.nonFinite ?? false}`),
  });
  const [diverged, healthy] = summary.perCase!;
  t.equal(diverged.nonFinite, true);
  t.ok(Number.isNaN(diverged.regions!.wholeTumour), `no Dice for the diverged volume (got ${diverged.regions!.wholeTumour})`);
  t.ok(Number.isNaN(diverged.hd95!.wholeTumour), `no HD95 for it (got ${diverged.hd95!.wholeTumour})`);
  t.ok(Number.isNaN(diverged.totalDice));
  t.equal(healthy.regions!.wholeTumour, 1);
  t.same(lines, ['diverged true', 'healthy false']);
  // Before: WT Dice 1 +- 0 over 2 volumes, HD95 0 +- 0 over 2.
  t.match(summary.brats!.regions.wholeTumour, { count: 1, nonFinite: 1 });
  t.ok(Number.isNaN(summary.brats!.regions.wholeTumour.mean));
  t.match(summary.brats!.hd95.wholeTumour, { count: 1, nonFinite: 1 });
  t.match(summary.totalDice, { count: 1, nonFinite: 1 });
  t.same(summary.nonFinite, { consensus: [0], cms: [], annotatorProbs: [] });
  const text = formatSegmentationReport(summary as never);
  t.match(text, /consensus probabilities: 1 of 2 volumes \(volume diverged\)/);
  const brats = formatBratsReport({ images: 2, regions: summary.brats!.regions, classes: summary.brats!.classes, hd95: summary.brats!.hd95, perImage: {} as never });
  t.match(brats, /whole tumour \(1, 2, 3\)\s+\| n\/a \(non-finite: 1\)/);
  t.match(brats, /\| whole tumour\s+\| n\/a \(non-finite: 1\)\s+\|/);
});

t.test('reliability: an annotator whose CM is NaN off its diagonal has no reliability either', async (t) => {
  // 1 image of 2 voxels, R = 2, L = 2; identity CMs (reliability 1), annotator 1's A[1][0] NaN at voxel 0.
  const cms = new Float32Array(2 * 4 * 2);
  for (let r = 0; r < 2; r++) {
    cms.fill(1, r * 8 + 0, r * 8 + 2); // A[0][0]
    cms.fill(1, r * 8 + 6, r * 8 + 8); // A[1][1]
  }
  cms[1 * 8 + 2 * 2 + 0] = NaN; // A_1[1][0] at voxel 0
  const report = evaluateSegmentation({ pred: Uint8Array.of(0, 1), truth: Uint8Array.of(0, 1), n: 1, classes: 2, cms, annotators: 2 });
  near(t, report.reliability![0], 1, 'annotator 0');
  t.ok(Number.isNaN(report.reliability![1]), `annotator 1 NaN (got ${report.reliability![1]})`);
  t.same(report.nonFinite?.cms, [{ image: 0, annotator: 1 }]);
  t.match(formatSegmentationReport(report), /\| annotator 1 \| n\/a\s+\| n\/a\s+\| n\/a \(non-finite\)\s*\|/);
});

t.test('3D: predict writes no volume of a case whose output is NaN and fails naming it; eval says "not scored" per case', async (t) => {
  const skip = missingPythonModules('numpy', 'safetensors');
  if (skip) return t.skip(skip);
  const dir = tempDir(t, 'cmseg-nonfinite3d-');
  const phantom = await runCli(['phantom', 'brats', '--cases', '2', '--out', 'brats', '--size', '32,32,24', '--seed', '4'], dir);
  t.equal(phantom.exitCode, 0, phantom.stderr);
  const model = createModel({ ndim: 3, inChannels: 4, classes: 4, annotators: 2, depth: 2, baseChannels: 4, seed: 3 });
  await saveCheckpoint(model, path.join(dir, 'api3d.safetensors'));
  await model.dispose();
  // Finite weights whose forward pass overflows to NaN (see the 2D test above).
  runPython(
    `import sys, numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file
f = safe_open(sys.argv[1], 'np')
t = {k: f.get_tensor(k) for k in f.keys()}
t['enc.0.norm1.weight'] = np.full_like(t['enc.0.norm1.weight'], 3e38)
save_file(t, sys.argv[2], metadata=f.metadata())`,
    [path.join(dir, 'api3d.safetensors'), path.join(dir, 'big3d.safetensors')],
  );
  const predicted = await runCli(['predict', '--checkpoint', 'big3d.safetensors', '--data', 'brats', '--patch', '16', '--out', 'pred'], dir);
  // Before: exit 0 and two "consensus" volumes of background only (the argmax of NaN).
  t.equal(predicted.exitCode, 1);
  t.match(predicted.stderr, /BraTS2021_00000: the model's output is non-finite \(NaN or Inf\): nothing written for this case/);
  t.match(predicted.stderr, /cmseg: error: the model's output is non-finite .* on 2 of 2 cases \(BraTS2021_00000, BraTS2021_00001\): no volumes or pictures were written for them/);
  t.same(fs.readdirSync(path.join(dir, 'pred')).filter((f) => f.endsWith('.nii.gz')), []);
  t.match(fs.readFileSync(path.join(dir, 'pred', 'README.txt'), 'utf8'), /on 2 of 2 cases/);

  const evaluated = await runCli(['eval', '--checkpoint', 'big3d.safetensors', '--data', 'brats', '--patch', '16', '--out', 'eval.json'], dir);
  t.equal(evaluated.exitCode, 0, evaluated.stderr);
  t.match(evaluated.stderr, /\[1\/2\] BraTS2021_00000: not scored: the model's output is non-finite/);
  t.match(evaluated.stdout, /consensus probabilities: 2 of 2 volumes \(volume BraTS2021_00000, volume BraTS2021_00001\)/);
  t.match(evaluated.stdout, /whole tumour \(1, 2, 3\)\s+\| n\/a \(non-finite: 2\)/);
  const record = JSON.parse(fs.readFileSync(path.join(dir, 'eval.json'), 'utf8'));
  t.match(record.metrics.brats.hd95.wholeTumour, { mean: null, nonFinite: 2 });
  t.equal(record.metrics.perCase[0].nonFinite, true);
});

t.test('evaluateVolumes: a NaN in a volume\'s images is named with the volume and channel, before its prediction', async (t) => {
  let predicted = 0;
  const model: SlidingWindowModel = {
    config: { classes: 4, annotators: 1, inChannels: 2, ndim: 3, depth: 1 },
    predict: async (_images, shape) => {
      predicted++;
      return { probs: new Float32Array(shape[0] * 4 * 18).fill(0.25) };
    },
  };
  const extent = { d: 2, h: 3, w: 3 };
  // Channel 1, voxel 5 (flat index 18 + 5): the error said only "volume has a non-finite value (NaN) at index 23".
  const images = new Float32Array(36);
  images[23] = NaN;
  const volume = { id: 'case-7', images, extent, consensus: new Uint8Array(18), labels: [], present: new Uint8Array(0) };
  await t.rejects(evaluateVolumes(model, ['case-7'], async () => volume, { patch: [2, 3, 3], annotators: false, annotatorNames: [] }), {
    message: /volume case-7: images hold NaN at channel 1, voxel 5/,
  });
  t.equal(predicted, 0, 'refused before any window was predicted');
  // An images array of the wrong size is named too.
  await t.rejects(evaluateVolumes(model, ['case-8'], async () => ({ ...volume, id: 'case-8', images: new Float32Array(30) }), { patch: [2, 3, 3], annotators: false, annotatorNames: [] }), {
    message: /volume case-8: images has 30 values, 2 channels of 2x3x3 voxels need 36/,
  });
});
