// Scoring a model on an in-memory split with the SPEC section 6 metrics (src/eval/metrics.ts):
// consensus Dice per class, Average and Total Dice, and, where the annotators' labels are
// known, the CM estimation error, incompetence, reliability and GED. Also the Dice of the
// naive fused label maps themselves (paper tables' "Mean labels" / "Mode labels" rows).

import { meanLabelsHard, modeLabels } from '../fusion/simple';
import {
  argmaxAnnotatorProbs,
  fusedLabelDice,
  MeanStd,
  SegmentationEvaluator,
  SegmentationReport,
} from '../eval/metrics';
import { argmaxClasses, Model } from '../model/model';
import type { AnnotatedSet } from './data';
import { gatherBatch, voxelsOf } from './data';

/** A SegmentationReport without the per-image arrays: what logs and JSON files hold. */
export interface EvaluationSummary {
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
