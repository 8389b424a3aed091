// Checks of what `cmseg predict` writes for a 3D BraTS case, read back from the files with the
// project's NIfTI reader: <id>_probs.nii.gz (4D [x, y, z, class], classes 0..3 in the model's
// order) and <id>_consensus.nii.gz (the release's labels). The truth they are held to is the
// BraTS label convention itself, written out here: classes 0, 1, 2, 3 (background, NCR, ED,
// ET) are labels 0, 1, 2, 4 in BraTS 2018-2021 files and 0, 1, 2, 3 in BraTS 2023 files; and
// outside the crop to the brain, where the model is not asked, background has probability 1.
import * as path from 'node:path';
import type { Test } from 'tap';
import { readNifti } from '../../src/data/nifti';
import type { CropBox } from '../../src/data/brats';

/** The label each class 0..3 is written as, by the naming of the case's files. */
export const RELEASE_LABELS = { '2021': [0, 1, 2, 4], '2023': [0, 1, 2, 3] } as const;

/** The crop to the brain, as voxel ranges of the original grid (z, y, x). */
export type CropBoxLike = CropBox;

export interface ReleasedPrediction {
  /** [X, Y, Z] of the case's grid. */
  dims: number[];
  /** [4, Z, Y, X] probabilities as read back (x fastest, class slowest). */
  probs: Float32Array;
  /** Voxels (inside the crop) whose most probable class is each of 0..3. */
  argmaxCounts: number[];
}

/**
 * Reads <id>_probs.nii.gz and <id>_consensus.nii.gz of `outDir` and asserts, at every voxel of
 * the case's grid, that the consensus is the release label of the most probable class
 * (consensus[v] == RELEASE_LABELS[naming][argmax_k p_k(v)], the first class on ties, as argmax
 * does) and, outside `crop`, that p_0 = 1 and every other class 0. Returns what was read.
 */
export async function checkReleasedPrediction(t: Test, outDir: string, id: string, crop: CropBoxLike, naming: '2021' | '2023' = '2021'): Promise<ReleasedPrediction> {
  const labels = RELEASE_LABELS[naming];
  const probsFile = await readNifti(path.join(outDir, `${id}_probs.nii.gz`));
  const consensusFile = await readNifti(path.join(outDir, `${id}_consensus.nii.gz`));
  const [X, Y, Z] = consensusFile.dims;
  t.same(probsFile.dims, [X, Y, Z, 4], `${id}: four probability volumes on the consensus's grid`);
  const V = X * Y * Z;
  const p = probsFile.data;
  const consensus = consensusFile.raw;
  const argmaxCounts = [0, 0, 0, 0];
  let wrongLabel = 0;
  let firstWrong = '';
  let wrongOutside = 0;
  let firstOutside = '';
  let inside = 0;
  for (let z = 0; z < Z; z++) {
    for (let y = 0; y < Y; y++) {
      for (let x = 0; x < X; x++) {
        const v = (z * Y + y) * X + x;
        let best = 0;
        for (let k = 1; k < 4; k++) if (p[k * V + v] > p[best * V + v]) best = k;
        if (Number(consensus[v]) !== labels[best]) {
          if (wrongLabel++ === 0) firstWrong = `(x, y, z) = (${x}, ${y}, ${z}): p = [${[0, 1, 2, 3].map((k) => p[k * V + v]).join(', ')}], consensus ${consensus[v]}`;
        }
        const inCrop = z >= crop.z0 && z < crop.z0 + crop.d && y >= crop.y0 && y < crop.y0 + crop.h && x >= crop.x0 && x < crop.x0 + crop.w;
        if (inCrop) {
          inside++;
          argmaxCounts[best]++;
        } else if (p[v] !== 1 || p[V + v] !== 0 || p[2 * V + v] !== 0 || p[3 * V + v] !== 0) {
          if (wrongOutside++ === 0) firstOutside = `(x, y, z) = (${x}, ${y}, ${z}): p = [${[0, 1, 2, 3].map((k) => p[k * V + v]).join(', ')}]`;
        }
      }
    }
  }
  t.equal(inside, crop.d * crop.h * crop.w, `${id}: the crop box lies in the grid`);
  t.equal(wrongLabel, 0, `${id}: consensus = [${labels.join(', ')}][argmax p] at every voxel${wrongLabel ? `; ${wrongLabel} differ, first at ${firstWrong}` : ''}`);
  t.equal(wrongOutside, 0, `${id}: outside the crop, p = (1, 0, 0, 0)${wrongOutside ? `; ${wrongOutside} voxels differ, first at ${firstOutside}` : ''}`);
  t.ok(V > inside, `${id}: the crop leaves voxels outside it to check`);
  return { dims: [X, Y, Z], probs: p, argmaxCounts };
}

/** The [L, d, h, w] probabilities of the crop box out of a read-back [L, Z, Y, X] volume. */
export function cropOfProbs(probs: Float32Array, dims: readonly number[], crop: CropBoxLike, L = 4): Float32Array {
  const [X, Y, Z] = dims;
  const out = new Float32Array(L * crop.d * crop.h * crop.w);
  let i = 0;
  for (let k = 0; k < L; k++) {
    for (let z = 0; z < crop.d; z++) {
      for (let y = 0; y < crop.h; y++) {
        for (let x = 0; x < crop.w; x++) out[i++] = probs[((k * Z + crop.z0 + z) * Y + crop.y0 + y) * X + crop.x0 + x];
      }
    }
  }
  return out;
}
