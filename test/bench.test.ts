// The benchmark's FLOP count (hand-computed for a tiny model, and equal to the
// PyTorch reference's independent count for the SPEC configs) and its table.
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { spawnSync } from 'child_process';
import t from 'tap';
import { createModel } from '../src/index';
import { stepConvFlops } from '../src/bench/flops';
import { BENCH_CONFIGS, benchConfig, passesPerStep, voxelsPerStep } from '../src/bench/configs';
import { missingPythonModules, PYTHON, runPythonJson } from './helpers/python';
import { type BenchResult, formatBenchTable, formatMachine, machineInfo, runBench } from '../src/bench/run';

t.test('conv FLOPs of a tiny 2D model by hand', async (t) => {
  // depth 2, base 4, 1 input channel, L 2, R 1, one 8x8 image:
  // enc.0: 2*4*1*9*64 + 2*4*4*9*64 = 4608 + 18432; enc.1 (16 px): 2*8*4*9*16 + 2*8*8*9*16 = 9216 + 18432
  // up.0 at its 16-px input: 2*8*4*4*16 = 4096; dec.0: 2*4*8*9*64 + 2*4*4*9*64 = 36864 + 18432
  // heads: seg 2*2*4*64 = 1024, cm.0 2*4*4*64 = 2048 -> forward 113152, step = 3x.
  const m = createModel({ ndim: 2, inChannels: 1, classes: 2, annotators: 1, depth: 2, baseChannels: 4 });
  t.equal(stepConvFlops(m.parameters(), [8, 8], 1, 2), 3 * 113152);
});

t.test('SPEC configs match the PyTorch reference FLOP estimates', async (t) => {
  // stepGflopEstimate printed by `torch_reference.py bench` (counted there with torch's FlopCounterMode rule).
  // brats3d-cpu-predict: one forward pass of two 64^3 windows, 2/3 of brats3d-cpu's step.
  const torchGflop: Record<string, number> = { mnist2d: 27.651, 'brats3d-cpu': 87.653, 'brats3d-cpu-predict': 58.435 };
  for (const [name, want] of Object.entries(torchGflop)) {
    const c = benchConfig(name);
    const m = createModel(c.model);
    const [n, , ...spatial] = c.shape;
    const got = stepConvFlops(m.parameters(), spatial, n, c.model.depth!, passesPerStep(c)) / 1e9;
    t.ok(Math.abs(got - want) < 0.01, `${name}: ${got.toFixed(3)} vs ${want}`);
  }
  t.equal(voxelsPerStep(benchConfig('brats3d-gpu')), 2 * 128 ** 3);
  t.same(BENCH_CONFIGS.map((c) => c.name), ['mnist2d', 'brats3d-cpu', 'brats3d-gpu', 'brats3d-cpu-predict', 'brats3d-gpu-predict']);
  t.same(BENCH_CONFIGS.map(passesPerStep), [3, 3, 3, 1, 1]);
  t.throws(() => benchConfig('nope'), /unknown benchmark config 'nope'/);
});

// SPEC section 8's table, written here from SPEC's text (not from src/bench/configs.ts):
// input N x C x spatial, U-Net depth and base channels c, classes L, annotators R, where;
// every one trains "with `cm` full and lambda 0.01". The two predict configs are not in
// SPEC's table: they run the brats3d networks on predict's default batch of 2 windows of
// the training patch.
const SPEC_BENCH_TABLE: Record<string, { shape: number[]; depth: number; c: number; L: number; R: number; device: 'cpu' | 'gpu'; kind?: 'predict' }> = {
  mnist2d: { shape: [32, 1, 32, 32], depth: 4, c: 32, L: 2, R: 4, device: 'cpu' },
  'brats3d-cpu': { shape: [1, 4, 64, 64, 64], depth: 4, c: 16, L: 4, R: 3, device: 'cpu' },
  'brats3d-gpu': { shape: [2, 4, 128, 128, 128], depth: 4, c: 32, L: 4, R: 3, device: 'gpu' },
  'brats3d-cpu-predict': { shape: [2, 4, 64, 64, 64], depth: 4, c: 16, L: 4, R: 3, device: 'cpu', kind: 'predict' },
  'brats3d-gpu-predict': { shape: [2, 4, 128, 128, 128], depth: 4, c: 32, L: 4, R: 3, device: 'gpu', kind: 'predict' },
};

t.test("every benchmark config has SPEC section 8's values", async (t) => {
  t.same(BENCH_CONFIGS.map((c) => c.name), Object.keys(SPEC_BENCH_TABLE));
  for (const c of BENCH_CONFIGS) {
    const want = SPEC_BENCH_TABLE[c.name];
    t.strictSame(c.shape, want.shape, `${c.name}: shape`);
    t.equal(c.device, want.device, `${c.name}: device`);
    t.equal(c.kind ?? 'train', want.kind ?? 'train', `${c.name}: kind`);
    // The whole model config, so that no extra setting (a CM rank, head blocks, another lambda) slips in.
    t.strictSame(c.model, {
      ndim: want.shape.length - 2, inChannels: want.shape[1], classes: want.L, annotators: want.R,
      depth: want.depth, baseChannels: want.c, cmMode: 'full', loss: { lambda: 0.01 },
    }, `${c.name}: model`);
  }
});

t.test("the benchmark table equals torch_reference.py's BENCH_CONFIGS", { skip: missingPythonModules('torch') }, async (t) => {
  // What the PyTorch side runs: its table, and the config bench_setup builds from it (at a
  // small spatial size: only N and the spatial sizes come from --shape), and its lambda.
  const code = [
    'import json, sys, types',
    'sys.path.insert(0, sys.argv[1])',
    'import torch_reference as ref',
    'out = {}',
    'for name, spec in ref.BENCH_CONFIGS.items():',
    '    n, ch, *spatial = spec["shape"]',
    '    small = ",".join(str(v) for v in [1, ch] + [8] * len(spatial))',
    '    args = types.SimpleNamespace(config=name, steps=1, warmup=0, threads=0, device="cpu", shape=small)',
    '    cfg = ref.bench_setup(args)[0]',
    '    keys = ("ndim", "inChannels", "classes", "annotators", "depth", "baseChannels", "cmMode", "cmRank", "cmHeadBlocks")',
    '    out[name] = {"shape": list(spec["shape"]), "kind": spec.get("kind", "train"), "lambda": ref.BENCH_LAMBDA,',
    '                 "config": {k: cfg[k] for k in keys}}',
    'print(json.dumps(out))',
  ].join('\n');
  const torchTable = runPythonJson<Record<string, unknown>>(code, [path.resolve(__dirname, '..', 'scripts')]);
  const ours: Record<string, unknown> = {};
  for (const c of BENCH_CONFIGS) {
    const m = createModel(c.model);
    const r = m.config;
    ours[c.name] = {
      shape: c.shape, kind: c.kind ?? 'train', lambda: c.model.loss?.lambda,
      config: { ndim: r.ndim, inChannels: r.inChannels, classes: r.classes, annotators: r.annotators, depth: r.depth, baseChannels: r.baseChannels, cmMode: r.cmMode, cmRank: r.cmRank, cmHeadBlocks: r.cmHeadBlocks },
    };
    await m.dispose();
  }
  t.strictSame(Object.keys(torchTable), Object.keys(ours), 'the same configs, in the same order');
  t.strictSame(torchTable, ours);
});

t.test('run from the TypeScript sources: the cmseg side runs its worker; a failed side says why, and its table row keeps its cells', async (t) => {
  // A "python" that fails as Python does: the traceback's last line is the reason.
  const fake = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'cmseg-bench-')), 'python');
  fs.writeFileSync(fake, "#!/bin/sh\necho 'Traceback (most recent call last):' >&2\necho '  File \"torch_reference.py\", line 1' >&2\necho 'ModuleNotFoundError: No module named torch' >&2\nexit 1\n", { mode: 0o755 });
  const [r] = runBench({ configs: ['mnist2d'], steps: 1, warmup: 0, threads: 1, python: fake });
  t.equal(r.cmseg?.ok, true, `the cmseg side measured from sources (${r.cmseg?.error ?? ''})`);
  t.equal(r.torchEager?.ok, false);
  t.equal(r.torchEager?.error, 'python exited 1: ModuleNotFoundError: No module named torch');
  const [missing] = runBench({ configs: ['mnist2d'], steps: 1, warmup: 0, threads: 1, python: '/nonexistent/python' });
  t.match(missing.torchEager?.error, /^could not run \/nonexistent\/python: .*ENOENT/, 'not "timed out"');
  const table = formatBenchTable([{ ...r, torchEager: { ok: false, error: 'a | b' } }]);
  const row = table.split('\n').find((l) => l.includes('failed:'))!;
  t.equal(row.replace(/\\\|/g, '').split('|').length, 10, `8 cells: ${row}`);
});

t.test('a predict config times one forward pass on each side, counted as one pass by both', async (t) => {
  const skip = missingPythonModules('torch');
  if (skip) return t.skip(skip);
  // PyTorch's side alone: its own FLOP count (from its config table, not from cmseg's parameters) and kind.
  const script = path.resolve(__dirname, '..', 'scripts', 'torch_reference.py');
  const torchSide = spawnSync(PYTHON, [script, 'bench', '--config', 'brats3d-cpu-predict', '--steps', '1', '--warmup', '0', '--threads', '1'], { encoding: 'utf8' });
  t.equal(torchSide.status, 0, torchSide.stderr);
  const report = JSON.parse(torchSide.stdout.trim().split('\n').pop()!);
  t.equal(report.kind, 'predict');
  t.ok(Math.abs(report.stepGflopEstimate - 58.435) < 0.01, `PyTorch counts ${report.stepGflopEstimate} GFLOP`);
  // Both sides through runBench: cmseg's worker calls predict (a training step of this shape
  // would count 3 passes: stepGflop tells them apart), and PyTorch's outputs are finite.
  const [r] = runBench({ configs: ['brats3d-cpu-predict'], steps: 1, warmup: 0, threads: 1 });
  t.equal(r.cmseg?.ok, true, r.cmseg?.error);
  t.equal(r.torchEager?.ok, true, r.torchEager?.error);
  t.ok(Math.abs(r.stepGflop! - 58.435) < 0.01, `cmseg counts ${r.stepGflop} GFLOP`);
  t.equal(r.cmseg!.stepMs!.length, 1);
});

t.test('the table shows ratios and failures honestly', async (t) => {
  const table = formatBenchTable([
    {
      config: 'mnist2d', shape: [32, 1, 32, 32], threads: 2, peakGflopPerSecond: 100, stepGflop: 27.6, machine: machineInfo(),
      cmseg: { ok: true, stepMsMedian: 1000, voxelsPerSecond: 32768, gflopPerSecond: 27.6, fractionOfPeak: 0.276, peakMemoryMB: 200 },
      torchEager: { ok: true, stepMsMedian: 500, voxelsPerSecond: 65536, gflopPerSecond: 55.2, fractionOfPeak: 0.552, peakMemoryMB: 900 },
      torchCompile: { ok: false, error: 'inductor failed' },
      speedupVsEager: 0.5,
    },
    { config: 'brats3d-gpu', shape: [2, 4, 128, 128, 128], threads: 2, peakGflopPerSecond: 100, machine: machineInfo(), skipped: 'the CUDA backend is not built' },
  ]);
  t.match(table, /\| mnist2d \| cmseg \(CPU\) \| 1000 \| 32768 \| 27\.6 \| 27\.6 \| 200 \|/);
  t.match(table, /\| mnist2d \| PyTorch eager \| 500 .* \| 0\.50 \|/);
  t.match(table, /torch\.compile \| failed: inductor failed/);
  t.match(table, /brats3d-gpu \| - \| skipped: the CUDA backend is not built/);
});

// A brats3d-gpu result: cmseg TF32 at 100 ms against torch eager at 160 ms, plus `extra` sides.
function gpuResult(extra: Partial<BenchResult>): BenchResult {
  const side = (ms: number, mb: number) => ({ ok: true, stepMsMedian: ms, voxelsPerSecond: 4194304000 / ms, gflopPerSecond: 1400000 / ms, fractionOfPeak: NaN, peakMemoryMB: mb });
  return {
    config: 'brats3d-gpu', shape: [2, 4, 128, 128, 128], threads: 16, peakGflopPerSecond: 500, stepGflop: 1400,
    machine: machineInfo(), device: 'gpu', cmseg: side(100, 9000), torchEager: side(160, 12000), speedupVsEager: 1.6,
    ...extra,
  };
}

t.test('a GPU result gets GPU labels, the bf16 row and its ratio, and no CPU-peak fraction', async (t) => {
  const table = formatBenchTable([
    gpuResult({ torchBf16: { ok: true, stepMsMedian: 120, voxelsPerSecond: 34952533, gflopPerSecond: 11667, fractionOfPeak: NaN, peakMemoryMB: 7000 } }),
  ]);
  t.match(table, /\| brats3d-gpu \| cmseg \(GPU, TF32\) \| 100 \| 41943040 \| 14000\.0 \| - \| 9000 \|/);
  t.match(table, /\| brats3d-gpu \| PyTorch eager \(TF32\) \| 160 .* \| 12000 \| 1\.60 \|/);
  t.match(table, /\| brats3d-gpu \| PyTorch eager \(bf16 autocast\) \| 120 .* \| 7000 \| 1\.20 \|/);
  t.notMatch(table, /cmseg \(CPU\)/);
  t.notMatch(table, /bf16 convolutions/, 'no cmseg bf16 row when it did not run');
});

t.test('with a cmseg bf16 run, PyTorch bf16 autocast is compared with it', async (t) => {
  const table = formatBenchTable([
    gpuResult({
      cmsegBf16: { ok: true, stepMsMedian: 60, voxelsPerSecond: 69905067, gflopPerSecond: 23333, fractionOfPeak: NaN, peakMemoryMB: 8000 },
      torchBf16: { ok: true, stepMsMedian: 90, voxelsPerSecond: 46603378, gflopPerSecond: 15556, fractionOfPeak: NaN, peakMemoryMB: 7000 },
    }),
  ]);
  t.match(table, /\| brats3d-gpu \| cmseg \(GPU, bf16 convolutions\) \| 60 .* \| 8000 \|  \|/);
  t.match(table, /\| brats3d-gpu \| PyTorch eager \(bf16 autocast\) \| 90 .* \| 7000 \| 1\.50 \|/);
});

t.test('with several rounds the eager ratio is the median of the rounds, with its spread', async (t) => {
  const table = formatBenchTable([
    {
      config: 'brats3d-cpu', shape: [1, 4, 64, 64, 64], threads: 2, peakGflopPerSecond: 200, stepGflop: 87.65, machine: machineInfo(),
      cmseg: { ok: true, stepMsMedian: 1000, voxelsPerSecond: 262144, gflopPerSecond: 87.65, fractionOfPeak: 0.438, peakMemoryMB: 1300 },
      torchEager: { ok: true, stepMsMedian: 1900, voxelsPerSecond: 137970, gflopPerSecond: 46.1, fractionOfPeak: 0.23, peakMemoryMB: 1800 },
      speedupVsEager: 1.85, speedupVsEagerRange: [1.6, 2.05], rounds: 3,
    },
  ]);
  t.match(table, /\| brats3d-cpu \| PyTorch eager \| 1900 .* \| 1\.85 \(1\.60-2\.05, 3 rounds\) \|/);
});

t.test('a rounds count that is not a whole number >= 1 is refused before anything runs', async (t) => {
  // NaN (e.g. `--rounds x`) used to run no round at all and then fail on the missing first result.
  for (const rounds of [NaN, 0, -1, 1.5, Infinity]) {
    t.throws(() => runBench({ rounds, configs: ['mnist2d'], python: '/nonexistent/python' }), RangeError, `rounds ${rounds}`);
  }
});

t.test('the machine line names the PyTorch version, or says that PyTorch did not run', async (t) => {
  const result = (torch?: string): BenchResult => ({ config: 'mnist2d', shape: [16, 1, 32, 32], threads: 2, peakGflopPerSecond: 100, stepGflop: 1, machine: machineInfo(torch) });
  t.match(formatMachine([result('2.9.0')]), /; PyTorch 2\.9\.0; 2 threads on both sides;/);
  t.match(formatMachine([result()]), /; PyTorch not run; 2 threads on both sides;/);
});
