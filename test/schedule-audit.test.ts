// Audit of the training schedules and the trainer loop against independent truth:
// torch.optim.lr_scheduler for every schedule over budgets that do not split evenly, the
// logged loss against CE + (+/-) lambda * trace by hand at the warm-up's end, bitwise resume
// after a crash at any step (AdamW, step schedule, warm-up), and what the trainer must refuse
// before it writes anything: a training source whose epoch is no whole number of batches,
// and settings a JavaScript caller misspelled (which were silently ignored).
import t from 'tap';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { Rng } from '../src/data/random';
import { readCheckpoint } from '../src/model/checkpoint';
import { AnnotatedSet, InMemorySource, TrainingSource } from '../src/train/data';
import { ProgressReporter } from '../src/train/progress';
import { METHOD_NAMES, methodDefinition } from '../src/train/methods';
import { learningRate, LrSchedule } from '../src/train/schedule';
import { readTrainLog, train, TRAIN_DEFAULTS, TrainConfig } from '../src/train/trainer';
import { missingPythonModules, runPythonJson } from './helpers/python';

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cmseg-schedule-audit-'));
t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));

function tinySet(count = 8, size = 8): AnnotatedSet {
  const rng = new Rng(1);
  const V = size * size;
  const images = new Float32Array(count * V);
  const labels = [0, 1].map(() => new Uint8Array(count * V));
  for (let i = 0; i < count * V; i++) {
    const c = rng.int(2);
    images[i] = c + 0.3 * rng.normal();
    labels[0][i] = c;
    labels[1][i] = rng.int(2);
  }
  return { count, channels: 1, classes: 2, spatial: [size, size], images, labels, present: new Uint8Array(count * 2).fill(1), annotatorNames: ['a', 'b'] };
}
const set = tinySet();

const config = (over: Record<string, unknown> = {}): TrainConfig =>
  ({
    ...TRAIN_DEFAULTS,
    method: 'cm',
    depth: 2,
    baseChannels: 2,
    batchSize: 3, // 2 batches an epoch (the last 2 images dropped)
    steps: 7,
    schedule: { kind: 'step', lr: 1e-2, gamma: 0.5, stepSize: 2 },
    optimizer: 'adamw',
    weightDecay: 0.1,
    lambda: 0.3,
    lambdaWarmup: 0.1,
    warmupSteps: 3,
    augment: { flips: true, rotations: true },
    seed: 5,
    ...over,
  }) as TrainConfig;

const SCHEDULERS = `
import json, sys, torch
out = []
for c in json.loads(sys.argv[1]):
    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = torch.optim.SGD([p], lr=c['lr'])
    T = c['T']
    k = c['kind']
    if k == 'constant': s = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0)
    if k == 'step': s = torch.optim.lr_scheduler.StepLR(opt, step_size=c['stepSize'], gamma=c['gamma'])
    if k == 'cosine': s = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=T, eta_min=c['minLr'])
    if k == 'poly': s = torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=T, power=c['power'])
    rates = []
    for i in range(T + 1):  # the T steps of the run and the end-of-run rate
        rates.append(opt.param_groups[0]['lr'])
        opt.step(); s.step()
    out.append(rates)
print(json.dumps(out))
`;

t.test('every schedule equals torch.optim.lr_scheduler at every step, budgets 1, 7 and 10 included', { skip: missingPythonModules('torch') }, async (t) => {
  const cases: (LrSchedule & { T: number })[] = [];
  for (const T of [1, 7, 10]) {
    cases.push({ kind: 'constant', lr: 0.02, T });
    cases.push({ kind: 'step', lr: 0.1, gamma: 0.3, stepSize: 4, T });
    cases.push({ kind: 'step', lr: 0.1, gamma: 0.1, stepSize: Math.ceil(T / 3), T }); // the default step size written out
    cases.push({ kind: 'cosine', lr: 0.01, minLr: 0.001, T });
    cases.push({ kind: 'cosine', lr: 0.01, minLr: 0, T });
    cases.push({ kind: 'poly', lr: 0.01, power: 0.9, T });
    cases.push({ kind: 'poly', lr: 0.01, power: 2, T });
  }
  const torch = runPythonJson<number[][]>(SCHEDULERS, [JSON.stringify(cases)]);
  for (const [i, c] of cases.entries()) {
    const { T, ...schedule } = c;
    // The default step size (a third of the run) must give what the explicit one gives.
    const ours = (s: LrSchedule) => torch[i].map((_, step) => learningRate(s, step, T));
    const mine = ours(c.kind === 'step' && c.gamma === 0.1 ? { kind: 'step', lr: c.lr } : schedule);
    const worst = Math.max(...mine.map((r, k) => Math.abs(r - torch[i][k]) / Math.max(1e-300, Math.abs(torch[i][k]))));
    t.ok(worst < 1e-9 || mine.every((r, k) => Math.abs(r - torch[i][k]) < 1e-15), `${JSON.stringify(c)}: largest relative difference ${worst.toExponential(1)}`);
  }
});

t.test('the logged loss is CE - lambdaWarmup * trace for exactly warmupSteps steps, then CE + lambda * trace', async (t) => {
  const r = await train(path.join(dir, 'warm'), config({ steps: 5, warmupSteps: 3 }), new InMemorySource(set, 1));
  const steps = readTrainLog(r.files.log).filter((e) => e.event === 'step');
  t.equal(steps.length, 5);
  const f32 = (x: number) => Math.fround(x);
  for (const e of steps) {
    const step = e.step as number;
    const weight = step <= 3 ? -f32(0.1) : f32(0.3);
    t.equal(e.traceWeight, weight, `step ${step}: trace weight ${weight}`);
    const ce = (e.ce as number[]).reduce((a, b) => a + b, 0);
    const trace = (e.trace as number[]).reduce((a, b) => a + b, 0);
    const byHand = ce + weight * trace;
    t.ok(Math.abs((e.loss as number) - byHand) < 1e-6 * Math.abs(byHand), `step ${step}: loss ${e.loss} = CE ${ce} + ${weight} * trace ${trace}`);
  }
});

t.test('a run that crashed after a checkpoint at any step resumes bitwise: weights, Adam moments, rates, trace weights', async (t) => {
  const validate = async () => ({ score: 0.5, metrics: {} });
  const full = await train(path.join(dir, 'full'), config({ checkpointEvery: 1 }), new InMemorySource(set, 1), { validate });
  const a = await readCheckpoint(full.files.last);
  const rows = (log: string) =>
    readTrainLog(log)
      .filter((e) => e.event === 'step')
      .map((e) => [e.step, e.lr, e.traceWeight]);
  // Throwing from the progress reporter after step n's log line, as a killed process would
  // stop: `last` holds step n - 1 (checkpointEvery 1, or the epoch end).
  const crashAt = (n: number): ProgressReporter => ({
    start() {},
    step(s) {
      if (s === n) throw new Error('crash');
    },
    epoch() {},
    stop() {},
  });
  for (const at of [1, 3, 4]) {
    const out = path.join(dir, `crash-${at}`);
    await t.rejects(train(out, config({ checkpointEvery: 1 }), new InMemorySource(set, 1), { validate, progress: crashAt(at + 1) }), /crash/);
    const resumed = await train(out, config({ checkpointEvery: 1 }), new InMemorySource(set, 1), { validate, resume: true });
    t.equal(resumed.startStep, at);
    const b = await readCheckpoint(resumed.files.last);
    t.equal(b.step, 7);
    let differing = 0;
    for (const [name, w] of Object.entries(a.weights)) w.forEach((x, i) => (differing += x === b.weights[name][i] ? 0 : 1));
    for (const [name, m] of Object.entries(a.moments!.m)) m.forEach((x, i) => (differing += x === b.moments!.m[name][i] && a.moments!.v[name][i] === b.moments!.v[name][i] ? 0 : 1));
    t.equal(differing, 0, `crashed after step ${at}: bitwise the same weights and moments`);
    t.same(rows(resumed.files.log), rows(full.files.log), `crashed after step ${at}: the same rates and trace weights`);
  }
});

/** An in-memory source that reports `batches` batches an epoch (a caller's own source). */
function sourceWith(batches: number): TrainingSource {
  const inner = new InMemorySource(set, 1);
  return {
    ndim: 2,
    channels: 1,
    classes: 2,
    annotatorNames: inner.annotatorNames,
    hasConsensus: false,
    batchesPerEpoch: () => batches,
    batch: (epoch, index, batchSize) => inner.batch(epoch, index, batchSize),
  };
}

t.test('a training source whose epoch is not a whole number >= 1 of batches is refused before anything is written', async (t) => {
  // floor(count / batchSize) of a set smaller than a batch is 0: the run "completed" at
  // once with no step and no checkpoint (its result named a last.safetensors that did not
  // exist); 2.5 trained 5 steps for 2 epochs with epochs of 3 and 2 batches.
  for (const [k, batches] of [0, 2.5, NaN, -1].entries()) {
    for (const budget of [{ epochs: 2, steps: undefined }, { steps: 3 }]) {
      const out = path.join(dir, `batches-${k}-${Object.keys(budget)[0]}`);
      await t.rejects(train(out, config(budget), sourceWith(batches)), {
        name: 'TrainingError',
        message: `the training source gives ${batches} batches per epoch (batch size 3); it must be a whole number >= 1`,
      });
      t.notOk(fs.existsSync(out), `${batches} batches, ${JSON.stringify(budget)}: no run folder made`);
    }
  }
});

t.test('misspelled or misplaced settings of a new run are refused by name, not silently ignored', async (t) => {
  const refused = async (over: Record<string, unknown>, message: string) => {
    const out = path.join(dir, `typo-${Object.keys(over).join('-')}-${JSON.stringify(over).length}`);
    await t.rejects(train(out, config(over), new InMemorySource(set, 1)), { name: 'TrainingError', message }, JSON.stringify(over));
    t.notOk(fs.existsSync(out), 'no run folder made');
  };
  // torch's name for the cosine floor: trained down to 0 instead of 1e-3.
  await refused({ schedule: { kind: 'cosine', lr: 1e-2, eta_min: 1e-3 } }, "schedule has no setting 'eta_min' (cosine takes kind, lr, minLr)");
  // A setting of another schedule: the user believes the rate steps down.
  await refused({ schedule: { kind: 'cosine', lr: 1e-2, gamma: 0.5 } }, "schedule has no setting 'gamma' (cosine takes kind, lr, minLr)");
  await refused({ schedule: { kind: 'constant', lr: 1e-2, minLr: 0 } }, "schedule has no setting 'minLr' (constant takes kind, lr)");
  // The learning rate belongs in the schedule: at the top level it trained at the default 1e-3.
  await refused({ lr: 0.5 }, "the settings have no 'lr' (the learning rate is schedule.lr)");
  await refused({ weight_decay: 0.1 }, "the settings have no 'weight_decay'");
  // What the trainer itself and the presets write is accepted (a key left undefined says
  // nothing, so it is no typo), and a finished run resumes.
  const out = path.join(dir, 'typo-free');
  const r = await train(out, config({ steps: 2, epochs: undefined, note: undefined, schedule: { kind: 'poly', lr: 1e-2, power: 0.9, minLr: undefined } }), new InMemorySource(set, 1));
  t.equal(r.state.step, 2);
  const again = await train(out, config({ steps: 2, schedule: { kind: 'poly', lr: 1e-2, power: 0.9 } }), new InMemorySource(set, 1), { resume: true });
  t.equal(again.startStep, 2);
});

t.test('settings only the engine checked are refused by name as TrainingError before the run folder is made', async (t) => {
  // These reached createModel after the run folder was made: a plain Error naming the
  // engine's key (optimizer.weightDecay, loss.lambdaWarmup) and an empty folder left behind;
  // bf16 'false' (a string) turned bfloat16 on.
  const cases: [Record<string, unknown>, string][] = [
    [{ weightDecay: Infinity }, 'weight decay Infinity must be a finite number >= 0'],
    [{ lambdaWarmup: -1 }, 'lambda-warmup -1 must be a finite number >= 0 (the warm-up negates it itself)'],
    [{ lambdaWarmup: NaN }, 'lambda-warmup NaN must be a finite number >= 0 (the warm-up negates it itself)'],
    [{ lambdaWarmup: '0.1' }, 'lambda-warmup "0.1" must be a finite number >= 0 (the warm-up negates it itself)'],
    [{ device: 'gpu' }, 'device "gpu" must be cpu, cuda or auto'],
    [{ cmInit: 'random' }, 'cm-init "random" must be identity or uniform'],
    [{ bf16: 'false' }, 'bf16 "false" must be true or false'],
  ];
  for (const [k, [over, message]] of cases.entries()) {
    const out = path.join(dir, `engine-${k}`);
    const [[key, value]] = Object.entries(over);
    await t.rejects(train(out, config(over), new InMemorySource(set, 1)), { name: 'TrainingError', message }, `${key} ${String(value)}`);
    t.notOk(fs.existsSync(out), `${key} ${String(value)}: no run folder made`);
  }
});

t.test('a diverging run (learning rate 1e10) fails saying NaN, divergence and the step; its last checkpoint stays finite', async (t) => {
  // One batch an epoch: `last` is saved after step 1, whose update blew the weights up so
  // that step 2's forward pass overflows. The error read "is -nan: beyond 1.8e+19 its square
  // overflows float32" (no overflow of the gradient; no step named).
  const out = path.join(dir, 'diverged');
  await t.rejects(train(out, config({ batchSize: 8, steps: 5, schedule: { kind: 'constant', lr: 1e10 } }), new InMemorySource(set, 1)), {
    message: /^the gradient of \S+\[\d+\] is NaN \(not a number\): the model diverged, its outputs or loss overflowed; lower the learning rate or lambda \(the weights were left unchanged\) \(while taking step 2 of 5, epoch 2\)$/,
  });
  const last = await readCheckpoint(path.join(out, 'last.safetensors'));
  t.equal(last.step, 1, 'last holds step 1');
  const nonFinite = Object.values(last.weights).reduce((n, w) => n + w.filter((x) => !Number.isFinite(x)).length, 0);
  t.equal(nonFinite, 0, 'its weights are finite numbers');
  t.same(
    readTrainLog(path.join(out, 'train-log.jsonl')).filter((e) => e.event === 'step').map((e) => e.step),
    [1],
    'no step past the failed one logged',
  );
});

t.test("the progress line of an epoch shows the epoch's mean loss, CE and trace (it showed its last batch's)", async (t) => {
  const shown: { step: number; loss: number; ce: number; trace: number }[] = [];
  const progress: ProgressReporter = { start() {}, step() {}, epoch: (step, f) => void shown.push({ step, loss: f.loss, ce: f.ce, trace: f.trace }), stop() {} };
  const r = await train(path.join(dir, 'epoch-means'), config({ steps: 5 }), new InMemorySource(set, 1), { progress });
  const steps = readTrainLog(r.files.log).filter((e) => e.event === 'step');
  const sum = (xs: number[]) => xs.reduce((a, b) => a + b, 0);
  // Epochs of 2 batches: steps 1-2, 3-4, and the budget ends after step 5.
  const epochs = [[1, 2], [3, 4], [5]];
  t.same(shown.map((s) => s.step), [2, 4, 5]);
  for (const [k, members] of epochs.entries()) {
    const rows = steps.filter((e) => members.includes(e.step as number));
    const mean = (f: (e: Record<string, unknown>) => number) => sum(rows.map(f)) / rows.length;
    const expected = { loss: mean((e) => e.loss as number), ce: mean((e) => sum(e.ce as number[])), trace: mean((e) => sum(e.trace as number[])) };
    for (const key of ['loss', 'ce', 'trace'] as const) {
      t.ok(Math.abs(shown[k][key] - expected[key]) < 1e-12 * Math.abs(expected[key]), `epoch ${k + 1} ${key}: ${shown[k][key]} is the mean ${expected[key]}`);
    }
  }
});

t.test("a method named like an Object property ('constructor', 'toString', '__proto__') is an unknown method, refused before anything is written", async (t) => {
  // `name in METHODS` found them on Object.prototype: the run started (folder, log, model)
  // and failed at its first step with "batch must be an object".
  for (const name of ['constructor', 'toString', '__proto__']) {
    t.throws(() => methodDefinition(name), { name: 'RangeError', message: `unknown method ${JSON.stringify(name)}; choose one of ${METHOD_NAMES.join(', ')}` });
    const out = path.join(dir, `method-${name}`);
    await t.rejects(train(out, config({ method: name }), new InMemorySource(set, 1)), { message: /^unknown method/ }, name);
    t.notOk(fs.existsSync(out), `${name}: no run folder made`);
  }
});

t.test('a schedule whose rate leaves float32 within the run is refused before anything is written', async (t) => {
  // The engine keeps the rate in float32: a step schedule growing by gamma 1e20 failed at
  // step 3 (after two steps, log lines and the folder) with "optimizer.lr is 1e+40, outside
  // the float range", and a base rate of 1e39 after the folder was made.
  const cases: [LrSchedule, string | RegExp][] = [
    [{ kind: 'step', lr: 1, gamma: 1e20, stepSize: 1 }, 'the schedule reaches a learning rate of 1e+40 at step 3 of 7, beyond float32 (3.4e38): the engine could not use it'],
    [{ kind: 'constant', lr: 1e39 }, 'the schedule reaches a learning rate of 1e+39 at step 1 of 7, beyond float32 (3.4e38): the engine could not use it'],
    [{ kind: 'cosine', lr: 1, minLr: 1e300 }, /^the schedule reaches a learning rate of 4\.\d+e\+298 at step 2 of 7, beyond float32/],
  ];
  for (const [k, [schedule, message]] of cases.entries()) {
    const out = path.join(dir, `float-${k}`);
    await t.rejects(train(out, config({ schedule }), new InMemorySource(set, 1)), { name: 'TrainingError', message }, JSON.stringify(schedule));
    t.notOk(fs.existsSync(out), `${JSON.stringify(schedule)}: no run folder made`);
  }
});
