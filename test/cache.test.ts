// The BraTS cache: float16 conversion, round trip of a prepared case, incremental and
// resumable preparation, settings checks.

import t from 'tap';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { spawnSync } from 'child_process';
import { UNLABELLED } from '../src/data/annotators';
import { discoverBratsCases, loadBratsCase, preprocessBratsCase } from '../src/data/brats';
import { writeBratsPhantoms } from '../src/data/brats-phantom';
import {
  BRATS_DEFAULT_ANNOTATORS,
  CacheError,
  type PrepareProgress,
  cacheContentFor,
  decodeFloat16,
  encodeFloat16,
  float16BitsToFloat32,
  float32ToFloat16Bits,
  prepareCache,
  readCacheIndex,
  readCachedCase,
  readCachedCaseForScoring,
  withCacheLock,
} from '../src/data/cache';
import { Rng } from '../src/data/random';
import { firstDifference, tempDir } from './helpers/files';

const SIZE: [number, number, number] = [48, 48, 32];

/** Three phantom cases shared by the tests below (read-only). */
let dataDir = '';
t.before(async () => {
  dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'cmseg-cache-data-'));
  await writeBratsPhantoms(dataDir, { cases: 3, size: SIZE, seed: 11 });
});
t.teardown(() => fs.rmSync(dataDir, { recursive: true, force: true }));

t.test('float16: exact values, rounding to nearest even, specials', async (t) => {
  const cases: [number, number][] = [
    [0, 0x0000],
    [-0, 0x8000],
    [1, 0x3c00],
    [-2, 0xc000],
    [65504, 0x7bff], // largest finite half
    [65519.99, 0x7bff], // rounds down to it
    [65520, 0x7c00], // halfway to the next binade: ties to even = Infinity
    [Infinity, 0x7c00],
    [-Infinity, 0xfc00],
    [2 ** -14, 0x0400], // smallest normal
    [2 ** -24, 0x0001], // smallest subnormal
    [2 ** -25, 0x0000], // half of it: tie, rounds to even (0)
    [3 * 2 ** -25, 0x0002], // 1.5 units: tie, rounds to even (2)
    [1 + 2 ** -11, 0x3c00], // tie between 1 and 1 + 2^-10: even is 1
    [1 + 3 * 2 ** -11, 0x3c02], // tie: even is 1 + 2^-9
    [1e-10, 0x0000],
  ];
  for (const [value, bits] of cases) {
    t.equal(float32ToFloat16Bits(value), bits, `${value} -> 0x${bits.toString(16)}`);
  }
  t.ok(Number.isNaN(float16BitsToFloat32(float32ToFloat16Bits(NaN))), 'NaN stays NaN');
  t.equal(float16BitsToFloat32(0x7bff), 65504);
  t.equal(float16BitsToFloat32(0x0001), 2 ** -24);
  t.equal(Object.is(float16BitsToFloat32(0x8000), -0), true);

  // Random values over many binades: the result is the nearest half, ties to even.
  const rng = new Rng(3);
  let bad = 0;
  for (let k = 0; k < 20000; k++) {
    const value = Math.fround((rng.uniform() - 0.5) * 2 ** (rng.int(40) - 26));
    const bits = float32ToFloat16Bits(value);
    const got = float16BitsToFloat32(bits);
    const error = Math.abs(got - value);
    for (const neighbour of [bits - 1, bits + 1]) {
      if ((neighbour & 0x7fff) > 0x7bff || neighbour < 0) continue;
      const other = Math.abs(float16BitsToFloat32(neighbour) - value);
      if (other < error || (other === error && (bits & 1) === 1)) bad++;
    }
  }
  t.equal(bad, 0, 'every conversion is the nearest half (ties to even)');
  const values = Float32Array.from([0.1, -3.75, 1000.5, 1e-6]);
  t.same(decodeFloat16(encodeFloat16(values)), Float32Array.from(values, (v) => float16BitsToFloat32(float32ToFloat16Bits(v))));
});

t.test('round trip: float32 exact, float16 within 1e-3 relative', async (t) => {
  const cases = discoverBratsCases(dataDir);
  const volume = await loadBratsCase(cases[1]);
  const pre = preprocessBratsCase(volume);
  for (const dtype of ['float32', 'float16'] as const) {
    const cacheDir = tempDir(t);
    const result = await prepareCache(dataDir, cacheDir, { dtype, seed: 5 });
    t.same(result.prepared, cases.map((c) => c.id));
    const index = readCacheIndex(cacheDir);
    t.same(index.names, ['over', 'under', 'wrong'], 'default annotators: over, under, wrong (SPEC brats3d, R = 3)');
    t.same(index.settings.annotators, BRATS_DEFAULT_ANNOTATORS);
    t.equal(index.cases.length, 3);
    const entry = index.cases[1];
    t.same(entry.shape, pre.shape);
    t.same(entry.crop, pre.crop);
    t.same(entry.original.dims, SIZE);
    t.same(entry.sources.map((s) => path.basename(s.file)), [...cases[1].images, cases[1].seg as string].map((p) => path.basename(p)));

    const cached = await readCachedCase(cacheDir, cases[1].id);
    t.same(cached.shape, pre.shape);
    t.same(cached.crop, pre.crop);
    t.same(cached.original, pre.original);
    t.equal(firstDifference(cached.consensus, pre.seg as Uint8Array), -1, 'consensus = preprocessed labels (4 -> 3)');
    t.same(cached.present, [1, 1, 1]);
    t.equal(cached.niftiHeader?.datatype, 'int16', 'source NIfTI header kept for writing predictions');
    if (dtype === 'float32') {
      t.equal(firstDifference(cached.images, pre.images), -1, 'float32 images bit-exact');
    } else {
      let worst = 0;
      for (let i = 0; i < pre.images.length; i++) {
        const e = Math.abs(cached.images[i] - pre.images[i]) / (Math.abs(pre.images[i]) + 1e-4);
        if (e > worst) worst = e;
      }
      t.ok(worst < 1e-3, `float16 images within 1e-3 relative (worst ${worst.toExponential(2)})`);
    }
    // Annotators: exactly what simulateAnnotators gives for this case and seed.
    const expected = cacheContentFor(pre, index.settings);
    expected.labels.forEach((labels, r) => t.equal(firstDifference(cached.labels[r], labels), -1, `annotator ${index.names[r]} stored exactly`));
    t.not(firstDifference(cached.labels[0], cached.consensus), -1, 'the over-segmenter differs from the consensus');
    // Stored foreground locations are tumour voxels.
    t.ok(cached.foreground.consensus.length > 0);
    t.ok(Array.from(cached.foreground.consensus).every((i) => cached.consensus[i] > 0), 'consensus locations are tumour');
    t.equal(entry.labelCounts.reduce((a, b) => a + b, 0), pre.extent.d * pre.extent.h * pre.extent.w);
  }
  await t.rejects(readCachedCase(tempDir(t), 'x'), { name: 'CacheError', kind: 'bad-index' });
});

t.test('incremental: a second run does no work; a changed source is redone', async (t) => {
  const cacheDir = tempDir(t);
  const first = await prepareCache(dataDir, cacheDir);
  t.equal(first.prepared.length, 3);
  const files = first.index.cases.map((c) => path.join(cacheDir, c.file));
  const mtimes = files.map((f) => fs.statSync(f).mtimeMs);
  const indexMtime = fs.statSync(path.join(cacheDir, 'index.json')).mtimeMs;
  const events: PrepareProgress[] = [];
  const second = await prepareCache(dataDir, cacheDir, { onProgress: (p) => void events.push(p) });
  t.same(second.prepared, [], 'nothing prepared');
  t.same(second.skipped, first.prepared);
  t.same(events.map((e) => e.status), ['skipped', 'skipped', 'skipped']);
  t.same(files.map((f) => fs.statSync(f).mtimeMs), mtimes, 'case files untouched');
  t.equal(fs.statSync(path.join(cacheDir, 'index.json')).mtimeMs, indexMtime, 'index untouched');

  // Touch one source: only that case is prepared again.
  const [, c] = discoverBratsCases(dataDir);
  const later = new Date(Date.now() + 5000);
  fs.utimesSync(c.images[2], later, later);
  const third = await prepareCache(dataDir, cacheDir);
  t.same(third.prepared, [c.id]);
  t.equal(third.skipped.length, 2);
  t.notOk(fs.existsSync(path.join(cacheDir, '.prepare.lock')), 'lock released');
});

t.test('interrupted run: finished cases stay valid, the next run resumes', async (t) => {
  const cacheDir = tempDir(t);
  const stop = new Error('simulated interruption');
  await t.rejects(
    prepareCache(dataDir, cacheDir, {
      onProgress: () => {
        throw stop;
      },
    }),
    stop,
  );
  const partial = readCacheIndex(cacheDir);
  t.equal(partial.cases.length, 1, 'the index holds the one finished case');
  t.notOk(fs.existsSync(path.join(cacheDir, '.prepare.lock')), 'lock released after the error');
  const leftovers = fs.readdirSync(path.join(cacheDir, 'cases')).filter((f) => f.endsWith('.tmp'));
  t.same(leftovers, [], 'no temp files left');
  const cached = await readCachedCase(cacheDir, partial.cases[0].id);
  t.equal(cached.id, partial.cases[0].id, 'the finished case reads back');

  const resumed = await prepareCache(dataDir, cacheDir);
  t.same(resumed.skipped, [partial.cases[0].id]);
  t.equal(resumed.prepared.length, 2);
  t.equal(readCacheIndex(cacheDir).cases.length, 3);

  // A lock left by a dead process is taken over; a live one is refused.
  fs.writeFileSync(path.join(cacheDir, '.prepare.lock'), '999999999');
  t.equal((await prepareCache(dataDir, cacheDir)).skipped.length, 3, 'stale lock taken over');
  fs.writeFileSync(path.join(cacheDir, '.prepare.lock'), String(process.ppid));
  await t.rejects(prepareCache(dataDir, cacheDir), { name: 'CacheError', kind: 'locked' });
  fs.rmSync(path.join(cacheDir, '.prepare.lock'));
});

t.test('settings: a cache holds one setting; rebuild replaces it; single mode', async (t) => {
  const cacheDir = tempDir(t);
  await prepareCache(dataDir, cacheDir, { seed: 1 });
  const err = (await prepareCache(dataDir, cacheDir, { seed: 2, mode: 'single' }).catch((e: unknown) => e)) as CacheError;
  t.equal(err.kind, 'settings-changed');
  // Named by prepare's options, with the cached and the asked value.
  t.match(err.message, /\(labels: dense in the cache, single asked; seed: 1 in the cache, 2 asked: these differ\)/);
  t.same(err.value, ['mode', 'seed']);
  const names = (await prepareCache(dataDir, cacheDir, { seed: 1, annotators: [{ kind: 'good' }, { kind: 'over' }] }).catch((e: unknown) => e)) as CacheError;
  t.match(names.message, /\(annotators: over,under,wrong in the cache, good,over asked: these differ\)/, 'the names, not the specs');

  const rebuilt = await prepareCache(dataDir, cacheDir, {
    seed: 2,
    mode: 'single',
    annotators: [{ kind: 'good' }, { kind: 'over' }, { kind: 'under' }, { kind: 'wrong' }, { kind: 'fracture' }],
    rebuild: true,
  });
  t.equal(rebuilt.prepared.length, 3);
  t.same(rebuilt.index.names, ['good', 'over', 'under', 'wrong', 'fracture']);
  for (const entry of rebuilt.index.cases) {
    t.equal(entry.present.reduce((a, b) => a + b, 0), 1, `${entry.id}: single mode, one annotator`);
    const cached = await readCachedCase(cacheDir, entry.id);
    cached.labels.forEach((labels, r) => {
      if (!entry.present[r]) t.ok(labels.every((v) => v === UNLABELLED), 'absent annotator reads as 255');
    });
  }
  // A case removed from the data folder leaves the cache too.
  const smaller = tempDir(t);
  const ids = rebuilt.index.cases.map((c) => c.id);
  for (const id of ids.slice(0, 2)) fs.cpSync(path.join(dataDir, id), path.join(smaller, id), { recursive: true });
  const moved = tempDir(t);
  fs.cpSync(cacheDir, moved, { recursive: true });
  const pruned = await prepareCache(smaller, moved, {
    seed: 2,
    mode: 'single',
    annotators: [{ kind: 'good' }, { kind: 'over' }, { kind: 'under' }, { kind: 'wrong' }, { kind: 'fracture' }],
  });
  t.same(pruned.removed, [ids[2]]);
  t.notOk(fs.existsSync(path.join(moved, 'cases', `${ids[2]}.bin`)));
});

// SPEC section 7: single mode thins the training cases' labels only; validation and test
// are scored with every annotator. The independent truth: a dense cache with the same seed.
t.test('a single-mode case is scored with every annotator: the dense cache of the same seed', async (t) => {
  const annotators = [{ kind: 'good' as const }, { kind: 'over' as const }, { kind: 'under' as const }, { kind: 'wrong' as const }];
  const singleDir = tempDir(t);
  const denseDir = tempDir(t);
  const single = await prepareCache(dataDir, singleDir, { seed: 4, mode: 'single', annotators });
  await prepareCache(dataDir, denseDir, { seed: 4, mode: 'dense', annotators });
  for (const entry of single.index.cases) {
    const stored = await readCachedCase(singleDir, entry.id);
    const scored = await readCachedCaseForScoring(singleDir, entry.id);
    const dense = await readCachedCase(denseDir, entry.id);
    t.same(Array.from(scored.present), [1, 1, 1, 1], `${entry.id}: every annotator present`);
    t.equal(firstDifference(scored.images, stored.images), -1, 'images as read');
    for (let r = 0; r < annotators.length; r++) {
      t.equal(firstDifference(scored.labels[r], dense.labels[r]), -1, `${entry.id} annotator ${r}: the dense cache's map`);
      if (entry.present[r]) t.equal(firstDifference(scored.labels[r], stored.labels[r]), -1, `${entry.id}: the stored annotator ${r} unchanged`);
    }
  }
  // A dense cache's case is returned as read.
  const id = single.index.cases[0].id;
  const denseScored = await readCachedCaseForScoring(denseDir, id);
  const denseRead = await readCachedCase(denseDir, id);
  t.equal(firstDifference(denseScored.labels[1], denseRead.labels[1]), -1);
});

t.test("a killed writer's temp files are removed when the cache is next written; a live one's stay", async (t) => {
  const cacheDir = tempDir(t);
  await prepareCache(dataDir, cacheDir, { seed: 1 });
  const dead = spawnSync(process.execPath, ['-e', '0']).pid!; // exited: its pid is free
  const hex = 'a1b2c3d4e5f6';
  const deadTemps = [path.join(cacheDir, `.index.json.${dead}.${hex}.tmp`), path.join(cacheDir, 'cases', `.BraTS2021_00000.bin.${dead}.${hex}.tmp`)];
  const liveTemp = path.join(cacheDir, 'cases', `.BraTS2021_00001.bin.${process.pid}.${hex}.tmp`);
  for (const f of [...deadTemps, liveTemp]) fs.writeFileSync(f, 'partial');
  const again = await prepareCache(dataDir, cacheDir, { seed: 1 });
  t.equal(again.prepared.length, 0, 'nothing to prepare again');
  for (const f of deadTemps) t.notOk(fs.existsSync(f), `${path.basename(f)} removed`);
  t.ok(fs.existsSync(liveTemp), "a live writer's temp file stays");
});

t.test('the cache lock is not shared within a process: a second writer is refused, not let in', async (t) => {
  // Two writers in one process (prepareCache / fuseCachedCases called concurrently) would
  // each rewrite index.json from their own copy, losing the other's entries, and the first
  // to finish would release the lock under the second.
  const dir = tempDir(t);
  const lock = path.join(dir, '.prepare.lock');
  await withCacheLock(dir, async () => {
    await t.rejects(withCacheLock(dir, async () => 1), { name: 'CacheError', kind: 'locked' });
    t.ok(fs.existsSync(lock), 'the first writer still holds its lock');
  });
  t.notOk(fs.existsSync(lock), 'released');
  // A lock file with this process's pid that nobody here holds (a dead process whose pid we reuse) is taken over.
  fs.writeFileSync(lock, String(process.pid));
  t.equal(await withCacheLock(dir, async () => 2), 2);
  t.notOk(fs.existsSync(lock), 'released again');
});
