// Training batches of random 3D patches from the BraTS cache (src/data/cache.ts), in the
// exact layout the trainer feeds the model (SPEC section 1): images [B, C, D, H, W]
// float32, one [B, D, H, W] uint8 map per annotator, presence [B, R], and the consensus;
// for the STAPLE baselines (option `fused`) also each case's fused map, cut at the same
// place and flipped alike (the maps are made beforehand by src/fusion/fuse-cache.ts).
//
// Sampling (nnU-Net style): each sample picks a case uniformly; with probability
// `foregroundFraction` (default 1/3) its patch is centred on a random stored tumour voxel
// (shifted only as far as needed to stay inside the case), otherwise its position is
// uniform. Cases smaller than the patch are padded: images with 0 (the z-scored
// background value), labels with 0 (background), absent annotators with 255. Augmentation:
// a flip along each axis with probability 1/2, applied alike to the image and every label
// map, and per-channel intensity v * scale + shift on the voxels inside the case.
//
// Determinism: batch b is a pure function of (seed, b, the case list, the options and the
// cache): its random stream is Rng(seed).fork(b). Which worker builds it does not matter,
// so the batches are the same for any worker count, including in-process (workers: 0).
//
// Workers: node worker_threads running src/data/patch-worker.{js,ts}, each reading only
// the rows a patch needs from the case files (no whole dataset in memory). Batch b goes
// to worker b % W; `prefetch` batches are always requested ahead of the one the trainer
// is waiting for, and their buffers are transferred, not copied. From dist/ the worker is
// plain JS; under ts-node (tests, scripts) a small bootstrap transpiles it (see below).

import * as os from 'os';
import * as path from 'path';
import { Worker } from 'worker_threads';
import { UNLABELLED } from './annotators';
import {
  type CacheFusion,
  type CacheIndex,
  type CaseFileHeader,
  CaseFileReader,
  FusedFileReader,
  type FusedFileHeader,
  type Section,
  damagedCaseFiles,
  damagedCasesMessage,
  float16DecodeTable,
  fusedLabelsCurrent,
  readCacheIndex,
} from './cache';
import { Rng } from './random';
import { loadNative } from '../native';

// ---------------------------------------------------------------------------
// Options

export interface PatchLoaderOptions {
  cacheDir: string;
  /** Cases to sample from (e.g. the training split); default every case in the cache. */
  caseIds?: readonly string[];
  /** Patch [D, H, W] or one edge for a cube; default 64 (SPEC section 8 brats3d-cpu). */
  patchSize?: number | readonly [number, number, number];
  /** Default 1 (brats3d-cpu; brats3d-gpu uses 2). */
  batchSize?: number;
  seed?: number;
  /** Worker threads; 0 builds batches in-process. Default min(4, max(1, cpus / 4)). */
  workers?: number;
  /** Batches requested ahead of the one being consumed; default max(2, 2 * workers). */
  prefetch?: number;
  /** Share of samples centred on a tumour voxel; default 1/3. */
  foregroundFraction?: number;
  /**
   * Which tumour voxels foreground samples are centred on: 'annotators' (default: the union
   * of the present annotators' foreground, what a real training set provides) or
   * 'consensus' (the expert label; only for oracle experiments).
   */
  foregroundFrom?: 'annotators' | 'consensus';
  /** false: no flips and no intensity change (validation). Default true. */
  augment?: boolean;
  /** Probability of a flip along each axis; default 0.5. */
  flipProbability?: number;
  /** Per-channel intensity scale range; default [0.9, 1.1]. */
  intensityScale?: readonly [number, number];
  /** Per-channel intensity shift range (z-score units); default [-0.1, 0.1]. */
  intensityShift?: readonly [number, number];
  /** Index of the first batch next() returns: resume a run where it stopped. Default 0. */
  firstBatch?: number;
  /**
   * Also cut every sample's training target from the case's map fused by this STAPLE
   * variant (PatchBatch.fused). Every case must have a current one in the cache
   * (fuseCachedCases); the loader refuses to open otherwise.
   */
  fused?: CacheFusion;
}

/** The resolved sampling settings, as sent to the workers (plain data). */
export interface PatchSamplingSettings {
  patchSize: [number, number, number];
  batchSize: number;
  seed: number;
  foregroundFraction: number;
  foregroundFrom: 'annotators' | 'consensus';
  flipProbability: number;
  intensityScale: [number, number];
  intensityShift: [number, number];
}

/** What a sampler needs to know about one case (from the cache index). */
export interface SamplerCase {
  id: string;
  /** Absolute path of the case file. */
  file: string;
  shape: [number, number, number, number];
  /** Absolute path of the case's fused label file, when batches carry fused targets. */
  fusedFile?: string;
}

/** How one sample of a batch was drawn (for tests, debugging and reports). */
export interface PatchSample {
  caseId: string;
  /** Case voxel [z, y, x] at patch voxel (0, 0, 0) before flipping; may be negative (padding). */
  origin: [number, number, number];
  /** Flip along [D, H, W]. */
  flip: [boolean, boolean, boolean];
  /** Centred on a tumour voxel (then `centre` is that voxel). */
  foreground: boolean;
  centre?: [number, number, number];
  scale: number[];
  shift: number[];
}

/** One training batch, ready for Model.trainStep. */
export interface PatchBatch {
  /** Position of this batch in the stream (the index its randomness is derived from). */
  index: number;
  /** [B, C, D, H, W] float32. */
  images: Float32Array;
  shape: [number, number, number, number, number];
  /** One [B, D, H, W] map per annotator (255 = unlabelled). */
  labels: Uint8Array[];
  /** [B, R]: 1 when annotator r labelled the case sample b came from. */
  present: Uint8Array;
  /** Expert consensus [B, D, H, W] (oracle training, evaluation). */
  consensus: Uint8Array;
  /** The cases' fused maps [B, D, H, W] (PatchLoaderOptions.fused): the STAPLE baselines' target. */
  fused?: Uint8Array;
  samples: PatchSample[];
}

export class PatchLoaderError extends Error {
  constructor(message: string, readonly value?: unknown, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'PatchLoaderError';
  }
}

/**
 * A damaged case file (bytes changed on disk after `cmseg prepare` checked them) would
 * otherwise surface as "images contain NaN at index ..." from the training step, naming
 * no file: checked per patch here (one pass, small beside the step), naming the case.
 */
function checkSlot(c: SamplerCase, classes: number, b: number, channels: number, patchVoxels: number, out: BatchBuffers): void {
  const damaged = (what: string) =>
    new PatchLoaderError(`the cache file ${c.file} of case ${c.id} is damaged: ${what}; prepare the case again (cmseg prepare --rebuild)`, c.file);
  const images = out.images.subarray(b * channels * patchVoxels, (b + 1) * channels * patchVoxels);
  for (let i = 0; i < images.length; i++) {
    if (!Number.isFinite(images[i])) throw damaged(`its image channel ${Math.floor(i / patchVoxels)} holds ${images[i]}`);
  }
  const maps: [string, Uint8Array][] = [['consensus', out.consensus], ...out.labels.map((l, r): [string, Uint8Array] => [`annotator ${r}'s labels`, l])];
  if (out.fused) maps.push(['the fused labels', out.fused]);
  for (const [what, map] of maps) {
    const slot = map.subarray(b * patchVoxels, (b + 1) * patchVoxels);
    for (let i = 0; i < slot.length; i++) {
      if (slot[i] >= classes && slot[i] !== UNLABELLED) throw damaged(`${what} hold label ${slot[i]} (classes 0..${classes - 1}, 255 unlabelled)`);
    }
  }
}

export const PATCH_LOADER_DEFAULTS = {
  patchSize: 64,
  batchSize: 1,
  foregroundFraction: 1 / 3,
  flipProbability: 0.5,
  intensityScale: [0.9, 1.1] as const,
  intensityShift: [-0.1, 0.1] as const,
} as const;

function defaultWorkers(): number {
  // The CPUs this process can keep busy (a container's CPU quota and an affinity mask count).
  const cpus = loadNative().backendInfo().usableCpus;
  return Math.min(4, Math.max(1, Math.floor(cpus / 4)));
}

function checkRange(name: string, range: readonly number[], min: number): [number, number] {
  if (range.length !== 2 || !(range[0] <= range[1]) || !(range[0] >= min) || !range.every(Number.isFinite)) {
    throw new PatchLoaderError(`${name} [${range.join(', ')}] must be [low, high] with ${min} <= low <= high`, range);
  }
  return [range[0], range[1]];
}

/** Validates options and fills in the defaults. */
export function resolveSamplingSettings(options: Omit<PatchLoaderOptions, 'cacheDir'>): PatchSamplingSettings {
  const p = options.patchSize ?? PATCH_LOADER_DEFAULTS.patchSize;
  const patchSize = (typeof p === 'number' ? [p, p, p] : [...p]) as [number, number, number];
  if (patchSize.length !== 3 || patchSize.some((n) => !Number.isInteger(n) || n < 1)) {
    throw new PatchLoaderError(`patchSize ${JSON.stringify(p)} must be a positive integer or [D, H, W] of them`, p);
  }
  const batchSize = options.batchSize ?? PATCH_LOADER_DEFAULTS.batchSize;
  if (!Number.isInteger(batchSize) || batchSize < 1) throw new PatchLoaderError(`batchSize ${batchSize} must be an integer >= 1`, batchSize);
  const seed = options.seed ?? 0;
  if (!Number.isSafeInteger(seed)) throw new PatchLoaderError(`seed ${seed} must be a safe integer`, seed);
  const foregroundFraction = options.foregroundFraction ?? PATCH_LOADER_DEFAULTS.foregroundFraction;
  if (!(foregroundFraction >= 0 && foregroundFraction <= 1)) {
    throw new PatchLoaderError(`foregroundFraction ${foregroundFraction} must be in [0, 1]`, foregroundFraction);
  }
  const foregroundFrom = options.foregroundFrom ?? 'annotators';
  if (foregroundFrom !== 'annotators' && foregroundFrom !== 'consensus') {
    throw new PatchLoaderError(`foregroundFrom ${JSON.stringify(foregroundFrom)} must be 'annotators' or 'consensus'`, foregroundFrom);
  }
  const augment = options.augment ?? true;
  const flipProbability = augment ? options.flipProbability ?? PATCH_LOADER_DEFAULTS.flipProbability : 0;
  if (!(flipProbability >= 0 && flipProbability <= 1)) throw new PatchLoaderError(`flipProbability ${flipProbability} must be in [0, 1]`, flipProbability);
  const intensityScale = augment ? checkRange('intensityScale', options.intensityScale ?? PATCH_LOADER_DEFAULTS.intensityScale, 0) : ([1, 1] as [number, number]);
  const intensityShift = augment ? checkRange('intensityShift', options.intensityShift ?? PATCH_LOADER_DEFAULTS.intensityShift, -Infinity) : ([0, 0] as [number, number]);
  return { patchSize, batchSize, seed, foregroundFraction, foregroundFrom, flipProbability, intensityScale, intensityShift };
}

// ---------------------------------------------------------------------------
// Building one batch (runs in the workers, or in-process)

const MAX_OPEN_CASES = 32;

/** Origin range along one axis: inside the case when it is larger than the patch, else any padding. */
function originRange(caseSize: number, patch: number): [number, number] {
  return [Math.min(0, caseSize - patch), Math.max(0, caseSize - patch)];
}

/** Source coordinate of every patch coordinate along one axis; -1 where the patch pads. */
function sourceMap(caseSize: number, patch: number, origin: number, flipped: boolean): Int32Array {
  const map = new Int32Array(patch);
  for (let k = 0; k < patch; k++) {
    const src = origin + (flipped ? patch - 1 - k : k);
    map[k] = src >= 0 && src < caseSize ? src : -1;
  }
  return map;
}

// One slice of rows with intensity augmentation: patch row py takes source row yMap[py]
// (relative to y0), x from sxStart in direction step. Kept as two monomorphic functions:
// one loop over a Uint16Array | Float32Array union is several times slower in V8.
function copyRowsFloat16(
  src: Uint16Array, yMap: Int32Array, y0: number, W: number, sxStart: number, step: number,
  dst: Float32Array, to: number, pw: number, run: number, scale: number, shift: number,
): void {
  const table = float16DecodeTable();
  for (let py = 0; py < yMap.length; py++) {
    const sy = yMap[py];
    if (sy < 0) continue;
    const o = to + py * pw;
    for (let k = 0, i = (sy - y0) * W + sxStart; k < run; k++, i += step) dst[o + k] = table[src[i]] * scale + shift;
  }
}

function copyRowsFloat32(
  src: Float32Array, yMap: Int32Array, y0: number, W: number, sxStart: number, step: number,
  dst: Float32Array, to: number, pw: number, run: number, scale: number, shift: number,
): void {
  for (let py = 0; py < yMap.length; py++) {
    const sy = yMap[py];
    if (sy < 0) continue;
    const o = to + py * pw;
    for (let k = 0, i = (sy - y0) * W + sxStart; k < run; k++, i += step) dst[o + k] = src[i] * scale + shift;
  }
}

/** A case's open files: the case file, and its fused map when batches carry one. */
interface OpenCase {
  reader: CaseFileReader;
  fused?: FusedFileReader;
}

interface BatchBuffers {
  images: Float32Array;
  consensus: Uint8Array;
  labels: Uint8Array[];
  present: Uint8Array;
  fused?: Uint8Array;
}

/** Builds batches from case files; holds an LRU of open files. Synchronous. */
export class PatchSampler {
  private readonly readers = new Map<string, OpenCase>();
  private scratch = Buffer.from(new ArrayBuffer(1 << 16));
  private readonly names: string[];
  /** Batches carry fused targets (every case has a fused file). */
  private readonly withFused: boolean;

  constructor(
    private readonly cases: readonly SamplerCase[],
    readonly settings: PatchSamplingSettings,
    names: readonly string[],
  ) {
    if (cases.length === 0) throw new PatchLoaderError('no cases to sample patches from');
    this.names = [...names];
    this.withFused = cases[0].fusedFile !== undefined;
    const odd = cases.find((c) => (c.fusedFile !== undefined) !== this.withFused);
    if (odd) throw new PatchLoaderError(`case ${odd.id} ${this.withFused ? 'lacks' : 'has'} a fused label file unlike case ${cases[0].id}`, odd.id);
  }

  private reader(c: SamplerCase): OpenCase {
    let open = this.readers.get(c.id);
    if (open) {
      // Move to the back: most recently used.
      this.readers.delete(c.id);
      this.readers.set(c.id, open);
      return open;
    }
    if (this.readers.size >= MAX_OPEN_CASES) {
      const [oldest, old] = this.readers.entries().next().value as [string, OpenCase];
      old.reader.close();
      old.fused?.close();
      this.readers.delete(oldest);
    }
    const reader = CaseFileReader.open(c.file);
    let fused: FusedFileReader | undefined;
    try {
      checkHeader(reader.header, c, this.names);
      if (c.fusedFile) {
        fused = FusedFileReader.open(c.fusedFile);
        checkFusedHeader(fused.header, reader.header, c);
      }
    } catch (err) {
      reader.close();
      fused?.close();
      throw err;
    }
    open = { reader, ...(fused ? { fused } : {}) };
    this.readers.set(c.id, open);
    return open;
  }

  private scratchOf(bytes: number): Buffer {
    if (this.scratch.byteLength < bytes) this.scratch = Buffer.from(new ArrayBuffer(bytes));
    return this.scratch;
  }

  batch(index: number): PatchBatch {
    if (!Number.isSafeInteger(index) || index < 0) throw new PatchLoaderError(`batch index ${index} must be an integer >= 0`, index);
    const { batchSize: B, patchSize } = this.settings;
    const [pd, ph, pw] = patchSize;
    const channels = this.cases[0].shape[0];
    const R = this.names.length;
    const patchVoxels = pd * ph * pw;
    const images = new Float32Array(B * channels * patchVoxels);
    const consensus = new Uint8Array(B * patchVoxels);
    const labels = this.names.map(() => new Uint8Array(B * patchVoxels));
    const present = new Uint8Array(B * R);
    // Padding is background (0) in the fused map too, as in the annotators' maps.
    const fused = this.withFused ? new Uint8Array(B * patchVoxels) : undefined;
    const samples: PatchSample[] = [];
    const rng = new Rng(this.settings.seed).fork(index);
    for (let b = 0; b < B; b++) {
      const sample = this.sampleOne(rng.fork(b), b, { images, consensus, labels, present, ...(fused ? { fused } : {}) });
      samples.push(sample);
    }
    return { index, images, shape: [B, channels, pd, ph, pw], labels, present, consensus, ...(fused ? { fused } : {}), samples };
  }

  private sampleOne(rng: Rng, b: number, out: BatchBuffers): PatchSample {
    const s = this.settings;
    const c = this.cases[rng.int(this.cases.length)];
    const open = this.reader(c);
    const reader = open.reader;
    const header = reader.header;
    const [C, D, H, W] = header.shape;
    const caseSize = [D, H, W];
    const patch = s.patchSize;

    // Position.
    const wantForeground = rng.uniform() < s.foregroundFraction;
    const locations = s.foregroundFrom === 'consensus' ? header.sections.foreground.consensus : header.sections.foreground.annotators;
    const origin: [number, number, number] = [0, 0, 0];
    let centre: [number, number, number] | undefined;
    if (wantForeground && locations.count > 0) {
      const voxel = reader.readLocation(locations, rng.int(locations.count));
      centre = [Math.floor(voxel / (H * W)), Math.floor(voxel / W) % H, voxel % W];
      for (let a = 0; a < 3; a++) {
        const [lo, hi] = originRange(caseSize[a], patch[a]);
        origin[a] = Math.min(hi, Math.max(lo, centre[a] - Math.floor(patch[a] / 2)));
      }
    } else {
      for (let a = 0; a < 3; a++) {
        const [lo, hi] = originRange(caseSize[a], patch[a]);
        origin[a] = lo + rng.int(hi - lo + 1);
      }
    }
    const flip: [boolean, boolean, boolean] = [0, 1, 2].map(() => rng.uniform() < s.flipProbability) as [boolean, boolean, boolean];
    const scale: number[] = [];
    const shift: number[] = [];
    for (let ch = 0; ch < C; ch++) {
      scale.push(s.intensityScale[0] + (s.intensityScale[1] - s.intensityScale[0]) * rng.uniform());
      shift.push(s.intensityShift[0] + (s.intensityShift[1] - s.intensityShift[0]) * rng.uniform());
    }

    this.extract(open, origin, flip, scale, shift, b, out);
    checkSlot(c, header.classes, b, C, patch[0] * patch[1] * patch[2], out);
    return { caseId: c.id, origin, flip, foreground: centre !== undefined, ...(centre ? { centre } : {}), scale, shift };
  }

  /** Copies the patch at `origin` (flipped as asked) of every section into slot b of the batch. */
  private extract(
    open: OpenCase,
    origin: [number, number, number],
    flip: [boolean, boolean, boolean],
    scale: number[],
    shift: number[],
    b: number,
    out: BatchBuffers,
  ): void {
    const reader = open.reader;
    const header = reader.header;
    const [C, D, H, W] = header.shape;
    const [pd, ph, pw] = this.settings.patchSize;
    const patchVoxels = pd * ph * pw;
    const R = this.names.length;
    const zMap = sourceMap(D, pd, origin[0], flip[0]);
    const yMap = sourceMap(H, ph, origin[1], flip[1]);
    // Along x one contiguous run of patch voxels [pxStart, pxStart + run) has a source,
    // read from sxStart going up (or down when flipped): no per-voxel index lookups.
    const xMap = sourceMap(W, pw, origin[2], flip[2]);
    let pxStart = 0;
    while (pxStart < pw && xMap[pxStart] < 0) pxStart++;
    let run = 0;
    while (pxStart + run < pw && xMap[pxStart + run] >= 0) run++;
    const sxStart = run > 0 ? xMap[pxStart] : 0;
    const step = flip[2] ? -1 : 1;
    // Rows to read per slice: the valid source rows, whatever the flip.
    const y0 = Math.max(0, origin[1]);
    const rows = Math.max(0, Math.min(H, origin[1] + ph) - y0);
    if (rows === 0 || run === 0) return this.fillAbsent(header, b, patchVoxels, out);

    const float16 = header.dtype === 'float16';
    const elementBytes = float16 ? 2 : 4;
    const scratch = this.scratchOf(rows * W * 4);
    const images = out.images;
    for (let ch = 0; ch < C; ch++) {
      const base = (b * C + ch) * patchVoxels;
      for (let pz = 0; pz < pd; pz++) {
        const sz = zMap[pz];
        if (sz < 0) continue;
        const bytes = reader.readRows(header.sections.images, elementBytes, ch, sz, y0, rows, scratch);
        const to = base + pz * ph * pw + pxStart;
        if (float16) {
          copyRowsFloat16(new Uint16Array(bytes.buffer, bytes.byteOffset, rows * W), yMap, y0, W, sxStart, step, images, to, pw, run, scale[ch], shift[ch]);
        } else {
          copyRowsFloat32(new Float32Array(bytes.buffer, bytes.byteOffset, rows * W), yMap, y0, W, sxStart, step, images, to, pw, run, scale[ch], shift[ch]);
        }
      }
    }

    // Every label map (annotators, consensus, fused) goes through the same index maps, so
    // all of them are cut and flipped exactly as the image.
    const copyLabels = (readSlice: (z: number) => Buffer, target: Uint8Array) => {
      const base = b * patchVoxels;
      for (let pz = 0; pz < pd; pz++) {
        const sz = zMap[pz];
        if (sz < 0) continue;
        const values = readSlice(sz);
        for (let py = 0; py < ph; py++) {
          const sy = yMap[py];
          if (sy < 0) continue;
          const from = (sy - y0) * W + sxStart;
          const to = base + (pz * ph + py) * pw + pxStart;
          if (step > 0) {
            target.set(values.subarray(from, from + run), to);
          } else {
            for (let k = 0; k < run; k++) target[to + k] = values[from - k];
          }
        }
      }
    };
    const fromSection = (section: Section) => (z: number) => reader.readRows(section, 1, 0, z, y0, rows, scratch);
    copyLabels(fromSection(header.sections.consensus), out.consensus);
    for (let r = 0; r < R; r++) {
      const section = header.sections.labels[r];
      if (section) copyLabels(fromSection(section), out.labels[r]);
    }
    const fusedReader = open.fused;
    if (out.fused && fusedReader) copyLabels((z) => fusedReader.readRows(z, y0, rows, scratch), out.fused);
    this.fillAbsent(header, b, patchVoxels, out);
  }

  /** Presence of slot b, and 255 over the whole slot for annotators who did not label the case. */
  private fillAbsent(header: CaseFileHeader, b: number, patchVoxels: number, out: { labels: Uint8Array[]; present: Uint8Array }): void {
    const R = this.names.length;
    for (let r = 0; r < R; r++) {
      if (header.sections.labels[r]) out.present[b * R + r] = 1;
      else out.labels[r].fill(UNLABELLED, b * patchVoxels, (b + 1) * patchVoxels);
    }
  }

  close(): void {
    for (const open of this.readers.values()) {
      open.reader.close();
      open.fused?.close();
    }
    this.readers.clear();
  }
}

function checkFusedHeader(fused: FusedFileHeader, header: CaseFileHeader, c: SamplerCase): void {
  const [, d, h, w] = header.shape;
  if (fused.id !== header.id || JSON.stringify(fused.shape) !== JSON.stringify([d, h, w])) {
    throw new PatchLoaderError(`fused file ${c.fusedFile} holds ${fused.id} ${JSON.stringify(fused.shape)}, the case file ${header.id} [${d}, ${h}, ${w}]: fuse the cache again`, c.fusedFile);
  }
}

function checkHeader(header: CaseFileHeader, c: SamplerCase, names: readonly string[]): void {
  if (JSON.stringify(header.shape) !== JSON.stringify(c.shape) || header.id !== c.id) {
    throw new PatchLoaderError(`case file ${c.file} holds ${header.id} ${JSON.stringify(header.shape)}, the index says ${c.id} ${JSON.stringify(c.shape)}: prepare the cache again`, c.file);
  }
  if (JSON.stringify(header.names) !== JSON.stringify(names)) {
    throw new PatchLoaderError(`case file ${c.file} has annotators [${header.names.join(', ')}], the index [${names.join(', ')}]`, header.names);
  }
}

// ---------------------------------------------------------------------------
// Workers

/** What a worker is started with (workerData). */
export interface PatchWorkerInit {
  cases: SamplerCase[];
  settings: PatchSamplingSettings;
  names: string[];
}

export type PatchWorkerRequest = { type: 'batch'; index: number };
export type PatchWorkerReply =
  | { type: 'batch'; index: number; batch: PatchBatch }
  | { type: 'error'; index: number; message: string; stack?: string };

/** Buffers to transfer (not copy) when posting a batch. */
export function batchTransferList(batch: PatchBatch): ArrayBuffer[] {
  return [batch.images.buffer, batch.consensus.buffer, batch.present.buffer, ...batch.labels.map((l) => l.buffer), ...(batch.fused ? [batch.fused.buffer] : [])] as ArrayBuffer[];
}

// The worker entry may be TypeScript (tests and scripts run through ts-node) or JavaScript
// (dist/). A worker inherits neither the parent's loader hooks nor, here, its execArgv (so
// that test-runner hooks such as coverage and mocks stay out of it), so for TypeScript the
// bootstrap installs its own require hook: typescript.transpileModule (what ts-node's
// transpile-only mode does), with the output kept in a disk cache keyed by the source's
// hash. A cold start transpiles the worker's few modules once; later starts load plain JS
// in milliseconds instead of seconds per worker.
const WORKER_BOOTSTRAP = `
const { workerData, threadId } = require('worker_threads');
const hook = workerData.typeScript;
if (hook) {
  const Module = require('module');
  const fs = require('fs');
  const path = require('path');
  const crypto = require('crypto');
  let ts;
  Module._extensions['.ts'] = function (module, filename) {
    const source = fs.readFileSync(filename, 'utf8');
    const key = crypto.createHash('sha256').update(hook.salt).update(filename).update(source).digest('hex');
    const cached = path.join(hook.cacheDir, key + '.js');
    let code;
    try {
      code = fs.readFileSync(cached, 'utf8');
    } catch {
      ts = ts || require(hook.compiler);
      code = ts.transpileModule(source, { fileName: filename, compilerOptions: hook.compilerOptions }).outputText;
      try {
        fs.mkdirSync(hook.cacheDir, { recursive: true });
        const temp = cached + '.' + process.pid + '.' + threadId + '.tmp';
        fs.writeFileSync(temp, code);
        fs.renameSync(temp, cached);
      } catch {
        // the cache is an optimisation only
      }
    }
    module._compile(code, filename);
  };
}
require(workerData.entry);
`;

interface TypeScriptHook {
  compiler: string;
  cacheDir: string;
  salt: string;
  compilerOptions: Record<string, unknown>;
}

function typeScriptHook(): TypeScriptHook | undefined {
  let compiler: string;
  try {
    compiler = require.resolve('typescript');
  } catch {
    return undefined;
  }
  // CommonJS, ES2022, esModuleInterop: the settings of tsconfig.json that change emitted code.
  const compilerOptions = { module: 1, target: 9, esModuleInterop: true, sourceMap: false };
  const version = (require(path.join(path.dirname(compiler), '..', 'package.json')) as { version: string }).version;
  return {
    compiler,
    cacheDir: path.join(os.tmpdir(), 'cmseg-worker-js'),
    salt: `${version} ${JSON.stringify(compilerOptions)}`,
    compilerOptions,
  };
}

function workerEntry(): { entry: string; typeScript?: TypeScriptHook; problem?: string } {
  const extension = path.extname(__filename);
  const entry = path.join(__dirname, `patch-worker${extension}`);
  if (extension !== '.ts') return { entry };
  const typeScript = typeScriptHook();
  if (!typeScript) return { entry, problem: `cannot run the TypeScript worker ${entry}: the typescript package is not installed (build with \`npm run build:ts\` and use dist/)` };
  return { entry, typeScript };
}

interface Pending {
  promise: Promise<PatchBatch>;
  resolve: (batch: PatchBatch) => void;
  reject: (err: Error) => void;
  /** Settled already (so next() did not have to wait). */
  done: boolean;
}

/**
 * Prefetching batch stream over a prepared cache. `next()` returns batches
 * firstBatch, firstBatch + 1, ...; close() when done (idle workers never keep the
 * process alive, but they hold memory and open files).
 */
export class PatchLoader implements AsyncIterable<PatchBatch> {
  /** 'workers' or 'in-process' (asked for with workers: 0, or when workers cannot start: see fallbackReason). */
  readonly mode: 'workers' | 'in-process';
  readonly fallbackReason?: string;
  readonly workerCount: number;
  readonly prefetch: number;
  readonly settings: PatchSamplingSettings;
  readonly names: string[];
  readonly channels: number;
  readonly classes: number;
  readonly caseIds: string[];
  /** Milliseconds next() spent waiting for a batch that was not ready yet. */
  waitedMs = 0;
  private nextIndex: number;
  private requestedUpTo: number;
  private readonly pending = new Map<number, Pending>();
  private readonly workers: Worker[] = [];
  private readonly inFlight: number[] = [];
  private sampler?: PatchSampler;
  private failure?: Error;
  private closed = false;

  private constructor(options: PatchLoaderOptions, index: CacheIndex) {
    this.settings = resolveSamplingSettings(options);
    const wanted = options.caseIds ? new Set(options.caseIds) : undefined;
    const entries = wanted ? index.cases.filter((c) => wanted.has(c.id)) : index.cases;
    if (wanted) {
      const missing = [...wanted].filter((id) => !index.cases.some((c) => c.id === id));
      if (missing.length > 0) throw new PatchLoaderError(`cases not in the cache at ${options.cacheDir}: ${missing.slice(0, 5).join(', ')}${missing.length > 5 ? ', ...' : ''}`, missing);
    }
    if (entries.length === 0) throw new PatchLoaderError(`no cases to sample from in ${options.cacheDir}`);
    // A missing or cut-short case file stops the loader here, naming the cases, rather than
    // a worker at some later batch (or never, for a patch that reads only intact rows).
    const damaged = damagedCaseFiles(options.cacheDir, entries);
    if (damaged.length > 0) {
      throw new PatchLoaderError(damagedCasesMessage(options.cacheDir, damaged), damaged.map((d) => d.error.path), { cause: damaged[0].error });
    }
    const fusion = options.fused;
    if (fusion !== undefined) {
      // Training on a stale map would silently train on labels the annotators no longer give.
      const lacking = entries.filter((c) => !fusedLabelsCurrent(options.cacheDir, c, fusion));
      if (lacking.length > 0) {
        const ids = lacking.slice(0, 3).map((c) => `${c.id} (${c.fused?.[fusion] ? 'stale' : 'never fused'})`);
        throw new PatchLoaderError(`${lacking.length} case(s) of ${options.cacheDir} have no current ${fusion} labels: ${ids.join(', ')}${lacking.length > 3 ? ', ...' : ''}; fuse them first (fuseCachedCases; cmseg train does it)`, lacking.map((c) => c.id));
      }
    }
    const cases: SamplerCase[] = entries.map((c) => ({
      id: c.id,
      file: path.resolve(options.cacheDir, c.file),
      shape: c.shape,
      ...(fusion !== undefined ? { fusedFile: path.resolve(options.cacheDir, c.fused![fusion]!.file) } : {}),
    }));
    this.caseIds = cases.map((c) => c.id);
    this.names = [...index.names];
    this.channels = index.channels;
    this.classes = index.classes;
    const firstBatch = options.firstBatch ?? 0;
    if (!Number.isSafeInteger(firstBatch) || firstBatch < 0) throw new PatchLoaderError(`firstBatch ${firstBatch} must be an integer >= 0`, firstBatch);
    this.nextIndex = firstBatch;
    this.requestedUpTo = firstBatch;

    let workers = options.workers ?? defaultWorkers();
    if (!Number.isInteger(workers) || workers < 0) throw new PatchLoaderError(`workers ${workers} must be an integer >= 0`, workers);
    const start = workerEntry();
    if (workers > 0 && start.problem) {
      this.fallbackReason = start.problem;
      workers = 0;
    }
    this.mode = workers > 0 ? 'workers' : 'in-process';
    this.workerCount = workers;
    this.prefetch = options.prefetch ?? Math.max(2, 2 * workers);
    if (!Number.isInteger(this.prefetch) || this.prefetch < 1) throw new PatchLoaderError(`prefetch ${this.prefetch} must be an integer >= 1`, this.prefetch);

    if (workers === 0) {
      this.sampler = new PatchSampler(cases, this.settings, this.names);
    } else {
      const init: PatchWorkerInit = { cases, settings: this.settings, names: this.names };
      for (let k = 0; k < workers; k++) {
        const worker = new Worker(WORKER_BOOTSTRAP, {
          eval: true,
          execArgv: [],
          workerData: { ...init, entry: start.entry, typeScript: start.typeScript },
        });
        worker.on('message', (reply: PatchWorkerReply) => this.onReply(k, reply));
        worker.on('error', (err) => this.fail(new PatchLoaderError(`patch worker ${k} failed: ${err.message}`, k, { cause: err })));
        worker.on('exit', (code) => {
          if (!this.closed) this.fail(new PatchLoaderError(`patch worker ${k} exited (code ${code}) while the loader was open`, code));
        });
        worker.unref();
        this.workers.push(worker);
        this.inFlight.push(0);
      }
    }
    this.fillQueue();
  }

  /** Opens a loader over the cache at options.cacheDir. */
  static async open(options: PatchLoaderOptions): Promise<PatchLoader> {
    return new PatchLoader(options, readCacheIndex(options.cacheDir));
  }

  private fillQueue(): void {
    while (this.requestedUpTo < this.nextIndex + this.prefetch) this.request(this.requestedUpTo++);
  }

  private request(index: number): void {
    const entry = { done: false } as Pending;
    entry.promise = new Promise<PatchBatch>((resolve, reject) => {
      entry.resolve = (batch) => {
        entry.done = true;
        resolve(batch);
      };
      entry.reject = (err) => {
        entry.done = true;
        reject(err);
      };
    });
    entry.promise.catch(() => undefined); // surfaced by next(); not an unhandled rejection meanwhile
    const worker = this.workers.length > 0 ? index % this.workers.length : -1;
    this.pending.set(index, entry);
    if (this.failure) {
      entry.reject(this.failure);
      return;
    }
    if (worker < 0) {
      // In-process: build it on a later turn of the event loop, in request order.
      setImmediate(() => {
        const entry = this.pending.get(index);
        if (!entry || this.closed) return;
        try {
          entry.resolve((this.sampler as PatchSampler).batch(index));
        } catch (err) {
          entry.reject(err as Error);
        }
      });
      return;
    }
    if (this.inFlight[worker]++ === 0) this.workers[worker].ref();
    this.workers[worker].postMessage({ type: 'batch', index } satisfies PatchWorkerRequest);
  }

  private onReply(worker: number, reply: PatchWorkerReply): void {
    // After close() a late reply is dropped, and its worker stays ref'd until its
    // exit: unref'ing it here let the event loop empty while close() still awaited
    // that exit (the process ended mid-await; a rare "test unfinished" under load).
    if (this.closed) return;
    if (--this.inFlight[worker] === 0) this.workers[worker].unref();
    const entry = this.pending.get(reply.index);
    if (!entry) return;
    if (reply.type === 'batch') {
      entry.resolve(reply.batch);
    } else {
      const err = new PatchLoaderError(`batch ${reply.index}: ${reply.message}`, reply.index);
      if (reply.stack) err.stack = `${err.name}: ${err.message}\n(worker) ${reply.stack}`;
      entry.reject(err);
    }
  }

  private fail(err: Error): void {
    if (this.failure) return;
    this.failure = err;
    for (const entry of this.pending.values()) entry.reject(err);
  }

  /** The next batch of the stream. */
  async next(): Promise<PatchBatch> {
    if (this.closed) throw new PatchLoaderError('the patch loader is closed');
    const index = this.nextIndex++;
    this.fillQueue();
    const entry = this.pending.get(index) as Pending;
    const waited = !entry.done;
    const started = performance.now();
    try {
      return await entry.promise;
    } finally {
      if (waited) this.waitedMs += performance.now() - started;
      this.pending.delete(index);
    }
  }

  async *[Symbol.asyncIterator](): AsyncIterator<PatchBatch> {
    while (!this.closed) yield await this.next();
  }

  /** Stops the workers and closes the case files. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    const closedError = new PatchLoaderError('the patch loader was closed');
    for (const entry of this.pending.values()) entry.reject(closedError);
    this.pending.clear();
    this.sampler?.close();
    // Idle workers are unref'd: ref them so that the event loop waits for their exit.
    for (const w of this.workers) w.ref();
    await Promise.all(this.workers.map((w) => w.terminate()));
  }
}

/** Shorthand for PatchLoader.open. */
export function createPatchLoader(options: PatchLoaderOptions): Promise<PatchLoader> {
  return PatchLoader.open(options);
}
