// The training loop: batches from a TrainingSource, augmentation, the method's target,
// one Adam/AdamW step with the scheduled learning rate, validation every few epochs,
// `best` and `last` checkpoints with the trainer state, a JSON-lines log, and a clean
// stop on an abort signal (SIGINT in the CLI).
//
// Exact resume. Everything random is drawn from streams forked from the run seed by
// (epoch, batch index): the epoch's image order, the batch contents, the augmentation.
// The model's weights, Adam moments and step count are in the checkpoint, the learning
// rate is a function of the step (schedule.ts) and the trace warm-up follows the model's
// own step count. So the position (epoch, batch index, step) in `extra` is the whole
// generator state, and a run resumed from `last` takes the same steps, with the same
// losses, as one that was never stopped.
//
// One writer per run folder. <outDir>/.train.lock (lockRunFolder) is held for the whole
// run, so two processes started on one folder, or two resumes of one run, cannot both
// write checkpoints and log lines there; taking it also clears the temp files of writers
// that were killed.

import * as fs from 'fs';
import * as path from 'path';
import { Rng } from '../data/random';
import type { CmInit, Device } from '../model/config';
import { loadCheckpoint, readCheckpoint, saveCheckpoint } from '../model/checkpoint';
import { backendInfo, createModel, Model } from '../model/model';
import { acquireFolderLock, appendFileWholeSync, displayPath, type FileLock, LockHeldError, lockHolderText, makeFolderSync, writeFileAtomic } from '../data/files';
import { augmentBatch, AugmentOptions } from './augment';
import type { TrainingSource } from './data';
import { type MethodDefinition, METHODS, MethodName, methodBatch, methodDefinition } from './methods';
import { type ProgressFields, ProgressReporter, silentProgress } from './progress';
import { checkSchedule, checkScheduleSettings, learningRate, LrSchedule, scheduleWithDefaults } from './schedule';

export const CHECKPOINT_LAST = 'last.safetensors';
export const CHECKPOINT_BEST = 'best.safetensors';
export const TRAIN_LOG = 'train-log.jsonl';
/** Present in a run folder while a process trains in it (holds the pid); see lockRunFolder. */
export const RUN_LOCK = '.train.lock';
export const TRAINER_STATE_FORMAT = 'cmseg-trainer';
export const TRAINER_STATE_VERSION = 1;

/** Everything that determines a run's result. Saved in every checkpoint; JSON only. */
export interface TrainConfig {
  method: MethodName;
  /** U-Net levels and base width (SPEC section 2). */
  depth: number;
  baseChannels: number;
  /** Rank of the `cm-lowrank` CMs. */
  cmRank: number;
  cmHeadBlocks: number;
  cmInit: CmInit;
  device: Device;
  /** GPU only: convolutions on bfloat16 copies with fp32 accumulation (model config bf16). */
  bf16?: boolean;
  /**
   * Exactly one of epochs and steps: a number of epochs, or a budget of optimiser steps.
   * `undefined` reads as absent ({...preset.train, epochs: undefined, steps: 100}), also
   * under exactOptionalPropertyTypes.
   */
  epochs?: number | undefined;
  steps?: number | undefined;
  batchSize: number;
  optimizer: 'adam' | 'adamw';
  weightDecay: number;
  schedule: LrSchedule;
  /** Trace weight (SPEC section 4); ignored by methods that fix it (cm-notrace). */
  lambda: number;
  /** Steps with the negated trace (paper 2.4) and its weight (default lambda). */
  warmupSteps: number;
  lambdaWarmup?: number;
  augment: AugmentOptions;
  /** Seeds the model's initialisation, the data order and the augmentation. */
  seed: number;
  /** Validate (and maybe save `best`) every this many epochs and after the last step. */
  validateEvery: number;
  /** Also save `last` every this many steps inside an epoch (0: only at epoch ends). Bookkeeping: a resume may change it (BOOKKEEPING_SETTINGS). */
  checkpointEvery: number;
}

export const TRAIN_DEFAULTS: Omit<TrainConfig, 'method' | 'epochs' | 'steps'> = {
  depth: 4,
  baseChannels: 32,
  cmRank: 1,
  cmHeadBlocks: 0,
  cmInit: 'identity',
  device: 'cpu',
  batchSize: 32,
  optimizer: 'adam',
  weightDecay: 0,
  schedule: { kind: 'constant', lr: 1e-3 },
  lambda: 0.01,
  warmupSteps: 0,
  augment: { flips: false, rotations: false },
  seed: 0,
  validateEvery: 1,
  checkpointEvery: 0,
};

/**
 * The settings that say only when `last` is saved, never what is trained: the steps, losses,
 * weights and `best` of a run are the same whatever they are, so a resume may change them (to
 * save more often on a machine that pre-empts jobs, say). Every other setting decides the
 * result and must be the checkpoint's. validateEvery is not bookkeeping: it decides which
 * epochs compete for `best`, and best.safetensors would then be the best of validations at
 * a cadence no run had.
 */
export const BOOKKEEPING_SETTINGS: readonly (keyof TrainConfig)[] = ['checkpointEvery'];

/**
 * `config` with its optional settings spelled out as a run reads them: bf16 false, lambdaWarmup
 * equal to lambda, and the schedule's own defaults (scheduleWithDefaults; `totalSteps`, the
 * run's length, sets the step schedule's default stepSize). createRunModel builds the model from
 * this, and a resume compares these, so a default that one side gives and the other leaves out
 * is no difference. The required settings are not filled in: checkTrainConfig refuses them missing.
 */
export function trainConfigWithDefaults(config: TrainConfig, totalSteps: number): TrainConfig {
  const schedule = typeof config.schedule === 'object' && config.schedule !== null ? scheduleWithDefaults(config.schedule, totalSteps) : config.schedule;
  return { ...config, bf16: config.bf16 ?? false, lambdaWarmup: config.lambdaWarmup ?? config.lambda, schedule };
}

/**
 * What the run's float rounding depends on besides its settings, logged with its start and
 * each resume: a resume is bit for bit the run it continues on the same thread count and CPU
 * path, and differs in rounding only on others (partial sums split by thread; oneDNN's kernels
 * vs the reference), which these say when two runs are compared.
 */
function runtimeRecord(): { threads: number; simd: string; onednnBuilt: boolean; CMSEG_ONEDNN: string | null; CMSEG_ONEDNN_TRUNK: string | null } {
  const info = backendInfo();
  return {
    threads: info.threads,
    simd: info.simd,
    onednnBuilt: info.onednn,
    CMSEG_ONEDNN: process.env.CMSEG_ONEDNN ?? null,
    CMSEG_ONEDNN_TRUNK: process.env.CMSEG_ONEDNN_TRUNK ?? null,
  };
}

/** A setting (a dotted path for the schedule's: schedule.minLr) that a resume would change. */
export interface SettingDifference {
  key: string;
  saved: unknown;
  now: unknown;
}

/**
 * How `now` differs from a checkpoint's settings `saved` in what it would train: both with their
 * defaults filled in (trainConfigWithDefaults), the bookkeeping settings left out, and a length
 * given as epochs on one side and as the same number of steps on the other (`batchesPerEpoch`,
 * the run's) taken as the same. Empty: the run may be resumed with `now` (resumedConfig).
 */
export function resumeDifferences(now: TrainConfig, saved: TrainConfig, batchesPerEpoch: number): SettingDifference[] {
  const total = (c: TrainConfig) => c.steps ?? (c.epochs === undefined ? NaN : c.epochs * batchesPerEpoch);
  const a: Record<string, unknown> = { ...trainConfigWithDefaults(now, total(now)) };
  const b: Record<string, unknown> = { ...trainConfigWithDefaults(saved, total(saved)) };
  const drop: string[] = [...BOOKKEEPING_SETTINGS];
  if (total(now) === total(saved)) drop.push('epochs', 'steps');
  else if (now.steps !== undefined) {
    // Another length is said in the caller's unit: "steps 16 (the run has 12)", not two entries.
    b.steps = total(saved);
    drop.push('epochs');
  } else {
    b.epochs = saved.epochs ?? total(saved) / batchesPerEpoch;
    drop.push('steps');
  }
  // Settings the run's method does not read (lambda for a naive method, cmRank for a method
  // that is not cm-lowrank): another value trains the same run, so it is no difference; the
  // run keeps its recorded value (resumedConfig). Judged only when the method is the run's:
  // another method is a difference itself, and under it these settings may count.
  if (now.method === saved.method && Object.hasOwn(METHODS, saved.method)) drop.push(...settingsIgnoredBy(METHODS[saved.method]));
  for (const key of drop) delete a[key], delete b[key];
  // A default that follows another setting (lambdaWarmup follows lambda, the step schedule's
  // stepSize the length), left out on both sides, is said by that setting's own difference.
  const derived = (key: string) =>
    (key === 'lambdaWarmup' && now.lambdaWarmup === undefined && saved.lambdaWarmup === undefined) ||
    (key === 'schedule.stepSize' && now.schedule?.stepSize === undefined && saved.schedule?.stepSize === undefined);
  return differences(a, b).filter((d) => !derived(d.key));
}

/**
 * The settings `method` never reads, so that their values change nothing a run of it trains
 * (checked against the engine): cmRank sizes only the cm-lowrank heads; the trace settings
 * (lambda, lambdaWarmup, warmupSteps) weigh a term that the methods without CMs do not have
 * (plain cross-entropy) and that cm-notrace fixes at 0; cmInit sets only the CM heads' start,
 * untrained by the methods without CMs (and drawn from the same random numbers either way, so
 * the rest of the model starts alike); cmHeadBlocks builds no layer under global CMs. Not
 * cmHeadBlocks for the methods without CMs: their model has the (untrained) pixel-wise heads,
 * whose blocks take random numbers from the stream that then initialises the decoder's
 * up-convolutions, so another count starts the network elsewhere.
 */
export function settingsIgnoredBy(method: MethodDefinition): (keyof TrainConfig)[] {
  const ignored: (keyof TrainConfig)[] = [];
  if (method.cmMode !== 'lowrank') ignored.push('cmRank');
  if (!method.learnsCms || method.lambda !== undefined) ignored.push('lambda', 'lambdaWarmup', 'warmupSteps');
  if (!method.learnsCms) ignored.push('cmInit');
  if (method.cmMode === 'global') ignored.push('cmHeadBlocks');
  return ignored;
}

/**
 * What a refusal adds after the differences: why the length cannot change (a user who wants to
 * train on for longer asks it), or '' when the length is the same.
 */
export function resumeDifferencesNote(changed: readonly SettingDifference[]): string {
  return changed.some((d) => d.key === 'epochs' || d.key === 'steps')
    ? ' (a resumed run keeps its length: the learning-rate schedule and the epochs follow from it, so a longer run would not have taken the steps taken so far)'
    : '';
}

/** The settings a resume trains with: the checkpoint's, with the caller's bookkeeping settings (resumeDifferences must be empty). */
export function resumedConfig(saved: TrainConfig, now: TrainConfig): TrainConfig {
  const config: Record<string, unknown> = { ...saved };
  for (const key of BOOKKEEPING_SETTINGS) config[key] = now[key];
  return config as unknown as TrainConfig;
}

export interface ValidationResult {
  /** The number that picks the `best` checkpoint (higher is better): consensus Dice. */
  score: number;
  /** Everything else worth logging, flat. */
  metrics: Record<string, number>;
  /**
   * Optional: the figures of each case validated (BraTS: one entry per whole volume), logged
   * as the validation entry's `cases` so that a case that scored badly, or NaN, can be found;
   * the means above say neither. Not kept in the checkpoints' trainer state.
   */
  cases?: ValidationCase[];
}

/** One validated case: its id, its own `score` (as the result's, for this case only) and other figures, flat. */
export interface ValidationCase {
  id: string;
  score: number;
  metrics?: Record<string, number>;
}

/**
 * What a validator may call to say how far it has got: `done` of `total` cases scored, and
 * `id` the case it scores now (absent at the end). The progress bar shows it ("validating
 * 3/8"): a BraTS validation of whole cases takes minutes on a CPU, with the bar standing still.
 * Called before a case (done < total) after hooks.signal fired, it throws: let that propagate,
 * and the run stops there, without the minutes the other cases would take (a scheduler's
 * SIGTERM gives a job seconds); the resumed run validates again. A validator that throws the
 * signal's reason itself (signal.throwIfAborted()) stops the same way. A validator that declares
 * this second parameter (or declares none: rest parameters, a wrapper passing its arguments on)
 * is taken for a long one: `last` is saved before it (marked pendingValidation), so a SIGKILL
 * during it resumes at the epoch's end and validates first.
 */
export type ValidationProgress = (done: number, total: number, id?: string) => void;

/** Validates the model; `progress` (optional to call, and to declare: one-argument validators work as before) reports per case. */
export type Validator = (model: Model, progress: ValidationProgress) => Promise<ValidationResult>;

/** Where the run is; saved in every checkpoint as extra.trainer.state. */
export interface TrainerState {
  /** Epoch in progress (0-based) and the next batch in it. */
  epoch: number;
  batchInEpoch: number;
  /** Optimiser steps taken. */
  step: number;
  totalSteps: number;
  batchesPerEpoch: number;
  best: { score: number; epoch: number; step: number } | null;
  lastValidation: (ValidationResult & { epoch: number; step: number }) | null;
  /** Sums over the epoch's steps so far (epoch means in the log survive a resume). */
  epochSums: { loss: number; ce: number; trace: number; steps: number; seconds: number };
  /**
   * true when the run was stopped (hooks.signal) during the validation that ends the epoch
   * before `epoch`: nothing of it was logged, and a resume runs it first, at this step, with
   * this model, as the run would have. Absent otherwise.
   */
  pendingValidation?: true;
}

export interface TrainerExtra {
  format: typeof TRAINER_STATE_FORMAT;
  version: number;
  config: TrainConfig;
  state: TrainerState;
  /** Generators: all forked from `seed` by (epoch, batch); the state's position is their state. */
  rng: { seed: number; epoch: number; batchInEpoch: number };
  /** The learning rate of the next step under the schedule. */
  schedule: LrSchedule & { nextLr: number };
  annotatorNames: string[];
  /** The caller's description of the data (how to rebuild it: preset, dataset options). */
  run: Record<string, unknown>;
}

export interface TrainHooks {
  /**
   * Stop after the step in progress and save `last` (SIGINT); train() then resolves with
   * status 'interrupted'. A signal already aborted when train() is called takes no step:
   * the same result at the step the run stands at (a new run saves its untrained model
   * as `last`, step 0, so that a resume continues it exactly).
   */
  signal?: AbortSignal;
  progress?: ProgressReporter;
  validate?: Validator;
  /** Stored in every checkpoint as extra.run: what is needed to rebuild the data (a resume without it keeps the checkpoint's). */
  run?: Record<string, unknown>;
  /** Continue from <outDir>/last.safetensors. */
  resume?: boolean;
  /**
   * The run folder's lock, when the caller took it (lockRunFolder(outDir)) to hold it
   * around more than train(), e.g. a test evaluation after it. Without it train() takes
   * the lock itself and releases it when it returns.
   */
  lock?: FileLock;
}

export interface TrainResult {
  status: 'completed' | 'interrupted';
  /** The step this call started from (0, or where a resumed run stood). */
  startStep: number;
  /** true when this call (a resume) first did the validation a signal had stopped (TrainerState.pendingValidation). */
  validatedPending?: true;
  state: TrainerState;
  model: Model;
  files: { last: string; best?: string; log: string };
}

/** A problem with the run's settings or files that the user can fix. */
export class TrainingError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'TrainingError';
  }
}

/** Another process (or another train() in this one) is training in the run folder. */
export class RunFolderBusyError extends TrainingError {
  constructor(
    readonly outDir: string,
    /** The lock file, <outDir>/.train.lock. */
    readonly lockFile: string,
    /** The pid of the process training there (process.pid when it is this one). */
    readonly holder: number,
    sameProcess: boolean,
    /** Its host, when another machine's (a run folder on a network file system). */
    readonly host?: string,
  ) {
    super(
      sameProcess
        ? `${displayPath(outDir)} is in use: this process is already training in it`
        : `${displayPath(outDir)} is in use: another cmseg process (${lockHolderText(holder, host)}) is training in it; wait for it to finish, or delete ${displayPath(lockFile)} if that process is gone (or if this folder is a copy of one it trains in: a copy keeps its lock)`,
    );
    this.name = 'RunFolderBusyError';
  }
}

/**
 * Makes the run folder if needed and takes its lock (<outDir>/.train.lock, holding this
 * pid) so that no other process trains or resumes in it meanwhile; a lock left by a dead
 * process is taken over. Then removes the temp files that killed writers left in the
 * folder (writeFileAtomic's `.<file>.<pid>.<hex>.tmp` of a pid that is gone). Throws
 * RunFolderBusyError when a live process holds the lock. Release it with lock.release();
 * it also goes when the process exits.
 */
export function lockRunFolder(outDir: string): FileLock {
  // makeFolderSync: Node's recursive mkdir says ENOENT on a read-only file system.
  makeFolderSync(outDir);
  const lockFile = path.join(outDir, RUN_LOCK);
  try {
    return acquireFolderLock(lockFile, [outDir]);
  } catch (err) {
    if (err instanceof LockHeldError) throw new RunFolderBusyError(outDir, lockFile, err.holder, err.sameProcess, err.host);
    throw err;
  }
}

export function checkTrainConfig(config: TrainConfig): void {
  const int = (name: string, value: number | undefined, min: number) => {
    if (value !== undefined && (!Number.isInteger(value) || value < min)) throw new TrainingError(`${name} ${value} must be an integer >= ${min}`);
  };
  methodDefinition(config.method);
  if ((config.epochs === undefined) === (config.steps === undefined)) {
    throw new TrainingError('give either a number of epochs or a budget of steps, not both or neither');
  }
  int('epochs', config.epochs, 1);
  int('steps', config.steps, 1);
  int('batch size', config.batchSize, 1);
  int('depth', config.depth, 1);
  int('base channels', config.baseChannels, 1);
  int('cm rank', config.cmRank, 1);
  int('warm-up steps', config.warmupSteps, 0);
  int('validate-every', config.validateEvery, 1);
  int('checkpoint-every', config.checkpointEvery, 0);
  if (!Number.isSafeInteger(config.seed)) throw new TrainingError(`seed ${config.seed} must be a safe integer`);
  if (!(config.lambda >= 0) || !Number.isFinite(config.lambda)) throw new TrainingError(`lambda ${config.lambda} must be a finite number >= 0`);
  if (config.optimizer !== 'adam' && config.optimizer !== 'adamw') throw new TrainingError(`optimizer ${JSON.stringify(config.optimizer)} must be adam or adamw`);
  if (!(config.weightDecay >= 0) || !Number.isFinite(config.weightDecay)) throw new TrainingError(`weight decay ${config.weightDecay} must be a finite number >= 0`);
  // The settings below were checked only by createModel, after the run folder was made: a
  // plain Error naming the engine's key and an empty folder left behind; a string bf16
  // ('false') was truthy and turned bfloat16 on.
  const shown = (v: unknown) => (typeof v === 'number' ? String(v) : (JSON.stringify(v) ?? String(v)));
  if (config.lambdaWarmup !== undefined && !(typeof config.lambdaWarmup === 'number' && config.lambdaWarmup >= 0 && Number.isFinite(config.lambdaWarmup))) {
    throw new TrainingError(`lambda-warmup ${shown(config.lambdaWarmup)} must be a finite number >= 0 (the warm-up negates it itself)`);
  }
  if (!['cpu', 'cuda', 'auto'].includes(config.device)) throw new TrainingError(`device ${shown(config.device)} must be cpu, cuda or auto`);
  if (!['identity', 'uniform'].includes(config.cmInit)) throw new TrainingError(`cm-init ${shown(config.cmInit)} must be identity or uniform`);
  if (config.bf16 !== undefined && typeof config.bf16 !== 'boolean') throw new TrainingError(`bf16 ${shown(config.bf16)} must be true or false`);
  // The object-valued settings (a JavaScript caller may leave them out): said by name here
  // rather than as a TypeError from deep inside the first step.
  const augment = config.augment as Partial<AugmentOptions> | undefined;
  if (typeof augment !== 'object' || augment === null || typeof augment.flips !== 'boolean' || typeof augment.rotations !== 'boolean') {
    throw new TrainingError(`augment ${JSON.stringify(augment) ?? 'undefined'} must be {flips: boolean, rotations: boolean}`);
  }
  if (typeof config.schedule !== 'object' || config.schedule === null) {
    throw new TrainingError(`schedule ${JSON.stringify(config.schedule) ?? 'undefined'} must be {kind, lr, ...} (a learning-rate schedule)`);
  }
  try {
    checkSchedule(config.schedule);
  } catch (error) {
    throw new TrainingError((error as Error).message);
  }
  // The other required settings, left out by a JavaScript caller (a config not spread from
  // TRAIN_DEFAULTS or a preset's): the checks above let them through, and the engine's own
  // default or none at all applied without a word (no validateEvery validated only after the
  // last step; no baseChannels gave a 3D model 16 channels, not TRAIN_DEFAULTS' 32).
  const missing = (Object.keys(TRAIN_DEFAULTS) as (keyof TrainConfig)[]).filter((key) => config[key] === undefined);
  if (missing.length) {
    throw new TrainingError(`the settings lack ${missing.map((k) => `'${k}'`).join(', ')} (start from {...TRAIN_DEFAULTS, method, epochs or steps}, or a preset's train settings)`);
  }
}

// Every key of TrainConfig (the compiler checks the list is complete): a new run refuses others.
const TRAIN_CONFIG_KEYS: Record<keyof TrainConfig, true> = {
  method: true,
  depth: true,
  baseChannels: true,
  cmRank: true,
  cmHeadBlocks: true,
  cmInit: true,
  device: true,
  bf16: true,
  epochs: true,
  steps: true,
  batchSize: true,
  optimizer: true,
  weightDecay: true,
  schedule: true,
  lambda: true,
  warmupSteps: true,
  lambdaWarmup: true,
  augment: true,
  seed: true,
  validateEvery: true,
  checkpointEvery: true,
};

/**
 * Refuses settings a new run would not read: a JavaScript caller's misspelled or misplaced
 * key (`lr` at the top level, `weight_decay`, torch's `eta_min` in the schedule) was ignored
 * without a word and the run trained with the defaults instead. Only for new runs: a resumed
 * run's settings must equal its checkpoint's, whatever that holds.
 */
function checkNoUnknownSettings(config: TrainConfig): void {
  // A key set to undefined carries no intent (e.g. {...preset.train, steps: undefined}).
  const given = (o: object) => Object.entries(o).filter(([, v]) => v !== undefined).map(([k]) => k);
  const unknown = given(config).filter((key) => !Object.hasOwn(TRAIN_CONFIG_KEYS, key));
  if (unknown.length) {
    const hint = unknown.includes('lr') ? ' (the learning rate is schedule.lr)' : '';
    throw new TrainingError(`the settings have no ${unknown.map((k) => `'${k}'`).join(', ')}${hint}`);
  }
  try {
    checkScheduleSettings(config.schedule);
  } catch (error) {
    throw new TrainingError((error as Error).message);
  }
  // The same for the augmentation's settings: {scale: 0.1} or {rotation: 15} trained without them.
  const augmentKeys = ['flips', 'rotations'];
  const extra = given(config.augment).filter((key) => !augmentKeys.includes(key));
  if (extra.length) throw new TrainingError(`augment has no setting ${extra.map((k) => `'${k}'`).join(', ')} (it takes ${augmentKeys.join(', ')})`);
}

/**
 * The source's batches per epoch, refused unless a whole number >= 1: a caller's own source
 * giving floor(count / batchSize) = 0 for a set smaller than a batch made a run that
 * "completed" at once with no step and no checkpoint, and a fraction (2.5) made epochs of
 * unequal lengths and a budget of epochs * 2.5 steps.
 */
function sourceBatchesPerEpoch(source: TrainingSource, batchSize: number): number {
  const batches = source.batchesPerEpoch(batchSize);
  if (!Number.isSafeInteger(batches) || batches < 1) {
    throw new TrainingError(`the training source gives ${batches} batches per epoch (batch size ${batchSize}); it must be a whole number >= 1`);
  }
  return batches;
}

/** float32's largest finite value: the engine keeps the learning rate in a float. */
const FLOAT32_MAX = 3.4028234663852886e38;

/**
 * Refuses a schedule whose rate leaves float32 within the run (a base rate past 3.4e38, a
 * step schedule with gamma > 1, a cosine minLr past it): the engine refused it only at that
 * step, after the folder, log lines and steps were written. Every schedule is monotone, so
 * the first step past the limit is found by bisection between the first and the last.
 */
function checkScheduleRange(schedule: LrSchedule, totalSteps: number): void {
  const rate = (step: number) => learningRate(schedule, step, totalSteps);
  const last = totalSteps - 1;
  if (rate(0) <= FLOAT32_MAX && rate(last) <= FLOAT32_MAX) return;
  let bad = last;
  if (rate(0) > FLOAT32_MAX) bad = 0;
  else {
    let good = 0; // rate(good) fits, rate(bad) does not
    while (bad - good > 1) {
      const mid = Math.floor((good + bad) / 2);
      if (rate(mid) > FLOAT32_MAX) bad = mid;
      else good = mid;
    }
  }
  throw new TrainingError(`the schedule reaches a learning rate of ${rate(bad)} at step ${bad + 1} of ${totalSteps}, beyond float32 (3.4e38): the engine could not use it`);
}

function createRunModel(given: TrainConfig, source: TrainingSource): Model {
  // The optional settings' defaults (bf16, lambdaWarmup) from the one place a resume compares them by.
  const config = trainConfigWithDefaults(given, NaN);
  const method = methodDefinition(config.method);
  const lambda = method.lambda ?? config.lambda;
  return createModel({
    ndim: source.ndim,
    inChannels: source.channels,
    classes: source.classes,
    annotators: source.annotatorNames.length,
    depth: config.depth,
    baseChannels: config.baseChannels,
    cmMode: method.cmMode,
    cmRank: config.cmRank,
    cmHeadBlocks: config.cmHeadBlocks,
    cmInit: config.cmInit,
    device: config.device,
    ...(config.bf16 ? { bf16: true } : {}),
    seed: config.seed,
    optimizer: { kind: config.optimizer, lr: config.schedule.lr, weightDecay: config.weightDecay },
    loss: {
      lambda,
      lambdaWarmup: method.lambda ?? config.lambdaWarmup,
      warmupSteps: config.warmupSteps,
    },
  });
}

/** The trainer state saved in a checkpoint, or a TrainingError saying why it is not one. */
export function trainerExtra(extra: Record<string, unknown>, file: string): TrainerExtra {
  const e = extra as Partial<TrainerExtra>;
  if (e.format !== TRAINER_STATE_FORMAT || !e.config || !e.state) {
    throw new TrainingError(`${file} was not written by the cmseg trainer (no trainer state in its metadata)`);
  }
  if (e.version !== TRAINER_STATE_VERSION) throw new TrainingError(`${file}: trainer state version ${e.version}, this cmseg reads ${TRAINER_STATE_VERSION}`);
  return e as TrainerExtra;
}

/** Reads only the trainer state of a checkpoint (no model is built). */
export async function readTrainerState(file: string): Promise<TrainerExtra> {
  if (!fs.existsSync(file)) throw new TrainingError(`checkpoint not found: ${file}`);
  return trainerExtra((await readCheckpoint(file)).extra, file);
}

function differences(a: unknown, b: unknown, prefix = ''): SettingDifference[] {
  const isObject = (x: unknown): x is Record<string, unknown> => typeof x === 'object' && x !== null && !Array.isArray(x);
  // A schedule of another kind is one difference (not one for each of the kinds' own settings).
  const otherKind = prefix === 'schedule' && isObject(a) && isObject(b) && a.kind !== b.kind;
  if (isObject(a) && isObject(b) && !otherKind) {
    const keys = new Set([...Object.keys(a), ...Object.keys(b)]);
    return [...keys].flatMap((k) => differences(a[k], b[k], prefix ? `${prefix}.${k}` : k));
  }
  return JSON.stringify(a) === JSON.stringify(b) ? [] : [{ key: prefix, saved: b, now: a }];
}

/**
 * Whether the run folder's `best` belongs to a run that never saved `last`: its log (written by
 * that run: it starts with that run's settings, those in `best`) has no `last` checkpoint entry,
 * so its first save of `last` failed (a full disk) and no run of the folder can be resumed. An
 * earlier run whose `last` was deleted afterwards logged saving it: its `best` is kept.
 */
async function bestOfRunWithoutLast(files: { best: string; log: string }): Promise<boolean> {
  let bestConfig: TrainConfig;
  let first = true;
  let ofThisRun = false;
  let savedLast = false;
  try {
    bestConfig = (await readTrainerState(files.best)).config;
    // Read entry by entry up to the first `last` saved (a log may be hundreds of MB; it was read
    // whole here): the answer is known from its first entry and its first save of `last`.
    forEachTrainLogEntry(
      files.log,
      (e) => {
        if (first) {
          first = false;
          ofThisRun = e.event === 'start' && JSON.stringify(e.config) === JSON.stringify(bestConfig);
          return ofThisRun;
        }
        savedLast = e.event === 'checkpoint' && e.kind === 'last';
        return !savedLast;
      },
      { whileWritten: true },
    );
  } catch {
    return false; // no log, or no readable one, or no trainer checkpoint: keep it
  }
  return ofThisRun && !savedLast;
}

/**
 * Why `file` (best.safetensors) does not hold the best a resumed run recorded (`best`, in its
 * `last` at `step`): it is gone, cannot be read, or holds another model (its trainer state says
 * another best). undefined when it holds that best, or a later one: saved just before a crash
 * that came before `last` was saved, which the resumed run takes again exactly and writes anew
 * (with `pendingValidation`, one of `step` itself: the pending validation's).
 */
async function recordedBestLost(file: string, best: NonNullable<TrainerState['best']>, step: number, pendingValidation = false): Promise<string | undefined> {
  if (!fs.existsSync(file)) return 'is gone';
  let saved: TrainerExtra;
  try {
    saved = await readTrainerState(file);
  } catch (error) {
    return `cannot be read (${(error as Error).message})`;
  }
  if (saved.state.step > step) return undefined;
  const held = saved.state.best;
  // `last` stopped in the validation at its own step: a best of that step is that validation's,
  // saved by an earlier resume that died before it saved `last`; this resume does it again.
  if (pendingValidation && saved.state.step === step && held?.step === step) return undefined;
  if (held && held.step === best.step && held.score === best.score) return undefined;
  return `holds another model (of step ${saved.state.step}${held ? `, best score ${held.score}` : ''})`;
}

/** Whether the run in `outDir` saved best.safetensors but never `last` (its first save of `last` failed). */
export async function runNeverSavedLast(outDir: string): Promise<boolean> {
  const files = { best: path.join(outDir, CHECKPOINT_BEST), log: path.join(outDir, TRAIN_LOG) };
  return fs.existsSync(files.best) && (await bestOfRunWithoutLast(files));
}

/** Why a resume finds nothing; a run whose first save of `last` failed says what to do (`resume`: how the caller says it). */
export async function nothingToResumeMessage(outDir: string, resume = 'resume'): Promise<string> {
  const base = `nothing to resume: ${path.join(outDir, CHECKPOINT_LAST)} does not exist`;
  if (await runNeverSavedLast(outDir)) {
    return `${base} (the run there never saved it, a full disk?); start it again without ${resume}: its ${CHECKPOINT_BEST} is then replaced`;
  }
  return base;
}

class JsonLog {
  constructor(readonly file: string) {}

  write(entry: Record<string, unknown>): void {
    // Whole lines only: appendFileSync left half a line on a full disk, and readTrainLog (cmseg
    // curves) then failed on it until a resume rewrote the log; its error named no file either.
    appendFileWholeSync(this.file, JSON.stringify({ time: new Date().toISOString(), ...entry }) + '\n');
  }

  /**
   * Drops entries past `step` (written after the checkpoint we resume from, e.g. before a crash)
   * and, with `pendingValidation`, the validation entries at `step` (and their saves of `best`):
   * `last` says that validation is still to do, so such an entry is an earlier resume's that
   * failed before it saved `last` (its save of `best` on a full disk, a kill); kept, the log
   * held that validation twice.
   */
  async truncateAfter(step: number, pendingValidation = false): Promise<void> {
    if (!fs.existsSync(this.file)) return;
    const keeps = (line: string) => {
      try {
        const entry = JSON.parse(line) as { step?: number; event?: unknown; kind?: unknown };
        if (pendingValidation && entry.step === step && (entry.event === 'validation' || (entry.event === 'checkpoint' && entry.kind === 'best'))) return false;
        return entry.step === undefined || entry.step <= step;
      } catch {
        return false; // a line cut short by a crash
      }
    };
    // The log is read in pieces (forEachTrainLogLine), not whole: a 250,000-step run's log held
    // 4 times over (its text, its lines, the kept lines, them joined) took 340 MB of heap before
    // the resume took a step. Entries are written in step order, so those past `step` are its
    // end: the log is cut there (nothing is written when nothing is past it, an interrupted
    // run's resume). A log whose kept entries are not one whole-line prefix of it (a dropped line
    // before a kept one, a last kept line without its newline) is rewritten whole, as before.
    let keptEnd = 0;
    let dropped = false;
    let prefix = true;
    forEachTrainLogLine(this.file, (text, _line, end, complete) => {
      if (!text.trim()) return;
      if (!keeps(text)) dropped = true;
      else if (dropped || !complete) prefix = false;
      else keptEnd = end;
    });
    if (prefix) {
      if (keptEnd === fs.statSync(this.file).size) return;
      const fd = fs.openSync(this.file, 'r+');
      try {
        fs.ftruncateSync(fd, keptEnd);
        fs.fsyncSync(fd);
      } finally {
        fs.closeSync(fd);
      }
      return;
    }
    const kept = fs
      .readFileSync(this.file, 'utf8')
      .split('\n')
      .filter((line) => line.trim() && keeps(line));
    await writeFileAtomic(this.file, Buffer.from(kept.map((l) => l + '\n').join('')));
  }
}

/**
 * Trains (or, with hooks.resume, continues) a run in `outDir`. Resolves when the budget is
 * spent or, after hooks.signal fires, once the step in progress is done and `last` is saved
 * (at once, with no step, when the signal had fired before the call). Rejects, before
 * anything is written, a resume whose data is not the run's (other annotators, classes,
 * channels or batches per epoch) or whose settings differ.
 * Holds the run folder's lock throughout (hooks.lock, or its own: see lockRunFolder), so a
 * second train() or `cmseg train` on the same folder fails with RunFolderBusyError.
 */
export async function train(outDir: string, config: TrainConfig, source: TrainingSource, hooks: TrainHooks = {}): Promise<TrainResult> {
  checkTrainConfig(config);
  const method = methodDefinition(config.method);
  if (method.target === 'consensus' && !source.hasConsensus) {
    throw new TrainingError(`method '${config.method}' trains on the expert consensus, which this data set does not have`);
  }
  // Said before the lock is taken: taking it would make the folder of a mistyped outDir.
  if (hooks.resume && !fs.existsSync(path.join(outDir, CHECKPOINT_LAST))) {
    throw new TrainingError(await nothingToResumeMessage(outDir));
  }
  if (!hooks.resume) checkNoUnknownSettings(config);
  const batchesPerEpoch = sourceBatchesPerEpoch(source, config.batchSize);
  checkScheduleRange(config.schedule, config.steps ?? config.epochs! * batchesPerEpoch);
  let ownLock: FileLock | undefined;
  if (hooks.lock) {
    if (!hooks.lock.held || path.resolve(hooks.lock.file) !== path.resolve(outDir, RUN_LOCK)) {
      throw new TrainingError(`hooks.lock must be the held lock of ${outDir} (lockRunFolder(outDir)); it is ${hooks.lock.file}${hooks.lock.held ? '' : ', released'}`);
    }
  } else {
    ownLock = lockRunFolder(outDir);
  }
  try {
    return await trainLocked(outDir, config, source, hooks, method);
  } finally {
    ownLock?.release();
  }
}

async function trainLocked(outDir: string, config: TrainConfig, source: TrainingSource, hooks: TrainHooks, method: MethodDefinition): Promise<TrainResult> {
  const files = { last: path.join(outDir, CHECKPOINT_LAST), best: path.join(outDir, CHECKPOINT_BEST), log: path.join(outDir, TRAIN_LOG) };
  const log = new JsonLog(files.log);
  const progress = hooks.progress ?? silentProgress;
  const batchesPerEpoch = sourceBatchesPerEpoch(source, config.batchSize);
  const totalSteps = config.steps ?? config.epochs! * batchesPerEpoch;
  const epochs = Math.ceil(totalSteps / batchesPerEpoch);
  const annotatorNames = [...source.annotatorNames];
  let run = hooks.run ?? {};

  let model: Model;
  let state: TrainerState;
  /** Why best.safetensors is not the run's recorded best (resume), until a validation writes a new one. */
  let bestLost: string | undefined;
  let resumeNote: string | undefined;
  if (hooks.resume) {
    if (!fs.existsSync(files.last)) throw new TrainingError(`nothing to resume: ${files.last} does not exist`);
    const saved = await readTrainerState(files.last);
    const changed = resumeDifferences(config, saved.config, saved.state.batchesPerEpoch);
    const shown = (v: unknown) => JSON.stringify(v) ?? 'undefined';
    if (changed.length) {
      const list = changed.map((d) => `${d.key}: ${shown(d.saved)} in the checkpoint, ${shown(d.now)} now`).join('; ');
      throw new TrainingError(`cannot resume ${files.last} with different settings: ${list}${resumeDifferencesNote(changed)}`);
    }
    if (saved.state.batchesPerEpoch !== batchesPerEpoch) {
      throw new TrainingError(`cannot resume ${files.last}: the data gives ${batchesPerEpoch} batches per epoch, the run had ${saved.state.batchesPerEpoch}`);
    }
    // The data must be the run's: a CM head is one annotator's, so other names (or an other
    // order) would go on training each head on another annotator's labels without an error,
    // and other classes would be read by a model of the checkpoint's classes.
    const savedNames = saved.annotatorNames ?? [];
    if (JSON.stringify(savedNames) !== JSON.stringify(annotatorNames)) {
      throw new TrainingError(`cannot resume ${files.last} on other data: its annotators are ${savedNames.join(', ')}, the data's are ${annotatorNames.join(', ')}`);
    }
    model = await loadCheckpoint(files.last);
    const mc = model.config;
    const found = { ndim: source.ndim, inChannels: source.channels, classes: source.classes };
    const words = { ndim: 'spatial dimensions', inChannels: 'image channels', classes: 'classes' };
    const wrong = (Object.keys(found) as (keyof typeof found)[]).filter((k) => mc[k] !== found[k]);
    if (wrong.length) {
      await model.dispose();
      throw new TrainingError(`cannot resume ${files.last} on other data: ${wrong.map((k) => `${found[k]} ${words[k]} in the data, ${mc[k]} in the run`).join('; ')}`);
    }
    state = saved.state;
    // The best the run recorded, when best.safetensors no longer holds it (deleted to save
    // space, cut short, replaced): the remembered score would outdo every later validation,
    // so none would write `best` again and the run would end without one. The remembered
    // score starts again instead: the next validation writes a new best.safetensors.
    bestLost = state.best ? await recordedBestLost(files.best, state.best, state.step, state.pendingValidation === true) : undefined;
    if (bestLost) {
      const b = state.best!;
      const then =
        state.step >= totalSteps && !state.pendingValidation ? `the run is complete, so no validation will write another: use ${CHECKPOINT_LAST}`
        : !hooks.validate ? `this resume validates nothing (no hooks.validate), so none will be written: use ${CHECKPOINT_LAST}`
        : `the remembered best score starts again, so the next validation writes a new ${CHECKPOINT_BEST} (the best of the validations from step ${state.step} on)`;
      resumeNote = `${displayPath(files.best)}, the run's best (validation score ${b.score} at epoch ${b.epoch + 1}, step ${b.step}), ${bestLost}: ${then}`;
      process.stderr.write(`note: ${resumeNote}\n`);
      state.best = null;
    }
    // A resume that does not describe the data again keeps the run's description: {} in its
    // checkpoints left `cmseg train --resume`, eval and predict unable to find the run's data.
    if (hooks.run === undefined) run = saved.run ?? {};
    // From here on the run's own settings, as its checkpoint holds them (the caller's may spell
    // a default out, or give the length in steps), with the caller's bookkeeping settings;
    // those that changed are logged with the resume.
    const bookkeeping = Object.fromEntries(BOOKKEEPING_SETTINGS.filter((k) => JSON.stringify(config[k]) !== JSON.stringify(saved.config[k])).map((k) => [k, config[k]]));
    config = resumedConfig(saved.config, config);
    await log.truncateAfter(state.step, state.pendingValidation === true);
    // A finished run's log keeps `end` as its last entry: resuming it again trains nothing.
    if (state.step < totalSteps || state.pendingValidation) {
      const settings = Object.keys(bookkeeping).length ? { settings: bookkeeping } : {};
      log.write({ event: 'resume', step: state.step, epoch: state.epoch, batchInEpoch: state.batchInEpoch, ...settings, ...(resumeNote ? { note: resumeNote } : {}), runtime: runtimeRecord() });
    }
  } else {
    if (fs.existsSync(files.last)) {
      throw new TrainingError(`${outDir} already holds a run (${CHECKPOINT_LAST}); resume it or choose another output folder`);
    }
    // A `best` without `last` is an earlier run's model (its `last` deleted to save space, say):
    // a new run would delete it, so it is refused rather than lost. Unless that run never saved
    // `last` at all (its first save failed on a full disk after `best` was written): it cannot be
    // resumed, and refusing it too left the user to delete files by hand. Such a `best` is replaced.
    if (fs.existsSync(files.best)) {
      if (!(await bestOfRunWithoutLast(files))) {
        throw new TrainingError(
          `${outDir} holds ${CHECKPOINT_BEST} of an earlier run (without its ${CHECKPOINT_LAST}, so it cannot be resumed); move it away or choose another output folder`,
        );
      }
      // Removed, not left for the first validation to overwrite: a run without one would end
      // beside the failed run's model as if it were its own.
      fs.rmSync(files.best, { force: true });
    }
    fs.rmSync(files.log, { force: true });
    model = createRunModel(config, source);
    state = {
      epoch: 0,
      batchInEpoch: 0,
      step: 0,
      totalSteps,
      batchesPerEpoch,
      best: null,
      lastValidation: null,
      epochSums: { loss: 0, ce: 0, trace: 0, steps: 0, seconds: 0 },
    };
    log.write({ event: 'start', step: 0, config, run, annotatorNames, batchesPerEpoch, totalSteps, epochs, modelConfig: model.config, runtime: runtimeRecord() });
  }

  const extra = (): TrainerExtra => ({
    format: TRAINER_STATE_FORMAT,
    version: TRAINER_STATE_VERSION,
    config,
    state,
    rng: { seed: config.seed, epoch: state.epoch, batchInEpoch: state.batchInEpoch },
    schedule: { ...config.schedule, nextLr: learningRate(config.schedule, state.step, totalSteps) },
    annotatorNames,
    run,
  });
  // The step `last` holds: a resumed run's file already holds where it stands.
  let lastSavedAt = hooks.resume ? state.step : -1;
  const save = async (kind: 'last' | 'best') => {
    const file = kind === 'last' ? files.last : files.best;
    await saveCheckpoint(model, file, extra() as unknown as Record<string, unknown>);
    if (kind === 'last') lastSavedAt = state.step;
    else bestLost = undefined;
    log.write({ event: 'checkpoint', kind, step: state.step, epoch: state.epoch, file });
  };

  const startStep = state.step;
  const rootRng = new Rng(config.seed);
  let fields: ProgressFields = { epoch: state.epoch, epochs, loss: NaN, ce: NaN, trace: NaN, lr: NaN, valDice: state.lastValidation?.score ?? NaN };
  progress.start(totalSteps, state.step, fields);
  let status: TrainResult['status'] = 'completed';

  /**
   * The validation that ends `epoch` (the state stands after it): logged, `best` saved if it
   * is the best. 'stopped': hooks.signal fired and the validator's progress call before a case
   * threw (see ValidationProgress); nothing of it is logged then.
   */
  const validateEpoch = async (epoch: number, shown: ProgressFields): Promise<'done' | 'stopped'> => {
    const stop = new Error('the validation was stopped by hooks.signal');
    // The validator's per-case reports go to the progress reporter (a bar that otherwise
    // stood still for minutes at the epoch's last step). Only sane counts are passed on:
    // an API validator's slip must not break the bar or the run.
    const onProgress: ValidationProgress = (done, total, id) => {
      if (!Number.isSafeInteger(done) || !Number.isSafeInteger(total) || done < 0 || total < 1 || done > total) return;
      // Ctrl-C or SIGTERM waited for the whole validation (8 whole BraTS cases: minutes, past
      // the seconds a scheduler gives a job before it kills it, and the epoch was lost).
      if (hooks.signal?.aborted && done < total) throw stop;
      progress.validation?.(state.step, shown, done, total, typeof id === 'string' ? id : undefined);
    };
    let resolved: unknown;
    try {
      resolved = await hooks.validate!(model, onProgress);
    } catch (error) {
      // Also a validator that honours the signal itself (signal.throwIfAborted() between cases
      // throws signal.reason): it rejected the run, and the epoch's steps since `last` were lost.
      if (error === stop || (hooks.signal?.aborted && error === hooks.signal.reason)) return 'stopped';
      throw error;
    }
    const validation = checkedValidation(resolved);
    // Done: the state is the one after it (not still to validate, the epoch's sums spent; the
    // caller computed its means), as `best` below and the next `last` must say.
    delete state.pendingValidation;
    state.epochSums = { loss: 0, ce: 0, trace: 0, steps: 0, seconds: 0 };
    // The checkpoints' state keeps the means only: the cases are the log's.
    const { cases, ...summary } = validation;
    state.lastValidation = { ...summary, epoch, step: state.step };
    // JSON writes a NaN score (a case whose prediction was NaN) as null, as it does the means.
    log.write({ event: 'validation', step: state.step, epoch, score: validation.score, ...validation.metrics, ...(cases ? { cases: cases.map((c) => ({ id: c.id, score: c.score, ...c.metrics })) } : {}) });
    fields = { ...fields, valDice: validation.score };
    // A NaN score (e.g. a diverged model) never becomes the best.
    if (Number.isFinite(validation.score) && (state.best === null || validation.score > state.best.score)) {
      state.best = { score: validation.score, epoch, step: state.step };
      await save('best');
    }
    return 'done';
  };

  // A run stopped during a validation does it first, as the run would have before its next step.
  let validatedPending = false;
  // Whether this call settled a pending validation (done, or dropped by a resume without
  // hooks.validate, which validates nothing): a run that stood at its last step is now complete.
  let settledPending = false;
  try {
    if (state.pendingValidation) {
      delete state.pendingValidation;
      // Shown as the epoch it ends (state.epoch is already the next one's), with that epoch's
      // means, kept in `last` while its validation is pending, as the run never stopped shows
      // it. (`last` of a version that reset the sums before the stop's save has none: shown as before.)
      const sums = state.epochSums;
      const means = sums.steps > 0 ? { loss: sums.loss / sums.steps, ce: sums.ce / sums.steps, trace: sums.trace / sums.steps } : {};
      const ended = { ...fields, epoch: state.epoch - 1, ...means };
      if (hooks.validate && (await validateEpoch(state.epoch - 1, ended)) === 'stopped') {
        state.pendingValidation = true; // `last` holds this already
        log.write({ event: 'interrupted', step: state.step, epoch: state.epoch, pendingValidation: true });
        status = 'interrupted';
      } else {
        const epochSeconds = sums.seconds;
        state.epochSums = { loss: 0, ce: 0, trace: 0, steps: 0, seconds: 0 };
        await save('last');
        settledPending = true;
        // TrainResult.validatedPending: only when a validation ran.
        if (hooks.validate) validatedPending = true;
        progress.epoch(state.step, { ...fields, epoch: state.epoch - 1, ...means }, epochSeconds);
      }
    }
    while (status === 'completed' && state.step < totalSteps) {
      // The signal is looked at before every step, the first one included: a signal that
      // fired before train() was called takes no step at all, and one that fired during a
      // step (or the validation after it) stops once that step's epoch end is done. Either
      // way train() resolves with status 'interrupted' and `last` holds the step it stopped
      // at (step 0, the initial model, for a new run), so a resume continues exactly.
      if (hooks.signal?.aborted) {
        if (lastSavedAt !== state.step) await save('last');
        log.write({ event: 'interrupted', step: state.step, epoch: state.epoch });
        status = 'interrupted';
        break;
      }
      const { epoch, batchInEpoch: index } = state;
      const started = Date.now();
      const raw = await source.batch(epoch, index, config.batchSize, rootRng.fork(`batch ${epoch} ${index}`));
      const augmented = augmentBatch(raw, config.augment, rootRng.fork(`augment ${epoch} ${index}`));
      const lr = learningRate(config.schedule, state.step, totalSteps);
      model.setOptimizer({ lr });
      const batch = methodBatch(method, augmented, source.classes);
      const where = `while taking step ${state.step + 1} of ${totalSteps}, epoch ${epoch + 1}`;
      let result: Awaited<ReturnType<Model['trainStep']>>;
      try {
        result = await model.trainStep(batch);
      } catch (error) {
        // The engine's errors do not know the run (a diverged model's NaN gradient, GPU out
        // of memory): say where it stood (a GPU model reports a refused update of the step
        // before at this call, naming that step itself). Nothing was written for this step:
        // `last` still holds the run as it was at its last checkpoint.
        if (error instanceof Error) error.message += ` (${where})`;
        throw error;
      }
      if (!Number.isFinite(result.loss)) {
        throw new TrainingError(`the loss became ${result.loss} at step ${state.step + 1} of ${totalSteps}, epoch ${epoch + 1}; try a lower learning rate`);
      }
      const stepMs = Date.now() - started;
      const ce = result.ce.reduce((a, b) => a + b, 0);
      const trace = result.trace.reduce((a, b) => a + b, 0);
      state.step += 1;
      state.batchInEpoch += 1;
      const sums = state.epochSums;
      sums.loss += result.loss;
      sums.ce += ce;
      sums.trace += trace;
      sums.steps += 1;
      sums.seconds += stepMs / 1000;
      log.write({ event: 'step', step: state.step, epoch, lr, loss: result.loss, ce: result.ce, trace: result.trace, traceWeight: result.traceWeight, stepMs });
      fields = { ...fields, epoch, loss: result.loss, ce, trace, lr };
      progress.step(state.step, fields);

      const epochDone = state.batchInEpoch >= batchesPerEpoch || state.step >= totalSteps;
      if (epochDone) {
        const validateNow = hooks.validate && ((epoch + 1) % config.validateEvery === 0 || state.step >= totalSteps);
        // The epoch's means (over its steps before a resume too): the log's epoch entry and the
        // progress line of the epoch (which showed its last batch's loss, a noisy number in
        // place of the epoch's).
        const means = { loss: sums.loss / sums.steps, ce: sums.ce / sums.steps, trace: sums.trace / sums.steps };
        log.write({ event: 'epoch', step: state.step, epoch, ...means, trainSeconds: sums.seconds });
        state.epoch += 1;
        state.batchInEpoch = 0;
        const epochSeconds = sums.seconds;
        if (validateNow) {
          // Until validateEpoch has done it, `last` would say the validation is still to do
          // (keeping the epoch's sums, for the epoch line a resume prints after it).
          state.pendingValidation = true;
          // A validator that takes `progress` reports its cases: a long validation (BraTS: whole
          // cases, a minute each on a CPU). A signal stops it only after the case in progress,
          // which can be past a scheduler's grace period (SLURM's KillWait: 30 s), and its
          // SIGKILL (or a crash) lost the whole epoch. `last` is saved before such a validation
          // too: killed, the run resumes at the epoch's end and validates first. (Validators of
          // one argument, quick ones such as MNIST's, are not: they write `last` once, as before.
          // One that declares none, `(...args) => ...` or a wrapper passing its arguments on, may
          // take `progress`: saved before, to be safe.)
          if (hooks.validate!.length !== 1) await save('last');
          if ((await validateEpoch(epoch, { ...fields, epoch, ...means })) === 'stopped') {
            // `last` holds this step with the validation still to do, saved just above or now
            // (a validator of one argument that threw hooks.signal's reason itself).
            if (lastSavedAt !== state.step) await save('last');
            log.write({ event: 'interrupted', step: state.step, epoch: state.epoch, pendingValidation: true });
            status = 'interrupted';
            break;
          }
        }
        state.epochSums = { loss: 0, ce: 0, trace: 0, steps: 0, seconds: 0 };
        await save('last');
        progress.epoch(state.step, { ...fields, epoch, ...means }, epochSeconds);
      } else if (config.checkpointEvery > 0 && state.step % config.checkpointEvery === 0) {
        await save('last');
      }
    }
    if (status === 'completed' && (state.step > startStep || settledPending)) log.write({ event: 'end', step: state.step, best: state.best });
  } finally {
    progress.stop();
  }
  // A best.safetensors that is not the run's best (bestLost, and no validation since wrote one) is not offered as it.
  const best = bestLost === undefined && fs.existsSync(files.best) ? { best: files.best } : {};
  return { status, startStep, ...(validatedPending ? { validatedPending: true as const } : {}), state, model, files: { last: files.last, ...best, log: files.log } };
}

// The validation entry of the log is {time, event, step, epoch, score, ...metrics}: a metric
// named like one of the trainer's fields would overwrite it (a metric `step` moves the entry
// past later steps, so a resume drops it; one named `event` hides it from the curves).
const VALIDATION_LOG_FIELDS = ['time', 'event', 'step', 'epoch', 'score'];

/** What hooks.validate resolved to, checked before it is logged or picks `best`. */
function checkedValidation(value: unknown): ValidationResult {
  const shown = (v: unknown) => (v === undefined ? 'undefined' : (JSON.stringify(v) ?? String(v)).slice(0, 100));
  const isObject = (v: unknown): v is Record<string, unknown> => typeof v === 'object' && v !== null && !Array.isArray(v);
  if (!isObject(value) || typeof value.score !== 'number') {
    throw new TrainingError(`hooks.validate must resolve to {score: number, metrics: {name: number}}, got ${shown(value)}`);
  }
  const metrics = value.metrics ?? {};
  if (!isObject(metrics)) throw new TrainingError(`hooks.validate resolved metrics ${shown(metrics)}, expected an object {name: number}`);
  // `cases` is the log's only when the validator gives per-case figures: a validator of
  // before (one metric `cases`, a count, say) logs as it did.
  const reserved = value.cases === undefined ? VALIDATION_LOG_FIELDS : [...VALIDATION_LOG_FIELDS, 'cases'];
  const clashing = Object.keys(metrics).filter((k) => reserved.includes(k));
  if (clashing.length) {
    throw new TrainingError(
      `validation metric(s) ${clashing.map((k) => `'${k}'`).join(', ')} would overwrite the training log's own field(s) (${reserved.join(', ')}); rename them`,
    );
  }
  if (value.cases === undefined) return { score: value.score, metrics: metrics as Record<string, number> };
  if (!Array.isArray(value.cases)) throw new TrainingError(`hooks.validate resolved cases ${shown(value.cases)}, expected an array of {id: string, score: number, metrics?: {name: number}}`);
  const cases = value.cases.map((c: unknown, k): ValidationCase => {
    if (!isObject(c) || typeof c.id !== 'string' || typeof c.score !== 'number' || (c.metrics !== undefined && !isObject(c.metrics))) {
      throw new TrainingError(`hooks.validate resolved cases[${k}] ${shown(c)}, expected {id: string, score: number, metrics?: {name: number}}`);
    }
    // A case's entry in the log is {id, score, ...metrics}: a metric of those names would overwrite them.
    const own = Object.keys(c.metrics ?? {}).filter((name) => name === 'id' || name === 'score');
    if (own.length) throw new TrainingError(`validation case ${JSON.stringify(c.id)}: metric(s) ${own.map((n) => `'${n}'`).join(', ')} would overwrite the case's own field(s) (id, score); rename them`);
    return { id: c.id, score: c.score, ...(c.metrics ? { metrics: c.metrics as Record<string, number> } : {}) };
  });
  return { score: value.score, metrics: metrics as Record<string, number>, cases };
}

/** The entries of a JSON-lines training log, in order. */
export function readTrainLog(file: string, options: { whileWritten?: boolean } = {}): Record<string, unknown>[] {
  const events: Record<string, unknown>[] = [];
  forEachTrainLogEntry(file, (entry) => void events.push(entry), options);
  return events;
}

/**
 * Calls `visit` with each entry of a JSON-lines training log, in order, until it returns false.
 * The log is read in pieces of 1 MiB: a long run's log (a 250,000-step BraTS run writes 85 MB,
 * more annotators more) was read whole into one string and parsed whole, a heap of several
 * times its size for `cmseg curves`, a resume or the end of `cmseg train`, which only need
 * a few numbers a step (or the first entry and one checkpoint); and past 512 MB, V8's longest
 * string, it could not be read at all. `whileWritten`: a last line without its newline (the
 * entry being written) ends the log instead of being an error.
 */
export function forEachTrainLogEntry(file: string, visit: (entry: Record<string, unknown>, line: number) => boolean | void, options: { whileWritten?: boolean } = {}): void {
  forEachTrainLogLine(file, (text, line, _end, complete) => {
    if (!text.trim()) return true;
    let entry: unknown;
    try {
      entry = JSON.parse(text);
    } catch (err) {
      // Every entry is written with its newline: only a last line without one can be still in writing.
      if (!complete && options.whileWritten === true) return false;
      throw new SyntaxError(`line ${line} is not a training log entry: ${(err as Error).message}`);
    }
    // JSON that is not an object (null, 42, [..]) is no entry either: readers look up its fields.
    if (typeof entry !== 'object' || entry === null || Array.isArray(entry)) {
      throw new SyntaxError(`line ${line} is not a training log entry: ${JSON.stringify(entry)} is not a JSON object`);
    }
    return visit(entry as Record<string, unknown>, line);
  });
}

/**
 * Calls `visit` with each line of `file` (without its newline), its number from 1, the byte
 * offset just past it, and whether it ends with a newline (only the last line may not), until
 * `visit` returns false. Read in pieces of 1 MiB, whatever the file's size.
 */
function forEachTrainLogLine(file: string, visit: (text: string, line: number, end: number, complete: boolean) => boolean | void): void {
  const fd = fs.openSync(file, 'r');
  try {
    const chunk = Buffer.alloc(1 << 20);
    // The bytes of the line in progress from earlier pieces, kept apart (not joined to each
    // piece: a line of many MiB would be copied once a piece). Lines are cut at their newline
    // bytes, then decoded: a UTF-8 character split between two pieces stays whole.
    const parts: Buffer[] = [];
    let offset = 0; // the file offset of this piece's first byte
    let line = 0;
    for (;;) {
      const n = fs.readSync(fd, chunk, 0, chunk.length, null);
      if (n === 0) break;
      const piece = chunk.subarray(0, n);
      let from = 0;
      for (let nl = piece.indexOf(10); nl >= 0; nl = piece.indexOf(10, from)) {
        const text = parts.length ? Buffer.concat([...parts.splice(0), piece.subarray(from, nl)]).toString('utf8') : piece.toString('utf8', from, nl);
        if (visit(text, ++line, offset + nl + 1, true) === false) return;
        from = nl + 1;
      }
      if (from < n) parts.push(Buffer.from(piece.subarray(from))); // a copy: `chunk` is read into again
      offset += n;
    }
    if (parts.length) visit(Buffer.concat(parts).toString('utf8'), ++line, offset, false);
  } finally {
    fs.closeSync(fd);
  }
}
