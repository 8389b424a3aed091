// Markdown tables of evaluation results, in the shape of the paper's tables: one row
// per figure or per annotator, "mean ± std" cells.
import { BratsDiceReport } from './brats-regions';
import { MeanStd, SegmentationReport } from './metrics';

export interface FormatOptions {
  /** Class names, index = label (default "class 0", "class 1", ...). */
  classNames?: readonly string[];
  /** Annotator names, index = r (default "annotator 0", ...). */
  annotatorNames?: readonly string[];
  /** Decimal places, default 4. */
  digits?: number;
  /** What was scored: 'image' or 'volume'; default 'volume' for a summary of whole volumes (one with perCase), else 'image'. */
  unit?: 'image' | 'volume';
}

/** "1 volume", "3 volumes": a count and its noun, plural unless one. */
export function countOf(n: number, unit: string): string {
  return `${n} ${unit}${n === 1 ? '' : 's'}`;
}

/**
 * "0.8123 ± 0.0456"; "0.8123" for a single value; "n/a" when there was nothing to average,
 * "n/a (non-finite: 3)" when the model's output was NaN/Inf on 3.
 */
export function formatMeanStd(value: MeanStd | undefined, digits = 4): string {
  if (value?.nonFinite) return `n/a (non-finite: ${value.nonFinite})`;
  if (value === undefined || value.count === 0 || !Number.isFinite(value.mean)) return 'n/a';
  // A mean that rounds to zero prints as 0, not "-0.0000".
  const fixed = (x: number) => (Math.abs(x) < 0.5 * 10 ** -digits ? 0 : x).toFixed(digits);
  // One value has no spread: "± 0.0000" read as a perfectly consistent figure over many.
  if (value.count === 1) return fixed(value.mean);
  return `${fixed(value.mean)} ± ${Number.isFinite(value.std) ? fixed(value.std) : 'n/a'}`;
}

/**
 * Text as a Markdown table cell: '|' escaped and line breaks made spaces. Names come from the
 * user (an annotator's is its labels/ folder's): "a|b" split its row into one cell more than
 * the header has, shifting every figure after it into the wrong column.
 */
export function tableCell(text: string): string {
  // A backslash just before a '|' is doubled: else in a name "a\|b" the added one would escape it, not the bar.
  return text.replace(/\\(?=\|)/g, '\\\\').replace(/\|/g, '\\|').replace(/[\r\n]+/g, ' ');
}

function formatNumber(value: number | undefined, digits: number): string {
  return value === undefined || !Number.isFinite(value) ? 'n/a' : value.toFixed(digits);
}

/**
 * A markdown table from a header and rows of cells, each column padded to its widest cell
 * so that the table reads as columns in a terminal too (renderers ignore the padding).
 */
export function markdownTable(header: readonly string[], rows: readonly (readonly string[])[]): string {
  const cells = [header, ...rows].map((row) => row.map(tableCell));
  // Code points, not UTF-16 units: a name like "Zoë" or "±" takes one column.
  const width = (text: string) => [...text].length;
  const columns = Math.max(...cells.map((row) => row.length));
  const widths = Array.from({ length: columns }, (_, c) => Math.max(3, ...cells.map((row) => width(row[c] ?? ''))));
  const line = (row: readonly string[]) => `| ${widths.map((w, c) => (row[c] ?? '') + ' '.repeat(w - width(row[c] ?? ''))).join(' | ')} |`;
  return [line(cells[0]), line(widths.map((w) => '-'.repeat(w))), ...cells.slice(1).map(line)].join('\n');
}

/**
 * The CM error as its cell shows it. Its mean and std are the annotators' means and stds over
 * images, averaged, and its count the annotators': with one image each annotator's std is 0 and
 * the cell read "0.3162 ± 0.0000" where every other figure over one volume prints alone. No
 * annotator scored on more than one image: no spread, one value (count 1) as the others.
 */
function cmErrorFigure(report: SegmentationReport): MeanStd | undefined {
  const error = report.cmError;
  const perAnnotator = report.cmErrorPerAnnotator;
  if (error === undefined || perAnnotator === undefined || perAnnotator.some((s) => s.count > 1)) return error;
  return { ...error, count: Math.min(error.count, 1) };
}

/**
 * The figures of a SegmentationReport as markdown: a table of Dice (per class, average,
 * total), GED and CM error, then one of per-annotator CM figures when there are CMs.
 */
export function formatSegmentationReport(report: SegmentationReport, options: FormatOptions = {}): string {
  const digits = options.digits ?? 4;
  const className = (c: number) => options.classNames?.[c] ?? `class ${c}`;
  const rows: string[][] = [];
  for (let c = 1; c < report.classes; c++) rows.push([`Dice ${className(c)}`, formatMeanStd(report.dicePerClass[c], digits)]);
  if (report.classes > 2) rows.push(['Average Dice', formatMeanStd(report.averageDice, digits)]);
  rows.push(['Total Dice', formatMeanStd(report.totalDice, digits)]);
  if (report.ged) rows.push(['GED', formatMeanStd(report.ged, digits)]);
  if (report.cmError) rows.push(['CM estimation error (RMSE)', formatMeanStd(cmErrorFigure(report), digits)]);
  // Summaries of BraTS volumes (EvaluationSummary) come here as reports; their perCase says they count volumes.
  const unit = options.unit ?? ((report as { perCase?: unknown }).perCase !== undefined ? 'volume' : 'image');
  const parts = [countOf(report.images, unit), '', markdownTable(['metric', 'value'], rows)];
  const R = report.reliability?.length ?? report.incompetence?.length ?? 0;
  const annotatorName = (r: number) => options.annotatorNames?.[r] ?? `annotator ${r}`;
  if (report.nonFinite) parts.push('', nonFiniteWarning(report.nonFinite, report, unit, R, annotatorName));
  if (R > 0) {
    // An annotator whose CM was NaN/Inf somewhere: its n/a says why.
    const badCm = new Set(report.nonFinite?.cms.map((p) => p.annotator) ?? []);
    const number = (x: number | undefined, r: number) => (x !== undefined && badCm.has(r) && !Number.isFinite(x) ? 'n/a (non-finite)' : formatNumber(x, digits));
    const annotatorRows = Array.from({ length: R }, (_, r) => [
      annotatorName(r),
      formatMeanStd(report.cmErrorPerAnnotator?.[r], digits),
      number(report.incompetence?.[r], r),
      number(report.reliability?.[r], r),
    ]);
    parts.push('', markdownTable(['annotator', 'CM error', 'incompetence', 'estimated reliability'], annotatorRows));
  }
  if (report.annotatorCms) {
    parts.push('', formatAnnotatorCms(report.annotatorCms, annotatorName, className));
  }
  if (report.classConfusion) parts.push('', formatClassConfusion(report.classConfusion, className));
  return parts.join('\n');
}

/**
 * Where the model's output was NaN or Inf, in a few lines under the table: how many of the
 * images (volumes, image-annotator pairs) and the first few by index (a volume by its id).
 */
function nonFiniteWarning(
  nonFinite: NonNullable<SegmentationReport['nonFinite']>,
  report: SegmentationReport,
  unit: string,
  R: number,
  annotatorName: (r: number) => string,
): string {
  const cases = (report as { perCase?: { id: string }[] }).perCase;
  const item = (i: number) => `${unit} ${cases?.[i]?.id ?? i}`;
  const first = (names: string[]) => names.slice(0, 5).join(', ') + (names.length > 5 ? ', ...' : '');
  const lines = ['Warning: non-finite (NaN or Inf) model output (a diverged model?): the figures it enters are n/a, not means over the other ' + `${unit}s:`];
  const n = report.images;
  if (nonFinite.consensus.length > 0) {
    lines.push(`- consensus probabilities: ${nonFinite.consensus.length} of ${countOf(n, unit)} (${first(nonFinite.consensus.map(item))}): no Dice, left out of the confusion table`);
  }
  if (nonFinite.cms.length > 0) {
    const pairs = nonFinite.cms.map((p) => `${item(p.image)}: ${annotatorName(p.annotator)}`);
    lines.push(`- annotator CMs: ${nonFinite.cms.length} of ${n * Math.max(R, 1)} ${unit}-annotator pairs (${first(pairs)}): no CM error, incompetence or reliability`);
  }
  if (nonFinite.annotatorProbs.length > 0) {
    lines.push(`- annotator distributions: ${nonFinite.annotatorProbs.length} of ${countOf(n, unit)} (${first(nonFinite.annotatorProbs.map(item))}): no GED`);
  }
  return lines.join('\n');
}

/**
 * Each annotator's CM over every scored voxel, p(says row | true column) in %: the model's
 * estimate E with the true T in brackets, the matrices whose difference the CM error scores.
 */
export function formatAnnotatorCms(
  cms: NonNullable<SegmentationReport['annotatorCms']>,
  annotatorName: (r: number) => string,
  className: (c: number) => string,
): string {
  // null: a class absent from the reference; NaN or Inf (null in JSON too): the model's CM was.
  const percent = (x: number | null) => (x === null ? 'n/a' : Number.isFinite(x) ? (100 * x).toFixed(1) : 'non-finite');
  const tables = cms.map(({ trueMatrix, estimatedMatrix }, r) => {
    const L = trueMatrix.length;
    // An annotator who labelled none of the scored voxels (one label per image, none in this
    // split) has no column to compare: one line says so instead of a table of n/a.
    if (trueMatrix.every((row) => row.every((x) => x === null))) return `${annotatorName(r)}: labelled none of the scored voxels, no CM to compare`;
    const rows = Array.from({ length: L }, (_, i) => [
      `says ${className(i)}`,
      ...Array.from({ length: L }, (_, j) => (trueMatrix[i][j] === null ? 'n/a' : `${percent(estimatedMatrix[i][j])} (${percent(trueMatrix[i][j])})`)),
    ]);
    return markdownTable([`${annotatorName(r)}: estimated (true) %`, ...Array.from({ length: L }, (_, j) => `true ${className(j)}`)], rows);
  });
  return ['Annotator CMs over the scored voxels, p(says row | true column): the estimate, the true value in brackets.', ...tables].join('\n\n');
}

/**
 * The consensus prediction against the reference as % of each reference class's voxels:
 * column b says how class b was predicted (its diagonal cell is the class's recall), so a
 * class learnt as another shows at once, where its Dice alone only says it was missed.
 */
export function formatClassConfusion(confusion: readonly (readonly number[])[], className: (c: number) => string): string {
  const L = confusion.length;
  const columnSums = Array.from({ length: L }, (_, b) => confusion.reduce((sum, row) => sum + row[b], 0));
  const cell = (a: number, b: number) => (columnSums[b] > 0 ? `${((100 * confusion[a][b]) / columnSums[b]).toFixed(1)}%` : 'n/a');
  const rows = Array.from({ length: L }, (_, a) => [`predicted ${className(a)}`, ...Array.from({ length: L }, (_, b) => cell(a, b))]);
  rows.push(['voxels', ...columnSums.map((n) => String(n))]);
  const table = markdownTable(['consensus vs reference (% of column)', ...Array.from({ length: L }, (_, b) => className(b))], rows);
  const notes = classesLearntAsOthers(confusion).map(
    ({ reference, predicted, share, recall }) =>
      `Note: ${className(reference)} was predicted as ${className(predicted)} in ${(100 * share).toFixed(1)}% of its voxels (as itself in ${(100 * recall).toFixed(1)}%): the model may have learnt one class as the other.`,
  );
  return [table, ...notes].join('\n');
}

/** A reference class that the consensus mostly predicts as another foreground class. */
export interface ClassLearntAsOther {
  reference: number;
  predicted: number;
  /** Of the reference class's voxels, the share predicted as `predicted`, and as itself. */
  share: number;
  recall: number;
}

/**
 * The foreground classes of the reference of which most voxels (over half) were predicted as
 * one other foreground class: the swap that CM methods can fall into (the CMs then explain
 * the annotators' labels of class b by the prediction a). Predicted as background is a miss,
 * which Dice already shows, not a swap.
 */
export function classesLearntAsOthers(confusion: readonly (readonly number[])[]): ClassLearntAsOther[] {
  const L = confusion.length;
  const found: ClassLearntAsOther[] = [];
  for (let b = 1; b < L; b++) {
    const total = confusion.reduce((sum, row) => sum + row[b], 0);
    if (total === 0) continue;
    for (let a = 1; a < L; a++) {
      if (a !== b && confusion[a][b] / total > 0.5) found.push({ reference: b, predicted: a, share: confusion[a][b] / total, recall: confusion[b][b] / total });
    }
  }
  return found;
}

/** BraTS region and class Dice as one markdown table. */
export function formatBratsReport(report: BratsDiceReport, digits = 4): string {
  const rows = [
    ['whole tumour (1, 2, 3)', formatMeanStd(report.regions.wholeTumour, digits)],
    ['tumour core (1, 3)', formatMeanStd(report.regions.tumourCore, digits)],
    ['enhancing tumour (3)', formatMeanStd(report.regions.enhancingTumour, digits)],
    // Class 1 is BraTS's necrotic / non-enhancing core (NCR/NET), or BraTS-PEDs 2024's NET + CC.
    ['necrotic / non-enhancing core (1)', formatMeanStd(report.classes.necrosis, digits)],
    ['edema (2)', formatMeanStd(report.classes.edema, digits)],
    ['enhancing (3)', formatMeanStd(report.classes.enhancing, digits)],
  ];
  const lines = [countOf(report.images, 'volume'), '', markdownTable(['Dice', 'value'], rows)];
  if (report.hd95) {
    const h = report.hd95;
    const defined = (m: MeanStd) => (m.count === report.images || m.nonFinite ? formatMeanStd(m, 2) : `${formatMeanStd(m, 2)} (${m.count} of ${report.images} volumes)`);
    lines.push(
      '',
      markdownTable(
        ['HD95 (mm)', 'value'],
        [
          ['whole tumour', defined(h.wholeTumour)],
          ['tumour core', defined(h.tumourCore)],
          ['enhancing tumour', defined(h.enhancingTumour)],
        ],
      ),
      'HD95: the larger of the two 95th-percentile surface distances; left out where exactly one of prediction and truth has the region, or the reference labels no voxel.',
    );
  }
  return lines.join('\n');
}
