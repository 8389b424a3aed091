// Edge cases of the training curves, score reports and pictures that a user runs into:
// broken or diverged training logs (src/train/trainer.ts readTrainLog, src/report/curves.ts,
// src/report/chart.ts), `cmseg curves --out` and its run argument (src/cli/curves.ts),
// scores against a majority vote (src/train/evaluate.ts, through eval and train), many classes and
// tiny images in pictures (src/report/pictures.ts) and `predict --scale` (src/cli/predict.ts).
// Exact checks: pixels, strings and exit codes; no tolerances.
import t from 'tap';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { lineChart, niceTicks, tickLabel } from '../src/report/chart';
import { movingAverage, trainingCurves } from '../src/report/curves';
import { captioned, classColor, cmFigure, colorBar } from '../src/report/pictures';
import { textWidth } from '../src/report/font';
import { formatAnnotatorCms } from '../src/eval/report';
import { readTrainLog } from '../src/train/trainer';
import { readPngSync, type PngImage } from '../src/data/png';
import { runCli } from './helpers/cli';

const rgb = (im: PngImage, x: number, y: number) => [...im.data.subarray((y * im.width + x) * 3, (y * im.width + x) * 3 + 3)];
const isInk = (im: PngImage, x: number, y: number) => rgb(im, x, y).every((v) => v === 0);
/** Pixels of `im` in `color` inside the box [x0, x1) x [y0, y1). */
const count = (im: PngImage, color: readonly number[], x0 = 0, x1 = im.width, y0 = 0, y1 = im.height) => {
  let n = 0;
  for (let y = y0; y < y1; y++) for (let x = x0; x < x1; x++) if (rgb(im, x, y).join() === color.join()) n++;
  return n;
};
const tmp = (t: { teardown: (fn: () => void) => void }) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cmseg-edges-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
};
const stepLine = (step: number, loss: number | null, ce: (number | null)[]) => JSON.stringify({ event: 'step', step, loss, ce, trace: [] });

t.test('readTrainLog: only JSON objects are entries; only an unterminated last line is "being written"', async (t) => {
  const dir = tmp(t);
  const file = path.join(dir, 'train-log.jsonl');
  fs.writeFileSync(file, `${stepLine(1, 1, [1])}\nnull\n`);
  t.throws(() => readTrainLog(file), { name: 'SyntaxError', message: /line 2 is not a training log entry: null is not a JSON object/ }, 'null: named, not a TypeError later');
  fs.writeFileSync(file, `[1,2]\n${stepLine(1, 1, [1])}\n`);
  t.throws(() => readTrainLog(file, { whileWritten: true }), /line 1 is not a training log entry: \[1,2\]/);
  // A complete (newline-ended) last line that does not parse is a broken log, not one being written.
  fs.writeFileSync(file, `${stepLine(1, 1, [1])}\ngarbage\n`);
  t.throws(() => readTrainLog(file, { whileWritten: true }), /line 2 is not a training log entry/);
  fs.writeFileSync(file, `${stepLine(1, 1, [1])}\n{"event":"st`);
  t.same(readTrainLog(file, { whileWritten: true }).length, 1, 'a line still being written (no newline yet) is left out');
});

t.test('curves of a diverged run and of a naive method', async (t) => {
  // One NaN (a diverged step: JSON writes it as null) must not blank the rest of the average.
  t.same(movingAverage([1, 2, NaN, 4, 5, 6], 2), [1, 1.5, 2, 4, 4.5, 5.5]);
  t.same(movingAverage([NaN, NaN, 3], 1), [NaN, NaN, 3]);

  const ORANGE = [213, 94, 0];
  const width = 600;
  // Steps 1..3 with the CE of step 2 null: the picture is the chart of a CE missing there
  // (no dip to 0 that would read as a perfect loss).
  const nanStep = trainingCurves(
    [1, 2, 3].map((s) => JSON.parse(stepLine(s, s === 2 ? null : 1, s === 2 ? [null, null] : [0.4, 0.4]))),
    { width },
  );
  const loss = [[1, 1], [2, NaN], [3, 1]] as const;
  const expected = lineChart(
    [
      { name: 'loss per step', color: [178, 210, 235], points: loss, width: 1, hideInLegend: true },
      { name: 'loss', color: [0, 114, 178], points: loss },
      { name: 'cross-entropy, sum over annotators', color: [213, 94, 0], points: [[1, 0.8], [2, NaN], [3, 0.8]] },
    ],
    { width, height: 270, title: 'training loss', xLabel: 'step' },
  );
  t.same([nanStep.width, nanStep.height], [expected.width, expected.height]);
  t.ok(Buffer.from(nanStep.data).equals(Buffer.from(expected.data)), 'a null CE is a gap in the line, not a 0');

  // naive methods log ce: []: no cross-entropy line (nor its legend sample) at all.
  const naive = trainingCurves([1, 2, 3].map((s) => JSON.parse(stepLine(s, 1 / s, []))), { width });
  t.equal(count(naive, ORANGE), 0, 'no orange CE series for a log without annotator CEs');
});

t.test('chart axes: flat series, huge values, a single step, long runs', async (t) => {
  // A flat loss averaged differs by an ulp: the ticks must still come back (it looped forever).
  t.same(niceTicks(0.1, 0.10000000000000002), niceTicks(0.1, 0.1));
  t.same(niceTicks(2.5, 2.5000000000000004), niceTicks(2.5, 2.5));
  t.equal(tickLabel(1e30), '1e30', 'not "1e+24M"');
  t.equal(tickLabel(2.5e12), '2.5e12');
  t.equal(tickLabel(3_000_000), '3M', 'millions unchanged');

  // One step: its point inside the plot, not on the frame's right edge.
  const one = lineChart([{ name: 'loss', color: [0, 114, 178], points: [[1, 0.7]] }], { width: 400, height: 240, title: '', xLabel: 'step' });
  const [px] = one.layout.toPixel(1, 0.7);
  t.ok(px > one.layout.plot.x + 10 && px < one.layout.plot.x + one.layout.plot.width - 10, `the one step at x = ${px}, inside the plot`);
  t.ok(count(one, [0, 114, 178]) >= 25 + 20, 'drawn as a square big enough to see (and its legend sample)');

  // Steps with a NaN loss still count for the x axis: a run that diverged at step 50 of 100 shows 100 steps.
  const diverged = lineChart([{ name: 'loss', color: [0, 0, 255], points: Array.from({ length: 100 }, (_, k) => [k + 1, k < 50 ? 1 / (k + 1) : NaN] as const) }], { width: 400, height: 240, title: '', xLabel: 'step' });
  t.equal(diverged.layout.xRange[1], 100);

  // 60,000 steps x 3 series: Math.min(...points) would overflow the call stack.
  const long = Array.from({ length: 60_000 }, (_, k) => [k + 1, 1 / (k + 1)] as const);
  t.doesNotThrow(() => lineChart([1, 2, 3].map((c) => ({ name: `s${c}`, color: [c, 0, 0] as const, points: long })), { width: 300, height: 200, title: '', xLabel: 'step' }));
});

t.test('cmseg curves: --out into a new folder, onto a folder, the log named instead of the run', async (t) => {
  const dir = tmp(t);
  const run = path.join(dir, 'run');
  fs.mkdirSync(run);
  fs.writeFileSync(path.join(run, 'train-log.jsonl'), [1, 2, 3].map((s) => stepLine(s, 1 / s, [0.5 / s])).join('\n') + '\n');
  const nested = await runCli(['curves', run, '--out', path.join(dir, 'figures', 'new', 'c.png')], dir);
  t.equal(nested.exitCode, 0, nested.stderr);
  t.ok(readPngSync(path.join(dir, 'figures', 'new', 'c.png')).width > 0, 'the missing folders are made');
  fs.mkdirSync(path.join(dir, 'pics'));
  const onFolder = await runCli(['curves', run, '--out', path.join(dir, 'pics')], dir);
  t.equal(onFolder.exitCode, 1);
  t.match(onFolder.stderr, /--out pics is a folder: name the picture's file \(e\.g\. pics\/curves\.png\)/);
  t.notMatch(onFolder.stderr, /\.tmp/, 'no temp file name in the message');
  const logNamed = await runCli(['curves', path.join(run, 'train-log.jsonl')], dir);
  t.equal(logNamed.exitCode, 1);
  t.match(logNamed.stderr, /run\/train-log\.jsonl is a file: name the run folder that holds train-log\.jsonl \(cmseg curves run\)/);
});

t.test('class colours past the palette: never background black, no two of the first 21 alike', async (t) => {
  const colours = Array.from({ length: 21 }, (_, k) => classColor(k + 1).join());
  t.equal(new Set(colours).size, 21, 'classes 1..21 all distinct');
  t.notOk(colours.includes('0,0,0'), 'class 8 (and any other) is not drawn in background black');
  t.same(classColor(0), [0, 0, 0]);
  t.same(classColor(1), [230, 159, 0], 'the palette itself unchanged');
});

t.test('tiny pictures keep their captions, CM column names and a readable colour bar', async (t) => {
  // A 16-pixel image (--scale 1): its caption must be drawn whole.
  const tile: PngImage = { width: 16, height: 16, channels: 1, data: new Uint8Array(256).fill(9) };
  const caption = 'fracture labels'; // ends in S, whose glyph inks its last column
  const c = captioned(tile, caption)!;
  let right = -1;
  for (let y = 0; y < c.height - 16; y++) for (let x = 0; x < c.width; x++) if (isInk(c, x, y)) right = Math.max(right, x);
  t.equal(right, 2 + textWidth(caption, 1) - 1, 'the whole caption, at scale 1');

  // A 2-class CM of 8x8 tiles at scale 1: each column still headed, the title whole.
  const [h, w, L] = [8, 8, 2];
  const cms = new Float32Array(L * L * h * w).fill(0.5);
  const fig = cmFigure(cms, 0, 0, 1, L, h, w, 1, { annotator: 'over', classes: ['background', 'digit'] });
  const headerInk = (j: number) => {
    let n = 0;
    for (let y = 11; y < fig.gridY; y++) for (let x = fig.gridX + j * (w + 2); x < fig.gridX + j * (w + 2) + w; x++) if (isInk(fig, x, y)) n++;
    return n;
  };
  t.ok(headerInk(0) > 0 && headerInk(1) > 0, 'ink over both columns (their class numbers)');
  t.ok(fig.width >= textWidth('over: p(says row | true column)', 1) + 4, 'wide enough for its title');
  // A bar too narrow for "0", "0.5" and "1" apart writes the ends only: no glyph overprints another.
  const bar = colorBar(18, 1);
  const labelRow = Array.from({ length: 18 }, (_, x) => [...Array(7).keys()].some((dy) => isInk(bar, x, bar.height - 9 + dy)));
  const runs = labelRow.map((ink) => (ink ? '#' : '.')).join('').split(/\.+/).filter(Boolean);
  t.equal(runs.length, 2, `two labels, apart: ${labelRow.map((ink) => (ink ? '#' : '.')).join('')}`);
});

t.test('an annotator with no labels gets one line', async (t) => {
  const noLabels = formatAnnotatorCms([{ trueMatrix: [[null, null], [null, null]], estimatedMatrix: [[null, null], [null, null]] }], () => 'over', (c) => `class ${c}`);
  t.match(noLabels, /over: labelled none of the scored voxels, no CM to compare/);
  t.notMatch(noLabels, /n\/a/);
});

t.test('eval against a majority vote writes no annotator CMs; predict refuses a huge --scale plainly', async (t) => {
  const dir = tmp(t);
  const trained = await runCli(['train', '--preset', 'mnist-tiny', '--steps', '2', '--no-test', '--quiet', '--threads', '1', '--out', 'run'], dir);
  t.equal(trained.exitCode, 0, trained.stderr);
  const sim = await runCli(['simulate', '--out', 'data', '--count', '6'], dir);
  t.equal(sim.exitCode, 0, sim.stderr);
  fs.rmSync(path.join(dir, 'data', 'consensus'), { recursive: true });
  const ev = await runCli(['eval', '--checkpoint', 'run/best.safetensors', '--data', 'data', '--out', 'e.json', '--threads', '1'], dir);
  t.equal(ev.exitCode, 0, ev.stderr);
  t.match(ev.stdout, /majority vote/);
  t.notMatch(ev.stdout, /Annotator CMs/);
  const metrics = JSON.parse(fs.readFileSync(path.join(dir, 'e.json'), 'utf8')).metrics;
  t.equal(metrics.annotatorCms, undefined, 'none in the JSON either');
  t.ok(Array.isArray(metrics.classConfusion));
  // train's test scores go through the same vote: none in its eval-test.json either.
  const folderRun = await runCli(['train', '--preset', 'images', '--data', 'data', '--steps', '2', '--depth', '2', '--base-channels', '4', '--quiet', '--threads', '1', '--out', 'run2'], dir);
  t.equal(folderRun.exitCode, 0, folderRun.stderr);
  const testMetrics = JSON.parse(fs.readFileSync(path.join(dir, 'run2', 'eval-test.json'), 'utf8'));
  t.equal(testMetrics.reference ?? testMetrics.metrics?.reference, 'majority vote');
  t.equal(testMetrics.annotatorCms ?? testMetrics.metrics?.annotatorCms, undefined, 'train writes none against a vote');

  const big = await runCli(['predict', '--checkpoint', 'run/best.safetensors', '--out', 'pics', '--count', '1', '--scale', '20000', '--threads', '1'], dir);
  t.equal(big.exitCode, 1);
  t.match(big.stderr, /--scale 20000 would make the 32x32 pictures 640000x640000 pixels; at most 4096 a side \(--scale 73 or less here: the sheet of pictures bounds it too\)/);
});

t.test('one volume: the CM error prints alone, as every other figure; two print mean ± std', async (t) => {
  const { evaluateSegmentation } = await import('../src/eval/metrics');
  const { formatSegmentationReport } = await import('../src/eval/report');
  // N images of 4 pixels, 2 classes, 2 annotators; the model's CMs: identity for annotator 0
  // (which copies the truth), a uniform 0.5 for annotator 1 (which flips pixel 0).
  const run = (n: number) => {
    const truth = new Uint8Array(4 * n).map((_, i) => (i % 4 < 2 ? 1 : 0));
    const flipped = truth.map((v, i) => (i % 4 === 0 && i < 4 ? 1 - v : v));
    const cms = new Float32Array(n * 2 * 4 * 4);
    for (let img = 0; img < n; img++) {
      for (let p = 0; p < 4; p++) {
        const at = (r: number, i: number, j: number) => ((img * 2 + r) * 4 + i * 2 + j) * 4 + p;
        cms[at(0, 0, 0)] = 1;
        cms[at(0, 1, 1)] = 1;
        for (const i of [0, 1]) for (const j of [0, 1]) cms[at(1, i, j)] = 0.5;
      }
    }
    const report = evaluateSegmentation({ pred: truth, truth, n, classes: 2, cms, annotatorLabels: [truth, flipped] });
    const row = formatSegmentationReport(report).split('\n').find((l) => l.startsWith('| CM estimation error'));
    return { report, row };
  };
  const one = run(1);
  t.equal(one.report.images, 1);
  // Per annotator, one image each: RMSE of E - T over the 4 entries. Annotator 0: 0.
  // Annotator 1, T = [[1, 1/2], [0, 1/2]] (truth 1 said 0 once of twice): E - T = [[-.5, 0], [.5, 0]],
  // RMSE sqrt(0.5 / 4). The figure: the mean over annotators, sqrt(0.125) / 2 = 0.1768.
  t.ok(Math.abs(one.report.cmError!.mean - Math.sqrt(0.125) / 2) < 1e-6, `the mean over annotators of 0 and sqrt(1/8): ${one.report.cmError!.mean}`);
  t.match(one.row, /^\| CM estimation error \(RMSE\) \| 0\.1768 +\|$/, `printed alone: ${one.row}`);
  t.notMatch(formatSegmentationReport(one.report), /±/, 'no ± anywhere for one volume');
  const two = run(2);
  // Annotator 1 flips a pixel of image 0 only: its errors differ between the images, a real spread.
  t.match(two.row, /^\| CM estimation error \(RMSE\) \| \d\.\d{4} ± \d\.\d{4} +\|$/, `two images: mean ± std (${two.row})`);
});
