// Robustness of the native bindings against hostile or mistaken input: outputs
// too big to allocate, dispose(), CMSEG_NUM_THREADS / setNumThreads, atomic and
// checked optimiser state, float-range options, ambiguous batches, shapes past
// 2^31 - 1, and files that are not safetensors at all.
import t from 'tap';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { createModel, setNumThreads } from '../src/index';
import { loadNative } from '../src/native';
import { decodeSafetensors, encodeSafetensors, readSafetensors } from '../src/data/safetensors';
import { fuse } from '../src/fusion/fuse';
import { runChild } from './helpers/child';

// The native class as these tests use it (dispose() may not be in the typings yet).
interface RawModel {
  trainStep(b: object): Promise<unknown>;
  evaluate(b: object): Promise<unknown>;
  predict(images: Float32Array, shape: number[], o?: object): Promise<{ probs: Float32Array; cms?: Float32Array }>;
  getWeights(): Record<string, Float32Array>;
  setWeights(w: Record<string, Float32Array>): void;
  getOptimizerState(): { step: number; m: Record<string, Float32Array>; v: Record<string, Float32Array> };
  setOptimizerState(s: object): void;
  setOptimizer(o: object): void;
  getOptimizer(): Record<string, unknown>;
  setLoss(o: object): void;
  getLoss(): Record<string, number>;
  config(): Record<string, unknown>;
  parameters(): { name: string; shape: number[] }[];
  memory(): unknown;
  dispose(): undefined;
}
const small = { classes: 2, annotators: 2, depth: 2, baseChannels: 4 };
const rawModel = (config: object = small) =>
  new (loadNative().NativeModel as unknown as new (c: object) => RawModel)(config);

const N = 1, H = 8, W = 8;
const images = () => Float32Array.from({ length: N * H * W }, (_, i) => Math.sin(i));
const labels = () => [new Uint8Array(N * H * W), new Uint8Array(N * H * W).fill(1)];
const batch = () => ({ images: images(), shape: [N, 1, H, W], labels: labels() });

t.test('predict rejects outputs it cannot allocate instead of aborting the process', async (t) => {
  const m = createModel({ classes: 16, annotators: 64, depth: 1, baseChannels: 1 });
  // cms: 64 annotators x 16 x 16 x 2048^2 floats = 256 GiB.
  await t.rejects(m.predict(new Float32Array(2048 * 2048), [1, 1, 2048, 2048], { cms: true }),
    /out of memory allocating the prediction outputs \(256\.\d GiB\)/);
  // The model is still usable, and natively allocated outputs read back as usual.
  const p = await m.predict(new Float32Array(4 * 4).fill(0.5), [1, 1, 4, 4], { cms: true, annotatorProbs: true });
  t.equal(p.probs.length, 16 * 16);
  t.equal(p.cms!.length, 64 * 16 * 16 * 16);
  t.equal(p.annotatorProbs!.length, 64 * 16 * 16);
  let sum = 0;
  for (let l = 0; l < 16; l++) sum += p.probs[l * 16];
  t.ok(Math.abs(sum - 1) < 1e-5, `probabilities of pixel 0 sum to 1 (${sum})`);
  t.ok(p.cms!.every(Number.isFinite));
  await t.rejects(m.predict(new Float32Array(16), [1, 1, 4, 4], { cms: 'no' as unknown as boolean }), /predict options\.cms must be a boolean/);
});

t.test('dispose() frees the native model; later calls throw "this model was disposed"', async (t) => {
  const nm = rawModel({ classes: 2, annotators: 2, depth: 3, baseChannels: 16 });
  t.equal(nm.dispose(), undefined);
  const disposed = /this model was disposed/;
  t.throws(() => nm.getWeights(), disposed);
  t.throws(() => nm.setWeights({}), disposed);
  t.throws(() => nm.getOptimizerState(), disposed);
  t.throws(() => nm.setOptimizerState({}), disposed);
  t.throws(() => nm.setOptimizer({ lr: 0.1 }), disposed);
  t.throws(() => nm.getOptimizer(), disposed);
  t.throws(() => nm.setLoss({}), disposed);
  t.throws(() => nm.getLoss(), disposed);
  t.throws(() => nm.config(), disposed);
  t.throws(() => nm.parameters(), disposed);
  t.throws(() => nm.memory(), disposed);
  t.throws(() => nm.trainStep(batch()), disposed);
  t.throws(() => nm.evaluate(batch()), disposed);
  t.throws(() => nm.predict(images(), [N, 1, H, W]), disposed);
  try {
    nm.config();
  } catch (e) {
    t.equal((e as { code?: string }).code, 'CMSEG_DISPOSED');
  }
  t.equal(nm.dispose(), undefined, 'a second dispose() does nothing');
});

t.test('dropped models are collected without an explicit gc (their host memory is reported to V8)', async (t) => {
  // 20 models of 7.5 MB (parameters, gradients, Adam moments) and a few bytes of JS
  // heap each: V8 collects some only when it knows about the native memory.
  let collected = 0;
  const registry = new FinalizationRegistry(() => collected++);
  for (let i = 0; i < 20; i++) {
    registry.register(rawModel({ classes: 2, annotators: 2, depth: 3, baseChannels: 32 }), i);
    await new Promise((resolve) => setImmediate(resolve)); // lets finalizers run
  }
  await new Promise((resolve) => setTimeout(resolve, 50));
  t.ok(collected > 0, `${collected} of 20 dropped models collected`);
});

t.test('dispose() is refused while an async call runs', async (t) => {
  const nm = rawModel();
  const step = nm.trainStep(batch());
  t.throws(() => nm.dispose(), /model is busy/);
  await step;
  const pred = nm.predict(images(), [N, 1, H, W]);
  t.throws(() => nm.dispose(), /model is busy/);
  t.equal((await pred).probs.length, N * 2 * H * W);
  nm.dispose();
  t.throws(() => nm.trainStep(batch()), /this model was disposed/);
});

t.test('the typed Model rejects after dispose()', { skip: typeof (createModel(small) as { dispose?: unknown }).dispose !== 'function' && 'Model.dispose() not there yet' }, async (t) => {
  const m = createModel(small) as unknown as { dispose(): Promise<void>; trainStep(b: object): Promise<unknown> };
  await m.dispose();
  await t.rejects(m.trainStep(batch()), /this model was disposed/);
});

function addonEnv(value: string) {
  const file = path.resolve(__dirname, '..', 'build', 'Release', 'cmseg.node');
  return spawnSync(process.execPath, ['-e', `process.stdout.write(String(require(${JSON.stringify(file)}).backendInfo().threads))`], {
    env: { ...process.env, CMSEG_NUM_THREADS: value },
    encoding: 'utf8',
  });
}

t.test('CMSEG_NUM_THREADS is validated, with a warning naming the value', async (t) => {
  // The fallback is every usable CPU: the cores, fewer under an affinity mask or a CPU quota.
  const cores = Math.min(loadNative().backendInfo().usableCpus, 1024);
  for (const value of ['99999', 'abc', '0', '-3', '1.5', '2x']) {
    const r = addonEnv(value);
    t.equal(r.status, 0, `${value}: exits normally (${r.stderr.slice(0, 200)})`);
    t.equal(r.signal, null);
    t.equal(Number(r.stdout), cores, `${value}: falls back to the usable CPUs`);
    t.match(r.stderr, `CMSEG_NUM_THREADS='${value}'`);
    t.match(r.stderr, cores === 1 ? /\(not an integer in 1\.\.1024\); using 1 thread \(/ : /\(not an integer in 1\.\.1024\); using \d+ threads \(/);
    t.equal(r.stderr.split('CMSEG_NUM_THREADS').length - 1, 1, 'warned once');
  }
  const ok = addonEnv('3');
  t.equal(ok.stdout, '3');
  t.equal(ok.stderr, '');
});

t.test('setNumThreads takes integers in 1..1024 only', async (t) => {
  t.throws(() => setNumThreads(1.5), /setNumThreads expects an integer in 1\.\.1024, got 1\.5/);
  t.throws(() => setNumThreads(0), /got 0/);
  t.throws(() => setNumThreads(2 ** 32 + 1), /got 4294967297/);
  t.throws(() => setNumThreads(NaN), /integer/);
  const before = loadNative().backendInfo().threads;
  setNumThreads(2);
  t.equal(loadNative().backendInfo().threads, 2);
  setNumThreads(before);
});

t.test('setOptimizerState validates m and v in full before changing anything', async (t) => {
  const nm = rawModel();
  await nm.trainStep(batch());
  const before = nm.getOptimizerState();
  const name = Object.keys(before.m)[0];
  const n = before.m[name].length;
  const unchanged = () => {
    const now = nm.getOptimizerState();
    t.equal(now.step, before.step);
    t.same(now.m[name], before.m[name]);
    t.same(now.v[name], before.v[name]);
  };
  t.throws(() => nm.setOptimizerState({ step: 7, m: { [name]: new Float32Array(n).fill(5) }, v: { bogus: new Float32Array(1) } }),
    /optimizer state\.v: unknown parameter 'bogus'/);
  unchanged();
  t.throws(() => nm.setOptimizerState({ step: 7, m: { [name]: new Float32Array(n).fill(5) }, v: { [name]: new Float32Array(n).fill(-1) } }),
    /optimizer state\.v\['.*'\] contains a negative value .* at index 0/);
  unchanged();
  for (const bad of [NaN, Infinity, -Infinity]) {
    t.throws(() => nm.setOptimizerState({ v: { [name]: new Float32Array(n).fill(bad) } }), /optimizer state\.v\['.*'\] contains a non-finite value/);
    t.throws(() => nm.setOptimizerState({ m: { [name]: new Float32Array(n).fill(bad) } }), /optimizer state\.m\['.*'\] contains a non-finite value/);
  }
  unchanged();
  // Negative first moments are fine; a valid state is applied whole.
  nm.setOptimizerState({ step: 3, m: { [name]: new Float32Array(n).fill(-0.5) }, v: { [name]: new Float32Array(n).fill(0.25) } });
  const now = nm.getOptimizerState();
  t.equal(now.step, 3);
  t.equal(now.m[name][0], -0.5);
  t.equal(now.v[name][n - 1], 0.25);
  nm.dispose();
});

t.test('optimizer and loss numbers must fit a float', async (t) => {
  const m = createModel(small);
  const before = m.optimizer;
  for (const key of ['lr', 'beta1', 'beta2', 'eps', 'weightDecay'])
    t.throws(() => m.setOptimizer({ [key]: 1e40 }), new RegExp(`optimizer\\.${key} is 1e\\+40, outside the float range`));
  t.same(m.optimizer, before);
  t.throws(() => m.setLoss({ lambda: -1e39 }), /loss\.lambda is -1e\+39, outside the float range/);
  t.throws(() => m.setLoss({ lambdaWarmup: 1e300 }), /loss\.lambdaWarmup is 1e\+300, outside the float range/);
  t.throws(() => createModel({ ...small, optimizer: { lr: 1e40 } }), /outside the float range/);
  m.setOptimizer({ lr: 3e38 });
  t.ok(Number.isFinite(m.optimizer.lr));
});

// Values that fit a float but break training: Adam's eps 0 turns an absent annotator's
// weights into NaN (0/0 where all its gradients were 0), a negative trace weight flips the
// regulariser the warm-up already negates, a seed past 2^53 is not the integer given.
t.test('optimizer eps > 0, trace weights >= 0, seeds within 2^53', async (t) => {
  const m = createModel(small);
  const before = { optimizer: m.optimizer, loss: m.loss };
  t.throws(() => m.setOptimizer({ eps: 0 }), /optimizer\.eps must be > 0, got 0/);
  t.throws(() => m.setOptimizer({ eps: -1e-8 }), /optimizer\.eps must be > 0/);
  t.throws(() => m.setLoss({ lambda: -1 }), /loss\.lambda must be >= 0, got -1/);
  t.throws(() => m.setLoss({ lambdaWarmup: -0.5 }), /loss\.lambdaWarmup must be >= 0/);
  t.same({ optimizer: m.optimizer, loss: m.loss }, before, 'nothing changed');
  t.throws(() => createModel({ ...small, optimizer: { eps: 0 } }), /optimizer\.eps must be > 0/);
  t.throws(() => createModel({ ...small, loss: { lambda: -2 } }), /loss\.lambda must be >= 0/);
  t.throws(() => createModel({ ...small, seed: 2 ** 80 }), /config\.seed must be an integer in 0\.\.2\^53-1/);
  t.equal(createModel({ ...small, seed: Number.MAX_SAFE_INTEGER }).config.seed, Number.MAX_SAFE_INTEGER);
  m.setLoss({ lambda: 0, lambdaWarmup: 0 }); // no regulariser (cm-notrace) stays allowed
  t.equal(m.loss.lambda, 0);
});

t.test('ambiguous batches are rejected, naming the fields', async (t) => {
  const m = createModel(small);
  const target = new Uint8Array(N * H * W);
  const softTarget = new Float32Array(N * 2 * H * W).fill(0.5);
  await t.rejects(m.trainStep({ ...batch(), target }), /batch has both labels and target; pass only one of labels/);
  await t.rejects(m.trainStep({ images: images(), shape: [N, 1, H, W], target, softTarget }), /batch has both target and softTarget/);
  await t.rejects(m.evaluate({ ...batch(), target, softTarget }), /batch has both labels, target and softTarget/);
  await t.rejects(m.trainStep({ ...batch(), present: Uint8Array.from([1, 2]) }), /batch\.present\[1\] is 2; entries must be 0 \(annotator absent\) or 1/);
  await t.rejects(m.trainStep({ images: images(), shape: [N, 1, H, W], target, present: Uint8Array.from([1, 1]) }),
    /batch\.present applies to labels .*with target it would be ignored/);
  // Rows of soft labels sum to 1 (or 0: a pixel nobody labelled); 1.5 + 1.5 would weight a pixel 3x.
  const heavy = new Float32Array(N * 2 * H * W).fill(0.5);
  heavy[3] = 1.5, heavy[H * W + 3] = 1.5; // image 0, pixel 3: both classes
  await t.rejects(m.trainStep({ images: images(), shape: [N, 1, H, W], softTarget: heavy }),
    /softTarget: the class probabilities of pixel 3 of image 0 sum to 3; each pixel's must sum to 1 \(or 0/);
  t.equal(m.step, 0, 'no step was taken');
  await m.trainStep({ ...batch(), present: Uint8Array.from([1, 0]) });
  await m.trainStep({ images: images(), shape: [N, 1, H, W], softTarget });
  const unlabelled = softTarget.slice();
  unlabelled[5] = 0, unlabelled[H * W + 5] = 0; // a pixel nobody labelled: ignored, accepted
  await m.trainStep({ images: images(), shape: [N, 1, H, W], softTarget: unlabelled });
  t.equal(m.step, 3);
});

t.test('shape entries above 2^31 - 1 or fractional are rejected everywhere', async (t) => {
  const m = createModel(small);
  const big = /shape\[2\] is 4294967304, more than the largest supported size 2147483647/;
  await t.rejects(m.trainStep({ ...batch(), shape: [N, 1, 2 ** 32 + 8, W] }), big);
  await t.rejects(m.evaluate({ ...batch(), shape: [N, 1, 2 ** 32 + 8, W] }), big);
  await t.rejects(m.predict(images(), [N, 1, 2 ** 32 + 8, W]), big);
  await t.rejects(m.predict(images(), [2 ** 31, 1, H, W]), /shape\[0\] is 2147483648, more than/);
  await t.rejects(m.trainStep({ ...batch(), shape: [N, 1, 8.5, W] }), /shape\[2\] must be a non-negative integer, got 8\.5/);
  await t.rejects(fuse([new Uint8Array(4), new Uint8Array(4)], { method: 'spatial-staple', classes: 2, shape: [2 ** 31, 2] }),
    /fuse options\.shape\[0\] is 2147483648, more than the largest supported size/);
  t.equal(m.step, 0);
});

t.test('a file that is not safetensors says so; a cut header says truncated', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cmseg-robust-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const text = path.join(dir, 'text.safetensors');
  fs.writeFileSync(text, 'this is a plain text file, not tensors\n');
  await t.rejects(readSafetensors(text), {
    name: 'SafetensorsError',
    message: new RegExp(`^${text.replace(/[.\\/]/g, '\\$&')} is not a safetensors file \\(its header length 2338328219631577204 is implausible`),
  });
  // A small header length whose JSON does not start where it should.
  const odd = Buffer.concat([Buffer.from([4, 0, 0, 0, 0, 0, 0, 0]), Buffer.from('abcdefgh')]);
  t.throws(() => decodeSafetensors(odd, 'odd.bin'), /^odd\.bin is not a safetensors file \(its header of 4 bytes does not start with a JSON object\)/);
  // A real file cut inside its header is still 'truncated'.
  const good = encodeSafetensors({ x: new Float32Array(4) });
  t.throws(() => decodeSafetensors(good.subarray(0, 20), 'cut.safetensors'), /^cut\.safetensors: truncated: header of \d+ bytes but only 12 follow/);
  t.throws(() => decodeSafetensors(good.subarray(0, 5), 'tiny.safetensors'), /truncated: 5 bytes, no header length/);
  t.same(Array.from(decodeSafetensors(good).tensors.x.data as Float32Array), [0, 0, 0, 0]);
});

// Requests larger than the machine's memory are refused before any page is touched: with
// Linux's overcommit they would otherwise start and be killed mid-step by the kernel. Run
// in a child under `ulimit -v 8 GB`, so that a missing check fails with the allocator's
// message instead of taking this process down.
const dist = path.join(__dirname, '..', 'dist', 'index.js');
t.test('a model or a step larger than the machine is refused, naming the need', { skip: process.platform !== 'linux' || !fs.existsSync(dist) ? 'Linux with a dist/ build only' : false }, async (t) => {
  const run = runChild(t, `
    const { createModel } = require(${JSON.stringify(dist)});
    const os = require('os');
    (async () => {
      const out = {};
      try { createModel({ ndim: 2, inChannels: 1, classes: 2, annotators: 2, depth: 8, baseChannels: 1024 }); out.create = 'created'; }
      catch (e) { out.create = e.code + ' ' + e.message; }
      // 64 annotators x 16 classes: 16384 head channels, 64 KiB a pixel, half of it claimed.
      const m = createModel({ ndim: 2, inChannels: 1, classes: 16, annotators: 64, depth: 1, baseChannels: 1 });
      const side = Math.ceil(Math.sqrt((2 * os.totalmem()) / 32768));
      const labels = (s) => Array.from({ length: 64 }, () => new Uint8Array(s * s));
      try { await m.trainStep({ images: new Float32Array(side * side), shape: [1, 1, side, side], labels: labels(side) }); out.step = 'stepped'; }
      catch (e) { out.step = e.code + ' ' + e.message; }
      // The model still trains after the refusal.
      out.after = (await m.trainStep({ images: new Float32Array(64), shape: [1, 1, 8, 8], labels: labels(8) })).loss;
      console.log(JSON.stringify(out));
    })();`, { limitKiB: 8_000_000 });
  t.equal(run.status, 0, run.stderr);
  const out = run.out as { create: string; step: string; after: number };
  t.match(out.create, /^CMSEG_OUT_OF_MEMORY the model's 509649496074 parameters need 7594\.4 GiB \(values, gradients and Adam moments\), more than this machine's [0-9.]+ GiB of memory: lower baseChannels or depth$/);
  t.match(out.step, /^CMSEG_OUT_OF_MEMORY a training step on 1 image\(s\) of 1x\d+x\d+ needs more than [0-9.]+ GiB, more than this machine's [0-9.]+ GiB of memory: use a smaller batch or patch/);
  t.ok(Number.isFinite(out.after), 'a fitting step runs afterwards');
});
