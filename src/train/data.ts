// What the trainer reads: batches of images with every annotator's labels, in the SPEC
// section 1 layouts. Any data source (MNIST in memory, a BraTS patch loader, an image
// folder) plugs in by implementing TrainingSource; the trainer never looks further.
//
// Reproducibility contract: batch(epoch, index) must depend only on (epoch, index, the
// rng it is given) and the source's own fixed contents. The trainer hands every batch a
// stream forked by (epoch, index), so resuming a run at (epoch, index) sees exactly the
// data an uninterrupted run would have seen, without saving any generator state.

import { Rng } from '../data/random';

/** A batch before the method turns it into the model's Batch (methods.ts). */
export interface AnnotatedBatch {
  /** Float32 images [N, C, *S]. */
  images: Float32Array;
  /** [N, C, H, W] or [N, C, D, H, W]. */
  shape: number[];
  /** One map [N, *S] per annotator; 255 = unlabelled. */
  labels: Uint8Array[];
  /** present[n * R + r]: 0 where annotator r did not label image n. */
  present: Uint8Array;
  /** Expert consensus [N, *S], when known (needed by the `oracle` method). */
  consensus?: Uint8Array;
  /** A fused label map [N, *S] prepared once for the whole set (the STAPLE methods). */
  fused?: Uint8Array;
}

export interface TrainingSource {
  readonly ndim: 2 | 3;
  readonly channels: number;
  readonly classes: number;
  readonly annotatorNames: readonly string[];
  /** Whether batches carry the expert consensus (the `oracle` method needs it). */
  readonly hasConsensus: boolean;
  /** Optimiser steps in one epoch at this batch size. */
  batchesPerEpoch(batchSize: number): number;
  /** Batch `index` (0-based) of `epoch` (0-based); see the reproducibility contract above. */
  batch(epoch: number, index: number, batchSize: number, rng: Rng): AnnotatedBatch | Promise<AnnotatedBatch>;
}

/** A whole annotated set in memory (MNIST, image folders). */
export interface AnnotatedSet {
  count: number;
  channels: number;
  classes: number;
  /** Spatial size: [H, W] or [D, H, W]. */
  spatial: number[];
  images: Float32Array;
  labels: Uint8Array[];
  present: Uint8Array;
  consensus?: Uint8Array;
  /** A fused label map [N, *S] prepared once for the whole set (the STAPLE methods). */
  fused?: Uint8Array;
  annotatorNames: string[];
  /** Each image's name (image folders: the file name), when it has one: pictures are named after it. */
  names?: string[];
}

export function voxelsOf(spatial: readonly number[]): number {
  return spatial.reduce((a, b) => a * b, 1);
}

/**
 * Throws a RangeError naming the field when `set`'s arrays do not have the lengths its count,
 * channels and spatial size give. gatherBatch copies by offsets computed from those numbers:
 * a set built by hand with one of them wrong (images for 4x4 pixels in a set that says 8x8, a
 * label map one image short) otherwise gave batches silently padded with zeros or mixing
 * one image's pixels with the next one's labels, and training went on.
 */
export function checkAnnotatedSet(set: AnnotatedSet, what = 'the set'): void {
  if (set === null || typeof set !== 'object') throw new TypeError(`${what} must be an AnnotatedSet object`);
  const { count, channels, spatial, labels } = set;
  const whole = (name: string, v: unknown, min: number) => {
    if (!Number.isSafeInteger(v) || (v as number) < min) throw new RangeError(`${what}: ${name} = ${String(v)} must be an integer >= ${min}`);
  };
  whole('count', count, 0);
  whole('channels', channels, 1);
  whole('classes', set.classes, 1);
  if (!Array.isArray(spatial) || (spatial.length !== 2 && spatial.length !== 3)) {
    throw new RangeError(`${what}: spatial must be [H, W] or [D, H, W], got ${Array.isArray(spatial) ? `[${spatial.join(', ')}]` : String(spatial)}`);
  }
  spatial.forEach((n, i) => whole(`spatial[${i}]`, n, 1));
  if (!Array.isArray(labels)) throw new TypeError(`${what}: labels must be an array of Uint8Array maps, one per annotator`);
  const V = voxelsOf(spatial);
  const R = labels.length;
  const sized = (name: string, array: unknown, kind: 'Float32Array' | 'Uint8Array', length: number, layout: string) => {
    const ok = kind === 'Float32Array' ? array instanceof Float32Array : array instanceof Uint8Array;
    if (!ok) throw new TypeError(`${what}: ${name} must be a ${kind}`);
    if ((array as ArrayLike<number>).length !== length) {
      throw new RangeError(`${what}: ${name} has ${(array as ArrayLike<number>).length} values, ${layout} = ${length} for count ${count}, channels ${channels}, spatial [${spatial.join(', ')}]`);
    }
  };
  sized('images', set.images, 'Float32Array', count * channels * V, '[count, channels, *spatial]');
  labels.forEach((map, r) => sized(`labels[${r}]`, map, 'Uint8Array', count * V, '[count, *spatial]'));
  sized('present', set.present, 'Uint8Array', count * R, `[count, ${R} annotators]`);
  if (set.consensus !== undefined) sized('consensus', set.consensus, 'Uint8Array', count * V, '[count, *spatial]');
  if (set.fused !== undefined) sized('fused', set.fused, 'Uint8Array', count * V, '[count, *spatial]');
}

/** The images `indices` of a set as one batch (copies). */
export function gatherBatch(set: AnnotatedSet, indices: ArrayLike<number>): AnnotatedBatch {
  checkAnnotatedSet(set);
  // An index past the set (or a fraction) read as an image of zeros labelled 0 and absent.
  for (let k = 0; k < indices.length; k++) {
    const n = indices[k];
    if (!Number.isInteger(n) || n < 0 || n >= set.count) throw new RangeError(`gatherBatch: indices[${k}] = ${n} is not an image of the set (0..${set.count - 1})`);
  }
  const V = voxelsOf(set.spatial);
  const C = set.channels;
  const R = set.labels.length;
  const N = indices.length;
  const images = new Float32Array(N * C * V);
  const labels = set.labels.map(() => new Uint8Array(N * V));
  const present = new Uint8Array(N * R);
  const consensus = set.consensus ? new Uint8Array(N * V) : undefined;
  const fused = set.fused ? new Uint8Array(N * V) : undefined;
  for (let k = 0; k < N; k++) {
    const n = indices[k];
    images.set(set.images.subarray(n * C * V, (n + 1) * C * V), k * C * V);
    for (let r = 0; r < R; r++) {
      labels[r].set(set.labels[r].subarray(n * V, (n + 1) * V), k * V);
      present[k * R + r] = set.present[n * R + r];
    }
    consensus?.set(set.consensus!.subarray(n * V, (n + 1) * V), k * V);
    fused?.set(set.fused!.subarray(n * V, (n + 1) * V), k * V);
  }
  return { images, shape: [N, C, ...set.spatial], labels, present, ...(consensus ? { consensus } : {}), ...(fused ? { fused } : {}) };
}

/**
 * Epochs over an in-memory set: each epoch visits the images in an order drawn from the
 * stream forked by the epoch number; the last incomplete batch of an epoch is dropped
 * (every image is still seen over several epochs), so every batch has the same size.
 */
export class InMemorySource implements TrainingSource {
  readonly ndim: 2 | 3;
  readonly channels: number;
  readonly classes: number;
  readonly annotatorNames: readonly string[];
  readonly hasConsensus: boolean;
  private order?: { epoch: number; permutation: Uint32Array };

  constructor(
    readonly set: AnnotatedSet,
    private readonly seed: number,
  ) {
    checkAnnotatedSet(set, 'the training set');
    if (set.count < 1) throw new RangeError('the training set is empty');
    // train() gives the model one CM head per name: a name list of another length than the
    // label maps built a model the batches did not fit.
    if (!Array.isArray(set.annotatorNames) || set.annotatorNames.length !== set.labels.length) {
      throw new RangeError(`the training set has ${set.labels.length} label maps and ${Array.isArray(set.annotatorNames) ? set.annotatorNames.length : 'no list of'} annotator names: one name per map`);
    }
    this.ndim = set.spatial.length === 3 ? 3 : 2;
    this.channels = set.channels;
    this.classes = set.classes;
    this.annotatorNames = set.annotatorNames;
    this.hasConsensus = set.consensus !== undefined;
  }

  batchesPerEpoch(batchSize: number): number {
    // 0 gave Infinity batches, NaN or a fraction a count no epoch could have.
    if (!Number.isInteger(batchSize) || batchSize < 1) throw new RangeError(`batchSize = ${batchSize} must be an integer >= 1`);
    return Math.max(1, Math.floor(this.set.count / batchSize));
  }

  batch(epoch: number, index: number, batchSize: number): AnnotatedBatch {
    // Past the epoch's last batch the permutation's subarray is empty: a batch of 0 images.
    const batches = this.batchesPerEpoch(batchSize);
    if (!Number.isInteger(index) || index < 0 || index >= batches) throw new RangeError(`batch index ${index} is not one of the epoch's ${batches} batches (0..${batches - 1})`);
    if (!Number.isSafeInteger(epoch) || epoch < 0) throw new RangeError(`epoch = ${epoch} must be an integer >= 0`);
    if (this.order?.epoch !== epoch) {
      this.order = { epoch, permutation: new Rng(this.seed).fork(`epoch ${epoch} order`).permutation(this.set.count) };
    }
    const size = Math.min(batchSize, this.set.count);
    return gatherBatch(this.set, this.order.permutation.subarray(index * size, (index + 1) * size));
  }
}
