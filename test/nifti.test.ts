// NIfTI-1 reader/writer: parity with nibabel in both directions, the errors
// for broken files, and the atomic-write guarantee.

import t, { Test } from 'tap';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import * as zlib from 'zlib';
import {
  AtomicWriteError,
  MissingFileError,
  isAtomicTempFor,
  readFileChecked,
  writeFileAtomic,
  writeFileAtomicSync,
} from '../src/data/files';
import {
  Matrix4,
  NiftiError,
  NiftiErrorKind,
  NiftiHeader,
  encodeNifti,
  qformAffine,
  readNifti,
  readNiftiSync,
  sformAffine,
  writeNifti,
  writeNiftiSync,
} from '../src/data/nifti';
import { tempDir } from './helpers/files';
import { missingPythonModules, runPythonJson } from './helpers/python';

// ---------------------------------------------------------------------------
// Helpers

type Tap = Test;

/** Fails at the first value off by more than `tolerance` (relative above 1), naming its index. */
function assertClose(
  t: Tap,
  actual: ArrayLike<number | bigint>,
  expected: readonly number[],
  tolerance: number,
  what: string,
): void {
  if (actual.length !== expected.length) {
    t.fail(`${what}: ${actual.length} values, expected ${expected.length}`);
    return;
  }
  for (let i = 0; i < expected.length; i++) {
    const a = Number(actual[i]);
    const e = expected[i];
    const sameNaN = Number.isNaN(a) && Number.isNaN(e);
    if (!sameNaN && !(Math.abs(a - e) <= tolerance * Math.max(1, Math.abs(e)))) {
      t.fail(`${what}: value ${i} is ${a}, expected ${e} (tolerance ${tolerance})`);
      return;
    }
  }
  t.pass(`${what}: ${expected.length} values match`);
}

function flat(m: readonly (readonly number[])[]): number[] {
  return m.flat();
}

/** Asserts that `promiseOrFn` throws a NiftiError of `kind` whose message matches every pattern. */
async function rejectsNifti(
  t: Tap,
  promiseOrFn: Promise<unknown> | (() => unknown),
  kind: NiftiErrorKind,
  patterns: RegExp[],
): Promise<NiftiError | undefined> {
  let error: unknown;
  try {
    if (typeof promiseOrFn === 'function') promiseOrFn();
    else await promiseOrFn;
  } catch (err) {
    error = err;
  }
  if (!(error instanceof NiftiError)) {
    t.fail(`expected NiftiError(${kind}), got ${String(error)}`);
    return undefined;
  }
  t.equal(error.kind, kind, `kind is ${kind}: ${error.message}`);
  for (const pattern of patterns) t.match(error.message, pattern);
  return error;
}

/** rotation(z by zDeg) * rotation(x by xDeg) * diag(zooms), then offset: a proper qform-expressible affine. */
function rotatedAffine(zDeg: number, xDeg: number, zooms: number[], offset: number[]): Matrix4 {
  const [cz, sz] = [Math.cos((zDeg * Math.PI) / 180), Math.sin((zDeg * Math.PI) / 180)];
  const [cx, sx] = [Math.cos((xDeg * Math.PI) / 180), Math.sin((xDeg * Math.PI) / 180)];
  const rotation = [
    [cz, -sz * cx, sz * sx],
    [sz, cz * cx, -cz * sx],
    [0, sx, cx],
  ];
  const row = (r: number): [number, number, number, number] => [
    rotation[r][0] * zooms[0],
    rotation[r][1] * zooms[1],
    rotation[r][2] * zooms[2],
    offset[r],
  ];
  return [row(0), row(1), row(2), [0, 0, 0, 1]];
}

const ROTATED_AFFINE = rotatedAffine(30, 20, [1.2, 0.9, 2.5], [-90.5, 12.25, 40]);

/** 5 x 4 x 3 values that differ along every axis, so a transposed read cannot pass. */
function ramp(dims = [5, 4, 3]): Float32Array {
  const n = dims.reduce((a, b) => a * b, 1);
  return Float32Array.from({ length: n }, (_, i) => i * 1.5 - 20 + (i % 7) * 0.125);
}

// ---------------------------------------------------------------------------
// cmseg on its own (no Python needed)

t.test('round trip through cmseg alone', async (t) => {
  const dir = tempDir(t);
  const data = ramp();

  const floatPath = path.join(dir, 'image.nii');
  await writeNifti(floatPath, { dims: [5, 4, 3], data, affine: ROTATED_AFFINE });
  const image = await readNifti(floatPath);
  t.same(image.dims, [5, 4, 3]);
  t.same(image.data, data, 'float32 values and x-fastest order survive');
  t.equal(image.raw, image.data, 'unscaled float32: raw is the same array');
  assertClose(t, flat(image.affine), flat(ROTATED_AFFINE), 1e-6, 'affine (sform)');
  assertClose(t, flat(qformAffine(image.header)), flat(ROTATED_AFFINE), 1e-5, 'qform matches the sform');
  t.equal(image.header.sformCode, 2);
  t.equal(image.header.qformCode, 2);

  const labels = Uint8Array.from({ length: 60 }, (_, i) => i % 5);
  const labelPath = path.join(dir, 'labels.nii.gz');
  writeNiftiSync(labelPath, { dims: [5, 4, 3], data: labels }, { datatype: 'uint8', header: image.header });
  const labelVolume = readNiftiSync(labelPath);
  t.ok(labelVolume.raw instanceof Uint8Array, 'uint8 raw comes back as Uint8Array');
  t.same(Array.from(labelVolume.raw as Uint8Array), Array.from(labels));
  t.same(labelVolume.affine, image.affine, 'geometry copied from the source header');
  t.ok(fs.readFileSync(labelPath)[0] === 0x1f, '.nii.gz is gzipped');

  const intPath = path.join(dir, 'int16.nii.gz');
  await writeNifti(intPath, { dims: [5, 4, 3], data: Array.from(data, Math.round) }, { datatype: 'int16' });
  const ints = await readNifti(intPath);
  t.ok(ints.raw instanceof Int16Array);
  t.same(Array.from(ints.data), Array.from(data, Math.round));
  t.equal(ints.header.qformCode, 0, 'no affine and no header: codes stay unknown');
  t.equal(ints.header.sformCode, 0);
});

t.test('gzip is detected by content, not name', async (t) => {
  const dir = tempDir(t);
  const gzPath = path.join(dir, 'really-gzipped.nii');
  fs.writeFileSync(gzPath, zlib.gzipSync(encodeNifti({ dims: [5, 4, 3], data: ramp() })));
  t.same((await readNifti(gzPath)).data, ramp());
  const plainPath = path.join(dir, 'not-gzipped.nii.gz');
  fs.writeFileSync(plainPath, encodeNifti({ dims: [5, 4, 3], data: ramp() }));
  t.same(readNiftiSync(plainPath).data, ramp());
});

// Byte-swaps a little-endian file written by encodeNifti into the big-endian
// layout, field by field, so that big-endian reading is tested without Python.
function toBigEndian(little: Buffer, voxelBytes: number): Buffer {
  const big = Buffer.from(little);
  const fields: Array<[offset: number, size: number, count: number]> = [
    [0, 4, 1], // sizeof_hdr
    [40, 2, 8], // dim
    [56, 4, 3], // intent_p1..3
    [68, 2, 4], // intent_code, datatype, bitpix, slice_start
    [76, 4, 11], // pixdim[8], vox_offset, scl_slope, scl_inter
    [120, 2, 1], // slice_end
    [124, 4, 4], // cal_max, cal_min, slice_duration, toffset
    [140, 4, 2], // glmax, glmin
    [252, 2, 2], // qform_code, sform_code
    [256, 4, 18], // quatern, qoffset, srow_x/y/z
  ];
  for (const [offset, size, count] of fields) {
    const region = big.subarray(offset, offset + size * count);
    if (size === 2) region.swap16();
    else region.swap32();
  }
  const voxels = big.subarray(352);
  if (voxelBytes === 2) voxels.swap16();
  if (voxelBytes === 4) voxels.swap32();
  return big;
}

t.test('big-endian files read the same as little-endian ones', async (t) => {
  const dir = tempDir(t);
  const little = encodeNifti({ dims: [5, 4, 3], data: ramp(), affine: ROTATED_AFFINE });
  const bigPath = path.join(dir, 'big.nii');
  fs.writeFileSync(bigPath, toBigEndian(little, 4));
  const volume = await readNifti(bigPath);
  t.equal(volume.header.littleEndian, false);
  t.same(volume.data, ramp());
  assertClose(t, flat(volume.affine), flat(ROTATED_AFFINE), 1e-6, 'big-endian affine');

  const ints = Array.from({ length: 60 }, (_, i) => i * 37 - 1000);
  const bigIntPath = path.join(dir, 'big16.nii');
  fs.writeFileSync(bigIntPath, toBigEndian(encodeNifti({ dims: [5, 4, 3], data: ints }, { datatype: 'int16' }), 2));
  t.same(Array.from(readNiftiSync(bigIntPath).raw as Int16Array), ints);
});

// ---------------------------------------------------------------------------
// Broken files and bad input

t.test('broken files give specific NiftiErrors', async (t) => {
  const dir = tempDir(t);
  const valid = encodeNifti({ dims: [5, 4, 3], data: ramp() }); // 352 + 60 * 4 = 592 bytes
  const write = (name: string, bytes: Uint8Array) => {
    const p = path.join(dir, name);
    fs.writeFileSync(p, bytes);
    return p;
  };

  const missing = path.join(dir, 'nope', 'missing.nii.gz');
  const missingError = await rejectsNifti(t, readNifti(missing), 'missing-file', [/not found/]);
  t.ok(missingError?.message.includes(missing), 'names the missing path');
  await rejectsNifti(t, () => readNiftiSync(missing), 'missing-file', [/missing\.nii\.gz/]);
  // A folder where a file belongs: Node's EISDIR names no path; this one does.
  const folder = path.join(dir, 'a-folder.nii.gz');
  fs.mkdirSync(folder);
  await t.rejects(readNifti(folder), { code: 'EISDIR', path: folder, message: `${folder} is a folder, but a NIfTI image file was expected there` });
  t.throws(() => readNiftiSync(folder), { code: 'EISDIR', path: folder });

  await rejectsNifti(t, readNifti(write('short-header.nii', valid.subarray(0, 100))), 'truncated', [
    /header/,
    /expected 348 bytes, found 100/,
  ]);
  await rejectsNifti(t, readNifti(write('short-data.nii', valid.subarray(0, 582))), 'truncated', [
    /expected 592 bytes/,
    /60 voxels x 4 bytes/,
    /found 582/,
  ]);
  await rejectsNifti(t, readNifti(write('short-data.nii.gz', zlib.gzipSync(valid.subarray(0, 500)))), 'truncated', [
    /expected 592 bytes.*found 500/,
  ]);

  const gz = zlib.gzipSync(valid);
  await rejectsNifti(t, readNifti(write('cut.nii.gz', gz.subarray(0, gz.length >> 1))), 'corrupt-gzip', [/gzip/]);
  const garbage = Buffer.from(gz);
  garbage.fill(0x55, 12, 40);
  await rejectsNifti(t, readNifti(write('garbage.nii.gz', garbage)), 'corrupt-gzip', [/corrupt/]);

  const badMagic = Buffer.from(valid);
  badMagic.write('abc\0', 344, 'latin1');
  await rejectsNifti(t, readNifti(write('bad-magic.nii', badMagic)), 'bad-magic', [/"abc"/, /n\+1/]);

  const complex = Buffer.from(valid);
  complex.writeInt16LE(32, 70);
  const complexError = await rejectsNifti(t, readNifti(write('complex.nii', complex)), 'unsupported-datatype', [
    /datatype 32 \(complex64\)/,
  ]);
  t.equal(complexError?.value, 32, 'carries the code');
  const unknownType = Buffer.from(valid);
  unknownType.writeInt16LE(999, 70);
  await rejectsNifti(t, readNifti(write('unknown-type.nii', unknownType)), 'unsupported-datatype', [/999/]);

  const notNifti = Buffer.from(valid);
  notNifti.writeInt32LE(540, 0);
  await rejectsNifti(t, readNifti(write('nifti2.nii', notNifti)), 'bad-header', [/sizeof_hdr is 540/, /NIfTI-2/]);

  const pairMagicInNii = Buffer.from(valid);
  pairMagicInNii.write('ni1\0', 344, 'latin1');
  await rejectsNifti(t, readNifti(write('pair-magic.nii', pairMagicInNii)), 'bad-magic', [/ni1/, /\.hdr/]);
  await rejectsNifti(t, readNifti(write('lonely.hdr', pairMagicInNii.subarray(0, 352))), 'missing-file', [
    /lonely\.img/,
  ]);

  await rejectsNifti(t, readNifti(write('pair.img', valid.subarray(352))), 'bad-path', [/read .*pair\.hdr instead/]);

  const badDims = Buffer.from(valid);
  badDims.writeInt16LE(0, 42);
  await rejectsNifti(t, readNifti(write('zero-dim.nii', badDims)), 'bad-header', [/dim\[1\] is 0/]);
});

t.test('writer rejects volumes it cannot store faithfully', async (t) => {
  const dir = tempDir(t);
  const target = path.join(dir, 'out.nii');
  await rejectsNifti(t, writeNifti(target, { dims: [5, 4, 3], data: new Float32Array(59) }), 'bad-volume', [
    /59 values/,
    /need 60/,
  ]);
  const tooBig = Float32Array.from({ length: 60 }, (_, i) => (i === 17 ? 40000 : 1));
  const rangeError = await rejectsNifti(
    t,
    writeNifti(target, { dims: [5, 4, 3], data: tooBig }, { datatype: 'int16' }),
    'bad-volume',
    [/value 40000 at index 17/, /int16/],
  );
  t.equal(rangeError?.value, 40000);
  await rejectsNifti(t, writeNifti(target, { dims: [5, 4, 3], data: [...new Array(59).fill(0), NaN] }, { datatype: 'uint8' }), 'bad-volume', [
    /NaN at index 59/,
  ]);
  await rejectsNifti(t, writeNifti(path.join(dir, 'out.mha'), { dims: [1, 1, 1], data: [0] }), 'bad-path', [/\.nii or \.nii\.gz/]);
  const source = readNiftiSync(writeAndReturn(path.join(dir, 'src.nii'), { dims: [5, 4, 3], data: ramp() }));
  await rejectsNifti(t, writeNifti(target, { dims: [4, 5, 3], data: ramp() }, { header: source.header }), 'bad-volume', [
    /\[4,5,3\] differs/,
  ]);
  t.notOk(fs.existsSync(target), 'nothing written after a rejected volume');
});

function writeAndReturn(p: string, volume: Parameters<typeof writeNiftiSync>[1]): string {
  writeNiftiSync(p, volume);
  return p;
}

// ---------------------------------------------------------------------------
// Atomic writes

function tempFilesFor(target: string): string[] {
  return fs.readdirSync(path.dirname(target)).filter((name) => isAtomicTempFor(target, name));
}

t.test('writeFileAtomic replaces the file and leaves no temp files', async (t) => {
  const dir = tempDir(t);
  const target = path.join(dir, 'state.bin');
  await writeFileAtomic(target, Buffer.from('first'));
  await writeFileAtomic(target, Buffer.from('second'));
  writeFileAtomicSync(target, Buffer.from('third'));
  t.equal(fs.readFileSync(target, 'utf8'), 'third');
  t.same(tempFilesFor(target), []);
  t.same(fs.readdirSync(dir), ['state.bin']);
});

t.test('writeFileAtomic into a missing folder names the target', async (t) => {
  const dir = tempDir(t);
  const target = path.join(dir, 'no-such-dir', 'out.nii');
  await t.rejects(writeFileAtomic(target, Buffer.from('x')), AtomicWriteError);
  await t.rejects(writeNifti(target, { dims: [1, 1, 1], data: [1] }), { name: 'AtomicWriteError', path: target });
  t.throws(() => writeFileAtomicSync(target, Buffer.from('x')), { message: new RegExp(`could not write ${target.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}`) });
  t.notOk(fs.existsSync(path.dirname(target)));
});

t.test('a write that fails midway keeps the old file and removes the temp file', async (t) => {
  const dir = tempDir(t);
  const target = path.join(dir, 'image.nii');
  const original = encodeNifti({ dims: [5, 4, 3], data: ramp() });
  fs.writeFileSync(target, original);
  const replacement = encodeNifti({ dims: [5, 4, 3], data: ramp().map((v) => v * 2) });

  // fs with writes that stop halfway through, as a full disk or I/O error would.
  const failingFs = {
    ...fs,
    writeSync: (fd: number, data: Uint8Array, offset: number, length: number) => {
      fs.writeSync(fd, data, offset, Math.min(length, 100));
      throw Object.assign(new Error('ENOSPC: no space left on device (simulated)'), { code: 'ENOSPC' });
    },
    promises: {
      ...fs.promises,
      open: async (p: fs.PathLike, flags: string) => {
        const handle = await fs.promises.open(p, flags);
        return Object.assign(Object.create(handle) as fs.promises.FileHandle, {
          writeFile: async (data: Uint8Array) => {
            await handle.write(data, 0, 100);
            throw Object.assign(new Error('EIO: i/o error (simulated)'), { code: 'EIO' });
          },
          sync: () => handle.sync(),
          close: () => handle.close(),
        });
      },
    },
  };
  const files = t.mockRequire<typeof import('../src/data/files')>('../src/data/files', { fs: failingFs });

  await t.rejects(files.writeFileAtomic(target, replacement), { name: 'AtomicWriteError', message: /EIO/ });
  t.same(fs.readFileSync(target), original, 'async: old file intact');
  t.same(tempFilesFor(target), [], 'async: temp file removed');

  t.throws(() => files.writeFileAtomicSync(target, replacement), { name: 'AtomicWriteError', message: /ENOSPC/ });
  t.same(fs.readFileSync(target), original, 'sync: old file intact');
  t.same(tempFilesFor(target), [], 'sync: temp file removed');
  t.same(readNiftiSync(target).data, ramp(), 'still a readable NIfTI');
});

t.test('readFileChecked says what the missing file was for', async (t) => {
  const missing = path.join(os.tmpdir(), 'cmseg-definitely-missing', 'flair.nii.gz');
  await t.rejects(readFileChecked(missing, 'FLAIR image'), {
    name: 'MissingFileError',
    message: `FLAIR image not found: ${missing}`,
    path: missing,
  });
  await t.rejects(readFileChecked(missing, 'x'), MissingFileError);
});

// ---------------------------------------------------------------------------
// Parity with nibabel

/** What nibabel reports for one file (data flattened x fastest, i.e. Fortran order). */
interface NibabelView {
  shape: number[];
  dtype: string;
  affine: number[][];
  qform: number[][];
  sform: number[][];
  qform_code: number;
  sform_code: number;
  pixdim: number[];
  zooms: number[];
  values: number[];
  raw: number[];
  slope: number;
  inter: number;
  big_endian: boolean;
  vox_offset: number;
  magic: string;
}

const DESCRIBE_WITH_NIBABEL = String.raw`
import gzip, json, struct, sys
import numpy as np, nibabel as nib

def describe(path, header_path=None):
    img = nib.load(path)
    hdr = img.header
    opener = gzip.open if path.endswith('.gz') else open
    with opener(header_path or path, 'rb') as f:
        raw_header = f.read(348)
    big = struct.unpack('<i', raw_header[:4])[0] != 348
    unscaled = np.asanyarray(img.dataobj.get_unscaled())
    return dict(
        shape=list(img.shape), dtype=str(img.get_data_dtype().newbyteorder('=')),
        affine=img.affine.tolist(), qform=hdr.get_qform().tolist(), sform=hdr.get_sform().tolist(),
        qform_code=int(hdr['qform_code']), sform_code=int(hdr['sform_code']),
        pixdim=[float(v) for v in hdr['pixdim']],
        zooms=[float(v) for v in hdr.get_zooms()],
        values=img.get_fdata(dtype=np.float64).ravel(order='F').tolist(),
        raw=[float(v) for v in unscaled.ravel(order='F')],
        slope=float(img.dataobj.slope), inter=float(img.dataobj.inter),
        big_endian=big,
        vox_offset=struct.unpack('>f' if big else '<f', raw_header[108:112])[0],
        magic=raw_header[344:347].decode('latin1'),
    )
`;

/** Writes the fixtures with nibabel into argv[1] and prints what nibabel reads back from each. */
const WRITE_FIXTURES_WITH_NIBABEL = String.raw`
import os, shutil
${DESCRIBE_WITH_NIBABEL}
out = sys.argv[1]
rng = np.random.default_rng(7)

def rotation(ax, deg):
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    i, j = [k for k in range(3) if k != ax]
    r = np.eye(3); r[i, i] = c; r[j, j] = c; r[i, j] = -s; r[j, i] = s
    return r

def affine(rot, zooms, offset):
    a = np.eye(4); a[:3, :3] = rot @ np.diag(zooms); a[:3, 3] = offset
    return a

sform = affine(rotation(2, 30) @ rotation(0, 20), [1.2, 0.9, 2.5], [-90.5, 12.25, 40])
qform = affine(rotation(1, -15), [1.2, 0.9, 2.5], [-88, 10, 41.5])
reflected = affine(rotation(0, 10) @ np.diag([-1, 1, 1]), [0.8, 1.1, 3.0], [60, -120, -70])
shape = (5, 4, 3)
floats = rng.normal(100, 40, shape).astype(np.float32)
cases = {}

def save(name, img, filename):
    nib.save(img, os.path.join(out, filename))
    cases[name] = dict(file=filename, **describe(os.path.join(out, filename)))

img = nib.Nifti1Image(floats, None)
img.set_sform(sform, code=4)   # mni
img.set_qform(qform, code=1)   # scanner
save('float32 with different qform and sform', img, 'both_forms.nii')

img = nib.Nifti1Image(floats, None)
img.set_qform(reflected, code=1)
img.set_sform(None, code=0)
save('qform only, with reflection (qfac -1)', img, 'qform_only.nii')

img = nib.Nifti1Image(floats, None)
img.set_qform(None, code=0)
img.set_sform(None, code=0)
img.header.set_zooms((1.5, 2.0, 2.5))
save('no qform or sform (Analyze fallback)', img, 'no_forms.nii')

img = nib.Nifti1Image(rng.uniform(-300, 1200, shape), sform)
img.set_data_dtype(np.int16)
save('int16 with scl_slope and scl_inter', img, 'int16_scaled.nii')

save('uint8 label map', nib.Nifti1Image(rng.integers(0, 5, shape).astype(np.uint8), sform), 'labels.nii.gz')
save('float32 .nii.gz', nib.Nifti1Image(floats, sform), 'float32.nii.gz')

big_header = nib.Nifti1Header(endianness='>')
save('big-endian float32', nib.Nifti1Image(floats.astype('>f4'), sform, big_header), 'big_float32.nii')
img = nib.Nifti1Image(rng.uniform(-5, 5, shape).astype('>f8'), sform, nib.Nifti1Header(endianness='>'))
img.set_data_dtype('>i2')
save('big-endian int16 with scaling', img, 'big_int16.nii.gz')

for dtype, low, high in [('int8', -128, 127), ('uint16', 0, 65535), ('int32', -2**31, 2**31 - 1),
                         ('uint32', 0, 2**32 - 1), ('float64', -1e6, 1e6), ('int64', -2**40, 2**40), ('uint64', 0, 2**40)]:
    values = rng.uniform(low, high, shape)
    if not dtype.startswith('float'):
        values = np.round(values)
    save(dtype, nib.Nifti1Image(values.astype(dtype), sform, dtype=dtype), dtype + '.nii')

save('4D float32', nib.Nifti1Image(rng.normal(0, 1, shape + (2,)).astype(np.float32), sform), 'four_d.nii.gz')
save('2D float32', nib.Nifti1Image(rng.normal(0, 1, (5, 4)).astype(np.float32), sform), 'two_d.nii')

nib.save(nib.Nifti1Pair(floats, qform), os.path.join(out, 'pair.img'))
cases['hdr/img pair'] = dict(file='pair.hdr', **describe(os.path.join(out, 'pair.hdr')))

print(json.dumps(cases))
`;

/** Prints what nibabel reads from each file named in argv[1:]. */
const READ_WITH_NIBABEL = String.raw`
${DESCRIBE_WITH_NIBABEL}
print(json.dumps({path: describe(path) for path in sys.argv[1:]}))
`;

const nibabelSkip = missingPythonModules('numpy', 'nibabel');

t.test('files nibabel writes load in cmseg', { skip: nibabelSkip }, async (t) => {
  const dir = tempDir(t);
  const cases = runPythonJson<Record<string, NibabelView & { file: string }>>(WRITE_FIXTURES_WITH_NIBABEL, [dir]);
  t.ok(Object.keys(cases).length >= 17, `${Object.keys(cases).length} fixtures written`);

  for (const [name, expected] of Object.entries(cases)) {
    t.test(name, async (t) => {
      const volume = await readNifti(path.join(dir, expected.file));
      const paddedShape = [...expected.shape, 1, 1].slice(0, Math.max(3, expected.shape.length));
      t.same(volume.dims, paddedShape, `dims ${JSON.stringify(paddedShape)}`);
      t.equal(volume.header.datatype, expected.dtype, `datatype ${expected.dtype}`);
      t.equal(volume.header.littleEndian, !expected.big_endian, expected.big_endian ? 'big-endian' : 'little-endian');
      assertClose(t, flat(volume.affine), flat(expected.affine), 1e-6, 'affine');
      // The voxel size in file order (x, y, z), as nibabel's get_zooms(): HD95 in mm reads it.
      const axes = Math.min(3, expected.zooms.length);
      assertClose(t, volume.spacing.slice(0, axes), expected.zooms.slice(0, axes), 1e-6, 'spacing (get_zooms)');
      assertClose(t, flat(qformAffine(volume.header)), flat(expected.qform), 1e-6, 'qform matrix');
      assertClose(t, flat(sformAffine(volume.header)), flat(expected.sform), 1e-6, 'sform matrix');
      assertClose(t, volume.raw, expected.raw, 0, 'raw stored values');
      // float32 output: relative error up to 2^-24 per value.
      assertClose(t, volume.data, expected.values, 1e-7, 'scaled float32 values');
    });
  }

  t.test('the fixtures exercise what they claim to', async (t) => {
    t.not(cases['int16 with scl_slope and scl_inter'].slope, 1, 'int16 case has a slope');
    t.not(cases['int16 with scl_slope and scl_inter'].inter, 0, 'int16 case has an intercept');
    t.ok(cases['big-endian float32'].big_endian, 'big-endian file really is');
    t.ok(cases['big-endian int16 with scaling'].big_endian);
    t.not(cases['big-endian int16 with scaling'].slope, 1);
    const both = cases['float32 with different qform and sform'];
    t.not(JSON.stringify(both.qform), JSON.stringify(both.sform), 'qform and sform differ');
    t.equal(cases['qform only, with reflection (qfac -1)'].pixdim[0], -1, 'qfac is -1');
    t.equal(cases['hdr/img pair'].magic, 'ni1');
    t.same(cases['float32 .nii.gz'].zooms.map((z) => Math.round(z * 10) / 10), [1.2, 0.9, 2.5], 'anisotropic voxels, each axis its own size');
  });

  t.test('a .nii.gz renamed to .nii still loads', async (t) => {
    const renamed = path.join(dir, 'gz_named.nii');
    fs.copyFileSync(path.join(dir, 'float32.nii.gz'), renamed);
    assertClose(t, readNiftiSync(renamed).data, cases['float32 .nii.gz'].values, 1e-7, 'values');
  });
});

t.test('files cmseg writes load in nibabel', { skip: nibabelSkip }, async (t) => {
  const dir = tempDir(t);
  const file = (name: string) => path.join(dir, name);
  const sheared: Matrix4 = [
    [1, 0.5, 0, 3],
    [0, 1, 0, 4],
    [0, 0, 2, 5],
    [0, 0, 0, 1],
  ];
  const reflected: Matrix4 = [
    [-0.9, 0, 0, 90],
    [0, 1.1, 0.2, -126],
    [0, -0.1, 2.2, -72],
    [0, 0, 0, 1],
  ];
  const labels = Uint8Array.from({ length: 60 }, (_, i) => (i * 7) % 5);
  const intensities = Array.from({ length: 60 }, (_, i) => i * 53 - 1500);
  const fourD = ramp([5, 4, 3, 2]);

  await writeNifti(file('rotated.nii'), { dims: [5, 4, 3], data: ramp(), affine: ROTATED_AFFINE });
  await writeNifti(file('int16.nii.gz'), { dims: [5, 4, 3], data: intensities, affine: ROTATED_AFFINE }, { datatype: 'int16' });
  await writeNifti(file('labels.nii.gz'), { dims: [5, 4, 3], data: labels, affine: ROTATED_AFFINE }, { datatype: 'uint8' });
  await writeNifti(file('sheared.nii'), { dims: [5, 4, 3], data: ramp(), affine: sheared });
  await writeNifti(file('reflected.nii'), { dims: [5, 4, 3], data: ramp(), affine: reflected });
  await writeNifti(file('four_d.nii.gz'), { dims: [5, 4, 3, 2], data: fourD, affine: ROTATED_AFFINE });

  // A header with different qform and sform (and codes 1 and 4), from nibabel.
  const source = runPythonJson<{ file: string }>(
    String.raw`
import json, sys, numpy as np, nibabel as nib
img = nib.Nifti1Image(np.zeros((5, 4, 3), np.float32), None)
q = np.array([[0, -1.1, 0, 30], [0.9, 0, 0, -20], [0, 0, 2.4, 10], [0, 0, 0, 1]])
s = np.array([[1.2, 0.1, 0, -90], [-0.1, 0.9, 0, 12], [0, 0, 2.5, 40], [0, 0, 0, 1]])
img.set_qform(q, code=1); img.set_sform(s, code=4)
path = sys.argv[1] + '/source.nii'
nib.save(img, path)
print(json.dumps({'file': path}))
`,
    [dir],
  );
  const sourceHeader: NiftiHeader = readNiftiSync(source.file).header;
  await writeNifti(file('with_source_header.nii.gz'), { dims: [5, 4, 3], data: labels }, { datatype: 'uint8', header: sourceHeader });

  const names = [
    'rotated.nii',
    'int16.nii.gz',
    'labels.nii.gz',
    'sheared.nii',
    'reflected.nii',
    'four_d.nii.gz',
    'with_source_header.nii.gz',
    'source.nii',
  ];
  const seen = runPythonJson<Record<string, NibabelView>>(READ_WITH_NIBABEL, names.map(file));
  const view = (name: string) => seen[file(name)];

  for (const name of names.slice(0, -1)) {
    const v = view(name);
    t.equal(v.magic, 'n+1', `${name}: magic n+1`);
    t.equal(v.vox_offset, 352, `${name}: vox_offset 352`);
    t.notOk(v.big_endian, `${name}: little-endian`);
  }

  t.same(view('rotated.nii').shape, [5, 4, 3]);
  t.equal(view('rotated.nii').dtype, 'float32');
  assertClose(t, view('rotated.nii').values, Array.from(ramp()), 0, 'rotated: values');
  assertClose(t, flat(view('rotated.nii').affine), flat(ROTATED_AFFINE), 1e-6, 'rotated: affine');
  assertClose(t, flat(view('rotated.nii').qform), flat(ROTATED_AFFINE), 1e-5, 'rotated: qform also encodes it');
  t.equal(view('rotated.nii').sform_code, 2);
  t.equal(view('rotated.nii').qform_code, 2);

  t.equal(view('int16.nii.gz').dtype, 'int16');
  assertClose(t, view('int16.nii.gz').values, intensities, 0, 'int16: values');
  t.equal(view('labels.nii.gz').dtype, 'uint8');
  assertClose(t, view('labels.nii.gz').raw, Array.from(labels), 0, 'uint8: labels');

  assertClose(t, flat(view('sheared.nii').affine), flat(sheared), 1e-6, 'sheared: affine from sform');
  t.equal(view('sheared.nii').qform_code, 0, 'sheared: no qform (it cannot express shear)');

  t.equal(view('reflected.nii').pixdim[0], -1, 'reflected: qfac -1');
  assertClose(t, flat(view('reflected.nii').qform), flat(reflected), 1e-5, 'reflected: qform reproduces the affine');

  t.same(view('four_d.nii.gz').shape, [5, 4, 3, 2]);
  assertClose(t, view('four_d.nii.gz').values, Array.from(fourD), 0, '4D: values, x fastest then t');

  const copied = view('with_source_header.nii.gz');
  const original = view('source.nii');
  t.equal(copied.qform_code, 1, 'source qform_code kept');
  t.equal(copied.sform_code, 4, 'source sform_code kept');
  t.same(copied.pixdim.slice(0, 4), original.pixdim.slice(0, 4), 'source pixdim kept');
  assertClose(t, flat(copied.qform), flat(original.qform), 0, 'source qform kept exactly');
  assertClose(t, flat(copied.sform), flat(original.sform), 0, 'source sform kept exactly');
  assertClose(t, flat(copied.affine), flat(original.affine), 0, 'same affine as the source');
});
