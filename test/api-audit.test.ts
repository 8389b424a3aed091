// The typed API as a library consumer sees it (import { ... } from 'cmseg'), h-api's audit:
// - the error classes the exported calls throw are exported too, for `instanceof`;
// - Rng (augmentBatch's and TrainingSource.batch's argument) can be constructed;
// - ensemble() and mirrored() take their inputs at call time, as a Model does: the later
//   members / mirrorings read the images, shape and options the call was given, not what
//   the caller's arrays hold by then;
// - gatherBatch / InMemorySource refuse a set whose arrays do not fit its sizes, and indices
//   past it, instead of batches padded with zeros;
// - a strict consumer (--strict --exactOptionalPropertyTypes --noUncheckedIndexedAccess,
//   skipLibCheck off) type-checks realistic use against the emitted declarations, and the
//   names it uses exist at runtime through both require() and import.
// Independent references: member predictions of the original images averaged in Float64
// here; a mirror written index by index (flipW); hand-written lengths. Tiny models (depth 2,
// base width 4, 8x8 images): the whole file takes about 30 s, most of it tsc.
import t from 'tap';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { spawnSync } from 'child_process';
import * as api from '../src/index';
import {
  createModel, ensemble, mirrored, gatherBatch, InMemorySource, readNifti, readPng, readCheckpoint, loadCheckpoint,
  loadImageFolder, readCacheIndex, lockRunFolder, type AnnotatedSet,
} from '../src/index';

const root = path.resolve(__dirname, '..');
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cmseg-api-audit-'));
t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
api.setNumThreads(1);

const cfg = { ndim: 2 as const, inChannels: 1, classes: 3, annotators: 2, depth: 2, baseChannels: 4 };
const shape = [2, 1, 8, 8];
const V = 64;
const inputs = (seed: number) => Float32Array.from({ length: 2 * V }, (_, i) => Math.sin(i * 12.9898 + seed * 78.233) * 0.9);
const OUTPUTS = ['probs', 'cms', 'annotatorProbs'] as const;

function maxDiff(a: ArrayLike<number> | undefined, b: ArrayLike<number> | undefined): number {
  if (!a || !b || a.length !== b.length) return Infinity;
  let worst = 0;
  for (let i = 0; i < a.length; i++) worst = Math.max(worst, Math.abs(a[i] - b[i]));
  return worst;
}

/** [N, K, H, W] mirrored along W, index by index. */
function flipW(data: Float32Array, W: number): Float32Array {
  const out = new Float32Array(data.length);
  for (let i = 0; i < data.length; i++) {
    const x = i % W;
    out[i] = data[i - x + (W - 1 - x)];
  }
  return out;
}

t.test('the error classes the exported calls throw are exported for instanceof', async (t) => {
  const junk = path.join(dir, 'junk.bin');
  fs.writeFileSync(junk, 'not any image format at all, just text\n'.repeat(20));
  const caught = async (f: () => unknown) => {
    try {
      await f();
    } catch (err) {
      return err;
    }
    return undefined;
  };
  const cases: [string, () => unknown][] = [
    ['NiftiError', () => readNifti(junk)],
    ['PngError', () => readPng(junk)],
    ['SafetensorsError', () => readCheckpoint(junk)],
    ['MissingFileError', () => loadCheckpoint(path.join(dir, 'absent.safetensors'))],
    ['ImageFolderError', () => loadImageFolder(dir)],
    ['CacheError', () => { fs.writeFileSync(path.join(dir, 'cache-index.json'), '{'); return readCacheIndex(dir); }],
  ];
  for (const [name, call] of cases) {
    const err = await caught(call);
    const cls = (api as unknown as Record<string, unknown>)[name];
    t.equal(typeof cls, 'function', `${name} is exported`);
    if (typeof cls !== 'function') continue;
    t.ok(err instanceof (cls as new () => Error), `${name}: the error is an instance of the exported class (got ${(err as Error)?.name}: ${(err as Error)?.message})`);
    t.ok(err instanceof Error, `${name} is an Error`);
    t.equal((err as Error).name, name, `${name}: name`);
  }
  // A second lock on one run folder in one process: RunFolderBusyError, a TrainingError.
  const run = path.join(dir, 'run');
  const lock = lockRunFolder(run);
  const busy = await caught(() => lockRunFolder(run));
  lock.release();
  t.ok(busy instanceof api.RunFolderBusyError && busy instanceof api.TrainingError, 'RunFolderBusyError is a TrainingError');
  for (const name of ['UserError', 'BratsError', 'PatchLoaderError', 'AtomicWriteError', 'LockHeldError']) {
    const cls = (api as unknown as Record<string, unknown>)[name] as { prototype: unknown } | undefined;
    t.ok(typeof cls === 'function' && cls.prototype instanceof Error, `${name} is exported, an Error subclass`);
  }
  // The native engine's errors are plain Errors with a code.
  const model = createModel(cfg);
  const bad = await caught(() => model.predict(new Float32Array(3), shape));
  t.equal((bad as { code?: string }).code, 'CMSEG_INVALID_ARGUMENT');
  await model.dispose();
  t.equal((await caught(() => model.predict(inputs(0), shape)) as { code?: string }).code, 'CMSEG_DISPOSED');
});

t.test('Rng is exported: augmentBatch can be called from outside', async (t) => {
  const Rng = (api as unknown as { Rng?: new (seed: number) => unknown }).Rng;
  t.equal(typeof Rng, 'function', 'Rng is exported');
  if (!Rng) return;
  const labels = [Uint8Array.from({ length: V }, (_, i) => (i % 8 < 2 ? 1 : 0))];
  const batch = { images: Float32Array.from({ length: V }, (_, i) => i % 8), shape: [1, 1, 8, 8], labels, present: new Uint8Array([1]) };
  // Flips only, drawn from seeds until one flips along W: image and labels move together.
  let flippedW = false;
  for (let seed = 0; seed < 64 && !flippedW; seed++) {
    const out = api.augmentBatch(batch, { flips: true, rotations: false }, new Rng(seed) as Parameters<typeof api.augmentBatch>[2]);
    if (out.images[0] === 7 && out.images[1] === 6) {
      flippedW = true;
      t.equal(out.labels[0]![7], 1, 'labels flipped with the image');
      t.equal(out.labels[0]![0], 0);
    }
  }
  t.ok(flippedW, 'some seed flips along W');
});

t.test('ensemble() and mirrored() take the inputs as they were when the call was made', async (t) => {
  const a = createModel({ ...cfg, seed: 1 });
  const b = createModel({ ...cfg, seed: 2 });
  t.teardown(() => Promise.all([a.dispose(), b.dispose()]));
  const original = inputs(1);
  const all = { cms: true, annotatorProbs: true };
  const [pa, pb] = [await a.predict(original, shape, all), await b.predict(original, shape, all)];
  const expected = Object.fromEntries(OUTPUTS.map((k) => [k, Float64Array.from(pa[k]!, (x, i) => (x + pb[k]![i]) / 2)]));

  // The caller refills its buffer and reuses its shape and options at once.
  const images = original.slice();
  const given = [...shape];
  const options = { ...all };
  const pending = ensemble([a, b]).predict(images, given, options);
  images.fill(0.5);
  given[2] = 4;
  given[3] = 16;
  options.cms = false;
  const got = await pending;
  t.same([got.probsShape, got.cmsShape], [[2, 3, 8, 8], [2, 2, 3, 3, 8, 8]], "a Model's shapes come through ensemble(), of the shape given");
  for (const k of OUTPUTS) t.ok(maxDiff(got[k], expected[k]) < 2e-6, `ensemble ${k}: the mean of the members' predictions of the images given (max diff ${maxDiff(got[k], expected[k])})`);

  // mirrored along W: (p(x) + flip(p(flip(x)))) / 2, each output flipped back index by index.
  const flippedIn = await a.predict(flipW(original, 8), shape, all);
  const mirrorMean = Object.fromEntries(OUTPUTS.map((k) => {
    const back = flipW(flippedIn[k]!, 8);
    return [k, Float64Array.from(pa[k]!, (x, i) => (x + back[i]) / 2)];
  }));
  const images2 = original.slice();
  const options2 = { ...all };
  const pending2 = mirrored(a, [1]).predict(images2, [...shape], options2);
  images2.fill(-0.25);
  options2.annotatorProbs = false;
  const got2 = await pending2;
  t.same(got2.probsShape, [2, 3, 8, 8], "a Model's shapes come through mirrored()");
  for (const k of OUTPUTS) t.ok(maxDiff(got2[k], mirrorMean[k]) < 2e-6, `mirrored ${k}: the mean over the mirrorings of the images given (max diff ${maxDiff(got2[k], mirrorMean[k])})`);
  t.same(images2.slice(0, 3), new Float32Array(3).fill(-0.25), "the caller's buffer is left as the caller set it");
});

t.test('gatherBatch and InMemorySource refuse sets that do not fit their sizes, and indices past them', async (t) => {
  const N = 3;
  const set = (over: Partial<AnnotatedSet> = {}): AnnotatedSet => ({
    count: N, channels: 1, classes: 2, spatial: [4, 4],
    images: Float32Array.from({ length: N * 16 }, (_, i) => 1 + i),
    labels: [new Uint8Array(N * 16).fill(1), new Uint8Array(N * 16)],
    present: new Uint8Array(N * 2).fill(1), annotatorNames: ['a', 'b'], ...over,
  });
  // Consistent: image 2's values are 33..48, its labels 1 and 0, present 1.
  const ok = gatherBatch(set(), [2]);
  t.same([ok.images[0], ok.images[15], ok.labels[0]![0], ok.present[1]], [33, 48, 1, 1]);
  t.same(ok.shape, [1, 1, 4, 4]);

  t.throws(() => gatherBatch(set(), [3]), { name: 'RangeError', message: /indices\[0\] = 3 is not an image of the set \(0\.\.2\)/ }, 'index past the set');
  t.throws(() => gatherBatch(set(), [0, 1.5]), { name: 'RangeError', message: /indices\[1\] = 1\.5/ }, 'fractional index');
  t.throws(() => gatherBatch(set({ images: new Float32Array(N * 16 - 1) }), [0]), { name: 'RangeError', message: /images has 47 values, \[count, channels, \*spatial\] = 48/ });
  t.throws(() => gatherBatch(set({ spatial: [8, 8] }), [0]), { name: 'RangeError', message: /images has 48 values.* = 192/ }, 'spatial size that is not the arrays');
  t.throws(() => gatherBatch(set({ labels: [new Uint8Array(48), new Uint8Array(32)] }), [0]), { name: 'RangeError', message: /labels\[1\] has 32 values/ });
  t.throws(() => gatherBatch(set({ present: new Uint8Array(3) }), [0]), { name: 'RangeError', message: /present has 3 values, \[count, 2 annotators\] = 6/ });
  t.throws(() => gatherBatch(set({ consensus: new Uint8Array(16) }), [0]), { name: 'RangeError', message: /consensus has 16 values/ });
  t.throws(() => gatherBatch(set({ spatial: [4, 4, 1, 1] }), [0]), { name: 'RangeError', message: /spatial must be \[H, W\] or \[D, H, W\]/ });
  t.throws(() => new InMemorySource(set({ images: new Float32Array(16) }), 0), { name: 'RangeError', message: /the training set: images has 16 values/ });
  t.throws(() => new InMemorySource(set({ annotatorNames: ['a'] }), 0), { name: 'RangeError', message: /2 label maps and 1 annotator names/ });

  const source = new InMemorySource(set(), 0);
  t.equal(source.batchesPerEpoch(2), 1);
  t.equal(source.batch(0, 0, 2).shape[0], 2);
  t.throws(() => source.batch(0, 1, 2), { name: 'RangeError', message: /batch index 1 is not one of the epoch's 1 batches/ }, 'a batch past the epoch had 0 images');
  t.throws(() => source.batch(0, 0, 0), { name: 'RangeError', message: /batchSize = 0/ });
  t.throws(() => source.batchesPerEpoch(0), { name: 'RangeError', message: /batchSize = 0 must be an integer >= 1/ }, '0 gave Infinity batches');
});

t.test("a model's resolved device is 'cpu' or 'cuda', never 'auto'", async (t) => {
  const m = createModel({ ...cfg, device: 'auto' });
  t.ok(m.config.device === 'cpu' || m.config.device === 'cuda', `device ${m.config.device}`);
  t.equal(m.config.device, api.backendInfo().gpuAvailable ? 'cuda' : 'cpu');
  await m.dispose();
});

const tscBin = path.join(root, 'node_modules', 'typescript', 'bin', 'tsc');

t.test('a strict consumer type-checks realistic use against the declarations, and the names exist at runtime', async (t) => {
  // The package as installed: package.json and declarations emitted from src/ (the compiled
  // JavaScript comes from the same emit, to check the names at runtime).
  const installed = path.join(dir, 'consumer', 'node_modules', 'cmseg');
  fs.mkdirSync(installed, { recursive: true });
  fs.copyFileSync(path.join(root, 'package.json'), path.join(installed, 'package.json'));
  fs.symlinkSync(path.join(root, 'build'), path.join(installed, 'build'), 'dir');
  const emit = spawnSync(process.execPath, [tscBin, '-p', path.join(root, 'tsconfig.json'), '--sourceMap', 'false', '--outDir', path.join(installed, 'dist')], { encoding: 'utf8', timeout: 120_000 });
  t.equal(emit.status, 0, emit.stdout);
  const consumer = path.join(dir, 'consumer');
  fs.writeFileSync(path.join(consumer, 'use.ts'), `
import {
  createModel, ensemble, mirrored, flipSpatial, readNifti, NiftiError, SafetensorsError, MissingFileError, UserError, Rng, augmentBatch,
  presetByName, gatherBatch, type Preset, type ModelConfig, type Batch, type AnnotatedSet, type PredictingModel,
  type NiftiWriteOptions, type EvaluateOptions, type SimulateOptions,
} from 'cmseg';

export async function use(file: string): Promise<string> {
  const config: ModelConfig = { ndim: 2, classes: 2, annotators: 1, depth: 2, baseChannels: 4, device: 'auto' };
  const model = createModel(config);
  // The resolved device is what a caller switches on: two cases, no 'auto'.
  const device: 'cpu' | 'cuda' = model.config.device;
  const batch: Batch = { images: new Float32Array(64), shape: [1, 1, 8, 8], labels: [new Uint8Array(64)] };
  const step = await model.trainStep(batch);
  const first: number | undefined = step.ce[0];
  // mirrored() and ensemble() of Models predict what a Model does, shapes included (README).
  const both = mirrored(ensemble([model, model]), [0]);
  const p = await both.predict(batch.images, batch.shape, { cms: true });
  const cms: Float32Array | undefined = p.cms;
  const probsShape: number[] = p.probsShape;
  const asPredicting: PredictingModel = both;
  const preset: Preset = presetByName('mnist-tiny');
  const set: AnnotatedSet = { count: 1, channels: 1, classes: 2, spatial: [8, 8], images: batch.images, labels: [new Uint8Array(64)], present: new Uint8Array([1]), annotatorNames: ['a'] };
  const augmented = augmentBatch(gatherBatch(set, [0]), { flips: true, rotations: true }, new Rng(7));
  const write: NiftiWriteOptions = {};
  const evaluate: EvaluateOptions = {};
  const simulate: SimulateOptions = { seed: 1 };
  // flipSpatial into a buffer of the caller's (any Float32Array, a prediction's output here).
  const into: Float32Array = new Float32Array(p.probs.length);
  const flipped = flipSpatial(p.probs, 2, [8, 8], [1], into);
  try {
    await readNifti(file);
  } catch (err) {
    if (err instanceof NiftiError) return err.kind;
    if (err instanceof MissingFileError) return err.path;
    if (err instanceof SafetensorsError || err instanceof UserError) return err.message;
    throw err;
  }
  return [device, first, cms?.length, probsShape, asPredicting.config.classes, flipped.length, preset.name, augmented.shape.join('x'), write, evaluate, simulate.seed].join(' ');
}
`);
  fs.writeFileSync(path.join(consumer, 'tsconfig.json'), JSON.stringify({
    compilerOptions: {
      target: 'ES2022', module: 'nodenext', moduleResolution: 'nodenext', strict: true, exactOptionalPropertyTypes: true,
      noUncheckedIndexedAccess: true, skipLibCheck: false, noEmit: true, types: ['node'], typeRoots: [path.join(root, 'node_modules', '@types')],
    },
    include: ['use.ts'],
  }));
  const check = spawnSync(process.execPath, [tscBin, '-p', path.join(consumer, 'tsconfig.json')], { cwd: consumer, encoding: 'utf8', timeout: 120_000 });
  t.equal(check.status, 0, `strict consumer:\n${check.stdout}`);

  // The same names through require() and import (Node's scan of the CommonJS exports).
  const names = ['NiftiError', 'PngError', 'SafetensorsError', 'MissingFileError', 'UserError', 'CacheError', 'BratsError', 'ImageFolderError', 'Rng', 'ensemble', 'mirrored'];
  fs.writeFileSync(path.join(consumer, 'names.mjs'), `
import * as esm from 'cmseg';
import { createRequire } from 'node:module';
const cjs = createRequire(import.meta.url)('cmseg');
const names = ${JSON.stringify(names)};
console.log(JSON.stringify(names.map((n) => [n, typeof esm[n], typeof cjs[n], esm[n] === cjs[n]])));
`);
  const run = spawnSync(process.execPath, ['names.mjs'], { cwd: consumer, encoding: 'utf8', timeout: 60_000, env: { ...process.env, NODE_PATH: path.join(root, 'node_modules') } });
  t.equal(run.status, 0, run.stderr);
  t.same(JSON.parse(run.stdout || '[]'), names.map((n) => [n, 'function', 'function', true]));
});

t.test('presetByName knows only its presets: names of Object.prototype are unknown presets', async (t) => {
  t.equal(api.presetByName('mnist-tiny').name, 'mnist-tiny');
  for (const name of ['toString', 'constructor', '__proto__', 'hasOwnProperty']) {
    t.throws(() => api.presetByName(name), { name: 'RangeError', message: new RegExp(`^unknown preset "${name}"; choose one of mnist, `) }, name);
  }
});
