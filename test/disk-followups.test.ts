// Follow-ups of the file-system audit (disk-audit.test.ts): a full disk while the training log
// is appended, output folders on a read-only file system, a new run whose first save of
// `last` failed, eval's results on an unwritable folder, a STAPLE baseline on a read-only
// cache whose fused maps are current, and an --out name too long. The disks are small tmpfs
// mounts: where mounting is not permitted those tests skip, saying so.

import t from 'tap';
import * as fs from 'fs';
import * as path from 'path';
import { writeBratsPhantoms } from '../src/data/brats-phantom';
import { fuseCachedCases } from '../src/fusion/fuse-cache';
import { readTrainLog } from '../src/train/trainer';
import { runCli } from './helpers/cli';
import { tempDir } from './helpers/files';
import { fill, mountUnavailable, readOnly, smallDisk } from './helpers/disks';

const noMount = mountUnavailable();

const tiny = ['--preset', 'images', '--depth', '2', '--base-channels', '2', '-q'];

t.test('A: a full disk while the log is appended leaves whole lines, and the error names the log', { skip: noMount }, async (t) => {
  const work = tempDir(t);
  // The log's first line holds the data folder: a deep one makes it longer than a page (4 KiB),
  // so that the disk, with one page left for the log, runs out in the middle of that line.
  const sim = path.join(work, ...Array.from({ length: 16 }, (_, i) => `${i}`.padEnd(200, 'd')), 'sim');
  t.equal((await runCli(['simulate', '--out', sim, '--count', '6'], work)).exitCode, 0);
  const disk = smallDisk(t, 2048);
  fill(disk, 8); // a page for the run's lock file, one for the log
  const run = path.join(disk, 'run');
  const r = await runCli(['train', '--preset', 'images', '--data', sim, '--steps', '12', '--checkpoint-every', '1', '-q', '--out', run], work);
  t.equal(r.exitCode, 1);
  // Was "no space left on the device while writing a path", and the first 4096 bytes of the line left in the log.
  t.notMatch(r.stderr, /a path/);
  t.match(r.stderr, /no space left on the device while writing \S*run\/train-log\.jsonl/);
  const log = path.join(run, 'train-log.jsonl');
  const text = fs.readFileSync(log, 'utf8');
  t.ok(text === '' || text.endsWith('\n'), `no half line at the end of the log (${text.length} bytes)`);
  t.doesNotThrow(() => readTrainLog(log), 'readTrainLog reads it');
});

t.test('B: output folders on a read-only file system are reported as read-only, not as missing', { skip: noMount }, async (t) => {
  const work = tempDir(t);
  t.equal((await runCli(['simulate', '--out', 'sim', '--count', '6'], work)).exitCode, 0);
  t.equal((await runCli(['train', ...tiny, '--data', 'sim', '--steps', '1', '--no-test', '--out', 'run'], work)).exitCode, 0);
  const checkpoint = path.join(work, 'run', 'last.safetensors');
  // One image's masks by three raters.
  const raters = fs.readdirSync(path.join(work, 'sim', 'labels')).slice(0, 3);
  const image = fs.readdirSync(path.join(work, 'sim', 'labels', raters[0]))[0];
  const masks = raters.map((r) => path.join(work, 'sim', 'labels', r, image));
  const disk = smallDisk(t, 64);
  readOnly(disk);
  const cases: [string, string[]][] = [
    ['train', ['train', ...tiny, '--data', 'sim', '--steps', '1', '--no-test', '--out', path.join(disk, 'newrun')]],
    ['eval --out', ['eval', '--checkpoint', checkpoint, '--out', path.join(disk, 'new', 'e.json')]],
    ['fuse -o', ['fuse', ...masks, '-o', path.join(disk, 'new', 'f.png')]],
  ];
  for (const [name, args] of cases) {
    const r = await runCli(args, work);
    t.equal(r.exitCode, 1, `${name}: exit code`);
    t.match(r.stderr, /read-only file system/, `${name}: says read-only`);
    t.notMatch(r.stderr, /no such file or directory/, `${name}: was "ENOENT: no such file or directory, mkdir ..."`);
  }
  t.same(fs.readdirSync(disk), [], 'nothing written');
});

t.test('C: a new run whose first save of last failed can be started again; an earlier run\'s best is still kept', { skip: noMount }, async (t) => {
  const work = tempDir(t);
  t.equal((await runCli(['simulate', '--out', 'sim', '--count', '8'], work)).exitCode, 0);
  // One epoch (validation, then best, then last) per step: the disk runs out between best and last.
  const args = ['train', ...tiny, '--data', path.join(work, 'sim'), '--steps', '3', '--no-test'];
  t.equal((await runCli([...args, '--out', 'reference'], work)).exitCode, 0);
  const bestBytes = fs.statSync(path.join(work, 'reference', 'best.safetensors')).size;
  let stuck: { run: string; filler: string } | undefined;
  for (let leaveKb = Math.floor(bestBytes / 4096) * 4; leaveKb <= Math.ceil(bestBytes / 4096) * 4 + 32 && !stuck; leaveKb += 4) {
    const disk = smallDisk(t, 512);
    const filler = fill(disk, leaveKb);
    const run = path.join(disk, 'run');
    const r = await runCli([...args, '--out', run], work);
    if (r.exitCode !== 0 && fs.existsSync(path.join(run, 'best.safetensors')) && !fs.existsSync(path.join(run, 'last.safetensors'))) stuck = { run, filler };
  }
  if (!stuck) return t.fail('no amount of free space left best without last');
  fs.rmSync(stuck.filler);
  const resumed = await runCli(['train', '--resume', '-q', '--out', stuck.run], work);
  t.equal(resumed.exitCode, 1);
  t.match(resumed.stderr, /nothing to resume: .*never saved it.*start it again without --resume/, 'the command line says to start it again');
  // Was refused: "holds best.safetensors of an earlier run"; the user had to delete files by hand.
  const again = await runCli([...args, '--out', stuck.run], work);
  t.equal(again.exitCode, 0, again.stderr);
  t.ok(fs.readFileSync(path.join(stuck.run, 'last.safetensors')).equals(fs.readFileSync(path.join(work, 'reference', 'last.safetensors'))), 'the new run ends as the uninterrupted one');
  t.ok(fs.readFileSync(path.join(stuck.run, 'best.safetensors')).equals(fs.readFileSync(path.join(work, 'reference', 'best.safetensors'))), 'its best is the new run\'s');

  // A finished run whose last was deleted afterwards (to save space) keeps its best: refused as before.
  fs.rmSync(path.join(work, 'reference', 'last.safetensors'));
  const over = await runCli([...args, '--out', 'reference'], work);
  t.equal(over.exitCode, 1);
  t.match(over.stderr, /holds best\.safetensors of an earlier run/);
  t.ok(fs.existsSync(path.join(work, 'reference', 'best.safetensors')));
});

t.test('D: eval checks its output folder before evaluating, and prints the scores before writing them', { skip: noMount }, async (t) => {
  const work = tempDir(t);
  t.equal((await runCli(['simulate', '--out', 'sim', '--count', '6'], work)).exitCode, 0);
  const disk = smallDisk(t, 1024);
  t.equal((await runCli(['train', ...tiny, '--data', path.join(work, 'sim'), '--steps', '1', '--no-test', '--out', 'run'], disk)).exitCode, 0);
  const checkpoint = path.join(disk, 'run', 'last.safetensors');
  readOnly(disk);
  const r = await runCli(['eval', '--checkpoint', checkpoint], work);
  t.equal(r.exitCode, 1);
  t.match(r.stderr, /eval-test-last\.json.*read-only file system.*--out/, 'names the file and suggests --out');
  t.notMatch(r.stderr, /no such file or directory/);
  t.equal(r.stdout, '', 'nothing evaluated');
  // With --out elsewhere it works, and prints the tables.
  const ok = await runCli(['eval', '--checkpoint', checkpoint, '--out', path.join(work, 'e.json')], work);
  t.equal(ok.exitCode, 0, ok.stderr);
  t.match(ok.stdout, /Dice/);

  // The output's folders are made before the evaluation: a failing one leaves none behind.
  fs.mkdirSync(path.join(work, 'nodata', 'images'), { recursive: true });
  const bad = await runCli(['eval', '--checkpoint', checkpoint, '--data', 'nodata', '--out', path.join(work, 'new', 'deep', 'e.json')], work);
  t.equal(bad.exitCode, 1);
  t.notOk(fs.existsSync(path.join(work, 'new')), 'no empty output folder left');

  // A full disk: refused before the evaluation too.
  const full = smallDisk(t, 1024);
  fs.copyFileSync(checkpoint, path.join(full, 'last.safetensors'));
  fill(full);
  const f = await runCli(['eval', '--checkpoint', path.join(full, 'last.safetensors')], work);
  t.equal(f.exitCode, 1);
  t.match(f.stderr, /eval-test-last\.json.*no space left on the device.*--out/);
  t.equal(f.stdout, '');
  t.same(fs.readdirSync(full).sort(), ['filler', 'last.safetensors'], 'no probe left behind');

  // One page free: the check passes, the metrics file (more than a page) does not fit. The
  // scores are printed all the same (were printed only after the file was written).
  t.ok(fs.statSync(path.join(work, 'e.json')).size > 4096, 'the metrics file needs more than a page');
  const late = smallDisk(t, 1024);
  fs.copyFileSync(checkpoint, path.join(late, 'last.safetensors'));
  fill(late, 4);
  const l = await runCli(['eval', '--checkpoint', path.join(late, 'last.safetensors')], work);
  t.equal(l.exitCode, 1);
  t.match(l.stderr, /could not write \S+eval-test-last\.json: no space left on the device/);
  t.match(l.stdout, /Dice/, 'the scores are on stdout');
  t.ok(ok.stdout.startsWith(l.stdout.split('outputs:')[0]), 'the same tables as a run that wrote its file');
});

t.test('E: a STAPLE baseline trains on a read-only cache whose fused maps are current', { skip: noMount }, async (t) => {
  const work = tempDir(t);
  const ph = path.join(work, 'ph');
  await writeBratsPhantoms(ph, { cases: 3, size: [16, 16, 16], seed: 1 });
  const disk = smallDisk(t, 2048);
  const cache = path.join(disk, 'cache');
  t.equal((await runCli(['prepare', '--data', ph, '--out', cache, '-q'], work)).exitCode, 0);
  const train = ['train', '--preset', 'brats3d', '--data', cache, '--method', 'naive-staple', '--steps', '1', '--patch', '8', '--depth', '2', '--base-channels', '2', '--no-test', '-q'];
  // Fuses the training cases' maps into the cache.
  t.equal((await runCli([...train, '--out', path.join(work, 'first')], work)).exitCode, 0);
  readOnly(disk);
  // Was: "cannot write the cache ... (its lock file .prepare.lock): it is on a read-only file system", with nothing to write.
  const r = await runCli([...train, '--out', path.join(work, 'second')], work);
  t.equal(r.exitCode, 0, r.stderr);
  t.ok(fs.existsSync(path.join(work, 'second', 'last.safetensors')));
  // The API too: every map current, none fused, no lock taken (nothing written on the read-only cache).
  const index = JSON.parse(fs.readFileSync(path.join(cache, 'index.json'), 'utf8')) as { cases: { id: string; fused?: Record<string, unknown> }[] };
  const fusedCases = index.cases.filter((c) => c.fused && Object.keys(c.fused).length > 0);
  t.ok(fusedCases.length > 0, 'the first run fused maps into the cache');
  const fusion = Object.keys(fusedCases[0].fused!)[0] as Parameters<typeof fuseCachedCases>[2];
  const ids = fusedCases.map((c) => c.id);
  const result = await fuseCachedCases(cache, ids, fusion);
  t.same(result.fused, []);
  t.same(result.reused, ids);
  // A case that must be fused still takes the lock, and says the cache is read-only.
  const unfused = index.cases.find((c) => !c.fused?.[fusion]);
  if (unfused) await t.rejects(fuseCachedCases(cache, [unfused.id], fusion), { message: /read-only file system/ });
});

t.test('F: an --out name longer than the file system allows is said as such', async (t) => {
  const dir = tempDir(t);
  const long = `${'x'.repeat(300)}.json`;
  const r = await runCli(['eval', '--checkpoint', 'none.safetensors', '--out', long], dir);
  t.equal(r.exitCode, 1);
  // Was a raw "ENAMETOOLONG: name too long, stat 'xxx...'".
  t.notMatch(r.stderr, /ENAMETOOLONG/);
  t.match(r.stderr, /--out x+\.json: the name is too long for the file system/);
});
