// Checkpoints: one safetensors file holding every parameter under its SPEC
// name (PyTorch layout), the Adam moments under `optim.m.<name>` and
// `optim.v.<name>`, and in the metadata the model config, optimiser and loss
// settings, the step count and any trainer state. Written atomically, so an
// interrupted save never corrupts the previous checkpoint.
import { readSafetensors, SafeArray, writeSafetensors } from '../data/safetensors';
import { LossOptions, ModelConfig, OptimizerOptions, ResolvedConfig } from './config';
import { Model } from './model';

export const CHECKPOINT_FORMAT = 'cmseg-checkpoint';
export const CHECKPOINT_VERSION = '1';

export interface CheckpointContents {
  config: ResolvedConfig;
  optimizer: Required<OptimizerOptions>;
  loss: Required<LossOptions>;
  step: number;
  weights: Record<string, Float32Array>;
  moments?: { m: Record<string, Float32Array>; v: Record<string, Float32Array> };
  /** Free-form state of whoever saved it (trainer epoch, RNG state, best metric, ...). */
  extra: Record<string, unknown>;
}

export async function saveCheckpoint(model: Model, path: string, extra: Record<string, unknown> = {}): Promise<void> {
  const shapes = new Map(model.parameters().map((p) => [p.name, p.shape]));
  const weights = model.getWeights();
  const { step, m, v } = model.getOptimizerState();
  const tensors: Record<string, { data: SafeArray; shape: number[] }> = {};
  for (const [name, w] of Object.entries(weights)) tensors[name] = { data: w, shape: shapes.get(name)! };
  for (const [name, a] of Object.entries(m)) tensors[`optim.m.${name}`] = { data: a, shape: shapes.get(name)! };
  for (const [name, a] of Object.entries(v)) tensors[`optim.v.${name}`] = { data: a, shape: shapes.get(name)! };
  await writeSafetensors(path, tensors, {
    format: CHECKPOINT_FORMAT,
    version: CHECKPOINT_VERSION,
    config: JSON.stringify(model.config),
    optimizer: JSON.stringify(model.optimizer),
    loss: JSON.stringify(model.loss),
    step: String(step),
    extra: JSON.stringify(extra),
  });
}

function parseJson(text: string | undefined, what: string, path: string): unknown {
  if (text === undefined) throw new Error(`${path}: checkpoint metadata has no '${what}'`);
  try {
    return JSON.parse(text);
  } catch {
    throw new Error(`${path}: checkpoint metadata '${what}' is not valid JSON`);
  }
}

export async function readCheckpoint(path: string): Promise<CheckpointContents> {
  const file = await readSafetensors(path);
  const md = file.metadata;
  if (md.format !== CHECKPOINT_FORMAT) throw new Error(`${path}: not a cmseg checkpoint (metadata format is '${md.format ?? 'missing'}')`);
  const weights: Record<string, Float32Array> = {};
  const m: Record<string, Float32Array> = {};
  const v: Record<string, Float32Array> = {};
  for (const [name, t] of Object.entries(file.tensors)) {
    if (!(t.data instanceof Float32Array)) throw new Error(`${path}: tensor '${name}' is ${t.dtype}, expected F32`);
    if (name.startsWith('optim.m.')) m[name.slice(8)] = t.data;
    else if (name.startsWith('optim.v.')) v[name.slice(8)] = t.data;
    else weights[name] = t.data;
  }
  return {
    config: parseJson(md.config, 'config', path) as ResolvedConfig,
    optimizer: parseJson(md.optimizer, 'optimizer', path) as Required<OptimizerOptions>,
    loss: parseJson(md.loss, 'loss', path) as Required<LossOptions>,
    step: Number(md.step ?? 0),
    weights,
    moments: Object.keys(m).length ? { m, v } : undefined,
    extra: (md.extra ? parseJson(md.extra, 'extra', path) : {}) as Record<string, unknown>,
  };
}

/** Rebuilds the model a checkpoint was saved from: weights, optimiser state and settings. */
export async function loadCheckpoint(path: string, overrides: Partial<ModelConfig> = {}): Promise<Model> {
  const c = await readCheckpoint(path);
  const model = new Model({ ...c.config, ...overrides, optimizer: c.optimizer, loss: c.loss });
  const expected = model.parameters().map((p) => p.name);
  const missing = expected.filter((n) => !(n in c.weights));
  if (missing.length) throw new Error(`${path}: checkpoint lacks parameters ${missing.slice(0, 5).join(', ')}${missing.length > 5 ? ', ...' : ''}`);
  model.setWeights(c.weights);
  model.setOptimizerState({ step: c.step, ...(c.moments ?? {}) });
  return model;
}
