// Test-time augmentation by mirroring, as nnU-Net does it: the model predicts the input and
// its mirror images along every combination of the chosen spatial axes (all axes: 4
// predictions in 2D, 8 in 3D), each prediction is flipped back, and the outputs (p, CMs, q_r)
// are averaged. Flipping commutes with the per-pixel CM algebra (it only moves pixels), so a
// flipped-back CM is the CM of the same pixel, and the mean keeps every CM column a
// distribution (ensemble.ts says why). In sliding-window inference each window is mirrored,
// as in nnU-Net (slidingWindowPredict's `mirror` option). For a model that is itself
// mirror-equivariant every term equals the plain prediction, and so does the mean, exactly.

import { checkPredictingModel, foldIntoMean, outputsLike, predictArguments, type FoldArray, type ModelPrediction, type PredictingModelOf } from './ensemble';
import { predictIntoOf } from './model';

/** Every subset of `axes`, the empty one (the input as it is) first: the 2^|axes| mirrorings. */
export function mirrorings(axes: readonly number[]): number[][] {
  const subsets: number[][] = [[]];
  for (const axis of axes) for (const subset of subsets.slice()) subsets.push([...subset, axis]);
  return subsets;
}

/**
 * The spatial axes to mirror for a model of `ndim` dimensions: `true` or undefined, all of
 * them; otherwise a list of distinct axes 0..ndim-1 counted over the spatial dimensions
 * ([h, w] in 2D, [d, h, w] in 3D).
 */
export function mirrorAxes(ndim: 2 | 3, axes: boolean | readonly number[] = true): number[] {
  if (axes === true) return Array.from({ length: ndim }, (_, i) => i);
  if (axes === false) return [];
  if (!Array.isArray(axes)) throw new TypeError(`mirror axes must be true or a list of spatial axes, got ${String(axes)}`);
  axes.forEach((axis, i) => {
    if (!Number.isInteger(axis) || axis < 0 || axis >= ndim) throw new RangeError(`mirror axis ${String(axis)} (entry ${i}) is not a spatial axis of a ${ndim}D model (0..${ndim - 1})`);
    if (axes.indexOf(axis) !== i) throw new RangeError(`mirror axis ${axis} is listed twice`);
  });
  return [...axes];
}

/**
 * Visits the rows of `planes` arrays of spatial size `spatial` ([h, w] or [d, h, w]): for each
 * row, where it starts in the unflipped layout (`dst`), where the same row starts once the
 * array is flipped along `axes` (`src`), the row length and whether it runs backwards.
 */
function forEachFlippedRow(planes: number, spatial: readonly number[], axes: readonly number[], visit: (dst: number, src: number, width: number, reversed: boolean) => void): void {
  const offset = 3 - spatial.length; // 2D: spatial axis 0 is h, the second of [d, h, w]
  const [D, H, W] = spatial.length === 2 ? [1, spatial[0], spatial[1]] : [spatial[0], spatial[1], spatial[2]];
  const flipped = (axis: number) => axes.includes(axis - offset);
  const [flipZ, flipY, reversed] = [flipped(0), flipped(1), flipped(2)];
  for (let p = 0; p < planes; p++) {
    for (let z = 0; z < D; z++) {
      const sz = flipZ ? D - 1 - z : z;
      for (let y = 0; y < H; y++) {
        const sy = flipY ? H - 1 - y : y;
        visit(((p * D + z) * H + y) * W, ((p * D + sz) * H + sy) * W, W, reversed);
      }
    }
  }
}

/**
 * `data`, `planes` arrays [*spatial] one after the other, mirrored along the spatial `axes`;
 * into `out` when given (of data's length), else a new array.
 */
// `out` is typed as any Float32Array: inferred from its default, the declaration said
// Float32Array<ArrayBuffer>, which refused a caller's Float32Array (a prediction's output).
export function flipSpatial(data: Float32Array, planes: number, spatial: readonly number[], axes: readonly number[], out: Float32Array = new Float32Array(data.length)): Float32Array {
  if (out.length !== data.length) throw new RangeError(`flipSpatial: out has ${out.length} values, data ${data.length}`);
  // A public function: an axis past the spatial ones was skipped without a word (no flip), and
  // data longer than planes * spatial kept zeros in its tail (only that many values were visited).
  if (!Array.isArray(spatial) || (spatial.length !== 2 && spatial.length !== 3) || !spatial.every((n) => Number.isInteger(n) && n >= 1)) {
    throw new RangeError(`flipSpatial: spatial must be [h, w] or [d, h, w] of positive integers, got ${Array.isArray(spatial) ? `[${spatial.join(', ')}]` : String(spatial)}`);
  }
  const size = planes * spatial.reduce((a, b) => a * b, 1);
  if (!Number.isInteger(planes) || planes < 1 || data.length !== size) {
    throw new RangeError(`flipSpatial: data has ${data.length} values, ${planes} plane(s) of [${spatial.join(', ')}] are ${size}`);
  }
  const flip = mirrorAxes(spatial.length as 2 | 3, axes);
  // `out` that is `data` (a flip in place) or overlaps it: rows were read after they had been
  // written ([0..5] flipped in place gave [5, 4, 3, 3, 4, 5]). Read from a copy instead.
  if (out.buffer === data.buffer && out.byteOffset < data.byteOffset + data.byteLength && data.byteOffset < out.byteOffset + out.byteLength) data = data.slice();
  forEachFlippedRow(planes, spatial, flip, (dst, src, width, reversed) => {
    if (!reversed) out.set(data.subarray(src, src + width), dst);
    else for (let x = 0, s = src + width - 1; x < width; x++, s--) out[dst + x] = data[s];
  });
  return out;
}

/** Folds a prediction of the input mirrored along `axes` into the running mean, flipped back (a flip is its own inverse). */
function foldFlippedBack(spatial: readonly number[], axes: readonly number[]): FoldArray {
  const voxels = spatial.reduce((a, b) => a * b, 1);
  return (into, values, k) => {
    const w = 1 / k;
    // The direction is tested once a row, not once a value: this loop runs over every
    // output value (p, CMs, q) of every mirroring.
    forEachFlippedRow(into.length / voxels, spatial, axes, (dst, src, width, reversed) => {
      if (reversed) for (let x = 0, s = src + width - 1; x < width; x++, s--) into[dst + x] += (values[s] - into[dst + x]) * w;
      else for (let x = 0; x < width; x++) into[dst + x] += (values[src + x] - into[dst + x]) * w;
    });
  };
}

/**
 * `model` with mirroring test-time augmentation along the spatial `axes` (default: all):
 * predict() returns the mean of the 2^|axes| flipped-back predictions of the mirrored inputs
 * (see the top of this file), with the same outputs and shapes as the model's own. The
 * mirrorings are predicted one after the other, so only one prediction is held beside the mean.
 */
export function mirrored<P extends ModelPrediction = ModelPrediction>(model: PredictingModelOf<P>, axes: boolean | readonly number[] = true): PredictingModelOf<P> {
  checkPredictingModel(model, 'mirrored');
  const flips = mirrorings(mirrorAxes(model.config.ndim, axes));
  if (flips.length === 1) return model;
  return {
    config: model.config,
    predict: async (...given) => {
      // Every mirroring reads the input as it was given (predictArguments says why).
      const [images, shape, options] = predictArguments(...given);
      // The input as it is first: the model checks images and shape before anything is flipped.
      const mean = await model.predict(images, shape, options);
      const spatial = shape.slice(2);
      // One buffer for every mirrored input: a prediction reads its input before it resolves.
      const flippedInput = new Float32Array(images.length);
      // A Model writes the mirrorings' outputs into one set of arrays, reused once each is folded
      // into the mean: fresh ones each time cost their page faults (100 MB a batch of two 64^3
      // windows of a BraTS CM model, 7 times a batch); other models return arrays of their own.
      const writeInto = predictIntoOf(model);
      const reused = writeInto ? outputsLike(mean) : undefined;
      for (let k = 2; k <= flips.length; k++) {
        const flip = flips[k - 1];
        const input = flipSpatial(images, shape[0] * shape[1], spatial, flip, flippedInput);
        const next = writeInto && reused ? await writeInto(input, shape, options, reused) : await model.predict(input, shape, options);
        foldIntoMean(mean, next, k, foldFlippedBack(spatial, flip));
      }
      return mean;
    },
    // The mirrorings run on the model itself: an ensemble of mirrored members frees theirs.
    ...(model.releaseBuffers ? { releaseBuffers: () => model.releaseBuffers!() } : {}),
  };
}
