// The standard benchmark configurations of SPEC section 8: the single place
// where their shapes live (the PyTorch reference has the same table).
import { ModelConfig } from '../model/config';

export interface BenchConfig {
  name: string;
  /** [N, C, *S] */
  shape: number[];
  model: ModelConfig;
  /** where it is meant to run */
  device: 'cpu' | 'gpu';
  /**
   * What one timed step is: 'train' (forward, CM loss, backward, Adam update; SPEC section 8)
   * or 'predict' (one forward pass giving p and every annotator's q_r = A_r p, as a batch of
   * sliding windows in `cmseg predict`). Default 'train'.
   */
  kind?: 'train' | 'predict';
}

// The brats3d networks, trained by the training configs and run by the predict ones.
const BRATS3D_CPU_MODEL: ModelConfig = { ndim: 3, inChannels: 4, classes: 4, annotators: 3, depth: 4, baseChannels: 16, cmMode: 'full', loss: { lambda: 0.01 } };
const BRATS3D_GPU_MODEL: ModelConfig = { ndim: 3, inChannels: 4, classes: 4, annotators: 3, depth: 4, baseChannels: 32, cmMode: 'full', loss: { lambda: 0.01 } };

export const BENCH_CONFIGS: BenchConfig[] = [
  {
    name: 'mnist2d',
    shape: [32, 1, 32, 32],
    model: { ndim: 2, inChannels: 1, classes: 2, annotators: 4, depth: 4, baseChannels: 32, cmMode: 'full', loss: { lambda: 0.01 } },
    device: 'cpu',
  },
  {
    name: 'brats3d-cpu',
    shape: [1, 4, 64, 64, 64],
    model: BRATS3D_CPU_MODEL,
    device: 'cpu',
  },
  {
    name: 'brats3d-gpu',
    shape: [2, 4, 128, 128, 128],
    model: BRATS3D_GPU_MODEL,
    device: 'gpu',
  },
  // Inference: the brats3d models predicting one batch of sliding windows (predict's default
  // batch of 2 windows of the presets' patch), consensus and annotator maps, no gradients.
  {
    name: 'brats3d-cpu-predict',
    shape: [2, 4, 64, 64, 64],
    model: BRATS3D_CPU_MODEL,
    device: 'cpu',
    kind: 'predict',
  },
  {
    name: 'brats3d-gpu-predict',
    shape: [2, 4, 128, 128, 128],
    model: BRATS3D_GPU_MODEL,
    device: 'gpu',
    kind: 'predict',
  },
];

export function benchConfig(name: string): BenchConfig {
  const c = BENCH_CONFIGS.find((b) => b.name === name);
  if (!c) throw new Error(`unknown benchmark config '${name}' (known: ${BENCH_CONFIGS.map((b) => b.name).join(', ')})`);
  return c;
}

export function voxelsPerStep(c: BenchConfig): number {
  const [n, , ...spatial] = c.shape;
  return n * spatial.reduce((a, b) => a * b, 1);
}

/** Forward passes' worth of convolution work in one step: a training step counts 3 (forward, backward data, backward weights). */
export function passesPerStep(c: BenchConfig): number {
  return c.kind === 'predict' ? 1 : 3;
}
