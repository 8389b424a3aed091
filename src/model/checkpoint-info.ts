// What any cmseg checkpoint says about itself: its model config and step, and when the
// trainer wrote it, its method, annotator names and (cmseg train only) the run's recipe.
// eval and predict read this first, to decide what data a checkpoint can take.

import * as fs from 'fs';
import * as path from 'path';
import type { DatasetSpec, RunRecipe } from '../train/experiment';
import { UserError } from '../errors';
import { METHOD_NAMES, type MethodName, methodDefinition } from '../train/methods';
import { TRAINER_STATE_FORMAT, trainerExtra, TrainerExtra } from '../train/trainer';
import { readCheckpoint } from './checkpoint';
import type { ResolvedConfig } from './config';

/** What a checkpoint says about itself: its model, and how it was trained when the trainer wrote it. */
export interface CheckpointInfo {
  file: string;
  config: ResolvedConfig;
  step: number;
  /** The trainer's state: cmseg train, or the API's train(). */
  saved?: TrainerExtra;
  /** Which data the run was trained on: cmseg train only. */
  recipe?: RunRecipe;
  /** The training method: the trainer's, `extra.method` of an API checkpoint when it names one, else undefined. */
  method?: MethodName;
  /** Whether the annotator heads were trained (false for the naive methods and the oracle). */
  learnsCms: boolean;
  /** One name per CM head: recorded in the checkpoint (`extra.annotatorNames`), else annotator0..R-1. */
  annotatorNames: string[];
  namesRecorded: boolean;
}

/** How reports name a checkpoint's method: the trainer's method, or "a model saved by saveCheckpoint". */
export function methodLabel(info: CheckpointInfo): string {
  return info.method ?? 'model';
}

/**
 * Any cmseg checkpoint's model and what it records: a trainer's checkpoint gives its method,
 * annotator names and run recipe; one written by saveCheckpoint gives its model config, and
 * annotator names or method when its `extra` holds `annotatorNames` (R strings) or `method`.
 */
export async function readCheckpointInfo(file: string): Promise<CheckpointInfo> {
  if (!fs.existsSync(file)) throw new UserError(`checkpoint not found: ${file}`);
  if (fs.statSync(file).isDirectory()) {
    const inside = ['best.safetensors', 'last.safetensors'].find((name) => fs.existsSync(path.join(file, name)));
    throw new UserError(`checkpoint ${file} is a folder, not a file${inside ? ` (a run's folder: name a checkpoint in it, ${path.join(file, inside)})` : ''}`);
  }
  const contents = await readCheckpoint(file);
  const { config, extra } = contents;
  checkConfig(config, file);
  const saved = extra.format === TRAINER_STATE_FORMAT ? trainerExtra(extra, file) : undefined;
  // extra.run is free-form for the API's train() (TrainHooks.run): only a data set of a kind
  // cmseg train writes is its recipe; anything else counts as no recipe (eval needs --data).
  const run = saved?.run as unknown as RunRecipe | undefined;
  const recipe = DATASET_KINDS.includes((run?.dataset as { kind?: string } | undefined)?.kind as DatasetSpec['kind']) ? run : undefined;
  if (recipe) checkRecipe(recipe, file);
  const R = config.annotators;
  const recorded = saved?.annotatorNames ?? extra.annotatorNames;
  const namesRecorded = Array.isArray(recorded) && recorded.length === R && recorded.every((n) => typeof n === 'string' && n !== '');
  const savedMethod = saved?.config.method;
  // A trainer checkpoint's method that this cmseg does not know would otherwise fail later as
  // "unknown method", which reads like a mistake on the command line: name the file instead.
  if (saved && !METHOD_NAMES.includes(savedMethod as MethodName))
    throw new UserError(`checkpoint ${file}: its trainer state names the method ${JSON.stringify(savedMethod)}, which this cmseg does not know (${METHOD_NAMES.join(', ')})`);
  const method = savedMethod ?? (METHOD_NAMES.includes(extra.method as MethodName) ? (extra.method as MethodName) : undefined);
  const step = saved?.state.step ?? contents.step;
  if (!Number.isSafeInteger(step) || step < 0) throw new UserError(`checkpoint ${file}: its trainer state's step is ${JSON.stringify(step)}, not a non-negative integer`);
  return {
    file,
    config,
    step,
    ...(saved ? { saved } : {}),
    ...(recipe ? { recipe } : {}),
    ...(method ? { method } : {}),
    learnsCms: method ? methodDefinition(method).learnsCms : R > 0,
    annotatorNames: namesRecorded ? [...(recorded as string[])] : Array.from({ length: R }, (_, r) => `annotator${r}`),
    namesRecorded,
  };
}

// The ranges the engine's validate_config (native/model/unet.cpp) enforces, checked here because
// eval and predict read these fields (to load data, size windows, name annotators) before they build
// the model: a bad value names the checkpoint instead of failing somewhere downstream.
const CONFIG_RANGES: [keyof ResolvedConfig, number, number][] = [
  ['inChannels', 1, Number.MAX_SAFE_INTEGER],
  ['classes', 2, 16],
  ['annotators', 1, 64],
  ['depth', 1, 8],
  ['baseChannels', 1, 1024],
];

function checkConfig(config: ResolvedConfig, file: string): void {
  const bad = (what: string) => new UserError(`checkpoint ${file}: its model config is invalid: ${what}`);
  if (config.ndim !== 2 && config.ndim !== 3) throw bad(`ndim must be 2 or 3, got ${JSON.stringify(config.ndim)}`);
  for (const [key, lo, hi] of CONFIG_RANGES) {
    const value = config[key];
    if (!Number.isInteger(value) || (value as number) < lo || (value as number) > hi)
      throw bad(`${key} must be an integer ${hi === Number.MAX_SAFE_INTEGER ? `>= ${lo}` : `in ${lo}..${hi}`}, got ${JSON.stringify(value)}`);
  }
}

// The run's record (cmseg train's `extra.run`) decides which data eval and predict load and what
// info prints: a damaged one, or one of a format this cmseg does not read, failed as "Cannot read
// properties of undefined (reading 'train')" or printed "data undefined". Check the fields read.
const DATASET_KINDS: readonly DatasetSpec['kind'][] = ['mnist', 'brats', 'folder'];

function checkRecipe(recipe: RunRecipe, file: string): void {
  const bad = (what: string) => new UserError(`checkpoint ${file}: its run record (the data it was trained on) is invalid: ${what}`);
  const d = recipe.dataset as unknown as Record<string, unknown>;
  if (typeof recipe.preset !== 'string') throw bad(`preset is ${JSON.stringify(recipe.preset)}, not a name`);
  const text = (key: string) => {
    if (typeof d[key] !== 'string') throw bad(`dataset.${key} is ${JSON.stringify(d[key])}, not a string`);
  };
  const integer = (key: string) => {
    if (!Number.isSafeInteger(d[key]) || (d[key] as number) < 0) throw bad(`dataset.${key} is ${JSON.stringify(d[key])}, not a non-negative integer`);
  };
  const splits = () => {
    const s = d.splits as Record<string, unknown> | undefined;
    for (const split of ['train', 'validation', 'test']) {
      const ids = s !== null && typeof s === 'object' ? s[split] : undefined;
      if (!Array.isArray(ids) || !ids.every((id) => typeof id === 'string')) throw bad(`dataset.splits.${split} is not a list of names`);
    }
  };
  switch (d.kind) {
    case 'mnist':
      ['train', 'validation', 'test', 'dataSeed'].forEach(integer);
      return;
    case 'brats':
      text('cache');
      ['patch', 'dataSeed'].forEach(integer);
      splits();
      return;
    case 'folder':
      text('root');
      ['classes', 'dataSeed'].forEach(integer);
      splits();
      return;
  }
}
