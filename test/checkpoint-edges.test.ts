// Checkpoint edge cases (h9): hand-edited or incomplete checkpoints, checkpoints of
// another format version, and metadata too large for any safetensors reader.
import t from 'tap';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { createModel, loadCheckpoint, readCheckpoint, saveCheckpoint } from '../src/index';
import { encodeSafetensors, readSafetensors, writeSafetensors } from '../src/data/safetensors';
import { missingPythonModules, runPythonJson } from './helpers/python';

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cmseg-ckpt-edges-'));
t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));

function batch() {
  const images = new Float32Array(2 * 16 * 16).map((_, i) => Math.sin(i * 0.37));
  return { images, shape: [2, 1, 16, 16], labels: [Uint8Array.from(images, (x) => (x > 0 ? 1 : 0))], present: new Uint8Array([1, 1]) };
}

/** Rewrites a safetensors file through `edit` on its tensors and metadata (offsets recomputed). */
async function rewrite(from: string, to: string, edit: (f: Awaited<ReturnType<typeof readSafetensors>>) => void): Promise<void> {
  const f = await readSafetensors(from);
  edit(f);
  const tensors: Record<string, { data: Float32Array; shape: number[] }> = {};
  for (const [k, v] of Object.entries(f.tensors)) tensors[k] = { data: v.data as Float32Array, shape: v.shape };
  await writeSafetensors(to, tensors, f.metadata);
}

t.test('a checkpoint that lacks some but not all Adam moments is refused (resume would not be exact)', async (t) => {
  const m = createModel({ classes: 2, annotators: 1, depth: 1, baseChannels: 2, seed: 1 });
  await m.trainStep(batch());
  const good = path.join(dir, 'moments.safetensors');
  await saveCheckpoint(m, good);
  await m.dispose();
  for (const drop of ['optim.v.seg.bias', 'optim.m.enc.0.conv1.weight']) {
    const file = path.join(dir, `no-${drop}.safetensors`);
    await rewrite(good, file, (f) => delete f.tensors[drop]);
    await t.rejects(loadCheckpoint(file), { message: new RegExp(`^${file.replace(/[.*+?^${}()|[\]\\/]/g, '\\$&')}: .*lacks .*'${drop.replace(/\./g, '\\.')}'`) }, `without ${drop}`);
  }
  const mOnly = path.join(dir, 'no-optim-m.safetensors');
  await rewrite(good, mOnly, (f) => { for (const k of Object.keys(f.tensors)) if (k.startsWith('optim.m.')) delete f.tensors[k]; });
  await t.rejects(loadCheckpoint(mOnly), /lacks 'optim\.m\./, 'second moments without first moments');
  // Without any optim.* tensor (weights only, e.g. from a PyTorch state_dict) it still loads, fresh moments.
  const weightsOnly = path.join(dir, 'weights-only.safetensors');
  await rewrite(good, weightsOnly, (f) => { for (const k of Object.keys(f.tensors)) if (k.startsWith('optim.')) delete f.tensors[k]; });
  const w = await loadCheckpoint(weightsOnly);
  t.equal(w.step, 1);
  t.ok(Object.values(w.getOptimizerState().v).every((a) => a.every((x) => x === 0)), 'fresh second moments');
  await w.dispose();
});

t.test('a checkpoint of another format version is refused, naming both versions', async (t) => {
  const m = createModel({ classes: 2, annotators: 1, depth: 1, baseChannels: 2 });
  const good = path.join(dir, 'v1.safetensors');
  await saveCheckpoint(m, good);
  await m.dispose();
  t.equal((await readSafetensors(good)).metadata.version, '1');
  for (const version of ['2', '0', '1.0', '']) {
    const file = path.join(dir, `v-${version || 'empty'}.safetensors`);
    await rewrite(good, file, (f) => (f.metadata.version = version));
    const pattern = new RegExp(`checkpoint format version '${version.replace(/\./g, '\\.')}'.*reads version '1'`);
    await t.rejects(readCheckpoint(file), { message: pattern }, `readCheckpoint, version '${version}'`);
    await t.rejects(loadCheckpoint(file), { message: pattern }, `loadCheckpoint, version '${version}'`);
  }
});

t.test('metadata too large for a safetensors header is refused when saving, not written unreadable', async (t) => {
  const m = createModel({ classes: 2, annotators: 1, depth: 1, baseChannels: 2 });
  const file = path.join(dir, 'huge-extra.safetensors');
  await saveCheckpoint(m, file, { epoch: 1 });
  const before = fs.readFileSync(file);
  // The official reader (and cmseg's) refuse headers over 100,000,000 bytes.
  await t.rejects(saveCheckpoint(m, file, { note: 'x'.repeat(100_000_000) }), /header .*100000000 bytes/);
  t.ok(fs.readFileSync(file).equals(before), 'the previous checkpoint is untouched'); // (not t.same: its diff of 100 MB buffers runs out of memory)
  t.same((await readCheckpoint(file)).extra, { epoch: 1 });
  t.throws(() => encodeSafetensors({ a: new Float32Array(1) }, { x: 'y'.repeat(100_000_000) }), /header .*100000000 bytes/);
  // Large but legal metadata (10 MB, non-ASCII) round-trips, and Python reads it.
  const big = 'é😀'.repeat(2_000_000);
  await saveCheckpoint(m, file, { big });
  t.equal((await readCheckpoint(file)).extra.big, big);
  await m.dispose();
  const skip = missingPythonModules('safetensors');
  if (skip) return t.skip(skip);
  const py = runPythonJson<{ n: number; head: string }>(
    'import sys, json\nfrom safetensors import safe_open\nwith safe_open(sys.argv[1], "np") as f: e = json.loads(f.metadata()["extra"])["big"]\nprint(json.dumps({"n": len(e), "head": e[:4]}))',
    [file],
  );
  t.same(py, { n: 4_000_000, head: 'é😀é😀' });
});

t.test('a header with deeply nested arrays is refused with a clear error, not a stack overflow', async (t) => {
  const { decodeSafetensors } = await import('../src/data/safetensors');
  const mk = (json: string) => {
    const j = Buffer.from(json);
    const head = Buffer.alloc(8);
    head.writeBigUInt64LE(BigInt(j.length));
    return Buffer.concat([head, j]);
  };
  const deep = '['.repeat(200_000) + ']'.repeat(200_000);
  // (Python's safetensors refuses these too: "recursion limit exceeded".)
  t.throws(() => decodeSafetensors(mk(`{"a":${deep}}`), 'deep.safetensors'), { name: 'SafetensorsError', message: /^deep\.safetensors: corrupt header: tensor 'a' must be an object \{dtype, shape, data_offsets\}, got an array \[/ });
  t.throws(() => decodeSafetensors(mk(`{"a":{"dtype":"F32","shape":${deep},"data_offsets":[0,0]}}`), 'deep.safetensors'), { name: 'SafetensorsError', message: /^deep\.safetensors: corrupt header: tensor 'a' has shape \[/ });
  t.throws(() => decodeSafetensors(mk(`{"__metadata__":${deep}}`), 'deep.safetensors'), { name: 'SafetensorsError', message: /^deep\.safetensors: corrupt header: __metadata__ must be an object of strings/ });
});

t.test("a checkpoint with Adam moments but no 'step' is refused (Adam's bias correction needs it)", async (t) => {
  const m = createModel({ classes: 2, annotators: 1, depth: 1, baseChannels: 2, seed: 2 });
  for (let i = 0; i < 3; i++) await m.trainStep(batch());
  const good = path.join(dir, 'step.safetensors');
  await saveCheckpoint(m, good);
  await m.dispose();
  const noStep = path.join(dir, 'no-step.safetensors');
  await rewrite(good, noStep, (f) => delete f.metadata.step);
  await t.rejects(loadCheckpoint(noStep), /no 'step'/);
  // Weights only and no step: a fresh optimiser at step 0.
  const bare = path.join(dir, 'bare.safetensors');
  await rewrite(noStep, bare, (f) => { for (const k of Object.keys(f.tensors)) if (k.startsWith('optim.')) delete f.tensors[k]; });
  const b = await loadCheckpoint(bare);
  t.equal(b.step, 0);
  await b.dispose();
});

t.test('loadCheckpoint refuses overrides that are not an object, saying so', async (t) => {
  const m = createModel({ classes: 2, annotators: 1, depth: 1, baseChannels: 2 });
  const file = path.join(dir, 'overrides.safetensors');
  await saveCheckpoint(m, file);
  await m.dispose();
  for (const bad of [null, 'cpu', [1], 3]) // eslint-disable-next-line @typescript-eslint/no-explicit-any
    await t.rejects(loadCheckpoint(file, bad as any), { name: 'TypeError', message: /^loadCheckpoint: overrides must be an object of model settings/ }, `overrides ${JSON.stringify(bad)}`);
  const ok = await loadCheckpoint(file, undefined);
  t.equal(ok.config.classes, 2);
  await ok.dispose();
});

t.test('loadCheckpoint: undefined overrides keep the checkpoint\'s settings; optimizer and loss overrides are laid over its own', async (t) => {
  const m = createModel({ classes: 2, annotators: 1, depth: 1, baseChannels: 2, seed: 7, tf32: false, optimizer: { lr: 0.003, weightDecay: 0.01 }, loss: { lambda: 0.2 } });
  const file = path.join(dir, 'override-merge.safetensors');
  await saveCheckpoint(m, file);
  await m.dispose();
  // {device: args.device} with no --device: undefined values reset seed 7 to 0 and tf32 to true.
  const kept = await loadCheckpoint(file, { seed: undefined, tf32: undefined, device: undefined, depth: undefined });
  t.equal(kept.config.seed, 7, 'seed kept');
  t.equal(kept.config.tf32, false, 'tf32 kept');
  t.equal(kept.config.depth, 1, 'depth kept, not "changed" by undefined');
  await kept.dispose();
  // Typed as taken, and were dropped: the checkpoint's lr stayed 0.003.
  const tuned = await loadCheckpoint(file, { optimizer: { lr: 1e-4 }, loss: { lambda: 0.05 } });
  t.ok(Math.abs(tuned.optimizer.lr - 1e-4) < 1e-10, `lr from the override: ${tuned.optimizer.lr}`);
  t.ok(Math.abs(tuned.optimizer.weightDecay - 0.01) < 1e-9, 'weight decay from the checkpoint');
  t.ok(Math.abs(tuned.loss.lambda - 0.05) < 1e-9, `lambda from the override: ${tuned.loss.lambda}`);
  await tuned.dispose();
});

t.test('saveCheckpoint refuses an extra whose JSON is not an object, keeping the previous file (it wrote a checkpoint nothing could load)', async (t) => {
  const m = createModel({ classes: 2, annotators: 1, depth: 1, baseChannels: 2 });
  const file = path.join(dir, 'extra.safetensors');
  await saveCheckpoint(m, file, { epoch: 3 });
  const before = fs.readFileSync(file);
  for (const [what, extra] of [['a Date', new Date(0)], ['toJSON giving an array', { toJSON: () => [1] }], ['toJSON giving null', { toJSON: () => null }], ['toJSON giving undefined', { toJSON: () => undefined }]] as const) {
    // eslint-disable-next-line @typescript-eslint/no-explicit-any
    await t.rejects(saveCheckpoint(m, file, extra as any), { name: 'TypeError', message: /^saveCheckpoint: extra must be a plain object of JSON values/ }, what);
    t.ok(fs.readFileSync(file).equals(before), `${what}: the previous checkpoint is untouched`);
  }
  t.same((await readCheckpoint(file)).extra, { epoch: 3 });
  await m.dispose();
});

t.test('the PyTorch reference refuses what loadCheckpoint refuses: another version, partial moments, moments without a step', { skip: missingPythonModules('torch', 'safetensors').length ? 'needs torch and safetensors' : false }, async (t) => {
  // Files the tests above wrote: v-2, no-optim.v.seg.bias, no-optim-m, no-step; v1 and weights-only load.
  const script = path.join(__dirname, '..', 'scripts');
  const files = ['v1', 'weights-only', 'v-2', 'no-optim.v.seg.bias', 'no-optim-m', 'no-step'].map((name) => path.join(dir, `${name}.safetensors`));
  const result = runPythonJson<(string | null)[]>(
    `import json, sys\nsys.path.insert(0, sys.argv[1])\nimport torch_reference as tr\nout = []\nfor f in sys.argv[2:]:\n    try:\n        tr.load_checkpoint(f)\n        out.append(None)\n    except ValueError as e:\n        out.append(str(e))\nprint(json.dumps(out))`,
    [script, ...files],
  );
  t.same(result.slice(0, 2), [null, null], 'a checkpoint and its weights alone load');
  t.match(result[2], /checkpoint format version '2'; this reference reads version '1'/);
  t.match(result[3], /Adam moments optim\.v\.\* lack 1 parameter\(s\) \(seg\.bias\): every moment or none/);
  t.match(result[4], /Adam moments optim\.m\.\* lack/);
  t.match(result[5], /Adam moments without a whole-number 'step' \(got None\)/);
});
