// Training curves: nice ticks, lines and charts drawn where the data maps (src/report/chart.ts),
// a run's log turned into its picture (src/report/curves.ts), and `cmseg curves` / the
// curves.png that `cmseg train` writes.
import t from 'tap';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { drawLine, lineChart, niceTicks, tickLabel } from '../src/report/chart';
import { lossPanelRange, movingAverage, trainingCurves } from '../src/report/curves';
import { readPngSync, type PngImage } from '../src/data/png';
import { runCli } from './helpers/cli';

const rgb = (im: PngImage, x: number, y: number) => [...im.data.subarray((y * im.width + x) * 3, (y * im.width + x) * 3 + 3)];
const white = (w: number, h: number): PngImage => ({ width: w, height: h, channels: 3, data: new Uint8Array(w * h * 3).fill(255) });

t.test('nice ticks and their labels', async (t) => {
  t.same(niceTicks(0, 1), [0, 0.2, 0.4, 0.6, 0.8, 1]);
  t.same(niceTicks(1, 2400), [0, 500, 1000, 1500, 2000, 2500], 'steps 1..2400: from 0 in 500s to 2500');
  t.same(niceTicks(0.05, 4.16), [0, 1, 2, 3, 4, 5]);
  t.same(niceTicks(-0.5, 0.5), [-0.6, -0.4, -0.2, 0, 0.2, 0.4, 0.6]);
  t.same(niceTicks(3, 3), [2.6, 2.8, 3, 3.2, 3.4], 'a flat series gets a range around its value');
  t.same(niceTicks(2, 1), niceTicks(1, 2), 'reversed bounds');
  t.throws(() => niceTicks(0, Infinity), /finite/);
  t.equal(tickLabel(0.30000000000000004), '0.3');
  t.equal(tickLabel(2500), '2500');
  t.equal(tickLabel(20000), '20k');
  t.equal(tickLabel(3_000_000), '3M');
});

t.test('lines: every pixel between the ends, as thick as asked, clipped', async (t) => {
  const im = white(10, 5);
  drawLine(im, 1, 2, 8, 2, [255, 0, 0]);
  const row = (y: number) => Array.from({ length: 10 }, (_, x) => (rgb(im, x, y)[1] === 0 ? '#' : '.')).join('');
  t.equal(row(2), '.########.', 'horizontal, both ends included');
  t.equal(row(1) + row(3), '.'.repeat(20), 'one pixel thick');
  drawLine(im, 0, 0, 9, 4, [0, 0, 255], 3, [0, 0, 5, 5]);
  t.same(rgb(im, 0, 0), [0, 0, 255], 'a diagonal starts at its first end');
  t.same(rgb(im, 9, 4), [255, 255, 255], 'and is clipped at the clip box');
});

t.test('a chart puts each point where its layout maps it', async (t) => {
  const points: [number, number][] = [[0, 0], [50, 0.5], [100, 1]];
  const chart = lineChart([{ name: 'score', color: [0, 158, 115], points, marker: 5 }], { width: 400, height: 240, title: 'demo', xLabel: 'step', yRange: [0, 1] });
  const { plot, toPixel, xRange, yRange } = chart.layout;
  t.same(xRange, [0, 100]);
  t.same(yRange, [0, 1]);
  t.same(toPixel(0, 0), [plot.x, plot.y + plot.height - 1], 'origin at the bottom left corner');
  t.same(toPixel(100, 1), [plot.x + plot.width - 1, plot.y], '(max, max) at the top right');
  const [mx, my] = toPixel(50, 0.5).map(Math.round);
  t.same(rgb(chart, mx, my), [0, 158, 115], 'the middle point in the series colour');
  t.same(rgb(chart, Math.round(toPixel(40, 0)[0]), plot.y + 3), [225, 225, 225], 'a grid line at the tick x = 40, away from the series');
  t.same(rgb(chart, plot.x, plot.y + 5), [0, 0, 0], 'the frame');
  // The legend's sample of the series colour sits above the plot.
  let legend = 0;
  for (let y = 0; y < plot.y; y++) for (let x = 0; x < chart.width; x++) if (rgb(chart, x, y).join() === '0,158,115') legend++;
  t.ok(legend > 20, `the legend shows the series colour (${legend} pixels)`);
  // A non-finite point breaks the line: nothing drawn between its neighbours.
  const broken = lineChart([{ name: 's', color: [255, 0, 0], points: [[0, 0], [1, NaN], [2, 0]] }], { width: 300, height: 200, title: '', xLabel: 'x', yRange: [-1, 1] });
  const [x1, y1] = broken.layout.toPixel(1, 0).map(Math.round);
  t.notSame(rgb(broken, x1, y1), [255, 0, 0], 'a gap where the NaN point was');
});

t.test('curves of a log: a moving average, the later entry of a repeated step, a panel for validations', async (t) => {
  t.same(movingAverage([1, 2, 3, 4, 5], 2), [1, 1.5, 2.5, 3.5, 4.5]);
  t.same(movingAverage([4], 3), [4]);
  t.throws(() => movingAverage([1], 0), /window/);
  const steps = (from: number, to: number, loss: number) =>
    Array.from({ length: to - from + 1 }, (_, k) => ({ event: 'step', step: from + k, loss, ce: [loss / 2, loss / 2], trace: [1, 1] }));
  const onlySteps = trainingCurves([...steps(1, 20, 1)], { width: 400 });
  t.equal(onlySteps.height, 180, 'one panel without validations');
  const withValidation = trainingCurves([...steps(1, 20, 1), { event: 'validation', step: 20, score: 0.5, cmError: 0.2 }], { width: 400 });
  t.equal(withValidation.height, 2 * 180 + 8, 'two panels with one');
  // A resumed run: steps 11..20 again with another loss; the picture uses the later ones.
  const resumed = trainingCurves([...steps(1, 20, 1), ...steps(11, 20, 3)], { width: 400 });
  const fresh = trainingCurves([...steps(1, 10, 1), ...steps(11, 20, 3)], { width: 400 });
  t.same(resumed.data, fresh.data, 'the same picture as a log without the repeated steps');
  t.throws(() => trainingCurves([{ event: 'start' }]), /no step entries/);
});

t.test('cmseg train writes curves.png; cmseg curves draws any run folder', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cmseg-curves-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const run = path.join(dir, 'run');
  const train = await runCli(['train', '--preset', 'mnist-tiny', '--steps', '4', '--no-test', '--quiet', '--out', run], dir);
  t.equal(train.exitCode, 0, train.stderr);
  t.match(train.stdout, /\n {2}curves +.*run\/curves\.png\n/, 'listed with the outputs');
  const picture = readPngSync(path.join(run, 'curves.png'));
  t.same([picture.width, picture.height], [900, 2 * 405 + 8], 'loss and validation panels');

  const again = await runCli(['curves', run, '--out', path.join(dir, 'again.png')], dir);
  t.equal(again.exitCode, 0, again.stderr);
  t.same(readPngSync(path.join(dir, 'again.png')).data, picture.data, 'the command draws the same picture from the log');
  // A run still writing its log: a last line cut short is left out; a broken line before it is named.
  const log = fs.readFileSync(path.join(run, 'train-log.jsonl'), 'utf8');
  fs.writeFileSync(path.join(run, 'train-log.jsonl'), log + '{"event":"step","st');
  const partial = await runCli(['curves', run, '--out', path.join(dir, 'partial.png')], dir);
  t.equal(partial.exitCode, 0, partial.stderr);
  t.same(readPngSync(path.join(dir, 'partial.png')).data, picture.data, 'the same picture without the cut line');
  fs.writeFileSync(path.join(run, 'train-log.jsonl'), 'garbage\n' + log);
  const broken = await runCli(['curves', run], dir);
  t.equal(broken.exitCode, 1);
  t.match(broken.stderr, /train-log\.jsonl line 1 is not a training log entry/);
  const none = await runCli(['curves', dir], dir);
  t.equal(none.exitCode, 1);
  t.match(none.stderr, /has no train-log\.jsonl: is it a cmseg train --out folder\?/);
});

t.test('a long run whose first steps dwarf the rest: the loss panel is cut above the smoothed curve, and says so', async (t) => {
  const n = 20_000;
  const loss = Array.from({ length: n }, (_, i) => 0.25 + 2.8 * Math.exp(-(i + 1) / 150) + 0.04 * Math.sin(i * 1.7));
  const window = Math.round(n / 50);
  const cut = lossPanelRange(loss, [movingAverage(loss, window)], window);
  t.ok(cut, 'cut');
  // By hand: after 5% of the steps (and 2 windows) the smoothed loss is 0.25 + 2.8 e^(-1000/150) + a little.
  const atSkip = 0.25 + 2.8 * Math.exp(-1000 / 150);
  t.ok(cut!.range[1] > 1.25 * 0.25 && cut!.range[1] < 1.25 * (atSkip + 0.05), `upper end ${cut!.range[1]} just above the smoothed curve after the start`);
  t.equal(cut!.range[0], 0);
  t.ok(Math.abs(cut!.highest - Math.max(...loss)) < 1e-12, 'the highest step said');
  t.equal(lossPanelRange(loss.slice(0, 150), [movingAverage(loss.slice(0, 150), 3)], 3), undefined, 'short runs: the data\'s range');
  const flat = Array.from({ length: n }, (_, i) => 0.3 + 0.05 * Math.sin(i));
  t.equal(lossPanelRange(flat, [movingAverage(flat, window)], window), undefined, 'a loss that does not fall by half: the data\'s range');
});
