// `cmseg train`: a preset's data and settings, overridden by flags; checkpoints, a JSON
// log and test metrics in the output folder; Ctrl-C stops after the current step and
// saves a checkpoint that `--resume` continues exactly.
//
// BraTS presets read a cache made by `cmseg prepare`. Given a BraTS folder instead, train
// prepares a cache inside the run folder (<out>/cache, default annotators over, under,
// wrong; --labels and --data-seed apply) and uses it: convenient for one run, while
// several runs on the same data should share one `cmseg prepare` cache. The case split
// (70/15/15 by --data-seed) is fixed when the run starts and saved in its checkpoints.
// The STAPLE baselines (naive-staple, naive-spatial-staple) first fuse each training case's
// annotator maps into the cache, once; later runs and --resume reuse them.
//
// --preset images trains on a user's 2D image folder (--data: images/, labels/<annotator>/,
// optional consensus/; the layout cmseg simulate writes). Its images are split 70/15/15 by
// name (--data-seed) when the run starts, and the split and annotators are saved in the
// checkpoints, so --resume, eval and predict see the same images even if the folder grows.
//
// One process at a time per run folder: train holds <out>/.train.lock (its pid) from start
// to end, so a second train or --resume on the same --out fails at once, naming the pid.

import * as fs from 'fs';
import * as path from 'path';
import { Command } from 'commander';
import { type FileLock, writeFileAtomic } from '../data/files';
import { BRATS_GEOMETRY_TOLERANCE_MM, BRATS_LABEL_SCHEMES, BratsError, type BratsLabelScheme, bratsLayoutHint, discoverBratsCases } from '../data/brats';
import { CacheError, cacheIndexPath, cacheLabelScheme, readCacheIndex } from '../data/cache';
import { ImageFolderError, type LabelMapping, looksLikeImageFolder, resolveMapping, scanImageFolder } from '../data/image-folder';
import type { StapleFusion } from '../fusion/fuse';
import { loadCheckpoint } from '../model/checkpoint';
import { backendInfo, Model, setNumThreads } from '../model/model';
import { bratsText, evaluationText, referenceNote } from '../report/tables';
import type { BratsDatasetSpec, DatasetSpec, ExperimentData, FolderDatasetSpec, RunRecipe } from '../train/experiment';
import { bratsCaseSplits, imageFolderSplits, runCacheDir } from '../train/experiment';
import { METHODS, METHOD_NAMES, MethodDefinition, MethodName, methodDefinition } from '../train/methods';
import { presetByName, PRESET_NAMES } from '../train/presets';
import { createFusionProgress, createProgress, etaText, silentFusionProgress } from '../train/progress';
import { SCHEDULE_KINDS, ScheduleKind } from '../train/schedule';
import type { CmInit } from '../model/config';
import { CHECKPOINT_LAST, lockRunFolder, nothingToResumeMessage, readTrainerState, resumeDifferences, resumeDifferencesNote, resumedConfig, runNeverSavedLast, train, TrainConfig, TrainResult, type ValidationProgress, type Validator } from '../train/trainer';
import { choiceOption, displayPath, given, parseInteger, parseNumber, parsePath, parseThreads, printOutputs, quitNow, shellWord, UserError, withExamples } from './common';
import { CURVES_FILE, writeRunCurves } from './curves';
import { checkRunCache, loadRunData, runLabelScheme, withOwnRunCache } from './run-data';
import { prepareWithProgress } from './prepare';
import { caseBars } from './window-progress';
import { type EvaluationSummary, volumeAverageDice } from '../train/evaluate';

export interface TrainFlags {
  /** Print the result as one JSON object on stdout instead of text (progress stays on stderr). */
  json?: boolean;
  preset: string;
  method: string;
  labels?: 'dense' | 'single';
  epochs?: number;
  steps?: number;
  batchSize?: number;
  lr?: number;
  schedule?: ScheduleKind;
  optimizer?: 'adam' | 'adamw';
  weightDecay?: number;
  lambda?: number;
  lambdaWarmup?: number;
  warmupSteps?: number;
  depth?: number;
  baseChannels?: number;
  cmRank?: number;
  cmHeadBlocks?: number;
  cmInit?: CmInit;
  trainImages?: number;
  valImages?: number;
  testImages?: number;
  dataSeed?: number;
  data?: string;
  classes?: number;
  labelMapping?: LabelMapping;
  /** BraTS folders prepared by train: how far apart a case's files may put one voxel (mm). */
  geometryTolerance: number;
  labelScheme?: BratsLabelScheme;
  patch?: number;
  valCases?: number;
  stepsPerEpoch?: number;
  workers?: number;
  augment: boolean;
  seed?: number;
  out?: string;
  resume?: boolean;
  checkpointEvery?: number;
  bf16?: boolean;
  test: boolean;
  quiet?: boolean;
  threads?: number;
}

export type { RunRecipe };

export interface ResolvedTrain {
  config: TrainConfig;
  recipe: RunRecipe;
  outDir: string;
}

type Typed = (key: keyof TrainFlags) => boolean;

/** `base` with every flag the user typed applied on top. */
function applyFlags(base: { config: TrainConfig; dataset: DatasetSpec }, flags: TrainFlags, isGiven: Typed): { config: TrainConfig; dataset: DatasetSpec } {
  const typed = (key: keyof TrainFlags) => isGiven(key) && flags[key] !== undefined;
  const config: TrainConfig = structuredClone(base.config);
  if (typed('method')) {
    if (!METHOD_NAMES.includes(flags.method as MethodName)) throw new UserError(`unknown method '${flags.method}'; choose one of ${METHOD_NAMES.join(', ')}`);
    config.method = flags.method as MethodName;
  }
  if (typed('steps') && typed('epochs')) throw new UserError('give --epochs or --steps, not both');
  if (typed('steps')) {
    config.steps = flags.steps;
    delete config.epochs;
  } else if (typed('epochs')) {
    config.epochs = flags.epochs;
    delete config.steps;
  }
  const copy: [keyof TrainConfig, keyof TrainFlags][] = [
    ['batchSize', 'batchSize'],
    ['optimizer', 'optimizer'],
    ['weightDecay', 'weightDecay'],
    ['lambda', 'lambda'],
    ['lambdaWarmup', 'lambdaWarmup'],
    ['warmupSteps', 'warmupSteps'],
    ['depth', 'depth'],
    ['baseChannels', 'baseChannels'],
    ['cmRank', 'cmRank'],
    ['cmHeadBlocks', 'cmHeadBlocks'],
    ['cmInit', 'cmInit'],
    ['seed', 'seed'],
    ['checkpointEvery', 'checkpointEvery'],
    ['bf16', 'bf16'],
  ];
  for (const [key, flag] of copy) if (typed(flag)) (config as unknown as Record<string, unknown>)[key] = flags[flag];
  if (typed('schedule') && flags.schedule !== config.schedule.kind) config.schedule = { kind: flags.schedule!, lr: config.schedule.lr };
  if (typed('lr')) {
    // A preset's cosine floor scales with its base rate: kept as it was, --lr 5e-5 under the
    // mnist preset's floor of 1e-4 made a schedule that rose to twice the rate asked for.
    const { lr, minLr } = config.schedule;
    if (minLr !== undefined) config.schedule.minLr = lr > 0 ? minLr * (flags.lr! / lr) : Math.min(minLr, flags.lr!);
    config.schedule.lr = flags.lr!;
  }
  if (isGiven('augment') && !flags.augment) config.augment = { flips: false, rotations: false };

  const dataset: DatasetSpec = { ...base.dataset };
  const flagName = (key: string) => '--' + key.replace(/[A-Z]/g, (c) => '-' + c.toLowerCase());
  const only = (keys: readonly (keyof TrainFlags)[], owner: string) => {
    const wrong = keys.filter(typed);
    if (wrong.length) throw new UserError(`${wrong.map(flagName).join(', ')}: for ${owner} only`);
  };
  // Settings of the CM heads and the trace term, refused where the method has none to set
  // (a silently ignored --cm-rank 4 on --method cm would look like a rank-4 run).
  const method = methodDefinition(config.method);
  const forMethods = (keys: readonly (keyof TrainFlags)[], has: (m: MethodDefinition) => boolean, what = '') => {
    if (has(method)) return;
    const owners = METHOD_NAMES.filter((name) => has(METHODS[name])).map((name) => `--method ${name}`);
    only(keys, owners.join(', ') + what);
  };
  forMethods(['cmRank'], (m) => m.cmMode === 'lowrank');
  forMethods(['cmHeadBlocks'], (m) => m.learnsCms && m.cmMode !== 'global', ' (pixel-wise CM heads)');
  forMethods(['cmInit'], (m) => m.learnsCms, ' (methods that learn CMs)');
  forMethods(['lambda', 'lambdaWarmup', 'warmupSteps'], (m) => m.learnsCms && m.lambda === undefined, ' (methods with the trace term)');
  if (dataset.kind !== 'brats') only(['patch', 'valCases', 'stepsPerEpoch'], 'the BraTS presets (brats3d, brats3d-gpu)');
  if (dataset.kind !== 'mnist') only(['trainImages', 'valImages', 'testImages'], 'the MNIST presets');
  if (dataset.kind !== 'folder') only(['classes', 'labelMapping'], 'image folders (--preset images)');
  if (typed('dataSeed')) dataset.dataSeed = flags.dataSeed!;
  if (dataset.kind === 'mnist') {
    if (typed('labels')) dataset.labels = flags.labels!;
    if (typed('trainImages')) dataset.train = flags.trainImages!;
    if (typed('valImages')) dataset.validation = flags.valImages!;
    if (typed('testImages')) dataset.test = flags.testImages!;
  } else if (dataset.kind === 'brats') {
    if (typed('labels')) dataset.labels = flags.labels!;
    if (typed('patch')) dataset.patch = flags.patch!;
    if (typed('valCases')) dataset.validationCases = flags.valCases!;
    if (typed('stepsPerEpoch')) dataset.stepsPerEpoch = flags.stepsPerEpoch!;
    // The patch loader augments BraTS batches; the trainer's own flips stay off.
    if (isGiven('augment') && !flags.augment) dataset.augment = false;
    const multiple = 2 ** (config.depth - 1);
    if (dataset.patch % multiple !== 0) throw new UserError(`--patch ${dataset.patch} must be a multiple of 2^(depth-1) = ${multiple} (depth ${config.depth})`);
  } else {
    // Who labelled what is in the folder itself: a missing file is an image that annotator skipped.
    if (typed('labels')) throw new UserError('--labels: an image folder says itself which annotator labelled which image (a missing labels/<annotator>/<name>.png is an absent label)');
    if (typed('classes')) {
      if (flags.classes! > 255) throw new UserError(`--classes ${flags.classes}: at most 255 (the label 255 marks unlabelled pixels)`);
      dataset.classes = flags.classes!;
    }
    if (typed('labelMapping')) dataset.labelMapping = flags.labelMapping!;
    if (dataset.labelMapping === 'binary' && dataset.classes !== 2) {
      throw new UserError(`--label-mapping binary reads two classes (zero and non-zero); with --classes ${dataset.classes} the label PNGs hold the labels themselves (--label-mapping value)`);
    }
    // Resolved now ('auto' -> binary or value), as the run records it: a resume repeating --label-mapping auto matches.
    dataset.labelMapping = resolveMapping(dataset.labelMapping, dataset.classes);
  }
  return { config, dataset };
}

function defaultOutDir(preset: string, config: TrainConfig, dataset: DatasetSpec, data?: string): string {
  // An image folder's runs are told apart by the folder's name (its labels are what they are).
  const what = dataset.kind === 'folder' ? path.basename(path.resolve(data ?? 'data')) : dataset.labels;
  return path.join('results', 'runs', `${preset}-${config.method}-${what}-seed${config.seed}`);
}

/** A new run's settings: the preset's, with every flag the user typed on top. */
export function resolveTrainSettings(flags: TrainFlags, isGiven: Typed = (k) => flags[k] !== undefined): ResolvedTrain {
  const preset = presetByName(flags.preset);
  const { config, dataset } = applyFlags({ config: { ...preset.train, method: 'cm' }, dataset: preset.dataset }, { ...flags }, (k) => k === 'method' || isGiven(k));
  const outDir = path.resolve(flags.out ?? defaultOutDir(preset.name, config, dataset, flags.data));
  return { config, recipe: { preset: preset.name, dataset }, outDir };
}

/** A resumed run's settings are its checkpoint's; flags the user repeats must agree with them. */
async function resolveResume(flags: TrainFlags, isGiven: Typed): Promise<ResolvedTrain> {
  const outDir = path.resolve(flags.out ?? resolveTrainSettings(flags, isGiven).outDir);
  const last = path.join(outDir, CHECKPOINT_LAST);
  if (!fs.existsSync(last)) {
    // A run whose first save of `last` failed is started again; otherwise the folder may be the wrong one.
    if (await runNeverSavedLast(outDir)) throw new UserError(await nothingToResumeMessage(outDir, '--resume'));
    throw new UserError(`nothing to resume: ${last} does not exist (give the run's folder with --out)`);
  }
  const saved = await readTrainerState(last);
  const recipe = saved.run as unknown as RunRecipe;
  if (!recipe?.dataset || !recipe.preset) throw new UserError(`${last} does not say which data it was trained on, so the command line cannot resume it`);
  // A run folder moved elsewhere (or copied, the original deleted) resumes with its own command
  // line: the cache train prepared into it is read when the one named is gone (the cache "is
  // gone", or --data with the BraTS folder "conflicts", until --data named <out>/cache); the
  // run's checkpoints then name it.
  recipe.dataset = withOwnRunCache(recipe, outDir).dataset;
  const conflicts: string[] = [];
  if (isGiven('preset') && flags.preset !== recipe.preset) conflicts.push(`--preset ${flags.preset} (the run used ${recipe.preset})`);
  if (flags.labelScheme !== undefined) {
    const runs = runLabelScheme(recipe.dataset);
    if (flags.labelScheme !== runs) conflicts.push(`--label-scheme ${flags.labelScheme} (${runs ? `the run's is ${runs}` : 'the run has no BraTS data'})`);
  }
  if (flags.data !== undefined) {
    // The same command line again: --data names the run's cache, or the BraTS folder it was prepared from.
    const data = path.resolve(flags.data);
    const dataset = recipe.dataset;
    if (dataset.kind === 'brats') {
      if (data !== dataset.cache && dataset.cache !== runCacheDir(outDir)) {
        // A moved cache: the split names its cases, so the run goes on from the new place.
        if (!fs.existsSync(dataset.cache) && fs.existsSync(cacheIndexPath(data))) dataset.cache = data;
        else conflicts.push(`--data ${flags.data} (the run reads the cache ${dataset.cache})`);
      }
    } else if (dataset.kind === 'folder') {
      // A moved image folder: the split names its images, so the run goes on from the new place.
      if (data !== dataset.root && fs.existsSync(dataset.root)) conflicts.push(`--data ${flags.data} (the run reads the image folder ${dataset.root})`);
      else dataset.root = data;
    } else {
      conflicts.push(`--data ${flags.data} (the run's data set has no --data)`);
    }
  }
  // Another --classes is said as a conflict here: applyFlags would refuse it against the run's
  // binary masks as a --label-mapping error, naming a flag the user did not type.
  if (recipe.dataset.kind === 'folder' && isGiven('classes') && flags.classes !== undefined && flags.classes !== recipe.dataset.classes) {
    conflicts.push(`--classes ${flags.classes} (the run has ${recipe.dataset.classes})`);
    throw new UserError(`cannot resume ${last} with different settings: ${conflicts.join('; ')}`);
  }
  const typed = applyFlags({ config: saved.config, dataset: recipe.dataset }, flags, isGiven);
  const describe = (x: unknown) => JSON.stringify(x);
  // Compared as the trainer compares them: a default typed out (--lambda-warmup equal to the
  // run's lambda, --steps of the run's length in epochs) is no conflict, and the bookkeeping
  // settings (--checkpoint-every) may change.
  const changed = resumeDifferences(typed.config, saved.config, saved.state.batchesPerEpoch);
  // --lr also moves a preset's cosine floor (applyFlags scales it): said as the user's --lr,
  // not as "schedule.minLr 0.0003333333333333334", a value nobody typed.
  const lrTyped = isGiven('lr') && changed.some((d) => d.key === 'schedule.lr');
  const floorFollows = lrTyped && changed.some((d) => d.key === 'schedule.minLr');
  for (const d of changed) {
    if (lrTyped && d.key === 'schedule.minLr') continue;
    if (lrTyped && d.key === 'schedule.lr') conflicts.push(`--lr ${flags.lr} (the run has ${describe(d.saved)}${floorFollows ? "; the schedule's floor minLr follows --lr" : ''})`);
    else conflicts.push(`${d.key} ${describe(d.now)} (the run has ${describe(d.saved)})`);
  }
  // A run of an earlier version may record more validation cases than its split holds: both
  // sides count the cases validated, so the same command line resumes it.
  if (recipe.dataset.kind === 'brats' && typed.dataset.kind === 'brats') {
    fitValidationCases(recipe.dataset, false);
    fitValidationCases(typed.dataset, isGiven('valCases'));
  }
  for (const key of Object.keys(recipe.dataset) as (keyof DatasetSpec)[]) {
    if (describe(recipe.dataset[key]) !== describe(typed.dataset[key])) conflicts.push(`data ${key} ${describe(typed.dataset[key])} (the run has ${describe(recipe.dataset[key])})`);
  }
  if (conflicts.length) throw new UserError(`cannot resume ${last} with different settings: ${conflicts.join('; ')}${resumeDifferencesNote(changed)}`);
  checkRunCache(recipe.dataset, saved.annotatorNames, 'resume');
  checkFolderReference(recipe.dataset);
  return { config: resumedConfig(saved.config, typed.config), recipe, outDir };
}

/**
 * Fills in a BraTS run's data: the cache (prepared from a BraTS folder into <out>/cache
 * when --data is not a cache already) and the case split. Checks the flags against the cache.
 */
async function attachBratsData(dataset: BratsDatasetSpec, flags: TrainFlags, isGiven: Typed, outDir: string): Promise<void> {
  if (flags.data === undefined) throw new UserError(`--preset ${flags.preset} needs --data: a cache made by cmseg prepare, or a BraTS folder`);
  const data = path.resolve(flags.data);
  if (!fs.existsSync(data)) throw new UserError(`--data folder not found: ${data}`);
  let cacheDir = data;
  if (!fs.existsSync(cacheIndexPath(data))) {
    // Not a cache: it must be a BraTS folder.
    try {
      discoverBratsCases(data, { requireSeg: true });
    } catch (error) {
      if (error instanceof BratsError && error.kind === 'no-cases') {
        const hint = looksLikeImageFolder(data) ? 'it is a folder of 2D images: train on it with --preset images' : bratsLayoutHint(data);
        throw new UserError(`--data ${data} is neither a cmseg cache (no index.json) nor a BraTS folder (no case subfolders with NIfTI files)${hint ? `; ${hint}` : ''}`);
      }
      throw error;
    }
    cacheDir = runCacheDir(outDir);
    if (!flags.quiet) process.stderr.write(`preparing ${displayPath(data)} into ${displayPath(cacheDir)} (share one cache between runs with cmseg prepare)\n`);
    const run = await prepareWithProgress(
      data,
      cacheDir,
      { mode: dataset.labels, seed: dataset.dataSeed, geometryTolerance: flags.geometryTolerance, labelScheme: flags.labelScheme ?? 'brats' },
      { quiet: flags.quiet },
    );
    if (run.interruptedAfter !== undefined) {
      throw new UserError(`interrupted while preparing the cache (${run.interruptedAfter} of ${run.total} cases done; the same command continues)`);
    }
  }
  const index = readCacheIndex(cacheDir);
  if (isGiven('labels') && flags.labels !== index.settings.mode) {
    throw new UserError(`--labels ${flags.labels}: the cache at ${cacheDir} holds ${index.settings.mode} labels (prepare another cache with --labels ${flags.labels})`);
  }
  const scheme = cacheLabelScheme(index);
  if (flags.labelScheme !== undefined && flags.labelScheme !== scheme) {
    throw new UserError(`--label-scheme ${flags.labelScheme}: the cache at ${cacheDir} was prepared with the label scheme ${scheme} (prepare another cache with --label-scheme ${flags.labelScheme})`);
  }
  dataset.cache = cacheDir;
  dataset.labels = index.settings.mode;
  // Recorded only when not the default, as the cache records it: runs of older versions match.
  if (scheme !== 'brats') dataset.labelScheme = scheme;
  try {
    dataset.splits = bratsCaseSplits(index.cases.map((c) => c.id), dataset.dataSeed);
  } catch (error) {
    throw new UserError(`${cacheDir}: ${(error as Error).message}`);
  }
  fitValidationCases(dataset, isGiven('valCases'));
}

/**
 * A validation scores at most the split's cases: a --val-cases (or preset's number) past them
 * is cut to them, with a note when the user asked for it, and the run records the number it
 * validates (its log and checkpoints recorded the 8 asked where 2 were scored).
 */
function fitValidationCases(dataset: BratsDatasetSpec, asked: boolean): void {
  const split = dataset.splits.validation.length;
  if (split === 0 || dataset.validationCases <= split) return;
  if (asked) {
    const which = split === 1 ? 'that one' : `those ${split}`;
    process.stderr.write(`note: --val-cases ${dataset.validationCases}: the validation split has ${split} case${split === 1 ? '' : 's'}; each validation scores ${which}\n`);
  }
  dataset.validationCases = split;
}

/**
 * consensus/ added to (or taken from) a run's image folder after the run started would switch
 * validation from the majority vote to the consensus (or back) halfway: `best` would then
 * compare scores against two references. (eval may score against either: it says which.)
 */
function checkFolderReference(dataset: DatasetSpec): void {
  if (dataset.kind !== 'folder' || dataset.consensus === undefined) return;
  const now = fs.existsSync(path.join(dataset.root, 'consensus'));
  if (now === dataset.consensus) return;
  const was = dataset.consensus ? 'its consensus/' : "its annotators' majority vote (it had no consensus/)";
  throw new UserError(
    `cannot resume: the run validated against ${was}, and ${displayPath(dataset.root)} now ${now ? 'has' : 'has no'} consensus/; ` +
      `validation scores against two references would make best.safetensors meaningless: ${now ? 'move consensus/ away' : 'restore consensus/'} to resume, or start a new run`,
  );
}

/**
 * A new image-folder run's data: the folder (--data), its annotators and the image split,
 * fixed now and saved in every checkpoint. Checks the layout and that the U-Net can take
 * the image size; reads only the first image (the whole folder is read when training starts).
 */
function attachFolderData(dataset: FolderDatasetSpec, flags: TrainFlags, depth: number): void {
  if (flags.data === undefined) {
    throw new UserError(`--preset ${flags.preset} needs --data: a folder with images/<name>.png and labels/<annotator>/<name>.png (optional consensus/<name>.png), as cmseg simulate writes`);
  }
  const root = path.resolve(flags.data);
  let scan: ReturnType<typeof scanImageFolder>;
  try {
    scan = scanImageFolder(root);
  } catch (error) {
    if (!(error instanceof ImageFolderError)) throw error;
    const hint = fs.existsSync(cacheIndexPath(root)) ? '; it is a cmseg prepare cache: train on it with --preset brats3d' : '';
    throw new UserError(`--data ${displayPath(root)}: ${error.message}${hint}`);
  }
  const { h, w } = scan.extent;
  const multiple = 2 ** (depth - 1);
  if (h % multiple !== 0 || w % multiple !== 0) {
    throw new UserError(
      `the images in ${displayPath(root)} are ${w}x${h} pixels, which a U-Net of depth ${depth} cannot take: width and height must be multiples of 2^(depth-1) = ${multiple}; crop or pad the images, or lower --depth`,
    );
  }
  dataset.root = root;
  dataset.annotators = scan.annotators;
  dataset.consensus = scan.hasConsensus;
  dataset.labelMapping = resolveMapping(dataset.labelMapping, dataset.classes);
  try {
    dataset.splits = imageFolderSplits(scan.names, dataset.dataSeed);
  } catch (error) {
    throw new UserError(`${displayPath(root)}: ${(error as Error).message}`);
  }
}

/**
 * Scores the test split and writes its metrics file. `caseProgress`: a BraTS run's per-case bar
 * and lines (caseBars), as eval shows them; a release's test cases take hours on a CPU.
 */
export async function writeTestResults(model: Model, data: ExperimentData, file: string, extra: Record<string, unknown> & { method: MethodName }, caseProgress = false) {
  const bars = caseProgress ? caseBars() : undefined;
  let summary: EvaluationSummary;
  try {
    summary = await data.evaluate(model, 'test', { annotators: methodDefinition(extra.method).learnsCms, ...(bars ? { onWindows: bars.onWindows, onVolume: bars.onVolume } : {}) });
  } finally {
    bars?.stop();
  }
  const fused = data.fusedLabelRows?.();
  await writeFileAtomic(file, Buffer.from(JSON.stringify({ ...extra, split: 'test', metrics: summary, fusedLabels: fused ?? null }, null, 2) + '\n'));
  return { summary, fused };
}

async function runTrain(flags: TrainFlags, command: Command): Promise<void> {
  if (flags.threads !== undefined) setNumThreads(flags.threads);
  const isGiven = (key: keyof TrainFlags) => given(command, key);
  const outDir = path.resolve(flags.out ?? resolveTrainSettings(flags, isGiven).outDir);
  // One process per run folder (<out>/.train.lock, released however this ends) from here on:
  // two commands on one --out, or two --resume of one run, would interleave checkpoints and
  // log lines. Taking it also clears temp files left by a killed run. `made`: the first
  // folder of --out this command makes (undefined: it exists), removed again if left empty.
  const made = firstMissing(outDir);
  const lock = lockRunFolder(outDir);
  // A signal nobody else handles at the moment (no step or case to finish) stops at once, as
  // it would by default, but through process.exit, so that the lock goes with the process.
  const onSignal = (signal: NodeJS.Signals) => {
    if (process.listenerCount(signal) === 1) quitNow(signal === 'SIGTERM' ? 143 : 130);
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  try {
    await runTrainLocked(flags, isGiven, lock);
  } finally {
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
    lock.release();
    if (made) removeEmptyUpTo(outDir, made);
  }
}

/** The outermost folder of `dir` that does not exist yet (dir itself, or a parent), or undefined. */
function firstMissing(dir: string): string | undefined {
  let missing: string | undefined;
  for (let d = dir; !fs.existsSync(d); d = path.dirname(d)) {
    missing = d;
    if (path.dirname(d) === d) break;
  }
  return missing;
}

/** Removes the folders this command made, from `dir` up to `top`, while they stayed empty. */
function removeEmptyUpTo(dir: string, top: string): void {
  for (let d = dir; ; d = path.dirname(d)) {
    try {
      fs.rmdirSync(d);
    } catch {
      return; // not empty, or gone: leave it and its parents
    }
    if (d === top) return;
  }
}

async function runTrainLocked(flags: TrainFlags, isGiven: Typed, lock: FileLock): Promise<void> {
  const { config, recipe, outDir } = flags.resume ? await resolveResume(flags, isGiven) : resolveTrainSettings(flags, isGiven);
  if (!flags.resume && fs.existsSync(path.join(outDir, CHECKPOINT_LAST))) {
    throw new UserError(`${outDir} already holds a run; continue it with --resume or choose another --out`);
  }
  if (config.bf16 && config.device !== 'cuda') {
    throw new UserError(`--bf16 is for training on the GPU (--preset brats3d-gpu); --preset ${recipe.preset} trains on the CPU`);
  }
  if (config.device === 'cuda') {
    const info = backendInfo();
    if (!info.cuda) {
      throw new UserError(`--preset ${recipe.preset} trains on the GPU, but this cmseg was built without the CUDA backend (backendInfo().cuda is false); rebuild with CUDA and cuDNN, or use --preset brats3d on the CPU`);
    }
    if (info.cudaTraining === false) {
      throw new UserError(`--preset ${recipe.preset} trains on the GPU, but this build's CUDA backend cannot train yet (backendInfo().cudaTraining is false); use --preset brats3d on the CPU`);
    }
    if (!info.gpuAvailable) {
      throw new UserError(`--preset ${recipe.preset} trains on the GPU, but no GPU can be used here (${info.gpuUnavailableReason ?? 'no CUDA device'}); use --preset brats3d on the CPU`);
    }
  }
  const method = methodDefinition(config.method);
  if (recipe.dataset.kind === 'brats') {
    if (!flags.resume) await attachBratsData(recipe.dataset, flags, isGiven, outDir);
  } else if (recipe.dataset.kind === 'folder') {
    if (!flags.resume) attachFolderData(recipe.dataset, flags, config.depth);
  } else if (flags.data !== undefined && !flags.resume) {
    const folder = looksLikeImageFolder(path.resolve(flags.data)) ? `; ${flags.data} is an image folder: train on it with --preset images` : '';
    throw new UserError(`--data is for the BraTS presets (brats3d, brats3d-gpu) and image folders (--preset images); --preset ${recipe.preset} brings its own data${folder}`);
  }
  const data = loadRunData(recipe.dataset, config.seed, { batchSize: config.batchSize, workers: flags.workers });
  try {
    checkFolderRun(recipe.dataset, data, config.method, flags);
    if (method.target === 'fused') await prepareFusedTargets(data, method.fusion!, recipe.dataset, flags.quiet);
    await trainAndTest(flags, { config, recipe, outDir }, data, lock);
  } finally {
    await data.close?.();
  }
}

/**
 * An image-folder run's consensus: oracle needs the expert's; without it, say once what is
 * scored instead. Also that each split has a labelled image where one is needed, before
 * training rather than at the first validation (or the test, after the whole run).
 */
function checkFolderRun(dataset: DatasetSpec, data: ExperimentData, method: MethodName, flags: Pick<TrainFlags, 'quiet' | 'test'>): void {
  if (dataset.kind !== 'folder') return;
  if (methodDefinition(method).target === 'consensus' && !data.source.hasConsensus) {
    throw new UserError(`--method ${method} trains on the expert consensus, but ${displayPath(dataset.root)} has no consensus/ folder (consensus/<name>.png for every image); choose another --method`);
  }
  // Without consensus/ a split is scored against its labelled images' majority vote; the
  // training split needs a label in any case (without one every step's loss is 0).
  const needed: ('train' | 'validation' | 'test')[] = data.reference ? ['train', 'validation', ...(flags.test ? ['test' as const] : [])] : ['train'];
  for (const split of needed) {
    const set = data.split?.(split);
    if (!set || set.present.some((p) => p !== 0)) continue;
    const names = set.names ?? [];
    const listed = `${names.slice(0, 3).join(', ')}${names.length > 3 ? ', ...' : ''}`;
    const why = split === 'train' ? 'there is nothing to train on' : 'without consensus/ there is nothing to score it against';
    throw new UserError(
      `no image of the ${split} split of ${displayPath(dataset.root)} (${names.length}: ${listed}) has a label map in labels/: ${why}; label some of them, or split the images differently with --data-seed`,
    );
  }
  if (data.reference && !flags.quiet) {
    process.stderr.write(`note: ${displayPath(dataset.root)} has no consensus/ (no expert consensus): validation and test Dice are against the annotators' majority vote, and the CM error is not computed\n`);
  }
}

const FUSION_TITLES: Record<StapleFusion, string> = { 'multi-staple': 'multi-label STAPLE', 'spatial-staple': 'spatial STAPLE' };

/**
 * The STAPLE baselines' targets, fused before training starts: per training case into the
 * BraTS cache (reused by every later run), or over the whole MNIST training set. Reports
 * progress on stderr and how long it took.
 */
async function prepareFusedTargets(data: ExperimentData, fusion: StapleFusion, dataset: DatasetSpec, quiet?: boolean): Promise<void> {
  if (!data.prepareFusedTargets) throw new UserError(`fused training labels (${fusion}) cannot be prepared for this data set`);
  const title = FUSION_TITLES[fusion];
  // Per-case progress for BraTS; MNIST fuses its whole set in one call.
  const progress = dataset.kind === 'brats' ? createFusionProgress({ quiet }) : silentFusionProgress;
  let report;
  try {
    progress.start(dataset.kind === 'brats' ? dataset.splits.train.length : 0, `fuse ${fusion}`);
    report = await data.prepareFusedTargets(fusion, {
      onCase: (p) => progress.case(p.position + 1, p.id, p.status, p.ms / 1000),
    });
  } catch (error) {
    if (error instanceof CacheError && error.kind === 'locked') throw new UserError(error.message);
    throw error;
  } finally {
    progress.stop();
  }
  if (quiet) return;
  const seconds = (report.ms / 1000).toFixed(1);
  if (report.scope === 'set') {
    process.stderr.write(`fused the labels of ${report.fused} training images with ${title} in ${seconds} s\n`);
  } else {
    const cache = dataset.kind === 'brats' ? ` into ${displayPath(dataset.cache)}` : '';
    process.stderr.write(`fused ${report.fused} training case(s) with ${title}${cache} in ${seconds} s (${report.reused} up to date in the cache, reused)\n`);
  }
}

/**
 * What `cmseg train` validates after each epoch: the quick validation split (BraTS: the first
 * --val-cases cases, reporting each to the progress bar), its means as the log's metrics and,
 * for BraTS, each case's figures as the log's `cases`.
 */
export function runValidator(data: ExperimentData, method: MethodName): Validator {
  return async (model, progress) => {
    const s = await data.evaluate(model, 'validation', { annotators: methodDefinition(method).learnsCms, quick: true, onCase: progress });
    const metrics: Record<string, number> = { averageDice: s.averageDice.mean, totalDice: s.totalDice.mean };
    if (s.cmError) metrics.cmError = s.cmError.mean;
    if (s.ged) metrics.ged = s.ged.mean;
    if (s.brats) {
      for (const [region, value] of Object.entries(s.brats.regions)) metrics[region] = value.mean;
      // HD95 in mm, where defined (NaN, written as null, where only one map has the region).
      for (const [region, value] of Object.entries(s.brats.hd95)) metrics[`hd95${region[0].toUpperCase()}${region.slice(1)}`] = value.mean;
    }
    // BraTS: each case's own figures in the log (its score as `best` counts it, Total Dice,
    // region Dice), so that the case behind a poor or NaN mean can be found.
    const cases = s.perCase?.map((c) => ({ id: c.id, score: volumeAverageDice(c), metrics: { totalDice: c.totalDice, ...c.regions } }));
    return { score: s.averageDice.mean, metrics, ...(cases ? { cases } : {}) };
  };
}

async function trainAndTest(flags: TrainFlags, { config, recipe, outDir }: ResolvedTrain, data: ExperimentData, lock: FileLock): Promise<void> {
  const controller = new AbortController();
  // SIGINT (Ctrl-C) and SIGTERM (what cluster schedulers and `kill` send before
  // they stop a job) both finish the step in progress (or, in a BraTS validation, the case in
  // progress) and save `last`.
  let stoppedBy: NodeJS.Signals | undefined;
  // Whether an epoch's validation runs: a BraTS one (minutes of whole cases) stops after the
  // case in progress, which the message says rather than "the current step".
  let validating = false;
  const validator = runValidator(data, config.method);
  const validate = async (model: Model, progress: ValidationProgress) => {
    validating = true;
    try {
      return await validator(model, progress);
    } finally {
      validating = false;
    }
  };
  const onSigint = (signal: NodeJS.Signals) => {
    stoppedBy ??= signal;
    // During a BraTS validation `last` already holds the run (the trainer saves it before a
    // validation that reports its cases, saying it is still to do): quitting loses nothing then.
    const savedBefore = validating && recipe.dataset.kind === 'brats';
    if (controller.signal.aborted) {
      process.stderr.write(savedBefore ? `\nsecond ${signal}: quitting; ${CHECKPOINT_LAST} saved before the validation holds the run (the resume validates first)\n` : `\nsecond ${signal}: quitting without saving\n`);
      quitNow(signal === 'SIGTERM' ? 143 : 130);
    }
    controller.abort();
    const what = signal === 'SIGTERM' ? 'SIGTERM' : 'interrupt';
    // What quits at once is the same signal again: a scheduler's SIGTERM has no Ctrl-C to press.
    const again = signal === 'SIGTERM' ? 'a second SIGTERM quits at once' : 'Ctrl-C again quits at once';
    process.stderr.write(
      savedBefore
        ? `\n${what}: stopping the validation after the case in progress; ${CHECKPOINT_LAST} was saved before it, and the resumed run validates again (${again}, losing nothing)\n`
        : `\n${what}: finishing the current step and saving a checkpoint (${again})\n`,
    );
  };
  process.on('SIGINT', onSigint);
  process.on('SIGTERM', onSigint);
  let result: TrainResult;
  const started = Date.now();
  try {
    result = await train(outDir, config, data.source, {
      signal: controller.signal,
      progress: createProgress({ quiet: flags.quiet }),
      resume: flags.resume,
      lock,
      run: recipe as unknown as Record<string, unknown>,
      // Given to train() as a validator that takes `progress` (two parameters) only for BraTS,
      // whose whole cases it reports one by one (minutes): train() saves `last` before such a
      // validation, so a SIGKILL during it loses nothing. MNIST's and a folder's (seconds,
      // and no case reports) keep one save of `last` per epoch.
      validate:
        recipe.dataset.kind === 'brats'
          ? (model: Model, progress: ValidationProgress) => validate(model, progress)
          : (model: Model) => validate(model, () => {}),
    });
  } finally {
    process.off('SIGINT', onSigint);
    process.off('SIGTERM', onSigint);
  }
  const { state, files } = result;
  // The trained model's native memory goes now: the test below loads best (or last) afresh,
  // and a BraTS model's buffers are about 1 GB on the CPU.
  await result.model.dispose();
  const checkpoints = [files.best, files.last].filter((f): f is string => f !== undefined);
  // --json: stdout carries one object for scripts; the text below is for people.
  const say = (text: string) => {
    if (!flags.json) process.stdout.write(text);
  };
  const json: Record<string, unknown> = {
    status: result.status,
    method: config.method,
    preset: recipe.preset,
    out: outDir,
    startStep: result.startStep,
    step: state.step,
    totalSteps: state.totalSteps,
    best: state.best ? { score: state.best.score, epoch: state.best.epoch + 1, reference: data.reference ?? 'consensus' } : null,
    // A complete run resumed again writes no log line: one deleted since is not named as an output.
    files: { best: files.best ?? null, last: files.last ?? null, log: fs.existsSync(files.log) ? files.log : null },
  };
  // The curves picture is a convenience: a failure to draw it is said, never fatal to the run.
  const curves = await writeRunCurves(outDir).catch((err: Error) => {
    process.stderr.write(`note: no ${CURVES_FILE}: ${err.message}\n`);
    return undefined;
  });
  if (curves) (json.files as Record<string, unknown>).curves = curves;
  const logOutputs: [string, string | string[]][] = [...(fs.existsSync(files.log) ? [['training log', files.log] as [string, string]] : []), ...(curves ? [['curves', curves] as [string, string]] : [])];
  if (result.status === 'interrupted') {
    const pending = state.pendingValidation ? ` during the validation after it (the resumed run validates first)` : '';
    say(`interrupted at step ${state.step}/${state.totalSteps}${pending}; continue with: cmseg train --out ${shellWord(displayPath(outDir))} --resume\n`);
    // As the text says it: a script deciding whether the run is complete or what the resume does.
    if (state.pendingValidation) json.pendingValidation = { epoch: state.epoch, step: state.step };
    if (flags.json) process.stdout.write(JSON.stringify(json) + '\n');
    else printOutputs([['checkpoints', checkpoints], ...logOutputs]);
    process.exitCode = stoppedBy === 'SIGTERM' ? 143 : 130; // 128 + the signal's number, as a shell reports it
    return;
  }
  const seconds = (Date.now() - started) / 1000;
  json.seconds = seconds;
  const against = data.reference ? ` against the ${data.reference}` : '';
  const best = state.best ? `; best validation Dice${against} ${state.best.score.toFixed(4)} (epoch ${state.best.epoch + 1})` : '';
  // A run stopped during its last validation and resumed did only that validation.
  const done = result.startStep === state.step && result.validatedPending ? `validated the run at step ${state.step} (its validation had been stopped); it is complete`
    : result.startStep === state.step ? `the run was already complete at step ${state.step}` : `trained ${config.method} from step ${result.startStep} to ${state.step} in ${seconds < 60 ? `${seconds.toFixed(1)} s` : `${etaText(seconds)} (${seconds.toFixed(0)} s)`}`;
  say(`${done}${best}\n`);
  const outputs: [string, string | string[]][] = [['checkpoints', checkpoints], ...logOutputs];
  if (flags.test) {
    const chosen = files.best ?? files.last;
    const model = await loadCheckpoint(chosen);
    const testFile = path.join(outDir, 'eval-test.json');
    // A BraTS run's test cases (hours on a CPU) show a bar and a line each, unless --quiet.
    const testCases = recipe.dataset.kind === 'brats' && !flags.quiet ? recipe.dataset.splits.test.length : 0;
    if (testCases > 0) process.stderr.write(`scoring ${testCases} test case(s) with ${path.basename(chosen)}\n`);
    const testExtra = { checkpoint: chosen, method: config.method, preset: recipe.preset, dataset: recipe.dataset, seed: config.seed };
    const { summary, fused } = await writeTestResults(model, data, testFile, testExtra, testCases > 0);
    say(`\ntest set, ${path.basename(chosen)}${referenceNote(summary)}:\n` + evaluationText(summary, fused, { classNames: data.classNames }) + bratsText(summary) + '\n');
    outputs.push(['test metrics', testFile]);
    json.test = { checkpoint: chosen, metrics: summary, fusedLabels: fused ?? null };
    (json.files as Record<string, unknown>).testMetrics = testFile;
  }
  if (flags.json) process.stdout.write(JSON.stringify(json) + '\n');
  else printOutputs(outputs);
}

/** The settings of every preset that flags override, one row each: what "default: the preset's" means. */
function presetDefaultsTable(): string {
  const rows = PRESET_NAMES.map((name) => {
    const { dataset, train } = presetByName(name);
    const length = train.steps !== undefined ? `${train.steps} steps` : `${train.epochs} epochs`;
    const sched = train.schedule;
    const lr = `${sched.kind} ${sched.lr}${sched.minLr !== undefined ? `->${sched.minLr}` : ''}`;
    const labels = 'labels' in dataset ? dataset.labels : '-';
    // BraTS patches are augmented by the patch loader (flips, intensity), 2D batches by the trainer.
    const aug = dataset.kind === 'brats' ? (dataset.augment ? 'flips+intensity' : 'none')
      : train.augment.flips || train.augment.rotations ? [train.augment.flips && 'flips', train.augment.rotations && 'rot'].filter(Boolean).join('+') : 'none';
    return [name, labels, length, String(train.batchSize), lr, `${train.optimizer} wd ${train.weightDecay}`, String(train.lambda), `${train.depth}/${train.baseChannels}`, aug];
  });
  const head = ['preset', '--labels', 'length', '--batch-size', '--schedule --lr', '--optimizer', '--lambda', 'depth/c', 'augment'];
  const widths = head.map((h, c) => Math.max(h.length, ...rows.map((r) => r[c].length)));
  const line = (cells: string[]) => '  ' + cells.map((x, c) => x.padEnd(widths[c])).join('  ').trimEnd();
  return [line(head), ...rows.map(line)].join('\n');
}

export function registerTrainCommand(program: Command): Command {
  const command = program
    .command('train')
    .description('train a U-Net with annotator confusion matrices (or a baseline) from noisy labels')
    .addOption(choiceOption('--preset <name>', 'data set and settings to start from', PRESET_NAMES).default('mnist'))
    .addOption(choiceOption('--method <name>', 'training variant (SPEC section 4)', METHOD_NAMES).default('cm'))
    .addOption(choiceOption('--labels <mode>', 'dense: every annotator labels every image; single: one annotator per image', ['dense', 'single']))
    .option('--epochs <n>', 'epochs to train (default: the preset\'s)', parseInteger(1))
    .option('--steps <n>', 'a budget of optimiser steps instead of epochs', parseInteger(1))
    .option('--batch-size <n>', 'images per step', parseInteger(1))
    .option('--lr <x>', 'base learning rate (a preset\'s cosine floor scales with it)', parseNumber(0, false))
    .addOption(choiceOption('--schedule <kind>', 'learning-rate schedule', SCHEDULE_KINDS))
    .addOption(choiceOption('--optimizer <kind>', 'adam (L2 in the gradient) or adamw (decoupled decay)', ['adam', 'adamw']))
    .option('--weight-decay <x>', 'weight decay', parseNumber(0))
    .option('--lambda <x>', 'trace weight (SPEC section 4)', parseNumber(0))
    .option('--lambda-warmup <x>', 'weight of the negated trace during the warm-up steps (default: --lambda)', parseNumber(0))
    .option('--warmup-steps <n>', 'first steps with the negated trace (paper section 2.4)', parseInteger(0))
    .option('--depth <n>', 'U-Net levels', parseInteger(1))
    .option('--base-channels <n>', 'channels of the first U-Net level', parseInteger(1))
    .option('--cm-rank <n>', 'rank of the cm-lowrank CMs', parseInteger(1))
    .option('--cm-head-blocks <n>', 'conv blocks of each annotator\'s CM head before its 1x1 output (SPEC section 2; 0..8)', parseInteger(0))
    .addOption(choiceOption('--cm-init <kind>', 'CM heads\' start: identity (diagonal ~0.8) or uniform (the plain initialisation: global CMs start at exactly 1/classes, pixel-wise ones at the heads\' random outputs)', ['identity', 'uniform']))
    .option('--train-images <n>', 'MNIST training images', parseInteger(1))
    .option('--val-images <n>', 'MNIST validation images', parseInteger(1))
    .option('--test-images <n>', 'MNIST test images', parseInteger(1))
    .option('--data-seed <n>', 'seed of the data split and the synthetic annotators', parseInteger(0))
    .option('--data <dir>', 'BraTS: a cache made by cmseg prepare, or a BraTS folder (then prepared into <out>/cache); --preset images: the image folder', parsePath('--data'))
    .option('--classes <n>', 'image folders: classes including background (default 2)', parseInteger(2))
    .addOption(choiceOption('--label-mapping <how>', "image folders: how label PNGs are read: value (the sample is the label), binary (non-zero is foreground), auto (binary for 2 classes)", ['auto', 'value', 'binary']))
    .option('--patch <n>', 'BraTS: edge of the cubic training patch, also the sliding window (a multiple of 2^(depth-1))', parseInteger(1))
    .option('--val-cases <n>', 'BraTS: validation cases scored after every epoch (cmseg eval scores them all)', parseInteger(1))
    .option('--steps-per-epoch <n>', 'BraTS: patch batches between validations and checkpoints', parseInteger(1))
    .option('--workers <n>', 'BraTS: patch-loader threads (0: in the main thread; the batches are the same)', parseInteger(0))
    .option('--geometry-tolerance <mm>', 'BraTS folders (prepared into <out>/cache): how far apart a case\'s files may put one voxel and still count as one grid', parseNumber(0), BRATS_GEOMETRY_TOLERANCE_MM)
    .addOption(
      choiceOption(
        '--label-scheme <scheme>',
        "BraTS folders (prepared into <out>/cache): how the segmentations' numbers are read, as by prepare (peds2024: BraTS-PEDs 2024, 1 ET, 2 NET, 3 CC, 4 ED; default brats); a cache keeps its own",
        BRATS_LABEL_SCHEMES,
      ),
    )
    .option('--no-augment', 'no random flips and rotations')
    .option('--seed <n>', 'seed of the initialisation, data order and augmentation', parseInteger(0))
    .option('--out <dir>', 'output folder (default results/runs/<preset>-<method>-<labels>-seed<seed>; image folders: the folder\'s name for <labels>)', parsePath('--out'))
    .option('--resume', 'continue the run in --out from its last checkpoint')
    .option('--checkpoint-every <n>', 'also save the last checkpoint every n steps', parseInteger(0))
    .option('--bf16', 'GPU presets: convolutions in bfloat16 with fp32 accumulation (like torch.autocast bf16)')
    .option('--no-test', 'skip the test-set evaluation at the end')
    .option('--threads <n>', 'native threads (default: CMSEG_NUM_THREADS, else every usable CPU: the cores, fewer under a CPU affinity mask or cgroup quota)', parseThreads)
    .option('-q, --quiet', 'no progress output')
    .option('--json', 'print the result as one JSON object on stdout (status, steps, best validation, test metrics, files) instead of text')
    .action((flags: TrainFlags, cmd: Command) => runTrain(flags, cmd));
  command.addHelpText(
    'after',
    `\nPresets:\n${PRESET_NAMES.map((name) => `  ${name.padEnd(11)} ${presetByName(name).description}`).join('\n')}\n` +
      `\nWhat each preset sets (a flag overrides it):\n${presetDefaultsTable()}\n` +
      '\nBraTS: --data is a cache made by cmseg prepare, or a BraTS folder, which is then prepared into <out>/cache\n' +
      '(annotators over, under, wrong; --labels and --data-seed apply). Several runs on the same data should share one\n' +
      'cmseg prepare cache. The cases are split 70/15/15 into training, validation and test by --data-seed (at least one\n' +
      'each); the split is saved in the checkpoints. Training reads random patches (--patch, a third centred on tumour);\n' +
      'validation (--val-cases per epoch) and test predict whole cases by sliding windows of the patch size.\n' +
      'naive-staple and naive-spatial-staple first fuse each training case\'s annotator maps (multi-label or spatial\n' +
      'STAPLE, per case) into the cache, once: later runs on the same cache reuse them.\n' +
      '\nImage folders (--preset images --data DIR): DIR/images/<name>.png, DIR/labels/<annotator>/<name>.png (a missing\n' +
      'file: that annotator did not label the image), optional DIR/consensus/<name>.png; cmseg simulate writes one. Every\n' +
      'image has one size, a multiple of 2^(depth-1) on each side. The images are split 70/15/15 by --data-seed; the split\n' +
      'is saved in the checkpoints. Validation and test score against consensus/, or without it against the annotators\'\n' +
      'majority vote (no CM error then); oracle needs consensus/.\n',
  );
  return withExamples(
    command,
    'cmseg train --preset mnist --method cm --labels dense --out runs/cm-dense',
    'cmseg train --preset mnist --method naive-mode --labels single --epochs 3 --seed 1',
    'cmseg train --out runs/cm-dense --resume',
    'cmseg train --preset brats3d --data cache/brats2021 --method cm --out runs/brats-cm',
    'cmseg train --preset images --data data/lidc-2d --method cm --out runs/lidc-cm',
  );
}
