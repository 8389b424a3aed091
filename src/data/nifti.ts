// NIfTI-1 reading and writing (.nii, .nii.gz, and .hdr/.img pairs for reading).
//
// Field offsets, datatype codes and the qform/sform rules follow the NIfTI-1
// standard (nifti1.h). Where the standard leaves a choice, we do what nibabel
// does, so that an image means the same thing here as in the Python tools
// (nnU-Net, MONAI) that BraTS users compare against:
//   - affine: sform if sform_code > 0, else qform if qform_code > 0, else the
//     Analyze-style fallback (x flipped, grid centred) of nibabel's
//     get_base_affine;
//   - scl_slope of 0 or non-finite means "no scaling".
//
// Voxel layout: the file stores x fastest, and so do we. For dims
// [nx, ny, nz, nt...] the voxel (x, y, z, t) is at
//   index = x + nx * (y + ny * (z + nz * t)).

import * as buffer from 'buffer';
import { existsSync, statSync } from 'fs';
import * as os from 'os';
import * as path from 'path';
import * as zlib from 'zlib';
import { promisify } from 'util';
import {
  MissingFileError,
  readFileChecked,
  readFileCheckedSync,
  writeFileAtomic,
  writeFileAtomicSync,
} from './files';

// ---------------------------------------------------------------------------
// Public types

/** Voxel types cmseg can read. */
export type NiftiDatatype =
  | 'uint8'
  | 'int8'
  | 'int16'
  | 'uint16'
  | 'int32'
  | 'uint32'
  | 'float32'
  | 'float64'
  | 'int64'
  | 'uint64';

/** Voxel types cmseg writes: images as float32, labels as uint8, CT/MR intensities as int16. */
export type NiftiWriteDatatype = 'float32' | 'int16' | 'uint8';

/** The stored voxel values, unscaled, in the file's own type (native byte order). */
export type NiftiRawArray =
  | Uint8Array
  | Int8Array
  | Int16Array
  | Uint16Array
  | Int32Array
  | Uint32Array
  | Float32Array
  | Float64Array
  | BigInt64Array
  | BigUint64Array;

export type Vec3 = [number, number, number];
export type Vec4 = [number, number, number, number];
/** Row-major 4x4 matrix: m[row][column]; maps (i, j, k, 1) voxel indices to world mm. */
export type Matrix4 = [Vec4, Vec4, Vec4, Vec4];

/** The NIfTI-1 header fields cmseg uses, decoded to native numbers. */
export interface NiftiHeader {
  /** Byte order of the file the header came from (written files are always little-endian). */
  littleEndian: boolean;
  /** 'n+1' single .nii file, 'ni1' separate .hdr/.img pair. */
  magic: 'n+1' | 'ni1';
  /** dim[0..7] as stored: dim[0] is the number of dimensions. */
  dim: number[];
  datatype: NiftiDatatype;
  datatypeCode: number;
  /** pixdim[0..7] as stored: pixdim[0] is qfac (-1 or 1), pixdim[1..3] the voxel size. */
  pixdim: number[];
  /** Byte offset of the voxel data (in the .nii, or in the .img of a pair). */
  voxOffset: number;
  sclSlope: number;
  sclInter: number;
  /** Units of pixdim: bits 0-2 space (2 = mm), bits 3-5 time. */
  xyztUnits: number;
  intentCode: number;
  calMin: number;
  calMax: number;
  descrip: string;
  qformCode: number;
  sformCode: number;
  /** quatern_b, quatern_c, quatern_d. */
  quatern: Vec3;
  /** qoffset_x, qoffset_y, qoffset_z. */
  qoffset: Vec3;
  /** srow_x, srow_y, srow_z: the first three rows of the sform matrix. */
  srow: [Vec4, Vec4, Vec4];
}

/** A volume read from disk. */
export interface NiftiVolume {
  path: string;
  /** [nx, ny, nz] (3D, also for 2D files with nz = 1), or [nx, ny, nz, nt, ...] when a later dim > 1. */
  dims: number[];
  /** Voxel size along x, y, z (pixdim[1..3], usually mm; see voxelSize for 0, negative and non-finite values). */
  spacing: Vec3;
  /** Voxel index to world, chosen as nibabel does (see the top of this file). */
  affine: Matrix4;
  /**
   * Voxel values as float32 after scl_slope/scl_inter, x fastest.
   * For an unscaled float32 file this is the same array as `raw`.
   */
  data: Float32Array;
  /** Stored values before scaling, in the file's type: use this for label maps. */
  raw: NiftiRawArray;
  header: NiftiHeader;
}

/** What writeNifti needs: a NiftiVolume fits, and so does a bare {dims, data, affine}. */
export interface NiftiImageToWrite {
  dims: readonly number[];
  /** Values x fastest; length must be the product of dims. */
  data: ArrayLike<number>;
  /** Voxel-to-world matrix, used when there is no header to copy the geometry from. */
  affine?: Matrix4;
  /** Header to copy the geometry from (see NiftiWriteOptions.header). */
  header?: NiftiHeader;
}

export interface NiftiWriteOptions {
  /** Stored type; int16/uint8 round to nearest and reject out-of-range values. Default float32. */
  datatype?: NiftiWriteDatatype;
  /**
   * Source header whose geometry (pixdim, qform, sform and their codes,
   * xyzt_units) is copied unchanged, e.g. the image a segmentation was
   * predicted from. Defaults to the volume's own header; without either,
   * the geometry is derived from volume.affine.
   */
  header?: NiftiHeader;
  /** Text for the 80-byte descrip field. */
  description?: string;
  /** gzip level for .nii.gz (0-9, default zlib's 6). */
  gzipLevel?: number;
  /**
   * scl_slope and scl_inter to store: `data` holds the stored values, and readers (nibabel's
   * get_fdata, readNifti's `data`) see stored * slope + inter. Default slope 1, inter 0. Probabilities
   * as uint8 round(255 p) are written with slope 1/255, so that every reader gets p back.
   */
  scaling?: { slope: number; inter?: number };
}

export type NiftiErrorKind =
  | 'missing-file'
  | 'truncated'
  | 'bad-magic'
  | 'bad-header'
  | 'unsupported-datatype'
  | 'corrupt-gzip'
  | 'bad-path'
  | 'bad-volume'
  /** More bytes than Node can read whole (a .nii over 2 GiB) or hold (a .nii.gz decompressing past 4 GiB). */
  | 'too-large';

/** Anything wrong with a NIfTI file or with a volume handed to the writer. */
export class NiftiError extends Error {
  constructor(
    readonly kind: NiftiErrorKind,
    /** The file concerned. */
    readonly path: string,
    message: string,
    /** The offending value: the bad code, the byte count found, the voxel value... */
    readonly value?: unknown,
    options?: { cause?: unknown },
  ) {
    super(`${path}: ${message}`, options);
    this.name = 'NiftiError';
  }
}

// ---------------------------------------------------------------------------
// Constants from nifti1.h

const HEADER_BYTES = 348;
/** Header plus the 4-byte extension flag: where single-file data starts. */
const SINGLE_FILE_VOX_OFFSET = 352;
const XFORM_ALIGNED_ANAT = 2;
const UNITS_MM = 2;

/** Byte offsets of the header fields used here. */
const FIELD_OFFSET = {
  sizeofHdr: 0,
  dim: 40,
  intentCode: 68,
  datatype: 70,
  bitpix: 72,
  pixdim: 76,
  voxOffset: 108,
  sclSlope: 112,
  sclInter: 116,
  xyztUnits: 123,
  calMax: 124,
  calMin: 128,
  descrip: 148,
  qformCode: 252,
  sformCode: 254,
  quatern: 256,
  qoffset: 268,
  srowX: 280,
  srowY: 296,
  srowZ: 312,
  magic: 344,
} as const;

interface DatatypeInfo {
  name: NiftiDatatype;
  code: number;
  bytes: number;
  /** Views `count` values over a buffer already in native byte order. */
  view(buffer: ArrayBuffer, count: number): NiftiRawArray;
}

const DATATYPES: readonly DatatypeInfo[] = [
  { name: 'uint8', code: 2, bytes: 1, view: (b, n) => new Uint8Array(b, 0, n) },
  { name: 'int16', code: 4, bytes: 2, view: (b, n) => new Int16Array(b, 0, n) },
  { name: 'int32', code: 8, bytes: 4, view: (b, n) => new Int32Array(b, 0, n) },
  { name: 'float32', code: 16, bytes: 4, view: (b, n) => new Float32Array(b, 0, n) },
  { name: 'float64', code: 64, bytes: 8, view: (b, n) => new Float64Array(b, 0, n) },
  { name: 'int8', code: 256, bytes: 1, view: (b, n) => new Int8Array(b, 0, n) },
  { name: 'uint16', code: 512, bytes: 2, view: (b, n) => new Uint16Array(b, 0, n) },
  { name: 'uint32', code: 768, bytes: 4, view: (b, n) => new Uint32Array(b, 0, n) },
  { name: 'int64', code: 1024, bytes: 8, view: (b, n) => new BigInt64Array(b, 0, n) },
  { name: 'uint64', code: 1280, bytes: 8, view: (b, n) => new BigUint64Array(b, 0, n) },
];

/** Codes defined by NIfTI-1 that cmseg does not read, named for the error message. */
const UNSUPPORTED_DATATYPE_NAMES: Record<number, string> = {
  0: 'unknown',
  1: 'binary',
  32: 'complex64',
  128: 'rgb24',
  1536: 'float128',
  1792: 'complex128',
  2048: 'complex256',
  2304: 'rgba32',
};

function datatypeByCode(code: number, filePath: string): DatatypeInfo {
  const info = DATATYPES.find((d) => d.code === code);
  if (info) return info;
  const known = UNSUPPORTED_DATATYPE_NAMES[code];
  const label = known ? `${code} (${known})` : `${code} (not a NIfTI-1 code)`;
  const supported = DATATYPES.map((d) => d.name).join(', ');
  throw new NiftiError('unsupported-datatype', filePath, `unsupported datatype ${label}; cmseg reads ${supported}`, code);
}

function datatypeByName(name: NiftiDatatype): DatatypeInfo {
  const info = DATATYPES.find((d) => d.name === name);
  if (!info) throw new Error(`internal: no datatype named ${name}`);
  return info;
}

const HOST_IS_LITTLE_ENDIAN = os.endianness() === 'LE';

// ---------------------------------------------------------------------------
// Reading

/** Reads a .nii, .nii.gz or .hdr/.img pair. Throws NiftiError. */
export async function readNifti(filePath: string): Promise<NiftiVolume> {
  rejectImageHalfOfPair(filePath);
  const file = await readNiftiFile(filePath, 'NIfTI image');
  const header = parseNiftiHeader(peekHeader(file, filePath), filePath);
  const headerBytes = await gunzipIfNeeded(file, filePath, fileLength(header, filePath));
  if (header.magic === 'n+1') return decodeVolume(filePath, header, headerBytes, filePath);
  const imagePath = pairImagePath(filePath);
  const imageFile = await readNiftiFile(imagePath, 'NIfTI .img (voxel data of a .hdr/.img pair)');
  const imageBytes = await gunzipIfNeeded(imageFile, imagePath, dataLength(header, imagePath));
  return decodeVolume(filePath, header, imageBytes, imagePath);
}

/** Synchronous readNifti. */
export function readNiftiSync(filePath: string): NiftiVolume {
  rejectImageHalfOfPair(filePath);
  const file = readNiftiFileSync(filePath, 'NIfTI image');
  const header = parseNiftiHeader(peekHeader(file, filePath), filePath);
  const headerBytes = gunzipIfNeededSync(file, filePath, fileLength(header, filePath));
  if (header.magic === 'n+1') return decodeVolume(filePath, header, headerBytes, filePath);
  const imagePath = pairImagePath(filePath);
  const imageFile = readNiftiFileSync(imagePath, 'NIfTI .img (voxel data of a .hdr/.img pair)');
  const imageBytes = gunzipIfNeededSync(imageFile, imagePath, dataLength(header, imagePath));
  return decodeVolume(filePath, header, imageBytes, imagePath);
}

// A .img holds only voxels; read as a header it would fail with a baffling
// sizeof_hdr message, so say what to pass instead.
function rejectImageHalfOfPair(filePath: string): void {
  if (/\.img(\.gz)?$/i.test(filePath)) {
    // Spelt as the .img is (nibabel writes X.HDR beside X.IMG): on a case-sensitive disk
    // a lower-case X.hdr would name a file that is not there.
    const headerPath = filePath.replace(/\.(img)(\.gz)?$/i, (_, img: string, gz = '') => `.${matchCase('hdr', img)}${gz}`);
    throw new NiftiError('bad-path', filePath, `this is the voxel half of a .hdr/.img pair; read ${headerPath} instead`, filePath);
  }
}

async function readNiftiFile(filePath: string, what: string): Promise<Buffer> {
  try {
    return await readFileChecked(filePath, what);
  } catch (err) {
    throw asNiftiReadError(err, filePath);
  }
}

function readNiftiFileSync(filePath: string, what: string): Buffer {
  try {
    return readFileCheckedSync(filePath, what);
  } catch (err) {
    throw asNiftiReadError(err, filePath);
  }
}

function asNiftiReadError(err: unknown, filePath: string): unknown {
  // Node reads a file whole only up to 2 GiB and then throws a RangeError that names no file;
  // gunzip's output may be larger (up to the largest Buffer), so a gzipped copy still reads.
  if ((err as NodeJS.ErrnoException).code === 'ERR_FS_FILE_TOO_LARGE') {
    let size = '';
    try {
      size = ` of ${statSync(filePath).size} bytes`;
    } catch {
      // the size is only for the message
    }
    const limit = `${buffer.constants.MAX_LENGTH / 2 ** 30} GiB`;
    return new NiftiError(
      'too-large',
      filePath,
      `file${size} is too large to read: cmseg reads an uncompressed file of at most 2 GiB; gzip it (a .nii.gz may hold up to ${limit} uncompressed)`,
      filePath,
      { cause: err },
    );
  }
  if (!(err instanceof MissingFileError)) return err;
  return new NiftiError('missing-file', err.path, `${err.what} not found`, err.path, { cause: err });
}

// gzip members start with 1f 8b. Checking the bytes rather than the name
// copes with .nii files that are secretly compressed and vice versa.
function isGzip(bytes: Uint8Array): boolean {
  return bytes.length >= 2 && bytes[0] === 0x1f && bytes[1] === 0x8b;
}

const gunzipAsync = promisify(zlib.gunzip) as (data: Uint8Array, options: zlib.ZlibOptions) => Promise<Buffer>;

// A gzipped file is inflated only as far as its header says it reaches (plus this much for
// bytes some writers leave after the voxels): a small .nii.gz that inflates to gigabytes (a
// damaged header, or a gzip bomb) is refused at that point instead of filling memory first.
const GZIP_SLACK = 1 << 20;
// A .hdr's own length is not in its header (extensions follow it): this bounds it.
const PAIR_HEADER_LIMIT = 64 << 20;

/**
 * The header's bytes of a file, inflating only the start of a gzipped one: the compressed
 * header takes a few hundred bytes (a gzip member's optional fields up to 64 KiB more).
 */
function peekHeader(file: Buffer, filePath: string): Buffer {
  if (!isGzip(file)) return file;
  let head = Buffer.alloc(0);
  for (const size of [4096, 1 << 16, 1 << 17]) {
    try {
      // A partial member: Z_SYNC_FLUSH returns what the input so far decodes to.
      head = zlib.gunzipSync(file.subarray(0, size), { finishFlush: zlib.constants.Z_SYNC_FLUSH });
    } catch (err) {
      throw corruptGzipError(err, filePath);
    }
    if (head.length >= HEADER_BYTES || size >= file.length) break;
  }
  return head;
}

/** How many bytes a file holds by its header: the header alone (.hdr), or header and voxels (.nii). */
function fileLength(header: NiftiHeader, filePath: string): number {
  return header.magic === 'n+1' ? dataLength(header, filePath) : PAIR_HEADER_LIMIT;
}

/** vox_offset plus the voxels: what the voxel data's file must hold. */
function dataLength(header: NiftiHeader, dataPath: string): number {
  const count = voxelCount(header.dim.slice(1, header.dim[0] + 1));
  return dataOffset(header, dataPath) + count * datatypeByName(header.datatype).bytes;
}

async function gunzipIfNeeded(bytes: Buffer, filePath: string, length: number): Promise<Buffer> {
  if (!isGzip(bytes)) return bytes;
  checkHoldable(length, filePath);
  try {
    return await gunzipAsync(bytes, { maxOutputLength: inflateLimit(length) });
  } catch (err) {
    throw corruptGzipError(err, filePath, length);
  }
}

function gunzipIfNeededSync(bytes: Buffer, filePath: string, length: number): Buffer {
  if (!isGzip(bytes)) return bytes;
  checkHoldable(length, filePath);
  try {
    return zlib.gunzipSync(bytes, { maxOutputLength: inflateLimit(length) });
  } catch (err) {
    throw corruptGzipError(err, filePath, length);
  }
}

function inflateLimit(length: number): number {
  return Math.min(length + GZIP_SLACK, buffer.constants.MAX_LENGTH);
}

// Said before inflating anything: the header alone shows that the voxels cannot be held.
function checkHoldable(length: number, filePath: string): void {
  if (length > buffer.constants.MAX_LENGTH) {
    throw new NiftiError('too-large', filePath, `its header describes ${length} bytes of header and voxels, more than the ${buffer.constants.MAX_LENGTH} bytes cmseg can hold in memory`, length);
  }
}

function corruptGzipError(err: unknown, filePath: string, length?: number): NiftiError {
  // Output past the bound is zlib's ERR_BUFFER_TOO_LARGE: the data is not corrupt, only
  // more than the header describes (or, at the largest Buffer, than cmseg can hold).
  if ((err as NodeJS.ErrnoException).code === 'ERR_BUFFER_TOO_LARGE') {
    const limit = length === undefined ? buffer.constants.MAX_LENGTH : inflateLimit(length);
    const why =
      length !== undefined && limit < buffer.constants.MAX_LENGTH
        ? `more than its header describes (${length} bytes${length === PAIR_HEADER_LIMIT ? ' at most for a .hdr' : ' of header and voxels'}); refused before it could fill memory: a damaged file, or not an image`
        : 'the most cmseg can hold in memory';
    return new NiftiError('too-large', filePath, `decompresses to more than ${limit} bytes, ${why}`, filePath, { cause: err });
  }
  const reason = err instanceof Error ? err.message : String(err);
  return new NiftiError('corrupt-gzip', filePath, `gzip data is corrupt or truncated (${reason})`, reason, { cause: err });
}

/** `word` in upper case when `like` is (HDR -> IMG), else as given. */
function matchCase(word: string, like: string): string {
  return like === like.toUpperCase() ? word.toUpperCase() : word;
}

// Both .hdr and .img may be gzipped independently; prefer the one whose
// compression matches the header, then the other. The .img is spelt in the
// header's case first (nibabel saves X.HDR with X.IMG), then in lower case.
function pairImagePath(headerPath: string): string {
  const match = /\.(hdr)(\.gz)?$/i.exec(headerPath);
  if (!match) {
    throw new NiftiError(
      'bad-magic',
      headerPath,
      "magic is 'ni1' (header of a .hdr/.img pair) but the file is not named .hdr or .hdr.gz, so the .img cannot be found",
      'ni1',
    );
  }
  const stem = headerPath.slice(0, match.index);
  const spellings = (img: string, gz: string) => (match[2] ? [`${stem}.${img}${gz}`, `${stem}.${img}`] : [`${stem}.${img}`, `${stem}.${img}${gz}`]);
  const candidates = [...spellings(matchCase('img', match[1]), matchCase('.gz', match[2] ?? match[1])), ...spellings('img', '.gz')];
  return candidates.find((p) => existsSync(p)) ?? candidates[0];
}

/**
 * Decodes the 348-byte header at the start of `bytes` (uncompressed).
 * Byte order is detected from sizeof_hdr, which must read as 348.
 */
export function parseNiftiHeader(bytes: Uint8Array, filePath: string): NiftiHeader {
  rejectOtherCompression(bytes, filePath);
  if (bytes.length < HEADER_BYTES) {
    throw new NiftiError(
      'truncated',
      filePath,
      `truncated header: expected ${HEADER_BYTES} bytes, found ${bytes.length}`,
      bytes.length,
    );
  }
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const littleEndian = detectLittleEndian(view, filePath);
  const int16 = (at: number) => view.getInt16(at, littleEndian);
  const float32 = (at: number) => view.getFloat32(at, littleEndian);
  const floats = (at: number, n: number) => Array.from({ length: n }, (_, i) => float32(at + 4 * i));

  const magic = readMagic(bytes, filePath);
  const dim = Array.from({ length: 8 }, (_, i) => int16(FIELD_OFFSET.dim + 2 * i));
  checkDim(dim, filePath);
  const datatypeCode = int16(FIELD_OFFSET.datatype);
  const datatype = datatypeByCode(datatypeCode, filePath).name;

  return {
    littleEndian,
    magic,
    dim,
    datatype,
    datatypeCode,
    pixdim: floats(FIELD_OFFSET.pixdim, 8),
    voxOffset: float32(FIELD_OFFSET.voxOffset),
    sclSlope: float32(FIELD_OFFSET.sclSlope),
    sclInter: float32(FIELD_OFFSET.sclInter),
    xyztUnits: view.getUint8(FIELD_OFFSET.xyztUnits),
    intentCode: int16(FIELD_OFFSET.intentCode),
    calMin: float32(FIELD_OFFSET.calMin),
    calMax: float32(FIELD_OFFSET.calMax),
    descrip: readCString(bytes, FIELD_OFFSET.descrip, 80),
    qformCode: int16(FIELD_OFFSET.qformCode),
    sformCode: int16(FIELD_OFFSET.sformCode),
    quatern: floats(FIELD_OFFSET.quatern, 3) as Vec3,
    qoffset: floats(FIELD_OFFSET.qoffset, 3) as Vec3,
    srow: [floats(FIELD_OFFSET.srowX, 4) as Vec4, floats(FIELD_OFFSET.srowY, 4) as Vec4, floats(FIELD_OFFSET.srowZ, 4) as Vec4],
  };
}

// sizeof_hdr is 348 in the writer's byte order, so reading it both ways
// tells us the order (the standard's own suggestion; dim[0] is the other).
function detectLittleEndian(view: DataView, filePath: string): boolean {
  const asLittle = view.getInt32(FIELD_OFFSET.sizeofHdr, true);
  if (asLittle === HEADER_BYTES) return true;
  if (view.getInt32(FIELD_OFFSET.sizeofHdr, false) === HEADER_BYTES) return false;
  // NIfTI-2's sizeof_hdr is 540, in either byte order as NIfTI-1's 348 is.
  const hint =
    asLittle === 540 || view.getInt32(FIELD_OFFSET.sizeofHdr, false) === 540
      ? ` (540${asLittle === 540 ? '' : ' read big-endian'} is NIfTI-2, which cmseg does not read)`
      : '';
  throw new NiftiError(
    'bad-header',
    filePath,
    `not a NIfTI-1 file: sizeof_hdr is ${asLittle}, expected ${HEADER_BYTES} in either byte order${hint}`,
    asLittle,
  );
}

// nibabel also reads .nii.bz2 and .nii.zst; read as a header their bytes would give a
// meaningless sizeof_hdr (or, a small image compressing well, a "truncated header"), so the
// compression is named instead.
function rejectOtherCompression(bytes: Uint8Array, filePath: string): void {
  const starts = (...prefix: number[]) => prefix.every((b, i) => bytes[i] === b);
  const compression = starts(0x42, 0x5a, 0x68) ? 'bzip2' : starts(0x28, 0xb5, 0x2f, 0xfd) ? 'zstd' : undefined;
  if (compression) {
    throw new NiftiError(
      'bad-header',
      filePath,
      `the file is ${compression}-compressed; cmseg reads NIfTI files uncompressed or gzip-compressed (.nii, .nii.gz): recompress it with gzip`,
      compression,
    );
  }
}

function readMagic(bytes: Uint8Array, filePath: string): 'n+1' | 'ni1' {
  const magic = readCString(bytes, FIELD_OFFSET.magic, 4);
  if (magic === 'n+1' || magic === 'ni1') return magic;
  throw new NiftiError(
    'bad-magic',
    filePath,
    `bad magic ${JSON.stringify(magic)}: expected "n+1" (.nii) or "ni1" (.hdr/.img); plain Analyze 7.5 is not supported`,
    magic,
  );
}

function readCString(bytes: Uint8Array, at: number, maxLength: number): string {
  const field = bytes.subarray(at, at + maxLength);
  const end = field.indexOf(0);
  return Buffer.from(field.subarray(0, end < 0 ? field.length : end)).toString('latin1');
}

function checkDim(dim: number[], filePath: string): void {
  const ndim = dim[0];
  if (ndim < 1 || ndim > 7) {
    throw new NiftiError('bad-header', filePath, `dim[0] is ${ndim}, expected 1..7`, ndim);
  }
  for (let i = 1; i <= ndim; i++) {
    if (dim[i] < 1) {
      throw new NiftiError('bad-header', filePath, `dim[${i}] is ${dim[i]}, expected >= 1`, dim[i]);
    }
  }
}

/** [nx, ny, nz] padded with 1s, plus later dims up to the last one that is > 1. */
export function volumeDims(header: NiftiHeader): number[] {
  const dims = header.dim.slice(1, header.dim[0] + 1);
  while (dims.length < 3) dims.push(1);
  while (dims.length > 3 && dims[dims.length - 1] === 1) dims.pop();
  return dims;
}

function voxelCount(dims: readonly number[]): number {
  return dims.reduce((n, d) => n * d, 1);
}

// nifti1_io treats a single-file vox_offset inside the header as 352 rather
// than reading the header as voxels; so do we.
function dataOffset(header: NiftiHeader, filePath: string): number {
  const offset = header.voxOffset;
  if (!Number.isInteger(offset) || offset < 0) {
    throw new NiftiError('bad-header', filePath, `vox_offset is ${offset}, expected a non-negative integer`, offset);
  }
  return header.magic === 'n+1' ? Math.max(offset, SINGLE_FILE_VOX_OFFSET) : offset;
}

function decodeVolume(filePath: string, header: NiftiHeader, dataBytes: Buffer, dataPath: string): NiftiVolume {
  const dims = volumeDims(header);
  const raw = decodeVoxels(header, dataBytes, dataPath);
  return {
    path: filePath,
    dims,
    spacing: [voxelSize(header.pixdim[1]), voxelSize(header.pixdim[2]), voxelSize(header.pixdim[3])],
    affine: bestAffine(header),
    data: scaledFloat32(raw, header.sclSlope, header.sclInter),
    raw,
    header,
  };
}

/**
 * A voxel size from pixdim as nibabel (get_zooms) and ITK (GetSpacing) report it: a negative
 * size by its magnitude, and 0 or a non-finite value (no size at all) as 1, which nibabel and
 * nifti1_io both substitute on reading. A size of 0 would make a singular affine and HD95
 * distances of 0 mm.
 */
export function voxelSize(pixdim: number): number {
  return Number.isFinite(pixdim) && pixdim !== 0 ? Math.abs(pixdim) : 1;
}

function decodeVoxels(header: NiftiHeader, bytes: Buffer, dataPath: string): NiftiRawArray {
  const type = datatypeByName(header.datatype);
  const count = voxelCount(header.dim.slice(1, header.dim[0] + 1));
  const offset = dataOffset(header, dataPath);
  const byteLength = count * type.bytes;
  if (bytes.length < offset + byteLength) {
    throw new NiftiError(
      'truncated',
      dataPath,
      `truncated voxel data: expected ${offset + byteLength} bytes (vox_offset ${offset} + ${count} voxels x ${type.bytes} bytes), found ${bytes.length}`,
      bytes.length,
    );
  }
  // A fresh copy: the input may sit at an unaligned offset in Node's buffer
  // pool, and typed arrays need alignment to their element size.
  const copy = new ArrayBuffer(byteLength);
  const copyBytes = Buffer.from(copy);
  bytes.copy(copyBytes, 0, offset, offset + byteLength);
  if (header.littleEndian !== HOST_IS_LITTLE_ENDIAN) swapBytes(copyBytes, type.bytes);
  return type.view(copy, count);
}

function swapBytes(bytes: Buffer, elementBytes: number): void {
  if (elementBytes === 2) bytes.swap16();
  else if (elementBytes === 4) bytes.swap32();
  else if (elementBytes === 8) bytes.swap64();
}

/** Whether scl_slope/scl_inter change the values (slope 0 or non-finite means "unscaled"). */
export function hasScaling(slope: number, inter: number): boolean {
  if (slope === 0 || !Number.isFinite(slope)) return false;
  return slope !== 1 || (Number.isFinite(inter) && inter !== 0);
}

function scaledFloat32(raw: NiftiRawArray, slope: number, inter: number): Float32Array {
  const scaled = hasScaling(slope, inter);
  if (raw instanceof Float32Array && !scaled) return raw;
  const out = new Float32Array(raw.length);
  const m = scaled ? slope : 1;
  const b = scaled && Number.isFinite(inter) ? inter : 0;
  if (raw instanceof BigInt64Array || raw instanceof BigUint64Array) {
    for (let i = 0; i < raw.length; i++) out[i] = Number(raw[i]) * m + b;
  } else if (scaled) {
    for (let i = 0; i < raw.length; i++) out[i] = raw[i] * m + b;
  } else {
    out.set(raw);
  }
  return out;
}

// ---------------------------------------------------------------------------
// Affines

/** The sform matrix (srow_x/y/z), whatever sform_code says. */
export function sformAffine(header: NiftiHeader): Matrix4 {
  const [x, y, z] = header.srow;
  return [[...x], [...y], [...z], [0, 0, 0, 1]] as Matrix4;
}

/**
 * The qform matrix, whatever qform_code says: rotation from the unit
 * quaternion (a, b, c, d) with a = sqrt(1 - b² - c² - d²), times
 * diag(pixdim[1], pixdim[2], qfac * pixdim[3]), plus qoffset.
 */
export function qformAffine(header: NiftiHeader): Matrix4 {
  const [b, c, d] = header.quatern;
  // Stored in float32, b² + c² + d² can exceed 1 by rounding; a is then 0.
  const a = Math.sqrt(Math.max(0, 1 - (b * b + c * c + d * d)));
  const rotation = quaternionToRotation(a, b, c, d);
  const qfac = header.pixdim[0] < 0 ? -1 : 1;
  // Like nifti1_io, a zero or negative voxel size in a qform means "unknown" and is taken as 1.
  const size = (v: number) => (v > 0 ? v : 1);
  const scale = [size(header.pixdim[1]), size(header.pixdim[2]), qfac * size(header.pixdim[3])];
  const row = (r: number): Vec4 => [
    rotation[r][0] * scale[0],
    rotation[r][1] * scale[1],
    rotation[r][2] * scale[2],
    header.qoffset[r],
  ];
  return [row(0), row(1), row(2), [0, 0, 0, 1]];
}

// Dividing by the norm keeps the matrix a rotation when the float32-rounded
// quaternion is not exactly unit length (nibabel's quat2mat does the same).
function quaternionToRotation(a: number, b: number, c: number, d: number): number[][] {
  const norm2 = a * a + b * b + c * c + d * d;
  if (norm2 < 1e-12) return [[1, 0, 0], [0, 1, 0], [0, 0, 1]];
  const s = 2 / norm2;
  return [
    [1 - s * (c * c + d * d), s * (b * c - a * d), s * (b * d + a * c)],
    [s * (b * c + a * d), 1 - s * (b * b + d * d), s * (c * d - a * b)],
    [s * (b * d - a * c), s * (c * d + a * b), 1 - s * (b * b + c * c)],
  ];
}

/**
 * nibabel's fallback when neither qform nor sform is set (Analyze 7.5
 * convention): voxel sizes on the diagonal with x negated, and the grid
 * centre at world 0.
 */
export function analyzeAffine(header: NiftiHeader): Matrix4 {
  const dims = volumeDims(header);
  // nibabel takes the sizes after fixing them on load (voxelSize), so x is always flipped.
  const zoom = [-voxelSize(header.pixdim[1]), voxelSize(header.pixdim[2]), voxelSize(header.pixdim[3])];
  const shift = (axis: number) => -((dims[axis] - 1) / 2) * zoom[axis];
  return [
    [zoom[0], 0, 0, shift(0)],
    [0, zoom[1], 0, shift(1)],
    [0, 0, zoom[2], shift(2)],
    [0, 0, 0, 1],
  ];
}

/** sform if sform_code > 0, else qform if qform_code > 0, else analyzeAffine (nibabel's order). */
export function bestAffine(header: NiftiHeader): Matrix4 {
  if (header.sformCode > 0) return sformAffine(header);
  if (header.qformCode > 0) return qformAffine(header);
  return analyzeAffine(header);
}

// ---------------------------------------------------------------------------
// Writing

/**
 * Writes a .nii or .nii.gz (chosen by extension), little-endian, vox_offset 352,
 * atomically. Throws NiftiError for a volume or name it cannot write, and
 * AtomicWriteError (old file untouched) if the disk write itself fails.
 */
export async function writeNifti(filePath: string, volume: NiftiImageToWrite, options: NiftiWriteOptions = {}): Promise<void> {
  const compress = wantsGzip(filePath);
  const bytes = encodeNifti(volume, options, filePath);
  const out = compress ? await gzipAsync(bytes, gzipOptions(options)) : bytes;
  await writeFileAtomic(filePath, out);
}

/** Synchronous writeNifti. */
export function writeNiftiSync(filePath: string, volume: NiftiImageToWrite, options: NiftiWriteOptions = {}): void {
  const compress = wantsGzip(filePath);
  const bytes = encodeNifti(volume, options, filePath);
  writeFileAtomicSync(filePath, compress ? zlib.gzipSync(bytes, gzipOptions(options)) : bytes);
}

const gzipAsync = promisify(zlib.gzip) as (data: Uint8Array, options: zlib.ZlibOptions) => Promise<Buffer>;

function gzipOptions(options: NiftiWriteOptions): zlib.ZlibOptions {
  return options.gzipLevel === undefined ? {} : { level: options.gzipLevel };
}

function wantsGzip(filePath: string): boolean {
  const lower = filePath.toLowerCase();
  if (lower.endsWith('.nii.gz')) return true;
  if (lower.endsWith('.nii')) return false;
  throw new NiftiError('bad-path', filePath, `cannot tell the format from the name "${path.basename(filePath)}": use .nii or .nii.gz`, filePath);
}

/** The complete uncompressed .nii file (header, empty extension flag, voxels). */
export function encodeNifti(volume: NiftiImageToWrite, options: NiftiWriteOptions = {}, filePath = '<memory>'): Buffer {
  const dims = checkVolumeShape(volume, filePath);
  const type = datatypeByName(writableDatatype(options.datatype ?? 'float32', filePath));
  const geometry = geometryFor(volume, options, dims, filePath);
  const voxels = encodeVoxels(volume.data, type, filePath);
  const scaling = checkedScaling(options.scaling, filePath);
  const file = Buffer.alloc(SINGLE_FILE_VOX_OFFSET + voxels.byteLength);
  writeHeader(file, { dims, type, geometry, description: options.description ?? 'cmseg', ...scaling });
  file.set(voxels, SINGLE_FILE_VOX_OFFSET);
  return file;
}

/** The scl_slope and scl_inter to write: finite, and a slope that is not 0 (which readers take as "unscaled"). */
function checkedScaling(scaling: NiftiWriteOptions['scaling'], filePath: string): { slope: number; inter: number } {
  const slope = scaling?.slope ?? 1;
  const inter = scaling?.inter ?? 0;
  if (!Number.isFinite(slope) || slope === 0 || !Number.isFinite(inter)) {
    throw new NiftiError('bad-volume', filePath, `scaling slope ${slope}, inter ${inter}: both must be finite numbers, the slope not 0`, scaling);
  }
  return { slope, inter };
}

const WRITABLE_DATATYPES: readonly NiftiWriteDatatype[] = ['float32', 'int16', 'uint8'];

// Reading knows more types than writing: a read type such as int32 would be written with
// JavaScript's truncating typed-array stores, unrounded and unchecked, so it is refused.
function writableDatatype(name: string, filePath: string): NiftiWriteDatatype {
  if (!(WRITABLE_DATATYPES as readonly string[]).includes(name)) {
    throw new NiftiError('bad-volume', filePath, `datatype ${JSON.stringify(name)} cannot be written: use ${WRITABLE_DATATYPES.join(', ')}`, name);
  }
  return name as NiftiWriteDatatype;
}

function checkVolumeShape(volume: NiftiImageToWrite, filePath: string): number[] {
  const dims = [...volume.dims];
  if (dims.length < 1 || dims.length > 7 || dims.some((d) => !Number.isInteger(d) || d < 1 || d > 32767)) {
    throw new NiftiError('bad-volume', filePath, `dims ${JSON.stringify(dims)} must be 1 to 7 integers in 1..32767`, dims);
  }
  const expected = voxelCount(dims);
  if (volume.data.length !== expected) {
    throw new NiftiError(
      'bad-volume',
      filePath,
      `data has ${volume.data.length} values but dims ${JSON.stringify(dims)} need ${expected}`,
      volume.data.length,
    );
  }
  return dims;
}

/** The header fields that place the voxel grid in the world. */
interface Geometry {
  pixdim: number[];
  qformCode: number;
  sformCode: number;
  quatern: Vec3;
  qoffset: Vec3;
  srow: [Vec4, Vec4, Vec4];
  xyztUnits: number;
}

function geometryFor(volume: NiftiImageToWrite, options: NiftiWriteOptions, dims: number[], filePath: string): Geometry {
  const source = options.header ?? volume.header;
  if (source) return geometryFromHeader(source, dims, filePath);
  if (volume.affine) return geometryFromAffine(checkedAffine(volume.affine, filePath));
  // Nothing says where the grid is: write "unknown" codes rather than
  // claiming an identity alignment that nobody established.
  return {
    pixdim: [1, 1, 1, 1, 1, 1, 1, 1],
    qformCode: 0,
    sformCode: 0,
    quatern: [0, 0, 0],
    qoffset: [0, 0, 0],
    srow: [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]],
    xyztUnits: 0,
  };
}

// The geometry only means something for the grid it was made for, so the
// spatial dims must agree (a 3D mask may still take a 4D source's geometry).
function geometryFromHeader(source: NiftiHeader, dims: number[], filePath: string): Geometry {
  const sourceDims = volumeDims(source).slice(0, 3);
  const spatialDims = [...dims, 1, 1].slice(0, 3);
  if (sourceDims.some((d, i) => d !== spatialDims[i])) {
    throw new NiftiError(
      'bad-volume',
      filePath,
      `volume grid ${JSON.stringify(spatialDims)} differs from the source header's ${JSON.stringify(sourceDims)}, so its geometry does not apply`,
      spatialDims,
    );
  }
  return {
    pixdim: [...source.pixdim],
    qformCode: source.qformCode,
    sformCode: source.sformCode,
    quatern: [...source.quatern],
    qoffset: [...source.qoffset],
    srow: [[...source.srow[0]], [...source.srow[1]], [...source.srow[2]]],
    xyztUnits: source.xyztUnits,
  };
}

// The first three rows are written as the sform (and give the qform): a NaN there would
// make a file every reader places nowhere, and a short row a TypeError naming nothing.
function checkedAffine(affine: Matrix4, filePath: string): Matrix4 {
  for (let r = 0; r < 3; r++) {
    const row = Array.isArray(affine) ? affine[r] : undefined;
    if (!Array.isArray(row) || row.length < 4) {
      throw new NiftiError('bad-volume', filePath, `affine row ${r} is ${JSON.stringify(row) ?? 'missing'}: the affine is a 4x4 matrix of finite numbers`, row);
    }
    for (let c = 0; c < 4; c++) {
      if (typeof row[c] !== 'number' || !Number.isFinite(row[c])) {
        throw new NiftiError('bad-volume', filePath, `affine[${r}][${c}] = ${String(row[c])}: the affine is a 4x4 matrix of finite numbers`, row[c]);
      }
    }
  }
  return affine;
}

/**
 * sform = the affine exactly; qform = the same transform as voxel sizes,
 * a rotation and qfac, when the affine has no shear. With shear the qform
 * cannot express it, and an approximate second transform in the same file
 * would only disagree with the first, so qform_code is left 0.
 */
function geometryFromAffine(affine: Matrix4): Geometry {
  const column = (j: number): Vec3 => [affine[0][j], affine[1][j], affine[2][j]];
  const columns = [column(0), column(1), column(2)];
  const sizes = columns.map(norm3);
  const srow: [Vec4, Vec4, Vec4] = [[...affine[0]], [...affine[1]], [...affine[2]]];
  const qoffset: Vec3 = [affine[0][3], affine[1][3], affine[2][3]];
  const rotation = orthonormalColumns(columns, sizes);
  const base = { srow, qoffset, sformCode: XFORM_ALIGNED_ANAT, xyztUnits: UNITS_MM };
  if (!rotation) {
    return { ...base, pixdim: [1, ...sizes, 1, 1, 1, 1], qformCode: 0, quatern: [0, 0, 0] };
  }
  // A reflection cannot be a quaternion; NIfTI moves it into qfac, negating the z column.
  const qfac = det3(rotation) < 0 ? -1 : 1;
  if (qfac < 0) for (const row of rotation) row[2] = -row[2];
  return { ...base, pixdim: [qfac, ...sizes, 1, 1, 1, 1], qformCode: XFORM_ALIGNED_ANAT, quatern: rotationToQuaternion(rotation) };
}

function norm3(v: readonly number[]): number {
  return Math.hypot(v[0], v[1], v[2]);
}

function det3(m: number[][]): number {
  return (
    m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1]) -
    m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0]) +
    m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0])
  );
}

/** Row-major 3x3 of the unit columns, or undefined if the columns are not orthonormal after scaling. */
function orthonormalColumns(columns: Vec3[], sizes: number[]): number[][] | undefined {
  if (sizes.some((s) => !(s > 0))) return undefined;
  const unit = columns.map((c, j) => c.map((v) => v / sizes[j]));
  const dot = (p: number[], q: number[]) => p[0] * q[0] + p[1] * q[1] + p[2] * q[2];
  // 1e-4 tolerates the float32 rounding of affines read from other files.
  const tolerance = 1e-4;
  if (Math.abs(dot(unit[0], unit[1])) > tolerance) return undefined;
  if (Math.abs(dot(unit[0], unit[2])) > tolerance) return undefined;
  if (Math.abs(dot(unit[1], unit[2])) > tolerance) return undefined;
  return [0, 1, 2].map((r) => [unit[0][r], unit[1][r], unit[2][r]]);
}

/**
 * Quaternion (b, c, d) with a >= 0 for a proper rotation matrix, computed
 * from whichever of a, b, c, d is largest so that no division is by a
 * small number (Shepperd's method).
 */
function rotationToQuaternion(r: number[][]): Vec3 {
  const trace = r[0][0] + r[1][1] + r[2][2];
  let a: number, b: number, c: number, d: number;
  if (trace > 0) {
    a = 0.5 * Math.sqrt(1 + trace);
    b = (r[2][1] - r[1][2]) / (4 * a);
    c = (r[0][2] - r[2][0]) / (4 * a);
    d = (r[1][0] - r[0][1]) / (4 * a);
  } else if (r[0][0] >= r[1][1] && r[0][0] >= r[2][2]) {
    b = 0.5 * Math.sqrt(1 + r[0][0] - r[1][1] - r[2][2]);
    a = (r[2][1] - r[1][2]) / (4 * b);
    c = (r[0][1] + r[1][0]) / (4 * b);
    d = (r[0][2] + r[2][0]) / (4 * b);
  } else if (r[1][1] >= r[2][2]) {
    c = 0.5 * Math.sqrt(1 + r[1][1] - r[0][0] - r[2][2]);
    a = (r[0][2] - r[2][0]) / (4 * c);
    b = (r[0][1] + r[1][0]) / (4 * c);
    d = (r[1][2] + r[2][1]) / (4 * c);
  } else {
    d = 0.5 * Math.sqrt(1 + r[2][2] - r[0][0] - r[1][1]);
    a = (r[1][0] - r[0][1]) / (4 * d);
    b = (r[0][2] + r[2][0]) / (4 * d);
    c = (r[1][2] + r[2][1]) / (4 * d);
  }
  // The header has no field for a: it is implied positive, so flip the sign of all four if needed.
  return a < 0 ? [-b, -c, -d] : [b, c, d];
}

const INTEGER_RANGES: Partial<Record<NiftiDatatype, [number, number]>> = {
  uint8: [0, 255],
  int16: [-32768, 32767],
};

/** Voxels in the requested type, little-endian bytes. */
function encodeVoxels(data: ArrayLike<number>, type: DatatypeInfo, filePath: string): Uint8Array {
  const buffer = new ArrayBuffer(data.length * type.bytes);
  const out = type.view(buffer, data.length) as Float32Array | Int16Array | Uint8Array;
  const range = INTEGER_RANGES[type.name];
  if (!range) {
    out.set(data);
  } else {
    for (let i = 0; i < data.length; i++) out[i] = roundedInRange(data[i], i, range, type.name, filePath);
  }
  const bytes = Buffer.from(buffer);
  if (!HOST_IS_LITTLE_ENDIAN) swapBytes(bytes, type.bytes);
  return bytes;
}

// Rounding (not truncation) so that 2.9999998 from float arithmetic stays
// label 3; anything outside the type's range is an error, never a silent wrap.
function roundedInRange(value: number, index: number, [low, high]: [number, number], name: string, filePath: string): number {
  const rounded = Math.round(value);
  if (!(rounded >= low && rounded <= high)) {
    throw new NiftiError('bad-volume', filePath, `value ${value} at index ${index} does not fit ${name} (${low}..${high})`, value);
  }
  return rounded;
}

interface HeaderContent {
  dims: number[];
  type: DatatypeInfo;
  geometry: Geometry;
  description: string;
  slope: number;
  inter: number;
}

function writeHeader(file: Buffer, { dims, type, geometry, description, slope, inter }: HeaderContent): void {
  file.writeInt32LE(HEADER_BYTES, FIELD_OFFSET.sizeofHdr);
  // Analyze readers look for regular = 'r'; harmless for everyone else.
  file.write('r', 38, 'latin1');
  file.writeInt16LE(dims.length, FIELD_OFFSET.dim);
  for (let i = 1; i <= 7; i++) file.writeInt16LE(dims[i - 1] ?? 1, FIELD_OFFSET.dim + 2 * i);
  file.writeInt16LE(type.code, FIELD_OFFSET.datatype);
  file.writeInt16LE(type.bytes * 8, FIELD_OFFSET.bitpix);
  geometry.pixdim.forEach((v, i) => file.writeFloatLE(v, FIELD_OFFSET.pixdim + 4 * i));
  file.writeFloatLE(SINGLE_FILE_VOX_OFFSET, FIELD_OFFSET.voxOffset);
  // slope 1 / inter 0 (the default): stored values are the values, for every reader.
  file.writeFloatLE(slope, FIELD_OFFSET.sclSlope);
  file.writeFloatLE(inter, FIELD_OFFSET.sclInter);
  file.writeUInt8(geometry.xyztUnits, FIELD_OFFSET.xyztUnits);
  file.write(description.slice(0, 79), FIELD_OFFSET.descrip, 'latin1');
  file.writeInt16LE(geometry.qformCode, FIELD_OFFSET.qformCode);
  file.writeInt16LE(geometry.sformCode, FIELD_OFFSET.sformCode);
  geometry.quatern.forEach((v, i) => file.writeFloatLE(v, FIELD_OFFSET.quatern + 4 * i));
  geometry.qoffset.forEach((v, i) => file.writeFloatLE(v, FIELD_OFFSET.qoffset + 4 * i));
  const rowOffsets = [FIELD_OFFSET.srowX, FIELD_OFFSET.srowY, FIELD_OFFSET.srowZ];
  geometry.srow.forEach((row, r) => row.forEach((v, i) => file.writeFloatLE(v, rowOffsets[r] + 4 * i)));
  file.write('n+1\0', FIELD_OFFSET.magic, 'latin1');
  // Bytes 348..351 stay 0: no header extensions follow.
}

/** Whether a file name is a NIfTI file's (.nii or .nii.gz, any case). */
export function isNiftiName(name: string): boolean {
  return /\.nii(\.gz)?$/i.test(name);
}
