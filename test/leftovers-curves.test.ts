// `cmseg curves` reading a run's train-log.jsonl while a resume of the run cuts it in place (the
// entries past its checkpoint) and appends: the reader's next 1 MiB piece began inside a line
// ("line N is not a training log entry"), or the cut entries were drawn. The resume is played
// deterministically from the reader's visit hook, between its first piece and the next; the
// truth is the log as it is once the resume has written, parsed by Python's json.
import * as fs from 'fs';
import * as path from 'path';
import t from 'tap';
import { CURVES_READ_ATTEMPTS, readCurvesEvents, writeRunCurves } from '../src/cli/curves';
import { UserError } from '../src/errors';
import { missingPythonModules, runPythonJson } from './helpers/python';
import { tempDir } from './helpers/files';

const skip = missingPythonModules('json');

const entry = (e: Record<string, unknown>) => JSON.stringify({ time: '2026-11-28T23:00:00.000Z', ...e }) + '\n';

/** A run's log of `steps` steps (over 1 MiB from about 9000), a validation every 1000 steps. */
function runLog(steps: number, lossOf: (step: number) => number, from = 1): string {
  let text = from === 1 ? entry({ event: 'start', step: 0, config: { method: 'cm' } }) : entry({ event: 'resume', step: from - 1, epoch: 0 });
  for (let step = from; step <= steps; step++) {
    text += entry({ event: 'step', step, epoch: 0, lr: 0.001, loss: lossOf(step), ce: [lossOf(step) / 2, lossOf(step) / 2], stepMs: 12.5 });
    if (step % 1000 === 0) text += entry({ event: 'validation', step, epoch: 0, score: step / (steps + 1), cmError: 0.5 });
  }
  return text;
}

/** The log's steps and losses, and validations' steps and scores, as Python's json reads the file. */
function pythonTruth(log: string): { steps: number[]; losses: number[]; validations: number[][] } {
  return runPythonJson(
    `
import json, sys
steps, losses, validations = [], [], []
for line in open(sys.argv[1]):
    if not line.strip(): continue
    e = json.loads(line)
    if e['event'] == 'step': steps.append(e['step']); losses.append(e['loss'])
    if e['event'] == 'validation': validations.append([e['step'], e['score']])
print(json.dumps({'steps': steps, 'losses': losses, 'validations': validations}))
`,
    [log],
  );
}

function summary(events: Record<string, unknown>[]): { steps: number[]; losses: number[]; validations: number[][] } {
  const steps = events.filter((e) => e.event === 'step');
  return {
    steps: steps.map((e) => e.step as number),
    losses: steps.map((e) => e.loss as number),
    validations: events.filter((e) => e.event === 'validation').map((e) => [e.step as number, e.score as number]),
  };
}

/** A resume from step `kept`'s checkpoint, as trainer.ts's truncateAfter does it: the log cut in place after that step, then appended to. */
function resumeInPlace(log: string, kept: number, appended: string): void {
  const text = fs.readFileSync(log, 'utf8');
  const cutAt = text.indexOf('\n', text.indexOf(`"step":${kept},`)) + 1;
  const fd = fs.openSync(log, 'r+');
  fs.ftruncateSync(fd, Buffer.byteLength(text.slice(0, cutAt)));
  fs.closeSync(fd);
  fs.appendFileSync(log, appended);
}

t.test('curves read while a resume cuts the log and appends: read again, drawn as the log now is', { skip }, async (t) => {
  const dir = tempDir(t, 'cmseg-leftovers-curves-');
  const log = path.join(dir, 'train-log.jsonl');
  fs.writeFileSync(log, runLog(12000, (s) => 1 / s));
  t.ok(fs.statSync(log).size > 1.2 * (1 << 20), 'more than one 1 MiB piece');
  // The resume runs from step 100's checkpoint, with another loss, its lines longer (a field
  // more): the log grows, and the reader's next piece starts inside a line.
  const sizeBefore = fs.statSync(log).size;
  const resumed = runLog(12000, (s) => 2 + 1 / s, 101).replace(/"lr":0.001/g, '"lr":0.001,"resumedFrom":100');
  let resumes = 0;
  const attempts = new Set<number>();
  const events = readCurvesEvents(log, {
    visited: (line, attempt) => {
      attempts.add(attempt);
      if (attempt === 1 && line === 10) {
        resumes++;
        resumeInPlace(log, 100, resumed);
      }
    },
  });
  t.equal(resumes, 1);
  t.same([...attempts], [1, 2], 'read twice');
  t.ok(fs.statSync(log).size > sizeBefore, 'the log is longer after the resume (its first read failed to parse, it was not found shorter)');
  const truth = pythonTruth(log);
  t.equal(truth.steps.length, 12000);
  t.ok(truth.losses[150] > 2, "the resume's losses are in the log now");
  t.same(summary(events), truth, 'the log as it is after the resume');
});

t.test('curves read while a resume cuts the log (nothing appended yet): the cut entries are not drawn', { skip }, async (t) => {
  const dir = tempDir(t, 'cmseg-leftovers-curves-');
  const log = path.join(dir, 'train-log.jsonl');
  fs.writeFileSync(log, runLog(12000, (s) => 1 / s));
  const events = readCurvesEvents(log, {
    visited: (line, attempt) => {
      if (attempt === 1 && line === 10) resumeInPlace(log, 100, '');
    },
  });
  const truth = pythonTruth(log);
  t.same(truth.steps, Array.from({ length: 100 }, (_, i) => i + 1), 'the log keeps steps 1..100');
  t.same(summary(events), truth, 'steps 101.. (cut) are not drawn');
});

t.test('a log broken for good is still reported: at once when it did not change, after the bounded attempts when it keeps changing', async (t) => {
  const dir = tempDir(t, 'cmseg-leftovers-curves-');
  const log = path.join(dir, 'train-log.jsonl');
  fs.writeFileSync(log, runLog(5, (s) => 1 / s) + 'not json\n' + runLog(8, (s) => 1 / s, 6));
  const seen = new Set<number>();
  t.throws(() => readCurvesEvents(log, { visited: (_line, attempt) => void seen.add(attempt) }), { name: 'UserError', message: /train-log\.jsonl line 7 is not a training log entry/ });
  t.same([...seen], [1], 'an unchanged log is read once');
  // A live run keeps appending: the broken line stays, reported after CURVES_READ_ATTEMPTS reads.
  seen.clear();
  let error: unknown;
  try {
    readCurvesEvents(log, {
      visited: (line, attempt) => {
        seen.add(attempt);
        if (line === 1) fs.appendFileSync(log, entry({ event: 'step', step: 100 + attempt, loss: 0.1 }));
      },
    });
  } catch (e) {
    error = e;
  }
  t.ok(error instanceof UserError && /line 7 is not a training log entry/.test(error.message), String(error));
  t.same([...seen], Array.from({ length: CURVES_READ_ATTEMPTS }, (_, i) => i + 1), `read ${CURVES_READ_ATTEMPTS} times, then reported`);
  // writeRunCurves reports it as before.
  await t.rejects(writeRunCurves(dir), { name: 'UserError', message: /line 7 is not a training log entry/ });
});
