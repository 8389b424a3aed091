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
import { AnnotatedBatch, AnnotatedSet, InMemorySource, TrainingSource } from '../src/train/data';
import { createModel } from '../src/model/model';
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

t.test('every step runs at the scheduled learning rate: a hand replay of the batches matches', async (t) => {
  // A source that keeps a copy of every batch it hands the trainer (augmentation off, so
  // these are exactly what the model steps on).
  const inner = new InMemorySource(set, 3);
  const drawn: AnnotatedBatch[] = [];
  const recording: TrainingSource = {
    ndim: inner.ndim,
    channels: inner.channels,
    classes: inner.classes,
    annotatorNames: inner.annotatorNames,
    hasConsensus: inner.hasConsensus,
    batchesPerEpoch: (b) => inner.batchesPerEpoch(b),
    batch: (epoch, index, batchSize) => {
      const b = inner.batch(epoch, index, batchSize);
      drawn.push({ images: b.images.slice(), shape: [...b.shape], labels: b.labels.map((m) => m.slice()), present: b.present.slice() });
      return b;
    },
  };
  const [lr0, minLr, steps] = [3e-3, 2e-4, 7];
  const r = await train(path.join(dir, 'lr-replay'), config({ steps, schedule: { kind: 'cosine', lr: lr0, minLr }, augment: { flips: false, rotations: false } }), recording);
  t.equal(drawn.length, steps);
  // Cosine annealing written out here (not schedule.ts): step s of T runs at
  // minLr + (lr - minLr) * (1 + cos(pi s / T)) / 2.
  const cosine = (s: number) => minLr + ((lr0 - minLr) * (1 + Math.cos((Math.PI * s) / steps))) / 2;
  const relClose = (a: number, b: number) => Math.abs(a - b) <= 1e-6 * Math.abs(b);
  const lastLr = cosine(steps - 1);
  t.ok(relClose(r.model.optimizer.lr, lastLr), `the optimiser's rate after the run is the last step's ${lastLr.toExponential(4)} (got ${r.model.optimizer.lr})`);
  t.ok(lastLr < lr0 / 5, 'the last rate is far from the base rate, so a trainer that never set it would be caught');

  // The same model (same settings and seed) stepped by hand on the same batches.
  const replay = async (rate: (s: number) => number) => {
    const model = createModel({
      ndim: 2,
      inChannels: 1,
      classes: 2,
      annotators: 3,
      depth: 2,
      baseChannels: 4,
      cmMode: 'full',
      cmRank: 1,
      cmHeadBlocks: 0,
      cmInit: 'identity',
      device: 'cpu',
      seed: 3,
      optimizer: { kind: 'adam', lr: lr0, weightDecay: 0 },
      loss: { lambda: 0.01, lambdaWarmup: 0.01, warmupSteps: 2 },
    });
    for (let s = 0; s < drawn.length; s++) {
      model.setOptimizer({ lr: rate(s) });
      await model.trainStep(drawn[s]);
    }
    const weights = model.getWeights();
    await model.dispose();
    return weights;
  };
  const trained = r.model.getWeights();
  const scheduled = maxDifference(trained, await replay(cosine));
  t.ok(scheduled < 1e-6, `replayed with the cosine rates: the same weights (largest difference ${scheduled.toExponential(1)})`);
  // The check can tell: the same replay at the constant base rate ends elsewhere.
  const constant = maxDifference(trained, await replay(() => lr0));
  t.ok(constant > 1e-4, `replayed at the base rate throughout: different weights (largest difference ${constant.toExponential(1)})`);
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
    // The CM parameterisation of each method (README "Training" and "CMs", SPEC sections 3-4),
    // read back from the native model; the naive methods keep the default full heads unused.
    const expectedMode = ({ 'cm-global': 'global', 'cm-lowrank': 'lowrank' } as Record<string, string>)[method] ?? 'full';
    t.equal(r.model.config.cmMode, expectedMode, `${method}: CM mode ${expectedMode}`);
    t.equal(r.model.loss.lambda, method === 'cm-notrace' ? 0 : Math.fround(0.01), `${method}: trace weight (the run's lambda, held as float32)`);
  }
  t.same(
    Object.fromEntries(METHOD_NAMES.map((m) => [m, methodDefinition(m).target])),
    {
      cm: 'annotators',
      'cm-notrace': 'annotators',
      'cm-global': 'annotators',
      'cm-lowrank': 'annotators',
      'naive-mean': 'mean',
      'naive-mode': 'mode',
      'naive-staple': 'fused',
      'naive-spatial-staple': 'fused',
      oracle: 'consensus',
    },
    'what each method learns from',
  );
  // the targets: mode / mean fusion and the consensus
  const batch = { images: set.images.subarray(0, 256), shape: [1, 1, 16, 16], labels: set.labels.map((m) => m.subarray(0, 256)), present: set.present.subarray(0, 3), consensus: set.consensus!.subarray(0, 256) };
  t.equal(methodBatch(methodDefinition('oracle'), batch, 2).target, batch.consensus);
  const fused = new Uint8Array(256).fill(1);
  t.equal(methodBatch(methodDefinition('naive-staple'), { ...batch, fused }, 2).target, fused);
  t.throws(() => methodBatch(methodDefinition('naive-spatial-staple'), batch, 2), /spatial-staple labels, which were not prepared/);
  const cmBatch = methodBatch(methodDefinition('cm'), batch, 2);
  t.equal(cmBatch.labels, batch.labels, 'the CM methods learn from every annotator map as given');
  t.equal(cmBatch.present, batch.present);
  t.throws(() => methodDefinition('staple'), /unknown method "staple"; choose one of .*naive-staple/);
});

t.test('naive-mode and naive-mean targets by hand: ties, absent annotators, unlabelled pixels', async (t) => {
  // 2 images of 2x2 pixels, 3 classes, 4 annotators; annotator 3 did not label image 1, so
  // its labels there (chosen to change the vote if counted) must be ignored.
  const U = 255;
  const labels = [
    // image 0: p0 p1 p2 p3 | image 1: p0 p1 p2 p3
    Uint8Array.from([0, 2, U, 1, 0, 1, U, 0]),
    Uint8Array.from([0, 1, U, 2, 2, 0, U, 0]),
    Uint8Array.from([1, 2, U, 1, 2, U, U, 0]),
    Uint8Array.from([1, U, U, 2, 0, 1, 1, 2]),
  ];
  const present = Uint8Array.from([1, 1, 1, 1, 1, 1, 1, 0]);
  const batch = { images: new Float32Array(8), shape: [2, 1, 2, 2], labels, present };
  // Votes per pixel (class 0, 1, 2):
  //   image 0: p0 2-2-0 tie -> 0; p1 0-1-2 -> 2; p2 nobody -> 255; p3 0-2-2 tie -> 1
  //   image 1: p0 1-0-2 -> 2; p1 1-1-0 tie -> 0; p2 nobody present -> 255; p3 3-0-0 -> 0
  // Ties go to the lowest class (as scipy.stats.mode).
  t.same([...methodBatch(methodDefinition('naive-mode'), batch, 3).target!], [0, 2, U, 1, 2, 0, U, 0], 'naive-mode: the majority, ties to the lowest class');
  // Soft target [N, L, H, W]: each class's share of the annotators who voted; zeros where nobody did.
  const expected = [
    [0.5, 0, 0, 0], [0.5, 1 / 3, 0, 0.5], [0, 2 / 3, 0, 0.5], // image 0, classes 0, 1, 2
    [1 / 3, 0.5, 0, 1], [0, 0.5, 0, 0], [2 / 3, 0, 0, 0], // image 1
  ].flat();
  const soft = methodBatch(methodDefinition('naive-mean'), batch, 3).softTarget!;
  t.equal(soft.length, expected.length);
  t.ok(
    expected.every((x, i) => Math.abs(soft[i] - x) < 1e-6),
    `naive-mean: the vote fractions ${JSON.stringify([...soft].map((x) => +x.toFixed(4)))}`,
  );
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
