// An experiment's data: where training batches come from and how a model is scored on the
// validation and test splits. The trainer and the CLI only see ExperimentData, so a new
// data set (a BraTS patch loader with sliding-window evaluation, say) plugs in by adding
// a DatasetSpec kind and a case to loadExperimentData.
//
// MNIST (paper section 3.1): the package's digits split by `dataSeed`, the four synthetic
// annotators of SPEC section 7 (good, over, under, fracture) on the training images in
// `dense` or `single` label mode. Validation and test images get every annotator (dense
// labels) so that every annotator's CM estimate is scored on every image; the fused-label
// rows use the test images labelled in the run's label mode, as the training set is.
//
// BraTS (paper section 3.1, SPEC brats3d): a cache prepared by `cmseg prepare`
// (src/data/cache.ts), its cases split once into training, validation and test by
// `dataSeed` (the split is stored in the spec, hence in every checkpoint). Training reads
// random patches through the patch loader (src/data/patch-loader.ts, which augments by
// itself); validation and test predict each whole cropped case by sliding windows of the
// training patch size and score it with the SPEC section 6 metrics and the BraTS regions.
// After every epoch only the first `validationCases` validation cases are scored (whole
// volumes are slow on a CPU); `cmseg eval` scores the whole split. The STAPLE baselines
// fuse each training case once into the cache (src/fusion/fuse-cache.ts) and train on
// patches of the fused maps; they are scored against the consensus like every method.
//
// Image folders (a user's own 2D data, LIDC style; src/data/image-folder.ts): the images
// are split by name once, by `dataSeed` (70/15/15, stored in the spec like BraTS's case
// split, so later images in the folder join no split), and read into memory as MNIST is.
// Files an annotator did not write are absent labels. Validation and test score against
// consensus/ when the folder has one (with the CM error, each annotator's true CM on an
// image being its labels against the consensus); without it, against the annotators'
// majority vote, without the CM error. The STAPLE baselines fuse the training set once,
// as for MNIST.

import * as fs from 'fs';
import * as path from 'path';
import { AnnotatorSpec, LabelMode, simulateAnnotators } from '../data/annotators';
import { type BratsLabelScheme, bratsClassNames } from '../data/brats';
import { type CacheIndex, damagedCaseFiles, cacheLabelScheme, damagedCasesMessage, readCacheIndex, readCachedCaseForScoring } from '../data/cache';
import { ImageFolderError, type LabelMapping, loadImageFolder } from '../data/image-folder';
import { loadMnistSplits, MnistBatch } from '../data/mnist';
import { PatchLoader } from '../data/patch-loader';
import { Rng } from '../data/random';
import { fuse, stapleFuseOptions, type StapleFusion } from '../fusion/fuse';
import { type FuseCacheProgress, fuseCachedCases } from '../fusion/fuse-cache';
import type { Model } from '../model/model';
import { AnnotatedSet, gatherBatch, InMemorySource, TrainingSource } from './data';
import { evaluateAgainstMajority, evaluateModel, evaluateVolumes, EvaluationSummary, fusedLabelRows, FusedLabelRows, type InferenceModel, type VolumeScore } from './evaluate';
import { PatchStream, PatchStreamSource } from './patch-source';

/** The paper's four MNIST annotators with the SPEC section 7 defaults. */
export const MNIST_ANNOTATORS: readonly AnnotatorSpec[] = [{ kind: 'good' }, { kind: 'over' }, { kind: 'under' }, { kind: 'fracture' }];

export interface MnistDatasetSpec {
  kind: 'mnist';
  /** Images per split (at most 10,000 in all). */
  train: number;
  validation: number;
  test: number;
  labels: LabelMode;
  /** Seeds the split and the annotators; kept apart from the training seed so that runs with different seeds see the same data. */
  dataSeed: number;
}

/** Case ids per split. */
export interface CaseSplits {
  train: string[];
  validation: string[];
  test: string[];
}

export interface BratsDatasetSpec {
  kind: 'brats';
  /** The prepared cache (absolute path); '' in a preset until the command line names the data. */
  cache: string;
  /** The cache's label mode (every annotator on every case, or one annotator per case). */
  labels: LabelMode;
  /** Edge of the cubic training patch; also the sliding-window size when scoring and predicting. */
  patch: number;
  /** Sliding-window overlap when scoring (SPEC section 5: 0.5). */
  overlap: number;
  /** Patch batches per "epoch": how often the trainer validates and saves. */
  stepsPerEpoch: number;
  /** Validation cases scored after every epoch (the first ones of the split). */
  validationCases: number;
  /** Seeds the case split (and the annotators when `cmseg train` prepares the cache). */
  dataSeed: number;
  /** The loader's flips and intensity changes. */
  augment: boolean;
  /** Share of training patches centred on a tumour voxel (nnU-Net: 1/3). */
  foregroundFraction: number;
  /** Fixed when a run starts (bratsCaseSplits); empty in a preset. */
  splits: CaseSplits;
  /**
   * How the cache's segmentations were read, when not the default 'brats' (cacheLabelScheme):
   * 'peds2024' for BraTS-PEDs 2024. A cache prepared again with another scheme keeps its case
   * ids but not what the classes mean: resume and eval check it (checkRunCache).
   */
  labelScheme?: BratsLabelScheme;
}

export interface FolderDatasetSpec {
  kind: 'folder';
  /** The image folder (absolute path); '' in a preset until the command line names the data. */
  root: string;
  /** Classes L including background. */
  classes: number;
  /** How label PNGs are read (image-folder.ts); 'auto' in a preset, resolved when a run starts. */
  labelMapping: LabelMapping;
  /** The annotator folders, in the order of the model's CM heads; fixed when a run starts. */
  annotators: string[];
  /** Seeds the image split. */
  dataSeed: number;
  /** Image file names per split, fixed when a run starts (imageFolderSplits); empty in a preset. */
  splits: CaseSplits;
  /**
   * Whether the folder had consensus/ when the run started, which decides what validation
   * scores against (it, or the annotators' majority vote) and so what `best` means. Absent
   * in a preset and in runs of cmseg versions that did not record it.
   */
  consensus?: boolean;
}

/** Every data set the CLI knows. */
export type DatasetSpec = MnistDatasetSpec | BratsDatasetSpec | FolderDatasetSpec;

/** What a run trained on, as `cmseg train` saves it in its checkpoints: the preset and the data set with its split. */
export interface RunRecipe {
  preset: string;
  dataset: DatasetSpec;
}

export type SplitName = 'validation' | 'test';

export interface FusedTargetsOptions {
  /** BraTS: called after every training case (fused, or found current in the cache). */
  onCase?: (progress: FuseCacheProgress) => void | Promise<void>;
}

/** What prepareFusedTargets did. */
export interface FusedTargetsReport {
  fusion: StapleFusion;
  /** 'set': one STAPLE over the whole in-memory training set (MNIST); 'cases': one per case (BraTS). */
  scope: 'set' | 'cases';
  /** Images (set) or cases fused now. */
  fused: number;
  /** Cases whose maps the cache already held. */
  reused: number;
  ms: number;
}

/** How a run reads its data; none of it changes the results. */
export interface ExperimentRuntime {
  /** Images per training batch (the patch loader builds batches of this size); default 1. */
  batchSize?: number;
  /** Patch-loader worker threads (0: in the main thread); default the loader's. */
  workers?: number;
}

export interface ExperimentEvaluateOptions {
  /** Score the annotator CMs (CM error, reliability, GED); default true. */
  annotators?: boolean;
  /** The quick check made after every epoch (BraTS: a subset of the validation cases). */
  quick?: boolean;
  /** BraTS: the sliding-window size per spatial axis (default: the training patch; cmseg eval passes its window, fit for an ensemble's deepest member). */
  patch?: number[];
  /** BraTS: the sliding-window overlap (default: the spec's). */
  overlap?: number;
  /** BraTS: windows per predict call (default 2). */
  windowBatch?: number;
  /** BraTS: called after each batch of a case's windows, and after each case. */
  onWindows?: (id: string, done: number, total: number) => void;
  onVolume?: (score: VolumeScore, done: number, total: number) => void;
  /**
   * BraTS: `done` of `total` cases scored, with `id` the case about to be read and scored
   * (absent once all are): before each case and after the last (hooks.validate's progress).
   * The 2D data sets score a batch of images in seconds and do not call it.
   */
  onCase?: (done: number, total: number, id?: string) => void;
}

export interface ExperimentData {
  source: TrainingSource;
  /** Names of the classes for reports, index = label. */
  classNames?: string[];
  /** What evaluate() scores the consensus against when it is not the expert consensus. */
  reference?: 'majority vote';
  /** Scores a model on a split (every epoch on validation, at the end on test). */
  evaluate(model: InferenceModel, split: SplitName, options?: ExperimentEvaluateOptions): Promise<EvaluationSummary>;
  /** Dice of the naive fused label maps on the test split (tables' "Mean labels" / "Mode labels"). */
  fusedLabelRows?(): FusedLabelRows;
  /**
   * Fuses the training annotations once with a native STAPLE method and attaches the
   * result to the training set (the `naive-staple` / `naive-spatial-staple` targets).
   */
  prepareFusedTargets?(fusion: StapleFusion, options?: FusedTargetsOptions): Promise<FusedTargetsReport>;
  /** An in-memory split, for pictures (cmseg predict). */
  split?(split: SplitName | 'train'): AnnotatedSet;
  /** Releases what the data holds open (patch-loader workers, files). */
  close?(): Promise<void>;
}

function annotatorSeed(dataSeed: number, split: string): number {
  return new Rng(dataSeed).fork(`${split} annotators`).nextUint32();
}

function annotate(batch: MnistBatch, specs: readonly AnnotatorSpec[], mode: LabelMode, seed: number): AnnotatedSet {
  const sim = simulateAnnotators(batch.consensus, batch.extent, batch.classes, specs, { seed, mode });
  return {
    count: batch.count,
    channels: batch.channels,
    classes: batch.classes,
    spatial: [batch.extent.h, batch.extent.w],
    images: batch.images,
    labels: sim.labels,
    present: sim.present,
    consensus: batch.consensus,
    annotatorNames: sim.names,
  };
}

export function loadMnistExperiment(spec: MnistDatasetSpec, trainingSeed: number): ExperimentData {
  if (!(spec.train >= 1 && spec.validation >= 1 && spec.test >= 1)) throw new RangeError('every MNIST split needs at least one image');
  const splits = loadMnistSplits({ seed: spec.dataSeed, train: spec.train, validation: spec.validation, test: spec.test });
  const train = annotate(splits.train, MNIST_ANNOTATORS, spec.labels, annotatorSeed(spec.dataSeed, 'train'));
  const validation = annotate(splits.validation, MNIST_ANNOTATORS, 'dense', annotatorSeed(spec.dataSeed, 'validation'));
  const testSeed = annotatorSeed(spec.dataSeed, 'test');
  const test = annotate(splits.test, MNIST_ANNOTATORS, 'dense', testSeed);
  let testInRunMode: AnnotatedSet | undefined;
  const sets = { train, validation, test };
  return {
    source: new InMemorySource(train, trainingSeed),
    classNames: ['background', 'digit'],
    evaluate: (model, split, options) => evaluateModel(model, sets[split], options),
    fusedLabelRows: () => {
      testInRunMode ??= spec.labels === 'dense' ? test : annotate(splits.test, MNIST_ANNOTATORS, spec.labels, testSeed);
      return fusedLabelRows(testInRunMode);
    },
    split: (name) => sets[name],
    prepareFusedTargets: async (fusion) => {
      const started = performance.now();
      train.fused = await fuseTrainingSet(train, fusion);
      return { fusion, scope: 'set', fused: train.count, reused: 0, ms: performance.now() - started };
    },
  };
}

/**
 * STAPLE over a whole in-memory training set: the images are stacked into one
 * [N, *S] volume per annotator (absent annotators are 255 there), so the rater
 * CMs are estimated from every training image at once. Spatial STAPLE's local
 * windows then span neighbouring images of the stack as well as space.
 */
export async function fuseTrainingSet(set: AnnotatedSet, fusion: StapleFusion): Promise<Uint8Array> {
  const result = await fuse(set.labels, stapleFuseOptions(fusion, set.classes, [set.count, ...set.spatial], set.spatial));
  const labels = result.labels!;
  // A voxel nobody labelled (255) stays unlabelled: the plain CE ignores it.
  return labels;
}

/** Shares of the cases held out for validation and test (the rest trains). */
export const BRATS_SPLIT_FRACTIONS = { validation: 0.15, test: 0.15 } as const;

/**
 * Splits case ids into training, validation and test (70/15/15 by default, at least one
 * case each) with a permutation drawn from `seed`. The result depends only on the set of
 * ids and the seed, not on their order. Each split is sorted by id.
 */
export function bratsCaseSplits(ids: readonly string[], seed: number, fractions: { validation: number; test: number } = BRATS_SPLIT_FRACTIONS): CaseSplits {
  return splitIds(ids, seed, fractions, { what: 'a BraTS run', unit: 'case', stream: 'brats case split' });
}

/** Image file names split as bratsCaseSplits splits cases (70/15/15 by `seed`, at least one each). */
export function imageFolderSplits(names: readonly string[], seed: number, fractions: { validation: number; test: number } = BRATS_SPLIT_FRACTIONS): CaseSplits {
  return splitIds(names, seed, fractions, { what: 'an image-folder run', unit: 'image', stream: 'image folder split' });
}

function splitIds(ids: readonly string[], seed: number, fractions: { validation: number; test: number }, words: { what: string; unit: string; stream: string }): CaseSplits {
  const n = ids.length;
  const { what, unit } = words;
  if (n < 3) throw new RangeError(`${what} needs at least 3 ${unit}s (one each for training, validation and test); there are ${n}`);
  const sorted = [...new Set(ids)].sort();
  if (sorted.length !== n) throw new RangeError(`${unit} ids must be unique`);
  const validation = Math.max(1, Math.round(fractions.validation * n));
  const test = Math.max(1, Math.round(fractions.test * n));
  if (validation + test > n - 1) throw new RangeError(`${n} ${unit}s cannot hold ${validation} validation and ${test} test ${unit}s and still train on one`);
  const order = new Rng(seed).fork(words.stream).permutation(n);
  const pick = (from: number, to: number) => Array.from(order.subarray(from, to), (i) => sorted[i]).sort();
  return { test: pick(0, test), validation: pick(test, test + validation), train: pick(test + validation, n) };
}

/**
 * A patch stream that opens its loader on the first next(): building ExperimentData stays
 * synchronous and cheap (cmseg eval never trains), and the first batch comes from the
 * loader that the trainer then keeps reading.
 */
function deferredPatchStream(index: CacheIndex, batchSize: number, open: () => Promise<PatchStream>): PatchStream {
  let opened: Promise<PatchStream> | undefined;
  return {
    names: [...index.names],
    channels: index.channels,
    classes: index.classes,
    settings: { batchSize },
    next: async () => (await (opened ??= open())).next(),
    close: async () => {
      if (opened) await (await opened).close();
    },
  };
}

export function loadBratsExperiment(spec: BratsDatasetSpec, trainingSeed: number, runtime: ExperimentRuntime = {}): ExperimentData {
  if (!spec.cache) throw new RangeError('the BraTS data set has no cache: give the data with --data');
  const cacheDir = spec.cache;
  const index = readCacheIndex(cacheDir);
  const known = new Set(index.cases.map((c) => c.id));
  for (const split of ['train', 'validation', 'test'] as const) {
    const ids = spec.splits[split];
    if (ids.length === 0) throw new RangeError(`the run's ${split} split is empty`);
    const missing = ids.filter((id) => !known.has(id));
    if (missing.length > 0) {
      throw new RangeError(`the cache at ${cacheDir} lacks ${missing.length} ${split} case(s) of this run (${missing.slice(0, 3).join(', ')}${missing.length > 3 ? ', ...' : ''}): run cmseg prepare on the run's data again`);
    }
  }
  // The patch loader checks the training cases' files; a damaged validation or test case
  // would otherwise be found only when it is scored, after an epoch or the whole run.
  const scored = new Set([...spec.splits.validation, ...spec.splits.test]);
  const damaged = damagedCaseFiles(cacheDir, index.cases.filter((c) => scored.has(c.id)));
  if (damaged.length > 0) throw new RangeError(damagedCasesMessage(cacheDir, damaged));
  const batchSize = runtime.batchSize ?? 1;
  // Set by prepareFusedTargets before the first batch: the loader then cuts the targets from the fused maps.
  let fusedTarget: StapleFusion | undefined;
  const open = (firstBatch: number) =>
    PatchLoader.open({
      cacheDir,
      caseIds: spec.splits.train,
      patchSize: spec.patch,
      batchSize,
      seed: trainingSeed,
      foregroundFraction: spec.foregroundFraction,
      augment: spec.augment,
      firstBatch,
      ...(runtime.workers !== undefined ? { workers: runtime.workers } : {}),
      ...(fusedTarget ? { fused: fusedTarget } : {}),
    });
  const source = new PatchStreamSource(open, deferredPatchStream(index, batchSize, () => open(0)), spec.stepsPerEpoch);
  const patch = [spec.patch, spec.patch, spec.patch];
  return {
    source,
    classNames: [...bratsClassNames(cacheLabelScheme(index))],
    evaluate: (model, split, options = {}) => {
      const ids = split === 'validation' && options.quick ? spec.splits.validation.slice(0, Math.max(1, spec.validationCases)) : spec.splits[split];
      // Every annotator's labels, also from a cache prepared in single mode (SPEC section 7 thins
      // the training cases' labels only).
      const { onCase } = options;
      // Cases are read one at a time, in order: the k-th read is case k + 1 starting.
      let started = 0;
      const load = (id: string) => {
        onCase?.(started++, ids.length, id);
        return readCachedCaseForScoring(cacheDir, id, index);
      };
      return evaluateVolumes(model, ids, load, {
        patch: options.patch ?? patch,
        overlap: options.overlap ?? spec.overlap,
        windowBatch: options.windowBatch,
        annotators: options.annotators,
        annotatorNames: [...index.names],
        bratsRegions: true,
        ...(options.onWindows ? { onWindows: options.onWindows } : {}),
        ...(options.onVolume || onCase
          ? {
              onVolume: (score: VolumeScore, done: number, total: number) => {
                options.onVolume?.(score, done, total);
                if (done === total) onCase?.(done, total);
              },
            }
          : {}),
      });
    },
    // STAPLE per case (each rater's performance is a per-subject estimate), on the training
    // cases only; the maps stay in the cache for every later run on the same cases.
    prepareFusedTargets: async (fusion, options = {}) => {
      const result = await fuseCachedCases(cacheDir, spec.splits.train, fusion, { onProgress: options.onCase });
      fusedTarget = fusion;
      return { fusion, scope: 'cases', fused: result.fused.length, reused: result.reused.length, ms: result.ms };
    },
    close: () => source.close(),
  };
}

/**
 * The run's three splits of an image folder, each gathered by name from the whole folder.
 * Kept apart from loadFolderExperiment so that its closures do not hold the whole folder too.
 */
function folderSplitSets(spec: FolderDatasetSpec): Record<keyof CaseSplits, AnnotatedSet> {
  for (const split of ['train', 'validation', 'test'] as const) {
    if (spec.splits[split].length === 0) throw new ImageFolderError(`the run's ${split} split is empty`);
    const missing = spec.splits[split].filter((name) => !fs.existsSync(path.join(spec.root, 'images', name)));
    if (missing.length > 0) {
      throw new ImageFolderError(`${spec.root} lacks ${missing.length} ${split} image(s) of this run (${missing.slice(0, 3).join(', ')}${missing.length > 3 ? ', ...' : ''} in images/)`);
    }
  }
  // Only the run's images (and their labels) are read: images added to the folder after the
  // run started join no split, so they must not break (or slow) its resume, eval or predict,
  // e.g. by another size or an unreadable file.
  const names = [...spec.splits.train, ...spec.splits.validation, ...spec.splits.test];
  const folder = loadImageFolder(spec.root, { classes: spec.classes, labelMapping: spec.labelMapping, annotators: spec.annotators, names });
  const index = new Map(folder.names.map((name, n) => [name, n]));
  const whole: AnnotatedSet = {
    count: folder.count,
    channels: folder.channels,
    classes: folder.classes,
    spatial: [folder.extent.h, folder.extent.w],
    images: folder.images,
    labels: folder.labels,
    present: folder.present,
    ...(folder.consensus ? { consensus: folder.consensus } : {}),
    annotatorNames: folder.annotators,
  };
  const C = folder.channels;
  const V = folder.extent.h * folder.extent.w;
  const R = folder.labels.length;
  // The folder is read in split order, so each split is a range of it, taken as views: copies
  // (gatherBatch) held the folder twice until the next collection (3.7 GB at the peak for
  // 1.8 GB of 512x512 images). A name in two splits (a hand-made spec) is gathered instead.
  const subset = (split: keyof CaseSplits): AnnotatedSet => {
    const names = spec.splits[split];
    const first = index.get(names[0])!;
    const inRange = names.every((name, k) => folder.names[first + k] === name);
    if (!inRange) {
      const batch = gatherBatch(whole, names.map((name) => index.get(name)!));
      return { ...whole, count: names.length, images: batch.images, labels: batch.labels, present: batch.present, consensus: batch.consensus, names: [...names] };
    }
    const end = first + names.length;
    return {
      ...whole,
      count: names.length,
      images: folder.images.subarray(first * C * V, end * C * V),
      labels: folder.labels.map((l) => l.subarray(first * V, end * V)),
      present: folder.present.subarray(first * R, end * R),
      consensus: folder.consensus?.subarray(first * V, end * V),
      names: [...names],
    };
  };
  return { train: subset('train'), validation: subset('validation'), test: subset('test') };
}

/**
 * An image folder as a run's data: the whole folder in memory, split by the spec's names.
 * Throws ImageFolderError when the folder or a file in it does not fit, naming it.
 */
export function loadFolderExperiment(spec: FolderDatasetSpec, trainingSeed: number): ExperimentData {
  if (!spec.root) throw new ImageFolderError('the image-folder data set has no folder: give it with --data');
  const sets = folderSplitSets(spec);
  const hasConsensus = sets.test.consensus !== undefined;
  return {
    source: new InMemorySource(sets.train, trainingSeed),
    ...(spec.classes === 2 ? { classNames: ['background', 'foreground'] } : {}),
    ...(hasConsensus ? {} : { reference: 'majority vote' as const }),
    evaluate: (model, split, options) => (hasConsensus ? evaluateModel(model, sets[split], options) : evaluateAgainstMajority(model, sets[split], options)),
    // The fused labels' Dice is only worth a row against an expert: against the vote, mode would score 1.
    ...(hasConsensus ? { fusedLabelRows: () => fusedLabelRows(sets.test) } : {}),
    split: (name) => sets[name],
    prepareFusedTargets: async (fusion) => {
      const started = performance.now();
      sets.train.fused = await fuseTrainingSet(sets.train, fusion);
      return { fusion, scope: 'set', fused: sets.train.count, reused: 0, ms: performance.now() - started };
    },
  };
}

/** Where a run's cache is when `cmseg train` prepares it from a BraTS folder. */
export function runCacheDir(outDir: string): string {
  return path.join(outDir, 'cache');
}

export function loadExperimentData(spec: DatasetSpec, trainingSeed: number, runtime: ExperimentRuntime = {}): ExperimentData {
  switch (spec.kind) {
    case 'mnist':
      return loadMnistExperiment(spec, trainingSeed);
    case 'brats':
      return loadBratsExperiment(spec, trainingSeed, runtime);
    case 'folder':
      return loadFolderExperiment(spec, trainingSeed);
    default: {
      const unknown: never = spec;
      throw new RangeError(`unknown data set kind ${JSON.stringify((unknown as { kind: unknown }).kind)}`);
    }
  }
}
