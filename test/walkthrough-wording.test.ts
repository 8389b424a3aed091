// What a user read in a walkthrough of the commands and could not act on, or read wrong:
// --val-cases past the validation split (used all the same, the log recording the number
// asked), a refused resume naming a setting the user never typed (schedule.minLr), "1 PNG
// pictures", --data given a file told only that it "must be a folder", and --probs uint8
// volumes that readers took for 0..255.
import t from 'tap';
import * as fs from 'fs';
import * as path from 'path';
import { runCli } from './helpers/cli';
import { tempDir } from './helpers/files';
import { writeBratsPhantoms } from '../src/data/brats-phantom';
import { readTrainLog, readTrainerState } from '../src/train/trainer';
import { readNifti } from '../src/data/nifti';
import { readSafetensors, writeSafetensors } from '../src/data/safetensors';
import { missingPythonModules, runPythonJson } from './helpers/python';

const dir = tempDir(t, 'cmseg-wording-');
const TINY = ['--patch', '8', '--base-channels', '2', '--depth', '2', '--workers', '0', '--no-test', '--quiet'];

t.test('--val-cases past the validation split: a note, and the run records the number it validates', async (t) => {
  // 4 cases: 1 for validation (15 %, at least one), 1 for test, 2 to train.
  await writeBratsPhantoms(path.join(dir, 'phantom'), { cases: 4, size: [24, 24, 16], seed: 3 });
  const args = ['train', '--preset', 'brats3d', '--data', 'phantom', '--out', 'run', '--steps', '1', '--val-cases', '5', ...TINY];
  const r = await runCli(args, dir);
  t.equal(r.exitCode, 0, r.stderr);
  t.match(r.stderr, /^note: --val-cases 5: the validation split has 1 case; each validation scores that one$/m);
  const log = readTrainLog(path.join(dir, 'run', 'train-log.jsonl'));
  const start = log.find((e) => e.event === 'start') as { run: { dataset: { validationCases: number; splits: { validation: string[] } } } };
  t.equal(start.run.dataset.splits.validation.length, 1);
  t.equal(start.run.dataset.validationCases, 1, 'the log records the number used, not the 5 asked');
  const validation = log.find((e) => e.event === 'validation') as { cases: unknown[] };
  t.equal(validation.cases.length, 1, 'and validates that many');
  const saved = await readTrainerState(path.join(dir, 'run', 'last.safetensors'));
  t.equal((saved.run as { dataset: { validationCases: number } }).dataset.validationCases, 1, 'so does the checkpoint');
  // The same command again resumes (the number asked meets the number recorded, both past the split).
  const again = await runCli([...args, '--resume'], dir);
  t.equal(again.exitCode, 0, again.stderr);
  t.notMatch(again.stderr, /cannot resume/);
  // A run of an earlier version recorded the number asked (5) with a split of 1: the same
  // command line without --val-cases (the preset's number, also past the split) resumes it.
  const last = path.join(dir, 'run', 'last.safetensors');
  const file = await readSafetensors(last);
  const keys = Object.keys(file.metadata).filter((k) => file.metadata[k].includes('"validationCases":1'));
  t.equal(keys.length, 1, 'one metadata entry records the run');
  file.metadata[keys[0]] = file.metadata[keys[0]].replace('"validationCases":1', '"validationCases":5');
  await writeSafetensors(last, file.tensors, file.metadata);
  t.equal(((await readTrainerState(last)).run as { dataset: { validationCases: number } }).dataset.validationCases, 5);
  const older = await runCli(['train', '--preset', 'brats3d', '--data', 'phantom', '--out', 'run', '--steps', '1', '--resume', ...TINY], dir);
  t.equal(older.exitCode, 0, older.stderr);
  t.notMatch(older.stderr, /cannot resume|note: --val-cases/);
  // Another number past the split is the same one case: resumed, with the note.
  const other = await runCli(['train', '--preset', 'brats3d', '--data', 'phantom', '--out', 'run', '--steps', '1', '--val-cases', '3', '--resume', ...TINY], dir);
  t.equal(other.exitCode, 0, other.stderr);
  t.match(other.stderr, /^note: --val-cases 3: the validation split has 1 case; each validation scores that one$/m);
  // Within the split: no note.
  const within = await runCli(['train', '--preset', 'brats3d', '--data', 'run/cache', '--out', 'run1', '--steps', '1', '--val-cases', '1', ...TINY], dir);
  t.equal(within.exitCode, 0, within.stderr);
  t.notMatch(within.stderr, /note: --val-cases/);
});

t.test('one case predicted with --no-cms: "1 PNG picture"', async (t) => {
  const r = await runCli(['predict', '--checkpoint', 'run/best.safetensors', '--data', 'phantom/BraTS2021_00000', '--no-cms', '--probs', 'none', '--out', 'one', '--quiet'], dir);
  t.equal(r.exitCode, 0, r.stderr);
  t.match(r.stdout, /: 4 NIfTI volumes and 1 PNG picture \(/);
});

t.test('--data naming a file says which folder it takes', async (t) => {
  const file = 'phantom/BraTS2021_00000/BraTS2021_00000_t1.nii.gz';
  for (const command of ['predict', 'eval']) {
    const r = await runCli([command, '--checkpoint', 'run/best.safetensors', '--data', file, ...(command === 'predict' ? ['--out', 'x'] : [])], dir);
    t.equal(r.exitCode, 1);
    t.equal(
      r.stderr,
      `cmseg: error: --data ${path.join(dir, file)} is a file: a 3D model takes a folder, a BraTS folder of case folders, one case's folder (here ${path.join(dir, 'phantom/BraTS2021_00000')}) or a cache of cmseg prepare\n`,
      command,
    );
  }
});

t.test('a resume refused for another --lr names --lr, not the cosine floor it moves', async (t) => {
  const args = ['train', '--preset', 'mnist', '--train-images', '16', '--val-images', '8', '--test-images', '8', '--steps', '1', '--depth', '2', '--base-channels', '2', '--no-test', '-q', '--out', 'mnist'];
  const r = await runCli(args, dir);
  t.equal(r.exitCode, 0, r.stderr);
  const refused = await runCli([...args, '--resume', '--lr', '0.01'], dir);
  t.equal(refused.exitCode, 1);
  // The mnist preset: cosine from 3e-3 to 1e-4; --lr scales the floor with it (to 3.3e-4).
  t.equal(
    refused.stderr,
    `cmseg: error: cannot resume ${path.join(dir, 'mnist', 'last.safetensors')} with different settings: --lr 0.01 (the run has 0.003; the schedule's floor minLr follows --lr)\n`,
  );
});

// --probs uint8 stored round(255 p) with scl_slope 1, so nibabel (and every reader applying the
// scaling, as the standard asks) read 0..255, not probabilities.
t.test('--probs uint8: every reader gets the probabilities (scl_slope 1/255), within 1/255 of the float32 ones', { skip: missingPythonModules('numpy', 'nibabel') }, async (t) => {
  const id = 'BraTS2021_00000';
  for (const probs of ['float32', 'uint8']) {
    const r = await runCli(['predict', '--checkpoint', 'run/best.safetensors', '--data', `phantom/${id}`, '--no-cms', '--probs', probs, '--out', `probs-${probs}`, '--quiet'], dir);
    t.equal(r.exitCode, 0, r.stderr);
  }
  const read = runPythonJson<{ slope: number; inter: number; dtype: string; worst: number; range: [number, number]; raw: number }>(
    `
import json, sys, numpy as np, nibabel as nib
f = nib.load(sys.argv[1]); q = nib.load(sys.argv[2])
p8 = q.get_fdata(); p = f.get_fdata()
print(json.dumps({'slope': float(q.dataobj.slope), 'inter': float(q.dataobj.inter), 'dtype': str(q.get_data_dtype()),
  'worst': float(np.abs(p8 - p).max()), 'range': [float(p8.min()), float(p8.max())],
  'raw': float(np.abs(np.asarray(q.dataobj.get_unscaled(), np.float64) - np.round(255 * p)).max())}))
`,
    [path.join(dir, 'probs-float32', `${id}_probs.nii.gz`), path.join(dir, 'probs-uint8', `${id}_probs.nii.gz`)],
  );
  t.equal(read.dtype, 'uint8');
  t.equal(read.slope, Math.fround(1 / 255), 'scl_slope 1/255 (as float32)');
  t.equal(read.inter, 0, 'scl_inter 0');
  t.ok(read.worst <= 1 / 255, `nibabel's get_fdata() is the probabilities within 1/255 (worst ${read.worst})`);
  t.ok(read.range[0] >= 0 && read.range[1] <= 1 + 1e-6 && read.range[1] > 0.5, `in 0..1: ${read.range}`);
  t.ok(read.raw <= 1, `stored: round(255 p) (worst ${read.raw})`);
  // cmseg's own reader applies the scaling as nibabel does: data is p, raw still 255 p.
  const floats = await readNifti(path.join(dir, 'probs-float32', `${id}_probs.nii.gz`));
  const bytes = await readNifti(path.join(dir, 'probs-uint8', `${id}_probs.nii.gz`));
  let worst = 0;
  for (let i = 0; i < floats.data.length; i++) worst = Math.max(worst, Math.abs(bytes.data[i] - floats.data[i]));
  t.ok(worst <= 1 / 255, `readNifti's data: the probabilities within 1/255 (worst ${worst})`);
  t.match(fs.readFileSync(path.join(dir, 'probs-uint8', 'README.txt'), 'utf8'), /scl_slope 1\/255/);
});
