// Runs the PyTorch reference (scripts/torch_reference.py) on exactly the
// weights and inputs of a cmseg model, and compares the two.
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { spawnSync } from 'child_process';
import { Model } from '../../src/model/model';
import { readSafetensors, SafeArray, writeSafetensors } from '../../src/data/safetensors';
import { PYTHON } from './python';

const root = path.resolve(__dirname, '..', '..');

export interface ParityInputs {
  images: Float32Array;
  shape: number[];
  labels: Uint8Array[]; // one [N, *S] map per annotator
  present: Uint8Array; // [N, R]
  /** Plain cross-entropy too (plainCe, plainGrad.*): hard labels [N, *S] (255: unlabelled)... */
  target?: Uint8Array;
  /** ...or soft targets [N, L, *S]. */
  softTarget?: Float32Array;
}

export type TorchResult = Record<string, { data: SafeArray; shape: number[] }>;

/** Writes a case file for `model` and `inputs`, runs the reference, returns its result tensors. */
export async function runTorchReference(model: Model, inputs: ParityInputs, steps: number, dtype: 'float32' | 'float64' = 'float64'): Promise<TorchResult> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cmseg-parity-'));
  try {
    const shapes = new Map(model.parameters().map((p) => [p.name, p.shape]));
    const tensors: Record<string, { data: SafeArray; shape: number[] }> = {};
    for (const [name, w] of Object.entries(model.getWeights())) tensors[name] = { data: w, shape: shapes.get(name)! };
    const [n, , ...spatial] = inputs.shape;
    const R = inputs.labels.length;
    const labels = new Uint8Array(R * inputs.labels[0].length);
    inputs.labels.forEach((l, r) => labels.set(l, r * l.length));
    tensors.images = { data: inputs.images, shape: inputs.shape };
    tensors.labels = { data: labels, shape: [R, n, ...spatial] };
    tensors.present = { data: inputs.present, shape: [n, R] };
    if (inputs.target) tensors.target = { data: inputs.target, shape: [n, ...spatial] };
    if (inputs.softTarget) tensors.softTarget = { data: inputs.softTarget, shape: [n, model.config.classes, ...spatial] };
    const caseFile = path.join(dir, 'case.safetensors');
    const outFile = path.join(dir, 'result.safetensors');
    await writeSafetensors(caseFile, tensors, {
      config: JSON.stringify(model.config),
      loss: JSON.stringify(model.loss),
      optim: JSON.stringify(model.optimizer),
      steps: String(steps),
      step: String(model.step),
    });
    const run = spawnSync(PYTHON, [path.join(root, 'scripts', 'torch_reference.py'), 'run', '--case', caseFile, '--out', outFile, '--dtype', dtype], {
      encoding: 'utf8',
      timeout: 300_000,
    });
    if (run.status !== 0) throw new Error(`torch_reference.py failed (${run.status}): ${run.stdout}${run.stderr}`);
    const result = await readSafetensors(outFile);
    const out: TorchResult = {};
    for (const [k, t] of Object.entries(result.tensors)) out[k] = { data: t.data, shape: t.shape };
    return out;
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

/**
 * Relative error of `a` against the reference `b`: ||a - b||_2 / max(||b||_2, floor).
 * A per-tensor norm is the honest fp32-vs-fp64 measure: single entries near zero
 * have no meaningful relative error.
 */
export function relativeError(a: ArrayLike<number>, b: ArrayLike<number>, floor = 1e-12): number {
  if (a.length !== b.length) return Infinity;
  let num = 0;
  let den = 0;
  for (let i = 0; i < a.length; i++) {
    num += (a[i] - b[i]) ** 2;
    den += b[i] ** 2;
  }
  return Math.sqrt(num) / Math.max(Math.sqrt(den), floor);
}
