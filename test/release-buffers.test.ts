// Model.releaseBuffers(): the activation buffers a model keeps between calls are freed and
// rebuilt on the next call with the same results, and ensemble() frees each member's after
// its prediction, so an ensemble of N 3D models does not hold N sets of buffers.
import t from 'tap';
import * as v8 from 'v8';
import * as vm from 'vm';
import { Model, ensemble, mirrored } from '../src';

v8.setFlagsFromString('--expose-gc');
const gc = vm.runInNewContext('gc') as () => void;
const rssMB = () => process.memoryUsage().rss / 1048576;

const config3d = (seed: number) => ({ ndim: 3 as const, inChannels: 2, classes: 3, annotators: 2, depth: 3, baseChannels: 16, seed });

function volume(n: number, side: number, channels: number): Float32Array {
  return new Float32Array(n * channels * side ** 3).map((_, i) => Math.sin(i * 0.37) + 0.1 * Math.cos(i * 0.011));
}

t.test('predictions and steps after releaseBuffers() equal those of a model that kept its buffers', async (t) => {
  const config = { ndim: 2 as const, classes: 3, annotators: 2, depth: 2, baseChannels: 8, seed: 4 };
  const kept = new Model(config);
  const released = new Model(config);
  t.teardown(() => Promise.all([kept.dispose(), released.dispose()]).then(() => undefined));
  const images = new Float32Array(2 * 16 * 16).map((_, i) => Math.sin(i));
  const labels = [0, 1].map((r) => new Uint8Array(2 * 16 * 16).map((_, i) => (Math.sin(i + r) > 0 ? 1 + r : 0)));
  const batch = { images, shape: [2, 1, 16, 16], labels };
  for (let i = 0; i < 2; i++) {
    const a = await kept.trainStep(batch);
    // Queued behind the step (not awaited): runs in its turn, as dispose() does.
    const step = released.trainStep(batch);
    const release = released.releaseBuffers();
    const b = await step;
    await release;
    t.equal(b.loss, a.loss, `step ${i}: the same loss`);
    const p = await kept.predict(images, [2, 1, 16, 16], { cms: true, annotatorProbs: true });
    const q = await released.predict(images, [2, 1, 16, 16], { cms: true, annotatorProbs: true });
    await released.releaseBuffers();
    t.same([...q.probs], [...p.probs], `prediction ${i}: the same probabilities`);
    t.same([...q.cms!], [...p.cms!], `prediction ${i}: the same CMs`);
  }
  await released.dispose();
  await t.rejects(released.releaseBuffers(), { code: 'CMSEG_DISPOSED' }, 'a disposed model refuses');
});

t.test('an ensemble of 3D models frees each member\'s buffers after it predicts', { skip: process.platform === 'linux' ? false : 'RSS from /proc: Linux' }, async (t) => {
  const side = 48;
  const models = [1, 2, 3, 4].map((seed) => new Model(config3d(seed)));
  t.teardown(() => Promise.all(models.map((m) => m.dispose())).then(() => undefined));
  const images = volume(1, side, 2);
  const shape = [1, 2, side, side, side];
  // A first tiny call loads what every model shares (oneDNN's kernels, thread pools).
  for (const m of models) {
    await m.predict(volume(1, 8, 2), [1, 2, 8, 8, 8]);
    await m.releaseBuffers();
  }
  gc();
  const before = rssMB();
  const one = await models[0].predict(images, shape);
  gc();
  const withOne = rssMB() - before; // one member's buffers and one output
  await models[0].releaseBuffers();
  gc();
  const released = rssMB() - before;
  const mean = await ensemble(models).predict(images, shape);
  gc();
  const withEnsemble = rssMB() - before;
  t.comment(`RSS above the start: ${withOne.toFixed(1)} MB after one member's prediction, ${released.toFixed(1)} MB once released, ${withEnsemble.toFixed(1)} MB after the ensemble of 4`);
  // Measured as what releaseBuffers() gives back: RSS above a start taken after trims moves by
  // 10-20 MB between runs (38-60 MB after one prediction, -15 to -2 once released), the
  // difference much less (50-70 MB).
  t.ok(withOne - released > 25, `one 3D prediction keeps tens of MB of buffers, which releaseBuffers() gives back (${(withOne - released).toFixed(1)} MB)`);
  t.ok(withOne - released > 0.5 * withOne, 'releaseBuffers() gives most of them back');
  // Kept by every member, four sets would be ~4x one member's; released, the outputs remain.
  t.ok(withEnsemble < 1.5 * withOne, `the ensemble of 4 holds less than 1.5x one member's (${withEnsemble.toFixed(1)} vs ${withOne.toFixed(1)} MB)`);
  t.equal(mean.probs.length, one.probs.length);
});

t.test('releaseBuffers passes through mirrored() and ensemble() to their models', async (t) => {
  const calls: string[] = [];
  const fake = (name: string) => ({
    config: { ndim: 2 as const, inChannels: 1, classes: 2, annotators: 1, depth: 1 },
    predict: async (images: Float32Array, shape: number[]) => {
      calls.push(`predict ${name}`);
      const n = shape[0] * shape[2] * shape[3];
      return { probs: new Float32Array(2 * n).fill(0.5) };
    },
    releaseBuffers: async () => {
      calls.push(`release ${name}`);
    },
  });
  const both = ensemble([mirrored(fake('a'), [0]), fake('b')]);
  await both.predict(new Float32Array(4), [1, 1, 2, 2]);
  t.same(calls, ['predict a', 'predict a', 'release a', 'predict b', 'release b'], 'each member frees its buffers after its predictions, before the next member predicts');
  calls.length = 0;
  await both.releaseBuffers!();
  t.same(calls, ['release a', 'release b']);
  // A member without releaseBuffers (any object with config and predict) still ensembles.
  const plain = { config: fake('c').config, predict: fake('c').predict };
  calls.length = 0;
  await ensemble([plain, fake('d')]).predict(new Float32Array(4), [1, 1, 2, 2]);
  t.same(calls, ['predict c', 'predict d', 'release d']);
});

t.test('a model given to ensemble() more than once predicts once and weighs as often as given', async (t) => {
  const calls: string[] = [];
  const constant = (name: string, p0: number) => ({
    config: { ndim: 2 as const, inChannels: 1, classes: 2, annotators: 1, depth: 1 },
    predict: async (images: Float32Array, shape: number[]) => {
      calls.push(name);
      const n = shape[0] * shape[2] * shape[3];
      return { probs: new Float32Array(2 * n).map((_, i) => (i < n ? p0 : 1 - p0)) };
    },
  });
  const a = constant('a', 0.9);
  const b = constant('b', 0.3);
  const out = await ensemble([a, b, a]).predict(new Float32Array(4), [1, 1, 2, 2]);
  t.same(calls, ['a', 'b'], 'a predicted once');
  // 2/3 * 0.9 + 1/3 * 0.3 = 0.7 (background), 0.3 (foreground), by hand.
  for (let i = 0; i < 4; i++) t.ok(Math.abs(out.probs[i] - 0.7) < 1e-6 && Math.abs(out.probs[4 + i] - 0.3) < 1e-6, `pixel ${i}: ${out.probs[i]}, ${out.probs[4 + i]}`);
  calls.length = 0;
  const same = await ensemble([a, a, a]).predict(new Float32Array(4), [1, 1, 2, 2]);
  t.same(calls, ['a']);
  t.equal(same.probs[0], Math.fround(0.9), 'three namings of one model: its own prediction, bit for bit');
});
