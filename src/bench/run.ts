// `cmseg bench`: cmseg and the PyTorch reference side by side, same machine,
// same run, same threads. Each side runs in its own process so that its peak
// resident memory is its own.
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { spawnSync } from 'child_process';
import { BENCH_CONFIGS, type BenchConfig, benchConfig, passesPerStep, voxelsPerStep } from './configs';
import { stepConvFlops } from './flops';
import { tableCell } from '../eval/report';
import { backendInfo, createModel } from '../model/model';
import { loadNative } from '../native';

export interface BenchOptions {
  configs?: string[];
  steps?: number;
  warmup?: number;
  threads?: number;
  /** also time torch.compile (slow to compile) */
  compile?: boolean;
  /**
   * Rounds of (cmseg, PyTorch eager) run back to back: each round gives one time ratio
   * from two processes a few seconds apart, and the table reports the median ratio and
   * the median step over all rounds. Shared machines drift by tens of percent within a
   * minute; pairing the sides keeps that drift out of the ratio. Default 1.
   */
  rounds?: number;
  python?: string;
  log?: (line: string) => void;
}

export interface SideResult {
  ok: boolean;
  error?: string;
  stepMs?: number[];
  stepMsMedian?: number;
  voxelsPerSecond?: number;
  gflopPerSecond?: number;
  fractionOfPeak?: number;
  peakMemoryMB?: number;
  /** the threads the side says it ran with (torch.get_num_threads(), backendInfo().threads) */
  threads?: number;
}

export interface BenchResult {
  config: string;
  shape: number[];
  threads: number;
  skipped?: string;
  stepGflop?: number;
  peakGflopPerSecond: number;
  cmseg?: SideResult;
  torchEager?: SideResult;
  torchCompile?: SideResult;
  /** GPU configurations: cmseg with bf16 convolutions (config.bf16) */
  cmsegBf16?: SideResult;
  /** GPU configurations: PyTorch eager under bf16 autocast */
  torchBf16?: SideResult;
  /** where the configuration ran */
  device?: 'cpu' | 'gpu';
  /** PyTorch step time / cmseg step time: > 1 means cmseg is faster (median over rounds) */
  speedupVsEager?: number;
  /** rounds run, and the smallest and largest per-round eager ratio */
  rounds?: number;
  speedupVsEagerRange?: [number, number];
  speedupVsCompile?: number;
  machine: MachineInfo;
}

export interface MachineInfo {
  cpu: string;
  cores: number;
  memoryGB: number;
  os: string;
  node: string;
  torch?: string;
  date: string;
}

const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
};

/**
 * How node runs the cmseg side's worker: the compiled worker.js beside this file, or, run from
 * the TypeScript sources, worker.ts with this process's own loader flags (tap's, `node --import
 * tsx`'s): a plain `node worker.js` there found no file, and every cmseg measurement failed.
 * Without loader flags node says it cannot run a .ts file: build dist/ (npm run build:ts).
 */
function workerArgs(): string[] {
  const compiled = path.join(__dirname, 'worker.js');
  if (fs.existsSync(compiled)) return [compiled];
  return [...process.execArgv, path.join(__dirname, 'worker.ts')];
}

function runJson(cmd: string, args: string[], env: Record<string, string>, timeoutMs: number): Record<string, unknown> {
  // CMSEG_BENCH_PARENT: each side exits once this process is gone (worker.ts's and
  // torch_reference.py's exitWithParent): spawnSync cannot pass a SIGTERM on to it.
  const r = spawnSync(cmd, args, { encoding: 'utf8', env: { ...process.env, ...env, CMSEG_BENCH_PARENT: String(process.pid) }, timeout: timeoutMs, maxBuffer: 1 << 26 });
  // Not started at all (no such interpreter): status null read as "timed out".
  if (r.error && r.status === null && (r.error as NodeJS.ErrnoException).code !== 'ETIMEDOUT') {
    return { ok: false, error: `could not run ${cmd}: ${r.error.message}` };
  }
  const last = (r.stdout ?? '').trim().split('\n').pop() ?? '';
  try {
    // Only an object is a report: a last line of "null" (JSON too) crashed the whole bench on
    // its .ok, and "0" made a side "failed" with no reason.
    const report: unknown = JSON.parse(last);
    if (typeof report !== 'object' || report === null || Array.isArray(report)) throw new TypeError('not a report');
    return report as Record<string, unknown>;
  } catch {
    // A side with no status was either stopped by spawnSync's timeout (error ETIMEDOUT) or
    // killed by a signal of its own: the OOM killer's SIGKILL, a native crash's SIGSEGV. Both
    // used to read "timed out", which sent people looking at the time limit, not the memory.
    const how = r.status !== null ? `exited ${r.status}`
      : (r.error as NodeJS.ErrnoException | undefined)?.code === 'ETIMEDOUT' ? `timed out after ${timeoutMs / 1000} s`
        : `was killed by ${r.signal ?? 'a signal'}`;
    return { ok: false, error: `${path.basename(cmd)} ${how}: ${failureText(r.stderr || r.stdout || '')}` };
  }
}

/**
 * The line of a failed side's output that says why: the last one that starts with an error's
 * name (Python's traceback ends with it, Node's stack starts with it), else the last line. The
 * last three lines were Node's stack tail and version banner ("} |  | Node.js v20.20.2").
 */
function failureText(output: string): string {
  const lines = output.split('\n').map((l) => l.trim()).filter((l) => l !== '');
  const named = lines.filter((l) => /^[\w.]*(Error|Exception)\b/.test(l));
  return named[named.length - 1] ?? lines[lines.length - 1] ?? 'no output';
}

function side(raws: Record<string, unknown> | Record<string, unknown>[], flops: number, voxels: number, peak: number, memKey: string): SideResult {
  const all = Array.isArray(raws) ? raws : [raws];
  const failed = all.find((r) => !r.ok);
  if (failed) return { ok: false, error: String(failed.error ?? 'failed') };
  const mems = all.map((r) => r[memKey]).filter((m): m is number => typeof m === 'number');
  const raw = { ...all[0], [memKey]: mems.length ? Math.max(...mems) : undefined };
  const stepMs = all.flatMap((r) => r.stepMs as number[]);
  const m = median(stepMs);
  const gflops = flops / 1e9 / (m / 1e3);
  const threads = all.map((r) => r.threads).find((x): x is number => typeof x === 'number');
  return {
    ok: true,
    stepMs,
    stepMsMedian: m,
    voxelsPerSecond: voxels / (m / 1e3),
    gflopPerSecond: gflops,
    fractionOfPeak: gflops / peak,
    peakMemoryMB: raw[memKey] as number,
    threads,
  };
}

/** A config's parameter names and shapes, from a CPU model built for the purpose and freed. */
function parameterShapes(model: BenchConfig['model']): { name: string; shape: number[] }[] {
  const m = createModel({ ...model, device: 'cpu' });
  try {
    return m.parameters().map(({ name, shape }) => ({ name, shape }));
  } finally {
    void m.dispose();
  }
}

export function machineInfo(torch?: string): MachineInfo {
  return {
    cpu: os.cpus()[0]?.model ?? 'unknown',
    cores: os.cpus().length,
    memoryGB: Math.round(os.totalmem() / 2 ** 30),
    os: `${os.type()} ${os.release()}`,
    node: process.version,
    torch,
    date: new Date().toISOString(),
  };
}

/** An integer option in min..max, or a RangeError naming it (the CLI checks its flags; an API caller's values reach here as given). */
function countOption(name: string, value: number, min: number, max = Number.MAX_SAFE_INTEGER): number {
  if (!Number.isSafeInteger(value) || value < min || value > max) {
    throw new RangeError(`${name} ${value} must be an integer ${max === Number.MAX_SAFE_INTEGER ? `>= ${min}` : `in ${min}..${max}`}`);
  }
  return value;
}

export function runBench(options: BenchOptions = {}): BenchResult[] {
  const log = options.log ?? (() => {});
  const native = loadNative();
  const info = native.backendInfo();
  // What cmseg would run with by itself (CMSEG_NUM_THREADS, else the usable CPUs: a
  // container's CPU quota or an affinity mask counts), given to PyTorch's side too.
  const threads = countOption('threads', options.threads ?? info.defaultThreads, 1, 1024);
  const steps = countOption('steps', options.steps ?? 5, 1);
  const warmup = countOption('warmup', options.warmup ?? 1, 0);
  const rounds = countOption('rounds', options.rounds ?? 1, 1);
  const python = options.python ?? process.env.CMSEG_PYTHON ?? 'python3';
  // Default: the CPU configurations, and the GPU one where a GPU can be used.
  // A config named twice is measured once: the second run took its minutes again for a
  // duplicate row.
  const names = options.configs?.length
    ? [...new Set(options.configs)]
    : BENCH_CONFIGS.filter((c) => c.device === 'cpu' || info.gpuAvailable).map((c) => c.name);
  for (const name of names) benchConfig(name);  // an unknown name is refused before minutes of the others
  native.setNumThreads(threads);
  log(`measuring FP32 peak (FMA loop, ${threads} threads)...`);
  const peak = native.measurePeakGflops(1.0);
  const results: BenchResult[] = [];
  const worker = workerArgs();
  // Every cmseg run gets the thread count PyTorch gets (the bf16 run had none: all cores).
  const cmsegEnv = { CMSEG_NUM_THREADS: String(threads) };
  const torchScript = path.resolve(__dirname, '..', '..', 'scripts', 'torch_reference.py');
  for (const name of names) {
    const c = benchConfig(name);
    const gpu = c.device === 'gpu';
    const base: BenchResult = { config: name, shape: c.shape, threads, peakGflopPerSecond: peak, machine: machineInfo(), device: c.device };
    if (gpu && !backendInfo().cuda) {
      results.push({ ...base, skipped: 'the CUDA backend is not built (backendInfo().cuda is false)' });
      log(`${name}: skipped (CUDA backend not built)`);
      continue;
    }
    if (gpu && !info.gpuAvailable) {
      results.push({ ...base, skipped: `no usable GPU (${info.gpuUnavailableReason || 'unknown reason'})` });
      log(`${name}: skipped (no usable GPU)`);
      continue;
    }
    const voxels = voxelsPerStep(c);
    const torchArgs = [torchScript, 'bench', '--config', name, '--steps', String(steps), '--warmup', String(warmup), '--threads', String(threads)];
    if (gpu) torchArgs.push('--device', 'cuda');
    const ours: Record<string, unknown>[] = [];
    const eager: Record<string, unknown>[] = [];
    const ratios: number[] = [];
    for (let k = 0; k < rounds; k++) {
      const tag = rounds > 1 ? ` (round ${k + 1}/${rounds})` : '';
      log(`${name}: cmseg (${warmup} warm-up + ${steps} steps)${tag}...`);
      ours.push(runJson(process.execPath, [...worker, name, String(steps), String(warmup)], cmsegEnv, 1_800_000));
      log(`${name}: PyTorch eager${tag}...`);
      eager.push(runJson(python, torchArgs, {}, 1_800_000));
      const a = ours[k], b = eager[k];
      if (a.ok && b.ok) ratios.push(median(b.stepMs as number[]) / median(a.stepMs as number[]));
    }
    // The parameter shapes the FLOPs are counted from: the worker's, or, when no worker
    // reported them (the cmseg side failed), a model of the same config built here. With none,
    // the count was 0, and PyTorch's row said 0.0 GFLOP/s and 0.0% of peak.
    const reported = ours.find((o) => Array.isArray(o.parameters))?.parameters as { name: string; shape: number[] }[] | undefined;
    const params = reported ?? parameterShapes(c.model);
    const [n, , ...spatial] = c.shape;
    const flops = stepConvFlops(params, spatial, n, c.model.depth ?? 4, passesPerStep(c));
    let compiled: Record<string, unknown> | undefined;
    if (options.compile) {
      log(`${name}: PyTorch torch.compile...`);
      compiled = runJson(python, [...torchArgs, '--compile'], {}, 1_800_000);
    }
    let bf16: Record<string, unknown> | undefined, oursBf16: Record<string, unknown> | undefined;
    if (gpu) {
      log(`${name}: cmseg, bf16 convolutions...`);
      oursBf16 = runJson(process.execPath, [...worker, name, String(steps), String(warmup), 'bf16'], cmsegEnv, 1_800_000);
      log(`${name}: PyTorch eager, bf16 autocast...`);
      bf16 = runJson(python, [...torchArgs, '--amp', 'bf16'], {}, 1_800_000);
    }
    // GPU: peak device memory on both sides, and no CPU FMA peak to compare with.
    const mem = gpu ? 'peakGpuMB' : 'peakRssMB';
    const pk = gpu ? NaN : peak;
    const r: BenchResult = {
      ...base,
      machine: machineInfo(eager[0].torch as string | undefined),
      stepGflop: flops / 1e9,
      cmseg: side(ours, flops, voxels, pk, mem),
      torchEager: side(eager, flops, voxels, pk, mem),
      torchCompile: compiled ? side(compiled, flops, voxels, pk, mem) : undefined,
      cmsegBf16: oursBf16 ? side(oursBf16, flops, voxels, pk, mem) : undefined,
      torchBf16: bf16 ? side(bf16, flops, voxels, pk, mem) : undefined,
      rounds,
    };
    if (ratios.length === rounds) {
      r.speedupVsEager = median(ratios);
      r.speedupVsEagerRange = [Math.min(...ratios), Math.max(...ratios)];
    }
    if (r.cmseg?.ok && r.torchCompile?.ok) r.speedupVsCompile = r.torchCompile.stepMsMedian! / r.cmseg.stepMsMedian!;
    results.push(r);
  }
  return results;
}

const f = (x: number | undefined, digits = 0) => (x === undefined || !Number.isFinite(x) ? '-' : x.toFixed(digits));

// The eager ratio, with its spread over the rounds when there were several.
function eagerRatio(r: BenchResult): string {
  const m = f(r.speedupVsEager, 2);
  if (!r.speedupVsEagerRange || (r.rounds ?? 1) < 2 || m === '-') return m;
  return `${m} (${f(r.speedupVsEagerRange[0], 2)}-${f(r.speedupVsEagerRange[1], 2)}, ${r.rounds} rounds)`;
}

/** A markdown table of the results, one row per (config, side). */
export function formatBenchTable(results: BenchResult[]): string {
  const lines = [
    '| config | implementation | median step (ms) | voxels/s | conv GFLOP/s | % of FP32 peak | peak memory (MB) | PyTorch time / cmseg time |',
    '| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |',
  ];
  for (const r of results) {
    if (r.skipped) {
      lines.push(`| ${r.config} | - | skipped: ${r.skipped} | | | | | |`);
      continue;
    }
    const gpu = r.device === 'gpu';
    // PyTorch's bf16 row is compared with cmseg's bf16 row when it ran, else with TF32.
    const ours16 = r.cmsegBf16?.ok ? r.cmsegBf16 : r.cmseg;
    const ratio = (s?: SideResult) => (s?.ok && ours16?.ok ? f(s.stepMsMedian! / ours16.stepMsMedian!, 2) : '');
    const rows: [string, SideResult | undefined, string][] = [
      [gpu ? 'cmseg (GPU, TF32)' : 'cmseg (CPU)', r.cmseg, ''],
      [gpu ? 'PyTorch eager (TF32)' : 'PyTorch eager', r.torchEager, eagerRatio(r)],
      ['PyTorch torch.compile', r.torchCompile, f(r.speedupVsCompile, 2)],
      ['cmseg (GPU, bf16 convolutions)', r.cmsegBf16, ''],
      ['PyTorch eager (bf16 autocast)', r.torchBf16, ratio(r.torchBf16)],
    ];
    for (const [label, s, ratio] of rows) {
      if (!s) continue;
      if (!s.ok) {
        // Escaped as every table cell: a '|' in the error split the row.
        lines.push(`| ${r.config} | ${label} | failed: ${tableCell(String(s.error))} | | | | | |`);
        continue;
      }
      lines.push(
        `| ${r.config} | ${label} | ${f(s.stepMsMedian, 0)} | ${f(s.voxelsPerSecond, 0)} | ${f(s.gflopPerSecond, 1)} | ${f((s.fractionOfPeak ?? NaN) * 100, 1)} | ${f(s.peakMemoryMB, 0)} | ${ratio} |`,
      );
    }
  }
  return lines.join('\n');
}

export function formatMachine(results: BenchResult[]): string {
  // The first result that ran PyTorch names its version: the first one may be a skipped
  // config (`--config brats3d-gpu mnist2d` without a GPU), which said "PyTorch not run".
  const r = results.find((x) => x.machine?.torch !== undefined) ?? results[0];
  const m = r?.machine ?? machineInfo();
  return `${m.cpu}, ${m.cores} cores, ${m.memoryGB} GiB, ${m.os}; Node ${m.node}; PyTorch ${m.torch ?? 'not run'}; ${threadsLine(results)}; measured FP32 peak ${f(r?.peakGflopPerSecond, 1)} GFLOP/s; ${m.date}`;
}

/**
 * "N threads on both sides" only when every side that ran says it used the N asked for: the line
 * was the request, so a torch build that ignores set_num_threads (no OpenMP) or a capped engine
 * went unseen. Otherwise each side's own count, per config.
 */
function threadsLine(results: BenchResult[]): string {
  const asked = results[0]?.threads;
  const sides = ['cmseg', 'torchEager', 'torchCompile', 'cmsegBf16', 'torchBf16'] as const;
  const off: string[] = [];
  for (const r of results) {
    for (const k of sides) {
      const used = r[k]?.ok ? r[k]!.threads : undefined;
      if (used !== undefined && used !== r.threads) off.push(`${r.config} ${k} ran ${used}`);
    }
  }
  if (off.length === 0) return `${asked ?? '?'} threads on both sides`;
  return `${asked ?? '?'} threads asked for, but ${off.join(', ')}`;
}
