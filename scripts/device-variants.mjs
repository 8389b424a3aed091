#!/usr/bin/env node
// The users' training loop (dist/bench/worker.js: trainStep through Node, as `cmseg
// bench` times it) under each conv3 option that may become the default, one process
// per option, so that the choice rests on the loop period users see, not on the
// native bench's synchronised steps. Each line: the option, the median step (ms),
// every timed step, and the device pool's peak. Run by scripts/device-check.sh
// (stage node_variants) with CMSEG_ADDON pointing at the CUDA addon.
//   node scripts/device-variants.mjs [CONFIG] [STEPS] [ROUNDS]
import { spawnSync } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const [config = 'brats3d-gpu', steps = '5', rounds = '1'] = process.argv.slice(2);
const worker = path.join(root, 'dist', 'bench', 'worker.js');

// name, environment, precision
const variants = [
  ['default (conv3 path timed per shape)', {}, 'tf32'],
  ["conv3 filter gradients through our own kernel (CMSEG_CONV_WGRAD=own)", { CMSEG_CONV_WGRAD: 'own' }, 'tf32'],
  ['conv3 filter gradients, own kernel or cuDNN per shape (CMSEG_CONV_WGRAD=auto)', { CMSEG_CONV_WGRAD: 'auto' }, 'tf32'],
  [
    'all candidates (CMSEG_CONV_WGRAD=auto, CMSEG_HEADS_WGRAD=fused, CMSEG_CONCAT_IN_PLACE=1, CMSEG_CM_LOSS_KERNEL=prefetch)',
    { CMSEG_CONV_WGRAD: 'auto', CMSEG_HEADS_WGRAD: 'fused', CMSEG_CONCAT_IN_PLACE: '1', CMSEG_CM_LOSS_KERNEL: 'prefetch' },
    'tf32',
  ],
  ['legacy API on channels-last copies (CMSEG_CONV_AUTOTUNE=0)', { CMSEG_CONV_AUTOTUNE: '0' }, 'tf32'],
  ["heads' weight gradients in one fused pass (CMSEG_HEADS_WGRAD=fused)", { CMSEG_HEADS_WGRAD: 'fused' }, 'tf32'],
  ['up-convolutions written into the concat buffers (CMSEG_CONCAT_IN_PLACE=1)', { CMSEG_CONCAT_IN_PLACE: '1' }, 'tf32'],
  ['both candidates', { CMSEG_HEADS_WGRAD: 'fused', CMSEG_CONCAT_IN_PLACE: '1' }, 'tf32'],
  ['bf16 convolutions', {}, 'bf16'],
];

const median = (a) => [...a].sort((x, y) => x - y)[Math.floor(a.length / 2)];
let failed = 0;
for (let r = 0; r < Number(rounds); r++)
  for (const [name, env, precision] of variants) {
    const run = spawnSync(process.execPath, [worker, config, steps, '1', precision], {
      env: { ...process.env, ...env },
      encoding: 'utf8',
      timeout: 120_000,
    });
    const last = (run.stdout || '').trim().split('\n').pop() || '{}';
    let out;
    try {
      out = JSON.parse(last);
    } catch {
      out = { ok: false, error: `no JSON (exit ${run.status}): ${(run.stderr || '').slice(-300)}` };
    }
    if (!out.ok) {
      failed++;
      console.log(`variant ${name} [${precision}]: FAILED ${out.error}`);
      continue;
    }
    const ms = out.stepMs.map((x) => Math.round(x * 10) / 10);
    console.log(
      `variant ${name} [${precision}]: median ${median(out.stepMs).toFixed(1)} ms, steps ${JSON.stringify(ms)}, ` +
        `peak ${out.peakGpuMB?.toFixed(0)} MiB${Number(rounds) > 1 ? ` (round ${r + 1})` : ''}`,
    );
  }
process.exit(failed ? 1 : 0);
