// Review of this session's validation, PNG and curves changes (h-review18): defects found by
// trying what looked fragile, each checked against an independent truth (the run that was
// never stopped, hand-computed values).
import t from 'tap';
import * as fs from 'fs';
import * as path from 'path';
import type { ProgressFields, ProgressReporter } from '../src/train/progress';
import { readTrainLog, train, TRAIN_DEFAULTS, type TrainConfig, type Validator } from '../src/train/trainer';
import { tempDir } from './helpers/files';
import { readCurvesEvents } from '../src/cli/curves';
import { runCli } from './helpers/cli';
import { captureStderr } from './helpers/stderr';
import { tinySource } from './helpers/tiny-source';

// Four 4x4 images, two annotators, batches of 2: an epoch is two steps of a tiny model.
const source = tinySource;
const config: TrainConfig = { ...TRAIN_DEFAULTS, method: 'cm', epochs: 2, batchSize: 2, depth: 2, baseChannels: 4 };

/** A reporter that records the epoch each validation and epoch call shows. */
function recorder(): { reporter: ProgressReporter; calls: string[] } {
  const calls: string[] = [];
  const ep = (f: ProgressFields) => `epoch ${f.epoch + 1}/${f.epochs}`;
  return {
    calls,
    reporter: {
      start: () => {},
      step: () => {},
      validation: (step, f, done, total) => void calls.push(`validation after ${step}, ${ep(f)}: ${done}/${total}`),
      epoch: (step, f) => void calls.push(`end of ${ep(f)} at ${step}`),
      stop: () => {},
    },
  };
}

/** Two cases; `abort` fires after the first case's report when given. */
const twoCases = (abort?: AbortController): Validator => async (_model, progress) => {
  progress(0, 2, 'c0');
  abort?.abort();
  progress(1, 2, 'c1');
  progress(2, 2);
  return { score: 0.5, metrics: {} };
};

t.test("a resumed stopped validation shows the epoch it ends, as the run never stopped shows it", async (t) => {
  const dir = tempDir(t, 'cmseg-review18-');
  // The truth: the run never stopped reports the validation after step 2 as epoch 1's.
  const whole = recorder();
  const r0 = await train(path.join(dir, 'whole'), config, source(), { validate: twoCases(), progress: whole.reporter });
  await r0.model.dispose();
  t.same(whole.calls.slice(0, 4), ['validation after 2, epoch 1/2: 0/2', 'validation after 2, epoch 1/2: 1/2', 'validation after 2, epoch 1/2: 2/2', 'end of epoch 1/2 at 2']);

  const controller = new AbortController();
  const out = path.join(dir, 'stopped');
  const stopped = await train(out, config, source(), { validate: twoCases(controller), signal: controller.signal });
  await stopped.model.dispose();
  t.same([stopped.status, stopped.state.step, stopped.state.pendingValidation], ['interrupted', 2, true]);
  const resumed = recorder();
  const r1 = await train(out, config, source(), { validate: twoCases(), progress: resumed.reporter, resume: true });
  await r1.model.dispose();
  // Was: "epoch 2/2" for the validation of epoch 1 (the fields of the epoch to come).
  t.same(resumed.calls.slice(0, 4), whole.calls.slice(0, 4));
});

t.test('a stopped validation resumed without hooks.validate: not reported as validated', async (t) => {
  const dir = tempDir(t, 'cmseg-review18-');
  const controller = new AbortController();
  const out = path.join(dir, 'run');
  const oneEpoch = { ...config, epochs: 1 };
  const stopped = await train(out, oneEpoch, source(), { validate: twoCases(controller), signal: controller.signal });
  await stopped.model.dispose();
  t.same([stopped.status, stopped.state.step, stopped.state.totalSteps, stopped.state.pendingValidation], ['interrupted', 2, 2, true]);
  const resumed = await train(out, oneEpoch, source(), { resume: true });
  await resumed.model.dispose();
  t.equal(resumed.status, 'completed');
  // Nothing was validated: TrainResult.validatedPending says "first did the validation a signal had stopped".
  t.equal(resumed.validatedPending, undefined, 'validatedPending only when a validation ran');
  const log = readTrainLog(path.join(out, 'train-log.jsonl'));
  t.equal(log.filter((e) => e.event === 'validation').length, 0, 'no validation logged');
  t.same(log.slice(-2).map((e) => e.event), ['checkpoint', 'end'], 'the run is complete: `end` closes its log');
});

t.test('info --checkpoint: a run stopped in a validation before its last step says that validation is still to do', async (t) => {
  const dir = tempDir(t, 'cmseg-review18-');
  const controller = new AbortController();
  // Stopped in the validation after step 2 (epoch 1 of 2): `last` stands at the start of epoch 2.
  const stopped = await train(path.join(dir, 'run'), config, source(), { validate: twoCases(controller), signal: controller.signal });
  await stopped.model.dispose();
  t.same([stopped.state.step, stopped.state.totalSteps, stopped.state.epoch, stopped.state.pendingValidation], [2, 4, 1, true]);
  const info = await runCli(['info', '--checkpoint', 'run/last.safetensors'], dir);
  t.equal(info.exitCode, 0, info.stderr);
  // Was "2 of 4, epoch 2 of 2" alone: as if epoch 1 had been validated (best "none yet" then reads as a run without validations).
  t.match(info.stdout, /\nstep +2 of 4, epoch 2 of 2; the validation after epoch 1 is not done \(stopped, killed or still running; the resume runs it first\)\n/);
});

t.test("a resumed stopped validation whose save of `best` failed: resumed again, the log holds that validation once", async (t) => {
  const dir = tempDir(t, 'cmseg-review18-');
  const whole = await train(path.join(dir, 'whole'), config, source(), { validate: twoCases() });
  await whole.model.dispose();
  const steps = (out: string) => readTrainLog(path.join(dir, out, 'train-log.jsonl')).filter((e) => e.event === 'validation').map((e) => e.step);
  t.same(steps('whole'), [2, 4], 'the run never stopped: one validation per epoch');

  const controller = new AbortController();
  const out = path.join(dir, 'run');
  const stopped = await train(out, config, source(), { validate: twoCases(controller), signal: controller.signal });
  await stopped.model.dispose();
  t.equal(stopped.state.pendingValidation, true);
  // The resume's save of `best` fails (a full disk, here a folder in its place): the validation
  // was logged, `last` still says it is pending.
  fs.mkdirSync(path.join(out, 'best.safetensors', 'x'), { recursive: true });
  await t.rejects(train(out, config, source(), { validate: twoCases(), resume: true }));
  fs.rmSync(path.join(out, 'best.safetensors'), { recursive: true });
  const resumed = await train(out, config, source(), { validate: twoCases(), resume: true });
  await resumed.model.dispose();
  t.equal(resumed.status, 'completed');
  // Was [2, 2, 4]: the failed attempt's entry at step 2 was kept (a resume keeps entries up to
  // `last`'s step, and this one was at that step), and curves drew two validations there.
  t.same(steps('run'), steps('whole'));
  const bestSaves = readTrainLog(path.join(out, 'train-log.jsonl')).filter((e) => e.event === 'checkpoint' && e.kind === 'best').map((e) => e.step);
  t.same(bestSaves, [2], 'one save of best at step 2 (the scores are equal: no later one)');
});

t.test("a resumed stopped validation killed after its save of `best`: the next resume keeps that best without a note that it was lost", async (t) => {
  const dir = tempDir(t, 'cmseg-review18-');
  // Scores 0.5 then 0.6: the second validation (step 4) is the best.
  let calls = 0;
  const rising = (abortAt?: { controller: AbortController; call: number }): Validator => async (_model, progress) => {
    const call = calls++;
    progress(0, 2, 'c0');
    if (abortAt && call === abortAt.call) abortAt.controller.abort();
    progress(1, 2, 'c1');
    progress(2, 2);
    return { score: call === 0 ? 0.5 : 0.6, metrics: {} };
  };
  const controller = new AbortController();
  const out = path.join(dir, 'run');
  const stopped = await train(out, config, source(), { validate: rising({ controller, call: 1 }), signal: controller.signal });
  await stopped.model.dispose();
  t.same([stopped.state.step, stopped.state.pendingValidation, stopped.state.best], [4, true, { score: 0.5, epoch: 0, step: 2 }]);
  // The resume validates, saves `best` (0.6 at step 4), and dies before it saves `last` (a kill; here its save fails).
  const checkpoint = require('../src/model/checkpoint') as { saveCheckpoint: (...args: unknown[]) => Promise<void> };
  const save = checkpoint.saveCheckpoint;
  t.teardown(() => void (checkpoint.saveCheckpoint = save));
  checkpoint.saveCheckpoint = async (...args: unknown[]) => {
    if (String(args[1]).endsWith('last.safetensors')) throw new Error('killed');
    return save(...args);
  };
  await t.rejects(train(out, config, source(), { validate: rising(), resume: true }), { message: 'killed' });
  checkpoint.saveCheckpoint = save;
  const { value: resumed, stderr } = await captureStderr(() => train(out, config, source(), { validate: rising(), resume: true }));
  await resumed.model.dispose();
  // best.safetensors holds the model of `last`'s own step, from this very validation: not "another model".
  t.notMatch(stderr, /holds another model/, 'no note that the best was lost');
  t.same(resumed.state.best, { score: 0.6, epoch: 1, step: 4 });
  t.equal(resumed.files.best, path.join(out, 'best.safetensors'));
  const log = readTrainLog(path.join(out, 'train-log.jsonl'));
  t.notOk(log.some((e) => e.event === 'resume' && e.note !== undefined), 'no note in the resume entries');
  t.same(log.filter((e) => e.event === 'validation').map((e) => [e.step, e.score]), [[2, 0.5], [4, 0.6]]);
});

t.test('curves read while a resume cuts the log and appends, the reader between two pieces on a line boundary: drawn as the log now is', async (t) => {
  const dir = tempDir(t, 'cmseg-review18-');
  const log = path.join(dir, 'train-log.jsonl');
  const MiB = 1 << 20;
  const line = (e: Record<string, unknown>) => JSON.stringify(e) + '\n';
  /** `lines` joined, with a filler line (no step, not drawn) so that a line ends exactly at byte 1 MiB. */
  const alignedAtMiB = (lines: string[]) => {
    let text = '';
    let padded = false;
    for (const l of lines) {
      if (!padded && text.length + l.length > MiB - 200) {
        const filler = line({ event: 'filler', pad: '' });
        text += line({ event: 'filler', pad: 'x'.repeat(MiB - text.length - filler.length) });
        padded = true;
      }
      text += l;
    }
    return text;
  };
  const steps = (from: number, loss: (s: number) => number, extra: Record<string, unknown> = {}) =>
    Array.from({ length: 20000 - from + 1 }, (_, i) => line({ event: 'step', step: from + i, epoch: 0, loss: loss(from + i), ce: [0.5, 0.5], ...extra }));
  const old = alignedAtMiB([line({ event: 'start', step: 0 }), ...steps(1, (s) => 1 / s)]);
  fs.writeFileSync(log, old);
  t.equal(old.slice(MiB - 1, MiB + 1), '\n{', 'the old log has a line boundary at 1 MiB');
  // The resume from step 100: the log cut after step 100, then a resume's entries appended, longer
  // lines, which also put a line boundary at 1 MiB (the reader's next piece begins on a whole line).
  const kept = old.slice(0, old.indexOf('\n', old.indexOf('"step":100,')) + 1);
  const now = alignedAtMiB([kept, line({ event: 'resume', step: 100 }), ...steps(101, (s) => 2 + 1 / s, { resumedFrom: 100 })]);
  t.equal(now.slice(MiB - 1, MiB + 1), '\n{', 'so has the resumed one');
  const events = readCurvesEvents(log, {
    visited: (l, attempt) => {
      if (attempt === 1 && l === 10) {
        const fd = fs.openSync(log, 'r+');
        fs.ftruncateSync(fd, kept.length);
        fs.closeSync(fd);
        fs.appendFileSync(log, now.slice(kept.length));
      }
    },
  });
  t.equal(fs.readFileSync(log, 'utf8'), now);
  // The truth: the log as it is now, each step once, its losses the resume's from step 101.
  const drawnSteps = events.filter((e) => e.event === 'step');
  t.same(drawnSteps.map((e) => e.step), Array.from({ length: 20000 }, (_, i) => i + 1), 'each step once, in order (was: the old steps to 12541, then the new ones from 10777 again)');
  t.equal(drawnSteps[19999].loss, 2 + 1 / 20000);
  t.equal(drawnSteps[150].loss, 2 + 1 / 151);
});

t.test("an API validator that honours hooks.signal itself (signal.throwIfAborted()) stops the run as the progress call's throw does", async (t) => {
  const dir = tempDir(t, 'cmseg-review18-');
  const controller = new AbortController();
  const own = (abort: boolean): Validator => async () => {
    if (abort) controller.abort();
    controller.signal.throwIfAborted(); // between two cases, as a validator given the signal writes it
    return { score: 0.5, metrics: {} };
  };
  const out = path.join(dir, 'run');
  // Was: train() rejected with the AbortError, `last` not saved at step 2 (the epoch's steps lost).
  const stopped = await train(out, config, source(), { validate: own(true), signal: controller.signal });
  await stopped.model.dispose();
  t.same([stopped.status, stopped.state.step, stopped.state.pendingValidation], ['interrupted', 2, true]);
  const resumed = await train(out, config, source(), { validate: async () => ({ score: 0.5, metrics: {} }), resume: true });
  await resumed.model.dispose();
  t.same(readTrainLog(path.join(out, 'train-log.jsonl')).filter((e) => e.event === 'validation').map((e) => e.step), [2, 4]);
  // Any other error of a validator still rejects.
  await t.rejects(
    train(path.join(dir, 'other'), config, source(), { validate: async () => { throw new Error('disk on fire'); }, signal: new AbortController().signal }),
    { message: 'disk on fire' },
  );
});
