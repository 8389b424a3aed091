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

t.test('a terminal: the label and windows done of the total, then cleared', async (t) => {
  const out = capture(true);
  const p = windowProgress('[1/2] BraTS2021_00001', out.stream);
  p.onProgress(1, 4);
  p.stop();
  p.stop(); // twice: a no-op
  await new Promise((r) => setImmediate(r));
  const text = out.text();
  t.match(text, /\[1\/2\] BraTS2021_00001 \[[^\]]*\] [01]\/4 windows/);
  t.match(text, /\x1B\[\?25h/, 'the cursor shown again');
  // A second case on the same stream starts its own bar.
  const q = windowProgress('[2/2] BraTS2021_00002', out.stream);
  q.onProgress(2, 8);
  q.stop();
  await new Promise((r) => setImmediate(r));
  t.match(out.text(), /\[2\/2\] BraTS2021_00002 \[[^\]]*\] [02]\/8 windows/);
});
