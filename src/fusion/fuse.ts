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
  /** Spatial shape [H, W] or [D, H, W]; needed by spatial STAPLE. */
  shape?: number[];
  /** Label for ties (mode, STAPLE posteriors); -1 (default) = the lowest tied class. */
  undecided?: number;
  /** EM stops when no estimated parameter moves by more (default 1e-5). */
  threshold?: number;
  maxIterations?: number;
  /** Binary STAPLE: the foreground prior; multi-label: the class prior [L]. Default: from the labels. */
  prior?: number | number[];
  /** Binary STAPLE: the label treated as foreground (default 1). */
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
