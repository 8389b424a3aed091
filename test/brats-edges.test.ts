// Edge cases of the BraTS command line found by adversarial use: a run's cache prepared
// again (--rebuild) with other settings after the run trained on it. Small phantoms
// (32x32x24, patches 16^3, base width 4, two steps).
import t from 'tap';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { runCli } from './helpers/cli';

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cmseg-brats-edges-'));
t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
const TINY = ['--patch', '16', '--base-channels', '4', '--val-cases', '1', '--workers', '0', '--threads', '1', '--quiet'];

const cmseg = (args: string[]) => runCli(args, dir);

t.test('a run whose cache was rebuilt with other annotators or labels: resume and eval refuse, naming both', async (t) => {
  t.equal((await cmseg(['phantom', 'brats', '--cases', '4', '--size', '32,32,24', '--out', 'data'])).exitCode, 0);
  t.equal((await cmseg(['prepare', '--data', 'data', '--out', 'cache', '--quiet'])).exitCode, 0);
  const train = await cmseg(['train', '--preset', 'brats3d', '--data', 'cache', '--steps', '2', '--out', 'run', '--no-test', ...TINY]);
  t.equal(train.exitCode, 0, train.stderr);
  const checkpoint = path.join('run', 'best.safetensors');

  // Same case ids, other annotators: each CM head would be scored against another annotator.
  t.equal((await cmseg(['prepare', '--data', 'data', '--out', 'cache', '--rebuild', '--annotators', 'good,under,wrong', '--quiet'])).exitCode, 0);
  const evaluated = await cmseg(['eval', '--checkpoint', checkpoint, '--threads', '1']);
  t.equal(evaluated.exitCode, 1, 'eval refuses');
  t.match(evaluated.stderr, /^cmseg: error: the cache \S+cache was prepared again with other settings since this run trained on it: it holds annotators good, under, wrong \(the run's: over, under, wrong\); score the consensus only with --no-cms/);
  t.notMatch(evaluated.stderr, /\n\s+at /, 'no stack trace');
  t.notOk(fs.existsSync(path.join(dir, 'run', 'eval-test-best.json')), 'no metrics written');
  const consensusOnly = await cmseg(['eval', '--checkpoint', checkpoint, '--threads', '1', '--no-cms']);
  t.equal(consensusOnly.exitCode, 0, consensusOnly.stderr);
  // Its own default file: a later full evaluation's (eval-test-best.json) is not replaced by fewer figures.
  const noCms = JSON.parse(fs.readFileSync(path.join(dir, 'run', 'eval-test-best-no-cms.json'), 'utf8'));
  t.notOk('cmError' in noCms.metrics, 'the consensus figures only');
  t.notOk(fs.existsSync(path.join(dir, 'run', 'eval-test-best.json')), 'not under the full evaluation\'s name');
  // The same cache named as new data: scored, the consensus only, and the note says why.
  const asData = await cmseg(['eval', '--checkpoint', checkpoint, '--data', 'cache', '--threads', '1', '--out', 'as-data.json']);
  t.equal(asData.exitCode, 0, asData.stderr);
  t.match(asData.stderr, /^note: the cache's annotators \(good, under, wrong\) are not this model's \(over, under, wrong\): only the consensus is scored\n/);
  t.notOk('cmError' in JSON.parse(fs.readFileSync(path.join(dir, 'as-data.json'), 'utf8')).metrics, 'no CM error');
  const resumed = await cmseg(['train', '--out', 'run', '--resume', ...TINY.slice(-5)]);
  t.equal(resumed.exitCode, 1, 'resume refuses');
  t.match(resumed.stderr, /it holds annotators good, under, wrong \(the run's: over, under, wrong\); prepare the run's data into it again/);

  // Same annotators, one per case: going on would train on thinner labels than the run started with.
  t.equal((await cmseg(['prepare', '--data', 'data', '--out', 'cache', '--rebuild', '--labels', 'single', '--quiet'])).exitCode, 0);
  const single = await cmseg(['train', '--out', 'run', '--resume', ...TINY.slice(-5)]);
  t.equal(single.exitCode, 1, 'resume refuses');
  t.match(single.stderr, /it holds single labels \(the run's: dense\); .*--rebuild --annotators over,under,wrong --labels dense/);
  t.equal((await cmseg(['eval', '--checkpoint', checkpoint, '--threads', '1'])).exitCode, 0, 'eval scores every annotator of a single-label cache');
});

t.test('a run whose cache moved: eval, predict and resume read the run\'s split where --data says', async (t) => {
  t.equal((await cmseg(['phantom', 'brats', '--cases', '4', '--size', '32,32,24', '--out', 'mdata'])).exitCode, 0);
  t.equal((await cmseg(['prepare', '--data', 'mdata', '--out', 'mcache', '--quiet'])).exitCode, 0);
  const args = ['train', '--preset', 'brats3d', '--data', 'mcache', '--steps', '4', '--steps-per-epoch', '2', '--no-test', ...TINY];
  // Interrupted after the first epoch, as Ctrl-C would: a run to resume later.
  let sent = false;
  const stopped = await runCli([...args.filter((a) => a !== '--quiet'), '--out', 'mrun'], dir, (chunk) => {
    if (!sent && /epoch 1\//.test(chunk)) (sent = true), process.emit('SIGINT', 'SIGINT');
  });
  t.equal(stopped.exitCode, 130, stopped.stderr);
  const checkpoint = path.join('mrun', 'last.safetensors');
  const before = await cmseg(['eval', '--checkpoint', checkpoint, '--split', 'validation', '--threads', '1', '--out', 'before.json']);
  t.equal(before.exitCode, 0, before.stderr);

  fs.mkdirSync(path.join(dir, 'elsewhere'));
  fs.renameSync(path.join(dir, 'mcache'), path.join(dir, 'elsewhere', 'mcache'));
  const gone = await cmseg(['eval', '--checkpoint', checkpoint, '--threads', '1']);
  t.equal(gone.exitCode, 1);
  t.match(gone.stderr, /^cmseg: error: the run's cache \S+mcache is gone; if it moved, name its new place with --data \(eval and predict: with the --split to read from it\)\n$/);
  // --split typed: the run's validation cases, read from the new place; the same scores as before the move.
  const moved = await cmseg(['eval', '--checkpoint', checkpoint, '--data', 'elsewhere/mcache', '--split', 'validation', '--threads', '1', '--out', 'after.json']);
  t.equal(moved.exitCode, 0, moved.stderr);
  const metrics = (file: string) => JSON.parse(fs.readFileSync(path.join(dir, file), 'utf8')).metrics;
  t.same(metrics('after.json'), metrics('before.json'), 'the run\'s validation split scored from the moved cache');
  t.equal(JSON.parse(fs.readFileSync(path.join(dir, 'after.json'), 'utf8')).split, 'validation');
  const predicted = await cmseg(['predict', '--checkpoint', checkpoint, '--data', 'elsewhere/mcache', '--split', 'validation', '--threads', '1', '--out', 'pred']);
  t.equal(predicted.exitCode, 0, predicted.stderr);
  const validation: string[] = JSON.parse(fs.readFileSync(path.join(dir, 'after.json'), 'utf8')).metrics.perCase.map((c: { id: string }) => c.id);
  const consensusFiles = fs.readdirSync(path.join(dir, 'pred')).filter((f) => f.endsWith('_consensus.nii.gz'));
  t.same(consensusFiles, validation.map((id) => `${id}_consensus.nii.gz`), 'a consensus for each validation case of the run');
  t.notMatch(predicted.stderr, /earlier prediction/, 'a fresh folder holds nothing earlier');
  // Again into the same folder without probabilities or CMs: the earlier files are said, and kept.
  const repeated = await cmseg(['predict', '--checkpoint', checkpoint, '--data', 'elsewhere/mcache', '--split', 'validation', '--threads', '1', '--out', 'pred', '--probs', 'none', '--no-cms']);
  t.equal(repeated.exitCode, 0, repeated.stderr);
  const id = validation[0];
  // (--no-cms still writes each annotator's estimated labels, not its CM pictures.)
  const earlier = [`${id}_cm-over.png`, `${id}_cm-under.png`, `${id}_cm-wrong.png`, `${id}_probs.nii.gz`];
  t.match(repeated.stderr, `note: pred also holds 4 file(s) of an earlier prediction that this one did not write, left as they were: ${earlier.join(', ')}\n`);
  for (const file of earlier) t.ok(fs.existsSync(path.join(dir, 'pred', file)), `${file} kept`);
  t.notMatch(repeated.stderr, /--overlap/, 'no overlap note at the default');
  // A high overlap multiplies the windows ((ceil(16/3) + 1)^3 = 343 at 0.8 of 16): said before the first case.
  const dense = await cmseg(['predict', '--checkpoint', checkpoint, '--data', 'elsewhere/mcache', '--split', 'validation', '--threads', '1', '--out', 'pred-dense', '--overlap', '0.8', '--probs', 'none', '--no-cms']);
  t.equal(dense.exitCode, 0, dense.stderr);
  t.match(dense.stderr, /^note: --overlap 0\.8 moves each 16-voxel window by 3 voxel\(s\): about 343 windows for a case twice the patch on each axis \(27 at the default 0\.5, as nnU-Net\)\n/);
  // A folder of cases as released is no cache: --split cannot read a run's split from it.
  const raw = await cmseg(['eval', '--checkpoint', checkpoint, '--data', 'mdata', '--split', 'test', '--threads', '1']);
  t.equal(raw.exitCode, 1);
  t.match(raw.stderr, /--split test reads the run's test cases from a cache made by cmseg prepare \(the run's, if it moved\); mdata is not one: leave out --split to score every case in it/);

  // Resume from the new place: the run goes on and records where its cache is now.
  const resumed = await cmseg(['train', '--out', 'mrun', '--resume', '--data', 'elsewhere/mcache', ...TINY.slice(-5)]);
  t.equal(resumed.exitCode, 0, resumed.stderr);
  t.match(resumed.stdout, /trained cm from step 2 to 4/);
  const again = await cmseg(['eval', '--checkpoint', checkpoint, '--split', 'validation', '--threads', '1', '--out', 'resumed.json']);
  t.equal(again.exitCode, 0, `the checkpoint names the moved cache: ${again.stderr}`);
  // While the recorded cache is still there, another --data is a conflict, as before.
  fs.cpSync(path.join(dir, 'elsewhere', 'mcache'), path.join(dir, 'copy'), { recursive: true });
  const other = await cmseg(['train', '--out', 'mrun', '--resume', '--data', 'copy', ...TINY.slice(-5)]);
  t.equal(other.exitCode, 1);
  t.match(other.stderr, /--data copy \(the run reads the cache \S+elsewhere\/mcache\)/);
});
