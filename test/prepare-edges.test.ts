// Edges of `cmseg prepare`, the BraTS cache and the patch loader met by real users: a run
// killed while a changed case is prepared again, case files cut short after prepare, a
// rebuild after cases left the data folder, and the layouts of the BraTS releases.

import t from 'tap';
import * as fs from 'fs';
import * as path from 'path';
import { discoverBratsCases } from '../src/data/brats';
import { writeBratsPhantoms } from '../src/data/brats-phantom';
import { CaseFileReader, prepareCache, readCacheIndex, readCachedCase } from '../src/data/cache';
import { PatchLoader } from '../src/data/patch-loader';
import { type BratsDatasetSpec, bratsCaseSplits, loadExperimentData } from '../src/train/experiment';
import { runCli } from './helpers/cli';
import { tempDir } from './helpers/files';
import { pythonHasModule, runPythonJson } from './helpers/python';

const SIZE: [number, number, number] = [32, 32, 24];
const noNibabel = !pythonHasModule('nibabel') || !pythonHasModule('numpy');

/** Every index entry must describe the file it names: its size and its label counts. */
function indexMismatches(cacheDir: string): string[] {
  const problems: string[] = [];
  for (const entry of readCacheIndex(cacheDir).cases) {
    const file = path.join(cacheDir, entry.file);
    if (!fs.existsSync(file)) {
      problems.push(`${entry.id}: file missing`);
      continue;
    }
    if (fs.statSync(file).size !== entry.bytes) problems.push(`${entry.id}: size ${fs.statSync(file).size}, index ${entry.bytes}`);
    const reader = CaseFileReader.open(file);
    const counts = reader.header.labelCounts;
    reader.close();
    if (JSON.stringify(counts) !== JSON.stringify(entry.labelCounts)) problems.push(`${entry.id}: label counts ${counts}, index ${entry.labelCounts}`);
  }
  return problems;
}

t.test('a changed case prepared again: a run killed before the index names the new file leaves a valid cache', { skip: noNibabel && 'needs nibabel' }, async (t) => {
  const data = tempDir(t, 'cmseg-h5-data-');
  const cache = tempDir(t, 'cmseg-h5-cache-');
  const cases = await writeBratsPhantoms(data, { cases: 2, size: SIZE, seed: 3 });
  await prepareCache(data, cache);
  const target = cases[1];
  // The annotators' "expert" edits the segmentation: edema (2) becomes background. nibabel
  // writes the file and counts the labels, the independent truth for the cache's counts.
  const counts = runPythonJson<Record<string, number>>(
    `import nibabel as nib, numpy as np, sys, json
img = nib.load(sys.argv[1]); a = np.asarray(img.dataobj).copy(); a[a == 2] = 0
nib.save(nib.Nifti1Image(a, img.affine, img.header), sys.argv[1])
print(json.dumps({str(k): int((a == k).sum()) for k in (1, 2, 4)}))`,
    [target.seg!],
  );
  t.equal(counts['2'], 0);
  // Kill the run at the worst moment: the new case file is in place, the index not yet rewritten.
  const promises = fs.promises as { rename: typeof fs.promises.rename };
  const rename = promises.rename;
  let caseReplaced = false;
  promises.rename = async (from, to) => {
    if (String(to).endsWith(`${target.id}.bin`)) caseReplaced = true;
    else if (caseReplaced && path.basename(String(to)) === 'index.json') throw new Error('killed');
    return rename(from, to);
  };
  try {
    await t.rejects(prepareCache(data, cache), /killed/);
  } finally {
    promises.rename = rename;
  }
  t.ok(caseReplaced, 'the run got as far as replacing the case file');
  t.same(indexMismatches(cache), [], 'the index describes every file it names');
  // The next run finishes the job: the case holds the edited labels.
  const result = await prepareCache(data, cache);
  t.same(result.prepared, [target.id]);
  t.same(indexMismatches(cache), []);
  const entry = readCacheIndex(cache).cases.find((c) => c.id === target.id)!;
  t.same(entry.labelCounts.slice(1), [counts['1'], counts['2'], counts['4']], 'NCR, ED, ET voxels as nibabel counts them');
});

t.test('a case file cut short after prepare: named before training starts; prepare redoes it', async (t) => {
  const data = tempDir(t, 'cmseg-h5-data-');
  const cache = tempDir(t, 'cmseg-h5-cache-');
  const fresh = tempDir(t, 'cmseg-h5-cache-');
  await writeBratsPhantoms(data, { cases: 3, size: SIZE, seed: 4 });
  await prepareCache(data, cache);
  await prepareCache(data, fresh);
  const entry = readCacheIndex(cache).cases[1];
  const file = path.join(cache, entry.file);
  // Cut inside the last section (the annotators' foreground voxel list): every image and
  // label row is intact, so only the locations the foreground samples centre on are lost.
  fs.truncateSync(file, entry.bytes - 16);
  const named = new RegExp(`case file .*${entry.id}\\.bin of case ${entry.id} has ${entry.bytes - 16} bytes, but cmseg prepare wrote ${entry.bytes}.*run \`cmseg prepare\``);
  for (const workers of [0, 1]) {
    await t.rejects(PatchLoader.open({ cacheDir: cache, patchSize: 8, foregroundFraction: 1, workers }), { name: 'PatchLoaderError', message: named }, `workers ${workers}`);
  }
  await t.rejects(readCachedCase(cache, entry.id), { name: 'CacheError', message: named });
  t.throws(() => CaseFileReader.open(file), { name: 'CacheError', message: new RegExp(`of case ${entry.id} is truncated: its sections end at byte ${entry.bytes}, the file has ${entry.bytes - 16}`) });
  // The other cases still load.
  const others = readCacheIndex(cache).cases.filter((c) => c.id !== entry.id).map((c) => c.id);
  const loader = await PatchLoader.open({ cacheDir: cache, caseIds: others, patchSize: 8, workers: 0 });
  t.teardown(() => loader.close());
  t.ok(others.includes((await loader.next()).samples[0].caseId));
  await loader.close();
  // Two damaged cases: both named, the remedy said once.
  const second = readCacheIndex(cache).cases[2];
  fs.truncateSync(path.join(cache, second.file), second.bytes - 1);
  await t.rejects(PatchLoader.open({ cacheDir: cache, patchSize: 8, workers: 0 }), {
    name: 'PatchLoaderError',
    message: new RegExp(`^2 case files in .* are missing or not as cmseg prepare wrote them \\(cases ${entry.id}, ${second.id}\\): run \`cmseg prepare\` with the same --data and --out again \\(it prepares those cases again\\)$`),
  });
  const result = await prepareCache(data, cache);
  t.same(result.prepared, [entry.id, second.id], 'only the damaged cases are prepared again');
  t.ok(fs.readFileSync(file).equals(fs.readFileSync(path.join(fresh, entry.file))), 'byte for byte the file of a fresh cache');
});

t.test('--rebuild after cases left the data folder: their files go too, and are reported removed', async (t) => {
  const data = tempDir(t, 'cmseg-h5-data-');
  const cache = tempDir(t, 'cmseg-h5-cache-');
  const cases = await writeBratsPhantoms(data, { cases: 3, size: SIZE, seed: 5 });
  await prepareCache(data, cache);
  fs.rmSync(cases[0].dir, { recursive: true });
  const result = await prepareCache(data, cache, { rebuild: true, seed: 9 });
  t.same(result.removed, [cases[0].id]);
  t.same(fs.readdirSync(path.join(cache, 'cases')).sort(), [`${cases[1].id}.bin`, `${cases[2].id}.bin`], 'no file of a case the cache no longer holds');
});

t.test('layouts: cases further down, a release without segmentations, a misnamed segmentation', async (t) => {
  const phantoms = tempDir(t, 'cmseg-h5-data-');
  const cases = await writeBratsPhantoms(phantoms, { cases: 3, size: SIZE, seed: 6, uncompressed: true });
  const copyTo = (c: (typeof cases)[number], dir: string) => {
    fs.mkdirSync(dir, { recursive: true });
    fs.cpSync(c.dir, path.join(dir, c.id), { recursive: true });
    return path.join(dir, c.id);
  };

  // BraTS 2019's zip extracted into a folder of its own name: ROOT/MICCAI_BraTS_2019_Data_Training/HGG/ID.
  const zipped = tempDir(t, 'cmseg-h5-layout-');
  const release = path.join(zipped, 'MICCAI_BraTS_2019_Data_Training');
  copyTo(cases[0], path.join(release, 'HGG'));
  copyTo(cases[1], path.join(release, 'LGG'));
  fs.writeFileSync(path.join(release, 'survival_data.csv'), 'BraTS19_ID,Age\n');
  fs.writeFileSync(path.join(zipped, '.DS_Store'), '');
  const cache = tempDir(t, 'cmseg-h5-cache-');
  await t.rejects(prepareCache(zipped, cache), {
    name: 'BratsError',
    kind: 'no-cases',
    message: new RegExp(`the case folders are further down \\(.*HGG/${cases[0].id} is case ${cases[0].id}\\): pass the folder that holds them \\(${release.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}\\)`),
  });
  const result = await prepareCache(release, cache);
  t.same(result.prepared, [cases[0].id, cases[1].id], 'the folder named reads');

  // A validation release: no case has a segmentation.
  const validation = tempDir(t, 'cmseg-h5-layout-');
  for (const c of cases) fs.rmSync(path.join(copyTo(c, validation), path.basename(c.seg!)));
  await t.rejects(prepareCache(validation, tempDir(t, 'cmseg-h5-cache-')), {
    name: 'BratsError',
    kind: 'missing-file',
    message: /^missing segmentation in all 3 cases of .*: a validation or test release has none; training and its cache need one per case \(cmseg predict reads cases without\)$/,
  });

  // BraTS 2020's case 355: its segmentation is W39_1998.09.19_Segm.nii.
  const misnamed = tempDir(t, 'cmseg-h5-layout-');
  for (const c of cases) copyTo(c, misnamed);
  const odd = path.join(misnamed, cases[2].id);
  fs.renameSync(path.join(odd, path.basename(cases[2].seg!)), path.join(odd, 'W39_1998.09.19_Segm.nii'));
  await t.rejects(prepareCache(misnamed, tempDir(t, 'cmseg-h5-cache-')), {
    name: 'BratsError',
    kind: 'missing-file',
    caseId: cases[2].id,
    message: new RegExp(`missing segmentation: .* not found; the folder also holds W39_1998\\.09\\.19_Segm\\.nii: if one is the segmentation, rename it ${cases[2].id}_seg\\.nii$`),
  });
});

t.test('case folders one level deeper inside HGG/ and LGG/: a zip in a folder of its own name is read, others are named', async (t) => {
  const phantoms = tempDir(t, 'cmseg-h5-data-');
  const cases = await writeBratsPhantoms(phantoms, { cases: 4, size: SIZE, seed: 7 });
  const root = tempDir(t, 'cmseg-h5-layout-');
  fs.cpSync(cases[0].dir, path.join(root, 'HGG', cases[0].id), { recursive: true });
  fs.cpSync(cases[1].dir, path.join(root, 'HGG', cases[1].id, cases[1].id), { recursive: true }); // HGG/ID/ID
  fs.cpSync(cases[2].dir, path.join(root, 'LGG', cases[2].id, cases[2].id), { recursive: true }); // LGG/ID/ID
  fs.cpSync(cases[3].dir, path.join(root, 'LGG', 'batch2', cases[3].id), { recursive: true }); // further down, another name
  // A cache prepared into the data folder is no case and worth no note.
  const cache = path.join(root, 'cache');
  const notes: string[] = [];
  const found = discoverBratsCases(root, { onSkipped: (note) => notes.push(note) });
  t.same(found.map((c) => c.id), [cases[0].id, cases[1].id, cases[2].id]);
  t.same(notes, [`skipped 1 entry of ${root} that is not a BraTS case: LGG/batch2/ (case folders further down, such as LGG/batch2/${cases[3].id}/, are not read)`]);
  const result = await prepareCache(root, cache);
  t.same(result.prepared, [cases[0].id, cases[1].id, cases[2].id]);
  const again: string[] = [];
  discoverBratsCases(root, { onSkipped: (note) => again.push(note) });
  t.same(again, notes, 'the cache inside the data folder adds no note');
});

t.test('a case gone from the data folder: a run killed before the index is rewritten leaves the index naming only files that exist', async (t) => {
  const data = tempDir(t, 'cmseg-h5-data-');
  const cache = tempDir(t, 'cmseg-h5-cache-');
  const cases = await writeBratsPhantoms(data, { cases: 3, size: SIZE, seed: 8 });
  await prepareCache(data, cache);
  fs.rmSync(cases[1].dir, { recursive: true });
  const promises = fs.promises as { rename: typeof fs.promises.rename };
  const rename = promises.rename;
  promises.rename = async (from, to) => {
    if (path.basename(String(to)) === 'index.json') throw new Error('killed');
    return rename(from, to);
  };
  try {
    await t.rejects(prepareCache(data, cache), /killed/);
  } finally {
    promises.rename = rename;
  }
  t.same(indexMismatches(cache), [], 'every case the index names has its file');
  const result = await prepareCache(data, cache);
  t.same(result.removed, [cases[1].id]);
  t.same(fs.readdirSync(path.join(cache, 'cases')).sort(), [`${cases[0].id}.bin`, `${cases[2].id}.bin`]);
  t.same(indexMismatches(cache), []);
});

t.test('cmseg prepare: a dangling link in the cache folder does not fail a prepare whose cache is written', async (t) => {
  const data = tempDir(t, 'cmseg-h5-data-');
  const cache = tempDir(t, 'cmseg-h5-cache-');
  await writeBratsPhantoms(data, { cases: 1, size: SIZE, seed: 10 });
  fs.symlinkSync(path.join(cache, 'no-such-file'), path.join(cache, 'old-link'));
  const run = await runCli(['prepare', '--data', data, '--out', cache, '-q'], data);
  t.equal(run.exitCode, 0, run.stderr);
  t.match(run.stdout, /^prepared 1 case\(s\), 0 up to date; the cache holds 1 cases \(0\.\d MB\)/);
});

t.test('an index prepare cannot read (another cache version, not JSON) says that --rebuild is the way out, and --rebuild works', async (t) => {
  const data = tempDir(t, 'cmseg-h5-data-');
  const cache = tempDir(t, 'cmseg-h5-cache-');
  const [c] = await writeBratsPhantoms(data, { cases: 1, size: SIZE, seed: 12 });
  await prepareCache(data, cache);
  const indexFile = path.join(cache, 'index.json');
  const good = fs.readFileSync(indexFile, 'utf8');
  for (const [what, text] of [['version 2', good.replace('"version": 1', '"version": 2')], ['not JSON', good.slice(0, 100)]]) {
    fs.writeFileSync(indexFile, text);
    // "prepare it again" alone would send the user round in circles: prepare reads the index too.
    await t.rejects(prepareCache(data, cache), { name: 'CacheError', kind: 'bad-index', message: /cmseg prepare --rebuild/ }, what);
    const result = await prepareCache(data, cache, { rebuild: true });
    t.same(result.prepared, [c.id], what);
    t.same(indexMismatches(cache), []);
  }
});

t.test('cmseg prepare --rebuild interrupted: it says to continue without --rebuild, which prepares only the rest', async (t) => {
  const dir = tempDir(t, 'cmseg-h5-cli-');
  await writeBratsPhantoms(path.join(dir, 'data'), { cases: 3, size: SIZE, seed: 13 });
  t.equal((await runCli(['prepare', '--data', 'data', '--out', 'cache', '-q'], dir)).exitCode, 0);
  const interrupt = (chunk: string) => {
    if (!chunk.startsWith('[1/3]')) return;
    const listener = process.listeners('SIGINT').at(-1) as (signal: string) => void; // prepare's own handler
    listener('SIGINT');
  };
  const stopped = await runCli(['prepare', '--data', 'data', '--out', 'cache', '--seed', '4', '--rebuild'], dir, interrupt);
  t.equal(stopped.exitCode, 130, stopped.stderr);
  t.match(stopped.stdout, /^interrupted after 1 of 3 cases: the cache is valid and holds them; run the same command without --rebuild to prepare the rest \(with --rebuild it starts over\)\n/);
  // What it says: the command without --rebuild prepares the two cases left, with the new seed.
  const rest = await runCli(['prepare', '--data', 'data', '--out', 'cache', '--seed', '4'], dir);
  t.equal(rest.exitCode, 0, rest.stderr);
  t.match(rest.stdout, /^prepared 2 case\(s\), 1 up to date; the cache holds 3 cases/);
  t.equal(readCacheIndex(path.join(dir, 'cache')).settings.seed, 4);
});

t.test('cmseg prepare --data given a cache or a file: says which, not "no BraTS cases" or "not found"', async (t) => {
  const dir = tempDir(t, 'cmseg-h5-cli-');
  const [c] = await writeBratsPhantoms(path.join(dir, 'data'), { cases: 1, size: SIZE, seed: 14 });
  t.equal((await runCli(['prepare', '--data', 'data', '--out', 'cache', '-q'], dir)).exitCode, 0);
  const cache = await runCli(['prepare', '--data', 'cache', '--out', 'cache2', '-q'], dir);
  t.equal(cache.exitCode, 1);
  t.match(cache.stderr, /--data .*cache is a cmseg cache \(it has index\.json\), already prepared: train, eval and predict read it as --data/);
  t.notOk(fs.existsSync(path.join(dir, 'cache2')), 'no cache folder made');
  const file = await runCli(['prepare', '--data', c.images[0], '--out', 'cache3', '-q'], dir);
  t.equal(file.exitCode, 1);
  t.match(file.stderr, /--data .*_t1\.nii\.gz is a file: give the folder that holds the BraTS case folders/);
});

t.test("a run's validation or test case file cut short: named when the run's data is loaded, before any step", async (t) => {
  const data = tempDir(t, 'cmseg-h5-data-');
  const cache = tempDir(t, 'cmseg-h5-cache-');
  await writeBratsPhantoms(data, { cases: 4, size: SIZE, seed: 6 });
  await prepareCache(data, cache);
  const index = readCacheIndex(cache);
  const splits = bratsCaseSplits(index.cases.map((c) => c.id), 0);
  const spec: BratsDatasetSpec = {
    kind: 'brats', cache, labels: 'dense', patch: 16, overlap: 0.5, stepsPerEpoch: 2, validationCases: 1,
    dataSeed: 0, augment: false, foregroundFraction: 1 / 3, splits,
  };
  t.doesNotThrow(() => loadExperimentData(spec, 0), 'an intact cache loads');
  const entry = index.cases.find((c) => c.id === splits.test[0])!;
  fs.truncateSync(path.join(cache, entry.file), entry.bytes - 8);
  t.throws(() => loadExperimentData(spec, 0), new RegExp(`case file .*${entry.id}\\.bin of case ${entry.id} has ${entry.bytes - 8} bytes, but cmseg prepare wrote ${entry.bytes}`));
});

t.test('case ids that differ only in upper and lower case are refused (one cache file on macOS or Windows)', async (t) => {
  const data = tempDir(t, 'cmseg-h5-data-');
  await writeBratsPhantoms(data, { cases: 2, size: SIZE, seed: 7 });
  const id = 'BraTS2021_00000';
  const twin = 'brats2021_00000';
  fs.mkdirSync(path.join(data, twin));
  for (const file of fs.readdirSync(path.join(data, id))) fs.copyFileSync(path.join(data, id, file), path.join(data, twin, file.replace(id, twin)));
  t.throws(() => discoverBratsCases(data), {
    kind: 'duplicate-case',
    message: new RegExp(`\\(case ${id}\\) and .*${twin} \\(case ${twin}\\) differ only in upper and lower case, and would share one cache file on a case-insensitive disk; rename one`),
  });
});
