// Real-size audit (BraTS volumes, 240x240x155, R*L*L CM channels per voxel): the parts of
// whole-volume prediction whose cost grows with the volume. Real-size timings live in the
// audit's report; here, exact results on small volumes against an independent NumPy oracle.
//
// The stitching of sliding windows (src/model/sliding-window.ts) adds each window's outputs
// channel by channel (a layout chosen for speed on BraTS-sized CM sums); a fake model whose
// outputs differ from window to window (unlike a per-voxel model, where every window agrees
// and any weights give the same mean) checks that every channel gets its own values with
// the Gaussian weights of the right window, in both the Float32 and the Float64 sums.
// And the stitching holds one batch of window outputs at a time, not two (measured through
// process.memoryUsage().arrayBuffers after a forced collection).
import t from 'tap';
import { setFlagsFromString } from 'v8';
import { runInNewContext } from 'vm';
import { slidingWindowPredict, SlidingWindowModel, maxWindowsPerVoxel, windowStarts, FLOAT32_SUM_WINDOWS } from '../src/model/sliding-window';
import { missingPythonModules, runPython } from './helpers/python';

const L = 3;
const R = 2;
const CHANNELS = L + R * L * L + R * L; // probs, cms, q: one value function, channel offsets apart

/**
 * The output of channel k at window voxel (z, y, x) of a window whose first voxel lies at
 * volume coordinates (oz, oy, ox) (negative along an axis padded in front): smooth in the
 * voxel, different for every window and channel. The oracle below computes the same.
 */
function value(k: number, oz: number, oy: number, ox: number, z: number, y: number, x: number): number {
  return 0.5 + 0.4 * Math.sin(0.7 * k + 0.31 * oz + 0.17 * oy + 0.23 * ox + 0.05 * (z + 2 * y + 3 * x));
}

/** Reads each window's place from its input (channel 0 = volume index + 1, 0 = padding). */
class WindowAwareModel implements SlidingWindowModel {
  readonly config = { classes: L, annotators: R, inChannels: 1, ndim: 3 as const, depth: 1 };
  constructor(readonly extent: { d: number; h: number; w: number }) {}
  async predict(images: Float32Array, shape: number[], options: { cms?: boolean; annotatorProbs?: boolean } = {}) {
    const [n, , pd, ph, pw] = shape;
    const Pv = pd * ph * pw;
    const { h: H, w: W } = this.extent;
    const probs = new Float32Array(n * L * Pv);
    const cms = new Float32Array(n * R * L * L * Pv);
    const q = new Float32Array(n * R * L * Pv);
    for (let b = 0; b < n; b++) {
      let first = 0;
      while (images[b * Pv + first] === 0) first++;
      const g = images[b * Pv + first] - 1;
      const [gz, gy, gx] = [Math.floor(g / (H * W)), Math.floor(g / W) % H, g % W];
      const [lz, ly, lx] = [Math.floor(first / (ph * pw)), Math.floor(first / pw) % ph, first % pw];
      const [oz, oy, ox] = [gz - lz, gy - ly, gx - lx];
      for (let v = 0; v < Pv; v++) {
        const [z, y, x] = [Math.floor(v / (ph * pw)), Math.floor(v / pw) % ph, v % pw];
        for (let k = 0; k < L; k++) probs[(b * L + k) * Pv + v] = value(k, oz, oy, ox, z, y, x);
        for (let k = 0; k < R * L * L; k++) cms[(b * R * L * L + k) * Pv + v] = value(L + k, oz, oy, ox, z, y, x);
        for (let k = 0; k < R * L; k++) q[(b * R * L + k) * Pv + v] = value(L + R * L * L + k, oz, oy, ox, z, y, x);
      }
    }
    return { probs, ...(options.cms ? { cms } : {}), ...(options.annotatorProbs ? { annotatorProbs: q } : {}) };
  }
}

// NumPy: the documented geometry (windows from 0 to flush with the far edge, a volume smaller
// than the patch centred in one padded window), the Gaussian map (sigma = patch / 8, centre 1,
// floor 1e-3), the same per-window values rounded to float32, summed in float64.
const ORACLE = `
import sys, math, base64, numpy as np
D, H, W, P, overlap = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
K = int(sys.argv[6])
def starts(size, patch, step):
    if size <= patch: return [0]
    n = math.ceil((size - patch) / step)
    return [int(np.floor(i * (size - patch) / n + 0.5)) for i in range(n + 1)]
axes = []
for size in (D, H, W):
    padded = max(size, P)
    before = (padded - size) // 2
    axes.append([s - before for s in starts(padded, P, max(1, math.floor(P * (1 - overlap))))])
g = np.exp(-0.5 * ((np.arange(P) - (P - 1) / 2) / (P / 8)) ** 2)
w = np.maximum(1e-3, g[:, None, None] * g[None, :, None] * g[None, None, :] / g.max() ** 3)
z, y, x = np.meshgrid(np.arange(P), np.arange(P), np.arange(P), indexing='ij')
num = np.zeros((K, D, H, W)); den = np.zeros((D, H, W))
count = 0
for oz in axes[0]:
    for oy in axes[1]:
        for ox in axes[2]:
            count += 1
            src = tuple(slice(max(0, -o), min(P, n - o)) for o, n in zip((oz, oy, ox), (D, H, W)))
            dst = tuple(slice(max(0, o), min(n, o + P)) for o, n in zip((oz, oy, ox), (D, H, W)))
            den[dst] += w[src]
            for k in range(K):
                v = (0.5 + 0.4 * np.sin(0.7 * k + 0.31 * oz + 0.17 * oy + 0.23 * ox + 0.05 * (z + 2 * y + 3 * x))).astype(np.float32)
                num[(k,) + dst] += w[src] * v[src]
mean = num / den
print(count)
print(base64.b64encode(mean.astype('<f4').tobytes()).decode())
`;

function oracle(extent: { d: number; h: number; w: number }, patch: number, overlap: number): { windows: number; mean: Float32Array } {
  const b64 = runPython(ORACLE, [extent.d, extent.h, extent.w, patch, overlap, CHANNELS].map(String));
  const [count, data] = b64.trim().split('\n');
  const bytes = Buffer.from(data, 'base64');
  return { windows: Number(count), mean: new Float32Array(bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength)) };
}

function maxRelDiff(a: Float32Array, b: Float32Array, offset: number): number {
  let worst = 0;
  for (let i = 0; i < a.length; i++) worst = Math.max(worst, Math.abs(a[i] - b[offset + i]) / Math.abs(b[offset + i]));
  return worst;
}

t.test('sliding-window stitching: every channel of probs, CMs and q is the Gaussian-weighted mean of its windows (NumPy)', { skip: missingPythonModules('numpy') }, async (t) => {
  // d smaller than the patch (one window, padded both sides), h and w not multiples of the step.
  const extent = { d: 10, h: 37, w: 29 };
  const P = 16;
  const V = extent.d * extent.h * extent.w;
  const volume = Float32Array.from({ length: V }, (_, i) => i + 1);
  for (const overlap of [0.5, 0.9]) {
    // 0.5: a few windows per voxel, Float32 sums; 0.9: hundreds, Float64 sums.
    const maxStep = Math.max(1, Math.floor(P * (1 - overlap)));
    const perVoxel = maxWindowsPerVoxel([extent.d, extent.h, extent.w].map((n) => ({ patch: P, starts: windowStarts(Math.max(n, P), P, maxStep) })));
    t.equal(perVoxel > FLOAT32_SUM_WINDOWS, overlap > 0.75, `overlap ${overlap}: ${perVoxel} windows per voxel`);
    const result = await slidingWindowPredict(new WindowAwareModel(extent), volume, extent, { patch: [P, P, P], overlap, batchSize: 3, cms: true, annotatorProbs: true });
    const expected = oracle(extent, P, overlap);
    t.equal(result.windows, expected.windows, `overlap ${overlap}: ${expected.windows} windows`);
    const probsDiff = maxRelDiff(result.probs, expected.mean, 0);
    const cmsDiff = maxRelDiff(result.cms!, expected.mean, L * V);
    const qDiff = maxRelDiff(result.annotatorProbs!, expected.mean, (L + R * L * L) * V);
    t.ok(probsDiff < 1e-5, `overlap ${overlap}: probs (max relative difference ${probsDiff})`);
    t.ok(cmsDiff < 1e-5, `overlap ${overlap}: CMs, R*L*L = ${R * L * L} channels (max relative difference ${cmsDiff})`);
    t.ok(qDiff < 1e-5, `overlap ${overlap}: q (max relative difference ${qDiff})`);
  }
});

t.test('sliding-window prediction lets go of a batch\'s outputs before the next batch is predicted (one batch in memory, not two)', async (t) => {
  // A CM model's outputs are R*L*L + R*L + L channels per window voxel: two 128^3 windows of a
  // BraTS model (R = 3, L = 4) are 1 GiB. The next batch's outputs are allocated while the
  // last batch's are garbage only if nothing holds them: a collection run when the next batch
  // starts must bring the array buffers back to what the first batch found (the sums, the
  // volume, the input buffer), not that plus a batch of outputs.
  setFlagsFromString('--expose-gc');
  const gc = runInNewContext('gc') as () => void;
  const P = 48;
  const extent = { d: P, h: P, w: 6 * P };
  const batchBytes = (L + R * L * L + R * L) * P ** 3 * 4; // 11.4 MiB
  const live: number[] = [];
  const model: SlidingWindowModel = {
    config: { classes: L, annotators: R, inChannels: 1, ndim: 3, depth: 1 },
    async predict(images, shape, options = {}) {
      // A real Model queues its calls and allocates the outputs from a promise callback.
      await new Promise((resolve) => setImmediate(resolve));
      gc();
      await new Promise((resolve) => setImmediate(resolve));
      gc();
      live.push(process.memoryUsage().arrayBuffers);
      const Pv = shape[2] * shape[3] * shape[4];
      const probs = new Float32Array(shape[0] * L * Pv).fill(1 / L);
      const cms = new Float32Array(shape[0] * R * L * L * Pv).fill(1 / L);
      const q = new Float32Array(shape[0] * R * L * Pv).fill(1 / L);
      return { probs, ...(options.cms ? { cms } : {}), ...(options.annotatorProbs ? { annotatorProbs: q } : {}) };
    },
  };
  const volume = new Float32Array(extent.d * extent.h * extent.w).fill(1);
  const result = await slidingWindowPredict(model, volume, extent, { patch: [P, P, P], overlap: 0, batchSize: 1, cms: true, annotatorProbs: true });
  t.equal(result.windows, 6);
  const extra = live.slice(1).map((bytes) => Math.round((bytes - live[0]) / 2 ** 20));
  t.ok(extra.every((mib) => mib < batchBytes / 2 ** 21), `MiB of array buffers beyond the first batch's when batches 2..6 start: ${extra.join(', ')} (a batch of outputs: ${batchBytes / 2 ** 20})`);
  t.ok(Math.abs(result.cms![0] - 1 / L) < 1e-7, 'the outputs were stitched');
});
