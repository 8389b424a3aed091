// The preprocessed BraTS cache (`cmseg prepare`): every case is read, preprocessed
// (src/data/brats.ts), given its synthetic annotators (SPEC section 7) and written once
// into one compact binary file, so that training reads patches without touching NIfTI
// or gzip again (the MONAI / nnU-Net workflow).
//
// Folder layout:
//   CACHE/index.json           what is in the cache (format below), rewritten atomically as cases are added
//                              (after every real-size case; see CacheIndexWriter)
//   CACHE/cases/<id>.bin       one file per case, written atomically
//   CACHE/cases/<fusion>/<id>.bin  the case's annotator maps fused by multi-label or spatial
//                              STAPLE (written on demand by src/fusion/fuse-cache.ts, for the
//                              naive-staple / naive-spatial-staple training targets; see
//                              "Fused training labels" below)
//   CACHE/.prepare.lock        present while a prepareCache or a fusion runs (holds its pid)
//
// Case file (little-endian):
//   bytes 0..7     magic "CMSEGCA1"
//   bytes 8..11    uint32 n: length of the JSON header
//   bytes 12..     n bytes of UTF-8 JSON (CaseFileHeader), zero padding to a multiple of 64
//   sections       each starting at a multiple of 64, at the offsets the header gives:
//                  images     [C, D, H, W] float32 or float16 (IEEE binary16, round to nearest even)
//                  consensus  [D, H, W] uint8, classes 0..3
//                  labels r   [D, H, W] uint8 per annotator that labelled the case (absent ones
//                             have no section; readers fill them with 255)
//                  foreground uint32 voxel indices (into [D, H, W]) of tumour voxels, evenly
//                             subsampled to at most maxLocations: one list from the consensus,
//                             one from the union of the present annotators' foreground
//
// index.json: { format: "cmseg-brats-cache", version, settings (annotators, names, mode,
// seed, dtype, margin, classes, modalities, maxLocations, labelScheme only when not 'brats'),
// channels, classes, names,
// cases: [{ id, file, shape [C,D,H,W], crop, original {dims, affine, spacing}, present,
// naming, sources [{file, size, mtimeMs}], labelCounts, foreground {consensus, annotators},
// bytes, fused? {<fusion>: {file, bytes, from {size, mtimeMs}, options, ms}} }] }.
//
// Incremental: a case whose source files have the size and mtime recorded in the index,
// and whose case file is still there with the recorded size, is skipped. A run killed at
// any point leaves a valid cache holding the cases its index lists (every finished case once
// a run returns or stops; one killed outright may leave its last few case files unlisted,
// see CacheIndexWriter); the next run resumes, preparing the unlisted ones again.

import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import {
  type AnnotatorSpec,
  type LabelMode,
  UNLABELLED,
  annotatorNames,
  simulateAnnotators,
} from './annotators';
import {
  BRATS_CHANNELS,
  BRATS_CLASSES,
  BRATS_LABEL_SCHEMES,
  BRATS_MODALITIES,
  type BratsCase,
  type BratsLabelScheme,
  type BratsNaming,
  type ChannelStats,
  type CropBox,
  type PreprocessedBratsCase,
  type VolumeGeometry,
  bratsCaseFiles,
  discoverBratsCases,
  emptyModalitiesNote,
  loadBratsCase,
  preprocessBratsCase,
} from './brats';
import { acquireFolderLock, AtomicWriteError, type FileLock, LockHeldError, lockHolderText, makeFolder, writeFileAtomic, writeFileAtomicSync } from './files';
import { type Extent } from './morphology';
import { type NiftiHeader } from './nifti';
import { Rng } from './random';

// ---------------------------------------------------------------------------
// float16 (IEEE 754 binary16)

const f32Scratch = new Float32Array(1);
const u32Scratch = new Uint32Array(f32Scratch.buffer);

/** The binary16 bit pattern nearest to `value` (ties to even); overflow gives +-Infinity, NaN stays NaN. */
export function float32ToFloat16Bits(value: number): number {
  f32Scratch[0] = value;
  const x = u32Scratch[0];
  const sign = (x >>> 16) & 0x8000;
  const exponent = (x >>> 23) & 0xff;
  const mantissa = x & 0x7fffff;
  if (exponent === 0xff) return sign | 0x7c00 | (mantissa ? 0x200 | (mantissa >>> 13) : 0);
  const e = exponent - 127 + 15;
  if (e >= 31) return sign | 0x7c00;
  if (e <= 0) {
    // Subnormal half (or zero): the 24-bit significand shifted into units of 2^-24.
    if (e < -10) return sign; // below half the smallest subnormal: rounds to zero
    const significand = mantissa | 0x800000;
    const shift = 14 - e;
    let half = significand >>> shift;
    const rest = significand & ((1 << shift) - 1);
    const halfway = 1 << (shift - 1);
    if (rest > halfway || (rest === halfway && (half & 1) === 1)) half++;
    return sign | half;
  }
  let half = (e << 10) | (mantissa >>> 13);
  const rest = mantissa & 0x1fff;
  // A carry out of the mantissa correctly bumps the exponent (up to Infinity).
  if (rest > 0x1000 || (rest === 0x1000 && (half & 1) === 1)) half++;
  return sign | half;
}

/** The value of a binary16 bit pattern. */
export function float16BitsToFloat32(bits: number): number {
  const sign = bits & 0x8000 ? -1 : 1;
  const exponent = (bits >>> 10) & 0x1f;
  const mantissa = bits & 0x3ff;
  if (exponent === 0) return sign * mantissa * 2 ** -24;
  if (exponent === 31) return mantissa ? NaN : sign * Infinity;
  return sign * (1 + mantissa / 1024) * 2 ** (exponent - 15);
}

let float16Table: Float32Array | undefined;

/** All 65536 binary16 values as float32: decoding is one lookup per value. */
export function float16DecodeTable(): Float32Array {
  if (!float16Table) {
    float16Table = new Float32Array(65536);
    for (let bits = 0; bits < 65536; bits++) float16Table[bits] = float16BitsToFloat32(bits);
  }
  return float16Table;
}

export function encodeFloat16(values: Float32Array, out = new Uint16Array(values.length)): Uint16Array {
  for (let i = 0; i < values.length; i++) out[i] = float32ToFloat16Bits(values[i]);
  return out;
}

export function decodeFloat16(bits: Uint16Array, out = new Float32Array(bits.length)): Float32Array {
  const table = float16DecodeTable();
  for (let i = 0; i < bits.length; i++) out[i] = table[bits[i]];
  return out;
}

// ---------------------------------------------------------------------------
// Errors

export type CacheErrorKind = 'bad-index' | 'bad-case-file' | 'settings-changed' | 'locked' | 'read-only' | 'unknown-case' | 'missing-seg' | 'big-endian';

export class CacheError extends Error {
  constructor(
    readonly kind: CacheErrorKind,
    /** The file concerned. */
    readonly path: string,
    message: string,
    readonly value?: unknown,
    options?: { cause?: unknown },
  ) {
    super(message, options);
    this.name = 'CacheError';
  }
}

function requireLittleEndianHost(where: string): void {
  // Sections are read as typed arrays in host order; every platform Node supports in
  // practice is little-endian, so we refuse rather than carry a byte-swapping path.
  if (os.endianness() !== 'LE') throw new CacheError('big-endian', where, 'the BraTS cache needs a little-endian host', os.endianness());
}

// ---------------------------------------------------------------------------
// Formats

export const CACHE_FORMAT = 'cmseg-brats-cache';
export const CACHE_VERSION = 1;
export const CASE_FILE_MAGIC = 'CMSEGCA1';
export const CASE_FILE_FORMAT = 'cmseg-brats-case';
const SECTION_ALIGN = 64;

export type CacheDtype = 'float16' | 'float32';

/** SPEC section 8, brats3d (R = 3): over-, under-segmentation and wrong class (BraTS permutation). */
export const BRATS_DEFAULT_ANNOTATORS: readonly AnnotatorSpec[] = [{ kind: 'over' }, { kind: 'under' }, { kind: 'wrong' }];

/** Default cap on the stored foreground voxel indices per list. */
export const DEFAULT_MAX_LOCATIONS = 10000;

/** Everything that changes what a cached case contains: a cache holds one setting only. */
export interface CacheSettings {
  annotators: AnnotatorSpec[];
  names: string[];
  mode: LabelMode;
  seed: number;
  dtype: CacheDtype;
  margin: number;
  classes: number;
  modalities: string[];
  maxLocations: number;
  /**
   * How the segmentations were read (src/data/brats.ts): absent for 'brats' (by the file
   * names' release; caches made before the setting existed have none), 'peds2024' for
   * BraTS-PEDs 2024 files. The consensus and annotators are our classes 0..3 either way.
   */
  labelScheme?: BratsLabelScheme;
}

/** The label scheme a cache's segmentations were read with ('brats' when the index records none). */
export function cacheLabelScheme(index: Pick<CacheIndex, 'settings'>): BratsLabelScheme {
  return index.settings.labelScheme ?? 'brats';
}

export interface Section {
  offset: number;
  bytes: number;
}

export interface LocationSection extends Section {
  /** Indices stored. */
  count: number;
  /** Foreground voxels in the case before subsampling. */
  total: number;
}

/** The JSON header of a case file. */
export interface CaseFileHeader {
  format: typeof CASE_FILE_FORMAT;
  version: number;
  id: string;
  /** [C, D, H, W]. */
  shape: [number, number, number, number];
  dtype: CacheDtype;
  classes: number;
  names: string[];
  /** present[r] = 1 when annotator r labelled this case. */
  present: number[];
  sections: {
    images: Section;
    consensus: Section;
    /** null for an annotator who did not label the case. */
    labels: (Section | null)[];
    foreground: { consensus: LocationSection; annotators: LocationSection };
  };
  crop: CropBox;
  original: VolumeGeometry;
  /** Header of the case's t1 file, for writing predictions with the exact source geometry. */
  niftiHeader?: NiftiHeader;
  stats: ChannelStats[];
  /** Consensus voxels per class. */
  labelCounts: number[];
}

export interface SourceFile {
  /** Path relative to the data folder. */
  file: string;
  size: number;
  mtimeMs: number;
}

export interface CacheIndexEntry {
  id: string;
  /** Case file, relative to the cache folder. */
  file: string;
  shape: [number, number, number, number];
  crop: CropBox;
  original: VolumeGeometry;
  present: number[];
  naming: BratsNaming;
  sources: SourceFile[];
  labelCounts: number[];
  foreground: { consensus: number; annotators: number };
  bytes: number;
  /** Fused label maps of this case, by fusion; absent until a STAPLE baseline first needs them. */
  fused?: Partial<Record<CacheFusion, FusedLabelsRecord>>;
}

export interface CacheIndex {
  format: typeof CACHE_FORMAT;
  version: number;
  settings: CacheSettings;
  channels: number;
  classes: number;
  names: string[];
  cases: CacheIndexEntry[];
}

export const CACHE_INDEX_FILE = 'index.json';
const CASES_FOLDER = 'cases';
const LOCK_FILE = '.prepare.lock';

export function cacheIndexPath(cacheDir: string): string {
  return path.join(cacheDir, CACHE_INDEX_FILE);
}

/** Reads and checks index.json. Throws CacheError('bad-index') for anything unexpected. */
export function readCacheIndex(cacheDir: string): CacheIndex {
  const file = cacheIndexPath(cacheDir);
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') {
      throw new CacheError('bad-index', file, `no BraTS cache at ${cacheDir} (${file} not found): run \`cmseg prepare\` first`, file, { cause: err });
    }
    throw err;
  }
  let index: CacheIndex;
  try {
    index = JSON.parse(text) as CacheIndex;
  } catch (err) {
    throw new CacheError('bad-index', file, `${file} is not valid JSON: ${(err as Error).message}; prepare the cache again (cmseg prepare --rebuild)`, text.slice(0, 80), { cause: err });
  }
  if (index?.format !== CACHE_FORMAT || !Array.isArray(index.cases) || !index.settings) {
    throw new CacheError('bad-index', file, `${file} is not a cmseg BraTS cache index (format ${JSON.stringify(index?.format)})`, index?.format);
  }
  if (index.version !== CACHE_VERSION) {
    throw new CacheError('bad-index', file, `${file} has cache version ${index.version}; this cmseg reads version ${CACHE_VERSION}: prepare it again (cmseg prepare --rebuild; without --rebuild prepare reads this index too)`, index.version);
  }
  return index;
}

function alignUp(n: number): number {
  return Math.ceil(n / SECTION_ALIGN) * SECTION_ALIGN;
}

/** Evenly spaced subsample of at most `max` of the indices where `keep` is true. */
function foregroundLocations(voxels: number, max: number, keep: (i: number) => boolean): { locations: Uint32Array; total: number } {
  const all: number[] = [];
  for (let i = 0; i < voxels; i++) if (keep(i)) all.push(i);
  if (all.length <= max) return { locations: Uint32Array.from(all), total: all.length };
  const locations = new Uint32Array(max);
  for (let k = 0; k < max; k++) locations[k] = all[Math.floor(((k + 0.5) * all.length) / max)];
  return { locations, total: all.length };
}

/** What goes into one case file. */
export interface CaseFileContent {
  id: string;
  extent: Extent;
  channels: number;
  classes: number;
  /** [C, D, H, W] float32 (converted to `dtype` on writing). */
  images: Float32Array;
  consensus: Uint8Array;
  names: string[];
  /** One map per annotator; only those with present[r] = 1 are stored. */
  labels: Uint8Array[];
  present: ArrayLike<number>;
  crop: CropBox;
  original: VolumeGeometry;
  niftiHeader?: NiftiHeader;
  stats: ChannelStats[];
}

/** The bytes of a case file. */
export function encodeCaseFile(content: CaseFileContent, dtype: CacheDtype, maxLocations = DEFAULT_MAX_LOCATIONS): { bytes: Buffer; header: CaseFileHeader } {
  requireLittleEndianHost('<case file>');
  const { d, h, w } = content.extent;
  const voxels = d * h * w;
  if (content.images.length !== content.channels * voxels || content.consensus.length !== voxels) {
    throw new RangeError(`case ${content.id}: images/consensus sizes do not match ${content.channels}x${d}x${h}x${w}`);
  }
  const imageBytes = dtype === 'float16' ? new Uint8Array(encodeFloat16(content.images).buffer) : new Uint8Array(content.images.buffer, content.images.byteOffset, content.images.byteLength);
  const present = Array.from(content.present, (p) => (p ? 1 : 0));
  const labelCounts = new Array<number>(content.classes).fill(0);
  for (let i = 0; i < voxels; i++) labelCounts[content.consensus[i]]++;
  const fromConsensus = foregroundLocations(voxels, maxLocations, (i) => content.consensus[i] !== 0);
  const presentLabels = content.labels.filter((_, r) => present[r]);
  const fromAnnotators = foregroundLocations(voxels, maxLocations, (i) => {
    for (const labels of presentLabels) if (labels[i] !== 0 && labels[i] !== UNLABELLED) return true;
    return false;
  });

  // Lay the sections out after a header whose size depends on the offsets: fix the header
  // size by laying out twice (the second pass cannot change the padded length in practice,
  // and we check that it did not).
  const payloads: Uint8Array[] = [];
  let header!: CaseFileHeader;
  let dataStart = 0;
  for (let attempt = 0; attempt < 3; attempt++) {
    payloads.length = 0;
    let offset = dataStart;
    const place = (data: Uint8Array): Section => {
      const section = { offset, bytes: data.byteLength };
      payloads.push(data);
      offset = alignUp(offset + data.byteLength);
      return section;
    };
    const images = place(imageBytes);
    const consensus = place(content.consensus);
    const labels = content.labels.map((map, r) => (present[r] ? place(map) : null));
    const asBytes = (a: Uint32Array) => new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
    const consensusLocations = { ...place(asBytes(fromConsensus.locations)), count: fromConsensus.locations.length, total: fromConsensus.total };
    const annotatorLocations = { ...place(asBytes(fromAnnotators.locations)), count: fromAnnotators.locations.length, total: fromAnnotators.total };
    header = {
      format: CASE_FILE_FORMAT,
      version: CACHE_VERSION,
      id: content.id,
      shape: [content.channels, d, h, w],
      dtype,
      classes: content.classes,
      names: content.names,
      present,
      sections: { images, consensus, labels, foreground: { consensus: consensusLocations, annotators: annotatorLocations } },
      crop: content.crop,
      original: content.original,
      ...(content.niftiHeader ? { niftiHeader: content.niftiHeader } : {}),
      stats: content.stats,
      labelCounts,
    };
    const needed = alignUp(12 + Buffer.byteLength(JSON.stringify(header)));
    if (needed === dataStart) break;
    dataStart = needed;
  }
  const json = Buffer.from(JSON.stringify(header), 'utf8');
  if (alignUp(12 + json.byteLength) !== dataStart) throw new Error(`internal: case file header of ${content.id} did not settle`);
  const last = header.sections.foreground.annotators; // the last section placed
  const bytes = Buffer.alloc(last.offset + last.bytes);
  bytes.write(CASE_FILE_MAGIC, 0, 'latin1');
  bytes.writeUInt32LE(json.byteLength, 8);
  json.copy(bytes, 12);
  const sections = [header.sections.images, header.sections.consensus, ...header.sections.labels.filter((s): s is Section => s !== null), header.sections.foreground.consensus, header.sections.foreground.annotators];
  sections.forEach((section, k) => bytes.set(payloads[k], section.offset));
  return { bytes, header };
}

function parseCaseHeader(prefix: Buffer, filePath: string): { header: CaseFileHeader; jsonBytes: number } {
  if (prefix.byteLength < 12 || prefix.toString('latin1', 0, 8) !== CASE_FILE_MAGIC) {
    throw new CacheError('bad-case-file', filePath, `${filePath} is not a cmseg case file (magic ${JSON.stringify(prefix.toString('latin1', 0, 8))})`);
  }
  const jsonBytes = prefix.readUInt32LE(8);
  if (prefix.byteLength < 12 + jsonBytes) return { header: undefined as unknown as CaseFileHeader, jsonBytes };
  let header: CaseFileHeader;
  try {
    header = JSON.parse(prefix.toString('utf8', 12, 12 + jsonBytes)) as CaseFileHeader;
  } catch (err) {
    throw new CacheError('bad-case-file', filePath, `${filePath}: header is not valid JSON`, undefined, { cause: err });
  }
  if (header.format !== CASE_FILE_FORMAT || header.version !== CACHE_VERSION) {
    throw new CacheError('bad-case-file', filePath, `${filePath}: unsupported case file format ${header.format} version ${header.version}`, header.version);
  }
  return { header, jsonBytes };
}

/** A case decoded from the cache. */
export interface CachedCase {
  id: string;
  /** [C, D, H, W]. */
  shape: [number, number, number, number];
  extent: Extent;
  channels: number;
  classes: number;
  names: string[];
  /** z-scored intensities [C, D, H, W] (float16 caches decoded to float32). */
  images: Float32Array;
  consensus: Uint8Array;
  /** One [D, H, W] map per annotator; 255 everywhere for an annotator who did not label the case. */
  labels: Uint8Array[];
  present: Uint8Array;
  crop: CropBox;
  original: VolumeGeometry;
  niftiHeader?: NiftiHeader;
  stats: ChannelStats[];
  foreground: { consensus: Uint32Array; annotators: Uint32Array };
}

/** Decodes a whole case file held in memory. */
export function decodeCaseFile(bytes: Buffer, filePath = '<memory>'): CachedCase {
  requireLittleEndianHost(filePath);
  const { header, jsonBytes } = parseCaseHeader(bytes, filePath);
  if (!header) throw new CacheError('bad-case-file', filePath, `${filePath} is truncated inside its header (${jsonBytes} bytes announced)`, bytes.byteLength);
  const [channels, d, h, w] = header.shape;
  const voxels = d * h * w;
  const view = (section: Section): Uint8Array => {
    if (section.offset + section.bytes > bytes.byteLength) {
      throw new CacheError('bad-case-file', filePath, `${filePath} is truncated: a section ends at byte ${section.offset + section.bytes}, the file has ${bytes.byteLength}`, bytes.byteLength);
    }
    // Copy into a fresh, aligned buffer: typed arrays over it need alignment, and callers may keep it.
    return new Uint8Array(bytes.subarray(section.offset, section.offset + section.bytes));
  };
  const raw = view(header.sections.images);
  const images = header.dtype === 'float16'
    ? decodeFloat16(new Uint16Array(raw.buffer, 0, channels * voxels))
    : new Float32Array(raw.buffer, 0, channels * voxels);
  const labels = header.sections.labels.map((section) => (section ? view(section) : new Uint8Array(voxels).fill(UNLABELLED)));
  const locations = (section: LocationSection) => new Uint32Array(view(section).buffer, 0, section.count);
  return {
    id: header.id,
    shape: header.shape,
    extent: { d, h, w },
    channels,
    classes: header.classes,
    names: header.names,
    images,
    consensus: view(header.sections.consensus),
    labels,
    present: Uint8Array.from(header.present),
    crop: header.crop,
    original: header.original,
    ...(header.niftiHeader ? { niftiHeader: header.niftiHeader } : {}),
    stats: header.stats,
    foreground: { consensus: locations(header.sections.foreground.consensus), annotators: locations(header.sections.foreground.annotators) },
  };
}

/** Loads one cached case by id. Pass the index when reading many cases. */
export async function readCachedCase(cacheDir: string, id: string, index: CacheIndex = readCacheIndex(cacheDir)): Promise<CachedCase> {
  const entry = index.cases.find((c) => c.id === id);
  if (!entry) {
    const known = index.cases.slice(0, 5).map((c) => c.id).join(', ');
    throw new CacheError('unknown-case', cacheIndexPath(cacheDir), `case ${id} is not in the cache at ${cacheDir} (it has ${index.cases.length} cases: ${known}${index.cases.length > 5 ? ', ...' : ''})`, id);
  }
  const file = path.join(cacheDir, entry.file);
  let bytes: Buffer;
  try {
    bytes = await fs.promises.readFile(file);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') {
      throw new CacheError('bad-case-file', file, `case file ${file} of case ${id} is missing: run \`cmseg prepare\` again`, file, { cause: err });
    }
    throw err;
  }
  // A file cut short (disk full, a partial copy of the cache) names its case and the fix, not
  // only a section offset; prepare redoes a case whose file lacks the recorded size.
  if (typeof entry.bytes === 'number' && bytes.byteLength !== entry.bytes) throw caseFileSizeError(file, id, bytes.byteLength, entry.bytes);
  return decodeCaseFile(bytes, file);
}

function caseFileSizeError(file: string, id: string, size: number, recorded: number): CacheError {
  return new CacheError(
    'bad-case-file',
    file,
    `case file ${file} of case ${id} has ${size} bytes, but cmseg prepare wrote ${recorded}: it was ${size < recorded ? 'cut short' : 'changed'} since; ` +
      'run `cmseg prepare` with the same --data and --out again (it prepares that case again)',
    size,
  );
}

/**
 * The cases among `entries` whose case file is missing or has another size than prepare
 * recorded (a truncated or replaced file), as CacheErrors naming each: checked once when a
 * reader of many cases starts (the patch loader), so that a damaged case stops training
 * before its first step rather than at the first patch, or never (a patch that happens to
 * read only intact rows).
 */
export function damagedCaseFiles(cacheDir: string, entries: readonly CacheIndexEntry[]): { id: string; error: CacheError }[] {
  const problems: { id: string; error: CacheError }[] = [];
  for (const entry of entries) {
    const file = path.join(cacheDir, entry.file);
    let size: number;
    try {
      size = fs.statSync(file).size;
    } catch {
      problems.push({ id: entry.id, error: new CacheError('bad-case-file', file, `case file ${file} of case ${entry.id} is missing: run \`cmseg prepare\` again`, file) });
      continue;
    }
    if (typeof entry.bytes === 'number' && size !== entry.bytes) problems.push({ id: entry.id, error: caseFileSizeError(file, entry.id, size, entry.bytes) });
  }
  return problems;
}

/** One message for the damagedCaseFiles of a cache: the case's own when one, else the cases named and the remedy. */
export function damagedCasesMessage(cacheDir: string, damaged: readonly { id: string; error: CacheError }[]): string {
  if (damaged.length === 1) return damaged[0].error.message;
  const ids = damaged.slice(0, 5).map((d) => d.id).join(', ') + (damaged.length > 5 ? ', ...' : '');
  return (
    `${damaged.length} case files in ${path.join(cacheDir, 'cases')} are missing or not as cmseg prepare wrote them (cases ${ids}): ` +
    'run `cmseg prepare` with the same --data and --out again (it prepares those cases again)'
  );
}

/**
 * A cached case as it is scored: with every annotator's labels. SPEC section 7's single
 * mode thins the labels of the training cases only; validation and test cases are scored
 * with every annotator (as MNIST's are), so that each annotator's CM estimate is compared
 * on every case. A cache prepared in single mode stores one annotator per case (what
 * training reads); the others are simulated here from the consensus with the case's seed.
 * Each annotator's map comes from its own random stream, so the stored annotator's map
 * comes out unchanged. A dense cache's case is returned as read.
 */
export async function readCachedCaseForScoring(cacheDir: string, id: string, index: CacheIndex = readCacheIndex(cacheDir)): Promise<CachedCase> {
  const c = await readCachedCase(cacheDir, id, index);
  if (index.settings.mode !== 'single') return c;
  const dense = simulateAnnotators(c.consensus, c.extent, c.classes, index.settings.annotators, {
    seed: caseSeed(index.settings.seed, id),
    mode: 'dense',
  });
  return { ...c, labels: dense.labels, present: dense.present };
}

/** Reads `length` bytes at `position` of an open file into `into`; a short file is a CacheError. */
function readExactly(fd: number, filePath: string, into: Buffer, length: number, position: number): Buffer {
  let done = 0;
  while (done < length) {
    const n = fs.readSync(fd, into, done, length - done, position + done);
    if (n === 0) throw new CacheError('bad-case-file', filePath, `${filePath} is truncated at byte ${position + done}`, position + done);
    done += n;
  }
  return into.subarray(0, length);
}

/** Where the last section of a case file ends: the size of a complete file. */
function caseFileEnd(header: CaseFileHeader): number {
  const { images, consensus, labels, foreground } = header.sections;
  const sections = [images, consensus, ...labels.filter((s): s is Section => s !== null), foreground.consensus, foreground.annotators];
  return Math.max(...sections.map((s) => s.offset + s.bytes));
}

/**
 * Opens a cache file and parses its header (magic, length, JSON), reading more than the
 * first 4 KiB only when the header is longer. The caller owns the returned descriptor.
 */
function openWithHeader<H>(
  filePath: string,
  parse: (prefix: Buffer, filePath: string) => { header?: H; jsonBytes: number },
): { fd: number; header: H } {
  requireLittleEndianHost(filePath);
  const fd = fs.openSync(filePath, 'r');
  try {
    let prefix = Buffer.alloc(4096);
    let got = fs.readSync(fd, prefix, 0, prefix.byteLength, 0);
    let parsed = parse(prefix.subarray(0, got), filePath);
    if (!parsed.header) {
      prefix = Buffer.alloc(12 + parsed.jsonBytes);
      got = fs.readSync(fd, prefix, 0, prefix.byteLength, 0);
      parsed = parse(prefix.subarray(0, got), filePath);
      if (!parsed.header) throw new CacheError('bad-case-file', filePath, `${filePath} is truncated inside its header`, got);
    }
    return { fd, header: parsed.header };
  } catch (err) {
    fs.closeSync(fd);
    throw err;
  }
}

/**
 * Random access to one case file without reading it whole: the patch loader reads the
 * rows a patch needs, slice by slice. Synchronous (meant for worker threads).
 */
export class CaseFileReader {
  private constructor(
    readonly path: string,
    private fd: number,
    readonly header: CaseFileHeader,
  ) {}

  static open(filePath: string): CaseFileReader {
    const { fd, header } = openWithHeader(filePath, parseCaseHeader);
    // Every section must be in the file: a truncated one would otherwise surface only when a
    // patch reads past the end, and a cut location list (the file's last section) not at all
    // (readLocation read zeros: patches centred on voxel 0).
    const size = fs.fstatSync(fd).size;
    const end = caseFileEnd(header);
    if (size < end) {
      fs.closeSync(fd);
      throw new CacheError(
        'bad-case-file',
        filePath,
        `case file ${filePath} of case ${header.id} is truncated: its sections end at byte ${end}, the file has ${size}; run \`cmseg prepare\` again (it prepares that case again)`,
        size,
      );
    }
    return new CaseFileReader(filePath, fd, header);
  }

  /**
   * Reads `rows` rows starting at row y0 of slice z of a [.., D, H, W] section (plane
   * `plane`: the channel for images, 0 for label maps) into `into` (which must hold
   * rows * W * elementBytes bytes) and returns the filled part.
   */
  readRows(section: Section, elementBytes: number, plane: number, z: number, y0: number, rows: number, into: Buffer): Buffer {
    const [, d, h, w] = this.header.shape;
    const start = section.offset + (((plane * d + z) * h + y0) * w) * elementBytes;
    return readExactly(this.fd, this.path, into, rows * w * elementBytes, start);
  }

  /** A whole section (e.g. one annotator's label map) into a fresh buffer. */
  readSection(section: Section): Uint8Array {
    return readExactly(this.fd, this.path, Buffer.alloc(section.bytes), section.bytes, section.offset);
  }

  /** The k-th stored foreground voxel index of a location list. */
  readLocation(section: LocationSection, k: number): number {
    // readExactly: a short read must not leave zeros that read as voxel 0.
    return readExactly(this.fd, this.path, Buffer.alloc(4), 4, section.offset + 4 * k).readUInt32LE(0);
  }

  close(): void {
    if (this.fd >= 0) fs.closeSync(this.fd);
    this.fd = -1;
  }
}

// ---------------------------------------------------------------------------
// Fused training labels
//
// The naive-staple / naive-spatial-staple baselines train on one fused map per case.
// STAPLE estimates each rater's performance per subject (as SimpleITK's filters are used,
// one image at a time), so every case is fused on its own, once, and the map is kept
// beside the case file (src/fusion/fuse-cache.ts writes it):
//
//   CACHE/cases/<fusion>/<id>.bin
//   bytes 0..7     magic "CMSEGFU1"
//   bytes 8..11    uint32 n: length of the JSON header (FusedFileHeader)
//   bytes 12..     n bytes of UTF-8 JSON, zero padding to a multiple of 64
//   labels         [D, H, W] uint8 at the offset the header gives (255 where nobody labelled)
//
// and recorded in the case's index entry as fused[<fusion>]. A fused map is current when
// that record exists with the fusion options asked for, the case file still has the size
// and mtime the map was fused from (a case prepared again is a new file), and the fused
// file has the recorded size. Anything else (never fused, case re-prepared, other options,
// a deleted or truncated file) means fusing again. The fused file is written atomically
// before the index names it, so a run killed in between only costs that case's fusion.

/** Fusions whose maps the cache keeps. */
export type CacheFusion = 'multi-staple' | 'spatial-staple';
export const FUSED_FILE_MAGIC = 'CMSEGFU1';
export const FUSED_FILE_FORMAT = 'cmseg-brats-fused';

/** A case file's size and mtime: identifies the labels a fused map was computed from. */
export interface FileStamp {
  size: number;
  mtimeMs: number;
}

/** cases[k].fused[fusion] in index.json. */
export interface FusedLabelsRecord {
  /** Fused file, relative to the cache folder. */
  file: string;
  bytes: number;
  /** The case file it was fused from. */
  from: FileStamp;
  /** The fuse() options used (src/fusion/fuse.ts), compared as JSON. */
  options: Record<string, unknown>;
  /** Wall time of the fusion. */
  ms: number;
}

/** The JSON header of a fused file. */
export interface FusedFileHeader {
  format: typeof FUSED_FILE_FORMAT;
  version: number;
  id: string;
  fusion: CacheFusion;
  /** [D, H, W], the case's. */
  shape: [number, number, number];
  classes: number;
  /** The annotators fused (the case's names and presence). */
  names: string[];
  present: number[];
  from: FileStamp;
  options: Record<string, unknown>;
  sections: { labels: Section };
  /** Each annotator's CM on this case [R, L, L], A[i][j] = p(says i | true j); null for an absent annotator. */
  cms: (number | null)[];
  iterations: number;
  converged: boolean;
  /** Fused voxels per class. */
  labelCounts: number[];
}

/** What goes into one fused file. */
export interface FusedFileContent {
  id: string;
  fusion: CacheFusion;
  shape: [number, number, number];
  classes: number;
  names: string[];
  present: ArrayLike<number>;
  from: FileStamp;
  options: Record<string, unknown>;
  labels: Uint8Array;
  cms?: ArrayLike<number>;
  iterations?: number;
  converged?: boolean;
}

/**
 * Where a case's fused map lives, relative to the cache folder: one subfolder per
 * fusion (cases/multi-staple/<id>.bin), so no case id can name another case's map.
 */
export function fusedFileName(id: string, fusion: CacheFusion): string {
  return path.posix.join(CASES_FOLDER, fusion, `${id}.bin`);
}

/** Size and mtime of a case's file now; undefined when it is gone. */
export function caseFileStamp(cacheDir: string, entry: CacheIndexEntry): FileStamp | undefined {
  try {
    const stat = fs.statSync(path.join(cacheDir, entry.file));
    return { size: stat.size, mtimeMs: stat.mtimeMs };
  } catch {
    return undefined;
  }
}

/**
 * Whether the case's `fusion` map in the cache is current (see the top of this section).
 * `options`: the fuse() options the caller would use; omitted, any recorded options do.
 */
export function fusedLabelsCurrent(cacheDir: string, entry: CacheIndexEntry, fusion: CacheFusion, options?: Record<string, unknown>): boolean {
  const record = entry.fused?.[fusion];
  if (!record) return false;
  if (options && JSON.stringify(record.options) !== JSON.stringify(options)) return false;
  const stamp = caseFileStamp(cacheDir, entry);
  if (!stamp || stamp.size !== record.from.size || stamp.mtimeMs !== record.from.mtimeMs) return false;
  try {
    return fs.statSync(path.join(cacheDir, record.file)).size === record.bytes;
  } catch {
    return false;
  }
}

/** The bytes of a fused file. */
export function encodeFusedFile(content: FusedFileContent): { bytes: Buffer; header: FusedFileHeader } {
  requireLittleEndianHost('<fused file>');
  const [d, h, w] = content.shape;
  if (content.labels.length !== d * h * w) throw new RangeError(`case ${content.id}: fused map has ${content.labels.length} voxels, expected ${d}x${h}x${w}`);
  const labelCounts = new Array<number>(content.classes).fill(0);
  for (let i = 0; i < content.labels.length; i++) if (content.labels[i] < content.classes) labelCounts[content.labels[i]]++;
  const header: FusedFileHeader = {
    format: FUSED_FILE_FORMAT,
    version: CACHE_VERSION,
    id: content.id,
    fusion: content.fusion,
    shape: [d, h, w],
    classes: content.classes,
    names: content.names,
    present: Array.from(content.present, (p) => (p ? 1 : 0)),
    from: content.from,
    options: content.options,
    sections: { labels: { offset: 0, bytes: content.labels.byteLength } },
    // NaN (an absent annotator's parameters) is not JSON: null says the same.
    cms: Array.from(content.cms ?? [], (x) => (Number.isFinite(x) ? x : null)),
    iterations: content.iterations ?? 0,
    converged: content.converged ?? true,
    labelCounts,
  };
  // The labels' offset depends on the header's length, which depends on the offset's digits.
  let offset = 0;
  for (let attempt = 0; attempt < 3; attempt++) {
    header.sections.labels.offset = offset;
    const needed = alignUp(12 + Buffer.byteLength(JSON.stringify(header)));
    if (needed === offset) break;
    offset = needed;
  }
  const json = Buffer.from(JSON.stringify(header), 'utf8');
  if (alignUp(12 + json.byteLength) !== header.sections.labels.offset) throw new Error(`internal: fused file header of ${content.id} did not settle`);
  const bytes = Buffer.alloc(header.sections.labels.offset + content.labels.byteLength);
  bytes.write(FUSED_FILE_MAGIC, 0, 'latin1');
  bytes.writeUInt32LE(json.byteLength, 8);
  json.copy(bytes, 12);
  bytes.set(content.labels, header.sections.labels.offset);
  return { bytes, header };
}

function parseFusedHeader(prefix: Buffer, filePath: string): { header: FusedFileHeader; jsonBytes: number } {
  if (prefix.byteLength < 12 || prefix.toString('latin1', 0, 8) !== FUSED_FILE_MAGIC) {
    throw new CacheError('bad-case-file', filePath, `${filePath} is not a cmseg fused label file (magic ${JSON.stringify(prefix.toString('latin1', 0, 8))})`);
  }
  const jsonBytes = prefix.readUInt32LE(8);
  if (prefix.byteLength < 12 + jsonBytes) return { header: undefined as unknown as FusedFileHeader, jsonBytes };
  let header: FusedFileHeader;
  try {
    header = JSON.parse(prefix.toString('utf8', 12, 12 + jsonBytes)) as FusedFileHeader;
  } catch (err) {
    throw new CacheError('bad-case-file', filePath, `${filePath}: header is not valid JSON`, undefined, { cause: err });
  }
  if (header.format !== FUSED_FILE_FORMAT || header.version !== CACHE_VERSION) {
    throw new CacheError('bad-case-file', filePath, `${filePath}: unsupported fused file format ${header.format} version ${header.version}`, header.version);
  }
  return { header, jsonBytes };
}

/** A fused file held in memory: its header and the [D, H, W] map. */
export function decodeFusedFile(bytes: Buffer, filePath = '<memory>'): { header: FusedFileHeader; labels: Uint8Array } {
  const { header } = parseFusedHeader(bytes, filePath);
  if (!header) throw new CacheError('bad-case-file', filePath, `${filePath} is truncated inside its header`, bytes.byteLength);
  const { offset, bytes: length } = header.sections.labels;
  if (offset + length > bytes.byteLength) {
    throw new CacheError('bad-case-file', filePath, `${filePath} is truncated: the labels end at byte ${offset + length}, the file has ${bytes.byteLength}`, bytes.byteLength);
  }
  return { header, labels: new Uint8Array(bytes.subarray(offset, offset + length)) };
}

/** Loads a case's fused map by id; CacheError('bad-case-file') when it is missing or stale. */
export async function readFusedLabels(cacheDir: string, id: string, fusion: CacheFusion, index: CacheIndex = readCacheIndex(cacheDir)): Promise<{ header: FusedFileHeader; labels: Uint8Array }> {
  const entry = index.cases.find((c) => c.id === id);
  if (!entry) throw new CacheError('unknown-case', cacheIndexPath(cacheDir), `case ${id} is not in the cache at ${cacheDir}`, id);
  const record = entry.fused?.[fusion];
  if (!record || !fusedLabelsCurrent(cacheDir, entry, fusion)) {
    throw new CacheError('bad-case-file', path.join(cacheDir, record?.file ?? fusedFileName(id, fusion)), `case ${id} has no current ${fusion} labels in the cache at ${cacheDir} (${record ? 'stale' : 'never fused'})`, id);
  }
  const file = path.join(cacheDir, record.file);
  return decodeFusedFile(await fs.promises.readFile(file), file);
}

/** Row access to a fused file, as CaseFileReader gives to case files (for the patch loader). */
export class FusedFileReader {
  private constructor(
    readonly path: string,
    private fd: number,
    readonly header: FusedFileHeader,
  ) {}

  static open(filePath: string): FusedFileReader {
    const { fd, header } = openWithHeader(filePath, parseFusedHeader);
    return new FusedFileReader(filePath, fd, header);
  }

  /** `rows` rows from row y0 of slice z of the fused map into `into` (rows * W bytes). */
  readRows(z: number, y0: number, rows: number, into: Buffer): Buffer {
    const [, h, w] = this.header.shape;
    return readExactly(this.fd, this.path, into, rows * w, this.header.sections.labels.offset + (z * h + y0) * w);
  }

  close(): void {
    if (this.fd >= 0) fs.closeSync(this.fd);
    this.fd = -1;
  }
}

/** Deletes the fused files an index entry names (its case is re-prepared or removed). */
function removeFusedFiles(cacheDir: string, entry: CacheIndexEntry | undefined): void {
  for (const record of Object.values(entry?.fused ?? {})) if (record) fs.rmSync(path.join(cacheDir, record.file), { force: true });
}

// ---------------------------------------------------------------------------
// Preparing

export interface PrepareProgress {
  id: string;
  /** 0-based position of this case among all cases found. */
  position: number;
  total: number;
  status: 'prepared' | 'skipped';
  ms: number;
}

export interface PrepareCacheOptions {
  /** Default BRATS_DEFAULT_ANNOTATORS (over, under, wrong). */
  annotators?: readonly AnnotatorSpec[];
  /** 'dense' (default) or 'single' (one annotator per case, chosen with the seed). */
  mode?: LabelMode;
  seed?: number;
  /** Image storage type; default 'float16' (half the disk and read traffic, ~5e-4 relative error). */
  dtype?: CacheDtype;
  /** Voxels kept around the brain's bounding box (default 0). */
  margin?: number;
  maxLocations?: number;
  /** Process every case again; needed to reuse a cache folder with different settings. */
  rebuild?: boolean;
  /**
   * How far apart (mm) a case's files may put one voxel (default BRATS_GEOMETRY_TOLERANCE_MM).
   * Not a cache setting: it only decides which cases are accepted, never what is stored.
   */
  geometryTolerance?: number;
  /**
   * Called after every case (prepared or skipped), once its case file is on disk. The index
   * lists it from its next rewrite (CacheIndexWriter: after every case of real-size data),
   * and lists every finished case once prepareCache returns or stops (a throw from here stops it).
   */
  onProgress?: (progress: PrepareProgress) => void | Promise<void>;
  /** How the segmentations' numbers are read (default 'brats'); 'peds2024' for BraTS-PEDs 2024 files. */
  labelScheme?: BratsLabelScheme;
  /**
   * Called with a one-line note about a case being prepared that is accepted but worth a look
   * (a modality that is zero everywhere in the brain).
   */
  onNote?: (note: string) => void;
}

export interface PrepareCacheResult {
  index: CacheIndex;
  prepared: string[];
  skipped: string[];
  /** Cases that were in the index but are no longer in the data folder (their files are deleted). */
  removed: string[];
}

function settingsFor(options: PrepareCacheOptions): CacheSettings {
  const annotators = (options.annotators ?? BRATS_DEFAULT_ANNOTATORS).map((spec) => ({ ...spec }));
  const mode = options.mode ?? 'dense';
  if (mode !== 'dense' && mode !== 'single') throw new RangeError(`mode ${JSON.stringify(mode)} must be 'dense' or 'single'`);
  const dtype = options.dtype ?? 'float16';
  if (dtype !== 'float16' && dtype !== 'float32') throw new RangeError(`dtype ${JSON.stringify(dtype)} must be 'float16' or 'float32'`);
  const seed = options.seed ?? 0;
  if (!Number.isSafeInteger(seed)) throw new RangeError(`seed ${seed} must be a safe integer`);
  const maxLocations = options.maxLocations ?? DEFAULT_MAX_LOCATIONS;
  if (!Number.isInteger(maxLocations) || maxLocations < 1) throw new RangeError(`maxLocations ${maxLocations} must be an integer >= 1`);
  const labelScheme = options.labelScheme ?? 'brats';
  if (!BRATS_LABEL_SCHEMES.includes(labelScheme)) throw new RangeError(`labelScheme ${JSON.stringify(labelScheme)} must be one of ${BRATS_LABEL_SCHEMES.join(', ')}`);
  return {
    annotators,
    names: annotatorNames(annotators),
    mode,
    seed,
    dtype,
    margin: options.margin ?? 0,
    classes: BRATS_CLASSES,
    modalities: [...BRATS_MODALITIES],
    maxLocations,
    // Only when not the default: a default cache's index stays what it was before the setting.
    ...(labelScheme !== 'brats' ? { labelScheme } : {}),
  };
}

/**
 * The settings that differ. The keys of both are compared, with an absent labelScheme read
 * as 'brats': only a's keys missed a peds2024 run over a cache that records no scheme.
 */
function changedSettings(a: CacheSettings, b: CacheSettings): (keyof CacheSettings)[] {
  const keys = [...new Set([...Object.keys(a), ...Object.keys(b)])] as (keyof CacheSettings)[];
  return keys.filter((key) => JSON.stringify(settingValue(a, key)) !== JSON.stringify(settingValue(b, key)));
}

/** A setting as the cache reads it: an absent labelScheme is 'brats'. */
function settingValue(settings: CacheSettings, key: keyof CacheSettings): unknown {
  return key === 'labelScheme' ? cacheLabelScheme({ settings }) : settings[key];
}

/** The option that sets each cache setting, where its name differs (prepare's flags). */
const SETTING_OPTION: Partial<Record<keyof CacheSettings, string>> = { names: 'annotators', mode: 'labels', labelScheme: 'label-scheme' };

/**
 * "labels: dense in the cache, single asked" for each changed setting, by the option that sets
 * it (the annotators' specs only where their names agree: otherwise the names say it).
 */
function describeChangedSettings(cached: CacheSettings, asked: CacheSettings, changed: readonly (keyof CacheSettings)[]): string {
  const text = (v: unknown) => (typeof v === 'string' ? v : Array.isArray(v) && v.every((x) => typeof x === 'string') ? v.join(',') : JSON.stringify(v));
  return changed
    .filter((key) => !(key === 'annotators' && changed.includes('names')))
    .map((key) => `${SETTING_OPTION[key] ?? key}: ${text(settingValue(cached, key))} in the cache, ${text(settingValue(asked, key))} asked`)
    .join('; ');
}

/**
 * Holds CACHE/.prepare.lock for the duration of `work` (anything that writes the cache:
 * prepareCache, fuseCachedCases); a lock left by a dead process is taken over.
 */
export async function withCacheLock<T>(cacheDir: string, work: () => Promise<T>): Promise<T> {
  const lockFile = path.join(cacheDir, LOCK_FILE);
  let lock: FileLock;
  try {
    // Writers killed mid-write left their temp files (a case file is tens of MB): cleared with the lock taken.
    lock = acquireFolderLock(lockFile, cacheWriteFolders(cacheDir));
  } catch (err) {
    // A cache that cannot be written (a data set shared read-only): say what writes it, since
    // a STAPLE baseline's training run fails here too and the lock file alone does not say why.
    const code = err instanceof AtomicWriteError ? (err.cause as NodeJS.ErrnoException | undefined)?.code : undefined;
    if (code === 'EROFS' || code === 'EACCES' || code === 'EPERM') {
      const why = code === 'EROFS' ? 'it is on a read-only file system' : 'no permission to write in it';
      throw new CacheError(
        'read-only',
        lockFile,
        `cannot write the cache ${cacheDir} (its lock file ${lockFile}): ${why}; prepare writes its case files there, and the STAPLE baselines their fused training labels`,
        code,
        { cause: err },
      );
    }
    if (!(err instanceof LockHeldError)) throw err;
    // A second writer in the same process would otherwise take the lock over (both then rewrite the index).
    if (err.sameProcess) {
      throw new CacheError('locked', lockFile, `this process is already writing ${cacheDir} (prepare, or a STAPLE baseline fusing its training labels); wait for it to finish`, process.pid);
    }
    throw new CacheError('locked', lockFile, `another cmseg process (${lockHolderText(err.holder, err.host)}: prepare, or a STAPLE baseline fusing its training labels) is writing ${cacheDir}; wait for it, or delete ${lockFile} if it is gone`, err.holder);
  }
  try {
    return await work();
  } finally {
    lock.release();
  }
}

/** The folders the cache's writers write into: the cache, cases/ and each fusion's folder in it. */
function cacheWriteFolders(cacheDir: string): string[] {
  const cases = path.join(cacheDir, CASES_FOLDER);
  let fusions: string[] = [];
  try {
    fusions = fs.readdirSync(cases, { withFileTypes: true }).filter((e) => e.isDirectory()).map((e) => path.join(cases, e.name));
  } catch {
    // no cases/ yet
  }
  return [cacheDir, cases, ...fusions];
}

function sourceFiles(dataDir: string, c: BratsCase): SourceFile[] {
  return bratsCaseFiles(c).map((file) => {
    const stat = fs.statSync(file);
    return { file: path.relative(dataDir, file), size: stat.size, mtimeMs: stat.mtimeMs };
  });
}

function upToDate(cacheDir: string, entry: CacheIndexEntry | undefined, sources: SourceFile[]): boolean {
  if (!entry || JSON.stringify(entry.sources) !== JSON.stringify(sources)) return false;
  try {
    return fs.statSync(path.join(cacheDir, entry.file)).size === entry.bytes;
  } catch {
    return false;
  }
}

/** Per-case seed: a case's annotators do not depend on which other cases are prepared with it. */
function caseSeed(seed: number, id: string): number {
  return new Rng(seed).fork(`case ${id}`).nextUint32();
}

/** Builds the case-file content of one preprocessed case (annotators simulated here). */
export function cacheContentFor(pre: PreprocessedBratsCase, settings: CacheSettings, niftiHeader?: NiftiHeader): CaseFileContent {
  if (!pre.seg) throw new CacheError('missing-seg', pre.id, `case ${pre.id} has no segmentation; the cache needs one to simulate annotators`);
  const simulated = simulateAnnotators(pre.seg, pre.extent, settings.classes, settings.annotators, {
    seed: caseSeed(settings.seed, pre.id),
    mode: settings.mode,
  });
  return {
    id: pre.id,
    extent: pre.extent,
    channels: BRATS_CHANNELS,
    classes: settings.classes,
    images: pre.images,
    consensus: pre.seg,
    names: simulated.names,
    labels: simulated.labels,
    present: simulated.present,
    crop: pre.crop,
    original: pre.original,
    ...(niftiHeader ? { niftiHeader } : {}),
    stats: pre.stats,
  };
}

/** Rewrites index.json atomically (cases sorted by id); call it holding the lock. Returns the bytes written. */
export async function writeCacheIndex(cacheDir: string, index: CacheIndex): Promise<number> {
  index.cases.sort((a, b) => (a.id < b.id ? -1 : a.id > b.id ? 1 : 0));
  const bytes = Buffer.from(JSON.stringify(index, null, 1) + '\n', 'utf8');
  await writeFileAtomic(cacheIndexPath(cacheDir), bytes);
  return bytes.byteLength;
}

/**
 * Rewrites index.json as a long run adds case files (prepareCache) or fused maps
 * (fuseCachedCases), in linear work. The index grows with every case (about 1.4 kB each),
 * and rewriting it whole (stringify, fsync) after each of a release's 1251 cases wrote
 * ~1 GB of index: with 1200 small cases, 3/4 of prepare's CPU time and 5/6 of a STAPLE
 * baseline's fusing. So it is rewritten once the files written since its last rewrite add
 * up to its own size (after every case of a real-size release, whose case files are tens of
 * MB; every few dozen small cases), and whenever the caller needs it on disk (`writeNow`:
 * before a listed file is replaced; `flush`: at the end and when the run stops).
 * Until then the newest files are on disk but unlisted, which a later run sees as not yet
 * done and redoes: the index never names a file it does not describe.
 */
export class CacheIndexWriter {
  /** The writers inside around(): what flushCacheIndexesSync writes. */
  static readonly active = new Set<CacheIndexWriter>();
  private sinceWrite = 0;
  private lastSize = 0;
  private dirty = false;

  constructor(
    private readonly cacheDir: string,
    private readonly index: CacheIndex,
  ) {}

  /** Bytes of the index's last write by this writer (0 before its first). */
  get size(): number {
    return this.lastSize;
  }

  /** Writes the index now. */
  async writeNow(): Promise<void> {
    this.lastSize = await writeCacheIndex(this.cacheDir, this.index);
    this.sinceWrite = 0;
    this.dirty = false;
  }

  /** The in-memory index now lists a file of `bytes` bytes that is on disk: written when enough has accumulated. */
  async added(bytes: number): Promise<void> {
    this.dirty = true;
    this.sinceWrite += bytes;
    if (this.sinceWrite >= this.lastSize) await this.writeNow();
  }

  /** Writes the index when it has changed since its last write. */
  async flush(): Promise<void> {
    if (this.dirty) await this.writeNow();
  }

  /**
   * Runs `work`, then flushes; when `work` throws (Ctrl-C's stop, a failed case), the cases
   * finished before are still flushed, and the error thrown is work's own.
   */
  async around<T>(work: () => Promise<T>): Promise<T> {
    CacheIndexWriter.active.add(this);
    // A process that quits meanwhile (process.exit, or the CLI's quitNow on a second Ctrl-C
    // or a signal while train fuses, which run the 'exit' listeners) lists its finished cases first.
    const onExit = () => {
      try {
        this.flushSync();
      } catch {
        // best effort: the next run prepares (or fuses) the unlisted cases again
      }
    };
    process.on('exit', onExit);
    let result: T;
    try {
      result = await work();
    } catch (err) {
      await this.flush().catch(() => undefined);
      throw err;
    } finally {
      CacheIndexWriter.active.delete(this);
      process.off('exit', onExit);
    }
    await this.flush();
    return result;
  }

  /**
   * Writes the index now, synchronously, when it has changed: for a process about to exit at
   * once (a second Ctrl-C). The in-memory index describes the files on disk at every await of
   * prepareCache and fuseCachedCases, so it is right to write from a signal handler.
   */
  flushSync(): void {
    if (!this.dirty) return;
    this.index.cases.sort((a, b) => (a.id < b.id ? -1 : a.id > b.id ? 1 : 0));
    writeFileAtomicSync(cacheIndexPath(this.cacheDir), Buffer.from(JSON.stringify(this.index, null, 1) + '\n', 'utf8'));
    this.dirty = false;
  }
}

/**
 * Writes the index of every cache being prepared or fused in this process whose newest
 * cases it does not list yet (CacheIndexWriter), synchronously and best effort: call it
 * before quitting at once, so that the cache lists every case finished so far.
 */
export function flushCacheIndexesSync(): void {
  for (const writer of CacheIndexWriter.active) {
    try {
      writer.flushSync();
    } catch {
      // best effort: the next run prepares (or fuses) the unlisted cases again
    }
  }
}

/**
 * Preprocesses every case under dataDir into cacheDir (see the top of this file). Cases
 * already cached from unchanged sources are skipped. Throws CacheError('settings-changed')
 * when cacheDir holds a cache made with other settings, unless `rebuild` is set.
 */
export async function prepareCache(dataDir: string, cacheDir: string, options: PrepareCacheOptions = {}): Promise<PrepareCacheResult> {
  const settings = settingsFor(options);
  const cases = discoverBratsCases(dataDir, { requireSeg: true });
  await makeFolder(path.join(cacheDir, CASES_FOLDER));
  return withCacheLock(cacheDir, async () => {
    let index: CacheIndex = { format: CACHE_FORMAT, version: CACHE_VERSION, settings, channels: BRATS_CHANNELS, classes: BRATS_CLASSES, names: settings.names, cases: [] };
    const removedByRebuild: string[] = [];
    if (options.rebuild) {
      let old: CacheIndexEntry[] = [];
      try {
        old = readCacheIndex(cacheDir).cases;
      } catch {
        // no readable old index: nothing known to delete
      }
      // Drop the old index first: its entries must never describe case files rewritten with
      // new settings, nor files deleted below.
      fs.rmSync(cacheIndexPath(cacheDir), { force: true });
      for (const entry of old) {
        // Fused maps derive from the old annotators: delete them (a stale one would be fused again anyway).
        removeFusedFiles(cacheDir, entry);
        // A case no longer in the data folder: no later run would ever list (and so remove) its file.
        if (!cases.some((c) => c.id === entry.id)) {
          fs.rmSync(path.join(cacheDir, entry.file), { force: true });
          removedByRebuild.push(entry.id);
        }
      }
    } else if (fs.existsSync(cacheIndexPath(cacheDir))) {
      const existing = readCacheIndex(cacheDir);
      const changed = changedSettings(existing.settings, settings);
      if (changed.length > 0) {
        throw new CacheError(
          'settings-changed',
          cacheIndexPath(cacheDir),
          `the cache at ${cacheDir} was prepared with other settings (${describeChangedSettings(existing.settings, settings, changed)}: these differ); ` +
            'use another cache folder, or rebuild it (--rebuild / rebuild: true)',
          changed,
        );
      }
      index = existing;
    }
    const wanted = new Set(cases.map((c) => c.id));
    const removed = [...removedByRebuild, ...index.cases.filter((entry) => !wanted.has(entry.id)).map((entry) => entry.id)];
    if (removed.length > removedByRebuild.length) {
      const gone = index.cases.filter((e) => !wanted.has(e.id));
      index.cases = index.cases.filter((entry) => wanted.has(entry.id));
      // The index first, then the files: a run killed in between must not leave an index
      // naming deleted files (only files no index names, which cost disk, not validity).
      await writeCacheIndex(cacheDir, index);
      for (const entry of gone) {
        fs.rmSync(path.join(cacheDir, entry.file), { force: true });
        removeFusedFiles(cacheDir, entry);
      }
    }
    const prepared: string[] = [];
    const skipped: string[] = [];
    // Rewritten in linear work, and flushed when the loop ends or stops (CacheIndexWriter).
    const writer = new CacheIndexWriter(cacheDir, index);
    /** Cases unlisted to be prepared again (see below). */
    const relisting = new Set<string>();
    return writer.around(async () => {
      for (let position = 0; position < cases.length; position++) {
        const c = cases[position];
        const started = Date.now();
        const sources = sourceFiles(dataDir, c);
        const existing = index.cases.find((entry) => entry.id === c.id);
        let status: PrepareProgress['status'] = 'skipped';
        if (upToDate(cacheDir, existing, sources)) {
          skipped.push(c.id);
        } else {
          const volume = await loadBratsCase(c, { geometryTolerance: options.geometryTolerance, labelScheme: cacheLabelScheme({ settings }) });
          const pre = preprocessBratsCase(volume, { margin: settings.margin });
          // Accepted (zScoreInMask keeps the channel at zeros), but most likely a broken export.
          const note = emptyModalitiesNote(c, pre.stats);
          if (note) options.onNote?.(note);
          const { bytes, header } = encodeCaseFile(cacheContentFor(pre, settings, volume.header), settings.dtype, settings.maxLocations);
          const file = path.posix.join(CASES_FOLDER, `${c.id}.bin`);
          if (existing) {
            // The index must never name a case file it does not describe: a run killed between
            // replacing the file and rewriting the index would leave the old entry (its shape,
            // size, label counts, sources) over the new file. Unlisting the case first leaves,
            // at worst, a cache without it, which the next run prepares. One index write per
            // case made preparing a whole release again (a copied data folder has new mtimes)
            // quadratic, so the listed cases coming next that are out of date too are unlisted
            // with it, as many as make up the index's size in case files (only this one for
            // real-size cases; they would be prepared again anyway, and a run that stops
            // first leaves a cache without them, which the next run prepares).
            const unlisted = new Map([[existing.id, existing]]);
            let bytesAhead = existing.bytes;
            for (let k = position + 1; k < cases.length && bytesAhead < writer.size; k++) {
              const next = index.cases.find((e) => e.id === cases[k].id);
              if (next && !upToDate(cacheDir, next, sourceFiles(dataDir, cases[k]))) {
                unlisted.set(next.id, next);
                bytesAhead += next.bytes;
              }
            }
            index.cases = index.cases.filter((e) => !unlisted.has(e.id));
            for (const id of unlisted.keys()) relisting.add(id);
            await writer.writeNow();
            // The old fused maps (fused from the old labels) go once the index no longer names them.
            for (const entry of unlisted.values()) removeFusedFiles(cacheDir, entry);
          }
          await writeFileAtomic(path.join(cacheDir, file), bytes);
          const entry: CacheIndexEntry = {
            id: c.id,
            file,
            shape: header.shape,
            crop: header.crop,
            original: header.original,
            present: header.present,
            naming: c.naming,
            sources,
            labelCounts: header.labelCounts,
            foreground: { consensus: header.sections.foreground.consensus.total, annotators: header.sections.foreground.annotators.total },
            bytes: bytes.byteLength,
          };
          index.cases = index.cases.filter((e) => e.id !== c.id);
          index.cases.push(entry);
          // A case unlisted above is listed again by the index write that unlists the next
          // batch (or the last one): counting its bytes too would write the index twice per batch.
          await writer.added(relisting.has(c.id) ? 0 : bytes.byteLength);
          prepared.push(c.id);
          status = 'prepared';
        }
        await options.onProgress?.({ id: c.id, position, total: cases.length, status, ms: Date.now() - started });
      }
      await writer.flush();
      if (!fs.existsSync(cacheIndexPath(cacheDir))) await writer.writeNow();
      return { index, prepared, skipped, removed };
    });
  });
}
