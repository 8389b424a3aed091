// The BraTS experiment (src/train/experiment.ts): the seeded case split, training batches
// from the patch loader through the trainer's source interface, and whole-volume scoring
// of the validation subset and the full splits.
import t from 'tap';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { writeBratsPhantoms } from '../src/data/brats-phantom';
import { prepareCache } from '../src/data/cache';
import { createModel } from '../src/model/model';
import { Rng } from '../src/data/random';
import { BratsDatasetSpec, bratsCaseSplits, loadExperimentData } from '../src/train/experiment';
import { PRESETS } from '../src/train/presets';

t.test('case split: 70/15/15, at least one each, seeded, independent of the input order', async (t) => {
  const ids = Array.from({ length: 20 }, (_, k) => `case${String(k).padStart(2, '0')}`);
  const split = bratsCaseSplits(ids, 3);
  t.same([split.train.length, split.validation.length, split.test.length], [14, 3, 3]);
  t.same([...split.train, ...split.validation, ...split.test].sort(), ids, 'every case once');
  t.same(split.test, [...split.test].sort(), 'sorted within a split');
  t.same(bratsCaseSplits(new Rng(1).shuffle([...ids]), 3), split, 'the order given does not matter');
  t.notSame(bratsCaseSplits(ids, 4), split, 'another seed, another split');
  const three = bratsCaseSplits(['a', 'b', 'c'], 0);
  t.same([three.train.length, three.validation.length, three.test.length], [1, 1, 1]);
  t.throws(() => bratsCaseSplits(['a', 'b'], 0), /at least 3 cases/);
  t.throws(() => bratsCaseSplits(['a', 'a', 'b'], 0), /unique/);
});

t.test('brats presets follow SPEC section 8', async (t) => {
  const cpu = PRESETS.brats3d;
  t.match(cpu.train, { depth: 4, baseChannels: 16, batchSize: 1, device: 'cpu', augment: { flips: false, rotations: false } });
  t.match(cpu.dataset, { kind: 'brats', patch: 64, overlap: 0.5 });
  const gpu = PRESETS['brats3d-gpu'];
  t.match(gpu.train, { depth: 4, baseChannels: 32, batchSize: 2, device: 'cuda' });
  t.match(gpu.dataset, { kind: 'brats', patch: 128 });
});

t.test('patch batches for the trainer and whole-volume scores', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cmseg-brats-exp-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  await writeBratsPhantoms(path.join(dir, 'data'), { cases: 5, size: [40, 40, 24], seed: 2 });
  const cache = path.join(dir, 'cache');
  const { index } = await prepareCache(path.join(dir, 'data'), cache);
  const splits = bratsCaseSplits(index.cases.map((c) => c.id), 0);
  t.same([splits.train.length, splits.validation.length, splits.test.length], [3, 1, 1]);
  // Two validation cases, of which the quick check after each epoch scores one.
  const spec: BratsDatasetSpec = {
    ...(PRESETS.brats3d.dataset as BratsDatasetSpec),
    cache,
    patch: 16,
    validationCases: 1,
    splits: { train: splits.train.slice(0, 2), validation: [splits.train[2], ...splits.validation], test: splits.test },
  };
  const data = loadExperimentData(spec, 7, { batchSize: 2, workers: 0 });
  t.teardown(() => data.close?.());
  t.equal(data.source.ndim, 3);
  t.same(data.source.annotatorNames, ['over', 'under', 'wrong']);
  t.equal(data.source.batchesPerEpoch(2), spec.stepsPerEpoch);
  const batch = await data.source.batch(0, 0, 2, new Rng(0));
  t.same(batch.shape, [2, 4, 16, 16, 16]);
  t.equal(batch.labels.length, 3);
  t.equal(batch.consensus!.length, 2 * 16 ** 3);
  const later = await data.source.batch(1, 3, 2, new Rng(0)); // a resumed run reopens the stream there
  t.same(later.shape, [2, 4, 16, 16, 16]);

  const model = createModel({ ndim: 3, inChannels: 4, classes: 4, annotators: 3, depth: 3, baseChannels: 4, seed: 1 });
  const quick = await data.evaluate(model, 'validation', { quick: true });
  t.equal(quick.images, 1, 'the quick check scores validationCases cases');
  t.same(quick.perCase!.map((c) => c.id), [splits.train[2]]);
  const full = await data.evaluate(model, 'validation');
  t.equal(full.images, 2, 'the full split');
  t.equal(full.cmErrorPerAnnotator!.length, 3);
  t.equal(full.reliability!.length, 3);
  t.ok(full.brats && Number.isFinite(full.brats.regions.wholeTumour.mean) && Number.isFinite(full.brats.classes.edema.mean));
  const consensusOnly = await data.evaluate(model, 'test', { annotators: false });
  t.equal(consensusOnly.images, 1);
  t.equal(consensusOnly.cmError, undefined, 'no CM figures without annotators');
  const missing = { ...spec, splits: { ...spec.splits, test: ['BraTS2021_99999'] } };
  t.throws(() => loadExperimentData(missing, 0), /lacks 1 test case\(s\) of this run \(BraTS2021_99999\)/);
});

// SPEC section 7: single mode thins the training cases' labels only. Validation and test
// cases of a single-mode cache are scored with every annotator, as MNIST's are: each
// annotator's CM error covers every case (stored, one annotator would cover each).
t.test('a single-mode cache: every annotator scored on every validation case', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cmseg-brats-single-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  await writeBratsPhantoms(path.join(dir, 'data'), { cases: 4, size: [32, 32, 16], seed: 3 });
  const cache = path.join(dir, 'cache');
  const { index } = await prepareCache(path.join(dir, 'data'), cache, { mode: 'single', seed: 5 });
  t.ok(index.cases.every((c) => c.present.reduce((a, b) => a + b, 0) === 1), 'the cache stores one annotator per case');
  const ids = index.cases.map((c) => c.id);
  const spec: BratsDatasetSpec = {
    ...(PRESETS.brats3d.dataset as BratsDatasetSpec),
    cache,
    patch: 16,
    splits: { train: ids.slice(0, 2), validation: ids.slice(2, 4), test: ids.slice(3, 4) },
  };
  const data = loadExperimentData(spec, 7, { batchSize: 1, workers: 0 });
  t.teardown(() => data.close?.());
  const batch = await data.source.batch(0, 0, 1, new Rng(0));
  const trainPresent = Array.from(batch.present!);
  t.equal(trainPresent.reduce((a, b) => a + b, 0), 1, 'a training patch keeps its one annotator');
  const model = createModel({ ndim: 3, inChannels: 4, classes: 4, annotators: 3, depth: 2, baseChannels: 4, seed: 1 });
  const full = await data.evaluate(model, 'validation');
  t.equal(full.images, 2);
  t.same(full.cmErrorPerAnnotator!.map((s) => s.count), [2, 2, 2], 'each annotator on both cases');
});
