// Checkpoints: exact resume (weights, Adam moments, step, settings), the
// safetensors layout PyTorch users load, and clear errors for broken files.
import t from 'tap';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { createModel, loadCheckpoint, readCheckpoint, saveCheckpoint } from '../src/index';
import { missingPythonModules, runPythonJson } from './helpers/python';

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cmseg-ckpt-'));
t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));

function batch() {
  const images = new Float32Array(2 * 16 * 16).map((_, i) => Math.sin(i * 0.37));
  const labels = [0, 1].map((r) => Uint8Array.from(images, (x) => (x > 0.1 * r ? 1 : 0)));
  return { images, shape: [2, 1, 16, 16], labels, present: new Uint8Array([1, 1, 1, 0]) };
}

t.test('resuming from a checkpoint continues exactly', async (t) => {
  const config = { classes: 2, annotators: 2, depth: 2, baseChannels: 4, cmMode: 'lowrank' as const, cmRank: 2, seed: 3 };
  const a = createModel({ ...config, optimizer: { kind: 'adamw', lr: 3e-3, weightDecay: 0.01 }, loss: { lambda: 0.05, warmupSteps: 3 } });
  for (let i = 0; i < 2; i++) await a.trainStep(batch());
  const file = path.join(dir, 'a.safetensors');
  await saveCheckpoint(a, file, { epoch: 7 });
  const b = await loadCheckpoint(file);
  t.equal(b.step, 2);
  t.same(b.config, a.config);
  t.same(b.optimizer, a.optimizer);
  t.same(b.loss, a.loss);
  t.same((await readCheckpoint(file)).extra, { epoch: 7 });
  for (let i = 0; i < 3; i++) {
    const ra = await a.trainStep(batch());
    const rb = await b.trainStep(batch());
    t.equal(rb.loss, ra.loss, `step ${ra.step}: identical loss`);
    t.equal(rb.traceWeight, ra.traceWeight);
  }
});

t.test('the file is plain safetensors with SPEC names (python safetensors)', async (t) => {
  const skip = missingPythonModules('safetensors', 'numpy');
  if (skip) return t.skip(skip);
  const m = createModel({ ndim: 3, inChannels: 2, classes: 3, annotators: 2, depth: 2, baseChannels: 4 });
  const file = path.join(dir, 'b.safetensors');
  await saveCheckpoint(m, file);
  const info = await runPythonJson<{ shapes: Record<string, number[]>; dtypes: string[]; meta: Record<string, string>; first: number }>(
    `import json, sys
from safetensors.numpy import load_file
from safetensors import safe_open
d = load_file(sys.argv[1])
with safe_open(sys.argv[1], 'np') as f: meta = f.metadata()
print(json.dumps({'shapes': {k: list(v.shape) for k, v in d.items()}, 'dtypes': sorted({str(v.dtype) for v in d.values()}), 'meta': meta, 'first': float(d['enc.0.conv1.weight'].flat[0])}))`,
    [file],
  );
  t.same(info.shapes['enc.0.conv1.weight'], [4, 2, 3, 3, 3]);
  t.same(info.shapes['up.0.weight'], [8, 4, 2, 2, 2]);
  t.same(info.shapes['cm.1.weight'], [9, 4, 1, 1, 1]);
  t.same(info.shapes['optim.m.seg.bias'], [3]);
  t.same(info.dtypes, ['float32']);
  t.equal(info.meta.format, 'cmseg-checkpoint');
  t.equal(JSON.parse(info.meta.config).ndim, 3);
  t.equal(Math.fround(info.first), m.getWeights()['enc.0.conv1.weight'][0]);
});

t.test('broken checkpoints give clear errors', async (t) => {
  const m = createModel({ classes: 2, annotators: 1, depth: 1, baseChannels: 2 });
  const good = path.join(dir, 'c.safetensors');
  await saveCheckpoint(m, good);
  const bytes = fs.readFileSync(good);
  const cut = path.join(dir, 'cut.safetensors');
  fs.writeFileSync(cut, bytes.subarray(0, bytes.length - 10));
  await t.rejects(loadCheckpoint(cut), /truncated: tensor '.*' ends at byte \d+ but the file has \d+/);
  fs.writeFileSync(cut, bytes.subarray(0, 5));
  await t.rejects(loadCheckpoint(cut), /truncated/);
  await t.rejects(loadCheckpoint(path.join(dir, 'nope.safetensors')), /not found: .*nope.safetensors/);
  const other = path.join(dir, 'other.safetensors');
  const { writeSafetensors } = await import('../src/data/safetensors');
  await writeSafetensors(other, { x: new Float32Array(2) }, { format: 'something-else' });
  await t.rejects(loadCheckpoint(other), /not a cmseg checkpoint/);
});
