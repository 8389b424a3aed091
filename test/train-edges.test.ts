// Edges of training runs: an AbortSignal that fired before train() was called, an abort
// during validation, resumes of finished or empty run folders and on other data, settings a
// JavaScript caller broke, an earlier run's best checkpoint, and image folders that change
// after a run started, hold no PNG label maps or leave a split unlabelled. Tiny models on
// tiny sets (a few seconds in all).
import t, { type Test } from 'tap';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { loadImageFolder } from '../src/data/image-folder';
import { writePngSync } from '../src/data/png';
import { readCheckpoint } from '../src/model/checkpoint';
import { runCli } from './helpers/cli';
import { squaresSet } from './helpers/squares';
import { type FolderDatasetSpec, imageFolderSplits, loadExperimentData } from '../src/train/experiment';
import { AnnotatedSet, InMemorySource } from '../src/train/data';
import { readTrainLog, train, TRAIN_DEFAULTS, TrainConfig } from '../src/train/trainer';

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cmseg-train-edges-'));
t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));

const set = squaresSet();
const source = () => new InMemorySource(set, 1);
const config = (over: Partial<TrainConfig> = {}): TrainConfig => ({
  ...TRAIN_DEFAULTS,
  method: 'cm',
  depth: 2,
  baseChannels: 2,
  batchSize: 2, // 4 batches an epoch
  steps: 6,
  schedule: { kind: 'cosine', lr: 3e-3 },
  augment: { flips: true, rotations: false },
  seed: 5,
  ...over,
});
const events = (log: string) => readTrainLog(log).map((e) => `${e.event}:${e.step}`);
const stepRows = (log: string) => readTrainLog(log).filter((e) => e.event === 'step').map((e) => [e.step, e.lr, e.traceWeight, e.loss] as number[]);

let uninterrupted: Promise<number[][]> | undefined;
/** The step rows of the run never stopped (validation scores a constant). */
const fullRun = () => (uninterrupted ??= train(path.join(dir, 'full'), config(), source(), { validate: async () => ({ score: 0.5, metrics: {} }) }).then((r) => stepRows(r.files.log)));

function sameSteps(t: Test, got: number[][], expected: number[][]): void {
  t.same(got.map((row) => row.slice(0, 3)), expected.map((row) => row.slice(0, 3)), 'the same steps, rates and trace weights');
  const worst = Math.max(...got.map((row, i) => Math.abs(row[3] - expected[i][3]) / Math.abs(expected[i][3])));
  t.ok(got.length === expected.length && worst < 1e-6, `the same losses as a run never stopped (largest relative difference ${worst})`);
}

t.test('train() with a signal aborted before the call takes no step; the run then resumes exactly', async (t) => {
  const expected = await fullRun();
  t.equal(expected.length, 6);

  const out = path.join(dir, 'pre-aborted');
  const controller = new AbortController();
  controller.abort();
  const r = await train(out, config(), source(), { signal: controller.signal });
  t.equal(r.status, 'interrupted', 'an abort before the call is an interruption, as one mid-run is');
  t.equal(r.startStep, 0);
  t.equal(r.state.step, 0, 'no step taken');
  t.equal(r.model.step, 0, "the model's optimiser took no step");
  const saved = await readCheckpoint(r.files.last);
  t.equal(saved.step, 0, 'last holds the untrained model (step 0) so that --resume can continue');
  t.ok(Object.values(saved.moments!.m).every((m) => m.every((x) => x === 0)), 'the Adam moments are still zero');
  t.same(events(r.files.log), ['start:0', 'checkpoint:0', 'interrupted:0']);

  // Aborted again before a resume: nothing is trained and `last` is not rewritten.
  const before = fs.readFileSync(r.files.last);
  const again = await train(out, config(), source(), { signal: controller.signal, resume: true });
  t.equal(again.status, 'interrupted');
  t.equal(again.state.step, 0);
  t.ok(fs.readFileSync(r.files.last).equals(before), 'last is left as it was');

  const done = await train(out, config(), source(), { resume: true });
  t.equal(done.status, 'completed');
  sameSteps(t, stepRows(done.files.log), expected);

  // Resuming the finished run trains nothing and leaves its log ending in `end`.
  const logBefore = events(done.files.log);
  const finished = await train(out, config(), source(), { resume: true });
  t.equal(finished.status, 'completed');
  t.equal(finished.startStep, 6);
  t.same(events(done.files.log), logBefore, 'the log is as it was');
  t.equal(logBefore.at(-1), 'end:6');
});

t.test('an abort during validation stops after it: last saved once, then an exact resume', async (t) => {
  const out = path.join(dir, 'abort-in-validation');
  const controller = new AbortController();
  // One parameter: a quick validator (no save of `last` before it; see pending-validation.test.ts).
  const validate = async (_model: unknown) => {
    controller.abort(); // Ctrl-C while the model is being scored
    return { score: 0.5, metrics: {} };
  };
  const r = await train(out, config(), source(), { validate, signal: controller.signal });
  t.equal(r.status, 'interrupted');
  t.equal(r.state.step, 4, 'stopped at the end of the first epoch (4 batches)');
  t.same(events(r.files.log).slice(-6), ['step:4', 'epoch:4', 'validation:4', 'checkpoint:4', 'checkpoint:4', 'interrupted:4'], 'best and last, each once');
  t.equal((await readCheckpoint(r.files.last)).step, 4);
  const done = await train(out, config(), source(), { validate: async () => ({ score: 0.5, metrics: {} }), resume: true });
  sameSteps(t, stepRows(done.files.log), await fullRun());
});

t.test('resuming a folder that holds no run says so and makes no folder', async (t) => {
  const out = path.join(dir, 'never-trained', 'run');
  await t.rejects(train(out, config(), source(), { resume: true }), /^nothing to resume: .*never-trained.run.last\.safetensors does not exist$/);
  t.notOk(fs.existsSync(path.join(dir, 'never-trained')), 'no folder made for the mistyped path');
});

/** DIR/images/im<n>.png (8x8 gray, pixel (x, y) = 10 n + x + y) and labels/a/ for every image, labels/b/ for the even ones. */
function writeFolder(root: string, count: number): string[] {
  for (const sub of ['images', 'labels/a', 'labels/b']) fs.mkdirSync(path.join(root, sub), { recursive: true });
  const names: string[] = [];
  for (let n = 0; n < count; n++) {
    const name = `im${String(n).padStart(2, '0')}.png`;
    names.push(name);
    const data = Uint8Array.from({ length: 64 }, (_, i) => 10 * n + (i % 8) + Math.floor(i / 8));
    writePngSync(path.join(root, 'images', name), { width: 8, height: 8, channels: 1, data });
    const mask = Uint8Array.from({ length: 64 }, (_, i) => (i % 8 > 3 ? 255 : 0));
    writePngSync(path.join(root, 'labels/a', name), { width: 8, height: 8, channels: 1, data: mask });
    if (n % 2 === 0) writePngSync(path.join(root, 'labels/b', name), { width: 8, height: 8, channels: 1, data: mask });
  }
  return names;
}

t.test("images added to a run's folder later are not read: they cannot break its resume or eval", async (t) => {
  const root = path.join(dir, 'growing');
  const names = writeFolder(root, 10);
  const spec: FolderDatasetSpec = { kind: 'folder', root, classes: 2, labelMapping: 'binary', annotators: ['a', 'b'], dataSeed: 0, splits: imageFolderSplits(names, 0) };
  // Later: an image of another size, a file that is no PNG, and a label whose image is not there yet.
  writePngSync(path.join(root, 'images', 'new-big.png'), { width: 12, height: 12, channels: 1, data: new Uint8Array(144) });
  fs.writeFileSync(path.join(root, 'images', 'new-broken.png'), 'not a png');
  writePngSync(path.join(root, 'labels/a', 'new-later.png'), { width: 12, height: 12, channels: 1, data: new Uint8Array(144) });
  const data = loadExperimentData(spec, 0);
  const train = data.split!('train');
  t.same(train.names, spec.splits.train, "the run's training images, no others");
  t.same(train.spatial, [8, 8]);
  // Pixel (x=3, y=2) of each training image, as written: 10 n + 5.
  const pixel = train.names!.map((name, k) => Math.round(train.images[k * 64 + 2 * 8 + 3] * 255));
  t.same(pixel, train.names!.map((name) => 10 * Number(name.slice(2, 4)) + 5));
  t.same(
    [...train.present],
    train.names!.flatMap((name) => [1, Number(name.slice(2, 4)) % 2 === 0 ? 1 : 0]),
    'b labelled the even images only',
  );
  t.equal(data.split!('test').count, spec.splits.test.length);

  fs.rmSync(path.join(root, 'images', spec.splits.validation[0]));
  t.throws(() => loadExperimentData(spec, 0), new RegExp(`lacks 1 validation image\\(s\\) of this run \\(${spec.splits.validation[0].replace('.', '\\.')} in images/\\)`));
});

t.test('a folder whose label maps are no PNGs is refused before training, naming the files', async (t) => {
  const root = path.join(dir, 'jpeg-labels');
  writeFolder(root, 3);
  for (const a of ['a', 'b']) for (const name of fs.readdirSync(path.join(root, 'labels', a))) fs.renameSync(path.join(root, 'labels', a, name), path.join(root, 'labels', a, name.replace('.png', '.jpg')));
  t.throws(() => loadImageFolder(root), /no label maps in .*labels: none of a\/, b\/ holds a <name>\.png; it holds 5 other file\(s\), e\.g\. a.im00\.jpg/);
  // One annotator who labelled nothing is still a data set (an empty folder of cmseg simulate --labels single).
  fs.rmSync(path.join(root, 'labels/a'), { recursive: true });
  fs.mkdirSync(path.join(root, 'labels/a'));
  writePngSync(path.join(root, 'labels/b/im01.png'), { width: 8, height: 8, channels: 1, data: new Uint8Array(64) });
  const folder = loadImageFolder(root);
  t.same([...folder.present], [0, 0, 0, 1, 0, 0], 'only b on im01');
});

t.test('a resume on other data (annotators renamed or reordered, other classes or channels) is refused', async (t) => {
  const out = path.join(dir, 'other-data');
  const controller = new AbortController();
  const progress = { start() {}, step: (s: number) => void (s === 2 && controller.abort()), epoch() {}, stop() {} };
  t.equal((await train(out, config(), source(), { signal: controller.signal, progress })).status, 'interrupted');
  const before = fs.readFileSync(path.join(out, 'last.safetensors'));
  const resume = (changed: Partial<AnnotatedSet>) => train(out, config(), new InMemorySource({ ...set, ...changed }, 1), { resume: true });
  await t.rejects(resume({ annotatorNames: ['dilate', 'copy'] }), /cannot resume .*last\.safetensors on other data: its annotators are copy, dilate, the data's are dilate, copy/);
  await t.rejects(resume({ classes: 3 }), /on other data: 3 classes in the data, 2 in the run/);
  await t.rejects(resume({ channels: 2, images: new Float32Array(set.images.length * 2) }), /on other data: 2 image channels in the data, 1 in the run/);
  t.ok(fs.readFileSync(path.join(out, 'last.safetensors')).equals(before), 'last is left as it was');
  t.equal((await train(out, config(), source(), { resume: true })).state.step, 6, 'the run itself still resumes');
});

t.test('train --resume with another --classes names that flag, not --label-mapping', async (t) => {
  writeFolder(path.join(dir, 'cli-folder'), 10);
  const first = await runCli(['train', '--preset', 'images', '--data', 'cli-folder', '--steps', '1', '--depth', '2', '--base-channels', '2', '--no-test', '-q', '--out', 'cli-run'], dir);
  t.equal(first.exitCode, 0, first.stderr);
  const r = await runCli(['train', '--out', 'cli-run', '--resume', '--classes', '3', '-q'], dir);
  t.equal(r.exitCode, 1);
  t.match(r.stderr, /^cmseg: error: cannot resume .*cli-run.last\.safetensors with different settings: --classes 3 \(the run has 2\)\n$/);
});

t.test('an image-folder run whose validation images nobody labelled (no consensus/) is refused before training', async (t) => {
  const root = path.join(dir, 'unlabelled-validation');
  const names = writeFolder(root, 10);
  const splits = imageFolderSplits(names, 0);
  for (const name of splits.validation) for (const a of ['a', 'b']) fs.rmSync(path.join(root, 'labels', a, name), { force: true });
  const r = await runCli(['train', '--preset', 'images', '--data', 'unlabelled-validation', '--steps', '1', '--depth', '2', '--base-channels', '2', '-q', '--out', 'unlabelled-run'], dir);
  t.equal(r.exitCode, 1);
  const listed = splits.validation.join(', ').replace(/\./g, '\\.');
  t.match(r.stderr, new RegExp(`^cmseg: error: no image of the validation split of unlabelled-validation \\(${splits.validation.length}: ${listed}\\) has a label map in labels/: without consensus/ there is nothing to score it against; label some of them, or split the images differently with --data-seed\n$`));
  t.notOk(fs.existsSync(path.join(dir, 'unlabelled-run')), 'nothing trained, no run folder left');
});

t.test('settings a JavaScript caller left out or broke are refused by name before anything is written', async (t) => {
  const out = path.join(dir, 'bad-settings');
  const bad = (over: Record<string, unknown>) => train(out, { ...config(), ...over } as TrainConfig, source());
  await t.rejects(bad({ augment: undefined }), { name: 'TrainingError', message: 'augment undefined must be {flips: boolean, rotations: boolean}' });
  await t.rejects(bad({ augment: { flips: 1 } }), { name: 'TrainingError', message: 'augment {"flips":1} must be {flips: boolean, rotations: boolean}' });
  await t.rejects(bad({ schedule: undefined }), { name: 'TrainingError', message: 'schedule undefined must be {kind, lr, ...} (a learning-rate schedule)' });
  await t.rejects(bad({ schedule: { kind: 'constant', lr: NaN } }), { name: 'TrainingError', message: 'learning rate NaN must be a finite number > 0' });
  await t.rejects(bad({ schedule: { kind: 'constant', lr: 1e-46 } }), { name: 'TrainingError', message: /learning rate 1e-46 is 0 in float32/ });
  await t.rejects(bad({ steps: 0 }), { name: 'TrainingError', message: 'steps 0 must be an integer >= 1' });
  t.notOk(fs.existsSync(out), 'no run folder made');
});

t.test("a new run in a folder that holds an earlier run's best (its last deleted) keeps that best", async (t) => {
  const out = path.join(dir, 'kept-best');
  const validate = async () => ({ score: 0.5, metrics: {} });
  const first = await train(out, config({ steps: 4 }), source(), { validate });
  t.ok(first.files.best, 'the first run saved best');
  fs.rmSync(first.files.last);
  const best = fs.readFileSync(first.files.best!);
  await t.rejects(train(out, config({ steps: 4, seed: 9 }), source(), { validate }), {
    name: 'TrainingError',
    message: `${out} holds best.safetensors of an earlier run (without its last.safetensors, so it cannot be resumed); move it away or choose another output folder`,
  });
  t.ok(fs.readFileSync(first.files.best!).equals(best), 'best is left as it was');
});

t.test('consensus/ added to or taken from a run\'s folder after it started: --resume refuses (validation would switch reference)', async (t) => {
  const root = path.join(dir, 'reference');
  writeFolder(root, 10);
  const args = ['train', '--preset', 'images', '--data', 'reference', '--steps', '1', '--depth', '2', '--base-channels', '2', '--no-test', '-q'];
  const first = await runCli([...args, '--out', 'ref-vote'], dir);
  t.equal(first.exitCode, 0, first.stderr);
  fs.cpSync(path.join(root, 'labels/a'), path.join(root, 'consensus'), { recursive: true });
  const added = await runCli(['train', '--out', 'ref-vote', '--resume', '-q'], dir);
  t.equal(added.exitCode, 1);
  t.match(added.stderr, /^cmseg: error: cannot resume: the run validated against its annotators' majority vote \(it had no consensus\/\), and reference now has consensus\/; .*move consensus\/ away to resume, or start a new run\n$/);
  // Started with consensus/: taking it away is refused alike; put back, the run resumes.
  const withConsensus = await runCli([...args, '--out', 'ref-consensus'], dir);
  t.equal(withConsensus.exitCode, 0, withConsensus.stderr);
  fs.renameSync(path.join(root, 'consensus'), path.join(dir, 'consensus-aside'));
  const taken = await runCli(['train', '--out', 'ref-consensus', '--resume', '-q'], dir);
  t.equal(taken.exitCode, 1);
  t.match(taken.stderr, /the run validated against its consensus\/, and reference now has no consensus\/; .*restore consensus\/ to resume/);
  t.equal((await runCli(['train', '--out', 'ref-vote', '--resume', '-q'], dir)).exitCode, 0, 'the first run resumes as it started');
});
