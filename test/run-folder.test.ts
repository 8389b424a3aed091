// One writer per run folder: `cmseg train` and the API's train() hold <run>/.train.lock
// (the holder's pid) for the whole run. A second train or --resume on the folder fails
// at once naming the pid, a lock left by a dead process is taken over, and taking the
// lock clears the temp files that killed writers left (those of live processes stay).
// The lock is gone after a normal exit, Ctrl-C and a second Ctrl-C.
import t, { Test } from 'tap';
import { ChildProcess, spawn, spawnSync } from 'child_process';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { Worker } from 'worker_threads';
import { acquireLockFile, atomicTempWriter, LockHeldError, removeStaleAtomicTemps, writeFileAtomic } from '../src/data/files';
import { Rng } from '../src/data/random';
import { AnnotatedSet, InMemorySource } from '../src/train/data';
import { lockRunFolder, readTrainLog, RUN_LOCK, RunFolderBusyError, train, TRAIN_DEFAULTS, TrainConfig } from '../src/train/trainer';

const bin = path.resolve(__dirname, '..', 'dist/cli/main.js');
const skip = fs.existsSync(bin) ? false : 'no dist/ build (npm run build:ts)';
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cmseg-run-folder-'));
t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));

/** The pid of a process that has ended. */
function deadPid(): number {
  const child = spawnSync(process.execPath, ['-e', '']);
  return child.pid!;
}

/** A process that sleeps until the test ends: its pid is alive. */
function livePid(t: Test): number {
  const child = spawn(process.execPath, ['-e', 'setTimeout(() => {}, 600000)'], { stdio: 'ignore' });
  t.teardown(() => void child.kill('SIGKILL'));
  return child.pid!;
}

/** A temp-file name as writeFileAtomic gives it: `.<target>.<pid>.<12 hex>.tmp`. */
const tempName = (target: string, pid: number) => `.${target}.${pid}.0123456789ab.tmp`;

interface Run {
  child: ChildProcess;
  done: Promise<{ code: number | null; stdout: string; stderr: string }>;
}

function cmseg(args: string[], onStderr?: (all: string, child: ChildProcess) => void): Run {
  const child = spawn(process.execPath, [bin, ...args], { cwd: dir, env: { ...process.env, CMSEG_NUM_THREADS: '1' } });
  let stdout = '';
  let stderr = '';
  child.stdout!.on('data', (b) => (stdout += b));
  child.stderr!.on('data', (b) => {
    stderr += b;
    onStderr?.(stderr, child);
  });
  const done = new Promise<{ code: number | null; stdout: string; stderr: string }>((resolve) => child.on('close', (code) => resolve({ code, stdout, stderr })));
  return { child, done };
}

const TINY = ['train', '--preset', 'mnist-tiny', '--no-test', '--checkpoint-every', '1'];

async function until(what: string, ok: () => boolean, ms = 60_000): Promise<void> {
  const end = Date.now() + ms;
  while (!ok()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

const readLock = (run: string) => {
  try {
    return fs.readFileSync(path.join(dir, run, RUN_LOCK), 'utf8').trim().split(/\s+/)[0]; // the pid (then the host)
  } catch {
    return undefined;
  }
};

function events(run: string, name: string): Record<string, unknown>[] {
  return readTrainLog(path.join(dir, run, 'train-log.jsonl')).filter((e) => e.event === name);
}

/** Every step 1..n logged exactly once, in order. */
function stepsOnce(t: Test, run: string, n: number): void {
  t.same(events(run, 'step').map((e) => e.step), Array.from({ length: n }, (_, i) => i + 1), `${run}: each step logged once`);
}

const BUSY = (run: string, pid: number | string) =>
  new RegExp(`^cmseg: error: ${run} is in use: another cmseg process \\(pid ${pid}\\) is training in it; wait for it to finish, or delete ${run}/\\.train\\.lock if that process is gone \\(or if this folder is a copy of one it trains in: a copy keeps its lock\\)\\n$`);

t.test('a second train or --resume on a folder in use fails at once; the first run is untouched', { skip }, async (t) => {
  const first = cmseg([...TINY, '--steps', '300', '--seed', '1', '--out', 'busy', '-q']);
  await until('the first run to take the lock', () => readLock('busy') === String(first.child.pid));
  const second = await cmseg([...TINY, '--steps', '300', '--seed', '2', '--out', 'busy', '-q']).done;
  t.equal(second.code, 1);
  t.match(second.stderr, BUSY('busy', first.child.pid!), 'one line naming the folder and the pid');
  const resume = await cmseg(['train', '--out', 'busy', '--resume', '-q']).done;
  t.equal(resume.code, 1);
  t.match(resume.stderr, BUSY('busy', first.child.pid!));
  const a = await first.done;
  t.equal(a.code, 0, a.stderr);
  t.match(a.stdout, /trained cm from step 0 to 300/);
  t.equal(events('busy', 'start').length, 1, 'one start event');
  t.equal((events('busy', 'start')[0].config as TrainConfig).seed, 1, 'the first run\'s');
  stepsOnce(t, 'busy', 300);
  t.notOk(fs.existsSync(path.join(dir, 'busy', RUN_LOCK)), 'the lock is gone after a normal exit');
});

t.test('runs started together on one folder (over a stale lock): exactly one trains', { skip }, async (t) => {
  fs.mkdirSync(path.join(dir, 'race'));
  fs.writeFileSync(path.join(dir, 'race', RUN_LOCK), `${deadPid()}\n`);
  const runs = [1, 2, 3].map((seed) => cmseg([...TINY, '--steps', '40', '--seed', String(seed), '--out', 'race', '-q']));
  const results = await Promise.all(runs.map((r) => r.done));
  const winners = results.filter((r) => r.code === 0);
  t.equal(winners.length, 1, results.map((r) => r.stderr).join(''));
  const winner = runs[results.findIndex((r) => r.code === 0)].child.pid!;
  for (const r of results.filter((r) => r.code !== 0)) {
    t.equal(r.code, 1);
    t.match(r.stderr, BUSY('race', winner));
  }
  t.equal(events('race', 'start').length, 1, 'one start event');
  stepsOnce(t, 'race', 40);
  t.notOk(fs.existsSync(path.join(dir, 'race', RUN_LOCK)));
});

t.test('Ctrl-C releases the lock; a resume takes over a stale lock, clears dead writers\' temp files, and a second resume is refused', { skip }, async (t) => {
  let sent = false;
  const stopped = await cmseg([...TINY, '--steps', '200', '--out', 'resumed'], (stderr, child) => {
    if (!sent && /epoch 1\//.test(stderr)) (sent = true), child.kill('SIGINT');
  }).done;
  t.ok(sent, 'training started');
  t.equal(stopped.code, 130, stopped.stderr);
  const at = Number(/interrupted at step (\d+)\/200/.exec(stopped.stdout)?.[1]);
  t.ok(at > 0 && at < 200, stopped.stdout);
  t.notOk(fs.existsSync(path.join(dir, 'resumed', RUN_LOCK)), 'the lock is gone after Ctrl-C');

  // As a SIGKILLed run leaves the folder: its lock, and temp files of interrupted writes.
  const run = path.join(dir, 'resumed');
  const dead = deadPid();
  const live = livePid(t);
  fs.writeFileSync(path.join(run, RUN_LOCK), `${dead}\n`);
  const stale = [tempName('last.safetensors', dead), tempName('train-log.jsonl', dead), tempName('best.safetensors', dead)];
  const kept = [tempName('last.safetensors', live), '.notes.tmp', 'last.safetensors.bak'];
  for (const name of [...stale, ...kept]) fs.writeFileSync(path.join(run, name), 'partial');

  const resumes = [cmseg(['train', '--out', 'resumed', '--resume', '-q']), cmseg(['train', '--out', 'resumed', '--resume', '-q'])];
  const results = await Promise.all(resumes.map((r) => r.done));
  t.same(results.map((r) => r.code).sort(), [0, 1], results.map((r) => r.stderr).join(''));
  const winner = resumes[results.findIndex((r) => r.code === 0)].child.pid!;
  t.match(results.find((r) => r.code === 1)!.stderr, BUSY('resumed', winner));
  t.match(results.find((r) => r.code === 0)!.stdout, new RegExp(`trained cm from step ${at} to 200`));
  t.equal(events('resumed', 'resume').length, 1, 'one resume event');
  stepsOnce(t, 'resumed', 200);
  const left = fs.readdirSync(run);
  for (const name of stale) t.notOk(left.includes(name), `${name}: a dead writer's temp file, removed`);
  for (const name of kept) t.ok(left.includes(name), `${name}: kept`);
  t.notOk(left.includes(RUN_LOCK), 'released');
});

t.test('a second Ctrl-C (quit without saving) releases the lock too', { skip }, async (t) => {
  // A model big enough that the step in progress outlasts the second signal.
  let sent = 0;
  const r = await cmseg([...TINY, '--steps', '100000', '--depth', '3', '--base-channels', '32', '--out', 'quit'], (stderr, child) => {
    if (sent === 0 && /epoch 1\//.test(stderr)) (sent = 1), child.kill('SIGINT');
    else if (sent === 1 && /interrupt: finishing/.test(stderr)) (sent = 2), child.kill('SIGINT');
  }).done;
  t.equal(sent, 2);
  t.equal(r.code, 130, r.stderr);
  t.match(r.stderr, /second SIGINT: quitting without saving/);
  t.notOk(fs.existsSync(path.join(dir, 'quit', RUN_LOCK)));
});

t.test('a run that fails before writing leaves no folder behind', { skip }, async (t) => {
  const r = await cmseg([...TINY, '--steps', '5', '--out', 'never', '--bf16']).done;
  t.equal(r.code, 1);
  t.match(r.stderr, /--bf16 is for training on the GPU/);
  t.notOk(fs.existsSync(path.join(dir, 'never')));
  // Nor the parents it made for a nested --out; a parent that was there stays.
  fs.mkdirSync(path.join(dir, 'kept'));
  const nested = await cmseg([...TINY, '--steps', '5', '--out', 'kept/made/run', '--bf16']).done;
  t.equal(nested.code, 1);
  t.notOk(fs.existsSync(path.join(dir, 'kept', 'made')), 'the folders it made are gone');
  t.ok(fs.existsSync(path.join(dir, 'kept')), 'the one that existed stays');
});

// ---- the API ----------------------------------------------------------------------------

function tinySet(count = 8, size = 8): AnnotatedSet {
  const rng = new Rng(1);
  const V = size * size;
  const images = Float32Array.from({ length: count * V }, () => rng.normal());
  const consensus = Uint8Array.from(images, (x) => (x > 0 ? 1 : 0));
  const labels = [consensus.slice(), consensus.slice()];
  return { count, channels: 1, classes: 2, spatial: [size, size], images, labels, present: new Uint8Array(count * 2).fill(1), consensus, annotatorNames: ['a', 'b'] };
}

const config = (steps: number): TrainConfig => ({ ...TRAIN_DEFAULTS, method: 'cm', depth: 2, baseChannels: 4, batchSize: 4, steps, seed: 1 });

t.test('train(): a second train() on a folder in use is refused, in this process or from another', async (t) => {
  const out = path.join(dir, 'api');
  const set = tinySet();
  const first = train(out, config(20), new InMemorySource(set, 1));
  await t.rejects(train(out, config(20), new InMemorySource(set, 1)), { name: 'RunFolderBusyError', holder: process.pid, message: /is in use: this process is already training in it/ });
  const done = await first;
  t.equal(done.status, 'completed');
  await done.model.dispose();
  t.notOk(fs.existsSync(path.join(out, RUN_LOCK)), 'released when train() returns');

  // Another live process's lock.
  const live = livePid(t);
  fs.writeFileSync(path.join(out, RUN_LOCK), String(live));
  const busy = await train(out, config(20), new InMemorySource(set, 1), { resume: true }).catch((e: unknown) => e);
  t.ok(busy instanceof RunFolderBusyError);
  t.equal((busy as RunFolderBusyError).holder, live);
  t.match((busy as Error).message, new RegExp(`another cmseg process \\(pid ${live}\\)`));
  t.equal(fs.readFileSync(path.join(out, RUN_LOCK), 'utf8'), String(live), 'a live holder\'s lock is left alone');

  // A dead one's is taken over; a caller's own lock is used as given.
  fs.writeFileSync(path.join(out, RUN_LOCK), String(deadPid()));
  const lock = lockRunFolder(out);
  t.equal(fs.readFileSync(path.join(out, RUN_LOCK), 'utf8'), `${process.pid} ${os.hostname()}\n`);
  const resumed = await train(out, config(24), new InMemorySource(set, 1), { lock }).catch((e: unknown) => e);
  t.match(resumed, { message: /already holds a run/ }, 'checked under the lock');
  t.ok(lock.held, 'the caller\'s lock stays held after train()');
  lock.release();
  t.notOk(fs.existsSync(path.join(out, RUN_LOCK)));
  await t.rejects(train(out, config(20), new InMemorySource(set, 1), { resume: true, lock }), /hooks.lock must be the held lock/);
});

// ---- the helpers in src/data/files.ts ---------------------------------------------------

t.test('lock files: worker threads of one process (one pid) do not take each other\'s locks', { skip }, async (t) => {
  const folder = fs.mkdtempSync(path.join(dir, 'thread-locks-'));
  const file = path.join(folder, '.x.lock');
  // A worker that takes the lock through the compiled module (its own module instance and
  // heldLocks, the same addon), reports, and on 'release' gives it back.
  const code = `
    const { parentPort, workerData } = require('worker_threads');
    const { acquireLockFile } = require(workerData.files);
    let lock;
    try { lock = acquireLockFile(workerData.file); parentPort.postMessage({ took: true }); }
    catch (e) { parentPort.postMessage({ took: false, name: e.name, sameProcess: e.sameProcess }); }
    parentPort.on('message', () => { if (lock) lock.release(); parentPort.postMessage({ released: true }); parentPort.close(); });`;
  const files = path.resolve(__dirname, '..', 'dist', 'data', 'files.js');
  const startWorker = () => {
    const worker = new Worker(code, { eval: true, workerData: { files, file } });
    const replies: Promise<Record<string, unknown>>[] = [];
    const waiting: ((m: Record<string, unknown>) => void)[] = [];
    for (let k = 0; k < 2; k++) replies.push(new Promise((resolve) => waiting.push(resolve)));
    let next = 0;
    worker.on('message', (m) => waiting[next++]?.(m));
    return { first: replies[0], release: () => (worker.postMessage('release'), replies[1]), done: new Promise((resolve) => worker.once('exit', resolve)) };
  };

  const ours = acquireLockFile(file);
  const refused = startWorker();
  t.same(await refused.first, { took: false, name: 'LockHeldError', sameProcess: true }, 'the main thread holds it: a worker is refused');
  await refused.release();
  await refused.done;
  t.equal(fs.readFileSync(file, 'utf8'), `${process.pid} ${os.hostname()}\n`, 'our lock file untouched');
  ours.release();

  const holder = startWorker();
  t.same(await holder.first, { took: true }, 'free: the worker takes it');
  t.throws(() => acquireLockFile(file), { name: 'LockHeldError', sameProcess: true }, 'a worker holds it: the main thread is refused');
  await holder.release();
  await holder.done;
  t.notOk(fs.existsSync(file), 'the worker released it');
  acquireLockFile(file).release();
  t.pass('and the main thread can take it then');
});

t.test('lock files: exclusive, stale ones taken over, released once, only our own removed', async (t) => {
  const folder = fs.mkdtempSync(path.join(dir, 'locks-'));
  const file = path.join(folder, '.x.lock');
  const lock = acquireLockFile(file);
  t.equal(fs.readFileSync(file, 'utf8'), `${process.pid} ${os.hostname()}\n`, 'pid and host');
  t.throws(() => acquireLockFile(file), LockHeldError, 'a second holder in this process is refused');
  lock.release();
  lock.release();
  t.notOk(fs.existsSync(file));

  // Garbage or a dead pid: stale. A live pid: held.
  fs.writeFileSync(file, 'garbage');
  fs.utimesSync(file, new Date(Date.now() - 10_000), new Date(Date.now() - 10_000));
  acquireLockFile(file).release();
  const live = livePid(t);
  fs.writeFileSync(file, `${live}\n`);
  t.throws(() => acquireLockFile(file), { name: 'LockHeldError', holder: live, sameProcess: false });

  // A lock taken over from under us (someone deleted ours) is not removed by our release.
  fs.rmSync(file);
  const ours = acquireLockFile(file);
  fs.rmSync(file);
  fs.writeFileSync(file, `${live}\n`);
  ours.release();
  t.equal(fs.readFileSync(file, 'utf8'), `${live}\n`, 'another holder\'s lock stays');
  t.same(fs.readdirSync(folder), ['.x.lock'], 'no temp files left by locking');

  // An empty lock dated in the future (a clock set back) is stale, not "being written".
  fs.writeFileSync(file, '');
  const ahead = new Date(Date.now() + 3_600_000);
  fs.utimesSync(file, ahead, ahead);
  const started = Date.now();
  acquireLockFile(file).release();
  t.ok(Date.now() - started < 2000, 'taken over at once');

  // Another host's lock (a folder on a network file system): its pid cannot be checked here,
  // so it is held, even with a pid that is dead on this machine.
  fs.writeFileSync(file, `${deadPid()} some-other-host\n`);
  t.throws(() => acquireLockFile(file), { name: 'LockHeldError', host: 'some-other-host', message: /on some-other-host/ });
  // A takeover guard left by a process killed while taking a lock over is cleared after 10 s.
  fs.writeFileSync(file, `${deadPid()}\n`);
  fs.writeFileSync(`${file}.takeover`, '');
  const old = new Date(Date.now() - 20_000);
  fs.utimesSync(`${file}.takeover`, old, old);
  const taken = acquireLockFile(file);
  t.ok(taken.held, 'the stale lock taken over past an old guard');
  t.notOk(fs.existsSync(`${file}.takeover`), 'the guard is gone');
  taken.release();
});

t.test('stale temp files: only writeFileAtomic\'s, only of dead writers', async (t) => {
  const folder = fs.mkdtempSync(path.join(dir, 'temps-'));
  const target = path.join(folder, 'a.bin');
  await writeFileAtomic(target, Buffer.from('x'));
  t.same(fs.readdirSync(folder), ['a.bin']);
  const dead = deadPid();
  const live = livePid(t);
  t.equal(atomicTempWriter(tempName('a.bin', dead)), dead);
  t.equal(atomicTempWriter('.a.bin.tmp'), undefined);
  t.equal(atomicTempWriter('a.bin.123.0123456789ab.tmp'), undefined, 'no leading dot: not ours');
  const names = [tempName('a.bin', dead), tempName('a.bin', live), tempName('a.bin', process.pid), '.a.bin.tmp', 'keep.txt'];
  for (const name of names) fs.writeFileSync(path.join(folder, name), '');
  fs.mkdirSync(path.join(folder, tempName('sub', dead)));
  t.same(removeStaleAtomicTemps(folder), [tempName('a.bin', dead)]);
  t.same(fs.readdirSync(folder).sort(), ['a.bin', ...names.slice(1), tempName('sub', dead)].sort());
  t.same(removeStaleAtomicTemps(path.join(folder, 'missing')), []);
});
