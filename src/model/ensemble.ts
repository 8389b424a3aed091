// Ensembles of models (nnU-Net's ensembling of folds or configurations): several models of the
// same classes, annotators, ndim and input channels predict the same input, and every output
// is averaged: the consensus probabilities p(y|x), the annotators' CMs A_r and q_r = A_r p.
//
// Why the averages stay what they were: each pixel's p is a distribution over L classes and
// each column j of a CM, A_r[.][j] = p(annotator r says . | true j), is a distribution over L
// labels, as is q_r. A mean of distributions (a convex combination) is again one: entries stay
// in [0, 1] and sum_i mean_m A_m[i][j] = mean_m sum_i A_m[i][j] = 1. So the averaged CMs need
// no renormalisation (test/tta-ensemble.test.ts checks the column sums). The averaged q_r is
// the mixture of the members' annotator predictions, which in general differs from
// mean(A_r) mean(p); it is the members' averaged predictive distribution for annotator r,
// as the averaged p is for the consensus.
//
// The mean is kept as a running mean in the first output's Float32 arrays,
// m_k = m_{k-1} + (x_k - m_{k-1}) * (1/k): no extra memory beyond one member's output (the
// CMs of a batch of 3D windows are large), and exact where every member gives the same value
// (x_k - m_{k-1} = 0), so an ensemble of identical models returns that model's prediction
// bit for bit. tta.ts averages mirrored predictions with the same function.

import { copyIfShort, copyTypedArray, predictIntoOf, type PredictOutputs } from './model';
import type { SlidingWindowModel } from './sliding-window';

/** What ensemble() and mirrored() present: the inference part of a Model (SlidingWindowModel). */
export type PredictingModel = SlidingWindowModel;
export type ModelPrediction = Awaited<ReturnType<PredictingModel['predict']>>;

/**
 * A PredictingModel whose predictions are P: ensemble() and mirrored() return their first
 * prediction's object with the means written into it, so what their members' predictions
 * carry besides the outputs (a Model's probsShape, cmsShape, annotatorProbsShape) is there
 * too. Typed as a plain PredictingModel, `mirrored(model).predict(...)` lost those fields
 * for the compiler although README promises "the same outputs and shapes".
 */
export interface PredictingModelOf<P extends ModelPrediction> extends PredictingModel {
  predict(images: Float32Array, shape: number[], options?: { cms?: boolean; annotatorProbs?: boolean }): Promise<P>;
}

/** The outputs a prediction may hold, averaged alike. */
export const PREDICTION_OUTPUTS = ['probs', 'cms', 'annotatorProbs'] as const;

/** Folds `values`, the k-th value of every element, into the running mean `into` of the first k - 1, in place. */
export type FoldArray = (into: Float32Array, values: Float32Array, k: number) => void;

/** foldIntoMean's default: element i of `values` goes with element i of the mean. */
export const foldSameIndex: FoldArray = (into, values, k) => {
  const w = 1 / k; // a multiply per element rather than a division; still exact where values equal the mean
  for (let i = 0; i < into.length; i++) into[i] += (values[i] - into[i]) * w;
};

/**
 * Folds `next`, the k-th prediction (k >= 2), into `mean`, the running mean of the first k - 1,
 * in place, output by output; `fold` pairs their elements (mirrored predictions are read
 * flipped back). `names` says what the k-th and the first prediction are in errors.
 */
export function foldIntoMean(
  mean: ModelPrediction,
  next: ModelPrediction,
  k: number,
  fold: FoldArray = foldSameIndex,
  names: [string, string] = [`prediction ${k}`, 'the first'],
): void {
  const [nextName, firstName] = names;
  for (const name of PREDICTION_OUTPUTS) {
    const into = mean[name];
    const values = next[name];
    // An output only the later prediction has: the mean silently went without it (a first
    // member that ignored `cms: true` gave an ensemble without CMs, where the same members
    // in the other order failed). Refused either way.
    if (!into) {
      if (values !== undefined && values !== null) throw new RangeError(`${nextName} returned ${name} (${(values as { length?: number }).length ?? 0} values), ${firstName} none`);
      continue;
    }
    if (!(values instanceof Float32Array)) throw new RangeError(`${nextName} returned no ${name}, ${firstName} ${into.length} values`);
    if (values.length !== into.length) throw new RangeError(`${nextName} returned ${name} with ${values.length} values, ${firstName} ${into.length}`);
    fold(into, values, k);
  }
}

/**
 * `call()`, a member's prediction; an Error it fails with says which member (a disposed
 * member, or one that ran out of memory, said only "this model was disposed"). The error
 * keeps its class and code; only its message gains the member's index.
 */
async function asMember<T>(index: number, call: () => Promise<T>): Promise<T> {
  try {
    return await call();
  } catch (error) {
    if (error instanceof Error) error.message = `ensemble member ${index}: ${error.message}`;
    throw error;
  }
}

/**
 * Throws a TypeError naming `what` unless `value` looks like a PredictingModel (a config object
 * and a predict function): ensemble(), mirrored() and slidingWindowPredict() are public, and a
 * missing member otherwise failed as "Cannot read properties of undefined (reading 'ndim')",
 * or (a config without predict) only later, at the first prediction.
 */
export function checkPredictingModel(value: unknown, what: string): asserts value is PredictingModel {
  const m = value as Partial<PredictingModel> | null | undefined;
  let config: unknown;
  try {
    config = m !== null && typeof m === 'object' ? m.config : undefined;
  } catch (error) {
    // A disposed Model's config throws "this model was disposed": say which model it is
    // (an ensemble's member); the error keeps its class and code.
    if (error instanceof Error) error.message = `${what}: ${error.message}`;
    throw error;
  }
  if (m === null || typeof m !== 'object' || config === null || typeof config !== 'object' || typeof m.predict !== 'function') {
    const got = m === null ? 'null' : typeof m !== 'object' ? typeof m : config === null || typeof config !== 'object' ? 'an object without a config' : 'an object without a predict function';
    throw new TypeError(`${what}: expected a model (a Model, or an object with config and predict()), got ${got}`);
  }
}

/**
 * The arguments of a prediction as they are when it is asked for. ensemble() and mirrored()
 * call the model again after the first prediction resolves: reading the caller's arrays then
 * gave the later members (or mirrorings) whatever the caller had put there meanwhile (a
 * buffer refilled, a shape or options object reused for the next call), where README
 * ("Calls, errors and memory") lets a CPU model's caller change them once the call is made:
 * a silently mixed mean, or a RangeError when `cms` was turned off. The images are copied (a fraction of the outputs'
 * size: those are L or R*L*L times larger), as a CPU Model copies them (model.ts's helpers); anything that is not a typed array, an array or
 * an object is passed on as it is, for the model to reject.
 */
export function predictArguments(
  images: Float32Array,
  shape: number[],
  options: Parameters<PredictingModel['predict']>[2],
): [Float32Array, number[], Parameters<PredictingModel['predict']>[2]] {
  return [
    copyTypedArray(images),
    copyIfShort(shape),
    options !== null && typeof options === 'object' && !Array.isArray(options) ? { ...options } : options,
  ];
}

/** The config fields that ensemble members must share: their outputs are averaged value by value. */
export const ENSEMBLE_FIELDS = ['ndim', 'inChannels', 'classes', 'annotators'] as const;
export type EnsembleField = (typeof ENSEMBLE_FIELDS)[number];

/** The first field in which member `index` differs from member 0, or undefined when every member fits. */
export function ensembleMismatch(configs: readonly PredictingModel['config'][]): { field: EnsembleField; index: number; values: [number, number] } | undefined {
  for (let index = 1; index < configs.length; index++) {
    for (const field of ENSEMBLE_FIELDS) {
      if (configs[index][field] !== configs[0][field]) return { field, index, values: [configs[0][field], configs[index][field]] };
    }
  }
  return undefined;
}

/**
 * The distinct objects of `models` in order of first appearance, each with how often it
 * appears: a model named twice (`ensemble([a, a, b])`, or `cmseg predict --checkpoint a a b`,
 * which loads a once) predicts once and counts twice in the mean.
 */
function distinctMembers(models: readonly PredictingModel[]): { index: number; count: number }[] {
  const seen = new Map<PredictingModel, { index: number; count: number }>();
  models.forEach((m, index) => {
    const entry = seen.get(m);
    if (entry) entry.count++;
    else seen.set(m, { index, count: 1 });
  });
  return [...seen.values()];
}

/** Arrays of the lengths of `prediction`'s outputs, for a later prediction to be written into. */
export function outputsLike(prediction: ModelPrediction): PredictOutputs {
  const like: PredictOutputs = { probs: new Float32Array(prediction.probs.length) };
  if (prediction.cms) like.cms = new Float32Array(prediction.cms.length);
  if (prediction.annotatorProbs) like.annotatorProbs = new Float32Array(prediction.annotatorProbs.length);
  return like;
}

/** Folds a prediction that carries weight `w` of the total so far into the running weighted mean, in place. */
function foldWeight(w: number): FoldArray {
  // m + (x - m) * w: exact where x equals the mean, as foldSameIndex (w = 1/k there).
  return (into, values) => {
    for (let i = 0; i < into.length; i++) into[i] += (values[i] - into[i]) * w;
  };
}

/**
 * One model that predicts the mean of `models`' predictions (see the top of this file). The
 * members may differ in depth and width: the ensemble's depth is the largest, so an input
 * that fits it fits every member. Members predict one after the other (each in its own
 * queue), so only one member's output is held beside the mean, and each frees its buffers
 * (releaseBuffers, where it has one) before the next predicts. A model given more than once
 * predicts once and weighs as often as given.
 */
export function ensemble<P extends ModelPrediction = ModelPrediction>(models: readonly PredictingModelOf<P>[]): PredictingModelOf<P> {
  // ensemble(a, b) (the brackets forgotten) or a Set of models was "needs at least one model".
  if (!Array.isArray(models)) {
    const m = models as unknown;
    const got =
      m === null ? 'null'
      : typeof m !== 'object' ? typeof m
      : m instanceof Set ? 'a Set (spread it into an array)'
      : 'predict' in m && 'config' in m ? 'a model'
      : `a ${(m as object).constructor?.name ?? 'object'}`;
    throw new TypeError(`ensemble expects an array of models (ensemble([a, b])), got ${got}`);
  }
  if (models.length === 0) throw new RangeError('ensemble needs at least one model');
  models.forEach((m, i) => checkPredictingModel(m, `ensemble member ${i}`));
  const configs = models.map((m) => m.config);
  const mismatch = ensembleMismatch(configs);
  if (mismatch) {
    const { field, index, values } = mismatch;
    throw new RangeError(`ensemble member ${index} has ${field} ${values[1]}, member 0 has ${field} ${values[0]}: members must share ${ENSEMBLE_FIELDS.join(', ')}`);
  }
  if (models.length === 1) return models[0];
  const { ndim, inChannels, classes, annotators } = configs[0];
  // On a GPU when any member is: its predictions then take about as long as the stitching.
  const device = configs.some((c) => c.device === 'cuda') ? 'cuda' : configs[0].device;
  const config = { ndim, inChannels, classes, annotators, depth: Math.max(...configs.map((c) => c.depth)), device };
  const distinct = distinctMembers(models);
  return {
    config,
    predict: async (...given) => {
      const [images, shape, options] = predictArguments(...given);
      // Each member frees its buffers once it has predicted: otherwise every member keeps
      // what its largest call needed (a brats3d window's activations: 0.3-0.6 GB each).
      // The members after the first that are Models write into one set of outputs, reused once
      // each is folded into the mean (fresh ones cost their page faults; mirrored.predict says so).
      let reused: PredictOutputs | undefined;
      const predicted = async (index: number, mean?: P): Promise<P> => {
        const member = models[index];
        const writeInto = mean ? predictIntoOf(member) : undefined;
        const out = await asMember<P>(index, () =>
          writeInto ? (writeInto(images, shape, options, (reused ??= outputsLike(mean!))) as unknown as Promise<P>) : member.predict(images, shape, options),
        );
        await asMember(index, async () => member.releaseBuffers?.());
        return out;
      };
      const [first, ...rest] = distinct;
      const mean = await predicted(first.index);
      let counted = first.count;
      for (const { index, count } of rest) {
        counted += count;
        foldIntoMean(mean, await predicted(index, mean), counted, foldWeight(count / counted), [`ensemble member ${index}`, `member ${first.index}`]);
      }
      return mean;
    },
    releaseBuffers: async () => {
      for (const [index, m] of models.entries()) await asMember(index, async () => m.releaseBuffers?.());
    },
  };
}
