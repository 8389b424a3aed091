// `cmseg train --preset images --data <image folder>`: a user's 2D multi-annotator folder
// (the layout cmseg simulate writes) through train, eval, predict and --resume, in this
// process (test/helpers/cli.ts). Every run is a few steps of a depth-2, 4-channel U-Net on
// 32x32 images: the figures are not checked for quality, only for being there (or not).
import t from 'tap';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { runCli } from './helpers/cli';
import { setNumThreads } from '../src/model/model';
import { writePngSync } from '../src/data/png';
import { METHOD_NAMES } from '../src/train/methods';
import { readTrainerState } from '../src/train/trainer';
import type { FolderDatasetSpec } from '../src/train/experiment';
import { imageFolderSplits, loadFolderExperiment } from '../src/train/experiment';
import { loadImageFolder } from '../src/data/image-folder';
import { unpadded } from './helpers/tables';

setNumThreads(1);
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cmseg-folder-'));
t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
const cli = (args: string[], onStderr?: (chunk: string) => void) => runCli(args, dir, onStderr);
/** A tiny model and budget for every run. */
const TINY = ['--depth', '2', '--base-channels', '4', '--batch-size', '4'];

/** The data set a checkpoint's run recipe records. */
async function recipeOf(file: string): Promise<FolderDatasetSpec> {
  return ((await readTrainerState(path.join(dir, file))).run as { dataset: FolderDatasetSpec }).dataset;
}

const json = (file: string) => JSON.parse(fs.readFileSync(path.join(dir, file), 'utf8'));

t.before(async () => {
  // 20 images: 14 train, 3 validation, 3 test.
  const dense = await cli(['simulate', '--out', 'sim', '--count', '20', '--seed', '1']);
  if (dense.exitCode !== 0) throw new Error(dense.stderr);
  // One annotator per image (the others' files missing: absent), and no expert consensus.
  const single = await cli(['simulate', '--out', 'nocons', '--count', '20', '--labels', 'single', '--seed', '2']);
  if (single.exitCode !== 0) throw new Error(single.stderr);
  fs.rmSync(path.join(dir, 'nocons', 'consensus'), { recursive: true });
});

t.test('cm on an image folder with a consensus: train, split in the recipe, eval, predict', async (t) => {
  const r = await cli(['train', '--preset', 'images', '--data', 'sim', '--steps', '3', ...TINY, '--out', 'runs/cm', '--quiet']);
  t.equal(r.exitCode, 0, r.stderr);
  t.equal(r.stderr, '', 'quiet: nothing on stderr');
  t.match(r.stdout, /trained cm from step 0 to 3/);
  t.match(r.stdout, /test set, best\.safetensors:\n3 images/);
  t.match(unpadded(r.stdout), /\| Dice foreground +\| \d\.\d{4} ± \d\.\d{4} \|/);
  t.match(unpadded(r.stdout), /\| CM estimation error \(RMSE\) \| /);
  t.match(unpadded(r.stdout), /\| Mode labels \(tie: lower class\) \| /);
  t.match(r.stdout, /outputs:\n  checkpoints +runs\/cm\/best\.safetensors, runs\/cm\/last\.safetensors\n  training log +runs\/cm\/train-log\.jsonl\n  curves +runs\/cm\/curves\.png\n  test metrics +runs\/cm\/eval-test\.json\n$/);
  const test = json('runs/cm/eval-test.json');
  t.equal(test.metrics.images, 3);
  t.equal(test.metrics.reference, undefined, 'scored against the expert consensus');
  t.ok(test.metrics.cmError.mean > 0, 'CM error against the empirical CMs of the consensus');
  t.ok(test.fusedLabels.mode.averageDice.mean > 0.5);

  const spec = await recipeOf('runs/cm/last.safetensors');
  t.equal(spec.kind, 'folder');
  t.equal(fs.realpathSync(spec.root), fs.realpathSync(path.join(dir, 'sim')), 'the folder, as an absolute path');
  t.equal(spec.labelMapping, 'binary', "'auto' is resolved when the run starts");
  t.same(spec.annotators, ['fracture', 'good', 'over', 'under']);
  t.same([spec.splits.train.length, spec.splits.validation.length, spec.splits.test.length], [14, 3, 3]);
  const names = fs.readdirSync(path.join(dir, 'sim', 'images')).sort();
  t.same([...spec.splits.train, ...spec.splits.validation, ...spec.splits.test].sort(), names, 'every image in exactly one split');
  t.same(spec.splits, imageFolderSplits(names, 0), 'the split of --data-seed 0');
  t.notSame(imageFolderSplits(names, 1), spec.splits, 'another --data-seed, another split');

  const ev = await cli(['eval', '--checkpoint', 'runs/cm/best.safetensors', '--split', 'validation']);
  t.equal(ev.exitCode, 0, ev.stderr);
  t.match(ev.stdout, /^cm at step 3, validation split:\n3 images/);
  t.match(ev.stdout, /outputs:\n  metrics +runs\/cm\/eval-validation-best\.json\n$/);
  t.ok(json('runs/cm/eval-validation-best.json').metrics.cmError.mean > 0);

  const pr = await cli(['predict', '--checkpoint', 'runs/cm/best.safetensors', '--out', 'pictures', '--count', '2']);
  t.equal(pr.exitCode, 0, pr.stderr);
  t.match(pr.stdout, /wrote 24 PNG files for 2 test images\noutputs:\n  pictures +pictures\n  legend +pictures\/README\.txt\n$/);
  const first = path.parse(spec.splits.test[0]).name;
  for (const suffix of ['input', 'truth', 'consensus', 'sheet', 'annotator-over', 'cm-fracture']) {
    t.ok(fs.existsSync(path.join(dir, 'pictures', `${first}-${suffix}.png`)), `${first}-${suffix}.png: named after the image`);
  }
});

t.test('every method trains on an image folder', async (t) => {
  for (const method of METHOD_NAMES) {
    const r = await cli(['train', '--preset', 'images', '--data', 'sim', '--method', method, '--steps', '1', ...TINY, '--out', `runs/all-${method}`, '--no-test', '--quiet']);
    t.equal(r.exitCode, 0, `${method}: ${r.stderr}`);
    t.match(r.stdout, new RegExp(`trained ${method} from step 0 to 1`));
  }
  // A naive method and the oracle are scored on the consensus only, and draw no annotator pictures.
  for (const method of ['naive-mode', 'oracle']) {
    const ev = await cli(['eval', '--checkpoint', `runs/all-${method}/last.safetensors`]);
    t.equal(ev.exitCode, 0, ev.stderr);
    t.notMatch(ev.stdout, /CM estimation error/, `${method}: no CM error`);
    const pr = await cli(['predict', '--checkpoint', `runs/all-${method}/last.safetensors`, '--out', `pictures-${method}`, '--count', '1']);
    t.equal(pr.exitCode, 0, pr.stderr);
    t.match(pr.stdout, /wrote 4 PNG files for 1 test images/, 'input, truth, consensus, sheet');
  }
});

t.test('a folder without consensus/: majority vote, no CM error, no oracle', async (t) => {
  const r = await cli(['train', '--preset', 'images', '--data', 'nocons', '--steps', '2', ...TINY, '--out', 'runs/nocons']);
  t.equal(r.exitCode, 0, r.stderr);
  t.equal(r.stderr.match(/no expert consensus/g)?.length, 1, 'said once');
  t.match(r.stderr, /^note: nocons has no consensus\/ \(no expert consensus\): validation and test Dice are against the annotators' majority vote, and the CM error is not computed\n/);
  t.match(r.stdout, /best validation Dice against the majority vote \d/);
  t.match(r.stdout, /test set, best\.safetensors, against the annotators' majority vote \(no expert consensus, so no CM error\):/);
  t.notMatch(r.stdout, /CM estimation error|fused training labels/);
  const test = json('runs/nocons/eval-test.json');
  t.equal(test.metrics.reference, 'majority vote');
  t.equal(test.metrics.cmError, undefined);
  t.equal(test.metrics.incompetence, undefined);
  t.equal(test.metrics.reliability.length, 4, 'reliability needs no consensus');
  t.equal(test.fusedLabels, null);

  const ev = await cli(['eval', '--checkpoint', 'runs/nocons/last.safetensors']);
  t.equal(ev.exitCode, 0, ev.stderr);
  t.match(ev.stdout, /^cm at step 2, test split, against the annotators' majority vote/);
  const pr = await cli(['predict', '--checkpoint', 'runs/nocons/last.safetensors', '--out', 'pictures-nocons', '--count', '1']);
  t.equal(pr.exitCode, 0, pr.stderr);
  t.match(pr.stdout, /wrote 11 PNG files for 1 test images/, 'no truth picture');
  t.match(fs.readFileSync(path.join(dir, 'pictures-nocons', 'README.txt'), 'utf8'), /no consensus\/: no truth pictures/);

  const oracle = await cli(['train', '--preset', 'images', '--data', 'nocons', '--method', 'oracle', '--steps', '1', ...TINY, '--out', 'runs/nocons-oracle']);
  t.equal(oracle.exitCode, 1);
  t.match(oracle.stderr, /^cmseg: error: --method oracle trains on the expert consensus, but nocons has no consensus\/ folder .*\n$/);
});

t.test('resume reuses the saved split; eval and predict follow a moved folder with --data', async (t) => {
  fs.cpSync(path.join(dir, 'sim'), path.join(dir, 'grow'), { recursive: true });
  const args = ['train', '--preset', 'images', '--data', 'grow', '--epochs', '3', ...TINY, '--no-augment'];
  const whole = await cli([...args, '--out', 'runs/whole', '--quiet']);
  t.equal(whole.exitCode, 0, whole.stderr);

  // Interrupted after the first epoch, as Ctrl-C would.
  let sent = false;
  const stopped = await cli([...args, '--out', 'runs/resumed'], (chunk) => {
    if (!sent && /epoch 1\//.test(chunk)) (sent = true), process.emit('SIGINT', 'SIGINT');
  });
  t.ok(sent, 'training started');
  t.match(stopped.stdout, /interrupted at step \d+\/9; continue with: cmseg train --out runs\/resumed --resume/);
  t.equal(stopped.exitCode, 130);
  const before = await recipeOf('runs/resumed/last.safetensors');

  // New images in the folder join no split of the run.
  for (const sub of ['images', 'labels/good', 'consensus']) {
    fs.copyFileSync(path.join(dir, 'grow', sub, before.splits.train[0]), path.join(dir, 'grow', sub, 'zz-new.png'));
  }
  const resumed = await cli(['train', '--out', 'runs/resumed', '--resume', '--quiet']);
  t.equal(resumed.exitCode, 0, resumed.stderr);
  t.match(resumed.stdout, /trained cm from step \d+ to 9/);
  const after = await recipeOf('runs/resumed/last.safetensors');
  t.same(after.splits, before.splits, 'the split saved at the start, not one of the grown folder');
  // The first command line again, --label-mapping auto included: the run recorded 'binary', which is what auto means here.
  const again = await cli(['train', '--out', 'runs/resumed', '--resume', '--label-mapping', 'auto', '--quiet']);
  t.equal(again.exitCode, 0, again.stderr);
  t.match(again.stdout, /the run was already complete at step 9/);
  t.same(json('runs/resumed/eval-test.json').metrics, json('runs/whole/eval-test.json').metrics, 'the same result as the uninterrupted run');

  // The folder moves: eval and predict say so, and read it where --data says.
  fs.renameSync(path.join(dir, 'grow'), path.join(dir, 'moved'));
  const gone = await cli(['eval', '--checkpoint', 'runs/whole/last.safetensors']);
  t.equal(gone.exitCode, 1);
  t.match(gone.stderr, /^cmseg: error: the run's image folder .*grow is gone; if it moved, name its new place with --data\n$/);
  const ev = await cli(['eval', '--checkpoint', 'runs/whole/last.safetensors', '--data', 'moved', '--out', 'moved-eval.json']);
  t.equal(ev.exitCode, 0, ev.stderr);
  t.same(json('moved-eval.json').metrics, json('runs/whole/eval-test.json').metrics, 'the same test images, read from the new place');
  const pr = await cli(['predict', '--checkpoint', 'runs/whole/last.safetensors', '--data', 'moved', '--out', 'pictures-moved', '--count', '1']);
  t.equal(pr.exitCode, 0, pr.stderr);
});

t.test('user errors name the problem', async (t) => {
  // 30x30 images cannot pass the default depth-3 U-Net (multiples of 4).
  const odd = path.join(dir, 'odd');
  for (const sub of ['images', 'labels/a']) fs.mkdirSync(path.join(odd, sub), { recursive: true });
  for (let n = 0; n < 3; n++) {
    for (const sub of ['images', 'labels/a']) writePngSync(path.join(odd, sub, `x${n}.png`), { width: 30, height: 30, channels: 1, data: new Uint8Array(900) });
  }
  const size = await cli(['train', '--preset', 'images', '--data', 'odd', '--steps', '1', '--out', 'runs/odd']);
  t.equal(size.exitCode, 1);
  t.match(size.stderr, /^cmseg: error: the images in odd are 30x30 pixels, which a U-Net of depth 3 cannot take: width and height must be multiples of 2\^\(depth-1\) = 4; crop or pad the images, or lower --depth\n$/);

  const noData = await cli(['train', '--preset', 'images', '--steps', '1', '--out', 'runs/x']);
  t.match(noData.stderr, /^cmseg: error: --preset images needs --data: a folder with images\/<name>\.png and labels\/<annotator>\/<name>\.png/);
  const notFolder = await cli(['train', '--preset', 'images', '--data', 'runs', '--steps', '1', '--out', 'runs/x']);
  t.match(notFolder.stderr, /^cmseg: error: --data runs: no images\/ folder in /);
  const labels = await cli(['train', '--preset', 'images', '--data', 'sim', '--labels', 'single', '--out', 'runs/x']);
  t.match(labels.stderr, /^cmseg: error: --labels: an image folder says itself which annotator labelled which image/);
  const classes = await cli(['train', '--preset', 'mnist-tiny', '--classes', '3', '--out', 'runs/x']);
  t.match(classes.stderr, /^cmseg: error: --classes: for image folders \(--preset images\) only\n$/);
  const mnist = await cli(['train', '--preset', 'mnist-tiny', '--data', 'sim', '--out', 'runs/x']);
  t.match(mnist.stderr, /; sim is an image folder: train on it with --preset images\n$/);
  const binary = await cli(['train', '--preset', 'images', '--data', 'sim', '--classes', '3', '--label-mapping', 'binary', '--out', 'runs/x']);
  t.match(binary.stderr, /^cmseg: error: --label-mapping binary reads two classes \(zero and non-zero\); with --classes 3 the label PNGs hold the labels themselves \(--label-mapping value\)\n$/);
  const evalData = await cli(['eval', '--checkpoint', 'runs/cm/last.safetensors', '--data', 'sim']);
  t.equal(evalData.exitCode, 0, 'eval --data on a folder run');
  t.equal(fs.existsSync(path.join(dir, 'runs', 'x')), false, 'no run folder left behind');
});

t.test('the splits are ranges of one read of the folder (no second copy), each image as its own file', async (t) => {
  const root = path.join(dir, 'sim');
  const names = fs.readdirSync(path.join(root, 'images')).filter((n) => n.endsWith('.png'));
  const spec: FolderDatasetSpec = { kind: 'folder', root, classes: 2, labelMapping: 'auto', annotators: ['good', 'over', 'under', 'fracture'], dataSeed: 3, splits: imageFolderSplits(names, 3) };
  const data = loadFolderExperiment(spec, 0);
  const [train, validation, test] = (['train', 'validation', 'test'] as const).map((s) => data.split(s));
  t.equal(train.images.buffer, validation.images.buffer, 'train and validation share one buffer');
  t.equal(train.images.buffer, test.images.buffer, 'and test');
  t.equal(train.labels[0].buffer, test.labels[0].buffer, 'the label maps too');
  // Each split's image k is its own file, whatever the sorted order of the folder.
  for (const [split, set] of [['train', train], ['validation', validation], ['test', test]] as const) {
    t.same(set.names, spec.splits[split]);
    const k = set.count - 1;
    const file = loadImageFolder(root, { names: [set.names![k]], annotators: spec.annotators });
    const V = file.extent.h * file.extent.w;
    t.same([...set.images.subarray(k * V, (k + 1) * V)], [...file.images], `${split}: its last image is ${set.names![k]}`);
    t.same([...set.labels[1].subarray(k * V, (k + 1) * V)], [...file.labels[1]], `${split}: and its labels`);
  }
});
