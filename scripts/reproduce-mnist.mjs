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
// A mean that is not a number (JSON writes NaN as null, which reads as 0 in arithmetic) prints '-'.
const pm = (s, scale, digits) => {
  if (!s || typeof s.mean !== 'number' || !Number.isFinite(s.mean)) return '-';
  const std = typeof s.std === 'number' && Number.isFinite(s.std) ? (s.std * scale).toFixed(digits) : 'n/a';
  return `${(s.mean * scale).toFixed(digits)} ± ${std}`;
};
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
// Fixed text, not recomputed: the 2026-11-27 investigation of why the tables do not show the
// paper's cm > cm-notrace ordering (validation runs under results/runs/investigation/).
const INVESTIGATION = `## Why the table does not show the paper's ordering (investigation)

This section was written by hand on 2026-11-27 and is fixed text: the script appends it unchanged, it does not recompute it.
It asks why \`cm\` does not beat \`cm-notrace\` (and, in dense mode, \`naive-mode\`) above. Every number here is
the **validation** Dice (%) of the best-validation checkpoint and the validation CM error at that checkpoint,
read from each run's \`train-log.jsonl\` (200 validation images for \`mnist-quick\`, 500 for \`mnist\`, so only compare
rows of the same preset). The test split was not used: the new runs were trained with \`--no-test\`.
Runs are in \`results/runs/investigation/\` (git-ignored). Labels are single unless a row says dense. Seed 0 unless a row says otherwise.

Commands: \`node dist/cli/main.js train --preset P --method M --labels single --seed S --no-test -q --out results/runs/investigation/NAME\`
plus the flags in each row. Two changes have no CLI flag: the CM initialisation (\`cmInit\`) and the annotator panel. For those
rows the same CLI was started through a 6-line wrapper that changes them in memory only (no source change):

\`\`\`js
// node driver.cjs train ...   with CMINIT=uniform and/or ANNOT=over,under,fracture in the environment
const presets = require('./dist/train/presets.js');
if (process.env.CMINIT) for (const p of Object.values(presets.PRESETS)) p.train.cmInit = process.env.CMINIT;
if (process.env.ANNOT) require('./dist/train/experiment.js').MNIST_ANNOTATORS = process.env.ANNOT.split(',').map((kind) => ({ kind }));
require('./dist/cli/main.js').main(process.argv);
\`\`\`

### Training length and scale (default identity CM initialisation, lambda 0.01)

| setting | seed | \`cm\` Dice / CM err | \`cm-notrace\` Dice / CM err | \`naive-mode\` Dice |
| --- | --- | --- | --- | --- |
| \`mnist-quick\` (the reproduction runs above) | 0 | 96.45 / 0.0330 | 96.43 / 0.0329 | 93.42 |
| \`mnist-quick\` (the reproduction runs above) | 1 | 97.30 / 0.0330 | 97.39 / 0.0320 | 94.46 |
| \`mnist-quick\` (the reproduction runs above) | 2 | 97.00 / 0.0288 | 96.96 / 0.0286 | 94.76 |
| \`mnist-quick\`, dense (reproduction runs) | 0 | 96.72 / 0.0349 | 96.75 / 0.0341 | 97.37 |
| \`mnist-quick --epochs 12\` | 0 | 98.55 / 0.0135 | 98.71 / 0.0107 | - |
| \`mnist-quick --epochs 12\` | 1 | 98.40 / 0.0144 | 98.54 / 0.0121 | - |
| \`mnist\` (depth 3, c 16, 2000 images, 6 epochs) | 0 | 98.48 / 0.0236 | 98.48 / 0.0231 | 96.68 |
| \`mnist\` | 1 | 98.39 / 0.0263 | 98.41 / 0.0226 | - |
| \`mnist\`, dense | 0 | 98.48 / 0.0236 | 98.48 / 0.0232 | 98.47 |

### Trace weight, warm-up and initialisation (\`mnist-quick\`, \`cm\` unless stated)

| flags | seed | Dice / CM err |
| --- | --- | --- |
| (none: lambda 0.01, no warm-up, identity init) | 0 | 96.45 / 0.0330 |
| \`--lambda 0.1\` | 0 | 96.01 / 0.0457 |
| \`--warmup-steps 40\` (one epoch of negated trace) | 0 | 96.49 / 0.0337 |
| \`--lambda 0.1 --warmup-steps 40\` | 0 | 96.27 / 0.0416 |
| uniform CM init (\`CMINIT=uniform\`) | 0 / 1 / 2 | 97.90 / 0.0232; 57.06 / 0.0625; 53.33 / 0.0651 |
| uniform CM init, \`cm-notrace\` | 0 / 1 / 2 | 97.89 / 0.0228; 57.11 / 0.0616; 56.45 / 0.0508 |
| uniform CM init, \`--lambda 0.1\` | 0 | 97.28 / 0.0366 |
| uniform CM init, \`--warmup-steps 40\` | 1 | 57.11 / 0.0616 |
| uniform CM init, \`--lambda 0.1 --warmup-steps 40\` | 1 / 2 | 56.96 / 0.0570; 56.87 / 0.0467 |
| uniform CM init, dense, \`cm\` / \`cm-notrace\` | 0 | 98.09 / 0.0200; 98.15 / 0.0198 |
| uniform CM init, preset \`mnist\`, \`cm\` / \`cm-notrace\` | 0 | 17.76 / 0.1524; 19.86 / 0.0933 |

### Without the \`good\` annotator (\`ANNOT=over,under,fracture\`, \`mnist-quick\`, single labels, seed 0)

| method, flags | Dice / CM err | predicted foreground area / consensus area |
| --- | --- | --- |
| \`cm-notrace\` | 95.23 / 0.0317 | 1.05 |
| \`cm\` (lambda 0.01) | 93.80 / 0.0357 | 1.09 |
| \`cm --lambda 0.1\` | 70.43 / 0.1020 (epoch 1; 61.57 after 4 epochs) | 1.70 |
| \`naive-mode\` | 89.18 / - | - |
| \`cm\` / \`cm-notrace\`, uniform CM init | 5.52 / 0.2565; 5.85 / 0.2500 | - |

(The foreground areas come from the best checkpoint on the first 100 validation images. With all four annotators the areas are
0.99 for \`cm\` and \`cm-notrace\` and 1.02 for \`cm --lambda 0.1\`.)

### What we found

1. **Nothing we tried made the trace term help.** At lambda 0.01 a \`cm\` run and the \`cm-notrace\` run with the same seed
   (so the same initialisation and batch order) differ by at most 0.1 Dice in the 4-epoch \`mnist-quick\` runs and at the
   \`mnist\` preset. When training is longer (12 epochs), \`cm-notrace\` is ahead on both seeds (+0.16, +0.14) and has the
   lower CM error. Raising lambda to 0.1
   costs Dice and raises the CM error by about 40%. One epoch of warm-up with the negated trace changes nothing we can
   measure. Without the \`good\` annotator, the harm from the trace grows with lambda (95.2 → 93.8 → 70.4). The trace weight that
   helps here is zero, so neither tuning lambda nor adding warm-up will bring back the paper's \`cm\` > \`cm-notrace\`.
2. **A likely mechanism.** In this implementation each pixel has its own CMs. Take a fit in which p is confident at a pixel. The column
   for the class p predicts must reproduce each annotator's label there. The other column does not affect the loss, so
   the trace drives its diagonal to zero. The trace summed over annotators then simply counts the annotators that agree with p
   at that pixel. Minimising it pulls p, pixel by pixel, towards the *minority* label, for example the dilation ring that only
   \`over\` marks as foreground. The measurements fit this picture: as lambda grows, the predicted foreground grows (1.05 → 1.09 → 1.70
   times the consensus area without \`good\`; 0.99 → 1.02 with it) and precision falls. The trace also pulls the perfect annotator's
   CM off the identity: on validation, the \`good\` annotator's CM error is 0.0116 without the trace, 0.0145 at lambda 0.01 and
   0.0376 at lambda 0.1 (and 0.0015 vs 0.0094 after 12 epochs). The paper argues that the trace picks out the true CMs when the
   annotators are reliable on average. That argument constrains CMs shared across pixels. With free per-pixel CMs, only the
   network's smoothness and the initialisation stand in for that constraint.
3. **The initialisation does the work that the paper gives to the trace.** The default identity initialisation (CM diagonal
   about 0.8, CM-head weights scaled by 0.1) starts the model in the right basin. There the trace has nothing left to decide, which is
   why its effect is small. With the plain (uniform) initialisation, one seed in three does better (97.9). The others, and
   the larger \`mnist\` preset, fall into a swapped solution: p becomes the \`over\` mask (2.4 times the consensus area, recall 1.00,
   precision 0.42) or something even larger, and the CMs presumably explain the other annotators as erosions of it. Neither the trace
   (lambda 0.01 or 0.1) nor 40 warm-up steps of negated trace (at weight lambda; the CLI has no separate warm-up weight) pulled such a run
   back. So the identity initialisation does bias the CMs towards the diagonal, and that is why the trace matters little. But the bias is what makes the method work here, and removing it does not let the trace show a benefit.
4. **The benchmark leaves little room in dense mode.** The \`good\` annotator is exactly the consensus (its training labels
   have Dice 100 against it). \`over\` and \`under\` cancel in a vote. So the majority vote is almost the consensus (mode labels 95.9 on
   test). \`naive-mode\` is within about 0.6 Dice of the oracle at quick scale, and ties with \`cm\` at the \`mnist\` preset (98.47 vs 98.48).
   In single-label mode the paper's main shape *does* hold: \`cm\` beats \`naive-mode\` by 2.2-3.0 Dice (quick, three seeds) and 1.8 Dice (\`mnist\`).
5. **Under-training explains the CM errors and the small gaps.** The quick runs are still improving at epoch 4 (validation
   curve 80.6 / 94.6 / 96.2 / 96.5 for seed 0). At 12 epochs, \`cm\` reaches 98.55 and its CM error falls from 0.033 to 0.014. Most
   of the CM error in the short runs comes from the \`under\` annotator: 0.078 on validation, against 0.012-0.027 for the others.
   It falls to 0.017 at 12 epochs. Erosion with radius 1 keeps only 32% of a digit's foreground pixels on average, and 29-32% of
   the \`under\` training labels keep less than a fifth of the consensus foreground. Its CM varies more from pixel to pixel than any
   other annotator's, and a 160-step run does not learn it. \`cm-lowrank\` has a lower training cross-entropy than \`cm\` at every epoch of the reproduction
   logs. Its lower CM error in the table is consistent with it just fitting faster in 160 steps; we did not look further.

### What a longer reproduction would need

- At least 12 epochs of \`mnist-quick\` (480 steps), or the \`mnist\` preset. Both are about 30-60 s per run on this machine
  when it is not busy. At least 3 seeds, because the \`cm\` vs \`cm-notrace\` gaps (≤ 0.16 Dice) are smaller than the spread between seeds.
- Keep the identity CM initialisation. Keep lambda at 0.01 or lower, or report \`cm-notrace\` as the main row: with this
  implementation and this annotator panel we have no evidence that any positive lambda helps, and clear evidence that lambda 0.1 hurts.
- A real test of the paper's trace claim needs a panel without a perfect annotator (dense mode is otherwise close to solved
  by a majority vote), and probably CMs constrained across pixels (\`cm-global\` / \`cm-lowrank\`-like structure, or CM-head
  blocks) so that the trace can act as the paper intends. That is a change to the method, not to a setting, and was out of scope here.

### The STAPLE rows

In dense mode both STAPLE variants give exactly the oracle's numbers: STAPLE estimates the \`good\` annotator as
perfect (sensitivity and specificity 1), so the fused training map equals the expert consensus and the run is the
oracle's run. In single-label mode each pixel has one observation, so the STAPLE posterior follows that one label
almost everywhere and the rows match \`naive-mode\` to within 0.01 Dice. Spatial STAPLE fuses the stacked training
images with 8-pixel cells and 24-pixel windows (windows span neighbouring images of the stack).
`;

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
four annotator predictions and the four observed annotations, mean ± std over seeds. Every ± is the population
standard deviation (ddof 0, numpy's default)${options.seeds.length > 1 ? `: over ${options.seeds.length} seeds the sample standard deviation (ddof 1) would be
${Math.sqrt(options.seeds.length / (options.seeds.length - 1)).toFixed(2)} times as large` : ''}. Test images always carry all four
annotations, so the CM error and GED are measured alike in both tables. The "Mean labels" and "Mode labels"
rows score the fused training targets themselves (test images, labelled in the table's mode), mean ± population
std over the test images; mean labels count a tie (2 of 4) as foreground, mode labels as background.

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

${INVESTIGATION}`;
mkdirSync(dirname(outFile), { recursive: true });
writeFileSync(outFile, report);
process.stdout.write(`\nreport written: ${rel(outFile)}\nruns: ${rel(runsDir)}\n`);
