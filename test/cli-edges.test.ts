// The command line as a scripting user meets it: errors are one line that names the file the
// user gave (never a temp file, never a JavaScript TypeError), with exit code 1.
import t, { type Test } from 'tap';
import { spawnSync } from 'child_process';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { cliHelp, runCli } from './helpers/cli';
import { createModel } from '../src/model/model';
import { saveCheckpoint } from '../src/model/checkpoint';
import { TRAINER_STATE_FORMAT, TRAINER_STATE_VERSION } from '../src/train/trainer';
import { atomicTempWriter, isAtomicTempFor, tempNameFor, writeFileAtomic, writeFileAtomicSync } from '../src/data/files';

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cmseg-cli-edges-'));
t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));

const mnistRun = { preset: 'mnist-tiny', dataset: { kind: 'mnist', train: 64, validation: 32, test: 32, labels: 'dense', dataSeed: 0 } };

/** A checkpoint in the trainer's format (what cmseg train writes), with the given state and run record. */
async function trainerCheckpoint(name: string, over: { method?: unknown; step?: unknown; run?: unknown }): Promise<string> {
  const model = createModel({ ndim: 2, inChannels: 1, classes: 2, annotators: 2, depth: 2, baseChannels: 2 });
  const file = path.join(dir, `${name}.safetensors`);
  await saveCheckpoint(model, file, {
    format: TRAINER_STATE_FORMAT,
    version: TRAINER_STATE_VERSION,
    config: { method: 'method' in over ? over.method : 'cm' },
    state: { step: 'step' in over ? over.step : 5 },
    annotatorNames: ['a', 'b'],
    ...('run' in over ? { run: over.run } : {}),
  });
  return file;
}

function oneErrorLine(t: Test, stderr: string): string {
  const lines = stderr.trimEnd().split('\n');
  t.equal(lines.length, 1, `one line: ${stderr}`);
  t.match(lines[0], /^cmseg: error: /);
  t.notMatch(stderr, /Cannot read properties|TypeError|    at /, 'no JavaScript error text or stack');
  return lines[0];
}

t.test('info --checkpoint: the intact trainer checkpoint is described (the control)', async (t) => {
  const file = await trainerCheckpoint('good', { run: mnistRun });
  const r = await runCli(['info', '--checkpoint', file, '--json'], dir);
  t.equal(r.exitCode, 0, r.stderr);
  const info = JSON.parse(r.stdout);
  t.equal(info.step, 5);
  t.equal(info.method, 'cm');
  t.same(info.recipe, mnistRun);
});

t.test('info --checkpoint: a damaged run record names the checkpoint instead of a TypeError', async (t) => {
  // A BraTS record without its case splits (older or damaged): was "Cannot read properties of undefined (reading 'train')".
  const file = await trainerCheckpoint('no-splits', { run: { preset: 'brats3d', dataset: { kind: 'brats', cache: '/x', patch: 64, dataSeed: 0 } } });
  for (const json of [[], ['--json']]) {
    const r = await runCli(['info', '--checkpoint', file, ...json], dir);
    t.equal(r.exitCode, 1);
    t.equal(r.stdout, '');
    const line = oneErrorLine(t, r.stderr);
    t.match(line, file);
    t.match(line, /splits\.train/);
  }
  // eval reads the same record: the same one-line error, before any data is looked for.
  const e = await runCli(['eval', '--checkpoint', file], dir);
  t.equal(e.exitCode, 1);
  t.match(oneErrorLine(t, e.stderr), file);

  // A record without its preset printed "preset  undefined".
  const noPreset = await trainerCheckpoint('no-preset', { run: { dataset: mnistRun.dataset } });
  const r = await runCli(['info', '--checkpoint', noPreset], dir);
  t.equal(r.exitCode, 1);
  t.notMatch(r.stdout, /undefined/);
  t.match(oneErrorLine(t, r.stderr), noPreset);
});

t.test("info --checkpoint: the API train()'s free-form run record is not read as cmseg's", async (t) => {
  // TrainHooks.run is the API user's: a data set of a kind cmseg does not write printed "data  undefined".
  const file = await trainerCheckpoint('api-run', { run: { dataset: { kind: 'lidc', fold: 3 } } });
  const r = await runCli(['info', '--checkpoint', file], dir);
  t.equal(r.exitCode, 0, r.stderr);
  t.notMatch(r.stdout, /undefined/);
  t.match(r.stdout, /written by\s+the API's train\(\)/);
  t.match(r.stdout, /data\s+not recorded: eval and predict need --data/);
});

t.test('info --checkpoint: an unknown method or a negative step in the trainer state names the checkpoint', async (t) => {
  // Was 'unknown method "foo"; choose one of ...', which reads like a mistake on the command line.
  const foo = await trainerCheckpoint('method-foo', { method: 'foo', run: mnistRun });
  const r = await runCli(['info', '--checkpoint', foo], dir);
  t.equal(r.exitCode, 1);
  const line = oneErrorLine(t, r.stderr);
  t.match(line, foo);
  t.match(line, /"foo"/);
  // A step of -3 was printed as "step  -3".
  const neg = await trainerCheckpoint('step-negative', { step: -3, run: mnistRun });
  const n = await runCli(['info', '--checkpoint', neg, '--json'], dir);
  t.equal(n.exitCode, 1);
  t.equal(n.stdout, '');
  t.match(oneErrorLine(t, n.stderr), neg);
});

t.test('a long output name is written through its temp file; one too long is named, not its temp file', async (t) => {
  // A run folder with a hand-written log of three steps, so that curves has something to draw.
  const run = path.join(dir, 'run with space ü');
  fs.mkdirSync(run);
  const steps = [1, 2, 3].map((step) => JSON.stringify({ event: 'step', step, epoch: 0, loss: 1 / step, ce: 1 / step, trace: 2, lr: 0.001 }));
  fs.writeFileSync(path.join(run, 'train-log.jsonl'), steps.join('\n') + '\n');
  const ok = await runCli(['curves', run], dir);
  t.equal(ok.exitCode, 0, ok.stderr);
  t.ok(fs.statSync(path.join(run, 'curves.png')).size > 0, 'the control run draws its picture');
  // A name of 240 bytes is allowed (255 at most): the temp file written first, longer by its
  // suffix, must still fit (it failed as "name is too long" for names of 230-255 bytes).
  const long = path.join(dir, 'c'.repeat(236) + '.png');
  const written = await runCli(['curves', run, '--out', long], dir);
  t.equal(written.exitCode, 0, written.stderr);
  t.same(fs.readFileSync(long), fs.readFileSync(path.join(run, 'curves.png')), 'the same picture under the long name');
  // 255 bytes of multi-byte letters: the temp name is cut on a letter boundary, not mid-letter.
  const accented = path.join(dir, 'é'.repeat(125) + '.png');
  t.equal(Buffer.byteLength(path.basename(accented)), 254);
  const again = await runCli(['curves', run, '--out', accented], dir);
  t.equal(again.exitCode, 0, again.stderr);
  t.ok(fs.statSync(accented).size > 0, 'a 254-byte name of two-byte letters is written');
  t.same(fs.readdirSync(dir).filter((name) => name.endsWith('.tmp')), [], 'no temp file left');
  // One byte more than a name can hold fails as the file system says, naming the file asked for.
  const target = path.join(dir, 'c'.repeat(252) + '.png');
  const r = await runCli(['curves', run, '--out', target], dir);
  t.equal(r.exitCode, 1);
  const line = oneErrorLine(t, r.stderr);
  t.ok(line.startsWith(`cmseg: error: --out ${target}: `), line);
  t.notMatch(line, /\.tmp/, 'the temp file is not named');
  t.notMatch(line, /ENAMETOOLONG|open '/, 'no raw errno text');
  t.match(line, /name is too long/);
});

t.test('the temp file of a write to a long name fits the 255-byte limit, and is recognised', async (t) => {
  for (const bytes of [200, 229, 230, 240, 255]) {
    const target = path.join(dir, 'x'.repeat(bytes - 4) + '.bin');
    const data = new Uint8Array([bytes & 255, 1, 2, 3]);
    writeFileAtomicSync(target, data);
    t.same(new Uint8Array(fs.readFileSync(target)), data, `sync write of a ${bytes}-byte name`);
    await writeFileAtomic(target, data.reverse());
    t.same(new Uint8Array(fs.readFileSync(target)), data, `async write of a ${bytes}-byte name`);
  }
  // A writer killed mid-write leaves its temp file; cleanup and tests find it by the target's name.
  const target = path.join(dir, 'y'.repeat(251) + '.bin');
  const temp = path.join(dir, tempNameFor(target));
  t.ok(Buffer.byteLength(path.basename(temp)) <= 255, path.basename(temp));
  t.ok(isAtomicTempFor(target, path.basename(temp)), 'its temp file is recognised as its own');
  t.notOk(isAtomicTempFor(path.join(dir, 'y'.repeat(200) + '.bin'), path.basename(temp)), 'not as another name\'s');
  t.equal(atomicTempWriter(path.basename(temp)), process.pid, 'the writer pid is read back from the name');
});

t.test('an output named by a device, pipe or /dev path is refused before it is replaced', async (t) => {
  const run = path.join(dir, 'run-special');
  fs.mkdirSync(run);
  fs.writeFileSync(path.join(run, 'train-log.jsonl'), JSON.stringify({ event: 'step', step: 1, epoch: 0, loss: 1, ce: 1, trace: 2, lr: 0.001 }) + '\n');
  const devName = `/dev/cmseg-test-${process.pid}.png`;
  t.teardown(() => fs.rmSync(devName, { force: true }));
  const fifo = path.join(dir, 'a-fifo');
  t.equal(spawnSync('mkfifo', [fifo]).status, 0, 'mkfifo');
  // The rename of the finished temp file replaced the FIFO with a regular file (and, as root,
  // /dev/null with one for the whole machine).
  for (const [args, named] of [
    [['curves', run, '--out', fifo], fifo],
    // (Not /dev/null itself: were the guard gone, this test would replace it.)
    [['curves', run, `--out=${devName}`], devName],
    [['fuse', '-o', '/dev/stdout', 'a.png', 'b.png'], '/dev/stdout'],
  ] as const) {
    const r = await runCli([...args], dir);
    t.equal(r.exitCode, 1, args.join(' '));
    const line = oneErrorLine(t, r.stderr);
    t.match(line, `${named} is not a regular file`);
  }
  t.ok(fs.statSync(fifo).isFIFO(), 'the FIFO is still a FIFO');
  t.notOk(fs.existsSync(devName), 'nothing written into /dev');
  // /dev/shm is an ordinary (memory-backed) folder for outputs.
  if (fs.existsSync('/dev/shm')) {
    const shm = fs.mkdtempSync('/dev/shm/cmseg-edges-');
    t.teardown(() => fs.rmSync(shm, { recursive: true, force: true }));
    const r = await runCli(['curves', run, '--out', path.join(shm, 'c.png')], dir);
    t.equal(r.exitCode, 0, r.stderr);
    t.ok(fs.statSync(path.join(shm, 'c.png')).isFile());
  }
  t.equal(fs.readdirSync('/dev').filter((n) => n.endsWith('.tmp')).length, 0, 'no temp file left in /dev');
});

t.test("a quoted '~' (not expanded by the shell) is said so, and never shown as the home folder", async (t) => {
  const cwd = path.join(dir, 'tilde');
  fs.mkdirSync(cwd);
  // The error for a path under a literal ~ folder says why it was not found.
  const r = await runCli(['info', '--checkpoint', '~/model.safetensors'], cwd);
  t.equal(r.exitCode, 1);
  const line = oneErrorLine(t, r.stderr);
  t.match(line, path.join(cwd, '~', 'model.safetensors'));
  t.match(line, /does not expand a quoted '~'/);
  // An unrelated error of a command without any ~ gets no such note.
  const plain = await runCli(['info', '--checkpoint', 'model.safetensors'], cwd);
  t.notMatch(plain.stderr, /quoted/);
  // A curves picture written into ./~/run: listed as ./~/..., which `rm -rf` cannot mistake for $HOME.
  const run = path.join(cwd, '~', 'run');
  fs.mkdirSync(run, { recursive: true });
  fs.writeFileSync(path.join(run, 'train-log.jsonl'), JSON.stringify({ event: 'step', step: 1, epoch: 0, loss: 1, ce: 1, trace: 2, lr: 0.001 }) + '\n');
  const c = await runCli(['curves', '~/run'], cwd);
  t.equal(c.exitCode, 0, c.stderr);
  t.ok(fs.existsSync(path.join(run, 'curves.png')), 'drawn into the literal ~ folder');
  t.match(c.stdout, /curves {2}\.\/~\/run\/curves\.png\n/);
  t.notMatch(c.stdout, /(^|\s)~\//, 'no path shown as ~/...');
});

t.test('--threads past the engine\'s 1024 is refused while parsing, as the option', async (t) => {
  // (commander exits the process on a bad option value: cliHelp catches it instead.)
  for (const args of [
    ['info', '--threads', '5000'],
    ['bench', '--threads', '5000', '--config', 'mnist2d'],
    ['train', '--threads', '5000'],
    ['eval', '--threads', '5000', '--checkpoint', 'x.safetensors'],
    ['predict', '--threads', '5000', '--checkpoint', 'x.safetensors', '--out', 'p'],
  ]) {
    const text = await cliHelp(args);
    // Was "setNumThreads expects an integer in 1..1024, got 5e+03" (info), after bench's machine probe.
    t.equal(text, "cmseg: error: option '--threads <n>' argument '5000' is invalid. expected an integer in 1..1024.\n", args.join(' '));
  }
  const one = await runCli(['info', '--threads', '1', '--json'], dir);
  t.equal(one.exitCode, 0, one.stderr);
  t.equal(JSON.parse(one.stdout).threads, 1);
});

t.test('Ctrl-C during a window bar on a terminal shows the cursor again and still ends the process', async (t) => {
  // A child with a terminal-like stderr stand-in that copies to its stdout: the bar starts (cursor
  // hidden), then SIGINT arrives as from Ctrl-C while a prediction is running.
  const script = path.join(dir, 'bar-sigint.ts');
  fs.writeFileSync(
    script,
    `import { PassThrough } from 'stream';
import { windowProgress } from ${JSON.stringify(path.resolve(__dirname, '../src/cli/window-progress'))};
const stream = Object.assign(new PassThrough(), { isTTY: true, columns: 100 });
stream.on('data', (chunk: Buffer) => process.stdout.write(chunk));
const p = windowProgress('[1/1] case', stream as unknown as NodeJS.WriteStream);
p.onProgress(1, 8);
setTimeout(() => process.kill(process.pid, 'SIGINT'), 50);
setTimeout(() => process.stdout.write('STILL RUNNING'), 5000);
`,
  );
  const r = spawnSync(process.execPath, [...process.execArgv, script], { encoding: 'utf8', timeout: 60_000 });
  t.equal(r.signal, 'SIGINT', `ended by the signal (the shell's 130): status ${r.status} ${r.stderr}`);
  t.notMatch(r.stdout, /STILL RUNNING/);
  const hidden = r.stdout.lastIndexOf('\x1B[?25l');
  t.ok(hidden >= 0, 'the bar hid the cursor');
  t.ok(r.stdout.lastIndexOf('\x1B[?25h') > hidden, 'and showed it again before the process ended');
});

t.test('a training bar ended by process.exit (a second Ctrl-C) shows the cursor again', async (t) => {
  const script = path.join(dir, 'train-bar-exit.ts');
  fs.writeFileSync(
    script,
    `import { PassThrough } from 'stream';
import { createFusionProgress, createProgress } from ${JSON.stringify(path.resolve(__dirname, '../src/train/progress'))};
const stream = Object.assign(new PassThrough(), { isTTY: true, columns: 120 });
// Copied synchronously: process.exit() does not wait for stream events.
stream.write = ((chunk: string) => (process.stdout.write(chunk), true)) as typeof stream.write;
const which = process.argv[2];
if (which === 'train') createProgress({ stream: stream as unknown as NodeJS.WriteStream }).start(100, 3, { epoch: 0, epochs: 2, loss: 1, ce: 1, trace: 2, lr: 1e-3, valDice: NaN });
else createFusionProgress({ stream: stream as unknown as NodeJS.WriteStream }).start(4, 'fuse');
process.stdout.write('STARTED');
process.exit(130);
`,
  );
  for (const which of ['train', 'fusion']) {
    const r = spawnSync(process.execPath, [...process.execArgv, script, which], { encoding: 'utf8', timeout: 60_000 });
    t.equal(r.status, 130, `${which}: ${r.stderr}`);
    const hidden = r.stdout.lastIndexOf('\x1B[?25l');
    t.ok(hidden >= 0 && r.stdout.indexOf('STARTED') > hidden, `${which}: the bar hid the cursor`);
    t.ok(r.stdout.lastIndexOf('\x1B[?25h') > r.stdout.indexOf('STARTED'), `${which}: shown again at the exit`);
  }
});

t.test('info --checkpoint "" (an unset shell variable) is an error, not the backends table', async (t) => {
  for (const json of [[], ['--json']]) {
    const r = await runCli(['info', '--checkpoint', '', ...json], dir);
    t.equal(r.exitCode, 1);
    t.equal(r.stdout, '', 'no backends table or JSON');
    t.equal(r.stderr, 'cmseg: error: --checkpoint is empty: name a checkpoint file\n');
  }
});

t.test('writeFileAtomic (the API\'s writers too) refuses a pipe as its target instead of replacing it', async (t) => {
  const fifo = path.join(dir, 'api-fifo');
  const made = spawnSync('mkfifo', [fifo]);
  if (made.status !== 0) return t.skip('mkfifo is not available');
  await t.rejects(writeFileAtomic(fifo, Buffer.from('x')), /could not write .*api-fifo: it is a device, pipe or socket, not a regular file/);
  t.throws(() => writeFileAtomicSync(fifo, Buffer.from('x')), /it is a device, pipe or socket/);
  t.ok(fs.lstatSync(fifo).isFIFO(), 'the pipe is still a pipe');
  t.same(fs.readdirSync(dir).filter((f) => f.includes('api-fifo') && f.endsWith('.tmp')), [], 'no temp file left');
});

t.test('CM-head and trace flags are refused, by name, for methods that have nothing for them to set', async (t) => {
  const out = path.join(dir, 'runs', 'unused-flags');
  const refused = [
    [['--method', 'cm', '--cm-rank', '4'], /^cmseg: error: --cm-rank: for --method cm-lowrank only$/],
    [['--method', 'cm-global', '--cm-head-blocks', '2'], /^cmseg: error: --cm-head-blocks: for --method cm, --method cm-notrace, --method cm-lowrank \(pixel-wise CM heads\) only$/],
    [['--method', 'naive-mean', '--cm-init', 'uniform'], /^cmseg: error: --cm-init: for --method cm, --method cm-notrace, --method cm-global, --method cm-lowrank \(methods that learn CMs\) only$/],
    [['--method', 'cm-notrace', '--lambda', '0.1', '--warmup-steps', '3'], /^cmseg: error: --lambda, --warmup-steps: for --method cm, --method cm-global, --method cm-lowrank \(methods with the trace term\) only$/],
    [['--method', 'oracle', '--lambda-warmup', '0.1'], /^cmseg: error: --lambda-warmup: for .* \(methods with the trace term\) only$/],
  ] as const;
  for (const [flags, message] of refused) {
    const r = await runCli(['train', '--preset', 'mnist-tiny', '--steps', '1', '--out', out, ...flags], dir);
    t.equal(r.exitCode, 1, flags.join(' '));
    t.match(oneErrorLine(t, r.stderr), message);
    t.notOk(fs.existsSync(out), 'no run folder made');
  }
  // Where the method has them, the same flags are taken.
  const ok = await runCli(['train', '--preset', 'mnist-tiny', '--steps', '1', '--out', out, '--method', 'cm-lowrank', '--cm-rank', '2', '--cm-head-blocks', '1', '--lambda', '0.1', '--no-test', '--quiet'], dir);
  t.equal(ok.exitCode, 0, ok.stderr);
});

t.test('--lr scales a preset cosine floor with it: the schedule still falls from the rate asked for', async (t) => {
  // The mnist preset anneals 3e-3 -> 1e-4; --lr 5e-5 kept the floor and rose to twice the rate asked for.
  const out = path.join(dir, 'runs', 'lr-floor');
  const r = await runCli(['train', '--preset', 'mnist', '--lr', '5e-5', '--steps', '1', '--no-test', '--quiet', '--out', out], dir);
  t.equal(r.exitCode, 0, r.stderr);
  const start = JSON.parse(fs.readFileSync(path.join(out, 'train-log.jsonl'), 'utf8').split('\n')[0]);
  t.equal(start.event, 'start');
  t.equal(start.config.schedule.kind, 'cosine');
  t.equal(start.config.schedule.lr, 5e-5);
  t.ok(Math.abs(start.config.schedule.minLr - (1e-4 * 5e-5) / 3e-3) < 1e-18, `floor 1e-4 x (5e-5 / 3e-3): ${start.config.schedule.minLr}`);
});

t.test('quitNow (a second Ctrl-C) ends at once, not after the native call in progress, and runs the exit listeners', async (t) => {
  const script = path.join(dir, 'quit-now.ts');
  fs.writeFileSync(
    script,
    `import { createModel } from ${JSON.stringify(path.resolve(__dirname, '../src/model/model'))};
import { quitNow } from ${JSON.stringify(path.resolve(__dirname, '../src/cli/common'))};
const m = createModel({ ndim: 3, inChannels: 1, classes: 2, annotators: 1, depth: 3, baseChannels: 16 });
const n = 160; // a forward pass of several seconds on a worker thread
const started = Date.now();
void m.predict(new Float32Array(n * n * n), [1, 1, n, n, n]).then(() => process.stdout.write('PREDICTED\\n'));
process.on('exit', (code) => process.stdout.write(\`exit listener: code \${code}\\n\`));
setTimeout(() => {
  process.stdout.write(\`quitting after \${Date.now() - started} ms\\n\`);
  quitNow(130);
}, 300);
`,
  );
  const started = Date.now();
  const r = spawnSync(process.execPath, [...process.execArgv, script], { encoding: 'utf8', timeout: 60_000 });
  const took = Date.now() - started;
  t.equal(r.status, 130, r.stderr);
  t.match(r.stdout, /quitting after \d+ ms\nexit listener: code 130\n$/, 'the exit listeners ran, and everything written came out');
  t.notMatch(r.stdout, /PREDICTED/, 'the prediction did not finish first');
  // The forward pass alone takes seconds here (process.exit waited for it: 3.9 s against 0.3 s).
  const alone = Date.now();
  const m = (await import('../src/model/model')).createModel({ ndim: 3, inChannels: 1, classes: 2, annotators: 1, depth: 3, baseChannels: 16 });
  await m.predict(new Float32Array(160 ** 3), [1, 1, 160, 160, 160]);
  await m.dispose();
  const predictMs = Date.now() - alone;
  t.ok(took < predictMs, `the child ended in ${took} ms, a prediction takes ${predictMs} ms`);
});
