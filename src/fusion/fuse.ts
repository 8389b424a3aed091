// Label fusion baselines in native code (native/fusion/): the soft mean, the
// majority vote, binary STAPLE (Warfield et al. 2004), multi-label STAPLE
// (Rohlfing et al. 2004, ITK conventions) and spatial STAPLE (Asman & Landman
// 2012). One image or volume per call; raters may be absent (null) and pixels
// unlabelled (255).
import { UNLABELLED } from '../data/annotators';
import { loadNative } from '../native';

export type FusionMethod = 'mean' | 'mode' | 'staple' | 'multi-staple' | 'spatial-staple';

export interface FuseOptions {
  method: FusionMethod;
  /** Classes L (labels 0..L-1; 255 = unlabelled). Default 2. */
  classes?: number;
  /** Spatial shape [H, W] or [D, H, W] (C order); spatial STAPLE needs it (the other methods see a flat list of voxels). */
  shape?: number[];
  /** Label for ties (mode, STAPLE posteriors: binary STAPLE's W = 0.5 too); -1 (default) = the lowest tied class (background for binary STAPLE). Not for mean. */
  undecided?: number;
  /** EM stops when no estimated parameter moves by more (default 1e-5). */
  threshold?: number;
  maxIterations?: number;
  /** Binary STAPLE: the foreground prior; multi-label: the class prior [L]. Default: from the labels. */
  prior?: number | number[];
  /**
   * Binary STAPLE: the label treated as foreground, every other label (255 aside) background.
   * Default 1, and required when classes > 2 so that multi-label maps do not silently lose
   * their other classes. Only method 'staple' takes it.
   */
  foreground?: number;
  /** Spatial STAPLE: window edge and stride in pixels, and the weight of the whole-image CM. */
  window?: number;
  stride?: number;
  priorWeight?: number;
}

export interface FuseResult {
  method: FusionMethod;
  /** Consensus label map [V] (all methods but mean). */
  labels?: Uint8Array;
  /** mean: the soft label [L, V]. */
  probs?: Float32Array;
  /** STAPLE: foreground posterior [V]; multi-label / spatial: [L, V]. */
  posterior?: Float32Array;
  /** Binary STAPLE: each rater's sensitivity and specificity. */
  sensitivity?: Float64Array;
  specificity?: Float64Array;
  /** Multi-label / spatial STAPLE: each rater's CM [R, L, L], A[i][j] = p(rater says i | true j). */
  cms?: Float64Array;
  /** Spatial STAPLE: local CMs [R, cells, L, L] on `grid` cells. */
  localCms?: Float32Array;
  grid?: number[];
  prior?: number | Float64Array;
  iterations?: number;
  converged?: boolean;
}

/** An invalid-argument error like the engine's (same code), for checks made here. */
function invalid(message: string): Error {
  return Object.assign(new Error(message), { code: 'CMSEG_INVALID_ARGUMENT' });
}

/**
 * Which of METHOD_OPTIONS each method reads. The engine refuses a prior or foreground that
 * a method does not read, but ignored these without a word ({method: 'mode', window: 5}
 * ran as if window were not there): they are refused alike.
 */
const READS: Record<FusionMethod, readonly (keyof FuseOptions)[]> = {
  mean: [],
  mode: ['undecided'],
  staple: ['undecided', 'threshold', 'maxIterations'],
  'multi-staple': ['undecided', 'threshold', 'maxIterations'],
  'spatial-staple': ['undecided', 'threshold', 'maxIterations', 'window', 'stride', 'priorWeight'],
};
const METHOD_OPTIONS: readonly (keyof FuseOptions)[] = ['undecided', 'threshold', 'maxIterations', 'window', 'stride', 'priorWeight'];

function checkMethodOptions(options: FuseOptions): void {
  const method = options?.method;
  if (typeof method !== 'string' || !Object.prototype.hasOwnProperty.call(READS, method)) return; // the engine names it
  const reads = READS[method];
  for (const key of METHOD_OPTIONS) {
    if (options[key] === undefined || reads.includes(key)) continue;
    const readers = (Object.keys(READS) as FusionMethod[]).filter((m) => READS[m].includes(key));
    throw invalid(`fuse options.${key} is for method ${readers.map((m) => `'${m}'`).join(', ')}; '${options.method}' does not read it`);
  }
}

/**
 * Binary STAPLE's ties: the engine labels a voxel foreground where its posterior W > 0.5,
 * so W = 0.5 (e.g. two raters who disagree and are estimated alike) went to background
 * whatever `undecided` said, unlike every other method. Such voxels get `undecided` here;
 * the tie is read from the float32 posterior the caller sees (W within float32 rounding of 0.5).
 */
function stapleTies(result: FuseResult, undecided: number): FuseResult {
  const { labels, posterior } = result;
  if (!labels || !posterior) return result;
  for (let v = 0; v < labels.length; v++) if (labels[v] !== UNLABELLED && posterior[v] === 0.5) labels[v] = undecided;
  return result;
}

/** Fuses the raters' maps (one Uint8Array [V] each, null when a rater is absent). */
export function fuse(maps: (Uint8Array | null)[], options: FuseOptions): Promise<FuseResult> {
  const native = loadNative() as unknown as { fuse(maps: (Uint8Array | null)[], o: FuseOptions): Promise<FuseResult> };
  try {
    checkMethodOptions(options);
    const undecided = options?.undecided;
    // The engine checks `undecided` only for the methods that used it before binary STAPLE did.
    if (options?.method === 'staple' && undecided !== undefined && !(Number.isInteger(undecided) && undecided >= -1 && undecided <= 255)) {
      throw invalid(`staple: undecided = ${undecided}, expected -1 (lowest tied class) or a label 0..255`);
    }
    const result = native.fuse(maps, options);
    return options.method === 'staple' && undecided !== undefined && undecided >= 0 ? result.then((r) => stapleTies(r, undecided)) : result;
  } catch (e) {
    return Promise.reject(e);
  }
}

/** The fusions behind the naive-staple and naive-spatial-staple training targets. */
export type StapleFusion = 'multi-staple' | 'spatial-staple';

/**
 * fuse() options of a STAPLE training target over an image or volume of `shape` (for a
 * stack of images, `imageAxes` are one image's axes). Spatial STAPLE gets cells of up to
 * 8 voxels per axis (at most a quarter of the shortest image axis, so that even a small
 * image has a grid of local CMs) and windows of 3 cells per axis. One rule for every data
 * set: MNIST stacks and BraTS volumes are fused alike, and the options are recorded with
 * every fused map of the cache, so a change here makes the cache fuse again.
 */
export function stapleFuseOptions(fusion: StapleFusion, classes: number, shape: readonly number[], imageAxes: readonly number[] = shape): FuseOptions & Record<string, unknown> {
  if (fusion !== 'multi-staple' && fusion !== 'spatial-staple') throw new RangeError(`fusion ${JSON.stringify(fusion)} must be 'multi-staple' or 'spatial-staple'`);
  if (fusion === 'multi-staple') return { method: fusion, classes };
  // The cell size follows the image axes only: a stack of images ([N, H, W]) is cut like one image.
  const stride = Math.max(1, Math.min(8, ...imageAxes.map((s) => Math.floor(s / 4))));
  return { method: fusion, classes, shape: [...shape], stride, window: 3 * stride };
}
