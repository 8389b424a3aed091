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
  diceSummary,
  fusedLabelDice,
  MeanStd,
  meanStd,
  SegmentationEvaluator,
  SegmentationReport,
} from '../eval/metrics';
import { BratsClassName, bratsDice, BratsRegion } from '../eval/brats-regions';
import type { Extent } from '../data/morphology';
import { argmaxClasses, Model } from '../model/model';
import { slidingWindowPredict } from '../model/sliding-window';
import type { AnnotatedSet } from './data';
import { gatherBatch, voxelsOf } from './data';

/** A SegmentationReport without the per-image arrays: what logs and JSON files hold. */
export interface EvaluationSummary {
  /** What the consensus figures compare with; absent: the expert consensus. */
  reference?: 'majority vote';
  images: number;
  classes: number;
  annotatorNames: string[];
  dicePerClass: MeanStd[];
  averageDice: MeanStd;
  totalDice: MeanStd;
  cmError?: MeanStd;
  cmErrorPerAnnotator?: MeanStd[];
  incompetence?: number[];
  reliability?: number[];
  ged?: MeanStd;
  /** BraTS volumes: region Dice (WT, TC, ET) and tumour-class Dice, mean +- std over volumes. */
  brats?: { regions: Record<BratsRegion, MeanStd>; classes: Record<BratsClassName, MeanStd> };
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
}

export function summarizeReport(report: SegmentationReport, annotatorNames: string[]): EvaluationSummary {
  const { perImage: _perImage, ...rest } = report;
  return { ...rest, annotatorNames };
}

export interface EvaluateOptions {
  /** Images per predict call; default 64. */
  batchSize?: number;
  /** Score the annotator CMs and predictions (CM error, reliability, GED); default true. */
  annotators?: boolean;
}

/**
 * Predicts `set` batch by batch and accumulates every figure the set allows: the CM
 * figures need the annotators' labels of the set (its `labels`, with `present`).
 */
export async function evaluateModel(model: Model, set: AnnotatedSet, options: EvaluateOptions = {}): Promise<EvaluationSummary> {
  if (!set.consensus) throw new RangeError('this split has no expert consensus to score against');
  const batchSize = options.batchSize ?? 64;
  const withAnnotators = options.annotators ?? true;
  const L = set.classes;
  const R = set.labels.length;
  const evaluator = new SegmentationEvaluator(L);
  for (let start = 0; start < set.count; start += batchSize) {
    const indices = Array.from({ length: Math.min(batchSize, set.count - start) }, (_, k) => start + k);
    const batch = gatherBatch(set, indices);
    const n = indices.length;
    const prediction = await model.predict(batch.images, batch.shape, { cms: withAnnotators, annotatorProbs: withAnnotators });
    const pred = argmaxClasses(prediction.probs, n, L);
    if (!withAnnotators) {
      evaluator.add({ pred, truth: batch.consensus!, n, classes: L });
      continue;
    }
    evaluator.add({
      pred,
      truth: batch.consensus!,
      n,
      classes: L,
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
 * labelled. The CM error and incompetence are left out: the annotators' true CMs are
 * only known against an expert consensus (a vote of the annotators themselves would score
 * each one against a map it helped to make). Reliability and GED need no consensus and stay.
 */
export async function evaluateAgainstMajority(model: Model, set: AnnotatedSet, options: EvaluateOptions = {}): Promise<EvaluationSummary> {
  const R = set.labels.length;
  const labelled = Array.from({ length: set.count }, (_, n) => n).filter((n) => set.present.subarray(n * R, (n + 1) * R).some((p) => p !== 0));
  if (labelled.length === 0) throw new RangeError('no image of this split was labelled by any annotator: there is nothing to score against');
  const batch = gatherBatch(set, labelled);
  const majority = modeLabels({ labels: batch.labels, present: batch.present, count: labelled.length, classes: set.classes });
  const scored: AnnotatedSet = { ...set, count: labelled.length, images: batch.images, labels: batch.labels, present: batch.present, consensus: majority, fused: undefined };
  const { cmError: _cmError, cmErrorPerAnnotator: _perAnnotator, incompetence: _incompetence, ...summary } = await evaluateModel(model, scored, options);
  return { reference: 'majority vote', ...summary };
}

export interface FusedLabelRows {
  /** argmax of the mean labels (ties to the higher class; binary: mean >= 0.5). */
  mean: { averageDice: MeanStd; totalDice: MeanStd; dicePerClass: MeanStd[] };
  /** Majority vote (ties to the lower class). */
  mode: { averageDice: MeanStd; totalDice: MeanStd; dicePerClass: MeanStd[] };
}

/** Dice of the fused annotator labels of `set` against its consensus. */
export function fusedLabelRows(set: AnnotatedSet): FusedLabelRows {
  if (!set.consensus) throw new RangeError('this split has no expert consensus to score against');
  const input = { labels: set.labels, present: set.present, count: set.count, classes: set.classes };
  const score = (fused: Uint8Array) => {
    const s = fusedLabelDice(fused, set.consensus!, set.count, set.classes);
    return { averageDice: s.average, totalDice: s.total, dicePerClass: s.perClass };
  };
  return { mean: score(meanLabelsHard(input)), mode: score(modeLabels(input)) };
}

/** Predicted maps for the first `count` images of a set (for pictures): consensus, annotators, CMs. */
export async function predictImages(model: Model, set: AnnotatedSet, count: number) {
  const n = Math.min(count, set.count);
  const batch = gatherBatch(set, Array.from({ length: n }, (_, k) => k));
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
}

export interface VolumeEvaluationOptions {
  /** Sliding-window size [d, h, w]: the training patch. */
  patch: readonly number[];
  /** Window overlap, default 0.5 (SPEC section 5). */
  overlap?: number;
  /** Score the annotator CMs and predictions (CM error, reliability, GED); default true. */
  annotators?: boolean;
  annotatorNames: string[];
  /** Add the BraTS region Dice (labels 0..3 with BraTS meanings). */
  bratsRegions?: boolean;
  /** Called after every volume. */
  onVolume?: (score: VolumeScore, done: number, total: number) => void;
}

/**
 * Scores whole volumes one at a time (they may differ in size): sliding-window inference
 * with Gaussian weighting over each volume, then the SPEC section 6 figures accumulated
 * over volumes (one volume = one "image" of the mean +- std) and, optionally, the BraTS
 * regions. `load` is called for one volume at a time, so only one is held in memory;
 * with annotators, its stitched CMs take R * L * L floats per voxel.
 */
export async function evaluateVolumes(
  model: Model,
  ids: readonly string[],
  load: (id: string) => Promise<AnnotatedVolume>,
  options: VolumeEvaluationOptions,
): Promise<EvaluationSummary> {
  if (ids.length === 0) throw new RangeError('no volumes to score');
  const withAnnotators = options.annotators ?? true;
  const L = model.config.classes;
  const R = model.config.annotators;
  const evaluator = new SegmentationEvaluator(L);
  const regionNames: BratsRegion[] = ['wholeTumour', 'tumourCore', 'enhancingTumour'];
  const classNames: BratsClassName[] = ['necrosis', 'edema', 'enhancing'];
  const regionValues = Object.fromEntries([...regionNames, ...classNames].map((k) => [k, [] as number[]])) as Record<BratsRegion | BratsClassName, number[]>;
  const perCase: VolumeScore[] = [];
  for (const [k, id] of ids.entries()) {
    const volume = await load(id);
    if (volume.labels.length !== R) throw new RangeError(`volume ${id} has ${volume.labels.length} annotators, the model ${R}`);
    const prediction = await slidingWindowPredict(model, volume.images, volume.extent, {
      patch: options.patch,
      overlap: options.overlap ?? 0.5,
      cms: withAnnotators,
      annotatorProbs: withAnnotators,
    });
    const pred = argmaxClasses(prediction.probs, 1, L);
    const present = volume.present;
    evaluator.add(
      withAnnotators
        ? {
            pred,
            truth: volume.consensus,
            n: 1,
            classes: L,
            cms: prediction.cms,
            annotatorLabels: volume.labels,
            present,
            annotatorPreds: argmaxAnnotatorProbs(prediction.annotatorProbs!, 1, R, L),
          }
        : { pred, truth: volume.consensus, n: 1, classes: L },
    );
    const figures = diceSummary(pred, volume.consensus, 1, L);
    const score: VolumeScore = { id, dice: Array.from(figures.perImage), totalDice: figures.totalPerImage[0] };
    if (options.bratsRegions) {
      const report = bratsDice(pred, volume.consensus, 1);
      for (const name of [...regionNames, ...classNames]) regionValues[name].push(report.perImage[name][0]);
      score.regions = { wholeTumour: report.perImage.wholeTumour[0], tumourCore: report.perImage.tumourCore[0], enhancingTumour: report.perImage.enhancingTumour[0] };
    }
    perCase.push(score);
    options.onVolume?.(score, k + 1, ids.length);
  }
  const summary = summarizeReport(evaluator.report(), options.annotatorNames);
  summary.perCase = perCase;
  if (options.bratsRegions) {
    const stats = (names: readonly (BratsRegion | BratsClassName)[]) => Object.fromEntries(names.map((name) => [name, meanStd(regionValues[name])]));
    summary.brats = {
      regions: stats(regionNames) as Record<BratsRegion, MeanStd>,
      classes: stats(classNames) as Record<BratsClassName, MeanStd>,
    };
  }
  return summary;
}
