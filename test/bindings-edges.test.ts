// The native bindings under misuse, as a script would meet it: getters and Proxy traps that run
// between an argument's check and its use, transferred (detached) buffers, sparse arrays of
// absurd length, options of the wrong kind, shapes whose product wraps int64, and the process
// or a thread ending with calls in flight. Anything that could abort runs in a child Node, so
// that a crash fails the test instead of killing tap.
import t, { Test } from 'tap';
import * as fs from 'fs';
import * as path from 'path';
import { createModel } from '../src/index';
import { fuse } from '../src/fusion/fuse';
import { loadNative } from '../src/native';
import { ADDON, runChild, type ChildRun } from './helpers/child';

// The children load the addon the in-process tests do.
const addon = ADDON;
const built = fs.existsSync(addon) ? false : 'needs build/Release/cmseg.node';

/** Runs `body` (CommonJS; `NativeModel`, `fuse` and `setNumThreads` in scope; prints one JSON line) in a child Node. */
function child(t: Test, body: string, args: string[] = []): ChildRun {
  return runChild(t, `const { NativeModel, fuse, setNumThreads } = require(${JSON.stringify(addon)});\n${body}`, { gc: true, args });
}

// A sparse array's length can be 2^32 - 1. fuse() reserved a copy per entry before reading
// any: std::bad_alloc outside every handler, "terminate called ...", SIGABRT.
t.test('fuse refuses a sparse maps array of 2^31 entries instead of aborting', { skip: built }, async (t) => {
  const run = child(t, `
    (async () => {
      const maps = []; maps[2 ** 31] = new Uint8Array(4); maps[0] = new Uint8Array(4);
      let message = 'fused';
      try { await fuse(maps, { method: 'mean' }); } catch (e) { message = e.code + ' ' + e.message; }
      console.log(JSON.stringify({ message }));
    })();`);
  t.equal(run.signal, null, 'no signal');
  t.equal(run.status, 0, run.stderr);
  t.equal(run.out.message, 'CMSEG_INVALID_ARGUMENT fuse: maps has 2147483649 entries, more than the 1048576 raters supported');
});

// A transferred buffer leaves a view of length 0. The messages said "images has 0 elements,
// expected 16" and, for fuse, blamed the live map: "maps[1] has 16 elements, expected 0".
t.test('a view of a detached buffer is named as detached', async (t) => {
  const gone = <T extends Uint8Array | Float32Array>(a: T): T => {
    structuredClone(a.buffer, { transfer: [a.buffer as ArrayBuffer] });
    return a;
  };
  const detached = / is a view of a detached ArrayBuffer \(transferred with postMessage or structuredClone\); pass an array whose buffer this thread still owns$/;
  const m = createModel({ ndim: 2, classes: 2, annotators: 1, depth: 1, baseChannels: 2 });
  await t.rejects(m.predict(gone(new Float32Array(16)), [1, 1, 4, 4]), { message: /^images is a view of a detached/, code: 'CMSEG_INVALID_ARGUMENT' });
  await t.rejects(m.trainStep({ images: new Float32Array(16), shape: [1, 1, 4, 4], labels: [gone(new Uint8Array(16))] }), { message: /^batch\.labels\[0\] is a view of a detached/ });
  await t.rejects(fuse([gone(new Uint8Array(16)), new Uint8Array(16)], { method: 'mean' }), { message: /^fuse: maps\[0\] is a view of a detached/ });
  await t.rejects(fuse([new Uint8Array(16), gone(new Uint8Array(16))], { method: 'mean' }), { message: detached });
  const w = m.getWeights();
  const name = Object.keys(w)[0];
  t.throws(() => m.setWeights({ [name]: gone(w[name]) }), { message: `weights['${name}'] is a view of a detached ArrayBuffer (transferred with postMessage or structuredClone); pass an array whose buffer this thread still owns` });
  // Offsets into a larger buffer are still read where they point: Float32 views at byte 4,
  // Uint8 label maps at odd offsets, a SharedArrayBuffer.
  const images = Float32Array.from({ length: 16 }, (_, i) => Math.sin(i));
  const zeros = new Uint8Array(16), ones = new Uint8Array(16).fill(1);
  const ref = await createModel({ ndim: 2, classes: 2, annotators: 2, depth: 1, baseChannels: 2, seed: 3 }).evaluate({ images, shape: [1, 1, 4, 4], labels: [zeros, ones] });
  const buf = new ArrayBuffer(4 + 64 + 1 + 32);
  const fimg = new Float32Array(buf, 4, 16);
  fimg.set(images);
  const l0 = new Uint8Array(buf, 69, 16), l1 = new Uint8Array(buf, 85, 16).fill(1);
  const shared = new Float32Array(new SharedArrayBuffer(64));
  shared.set(images);
  const m2 = createModel({ ndim: 2, classes: 2, annotators: 2, depth: 1, baseChannels: 2, seed: 3 });
  t.equal((await m2.evaluate({ images: fimg, shape: [1, 1, 4, 4], labels: [l0, l1] })).loss, ref.loss, 'views at offsets 4 and 69, 85');
  t.equal((await m2.evaluate({ images: shared, shape: [1, 1, 4, 4], labels: [l0, l1] })).loss, ref.loss, 'a SharedArrayBuffer');
  await m.dispose();
  await m2.dispose();
});

// setWeights checked each array as it read the object, and a getter read later could refill
// an array checked before it: NaN weights (or an Inf moment) were taken without a word.
t.test('setWeights and setOptimizerState check the arrays after every getter has run', async (t) => {
  const m = createModel({ ndim: 2, classes: 2, annotators: 1, depth: 1, baseChannels: 2 });
  const before = m.getWeights();
  const [k0, k1] = Object.keys(before);
  const a = new Float32Array(before[k0].length).fill(0.25);
  t.throws(() => m.setWeights({ [k0]: a, get [k1]() { a[0] = NaN; return before[k1]; } }), { message: `weights['${k0}'] contains a non-finite value at index 0` });
  t.equal(m.getWeights()[k0][0], before[k0][0], 'the weights are unchanged');
  const state = m.getOptimizerState();
  const moments = { ...state.m, [k0]: new Float32Array(before[k0].length) };
  t.throws(() => m.setOptimizerState({ m: moments, get v() { moments[k0][1] = Infinity; return state.v; } }), { message: `optimizer state.m['${k0}'] contains a non-finite value at index 1` });
  t.equal(m.getOptimizerState().m[k0][1], 0, 'the moments are unchanged');
  await m.dispose();
});

// The batch's images were taken (their pointer read) before the label maps were read from
// their array, and the predict options after the images: a getter there that transferred the
// images left the call reading freed memory ('evaluated', 'predicted'). The arrays are now
// taken after the last getter, so the transfer is seen and named.
t.test('getters that transfer an input already read are seen, not read through', { skip: built }, async (t) => {
  const run = child(t, `
    (async () => {
      const out = {};
      const m = new NativeModel({ ndim: 2, classes: 2, annotators: 1, depth: 2, baseChannels: 4 });
      const V = 256 * 256;
      const away = (a) => { structuredClone(a.buffer, { transfer: [a.buffer] }); global.gc(); new Float32Array(V).fill(1e30); };
      const images = new Float32Array(V);
      const labels = []; Object.defineProperty(labels, 0, { enumerable: true, get() { away(images); return new Uint8Array(V); } });
      try { await m.evaluate({ images, shape: [1, 1, 256, 256], labels }); out.evaluate = 'evaluated'; }
      catch (e) { out.evaluate = e.message; }
      const images2 = new Float32Array(V);
      try { await m.predict(images2, [1, 1, 256, 256], { get cms() { away(images2); return false; } }); out.predict = 'predicted'; }
      catch (e) { out.predict = e.message; }
      const images3 = new Float32Array(V);
      const shape = [1, 1, 256, 256]; Object.defineProperty(shape, 3, { get() { away(images3); return 256; } });
      try { await m.trainStep({ images: images3, shape, target: new Uint8Array(V) }); out.shape = 'trained'; }
      catch (e) { out.shape = e.message; }
      console.log(JSON.stringify(out));
    })();`);
  t.equal(run.signal, null, 'no signal');
  t.equal(run.status, 0, run.stderr);
  const detached = 'images is a view of a detached ArrayBuffer (transferred with postMessage or structuredClone); pass an array whose buffer this thread still owns';
  t.equal(run.out.evaluate, detached, 'a label map getter');
  t.equal(run.out.predict, detached, 'a predict option getter');
  t.equal(run.out.shape, detached, 'a shape entry getter');
});

// N-API does not read a Proxy as an array (JS's Array.isArray does): the message said only
// "must be an array", of what the caller sees as one.
t.test('a Proxy of an array is named as such', async (t) => {
  const hint = ' (a Proxy of an array is not read through: pass the array itself)';
  const raw = new (loadNative().NativeModel)({ ndim: 2, classes: 2, annotators: 1, depth: 1, baseChannels: 2 });
  t.throws(() => raw.predict(new Float32Array(16), new Proxy([1, 1, 4, 4], {})), { message: 'shape must be an array of integers' + hint });
  t.throws(() => raw.trainStep({ images: new Float32Array(16), shape: [1, 1, 4, 4], labels: new Proxy([new Uint8Array(16)], {}) }), { message: 'batch.labels must be an array of one Uint8Array per annotator' + hint });
  t.throws(() => raw.predict(new Float32Array(16), { length: 4 } as unknown as number[]), { message: 'shape must be an array of integers' }, 'no hint for what is not an array');
  raw.dispose();
  await t.rejects(fuse(new Proxy([new Uint8Array(4), new Uint8Array(4)], {}), { method: 'mean' }), { message: 'fuse: the first argument must be an array of Uint8Array label maps (null for an absent rater)' + hint });
  const { proxy, revoke } = Proxy.revocable([] as (Uint8Array | null)[], {});
  revoke();
  await t.rejects(fuse(proxy, { method: 'mean' }), { message: 'fuse: the first argument must be an array of Uint8Array label maps (null for an absent rater)' }, 'a revoked Proxy');
});

// A call took its model when it started reading its arguments: a getter among them that
// disposed of the model left the call working on freed memory (predict "succeeded", a step
// failed with a bogus "out of memory", setWeights corrupted the heap, parameters() aborted
// in V8), and one that started a call of its own put two calls on one model at once.
t.test('getters that dispose of the model or call it again are refused, not run on freed memory', { skip: built }, async (t) => {
  const run = child(t, `
    (async () => {
      const cfg = { ndim: 2, classes: 2, annotators: 1, depth: 2, baseChannels: 8 };
      const V = 64 * 64, shape = [1, 1, 64, 64];
      const batch = () => ({ images: new Float32Array(V), shape, labels: [new Uint8Array(V)] });
      const churn = () => { for (let i = 0; i < 20; i++) new NativeModel(cfg).getWeights(); };
      const out = {};
      const attempt = async (name, f) => { try { await f(); out[name] = 'ran'; } catch (e) { out[name] = e.message; } };
      let m = new NativeModel(cfg);
      await attempt('predict', () => m.predict(new Float32Array(V), shape, { get cms() { m.dispose(); churn(); return false; } }));
      m = new NativeModel(cfg);
      await attempt('trainStep', () => { const b = batch(), labels = b.labels; Object.defineProperty(b, 'labels', { enumerable: true, get() { m.dispose(); churn(); return labels; } }); return m.trainStep(b); });
      m = new NativeModel(cfg);
      const w = m.getWeights(), [k0, k1] = Object.keys(w);
      await attempt('setWeights', () => m.setWeights({ [k0]: w[k0], get [k1]() { m.dispose(); churn(); return w[k1]; } }));
      m = new NativeModel(cfg);
      await attempt('setOptimizer', () => m.setOptimizer({ get lr() { m.dispose(); churn(); return 0.5; } }));
      m = new NativeModel(cfg);
      await attempt('setLoss', () => m.setLoss({ get lambda() { m.dispose(); churn(); return 0.5; } }));
      m = new NativeModel(cfg);
      const state = m.getOptimizerState();
      await attempt('setOptimizerState', () => m.setOptimizerState({ m: state.m, get v() { m.dispose(); churn(); return state.v; } }));
      m = new NativeModel(cfg);
      Object.defineProperty(Object.prototype, 'name', { configurable: true, set() { m.dispose(); churn(); } });
      await attempt('parameters', () => m.parameters());
      delete Object.prototype.name;
      // A getter that starts a step on the same model: the outer call is refused, the inner runs alone.
      m = new NativeModel(cfg);
      let inner;
      await attempt('reentrant', () => m.predict(new Float32Array(V), shape, { get cms() { inner = m.trainStep(batch()); return false; } }));
      out.inner = (await inner).step;
      out.after = (await m.predict(new Float32Array(V), shape)).probs.length;
      console.log(JSON.stringify(out));
    })();`);
  t.equal(run.signal, null, 'no signal');
  t.equal(run.status, 0, run.stderr.split('\n').slice(0, 6).join('\n'));
  for (const call of ['predict', 'trainStep', 'setWeights', 'setOptimizer', 'setLoss', 'setOptimizerState']) t.equal(run.out[call], 'this model was disposed', call);
  t.equal(run.out.parameters, 'ran', 'parameters() built its result from a copy');
  t.equal(run.out.reentrant, 'model is busy with an earlier trainStep/predict: await it before calling again');
  t.equal(run.out.inner, 1, 'the step the getter started ran, once');
  t.equal(run.out.after, 2 * 64 * 64, 'the model predicts afterwards');
});

t.test('fuse refuses a prior of the wrong kind instead of ignoring it', async (t) => {
  const a = Uint8Array.from({ length: 16 }, (_, i) => i % 2), b = Uint8Array.from({ length: 16 }, (_, i) => (i >> 1) % 2);
  await t.rejects(fuse([a, b], { method: 'staple', prior: [0.9, 0.1] }), { message: /^fuse options\.prior: binary STAPLE takes one number, the foreground prior/ });
  await t.rejects(fuse([a, b], { method: 'multi-staple', prior: 0.9 }), { message: /^fuse options\.prior: 'multi-staple' takes an array of class priors/ });
  await t.rejects(fuse([a, b], { method: 'spatial-staple', shape: [4, 4], prior: 0.9 }), { message: /^fuse options\.prior: 'spatial-staple' takes an array/ });
  await t.rejects(fuse([a, b], { method: 'mean', prior: 0.9 }), { message: "fuse options.prior is for the STAPLE methods; 'mean' has no prior" });
  // The kinds that apply still do: a class prior of [0.9, 0.1] moves the 2-rater ties
  // (a voxel where one rater says 0 and the other 1) to class 0 in multi-label STAPLE, and a
  // foreground prior of 0.9 moves them to 1 in binary STAPLE.
  const ties = [...a.keys()].filter((v) => a[v] !== b[v]);
  const multi = await fuse([a, b], { method: 'multi-staple', prior: [0.9, 0.1] });
  t.same(ties.map((v) => multi.labels![v]), ties.map(() => 0), 'class prior applied');
  const binary = await fuse([a, b], { method: 'staple', prior: 0.9 });
  t.same(ties.map((v) => binary.labels![v]), ties.map(() => 1), 'foreground prior applied');
});

// The core multiplies the extent in int64: [1073807362, 2147352580, 8] is 2^64 + 64 voxels,
// which wrapped to 64 and matched maps of 64 voxels (mean fused them; spatial STAPLE then
// failed with a bare "out of memory").
t.test('a fuse shape whose voxel count wraps int64 is refused, naming both counts', async (t) => {
  const maps = [new Uint8Array(64), new Uint8Array(64).fill(1)];
  for (const method of ['mean', 'spatial-staple'] as const)
    await t.rejects(fuse(maps, { method, shape: [1073807362, 2147352580, 8] }), { message: `fuse (${method}): options.shape holds 1.8446744073709552e+19 voxels but the maps have 64` });
  await t.rejects(fuse(maps, { method: 'mean', shape: [3, 3] }), { message: 'fuse (mean): options.shape holds 9 voxels but the maps have 64' });
  await t.rejects(fuse(maps, { method: 'mean', shape: [1, 1, 1, 8, 8] }), { message: 'fuse options.shape has 5 entries, more than 3' });
});

t.test('NaN and Infinity are named as JavaScript writes them, float options by the value given', async (t) => {
  const m = createModel({ ndim: 2, classes: 2, annotators: 1, depth: 1, baseChannels: 2 });
  await t.rejects(m.predict(new Float32Array(16), [1, 1, NaN, 4]), { message: 'shape[2] must be a non-negative integer, got NaN' });
  await t.rejects(m.predict(new Float32Array(16), [1, 1, 4, -Infinity]), { message: 'shape[3] must be a non-negative integer, got -Infinity' });
  await t.rejects(m.predict(new Float32Array(16), [1, 1, 2 ** 31 - 1, 2 ** 31 - 1]), { message: 'shape describes 4.6116860141324206e+18 elements, more than 2^53' });
  // A shape 2^31 entries long is refused by its length, not walked (the native class: the
  // typed Model copies the shape first).
  const raw = new (loadNative().NativeModel)({ ndim: 2, classes: 2, annotators: 1, depth: 1, baseChannels: 2 });
  t.throws(() => raw.predict(new Float32Array(16), new Array(2 ** 31)), { message: 'shape must have 4 entries (N, C, H, W) for a 2D model, got 2147483648' });
  raw.dispose();
  // Float options were named by their float32 value: "got -0.10000000149011612", and "got 0"
  // for an eps of 1e-50, which the caller did not type.
  t.throws(() => m.setOptimizer({ lr: -0.1 }), { message: 'optimizer.lr must be >= 0, got -0.1' });
  t.throws(() => m.setOptimizer({ eps: 1e-50 }), { message: 'optimizer.eps must be > 0, got 1e-50 (0 in float32, the precision it is kept in)' });
  t.throws(() => m.setLoss({ lambda: -0.3 }), { message: 'loss.lambda must be >= 0, got -0.3' });
  await m.dispose();
});

// Calls in flight when the process exits, when their model is dropped and collected, or in
// worker threads that each train their own model: the exit code asked for, no abort, and the
// same numbers as one model at a time.
t.test('exits, collection and worker threads with calls in flight', { skip: built }, async (t) => {
  const body = `
    const { Worker, isMainThread, parentPort, workerData } = require('worker_threads');
    const side = 32, V = side * side;
    const batch = (s) => ({ images: Float32Array.from({ length: V }, (_, i) => Math.sin(i * 0.01 * (s + 1))), shape: [1, 1, side, side], labels: [Uint8Array.from({ length: V }, (_, i) => (i >> 3) % 2)] });
    async function run(seed) {
      const m = new NativeModel({ ndim: 2, classes: 2, annotators: 1, depth: 2, baseChannels: 4, seed });
      const losses = [];
      for (let k = 0; k < 3; k++) losses.push((await m.trainStep(batch(seed))).loss);
      m.dispose();
      return losses;
    }
    if (!isMainThread) run(workerData).then((l) => parentPort.postMessage(l));
    else if (process.argv[2] === 'exit') {
      for (let i = 0; i < 6; i++) {
        const m = new NativeModel({ ndim: 2, classes: 2, annotators: 1, depth: 3, baseChannels: 16 });
        m.trainStep({ images: new Float32Array(256 * 256), shape: [1, 1, 256, 256], labels: [new Uint8Array(256 * 256)] });
        fuse([0, 1, 2].map(() => new Uint8Array(48 ** 3)), { method: 'spatial-staple', classes: 2, shape: [48, 48, 48] });
      }
      setTimeout(() => process.exit(7), 20);
    } else (async () => {
      const alone = [];
      for (let s = 0; s < 3; s++) alone.push(await run(s));
      const threads = await Promise.all([0, 1, 2].map((s) => new Promise((resolve, reject) => { const w = new Worker(__filename, { workerData: s }); w.once('message', resolve); w.once('error', reject); })));
      const together = await Promise.all([0, 1, 2].map(run));
      // A model dropped with a prediction queued: the call keeps it alive and settles.
      const ref = new NativeModel({ ndim: 2, classes: 2, annotators: 1, depth: 2, baseChannels: 4, seed: 9 });
      const want = (await ref.predict(batch(1).images, [1, 1, side, side])).probs;
      let dropped = new NativeModel({ ndim: 2, classes: 2, annotators: 1, depth: 2, baseChannels: 4, seed: 9 });
      const pending = dropped.predict(batch(1).images, [1, 1, side, side]);
      dropped = null; global.gc(); global.gc();
      const got = (await pending).probs;
      let differ = 0; for (let i = 0; i < want.length; i++) differ += got[i] !== want[i];
      console.log(JSON.stringify({ alone, threads, together, differ }));
    })();`;
  const exit = child(t, body, ['exit']);
  t.equal(exit.signal, null, 'exit: no signal');
  t.equal(exit.status, 7, `exit: the code asked for (${exit.stderr})`);
  const run = child(t, body);
  t.equal(run.signal, null, 'no signal');
  t.equal(run.status, 0, run.stderr);
  t.equal((run.out.alone as number[][]).length, 3);
  t.ok((run.out.alone as number[][]).flat().every(Number.isFinite), 'finite losses');
  t.same(run.out.threads, run.out.alone, 'one model per worker thread: the losses of each model alone');
  t.same(run.out.together, run.out.alone, 'three models stepping at once on one thread');
  t.equal(run.out.differ, 0, 'a dropped model with a prediction queued predicts as a kept one');
});

// 2,000 models created, stepped and disposed: the native memory goes with them.
t.test('create/trainStep/dispose in a loop does not grow the process', { skip: built }, async (t) => {
  const run = child(t, `
    (async () => {
      const V = 16, rss = [];
      for (let i = 0; i < 2000; i++) {
        const m = new NativeModel({ ndim: 2, classes: 2, annotators: 1, depth: 1, baseChannels: 2 });
        await m.trainStep({ images: new Float32Array(V), shape: [1, 1, 4, 4], labels: [new Uint8Array(V)] });
        m.dispose();
        if (i % 500 === 499) { global.gc(); global.gc(); rss.push(process.memoryUsage().rss / 1048576); }
      }
      console.log(JSON.stringify({ rss }));
    })();`);
  t.equal(run.status, 0, run.stderr);
  const rss = run.out.rss as number[];
  t.ok(rss[3] - rss[0] < 16, `RSS after 500, 1000, 1500, 2000 models: ${rss.map(Math.round).join(', ')} MiB`);
});

/** child() with fuse in scope, under `ulimit -v` (KiB or 'unlimited'). */
function childUnderLimit(t: Test, body: string, limitKiB: number | 'unlimited'): ChildRun {
  return runChild(t, `const { fuse } = require(${JSON.stringify(addon)});\n${body}`, { limitKiB });
}

const linux = process.platform === 'linux' && !built ? false : 'Linux with a built addon only';

/** What a child holds (VmSize, KiB) once the addon is loaded and its thread pool started. */
function startVm(t: Test): number {
  const run = childUnderLimit(t, `
    fuse([new Uint8Array(8), new Uint8Array(8)], { method: 'mean' }).then(() =>
      console.log(JSON.stringify({ vm: Number(/VmSize:\\s+(\\d+) kB/.exec(require('fs').readFileSync('/proc/self/status', 'utf8'))[1]) })));`, 'unlimited');
  const vm = run.out.vm as number;
  t.ok(vm > 0, `a child holds ${vm} KiB when it starts`);
  return vm;
}

// fuse() built its outputs in the core and then copied them into V8 buffers: as much memory
// again at the end of the call, from an allocator that aborts the process when it cannot have
// it ("FATAL ERROR: v8::ArrayBuffer::New Allocation failed"). Here the mean's probabilities
// (560 MiB) fit once under the limit (900 MiB over what the child holds when it starts), not twice.
t.test('fuse hands its outputs to JS without a second copy', { skip: linux }, async (t) => {
  const body = `
    (async () => {
      const L = 255, V = Math.floor((560 * 1048576) / (4 * L));
      const maps = [0, 1].map((r) => Uint8Array.from({ length: V }, (_, i) => (i + r) % L));
      const out = { V };
      try {
        const { probs } = await fuse(maps, { method: 'mean', classes: L });
        // Voxel i: one rater says i % L, the other (i + 1) % L.
        out.length = probs.length;
        out.checks = [0, 1, 254, V - 1].map((i) => [probs[(i % L) * V + i], probs[((i + 1) % L) * V + i], probs[((i + 2) % L) * V + i]]);
      } catch (e) { out.error = e.message; }
      console.log(JSON.stringify(out));
    })();`;
  const run = childUnderLimit(t, body, startVm(t) + 900 * 1024);
  t.equal(run.signal, null, 'no signal');
  t.equal(run.status, 0, run.stderr.split('\n').slice(0, 4).join('\n'));
  const V = run.out.V as number;
  t.equal(run.out.length, 255 * V);
  t.same(run.out.checks, [[0.5, 0.5, 0], [0.5, 0.5, 0], [0.5, 0.5, 0], [0.5, 0.5, 0]], 'each voxel: 1/2 for each rater\'s class');
});

// 255 classes x 16843010 voxels is past the 2^32 elements of one typed array: refused before
// the core computes 17 GB of probabilities that no array could then hold.
t.test('a fuse output past 2^32 elements is refused before the work', { skip: linux }, async (t) => {
  const run = childUnderLimit(t, `
    (async () => {
      const V = 16843010, maps = [new Uint8Array(V), new Uint8Array(V).fill(1)];
      const out = {};
      for (const method of ['mean', 'multi-staple']) {
        try { await fuse(maps, { method, classes: 255 }); out[method] = 'fused'; } catch (e) { out[method] = e.code + ' ' + e.message; }
      }
      console.log(JSON.stringify(out));
    })();`, startVm(t) + 900 * 1024);
  t.equal(run.signal, null, 'no signal');
  t.equal(run.status, 0, run.stderr.split('\n').slice(0, 4).join('\n'));
  t.equal(run.out.mean, 'CMSEG_OUT_OF_MEMORY fuse (mean): the output probs would have 4294967550 elements (255 classes x 16843010 voxels), more than one Float32Array can hold (2^32); fuse fewer voxels at a time');
  t.equal(run.out['multi-staple'], 'CMSEG_OUT_OF_MEMORY fuse (multi-staple): the output posterior would have 4294967550 elements (255 classes x 16843010 voxels), more than one Float32Array can hold (2^32); fuse fewer voxels at a time');
});

// The typed Model snapshots a call's shape and label list when it is made (queued calls run
// later); spreading a sparse array of length 2^31 ran V8 out of heap: "FATAL ERROR", SIGABRT.
t.test('the typed Model passes a sparse shape or label list of absurd length on to be refused, without copying it', async (t) => {
  const script = `
    const { createModel } = require(${JSON.stringify(path.join(__dirname, '..', 'dist', 'index.js'))});
    (async () => {
      const m = createModel({ ndim: 2, classes: 2, annotators: 1, depth: 1, baseChannels: 2 });
      const huge = () => { const a = []; a[2 ** 31] = 1; return a; };
      const said = [];
      for (const call of [
        () => m.predict(new Float32Array(16), huge()),
        () => m.trainStep({ images: new Float32Array(16), shape: huge(), labels: [new Uint8Array(16)] }),
        () => m.trainStep({ images: new Float32Array(16), shape: [1, 1, 4, 4], labels: huge() }),
      ]) {
        try { await call(); said.push('ran'); } catch (e) { said.push(e.message); }
      }
      console.log(JSON.stringify({ said }));
    })();`;
  const run = runChild(t, script, { env: { CMSEG_ADDON: addon } });
  t.equal(run.signal, null, `no signal: ${run.stderr.slice(0, 300)}`);
  t.equal(run.status, 0, run.stderr.slice(0, 300));
  const { said } = run.out as { said: string[] };
  t.match(said[0], /^shape must have 4 entries \(N, C, H, W\) for a 2D model, got 2147483649$/);
  t.match(said[1], /^shape must have 4 entries \(N, C, H, W\) for a 2D model, got 2147483649$/);
  t.match(said[2], /^batch\.labels has 2147483649 maps but the model has 1 annotators$/);
});
