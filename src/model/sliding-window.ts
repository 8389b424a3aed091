// Sliding-window inference over a whole volume (SPEC section 5): the volume is covered by
// overlapping windows of the training patch size, the model predicts batches of windows,
// and every output (consensus probabilities, optionally CMs and q_r) is blended with a
// Gaussian importance map that trusts window centres more than window borders, where a
// U-Net sees less context. This is the nnU-Net / MONAI idea, written for cmseg.
//
// Geometry, per spatial axis of size `size` and patch `patch`:
// - size >= patch: windows start at 0 and the last one ends flush with the far edge; the
//   windows in between are spread evenly, so the step between consecutive windows is at
//   most floor(patch * (1 - overlap)) (a few voxels less when the size is not a multiple of it).
// - size < patch: one window, the volume centred in it and padded with zeros. Zero is the
//   background intensity of the usual z-scored, skull-stripped inputs; reflection would
//   invent anatomy. Padded voxels are predicted and discarded.
// Outputs are sums of weight * window output, divided at the end by the summed weights
// (kept in Float64): a weighted mean of the windows' values, so a voxel on which every
// window agrees gets that value back (to Float32 rounding). The sums are Float32 while at
// most FLOAT32_SUM_WINDOWS windows cover a voxel (overlap up to 0.75 in 3D) and Float64
// beyond: a Float32 sum of thousands of windows rounds the small border weights away
// (a relative bias of 2e-5 at overlap 0.9 and 4e-4 at 0.95 on 32^3 windows), while
// Float64 sums of the CMs of a whole BraTS volume would double the memory of the usual case.
// Test-time augmentation (`mirror`) mirrors each window, as nnU-Net does (src/model/tta.ts).
import { checkExtent, Extent } from '../data/morphology';
import { checkPredictingModel } from './ensemble';
import { mirrored } from './tta';
import { loadNative } from '../native';
import { predictIntoOf, type PredictOutputs } from './model';

/** The part of a Model that sliding-window inference needs (tests pass fakes). */
export interface SlidingWindowModel {
  /** device: where predict runs ('cuda': the next batch is predicted while the last is stitched). */
  readonly config: { classes: number; annotators: number; inChannels: number; ndim: 2 | 3; depth: number; device?: string };
  /**
   * Resolves with fresh output arrays, and reads `images` only until it resolves (the
   * caller refills the same buffer for the next batch).
   */
  predict(
    images: Float32Array,
    shape: number[],
    options?: { cms?: boolean; annotatorProbs?: boolean },
  ): Promise<{ probs: Float32Array; cms?: Float32Array; annotatorProbs?: Float32Array }>;
  /** Frees the buffers the model keeps between calls (Model.releaseBuffers); ensemble() calls it between members. */
  releaseBuffers?(): Promise<void>;
}

export interface SlidingWindowOptions {
  /** Window size: [d, h, w] in 3D; [h, w] or [1, h, w] in 2D. Each divisible by 2^(depth-1). */
  patch: readonly number[];
  /** Fraction of a window shared with its neighbour, 0 <= overlap < 1. Default 0.5. */
  overlap?: number;
  /** Windows per model.predict call. Default 2. */
  batchSize?: number;
  /** Gaussian sigma per axis as a fraction of the patch size. Default 1/8. */
  gaussianSigmaScale?: number;
  /** Also stitch the annotators' CMs, [R, L, L, *S] (R*L*L floats per voxel: mind the memory). */
  cms?: boolean;
  /** Also stitch the annotators' label distributions q_r, [R, L, *S]. */
  annotatorProbs?: boolean;
  /**
   * Test-time augmentation: each window is also predicted mirrored along every combination of
   * these spatial axes (true: all, 8 predictions in 3D, 4 in 2D; a list counts [d, h, w] in 3D,
   * [h, w] in 2D), and the flipped-back predictions are averaged. Default false.
   */
  mirror?: boolean | readonly number[];
  /** Windows done of the total: (0, total) before the first batch, then after each batch. */
  onProgress?: (windowsDone: number, windowsTotal: number) => void;
  /**
   * Predict the next batch while this one is stitched: the stitching's time hidden, for one
   * more batch of outputs in memory. Default: when the model runs on a GPU (config.device
   * 'cuda'), where a window's prediction takes about as long as its stitching; on the CPU
   * the prediction takes a hundred times longer and the memory is better kept.
   */
  pipeline?: boolean;
}

export interface SlidingWindowPrediction {
  /** Consensus probabilities, [L, *S] (S = [H, W] in 2D, [D, H, W] in 3D). */
  probs: Float32Array;
  probsShape: number[];
  /** Annotator CMs, [R, L, L, *S], A[i][j] at channel i * L + j. */
  cms?: Float32Array;
  cmsShape?: number[];
  /** Annotator label distributions q_r = A_r p, [R, L, *S]. */
  annotatorProbs?: Float32Array;
  annotatorProbsShape?: number[];
  /** Number of windows predicted. */
  windows: number;
}

/** Smallest weight of the importance map, relative to its centre (1). */
export const GAUSSIAN_WEIGHT_FLOOR = 1e-3;

/**
 * Importance weights of one [d, h, w] window, C order: exp(-sum_axis ((x - c) / sigma)^2 / 2)
 * with c the window centre ((size - 1) / 2) and sigma = size * sigmaScale per axis, scaled
 * so that the centre weighs 1, and raised to at least `floor` so that no voxel (a volume
 * corner is covered by one window's corner only) ever has weight 0.
 */
export function gaussianImportanceMap(patch: readonly number[], sigmaScale = 1 / 8, floor = GAUSSIAN_WEIGHT_FLOOR): Float64Array {
  // A public function: [8] or [8, 8, 8, 8] would otherwise give an empty map or a 3D map of the
  // first three sizes, and 7.5 a map whose length is not the product of its axes (zeros at the end).
  if (!Array.isArray(patch) || (patch.length !== 2 && patch.length !== 3)) {
    throw new RangeError(`patch must be [h, w] or [d, h, w], got ${Array.isArray(patch) ? `[${patch.join(', ')}]` : String(patch)}`);
  }
  patch.forEach((p, i) => positiveInteger(`patch[${i}]`, p));
  const [pd, ph, pw] = patch.length === 2 ? [1, patch[0], patch[1]] : patch;
  if (!(sigmaScale > 0) || !Number.isFinite(sigmaScale)) throw new RangeError(`gaussianSigmaScale = ${sigmaScale} must be a finite number > 0`);
  if (!(floor > 0 && floor <= 1)) throw new RangeError(`floor = ${floor} must be in (0, 1]`);
  const axis = (size: number): Float64Array => {
    const centre = (size - 1) / 2;
    const sigma = size * sigmaScale;
    return Float64Array.from({ length: size }, (_, i) => Math.exp(-0.5 * ((i - centre) / sigma) ** 2));
  };
  // The Gaussian factorises over axes; each axis is scaled to a maximum of 1 before the
  // product, so the centre weighs 1. Scaling the product by the product of the maxima instead
  // divided 0 by 0 for a small sigmaScale (every voxel's product underflowed, 0.001 at 16^3):
  // a map of NaN, and every stitched output NaN.
  const [gz, gy, gx] = [axis(pd), axis(ph), axis(pw)].map((g) => {
    const top = Math.max(...g);
    return g.map((v) => v / top);
  });
  const map = new Float64Array(pd * ph * pw);
  let k = 0;
  for (let z = 0; z < pd; z++) for (let y = 0; y < ph; y++) for (let x = 0; x < pw; x++) map[k++] = Math.max(floor, gz[z] * gy[y] * gx[x]);
  return map;
}

/**
 * The largest step between windows of `patch` voxels overlapping by `overlap`:
 * floor(patch * (1 - overlap)), at least 1. The 1e-9 keeps a product that is whole in exact
 * arithmetic whole: 1 - 0.8 is 0.19999999999999996 in binary, so 40 * (1 - 0.8) floored to 7,
 * not 8, and a case took more windows than the overlap asked for (2.25x at patch 40, 0.9).
 */
export function windowStep(patch: number, overlap: number): number {
  return Math.max(1, Math.floor(patch * (1 - overlap) + 1e-9));
}

/**
 * Start offsets of the windows along one axis, in the coordinates of the (padded) axis:
 * first at 0, last flush with the far edge, evenly spread with a step <= maxStep.
 */
export function windowStarts(size: number, patch: number, maxStep: number): number[] {
  if (size <= patch) return [0];
  const steps = Math.ceil((size - patch) / maxStep);
  return Array.from({ length: steps + 1 }, (_, i) => Math.round((i * (size - patch)) / steps));
}

interface Axis {
  size: number;
  patch: number;
  /** Zeros in front of the volume when it is smaller than the patch. */
  before: number;
  starts: number[];
}

function positiveInteger(name: string, value: unknown): number {
  if (typeof value !== 'number' || !Number.isInteger(value) || value < 1) throw new RangeError(`${name} = ${typeof value === 'string' ? JSON.stringify(value) : String(value)} must be a positive integer`);
  return value;
}

const SLIDING_WINDOW_OPTION_KEYS: ReadonlySet<string> = new Set<keyof SlidingWindowOptions>([
  'patch', 'overlap', 'batchSize', 'gaussianSigmaScale', 'cms', 'annotatorProbs', 'mirror', 'onProgress', 'pipeline',
]);

/**
 * Predicts a whole volume [C, D, H, W] (2D: [C, H, W] with extent.d = 1) window by window
 * and stitches the outputs with Gaussian weights. See the top of this file for the
 * geometry. Rejects before any prediction when an argument is invalid.
 */
export async function slidingWindowPredict(
  model: SlidingWindowModel,
  volume: Float32Array,
  extent: Extent,
  options: SlidingWindowOptions,
): Promise<SlidingWindowPrediction> {
  checkPredictingModel(model, 'slidingWindowPredict');
  const { classes: L, annotators: R, inChannels: C, ndim, depth } = model.config;
  checkExtent(extent);
  if (ndim === 2 && extent.d !== 1) throw new RangeError(`a 2D model needs extent.d = 1, got ${extent.d}`);
  if (!(volume instanceof Float32Array)) throw new TypeError('volume must be a Float32Array [C, *S]');
  const V = extent.d * extent.h * extent.w;
  if (volume.length !== C * V) {
    throw new RangeError(`volume has ${volume.length} values, [C, D, H, W] = [${C}, ${extent.d}, ${extent.h}, ${extent.w}] needs ${C * V}`);
  }
  for (let i = 0; i < volume.length; i++) {
    if (!Number.isFinite(volume[i])) throw new RangeError(`volume has a non-finite value (${volume[i]}) at index ${i}`);
  }
  if (!options || !Array.isArray(options.patch)) throw new TypeError('options.patch must be an array [d, h, w] (or [h, w] in 2D)');
  // A misspelt option (overlapp) would otherwise fall back to its default without a word.
  const unknown = Object.keys(options).filter((k) => !SLIDING_WINDOW_OPTION_KEYS.has(k));
  if (unknown.length > 0) {
    throw new TypeError(`unknown sliding-window option(s) ${unknown.map((k) => JSON.stringify(k)).join(', ')}; known: ${[...SLIDING_WINDOW_OPTION_KEYS].join(', ')}`);
  }
  const patch = options.patch.length === 2 && ndim === 2 ? [1, ...options.patch] : [...options.patch];
  if (patch.length !== 3) throw new RangeError(`options.patch = [${options.patch.join(', ')}] must have ${ndim === 2 ? '2' : '3'} sizes`);
  // Named by the index the caller wrote: a 2D [h, w] has the depth 1 put in front of it here.
  const given = patch.length - options.patch.length;
  patch.forEach((p, i) => positiveInteger(`options.patch[${i - given}]`, p));
  if (ndim === 2 && patch[0] !== 1) throw new RangeError(`a 2D model needs patch depth 1, got [${patch.join(', ')}]`);
  const multiple = 2 ** (depth - 1);
  const spatialPatch = ndim === 2 ? patch.slice(1) : patch;
  for (const p of spatialPatch) {
    if (p % multiple !== 0) {
      throw new RangeError(`patch size ${p} is not divisible by 2^(depth-1) = ${multiple} (patch [${spatialPatch.join(', ')}], depth ${depth})`);
    }
  }
  const overlap = options.overlap ?? 0.5;
  if (!(overlap >= 0 && overlap < 1)) throw new RangeError(`options.overlap = ${overlap} must be in [0, 1)`);
  const batchSize = positiveInteger('options.batchSize', options.batchSize ?? 2);
  const weights = gaussianImportanceMap(patch, options.gaussianSigmaScale ?? 1 / 8);
  const predictor = options.mirror ? mirrored(model, options.mirror) : model;

  const axes: Axis[] = [extent.d, extent.h, extent.w].map((size, i) => {
    const p = patch[i];
    const padded = Math.max(size, p);
    return { size, patch: p, before: Math.floor((padded - size) / 2), starts: windowStarts(padded, p, windowStep(p, overlap)) };
  });
  const windows: [number, number, number][] = [];
  for (const z of axes[0].starts) for (const y of axes[1].starts) for (const x of axes[2].starts) windows.push([z, y, x]);

  const [pd, ph, pw] = patch;
  const Pv = pd * ph * pw;
  const native = loadNative();
  const { h: H, w: W } = extent;
  const wantCms = options.cms === true;
  const wantQ = options.annotatorProbs === true;
  const Sum = maxWindowsPerVoxel(axes) > FLOAT32_SUM_WINDOWS ? Float64Array : Float32Array;
  // Zeroed by writing, once: a new array's pages are mapped to the kernel's zero page, and the
  // stitching's first read-add-write of each page then faulted twice (read, then copy-on-write
  // with a TLB flush across the stitching threads), 7% of a CPU BraTS case's time.
  const zeroed = (length: number) => new Sum(length).fill(0);
  const outputs: { name: 'probs' | 'cms' | 'annotatorProbs'; channels: number; sum: Float32Array | Float64Array }[] = [
    { name: 'probs', channels: L, sum: zeroed(L * V) },
  ];
  if (wantCms) outputs.push({ name: 'cms', channels: R * L * L, sum: zeroed(R * L * L * V) });
  if (wantQ) outputs.push({ name: 'annotatorProbs', channels: R * L, sum: zeroed(R * L * V) });
  const weightSum = new Float64Array(V);
  const padded = axes.some((a) => a.size < a.patch);
  // With `pipeline`, one batch is in flight while the one before is stitched, so the model
  // does not wait for the stitching (a GPU predicts a 128^3 window in about the time
  // JavaScript takes to blend its CMs). One input buffer serves: a batch is gathered once
  // the previous one's prediction has resolved, and the model reads its input only until then.
  const pipeline = options.pipeline ?? model.config.device === 'cuda';
  const input = new Float32Array(Math.min(batchSize, windows.length) * C * Pv);
  // A Model writes each batch's outputs into arrays kept for the whole volume, two sets when
  // pipelined (one written while the other is stitched): fresh outputs a batch (100 MB for
  // two 64^3 windows of a BraTS CM model) cost their page faults, with the sums' above a sixth
  // of a CPU case's CPU time (BENCHMARKS.md, the whole-case table). Mirrored models (which reuse their own), ensembles, fakes and a Model
  // whose predict was replaced (predictIntoOf) return arrays of their own.
  const writeInto = predictor === model ? predictIntoOf(model) : undefined;
  const outputSets: PredictOutputs[] = [];
  const outputsFor = (k: number, windowsInBatch: number): PredictOutputs => {
    const set = pipeline ? k % 2 : 0;
    const full = Math.min(batchSize, windows.length);
    outputSets[set] ??= Object.fromEntries(outputs.map((o) => [o.name, new Float32Array(full * o.channels * Pv)]));
    // The last batch may be short: views of the sets' first windows.
    return Object.fromEntries(outputs.map((o) => [o.name, outputSets[set][o.name]!.subarray(0, windowsInBatch * o.channels * Pv)]));
  };

  // For one window and one axis: the window offsets that fall inside the volume, and the
  // volume coordinate of the window's first voxel.
  const clip = (axis: Axis, start: number) => {
    const origin = start - axis.before;
    return { origin, from: Math.max(0, -origin), to: Math.min(axis.patch, axis.size - origin) };
  };

  // The windows of one batch copied out of the volume (zeros where they leave it).
  const gather = (batch: [number, number, number][]): Float32Array => {
    const images = input.subarray(0, batch.length * C * Pv);
    if (padded) images.fill(0);
    batch.forEach(([sz, sy, sx], b) => {
      const cz = clip(axes[0], sz);
      const cy = clip(axes[1], sy);
      const cx = clip(axes[2], sx);
      for (let c = 0; c < C; c++) {
        for (let z = cz.from; z < cz.to; z++) {
          for (let y = cy.from; y < cy.to; y++) {
            const src = c * V + ((cz.origin + z) * H + cy.origin + y) * W + cx.origin;
            const dst = ((b * C + c) * pd + z) * ph * pw + y * pw;
            images.set(volume.subarray(src + cx.from, src + cx.to), dst + cx.from);
          }
        }
      }
    });
    return images;
  };

  type Prediction = Awaited<ReturnType<SlidingWindowModel['predict']>>;
  const batchAt = (k: number) => windows.slice(k * batchSize, (k + 1) * batchSize);
  // Batch k (windows k*batchSize...) gathered and handed to the model.
  const launch = (k: number): Promise<Prediction> => {
    const batch = batchAt(k);
    const images = gather(batch);
    const shape = ndim === 2 ? [batch.length, C, ph, pw] : [batch.length, C, pd, ph, pw];
    const predictOptions = { cms: wantCms, annotatorProbs: wantQ };
    const pending = writeInto
      ? writeInto(images, shape, predictOptions, outputsFor(k, batch.length))
      : predictor.predict(images, shape, predictOptions);
    // Awaited below; until then a rejection must not count as unhandled (the batch
    // before it may still be stitching, or may have failed first).
    pending.catch(() => {});
    return pending;
  };

  // Each window's outputs, times its importance weights, added into the sums.
  const stitch = (batch: [number, number, number][], prediction: Prediction) => {
    const B = batch.length;
    for (const output of outputs) {
      const values = prediction[output.name];
      if (!(values instanceof Float32Array) || values.length !== B * output.channels * Pv) {
        throw new RangeError(`model.predict returned ${output.name} with ${values?.length ?? 'no'} values, expected ${B * output.channels * Pv}`);
      }
    }
    // The outputs' sums in native code, channels in parallel (cmseg::stitch_window, the same
    // arithmetic as `sum[i] += weight * value` here, so the same bits): stitching a BraTS
    // case's CMs and q (64 channels, 60 windows of 64^3) in JavaScript took 4.8-6.0 s on 2
    // cores, a fifth of the case's prediction. Every sum receives the windows in order.
    batch.forEach(([sz, sy, sx], b) => {
      const cz = clip(axes[0], sz);
      const cy = clip(axes[1], sy);
      const cx = clip(axes[2], sx);
      for (let z = cz.from; z < cz.to; z++) {
        for (let y = cy.from; y < cy.to; y++) {
          const row = ((cz.origin + z) * H + cy.origin + y) * W + cx.origin;
          const patchRow = (z * ph + y) * pw;
          for (let x = cx.from; x < cx.to; x++) weightSum[row + x] += weights[patchRow + x];
        }
      }
      for (const output of outputs) {
        // The batch's array and the window's offset in it (no view made per window).
        const values = prediction[output.name] as Float32Array;
        native.stitchWindow(output.sum, [extent.d, H, W], values, b * output.channels * Pv, weights, [pd, ph, pw], output.channels, [cz.from, cy.from, cx.from], [cz.to, cy.to, cx.to], [cz.origin, cy.origin, cx.origin]);
      }
    });
  };

  const batches = Math.ceil(windows.length / batchSize);
  // The bar of a case starts now, not after its first batch (half a case with --tta or two
  // batches of 128^3 windows showed nothing). Before the first batch is handed to the model:
  // called after it, outside the try below, a throwing onProgress rejected the call while
  // that batch still ran, and the caller's next predict met a busy model.
  options.onProgress?.(0, windows.length);
  let pending = launch(0);
  // Batch k awaited and stitched in a frame of its own, which ends with it. Its outputs (R*L*L
  // + R*L + L channels per window voxel: 1 GiB for two 128^3 windows of a BraTS CM model) are
  // then garbage before the next batch allocates its own: held in the loop's frame (a variable,
  // or an argument register the interpreter keeps until reused) they stayed reachable while
  // the next batch was predicted, and a CPU prediction held two batches' outputs at once
  // (peak of `cmseg predict` on a 240x240x155 case, c 4: 64^3 windows 1.94 GB, now 1.84 GB;
  // 128^3 windows 5.5 GB, now 4.5 GB). test/realsize-audit.test.ts checks it.
  const consume = async (k: number): Promise<void> => {
    const prediction = await pending;
    if (pipeline && k + 1 < batches) {
      pending = launch(k + 1);
      // A model's predict may start its work from a promise callback (Model queues its
      // calls): let it start before the stitching holds the thread.
      await new Promise((resolve) => setImmediate(resolve));
    }
    stitch(batchAt(k), prediction);
    // The outputs let go of here, whatever still holds the prediction object: a frame's stale
    // register did now and then (V8's tiering decides), and a CPU prediction then held two
    // batches' outputs while the next batch ran (test/realsize-audit.test.ts).
    for (const output of outputs) delete prediction[output.name];
  };
  try {
    for (let k = 0; k < batches; k++) {
      await consume(k);
      options.onProgress?.(Math.min((k + 1) * batchSize, windows.length), windows.length);
      if (!pipeline && k + 1 < batches) pending = launch(k + 1);
    }
  } catch (e) {
    // A failure while batch k + 1 is in flight: let it finish before the caller reuses
    // the model (its rejection, if any, is this one's consequence or already handled).
    await pending.catch(() => {});
    throw e;
  }
  // Every batch is in: the reused output sets are let go of before the means are divided (a
  // Float64 sum's mean is a new array, and a set of a BraTS CM model's two 128^3 windows is
  // 1 GiB, two pipelined, on top of the sums and the means).
  outputSets.length = 0;

  // Each output divided by the summed weights, into Float32 (in place when the sums are), in
  // native code on every thread (the same division and rounding as `sum[i] / weightSum[v]`):
  // 0.6 s of one JavaScript thread for a BraTS case's 64 channels.
  const means = outputs.map((output) => {
    const sum = output.sum;
    const mean = sum instanceof Float32Array ? sum : new Float32Array(sum.length);
    native.divideByWeights(sum, weightSum, output.channels, mean);
    output.sum = new Float32Array(0); // a Float64 sum is garbage before the next is divided
    return mean;
  });
  const spatial = ndim === 2 ? [extent.h, extent.w] : [extent.d, extent.h, extent.w];
  const result: SlidingWindowPrediction = { probs: means[0], probsShape: [L, ...spatial], windows: windows.length };
  outputs.forEach((output, i) => {
    if (output.name === 'cms') {
      result.cms = means[i];
      result.cmsShape = [R, L, L, ...spatial];
    } else if (output.name === 'annotatorProbs') {
      result.annotatorProbs = means[i];
      result.annotatorProbsShape = [R, L, ...spatial];
    }
  });
  return result;
}

/** Most windows that cover one voxel before the sums are kept in Float64 (see the top of this file). */
export const FLOAT32_SUM_WINDOWS = 64;

/**
 * The most windows covering any one voxel: per axis, the most window starts within one
 * window's length of each other; the axes multiply, as the windows form a grid.
 */
export function maxWindowsPerVoxel(axes: readonly { patch: number; starts: readonly number[] }[]): number {
  return axes.reduce((product, { patch, starts }) => {
    let most = 0;
    for (let i = 0, j = 0; i < starts.length; i++) {
      while (j < starts.length && starts[j] < starts[i] + patch) j++;
      most = Math.max(most, j - i);
    }
    return product * most;
  }, 1);
}
