// The trainer: learning-rate schedules by hand, augmentation that moves images and labels
// alike, exact resume after an interruption, checkpoints and the JSON log, best-by-
// validation, and every method for a few steps. Tiny models on a synthetic set.
import t, { Test } from 'tap';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { Rng } from '../src/data/random';
import { readCheckpoint } from '../src/model/checkpoint';
import { augmentBatch, drawTransform, sourceIndices } from '../src/train/augment';
import { AnnotatedSet, InMemorySource } from '../src/train/data';
import { PatchStream, PatchStreamSource } from '../src/train/patch-source';
import { METHOD_NAMES, methodBatch, methodDefinition } from '../src/train/methods';
import { fuseTrainingSet } from '../src/train/experiment';
import { ProgressReporter } from '../src/train/progress';
import { learningRate } from '../src/train/schedule';
import { readTrainerState, readTrainLog, train, TRAIN_DEFAULTS, TrainConfig, TrainingError } from '../src/train/trainer';

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cmseg-train-'));
t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));

const close = (a: number, b: number) => Math.abs(a - b) < 1e-12;

t.test('learning-rate schedules by hand', async (t) => {
  t.equal(learningRate({ kind: 'constant', lr: 0.1 }, 7, 10), 0.1);
  const step = { kind: 'step' as const, lr: 1, gamma: 0.5, stepSize: 2 };
  t.same([0, 1, 2, 3, 4].map((s) => learningRate(step, s, 10)), [1, 1, 0.5, 0.5, 0.25]);
  // default step size: a third of the run
  t.same([0, 3, 4, 8].map((s) => learningRate({ kind: 'step', lr: 1 }, s, 12)).map((x) => +x.toFixed(12)), [1, 1, 0.1, 0.01]);
  const cosine = { kind: 'cosine' as const, lr: 1, minLr: 0.2 };
  t.ok(close(learningRate(cosine, 0, 4), 1));
  t.ok(close(learningRate(cosine, 2, 4), 0.6));
  t.ok(close(learningRate(cosine, 4, 4), 0.2));
  t.ok(close(learningRate(cosine, 1, 4), 0.2 + 0.8 * 0.5 * (1 + Math.SQRT1_2)));
  t.ok(close(learningRate({ kind: 'poly', lr: 1, power: 1 }, 1, 4), 0.75));
  t.ok(close(learningRate({ kind: 'poly', lr: 2, power: 2 }, 2, 4), 0.5));
  t.ok(close(learningRate({ kind: 'poly', lr: 1 }, 3, 4), 0.25 ** 0.9));
});

t.test('quarter turns and flips match numpy.rot90 / flip', async (t) => {
  // in = [[0,1,2],[3,4,5],[6,7,8]]; numpy.rot90(in) = [[2,5,8],[1,4,7],[0,3,6]]
  t.same([...sourceIndices([3, 3], { flips: [false, false], quarterTurns: 1 })], [2, 5, 8, 1, 4, 7, 0, 3, 6]);
  t.same([...sourceIndices([3, 3], { flips: [false, false], quarterTurns: 2 })], [8, 7, 6, 5, 4, 3, 2, 1, 0]);
  // flip along W (numpy.flip(in, 1)) of a 2x3 image
  t.same([...sourceIndices([2, 3], { flips: [false, true], quarterTurns: 0 })], [2, 1, 0, 5, 4, 3]);
  t.same([...sourceIndices([2, 3], { flips: [true, false], quarterTurns: 0 })], [3, 4, 5, 0, 1, 2]);
  // 3D: flip along D of a 2x1x2 volume
  t.same([...sourceIndices([2, 1, 2], { flips: [true, false, false], quarterTurns: 0 })], [2, 3, 0, 1]);
  t.throws(() => sourceIndices([2, 3], { flips: [false, false], quarterTurns: 1 }), /square/);
  // non-square images are only turned by 0 or 180 degrees; 3D volumes never
  const rng = new Rng(1);
  for (let i = 0; i < 50; i++) t.equal(drawTransform([4, 6], { flips: true, rotations: true }, rng).quarterTurns % 2, 0);
  for (let i = 0; i < 10; i++) t.equal(drawTransform([2, 4, 4], { flips: true, rotations: true }, rng).quarterTurns, 0);
});

t.test('augmentation moves image channels, every label map and the consensus alike', async (t) => {
  const [N, C, H, W, R] = [6, 2, 8, 8, 3];
  const V = H * W;
  const rng = new Rng(5);
  const images = new Float32Array(N * C * V);
  const labels = Array.from({ length: R }, () => new Uint8Array(N * V));
  const consensus = new Uint8Array(N * V);
  // Every pixel is unique: channel 0 encodes the position, channel 1 its negative, and the
  // label maps are functions of the position too, so a mismatch cannot hide.
  for (let n = 0; n < N; n++)
    for (let v = 0; v < V; v++) {
      images[(n * C + 0) * V + v] = v;
      images[(n * C + 1) * V + v] = -v;
      for (let r = 0; r < R; r++) labels[r][n * V + v] = (v * (r + 1)) % 5;
      consensus[n * V + v] = v % 7;
    }
  const present = Uint8Array.from({ length: N * R }, () => rng.int(2));
  const batch = { images, shape: [N, C, H, W], labels, present, consensus };
  const out = augmentBatch(batch, { flips: true, rotations: true }, new Rng(9));
  let moved = 0;
  for (let n = 0; n < N; n++)
    for (let v = 0; v < V; v++) {
      const from = out.images[(n * C + 0) * V + v];
      t.equal(out.images[(n * C + 1) * V + v], -from);
      for (let r = 0; r < R; r++) if (out.labels[r][n * V + v] !== (from * (r + 1)) % 5) t.fail(`annotator ${r} pixel ${v} of image ${n} moved differently`);
      if (out.consensus![n * V + v] !== from % 7) t.fail(`consensus pixel ${v} of image ${n} moved differently`);
      if (from !== v) moved++;
    }
  t.ok(moved > 0, 'some images were transformed');
  t.equal(out.present, present, 'presence is per image and does not move');
  t.same([...images.subarray(0, 3)], [0, 1, 2], 'the input batch is left as it was');
  // same stream, same transforms
  t.same(augmentBatch(batch, { flips: true, rotations: true }, new Rng(9)).images, out.images);
});

/** A small synthetic set: bright squares, annotators that dilate / shrink / copy them. */
function syntheticSet(count = 12, size = 16): AnnotatedSet {
  const rng = new Rng(42);
  const V = size * size;
  const images = new Float32Array(count * V);
  const consensus = new Uint8Array(count * V);
  const labels = [0, 1, 2].map(() => new Uint8Array(count * V));
  for (let n = 0; n < count; n++) {
    const y0 = 2 + rng.int(6);
    const x0 = 2 + rng.int(6);
    const s = 4 + rng.int(4);
    for (let y = 0; y < size; y++)
      for (let x = 0; x < size; x++) {
        const i = n * V + y * size + x;
        const inside = (m: number) => y >= y0 - m && y < y0 + s + m && x >= x0 - m && x < x0 + s + m;
        consensus[i] = inside(0) ? 1 : 0;
        images[i] = consensus[i] + 0.3 * rng.normal();
        labels[0][i] = consensus[i];
        labels[1][i] = inside(1) ? 1 : 0;
        labels[2][i] = inside(-1) ? 1 : 0;
      }
  }
  const present = new Uint8Array(count * 3).fill(1);
  present[1] = 0; // annotator 1 skipped image 0
  labels[1].fill(255, 0, V);
  return { count, channels: 1, classes: 2, spatial: [size, size], images, labels, present, consensus, annotatorNames: ['good', 'over', 'under'] };
}

const set = syntheticSet();

function config(overrides: Partial<TrainConfig> = {}): TrainConfig {
  return {
    ...TRAIN_DEFAULTS,
    method: 'cm',
    depth: 2,
    baseChannels: 4,
    batchSize: 4, // 3 batches per epoch
    steps: 7,
    schedule: { kind: 'cosine', lr: 3e-3 },
    warmupSteps: 2,
    augment: { flips: true, rotations: true },
    seed: 3,
    ...overrides,
  };
}

const stepLosses = (file: string) =>
  readTrainLog(file)
    .filter((e) => e.event === 'step')
    .map((e) => [e.step as number, e.loss as number, e.lr as number, e.traceWeight as number]);

// The native CM loss sums per-thread partials whose chunk-to-thread assignment varies
// between runs, so the reported loss can differ in its last bits (about 1e-10 relative);
// everything else must match exactly.
function sameSteps(t: Test, actual: number[][], expected: number[][], message: string): void {
  t.same(actual.map(([step, , lr, tw]) => [step, lr, tw]), expected.map(([step, , lr, tw]) => [step, lr, tw]), `${message}: steps, rates, trace weights`);
  const worst = Math.max(...actual.map((row, i) => Math.abs(row[1] - expected[i][1]) / Math.abs(expected[i][1])));
  t.ok(actual.length === expected.length && worst < 1e-6, `${message}: losses (largest relative difference ${worst.toExponential(1)})`);
}

function maxDifference(a: Record<string, Float32Array>, b: Record<string, Float32Array>): number {
  let worst = 0;
  for (const [name, w] of Object.entries(a)) for (let i = 0; i < w.length; i++) worst = Math.max(worst, Math.abs(w[i] - b[name][i]));
  return worst;
}

/** Aborts the run after `step` steps, as SIGINT does in the CLI. */
function abortAfter(step: number, controller: AbortController): ProgressReporter {
  return { start() {}, step: (s) => void (s === step && controller.abort()), epoch() {}, stop() {} };
}

t.test('a run interrupted and resumed takes the same steps as one that was not', async (t) => {
  const scores = [0.3, 0.8, 0.5];
  let calls = 0;
  const validate = async () => ({ score: scores[calls++ % 3], metrics: { x: 1 } });
  const full = path.join(dir, 'full');
  const a = await train(full, config(), new InMemorySource(set, 3), { validate });
  t.equal(a.status, 'completed');
  t.equal(a.state.step, 7);
  const expected = stepLosses(path.join(full, 'train-log.jsonl'));
  t.equal(expected.length, 7);

  for (const stopAt of [2, 3, 4]) {
    calls = 0;
    const out = path.join(dir, `resumed-${stopAt}`);
    const controller = new AbortController();
    const b = await train(out, config(), new InMemorySource(set, 3), { validate, signal: controller.signal, progress: abortAfter(stopAt, controller) });
    t.equal(b.status, 'interrupted');
    t.equal(b.state.step, stopAt);
    t.equal((await readTrainerState(b.files.last)).state.step, stopAt, 'last checkpoint saved at the interruption');
    // a line written after the checkpoint (as if the process died later) is dropped on resume
    fs.appendFileSync(b.files.log, JSON.stringify({ event: 'step', step: 99, loss: -1 }) + '\n');
    const c = await train(out, config(), new InMemorySource(set, 3), { validate, resume: true });
    t.equal(c.status, 'completed');
    t.equal(c.startStep, stopAt);
    sameSteps(t, stepLosses(b.files.log), expected, `stopped after step ${stopAt}`);
    const wa = (await readCheckpoint(a.files.last)).weights;
    const wc = (await readCheckpoint(c.files.last)).weights;
    t.ok(maxDifference(wc, wa) < 1e-6, `stopped after step ${stopAt}: the same final weights`);
    t.same(c.state.best, a.state.best, 'the same best epoch');
  }
});

t.test('checkpoints, trainer state and the JSON log', async (t) => {
  const out = path.join(dir, 'files');
  const scores = [0.4, 0.9, 0.6];
  let calls = 0;
  const r = await train(out, config({ steps: undefined, epochs: 3 }), new InMemorySource(set, 3), {
    validate: async () => ({ score: scores[calls++], metrics: { cmError: 0.1 } }),
    run: { preset: 'test' },
  });
  for (const f of ['last.safetensors', 'best.safetensors', 'train-log.jsonl']) t.ok(fs.existsSync(path.join(out, f)), `${f} exists`);
  t.notOk(fs.readdirSync(out).some((f) => f.endsWith('.tmp')), 'no temp files left');
  const best = await readTrainerState(r.files.best!);
  t.same(best.state.best, { score: 0.9, epoch: 1, step: 6 }, 'best = the epoch with the highest validation score');
  const last = await readTrainerState(r.files.last);
  t.equal(last.state.step, 9);
  t.equal(last.state.epoch, 3);
  t.equal(last.rng.seed, 3);
  t.same(last.run, { preset: 'test' });
  t.same(last.annotatorNames, ['good', 'over', 'under']);
  t.equal(last.schedule.kind, 'cosine');
  t.equal((await readCheckpoint(r.files.last)).step, 9, 'the optimiser step count is in the checkpoint');
  const events = readTrainLog(r.files.log).map((e) => e.event);
  t.equal(events[0], 'start');
  t.equal(events.filter((e) => e === 'step').length, 9);
  t.equal(events.filter((e) => e === 'validation').length, 3);
  t.equal(events.at(-1), 'end');
  const validation = readTrainLog(r.files.log).find((e) => e.event === 'validation')!;
  t.equal(validation.cmError, 0.1);
});

t.test('every method trains a few steps', async (t) => {
  for (const method of METHOD_NAMES) {
    const out = path.join(dir, `method-${method}`);
    const def0 = methodDefinition(method);
    // The STAPLE methods train on a map fused once for the whole set.
    const source = def0.target === 'fused' ? { ...set, fused: await fuseTrainingSet(set, def0.fusion!) } : set;
    const r = await train(out, config({ method, steps: 2, augment: { flips: false, rotations: false } }), new InMemorySource(source, 1));
    const steps = readTrainLog(r.files.log).filter((e) => e.event === 'step');
    t.equal(steps.length, 2, method);
    t.ok(steps.every((s) => Number.isFinite(s.loss as number)), `${method}: finite losses`);
    const def = methodDefinition(method);
    t.equal(r.model.config.cmMode, def.cmMode, `${method}: CM mode ${def.cmMode}`);
    if (method === 'cm-notrace') t.equal(r.model.loss.lambda, 0, 'cm-notrace has no trace term');
  }
  // the targets: mode / mean fusion and the consensus
  const batch = { images: set.images.subarray(0, 256), shape: [1, 1, 16, 16], labels: set.labels.map((m) => m.subarray(0, 256)), present: set.present.subarray(0, 3), consensus: set.consensus!.subarray(0, 256) };
  t.equal(methodBatch(methodDefinition('oracle'), batch, 2).target, batch.consensus);
  t.equal(methodBatch(methodDefinition('naive-mean'), batch, 2).softTarget!.length, 512);
  t.ok(methodBatch(methodDefinition('naive-mode'), batch, 2).target instanceof Uint8Array);
  t.throws(() => methodDefinition('staple'), /unknown method "staple"; choose one of .*naive-staple/);
});

t.test('settings and folders the trainer refuses', async (t) => {
  const out = path.join(dir, 'refuse');
  await train(out, config({ steps: 1 }), new InMemorySource(set, 1));
  await t.rejects(train(out, config({ steps: 1 }), new InMemorySource(set, 1)), /already holds a run/);
  await t.rejects(train(out, config({ steps: 1, lambda: 0.5 }), new InMemorySource(set, 1), { resume: true }), /different settings: lambda: 0.01 in the checkpoint, 0.5 now/);
  await t.rejects(train(path.join(dir, 'none'), config(), new InMemorySource(set, 1), { resume: true }), /nothing to resume/);
  await t.rejects(train(out, config({ epochs: 2 }), new InMemorySource(set, 1)), TrainingError);
  await t.rejects(train(path.join(dir, 'lr'), config({ schedule: { kind: 'constant', lr: -1 } }), new InMemorySource(set, 1)), /learning rate -1/);
});

t.test('a patch stream plugs in as a training source and reopens where a resumed run stands', async (t) => {
  const opened: number[] = [];
  const stream = (first: number): PatchStream => {
    let index = first;
    opened.push(first);
    return {
      names: ['a', 'b'],
      channels: 1,
      classes: 2,
      settings: { batchSize: 2 },
      next: async () => {
        const i = index++;
        const V = 8 * 8 * 8;
        return {
          index: i,
          images: new Float32Array(2 * V).fill(i),
          shape: [2, 1, 8, 8, 8],
          labels: [new Uint8Array(2 * V), new Uint8Array(2 * V).fill(1)],
          present: Uint8Array.from([1, 1, 1, 0]),
          consensus: new Uint8Array(2 * V),
          samples: [],
        };
      },
      close: async () => {},
    };
  };
  const source = new PatchStreamSource(async (first) => stream(first), stream(0), 5);
  t.equal(source.ndim, 3);
  t.same(source.annotatorNames, ['a', 'b']);
  t.equal((await source.batch(0, 0, 2)).images[0], 0);
  t.equal((await source.batch(0, 1, 2)).images[0], 1);
  t.equal((await source.batch(2, 3, 2)).images[0], 13, 'epoch 2, batch 3 = stream batch 13');
  t.same(opened, [0, 13], 'reopened at the wanted batch');
  await t.rejects(source.batch(2, 4, 3), /batches of 2, the trainer asks for 3/);
  // the trainer runs on it (3D, augmentation off)
  const out = path.join(dir, 'patches');
  const r = await train(out, config({ steps: 3, batchSize: 2, augment: { flips: false, rotations: false } }), new PatchStreamSource(async (first) => stream(first), stream(0), 2));
  t.equal(r.state.step, 3);
  t.equal(r.model.config.ndim, 3);
});
