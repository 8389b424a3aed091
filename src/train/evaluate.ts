// Scoring a model on an in-memory split with the SPEC section 6 metrics (src/eval/metrics.ts):
// consensus Dice per class, Average and Total Dice, and, where the annotators' labels are
// known, the CM estimation error, incompetence, reliability and GED. Also the Dice of the
// naive fused label maps themselves (paper tables' "Mean labels" / "Mode labels" rows).
// Whole 3D volumes of different sizes (BraTS) are scored one at a time with sliding-window
// inference (evaluateVolumes), adding the BraTS region Dice. A data set without an expert
// consensus (an image folder without consensus/) is scored against the annotators'
// majority vote instead (evaluateAgainstMajority), without the CM error.

import { meanLabelsHard, modeLabels } from '../fusion/simple';
import {
  argmaxAnnotatorProbs,
  averageDicePerImage,
  diceSummary,
  fusedLabelDice,
  hasNonFinite,
  MeanStd,
  meanStd,
  SegmentationEvaluator,
  SegmentationReport,
} from '../eval/metrics';
import { BratsClassName, bratsDice, bratsHausdorff95, BratsRegion } from '../eval/brats-regions';
import { checkLabels } from '../data/annotators';
import { BRATS_CLASSES } from '../data/brats';
import type { Extent } from '../data/morphology';
import { argmaxClasses } from '../model/model';
import { type SlidingWindowModel, slidingWindowPredict } from '../model/sliding-window';
import type { AnnotatedBatch, AnnotatedSet } from './data';
import { gatherBatch, voxelsOf } from './data';

/** What scoring and pictures need of a model (a Model, or one wrapped by paddedToDepth, ensemble or mirrored). */
export type InferenceModel = SlidingWindowModel;

/** A SegmentationReport without the per-image arrays: what logs and JSON files hold. */
export interface EvaluationSummary extends Omit<SegmentationReport, 'perImage'> {
  /** What the consensus figures compare with; absent: the expert consensus. */
  reference?: 'majority vote';
  annotatorNames: string[];
  /** BraTS volumes: region Dice (WT, TC, ET), tumour-class Dice and region HD95 (mm), mean +- std over volumes. */
  brats?: { regions: Record<BratsRegion, MeanStd>; classes: Record<BratsClassName, MeanStd>; hd95: Record<BratsRegion, MeanStd> };
  /** Whole volumes: the figures of each one, in the order scored. */
  perCase?: VolumeScore[];
}

/** One volume's consensus figures. */
export interface VolumeScore {
  id: string;
  /** Dice per class, index = label. */
  dice: number[];
  totalDice: number;
  regions?: Record<BratsRegion, number>;
  /** HD95 of each region in mm (NaN where exactly one of prediction and truth has it). */
  hd95?: Record<BratsRegion, number>;
  /** true when the model's probabilities held NaN or Inf somewhere in the volume: every figure above is NaN. */
  nonFinite?: true;
}

/**
 * A volume's own average Dice: the mean over the non-background classes, as the summary's
 * averageDice takes it per image (averageDicePerImage) before its mean over volumes, so the
 * mean of the finite ones is the validation score that picks `best`. NaN for a volume whose
 * prediction was non-finite.
 */
export function volumeAverageDice(score: VolumeScore): number {
  const L = score.dice.length;
  let sum = 0;
  for (let c = 1; c < L; c++) sum += score.dice[c];
  return sum / (L - 1);
}

export function summarizeReport(report: SegmentationReport, annotatorNames: string[]): EvaluationSummary {
  const { perImage: _perImage, ...rest } = report;
  return { ...rest, annotatorNames };
}

/**
 * Voxels per predict call when no batchSize is given: 16 images of 256^2, 64 (the most) of
 * MNIST's 32^2. A fixed 64 images a call took more memory than a training step on large
 * images (64 of 256^2: 3.2 GB with c 16, depth 3, 3 annotators, against 2.4 GB for a training
 * step of the images preset's 16); the scores do not depend on the split into calls.
 */
export const EVAL_VOXELS_PER_CALL = 1 << 20;

export interface EvaluateOptions {
  /** Images per predict call; default as many as fit EVAL_VOXELS_PER_CALL voxels, 1 to 64. */
  batchSize?: number;
  /** Score the annotator CMs and predictions (CM error, reliability, GED); default true. */
  annotators?: boolean;
}

/**
 * A set read a part at a time (cmseg eval --data: a folder of new images, decoded one predict
 * call's images at a time, so that no folder is too large to score): its sizes, which
 * annotators labelled which image (present, [count, R]), whether it has an expert consensus,
 * and read(start, n): images start .. start + n - 1 as a set of their own. evaluateModel,
 * evaluateAgainstMajority and fusedLabelRows score it as they score the whole set: the same
 * predict calls, the same per-image figures, so the same summary.
 */
export interface PartedSet {
  count: number;
  channels: number;
  classes: number;
  spatial: readonly number[];
  annotatorNames: string[];
  present: Uint8Array;
  hasConsensus: boolean;
  /** options.images false: the label maps only (images is empty), not decoding what is not used. */
  read(start: number, n: number, options?: { images?: boolean }): AnnotatedSet;
}

function isParted(set: AnnotatedSet | PartedSet): set is PartedSet {
  return typeof (set as PartedSet).read === 'function';
}

/** Images start .. start + n - 1 of `set` as a set of their own (copies, as gatherBatch). */
function partOf(set: AnnotatedSet | PartedSet, start: number, n: number): AnnotatedSet {
  if (isParted(set)) return set.read(start, n);
  const batch = gatherBatch(set, Array.from({ length: n }, (_, k) => start + k));
  return { ...set, count: n, images: batch.images, labels: batch.labels, present: batch.present, consensus: batch.consensus, fused: batch.fused, names: undefined };
}

/** The annotators whose maps a set holds. */
function annotatorCount(set: AnnotatedSet | PartedSet): number {
  return isParted(set) ? set.annotatorNames.length : set.labels.length;
}

/** Images per part when a parted set is read only for its labels (fusedLabelRows): about EVAL_VOXELS_PER_CALL voxels. */
function labelPart(spatial: readonly number[]): number {
  return Math.max(1, Math.floor(EVAL_VOXELS_PER_CALL / voxelsOf(spatial)));
}

/** Sets of the same sizes one after the other, as one set. */
function concatSets(parts: readonly AnnotatedSet[], like: { channels: number; classes: number; spatial: readonly number[]; annotatorNames: string[] }): AnnotatedSet {
  const count = parts.reduce((sum, p) => sum + p.count, 0);
  const V = voxelsOf(like.spatial);
  const R = like.annotatorNames.length;
  // Parts read for their labels only have no images.
  const images = new Float32Array(parts.every((p) => p.images.length > 0) ? count * like.channels * V : 0);
  const labels = like.annotatorNames.map(() => new Uint8Array(count * V));
  const present = new Uint8Array(count * R);
  const withConsensus = parts.length > 0 && parts.every((p) => p.consensus !== undefined);
  const consensus = withConsensus ? new Uint8Array(count * V) : undefined;
  let at = 0;
  for (const p of parts) {
    if (images.length > 0) images.set(p.images, at * like.channels * V);
    p.labels.forEach((map, r) => labels[r].set(map, at * V));
    present.set(p.present, at * R);
    consensus?.set(p.consensus!, at * V);
    at += p.count;
  }
  return { count, channels: like.channels, classes: like.classes, spatial: [...like.spatial], images, labels, present, ...(consensus ? { consensus } : {}), annotatorNames: [...like.annotatorNames] };
}

/** The images of `set` at `indices`, read in parts of consecutive images: a parted set of them alone. */
function partedSubset(set: PartedSet, indices: readonly number[]): PartedSet {
  const R = set.annotatorNames.length;
  const present = new Uint8Array(indices.length * R);
  indices.forEach((n, k) => present.set(set.present.subarray(n * R, (n + 1) * R), k * R));
  return {
    ...set,
    count: indices.length,
    present,
    read: (start, n, options) => {
      const wanted = indices.slice(start, start + n);
      const parts: AnnotatedSet[] = [];
      for (let k = 0; k < wanted.length; ) {
        let run = 1;
        while (k + run < wanted.length && wanted[k + run] === wanted[k] + run) run++;
        parts.push(set.read(wanted[k], run, options));
        k += run;
      }
      return parts.length === 1 ? parts[0] : concatSets(parts, set);
    },
  };
}

/**
 * Predicts `set` batch by batch and accumulates every figure the set allows: the CM
 * figures need the annotators' labels of the set (its `labels`, with `present`). A
 * PartedSet is read one batch at a time.
 */
export async function evaluateModel(model: InferenceModel, set: AnnotatedSet | PartedSet, options: EvaluateOptions = {}): Promise<EvaluationSummary> {
  if (isParted(set) ? !set.hasConsensus : !set.consensus) throw new RangeError('this split has no expert consensus to score against');
  const batchSize = options.batchSize ?? Math.max(1, Math.min(64, Math.floor(EVAL_VOXELS_PER_CALL / voxelsOf(set.spatial))));
  // 1.5 would score image "1.5" and skip one; 0, negatives and NaN would ask for empty batches.
  if (!Number.isInteger(batchSize) || batchSize < 1) throw new RangeError(`batchSize ${batchSize} must be an integer >= 1 (images per predict call)`);
  const withAnnotators = options.annotators ?? true;
  const L = set.classes;
  const R = annotatorCount(set);
  // Said here, by name: otherwise the outputs' lengths would only disagree deep in the scoring
  // ("cms has 384 elements, [N, R, L, L, *S] needs 2*3*2*2*12").
  if (model.config.classes !== L) throw new RangeError(`the model predicts ${model.config.classes} classes, the set has ${L}`);
  if (withAnnotators && model.config.annotators !== R) {
    throw new RangeError(
      `the model has ${model.config.annotators} annotators, the set the labels of ${R} (${set.annotatorNames.join(', ')}): score without the annotators' figures (annotators: false) or give one map per model annotator`,
    );
  }
  const evaluator = new SegmentationEvaluator(L);
  for (let start = 0; start < set.count; start += batchSize) {
    const n = Math.min(batchSize, set.count - start);
    const part = partOf(set, start, n);
    const batch = { ...part, shape: [n, set.channels, ...set.spatial] };
    const prediction = await model.predict(batch.images, batch.shape, { cms: withAnnotators, annotatorProbs: withAnnotators });
    const pred = argmaxClasses(prediction.probs, n, L);
    // probs (annotatorProbs): the evaluator scores an image whose output is NaN or Inf as NaN
    // and names it, where the argmax of NaN (class 0) was scored as a prediction of background.
    if (!withAnnotators) {
      evaluator.add({ pred, truth: batch.consensus!, n, classes: L, probs: prediction.probs });
      continue;
    }
    evaluator.add({
      pred,
      truth: batch.consensus!,
      n,
      classes: L,
      probs: prediction.probs,
      annotatorProbs: prediction.annotatorProbs,
      cms: prediction.cms,
      annotatorLabels: batch.labels,
      present: batch.present,
      annotatorPreds: argmaxAnnotatorProbs(prediction.annotatorProbs!, n, R, L),
    });
  }
  return summarizeReport(evaluator.report(), set.annotatorNames);
}

/**
 * For a set without an expert consensus: the consensus figures against the majority vote
 * of the annotators (ties to the lower class), on the images at least one annotator
 * labelled. The CM error, incompetence and the pooled annotator CMs are left out: the
 * annotators' true CMs are only known against an expert consensus (a vote of the annotators
 * themselves would score each one against a map it helped to make; with one label per image,
 * against itself). Reliability and GED need no consensus and stay.
 */
export async function evaluateAgainstMajority(model: InferenceModel, set: AnnotatedSet | PartedSet, options: EvaluateOptions = {}): Promise<EvaluationSummary> {
  const R = annotatorCount(set);
  const labelled = Array.from({ length: set.count }, (_, n) => n).filter((n) => set.present.subarray(n * R, (n + 1) * R).some((p) => p !== 0));
  if (labelled.length === 0) throw new RangeError('no image of this split was labelled by any annotator: there is nothing to score against');
  if (isParted(set)) {
    // The labelled images, read a batch at a time, each batch's majority vote made as it is read (the vote is per pixel).
    const subset = partedSubset(set, labelled);
    const voted: PartedSet = {
      ...subset,
      hasConsensus: true,
      read: (start, n) => {
        const part = subset.read(start, n);
        return { ...part, consensus: modeLabels({ labels: part.labels, present: part.present, count: part.count, classes: set.classes }), fused: undefined };
      },
    };
    const { cmError: _e, cmErrorPerAnnotator: _p, incompetence: _i, annotatorCms: _c, ...rest } = await evaluateModel(model, voted, options);
    return { reference: 'majority vote', ...rest };
  }
  const batch = gatherBatch(set, labelled);
  const majority = modeLabels({ labels: batch.labels, present: batch.present, count: labelled.length, classes: set.classes });
  const scored: AnnotatedSet = { ...set, count: labelled.length, images: batch.images, labels: batch.labels, present: batch.present, consensus: majority, fused: undefined };
  const { cmError: _cmError, cmErrorPerAnnotator: _perAnnotator, incompetence: _incompetence, annotatorCms: _cms, ...summary } = await evaluateModel(model, scored, options);
  return { reference: 'majority vote', ...summary };
}

export interface FusedLabelRows {
  /** argmax of the mean labels (ties to the higher class; binary: mean >= 0.5). */
  mean: { averageDice: MeanStd; totalDice: MeanStd; dicePerClass: MeanStd[] };
  /** Majority vote (ties to the lower class). */
  mode: { averageDice: MeanStd; totalDice: MeanStd; dicePerClass: MeanStd[] };
}

/**
 * Dice of the fused annotator labels of `set` against its consensus, over the images at least
 * one annotator labelled: an image nobody labelled has no fused target (every voxel "no vote"),
 * and scoring it as a complete miss would drag the naive baselines' rows down (an image folder
 * given to eval with --data may hold such images). No labelled image: every figure n/a.
 */
export function fusedLabelRows(set: AnnotatedSet | PartedSet): FusedLabelRows {
  if (isParted(set) ? !set.hasConsensus : !set.consensus) throw new RangeError('this split has no expert consensus to score against');
  const R = annotatorCount(set);
  const labelled = Array.from({ length: set.count }, (_, n) => n).filter((n) => set.present.subarray(n * R, (n + 1) * R).some((p) => p !== 0));
  if (labelled.length === 0) {
    const none = { mean: NaN, std: NaN, count: 0 };
    const row = () => ({ averageDice: none, totalDice: none, dicePerClass: Array.from({ length: set.classes }, () => none) });
    return { mean: row(), mode: row() };
  }
  if (isParted(set)) return partedFusedLabelRows(partedSubset(set, labelled));
  const batch = labelled.length === set.count ? { labels: set.labels, present: set.present, consensus: set.consensus } : gatherBatch(set, labelled);
  const input = { labels: batch.labels, present: batch.present, count: labelled.length, classes: set.classes };
  const score = (fused: Uint8Array) => {
    const s = fusedLabelDice(fused, batch.consensus!, labelled.length, set.classes);
    return { averageDice: s.average, totalDice: s.total, dicePerClass: s.perClass };
  };
  return { mean: score(meanLabelsHard(input)), mode: score(modeLabels(input)) };
}

/**
 * The fused label rows' per-image figures, gathered a part at a time: each image's Dice is
 * its own (fusion and Dice are per pixel and per image), so the figures of the parts, joined
 * in order, give the mean +- std fusedLabelRows gives the whole set.
 */
class FusedRows {
  private readonly perImage: { mean: Float64Array; mode: Float64Array };
  private readonly totals: { mean: Float64Array; mode: Float64Array };
  private seen = 0;

  constructor(
    private readonly classes: number,
    private readonly count: number,
  ) {
    this.perImage = { mean: new Float64Array(count * classes), mode: new Float64Array(count * classes) };
    this.totals = { mean: new Float64Array(count), mode: new Float64Array(count) };
  }

  /** Adds `part`, every image of it labelled by someone, as images `at` .. of the labelled ones. */
  add(part: AnnotatedSet, at: number): void {
    const L = this.classes;
    const input = { labels: part.labels, present: part.present, count: part.count, classes: L };
    const fusions = { mean: meanLabelsHard, mode: modeLabels };
    for (const kind of ['mean', 'mode'] as const) {
      const s = fusedLabelDice(fusions[kind](input), part.consensus!, part.count, L);
      this.perImage[kind].set(s.perImage, at * L);
      this.totals[kind].set(s.totalPerImage, at);
    }
    this.seen += part.count;
  }

  /** Whether every labelled image was added. */
  get complete(): boolean {
    return this.seen === this.count;
  }

  rows(): FusedLabelRows {
    const L = this.classes;
    const N = this.count;
    const row = (kind: 'mean' | 'mode') => ({
      averageDice: meanStd(averageDicePerImage(this.perImage[kind], N, L)),
      totalDice: meanStd(this.totals[kind]),
      dicePerClass: Array.from({ length: L }, (_, c) => meanStd(Array.from({ length: N }, (_, n) => this.perImage[kind][n * L + c]))),
    });
    return { mean: row('mean'), mode: row('mode') };
  }
}

/** fusedLabelRows of a parted set whose every image is labelled, read a part at a time for its label maps only. */
function partedFusedLabelRows(set: PartedSet): FusedLabelRows {
  const rows = new FusedRows(set.classes, set.count);
  const step = labelPart(set.spatial);
  for (let start = 0; start < set.count; start += step) rows.add(set.read(start, Math.min(step, set.count - start), { images: false }), start);
  return rows.rows();
}

/** The label maps, presence and consensus of some images of `part` (its images left out). */
function labelMapsOf(part: AnnotatedSet, indices: readonly number[]): AnnotatedSet {
  const V = voxelsOf(part.spatial);
  const R = part.labels.length;
  const pick = (map: Uint8Array, size: number) => {
    const out = new Uint8Array(indices.length * size);
    indices.forEach((n, k) => out.set(map.subarray(n * size, (n + 1) * size), k * size));
    return out;
  };
  return {
    ...part,
    count: indices.length,
    images: new Float32Array(0),
    labels: part.labels.map((map) => pick(map, V)),
    present: pick(part.present, R),
    ...(part.consensus ? { consensus: pick(part.consensus, V) } : {}),
    fused: undefined,
  };
}

/**
 * `set` (with an expert consensus), whose parts also feed fusedLabelRows' figures as they are
 * read (by evaluateModel), and rows(): fusedLabelRows(set) without reading the folder's label
 * maps a second time (decoding them again took a sixth of the scoring of a folder of 512x512
 * images); read again only if some part was not read.
 */
export function withFusedLabelRows(set: PartedSet): { set: PartedSet; rows: () => FusedLabelRows } {
  const R = set.annotatorNames.length;
  const labelledBefore = new Int32Array(set.count + 1);
  for (let n = 0; n < set.count; n++) labelledBefore[n + 1] = labelledBefore[n] + (set.present.subarray(n * R, (n + 1) * R).some((p) => p !== 0) ? 1 : 0);
  const fused = new FusedRows(set.classes, labelledBefore[set.count]);
  const added = new Uint8Array(set.count);
  const observed: PartedSet = {
    ...set,
    read: (start, n, options) => {
      const part = set.read(start, n, options);
      if (!set.hasConsensus || part.consensus === undefined) return part;
      const labelled = Array.from({ length: part.count }, (_, k) => k).filter((k) => !added[start + k] && labelledBefore[start + k + 1] > labelledBefore[start + k]);
      // Consecutive runs of labelled images, each added where it falls among the labelled ones.
      for (let k = 0; k < labelled.length; ) {
        let run = 1;
        while (k + run < labelled.length && labelled[k + run] === labelled[k] + run) run++;
        const indices = labelled.slice(k, k + run);
        const sub = indices.length === part.count ? part : labelMapsOf(part, indices);
        fused.add(sub, labelledBefore[start + indices[0]]);
        for (const i of indices) added[start + i] = 1;
        k += run;
      }
      return part;
    },
  };
  return { set: observed, rows: () => (fused.complete ? fused.rows() : fusedLabelRows(set)) };
}

/** What predictImages returns (plain typed-array types: a consumer's compiler may predate generic ones). */
export interface ImagePredictions {
  n: number;
  voxels: number;
  batch: AnnotatedBatch;
  /** [n, L, *S]. */
  probs: Float32Array;
  /** [n, *S] argmax of probs. */
  consensus: Uint8Array;
  /** One [n, *S] map per annotator: argmax of q_r = A_r p. */
  annotatorMaps: Uint8Array[];
  /** [n, R, L, *S]: q_r, the distributions behind annotatorMaps (whether they are finite). */
  annotatorProbs: Float32Array;
  /** [n, R, L, L, *S]. */
  cms: Float32Array;
}

/** Predicted maps for `count` images of a set from image `start` on (for pictures): consensus, annotators, CMs. */
export async function predictImages(model: InferenceModel, set: AnnotatedSet, count: number, start = 0): Promise<ImagePredictions> {
  const n = Math.max(0, Math.min(count, set.count - start));
  const batch = gatherBatch(set, Array.from({ length: n }, (_, k) => start + k));
  const prediction = await model.predict(batch.images, batch.shape, { cms: true, annotatorProbs: true });
  const L = set.classes;
  const R = model.config.annotators;
  return {
    n,
    voxels: voxelsOf(set.spatial),
    batch,
    probs: prediction.probs,
    consensus: argmaxClasses(prediction.probs, n, L),
    annotatorMaps: argmaxAnnotatorProbs(prediction.annotatorProbs!, n, R, L),
    annotatorProbs: prediction.annotatorProbs!,
    cms: prediction.cms!,
  };
}

/** A whole annotated volume, as the cache holds it (src/data/cache.ts CachedCase fits). */
export interface AnnotatedVolume {
  id: string;
  /** [C, D, H, W]. */
  images: Float32Array;
  extent: Extent;
  /** Expert consensus [D, H, W]. */
  consensus: Uint8Array;
  /** One [D, H, W] map per annotator; 255 where unlabelled. */
  labels: Uint8Array[];
  /** [R]: 0 for an annotator who did not label this volume. */
  present: Uint8Array;
  /** The source grid: its voxel size [x, y, z] in mm (NIfTI pixdim) sets the HD95's units; absent: 1 mm. */
  original?: { spacing: readonly [number, number, number] };
}

export interface VolumeEvaluationOptions {
  /** Sliding-window size [d, h, w]: the training patch. */
  patch: readonly number[];
  /** Window overlap, default 0.5 (SPEC section 5). */
  overlap?: number;
  /** Windows per predict call (slidingWindowPredict's batchSize, default 2): 1 halves the forward pass's memory. */
  windowBatch?: number;
  /** Score the annotator CMs and predictions (CM error, reliability, GED); default true. */
  annotators?: boolean;
  annotatorNames: string[];
  /** Add the BraTS region Dice and HD95 (labels 0..3 with BraTS meanings). */
  bratsRegions?: boolean;
  /** Called after every volume. */
  onVolume?: (score: VolumeScore, done: number, total: number) => void;
  /** Called before and after every batch of a volume's windows (slidingWindowPredict's onProgress), with the volume's id. */
  onWindows?: (id: string, done: number, total: number) => void;
}

/**
 * Scores whole volumes one at a time (they may differ in size): sliding-window inference
 * with Gaussian weighting over each volume, then the SPEC section 6 figures accumulated
 * over volumes (one volume = one "image" of the mean +- std) and, optionally, the BraTS
 * regions. `load` is called for one volume at a time, so only one is held in memory;
 * with annotators, its stitched CMs take R * L * L floats per voxel.
 */
export async function evaluateVolumes(
  model: InferenceModel,
  ids: readonly string[],
  load: (id: string) => Promise<AnnotatedVolume>,
  options: VolumeEvaluationOptions,
): Promise<EvaluationSummary> {
  if (ids.length === 0) throw new RangeError('no volumes to score');
  const withAnnotators = options.annotators ?? true;
  const L = model.config.classes;
  const R = model.config.annotators;
  // The regions are unions of the BraTS labels 1..3: another model's classes mean something
  // else, and one without a class 3 would score ET as a perfect agreement on every volume.
  if (options.bratsRegions && L !== BRATS_CLASSES) throw new RangeError(`bratsRegions: the BraTS regions need a model of ${BRATS_CLASSES} classes (0..3), this one has ${L}`);
  const evaluator = new SegmentationEvaluator(L);
  const regionNames: BratsRegion[] = ['wholeTumour', 'tumourCore', 'enhancingTumour'];
  const classNames: BratsClassName[] = ['necrosis', 'edema', 'enhancing'];
  const regionValues = Object.fromEntries([...regionNames, ...classNames].map((k) => [k, [] as number[]])) as Record<BratsRegion | BratsClassName, number[]>;
  const hd95Values = Object.fromEntries(regionNames.map((k) => [k, [] as number[]])) as Record<BratsRegion, number[]>;
  // 1 for a volume whose probabilities were NaN or Inf: its region figures are NaN, and so are their means.
  const volumeBad: number[] = [];
  const perCase: VolumeScore[] = [];
  for (const [k, id] of ids.entries()) {
    const volume = await load(id);
    if (withAnnotators && volume.labels.length !== R) throw new RangeError(`volume ${id} has ${volume.labels.length} annotators, the model ${R}`);
    checkVolumeMaps(volume, L, withAnnotators ? R : undefined);
    checkVolumeImages(volume, model.config.inChannels);
    const prediction = await slidingWindowPredict(model, volume.images, volume.extent, {
      patch: options.patch,
      overlap: options.overlap ?? 0.5,
      ...(options.windowBatch !== undefined ? { batchSize: options.windowBatch } : {}),
      cms: withAnnotators,
      annotatorProbs: withAnnotators,
      ...(options.onWindows ? { onProgress: (done: number, total: number) => options.onWindows!(id, done, total) } : {}),
    });
    const pred = argmaxClasses(prediction.probs, 1, L);
    const present = volume.present;
    // The argmax of NaN is class 0: such a volume was scored as a prediction of background.
    const bad = hasNonFinite(prediction.probs);
    evaluator.add(
      withAnnotators
        ? {
            pred,
            truth: volume.consensus,
            n: 1,
            classes: L,
            probs: prediction.probs,
            annotatorProbs: prediction.annotatorProbs,
            cms: prediction.cms,
            annotatorLabels: volume.labels,
            present,
            annotatorPreds: argmaxAnnotatorProbs(prediction.annotatorProbs!, 1, R, L),
          }
        : { pred, truth: volume.consensus, n: 1, classes: L, probs: prediction.probs },
    );
    volumeBad.push(bad ? 1 : 0);
    if (bad) {
      const none = Object.fromEntries(regionNames.map((name) => [name, NaN])) as Record<BratsRegion, number>;
      const score: VolumeScore = { id, dice: new Array<number>(L).fill(NaN), totalDice: NaN, nonFinite: true };
      if (options.bratsRegions) {
        for (const name of [...regionNames, ...classNames]) regionValues[name].push(NaN);
        for (const name of regionNames) hd95Values[name].push(NaN);
        score.regions = { ...none };
        score.hd95 = { ...none };
      }
      perCase.push(score);
      options.onVolume?.(score, k + 1, ids.length);
      continue;
    }
    const figures = diceSummary(pred, volume.consensus, 1, L);
    const score: VolumeScore = { id, dice: Array.from(figures.perImage), totalDice: figures.totalPerImage[0] };
    if (options.bratsRegions) {
      const report = bratsDice(pred, volume.consensus, 1);
      for (const name of [...regionNames, ...classNames]) regionValues[name].push(report.perImage[name][0]);
      score.regions = { wholeTumour: report.perImage.wholeTumour[0], tumourCore: report.perImage.tumourCore[0], enhancingTumour: report.perImage.enhancingTumour[0] };
      // A pixdim of 0 (or missing) means 1 mm, as the NIfTI reader's qform does.
      const [sx, sy, sz] = (volume.original?.spacing ?? [1, 1, 1]).map((v) => (v > 0 && Number.isFinite(v) ? v : 1));
      const { d, h, w } = volume.extent;
      score.hd95 = bratsHausdorff95(pred, volume.consensus, [d, h, w], [sz, sy, sx]);
      for (const name of regionNames) hd95Values[name].push(score.hd95[name]);
    }
    perCase.push(score);
    options.onVolume?.(score, k + 1, ids.length);
  }
  const summary = summarizeReport(evaluator.report(), options.annotatorNames);
  summary.perCase = perCase;
  if (options.bratsRegions) {
    const stats = (names: readonly (BratsRegion | BratsClassName)[]) => Object.fromEntries(names.map((name) => [name, meanStd(regionValues[name], volumeBad)]));
    summary.brats = {
      regions: stats(regionNames) as Record<BratsRegion, MeanStd>,
      classes: stats(classNames) as Record<BratsClassName, MeanStd>,
      hd95: Object.fromEntries(regionNames.map((name) => [name, meanStd(hd95Values[name], volumeBad)])) as Record<BratsRegion, MeanStd>,
    };
  }
  return summary;
}

/**
 * A volume's reference (and, with `annotators`, the annotators' maps and presence) checked
 * before its prediction, which takes the longest (38 s for a BraTS case on 2 cores): sizes,
 * and labels < classes or 255, named with the volume's id. Found after the prediction, a bad
 * label said only "truth: label 7 at index 5 >= classes (4)", without the volume.
 */
function checkVolumeMaps(volume: AnnotatedVolume, classes: number, annotators: number | undefined): void {
  const { d, h, w } = volume.extent;
  const V = d * h * w;
  const check = (name: string, map: Uint8Array) => {
    if (!(map instanceof Uint8Array)) throw new TypeError(`volume ${volume.id}: ${name} is not a Uint8Array label map`);
    if (map.length !== V) throw new RangeError(`volume ${volume.id}: ${name} has ${map.length} voxels, its extent ${d}x${h}x${w} has ${V}`);
    checkLabels(`volume ${volume.id}: ${name}`, map, classes, true);
  };
  check('consensus', volume.consensus);
  if (annotators === undefined) return;
  if (volume.present.length !== annotators) throw new RangeError(`volume ${volume.id}: present has ${volume.present.length} entries, the model ${annotators} annotators`);
  volume.labels.forEach((map, r) => check(`labels[${r}]`, map));
}

/**
 * A volume's images: C channels of its extent, every value finite, said with the volume's id
 * and the channel (slidingWindowPredict's own check said "volume has a non-finite value (NaN)
 * at index 23", which names no case; a cache's float16 overflows to Inf).
 */
export function checkVolumeImages(volume: { id: string; images: Float32Array; extent: Extent }, channels: number): void {
  const { d, h, w } = volume.extent;
  const V = d * h * w;
  const { images } = volume;
  if (!(images instanceof Float32Array)) throw new TypeError(`volume ${volume.id}: images is not a Float32Array [C, D, H, W]`);
  if (images.length !== channels * V) throw new RangeError(`volume ${volume.id}: images has ${images.length} values, ${channels} channels of ${d}x${h}x${w} voxels need ${channels * V}`);
  for (let i = 0; i < images.length; i++) {
    if (!Number.isFinite(images[i])) throw new RangeError(`volume ${volume.id}: images hold ${images[i]} at channel ${Math.floor(i / V)}, voxel ${i % V}: the model takes finite intensities only`);
  }
}

/**
 * `model`, taking inputs of any spatial size: each side is padded at its far end (bottom,
 * right, back) to the next multiple of 2^(depth-1) by repeating the edge pixels, and every
 * output (probabilities, CMs, q_r) is cropped back to the input's size. Inputs that already
 * fit go through untouched.
 */
export function paddedToDepth(model: InferenceModel): InferenceModel {
  return {
    config: model.config,
    predict: async (images, shape, options) => {
      const spatial = shape.slice(2);
      const target = paddedSize(spatial, model.config.depth);
      if (target.every((t, i) => t === spatial[i])) return model.predict(images, shape, options);
      const planes = shape[0] * shape[1];
      const out = await model.predict(resizeFarEnd(images, planes, spatial, target), [shape[0], shape[1], ...target], options);
      const crop = (a: Float32Array | undefined) => (a ? resizeFarEnd(a, a.length / voxelsOf(target), target, spatial) : undefined);
      const cropped: Record<string, unknown> = { ...out, probs: crop(out.probs)!, cms: crop(out.cms), annotatorProbs: crop(out.annotatorProbs) };
      // A Model's prediction also says its shapes ([N, K..., *S]): their spatial part is the input's again.
      for (const [key, value] of Object.entries(out)) {
        if (key.endsWith('Shape') && Array.isArray(value)) cropped[key] = [...value.slice(0, value.length - spatial.length), ...spatial];
      }
      return cropped as typeof out;
    },
  };
}

/** Each side rounded up to a multiple of 2^(depth-1): the sizes a U-Net of that depth takes. */
export function paddedSize(spatial: readonly number[], depth: number): number[] {
  const multiple = 2 ** (depth - 1);
  return spatial.map((s) => Math.ceil(s / multiple) * multiple);
}

/** Axes as [d, h, w] (2D: d = 1). */
function dhw(spatial: readonly number[]): [number, number, number] {
  return spatial.length === 2 ? [1, spatial[0], spatial[1]] : [spatial[0], spatial[1], spatial[2]];
}

/**
 * `planes` arrays of size `from`, each resized at the far end of every axis to `to`: padded
 * with its edge values where `to` is larger, cut where it is smaller (the pad's inverse).
 */
function resizeFarEnd(data: Float32Array, planes: number, from: readonly number[], to: readonly number[]): Float32Array {
  const [d0, h0, w0] = dhw(from);
  const [d1, h1, w1] = dhw(to);
  const out = new Float32Array(planes * d1 * h1 * w1);
  const copied = Math.min(w0, w1);
  for (let p = 0; p < planes; p++) {
    for (let z = 0; z < d1; z++) {
      for (let y = 0; y < h1; y++) {
        const src = ((p * d0 + Math.min(z, d0 - 1)) * h0 + Math.min(y, h0 - 1)) * w0;
        const dst = ((p * d1 + z) * h1 + y) * w1;
        out.set(data.subarray(src, src + copied), dst);
        if (w1 > w0) out.fill(data[src + w0 - 1], dst + w0, dst + w1);
      }
    }
  }
  return out;
}
