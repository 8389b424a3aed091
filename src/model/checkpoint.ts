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
  if (!(model instanceof Model)) throw new TypeError(`saveCheckpoint: expected a Model, got ${model === null ? 'null' : typeof model}`);
  const extraJson = extraToJson(extra);
  // The state after every call queued before this one (a trainStep not yet awaited included).
  const snap = await model.afterQueued(() => ({
    shapes: new Map(model.parameters().map((p) => [p.name, p.shape])),
    weights: model.getWeights(),
    state: model.getOptimizerState(),
    config: model.config,
    optimizer: model.optimizer,
    loss: model.loss,
  }));
  const { step, m, v } = snap.state;
  const tensors: Record<string, { data: SafeArray; shape: number[] }> = {};
  for (const [name, w] of Object.entries(snap.weights)) tensors[name] = { data: w, shape: snap.shapes.get(name)! };
  for (const [name, a] of Object.entries(m)) tensors[`optim.m.${name}`] = { data: a, shape: snap.shapes.get(name)! };
  for (const [name, a] of Object.entries(v)) tensors[`optim.v.${name}`] = { data: a, shape: snap.shapes.get(name)! };
  await writeSafetensors(path, tensors, {
    format: CHECKPOINT_FORMAT,
    version: CHECKPOINT_VERSION,
    config: JSON.stringify(snap.config),
    optimizer: JSON.stringify(snap.optimizer),
    loss: JSON.stringify(snap.loss),
    step: String(step),
    extra: extraJson,
  });
}

// The trainer state goes into the metadata as JSON: say which value cannot be
// (a BigInt, a cycle) before anything is written.
function extraToJson(extra: Record<string, unknown>): string {
  if (extra === null || typeof extra !== 'object' || Array.isArray(extra))
    throw new TypeError('saveCheckpoint: extra must be a plain object of JSON values');
  try {
    return JSON.stringify(extra);
  } catch (err) {
    throw new TypeError(`saveCheckpoint: extra cannot be stored as JSON (${(err as Error).message})`);
  }
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
  try {
    model.setWeights(c.weights);
    model.setOptimizerState({ step: c.step, ...(c.moments ?? {}) });
  } catch (err) {
    // A shape mismatch: say which file, and which overrides changed the architecture.
    const changed = Object.keys(overrides).filter((k) => (overrides as Record<string, unknown>)[k] !== (c.config as unknown as Record<string, unknown>)[k]);
    const why = changed.length ? ` (the overrides ${changed.join(', ')} change the network the checkpoint was saved from)` : '';
    await model.dispose();
    throw new Error(`${path}: ${(err as Error).message}${why}`);
  }
  return model;
}
