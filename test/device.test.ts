// Device selection through the API: 'cpu', 'auto' and 'cuda' resolve as
// backendInfo() says they can, and a machine without a usable GPU gets an error
// naming the reason instead of a silent CPU run. On a GPU machine the same
// tests check that a 'cuda' model reports its device memory.
import t from 'tap';
import * as path from 'path';
import { spawnSync } from 'child_process';
import { backendInfo, createModel } from '../src/index';

const small = { ndim: 2 as const, inChannels: 1, classes: 2, annotators: 2, depth: 2, baseChannels: 4 };

t.test('a CPU model reports its device and no GPU memory', async (t) => {
  const m = createModel({ ...small, device: 'cpu' });
  t.equal(m.config.device, 'cpu');
  t.same(m.memory(), { device: 'cpu' });
});

t.test('backendInfo lists the GPU precision modes exactly when CUDA training is built', async (t) => {
  const info = backendInfo();
  t.same(info.gpuPrecisions, info.cudaTraining ? ['fp32', 'tf32', 'bf16'] : []);
});

t.test('backendInfo says why no GPU is usable, a build without CUDA included', async (t) => {
  const info = backendInfo();
  if (info.gpuAvailable) {
    t.equal(info.gpuUnavailableReason, undefined);
    t.type(info.gpu, 'string');
  } else {
    t.match(info.gpuUnavailableReason, info.cuda ? /\S/ : /no CUDA backend/);
    t.equal(info.gpu, null);
  }
});

t.test("'auto' picks the GPU exactly when one is usable", async (t) => {
  const info = backendInfo();
  const m = createModel({ ...small, device: 'auto' });
  t.equal(m.config.device, info.gpuAvailable ? 'cuda' : 'cpu');
});

t.test("'cuda' without a usable GPU fails with the reason; with one it trains and reports memory", async (t) => {
  const info = backendInfo();
  if (!info.gpuAvailable) {
    t.throws(() => createModel({ ...small, device: 'cuda' }), /cuda/i);
    return;
  }
  const m = createModel({ ...small, device: 'cuda' });
  t.equal(m.config.device, 'cuda');
  const n = 2, V = 16 * 16;
  const images = new Float32Array(n * V).map((_, i) => Math.sin(i));
  const labels = [0, 1].map(() => new Uint8Array(n * V).map((_, i) => (images[i] > 0 ? 1 : 0)));
  const r = await m.trainStep({ images, shape: [n, 1, 16, 16], labels });
  t.ok(Number.isFinite(r.loss));
  const mem = m.memory();
  t.equal(mem.device, 'cuda');
  t.ok((mem.peakInUseMB ?? 0) > 0, `peak device memory ${mem.peakInUseMB} MB`);
});

t.test('the GPU precision flags are kept in the config and checked for type', async (t) => {
  const m = createModel({ ...small, device: 'cpu', bf16: true, tf32: false });
  t.equal(m.config.bf16, true);
  t.equal(m.config.tf32, false);
  t.equal(createModel({ ...small, device: 'cpu' }).config.bf16, false, 'bf16 is off unless asked for');
  t.throws(() => createModel({ ...small, bf16: 'yes' as never }), /config\.bf16 must be a boolean/);
  m.resetPeakMemory(); // a no-op on the CPU
  t.same(m.memory(), { device: 'cpu' });
});

t.test('an unknown device is rejected by name', async (t) => {
  t.throws(() => createModel({ ...small, device: 'tpu' as never }), /device/);
});

t.test('the device smoke script runs its checks (two CPU models under --dry-run)', async (t) => {
  const script = path.join(__dirname, '..', 'scripts', 'device-smoke.mjs');
  const r = spawnSync(process.execPath, [script, '--dry-run'], { encoding: 'utf8', timeout: 120_000 });
  t.equal(r.status, 0, r.stderr);
  const last = JSON.parse(r.stdout.trim().split('\n').pop()!);
  t.equal(last.ok, true);
  const cases = (last.results as { case: string }[]).map((r) => r.case);
  t.equal(cases.filter((c) => c !== 'sliding-window').length, 6, 'six cases: 2D full/lowrank/global/head block/plain CE, 3D full');
  t.equal(cases.filter((c) => c === 'sliding-window').length, 3, 'and the sliding window: probs, cms, annotatorProbs');
});

// CI builds the addon over the host emulation of the CUDA layer API (CMake option
// CMSEG_CUDA_EMULATION, .ci/run): there the same smoke script drives a real
// `device: 'cuda'` model through the bindings (device resolution, parameter sync via
// setWeights/getWeights, memory(), gpuMemoryLimitMB and the out-of-memory path).
const emulated = process.env.CMSEG_EMULATED_ADDON;
t.test(
  "the smoke script passes on the emulated GPU addon ('cuda' models through the bindings)",
  { skip: emulated ? false : 'CMSEG_EMULATED_ADDON is not set (.ci/run builds it in build-emu)' },
  async (t) => {
    const script = path.join(__dirname, '..', 'scripts', 'device-smoke.mjs');
    const r = spawnSync(process.execPath, [script], { encoding: 'utf8', timeout: 300_000, env: { ...process.env, CMSEG_ADDON: emulated } });
    t.equal(r.status, 0, r.stdout.split('\n').filter((l) => l.startsWith('FAIL')).join('\n') || r.stderr);
    t.match(r.stdout, /GPU host emulation/, 'ran on the emulated device');
    const last = JSON.parse(r.stdout.trim().split('\n').pop()!);
    t.equal(last.ok, true);
    t.equal(last.results.length, 9, 'six cases and the sliding window\'s three outputs');
    t.match(r.stdout, /ok {3}sliding window: cms through reused output arrays vs fresh ones/);
    t.match(r.stdout, /ok {3}out of memory: rejected with "GPU out of memory/);
    t.match(r.stdout, /ok {3}refused update: the next step rejected with "optimiser step 2 was not applied/);
  },
);
