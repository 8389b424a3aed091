// scripts/device-winners.py decides, from one device check's profiles, which untimed GPU
// options become defaults; the device session that runs it has no time to second-guess
// it, so its rule is checked here on hand-written profiles: an option is taken only when
// the layers it changes save more than 3% and its test_cuda cases passed.
import t from 'tap';
import * as fs from 'fs';
import * as path from 'path';
import { spawnSync } from 'child_process';
import { PYTHON } from './helpers/python';
import { tempDir } from './helpers/files';

const SCRIPT = path.join(__dirname, '..', 'scripts', 'device-winners.py');

// One profiled bench run as cmseg_bench_gpu prints it (Context::profile_report's rows).
function run(rows: Record<string, number>, cmLossMs = 0.86): string {
  const lines = ['device time by layer (CMSEG_GPU_PROFILE), per step:'];
  for (const [name, ms] of Object.entries(rows)) {
    lines.push(`  ${name.padEnd(28)} ${ms.toFixed(3).padStart(9)} ms/step   10.0%     10 calls`);
  }
  lines.push(`  ${'sum'.padEnd(28)} ${'77.808'.padStart(9)} ms/step (layer calls only)`);
  // Rows by shape share the layer's name: they must not count twice.
  lines.push('  conv3_backward_filter 32->32 128x128x128                12.501 ms/step   16.1%     10 calls');
  lines.push(`cmseg GPU brats3d-gpu (NVIDIA H100, tf32, ...): median 80.0 ms/step, 5e+07 voxels/s, 70000 GFLOP/s, peak 7631 MiB; cm_loss ${cmLossMs.toFixed(3)} ms, 2061 GB/s`);
  return lines.join('\n') + '\n';
}

const BASE = {
  conv3_backward_filter: 33.0,
  conv3_forward: 14.1,
  'conv3: NCDHW<->NDHWC copies': 5.0,
  'conv1_backward (heads fused)': 4.3,
  instance_norm_backward: 4.1,
  instance_norm_forward: 2.9,
  instance_norm_apply: 1.0,
  concat_forward: 0.94,
  concat_backward: 0.93,
  upconv2_forward: 0.88,
  upconv2_backward: 1.29,
  add_inplace: 0.53,
  cm_loss: 0.91,
};

// The own filter-gradient kernel's profile row (native/cuda/conv3_filter_grad.cu).
const OWN = 'conv3_backward_filter (own)';
const { conv3_backward_filter: _cudnnWgrad, ...withoutWgrad } = BASE;

const ALL_TESTS = [
  'conv3_own_filter_grad_matches_cpu',
  'conv3_wgrad_paths_match_cpu',
  'model_step_gpu_own_filter_grad_close_to_cpu',
  'heads_concat_ce_predict_match_cpu',
  'cm_loss_prefetch_kernel_matches_cpu',
  'cm_loss_staged_kernel_matches_cpu',
  'instance_norm_matches_cpu',
];

function decide(t: any, bench: string, tests: string[] = ALL_TESTS, failed: string[] = []) {
  const dir = tempDir(t, 'cmseg-winners-');
  const benchFile = path.join(dir, 'bench_gpu.txt');
  const testFile = path.join(dir, 'test_cuda.txt');
  const envFile = path.join(dir, 'winners.env');
  fs.writeFileSync(benchFile, bench);
  fs.writeFileSync(testFile, [...tests.map((n) => `2: ok ${n}`), ...failed.map((n) => `2: FAIL ${n}`)].join('\n') + '\n');
  const r = spawnSync(PYTHON, [SCRIPT, benchFile, testFile, envFile], { encoding: 'utf8' });
  t.equal(r.status, 0, r.stderr);
  const env: Record<string, string> = {};
  for (const line of fs.readFileSync(envFile, 'utf8').split('\n').filter(Boolean)) {
    const [k, v] = line.split('=');
    env[k] = v;
  }
  return { env, out: r.stdout };
}

const stage = (name: string, body: string) => `=== stage ${name}\n${body}`;

t.test('each option is taken on its own layers only, past the 3% margin', async (t) => {
  const bench = [
    'configure noise before any marker\n',
    stage('bench_gpu', run(BASE, 0.86)),
    // Own kernel (its own profile row): filter gradients 33 -> 20 ms, but the forward
    // happened to take another cuDNN path and ran slower: it must not count against it.
    stage('bench_gpu_wgrad_own', run({ ...withoutWgrad, [OWN]: 20.0, conv3_forward: 19.0 })),
    // Auto: cuDNN kept for some shapes (4 ms), the own kernel for the rest (15 ms).
    stage('bench_gpu_wgrad_auto', run({ ...BASE, conv3_backward_filter: 4.0, [OWN]: 15.0, 'conv3: NCDHW<->NDHWC copies': 4.0 })),
    stage('wgrad_run_depth', 'wgrad run depth: 8 planes\n' + run({ [OWN]: 21.0 }) + 'wgrad run depth: 32 planes\n' + run({ [OWN]: 18.0 })),
    // 1% faster: within the machine's noise, not taken.
    stage('bench_gpu_heads_fused', run({ ...BASE, 'conv1_backward (heads fused)': 4.26 })),
    stage('bench_gpu_concat_in_place', run({ ...BASE, concat_forward: 0.3, concat_backward: 0.3, upconv2_forward: 0.9, upconv2_backward: 1.3 })),
    stage(
      'cm_loss_prefetch',
      'cm_loss prefetch kernel: 0 blocks per SM\n' + run({ cm_loss: 0.8 }) + 'cm_loss prefetch kernel: 16 blocks per SM\n' + run({ cm_loss: 0.7 }),
    ),
    stage(
      'cm_loss_staged',
      'cm_loss staged kernel: 3 slots\n' + run({ cm_loss: 0.62 }) + 'cm_loss staged kernel: 2 slots\n' + run({ cm_loss: 0.6 }),
    ),
    stage(
      'instance_norm_grid',
      'instance norm grid: 8 blocks per SM\n' +
        run({ instance_norm_backward: 3.5, instance_norm_forward: 2.4, instance_norm_apply: 0.9 }) +
        'instance norm grid: 16 blocks per SM\n' +
        run({ instance_norm_backward: 3.9, instance_norm_forward: 2.8, instance_norm_apply: 1.0 }),
    ),
  ].join('');
  const { env, out } = decide(t, bench);
  t.same(env, {
    CMSEG_CONV_WGRAD: 'auto', // 23.0 against own's 25.0 and cuDNN's 38.0 (filter gradients + copies)
    CMSEG_WGRAD_RUN_D: '32', // 18 against own's 20 at the default depth
    CMSEG_CONCAT_IN_PLACE: '1', // 3.67 -> 3.33 ms (9%)
    CMSEG_CM_LOSS_KERNEL: 'staged',
    CMSEG_CM_LOSS_STAGES: '2',
    CMSEG_IN_BLOCKS_PER_SM: '8',
  });
  t.match(out, /1x1 heads backward: default 4\.300 ms\/step, fused 4\.260; kept the default \(best saves 0\.9%/);
  t.match(out, /conv3 filter gradients \+ layout copies: default 38\.000 ms\/step, own 25\.000, auto 23\.000; TAKE auto/);
  t.match(out, /^winners env: CMSEG_CONV_WGRAD=auto /m);
});

t.test("a slower own kernel is not taken, and a failed stage's runs are left out", async (t) => {
  const bench =
    stage('bench_gpu', run(BASE)) +
    // The own kernel takes 45 ms where cuDNN took 33: its row must count.
    stage('bench_gpu_wgrad_own', run({ ...withoutWgrad, [OWN]: 45.0 })) +
    '=== end of stage bench_gpu_wgrad_own: ok\n' +
    // Cut short (its rows say little): a timeout's runs do not compete.
    stage('bench_gpu_heads_fused', run({ ...BASE, 'conv1_backward (heads fused)': 0.5 })) +
    '=== end of stage bench_gpu_heads_fused: TIMEOUT after 60s\n';
  const { env, out } = decide(t, bench);
  t.same(env, {});
  t.match(out, /conv3 filter gradients \+ layout copies: default 38\.000 ms\/step, own 50\.000; kept the default/);
  t.match(out, /1x1 heads backward: default 4\.300 ms\/step, no candidate ran; kept the default/);
});

t.test('a faster option whose test_cuda cases did not pass stays off', async (t) => {
  const bench =
    stage('bench_gpu', run(BASE)) +
    stage('bench_gpu_wgrad_own', run({ ...withoutWgrad, [OWN]: 15.0 })) +
    stage('bench_gpu_concat_in_place', run({ ...BASE, concat_forward: 0.1, concat_backward: 0.1 }));
  const tests = ALL_TESTS.filter((n) => n !== 'model_step_gpu_own_filter_grad_close_to_cpu' && n !== 'heads_concat_ce_predict_match_cpu');
  const { env, out } = decide(t, bench, tests, ['heads_concat_ce_predict_match_cpu']);
  t.same(env, {});
  t.match(out, /own saves [0-9.]+% but test_cuda did not pass model_step_gpu_own_filter_grad_close_to_cpu/);
  t.match(out, /in place saves [0-9.]+% but test_cuda did not pass heads_concat_ce_predict_match_cpu/);
  t.match(out, /winners env: \(none: the defaults stand\)/);
});

t.test('the CM loss falls back to the bench line when the profile row was filtered out', async (t) => {
  const { cm_loss: _, ...withoutLoss } = BASE;
  const base = run(withoutLoss, 0.86);
  const staged = 'cm_loss staged kernel: 3 slots\n' + run({}, 0.5);
  const { env, out } = decide(t, stage('bench_gpu', base) + stage('cm_loss_staged', staged));
  t.same(env, { CMSEG_CM_LOSS_KERNEL: 'staged', CMSEG_CM_LOSS_STAGES: '3' });
  t.match(out, /fused CM loss call: default 0\.860 ms\/step, staged \(3 slots\) 0\.500/);
});

t.test('without the default run nothing is chosen', async (t) => {
  const { env, out } = decide(t, stage('bench_gpu_wgrad_own', run({ conv3_backward_filter: 1 })));
  t.same(env, {});
  t.match(out, /no default run/);
});
