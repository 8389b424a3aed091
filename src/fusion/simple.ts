// Naive label fusion (SPEC section 4, the `naive` methods; paper Tables 1-2 rows
// "Mean labels" / "Mode labels"): several annotators' maps become one training target.
// Written in TypeScript; STAPLE and spatial STAPLE live in the native fusion module.
//
// Inputs follow SPEC section 1: one map [N, *S] per annotator, 255 = unlabelled pixel,
// and an optional presence mask present[n * R + r] (0: annotator r did not label image n).
// Only the votes of annotators that are present and labelled a pixel count there. A pixel
// that no annotator labelled stays unlabelled: 255 in a hard map, all zeros in a soft one
// (so plain cross-entropy ignores it).
//
// Ties. `modeLabels` gives a tie to the lowest class (background first), like
// scipy.stats.mode. `meanLabels` keeps the fractions; its hard version
// `meanLabelsHard` breaks ties towards the highest class, which for a binary task is
// "foreground when at least half the annotators say so" (mean >= 0.5). The two hard maps
// therefore differ exactly on tied pixels, e.g. 2 of 4 annotators.

/** Label value of an unlabelled pixel (SPEC section 1). */
const UNLABELLED = 255;

export interface FusionInput {
  /** One map [N, *S] per annotator. */
  labels: readonly Uint8Array[];
  /** Images N; the voxels per image follow from the map length. */
  count: number;
  /** Classes L including background. */
  classes: number;
  /** present[n * R + r]; default every annotator labelled every image. */
  present?: Uint8Array;
}

function checkInput(input: FusionInput): { R: number; V: number } {
  const { labels, count, classes, present } = input;
  const R = labels.length;
  if (R === 0) throw new RangeError('label fusion needs at least one annotator map');
  if (!Number.isInteger(classes) || classes < 2 || classes > 255) throw new RangeError(`classes ${classes} must be an integer in [2, 255]`);
  if (!Number.isInteger(count) || count < 1) throw new RangeError(`count ${count} must be an integer >= 1`);
  const length = labels[0].length;
  if (length % count !== 0) throw new RangeError(`annotator 0 map has ${length} voxels, not a multiple of ${count} images`);
  labels.forEach((map, r) => {
    if (map.length !== length) throw new RangeError(`annotator ${r} map has ${map.length} voxels, annotator 0 has ${length}`);
  });
  if (present && present.length !== count * R) throw new RangeError(`present has ${present.length} entries, expected ${count} images x ${R} annotators`);
  return { R, V: length / count };
}

/** votes[c] for one pixel; returns how many annotators voted. */
function countVotes(input: FusionInput, R: number, n: number, index: number, votes: Uint32Array): number {
  votes.fill(0);
  let total = 0;
  for (let r = 0; r < R; r++) {
    if (input.present && !input.present[n * R + r]) continue;
    const label = input.labels[r][index];
    if (label === UNLABELLED) continue;
    if (label >= input.classes) throw new RangeError(`annotator ${r}: label ${label} at index ${index} >= classes (${input.classes})`);
    votes[label]++;
    total++;
  }
  return total;
}

/** Soft labels [N, L, *S]: the fraction of voting annotators that chose each class. */
export function meanLabels(input: FusionInput): Float32Array {
  const { R, V } = checkInput(input);
  const L = input.classes;
  const out = new Float32Array(input.count * L * V);
  const votes = new Uint32Array(L);
  for (let n = 0; n < input.count; n++) {
    for (let v = 0; v < V; v++) {
      const total = countVotes(input, R, n, n * V + v, votes);
      if (total === 0) continue;
      for (let c = 0; c < L; c++) out[(n * L + c) * V + v] = votes[c] / total;
    }
  }
  return out;
}

function hardFusion(input: FusionInput, preferHigh: boolean): Uint8Array {
  const { R, V } = checkInput(input);
  const L = input.classes;
  const out = new Uint8Array(input.count * V);
  const votes = new Uint32Array(L);
  for (let n = 0; n < input.count; n++) {
    for (let v = 0; v < V; v++) {
      const i = n * V + v;
      if (countVotes(input, R, n, i, votes) === 0) {
        out[i] = UNLABELLED;
        continue;
      }
      let best = 0;
      for (let c = 1; c < L; c++) if (preferHigh ? votes[c] >= votes[best] : votes[c] > votes[best]) best = c;
      out[i] = best;
    }
  }
  return out;
}

/** Majority vote [N, *S]; ties go to the lowest class. */
export function modeLabels(input: FusionInput): Uint8Array {
  return hardFusion(input, false);
}

/** argmax of meanLabels [N, *S]; ties go to the highest class (binary: mean >= 0.5 is foreground). */
export function meanLabelsHard(input: FusionInput): Uint8Array {
  return hardFusion(input, true);
}
