// What a user read in a walkthrough of the commands and could not act on, or read wrong:
// --val-cases past the validation split (used all the same, the log recording the number
// asked), a refused resume naming a setting the user never typed (schedule.minLr), "1 PNG
// pictures", and --data given a file told only that it "must be a folder".
import t from 'tap';
import * as fs from 'fs';
import * as path from 'path';
import { runCli } from './helpers/cli';
import { tempDir } from './helpers/files';
import { writeBratsPhantoms } from '../src/data/brats-phantom';
import { readTrainLog, readTrainerState } from '../src/train/trainer';

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
