// BraTS at the scale of a real release (1251 cases in BraTS 2021): what cmseg does per case
// must not grow with the number of cases. Counted, not timed: the bytes written to
// index.json while preparing and fusing many small cases, against the bytes of the case
// and fused files themselves (both measured on disk).

import t from 'tap';
import * as fs from 'fs';
import * as path from 'path';
import { PassThrough } from 'stream';
import { spawnSync } from 'child_process';
import { writeBratsPhantoms } from '../src/data/brats-phantom';
import { CaseFileReader, flushCacheIndexesSync, prepareCache, readCacheIndex } from '../src/data/cache';
import { fuseCachedCases } from '../src/fusion/fuse-cache';
import { tempDir } from './helpers/files';

// Many tiny cases: per-case overhead dominates, as it does over a whole release.
const CASES = 150;
const SIZE: [number, number, number] = [16, 16, 8];

/** Counts what is renamed into place (writeFileAtomic's last step) while `work` runs: index.json and .bin files, by bytes. */
async function countWrites<T>(work: () => Promise<T>): Promise<{ result: T; indexWrites: number; indexBytes: number; binBytes: number }> {
  const promises = fs.promises as { rename: typeof fs.promises.rename };
  const rename = promises.rename;
  let indexWrites = 0;
  let indexBytes = 0;
  let binBytes = 0;
  promises.rename = async (from, to) => {
    const size = fs.statSync(from).size;
    if (path.basename(String(to)) === 'index.json') {
      indexWrites++;
      indexBytes += size;
    } else if (String(to).endsWith('.bin')) {
      binBytes += size;
    }
    return rename(from, to);
  };
  try {
    const result = await work();
    return { result, indexWrites, indexBytes, binBytes };
  } finally {
    promises.rename = rename;
  }
}

let dataDir = '';
t.before(async () => {
  dataDir = tempDir(t, 'cmseg-scale-data-');
  await writeBratsPhantoms(dataDir, { cases: CASES, size: SIZE, seed: 5 });
});

t.test('prepare: index.json is not rewritten whole after every one of many cases (quadratic bytes)', async (t) => {
  const cacheDir = tempDir(t, 'cmseg-scale-cache-');
  const { result, indexWrites, indexBytes, binBytes } = await countWrites(() => prepareCache(dataDir, cacheDir));
  t.equal(result.prepared.length, CASES);
  const finalIndex = fs.statSync(path.join(cacheDir, 'index.json')).size;
  const caseBytes = fs.readdirSync(path.join(cacheDir, 'cases')).reduce((sum, f) => sum + fs.statSync(path.join(cacheDir, 'cases', f)).size, 0);
  t.equal(binBytes, caseBytes, 'every case file written once');
  // One full index per case is sum_k k * entry ~ CASES / 2 final indexes: here ~8x the case
  // files' bytes. Linear work writes about as much index as case data (1.5x: slack).
  t.ok(indexBytes <= 1.5 * caseBytes + 2 * finalIndex, `index bytes written ${indexBytes} <= 1.5 x case bytes ${caseBytes} + 2 x final index ${finalIndex} (${indexWrites} index writes for ${CASES} cases)`);
  t.ok(indexWrites < CASES / 2, `${indexWrites} index writes for ${CASES} cases`);
  // The index still names every case, each with the size on disk.
  const index = readCacheIndex(cacheDir);
  t.equal(index.cases.length, CASES);
  t.same(index.cases.filter((e) => fs.statSync(path.join(cacheDir, e.file)).size !== e.bytes).map((e) => e.id), []);
});

t.test('prepare again after every source changed (a copied data folder: new mtimes): still linear index writes', async (t) => {
  const data = tempDir(t, 'cmseg-scale-data-');
  fs.cpSync(dataDir, data, { recursive: true });
  const cacheDir = tempDir(t, 'cmseg-scale-cache-');
  await prepareCache(data, cacheDir);
  const later = new Date(Date.now() + 60_000);
  for (const id of fs.readdirSync(data)) for (const f of fs.readdirSync(path.join(data, id))) fs.utimesSync(path.join(data, id, f), later, later);
  const { result, indexWrites, indexBytes, binBytes } = await countWrites(() => prepareCache(data, cacheDir));
  t.equal(result.prepared.length, CASES, 'every case prepared again');
  const finalIndex = fs.statSync(path.join(cacheDir, 'index.json')).size;
  t.ok(indexBytes <= 1.5 * binBytes + 2 * finalIndex, `index bytes written ${indexBytes} <= 1.5 x case bytes ${binBytes} + 2 x final index ${finalIndex} (${indexWrites} index writes for ${CASES} cases)`);
  let index = readCacheIndex(cacheDir);
  t.equal(index.cases.length, CASES);
  t.same(index.cases.filter((e) => e.sources.some((s) => s.mtimeMs !== fs.statSync(path.join(data, s.file)).mtimeMs)).map((e) => e.id), [], 'every entry records the new sources');

  // Stopped part-way through preparing everything again: every case the index names is
  // described by it (size and the file header's label counts), and the next run finishes.
  const latest = new Date(Date.now() + 120_000);
  for (const id of fs.readdirSync(data)) for (const f of fs.readdirSync(path.join(data, id))) fs.utimesSync(path.join(data, id, f), latest, latest);
  const stop = new Error('stop');
  let finished = 0;
  await t.rejects(prepareCache(data, cacheDir, { onProgress: () => { if (++finished === 10) throw stop; } }), stop);
  index = readCacheIndex(cacheDir);
  t.ok(index.cases.length >= 10, `${index.cases.length} cases listed after the stop`);
  const wrong = index.cases.filter((e) => {
    const file = path.join(cacheDir, e.file);
    if (fs.statSync(file).size !== e.bytes) return true;
    const reader = CaseFileReader.open(file);
    const counts = reader.header.labelCounts;
    reader.close();
    return JSON.stringify(counts) !== JSON.stringify(e.labelCounts);
  });
  t.same(wrong.map((e) => e.id), [], 'the index describes every file it names');
  const rest = await prepareCache(data, cacheDir);
  t.equal(rest.prepared.length + rest.skipped.length, CASES);
  t.equal(rest.skipped.length, 10, 'the 10 finished before the stop are kept');
  t.equal(readCacheIndex(cacheDir).cases.length, CASES);
});

t.test('prepare stopped mid-run (Ctrl-C, an error): the index names every case finished before the stop', async (t) => {
  const cacheDir = tempDir(t, 'cmseg-scale-cache-');
  const stop = new Error('stop');
  let finished = 0;
  await t.rejects(
    prepareCache(dataDir, cacheDir, {
      onProgress: () => {
        if (++finished === 37) throw stop;
      },
    }),
    stop,
  );
  const index = readCacheIndex(cacheDir);
  t.equal(index.cases.length, 37, 'all 37 finished cases are listed');
  t.same(index.cases.filter((e) => fs.statSync(path.join(cacheDir, e.file)).size !== e.bytes).map((e) => e.id), []);
  const resumed = await prepareCache(dataDir, cacheDir);
  t.equal(resumed.skipped.length, 37, 'the next run skips them');
  t.equal(resumed.prepared.length, CASES - 37);
});

t.test('a second Ctrl-C quits at once: flushCacheIndexesSync lists every case finished so far first', async (t) => {
  const cacheDir = tempDir(t, 'cmseg-scale-cache-');
  let listedAt37 = -1;
  let listedAt38 = -1;
  let finished = 0;
  await prepareCache(dataDir, cacheDir, {
    onProgress: () => {
      finished++;
      // What prepare's second-interrupt handler does before quitNow: the index on disk then
      // names exactly the cases finished, each file as described.
      if (finished === 37) {
        flushCacheIndexesSync();
        listedAt37 = readCacheIndex(cacheDir).cases.length;
      }
      if (finished === 38) {
        flushCacheIndexesSync();
        listedAt38 = readCacheIndex(cacheDir).cases.length;
      }
    },
  });
  t.equal(listedAt37, 37);
  t.equal(listedAt38, 38);
  t.equal(readCacheIndex(cacheDir).cases.length, CASES);
});

t.test('STAPLE fusion of many cases: index.json is not rewritten whole after every case', async (t) => {
  const cacheDir = tempDir(t, 'cmseg-scale-cache-');
  await prepareCache(dataDir, cacheDir);
  const ids = readCacheIndex(cacheDir).cases.map((e) => e.id);
  const { result, indexWrites, indexBytes, binBytes } = await countWrites(() => fuseCachedCases(cacheDir, ids, 'multi-staple'));
  t.equal(result.fused.length, CASES);
  const finalIndex = fs.statSync(path.join(cacheDir, 'index.json')).size;
  const fusedDir = path.join(cacheDir, 'cases', 'multi-staple');
  const fusedBytes = fs.readdirSync(fusedDir).reduce((sum, f) => sum + fs.statSync(path.join(fusedDir, f)).size, 0);
  t.equal(binBytes, fusedBytes, 'every fused file written once');
  t.ok(indexBytes <= 1.5 * fusedBytes + 2 * finalIndex, `index bytes written ${indexBytes} <= 1.5 x fused bytes ${fusedBytes} + 2 x final index ${finalIndex} (${indexWrites} index writes)`);
  // The index on disk records every map, and the result's index is that index.
  const index = readCacheIndex(cacheDir);
  t.equal(index.cases.filter((e) => e.fused?.['multi-staple']).length, CASES);
  t.same(result.index, index);

  // Stopped part-way: the maps fused so far are recorded, and the next call reuses them.
  const again = tempDir(t, 'cmseg-scale-cache-');
  await prepareCache(dataDir, again);
  const stop = new Error('stop');
  await t.rejects(
    fuseCachedCases(again, ids, 'spatial-staple', {
      onProgress: (p) => {
        if (p.position === 20) throw stop;
      },
    }),
    stop,
  );
  t.equal(readCacheIndex(again).cases.filter((e) => e.fused?.['spatial-staple']).length, 21, 'the 21 maps fused before the stop are in the index');
  const resumed = await fuseCachedCases(again, ids, 'spatial-staple');
  t.equal(resumed.reused.length, 21);
  t.equal(resumed.fused.length, CASES - 21);
});

t.test('cmseg phantom brats on a terminal: a bar, not one line per case (a release is 1251 cases); lines in a log', async (t) => {
  const { phantomProgress } = await import('../src/cli/phantom');
  const run = (isTTY: boolean) => {
    const stream = Object.assign(new PassThrough(), { isTTY, columns: 120 }) as unknown as NodeJS.WriteStream;
    let text = '';
    (stream as unknown as PassThrough).on('data', (chunk: Buffer) => (text += chunk.toString()));
    const progress = phantomProgress(stream, 40);
    for (let k = 0; k < 40; k++) progress.onCase(`BraTS2021_${String(k).padStart(5, '0')}`, k);
    progress.stop();
    return text;
  };
  const tty = run(true);
  t.ok(tty.split('\n').length < 5, `a terminal gets a bar that redraws (${tty.split('\n').length} lines)`);
  t.match(tty, /40\/40 cases/);
  const log = run(false);
  t.equal(log.split('\n').filter((l) => /^\[\d+\/40\] BraTS2021_\d{5} written in /.test(l)).length, 40, 'a log gets one line per case, as before');
});

// The CLI quits at once through quitNow (a second Ctrl-C, or a signal while train fuses), which
// runs the 'exit' listeners: the index then lists every case finished before, in any command.
const distCache = path.resolve(__dirname, '..', 'dist', 'data', 'cache.js');
t.test('a process that exits mid-prepare lists every case finished before it exits', { skip: fs.existsSync(distCache) ? false : 'no dist/ build (npm run build:ts)' }, async (t) => {
  const cacheDir = tempDir(t, 'cmseg-scale-cache-');
  const script = `const { prepareCache } = require(${JSON.stringify(distCache)});
let finished = 0;
prepareCache(${JSON.stringify(dataDir)}, ${JSON.stringify(cacheDir)}, { onProgress: () => { if (++finished === 43) process.exit(130); } });`;
  const run = spawnSync(process.execPath, ['-e', script], { encoding: 'utf8', timeout: 60_000 });
  t.equal(run.status, 130, run.stderr);
  const index = readCacheIndex(cacheDir);
  t.equal(index.cases.length, 43, "the 43 cases finished are listed (without the exit listener: 41, the last write)");
  t.same(index.cases.filter((e) => fs.statSync(path.join(cacheDir, e.file)).size !== e.bytes).map((e) => e.id), [], 'each as its file on disk');
});
