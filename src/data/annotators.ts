// Synthetic annotators of SPEC section 7 (paper section 3.1): noisy label maps made from
// the expert consensus, so that the true confusion matrix of every annotator is known and
// the model's estimate can be scored (SPEC section 6).
//
// Every annotator is a pure function of (consensus volume, extent, spec, rng); the rng
// of image n and annotator r is forked from the seed by (r, n) alone, so the label map of
// one image does not depend on which other images were simulated with it.

import { Rng } from './random';
import {
  type Extent,
  checkExtent,
  countForeground,
  dilateLabels,
  erodeLabels,
  skeletonize2d,
  squaredDistanceToBackground,
  voxelCount,
} from './morphology';

/** Label value of an unlabelled pixel (SPEC section 1); absent annotators are filled with it. */
export const UNLABELLED = 255;

/** SPEC section 7 defaults. */
export const ANNOTATOR_DEFAULTS = {
  rOver2d: 2,
  rOver3d: 1,
  rUnder: 1,
  numFractures: 3,
  /** Thickness of a 2D break, measured along the skeleton's tangent. */
  fractureThickness2d: 1.5,
  /**
   * Thickness of a 3D slab. 2 rather than 1.5: one 26-connected step moves up to sqrt(3)
   * along the slab normal, so only a slab thicker than sqrt(3) always cuts the lesion.
   */
  fractureThickness3d: 2,
  /** BraTS in our 0..3 labels (label 4 mapped to 3): 1 -> 3, 2 -> 1, 3 -> 2. */
  bratsPermutation: [0, 3, 1, 2] as readonly number[],
} as const;

export type AnnotatorKind = 'good' | 'over' | 'under' | 'fracture' | 'wrong';

interface NamedSpec {
  /** Shown in reports; defaults to the kind (with an index if a kind repeats). */
  name?: string;
}
export interface GoodSpec extends NamedSpec {
  kind: 'good';
}
export interface OverSpec extends NamedSpec {
  kind: 'over';
  /** Dilation radius; default 2 px in 2D, 1 voxel in 3D. */
  rOver?: number;
}
export interface UnderSpec extends NamedSpec {
  kind: 'under';
  /** Erosion radius; default 1. */
  rUnder?: number;
}
export interface FractureSpec extends NamedSpec {
  kind: 'fracture';
  /** Number of breaks; default 3. */
  numFractures?: number;
  /** Break thickness; default 1.5 px in 2D, 2 voxels in 3D. */
  thickness?: number;
}
export interface WrongSpec extends NamedSpec {
  kind: 'wrong';
  /** permutation[c] is the label given to true class c; permutation[0] must be 0. */
  permutation?: readonly number[];
}
export type AnnotatorSpec = GoodSpec | OverSpec | UnderSpec | FractureSpec | WrongSpec;

function isForeground(label: number): boolean {
  return label !== 0 && label !== UNLABELLED;
}

/** `good`: the consensus itself. */
export function goodAnnotator(consensus: Uint8Array): Uint8Array {
  return Uint8Array.from(consensus);
}

/** `over`: every foreground class dilated by a disk/ball of radius rOver. */
export function overSegmentAnnotator(consensus: Uint8Array, extent: Extent, spec: OverSpec): Uint8Array {
  const radius = spec.rOver ?? (extent.d > 1 ? ANNOTATOR_DEFAULTS.rOver3d : ANNOTATOR_DEFAULTS.rOver2d);
  return dilateLabels(consensus, extent, radius);
}

/** `under`: every foreground class eroded by a disk/ball of radius rUnder. */
export function underSegmentAnnotator(consensus: Uint8Array, extent: Extent, spec: UnderSpec): Uint8Array {
  return erodeLabels(consensus, extent, spec.rUnder ?? ANNOTATOR_DEFAULTS.rUnder);
}

/**
 * The default `wrong` permutation: every foreground class c is called c - 1, class 1 is
 * called L - 1. For L = 4 this is the BraTS mapping 1 -> 3, 2 -> 1, 3 -> 2.
 */
export function defaultPermutation(classes: number): number[] {
  if (!Number.isInteger(classes) || classes < 3) {
    throw new RangeError(
      `the 'wrong' annotator permutes foreground classes and needs classes >= 3, got ${classes}`,
    );
  }
  const permutation = [0];
  for (let c = 1; c < classes; c++) permutation.push(c === 1 ? classes - 1 : c - 1);
  return permutation;
}

export function checkPermutation(permutation: readonly number[], classes: number): void {
  if (permutation.length !== classes) {
    throw new RangeError(`permutation [${permutation.join(', ')}] has ${permutation.length} entries, classes = ${classes}`);
  }
  if (permutation[0] !== 0) {
    throw new RangeError(`permutation [${permutation.join(', ')}] must keep background: permutation[0] = ${permutation[0]}`);
  }
  const used = new Set<number>();
  for (const target of permutation) {
    if (!Number.isInteger(target) || target < 0 || target >= classes || used.has(target)) {
      throw new RangeError(`permutation [${permutation.join(', ')}] is not a permutation of 0..${classes - 1}`);
    }
    used.add(target);
  }
}

/** `wrong`: foreground classes relabelled by a permutation; 255 stays unlabelled. */
export function wrongClassAnnotator(consensus: Uint8Array, classes: number, spec: WrongSpec): Uint8Array {
  const permutation = spec.permutation ?? defaultPermutation(classes);
  checkPermutation(permutation, classes);
  const out = new Uint8Array(consensus.length);
  for (let i = 0; i < consensus.length; i++) {
    const label = consensus[i];
    if (label === UNLABELLED) {
      out[i] = UNLABELLED;
      continue;
    }
    if (label >= classes) throw new RangeError(`consensus: label ${label} at index ${i} >= classes (${classes})`);
    out[i] = permutation[label];
  }
  return out;
}

/**
 * `fracture` (Morpho-MNIST style): `numFractures` breaks in the foreground. In 2D each
 * break is a band of width `thickness` perpendicular to the stroke's skeleton; in 3D it is
 * a slab of that thickness through the lesion with a random orientation. Cut voxels
 * become background. Fewer breaks are made when the shape has too few places to cut.
 */
export function fractureAnnotator(consensus: Uint8Array, extent: Extent, spec: FractureSpec, rng: Rng): Uint8Array {
  const numFractures = spec.numFractures ?? ANNOTATOR_DEFAULTS.numFractures;
  if (!Number.isInteger(numFractures) || numFractures < 0) {
    throw new RangeError(`numFractures ${numFractures} must be an integer >= 0`);
  }
  const threeD = extent.d > 1;
  const thickness = spec.thickness ??
    (threeD ? ANNOTATOR_DEFAULTS.fractureThickness3d : ANNOTATOR_DEFAULTS.fractureThickness2d);
  if (!(thickness > 0)) throw new RangeError(`fracture thickness ${thickness} must be > 0`);
  const out = Uint8Array.from(consensus);
  const foreground = new Uint8Array(consensus.length);
  for (let i = 0; i < consensus.length; i++) foreground[i] = isForeground(consensus[i]) ? 1 : 0;
  let left = countForeground(foreground);
  if (numFractures === 0 || left === 0) return out;
  // 3D cuts are planned one at a time (a large numFractures holds no list of them); cutting
  // draws nothing from `rng`, so the result is that of planning them all first. Once the
  // foreground is gone the remaining cuts could change nothing.
  const cuts = threeD
    ? slabCuts(foreground, extent, numFractures, rng)
    : skeletonCuts(foreground, extent, numFractures, rng);
  for (const cut of cuts) {
    left -= cutBand(out, extent, cut, thickness / 2);
    if (left === 0) break;
  }
  return out;
}

/** A planned break: a centre voxel, the unit normal of the band, and how far it may reach. */
interface Cut {
  centre: [number, number, number]; // z, y, x
  normal: [number, number, number];
  /** Largest distance from the centre within the band's plane; Infinity = whole lesion. */
  reach: number;
}

const MIN_CUT_SPACING = 4; // px between 2D break centres, so that three breaks stay distinct

/** Break centres on the skeleton, each with the skeleton's local direction as the band normal. */
function skeletonCuts(foreground: Uint8Array, extent: Extent, count: number, rng: Rng): Cut[] {
  const { h, w } = extent;
  const skeleton = skeletonize2d(foreground, extent);
  const distance2 = squaredDistanceToBackground(foreground, extent);
  const skeletonPoints: number[] = [];
  const strokeInterior: number[] = [];
  for (let i = 0; i < skeleton.length; i++) {
    if (!skeleton[i]) continue;
    skeletonPoints.push(i);
    // Exactly two skeleton neighbours: inside a stroke, neither an end nor a junction.
    if (skeletonNeighbours(skeleton, h, w, i) === 2) strokeInterior.push(i);
  }
  const candidates = rng.shuffle(strokeInterior.length > 0 ? strokeInterior : skeletonPoints);
  const cuts: Cut[] = [];
  for (const i of candidates) {
    if (cuts.length === count) break;
    const y = Math.floor(i / w);
    const x = i % w;
    const tooClose = cuts.some((c) => Math.hypot(c.centre[1] - y, c.centre[2] - x) < MIN_CUT_SPACING);
    if (tooClose) continue;
    const [ty, tx] = skeletonDirection(skeletonPoints, w, y, x);
    // The band may reach a little past twice the local half-thickness: enough to cross
    // the stroke at any angle, short enough not to wander into a neighbouring stroke.
    const reach = 2 * Math.sqrt(distance2[i]) + 1;
    cuts.push({ centre: [0, y, x], normal: [0, ty, tx], reach });
  }
  return cuts;
}

function skeletonNeighbours(skeleton: Uint8Array, h: number, w: number, i: number): number {
  const y = Math.floor(i / w);
  const x = i % w;
  let count = 0;
  for (let dy = -1; dy <= 1; dy++) {
    for (let dx = -1; dx <= 1; dx++) {
      if ((dy || dx) && y + dy >= 0 && y + dy < h && x + dx >= 0 && x + dx < w) {
        count += skeleton[(y + dy) * w + x + dx];
      }
    }
  }
  return count;
}

const TANGENT_RADIUS = 3; // px of skeleton around a break centre that define its direction

/** Unit tangent (dy, dx) of the skeleton near (y, x): the principal axis of nearby skeleton points. */
function skeletonDirection(points: readonly number[], w: number, y: number, x: number): [number, number] {
  let syy = 0;
  let sxx = 0;
  let sxy = 0;
  for (const i of points) {
    const dy = Math.floor(i / w) - y;
    const dx = (i % w) - x;
    if (dy * dy + dx * dx > TANGENT_RADIUS * TANGENT_RADIUS) continue;
    syy += dy * dy;
    sxx += dx * dx;
    sxy += dx * dy;
  }
  const angle = 0.5 * Math.atan2(2 * sxy, sxx - syy);
  return [Math.sin(angle), Math.cos(angle)];
}

/** Slab centres at random lesion voxels, with normals uniform on the sphere. */
function* slabCuts(foreground: Uint8Array, extent: Extent, count: number, rng: Rng): Generator<Cut> {
  const { h, w } = extent;
  const voxels: number[] = [];
  for (let i = 0; i < foreground.length; i++) if (foreground[i]) voxels.push(i);
  for (let k = 0; k < count; k++) {
    const i = voxels[rng.int(voxels.length)];
    let normal: [number, number, number];
    let norm: number;
    do {
      normal = [rng.normal(), rng.normal(), rng.normal()];
      norm = Math.hypot(...normal);
    } while (norm < 1e-9);
    yield {
      centre: [Math.floor(i / (h * w)), Math.floor(i / w) % h, i % w],
      normal: [normal[0] / norm, normal[1] / norm, normal[2] / norm],
      reach: Infinity,
    };
  }
}

/**
 * Sets to background the foreground voxels within `halfThickness` of the cut's plane and
 * `reach` of its centre that are connected (8/26) to the centre inside that band: the
 * band crosses the stroke or lesion at the centre but not other parts it happens to meet.
 */
/** Returns how many voxels it set to background. */
function cutBand(labels: Uint8Array, extent: Extent, cut: Cut, halfThickness: number): number {
  const { d, h, w } = extent;
  const [cz, cy, cx] = cut.centre;
  const [nz, ny, nx] = cut.normal;
  const inBand = (z: number, y: number, x: number): boolean => {
    const oz = z - cz;
    const oy = y - cy;
    const ox = x - cx;
    const along = oz * nz + oy * ny + ox * nx;
    if (Math.abs(along) > halfThickness) return false;
    const radial2 = oz * oz + oy * oy + ox * ox - along * along;
    return radial2 <= cut.reach * cut.reach;
  };
  const start = (cz * h + cy) * w + cx;
  if (!isForeground(labels[start])) return 0; // an earlier break already removed this centre
  const visited = new Set<number>([start]);
  const stack = [start];
  let cleared = 0;
  while (stack.length > 0) {
    const i = stack.pop() as number;
    labels[i] = 0;
    cleared++;
    const x = i % w;
    const y = Math.floor(i / w) % h;
    const z = Math.floor(i / (h * w));
    for (let dz = -1; dz <= 1; dz++) {
      for (let dy = -1; dy <= 1; dy++) {
        for (let dx = -1; dx <= 1; dx++) {
          const zz = z + dz;
          const yy = y + dy;
          const xx = x + dx;
          if (zz < 0 || zz >= d || yy < 0 || yy >= h || xx < 0 || xx >= w) continue;
          const j = (zz * h + yy) * w + xx;
          if (visited.has(j) || !isForeground(labels[j]) || !inBand(zz, yy, xx)) continue;
          visited.add(j);
          stack.push(j);
        }
      }
    }
  }
  return cleared;
}

/** One annotator's label map for one volume. */
export function simulateAnnotator(
  spec: AnnotatorSpec,
  consensus: Uint8Array,
  extent: Extent,
  classes: number,
  rng: Rng,
): Uint8Array {
  switch (spec.kind) {
    case 'good':
      return goodAnnotator(consensus);
    case 'over':
      return overSegmentAnnotator(consensus, extent, spec);
    case 'under':
      return underSegmentAnnotator(consensus, extent, spec);
    case 'fracture':
      return fractureAnnotator(consensus, extent, spec, rng);
    case 'wrong':
      return wrongClassAnnotator(consensus, classes, spec);
    default: {
      const unknown: never = spec;
      throw new RangeError(`unknown annotator kind ${JSON.stringify((unknown as { kind: unknown }).kind)}`);
    }
  }
}

/** Report names: the spec's name, else its kind, numbered when a kind repeats. */
export function annotatorNames(specs: readonly AnnotatorSpec[]): string[] {
  const names = specs.map((spec) => spec.name ?? spec.kind);
  const repeated = (name: string): boolean => names.filter((n) => n === name).length > 1;
  const numbered = names.map((name, r) => (repeated(name) && specs[r].name === undefined ? `${name}${r}` : name));
  const seen = new Set<string>();
  for (const name of numbered) {
    if (seen.has(name)) throw new RangeError(`annotator name ${JSON.stringify(name)} is used twice`);
    seen.add(name);
  }
  return numbered;
}

const ANNOTATOR_KINDS: readonly AnnotatorKind[] = ['good', 'over', 'under', 'fracture', 'wrong'];

/** Checks one annotator spec's kind and settings; errors name the annotator (index and kind). */
export function checkAnnotatorSpec(spec: AnnotatorSpec, index: number, classes: number): void {
  const kind = (spec as { kind?: unknown } | undefined)?.kind;
  const who = `annotator ${index} (${typeof kind === 'string' ? `'${kind}'` : String(kind)})`;
  if (!ANNOTATOR_KINDS.includes(kind as AnnotatorKind)) {
    throw new RangeError(`${who}: unknown annotator kind ${JSON.stringify(kind)}; choose from ${ANNOTATOR_KINDS.join(', ')}`);
  }
  const radius = (name: string, value: unknown): void => {
    if (value !== undefined && !(typeof value === 'number' && Number.isFinite(value) && value >= 0)) {
      throw new RangeError(`${name} ${String(value)} must be a finite number >= 0`);
    }
  };
  try {
    switch (spec.kind) {
      case 'over':
        radius('rOver', spec.rOver);
        break;
      case 'under':
        radius('rUnder', spec.rUnder);
        break;
      case 'fracture': {
        const n = spec.numFractures;
        if (n !== undefined && !(Number.isInteger(n) && n >= 0)) {
          throw new RangeError(`numFractures ${String(n)} must be an integer >= 0`);
        }
        const thickness = spec.thickness;
        if (thickness !== undefined && !(typeof thickness === 'number' && Number.isFinite(thickness) && thickness > 0)) {
          throw new RangeError(`fracture thickness ${String(thickness)} must be a finite number > 0`);
        }
        break;
      }
      case 'wrong':
        checkPermutation(spec.permutation ?? defaultPermutation(classes), classes);
        break;
      default:
        break;
    }
  } catch (error) {
    // Every check above says what is wrong; the annotator it belongs to is added here, once.
    if (error instanceof RangeError) throw new RangeError(`${who}: ${error.message}`);
    throw error;
  }
}

export type LabelMode = 'dense' | 'single';

export interface SimulateOptions {
  seed: number;
  /** `dense`: every annotator labels every image; `single`: one annotator per image (SPEC 7). */
  mode?: LabelMode;
}

export interface SimulatedAnnotations {
  names: string[];
  /** One map per annotator, layout [N, *S]; absent images are filled with 255. */
  labels: Uint8Array[];
  /** present[n * R + r] = 1 when annotator r labelled image n. */
  present: Uint8Array;
  count: number;
  extent: Extent;
  classes: number;
}

export function checkLabels(name: string, labels: Uint8Array, classes: number, allowUnlabelled: boolean): void {
  for (let i = 0; i < labels.length; i++) {
    const label = labels[i];
    if (label >= classes && !(allowUnlabelled && label === UNLABELLED)) {
      throw new RangeError(`${name}: label ${label} at index ${i} >= classes (${classes})`);
    }
  }
}

function checkClasses(classes: number): void {
  if (!Number.isInteger(classes) || classes < 2 || classes > 255) {
    throw new RangeError(`classes ${classes} must be an integer in [2, 255]`);
  }
}

/**
 * Simulates every annotator of `specs` on a batch of consensus maps [N, *S].
 * Single mode picks each image's annotator uniformly with the seed and computes only
 * that annotator's map; the others are absent (present = 0, filled with 255).
 */
export function simulateAnnotators(
  consensus: Uint8Array,
  extent: Extent,
  classes: number,
  specs: readonly AnnotatorSpec[],
  options: SimulateOptions,
): SimulatedAnnotations {
  checkExtent(extent);
  checkClasses(classes);
  const voxels = voxelCount(extent);
  if (consensus.length % voxels !== 0) {
    throw new RangeError(
      `consensus has ${consensus.length} voxels, not a multiple of ${extent.d}x${extent.h}x${extent.w} = ${voxels}`,
    );
  }
  if (specs.length === 0) throw new RangeError('simulateAnnotators needs at least one annotator spec');
  const unlabelled = consensus.indexOf(UNLABELLED);
  if (unlabelled >= 0) {
    // 255 is a label value of its own (SPEC section 1), not just one too large: say so.
    throw new RangeError(
      `consensus: label 255 (unlabelled) at index ${unlabelled}: the consensus that annotators are simulated from must label every voxel`,
    );
  }
  checkLabels('consensus', consensus, classes, false);
  const mode = options.mode ?? 'dense';
  if (mode !== 'dense' && mode !== 'single') throw new RangeError(`mode ${JSON.stringify(mode)} must be 'dense' or 'single'`);
  // Every spec is checked here, before any image: single mode simulates an annotator only
  // on the images it is given (maybe none), and a radius is only used where there is
  // foreground, so a bad spec used to pass or fail depending on the seed and the data.
  specs.forEach((spec, r) => checkAnnotatorSpec(spec, r, classes));
  const names = annotatorNames(specs);
  const count = consensus.length / voxels;
  const annotatorCount = specs.length;
  const root = new Rng(options.seed);
  const streams = specs.map((_, r) => root.fork(`annotator ${r}`));
  const chooser = root.fork('single-mode choice');
  const present = new Uint8Array(count * annotatorCount);
  const labels = specs.map(() => new Uint8Array(consensus.length));
  for (let n = 0; n < count; n++) {
    const chosen = mode === 'single' ? chooser.int(annotatorCount) : -1;
    const volume = consensus.subarray(n * voxels, (n + 1) * voxels);
    for (let r = 0; r < annotatorCount; r++) {
      const target = labels[r].subarray(n * voxels, (n + 1) * voxels);
      if (mode === 'single' && r !== chosen) {
        target.fill(UNLABELLED);
        continue;
      }
      target.set(simulateAnnotator(specs[r], volume, extent, classes, streams[r].fork(n)));
      present[n * annotatorCount + r] = 1;
    }
  }
  return { names, labels, present, count, extent, classes };
}

export interface ConfusionMatrix {
  classes: number;
  /** counts[i * L + j] = #{v: label = i, y = j} over labelled voxels. */
  counts: Float64Array;
  /** matrix[i * L + j] = counts / #{y = j}; NaN in columns j that the consensus never shows. */
  matrix: Float64Array;
}

/**
 * True confusion matrix of one annotator against the consensus (SPEC section 6):
 * T[i][j] = #{v: label = i, y = j} / #{v: y = j}, columns summing to 1. Unlabelled
 * voxels (255, which includes absent images) are left out of both counts.
 */
export function trueConfusionMatrix(labels: Uint8Array, consensus: Uint8Array, classes: number): ConfusionMatrix {
  checkClasses(classes);
  if (labels.length !== consensus.length) {
    throw new RangeError(`labels have ${labels.length} voxels, consensus has ${consensus.length}`);
  }
  const counts = new Float64Array(classes * classes);
  const columnTotals = new Float64Array(classes);
  for (let v = 0; v < labels.length; v++) {
    const label = labels[v];
    const truth = consensus[v];
    // Voxels either side left unlabelled say nothing about the annotator (as the metrics skip them).
    if (label === UNLABELLED || truth === UNLABELLED) continue;
    if (label >= classes) throw new RangeError(`labels: label ${label} at index ${v} >= classes (${classes})`);
    if (truth >= classes) throw new RangeError(`consensus: label ${truth} at index ${v} >= classes (${classes})`);
    counts[label * classes + truth]++;
    columnTotals[truth]++;
  }
  const matrix = new Float64Array(classes * classes);
  for (let i = 0; i < classes; i++) {
    for (let j = 0; j < classes; j++) {
      matrix[i * classes + j] = columnTotals[j] > 0 ? counts[i * classes + j] / columnTotals[j] : NaN;
    }
  }
  return { classes, counts, matrix };
}

/** True confusion matrix of every simulated annotator over the whole batch. */
export function trueConfusionMatrices(simulated: SimulatedAnnotations, consensus: Uint8Array): ConfusionMatrix[] {
  return simulated.labels.map((labels) => trueConfusionMatrix(labels, consensus, simulated.classes));
}
