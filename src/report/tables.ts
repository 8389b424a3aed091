// Evaluation results as text for the terminal: the metric tables of src/eval/report.ts
// plus the Dice of the naive fused label maps (paper tables' "Mean labels" / "Mode labels").

import type { BratsDiceReport } from '../eval/brats-regions';
import type { SegmentationReport } from '../eval/metrics';
import { formatBratsReport, formatMeanStd, formatSegmentationReport, markdownTable } from '../eval/report';
import type { EvaluationSummary, FusedLabelRows } from '../train/evaluate';

export interface EvaluationTextOptions {
  /** Class names, index = label; default "class c". */
  classNames?: readonly string[];
}

export function evaluationText(summary: EvaluationSummary, fused?: FusedLabelRows, options: EvaluationTextOptions = {}): string {
  // formatSegmentationReport reads the summary figures only, never the per-image arrays.
  const report = summary as unknown as SegmentationReport;
  // Names with '|' are escaped by markdownTable, as every table's cells.
  let text = formatSegmentationReport(report, { annotatorNames: summary.annotatorNames, classNames: options.classNames }) + '\n';
  if (fused) {
    const rows = [
      ['Mean labels (tie: higher class)', formatMeanStd(fused.mean.averageDice), formatMeanStd(fused.mean.totalDice)],
      ['Mode labels (tie: lower class)', formatMeanStd(fused.mode.averageDice), formatMeanStd(fused.mode.totalDice)],
    ];
    text += '\n' + markdownTable(['fused training labels', 'Average Dice', 'Total Dice'], rows) + '\n';
  }
  return text;
}

/** How a summary's heading says what the consensus figures compare with (nothing for an expert consensus). */
export function referenceNote(summary: EvaluationSummary): string {
  return summary.reference ? `, against the annotators' ${summary.reference} (no expert consensus, so no CM error)` : '';
}

/** The BraTS region table of a summary (empty for other data sets). */
export function bratsText(summary: EvaluationSummary): string {
  if (!summary.brats) return '';
  // formatBratsReport reads the summary figures only, never the per-image arrays.
  const report = { images: summary.images, ...summary.brats } as unknown as BratsDiceReport;
  return '\n' + formatBratsReport(report) + '\n';
}
