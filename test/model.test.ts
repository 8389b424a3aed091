// The TypeScript API over the native engine: training, gradients, prediction,
// weights, optimiser settings, concurrency and every kind of invalid input.
import t from 'tap';
import { argmaxClasses, backendInfo, createModel, Model } from '../src/index';

function randomBatch(n: number, c: number, h: number, w: number, classes: number, annotators: number, seed = 1) {
  let s = seed >>> 0;
  const rand = () => ((s = (s * 1664525 + 1013904223) >>> 0) / 4294967296);
  const images = new Float32Array(n * c * h * w).map(() => rand() * 2 - 1);
  const labels = Array.from({ length: annotators }, () => new Uint8Array(n * h * w).map(() => Math.floor(rand() * classes)));
  return { images, shape: [n, c, h, w], labels };
}

t.test('backendInfo reports the CPU reference', async (t) => {
  const info = backendInfo();
  t.equal(info.cpu, true);
  t.type(info.onednn, 'boolean');
  t.type(info.cuda, 'boolean');
  t.ok(info.threads >= 1);
});

t.test('parameters follow SPEC names and PyTorch shapes', async (t) => {
  const m = createModel({ ndim: 2, inChannels: 1, classes: 2, annotators: 3, depth: 3, baseChannels: 4 });
  const params = new Map(m.parameters().map((p) => [p.name, p.shape]));
  t.same(params.get('enc.0.conv1.weight'), [4, 1, 3, 3]);
  t.same(params.get('up.0.weight'), [16, 8, 2, 2]);
  t.same(params.get('dec.1.conv2.weight'), [4, 4, 3, 3]);
  t.same(params.get('seg.weight'), [2, 4, 1, 1]);
  t.same(params.get('cm.2.weight'), [4, 4, 1, 1]);
  t.same(m.config.cmMode, 'full');
  const w = m.getWeights();
  t.same(Object.keys(w), m.parameters().map((p) => p.name));
});

t.test('training drives the loss down on a fixed batch', async (t) => {
  const m = createModel({ classes: 2, annotators: 2, depth: 2, baseChannels: 8, optimizer: { lr: 1e-2 } });
  const b = randomBatch(2, 1, 16, 16, 2, 2, 3);
  // Both annotators see the same learnable rule: foreground where the pixel is bright.
  for (const l of b.labels) for (let i = 0; i < l.length; i++) l[i] = b.images[i] > 0.2 ? 1 : 0;
  const first = await m.trainStep(b);
  t.equal(first.ce.length, 2);
  t.equal(first.trace.length, 2);
  t.equal(first.step, 1);
  let last = first;
  for (let i = 0; i < 40; i++) last = await m.trainStep(b);
  t.ok(last.loss < 0.3 * first.loss, `loss ${first.loss.toFixed(3)} -> ${last.loss.toFixed(3)}`);
  t.equal(m.step, 41);
});

t.test('gradients from the addon match finite differences of evaluate', async (t) => {
  const m = createModel({ classes: 3, annotators: 2, depth: 2, baseChannels: 4, loss: { lambda: 0.1 } });
  const b = randomBatch(2, 1, 8, 8, 3, 2, 5);
  const present = new Uint8Array([1, 1, 0, 1]); // annotator 0 did not label image 1
  b.labels[1][3] = 255;
  await m.computeGradients({ ...b, present });
  const grads = m.getGradients();
  const weights = m.getWeights();
  // The heads' biases enter the loss smoothly (no ReLU between them and the loss).
  for (const name of ['seg.bias', 'cm.1.bias']) {
    for (const i of [0, 2]) {
      const h = 1e-3;
      const w = weights[name].slice();
      w[i] += h;
      m.setWeights({ [name]: w });
      const up = (await m.evaluate({ ...b, present })).loss;
      w[i] -= 2 * h;
      m.setWeights({ [name]: w });
      const down = (await m.evaluate({ ...b, present })).loss;
      m.setWeights({ [name]: weights[name] });
      const numeric = (up - down) / (2 * h);
      t.ok(Math.abs(grads[name][i] - numeric) <= 1e-4 + 2e-2 * Math.abs(numeric), `${name}[${i}] ${grads[name][i]} vs ${numeric}`);
    }
  }
});

t.test('predict returns probabilities, CMs and q = A p', async (t) => {
  const m = createModel({ classes: 3, annotators: 2, depth: 2, baseChannels: 4 });
  const { images, shape } = randomBatch(1, 1, 8, 8, 3, 2);
  const pred = await m.predict(images, shape, { cms: true, annotatorProbs: true });
  const V = 64;
  t.same(pred.probsShape, [1, 3, 8, 8]);
  t.same(pred.cmsShape, [1, 2, 3, 3, 8, 8]);
  for (let v = 0; v < V; v += 7) {
    const sum = pred.probs[v] + pred.probs[V + v] + pred.probs[2 * V + v];
    t.ok(Math.abs(sum - 1) < 1e-5);
    for (let r = 0; r < 2; r++)
      for (let i = 0; i < 3; i++) {
        let q = 0;
        for (let j = 0; j < 3; j++) q += pred.cms![((r * 3 + i) * 3 + j) * V + v] * pred.probs[j * V + v];
        t.ok(Math.abs(q - pred.annotatorProbs![(r * 3 + i) * V + v]) < 1e-5);
      }
  }
  const labels = argmaxClasses(pred.probs, 1, 3);
  t.equal(labels.length, V);
  t.ok(labels.every((x) => x < 3));
});

t.test('weights round-trip and bad weights are rejected whole', async (t) => {
  const a = createModel({ classes: 2, annotators: 1, depth: 2, baseChannels: 4, seed: 1 });
  const b = createModel({ classes: 2, annotators: 1, depth: 2, baseChannels: 4, seed: 2 });
  const { images, shape } = randomBatch(1, 1, 8, 8, 2, 1);
  b.setWeights(a.getWeights());
  const pa = await a.predict(images, shape);
  const pb = await b.predict(images, shape);
  t.same(Array.from(pb.probs), Array.from(pa.probs));
  const before = b.getWeights()['seg.bias'].slice();
  t.throws(() => b.setWeights({ 'seg.bias': new Float32Array([9, 9]), 'nope.weight': new Float32Array(1) }), /unknown parameter 'nope.weight'/);
  t.same(Array.from(b.getWeights()['seg.bias']), Array.from(before), 'nothing changed');
  t.throws(() => b.setWeights({ 'seg.bias': new Float32Array(3) }), /has 3 elements, expected 2/);
  t.throws(() => b.setWeights({ 'seg.bias': new Float32Array([0, NaN]) }), /non-finite value at index 1/);
});

t.test('optimiser settings change between steps', async (t) => {
  const m = createModel({ classes: 2, annotators: 1, depth: 1, baseChannels: 4, optimizer: { kind: 'adamw', lr: 0.5, weightDecay: 0.1 } });
  t.equal(m.optimizer.kind, 'adamw');
  t.ok(Math.abs(m.optimizer.lr - 0.5) < 1e-7);
  m.setOptimizer({ lr: 0 , weightDecay: 0 });
  const before = m.getWeights();
  await m.trainStep(randomBatch(1, 1, 4, 4, 2, 1));
  const after = m.getWeights();
  t.same(Array.from(after['enc.0.conv1.weight']), Array.from(before['enc.0.conv1.weight']), 'lr 0 leaves weights');
  m.setOptimizer({ lr: 1e-2 });
  await m.trainStep(randomBatch(1, 1, 4, 4, 2, 1));
  t.not(m.getWeights()['enc.0.conv1.weight'][0], before['enc.0.conv1.weight'][0]);
  m.setLoss({ lambda: 0.2, lambdaWarmup: 0.3, warmupSteps: 5 });
  const r = await m.trainStep(randomBatch(1, 1, 4, 4, 2, 1));
  t.ok(Math.abs(r.traceWeight + 0.3) < 1e-7, 'warm-up sign while step < warmupSteps');
  t.throws(() => m.setOptimizer({ lr: 1, momentum: 0.9 } as never), /unknown option 'momentum' in optimizer/);
});

t.test('calls queue and the event loop stays free during a step', async (t) => {
  const m = createModel({ ndim: 3, inChannels: 2, classes: 2, annotators: 2, depth: 2, baseChannels: 8 });
  const n = 1, d = 16;
  const images = new Float32Array(n * 2 * d * d * d).fill(0.5);
  const labels = [new Uint8Array(d * d * d), new Uint8Array(d * d * d).fill(1)];
  let ticks = 0;
  const timer = setInterval(() => ticks++, 0);
  const results = await Promise.all([
    m.trainStep({ images, shape: [n, 2, d, d, d], labels }),
    m.trainStep({ images, shape: [n, 2, d, d, d], labels }),
    m.predict(images, [n, 2, d, d, d]),
  ]);
  clearInterval(timer);
  t.equal(results[0].step, 1);
  t.equal(results[1].step, 2);
  t.ok(ticks > 0, `timer ran ${ticks} times while the native work ran`);
});

t.test('invalid inputs reject with messages that name the problem', async (t) => {
  const m = createModel({ classes: 4, annotators: 2, depth: 3, baseChannels: 4 });
  const b = randomBatch(1, 1, 8, 8, 4, 2);
  await t.rejects(m.trainStep({ ...b, shape: [1, 1, 8, 6] }), /images has 64 elements, expected 48/);
  await t.rejects(m.trainStep({ images: new Float32Array(48), shape: [1, 1, 8, 6], labels: b.labels.map(() => new Uint8Array(48)) }), /width 6 is not divisible by 2\^\(depth-1\) = 4/);
  await t.rejects(m.trainStep({ ...b, shape: [1, 2, 8, 8] }), /shape\[1\] \(channels\) is 2 but the model has inChannels 1/);
  await t.rejects(m.trainStep({ ...b, shape: [1, 1, 8] }), /shape must have 4 entries/);
  const bad = b.labels[1].slice();
  bad[10] = 9;
  await t.rejects(m.trainStep({ ...b, labels: [b.labels[0], bad] }), /labels of annotator 1: label 9 at index 10 \(image 0\) is >= classes \(4\)/);
  const nan = b.images.slice();
  nan[3] = NaN;
  await t.rejects(m.trainStep({ ...b, images: nan }), /images contain NaN at index 3/);
  await t.rejects(m.trainStep({ ...b, labels: [b.labels[0]] }), /has 1 maps but the model has 2 annotators/);
  await t.rejects(m.trainStep({ ...b, labels: [b.labels[0], new Uint8Array(3)] }), /batch.labels\[1\] has 3 elements, expected 64/);
  await t.rejects(m.trainStep({ ...b, present: new Uint8Array(1) }), /batch.present has 1 elements, expected 2/);
  await t.rejects(m.trainStep({ ...b, extra: 1 } as never), /unknown option 'extra' in batch/);
  await t.rejects(m.trainStep({ ...b, images: new Float64Array(64) as never }), /images must be a Float32Array/);
  t.throws(() => createModel({ classes: 2, annotators: 1, colour: 'red' } as never), /unknown option 'colour' in model config/);
  t.throws(() => createModel({ classes: 1, annotators: 1 }), /classes must be in 2\.\.16/);
  t.throws(() => createModel({ classes: 2, annotators: 1, cmMode: 'diagonal' as never }), /unknown cmMode 'diagonal'/);
  t.throws(() => createModel({ classes: 2 } as never), /config.annotators is required/);
  t.throws(() => createModel({ classes: 2, annotators: 1, depth: 2.5 }), /config.depth must be an integer/);
  // The model still works after all of that.
  const ok = await m.trainStep(b);
  t.ok(Number.isFinite(ok.loss));
});

t.test('a 3D model in every CM mode trains and predicts', async (t) => {
  for (const cmMode of ['full', 'lowrank', 'global'] as const) {
    const m = new Model({ ndim: 3, inChannels: 4, classes: 4, annotators: 3, depth: 2, baseChannels: 4, cmMode, cmRank: 2 });
    const d = 8;
    const images = new Float32Array(4 * d * d * d).map((_, i) => Math.sin(i));
    const labels = new Uint8Array(3 * d * d * d).map((_, i) => i % 4);
    const r = await m.trainStep({ images, shape: [1, 4, d, d, d], labels });
    t.ok(Number.isFinite(r.loss), `${cmMode}: loss ${r.loss}`);
    const p = await m.predict(images, [1, 4, d, d, d], { cms: true });
    t.equal(p.cms!.length, 3 * 16 * d * d * d);
  }
});
