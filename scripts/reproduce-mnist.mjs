#!/usr/bin/env node
// Reproduces the MNIST rows of the paper's Tables 1-2 at CPU scale: every method of SPEC
// section 4 in dense and single label mode, over three seeds, then results/mnist.md with
// Dice (mean +- std over seeds) and the CM estimation error, plus the exact commands.
//
//   npm run build:ts && node scripts/reproduce-mnist.mjs            # about 30 min on 2 cores
//   node scripts/reproduce-mnist.mjs --smoke --out /tmp/smoke.md    # seconds: proves the pipeline
//
// Scale: preset `mnist-quick` (U-Net depth 3, c 8; 1,280 training, 200 validation and 500
// test images; 4 epochs = 160 steps of batch 32), not the paper's depth-4 c-32 network on
// the full set. `oracle` learns from the consensus, which does not depend on the label
// mode, so it is trained once per seed and shown in both tables: 39 runs in all.
//
// Finished runs (with eval-test.json) are skipped and interrupted ones resumed, so the
// script can be stopped and started again.

import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { cpus, platform, release } from 'node:os';
import { dirname, join, relative, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { createRequire } from 'node:module';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const cli = join(root, 'dist', 'cli', 'main.js');

const METHODS = [
  ['cm', 'Ours (pixel-wise CMs, trace)'],
  ['cm-lowrank', 'Ours with low-rank CMs'],
  ['cm-global', 'Ours with global CMs'],
  ['cm-notrace', 'Ours without trace'],
  ['naive-mean', 'Naive CNN on mean labels'],
  ['naive-mode', 'Naive CNN on mode labels'],
  ['naive-staple', 'Naive CNN on STAPLE labels'],
  ['naive-spatial-staple', 'Naive CNN on Spatial STAPLE labels'],
  ['oracle', 'Oracle (trained on the consensus)'],
];
const LEARNS_CMS = new Set(['cm', 'cm-lowrank', 'cm-global', 'cm-notrace']);
const MODES = ['dense', 'single'];

function usage(code) {
  process.stdout.write(`usage: node scripts/reproduce-mnist.mjs [--smoke] [--seeds 0,1,2] [--runs DIR] [--out FILE]

  --smoke        a seconds-long check of the whole pipeline (preset mnist-tiny, 4 steps, one seed)
  --seeds LIST   training seeds (default 0,1,2)
  --runs DIR     where the runs go (default results/runs/reproduce-mnist, or ...-smoke)
  --out FILE     the report (default results/mnist.md)

Example:
  $ npm run build:ts && node scripts/reproduce-mnist.mjs
`);
  process.exit(code);
}

const args = process.argv.slice(2);
const options = { smoke: false, seeds: [0, 1, 2], runs: undefined, out: undefined };
for (let i = 0; i < args.length; i++) {
  const a = args[i];
  if (a === '--smoke') options.smoke = true;
  else if (a === '--seeds') options.seeds = (args[++i] ?? '').split(',').map(Number);
  else if (a === '--runs') options.runs = args[++i];
  else if (a === '--out') options.out = args[++i];
  else if (a === '--help' || a === '-h') usage(0);
  else {
    process.stderr.write(`reproduce-mnist: unknown argument ${a}\n`);
    usage(1);
  }
}
if (options.seeds.some((s) => !Number.isInteger(s) || s < 0)) {
  process.stderr.write('reproduce-mnist: --seeds must be a comma-separated list of integers >= 0\n');
  process.exit(1);
}
if (options.smoke && !args.includes('--seeds')) options.seeds = [0];
if (!existsSync(cli)) {
  process.stderr.write(`reproduce-mnist: ${cli} is missing; run \`npm run build:ts\` first\n`);
  process.exit(1);
}
const preset = options.smoke ? 'mnist-tiny' : 'mnist-quick';
const extraFlags = options.smoke ? ['--steps', '4'] : [];
const runsDir = resolve(root, options.runs ?? (options.smoke ? 'results/runs/reproduce-mnist-smoke' : 'results/runs/reproduce-mnist'));
const outFile = resolve(root, options.out ?? 'results/mnist.md');
const rel = (p) => {
  const r = relative(root, p);
  return !r ? '.' : r.startsWith('..') ? p : r;
};
const { PRESETS } = createRequire(import.meta.url)(join(root, 'dist', 'train', 'presets.js'));

// Every run: (mode, method, seed) -> folder and command.
const runs = [];
for (const seed of options.seeds) {
  for (const mode of MODES) {
    for (const [method] of METHODS) {
      if (method === 'oracle' && mode !== 'dense') continue; // shared by both tables
      const out = join(runsDir, `${mode}-${method}-seed${seed}`);
      const argv = ['train', '--preset', preset, ...extraFlags, '--method', method, '--labels', mode, '--seed', String(seed), '--out', rel(out), '--quiet'];
      runs.push({ seed, mode, method, out, argv });
    }
  }
}

const started = Date.now();
let trainedSeconds = 0;
let runsDone = 0;
runs.forEach((run, k) => {
  const results = join(run.out, 'eval-test.json');
  const label = `[${k + 1}/${runs.length}] ${run.mode} ${run.method} seed ${run.seed}`;
  if (existsSync(results)) {
    process.stdout.write(`${label}: done earlier, skipped\n`);
    return;
  }
  const argv = existsSync(join(run.out, 'last.safetensors')) ? [...run.argv, '--resume'] : run.argv;
  const t0 = Date.now();
  const r = spawnSync(process.execPath, [cli, ...argv], { cwd: root, encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'] });
  const seconds = (Date.now() - t0) / 1000;
  trainedSeconds += seconds;
  runsDone += 1;
  if (r.status !== 0) {
    process.stderr.write(`${label}: failed (exit ${r.status})\n${r.stdout}`);
    process.exit(1);
  }
  const dice = JSON.parse(readFileSync(results, 'utf8')).metrics.averageDice.mean;
  process.stdout.write(`${label}: test Dice ${(100 * dice).toFixed(2)} (${seconds.toFixed(0)} s)\n`);
});

// ---- the report
function stats(values) {
  const v = values.filter((x) => Number.isFinite(x));
  if (!v.length) return undefined;
  const mean = v.reduce((a, b) => a + b, 0) / v.length;
  return { mean, std: Math.sqrt(v.reduce((a, b) => a + (b - mean) ** 2, 0) / v.length), n: v.length };
}
const pm = (s, scale, digits) => (s ? `${(s.mean * scale).toFixed(digits)} ± ${(s.std * scale).toFixed(digits)}` : '-');
const read = (run) => JSON.parse(readFileSync(join(run.out, 'eval-test.json'), 'utf8'));

function table(mode) {
  const lines = ['| Method | Dice (%) | CM estimation error | GED | runs |', '| --- | --- | --- | --- | --- |'];
  const forMode = runs.filter((r) => r.mode === mode || (r.method === 'oracle' && mode !== 'dense'));
  const fused = read(runs.find((r) => r.mode === mode)).fusedLabels;
  // The fused maps do not depend on the training seed: mean +- std over test images.
  lines.push(`| Mean labels (fused maps themselves) | ${pm(fused.mean.averageDice, 100, 2)} | - | - | over images |`);
  lines.push(`| Mode labels (fused maps themselves) | ${pm(fused.mode.averageDice, 100, 2)} | - | - | over images |`);
  for (const [method, title] of METHODS) {
    const results = forMode.filter((r) => r.method === method).map(read);
    const dice = stats(results.map((x) => x.metrics.averageDice.mean));
    const cm = LEARNS_CMS.has(method) ? stats(results.map((x) => x.metrics.cmError?.mean)) : undefined;
    const ged = LEARNS_CMS.has(method) ? stats(results.map((x) => x.metrics.ged?.mean)) : undefined;
    lines.push(`| ${title} (\`${method}\`) | ${pm(dice, 100, 2)} | ${pm(cm, 1, 4)} | ${pm(ged, 1, 4)} | ${results.length} |`);
  }
  return lines.join('\n');
}

const minutes = (Date.now() - started) / 60000;
const cpu = cpus();
const example = runs[0];
const report = `# MNIST with four synthetic annotators (paper Tables 1-2, CPU scale)

Written by \`scripts/reproduce-mnist.mjs\`${options.smoke ? ' in **smoke** mode (a pipeline check, not a result)' : ''} on ${new Date().toISOString().slice(0, 10)}:
${cpu.length} × ${cpu[0]?.model ?? 'unknown CPU'}, ${platform()} ${release()}, Node ${process.version}.
This invocation took ${minutes.toFixed(1)} min, ${(trainedSeconds / 60).toFixed(1)} of them in the ${runsDone} of ${runs.length} runs it had to do (the others were done earlier).

Setting: preset \`${preset}\`${extraFlags.length ? ` with \`${extraFlags.join(' ')}\`` : ''}: ${PRESETS[preset].description}.
Annotators good, over (dilation radius 2), under (erosion radius 1) and fracture (3 breaks) of SPEC
section 7 label the training images; Adam with the preset's learning-rate schedule, lambda 0.01, random flips and 90° rotations.
${options.smoke ? 'A smoke run only checks that every step of the pipeline works; its numbers mean nothing.' : `This is far smaller than the paper's setting (U-Net depth 4, c 32, the whole MNIST training
set, many more steps): absolute numbers are lower, and differences between methods smaller, than in the paper.`}
The checkpoint with the best validation Dice is scored on the test images.

Columns: **Dice** = foreground Dice against the expert consensus, mean ± std over the ${options.seeds.length} training
seeds (${options.seeds.join(', ')}) of each run's mean over the test images. **CM estimation error** = RMSE between
the estimated and true per-image CMs (SPEC section 6), averaged over the four annotators, mean ± std over
seeds; only for the methods that learn CMs. **GED** = generalised energy distance between the model's
four annotator predictions and the four observed annotations. Test images always carry all four
annotations, so the CM error and GED are measured alike in both tables. The "Mean labels" and "Mode labels"
rows score the fused training targets themselves (test images, labelled in the table's mode); mean
labels count a tie (2 of 4) as foreground, mode labels as background.

## Table 1: dense labels (every annotator labels every training image)

${table('dense')}

## Table 2: single label (one random annotator per training image)

${table('single')}

The oracle learns from the consensus, not from the annotators, so one set of oracle runs serves both tables.

## Commands

\`\`\`sh
npm run build:ts
node scripts/reproduce-mnist.mjs${options.smoke ? ' --smoke' : ''}${args.includes('--seeds') ? ` --seeds ${options.seeds.join(',')}` : ''}
\`\`\`

which runs, for every seed, label mode and method (oracle in dense mode only):

\`\`\`sh
${runs.map((r) => `node dist/cli/main.js ${r.argv.join(' ')}`).join('\n')}
\`\`\`

Each run folder holds \`best.safetensors\`, \`last.safetensors\`, \`train-log.jsonl\` and \`eval-test.json\`
(for example \`${rel(example.out)}\`). Pictures of a run: \`node dist/cli/main.js predict --checkpoint ${rel(join(example.out, 'best.safetensors'))} --out pictures\`.
`;
mkdirSync(dirname(outFile), { recursive: true });
writeFileSync(outFile, report);
process.stdout.write(`\nreport written: ${rel(outFile)}\nruns: ${rel(runsDir)}\n`);
