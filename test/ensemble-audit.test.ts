// Audit of ensembles and TTA from the command line and the API (src/model/ensemble.ts,
// src/model/tta.ts, src/cli/inference.ts, src/cli/eval.ts), beyond test/tta-ensemble.test.ts:
// BraTS runs that each prepared their own cache of one folder scored as an ensemble on their
// common split (and runs of other data still refused); ensemble() naming the member whose
// outputs or call fail, and refusing what is not an array; the CPU fallback note naming each
// checkpoint; eval's metrics file never written over a checkpoint, a folder, or the scores of
// other data. The tests run in order and share the folder `dir`.
//
// Independent references: the hand ensemble below averages the members' own predictions in
// Float64 (the code under test keeps a Float32 running mean); the Total Dice of a volume is
// written out here as the share of voxels whose argmax class is the expert's.
import t from 'tap';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { runCli } from './helpers/cli';
import { backendInfo, createModel, type Model, setNumThreads } from '../src/model/model';
import { readSafetensors, writeSafetensors } from '../src/data/safetensors';
import { loadInference, readInferenceInfo } from '../src/cli/inference';
import { displayPath } from '../src/cli/common';
import { loadCheckpoint, saveCheckpoint } from '../src/model/checkpoint';
import { cacheCases } from '../src/data/brats-cases';
import { readCheckpointInfo } from '../src/model/checkpoint-info';
import { ensemble } from '../src/model/ensemble';
import { mirrored } from '../src/model/tta';
import { slidingWindowPredict, type SlidingWindowModel } from '../src/model/sliding-window';

setNumThreads(1);
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cmseg-ensemble-audit-'));
t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
const cli = (args: string[]) => runCli(args, dir);
const json = (file: string) => JSON.parse(fs.readFileSync(path.join(dir, file), 'utf8'));

type Outputs = { probs: Float32Array; cms?: Float32Array; annotatorProbs?: Float32Array };

/** The plain mean of the members' outputs, summed in Float64. */
function handEnsemble(members: readonly SlidingWindowModel[]): SlidingWindowModel {
  return {
    config: { ...members[0].config, depth: Math.max(...members.map((m) => m.config.depth)) },
    predict: async (images, shape, options = {}) => {
      const sums: Record<string, Float64Array> = {};
      for (const m of members) {
        const p = (await m.predict(images, shape, options)) as Outputs;
        for (const name of ['probs', 'cms', 'annotatorProbs'] as const) {
          const values = p[name];
          if (!values) continue;
          const sum = (sums[name] ??= new Float64Array(values.length));
          values.forEach((x, i) => (sum[i] += x));
        }
      }
      const mean = (name: string) => (sums[name] ? Float32Array.from(sums[name], (x) => x / members.length) : undefined);
      return { probs: mean('probs')!, ...(sums.cms ? { cms: mean('cms') } : {}), ...(sums.annotatorProbs ? { annotatorProbs: mean('annotatorProbs') } : {}) };
    },
  };
}

t.test('BraTS runs trained from one BraTS folder (each prepared into its own <out>/cache) score their common test split as an ensemble', async (t) => {
  const phantom = await cli(['phantom', 'brats', '--cases', '4', '--out', 'brats', '--size', '32,32,24', '--seed', '4']);
  t.equal(phantom.exitCode, 0, phantom.stderr);
  const train = (out: string, extra: string[]) =>
    cli(['train', '--preset', 'brats3d', '--data', 'brats', '--steps', '1', '--out', out, '--workers', '0', '--no-test', '--patch', '16', '--base-channels', '4', '--val-cases', '1', '--quiet', ...extra]);
  for (const [out, extra] of [
    ['runs/a', ['--seed', '0']],
    ['runs/b', ['--seed', '1']],
    ['runs/other-split', ['--seed', '2', '--data-seed', '5']],
  ] as const) {
    const r = await train(out, [...extra]);
    t.equal(r.exitCode, 0, r.stderr);
    t.ok(fs.existsSync(path.join(dir, out, 'cache', 'index.json')), `${out} prepared the folder into its own cache`);
  }
  const [a, b] = ['runs/a/best.safetensors', 'runs/b/best.safetensors'];

  // The two runs read the same cases with the same settings and split them alike: the
  // ensemble scores run a's test split (README: "the others must have been trained on the
  // same data and split"). It was refused for the cache paths alone, and the remedy it gave,
  // --data, scores every case, the training cases included.
  const both = await cli(['eval', '--checkpoint', a, b, '--out', 'both.json']);
  t.equal(both.exitCode, 0, both.stderr);
  const record = json('both.json');
  t.equal(record.metrics.images, 1, 'the one test case');

  // What the score must be: both checkpoints loaded through the API, the test case (read from
  // run a's cache) windowed as eval does (the training patch 16, overlap 0.5), each window the
  // Float64 mean of the two predictions, and the Total Dice of that by its definition.
  const members = [await loadCheckpoint(path.join(dir, a)), await loadCheckpoint(path.join(dir, b))];
  t.teardown(() => Promise.all(members.map((m) => m.dispose())));
  const info = await readCheckpointInfo(path.join(dir, a));
  const testIds = (info.recipe!.dataset as { splits: { test: string[] } }).splits.test;
  t.same(record.metrics.perCase.map((c: { id: string }) => c.id), testIds, "run a's test split");
  const list = cacheCases(path.join(dir, 'runs/a/cache'), testIds, true);
  const c = await list.load(testIds[0]);
  const byHand = await slidingWindowPredict(handEnsemble(members), c.images, c.extent, { patch: [16, 16, 16], overlap: 0.5, batchSize: 2 });
  const V = c.extent.d * c.extent.h * c.extent.w;
  let agree = 0;
  for (let v = 0; v < V; v++) {
    let best = 0;
    for (let k = 1; k < 4; k++) if (byHand.probs[k * V + v] > byHand.probs[best * V + v]) best = k;
    if (best === c.seg![v]) agree++;
  }
  // Float32 running mean vs Float64 mean: an argmax may flip at a near tie; one voxel at most here.
  t.ok(Math.abs(record.metrics.totalDice.mean - agree / V) <= 1 / V, `Total Dice ${record.metrics.totalDice.mean} = the hand ensemble's ${agree / V}`);

  // A run folder moved away (its recorded cache gone; eval reads <out>/cache beside the checkpoint).
  fs.renameSync(path.join(dir, 'runs/b'), path.join(dir, 'runs/b-moved'));
  const moved = await cli(['eval', '--checkpoint', a, 'runs/b-moved/best.safetensors', '--out', 'moved.json']);
  t.equal(moved.exitCode, 0, moved.stderr);
  t.same(json('moved.json').metrics.totalDice, record.metrics.totalDice, 'the same scores');

  // Still refused: a run with another split (its test case may be run a's training case).
  const other = await cli(['eval', '--checkpoint', a, 'runs/other-split/best.safetensors']);
  t.equal(other.exitCode, 1);
  t.match(other.stderr, /^cmseg: error: runs\/other-split\/best\.safetensors was trained on other data than runs\/a\/best\.safetensors \(dataset\.splits differ\)/);

  // Still refused: a cache of other content at another path (the annotators simulated again).
  const prepare = await cli(['prepare', '--data', 'brats', '--out', 'cache-other', '--annotators', 'good,over,under', '--quiet']);
  t.equal(prepare.exitCode, 0, prepare.stderr);
  const index = JSON.parse(fs.readFileSync(path.join(dir, 'runs/a/cache/index.json'), 'utf8'));
  const otherIndex = JSON.parse(fs.readFileSync(path.join(dir, 'cache-other/index.json'), 'utf8'));
  t.notSame(otherIndex.settings, index.settings, 'the other cache was prepared with other settings');
  const c2 = await train('runs/c', ['--seed', '3']);
  t.equal(c2.exitCode, 0, c2.stderr);
  fs.rmSync(path.join(dir, 'runs/c/cache'), { recursive: true });
  fs.renameSync(path.join(dir, 'cache-other'), path.join(dir, 'runs/c/cache'));
  const otherCache = await cli(['eval', '--checkpoint', a, 'runs/c/best.safetensors']);
  t.equal(otherCache.exitCode, 1);
  t.match(otherCache.stderr, /was trained on other data than runs\/a\/best\.safetensors \(dataset\.cache: .*runs\/c\/cache.* holds other cases or settings than .*runs\/a\/cache/);
});

t.test('ensemble(): a member whose outputs do not match, or that fails, is named; the order of the members does not decide', async (t) => {
  const shape = [1, 1, 8, 12];
  const images = Float32Array.from({ length: 96 }, (_, i) => Math.sin(i * 1.3));
  const a = createModel({ ndim: 2, classes: 3, annotators: 2, depth: 2, baseChannels: 4, seed: 1 });
  const b = createModel({ ndim: 2, classes: 3, annotators: 2, depth: 3, baseChannels: 4, seed: 2 });
  t.teardown(() => Promise.all([a.dispose(), b.dispose()]));
  // A member that gives the consensus only, whatever it is asked for (as a hand-written model may).
  const consensusOnly: SlidingWindowModel = { config: a.config, predict: async (x, s) => ({ probs: (await a.predict(x, s)).probs }) };
  // Second: its missing CMs were an error; first: the ensemble returned no CMs at all, without a word.
  await t.rejects(ensemble([a, consensusOnly]).predict(images, shape, { cms: true }), { name: 'RangeError', message: /^ensemble member 1 returned no cms, member 0 \d+ values/ });
  await t.rejects(ensemble([consensusOnly, a]).predict(images, shape, { cms: true }), { name: 'RangeError', message: /^ensemble member 1 returned cms \(\d+ values\), member 0 none/ });
  // Without CMs asked for, the two agree and average.
  const p = await ensemble([consensusOnly, a]).predict(images, shape);
  const plain = await a.predict(images, shape);
  t.same([...p.probs], [...plain.probs], 'one model twice: its probabilities');

  // A member that fails names itself: "this model was disposed" said nothing of which one.
  const c = createModel({ ndim: 2, classes: 3, annotators: 2, depth: 2, baseChannels: 4, seed: 3 });
  const [three, tta] = [ensemble([a, b, c]), mirrored(ensemble([a, c]))];
  await c.dispose();
  await t.rejects(three.predict(images, shape), { message: /^ensemble member 2: this model was disposed$/, code: 'CMSEG_DISPOSED' });
  await t.rejects(tta.predict(images, shape), { message: /^ensemble member 1: this model was disposed$/ });
  t.throws(() => ensemble([a, c]), { message: /^ensemble member 1: this model was disposed$/, code: 'CMSEG_DISPOSED' }, 'and when the ensemble is made');
});

t.test('ensemble() of something other than an array of models says what it got', async (t) => {
  const a = createModel({ ndim: 2, classes: 3, annotators: 2, depth: 2, baseChannels: 4, seed: 1 });
  const b = createModel({ ndim: 2, classes: 3, annotators: 2, depth: 2, baseChannels: 4, seed: 2 });
  t.teardown(() => Promise.all([a.dispose(), b.dispose()]));
  // ensemble(a, b) (the brackets forgotten) and a Set of models said "needs at least one model".
  t.throws(() => (ensemble as (...m: unknown[]) => unknown)(a, b), { name: 'TypeError', message: /^ensemble expects an array of models \(ensemble\(\[a, b\]\)\), got a model/ });
  t.throws(() => ensemble(new Set([a, b]) as unknown as Model[]), { name: 'TypeError', message: /^ensemble expects an array of models \(ensemble\(\[a, b\]\)\), got a Set/ });
  t.throws(() => ensemble([]), { name: 'RangeError', message: /^ensemble needs at least one model$/ });
});

t.test("an ensemble's CPU fallback note names each GPU-trained checkpoint", { skip: backendInfo().gpuAvailable ? 'a GPU is present: no fallback to test' : false }, async (t) => {
  const files = ['gpu-a.safetensors', 'gpu-b.safetensors'].map((f) => path.join(dir, f));
  for (const [i, file] of files.entries()) {
    const model = createModel({ ndim: 2, classes: 2, annotators: 1, depth: 2, baseChannels: 2, seed: i });
    await saveCheckpoint(model, file);
    await model.dispose();
    // What a GPU model's checkpoint records (saveCheckpoint of a CPU model says 'cpu').
    const f = await readSafetensors(file);
    const config = JSON.parse(f.metadata.config);
    config.device = 'cuda';
    await writeSafetensors(file, Object.fromEntries(Object.entries(f.tensors).map(([k, v]) => [k, { data: v.data, shape: v.shape }])), { ...f.metadata, config: JSON.stringify(config) });
  }
  let stderr = '';
  const write = process.stderr.write.bind(process.stderr);
  process.stderr.write = ((chunk: string) => ((stderr += chunk), true)) as typeof process.stderr.write;
  let loaded: Awaited<ReturnType<typeof loadInference>> | undefined;
  try {
    loaded = await loadInference(await readInferenceInfo(files), {});
  } finally {
    process.stderr.write = write;
    await loaded?.dispose();
  }
  // Said twice as "this checkpoint was trained on the GPU": which one?
  for (const file of files) t.match(stderr, `note: ${displayPath(file)} was trained on the GPU; no GPU can run it here, so it runs on the CPU\n`);
});

t.test('eval --out never overwrites a checkpoint with the metrics', async (t) => {
  for (const name of ['m1', 'm2']) {
    const model = createModel({ ndim: 2, classes: 2, annotators: 1, depth: 2, baseChannels: 2, seed: name === 'm1' ? 1 : 2 });
    await saveCheckpoint(model, path.join(dir, `${name}.safetensors`));
    await model.dispose();
  }
  fs.mkdirSync(path.join(dir, 'pngs/images'), { recursive: true });
  fs.mkdirSync(path.join(dir, 'pngs/consensus'), { recursive: true });
  // One 8x8 image and its consensus, as PNGs (gray, 8 bits).
  const { writePng } = await import('../src/data/png');
  const pixels = Uint8Array.from({ length: 64 }, (_, i) => (i * 37) % 256);
  await writePng(path.join(dir, 'pngs/images/x.png'), { width: 8, height: 8, channels: 1, data: pixels });
  await writePng(path.join(dir, 'pngs/consensus/x.png'), { width: 8, height: 8, channels: 1, data: pixels.map((v) => (v > 127 ? 255 : 0)) });
  const before = fs.readFileSync(path.join(dir, 'm2.safetensors'));
  fs.symlinkSync(path.join(dir, 'm2.safetensors'), path.join(dir, 'm2-link.safetensors'));
  fs.symlinkSync(path.join(dir, 'm2.safetensors'), path.join(dir, 'm2-link.json'));
  for (const out of ['m2.safetensors', 'm2-link.safetensors', 'm1.safetensors', 'm2-link.json']) {
    const r = await cli(['eval', '--checkpoint', 'm1.safetensors', 'm2.safetensors', '--data', 'pngs', '--out', out]);
    t.equal(r.exitCode, 1, `--out ${out}: refused`);
    t.match(r.stderr, /^cmseg: error: cannot write the metrics file .*\.(safetensors|json): it is a checkpoint \(a safetensors file\), not a metrics JSON/);
  }
  t.ok(fs.readFileSync(path.join(dir, 'm2.safetensors')).equals(before), 'the checkpoint is as it was (it was overwritten with the metrics JSON)');
  const ok = await cli(['eval', '--checkpoint', 'm1.safetensors', 'm2.safetensors', '--data', 'pngs', '--out', 'scores.json']);
  t.equal(ok.exitCode, 0, ok.stderr);
  t.same(json('scores.json').checkpoints, [path.join(dir, 'm1.safetensors'), path.join(dir, 'm2.safetensors')]);
});

t.test("eval's default metrics file never replaces the scores of other data", async (t) => {
  const train = await cli(['train', '--preset', 'mnist-tiny', '--steps', '1', '--out', 'runs/mnist', '--no-test', '--quiet']);
  t.equal(train.exitCode, 0, train.stderr);
  const ckpt = 'runs/mnist/best.safetensors';
  const { writePng } = await import('../src/data/png');
  for (const site of ['siteA', 'siteB']) {
    fs.mkdirSync(path.join(dir, site, 'test/images'), { recursive: true });
    fs.mkdirSync(path.join(dir, site, 'test/consensus'), { recursive: true });
    const pixels = Uint8Array.from({ length: 28 * 28 }, (_, i) => ((i + (site === 'siteA' ? 0 : 50)) * 37) % 256);
    await writePng(path.join(dir, site, 'test/images/x.png'), { width: 28, height: 28, channels: 1, data: pixels });
    await writePng(path.join(dir, site, 'test/consensus/x.png'), { width: 28, height: 28, channels: 1, data: pixels.map((v) => (v > 127 ? 255 : 0)) });
  }
  const file = 'runs/mnist/eval-test-best.json';
  const split = await cli(['eval', '--checkpoint', ckpt, '--split', 'test']);
  t.equal(split.exitCode, 0, split.stderr);
  t.equal(json(file).split, 'test', "the run's test split scored into eval-test-best.json");
  const splitScores = fs.readFileSync(path.join(dir, file), 'utf8');
  // A folder named "test" of new images has the same default name: its scores replaced the split's.
  const siteA = await cli(['eval', '--checkpoint', ckpt, '--data', 'siteA/test']);
  t.equal(siteA.exitCode, 1, 'refused before anything is evaluated');
  t.match(siteA.stderr, /^cmseg: error: the default metrics file runs\/mnist\/eval-test-best\.json holds the scores of the run's test split, not of siteA\/test: name this one's file with --out \(nothing was evaluated\)\n$/);
  t.equal(fs.readFileSync(path.join(dir, file), 'utf8'), splitScores, "the split's scores are still there");
  const outA = await cli(['eval', '--checkpoint', ckpt, '--data', 'siteA/test', '--out', 'siteA.json']);
  t.equal(outA.exitCode, 0, outA.stderr);
  // Two folders of one name.
  fs.rmSync(path.join(dir, file));
  t.equal((await cli(['eval', '--checkpoint', ckpt, '--data', 'siteA/test'])).exitCode, 0);
  const siteB = await cli(['eval', '--checkpoint', ckpt, '--data', 'siteB/test']);
  t.equal(siteB.exitCode, 1);
  t.match(siteB.stderr, /holds the scores of siteA\/test, not of siteB\/test: name this one's file with --out/);
  t.equal(json(file).data, path.join(dir, 'siteA/test'));
  // The same data again: its own file, rewritten.
  const again = await cli(['eval', '--checkpoint', ckpt, '--data', 'siteA/test']);
  t.equal(again.exitCode, 0, again.stderr);
});

t.test('eval --out naming a folder is refused before the evaluation, not after it', async (t) => {
  // The checkpoints and images of the test above.
  fs.mkdirSync(path.join(dir, 'a-folder'));
  const r = await cli(['eval', '--checkpoint', 'm1.safetensors', 'm2.safetensors', '--data', 'pngs', '--out', 'a-folder']);
  t.equal(r.exitCode, 1);
  // It scored every image first, printed the tables, then failed: "a folder of that name is in the way".
  t.equal(r.stdout, '', 'nothing evaluated or printed');
  t.match(r.stderr, /^cmseg: error: cannot write the metrics file a-folder: it is a folder; name a file, e\.g\. a-folder\/eval-pngs-m1-ensemble2-[0-9a-f]{8}\.json \(nothing was evaluated\)\n$/);
  t.same(fs.readdirSync(path.join(dir, 'a-folder')), [], 'nothing written into it');
});

t.test('flipSpatial (exported) into its own input, or an overlapping view, flips as into a fresh array', async (t) => {
  const { flipSpatial } = await import('../src/model/tta');
  // [h, w] = [2, 3]: rows [0 1 2] and [3 4 5]. Flipped by hand.
  const byHand: Record<string, number[]> = { '0': [3, 4, 5, 0, 1, 2], '1': [2, 1, 0, 5, 4, 3], '0,1': [5, 4, 3, 2, 1, 0] };
  for (const axes of [[0], [1], [0, 1]]) {
    const data = Float32Array.from([0, 1, 2, 3, 4, 5]);
    t.same([...flipSpatial(data, 1, [2, 3], axes)], byHand[axes.join()], `[${axes}] into a new array`);
    // In place: rows were read after they had been written ([5, 4, 3, 3, 4, 5] for both axes).
    t.same([...flipSpatial(data, 1, [2, 3], axes, data)], byHand[axes.join()], `[${axes}] in place`);
    t.same([...data], byHand[axes.join()], `[${axes}] in place: the array holds the flip`);
    const buffer = new Float32Array(8);
    buffer.set([0, 1, 2, 3, 4, 5], 0);
    flipSpatial(buffer.subarray(0, 6), 1, [2, 3], axes, buffer.subarray(2, 8));
    t.same([...buffer.subarray(2, 8)], byHand[axes.join()], `[${axes}] into an overlapping view`);
  }
});
