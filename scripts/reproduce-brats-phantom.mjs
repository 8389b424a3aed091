#!/usr/bin/env node
// The BraTS method table of the paper (Tables 3, 7, 8: methods as rows; Dice per tumour class,
// BraTS region Dice, CM estimation error, GED) on synthetic phantom cases, at CPU scale, then
// results/brats-phantom.md with the machine, the settings and the exact commands.
//
//   npm run build:ts && node scripts/reproduce-brats-phantom.mjs          # about 45 min on 2 cores
//   node scripts/reproduce-brats-phantom.mjs --smoke --out /tmp/smoke.md  # seconds: proves the pipeline
//
// Pipeline: `cmseg phantom brats` writes the cases (four modalities and a segmentation, as
// NIfTI in the BraTS 2021 layout), `cmseg prepare` crops, normalises and adds the synthetic
// annotators over, under and wrong (dense labels), every method is trained with
// `cmseg train --preset brats3d` on small patches for a fixed number of steps and scored with
// `cmseg eval` on the test split. One `cmseg predict` on a test case writes NIfTI files, which
// are checked with nibabel (shape and affine equal to the source case's) when python3 has it.
//
// Finished runs (with eval-test.json) are skipped and interrupted ones resumed, so the script
// can be stopped and started again. One training process runs at a time.

import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, readdirSync, writeFileSync } from 'node:fs';
import { cpus, platform, release } from 'node:os';
import { dirname, join, relative, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { createRequire } from 'node:module';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const cli = join(root, 'dist', 'cli', 'main.js');

// [run name, row title, the train flags that make it (default: --method <run name>)]
const METHODS = [
  ['cm', 'Ours (pixel-wise CMs, trace)'],
  ['cm-lowrank', 'Ours with low-rank CMs'],
  ['cm-global', 'Ours with global CMs'],
  ['cm-notrace', 'Ours without trace'],
  // Not a row of the paper: the annotator network with its own layers, as the authors' code has.
  ['cm-head-blocks', 'Ours with 2 blocks before each CM head', ['--method', 'cm', '--cm-head-blocks', '2']],
  ['naive-mean', 'Naive CNN on mean labels'],
  ['naive-mode', 'Naive CNN on mode labels'],
  ['naive-staple', 'Naive CNN on STAPLE labels'],
  ['naive-spatial-staple', 'Naive CNN on Spatial STAPLE labels'],
  ['oracle', 'Oracle (trained on the consensus)'],
];
const LEARNS_CMS = new Set(['cm', 'cm-lowrank', 'cm-global', 'cm-notrace', 'cm-head-blocks']);
/** The train flags of a run, and how the tables name it: the method, or the flags of a variant. */
const trainFlags = (name) => METHODS.find(([k]) => k === name)?.[2] ?? ['--method', name];
const code = (name) => (METHODS.find(([k]) => k === name)?.[2] ? trainFlags(name).slice(1).join(' ') : name);

function usage(code) {
  process.stdout.write(`usage: node scripts/reproduce-brats-phantom.mjs [--smoke] [options]

  --smoke            a seconds-long check of the whole pipeline (3 tiny cases, 2 steps)
  --cases N          phantom cases (default 12)
  --size X,Y,Z       phantom volume size (default 64,64,48)
  --patch N          training patch edge and sliding window, a multiple of 8 (default 32)
  --steps N          optimiser steps per method (default 2400)
  --steps-per-epoch N  steps between validations and checkpoints (default 300)
  --methods LIST     comma-separated methods (default ${METHODS.map(([m]) => m).join(',')})
  --threads N        native threads of every command (default 2)
  --seed N           training seed (default 0)
  --runs DIR         where the phantoms, cache and runs go (default results/runs/reproduce-brats-phantom, or ...-smoke)
  --out FILE         the report (default results/brats-phantom.md)

Example:
  $ npm run build:ts && node scripts/reproduce-brats-phantom.mjs
`);
  process.exit(code);
}

const args = process.argv.slice(2);
const options = {
  smoke: false, cases: 12, size: '64,64,48', patch: 32, steps: 2400, stepsPerEpoch: 300,
  methods: METHODS.map(([m]) => m), threads: 2, seed: 0, runs: undefined, out: undefined,
};
const given = new Set();
const int = (name, v) => {
  const n = Number(v);
  if (!Number.isInteger(n) || n < 0) {
    process.stderr.write(`reproduce-brats-phantom: ${name} must be an integer >= 0, not ${v}\n`);
    process.exit(1);
  }
  return n;
};
for (let i = 0; i < args.length; i++) {
  const a = args[i];
  given.add(a);
  if (a === '--smoke') options.smoke = true;
  else if (a === '--cases') options.cases = int(a, args[++i]);
  else if (a === '--size') options.size = args[++i] ?? '';
  else if (a === '--patch') options.patch = int(a, args[++i]);
  else if (a === '--steps') options.steps = int(a, args[++i]);
  else if (a === '--steps-per-epoch') options.stepsPerEpoch = int(a, args[++i]);
  else if (a === '--methods') options.methods = (args[++i] ?? '').split(',').filter(Boolean);
  else if (a === '--threads') options.threads = int(a, args[++i]);
  else if (a === '--seed') options.seed = int(a, args[++i]);
  else if (a === '--runs') options.runs = args[++i];
  else if (a === '--out') options.out = args[++i];
  else if (a === '--help' || a === '-h') usage(0);
  else {
    process.stderr.write(`reproduce-brats-phantom: unknown argument ${a}\n`);
    usage(1);
  }
}
const unknown = options.methods.filter((m) => !METHODS.some(([k]) => k === m));
if (unknown.length || !options.methods.length) {
  process.stderr.write(`reproduce-brats-phantom: unknown method(s) ${unknown.join(', ') || '(none given)'}\n`);
  process.exit(1);
}
if (options.smoke) {
  // Smallest pipeline that still has a training, a validation and a test case.
  if (!given.has('--cases')) options.cases = 3;
  if (!given.has('--size')) options.size = '32,32,24';
  if (!given.has('--patch')) options.patch = 16;
  if (!given.has('--steps')) options.steps = 2;
  if (!given.has('--steps-per-epoch')) options.stepsPerEpoch = 1;
}
if (!existsSync(cli)) {
  process.stderr.write(`reproduce-brats-phantom: ${cli} is missing; run \`npm run build:ts\` first\n`);
  process.exit(1);
}
const runsDir = resolve(root, options.runs ?? (options.smoke ? 'results/runs/reproduce-brats-phantom-smoke' : 'results/runs/reproduce-brats-phantom'));
const outFile = resolve(root, options.out ?? 'results/brats-phantom.md');
const rel = (p) => {
  const r = relative(root, p);
  return !r ? '.' : r.startsWith('..') ? p : r;
};
const phantomDir = join(runsDir, 'phantom');
const cacheDir = join(runsDir, 'cache');
const threads = ['--threads', String(options.threads)];
const commands = []; // every command this configuration consists of, in order, for the report

const started = Date.now();
let workSeconds = 0;
function cmseg(argv, label) {
  commands.push(`node dist/cli/main.js ${argv.join(' ')}`);
  const t0 = Date.now();
  const r = spawnSync(process.execPath, [cli, ...argv], { cwd: root, encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'] });
  const seconds = (Date.now() - t0) / 1000;
  workSeconds += seconds;
  if (r.status !== 0) {
    process.stderr.write(`${label}: failed (exit ${r.status})\n${r.stdout}`);
    process.exit(1);
  }
  return { seconds, stdout: r.stdout };
}

// ---- data: phantoms, then the cache (prepare is incremental: unchanged cases are skipped)
const phantomArgv = ['phantom', 'brats', '--cases', String(options.cases), '--size', options.size, '--seed', '0', '--out', rel(phantomDir), '--quiet'];
const lastCase = join(phantomDir, `BraTS2021_${String(options.cases - 1).padStart(5, '0')}`);
if (existsSync(lastCase)) {
  commands.push(`node dist/cli/main.js ${phantomArgv.join(' ')}`);
  process.stdout.write(`phantoms: done earlier, skipped (${rel(phantomDir)})\n`);
} else {
  const { seconds } = cmseg(phantomArgv, 'phantom');
  process.stdout.write(`phantoms: ${options.cases} cases of ${options.size} voxels (${seconds.toFixed(1)} s)\n`);
}
const prepareArgv = ['prepare', '--data', rel(phantomDir), '--out', rel(cacheDir), '--annotators', 'over,under,wrong', '--labels', 'dense', '--seed', '0', '--quiet'];
{
  const { seconds } = cmseg(prepareArgv, 'prepare');
  process.stdout.write(`cache: ${rel(cacheDir)} (${seconds.toFixed(1)} s)\n`);
}

// ---- train and score every method
const runs = options.methods.map((method) => {
  const out = join(runsDir, method);
  const train = ['train', '--preset', 'brats3d', '--data', rel(cacheDir), ...trainFlags(method), '--labels', 'dense',
    '--patch', String(options.patch), '--steps', String(options.steps), '--steps-per-epoch', String(options.stepsPerEpoch),
    '--seed', String(options.seed), ...threads, '--no-test', '--out', rel(out), '--quiet'];
  const evaluate = ['eval', '--checkpoint', rel(join(out, 'best.safetensors')), '--split', 'test', '--out', rel(join(out, 'eval-test.json')), ...threads];
  return { method, out, train, evaluate, seconds: undefined };
});
runs.forEach((run, k) => {
  const results = join(run.out, 'eval-test.json');
  const label = `[${k + 1}/${runs.length}] ${run.method}`;
  if (existsSync(results)) {
    commands.push(`node dist/cli/main.js ${run.train.join(' ')}`, `node dist/cli/main.js ${run.evaluate.join(' ')}`);
    const scored = JSON.parse(readFileSync(results, 'utf8')).metrics;
    if (scored.brats?.hd95 && scored.classConfusion) {
      process.stdout.write(`${label}: done earlier, skipped\n`);
      return;
    }
    // Scored before cmseg reported HD95 or the class confusion: the same checkpoint scored again.
    const again = cmseg(run.evaluate, `${label} eval (HD95, class confusion)`);
    const file = join(run.out, 'timing.json');
    if (existsSync(file)) writeFileSync(file, `${JSON.stringify({ ...JSON.parse(readFileSync(file, 'utf8')), evalSeconds: again.seconds })}\n`);
    process.stdout.write(`${label}: trained earlier, scored again (${again.seconds.toFixed(0)} s)\n`);
    return;
  }
  const trainArgv = existsSync(join(run.out, 'last.safetensors')) ? [...run.train, '--resume'] : run.train;
  const a = cmseg(trainArgv, `${label} train`);
  if (trainArgv !== run.train) commands[commands.length - 1] = `node dist/cli/main.js ${run.train.join(' ')}`;
  const b = cmseg(run.evaluate, `${label} eval`);
  run.seconds = a.seconds + b.seconds;
  writeFileSync(join(run.out, 'timing.json'), `${JSON.stringify({ trainSeconds: a.seconds, evalSeconds: b.seconds, threads: options.threads, date: new Date().toISOString() })}\n`);
  const m = JSON.parse(readFileSync(results, 'utf8')).metrics;
  process.stdout.write(`${label}: test average Dice ${(100 * m.averageDice.mean).toFixed(2)}, WT ${(100 * m.brats.regions.wholeTumour.mean).toFixed(2)} (train ${a.seconds.toFixed(0)} s, eval ${b.seconds.toFixed(0)} s)\n`);
});

// ---- one prediction as NIfTI, checked with nibabel against the source case
const predictRun = runs.find((r) => r.method === 'cm') ?? runs[0];
const predictDir = join(runsDir, 'predict');
const predictArgv = ['predict', '--checkpoint', rel(join(predictRun.out, 'best.safetensors')), '--split', 'test', '--count', '1', '--out', rel(predictDir), ...threads];
const predictOut = cmseg(predictArgv, 'predict');
const niftiCheck = checkNifti();
process.stdout.write(`predict: ${rel(predictDir)} (${predictOut.seconds.toFixed(1)} s); nibabel: ${niftiCheck.summary}\n`);

function listNifti(dir) {
  const found = [];
  const walk = (d) => {
    for (const e of readdirSync(d, { withFileTypes: true })) {
      if (e.isDirectory()) walk(join(d, e.name));
      else if (/\.nii(\.gz)?$/.test(e.name)) found.push(join(d, e.name));
    }
  };
  if (existsSync(dir)) walk(dir);
  return found.sort();
}
function checkNifti() {
  const testCase = JSON.parse(readFileSync(join(predictRun.out, 'eval-test.json'), 'utf8')).metrics.perCase[0].id;
  const source = join(phantomDir, testCase, `${testCase}_seg.nii.gz`);
  const files = listNifti(predictDir);
  const py = `
import json, sys
import numpy as np
import nibabel as nib
src = nib.load(sys.argv[1])
rows = []
for f in sys.argv[2:]:
    img = nib.load(f)
    data = np.asarray(img.dataobj)
    rows.append({"file": f, "shape": list(img.shape), "dtype": str(data.dtype),
                 "spatialShapeMatches": list(img.shape[:3]) == list(src.shape[:3]),
                 "affineMatches": bool(np.allclose(img.affine, src.affine, atol=1e-5)),
                 "values": sorted(int(v) for v in np.unique(data))[:8] if data.dtype.kind in "iu" else None})
print(json.dumps({"sourceShape": list(src.shape), "sourceAffine": src.affine.tolist(), "files": rows}))
`;
  const command = `python3 -c "import nibabel as nib, numpy as np; ..." ${rel(source)} ${rel(predictDir)}/**/*.nii.gz`;
  if (!files.length) return { ok: false, summary: 'predict wrote no NIfTI files', command, testCase };
  const r = spawnSync('python3', ['-c', py, source, ...files], { cwd: root, encoding: 'utf8' });
  if (r.status !== 0) return { ok: false, summary: `not checked (python3 with nibabel failed: ${(r.stderr || '').trim().split('\n').pop()})`, command, testCase };
  const result = JSON.parse(r.stdout);
  const ok = result.files.every((f) => f.spatialShapeMatches && f.affineMatches);
  const summary = `${result.files.length} file(s) loaded; ${ok ? 'every one has the source case\'s shape and affine' : 'MISMATCH in shape or affine'}`;
  return { ok, summary, command, testCase, source, result };
}

// ---- the report
const f = (x, scale, digits) => (Number.isFinite(x) ? (x * scale).toFixed(digits) : '-');
const read = (run) => JSON.parse(readFileSync(join(run.out, 'eval-test.json'), 'utf8'));
const results = runs.map((run) => ({ run, r: read(run) }));
const timing = (run) => {
  const file = join(run.out, 'timing.json');
  return existsSync(file) ? JSON.parse(readFileSync(file, 'utf8')) : undefined;
};
const runSeconds = runs.map((run) => timing(run)).filter(Boolean).reduce((s, t) => s + t.trainSeconds + t.evalSeconds, 0);
const testIds = results[0].r.metrics.perCase.map((c) => c.id);
const log = (run) => readFileSync(join(run.out, 'train-log.jsonl'), 'utf8').trim().split('\n').map((l) => JSON.parse(l));
const startEvent = log(runs[0]).find((e) => e.event === 'start');
const splits = startEvent?.run?.dataset?.splits ?? {};

function hd95Table() {
  const lines = ['| Method | HD95 WT (mm) | HD95 TC (mm) | HD95 ET (mm) |', '| --- | --- | --- | --- |'];
  for (const { run, r } of results) {
    const h = r.metrics.brats.hd95;
    const cell = (m) => (m && m.count > 0 ? `${m.mean.toFixed(2)}${m.count < r.metrics.images ? ` (${m.count} of ${r.metrics.images})` : ''}` : '-');
    lines.push(`| ${METHODS.find(([k]) => k === run.method)[1]} | ${cell(h?.wholeTumour)} | ${cell(h?.tumourCore)} | ${cell(h?.enhancingTumour)} |`);
  }
  return lines.join('\n');
}

function mainTable() {
  const lines = [
    '| Method | Dice NCR | Dice ED | Dice ET | WT | TC | ET | CM estimation error | GED | best step | train + eval (s) |',
    '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |',
  ];
  for (const { run, r } of results) {
    const m = r.metrics;
    const title = METHODS.find(([k]) => k === run.method)[1];
    const cms = LEARNS_CMS.has(run.method);
    const cells = [
      f(m.dicePerClass[1]?.mean, 100, 2), f(m.dicePerClass[2]?.mean, 100, 2), f(m.dicePerClass[3]?.mean, 100, 2),
      f(m.brats.regions.wholeTumour.mean, 100, 2), f(m.brats.regions.tumourCore.mean, 100, 2), f(m.brats.regions.enhancingTumour.mean, 100, 2),
      cms ? f(m.cmError?.mean, 1, 4) : '-', cms ? f(m.ged?.mean, 1, 4) : '-',
      log(run).find((e) => e.event === 'end')?.best?.step ?? '-',
      timing(run) ? `${timing(run).trainSeconds.toFixed(0)} + ${timing(run).evalSeconds.toFixed(0)}` : '-',
    ];
    lines.push(`| ${title} (\`${code(run.method)}\`) | ${cells.join(' | ')} |`);
  }
  return lines.join('\n');
}
// The annotators' true noise on the test cases, from the cache: for each annotator the true CM
// p(annotator says i | consensus j) pooled over the test voxels, its mean diagonal over the classes
// present (the counterpart of the model's estimated reliability) and the fraction of voxels it gets wrong.
async function trueAnnotatorNoise() {
  const { readCachedCase } = createRequire(import.meta.url)(join(root, 'dist', 'data', 'cache.js'));
  let L = 0;
  let counts;
  let names = [];
  for (const id of testIds) {
    const c = await readCachedCase(cacheDir, id);
    L = c.classes;
    names = c.names;
    counts ??= c.labels.map(() => new Float64Array(L * L));
    c.labels.forEach((labels, r) => {
      for (let v = 0; v < labels.length; v++) if (labels[v] !== 255) counts[r][labels[v] * L + c.consensus[v]]++;
    });
  }
  return names.map((name, r) => {
    const diag = [];
    let wrong = 0;
    let all = 0;
    for (let j = 0; j < L; j++) {
      let column = 0;
      for (let i = 0; i < L; i++) column += counts[r][i * L + j];
      if (column > 0) diag.push(counts[r][j * L + j] / column);
      all += column;
      wrong += column - counts[r][j * L + j];
    }
    // columns[j][i]: p(annotator says i | consensus j) over the test voxels (undefined where j is absent).
    const columns = Array.from({ length: L }, (_, j) => {
      let column = 0;
      for (let i = 0; i < L; i++) column += counts[r][i * L + j];
      return column > 0 ? Array.from({ length: L }, (_, i) => counts[r][i * L + j] / column) : undefined;
    });
    return { name, meanDiagonal: diag.reduce((a, b) => a + b, 0) / diag.length, diagonal: diag, columns, errorRate: wrong / all,
      backgroundShare: all > 0 ? (() => { let c0 = 0; for (let i = 0; i < L; i++) c0 += counts[r][i * L]; return c0 / all; })() : NaN };
  });
}
const truth = await trueAnnotatorNoise();

// The STAPLE training targets against the consensus, from the cache: for each case with a fused
// map, the voxels where the fused label differs from the consensus, by (consensus -> fused) class.
// Read only; the training runs are not affected.
const CLASS_NAMES = ['background', 'necrosis', 'edema', 'enhancing tumour'];
async function stapleAgreement() {
  const { readCacheIndex, readCachedCase, readFusedLabels } = createRequire(import.meta.url)(join(root, 'dist', 'data', 'cache.js'));
  const fusions = [['naive-staple', 'multi-staple'], ['naive-spatial-staple', 'spatial-staple']]
    .filter(([method]) => options.methods.includes(method)).map(([, fusion]) => fusion);
  if (!fusions.length || !existsSync(cacheDir)) return undefined;
  const index = readCacheIndex(cacheDir);
  const cases = [];
  for (const entry of index.cases) {
    const done = fusions.filter((fusion) => entry.fused?.[fusion]);
    if (!done.length) continue;
    const c = await readCachedCase(cacheDir, entry.id, index);
    const L = c.classes;
    const classCount = new Array(L).fill(0);
    for (let v = 0; v < c.consensus.length; v++) if (c.consensus[v] < L) classCount[c.consensus[v]]++;
    const maps = [];
    for (const fusion of done) {
      const { labels } = await readFusedLabels(cacheDir, entry.id, fusion, index);
      const pairs = new Map();
      let differ = 0;
      for (let v = 0; v < labels.length; v++) {
        if (labels[v] === c.consensus[v]) continue;
        differ++;
        const key = `${c.consensus[v]}>${labels[v]}`;
        pairs.set(key, (pairs.get(key) ?? 0) + 1);
      }
      maps.push({ fusion, labels, differ, pairs: [...pairs].sort((a, b) => b[1] - a[1]) });
    }
    const same = maps.every((m) => m.labels.length === maps[0].labels.length && m.labels.every((x, i) => x === maps[0].labels[i]));
    cases.push({ id: entry.id, classCount, maps, same });
  }
  return { fusions, cases };
}
const staple = await stapleAgreement().catch((e) => { process.stderr.write(`STAPLE vs consensus comparison skipped: ${e.message}\n`); return undefined; });

function stapleNote() {
  if (!staple || !staple.cases.length) return '';
  const rowOf = (method) => results.find(({ run }) => run.method === method)?.r.metrics;
  const exact = staple.cases.filter((c) => c.maps.every((m) => m.differ === 0));
  const off = staple.cases.filter((c) => c.maps.some((m) => m.differ > 0));
  const both = staple.fusions.length > 1 ? 'both STAPLE variants' : 'STAPLE';
  const head = `The STAPLE rows train on fused maps that equal the consensus on ${exact.length} of the ${staple.cases.length} training cases.
One of the phantom's three annotators (\`wrong\`) is a pure swap of tumour classes, a permutation confusion
matrix that loses no information; where STAPLE identifies that permutation on a case, it inverts it and the
fused map is the consensus.`;
  if (!off.length) {
    return `${head} The STAPLE runs therefore train on the oracle's targets, for a reason that real annotations will not give them.
The CM methods must learn the same thing from the labels through the network: see where each tumour class went, below.`;
  }
  const describe = (c) => {
    const m = c.maps[0];
    const [key, n] = m.pairs[0];
    const [from, to] = key.split('>').map(Number);
    const rest = m.differ - n;
    return `on \`${c.id}\` (${c.classCount[1]} necrosis voxel${c.classCount[1] === 1 ? '' : 's'} in the consensus) ${c.same ? both : `\`${m.fusion}\``} label${c.same && staple.fusions.length > 1 ? '' : 's'} ${n} of ${c.classCount[from]} ${CLASS_NAMES[from] ?? `class ${from}`} voxels as ${CLASS_NAMES[to] ?? `class ${to}`}${rest ? ` (and ${rest} other voxels differ)` : ''}`;
  };
  const oracle = rowOf('oracle');
  const st = rowOf(staple.fusions[0] === 'multi-staple' ? 'naive-staple' : 'naive-spatial-staple');
  let compare = '';
  if (oracle && st) {
    const pairs = [['NCR', st.dicePerClass[1]?.mean, oracle.dicePerClass[1]?.mean], ['ED', st.dicePerClass[2]?.mean, oracle.dicePerClass[2]?.mean],
      ['ET', st.dicePerClass[3]?.mean, oracle.dicePerClass[3]?.mean], ['WT', st.brats.regions.wholeTumour.mean, oracle.brats.regions.wholeTumour.mean],
      ['TC', st.brats.regions.tumourCore.mean, oracle.brats.regions.tumourCore.mean]];
    compare = ` (${pairs.map(([n, a, b]) => `${n} ${f(a, 100, 2)} vs ${f(b, 100, 2)}`).join(', ')})`;
  }
  return `${head} It does not on ${off.length === 1 ? 'one case' : `${off.length} cases`}:
${off.map(describe).join(';\n')}.
With so few necrosis voxels STAPLE cannot identify the \`wrong\` annotator's permutation.
So the STAPLE runs do not train on the oracle's targets, which is why their rows differ from the oracle's
${compare.trim()}, in both directions (one training seed: see the caveat at the top). The CM methods
must learn the annotators from the labels through the network: see where each tumour class went, below.`;
}

function rankingNote(cmRuns) {
  const order = (values) => values.map((v, i) => [v, i]).sort((a, b) => b[0] - a[0]).map(([, i]) => i).join(',');
  const want = order(truth.map((t) => t.meanDiagonal));
  const good = cmRuns.filter(({ r }) => order(r.metrics.reliability) === want);
  const bad = cmRuns.filter(({ r }) => order(r.metrics.reliability) !== want).map(({ run }) => `\`${code(run.method)}\``);
  // An order that rests on a gap below 0.005 (the table shows 3 decimals) is a tie, not a ranking.
  const closest = ({ r }) => {
    const v = r.metrics.reliability.map((x, i) => [Number(x.toFixed(3)), i]).sort((a, b) => b[0] - a[0]);
    let k = 0;
    for (let i = 1; i < v.length - 1; i++) if (v[i][0] - v[i + 1][0] < v[k][0] - v[k + 1][0]) k = i;
    return { a: v[k], b: v[k + 1], gap: v[k][0] - v[k + 1][0] };
  };
  const goodText = good.map((x) => {
    const c = closest(x);
    const names = x.r.metrics.annotatorNames;
    return c.gap < 0.005
      ? `\`${code(x.run.method)}\`'s values are in the true order, but its ${names[c.a[1]]} and ${names[c.b[1]]} values (${c.a[0].toFixed(3)}, ${c.b[0].toFixed(3)}) differ by only ${c.gap.toFixed(3)}, a tie at this precision`
      : `\`${code(x.run.method)}\` ranks them in the true order`;
  });
  return [goodText.length ? `in this run ${goodText.join('; ')}` : '',
    bad.length ? `${goodText.length ? '' : 'in this run '}${bad.join(', ')} do${bad.length === 1 ? 'es' : ''} not` : ''].filter(Boolean).join(', and ');
}

function annotatorTable() {
  const cmRuns = results.filter(({ run }) => LEARNS_CMS.has(run.method));
  if (!cmRuns.length) return '(no method that learns CMs was run)';
  const names = cmRuns[0].r.metrics.annotatorNames;
  const lines = [`| Method | ${names.map((n) => `CM error ${n}`).join(' | ')} | ${names.map((n) => `reliability ${n}`).join(' | ')} |`,
    `| --- | ${names.map(() => '---').join(' | ')} | ${names.map(() => '---').join(' | ')} |`];
  for (const { run, r } of cmRuns) {
    const m = r.metrics;
    lines.push(`| \`${code(run.method)}\` | ${m.cmErrorPerAnnotator.map((e) => f(e.mean, 1, 4)).join(' | ')} | ${m.reliability.map((x) => f(x, 1, 3)).join(' | ')} |`);
  }
  lines.push(`| true (the test cases' annotations) | ${names.map(() => '-').join(' | ')} | ${truth.map((t) => f(t.meanDiagonal, 1, 3)).join(' | ')} |`);
  return `${lines.join('\n')}

"CM error" is the RMSE of each annotator's CMs. The two kinds of "reliability" row are different quantities, so
compare the order of the values within a row, not the values across rows. The model rows give the model's estimate,
the mean of trace(A_r)/L over every test voxel: a mean weighted by voxel, dominated by the background
(${f(truth[0]?.backgroundShare, 100, 0)}% of the test voxels). The last row is the mean over the classes present (each class counts
once) of the diagonal of the annotator's true CM pooled over the test voxels. True diagonals per class (background, NCR, ED, ET)
and the fraction of test voxels each annotator labels wrongly:
${truth.map((t) => `${t.name} ${t.diagonal.map((d) => d.toFixed(3)).join(' / ')}, ${(100 * t.errorRate).toFixed(2)} % wrong`).join('; ')}.
A model that learnt the annotators should at least order them like the last row; ${rankingNote(cmRuns)}.`;
}
// Where each tumour class's test voxels went in the consensus prediction (eval's classConfusion).
const SHORT_NAMES = ['BG', 'NCR', 'ED', 'ET'];
/** "ET 100.0" or "NCR 71.2, ED 20.1": the classes given at least 5% of a distribution, largest first. */
function shares(distribution) {
  if (!distribution) return '-';
  const big = distribution.map((x, i) => [x, i]).filter(([x]) => x >= 0.05).sort((a, b) => b[0] - a[0]);
  return big.map(([x, i]) => `${SHORT_NAMES[i] ?? i} ${(100 * x).toFixed(1)}`).join(', ');
}
/** Column j of a [predicted][reference] count matrix as shares of its sum (undefined when empty). */
function columnShares(confusion, j) {
  const sum = confusion.reduce((acc, row) => acc + row[j], 0);
  return sum > 0 ? confusion.map((row) => row[j] / sum) : undefined;
}
function confusionSection() {
  const scored = results.filter(({ r }) => r.metrics.classConfusion);
  if (!scored.length) return '(the evaluations predate the class confusion: run the script again to score them)';
  const lines = ['| Method | NCR predicted as (%) | ED predicted as (%) | ET predicted as (%) |', '| --- | --- | --- | --- |'];
  const swaps = [];
  const swapped = new Map(); // method -> "j>k" pairs it learnt swapped
  for (const { run, r } of scored) {
    const cells = [1, 2, 3].map((j) => shares(columnShares(r.metrics.classConfusion, j)));
    lines.push(`| ${METHODS.find(([k]) => k === run.method)[1]} (\`${code(run.method)}\`) | ${cells.join(' | ')} |`);
    for (const j of [1, 2, 3]) {
      const col = columnShares(r.metrics.classConfusion, j);
      if (!col) continue;
      const top = col.indexOf(Math.max(...col));
      if (top !== j && top !== 0) {
        swaps.push(`\`${code(run.method)}\` ${SHORT_NAMES[j]} as ${SHORT_NAMES[top]} (${(100 * col[top]).toFixed(1)}%)`);
        swapped.set(run.method, [...(swapped.get(run.method) ?? []), `${j}>${top}`]);
      }
    }
  }
  const says = [1, 2, 3].map((j) => `${SHORT_NAMES[j]}: ${truth.map((t) => `${t.name} ${shares(t.columns?.[j])}`).join('; ')}`);
  // The share of the annotators' labels on class j's voxels that name j, averaged over annotators.
  const agree = (j) => truth.reduce((sum, t) => sum + (t.columns?.[j]?.[j] ?? NaN), 0) / truth.length;
  return `${lines.join('\n')}

Each cell: the classes the consensus prediction gave at least 5% of that tumour class's test voxels (its
recall is the share of its own name). ${swaps.length
    ? `A tumour class learnt as another tumour class (the largest share of its voxels): ${swaps.join('; ')}.`
    : 'No method learnt a tumour class as another tumour class.'}

What the annotators say on the test voxels of each tumour class (% of the class's voxels):
${says.join('.\n')}.
Of the annotators' labels, ${f(agree(1), 100, 0)}% name the true class on the NCR voxels, ${f(agree(2), 100, 0)}% on the ED voxels and
${f(agree(3), 100, 0)}% on the ET voxels (mean over the ${truth.length} annotators). With pixel-wise CMs every voxel's labels are explained
as well by another true class: a model that calls the NCR voxels ET explains \`over\`'s NCR there by an
\`over\` CM that maps ET to NCR at those voxels, and \`wrong\`'s ET by an identity. The cross-entropy
alone cannot tell these apart; which one training reaches depends on the start, the trace term and the network.${traceRemark(swapped)}${blocksRemark(swapped, scored)}`;
}

/** Whether giving the annotator network layers of its own (`cm-head-blocks`) avoided a swap that `cm` made. */
function blocksRemark(swapped, scored) {
  const blocks = scored.find(({ run }) => run.method === 'cm-head-blocks');
  if (!blocks || !(swapped.get('cm') ?? []).length || (swapped.get('cm-head-blocks') ?? []).length) return '';
  const dice = blocks.r.metrics.dicePerClass;
  return `
With 2 blocks before each CM head (\`cm --cm-head-blocks 2\`, as in the authors' code) the annotator network has layers of
its own rather than 1x1 heads on the segmentation's features, and in this run no tumour class was learnt as another
(Dice NCR ${f(dice[1]?.mean, 100, 2)}, ED ${f(dice[2]?.mean, 100, 2)}, ET ${f(dice[3]?.mean, 100, 2)}). One seed: whether a swap happens
depends on the start (with other seeds, by hand, \`cm\` learnt NCR and the head blocks swapped it: see the README),
so read this as what one run did, not as an effect of the blocks.`;
}

/** Whether the trace term decided a swap here: `cm` and `cm-notrace` (lambda 0) swapping the same classes says it did not. */
function traceRemark(swapped) {
  const withTrace = swapped.get('cm') ?? [];
  const without = swapped.get('cm-notrace') ?? [];
  const both = withTrace.filter((pair) => without.includes(pair));
  if (!both.length) return '';
  const pairs = both.map((pair) => pair.split('>').map((c) => SHORT_NAMES[Number(c)]).join(' as ')).join(', ');
  return `
Here \`cm\` and \`cm-notrace\` (lambda 0) reach the same swap (${pairs}): the trace term does not decide it.`;
}

function niftiSection() {
  const c = niftiCheck;
  if (!c.result) return `One \`cmseg predict\` on test case \`${c.testCase}\`: ${c.summary}.`;
  const rows = c.result.files.map((x) => `| \`${rel(x.file)}\` | ${x.shape.join('×')} | ${x.dtype} | ${x.spatialShapeMatches ? 'yes' : 'NO'} | ${x.affineMatches ? 'yes' : 'NO'} |`);
  return `One \`cmseg predict\` of \`${predictRun.method}\` on test case \`${c.testCase}\` (the source is \`${rel(c.source)}\`,
${c.result.sourceShape.join('×')} voxels). Every NIfTI file it wrote was loaded with nibabel
(\`nib.load\`, \`np.asarray(img.dataobj)\`) and compared with the source segmentation: ${c.summary}.

| file | shape | dtype | spatial shape = source | affine = source |
| --- | --- | --- | --- | --- |
${rows.join('\n')}`;
}

const minutes = (Date.now() - started) / 60000;
const cpu = cpus();
const scriptFlags = args.filter((a) => a !== '--out' && a !== options.out).join(' ');
const report = `# BraTS phantoms with three synthetic annotators (paper Tables 3, 7, 8 layout, CPU scale)

Written by \`scripts/reproduce-brats-phantom.mjs\`${options.smoke ? ' in **smoke** mode (a pipeline check, not a result)' : ''} on ${new Date().toISOString().slice(0, 10)}:
${cpu.length} × ${cpu[0]?.model ?? 'unknown CPU'}, ${platform()} ${release()}, Node ${process.version}, every command with \`--threads ${options.threads}\`, one training process at a time.
The training and evaluation of the ${runs.length} methods took ${(runSeconds / 60).toFixed(1)} min of wall time in all (the last column, in seconds);
this invocation of the script took ${minutes.toFixed(1)} min, ${(workSeconds / 60).toFixed(1)} of them in cmseg commands (runs finished by an
earlier invocation are skipped).

CPU budget: the default settings are sized to finish in about 45 minutes of wall time on a shared 2-core
machine, training one method at a time; at 600 steps (a quarter) the methods that learn CMs had not yet
learnt the tumour core and enhancing classes apart from edema.

**Read these tables as a check of the pipeline and of what each method learns from these synthetic
annotators, not as evidence about the methods on real data.** It is one training seed (${options.seed}),
${options.steps} optimiser steps of one ${options.patch}³ patch per method, on ${options.cases} synthetic phantom cases with
${testIds.length} test case(s), on a shared CPU. The paper trains for far longer on hundreds of real BraTS cases;
differences of a few points between rows are probably within what a different seed would change, and
the ranking of the methods here says little about their ranking in the paper.

## Setting

- **Data**: \`cmseg phantom brats\`: ${options.cases} synthetic cases of ${options.size.split(',').join('×')} voxels (seed 0), four MR
  modalities and a tumour segmentation (necrotic core, edema, enhancing rim) in the BraTS 2021 file layout.
  Split by the data seed 0 (70/15/15): training ${(splits.train ?? []).length}, validation ${(splits.validation ?? []).length}, test ${(splits.test ?? []).length}
  (${testIds.map((id) => `\`${id}\``).join(', ')}).
- **Annotators**: \`cmseg prepare\` with over, under and wrong (the default; SPEC section 7), dense labels
  (every annotator labels every case), annotator seed 0, images stored as float16.
- **Training**: preset \`brats3d\` (U-Net depth 4, c 16, batch 1, Adam at lr 1e-3 with the poly schedule,
  lambda 0.01, flips and rotations, a third of the patches centred on tumour), but patches of ${options.patch}³
  instead of 64³ and ${options.steps} steps (validation on ${Math.min((splits.validation ?? []).length, 2)} case(s) and a checkpoint every
  ${options.stepsPerEpoch} steps) instead of 20 epochs of 100 steps. Training seed ${options.seed}.${options.methods.some((m) => m.includes('staple'))
    ? `
  The STAPLE rows train on each training case's annotators fused once, per case, by the native multi-label or
  spatial STAPLE (the maps are kept in the cache beside the case and reused by later runs).`
    : ''}
- **Scoring**: \`cmseg eval\` of the checkpoint with the best validation score on the test split, whole volumes by
  sliding windows of the patch size (overlap 0.5).

Columns: **Dice NCR / ED / ET** = Dice (%) of the consensus prediction per tumour class (necrotic core,
edema, enhancing tumour) against the phantom's true segmentation; **WT / TC / ET** = the BraTS region
Dice (%) of whole tumour (NCR+ED+ET), tumour core (NCR+ET) and enhancing tumour (on these labels the
ET region is the ET class, so both ET columns agree); **CM estimation error** = RMSE between the estimated
and true per-voxel CMs (SPEC section 6), averaged over the three annotators; **GED** = generalised
energy distance between the model's three annotator predictions and the three observed annotations.
The last two exist only for the methods that learn CMs. Every value is the mean over the test case(s).
**best step** = the step of the scored checkpoint (the validation with the highest average Dice over the
three tumour classes, validated every ${options.stepsPerEpoch} steps).

## Method table (test split)

${mainTable()}

The same checkpoints' 95th-percentile Hausdorff distance per region (mm, 1 mm phantom voxels; mean over the
test cases where HD95 is defined: both maps have the region, or neither (0 mm); the count in brackets when not all):

${hd95Table()}

${stapleNote()}

## Where each tumour class went (test split)

${confusionSection()}

## Annotator CMs (test split)

${annotatorTable()}

## NIfTI output

${niftiSection()}

## Commands

\`\`\`sh
npm run build:ts
node scripts/reproduce-brats-phantom.mjs${scriptFlags ? ` ${scriptFlags}` : ''}
\`\`\`

which runs, in order:

\`\`\`sh
${commands.join('\n')}
\`\`\`

and then the nibabel check of the prediction (${niftiCheck.command}).
Each run folder (for example \`${rel(runs[0].out)}\`) holds \`best.safetensors\`, \`last.safetensors\`,
\`train-log.jsonl\` and \`eval-test.json\`.
`;
mkdirSync(dirname(outFile), { recursive: true });
writeFileSync(outFile, report);
process.stdout.write(`\nreport written: ${rel(outFile)}\nruns: ${rel(runsDir)}\n`);
