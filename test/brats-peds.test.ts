// BraTS-PEDs 2024 (pediatric) segmentations: 2023 file names (ID-seg.nii.gz) but their own
// numbering, 1 enhancing tumour (ET), 2 non-enhancing tumour (NET), 3 cystic component (CC),
// 4 peritumoural edema (ED), scored as ET = {1}, TC = {1, 2, 3}, WT = {1, 2, 3, 4} (the
// challenge's own scoring: github.com/rachitsaluja/BraTS-2024-Metrics, metrics_PED.py). Read
// only when asked for (--label-scheme peds2024): nothing in the files tells them from 2023
// files, and without it a case with no edema was read silently wrong (ET as necrosis, NET as
// edema, CC as enhancing tumour). The truth here is numpy/nibabel on the files as written.

import t from 'tap';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { BRATS_CLASS_NAMES, BratsError, bratsClassNames, discoverBratsCases, extentOfDims, loadBratsCase, mapBratsLabels, releaseBratsLabels, uncropVolume } from '../src/data/brats';
import { casesInData } from '../src/data/brats-cases';
import { readCacheIndex, readCachedCase } from '../src/data/cache';
import { writeBratsPhantoms } from '../src/data/brats-phantom';
import { bratsDice } from '../src/eval/brats-regions';
import { runCli } from './helpers/cli';
import { missingPythonModules, runPython, runPythonJson } from './helpers/python';

const SEG = '/data/P/P-seg.nii.gz';

t.test('peds2024 reads 1 ET, 2 NET, 3 CC, 4 ED as our classes 3, 1, 1, 2', async (t) => {
  t.same([...mapBratsLabels([0, 1, 2, 3, 4, 4, 1], 'P', SEG, '2023', 'peds2024')], [0, 3, 1, 1, 2, 2, 3]);
  for (const bad of [5, 1.5, -1, NaN]) {
    const err = t.throws(() => mapBratsLabels([0, 1, bad], 'P', SEG, '2023', 'peds2024')) as BratsError;
    t.equal(err.kind, 'bad-label', `label ${bad}`);
    t.match(err.message, /at voxel 2 of \/data\/P\/P-seg\.nii\.gz is not a BraTS-PEDs 2024 label \(0, 1 ET, 2 NET, 3 CC, 4 ED/);
  }
  // A 2018-2021 file's 4 is enhancing tumour: read as PEDs it would become edema.
  t.throws(() => mapBratsLabels([0, 4], 'P', '/data/P/P_seg.nii.gz', '2021', 'peds2024'), { kind: 'bad-label', message: /BraTS 2018-2021 name .*leave out --label-scheme peds2024/ });
  t.throws(() => mapBratsLabels([0], 'P', SEG, '2023', 'peds' as never), RangeError);
  // Class 1 read from a PEDs file is no necrosis: its name says what it holds.
  t.same(bratsClassNames('peds2024'), ['background', 'non-enhancing core (NET + CC)', 'edema (ED)', 'enhancing tumour (ET)']);
  t.equal(bratsClassNames(), BRATS_CLASS_NAMES);
  // The default is unchanged: a 2023 file's 4 is refused, now naming the option for PEDs files.
  const err = t.throws(() => mapBratsLabels([0, 4], 'P', SEG, '2023')) as BratsError;
  t.match(err.message, /resection cavity/);
  t.match(err.message, /BraTS-PEDs 2024 .*1 ET, 2 NET, 3 CC, 4 ED.*cmseg prepare --label-scheme peds2024/);
});

t.test("the mapped classes score WT, TC, ET as the challenge scores PEDs maps (numpy, metrics_PED's regions)", async (t) => {
  const skip = missingPythonModules('numpy');
  if (skip) return t.skip(skip);
  const n = 3;
  const voxels = 6 * 6 * 6;
  // Random PEDs maps, biased towards tumour so that every region is present in both.
  let state = 12345;
  const random = () => ((state = (state * 1103515245 + 12345) % 2 ** 31), state / 2 ** 31);
  const raw = (bias: number) => Uint8Array.from({ length: n * voxels }, () => (random() < bias ? 0 : 1 + Math.floor(random() * 4)));
  const predRaw = raw(0.3);
  const truthRaw = raw(0.4);
  const report = bratsDice(mapBratsLabels(predRaw, 'P', SEG, '2023', 'peds2024'), mapBratsLabels(truthRaw, 'P', SEG, '2023', 'peds2024'), n);
  const official = runPythonJson<Record<string, number[]>>(
    `
import json, sys, numpy as np
p = np.array(json.loads(sys.argv[1]), dtype=np.uint8).reshape(${n}, -1)
g = np.array(json.loads(sys.argv[2]), dtype=np.uint8).reshape(${n}, -1)
def dice(a, b):
    a, b = a.astype(bool), b.astype(bool)
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else 2.0 * np.logical_and(a, b).sum() / s
regions = {'ET': lambda m: m == 1, 'TC': lambda m: (m >= 1) & (m <= 3), 'WT': lambda m: (m >= 1) & (m <= 4)}
print(json.dumps({k: [dice(f(p[i]), f(g[i])) for i in range(${n})] for k, f in regions.items()}))
`,
    [JSON.stringify([...predRaw]), JSON.stringify([...truthRaw])],
  );
  const close = (ours: Float64Array, theirs: number[], what: string) => {
    t.equal(ours.length, theirs.length);
    for (let i = 0; i < theirs.length; i++) t.ok(Math.abs(ours[i] - theirs[i]) < 1e-12, `${what} image ${i}: ${ours[i]} vs ${theirs[i]}`);
  };
  close(report.perImage.enhancingTumour, official.ET, 'ET');
  close(report.perImage.tumourCore, official.TC, 'TC');
  close(report.perImage.wholeTumour, official.WT, 'WT');
});

t.test('predictions are written back in the PEDs numbering: 1 ET, 2 NET (NET and CC), 4 ED', async (t) => {
  t.same([...releaseBratsLabels(Uint8Array.from([0, 1, 2, 3]), '2023', 'peds2024')], [0, 2, 4, 1]);
  // Each PEDs region holds the same voxels after reading and writing back (CC comes back as NET).
  const pedsLabels = Uint8Array.from([0, 1, 2, 3, 4]);
  const back = releaseBratsLabels(mapBratsLabels(pedsLabels, 'P', SEG, '2023', 'peds2024'), '2023', 'peds2024');
  t.same([...back], [0, 1, 2, 2, 4]);
  const regions: [string, (v: number) => boolean][] = [['ET', (v) => v === 1], ['TC', (v) => v >= 1 && v <= 3], ['WT', (v) => v >= 1 && v <= 4]];
  for (const [name, inside] of regions) t.same([...back].map(inside), [...pedsLabels].map(inside), name);
  // The other schemes as before.
  t.same([...releaseBratsLabels(Uint8Array.from([0, 1, 2, 3]), '2021')], [0, 1, 2, 4]);
  t.same([...releaseBratsLabels(Uint8Array.from([0, 1, 2, 3]), '2023')], [0, 1, 2, 3]);
});

/** Writes BraTS-PEDs-style cases with nibabel; returns each case's expected classes (x fastest) and raw label counts. */
function writePedsCases(root: string): Record<string, { mapped: number[]; counts: number[] }> {
  return runPythonJson(
    `
import json, os, sys
import numpy as np, nibabel as nib
root = sys.argv[1]
rng = np.random.default_rng(7)
shape = (20, 18, 12)
affine = np.diag([1.0, 1.0, 1.0, 1.0]); affine[:3, 3] = [-10, -9, -6]
out = {}
for k, with_edema in ((1, True), (2, False)):
    cid = 'BraTS-PED-%05d-000' % k
    d = os.path.join(root, cid); os.makedirs(d)
    brain = np.zeros(shape, bool); brain[2:18, 2:16, 1:11] = True
    for m in ('t1n', 't1c', 't2w', 't2f'):
        img = np.where(brain, rng.integers(100, 1000, shape), 0).astype(np.int16)
        nib.save(nib.Nifti1Image(img, affine), os.path.join(d, '%s-%s.nii.gz' % (cid, m)))
    seg = np.zeros(shape, np.uint8)
    seg[6:9, 5:8, 3:6] = 1     # ET
    seg[9:12, 5:8, 3:6] = 2    # NET
    seg[6:12, 8:10, 3:6] = 3   # CC
    if with_edema: seg[4:14, 10:13, 2:8] = 4
    nib.save(nib.Nifti1Image(seg, affine), os.path.join(d, '%s-seg.nii.gz' % cid))
    table = np.array([0, 3, 1, 1, 2], np.uint8)
    data = np.asarray(nib.load(os.path.join(d, '%s-seg.nii.gz' % cid)).dataobj)
    out[cid] = {'mapped': table[data].flatten(order='F').tolist(), 'counts': [int((data == v).sum()) for v in range(5)]}
print(json.dumps(out))
`,
    [root],
  );
}

t.test('prepare --label-scheme peds2024: the cache holds the mapped classes and records the scheme', async (t) => {
  const skip = missingPythonModules('numpy', 'nibabel');
  if (skip) return t.skip(skip);
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'cmseg-peds-'));
  t.teardown(() => fs.rmSync(root, { recursive: true, force: true }));
  const data = path.join(root, 'peds');
  fs.mkdirSync(data);
  const expected = writePedsCases(data);

  // Default scheme: the case with edema is refused, naming the option; the note names the pediatric cases first.
  const plain = await runCli(['prepare', '--data', data, '--out', path.join(root, 'plain'), '-q'], root);
  t.not(plain.exitCode, 0);
  t.match(plain.stderr, /note: 2 case\(s\) are pediatric \(BraTS-PED-00001-000, \.\.\.\), read with the BraTS 2023 labels .*--label-scheme peds2024/);
  t.match(plain.stderr, /case BraTS-PED-00001-000: label 4 at voxel \d+ of .*BraTS-PED-00001-000-seg\.nii\.gz \(\d+ voxels\) is not a BraTS 2023 label.*--label-scheme peds2024/);

  const cache = path.join(root, 'cache');
  const run = await runCli(['prepare', '--data', data, '--out', cache, '-q', '--label-scheme', 'peds2024'], root);
  t.equal(run.exitCode, 0, run.stderr);
  t.notMatch(run.stderr, /pediatric/, 'no note when the scheme is given');
  t.match(run.stdout, /BraTS-PEDs 2024 segmentations/);
  const index = readCacheIndex(cache);
  t.equal(index.settings.labelScheme, 'peds2024');
  for (const [id, want] of Object.entries(expected)) {
    const c = await readCachedCase(cache, id, index);
    const full = uncropVolume(c.consensus, c.crop, extentOfDims(c.original.dims));
    t.same([...full], want.mapped, `${id}: consensus voxel for voxel`);
    const entry = index.cases.find((e) => e.id === id)!;
    t.same(entry.labelCounts.slice(1), [want.counts[2] + want.counts[3], want.counts[4], want.counts[1]], `${id}: NET+CC, ED, ET counts`);
  }

  // The scheme is a cache setting: the default asked over it is refused, naming the option.
  const again = await runCli(['prepare', '--data', data, '--out', cache, '-q'], root);
  t.not(again.exitCode, 0);
  t.match(again.stderr, /label-scheme: peds2024 in the cache, brats asked/);

  // eval/predict's reading: a cache keeps its own scheme; one asked that differs is refused.
  const list = casesInData(cache, 0.1, true);
  const loaded = await list.load('BraTS-PED-00002-000');
  t.equal(loaded.labelScheme, 'peds2024');
  t.throws(() => casesInData(cache, 0.1, true, 'brats'), { message: /--label-scheme brats asked, but the cache .* was prepared with the label scheme peds2024/ });
  // A NIfTI folder read with the scheme gives the same classes.
  const folder = casesInData(data, 0.1, true, 'peds2024');
  const fromFolder = await folder.load('BraTS-PED-00001-000');
  t.same([...uncropVolume(fromFolder.seg!, fromFolder.crop, extentOfDims(fromFolder.original.dims))], expected['BraTS-PED-00001-000'].mapped);

  // Without the scheme, the case without edema loads with no error and wrong classes: why the note exists.
  const [, noEdema] = discoverBratsCases(data);
  const silent = await loadBratsCase(noEdema);
  const ours = silent.seg!;
  const truth = expected['BraTS-PED-00002-000'].mapped;
  t.ok(ours.some((v, i) => v !== truth[i]), 'read as BraTS 2023, the classes differ from the PEDs meaning');
});

t.test('a cache that records no scheme (made by default) is not reused for peds2024', async (t) => {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'cmseg-peds-old-'));
  t.teardown(() => fs.rmSync(root, { recursive: true, force: true }));
  await writeBratsPhantoms(path.join(root, 'data'), { cases: 1, size: [24, 24, 16], seed: 2, naming: '2023' });
  const first = await runCli(['prepare', '--data', 'data', '--out', 'cache', '-q'], root);
  t.equal(first.exitCode, 0, first.stderr);
  t.notOk('labelScheme' in readCacheIndex(path.join(root, 'cache')).settings, 'a default cache index is as before');
  const second = await runCli(['prepare', '--data', 'data', '--out', 'cache', '-q', '--label-scheme', 'peds2024'], root);
  t.not(second.exitCode, 0, 'not silently kept with the old classes');
  t.match(second.stderr, /note: 1 case\(s\) are read as BraTS-PEDs 2024 .* but are not named as pediatric cases \(BraTS-PED-\.\.\.: BraTS-GLI-00000-000\)/);
  t.match(second.stderr, /label-scheme: brats in the cache, peds2024 asked/);
  const rebuilt = await runCli(['prepare', '--data', 'data', '--out', 'cache', '-q', '--label-scheme', 'peds2024', '--rebuild'], root);
  t.equal(rebuilt.exitCode, 0, rebuilt.stderr);
  t.equal(readCacheIndex(path.join(root, 'cache')).settings.labelScheme, 'peds2024');
  // The phantom's 3 (its ET) is a PEDs CC now: class 1, no class 3 left (independent of the reader: count in numpy).
  const skip = missingPythonModules('numpy', 'nibabel');
  if (skip) return;
  const [c] = discoverBratsCases(path.join(root, 'data'));
  const counts = JSON.parse(runPython('import sys, json, numpy as np, nibabel as nib; d = np.asarray(nib.load(sys.argv[1]).dataobj); print(json.dumps([int((d == v).sum()) for v in range(5)]))', [c.seg!])) as number[];
  const entry = readCacheIndex(path.join(root, 'cache')).cases[0];
  t.same(entry.labelCounts.slice(1), [counts[2] + counts[3], counts[4], counts[1]]);
});

t.test('a peds2024 run end to end: train records the scheme, predict writes PEDs labels, eval and resume refuse a cache read otherwise', async (t) => {
  const skip = missingPythonModules('numpy', 'nibabel');
  if (skip) return t.skip(skip);
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'cmseg-peds-run-'));
  t.teardown(() => fs.rmSync(root, { recursive: true, force: true }));
  // Three cases without edema (the second of writePedsCases, copied under two more ids): the
  // default scheme reads them without an error, so the cache can be prepared again with it.
  const written = path.join(root, 'written');
  fs.mkdirSync(written);
  writePedsCases(written);
  const data = path.join(root, 'peds');
  fs.mkdirSync(data);
  const from = 'BraTS-PED-00002-000';
  for (const id of [from, 'BraTS-PED-00003-000', 'BraTS-PED-00004-000']) {
    fs.mkdirSync(path.join(data, id));
    for (const part of ['t1n', 't1c', 't2w', 't2f', 'seg']) fs.copyFileSync(path.join(written, from, `${from}-${part}.nii.gz`), path.join(data, id, `${id}-${part}.nii.gz`));
  }
  const tiny = ['--patch', '16', '--base-channels', '4', '--val-cases', '1', '--quiet', '--workers', '0'];
  const train = await runCli(['train', '--preset', 'brats3d', '--data', 'peds', '--label-scheme', 'peds2024', '--steps', '2', '--out', 'run', '--no-test', ...tiny], root);
  t.equal(train.exitCode, 0, train.stderr);
  t.equal(readCacheIndex(path.join(root, 'run', 'cache')).settings.labelScheme, 'peds2024', "train prepared its cache with the scheme");
  const checkpoint = path.join('run', 'last.safetensors');

  // predict: the volumes in PEDs numbering (never 3), said so; read back with nibabel.
  const predicted = await runCli(['predict', '--checkpoint', checkpoint, '--out', 'pred', '--split', 'test', '--probs', 'none'], root);
  t.equal(predicted.exitCode, 0, predicted.stderr);
  t.match(predicted.stdout, /labels in BraTS-PEDs 2024 numbering: 1 ET, 2 NET, 4 ED/);
  t.match(fs.readFileSync(path.join(root, 'pred', 'README.txt'), 'utf8'), /BraTS-PEDs 2024 labels \(label scheme peds2024\)/);
  const volume = fs.readdirSync(path.join(root, 'pred')).find((name) => name.endsWith('_consensus.nii.gz'))!;
  const values = JSON.parse(runPython('import sys, json, numpy as np, nibabel as nib; print(json.dumps(sorted(int(v) for v in np.unique(np.asarray(nib.load(sys.argv[1]).dataobj)))))', [path.join(root, 'pred', volume)])) as number[];
  t.ok(values.every((v) => [0, 1, 2, 4].includes(v)), `labels ${values} are PEDs labels without 3`);

  // eval of the folder with the scheme: class 1 is named for what it holds.
  const scored = await runCli(['eval', '--checkpoint', checkpoint, '--data', 'peds', '--label-scheme', 'peds2024', '--out', 'eval.json'], root);
  t.equal(scored.exitCode, 0, scored.stderr);
  t.match(scored.stdout, /non-enhancing core \(NET \+ CC\)/);
  // A scheme typed with the run's own data cannot apply: refused, not ignored.
  const typed = await runCli(['eval', '--checkpoint', checkpoint, '--label-scheme', 'brats'], root);
  t.equal(typed.exitCode, 1);
  t.match(typed.stderr, /--label-scheme brats: the run's cache was read with the label scheme peds2024/);

  // The run's cache prepared again with the default scheme: the same case ids, other classes.
  const rebuilt = await runCli(['prepare', '--data', 'peds', '--out', path.join('run', 'cache'), '--rebuild', '-q'], root);
  t.equal(rebuilt.exitCode, 0, rebuilt.stderr);
  for (const args of [
    ['eval', '--checkpoint', checkpoint],
    ['eval', '--checkpoint', checkpoint, '--no-cms'],
    ['predict', '--checkpoint', checkpoint, '--out', 'pred2'],
    ['train', '--out', 'run', '--resume', '--quiet'],
  ]) {
    const r = await runCli(args, root);
    t.equal(r.exitCode, 1, args.join(' '));
    t.match(r.stderr, /segmentations read with the label scheme brats \(the run's: peds2024\).*--label-scheme peds2024/, args.join(' '));
  }
});

t.test('eval and predict of a moved run folder find the cache train prepared into it', async (t) => {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'cmseg-moved-run-'));
  t.teardown(() => fs.rmSync(root, { recursive: true, force: true }));
  await writeBratsPhantoms(path.join(root, 'data'), { cases: 3, size: [24, 24, 16], seed: 4 });
  const tiny = ['--patch', '16', '--base-channels', '4', '--val-cases', '1', '--quiet', '--workers', '0'];
  const train = await runCli(['train', '--preset', 'brats3d', '--data', 'data', '--steps', '2', '--out', 'run', '--no-test', ...tiny], root);
  t.equal(train.exitCode, 0, train.stderr);
  fs.renameSync(path.join(root, 'run'), path.join(root, 'moved'));
  const scored = await runCli(['eval', '--checkpoint', path.join('moved', 'last.safetensors'), '--out', 'e.json'], root);
  t.equal(scored.exitCode, 0, scored.stderr);
  const saved = JSON.parse(fs.readFileSync(path.join(root, 'e.json'), 'utf8'));
  t.equal(saved.split, 'test');
  const predicted = await runCli(['predict', '--checkpoint', path.join('moved', 'last.safetensors'), '--out', 'p', '--probs', 'none'], root);
  t.equal(predicted.exitCode, 0, predicted.stderr);
  t.match(predicted.stdout, /from the test split of the run \(the cache at .*moved\/cache\)/);
});
