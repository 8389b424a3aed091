// The window bar of whole-volume predictions (src/cli/window-progress.ts): drawn only on a
// terminal, with the case's label and windows done of the total, cleared when stopped.
import t from 'tap';
import { PassThrough } from 'stream';
import { windowProgress } from '../src/cli/window-progress';

function capture(isTTY: boolean) {
  const stream = Object.assign(new PassThrough(), { isTTY, columns: 100 });
  let text = '';
  stream.on('data', (chunk: Buffer) => (text += chunk.toString()));
  return { stream, text: () => text };
}

t.test('not a terminal: nothing written', async (t) => {
  const out = capture(false);
  const p = windowProgress('[1/2] BraTS2021_00001', out.stream);
  p.onProgress(1, 4);
  p.onProgress(4, 4);
  p.stop();
  await new Promise((r) => setImmediate(r));
  t.equal(out.text(), '');
});

/** The frames cli-progress drew: each line between "cursor to column 1" and "clear to the end". */
const frames = (text: string) => [...text.matchAll(/\x1B\[1G([^\x1B]*)\x1B\[0K/g)].map((m) => m[1]);
/** A bar of 24 cells, `done` of them filled. */
const cells = (done: number) => '='.repeat(done) + '-'.repeat(24 - done);

t.test('a terminal: the label and windows done of the total, then cleared', async (t) => {
  const out = capture(true);
  const p = windowProgress('[1/2] BraTS2021_00001', out.stream);
  p.onProgress(3, 4);
  p.stop();
  p.stop(); // twice: a no-op
  await new Promise((r) => setImmediate(r));
  const text = out.text();
  // Drawn when started (0 of 4), then at the stop with the count reported: 3 of 4 windows
  // fill 18 of the 24 cells.
  const drawn = frames(text);
  t.equal(drawn.length, 2, JSON.stringify(drawn));
  t.match(drawn[0], new RegExp(`^\\[1/2\\] BraTS2021_00001 \\[${cells(0)}\\] 0/4 windows \\| [^|]+$`));
  t.match(drawn[1], new RegExp(`^\\[1/2\\] BraTS2021_00001 \\[${cells(18)}\\] 3/4 windows \\| [^|]+$`));
  t.ok(text.startsWith('\x1B7\x1B[?25l'), 'the cursor saved and hidden while the bar runs');
  t.ok(text.endsWith('\x1B[?25h\x1B[?7h\x1B8\x1B[1G\x1B[2K'), 'the cursor shown again and the line cleared when stopped');
  // A second case on the same stream starts its own bar.
  const q = windowProgress('[2/2] BraTS2021_00002', out.stream);
  q.onProgress(5, 8);
  q.stop();
  await new Promise((r) => setImmediate(r));
  const second = frames(out.text()).slice(2);
  t.equal(second.length, 2, JSON.stringify(second));
  t.match(second[0], new RegExp(`^\\[2/2\\] BraTS2021_00002 \\[${cells(0)}\\] 0/8 windows \\| [^|]+$`));
  t.match(second[1], new RegExp(`^\\[2/2\\] BraTS2021_00002 \\[${cells(15)}\\] 5/8 windows \\| [^|]+$`));
});
