// Long training runs (nnU-Net-style BraTS runs of 250,000 steps, MNIST runs of tens of
// thousands): what degrades with the run's length. The progress bar's ETA over epochs that
// end with a long validation; the training log of a long run (hundreds of MB) read by
// `cmseg curves`, by the end of `cmseg train`, and by a resume, without holding it whole.
// Big logs are synthesised (real entries repeated with increasing steps), not trained.
import t from 'tap';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { spawnSync } from 'child_process';
import { PassThrough } from 'stream';
import { createProgress, etaText, ProgressFields } from '../src/train/progress';
import { lineChart, type Series } from '../src/report/chart';
import { envelope } from '../src/report/curves';
import { loadCheckpoint, saveCheckpoint } from '../src/model/checkpoint';
import { forEachTrainLogEntry, readTrainerState, readTrainLog } from '../src/train/trainer';
import { runCli } from './helpers/cli';

function tty() {
  const stream = Object.assign(new PassThrough(), { isTTY: true, columns: 200 }) as unknown as NodeJS.WriteStream;
  let text = '';
  (stream as unknown as PassThrough).on('data', (chunk: Buffer) => (text += chunk.toString()));
  return { stream, text: () => text };
}
const tick = () => new Promise((r) => setImmediate(r));
/** The frames cli-progress drew: each line between "cursor to column 1" and "clear to the end". */
const frames = (text: string) => [...text.matchAll(/\x1B\[1G([^\x1B]*)\x1B\[0K/g)].map((m) => m[1]);
/** Seconds of the ETA at the end of a frame ("1h30m", "40m05s", "12s", "2d03h"). */
function etaSeconds(frame: string): number {
  const m = /(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?\s*$/.exec(frame.split('|').pop()!.trim());
  if (!m || !m[0]) return NaN;
  const [d, h, min, s] = m.slice(1).map((v) => Number(v ?? 0));
  return ((d * 24 + h) * 60 + min) * 60 + s;
}

t.test('the bar ETA counts the time validations take, not only the last steps', async (t) => {
  // 20 epochs of 250 steps of 1 s, each followed by a validation of 300 s (a BraTS run on a
  // CPU). The ETA took the rate of the last 50 updates: steps only (2.25 times too short) in
  // the middle of an epoch, and right after a validation 300 s per 50 steps (3.3 times too long).
  const realNow = Date.now;
  let clock = 1_000_000;
  Date.now = () => clock; // cli-progress reads Date.now itself
  t.teardown(() => void (Date.now = realNow));
  const fields: ProgressFields = { epoch: 0, epochs: 20, loss: 1, ce: 1, trace: 1, lr: 1e-3, valDice: 0.5 };
  const etaAt = async (epochsDone: number, stepsInto: number) => {
    const out = tty();
    const p = createProgress({ stream: out.stream, now: () => clock });
    p.start(5000, 0, fields);
    let step = 0;
    for (let e = 0; e < epochsDone; e++) {
      for (let k = 0; k < 250; k++) {
        clock += 1000;
        p.step(++step, { ...fields, epoch: e });
      }
      clock += 300_000;
      p.epoch(step, { ...fields, epoch: e }, 250);
    }
    for (let k = 0; k < stepsInto; k++) {
      clock += 1000;
      p.step(++step, { ...fields, epoch: epochsDone });
    }
    p.stop();
    await tick();
    return etaSeconds(frames(out.text()).pop()!);
  };
  // Truth by hand: the rest of this epoch's steps, its validation, then 550 s per epoch left.
  const truthMid = 150 + 300 + 9 * 550; // 10 epochs and 100 steps done: 5400 s
  const truthAfterValidation = 240 + 300 + 9 * 550; // 10 epochs and 10 steps done: 5490 s
  const mid = await etaAt(10, 100);
  const after = await etaAt(10, 10);
  t.ok(Math.abs(mid / truthMid - 1) < 0.1, `mid-epoch ETA ${mid} s, truth ${truthMid} s`);
  t.ok(Math.abs(after / truthAfterValidation - 1) < 0.1, `ETA just after a validation ${after} s, truth ${truthAfterValidation} s`);
  // A 3D run on a CPU: weeks, in days (cli-progress said "INF" past 115 days).
  t.same([etaText(5490), etaText(59.6), etaText(125 * 86_400 + 7200), etaText(NaN)], ['1h31m', '1m00s', '125d02h', '-']);
});

/** A training log of `steps` steps, `perEpoch` to an epoch, each epoch validated and saved: entries as cmseg train writes them (4 annotators). */
function longLog(file: string, steps: number, perEpoch: number): number {
  let before = -1; // the log's bytes before the first entry of step `steps`
  const fd = fs.openSync(file, 'w');
  const time = '2026-11-28T21:12:28.064Z';
  const config = { depth: 1, baseChannels: 2, method: 'cm', batchSize: 2, steps };
  let text = JSON.stringify({ time, event: 'start', step: 0, config, run: {}, annotatorNames: ['a0', 'a1', 'a2', 'a3'], batchesPerEpoch: perEpoch, totalSteps: steps }) + '\n';
  let written = 0;
  for (let s = 1; s <= steps; s++) {
    if (s === steps) before = written + Buffer.byteLength(text);
    const epoch = Math.floor((s - 1) / perEpoch);
    const loss = 3 * Math.exp(-s / 50_000) + 0.01 * (s % 7);
    const ce = [0.7621844947861973, 0.7663776389672421, 0.7862976070755394, 0.7459827836573822].map((c) => c * Math.exp(-s / 50_000));
    const trace = [1.5942577052628621, 1.5981570692383684, 1.598345282545779, 1.6024341593729332];
    text += JSON.stringify({ time, event: 'step', step: s, epoch, lr: 0.0029999992049486073, loss, ce, trace, traceWeight: 0.009999999776482582, stepMs: 9 }) + '\n';
    if (s % perEpoch === 0) {
      text += JSON.stringify({ time, event: 'epoch', step: s, epoch, loss, ce: 3.01570850695446, trace: 6.393348566239832, trainSeconds: 0.081 }) + '\n';
      text += JSON.stringify({ time, event: 'validation', step: s, epoch, score: 0.5 + 0.4 * (s / steps), averageDice: 0.05845346716314789, totalDice: 0.10709635416666667, cmError: 0.2, ged: 1.4528306589011024 }) + '\n';
      text += JSON.stringify({ time, event: 'checkpoint', kind: 'last', step: s, epoch: epoch + 1, file: path.join(path.dirname(file), 'last.safetensors') }) + '\n';
    }
    if (text.length > 1 << 20) {
      written += fs.writeSync(fd, text);
      text = '';
    }
  }
  fs.writeSync(fd, text);
  fs.closeSync(fd);
  return before;
}

/** Runs `cmseg ...args` in a Node with a heap of `heapMb` MB; its exit status and output. */
function cmsegInSmallHeap(heapMb: number, args: string[]) {
  // ts-node's require hook, not its bin: under tap's loaders the bin's main.ts went to the ES module loader.
  const tsNode = require.resolve('@isaacs/ts-node-temp-fork-for-pr-2009');
  const main = path.join(__dirname, '..', 'src', 'cli', 'main.ts');
  const code = `require(${JSON.stringify(tsNode)}).register({ transpileOnly: true }); require(${JSON.stringify(main)}).main(['node', 'cmseg', ...process.argv.slice(1)])`;
  return spawnSync(process.execPath, [`--max-old-space-size=${heapMb}`, '-e', code, ...args], { encoding: 'utf8', maxBuffer: 64 << 20, timeout: 120_000 });
}

const scratch = fs.mkdtempSync(path.join(os.tmpdir(), 'cmseg-longrun-'));
t.teardown(() => fs.rmSync(scratch, { recursive: true, force: true }));
// A BraTS-length run: 250,000 steps of 250 to an epoch, 83 MB of log.
const bigRun = path.join(scratch, 'big');
fs.mkdirSync(bigRun);
longLog(path.join(bigRun, 'train-log.jsonl'), 250_000, 250);

t.test('cmseg curves draws a 250,000-step log (85 MB) in a 160 MB heap', async (t) => {
  // It read the log whole (an 85 MB string, then every entry as an object: 300 MB of heap;
  // now about 70 MB, most of it the CLI's own):
  // `cmseg train` draws the curves at the end of a run, in the process that holds the model and
  // its data, and a log past 512 MB (V8's longest string) could not be drawn at all.
  const log = path.join(bigRun, 'train-log.jsonl');
  t.ok(fs.statSync(log).size > 80e6, `the log is ${fs.statSync(log).size} bytes`);
  const picture = path.join(scratch, 'big.png');
  const run = cmsegInSmallHeap(160, ['curves', bigRun, '--out', picture]);
  t.equal(run.status, 0, run.stderr.slice(-2000));
  t.ok(fs.existsSync(picture), 'the picture is written');
});

t.test('a long series is drawn as its envelope per pixel: the same picture, the same x axis', async (t) => {
  // 30,000 noisy steps on a chart 600 pixels wide: drawn from every point, and from the
  // envelope trainingCurves draws (first, last, least and greatest point of 1200 runs of steps).
  let seed = 1;
  const noise = () => ((seed = (seed * 16807) % 2147483647) / 2147483647 - 0.5) * 0.4;
  const x = Array.from({ length: 30_000 }, (_, i) => i + 1);
  const y = x.map((s) => 2 * Math.exp(-s / 8000) + noise());
  const series = (points: readonly (readonly [number, number])[]): Series[] => [{ name: 'loss', color: [0, 114, 178], points, width: 1 }];
  const options = { width: 600, height: 270, title: 'loss', xLabel: 'step' };
  const all = lineChart(series(x.map((s, i) => [s, y[i]] as const)), options);
  const drawn = envelope(x, y, 1200);
  t.ok(drawn.length <= 4 * 1200, `${drawn.length} points drawn of 30000`);
  const few = lineChart(series(drawn), options);
  t.same(few.layout.xRange, all.layout.xRange, 'the x axis ends at the last step all the same');
  t.same(few.layout.yRange, all.layout.yRange);
  let differ = 0;
  for (let i = 0; i < all.data.length; i += 3) if (all.data[i] !== few.data[i] || all.data[i + 1] !== few.data[i + 1]) differ++;
  t.ok(differ < 0.01 * all.width * all.height, `${differ} of ${all.width * all.height} pixels differ`);
  // A run of steps with no finite loss stays a gap; a short series is drawn point by point.
  const gap = envelope(x, y.map((v, i) => (i >= 10_000 && i < 12_000 ? NaN : v)), 1200);
  t.ok(gap.some(([s, v]) => s > 10_100 && s < 11_900 && Number.isNaN(v)), 'NaN points inside the gap');
  t.notOk(gap.some(([s, v]) => s > 10_100 && s < 11_900 && Number.isFinite(v)), 'no finite point inside the gap');
  t.same(envelope([1, 2, 3], [3, 2, 1], 10), [[1, 3], [2, 2], [3, 1]]);
});

t.test('a resume of a 250,000-step run drops the log past its checkpoint in a 192 MB heap, the rest kept as it was', async (t) => {
  // The resume read the log whole, split it, kept its lines and joined them again: 4 times the
  // log in heap (a 250,000-step log: 340 MB) before it trained a step; then the curves at the
  // end of the run read it whole again (300 MB).
  const dir = path.join(scratch, 'resume');
  fs.mkdirSync(dir);
  const sim = await runCli(['simulate', '--out', 'data', '--count', '8'], dir);
  t.equal(sim.exitCode, 0, sim.stderr);
  const first = await runCli(['train', '--preset', 'images', '--data', 'data', '--depth', '1', '--base-channels', '2', '--steps', '2', '--batch-size', '2', '--no-test', '--quiet', '--out', 'run'], dir);
  t.equal(first.exitCode, 0, first.stderr);
  // The run made 250,000 steps long, its `last` at step 249,999; the log has step 250,000 too
  // (written before a crash) and half a line after it.
  const steps = 250_000;
  const last = path.join(dir, 'run', 'last.safetensors');
  const extra = await readTrainerState(last);
  const perEpoch = extra.state.batchesPerEpoch;
  extra.config.steps = steps;
  extra.state = { ...extra.state, step: steps - 1, totalSteps: steps, epoch: Math.floor((steps - 1) / perEpoch), batchInEpoch: (steps - 1) % perEpoch };
  const model = await loadCheckpoint(last);
  await saveCheckpoint(model, last, extra as unknown as Record<string, unknown>);
  await model.dispose();
  const log = path.join(dir, 'run', 'train-log.jsonl');
  const kept = longLog(log, steps, perEpoch);
  fs.appendFileSync(log, '{"time":"2026-11-28T21:12:28.064Z","event":"st');
  const before = Buffer.alloc(kept);
  const fd = fs.openSync(log, 'r');
  fs.readSync(fd, before, 0, kept, 0);
  fs.closeSync(fd);

  const resumed = cmsegInSmallHeap(192, ['train', '--resume', '--out', path.join(dir, 'run'), '--quiet', '--no-test']);
  t.equal(resumed.status, 0, resumed.stderr.slice(-2000));
  const after = fs.readFileSync(log);
  t.ok(after.subarray(0, kept).equals(before), `the log up to step ${steps - 1} is kept byte for byte`);
  const rest = after.subarray(kept).toString('utf8').split('\n').filter(Boolean).map((l) => {
    try {
      return JSON.parse(l) as Record<string, unknown>;
    } catch {
      return { event: `not JSON: ${l.slice(0, 80)}` };
    }
  });
  t.same(rest.map((e) => e.event).slice(0, 2), ['resume', 'step'], 'then the resume and the step it took');
  t.same(rest.filter((e) => e.event === 'step').map((e) => e.step), [steps], 'step 250,000 once, the one taken again');

  // An older log with a line cut short in its middle (before lines were written whole): the
  // entries kept are not one prefix of the log, which is then rewritten without that line.
  const lines = fs.readFileSync(log, 'utf8').split('\n');
  const cut = '{"time":"2026-11-28T21:12:28.064Z","event":"step","st';
  fs.writeFileSync(log, [...lines.slice(0, 1000), cut, ...lines.slice(1000)].join('\n'));
  const again = await runCli(['train', '--resume', '--out', path.join(dir, 'run'), '--quiet', '--no-test'], dir);
  t.equal(again.exitCode, 0, again.stderr);
  t.equal(fs.readFileSync(log, 'utf8'), lines.join('\n'), 'the cut line dropped, every entry kept (the run was complete: nothing added)');
});

t.test('the log read in pieces: long lines, characters across pieces, line numbers, an entry being written', async (t) => {
  const file = path.join(scratch, 'pieces.jsonl');
  // A start entry of 3 MiB (a run description with many case names), its characters of 1 to
  // 4 bytes so that some fall across the 1 MiB pieces the reader takes.
  const names = Array.from({ length: 120_000 }, (_, k) => `é${k}😀`);
  const entries = [{ event: 'start', step: 0, run: { names } }, ...Array.from({ length: 20 }, (_, k) => ({ event: 'step', step: k + 1, note: 'ü'.repeat(k * 7000) }))];
  const text = entries.map((e) => JSON.stringify(e)).join('\n') + '\n\n';
  fs.writeFileSync(file, text + '{"event":"step","st');
  const bytes = Buffer.from(text);
  const split = [1, 2, 3, 4].filter((m) => (bytes[m << 20] & 0xc0) === 0x80);
  t.ok(split.length > 0, `a character across the pieces at ${split.map((m) => `${m} MiB`).join(', ')}`);
  t.same(readTrainLog(file, { whileWritten: true }), entries, 'every entry as written; the one being written left out');
  t.throws(() => readTrainLog(file), /line 23 is not a training log entry/, 'the cut line named by its line in the file (after a blank one)');
  const seen: number[] = [];
  forEachTrainLogEntry(file, (e) => (seen.push(e.step as number), seen.length < 3));
  t.same(seen, [0, 1, 2], 'stops when asked');
});
