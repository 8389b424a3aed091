// BraTS folders: the phantom writer, discovery of both release namings, label mapping,
// preprocessing (z-score, crop / uncrop) and the errors for broken cases.

import t from 'tap';
import * as fs from 'fs';
import * as path from 'path';
import * as zlib from 'zlib';
import {
  BRATS_CLASSES,
  BratsError,
  type BratsCase,
  boundingBox,
  brainMask,
  croppedAffine,
  discoverBratsCases,
  extentOfDims,
  gridDistance,
  loadBratsCase,
  mapBratsLabels,
  preprocessBratsCase,
  uncropVolume,
} from '../src/data/brats';
import { bratsPhantomId, generateBratsPhantom, writeBratsPhantoms } from '../src/data/brats-phantom';
import { readNifti, writeNifti, type Matrix4 } from '../src/data/nifti';
import { firstDifference, tempDir } from './helpers/files';

const SIZE: [number, number, number] = [48, 48, 32];

/** Copies a case folder so a test can break it without touching the shared fixture. */
function copyCase(c: BratsCase, root: string): BratsCase {
  const dir = path.join(root, c.id);
  fs.cpSync(c.dir, dir, { recursive: true });
  const moved = (p: string) => path.join(dir, path.basename(p));
  return { ...c, dir, images: c.images.map(moved) as BratsCase['images'], ...(c.seg ? { seg: moved(c.seg) } : {}) };
}

/** Face neighbours (6-connectivity) of voxel i in an x-fastest volume. */
function forNeighbours(i: number, dims: number[], visit: (j: number) => void): void {
  const [nx, ny, nz] = dims;
  const x = i % nx;
  const y = Math.floor(i / nx) % ny;
  const z = Math.floor(i / (nx * ny));
  if (x > 0) visit(i - 1);
  if (x < nx - 1) visit(i + 1);
  if (y > 0) visit(i - nx);
  if (y < ny - 1) visit(i + nx);
  if (z > 0) visit(i - nx * ny);
  if (z < nz - 1) visit(i + nx * ny);
}

t.test('phantoms: BraTS layout, readable NIfTI, labels 0/1/2/4 nested like a glioma', async (t) => {
  const root = tempDir(t);
  const cases = await writeBratsPhantoms(root, { cases: 3, size: SIZE, seed: 1 });
  t.same(cases.map((c) => c.id), [0, 1, 2].map((i) => bratsPhantomId(i, '2021')));
  const seen = new Set<number>();
  let necrosisFaces = 0, necrosisFacesOnEnhancing = 0, coreFaces = 0, coreFacesOnEdema = 0, enhancingNextToNecrosis = 0;
  for (const c of cases) {
    t.ok(fs.existsSync(path.join(root, c.id, `${c.id}_flair.nii.gz`)), `${c.id}: ID/ID_flair.nii.gz written`);
    const volumes = await Promise.all([...c.images, c.seg as string].map((p) => readNifti(p)));
    for (const v of volumes) {
      t.same(v.dims, SIZE, `${path.basename(v.path)} dims`);
      t.same(v.spacing, [1, 1, 1]);
      t.same(v.affine, volumes[0].affine, 'one grid for all files');
    }
    t.equal(volumes[0].header.datatype, 'int16', 'modalities stored as int16');
    t.equal(volumes[4].header.datatype, 'uint8', 'seg stored as uint8');
    t.same(volumes[0].affine[0].slice(0, 3), [-1, 0, 0], 'LPS-style x flip');
    t.same(volumes[0].affine[1].slice(0, 3), [0, -1, 0], 'LPS-style y flip');

    const seg = volumes[4].raw as Uint8Array;
    const labels = new Set(seg);
    for (const l of labels) seen.add(l);
    t.ok([...labels].every((l) => [0, 1, 2, 4].includes(l)), `${c.id}: labels ${[...labels]} within {0, 1, 2, 4}`);
    // Tumour only inside the brain, and the brain (non-zero) in every modality alike.
    const t1 = volumes[0].data;
    let tumourOutside = 0;
    for (let i = 0; i < seg.length; i++) if (seg[i] && t1[i] === 0) tumourOutside++;
    t.equal(tumourOutside, 0, 'no tumour label outside the brain');

    for (let i = 0; i < seg.length; i++) {
      const l = seg[i];
      if (l === 1) {
        forNeighbours(i, SIZE, (j) => {
          if (seg[j] !== 1) {
            necrosisFaces++;
            if (seg[j] === 4) necrosisFacesOnEnhancing++;
          }
        });
      }
      if (l === 4) forNeighbours(i, SIZE, (j) => (enhancingNextToNecrosis += seg[j] === 1 ? 1 : 0));
      if (l === 1 || l === 4) {
        forNeighbours(i, SIZE, (j) => {
          if (seg[j] !== 1 && seg[j] !== 4) {
            coreFaces++;
            if (seg[j] === 2) coreFacesOnEdema++;
          }
        });
      }
    }
    // Contrasts: enhancing tumour is the brightest tissue on T1ce, edema bright on FLAIR.
    const mean = (data: Float32Array, label: number) => {
      let s = 0, n = 0;
      for (let i = 0; i < seg.length; i++) if (seg[i] === label) { s += data[i]; n++; }
      return n ? s / n : NaN;
    };
    const brainMean = (data: Float32Array) => {
      let s = 0, n = 0;
      for (let i = 0; i < seg.length; i++) if (seg[i] === 0 && data[i] > 0) { s += data[i]; n++; }
      return s / n;
    };
    if (labels.has(4)) t.ok(mean(volumes[1].data, 4) > 1.3 * brainMean(volumes[1].data), 'T1ce: enhancing rim bright');
    t.ok(mean(volumes[3].data, 2) > 1.3 * brainMean(volumes[3].data), 'FLAIR: edema bright');
    t.ok(mean(volumes[0].data, 2) < brainMean(volumes[0].data), 'T1: tumour hypointense');
  }
  t.same([...seen].sort(), [0, 1, 2, 4], 'the cases use every BraTS label');
  t.ok(necrosisFacesOnEnhancing / necrosisFaces >= 0.85, `necrosis surrounded by enhancing tumour (${necrosisFacesOnEnhancing}/${necrosisFaces} faces)`);
  t.ok(enhancingNextToNecrosis > 0, 'enhancing tumour touches necrosis');
  t.ok(coreFacesOnEdema / coreFaces >= 0.85, `tumour core surrounded by edema (${coreFacesOnEdema}/${coreFaces} faces)`);
});

t.test('phantoms are deterministic per seed and vary between cases', async (t) => {
  const a = generateBratsPhantom(2, { size: [32, 32, 24], seed: 9 });
  const b = generateBratsPhantom(2, { size: [32, 32, 24], seed: 9 });
  const c = generateBratsPhantom(3, { size: [32, 32, 24], seed: 9 });
  const d = generateBratsPhantom(2, { size: [32, 32, 24], seed: 10 });
  t.equal(firstDifference(a.seg, b.seg), -1);
  t.equal(firstDifference(a.images[3], b.images[3]), -1);
  t.not(firstDifference(a.seg, c.seg), -1, 'another case, another tumour');
  t.not(firstDifference(a.seg, d.seg), -1, 'another seed, another tumour');
  t.throws(() => generateBratsPhantom(0, { size: [4, 32, 32] }), /size/);
});

t.test('discovery: 2018-2021 and 2023 names, .nii and .nii.gz, sorted, channel order fixed', async (t) => {
  const root = tempDir(t);
  await writeBratsPhantoms(root, { cases: 2, size: [24, 24, 16], seed: 2 });
  await writeBratsPhantoms(path.join(root, 'tmp2023'), { cases: 1, size: [24, 24, 16], seed: 2, naming: '2023', uncompressed: true });
  fs.renameSync(path.join(root, 'tmp2023', bratsPhantomId(0, '2023')), path.join(root, bratsPhantomId(0, '2023')));
  fs.rmSync(path.join(root, 'tmp2023'), { recursive: true });
  fs.mkdirSync(path.join(root, 'notes')); // a folder without NIfTI files is ignored
  fs.writeFileSync(path.join(root, 'notes', 'README.txt'), 'not a case');
  const cases = discoverBratsCases(root);
  t.same(cases.map((c) => c.id), ['BraTS-GLI-00000-000', 'BraTS2021_00000', 'BraTS2021_00001']);
  const [recent, old] = cases;
  t.equal(recent.naming, '2023');
  t.same(recent.images.map((p) => path.basename(p)), ['t1n', 't1c', 't2w', 't2f'].map((m) => `BraTS-GLI-00000-000-${m}.nii`));
  t.equal(path.basename(recent.seg as string), 'BraTS-GLI-00000-000-seg.nii');
  t.equal(old.naming, '2021');
  t.same(old.images.map((p) => path.basename(p)), ['t1', 't1ce', 't2', 'flair'].map((m) => `BraTS2021_00000_${m}.nii.gz`));

  // Label mapping: 2021 files store ET as 4, 2023 files as 3; both load as 3.
  const oldVolume = await loadBratsCase(old);
  const oldRaw = (await readNifti(old.seg as string)).raw as Uint8Array;
  const count = (a: ArrayLike<number>, v: number) => Array.prototype.filter.call(a, (x: number) => x === v).length;
  t.ok(count(oldRaw, 4) > 0, 'the 2021 file has label 4');
  t.equal(count(oldVolume.seg as Uint8Array, 3), count(oldRaw, 4), 'label 4 -> 3');
  t.equal(count(oldVolume.seg as Uint8Array, 4), 0);
  t.ok(Math.max(...(oldVolume.seg as Uint8Array)) < BRATS_CLASSES);
  const recentVolume = await loadBratsCase(recent);
  const recentRaw = (await readNifti(recent.seg as string)).raw as Uint8Array;
  t.equal(count(recentRaw, 4), 0, 'the 2023 file has no label 4');
  t.equal(firstDifference(recentVolume.seg as Uint8Array, recentRaw), -1, '2023 labels pass through unchanged');
  // The images are the NIfTI arrays back to back: channel c at offset c * voxels.
  const flair = (await readNifti(old.images[3])).data;
  t.equal(firstDifference(oldVolume.images.subarray(3 * flair.length), flair), -1, 'flair is channel 3, same memory order');

  const err = t.throws(() => mapBratsLabels([0, 1, 5], 'X', '/data/X/X_seg.nii.gz')) as BratsError;
  t.match(err.message, /label 5 at voxel 2 of \/data\/X\/X_seg.nii.gz/);

  t.throws(() => discoverBratsCases(path.join(root, 'nope')), { name: 'BratsError', kind: 'missing-folder' });
  const empty = path.join(root, 'empty');
  fs.mkdirSync(empty);
  t.throws(() => discoverBratsCases(empty), { kind: 'no-cases', message: /ID_t1.nii.gz/ });
});

t.test('preprocessing: z-score inside the brain, crop and uncrop restore the original grid', async (t) => {
  const root = tempDir(t);
  const [c] = await writeBratsPhantoms(root, { cases: 1, size: SIZE, seed: 4 });
  const volume = await loadBratsCase(c);
  const pre = preprocessBratsCase(volume, { margin: 2 });
  const full = extentOfDims(volume.dims);
  t.same(full, { d: SIZE[2], h: SIZE[1], w: SIZE[0] }, 'D = z, H = y, W = x');
  t.same(pre.shape, [4, pre.crop.d, pre.crop.h, pre.crop.w]);
  t.ok(pre.crop.d < full.d || pre.crop.h < full.h || pre.crop.w < full.w, 'the crop removes background');
  t.same(pre.original.dims, volume.dims);
  t.same(pre.original.affine, volume.affine);

  const voxels = pre.crop.d * pre.crop.h * pre.crop.w;
  let inside = 0;
  for (let i = 0; i < voxels; i++) inside += pre.brainMask[i];
  for (let ch = 0; ch < 4; ch++) {
    let sum = 0, squares = 0, outside = 0;
    for (let i = 0; i < voxels; i++) {
      const v = pre.images[ch * voxels + i];
      if (pre.brainMask[i]) {
        sum += v;
        squares += v * v;
      } else if (v !== 0) outside++;
    }
    const mean = sum / inside;
    const std = Math.sqrt(squares / inside - mean * mean);
    t.ok(Math.abs(mean) < 1e-4, `channel ${ch}: mean ${mean} ~ 0 in the brain`);
    t.ok(Math.abs(std - 1) < 1e-3, `channel ${ch}: std ${std} ~ 1 in the brain`);
    t.equal(outside, 0, `channel ${ch}: 0 outside the brain`);
    t.ok(pre.stats[ch].std > 0 && pre.stats[ch].mean > 0, 'statistics of the raw intensities kept');
  }

  // Margin: the box is the brain's bounding box grown by 2 voxels (clamped).
  const tight = boundingBox(brainMask(volume.images, 4), full) as NonNullable<ReturnType<typeof boundingBox>>;
  t.equal(pre.crop.z0, Math.max(0, tight.z0 - 2));
  t.equal(pre.crop.d, Math.min(full.d, tight.z0 + tight.d + 2) - pre.crop.z0);

  // Uncrop: labels and brain mask come back exactly, on the original grid.
  t.equal(firstDifference(uncropVolume(pre.seg as Uint8Array, pre.crop, full), volume.seg as Uint8Array), -1, 'seg restored exactly');
  t.equal(firstDifference(uncropVolume(pre.brainMask, pre.crop, full), brainMask(volume.images, 4)), -1, 'brain mask restored exactly');
  const images = uncropVolume(pre.images, pre.crop, full, 4);
  t.equal(images.length, volume.images.length);
  let mismatch = 0;
  for (let i = 0; i < images.length; i++) if ((images[i] !== 0) !== (volume.images[i] !== 0)) mismatch++;
  t.equal(mismatch, 0, 'non-zero exactly where the original is');

  // A prediction written back with the original geometry matches the source file's grid.
  const predictionPath = path.join(root, 'prediction.nii.gz');
  await writeNifti(predictionPath, { dims: pre.original.dims, data: uncropVolume(pre.seg as Uint8Array, pre.crop, full), affine: pre.original.affine }, { datatype: 'uint8' });
  const back = await readNifti(predictionPath);
  const source = await readNifti(c.images[0]);
  t.same(back.dims, source.dims);
  t.same(back.affine, source.affine);

  // The cropped grid's affine puts crop voxel (0, 0, 0) where original voxel (x0, y0, z0) is.
  const a = croppedAffine(volume.affine, pre.crop);
  const world = (m: Matrix4, v: number[]) => [0, 1, 2].map((r) => m[r][0] * v[0] + m[r][1] * v[1] + m[r][2] * v[2] + m[r][3]);
  t.same(world(a, [0, 0, 0]), world(volume.affine, [pre.crop.x0, pre.crop.y0, pre.crop.z0]));
});

t.test('broken cases: missing files, mismatched grids, missing segmentation', async (t) => {
  const fixture = tempDir(t);
  const [c] = await writeBratsPhantoms(fixture, { cases: 1, size: [24, 24, 16], seed: 5 });

  await t.test('missing modality names the case and file', async (t) => {
    const root = tempDir(t);
    const broken = copyCase(c, root);
    fs.rmSync(broken.images[3]);
    const err = t.throws(() => discoverBratsCases(root)) as BratsError;
    t.equal(err.kind, 'missing-file');
    t.equal(err.caseId, c.id);
    t.match(err.message, new RegExp(`case ${c.id}: missing flair modality: .*${c.id}_flair.nii.gz`));
  });

  await t.test('missing segmentation: an error unless requireSeg is false', async (t) => {
    const root = tempDir(t);
    const broken = copyCase(c, root);
    fs.rmSync(broken.seg as string);
    t.throws(() => discoverBratsCases(root), { kind: 'missing-file', message: /missing segmentation/ });
    const [found] = discoverBratsCases(root, { requireSeg: false });
    t.equal(found.seg, undefined);
    t.equal((await loadBratsCase(found)).seg, undefined);
  });

  await t.test('modalities on different grids', async (t) => {
    const root = tempDir(t);
    const broken = copyCase(c, root);
    const t2 = await readNifti(broken.images[2]);
    await writeNifti(broken.images[2], { dims: [24, 24, 15], data: t2.data.subarray(0, 24 * 24 * 15), affine: t2.affine }, { datatype: 'int16' });
    const err = (await loadBratsCase(broken).then(() => undefined, (e: unknown) => e)) as BratsError;
    t.equal(err?.kind, 'mismatched-dims');
    t.equal(err.path, broken.images[2], 'the error names the odd file');
    t.match(err.message, /case BraTS2021_00000: .*_t2.nii.gz has dims \[24, 24, 15\]/);

    const root2 = tempDir(t);
    const shifted = copyCase(c, root2);
    const t1ce = await readNifti(shifted.images[1]);
    const affine = t1ce.affine.map((row) => [...row]) as Matrix4;
    affine[0][3] += 2;
    await writeNifti(shifted.images[1], { dims: t1ce.dims, data: t1ce.data, affine }, { datatype: 'int16' });
    await t.rejects(loadBratsCase(shifted), { kind: 'mismatched-affine', path: shifted.images[1], message: /not on one grid/ });
  });

  await t.test('mixed namings in one folder', async (t) => {
    const root = tempDir(t);
    const broken = copyCase(c, root);
    fs.copyFileSync(broken.images[0], path.join(broken.dir, `${c.id}-t1n.nii.gz`));
    t.throws(() => discoverBratsCases(root), { name: 'BratsError', kind: 'ambiguous-naming' });
  });

  await t.test('two files for one modality (.nii.gz and .nii, or names differing in case)', async (t) => {
    const root = tempDir(t);
    const broken = copyCase(c, root);
    const plain = path.join(broken.dir, `${c.id}_t1.nii`);
    fs.writeFileSync(plain, zlib.gunzipSync(fs.readFileSync(broken.images[0])));
    t.throws(() => discoverBratsCases(root), {
      name: 'BratsError',
      kind: 'ambiguous-file',
      message: new RegExp(`holds both ${c.id}_t1\\.nii(\\.gz)? and ${c.id}_t1\\.nii(\\.gz)?: keep one`),
    });
    fs.rmSync(plain);
    t.equal(discoverBratsCases(root).length, 1, 'one file each: the case is found');
    fs.copyFileSync(broken.seg!, path.join(broken.dir, `${c.id}_SEG.nii.gz`));
    t.throws(() => discoverBratsCases(root), { name: 'BratsError', kind: 'ambiguous-file' });
  });

  await t.test('an all-zero case cannot be normalised', async (t) => {
    const volume = await loadBratsCase(c);
    volume.images.fill(0);
    volume.seg = undefined;
    t.throws(() => preprocessBratsCase(volume), { name: 'BratsError', kind: 'empty-brain' });
  });
});

t.test('discovery skips what is not a case, reads the HGG/LGG layout, and hints at other layouts', async (t) => {
  const fixture = tempDir(t);
  const [a, b] = await writeBratsPhantoms(fixture, { cases: 2, size: [24, 24, 16], seed: 6 });

  await t.test('stray NIfTI files and a predictions folder are skipped with one note', async (t) => {
    const root = tempDir(t);
    copyCase(a, root);
    copyCase(b, root);
    fs.copyFileSync(a.images[0], path.join(root, 'stray.nii.gz'));
    fs.mkdirSync(path.join(root, 'predictions'));
    fs.copyFileSync(a.seg as string, path.join(root, 'predictions', `${a.id}_consensus.nii.gz`));
    const notes: string[] = [];
    const cases = discoverBratsCases(root, { onSkipped: (note) => notes.push(note) });
    t.same(cases.map((c) => c.id), [a.id, b.id]);
    t.equal(notes.length, 1, 'one note');
    t.match(notes[0], /^skipped 2 entries of .* that are not a BraTS case: predictions\/, stray\.nii\.gz$/);
    t.same(discoverBratsCases(root).length, 2, 'no callback: skipped quietly');
    // Nothing but non-cases: an error that says what was found.
    const only = tempDir(t);
    fs.mkdirSync(path.join(only, 'predictions'));
    fs.copyFileSync(a.seg as string, path.join(only, 'predictions', `${a.id}_consensus.nii.gz`));
    t.throws(() => discoverBratsCases(only), { kind: 'no-cases', message: /found only predictions\/$/ });
  });

  await t.test('BraTS 2018/2019: cases grouped in HGG/ and LGG/', async (t) => {
    const root = tempDir(t);
    copyCase(a, path.join(root, 'HGG'));
    copyCase(b, path.join(root, 'LGG'));
    fs.writeFileSync(path.join(root, 'name_mapping.csv'), 'id\n');
    const cases = discoverBratsCases(root);
    t.same(cases.map((c) => [c.id, path.basename(path.dirname(c.dir))]), [[a.id, 'HGG'], [b.id, 'LGG']]);
    t.equal((await loadBratsCase(cases[1])).id, b.id);
    // The same id in both groups cannot be told apart.
    copyCase(a, path.join(root, 'LGG'));
    t.throws(() => discoverBratsCases(root), { kind: 'duplicate-case', message: new RegExp(`are both case ${a.id}`) });
  });

  await t.test('a case folder whose files are named for another id is an error that says so', async (t) => {
    const root = tempDir(t);
    copyCase(a, root);
    fs.renameSync(path.join(root, a.id), path.join(root, 'case1'));
    copyCase(b, root);
    t.throws(() => discoverBratsCases(root), { kind: 'misnamed-case', message: new RegExp(`case1 holds the files of case ${a.id} .*rename it ${a.id}`) });
  });

  await t.test('no cases: hints for a single case folder and for a flat folder', async (t) => {
    const root = tempDir(t);
    const single = copyCase(a, root);
    t.throws(() => discoverBratsCases(single.dir), { kind: 'no-cases', message: new RegExp(`is the folder of the single case ${a.id}: pass the folder that holds the case folders`) });
    const flat = path.join(root, 'flat');
    fs.mkdirSync(flat);
    for (const file of [...bratsCaseFilesOf(a), ...bratsCaseFilesOf(b)]) fs.copyFileSync(file, path.join(flat, path.basename(file)));
    t.throws(() => discoverBratsCases(flat), { kind: 'no-cases', message: new RegExp(`holds the files of 2 cases side by side \\(${a.id}, ${b.id}, \\.\\.\\.\\): put each case's files in a folder named by its id`) });
  });
});

function bratsCaseFilesOf(c: BratsCase): string[] {
  return [...c.images, c.seg as string];
}

t.test('grids: a tolerance in mm, files without orientation, and a bad segmentation left out on request', async (t) => {
  const fixture = tempDir(t);
  const [c] = await writeBratsPhantoms(fixture, { cases: 1, size: [24, 24, 16], seed: 7 });
  /** A copy of the case whose file `index` (4 = seg) has its affine changed by `change`. */
  const withAffine = async (index: number, change: (affine: Matrix4) => void, qformCode?: number) => {
    const copy = copyCase(c, tempDir(t));
    const file = index === 4 ? (copy.seg as string) : copy.images[index];
    const volume = await readNifti(file);
    const affine = volume.affine.map((row) => [...row]) as Matrix4;
    change(affine);
    const header = qformCode === undefined ? undefined : { ...volume.header, qformCode, sformCode: qformCode };
    await writeNifti(file, { dims: volume.dims, data: volume.raw, affine, ...(header ? { header } : {}) }, { datatype: index === 4 ? 'uint8' : 'int16' });
    return copy;
  };

  // 0.01 mm: rounding in some tool, not another grid.
  const nudged = await withAffine(4, (m) => (m[0][3] += 0.01));
  t.ok((await loadBratsCase(nudged)).seg, 'a seg 0.01 mm off loads with its labels');
  // 0.5 mm is over the default: the message says by how much and how to allow it.
  const shifted = await withAffine(2, (m) => (m[1][3] += 0.5));
  const err = (await loadBratsCase(shifted).then(() => undefined, (e: unknown) => e)) as BratsError;
  t.equal(err?.kind, 'mismatched-affine');
  t.equal(err.path, shifted.images[2]);
  t.match(err.message, /_t2\.nii\.gz has affine\[1\]\[3\] = .* but .*_t1\.nii\.gz has .*: they put a voxel up to 0\.50 mm apart, more than the tolerance of 0\.1 mm, so the files are not on one grid \(if they are meant to be, allow it with --geometry-tolerance <mm>/);
  t.ok(await loadBratsCase(shifted, { geometryTolerance: 1 }), 'a larger tolerance accepts it');
  // Spacing differences count where they add up: at the far corner of the grid.
  t.match(gridDistanceOf([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], [[1.01, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], [24, 24, 16]), 0.23);

  // A seg with neither qform nor sform has no world position: same dims mean the same grid.
  const bare = await withAffine(4, () => undefined, 0);
  t.equal((await readNifti(bare.seg as string)).header.sformCode, 0, 'the seg really has no orientation');
  t.ok((await loadBratsCase(bare)).seg, 'a seg without orientation loads');

  // Prediction: a bad seg is handed over and left out; the images still load.
  const bad = await withAffine(4, (m) => (m[0][3] += 3));
  const problems: Error[] = [];
  const volume = await loadBratsCase(bad, { onBadSeg: (e) => problems.push(e) });
  t.equal(volume.seg, undefined);
  t.equal(volume.images.length, 4 * 24 * 24 * 16);
  t.match(problems.map((e) => (e as BratsError).kind), ['mismatched-affine']);
  await t.rejects(loadBratsCase(bad), { kind: 'mismatched-affine' }, 'without onBadSeg it is an error');
  const unreadable = copyCase(c, tempDir(t));
  fs.writeFileSync(unreadable.seg as string, 'not a NIfTI file');
  const reasons: string[] = [];
  t.equal((await loadBratsCase(unreadable, { onBadSeg: (e) => reasons.push(e.message) })).seg, undefined);
  t.match(reasons, [/_seg\.nii\.gz/]);
});

function gridDistanceOf(a: number[][], b: number[][], dims: number[]): number {
  return Math.round(gridDistance(a as Matrix4, b as Matrix4, dims) * 100) / 100;
}
