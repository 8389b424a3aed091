// The BraTS command line end to end on small phantoms (48x48x32, patches 16^3, a U-Net of
// base width 4, two or three steps): phantom -> prepare (incremental, interruptible) ->
// train --preset brats3d -> predict (NIfTI in the original geometry) -> eval; training from
// a raw BraTS folder (cache prepared inside the run) with 2023 names; one-line user errors.
import t from 'tap';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { cliHelp, runCli } from './helpers/cli';
import { readCacheIndex } from '../src/data/cache';
import { readNifti, writeNifti } from '../src/data/nifti';
import { readPngSync } from '../src/data/png';
import { backendInfo } from '../src/model/model';
import { BRATS_CLASS_NAMES } from '../src/data/brats';
import { cmFigure } from '../src/report/pictures';
import { checkReleasedPrediction } from './helpers/brats-predictions';
import { unpadded } from './helpers/tables';

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cmseg-brats-cli-'));
t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
const SIZE = '48,48,32';
const TINY = ['--patch', '16', '--base-channels', '4', '--val-cases', '1', '--quiet'];

const cmseg = (args: string[], onStderr?: (chunk: string) => void) => runCli(args, dir, onStderr);
const help = cliHelp;

t.test('help of the BraTS commands', async (t) => {
  const phantom = await help(['phantom', 'brats', '--help']);
  t.match(phantom, /Usage: cmseg phantom brats/);
  for (const flag of ['--cases', '--out', '--size', '--seed', '--naming']) t.match(phantom, flag);
  t.match(phantom, /Examples:\n  \$ cmseg phantom brats/);
  const prepare = await help(['prepare', '--help']);
  for (const flag of ['--data', '--out', '--annotators', '--labels', '--dtype', '--seed', '--rebuild']) t.match(prepare, flag);
  t.match(prepare, /default: over,under,wrong/);
  t.match(prepare, /Safe to interrupt: Ctrl-C/);
  t.match(prepare, /Examples:\n  \$ cmseg prepare/);
  const train = await help(['train', '--help']);
  for (const flag of ['--data', '--patch', '--val-cases', '--steps-per-epoch', '--workers']) t.match(train, flag);
  t.match(train, /\n  brats3d +BraTS/);
  t.match(train, /\n  brats3d-gpu +BraTS/);
  t.match(await help(['predict', '--help']), /--data <dir>/);
});

t.test('phantom -> prepare (incremental, interruptible) -> train -> predict -> eval', async (t) => {
  const phantom = await cmseg(['phantom', 'brats', '--cases', '4', '--out', 'data', '--size', SIZE, '--seed', '5']);
  t.equal(phantom.exitCode, 0, phantom.stderr);
  t.match(phantom.stderr, /^\[1\/4\] BraTS2021_00000 written in \d+\.\d s\n[\s\S]*\[4\/4\] BraTS2021_00003 written/);
  t.match(phantom.stdout, /wrote 4 synthetic BraTS 2021 case\(s\) of 48x48x32 voxels \(seed 5\)[\s\S]*outputs:\n  cases +data\n/);
  t.ok(fs.existsSync(path.join(dir, 'data/BraTS2021_00002/BraTS2021_00002_flair.nii.gz')));

  // Ctrl-C after the first case: a valid cache holding that case; the same command finishes it.
  const interrupt = (chunk: string) => {
    if (!chunk.startsWith('[1/4]')) return;
    const listener = process.listeners('SIGINT').at(-1) as (signal: string) => void; // prepare's own handler
    listener('SIGINT');
  };
  const stopped = await cmseg(['prepare', '--data', 'data', '--out', 'cache'], interrupt);
  t.equal(stopped.exitCode, 130, stopped.stderr);
  t.match(stopped.stderr, /interrupt: finishing the case in progress/);
  t.match(stopped.stdout, /^interrupted after 1 of 4 cases: the cache is valid and holds them; run the same command again/);
  t.same(readCacheIndex(path.join(dir, 'cache')).cases.map((c) => c.id), ['BraTS2021_00000']);
  t.notOk(fs.existsSync(path.join(dir, 'cache', '.prepare.lock')), 'the lock is released');

  const rest = await cmseg(['prepare', '--data', 'data', '--out', 'cache']);
  t.equal(rest.exitCode, 0, rest.stderr);
  t.match(rest.stderr, /^\[1\/4\] BraTS2021_00000 up to date, skipped\n\[2\/4\] BraTS2021_00001 prepared in \d+\.\d s\n/);
  t.match(rest.stdout, /^prepared 3 case\(s\), 1 up to date; the cache holds 4 cases \([\d.]+ MB\) with annotators over, under, wrong \(dense labels, float16\)\noutputs:\n  cache index +cache\/index\.json\n  case files +cache\/cases\n$/);
  const again = await cmseg(['prepare', '--data', 'data', '--out', 'cache', '--quiet']);
  t.equal(again.exitCode, 0);
  t.equal(again.stderr, '', 'quiet');
  t.match(again.stdout, /^prepared 0 case\(s\), 4 up to date/, 'a second run skips every case');
  const changed = await cmseg(['prepare', '--data', 'data', '--out', 'cache', '--labels', 'single', '--quiet']);
  t.equal(changed.exitCode, 1);
  t.match(changed.stderr, /^cmseg: error: the cache at .*cache was prepared with other settings \(labels: dense in the cache, single asked: these differ\).*--rebuild.*\n$/);

  const train = await cmseg(['train', '--preset', 'brats3d', '--data', 'cache', '--steps', '2', '--out', 'runs/cm', '--workers', '0', ...TINY]);
  t.equal(train.exitCode, 0, train.stderr);
  t.equal(train.stderr, '');
  t.match(train.stdout, /trained cm from step 0 to 2/);
  t.match(unpadded(train.stdout), /\n1 volume\n\n\| metric \| value \|[\s\S]*\n1 volume\n\n\| Dice \| value \|/, 'the test summary counts one volume');
  // One volume: each cell its value alone (no "± 0.0000" spread).
  t.match(unpadded(train.stdout), /\| Dice edema \(ED\) +\| \d\.\d{4} \|/);
  t.match(unpadded(train.stdout), /\| CM estimation error \(RMSE\) \| /);
  t.match(unpadded(train.stdout), /\| whole tumour \(1, 2, 3\) \| \d\.\d{4} \|/);
  t.match(unpadded(train.stdout), /\| HD95 \(mm\) \| value \|\n\| --- \| --- \|\n\| whole tumour \| (\d+\.\d{2}|n\/a) \|/);
  t.match(train.stdout, /outputs:\n  checkpoints +runs\/cm\/best\.safetensors, runs\/cm\/last\.safetensors\n  training log +runs\/cm\/train-log\.jsonl\n  curves +runs\/cm\/curves\.png\n  test metrics +runs\/cm\/eval-test\.json/);
  const testMetrics = JSON.parse(fs.readFileSync(path.join(dir, 'runs/cm/eval-test.json'), 'utf8'));
  t.equal(testMetrics.dataset.kind, 'brats');
  t.equal(testMetrics.dataset.cache, path.join(dir, 'cache'));
  const splits = testMetrics.dataset.splits as Record<string, string[]>;
  t.same([splits.train.length, splits.validation.length, splits.test.length], [2, 1, 1], '4 cases: 2 train, 1 validation, 1 test');
  t.equal(testMetrics.metrics.images, 1);
  t.ok(testMetrics.metrics.cmErrorPerAnnotator.length === 3 && testMetrics.metrics.reliability.length === 3);
  t.ok(Number.isFinite(testMetrics.metrics.brats.regions.wholeTumour.mean));
  // HD95 per region and case: a distance in mm, or null in JSON (NaN) where only one map has the region.
  const hd = testMetrics.metrics.perCase[0].hd95;
  for (const region of ['wholeTumour', 'tumourCore', 'enhancingTumour']) t.ok(hd[region] === null || hd[region] >= 0, `${region} HD95 ${hd[region]}`);
  t.equal(testMetrics.metrics.brats.hd95.wholeTumour.count, hd.wholeTumour === null ? 0 : 1);
  t.equal(testMetrics.metrics.perCase[0].id, splits.test[0]);
  // Each validation in the training log carries the region Dice and HD95.
  const validations = fs.readFileSync(path.join(dir, 'runs/cm/train-log.jsonl'), 'utf8').trim().split('\n').map((l) => JSON.parse(l)).filter((e) => e.event === 'validation');
  t.ok(validations.length > 0 && validations.every((e) => 'wholeTumour' in e && 'hd95WholeTumour' in e), 'validation metrics include hd95WholeTumour');
  const resumed = await cmseg(['train', '--preset', 'brats3d', '--data', 'cache', '--steps', '2', '--out', 'runs/cm', '--resume', '--no-test', ...TINY]);
  t.equal(resumed.exitCode, 0, resumed.stderr);
  t.match(resumed.stdout, /the run was already complete at step 2/);

  // Predict the test split (default) from the run's cache: NIfTI on the original grid.
  const predicted = await cmseg(['predict', '--checkpoint', 'runs/cm/best.safetensors', '--out', 'pred']);
  t.equal(predicted.exitCode, 0, predicted.stderr);
  t.match(predicted.stdout, /^predicted 1 case\(s\) from the test split of the run \(the cache at cache\): 5 NIfTI volumes and 4 PNG pictures \(labels in BraTS 2021 numbering\)\noutputs:\n  volumes +pred\n  legend +pred\/README\.txt\n$/);
  const id = splits.test[0];
  const source = await readNifti(path.join(dir, 'data', id, `${id}_t1.nii.gz`));
  const consensus = await readNifti(path.join(dir, 'pred', `${id}_consensus.nii.gz`));
  t.same(consensus.dims, [48, 48, 32], 'original dims');
  t.same(consensus.affine, source.affine, 'original affine');
  t.same([...new Set(consensus.raw)].filter((v) => ![0, 1, 2, 4].includes(v)), [], 'consensus labels in {0, 1, 2, 4}');
  const probs = await readNifti(path.join(dir, 'pred', `${id}_probs.nii.gz`));
  t.same(probs.dims, [48, 48, 32, 4]);
  t.same(probs.affine, source.affine);
  const V = 48 * 48 * 32;
  const crop = readCacheIndex(path.join(dir, 'cache')).cases.find((c) => c.id === id)!.crop;
  const scale = Math.max(1, Math.floor(Math.floor(256 / Math.max(crop.h, crop.w)) / 2));
  const gap = Math.max(2, scale);
  // Read back: the consensus is the BraTS 2021 label ([0, 1, 2, 4]) of the most probable class
  // at every voxel, and outside the cache's crop the probabilities are background's (1, 0, 0, 0).
  const released = await checkReleasedPrediction(t, path.join(dir, 'pred'), id, crop);
  t.ok(released.argmaxCounts.filter((n) => n > 0).length >= 2, `more than one class predicted in the crop (${released.argmaxCounts}): the label check is not of one value`);
  let worst = 0;
  for (let v = 0; v < V; v++) worst = Math.max(worst, Math.abs(probs.data[v] + probs.data[V + v] + probs.data[2 * V + v] + probs.data[3 * V + v] - 1));
  t.ok(worst < 1e-4, `probabilities sum to 1 at every voxel (worst ${worst})`);
  const names = readCacheIndex(path.join(dir, 'cache')).names;
  t.equal(names.length, 3);
  for (let r = 0; r < 3; r++) {
    // Named by annotator (the run records the cache's names), as the 2D pictures are.
    const annotator = await readNifti(path.join(dir, 'pred', `${id}_annotator-${names[r]}.nii.gz`));
    t.same(annotator.dims, [48, 48, 32], `annotator ${r}: original dims`);
    const cm = readPngSync(path.join(dir, 'pred', `${id}_cm-${names[r]}.png`));
    // cmFigure's layout for 4x4 heat maps of the cropped slice at the CM scale (its values aside).
    const figure = cmFigure(new Float32Array(3 * 16 * crop.h * crop.w), 0, r, 3, 4, crop.h, crop.w, scale, { annotator: names[r], classes: BRATS_CLASS_NAMES });
    t.same([cm.width, cm.height], [figure.width, figure.height], `annotator ${r}: a 4x4 grid of CM heat maps of the cropped slice, with named axes`);
    t.ok(figure.width >= 4 * crop.w * scale + 3 * gap && figure.height > 4 * crop.h * scale + 3 * gap, 'the figure holds the grid');
  }
  t.match(fs.readFileSync(path.join(dir, 'pred', 'README.txt'), 'utf8'), /4 enhancing tumour \(ET\) for BraTS 2018-2021/);

  // One window per forward pass (--window-batch 1, half the forward's memory): the same prediction.
  const single = await cmseg(['predict', '--checkpoint', 'runs/cm/best.safetensors', '--out', 'pred-w1', '--window-batch', '1']);
  t.equal(single.exitCode, 0, single.stderr);
  const probs1 = await readNifti(path.join(dir, 'pred-w1', `${id}_probs.nii.gz`));
  let apart = 0;
  for (let i = 0; i < probs.data.length; i++) apart = Math.max(apart, Math.abs(probs.data[i] - probs1.data[i]));
  t.ok(apart < 1e-5, `--window-batch 1 predicts as batches of 2 (max difference ${apart})`);

  // --no-cms: no CM sums or pictures; the annotators' maps are the same (they come from q_r).
  // With --probs uint8: the probabilities as round(255 p), the same predictions otherwise.
  const noCms = await cmseg(['predict', '--checkpoint', 'runs/cm/best.safetensors', '--out', 'pred-nocms', '--no-cms', '--probs', 'uint8']);
  t.equal(noCms.exitCode, 0, noCms.stderr);
  t.same(fs.readdirSync(path.join(dir, 'pred-nocms')).filter((f) => f.includes('_cm-')), [], 'no CM pictures');
  for (const name of names) {
    const a = await readNifti(path.join(dir, 'pred', `${id}_annotator-${name}.nii.gz`));
    const b = await readNifti(path.join(dir, 'pred-nocms', `${id}_annotator-${name}.nii.gz`));
    t.same(Array.from(b.raw), Array.from(a.raw), `${name}: the same map without the CMs`);
  }
  t.match(fs.readFileSync(path.join(dir, 'pred-nocms', 'README.txt'), 'utf8'), /--no-cms: no CM pictures/);
  const probs8 = await readNifti(path.join(dir, 'pred-nocms', `${id}_probs.nii.gz`));
  t.equal(probs8.header.datatype, 'uint8', '--probs uint8 writes uint8');
  t.same(probs8.dims, [48, 48, 32, 4]);
  let off8 = 0;
  for (let i = 0; i < probs.data.length; i++) off8 = Math.max(off8, Math.abs(probs8.raw[i] - 255 * probs.data[i]));
  t.ok(off8 <= 0.5 + 1e-3, `uint8 probabilities are 255 p rounded (worst ${off8})`);
  t.match(fs.readFileSync(path.join(dir, 'pred-nocms', 'README.txt'), 'utf8'), /uint8, 4D \[x, y, z, class\]: round\(255 p\(class\)\)/);
  const noProbs = await cmseg(['predict', '--checkpoint', 'runs/cm/best.safetensors', '--out', 'pred-noprobs', '--no-cms', '--probs', 'none']);
  t.equal(noProbs.exitCode, 0, noProbs.stderr);
  t.notOk(fs.existsSync(path.join(dir, 'pred-noprobs', `${id}_probs.nii.gz`)), '--probs none: no probability volume');
  t.ok(fs.existsSync(path.join(dir, 'pred-noprobs', `${id}_consensus.nii.gz`)), '--probs none: the consensus still');

  // A case folder of raw NIfTI files: preprocessed as prepare does, written back to its own grid.
  const fromFolder = await cmseg(['predict', '--checkpoint', 'runs/cm/last.safetensors', '--data', 'data/BraTS2021_00003', '--out', 'pred-folder']);
  t.equal(fromFolder.exitCode, 0, fromFolder.stderr);
  t.match(fromFolder.stdout, /from the case folder data\/BraTS2021_00003/);
  t.same((await readNifti(path.join(dir, 'pred-folder', 'BraTS2021_00003_consensus.nii.gz'))).dims, [48, 48, 32]);

  const evaluated = await cmseg(['eval', '--checkpoint', 'runs/cm/best.safetensors', '--split', 'validation']);
  t.equal(evaluated.exitCode, 0, evaluated.stderr);
  t.match(unpadded(evaluated.stdout), /cm at step 2, validation split:[\s\S]*\| Dice necrotic core \(NCR\) \|[\s\S]*\| annotator \| CM error \| incompetence \| estimated reliability \|[\s\S]*\| wrong \|[\s\S]*\| tumour core \(1, 3\) \|/);
  t.match(evaluated.stdout, /outputs:\n  metrics +runs\/cm\/eval-validation-best\.json\n$/);
  t.match(evaluated.stderr, new RegExp(`^\\[1/1\\] ${splits.validation[0]}: total Dice \\d\\.\\d{4}, Dice WT/TC/ET [\\d./]+, HD95 [\\d./-]+ mm\\n`), 'a line per case');
  const record = JSON.parse(fs.readFileSync(path.join(dir, 'runs/cm/eval-validation-best.json'), 'utf8'));
  t.equal(record.metrics.perCase[0].id, splits.validation[0]);
  // --no-cms: the same consensus scores, no annotator table.
  const consensusOnly = await cmseg(['eval', '--checkpoint', 'runs/cm/best.safetensors', '--split', 'validation', '--no-cms', '--out', 'eval-nocms.json']);
  t.equal(consensusOnly.exitCode, 0, consensusOnly.stderr);
  t.notMatch(consensusOnly.stdout, /CM error/, '--no-cms: no CM error table');
  const recordNoCms = JSON.parse(fs.readFileSync(path.join(dir, 'eval-nocms.json'), 'utf8'));
  t.same(recordNoCms.metrics.perCase.map((c: { dice: number[] }) => c.dice), record.metrics.perCase.map((c: { dice: number[] }) => c.dice), 'the same consensus Dice');
  t.notOk(recordNoCms.metrics.cmErrorPerAnnotator?.length, 'no CM errors recorded');
  // --quiet: no line per case (eval, predict); the results and outputs as without it.
  const quietEval = await cmseg(['eval', '--checkpoint', 'runs/cm/best.safetensors', '--split', 'validation', '--out', 'eval-quiet.json', '-q']);
  t.equal(quietEval.exitCode, 0, quietEval.stderr);
  t.notMatch(quietEval.stderr, /\[1\/1\]/, 'eval -q: no line per case');
  t.same(JSON.parse(fs.readFileSync(path.join(dir, 'eval-quiet.json'), 'utf8')).metrics.perCase, record.metrics.perCase, 'eval -q: the same scores');
  t.match(predicted.stderr, /\[1\/1\] \S+: \d+ windows? in/, 'predict: a line per case');
  const quietPredict = await cmseg(['predict', '--checkpoint', 'runs/cm/best.safetensors', '--out', 'pred-quiet', '--quiet']);
  t.equal(quietPredict.exitCode, 0, quietPredict.stderr);
  t.notMatch(quietPredict.stderr, /\[1\/1\]/, 'predict --quiet: no line per case');
  t.same(fs.readdirSync(path.join(dir, 'pred-quiet')).sort(), fs.readdirSync(path.join(dir, 'pred')).sort(), 'predict --quiet: the same files');
});

t.test('predict on a BraTS folder with stray files and bad segmentations; prepare on HGG/LGG with a geometry tolerance', async (t) => {
  // mix/: two cases, a stray NIfTI file, the predictions of the run above, a seg with label 7 and a seg with no orientation.
  const mix = path.join(dir, 'mix');
  for (const id of ['BraTS2021_00000', 'BraTS2021_00001', 'BraTS2021_00002']) fs.cpSync(path.join(dir, 'data', id), path.join(mix, id), { recursive: true });
  fs.copyFileSync(path.join(dir, 'data/BraTS2021_00000/BraTS2021_00000_t1.nii.gz'), path.join(mix, 'stray.nii.gz'));
  fs.cpSync(path.join(dir, 'pred'), path.join(mix, 'predictions'), { recursive: true });
  await rewriteSeg(path.join(mix, 'BraTS2021_00001/BraTS2021_00001_seg.nii.gz'), (labels) => (labels[100] = 7));
  await rewriteSeg(path.join(mix, 'BraTS2021_00002/BraTS2021_00002_seg.nii.gz'), () => undefined, (m) => (m[0][3] += 0.5));
  const predicted = await cmseg(['predict', '--checkpoint', 'runs/cm/best.safetensors', '--data', 'mix', '--out', 'pred-mix']);
  t.equal(predicted.exitCode, 0, predicted.stderr);
  t.match(predicted.stdout, /^predicted 3 case\(s\) from the BraTS folder mix:/);
  t.match(predicted.stderr, /^note: skipped 2 entries of .*mix that are not a BraTS case: predictions\/, stray\.nii\.gz\n/);
  t.match(predicted.stderr, /\nwarning: case BraTS2021_00001: label 7 at voxel 100 of .*BraTS2021_00001_seg\.nii\.gz is not a BraTS label .*; predicting BraTS2021_00001 without its segmentation \(used only for the picture\)\n/);
  t.match(predicted.stderr, /\nwarning: case BraTS2021_00002: .*BraTS2021_00002_seg\.nii\.gz has affine\[0\]\[3\] = .* not on one grid .*; predicting BraTS2021_00002 without its segmentation/);
  for (const id of ['BraTS2021_00000', 'BraTS2021_00001', 'BraTS2021_00002']) t.ok(fs.existsSync(path.join(dir, 'pred-mix', `${id}_consensus.nii.gz`)), `${id} predicted`);
  // The same case folder on its own, and a folder of no case (with the reason).
  const alone = await cmseg(['predict', '--checkpoint', 'runs/cm/best.safetensors', '--data', 'mix/BraTS2021_00002', '--out', 'pred-one', '--geometry-tolerance', '1']);
  t.equal(alone.exitCode, 0, alone.stderr);
  t.notMatch(alone.stderr, /warning/, 'a tolerance of 1 mm accepts the seg');
  const flat = path.join(dir, 'flat');
  fs.mkdirSync(flat);
  for (const id of ['BraTS2021_00000', 'BraTS2021_00001']) for (const f of fs.readdirSync(path.join(dir, 'data', id))) fs.copyFileSync(path.join(dir, 'data', id, f), path.join(flat, f));
  const flatRun = await cmseg(['predict', '--checkpoint', 'runs/cm/best.safetensors', '--data', 'flat', '--out', 'pred-flat']);
  t.equal(flatRun.exitCode, 1);
  t.match(flatRun.stderr, /^cmseg: error: --data .*flat is not a BraTS case, a BraTS folder or a cmseg cache: .*flat holds the files of 2 cases side by side .*: put each case's files in a folder named by its id \(BraTS2021_00000\/BraTS2021_00000_t1\.nii\.gz \.\.\.\)\n$/);

  // BraTS 2019 layout: HGG/ and LGG/; a seg 0.5 mm off needs --geometry-tolerance.
  const b19 = path.join(dir, 'b19');
  fs.cpSync(path.join(mix, 'BraTS2021_00000'), path.join(b19, 'HGG/BraTS2021_00000'), { recursive: true });
  fs.cpSync(path.join(mix, 'BraTS2021_00002'), path.join(b19, 'LGG/BraTS2021_00002'), { recursive: true });
  fs.cpSync(path.join(dir, 'data/BraTS2021_00003'), path.join(b19, 'LGG/BraTS2021_00003'), { recursive: true });
  fs.cpSync(path.join(dir, 'pred'), path.join(b19, 'predictions'), { recursive: true });
  const strict = await cmseg(['prepare', '--data', 'b19', '--out', 'cache19', '--quiet']);
  t.equal(strict.exitCode, 1);
  t.match(strict.stderr, /\ncmseg: error: case BraTS2021_00002: .*BraTS2021_00002_seg\.nii\.gz has affine\[0\]\[3\] = .*: they put a voxel up to 0\.50 mm apart, more than the tolerance of 0\.1 mm, so the files are not on one grid \(if they are meant to be, allow it with --geometry-tolerance <mm> of cmseg prepare, train, predict or eval\)\n$/);
  const relaxed = await cmseg(['prepare', '--data', 'b19', '--out', 'cache19', '--quiet', '--geometry-tolerance', '0.6']);
  t.equal(relaxed.exitCode, 0, relaxed.stderr);
  t.equal(relaxed.stderr, `note: skipped 1 entry of ${b19} that is not a BraTS case: predictions/\n`);
  t.same(readCacheIndex(path.join(dir, 'cache19')).cases.map((c) => c.sources[0].file), ['HGG/BraTS2021_00000/BraTS2021_00000_t1.nii.gz', 'LGG/BraTS2021_00002/BraTS2021_00002_t1.nii.gz', 'LGG/BraTS2021_00003/BraTS2021_00003_t1.nii.gz']);
  const single = await cmseg(['prepare', '--data', 'b19/HGG/BraTS2021_00000', '--out', 'cache-one']);
  t.equal(single.exitCode, 1);
  t.match(single.stderr, /is the folder of the single case BraTS2021_00000: pass the folder that holds the case folders/);
  t.match(await help(['prepare', '--help']), /--geometry-tolerance <mm>[\s\S]*\(default: 0\.1\)/);
  t.match(await help(['predict', '--help']), /--geometry-tolerance <mm>/);
});

/** Rewrites a segmentation file with its labels and affine changed. */
async function rewriteSeg(file: string, change: (labels: Float32Array) => void, move?: (affine: number[][]) => void): Promise<void> {
  const seg = await readNifti(file);
  const labels = Float32Array.from(seg.data);
  change(labels);
  const affine = seg.affine.map((row) => [...row]);
  move?.(affine);
  await writeNifti(file, { dims: seg.dims, data: labels, affine: affine as typeof seg.affine }, { datatype: 'uint8' });
}

t.test('train from a raw BraTS 2023 folder: the cache is prepared inside the run', async (t) => {
  const phantom = await cmseg(['phantom', 'brats', '--cases', '3', '--out', 'data2023', '--size', SIZE, '--naming', '2023', '--quiet']);
  t.equal(phantom.exitCode, 0, phantom.stderr);
  t.equal(phantom.stderr, '');
  t.ok(fs.existsSync(path.join(dir, 'data2023/BraTS-GLI-00000-000/BraTS-GLI-00000-000-t2f.nii.gz')));
  const train = await cmseg(['train', '--preset', 'brats3d', '--data', 'data2023', '--method', 'naive-mode', '--labels', 'single', '--steps', '2', '--out', 'runs/mode', '--no-test', ...TINY]);
  t.equal(train.exitCode, 0, train.stderr);
  t.match(train.stdout, /trained naive-mode from step 0 to 2/);
  const index = readCacheIndex(path.join(dir, 'runs/mode/cache'));
  t.equal(index.cases.length, 3);
  t.equal(index.settings.mode, 'single');
  const predicted = await cmseg(['predict', '--checkpoint', 'runs/mode/last.safetensors', '--data', 'data2023', '--count', '1', '--out', 'pred2023']);
  t.equal(predicted.exitCode, 0, predicted.stderr);
  t.match(predicted.stderr, /naive-mode does not learn annotator CMs/);
  t.match(predicted.stdout, /predicted 1 case\(s\) from the BraTS folder data2023: 2 NIfTI volumes and 1 PNG picture \(labels in BraTS 2023 numbering\)/);
  const consensus = await readNifti(path.join(dir, 'pred2023', 'BraTS-GLI-00000-000_consensus.nii.gz'));
  t.same([...new Set(consensus.raw)].filter((v) => ![0, 1, 2, 3].includes(v)), [], '2023 labels: ET stays 3');
  const crop2023 = index.cases.find((c) => c.id === 'BraTS-GLI-00000-000')!.crop;
  await checkReleasedPrediction(t, path.join(dir, 'pred2023'), 'BraTS-GLI-00000-000', crop2023, '2023');
});

t.test("train's test scores of a BraTS run show each case as it is scored (hours for a release's test cases)", async (t) => {
  const loud = TINY.filter((flag) => flag !== '--quiet');
  const train = await cmseg(['train', '--preset', 'brats3d', '--data', 'data2023', '--steps', '1', '--out', 'runs/loud', '--workers', '0', ...loud]);
  t.equal(train.exitCode, 0, train.stderr);
  const test = readCacheIndex(path.join(dir, 'runs/loud/cache')).cases.length === 3 ? 1 : NaN;
  t.match(train.stderr, new RegExp(`scoring ${test} test case\\(s\\) with (best|last)\\.safetensors\\n`));
  t.match(train.stderr, /\n\[1\/1\] BraTS-GLI-\d{5}-000: total Dice \d\.\d{4}, Dice WT\/TC\/ET /, 'a line per scored case, as eval prints');
  const quiet = await cmseg(['train', '--preset', 'brats3d', '--data', 'data2023', '--steps', '1', '--out', 'runs/quiet', '--workers', '0', ...TINY]);
  t.equal(quiet.exitCode, 0, quiet.stderr);
  t.notMatch(quiet.stderr, /scoring|\[1\/1\]/, '--quiet: none of it');
});

t.test('predict legends: "a LxL grid" of CM tiles, 2D and 3D', async (t) => {
  t.match(fs.readFileSync(path.join(dir, 'pred', 'README.txt'), 'utf8'), /CM on the slice: a 4x4 grid/);
  const train = await cmseg(['train', '--preset', 'mnist-tiny', '--steps', '1', '--out', 'runs/mnist', '--no-test', '--quiet']);
  t.equal(train.exitCode, 0, train.stderr);
  const predicted = await cmseg(['predict', '--checkpoint', 'runs/mnist/last.safetensors', '--out', 'pred-2d', '--count', '1']);
  t.equal(predicted.exitCode, 0, predicted.stderr);
  const legend = fs.readFileSync(path.join(dir, 'pred-2d', 'README.txt'), 'utf8');
  t.match(legend, /pixel-wise CM: a 2x2 grid/);
  t.notMatch(legend, /\ban \d/);
});

t.test('user errors: one line, exit code 1', async (t) => {
  const cases: [string[], RegExp][] = [
    [['prepare', '--data', 'missing', '--out', 'c'], /^cmseg: error: --data folder not found: .*missing\n$/],
    [['train', '--preset', 'brats3d', '--out', 'runs/x'], /^cmseg: error: --preset brats3d needs --data: a cache made by cmseg prepare, or a BraTS folder\n$/],
    [['train', '--preset', 'brats3d', '--data', 'missing', '--out', 'runs/x'], /^cmseg: error: --data folder not found: .*missing\n$/],
    [['train', '--preset', 'brats3d', '--data', 'cache', '--patch', '20', '--out', 'runs/x'], /^cmseg: error: --patch 20 must be a multiple of 2\^\(depth-1\) = 8 \(depth 4\)\n$/],
    [['train', '--preset', 'brats3d', '--data', 'cache', '--train-images', '5', '--out', 'runs/x'], /^cmseg: error: --train-images: for the MNIST presets only\n$/],
    [['train', '--preset', 'mnist-tiny', '--patch', '16', '--out', 'runs/x'], /^cmseg: error: --patch: for the BraTS presets \(brats3d, brats3d-gpu\) only\n$/],
    [['predict', '--checkpoint', 'runs/cm/best.safetensors', '--data', 'missing', '--out', 'p'], /^cmseg: error: --data not found: .*missing\n$/],
    [['train', '--preset', 'brats3d', '--data', 'runs', '--out', 'runs/x'], /^cmseg: error: --data .*runs is neither a cmseg cache \(no index\.json\) nor a BraTS folder/],
    [['predict', '--checkpoint', 'runs/cm/best.safetensors', '--data', 'runs/cm', '--out', 'p'], /^cmseg: error: --data .*cm is not a BraTS case, a BraTS folder or a cmseg cache\n$/],
  ];
  if (!backendInfo().cuda) {
    cases.push([['train', '--preset', 'brats3d-gpu', '--data', 'cache', '--out', 'runs/x'], /^cmseg: error: --preset brats3d-gpu trains on the GPU, but this cmseg was built without the CUDA backend/]);
  }
  for (const [args, message] of cases) {
    const r = await cmseg(args);
    t.equal(r.exitCode, 1, args.join(' '));
    t.match(r.stderr, message, args.join(' '));
    t.equal(r.stderr.trim().split('\n').length, 1, `${args.join(' ')}: one line`);
  }
  t.notOk(fs.existsSync(path.join(dir, 'runs/x')), 'no run folder is left behind');
  // Bad option values are commander's errors (in a real process: the same one line, exit code 1).
  const parseErrors: [string[], RegExp][] = [
    [['prepare', '--data', 'data', '--out', 'c', '--annotators', 'over,sloppy'], /^cmseg: error: option '--annotators <kinds>' argument 'over,sloppy' is invalid\. unknown annotator kind 'sloppy'; choose from good, over, under, fracture, wrong\.\n$/],
    [['phantom', 'brats', '--cases', '2', '--out', 'p', '--size', '48,48'], /^cmseg: error: option '--size <x,y,z>' argument '48,48' is invalid\. expected three integers X,Y,Z in 8\.\.1024/],
    [['predict', '--checkpoint', 'c', '--out', 'p', '--overlap', '1'], /^cmseg: error: option '--overlap <x>' argument '1' is invalid\. expected a number >= 0 and < 1\.\n$/],
  ];
  for (const [args, message] of parseErrors) t.match(await help(args), message, args.join(' '));
});
