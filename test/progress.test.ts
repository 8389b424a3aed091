// How a training run reports itself (src/train/progress.ts): on a terminal one bar with the
// epoch, step, loss, CE, trace and the last validation Dice; elsewhere one plain line per
// epoch; nothing when quiet. The STAPLE fusion before training reports per case the same way.
// The expected strings are written out here: 4 decimals for loss, CE and Dice, 3 for the
// trace, '-' for a value not known yet (NaN), bars of 24 cells.
import t from 'tap';
import { PassThrough } from 'stream';
import { createFusionProgress, createProgress, ProgressFields, silentProgress } from '../src/train/progress';

function capture(isTTY: boolean) {
  const stream = Object.assign(new PassThrough(), { isTTY, columns: 200 }) as unknown as NodeJS.WriteStream;
  let text = '';
  (stream as unknown as PassThrough).on('data', (chunk: Buffer) => (text += chunk.toString()));
  return { stream, text: () => text };
}

const tick = () => new Promise((r) => setImmediate(r));
/** Longer than cli-progress's redraw interval (100 ms): the bar's timer draws the current state. */
const redraw = () => new Promise((r) => setTimeout(r, 250));

/** The frames cli-progress drew: each line between "cursor to column 1" and "clear to the end". */
const frames = (text: string) => [...text.matchAll(/\x1B\[1G([^\x1B]*)\x1B\[0K/g)].map((m) => m[1]);
/** A bar of 24 cells, `done` of them filled. */
const cells = (done: number) => '='.repeat(done) + '-'.repeat(24 - done);
const escape = (s: string) => s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
/** A whole frame: the expected text, then " | " and the ETA, whatever it is. */
const frame = (expected: string) => new RegExp(`^${escape(expected)} \\| [^|]+$`);

const unknown: ProgressFields = { epoch: 0, epochs: 2, loss: NaN, ce: NaN, trace: NaN, lr: NaN, valDice: NaN };
const known: ProgressFields = { epoch: 0, epochs: 2, loss: 1.2345, ce: 0.5, trace: 1.75, lr: 1e-3, valDice: 0.9 };

t.test('a terminal: the bar shows the epoch, step, loss, CE, trace and validation Dice', async (t) => {
  const out = capture(true);
  const p = createProgress({ stream: out.stream });
  p.start(8, 0, unknown);
  p.step(2, known);
  await redraw();
  p.epoch(4, { ...known, epoch: 0, loss: 0.25, ce: 0.125, trace: 2, valDice: 0.75 }, 3.2);
  await redraw();
  p.step(6, { ...known, epoch: 1, loss: 0.5, ce: 0.0625, trace: 0.5, valDice: 0.75 });
  p.stop();
  await tick();
  const text = out.text();
  const drawn = frames(text);
  t.equal(drawn.length, 4, JSON.stringify(drawn));
  t.match(drawn[0], frame(`epoch 1/2 [${cells(0)}] step 0/8 | last step: loss - | CE - | trace - | val Dice -`), 'started: nothing known yet');
  t.match(drawn[1], frame(`epoch 1/2 [${cells(6)}] step 2/8 | last step: loss 1.2345 | CE 0.5000 | trace 1.750 | val Dice 0.9000`), 'after step 2: the step\'s figures, labelled so');
  t.match(drawn[2], frame(`epoch 1/2 [${cells(12)}] step 4/8 | epoch mean: loss 0.2500 | CE 0.1250 | trace 2.000 | val Dice 0.7500`), 'at the end of epoch 1: the epoch\'s means, labelled so');
  t.match(drawn[3], frame(`epoch 2/2 [${cells(18)}] step 6/8 | last step: loss 0.5000 | CE 0.0625 | trace 0.500 | val Dice 0.7500`), 'drawn once more when stopped');
  t.ok(text.startsWith('\x1B7\x1B[?25l'), 'the cursor saved and hidden while the bar runs');
  t.ok(text.endsWith('\x1B[?25h\x1B[?7h\x1B8\n'), 'stopped: the cursor shown again and the bar left on its own line');
  t.notMatch(text, /\(\d+\.\d s\)/, 'no plain epoch lines on a terminal');
});

t.test('a terminal: a resumed run starts its bar at the step it stands at', async (t) => {
  const out = capture(true);
  const p = createProgress({ stream: out.stream });
  p.start(8, 4, { ...unknown, epoch: 1, valDice: 0.5 });
  p.stop();
  await tick();
  const drawn = frames(out.text());
  t.match(drawn[0], frame(`epoch 2/2 [${cells(12)}] step 4/8 | last step: loss - | CE - | trace - | val Dice 0.5000`));
});

t.test('a terminal: a finished run resumed shows its last epoch, not one past it', async (t) => {
  const out = capture(true);
  const p = createProgress({ stream: out.stream });
  p.start(8, 8, { ...unknown, epoch: 2, valDice: 0.5 });
  p.stop();
  await tick();
  t.match(frames(out.text())[0], frame(`epoch 2/2 [${cells(24)}] step 8/8 | last step: loss - | CE - | trace - | val Dice 0.5000`));
});

t.test('not a terminal: one plain line per epoch, and where a resumed run starts', async (t) => {
  const out = capture(false);
  let clock = 0;
  const p = createProgress({ stream: out.stream, now: () => clock });
  p.start(8, 0, unknown);
  p.step(1, known);
  p.step(2, known);
  clock += 12_340;
  p.epoch(4, known, 12.34); // 4 steps in 12.34 s, 4 left: 12.34 s more
  p.step(5, { ...known, epoch: 1 });
  p.epoch(8, { ...known, epoch: 1, loss: 0.0123, ce: 0.25, trace: 0.125, valDice: NaN }, 0.96);
  p.stop();
  await tick();
  t.equal(
    out.text(),
    'epoch 1/2  step 4/8  loss 1.2345  CE 0.5000  trace 1.750  val Dice 0.9000  (12.3 s, ETA 12s)\n' +
      'epoch 2/2  step 8/8  loss 0.0123  CE 0.2500  trace 0.125  val Dice -  (1.0 s)\n',
  );

  const resumed = capture(false);
  const q = createProgress({ stream: resumed.stream, now: () => clock });
  q.start(8, 3, unknown);
  clock += 7_300_000; // one step since the resume in 2h01m40s, 4 left: 8h06m40s
  q.epoch(4, known, 1);
  q.stop();
  await tick();
  t.equal(resumed.text(), 'resuming at step 3/8\nepoch 1/2  step 4/8  loss 1.2345  CE 0.5000  trace 1.750  val Dice 0.9000  (1.0 s, ETA 8h06m)\n');
});

t.test('not a terminal: within a long epoch, a step line at most every lineEveryMs', async (t) => {
  const out = capture(false);
  let clock = 1000;
  const p = createProgress({ stream: out.stream, lineEveryMs: 60_000, now: () => clock });
  p.start(8, 0, unknown);
  clock += 30_000;
  p.step(1, known); // 30 s: nothing yet
  clock += 31_000;
  p.step(2, known); // 61 s since the start: a line
  clock += 59_000;
  p.step(3, known); // 59 s since that line: nothing
  clock += 2_000;
  p.epoch(4, known, 122); // the epoch line restarts the interval
  clock += 59_999;
  p.step(5, { ...known, epoch: 1 });
  clock += 1;
  p.step(6, { ...known, epoch: 1 });
  p.stop();
  await tick();
  t.equal(
    out.text(),
    '  step 2/8 of epoch 1/2  loss 1.2345  CE 0.5000  trace 1.750  (61.0 s since the last line)\n' +
      'epoch 1/2  step 4/8  loss 1.2345  CE 0.5000  trace 1.750  val Dice 0.9000  (122.0 s, ETA 2m02s)\n' +
      '  step 6/8 of epoch 2/2  loss 1.2345  CE 0.5000  trace 1.750  (60.0 s since the last line)\n',
  );
});

t.test('quiet: nothing, even on a terminal', async (t) => {
  const out = capture(true);
  const p = createProgress({ quiet: true, stream: out.stream });
  t.equal(p, silentProgress);
  p.start(8, 3, known);
  p.step(4, known);
  p.epoch(4, known, 1);
  p.stop();
  const f = createFusionProgress({ quiet: true, stream: out.stream });
  f.start(2, 'fusing');
  f.case(1, 'a', 'fused', 0.5);
  f.stop();
  await tick();
  t.equal(out.text(), '');
});

t.test('fusion progress: a bar of cases on a terminal, one line per case otherwise', async (t) => {
  const tty = capture(true);
  const bar = createFusionProgress({ stream: tty.stream });
  bar.start(4, 'multi-label STAPLE');
  bar.case(1, 'BraTS2021_00001', 'fused', 0.5);
  await redraw();
  bar.case(3, 'BraTS2021_00003', 'reused', 0);
  bar.stop();
  await tick();
  const drawn = frames(tty.text());
  t.equal(drawn.length, 3, JSON.stringify(drawn));
  t.match(drawn[0], frame(`multi-label STAPLE [${cells(0)}] 0/4 cases | `));
  t.match(drawn[1], frame(`multi-label STAPLE [${cells(6)}] 1/4 cases | BraTS2021_00001 fused`));
  t.match(drawn[2], frame(`multi-label STAPLE [${cells(18)}] 3/4 cases | BraTS2021_00003 reused`));
  t.ok(tty.text().endsWith('\x1B[?25h\x1B[?7h\x1B8\n'), 'the cursor shown again when stopped');

  const plain = capture(false);
  const lines = createFusionProgress({ stream: plain.stream });
  lines.start(2, 'multi-label STAPLE');
  lines.case(1, 'BraTS2021_00001', 'fused', 0.44);
  lines.case(2, 'BraTS2021_00002', 'reused', 0);
  lines.stop();
  await tick();
  t.equal(plain.text(), '[1/2] BraTS2021_00001 fused in 0.4 s\n[2/2] BraTS2021_00002 up to date in the cache, reused\n');
});
