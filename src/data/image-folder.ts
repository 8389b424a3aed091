// A generic 2D multi-annotator dataset on disk (LIDC-IDRI style: several raters per
// image, some images not labelled by every rater):
//
//   <root>/images/<name>.png               the image (gray, gray+alpha, RGB(A) or palette)
//   <root>/labels/<annotator>/<name>.png   that annotator's label map for <name>; optional
//   <root>/consensus/<name>.png            optional expert consensus, same format as labels
//
// Label values: with `labelMapping: 'value'` the stored sample is the label (0..L-1, 255 =
// unlabelled, SPEC section 1). With 'binary' every non-zero sample is foreground (1), which
// reads the common 0/255 and 0/1 masks; a map of only 0, 1 and 255 (both 1 and 255 in it)
// keeps 255 as unlabelled, as SPEC section 1 and `cmseg fuse` read it. 'auto' (default) is
// 'binary' when classes = 2 and 'value' otherwise. Palette PNGs give their palette indices, the usual way to store
// label maps with colours (a palette of grays only: see paletteLabels). All images must have the same size; the batch has the layouts
// of the MNIST batches (mnist.ts): images [N, C, H, W], label maps [N, H, W].

import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { constants as bufferConstants } from 'buffer';
import { UNLABELLED, checkLabels } from './annotators';
import type { Extent } from './morphology';
import type { SegmentationBatch } from './mnist';
import { type DecodedPng, PngColorType, readPngSync } from './png';

export type LabelMapping = 'auto' | 'value' | 'binary';

export interface ImageFolderOptions {
  /** Number of classes L including background; default 2. */
  classes?: number;
  /** How stored samples become labels; see the header of this file. Default 'auto'. */
  labelMapping?: LabelMapping;
  /** Annotators to read, in this order; default every folder under labels/, sorted by name. */
  annotators?: readonly string[];
  /** Image channels: 1 (RGB converted to luma, Rec. 601 weights) or 3 (gray repeated). Default 1. */
  imageChannels?: 1 | 3;
  /**
   * Read only these images of images/ (file names; a run's split): images added to the
   * folder later, and their labels, are then not read at all, so they cannot change or
   * break the run. Every name must be there. The batch holds them in this order (a name
   * given twice once, where first given), so that a run's splits, given one after the other,
   * are consecutive ranges of it. Default: every image, sorted by name.
   */
  names?: readonly string[];
}

export interface ImageFolderBatch extends Omit<SegmentationBatch, 'consensus'> {
  /** Image file names (without folder), in batch order: sorted, or as ImageFolderOptions.names gave them. */
  names: string[];
  annotators: string[];
  /** One map per annotator, [N, H, W]; images an annotator did not label are 255. */
  labels: Uint8Array[];
  /** present[n * R + r] = 1 when labels/<annotator r>/<name n>.png exists. */
  present: Uint8Array;
  /** From consensus/ when that folder exists. */
  consensus?: Uint8Array;
}

/** The folder's layout is wrong or a file in it does not fit. */
export class ImageFolderError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'ImageFolderError';
  }
}

export function isDirectory(folder: string): boolean {
  try {
    return fs.statSync(folder).isDirectory();
  } catch {
    return false;
  }
}

export function pngNames(folder: string): string[] {
  return fs
    .readdirSync(folder)
    .filter((name) => !name.startsWith('.') && name.toLowerCase().endsWith('.png'))
    .sort();
}

/**
 * How an image and its label maps are matched: the name with its extension in lower case.
 * pngNames takes a.PNG as a PNG, but labels/<annotator>/a.PNG was then looked for as a.png
 * (exports from Windows tools mix the two): training refused it as a label "with no image
 * a.PNG" beside images/a.png, and eval and predict left it unread without a word.
 */
export function pngKey(name: string): string {
  return name.slice(0, name.length - 4) + '.png';
}

/** A folder's PNG files by pngKey (none when it is not there): a.png and a.PNG share one key. */
export function pngFilesByKey(folder: string): Map<string, string[]> {
  const files = new Map<string, string[]>();
  if (!isDirectory(folder)) return files;
  for (const name of pngNames(folder)) {
    const key = pngKey(name);
    files.set(key, [...(files.get(key) ?? []), name]);
  }
  return files;
}

/**
 * The file of `files` (pngFilesByKey of `folder`) for image `name`, undefined when there is
 * none. Refuses a.png beside a.PNG only when that name is asked for, so that a file added
 * later beside an image outside a run's split does not break the run.
 */
export function pngFileFor(folder: string, files: Map<string, string[]>, name: string): string | undefined {
  const found = files.get(pngKey(name));
  if (found && found.length > 1) throw new ImageFolderError(`${found.map((f) => path.join(folder, f)).join(' and ')} differ only in the case of their extension: keep one`);
  return found?.[0];
}

/** Refuses a folder holding a.png and a.PNG (one label file would serve both, their predictions one name). */
export function checkNoCaseTwins(folder: string): void {
  const files = pngFilesByKey(folder);
  for (const names of files.values()) pngFileFor(folder, files, names[0]);
}

/** The longest typed array V8 makes, in elements: buffer.constants.MAX_LENGTH (2^32 on 64-bit node 20). */
const MAX_TYPED_ARRAY_LENGTH = bufferConstants.MAX_LENGTH;

/**
 * Refuses, before allocating them, arrays of a folder's images that cannot be held: the whole
 * folder is read into memory as float32 (and label maps as bytes). Without this, 5000
 * images of 1024x1024 failed with V8's "Invalid typed array length: 5242880000", and a
 * folder past the machine's memory would have been swapped to a halt or killed.
 */
export function checkFolderFits(what: string, count: number, channels: number, pixels: number, labelMaps: number): void {
  const imageValues = count * channels * pixels;
  const bytes = 4 * imageValues + labelMaps * count * pixels;
  const gb = (b: number) => (b / 1e9).toFixed(1);
  const size = `${count} image(s) of ${pixels} pixels x ${channels} channel(s)`;
  if (imageValues > MAX_TYPED_ARRAY_LENGTH) {
    throw new ImageFolderError(`${what}: ${size} are ${imageValues} values, more than the ${MAX_TYPED_ARRAY_LENGTH} one array holds here (the images are read into memory as float32, ${gb(bytes)} GB with their label maps): use fewer or smaller images`);
  }
  if (bytes > os.totalmem()) {
    throw new ImageFolderError(`${what}: ${size} need ${gb(bytes)} GB in memory as float32 images and byte label maps, more than this machine's ${gb(os.totalmem())} GB: use fewer or smaller images`);
  }
}

function subfolders(folder: string): string[] {
  return fs
    .readdirSync(folder)
    .filter((name) => !name.startsWith('.') && isDirectory(path.join(folder, name)))
    .sort();
}

/** The mapping a folder of `classes` classes is read with ('auto': 'binary' for 2 classes). Also used by `cmseg fuse`. */
export function resolveMapping(mapping: LabelMapping, classes: number): 'value' | 'binary' {
  if (mapping === 'auto') return classes === 2 ? 'binary' : 'value';
  if (mapping === 'binary' && classes !== 2) {
    throw new ImageFolderError(`labelMapping 'binary' needs classes = 2, got classes = ${classes}`);
  }
  if (mapping !== 'value' && mapping !== 'binary') {
    throw new ImageFolderError(`labelMapping ${JSON.stringify(mapping)} must be 'auto', 'value' or 'binary'`);
  }
  return mapping;
}

function checkSize(png: DecodedPng, file: string, extent: Extent, reference: string): void {
  if (png.width !== extent.w || png.height !== extent.h) {
    // Said what the rule is: a folder of mixed sizes (common in histology and fundus sets) reads as one odd file otherwise.
    throw new ImageFolderError(`${file} is ${png.width}x${png.height}, but ${reference} is ${extent.w}x${extent.h}: the images and label maps of a folder must share one size (crop, pad or resize them to one)`);
  }
}

/** Intensities in [0, 1] from the stored samples (full 16-bit precision where stored): gray (RGB as Rec. 601 luma) or RGB planes. */
export function imageIntensities(png: DecodedPng, channels: 1 | 3, out: Float32Array): void {
  const pixels = png.width * png.height;
  const rgb = png.channels >= 3;
  // Palette images are already expanded to 8-bit RGB(A) in `data`; others read `samples`.
  const source = png.colorType === PngColorType.Palette ? png.data : png.samples;
  const scale = png.colorType === PngColorType.Palette ? 255 : 2 ** png.bitDepth - 1;
  const stride = png.channels;
  for (let p = 0; p < pixels; p++) {
    const r = source[p * stride] / scale;
    const g = rgb ? source[p * stride + 1] / scale : r;
    const b = rgb ? source[p * stride + 2] / scale : r;
    if (channels === 1) {
      out[p] = rgb ? 0.299 * r + 0.587 * g + 0.114 * b : r;
    } else {
      out[p] = r;
      out[pixels + p] = g;
      out[2 * pixels + p] = b;
    }
  }
}

/**
 * Label values from a label PNG: gray (alpha ignored), palette indices, or RGB with R = G = B.
 * `specMaps` (training, eval and predict; not `cmseg fuse --mask-255 foreground`): see below. Also used by `cmseg fuse`.
 */
export function labelValues(png: DecodedPng, file: string, mapping: 'value' | 'binary', out: Uint8Array, specMaps = false): void {
  const pixels = png.width * png.height;
  const stride = png.colorType === PngColorType.Palette ? 1 : png.channels;
  const samples = png.colorType === PngColorType.Palette ? paletteLabels(png, mapping) : png.samples;
  // 'binary' reads 0/255 and 0/1 masks. A map holding only 0, 1 and 255, with both 1 and 255,
  // is neither: it is a SPEC section 1 label map (1 = foreground, 255 = unlabelled), as
  // `cmseg fuse` reads it by default; turning its 255 into foreground would train the model
  // on the pixels the annotator left unlabelled. With `specMaps` such a map keeps 255 as
  // unlabelled; without it (`cmseg fuse --mask-255 foreground`, which asks for 255 as
  // foreground) every non-zero sample is foreground, as in any other map (e.g. a resized mask).
  const keep255 = specMaps && mapping === 'binary' && isSpecBinaryMap(samples, pixels, stride);
  if (png.colorType === PngColorType.GrayAlpha || png.colorType === PngColorType.Rgba) checkAlphaMask(samples, pixels, stride, file);
  for (let p = 0; p < pixels; p++) {
    const value = samples[p * stride];
    if (stride >= 3 && (samples[p * stride + 1] !== value || samples[p * stride + 2] !== value)) {
      throw new ImageFolderError(`${file}: pixel ${p} is a colour (${samples[p * stride]}, ${samples[p * stride + 1]}, ${samples[p * stride + 2]}); label maps must be gray or palette`);
    }
    if (mapping === 'binary') {
      out[p] = value === 0 ? 0 : keep255 && value === UNLABELLED ? UNLABELLED : 1;
    } else {
      if (value > 255) throw new ImageFolderError(`${file}: label ${value} at pixel ${p} does not fit in 8 bits`);
      out[p] = value;
    }
  }
}

/**
 * A palette label map's labels: its palette indices, unless every entry it uses is a gray
 * and those grays are the labels. Masks saved through colour quantization (PIL's
 * convert('P', palette=ADAPTIVE) or quantize(), which order the palette by colour, the
 * brightest first) put a 0/255 mask's white at index 0 and its black at index 1, and a
 * 0/1/2 map's 2 at index 0: read by index, foreground and background (classes 0 and 2)
 * were swapped, silently. So with a palette of grays only, 'binary' reads the gray (black
 * is background, as the mask looks and as convert('L') reads it), and 'value' reads the
 * gray when the grays used are the indices used, reordered. Colour palettes (VOC style),
 * gray palettes whose grays are not labels (0, 255, 128 to show classes 0, 1, 2), and
 * palettes using one gray twice (black transparent and black opaque: the alpha tells
 * them apart) are read by index, as documented.
 */
function paletteLabels(png: DecodedPng, mapping: 'value' | 'binary'): Uint8Array {
  const indices = png.samples as Uint8Array;
  const palette = png.palette;
  if (!palette) return indices;
  const used = new Uint8Array(256);
  for (let p = 0; p < indices.length; p++) used[indices[p]] = 1;
  const gray = new Uint8Array(256);
  const usedIndices = new Set<number>();
  const usedGrays = new Set<number>();
  let same = true;
  for (let i = 0; i < 256; i++) {
    if (!used[i] || 3 * i + 2 >= palette.length) continue; // an index past the palette: decodePng refuses it
    const [r, g, b] = [palette[3 * i], palette[3 * i + 1], palette[3 * i + 2]];
    if (r !== g || g !== b) return indices; // a colour palette: indices are the labels
    gray[i] = r;
    usedIndices.add(i);
    usedGrays.add(r);
    if (r !== i) same = false;
  }
  // Two entries of one gray tell the labels apart by something else (tRNS alpha): indices.
  if (same || usedGrays.size !== usedIndices.size) return indices;
  const reordered = [...usedGrays].every((v) => usedIndices.has(v));
  if (mapping === 'value' && !reordered) return indices;
  const out = new Uint8Array(indices.length);
  for (let p = 0; p < indices.length; p++) out[p] = gray[indices[p]];
  return out;
}

/**
 * Label maps are read from their gray (or R = G = B) values, alpha ignored. Annotation tools
 * that export a mask as one colour over a transparent background (gray 0 everywhere, the
 * mask in alpha) were read as all background, silently: refused, saying where the mask is.
 */
function checkAlphaMask(samples: Uint8Array | Uint16Array, pixels: number, stride: number, file: string): void {
  const alpha = stride - 1;
  let grayVaries = false;
  let alphaVaries = false;
  for (let p = 1; p < pixels && !grayVaries; p++) {
    if (samples[p * stride] !== samples[0]) grayVaries = true;
    if (samples[p * stride + alpha] !== samples[alpha]) alphaVaries = true;
  }
  if (!grayVaries && alphaVaries) {
    throw new ImageFolderError(`${file}: every pixel has the value ${samples[0]}, and only its alpha (transparency) varies: a mask stored in the alpha channel is not read; save the labels as gray values (0 background, 255 or the class)`);
  }
}

/** Whether the first sample of every pixel is 0, 1 or 255, with both 1 and 255 present (see labelValues). */
function isSpecBinaryMap(samples: Uint8Array | Uint16Array, pixels: number, stride: number): boolean {
  let one = false;
  let unlabelled = false;
  for (let p = 0; p < pixels; p++) {
    const value = samples[p * stride];
    if (value === 1) one = true;
    else if (value === UNLABELLED) unlabelled = true;
    else if (value !== 0) return false;
  }
  return one && unlabelled;
}

/** What a folder holds, found without reading its label maps (scanImageFolder). */
export interface ImageFolderLayout {
  root: string;
  /** Image file names under images/, sorted. */
  names: string[];
  /** Annotator folders under labels/ (sorted, or as asked). */
  annotators: string[];
  /** Whether consensus/ exists. */
  hasConsensus: boolean;
}

/** The folders and file names of a dataset, with the layout checks of loadImageFolder. */
function folderLayout(root: string, annotatorsAsked?: readonly string[], namesAsked?: readonly string[]): ImageFolderLayout {
  if (!isDirectory(root)) throw new ImageFolderError(`dataset folder not found: ${root}`);
  const imagesDir = path.join(root, 'images');
  const labelsDir = path.join(root, 'labels');
  if (!isDirectory(imagesDir)) throw new ImageFolderError(`no images/ folder in ${root} (expected ${imagesDir}/<name>.png)`);
  if (!isDirectory(labelsDir)) throw new ImageFolderError(`no labels/ folder in ${root} (expected ${labelsDir}/<annotator>/<name>.png)`);
  const all = pngNames(imagesDir);
  if (!namesAsked) checkNoCaseTwins(imagesDir);
  let names = all;
  if (namesAsked) {
    const there = new Set(all);
    names = [...new Set(namesAsked)];
    const missing = names.filter((name) => !there.has(name));
    if (missing.length > 0) {
      throw new ImageFolderError(`${imagesDir} lacks ${missing.length} of the ${names.length} image(s) asked for (${missing.slice(0, 3).join(', ')}${missing.length > 3 ? ', ...' : ''})`);
    }
  }
  if (names.length === 0) throw new ImageFolderError(`no .png files in ${imagesDir}`);
  const annotators = annotatorsAsked ? [...annotatorsAsked] : subfolders(labelsDir);
  if (annotators.length === 0) throw new ImageFolderError(`no annotator folders in ${labelsDir}`);
  const known = new Set(all.map(pngKey));
  let labelFiles = 0;
  for (const annotator of annotators) {
    const folder = path.join(labelsDir, annotator);
    if (!isDirectory(folder)) throw new ImageFolderError(`annotator folder not found: ${folder}`);
    const files = pngNames(folder);
    labelFiles += files.length;
    // A label without its image is almost always a naming mistake: say so rather than drop it.
    // (Not when only some images are asked for: labels outside them are none of their business.)
    for (const name of files) {
      if (!namesAsked && !known.has(pngKey(name))) throw new ImageFolderError(`${path.join(folder, name)} has no image ${path.join(imagesDir, name)}`);
    }
  }
  // One annotator may have labelled nothing (cmseg simulate --labels single on a few images
  // leaves empty folders), but with no label map at all there is nothing to train on: the
  // steps would all have loss 0. Most likely the maps are not PNGs (or not named .png).
  if (labelFiles === 0) {
    const others = annotators.flatMap((a) => fs.readdirSync(path.join(labelsDir, a)).filter((n) => !n.startsWith('.')).map((n) => path.join(a, n)));
    const seen = others.length > 0 ? `; it holds ${others.length} other file(s), e.g. ${others.slice(0, 3).join(', ')}: label maps must be PNGs named like their images` : '';
    throw new ImageFolderError(`no label maps in ${labelsDir}: none of ${annotators.map((a) => `${a}/`).join(', ')} holds a <name>.png${seen}`);
  }
  return { root, names, annotators, hasConsensus: isDirectory(path.join(root, 'consensus')) };
}

/**
 * The names, annotators and image size of a folder, checking its layout but reading only
 * the first image: cheap enough to plan a run (its split, the U-Net depth) before loading.
 */
export function scanImageFolder(root: string, options: Pick<ImageFolderOptions, 'annotators'> = {}): ImageFolderLayout & { extent: Extent } {
  const layout = folderLayout(root, options.annotators);
  const first = readPngSync(path.join(root, 'images', layout.names[0]));
  return { ...layout, extent: { d: 1, h: first.height, w: first.width } };
}

/** True when `root` has the images/ and labels/ folders of this layout (a hint for the CLI, no checks). */
export function looksLikeImageFolder(root: string): boolean {
  return isDirectory(path.join(root, 'images')) && isDirectory(path.join(root, 'labels'));
}

/**
 * Reads a whole folder into memory (synchronously: datasets are read once at start-up).
 * Errors name the folder or file at fault.
 */
export function loadImageFolder(root: string, options: ImageFolderOptions = {}): ImageFolderBatch {
  const classes = options.classes ?? 2;
  if (!Number.isInteger(classes) || classes < 2 || classes > 255) {
    throw new ImageFolderError(`classes ${classes} must be an integer in [2, 255]`);
  }
  const mapping = resolveMapping(options.labelMapping ?? 'auto', classes);
  const channels = options.imageChannels ?? 1;
  if (channels !== 1 && channels !== 3) throw new ImageFolderError(`imageChannels ${String(channels)} must be 1 or 3`);
  const { names, annotators, hasConsensus } = folderLayout(root, options.annotators, options.names);
  const imagesDir = path.join(root, 'images');
  const labelsDir = path.join(root, 'labels');
  const consensusDir = path.join(root, 'consensus');

  const first = readPngSync(path.join(imagesDir, names[0]));
  const extent: Extent = { d: 1, h: first.height, w: first.width };
  const firstFile = path.join(imagesDir, names[0]);
  const pixels = extent.h * extent.w;
  const count = names.length;
  checkFolderFits(root, count, channels, pixels, annotators.length + (hasConsensus ? 1 : 0));
  const images = new Float32Array(count * channels * pixels);
  // Each folder's label files by pngKey: labels/<annotator>/a.PNG labels images/a.png.
  const labelFiles = annotators.map((annotator) => pngFilesByKey(path.join(labelsDir, annotator)));
  const consensusFiles = pngFilesByKey(consensusDir);
  const labels = annotators.map(() => new Uint8Array(count * pixels).fill(UNLABELLED));
  const present = new Uint8Array(count * annotators.length);
  const consensus = hasConsensus ? new Uint8Array(count * pixels) : undefined;

  const readLabels = (file: string, target: Uint8Array): void => {
    const png = readPngSync(file);
    checkSize(png, file, extent, firstFile);
    labelValues(png, file, mapping, target, true); // 0/1/255 maps keep 255 unlabelled
    checkLabels(file, target, classes, true);
  };

  names.forEach((name, n) => {
    const imageFile = path.join(imagesDir, name);
    const png = n === 0 ? first : readPngSync(imageFile);
    checkSize(png, imageFile, extent, firstFile);
    imageIntensities(png, channels, images.subarray(n * channels * pixels, (n + 1) * channels * pixels));
    annotators.forEach((annotator, r) => {
      const labelName = pngFileFor(path.join(labelsDir, annotator), labelFiles[r], name);
      if (labelName === undefined) return; // not labelled by this annotator: present stays 0
      const file = path.join(labelsDir, annotator, labelName);
      readLabels(file, labels[r].subarray(n * pixels, (n + 1) * pixels));
      present[n * annotators.length + r] = 1;
    });
    if (consensus) {
      const consensusName = pngFileFor(consensusDir, consensusFiles, name);
      if (consensusName === undefined) throw new ImageFolderError(`consensus/ exists but has no ${name}: ${path.join(consensusDir, name)}`);
      const file = path.join(consensusDir, consensusName);
      readLabels(file, consensus.subarray(n * pixels, (n + 1) * pixels));
    }
  });

  return { count, channels, extent, classes, images, names, annotators, labels, present, consensus };
}
