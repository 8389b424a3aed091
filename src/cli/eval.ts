// `cmseg eval`: scores a checkpoint on its run's validation or test split with the SPEC
// section 6 metrics; the data is rebuilt from the recipe stored in the checkpoint. BraTS
// runs score every case of the split as a whole volume (sliding windows) and add the
// challenge's region Dice (whole tumour, tumour core, enhancing tumour). Image-folder runs
// read the folder named in the checkpoint (--data: where it is now, if it moved); without
// an expert consensus they are scored against the annotators' majority vote.
//
// Any checkpoint (one written by the API's saveCheckpoint too, which names no data) is
// scored on new data with --data: every image of a 2D folder (against its consensus/, else
// its annotators' majority vote), or every case of a BraTS folder, case folder or cache
// that has a segmentation (3D). This file also holds what eval and predict share: what a
// checkpoint says about itself, which data --data means for it, and the readers of new
// data (a folder of PNG images; BraTS cases).

import * as fs from 'fs';
import * as path from 'path';
import { Command } from 'commander';
import { UNLABELLED, checkLabels } from '../data/annotators';
import {
  type BratsCase,
  type BratsNaming,
  type CropBox,
  type VolumeGeometry,
  BRATS_CLASS_NAMES,
  BRATS_CLASSES,
  BRATS_CHANNELS,
  BRATS_GEOMETRY_TOLERANCE_MM,
  BRATS_MODALITIES,
  BratsError,
  bratsCaseInFolder,
  bratsLayoutHint,
  discoverBratsCases,
  loadBratsCase,
  preprocessBratsCase,
} from '../data/brats';
import { cacheIndexPath, readCacheIndex, readCachedCase } from '../data/cache';
import { writeFileAtomic } from '../data/files';
import type { BratsDiceReport } from '../eval/brats-regions';
import { formatBratsReport } from '../eval/report';
import type { Extent } from '../data/morphology';
import type { NiftiHeader } from '../data/nifti';
import { type DecodedPng, readPngSync } from '../data/png';
import { loadCheckpoint, readCheckpoint } from '../model/checkpoint';
import type { Device, ModelConfig, ResolvedConfig } from '../model/config';
import { backendInfo, Model, setNumThreads } from '../model/model';
import { evaluationText } from '../report/tables';
import type { AnnotatedSet } from '../train/data';
import { type EvaluationSummary, evaluateAgainstMajority, evaluateModel, evaluateVolumes, fusedLabelRows, paddedSize, paddedToDepth } from '../train/evaluate';
import { ImageFolderError, imageIntensities, type LabelMapping, labelValues, resolveMapping } from '../data/image-folder';
import { type DatasetSpec, type ExperimentData, type ExperimentRuntime, loadExperimentData, type SplitName } from '../train/experiment';
import { METHOD_NAMES, type MethodName, methodDefinition } from '../train/methods';
import { TRAINER_STATE_FORMAT, trainerExtra, TrainerExtra } from '../train/trainer';
import { choiceOption, displayPath, given, parseInteger, parseNumber, printOutputs, UserError, withExamples } from './common';
import type { RunRecipe } from './train';

/** The --device choices of eval and predict. */
export const DEVICES: readonly Device[] = ['cpu', 'cuda', 'auto'];

interface EvalFlags {
  checkpoint: string;
  split: SplitName | 'all';
  out?: string;
  data?: string;
  patch?: number;
  geometryTolerance: number;
  device?: Device;
  threads?: number;
}

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
  const contents = await readCheckpoint(file);
  const { config, extra } = contents;
  const saved = extra.format === TRAINER_STATE_FORMAT ? trainerExtra(extra, file) : undefined;
  const recipe = (saved?.run as unknown as RunRecipe | undefined)?.dataset ? (saved!.run as unknown as RunRecipe) : undefined;
  const R = config.annotators;
  const recorded = saved?.annotatorNames ?? extra.annotatorNames;
  const namesRecorded = Array.isArray(recorded) && recorded.length === R && recorded.every((n) => typeof n === 'string' && n !== '');
  const method = saved?.config.method ?? (METHOD_NAMES.includes(extra.method as MethodName) ? (extra.method as MethodName) : undefined);
  return {
    file,
    config,
    step: saved?.state.step ?? contents.step,
    ...(saved ? { saved } : {}),
    ...(recipe ? { recipe } : {}),
    ...(method ? { method } : {}),
    learnsCms: method ? methodDefinition(method).learnsCms : R > 0,
    annotatorNames: namesRecorded ? [...(recorded as string[])] : Array.from({ length: R }, (_, r) => `annotator${r}`),
    namesRecorded,
  };
}

/** The trainer state and run recipe of a checkpoint written by `cmseg train`. */
export async function checkpointRecipe(file: string): Promise<{ saved: TrainerExtra; recipe: RunRecipe }> {
  const info = await readCheckpointInfo(file);
  if (!info.saved || !info.recipe) throw new UserError(noRecipeMessage(info, 'eval'));
  return { saved: info.saved, recipe: info.recipe };
}

/** Why a checkpoint alone does not say what to predict or score, and what to pass instead. */
function noRecipeMessage(info: CheckpointInfo, command: 'predict' | 'eval'): string {
  const who = info.saved ? 'it was trained through the API, not by cmseg train' : "it was written by the API's saveCheckpoint, not by cmseg train";
  const what = info.config.ndim === 2 ? 'a folder of PNG images (DIR/images/*.png or DIR/*.png)' : 'a BraTS folder, a case folder or a cmseg cache';
  const reference = command === 'eval' ? (info.config.ndim === 2 ? ', with consensus/ or labels/ to score against' : ' whose cases have segmentations') : '';
  return `${path.basename(info.file)} records no training data (${who}): name the data to ${command === 'eval' ? 'score' : 'predict'} with --data <dir>, ${what}${reference}`;
}

/** The trainer state and data of a checkpoint written by `cmseg train`; `data`: the run's image folder, moved there. */
export async function checkpointExperiment(file: string, data?: string): Promise<{ saved: TrainerExtra; recipe: RunRecipe; data: ExperimentData }> {
  const { saved, recipe } = await checkpointRecipe(file);
  const dataset = relocatedDataset(recipe, data, file);
  return { saved, recipe: { ...recipe, dataset }, data: loadRunData(dataset, saved.config.seed) };
}

/** A run's data set, read from `data` instead of where it was trained when given (--data: the image folder moved). */
export function relocatedDataset(recipe: RunRecipe, data: string | undefined, file: string): DatasetSpec {
  if (data === undefined) return recipe.dataset;
  if (recipe.dataset.kind !== 'folder') {
    throw new UserError(`--data is for runs on an image folder (--preset images); ${path.basename(file)} is a ${recipe.preset} run, which reads the data its checkpoint names`);
  }
  return { ...recipe.dataset, root: path.resolve(data) };
}

/** What eval or predict works on: the run's own split (of its data, or of its image folder moved to --data), or new data, whole. */
export type DataTarget =
  | { kind: 'run'; saved: TrainerExtra; recipe: RunRecipe }
  | { kind: 'images'; dir: string; labelMapping?: LabelMapping }
  | { kind: 'volumes'; dir: string };

/**
 * Which data `--data` (or its absence) means for a checkpoint. Without --data: the run's
 * --split (an API checkpoint has none: an error asking for --data). With it: an image-folder
 * run's folder where it is now when --data is that folder, the recorded one is gone (it
 * moved) or --split is typed; otherwise new data: every image or case of --data (--split all
 * asks for that in any case). A BraTS run's --data is always new cases.
 */
export function dataTarget(info: CheckpointInfo, flags: { data?: string; split: string }, splitTyped: boolean, command: 'predict' | 'eval'): DataTarget {
  const { recipe, saved } = info;
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
  if (!fs.statSync(dir).isDirectory()) throw new UserError(`--data must be a folder: ${dir}`);
  if (recipe && saved && recipe.dataset.kind === 'folder' && flags.split !== 'all') {
    const root = recipe.dataset.root;
    if (splitTyped || dir === path.resolve(root) || !fs.existsSync(root)) return { kind: 'run', saved, recipe: { ...recipe, dataset: { ...recipe.dataset, root: dir } } };
    process.stderr.write(
      `note: ${displayPath(dir)} is not the run's image folder (${displayPath(root)} is still there): ${command === 'eval' ? 'scoring' : 'predicting'} every image in it; ` +
        `--split ${command === 'eval' ? 'test|validation' : 'test|validation|train'} would read the run's split from it instead\n`,
    );
    return whole(dir);
  }
  if (splitTyped && flags.split !== 'all') {
    throw new UserError(`--split ${flags.split} picks among a run's own images; --data ${displayPath(dir)} is ${recipe ? 'new data for this run' : 'data this checkpoint records no split of'}, ${command === 'eval' ? 'scored' : 'predicted'} whole: leave out --split`);
  }
  return whole(dir);
}

/** loadExperimentData, with one-line messages for an image folder that moved or does not fit the run. */
export function loadRunData(dataset: DatasetSpec, seed: number, runtime?: ExperimentRuntime): ExperimentData {
  if (dataset.kind === 'folder' && dataset.root && !fs.existsSync(dataset.root)) {
    throw new UserError(`the run's image folder ${dataset.root} is gone; if it moved, name its new place with --data`);
  }
  try {
    return loadExperimentData(dataset, seed, runtime);
  } catch (error) {
    if (error instanceof ImageFolderError) throw new UserError(error.message);
    throw error;
  }
}

/** How a summary's heading says what the consensus figures compare with (nothing for an expert consensus). */
export function referenceNote(summary: EvaluationSummary): string {
  return summary.reference ? `, against the annotators' ${summary.reference} (no expert consensus, so no CM error)` : '';
}

/**
 * A checkpoint's model for inference, on `device` when given (--device; 'cuda' without a usable
 * GPU fails with the reason), else where it was trained, except that a GPU-trained one runs on the
 * CPU when no GPU can run it here.
 */
export async function loadModelForInference(file: string, saved: { config: { device?: Device } }, device?: Device): Promise<Model> {
  const overrides: Partial<ModelConfig> = {};
  if (device !== undefined) return loadCheckpoint(file, { device });
  const info = backendInfo() as ReturnType<typeof backendInfo> & { cudaTraining?: boolean };
  if (saved.config.device === 'cuda' && (!info.cuda || info.cudaTraining === false || !info.gpuAvailable)) {
    process.stderr.write('note: this checkpoint was trained on the GPU; no GPU can run it here, so it runs on the CPU\n');
    overrides.device = 'cpu';
  }
  return loadCheckpoint(file, overrides);
}

/** The BraTS region table of a summary (empty for other data sets). */
export function bratsText(summary: EvaluationSummary): string {
  if (!summary.brats) return '';
  // formatBratsReport reads the summary figures only, never the per-image arrays.
  const report = { images: summary.images, ...summary.brats } as unknown as BratsDiceReport;
  return '\n' + formatBratsReport(report) + '\n';
}

// ---------------------------------------------------------------------------
// New 2D data: a folder of PNG images

/** Every image of a folder, with whatever labels and consensus it has, ready for a checkpoint's model. */
export interface ImagesToPredict {
  /** names: the image file names, sorted; annotatorNames: the model's CM heads. */
  set: AnnotatedSet & { names: string[] };
  /** Where the images are: DIR/images or DIR itself. */
  imagesDir: string;
  /** Annotators with at least one label file. */
  labelled: string[];
}

function isDirectory(folder: string): boolean {
  try {
    return fs.statSync(folder).isDirectory();
  } catch {
    return false;
  }
}

function holdsNifti(folder: string): boolean {
  return fs.readdirSync(folder).some((name) => /\.nii(\.gz)?$/i.test(name));
}

function pngFiles(folder: string): string[] {
  return fs
    .readdirSync(folder)
    .filter((name) => !name.startsWith('.') && name.toLowerCase().endsWith('.png'))
    .sort();
}

/**
 * Reads every PNG of `dir` for a 2D checkpoint: DIR/images/*.png (then DIR/labels/<annotator>/
 * and DIR/consensus/ are read too, when there) or, without images/, DIR/*.png. Images of any
 * one size (the model pads them: paddedToDepth); a model of 1 input channel reads them as
 * gray, of 3 as RGB. Label maps are read for the model's annotators by name; a checkpoint
 * that records no names takes labels/'s folders in sorted order when there are R of them.
 */
export function loadImagesToPredict(dir: string, info: CheckpointInfo, labelMapping: LabelMapping = 'auto'): ImagesToPredict {
  const { config } = info;
  if (config.ndim !== 2) throw new UserError(`${path.basename(info.file)} is a 3D model: its --data is BraTS cases, not images`);
  const layout = isDirectory(path.join(dir, 'images'));
  const imagesDir = layout ? path.join(dir, 'images') : dir;
  const names = pngFiles(imagesDir);
  if (names.length === 0) {
    const brats = holdsNifti(dir) || fs.readdirSync(dir).some((n) => isDirectory(path.join(dir, n)) && holdsNifti(path.join(dir, n)));
    throw new UserError(
      `--data ${displayPath(dir)} holds no PNG images (expected ${layout ? `${displayPath(imagesDir)}/<name>.png` : 'DIR/images/<name>.png or DIR/<name>.png'})` +
        (brats ? `; ${path.basename(info.file)} is a 2D model (config.ndim 2), and NIfTI volumes need a 3D one` : ''),
    );
  }
  const channels = config.inChannels;
  if (channels !== 1 && channels !== 3) {
    throw new UserError(`${path.basename(info.file)} takes ${channels} input channels; PNG images give 1 (gray) or 3 (RGB), so this model cannot read them`);
  }
  const firstFile = path.join(imagesDir, names[0]);
  const first = readPngSync(firstFile);
  const [h, w] = [first.height, first.width];
  const V = h * w;
  const sameSize = (png: DecodedPng, file: string) => {
    if (png.width !== w || png.height !== h) {
      throw new UserError(`${displayPath(file)} is ${png.width}x${png.height}, but ${displayPath(firstFile)} is ${w}x${h}: the images of one --data folder must share one size`);
    }
  };
  const L = config.classes;
  let mapping: 'value' | 'binary';
  try {
    mapping = resolveMapping(labelMapping, L);
  } catch (error) {
    throw new UserError((error as Error).message);
  }
  const readLabels = (file: string, target: Uint8Array) => {
    const png = readPngSync(file);
    sameSize(png, file);
    try {
      labelValues(png, file, mapping, target);
      checkLabels(displayPath(file), target, L, true);
    } catch (error) {
      if (error instanceof ImageFolderError || error instanceof RangeError) throw new UserError(`${(error as Error).message} (the model has ${L} classes)`);
      throw error;
    }
  };

  // The model's annotators, and the folder of labels/ each one's maps are in (if any).
  const R = config.annotators;
  const labelsDir = path.join(dir, 'labels');
  const folders = layout && isDirectory(labelsDir) ? fs.readdirSync(labelsDir).filter((n) => !n.startsWith('.') && isDirectory(path.join(labelsDir, n))).sort() : [];
  let annotatorNames = info.annotatorNames;
  if (!info.namesRecorded && folders.length > 0) {
    if (folders.length === R) {
      annotatorNames = folders;
      process.stderr.write(`note: ${path.basename(info.file)} records no annotator names: labels/'s folders, in sorted order (${folders.join(', ')}), are taken as its CM heads 0..${R - 1}\n`);
    } else {
      process.stderr.write(`note: ${path.basename(info.file)} records no annotator names, and labels/ has ${folders.length} folders for its ${R} CM heads: the labels are not read\n`);
    }
  }
  const unused = folders.filter((f) => !annotatorNames.includes(f));
  if (unused.length > 0 && annotatorNames !== folders && (info.namesRecorded || folders.length === R)) {
    process.stderr.write(`note: labels/${unused.join(', labels/')} ${unused.length === 1 ? 'is' : 'are'} not among the model's annotators (${annotatorNames.join(', ')}): not read\n`);
  }

  const consensusDir = path.join(dir, 'consensus');
  const hasConsensus = layout && isDirectory(consensusDir);
  const count = names.length;
  const images = new Float32Array(count * channels * V);
  const labels = annotatorNames.map(() => new Uint8Array(count * V).fill(UNLABELLED));
  const present = new Uint8Array(count * R);
  const consensus = hasConsensus ? new Uint8Array(count * V) : undefined;
  const labelled = new Set<string>();
  names.forEach((name, n) => {
    const file = path.join(imagesDir, name);
    const png = n === 0 ? first : readPngSync(file);
    sameSize(png, file);
    imageIntensities(png, channels, images.subarray(n * channels * V, (n + 1) * channels * V));
    annotatorNames.forEach((annotator, r) => {
      const labelFile = path.join(labelsDir, annotator, name);
      if (!folders.includes(annotator) || !fs.existsSync(labelFile)) return;
      readLabels(labelFile, labels[r].subarray(n * V, (n + 1) * V));
      present[n * R + r] = 1;
      labelled.add(annotator);
    });
    if (consensus) {
      const consensusFile = path.join(consensusDir, name);
      if (!fs.existsSync(consensusFile)) throw new UserError(`consensus/ exists but has no ${name}: ${displayPath(consensusFile)}`);
      readLabels(consensusFile, consensus.subarray(n * V, (n + 1) * V));
    }
  });
  const set = { count, channels, classes: L, spatial: [h, w], images, labels, present, ...(consensus ? { consensus } : {}), annotatorNames: [...annotatorNames], names };
  return { set, imagesDir, labelled: annotatorNames.filter((a) => labelled.has(a)) };
}

/** A note for images a U-Net of this depth cannot take as they are: how they are padded. */
export function paddingNote(spatial: readonly number[], depth: number): string | undefined {
  const padded = paddedSize(spatial, depth);
  if (padded.every((p, i) => p === spatial[i])) return undefined;
  return `note: the images are ${[...spatial].reverse().join('x')} pixels, not multiples of 2^(depth-1) = ${2 ** (depth - 1)} (depth ${depth}): each is padded to ${[...padded].reverse().join('x')} by repeating its edge pixels, and the predictions are cropped back\n`;
}

// ---------------------------------------------------------------------------
// 3D data: whole BraTS cases

/** One case ready for the model, and what is needed to put its prediction back. */
export interface CaseToPredict {
  id: string;
  naming: BratsNaming;
  /** z-scored, cropped [C, D, H, W]. */
  images: Float32Array;
  extent: Extent;
  crop: CropBox;
  original: VolumeGeometry;
  /** The case's t1 header: written predictions copy its geometry bit for bit. */
  header?: NiftiHeader;
  /** Cropped expert labels 0..3, when the case has them. */
  seg?: Uint8Array;
  /** A cache's annotators: one cropped map per annotator, and which labelled the case. */
  labels?: Uint8Array[];
  present?: Uint8Array;
}

export interface CaseList {
  ids: string[];
  /** Where they come from, for the report. */
  from: string;
  /** The annotators of a cache, in its order. */
  annotators?: string[];
  load(id: string): Promise<CaseToPredict>;
}

export function cacheCases(cacheDir: string, ids?: readonly string[]): CaseList {
  const index = readCacheIndex(cacheDir);
  const naming = new Map(index.cases.map((c) => [c.id, c.naming]));
  return {
    ids: ids ? [...ids] : index.cases.map((c) => c.id),
    from: `the cache ${displayPath(cacheDir)}`,
    annotators: [...index.names],
    load: async (id) => {
      const c = await readCachedCase(cacheDir, id, index);
      return {
        id,
        naming: naming.get(id) ?? '2021',
        images: c.images,
        extent: c.extent,
        crop: c.crop,
        original: c.original,
        header: c.niftiHeader,
        seg: c.consensus,
        labels: c.labels,
        present: c.present,
      };
    },
  };
}

/**
 * Cases read from NIfTI files and preprocessed as `cmseg prepare` does. For prediction
 * (`requireSeg` false) a case's segmentation is optional and a bad one only warned about;
 * for scoring, cases without one are left out with a note and a bad one is an error.
 */
export function folderCases(dir: string, geometryTolerance: number, requireSeg = false): CaseList {
  const single = singleCase(dir);
  let cases = single ? [single] : [];
  try {
    if (!single) cases = discoverBratsCases(dir, { requireSeg: false, onSkipped: (note) => process.stderr.write(`note: ${note}\n`) });
  } catch (error) {
    if (error instanceof BratsError && error.kind === 'no-cases') {
      const hint = bratsLayoutHint(dir);
      throw new UserError(`--data ${dir} is not a BraTS case, a BraTS folder or a cmseg cache${hint ? `: ${hint}` : ''}`);
    }
    throw error;
  }
  if (requireSeg) {
    const without = cases.filter((c) => !c.seg);
    if (without.length === cases.length) {
      throw new UserError(`no case in ${displayPath(dir)} has a segmentation (${cases[0].naming === '2023' ? 'ID-seg' : 'ID_seg'}.nii.gz): eval needs one to score against (cmseg predict predicts without)`);
    }
    if (without.length > 0) {
      process.stderr.write(`note: ${without.length} case(s) without a segmentation are not scored: ${without.slice(0, 3).map((c) => c.id).join(', ')}${without.length > 3 ? ', ...' : ''}\n`);
      cases = cases.filter((c) => c.seg);
    }
  }
  const byId = new Map(cases.map((c) => [c.id, c]));
  return {
    ids: cases.map((c) => c.id),
    from: single ? `the case folder ${displayPath(dir)}` : `the BraTS folder ${displayPath(dir)}`,
    load: async (id) => {
      const c = byId.get(id)!;
      // For predictions the segmentation only draws the expert picture: a bad one is no reason not to predict.
      const onBadSeg = (error: Error) =>
        process.stderr.write(`warning: ${oneLine(error.message)}; predicting ${id} without its segmentation (used only for the picture)\n`);
      const volume = await loadBratsCase(c, { geometryTolerance, ...(requireSeg ? {} : { onBadSeg }) });
      const pre = preprocessBratsCase(volume);
      return { id, naming: c.naming, images: pre.images, extent: pre.extent, crop: pre.crop, original: pre.original, header: volume.header, seg: pre.seg };
    },
  };
}

/** The case `dir` is the folder of, or undefined when it holds no case's own files (a BraTS folder, perhaps with stray NIfTI files). */
function singleCase(dir: string): BratsCase | undefined {
  try {
    return bratsCaseInFolder(dir, { requireSeg: false });
  } catch (error) {
    if (error instanceof BratsError && (error.kind === 'not-a-case' || error.kind === 'misnamed-case')) return undefined;
    throw error;
  }
}

function oneLine(text: string): string {
  return text.replace(/\s*\n\s*/g, ' ');
}

/** The cases of --data: a cmseg cache, or NIfTI cases (a case folder or a BraTS folder). */
export function casesInData(dir: string, geometryTolerance: number, requireSeg = false): CaseList {
  return fs.existsSync(cacheIndexPath(dir)) ? cacheCases(dir) : folderCases(dir, geometryTolerance, requireSeg);
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
  if (patch !== undefined && patch % multiple !== 0) throw new UserError(`--patch ${patch} must be a multiple of 2^(depth-1) = ${multiple} (the model's depth is ${depth})`);
  const size = patch ?? (info.recipe?.dataset.kind === 'brats' ? info.recipe.dataset.patch : paddedSize([DEFAULT_PATCH], depth)[0]);
  return [size, size, size];
}

async function runEval(flags: EvalFlags, splitTyped: boolean): Promise<void> {
  if (flags.threads !== undefined) setNumThreads(flags.threads);
  const file = path.resolve(flags.checkpoint);
  const info = await readCheckpointInfo(file);
  const target = dataTarget(info, flags, splitTyped, 'eval');
  if (target.kind !== 'run') return evalWhole(flags, info, target);
  const { saved, recipe } = target;
  const split = flags.split as SplitName;
  const data = loadRunData(recipe.dataset, saved.config.seed);
  try {
    const model = await loadModelForInference(file, saved, flags.device);
    // Methods without trained CMs (naive, oracle) are scored on the consensus only.
    const summary = await data.evaluate(model, split, { annotators: methodDefinition(saved.config.method).learnsCms });
    const fused = split === 'test' ? data.fusedLabelRows?.() : undefined;
    const out = path.resolve(flags.out ?? path.join(path.dirname(file), `eval-${split}-${path.basename(file, '.safetensors')}.json`));
    fs.mkdirSync(path.dirname(out), { recursive: true });
    const record = { checkpoint: file, method: saved.config.method, preset: recipe.preset, dataset: recipe.dataset, seed: saved.config.seed, step: saved.state.step, split, metrics: summary, fusedLabels: fused ?? null };
    await writeFileAtomic(out, Buffer.from(JSON.stringify(record, null, 2) + '\n'));
    process.stdout.write(`${saved.config.method} at step ${saved.state.step}, ${split} split${referenceNote(summary)}:\n` + evaluationText(summary, fused, { classNames: data.classNames }) + bratsText(summary) + '\n');
    printOutputs([['metrics', out]]);
  } finally {
    await data.close?.();
  }
}

/**
 * Scores a checkpoint on every image or case of new data (--data): 2D against the folder's
 * consensus/ (else the majority vote of its labels/), 3D against each case's segmentation.
 */
async function evalWhole(flags: EvalFlags, info: CheckpointInfo, target: Extract<DataTarget, { kind: 'images' | 'volumes' }>): Promise<void> {
  const { file } = info;
  const dir = target.dir;
  let summary: EvaluationSummary;
  let fused: ReturnType<typeof fusedLabelRows> | undefined;
  let classNames: string[] | undefined;
  let what: string;
  if (target.kind === 'images') {
    const { set, labelled } = loadImagesToPredict(dir, info, target.labelMapping);
    if (!set.consensus && labelled.length === 0) {
      throw new UserError(
        `${displayPath(dir)} has no consensus/ and no labels/<annotator>/ maps of this model's annotators (${set.annotatorNames.join(', ')}): eval needs a reference to score against (cmseg predict draws predictions without one)`,
      );
    }
    const note = paddingNote(set.spatial, info.config.depth);
    if (note) process.stderr.write(note);
    const model = await loadModelForInference(file, info.saved ?? { config: info.config }, flags.device);
    try {
      const scored = paddedToDepth(model);
      // The CM figures need the annotators' own maps; a vote of them stands in for a missing consensus.
      const annotators = info.learnsCms && labelled.length > 0;
      summary = set.consensus ? await evaluateModel(scored, set, { annotators }) : await evaluateAgainstMajority(scored, set, { annotators });
      fused = set.consensus && labelled.length > 0 ? fusedLabelRows(set) : undefined;
    } finally {
      await model.dispose();
    }
    classNames = set.classes === 2 ? ['background', 'foreground'] : undefined;
    what = `${set.count} images of ${displayPath(dir)}`;
  } else {
    checkBratsModel(info, true);
    const list = casesInData(dir, flags.geometryTolerance, true);
    const patch = windowPatch(info, flags.patch);
    const overlap = info.recipe?.dataset.kind === 'brats' ? info.recipe.dataset.overlap : 0.5;
    const R = info.config.annotators;
    // A cache's annotators are scored when they are the model's (same count, and the same names when the checkpoint records them).
    const cacheAnnotators = list.annotators;
    const annotators =
      info.learnsCms && cacheAnnotators !== undefined && cacheAnnotators.length === R && (!info.namesRecorded || cacheAnnotators.every((n, r) => n === info.annotatorNames[r]));
    const model = await loadModelForInference(file, info.saved ?? { config: info.config }, flags.device);
    try {
      summary = await evaluateVolumes(
        model,
        list.ids,
        async (id) => {
          const c = await list.load(id);
          if (!c.seg) throw new UserError(`case ${id} has no usable segmentation to score against`);
          return { id, images: c.images, extent: c.extent, consensus: c.seg, labels: c.labels ?? [], present: c.present ?? new Uint8Array(0) };
        },
        {
          patch,
          overlap,
          annotators,
          annotatorNames: annotators ? [...cacheAnnotators!] : info.annotatorNames,
          bratsRegions: true,
          onVolume: (score, done, total) => process.stderr.write(`[${done}/${total}] ${score.id}: total Dice ${score.totalDice.toFixed(4)}\n`),
        },
      );
    } finally {
      await model.dispose();
    }
    classNames = [...BRATS_CLASS_NAMES];
    what = `${list.ids.length} case(s) from ${list.from}`;
  }
  const label = info.method ?? 'model';
  const out = path.resolve(flags.out ?? path.join(path.dirname(file), `eval-${path.basename(dir)}-${path.basename(file, '.safetensors')}.json`));
  fs.mkdirSync(path.dirname(out), { recursive: true });
  const record = { checkpoint: file, method: info.method ?? null, preset: info.recipe?.preset ?? null, data: dir, step: info.step, split: 'all', metrics: summary, fusedLabels: fused ?? null };
  await writeFileAtomic(out, Buffer.from(JSON.stringify(record, null, 2) + '\n'));
  process.stdout.write(`${label} at step ${info.step}, ${what}${referenceNote(summary)}:\n` + evaluationText(summary, fused, { classNames }) + bratsText(summary) + '\n');
  printOutputs([['metrics', out]]);
}

export function registerEvalCommand(program: Command): Command {
  const command = program
    .command('eval')
    .description('score a checkpoint on its run\'s test (or validation) split, or on new data (--data): Dice, CM error, GED, reliability')
    .requiredOption('--checkpoint <file>', 'a checkpoint written by cmseg train (best.safetensors or last.safetensors), or by the API\'s saveCheckpoint (then --data is needed)')
    .addOption(choiceOption('--split <name>', "which of the run's splits to score; all: every image or case of --data", ['test', 'validation', 'all']).default('test'))
    .option('--out <file>', 'where to write the metrics JSON (default: eval-<split>-<checkpoint>.json, or eval-<data folder>-<checkpoint>.json for --data, beside the checkpoint)')
    .option(
      '--data <dir>',
      "new data, scored whole: 2D a folder of PNGs (DIR/images/ with consensus/ or labels/<annotator>/ to score against); 3D a BraTS folder, case folder or cache " +
        "(cases with a segmentation). For an image-folder run, its own folder (where it was, where it moved if the old place is gone, or any folder with --split typed) gives the run's --split",
    )
    .option('--patch <n>', '3D: sliding-window size (default: the run\'s training patch; 64 for a checkpoint without a run)', parseInteger(1))
    .option('--geometry-tolerance <mm>', "3D: how far apart a case's files may put one voxel and still count as one grid", parseNumber(0), BRATS_GEOMETRY_TOLERANCE_MM)
    .addOption(choiceOption('--device <name>', 'where the model runs (default: where it was trained; the CPU when no GPU can run it)', DEVICES))
    .option('--threads <n>', 'native threads', parseInteger(1))
    .action((flags: EvalFlags, cmd: Command) => runEval(flags, given(cmd, 'split')));
  return withExamples(
    command,
    'cmseg eval --checkpoint runs/cm-dense/best.safetensors --split test',
    'cmseg eval --checkpoint runs/brats-cm/best.safetensors --split validation',
    'cmseg eval --checkpoint model.safetensors --data data/noisy',
  );
}
