// Sliding-window inference: exact stitching and normalisation with a fake per-voxel model
// (volumes not a multiple of the step, smaller than the patch, 2D and 3D), the window
// geometry, the Gaussian importance map, argument checks, and one run of a real model.
// Tolerance: 1e-5 (outputs are Float32 weighted means).
import t, { Test } from 'tap';
import { createModel } from '../src/index';
import { Extent } from '../src/data/morphology';
import { loadNative } from '../src/native';
import { FLOAT32_SUM_WINDOWS, gaussianImportanceMap, maxWindowsPerVoxel, slidingWindowPredict, SlidingWindowModel, windowStarts } from '../src/model/sliding-window';

const TOL = 1e-5;

/** A deterministic value in [-1, 1) per index. */
function noise(length: number, seed: number): Float32Array {
  let s = seed >>> 0;
  return Float32Array.from({ length }, () => ((s = (s * 1664525 + 1013904223) >>> 0) / 2147483648) - 1);
}

/**
 * Outputs at one voxel as a function of that voxel's channels only: p = softmax(0, x, -x),
 * A_r[i][j] proportional to exp(-(1 + r)(i - j)^2 + 0.1 i x) (columns normalised), q_r = A_r p,
 * with x = channel 0 + 0.5 * channel 1. Any stitching error shows up as a mismatch.
 */
function perVoxel(x: number, L: number, R: number) {
  const logits = Array.from({ length: L }, (_, k) => (k === 0 ? 0 : k % 2 ? k * x : -k * x));
  const top = Math.max(...logits);
  const e = logits.map((z) => Math.exp(z - top));
  const sum = e.reduce((a, b) => a + b, 0);
  const p = e.map((z) => z / sum);
  const A: number[] = [];
  const q: number[] = [];
  for (let r = 0; r < R; r++) {
    const a = Array.from({ length: L * L }, (_, k) => {
      const i = Math.floor(k / L);
      const j = k % L;
      return Math.exp(-(1 + r) * (i - j) ** 2 + 0.1 * i * x);
    });
    for (let j = 0; j < L; j++) {
      let col = 0;
      for (let i = 0; i < L; i++) col += a[i * L + j];
      for (let i = 0; i < L; i++) a[i * L + j] /= col;
    }
    A.push(...a);
    for (let i = 0; i < L; i++) q.push(a.slice(i * L, (i + 1) * L).reduce((acc, aij, j) => acc + aij * p[j], 0));
  }
  return { p, A, q };
}

/** Fills [N, K, V]-style outputs for a batch [N, C, V] from perVoxel. */
function perVoxelOutputs(images: Float32Array, n: number, C: number, V: number, L: number, R: number) {
  const probs = new Float32Array(n * L * V);
  const cms = new Float32Array(n * R * L * L * V);
  const q = new Float32Array(n * R * L * V);
  for (let b = 0; b < n; b++) {
    for (let v = 0; v < V; v++) {
      const x = images[b * C * V + v] + (C > 1 ? 0.5 * images[(b * C + 1) * V + v] : 0);
      const out = perVoxel(x, L, R);
      out.p.forEach((y, k) => (probs[(b * L + k) * V + v] = y));
      out.A.forEach((y, k) => (cms[(b * R * L * L + k) * V + v] = y));
      out.q.forEach((y, k) => (q[(b * R * L + k) * V + v] = y));
    }
  }
  return { probs, cms, q };
}

class FakeModel implements SlidingWindowModel {
  readonly shapes: number[][] = [];
  readonly inputs: Float32Array[] = [];
  constructor(readonly config: SlidingWindowModel['config']) {}
  async predict(images: Float32Array, shape: number[], options: { cms?: boolean; annotatorProbs?: boolean } = {}) {
    this.shapes.push([...shape]);
    this.inputs.push(images.slice());
    const [n, C, ...spatial] = shape;
    const V = spatial.reduce((a, b) => a * b, 1);
    const { classes: L, annotators: R } = this.config;
    const out = perVoxelOutputs(images, n, C, V, L, R);
    return { probs: out.probs, ...(options.cms ? { cms: out.cms } : {}), ...(options.annotatorProbs ? { annotatorProbs: out.q } : {}) };
  }
}

function maxAbsDiff(a: Float32Array, b: Float32Array): number {
  if (a.length !== b.length) return Infinity;
  let worst = 0;
  for (let i = 0; i < a.length; i++) worst = Math.max(worst, Math.abs(a[i] - b[i]));
  return worst;
}

async function checkExact(t: Test, ndim: 2 | 3, extent: Extent, patch: number[], batchSize: number, expectedWindows?: number) {
  const config = { classes: 3, annotators: 2, inChannels: 2, ndim, depth: 2 } as const;
  const model = new FakeModel(config);
  const V = extent.d * extent.h * extent.w;
  const volume = noise(2 * V, V + patch[0]);
  const progress: [number, number][] = [];
  const result = await slidingWindowPredict(model, volume, extent, {
    patch,
    batchSize,
    cms: true,
    annotatorProbs: true,
    onProgress: (done, total) => progress.push([done, total]),
  });
  const direct = perVoxelOutputs(volume, 1, 2, V, 3, 2);
  const spatial = ndim === 2 ? [extent.h, extent.w] : [extent.d, extent.h, extent.w];
  t.same(result.probsShape, [3, ...spatial], 'probs shape');
  t.same(result.cmsShape, [2, 3, 3, ...spatial], 'cms shape');
  t.same(result.annotatorProbsShape, [2, 3, ...spatial], 'q shape');
  t.ok(maxAbsDiff(result.probs, direct.probs) < TOL, `probs equal the per-voxel values (max diff ${maxAbsDiff(result.probs, direct.probs)})`);
  t.ok(maxAbsDiff(result.cms!, direct.cms) < TOL, 'cms equal the per-voxel values');
  t.ok(maxAbsDiff(result.annotatorProbs!, direct.q) < TOL, 'q equal the per-voxel values');
  if (expectedWindows !== undefined) t.equal(result.windows, expectedWindows, 'window count');
  const windowShape = ndim === 2 ? patch.slice(-2) : patch;
  t.ok(
    model.shapes.every((s) => s[0] >= 1 && s[0] <= batchSize && s[1] === 2 && s.slice(2).join() === windowShape.join()),
    'every batch is [B <= batchSize, C, *patch]',
  );
  t.same(progress[0], [0, result.windows], 'progress starts at 0 before the first batch (a bar from the start)');
  t.same(progress[progress.length - 1], [result.windows, result.windows], 'progress reaches the total');
  t.equal(progress.length, Math.ceil(result.windows / batchSize) + 1, 'then once after each batch');
  return { model, volume, result };
}

t.test('window starts: first at 0, last flush, evenly spread, step <= the target', async (t) => {
  t.same(windowStarts(20, 8, 4), [0, 4, 8, 12], 'a multiple of the step');
  // 21: ceil(13 / 4) = 4 steps of 13/4 = 3.25 -> 0, 3.25, 6.5, 9.75, 13 rounded
  t.same(windowStarts(21, 8, 4), [0, 3, 7, 10, 13], 'not a multiple');
  t.same(windowStarts(8, 8, 4), [0], 'one window');
  t.same(windowStarts(9, 8, 8), [0, 1], 'no overlap still covers the far edge');
});

t.test('Gaussian importance map', async (t) => {
  const patch = [7, 9, 5];
  const map = gaussianImportanceMap(patch);
  const at = (z: number, y: number, x: number) => map[(z * 9 + y) * 5 + x];
  t.equal(at(3, 4, 2), 1, 'the centre weighs 1');
  t.equal(Math.max(...map), 1, 'and is the maximum');
  for (const z of [0, 6]) for (const y of [0, 8]) for (const x of [0, 4]) t.ok(at(z, y, x) > 0, `corner (${z}, ${y}, ${x}) is positive`);
  t.ok(at(2, 4, 2) < 1 && at(1, 4, 2) < at(2, 4, 2), 'decreasing away from the centre');
  t.equal(at(1, 2, 1), at(5, 6, 3), 'symmetric');
  // sigma = 9/8 along h: one voxel off-centre weighs exp(-0.5 * (8/9)^2)
  t.ok(Math.abs(at(3, 5, 2) - Math.exp(-0.5 * (8 / 9) ** 2)) < 1e-12, 'sigma = patch / 8');
  t.equal(Math.min(...gaussianImportanceMap([16, 16, 16])), 1e-3, 'floored far from the centre');
  const even = gaussianImportanceMap([8, 8]);
  t.equal(even[3 * 8 + 3], even[4 * 8 + 4], 'even patch: the four central voxels share the maximum');
});

// A model whose output depends on where a voxel sits in its window (not on the image),
// so overlapping windows disagree and only the right weights give the right blend.
class PositionModel implements SlidingWindowModel {
  constructor(
    readonly config: SlidingWindowModel['config'],
    readonly patch: [number, number, number],
  ) {}
  p0(z: number, y: number, x: number): number {
    const [pd, ph, pw] = this.patch;
    return 0.1 + 0.8 * ((z / pd + 2 * (y / ph) + 4 * (x / pw)) / 7);
  }
  async predict(_images: Float32Array, shape: number[]) {
    const n = shape[0];
    const [pd, ph, pw] = this.patch;
    const Pv = pd * ph * pw;
    const probs = new Float32Array(n * 2 * Pv);
    for (let b = 0; b < n; b++)
      for (let z = 0; z < pd; z++)
        for (let y = 0; y < ph; y++)
          for (let x = 0; x < pw; x++) {
            const v = (z * ph + y) * pw + x;
            probs[b * 2 * Pv + v] = this.p0(z, y, x);
            probs[(b * 2 + 1) * Pv + v] = 1 - this.p0(z, y, x);
          }
    return { probs };
  }
}

t.test('overlapping windows are blended with Gaussian weights (sigma = patch / 8, floor 1e-3)', async (t) => {
  const patch: [number, number, number] = [8, 8, 8];
  const extent = { d: 11, h: 13, w: 9 };
  const model = new PositionModel({ classes: 2, annotators: 1, inChannels: 1, ndim: 3, depth: 2 }, patch);
  const V = extent.d * extent.h * extent.w;
  const result = await slidingWindowPredict(model, new Float32Array(V), extent, { patch, overlap: 0.5, batchSize: 4 });
  // The weights written out here, from the formula: per axis exp(-((i - c) / sigma)^2 / 2)
  // with c the window's centre and sigma = 8 / 8, the product over axes relative to the
  // centre's, at least 1e-3. Windows start every 4 voxels or less, the last flush.
  const g = (i: number) => Math.exp(-0.5 * ((i - 3.5) / 1) ** 2);
  const weight = (z: number, y: number, x: number) => Math.max(1e-3, (g(z) * g(y) * g(x)) / g(3) ** 3);
  const starts = { d: [0, 3], h: [0, 3, 5], w: [0, 1] };
  let worst = 0;
  let disagreeing = 0;
  for (let vz = 0; vz < extent.d; vz++)
    for (let vy = 0; vy < extent.h; vy++)
      for (let vx = 0; vx < extent.w; vx++) {
        let num = 0;
        let den = 0;
        const seen = new Set<number>();
        for (const sz of starts.d)
          for (const sy of starts.h)
            for (const sx of starts.w) {
              const [z, y, x] = [vz - sz, vy - sy, vx - sx];
              if (z < 0 || z >= 8 || y < 0 || y >= 8 || x < 0 || x >= 8) continue;
              num += weight(z, y, x) * model.p0(z, y, x);
              den += weight(z, y, x);
              seen.add(model.p0(z, y, x));
            }
        if (seen.size > 1) disagreeing++;
        worst = Math.max(worst, Math.abs(result.probs[(vz * extent.h + vy) * extent.w + vx] - num / den));
      }
  t.equal(result.windows, 12, 'the 2 x 3 x 2 windows');
  t.ok(disagreeing > V / 2, `windows disagree at ${disagreeing} of ${V} voxels`);
  t.ok(worst < 1e-6, `blend equals the Gaussian-weighted mean (max diff ${worst.toExponential(2)})`);
  // A plain (unweighted) mean would not pass: check that it differs.
  const uniform = await slidingWindowPredict(model, new Float32Array(V), extent, { patch, overlap: 0.5, batchSize: 4, gaussianSigmaScale: 1e6 });
  t.ok(maxAbsDiff(uniform.probs, result.probs) > 1e-2, 'a near-uniform weighting gives another blend');
});

t.test('3D stitching is exact for a volume not a multiple of the step', async (t) => {
  // d 11: starts 0, 3; h 13: 0, 2.5 -> 3 (rounded), 5; w 9: 0, 1 -> 2 * 3 * 2 = 12 windows
  await checkExact(t, 3, { d: 11, h: 13, w: 9 }, [8, 8, 8], 3, 12);
});

t.test('3D stitching with a volume smaller than the patch along some axes (zero padding)', async (t) => {
  // d 5 < 8 (1 zero plane in front, 2 behind), h 6 < 8 (1 row each side), w 16: starts 0, 4, 8
  const extent = { d: 5, h: 6, w: 16 };
  const { model, volume } = await checkExact(t, 3, extent, [8, 8, 8], 2, 3);
  const first = model.inputs[0];
  // Window 0, channel 0: plane z = 0 is padding, plane z = 1 holds volume plane 0 (rows shifted by 1).
  t.ok(first.subarray(0, 64).every((x) => x === 0), 'front padding plane is zero');
  t.equal(first[64 + 1 * 8 + 0], volume[0], 'volume voxel (0, 0, 0) lands at window (1, 1, 0)');
  t.equal(first[64 + 0 * 8 + 3], 0, 'padding row is zero');
});

t.test('3D: a volume smaller than the patch on every axis is one padded window', async (t) => {
  await checkExact(t, 3, { d: 3, h: 5, w: 2 }, [4, 8, 4], 2, 1);
});

t.test('2D stitching ([C, H, W], patch [h, w])', async (t) => {
  // h 20: ceil(12 / 4) = 3 steps -> 0, 4, 8, 12; w 7 < 8 padded -> 4 windows
  await checkExact(t, 2, { d: 1, h: 20, w: 7 }, [8, 8], 4, 4);
  await checkExact(t, 2, { d: 1, h: 10, w: 10 }, [1, 4, 4], 1);
});

t.test('overlap 0 and a batch size above the window count', async (t) => {
  const model = new FakeModel({ classes: 2, annotators: 1, inChannels: 1, ndim: 3, depth: 1 });
  const extent = { d: 4, h: 4, w: 6 };
  const volume = noise(96, 5);
  const result = await slidingWindowPredict(model, volume, extent, { patch: [4, 4, 3], overlap: 0, batchSize: 16 });
  t.equal(result.windows, 2);
  t.equal(model.shapes.length, 1, 'one call');
  t.equal(model.shapes[0][0], 2, 'batch of the two windows');
  t.notOk(result.cms, 'no CMs unless asked');
  t.ok(maxAbsDiff(result.probs, perVoxelOutputs(volume, 1, 1, 96, 2, 1).probs) < TOL);
});

t.test('invalid arguments are rejected before any prediction', async (t) => {
  const model = new FakeModel({ classes: 2, annotators: 1, inChannels: 1, ndim: 3, depth: 3 });
  const extent = { d: 8, h: 8, w: 8 };
  const volume = new Float32Array(512);
  await t.rejects(slidingWindowPredict(model, volume, extent, { patch: [6, 8, 8] }), /patch size 6 is not divisible by 2\^\(depth-1\) = 4/);
  await t.rejects(slidingWindowPredict(model, volume.subarray(1), extent, { patch: [8, 8, 8] }), /volume has 511 values/);
  await t.rejects(slidingWindowPredict(model, volume, extent, { patch: [8, 8] }), /must have 3 sizes/);
  await t.rejects(slidingWindowPredict(model, volume, extent, { patch: [8, 8, 8], overlap: 1 }), /overlap = 1/);
  await t.rejects(slidingWindowPredict(model, volume, extent, { patch: [8, 8, 8], batchSize: 0 }), /batchSize = 0/);
  // A misspelt option is named, not silently replaced by its default.
  const typo = { patch: [8, 8, 8], overlapp: 0.9 } as unknown as Parameters<typeof slidingWindowPredict>[3];
  await t.rejects(slidingWindowPredict(model, volume, extent, typo), /unknown sliding-window option\(s\) "overlapp"; known: patch, overlap,/);
  const bad = volume.slice();
  bad[100] = NaN;
  await t.rejects(slidingWindowPredict(model, bad, extent, { patch: [8, 8, 8] }), /non-finite value \(NaN\) at index 100/);
  t.equal(model.shapes.length, 0, 'nothing was predicted');
  const flat = new FakeModel({ classes: 2, annotators: 1, inChannels: 1, ndim: 2, depth: 1 });
  await t.rejects(slidingWindowPredict(flat, volume, extent, { patch: [8, 8] }), /2D model needs extent.d = 1/);
});

// With the pipeline (the default for a GPU model), the next batch is running in the model
// before this one is stitched, never more than one batch in flight; without it (the CPU
// default) the batches run one after the other. The fakes start their work from a promise
// callback, as Model does (its calls are queued). Failures while a batch is in flight
// reject the call, after that batch has finished, without an unhandled rejection.
t.test('the next batch runs while the previous one is stitched, on a GPU model', async (t) => {
  const extent = { d: 4, h: 4, w: 16 };
  const volume = noise(4 * 4 * 16, 3);
  const run = async (device: string | undefined, pipeline?: boolean) => {
    const events: string[] = [];
    let inFlight = 0;
    let most = 0;
    class Queued extends FakeModel {
      predict(images: Float32Array, shape: number[], options?: { cms?: boolean; annotatorProbs?: boolean }) {
        const k = this.calls++;
        return Promise.resolve().then(async () => {
          events.push(`start ${k}`);
          most = Math.max(most, ++inFlight);
          await new Promise((r) => setTimeout(r, 2));
          const out = await super.predict(images, shape, options);
          inFlight--;
          return out;
        });
      }
      calls = 0;
    }
    const model = new Queued({ classes: 2, annotators: 1, inChannels: 1, ndim: 3, depth: 1, ...(device ? { device } : {}) });
    const result = await slidingWindowPredict(model, volume, extent, {
      patch: [4, 4, 4],
      overlap: 0,
      batchSize: 1,
      ...(pipeline !== undefined ? { pipeline } : {}),
      onProgress: (done) => void (done > 0 && events.push(`stitched ${done - 1}`)),
    });
    t.ok(maxAbsDiff(result.probs, perVoxelOutputs(volume, 1, 1, 256, 2, 1).probs) < TOL, 'same result');
    t.equal(most, 1, 'at most one batch in flight');
    return events;
  };
  const overlapped = ['start 0', 'start 1', 'stitched 0', 'start 2', 'stitched 1', 'start 3', 'stitched 2', 'stitched 3'];
  const serial = ['start 0', 'stitched 0', 'start 1', 'stitched 1', 'start 2', 'stitched 2', 'start 3', 'stitched 3'];
  t.same(await run('cuda'), overlapped, 'GPU model: the next batch starts before this one is stitched');
  t.same(await run('cpu'), serial, 'CPU model: one batch after the other');
  t.same(await run(undefined, true), overlapped, 'pipeline: true');

  // The model fails on batch 2 while batch 1 is stitched: the call rejects with that error.
  let unhandled = 0;
  const onUnhandled = () => unhandled++;
  process.on('unhandledRejection', onUnhandled);
  const config = { classes: 2, annotators: 1, inChannels: 1, ndim: 3, depth: 1, device: 'cuda' } as const;
  class Failing extends FakeModel {
    async predict(images: Float32Array, shape: number[], options?: { cms?: boolean; annotatorProbs?: boolean }) {
      if (this.shapes.length === 2) throw new Error('GPU out of memory: batch 2');
      return super.predict(images, shape, options);
    }
  }
  await t.rejects(slidingWindowPredict(new Failing(config), volume, extent, { patch: [4, 4, 4], overlap: 0, batchSize: 1 }), /GPU out of memory: batch 2/);
  // Stitching fails (a wrong output size) while the next batch is in flight: that error,
  // after the batch in flight has finished.
  let finished = 0;
  class Short extends FakeModel {
    async predict(images: Float32Array, shape: number[], options?: { cms?: boolean; annotatorProbs?: boolean }) {
      const k = this.shapes.length;
      const out = await super.predict(images, shape, options);
      await new Promise((r) => setTimeout(r, 5));
      finished++;
      return k === 0 ? { probs: out.probs.subarray(1) } : out;
    }
  }
  await t.rejects(slidingWindowPredict(new Short(config), volume, extent, { patch: [4, 4, 4], overlap: 0, batchSize: 1 }), /returned probs with 127 values, expected 128/);
  t.equal(finished, 2, 'the batch in flight finished before the call rejected');
  await new Promise((r) => setTimeout(r, 20));
  process.off('unhandledRejection', onUnhandled);
  t.equal(unhandled, 0, 'no unhandled rejection');
});

t.test('a real 3D model: shapes, distributions and a single window equal to predict', async (t) => {
  const model = createModel({ ndim: 3, inChannels: 1, classes: 3, annotators: 2, depth: 2, baseChannels: 4, seed: 7 });
  const extent = { d: 6, h: 12, w: 10 };
  const V = 6 * 12 * 10;
  const volume = noise(V, 11);
  const result = await slidingWindowPredict(model, volume, extent, { patch: [8, 8, 8], cms: true, annotatorProbs: true });
  t.same(result.probsShape, [3, 6, 12, 10]);
  t.same(result.cmsShape, [2, 3, 3, 6, 12, 10]);
  t.same(result.annotatorProbsShape, [2, 3, 6, 12, 10]);
  let worstP = 0;
  let worstQ = 0;
  let worstA = 0;
  for (let v = 0; v < V; v++) {
    let sp = 0;
    for (let k = 0; k < 3; k++) sp += result.probs[k * V + v];
    worstP = Math.max(worstP, Math.abs(sp - 1));
    for (let r = 0; r < 2; r++) {
      let sq = 0;
      for (let k = 0; k < 3; k++) sq += result.annotatorProbs![(r * 3 + k) * V + v];
      worstQ = Math.max(worstQ, Math.abs(sq - 1));
      for (let j = 0; j < 3; j++) {
        let col = 0;
        for (let i = 0; i < 3; i++) col += result.cms![((r * 3 + i) * 3 + j) * V + v];
        worstA = Math.max(worstA, Math.abs(col - 1));
      }
    }
  }
  t.ok(worstP < TOL, `consensus probabilities sum to 1 (worst ${worstP})`);
  t.ok(worstQ < TOL, `q_r sums to 1 (worst ${worstQ})`);
  t.ok(worstA < TOL, `CM columns sum to 1 (worst ${worstA})`);

  const cube = noise(512, 3);
  const stitched = await slidingWindowPredict(model, cube, { d: 8, h: 8, w: 8 }, { patch: [8, 8, 8] });
  const direct = await model.predict(cube, [1, 1, 8, 8, 8]);
  t.equal(stitched.windows, 1);
  t.ok(maxAbsDiff(stitched.probs, direct.probs) < 1e-6, 'one window: the model output itself');
});

t.test('windows per voxel: counted by hand', async (t) => {
  t.equal(maxWindowsPerVoxel([{ patch: 8, starts: [0, 4, 8, 12] }]), 2, 'half overlap: two windows');
  t.equal(maxWindowsPerVoxel([{ patch: 8, starts: [0, 3, 7, 10, 13] }]), 3, 'uneven steps: x = 7 lies in the windows at 0, 3 and 7');
  t.equal(maxWindowsPerVoxel([{ patch: 8, starts: [0] }, { patch: 4, starts: [0, 1, 2, 3, 4] }]), 4, 'axes multiply (1 x 4)');
  t.equal(maxWindowsPerVoxel([{ patch: 32, starts: [0, 8, 16, 24, 32] }, { patch: 32, starts: [0, 8, 16, 24, 32] }, { patch: 32, starts: [0, 8] }]), 32, '4 x 4 x 2');
});

// A sigmoid per voxel: every window agrees, so the blend must return it (to Float32
// rounding) however many windows are summed. With Float32 sums, 729 windows of 32^3 on a
// 40^3 volume (overlap 0.99: a 1-voxel step) lost the border weights: 1.9e-5 relative.
class SigmoidModel implements SlidingWindowModel {
  readonly config = { classes: 2, annotators: 1, inChannels: 1, ndim: 3, depth: 1 } as const;
  async predict(images: Float32Array, shape: number[]) {
    const [n, , ...spatial] = shape;
    const V = spatial.reduce((a, b) => a * b, 1);
    const probs = new Float32Array(n * 2 * V);
    for (let b = 0; b < n; b++) {
      for (let v = 0; v < V; v++) {
        const p = 1 / (1 + Math.exp(-images[b * V + v]));
        probs[2 * b * V + v] = p;
        probs[(2 * b + 1) * V + v] = 1 - p;
      }
    }
    return { probs };
  }
}

t.test('thousands of windows per voxel still give back what every window agrees on', async (t) => {
  const e = 40;
  const V = e ** 3;
  const volume = Float32Array.from({ length: V }, (_, i) => 2 * Math.sin(0.37 * i));
  for (const overlap of [0.75, 0.99]) {
    const result = await slidingWindowPredict(new SigmoidModel(), volume, { d: e, h: e, w: e }, { patch: [32, 32, 32], overlap, batchSize: 8 });
    let worst = 0;
    for (let c = 0; c < 2; c++) {
      for (let v = 0; v < V; v++) {
        const p = 1 / (1 + Math.exp(-volume[v]));
        const want = c === 0 ? p : 1 - p;
        worst = Math.max(worst, Math.abs(result.probs[c * V + v] - want) / want);
      }
    }
    t.ok(result.probs instanceof Float32Array, `overlap ${overlap}: Float32 probabilities`);
    t.ok(worst < 2e-6, `overlap ${overlap} (${result.windows} windows, ${FLOAT32_SUM_WINDOWS} per voxel before Float64 sums): max relative error ${worst.toExponential(2)}`);
  }
});

t.test('native stitchWindow: the same bits as the JavaScript sum, and placements outside the patch or volume refused', async (t) => {
  const native = loadNative();
  const volume = [5, 7, 9];
  const patch = [4, 6, 5];
  const channels = 3;
  const V = 5 * 7 * 9;
  const Pv = 4 * 6 * 5;
  const values = noise(channels * Pv, 7);
  const weights = Float64Array.from(noise(Pv, 8), (v) => Math.abs(v) + 1e-3);
  // A window hanging over the volume's low corner in z and x (origin -1, -2), inside in y.
  const from = [1, 0, 2], to = [4, 6, 5], origin = [-1, 1, -2];
  for (const Sum of [Float32Array, Float64Array]) {
    const start = Sum.from(noise(channels * V, 9));
    const want = Sum.from(start);
    for (let k = 0; k < channels; k++) {
      for (let z = from[0]; z < to[0]; z++) {
        for (let y = from[1]; y < to[1]; y++) {
          for (let x = from[2]; x < to[2]; x++) {
            const dst = k * V + ((origin[0] + z) * 7 + origin[1] + y) * 9 + origin[2] + x;
            const src = (z * 6 + y) * 5 + x;
            want[dst] += weights[src] * values[k * Pv + src];
          }
        }
      }
    }
    const got = Sum.from(start);
    native.stitchWindow(got, volume, values, 0, weights, patch, channels, from, to, origin);
    t.same(Array.from(got), Array.from(want), `${Sum.name} sums bit for bit`);
    t.not(Array.from(got).join(), Array.from(start).join(), 'something was added');
  }
  const sum = new Float32Array(channels * V);
  const call = (f: number[], e: number[], o: number[]) => () => native.stitchWindow(sum, volume, values, 0, weights, patch, channels, f, e, o);
  t.throws(call([0, 0, 0], [5, 6, 5], [0, 0, 0]), /axis 0: voxels \[0, 5\) of a 4-voxel window/, 'past the patch');
  t.throws(call([0, 0, 0], [4, 6, 5], [2, 0, 0]), /axis 0: .* leave the patch or the 5-voxel volume/, 'past the volume');
  t.throws(call([0, 0, 0], [4, 6, 5], [0, 0, -1]), /axis 2/, 'before the volume');
  t.throws(call([3, 0, 0], [2, 6, 5], [0, 0, 0]), /axis 0/, 'from after to');
  t.throws(() => native.stitchWindow(new Float32Array(V), volume, values, 0, weights, patch, channels, [0, 0, 0], [1, 1, 1], [0, 0, 0]), /sum .*has 315 elements, expected 945/);
  t.throws(() => native.stitchWindow(sum, volume, values.subarray(1), 0, weights, patch, channels, [0, 0, 0], [1, 1, 1], [0, 0, 0]), /values has 359 elements: a window's 360 from offset 0 do not fit/);
  t.throws(() => native.stitchWindow(sum, volume, values, 1, weights, patch, channels, [0, 0, 0], [1, 1, 1], [0, 0, 0]), /values has 360 elements: a window's 360 from offset 1 do not fit/);
  t.throws(() => native.stitchWindow(sum, volume, values, -1, weights, patch, channels, [0, 0, 0], [1, 1, 1], [0, 0, 0]), /from offset -1/);
  t.throws(() => native.stitchWindow(sum, volume, values, 0, new Float32Array(Pv) as unknown as Float64Array, patch, channels, [0, 0, 0], [1, 1, 1], [0, 0, 0]), /weights must be a Float64Array/);
  t.equal(sum.every((v) => v === 0), true, 'a refused call wrote nothing');
});

t.test('native divideByWeights: the same bits as JavaScript\'s division, in place or from Float64, bad arrays refused', async (t) => {
  const native = loadNative();
  const channels = 3;
  const V = 70001; // more than one of the native side's chunks of voxels
  const weightSum = Float64Array.from(noise(V, 31), (v) => Math.abs(v) * 5 + 1e-3);
  for (const Sum of [Float32Array, Float64Array]) {
    const sum = Sum.from(noise(channels * V, 32), (v) => v * 3);
    const want = new Float32Array(channels * V);
    for (let k = 0; k < channels; k++) for (let v = 0; v < V; v++) want[k * V + v] = sum[k * V + v] / weightSum[v];
    const mean = sum instanceof Float32Array ? sum : new Float32Array(channels * V);
    native.divideByWeights(sum, weightSum, channels, mean);
    t.ok(Buffer.from(mean.buffer).equals(Buffer.from(want.buffer)), `${Sum.name} sums: bit for bit`);
  }
  const sum = new Float32Array(channels * V + 1);
  t.throws(() => native.divideByWeights(sum.subarray(1), weightSum, channels, sum.subarray(0, channels * V)), /mean overlaps sum without being it/);
  t.throws(() => native.divideByWeights(new Float32Array(channels * V), weightSum, 2, new Float32Array(channels * V)), /mean .*expected 140002/);
  t.throws(() => native.divideByWeights(new Float32Array(channels * V), new Float32Array(V) as unknown as Float64Array, channels, new Float32Array(channels * V)), /weightSum must be a Float64Array/);
});
