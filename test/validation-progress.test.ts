// What a user sees while training validates (src/train/progress.ts, trainer.ts, cli/train.ts):
// a BraTS validation of whole cases takes minutes, during which the bar stood still at the
// epoch's last step and the log kept only the means. Now the bar says "validating 1/2 cases",
// a batch job's log a line at most every minute, and the log's validation entry lists each
// case's figures (`cases`), checked here against Dice computed with numpy from the same
// checkpoint's predicted NIfTI volumes and the phantoms' own segmentations.
import t from 'tap';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { PassThrough } from 'stream';
import { writeBratsPhantoms } from '../src/data/brats-phantom';
import { loadExperimentData, type DatasetSpec } from '../src/train/experiment';
import { createProgress, type ProgressFields, type ProgressReporter } from '../src/train/progress';
import { readTrainerState, readTrainLog, train, TRAIN_DEFAULTS, TrainingError, type TrainConfig, type Validator } from '../src/train/trainer';
import { runValidator } from '../src/cli/train';
import { runCli } from './helpers/cli';
import { missingPythonModules, runPythonJson } from './helpers/python';
import { tinySource } from './helpers/tiny-source';

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cmseg-valprogress-'));
t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
const cmseg = (args: string[]) => runCli(args, dir);
type Entry = Record<string, unknown>;
type CaseEntry = { id: string; score: number | null; totalDice: number | null; wholeTumour: number | null; tumourCore: number | null; enhancingTumour: number | null };

// 10 phantom cases: 6 train, 2 validation, 2 test (70/15/15); 2 steps of 1 batch, so two validations.
const TRAIN = ['train', '--preset', 'brats3d', '--data', 'data', '--steps', '2', '--steps-per-epoch', '1', '--patch', '16', '--base-channels', '4', '--val-cases', '2', '--workers', '0', '--no-test', '-q'];

t.test("the log's validation entries list each case, equal to numpy's Dice of the same checkpoint's predictions", async (t) => {
  const skip = missingPythonModules('numpy', 'nibabel');
  await writeBratsPhantoms(path.join(dir, 'data'), { cases: 10, size: [32, 32, 24], seed: 5 });
  const run = await cmseg([...TRAIN, '--out', 'run']);
  t.equal(run.exitCode, 0, run.stderr);
  t.equal(run.stderr, '', 'quiet, and the curves (which read the log) drawn without a note');
  const log = readTrainLog(path.join(dir, 'run/train-log.jsonl'));
  const validationIds = ((log[0].run as { dataset: { splits: { validation: string[] } } }).dataset.splits.validation);
  t.equal(validationIds.length, 2);
  const validations = log.filter((e) => e.event === 'validation');
  t.same(validations.map((e) => e.step), [1, 2]);
  for (const v of validations) {
    const cases = v.cases as CaseEntry[];
    t.same(cases.map((c) => c.id), validationIds, `step ${v.step}: the validated cases, in order`);
    // The score that picks `best` is the mean of the cases' scores.
    const scores = cases.map((c) => c.score as number);
    t.ok(Math.abs(scores.reduce((a, b) => a + b, 0) / scores.length - (v.score as number)) < 1e-12, `step ${v.step}: mean of ${scores} is the score ${v.score}`);
    for (const region of ['wholeTumour', 'tumourCore', 'enhancingTumour', 'totalDice']) {
      const mean = cases.reduce((a, c) => a + (c[region as keyof CaseEntry] as number), 0) / cases.length;
      t.ok(Math.abs(mean - (v[region] as number)) < 1e-12, `step ${v.step}: ${region} mean`);
    }
  }
  // The checkpoints keep the means only (the cases are the log's).
  const state = (await readTrainerState(path.join(dir, 'run/last.safetensors'))).state;
  t.equal(state.lastValidation!.step, 2);
  t.notOk('cases' in state.lastValidation!, 'no cases in the trainer state');
  const info = await cmseg(['info', '--checkpoint', 'run/last.safetensors']);
  t.match(info.stdout, /best validation +score \d\.\d{4} at epoch \d \(step \d\)/);

  if (skip) return t.skip(skip);
  // last.safetensors is the model of the step-2 validation: its predictions, scored by numpy.
  const predicted = await cmseg(['predict', '--checkpoint', 'run/last.safetensors', '--split', 'validation', '--out', 'pred', '--no-cms', '--probs', 'none', '-q']);
  t.equal(predicted.exitCode, 0, predicted.stderr);
  const truth = runPythonJson<Record<string, Record<string, number | null>>>(
    `
import json, sys, numpy as np, nibabel as nib
root, ids = sys.argv[1], sys.argv[2:]
def dice(p, t):
    s = p.sum() + t.sum()
    return 1.0 if s == 0 else 2.0 * np.logical_and(p, t).sum() / s
out = {}
for i in ids:
    p = np.asarray(nib.load(f"{root}/pred/{i}_consensus.nii.gz").dataobj).astype(int)
    t = np.asarray(nib.load(f"{root}/data/{i}/{i}_seg.nii.gz").dataobj).astype(int)
    # BraTS 2021 labels: 1 necrosis, 2 edema, 4 enhancing; WT = {1,2,4}, TC = {1,4}, ET = {4}.
    classes = [dice(p == c, t == c) for c in (1, 2, 4)]
    region = lambda ls: dice(np.isin(p, ls), np.isin(t, ls))
    out[i] = {"score": float(np.mean(classes)), "wholeTumour": region([1, 2, 4]), "tumourCore": region([1, 4]), "enhancingTumour": region([4])}
print(json.dumps(out))
`,
    [dir, ...validationIds],
  );
  for (const c of validations[1].cases as CaseEntry[]) {
    for (const key of ['score', 'wholeTumour', 'tumourCore', 'enhancingTumour'] as const) {
      t.ok(Math.abs((c[key] as number) - (truth[c.id][key] as number)) < 1e-9, `${c.id} ${key}: log ${c[key]}, numpy ${truth[c.id][key]}`);
    }
  }
});

/** A reporter that records what the trainer tells it. */
function recorder(): { reporter: ProgressReporter; calls: string[] } {
  const calls: string[] = [];
  return {
    calls,
    reporter: {
      start: (total, step) => void calls.push(`start ${step}/${total}`),
      step: (step) => void calls.push(`step ${step}`),
      validation: (step, _f, done, total, id) => void calls.push(`validation ${step}: ${done}/${total}${id ? ` ${id}` : ''}`),
      epoch: (step) => void calls.push(`epoch ${step}`),
      stop: () => void calls.push('stop'),
    },
  };
}

t.test("cmseg train's validator reports each BraTS case to the progress reporter, before the epoch's end", async (t) => {
  const saved = await readTrainerState(path.join(dir, 'run/last.safetensors'));
  const dataset = saved.run.dataset as DatasetSpec;
  const data = loadExperimentData(dataset, saved.config.seed, { workers: 0 });
  t.teardown(() => data.close?.());
  const ids = (dataset as { splits: { validation: string[] } }).splits.validation;
  const { reporter, calls } = recorder();
  const result = await train(path.join(dir, 'api'), { ...saved.config, steps: 1 }, data.source, { progress: reporter, validate: runValidator(data, 'cm') });
  await result.model.dispose();
  t.same(calls, ['start 0/1', 'step 1', `validation 1: 0/2 ${ids[0]}`, `validation 1: 1/2 ${ids[1]}`, 'validation 1: 2/2', 'epoch 1', 'stop']);
});

const fields: ProgressFields = { epoch: 0, epochs: 2, loss: 0.25, ce: 0.125, trace: 2, lr: 1e-3, valDice: NaN };

function capture(isTTY: boolean) {
  const stream = Object.assign(new PassThrough(), { isTTY, columns: 200 }) as unknown as NodeJS.WriteStream;
  let text = '';
  (stream as unknown as PassThrough).on('data', (chunk: Buffer) => (text += chunk.toString()));
  return { stream, text: () => text };
}
const redraw = () => new Promise((r) => setTimeout(r, 250));
const frames = (text: string) => [...text.matchAll(/\x1B\[1G([^\x1B]*)\x1B\[0K/g)].map((m) => m[1]);

t.test('a terminal: the bar says which case it validates, keeps the whole run\'s ETA, then shows training again', async (t) => {
  const out = capture(true);
  let now = 0;
  const p = createProgress({ stream: out.stream, now: () => now });
  p.start(8, 0, fields);
  now = 40_000; // 4 steps in 40 s
  p.step(4, fields);
  await redraw();
  now = 60_000;
  p.validation!(4, fields, 0, 2, 'BraTS2021_00006');
  await redraw();
  now = 100_000; // 100 s for 4 steps and a validation's first case: 25 s a step, 4 steps left
  p.validation!(4, fields, 1, 2, 'BraTS2021_00008');
  await redraw();
  p.validation!(4, fields, 2, 2);
  await redraw();
  p.epoch(4, { ...fields, valDice: 0.5 }, 40);
  await redraw();
  p.stop();
  const drawn = frames(out.text());
  const bar = '='.repeat(12) + '-'.repeat(12);
  t.same(drawn.slice(1), [
    `epoch 1/2 [${bar}] step 4/8 | last step: loss 0.2500 | CE 0.1250 | trace 2.000 | val Dice - | ETA 40s`,
    `epoch 1/2 [${bar}] step 4/8 | validating 0/2 cases (now BraTS2021_00006) | val Dice - | ETA 1m00s`,
    `epoch 1/2 [${bar}] step 4/8 | validating 1/2 cases (now BraTS2021_00008) | val Dice - | ETA 1m40s`,
    `epoch 1/2 [${bar}] step 4/8 | validating 2/2 cases | val Dice - | ETA 1m40s`,
    `epoch 1/2 [${bar}] step 4/8 | epoch mean: loss 0.2500 | CE 0.1250 | trace 2.000 | val Dice 0.5000 | ETA 1m40s`,
  ], JSON.stringify(drawn));
});

t.test('a log: a long validation writes a line at most every lineEveryMs, a quick one none', async (t) => {
  const out = capture(false);
  let now = 0;
  const p = createProgress({ stream: out.stream, now: () => now, lineEveryMs: 60_000 });
  p.start(8, 0, fields);
  now = 1_000;
  p.step(4, fields);
  // A quick validation (2D images, small cases): nothing but the epoch's line.
  p.validation!(4, fields, 0, 2, 'a');
  now = 2_000;
  p.validation!(4, fields, 1, 2, 'b');
  p.validation!(4, fields, 2, 2);
  p.epoch(4, fields, 1);
  t.equal(out.text(), 'epoch 1/2  step 4/8  loss 0.2500  CE 0.1250  trace 2.000  val Dice -  (1.0 s, ETA 2s)\n');
  // A validation of a minute a case: a line when a minute has passed since the last one.
  const before = out.text().length;
  p.step(8, { ...fields, epoch: 1 });
  p.validation!(8, { ...fields, epoch: 1 }, 0, 3, 'a');
  now = 63_000;
  p.validation!(8, { ...fields, epoch: 1 }, 1, 3, 'b');
  now = 100_000;
  p.validation!(8, { ...fields, epoch: 1 }, 2, 3, 'c');
  now = 124_000;
  p.validation!(8, { ...fields, epoch: 1 }, 3, 3);
  t.equal(
    out.text().slice(before),
    '  validating after step 8/8 of epoch 2/2: 1/3 case(s) scored  (61.0 s since the last line)\n  validating after step 8/8 of epoch 2/2: 3/3 case(s) scored  (61.0 s since the last line)\n',
  );
  p.stop();
});

// Four 4x4 images, two annotators: one epoch is two steps of a tiny model (under a second).
const source = tinySource;
const config: TrainConfig = { ...TRAIN_DEFAULTS, method: 'cm', epochs: 1, batchSize: 2, depth: 2, baseChannels: 4 };
const validationsOf = (out: string) => readTrainLog(path.join(dir, out, 'train-log.jsonl')).filter((e: Entry) => e.event === 'validation');

t.test("an API validator's cases: logged with NaN as null, checked, and a metric `cases` of before still logged", async (t) => {
  const withCases: Validator = async (_model, progress) => {
    progress(0, 2, 'x');
    progress(5, 2, 'nonsense'); // ignored: more done than there are
    progress(2, 2);
    return { score: 0.25, metrics: { dice: 0.25 }, cases: [{ id: 'x', score: NaN, metrics: { hd: Infinity } }, { id: 'y', score: 0.5 }] };
  };
  const { reporter, calls } = recorder();
  const r = await train(path.join(dir, 'cases'), config, source(), { validate: withCases, progress: reporter });
  await r.model.dispose();
  t.same(calls.filter((c) => c.startsWith('validation')), ['validation 2: 0/2 x', 'validation 2: 2/2']);
  t.same(validationsOf('cases')[0].cases, [{ id: 'x', score: null, hd: null }, { id: 'y', score: 0.5 }], 'non-finite figures as null, as the means are written');

  // A validator written before `cases` existed, logging a count under that name, logs as it did.
  const old = await train(path.join(dir, 'old'), config, source(), { validate: async () => ({ score: 0.5, metrics: { cases: 3 } }) });
  await old.model.dispose();
  t.equal(validationsOf('old')[0].cases, 3);

  const refused = (name: string, result: unknown) => train(path.join(dir, name), config, source(), { validate: (async () => result) as unknown as Validator });
  await t.rejects(refused('clash', { score: 0.5, metrics: { cases: 3 }, cases: [{ id: 'a', score: 1 }] }), {
    name: 'TrainingError',
    message: /validation metric\(s\) 'cases' would overwrite the training log's own field\(s\) \(time, event, step, epoch, score, cases\)/,
  });
  await t.rejects(refused('not-array', { score: 0.5, metrics: {}, cases: { a: 1 } }), { name: 'TrainingError', message: /hooks\.validate resolved cases \{"a":1\}, expected an array of \{id: string, score: number/ });
  await t.rejects(refused('no-id', { score: 0.5, metrics: {}, cases: [{ id: 'a', score: 1 }, { score: 1 }] }), { message: /resolved cases\[1\] \{"score":1\}, expected \{id: string, score: number/ });
  await t.rejects(refused('case-clash', { score: 0.5, metrics: {}, cases: [{ id: 'a', score: 1, metrics: { id: 2 } }] }), { message: /validation case "a": metric\(s\) 'id' would overwrite the case's own field/ });
  t.ok(new TrainingError('x') instanceof Error);
});

t.test('Ctrl-C during a BraTS validation stops after the case in progress; the resumed run validates first, as the run would have', async (t) => {
  // The first validation case's read is where the user presses Ctrl-C (the CLI's own SIGINT
  // handler is called, as brats-cli.test.ts does): before, the whole validation (minutes of
  // cases, past a scheduler's grace period after SIGTERM) ran before anything was saved.
  const cache = require('../src/data/cache') as { readCachedCaseForScoring: (...args: unknown[]) => unknown };
  const read = cache.readCachedCaseForScoring;
  t.teardown(() => void (cache.readCachedCaseForScoring = read));
  let reads = 0;
  cache.readCachedCaseForScoring = (...args: unknown[]) => {
    if (reads++ === 0) (process.listeners('SIGINT').at(-1) as (signal: string) => void)('SIGINT');
    return read(...args);
  };
  const stopped = await cmseg([...TRAIN, '--out', 'stopped']);
  cache.readCachedCaseForScoring = read;
  t.equal(stopped.exitCode, 130, stopped.stderr);
  t.equal(reads, 1, 'the second validation case was not read');
  t.match(stopped.stderr, /\ninterrupt: stopping the validation after the case in progress; last.safetensors was saved before it, and the resumed run validates again \(Ctrl-C again quits at once, losing nothing\)\n/);
  t.match(stopped.stdout, /^interrupted at step 1\/2 during the validation after it \(the resumed run validates first\); continue with: cmseg train --out stopped --resume\n/);
  const saved = await readTrainerState(path.join(dir, 'stopped/last.safetensors'));
  t.same([saved.state.step, saved.state.epoch, saved.state.pendingValidation, saved.state.lastValidation], [1, 1, true, null]);
  const log = readTrainLog(path.join(dir, 'stopped/train-log.jsonl'));
  t.notOk(log.some((e) => e.event === 'validation'), 'nothing of the stopped validation logged');
  t.match(log.at(-1), { event: 'interrupted', step: 1, pendingValidation: true });

  const resumed = await cmseg([...TRAIN, '--out', 'stopped', '--resume']);
  t.equal(resumed.exitCode, 0, resumed.stderr);
  t.match(resumed.stdout, /^trained cm from step 1 to 2/);
  // The same run as the one never stopped (the first test's, same settings and data): the same
  // validations at the same steps, the same best and losses, the same saves (`last` is saved
  // before each validation: the stop needs no save of its own; was one more).
  const strip = (events: Entry[], kinds: string[]) =>
    events
      .filter((e) => kinds.includes(e.event as string))
      .map(({ time: _time, stepMs: _ms, trainSeconds: _s, file: _f, ...rest }) => rest);
  const kinds = ['step', 'epoch', 'validation', 'checkpoint', 'end'];
  t.same(strip(readTrainLog(path.join(dir, 'stopped/train-log.jsonl')), kinds), strip(readTrainLog(path.join(dir, 'run/train-log.jsonl')), kinds));
  const [a, b] = await Promise.all(['stopped', 'run'].map(async (d) => (await readTrainerState(path.join(dir, d, 'last.safetensors'))).state));
  t.same(a, b, 'the trainer state of `last`: no pendingValidation left, the same best and validation');
});

t.test('a signal during the last validation: the resume validates, logs `end` and completes', async (t) => {
  const controller = new AbortController();
  const seen: string[] = [];
  const validator = (stopAt?: number): Validator => async (_model, progress) => {
    for (let k = 0; k < 3; k++) {
      progress(k, 3, `case${k}`);
      seen.push(`case${k}`);
      if (k === stopAt) controller.abort();
    }
    progress(3, 3);
    return { score: 0.5, metrics: {}, cases: [0, 1, 2].map((k) => ({ id: `case${k}`, score: 0.5 })) };
  };
  const out = path.join(dir, 'last-validation');
  const stopped = await train(out, config, source(), { validate: validator(0), signal: controller.signal });
  await stopped.model.dispose();
  t.equal(stopped.status, 'interrupted');
  t.same(seen, ['case0'], 'stopped before the second case');
  t.same([stopped.state.step, stopped.state.totalSteps, stopped.state.pendingValidation, stopped.state.best], [2, 2, true, null]);
  t.notOk(fs.existsSync(path.join(out, 'best.safetensors')));
  const resumed = await train(out, config, source(), { validate: validator(), resume: true });
  await resumed.model.dispose();
  t.equal(resumed.status, 'completed');
  t.same(resumed.state.best, { score: 0.5, epoch: 0, step: 2 });
  t.equal(resumed.state.pendingValidation, undefined);
  t.ok(fs.existsSync(path.join(out, 'best.safetensors')));
  const events = readTrainLog(path.join(out, 'train-log.jsonl')).map((e) => e.event);
  t.same(events.slice(-6), ['interrupted', 'resume', 'validation', 'checkpoint', 'checkpoint', 'end']);
  // Resumed again: complete, nothing more to do or log.
  const again = await train(out, config, source(), { validate: validator(), resume: true });
  await again.model.dispose();
  t.equal(readTrainLog(path.join(out, 'train-log.jsonl')).length, events.length);
});

t.test('Ctrl-C during the last validation: info and the resume say what is left, and the resume does it', async (t) => {
  const cache = require('../src/data/cache') as { readCachedCaseForScoring: (...args: unknown[]) => unknown };
  const read = cache.readCachedCaseForScoring;
  t.teardown(() => void (cache.readCachedCaseForScoring = read));
  let reads = 0;
  cache.readCachedCaseForScoring = (...args: unknown[]) => {
    // Reads 0 and 1: the validation after step 1; read 2: the first case of the last one.
    if (reads++ === 2) (process.listeners('SIGINT').at(-1) as (signal: string) => void)('SIGINT');
    return read(...args);
  };
  const stopped = await cmseg([...TRAIN, '--out', 'stopped-last']);
  cache.readCachedCaseForScoring = read;
  t.equal(stopped.exitCode, 130, stopped.stderr);
  t.match(stopped.stdout, /^interrupted at step 2\/2 during the validation after it \(the resumed run validates first\)/);
  const info = await cmseg(['info', '--checkpoint', 'stopped-last/last.safetensors']);
  t.match(info.stdout, /\nstep +2 of 2, 2 epoch\(s\): its last validation is not done \(stopped, killed or still running; resume to run it\)\n/);
  const resumed = await cmseg([...TRAIN, '--out', 'stopped-last', '--resume']);
  t.equal(resumed.exitCode, 0, resumed.stderr);
  t.match(resumed.stdout, /^validated the run at step 2 \(its validation had been stopped\); it is complete; best validation Dice \d\.\d{4} \(epoch \d\)\n/);
  const log = readTrainLog(path.join(dir, 'stopped-last/train-log.jsonl'));
  t.same(log.filter((e) => e.event === 'validation').map((e) => e.score), readTrainLog(path.join(dir, 'run/train-log.jsonl')).filter((e) => e.event === 'validation').map((e) => e.score));
  t.equal(log.at(-1)!.event, 'end');
  const info2 = await cmseg(['info', '--checkpoint', 'stopped-last/last.safetensors']);
  t.match(info2.stdout, /\nstep +2 of 2, 2 epoch\(s\): complete\n/);
});
