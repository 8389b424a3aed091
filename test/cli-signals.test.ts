// The built CLI as a scheduler or a shell sees it: SIGTERM during `train` finishes the
// step, saves `last` and exits 143 (a cluster's pre-emption loses nothing); a closed
// stdout pipe (`cmseg ... | head`) ends the command without a stack trace.
import t from 'tap';
import { spawn, spawnSync } from 'child_process';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { readCheckpoint } from '../src/model/checkpoint';

const bin = path.resolve(__dirname, '..', 'dist/cli/main.js');
const skip = fs.existsSync(bin) ? false : 'no dist/ build (npm run build:ts)';
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cmseg-signals-'));
t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));

t.test('SIGTERM during train saves last and exits 143', { skip }, async (t) => {
  const child = spawn(process.execPath, [bin, 'train', '--preset', 'mnist-tiny', '--steps', '100000', '--no-test', '--out', 'run'], {
    cwd: dir,
    env: { ...process.env, CMSEG_NUM_THREADS: '1' },
  });
  let stdout = '';
  let stderr = '';
  let sent = false;
  child.stdout.on('data', (b) => (stdout += b));
  child.stderr.on('data', (b) => {
    stderr += b;
    // After the first epoch's line: training is under way.
    if (!sent && /epoch 1\//.test(stderr)) (sent = true), child.kill('SIGTERM');
  });
  const code = await new Promise<number | null>((resolve) => child.on('close', resolve));
  t.ok(sent, 'training started');
  t.equal(code, 143, stderr);
  // What applies to a signal: another SIGTERM, not the Ctrl-C a scheduler's job has no key for.
  t.match(stderr, /\nSIGTERM: finishing the current step and saving a checkpoint \(a second SIGTERM quits at once\)\n/);
  t.match(stdout, /interrupted at step (\d+)\/100000; continue with: cmseg train --out run --resume/);
  const saved = await readCheckpoint(path.join(dir, 'run', 'last.safetensors'));
  const step = Number(/interrupted at step (\d+)/.exec(stdout)![1]);
  t.equal(saved.step, step, 'last holds the step it stopped at');
  t.ok(step > 0 && step < 100000);
  t.notOk(fs.existsSync(path.join(dir, 'run', '.train.lock')), 'the run folder\'s lock is released');
});

t.test('a closed stdout pipe ends the command quietly', { skip }, async (t) => {
  // The reader goes away before the command writes (as `| head` does mid-output); a
  // command that ends on its own (no process.exit) then meets the write's EPIPE.
  const child = spawn(process.execPath, [bin, 'simulate', '--count', '2', '--out', 'sim'], { cwd: dir, stdio: ['ignore', 'pipe', 'pipe'] });
  child.stdout.destroy();
  let stderr = '';
  child.stderr.on('data', (b) => (stderr += b));
  const code = await new Promise<number | null>((resolve) => child.on('close', resolve));
  t.equal(code, 0, stderr);
  t.notMatch(stderr, /EPIPE|Error|\n\s+at /, 'no stack trace');
});

t.test('a closed stderr pipe does not stop a training run', { skip }, async (t) => {
  // Progress goes to stderr; its reader going away (`2>&1 | tee` killed) must not end the run early.
  const child = spawn(process.execPath, [bin, 'train', '--preset', 'mnist-tiny', '--steps', '8', '--no-test', '--out', 'closed-stderr'], {
    cwd: dir,
    env: { ...process.env, CMSEG_NUM_THREADS: '1' },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  child.stderr.destroy();
  let stdout = '';
  child.stdout.on('data', (b) => (stdout += b));
  const code = await new Promise<number | null>((resolve) => child.on('close', resolve));
  t.equal(code, 0, stdout);
  t.match(stdout, /trained cm from step 0 to 8/);
  t.equal((await readCheckpoint(path.join(dir, 'closed-stderr', 'last.safetensors'))).step, 8, 'the run finished and saved');
});
