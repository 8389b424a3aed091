// Evaluation metrics of SPEC section 6 (paper section 3.2), all measured against the
// expert consensus label y.
//
// Conventions shared by every function here:
// - Label maps are Uint8Array [N, *S] in C order; V = prod(S) voxels per image, so the
//   voxel count is inferred as length / N. 255 (UNLABELLED) marks a voxel without a
//   label; such a voxel of the reference map is left out of every count.
// - Any other value >= classes is a caller error, reported with the input's name and
//   the flat index of the offending voxel.
// - "mean +- std" is the population standard deviation (ddof = 0, numpy's default).
//   Per-image values that are undefined (an absent annotator, an image without any
//   labelled voxel) are NaN and are left out of the statistics.
// - A model output that is NaN or Inf (a diverged model) is not a prediction: the figures it
//   enters are NaN for that image (annotator), and a mean over images that includes one is
//   NaN too, with MeanStd.nonFinite saying how many (not the mean over the other images: a
//   model that fails on some images must not score as well as one that does not). The
//   evaluator names them in SegmentationReport.nonFinite.
// - All counting is done in Float64; CMs may be Float32 as the model returns them.
import { UNLABELLED } from '../data/annotators';
import { arrayKind } from '../errors';

export { UNLABELLED };

/** A mean and a population standard deviation over the finite values given. */
export interface MeanStd {
  mean: number;
  std: number;
  /** How many finite values went into mean and std. */
  count: number;
  /**
   * How many values are missing because the model's output behind them was NaN or Inf; when
   * present (> 0), mean and std are NaN: the figure is undefined, not the mean over the rest.
   * Absent when every output was finite.
   */
  nonFinite?: number;
}

/**
 * Mean and population std (ddof = 0) of the finite entries of `values`; NaN/Inf are skipped
 * (deliberately undefined values). `nonFinite[i]` truthy marks values[i] as missing because
 * the model's output was non-finite: then the result is NaN with their count in `nonFinite`.
 */
export function meanStd(values: ArrayLike<number>, nonFinite?: ArrayLike<number | boolean>): MeanStd {
  let bad = 0;
  if (nonFinite !== undefined) for (let i = 0; i < values.length; i++) if (nonFinite[i]) bad++;
  let count = 0;
  let sum = 0;
  for (let i = 0; i < values.length; i++) {
    const x = values[i];
    if (Number.isFinite(x) && !nonFinite?.[i]) {
      sum += x;
      count++;
    }
  }
  if (bad > 0) return { mean: NaN, std: NaN, count, nonFinite: bad };
  if (count === 0) return { mean: NaN, std: NaN, count: 0 };
  const mean = sum / count;
  let squares = 0;
  for (let i = 0; i < values.length; i++) {
    const x = values[i];
    if (Number.isFinite(x)) squares += (x - mean) * (x - mean);
  }
  return { mean, std: Math.sqrt(squares / count), count };
}

// ---------------------------------------------------------------------------------
// Argument checks

function checkClassCount(classes: number): void {
  if (!Number.isInteger(classes) || classes < 2 || classes > 255) {
    throw new RangeError(`classes = ${classes} must be an integer in 2..255`);
  }
}

/** R must be a whole positive count: -1 made argmaxAnnotatorProbs return no map, 1.5 crashed with "Invalid array length". */
function checkAnnotatorCount(annotators: number): void {
  if (!Number.isInteger(annotators) || annotators < 1) throw new RangeError(`annotators = ${annotators} must be a positive integer`);
}

function checkImageCount(n: number): void {
  if (!Number.isInteger(n) || n < 1) throw new RangeError(`n = ${n} must be a positive integer (images)`);
}

/** Voxels per image of a [N, *S] map; throws when the length is not a multiple of n. */
function voxelsPerImage(name: string, map: ArrayLike<number>, n: number): number {
  if (map.length === 0 || map.length % n !== 0) {
    throw new RangeError(`${name} has ${map.length} elements, not a positive multiple of n = ${n} images`);
  }
  return map.length / n;
}

function checkSameLength(name: string, map: ArrayLike<number>, expected: number, reference: string): void {
  if (map.length !== expected) {
    throw new RangeError(`${name} has ${map.length} elements, ${reference} has ${expected}`);
  }
}

// Counts are indexed by the label values: a Float32Array of probabilities (0.7) or an
// Int32Array (-1) would index no count and be silently dropped, so only bytes are taken.
// Every scorer of label maps checks this (src/eval/brats-regions.ts too).
export function checkLabelMap(name: string, map: unknown): void {
  if (!(map instanceof Uint8Array)) {
    throw new TypeError(`${name} is ${arrayKind(map)}: a label map is a Uint8Array (argmaxClasses turns probabilities into one)`);
  }
}

function badLabel(name: string, value: number, index: number, classes: number): RangeError {
  return new RangeError(`${name}: label ${value} at index ${index} >= classes (${classes})`);
}

/**
 * Every value of `map` is a class (< classes) or 255, checked over the whole map before any
 * counting: the counting loops skip a voxel once one map says 255, and an out-of-range label
 * of the other map at that voxel (a raw label map, the wrong class count) went unnoticed.
 */
function checkLabelRange(name: string, map: Uint8Array, classes: number): void {
  for (let v = 0; v < map.length; v++) {
    const x = map[v];
    if (x >= classes && x !== UNLABELLED) throw badLabel(name, x, v, classes);
  }
}

/** Whether any of `values[from..to)` is NaN or +-Inf. */
export function hasNonFinite(values: ArrayLike<number>, from = 0, to = values.length): boolean {
  for (let i = from; i < to; i++) if (!Number.isFinite(values[i])) return true;
  return false;
}

/**
 * One [N, *S] map per annotator, from either an array of R maps or one [R, N, *S]
 * array (then `annotators` must be known). Returns views, not copies.
 */
export function annotatorMaps(name: string, maps: Uint8Array | readonly Uint8Array[], annotators?: number): Uint8Array[] {
  if (maps instanceof Uint8Array) {
    if (annotators === undefined) {
      throw new TypeError(`${name} is one [R, N, *S] array but the annotator count R is unknown: pass an array of maps`);
    }
    if (!Number.isInteger(annotators) || annotators < 1 || maps.length % annotators !== 0) {
      throw new RangeError(`${name} has ${maps.length} elements, not a multiple of ${annotators} annotators`);
    }
    const per = maps.length / annotators;
    return Array.from({ length: annotators }, (_, r) => maps.subarray(r * per, (r + 1) * per));
  }
  if (!Array.isArray(maps) || maps.some((m) => !(m instanceof Uint8Array))) {
    throw new TypeError(`${name} must be a Uint8Array [R, N, *S] or an array of Uint8Array [N, *S]`);
  }
  if (annotators !== undefined && maps.length !== annotators) {
    throw new RangeError(`${name} has ${maps.length} maps, expected ${annotators} annotators`);
  }
  return [...maps];
}

// ---------------------------------------------------------------------------------
// Confusion counts: the one pass every overlap metric is derived from

/**
 * Per-image joint counts of (predicted class, reference class):
 * counts[(n * L + a) * L + b] = #{v in image n: pred = a, truth = b}, [N, L, L].
 * Voxels whose reference label is 255 are left out; any other label >= classes in
 * either map is an error.
 */
export function labelConfusionCounts(
  pred: Uint8Array,
  truth: Uint8Array,
  n: number,
  classes: number,
  names: { pred?: string; truth?: string } = {},
): Float64Array {
  const predName = names.pred ?? 'pred';
  const truthName = names.truth ?? 'truth';
  checkLabelMap(predName, pred);
  checkLabelMap(truthName, truth);
  checkClassCount(classes);
  checkImageCount(n);
  const V = voxelsPerImage(truthName, truth, n);
  checkSameLength(predName, pred, truth.length, truthName);
  checkLabelRange(predName, pred, classes);
  checkLabelRange(truthName, truth, classes);
  return jointCounts(pred, truth, n, V, classes, classes, predName, truthName);
}

/** The counting loop; predicted values may go up to predClasses - 1 (>= L for a "no vote" row). */
function jointCounts(
  pred: Uint8Array,
  truth: Uint8Array,
  n: number,
  V: number,
  K: number,
  L: number,
  predName: string,
  truthName: string,
): Float64Array {
  const counts = new Float64Array(n * K * K);
  for (let img = 0; img < n; img++) {
    const base = img * K * K;
    const end = (img + 1) * V;
    for (let v = img * V; v < end; v++) {
      // The prediction is checked before the reference's 255 skips the voxel.
      const a = pred[v];
      const b = truth[v];
      if (a >= K && !(a === UNLABELLED && b === UNLABELLED)) throw badLabel(predName, a, v, L);
      if (b >= L) {
        if (b === UNLABELLED) continue;
        throw badLabel(truthName, b, v, L);
      }
      counts[base + a * K + b]++;
    }
  }
  return counts;
}

/** Dice of the classes marked in `inRegion`, from one image's [K, K] counts starting at `base`. */
function regionDiceOfImage(counts: Float64Array, base: number, K: number, inRegion: Uint8Array): number {
  let both = 0;
  let predSize = 0;
  let truthSize = 0;
  let labelled = 0;
  for (let a = 0; a < K; a++) {
    for (let b = 0; b < K; b++) {
      const c = counts[base + a * K + b];
      labelled += c;
      if (inRegion[a]) predSize += c;
      if (inRegion[b]) truthSize += c;
      if (inRegion[a] && inRegion[b]) both += c;
    }
  }
  // No labelled reference voxel: nothing to score (NaN, as dicePerClass). Both empty: a
  // perfect (if trivial) agreement, SPEC section 6.
  if (labelled === 0) return NaN;
  return predSize + truthSize === 0 ? 1 : (2 * both) / (predSize + truthSize);
}

function regionMask(region: readonly number[], classes: number): Uint8Array {
  if (region.length === 0) throw new RangeError('a region needs at least one class');
  const mask = new Uint8Array(classes);
  for (const c of region) {
    if (!Number.isInteger(c) || c < 0 || c >= classes) throw new RangeError(`region class ${c} is not in 0..${classes - 1}`);
    mask[c] = 1;
  }
  return mask;
}

// ---------------------------------------------------------------------------------
// Dice

/**
 * Dice of every class in every image, [N, L] (class c of image n at n * L + c):
 * 2|P_c & Y_c| / (|P_c| + |Y_c|), 1 when both are empty. Voxels with truth 255 are ignored.
 */
export function dicePerClass(pred: Uint8Array, truth: Uint8Array, n: number, classes: number): Float64Array {
  return dicePerClassFromCounts(labelConfusionCounts(pred, truth, n, classes), n, classes);
}

/** dicePerClass from [N, K, K] counts (K >= L; rows >= L are predictions of no class). */
export function dicePerClassFromCounts(counts: Float64Array, n: number, classes: number, K = classes): Float64Array {
  const L = classes;
  const dice = new Float64Array(n * L);
  for (let img = 0; img < n; img++) {
    const base = img * K * K;
    // An image whose reference labels no voxel at all (every truth voxel 255) scores
    // nothing: NaN, left out of the statistics like its Total Dice, rather than the
    // "both empty" 1 of each class, which would count it as perfect.
    let labelled = 0;
    for (let k = 0; k < K * K; k++) labelled += counts[base + k];
    for (let c = 0; c < L; c++) {
      let predSize = 0;
      let truthSize = 0;
      for (let k = 0; k < K; k++) {
        predSize += counts[base + c * K + k];
        truthSize += counts[base + k * K + c];
      }
      const both = counts[base + c * K + c];
      dice[img * L + c] = labelled === 0 ? NaN : predSize + truthSize === 0 ? 1 : (2 * both) / (predSize + truthSize);
    }
  }
  return dice;
}

/**
 * Dice of a region (the union of some classes, e.g. BraTS whole tumour = {1, 2, 3}) per
 * image, [N]. A region of one class is that class's Dice.
 */
export function regionDice(pred: Uint8Array, truth: Uint8Array, n: number, classes: number, region: readonly number[]): Float64Array {
  return regionDiceFromCounts(labelConfusionCounts(pred, truth, n, classes), n, classes, region);
}

/** regionDice from the [N, L, L] counts of labelConfusionCounts. */
export function regionDiceFromCounts(counts: Float64Array, n: number, classes: number, region: readonly number[]): Float64Array {
  const mask = regionMask(region, classes);
  const out = new Float64Array(n);
  for (let img = 0; img < n; img++) out[img] = regionDiceOfImage(counts, img * classes * classes, classes, mask);
  return out;
}

/**
 * Total Dice per image (paper eq. 6): 2 * #correct / (2 * #voxels), i.e. the voxel
 * accuracy over every labelled voxel of the reference. NaN for an image with none.
 */
export function totalDice(pred: Uint8Array, truth: Uint8Array, n: number, classes: number): Float64Array {
  return totalDiceFromCounts(labelConfusionCounts(pred, truth, n, classes), n, classes);
}

/** totalDice from [N, K, K] counts (K >= L; rows >= L are misses). */
export function totalDiceFromCounts(counts: Float64Array, n: number, classes: number, K = classes): Float64Array {
  const out = new Float64Array(n);
  for (let img = 0; img < n; img++) {
    const base = img * K * K;
    let correct = 0;
    let all = 0;
    for (let k = 0; k < K * K; k++) all += counts[base + k];
    for (let c = 0; c < classes; c++) correct += counts[base + c * K + c];
    out[img] = all === 0 ? NaN : (2 * correct) / (2 * all);
  }
  return out;
}

/** Per-image mean of the non-background classes' Dice from [N, L] Dice; for L = 2 the foreground Dice. */
export function averageDicePerImage(dice: Float64Array, n: number, classes: number): Float64Array {
  const out = new Float64Array(n);
  for (let img = 0; img < n; img++) {
    let sum = 0;
    for (let c = 1; c < classes; c++) sum += dice[img * classes + c];
    out[img] = sum / (classes - 1);
  }
  return out;
}

/** Dice figures of one label map against the consensus, summarised over images. */
export interface DiceSummary {
  /** mean +- std over images of each class's Dice, indexed by class (0 = background). */
  perClass: MeanStd[];
  /** Mean over the non-background classes per image, then mean +- std (binary: foreground Dice). */
  average: MeanStd;
  /** Total Dice (paper eq. 6) per image, then mean +- std. */
  total: MeanStd;
  /** [N, L] per-image per-class Dice. */
  perImage: Float64Array;
  /** [N] per-image Total Dice. */
  totalPerImage: Float64Array;
}

/** Every Dice figure of `pred` against `truth` (both [N, *S]); 255 in truth is ignored. */
export function diceSummary(pred: Uint8Array, truth: Uint8Array, n: number, classes: number): DiceSummary {
  return diceSummaryFromCounts(labelConfusionCounts(pred, truth, n, classes), n, classes);
}

function perClassStats(perImage: Float64Array, n: number, classes: number): MeanStd[] {
  const out: MeanStd[] = [];
  const column = new Float64Array(n);
  for (let c = 0; c < classes; c++) {
    for (let img = 0; img < n; img++) column[img] = perImage[img * classes + c];
    out.push(meanStd(column));
  }
  return out;
}

function diceSummaryFromCounts(counts: Float64Array, n: number, classes: number, K = classes): DiceSummary {
  const perImage = dicePerClassFromCounts(counts, n, classes, K);
  const totalPerImage = totalDiceFromCounts(counts, n, classes, K);
  return {
    perClass: perClassStats(perImage, n, classes),
    average: meanStd(averageDicePerImage(perImage, n, classes)),
    total: meanStd(totalPerImage),
    perImage,
    totalPerImage,
  };
}

/**
 * Dice of a fused label map (majority vote, STAPLE, a thresholded mean label, ...) against
 * the consensus: how good the training target of a `naive` baseline is. The arithmetic is
 * diceSummary's; the name says what is scored. The fused map may hold 255 where a fusion
 * had no vote: such a voxel is predicted as no class (a miss for Dice and Total Dice).
 */
export function fusedLabelDice(fused: Uint8Array, truth: Uint8Array, n: number, classes: number): DiceSummary {
  // meanLabels' soft Float32Array is the easy slip: its 0.5s would drop out of the counts.
  checkLabelMap('fused', fused);
  checkLabelMap('truth', truth);
  checkClassCount(classes);
  checkImageCount(n);
  const V = voxelsPerImage('truth', truth, n);
  checkSameLength('fused', fused, truth.length, 'truth');
  // "No vote" becomes an extra prediction row L that matches no reference class.
  const K = classes + 1;
  let source = fused;
  for (let v = 0; v < fused.length; v++) {
    if (fused[v] >= classes && fused[v] !== UNLABELLED) throw badLabel('fused', fused[v], v, classes);
  }
  if (fused.includes(UNLABELLED)) source = fused.map((x) => (x === UNLABELLED ? classes : x));
  const counts = jointCounts(source, truth, n, V, K, classes, 'fused', 'truth');
  return diceSummaryFromCounts(counts, n, classes, K);
}

// ---------------------------------------------------------------------------------
// Confusion-matrix estimation (SPEC section 6)

/** True and estimated CM of one annotator on one image (row i = annotator's label, column j = true class). */
export interface ImageConfusionMatrices {
  /** T[i * L + j] = #{v: label_r = i, y = j} / #{v: y = j}; NaN in columns absent from y. */
  trueMatrix: Float64Array;
  /** E[i * L + j] = mean over {v: y = j} of A_r(v)[i][j]; NaN in columns absent from y. */
  estimatedMatrix: Float64Array;
  /** #{v: y = j} over the voxels used (labelled by both y and the annotator). */
  columnCounts: Float64Array;
  /** The sums behind T and E: #{v: label = i, y = j} and the sum of A(v)[i][j] over {v: y = j}. */
  labelCounts: Float64Array;
  estimatedSums: Float64Array;
}

/**
 * T and E of annotator r on image n. `cms` is the model's [N, R, L, L, *S] output
 * (A[i][j] at channel i * L + j). Voxels where y or the annotator's label is 255 are
 * left out of both matrices, so T and E are measured on the same voxels. T matches
 * trueConfusionMatrix of src/data/annotators.ts restricted to that image.
 */
export function imageConfusionMatrices(
  cms: Float32Array | Float64Array,
  truth: Uint8Array,
  labels: Uint8Array,
  image: number,
  annotator: number,
  shape: { n: number; annotators: number; classes: number },
): ImageConfusionMatrices {
  const { n, annotators: R, classes: L } = shape;
  checkLabelMap('truth', truth);
  checkLabelMap('labels', labels);
  checkClassCount(L);
  checkImageCount(n);
  const V = voxelsPerImage('truth', truth, n);
  checkSameLength('labels', labels, truth.length, 'truth');
  checkSameLength('cms', cms, n * R * L * L * V, `[N, R, L, L, V] = [${n}, ${R}, ${L}, ${L}, ${V}]`);
  if (!Number.isInteger(image) || image < 0 || image >= n) throw new RangeError(`image ${image} is not in 0..${n - 1}`);
  if (!Number.isInteger(annotator) || annotator < 0 || annotator >= R) throw new RangeError(`annotator ${annotator} is not in 0..${R - 1}`);
  const counts = new Float64Array(L * L);
  const columnCounts = new Float64Array(L);
  const sums = new Float64Array(L * L);
  const cmBase = (image * R + annotator) * L * L * V;
  for (let v = 0; v < V; v++) {
    const flat = image * V + v;
    const y = truth[flat];
    const label = labels[flat];
    // Both checked before either's 255 skips the voxel.
    if (y >= L && y !== UNLABELLED) throw badLabel('truth', y, flat, L);
    if (label >= L && label !== UNLABELLED) throw badLabel(`annotatorLabels[${annotator}]`, label, flat, L);
    if (y === UNLABELLED || label === UNLABELLED) continue;
    counts[label * L + y]++;
    columnCounts[y]++;
    // Column y of A_r(v): entries (i, y) at channel i * L + y.
    for (let i = 0; i < L; i++) sums[i * L + y] += cms[cmBase + (i * L + y) * V + v];
  }
  const trueMatrix = new Float64Array(L * L);
  const estimatedMatrix = new Float64Array(L * L);
  for (let i = 0; i < L; i++) {
    for (let j = 0; j < L; j++) {
      const total = columnCounts[j];
      trueMatrix[i * L + j] = total > 0 ? counts[i * L + j] / total : NaN;
      estimatedMatrix[i * L + j] = total > 0 ? sums[i * L + j] / total : NaN;
    }
  }
  return { trueMatrix, estimatedMatrix, columnCounts, labelCounts: counts, estimatedSums: sums };
}

export interface CmEstimationInput {
  /** The model's CMs, [N, R, L, L, *S], A[i][j] at channel i * L + j. */
  cms: Float32Array | Float64Array;
  /** The expert consensus y, [N, *S]. */
  truth: Uint8Array;
  /** Observed annotator labels: R maps [N, *S] or one [R, N, *S]. */
  annotatorLabels: Uint8Array | readonly Uint8Array[];
  /** [N, R]: 0 where annotator r did not label image n (that pair is skipped). Default: all present. */
  present?: Uint8Array;
  n: number;
  classes: number;
}

export interface CmEstimationResult {
  annotators: number;
  /** [N, R]: RMSE between E and T over the entries of the columns present in y; NaN where skipped. */
  errorPerImage: Float64Array;
  /** [N, R]: mean absolute error between E and T over the same entries; NaN where skipped. */
  absoluteErrorPerImage: Float64Array;
  /** mean +- std over images of the RMSE, for each annotator. */
  errorPerAnnotator: MeanStd[];
  /** SPEC figure: the per-annotator mean and std above, each averaged over annotators. */
  error: MeanStd;
  /** Incompetence score per annotator: the mean over its images of the absolute error. */
  incompetence: number[];
  /** Per annotator, pooled over every voxel scored (all images): the sums behind T and E. */
  pooled: PooledConfusion[];
  /**
   * The scored pairs (annotator present) whose estimated CM holds NaN or Inf at some voxel of
   * the image: their error is NaN, and so are the means that include them (MeanStd.nonFinite).
   */
  nonFinite: { image: number; annotator: number }[];
}

/** An annotator's CMs pooled over many images: T = labelCounts / columnCounts, E = estimatedSums / columnCounts. */
export interface PooledConfusion {
  /** [L * L]: #{v: label = i, y = j} at i * L + j. */
  labelCounts: Float64Array;
  /** [L * L]: sum over {v: y = j} of A(v)[i][j] at i * L + j. */
  estimatedSums: Float64Array;
  /** [L]: #{v: y = j}. */
  columnCounts: Float64Array;
}

function emptyPooled(L: number): PooledConfusion {
  return { labelCounts: new Float64Array(L * L), estimatedSums: new Float64Array(L * L), columnCounts: new Float64Array(L) };
}

/** Adds `from` into `into` (same L). */
function addPooled(into: PooledConfusion, from: PooledConfusion): void {
  for (let k = 0; k < into.labelCounts.length; k++) {
    into.labelCounts[k] += from.labelCounts[k];
    into.estimatedSums[k] += from.estimatedSums[k];
  }
  for (let j = 0; j < into.columnCounts.length; j++) into.columnCounts[j] += from.columnCounts[j];
}

/**
 * CM estimation error of SPEC section 6, per image and annotator. An image an annotator
 * did not label (present = 0) or where it labelled no voxel gives NaN and is left out.
 * A scored pair whose CM holds NaN or Inf gives NaN too, but is not left out: it is listed
 * in `nonFinite`, and the means over it are NaN (MeanStd.nonFinite counts such pairs).
 */
export function cmEstimationError(input: CmEstimationInput): CmEstimationResult {
  const { cms, truth, n, classes: L } = input;
  checkLabelMap('truth', truth);
  checkClassCount(L);
  checkImageCount(n);
  const V = voxelsPerImage('truth', truth, n);
  if (!(cms instanceof Float32Array || cms instanceof Float64Array)) throw new TypeError('cms must be a Float32Array [N, R, L, L, *S]');
  if (cms.length % (n * L * L * V) !== 0 || cms.length === 0) {
    throw new RangeError(`cms has ${cms.length} elements, not a multiple of N*L*L*V = ${n}*${L}*${L}*${V}`);
  }
  const R = cms.length / (n * L * L * V);
  const maps = annotatorMaps('annotatorLabels', input.annotatorLabels, R);
  maps.forEach((m, r) => checkSameLength(`annotatorLabels[${r}]`, m, truth.length, 'truth'));
  const present = input.present;
  if (present !== undefined) checkSameLength('present', present, n * R, `N*R = ${n}*${R}`);
  // Every map whole, absent pairs' too: a pair's own pass skips voxels the other map leaves out.
  checkLabelRange('truth', truth, L);
  maps.forEach((m, r) => checkLabelRange(`annotatorLabels[${r}]`, m, L));
  const errorPerImage = new Float64Array(n * R).fill(NaN);
  const absoluteErrorPerImage = new Float64Array(n * R).fill(NaN);
  const bad = new Uint8Array(n * R);
  const nonFinite: { image: number; annotator: number }[] = [];
  const pooled = Array.from({ length: R }, () => emptyPooled(L));
  const cmSize = L * L * V;
  for (let img = 0; img < n; img++) {
    for (let r = 0; r < R; r++) {
      if (present !== undefined && present[img * R + r] === 0) continue;
      // A NaN gave a NaN error, an Inf an Infinite one: both were then dropped from the means
      // like a deliberate skip, and the CM error was that of the images the model got through.
      // The pooled E takes them in (so it shows as non-finite too, not as the other images' E).
      const m = imageConfusionMatrices(cms, truth, maps[r], img, r, { n, annotators: R, classes: L });
      addPooled(pooled[r], m);
      const start = (img * R + r) * cmSize;
      if (hasNonFinite(cms, start, start + cmSize)) {
        bad[img * R + r] = 1;
        nonFinite.push({ image: img, annotator: r });
        continue;
      }
      let entries = 0;
      let squares = 0;
      let absolute = 0;
      for (let j = 0; j < L; j++) {
        if (m.columnCounts[j] === 0) continue;
        for (let i = 0; i < L; i++) {
          const diff = m.estimatedMatrix[i * L + j] - m.trueMatrix[i * L + j];
          squares += diff * diff;
          absolute += Math.abs(diff);
          entries++;
        }
      }
      if (entries === 0) continue;
      errorPerImage[img * R + r] = Math.sqrt(squares / entries);
      absoluteErrorPerImage[img * R + r] = absolute / entries;
    }
  }
  const { perAnnotator: errorPerAnnotator, overall: error, incompetence } = summariseCmErrors(errorPerImage, absoluteErrorPerImage, bad, n, R);
  return { annotators: R, errorPerImage, absoluteErrorPerImage, errorPerAnnotator, error, incompetence, pooled, nonFinite };
}

/**
 * The CM error's summaries from [N, R] per-image values and non-finite flags: per annotator
 * mean +- std, the SPEC figure (those means and stds averaged over annotators) and the
 * incompetence. An annotator with a non-finite CM makes the figure NaN: averaged over the
 * other annotators, it was the CM error of the ones the model did not fail on.
 */
function summariseCmErrors(
  errors: ArrayLike<number>,
  absolute: ArrayLike<number>,
  bad: ArrayLike<number>,
  n: number,
  R: number,
): { perAnnotator: MeanStd[]; overall: MeanStd; incompetence: number[] } {
  const perAnnotator: MeanStd[] = [];
  const incompetence: number[] = [];
  const column = new Float64Array(n);
  const flags = new Uint8Array(n);
  for (let r = 0; r < R; r++) {
    for (let img = 0; img < n; img++) flags[img] = bad[img * R + r];
    for (let img = 0; img < n; img++) column[img] = errors[img * R + r];
    perAnnotator.push(meanStd(column, flags));
    for (let img = 0; img < n; img++) column[img] = absolute[img * R + r];
    incompetence.push(meanStd(column, flags).mean);
  }
  const means = meanStd(perAnnotator.map((s) => s.mean));
  const stds = meanStd(perAnnotator.map((s) => s.std));
  const nonFinite = perAnnotator.reduce((sum, s) => sum + (s.nonFinite ?? 0), 0);
  const overall: MeanStd = nonFinite > 0 ? { mean: NaN, std: NaN, count: means.count, nonFinite } : { mean: means.mean, std: stds.mean, count: means.count };
  return { perAnnotator, overall, incompetence };
}

/**
 * Estimated reliability of each annotator (SPEC section 6): the mean over every voxel of
 * every image of trace(A_r(v)) / L. It needs no labels, so absent annotators are scored
 * too (the model predicts a CM for everyone everywhere). `cms` is [N, R, L, L, *S].
 * NaN for an annotator whose CM diagonal holds NaN or Inf anywhere (a diverged model).
 */
export function estimatedReliability(cms: Float32Array | Float64Array, n: number, annotators: number, classes: number): number[] {
  checkImageCount(n);
  checkClassCount(classes);
  checkAnnotatorCount(annotators);
  const L = classes;
  const R = annotators;
  if (cms.length === 0 || cms.length % (n * R * L * L) !== 0) {
    throw new RangeError(`cms has ${cms.length} elements, not a multiple of N*R*L*L = ${n}*${R}*${L}*${L}`);
  }
  const V = cms.length / (n * R * L * L);
  const sums = reliabilitySums(cms, n, R, L, V);
  return sums.map((s) => s / (n * V * L));
}

/** Sum over voxels of trace(A_r(v)) for each annotator (not yet divided). */
function reliabilitySums(cms: Float32Array | Float64Array, n: number, R: number, L: number, V: number): number[] {
  const sums = new Array<number>(R).fill(0);
  for (let img = 0; img < n; img++) {
    for (let r = 0; r < R; r++) {
      let s = 0;
      for (let i = 0; i < L; i++) {
        const base = ((img * R + r) * L * L + i * L + i) * V;
        for (let v = 0; v < V; v++) s += cms[base + v];
      }
      // An Inf (or NaN) CM entry has no trace: NaN, not an "infinitely reliable" annotator.
      sums[r] += Number.isFinite(s) ? s : NaN;
    }
  }
  return sums;
}

// ---------------------------------------------------------------------------------
// Generalised energy distance (Kohl et al. 2018)

/**
 * How d = 1 - IoU treats more than two classes:
 * - 'per-class' (default): IoU of each foreground class c >= 1 that appears in either map,
 *   averaged over those classes; a class swap (the `wrong` annotator) is a full miss.
 * - 'foreground': IoU of the masks label > 0; class identities inside the foreground are
 *   ignored.
 * For binary tasks both are the foreground IoU. When no foreground class appears in
 * either map, d = 0 (two empty masks agree).
 */
export type IouMode = 'per-class' | 'foreground';

/** Anything else (a misspelt 'Foreground') was scored as 'per-class' without a word. */
function checkIouMode(mode: unknown): void {
  if (mode !== 'per-class' && mode !== 'foreground') throw new RangeError(`GED mode '${String(mode)}' is not 'per-class' or 'foreground'`);
}

/**
 * d(a, b) = 1 - IoU between two label maps of one image (same length). Voxels that are
 * 255 in either map are ignored.
 */
export function iouDistance(a: Uint8Array, b: Uint8Array, classes: number, mode: IouMode = 'per-class'): number {
  checkLabelMap('a', a);
  checkLabelMap('b', b);
  checkClassCount(classes);
  checkIouMode(mode);
  checkSameLength('b', b, a.length, 'a');
  const L = classes;
  const joint = new Float64Array(L * L);
  for (let v = 0; v < a.length; v++) {
    const x = a[v];
    const y = b[v];
    // Both checked before either's 255 skips the voxel.
    if (x >= L && x !== UNLABELLED) throw badLabel('a', x, v, L);
    if (y >= L && y !== UNLABELLED) throw badLabel('b', y, v, L);
    if (x === UNLABELLED || y === UNLABELLED) continue;
    joint[x * L + y]++;
  }
  return distanceFromJoint(joint, L, mode);
}

function distanceFromJoint(joint: Float64Array, L: number, mode: IouMode): number {
  if (mode === 'foreground') {
    let both = 0;
    let either = 0;
    for (let x = 0; x < L; x++) {
      for (let y = 0; y < L; y++) {
        const c = joint[x * L + y];
        if (x > 0 && y > 0) both += c;
        if (x > 0 || y > 0) either += c;
      }
    }
    return either === 0 ? 0 : 1 - both / either;
  }
  let iouSum = 0;
  let present = 0;
  for (let c = 1; c < L; c++) {
    let inA = 0;
    let inB = 0;
    for (let k = 0; k < L; k++) {
      inA += joint[c * L + k];
      inB += joint[k * L + c];
    }
    const both = joint[c * L + c];
    const union = inA + inB - both;
    if (union === 0) continue;
    iouSum += both / union;
    present++;
  }
  return present === 0 ? 0 : 1 - iouSum / present;
}

export interface GedInput {
  /** The model's annotator predictions S (argmax q_r): an array of maps [N, *S], or one [R, N, *S]. */
  samples: Uint8Array | readonly Uint8Array[];
  /** The observed annotations Y: an array of maps [N, *S], or one [R, N, *S]. */
  observed: Uint8Array | readonly Uint8Array[];
  /** [N, R_Y]: only the annotations present for an image enter its Y. Default: all present. */
  present?: Uint8Array;
  /** R of an input given as one [R, N, *S] array (otherwise read off present, or the other input). */
  annotators?: number;
  n: number;
  classes: number;
  mode?: IouMode;
}

export interface GedResult {
  /** [N] GED per image; NaN for an image without any present annotation (or no voxel all of them label). */
  perImage: Float64Array;
  /** mean +- std over images. */
  ged: MeanStd;
}

/**
 * Generalised energy distance per image, GED = 2 E[d(S, Y)] - E[d(S, S')] - E[d(Y, Y')],
 * d = 1 - IoU (see IouMode). Expectations are over all ordered pairs of the empirical sets,
 * the pairs of a map with itself included (d = 0), as in Kohl et al.'s evaluation: then
 * GED >= 0, and it is 0 when the two sets are equal. S holds every annotator's predicted
 * map (the model's whole distribution); Y only the annotations present for that image. Every
 * d of an image is taken over the voxels that all of its present annotations label (all of
 * them with dense labels); an image with none is NaN.
 * Unlike the authors' code (all three terms added, with Dice: their issue #6).
 */
export function generalisedEnergyDistance(input: GedInput): GedResult {
  const { n, classes: L } = input;
  const mode = input.mode ?? 'per-class';
  checkIouMode(mode);
  checkClassCount(L);
  checkImageCount(n);
  const packedCount =
    input.annotators ??
    (input.present !== undefined ? input.present.length / n : undefined) ??
    (Array.isArray(input.samples) ? input.samples.length : Array.isArray(input.observed) ? input.observed.length : undefined);
  const samples = annotatorMaps('samples', input.samples, input.samples instanceof Uint8Array ? packedCount : undefined);
  const observed = annotatorMaps('observed', input.observed, input.observed instanceof Uint8Array ? packedCount : undefined);
  if (samples.length === 0) throw new RangeError('samples: at least one predicted map is needed');
  const V = voxelsPerImage('samples[0]', samples[0], n);
  samples.forEach((m, i) => checkSameLength(`samples[${i}]`, m, n * V, 'samples[0]'));
  observed.forEach((m, i) => checkSameLength(`observed[${i}]`, m, n * V, 'samples[0]'));
  // Whole maps, up front: the distances look only at the voxels every present annotation labels.
  samples.forEach((m, i) => checkLabelRange(`samples[${i}]`, m, L));
  observed.forEach((m, i) => checkLabelRange(`observed[${i}]`, m, L));
  const Ry = observed.length;
  if (input.present !== undefined) checkSameLength('present', input.present, n * Ry, `N*R = ${n}*${Ry}`);
  const joint = new Float64Array(L * L);
  // The voxels of the image every present annotation labels: all three terms are taken over
  // them. Pairs that each skipped their own 255s compared S with S on more voxels than S with
  // Y, and GED went negative (S = {10, 00}, Y = {·0}: -0.5), which a distance cannot be.
  const scored = new Uint8Array(V);
  const distance = (a: Uint8Array, b: Uint8Array, offset: number, aName: string, bName: string): number => {
    joint.fill(0);
    for (let v = offset; v < offset + V; v++) {
      if (!scored[v - offset]) continue;
      const x = a[v];
      const y = b[v];
      if (x === UNLABELLED || y === UNLABELLED) continue;
      if (x >= L) throw badLabel(aName, x, v, L);
      if (y >= L) throw badLabel(bName, y, v, L);
      joint[x * L + y]++;
    }
    return distanceFromJoint(joint, L, mode);
  };
  const perImage = new Float64Array(n);
  for (let img = 0; img < n; img++) {
    const offset = img * V;
    const ys: number[] = [];
    for (let r = 0; r < Ry; r++) if (input.present === undefined || input.present[img * Ry + r] !== 0) ys.push(r);
    scored.fill(1);
    for (const r of ys) for (let v = 0; v < V; v++) if (observed[r][offset + v] === UNLABELLED) scored[v] = 0;
    // No annotation present, or no voxel that all of them label: nothing to compare.
    if (ys.length === 0 || !scored.includes(1)) {
      perImage[img] = NaN;
      continue;
    }
    const m = samples.length;
    const k = ys.length;
    let sy = 0;
    for (let s = 0; s < m; s++) for (const r of ys) sy += distance(samples[s], observed[r], offset, `samples[${s}]`, `observed[${r}]`);
    let ss = 0;
    for (let s = 0; s < m; s++) for (let t = s + 1; t < m; t++) ss += 2 * distance(samples[s], samples[t], offset, `samples[${s}]`, `samples[${t}]`);
    let yy = 0;
    for (let a = 0; a < k; a++)
      for (let b = a + 1; b < k; b++) yy += 2 * distance(observed[ys[a]], observed[ys[b]], offset, `observed[${ys[a]}]`, `observed[${ys[b]}]`);
    perImage[img] = (2 * sy) / (m * k) - ss / (m * m) - yy / (k * k);
  }
  return { perImage, ged: meanStd(perImage) };
}

// ---------------------------------------------------------------------------------
// From model outputs to label maps

/**
 * argmax over classes of the annotator distributions q_r ([N, R, L, *S], as returned by
 * model.predict with annotatorProbs): one label map [N, *S] per annotator, i.e. the
 * model's estimate of each annotator's segmentation (SPEC section 5). Ties go to the
 * lower class.
 */
export function argmaxAnnotatorProbs(q: Float32Array | Float64Array, n: number, annotators: number, classes: number): Uint8Array[] {
  checkImageCount(n);
  checkClassCount(classes);
  checkAnnotatorCount(annotators);
  const R = annotators;
  const L = classes;
  if (q.length === 0 || q.length % (n * R * L) !== 0) {
    throw new RangeError(`annotatorProbs has ${q.length} elements, not a multiple of N*R*L = ${n}*${R}*${L}`);
  }
  const V = q.length / (n * R * L);
  const maps = Array.from({ length: R }, () => new Uint8Array(n * V));
  for (let img = 0; img < n; img++) {
    for (let r = 0; r < R; r++) {
      const base = (img * R + r) * L * V;
      const out = maps[r];
      for (let v = 0; v < V; v++) {
        let best = 0;
        let bestP = q[base + v];
        for (let c = 1; c < L; c++) {
          const p = q[base + c * V + v];
          if (p > bestP) {
            bestP = p;
            best = c;
          }
        }
        out[img * V + v] = best;
      }
    }
  }
  return maps;
}

// ---------------------------------------------------------------------------------
// One call for a trainer: every figure of SPEC section 6 that the inputs allow

export interface EvaluationInput {
  /** The consensus prediction argmax p, [N, *S]. */
  pred: Uint8Array;
  /** The expert consensus y, [N, *S] (255 = not scored). */
  truth: Uint8Array;
  n: number;
  classes: number;
  /** The model's CMs [N, R, L, L, *S]: enables reliability, and with annotatorLabels the CM error. */
  cms?: Float32Array;
  /** Observed annotator labels (R maps [N, *S] or one [R, N, *S]): CM error and GED. */
  annotatorLabels?: Uint8Array | readonly Uint8Array[];
  /** [N, R] presence mask of annotatorLabels. */
  present?: Uint8Array;
  /** The model's annotator predictions argmax q_r (R maps or [R, N, *S]): with annotatorLabels, GED. */
  annotatorPreds?: Uint8Array | readonly Uint8Array[];
  /** Annotator count R when it cannot be read off the inputs (only [R, N, *S] arrays given). */
  annotators?: number;
  /** How GED's IoU treats several classes; default 'per-class'. */
  gedMode?: IouMode;
  /**
   * The consensus probabilities p [N, L, *S] that `pred` is the argmax of: an image where one
   * is NaN or Inf has no prediction (argmax of NaN is class 0), so its Dice figures are NaN and
   * it is named in the report's nonFinite. Without it, `pred` is taken as it is.
   */
  probs?: Float32Array | Float64Array;
  /** The annotator distributions q_r [N, R, L, *S] behind `annotatorPreds`: likewise for GED. */
  annotatorProbs?: Float32Array | Float64Array;
}

/** Where the model's output held NaN or Inf (image indices in the order added to the evaluator). */
export interface NonFiniteOutputs {
  /** Images whose consensus probabilities did: no Dice, and left out of classConfusion. */
  consensus: number[];
  /** Image-annotator pairs whose CMs did: no CM error for the pair, no reliability for the annotator. */
  cms: { image: number; annotator: number }[];
  /** Images whose annotator distributions did: no GED. */
  annotatorProbs: number[];
}

export interface SegmentationReport {
  images: number;
  classes: number;
  /** mean +- std over images of each class's Dice, index = class (0 = background). */
  dicePerClass: MeanStd[];
  /** Mean over non-background classes (binary: the foreground Dice). */
  averageDice: MeanStd;
  /** Paper eq. 6: voxel accuracy. */
  totalDice: MeanStd;
  /** RMSE between estimated and true CMs, mean +- std over images averaged over annotators. */
  cmError?: MeanStd;
  cmErrorPerAnnotator?: MeanStd[];
  /** Per annotator: mean absolute error between E and T. */
  incompetence?: number[];
  /** Per annotator: mean of trace(A_r) / L over every voxel. */
  reliability?: number[];
  /**
   * Per annotator, pooled over every voxel scored for the CM error: the true CM T and the
   * estimated E of SPEC section 6, [i][j] = p(says i | true j); null in columns of classes
   * absent from the reference.
   */
  annotatorCms?: { trueMatrix: (number | null)[][]; estimatedMatrix: (number | null)[][] }[];
  /** Generalised energy distance, mean +- std over images. */
  ged?: MeanStd;
  /**
   * Present only when some model output was NaN or Inf (a diverged model): where. The
   * figures those outputs enter are NaN, each MeanStd saying how many values it misses.
   */
  nonFinite?: NonFiniteOutputs;
  /**
   * The consensus prediction against the reference over every scored voxel:
   * classConfusion[a][b] = #{v: predicted a, reference b} (reference 255 left out). Column b
   * over its sum is how the reference's class b was predicted: a swapped pair of classes shows.
   */
  classConfusion: number[][];
  /** Per-image values, for plots and significance tests. */
  perImage: {
    /** [N, L] */
    dice: Float64Array;
    /** [N] */
    totalDice: Float64Array;
    /** [N, R], NaN where skipped */
    cmError?: Float64Array;
    /** [N] */
    ged?: Float64Array;
  };
}

function annotatorCountOf(input: EvaluationInput, V: number): number | undefined {
  if (input.annotators !== undefined) return input.annotators;
  for (const maps of [input.annotatorLabels, input.annotatorPreds]) if (Array.isArray(maps)) return maps.length;
  const { n, classes: L } = input;
  if (input.cms) return input.cms.length / (n * L * L * V);
  if (input.present) return input.present.length / n;
  return undefined;
}

/**
 * Every SPEC section 6 figure the inputs allow, in one call: Dice always; reliability with
 * `cms`; CM error and incompetence with `cms` and `annotatorLabels`; GED with
 * `annotatorPreds` and `annotatorLabels`. Inputs are checked before any work. Give `probs`
 * (and `annotatorProbs`) too, so that an image whose model output is NaN or Inf is scored
 * NaN and named in `nonFinite` rather than scored by the argmax of NaN.
 */
export function evaluateSegmentation(input: EvaluationInput): SegmentationReport {
  const evaluator = new SegmentationEvaluator(input.classes, { gedMode: input.gedMode });
  evaluator.add(input);
  return evaluator.report();
}

/** T and E of pooled sums as [i][j] rows (null in columns with no voxel). */
function pooledMatrices(p: PooledConfusion, L: number): { trueMatrix: (number | null)[][]; estimatedMatrix: (number | null)[][] } {
  const matrix = (sums: Float64Array) =>
    Array.from({ length: L }, (_, i) => Array.from({ length: L }, (_, j) => (p.columnCounts[j] > 0 ? sums[i * L + j] / p.columnCounts[j] : null)));
  return { trueMatrix: matrix(p.labelCounts), estimatedMatrix: matrix(p.estimatedSums) };
}

/**
 * Accumulates per-image figures over several calls (e.g. one full volume at a time from
 * slidingWindowPredict, whose CMs would not fit in memory for a whole test set) and
 * summarises them at the end. evaluateSegmentation is one add() and report().
 */
export class SegmentationEvaluator {
  readonly classes: number;
  private readonly gedMode: IouMode;
  private images = 0;
  private dice: number[] = [];
  private total: number[] = [];
  /** Per image (and per image and annotator for the CMs): 1 where the model's output was non-finite. */
  private diceBad: number[] = [];
  private cmBad: number[][] = [];
  private gedBad: number[] = [];
  private nonFinite: NonFiniteOutputs = { consensus: [], cms: [], annotatorProbs: [] };
  private cmError: number[][] = [];
  private cmAbsolute: number[][] = [];
  private cmPooled: PooledConfusion[] = [];
  private ged: number[] = [];
  private reliabilitySum: number[] = [];
  private reliabilityVoxels = 0;
  private confusion: Float64Array;
  private annotators: number | undefined;
  private sawCms = false;
  private sawCmError = false;
  private sawGed = false;

  constructor(classes: number, options: { gedMode?: IouMode } = {}) {
    checkClassCount(classes);
    this.classes = classes;
    this.gedMode = options.gedMode ?? 'per-class';
    // Said at once, not at the first batch with annotator predictions.
    checkIouMode(this.gedMode);
    this.confusion = new Float64Array(classes * classes);
  }

  /** Scores a batch of n images; its `classes` (and `gedMode`, if given) must be the evaluator's. */
  add(input: EvaluationInput): void {
    const { pred, truth, n } = input;
    const L = this.classes;
    if (input.classes !== L) throw new RangeError(`input.classes = ${input.classes}, the evaluator scores ${L} classes`);
    if (input.gedMode !== undefined && input.gedMode !== this.gedMode) {
      throw new RangeError(`input.gedMode = '${input.gedMode}', the evaluator uses '${this.gedMode}'`);
    }
    checkImageCount(n);
    const V = voxelsPerImage('truth', truth, n);
    checkSameLength('pred', pred, truth.length, 'truth');
    const R = annotatorCountOf(input, V);
    if (R !== undefined) {
      if (!Number.isInteger(R) || R < 1) throw new RangeError(`cannot read the annotator count off the inputs (got ${R})`);
      if (this.annotators !== undefined && this.annotators !== R) {
        throw new RangeError(`this batch has ${R} annotators, earlier batches had ${this.annotators}`);
      }
    }
    if (input.cms && input.cms.length !== n * (R ?? 0) * L * L * V) {
      throw new RangeError(`cms has ${input.cms.length} elements, [N, R, L, L, *S] needs ${n}*${R}*${L}*${L}*${V}`);
    }
    if (input.probs) checkSameLength('probs', input.probs, n * L * V, `[N, L, *S] = [${n}, ${L}, ${V}]`);
    if (input.annotatorProbs) {
      if (R === undefined) throw new RangeError('annotatorProbs is given but the annotator count R is unknown: pass annotators');
      checkSameLength('annotatorProbs', input.annotatorProbs, n * R * L * V, `[N, R, L, *S] = [${n}, ${R}, ${L}, ${V}]`);
    }
    const counts = labelConfusionCounts(pred, truth, n, L);
    // Images whose p (q_r) holds NaN or Inf: their pred (annotatorPreds) is the argmax of
    // garbage, which picks class 0 and scored as a prediction of background.
    const imageBad = (probs: Float32Array | Float64Array | undefined) =>
      Array.from({ length: n }, (_, img) => (probs !== undefined && hasNonFinite(probs, (img * probs.length) / n, ((img + 1) * probs.length) / n) ? 1 : 0));
    const predBad = imageBad(input.probs);
    const qBad = imageBad(input.annotatorProbs);
    // Every image-annotator pair's CM, absent annotators' too (reliability scores them all).
    const cmsBad: { image: number; annotator: number }[] = [];
    if (input.cms && R !== undefined) {
      const size = L * L * V;
      for (let img = 0; img < n; img++) for (let r = 0; r < R; r++) if (hasNonFinite(input.cms, (img * R + r) * size, (img * R + r + 1) * size)) cmsBad.push({ image: img, annotator: r });
    }
    let cm: CmEstimationResult | undefined;
    if (input.cms && input.annotatorLabels) {
      cm = cmEstimationError({ cms: input.cms, truth, annotatorLabels: input.annotatorLabels, present: input.present, n, classes: L });
    }
    let ged: GedResult | undefined;
    if (input.annotatorPreds && input.annotatorLabels) {
      ged = generalisedEnergyDistance({
        samples: annotatorMaps('annotatorPreds', input.annotatorPreds, R),
        observed: annotatorMaps('annotatorLabels', input.annotatorLabels, R),
        present: input.present,
        n,
        classes: L,
        mode: this.gedMode,
      });
    }
    // Everything checked and computed: only now change the accumulated state.
    if (R !== undefined) this.annotators = R;
    const dice = dicePerClassFromCounts(counts, n, L);
    const total = totalDiceFromCounts(counts, n, L);
    for (let img = 0; img < n; img++) {
      const bad = predBad[img];
      for (let c = 0; c < L; c++) this.dice.push(bad ? NaN : dice[img * L + c]);
      this.total.push(bad ? NaN : total[img]);
      this.diceBad.push(bad);
      if (bad) {
        this.nonFinite.consensus.push(this.images + img);
        continue;
      }
      // The confusion table counts the images with a prediction only.
      for (let k = 0; k < L * L; k++) this.confusion[k] += counts[img * L * L + k];
    }
    for (const { image, annotator } of cmsBad) this.nonFinite.cms.push({ image: this.images + image, annotator });
    if (input.cms && R !== undefined) {
      const sums = reliabilitySums(input.cms, n, R, L, V);
      // reliabilitySums gives NaN for an annotator with a non-finite CM: it stays NaN.
      if (this.reliabilitySum.length === 0) this.reliabilitySum = new Array<number>(R).fill(0);
      sums.forEach((s, r) => (this.reliabilitySum[r] += s));
      this.reliabilityVoxels += n * V;
      this.sawCms = true;
    }
    if (cm) {
      if (this.cmError.length === 0) {
        this.cmError = Array.from({ length: cm.annotators }, () => []);
        this.cmAbsolute = Array.from({ length: cm.annotators }, () => []);
        this.cmBad = Array.from({ length: cm.annotators }, () => []);
        this.cmPooled = Array.from({ length: cm.annotators }, () => emptyPooled(L));
      }
      cm.pooled.forEach((p, r) => addPooled(this.cmPooled[r], p));
      const pairBad = new Uint8Array(n * cm.annotators);
      for (const { image, annotator } of cm.nonFinite) pairBad[image * cm.annotators + annotator] = 1;
      for (let img = 0; img < n; img++) {
        for (let r = 0; r < cm.annotators; r++) {
          this.cmError[r].push(cm.errorPerImage[img * cm.annotators + r]);
          this.cmAbsolute[r].push(cm.absoluteErrorPerImage[img * cm.annotators + r]);
          this.cmBad[r].push(pairBad[img * cm.annotators + r]);
        }
      }
      this.sawCmError = true;
    }
    if (ged) {
      ged.perImage.forEach((x, img) => {
        this.ged.push(qBad[img] ? NaN : x);
        this.gedBad.push(qBad[img]);
        if (qBad[img]) this.nonFinite.annotatorProbs.push(this.images + img);
      });
      this.sawGed = true;
    }
    this.images += n;
  }

  /** Summary over every image added so far. */
  report(): SegmentationReport {
    const L = this.classes;
    const n = this.images;
    if (n === 0) throw new RangeError('no images were added to the evaluator');
    const dice = Float64Array.from(this.dice);
    const totalPerImage = Float64Array.from(this.total);
    const perClass: MeanStd[] = [];
    const column = new Float64Array(n);
    for (let c = 0; c < L; c++) {
      for (let img = 0; img < n; img++) column[img] = dice[img * L + c];
      perClass.push(meanStd(column, this.diceBad));
    }
    const report: SegmentationReport = {
      images: n,
      classes: L,
      dicePerClass: perClass,
      averageDice: meanStd(averageDicePerImage(dice, n, L), this.diceBad),
      totalDice: meanStd(totalPerImage, this.diceBad),
      classConfusion: Array.from({ length: L }, (_, a) => Array.from(this.confusion.subarray(a * L, (a + 1) * L))),
      perImage: { dice, totalDice: totalPerImage },
    };
    if (this.sawCms) {
      // An annotator with a non-finite CM anywhere (off its diagonal too) has no reliability.
      const bad = new Set(this.nonFinite.cms.map((p) => p.annotator));
      report.reliability = this.reliabilitySum.map((s, r) => (bad.has(r) ? NaN : s / (this.reliabilityVoxels * L)));
    }
    if (this.sawCmError && this.cmError.length === this.annotators) {
      const R = this.cmError.length;
      // Only batches with both cms and labels contributed; per-image values cover those images.
      const images = this.cmError[0].length;
      const perImage = new Float64Array(images * R);
      for (let r = 0; r < R; r++) for (let img = 0; img < images; img++) perImage[img * R + r] = this.cmError[r][img];
      const absolute = new Float64Array(images * R);
      const bad = new Uint8Array(images * R);
      for (let r = 0; r < R; r++) {
        for (let img = 0; img < images; img++) {
          absolute[img * R + r] = this.cmAbsolute[r][img];
          bad[img * R + r] = this.cmBad[r][img];
        }
      }
      const { perAnnotator, overall, incompetence } = summariseCmErrors(perImage, absolute, bad, images, R);
      report.cmError = overall;
      report.cmErrorPerAnnotator = perAnnotator;
      report.incompetence = incompetence;
      report.annotatorCms = this.cmPooled.map((p) => pooledMatrices(p, L));
      report.perImage.cmError = perImage;
    }
    if (this.sawGed) {
      const perImage = Float64Array.from(this.ged);
      report.ged = meanStd(perImage, this.gedBad);
      report.perImage.ged = perImage;
    }
    const { consensus, cms, annotatorProbs } = this.nonFinite;
    if (consensus.length + cms.length + annotatorProbs.length > 0) {
      report.nonFinite = { consensus: [...consensus], cms: cms.map((p) => ({ ...p })), annotatorProbs: [...annotatorProbs] };
    }
    return report;
  }
}
