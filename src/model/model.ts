// The typed Model: a thin layer over the native class that queues calls (one
// native call at a time per model), accepts labels as one array or one per
// annotator, and names outputs by their shapes.
import { loadNative, ModelMemory, NativeBackendInfo, NativeModel } from '../native';
import { LossOptions, ModelConfig, OptimizerOptions, ResolvedConfig, splitConfig } from './config';

export interface Batch {
  /** Float32 images, layout N, C, *S. */
  images: Float32Array;
  /** [N, C, H, W] (2D) or [N, C, D, H, W] (3D). */
  shape: number[];
  /** Annotator labels: one Uint8Array [N, *S] per annotator, or one [R, N, *S]. 255 = unlabelled. */
  labels?: Uint8Array | Uint8Array[];
  /** presence mask [N, R]: 0 where annotator r did not label image n at all. */
  present?: Uint8Array;
  /** Plain cross-entropy on this single label map instead of the CM loss (naive / oracle): the mean over pixels != 255. */
  target?: Uint8Array;
  /**
   * Plain cross-entropy on soft labels [N, L, *S] (naive on mean labels): each pixel's row sums to 1, or is all
   * zeros where nobody labelled it; the mean over labelled pixels, as with `target`.
   */
  softTarget?: Float32Array;
}

export interface StepResult {
  /** sum_r CE_r + traceWeight * sum_r T_r */
  loss: number;
  /** CE_r per annotator (SPEC section 4). */
  ce: number[];
  /** T_r per annotator: mean trace of the estimated CMs. */
  trace: number[];
  /** lambda used for this step (negative during the trace warm-up). */
  traceWeight: number;
  /** Optimiser steps taken so far. */
  step: number;
}

export interface PredictOptions {
  /** Also return every annotator's pixel-wise CM, [N, R, L, L, *S] with A[i][j] at i*L + j. */
  cms?: boolean;
  /** Also return each annotator's label distribution q_r = A_r p, [N, R, L, *S]. */
  annotatorProbs?: boolean;
}

/** Arrays a prediction's outputs are written into, each exactly its output's length. */
export interface PredictOutputs {
  probs?: Float32Array;
  cms?: Float32Array;
  annotatorProbs?: Float32Array;
}

/**
 * Model's predict writing into the caller's output arrays, which the returned prediction then
 * holds: sliding-window inference reuses one set batch after batch (a fresh 100 MB of outputs
 * a batch of a BraTS CM model cost its page faults, a sixth of a CPU case's time). Not public:
 * the model writes the arrays on a worker thread until the call settles, and an array
 * transferred (postMessage) meanwhile would be freed under it; only code that never hands its
 * arrays out can promise that. The images are not copied either (the native call takes its
 * own copy when it starts, for a CPU model): the caller must not change them until it settles.
 */
export const predictInto = Symbol('cmseg.predictInto');

export interface Prediction {
  /** Consensus probabilities p(y|x), [N, L, *S]. */
  probs: Float32Array;
  probsShape: number[];
  cms?: Float32Array;
  cmsShape?: number[];
  annotatorProbs?: Float32Array;
  annotatorProbsShape?: number[];
}

export class Model {
  private readonly native: NativeModel;
  private queue: Promise<unknown> = Promise.resolve();
  /** Queued calls not yet settled: the synchronous state calls refuse to run ahead of them. */
  private pending = 0;
  /** dispose() was called: no call may be queued any more. */
  private disposed = false;
  /** The native model is freed (dispose() ran in its turn): every call fails. */
  private freed = false;
  /** An afterQueued function is running: its own turn, so the state calls may run. */
  private inTurn = false;

  constructor(config: ModelConfig) {
    const { network, optimizer, loss } = splitConfig(config);
    const addon = loadNative();
    this.native = new addon.NativeModel(network as Record<string, unknown>);
    if (optimizer) this.setOptimizer(optimizer);
    // The warm-up weight follows lambda unless given (LossOptions.lambdaWarmup).
    if (loss) this.setLoss({ ...loss, lambdaWarmup: loss.lambdaWarmup ?? loss.lambda });
  }

  get config(): ResolvedConfig {
    return this.native.config() as unknown as ResolvedConfig;
  }

  /**
   * Whether a call copies its input typed arrays when it is made (README, "Calls, errors and
   * memory"): a CPU model does; a GPU model reads them in place as its call starts. The native
   * call runs in the queue's turn, a microtask later at the earliest, so the caller's code
   * right after the call (a buffer refilled for the next batch, a transfer) ran before the
   * native side's own copy: an idle CPU model predicted the refilled buffer.
   */
  private copiesInputs(): boolean {
    return this.freed || this.disposed ? false : this.config.device !== 'cuda';
  }

  /** Device memory of a GPU model (peak since creation or the last resetPeakMemory()); `{ device: 'cpu' }` otherwise. */
  memory(): ModelMemory {
    return this.native.memory();
  }

  /** Starts the GPU peak again from what is in use now (as torch.cuda.reset_peak_memory_stats); no-op on the CPU. */
  resetPeakMemory(): void {
    this.native.resetPeakMemory();
  }

  /**
   * Frees the activation and scratch buffers the model keeps between calls, once the calls
   * queued so far have settled; the weights and optimiser state stay, and the next call
   * allocates its buffers again (a 3D model holds hundreds of MB of them after a call).
   * ensemble() calls it after each member's prediction, so members do not each hold theirs.
   */
  releaseBuffers(): Promise<void> {
    return this.enqueue(async () => {
      this.native.releaseBuffers();
    });
  }

  /** Forward, loss, backward and one optimiser update. */
  trainStep(batch: Batch): Promise<StepResult> {
    const given = snapshotBatch(batch, this.copiesInputs());
    return this.enqueue(() => this.native.trainStep(this.toNative(given)));
  }

  /** Forward, loss and backward into the gradients (see getGradients), without an update. */
  computeGradients(batch: Batch): Promise<StepResult> {
    const given = snapshotBatch(batch, this.copiesInputs());
    return this.enqueue(() => this.native.computeGradients(this.toNative(given)));
  }

  /** Forward and loss only. */
  evaluate(batch: Batch): Promise<StepResult> {
    const given = snapshotBatch(batch, this.copiesInputs());
    return this.enqueue(() => this.native.evaluate(this.toNative(given)));
  }

  predict(images: Float32Array, shape: number[], options: PredictOptions = {}): Promise<Prediction> {
    return this.predictOutputs(images, shape, options, undefined);
  }

  /** predict() writing its outputs into `into`'s arrays (see predictInto). */
  [predictInto](images: Float32Array, shape: number[], options: PredictOptions, into: PredictOutputs): Promise<Prediction> {
    return this.predictOutputs(images, shape, options, { ...into });
  }

  private predictOutputs(images: Float32Array, shape: number[], options: PredictOptions, into: PredictOutputs | undefined): Promise<Prediction> {
    // The call runs in its turn: the shape and options as given now (see snapshotBatch).
    shape = copyIfShort(shape);
    options = options !== null && typeof options === 'object' && !Array.isArray(options) ? { ...options } : options;
    // predictInto's caller leaves its images alone until the call settles, as its outputs.
    if (this.copiesInputs() && !into) images = copyTypedArray(images);
    return this.enqueue(async () => {
      const out = await this.native.predict(images, shape, options, into);
      const { classes: L, annotators: R } = this.config;
      const [n, , ...spatial] = shape;
      const pred: Prediction = { probs: out.probs, probsShape: [n, L, ...spatial] };
      if (out.cms) Object.assign(pred, { cms: out.cms, cmsShape: [n, R, L, L, ...spatial] });
      if (out.annotatorProbs) Object.assign(pred, { annotatorProbs: out.annotatorProbs, annotatorProbsShape: [n, R, L, ...spatial] });
      return pred;
    });
  }

  /** Parameter names (SPEC section 2) and PyTorch-layout shapes, in model order. */
  parameters(): { name: string; shape: number[] }[] {
    return this.native.parameters();
  }

  /** A copy of every parameter, by SPEC name. */
  getWeights(): Record<string, Float32Array> {
    this.settled('getWeights');
    return this.native.getWeights();
  }

  /** Replaces the named parameters (any subset); validates all before changing any. */
  setWeights(weights: Record<string, Float32Array>): void {
    this.settled('setWeights');
    this.native.setWeights(weights);
  }

  /** Gradients of the last trainStep / computeGradients, by parameter name. */
  getGradients(): Record<string, Float32Array> {
    this.settled('getGradients');
    return this.native.getGradients();
  }

  getOptimizerState(): { step: number; m: Record<string, Float32Array>; v: Record<string, Float32Array> } {
    this.settled('getOptimizerState');
    return this.native.getOptimizerState();
  }

  setOptimizerState(state: { step?: number; m?: Record<string, Float32Array>; v?: Record<string, Float32Array> }): void {
    this.settled('setOptimizerState');
    this.native.setOptimizerState(state);
  }

  get optimizer(): Required<OptimizerOptions> {
    return this.native.getOptimizer() as unknown as Required<OptimizerOptions>;
  }

  /** Changes optimiser settings between steps (lr, betas, eps, weightDecay, kind). */
  setOptimizer(options: OptimizerOptions): void {
    this.settled('setOptimizer');
    this.native.setOptimizer(options as Record<string, unknown>);
  }

  get loss(): Required<LossOptions> {
    const { lambda, lambdaWarmup, warmupSteps } = this.native.getLoss();
    return { lambda, lambdaWarmup, warmupSteps };
  }

  setLoss(options: LossOptions): void {
    this.settled('setLoss');
    this.native.setLoss(options as Record<string, unknown>);
  }

  /** Optimiser steps taken. */
  get step(): number {
    return this.native.getLoss().step;
  }

  /** Resolves once every call queued so far (trainStep, predict, ...) has settled. */
  async idle(): Promise<void> {
    await this.queue;
  }

  /**
   * Runs fn after every call queued so far and before any queued later, so that it
   * sees the model as those calls left it (saveCheckpoint snapshots through this).
   */
  afterQueued<T>(fn: () => T): Promise<T> {
    return this.enqueue(async () => {
      this.inTurn = true;
      let result: T;
      try {
        result = fn();
      } finally {
        this.inTurn = false;
      }
      // The turn ends when fn returns: state calls after an await inside it would run
      // outside the queue's order, so only synchronous functions are taken.
      if (result !== null && typeof (result as { then?: unknown })?.then === 'function')
        throw new TypeError('afterQueued takes a synchronous function (its turn ends when it returns); do the async part after the Promise resolves');
      return result;
    });
  }

  /**
   * Frees the model's native memory (host and GPU) once the calls queued so far have
   * settled, without waiting for the garbage collector. Every later call rejects or
   * throws "this model was disposed". Disposing twice is a no-op.
   */
  dispose(): Promise<void> {
    if (this.disposed) return this.idle();
    this.disposed = true;
    return this.enqueue(async () => {
      this.native.dispose();
      this.freed = true;
    }, true);
  }

  /** Whether dispose() was called. */
  get isDisposed(): boolean {
    return this.disposed;
  }

  // The synchronous state calls would otherwise run ahead of (or, once the native
  // call has started, collide with) an awaited-later trainStep or predict.
  private settled(call: string): void {
    if (this.freed) throw disposedError(`${call}: this model was disposed`);
    if (this.pending > 0 && !this.inTurn)
      // A caller error, coded as the native side codes its own (README, "Calls, errors and memory").
      throw Object.assign(new Error(`${call}: the model has ${this.pending} queued call(s) (trainStep, predict, ...) not yet settled; await them first (or use model.idle())`), {
        code: 'CMSEG_INVALID_ARGUMENT',
      });
  }

  private enqueue<T>(fn: () => Promise<T>, disposing = false): Promise<T> {
    if (this.disposed && !disposing) return Promise.reject(disposedError('this model was disposed'));
    this.pending++;
    const done = () => {
      this.pending--;
    };
    const run = this.queue.then(fn, fn);
    run.then(done, done);
    this.queue = run.catch(() => undefined);
    return run;
  }

  private toNative(batch: Batch) {
    if (batch === null || typeof batch !== 'object') throw new TypeError('batch must be an object');
    const { labels, ...rest } = batch;
    if (labels === undefined || Array.isArray(labels)) return { ...rest, ...(labels ? { labels } : {}) };
    return { ...rest, labels: splitAnnotatorMaps(labels, this.config.annotators) };
  }
}

/**
 * A queued call runs in its turn, after the calls before it: it must see the batch as it was
 * given, not what the caller's object holds by then (a batch object or a shape array reused
 * for the next call would otherwise hand the earlier call the later labels, silently). The
 * object, its shape and its list of label maps are copied now, and with `copyArrays` (a CPU
 * model) the typed arrays too; a GPU model reads them in place (README, "Calls, errors and
 * memory"). Anything else is passed on as it is, for the native side to reject in the call's turn.
 */
function snapshotBatch(batch: Batch, copyArrays: boolean): Batch {
  if (batch === null || typeof batch !== 'object' || Array.isArray(batch)) return batch;
  // Own keys as they are (the native side names unknown ones); the batch fields read as the
  // native side reads them, getters and prototypes included (a class instance as a batch).
  const copy: Record<string, unknown> = { ...batch };
  for (const key of BATCH_FIELDS) if (batch[key] !== undefined) copy[key] = batch[key];
  copy.shape = copyIfShort(copy.shape);
  copy.labels = copyIfShort(copy.labels);
  if (copyArrays) {
    for (const key of ['images', 'present', 'target', 'softTarget'] as const) copy[key] = copyTypedArray(copy[key]);
    const labels = copy.labels;
    if (!Array.isArray(labels)) copy.labels = copyTypedArray(labels);
    else if (labels.length <= MAX_COPIED_ENTRIES) copy.labels = labels.map(copyTypedArray);
  }
  return copy as unknown as Batch;
}

/**
 * `model`'s predictInto, bound, when `model` is a Model predicting with Model's own predict;
 * undefined for anything else (fakes, ensembles, mirrored models) and for a Model whose predict
 * was replaced on the instance or overridden by a subclass (a calibration, a log): its
 * predictions are that predict's, which predictInto would skip without a word.
 */
export function predictIntoOf(model: unknown): ((images: Float32Array, shape: number[], options: PredictOptions | undefined, into: PredictOutputs) => Promise<Prediction>) | undefined {
  if (!(model instanceof Model) || model.predict !== Model.prototype.predict) return undefined;
  const write = (model as unknown as Record<symbol, Model[typeof predictInto]>)[predictInto];
  return (images, shape, options, into) => write.call(model, images, shape, options ?? {}, into);
}

/** A typed array's own copy (Model.copiesInputs says why); anything else as it is, for the native side to name. */
export function copyTypedArray<T>(value: T): T {
  if (!ArrayBuffer.isView(value) || value instanceof DataView) return value;
  try {
    return (value as unknown as Uint8Array).slice() as unknown as T;
  } catch {
    return value; // a detached buffer: the native side rejects the call, naming the input
  }
}

// Longer than any shape (5 entries) or label list (64 annotators): copying a sparse array of
// length 2^31 would run V8 out of heap (an abort); passed on as it is, the native side refuses
// it by its length.
const MAX_COPIED_ENTRIES = 1024;

export function copyIfShort<T>(value: T): T {
  return Array.isArray(value) && value.length <= MAX_COPIED_ENTRIES ? ([...value] as T) : value;
}

const BATCH_FIELDS = ['images', 'shape', 'labels', 'present', 'target', 'softTarget'] as const;

/** The error of any call after dispose(), with the code the native side gives it too. */
function disposedError(message: string): Error {
  return Object.assign(new Error(message), { code: 'CMSEG_DISPOSED' });
}

/** Views (no copies) of the R maps in one [R, N, *S] label array. */
export function splitAnnotatorMaps(labels: Uint8Array, annotators: number): Uint8Array[] {
  if (!(labels instanceof Uint8Array)) throw new TypeError('batch.labels must be a Uint8Array or an array of them');
  if (labels.length % annotators !== 0)
    throw new RangeError(`batch.labels has ${labels.length} elements, not a multiple of ${annotators} annotators`);
  const per = labels.length / annotators;
  return Array.from({ length: annotators }, (_, r) => labels.subarray(r * per, (r + 1) * per));
}

/**
 * argmax over the class axis of [N, L, *S] probabilities: the label map [N, *S]. A voxel whose
 * probabilities are NaN maps to class 0 (no comparison with NaN wins): a diverged model's map
 * looks like background, so callers that score or write it check the probabilities first
 * (evaluateModel's nonFinite, predict's NaN OUTPUT).
 */
export function argmaxClasses(probs: Float32Array, n: number, classes: number): Uint8Array {
  // A mismatch would otherwise end in a bare "Invalid typed array length" (or a silently short map).
  if (!(Number.isInteger(n) && n >= 1)) throw new RangeError(`argmaxClasses: n = ${n} must be an integer >= 1`);
  if (!(Number.isInteger(classes) && classes >= 1 && classes <= 256)) throw new RangeError(`argmaxClasses: classes = ${classes} must be an integer in 1..256`);
  if (probs.length % (n * classes) !== 0) {
    throw new RangeError(`argmaxClasses: probs has ${probs.length} elements, not a multiple of n*classes = ${n}*${classes}`);
  }
  const V = probs.length / (n * classes);
  const out = new Uint8Array(n * V);
  for (let i = 0; i < n; i++)
    for (let v = 0; v < V; v++) {
      let best = 0;
      let bestP = probs[i * classes * V + v];
      for (let k = 1; k < classes; k++) {
        const p = probs[(i * classes + k) * V + v];
        if (p > bestP) (bestP = p), (best = k);
      }
      out[i * V + v] = best;
    }
  return out;
}

export function createModel(config: ModelConfig): Model {
  return new Model(config);
}

export function backendInfo(): NativeBackendInfo {
  return loadNative().backendInfo();
}

/** Threads of the native engine (default: CMSEG_NUM_THREADS, else every usable CPU: backendInfo().defaultThreads and threadsReason). */
export function setNumThreads(n: number): void {
  loadNative().setNumThreads(n);
}
