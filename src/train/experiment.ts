// An experiment's data: where training batches come from and how a model is scored on the
// validation and test splits. The trainer and the CLI only see ExperimentData, so a new
// data set (a BraTS patch loader with sliding-window evaluation, say) plugs in by adding
// a DatasetSpec kind and a case to loadExperimentData.
//
// MNIST (paper section 3.1): the package's digits split by `dataSeed`, the four synthetic
// annotators of SPEC section 7 (good, over, under, fracture) on the training images in
// `dense` or `single` label mode. Validation and test images get every annotator (dense
// labels) so that every annotator's CM estimate is scored on every image; the fused-label
// rows use the test images labelled in the run's label mode, as the training set is.

import { AnnotatorSpec, LabelMode, simulateAnnotators } from '../data/annotators';
import { loadMnistSplits, MnistBatch } from '../data/mnist';
import { Rng } from '../data/random';
import { fuse } from '../fusion/fuse';
import type { Model } from '../model/model';
import { AnnotatedSet, InMemorySource, TrainingSource } from './data';
import { evaluateModel, EvaluationSummary, fusedLabelRows, FusedLabelRows } from './evaluate';

/** The paper's four MNIST annotators with the SPEC section 7 defaults. */
export const MNIST_ANNOTATORS: readonly AnnotatorSpec[] = [{ kind: 'good' }, { kind: 'over' }, { kind: 'under' }, { kind: 'fracture' }];

export interface MnistDatasetSpec {
  kind: 'mnist';
  /** Images per split (at most 10,000 in all). */
  train: number;
  validation: number;
  test: number;
  labels: LabelMode;
  /** Seeds the split and the annotators; kept apart from the training seed so that runs with different seeds see the same data. */
  dataSeed: number;
}

/** Every data set the CLI knows. BraTS joins here. */
export type DatasetSpec = MnistDatasetSpec;

export type SplitName = 'validation' | 'test';

export interface ExperimentData {
  source: TrainingSource;
  /** Names of the classes for reports, index = label. */
  classNames?: string[];
  /** Scores a model on a split (every epoch on validation, at the end on test). */
  evaluate(model: Model, split: SplitName, options?: { annotators?: boolean }): Promise<EvaluationSummary>;
  /** Dice of the naive fused label maps on the test split (tables' "Mean labels" / "Mode labels"). */
  fusedLabelRows?(): FusedLabelRows;
  /**
   * Fuses the training annotations once with a native STAPLE method and attaches the
   * result to the training set (the `naive-staple` / `naive-spatial-staple` targets).
   */
  prepareFusedTargets?(fusion: 'multi-staple' | 'spatial-staple'): Promise<void>;
  /** An in-memory split, for pictures (cmseg predict). */
  split?(split: SplitName | 'train'): AnnotatedSet;
  /** Releases what the data holds open (patch-loader workers, files). */
  close?(): Promise<void>;
}

function annotatorSeed(dataSeed: number, split: string): number {
  return new Rng(dataSeed).fork(`${split} annotators`).nextUint32();
}

function annotate(batch: MnistBatch, specs: readonly AnnotatorSpec[], mode: LabelMode, seed: number): AnnotatedSet {
  const sim = simulateAnnotators(batch.consensus, batch.extent, batch.classes, specs, { seed, mode });
  return {
    count: batch.count,
    channels: batch.channels,
    classes: batch.classes,
    spatial: [batch.extent.h, batch.extent.w],
    images: batch.images,
    labels: sim.labels,
    present: sim.present,
    consensus: batch.consensus,
    annotatorNames: sim.names,
  };
}

export function loadMnistExperiment(spec: MnistDatasetSpec, trainingSeed: number): ExperimentData {
  if (!(spec.train >= 1 && spec.validation >= 1 && spec.test >= 1)) throw new RangeError('every MNIST split needs at least one image');
  const splits = loadMnistSplits({ seed: spec.dataSeed, train: spec.train, validation: spec.validation, test: spec.test });
  const train = annotate(splits.train, MNIST_ANNOTATORS, spec.labels, annotatorSeed(spec.dataSeed, 'train'));
  const validation = annotate(splits.validation, MNIST_ANNOTATORS, 'dense', annotatorSeed(spec.dataSeed, 'validation'));
  const testSeed = annotatorSeed(spec.dataSeed, 'test');
  const test = annotate(splits.test, MNIST_ANNOTATORS, 'dense', testSeed);
  let testInRunMode: AnnotatedSet | undefined;
  const sets = { train, validation, test };
  return {
    source: new InMemorySource(train, trainingSeed),
    classNames: ['background', 'digit'],
    evaluate: (model, split, options) => evaluateModel(model, sets[split], options),
    fusedLabelRows: () => {
      testInRunMode ??= spec.labels === 'dense' ? test : annotate(splits.test, MNIST_ANNOTATORS, spec.labels, testSeed);
      return fusedLabelRows(testInRunMode);
    },
    split: (name) => sets[name],
    prepareFusedTargets: async (fusion) => {
      train.fused = await fuseTrainingSet(train, fusion);
    },
  };
}

/**
 * STAPLE over a whole in-memory training set: the images are stacked into one
 * [N, *S] volume per annotator (absent annotators are 255 there), so the rater
 * CMs are estimated from every training image at once. Spatial STAPLE's local
 * windows then span neighbouring images of the stack as well as space.
 */
export async function fuseTrainingSet(set: AnnotatedSet, fusion: 'multi-staple' | 'spatial-staple'): Promise<Uint8Array> {
  const shape = [set.count, ...set.spatial];
  const stride = Math.max(1, Math.min(8, ...set.spatial.map((s) => Math.floor(s / 4))));
  const result = await fuse(set.labels, {
    method: fusion,
    classes: set.classes,
    shape,
    ...(fusion === 'spatial-staple' ? { stride, window: 3 * stride } : {}),
  });
  const labels = result.labels!;
  // A voxel nobody labelled (255) stays unlabelled: the plain CE ignores it.
  return labels;
}

export function loadExperimentData(spec: DatasetSpec, trainingSeed: number): ExperimentData {
  switch (spec.kind) {
    case 'mnist':
      return loadMnistExperiment(spec, trainingSeed);
    default: {
      const unknown: never = spec.kind;
      throw new RangeError(`unknown data set kind ${JSON.stringify(unknown)}`);
    }
  }
}
