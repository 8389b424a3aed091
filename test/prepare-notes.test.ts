// `cmseg prepare` accepts a case whose modality is zero everywhere in the brain (zScoreInMask
// keeps such a channel at zeros, deliberately: a missing sequence stored as an empty
// volume), but it used to say nothing: a broken export went into training unseen. Now a
// `note:` line on stderr names the case, the modality and its file.

import t from 'tap';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { discoverBratsCases } from '../src/data/brats';
import { writeBratsPhantoms } from '../src/data/brats-phantom';
import { readCacheIndex, readCachedCase } from '../src/data/cache';
import { readNifti, writeNifti } from '../src/data/nifti';
import { createModel } from '../src/model/model';
import { saveCheckpoint } from '../src/model/checkpoint';
import { runCli } from './helpers/cli';

/** Rewrites `file` with its values multiplied by `keep(i)` (0 or 1) per voxel, same geometry. */
async function zeroVoxels(file: string, keep: (i: number) => number): Promise<void> {
  const volume = await readNifti(file);
  const data = Float32Array.from(volume.data, (v, i) => v * keep(i));
  await writeNifti(file, { dims: volume.dims, data, affine: volume.affine }, { datatype: 'int16' });
}

t.test('a modality of zeros in the brain gets a note naming the case, modality and file', async (t) => {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'cmseg-prepare-notes-'));
  t.teardown(() => fs.rmSync(root, { recursive: true, force: true }));
  await writeBratsPhantoms(path.join(root, 'data'), { cases: 3, size: [24, 24, 16], seed: 4 });
  const [empty, half, normal] = discoverBratsCases(path.join(root, 'data'));
  // Case 0: its t1ce all zeros. Case 1: its flair zero on half the volume only (still an image: no note).
  await zeroVoxels(empty.images[1], () => 0);
  await zeroVoxels(half.images[3], (i) => (i % 24 < 12 ? 0 : 1));

  const run = await runCli(['prepare', '--data', 'data', '--out', 'cache', '-q'], root);
  t.equal(run.exitCode, 0, run.stderr);
  const notes = run.stderr.split('\n').filter((line) => line.startsWith('note: '));
  t.same(notes.length, 1, run.stderr);
  t.match(notes[0], `note: case ${empty.id}: the t1ce modality is zero everywhere in the brain (${empty.id}_t1ce.nii.gz)`);
  t.match(notes[0], /kept as zeros/);
  t.notMatch(run.stderr, half.id);
  t.notMatch(run.stderr, normal.id);

  // What the note says is what the cache holds: that channel is all zeros, the others are not.
  const index = readCacheIndex(path.join(root, 'cache'));
  const c = await readCachedCase(path.join(root, 'cache'), empty.id, index);
  const voxels = c.extent.d * c.extent.h * c.extent.w;
  const channel = (k: number) => c.images.subarray(k * voxels, (k + 1) * voxels);
  t.ok(channel(1).every((v) => v === 0), 't1ce cached as zeros');
  t.ok(channel(0).some((v) => v !== 0), 't1 is not');

  // Two modalities of zeros are named together.
  await zeroVoxels(normal.images[0], () => 0);
  await zeroVoxels(normal.images[2], () => 0);
  const again = await runCli(['prepare', '--data', 'data', '--out', 'cache', '-q'], root);
  t.equal(again.exitCode, 0, again.stderr);
  t.match(again.stderr, `note: case ${normal.id}: the t1, t2 modalities are zero everywhere in the brain (${normal.id}_t1.nii.gz, ${normal.id}_t2.nii.gz)`);
  t.notMatch(again.stderr, empty.id, 'an unchanged case is skipped, and noted only when it is prepared');
});

t.test('a case whose four modalities are all zeros is refused even when it has a segmentation', async (t) => {
  // preprocessBratsCase's 'empty-brain' error was reached only without a segmentation: the
  // crop box took in the tumour labels, so a case of four empty images (a failed conversion)
  // went into the cache as zeros labelled tumour, without a word.
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'cmseg-prepare-empty-'));
  t.teardown(() => fs.rmSync(root, { recursive: true, force: true }));
  await writeBratsPhantoms(path.join(root, 'data'), { cases: 2, size: [24, 24, 16], seed: 6 });
  const [broken] = discoverBratsCases(path.join(root, 'data'));
  for (const file of broken.images) await zeroVoxels(file, () => 0);
  const run = await runCli(['prepare', '--data', 'data', '--out', 'cache', '-q'], root);
  t.not(run.exitCode, 0, 'refused');
  t.match(run.stderr, `case ${broken.id}: every modality is zero everywhere`);
  t.match(run.stderr, /the segmentation labels \d+ tumour voxels/);
  t.notOk(fs.existsSync(path.join(root, 'cache', 'cases', `${broken.id}.bin`)), 'nothing cached for it');
});

t.test('predict and eval --data say the same note of a case they read with an empty modality', async (t) => {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'cmseg-predict-notes-'));
  t.teardown(() => fs.rmSync(root, { recursive: true, force: true }));
  await writeBratsPhantoms(path.join(root, 'data'), { cases: 2, size: [24, 24, 16], seed: 5 });
  const [empty, normal] = discoverBratsCases(path.join(root, 'data'));
  await zeroVoxels(empty.images[3], () => 0);
  const model = createModel({ ndim: 3, inChannels: 4, classes: 4, annotators: 2, depth: 2, baseChannels: 4, seed: 1 });
  await saveCheckpoint(model, path.join(root, 'model.safetensors'));
  await model.dispose();
  const note = `note: case ${empty.id}: the flair modality is zero everywhere in the brain (${empty.id}_flair.nii.gz); kept as zeros`;
  for (const args of [
    ['predict', '--checkpoint', 'model.safetensors', '--data', 'data', '--out', 'out', '--patch', '16'],
    ['eval', '--checkpoint', 'model.safetensors', '--data', 'data', '--patch', '16'],
  ]) {
    const run = await runCli(args, root);
    t.equal(run.exitCode, 0, run.stderr);
    const notes = run.stderr.split('\n').filter((line) => line.startsWith('note: case'));
    t.same(notes.length, 1, `${args[0]}: one note`);
    t.match(notes[0], note, `${args[0]} names the case, modality and file`);
    t.notMatch(run.stderr, `note: case ${normal.id}`);
  }
});
