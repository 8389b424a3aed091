// The native thread pool's default: every CPU the process can keep busy, not every core the
// machine has. A `taskset` (affinity mask) and a cgroup CPU quota (a container's --cpus) each
// lower it; `backendInfo()` and `cmseg info` say which. Checked here by running a child Node
// under a real affinity mask (taskset) and, where this process may make cgroups (root, v1 cpu
// controller), under a real CPU quota. Also: `cmseg bench`'s runBench refuses bad counts and
// unknown configs before it measures anything.
import t from 'tap';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { spawnSync } from 'child_process';
import { ADDON } from './helpers/child';
import { runBench } from '../src/bench/run';
import { loadNative } from '../src/native';

const CLI = path.join(__dirname, '..', 'dist', 'cli', 'main.js');
const cores = os.cpus().length;
const has = (cmd: string) => spawnSync('sh', ['-c', `command -v ${cmd}`]).status === 0;

/** backendInfo()'s thread fields in a child started by `prefix` (a command line run before node). */
function infoUnder(prefix: string[], env: Record<string, string> = {}) {
  const script = `const b = require(${JSON.stringify(ADDON)}).backendInfo();
process.stdout.write(JSON.stringify({ threads: b.threads, defaultThreads: b.defaultThreads, usableCpus: b.usableCpus, threadsReason: b.threadsReason }));`;
  const env0: Record<string, string | undefined> = { ...process.env, ...env };
  if (!('CMSEG_NUM_THREADS' in env)) delete env0.CMSEG_NUM_THREADS;
  const r = spawnSync(prefix[0], [...prefix.slice(1), process.execPath, '-e', script], { encoding: 'utf8', env: env0, timeout: 60_000 });
  return { status: r.status, stderr: r.stderr, info: r.status === 0 ? JSON.parse(r.stdout) : undefined };
}

t.test('backendInfo() reports the default threads and where they come from', async (t) => {
  const b = loadNative().backendInfo();
  t.ok(Number.isInteger(b.usableCpus) && b.usableCpus >= 1 && b.usableCpus <= cores, `usableCpus ${b.usableCpus} in 1..${cores}`);
  t.type(b.threadsReason, 'string');
  t.ok(b.threadsReason.length > 0);
  const env = process.env.CMSEG_NUM_THREADS;
  if (env) t.equal(b.threadsReason, `CMSEG_NUM_THREADS=${Number(env)}`);
  else t.equal(b.defaultThreads, b.usableCpus);
});

t.test('an affinity mask of one CPU gives one thread, and says so', { skip: !has('taskset') ? 'no taskset on this machine' : cores < 2 ? 'one core: a mask cannot lower it' : false }, async (t) => {
  const r = infoUnder(['taskset', '-c', '0']);
  t.equal(r.status, 0, r.stderr);
  t.same(r.info, { threads: 1, defaultThreads: 1, usableCpus: 1, threadsReason: `the process's CPU affinity: 1 of ${cores} cores` });
  // CMSEG_NUM_THREADS still wins over the mask (the user asked for it).
  const asked = infoUnder(['taskset', '-c', '0'], { CMSEG_NUM_THREADS: '3' });
  t.same(asked.info, { threads: 3, defaultThreads: 3, usableCpus: 1, threadsReason: 'CMSEG_NUM_THREADS=3' });
  // A value it cannot read falls back to the mask's one CPU, with a warning in the singular.
  const bad = infoUnder(['taskset', '-c', '0'], { CMSEG_NUM_THREADS: 'many' });
  t.equal(bad.info?.threads, 1);
  t.match(bad.stderr, "ignoring CMSEG_NUM_THREADS='many' (not an integer in 1..1024); using 1 thread (one usable CPU) instead");
  t.match(bad.info?.threadsReason, `the process's CPU affinity: 1 of ${cores} cores (CMSEG_NUM_THREADS='many' ignored`);
});

t.test('cmseg info prints the threads and their reason', { skip: !has('taskset') || cores < 2 ? 'needs taskset and 2+ cores' : false }, async (t) => {
  const env = { ...process.env };
  delete env.CMSEG_NUM_THREADS;
  const run = (args: string[]) => spawnSync('taskset', ['-c', '0', process.execPath, CLI, 'info', ...args], { encoding: 'utf8', env, timeout: 60_000 });
  const plain = run([]);
  t.equal(plain.status, 0, plain.stderr);
  t.match(plain.stdout, new RegExp(`threads\\s+1 \\(the process's CPU affinity: 1 of ${cores} cores; CMSEG_NUM_THREADS or --threads to change\\)`));
  const set = run(['--threads', '2']);
  t.equal(set.status, 0, set.stderr);
  t.match(set.stdout, new RegExp(`threads\\s+2 \\(set; the default is 1: the process's CPU affinity: 1 of ${cores} cores;`));
  const json = run(['--json']);
  const o = JSON.parse(json.stdout);
  t.equal(o.usableCpus, 1);
  t.equal(o.defaultThreads, 1);
});

/** A cgroup v1 cpu hierarchy this process may make a child group in (root in a container that allows it), or why not. */
function cgroupV1(): string | undefined {
  const mount = '/sys/fs/cgroup/cpu';
  try {
    fs.accessSync(path.join(mount, 'cpu.cfs_quota_us'), fs.constants.W_OK);
  } catch {
    return undefined;
  }
  const self = fs.readFileSync('/proc/self/cgroup', 'utf8');
  const line = self.split('\n').find((l) => /^\d+:([^:]*,)?cpu(,[^:]*)?:/.test(l));
  if (!line) return undefined;
  const own = line.split(':').slice(2).join(':');
  const dir = path.join(mount, own === '/' ? '' : own);
  return fs.existsSync(path.join(dir, 'cpu.cfs_quota_us')) ? dir : undefined;
}

t.test('a cgroup CPU quota below the cores lowers the default (v1, real cgroup)', async (t) => {
  const parent = cgroupV1();
  if (!parent || cores < 2) return t.skip(!parent ? 'no writable cgroup v1 cpu controller here (needs root and a v1 cpu hierarchy)' : 'one core');
  const dir = path.join(parent, `cmseg-test-${process.pid}`);
  try {
    fs.mkdirSync(dir);
    fs.writeFileSync(path.join(dir, 'cpu.cfs_period_us'), '100000');
    fs.writeFileSync(path.join(dir, 'cpu.cfs_quota_us'), '50000'); // half a CPU: rounded up, one thread
  } catch (e) {
    try { fs.rmdirSync(dir); } catch { /* not made */ }
    return t.skip(`cannot make a cgroup here: ${(e as Error).message}`);
  }
  t.teardown(() => {
    try { fs.rmdirSync(dir); } catch { /* a child still in it ends first; the group is left empty */ }
  });
  const r = infoUnder(['sh', '-c', `echo $$ > ${path.join(dir, 'cgroup.procs')} && exec "$@"`, 'sh']);
  t.equal(r.status, 0, r.stderr);
  t.same(r.info, { threads: 1, defaultThreads: 1, usableCpus: 1, threadsReason: `the cgroup CPU quota: 0.5 CPUs of ${cores} cores` });
});

t.test('runBench refuses bad counts and unknown configs before measuring', async (t) => {
  const cases: [Parameters<typeof runBench>[0], RegExp][] = [
    [{ configs: ['mnist2d'], threads: 0 }, /threads 0 must be an integer in 1\.\.1024/],
    [{ configs: ['mnist2d'], threads: 2.5 }, /threads 2\.5 must be an integer in 1\.\.1024/],
    [{ configs: ['mnist2d'], threads: 4096 }, /threads 4096 must be an integer in 1\.\.1024/],
    [{ configs: ['mnist2d'], steps: 0 }, /steps 0 must be an integer >= 1/],
    [{ configs: ['mnist2d'], steps: NaN }, /steps NaN must be an integer >= 1/],
    [{ configs: ['mnist2d'], warmup: -1 }, /warmup -1 must be an integer >= 0/],
    [{ configs: ['mnist2d'], rounds: 0 }, /rounds 0 must be an integer >= 1/],
    [{ configs: ['mnist2d', 'nope'] }, /unknown benchmark config 'nope'/],
  ];
  for (const [options, message] of cases) {
    const lines: string[] = [];
    t.throws(() => runBench({ ...options, log: (l) => lines.push(l) }), message);
    t.same(lines, [], `${JSON.stringify(options)}: nothing measured`);
  }
});
