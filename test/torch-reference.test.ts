// The PyTorch reference checks itself (finite differences in float64, a NumPy
// re-implementation of the loss, the closed-form SPEC gradients) before the
// parity tests trust it.
import t from 'tap';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { spawnSync } from 'child_process';
import { missingPythonModules, PYTHON } from './helpers/python';
import { createModel, readSafetensors, saveCheckpoint, writeSafetensors } from '../src/index';

t.test('scripts/test_torch_reference.py passes', { skip: missingPythonModules('torch', 'safetensors', 'numpy') }, async (t) => {
  const run = spawnSync(PYTHON, [path.join(__dirname, '..', 'scripts', 'test_torch_reference.py')], { encoding: 'utf8', timeout: 600_000 });
  t.equal(run.status, 0, `${run.stdout.slice(-3000)}\n${run.stderr.slice(-3000)}`);
});

// A PyTorch user takes a cmseg checkpoint over: load_checkpoint builds the reference model
// from its metadata and weights; its predictions are cmseg's.
t.test('torch_reference.py predict runs a cmseg checkpoint as cmseg does', { skip: missingPythonModules('torch', 'safetensors') }, async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cmseg-torch-ckpt-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const model = createModel({ ndim: 2, inChannels: 1, classes: 3, annotators: 2, depth: 2, baseChannels: 4, cmHeadBlocks: 1, seed: 5 });
  const n = 2, h = 8, w = 8;
  let s = 7;
  const rand = () => ((s = (s * 1664525 + 1013904223) >>> 0) / 4294967296);
  const images = Float32Array.from({ length: n * h * w }, () => rand() * 2 - 1);
  const labels = [0, 1].map(() => Uint8Array.from({ length: n * h * w }, () => Math.floor(rand() * 3)));
  for (let i = 0; i < 2; i++) await model.trainStep({ images, shape: [n, 1, h, w], labels });
  const ckpt = path.join(dir, 'model.safetensors');
  await saveCheckpoint(model, ckpt);
  await writeSafetensors(path.join(dir, 'images.safetensors'), { images: { data: images, shape: [n, 1, h, w] } });
  const run = spawnSync(PYTHON, [path.join(__dirname, '..', 'scripts', 'torch_reference.py'), 'predict', '--checkpoint', ckpt,
    '--images', path.join(dir, 'images.safetensors'), '--out', path.join(dir, 'torch.safetensors')], { encoding: 'utf8', timeout: 300_000 });
  t.equal(run.status, 0, run.stdout + run.stderr);
  t.match(JSON.parse(run.stdout.trim()), { ok: true, step: 2, probs: [n, 3, h, w], cms: [n, 2, 3, 3, h, w] });
  const torchOut = (await readSafetensors(path.join(dir, 'torch.safetensors'))).tensors;
  const ours = await model.predict(images, [n, 1, h, w], { cms: true });
  const worst = (a: Float32Array, b: ArrayLike<number>) => a.reduce((m, x, i) => Math.max(m, Math.abs(x - b[i])), 0);
  const dp = worst(ours.probs, torchOut.probs.data as Float32Array);
  const dc = worst(ours.cms!, torchOut.cms.data as Float32Array);
  t.ok(dp < 1e-5 && dc < 1e-5, `probabilities within ${dp.toExponential(1)}, CMs within ${dc.toExponential(1)} (tolerance 1e-5)`);
  const bad = spawnSync(PYTHON, [path.join(__dirname, '..', 'scripts', 'torch_reference.py'), 'predict', '--checkpoint', path.join(dir, 'images.safetensors'),
    '--images', path.join(dir, 'images.safetensors'), '--out', path.join(dir, 'x.safetensors')], { encoding: 'utf8' });
  t.equal(bad.status, 2);
  t.match(bad.stdout, /not a cmseg checkpoint/);
});
