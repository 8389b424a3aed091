// Checkpoints: one safetensors file holding every parameter under its SPEC
// name (PyTorch layout), the Adam moments under `optim.m.<name>` and
// `optim.v.<name>`, and in the metadata the model config, optimiser and loss
// settings, the step count and any trainer state. Written atomically, so an
// interrupted save never corrupts the previous checkpoint.
import { isPlainObject, readSafetensors, SafeArray, setOwn, writeSafetensors } from '../data/safetensors';
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
  /** The shape the file gives every tensor, by its name in the file (`optim.m.<name>` and `optim.v.<name>` included). */
  shapes: Record<string, number[]>;
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
  let json: string;
  try {
    json = JSON.stringify(extra);
  } catch (err) {
    throw new TypeError(`saveCheckpoint: extra cannot be stored as JSON (${(err as Error).message})`);
  }
  // A Date, or a toJSON giving a string, array or null, passes the test above but is
  // not a JSON object: readCheckpoint refuses it, so the checkpoint could never be loaded.
  // (A toJSON giving undefined makes JSON.stringify return undefined.)
  if (typeof json !== 'string' || !json.startsWith('{'))
    throw new TypeError(`saveCheckpoint: extra must be a plain object of JSON values (it is stored as ${typeof json !== 'string' ? 'nothing' : json.length > 40 ? `${json.slice(0, 40)}...` : json}, not a JSON object)`);
  return json;
}

function parseJson(text: string | undefined, what: string, path: string): unknown {
  if (text === undefined) throw new Error(`${path}: checkpoint metadata has no '${what}'`);
  try {
    return JSON.parse(text);
  } catch {
    throw new Error(`${path}: checkpoint metadata '${what}' is not valid JSON`);
  }
}

/** A metadata entry that must hold a JSON object (config, optimizer, loss, extra). */
function parseObject(text: string | undefined, what: string, path: string): Record<string, unknown> {
  const value = parseJson(text, what, path);
  if (!isPlainObject(value))
    throw new Error(`${path}: checkpoint metadata '${what}' must be a JSON object, got ${value === null ? 'null' : Array.isArray(value) ? 'an array' : typeof value}`);
  return value;
}

export async function readCheckpoint(path: string): Promise<CheckpointContents> {
  const file = await readSafetensors(path);
  const md = file.metadata;
  const format = Object.hasOwn(md, 'format') ? md.format : undefined;
  if (format !== CHECKPOINT_FORMAT) throw new Error(`${path}: not a cmseg checkpoint (metadata format is '${format ?? 'missing'}')`);
  // Another format version may lay out or mean its tensors and settings differently:
  // refuse it rather than load it as this one. (A missing version, as in a hand-made
  // checkpoint, is read as this version.)
  if (Object.hasOwn(md, 'version') && md.version !== CHECKPOINT_VERSION)
    throw new Error(`${path}: checkpoint format version '${md.version}' is not one this cmseg reads (it reads version '${CHECKPOINT_VERSION}'); was it written by another cmseg version?`);
  const weights: Record<string, Float32Array> = {};
  const shapes: Record<string, number[]> = {};
  const m: Record<string, Float32Array> = {};
  const v: Record<string, Float32Array> = {};
  for (const [name, t] of Object.entries(file.tensors)) {
    if (!(t.data instanceof Float32Array)) throw new Error(`${path}: tensor '${name}' is ${t.dtype}, expected F32`);
    setOwn(shapes, name, t.shape);
    if (name.startsWith('optim.m.')) setOwn(m, name.slice(8), t.data);
    else if (name.startsWith('optim.v.')) setOwn(v, name.slice(8), t.data);
    else setOwn(weights, name, t.data);
  }
  // Without a step, Adam's bias correction would restart at step 1 on moments of a later
  // step: refuse that. A weights-only file without a step starts a fresh optimiser.
  if (!Object.hasOwn(md, 'step') && (Object.keys(m).length || Object.keys(v).length))
    throw new Error(`${path}: checkpoint metadata has no 'step', but the file has Adam moments (optim.m.*, optim.v.*) that need it`);
  const stepText = Object.hasOwn(md, 'step') ? md.step : '0';
  const step = /^\d+$/.test(stepText) ? Number(stepText) : NaN;
  if (!Number.isSafeInteger(step)) throw new Error(`${path}: checkpoint metadata 'step' is '${stepText}', not a non-negative integer`);
  return {
    config: parseObject(md.config, 'config', path) as unknown as ResolvedConfig,
    optimizer: parseObject(md.optimizer, 'optimizer', path) as Required<OptimizerOptions>,
    loss: parseObject(md.loss, 'loss', path) as Required<LossOptions>,
    step,
    weights,
    shapes,
    moments: Object.keys(m).length || Object.keys(v).length ? { m, v } : undefined,
    extra: md.extra ? parseObject(md.extra, 'extra', path) : {},
  };
}

function sameShape(a: readonly number[], b: readonly number[]): boolean {
  return a.length === b.length && a.every((d, i) => d === b[i]);
}

/** The error of `cause` with `message`, keeping its `code` (CMSEG_INVALID_ARGUMENT from the engine). */
function withCause(message: string, cause: unknown): Error {
  const err = new Error(message);
  const code = (cause as { code?: unknown } | null)?.code;
  if (code !== undefined) (err as Error & { code?: unknown }).code = code;
  return err;
}

/**
 * Rebuilds the model a checkpoint was saved from: weights, optimiser state and settings.
 * `overrides` replace model settings (e.g. {device: 'cpu'}; one that changes the network is
 * refused by name); `optimizer` and `loss` are laid over the checkpoint's own; a value of
 * undefined keeps the checkpoint's.
 */
export async function loadCheckpoint(path: string, overrides: Partial<ModelConfig> = {}): Promise<Model> {
  // null or a string would otherwise fail deep inside as "Cannot convert undefined or null to object".
  if (!isPlainObject(overrides))
    throw new TypeError(`loadCheckpoint: overrides must be an object of model settings (e.g. {device: 'cpu'}), got ${overrides === null ? 'null' : Array.isArray(overrides) ? 'an array' : typeof overrides}`);
  const c = await readCheckpoint(path);
  // An override given as undefined (`{device: args.device}` with no --device) keeps the
  // checkpoint's setting: spread as it was, it reset that setting to the engine's default
  // (a CUDA-trained model loaded on the CPU, seed 7 made 0) without a word.
  const { optimizer, loss, ...network } = Object.fromEntries(Object.entries(overrides).filter(([, v]) => v !== undefined)) as Partial<ModelConfig>;
  // Which overrides change the network the checkpoint was saved from, to name in errors.
  const changed = Object.keys(network).filter((k) => (network as Record<string, unknown>)[k] !== (c.config as unknown as Record<string, unknown>)[k]);
  const why = changed.length ? ` (the overrides ${changed.join(', ')} change the network the checkpoint was saved from)` : '';
  let model: Model;
  try {
    // Optimiser and loss overrides are laid over the checkpoint's settings (they were typed as
    // taken, and dropped): e.g. {optimizer: {lr: 1e-4}} to fine-tune at a lower rate.
    model = new Model({ ...c.config, ...network, optimizer: { ...c.optimizer, ...optimizer }, loss: { ...c.loss, ...loss } });
  } catch (err) {
    const what = changed.length ? `cannot build the checkpoint's model with the overrides ${changed.join(', ')}` : "the checkpoint's model settings are invalid";
    throw withCause(`${path}: ${what}: ${(err as Error).message}`, err);
  }
  try {
    const params = model.parameters();
    const missing = params.map((p) => p.name).filter((n) => !Object.hasOwn(c.weights, n));
    if (missing.length) throw new Error(`checkpoint lacks parameters ${missing.slice(0, 5).join(', ')}${missing.length > 5 ? ', ...' : ''}`);
    // The engine checks element counts only: a [8, 2, 3, 3, 3] tensor would fill a [4, 4, 3, 3, 3] weight.
    for (const p of params) {
      for (const name of [p.name, `optim.m.${p.name}`, `optim.v.${p.name}`]) {
        const found = Object.hasOwn(c.shapes, name) ? c.shapes[name] : undefined;
        if (found && !sameShape(found, p.shape))
          throw new Error(`tensor '${name}' has shape [${found.join(', ')}] but the model's parameter ${p.name} is [${p.shape.join(', ')}]`);
      }
    }
    // Adam moments are all there or all absent (weights only: fresh moments). A file
    // with some of them would resume with zero moments for the rest, silently inexact.
    if (c.moments) {
      const absent = params.flatMap((p) => [`optim.m.${p.name}`, `optim.v.${p.name}`]).filter((n) => !Object.hasOwn(c.shapes, n));
      if (absent.length)
        throw new Error(`checkpoint has Adam moments but lacks ${absent.slice(0, 5).map((n) => `'${n}'`).join(', ')}${absent.length > 5 ? ', ...' : ''} (a checkpoint holds every moment or none)`);
    }
    model.setWeights(c.weights);
    model.setOptimizerState({ step: c.step, ...(c.moments ?? {}) });
  } catch (err) {
    // Say which file, and which overrides changed the architecture.
    await model.dispose();
    throw withCause(`${path}: ${(err as Error).message}${why}`, err);
  }
  return model;
}
