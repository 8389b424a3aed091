// Synthetic BraTS-like cases, written in the real BraTS folder layout, so that the whole
// pipeline (discovery, preprocessing, cache, loader, training, prediction written back to
// NIfTI) can run where the real data cannot be downloaded.
//
// What a phantom looks like (1 mm voxels, skull-stripped as BraTS is: exactly 0 outside
// the brain):
//   - a brain: an ellipsoid with a wobbly surface, a cortical grey-matter ribbon of varying
//     thickness with CSF-filled sulci, white matter inside, two lateral ventricles, deep
//     grey nuclei and a midline fissure;
//   - one glioma per case with a random size, position, elongation and blobby outline:
//     a necrotic core (label 1) inside an enhancing rim (label 4; 3 in the 2023 naming)
//     inside an edema halo (label 2) that spreads further in white matter. About one case
//     in seven has no enhancing part (a "low-grade" look: the core is all label 1);
//   - four modalities with the contrasts radiologists expect: T1 tumour hypointense, T1ce
//     bright enhancing rim around a dark core, T2 and FLAIR bright edema (FLAIR with dark,
//     suppressed CSF); tissue texture, partial-volume blur at boundaries, a smooth bias
//     field, a per-case intensity scale and noise;
//   - a BraTS-like affine (LPS-flipped x and y, 1 mm spacing).
// Everything is a pure function of (seed, case index, size).

import * as path from 'path';
import { makeFolder } from './files';
import { type Extent } from './morphology';
import { type Matrix4, writeNifti } from './nifti';
import { Rng } from './random';
import { BRATS_MODALITIES, BRATS_NAMING, type BratsCase, type BratsNaming } from './brats';

export interface BratsPhantomOptions {
  /** [nx, ny, nz] voxels; default [96, 96, 64]. Real BraTS is [240, 240, 155]. */
  size?: readonly [number, number, number];
  seed?: number;
  /** '2021': ID_t1.nii.gz ..., ET = 4; '2023': ID-t1n.nii.gz ..., ET = 3. Default '2021'. */
  naming?: BratsNaming;
}

export interface WriteBratsPhantomsOptions extends BratsPhantomOptions {
  /** Number of cases (default 4). */
  cases?: number;
  /** Modality file type: 'int16' like most BraTS releases (default), or 'float32'. */
  datatype?: 'int16' | 'float32';
  /** gzip level of the .nii.gz files (default 1: the files are synthetic, speed matters more). */
  gzipLevel?: number;
  /** Write .nii instead of .nii.gz. */
  uncompressed?: boolean;
  /** Called after each case is written. */
  onCase?: (written: BratsCase, index: number, total: number) => void;
}

/** One phantom in memory. */
export interface BratsPhantom {
  id: string;
  dims: [number, number, number];
  affine: Matrix4;
  /** [t1, t1ce, t2, flair], each x fastest (NIfTI order), 0 outside the brain. */
  images: [Float32Array, Float32Array, Float32Array, Float32Array];
  /** Labels as the release stores them: 0, 1, 2 and 4 ('2021') or 3 ('2023') for ET. */
  seg: Uint8Array;
}

export const BRATS_PHANTOM_DEFAULT_SIZE: readonly [number, number, number] = [96, 96, 64];

/** Case id in the release's style: BraTS2021_00007 or BraTS-GLI-00007-000. */
export function bratsPhantomId(index: number, naming: BratsNaming): string {
  const number = String(index).padStart(5, '0');
  return naming === '2021' ? `BraTS2021_${number}` : `BraTS-GLI-${number}-000`;
}

// ---------------------------------------------------------------------------
// Smooth random fields

/**
 * Value noise: uniform random values on a lattice with spacing `cell` voxels, interpolated
 * with smoothstep weights, then scaled to zero mean and unit standard deviation.
 * Layout [D, H, W] over `extent`.
 */
function smoothNoise(rng: Rng, extent: Extent, cell: number): Float32Array {
  const { d, h, w } = extent;
  const c = Math.max(1, cell);
  const gd = Math.ceil((d - 1) / c) + 2;
  const gh = Math.ceil((h - 1) / c) + 2;
  const gw = Math.ceil((w - 1) / c) + 2;
  const lattice = new Float32Array(gd * gh * gw);
  for (let i = 0; i < lattice.length; i++) lattice[i] = 2 * rng.uniform() - 1;
  const axis = (n: number) => {
    const index = new Int32Array(n);
    const weight = new Float32Array(n);
    for (let k = 0; k < n; k++) {
      const f = k / c;
      const i = Math.floor(f);
      const t = f - i;
      index[k] = i;
      weight[k] = t * t * (3 - 2 * t);
    }
    return { index, weight };
  };
  const az = axis(d), ay = axis(h), ax = axis(w);
  const out = new Float32Array(d * h * w);
  let sum = 0;
  let squares = 0;
  for (let z = 0, o = 0; z < d; z++) {
    const iz = az.index[z], tz = az.weight[z];
    for (let y = 0; y < h; y++) {
      const iy = ay.index[y], ty = ay.weight[y];
      const r00 = (iz * gh + iy) * gw;
      const r01 = (iz * gh + iy + 1) * gw;
      const r10 = ((iz + 1) * gh + iy) * gw;
      const r11 = ((iz + 1) * gh + iy + 1) * gw;
      for (let x = 0; x < w; x++, o++) {
        const ix = ax.index[x], tx = ax.weight[x];
        const a = lattice[r00 + ix] + tx * (lattice[r00 + ix + 1] - lattice[r00 + ix]);
        const b = lattice[r01 + ix] + tx * (lattice[r01 + ix + 1] - lattice[r01 + ix]);
        const cc = lattice[r10 + ix] + tx * (lattice[r10 + ix + 1] - lattice[r10 + ix]);
        const dd = lattice[r11 + ix] + tx * (lattice[r11 + ix + 1] - lattice[r11 + ix]);
        const lower = a + ty * (b - a);
        const upper = cc + ty * (dd - cc);
        const v = lower + tz * (upper - lower);
        out[o] = v;
        sum += v;
        squares += v * v;
      }
    }
  }
  const n = out.length;
  const mean = sum / n;
  const std = Math.sqrt(Math.max(squares / n - mean * mean, 1e-12));
  for (let i = 0; i < n; i++) out[i] = (out[i] - mean) / std;
  return out;
}

/** In place: [1, 2, 1] / 4 along each axis (a cheap partial-volume effect). */
function binomialBlur(data: Float32Array, extent: Extent): void {
  const { d, h, w } = extent;
  const pass = (count: number, stride: number, lineStarts: (emit: (start: number) => void) => void) => {
    const line = new Float32Array(count);
    lineStarts((start) => {
      for (let k = 0; k < count; k++) line[k] = data[start + k * stride];
      for (let k = 0; k < count; k++) {
        const left = line[k > 0 ? k - 1 : k];
        const right = line[k < count - 1 ? k + 1 : k];
        data[start + k * stride] = 0.25 * left + 0.5 * line[k] + 0.25 * right;
      }
    });
  };
  pass(w, 1, (emit) => {
    for (let z = 0; z < d; z++) for (let y = 0; y < h; y++) emit((z * h + y) * w);
  });
  pass(h, w, (emit) => {
    for (let z = 0; z < d; z++) for (let x = 0; x < w; x++) emit(z * h * w + x);
  });
  if (d > 1) {
    pass(d, h * w, (emit) => {
      for (let i = 0; i < h * w; i++) emit(i);
    });
  }
}

// ---------------------------------------------------------------------------
// Tissue model

const Tissue = {
  Outside: 0,
  Csf: 1,
  Grey: 2,
  White: 3,
  DeepGrey: 4,
  Edema: 5,
  Enhancing: 6,
  Necrosis: 7,
} as const;
type Tissue = (typeof Tissue)[keyof typeof Tissue];

/**
 * Mean intensity of each tissue per modality [t1, t1ce, t2, flair], relative to white
 * matter on T1 / T1ce. Orderings follow the usual MR appearance (e.g. FLAIR: lesion >
 * grey > white > CSF; T2: CSF > necrosis > edema > grey > white).
 */
const TISSUE_INTENSITY: readonly (readonly number[])[] = [
  [0, 0, 0, 0], // outside
  [0.3, 0.32, 1.6, 0.25], // CSF
  [0.72, 0.76, 0.86, 0.86], // grey matter
  [1.0, 1.0, 0.6, 0.66], // white matter
  [0.82, 0.84, 0.76, 0.8], // deep grey nuclei
  [0.62, 0.66, 1.32, 1.48], // edema
  [0.72, 1.7, 1.05, 1.12], // enhancing tumour
  [0.38, 0.42, 1.46, 0.96], // necrosis
];

/** Relative texture amplitude per tissue (tumour is more heterogeneous than normal tissue). */
const TISSUE_TEXTURE = [0, 0.05, 0.035, 0.03, 0.035, 0.08, 0.12, 0.1];

interface Ellipsoid {
  centre: [number, number, number]; // normalised brain coordinates (u, v, w)
  radii: [number, number, number];
}

function insideEllipsoid(u: number, v: number, w: number, e: Ellipsoid): boolean {
  const a = (u - e.centre[0]) / e.radii[0];
  const b = (v - e.centre[1]) / e.radii[1];
  const c = (w - e.centre[2]) / e.radii[2];
  return a * a + b * b + c * c < 1;
}

/** A unit-variance noise value limited to [-2, 2]. */
const clampUnit = (v: number) => (v < -2 ? -2 : v > 2 ? 2 : v);

const uniformIn = (rng: Rng, lo: number, hi: number) => lo + (hi - lo) * rng.uniform();

function checkSize(size: readonly number[]): [number, number, number] {
  if (size.length !== 3 || size.some((n) => !Number.isInteger(n) || n < 8 || n > 1024)) {
    throw new RangeError(`phantom size [${size.join(', ')}] must be three integers in 8..1024 ([nx, ny, nz])`);
  }
  return [size[0], size[1], size[2]];
}

/** Case ids have five digits in both releases' naming: indices 0..99999. */
const MAX_PHANTOM_CASES = 100_000;

function checkNaming(naming: unknown): void {
  if (naming !== '2021' && naming !== '2023') throw new RangeError(`naming ${JSON.stringify(naming)} must be '2021' or '2023'`);
}

/** One synthetic case in memory; case `index` of the stream started by `options.seed`. */
export function generateBratsPhantom(index: number, options: BratsPhantomOptions = {}): BratsPhantom {
  const [nx, ny, nz] = checkSize(options.size ?? BRATS_PHANTOM_DEFAULT_SIZE);
  // The index names the case (five digits in both releases) and seeds it: a fraction or a
  // negative number gave ids such as BraTS2021_001.5 or BraTS2021_000-1.
  if (!Number.isInteger(index) || index < 0 || index >= MAX_PHANTOM_CASES) {
    throw new RangeError(`phantom case index ${index} must be an integer in 0..${MAX_PHANTOM_CASES - 1}`);
  }
  const naming = options.naming ?? '2021';
  // Anything but '2021' used to give 2023 ids and labels silently.
  checkNaming(naming);
  const rng = new Rng(options.seed ?? 0).fork(`brats phantom ${index}`);
  const extent: Extent = { d: nz, h: ny, w: nx };
  const voxels = nx * ny * nz;

  // Brain: x left-right, y posterior-anterior (longest), z inferior-superior.
  const centre = [(nx - 1) / 2 + uniformIn(rng, -0.02, 0.02) * nx, (ny - 1) / 2 + uniformIn(rng, -0.02, 0.02) * ny, (nz - 1) / 2];
  // Small grids are filled; large ones get an adult brain's half-sizes (~70 x 87 x 65 mm).
  const semi = [Math.min(0.36 * nx, 70), Math.min(0.42 * ny, 87), Math.min(0.4 * nz, 65)].map((s) => s * uniformIn(rng, 0.92, 1.0));
  const meanSemi = (semi[0] + semi[1] + semi[2]) / 3;
  const atrophy = uniformIn(rng, 0.75, 1.35);
  const ventricles: Ellipsoid[] = [-1, 1].map((side) => ({
    centre: [side * 0.12 * atrophy, uniformIn(rng, -0.05, 0.05), 0.14],
    radii: [0.06 * atrophy, 0.36, 0.13 * atrophy],
  }));
  const deepGrey: Ellipsoid[] = [-1, 1].map((side) => ({
    centre: [side * 0.28, -0.06, -0.06],
    radii: [0.1, 0.17, 0.13],
  }));

  const surfaceNoise = smoothNoise(rng.fork('surface'), extent, 0.3 * meanSemi);
  const gyriNoise = smoothNoise(rng.fork('gyri'), extent, Math.max(2, 0.12 * meanSemi));
  const sulciNoise = smoothNoise(rng.fork('sulci'), extent, Math.max(1.5, 0.07 * meanSemi));
  const cortex = 0.075 * meanSemi;

  // Tumour: in one hemisphere, off the midline.
  const tumourRng = rng.fork('tumour');
  const side = tumourRng.uniform() < 0.5 ? -1 : 1;
  const tumourAt = [side * uniformIn(tumourRng, 0.2, 0.5), uniformIn(tumourRng, -0.45, 0.45), uniformIn(tumourRng, -0.3, 0.4)];
  const tumourCentre = tumourAt.map((t, a) => centre[a] + t * semi[a]);
  const radius = uniformIn(tumourRng, 0.22, 0.45) * meanSemi;
  const stretch = [0, 1, 2].map(() => uniformIn(tumourRng, 0.75, 1.3));
  const coreFraction = uniformIn(tumourRng, 0.5, 0.75);
  const necrosisFraction = coreFraction * uniformIn(tumourRng, 0.65, 0.9);
  const rim = Math.max(1.5 / radius, 0.12 * coreFraction);
  const enhancing = tumourRng.uniform() >= 1 / 7;
  const tumourNoise = smoothNoise(tumourRng.fork('shape'), extent, Math.max(2, 0.5 * radius));
  const necrosisNoise = smoothNoise(tumourRng.fork('necrosis'), extent, Math.max(1.5, 0.3 * radius));
  const edemaNoise = smoothNoise(tumourRng.fork('edema'), extent, Math.max(2, 0.35 * radius));

  const tissue = new Uint8Array(voxels);
  const seg = new Uint8Array(voxels);
  const enhancingLabel = naming === '2021' ? 4 : 3;
  for (let z = 0, i = 0; z < nz; z++) {
    const w = (z - centre[2]) / semi[2];
    for (let y = 0; y < ny; y++) {
      const v = (y - centre[1]) / semi[1];
      for (let x = 0; x < nx; x++, i++) {
        const u = (x - centre[0]) / semi[0];
        const rho = Math.sqrt(u * u + v * v + w * w);
        const surface = 1 + 0.045 * surfaceNoise[i];
        if (rho >= surface) continue;
        const depth = (surface - rho) * meanSemi;
        let t: Tissue = Tissue.White;
        if (depth < cortex * (1 + 0.45 * gyriNoise[i])) {
          t = sulciNoise[i] > 1.0 ? Tissue.Csf : Tissue.Grey;
        } else if (deepGrey.some((e) => insideEllipsoid(u, v, w, e))) {
          t = Tissue.DeepGrey;
        }
        if (ventricles.some((e) => insideEllipsoid(u, v, w, e))) t = Tissue.Csf;
        if (Math.abs(x - centre[0]) < 0.75 && w > -0.25 && depth < 0.45 * meanSemi) t = Tissue.Csf;

        // Tumour distance: 1 at the edema's mean outline.
        const tx = (x - tumourCentre[0]) / (radius * stretch[0]);
        const ty = (y - tumourCentre[1]) / (radius * stretch[1]);
        const tz = (z - tumourCentre[2]) / (radius * stretch[2]);
        // Additive, clamped noise: a blobby outline without far-away islands.
        const distance = Math.sqrt(tx * tx + ty * ty + tz * tz) + 0.14 * clampUnit(tumourNoise[i]);
        if (distance < coreFraction) {
          const necrotic = distance < coreFraction - rim && distance + 0.06 * clampUnit(necrosisNoise[i]) < necrosisFraction;
          if (necrotic || !enhancing) {
            t = Tissue.Necrosis;
            seg[i] = 1;
          } else {
            t = Tissue.Enhancing;
            seg[i] = enhancingLabel;
          }
        } else if (t !== Tissue.Csf && distance < 1 + 0.12 * clampUnit(edemaNoise[i]) + (t === Tissue.White ? 0.12 : 0)) {
          t = Tissue.Edema;
          seg[i] = 2;
        }
        tissue[i] = t;
      }
    }
  }

  const texture = smoothNoise(rng.fork('texture'), extent, Math.max(1.5, 0.06 * meanSemi));
  const images = BRATS_MODALITIES.map((_, m) => {
    const modalityRng = rng.fork(`modality ${m}`);
    const scale = uniformIn(modalityRng, 300, 900);
    const bias = smoothNoise(modalityRng.fork('bias'), extent, 0.6 * Math.max(nx, ny, nz));
    const image = new Float32Array(voxels);
    for (let i = 0; i < voxels; i++) {
      const t = tissue[i];
      if (t === Tissue.Outside) continue;
      image[i] = TISSUE_INTENSITY[t][m] * (1 + TISSUE_TEXTURE[t] * texture[i]);
    }
    binomialBlur(image, extent);
    const noiseStd = 0.025;
    for (let i = 0; i < voxels; i++) {
      if (tissue[i] === Tissue.Outside) {
        image[i] = 0; // the blur leaked into the background; BraTS background is exactly 0
        continue;
      }
      const signal = image[i] * (1 + 0.1 * bias[i]);
      // Magnitude images: |signal + complex noise| (Rician), and never 0 inside the brain.
      // Both deviates of one Box-Muller draw: one for each quadrature channel.
      const radial = noiseStd * Math.sqrt(-2 * Math.log(1 - modalityRng.uniform()));
      const angle = 2 * Math.PI * modalityRng.uniform();
      const re = signal + radial * Math.cos(angle);
      const im = radial * Math.sin(angle);
      image[i] = Math.max(1, scale * Math.sqrt(re * re + im * im));
    }
    return image;
  }) as [Float32Array, Float32Array, Float32Array, Float32Array];

  // BraTS headers: x and y flipped (LPS-style), 1 mm, origin at voxel (0, ny - 1, 0).
  const affine: Matrix4 = [
    [-1, 0, 0, 0],
    [0, -1, 0, ny - 1],
    [0, 0, 1, 0],
    [0, 0, 0, 1],
  ];
  return { id: bratsPhantomId(index, naming), dims: [nx, ny, nz], affine, images, seg };
}

/**
 * Writes `cases` phantoms under outDir in the BraTS layout (outDir/ID/ID_t1.nii.gz, ...)
 * and returns them as discoverBratsCases would. Existing files are overwritten.
 */
export async function writeBratsPhantoms(outDir: string, options: WriteBratsPhantomsOptions = {}): Promise<BratsCase[]> {
  const count = options.cases ?? 4;
  // Case ids have five digits (generateBratsPhantom): refuse a count beyond them before any case is written.
  if (!Number.isInteger(count) || count < 1 || count > MAX_PHANTOM_CASES) throw new RangeError(`cases ${count} must be an integer in 1..${MAX_PHANTOM_CASES}`);
  const naming = options.naming ?? '2021';
  checkNaming(naming);
  const datatype = options.datatype ?? 'int16';
  const extension = options.uncompressed ? '.nii' : '.nii.gz';
  const gzipLevel = options.gzipLevel ?? 1;
  const { separator, modalities, seg: segSuffix } = BRATS_NAMING[naming];
  const written: BratsCase[] = [];
  for (let index = 0; index < count; index++) {
    const phantom = generateBratsPhantom(index, { ...options, naming });
    const dir = path.join(outDir, phantom.id);
    await makeFolder(dir); // Node's recursive mkdir says ENOENT on a read-only file system
    const file = (suffix: string) => path.join(dir, `${phantom.id}${separator}${suffix}${extension}`);
    const images = BRATS_MODALITIES.map((m) => file(modalities[m])) as [string, string, string, string];
    const segPath = file(segSuffix);
    const common = { dims: phantom.dims, affine: phantom.affine };
    await Promise.all([
      ...images.map((p, c) =>
        writeNifti(p, { ...common, data: phantom.images[c] }, { datatype, gzipLevel, description: `cmseg BraTS phantom ${BRATS_MODALITIES[c]}` }),
      ),
      writeNifti(segPath, { ...common, data: phantom.seg }, { datatype: 'uint8', gzipLevel, description: 'cmseg BraTS phantom seg' }),
    ]);
    const entry: BratsCase = { id: phantom.id, dir, naming, images, seg: segPath };
    written.push(entry);
    options.onCase?.(entry, index, count);
  }
  return written;
}
