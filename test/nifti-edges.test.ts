// NIfTI edge cases found by adversarial testing: upper-case .HDR/.IMG pairs, big-endian
// NIfTI-2, zero, negative or non-finite voxel sizes, a .nii over 2 GiB, bzip2/zstd files;
// and 3D predict's written labels for a model of other than 4 classes and its --scale check.
// nibabel is the oracle where it has an opinion; the hand-built files need no Python.

import t, { type Test } from 'tap';
import * as fs from 'fs';
import * as path from 'path';
import * as zlib from 'zlib';
// The module object itself (not a namespace copy), so that a test can stand in for one of its functions.
import zlibModule from 'zlib';
import { type Matrix4, NiftiError, encodeNifti, readNifti, readNiftiSync } from '../src/data/nifti';
import { createModel, setNumThreads } from '../src/model/model';
import { saveCheckpoint } from '../src/model/checkpoint';
import { runCli } from './helpers/cli';
import { tempDir } from './helpers/files';
import { missingPythonModules, runPythonJson } from './helpers/python';

const nibabelSkip = missingPythonModules('numpy', 'nibabel');

/** 5 x 4 x 3 distinct values, so that a misplaced read cannot pass. */
const VALUES = Float32Array.from({ length: 60 }, (_, i) => i * 0.5 - 7);

/** A .hdr/.img pair (magic ni1, vox_offset 0) holding VALUES, built from a single-file encoding. */
function pairBytes(): { header: Buffer; image: Buffer } {
  const single = encodeNifti({ dims: [5, 4, 3], data: VALUES, affine: [[2, 0, 0, 1], [0, 3, 0, 2], [0, 0, 4, 3], [0, 0, 0, 1]] });
  const header = Buffer.from(single.subarray(0, 352));
  header.write('ni1\0', 344, 'latin1');
  header.writeFloatLE(0, 108);
  return { header, image: Buffer.from(single.subarray(352)) };
}

async function thrown(f: () => unknown): Promise<unknown> {
  try {
    await f();
  } catch (err) {
    return err;
  }
  return undefined;
}

t.test('an upper-case .HDR/.IMG pair (as nibabel writes for X.HDR) is read, and its .IMG points at the .HDR', async (t) => {
  const dir = tempDir(t);
  const { header, image } = pairBytes();
  fs.writeFileSync(path.join(dir, 'A.HDR'), header);
  fs.writeFileSync(path.join(dir, 'A.IMG'), image);
  t.same(Array.from((await readNifti(path.join(dir, 'A.HDR'))).data), Array.from(VALUES), 'A.HDR reads its A.IMG');
  t.same(Array.from(readNiftiSync(path.join(dir, 'A.HDR')).data), Array.from(VALUES), 'sync too');
  fs.writeFileSync(path.join(dir, 'B.HDR.GZ'), zlib.gzipSync(header));
  fs.writeFileSync(path.join(dir, 'B.IMG.GZ'), zlib.gzipSync(image));
  t.same(Array.from((await readNifti(path.join(dir, 'B.HDR.GZ'))).data), Array.from(VALUES), 'B.HDR.GZ reads its B.IMG.GZ');

  const err = await thrown(() => readNifti(path.join(dir, 'A.IMG')));
  t.ok(err instanceof NiftiError && err.kind === 'bad-path', 'reading the .IMG is a bad-path error');
  t.match((err as Error).message, /read \S*A\.HDR instead/, 'names the header as it is spelt on disk');
  t.notMatch((err as Error).message, /A\.hdr/, 'not a lower-case A.hdr that does not exist');

  // A lonely upper-case header names the upper-case .IMG it looked for.
  fs.writeFileSync(path.join(dir, 'C.HDR'), header);
  const missing = await thrown(() => readNifti(path.join(dir, 'C.HDR')));
  t.ok(missing instanceof NiftiError && missing.kind === 'missing-file');
  t.match((missing as Error).message, /C\.IMG/);
});

t.test('nibabel reads the upper-case pair it writes as cmseg does', { skip: nibabelSkip }, async (t) => {
  const dir = tempDir(t);
  const seen = runPythonJson<{ files: string[]; values: number[] }>(
    String.raw`
import json, os, sys, numpy as np, nibabel as nib
d = sys.argv[1]
data = (np.arange(60, dtype=np.float32) * 0.5 - 7).reshape((5, 4, 3), order='F')
nib.save(nib.Nifti1Pair(data, np.diag([2, 3, 4, 1.0])), os.path.join(d, 'N.HDR'))
print(json.dumps(dict(files=sorted(os.listdir(d)), values=nib.load(os.path.join(d, 'N.HDR')).get_fdata().ravel(order='F').tolist())))
`,
    [dir],
  );
  t.same(seen.files, ['N.HDR', 'N.IMG'], 'nibabel names the voxel file N.IMG');
  t.same(Array.from(readNiftiSync(path.join(dir, 'N.HDR')).data), seen.values, 'cmseg reads what nibabel reads');
});

t.test('a big-endian NIfTI-2 file is named as NIfTI-2, as a little-endian one is', async (t) => {
  const dir = tempDir(t);
  const bytes = Buffer.alloc(560);
  bytes.writeInt32BE(540, 0);
  bytes.write('n+2\0', 4, 'latin1');
  const file = path.join(dir, 'big-n2.nii');
  fs.writeFileSync(file, bytes);
  const err = await thrown(() => readNifti(file));
  t.ok(err instanceof NiftiError && err.kind === 'bad-header', 'bad-header');
  t.match((err as Error).message, /NIfTI-2/, `says NIfTI-2: ${(err as Error).message}`);
  t.match((err as Error).message, /540/, 'and shows the 540 it read (byte-swapped), not 469893120 alone');
});

interface NibabelGeometry {
  zooms: number[];
  affine: number[][];
}

t.test('zero, negative and NaN voxel sizes: spacing and the no-orientation affine as nibabel has them', { skip: nibabelSkip }, async (t) => {
  const dir = tempDir(t);
  // pixdim[1..3] patched into files with neither qform nor sform (nibabel's Analyze-style
  // fallback affine) and into one with an sform (the affine is srow; only the spacing changes).
  const cases: Record<string, { pixdim: number[]; sform: boolean }> = {
    'zero.nii': { pixdim: [1.5, 0, 2], sform: false },
    'negative.nii': { pixdim: [-2, 1.25, 3], sform: false },
    'sform-zero.nii': { pixdim: [1.2, 0.9, 0], sform: true },
    'sform-negative.nii': { pixdim: [-1.2, 0.9, 2.5], sform: true },
  };
  for (const [name, { pixdim, sform }] of Object.entries(cases)) {
    const affine: Matrix4 = [[1.2, 0, 0, -9], [0, 0.9, 0, 4], [0, 0, 2.5, 7], [0, 0, 0, 1]];
    const file = encodeNifti({ dims: [5, 4, 3], data: VALUES, ...(sform ? { affine } : {}) });
    pixdim.forEach((v, i) => file.writeFloatLE(v, 76 + 4 * (i + 1)));
    if (sform) file.writeInt16LE(0, 252); // sform only: the qform would be rebuilt from the patched pixdim
    fs.writeFileSync(path.join(dir, name), file);
  }
  const seen = runPythonJson<Record<string, NibabelGeometry>>(
    String.raw`
import json, os, sys, warnings, nibabel as nib
warnings.simplefilter('ignore')
out = {}
for name in sys.argv[2:]:
    img = nib.load(os.path.join(sys.argv[1], name))
    out[name] = dict(zooms=[float(z) for z in img.header.get_zooms()[:3]], affine=img.affine.tolist())
print(json.dumps(out))
`,
    [dir, ...Object.keys(cases)],
  );
  for (const name of Object.keys(cases)) {
    const volume = readNiftiSync(path.join(dir, name));
    const close = (a: readonly number[], b: readonly number[]) => a.length === b.length && a.every((v, i) => Math.abs(v - b[i]) < 1e-6);
    t.ok(close(volume.spacing, seen[name].zooms), `${name}: spacing ${JSON.stringify(volume.spacing)}, nibabel's zooms ${JSON.stringify(seen[name].zooms)}`);
    t.ok(close(volume.affine.flat(), seen[name].affine.flat()), `${name}: affine ${JSON.stringify(volume.affine)}, nibabel ${JSON.stringify(seen[name].affine)}`);
  }

  // NaN is not a size: taken as 1 (nifti1_io's rule for a bad pixdim), never a NaN spacing or affine.
  const nan = encodeNifti({ dims: [5, 4, 3], data: VALUES });
  nan.writeFloatLE(NaN, 80);
  fs.writeFileSync(path.join(dir, 'nan.nii'), nan);
  const volume = readNiftiSync(path.join(dir, 'nan.nii'));
  t.same(volume.spacing, [1, 1, 1], 'NaN pixdim[1] reads as spacing 1');
  t.ok(volume.affine.flat().every(Number.isFinite), `finite affine: ${JSON.stringify(volume.affine)}`);
});

/** A folder with one 16^3 phantom case in brats/, for the predict tests below (one thread). */
async function phantomFolder(t: Test): Promise<string> {
  const dir = tempDir(t);
  setNumThreads(1);
  const phantom = await runCli(['phantom', 'brats', '--cases', '1', '--out', 'brats', '--size', '16,16,16', '--seed', '2', '--quiet'], dir);
  t.equal(phantom.exitCode, 0, phantom.stderr);
  return dir;
}

t.test('a 3D model of 5 classes: written labels are its class indices, not BraTS release labels that merge 3 and 4', async (t) => {
  const dir = await phantomFolder(t);
  // A tiny untrained model whose class-3 bias is raised by 2: class 3 wins at most voxels,
  // and the other classes, 4 included, where the random weights say so.
  const model = createModel({ ndim: 3, inChannels: 4, classes: 5, annotators: 2, depth: 2, baseChannels: 4, seed: 5 });
  const weights = model.getWeights();
  weights['seg.bias'] = Float32Array.from(weights['seg.bias'], (b, k) => (k === 3 ? b + 2 : b));
  model.setWeights(weights);
  await saveCheckpoint(model, path.join(dir, 'five.safetensors'));
  await model.dispose();

  const run = await runCli(['predict', '--checkpoint', 'five.safetensors', '--data', 'brats', '--patch', '16', '--out', 'pred', '--no-cms'], dir);
  t.equal(run.exitCode, 0, run.stderr);
  const id = fs.readdirSync(path.join(dir, 'brats'))[0];
  const consensus = readNiftiSync(path.join(dir, 'pred', `${id}_consensus.nii.gz`));
  const probs = readNiftiSync(path.join(dir, 'pred', `${id}_probs.nii.gz`));
  t.same(probs.dims, [16, 16, 16, 5], 'one probability plane per class');
  const V = 16 * 16 * 16;
  let mismatched = 0;
  const counts = [0, 0, 0, 0, 0, 0];
  for (let v = 0; v < V; v++) {
    let best = 0;
    for (let c = 1; c < 5; c++) if (probs.data[c * V + v] > probs.data[best * V + v]) best = c;
    const label = Number(consensus.raw[v]);
    counts[Math.min(label, 5)]++;
    if (label !== best) mismatched++;
  }
  t.ok(counts[3] > 0, `label 3 is written (counts ${JSON.stringify(counts)})`);
  t.equal(mismatched, 0, 'every voxel is labelled with the argmax of its written probabilities (the class index)');
  t.match(fs.readFileSync(path.join(dir, 'pred', 'README.txt'), 'utf8'), /class indices 0\.\.4/, 'the legend says the labels are class indices');
});

t.test('a .nii over 2 GiB is a NiftiError naming the file and the limit, not a bare RangeError', async (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, 'big.nii');
  // A valid header for 1024 x 1024 x 520 float32 (2 GiB + 352 bytes), the voxels a sparse hole:
  // Node refuses to read a file over 2 GiB whole, before allocating anything.
  const header = encodeNifti({ dims: [1, 1, 1], data: [0] }).subarray(0, 352);
  header.writeInt16LE(1024, 42);
  header.writeInt16LE(1024, 44);
  header.writeInt16LE(520, 46);
  fs.writeFileSync(file, header);
  fs.truncateSync(file, 352 + 1024 * 1024 * 520 * 4);
  for (const read of [() => readNifti(file), () => readNiftiSync(file)]) {
    const err = await thrown(read);
    t.ok(err instanceof NiftiError, `a NiftiError: ${String(err)}`);
    t.equal((err as NiftiError).kind, 'too-large');
    t.match((err as Error).message, /big\.nii/, 'names the file');
    t.match((err as Error).message, /2181038432 bytes/, 'gives its size');
    t.match((err as Error).message, /\.nii\.gz/, 'says what to do (gzip it: cmseg reads a .nii.gz of more)');
  }
});

t.test('3D predict refuses a --scale too large for its pictures before predicting or writing the case', async (t) => {
  const dir = await phantomFolder(t);
  const model = createModel({ ndim: 3, inChannels: 4, classes: 4, annotators: 2, depth: 2, baseChannels: 4, seed: 5 });
  await saveCheckpoint(model, path.join(dir, 'm.safetensors'));
  await model.dispose();
  const run = await runCli(['predict', '--checkpoint', 'm.safetensors', '--data', 'brats', '--patch', '16', '--out', 'pred', '--scale', '1000'], dir);
  t.equal(run.exitCode, 1);
  t.match(run.stderr, /--scale 1000 would make the \d+x\d+ pictures/);
  const written = fs.existsSync(path.join(dir, 'pred')) ? fs.readdirSync(path.join(dir, 'pred')) : [];
  t.same(written.filter((f) => f.endsWith('.nii.gz')), [], 'no NIfTI volume written for a run that fails');
});

t.test('a bzip2 or zstd NIfTI (nibabel reads .nii.bz2 and .nii.zst) is refused as such, not as a bad sizeof_hdr', async (t) => {
  const dir = tempDir(t);
  // The first bytes are what matters: bzip2 streams start "BZh" + a level digit, zstd frames 28 b5 2f fd.
  const starts: Record<string, Buffer> = {
    'x.nii.bz2': Buffer.concat([Buffer.from('BZh91AY&SY', 'latin1'), Buffer.alloc(400, 7)]),
    'x.nii.zst': Buffer.concat([Buffer.from([0x28, 0xb5, 0x2f, 0xfd]), Buffer.alloc(400, 7)]),
    // A small image compresses to less than a header's 348 bytes (nibabel's 5x4x3 zeros: 96).
    'small.nii.bz2': Buffer.concat([Buffer.from('BZh91AY&SY', 'latin1'), Buffer.alloc(86, 7)]),
  };
  for (const [name, bytes] of Object.entries(starts)) {
    const file = path.join(dir, name);
    fs.writeFileSync(file, bytes);
    const err = await thrown(() => readNifti(file));
    t.ok(err instanceof NiftiError, `${name}: a NiftiError`);
    t.match((err as Error).message, name.endsWith('bz2') ? /bzip2/ : /zstd/, `${name}: names the compression: ${(err as Error).message}`);
    t.match((err as Error).message, /gzip/, `${name}: says what cmseg reads`);
  }
});

t.test('a .nii.gz that decompresses past the largest Buffer is too-large, not corrupt', async (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, 'huge.nii.gz');
  fs.writeFileSync(file, zlib.gzipSync(encodeNifti({ dims: [5, 4, 3], data: VALUES })));
  // Producing the real condition takes over 4 GiB of output; zlib's own error for it
  // (ERR_BUFFER_TOO_LARGE, as gunzipSync with a small maxOutputLength throws) stands in.
  const real = zlib.gunzipSync;
  let nodeError: unknown;
  try {
    real(fs.readFileSync(file), { maxOutputLength: 100 });
  } catch (err) {
    nodeError = err;
  }
  t.equal((nodeError as NodeJS.ErrnoException).code, 'ERR_BUFFER_TOO_LARGE', "zlib's error for output past its limit");
  (zlibModule as { gunzipSync: unknown }).gunzipSync = () => {
    throw nodeError;
  };
  t.teardown(() => {
    (zlibModule as { gunzipSync: unknown }).gunzipSync = real;
  });
  const err = await thrown(() => readNiftiSync(file));
  t.ok(err instanceof NiftiError, 'a NiftiError');
  t.equal((err as NiftiError).kind, 'too-large', `too-large, not corrupt-gzip: ${(err as Error).message}`);
  t.notMatch((err as Error).message, /corrupt/);
  t.match((err as Error).message, /huge\.nii\.gz/);
});

t.test('a .nii.gz is inflated only as far as its header reaches: a bomb is refused, a few trailing bytes are not', async (t) => {
  const dir = tempDir(t);
  const single = encodeNifti({ dims: [5, 4, 3], data: VALUES }); // 352 + 60 x 4 = 592 bytes
  t.equal(single.length, 592);
  // 64 MiB of zeros after the voxels compress to ~64 KiB: a small file that inflates far past its header.
  const bomb = path.join(dir, 'bomb.nii.gz');
  fs.writeFileSync(bomb, zlib.gzipSync(Buffer.concat([single, Buffer.alloc(64 << 20)])));
  t.ok(fs.statSync(bomb).size < 1 << 20, 'the file itself is small');
  for (const read of [() => readNifti(bomb), () => readNiftiSync(bomb)]) {
    const err = await thrown(read);
    t.ok(err instanceof NiftiError, `a NiftiError: ${String(err)}`);
    t.equal((err as NiftiError).kind, 'too-large');
    t.match((err as Error).message, /bomb\.nii\.gz/);
    t.match((err as Error).message, /decompresses to more than 1049168 bytes, more than its header describes \(592 bytes of header and voxels\)/);
  }
  // Bytes some writers leave after the voxels (well inside the 1 MiB allowance) still read.
  const padded = path.join(dir, 'padded.nii.gz');
  fs.writeFileSync(padded, zlib.gzipSync(Buffer.concat([single, Buffer.alloc(4096, 9)])));
  for (const read of [() => readNifti(padded), async () => readNiftiSync(padded)]) t.same(Array.from((await read()).data), Array.from(VALUES));
  // A header describing more than a Buffer holds is refused before anything is inflated.
  const huge = Buffer.from(single);
  for (const at of [42, 44, 46]) huge.writeInt16LE(2048, at); // dim[1..3]: 2048^3 float32 = 32 GiB
  const hugeFile = path.join(dir, 'huge-header.nii.gz');
  fs.writeFileSync(hugeFile, zlib.gzipSync(huge));
  const err = await thrown(() => readNifti(hugeFile));
  t.equal((err as NiftiError).kind, 'too-large', String(err));
  t.match((err as Error).message, /its header describes 34359738720 bytes of header and voxels, more than the \d+ bytes cmseg can hold/);
});

t.test('writeNifti scaling: scl_slope and scl_inter as given, applied by readNifti; slope 0 or non-finite refused', async (t) => {
  const encode = encodeNifti;
  const read = readNiftiSync;
  const dir = tempDir(t, 'cmseg-scaling-');
  const file = path.join(dir, 's.nii');
  fs.writeFileSync(file, encode({ dims: [3], data: [0, 2, 255] }, { datatype: 'uint8', scaling: { slope: 0.5, inter: -1 } }));
  const bytes = fs.readFileSync(file);
  t.same([bytes.readFloatLE(112), bytes.readFloatLE(116)], [0.5, -1], 'the header holds them');
  const v = read(file);
  t.same(Array.from(v.raw), [0, 2, 255], 'stored as given');
  t.same(Array.from(v.data), [-1, 0, 126.5], 'read as stored * 0.5 - 1');
  for (const scaling of [{ slope: 0 }, { slope: NaN }, { slope: 1, inter: Infinity }]) {
    t.throws(() => encode({ dims: [1], data: [1] }, { datatype: 'uint8', scaling }), { name: 'NiftiError', message: /scaling slope .*: both must be finite numbers, the slope not 0/ });
  }
});
