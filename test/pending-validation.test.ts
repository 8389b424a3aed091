// `last` is saved before each validation, saying it is still to do (TrainerState.pendingValidation):
// a SIGKILL during a validation (a scheduler's after its grace period; a BraTS validation takes
// minutes and a SIGTERM stops it only after the case in progress) resumes at the epoch's end and
// validates first, instead of losing the epoch. Checked against the truth of the run never stopped:
// the same log entries, the same weights and trainer state.
import t, { type Test } from 'tap';
import { spawn } from 'child_process';
import * as fs from 'fs';
import * as path from 'path';
import type { ProgressFields, ProgressReporter } from '../src/train/progress';
import { readTrainerState, readTrainLog, train, TRAIN_DEFAULTS, type TrainConfig, type Validator } from '../src/train/trainer';
import { readCheckpoint } from '../src/model/checkpoint';
import { firstDifference, tempDir } from './helpers/files';
import { runCli } from './helpers/cli';
import { TINY_IMAGES, TINY_PIXELS, tinySource } from './helpers/tiny-source';

// The run (written out again in the child's script below): four 4x4 images, two annotators,
// batches of 2, 3 epochs of 2 steps; a validation after each epoch whose score is the model's
// mean probability of class 1 (so `best` depends on the weights).
const N = TINY_IMAGES, V = TINY_PIXELS;
const source = tinySource;
const config: TrainConfig = { ...TRAIN_DEFAULTS, method: 'cm', epochs: 3, batchSize: 2, depth: 2, baseChannels: 4 };
const validator: Validator = async (model, progress) => {
  progress(0, 2, 'c0');
  const images = Float32Array.from({ length: N * V }, (_, i) => Math.sin(i));
  const { probs } = await model.predict(images, [N, 1, 4, 4]);
  let sum = 0;
  for (let n = 0; n < N; n++) for (let v = 0; v < V; v++) sum += probs[n * 2 * V + V + v];
  progress(1, 2, 'c1');
  progress(2, 2);
  return { score: sum / (N * V), metrics: {} };
};

// argv: the validation (1, 2, ...) and where in it the child dies: 'in' (the parent's SIGKILL
// during its cases) or 'after-best' (SIGKILL of itself once its save of best.safetensors is done,
// before the save of `last` that clears the mark).
const childScript = (dir: string) => `
const checkpoint = require(${JSON.stringify(path.resolve(__dirname, '../src/model/checkpoint'))});
const save = checkpoint.saveCheckpoint;
checkpoint.saveCheckpoint = async (model: unknown, file: string, extra: unknown) => {
  await save(model, file, extra);
  if (where === 'after-best' && validations === killIn && file.endsWith('best.safetensors')) process.kill(process.pid, 'SIGKILL');
};
import { InMemorySource } from ${JSON.stringify(path.resolve(__dirname, '../src/train/data'))};
import { train, TRAIN_DEFAULTS } from ${JSON.stringify(path.resolve(__dirname, '../src/train/trainer'))};
const N = 4, V = 16;
const source = new InMemorySource({
  count: N, channels: 1, classes: 2, spatial: [4, 4],
  images: Float32Array.from({ length: N * V }, (_, i) => Math.sin(i)),
  labels: [0, 1].map((r) => Uint8Array.from({ length: N * V }, (_, i) => (i + r) % 2)),
  present: new Uint8Array(N * 2).fill(1),
  annotatorNames: ['a', 'b'],
}, 0);
const killIn = Number(process.argv[2]);
const where = process.argv[3];
let validations = 0;
train(${JSON.stringify(path.join(dir, 'killed'))}, { ...TRAIN_DEFAULTS, method: 'cm', epochs: 3, batchSize: 2, depth: 2, baseChannels: 4 }, source, {
  validate: async (_model, progress) => {
    progress(0, 2, 'c0');
    if (++validations === killIn && where === 'in') {
      // In the validation: the parent kills the process now; it waits (the timer keeps it alive).
      setInterval(() => {}, 1000);
      process.stdout.write('VALIDATING\\n');
      await new Promise(() => {});
    }
    // The test's validator: the model's mean probability of class 1.
    const { probs } = await _model.predict(Float32Array.from({ length: N * V }, (_, i) => Math.sin(i)), [N, 1, 4, 4]);
    let sum = 0;
    for (let n = 0; n < N; n++) for (let v = 0; v < V; v++) sum += probs[n * 2 * V + V + v];
    progress(1, 2, 'c1');
    progress(2, 2);
    return { score: sum / (N * V), metrics: {} };
  },
}).then(() => process.stdout.write('NOT KILLED\\n'));
`;

/** The log without what differs between two runs of the same steps: times, paths and a resume's own entry. */
const comparable = (file: string) =>
  readTrainLog(file)
    .filter((e) => e.event !== 'resume')
    .map(({ time: _t, stepMs: _m, trainSeconds: _s, file: _f, runtime: _r, ...rest }) => rest);

/** Every tensor of two checkpoints bitwise equal (weights and Adam moments). */
async function sameTensors(t: Test, a: string, b: string, what: string) {
  const [x, y] = await Promise.all([readCheckpoint(a), readCheckpoint(b)]);
  t.same(Object.keys(x.weights).sort(), Object.keys(y.weights).sort(), `${what}: the same tensors`);
  const differ = Object.keys(x.weights).filter((k) => firstDifference(x.weights[k], y.weights[k]) !== -1);
  const m = (c: typeof x) => ({ ...c.moments?.m, ...Object.fromEntries(Object.entries(c.moments?.v ?? {}).map(([k, v]) => [`v.${k}`, v])) });
  const [mx, my] = [m(x), m(y)];
  const momentsDiffer = Object.keys(mx).filter((k) => !my[k] || firstDifference(mx[k], my[k]) !== -1);
  t.same([differ, momentsDiffer, x.step], [[], [], y.step], `${what}: the same weights, moments and step`);
}

/** The epoch lines a run's reporter is given: the epoch and its means (the seconds are timings). */
function epochRecorder(): { reporter: ProgressReporter; lines: string[] } {
  const lines: string[] = [];
  const show = (f: ProgressFields) => `epoch ${f.epoch + 1}/${f.epochs} loss ${f.loss} CE ${f.ce} trace ${f.trace} val ${f.valDice}`;
  return {
    lines,
    reporter: {
      start: () => {},
      step: () => {},
      validation: () => {},
      epoch: (step, f) => void lines.push(`${step}: ${show(f)}`),
      stop: () => {},
    },
  };
}

/** The run killed by SIGKILL in its `validation`-th validation (`where`: see childScript), in `dir`/killed. */
async function killedRun(t: Test, dir: string, validation: number, where: 'in' | 'after-best'): Promise<void> {
  const script = path.join(dir, 'child.ts');
  fs.writeFileSync(script, childScript(dir));
  const child = spawn(process.execPath, [...process.execArgv.filter((a) => !a.startsWith('--inspect')), script, String(validation), where], {
    env: { ...process.env, TS_NODE_TRANSPILE_ONLY: '1', CMSEG_NUM_THREADS: '1' },
  });
  let stdout = '';
  let stderr = '';
  child.stderr.on('data', (b) => (stderr += b));
  child.stdout.on('data', (b) => {
    stdout += b;
    if (stdout.includes('VALIDATING')) child.kill('SIGKILL');
  });
  const [, signal] = await new Promise<[number | null, string | null]>((resolve) => child.on('close', (code, sig) => resolve([code, sig])));
  t.equal(signal, 'SIGKILL', `killed in the validation: ${stdout} ${stderr}`);
}

/** A resume of `out` to its end is the run never stopped (`whole`): log entry for entry, state, weights, epoch lines. */
async function resumedIsWhole(t: Test, out: string, whole: string, wholeLines: string[], startStep: number) {
  const resumed = epochRecorder();
  const r1 = await train(out, config, source(), { validate: validator, progress: resumed.reporter, resume: true });
  await r1.model.dispose();
  t.same([r1.status, r1.startStep, r1.validatedPending], ['completed', startStep, true]);
  // The epoch line after the resumed validation is the one the run never stopped printed (was:
  // loss, CE and trace "-", 0.0 s), and so are the later epochs'.
  t.same(resumed.lines, wholeLines.slice(startStep / 2 - 1));
  // The same log, entry for entry (no validation or save of `best` twice, no entry lost), and the same models.
  t.same(comparable(path.join(out, 'train-log.jsonl')), comparable(path.join(whole, 'train-log.jsonl')));
  const [a, b] = await Promise.all([out, whole].map(async (d) => (await readTrainerState(path.join(d, 'last.safetensors'))).state));
  t.same(a, b, 'the trainer state of `last`: the same best and last validation, nothing pending');
  await sameTensors(t, path.join(out, 'last.safetensors'), path.join(whole, 'last.safetensors'), 'last');
  await sameTensors(t, path.join(out, 'best.safetensors'), path.join(whole, 'best.safetensors'), 'best');
  // `best` is written by a validation that is done: it is not marked as still to validate (the
  // mark `last` carries during the validation), neither in the run never stopped nor the resumed.
  for (const d of [out, whole]) {
    const best = (await readTrainerState(path.join(d, 'best.safetensors'))).state;
    t.same([best.pendingValidation, best.epochSums.steps, best.step], [undefined, 0, best.best!.step], `${d}: best is the state after its validation`);
    const shown = await runCli(['info', '--checkpoint', path.join(d, 'best.safetensors')], path.dirname(d));
    t.notMatch(shown.stdout, /not done/);
  }
}

t.test('SIGKILL during a validation: the resume starts at the epoch end, validates first, and is the run never stopped', async (t) => {
  const dir = tempDir(t, 'cmseg-pending-');
  // The truth: the run never stopped.
  const whole = epochRecorder();
  const r0 = await train(path.join(dir, 'whole'), config, source(), { validate: validator, progress: whole.reporter });
  await r0.model.dispose();
  t.equal(whole.lines.length, 3);

  // Killed in its second validation (after step 4, epoch 2 of 3), as SLURM kills after KillWait.
  await killedRun(t, dir, 2, 'in');
  const out = path.join(dir, 'killed');
  // Was: `last` of step 2 (the epoch before), the whole epoch 2 lost.
  const saved = (await readTrainerState(path.join(out, 'last.safetensors'))).state;
  t.same([saved.step, saved.epoch, saved.batchInEpoch, saved.pendingValidation], [4, 2, 0, true], '`last` stands at the end of epoch 2, its validation to do');
  const before = readTrainLog(path.join(out, 'train-log.jsonl'));
  t.match(before.at(-1), { event: 'checkpoint', kind: 'last', step: 4 }, 'the save before the validation is the last thing logged');
  const info = await runCli(['info', '--checkpoint', path.join(out, 'last.safetensors')], dir);
  t.equal(info.exitCode, 0, info.stderr);
  t.match(info.stdout, /\nstep +4 of 6, epoch 3 of 3; the validation after epoch 2 is not done \(stopped, killed or still running; the resume runs it first\)\n/);
  await resumedIsWhole(t, out, path.join(dir, 'whole'), whole.lines, 4);
});

t.test('SIGKILL after a validation saved `best`, before `last`: the resume validates again, once in the log, its best kept', async (t) => {
  const dir = tempDir(t, 'cmseg-pending-');
  const whole = epochRecorder();
  const r0 = await train(path.join(dir, 'whole'), config, source(), { validate: validator, progress: whole.reporter });
  await r0.model.dispose();
  // The first validation always writes best.safetensors (step 2); killed right after.
  await killedRun(t, dir, 1, 'after-best');
  const out = path.join(dir, 'killed');
  const saved = (await readTrainerState(path.join(out, 'last.safetensors'))).state;
  t.same([saved.step, saved.pendingValidation, saved.best], [2, true, null]);
  // Killed once best.safetensors was written, before its `checkpoint` entry.
  t.same(readTrainLog(path.join(out, 'train-log.jsonl')).slice(-3).map((e) => [e.event, e.kind, e.step]), [['epoch', undefined, 2], ['checkpoint', 'last', 2], ['validation', undefined, 2]]);
  t.equal((await readTrainerState(path.join(out, 'best.safetensors'))).state.best!.step, 2, 'best.safetensors holds the validation of step 2');
  const noted: string[] = [];
  const write = process.stderr.write.bind(process.stderr);
  process.stderr.write = ((chunk: string) => (noted.push(String(chunk)), true)) as typeof process.stderr.write;
  try {
    await resumedIsWhole(t, out, path.join(dir, 'whole'), whole.lines, 2);
  } finally {
    process.stderr.write = write;
  }
  t.same(noted.filter((x) => /note:/.test(x)), [], 'no note that the best was lost');
});

t.test("the epoch means a resumed validation's epoch line shows are the means of that epoch's logged steps", async (t) => {
  // Independent of the reporter: the mean of the log's step losses of epoch 1 (steps 1 and 2).
  const dir = tempDir(t, 'cmseg-pending-');
  const controller = new AbortController();
  const stopping: Validator = async (model, progress) => {
    progress(0, 2, 'c0');
    controller.abort();
    progress(1, 2, 'c1'); // throws: the signal fired
    return validator(model, progress);
  };
  const out = path.join(dir, 'run');
  const stopped = await train(out, { ...config, epochs: 2 }, source(), { validate: stopping, signal: controller.signal });
  await stopped.model.dispose();
  t.same([stopped.status, stopped.state.step, stopped.state.pendingValidation], ['interrupted', 2, true]);
  const steps = readTrainLog(path.join(out, 'train-log.jsonl')).filter((e) => e.event === 'step' && e.epoch === 0);
  t.equal(steps.length, 2);
  const lines: { step: number; f: ProgressFields; seconds: number }[] = [];
  const reporter: ProgressReporter = { start: () => {}, step: () => {}, epoch: (step, f, seconds) => void lines.push({ step, f, seconds }), stop: () => {} };
  const resumed = await train(out, { ...config, epochs: 2 }, source(), { validate: validator, progress: reporter, resume: true });
  await resumed.model.dispose();
  const first = lines[0];
  t.equal(first.step, 2);
  t.equal(first.f.epoch, 0);
  const mean = (k: 'loss') => steps.reduce((s, e) => s + (e[k] as number), 0) / steps.length;
  t.ok(Math.abs(first.f.loss - mean('loss')) < 1e-12, `loss ${first.f.loss} is the mean of the steps' ${mean('loss')}`);
  const sum = (v: unknown) => (v as number[]).reduce((a, b) => a + b, 0);
  const ce = steps.reduce((s, e) => s + sum(e.ce), 0) / steps.length;
  t.ok(Math.abs(first.f.ce - ce) < 1e-12, `CE ${first.f.ce}, the steps' ${ce}`);
  const logged = readTrainLog(path.join(out, 'train-log.jsonl')).find((e) => e.event === 'epoch' && e.epoch === 0)!;
  t.equal(first.seconds, logged.trainSeconds, "the epoch's training seconds, as logged (was 0)");
  t.ok(Number.isFinite(first.f.valDice), 'with the validation just done');
});

t.test('cmseg train --json of a run stopped in a validation says the validation is pending, as the text does', async (t) => {
  const dir = tempDir(t, 'cmseg-pending-');
  const { writeBratsPhantoms } = await import('../src/data/brats-phantom');
  await writeBratsPhantoms(path.join(dir, 'data'), { cases: 10, size: [32, 32, 24], seed: 5 });
  // Ctrl-C as the first validation case is read (the CLI's own SIGINT handler, as validation-progress.test.ts does).
  const cache = require('../src/data/cache') as { readCachedCaseForScoring: (...args: unknown[]) => unknown };
  const read = cache.readCachedCaseForScoring;
  t.teardown(() => void (cache.readCachedCaseForScoring = read));
  let reads = 0;
  cache.readCachedCaseForScoring = (...args: unknown[]) => {
    if (reads++ === 0) (process.listeners('SIGINT').at(-1) as (signal: string) => void)('SIGINT');
    return read(...args);
  };
  const args = ['train', '--preset', 'brats3d', '--data', 'data', '--steps', '2', '--steps-per-epoch', '1', '--patch', '16', '--base-channels', '4', '--val-cases', '2', '--workers', '0', '--no-test', '-q', '--json', '--out', 'run'];
  const stopped = await runCli(args, dir);
  cache.readCachedCaseForScoring = read;
  t.equal(stopped.exitCode, 130, stopped.stderr);
  const json = JSON.parse(stopped.stdout);
  // Was: no word of it (status 'interrupted', step 1 read as a run that had validated epoch 1).
  t.same([json.status, json.step, json.totalSteps, json.pendingValidation], ['interrupted', 1, 2, { epoch: 1, step: 1 }]);
  const resumed = await runCli([...args, '--resume'], dir);
  t.equal(resumed.exitCode, 0, resumed.stderr);
  const done = JSON.parse(resumed.stdout);
  t.same([done.status, done.startStep, done.step, 'pendingValidation' in done], ['completed', 1, 2, false]);

  // cmseg train's BraTS validator declares `progress`, so `last` is saved before its validation:
  // a run that dies in it (here a case that cannot be read, as a SIGKILL would) keeps its epoch.
  reads = 0;
  cache.readCachedCaseForScoring = (...args: unknown[]) => {
    if (reads++ === 0) throw new Error('disk gone');
    return read(...args);
  };
  const crashed = await runCli([...args.slice(0, -1), 'crashed'], dir);
  cache.readCachedCaseForScoring = read;
  t.equal(crashed.exitCode, 1);
  t.match(crashed.stderr, /disk gone/);
  const saved = (await readTrainerState(path.join(dir, 'crashed/last.safetensors'))).state;
  t.same([saved.step, saved.epoch, saved.pendingValidation], [1, 1, true], 'was: `last` of step 0');
  const again = await runCli([...args.slice(0, -1), 'crashed', '--resume'], dir);
  t.equal(again.exitCode, 0, again.stderr);
  t.same(readTrainLog(path.join(dir, 'crashed/train-log.jsonl')).filter((e) => e.event === 'validation').map((e) => e.score), readTrainLog(path.join(dir, 'run/train-log.jsonl')).filter((e) => e.event === 'validation').map((e) => e.score), 'the same validations as the run stopped and resumed');
});

t.test("`last` of the version before (stopped in a validation, the epoch's sums already reset) still resumes exactly", async (t) => {
  const dir = tempDir(t, 'cmseg-pending-');
  const twoEpochs = { ...config, epochs: 2 };
  const r0 = await train(path.join(dir, 'whole'), twoEpochs, source(), { validate: validator });
  await r0.model.dispose();
  const controller = new AbortController();
  const stopping: Validator = async (model, progress) => {
    progress(0, 2, 'c0');
    controller.abort();
    progress(1, 2, 'c1'); // throws: the signal fired
    return validator(model, progress);
  };
  const out = path.join(dir, 'run');
  const stopped = await train(out, twoEpochs, source(), { validate: stopping, signal: controller.signal });
  await stopped.model.dispose();
  // As that version wrote it: the sums reset before the stop's save.
  const last = path.join(out, 'last.safetensors');
  const { extra } = await readCheckpoint(last);
  const state = (extra as { state: { epochSums: unknown; pendingValidation?: boolean } }).state;
  t.equal(state.pendingValidation, true);
  state.epochSums = { loss: 0, ce: 0, trace: 0, steps: 0, seconds: 0 };
  const { loadCheckpoint, saveCheckpoint } = await import('../src/model/checkpoint');
  const model = await loadCheckpoint(last);
  await saveCheckpoint(model, last, extra);
  await model.dispose();
  const lines: ProgressFields[] = [];
  const reporter: ProgressReporter = { start: () => {}, step: () => {}, epoch: (_s, f) => void lines.push(f), stop: () => {} };
  const resumed = await train(out, twoEpochs, source(), { validate: validator, progress: reporter, resume: true });
  await resumed.model.dispose();
  t.same([resumed.status, resumed.startStep, resumed.validatedPending], ['completed', 2, true]);
  t.same(lines.map((f) => f.epoch), [0, 1], 'the resumed validation and the last epoch');
  t.ok(Number.isNaN(lines[0].loss), 'no sums to show: shown as that version showed it, not as 0');
  t.same(comparable(path.join(out, 'train-log.jsonl')).filter((e) => e.event !== 'interrupted'), comparable(path.join(dir, 'whole/train-log.jsonl')));
  await sameTensors(t, last, path.join(dir, 'whole/last.safetensors'), 'last');
});

t.test('`last` is saved before a validation unless the validator declares exactly one parameter', async (t) => {
  const dir = tempDir(t, 'cmseg-pending-');
  const one = { ...config, epochs: 1 };
  // What the log holds between the epoch's entry and the validation's, per validator shape.
  const between = async (name: string, validate: Validator) => {
    const r = await train(path.join(dir, name), one, source(), { validate });
    await r.model.dispose();
    const log = readTrainLog(path.join(dir, name, 'train-log.jsonl'));
    const epochAt = log.findIndex((e) => e.event === 'epoch');
    const validationAt = log.findIndex((e) => e.event === 'validation');
    return log.slice(epochAt + 1, validationAt).map((e) => `${e.event} ${e.kind}`);
  };
  const quick = (async (model: Parameters<Validator>[0]) => validator(model, () => {})) as Validator;
  // A wrapper passing its arguments on: it may take `progress` (was: taken for a quick one, and
  // a SIGKILL in its long validation lost the epoch).
  const rest = (async (...args: Parameters<Validator>) => validator(...args)) as Validator;
  t.same(await between('one', quick), [], 'one parameter: a quick validator, `last` written once after it');
  t.same(await between('two', validator), ['checkpoint last'], 'two parameters: `last` saved before');
  t.same(await between('rest', rest), ['checkpoint last'], 'rest parameters: `last` saved before');
});
