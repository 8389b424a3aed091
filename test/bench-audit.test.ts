// cmseg bench as a demanding user drives it: numbers that stay honest when one side fails,
// failures that say what happened, and no side left running once cmseg bench is gone.
// (torch_reference.py's CLI on bad input: bench-torch-cli.test.ts.)
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import t, { type Test } from 'tap';
import { type BenchResult, formatMachine, machineInfo, runBench } from '../src/bench/run';
import { missingPythonModules, PYTHON } from './helpers/python';

const SCRIPT = path.resolve(__dirname, '..', 'scripts', 'torch_reference.py');

function scratch(t: Test): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cmseg-bench-audit-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/** An executable "python" that runs this shell script whatever its arguments. */
function fakePython(dir: string, body: string): string {
  const file = path.join(dir, `python-${fs.readdirSync(dir).length}`);
  fs.writeFileSync(file, `#!/bin/sh\n${body}\n`, { mode: 0o755 });
  return file;
}

/**
 * runBench with a cmseg worker that cannot start (its node refuses a --require of a missing
 * file): quick, for the tests about the PyTorch side and the bookkeeping around both.
 */
function withBrokenWorker<T>(dir: string, run: () => T): T {
  const saved = process.env.NODE_OPTIONS;
  process.env.NODE_OPTIONS = `--require ${path.join(dir, 'missing.js')}`;
  try {
    return run();
  } finally {
    if (saved === undefined) delete process.env.NODE_OPTIONS;
    else process.env.NODE_OPTIONS = saved;
  }
}

const TORCH_OK = `echo '{"ok": true, "stepMs": [100], "peakRssMB": 900, "threads": 1, "torch": "9.9.9"}'`;

t.test('a side killed by a signal says so; it is not reported as "timed out"', async (t) => {
  // What the OOM killer (SIGKILL) or a native crash (SIGSEGV) does to a benchmark process.
  const dir = scratch(t);
  const python = fakePython(dir, 'echo "loading" >&2\nkill -KILL $$');
  const [killed] = withBrokenWorker(dir, () => runBench({ configs: ['mnist2d'], steps: 1, warmup: 0, threads: 1, python }));
  t.equal(killed.torchEager?.ok, false);
  t.notMatch(killed.torchEager?.error, /timed out/);
  t.match(killed.torchEager?.error, /killed by SIGKILL/);
});

t.test('a side whose last line is JSON but not a report fails with its output, and the bench goes on', async (t) => {
  // A wrapper "python" (an environment manager's shim) that ends by printing its status.
  const dir = scratch(t);
  for (const last of ['null', '0']) {
    const python = fakePython(dir, `echo 'RuntimeError: no CUDA here' >&2\necho ${last}`);
    const [r] = withBrokenWorker(dir, () => runBench({ configs: ['mnist2d'], steps: 1, warmup: 0, threads: 1, python }));
    t.equal(r.torchEager?.ok, false, last);
    t.match(r.torchEager?.error, /exited 0: RuntimeError: no CUDA here/, last);
  }
});

t.test('when the cmseg side fails, the PyTorch row keeps its true FLOP rate (not 0 GFLOP/s)', async (t) => {
  const dir = scratch(t);
  // PyTorch "ran" mnist2d in 100 ms; the cmseg worker reports no parameter shapes.
  const [r] = withBrokenWorker(dir, () => runBench({ configs: ['mnist2d'], steps: 1, warmup: 0, threads: 1, python: fakePython(dir, TORCH_OK) }));
  t.equal(r.cmseg?.ok, false, 'the cmseg side failed');
  // mnist2d's step: 27.651 GFLOP (3 x forward; bench.test.ts checks the rule by hand and
  // against torch_reference.py's independent forward_macs) in 0.1 s.
  t.ok(Math.abs(r.stepGflop! - 27.651) < 0.01, `step GFLOP ${r.stepGflop}`);
  t.ok(Math.abs(r.torchEager!.gflopPerSecond! - 276.51) < 0.1, `PyTorch GFLOP/s ${r.torchEager!.gflopPerSecond}`);
});

t.test('the machine line names PyTorch when any configuration ran it, not only the first', async (t) => {
  const result = (config: string, torch?: string, skipped?: string): BenchResult =>
    ({ config, shape: [1], threads: 2, peakGflopPerSecond: 100, machine: machineInfo(torch), ...(skipped ? { skipped } : {}) });
  // `cmseg bench --config brats3d-gpu mnist2d` on a machine without a GPU: the first is skipped.
  const line = formatMachine([result('brats3d-gpu', undefined, 'no usable GPU'), result('mnist2d', '2.15.0')]);
  t.match(line, /; PyTorch 2\.15\.0;/);
});

t.test('the machine line says "N threads on both sides" only when both sides say they used N', async (t) => {
  // A torch build without OpenMP runs 1 thread whatever set_num_threads asks for.
  const dir = scratch(t);
  const python = fakePython(dir, `echo '{"ok": true, "stepMs": [100], "peakRssMB": 900, "threads": 1, "torch": "9.9.9"}'`);
  const results = runBench({ configs: ['mnist2d'], steps: 1, warmup: 0, threads: 2, python });
  t.equal(results[0].cmseg?.ok, true, results[0].cmseg?.error);
  t.equal(results[0].cmseg?.threads, 2, 'cmseg ran the 2 threads asked for');
  t.equal(results[0].torchEager?.threads, 1);
  const line = formatMachine(results);
  t.notMatch(line, /threads on both sides/);
  t.match(line, /2 threads asked for, but mnist2d torchEager ran 1/);
});

t.test('a configuration named twice is measured once', async (t) => {
  const dir = scratch(t);
  const results = withBrokenWorker(dir, () => runBench({ configs: ['mnist2d', 'mnist2d'], steps: 1, warmup: 0, threads: 1, python: fakePython(dir, TORCH_OK) }));
  t.same(results.map((r) => r.config), ['mnist2d']);
});

/**
 * Starts `command` as a side of a bench whose parent is a `sleep` standing in for `cmseg bench`,
 * kills that parent (what `kill <pid>` of cmseg bench does: spawnSync passes nothing on) and
 * resolves with the side's exit code, or 'still running' after `waitMs`.
 */
async function sideAfterParentDies(t: Test, command: string, args: string[], startMs: number, waitMs: number): Promise<number | string | null> {
  const { spawn } = await import('child_process');
  const parent = spawn('sleep', ['600'], { stdio: 'ignore' });
  const child = spawn(command, args, { stdio: 'ignore', env: { ...process.env, CMSEG_NUM_THREADS: '1', CMSEG_BENCH_PARENT: String(parent.pid) } });
  t.teardown(() => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    if (parent.exitCode === null && parent.signalCode === null) parent.kill('SIGKILL');
  });
  const exited = new Promise<number | string | null>((resolve) => child.on('exit', (code, signal) => resolve(code ?? signal)));
  await new Promise((resolve) => setTimeout(resolve, startMs));
  parent.kill('SIGKILL');
  return Promise.race([exited, new Promise<string>((resolve) => setTimeout(() => resolve('still running'), waitMs))]);
}

t.test('a bench side exits once the cmseg bench that started it is gone', async (t) => {
  // Thousands of brats3d-cpu steps: minutes, far past the wait, unless the side notices.
  const worker = path.resolve(__dirname, '..', 'src', 'bench', 'worker.ts');
  t.equal(await sideAfterParentDies(t, process.execPath, [...process.execArgv, worker, 'brats3d-cpu', '5000', '0'], 1500, 8000), 143, 'the cmseg worker');
  if (!missingPythonModules('torch')) {
    t.equal(await sideAfterParentDies(t, PYTHON, [SCRIPT, 'bench', '--config', 'brats3d-cpu', '--steps', '5000', '--warmup', '0', '--threads', '1'], 1500, 15000), 143, 'the PyTorch side');
  }
  // runBench names itself to both sides.
  const dir = scratch(t);
  const python = fakePython(dir, `echo "{\\"ok\\": false, \\"error\\": \\"parent $CMSEG_BENCH_PARENT\\"}"`);
  const [r] = withBrokenWorker(dir, () => runBench({ configs: ['mnist2d'], steps: 1, warmup: 0, threads: 1, python }));
  t.equal(r.torchEager?.error, `parent ${process.pid}`);
});
