// Sliding-window inference's reuse of output arrays (model.ts's predictInto, the native
// predict's optional `into` argument) and its native division (divideByWeights), attacked as a
// user scripting from TypeScript would: a Model whose predict the user replaced, the native
// `into` argument with getters that detach or shrink what was already checked, names looked up
// on Object.prototype, two SharedArrayBuffer objects over one memory, and a division whose
// mean overlaps its Float64 sum or its weights. The truth is the same model's predictions in
// fresh arrays and hand-computed weighted means. Anything that could abort the process runs
// in a child Node, so that a crash fails the test instead of killing tap.
import t, { Test } from 'tap';
import { MessageChannel } from 'worker_threads';
import { setFlagsFromString } from 'v8';
import { runInNewContext } from 'vm';
import { createModel, Model } from '../src/index';
import { loadNative } from '../src/native';
import { ADDON, runChild, type ChildRun } from './helpers/child';
import { predictInto } from '../src/model/model';
import { slidingWindowPredict, type SlidingWindowModel } from '../src/model/sliding-window';


function noise(length: number, seed: number): Float32Array {
  let s = seed >>> 0;
  return Float32Array.from({ length }, () => ((s = (s * 1664525 + 1013904223) >>> 0) / 2147483648) - 1);
}

const sameBits = (a: Float32Array | undefined, b: Float32Array | undefined) =>
  a !== undefined && b !== undefined && a.length === b.length && Buffer.compare(Buffer.from(a.buffer, a.byteOffset, a.byteLength), Buffer.from(b.buffer, b.byteOffset, b.byteLength)) === 0;

/** Runs `body` (CommonJS, `NativeModel` in scope, prints one JSON line last) in a child Node. */
function child(t: Test, body: string): ChildRun {
  return runChild(t, `const { NativeModel } = require(${JSON.stringify(ADDON)});\n${body}`, { gc: true });
}

// A 2D model: 1 channel of 8x8, L = 2, R = 2 (probs 128, cms 512, q 256 floats an image).
const CHILD_MODEL = `const m = new NativeModel({ ndim: 2, inChannels: 1, classes: 2, annotators: 2, depth: 2, baseChannels: 4, seed: 1 });
const images = Float32Array.from({ length: 64 }, (_, i) => Math.sin(i));
const shape = [1, 1, 8, 8];
const same = (a, b) => a.length === b.length && a.every((v, i) => Object.is(v, b[i]));`;

t.test('native predict: a getter of `into` that detaches or shrinks an output checked before it is refused, not written into (no crash)', async (t) => {
  const run = child(t, `${CHILD_MODEL}
    (async () => {
      const said = [];
      // Transferred by the getter of the next output: probs' memory is freed, its view empty.
      const probs = new Float32Array(128);
      try {
        await m.predict(images, shape, { cms: true }, { probs, get cms() { structuredClone(probs.buffer, { transfer: [probs.buffer] }); return new Float32Array(512); } });
        said.push('resolved');
      } catch (e) { said.push(e.message); }
      // A length-tracking view of a resizable buffer, shrunk by the next getter.
      const buffer = new ArrayBuffer(512, { maxByteLength: 1024 });
      const tracking = new Float32Array(buffer);
      try {
        await m.predict(images, shape, { cms: true }, { probs: tracking, get cms() { buffer.resize(0); return new Float32Array(512); } });
        said.push('resolved');
      } catch (e) { said.push(e.message); }
      // The model is still usable.
      const fresh = await m.predict(images, shape, { cms: true });
      const given = { probs: new Float32Array(128).fill(NaN), cms: new Float32Array(512).fill(NaN) };
      const into = await m.predict(images, shape, { cms: true }, given);
      said.push(same(into.probs, fresh.probs) && same(into.cms, fresh.cms) && into.probs === given.probs);
      console.log(JSON.stringify({ said }));
    })();`);
  t.equal(run.signal, null, `no signal (${run.stderr.slice(-300)})`);
  t.equal(run.status, 0, run.stderr.slice(-300));
  const said = run.out.said as (string | boolean)[];
  t.match(said?.[0], /^predict outputs\.probs is a view of a detached ArrayBuffer/, 'the transferred output is named');
  t.match(said?.[1], /^predict outputs\.probs has 0 elements, expected 128$/, 'the shrunk output is named');
  t.equal(said?.[2], true, 'the model predicts into given arrays afterwards, the same bits as fresh ones');
});

t.test('native predict: an output not given is not looked up on Object.prototype (no write past a stranger\'s array)', async (t) => {
  // The outputs given were kept on an ordinary object and read back from it: a name not given
  // was looked up on Object.prototype, whose getter then handed over a 1-element array that
  // the worker filled with 512 floats (heap overflow, SIGSEGV).
  const run = child(t, `${CHILD_MODEL}
    (async () => {
      const fresh = await m.predict(images, shape, { cms: true });
      let reads = 0;
      Object.defineProperty(Object.prototype, 'cms', { configurable: true, get() { reads++; return reads === 1 ? undefined : new Float32Array(1); } });
      let result;
      try {
        const pending = m.predict(images, shape, { cms: true }, { probs: new Float32Array(128) });
        // Gone before the result object is made (its own cms is then set, not the accessor's).
        delete Object.prototype.cms;
        const r = await pending;
        result = { cmsLength: r.cms.length, same: same(r.cms, fresh.cms) && same(r.probs, fresh.probs) };
      } catch (e) { result = { error: e.message }; }
      // Garbage made and collected: a heap overflow shows here if not before.
      for (let i = 0; i < 20000; i++) new Float32Array(4);
      global.gc();
      console.log(JSON.stringify({ ...result, reads }));
    })();`);
  t.equal(run.signal, null, `no signal (${run.stderr.slice(-300)})`);
  t.equal(run.status, 0, run.stderr.slice(-300));
  t.same(run.out, { cmsLength: 512, same: true, reads: 1 }, 'cms allocated for the call (read once, when `into` was read), the same bits as a fresh prediction');
});

t.test('native predict refuses outputs aliasing each other or the images through two SharedArrayBuffer objects of one memory', async (t) => {
  const native = loadNative();
  const m = new native.NativeModel({ ndim: 2, inChannels: 1, classes: 2, annotators: 2, depth: 2, baseChannels: 4, seed: 1 });
  t.teardown(() => m.dispose());
  const images = noise(64, 3);
  const shape = [1, 1, 8, 8];
  // A SharedArrayBuffer posted through a port arrives as another object over the same memory.
  const sab = new SharedArrayBuffer(4 * 512);
  const { port1, port2 } = new MessageChannel();
  const other = await new Promise<SharedArrayBuffer>((resolve) => {
    port2.once('message', resolve);
    port1.postMessage(sab);
  });
  port1.close();
  t.not(other, sab, 'two objects');
  new Float32Array(other)[0] = 7;
  t.equal(new Float32Array(sab)[0], 7, 'one memory');
  // q is computed from p: p and q in one memory gave wrong numbers without a word.
  // (The native predict refuses its arguments by throwing, before any Promise.)
  t.throws(
    () => m.predict(images, shape, { annotatorProbs: true }, { probs: new Float32Array(sab, 0, 128), annotatorProbs: new Float32Array(other, 0, 256) }),
    /predict outputs\.annotatorProbs shares memory with predict outputs\.probs/,
  );
  const sharedImages = new Float32Array(sab, 1024, 64);
  sharedImages.set(images);
  t.throws(() => m.predict(sharedImages, shape, {}, { probs: new Float32Array(other, 1024 - 256, 128) }), /predict outputs\.probs shares memory with the images/);
  // Disjoint parts of the one memory are fine, and predict what fresh arrays do.
  const fresh = await m.predict(images, shape, { annotatorProbs: true });
  const got = await m.predict(images, shape, { annotatorProbs: true }, { probs: new Float32Array(sab, 0, 128), annotatorProbs: new Float32Array(other, 512, 256) });
  t.ok(sameBits(got.probs, fresh.probs) && sameBits(got.annotatorProbs, fresh.annotatorProbs), 'disjoint parts predict the same bits as fresh arrays');
});

t.test('divideByWeights refuses a mean overlapping its Float64 sum or the weights (wrong means without a word), and divides disjoint views right', async (t) => {
  const native = loadNative();
  const channels = 3;
  const V = 70001; // more than one of the native side's chunks of voxels (parallel)
  const weights = Float64Array.from(noise(V, 5), (v) => Math.abs(v) * 4 + 0.25);
  // A Float64 sum and its Float32 mean in one buffer, the mean over the sum's second half.
  const buffer = new ArrayBuffer(8 * channels * V);
  const sum64 = Float64Array.from(noise(channels * V, 6), (v) => v * 9);
  new Float64Array(buffer).set(sum64);
  t.throws(
    () => native.divideByWeights(new Float64Array(buffer), weights, channels, new Float32Array(buffer, 4 * channels * V, channels * V)),
    /divideByWeights: mean overlaps sum/,
  );
  // The mean over the weights: the weights were overwritten while being divided by.
  const both = new ArrayBuffer(8 * V + 4 * channels * V);
  const sharedWeights = new Float64Array(both, 0, V);
  sharedWeights.set(weights);
  const sum32 = Float32Array.from(noise(channels * V, 7), (v) => v * 9);
  t.throws(() => native.divideByWeights(sum32, sharedWeights, channels, new Float32Array(both, 4 * V, channels * V)), /divideByWeights: mean overlaps weightSum/);
  // Disjoint views of one buffer, against a hand-written division.
  const all = new ArrayBuffer(8 * V + 8 * channels * V + 4 * channels * V);
  const w = new Float64Array(all, 0, V);
  w.set(weights);
  const s = new Float64Array(all, 8 * V, channels * V);
  s.set(sum64);
  const mean = new Float32Array(all, 8 * V + 8 * channels * V, channels * V);
  native.divideByWeights(s, w, channels, mean);
  const want = new Float32Array(channels * V);
  for (let k = 0; k < channels; k++) for (let v = 0; v < V; v++) want[k * V + v] = sum64[k * V + v] / weights[v];
  t.ok(sameBits(mean, want), 'disjoint views of one buffer: each sum divided by its voxel\'s weight');
  // In place (a Float32 sum) is still allowed.
  const inPlace = sum32.slice();
  native.divideByWeights(inPlace, weights, channels, inPlace);
  for (let k = 0; k < channels; k++) for (let v = 0; v < V; v++) want[k * V + v] = sum32[k * V + v] / weights[v];
  t.ok(sameBits(inPlace, want), 'a Float32 sum divided in place');
});

t.test('slidingWindowPredict calls the predict a user put on a Model (instance or subclass), not the internal one behind it', async (t) => {
  // The reuse took the Model's internal predictInto whenever the model was a Model: a predict
  // replaced on the instance, or overridden by a subclass (calibration, logging, a cache), was
  // skipped without a word, and the volume predicted by the network alone.
  const config = { ndim: 2 as const, inChannels: 1, classes: 2, annotators: 2, depth: 2, baseChannels: 4, seed: 5 };
  const extent = { d: 1, h: 12, w: 20 };
  const volume = noise(12 * 20, 9);
  const options = { patch: [8, 8], overlap: 0.5, batchSize: 2, cms: true };
  // Every voxel's probabilities are 0.25 whatever the window: the weighted mean is 0.25.
  const flat = <P extends { probs: Float32Array }>(p: P): P => (p.probs.fill(0.25), p);

  const model = createModel(config);
  t.teardown(() => model.dispose());
  const original = model.predict.bind(model);
  let calls = 0;
  model.predict = async (...args: Parameters<Model['predict']>) => (calls++, flat(await original(...args)));
  const got = await slidingWindowPredict(model, volume, extent, options);
  t.ok(calls > 0 && calls === Math.ceil(got.windows / 2), `the replaced predict ran for every batch (${calls} of ${Math.ceil(got.windows / 2)})`);
  t.ok(got.probs.every((p) => Math.abs(p - 0.25) < 1e-6), 'the replaced predict\'s probabilities stitched');

  class Calibrated extends Model {
    override async predict(...args: Parameters<Model['predict']>) {
      return flat(await super.predict(...args));
    }
  }
  const calibrated = new Calibrated(config);
  t.teardown(() => calibrated.dispose());
  const sub = await slidingWindowPredict(calibrated, volume, extent, options);
  t.ok(sub.probs.every((p) => Math.abs(p - 0.25) < 1e-6), 'a subclass\'s predict stitched');
  // Its CMs are the network's (the override left them): the same as through a plain object.
  const plain: SlidingWindowModel = { config: calibrated.config, predict: (...a) => calibrated.predict(...a) };
  t.ok(sameBits(sub.cms, (await slidingWindowPredict(plain, volume, extent, options)).cms), 'its CMs as through a plain object');
});

t.test('slidingWindowPredict: a Model\'s reused outputs give the same bits as fresh ones in 2D and 3D, padded, a single window, Float64 sums, every CM mode', async (t) => {
  const cases = [
    { name: '3D full, short last batch', cfg: { ndim: 3 as const }, extent: { d: 8, h: 12, w: 20 }, opts: { patch: [8, 8, 8], batchSize: 3 } },
    { name: '2D lowrank', cfg: { ndim: 2 as const, cmMode: 'lowrank' as const, cmRank: 1 }, extent: { d: 1, h: 13, w: 21 }, opts: { patch: [8, 8], batchSize: 4 } },
    { name: '3D global, padded single window, batch larger than the windows', cfg: { ndim: 3 as const, cmMode: 'global' as const }, extent: { d: 3, h: 5, w: 7 }, opts: { patch: [8, 8, 8], batchSize: 5 } },
    { name: '2D Float64 sums (81 windows a voxel)', cfg: { ndim: 2 as const }, extent: { d: 1, h: 24, w: 24 }, opts: { patch: [16, 16], overlap: 0.9, batchSize: 7 } },
  ];
  for (const c of cases) {
    const model = createModel({ inChannels: 2, classes: 3, annotators: 2, depth: 2, baseChannels: 4, seed: 5, ...c.cfg });
    const V = c.extent.d * c.extent.h * c.extent.w;
    const volume = noise(2 * V, 7);
    const plain: SlidingWindowModel = { config: model.config, predict: (...a) => model.predict(...a) };
    for (const pipeline of [false, true]) {
      const options = { ...c.opts, cms: true, annotatorProbs: true, pipeline };
      const want = await slidingWindowPredict(plain, volume, c.extent, options);
      const got = await slidingWindowPredict(model, volume, c.extent, options);
      t.ok(sameBits(got.probs, want.probs) && sameBits(got.cms, want.cms) && sameBits(got.annotatorProbs, want.annotatorProbs), `${c.name}, pipeline ${pipeline}: the same bits`);
      // Each output its own whole buffer: no view of an array the model writes again.
      const outs = [got.probs, got.cms!, got.annotatorProbs!];
      t.ok(new Set(outs.map((a) => a.buffer)).size === 3 && outs.every((a) => a.byteOffset === 0 && a.byteLength === a.buffer.byteLength), `${c.name}, pipeline ${pipeline}: every output its own memory`);
    }
    model.dispose();
  }
});

t.test('slidingWindowPredict whose first onProgress throws rejects only once its batch in flight has settled', async (t) => {
  // onProgress(0, total) ran after the first batch was handed to the model, outside the
  // try that waits for a batch in flight: the call rejected while the model still predicted,
  // and the caller's next predict met "model is busy" (a NativeModel) or a fake's overlap.
  let inFlight = 0;
  let most = 0;
  const model: SlidingWindowModel = {
    config: { classes: 2, annotators: 1, inChannels: 1, ndim: 2, depth: 1 },
    async predict(images, shape) {
      most = Math.max(most, ++inFlight);
      await new Promise((resolve) => setTimeout(resolve, 20));
      inFlight--;
      return { probs: new Float32Array(shape[0] * 2 * shape[2] * shape[3]).fill(0.5) };
    },
  };
  for (const pipeline of [false, true]) {
    await t.rejects(
      slidingWindowPredict(model, new Float32Array(16 * 16), { d: 1, h: 16, w: 16 }, { patch: [8, 8], pipeline, onProgress: (done) => { if (done === 0) throw new Error('the bar broke'); } }),
      /the bar broke/,
    );
    t.equal(inFlight, 0, `pipeline ${pipeline}: no prediction still running when the call rejected`);
  }
  t.ok(most <= 1, 'never two predictions at once');
});

t.test('slidingWindowPredict lets go of its reused output sets before the means are divided (Float64 sums: a new array a mean)', async (t) => {
  // The sets (one, or two pipelined) outlived the last batch: with Float64 sums each mean is a
  // new Float32Array, allocated while a batch of outputs was still held (1 GiB for two 128^3
  // windows of a BraTS CM model, 2 GiB pipelined) on top of the sums and the means.
  setFlagsFromString('--expose-gc');
  const gc = runInNewContext('gc') as () => void;
  const native = loadNative();
  const divide = native.divideByWeights;
  t.teardown(() => {
    native.divideByWeights = divide;
  });
  const model = createModel({ ndim: 2, inChannels: 1, classes: 2, annotators: 2, depth: 2, baseChannels: 4, seed: 5 });
  t.teardown(() => model.dispose());
  const original = (model as unknown as Record<symbol, (...a: unknown[]) => unknown>)[predictInto];
  for (const pipeline of [false, true]) {
    const sets: WeakRef<ArrayBufferLike>[] = [];
    Object.defineProperty(model, predictInto, {
      configurable: true,
      value(this: Model, ...args: unknown[]) {
        for (const a of Object.values(args[3] as Record<string, Float32Array>)) sets.push(new WeakRef(a.buffer));
        return original.apply(this, args);
      },
    });
    const alive: number[] = [];
    native.divideByWeights = (...args: Parameters<typeof divide>) => {
      gc();
      alive.push(new Set(sets.map((r) => r.deref()).filter((b) => b !== undefined)).size);
      return divide(...args);
    };
    // 16x16 windows at overlap 0.9 over 24x24: 81 windows a voxel, Float64 sums.
    const got = await slidingWindowPredict(model, noise(24 * 24, 3), { d: 1, h: 24, w: 24 }, { patch: [16, 16], overlap: 0.9, batchSize: 4, cms: true, pipeline });
    native.divideByWeights = divide;
    t.ok(sets.length > 0, `pipeline ${pipeline}: the batches went through predictInto`);
    t.same(alive, [0, 0], `pipeline ${pipeline}: no output set alive when the probs and cms are divided`);
    t.equal(got.probs.length, 2 * 24 * 24);
  }
});
