// A TrainingSource over a stream of patch batches (src/data/patch-loader.ts): the BraTS
// path. The loader numbers its batches and derives each one's randomness (patch position,
// flips, intensity changes) from that number, so batch (epoch, index) is stream batch
// epoch * batchesPerEpoch + index, and a resumed run reopens the stream at that number.
// The loader augments by itself: train with TrainConfig.augment off. For the STAPLE
// baselines the loader also cuts each case's fused map (AnnotatedBatch.fused).

import type { PatchBatch } from '../data/patch-loader';
import type { AnnotatedBatch, TrainingSource } from './data';

/** What the source needs of a loader: PatchLoader fits. */
export interface PatchStream {
  readonly names: string[];
  readonly channels: number;
  readonly classes: number;
  readonly settings: { batchSize: number };
  next(): Promise<PatchBatch>;
  close(): Promise<void>;
}

export class PatchStreamSource implements TrainingSource {
  readonly ndim = 3 as const;
  readonly hasConsensus = true;
  private stream?: PatchStream;
  private nextIndex = -1;

  /**
   * `open(firstBatch)` starts a stream at a batch number (PatchLoaderOptions.firstBatch).
   * `first` is a stream already open at batch 0, whose names, channels and classes describe the data.
   * An "epoch" is `batchesPerEpoch` batches: how often the trainer validates and saves.
   */
  constructor(
    private readonly open: (firstBatch: number) => Promise<PatchStream>,
    first: PatchStream,
    private readonly stepsPerEpoch: number,
  ) {
    if (!Number.isInteger(stepsPerEpoch) || stepsPerEpoch < 1) throw new RangeError(`batchesPerEpoch ${stepsPerEpoch} must be an integer >= 1`);
    this.stream = first;
    this.nextIndex = 0;
    this.channels = first.channels;
    this.classes = first.classes;
    this.annotatorNames = [...first.names];
  }

  readonly channels: number;
  readonly classes: number;
  readonly annotatorNames: readonly string[];

  batchesPerEpoch(): number {
    return this.stepsPerEpoch;
  }

  async batch(epoch: number, index: number, batchSize: number): Promise<AnnotatedBatch> {
    const wanted = epoch * this.stepsPerEpoch + index;
    if (!this.stream || this.nextIndex !== wanted) {
      await this.stream?.close();
      this.stream = await this.open(wanted);
      this.nextIndex = wanted;
    }
    if (this.stream.settings.batchSize !== batchSize) {
      throw new RangeError(`the patch loader makes batches of ${this.stream.settings.batchSize}, the trainer asks for ${batchSize}`);
    }
    const b = await this.stream.next();
    this.nextIndex = b.index + 1;
    if (b.index !== wanted) throw new RangeError(`the patch stream gave batch ${b.index}, expected ${wanted}`);
    return { images: b.images, shape: [...b.shape], labels: b.labels, present: b.present, consensus: b.consensus, ...(b.fused ? { fused: b.fused } : {}) };
  }

  async close(): Promise<void> {
    await this.stream?.close();
    this.stream = undefined;
  }
}
