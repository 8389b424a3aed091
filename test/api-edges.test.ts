// Edges of the public TypeScript API found by adversarial use: a validation hook that
// resolves to the wrong thing or logs metrics named like the log's own fields, NIfTI
// writes with a datatype only the reader knows or a non-finite affine, safetensors
// tensors of an unsupported array type, and label maps that are not bytes.
import t from 'tap';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { readTrainLog, train, TRAIN_DEFAULTS, TrainingError } from '../src/index';
import type { TrainConfig, Validator } from '../src/index';
import { encodeSafetensors } from '../src/data/safetensors';
import { encodeNifti, type Matrix4, type NiftiWriteDatatype } from '../src/data/nifti';
import { dicePerClass, evaluateSegmentation } from '../src/eval/metrics';
import { tinySource } from './helpers/tiny-source';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'cmseg-api-edges-'));
t.teardown(() => fs.rmSync(tmp, { recursive: true, force: true }));

// Four 4x4 images, two annotators: one epoch is two steps of a tiny model (well under a second).
const source = tinySource;
const config: TrainConfig = { ...TRAIN_DEFAULTS, method: 'cm', epochs: 1, batchSize: 2, depth: 2, baseChannels: 4 };

t.test('train() checks what hooks.validate resolves to, naming it', async (t) => {
  const run = (name: string, validate: Validator) => train(path.join(tmp, name), config, source(), { validate });
  await t.rejects(run('undefined', (async () => undefined) as unknown as Validator), {
    name: 'TrainingError',
    message: /hooks\.validate must resolve to \{score: number.*got undefined/,
  });
  await t.rejects(run('string-score', (async () => ({ score: '0.9', metrics: {} })) as unknown as Validator), {
    message: /got \{"score":"0\.9","metrics":\{\}\}/,
  });
  // A bare {score} still works: metrics are optional in practice.
  const ok = await run('score-only', (async () => ({ score: 0.5 })) as unknown as Validator);
  t.equal(ok.status, 'completed');
  await ok.model.dispose();
});

t.test('validation metrics named like the log fields are refused instead of overwriting them', async (t) => {
  // Before: {step: 99} replaced the entry's step (a resume then dropped it as written after
  // the checkpoint) and {event: 'x'} hid the entry from the training curves.
  const dir = path.join(tmp, 'clash');
  const err = await train(dir, config, source(), { validate: async () => ({ score: 0.5, metrics: { dice: 0.5, step: 99, event: 1 } }) }).catch((e) => e);
  t.ok(err instanceof TrainingError, 'a TrainingError');
  t.match(err.message, /validation metric\(s\) 'step', 'event' would overwrite the training log's own field/);
  t.notOk(readTrainLog(path.join(dir, 'train-log.jsonl')).some((e) => e.step === 99), 'no entry with the metric as its step');
});

t.test('encodeNifti refuses a datatype it cannot write instead of truncating into it', (t) => {
  const volume = { dims: [2, 2, 1], data: [0.5, 2.5, 3.7, -1.2] };
  // int32 is a type the reader knows; it was written with truncating stores (2.5 -> 2, -1.2 -> -1).
  t.throws(() => encodeNifti(volume, { datatype: 'int32' as NiftiWriteDatatype }), { name: 'NiftiError', message: /datatype "int32" cannot be written: use float32, int16, uint8/ });
  t.throws(() => encodeNifti(volume, { datatype: 'bogus' as NiftiWriteDatatype }), /datatype "bogus" cannot be written/);
  t.ok(encodeNifti(volume, { datatype: 'int16' }).length > 352, 'int16 still written');
  t.end();
});

t.test('encodeNifti refuses a non-finite or short affine, naming the entry', (t) => {
  const volume = { dims: [2, 2, 1], data: new Float32Array(4) };
  const affine = (r: number, c: number, v: number): Matrix4 => {
    const m: Matrix4 = [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]];
    m[r][c] = v;
    return m;
  };
  t.throws(() => encodeNifti({ ...volume, affine: affine(0, 0, NaN) }), { name: 'NiftiError', message: /affine\[0\]\[0\] = NaN/ });
  t.throws(() => encodeNifti({ ...volume, affine: affine(2, 3, Infinity) }), /affine\[2\]\[3\] = Infinity/);
  t.throws(() => encodeNifti({ ...volume, affine: [[1, 0, 0], [0, 1, 0]] as unknown as Matrix4 }), { name: 'NiftiError', message: /affine row 0 is \[1,0,0\]/ });
  t.ok(encodeNifti({ ...volume, affine: affine(0, 3, 5) }).length > 352, 'a finite affine is written');
  t.end();
});

t.test('encodeSafetensors names the tensor and the array type it cannot store', (t) => {
  t.throws(() => encodeSafetensors({ ok: new Float32Array(2), counts: new Int16Array(3) as never }), { name: 'SafetensorsError', message: /tensor 'counts' is Int16Array/ });
  t.throws(() => encodeSafetensors({ list: [1, 2, 3] as never }), /tensor 'list' is a plain array/);
  t.end();
});

t.test('Dice refuses label maps that are not bytes instead of dropping their voxels', (t) => {
  const truth = Uint8Array.from([1, 0, 0, 0]);
  // Before: foreground Dice 0 for probabilities (0.7 indexes no count) and for -1, silently.
  t.throws(() => dicePerClass(new Float32Array([0.7, 1, 0, 0]) as never, truth, 1, 2), { name: 'TypeError', message: /pred is Float32Array: a label map is a Uint8Array/ });
  t.throws(() => dicePerClass(Uint8Array.from([1, 1, 0, 0]), new Int32Array([1, 0, 0, 0]) as never, 1, 2), /truth is Int32Array/);
  t.throws(() => evaluateSegmentation({ pred: [1, 1, 0, 0] as never, truth, n: 1, classes: 2 }), /pred is a plain array/);
  t.same(Array.from(dicePerClass(Uint8Array.from([1, 1, 0, 0]), truth, 1, 2)), [0.8, 2 / 3], 'hand Dice of bytes');
  t.end();
});

t.test('bad optimizer, loss and STAPLE settings name the value given', async (t) => {
  const { createModel } = await import('../src/index');
  const { fuse } = await import('../src/fusion/fuse');
  const base = { ndim: 2 as const, inChannels: 1, classes: 2, annotators: 1, depth: 2, baseChannels: 4 };
  t.throws(() => createModel({ ...base, optimizer: { kind: 'adam', lr: -1 } }), /optimizer\.lr must be >= 0, got -1/);
  t.throws(() => createModel({ ...base, optimizer: { kind: 'adam', beta1: 1.5 } }), /optimizer\.beta1 must be in \[0, 1\), got 1\.5/);
  t.throws(() => createModel({ ...base, optimizer: { kind: 'adamw', weightDecay: -0.1 } }), /weightDecay must be >= 0, got -0\.1/);
  t.throws(() => createModel({ ...base, loss: { lambda: 0.01, warmupSteps: -3 } }), /warmupSteps must be >= 0, got -3/);
  t.throws(() => createModel({ ...base, loss: { lambda: 0.01, warmupSteps: 1e12 } }), /warmupSteps is 1e\+12, outside the integer range/);
  // cmRank is checked in every mode: the config echoes it back (and into checkpoints).
  for (const cmMode of ['full', 'global', 'lowrank'] as const) {
    t.throws(() => createModel({ ...base, cmMode, cmRank: -5 }), /cmRank must be in 1\.\.8, got -5/, `${cmMode}: rank -5`);
    t.throws(() => createModel({ ...base, cmMode, cmRank: 9 }), /cmRank must be in 1\.\.8, got 9/, `${cmMode}: rank 9`);
  }
  t.equal(createModel({ ...base, cmMode: 'full', cmRank: 3 }).config.cmRank, 3, 'a rank in range is kept in every mode (checkpoints of full runs may carry one)');
  const a = Uint8Array.from([0, 1, 1, 0]);
  // NaN used to mean "automatic", as a negative prior does.
  await t.rejects(fuse([a, a], { method: 'staple', classes: 2, prior: NaN }), /prior = nan, expected 0\.\.1/);
  t.ok(await fuse([a, a], { method: 'staple', classes: 2, prior: -1 }), 'a negative prior: automatic');
});

t.test('writePng takes 8-bit samples only, saying what it got', async (t) => {
  const { encodePng } = await import('../src/data/png');
  const image = (data: unknown) => ({ width: 2, height: 1, channels: 1 as const, data: data as Uint8Array });
  t.throws(() => encodePng(image(Float32Array.from([0.5, 1]))), /image data is Float32Array: PNG samples are written from a Uint8Array/);
  t.throws(() => encodePng(image(Uint16Array.from([300, 1]))), /image data is Uint16Array/);
  t.throws(() => encodePng(image([1, 2])), /image data is a plain array/);
  t.ok(encodePng(image(Uint8Array.from([0, 255]))).length > 0);
});

t.test('surface distances refuse fractional dims; a 2D patch error names the index given', async (t) => {
  const { hausdorff95, squaredDistanceTransform } = await import('../src/eval/surface-distance');
  const mask = Uint8Array.from([1, 0, 0, 1, 1, 0, 0, 1]);
  t.throws(() => hausdorff95(mask, mask, [0.5, 2, 8]), /hausdorff95: dims \[0\.5, 2, 8\] must be three integers >= 1/);
  t.throws(() => squaredDistanceTransform(mask, [2, 0.5, 8]), /squaredDistanceTransform: dims \[2, 0\.5, 8\]/);
  t.equal(hausdorff95(mask, mask, [1, 2, 4]), 0);
  const { createModel, slidingWindowPredict } = await import('../src/index');
  const model = createModel({ ndim: 2, inChannels: 1, classes: 2, annotators: 1, depth: 2, baseChannels: 4 });
  await t.rejects(slidingWindowPredict(model, new Float32Array(64), { d: 1, h: 8, w: 8 }, { patch: [4, 4.5] }), /options\.patch\[1\]/);
  await model.dispose();
});
