// `cmseg fuse`: one consensus from several raters' label maps (NIfTI or PNG),
// with the native fusion baselines (mean, majority vote, STAPLE family).
import * as fs from 'fs';
import * as path from 'path';
import { Command } from 'commander';
import { fuse, FusionMethod } from '../fusion/fuse';
import { isNiftiName as isNifti, readNifti, writeNifti, type Matrix4, NiftiVolume } from '../data/nifti';
import { BRATS_GEOMETRY_TOLERANCE_MM, gridDistance, hasOrientation, largestAffineDifference } from '../data/brats';
import { readPng, writePng, DecodedPng, PngColorType } from '../data/png';
import { labelValues, resolveMapping } from '../data/image-folder';
import { UNLABELLED, checkLabels } from '../data/annotators';
import { makeFolderSync, writeFileAtomic } from '../data/files';
import { choiceOption, parseInteger, parseNumber, parsePath, printOutputs, UserError, withExamples } from './common';

const METHODS: FusionMethod[] = ['mode', 'mean', 'staple', 'multi-staple', 'spatial-staple'];
/** Methods that fuse one foreground against background. */
const BINARY_METHODS: FusionMethod[] = ['staple'];
/** Methods that give a consensus probability (--posterior). */
const PROBABILISTIC_METHODS: FusionMethod[] = ['mean', 'staple', 'multi-staple', 'spatial-staple'];
/** Methods that estimate each rater's confusion matrix (--cms). */
const ESTIMATING_METHODS: FusionMethod[] = ['staple', 'multi-staple', 'spatial-staple'];
/** Spatial STAPLE's window and stride when not given (SpatialStapleOptions, native/include/cmseg/fusion.hpp). */
const SPATIAL_DEFAULTS = { window: 40, stride: 8 };

/** How 255 in a PNG that holds only 0 and 255 is read. */
type Mask255 = 'auto' | 'foreground' | 'unlabelled';
const MASK_255: Mask255[] = ['auto', 'foreground', 'unlabelled'];

// Without --classes, a map with more distinct values than this is taken for an intensity
// image given by mistake (cmseg simulate's images have about 90 grey levels), not a label map.
const MAX_INFERRED_LABELS = 32;

interface LabelImage {
  file: string;
  labels: Uint8Array;
  /** [H, W] or [D, H, W] in C-order */
  shape: number[];
  nifti?: NiftiVolume;
  png?: DecodedPng;
  /** 65535 for a 16-bit PNG that holds only 0 and 65535, read as a 0/255 mask. */
  maskWhite?: number;
}


/** An extent as NIfTI tools and image viewers print it: x (width) first. */
const extentText = (shape: readonly number[]) => [...shape].reverse().join('x');

/** A float32 header value without its rounding noise (1.2, not 1.2000000476837158). */
const short = (x: number) => String(+x.toPrecision(6));

async function readLabels(file: string): Promise<LabelImage> {
  if (isNifti(file)) {
    const v = await readNifti(file);
    // dims drops trailing 1s, so a longer list is a real 4th (time, vector) axis.
    if (v.dims.length > 3) throw new UserError(`${file} is ${v.dims.length}D (${v.dims.join('x')}); fuse needs 2D or 3D label maps`);
    const labels = new Uint8Array(v.data.length);
    for (let i = 0; i < v.data.length; i++) {
      const x = v.data[i];
      if (!(x >= 0 && x <= 255 && Number.isInteger(x))) throw new UserError(`${file}: voxel ${i} holds ${x}, not a label in 0..255`);
      labels[i] = x;
    }
    // NIfTI is x fastest: as C-order that is [z, y, x].
    const [nx, ny, nz = 1] = v.dims;
    return { file, labels, shape: nz > 1 ? [nz, ny, nx] : [ny, nx], nifti: v };
  }
  if (/\.png$/i.test(file)) {
    const png = await readPng(file);
    const labels = new Uint8Array(png.width * png.height);
    const shape = [png.height, png.width];
    // A 16-bit 0/65535 mask is the 0/255 mask of tools that save 16 bits (training reads both
    // as binary): its white is read as 255, so the 0/255 rules below apply to it alike.
    if (png.bitDepth === 16 && png.colorType !== PngColorType.Palette && isBlackWhite(png, 65535)) {
      labelValues(png, file, 'binary', labels);
      for (let p = 0; p < labels.length; p++) labels[p] *= UNLABELLED;
      return { file, labels, shape, png, maskWhite: 65535 };
    }
    // Read like a dataset folder's label PNGs: gray, palette indices, or RGB with R = G = B.
    labelValues(png, file, 'value', labels);
    return { file, labels, shape, png };
  }
  throw new UserError(`${file}: unsupported file type (expected .nii, .nii.gz or .png)`);
}

/** Whether every sample of a gray (or R = G = B) PNG is 0 or `white`, and some are `white`. */
function isBlackWhite(png: DecodedPng, white: number): boolean {
  if (png.colorType === PngColorType.Palette) return false;
  let seen = false;
  for (let i = 0; i < png.samples.length; i++) {
    const x = png.samples[i];
    // An alpha channel's samples (every 2nd or 4th) are opacity, not the mask.
    if ((png.channels === 2 || png.channels === 4) && i % png.channels === png.channels - 1) continue;
    if (x === white) seen = true;
    else if (x !== 0) return false;
  }
  return seen;
}

function checkSameShape(images: readonly LabelImage[]): void {
  const [first] = images;
  for (const im of images) {
    if (im.shape.join('x') !== first.shape.join('x')) throw new UserError(`${im.file} is ${extentText(im.shape)}, but ${first.file} is ${extentText(first.shape)}`);
  }
}

/** Voxel edge lengths (mm) along the three axes: the affine's column norms. */
const voxelSize = (affine: Matrix4) => [0, 1, 2].map((c) => Math.hypot(affine[0][c], affine[1][c], affine[2][c]));

/**
 * NIfTI raters of one shape may still lie on different grids (voxel size, orientation,
 * origin); their voxels then do not correspond, and the consensus would silently take the
 * first rater's geometry. Tested as prepare tests a case's files (src/data/brats.ts): how
 * far apart the two affines put one voxel, with its tolerance; the message says what differs.
 */
function checkSameGrid(images: readonly LabelImage[], toleranceMm: number): void {
  const volumes = images.filter((im) => im.nifti);
  const ref = volumes[0];
  for (const im of volumes.slice(1)) {
    const [a, b] = [ref.nifti!, im.nifti!];
    // Without an orientation there is nothing to compare: same dims can only mean the same grid.
    if (!hasOrientation(a) || !hasOrientation(b)) continue;
    const dims = [...a.dims, 1, 1].slice(0, 3);
    const distance = gridDistance(a.affine, b.affine, dims);
    if (distance <= toleranceMm) continue;
    const apart = `they put a voxel up to ${distance.toFixed(2)} mm apart, more than the tolerance of ${toleranceMm} mm, so the raters are not on one grid (if they are meant to be, allow it with --geometry-tolerance <mm>)`;
    const [sa, sb] = [voxelSize(a.affine), voxelSize(b.affine)];
    // A voxel size that differs alone moves the far corner by more than the tolerance.
    if (sa.some((x, axis) => Math.abs(x - sb[axis]) * (dims[axis] - 1) > toleranceMm)) {
      const size = (s: number[]) => s.map(short).join('x');
      throw new UserError(`${im.file} has voxels of ${size(sb)} mm but ${ref.file} has ${size(sa)} mm: ${apart}`);
    }
    const [r, col] = largestAffineDifference(a.affine, b.affine);
    throw new UserError(`${im.file} has affine[${r}][${col}] = ${short(b.affine[r][col])} but ${ref.file} has ${short(a.affine[r][col])}: ${apart}`);
  }
}

/** The set of labels in a map, 255 (unlabelled) left out. */
function labelSet(labels: Uint8Array): Set<number> {
  const seen = new Uint8Array(256);
  for (const x of labels) seen[x] = 1;
  const set = new Set<number>();
  for (let x = 0; x < 255; x++) if (seen[x]) set.add(x);
  return set;
}

/**
 * `cmseg simulate` and most image tools save binary masks as 0/255, but to fuse 255 is
 * "unlabelled": every foreground pixel would drop out without a word. PNG raters that hold
 * only 0 and 255 are read as a dataset folder reads its masks (loadImageFolder's 'auto'
 * mapping: 'binary' when there are 2 classes), so 255 becomes 1. Returns the files mapped.
 */
function readMasks(images: readonly LabelImage[], mask255: Mask255, classes: number | undefined, foreground: number | undefined): string[] {
  if (mask255 === 'unlabelled') return [];
  if (mask255 === 'foreground' && classes !== undefined && classes !== 2) throw new UserError(`--mask-255 foreground reads binary masks, but --classes is ${classes}`);
  const mapping = mask255 === 'foreground' ? 'binary' : resolveMapping('auto', classes ?? classesBesideMasks(images, foreground));
  if (mapping !== 'binary') return [];
  const mapped: string[] = [];
  for (const im of images) {
    if (!im.png || !im.labels.includes(UNLABELLED)) continue;
    const labels = labelSet(im.labels);
    // auto: only a pure 0/255 mask; asked for, also 0/1 maps with 255 for foreground.
    const binary = [...labels].every((x) => x === 0 || (mask255 === 'foreground' && x === 1));
    if (!binary) {
      if (mask255 === 'foreground') throw new UserError(`--mask-255 foreground reads binary masks, but ${im.file} holds label ${Math.max(...labels)}`);
      continue;
    }
    labelValues(im.png, im.file, 'binary', im.labels);
    mapped.push(im.file);
  }
  return mapped;
}

/** Whether a map holds only 0 and 255: a binary mask as image tools save one, or a map of background and unlabelled. */
function pureMask(im: LabelImage): boolean {
  return im.labels.every((x) => x === 0 || x === UNLABELLED);
}

/**
 * The class count the other raters imply, before the 0/255 masks are read (at least 2):
 * a 255 in a mask can only mean foreground when there are 2 classes, and whether there
 * are is for the maps that hold real labels to say.
 */
function classesBesideMasks(images: readonly LabelImage[], foreground: number | undefined): number {
  let maxLabel = Math.max(1, foreground ?? 0);
  for (const im of images) {
    if (pureMask(im)) continue;
    for (const x of labelSet(im.labels)) if (x !== UNLABELLED) maxLabel = Math.max(maxLabel, x);
  }
  return maxLabel + 1;
}

/** --classes, or the largest label + 1; refuses what looks like an intensity image. */
function resolveClasses(images: readonly LabelImage[], given: number | undefined, foreground: number | undefined): number {
  if (given !== undefined) {
    if (given > 255) throw new UserError(`--classes ${given}: labels are 8-bit, so at most 255 classes (255 = unlabelled)`);
    for (const im of images) {
      try {
        checkLabels(im.file, im.labels, given, true);
      } catch (e) {
        throw new UserError(`${(e as Error).message}: raise --classes or check the file`);
      }
    }
    return given;
  }
  let maxLabel = 1;
  for (const im of images) {
    const labels = labelSet(im.labels);
    if (labels.size > MAX_INFERRED_LABELS) {
      throw new UserError(`${im.file} holds ${labels.size} distinct values (${Math.min(...labels)}..${Math.max(...labels)}): an intensity image, not a label map? If these are labels, pass --classes`);
    }
    for (const x of labels) maxLabel = Math.max(maxLabel, x);
  }
  return Math.max(maxLabel + 1, (foreground ?? 0) + 1);
}

/**
 * Binary STAPLE reads one label as foreground and every other as background; with the
 * default label 1 a multi-label map would silently lose its other classes.
 */
function checkForeground(method: FusionMethod, images: readonly LabelImage[], classes: number, foreground: number | undefined): void {
  const binary = BINARY_METHODS.includes(method);
  if (foreground !== undefined) {
    if (!binary) throw new UserError(`--foreground is for --method ${BINARY_METHODS.join(', ')}; ${method} fuses every class`);
    if (foreground >= classes) throw new UserError(`--foreground ${foreground} is not a class (--classes ${classes})`);
    // A label nobody drew fuses to all background: right for a case without a lesion, a
    // slip for a typo (or BraTS 2021's 3): said, not refused.
    if (!images.some((im) => im.labels.includes(foreground))) {
      const seen = new Set<number>();
      for (const im of images) for (const x of im.labels) if (x !== UNLABELLED) seen.add(x);
      process.stderr.write(`note: --foreground ${foreground}: no rater map holds that label (they hold ${[...seen].sort((a, b) => a - b).join(', ')}), so the consensus is all background\n`);
    }
    return;
  }
  if (!binary || classes <= 2) return;
  const hint = 'pass --foreground <label> (that label is foreground, every other label background) or use --method multi-staple';
  for (const im of images) {
    const label = im.labels.find((x) => x > 1 && x !== UNLABELLED);
    if (label !== undefined) throw new UserError(`--method ${method} is binary, but ${im.file} holds label ${label}: ${hint}`);
  }
  throw new UserError(`--method ${method} is binary, but --classes is ${classes}: ${hint}`);
}

/**
 * Raters who all drew 0/255 masks expect their consensus as one too (a 0/1 PNG looks black
 * in every viewer): foreground 1 is written as 255. Not when a tie label of 255 was asked
 * for, which would then mean foreground as well: the consensus stays 0/1 and stderr says why.
 */
function asMask(consensus: Uint8Array, undecided: number | undefined): Uint8Array {
  if (undecided === UNLABELLED) {
    process.stderr.write(`note: --undecided ${UNLABELLED} marks ties, so the consensus is written as 0/1 labels, not as a 0/255 mask\n`);
    return consensus;
  }
  process.stderr.write('note: the consensus is written as a 0/255 mask, like its raters\n');
  return consensus.map((x) => (x === 1 ? UNLABELLED : x));
}

/** Throws when `file` has no output type fuse writes: checked before any input is read. */
function checkOutputType(file: string): void {
  if (!isNifti(file) && !/\.png$/i.test(file)) throw new UserError(`${file}: unsupported output type (expected .nii, .nii.gz or .png)`);
}

/**
 * The options that depend on the method alone, checked before any input is read (a volume
 * can take minutes to fuse): --posterior and --cms for methods that give no probability or
 * estimate nothing (--cms wrote a file of no matrices under a line saying how to read them),
 * --window and --stride for methods other than spatial STAPLE (ignored without a word), and
 * a window that is not an odd multiple of the stride, naming which one is the default
 * (the engine's message spoke of "window = 40" to a user who had only given --stride 3).
 */
function checkMethodOptions(method: FusionMethod, opts: { posterior?: string; cms?: string; window?: number; stride?: number }): void {
  const list = (methods: FusionMethod[]) => methods.join(', ');
  if (opts.posterior && !PROBABILISTIC_METHODS.includes(method)) throw new UserError(`--posterior: method ${method} gives no probabilities (methods that do: ${list(PROBABILISTIC_METHODS)})`);
  if (opts.cms && !ESTIMATING_METHODS.includes(method)) throw new UserError(`--cms: method ${method} estimates no rater confusion matrices (methods that do: ${list(ESTIMATING_METHODS)})`);
  const spatial = opts.window !== undefined || opts.stride !== undefined;
  if (spatial && method !== 'spatial-staple') throw new UserError(`--${opts.window !== undefined ? 'window' : 'stride'} is for --method spatial-staple; ${method} has no local estimates`);
  if (!spatial) return;
  const window = opts.window ?? SPATIAL_DEFAULTS.window;
  const stride = opts.stride ?? SPATIAL_DEFAULTS.stride;
  if (window % stride !== 0 || (window / stride) % 2 === 0) {
    const said = (flag: string, value: number, typed: boolean) => `${flag} ${value}${typed ? '' : ' (the default)'}`;
    throw new UserError(
      `${said('--window', window, opts.window !== undefined)} is not an odd multiple of ${said('--stride', stride, opts.stride !== undefined)}: a window is a whole, odd number of cells of stride pixels (e.g. --window ${3 * stride} --stride ${stride})`,
    );
  }
}

/**
 * The same file given twice would count one rater twice (more votes, and STAPLE would take
 * the two copies for two raters who always agree): refused. Files are compared by device and
 * inode (a symbolic or hard link, '..'), or by resolved path where the system has no inodes.
 */
function checkDistinctInputs(inputs: readonly string[]): void {
  const seen = new Map<string, string>();
  for (const file of inputs) {
    let where: string;
    try {
      const stat = fs.statSync(file, { bigint: true });
      where = stat.ino !== 0n ? `${stat.dev}:${stat.ino}` : fs.realpathSync(file);
    } catch {
      continue; // reading it says what is wrong
    }
    const first = seen.get(where);
    if (first !== undefined) throw new UserError(`${file} is the same file as ${first}: each rater's map is given once`);
    seen.set(where, file);
  }
}

/** Throws when `file` cannot hold a map of these inputs: checked for every output before any is written. */
function checkOutput(file: string, like: LabelImage): void {
  if (isNifti(file)) {
    if (!like.nifti) throw new UserError(`${file}: NIfTI output needs NIfTI inputs (the geometry comes from the first input)`);
  } else if (/\.png$/i.test(file)) {
    if (like.shape.length !== 2) throw new UserError(`${file}: PNG output needs 2D inputs`);
  } else {
    throw new UserError(`${file}: unsupported output type (expected .nii, .nii.gz or .png)`);
  }
}

/**
 * Writing an output over a rater's file (or two outputs over each other) would destroy
 * data without a word: the paths are compared as the file system resolves them (links,
 * '..'), before anything is written.
 */
function checkOutputPaths(outputs: readonly [string, string][], inputs: readonly string[]): void {
  const real = (file: string) => {
    try {
      return fs.realpathSync(file);
    } catch {
      return path.resolve(file); // not there yet: compare the path as given
    }
  };
  const inputPaths = new Map(inputs.map((file) => [real(file), file]));
  const seen = new Map<string, string>();
  for (const [flag, file] of outputs) {
    const where = real(file);
    const input = inputPaths.get(where);
    if (input !== undefined) throw new UserError(`${flag} ${file} is the input ${input}: writing it would overwrite that rater's map; choose another file`);
    const other = seen.get(where);
    if (other !== undefined) throw new UserError(`${flag} ${file} is also the file of ${other}: each output needs its own file`);
    if (fs.existsSync(file) && fs.statSync(file).isDirectory()) throw new UserError(`${flag} ${file} is a folder; name a file in it`);
    seen.set(where, flag);
  }
}

/** Outputs may go into folders that do not exist yet: made for all of them before the first file is written. */
function makeOutputFolders(files: readonly string[]): void {
  // makeFolderSync: Node's recursive mkdir says ENOENT on a read-only file system.
  for (const file of files) makeFolderSync(path.dirname(file));
}

async function writeLabels(file: string, like: LabelImage, data: Uint8Array | Float32Array, datatype: 'uint8' | 'float32') {
  checkOutput(file, like);
  if (isNifti(file)) {
    // As many axes as the rater's file has: dims pads a 2D (or 1D) file to 3 axes, and a
    // consensus of shape (W, H, 1) beside raters of (W, H) broadcasts in numpy instead of
    // comparing voxel by voxel (nibabel: consensus == rater has shape (W, W, H)).
    const axes = Math.max(1, Math.min(3, like.nifti!.header.dim[0]));
    await writeNifti(file, { dims: like.nifti!.dims.slice(0, axes), data, header: like.nifti!.header }, { datatype });
  } else {
    const bytes = data instanceof Uint8Array ? data : Uint8Array.from(data, (p) => Math.round(255 * p));
    await writePng(file, { width: like.shape[1], height: like.shape[0], channels: 1, data: bytes });
  }
}

export function registerFuseCommand(program: Command): Command {
  const cmd = program
    .command('fuse')
    .description('fuse several raters\' label maps into one consensus (majority vote, mean, STAPLE, multi-label STAPLE, spatial STAPLE)')
    .argument('<inputs...>', 'one label map per rater (.nii, .nii.gz or gray/palette .png), all the same size (NIfTI: on one grid)')
    .requiredOption('-o, --out <file>', 'consensus label map (.nii.gz or .png)', parsePath('--out'))
    .addOption(choiceOption('--method <name>', 'fusion method', METHODS).default('mode'))
    .option('--classes <n>', 'number of classes (default: largest label + 1; 255 = unlabelled)', parseInteger(2))
    .option('--undecided <label>', 'label for ties (default: the lowest tied class)', parseInteger(0))
    .option('--foreground <label>', 'binary methods (staple): the label read as foreground; every other label is background (needed when the maps hold labels > 1)', parseInteger(0))
    .option('--geometry-tolerance <mm>', 'NIfTI: how far apart two raters\' files may put one voxel and still count as one grid', parseNumber(0), BRATS_GEOMETRY_TOLERANCE_MM)
    .addOption(choiceOption('--mask-255 <meaning>', 'how 255 in PNG masks that hold only 0 and 255 is read: auto (foreground when there are 2 classes), foreground, or unlabelled', MASK_255).default('auto'))
    .option('--posterior <file>', 'also write the consensus probability of the foreground (binary) as float32 NIfTI/PNG', parsePath('--posterior'))
    .option('--cms <file>', 'also write each rater\'s estimated confusion matrix (STAPLE methods) as JSON', parsePath('--cms'))
    .option('--window <n>', `spatial STAPLE window edge in pixels, an odd multiple of --stride (default ${SPATIAL_DEFAULTS.window})`, parseInteger(1))
    .option('--stride <n>', `spatial STAPLE stride (cell edge) in pixels (default ${SPATIAL_DEFAULTS.stride})`, parseInteger(1));
  withExamples(
    cmd,
    'cmseg fuse --method multi-staple -o consensus.nii.gz rater1.nii.gz rater2.nii.gz rater3.nii.gz',
    'cmseg fuse --method mode -o vote.png a.png b.png c.png',
    'cmseg fuse --method staple --foreground 2 -o edema.nii.gz rater1.nii.gz rater2.nii.gz rater3.nii.gz',
  );
  cmd.action(async (inputs: string[], opts) => {
    if (inputs.length < 2) throw new UserError('fuse needs at least two label maps');
    // The native methods check this themselves; mean's consensus is made here and must too.
    if (opts.undecided !== undefined && opts.undecided > 255) throw new UserError(`--undecided ${opts.undecided} is not a label: labels are 8-bit (0..255)`);
    // Checked before the (possibly long) reading and fusing, not after it.
    const outputs: [string, string][] = [
      ['-o', path.resolve(opts.out)],
      ...(opts.posterior ? ([['--posterior', path.resolve(opts.posterior)]] as [string, string][]) : []),
      ...(opts.cms ? ([['--cms', path.resolve(opts.cms)]] as [string, string][]) : []),
    ];
    checkOutputPaths(outputs, inputs);
    checkOutputType(outputs[0][1]);
    if (opts.posterior) checkOutputType(path.resolve(opts.posterior));
    checkMethodOptions(opts.method as FusionMethod, opts);
    checkDistinctInputs(inputs);
    const images = await Promise.all(inputs.map(readLabels));
    checkSameShape(images);
    checkSameGrid(images, opts.geometryTolerance);
    // Whether the outputs fit these inputs (NIfTI needs a NIfTI's geometry, PNG 2D maps): known
    // now, so not found out after the fusion.
    checkOutput(path.resolve(opts.out), images[0]);
    if (opts.posterior) checkOutput(path.resolve(opts.posterior), images[0]);
    const foreground: number | undefined = opts.foreground;
    // Before the masks are read as 0/1: whether every rater drew a pure 0/255 mask.
    const allMasks = images.every(pureMask);
    const mapped = readMasks(images, opts.mask255 as Mask255, opts.classes, foreground);
    const classes = resolveClasses(images, opts.classes, foreground);
    const method = opts.method as FusionMethod;
    checkForeground(method, images, classes, foreground);
    if (mapped.length > 0) {
      const kinds = [...new Set(images.filter((im) => mapped.includes(im.file)).map((im) => `0/${im.maskWhite ?? UNLABELLED}`))].join(' or ');
      const which = mapped.length === images.length ? `rater maps are ${kinds} masks` : `${mapped.join(', ')} ${mapped.length > 1 ? `are ${kinds} masks` : `is a ${kinds} mask`}`;
      const white = kinds.includes('65535') ? (kinds.includes('/255') ? '255 and 65535' : '65535') : '255';
      process.stderr.write(`note: ${which}: ${white} read as foreground (1) (--mask-255 unlabelled if ${white} means unlabelled)\n`);
    }
    const result = await fuse(
      images.map((im) => im.labels),
      {
        method,
        classes,
        shape: images[0].shape,
        ...(foreground !== undefined ? { foreground } : {}),
        // mean has no ties of its own: its consensus is the majority vote below.
        ...(opts.undecided !== undefined && method !== 'mean' ? { undecided: opts.undecided } : {}),
        ...(opts.window ? { window: opts.window } : {}),
        ...(opts.stride ? { stride: opts.stride } : {}),
      },
    );
    const V = images[0].labels.length;
    let consensus = result.labels;
    if (!consensus && result.probs) {
      // mean: the soft label's argmax is the class most raters chose, i.e. the majority vote,
      // whose tie and unlabelled rules the other methods share.
      const vote = await fuse(
        images.map((im) => im.labels),
        { method: 'mode', classes, shape: images[0].shape, ...(opts.undecided !== undefined ? { undecided: opts.undecided } : {}) },
      );
      consensus = vote.labels;
    }
    // Everything that can fail is checked before the first file is written: a refused
    // --posterior must not leave a consensus behind.
    const out = path.resolve(opts.out);
    checkOutput(out, images[0]);
    let posterior: Float32Array | undefined;
    if (opts.posterior) {
      const source = result.posterior ?? result.probs;
      if (!source) throw new UserError(`--posterior: method ${method} gives no probabilities`);
      // One map per class past two: which one the file holds would be a guess.
      if (source.length > 2 * V) {
        throw new UserError(`--posterior writes one foreground probability map, and this fusion has ${source.length / V} classes: fuse one class with --method staple --foreground <class>`);
      }
      posterior = Float32Array.from(source.length === V ? source : source.subarray(V, 2 * V)); // binary: foreground row
      checkOutput(path.resolve(opts.posterior), images[0]);
    }
    if (allMasks && mapped.length === images.length && /\.png$/i.test(out)) consensus = asMask(consensus!, opts.undecided);
    makeOutputFolders(outputs.map(([, file]) => file));
    const written: [string, string][] = [];
    await writeLabels(out, images[0], consensus!, 'uint8');
    written.push(['consensus', out]);
    if (posterior) {
      const file = path.resolve(opts.posterior);
      await writeLabels(file, images[0], posterior, 'float32');
      written.push(['posterior', file]);
    }
    if (opts.cms) {
      const file = path.resolve(opts.cms);
      const report: Record<string, unknown> = { method, classes, ...(foreground !== undefined ? { foreground } : {}), raters: inputs };
      if (result.cms) report.cms = inputs.map((_, r) => Array.from({ length: classes }, (_, i) => Array.from(result.cms!.subarray((r * classes + i) * classes, (r * classes + i + 1) * classes))));
      if (result.sensitivity) report.sensitivity = Array.from(result.sensitivity);
      if (result.specificity) report.specificity = Array.from(result.specificity);
      // Binary STAPLE estimates no matrix: its file said how to read the cms it did not hold.
      const label = foreground ?? 1;
      report.convention = result.cms
        ? 'cms[r][i][j] = p(rater r says i | true class j); columns sum to 1'
        : `sensitivity[r] = p(rater r says ${label} | true ${label}); specificity[r] = p(rater r says another label | true label is not ${label})`;
      await writeFileAtomic(file, Buffer.from(JSON.stringify(report, null, 2) + '\n'));
      written.push(['confusion matrices', file]);
    }
    printOutputs(written);
  });
  return cmd;
}
