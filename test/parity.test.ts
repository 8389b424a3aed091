// Numerical parity with the independent PyTorch reference
// (scripts/torch_reference.py, computed in float64): consensus probabilities,
// CMs, loss, per-annotator CE and trace, every parameter gradient, and the
// losses of five Adam steps. 2D and 3D, every CM mode, missing labels (255)
// and an annotator absent from one image.
//
// Tolerances (cmseg computes in float32, the reference in float64), as the
// relative L2 error of a whole tensor, ||cmseg - torch|| / ||torch||:
//   probabilities, CMs, loss, CE, trace: 1e-5
//   every parameter gradient:            1e-4
//   losses over five Adam steps:         1e-4 (relative, per step)
//   each parameter's change over them:   1e-3, over the parameters whose gradient is
//     not zero by construction (the losses alone barely move with the optimiser's
//     betas or weight decay; the weights' changes do)
//   plain cross-entropy (naive / oracle), hard and soft targets: loss 1e-5, gradients 1e-4
import t from 'tap';
import { createModel, ModelConfig, type OptimizerOptions } from '../src/index';
import { missingPythonModules } from './helpers/python';
import { relativeError, runTorchReference, type TorchResult } from './helpers/torch-parity';

const skip = missingPythonModules('torch', 'safetensors', 'numpy');

function inputs(ndim: 2 | 3, inChannels: number, classes: number, R: number, seed: number) {
  let s = seed >>> 0;
  const rand = () => ((s = (s * 1664525 + 1013904223) >>> 0) / 4294967296);
  const n = 2;
  const spatial = ndim === 3 ? [8, 8, 8] : [16, 16];
  const V = spatial.reduce((a, b) => a * b, 1);
  const images = new Float32Array(n * inChannels * V).map(() => rand() * 2 - 1);
  const labels = Array.from({ length: R }, () => new Uint8Array(n * V).map(() => (rand() < 0.1 ? 255 : Math.floor(rand() * classes))));
  const present = new Uint8Array(n * R).fill(1);
  present[1 * R + 0] = 0; // annotator 0 did not label image 1
  return { images, shape: [n, inChannels, ...spatial], labels, present };
}

const cases: { name: string; config: ModelConfig }[] = [
  { name: '2D full', config: { ndim: 2, inChannels: 1, classes: 2, annotators: 3, depth: 3, baseChannels: 4 } },
  { name: '2D lowrank', config: { ndim: 2, inChannels: 2, classes: 3, annotators: 2, depth: 2, baseChannels: 4, cmMode: 'lowrank', cmRank: 2 } },
  { name: '2D global', config: { ndim: 2, inChannels: 1, classes: 3, annotators: 2, depth: 3, baseChannels: 4, cmMode: 'global' } },
  { name: '2D full + cm head blocks', config: { ndim: 2, inChannels: 1, classes: 2, annotators: 2, depth: 2, baseChannels: 4, cmHeadBlocks: 2 } },
  { name: '3D full', config: { ndim: 3, inChannels: 4, classes: 4, annotators: 3, depth: 3, baseChannels: 4 } },
  { name: '3D lowrank', config: { ndim: 3, inChannels: 2, classes: 4, annotators: 2, depth: 2, baseChannels: 4, cmMode: 'lowrank', cmRank: 1 } },
  { name: '3D global', config: { ndim: 3, inChannels: 2, classes: 3, annotators: 2, depth: 2, baseChannels: 4, cmMode: 'global' } },
];

// Adam as PyTorch's defaults, AdamW with decoupled decay, Adam with L2 decay and other betas.
const optimizers: OptimizerOptions[] = [
  { kind: 'adam', lr: 1e-3 },
  { kind: 'adamw', lr: 1e-3, weightDecay: 0.01 },
  { kind: 'adam', lr: 1e-3, beta1: 0.8, beta2: 0.99, eps: 1e-6, weightDecay: 0.01 },
];

/** Relative error of cmseg's weight changes against the reference's, worst over the parameters. */
function worstUpdateError(before: Record<string, Float32Array>, after: Record<string, Float32Array>, ref: TorchResult, gradients: Record<string, Float32Array>) {
  let worst = 0;
  let worstName = '';
  let compared = 0;
  for (const [name, w0] of Object.entries(before)) {
    // Zero gradients by construction (e.g. a bias under instance norm) leave Adam's step
    // the sign of rounding noise: nothing to compare.
    if (Math.max(...gradients[name].map(Math.abs)) < 1e-7) continue;
    const refFinal = ref[`final.${name}`].data as Float32Array;
    const ours = after[name].map((w, i) => w - w0[i]);
    const theirs = refFinal.map((w, i) => w - w0[i]);
    const e = relativeError(ours, theirs);
    compared++;
    if (e > worst) (worst = e), (worstName = name);
  }
  return { worst, worstName, compared };
}

for (const [k, c] of cases.entries()) {
  t.test(`parity with PyTorch: ${c.name}`, { skip }, async (t) => {
    const optimizer = optimizers[k % optimizers.length];
    const model = createModel({ ...c.config, seed: k, optimizer, loss: { lambda: 0.05, lambdaWarmup: 0.02, warmupSteps: 2 } });
    const x = inputs(c.config.ndim!, c.config.inChannels!, c.config.classes, c.config.annotators, 100 + k);
    const ref = await runTorchReference(model, x, 5);

    const pred = await model.predict(x.images, x.shape, { cms: true });
    t.ok(relativeError(pred.probs, ref.probs.data as Float32Array) < 1e-5, 'consensus probabilities');
    t.ok(relativeError(pred.cms!, ref.cms.data as Float32Array) < 1e-5, 'pixel-wise CMs');

    const g = await model.computeGradients(x);
    const refLoss = (ref.loss.data as Float64Array)[0];
    t.ok(Math.abs(g.loss - refLoss) <= 1e-5 * Math.abs(refLoss), `loss ${g.loss} vs ${refLoss}`);
    t.ok(relativeError(g.ce, Array.from(ref.ce.data as Float64Array)) < 1e-5, 'CE per annotator');
    t.ok(relativeError(g.trace, Array.from(ref.trace.data as Float64Array)) < 1e-5, 'trace per annotator');
    const grads = model.getGradients();
    let worst = 0;
    let worstName = '';
    for (const [name, grad] of Object.entries(grads)) {
      const e = relativeError(grad, ref[`grad.${name}`].data as Float32Array);
      if (e > worst) (worst = e), (worstName = name);
    }
    t.ok(worst < 1e-4, `worst gradient ${worstName}: relative error ${worst.toExponential(2)}`);

    const before = model.getWeights();
    const losses: number[] = [];
    for (let i = 0; i < 5; i++) losses.push((await model.trainStep(x)).loss);
    const refLosses = Array.from(ref.losses.data as Float64Array);
    for (let i = 0; i < 5; i++)
      t.ok(Math.abs(losses[i] - refLosses[i]) <= 1e-4 * Math.abs(refLosses[i]), `Adam step ${i + 1}: ${losses[i]} vs ${refLosses[i]}`);
    const u = worstUpdateError(before, model.getWeights(), ref, grads);
    t.ok(u.compared > 0 && u.worst < 1e-3, `${optimizer.kind} over 5 steps, worst weight change ${u.worstName}: relative error ${u.worst.toExponential(2)} (${u.compared} parameters)`);
  });
}

// naive / oracle: plain cross-entropy on the consensus logits, against hard labels with
// unlabelled pixels and against soft targets with rows of zeros (nobody labelled).
for (const [k, ndim] of ([2, 3] as const).entries()) {
  t.test(`parity with PyTorch: ${ndim}D plain cross-entropy`, { skip }, async (t) => {
    const config: ModelConfig = { ndim, inChannels: 2, classes: 3, annotators: 2, depth: 2, baseChannels: 4 };
    const model = createModel({ ...config, seed: 40 + k });
    const x = inputs(ndim, 2, 3, 2, 200 + k);
    const [n, , ...spatial] = x.shape;
    const V = spatial.reduce((a, b) => a * b, 1);
    const target = x.labels[0];
    // The mean of the two annotators' votes, as method 'naive' (mean) trains on.
    const softTarget = new Float32Array(n * 3 * V);
    for (let i = 0; i < n; i++)
      for (let v = 0; v < V; v++) {
        const votes = x.labels.map((l) => l[i * V + v]).filter((c) => c !== 255);
        for (const c of votes) softTarget[(i * 3 + c) * V + v] += 1 / votes.length;
      }
    t.ok(softTarget.some((_, e) => e < V && [0, 1, 2].every((c) => softTarget[c * V + e] === 0)), 'some pixel has no vote');
    for (const [what, batch, extra] of [
      ['hard', { images: x.images, shape: x.shape, target }, { target }],
      ['soft', { images: x.images, shape: x.shape, softTarget }, { softTarget }],
    ] as const) {
      const ref = await runTorchReference(model, { ...x, ...extra }, 0);
      const g = await model.computeGradients(batch);
      const refLoss = (ref.plainCe.data as Float64Array)[0];
      t.ok(Math.abs(g.loss - refLoss) <= 1e-5 * Math.abs(refLoss), `${what} targets: loss ${g.loss} vs ${refLoss}`);
      let worst = 0;
      for (const [name, grad] of Object.entries(model.getGradients()))
        worst = Math.max(worst, relativeError(grad, ref[`plainGrad.${name}`].data as Float32Array, 1e-6));
      t.ok(worst < 1e-4, `${what} targets: worst gradient relative error ${worst.toExponential(2)}`);
    }
  });
}
