// The STAPLE baselines on BraTS: each training case's annotator maps fused once into the
// cache (src/fusion/fuse-cache.ts), checked against fuse() run directly and against
// SimpleITK; reuse of current maps and refusing stale ones; training patches cut from the
// fused map exactly where (and flipped as) the image patch is; and `cmseg train --method
// naive-staple / naive-spatial-staple` end to end, with eval and predict on the result.
import t from 'tap';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { writeBratsPhantoms } from '../src/data/brats-phantom';
import {
  type CacheFusion,
  type CachedCase,
  prepareCache,
  readCacheIndex,
  readCachedCase,
  readFusedLabels,
} from '../src/data/cache';
import { PatchLoader, type PatchBatch } from '../src/data/patch-loader';
import { Rng } from '../src/data/random';
import { fuse, stapleFuseOptions } from '../src/fusion/fuse';
import { fuseCachedCases } from '../src/fusion/fuse-cache';
import { bratsCaseSplits, type BratsDatasetSpec, loadExperimentData } from '../src/train/experiment';
import { methodBatch, methodDefinition } from '../src/train/methods';
import { PRESETS } from '../src/train/presets';
import { runCli } from './helpers/cli';
import { missingPythonModules } from './helpers/python';
import { spawnSync } from 'child_process';
import { firstDifference, tempDir } from './helpers/files';
import { unpadded } from './helpers/tables';

const SIZE: [number, number, number] = [48, 48, 32];
const FUSIONS: CacheFusion[] = ['multi-staple', 'spatial-staple'];

/** fuse() on the case's maps as the cache stores them, with the options a BraTS run uses: the independent truth. */
async function fuseDirectly(c: CachedCase, fusion: CacheFusion): Promise<Uint8Array> {
  const maps = c.labels.map((map, r) => (c.present[r] ? map : null));
  const result = await fuse(maps, stapleFuseOptions(fusion, c.classes, [c.extent.d, c.extent.h, c.extent.w]));
  return result.labels!;
}

/** Shared phantom data (read-only): four cases. */
let dataDir = '';
t.before(async () => {
  dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'cmseg-staple-data-'));
  await writeBratsPhantoms(dataDir, { cases: 4, size: SIZE, seed: 31 });
});
t.teardown(() => fs.rmSync(dataDir, { recursive: true, force: true }));

t.test('the fused map in the cache is fuse() on the case\'s own annotator maps (dense and single labels)', async (t) => {
  for (const mode of ['dense', 'single'] as const) {
    const cacheDir = tempDir(t);
    const { index } = await prepareCache(dataDir, cacheDir, { mode, seed: 2 });
    const ids = index.cases.map((c) => c.id);
    for (const fusion of FUSIONS) {
      const result = await fuseCachedCases(cacheDir, ids, fusion);
      t.same(result.fused, ids, `${mode} ${fusion}: every case fused`);
      t.same(result.reused, []);
      const after = readCacheIndex(cacheDir);
      for (const id of ids) {
        const c = await readCachedCase(cacheDir, id, after);
        const stored = await readFusedLabels(cacheDir, id, fusion, after);
        const expected = await fuseDirectly(c, fusion);
        t.equal(firstDifference(stored.labels, expected), -1, `${mode} ${fusion} ${id}: stored map = fuse() on the stored annotators`);
        t.same(stored.header.shape, [c.extent.d, c.extent.h, c.extent.w]);
        t.same(stored.header.present, Array.from(c.present));
        const R = c.names.length;
        const L = c.classes;
        t.equal(stored.header.cms.length, R * L * L, 'one CM per annotator, estimated on this case');
        c.present.forEach((p, r) => {
          const cm = stored.header.cms.slice(r * L * L, (r + 1) * L * L);
          t.ok(p ? cm.every((x) => typeof x === 'number') : cm.every((x) => x === null), `annotator ${r} ${p ? 'present: numbers' : 'absent: null'}`);
        });
        const record = after.cases.find((e) => e.id === id)!.fused![fusion]!;
        t.equal(record.file, `cases/${fusion}/${id}.bin`, 'kept beside the case files, one folder per fusion');
        t.same(record.options, stapleFuseOptions(fusion, L, [c.extent.d, c.extent.h, c.extent.w]));
      }
    }
    if (mode === 'single') {
      // One annotator per case: STAPLE of one rater is that rater's map.
      const c = await readCachedCase(cacheDir, ids[0]);
      const only = c.present.indexOf(1);
      t.equal(firstDifference((await readFusedLabels(cacheDir, ids[0], 'multi-staple')).labels, c.labels[only]), -1, 'single labels: the one annotator\'s map');
    }
  }
});

t.test('multi-label STAPLE of a cached case agrees with SimpleITK', { skip: missingPythonModules('SimpleITK', 'numpy') }, async (t) => {
  const cacheDir = tempDir(t);
  const { index } = await prepareCache(dataDir, cacheDir);
  const id = index.cases[1].id;
  await fuseCachedCases(cacheDir, [id], 'multi-staple');
  const c = await readCachedCase(cacheDir, id);
  const caseDir = tempDir(t, 'cmseg-staple-oracle-');
  c.labels.forEach((map, r) => fs.writeFileSync(path.join(caseDir, `r${r}.u8`), map));
  // ITK marks posterior ties with its own label; 255 keeps them apart from the classes.
  fs.writeFileSync(
    path.join(caseDir, 'case.txt'),
    `method=multilabel\nshape=${c.extent.d},${c.extent.h},${c.extent.w}\nraters=${c.labels.map((_, r) => `r${r}.u8`).join(',')}\nundecided=255\n`,
  );
  const run = spawnSync(process.env.CMSEG_PYTHON ?? 'python3', [path.join(__dirname, '..', 'scripts', 'fusion_oracle.py'), caseDir], { encoding: 'utf8' });
  t.equal(run.status, 0, run.stderr);
  const theirs = new Uint8Array(fs.readFileSync(path.join(caseDir, 'oracle_labels.u8')));
  const ours = (await readFusedLabels(cacheDir, id, 'multi-staple')).labels;
  t.equal(theirs.length, ours.length);
  let decided = 0;
  let same = 0;
  for (let v = 0; v < ours.length; v++) {
    if (theirs[v] === 255) continue;
    decided++;
    if (theirs[v] === ours[v]) same++;
  }
  t.ok(decided >= 0.99 * ours.length, `SimpleITK decided ${decided} of ${ours.length} voxels`);
  t.ok(same >= 0.999 * decided, `${same} of ${decided} decided voxels agree with SimpleITK (${((100 * same) / decided).toFixed(3)}%)`);
});

t.test('current maps are reused; missing, stale and re-prepared ones are fused again', async (t) => {
  const data = tempDir(t);
  fs.cpSync(dataDir, data, { recursive: true });
  const cacheDir = tempDir(t);
  const { index } = await prepareCache(data, cacheDir);
  const ids = index.cases.map((c) => c.id);
  const fusedPath = (id: string) => path.join(cacheDir, 'cases', 'multi-staple', `${id}.bin`);
  const progress: string[] = [];
  const first = await fuseCachedCases(cacheDir, ids, 'multi-staple', { onProgress: (p) => void progress.push(`${p.position + 1}/${p.total} ${p.id} ${p.status}`) });
  t.same(first.fused, ids);
  t.same(progress, ids.map((id, k) => `${k + 1}/4 ${id} fused`), 'progress after every case');
  t.notOk(fs.existsSync(path.join(cacheDir, '.prepare.lock')), 'the lock is released');
  t.same(fs.readdirSync(path.join(cacheDir, 'cases')).filter((f) => f.endsWith('.tmp')), [], 'no temp files left');
  const mtimes = () => ids.map((id) => fs.statSync(fusedPath(id)).mtimeMs);
  const before = mtimes();

  const again = await fuseCachedCases(cacheDir, ids, 'multi-staple');
  t.same([again.fused, again.reused], [[], ids], 'a second run reuses every map');
  t.same(mtimes(), before, 'no fused file rewritten');
  // A later prepare that skips every case keeps the records.
  t.equal((await prepareCache(data, cacheDir)).skipped.length, 4);
  t.same((await fuseCachedCases(cacheDir, ids, 'multi-staple')).reused, ids, 'still current after a prepare that changed nothing');

  // Missing file: fused again (only that case).
  fs.rmSync(fusedPath(ids[0]));
  const missing = await fuseCachedCases(cacheDir, ids, 'multi-staple');
  t.same([missing.fused, missing.reused], [[ids[0]], ids.slice(1)], 'a deleted map is fused again');

  // Other fusion options recorded (as after a change of the spatial STAPLE grid rule): stale.
  const indexFile = path.join(cacheDir, 'index.json');
  const edited = JSON.parse(fs.readFileSync(indexFile, 'utf8'));
  edited.cases[1].fused['multi-staple'].options.threshold = 0.1;
  fs.writeFileSync(indexFile, JSON.stringify(edited));
  const options = await fuseCachedCases(cacheDir, ids, 'multi-staple');
  t.same(options.fused, [ids[1]], 'a map fused with other options is fused again');

  // A case whose source changed is prepared again: its old map goes, the next fusion remakes it.
  const seg = path.join(data, ids[2], `${ids[2]}_seg.nii.gz`);
  const later = new Date(Date.now() + 5000);
  fs.utimesSync(seg, later, later);
  const reprepared = await prepareCache(data, cacheDir);
  t.same(reprepared.prepared, [ids[2]]);
  t.equal(readCacheIndex(cacheDir).cases.find((e) => e.id === ids[2])!.fused, undefined, 'the re-prepared case has no fused record');
  t.notOk(fs.existsSync(fusedPath(ids[2])), 'and its old map is deleted');
  await t.rejects(readFusedLabels(cacheDir, ids[2], 'multi-staple'), { name: 'CacheError', message: /never fused/ });
  const afterPrepare = await fuseCachedCases(cacheDir, ids, 'multi-staple');
  t.same(afterPrepare.fused, [ids[2]]);

  // A case file rewritten behind the index's back (a run killed between the two writes): stale by size/mtime.
  const caseFile = path.join(cacheDir, 'cases', `${ids[3]}.bin`);
  const touched = new Date(Date.now() + 10000);
  fs.utimesSync(caseFile, touched, touched);
  await t.rejects(readFusedLabels(cacheDir, ids[3], 'multi-staple'), { name: 'CacheError', message: /stale/ });
  t.same((await fuseCachedCases(cacheDir, ids, 'multi-staple')).fused, [ids[3]], 'a changed case file makes its map stale');

  // Each map still equals fuse() on its case.
  for (const id of ids) {
    const c = await readCachedCase(cacheDir, id);
    t.equal(firstDifference((await readFusedLabels(cacheDir, id, 'multi-staple')).labels, await fuseDirectly(c, 'multi-staple')), -1, `${id} correct after the updates`);
  }

  // The cache's lock, taken only when a case must be fused (maps all current need none: a cache
  // shared read-only): then a live writer is refused, a dead one's lock taken over.
  fs.writeFileSync(path.join(cacheDir, '.prepare.lock'), String(process.ppid));
  t.same((await fuseCachedCases(cacheDir, ids, 'multi-staple')).reused, ids, 'all current: no lock needed');
  const newer = new Date(Date.now() + 20000);
  fs.utimesSync(caseFile, newer, newer);
  await t.rejects(fuseCachedCases(cacheDir, ids, 'multi-staple'), { name: 'CacheError', kind: 'locked' });
  fs.writeFileSync(path.join(cacheDir, '.prepare.lock'), '999999999');
  t.same((await fuseCachedCases(cacheDir, ids, 'multi-staple')).fused, [ids[3]], 'stale lock taken over');
  await t.rejects(fuseCachedCases(cacheDir, ['BraTS2021_99999'], 'multi-staple'), { name: 'CacheError', kind: 'unknown-case' });
});

/** The expected fused patch of a sample: the map at origin + (flipped) patch offset, background outside the case. */
function cropOf(map: Uint8Array, extent: { d: number; h: number; w: number }, sample: PatchBatch['samples'][number], patch: number[]): Uint8Array {
  const [pd, ph, pw] = patch;
  const out = new Uint8Array(pd * ph * pw);
  for (let pz = 0; pz < pd; pz++) {
    for (let py = 0; py < ph; py++) {
      for (let px = 0; px < pw; px++) {
        const z = sample.origin[0] + (sample.flip[0] ? pd - 1 - pz : pz);
        const y = sample.origin[1] + (sample.flip[1] ? ph - 1 - py : py);
        const x = sample.origin[2] + (sample.flip[2] ? pw - 1 - px : px);
        const inside = z >= 0 && z < extent.d && y >= 0 && y < extent.h && x >= 0 && x < extent.w;
        out[(pz * ph + py) * pw + px] = inside ? map[(z * extent.h + y) * extent.w + x] : 0;
      }
    }
  }
  return out;
}

t.test('training patches: the target is the fused map cut and flipped like the image', async (t) => {
  const cacheDir = tempDir(t);
  const { index } = await prepareCache(dataDir, cacheDir);
  const ids = index.cases.map((c) => c.id);
  await t.rejects(PatchLoader.open({ cacheDir, fused: 'multi-staple', workers: 0 }), /4 case\(s\) .* have no current multi-staple labels: .*never fused/, 'refused before fusing');
  await fuseCachedCases(cacheDir, ids, 'multi-staple');
  const fusedMaps = new Map<string, Uint8Array>();
  const cases = new Map<string, CachedCase>();
  for (const id of ids) {
    fusedMaps.set(id, (await readFusedLabels(cacheDir, id, 'multi-staple')).labels);
    cases.set(id, await readCachedCase(cacheDir, id));
  }
  // Patches larger than the case along some axes (48x48x32 is cropped to the brain): padding too.
  const patch = [16, 24, 40];
  const options = { cacheDir, fused: 'multi-staple' as const, patchSize: patch as [number, number, number], batchSize: 2, seed: 5, foregroundFraction: 0.5 };
  const read = async (workers: number) => {
    const loader = await PatchLoader.open({ ...options, workers });
    try {
      const out: PatchBatch[] = [];
      for (let k = 0; k < 12; k++) out.push(await loader.next());
      return out;
    } finally {
      await loader.close();
    }
  };
  const batches = await read(0);
  const V = patch[0] * patch[1] * patch[2];
  let checked = 0;
  const flipsSeen = [0, 0, 0];
  for (const batch of batches) {
    t.equal(batch.fused?.length, 2 * V);
    batch.samples.forEach((sample, b) => {
      sample.flip.forEach((f, a) => (flipsSeen[a] += f ? 1 : 0));
      const c = cases.get(sample.caseId)!;
      const want = cropOf(fusedMaps.get(sample.caseId)!, c.extent, sample, patch);
      t.equal(firstDifference(batch.fused!.subarray(b * V, (b + 1) * V), want), -1, `batch ${batch.index} sample ${b}: fused target = crop of the fused map at ${sample.origin} flipped ${sample.flip}`);
      // The annotators' maps come out of the same crop: the fused target lines up with them.
      const annotator = cropOf(c.labels[0], c.extent, sample, patch);
      t.equal(firstDifference(batch.labels[0].subarray(b * V, (b + 1) * V), annotator), -1, 'annotator 0 cut at the same place');
      checked++;
    });
  }
  t.equal(checked, 24);
  t.ok(flipsSeen.every((n) => n > 0), `flips along every axis were drawn (${flipsSeen})`);
  // Workers build the same batches, fused targets included.
  const viaWorkers = await read(1);
  viaWorkers.forEach((batch, k) => t.equal(firstDifference(batch.fused!, batches[k].fused!), -1, `batch ${k}: same fused target from a worker`));
  // Without the option nothing changes for the other methods: the same patches, no fused target.
  const plain = await PatchLoader.open({ ...options, fused: undefined, workers: 0 });
  const first = await plain.next();
  await plain.close();
  t.equal(first.fused, undefined);
  t.equal(firstDifference(first.images, batches[0].images), -1, 'the same images as the naive-staple stream');
});

t.test('the BraTS experiment fuses its training cases once and hands the fused patch to the method', async (t) => {
  const cacheDir = tempDir(t);
  const { index } = await prepareCache(dataDir, cacheDir);
  const splits = bratsCaseSplits(index.cases.map((c) => c.id), 0);
  const spec: BratsDatasetSpec = { ...(PRESETS.brats3d.dataset as BratsDatasetSpec), cache: cacheDir, patch: 16, splits };
  const data = loadExperimentData(spec, 3, { batchSize: 1, workers: 0 });
  t.teardown(() => data.close?.());
  const seen: string[] = [];
  const report = await data.prepareFusedTargets!('spatial-staple', { onCase: (p) => void seen.push(`${p.id} ${p.status}`) });
  t.match(report, { fusion: 'spatial-staple', scope: 'cases', fused: splits.train.length, reused: 0 });
  t.same(seen, splits.train.map((id) => `${id} fused`), 'the training cases, and only them');
  for (const id of [...splits.validation, ...splits.test]) t.equal(readCacheIndex(cacheDir).cases.find((e) => e.id === id)!.fused, undefined, `${id} (not training) is not fused`);
  const batch = await data.source.batch(0, 0, 1, new Rng(0));
  t.ok(batch.fused && batch.fused.length === 16 ** 3, 'the batch carries the fused patch');
  const model = methodBatch(methodDefinition('naive-spatial-staple'), batch, 4);
  t.equal(model.target, batch.fused, 'naive-spatial-staple trains on it');
  const again = loadExperimentData(spec, 3, { batchSize: 1, workers: 0 });
  t.teardown(() => again.close?.());
  t.match(await again.prepareFusedTargets!('spatial-staple'), { fused: 0, reused: splits.train.length }, 'a second run reuses the maps');
});

t.test('cmseg train --preset brats3d --method naive-staple / naive-spatial-staple, then eval and predict', async (t) => {
  const dir = tempDir(t, 'cmseg-staple-cli-');
  const cmseg = (args: string[]) => runCli(args, dir);
  const TINY = ['--patch', '16', '--base-channels', '4', '--val-cases', '1', '--steps', '2', '--workers', '0'];
  t.equal((await cmseg(['phantom', 'brats', '--cases', '4', '--out', 'data', '--size', SIZE.join(','), '--seed', '5', '--quiet'])).exitCode, 0);
  t.equal((await cmseg(['prepare', '--data', 'data', '--out', 'cache', '--quiet'])).exitCode, 0);

  const staple = await cmseg(['train', '--preset', 'brats3d', '--data', 'cache', '--method', 'naive-staple', '--out', 'runs/staple', ...TINY]);
  t.equal(staple.exitCode, 0, staple.stderr);
  // Not a terminal: one line per case, then the total time.
  t.match(staple.stderr, /^\[1\/2\] BraTS2021_\d{5} fused in \d+\.\d s\n\[2\/2\] BraTS2021_\d{5} fused in \d+\.\d s\nfused 2 training case\(s\) with multi-label STAPLE into cache in \d+\.\d s \(0 up to date in the cache, reused\)\n/);
  t.match(staple.stdout, /trained naive-staple from step 0 to 2/);
  t.match(unpadded(staple.stdout), /\| whole tumour \(1, 2, 3\) \| \d\.\d{4} \|/, 'one test volume: its value alone');
  t.ok(fs.existsSync(path.join(dir, 'runs/staple/last.safetensors')), 'checkpoint written');
  const testMetrics = JSON.parse(fs.readFileSync(path.join(dir, 'runs/staple/eval-test.json'), 'utf8'));
  t.equal(testMetrics.method, 'naive-staple');
  t.equal(testMetrics.metrics.cmError, undefined, 'scored against the consensus, no CMs');
  const trainIds: string[] = testMetrics.dataset.splits.train;
  const index = readCacheIndex(path.join(dir, 'cache'));
  for (const id of trainIds) t.ok(index.cases.find((e) => e.id === id)!.fused?.['multi-staple'], `${id}: map kept in the cache`);

  const spatial = await cmseg(['train', '--preset', 'brats3d', '--data', 'cache', '--method', 'naive-spatial-staple', '--out', 'runs/spatial', '--quiet', '--no-test', ...TINY]);
  t.equal(spatial.exitCode, 0, spatial.stderr);
  t.equal(spatial.stderr, '', 'quiet');
  t.match(spatial.stdout, /trained naive-spatial-staple from step 0 to 2/);
  t.ok(readCacheIndex(path.join(dir, 'cache')).cases.find((e) => e.id === trainIds[0])!.fused?.['spatial-staple'], 'spatial STAPLE map beside the multi-label one');

  // Another run on the same cache reuses the maps; a resumed run too.
  const second = await cmseg(['train', '--preset', 'brats3d', '--data', 'cache', '--method', 'naive-staple', '--out', 'runs/staple2', '--seed', '1', '--no-test', ...TINY]);
  t.equal(second.exitCode, 0, second.stderr);
  t.match(second.stderr, /^\[1\/2\] BraTS2021_\d{5} up to date in the cache, reused\n\[2\/2\] .* reused\nfused 0 training case\(s\) with multi-label STAPLE into cache in \d+\.\d s \(2 up to date in the cache, reused\)\n/);
  const resumed = await cmseg(['train', '--out', 'runs/staple', '--resume', '--no-test', '--quiet']);
  t.equal(resumed.exitCode, 0, resumed.stderr);
  t.match(resumed.stdout, /the run was already complete at step 2/);

  const evaluated = await cmseg(['eval', '--checkpoint', 'runs/staple/last.safetensors', '--split', 'validation']);
  t.equal(evaluated.exitCode, 0, evaluated.stderr);
  t.match(unpadded(evaluated.stdout), /naive-staple at step 2, validation split:[\s\S]*\| tumour core \(1, 3\) \|/);
  const predicted = await cmseg(['predict', '--checkpoint', 'runs/spatial/last.safetensors', '--out', 'pred']);
  t.equal(predicted.exitCode, 0, predicted.stderr);
  t.match(predicted.stdout, /^predicted 1 case\(s\) from the test split of the run/);
  t.ok(fs.readdirSync(path.join(dir, 'pred')).some((f) => f.endsWith('_consensus.nii.gz')), 'a consensus volume');
});
