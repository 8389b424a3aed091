// The ETA of the bars of windows and cases (whole-volume predictions in predict, eval and train's
// test scores; phantom, prepare and the STAPLE fusion before training): "ETA" and the time left
// at the rate since the bar started, '-' before the first window or case is done, as train's bar.
// cli-progress's own {eta_formatted} drew "NFs" there (its "INF" cut to two characters).
import t from 'tap';
import * as fs from 'fs';
import * as path from 'path';
import { spawnSync } from 'child_process';
import { PassThrough } from 'stream';
import { windowProgress } from '../src/cli/window-progress';
import { phantomProgress } from '../src/cli/phantom';
import { createFusionProgress } from '../src/train/progress';
import { tempDir } from './helpers/files';

function capture() {
  const stream = Object.assign(new PassThrough(), { isTTY: true, columns: 160 }) as unknown as NodeJS.WriteStream;
  let text = '';
  (stream as unknown as PassThrough).on('data', (chunk: Buffer) => (text += chunk.toString()));
  return { stream, text: () => text };
}
/** Longer than cli-progress's redraw interval (100 ms): the bar's timer draws the current state. */
const redraw = () => new Promise((r) => setTimeout(r, 250));
const tick = () => new Promise((r) => setImmediate(r));
/** The frames cli-progress drew: each line between "cursor to column 1" and "clear to the end". */
const frames = (text: string) => [...text.matchAll(/\x1B\[1G([^\x1B]*)\x1B\[0K/g)].map((m) => m[1]);
const etaOf = (frame: string) => frame.slice(frame.lastIndexOf(' | ') + 3);

t.test('window bar: ETA - before the first window, then the time left at the rate so far', async (t) => {
  const out = capture();
  let clock = 1_000_000;
  const p = windowProgress('[1/1] BraTS2021_00001', out.stream, false, () => clock);
  p.onProgress(0, 8); // slidingWindowPredict reports 0 of the total first
  await redraw();
  clock += 1000;
  p.onProgress(0, 8); // redrawn while the first window runs: still unknown
  await redraw();
  clock += 5000;
  p.onProgress(2, 8); // 2 windows in 6 s: 6 windows left take 18 s
  await redraw();
  clock += 120_000;
  p.onProgress(4, 8); // 4 in 126 s: 4 left take 126 s
  await redraw();
  p.stop();
  await tick();
  const etas = frames(out.text()).map(etaOf);
  t.same(etas, ['ETA -', 'ETA 18s', 'ETA 2m06s'], JSON.stringify(frames(out.text())));
  t.notMatch(out.text(), /NF|LL|INF/);
});

t.test('fusion bar: the same ETA text', async (t) => {
  const out = capture();
  let clock = 0;
  const bar = createFusionProgress({ stream: out.stream, now: () => clock });
  bar.start(4, 'multi-label STAPLE');
  await redraw();
  clock += 3000;
  bar.case(1, 'BraTS2021_00001', 'fused', 3); // 1 case in 3 s: 3 left take 9 s
  await redraw();
  bar.stop();
  await tick();
  t.same(frames(out.text()).map(etaOf), ['ETA -', 'ETA 9s']);
});

t.test('phantom bar: the same ETA text', async (t) => {
  const out = capture();
  let clock = 0;
  const bar = phantomProgress(out.stream, 10, () => clock);
  await redraw();
  clock += 4000;
  bar.onCase('BraTS2021_00000', 0); // 1 case in 4 s: 9 left take 36 s
  await redraw();
  clock += 4000;
  bar.onCase('BraTS2021_00001', 1); // 2 in 8 s: 8 left take 32 s
  await redraw();
  bar.stop();
  await tick();
  t.same(frames(out.text()).map(etaOf), ['ETA -', 'ETA 36s', 'ETA 32s']);
});

// The commands on a real terminal (script(1) gives them one): no "NFs" anywhere.
const main = path.resolve(__dirname, '..', 'dist', 'cli', 'main.js');
const noScript = spawnSync('script', ['--version']).status !== 0;
t.test('phantom and prepare on a terminal: ETA texts, no NFs', { skip: noScript ? 'no script(1)' : !fs.existsSync(main) ? 'no dist/ build' : false }, async (t) => {
  const dir = tempDir(t, 'cmseg-bar-eta-');
  const log = path.join(dir, 'typescript');
  const command = `node ${main} phantom brats --cases 3 --size 24,24,16 --out ${dir}/phantom && node ${main} prepare --data ${dir}/phantom --out ${dir}/cache`;
  const r = spawnSync('script', ['-qfec', command, log], { encoding: 'utf8', timeout: 120_000 });
  t.equal(r.status, 0, r.stdout + r.stderr);
  const text = fs.readFileSync(log, 'utf8');
  const bars = frames(text).filter((f) => /^(phantom|prepare) \[/.test(f));
  t.ok(bars.some((f) => f.startsWith('phantom')) && bars.some((f) => f.startsWith('prepare')), JSON.stringify(bars));
  for (const f of bars) t.match(etaOf(f), /^ETA (-|\d+s|\d+m\d\ds)$/, f);
  t.notMatch(text, /NFs|LLs/);
});
