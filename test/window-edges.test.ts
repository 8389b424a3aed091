// Whole-volume inference against an independent numpy oracle: numpy places the windows
// (nnU-Net: the first at 0, the last flush with the far end, evenly spread with a step of at
// most patch * (1 - overlap); a volume smaller than the patch centred in one zero-padded
// window), builds the Gaussian importance map (sigma = patch / 8 per axis, centre weight 1,
// floor 1e-3), mirrors each window for TTA and flips the outputs back, and blends. The tiny
// real model predicts the windows numpy asks for, one at a time, so only slidingWindowPredict's
// tiling, mirroring and blending are under test. Also: the predict CLI's NIfTI geometry against
// nibabel, a 2-checkpoint ensemble against the mean of its members, and the CPU fallback of a
// checkpoint whose model config says 'cuda'.
// Tolerance 2e-5: Float32 weighted means of the same window outputs.
import t from 'tap';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { createModel, Model } from '../src/index';
import type { Extent } from '../src/data/morphology';
import { gaussianImportanceMap, slidingWindowPredict } from '../src/model/sliding-window';
import { flipSpatial, mirrored } from '../src/model/tta';
import { ensemble } from '../src/model/ensemble';
import { saveCheckpoint } from '../src/model/checkpoint';
import { backendInfo } from '../src/model/model';
import { readSafetensors, writeSafetensors } from '../src/data/safetensors';
import { TRAINER_STATE_FORMAT, TRAINER_STATE_VERSION } from '../src/train/trainer';
import { loadInference, readInferenceInfo } from '../src/cli/inference';
import { runCli } from './helpers/cli';
import { missingPythonModules, runPython, runPythonJson } from './helpers/python';
import { captureStderr } from './helpers/stderr';

const TOL = 2e-5;
const skip = missingPythonModules('numpy');

function noise(length: number, seed: number): Float32Array {
  let s = seed >>> 0;
  return Float32Array.from({ length }, () => ((s = (s * 1664525 + 1013904223) >>> 0) / 2147483648) - 1);
}

const ORACLE = String.raw`
import sys, json, math, itertools
import numpy as np
mode, d = sys.argv[1], sys.argv[2]
meta = json.load(open(d + '/meta.json'))
C, D, H, W = meta['shape']
patch = meta['patch']
vol = np.fromfile(d + '/volume.f32', dtype=np.float32).reshape(C, D, H, W)

def starts(size, p, overlap):
    # volume coordinate of each window's first voxel (negative: zero padding in front)
    if size <= p:
        return [-((p - size) // 2)]
    step = max(1.0, p * (1 - overlap))
    n = math.ceil((size - p) / step) + 1
    actual = (size - p) / (n - 1)
    return [int(math.floor(actual * i + 0.5)) for i in range(n)]

axes_starts = [starts(s, p, meta['overlap']) for s, p in zip((D, H, W), patch)]
windows = list(itertools.product(*axes_starts))
# mirror axes d, h, w (0, 1, 2) as array axes of a [C, pd, ph, pw] window
flips = [()]
for a in meta['mirror']:
    flips += [f + (a + 1,) for f in flips]

def window(z, y, x):
    out = np.zeros((C,) + tuple(patch), np.float32)
    pd, ph, pw = patch
    vz0, vy0, vx0 = max(z, 0), max(y, 0), max(x, 0)
    vz1, vy1, vx1 = min(z + pd, D), min(y + ph, H), min(x + pw, W)
    out[:, vz0 - z:vz1 - z, vy0 - y:vy1 - y, vx0 - x:vx1 - x] = vol[:, vz0:vz1, vy0:vy1, vx0:vx1]
    return out

if mode == 'windows':
    ins = [np.flip(window(*w), axis=f) if f else window(*w) for w in windows for f in flips]
    np.ascontiguousarray(np.stack(ins)).astype(np.float32).tofile(d + '/inputs.f32')
    print(json.dumps({'count': len(ins), 'windows': len(windows)}))
    sys.exit(0)

def axis_gauss(p):
    i = np.arange(p, dtype=np.float64)
    return np.exp(-0.5 * ((i - (p - 1) / 2) / (p * meta['sigma'])) ** 2)
g = [axis_gauss(p) for p in patch]
gmap = g[0][:, None, None] * g[1][None, :, None] * g[2][None, None, :]
gmap = np.maximum(gmap / gmap.max(), 1e-3)

result = {}
for name in meta['outputs']:
    K = meta['channels'][name]
    raw = np.fromfile(d + '/' + name + '.f32', dtype=np.float32).reshape(len(windows), len(flips), K, *patch).astype(np.float64)
    acc = np.zeros((K, D, H, W))
    wsum = np.zeros((D, H, W))
    for k, (z, y, x) in enumerate(windows):
        # mean over the mirrorings, each flipped back (axes of [K, pd, ph, pw] as of [C, ...])
        mean = sum((np.flip(raw[k, f], axis=flip) if flip else raw[k, f]) for f, flip in enumerate(flips)) / len(flips)
        pd, ph, pw = patch
        vz0, vy0, vx0 = max(z, 0), max(y, 0), max(x, 0)
        vz1, vy1, vx1 = min(z + pd, D), min(y + ph, H), min(x + pw, W)
        sl = (slice(vz0 - z, vz1 - z), slice(vy0 - y, vy1 - y), slice(vx0 - x, vx1 - x))
        acc[:, vz0:vz1, vy0:vy1, vx0:vx1] += gmap[sl] * mean[(slice(None),) + sl]
        wsum[vz0:vz1, vy0:vy1, vx0:vx1] += gmap[sl]
    assert (wsum > 0).all()
    (acc / wsum).astype(np.float32).tofile(d + '/blend-' + name + '.f32')
print(json.dumps({'windows': len(windows)}))
`;

type OutName = 'probs' | 'cms' | 'annotatorProbs';

interface OracleCase {
  extent: Extent;
  /** [d, h, w] (2D: [1, h, w]) */
  patch: number[];
  overlap: number;
  /** Spatial mirror axes of the [d, h, w] frame (2D models: 1 = h, 2 = w). */
  mirror: number[];
  cms: boolean;
  /** gaussianSigmaScale (default 1/8) */
  sigma?: number;
}

/** numpy's blend of `model`'s own predictions of the windows numpy cuts out. */
async function oracle(model: Model, volume: Float32Array, c: OracleCase): Promise<{ windows: number; out: Partial<Record<OutName, Float32Array>> }> {
  const { inChannels: C, classes: L, annotators: R, ndim } = model.config;
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'window-edges-'));
  try {
    const outputs: OutName[] = c.cms ? ['probs', 'cms', 'annotatorProbs'] : ['probs'];
    const channels = { probs: L, cms: R * L * L, annotatorProbs: R * L };
    fs.writeFileSync(path.join(dir, 'meta.json'), JSON.stringify({ shape: [C, c.extent.d, c.extent.h, c.extent.w], patch: c.patch, overlap: c.overlap, mirror: c.mirror, sigma: c.sigma ?? 1 / 8, outputs, channels }));
    fs.writeFileSync(path.join(dir, 'volume.f32'), Buffer.from(volume.buffer, volume.byteOffset, volume.byteLength));
    const plan = runPythonJson<{ count: number; windows: number }>(ORACLE, ['windows', dir]);
    const Pv = c.patch[0] * c.patch[1] * c.patch[2];
    const inputs = readF32(path.join(dir, 'inputs.f32'));
    const raw = Object.fromEntries(outputs.map((o) => [o, new Float32Array(plan.count * channels[o] * Pv)])) as Record<OutName, Float32Array>;
    const shape = ndim === 2 ? [1, C, c.patch[1], c.patch[2]] : [1, C, ...c.patch];
    for (let n = 0; n < plan.count; n++) {
      const p = await model.predict(inputs.slice(n * C * Pv, (n + 1) * C * Pv), shape, { cms: c.cms, annotatorProbs: c.cms });
      for (const o of outputs) raw[o].set(p[o]!, n * channels[o] * Pv);
    }
    for (const o of outputs) fs.writeFileSync(path.join(dir, `${o}.f32`), Buffer.from(raw[o].buffer));
    runPython(ORACLE, ['blend', dir]);
    const out: Partial<Record<OutName, Float32Array>> = {};
    for (const o of outputs) out[o] = readF32(path.join(dir, `blend-${o}.f32`));
    return { windows: plan.windows, out };
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

/** A raw float32 file (a small file's Buffer may sit inside Node's shared pool: copy its own bytes). */
function readF32(file: string): Float32Array {
  const b = fs.readFileSync(file);
  return new Float32Array(b.buffer.slice(b.byteOffset, b.byteOffset + b.byteLength));
}

function maxDiff(a: Float32Array, b: Float32Array): number {
  if (a.length !== b.length) return Infinity;
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]));
  return m;
}

/** The largest |1 - sum_i A[i][j]| over every annotator, column and voxel of [R, L, L, V] CMs. */
function worstColumnSum(cms: Float32Array, R: number, L: number, V: number): number {
  let worst = 0;
  for (let r = 0; r < R; r++) {
    for (let j = 0; j < L; j++) {
      for (let v = 0; v < V; v++) {
        let s = 0;
        for (let i = 0; i < L; i++) s += cms[((r * L + i) * L + j) * V + v];
        worst = Math.max(worst, Math.abs(1 - s));
      }
    }
  }
  return worst;
}

t.test('slidingWindowPredict equals numpy blending of the model\'s own window predictions', { skip }, async (t) => {
  const m3 = createModel({ ndim: 3, inChannels: 2, classes: 3, annotators: 2, depth: 2, baseChannels: 2, seed: 3 });
  const m2 = createModel({ ndim: 2, inChannels: 1, classes: 2, annotators: 3, depth: 2, baseChannels: 3, seed: 5 });
  t.teardown(() => Promise.all([m3.dispose(), m2.dispose()]).then(() => undefined));
  const cases: { name: string; model: Model; c: OracleCase; patchArg: number[]; batchSize: number; mirror?: boolean | number[]; pipeline?: boolean }[] = [
    // d smaller than the patch, h and w not multiples of the step nor of 2
    { name: '3D 5x11x9, patch 8, overlap 0.5, CMs', model: m3, c: { extent: { d: 5, h: 11, w: 9 }, patch: [8, 8, 8], overlap: 0.5, mirror: [], cms: true }, patchArg: [8, 8, 8], batchSize: 3 },
    { name: '3D patch equal to the volume', model: m3, c: { extent: { d: 8, h: 4, w: 6 }, patch: [8, 4, 6], overlap: 0.5, mirror: [], cms: true }, patchArg: [8, 4, 6], batchSize: 2 },
    { name: '3D anisotropic, overlap 0, batch > windows', model: m3, c: { extent: { d: 7, h: 13, w: 21 }, patch: [4, 8, 12], overlap: 0, mirror: [], cms: false }, patchArg: [4, 8, 12], batchSize: 100 },
    { name: '3D overlap 0.75 (step 2)', model: m3, c: { extent: { d: 3, h: 9, w: 11 }, patch: [4, 4, 8], overlap: 0.75, mirror: [], cms: false }, patchArg: [4, 4, 8], batchSize: 4 },
    { name: '3D overlap 0.95 (step 1)', model: m3, c: { extent: { d: 2, h: 5, w: 6 }, patch: [2, 4, 4], overlap: 0.95, mirror: [], cms: true }, patchArg: [2, 4, 4], batchSize: 5 },
    { name: '3D mirror TTA, all axes, CMs', model: m3, c: { extent: { d: 6, h: 9, w: 5 }, patch: [4, 8, 4], overlap: 0.5, mirror: [0, 1, 2], cms: true }, patchArg: [4, 8, 4], batchSize: 2, mirror: true },
    { name: '3D mirror TTA, pipelined, sigma 1/4', model: m3, c: { extent: { d: 9, h: 5, w: 7 }, patch: [4, 4, 4], overlap: 0.5, mirror: [0, 1, 2], cms: true, sigma: 0.25 }, patchArg: [4, 4, 4], batchSize: 3, mirror: true, pipeline: true },
    { name: '3D mirror TTA along w only', model: m3, c: { extent: { d: 5, h: 6, w: 10 }, patch: [4, 4, 8], overlap: 0.5, mirror: [2], cms: false }, patchArg: [4, 4, 8], batchSize: 3, mirror: [2] },
    { name: '2D 13x7, patch [h, w] = [8, 8], CMs', model: m2, c: { extent: { d: 1, h: 13, w: 7 }, patch: [1, 8, 8], overlap: 0.5, mirror: [], cms: true }, patchArg: [8, 8], batchSize: 2 },
    { name: '2D patch [1, h, w], overlap 0.25', model: m2, c: { extent: { d: 1, h: 17, w: 10 }, patch: [1, 8, 4], overlap: 0.25, mirror: [], cms: false }, patchArg: [1, 8, 4], batchSize: 7 },
    { name: '2D mirror along h (spatial axis 0), CMs', model: m2, c: { extent: { d: 1, h: 11, w: 6 }, patch: [1, 8, 8], overlap: 0.5, mirror: [1], cms: true }, patchArg: [8, 8], batchSize: 2, mirror: [0] },
    { name: '2D mirror all axes', model: m2, c: { extent: { d: 1, h: 6, w: 14 }, patch: [1, 4, 8], overlap: 0.5, mirror: [1, 2], cms: false }, patchArg: [4, 8], batchSize: 2, mirror: true },
  ];
  for (const [i, { name, model, c, patchArg, batchSize, mirror, pipeline }] of cases.entries()) {
    const { inChannels: C, classes: L, annotators: R } = model.config;
    const V = c.extent.d * c.extent.h * c.extent.w;
    const volume = noise(C * V, 100 + i);
    const want = await oracle(model, volume, c);
    const got = await slidingWindowPredict(model, volume, c.extent, {
      patch: patchArg,
      overlap: c.overlap,
      batchSize,
      cms: c.cms,
      annotatorProbs: c.cms,
      ...(mirror !== undefined ? { mirror } : {}),
      ...(pipeline !== undefined ? { pipeline } : {}),
      ...(c.sigma !== undefined ? { gaussianSigmaScale: c.sigma } : {}),
    });
    t.equal(got.windows, want.windows, `${name}: windows`);
    t.ok(maxDiff(got.probs, want.out.probs!) < TOL, `${name}: probs (max diff ${maxDiff(got.probs, want.out.probs!)})`);
    if (c.cms) {
      t.ok(maxDiff(got.cms!, want.out.cms!) < TOL, `${name}: CMs (max diff ${maxDiff(got.cms!, want.out.cms!)})`);
      t.ok(maxDiff(got.annotatorProbs!, want.out.annotatorProbs!) < TOL, `${name}: q_r (max diff ${maxDiff(got.annotatorProbs!, want.out.annotatorProbs!)})`);
      t.ok(worstColumnSum(got.cms!, R, L, V) < 1e-5, `${name}: blended CM columns sum to 1`);
    }
  }
});

t.test('gaussianImportanceMap and flipSpatial refuse shapes they would silently get wrong', async (t) => {
  // [8, 8, 8, 8] gave the 3D map of the first three sizes, [8] an empty map, [7.5, 4] 30 values
  // of which the last 2 were 0 (weight 0 would make a voxel's blend 0 / 0).
  for (const patch of [[8, 8, 8, 8], [8], [], [7.5, 4], [0, 4]]) {
    t.throws(() => gaussianImportanceMap(patch), RangeError, `patch [${patch.join(', ')}] refused`);
  }
  const map = gaussianImportanceMap([4, 6]);
  t.equal(map.length, 24, 'a 2D map has h * w values');
  // 2D data of [2, 3]: axis 5 does not exist (it was skipped: no flip at all), and 7 values are not 1 plane of 6.
  const data = Float32Array.from([0, 1, 2, 3, 4, 5]);
  t.throws(() => flipSpatial(data, 1, [2, 3], [5]), RangeError, 'an axis past the spatial ones refused');
  t.throws(() => flipSpatial(Float32Array.from([0, 1, 2, 3, 4, 5, 6]), 1, [2, 3], [0]), RangeError, 'data not planes * spatial refused');
  t.same([...flipSpatial(data, 1, [2, 3], [1])], [2, 1, 0, 5, 4, 3], 'a flip along w reverses each row');
});

t.test('ensemble, mirrored and slidingWindowPredict name a missing or half model at once', async (t) => {
  const model = createModel({ ndim: 2, inChannels: 1, classes: 2, annotators: 1, depth: 2, baseChannels: 2 });
  t.teardown(() => model.dispose());
  // Was "Cannot read properties of undefined (reading 'ndim')", or for {config} no error until the first prediction.
  t.throws(() => ensemble([model, undefined as unknown as Model]), { name: 'TypeError', message: /ensemble member 1: expected a model .*got undefined/ });
  t.throws(() => ensemble([model, { config: model.config } as unknown as Model]), { name: 'TypeError', message: /ensemble member 1: .*without a predict function/ });
  t.throws(() => mirrored({} as unknown as Model), { name: 'TypeError', message: /mirrored: expected a model .*without a config/ });
  await t.rejects(slidingWindowPredict(null as unknown as Model, new Float32Array(4), { d: 1, h: 2, w: 2 }, { patch: [2, 2] }), { name: 'TypeError', message: /slidingWindowPredict: expected a model .*got null/ });
});

/** A trainer-format checkpoint (what cmseg train writes) of a tiny BraTS-shaped model, with model and trainer configs as given. */
async function bratsCheckpoint(file: string, seed: number, devices?: { model: string; trainer: string }): Promise<void> {
  const model = createModel({ ndim: 3, inChannels: 4, classes: 4, annotators: 2, depth: 2, baseChannels: 2, seed });
  try {
    await saveCheckpoint(model, file, {
      format: TRAINER_STATE_FORMAT,
      version: TRAINER_STATE_VERSION,
      config: { method: 'cm', device: devices?.trainer ?? 'cpu', seed },
      state: { step: 3 },
      annotatorNames: ['good', 'bad'],
    });
  } finally {
    await model.dispose();
  }
  if (devices) {
    // What the model config records, as a GPU run's checkpoint does (saveCheckpoint of a CPU model says 'cpu').
    const f = await readSafetensors(file);
    const config = JSON.parse(f.metadata.config);
    config.device = devices.model;
    const tensors = Object.fromEntries(Object.entries(f.tensors).map(([k, v]) => [k, { data: v.data, shape: v.shape }]));
    await writeSafetensors(file, tensors, { ...f.metadata, config: JSON.stringify(config) });
  }
}


t.test('inference judges the CPU fallback by the model config in the checkpoint, not the trainer config', { skip: backendInfo().gpuAvailable ? 'a GPU is present: no fallback to test' : false }, async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'window-edges-device-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  // cmseg train --device auto on a GPU machine: the trainer config says 'auto', the model config 'cuda'.
  for (const trainer of ['auto', 'cpu']) {
    const file = path.join(dir, `gpu-model-${trainer}-trainer.safetensors`);
    await bratsCheckpoint(file, 1, { model: 'cuda', trainer });
    const info = await readInferenceInfo([file]);
    const { value: loaded, stderr } = await captureStderr(() => loadInference(info, {}));
    try {
      t.equal(loaded.model.config.device, 'cpu', `model 'cuda', trainer '${trainer}': runs on the CPU`);
      t.match(stderr, /trained on the GPU; no GPU can run it here, so it runs on the CPU/, 'and says so');
    } finally {
      await loaded.dispose();
    }
  }
  // The converse: a CPU model whose trainer config says 'cuda' was not trained on the GPU.
  const file = path.join(dir, 'cpu-model-cuda-trainer.safetensors');
  await bratsCheckpoint(file, 1, { model: 'cpu', trainer: 'cuda' });
  const { value: loaded, stderr } = await captureStderr(async () => loadInference(await readInferenceInfo([file]), {}));
  try {
    t.equal(loaded.model.config.device, 'cpu');
    t.notMatch(stderr, /trained on the GPU/, 'no note that it was trained on the GPU');
  } finally {
    await loaded.dispose();
  }
});

const GEOMETRY = String.raw`
import sys, glob, json, os
import numpy as np, nibabel as nib
mode, root = sys.argv[1], sys.argv[2]
if mode == 'oblique':
    # every file of each case on one oblique, anisotropic grid; the qform another (rigid) one
    a = np.deg2rad(20)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    sform = np.eye(4); sform[:3, :3] = rot @ np.diag([-1.2, 0.9, 2.0]); sform[:3, 3] = [30.5, -12.25, 7.0]
    qform = sform.copy(); qform[:3, 3] += [1.0, 2.0, -3.0]
    for f in glob.glob(root + '/*/*.nii.gz'):
        img = nib.load(f)
        out = nib.Nifti1Image(np.asanyarray(img.dataobj), None, img.header)
        out.set_sform(sform, 2); out.set_qform(qform, 1)
        nib.save(out, f)
    print('{}')
    sys.exit(0)
t1 = nib.load(glob.glob(root + '/*/*_t1.nii.gz')[0])
outs = sys.argv[3:]
res = {'geometry': [], 'probs': []}
for d in outs:
    for f in sorted(glob.glob(d + '/*.nii.gz')):
        img = nib.load(f)
        h, ht = img.header, t1.header
        res['geometry'].append({
            'file': os.path.basename(f),
            'shape3': list(img.shape[:3]) == list(t1.shape),
            'sform': bool(np.allclose(img.get_sform(), t1.get_sform(), atol=1e-4)) and int(h['sform_code']) == int(ht['sform_code']),
            'qform': bool(np.allclose(img.get_qform(), t1.get_qform(), atol=1e-4)) and int(h['qform_code']) == int(ht['qform_code']),
            'zooms': bool(np.allclose(h.get_zooms()[:3], ht.get_zooms()[:3])),
        })
a, b, ab = [np.asarray(nib.load(glob.glob(d + '/*_probs.nii.gz')[0]).dataobj, dtype=np.float64) for d in outs]
res['ensembleDiff'] = float(np.abs(ab - (a + b) / 2).max())
res['membersDiffer'] = float(np.abs(a - b).max())
res['probSum'] = float(np.abs(ab.sum(axis=-1) - 1).max())
# the consensus is argmax p in BraTS 2021 labels (ET = 4)
am = np.argmax(ab, axis=-1); am[am == 3] = 4
res['argmaxMismatch'] = int((am != np.asarray(nib.load(glob.glob(outs[2] + '/*_consensus.nii.gz')[0]).dataobj)).sum())
print(json.dumps(res))
`;

t.test('predict: NIfTI outputs on the t1 grid (nibabel), an ensemble of 2 checkpoints is the mean of each alone', { skip: missingPythonModules('numpy', 'nibabel') }, async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'window-edges-predict-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const phantom = await runCli(['phantom', 'brats', '--cases', '1', '--out', 'ph', '--size', '20,18,12', '-q'], dir);
  t.equal(phantom.exitCode, 0, phantom.stderr);
  runPython(GEOMETRY, ['oblique', path.join(dir, 'ph')]);
  await bratsCheckpoint(path.join(dir, 'a.safetensors'), 1);
  await bratsCheckpoint(path.join(dir, 'b.safetensors'), 2);
  const predict = async (out: string, checkpoints: string[]) => {
    const r = await runCli(['predict', '--checkpoint', ...checkpoints, '--data', 'ph', '--out', out, '--patch', '8', '--probs', 'float32'], dir);
    t.equal(r.exitCode, 0, `predict ${checkpoints.join(' ')}: ${r.stderr}`);
  };
  await predict('outA', ['a.safetensors']);
  await predict('outB', ['b.safetensors']);
  await predict('outAB', ['a.safetensors', 'b.safetensors']);
  const r = runPythonJson<{ geometry: Record<string, unknown>[]; ensembleDiff: number; membersDiffer: number; probSum: number; argmaxMismatch: number }>(GEOMETRY, [
    'check', path.join(dir, 'ph'), ...['outA', 'outB', 'outAB'].map((d) => path.join(dir, d)),
  ]);
  t.ok(r.geometry.length >= 9, `outputs found: ${r.geometry.map((g) => g.file).join(', ')}`);
  for (const g of r.geometry) t.same(g, { file: g.file, shape3: true, sform: true, qform: true, zooms: true }, `${g.file}: the t1's grid`);
  t.ok(r.membersDiffer > 1e-3, `the two checkpoints predict differently (${r.membersDiffer})`);
  t.ok(r.ensembleDiff < 1e-5, `ensemble probs = mean of the members' (max diff ${r.ensembleDiff})`);
  t.ok(r.probSum < 1e-5, `ensemble probs sum to 1 (${r.probSum})`);
  t.equal(r.argmaxMismatch, 0, 'the ensemble consensus is argmax of its probs, in release labels');
});
