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
