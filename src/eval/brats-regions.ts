// BraTS scoring: the three nested tumour regions of the challenge and the per-class Dice
// of the project's contiguous labels (SPEC section 7: BraTS label 4 is mapped to 3).
//   0 background, 1 necrosis / non-enhancing tumour core, 2 edema, 3 enhancing tumour.
// Regions: whole tumour WT = {1, 2, 3}, tumour core TC = {1, 3}, enhancing tumour ET = {3}.
// The label mapping itself (and BRATS_CLASSES, BRATS_CLASS_NAMES) lives with the loader,
// src/data/brats.ts (mapBratsLabels); this file only scores maps already in 0..3.
// BraTS-PEDs 2024 maps (1 ET, 2 NET, 3 CC, 4 ED) read with the label scheme peds2024 are in
// these classes too (ET -> 3, NET and CC -> 1, ED -> 2), and these regions are then exactly
// the challenge's (ET = {1}, TC = {1, 2, 3}, WT = {1, 2, 3, 4}); class 1 is NET + CC there.
import { BRATS_CLASSES } from '../data/brats';
import { checkLabels, UNLABELLED } from '../data/annotators';
import { checkLabelMap, labelConfusionCounts, dicePerClassFromCounts, meanStd, MeanStd, regionDiceFromCounts } from './metrics';
import { type Dims3, hausdorff95 } from './surface-distance';

/** The challenge's evaluation regions as unions of contiguous labels. */
export const BRATS_REGIONS = {
  wholeTumour: [1, 2, 3],
  tumourCore: [1, 3],
  enhancingTumour: [3],
} as const satisfies Record<string, readonly number[]>;

export type BratsRegion = keyof typeof BRATS_REGIONS;
export type BratsClassName = 'necrosis' | 'edema' | 'enhancing';

/**
 * Each region's HD95 (src/eval/surface-distance.ts) between the predicted and the reference
 * map of one volume [D, H, W] (labels 0..3), in mm for `spacing` [d, h, w]: NaN where exactly
 * one of the two has the region, and in every region when the reference labels no voxel (all
 * 255: no Dice either). A 255 (unlabelled) in the reference lies outside every
 * region (a surface needs an inside and an outside; Dice leaves such voxels out); any other
 * label >= 4, in either map, is an error, as in bratsDice: a raw BraTS map with its 4 would
 * otherwise lose enhancing tumour from every region without a word.
 */
export function bratsHausdorff95(pred: Uint8Array, truth: Uint8Array, dims: Dims3, spacing: readonly [number, number, number] = [1, 1, 1]): Record<BratsRegion, number> {
  const check = (name: string, labels: Uint8Array, unlabelledAllowed: boolean) => {
    try {
      checkLabels(name, labels, BRATS_CLASSES, unlabelledAllowed);
    } catch (error) {
      throw new RangeError(`${(error as Error).message}: BraTS maps must be in contiguous labels 0..3 (mapBratsLabels maps BraTS 4 to 3)`);
    }
  };
  checkLabelMap('pred', pred);
  checkLabelMap('truth', truth);
  check('pred', pred, false);
  check('truth', truth, true);
  const mask = (labels: Uint8Array, region: readonly number[]) => labels.map((c) => (region.includes(c) ? 1 : 0));
  const out = {} as Record<BratsRegion, number>;
  // A reference that labels no voxel scores nothing: NaN, left out of the mean, as its Dice
  // (README "Metrics": such an image is left out of every per-image figure). Read as "no
  // region in either map" it scored a perfect 0 mm in every region whenever the prediction
  // had no tumour either.
  if (!truth.some((c) => c !== UNLABELLED)) {
    for (const name of Object.keys(BRATS_REGIONS) as BratsRegion[]) out[name] = NaN;
    return out;
  }
  for (const [name, region] of Object.entries(BRATS_REGIONS) as [BratsRegion, readonly number[]][]) {
    out[name] = hausdorff95(mask(pred, region), mask(truth, region), dims, spacing);
  }
  return out;
}

export interface BratsDiceReport {
  images: number;
  /** mean +- std over images of each region's Dice. */
  regions: Record<BratsRegion, MeanStd>;
  /** mean +- std over images of each tumour class's Dice. */
  classes: Record<BratsClassName, MeanStd>;
  /** Whole volumes: mean +- std over volumes of each region's HD95 in mm (count: the volumes where it is defined). */
  hd95?: Record<BratsRegion, MeanStd>;
  /** Per-image Dice, [N] each. */
  perImage: Record<BratsRegion | BratsClassName, Float64Array>;
}

/**
 * Region and class Dice of predicted against reference BraTS label maps, both [N, *S] in
 * contiguous labels 0..3 (255 in the reference is ignored). An empty region in both maps
 * scores 1, as every Dice in SPEC section 6.
 */
export function bratsDice(pred: Uint8Array, truth: Uint8Array, n: number): BratsDiceReport {
  let counts: Float64Array;
  try {
    counts = labelConfusionCounts(pred, truth, n, BRATS_CLASSES);
  } catch (error) {
    // A raw 2018-2021 map's 4 said only "truth: label 4 at index 3 >= classes (4)": say what
    // bratsHausdorff95 says, how to map it.
    if (error instanceof RangeError && /: label \d+ at index \d+ >= classes/.test(error.message)) {
      throw new RangeError(`${error.message}: BraTS maps must be in contiguous labels 0..3 (mapBratsLabels maps BraTS 4 to 3)`);
    }
    throw error;
  }
  const dice = dicePerClassFromCounts(counts, n, BRATS_CLASSES);
  const classColumn = (c: number) => Float64Array.from({ length: n }, (_, img) => dice[img * BRATS_CLASSES + c]);
  const perImage = {
    wholeTumour: regionDiceFromCounts(counts, n, BRATS_CLASSES, BRATS_REGIONS.wholeTumour),
    tumourCore: regionDiceFromCounts(counts, n, BRATS_CLASSES, BRATS_REGIONS.tumourCore),
    enhancingTumour: regionDiceFromCounts(counts, n, BRATS_CLASSES, BRATS_REGIONS.enhancingTumour),
    necrosis: classColumn(1),
    edema: classColumn(2),
    enhancing: classColumn(3),
  };
  return {
    images: n,
    regions: {
      wholeTumour: meanStd(perImage.wholeTumour),
      tumourCore: meanStd(perImage.tumourCore),
      enhancingTumour: meanStd(perImage.enhancingTumour),
    },
    classes: {
      necrosis: meanStd(perImage.necrosis),
      edema: meanStd(perImage.edema),
      enhancing: meanStd(perImage.enhancing),
    },
    perImage,
  };
}
