// Label fusion baselines in native code (native/fusion/): the soft mean, the
// majority vote, binary STAPLE (Warfield et al. 2004), multi-label STAPLE
// (Rohlfing et al. 2004, ITK conventions) and spatial STAPLE (Asman & Landman
// 2012). One image or volume per call; raters may be absent (null) and pixels
// unlabelled (255).
import { loadNative } from '../native';

export type FusionMethod = 'mean' | 'mode' | 'staple' | 'multi-staple' | 'spatial-staple';

export interface FuseOptions {
  method: FusionMethod;
  /** Classes L (labels 0..L-1; 255 = unlabelled). Default 2. */
  classes?: number;
  /** Spatial shape [H, W] or [D, H, W] (C order); spatial STAPLE needs it (the other methods see a flat list of voxels). */
  shape?: number[];
  /** Label for ties (mode, STAPLE posteriors); -1 (default) = the lowest tied class. */
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

/** Fuses the raters' maps (one Uint8Array [V] each, null when a rater is absent). */
export function fuse(maps: (Uint8Array | null)[], options: FuseOptions): Promise<FuseResult> {
  const native = loadNative() as unknown as { fuse(maps: (Uint8Array | null)[], o: FuseOptions): Promise<FuseResult> };
  try {
    return native.fuse(maps, options);
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
