// File-system failures met by real users: a full disk (the run folder's quota), a read-only
// file system (a data set or run shared read-only), an output folder that is a file. Every
// command must stop with exit code 1 and one line naming the file and the cause, leave what
// it wrote before intact (no half-written file, no stray temp file), and go on correctly once
// space is freed. The disks are small tmpfs mounts: where mounting is not permitted (not
// root, a container without CAP_SYS_ADMIN) those tests skip, saying so.

import t from 'tap';
import * as fs from 'fs';
import * as path from 'path';
import { writeBratsPhantoms } from '../src/data/brats-phantom';
import { appendFileWholeSync, makeFolder, makeFolderSync, writeFileAtomic } from '../src/data/files';
import { type Matrix4, writeNifti } from '../src/data/nifti';
import { writePng } from '../src/data/png';
import { createModel } from '../src/model/model';
import { readCheckpoint, saveCheckpoint } from '../src/model/checkpoint';
import { runCli } from './helpers/cli';
import { tempDir } from './helpers/files';
import { fill, mountUnavailable, readOnly, smallDisk } from './helpers/disks';

const noMount = mountUnavailable();

/** Every file under `dir` whose name marks it as a temp file (writeFileAtomic's `.<name>.<pid>.<hex>.tmp`). */
function tempFiles(dir: string): string[] {
  const found: string[] = [];
  for (const entry of fs.readdirSync(dir, { withFileTypes: true, recursive: true })) {
    if (entry.isFile() && /\.tmp$/.test(entry.name)) found.push(path.join(entry.parentPath ?? entry.path, entry.name));
  }
  return found;
}

const IDENTITY: Matrix4 = [
  [1, 0, 0, 0],
  [0, 1, 0, 0],
  [0, 0, 1, 0],
  [0, 0, 0, 1],
];

const tiny = ['--preset', 'images', '--depth', '2', '--base-channels', '2', '-q'];

t.test('a full disk: train and prepare name the lock file and the cause, and leave no temp file', { skip: noMount }, async (t) => {
  const work = tempDir(t);
  t.equal((await runCli(['simulate', '--out', 'sim', '--count', '6'], work)).exitCode, 0);
  await writeBratsPhantoms(path.join(work, 'ph'), { cases: 1, size: [16, 16, 16], seed: 1 });
  const disk = smallDisk(t, 256);
  fs.mkdirSync(path.join(disk, 'run'));
  fill(disk);

  const train = await runCli(['train', ...tiny, '--data', 'sim', '--steps', '2', '--out', path.join(disk, 'run')], work);
  t.equal(train.exitCode, 1);
  // Was: "no space left on the device while writing a path", with an empty `..train.lock.<pid>.<hex>.tmp` left behind.
  t.match(train.stderr, /could not write \S*run\/\.train\.lock: no space left on the device/);
  t.notMatch(train.stderr, /a path|\.tmp/);
  t.same(tempFiles(disk), []);

  const prepare = await runCli(['prepare', '--data', 'ph', '--out', path.join(disk, 'cache'), '-q'], work);
  t.equal(prepare.exitCode, 1);
  t.match(prepare.stderr, /could not write \S*cache\/\.prepare\.lock: no space left on the device/);
  t.same(tempFiles(disk), []);
});

t.test('a read-only file system: every command names the folder or file and says it is read-only', { skip: noMount }, async (t) => {
  const work = tempDir(t);
  t.equal((await runCli(['simulate', '--out', 'sim', '--count', '6'], work)).exitCode, 0);
  await writeBratsPhantoms(path.join(work, 'ph'), { cases: 3, size: [16, 16, 16], seed: 1 });
  const disk = smallDisk(t, 1024);
  t.equal((await runCli(['train', ...tiny, '--data', path.join(work, 'sim'), '--steps', '1', '--no-test', '--out', 'run'], disk)).exitCode, 0);
  t.equal((await runCli(['prepare', '--data', path.join(work, 'ph'), '--out', 'cache', '-q'], disk)).exitCode, 0);
  const before = fs.readFileSync(path.join(disk, 'run', 'last.safetensors'));
  readOnly(disk);
  const checkpoint = path.join(disk, 'run', 'last.safetensors');

  const cases: [string, string[], RegExp][] = [
    // Was: "'RUN/..train.lock.<pid>.<hex>.tmp' is on a read-only file system", a file the user never named.
    ['train --resume', ['train', '--resume', '-q', '--out', path.join(disk, 'run')], /\.train\.lock\b.*read-only file system/],
    ['prepare (up to date)', ['prepare', '--data', 'ph', '--out', path.join(disk, 'cache'), '-q'], /\.prepare\.lock\b.*read-only file system/],
    // Node's recursive mkdir reports EROFS as ENOENT: these said "no such file or directory, mkdir DIR".
    // A STAPLE baseline fuses its training labels into the cache: the message says so.
    [
      'train naive-staple on the cache',
      ['train', '--preset', 'brats3d', '--data', path.join(disk, 'cache'), '--method', 'naive-staple', '--steps', '1', '--patch', '8', '--depth', '2', '--base-channels', '2', '--no-test', '-q', '--out', 'staple-run'],
      /cannot write the cache \S+cache \(its lock file \S+\.prepare\.lock\): it is on a read-only file system; .*STAPLE/,
    ],
    ['prepare (new cache)', ['prepare', '--data', 'ph', '--out', path.join(disk, 'cache2'), '-q'], /cache2'? .*read-only file system/],
    ['predict', ['predict', '--checkpoint', checkpoint, '--out', path.join(disk, 'pred')], /pred'? .*read-only file system/],
    ['simulate', ['simulate', '--out', path.join(disk, 'sim'), '--count', '2'], /sim'? .*read-only file system/],
    ['phantom', ['phantom', 'brats', '--cases', '1', '--size', '8,8,8', '-q', '--out', path.join(disk, 'ph')], /ph'? .*read-only file system/],
    ['curves', ['curves', path.join(disk, 'run'), '--out', path.join(disk, 'new', 'c.png')], /new'? .*read-only file system/],
    // The default picture goes into the run folder: say how to draw it elsewhere.
    ['curves (default --out)', ['curves', path.join(disk, 'run')], /could not write \S+run\/curves\.png: the run folder is on a read-only file system; draw the picture elsewhere with --out/],
  ];
  for (const [name, args, expected] of cases) {
    const r = await runCli(args, work);
    t.equal(r.exitCode, 1, `${name}: exit code`);
    t.match(r.stderr, expected, `${name}: names the file or folder and the cause`);
    t.notMatch(r.stderr, /no such file or directory|\.tmp\b/, `${name}: no misleading cause, no temp file named`);
  }
  t.ok(fs.readFileSync(checkpoint).equals(before), 'the checkpoint is untouched');
});

t.test('disk full mid-training: last stays whole, and --resume after freeing space ends as an uninterrupted run would', { skip: noMount }, async (t) => {
  const work = tempDir(t);
  t.equal((await runCli(['simulate', '--out', 'sim', '--count', '8'], work)).exitCode, 0);
  const args = ['train', ...tiny, '--data', path.join(work, 'sim'), '--steps', '10', '--checkpoint-every', '1', '--no-test'];
  t.equal((await runCli([...args, '--out', 'reference'], work)).exitCode, 0);
  const reference = fs.readFileSync(path.join(work, 'reference', 'last.safetensors'));
  const referenceLosses = fs
    .readFileSync(path.join(work, 'reference', 'train-log.jsonl'), 'utf8')
    .trim()
    .split('\n')
    .map((l) => JSON.parse(l) as { event: string; step: number; loss: number })
    .filter((e) => e.event === 'step')
    .map((e) => [e.step, e.loss]);
  // The space one checkpoint step needs depends on the model's size: try growing amounts of
  // free space until the disk runs out after `last` was first written but before the end.
  let stopped: { run: string; filler: string; stderr: string; step: number } | undefined;
  for (let leaveKb = 24; leaveKb <= 96 && !stopped; leaveKb += 4) {
    const disk = smallDisk(t, 512);
    const filler = fill(disk, leaveKb);
    const run = path.join(disk, 'run');
    const r = await runCli([...args, '--out', run], work);
    if (r.exitCode === 0 || !fs.existsSync(path.join(run, 'last.safetensors'))) continue;
    stopped = { run, filler, stderr: r.stderr, step: (await readCheckpoint(path.join(run, 'last.safetensors'))).step };
  }
  if (!stopped) return t.fail('no amount of free space stopped the run mid-way');
  t.match(stopped.stderr, /could not write \S+: no space left on the device|no space left on the device while writing \S*run\/train-log\.jsonl/);
  t.ok(stopped.step >= 1 && stopped.step < 10, `stopped at step ${stopped.step}`);
  t.same(tempFiles(stopped.run), [], 'no temp file left');
  fs.rmSync(stopped.filler);
  const resumed = await runCli(['train', '--resume', '-q', '--out', stopped.run], work);
  t.equal(resumed.exitCode, 0, resumed.stderr);
  t.ok(fs.readFileSync(path.join(stopped.run, 'last.safetensors')).equals(reference), 'the resumed run ends with the uninterrupted run\'s last.safetensors');
  const losses = fs
    .readFileSync(path.join(stopped.run, 'train-log.jsonl'), 'utf8')
    .trim()
    .split('\n')
    .map((l) => JSON.parse(l) as { event: string; step: number; loss: number })
    .filter((e) => e.event === 'step')
    .map((e) => [e.step, e.loss]);
  t.same(losses, referenceLosses, 'the log holds every step once, with the uninterrupted losses');
});

t.test('disk full while preparing: the index names only whole case files, and prepare goes on after space is freed', { skip: noMount }, async (t) => {
  const work = tempDir(t);
  const data = path.join(work, 'ph');
  await writeBratsPhantoms(data, { cases: 4, size: [24, 24, 24], seed: 2 });
  t.equal((await runCli(['prepare', '--data', data, '--out', 'reference', '-q'], work)).exitCode, 0);
  const caseBytes = fs.statSync(path.join(work, 'reference', 'cases', fs.readdirSync(path.join(work, 'reference', 'cases'))[0])).size;
  const disk = smallDisk(t, 1024);
  // Room for two case files and a bit: the third does not fit.
  const filler = fill(disk, Math.ceil((2.5 * caseBytes) / 1024) + 12);
  const cache = path.join(disk, 'cache');
  const r = await runCli(['prepare', '--data', data, '--out', cache, '-q'], work);
  t.equal(r.exitCode, 1);
  t.match(r.stderr, /could not write \S+: no space left on the device/);
  t.same(tempFiles(disk), []);
  const index = JSON.parse(fs.readFileSync(path.join(cache, 'index.json'), 'utf8')) as { cases: { id: string; file: string }[] };
  t.ok(index.cases.length >= 1 && index.cases.length < 4, `${index.cases.length} cases indexed`);
  for (const c of index.cases) {
    t.ok(fs.readFileSync(path.join(cache, c.file)).equals(fs.readFileSync(path.join(work, 'reference', c.file))), `${c.id} is whole`);
  }
  fs.rmSync(filler);
  t.equal((await runCli(['prepare', '--data', data, '--out', cache, '-q'], work)).exitCode, 0);
  for (const name of fs.readdirSync(path.join(work, 'reference', 'cases'))) {
    t.ok(fs.readFileSync(path.join(cache, 'cases', name)).equals(fs.readFileSync(path.join(work, 'reference', 'cases', name))), `${name} after freeing space`);
  }
});

t.test('writeNifti, writePng and saveCheckpoint on a full disk keep the previous file', { skip: noMount }, async (t) => {
  const disk = smallDisk(t, 256);
  const nii = path.join(disk, 'seg.nii.gz');
  const png = path.join(disk, 'mask.png');
  const ckpt = path.join(disk, 'model.safetensors');
  const model = createModel({ classes: 2, annotators: 1, depth: 2, baseChannels: 2 });
  t.teardown(() => model.dispose());
  await writeNifti(nii, { dims: [4, 4, 4], data: new Uint8Array(64).fill(1), affine: IDENTITY }, { datatype: 'uint8' });
  await writePng(png, { width: 4, height: 4, channels: 1, data: new Uint8Array(16).fill(255) });
  await saveCheckpoint(model, ckpt);
  const old = [nii, png, ckpt].map((f) => fs.readFileSync(f));
  fill(disk);
  // Incompressible data: the new files need more room than the old ones.
  const noise = (n: number) => Uint8Array.from({ length: n }, (_, i) => (i * 2654435761) >>> 24);
  const writes: [string, () => Promise<void>][] = [
    [nii, () => writeNifti(nii, { dims: [64, 64, 32], data: noise(64 * 64 * 32), affine: IDENTITY }, { datatype: 'uint8' })],
    [png, () => writePng(png, { width: 256, height: 256, channels: 1, data: noise(256 * 256) })],
    [ckpt, () => saveCheckpoint(createModel({ classes: 2, annotators: 1, depth: 3, baseChannels: 16 }), ckpt)],
  ];
  for (const [file, write] of writes) {
    await t.rejects(write(), { name: 'AtomicWriteError', path: file, cause: { code: 'ENOSPC' } }, path.basename(file));
  }
  [nii, png, ckpt].forEach((f, i) => t.ok(fs.readFileSync(f).equals(old[i]), `${path.basename(f)} unchanged`));
  t.same(tempFiles(disk), []);
});

t.test('makeFolder says why a folder cannot be made (Node reports a read-only file system as ENOENT)', { skip: noMount }, async (t) => {
  const disk = smallDisk(t, 64);
  readOnly(disk);
  const target = path.join(disk, 'a', 'b');
  t.throws(() => makeFolderSync(target), { code: 'EROFS', path: path.join(disk, 'a'), message: /read-only file system/ });
  await t.rejects(makeFolder(target), { code: 'EROFS', path: path.join(disk, 'a') });
});

t.test('makeFolder: a file in the way, and folders that exist', async (t) => {
  const dir = tempDir(t);
  fs.writeFileSync(path.join(dir, 'file'), 'x');
  t.throws(() => makeFolderSync(path.join(dir, 'file')), { code: 'EEXIST', syscall: 'mkdir' });
  t.throws(() => makeFolderSync(path.join(dir, 'file', 'sub')), { code: 'ENOTDIR' });
  makeFolderSync(path.join(dir, 'x', 'y'));
  makeFolderSync(path.join(dir, 'x', 'y'));
  await makeFolder(path.join(dir, 'x', 'z', 'w'));
  t.ok(fs.statSync(path.join(dir, 'x', 'y')).isDirectory() && fs.statSync(path.join(dir, 'x', 'z', 'w')).isDirectory());
});

t.test('a name too long, or a file in the folder path: writeFileAtomic fails with an AtomicWriteError naming the file', async (t) => {
  const dir = tempDir(t);
  fs.writeFileSync(path.join(dir, 'file'), 'x');
  // Were a bare "ENAMETOOLONG: name too long, stat ..." and "ENOTDIR: not a directory, stat ...":
  // the check for a device under the name threw before the write's own error handling.
  const tooLong = path.join(dir, `${'x'.repeat(256)}.json`);
  await t.rejects(writeFileAtomic(tooLong, Buffer.from('{}')), { name: 'AtomicWriteError', path: tooLong, cause: { code: 'ENAMETOOLONG' } });
  const underFile = path.join(dir, 'file', 'mask.png');
  await t.rejects(writePng(underFile, { width: 1, height: 1, channels: 1, data: new Uint8Array(1) }), { name: 'AtomicWriteError', path: underFile, cause: { code: 'ENOTDIR' } });
  t.same(fs.readdirSync(dir), ['file'], 'nothing else written');
});

t.test('appendFileWholeSync on a full disk: the log keeps its old lines, no half line, and the error names it', { skip: noMount }, async (t) => {
  const disk = smallDisk(t, 64);
  const log = path.join(disk, 'train-log.jsonl');
  appendFileWholeSync(log, '{"step":1}\n');
  fill(disk);
  // Longer than the free bytes of the file's last page: the write runs out part-way.
  const line = JSON.stringify({ step: 2, pad: 'x'.repeat(20000) }) + '\n';
  t.throws(() => appendFileWholeSync(log, line), { code: 'ENOSPC', path: log, message: /train-log\.jsonl/ });
  t.equal(fs.readFileSync(log, 'utf8'), '{"step":1}\n');
});

t.test('an output folder that is a symbolic link to a folder that is gone: the error says so', async (t) => {
  const dir = tempDir(t);
  fs.symlinkSync(path.join(dir, 'purged', 'runs'), path.join(dir, 'runs'));
  // Was "ENOENT: no such file or directory, mkdir 'runs'" (and for prepare: "a part of this path is a file").
  const expected = /cannot make the folder \S+runs: it is a symbolic link to \S+purged\/runs, which does not exist/;
  t.throws(() => makeFolderSync(path.join(dir, 'runs')), { code: 'ENOENT', path: path.join(dir, 'runs'), message: expected });
  await t.rejects(makeFolder(path.join(dir, 'runs', 'cache', 'cases')), { path: path.join(dir, 'runs'), message: expected });
  await writeBratsPhantoms(path.join(dir, 'ph'), { cases: 1, size: [8, 8, 8], seed: 1 });
  for (const args of [
    ['simulate', '--out', 'runs/sim', '--count', '2'],
    ['prepare', '--data', 'ph', '--out', 'runs/cache', '-q'],
    ['phantom', 'brats', '--cases', '1', '--size', '8,8,8', '-q', '--out', 'runs'],
  ]) {
    const r = await runCli(args, dir);
    t.equal(r.exitCode, 1, args[0]);
    t.match(r.stderr, expected, args[0]);
  }
  t.notOk(fs.existsSync(path.join(dir, 'purged')), 'nothing made at the link\'s target');
});

t.test('an output file that is a symbolic link: the file it points to is rewritten, whole, and the link kept', async (t) => {
  const dir = tempDir(t);
  const other = tempDir(t, 'cmseg-other-disk-');
  // results/latest.json -> a dated file; cases/X.bin -> a big disk: as a shell's `>` would, write through the link.
  const real = path.join(other, '2026-11-28.json');
  fs.writeFileSync(real, '{"old":true}\n');
  const link = path.join(dir, 'latest.json');
  fs.symlinkSync(real, link);
  await writeFileAtomic(link, Buffer.from('{"new":true}\n'));
  t.ok(fs.lstatSync(link).isSymbolicLink(), 'the link is still a link (was replaced by a regular file)');
  t.equal(fs.readFileSync(real, 'utf8'), '{"new":true}\n', 'the file it points to holds the new content');
  t.same(fs.readdirSync(dir), ['latest.json']);
  t.same(fs.readdirSync(other), ['2026-11-28.json'], 'no temp file left beside the target');
  // Through the command line too: eval --out, relative link.
  const png = path.join(other, 'curves.png');
  await writePng(png, { width: 1, height: 1, channels: 1, data: new Uint8Array(1) });
  const oldPng = fs.readFileSync(png);
  fs.symlinkSync(path.relative(dir, png), path.join(dir, 'c.png'));
  const log = path.join(dir, 'run', 'train-log.jsonl');
  fs.mkdirSync(path.dirname(log));
  fs.writeFileSync(log, [1, 2].map((step) => JSON.stringify({ event: 'step', step, epoch: 0, loss: 1 / step, ce: [1], trace: [1], lr: 0.001 })).join('\n') + '\n');
  const r = await runCli(['curves', 'run', '--out', 'c.png'], dir);
  t.equal(r.exitCode, 0, r.stderr);
  t.ok(fs.lstatSync(path.join(dir, 'c.png')).isSymbolicLink());
  t.ok(fs.statSync(png).size > oldPng.length && fs.readFileSync(png).subarray(1, 4).equals(Buffer.from('PNG')), 'the linked file is the new picture');
});

t.test('prepare --out naming the data folder through a symbolic link is refused, as the folder itself is', async (t) => {
  const dir = tempDir(t);
  await writeBratsPhantoms(path.join(dir, 'data'), { cases: 1, size: [8, 8, 8], seed: 1 });
  fs.symlinkSync('data', path.join(dir, 'data-link'));
  // Was: the cache written into the data folder, which prepare then refused as "a cmseg cache".
  const r = await runCli(['prepare', '--data', 'data', '--out', 'data-link', '-q'], dir);
  t.equal(r.exitCode, 1);
  t.match(r.stderr, /--out must be another folder than --data/);
  t.same(fs.readdirSync(path.join(dir, 'data')), ['BraTS2021_00000'], 'nothing written into the data folder');
});
