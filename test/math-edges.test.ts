// The training math at its edges (SPEC section 4, the optimiser, the learning-rate
// schedules), each against an independent truth:
// - the CM loss, CE_r and T_r recomputed here in float64 from predict()'s p and CMs, for
//   full, lowrank and global CMs, classes 2 and 8, sizes that leave a scalar tail after the
//   8-pixel vector pass, unlabelled pixels, an image nobody labelled, absent annotators, an
//   annotator with no labelled pixel, lambda 0 and 1000, and the negated warm-up trace;
// - the gradients at those edges against the PyTorch reference (scripts/torch_reference.py,
//   float64), and exactly zero where nothing is labelled;
// - plain cross-entropy (`target`) with 255 and classes 8, from predict()'s p;
// - Adam / AdamW over steps whose settings change in between (setOptimizer), against
//   torch.optim.Adam / AdamW fed the same gradients; get/setOptimizerState round trips;
// - every schedule at every step against the PyTorch scheduler it follows, and
//   learningRate() refusing what would give a NaN, negative or infinite rate.
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { spawnSync } from 'child_process';
import t from 'tap';
import { createModel, learningRate, Model, type CmMode, type LrSchedule, type OptimizerOptions } from '../src/index';
import { writeSafetensors, type SafeArray } from '../src/data/safetensors';
import { missingPythonModules, PYTHON, runPythonJson } from './helpers/python';
import { relativeError, runTorchReference } from './helpers/torch-parity';

const noTorch = missingPythonModules('torch', 'safetensors', 'numpy');

function rng(seed: number) {
  let s = seed >>> 0;
  return () => (s = (s * 1664525 + 1013904223) >>> 0) / 4294967296;
}

interface Case {
  images: Float32Array;
  shape: number[];
  labels: Uint8Array[];
  present: Uint8Array;
}

/** Random images, labels with ~20% unlabelled pixels, everyone present. */
function randomCase(seed: number, n: number, spatial: number[], L: number, R: number): Case {
  const rand = rng(seed);
  const V = spatial.reduce((a, b) => a * b, 1);
  const images = new Float32Array(n * V).map(() => rand() * 2 - 1);
  const labels = Array.from({ length: R }, () => new Uint8Array(n * V).map(() => (rand() < 0.2 ? 255 : Math.floor(rand() * L))));
  return { images, shape: [n, 1, ...spatial], labels, present: new Uint8Array(n * R).fill(1) };
}

/**
 * SPEC section 4 in float64 from the model's own p [N, L, V] and CMs [N, R, L, L, V]:
 * CE_r over the labelled pixels of present images, T_r over every pixel of present images,
 * both 0 for an annotator without a labelled pixel; loss = sum CE_r + w * sum T_r.
 */
async function handLoss(model: Model, x: Case, traceWeight: number) {
  const { classes: L, annotators: R } = model.config;
  const pred = await model.predict(x.images, x.shape, { cms: true });
  const [n, , ...spatial] = x.shape;
  const V = spatial.reduce((a, b) => a * b, 1);
  const p = pred.probs;
  const A = pred.cms!;
  const ce: number[] = [];
  const trace: number[] = [];
  for (let r = 0; r < R; r++) {
    let nll = 0;
    let labelled = 0;
    let tr = 0;
    let pixels = 0;
    for (let i = 0; i < n; i++) {
      if (!x.present[i * R + r]) continue;
      for (let v = 0; v < V; v++) {
        const a = (row: number, col: number) => A[((((i * R + r) * L + row) * L + col) * V) + v];
        for (let k = 0; k < L; k++) tr += a(k, k);
        pixels++;
        const c = x.labels[r][i * V + v];
        if (c === 255) continue;
        let q = 0;
        for (let j = 0; j < L; j++) q += a(c, j) * p[(i * L + j) * V + v];
        nll -= Math.log(Math.max(q, 1e-12));
        labelled++;
      }
    }
    ce.push(labelled ? nll / labelled : 0);
    trace.push(labelled ? tr / pixels : 0);
  }
  const loss = ce.reduce((a, b) => a + b, 0) + traceWeight * trace.reduce((a, b) => a + b, 0);
  return { loss, ce, trace };
}

const close = (a: number, b: number, rel = 1e-5, abs = 1e-6) => Math.abs(a - b) <= Math.max(abs, rel * Math.abs(b));

// Labels of the edge cases: image 0 unlabelled by everyone (all 255, but present), annotator 1
// absent from image 1 (so it has no labelled pixel at all), annotator 2 labelling nothing.
function edgeCase(seed: number, L: number): Case {
  const x = randomCase(seed, 2, [5, 7], L, 3);
  const V = 35;
  for (const l of x.labels) l.fill(255, 0, V);
  x.present[1 * 3 + 1] = 0;
  x.labels[2].fill(255);
  return x;
}

const modes: CmMode[] = ['full', 'lowrank', 'global'];

t.test('the CM loss, CE_r and T_r equal SPEC section 4 recomputed from p and the CMs', async (t) => {
  for (const cmMode of modes)
    for (const L of [2, 8]) {
      const settings = [
        { what: 'lambda 0.3, 5x3 (vector tail)', loss: { lambda: 0.3 }, x: randomCase(1, 2, [5, 3], L, 3), weight: 0.3 },
        { what: 'lambda 0.3, 23x23 (two chunks)', loss: { lambda: 0.3 }, x: randomCase(2, 2, [23, 23], L, 3), weight: 0.3 },
        { what: 'lambda 0', loss: { lambda: 0 }, x: randomCase(3, 2, [5, 7], L, 3), weight: 0 },
        { what: 'lambda 1000', loss: { lambda: 1000 }, x: randomCase(4, 2, [5, 7], L, 3), weight: 1000 },
        { what: 'warm-up', loss: { lambda: 0.1, lambdaWarmup: 0.5, warmupSteps: 2 }, x: randomCase(5, 2, [5, 7], L, 3), weight: -0.5 },
        { what: 'unlabelled image, absent annotators', loss: { lambda: 0.2 }, x: edgeCase(6, L), weight: 0.2 },
      ];
      for (const s of settings) {
        const model = createModel({ classes: L, annotators: 3, depth: 1, baseChannels: 3, cmMode, cmRank: 2, seed: 3, loss: s.loss });
        const got = await model.evaluate(s.x);
        const want = await handLoss(model, s.x, s.weight);
        const name = `${cmMode} L${L} ${s.what}`;
        t.ok(close(got.traceWeight, s.weight, 1e-7), `${name}: trace weight ${got.traceWeight}`);
        t.ok(close(got.loss, want.loss), `${name}: loss ${got.loss} vs ${want.loss}`);
        t.ok(got.ce.every((c, r) => close(c, want.ce[r])), `${name}: CE ${got.ce} vs ${want.ce}`);
        t.ok(got.trace.every((c, r) => close(c, want.trace[r])), `${name}: trace ${got.trace} vs ${want.trace}`);
        if (s.what.startsWith('unlabelled')) t.same([got.ce[1], got.ce[2], got.trace[1], got.trace[2]], [0, 0, 0, 0], `${name}: annotators without labels add nothing`);
      }
    }
});

t.test('the warm-up negates the trace for exactly the first warmupSteps optimiser steps', async (t) => {
  const x = randomCase(7, 2, [8, 8], 3, 2);
  const model = createModel({ classes: 3, annotators: 2, depth: 2, baseChannels: 4, loss: { lambda: 0.1, lambdaWarmup: 0.4, warmupSteps: 2 } });
  const weights: number[] = [];
  for (let i = 0; i < 4; i++) {
    t.equal((await model.evaluate(x)).traceWeight, weights.length < 2 ? Math.fround(-0.4) : Math.fround(0.1), `evaluate before step ${i + 1}`);
    weights.push((await model.trainStep(x)).traceWeight);
  }
  t.same(weights, [-0.4, -0.4, 0.1, 0.1].map(Math.fround));
});

t.test('nothing labelled: loss 0 and every gradient exactly 0, so Adam leaves the weights as they were', async (t) => {
  for (const cmMode of modes)
    for (const what of ['every voxel 255', 'nobody present']) {
      const x = randomCase(8, 2, [8, 8], 8, 2);
      if (what === 'every voxel 255') for (const l of x.labels) l.fill(255);
      else x.present.fill(0);
      const model = createModel({ classes: 8, annotators: 2, depth: 2, baseChannels: 4, cmMode, loss: { lambda: 0.5 }, optimizer: { lr: 0.1 } });
      const before = model.getWeights();
      const r = await model.trainStep(x);
      t.same([r.loss, ...r.ce, ...r.trace], [0, 0, 0, 0, 0], `${cmMode}, ${what}: loss terms`);
      const nonzero = Object.entries(model.getGradients()).filter(([, g]) => g.some((v) => v !== 0)).map(([k]) => k);
      t.same(nonzero, [], `${cmMode}, ${what}: no gradient`);
      const after = model.getWeights();
      t.ok(Object.keys(before).every((k) => before[k].every((w, i) => w === after[k][i])), `${cmMode}, ${what}: weights unchanged`);
    }
});

t.test('gradients at the edges equal the PyTorch reference', { skip: noTorch }, async (t) => {
  for (const cmMode of modes) {
    const cases = [
      { what: 'classes 8, 5x3 (vector tail), lambda 1000', L: 8, loss: { lambda: 1000 }, x: randomCase(9, 2, [5, 3], 8, 3) },
      { what: 'classes 2, unlabelled image and absent annotators, warm-up', L: 2, loss: { lambda: 0.1, lambdaWarmup: 0.7, warmupSteps: 1 }, x: edgeCase(10, 2) },
    ];
    for (const c of cases) {
      const model = createModel({ classes: c.L, annotators: 3, depth: 1, baseChannels: 3, cmMode, cmRank: 2, seed: 4, loss: c.loss });
      const ref = await runTorchReference(model, c.x, 0);
      const got = await model.computeGradients(c.x);
      const refLoss = (ref.loss.data as Float64Array)[0];
      t.ok(close(got.loss, refLoss), `${cmMode} ${c.what}: loss ${got.loss} vs ${refLoss}`);
      let worst = 0;
      let worstName = '';
      for (const [name, g] of Object.entries(model.getGradients())) {
        const e = relativeError(g, ref[`grad.${name}`].data as Float32Array, 1e-9);
        if (e > worst) (worst = e), (worstName = name);
      }
      t.ok(worst < 1e-4, `${cmMode} ${c.what}: worst gradient ${worstName} ${worst.toExponential(2)}`);
    }
  }
});

t.test('the global CM gradient of a large image is as accurate as every other gradient', { skip: noTorch }, async (t) => {
  // 512 x 512 pixels (a 64^3 BraTS patch has as many): the gradient of gcm.r sums one term a
  // pixel; summed in float32 along each thread's pixels it was off by ~7e-5 on 2 threads (4.8e-4
  // at 1024 x 1024) while every other gradient stays near 1e-6.
  const H = 512;
  const rand = rng(15);
  const images = new Float32Array(H * H).map(() => rand() * 2 - 1);
  // Labels that follow the image: every pixel's term pushes the same way, as in training.
  const labels = [0, 1].map(() => images.map((v) => (v > 0.3 ? 2 : v > -0.3 ? 1 : 0))).map((l) => Uint8Array.from(l));
  const x = { images, shape: [1, 1, H, H], labels, present: new Uint8Array([1, 1]) };
  const model = createModel({ classes: 3, annotators: 2, depth: 1, baseChannels: 2, cmMode: 'global', seed: 1, loss: { lambda: 0.01 } });
  const ref = await runTorchReference(model, x, 0);
  await model.computeGradients(x);
  const grads = model.getGradients();
  for (const name of ['gcm.0', 'gcm.1', 'seg.bias']) {
    const e = relativeError(grads[name], ref[`grad.${name}`].data as Float32Array);
    t.ok(e < 1e-5, `${name}: relative error ${e.toExponential(2)}`);
  }
});

t.test('plain cross-entropy (target, softTarget) with unlabelled pixels, classes 8, equals -mean log p from predict', async (t) => {
  const L = 8;
  const x = randomCase(11, 2, [5, 3], L, 1);
  const target = x.labels[0];
  const model = createModel({ classes: L, annotators: 1, depth: 1, baseChannels: 3 });
  const { probs } = await model.predict(x.images, x.shape);
  let nll = 0;
  let count = 0;
  for (let i = 0; i < 2; i++)
    for (let v = 0; v < 15; v++) {
      const c = target[i * 15 + v];
      if (c === 255) continue;
      nll -= Math.log(probs[(i * L + c) * 15 + v]);
      count++;
    }
  const got = await model.computeGradients({ images: x.images, shape: x.shape, target });
  t.ok(close(got.loss, nll / count), `loss ${got.loss} vs ${nll / count}`);
  const hardGrads = model.getGradients();
  // The same pixels as one-hot soft rows (zero rows where unlabelled): the same loss and gradients.
  const oneHot = new Float32Array(2 * L * 15);
  for (let i = 0; i < 2; i++) for (let v = 0; v < 15; v++) if (target[i * 15 + v] !== 255) oneHot[(i * L + target[i * 15 + v]) * 15 + v] = 1;
  const soft = await model.computeGradients({ images: x.images, shape: x.shape, softTarget: oneHot });
  t.ok(close(soft.loss, nll / count), `one-hot soft rows: loss ${soft.loss} vs ${nll / count}`);
  const softGrads = model.getGradients();
  t.ok(Object.keys(hardGrads).every((k) => relativeError(softGrads[k], hardGrads[k], 1e-9) < 1e-6), 'one-hot soft rows: the gradients of target');
  // Random soft rows (each sums to 1) with some zero rows: -sum t log p over the labelled pixels.
  const rand = rng(14);
  const rows = new Float32Array(2 * L * 15);
  let softNll = 0;
  let softCount = 0;
  for (let i = 0; i < 2; i++)
    for (let v = 0; v < 15; v++) {
      if (rand() < 0.3) continue;
      const w = Array.from({ length: L }, () => rand());
      const sum = w.reduce((a, b) => a + b, 0);
      for (let k = 0; k < L; k++) {
        rows[(i * L + k) * 15 + v] = w[k] / sum;
        softNll -= rows[(i * L + k) * 15 + v] * Math.log(probs[(i * L + k) * 15 + v]);
      }
      softCount++;
    }
  const random = await model.evaluate({ images: x.images, shape: x.shape, softTarget: rows });
  t.ok(close(random.loss, softNll / softCount), `soft rows: loss ${random.loss} vs ${softNll / softCount}`);
  const none = await model.computeGradients({ images: x.images, shape: x.shape, target: new Uint8Array(30).fill(255) });
  t.equal(none.loss, 0, 'nothing labelled: loss 0');
  t.ok(Object.values(model.getGradients()).every((g) => g.every((v) => v === 0)), 'nothing labelled: every gradient 0');
  const noneSoft = await model.computeGradients({ images: x.images, shape: x.shape, softTarget: new Float32Array(2 * L * 15) });
  t.equal(noneSoft.loss, 0, 'soft rows all zero: loss 0');
  t.ok(Object.values(model.getGradients()).every((g) => g.every((v) => v === 0)), 'soft rows all zero: every gradient 0');
});

// torch.optim.Adam and AdamW sharing one state (step, exp_avg, exp_avg_sq), each step with the
// settings cmseg used and cmseg's gradient; from cmseg's weights before each step, the relative
// error of the weight change, worst over the parameters.
const OPTIM_PY = `
import json, sys, torch
from safetensors.torch import load_file
d = load_file(sys.argv[1]); plan = json.load(open(sys.argv[2]))
names = plan['names']
params = [torch.nn.Parameter(d['w0.' + n].double().clone()) for n in names]
adam = torch.optim.Adam(params); adamw = torch.optim.AdamW(params)
adamw.state = adam.state
errors = []
for s, cfg in enumerate(plan['steps']):
    opt = adam if cfg['kind'] == 'adam' else adamw
    g = opt.param_groups[0]
    g.update(lr=cfg['lr'], betas=(cfg['beta1'], cfg['beta2']), eps=cfg['eps'], weight_decay=cfg['weightDecay'])
    with torch.no_grad():
        for n, p in zip(names, params): p.copy_(d[f'w{s}.' + n].double())
    for n, p in zip(names, params): p.grad = d[f'g{s}.' + n].double()
    opt.step()
    worst = 0.0
    for n, p in zip(names, params):
        prev = d[f'w{s}.' + n].double()
        theirs = p.detach() - prev; ours = d[f'w{s + 1}.' + n].double() - prev
        if theirs.norm() > 0: worst = max(worst, float((ours - theirs).norm() / theirs.norm()))
        elif ours.norm() > 0: worst = float('inf')
    errors.append(worst)
print(json.dumps(errors))
`;

t.test('Adam and AdamW with settings changed between steps equal torch.optim over the same gradients', { skip: noTorch }, async (t) => {
  const model = createModel({ classes: 3, annotators: 2, depth: 2, baseChannels: 4, seed: 2, loss: { lambda: 0.1 } });
  const x = randomCase(12, 2, [8, 8], 3, 2);
  x.present[1 * 2 + 0] = 0; // annotator 0's head sees zero gradients from image 1
  const full = { beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 0 };
  const plan: Required<OptimizerOptions>[] = [
    { ...full, kind: 'adam', lr: 1e-2 }, // bias correction at step 1
    { ...full, kind: 'adam', lr: 5e-3, weightDecay: 0.1 }, // L2 in the gradient
    { ...full, kind: 'adamw', lr: 5e-3, weightDecay: 0.1 }, // decoupled, same moments
    { kind: 'adamw', lr: 1e-2, beta1: 0.5, beta2: 0.9, eps: 1e-3, weightDecay: 0.5 },
    { ...full, kind: 'adam', lr: 0, weightDecay: 0.5 }, // lr 0: no change at all
    { kind: 'adam', lr: 1e-2, beta1: 0, beta2: 0, eps: 1e-8, weightDecay: 0.01 },
    { ...full, kind: 'adamw', lr: 2, weightDecay: 0.4 },
  ];
  const shapes = new Map(model.parameters().map((p) => [p.name, p.shape]));
  const tensors: Record<string, { data: SafeArray; shape: number[] }> = {};
  const put = (prefix: string, named: Record<string, Float32Array>) => {
    for (const [k, v] of Object.entries(named)) tensors[prefix + k] = { data: v, shape: shapes.get(k)! };
  };
  put('w0.', model.getWeights());
  for (const [s, settings] of plan.entries()) {
    model.setOptimizer(settings);
    await model.trainStep(x);
    put(`g${s}.`, model.getGradients());
    put(`w${s + 1}.`, model.getWeights());
  }
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cmseg-optim-'));
  try {
    await writeSafetensors(path.join(dir, 'steps.safetensors'), tensors);
    fs.writeFileSync(path.join(dir, 'plan.json'), JSON.stringify({ names: [...shapes.keys()], steps: plan }));
    const errors = runPythonJson<number[]>(OPTIM_PY, [path.join(dir, 'steps.safetensors'), path.join(dir, 'plan.json')]);
    errors.forEach((e, s) => t.ok(e < 1e-3, `step ${s + 1} (${plan[s].kind}, lr ${plan[s].lr}, wd ${plan[s].weightDecay}): worst weight change error ${e.toExponential(2)}`));
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

t.test('optimiser state round trip: a fresh model continues exactly, warm-up included', async (t) => {
  const config = { classes: 3, annotators: 2, depth: 2, baseChannels: 4, seed: 2, loss: { lambda: 0.1, lambdaWarmup: 0.3, warmupSteps: 4 }, optimizer: { kind: 'adamw' as const, lr: 1e-2, weightDecay: 0.1 } };
  const x = randomCase(13, 2, [8, 8], 3, 2);
  const a = createModel(config);
  for (let i = 0; i < 3; i++) await a.trainStep(x);
  const state = a.getOptimizerState();
  t.equal(state.step, 3);
  state.m['seg.bias'][0] += 1; // a copy: changing it does not touch the model
  t.not(a.getOptimizerState().m['seg.bias'][0], state.m['seg.bias'][0]);
  const b = createModel({ ...config, seed: 9 });
  b.setWeights(a.getWeights());
  b.setOptimizerState(a.getOptimizerState());
  for (let i = 0; i < 3; i++) {
    const [ra, rb] = [await a.trainStep(x), await b.trainStep(x)];
    t.same([rb.loss, rb.traceWeight, rb.step], [ra.loss, ra.traceWeight, ra.step], `step ${ra.step}`);
  }
  const [wa, wb] = [a.getWeights(), b.getWeights()];
  t.ok(Object.keys(wa).every((k) => wa[k].every((w, i) => w === wb[k][i])), 'same weights after three more steps');
});

// ---- learning-rate schedules

// Each schedule's rates over steps 0..T-1 from the PyTorch scheduler it follows (the rate
// an optimiser step uses is the one set before it), and the end-of-run value T.
const SCHED_PY = `
import json, sys, torch
cases = json.loads(sys.argv[1]); out = []
for c in cases:
    p = torch.nn.Parameter(torch.zeros(1)); opt = torch.optim.SGD([p], lr=c['lr'])
    T = c['T']; k = c['kind']
    if k == 'constant': s = torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=T)
    elif k == 'step': s = torch.optim.lr_scheduler.StepLR(opt, step_size=c['stepSize'], gamma=c['gamma'])
    elif k == 'cosine': s = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=T, eta_min=c['minLr'])
    else: s = torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=T, power=c['power'])
    rates = []
    for _ in range(T + 1):
        rates.append(opt.param_groups[0]['lr']); opt.step(); s.step()
    out.append(rates)
print(json.dumps(out))
`;

t.test('every schedule at every step equals the PyTorch scheduler it follows', { skip: missingPythonModules('torch') }, async (t) => {
  const cases: (LrSchedule & { T: number })[] = [];
  for (const T of [1, 2, 7, 30]) {
    cases.push({ kind: 'constant', lr: 0.01, T });
    cases.push({ kind: 'step', lr: 0.01, T, gamma: 0.5, stepSize: 3 });
    cases.push({ kind: 'step', lr: 0.01, T }); // defaults: gamma 0.1 every third of the run
    cases.push({ kind: 'cosine', lr: 3e-3, T, minLr: 1e-4 });
    cases.push({ kind: 'cosine', lr: 1e-2, T }); // minLr 0
    cases.push({ kind: 'poly', lr: 1e-3, T }); // power 0.9, as nnU-Net
    cases.push({ kind: 'poly', lr: 1e-3, T, power: 2 });
  }
  const withDefaults = cases.map((c) => ({ ...c, gamma: c.gamma ?? 0.1, stepSize: c.stepSize ?? Math.max(1, Math.ceil(c.T / 3)), minLr: c.minLr ?? 0, power: c.power ?? 0.9 }));
  const torchRates = runPythonJson<number[][]>(SCHED_PY, [JSON.stringify(withDefaults)]);
  for (const [k, c] of cases.entries()) {
    const ours = Array.from({ length: c.T + 1 }, (_, s) => learningRate(c, s, c.T));
    const bad = ours.findIndex((r, s) => !close(r, torchRates[k][s], 1e-9, 1e-15));
    t.equal(bad, -1, `${JSON.stringify(c)}: ${bad < 0 ? 'all steps' : `step ${bad}: ${ours[bad]} vs torch ${torchRates[k][bad]}`}`);
    // Past the end the rate stays at the end-of-run value (torch's cosine would climb again).
    t.equal(learningRate(c, c.T + 5, c.T), ours[c.T], `${c.kind} T ${c.T}: past the end`);
  }
});

t.test('learningRate refuses a schedule or step that would give a NaN, negative or infinite rate', async (t) => {
  const refuse = (schedule: LrSchedule, step: number, total: number, message: RegExp) => t.throws(() => learningRate(schedule, step, total), { name: 'RangeError', message }, `${JSON.stringify(schedule)} at ${step}/${total}`);
  refuse({ kind: 'step', lr: 1, stepSize: 0 }, 0, 10, /stepSize 0 must be an integer >= 1/);
  refuse({ kind: 'cosine', lr: -1 }, 3, 10, /learning rate -1 must be a finite number > 0/);
  refuse({ kind: 'poly', lr: 1, power: -1 }, 10, 10, /power -1 must be a finite number > 0/);
  refuse({ kind: 'cosine', lr: 1 }, NaN, 10, /step NaN must be a number >= 0/);
  refuse({ kind: 'poly', lr: 1 }, 3, NaN, /total steps NaN must be a finite number >= 0/);
  refuse({ kind: 'cosine', lr: 1 }, Infinity, Infinity, /total steps Infinity must be a finite number >= 0/);
  refuse({ kind: 'poly', lr: 1 }, -1, 10, /step -1 must be a number >= 0/);
  t.equal(learningRate({ kind: 'poly', lr: 1, power: 1 }, Infinity, 4), 0, 'an infinite step is past the end');
});

t.test('a gradient whose square overflows float32 fails the step by name and leaves the weights and Adam state as they were', async (t) => {
  const model = createModel({ ndim: 2, inChannels: 1, classes: 3, annotators: 2, depth: 2, baseChannels: 2, seed: 1, loss: { lambda: 1e30 } });
  t.teardown(() => model.dispose());
  const x = randomCase(11, 1, [8, 8], 3, 2);
  const before = model.getWeights();
  const state = model.getOptimizerState();
  // The trace term's gradient is lambda * dT/d(raw): far beyond 1.8e19 in the CM heads.
  await t.rejects(model.trainStep(x), /the gradient of \S+\[\d+\] is \S+: beyond 1\.8\d*e\+19 its square overflows float32 and Adam would stop updating; lower the learning rate, lambda or the loss scale \(the weights were left unchanged\)/);
  const after = model.getWeights();
  for (const name of Object.keys(before)) t.same(after[name], before[name], `${name} unchanged`);
  t.equal(model.getOptimizerState().step, state.step, 'no optimiser step counted');
  // With a sane lambda the same model trains on, and its state stays loadable (finite).
  model.setLoss({ lambda: 0.01 });
  const r = await model.trainStep(x);
  t.ok(Number.isFinite(r.loss), `loss ${r.loss}`);
  const v = model.getOptimizerState();
  t.equal(v.step, 1);
});

t.test('a beta that rounds to 1 in float32 is refused naming the value given and the rounding', async (t) => {
  const model = createModel({ ndim: 2, inChannels: 1, classes: 2, annotators: 1, depth: 1, baseChannels: 2 });
  t.teardown(() => model.dispose());
  t.throws(() => model.setOptimizer({ beta2: 0.99999999 }), /optimizer\.beta2 must be in \[0, 1\), got 0\.99999999 \(0\.99999999 rounds to 1 in float32, the precision betas are kept in\)/);
  t.throws(() => model.setOptimizer({ beta1: 1 }), /optimizer\.beta1 must be in \[0, 1\), got 1$/);
  t.throws(() => model.setOptimizer({ beta1: -0.5 }), /optimizer\.beta1 must be in \[0, 1\), got -0\.5$/);
  model.setOptimizer({ beta2: 0.9999 });
  t.equal(model.optimizer.beta2, Math.fround(0.9999), 'a beta below 1 in float32 is taken');
});
