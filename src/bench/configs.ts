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
}

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
    model: { ndim: 3, inChannels: 4, classes: 4, annotators: 3, depth: 4, baseChannels: 16, cmMode: 'full', loss: { lambda: 0.01 } },
    device: 'cpu',
  },
  {
    name: 'brats3d-gpu',
    shape: [2, 4, 128, 128, 128],
    model: { ndim: 3, inChannels: 4, classes: 4, annotators: 3, depth: 4, baseChannels: 32, cmMode: 'full', loss: { lambda: 0.01 } },
    device: 'gpu',
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
