// Edges of the scores (src/eval/*.ts, src/train/evaluate.ts) against independent truth:
// hand-computed values, and SciPy for surface distances (binary_erosion with the cross of the
// array's own rank, distance_transform_edt with the spacing as `sampling`, numpy's
// percentile: the HD95 of MONAI's compute_hausdorff_distance(percentile=95)), nibabel for the
// NIfTI files `cmseg predict` writes. Covered: spacing and mask checks, HD95's definition
// (not MedPy's), 2D images, BraTS label checks, label maps as bytes only, evaluateModel's
// shape checks and batches, BraTS regions on a non-BraTS model, the fused-label rows, GED with
// partly unlabelled annotations, and cmseg eval's JSON against its written predictions.
import t, { type Test } from 'tap';
import * as fs from 'fs';
import * as path from 'path';
import { hausdorff95, squaredDistanceTransform, surfaceDistances, type Dims3 } from '../src/eval/surface-distance';
import { bratsHausdorff95 } from '../src/eval/brats-regions';
import { cmEstimationError, fusedLabelDice, generalisedEnergyDistance, imageConfusionMatrices, iouDistance } from '../src/eval/metrics';
import { formatAnnotatorCms, formatMeanStd, markdownTable } from '../src/eval/report';
import { evaluateModel, evaluateVolumes, fusedLabelRows } from '../src/train/evaluate';
import type { AnnotatedSet } from '../src/train/data';
import type { SlidingWindowModel } from '../src/model/sliding-window';
import { tempDir } from './helpers/files';
import { missingPythonModules, runPython, runPythonJson } from './helpers/python';
import { runCli } from './helpers/cli';
import { argmaxClasses, createModel } from '../src/model/model';
import { saveCheckpoint } from '../src/model/checkpoint';

const near = (t: Test, got: number, want: number, what: string, tol = 1e-9) => t.ok(Math.abs(got - want) <= tol * Math.max(1, Math.abs(want)), `${what}: ${got} vs ${want}`);

t.test('surface distances: masks and spacings that do not fit the grid are refused, not read as NaN or Infinity', async (t) => {
  const dims: Dims3 = [3, 3, 3];
  const p = new Uint8Array(27);
  p[13] = 1;
  const y = new Uint8Array(27);
  y[0] = 1;
  // A spacing of two values made every distance NaN, a fourth value was ignored, 0 made them Infinity.
  t.throws(() => hausdorff95(p, y, dims, [1, 1] as unknown as [number, number, number]), /hausdorff95: voxel spacing 1, 1 must be finite and > 0 along each of d, h, w/);
  t.throws(() => hausdorff95(p, y, dims, [1, 1, 1, 5] as unknown as [number, number, number]), /voxel spacing 1, 1, 1, 5 must be/);
  t.throws(() => hausdorff95(p, y, dims, ['1', '1', '1'] as unknown as [number, number, number]), /voxel spacing "1", "1", "1" must be/);
  t.throws(() => surfaceDistances(p, y, dims, [0, 1, 1]), /surfaceDistances: voxel spacing 0, 1, 1 must be/);
  t.throws(() => surfaceDistances(p, y, dims, [NaN, 1, 1]), /surfaceDistances: voxel spacing NaN, 1, 1 must be/);
  t.throws(() => squaredDistanceTransform(y, dims, [-1, 1, 1]), /squaredDistanceTransform: voxel spacing -1, 1, 1 must be/);
  // A mask one voxel short was read past its end as outside.
  t.throws(() => surfaceDistances(p.subarray(1), y, dims), /surfaceDistances: from has 26 voxels, dims 3x3x3 make 27/);
  t.throws(() => surfaceDistances(p, y.subarray(1), dims), /surfaceDistances: to has 26 voxels/);
  // What fits still scores: the centre voxel to the corner, 1 x 2 x 3 mm voxels.
  near(t, surfaceDistances(p, y, dims, [1, 2, 3])[0], Math.hypot(1, 2, 3), 'centre to corner in mm');
});

t.test('HD95 is the larger directed 95th percentile (MONAI), not the percentile of both directions pooled (MedPy)', async (t) => {
  // A row of five voxels: P = {0}, Y = {0, 4}. Every voxel of a one-voxel-thick row is surface.
  // P -> Y: {0}; Y -> P: {0, 4 w}. p95 {0, 4w} = 0.95 * 4w. MedPy: p95 {0, 0, 4w} = 0.9 * 4w.
  const p = Uint8Array.from([1, 0, 0, 0, 0]);
  const y = Uint8Array.from([1, 0, 0, 0, 1]);
  near(t, hausdorff95(p, y, [1, 1, 5]), 3.8, '1 mm voxels (MedPy: 3.6)');
  near(t, hausdorff95(y, p, [1, 1, 5], [1, 1, 2]), 7.6, 'symmetric; 2 mm along w (MedPy: 7.2)');
  near(t, hausdorff95(p, y, [5, 1, 1], [2, 1, 1]), 7.6, 'the same row along d, 2 mm voxels');
});

t.test('HD95 of a 2D image [1, H, W] is the in-plane one; masks in one slice of a volume stay 3D', { skip: missingPythonModules('numpy', 'scipy') }, async (t) => {
  let s = 777;
  const rand = () => (s = (s * 1664525 + 1013904223) >>> 0) / 4294967296;
  const disc = (dims: Dims3, slice: number, ch: number, cw: number, r: number, noise: number) => {
    const [D, H, W] = dims;
    const m = new Uint8Array(D * H * W);
    for (let h = 0; h < H; h++) for (let w = 0; w < W; w++) m[(slice * H + h) * W + w] = Math.hypot(h - ch, w - cw) < r + noise * (rand() - 0.5) ? 1 : 0;
    return m;
  };
  const flat: Dims3 = [1, 32, 32];
  const vol: Dims3 = [4, 20, 24];
  const cases = [
    { dims: flat, p: disc(flat, 0, 15, 15, 10, 0), y: disc(flat, 0, 13, 17, 8, 0), spacing: [1, 1, 1] },
    { dims: flat, p: disc(flat, 0, 15, 15, 9, 3), y: disc(flat, 0, 16, 14, 9, 3), spacing: [5, 0.8, 1.3] },
    { dims: flat, p: disc(flat, 0, 2, 3, 6, 1), y: disc(flat, 0, 28, 29, 5, 1), spacing: [1, 1.5, 0.5] }, // at the image's corners
    { dims: vol, p: disc(vol, 2, 10, 12, 7, 2), y: disc(vol, 2, 9, 11, 6, 2), spacing: [1.2, 0.9, 1] }, // one slice of a volume
  ] as const;
  const dir = tempDir(t);
  const file = path.join(dir, 'masks.json');
  fs.writeFileSync(file, JSON.stringify(cases.map((c) => ({ dims: c.dims, p: Array.from(c.p), y: Array.from(c.y), spacing: c.spacing }))));
  // A [1, H, W] case is given to SciPy as the 2D array it is (the 2D cross, in-plane spacing).
  const want = runPythonJson<number[]>(
    `
import json, sys
import numpy as np
from scipy.ndimage import binary_erosion, distance_transform_edt, generate_binary_structure
out = []
for c in json.load(open(sys.argv[1])):
    p = np.array(c["p"], dtype=bool).reshape(c["dims"])
    y = np.array(c["y"], dtype=bool).reshape(c["dims"])
    sp = c["spacing"]
    if c["dims"][0] == 1:
        p, y, sp = p[0], y[0], sp[1:]
    cross = generate_binary_structure(p.ndim, 1)
    def sds(a, b):
        ab = a ^ binary_erosion(a, structure=cross)
        bb = b ^ binary_erosion(b, structure=cross)
        return distance_transform_edt(~bb, sampling=sp)[ab]
    out.append(float(max(np.percentile(sds(p, y), 95), np.percentile(sds(y, p), 95))))
print(json.dumps(out))
`,
    [file],
  );
  cases.forEach((c, k) => near(t, hausdorff95(c.p, c.y, c.dims, c.spacing), want[k], `case ${k} (${c.dims.join('x')}) vs SciPy`));
  t.ok(Math.abs(want[0] - 4) > 0.5, `the first case tells 2D from a one-slice volume (2D: ${want[0]}, 3D cross: 4)`);
});

t.test('bratsHausdorff95: labels outside 0..3 are refused (a raw BraTS 4); a 255 of the reference is outside every region', async (t) => {
  const dims: Dims3 = [1, 1, 6];
  const pred = Uint8Array.from([3, 3, 0, 0, 0, 0]);
  // A BraTS 2021 map not mapped to 0..3: its 4 would drop out of every region without a word.
  t.throws(() => bratsHausdorff95(pred, Uint8Array.from([4, 4, 0, 0, 0, 0]), dims), /truth: label 4 at index 0 >= classes \(4\)/);
  t.throws(() => bratsHausdorff95(Uint8Array.from([3, 3, 0, 0, 0, 255]), pred, dims), /pred: label 255 at index 5 >= classes \(4\)/);
  // ET: prediction {0, 1}, reference {0} (voxel 1 unlabelled). P -> Y: {0, 1}, p95 0.95; Y -> P: {0}.
  const hd = bratsHausdorff95(pred, Uint8Array.from([3, 255, 0, 0, 0, 0]), dims);
  near(t, hd.enhancingTumour, 0.95, 'ET with the 255 outside the reference region');
  near(t, hd.wholeTumour, 0.95, 'WT alike');
});

t.test('every scorer takes label maps as bytes only: probabilities (meanLabels) are refused, not dropped voxel by voxel', async (t) => {
  // A Float32Array of 0.7s indexed no count: the voxel vanished and the rest scored perfect.
  const truth = Uint8Array.from([0, 1, 1, 0]);
  const soft = Float32Array.from([0.7, 1, 1, 0]) as unknown as Uint8Array;
  t.throws(() => fusedLabelDice(soft, truth, 1, 2), /fused is Float32Array: a label map is a Uint8Array/);
  t.throws(() => fusedLabelDice(truth, soft, 1, 2), /truth is Float32Array: a label map is a Uint8Array/);
  t.throws(() => iouDistance(soft, truth, 2), /a is Float32Array: a label map is a Uint8Array/);
  t.throws(() => iouDistance(truth, soft, 2), /b is Float32Array/);
  const cms = new Float32Array(16).fill(0.5);
  t.throws(() => cmEstimationError({ cms, truth: soft, annotatorLabels: [truth], n: 1, classes: 2 }), /truth is Float32Array: a label map is a Uint8Array/);
  t.throws(() => imageConfusionMatrices(cms, truth, soft, 0, 0, { n: 1, annotators: 1, classes: 2 }), /labels is Float32Array/);
  t.throws(() => bratsHausdorff95(soft, truth, [1, 1, 4]), /pred is Float32Array: a label map is a Uint8Array/);
  // Bytes still score: fused {0, 1, 1, 1} against {0, 1, 1, 0}: foreground Dice 2*2/(3+2).
  t.equal(fusedLabelDice(Uint8Array.from([0, 1, 1, 1]), truth, 1, 2).perImage[1], 0.8);
  t.equal(iouDistance(Uint8Array.from([0, 1, 1, 1]), truth, 2), 1 - 2 / 3);
});

t.test('evaluateModel: a set of other classes or annotators than the model is named as such', async (t) => {
  // Before: "cms has 384 elements, [N, R, L, L, *S] needs 2*3*2*2*12", "pred has 36 elements, truth has 24".
  const model = (classes: number, annotators: number): SlidingWindowModel => ({
    config: { ndim: 2, inChannels: 1, classes, annotators, depth: 1 },
    predict: async (_images: Float32Array, shape: number[]) => {
      const n = shape[0];
      const V = shape[2] * shape[3];
      return {
        probs: new Float32Array(n * classes * V).fill(1 / classes),
        cms: new Float32Array(n * annotators * classes * classes * V).fill(1 / classes),
        annotatorProbs: new Float32Array(n * annotators * classes * V).fill(1 / classes),
      };
    },
  });
  const set = (classes: number, annotators: number): AnnotatedSet => ({
    count: 2,
    channels: 1,
    classes,
    spatial: [3, 4],
    images: new Float32Array(24),
    labels: Array.from({ length: annotators }, () => new Uint8Array(24)),
    present: new Uint8Array(2 * annotators).fill(1),
    consensus: new Uint8Array(24),
    annotatorNames: Array.from({ length: annotators }, (_, r) => `a${r}`),
  });
  await t.rejects(evaluateModel(model(3, 2), set(2, 2)), /the model predicts 3 classes, the set has 2/);
  await t.rejects(evaluateModel(model(3, 2), set(2, 2), { annotators: false }), /the model predicts 3 classes, the set has 2/);
  await t.rejects(evaluateModel(model(2, 4), set(2, 3)), /the model has 4 annotators, the set the labels of 3 \(a0, a1, a2\)/);
  // Without the annotators' figures their count does not matter: all-background everywhere scores Dice 1.
  const plain = await evaluateModel(model(2, 4), set(2, 3), { annotators: false });
  t.same(plain.dicePerClass.map((d) => d.mean), [1, 1]);
});

t.test('evaluateModel predicts large images a few at a time: its memory stays near a training step\'s', async (t) => {
  // 64 images of 256^2 took 3.2 GB in one predict call (c 16, depth 3, 3 annotators), more than
  // a training step of the images preset's 16 (2.4 GB). By default a call now gets at most 2^20
  // voxels' worth of images (16 of 256^2), and never more than 64 (MNIST's 32^2).
  const calls: number[][] = [];
  const model: SlidingWindowModel = {
    config: { ndim: 2, inChannels: 1, classes: 2, annotators: 1, depth: 1 },
    predict: async (_images: Float32Array, shape: number[]) => {
      calls.push(shape);
      const n = shape[0];
      const V = shape[2] * shape[3];
      return { probs: new Float32Array(2 * n * V).fill(0.5), cms: new Float32Array(4 * n * V).fill(0.5), annotatorProbs: new Float32Array(2 * n * V).fill(0.5) };
    },
  };
  const set = (count: number, side: number): AnnotatedSet => ({
    count,
    channels: 1,
    classes: 2,
    spatial: [side, side],
    images: new Float32Array(count * side * side),
    labels: [new Uint8Array(count * side * side)],
    present: new Uint8Array(count).fill(1),
    consensus: new Uint8Array(count * side * side),
    annotatorNames: ['a'],
  });
  const big = await evaluateModel(model, set(20, 256), { annotators: false });
  t.same(calls.map((s) => s[0]), [16, 4], '20 images of 256^2: 16, then 4');
  t.equal(big.images, 20);
  calls.length = 0;
  await evaluateModel(model, set(70, 32));
  t.same(calls.map((s) => s[0]), [64, 6], '70 images of 32^2: 64 a call, as before');
  calls.length = 0;
  await evaluateModel(model, set(3, 2048), { annotators: false });
  t.same(calls.map((s) => s[0]), [1, 1, 1], 'images over the budget: one a call');
  calls.length = 0;
  await evaluateModel(model, set(20, 256), { batchSize: 20, annotators: false });
  t.same(calls.map((s) => s[0]), [20], 'batchSize given: kept');
  // 1.5 scored images 0 and "1.5" and skipped image 2; 0, -1 and NaN asked for empty batches.
  calls.length = 0;
  for (const batchSize of [1.5, 0, -1, NaN]) {
    await t.rejects(evaluateModel(model, set(3, 4), { batchSize }), new RegExp(`batchSize ${batchSize} must be an integer >= 1`));
  }
  t.same(calls, [], 'refused before any prediction');
});

t.test('evaluateVolumes: BraTS regions need a 4-class model', async (t) => {
  // A 3-class model's maps (and references, checked against its classes) never hold a 3: ET
  // scored Dice 1 and HD95 0 on every volume, and WT and TC were unions of classes that mean
  // something else, silently.
  const model: SlidingWindowModel = {
    config: { ndim: 3, inChannels: 1, classes: 3, annotators: 1, depth: 1 },
    predict: async (_images: Float32Array, shape: number[]) => ({ probs: new Float32Array(3 * shape[0] * shape[2] * shape[3] * shape[4]).fill(1 / 3) }),
  };
  const volume = { id: 'v', images: new Float32Array(8), extent: { d: 2, h: 2, w: 2 }, consensus: new Uint8Array(8), labels: [], present: new Uint8Array(0) };
  await t.rejects(
    evaluateVolumes(model, ['v'], async () => volume, { patch: [2, 2, 2], annotators: false, annotatorNames: ['a'], bratsRegions: true }),
    /bratsRegions: the BraTS regions need a model of 4 classes \(0\.\.3\), this one has 3/,
  );
  const plain = await evaluateVolumes(model, ['v'], async () => volume, { patch: [2, 2, 2], annotators: false, annotatorNames: ['a'] });
  t.equal(plain.images, 1, 'without the regions it scores');
});

t.test('cmseg eval on BraTS cases of anisotropic voxels: region Dice and HD95 = nibabel + SciPy on the NIfTI predict writes', { skip: missingPythonModules('numpy', 'scipy', 'nibabel') }, async (t) => {
  // End to end: pixdim (x, y, z) = (1, 1.5, 3) mm read from the files, carried to the HD95 as
  // [d, h, w] = [z, y, x]; a random tiny model, whose noisy maps have every region.
  const dir = tempDir(t);
  const cli = (args: string[]) => runCli(args, dir);
  const phantom = await cli(['phantom', 'brats', '--cases', '2', '--out', 'brats', '--size', '24,24,16', '--seed', '2']);
  t.equal(phantom.exitCode, 0, phantom.stderr);
  runPython(
    `
import glob, sys
import numpy as np, nibabel as nib
for f in glob.glob(sys.argv[1] + "/*/*.nii.gz"):
    im = nib.load(f)
    a = im.affine.copy()
    a[:3, :3] = a[:3, :3] @ np.diag([1.0, 1.5, 3.0])
    out = nib.Nifti1Image(np.asanyarray(im.dataobj), a, im.header.copy())
    out.set_qform(a, code=1)
    out.set_sform(a, code=1)
    nib.save(out, f)
`,
    [path.join(dir, 'brats')],
  );
  const model = createModel({ ndim: 3, inChannels: 4, classes: 4, annotators: 3, depth: 2, baseChannels: 4, seed: 5 });
  await saveCheckpoint(model, path.join(dir, 'model.safetensors'));
  await model.dispose();
  const evaluated = await cli(['eval', '--checkpoint', 'model.safetensors', '--data', 'brats', '--patch', '8', '--no-cms', '--out', 'eval.json']);
  t.equal(evaluated.exitCode, 0, evaluated.stderr);
  const predicted = await cli(['predict', '--checkpoint', 'model.safetensors', '--data', 'brats', '--patch', '8', '--no-cms', '--probs', 'none', '--out', 'pred']);
  t.equal(predicted.exitCode, 0, predicted.stderr);
  const want = runPythonJson<Record<string, { dice: Record<string, number>; hd95: Record<string, number | null> }>>(
    `
import json, sys
import numpy as np, nibabel as nib
from scipy.ndimage import binary_erosion, distance_transform_edt, generate_binary_structure
data, pred, ids = sys.argv[1], sys.argv[2], sys.argv[3:]
cross = generate_binary_structure(3, 1)
def sds(a, b, sp):
    return distance_transform_edt(~(b ^ binary_erosion(b, structure=cross)), sampling=sp)[a ^ binary_erosion(a, structure=cross)]
def hd95(p, y, sp):
    if not p.any() and not y.any(): return 0.0
    if not p.any() or not y.any(): return None
    return float(max(np.percentile(sds(p, y, sp), 95), np.percentile(sds(y, p, sp), 95)))
def dice(p, y):
    s = p.sum() + y.sum()
    return 1.0 if s == 0 else float(2 * (p & y).sum() / s)
out = {}
for i in ids:
    seg = nib.load(f"{data}/{i}/{i}_seg.nii.gz")
    y = np.asanyarray(seg.dataobj).astype(int)
    p = np.asanyarray(nib.load(f"{pred}/{i}_consensus.nii.gz").dataobj).astype(int)
    sp = [float(z) for z in seg.header.get_zooms()[:3]]
    regions = {"wholeTumour": [1, 2, 4], "tumourCore": [1, 4], "enhancingTumour": [4]}
    out[i] = {"dice": {k: dice(np.isin(p, r), np.isin(y, r)) for k, r in regions.items()},
              "hd95": {k: hd95(np.isin(p, r), np.isin(y, r), sp) for k, r in regions.items()}, "zooms": sp}
print(json.dumps(out))
`,
    [path.join(dir, 'brats'), path.join(dir, 'pred'), 'BraTS2021_00000', 'BraTS2021_00001'],
  );
  const record = JSON.parse(fs.readFileSync(path.join(dir, 'eval.json'), 'utf8'));
  t.equal(record.metrics.perCase.length, 2);
  let finite = 0;
  for (const c of record.metrics.perCase) {
    for (const region of ['wholeTumour', 'tumourCore', 'enhancingTumour']) {
      near(t, c.regions[region], want[c.id].dice[region], `${c.id} ${region} Dice`, 1e-12);
      const w = want[c.id].hd95[region];
      if (w === null) t.equal(c.hd95[region], null, `${c.id} ${region} HD95 undefined (JSON null)`);
      else near(t, c.hd95[region], w, `${c.id} ${region} HD95 (mm)`, 1e-9);
      if (w !== null && w > 0) finite++;
    }
  }
  t.ok(finite >= 3, `HD95 measured (not just 0 or undefined) in ${finite} of 6 case regions`);
});

t.test('fusedLabelRows: images no annotator labelled have no fused target and are not scored as misses', async (t) => {
  // Two annotators on images 0 and 1, none on image 2 (its fused maps are all "no vote").
  const u8 = (...v: number[]) => Uint8Array.from(v);
  const set: AnnotatedSet = {
    count: 3,
    channels: 1,
    classes: 2,
    spatial: [2, 2],
    images: new Float32Array(12),
    consensus: u8(0, 1, 1, 0, 1, 1, 0, 0, 0, 1, 0, 0),
    labels: [u8(0, 1, 1, 0, 1, 0, 0, 0, 255, 255, 255, 255), u8(0, 1, 0, 0, 1, 1, 0, 0, 255, 255, 255, 255)],
    present: u8(1, 1, 1, 1, 0, 0),
    annotatorNames: ['a', 'b'],
  };
  const rows = fusedLabelRows(set);
  // Mean labels (ties to foreground) = the consensus on images 0 and 1: Dice 1. Mode labels
  // (ties to background): {0,1,0,0} and {1,0,0,0}, foreground Dice 2*1/(1+2) on each.
  t.same([rows.mean.averageDice.mean, rows.mean.averageDice.count], [1, 2], 'mean labels: 1 over the 2 labelled images');
  t.ok(Math.abs(rows.mode.averageDice.mean - 2 / 3) < 1e-12 && rows.mode.averageDice.count === 2, `mode labels: 2/3 over 2 images (${rows.mode.averageDice.mean}, ${rows.mode.averageDice.count})`);
  t.equal(rows.mode.totalDice.mean, 0.75, 'Total Dice 3/4 on each');
  const none = fusedLabelRows({ ...set, present: u8(0, 0, 0, 0, 0, 0), labels: set.labels.map((m) => m.map(() => 255)) });
  t.same([none.mean.averageDice.count, none.mode.totalDice.count], [0, 0], 'no labelled image: nothing scored (n/a)');
});

t.test('GED with partly unlabelled annotations: every pair compared on the same voxels, never negative', async (t) => {
  const u8 = (...v: number[]) => Uint8Array.from(v);
  // S = {10, 00}, Y = {·0} (voxel 0 unlabelled). Pairs with Y saw voxel 1 only (d = 0) while
  // S1-S2 saw both (d = 1): GED = 0 - 2*1/4 - 0 = -0.5, below the 0 of two equal sets.
  // On the voxels Y labels (voxel 1) all four maps agree: GED = 0.
  const partial = generalisedEnergyDistance({ samples: [u8(1, 0), u8(0, 0)], observed: [u8(255, 0)], n: 1, classes: 2 });
  t.equal(partial.perImage[0], 0, 'compared on voxel 1 only');
  // A present annotation that labels no voxel leaves nothing to compare: NaN (left out), not -0.5.
  const blank = generalisedEnergyDistance({ samples: [u8(1, 0), u8(0, 0)], observed: [u8(255, 255)], n: 1, classes: 2 });
  t.ok(Number.isNaN(blank.perImage[0]), `no voxel labelled by every annotation: NaN (got ${blank.perImage[0]})`);
  t.equal(blank.ged.count, 0);
  // Y1 = 11·0, Y2 = 100·: both label voxels 0 and 1, where S1 = 11, S2 = 00 and Y1 = 11, Y2 = 10:
  // the hand case of test/metrics.test.ts ('GED by hand'), 0.5; S's values elsewhere do not count.
  const two = generalisedEnergyDistance({ samples: [u8(1, 1, 1, 1), u8(0, 0, 1, 0)], observed: [u8(1, 1, 255, 0), u8(1, 0, 0, 255)], n: 1, classes: 2 });
  t.ok(Math.abs(two.perImage[0] - 0.5) < 1e-12, `two partial annotations: 0.5 (got ${two.perImage[0]})`);
  // Dense annotations: unchanged (the whole image).
  const dense = generalisedEnergyDistance({ samples: [u8(1, 1, 0, 0), u8(0, 0, 0, 0)], observed: [u8(1, 1, 0, 0), u8(1, 0, 0, 0)], n: 1, classes: 2 });
  t.ok(Math.abs(dense.perImage[0] - 0.5) < 1e-12, 'dense: 0.5 as by hand');
});

t.test('evaluateVolumes checks a volume\'s labels before predicting it, naming the volume', async (t) => {
  // A BraTS case took 38 s to predict on the CPU before a bad label or size was found, and the
  // message ("truth: label 7 at index 5 >= classes (4)") did not say which volume.
  let predictions = 0;
  const model: SlidingWindowModel = {
    config: { ndim: 3, inChannels: 1, classes: 4, annotators: 2, depth: 1 },
    predict: async (_images: Float32Array, shape: number[]) => {
      predictions++;
      const n = shape[0];
      const V = shape[2] * shape[3] * shape[4];
      return { probs: new Float32Array(4 * n * V).fill(0.25), cms: new Float32Array(2 * 16 * n * V).fill(0.25), annotatorProbs: new Float32Array(2 * 4 * n * V).fill(0.25) };
    },
  };
  const good = () => ({ id: 'case-1', images: new Float32Array(8), extent: { d: 2, h: 2, w: 2 }, consensus: new Uint8Array(8), labels: [new Uint8Array(8), new Uint8Array(8)], present: Uint8Array.from([1, 1]) });
  const run = (volume: ReturnType<typeof good>, annotators = true) =>
    evaluateVolumes(model, ['case-1'], async () => volume, { patch: [2, 2, 2], annotators, annotatorNames: ['a', 'b'] });
  const badLabel = good();
  badLabel.consensus[5] = 7;
  await t.rejects(run(badLabel), /volume case-1: consensus: label 7 at index 5 >= classes \(4\)/);
  await t.rejects(run(badLabel, false), /volume case-1: consensus: label 7 at index 5/, 'also without the annotators');
  const shortConsensus = { ...good(), consensus: new Uint8Array(7) };
  await t.rejects(run(shortConsensus), /volume case-1: consensus has 7 voxels, its extent 2x2x2 has 8/);
  const badAnnotator = good();
  badAnnotator.labels[1][2] = 4;
  await t.rejects(run(badAnnotator), /volume case-1: labels\[1\]: label 4 at index 2 >= classes \(4\)/);
  const shortLabels = good();
  shortLabels.labels[0] = new Uint8Array(4);
  await t.rejects(run(shortLabels), /volume case-1: labels\[0\] has 4 voxels, its extent 2x2x2 has 8/);
  await t.rejects(run({ ...good(), present: Uint8Array.from([1]) }), /volume case-1: present has 1 entries, the model 2 annotators/);
  t.equal(predictions, 0, 'nothing predicted');
  const fine = await run(good());
  t.equal(fine.images, 1, 'a good volume scores');
  t.ok(predictions > 0);
});

t.test('argmaxClasses: the class of highest probability per voxel; a probs length that is no multiple of n*classes is named', async (t) => {
  // n 2, classes 3, V 2: [image][class][voxel]
  const probs = Float32Array.from([0.2, 0.1, 0.5, 0.3, 0.3, 0.6, /* image 1 */ 0.1, 0.7, 0.1, 0.2, 0.8, 0.1]);
  t.same(Array.from(argmaxClasses(probs, 2, 3)), [1, 2, 2, 0]);
  t.throws(() => argmaxClasses(probs.subarray(1), 2, 3), /argmaxClasses: probs has 11 elements, not a multiple of n\*classes = 2\*3/);
  t.throws(() => argmaxClasses(probs, 0, 3), /n = 0 must be an integer >= 1/);
  t.throws(() => argmaxClasses(probs, 2, 2.5), /classes = 2.5 must be an integer in 1..256/);
});

t.test('every Markdown table escapes | in names, and a NaN spread prints n/a', async (t) => {
  const cells = (line: string) => line.replace(/\\\|/g, '').split('|').length;
  const table = markdownTable(['name', 'value'], [['a|b', '1'], ['c\\|d', '2'], ['two\nlines', '3']]);
  const lines = table.split('\n');
  t.equal(lines.length, 5, 'a name with a line break stays on one row');
  for (const line of lines) t.equal(cells(line), cells(lines[0]), `as many cells as the header: ${line}`);
  t.equal(lines[2], '| a\\|b      | 1     |');
  t.equal(lines[3], '| c\\\\\\|d    | 2     |', 'a backslash before a bar is doubled, so the bar stays escaped');
  // formatAnnotatorCms (public) builds its header from the annotator's name.
  const cm = formatAnnotatorCms([{ trueMatrix: [[0.9, 0.2], [0.1, 0.8]], estimatedMatrix: [[0.85, 0.25], [0.15, 0.75]] }], () => 'rater|1', (c) => `class ${c}`);
  const header = cm.split('\n').find((l) => l.startsWith('| rater'))!;
  t.equal(cells(header), 5, `three cells: ${header}`);
  t.equal(formatMeanStd({ mean: 0.5, std: NaN, count: 2 }), '0.5000 ± n/a');
  // One value: its mean alone (a std of 0 over one volume is no spread).
  t.equal(formatMeanStd({ mean: 0.5, std: NaN, count: 1 }), '0.5000');
  t.equal(formatMeanStd({ mean: 0.81234, std: 0, count: 1 }), '0.8123');
});

t.test('Markdown tables are padded into columns (code points, not UTF-16 units)', async (t) => {
  const table = markdownTable(['annotator', 'Dice'], [['Zoë', '0.9000 ± 0.0100'], ['a', 'n/a'], ['𝒜', '1']]);
  t.equal(
    table,
    ['| annotator | Dice            |', '| --------- | --------------- |', '| Zoë       | 0.9000 ± 0.0100 |', '| a         | n/a             |', '| 𝒜         | 1               |'].join('\n'),
  );
  t.equal(markdownTable(['a', 'b'], [['1', '2']]), '| a   | b   |\n| --- | --- |\n| 1   | 2   |', 'columns at least three wide: the rule row stays ---');
});
