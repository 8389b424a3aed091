// Sliding-window inference (SPEC 5) against an independent PyTorch implementation: the
// sliding_window_predict of scripts/torch_reference.py, written from SPEC 5, README and the
// choices documented at the top of src/model/sliding-window.ts (window starts, overlap,
// Gaussian sigma = patch/8 with a 1e-3 floor, zero padding of a volume smaller than the
// patch, weighted mean of p, the CMs and q_r = A_r p), runs the same checkpoint with a real
// network. Volumes are not multiples of the step, one axis is smaller than the patch,
// overlaps 0.25 / 0.5 / 0.75, 2D and 3D, one mirrored (TTA) case, one global-CM model.
// Tolerance 1e-5 (float32 forward passes; the reference sums in float64).
import t from 'tap';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { spawnSync } from 'child_process';
import { missingPythonModules, PYTHON, runPython } from './helpers/python';
import { createModel, gaussianImportanceMap, Model, readSafetensors, saveCheckpoint, slidingWindowPredict, writeSafetensors, type ModelConfig } from '../src/index';
import { GAUSSIAN_WEIGHT_FLOOR, windowStep } from '../src/model/sliding-window';

const TOL = 1e-5;
const SCRIPTS = path.join(__dirname, '..', 'scripts');
const skip = missingPythonModules('torch', 'safetensors');

/** A deterministic value in [-2, 2) per index. */
function noise(length: number, seed: number): Float32Array {
  let s = seed >>> 0;
  return Float32Array.from({ length }, () => (((s = (s * 1664525 + 1013904223) >>> 0) / 2147483648) - 1) * 2);
}

const worst = (a: Float32Array, b: ArrayLike<number>): number => {
  if (a.length !== b.length) return Infinity;
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]));
  return m;
};

interface Case {
  name: string;
  model: 'm3' | 'm2' | 'g2';
  /** [C, *S] spatial part: [d, h, w] or [h, w]. */
  spatial: number[];
  patch: number[];
  overlap: number;
  batchSize?: number;
  mirror?: boolean;
}

const MODELS: Record<Case['model'], ModelConfig> = {
  // 3D, BraTS-like inputs: 4 modalities, 4 classes, 3 annotators, one block before each CM head.
  m3: { ndim: 3, inChannels: 4, classes: 4, annotators: 3, depth: 2, baseChannels: 4, cmHeadBlocks: 1, seed: 11 },
  m2: { ndim: 2, inChannels: 1, classes: 3, annotators: 2, depth: 3, baseChannels: 4, seed: 12 },
  g2: { ndim: 2, inChannels: 1, classes: 3, annotators: 2, depth: 2, baseChannels: 4, cmMode: 'global', seed: 13 },
};

const CASES: Case[] = [
  { name: '3D 37x45x29, patch 16, overlap 0.5', model: 'm3', spatial: [37, 45, 29], patch: [16, 16, 16], overlap: 0.5 },
  { name: '3D 37x45x29, patch 16, overlap 0.25, 3 windows a batch', model: 'm3', spatial: [37, 45, 29], patch: [16, 16, 16], overlap: 0.25, batchSize: 3 },
  { name: '3D 37x45x29, patch 16, overlap 0.75', model: 'm3', spatial: [37, 45, 29], patch: [16, 16, 16], overlap: 0.75 },
  // d = 11 < 16: one window in depth, the volume centred with 2 zeros in front and 3 behind.
  { name: '3D 11x45x29 (depth smaller than the patch), patch [16, 16, 8]', model: 'm3', spatial: [11, 45, 29], patch: [16, 16, 8], overlap: 0.5 },
  { name: '3D 13x21x19, patch 16, mirrored (TTA)', model: 'm3', spatial: [13, 21, 19], patch: [16, 16, 16], overlap: 0.5, mirror: true },
  { name: '2D 37x45, patch 16, overlap 0.5', model: 'm2', spatial: [37, 45], patch: [16, 16], overlap: 0.5 },
  { name: '2D 37x45, patch 16, overlap 0.75', model: 'm2', spatial: [37, 45], patch: [16, 16], overlap: 0.75 },
  { name: '2D 9x45 (height smaller than the patch), patch 16, overlap 0.25', model: 'm2', spatial: [9, 45], patch: [16, 16], overlap: 0.25 },
  { name: '2D global CMs 30x23, patch 8', model: 'g2', spatial: [30, 23], patch: [8, 8], overlap: 0.5 },
];

/** The reference on every case in one Python process (torch's import is the slow part). */
const REFERENCE = `
import json, sys, torch
sys.path.insert(0, sys.argv[1])
import torch_reference as ref
from safetensors.torch import load_file, save_file
torch.set_num_threads(1)
jobs = json.loads(open(sys.argv[2]).read())
models = {}
for job in jobs:
    if job["checkpoint"] not in models:
        models[job["checkpoint"]] = ref.load_checkpoint(job["checkpoint"])[0]
    volume = load_file(job["volume"])["volume"]
    out = ref.sliding_window_predict(models[job["checkpoint"]], volume, job["patch"], overlap=job["overlap"],
                                     batch=job["batch"], mirror=job["mirror"])
    windows = out.pop("windows")
    save_file({k: v.contiguous() for k, v in out.items()}, job["out"], metadata={"windows": str(windows)})
print("done")
`;

t.test('slidingWindowPredict equals the PyTorch reference sliding window on the same checkpoint', { skip }, async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cmseg-sw-torch-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const models = new Map<string, Model>();
  t.teardown(async () => {
    for (const m of models.values()) await m.dispose();
  });
  for (const [key, config] of Object.entries(MODELS)) {
    const model = createModel(config);
    models.set(key, model);
    // Two training steps, so that the weights are not only the initialisation.
    const size = config.ndim === 3 ? [8, 8, 8] : [8, 8];
    const V = size.reduce((a, b) => a * b, 1);
    const C = config.inChannels ?? 1;
    const images = noise(2 * C * V, 3);
    const labels = Array.from({ length: config.annotators }, (_, r) => Uint8Array.from({ length: 2 * V }, (_, i) => (i * (r + 2)) % config.classes));
    for (let i = 0; i < 2; i++) await model.trainStep({ images, shape: [2, C, ...size], labels });
    await saveCheckpoint(model, path.join(dir, `${key}.safetensors`));
  }

  const jobs = [];
  const ours = [];
  for (const [i, c] of CASES.entries()) {
    const model = models.get(c.model)!;
    const C = model.config.inChannels;
    const V = c.spatial.reduce((a, b) => a * b, 1);
    const volume = noise(C * V, 100 + i);
    const volumeFile = path.join(dir, `volume${i}.safetensors`);
    await writeSafetensors(volumeFile, { volume: { data: volume, shape: [C, ...c.spatial] } });
    const extent = c.spatial.length === 3 ? { d: c.spatial[0], h: c.spatial[1], w: c.spatial[2] } : { d: 1, h: c.spatial[0], w: c.spatial[1] };
    ours.push(await slidingWindowPredict(model, volume, extent, {
      patch: c.patch, overlap: c.overlap, batchSize: c.batchSize, cms: true, annotatorProbs: true, mirror: c.mirror,
    }));
    jobs.push({ checkpoint: path.join(dir, `${c.model}.safetensors`), volume: volumeFile, out: path.join(dir, `torch${i}.safetensors`),
      patch: c.patch, overlap: c.overlap, batch: c.batchSize ?? 2, mirror: c.mirror ?? false });
  }
  fs.writeFileSync(path.join(dir, 'jobs.json'), JSON.stringify(jobs));
  runPython(REFERENCE, [SCRIPTS, path.join(dir, 'jobs.json')]);

  for (const [i, c] of CASES.entries()) {
    const { tensors, metadata } = await readSafetensors(jobs[i].out);
    const mine = ours[i];
    const L = models.get(c.model)!.config.classes;
    const R = models.get(c.model)!.config.annotators;
    t.equal(mine.windows, Number(metadata?.windows), `${c.name}: windows`);
    t.same(tensors.probs.shape, [L, ...c.spatial], `${c.name}: probs shape`);
    t.same(tensors.cms.shape, [R, L, L, ...c.spatial], `${c.name}: cms shape`);
    t.same(tensors.annotatorProbs.shape, [R, L, ...c.spatial], `${c.name}: q shape`);
    const dp = worst(mine.probs, tensors.probs.data as Float32Array);
    const dc = worst(mine.cms!, tensors.cms.data as Float32Array);
    const dq = worst(mine.annotatorProbs!, tensors.annotatorProbs.data as Float32Array);
    t.ok(dp < TOL && dc < TOL && dq < TOL, `${c.name}: probs within ${dp.toExponential(1)}, CMs ${dc.toExponential(1)}, q_r ${dq.toExponential(1)} (tolerance ${TOL})`);
  }

  // The comparison has teeth: the same network with windows placed otherwise (overlap 0.5
  // against the reference's 0.25, same volume) differs far beyond the tolerance.
  const other = await readSafetensors(jobs[1].out);
  const gap = worst(ours[0].probs, other.tensors.probs.data as Float32Array);
  t.ok(gap > 1e-3, `overlap 0.5 vs 0.25 differ by ${gap.toExponential(1)} (> 1e-3)`);
});

// The command line a PyTorch user runs: predict --patch on [N, C, *S] images, every image
// by sliding windows, the outputs as cmseg's slidingWindowPredict gives them.
t.test('torch_reference.py predict --patch --overlap matches slidingWindowPredict', { skip }, async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cmseg-sw-torch-cli-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const model = createModel({ ndim: 3, inChannels: 2, classes: 3, annotators: 2, depth: 2, baseChannels: 4, seed: 21 });
  t.teardown(() => model.dispose());
  const ckpt = path.join(dir, 'model.safetensors');
  await saveCheckpoint(model, ckpt);
  const [n, C, D, H, W] = [2, 2, 19, 13, 22];
  const images = noise(n * C * D * H * W, 31);
  await writeSafetensors(path.join(dir, 'images.safetensors'), { images: { data: images, shape: [n, C, D, H, W] } });
  const run = spawnSync(PYTHON, [path.join(SCRIPTS, 'torch_reference.py'), 'predict', '--checkpoint', ckpt,
    '--images', path.join(dir, 'images.safetensors'), '--out', path.join(dir, 'out.safetensors'),
    '--patch', '8,16,16', '--overlap', '0.75', '--threads', '1'], { encoding: 'utf8', timeout: 300_000 });
  t.equal(run.status, 0, run.stdout + run.stderr);
  const report = JSON.parse(run.stdout.trim());
  const torchOut = (await readSafetensors(path.join(dir, 'out.safetensors'))).tensors;
  t.same(torchOut.annotatorProbs.shape, [n, 2, 3, D, H, W]);
  const V = D * H * W;
  for (let b = 0; b < n; b++) {
    const ours = await slidingWindowPredict(model, images.subarray(b * C * V, (b + 1) * C * V), { d: D, h: H, w: W },
      { patch: [8, 16, 16], overlap: 0.75, cms: true, annotatorProbs: true });
    t.equal(report.windowsPerImage, ours.windows, 'windows per image');
    const part = (x: ArrayLike<number>, k: number) => Array.prototype.slice.call(x, b * k * V, (b + 1) * k * V) as number[];
    const dp = worst(ours.probs, part(torchOut.probs.data as Float32Array, 3));
    const dc = worst(ours.cms!, part(torchOut.cms.data as Float32Array, 2 * 9));
    const dq = worst(ours.annotatorProbs!, part(torchOut.annotatorProbs.data as Float32Array, 2 * 3));
    t.ok(dp < TOL && dc < TOL && dq < TOL, `image ${b}: probs within ${dp.toExponential(1)}, CMs ${dc.toExponential(1)}, q_r ${dq.toExponential(1)}`);
  }
  // --overlap without --patch would silently predict whole images: refused by name.
  const bad = spawnSync(PYTHON, [path.join(SCRIPTS, 'torch_reference.py'), 'predict', '--checkpoint', ckpt,
    '--images', path.join(dir, 'images.safetensors'), '--out', path.join(dir, 'x.safetensors'), '--overlap', '0.5'], { encoding: 'utf8' });
  t.equal(bad.status, 2, bad.stdout + bad.stderr);
  t.match(bad.stdout, /--overlap and --mirror need --patch/);
});

// The importance map itself, against the reference's, for odd, even and anisotropic windows.
t.test('gaussianImportanceMap equals the reference importance_map', { skip }, async (t) => {
  const cases: [number[], number][] = [[[16, 16, 16], 1 / 8], [[5, 7, 9], 0.25], [[16, 24], 1 / 8], [[8, 8], 0.01]];
  const out = JSON.parse(runPython(`
import json, sys
sys.path.insert(0, sys.argv[1])
import torch_reference as ref
print(json.dumps([ref.importance_map(p, s).flatten().tolist() for p, s in json.loads(sys.argv[2])]))
`, [SCRIPTS, JSON.stringify(cases)])) as number[][];
  cases.forEach(([patch, sigma], i) => {
    const ours = gaussianImportanceMap(patch, sigma);
    const d = worst(Float32Array.from(ours), out[i]);
    t.ok(d < 1e-7, `patch [${patch.join(', ')}], sigma scale ${sigma}: within ${d.toExponential(1)}`);
  });
});

// Two defects the comparison found (fixed in src/model/sliding-window.ts).
t.test('the window step is floor(patch * (1 - overlap)) in exact arithmetic, and a tiny sigma scale gives no NaN', async (t) => {
  // 40 * (1 - 0.8) is 8, but Math.floor(40 * 0.19999999999999996) gave 7, so a 56-wide image
  // took 4 windows in x (starts 0, 5, 11, 16) instead of 3 (0, 8, 16); patch 40, overlap 0.9
  // on a 141x168x125 BraTS box: 46,200 windows instead of 20,493.
  const model = createModel({ ndim: 2, inChannels: 1, classes: 2, annotators: 1, depth: 2, baseChannels: 2 });
  t.teardown(() => model.dispose());
  const r = await slidingWindowPredict(model, new Float32Array(40 * 56), { d: 1, h: 40, w: 56 }, { patch: [40, 40], overlap: 0.8 });
  t.equal(r.windows, 3, 'patch 40, overlap 0.8, 40x56: windows at steps of 8');
  t.same([windowStep(40, 0.8), windowStep(40, 0.9), windowStep(80, 0.8), windowStep(80, 0.9), windowStep(64, 0.5), windowStep(64, 0.99), windowStep(10, 0.33)], [8, 4, 16, 8, 32, 1, 6]);
  // A small gaussianSigmaScale: every exp() product of the map underflowed to 0, peak 0, 0 / 0
  // = NaN weights, and every stitched output NaN. The 8 centre voxels of an even 16^3 window
  // weigh 1 and the rest the floor.
  const map = gaussianImportanceMap([16, 16, 16], 0.001);
  t.equal(map.filter((v) => Number.isNaN(v)).length, 0, 'gaussianImportanceMap([16, 16, 16], 0.001) has no NaN');
  t.equal(map.filter((v) => v === 1).length, 8);
  t.equal(map.filter((v) => v === GAUSSIAN_WEIGHT_FLOOR).length, 16 ** 3 - 8);
});
