// Resume and `best` bookkeeping (h-leftovers): a run whose best.safetensors went missing (deleted,
// cut short, replaced) before a resume writes a new one at its next validation and says so;
// settings a method never reads do not refuse a resume (and are shown to change nothing a fresh
// run trains), while those that matter still do. Tiny models on tiny sets.
import t from 'tap';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { readCheckpoint } from '../src/model/checkpoint';
import { setNumThreads } from '../src/model/model';
import { InMemorySource } from '../src/train/data';
import { readTrainerState, readTrainLog, train, TRAIN_DEFAULTS, TrainConfig } from '../src/train/trainer';
import { runCli } from './helpers/cli';
import { squaresSet } from './helpers/squares';
import { captureStderr } from './helpers/stderr';

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cmseg-leftovers-resume-'));
setNumThreads(1);
t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));

const set = squaresSet();
const source = () => new InMemorySource(set, 1);
/** 4 batches an epoch, 3 epochs (12 steps). */
const config = (over: Partial<TrainConfig> = {}): TrainConfig => ({
  ...TRAIN_DEFAULTS,
  method: 'cm',
  depth: 2,
  baseChannels: 4,
  batchSize: 2,
  epochs: 3,
  schedule: { kind: 'constant', lr: 3e-3 },
  seed: 3,
  ...over,
});
/** Validation scores by epoch: the first epoch is the best of the run (0.9), then 0.5 and 0.6. */
const SCORES = [0.9, 0.5, 0.6];
const validate = async (model: { config: unknown }) => {
  void model;
  return { score: SCORES[validated++ % 3], metrics: {} };
};
let validated = 0;

/** Aborts the run after `step` steps, as SIGINT does in the CLI. */
function stopAfter(step: number) {
  const controller = new AbortController();
  return { signal: controller.signal, progress: { start() {}, step: (s: number) => void (s === step && controller.abort()), epoch() {}, stop() {} } };
}


/** The largest difference between two checkpoints' tensors whose names pass `keep`, Infinity if the names differ. */
async function largestDifference(a: string, b: string, keep = (_name: string) => true): Promise<number> {
  const [wa, wb] = [(await readCheckpoint(a)).weights, (await readCheckpoint(b)).weights];
  const names = (w: Record<string, Float32Array>) => Object.keys(w).filter(keep).sort().join();
  if (names(wa) !== names(wb)) return Infinity;
  let worst = 0;
  for (const [name, x] of Object.entries(wa)) if (keep(name)) for (let i = 0; i < x.length; i++) worst = Math.max(worst, Math.abs(x[i] - wb[name][i]));
  return worst;
}

t.test('train(): a resume whose best.safetensors is gone writes a new best at the next validation, and says so', async (t) => {
  const out = path.join(dir, 'gone');
  validated = 0;
  // Epoch 1 (steps 1-4) validates at 0.9: best at step 4; stopped at step 5.
  const first = await train(out, config(), source(), { validate, ...stopAfter(5) });
  await first.model.dispose();
  t.equal(first.status, 'interrupted');
  t.same(first.state.best, { score: 0.9, epoch: 0, step: 4 });
  fs.rmSync(path.join(out, 'best.safetensors'));
  const { value: result, stderr } = await captureStderr(() => train(out, config(), source(), { validate, resume: true }));
  await result.model.dispose();
  t.equal(result.status, 'completed');
  t.match(stderr, /^note: .*best\.safetensors, the run's best \(validation score 0\.9 at epoch 1, step 4\), is gone: the remembered best score starts again, so the next validation writes a new best\.safetensors \(the best of the validations from step 5 on\)\n$/);
  // The validations after the resume scored 0.5 (step 8) and 0.6 (step 12): the best of them is step 12's.
  t.ok(result.files.best && fs.existsSync(result.files.best), 'a best checkpoint is there again, and reported');
  t.same(result.state.best, { score: 0.6, epoch: 2, step: 12 });
  const best = await readTrainerState(path.join(out, 'best.safetensors'));
  t.equal(best.state.step, 12, 'best.safetensors holds the model of step 12');
  t.equal(await largestDifference(path.join(out, 'best.safetensors'), path.join(out, 'last.safetensors')), 0, 'the weights of step 12 (last)');
  const log = readTrainLog(path.join(out, 'train-log.jsonl'));
  const resume = log.find((e) => e.event === 'resume');
  t.match(resume?.note, /best\.safetensors.*is gone/, 'the log says it with the resume');
  const after = log.slice(log.indexOf(resume!));
  t.same(after.filter((e) => e.event === 'checkpoint' && e.kind === 'best').map((e) => e.step), [8, 12], 'best written at step 8 (0.5 beats nothing) and 12 (0.6)');
});

t.test('train(): a best.safetensors cut short, or holding another model, is replaced at the next validation', async (t) => {
  for (const damage of ['cut', 'other'] as const) {
    const out = path.join(dir, `damaged-${damage}`);
    validated = 0;
    const first = await train(out, config(), source(), { validate, ...stopAfter(5) });
    await first.model.dispose();
    const bestFile = path.join(out, 'best.safetensors');
    if (damage === 'cut') fs.truncateSync(bestFile, 100);
    // Another model as best: the `last` of step 5 (no best of its own at step 4, step 5 <= 5).
    else fs.copyFileSync(path.join(out, 'last.safetensors'), bestFile), fs.writeFileSync(bestFile, rewriteBest(fs.readFileSync(bestFile)));
    const { value: result, stderr } = await captureStderr(() => train(out, config(), source(), { validate, resume: true }));
    await result.model.dispose();
    t.match(stderr, damage === 'cut' ? /best\.safetensors, the run's best .*, cannot be read \(.*\): the remembered best score starts again/ : /holds another model \(of step 5, best score 0\.1\)/, damage);
    t.same(result.state.best, { score: 0.6, epoch: 2, step: 12 }, damage);
    t.equal((await readTrainerState(bestFile)).state.step, 12, `${damage}: the model of step 12 replaced it`);
  }
});

/** A checkpoint's bytes with its trainer state's best score set to 0.1 (the header is JSON after an 8-byte length). */
function rewriteBest(bytes: Buffer): Buffer {
  const n = Number(bytes.readBigUInt64LE(0));
  const header = JSON.parse(bytes.subarray(8, 8 + n).toString('utf8'));
  const extra = JSON.parse(header.__metadata__.extra);
  extra.state.best.score = 0.1;
  header.__metadata__.extra = JSON.stringify(extra);
  let text = JSON.stringify(header);
  // Keep the header's length (offsets of the data follow it): pad with spaces, as the format allows.
  if (text.length > n) throw new Error('header grew');
  text = text.padEnd(n, ' ');
  return Buffer.concat([bytes.subarray(0, 8), Buffer.from(text, 'utf8'), bytes.subarray(8 + n)]);
}

t.test('train(): a best written just before a crash (before `last` of that step) is the run\'s: no note, and written again alike', async (t) => {
  const out = path.join(dir, 'crash');
  validated = 0;
  const first = await train(out, config(), source(), { validate, ...stopAfter(2) });
  await first.model.dispose();
  const lastAt2 = fs.readFileSync(path.join(out, 'last.safetensors'));
  validated = 0;
  const second = await train(out, config(), source(), { validate, resume: true, ...stopAfter(4) });
  await second.model.dispose();
  t.equal(second.state.step, 4);
  // The crash: best of step 4 written, `last` of step 4 not (the file still holds step 2).
  fs.writeFileSync(path.join(out, 'last.safetensors'), lastAt2);
  const bestAt4 = fs.readFileSync(path.join(out, 'best.safetensors'));
  validated = 0;
  const { value: result, stderr } = await captureStderr(() => train(out, config(), source(), { validate, resume: true, ...stopAfter(4) }));
  await result.model.dispose();
  t.equal(stderr, '', 'no note: the file holds a later best, which the resumed run takes again');
  t.same(result.state.best, { score: 0.9, epoch: 0, step: 4 });
  t.ok(result.files.best, 'reported');
  const weights = async (b: Buffer) => (fs.writeFileSync(path.join(dir, 'tmp.safetensors'), b), (await readCheckpoint(path.join(dir, 'tmp.safetensors'))).weights);
  const [before, after] = [await weights(bestAt4), (await readCheckpoint(path.join(out, 'best.safetensors'))).weights];
  t.same(Object.keys(after).filter((k) => before[k].some((x, i) => x !== after[k][i])), [], 'the same model of step 4');
});

t.test('train(): a complete run resumed again after its best was deleted reports no best', async (t) => {
  const out = path.join(dir, 'complete');
  validated = 0;
  const first = await train(out, config(), source(), { validate });
  await first.model.dispose();
  t.same(first.state.best, { score: 0.9, epoch: 0, step: 4 });
  fs.rmSync(path.join(out, 'best.safetensors'));
  const logBefore = fs.readFileSync(path.join(out, 'train-log.jsonl'), 'utf8');
  const { value: result, stderr } = await captureStderr(() => train(out, config(), source(), { validate, resume: true }));
  await result.model.dispose();
  t.equal(result.startStep, 12);
  t.match(stderr, /^note: .*best\.safetensors, the run's best \(validation score 0\.9 at epoch 1, step 4\), is gone: the run is complete, so no validation will write another: use last\.safetensors\n$/);
  t.equal(result.state.best, null, 'no best: the score recorded was of a model that is gone');
  t.equal(result.files.best, undefined);
  t.equal(fs.readFileSync(path.join(out, 'train-log.jsonl'), 'utf8'), logBefore, 'the finished log is left as it was');
});

t.test('train(): a resume without hooks.validate, its best deleted, says that no best will be written', async (t) => {
  const out = path.join(dir, 'novalidate');
  validated = 0;
  const first = await train(out, config(), source(), { validate, ...stopAfter(5) });
  await first.model.dispose();
  fs.rmSync(path.join(out, 'best.safetensors'));
  const { value: result, stderr } = await captureStderr(() => train(out, config(), source(), { resume: true }));
  await result.model.dispose();
  t.equal(result.status, 'completed');
  t.match(stderr, /is gone: this resume validates nothing \(no hooks\.validate\), so none will be written: use last\.safetensors\n$/);
  t.equal(result.state.best, null);
  t.equal(result.files.best, undefined);
  t.notOk(fs.existsSync(path.join(out, 'best.safetensors')));
});

t.test('cmseg train --resume after best.safetensors was deleted: the note, a new best, and the JSON', async (t) => {
  const base = ['--preset', 'mnist-tiny', '--epochs', '3', '--no-test', '--threads', '1'];
  let sent = false;
  const stopped = await runCli(['train', ...base, '--out', 'cli'], dir, (chunk) => {
    if (!sent && /epoch 1\//.test(chunk)) (sent = true), process.emit('SIGINT', 'SIGINT');
  });
  t.equal(stopped.exitCode, 130, stopped.stderr);
  const bestFile = path.join(dir, 'cli', 'best.safetensors');
  t.ok(fs.existsSync(bestFile));
  fs.rmSync(bestFile);
  const r = await runCli(['train', '--out', 'cli', '--resume', '--json', '-q'], dir);
  t.equal(r.exitCode, 0, r.stderr);
  t.match(r.stderr, /note: .*best\.safetensors, the run's best \(validation score [\d.]+ at epoch 1, step 4\), is gone: the remembered best score starts again/);
  const json = JSON.parse(r.stdout);
  t.equal(json.files.best, bestFile, 'the JSON names the new best');
  t.ok(fs.existsSync(bestFile));
  // The best of the validations after the resume (steps 8 and 12), read from the log by hand.
  const validations = readTrainLog(path.join(dir, 'cli', 'train-log.jsonl')).filter((e) => e.event === 'validation' && (e.step as number) > 4);
  const top = validations.reduce((a, b) => ((b.score as number) > (a.score as number) ? b : a));
  t.equal(json.best.score, top.score);
  t.equal((await readTrainerState(bestFile)).state.step, top.step);
  // The complete run resumed again, its best deleted again: no best is claimed.
  fs.rmSync(bestFile);
  const again = await runCli(['train', '--out', 'cli', '--resume', '--json', '-q'], dir);
  t.equal(again.exitCode, 0, again.stderr);
  t.match(again.stderr, /is gone: the run is complete, so no validation will write another: use last\.safetensors/);
  const j2 = JSON.parse(again.stdout);
  t.equal(j2.best, null);
  t.equal(j2.files.best, null);
  // Its log deleted too: a complete run resumed writes none, so none is named as an output.
  fs.rmSync(path.join(dir, 'cli', 'train-log.jsonl'));
  const noLog = await runCli(['train', '--out', 'cli', '--resume', '--json', '-q'], dir);
  t.equal(noLog.exitCode, 0, noLog.stderr);
  t.equal(JSON.parse(noLog.stdout).files.log, null);
  t.notOk(fs.existsSync(path.join(dir, 'cli', 'train-log.jsonl')));
  const text = await runCli(['train', '--out', 'cli', '--resume', '-q'], dir);
  t.equal(text.exitCode, 0, text.stderr);
  t.notMatch(text.stdout, /training log/, 'no training log listed among the outputs');
});

t.test('train(): settings the method never reads change nothing a fresh run trains', async (t) => {
  // Two fresh runs of each method, one with the settings it ignores changed: every weight the
  // method trains (all but the untrained CM heads `cm.*` of the methods without CMs) is equal.
  const cases: [TrainConfig['method'], Partial<TrainConfig>, (name: string) => boolean][] = [
    ['naive-mode', { lambda: 0.7, lambdaWarmup: 0.3, warmupSteps: 5, cmRank: 3, cmInit: 'uniform' }, (n) => !n.startsWith('cm.')],
    ['oracle', { lambda: 0.7, warmupSteps: 5, cmRank: 2 }, (n) => !n.startsWith('cm.')],
    ['naive-mean', { lambda: 0.7, lambdaWarmup: 0.2, warmupSteps: 5, cmInit: 'uniform' }, (n) => !n.startsWith('cm.')],
    ['cm-notrace', { lambda: 0.7, lambdaWarmup: 0.3, warmupSteps: 5, cmRank: 2 }, () => true],
    ['cm', { cmRank: 4 }, () => true],
    ['cm-global', { cmRank: 4, cmHeadBlocks: 2 }, () => true],
  ];
  const withConsensus = new InMemorySource({ ...set, consensus: set.labels[0] }, 1);
  for (const [method, changed, trained] of cases) {
    const files: string[] = [];
    for (const [k, over] of [{}, changed].entries()) {
      const r = await train(path.join(dir, `fresh-${method}-${k}`), config({ method, epochs: 1, ...over }), withConsensus);
      await r.model.dispose();
      files.push(r.files.last);
    }
    t.equal(await largestDifference(files[0], files[1], trained), 0, `${method}: ${Object.keys(changed).join(', ')} change nothing trained`);
  }
  // cmHeadBlocks is not ignored by a method without CMs: its (untrained) head blocks take the
  // random numbers that then start the decoder, so the trained network differs.
  const blocks: string[] = [];
  for (const b of [0, 1]) {
    const r = await train(path.join(dir, `fresh-blocks-${b}`), config({ method: 'naive-mode', epochs: 1, cmHeadBlocks: b }), withConsensus);
    await r.model.dispose();
    blocks.push(r.files.last);
  }
  t.ok((await largestDifference(blocks[0], blocks[1], (n) => n.startsWith('up.'))) > 0, 'naive-mode: cmHeadBlocks changes the decoder');
});

t.test('train() resume: settings the method ignores are no difference (the run keeps its own); those it reads refuse', async (t) => {
  const withConsensus = () => new InMemorySource({ ...set, consensus: set.labels[0] }, 1);
  const accepted: [TrainConfig['method'], Partial<TrainConfig>][] = [
    ['naive-mode', { lambda: 0.7, lambdaWarmup: 0.3, warmupSteps: 5, cmRank: 3, cmInit: 'uniform' }],
    ['oracle', { lambda: 0.7, cmRank: 2 }],
    ['cm-notrace', { lambda: 0.7, warmupSteps: 2 }],
    ['cm', { cmRank: 4 }],
    ['cm-global', { cmHeadBlocks: 2, cmRank: 2 }],
  ];
  for (const [method, over] of accepted) {
    const full = await train(path.join(dir, `full-${method}`), config({ method, epochs: 2 }), withConsensus());
    await full.model.dispose();
    const out = path.join(dir, `resumed-${method}`);
    const first = await train(out, config({ method, epochs: 2 }), withConsensus(), stopAfter(3));
    await first.model.dispose();
    const r = await train(out, config({ method, epochs: 2, ...over }), withConsensus(), { resume: true });
    await r.model.dispose();
    t.equal(r.status, 'completed', method);
    t.equal(await largestDifference(r.files.last, full.files.last), 0, `${method}: the run never stopped`);
    const kept = (await readTrainerState(r.files.last)).config as unknown as Record<string, unknown>;
    const recorded = config({ method, epochs: 2 }) as unknown as Record<string, unknown>;
    t.same(Object.fromEntries(Object.keys(over).map((k) => [k, kept[k]])), Object.fromEntries(Object.keys(over).map((k) => [k, recorded[k]])), `${method}: the run keeps its recorded values`);
  }
  const refused: [TrainConfig['method'], Partial<TrainConfig>, RegExp][] = [
    ['cm', { lambda: 0.7 }, /with different settings: lambda: 0\.01 in the checkpoint, 0\.7 now$/],
    ['cm', { warmupSteps: 2 }, /warmupSteps: 0 in the checkpoint, 2 now/],
    ['cm', { cmInit: 'uniform' }, /cmInit: "identity" in the checkpoint, "uniform" now/],
    ['cm-lowrank', { cmRank: 2 }, /cmRank: 1 in the checkpoint, 2 now/],
    ['naive-mode', { cmHeadBlocks: 1 }, /cmHeadBlocks: 0 in the checkpoint, 1 now/],
    ['naive-mode', { batchSize: 4, lambda: 0.7 }, /with different settings: batchSize: 2 in the checkpoint, 4 now$/],
    // Another method: the method is the difference, and lambda too (the new method reads it).
    ['naive-mode', { method: 'cm', lambda: 0.7 }, /^(?=.*method: "naive-mode" in the checkpoint, "cm" now)(?=.*lambda: 0\.01 in the checkpoint, 0\.7 now)/],
  ];
  for (const [method, over, message] of refused) {
    const out = path.join(dir, `refused-${method}-${Object.keys(over).join('-')}`);
    const first = await train(out, config({ method, epochs: 2 }), withConsensus(), stopAfter(3));
    await first.model.dispose();
    await t.rejects(train(out, config({ method, epochs: 2, ...over }), withConsensus(), { resume: true }), { name: 'TrainingError', message }, `${method} ${JSON.stringify(over)}`);
  }
});
