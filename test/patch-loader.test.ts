// The patch loader: batch layout, padding, determinism across worker counts, flips that
// move image and labels together, foreground oversampling.

import t, { Test } from 'tap';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { UNLABELLED } from '../src/data/annotators';
import { writeBratsPhantoms } from '../src/data/brats-phantom';
import { type CachedCase, CaseFileReader, prepareCache, readCachedCase, readCacheIndex } from '../src/data/cache';
import { writeNifti, type Matrix4 } from '../src/data/nifti';
import { type PatchBatch, PatchLoader, PatchSampler, resolveSamplingSettings } from '../src/data/patch-loader';
import { firstDifference } from './helpers/files';

function tempDir(): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), 'cmseg-patches-'));
}

let phantomCache = '';
let gridCache = '';
const cleanup: string[] = [];

// A case whose t1 value names its voxel: t1 = 1 + x + nx * (y + ny * z), all non-zero so
// nothing is cropped. The z-score keeps values distinct, so every image value in a patch
// tells which case voxel it came from, and the labels there must be that voxel's labels.
const GRID_DIMS: [number, number, number] = [20, 18, 12];

async function writeGridCase(root: string): Promise<void> {
  const [nx, ny, nz] = GRID_DIMS;
  const id = 'Grid_001';
  const dir = path.join(root, id);
  fs.mkdirSync(dir, { recursive: true });
  const voxels = nx * ny * nz;
  const affine: Matrix4 = [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]];
  const channel = (c: number) => Float32Array.from({ length: voxels }, (_, i) => (c === 0 ? 1 + i : 100 + c * 10 + (i % 7)));
  const seg = new Uint8Array(voxels);
  for (let z = 0; z < nz; z++) {
    for (let y = 0; y < ny; y++) {
      for (let x = 0; x < nx; x++) {
        // An asymmetric tumour: core near one corner, labels change along every axis.
        const r = Math.hypot(x - 6, (y - 7) * 1.3, (z - 4) * 1.6);
        seg[x + nx * (y + ny * z)] = r < 2 ? 1 : r < 3.5 ? 4 : r < 6 ? 2 : 0;
      }
    }
  }
  const names = ['t1', 't1ce', 't2', 'flair'];
  await Promise.all(names.map((m, c) => writeNifti(path.join(dir, `${id}_${m}.nii`), { dims: GRID_DIMS, data: channel(c), affine })));
  await writeNifti(path.join(dir, `${id}_seg.nii`), { dims: GRID_DIMS, data: seg, affine }, { datatype: 'uint8' });
}

t.before(async () => {
  const phantomData = tempDir();
  phantomCache = tempDir();
  const gridData = tempDir();
  gridCache = tempDir();
  cleanup.push(phantomData, phantomCache, gridData, gridCache);
  await writeBratsPhantoms(phantomData, { cases: 3, size: [48, 48, 32], seed: 21 });
  await prepareCache(phantomData, phantomCache, { dtype: 'float16' });
  await writeGridCase(gridData);
  await prepareCache(gridData, gridCache, { dtype: 'float32' });
});
t.teardown(() => cleanup.forEach((dir) => fs.rmSync(dir, { recursive: true, force: true })));

async function batches(t: Test, options: Parameters<typeof PatchLoader.open>[0], count: number): Promise<PatchBatch[]> {
  const loader = await PatchLoader.open(options);
  t.teardown(() => loader.close());
  const out: PatchBatch[] = [];
  for (let k = 0; k < count; k++) out.push(await loader.next());
  await loader.close();
  return out;
}

t.test('batch layout matches the trainer: [B, C, D, H, W] images, [B, D, H, W] labels, [B, R] presence', async (t) => {
  const [batch] = await batches(t, { cacheDir: phantomCache, patchSize: [16, 24, 32], batchSize: 3, workers: 0 }, 1);
  t.same(batch.shape, [3, 4, 16, 24, 32]);
  const voxels = 16 * 24 * 32;
  t.equal(batch.images.length, 3 * 4 * voxels);
  t.ok(batch.images instanceof Float32Array);
  t.equal(batch.labels.length, 3, 'one map per annotator');
  for (const labels of batch.labels) t.equal(labels.length, 3 * voxels);
  t.equal(batch.consensus.length, 3 * voxels);
  t.same(batch.present, [1, 1, 1, 1, 1, 1, 1, 1, 1]);
  t.equal(batch.samples.length, 3);
  t.ok(batch.images.every(Number.isFinite));
  t.ok(batch.consensus.every((v) => v < 4) && batch.labels.every((l) => l.every((v) => v < 4)), 'labels in 0..3');
  t.equal(batch.index, 0);
});

t.test('a case smaller than the patch is padded with 0', async (t) => {
  // The grid case is 12 x 18 x 20 (D, H, W); ask for 16 x 24 x 24.
  const [batch] = await batches(t, { cacheDir: gridCache, patchSize: [16, 24, 24], workers: 0, augment: false }, 1);
  const [, , pd, ph, pw] = batch.shape;
  const [oz, oy, ox] = batch.samples[0].origin;
  t.ok(oz <= 0 && oz >= 12 - 16 && oy <= 0 && oy >= 18 - 24 && ox <= 0 && ox >= 20 - 24, `origin ${[oz, oy, ox]} keeps the case inside`);
  let nonZero = 0;
  for (let i = 0; i < pd * ph * pw; i++) if (batch.images[i] !== 0) nonZero++;
  t.equal(nonZero, 12 * 18 * 20, 'every case voxel is in the patch exactly once; the rest is padding');
  t.equal(batch.consensus.length, pd * ph * pw);
});

t.test('deterministic per seed, the same for any worker count; firstBatch resumes the stream', async (t) => {
  const options = { cacheDir: phantomCache, patchSize: 24, batchSize: 2, seed: 7 };
  const inProcess = await batches(t, { ...options, workers: 0 }, 5);
  const threaded = await batches(t, { ...options, workers: 2, prefetch: 3 }, 5);
  for (let k = 0; k < 5; k++) {
    t.equal(firstDifference(threaded[k].images, inProcess[k].images), -1, `batch ${k} images`);
    threaded[k].labels.forEach((l, r) => t.equal(firstDifference(l, inProcess[k].labels[r]), -1, `batch ${k} labels ${r}`));
    t.equal(firstDifference(threaded[k].consensus, inProcess[k].consensus), -1, `batch ${k} consensus`);
    t.same(threaded[k].samples, inProcess[k].samples, `batch ${k} samples`);
  }
  const resumed = await batches(t, { ...options, workers: 0, firstBatch: 3 }, 2);
  t.same(resumed.map((b) => b.index), [3, 4]);
  t.equal(firstDifference(resumed[0].images, inProcess[3].images), -1, 'firstBatch 3 continues where batch 2 stopped');
  const other = await batches(t, { ...options, seed: 8, workers: 0 }, 1);
  t.not(firstDifference(other[0].images, inProcess[0].images), -1, 'another seed, other patches');
});

t.test('flips move image and every label map together', async (t) => {
  const index = readCacheIndex(gridCache);
  const cached: CachedCase = await readCachedCase(gridCache, index.cases[0].id, index);
  const [, D, H, W] = cached.shape;
  t.same([D, H, W], [GRID_DIMS[2], GRID_DIMS[1], GRID_DIMS[0]], 'not cropped');
  const voxelOf = new Map<number, number>();
  for (let i = 0; i < D * H * W; i++) voxelOf.set(cached.images[i], i);
  t.equal(voxelOf.size, D * H * W, 't1 values are distinct');

  const patch: [number, number, number] = [8, 10, 12];
  const settings = resolveSamplingSettings({ patchSize: patch, batchSize: 4, seed: 3, intensityScale: [1, 1], intensityShift: [0, 0] });
  const sampler = new PatchSampler([{ id: cached.id, file: path.join(gridCache, index.cases[0].file), shape: cached.shape }], settings, index.names);
  t.teardown(() => sampler.close());
  const flipsSeen = [0, 0, 0];
  let checked = 0;
  let wrongVoxel = 0;
  let wrongLabel = 0;
  const [pd, ph, pw] = patch;
  const patchVoxels = pd * ph * pw;
  for (let k = 0; k < 10; k++) {
    const batch = sampler.batch(k);
    batch.samples.forEach((sample, b) => {
      sample.flip.forEach((f, a) => (flipsSeen[a] += f ? 1 : 0));
      for (let pz = 0; pz < pd; pz++) {
        for (let py = 0; py < ph; py++) {
          for (let px = 0; px < pw; px++) {
            const p = (pz * ph + py) * pw + px;
            const value = batch.images[b * 4 * patchVoxels + p];
            const source = voxelOf.get(value);
            // Where the sample's origin and flips say this patch voxel comes from.
            const z = sample.origin[0] + (sample.flip[0] ? pd - 1 - pz : pz);
            const y = sample.origin[1] + (sample.flip[1] ? ph - 1 - py : py);
            const x = sample.origin[2] + (sample.flip[2] ? pw - 1 - px : px);
            if (source !== (z * H + y) * W + x) wrongVoxel++;
            if (source === undefined) continue;
            checked++;
            if (batch.consensus[b * patchVoxels + p] !== cached.consensus[source]) wrongLabel++;
            batch.labels.forEach((labels, r) => {
              if (labels[b * patchVoxels + p] !== cached.labels[r][source]) wrongLabel++;
            });
          }
        }
      }
    });
  }
  t.ok(flipsSeen.every((n) => n > 0 && n < 40), `flips along every axis, not always (${flipsSeen})`);
  t.equal(checked, 40 * patchVoxels, 'every patch voxel checked');
  t.equal(wrongVoxel, 0, 'image voxels come from origin + flip');
  t.equal(wrongLabel, 0, 'consensus and every annotator label belong to the same voxel as the image');
});

// Bytes changed on disk after prepare: the patch's error names the case file, not an
// index into a batch the trainer happened to build.
t.test('a damaged case file is named: NaN image values, labels out of range', async (t) => {
  const index = readCacheIndex(gridCache);
  const entry = index.cases[0];
  const damage = (edit: (bytes: Buffer, header: CaseFileReader['header']) => void) => {
    const dir = tempDir();
    t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
    fs.cpSync(gridCache, dir, { recursive: true });
    const file = path.join(dir, entry.file);
    const reader = CaseFileReader.open(file);
    const header = reader.header;
    reader.close();
    const bytes = fs.readFileSync(file);
    edit(bytes, header);
    fs.writeFileSync(file, bytes);
    // Patches as large as the case: every voxel is read.
    return new PatchSampler([{ id: entry.id, file, shape: entry.shape }], resolveSamplingSettings({ patchSize: [entry.shape[1], entry.shape[2], entry.shape[3]], seed: 1, augment: false }), index.names);
  };
  const nan = damage((bytes, header) => bytes.writeFloatLE(NaN, header.sections.images.offset + 4 * 37));
  t.throws(() => nan.batch(0), { name: 'PatchLoaderError', message: new RegExp(`the cache file .*${entry.id}\\.bin of case ${entry.id} is damaged: its image channel 0 holds NaN; prepare the case again`) });
  nan.close();
  const label = damage((bytes, header) => (bytes[header.sections.labels[1]!.offset + 5] = 9));
  t.throws(() => label.batch(0), { name: 'PatchLoaderError', message: /is damaged: annotator 1's labels hold label 9 \(classes 0\.\.3, 255 unlabelled\)/ });
  label.close();
});

t.test('intensity augmentation: per-channel scale and shift inside the case only', async (t) => {
  const index = readCacheIndex(gridCache);
  const cached = await readCachedCase(gridCache, index.cases[0].id, index);
  const file = path.join(gridCache, index.cases[0].file);
  const plain = new PatchSampler([{ id: cached.id, file, shape: cached.shape }], resolveSamplingSettings({ patchSize: [12, 18, 20], seed: 1, augment: false }), index.names);
  const augmented = new PatchSampler([{ id: cached.id, file, shape: cached.shape }], resolveSamplingSettings({ patchSize: [12, 18, 20], seed: 1, flipProbability: 0 }), index.names);
  t.teardown(() => {
    plain.close();
    augmented.close();
  });
  const a = plain.batch(0);
  const b = augmented.batch(0);
  const voxels = 12 * 18 * 20;
  for (let c = 0; c < 4; c++) {
    const { scale, shift } = b.samples[0];
    t.ok(scale[c] >= 0.9 && scale[c] <= 1.1 && shift[c] >= -0.1 && shift[c] <= 0.1, `channel ${c}: scale ${scale[c].toFixed(3)}, shift ${shift[c].toFixed(3)}`);
    let worst = 0;
    for (let i = 0; i < voxels; i++) worst = Math.max(worst, Math.abs(b.images[c * voxels + i] - (a.images[c * voxels + i] * scale[c] + shift[c])));
    t.ok(worst < 1e-5, `channel ${c}: v * scale + shift`);
  }
  t.same(a.samples[0].scale, [1, 1, 1, 1], 'augment: false leaves intensities alone');
  t.equal(firstDifference(b.consensus, a.consensus), -1, 'labels unchanged by intensity augmentation');
});

t.test('foreground oversampling: about a third of the patches are centred on tumour', async (t) => {
  const index = readCacheIndex(phantomCache);
  const cases = await Promise.all(index.cases.map((c) => readCachedCase(phantomCache, c.id, index)));
  const settings = resolveSamplingSettings({ patchSize: 16, batchSize: 10, seed: 2, foregroundFrom: 'consensus' });
  const sampler = new PatchSampler(
    index.cases.map((c) => ({ id: c.id, file: path.join(phantomCache, c.file), shape: c.shape })),
    settings,
    index.names,
  );
  t.teardown(() => sampler.close());
  let samples = 0;
  let forced = 0;
  let centredOnTumour = 0;
  let forcedOnTumour = 0;
  for (let k = 0; k < 30; k++) {
    const batch = sampler.batch(k);
    batch.samples.forEach((sample, b) => {
      samples++;
      const cached = cases.find((c) => c.id === sample.caseId) as CachedCase;
      const [, , H, W] = cached.shape;
      // The patch's central voxel, in case coordinates.
      const at = sample.origin.map((o, a) => o + (sample.flip[a] ? 16 - 1 - 8 : 8));
      const inside = at.every((v, a) => v >= 0 && v < cached.shape[a + 1]);
      if (inside && cached.consensus[(at[0] * H + at[1]) * W + at[2]] > 0) centredOnTumour++;
      if (sample.foreground) {
        forced++;
        const [z, y, x] = sample.centre as number[];
        if (cached.consensus[(z * H + y) * W + x] > 0) forcedOnTumour++;
        t.ok(sample.origin.every((o, a) => sample.centre![a] >= o && sample.centre![a] < o + 16), 'the chosen tumour voxel is inside the patch');
      }
      // The patch's own consensus agrees with the case at its centre voxel.
      const patchCentre = (8 * 16 + 8) * 16 + 8;
      if (inside) t.equal(batch.consensus[b * 4096 + patchCentre], cached.consensus[(at[0] * H + at[1]) * W + at[2]]);
    });
  }
  t.equal(forcedOnTumour, forced, 'forced samples are centred on consensus tumour voxels');
  t.ok(forced / samples > 0.22 && forced / samples < 0.45, `forced share ${forced}/${samples} ~ 1/3`);
  t.ok(centredOnTumour / samples >= 0.3, `patch centres on tumour: ${centredOnTumour}/${samples}`);

  const none = resolveSamplingSettings({ patchSize: 16, batchSize: 10, seed: 2, foregroundFraction: 0 });
  const uniform = new PatchSampler(index.cases.map((c) => ({ id: c.id, file: path.join(phantomCache, c.file), shape: c.shape })), none, index.names);
  t.teardown(() => uniform.close());
  t.ok(uniform.batch(0).samples.every((s) => !s.foreground), 'foregroundFraction 0: no forced samples');
});

t.test('option and case errors', async (t) => {
  await t.rejects(PatchLoader.open({ cacheDir: phantomCache, caseIds: ['nope'], workers: 0 }), { name: 'PatchLoaderError', message: /nope/ });
  await t.rejects(PatchLoader.open({ cacheDir: phantomCache, patchSize: 0, workers: 0 }), /patchSize/);
  await t.rejects(PatchLoader.open({ cacheDir: path.join(phantomCache, 'missing'), workers: 0 }), { name: 'CacheError', kind: 'bad-index' });
  const loader = await PatchLoader.open({ cacheDir: phantomCache, workers: 0, patchSize: 8 });
  await loader.close();
  await t.rejects(loader.next(), /closed/);
  t.equal(UNLABELLED, 255);
});
