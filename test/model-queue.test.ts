// The order of calls on one model: queued calls run in order; the synchronous state
// calls refuse to run ahead of queued work; saveCheckpoint sees the state the calls
// queued before it left; dispose() frees the model after its queue. Also the loss
// defaults a user reads in config.ts (the warm-up weight follows lambda).
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import t from 'tap';
import { createModel, loadCheckpoint, readCheckpoint, saveCheckpoint } from '../src/index';

function batch(seed: number) {
  let s = seed >>> 0;
  const rand = () => ((s = (s * 1664525 + 1013904223) >>> 0) / 4294967296);
  const images = new Float32Array(2 * 8 * 8).map(() => rand() * 2 - 1);
  const labels = [0, 1].map(() => new Uint8Array(2 * 8 * 8).map(() => (rand() < 0.5 ? 0 : 1)));
  return { images, shape: [2, 1, 8, 8], labels };
}

const small = () => createModel({ classes: 2, annotators: 2, depth: 2, baseChannels: 4, seed: 3, optimizer: { lr: 0.05 } });

t.test('a state call made while a step is queued is refused, by name', async (t) => {
  const m = small();
  const step = m.trainStep(batch(1));
  t.throws(() => m.setOptimizer({ lr: 0.5 }), /setOptimizer: the model has 1 queued call/);
  t.throws(() => m.getWeights(), /getWeights: the model has 1 queued call/);
  t.throws(() => m.setLoss({ lambda: 1 }), /setLoss/);
  await step;
  // The refused call changed nothing: the step ran with lr 0.05, and the setting is still 0.05.
  t.ok(Math.abs(m.optimizer.lr - 0.05) < 1e-7);
  m.setOptimizer({ lr: 0.5 });
  t.ok(Math.abs(m.optimizer.lr - 0.5) < 1e-7, 'accepted once the queue has settled');
  const twoQueued = [m.trainStep(batch(2)), m.predict(batch(2).images, [2, 1, 8, 8])];
  t.throws(() => m.getGradients(), /2 queued call\(s\)/);
  await Promise.all(twoQueued);
  await m.idle();
  t.equal(m.getWeights()['seg.weight'].length, 4 * 2, 'state calls run again after idle()');
});

t.test('saveCheckpoint snapshots the model after the calls queued before it', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cmseg-queue-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const m = small();
  const before = m.getWeights()['enc.0.conv1.weight'].slice();
  const step = m.trainStep(batch(4)); // not awaited
  const file = path.join(dir, 'after-step.safetensors');
  await saveCheckpoint(m, file, { note: 'queued' });
  await step;
  const saved = await readCheckpoint(file);
  t.equal(saved.step, 1, 'the step queued before the save is in the file');
  t.same(Array.from(saved.weights['enc.0.conv1.weight']), Array.from(m.getWeights()['enc.0.conv1.weight']));
  t.notSame(Array.from(saved.weights['enc.0.conv1.weight']), Array.from(before), 'and it changed the weights');
  t.same(saved.extra, { note: 'queued' });
});

t.test('saveCheckpoint names bad arguments before writing anything', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cmseg-queue-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const file = path.join(dir, 'x.safetensors');
  await t.rejects(saveCheckpoint(null as never, file), /saveCheckpoint: expected a Model, got null/);
  await t.rejects(saveCheckpoint(small(), file, { big: 10n }), /extra cannot be stored as JSON .*BigInt/);
  t.notOk(fs.existsSync(file), 'no file written');
});

t.test('loadCheckpoint with an override that changes the network names the file and the override', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cmseg-queue-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const file = path.join(dir, 'c.safetensors');
  await saveCheckpoint(small(), file);
  const err = await loadCheckpoint(file, { classes: 4 }).then(() => undefined, (e: Error) => e);
  t.ok(err, 'rejected');
  t.ok(err!.message.startsWith(`${file}: `), err!.message);
  t.match(err!.message, /the overrides classes change the network/);
});

t.test('the warm-up trace weight follows lambda unless given', async (t) => {
  const m = createModel({ classes: 2, annotators: 2, depth: 2, baseChannels: 4, loss: { lambda: 0.5, warmupSteps: 1 } });
  t.ok(Math.abs(m.loss.lambdaWarmup - 0.5) < 1e-7, 'lambdaWarmup defaults to lambda');
  const r1 = await m.trainStep(batch(5));
  t.ok(Math.abs(r1.traceWeight + 0.5) < 1e-7, `warm-up step weight ${r1.traceWeight} = -lambda`);
  const r2 = await m.trainStep(batch(6));
  t.ok(Math.abs(r2.traceWeight - 0.5) < 1e-7, 'then +lambda');
  const given = createModel({ classes: 2, annotators: 2, depth: 2, baseChannels: 4, loss: { lambda: 0.5, lambdaWarmup: 0.1 } });
  t.ok(Math.abs(given.loss.lambdaWarmup - 0.1) < 1e-7, 'an explicit lambdaWarmup is kept');
});

t.test('dispose frees the model after its queue; later calls say so', async (t) => {
  const m = small();
  const step = m.trainStep(batch(7));
  const disposed = m.dispose();
  const r = await step;
  t.equal(r.step, 1, 'the step queued before dispose ran');
  await disposed;
  t.ok(m.isDisposed);
  await t.rejects(m.trainStep(batch(8)), /this model was disposed/);
  await t.rejects(m.predict(batch(8).images, [2, 1, 8, 8]), /this model was disposed/);
  t.throws(() => m.getWeights(), /this model was disposed/);
  t.throws(() => m.setOptimizer({ lr: 1 }), /this model was disposed/);
  await m.dispose(); // a second dispose is a no-op
  t.pass('second dispose resolved');
});

t.test('dispose waits for a save queued before it; errors after it carry CMSEG_DISPOSED', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cmseg-queue-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const m = small();
  const file = path.join(dir, 'before-dispose.safetensors');
  const saved = saveCheckpoint(m, file);
  const disposed = m.dispose();
  await saved;
  await disposed;
  t.equal((await readCheckpoint(file)).step, 0, 'the save queued before dispose wrote its file');
  const sync = (() => {
    try {
      m.getWeights();
    } catch (e) {
      return e as Error & { code?: string };
    }
  })();
  t.equal(sync?.code, 'CMSEG_DISPOSED', sync?.message);
  const async_ = await m.trainStep(batch(9)).then(() => undefined, (e: Error & { code?: string }) => e);
  t.equal(async_?.code, 'CMSEG_DISPOSED', async_?.message);
});

t.test('afterQueued takes synchronous functions only', async (t) => {
  const m = small();
  await t.rejects(m.afterQueued(async () => m.getWeights()), /afterQueued takes a synchronous function/);
  const w = await m.afterQueued(() => m.getWeights());
  t.ok(w['seg.weight'] instanceof Float32Array, 'a synchronous one runs in its turn');
});

t.test('a CPU model takes its inputs when the call is made: refilled or transferred at once, the call sees what was given', async (t) => {
  const given = batch(7);
  const m = small();
  const expected = await m.predict(given.images.slice(), given.shape);
  // An idle model: the native call still starts a microtask later, after the caller's code.
  const refilled = given.images.slice();
  const pending = m.predict(refilled, given.shape);
  refilled.fill(0);
  t.same(Array.from((await pending).probs), Array.from(expected.probs), 'predict: the images as given, not the refilled buffer');
  const moved = given.images.slice();
  const transferred = m.predict(moved, given.shape);
  structuredClone(moved.buffer, { transfer: [moved.buffer] });
  t.equal(moved.length, 0, 'the buffer was transferred away');
  t.same(Array.from((await transferred).probs), Array.from(expected.probs), 'predict: a transferred buffer is no error');

  // Two models alike: one steps on a batch changed right after the call, one on the batch as given.
  const [a, b] = [small(), small()];
  const changed = batch(7);
  const step = a.trainStep(changed);
  changed.images.fill(0);
  changed.labels.forEach((map) => map.fill(1));
  const [stepped, reference] = [await step, await b.trainStep(batch(7))];
  t.equal(stepped.loss, reference.loss, 'trainStep: the loss of the batch as given');
  t.same(a.getWeights(), b.getWeights(), 'and the same update');
});

t.test('a caller mistake found on the worker thread has the code of one found when the call is made', async (t) => {
  const m = small();
  const bad = batch(1);
  bad.images[5] = NaN;
  await t.rejects(m.trainStep(bad), { code: 'CMSEG_INVALID_ARGUMENT', message: /NaN|non-finite/i });
  const labels = batch(1);
  labels.labels[0][3] = 7;
  await t.rejects(m.trainStep(labels), { code: 'CMSEG_INVALID_ARGUMENT', message: /label/ });
});
