// `cmseg predict` and `cmseg eval` on new data (--data), for any checkpoint: models made and
// saved through the API (createModel + trainStep + saveCheckpoint, no training recipe) on a
// `cmseg simulate` folder, a plain folder of PNGs of an odd size (padded), and `cmseg phantom
// brats` cases (NIfTI back on each case's grid, checked with our own reader); trainer
// checkpoints on folders that are not their run's; and the one-line errors. Every model is
// tiny (base width 4, depth 2 or 3) and trained for a step or three: only the plumbing is
// checked, not the quality. Exact check: paddedToDepth's output equals the crop of the
// model's prediction on the edge-padded input (bit for bit: the same native call).
import t from 'tap';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { runCli } from './helpers/cli';
import { annotatorFileNames } from '../src/cli/predict';
import { createModel, Model, setNumThreads } from '../src/model/model';
import { loadCheckpoint, saveCheckpoint } from '../src/model/checkpoint';
import { type Matrix4, readNifti, writeNifti } from '../src/data/nifti';
import { readSafetensors } from '../src/data/safetensors';
import { readPngSync, writePngSync } from '../src/data/png';
import { paddedToDepth } from '../src/train/evaluate';
import { slidingWindowPredict } from '../src/model/sliding-window';
import { casesInData } from '../src/data/brats-cases';
import { BRATS_GEOMETRY_TOLERANCE_MM } from '../src/data/brats';
import { checkReleasedPrediction, cropOfProbs, RELEASE_LABELS } from './helpers/brats-predictions';
import { unpadded } from './helpers/tables';

setNumThreads(1);
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cmseg-predict-any-'));
t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
const cli = (args: string[]) => runCli(args, dir);
const json = (file: string) => JSON.parse(fs.readFileSync(path.join(dir, file), 'utf8'));
const SIM_ANNOTATORS = ['fracture', 'good', 'over', 'under'];

/** A few Adam steps of a tiny model on random images with thresholded labels, saved with `extra`. */
async function apiCheckpoint(file: string, config: { ndim: 2 | 3; inChannels: number; classes: number; annotators: number; depth: number }, size: number[], extra?: Record<string, unknown>): Promise<void> {
  const model = createModel({ ...config, baseChannels: 4, seed: 3, optimizer: { kind: 'adam', lr: 1e-3 } });
  const V = size.reduce((a, b) => a * b, 1);
  const N = 2;
  const images = Float32Array.from({ length: N * config.inChannels * V }, (_, i) => ((i * 7919) % 101) / 100);
  const labels = Array.from({ length: config.annotators }, (_, r) => Uint8Array.from({ length: N * V }, (_, i) => (images[i] > 0.3 + 0.1 * r ? (i % config.classes) : 0)));
  for (let step = 0; step < 3; step++) await model.trainStep({ images, shape: [N, config.inChannels, ...size], labels });
  await saveCheckpoint(model, path.join(dir, file), extra);
  await model.dispose();
}

t.before(async () => {
  for (const [out, seed] of [['sim', '1'], ['sim2', '2']]) {
    const r = await cli(['simulate', '--out', out, '--count', '6', '--seed', seed]);
    if (r.exitCode !== 0) throw new Error(r.stderr);
  }
  // A plain folder of 30x30 PNGs (no images/, labels/ or consensus/): a depth-3 U-Net takes multiples of 4.
  fs.mkdirSync(path.join(dir, 'plain'));
  for (let n = 0; n < 3; n++) {
    const data = Uint8Array.from({ length: 900 }, (_, i) => ((i % 30) - 15) ** 2 + (Math.floor(i / 30) - 15) ** 2 < 40 + 20 * n ? 220 : 20);
    writePngSync(path.join(dir, 'plain', `scan-${n}.png`), { width: 30, height: 30, channels: 1, data });
  }
  await apiCheckpoint('api2d.safetensors', { ndim: 2, inChannels: 1, classes: 2, annotators: 4, depth: 3 }, [32, 32]);
  await apiCheckpoint('api2d-named.safetensors', { ndim: 2, inChannels: 1, classes: 2, annotators: 4, depth: 3 }, [32, 32], { annotatorNames: ['good', 'over', 'under', 'fracture'] });
  const phantom = await cli(['phantom', 'brats', '--cases', '2', '--out', 'brats', '--size', '32,32,24', '--seed', '4']);
  if (phantom.exitCode !== 0) throw new Error(phantom.stderr);
  await apiCheckpoint('api3d.safetensors', { ndim: 3, inChannels: 4, classes: 4, annotators: 3, depth: 2 }, [8, 8, 8]);
  await apiCheckpoint('api3d-1ch.safetensors', { ndim: 3, inChannels: 1, classes: 4, annotators: 3, depth: 2 }, [8, 8, 8]);
});

t.test('paddedToDepth: the crop of the prediction on the edge-padded input', async (t) => {
  const model = createModel({ ndim: 2, inChannels: 1, classes: 3, annotators: 2, depth: 3, baseChannels: 4, seed: 1 });
  t.teardown(() => model.dispose());
  const [H, W, H1, W1] = [5, 6, 8, 8];
  const images = Float32Array.from({ length: 2 * H * W }, (_, i) => Math.sin(i));
  const padded = new Float32Array(2 * H1 * W1);
  for (let n = 0; n < 2; n++) {
    for (let y = 0; y < H1; y++) for (let x = 0; x < W1; x++) padded[(n * H1 + y) * W1 + x] = images[(n * H + Math.min(y, H - 1)) * W + Math.min(x, W - 1)];
  }
  const full = await model.predict(padded, [2, 1, H1, W1], { cms: true, annotatorProbs: true });
  const got = await paddedToDepth(model as Model).predict(images, [2, 1, H, W], { cms: true, annotatorProbs: true });
  const crop = (a: Float32Array, planes: number) => {
    const out = new Float32Array(planes * H * W);
    for (let p = 0; p < planes; p++) for (let y = 0; y < H; y++) for (let x = 0; x < W; x++) out[(p * H + y) * W + x] = a[(p * H1 + y) * W1 + x];
    return out;
  };
  t.same(got.probs, crop(full.probs, 2 * 3), 'probabilities');
  t.same(got.cms, crop(full.cms!, 2 * 2 * 9), 'CMs');
  t.same(got.annotatorProbs, crop(full.annotatorProbs!, 2 * 2 * 3), 'q_r');
  t.same((got as { probsShape?: number[] }).probsShape, [2, 3, H, W], 'the shapes say the input size');
  const fits = await paddedToDepth(model as Model).predict(padded, [2, 1, H1, W1]);
  t.same(fits.probs, full.probs, 'an input that fits goes through untouched');
});

t.test('an API 2D model on a simulate folder: every image, its annotators, eval against consensus/', async (t) => {
  const pr = await cli(['predict', '--checkpoint', 'api2d.safetensors', '--data', 'sim', '--out', 'pred-sim']);
  t.equal(pr.exitCode, 0, pr.stderr);
  t.match(pr.stderr, /^note: api2d\.safetensors records no annotator names: labels\/'s folders, in sorted order \(fracture, good, over, under\), are taken as its CM heads 0\.\.3\n$/);
  // Per image: input, truth, consensus, sheet, and an estimate and a CM for each of 4 annotators.
  t.match(pr.stdout, /^wrote 72 PNG files for 6 images of sim\noutputs:\n  pictures +pred-sim\n  legend +pred-sim\/README\.txt\n$/);
  for (const suffix of ['input', 'truth', 'consensus', 'sheet', ...SIM_ANNOTATORS.flatMap((a) => [`annotator-${a}`, `cm-${a}`])]) {
    t.ok(fs.existsSync(path.join(dir, 'pred-sim', `mnist-00005-${suffix}.png`)), `mnist-00005-${suffix}.png`);
  }
  const readme = fs.readFileSync(path.join(dir, 'pred-sim', 'README.txt'), 'utf8');
  t.match(readme, /^Predictions of .*api2d\.safetensors \(model, step 3\) on every one of the 6 images in .*sim\/images/);
  t.match(readme, /annotators: fracture, good, over, under\n/);
  const input = readPngSync(path.join(dir, 'pred-sim', 'mnist-00000-input.png'));
  t.same([input.width, input.height], [256, 256], '32x32 images at scale 8');

  // Names recorded in the checkpoint pick labels/'s folders by name, in the model's order.
  const named = await cli(['predict', '--checkpoint', 'api2d-named.safetensors', '--data', 'sim', '--out', 'pred-named', '--count', '2']);
  t.equal(named.exitCode, 0, named.stderr);
  t.equal(named.stderr, '');
  t.match(named.stdout, /^wrote 24 PNG files for 2 images of sim\n/);
  t.match(fs.readFileSync(path.join(dir, 'pred-named', 'README.txt'), 'utf8'), /annotators: good, over, under, fracture\n/);

  const ev = await cli(['eval', '--checkpoint', 'api2d.safetensors', '--data', 'sim']);
  t.equal(ev.exitCode, 0, ev.stderr);
  t.match(ev.stdout, /^model at step 3, 6 images of sim:\n6 images/);
  t.match(unpadded(ev.stdout), /\| CM estimation error \(RMSE\) \| /);
  t.match(ev.stdout, /outputs:\n  metrics +eval-sim-api2d\.json\n$/);
  const record = json('eval-sim-api2d.json');
  t.equal(record.method, null);
  t.equal(record.split, 'all');
  t.equal(record.metrics.images, 6);
  t.equal(record.metrics.reference, undefined, 'against the expert consensus');
  t.ok(record.metrics.cmError.mean > 0);
  t.same(record.metrics.annotatorNames, SIM_ANNOTATORS);
  t.ok(record.fusedLabels.mode.averageDice.mean > 0.5);

  // Without consensus/: the annotators' majority vote.
  fs.cpSync(path.join(dir, 'sim'), path.join(dir, 'sim-nocons'), { recursive: true });
  fs.rmSync(path.join(dir, 'sim-nocons', 'consensus'), { recursive: true });
  const vote = await cli(['eval', '--checkpoint', 'api2d-named.safetensors', '--data', 'sim-nocons', '--out', 'vote.json']);
  t.equal(vote.exitCode, 0, vote.stderr);
  t.match(vote.stdout, /against the annotators' majority vote/);
  t.equal(json('vote.json').metrics.reference, 'majority vote');
});

t.test('an API 2D model on a plain folder of odd-sized PNGs: padded, no labels', async (t) => {
  const pr = await cli(['predict', '--checkpoint', 'api2d.safetensors', '--data', 'plain', '--out', 'pred-plain']);
  t.equal(pr.exitCode, 0, pr.stderr);
  t.match(pr.stderr, /^note: the images are 30x30 pixels, not multiples of 2\^\(depth-1\) = 4 \(depth 3\): each is padded to 32x32 by repeating its edge pixels, and the predictions are cropped back\n$/);
  // Per image: input, consensus, sheet, and 4 estimates and 4 CMs (annotator0..3); no truth.
  t.match(pr.stdout, /^wrote 33 PNG files for 3 images of plain\n/);
  for (const suffix of ['input', 'consensus', 'sheet', 'annotator-annotator0', 'cm-annotator3']) t.ok(fs.existsSync(path.join(dir, 'pred-plain', `scan-2-${suffix}.png`)), `scan-2-${suffix}.png`);
  t.notOk(fs.existsSync(path.join(dir, 'pred-plain', 'scan-2-truth.png')));
  const consensus = readPngSync(path.join(dir, 'pred-plain', 'scan-0-consensus.png'));
  t.same([consensus.width, consensus.height], [240, 240], 'cropped back to 30x30 (scale 8)');
  const readme = fs.readFileSync(path.join(dir, 'pred-plain', 'README.txt'), 'utf8');
  t.match(readme, /annotators: annotator0, annotator1, annotator2, annotator3 \(the checkpoint records no names: its CM heads in order\)/);
  t.match(readme, /no consensus\/: no truth pictures/);

  // The same folder again with names recorded: the earlier annotator0..3 pictures are said, and kept.
  const named = await cli(['predict', '--checkpoint', 'api2d-named.safetensors', '--data', 'plain', '--out', 'pred-plain', '--no-cms']);
  t.equal(named.exitCode, 0, named.stderr);
  t.match(named.stderr, /^note: pred-plain also holds 24 file\(s\) of an earlier prediction that this one did not write, left as they were: scan-0-annotator-annotator0\.png, scan-0-annotator-annotator1\.png, scan-0-annotator-annotator2\.png, scan-0-annotator-annotator3\.png, \.\.\. \(20 more\)$/m);
  t.ok(fs.existsSync(path.join(dir, 'pred-plain', 'scan-2-cm-annotator3.png')), 'kept');

  const ev = await cli(['eval', '--checkpoint', 'api2d.safetensors', '--data', 'plain']);
  t.equal(ev.exitCode, 1);
  t.match(ev.stderr, /^cmseg: error: plain has no consensus\/ and no labels\/<annotator>\/ maps of this model's annotators \(annotator0, annotator1, annotator2, annotator3\): eval needs a reference to score against \(cmseg predict draws predictions without one\)\n$/);
});

t.test('an API 3D model on phantom BraTS cases: NIfTI on the original grid', async (t) => {
  const pr = await cli(['predict', '--checkpoint', 'api3d.safetensors', '--data', 'brats', '--patch', '16', '--out', 'pred-3d']);
  t.equal(pr.exitCode, 0, pr.stderr);
  // Per case: consensus, probabilities and 3 annotators; a slice picture and 3 CM pictures.
  t.match(pr.stdout, /^predicted 2 case\(s\) from the BraTS folder brats: 10 NIfTI volumes and 8 PNG pictures \(labels in BraTS 2021 numbering\)\n/);
  for (const id of ['BraTS2021_00000', 'BraTS2021_00001']) {
    const t1 = await readNifti(path.join(dir, 'brats', id, `${id}_t1.nii.gz`));
    const consensus = await readNifti(path.join(dir, 'pred-3d', `${id}_consensus.nii.gz`));
    t.same(consensus.dims, t1.dims, `${id}: consensus on the case's grid`);
    t.same(consensus.affine, t1.affine, `${id}: the case's affine`);
    t.ok([...consensus.data].every((x) => [0, 1, 2, 4].includes(Number(x))), `${id}: labels in the 2021 numbering`);
    const probs = await readNifti(path.join(dir, 'pred-3d', `${id}_probs.nii.gz`));
    t.same(probs.dims, [...t1.dims, 4], `${id}: one probability volume per class`);
    t.same(probs.affine, t1.affine);
    for (let r = 0; r < 3; r++) t.same((await readNifti(path.join(dir, 'pred-3d', `${id}_annotator-annotator${r}.nii.gz`))).dims, t1.dims, `${id}: annotator ${r}`);
    // Read back: the consensus is the 2021 label of the most probable class at every voxel, background outside the crop.
    const { crop } = await casesInData(path.join(dir, 'brats'), BRATS_GEOMETRY_TOLERANCE_MM).load(id);
    const released = await checkReleasedPrediction(t, path.join(dir, 'pred-3d'), id, crop);
    t.ok(released.argmaxCounts.every((n) => n > 0), `${id}: every class is the most probable somewhere in the crop (${released.argmaxCounts}), so each label is checked`);
  }
  t.match(fs.readFileSync(path.join(dir, 'pred-3d', 'README.txt'), 'utf8'), /Sliding windows of 16x16x16 voxels[\s\S]*annotators: 0 = annotator0, 1 = annotator1, 2 = annotator2\n/);

  // One case folder, with the default window (64, one padded window here).
  const one = await cli(['predict', '--checkpoint', 'api3d.safetensors', '--data', 'brats/BraTS2021_00001', '--out', 'pred-one']);
  t.equal(one.exitCode, 0, one.stderr);
  t.match(one.stdout, /^predicted 1 case\(s\) from the case folder brats\/BraTS2021_00001:/);
  t.match(fs.readFileSync(path.join(dir, 'pred-one', 'README.txt'), 'utf8'), /Sliding windows of 64x64x64 voxels/);

  const ev = await cli(['eval', '--checkpoint', 'api3d.safetensors', '--data', 'brats', '--patch', '16']);
  t.equal(ev.exitCode, 0, ev.stderr);
  t.match(ev.stderr, /^\[1\/2\] BraTS2021_00000: total Dice \d\.\d{4}, Dice WT\/TC\/ET \d\.\d{3}\/\d\.\d{3}\/\d\.\d{3}, HD95 ([\d.]+|-)\/([\d.]+|-)\/([\d.]+|-) mm\n\[2\/2\] BraTS2021_00001: total Dice/);
  t.match(ev.stdout, /^model at step 3, 2 case\(s\) from the BraTS folder brats:\n2 volumes/);
  t.match(unpadded(ev.stdout), /\| whole tumour \(1, 2, 3\) \| \d\.\d{4} ± /);
  t.notMatch(ev.stdout, /CM estimation error/, 'raw cases have no annotators');
  t.equal(json('eval-brats-api3d.json').metrics.images, 2);

  // HD95 is in mm: the same case with 2 mm voxels (every file's affine, hence pixdim, doubled)
  // has the same predictions and twice the distances.
  const case0 = path.join(dir, 'brats', 'BraTS2021_00000');
  const twice = path.join(dir, 'brats-2mm', 'BraTS2021_00000');
  fs.mkdirSync(twice, { recursive: true });
  for (const file of fs.readdirSync(case0)) {
    const v = await readNifti(path.join(case0, file));
    const affine = v.affine.map((row) => row.map((x, c) => (c < 3 ? 2 * x : x))) as Matrix4;
    await writeNifti(path.join(twice, file), { dims: v.dims, data: v.data, affine }, { datatype: file.includes('seg') ? 'uint8' : 'float32' });
  }
  const one1 = await cli(['eval', '--checkpoint', 'api3d.safetensors', '--data', 'brats/BraTS2021_00000', '--patch', '16', '--out', 'hd-1mm.json']);
  const one2 = await cli(['eval', '--checkpoint', 'api3d.safetensors', '--data', 'brats-2mm/BraTS2021_00000', '--patch', '16', '--out', 'hd-2mm.json']);
  t.equal(one1.exitCode + one2.exitCode, 0, one1.stderr + one2.stderr);
  const [h1, h2] = [json('hd-1mm.json'), json('hd-2mm.json')].map((j) => j.metrics.perCase[0].hd95);
  t.same(json('hd-2mm.json').metrics.perCase[0].regions, json('hd-1mm.json').metrics.perCase[0].regions, 'the same predictions (Dice)');
  for (const region of ['wholeTumour', 'tumourCore', 'enhancingTumour'])
    if (h1[region] !== null) t.ok(Math.abs(h2[region] - 2 * h1[region]) < 1e-9, `${region}: HD95 ${h2[region]} mm at 2 mm, ${h1[region]} mm at 1 mm`);
  t.ok(h1.wholeTumour > 0, 'a distance to double');

  // A cache of the same cases carries 3 synthetic annotators, as many as the model's CM heads: they are scored too.
  const prepared = await cli(['prepare', '--data', 'brats', '--out', 'cache', '--quiet']);
  t.equal(prepared.exitCode, 0, prepared.stderr);
  const cached = await cli(['eval', '--checkpoint', 'api3d.safetensors', '--data', 'cache', '--patch', '16', '--out', 'cache-eval.json']);
  t.equal(cached.exitCode, 0, cached.stderr);
  t.match(cached.stdout, /^model at step 3, 2 case\(s\) from the cache at cache:\n/);
  t.match(unpadded(cached.stdout), /\| CM estimation error \(RMSE\) \| /);
  t.same(json('cache-eval.json').metrics.annotatorNames, ['over', 'under', 'wrong']);
});

t.test('3D predictions in the release\'s labels: class 3 (ET) written as 4, probabilities in class order', async (t) => {
  // api3d with its segmentation head's bias for class 3 raised by 1: ET is the most probable
  // class at nearly every voxel of the crop (every logit of class 3 rises by 1, the others stay).
  const base = await loadCheckpoint(path.join(dir, 'api3d.safetensors'));
  const weights = base.getWeights();
  weights['seg.bias'] = Float32Array.from(weights['seg.bias'], (b, k) => (k === 3 ? b + 1 : b));
  base.setWeights(weights);
  await saveCheckpoint(base, path.join(dir, 'api3d-et.safetensors'));
  await base.dispose();
  const model = await loadCheckpoint(path.join(dir, 'api3d-et.safetensors'));
  t.teardown(() => model.dispose());

  const pr = await cli(['predict', '--checkpoint', 'api3d-et.safetensors', '--data', 'brats', '--patch', '16', '--out', 'pred-et']);
  t.equal(pr.exitCode, 0, pr.stderr);
  const cases = casesInData(path.join(dir, 'brats'), BRATS_GEOMETRY_TOLERANCE_MM);
  for (const id of cases.ids) {
    const c = await cases.load(id);
    const released = await checkReleasedPrediction(t, path.join(dir, 'pred-et'), id, c.crop);
    const inCrop = c.crop.d * c.crop.h * c.crop.w;
    t.ok(released.argmaxCounts[3] > inCrop / 2, `${id}: class 3 is the most probable at ${released.argmaxCounts[3]} of ${inCrop} voxels of the crop, each read back as 4`);
    const consensus = (await readNifti(path.join(dir, 'pred-et', `${id}_consensus.nii.gz`))).raw;
    const labelCount = (label: number) => Array.from(consensus as ArrayLike<number>).filter((x) => Number(x) === label).length;
    t.equal(labelCount(4), released.argmaxCounts[3], `${id}: as many voxels labelled 4 as voxels where ET wins`);
    t.equal(labelCount(3), 0, `${id}: no label 3 in a BraTS 2021 case`);

    // The model's own sliding-window prediction through the API (the window predict uses):
    // the written planes are its classes 0..3 in order, and each annotator's volume is the
    // release label of argmax q_r inside the crop, 0 outside it.
    const p = await slidingWindowPredict(model, c.images, c.extent, { patch: [16, 16, 16], annotatorProbs: true });
    const written = cropOfProbs(released.probs, released.dims, c.crop);
    let apart = 0;
    for (let i = 0; i < written.length; i++) apart = Math.max(apart, Math.abs(written[i] - p.probs[i]));
    t.ok(apart < 1e-6, `${id}: the probability volumes are the model's classes 0..3 in order (max diff ${apart.toExponential(2)})`);
    const [X, Y] = released.dims;
    for (let r = 0; r < 3; r++) {
      const annotator = (await readNifti(path.join(dir, 'pred-et', `${id}_annotator-annotator${r}.nii.gz`))).raw;
      const q = p.annotatorProbs!;
      let wrong = 0;
      let nonzeroInside = 0;
      let enhancing = 0;
      for (let z = 0; z < c.crop.d; z++) {
        for (let y = 0; y < c.crop.h; y++) {
          for (let x = 0; x < c.crop.w; x++) {
            const v = (z * c.crop.h + y) * c.crop.w + x;
            let best = 0;
            for (let k = 1; k < 4; k++) if (q[(r * 4 + k) * inCrop + v] > q[(r * 4 + best) * inCrop + v]) best = k;
            const got = Number(annotator[((c.crop.z0 + z) * Y + c.crop.y0 + y) * X + c.crop.x0 + x]);
            if (got !== RELEASE_LABELS['2021'][best]) wrong++;
            if (got !== 0) nonzeroInside++;
            if (best === 3) enhancing++;
          }
        }
      }
      let nonzero = 0;
      for (let i = 0; i < annotator.length; i++) if (Number(annotator[i]) !== 0) nonzero++;
      t.equal(wrong, 0, `${id}: annotator ${r} = [0, 1, 2, 4][argmax q_r] at all ${inCrop} voxels of the crop (${enhancing} of them ET, read back as 4)`);
      t.equal(nonzero - nonzeroInside, 0, `${id}: annotator ${r} is 0 outside the crop`);
      t.ok(enhancing > 0, `${id}: annotator ${r}'s map has ET voxels to check`);
    }
  }
});

t.test('trainer checkpoints on data that is not their run split', async (t) => {
  const TINY = ['--depth', '2', '--base-channels', '4', '--batch-size', '4', '--steps', '1', '--no-test', '--quiet'];
  const folderRun = await cli(['train', '--preset', 'images', '--data', 'sim', ...TINY, '--out', 'runs/folder']);
  t.equal(folderRun.exitCode, 0, folderRun.stderr);
  // Its own folder: the run's test split, as before.
  const own = await cli(['predict', '--checkpoint', 'runs/folder/last.safetensors', '--data', 'sim', '--out', 'p-own']);
  t.equal(own.exitCode, 0, own.stderr);
  t.match(own.stdout, /^wrote \d+ PNG files for 1 test images\n/);
  // Another folder (the run's own is still there): new data, every image.
  const other = await cli(['predict', '--checkpoint', 'runs/folder/last.safetensors', '--data', 'sim2', '--out', 'p-other']);
  t.equal(other.exitCode, 0, other.stderr);
  t.match(other.stderr, /^note: sim2 is not the run's image folder \(sim is still there\): predicting every image in it; --split test\|validation\|train would read the run's split from it instead\n$/);
  t.match(other.stdout, /^wrote 72 PNG files for 6 images of sim2\n/);
  const all = await cli(['predict', '--checkpoint', 'runs/folder/last.safetensors', '--data', 'sim', '--split', 'all', '--count', '1', '--out', 'p-all']);
  t.equal(all.exitCode, 0, all.stderr);
  t.match(all.stdout, /^wrote 12 PNG files for 1 images of sim\n/);
  const ev = await cli(['eval', '--checkpoint', 'runs/folder/last.safetensors', '--data', 'sim2']);
  t.equal(ev.exitCode, 0, ev.stderr);
  t.match(ev.stdout, /^cm at step 1, 6 images of sim2:\n6 images/);

  // Two runs on one folder split otherwise: not one split to score; --split all (not --data <the folder>, which is its split again) scores the folder whole.
  const otherSplit = await cli(['train', '--preset', 'images', '--data', 'sim', ...TINY, '--data-seed', '1', '--out', 'runs/folder-b']);
  t.equal(otherSplit.exitCode, 0, otherSplit.stderr);
  const pair = ['runs/folder/last.safetensors', 'runs/folder-b/last.safetensors'];
  for (const extra of [[], ['--data', 'sim']]) {
    const refused = await cli(['eval', '--checkpoint', ...pair, ...extra]);
    t.equal(refused.exitCode, 1, extra.join(' '));
    t.match(
      refused.stderr,
      /^cmseg: error: runs\/folder-b\/last\.safetensors was trained on other data than runs\/folder\/last\.safetensors \(dataset\.splits differ\): .*; give --split all to score every image of sim \(--data <dir> --split all where it moved\), or --data <dir> to score another folder, every image of it\n$/,
    );
  }
  const whole = await cli(['eval', '--checkpoint', ...pair, '--split', 'all', '--out', 'pair.json']);
  t.equal(whole.exitCode, 0, whole.stderr);
  t.match(whole.stdout, /^ensemble of 2 checkpoints \(cm at step 1, cm at step 1\), 6 images of sim:\n/);
  const wholeData = await cli(['eval', '--checkpoint', ...pair, '--data', 'sim', '--split', 'all', '--out', 'pair-data.json']);
  t.equal(wholeData.exitCode, 0, wholeData.stderr);
  t.same(json('pair-data.json').metrics, json('pair.json').metrics);

  // An MNIST run: --data is new images.
  const mnist = await cli(['train', '--preset', 'mnist-tiny', ...TINY, '--out', 'runs/mnist']);
  t.equal(mnist.exitCode, 0, mnist.stderr);
  const pr = await cli(['predict', '--checkpoint', 'runs/mnist/last.safetensors', '--data', 'sim2', '--count', '2', '--out', 'p-mnist']);
  t.equal(pr.exitCode, 0, pr.stderr);
  t.match(pr.stdout, /^wrote 24 PNG files for 2 images of sim2\n/);
  t.ok(fs.existsSync(path.join(dir, 'p-mnist', 'mnist-00001-annotator-fracture.png')), "the run's annotator names");
  const split = await cli(['predict', '--checkpoint', 'runs/mnist/last.safetensors', '--data', 'sim2', '--split', 'validation', '--out', 'p-x']);
  t.equal(split.exitCode, 1);
  t.match(split.stderr, /^cmseg: error: --split validation picks among a run's own images; --data sim2 is new data for this run, predicted whole: leave out --split\n$/);
});

t.test('annotator names that coincide as file names: each file its own, named -<r>', async (t) => {
  t.same(annotatorFileNames(['fracture', 'x y', 'x_y', 'Good', 'good']), ['fracture', 'x_y-1', 'x_y-2', 'Good-3', 'good-4'], 'ignoring case');
  t.same(annotatorFileNames(['x y', 'x_y', 'x_y-1']), ['x_y-0', 'x_y-1-1', 'x_y-1-2'], 'a suffix meeting another name is made unique too');
  t.same(annotatorFileNames(['a b', 'over']), ['a_b', 'over'], 'no collision: plain names');
  // A simulate folder whose annotators good and over are renamed "x y" and "x_y": labels/'s sorted folders are fracture, under, x y, x_y.
  fs.cpSync(path.join(dir, 'sim'), path.join(dir, 'sim-names'), { recursive: true });
  fs.renameSync(path.join(dir, 'sim-names', 'labels', 'good'), path.join(dir, 'sim-names', 'labels', 'x y'));
  fs.renameSync(path.join(dir, 'sim-names', 'labels', 'over'), path.join(dir, 'sim-names', 'labels', 'x_y'));
  const pr = await cli(['predict', '--checkpoint', 'api2d.safetensors', '--data', 'sim-names', '--count', '1', '--out', 'pred-names']);
  t.equal(pr.exitCode, 0, pr.stderr);
  t.match(pr.stdout, /^wrote 12 PNG files for 1 images of sim-names\n/);
  const files = fs.readdirSync(path.join(dir, 'pred-names')).filter((f) => f.endsWith('.png'));
  t.equal(files.length, 12, 'no file written twice');
  for (const part of ['fracture', 'under', 'x_y-2', 'x_y-3']) {
    for (const kind of ['annotator', 'cm']) t.ok(files.includes(`mnist-00000-${kind}-${part}.png`), `mnist-00000-${kind}-${part}.png`);
  }
  const readme = fs.readFileSync(path.join(dir, 'pred-names', 'README.txt'), 'utf8');
  t.match(readme, /names that then coincide \(ignoring case\) end in -<r>, r = the annotator's index\n/);
  t.match(readme, /annotators: fracture, under, x y \(files: x_y-2\), x_y \(files: x_y-3\)/);
});

t.test('one-line errors', async (t) => {
  const cases: [string[], RegExp][] = [
    [['predict', '--checkpoint', 'api2d.safetensors', '--out', 'p'], /^cmseg: error: api2d\.safetensors records no training data \(it was written by the API's saveCheckpoint, not by cmseg train\): name the data to predict with --data <dir>, a folder of PNG images \(DIR\/images\/\*\.png or DIR\/\*\.png\)\n$/],
    [['eval', '--checkpoint', 'api3d.safetensors'], /^cmseg: error: api3d\.safetensors records no training data .*: name the data to score with --data <dir>, a BraTS folder, a case folder or a cmseg cache whose cases have segmentations\n$/],
    [['predict', '--checkpoint', 'api2d.safetensors', '--data', 'brats', '--out', 'p'], /^cmseg: error: --data brats holds no PNG images \(expected DIR\/images\/<name>\.png or DIR\/<name>\.png\); api2d\.safetensors is a 2D model \(config\.ndim 2\), and NIfTI volumes need a 3D one\n$/],
    [['predict', '--checkpoint', 'api3d-1ch.safetensors', '--data', 'brats', '--out', 'p'], /^cmseg: error: api3d-1ch\.safetensors takes 1 input channel\(s\), but BraTS cases give 4 \(t1, t1ce, t2, flair\): this model cannot read them\n$/],
    [['predict', '--checkpoint', 'api3d.safetensors', '--data', 'sim', '--out', 'p'], /^cmseg: error: --data .*sim is not a BraTS case, a BraTS folder or a cmseg cache/],
    [['predict', '--checkpoint', 'api3d.safetensors', '--data', 'brats', '--patch', '15', '--out', 'p'], /^cmseg: error: --patch 15 must be a multiple of 2\^\(depth-1\) = 2 \(the model's depth is 2\)\n$/],
    [['predict', '--checkpoint', 'api2d.safetensors', '--data', 'missing', '--out', 'p'], /^cmseg: error: --data not found: .*missing\n$/],
    [['predict', '--checkpoint', 'api2d.safetensors', '--data', 'sim', '--split', 'test', '--out', 'p'], /^cmseg: error: --split test picks among a run's own images; --data sim is data this checkpoint records no split of, predicted whole: leave out --split\n$/],
    [['eval', '--checkpoint', 'missing.safetensors', '--data', 'sim'], /^cmseg: error: checkpoint not found: .*missing\.safetensors\n$/],
    [['eval', '--checkpoint', 'brats', '--data', 'sim'], /^cmseg: error: checkpoint \/.*\/brats is a folder, not a file\n$/],
    [['predict', '--checkpoint', 'runs/folder', '--out', 'p'], /^cmseg: error: checkpoint \/.*\/runs\/folder is a folder, not a file \(a run's folder: name a checkpoint in it, \/.*\/runs\/folder\/best\.safetensors\)\n$/],
    [['info', '--checkpoint', 'sim'], /^cmseg: error: checkpoint \/.*\/sim is a folder, not a file\n$/],
  ];
  for (const [args, message] of cases) {
    const r = await cli(args);
    t.equal(r.exitCode, 1, args.join(' '));
    t.match(r.stderr, message, args.join(' '));
    t.equal(r.stderr.trim().split('\n').length, 1, `${args.join(' ')}: one line`);
  }
  t.notOk(fs.existsSync(path.join(dir, 'p')), 'no output folder left behind');
  // Through the API: the error names the folder (Node's EISDIR names none).
  await t.rejects(readSafetensors(path.join(dir, 'sim')), { name: 'SafetensorsError', message: `${path.join(dir, 'sim')} is a folder, not a safetensors file`, path: path.join(dir, 'sim') });
});
