// BraTS case folders: finding the cases, reading their four MR modalities and the tumour
// segmentation, and the preprocessing every case gets once before training (MONAI /
// nnU-Net style): brain mask, per-modality z-score over the brain, crop to the brain.
//
// Layouts read (one folder per case, folder name = case id, .nii.gz or .nii):
//   BraTS 2018-2021  ID/ID_t1.nii.gz  ID/ID_t1ce.nii.gz  ID/ID_t2.nii.gz  ID/ID_flair.nii.gz  ID/ID_seg.nii.gz
//   BraTS 2023       ID/ID-t1n.nii.gz ID/ID-t1c.nii.gz   ID/ID-t2w.nii.gz ID/ID-t2f.nii.gz    ID/ID-seg.nii.gz
// The channel order is always [t1, t1ce, t2, flair] (2023: t1n, t1c, t2w, t2f).
//
// Labels. BraTS 2018-2021 segmentations use 0 background, 1 necrotic / non-enhancing
// core (NCR), 2 peritumoural edema (ED), 4 enhancing tumour (ET); there is no 3. The 2023
// release renumbered ET to 3, so its files already hold 0..3. We map 4 -> 3 in both
// cases (a no-op for 2023), giving the classes 0..3 that SPEC section 7 uses.
//
// Memory layout. A NIfTI volume stores x fastest: voxel (x, y, z) at x + nx*(y + ny*z).
// Our tensors are C-order [C, D, H, W] with D = z, H = y, W = x, so voxel (z, y, x) of
// channel c is at x + W*(y + H*(z + D*c)): the very same order, no transposition. Shapes
// in this module are therefore written [C, D, H, W] = [4, nz, ny, nx], and NIfTI dims
// [nx, ny, nz] = [W, H, D].

import * as fs from 'fs';
import * as path from 'path';
import { type Extent } from './morphology';
import { type Matrix4, type NiftiHeader, type NiftiVolume, type Vec3, readNifti } from './nifti';

// ---------------------------------------------------------------------------
// Constants: one source of truth for the dataset layout

export const BRATS_MODALITIES = ['t1', 't1ce', 't2', 'flair'] as const;
export type BratsModality = (typeof BRATS_MODALITIES)[number];
export const BRATS_CHANNELS = BRATS_MODALITIES.length;

/** Classes after mapping label 4 to 3. */
export const BRATS_CLASSES = 4;
export const BRATS_CLASS_NAMES = ['background', 'necrotic core (NCR)', 'edema (ED)', 'enhancing tumour (ET)'] as const;

/** The label BraTS 2018-2021 files use for enhancing tumour, and ours for it. */
export const BRATS_ENHANCING_LABEL_2021 = 4;
export const BRATS_ENHANCING_LABEL = 3;

export type BratsNaming = '2021' | '2023';

/** File-name pieces per release: ID + separator + suffix + .nii(.gz). */
export const BRATS_NAMING: Record<BratsNaming, { separator: string; modalities: Record<BratsModality, string>; seg: string }> = {
  '2021': { separator: '_', modalities: { t1: 't1', t1ce: 't1ce', t2: 't2', flair: 'flair' }, seg: 'seg' },
  '2023': { separator: '-', modalities: { t1: 't1n', t1ce: 't1c', t2: 't2w', flair: 't2f' }, seg: 'seg' },
};

const NIFTI_EXTENSIONS = ['.nii.gz', '.nii'] as const;

// ---------------------------------------------------------------------------
// Errors

export type BratsErrorKind =
  | 'missing-folder'
  | 'no-cases'
  | 'missing-file'
  | 'ambiguous-naming'
  | 'bad-dims'
  | 'mismatched-dims'
  | 'mismatched-affine'
  | 'bad-intensity'
  | 'bad-label'
  | 'empty-brain'
  | 'bad-crop';

/** Something wrong with a BraTS case; `caseId` and `path` say which case and file. */
export class BratsError extends Error {
  constructor(
    readonly kind: BratsErrorKind,
    /** The case concerned ('' when the problem is the folder itself). */
    readonly caseId: string,
    /** The file or folder concerned. */
    readonly path: string,
    message: string,
    /** The offending value. */
    readonly value?: unknown,
    options?: { cause?: unknown },
  ) {
    super(caseId ? `case ${caseId}: ${message}` : message, options);
    this.name = 'BratsError';
  }
}

// ---------------------------------------------------------------------------
// Discovery

/** One case on disk: where its files are. */
export interface BratsCase {
  id: string;
  dir: string;
  naming: BratsNaming;
  /** Modality files in channel order [t1, t1ce, t2, flair]. */
  images: [string, string, string, string];
  /** The segmentation, when there is one (validation/test sets have none). */
  seg?: string;
}

export interface DiscoverOptions {
  /** Throw when a case has no segmentation (default true: training needs one). */
  requireSeg?: boolean;
}

/**
 * Every case under `root` (one subfolder per case), sorted by id. Subfolders without any
 * NIfTI file are ignored; a folder with NIfTI files that do not make a complete case is
 * an error naming the case and the missing file.
 */
export function discoverBratsCases(root: string, options: DiscoverOptions = {}): BratsCase[] {
  let entries: fs.Dirent[];
  try {
    entries = fs.readdirSync(root, { withFileTypes: true });
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOENT' || code === 'ENOTDIR') {
      throw new BratsError('missing-folder', '', root, `BraTS data folder not found: ${root}`, root, { cause: err });
    }
    throw err;
  }
  const cases: BratsCase[] = [];
  for (const entry of entries) {
    if (!entry.isDirectory() && !entry.isSymbolicLink()) continue;
    const dir = path.join(root, entry.name);
    if (!isDirectory(dir)) continue;
    const found = bratsCaseInFolder(dir, options);
    if (found) cases.push(found);
  }
  if (cases.length === 0) {
    throw new BratsError(
      'no-cases',
      '',
      root,
      `no BraTS cases in ${root}: expected subfolders ID/ID_t1.nii.gz, ID_t1ce, ID_t2, ID_flair, ID_seg ` +
        `(BraTS 2018-2021) or ID/ID-t1n.nii.gz, ID-t1c, ID-t2w, ID-t2f, ID-seg (BraTS 2023)`,
      root,
    );
  }
  cases.sort((a, b) => (a.id < b.id ? -1 : a.id > b.id ? 1 : 0));
  return cases;
}

function isDirectory(p: string): boolean {
  try {
    return fs.statSync(p).isDirectory();
  } catch {
    return false;
  }
}

/**
 * The case stored in one folder (named by its id), or undefined when the folder holds no
 * NIfTI files at all. Names are matched case-insensitively; .nii.gz wins over .nii.
 */
export function bratsCaseInFolder(dir: string, options: DiscoverOptions = {}): BratsCase | undefined {
  const requireSeg = options.requireSeg ?? true;
  const id = path.basename(dir);
  const files = fs.readdirSync(dir).filter((name) => /\.nii(\.gz)?$/i.test(name));
  if (files.length === 0) return undefined;
  const byLowerName = new Map(files.map((name) => [name.toLowerCase(), name]));
  const lookup = (naming: BratsNaming, suffix: string): string | undefined => {
    const stem = `${id}${BRATS_NAMING[naming].separator}${suffix}`.toLowerCase();
    for (const ext of NIFTI_EXTENSIONS) {
      const name = byLowerName.get(stem + ext);
      if (name) return path.join(dir, name);
    }
    return undefined;
  };
  const matches = (naming: BratsNaming) => {
    const images = BRATS_MODALITIES.map((m) => lookup(naming, BRATS_NAMING[naming].modalities[m]));
    const seg = lookup(naming, BRATS_NAMING[naming].seg);
    return { images, seg, count: images.filter(Boolean).length };
  };
  const old = matches('2021');
  const recent = matches('2023');
  if (old.count === 0 && recent.count === 0) {
    throw new BratsError(
      'missing-file',
      id,
      dir,
      `no modality files named ${id}_t1.nii.gz (BraTS 2018-2021) or ${id}-t1n.nii.gz (BraTS 2023) in ${dir}; ` +
        `found ${files.join(', ')}`,
      files,
    );
  }
  if (old.count > 0 && recent.count > 0) {
    throw new BratsError(
      'ambiguous-naming',
      id,
      dir,
      `${dir} mixes BraTS 2018-2021 names (${id}_t1...) and BraTS 2023 names (${id}-t1n...); keep one`,
      files,
    );
  }
  const naming: BratsNaming = old.count > 0 ? '2021' : '2023';
  const chosen = naming === '2021' ? old : recent;
  const { separator, modalities, seg } = BRATS_NAMING[naming];
  BRATS_MODALITIES.forEach((m, c) => {
    if (!chosen.images[c]) {
      const expected = path.join(dir, `${id}${separator}${modalities[m]}.nii.gz`);
      throw new BratsError('missing-file', id, expected, `missing ${m} modality: ${expected} (or .nii) not found`, expected);
    }
  });
  if (!chosen.seg && requireSeg) {
    const expected = path.join(dir, `${id}${separator}${seg}.nii.gz`);
    throw new BratsError('missing-file', id, expected, `missing segmentation: ${expected} (or .nii) not found`, expected);
  }
  return {
    id,
    dir,
    naming,
    images: chosen.images as [string, string, string, string],
    ...(chosen.seg ? { seg: chosen.seg } : {}),
  };
}

/** Every file of a case: the four modalities, then the segmentation if any. */
export function bratsCaseFiles(c: BratsCase): string[] {
  return c.seg ? [...c.images, c.seg] : [...c.images];
}

// ---------------------------------------------------------------------------
// Loading

/** Where a voxel grid sits in the world: what is needed to put predictions back. */
export interface VolumeGeometry {
  /** NIfTI dims [nx, ny, nz] = [W, H, D]. */
  dims: Vec3;
  affine: Matrix4;
  spacing: Vec3;
}

/** A case in memory, full size, before preprocessing. */
export interface BratsVolume extends VolumeGeometry {
  id: string;
  /** [t1, t1ce, t2, flair] intensities, layout [C, D, H, W] (= four NIfTI volumes back to back). */
  images: Float32Array;
  /** Labels 0..3 (4 mapped to 3), layout [D, H, W]. */
  seg?: Uint8Array;
  /** Header of the t1 file: copy it when writing predictions so the geometry is bit-identical. */
  header: NiftiHeader;
}

// Affines written by different tools for the same grid differ in the last float32 bits.
const AFFINE_TOLERANCE_MM = 1e-3;

/** Reads a case's files and checks that they share one voxel grid. Throws BratsError. */
export async function loadBratsCase(c: BratsCase): Promise<BratsVolume> {
  const files = bratsCaseFiles(c);
  const volumes = await Promise.all(files.map((file) => readNifti(file)));
  const reference = volumes[0];
  const dims = spatialDims(c.id, reference);
  for (let k = 1; k < volumes.length; k++) checkSameGrid(c.id, reference, volumes[k]);
  const voxels = dims[0] * dims[1] * dims[2];
  const images = new Float32Array(BRATS_CHANNELS * voxels);
  for (let ch = 0; ch < BRATS_CHANNELS; ch++) {
    const data = volumes[ch].data;
    for (let i = 0; i < voxels; i++) {
      if (!Number.isFinite(data[i])) {
        throw new BratsError('bad-intensity', c.id, volumes[ch].path, `value ${data[i]} at voxel ${i} of ${volumes[ch].path} is not finite`, data[i]);
      }
    }
    images.set(data.subarray(0, voxels), ch * voxels);
  }
  const result: BratsVolume = {
    id: c.id,
    dims,
    affine: reference.affine,
    spacing: reference.spacing,
    images,
    header: reference.header,
  };
  if (c.seg) result.seg = mapBratsLabels(volumes[BRATS_CHANNELS].data, c.id, c.seg);
  return result;
}

function spatialDims(id: string, volume: NiftiVolume): Vec3 {
  if (volume.dims.length !== 3) {
    throw new BratsError('bad-dims', id, volume.path, `${volume.path} has dims [${volume.dims.join(', ')}]; BraTS volumes are 3D`, volume.dims);
  }
  return [volume.dims[0], volume.dims[1], volume.dims[2]];
}

function checkSameGrid(id: string, reference: NiftiVolume, other: NiftiVolume): void {
  const dims = spatialDims(id, other);
  if (dims.some((n, axis) => n !== reference.dims[axis])) {
    throw new BratsError(
      'mismatched-dims',
      id,
      other.path,
      `${other.path} has dims [${dims.join(', ')}] but ${reference.path} has [${reference.dims.join(', ')}]`,
      dims,
    );
  }
  for (let r = 0; r < 3; r++) {
    for (let col = 0; col < 4; col++) {
      const a = reference.affine[r][col];
      const b = other.affine[r][col];
      if (!(Math.abs(a - b) <= AFFINE_TOLERANCE_MM * Math.max(1, Math.abs(a)))) {
        throw new BratsError(
          'mismatched-affine',
          id,
          other.path,
          `${other.path} has affine[${r}][${col}] = ${b} but ${reference.path} has ${a}: the modalities are not on one grid`,
          other.affine,
        );
      }
    }
  }
}

/**
 * BraTS labels to our classes 0..3: 0, 1, 2 unchanged, 4 (2018-2021 ET) -> 3, 3 (2023 ET)
 * kept. Any other value (or a non-integer) is an error naming the file and voxel.
 */
export function mapBratsLabels(values: ArrayLike<number>, caseId: string, filePath: string): Uint8Array {
  const out = new Uint8Array(values.length);
  for (let i = 0; i < values.length; i++) {
    const v = values[i];
    if (v === 0 || v === 1 || v === 2 || v === 3) out[i] = v;
    else if (v === BRATS_ENHANCING_LABEL_2021) out[i] = BRATS_ENHANCING_LABEL;
    else {
      throw new BratsError('bad-label', caseId, filePath, `label ${v} at voxel ${i} of ${filePath} is not a BraTS label (0, 1, 2, 3, 4)`, v);
    }
  }
  return out;
}

// ---------------------------------------------------------------------------
// Preprocessing

/** A box in [D, H, W] voxel coordinates: z0..z0+d-1, y0..y0+h-1, x0..x0+w-1. */
export interface CropBox {
  z0: number;
  y0: number;
  x0: number;
  d: number;
  h: number;
  w: number;
}

/** NIfTI dims [nx, ny, nz] as our extent {d: nz, h: ny, w: nx}. */
export function extentOfDims(dims: readonly number[]): Extent {
  return { d: dims[2], h: dims[1], w: dims[0] };
}

/** Our extent as NIfTI dims [nx, ny, nz]. */
export function dimsOfExtent(extent: Extent): Vec3 {
  return [extent.w, extent.h, extent.d];
}

/** Brain mask: 1 where any channel is non-zero (BraTS images are skull-stripped, background exactly 0). */
export function brainMask(images: Float32Array, channels: number): Uint8Array {
  const voxels = images.length / channels;
  const mask = new Uint8Array(voxels);
  for (let c = 0; c < channels; c++) {
    const base = c * voxels;
    for (let i = 0; i < voxels; i++) if (images[base + i] !== 0) mask[i] = 1;
  }
  return mask;
}

/**
 * Smallest box holding every non-zero voxel of `mask` (and of `seg`, so that no label is
 * ever cropped away), grown by `margin` voxels per side and clamped to the volume.
 * Undefined when both are empty.
 */
export function boundingBox(mask: Uint8Array, extent: Extent, margin = 0, seg?: Uint8Array): CropBox | undefined {
  const { d, h, w } = extent;
  let zMin = d, yMin = h, xMin = w, zMax = -1, yMax = -1, xMax = -1;
  for (let z = 0, i = 0; z < d; z++) {
    for (let y = 0; y < h; y++) {
      for (let x = 0; x < w; x++, i++) {
        if (mask[i] === 0 && !(seg && seg[i] !== 0)) continue;
        if (z < zMin) zMin = z;
        if (z > zMax) zMax = z;
        if (y < yMin) yMin = y;
        if (y > yMax) yMax = y;
        if (x < xMin) xMin = x;
        if (x > xMax) xMax = x;
      }
    }
  }
  if (zMax < 0) return undefined;
  const lo = (v: number) => Math.max(0, v - margin);
  const z0 = lo(zMin), y0 = lo(yMin), x0 = lo(xMin);
  return {
    z0,
    y0,
    x0,
    d: Math.min(d - 1, zMax + margin) - z0 + 1,
    h: Math.min(h - 1, yMax + margin) - y0 + 1,
    w: Math.min(w - 1, xMax + margin) - x0 + 1,
  };
}

function checkCrop(crop: CropBox, extent: Extent): void {
  const ok =
    [crop.z0, crop.y0, crop.x0, crop.d, crop.h, crop.w].every(Number.isInteger) &&
    crop.z0 >= 0 && crop.y0 >= 0 && crop.x0 >= 0 && crop.d >= 1 && crop.h >= 1 && crop.w >= 1 &&
    crop.z0 + crop.d <= extent.d && crop.y0 + crop.h <= extent.h && crop.x0 + crop.w <= extent.w;
  if (!ok) {
    throw new BratsError('bad-crop', '', '', `crop box ${JSON.stringify(crop)} does not fit a ${extent.d}x${extent.h}x${extent.w} volume`, crop);
  }
}

type VoxelArray = Float32Array | Uint8Array | Int16Array | Uint16Array;

function sameKind<T extends VoxelArray>(like: T, length: number): T {
  return new (like.constructor as new (n: number) => T)(length);
}

/** The part of `data` ([channels, D, H, W] over `extent`) inside `crop`. */
export function cropVolume<T extends VoxelArray>(data: T, extent: Extent, crop: CropBox, channels = 1): T {
  checkCrop(crop, extent);
  const { d, h, w } = extent;
  if (data.length !== channels * d * h * w) {
    throw new RangeError(`cropVolume: ${data.length} values, expected ${channels}x${d}x${h}x${w}`);
  }
  const out = sameKind(data, channels * crop.d * crop.h * crop.w);
  let o = 0;
  for (let c = 0; c < channels; c++) {
    for (let z = 0; z < crop.d; z++) {
      for (let y = 0; y < crop.h; y++) {
        const start = ((c * d + crop.z0 + z) * h + crop.y0 + y) * w + crop.x0;
        (out as Float32Array).set((data as Float32Array).subarray(start, start + crop.w), o);
        o += crop.w;
      }
    }
  }
  return out;
}

/**
 * Inverse of cropVolume: a full-size [channels, D, H, W] array over `extent` with `data`
 * put back inside `crop` and `fill` elsewhere. Use it to return a prediction made on the
 * cropped case to the original grid, then write it with the original affine/header.
 */
export function uncropVolume<T extends VoxelArray>(data: T, crop: CropBox, extent: Extent, channels = 1, fill = 0): T {
  checkCrop(crop, extent);
  if (data.length !== channels * crop.d * crop.h * crop.w) {
    throw new RangeError(`uncropVolume: ${data.length} values, expected ${channels}x${crop.d}x${crop.h}x${crop.w}`);
  }
  const { d, h, w } = extent;
  const out = sameKind(data, channels * d * h * w);
  if (fill !== 0) out.fill(fill);
  let i = 0;
  for (let c = 0; c < channels; c++) {
    for (let z = 0; z < crop.d; z++) {
      for (let y = 0; y < crop.h; y++) {
        const start = ((c * d + crop.z0 + z) * h + crop.y0 + y) * w + crop.x0;
        (out as Float32Array).set((data as Float32Array).subarray(i, i + crop.w), start);
        i += crop.w;
      }
    }
  }
  return out;
}

/** Affine of the cropped grid: voxel (0, 0, 0) of the crop is voxel (x0, y0, z0) of the original. */
export function croppedAffine(affine: Matrix4, crop: CropBox): Matrix4 {
  const shift = [crop.x0, crop.y0, crop.z0];
  return affine.map((row, r) =>
    r === 3 ? [...row] : [row[0], row[1], row[2], row[3] + row[0] * shift[0] + row[1] * shift[1] + row[2] * shift[2]],
  ) as Matrix4;
}

export interface ChannelStats {
  /** Mean and (population) standard deviation over the brain mask, before normalisation. */
  mean: number;
  std: number;
}

/**
 * In place: each channel becomes (v - mean) / std over the voxels where mask = 1, and 0
 * elsewhere. A channel that is constant in the brain is only shifted (std taken as 1).
 */
export function zScoreInMask(images: Float32Array, mask: Uint8Array, channels: number): ChannelStats[] {
  const voxels = mask.length;
  if (images.length !== channels * voxels) {
    throw new RangeError(`zScoreInMask: ${images.length} values, expected ${channels} x ${voxels}`);
  }
  let count = 0;
  for (let i = 0; i < voxels; i++) count += mask[i];
  const stats: ChannelStats[] = [];
  for (let c = 0; c < channels; c++) {
    const base = c * voxels;
    let sum = 0;
    for (let i = 0; i < voxels; i++) if (mask[i]) sum += images[base + i];
    const mean = count > 0 ? sum / count : 0;
    // Two passes: the one-pass formula loses digits for MR intensities in the thousands.
    let squares = 0;
    for (let i = 0; i < voxels; i++) {
      if (mask[i]) {
        const dv = images[base + i] - mean;
        squares += dv * dv;
      }
    }
    const std = count > 0 ? Math.sqrt(squares / count) : 0;
    const scale = std > 1e-8 ? 1 / std : 1;
    for (let i = 0; i < voxels; i++) {
      images[base + i] = mask[i] ? (images[base + i] - mean) * scale : 0;
    }
    stats.push({ mean, std });
  }
  return stats;
}

export interface PreprocessOptions {
  /** Voxels of context kept around the brain's bounding box (default 0, as nnU-Net). */
  margin?: number;
}

/** A case ready for training: cropped, normalised, and remembering where it came from. */
export interface PreprocessedBratsCase {
  id: string;
  /** [C, D, H, W] of the cropped case. */
  shape: [number, number, number, number];
  extent: Extent;
  /** z-scored intensities, layout [C, D, H, W]; 0 outside the brain. */
  images: Float32Array;
  /** Labels 0..3, layout [D, H, W]. */
  seg?: Uint8Array;
  /** Brain mask of the cropped case, layout [D, H, W]. */
  brainMask: Uint8Array;
  /** Where the crop sits in the original grid. */
  crop: CropBox;
  /** The original grid: uncropVolume(x, crop, extentOfDims(original.dims)) then write with original.affine. */
  original: VolumeGeometry;
  /** Per-channel statistics used for the z-score. */
  stats: ChannelStats[];
}

/** Brain mask, crop to its bounding box (+ margin), z-score per modality over the mask. */
export function preprocessBratsCase(volume: BratsVolume, options: PreprocessOptions = {}): PreprocessedBratsCase {
  const margin = options.margin ?? 0;
  if (!Number.isInteger(margin) || margin < 0) throw new RangeError(`margin ${margin} must be an integer >= 0`);
  const extent = extentOfDims(volume.dims);
  const fullMask = brainMask(volume.images, BRATS_CHANNELS);
  const crop = boundingBox(fullMask, extent, margin, volume.seg);
  if (!crop) {
    throw new BratsError('empty-brain', volume.id, volume.id, 'every modality is zero everywhere: no brain to normalise', 0);
  }
  const images = cropVolume(volume.images, extent, crop, BRATS_CHANNELS);
  const mask = cropVolume(fullMask, extent, crop);
  const stats = zScoreInMask(images, mask, BRATS_CHANNELS);
  const croppedExtent: Extent = { d: crop.d, h: crop.h, w: crop.w };
  const result: PreprocessedBratsCase = {
    id: volume.id,
    shape: [BRATS_CHANNELS, crop.d, crop.h, crop.w],
    extent: croppedExtent,
    images,
    brainMask: mask,
    crop,
    original: { dims: [...volume.dims] as Vec3, affine: volume.affine, spacing: volume.spacing },
    stats,
  };
  if (volume.seg) result.seg = cropVolume(volume.seg, extent, crop);
  return result;
}
