// Resuming runs (h-resume audit): settings that only look different (a default spelled out on
// one side, the length as epochs or the same number of steps) or only say when `last` is saved
// (checkpointEvery) resume; settings that change what is trained are refused by name; a run
// stopped anywhere (abort, SIGINT, SIGKILL of the CLI) and resumed ends with the weights of a
// run never stopped; a config missing a required setting is refused before anything is written.
// Tiny models on tiny sets.
import t from 'tap';
import { spawn } from 'child_process';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { readCheckpoint } from '../src/model/checkpoint';
import { backendInfo, setNumThreads } from '../src/model/model';
import { InMemorySource } from '../src/train/data';
import { readTrainerState, readTrainLog, train, TRAIN_DEFAULTS, TrainConfig } from '../src/train/trainer';
import { runCli } from './helpers/cli';
import { squaresSet } from './helpers/squares';

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cmseg-resume-audit-'));
// One engine thread throughout: a resume is bit for bit the run never stopped on the same thread
// count (another count changes the float sums' order, and Adam carries such differences on).
setNumThreads(1);
t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));

const set = squaresSet();
const source = () => new InMemorySource(set, 1);
/** 4 batches an epoch, 2 epochs (8 steps), a cosine schedule and a trace warm-up. */
const config = (over: Partial<TrainConfig> = {}): TrainConfig => ({
  ...TRAIN_DEFAULTS,
  method: 'cm',
  depth: 2,
  baseChannels: 4,
  batchSize: 2,
  epochs: 2,
  schedule: { kind: 'cosine', lr: 3e-3 },
  warmupSteps: 3,
  augment: { flips: true, rotations: true },
  seed: 5,
  ...over,
});
// One parameter: a quick validator, so `last` is written at the cadence alone (a validator
// declaring none may take progress and gets a save before each validation too).
const validate = async (_model: unknown) => ({ score: 0.5, metrics: {} });

/** Aborts the run after `step` steps, as SIGINT does in the CLI. */
function stopAfter(step: number) {
  const controller = new AbortController();
  return { signal: controller.signal, progress: { start() {}, step: (s: number) => void (s === step && controller.abort()), epoch() {}, stop() {} } };
}

/** The largest difference between two checkpoints' tensors (weights and Adam moments), Infinity if their names differ. */
async function largestDifference(a: string, b: string): Promise<number> {
  const [wa, wb] = [(await readCheckpoint(a)).weights, (await readCheckpoint(b)).weights];
  if (Object.keys(wa).sort().join() !== Object.keys(wb).sort().join()) return Infinity;
  let worst = 0;
  for (const [name, x] of Object.entries(wa)) for (let i = 0; i < x.length; i++) worst = Math.max(worst, Math.abs(x[i] - wb[name][i]));
  return worst;
}

let uninterrupted: Promise<string> | undefined;
/** `last` of the run never stopped. */
const fullRunLast = () =>
  (uninterrupted ??= train(path.join(dir, 'full'), config(), source(), { validate }).then(async (r) => {
    await r.model.dispose();
    return r.files.last;
  }));

t.test('a resume with settings that only look different (defaults spelled out, steps for epochs) continues exactly', async (t) => {
  const expected = await fullRunLast();
  // bf16 false (absent in the run), lambdaWarmup equal to lambda (its default), the cosine's
  // minLr 0 (its default), and 8 steps for the run's 2 epochs of 4 batches.
  const spelled = config({ bf16: false, lambdaWarmup: 0.01, schedule: { kind: 'cosine', lr: 3e-3, minLr: 0 }, epochs: undefined, steps: 8 });
  const out = path.join(dir, 'spelled');
  const first = await train(out, config(), source(), { validate, ...stopAfter(3) });
  await first.model.dispose();
  t.equal(first.status, 'interrupted');
  const resumed = await train(out, spelled, source(), { validate, resume: true });
  await resumed.model.dispose();
  t.equal(resumed.status, 'completed');
  t.equal(resumed.startStep, 3);
  t.equal(resumed.state.step, 8);
  t.equal(await largestDifference(resumed.files.last, expected), 0, 'the weights and Adam moments of the run never stopped');
  // The checkpoint keeps the run's own settings (as it started), not the caller's spelling.
  t.same((await readTrainerState(resumed.files.last)).config, JSON.parse(JSON.stringify(config())));

  // And the other way round: a run started with the defaults spelled out resumes without them.
  const out2 = path.join(dir, 'spelled-first');
  const second = await train(out2, spelled, source(), { validate, ...stopAfter(5) });
  await second.model.dispose();
  const again = await train(out2, config(), source(), { validate, resume: true });
  await again.model.dispose();
  t.equal(again.state.step, 8);
  t.equal(await largestDifference(again.files.last, expected), 0);
});

t.test('a resume may change checkpointEvery: last is saved at the new cadence, the training is the same', async (t) => {
  const expected = await fullRunLast();
  const out = path.join(dir, 'cadence');
  const first = await train(out, config(), source(), { validate, ...stopAfter(1) });
  await first.model.dispose();
  const resumed = await train(out, config({ checkpointEvery: 2 }), source(), { validate, resume: true });
  await resumed.model.dispose();
  t.equal(resumed.state.step, 8);
  t.equal(await largestDifference(resumed.files.last, expected), 0, 'the weights of the run never stopped');
  const log = readTrainLog(resumed.files.log);
  // Steps 2 and 6 (every 2nd step inside an epoch) besides the epoch ends 4 and 8; 1: the abort.
  t.same(log.filter((e) => e.event === 'checkpoint' && e.kind === 'last').map((e) => e.step), [1, 2, 4, 6, 8]);
  t.same(log.find((e) => e.event === 'resume')?.settings, { checkpointEvery: 2 }, 'the resume logs the changed setting');
  t.equal((await readTrainerState(resumed.files.last)).config.checkpointEvery, 2, 'and later resumes keep it');
  // What the rounding depends on besides the settings, with the start and the resume.
  for (const event of ['start', 'resume']) {
    const runtime = log.find((e) => e.event === event)?.runtime as Record<string, unknown> | undefined;
    t.equal(runtime?.threads, 1, `${event}: the thread count`);
    t.equal(runtime?.onednnBuilt, backendInfo().onednn, `${event}: whether oneDNN is built`);
    t.equal(runtime?.CMSEG_ONEDNN, process.env.CMSEG_ONEDNN ?? null, `${event}: its switch`);
  }
});

t.test('a resume with settings that change the training is refused, naming each difference', async (t) => {
  const out = path.join(dir, 'refused');
  const first = await train(out, config(), source(), { validate, ...stopAfter(2) });
  await first.model.dispose();
  const last = path.join(out, 'last.safetensors').replace(/[.]/g, '\\.');
  const refused = (over: Partial<TrainConfig>, message: string) =>
    t.rejects(train(out, config(over), source(), { resume: true }), { name: 'TrainingError', message: new RegExp(`^cannot resume ${last} with different settings: ${message}$`) });
  await refused({ lambdaWarmup: 0.02 }, 'lambdaWarmup: 0\\.01 in the checkpoint, 0\\.02 now');
  await refused({ validateEvery: 2 }, 'validateEvery: 1 in the checkpoint, 2 now');
  await refused({ schedule: { kind: 'cosine', lr: 3e-3, minLr: 1e-4 } }, 'schedule\\.minLr: 0 in the checkpoint, 0\\.0001 now');
  // Another kind is one difference, not one per setting of either kind.
  await refused({ schedule: { kind: 'step', lr: 3e-3 } }, 'schedule: \\{"kind":"cosine","lr":0\\.003,"minLr":0\\} in the checkpoint, \\{"kind":"step","lr":0\\.003,"gamma":0\\.1,"stepSize":3\\} now');
  // A longer run has another cosine: its first steps would not have been these.
  await refused({ epochs: 3 }, 'epochs: 2 in the checkpoint, 3 now \\(a resumed run keeps its length: the learning-rate schedule and the epochs follow from it, so a longer run would not have taken the steps taken so far\\)');
  await refused({ bf16: true }, 'bf16: false in the checkpoint, true now');
  t.equal((await readTrainerState(path.join(out, 'last.safetensors'))).state.step, 2, 'the run is left as it was');
  t.equal((await train(out, config(), source(), { resume: true }).then(async (r) => (await r.model.dispose(), r.state.step))), 8, 'and still resumes');
});

t.test('a config missing a required setting is refused by name before anything is written', async (t) => {
  const out = path.join(dir, 'partial');
  const { validateEvery: _v, baseChannels: _b, ...partial } = config();
  await t.rejects(train(out, partial as TrainConfig, source(), { validate }), {
    name: 'TrainingError',
    message: "the settings lack 'baseChannels', 'validateEvery' (start from {...TRAIN_DEFAULTS, method, epochs or steps}, or a preset's train settings)",
  });
  t.notOk(fs.existsSync(out), 'no run folder made');
});

t.test('train --resume: a repeated default, --steps for the run\'s epochs and another --checkpoint-every are accepted', async (t) => {
  // mnist-tiny: 64 training images in batches of 16 (4 steps an epoch); lambda 0.01, no --lambda-warmup.
  const base = ['--preset', 'mnist-tiny', '--epochs', '3', '--no-test', '--threads', '1'];
  const full = await runCli(['train', ...base, '-q', '--out', 'cli-full'], dir);
  t.equal(full.exitCode, 0, full.stderr);
  let sent = false;
  const stopped = await runCli(['train', ...base, '--out', 'cli-run'], dir, (chunk) => {
    // Ctrl-C after the first epoch's line: the run stops after step 4 of 12.
    if (!sent && /epoch 1\//.test(chunk)) (sent = true), process.emit('SIGINT', 'SIGINT');
  });
  t.equal(stopped.exitCode, 130, stopped.stderr);
  t.match(stopped.stdout, /interrupted at step 4\/12/);
  const r = await runCli(['train', '--out', 'cli-run', '--resume', '--lambda-warmup', '0.01', '--steps', '12', '--checkpoint-every', '1', '--no-test', '-q'], dir);
  t.equal(r.exitCode, 0, r.stderr);
  t.match(r.stdout, /trained cm from step 4 to 12/);
  t.equal(await largestDifference(path.join(dir, 'cli-run', 'last.safetensors'), path.join(dir, 'cli-full', 'last.safetensors')), 0, 'the weights of the run never stopped');
  const saves = readTrainLog(path.join(dir, 'cli-run', 'train-log.jsonl')).filter((e) => e.event === 'checkpoint' && e.kind === 'last');
  t.same(saves.map((e) => e.step), [4, 5, 6, 7, 8, 9, 10, 11, 12], '`last` saved after every step once resumed');
  // A length that is not the run's, and a warm-up weight other than the run's lambda, are refused.
  const longer = await runCli(['train', '--out', 'cli-run', '--resume', '--steps', '16', '-q'], dir);
  t.equal(longer.exitCode, 1);
  t.match(longer.stderr, /^cmseg: error: cannot resume .*cli-run.last\.safetensors with different settings: steps 16 \(the run has 12\) \(a resumed run keeps its length: .*\)\n$/);
  const warm = await runCli(['train', '--out', 'cli-run', '--resume', '--lambda-warmup', '0.5', '-q'], dir);
  t.equal(warm.exitCode, 1);
  t.match(warm.stderr, /with different settings: lambdaWarmup 0\.5 \(the run has 0\.01\)\n$/);
});

/**
 * `cmseg train ...args --out out` from the TypeScript sources in a child process, sent `signal`
 * once its log shows step `atStep` (it lands wherever the run is by then). Resolves with the
 * exit code and output once the child has ended.
 */
async function stoppedChild(args: string[], out: string, signal: NodeJS.Signals, atStep: number) {
  const loader = process.execArgv.filter((a) => a.includes('typescript'));
  const child = spawn(process.execPath, [...loader, path.resolve(__dirname, '../src/cli/main.ts'), 'train', ...args, '--out', out], {
    cwd: dir,
    env: { ...process.env, TS_NODE_TRANSPILE_ONLY: '1' },
  });
  let [stdout, stderr] = ['', ''];
  child.stdout.on('data', (b) => (stdout += b));
  child.stderr.on('data', (b) => (stderr += b));
  const log = path.join(dir, out, 'train-log.jsonl');
  const poll = setInterval(() => {
    const text = fs.existsSync(log) ? fs.readFileSync(log, 'utf8') : '';
    if (text.includes(`"event":"step","step":${atStep},`)) clearInterval(poll), child.kill(signal);
  }, 2);
  const code = await new Promise<number | null>((resolve) => child.on('close', resolve));
  clearInterval(poll);
  return { code, stdout, stderr };
}

const stepLosses = (log: string) => readTrainLog(log).filter((e) => e.event === 'step').map((e) => [e.step, e.loss]);

t.test('the CLI stopped at a random step (SIGINT, or SIGKILL between checkpoints) resumes to the weights of a run never stopped', async (t) => {
  const base = ['--preset', 'mnist-tiny', '--steps', '40', '--no-test', '--threads', '1'];
  const full = await runCli(['train', ...base, '-q', '--out', 'child-full'], dir);
  t.equal(full.exitCode, 0, full.stderr);
  const fullLast = path.join(dir, 'child-full', 'last.safetensors');
  const fullLog = stepLosses(path.join(dir, 'child-full', 'train-log.jsonl'));

  for (const signal of ['SIGINT', 'SIGKILL'] as const) {
    const out = `child-${signal}`;
    // SIGKILL saves nothing: `last` is where the last save left it (every 3 steps, and epoch ends).
    const extra = signal === 'SIGKILL' ? ['--checkpoint-every', '3'] : [];
    const atStep = 5 + Math.floor(Math.random() * 25);
    const stopped = await stoppedChild([...base, ...extra], out, signal, atStep);
    const at = (await readTrainerState(path.join(dir, out, 'last.safetensors'))).state.step;
    const what = `${signal} at step ${atStep}, last at step ${at}`;
    if (signal === 'SIGINT') {
      t.equal(stopped.code, 130, `${what}: ${stopped.stderr}`);
      t.match(stopped.stdout, new RegExp(`interrupted at step ${at}/40`), what);
    } else {
      t.equal(stopped.code, null, `${what}: killed`);
    }
    t.ok(at < 40 && at >= (signal === 'SIGINT' ? atStep : atStep - 3), `${what}: stopped where it was sent`);
    const resumed = await runCli(['train', '--out', out, '--resume', '--no-test', '-q'], dir);
    t.equal(resumed.exitCode, 0, `${what}: ${resumed.stderr}`);
    t.equal(await largestDifference(path.join(dir, out, 'last.safetensors'), fullLast), 0, `${what}: the weights and Adam moments of the run never stopped`);
    // Every step once in the log (those the killed process logged past `last` dropped), with the same losses.
    t.same(stepLosses(path.join(dir, out, 'train-log.jsonl')), fullLog, `${what}: the log's steps`);
  }
});

t.test('a default that follows another setting is not a second difference when neither side gives it', async (t) => {
  const out = path.join(dir, 'derived');
  const first = await train(out, config({ schedule: { kind: 'step', lr: 3e-3 } }), source(), { ...stopAfter(1) });
  await first.model.dispose();
  const last = path.join(out, 'last.safetensors').replace(/[.]/g, '\\.');
  // lambdaWarmup follows lambda (0.01 -> 0.5), stepSize a third of the length (3 -> 4): only the settings given are named.
  await t.rejects(train(out, config({ lambda: 0.5, schedule: { kind: 'step', lr: 3e-3 } }), source(), { resume: true }), {
    message: new RegExp(`^cannot resume ${last} with different settings: lambda: 0\\.01 in the checkpoint, 0\\.5 now$`),
  });
  await t.rejects(train(out, config({ epochs: 3, schedule: { kind: 'step', lr: 3e-3 } }), source(), { resume: true }), {
    message: new RegExp(`^cannot resume ${last} with different settings: epochs: 2 in the checkpoint, 3 now \\(a resumed run keeps its length: .*\\)$`),
  });
  // Given on one side, the derived value is compared: 0.01 (lambda) in the run, 0.02 asked.
  await t.rejects(train(out, config({ lambdaWarmup: 0.02, schedule: { kind: 'step', lr: 3e-3, stepSize: 3 } }), source(), { resume: true }), {
    message: new RegExp(`with different settings: lambdaWarmup: 0\\.01 in the checkpoint, 0\\.02 now$`),
  });
});

t.test('a BraTS run whose cache train prepared into it resumes with the same command line after its folder moved', async (t) => {
  const phantom = await runCli(['phantom', 'brats', '--cases', '3', '--out', 'bdata', '--size', '16,16,16', '--seed', '2', '--quiet'], dir);
  t.equal(phantom.exitCode, 0, phantom.stderr);
  const args = ['--preset', 'brats3d', '--data', 'bdata', '--steps', '4', '--steps-per-epoch', '2', '--patch', '8', '--depth', '2', '--base-channels', '2', '--val-cases', '1', '--workers', '0', '--no-test', '--threads', '1'];
  let sent = false;
  const stopped = await runCli(['train', ...args, '--out', 'brun'], dir, (chunk) => {
    if (!sent && /epoch 1\//.test(chunk)) (sent = true), process.emit('SIGINT', 'SIGINT');
  });
  t.equal(stopped.exitCode, 130, stopped.stderr);
  t.ok(fs.existsSync(path.join(dir, 'brun', 'cache', 'index.json')), 'the BraTS folder was prepared into the run folder');
  fs.renameSync(path.join(dir, 'brun'), path.join(dir, 'brun-moved'));
  // The same command line (--data the BraTS folder), at the new place: it reads the run's own cache.
  const resumed = await runCli(['train', ...args, '--out', 'brun-moved', '--resume', '-q'], dir);
  t.equal(resumed.exitCode, 0, resumed.stderr);
  t.match(resumed.stdout, /trained cm from step 2 to 4/);
  const run = (await readTrainerState(path.join(dir, 'brun-moved', 'last.safetensors'))).run as { dataset: { cache: string } };
  t.equal(run.dataset.cache, path.join(dir, 'brun-moved', 'cache'), 'the checkpoint names the cache where it is now');
  t.notOk(fs.existsSync(path.join(dir, 'brun')), 'nothing written at the old place');
});

t.test("a resume that does not pass hooks.run keeps the run's description of its data in the checkpoints", async (t) => {
  // What `cmseg train` records (the preset and data set), which --resume, eval and predict read back.
  const recipe = { preset: 'mnist-tiny', dataset: { kind: 'mnist', train: 64, validation: 32, test: 32, labels: 'dense', dataSeed: 0 } };
  const out = path.join(dir, 'recipe');
  const first = await train(out, config(), source(), { run: recipe, ...stopAfter(2) });
  await first.model.dispose();
  const resumed = await train(out, config(), source(), { resume: true });
  await resumed.model.dispose();
  t.equal(resumed.state.step, 8);
  t.same((await readTrainerState(resumed.files.last)).run, recipe, 'last still says how to rebuild the data');
  // Given again (e.g. a cache that moved), the caller's description is recorded.
  const out2 = path.join(dir, 'recipe-moved');
  const moved = { ...recipe, dataset: { ...recipe.dataset, dataSeed: 0, note: 'moved' } };
  await (await train(out2, config(), source(), { run: recipe, ...stopAfter(2) })).model.dispose();
  await (await train(out2, config(), source(), { run: moved, resume: true })).model.dispose();
  t.same((await readTrainerState(path.join(out2, 'last.safetensors'))).run, moved);
});

t.test('a new run refuses augmentation settings it does not read, as it refuses other unknown settings', async (t) => {
  const out = path.join(dir, 'augment-typo');
  // torchvision-style names: nothing scales or rotates by 15 degrees here; the run would go on without them.
  const over = { augment: { flips: true, rotations: false, scale: 0.1, rotation: 15 } } as unknown as Partial<TrainConfig>;
  await t.rejects(train(out, config(over), source()), { name: 'TrainingError', message: "augment has no setting 'scale', 'rotation' (it takes flips, rotations)" });
  t.notOk(fs.existsSync(out), 'no run folder made');
});
