// What the eval and predict commands share: which data --data (or its absence) and --split
// mean for a checkpoint, loading its model for inference on the right device, and the checks
// and sizes of that inference (a BraTS model's channels and classes, the sliding window, the
// padding of images to what the U-Net's depth takes). Several checkpoints (--checkpoint a b)
// run as one ensemble (src/model/ensemble.ts) and --tta mirrors the inputs (src/model/tta.ts):
// both are InferenceModel wrappers, so the rest of eval and predict does not change.

import * as fs from 'fs';
import * as path from 'path';
import type { Command } from 'commander';
import { cacheIndexPath, readCacheIndex } from '../data/cache';
import { BRATS_CLASS_NAMES, BRATS_CLASSES, BRATS_CHANNELS, BRATS_GEOMETRY_TOLERANCE_MM, BRATS_LABEL_SCHEMES, BRATS_MODALITIES } from '../data/brats';
import type { LabelMapping } from '../data/image-folder';
import { loadCheckpoint } from '../model/checkpoint';
import { type CheckpointInfo, methodLabel, readCheckpointInfo } from '../model/checkpoint-info';
import type { Device } from '../model/config';
import { ENSEMBLE_FIELDS, ensemble, ensembleMismatch } from '../model/ensemble';
import { backendInfo, Model } from '../model/model';
import { mirrored } from '../model/tta';
import { type InferenceModel, paddedSize, paddedToDepth } from '../train/evaluate';
import type { DatasetSpec, RunRecipe } from '../train/experiment';
import { withOwnRunCache } from './run-data';
import type { TrainerExtra } from '../train/trainer';
import { choiceOption, displayPath, parseInteger, parseNumber, parseThreads, sameNames, UserError } from './common';

/** The --device choices of eval and predict. */
export const DEVICES: readonly Device[] = ['cpu', 'cuda', 'auto'];

/** The options eval and predict share for running a model (3D windows, case geometry, device, threads). */
export function withInferenceOptions(command: Command): Command {
  return command
    .option('--patch <n>', "3D: sliding-window size (default: the run's training patch; 64 for a checkpoint without a run)", parseInteger(1))
    .option('--window-batch <n>', '3D: windows per forward pass; 1 lowers the memory (a c32 model on 128^3 windows took 9.3 GB on the CPU at 2, 6.6 GB at 1)', parseInteger(1), 2)
    .option('--geometry-tolerance <mm>', "3D: how far apart a case's files may put one voxel and still count as one grid", parseNumber(0), BRATS_GEOMETRY_TOLERANCE_MM)
    .addOption(
      choiceOption(
        '--label-scheme <scheme>',
        "3D, a BraTS folder as --data: how its segmentations' numbers are read, as by prepare (peds2024: BraTS-PEDs 2024, 1 ET, 2 NET, 3 CC, 4 ED); a cache keeps the scheme it was prepared with",
        BRATS_LABEL_SCHEMES,
      ),
    )
    .addOption(choiceOption('--device <name>', 'where the model runs (default: where it was trained; the CPU when no GPU can run it)', DEVICES))
    .option('--threads <n>', 'native threads (default: CMSEG_NUM_THREADS, else every usable CPU: the cores, fewer under a CPU affinity mask or cgroup quota)', parseThreads)
    .option('-q, --quiet', '3D: no window bars and no line per case (notes, warnings and the results still print)');
}

/** Why a checkpoint alone does not say what to predict or score, and what to pass instead. */
function noRecipeMessage(info: CheckpointInfo, command: 'predict' | 'eval'): string {
  const who = info.saved ? 'it was trained through the API, not by cmseg train' : "it was written by the API's saveCheckpoint, not by cmseg train";
  const what = info.config.ndim === 2 ? 'a folder of PNG images (DIR/images/*.png or DIR/*.png)' : 'a BraTS folder, a case folder or a cmseg cache';
  const reference = command === 'eval' ? (info.config.ndim === 2 ? ', with consensus/ or labels/ to score against' : ' whose cases have segmentations') : '';
  return `${path.basename(info.file)} records no training data (${who}): name the data to ${command === 'eval' ? 'score' : 'predict'} with --data <dir>, ${what}${reference}`;
}

/** What eval or predict works on: the run's own split (of its data, or of its image folder moved to --data), or new data, whole. */
export type DataTarget =
  | { kind: 'run'; saved: TrainerExtra; recipe: RunRecipe }
  | { kind: 'images'; dir: string; labelMapping?: LabelMapping }
  | { kind: 'volumes'; dir: string };

/** --data named a file: which folder the model takes instead (for a case's NIfTI file, the one holding it). */
function dataFileMessage(file: string, ndim: number): string {
  if (ndim !== 3) return `--data ${file} is a file: a 2D model takes a folder of PNG images (DIR/images/<name>.png, or DIR/<name>.png)`;
  const caseFolder = /\.nii(\.gz)?$/i.test(file) ? ` (here ${path.dirname(file)})` : '';
  return `--data ${file} is a file: a 3D model takes a folder, a BraTS folder of case folders, one case's folder${caseFolder} or a cache of cmseg prepare`;
}

/**
 * Which data `--data` (or its absence) means for a checkpoint. Without --data: the run's
 * --split (an API checkpoint has none: an error asking for --data). With it: an image-folder
 * run's folder where it is now when --data is that folder, the recorded one is gone (it
 * moved) or --split is typed; otherwise new data: every image or case of --data (--split all
 * asks for that in any case). A BraTS run's --data is new cases, unless --split is typed:
 * then it is the run's cache where it is now, and the split is read from it.
 */
export function dataTarget(info: CheckpointInfo, flags: { data?: string; split: string }, splitTyped: boolean, command: 'predict' | 'eval'): DataTarget {
  const { saved } = info;
  const recipe = info.recipe && withOwnRunCache(info.recipe, path.dirname(path.resolve(info.file)));
  const whole = (dir: string): DataTarget => {
    if (info.config.ndim === 3) return { kind: 'volumes', dir };
    const labelMapping = recipe?.dataset.kind === 'folder' ? recipe.dataset.labelMapping : undefined;
    return { kind: 'images', dir, ...(labelMapping ? { labelMapping } : {}) };
  };
  if (flags.data === undefined) {
    if (!recipe || !saved) throw new UserError(noRecipeMessage(info, command));
    if (flags.split !== 'all') return { kind: 'run', saved, recipe };
    if (recipe.dataset.kind === 'folder') {
      if (!fs.existsSync(recipe.dataset.root)) throw new UserError(`the run's image folder ${recipe.dataset.root} is gone; if it moved, name its new place with --data`);
      return whole(recipe.dataset.root);
    }
    if (recipe.dataset.kind === 'brats') return whole(recipe.dataset.cache);
    throw new UserError(`--split all ${command === 'eval' ? 'scores' : 'predicts'} every image of --data <dir>; an ${recipe.preset} run's own images are its splits (test, validation${command === 'predict' ? ', train' : ''})`);
  }
  const dir = path.resolve(flags.data);
  if (!fs.existsSync(dir)) throw new UserError(`--data not found: ${dir}`);
  if (!fs.statSync(dir).isDirectory()) throw new UserError(dataFileMessage(dir, info.config.ndim));
  if (recipe && saved && recipe.dataset.kind === 'folder' && flags.split !== 'all') {
    const root = recipe.dataset.root;
    if (splitTyped || dir === path.resolve(root) || !fs.existsSync(root)) return { kind: 'run', saved, recipe: { ...recipe, dataset: { ...recipe.dataset, root: dir } } };
    process.stderr.write(
      `note: ${displayPath(dir)} is not the run's image folder (${displayPath(root)} is still there): ${command === 'eval' ? 'scoring' : 'predicting'} every image in it; ` +
        `--split ${command === 'eval' ? 'test|validation' : 'test|validation|train'} would read the run's split from it instead\n`,
    );
    return whole(dir);
  }
  // A BraTS run's split is a list of case ids: read from the cache --data names (the run's
  // cache where it is now, if it moved) when --split asks for it; a folder of cases as they
  // come from a release is new data.
  if (recipe && saved && recipe.dataset.kind === 'brats' && splitTyped && flags.split !== 'all') {
    if (!fs.existsSync(cacheIndexPath(dir))) {
      throw new UserError(`--split ${flags.split} reads the run's ${flags.split} cases from a cache made by cmseg prepare (the run's, if it moved); ${displayPath(dir)} is not one: leave out --split to ${command === 'eval' ? 'score' : 'predict'} every case in it`);
    }
    return { kind: 'run', saved, recipe: { ...recipe, dataset: { ...recipe.dataset, cache: dir } } };
  }
  if (splitTyped && flags.split !== 'all') {
    throw new UserError(`--split ${flags.split} picks among a run's own images; --data ${displayPath(dir)} is ${recipe ? 'new data for this run' : 'data this checkpoint records no split of'}, ${command === 'eval' ? 'scored' : 'predicted'} whole: leave out --split`);
  }
  return whole(dir);
}

/**
 * A checkpoint's model for inference, on `device` when given (--device; 'cuda' without a usable
 * GPU fails with the reason), else where it was trained, except that a GPU-trained one runs on the
 * CPU when no GPU can run it here. `modelConfig` is the checkpoint's model config (its metadata
 * `config`, CheckpointInfo.config): that is the device loadCheckpoint builds the model on. The
 * trainer's own config (saved.config) may say otherwise: 'auto' for a model it resolved to
 * 'cuda', or anything in a hand-made checkpoint; judging by it let a GPU model fail to load on
 * a machine without a GPU instead of falling back to the CPU.
 */
export async function loadModelForInference(file: string, modelConfig: { device?: Device }, device?: Device): Promise<Model> {
  if (device !== undefined) return loadCheckpoint(file, { device });
  const info = backendInfo();
  if (modelConfig.device === 'cuda' && (!info.cuda || !info.cudaTraining || !info.gpuAvailable)) {
    // Named: in an ensemble "this checkpoint" was said once for each member, the same words.
    process.stderr.write(`note: ${displayPath(file)} was trained on the GPU; no GPU can run it here, so it runs on the CPU\n`);
    return loadCheckpoint(file, { device: 'cpu' });
  }
  return loadCheckpoint(file);
}

/** The checkpoints eval or predict runs: one info standing for them all (the first's recipe and split), and each. */
export interface InferenceInfo extends CheckpointInfo {
  /** Every checkpoint given, in order; the first is the one the info speaks for. */
  members: CheckpointInfo[];
}

/**
 * Reads every --checkpoint and checks that they can run as one ensemble: the same ndim, input
 * channels, classes and annotators (the outputs are averaged value by value), and the same
 * annotator names where both record them. The info is the first checkpoint's (its recipe,
 * saved state and step), with the largest depth (inputs must fit every member), the annotator
 * names any member records, and CMs learnt only when every member learns them.
 */
export async function readInferenceInfo(files: readonly string[]): Promise<InferenceInfo> {
  const members: CheckpointInfo[] = [];
  // A file named again (a a, ./a, a link to it) is read once: its info stands for each naming.
  const read = new Map<string, CheckpointInfo>();
  for (const file of files) {
    const key = sameFileKey(path.resolve(file));
    const info = read.get(key) ?? (await readCheckpointInfo(path.resolve(file)));
    read.set(key, info);
    members.push({ ...info, file: path.resolve(file) });
  }
  const [first] = members;
  const name = (info: CheckpointInfo) => displayPath(info.file);
  const mismatch = ensembleMismatch(members.map((m) => m.config));
  if (mismatch) {
    const { field, index, values } = mismatch;
    throw new UserError(
      `${name(members[index])} and ${name(first)} cannot be averaged: ${field} ${values[1]} in ${name(members[index])}, ${values[0]} in ${name(first)} ` +
        `(the checkpoints of an ensemble must share ${ENSEMBLE_FIELDS.join(', ')})`,
    );
  }
  const named = members.filter((m) => m.namesRecorded);
  const differing = named.find((m) => !sameNames(m.annotatorNames, named[0].annotatorNames));
  if (differing) {
    throw new UserError(
      `${name(differing)} and ${name(named[0])} name their annotators differently (${differing.annotatorNames.join(', ')} vs ${named[0].annotatorNames.join(', ')}): their CM heads cannot be averaged`,
    );
  }
  const learnsCms = members.every((m) => m.learnsCms);
  if (!learnsCms && members.some((m) => m.learnsCms)) {
    const naive = members.find((m) => !m.learnsCms)!;
    process.stderr.write(`note: ${name(naive)} (${methodLabel(naive)}) does not learn annotator CMs: the ensemble's annotator outputs are left out\n`);
  }
  return {
    ...first,
    config: { ...first.config, depth: Math.max(...members.map((m) => m.config.depth)) },
    learnsCms,
    ...(named.length > 0 ? { annotatorNames: [...named[0].annotatorNames], namesRecorded: true } : {}),
    members,
  };
}

/** What decides a run's data and split: two runs that agree on these score the same images against the same labels. */
function dataIdentity(dataset: DatasetSpec): Record<string, unknown> {
  switch (dataset.kind) {
    case 'mnist':
      return { kind: dataset.kind, train: dataset.train, validation: dataset.validation, test: dataset.test, dataSeed: dataset.dataSeed };
    case 'brats':
      // The split before the cache: a differing split is the plainer reason (checkSameRunData names the first difference).
      return { kind: dataset.kind, splits: dataset.splits, cache: dataset.cache };
    case 'folder':
      return { kind: dataset.kind, root: dataset.root, classes: dataset.classes, labelMapping: dataset.labelMapping, annotators: dataset.annotators, splits: dataset.splits };
  }
}

/**
 * For an ensemble on the first run's own split: every other checkpoint must have been trained
 * on the same data with the same split (else its "test" images may be another's training
 * images); the error names the first field that differs.
 */
export function checkSameRunData(info: InferenceInfo, command: 'predict' | 'eval'): void {
  const [first, ...others] = info.members;
  const name = (i: CheckpointInfo) => displayPath(i.file);
  const verb = command === 'eval' ? 'score' : 'predict';
  const dataset = first.recipe!.dataset;
  // An image-folder run's --data <its folder> reads its split again: --split all takes the folder whole.
  const ask =
    dataset.kind === 'folder'
      ? `give --split all to ${verb} every image of ${displayPath(dataset.root)} (--data <dir> --split all where it moved), or --data <dir> to ${verb} another folder, every image of it`
      : `give --data <dir> to ${verb} new data, every image or case of it`;
  const ours = dataIdentity(dataset);
  const ourCache = dataset.kind === 'brats' ? withOwnRunCache(first.recipe!, path.dirname(path.resolve(first.file))).dataset : undefined;
  for (const other of others) {
    if (!other.recipe) throw new UserError(`${name(other)} records no training data, so it cannot be checked to share the split of ${name(first)}: ${ask}`);
    const theirs = dataIdentity(other.recipe.dataset);
    // Two BraTS caches at different paths hold the same data when their indexes agree:
    // `train --data <BraTS folder>` prepares a cache into each run's folder, so two seeds of one
    // folder never shared a path and their ensemble was refused its common test split (the
    // remedy, --data, scores every case, training cases included). Each cache is read where
    // it is now (a moved run folder's own cache, as eval loads it).
    const theirCache = other.recipe.dataset.kind === 'brats' ? withOwnRunCache(other.recipe, path.dirname(path.resolve(other.file))).dataset : undefined;
    const sameData = (key: string) =>
      JSON.stringify(ours[key]) === JSON.stringify(theirs[key]) ||
      (key === 'cache' && ourCache?.kind === 'brats' && theirCache?.kind === 'brats' && sameCacheData(ourCache.cache, theirCache.cache));
    const field = Object.keys({ ...ours, ...theirs }).find((key) => !sameData(key));
    if (field === undefined) continue;
    const scalar = (v: unknown) => typeof v !== 'object' || v === null;
    const differs =
      field === 'cache' && ourCache?.kind === 'brats' && theirCache?.kind === 'brats'
        ? `dataset.cache: ${displayPath(theirCache.cache)} holds other cases or settings than ${displayPath(ourCache.cache)}, or is gone`
        : scalar(ours[field]) && scalar(theirs[field])
          ? `dataset.${field}: ${JSON.stringify(theirs[field])} vs ${JSON.stringify(ours[field])}`
          : `dataset.${field} differ`;
    throw new UserError(
      `${name(other)} was trained on other data than ${name(first)} (${differs}): ` +
        `an ensemble scores the first checkpoint's split only when every run has the same one; ${ask}`,
    );
  }
}

/**
 * Whether two BraTS caches hold the same data: the same preparation settings (annotators,
 * their simulation seed, label mode and scheme, margin, dtype), annotator names, and cases
 * prepared from the same source files (relative name, size, modification time) to the same
 * crop and shape. A cache that is gone or unreadable holds nothing to compare: false.
 */
function sameCacheData(a: string, b: string): boolean {
  if (path.resolve(a) === path.resolve(b)) return true;
  const contents = (dir: string): string | undefined => {
    try {
      const index = readCacheIndex(dir);
      const cases = index.cases.map((c) => ({ id: c.id, sources: c.sources, shape: c.shape, crop: c.crop, present: c.present }));
      return canonicalJson({ settings: index.settings, channels: index.channels, classes: index.classes, names: index.names, cases });
    } catch {
      return undefined;
    }
  };
  const ours = contents(a);
  return ours !== undefined && ours === contents(b);
}

/** JSON with every object's keys sorted: two indexes that say the same thing compare equal. */
function canonicalJson(value: unknown): string {
  if (Array.isArray(value)) return `[${value.map(canonicalJson).join(',')}]`;
  if (value !== null && typeof value === 'object') {
    const entries = Object.entries(value as Record<string, unknown>).filter(([, v]) => v !== undefined);
    return `{${entries.sort(([x], [y]) => (x < y ? -1 : x > y ? 1 : 0)).map(([k, v]) => `${JSON.stringify(k)}:${canonicalJson(v)}`).join(',')}}`;
  }
  return JSON.stringify(value);
}

/** The model eval or predict runs, with what to dispose when done. */
export interface LoadedInference {
  model: InferenceModel;
  /** The models loaded: one for each distinct checkpoint file, however often it was named. */
  models: Model[];
  dispose(): Promise<void>;
}

/** How many distinct checkpoint files the members are (a file named twice predicts once). */
export function distinctCheckpointCount(info: InferenceInfo): number {
  return new Set(info.members.map((m) => sameFileKey(m.file))).size;
}

/** What names one file, whatever path leads to it (./a, a, a link): its real path, or the path itself when it has none. */
function sameFileKey(file: string): string {
  try {
    return fs.realpathSync(file);
  } catch {
    return file;
  }
}

/**
 * Every checkpoint's model (loadModelForInference), as one InferenceModel: their ensemble,
 * padded to the sizes the depth takes (`pad`, for images of any size), mirrored when `tta`
 * (outermost, so that the flips are of the image as given and each is padded alike).
 */
export async function loadInference(info: InferenceInfo, options: { device?: Device; tta?: boolean; pad?: boolean }): Promise<LoadedInference> {
  const models: Model[] = [];
  const dispose = () => Promise.all(models.map((m) => m.dispose())).then(() => undefined);
  // A checkpoint named more than once (--checkpoint a a b, or a and ./a) is loaded once and
  // stands in the ensemble as often as it was named: the mean stays weighted as typed (2/3 a,
  // 1/3 b), without a second copy of its weights and buffers in memory.
  const byFile = new Map<string, Model>();
  const members: Model[] = [];
  try {
    for (const member of info.members) {
      const key = sameFileKey(member.file);
      let loaded = byFile.get(key);
      if (!loaded) {
        loaded = await loadModelForInference(member.file, member.config, options.device);
        models.push(loaded);
        byFile.set(key, loaded);
      }
      members.push(loaded);
    }
  } catch (error) {
    await dispose();
    throw error;
  }
  const repeated = info.members.length - models.length;
  if (repeated > 0) {
    const counts = new Map<string, string[]>();
    for (const m of info.members) counts.set(sameFileKey(m.file), [...(counts.get(sameFileKey(m.file)) ?? []), displayPath(m.file)]);
    const named = [...counts.values()].filter((names) => names.length > 1);
    const said = named.map((names) => `${names[0]} is named ${names.length} times${new Set(names).size > 1 ? ` (as ${[...new Set(names)].join(', ')})` : ''}`).join('; ');
    process.stderr.write(`note: ${said}: loaded and predicted once, it counts as often as named in the mean of the ${info.members.length} checkpoints\n`);
  }
  let model: InferenceModel = ensemble(members);
  if (options.pad) model = paddedToDepth(model);
  if (options.tta) model = mirrored(model);
  return { model, models, dispose };
}

/** The method that names an ensemble in legends: its members' common method, else "ensemble". */
export function inferenceMethod(info: InferenceInfo): string {
  return info.members.every((m) => m.method === info.method) ? methodLabel(info) : 'ensemble';
}

/** How eval's summary line names the model: "cm at step 3", or an ensemble's members, and the TTA. */
export function inferenceLabel(info: InferenceInfo, tta: boolean): string {
  const one = (m: CheckpointInfo) => `${methodLabel(m)} at step ${m.step}`;
  const models = info.members.length === 1 ? one(info) : `ensemble of ${info.members.length} checkpoints (${info.members.map(one).join(', ')})`;
  return tta ? `${models} with mirroring TTA (${2 ** info.config.ndim} flips)` : models;
}

/** How predict's legend names the model: "<file> (cm, step 3)", or the ensemble's members. */
export function modelsDescription(info: InferenceInfo): string {
  const one = (m: CheckpointInfo) => `${m.file} (${methodLabel(m)}, step ${m.step})`;
  return info.members.length === 1 ? one(info) : `the mean (ensemble) of ${info.members.length} checkpoints: ${info.members.map(one).join(', ')}`;
}

/** The legend's line for the mirroring TTA. */
export function ttaDescription(ndim: 2 | 3): string {
  return `Test-time augmentation (--tta): every output is the mean of the predictions of the ${2 ** ndim} mirror images of the input (flips along every combination of the ${ndim} spatial axes), each flipped back.`;
}

/** What the metrics JSON records of the model beside the checkpoint: every checkpoint and the TTA. */
export function inferenceRecord(info: InferenceInfo, tta: boolean): { checkpoints: string[]; tta: boolean } {
  return { checkpoints: info.members.map((m) => m.file), tta };
}

/** A note for images a U-Net of this depth cannot take as they are: how they are padded. */
export function paddingNote(spatial: readonly number[], depth: number): string | undefined {
  const padded = paddedSize(spatial, depth);
  if (padded.every((p, i) => p === spatial[i])) return undefined;
  return `note: the images are ${[...spatial].reverse().join('x')} pixels, not multiples of 2^(depth-1) = ${2 ** (depth - 1)} (depth ${depth}): each is padded to ${[...padded].reverse().join('x')} by repeating its edge pixels, and the predictions are cropped back\n`;
}

/** A 3D checkpoint fit for BraTS cases: 4 input channels (and, to be scored, 4 classes). */
export function checkBratsModel(info: CheckpointInfo, scoring: boolean): void {
  const { config } = info;
  const name = path.basename(info.file);
  if (config.ndim !== 3) throw new UserError(`${name} is a 2D model (config.ndim 2): its --data is a folder of PNG images, not BraTS cases`);
  if (config.inChannels !== BRATS_CHANNELS) {
    throw new UserError(`${name} takes ${config.inChannels} input channel(s), but BraTS cases give ${BRATS_CHANNELS} (${BRATS_MODALITIES.join(', ')}): this model cannot read them`);
  }
  if (scoring && config.classes !== BRATS_CLASSES) {
    throw new UserError(`${name} predicts ${config.classes} classes, but BraTS segmentations hold ${BRATS_CLASSES} (${BRATS_CLASS_NAMES.join(', ')}): eval cannot score it against them`);
  }
}

/** Default sliding-window size of a checkpoint that records none: 64, or the smallest size its depth takes. */
export const DEFAULT_PATCH = 64;

/** The sliding-window size for a 3D checkpoint: --patch, else the run's training patch, else DEFAULT_PATCH (rounded up to what the depth takes). */
export function windowPatch(info: CheckpointInfo, patch: number | undefined): number[] {
  const depth = info.config.depth;
  const multiple = 2 ** (depth - 1);
  if (patch !== undefined && patch % multiple !== 0) {
    const members = 'members' in info ? (info as InferenceInfo).members.length : 1;
    const whose = members > 1 ? `the deepest of the ${members} checkpoints has depth ${depth}` : `the model's depth is ${depth}`;
    throw new UserError(`--patch ${patch} must be a multiple of 2^(depth-1) = ${multiple} (${whose})`);
  }
  // An ensemble's depth is its deepest member's: a shallower member's training patch is rounded up to fit it.
  const size = patch ?? paddedSize([info.recipe?.dataset.kind === 'brats' ? info.recipe.dataset.patch : DEFAULT_PATCH], depth)[0];
  return [size, size, size];
}
