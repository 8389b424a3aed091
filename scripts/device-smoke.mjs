// The addon on a GPU machine, through the public API (no test framework needed:
// the device check carries only a Node binary, dist/ and the addon it builds).
//
//   CMSEG_ADDON=build-device/cmseg.node node scripts/device-smoke.mjs
//
// For each case a CPU model and a `device: 'cuda'` model (strict fp32, tf32 off)
// start from the same weights (copied CPU -> GPU with setWeights, which also
// exercises the parameter sync). Checked, with the tolerances printed:
//   gradients of one computeGradients (relative L2 per tensor),
//   losses of 3 trainSteps and the weights after them,
//   predict: probabilities, CMs and annotator distributions,
//   getGradients/getOptimizerState after GPU steps (host copy refreshed),
//   sliding-window inference of a volume (pipelined, outputs into reused arrays).
// Prints one line per check and a last JSON line; exits 1 on any failure or when
// no GPU can be used. `--dry-run` compares two CPU models instead (to try the
// script itself on a machine without a GPU; test/device.test.ts runs it so).
import { createRequire } from 'module';

const require = createRequire(import.meta.url);
// The model module alone: dist/index.js also loads the CLI's progress bars (an npm dependency).
const cmseg = require('../dist/model/model.js');

const GRAD_TOL = 1e-4; // relative L2 per gradient tensor (fp32 vs fp32, different summation orders)
const WEIGHT_TOL = 1e-4; // relative L2 per weight tensor after 3 Adam steps (eps 1e-3, see below)
const PROB_TOL = 1e-4; // max abs difference of probabilities / CM entries

const dryRun = process.argv.includes('--dry-run');
const failures = [];
const results = [];
const check = (ok, line) => {
  console.log(`${ok ? 'ok  ' : 'FAIL'} ${line}`);
  if (!ok) failures.push(line);
};

function relL2(a, b) {
  let num = 0, den = 0;
  for (let i = 0; i < a.length; i++) {
    num += (a[i] - b[i]) ** 2;
    den += b[i] ** 2;
  }
  return Math.sqrt(num) / Math.max(Math.sqrt(den), 1e-12);
}

function maxAbs(a, b) {
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]));
  return m;
}

function batchFor(cfg, n, size, seed) {
  let s = seed >>> 0;
  const rand = () => ((s = (s * 1664525 + 1013904223) >>> 0) / 4294967296);
  const spatial = cfg.ndim === 3 ? [size, size, size] : [size, size];
  const V = spatial.reduce((a, b) => a * b, 1);
  const images = new Float32Array(n * cfg.inChannels * V).map(() => rand() * 2 - 1);
  const labels = Array.from({ length: cfg.annotators }, () =>
    new Uint8Array(n * V).map(() => (rand() < 0.1 ? 255 : Math.floor(rand() * cfg.classes))),
  );
  const present = new Uint8Array(n * cfg.annotators).fill(1);
  if (n > 1) present[cfg.annotators] = 0; // annotator 0 did not label image 1
  const target = new Uint8Array(n * V).map(() => Math.floor(rand() * cfg.classes));
  // The batch the CM loss takes; `target` (one label map) is for the plain-CE cases.
  return { batch: { images, shape: [n, cfg.inChannels, ...spatial], labels, present }, target };
}

async function runCase(name, cfg, n, size, plainCe = false) {
  const t0 = Date.now();
  // Adam eps 1e-3: with the default 1e-8 a gradient that is zero up to rounding
  // can flip the sign of its first update on one side only (a 2 * lr difference).
  const optimizer = { lr: 1e-3, eps: 1e-3 };
  const cpu = cmseg.createModel({ ...cfg, device: 'cpu', optimizer });
  const device = dryRun ? 'cpu' : 'cuda';
  const gpu = cmseg.createModel({ ...cfg, device, tf32: false, optimizer, seed: 999 });
  if (gpu.config.device !== device) throw new Error(`${name}: device '${device}' resolved to ${gpu.config.device}`);
  gpu.setWeights(cpu.getWeights());
  const b = batchFor(cfg, n, size, 11);
  // One of labels (CM loss) or target (plain CE) per batch, as the API requires.
  const batch = plainCe ? { images: b.batch.images, shape: b.batch.shape, target: b.target } : b.batch;

  const gc = await cpu.computeGradients(batch);
  const gg = await gpu.computeGradients(batch);
  check(Math.abs(gc.loss - gg.loss) <= 1e-5 * Math.max(1, Math.abs(gc.loss)), `${name}: loss ${gg.loss} vs CPU ${gc.loss}`);
  const dc = cpu.getGradients(), dg = gpu.getGradients();
  let worst = 0, worstName = '';
  for (const k of Object.keys(dc)) {
    const e = relL2(dg[k], dc[k]);
    if (e > worst) (worst = e), (worstName = k);
  }
  check(worst <= GRAD_TOL, `${name}: gradients, worst relative L2 ${worst.toExponential(2)} (${worstName}) <= ${GRAD_TOL}`);
  const gradWorst = worst;

  for (let step = 0; step < 3; step++) {
    const rc = await cpu.trainStep(batch);
    const rg = await gpu.trainStep(batch);
    check(Math.abs(rc.loss - rg.loss) <= 1e-4 * Math.max(1, Math.abs(rc.loss)), `${name}: step ${step + 1} loss ${rg.loss} vs CPU ${rc.loss}`);
  }
  const wc = cpu.getWeights(), wg = gpu.getWeights();
  worst = 0;
  for (const k of Object.keys(wc)) {
    const e = relL2(wg[k], wc[k]);
    if (e > worst) (worst = e), (worstName = k);
  }
  check(worst <= WEIGHT_TOL, `${name}: weights after 3 steps, worst relative L2 ${worst.toExponential(2)} (${worstName}) <= ${WEIGHT_TOL}`);
  const oc = cpu.getOptimizerState(), og = gpu.getOptimizerState();
  check(oc.step === og.step, `${name}: optimiser step ${og.step} vs CPU ${oc.step}`);

  const pc = await cpu.predict(b.batch.images, b.batch.shape, { cms: true, annotatorProbs: true });
  const pg = await gpu.predict(b.batch.images, b.batch.shape, { cms: true, annotatorProbs: true });
  const dp = Math.max(maxAbs(pg.probs, pc.probs), maxAbs(pg.cms, pc.cms), maxAbs(pg.annotatorProbs, pc.annotatorProbs));
  check(dp <= PROB_TOL, `${name}: predict (probs, CMs, q), max abs difference ${dp.toExponential(2)} <= ${PROB_TOL}`);
  // Without cms or annotatorProbs the CM heads are skipped: the same probabilities up to
  // rounding. Not bit for bit on a GPU: with the CM heads the 1x1 heads run as one fused
  // kernel (conv1_forward_heads packs two or more heads), the consensus head alone as a
  // cuBLAS GEMM, which sums its products in another order.
  const plain = await gpu.predict(b.batch.images, b.batch.shape);
  const dplain = maxAbs(plain.probs, pg.probs);
  check(dplain <= 1e-5 && plain.cms === undefined && plain.annotatorProbs === undefined, `${name}: predict without CMs gives the same probabilities (max abs difference ${dplain.toExponential(2)} <= 1e-5) and no CMs`);
  const mem = gpu.memory();
  if (!dryRun) {
    check(mem.peakInUseMB >= mem.inUseMB && mem.inUseMB > 0, `${name}: memory() peak ${mem.peakInUseMB?.toFixed(1)} MB >= in use ${mem.inUseMB?.toFixed(1)} MB > 0`);
    // releaseBuffers() (what ensemble() calls between members): the batch and prediction
    // buffers go back to the pool, the parameters stay, and the next prediction is the same.
    await gpu.releaseBuffers();
    const released = gpu.memory();
    const again = await gpu.predict(b.batch.images, b.batch.shape, { cms: true, annotatorProbs: true });
    const dr = Math.max(maxAbs(again.probs, pg.probs), maxAbs(again.cms, pg.cms));
    check(released.inUseMB < mem.inUseMB && dr <= 1e-6,
      `${name}: releaseBuffers() in use ${mem.inUseMB?.toFixed(2)} -> ${released.inUseMB?.toFixed(2)} MB; the prediction after it within ${dr.toExponential(2)} of the one before`);
  }
  results.push({ case: name, gradWorst, weightWorst: worst, predictMaxAbs: dp, peakGpuMB: mem.peakInUseMB, seconds: (Date.now() - t0) / 1e3 });
}

// GPU out of memory through the API: a rejected Promise naming it, and the model
// (and process) still usable with a batch that fits, its step the CPU's (a CPU model
// from the same weights that never saw the big batch).
async function outOfMemory() {
  const cfg = { ndim: 2, inChannels: 1, classes: 2, annotators: 2, depth: 3, baseChannels: 8, device: 'cuda', gpuMemoryLimitMB: 64, tf32: false };
  try {
    const m = cmseg.createModel(cfg);
    const cpu = cmseg.createModel({ ...cfg, device: 'cpu' });
    m.setWeights(cpu.getWeights());
    const big = batchFor(cfg, 16, 512, 3).batch; // 4M pixels: far more than 64 MiB of activations
    let message = '';
    await m.trainStep(big).catch((e) => (message = e.message));
    check(/GPU out of memory/.test(message), `out of memory: rejected with "${message.slice(0, 120)}"`);
    // The failed step gave its buffers back, so its peak lies above what is in use.
    const after = m.memory();
    m.resetPeakMemory();
    const reset = m.memory();
    check(after.peakInUseMB > after.inUseMB && reset.peakInUseMB === reset.inUseMB,
      `out of memory: resetPeakMemory() starts the peak again at what is in use (${after.peakInUseMB?.toFixed(1)} -> ${reset.peakInUseMB?.toFixed(1)} MB)`);
    const small = batchFor(cfg, 1, 16, 4).batch;
    const r = await m.trainStep(small);
    const rc = await cpu.trainStep(small);
    check(Number.isFinite(r.loss), `out of memory: a small batch trains afterwards (loss ${r.loss})`);
    const wc = cpu.getWeights(), wg = m.getWeights();
    const wWorst = Math.max(...Object.keys(wc).map((k) => relL2(wg[k], wc[k])));
    check(Math.abs(r.loss - rc.loss) <= 1e-5 * Math.max(1, Math.abs(rc.loss)) && r.step === 1 && rc.step === 1 && wWorst <= WEIGHT_TOL,
      `out of memory: that step is the CPU's (loss ${r.loss} vs ${rc.loss}, step ${r.step}, weights within ${wWorst.toExponential(2)})`);
  } catch (err) {
    check(false, `out of memory: ${err.message}`);
  }
}

// A gradient whose square overflows float32 (lambda 1e30): the device skips the update,
// and the next call that reads the device rejects naming it, the weights and step count
// as before the refused step; the model trains on with a sane lambda. A CPU model that
// took the same steps is the truth: its refused step names the same gradient (parameter,
// index, value), and after the refusal (and a setWeights on both: the first one on the GPU
// model is the call that reports it) the two hold the same weights, Adam moments and step
// count and train on alike.
async function refusedUpdate() {
  const cfg = { ndim: 2, inChannels: 1, classes: 3, annotators: 2, depth: 2, baseChannels: 4, tf32: false };
  const optimizer = { lr: 1e-3, eps: 1e-3 };
  try {
    const m = cmseg.createModel({ ...cfg, device: 'cuda', optimizer });
    const cpu = cmseg.createModel({ ...cfg, device: 'cpu', optimizer });
    m.setWeights(cpu.getWeights());
    const { batch } = batchFor(cfg, 2, 16, 5);
    await m.trainStep(batch);
    await cpu.trainStep(batch);
    const before = m.getWeights();
    m.setLoss({ lambda: 1e30 });
    cpu.setLoss({ lambda: 1e30 });
    let cpuMessage = '';
    await cpu.trainStep(batch).catch((e) => (cpuMessage = e.message));
    await m.trainStep(batch); // the device's verdict is not waited for
    let message = '';
    await m.trainStep(batch).catch((e) => (message = e.message));
    check(/optimiser step 2 was not applied: the gradient of \S+ is \S+: beyond 1\.8e\+19 its square overflows float32/.test(message),
      `refused update: the next step rejected with "${message.slice(0, 100)}"`);
    const words = (text) => (/the gradient of \S+ is [^:]+/.exec(text) || ['(none)'])[0];
    check(words(message) === words(cpuMessage), `refused update: names the CPU's gradient ("${words(message)}" vs CPU "${words(cpuMessage)}")`);
    const after = m.getWeights();
    const changed = Object.keys(before).filter((k) => maxAbs(after[k], before[k]) !== 0);
    check(changed.length === 0 && m.getOptimizerState().step === 1, `refused update: weights unchanged (${changed.length} tensors differ), step ${m.getOptimizerState().step}`);
    // Refused again, then a setWeights: that call reports it (once); repeated, it applies.
    await m.trainStep(batch);
    const edited = cpu.getWeights();
    edited['seg.bias'][0] = 0.5;
    let setMessage = '';
    try {
      m.setWeights(edited);
    } catch (e) {
      setMessage = e.message;
    }
    m.setWeights(edited);
    cpu.setWeights(edited);
    const sc = cpu.getOptimizerState(), sg = m.getOptimizerState();
    const stateWorst = Math.max(...Object.keys(sc.m).map((k) => Math.max(relL2(sg.m[k], sc.m[k]), relL2(sg.v[k], sc.v[k]))));
    check(/optimiser step 2 was not applied/.test(setMessage) && sg.step === 1 && sc.step === 1 && stateWorst <= 1e-5,
      `refused update: setWeights after it reports it ("${setMessage.slice(0, 40)}"), then applies; step ${sg.step} vs CPU ${sc.step}, Adam moments within ${stateWorst.toExponential(2)} of the CPU's`);
    m.setLoss({ lambda: 0.01 });
    cpu.setLoss({ lambda: 0.01 });
    const r = await m.trainStep(batch);
    const rc = await cpu.trainStep(batch);
    const v = m.getOptimizerState().v;
    check(Number.isFinite(r.loss) && r.step === 2 && Object.values(v).every((a) => a.every(Number.isFinite)),
      `refused update: trains on afterwards (loss ${r.loss}, step ${r.step}, Adam state finite)`);
    const wc = cpu.getWeights(), wg = m.getWeights();
    const wWorst = Math.max(...Object.keys(wc).map((k) => relL2(wg[k], wc[k])));
    check(Math.abs(r.loss - rc.loss) <= 1e-5 * Math.max(1, Math.abs(rc.loss)) && r.step === rc.step && wWorst <= WEIGHT_TOL,
      `refused update: the step after it is the CPU's (loss ${r.loss} vs ${rc.loss}, weights within ${wWorst.toExponential(2)})`);
    m.dispose();
  } catch (err) {
    check(false, `refused update: ${err.message}`);
  }
}

// Sliding-window inference of a whole volume (the path of `cmseg predict`): the GPU model
// pipelines its batches (the next predicted while the last is stitched) and writes them into
// two reused sets of output arrays (model.ts's predictInto); the CPU model, from the same
// weights, writes one set. Compared with the CPU's (PROB_TOL), and with the GPU model's own
// predictions in fresh arrays (a plain object is not the Model: the old path), which must
// agree to rounding: a set overwritten while still being stitched would differ by far more.
async function slidingWindow() {
  const { slidingWindowPredict } = require('../dist/model/sliding-window.js');
  const cfg = { ndim: 3, inChannels: 2, classes: 3, annotators: 2, depth: 3, baseChannels: 8, cmMode: 'full' };
  const cpu = cmseg.createModel({ ...cfg, device: 'cpu' });
  const gpu = cmseg.createModel({ ...cfg, device: dryRun ? 'cpu' : 'cuda', tf32: false, seed: 5 });
  try {
    gpu.setWeights(cpu.getWeights());
    const extent = { d: 20, h: 24, w: 36 };
    let s = 29;
    const data = new Float32Array(cfg.inChannels * extent.d * extent.h * extent.w).map(() => ((s = (s * 1664525 + 1013904223) >>> 0) / 4294967296) * 2 - 1);
    const options = { patch: [16, 16, 16], overlap: 0.5, batchSize: 3, cms: true, annotatorProbs: true };
    const onCpu = await slidingWindowPredict(cpu, data, extent, options);
    const onGpu = await slidingWindowPredict(gpu, data, extent, options);
    const fresh = await slidingWindowPredict({ config: gpu.config, predict: (...a) => gpu.predict(...a) }, data, extent, options);
    for (const k of ['probs', 'cms', 'annotatorProbs']) {
      const d = maxAbs(onGpu[k], onCpu[k]);
      check(d <= PROB_TOL, `sliding window (${onGpu.windows} windows, batches of 3, pipelined on the GPU): ${k} max |GPU - CPU| ${d.toExponential(2)} <= ${PROB_TOL}`);
      const own = maxAbs(onGpu[k], fresh[k]);
      check(own <= 1e-6, `sliding window: ${k} through reused output arrays vs fresh ones, max diff ${own.toExponential(2)} <= 1e-6`);
      results.push({ case: 'sliding-window', output: k, maxAbsVsCpu: d, maxAbsReusedVsFresh: own });
    }
  } finally {
    await cpu.dispose();
    await gpu.dispose();
  }
}

async function main() {
  const info = cmseg.backendInfo();
  console.log(`backend: cuda built ${info.cuda}, GPU ${info.gpuAvailable ? info.gpu : `unavailable (${info.gpuUnavailableReason || 'CUDA backend not built'})`}, cuDNN ${info.cudnnVersion}`);
  if (!info.gpuAvailable && !dryRun) {
    console.log(JSON.stringify({ ok: false, error: 'no usable GPU', reason: info.gpuUnavailableReason || 'CUDA backend not built' }));
    process.exit(1);
  }
  const base2 = { ndim: 2, inChannels: 1, classes: 3, annotators: 2, depth: 3, baseChannels: 8 };
  const base3 = { ndim: 3, inChannels: 2, classes: 4, annotators: 3, depth: 3, baseChannels: 8 };
  const cases = [
    ['2d-full', { ...base2, cmMode: 'full' }, 2, 32],
    ['2d-lowrank', { ...base2, cmMode: 'lowrank', cmRank: 2 }, 2, 32],
    ['2d-global', { ...base2, cmMode: 'global' }, 2, 32],
    ['2d-full-headblock', { ...base2, cmMode: 'full', cmHeadBlocks: 1 }, 2, 32],
    ['2d-plain-ce', { ...base2 }, 2, 32, true],
    ['3d-full', { ...base3, cmMode: 'full' }, 2, 16],
  ];
  for (const [name, cfg, n, size, plain] of cases) {
    try {
      await runCase(name, cfg, n, size, plain);
    } catch (err) {
      check(false, `${name}: ${err.message}`);
    }
  }
  try {
    await slidingWindow();
  } catch (err) {
    check(false, `sliding window: ${err.message}`);
  }
  if (!dryRun) {
    await outOfMemory();
    await refusedUpdate();
  }
  console.log(JSON.stringify({ ok: failures.length === 0, failures, results }));
  process.exit(failures.length ? 1 : 0);
}

main();
