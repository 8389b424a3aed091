// Loads the compiled addon (build/Release/cmseg.node) and declares its shape.
// When it is missing or fails to load, the error says what happened and how to
// build it, instead of a bare "Cannot find module".
import * as fs from 'fs';
import * as path from 'path';

export interface NativeStepResult {
  loss: number;
  ce: number[];
  trace: number[];
  traceWeight: number;
  step: number;
}

export interface NativeBatch {
  images: Float32Array;
  shape: number[];
  labels?: Uint8Array[];
  present?: Uint8Array;
  target?: Uint8Array;
  softTarget?: Float32Array;
}

export interface NativePrediction {
  probs: Float32Array;
  cms?: Float32Array;
  annotatorProbs?: Float32Array;
}

export interface NativeModel {
  trainStep(batch: NativeBatch): Promise<NativeStepResult>;
  computeGradients(batch: NativeBatch): Promise<NativeStepResult>;
  evaluate(batch: NativeBatch): Promise<NativeStepResult>;
  predict(
    images: Float32Array,
    shape: number[],
    options?: { cms?: boolean; annotatorProbs?: boolean },
    into?: { probs?: Float32Array; cms?: Float32Array; annotatorProbs?: Float32Array },
  ): Promise<NativePrediction>;
  parameters(): { name: string; shape: number[] }[];
  getWeights(): Record<string, Float32Array>;
  getGradients(): Record<string, Float32Array>;
  setWeights(weights: Record<string, Float32Array>): void;
  getOptimizerState(): { step: number; m: Record<string, Float32Array>; v: Record<string, Float32Array> };
  setOptimizerState(state: { step?: number; m?: Record<string, Float32Array>; v?: Record<string, Float32Array> }): void;
  getOptimizer(): Record<string, number | string>;
  setOptimizer(options: Record<string, unknown>): void;
  getLoss(): Record<string, number>;
  setLoss(options: Record<string, unknown>): void;
  config(): Record<string, unknown>;
  memory(): ModelMemory;
  resetPeakMemory(): void;
  /** Frees the activation buffers kept between calls (they are allocated again by the next call). */
  releaseBuffers(): void;
  /** Frees the native model now; later calls throw "this model was disposed". */
  dispose(): void;
}

/**
 * Where a model's tensors live; for a GPU model, its device memory pool in MB. A union, so
 * that `if (m.device === 'cuda')` gives the figures without a check of each for undefined.
 */
export type ModelMemory =
  | { device: 'cpu' }
  | {
      device: 'cuda';
      /** MB of the pool held by live tensors now. */
      inUseMB: number;
      /** The most held at once since creation or the last resetPeakMemory(). */
      peakInUseMB: number;
      /** MB the pool has taken from the device (in use or cached for reuse). */
      reservedMB: number;
    };

export interface NativeBackendInfo {
  cpu: boolean;
  onednn: boolean;
  cuda: boolean;
  cudnn: boolean;
  /** the native thread pool's threads now (setNumThreads changes it) */
  threads: number;
  /** what the pool starts with: CMSEG_NUM_THREADS, else the CPUs this process can keep busy (the cores, fewer under an affinity mask or a cgroup CPU quota) */
  defaultThreads: number;
  /** why defaultThreads is that many, e.g. "the machine's 16 cores", "the cgroup CPU quota: 4 CPUs of 64 cores", "CMSEG_NUM_THREADS=8" */
  threadsReason: string;
  /** the CPUs this process can keep busy: the cores, fewer under an affinity mask (taskset, a cpuset) or a cgroup CPU quota (rounded up) */
  usableCpus: number;
  /** CUDA built and a device usable now */
  gpuAvailable: boolean;
  gpu: string | null;
  cudnnVersion: number;
  /** why no GPU is usable (absent when one is): no device, a driver too old, or a build without CUDA */
  gpuUnavailableReason?: string;
  /** whether the whole training step can run on the GPU */
  cudaTraining: boolean;
  /** precision modes of a 'cuda' model: 'fp32' (tf32: false), 'tf32' (the default) and 'bf16' (bf16: true); empty without CUDA */
  gpuPrecisions: string[];
  simd: string;
  compiler: string;
}

export interface NativeAddon {
  NativeModel: new (config: Record<string, unknown>) => NativeModel;
  backendInfo(): NativeBackendInfo;
  setNumThreads(n: number): void;
  measurePeakGflops(seconds: number): number;
  /**
   * Adds one window's `channels` outputs ([channels, pd, ph, pw] from values[offset]) times
   * `weights` ([pd, ph, pw]) into `sum` ([channels, d, h, w]) at window voxels [from, to) per
   * axis, window voxel 0 at volume coordinate `origin` (sliding-window stitching; sums bit for
   * bit JavaScript's).
   */
  stitchWindow(
    sum: Float32Array | Float64Array, volume: number[], values: Float32Array, offset: number, weights: Float64Array,
    patch: number[], channels: number, from: number[], to: number[], origin: number[],
  ): void;
  /** mean[k*V + v] = sum[k*V + v] / weightSum[v] for k < channels, V = weightSum.length (mean may be sum itself). */
  divideByWeights(sum: Float32Array | Float64Array, weightSum: Float64Array, channels: number, mean: Float32Array): void;
  /** Claims (take true) or gives up a name for the whole process, worker threads included; whether it changed. */
  processClaim(name: string, take: boolean): boolean;
  /** Ends the process at once (std::_Exit), without waiting for native calls in flight. */
  exitNow(code: number): never;
  [key: string]: unknown;
}

const packageRoot = path.resolve(__dirname, '..');

function candidates(): string[] {
  const fromEnv = process.env.CMSEG_ADDON;
  return [
    ...(fromEnv ? [path.resolve(fromEnv)] : []),
    path.join(packageRoot, 'build', 'Release', 'cmseg.node'),
    path.join(packageRoot, 'build', 'Debug', 'cmseg.node'),
  ];
}

let cached: NativeAddon | undefined;

export function loadNative(): NativeAddon {
  if (cached) return cached;
  const tried = candidates();
  for (const file of tried) {
    if (!fs.existsSync(file)) continue;
    try {
      // eslint-disable-next-line @typescript-eslint/no-require-imports
      cached = require(file) as NativeAddon;
      return cached;
    } catch (err) {
      throw new Error(`the native addon at ${file} exists but failed to load: ${(err as Error).message}\n${howToBuild('Rebuild')}`);
    }
  }
  throw new Error(`the native addon is not built (looked for ${tried.join(', ')}).\n${howToBuild('Build')}`);
}

// A clone (src/ beside dist/) builds with its own npm script; an installed package is rebuilt
// from the project that depends on it, where `npm run build:native` is no script at all.
function howToBuild(verb: 'Build' | 'Rebuild'): string {
  const needs = 'needs cmake >= 3.18 and a C++17 compiler';
  if (fs.existsSync(path.join(packageRoot, 'src'))) return `${verb} it with \`npm run build:native\` in ${packageRoot} (${needs}).`;
  return `${verb} it with \`npm rebuild cmseg\` in your project (${needs}; npm 11 may first want \`npm install-scripts approve cmseg\`).`;
}
