// The model API and the native core at the edges of their configuration and of their calls:
// forward passes that cannot fit the machine, the CM heads a consensus-only prediction does
// not need, queued calls and the objects they were given, buffers transferred away during a
// call, empty axes and maps, and setNumThreads under a running call.
import t, { Test } from 'tap';
import * as fs from 'fs';
import * as os from 'os';
import { backendInfo, createModel, setNumThreads, type Batch } from '../src/index';
import { ADDON, runChild } from './helpers/child';

const addon = ADDON;

/**
 * Runs `body` (CommonJS, with `NativeModel` in scope; it prints one JSON line) in a child
 * Node under `ulimit -v` (KiB): a request the native side fails to refuse then fails with
 * the allocator's message in the child instead of growing this process (or being killed).
 */
function underMemoryLimit(t: Test, body: string, limitKiB = 6_000_000): Record<string, unknown> {
  const run = runChild(t, `const { NativeModel } = require(${JSON.stringify(addon)});\nconst os = require('os');\n(async () => {\n${body}\n})();`, { limitKiB, timeoutMs: 120_000 });
  t.equal(run.status, 0, run.stderr);
  return run.out;
}

const linux = process.platform === 'linux' && fs.existsSync(addon) ? false : 'Linux with a built addon only';

// A forward pass holds at level 0, at once: the block's two scratch maps and its output,
// the first encoder block's output (the skip), the concatenation (2 maps), the logits and,
// when they are computed, every annotator's CM head outputs. A pass whose maps alone exceed
// the machine's memory must be refused before it starts: with Linux's overcommit each
// buffer (a quarter of the memory here) would be granted and the process killed mid-pass.
t.test('a forward pass whose activations exceed the machine is refused before it starts', { skip: linux }, async (t) => {
  const out = underMemoryLimit(t, `
    const base = 64, L = 4, R = 3;
    const m = new NativeModel({ ndim: 3, classes: L, annotators: R, depth: 2, baseChannels: base });
    // (6 * base + L) floats a voxel at level 0, for 1.5 times the machine's memory.
    const side = 2 * Math.ceil(Math.cbrt((1.5 * os.totalmem()) / ((6 * base + L) * 4)) / 2);
    const out = { side };
    const images = new Float32Array(side ** 3);
    try { await m.predict(images, [1, 1, side, side, side]); out.predict = 'predicted'; }
    catch (e) { out.predict = e.code + ' ' + e.message; }
    try { await m.evaluate({ images, shape: [1, 1, side, side, side], target: new Uint8Array(side ** 3) }); out.evaluate = 'evaluated'; }
    catch (e) { out.evaluate = e.code + ' ' + e.message; }
    // The model still predicts afterwards.
    out.after = (await m.predict(new Float32Array(64), [1, 1, 4, 4, 4])).probs.length;
    console.log(JSON.stringify(out));`);
  const side = out.side as number;
  const need = new RegExp(`^CMSEG_OUT_OF_MEMORY a forward pass on 1 image\\(s\\) of ${side}x${side}x${side} needs more than [0-9.]+ GiB, more than this machine's [0-9.]+ GiB of memory`);
  // predict names its outputs too (checked in the binding, before they are allocated).
  t.match(out.predict, new RegExp(`^CMSEG_OUT_OF_MEMORY a prediction on 1 image\\(s\\) of ${side}x${side}x${side} needs more than [0-9.]+ GiB \\(outputs [0-9.]+ GiB, forward pass [0-9.]+ GiB\\), more than this machine's [0-9.]+ GiB of memory`), 'predict');
  t.match(out.evaluate, need, 'evaluate');
  t.equal(out.after, 4 * 64, 'a fitting prediction runs afterwards');
});

// predict() without cms / annotatorProbs returns the consensus only: the annotators' CM
// heads (R * L * L channels a pixel in 'full' mode, 64 KiB a pixel here) are not needed.
t.test('predict without cms or annotatorProbs does not hold the CM heads', { skip: linux }, async (t) => {
  const out = underMemoryLimit(t, `
    const m = new NativeModel({ ndim: 2, classes: 16, annotators: 64, depth: 1, baseChannels: 1 });
    // 512 x 512 pixels: 16 GiB of CM head outputs, 16 MiB of probabilities.
    const images = new Float32Array(512 * 512).map((_, i) => Math.sin(i));
    const out = {};
    try { const p = await m.predict(images, [1, 1, 512, 512]); out.probs = p.probs.length; out.cms = p.cms === undefined; }
    catch (e) { out.probs = e.code + ' ' + e.message; }
    console.log(JSON.stringify(out));`);
  t.equal(out.probs, 16 * 512 * 512, 'the probabilities of every pixel');
  t.equal(out.cms, true, 'no CMs asked, none returned');
});

t.test('the consensus is the same with and without the CM outputs (every CM mode, 2D and 3D)', async (t) => {
  for (const cmMode of ['full', 'lowrank', 'global'] as const) {
    for (const ndim of [2, 3] as const) {
      const m = createModel({ ndim, classes: 3, annotators: 2, depth: 2, baseChannels: 4, cmMode, cmRank: 2, cmHeadBlocks: 1, seed: 5 });
      const shape = ndim === 2 ? [2, 1, 6, 4] : [2, 1, 2, 2, 6];
      const images = new Float32Array(48).map((_, i) => Math.cos(i * 0.7));
      const all = await m.predict(images, shape, { cms: true, annotatorProbs: true });
      const plain = await m.predict(images, shape);
      t.same(plain.probs, all.probs, `${ndim}D ${cmMode}: probs`);
      // q_r = A_r p by hand from the returned CMs and probabilities.
      const L = 3, R = 2, V = 24;
      let worst = 0;
      for (let i = 0; i < 2; i++)
        for (let r = 0; r < R; r++)
          for (let a = 0; a < L; a++)
            for (let v = 0; v < V; v++) {
              let q = 0;
              for (let j = 0; j < L; j++) q += all.cms![(((i * R + r) * L + a) * L + j) * V + v] * all.probs[(i * L + j) * V + v];
              worst = Math.max(worst, Math.abs(q - all.annotatorProbs![((i * R + r) * L + a) * V + v]));
            }
      t.ok(worst < 1e-6, `${ndim}D ${cmMode}: q = A p (worst ${worst})`);
      await m.dispose();
    }
  }
});

// Calls are queued: a call's arguments must be the ones given when it was made, not what the
// caller's objects hold when its turn comes (a shape array or a batch object reused for the
// next call). The typed arrays themselves are read in place (README: not modified until the
// Promise settles).
t.test('queued calls use the shape, batch fields and options given at the call', async (t) => {
  const m = createModel({ ndim: 2, classes: 2, annotators: 1, depth: 1, baseChannels: 2, seed: 2 });
  const small = new Float32Array(16).map((_, i) => Math.sin(i));
  const large = new Float32Array(32).map((_, i) => Math.cos(i));
  const shape = [1, 1, 4, 4];
  const options = { cms: true };
  const p1 = m.predict(small, shape, options);
  shape[2] = 8;
  options.cms = false;
  const p2 = m.predict(large, shape, options);
  const [r1, r2] = await Promise.all([p1, p2]);
  t.same(r1.probsShape, [1, 2, 4, 4], 'the first call predicts the 4x4 image it was given');
  t.same(r1.cmsShape, [1, 1, 2, 2, 4, 4], 'with the CMs it asked for');
  t.same(r2.probsShape, [1, 2, 8, 4]);
  t.equal(r2.cms, undefined);

  // Two evaluations of one batch object whose labels are replaced between the calls: each
  // loss is the one of its own labels (as evaluated one at a time).
  const zeros = [new Uint8Array(16)];
  const ones = [new Uint8Array(16).fill(1)];
  const alone0 = (await m.evaluate({ images: small, shape: [1, 1, 4, 4], labels: zeros })).loss;
  const alone1 = (await m.evaluate({ images: small, shape: [1, 1, 4, 4], labels: ones })).loss;
  t.not(alone0, alone1, 'the two label maps give different losses');
  const batch = { images: small, shape: [1, 1, 4, 4], labels: zeros };
  const e0 = m.evaluate(batch);
  batch.labels = ones;
  const e1 = m.evaluate(batch);
  t.equal((await e0).loss, alone0, 'the first call evaluates the labels it was given');
  t.equal((await e1).loss, alone1);
  // The list of maps replaced in place, too.
  const list = [zeros[0]];
  const e2 = m.evaluate({ images: small, shape: [1, 1, 4, 4], labels: list });
  list[0] = ones[0];
  t.equal((await e2).loss, alone0, 'a label list changed after the call does not reach it');
  // A batch whose fields are getters of a class still reads (as the native side reads them).
  class Held {
    get images() { return small; }
    get shape() { return [1, 1, 4, 4]; }
    get labels() { return ones; }
  }
  t.equal((await m.evaluate(new Held() as unknown as Batch)).loss, alone1, 'a class instance as the batch');
  await m.dispose();
});

// A Float32Array whose buffer is transferred (postMessage, structuredClone) while a call
// reads it: its memory then belongs to the new ArrayBuffer and is freed with it. A CPU
// model reads copies of its inputs, so the call neither reads freed memory (a segfault of
// the whole process, before) nor sees the transfer.
t.test('inputs transferred away while a CPU call runs neither crash the process nor change the result', { skip: linux }, async (t) => {
  const run = runChild(t, `
    const { NativeModel } = require(${JSON.stringify(addon)});
    (async () => {
      const m = new NativeModel({ ndim: 2, classes: 2, annotators: 2, depth: 2, baseChannels: 8 });
      const side = 512, V = side * side;
      const images = new Float32Array(V).map((_, i) => Math.sin(i * 0.01));
      const labels = [0, 1].map((r) => new Uint8Array(V).map((_, i) => (i + r) % 2));
      const shape = [1, 1, side, side];
      const ref = await m.predict(new Float32Array(images), shape);
      const refLoss = (await m.evaluate({ images: new Float32Array(images), shape, labels: labels.map((l) => new Uint8Array(l)) })).loss;
      const away = (a) => { structuredClone(a.buffer, { transfer: [a.buffer] }); };
      const free = () => { for (let k = 0; k < 10; k++) { global.gc(); new Float32Array(V).fill(1e30); } };
      const p = m.predict(images, shape);
      away(images); free();
      const got = await p;
      let worst = 0;
      for (let i = 0; i < V * 2; i++) worst = Math.max(worst, Math.abs(got.probs[i] - ref.probs[i]));
      const images2 = new Float32Array(V).map((_, i) => Math.sin(i * 0.01));
      const e = m.evaluate({ images: images2, shape, labels });
      away(images2); labels.forEach(away); free();
      console.log(JSON.stringify({ worst, loss: (await e).loss, refLoss }));
    })();`, { gc: true, timeoutMs: 120_000 });
  t.equal(run.signal, null, 'no signal');
  t.equal(run.status, 0, run.stderr);
  const out = run.out;
  t.equal(out.worst, 0, 'the prediction of the images as they were at the call');
  t.equal(out.loss, out.refLoss, 'the loss of the batch as it was at the call');
});

t.test('an empty spatial axis is named as such, not as "not divisible"', async (t) => {
  const m = createModel({ ndim: 3, classes: 2, annotators: 1, depth: 2, baseChannels: 2 });
  await t.rejects(m.predict(new Float32Array(0), [1, 1, 2, 0, 2]), { message: 'spatial height is 0; every spatial size must be >= 1' });
  await t.rejects(m.trainStep({ images: new Float32Array(0), shape: [1, 1, 0, 2, 2], labels: [new Uint8Array(0)] }), { message: 'spatial depth is 0; every spatial size must be >= 1' });
  await m.dispose();
});

// Layers size their per-thread partial sums by the thread count and then split the work by
// it again: a pool resized between the two (setNumThreads from the main thread while a
// worker thread steps) hands out part indices past the partials' end. So the pool is not
// resized under a running call: setNumThreads says so instead.
t.test('setNumThreads is refused while a native call runs, and works once it settled', async (t) => {
  const before = backendInfo().threads;
  const m = createModel({ ndim: 2, classes: 2, annotators: 1, depth: 2, baseChannels: 8 });
  const images = new Float32Array(256 * 256);
  const running = m.trainStep({ images, shape: [1, 1, 256, 256], labels: [new Uint8Array(256 * 256)] });
  await new Promise((resolve) => setImmediate(resolve)); // the queued call has started
  t.throws(() => setNumThreads(before + 1), { message: /^setNumThreads: 1 native call\(s\) \(trainStep, predict, fuse, \.\.\.\) still running; await them first$/, code: 'CMSEG_INVALID_ARGUMENT' });
  t.equal(backendInfo().threads, before, 'the pool kept its size');
  t.ok(Number.isFinite((await running).loss));
  setNumThreads(1);
  t.equal(backendInfo().threads, 1, 'set once the call settled');
  setNumThreads(before);
  t.equal(backendInfo().threads, before);
  await m.dispose();
});

t.test('state calls while a call is queued are refused as caller errors, with the code of the others', async (t) => {
  const m = createModel({ ndim: 2, classes: 2, annotators: 1, depth: 2, baseChannels: 2 });
  const running = m.trainStep({ images: new Float32Array(64), shape: [1, 1, 8, 8], labels: [new Uint8Array(64)] });
  for (const call of ['getWeights', 'getGradients', 'getOptimizerState'] as const) {
    t.throws(() => m[call](), { message: new RegExp(`^${call}: the model has 1 queued call\\(s\\)`), code: 'CMSEG_INVALID_ARGUMENT' }, call);
  }
  t.throws(() => m.setWeights({}), { code: 'CMSEG_INVALID_ARGUMENT' }, 'setWeights');
  await running;
  t.equal(Object.keys(m.getWeights()).length, m.parameters().length, 'answered once the call settled');
  const memory = m.memory();
  t.same(memory, { device: 'cpu' }, 'a CPU model reports no pool figures');
  await m.dispose();
});

t.test('rater maps transferred away while fuse() runs neither crash the process nor change the result', { skip: linux }, async (t) => {
  const run = runChild(t, `
    const { fuse } = require(${JSON.stringify(addon)});
    (async () => {
      const side = 96, V = side ** 3;
      const maps = [0, 1, 2].map((r) => new Uint8Array(V).map((_, i) => ((i * (r + 3)) >> 4) % 3));
      const options = { method: 'spatial-staple', classes: 3, shape: [side, side, side] };
      const ref = await fuse(maps.map((m) => new Uint8Array(m)), options);
      const p = fuse(maps, options);
      for (const m of maps) structuredClone(m.buffer, { transfer: [m.buffer] });
      for (let k = 0; k < 10; k++) { global.gc(); new Uint8Array(V).fill(7); }
      const got = await p;
      let differ = 0;
      for (let v = 0; v < V; v++) differ += got.labels[v] !== ref.labels[v];
      console.log(JSON.stringify({ differ }));
    })();`, { gc: true, timeoutMs: 120_000 });
  t.equal(run.signal, null, 'no signal');
  t.equal(run.status, 0, run.stderr);
  t.same(run.out, { differ: 0 }, 'the fusion of the maps as they were at the call');
});

t.test('fuse names empty maps as empty, not as absent raters', async (t) => {
  const { fuse } = await import('../src/fusion/fuse');
  await t.rejects(fuse([new Uint8Array(0), new Uint8Array(0)], { method: 'mode' }), { message: 'fuse: the maps are empty (0 voxels): nothing to fuse' });
});

// A worker thread terminated while its model steps: the step finishes during the thread's
// teardown, where no Promise can be settled any more. That must end the thread, not the
// process (before: "terminate called after throwing an instance of 'Napi::Error'", SIGABRT).
t.test('terminating a worker thread during a native call does not abort the process', { skip: linux }, async (t) => {
  const run = runChild(t, `
    const { Worker, isMainThread, parentPort } = require('worker_threads');
    const { NativeModel, fuse, setNumThreads } = require(${JSON.stringify(addon)});
    const side = 192, V = side * side;
    const batch = () => ({ images: new Float32Array(V), shape: [1, 1, side, side], labels: [new Uint8Array(V)] });
    if (isMainThread) {
      (async () => {
        for (const kind of ['trainStep', 'predict', 'fuse']) {
          const w = new Worker(__filename, { workerData: kind });
          await new Promise((resolve) => w.once('message', resolve)); // its call is running
          await w.terminate();
        }
        const m = new NativeModel({ ndim: 2, classes: 2, annotators: 1, depth: 2, baseChannels: 8 });
        const loss = (await m.trainStep(batch())).loss;
        let threads = 'set';
        try { setNumThreads(1); } catch (e) { threads = e.message; } // no call of the threads left counted
        console.log(JSON.stringify({ loss, threads }));
      })();
    } else {
      const kind = require('worker_threads').workerData;
      const m = new NativeModel({ ndim: 2, classes: 2, annotators: 1, depth: 3, baseChannels: 16 });
      if (kind === 'trainStep') m.trainStep(batch());
      else if (kind === 'predict') m.predict(new Float32Array(V * 4), [4, 1, side, side], { cms: true });
      else fuse([0, 1, 2].map(() => new Uint8Array(64 ** 3)), { method: 'spatial-staple', classes: 2, shape: [64, 64, 64] });
      parentPort.postMessage('running');
    }`, { timeoutMs: 120_000 });
  t.equal(run.signal, null, 'no signal');
  t.equal(run.status, 0, run.stderr);
  const out = run.out;
  t.ok(Number.isFinite(out.loss), 'the main thread trains afterwards');
  t.equal(out.threads, 'set', 'setNumThreads works once every call is done');
});

// predict() holds its outputs and the forward pass's maps at once. Each may fit the machine
// while both do not: refused up front, before the outputs are allocated (with Linux's
// overcommit they would be granted, and the process killed when the CMs are written).
t.test('a prediction whose outputs and forward pass together exceed the machine is refused', { skip: linux }, async (t) => {
  const out = underMemoryLimit(t, `
    // 2D, one level of 1 channel, 16 annotators: the forward pass holds 3 maps, 2 logits and
    // 16 x 4 CM head channels (69 floats a pixel); the outputs are 2 + 64 + 32 = 98 floats.
    const base = 1, L = 2, R = 16;
    const m = new NativeModel({ ndim: 2, classes: L, annotators: R, depth: 1, baseChannels: base });
    const outputs = L + R * L * L + R * L, forward = 3 * base + L + R * L * L;
    // Outputs at 0.62 of the memory, the forward pass at 0.44: each fits, both do not.
    const V = (0.62 * os.totalmem()) / (outputs * 4);
    const side = Math.ceil(Math.sqrt(V));
    const res = { side, forwardShare: (forward * side * side * 4) / os.totalmem() };
    try { await m.predict(new Float32Array(side * side), [1, 1, side, side], { cms: true, annotatorProbs: true }); res.predict = 'predicted'; }
    catch (e) { res.predict = e.code + ' ' + e.message; }
    console.log(JSON.stringify(res));`);
  t.ok((out.forwardShare as number) < 1, `the forward pass alone fits (${out.forwardShare})`);
  const side = out.side as number;
  t.match(out.predict, new RegExp(`^CMSEG_OUT_OF_MEMORY a prediction on 1 image\\(s\\) of 1x${side}x${side} needs more than [0-9.]+ GiB \\(outputs [0-9.]+ GiB, forward pass [0-9.]+ GiB\\), more than this machine's [0-9.]+ GiB of memory; predict fewer or smaller images at a time, or without cms / annotatorProbs$`));
});
