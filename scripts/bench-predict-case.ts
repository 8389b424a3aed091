// One whole BraTS-sized case through sliding-window inference (SPEC 5): cmseg's
// slidingWindowPredict against the PyTorch reference's sliding_window_predict
// (scripts/torch_reference.py) on the same checkpoint and volume, runs alternated
// (cmseg, torch, cmseg, torch, ...) so that a neighbour's load falls on both, and the
// median of each side with their ratio. Both stitch the same outputs: p, every CM A_r and
// q_r = A_r p (what `cmseg predict` stitches without --no-cms). Random weights (the
// brats3d preset's network: depth 4, c 16, L 4, R 3, full CMs) and a random volume: the
// time does not depend on the values. Each side is timed around the sliding-window call
// alone (no loading, no process start); the first cmseg run also pays oneDNN's kernel
// creation, as a `cmseg predict` of one case does. Also prints the largest difference of
// the consensus probabilities between the two (a check that both did the same work).
//
//   npx ts-node --transpile-only scripts/bench-predict-case.ts [--size 141,168,125] [--patch 64]
//       [--overlap 0.5] [--batch 2] [--threads 2] [--runs 2]
//
// --threads sets CMSEG_NUM_THREADS for cmseg and torch.set_num_threads for PyTorch.
// Needs python3 with torch and safetensors; about 2 GB of memory on each side.

import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { spawnSync } from 'child_process';

function option(name: string, fallback: string): string {
  const at = process.argv.indexOf(`--${name}`);
  return at >= 0 && at + 1 < process.argv.length ? process.argv[at + 1] : fallback;
}

const TORCH_SIDE = `
import json, sys, time, torch
sys.path.insert(0, sys.argv[1])
import torch_reference as ref
from safetensors.torch import load_file, save_file
args = json.loads(sys.argv[2])
torch.set_num_threads(args["threads"])
model = ref.load_checkpoint(args["checkpoint"])[0]
volume = load_file(args["volume"])["volume"]
start = time.perf_counter()
out = ref.sliding_window_predict(model, volume, args["patch"], overlap=args["overlap"], batch=args["batch"],
                                 sum_dtype=torch.float32)
seconds = time.perf_counter() - start
if args.get("out"):
    save_file({"probs": out["probs"].contiguous()}, args["out"])
print(json.dumps({"seconds": seconds, "windows": out["windows"], "threads": torch.get_num_threads(), "torch": torch.__version__}))
`;

const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
};

async function main(): Promise<void> {
  if (process.argv.includes('--help')) {
    console.log('usage: npx ts-node --transpile-only scripts/bench-predict-case.ts [--size 141,168,125] [--patch 64] [--overlap 0.5] [--batch 2] [--threads 2] [--runs 2]');
    return;
  }
  const size = option('size', '141,168,125').split(',').map(Number);
  const patch = Number(option('patch', '64'));
  const overlap = Number(option('overlap', '0.5'));
  const batch = Number(option('batch', '2'));
  const threads = Number(option('threads', '2'));
  const runs = Number(option('runs', '2'));
  // Before the native module loads: it reads CMSEG_NUM_THREADS once.
  process.env.CMSEG_NUM_THREADS = String(threads);
  const { createModel, readSafetensors, saveCheckpoint, slidingWindowPredict, writeSafetensors } = await import('../src/index');

  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cmseg-bench-case-'));
  try {
    const model = createModel({ ndim: 3, inChannels: 4, classes: 4, annotators: 3, depth: 4, baseChannels: 16, cmMode: 'full', seed: 0 });
    const checkpoint = path.join(dir, 'model.safetensors');
    await saveCheckpoint(model, checkpoint);
    const [d, h, w] = size;
    let s = 1;
    const volume = Float32Array.from({ length: 4 * d * h * w }, () => ((s = (s * 1664525 + 1013904223) >>> 0) / 2147483648) - 1);
    const volumeFile = path.join(dir, 'volume.safetensors');
    await writeSafetensors(volumeFile, { volume: { data: volume, shape: [4, d, h, w] } });

    const cmsegSeconds: number[] = [];
    const torchSeconds: number[] = [];
    let ours: Float32Array | undefined;
    let windows = 0;
    let torchInfo: { threads?: number; torch?: string } = {};
    for (let run = 0; run < runs; run++) {
      const start = process.hrtime.bigint();
      const prediction = await slidingWindowPredict(model, volume, { d, h, w }, { patch: [patch, patch, patch], overlap, batchSize: batch, cms: true, annotatorProbs: true });
      cmsegSeconds.push(Number(process.hrtime.bigint() - start) / 1e9);
      windows = prediction.windows;
      if (run === 0) ours = prediction.probs;
      const args = { checkpoint, volume: volumeFile, patch: [patch, patch, patch], overlap, batch, threads, out: run === 0 ? path.join(dir, 'torch.safetensors') : undefined };
      const py = spawnSync('python3', ['-c', TORCH_SIDE, __dirname, JSON.stringify(args)], { encoding: 'utf8', maxBuffer: 1 << 26 });
      if (py.status !== 0) throw new Error(`python3 failed: ${py.stderr}`);
      const report = JSON.parse(py.stdout.trim().split('\n').pop()!);
      torchSeconds.push(report.seconds);
      torchInfo = report;
      console.log(`run ${run + 1}: cmseg ${cmsegSeconds[run].toFixed(1)} s, torch ${report.seconds.toFixed(1)} s (load average ${os.loadavg().map((x) => x.toFixed(2)).join(' ')})`);
    }
    const theirs = (await readSafetensors(path.join(dir, 'torch.safetensors'))).tensors.probs.data as Float32Array;
    let worst = 0;
    for (let i = 0; i < ours!.length; i++) worst = Math.max(worst, Math.abs(ours![i] - theirs[i]));
    await model.dispose();
    const result = {
      size, patch, overlap, batch, windows, threads, torch: torchInfo.torch, torchThreads: torchInfo.threads,
      cmsegSeconds: cmsegSeconds.map((x) => +x.toFixed(2)), torchSeconds: torchSeconds.map((x) => +x.toFixed(2)),
      cmsegMedian: +median(cmsegSeconds).toFixed(2), torchMedian: +median(torchSeconds).toFixed(2),
      ratioCmsegOverTorch: +(median(cmsegSeconds) / median(torchSeconds)).toFixed(3),
      maxProbsDifference: worst, loadAverage: os.loadavg().map((x) => +x.toFixed(2)),
    };
    console.log(JSON.stringify(result));
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

main().catch((e) => {
  console.error(e instanceof Error ? e.message : e);
  process.exit(1);
});
