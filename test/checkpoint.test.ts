// Checkpoints: exact resume (weights, Adam moments, step, settings), the
// safetensors layout PyTorch users load, and clear errors for broken files.
import t from 'tap';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { createModel, loadCheckpoint, readCheckpoint, saveCheckpoint } from '../src/index';
import { readCheckpointInfo } from '../src/model/checkpoint-info';
import { runCli } from './helpers/cli';
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

/** `bytes` (a safetensors file) with its header JSON edited by `edit`, length prefix adjusted. */
function editHeader(bytes: Buffer, edit: (h: Record<string, any>) => void): Buffer { // eslint-disable-line @typescript-eslint/no-explicit-any
  const n = Number(bytes.readBigUInt64LE(0));
  const header = JSON.parse(bytes.subarray(8, 8 + n).toString('utf8'));
  edit(header);
  const json = Buffer.from(JSON.stringify(header), 'utf8');
  const head = Buffer.alloc(8);
  head.writeBigUInt64LE(BigInt(json.length));
  return Buffer.concat([head, json, bytes.subarray(8 + n)]);
}

/** `bytes` with the JSON in metadata entry `key` edited by `edit`. */
function editMetadata(bytes: Buffer, key: string, edit: (value: any) => unknown): Buffer { // eslint-disable-line @typescript-eslint/no-explicit-any
  return editHeader(bytes, (h) => (h.__metadata__[key] = JSON.stringify(edit(JSON.parse(h.__metadata__[key])))));
}

const escape = (s: string) => s.replace(/[.*+?^${}()|[\]\\/]/g, '\\$&');

t.test('a checkpoint with a corrupt header names the file and the tensor (loadCheckpoint, readCheckpoint, cmseg info)', async (t) => {
  const m = createModel({ ndim: 3, inChannels: 4, classes: 2, annotators: 1, depth: 1, baseChannels: 4 });
  const good = path.join(dir, 'header-good.safetensors');
  await saveCheckpoint(m, good);
  await m.dispose();
  const bytes = fs.readFileSync(good);
  const W = 'enc.0.conv1.weight'; // [4, 4, 3, 3, 3]: 1728 bytes from offset 0
  const cases: [string, Buffer, RegExp][] = [
    ['offsets-into-header', editHeader(bytes, (h) => (h[W].data_offsets = [-8, 1720])), /corrupt header: tensor 'enc\.0\.conv1\.weight' has data_offsets \[-8, 1720\]: begin -8 is not a non-negative integer/],
    ['overlap', editHeader(bytes, (h) => (h['enc.0.norm1.weight'].data_offsets = [0, 16])), /corrupt header: tensor '.*' \(data_offsets \[0, \d+\]\) overlaps tensor '.*' \(data_offsets \[0, \d+\]\)/],
    ['negative-shape', editHeader(bytes, (h) => (h[W].shape = [-4, -4, 3, 3, 3])), /corrupt header: tensor 'enc\.0\.conv1\.weight' has shape \[-4, -4, 3, 3, 3\]: shape\[0\] = -4 is not a non-negative integer/],
    ['fractional-shape', editHeader(bytes, (h) => (h[W].shape = [0.5, 8, 4, 3, 3, 3])), /corrupt header: tensor 'enc\.0\.conv1\.weight' has shape \[0\.5, 8, 4, 3, 3, 3\]: shape\[0\] = 0\.5 is not a non-negative integer/],
    ['missing-shape', editHeader(bytes, (h) => delete h[W].shape), /corrupt header: tensor 'enc\.0\.conv1\.weight' has no 'shape'/],
    ['missing-offsets', editHeader(bytes, (h) => delete h[W].data_offsets), /corrupt header: tensor 'enc\.0\.conv1\.weight' has no 'data_offsets'/],
    ['null-entry', editHeader(bytes, (h) => (h[W] = null)), /corrupt header: tensor 'enc\.0\.conv1\.weight' must be an object \{dtype, shape, data_offsets\}, got null/],
    ['metadata-not-strings', editHeader(bytes, (h) => (h.__metadata__.step = 3)), /corrupt header: __metadata__ 'step' is 3, not a string/],
    // As the official reader reads it, a null __metadata__ is no metadata: so no cmseg checkpoint.
    ['metadata-null', editHeader(bytes, (h) => (h.__metadata__ = null)), /not a cmseg checkpoint \(metadata format is 'missing'\)/],
  ];
  for (const [name, corrupt, pattern] of cases) {
    const file = path.join(dir, `header-${name}.safetensors`);
    fs.writeFileSync(file, corrupt);
    const named = new RegExp(`^${escape(file)}: ${pattern.source}`);
    await t.rejects(loadCheckpoint(file), { message: named }, `${name}: loadCheckpoint`);
    await t.rejects(readCheckpoint(file), { message: named }, `${name}: readCheckpoint`);
    const info = await runCli(['info', '--checkpoint', file], dir);
    t.equal(info.exitCode, 1, `${name}: cmseg info fails`);
    t.match(info.stderr, new RegExp(`^cmseg: error: ${escape(file)}: ${pattern.source}\n$`), `${name}: cmseg info says why in one line`);
  }
  t.equal((await runCli(['info', '--checkpoint', good], dir)).exitCode, 0, 'the unedited checkpoint is fine');
});

t.test('a tensor with the right element count but another shape is rejected', async (t) => {
  const m = createModel({ ndim: 3, inChannels: 4, classes: 2, annotators: 1, depth: 1, baseChannels: 4, seed: 5 });
  await m.trainStep({
    images: new Float32Array(4 * 8 * 8 * 8).map((_, i) => Math.cos(i)),
    shape: [1, 4, 8, 8, 8],
    labels: [Uint8Array.from({ length: 512 }, (_, i) => i % 3 && 1)],
  });
  const good = path.join(dir, 'shape-good.safetensors');
  await saveCheckpoint(m, good);
  const bytes = fs.readFileSync(good);
  const W = 'enc.0.conv1.weight';
  t.same(m.parameters().find((p) => p.name === W)!.shape, [4, 4, 3, 3, 3]);
  const cases: [string, string, number[]][] = [
    ['weight', W, [8, 2, 3, 3, 3]],
    ['weight-transposed', 'seg.weight', [1, 4, 2, 1, 1]], // the model's is [2, 4, 1, 1, 1]
    ['fewer-dims', W, [16, 27]],
    ['first-moment', `optim.m.${W}`, [4, 4, 9, 3, 1]],
    ['second-moment', `optim.v.${W}`, [4, 4, 27]],
  ];
  const files: string[] = [];
  for (const [name, tensor, shape] of cases) {
    const file = path.join(dir, `shape-${name}.safetensors`);
    fs.writeFileSync(file, editHeader(bytes, (h) => (h[tensor].shape = shape)));
    files.push(file);
    const param = tensor.replace(/^optim\.[mv]\./, '');
    const expected = m.parameters().find((p) => p.name === param)!.shape;
    await t.rejects(
      loadCheckpoint(file),
      { message: `${file}: tensor '${tensor}' has shape [${shape.join(', ')}] but the model's parameter ${param} is [${expected.join(', ')}]` },
      `${name}: names the file, the tensor, the shape found and the one expected`,
    );
  }
  const loaded = await loadCheckpoint(good);
  t.same(loaded.getWeights(), m.getWeights(), 'the unedited checkpoint loads the same weights');
  await loaded.dispose();
  await m.dispose();
  // These are valid safetensors files: only the model can tell the shapes are wrong.
  const skip = missingPythonModules('safetensors', 'numpy');
  if (skip) return t.skip(skip);
  const shapes = runPythonJson<Record<string, number[]>>(
    `import json, sys
from safetensors import safe_open
out = {}
for name in sys.argv[1:]:
    with safe_open(name, 'np') as f: out[name] = [list(f.get_tensor(k).shape) for k in f.keys() if k == 'seg.weight']
print(json.dumps(out))`,
    files,
  );
  t.same(shapes[files[1]], [[1, 4, 2, 1, 1]], 'the official reader reads the edited file, with the edited shape');
  t.equal(Object.keys(shapes).length, files.length, 'the official reader opens every edited file');
});

t.test("errors from a checkpoint's settings name the checkpoint file", async (t) => {
  const m = createModel({ classes: 2, annotators: 2, depth: 2, baseChannels: 4 });
  const good = path.join(dir, 'config-good.safetensors');
  await saveCheckpoint(m, good);
  await m.dispose();
  const bytes = fs.readFileSync(good);
  const write = (name: string, b: Buffer) => {
    const file = path.join(dir, `config-${name}.safetensors`);
    fs.writeFileSync(file, b);
    return file;
  };
  const base0 = write('base0', editMetadata(bytes, 'config', (c) => ({ ...c, baseChannels: 0 })));
  await t.rejects(loadCheckpoint(base0), {
    code: 'CMSEG_INVALID_ARGUMENT',
    message: `${base0}: the checkpoint's model settings are invalid: baseChannels must be in 1..1024, got 0`,
  });
  await t.rejects(readCheckpointInfo(base0), {
    name: 'UserError',
    message: `checkpoint ${base0}: its model config is invalid: baseChannels must be an integer in 1..1024, got 0`,
  });
  const info = await runCli(['info', '--checkpoint', base0], dir);
  t.equal(info.exitCode, 1);
  t.match(info.stderr, new RegExp(`^cmseg: error: checkpoint ${escape(base0)}: its model config is invalid: baseChannels`));
  const annotators = write('annotators', editMetadata(bytes, 'config', (c) => ({ ...c, annotators: -1 })));
  await t.rejects(readCheckpointInfo(annotators), { message: `checkpoint ${annotators}: its model config is invalid: annotators must be an integer in 1..64, got -1` });
  const ndim = write('ndim', editMetadata(bytes, 'config', (c) => ({ ...c, ndim: '2' })));
  await t.rejects(readCheckpointInfo(ndim), { message: `checkpoint ${ndim}: its model config is invalid: ndim must be 2 or 3, got "2"` });
  const lr = write('lr', editMetadata(bytes, 'optimizer', (o) => ({ ...o, lr: -1 })));
  await t.rejects(loadCheckpoint(lr), { message: new RegExp(`^${escape(lr)}: the checkpoint's model settings are invalid: .*lr`) });
  const nullConfig = write('null', editMetadata(bytes, 'config', () => null));
  await t.rejects(readCheckpoint(nullConfig), { message: `${nullConfig}: checkpoint metadata 'config' must be a JSON object, got null` });
  const nullExtra = write('extra', editMetadata(bytes, 'extra', () => [1]));
  await t.rejects(readCheckpointInfo(nullExtra), { message: `${nullExtra}: checkpoint metadata 'extra' must be a JSON object, got an array` });
  const step = write('step', editHeader(bytes, (h) => (h.__metadata__.step = 'two')));
  await t.rejects(loadCheckpoint(step), { message: `${step}: checkpoint metadata 'step' is 'two', not a non-negative integer` });
  // An override that breaks the model says so, and names the file.
  await t.rejects(loadCheckpoint(good, { depth: 9 }), { message: new RegExp(`^${escape(good)}: cannot build the checkpoint's model with the overrides depth: depth must be in 1\\.\\.8, got 9`) });
});

t.test('cmseg eval refuses a checkpoint whose tensor has another shape (it used to score the wrong weights)', async (t) => {
  const run = path.join(dir, 'cli');
  fs.mkdirSync(run);
  const train = await runCli(['train', '--preset', 'mnist-tiny', '--out', 'runs/tiny', '--no-test', '--quiet'], run);
  t.equal(train.exitCode, 0, train.stderr);
  const best = path.join(run, 'runs', 'tiny', 'best.safetensors');
  const bytes = fs.readFileSync(best);
  const n = Number(bytes.readBigUInt64LE(0));
  const W = 'enc.0.conv1.weight';
  const shape = JSON.parse(bytes.subarray(8, 8 + n).toString('utf8'))[W].shape as number[];
  t.same(shape, [4, 1, 3, 3]);
  const bad = path.join(run, 'reshaped.safetensors');
  fs.writeFileSync(bad, editHeader(bytes, (h) => (h[W].shape = [2, 2, 3, 3])));
  const ok = await runCli(['eval', '--checkpoint', best, '--split', 'validation', '--out', 'ok.json'], run);
  t.equal(ok.exitCode, 0, ok.stderr);
  const r = await runCli(['eval', '--checkpoint', bad, '--split', 'validation', '--out', 'bad.json'], run);
  t.equal(r.exitCode, 1, 'exit code 1');
  t.equal(r.stderr, `cmseg: error: ${bad}: tensor '${W}' has shape [2, 2, 3, 3] but the model's parameter ${W} is [4, 1, 3, 3]\n`);
  t.notOk(fs.existsSync(path.join(run, 'bad.json')), 'no metrics written');
  const neg = path.join(run, 'negative.safetensors');
  fs.writeFileSync(neg, editHeader(bytes, (h) => (h[W].data_offsets = [-8, 136])));
  const r2 = await runCli(['eval', '--checkpoint', neg, '--split', 'validation', '--out', 'neg.json'], run);
  t.equal(r2.exitCode, 1);
  t.match(r2.stderr, `cmseg: error: ${neg}: corrupt header: tensor '${W}' has data_offsets [-8, 136]: begin -8 is not a non-negative integer`);
});
