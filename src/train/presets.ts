// Named starting points for `cmseg train --preset NAME`: a data set and training settings
// that suit a machine. Command-line flags override any field. One source of truth for
// the defaults the README, the reproduction script and the tests rely on.

import type { BratsDatasetSpec, DatasetSpec, FolderDatasetSpec } from './experiment';
import { TRAIN_DEFAULTS, TrainConfig } from './trainer';

/** BraTS settings both brats presets share; `cache` and `splits` are filled when a run starts. */
const BRATS_DATASET: BratsDatasetSpec = {
  kind: 'brats',
  cache: '',
  labels: 'dense',
  patch: 64,
  overlap: 0.5,
  stepsPerEpoch: 100,
  validationCases: 2,
  dataSeed: 0,
  augment: true,
  foregroundFraction: 1 / 3,
  splits: { train: [], validation: [], test: [] },
};

/** A user's image folder; `root`, `annotators` and `splits` are filled when a run starts. */
const FOLDER_DATASET: FolderDatasetSpec = {
  kind: 'folder',
  root: '',
  classes: 2,
  labelMapping: 'auto',
  annotators: [],
  dataSeed: 0,
  splits: { train: [], validation: [], test: [] },
};

export interface Preset {
  name: string;
  description: string;
  dataset: DatasetSpec;
  /** Training settings without the method (chosen on the command line, default `cm`). */
  train: Omit<TrainConfig, 'method'>;
}

export const PRESETS: Record<string, Preset> = {
  // SPEC `mnist2d` is depth 4, c 32: about 1.2 s per batch-32 step on a 2-core CPU. This
  // preset trades width and depth for time (depth 3, c 16: about 0.3 s per step) and uses
  // 2,000 training images: 372 steps, about 2.5 minutes there with validation and testing.
  mnist: {
    name: 'mnist',
    description: 'MNIST with 4 synthetic annotators (good, over, under, fracture); CPU-sized U-Net depth 3, c 16; 2000/500/500 images; 6 epochs',
    dataset: { kind: 'mnist', train: 2000, validation: 500, test: 500, labels: 'dense', dataSeed: 0 },
    train: {
      ...TRAIN_DEFAULTS,
      depth: 3,
      baseChannels: 16,
      epochs: 6,
      batchSize: 32,
      schedule: { kind: 'cosine', lr: 3e-3, minLr: 1e-4 },
      lambda: 0.01,
      warmupSteps: 0,
      augment: { flips: true, rotations: true },
    },
  },
  // What scripts/reproduce-mnist.mjs runs 39 times: about 160 steps of 0.18 s (c 8) on a
  // 2-core CPU, some 40 s per run with validation and the test evaluation.
  'mnist-quick': {
    name: 'mnist-quick',
    description: 'the reproduction setting: U-Net depth 3, c 8; 1280/200/500 images; 4 epochs at lr 0.01 (about 10 s on one core)',
    dataset: { kind: 'mnist', train: 1280, validation: 200, test: 500, labels: 'dense', dataSeed: 0 },
    train: {
      ...TRAIN_DEFAULTS,
      depth: 3,
      baseChannels: 8,
      epochs: 4,
      batchSize: 32,
      schedule: { kind: 'cosine', lr: 1e-2, minLr: 1e-4 },
      lambda: 0.01,
      warmupSteps: 0,
      augment: { flips: true, rotations: true },
    },
  },
  // The paper-sized MNIST model of SPEC section 8 (mnist2d), for a machine with time to spare.
  'mnist-full': {
    name: 'mnist-full',
    description: 'MNIST as SPEC mnist2d: U-Net depth 4, c 32; 8000/1000/1000 images; 20 epochs (slow on a CPU)',
    dataset: { kind: 'mnist', train: 8000, validation: 1000, test: 1000, labels: 'dense', dataSeed: 0 },
    train: {
      ...TRAIN_DEFAULTS,
      depth: 4,
      baseChannels: 32,
      epochs: 20,
      batchSize: 32,
      schedule: { kind: 'cosine', lr: 1e-3, minLr: 1e-5 },
      augment: { flips: true, rotations: true },
    },
  },
  // Seconds, not minutes: for tests and for trying the command line.
  'mnist-tiny': {
    name: 'mnist-tiny',
    description: 'a seconds-long smoke run: U-Net depth 2, c 4; 64/32/32 MNIST images; 2 epochs of batch 16',
    dataset: { kind: 'mnist', train: 64, validation: 32, test: 32, labels: 'dense', dataSeed: 0 },
    train: {
      ...TRAIN_DEFAULTS,
      depth: 2,
      baseChannels: 4,
      epochs: 2,
      batchSize: 16,
      schedule: { kind: 'constant', lr: 3e-3 },
      augment: { flips: true, rotations: true },
    },
  },
  // A user's own 2D data (cmseg simulate writes such a folder): the mnist preset's U-Net
  // (depth 3, c 16), so images must be multiples of 4 pixels on each side. The data's size
  // is unknown: 10 epochs of batch 16 is a start for a few hundred to a few thousand
  // images; larger images (LIDC crops are 128x128, 16 times MNIST's pixels) take
  // proportionally longer per step.
  images: {
    name: 'images',
    description: 'your 2D image folder (--data: images/, labels/<annotator>/, optional consensus/): U-Net depth 3, c 16 as mnist; 70/15/15 split; 10 epochs of batch 16',
    dataset: { ...FOLDER_DATASET },
    train: {
      ...TRAIN_DEFAULTS,
      depth: 3,
      baseChannels: 16,
      epochs: 10,
      batchSize: 16,
      schedule: { kind: 'cosine', lr: 3e-3, minLr: 1e-4 },
      lambda: 0.01,
      warmupSteps: 0,
      augment: { flips: true, rotations: true },
    },
  },
  // SPEC brats3d-cpu: batch 1 x 4 x 64^3, U-Net depth 4, c 16, L 4, R 3 (the cache's
  // annotators). About 2-3 s per step on a 2-core CPU (AVX2), so 20 epochs of 100 steps
  // take one to two hours plus validation (2 whole cases per epoch, about a minute each at
  // real BraTS size). The patch loader augments; the trainer's own flips stay off.
  brats3d: {
    name: 'brats3d',
    description: 'BraTS (--data: a cmseg prepare cache or a BraTS folder) as SPEC brats3d-cpu: U-Net depth 4, c 16; patches 64^3, batch 1; 20 epochs of 100 steps (CPU)',
    dataset: { ...BRATS_DATASET },
    train: {
      ...TRAIN_DEFAULTS,
      depth: 4,
      baseChannels: 16,
      epochs: 20,
      batchSize: 1,
      schedule: { kind: 'poly', lr: 1e-3, power: 0.9 },
      lambda: 0.01,
      warmupSteps: 0,
      augment: { flips: false, rotations: false },
      device: 'cpu',
    },
  },
  // SPEC brats3d-gpu: batch 2 x 4 x 128^3, U-Net depth 4, c 32, on the CUDA backend.
  'brats3d-gpu': {
    name: 'brats3d-gpu',
    description: 'BraTS as SPEC brats3d-gpu: U-Net depth 4, c 32; patches 128^3, batch 2; 50 epochs of 250 steps (needs the CUDA backend)',
    dataset: { ...BRATS_DATASET, patch: 128, stepsPerEpoch: 250, validationCases: 8 },
    train: {
      ...TRAIN_DEFAULTS,
      depth: 4,
      baseChannels: 32,
      epochs: 50,
      batchSize: 2,
      schedule: { kind: 'poly', lr: 1e-3, power: 0.9 },
      lambda: 0.01,
      warmupSteps: 0,
      augment: { flips: false, rotations: false },
      device: 'cuda',
    },
  },
};

export const PRESET_NAMES = Object.keys(PRESETS);

/** A copy of the preset `name` (change it freely); a RangeError listing the names for any other. */
export function presetByName(name: string): Preset {
  // Own keys only: 'toString' or 'constructor' found Object.prototype's functions (structuredClone
  // then threw a DOMException) and '__proto__' returned an empty object as a preset.
  const preset = typeof name === 'string' && Object.hasOwn(PRESETS, name) ? PRESETS[name] : undefined;
  if (!preset) throw new RangeError(`unknown preset ${JSON.stringify(name)}; choose one of ${PRESET_NAMES.join(', ')}`);
  return structuredClone(preset);
}
