// One benchmark run of cmseg in its own process (so peak RSS is this run's):
// `node dist/bench/worker.js CONFIG STEPS WARMUP [bf16]` prints one JSON line. A step is a
// training step, or for the configs of kind 'predict' one forward pass (p and each q_r).
import { benchConfig } from './configs';
import { createModel, backendInfo } from '../model/model';

/**
 * Exits when the `cmseg bench` that started this one is gone (CMSEG_BENCH_PARENT, its pid, no
 * longer names a process). It waits in spawnSync and cannot pass on a SIGTERM or `kill` it
 * gets; the worker it left ran all its steps, for up to the 30-minute limit on a shared
 * machine, for nobody. Checked each second, unref'd.
 */
function exitWithParent(): void {
  const parent = Number(process.env.CMSEG_BENCH_PARENT);
  if (!Number.isSafeInteger(parent) || parent <= 1) return;
  setInterval(() => {
    try {
      process.kill(parent, 0);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ESRCH') process.exit(143);
    }
  }, 1000).unref();
}

async function main() {
  exitWithParent();
  const [name, stepsArg, warmupArg, precision] = process.argv.slice(2);
  const c = benchConfig(name);
  const steps = Number(stepsArg ?? 5);
  const warmup = Number(warmupArg ?? 1);
  const gpu = c.device === 'gpu';
  const model = createModel({ ...c.model, device: gpu ? 'cuda' : 'cpu', ...(precision === 'bf16' ? { bf16: true } : {}) });
  const [n, , ...spatial] = c.shape;
  const V = spatial.reduce((a, b) => a * b, 1);
  let s = 12345;
  const rand = () => ((s = (s * 1664525 + 1013904223) >>> 0) / 4294967296);
  const images = new Float32Array(n * c.shape[1] * V).map(() => rand() * 2 - 1);
  const labels = c.kind === 'predict' ? [] : Array.from({ length: c.model.annotators }, () => new Uint8Array(n * V).map(() => Math.floor(rand() * c.model.classes)));
  const stepMs: number[] = [];
  for (let i = 0; i < warmup + steps; i++) {
    const t0 = process.hrtime.bigint();
    if (c.kind === 'predict') await model.predict(images, c.shape, { annotatorProbs: true });
    else await model.trainStep({ images, shape: c.shape, labels });
    if (i >= warmup) stepMs.push(Number(process.hrtime.bigint() - t0) / 1e6);
    // Peak device memory of the timed steps only, on both sides (torch_reference.py
    // resets after its warm-up too): the first step's convolution-algorithm search
    // borrows a workspace no later step holds.
    if (gpu && i === warmup - 1) model.resetPeakMemory();
  }
  const peakRssMB = process.resourceUsage().maxRSS / 1024;
  // A GPU model's peak is its device pool's (what torch.cuda.max_memory_allocated reports on the other side).
  const memory = model.memory();
  const peakGpuMB = memory.device === 'cuda' ? memory.peakInUseMB : undefined;
  console.log(JSON.stringify({ ok: true, config: name, stepMs, peakRssMB, peakGpuMB, threads: backendInfo().threads, parameters: model.parameters() }));
}

main().catch((e) => {
  console.log(JSON.stringify({ ok: false, error: (e as Error).message }));
  process.exit(1);
});
