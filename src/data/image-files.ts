// New 2D data for a checkpoint (eval and predict --data): every PNG image of a folder, as
// DIR/images/ with optional labels/<annotator>/ and consensus/, or a plain folder of PNGs,
// read for the model's input channels and annotators. (image-folder.ts reads a training
// data set, whose labels/ must be there.)

import * as fs from 'fs';
import * as path from 'path';
import { UserError } from '../errors';
import { displayPath } from './files';
import type { CheckpointInfo } from '../model/checkpoint-info';
import type { AnnotatedSet } from '../train/data';
import { UNLABELLED, checkLabels } from './annotators';
import { ImageFolderError, checkFolderFits, checkNoCaseTwins, imageIntensities, isDirectory, type LabelMapping, labelValues, pngFileFor, pngFilesByKey, pngNames, resolveMapping } from './image-folder';
import { isNiftiName } from './nifti';
import { pngEndsWithIend, pngSizeSync, readPngSync } from './png';

/** Every image of a folder, with whatever labels and consensus it has, ready for a checkpoint's model. */
export interface ImagesToPredict {
  /** names: the image file names, sorted; annotatorNames: the model's CM heads. */
  set: AnnotatedSet & { names: string[] };
  /** Where the images are: DIR/images or DIR itself. */
  imagesDir: string;
  /** Annotators with at least one label file. */
  labelled: string[];
}

/**
 * A folder of new images, found and checked but not yet decoded (openImagesToPredict): its
 * images are read a batch at a time with read(start, n), so that predict and eval hold a
 * batch, not the folder (5000 images of 1024x1024 are 21 GB as float32).
 */
export interface ImageFolderToPredict {
  count: number;
  channels: number;
  classes: number;
  /** [H, W], the first image's (every image must share it). */
  spatial: [number, number];
  /** The model's CM heads, as the set's annotatorNames. */
  annotatorNames: string[];
  /** The image file names, sorted. */
  names: string[];
  imagesDir: string;
  /** Annotators with at least one label file. */
  labelled: string[];
  hasConsensus: boolean;
  /** [count, R]: 1 where the image has that annotator's label file. */
  present: Uint8Array;
  /** Images start .. start + n - 1 (cut at the end of the folder), decoded and checked now. */
  read(start: number, n: number, options?: { images?: boolean }): AnnotatedSet & { names: string[] };
}

/** fn(), with the folder checks' ImageFolderError said as the command's own UserError (no stack, exit 1). */
function asUserError<T>(fn: () => T): T {
  try {
    return fn();
  } catch (error) {
    if (error instanceof ImageFolderError) throw new UserError(error.message);
    throw error;
  }
}

function holdsNifti(folder: string): boolean {
  return fs.readdirSync(folder).some(isNiftiName);
}

/**
 * Opens every PNG of `dir` for a 2D checkpoint: DIR/images/*.png (then DIR/labels/<annotator>/
 * and DIR/consensus/ are read too, when there) or, without images/, DIR/*.png. Now: the file
 * names, each image's label files and every file's size (from its header); the pixels are
 * decoded by read(start, n), a batch at a time (loadImagesToPredict: all at once). Images of any
 * one size (the model pads them: paddedToDepth); a model of 1 input channel reads them as
 * gray, of 3 as RGB. Label maps are read for the model's annotators by name; a checkpoint
 * that records no names takes labels/'s folders in sorted order when there are R of them.
 */
export function openImagesToPredict(dir: string, info: CheckpointInfo, labelMapping: LabelMapping = 'auto'): ImageFolderToPredict {
  const { config } = info;
  if (config.ndim !== 2) throw new UserError(`${path.basename(info.file)} is a 3D model: its --data is BraTS cases, not images`);
  const layout = isDirectory(path.join(dir, 'images'));
  const imagesDir = layout ? path.join(dir, 'images') : dir;
  const names = pngNames(imagesDir);
  if (names.length === 0) {
    const brats = holdsNifti(dir) || fs.readdirSync(dir).some((n) => isDirectory(path.join(dir, n)) && holdsNifti(path.join(dir, n)));
    throw new UserError(
      `--data ${displayPath(dir)} holds no PNG images (expected ${layout ? `${displayPath(imagesDir)}/<name>.png` : 'DIR/images/<name>.png or DIR/<name>.png'})` +
        (brats ? `; ${path.basename(info.file)} is a 2D model (config.ndim 2), and NIfTI volumes need a 3D one` : ''),
    );
  }
  const channels = config.inChannels;
  if (channels !== 1 && channels !== 3) {
    throw new UserError(`${path.basename(info.file)} takes ${channels} input channels; PNG images give 1 (gray) or 3 (RGB), so this model cannot read them`);
  }
  const firstFile = path.join(imagesDir, names[0]);
  const first = readPngSync(firstFile);
  const [h, w] = [first.height, first.width];
  const V = h * w;
  const sameSize = (png: { width: number; height: number }, file: string) => {
    if (png.width !== w || png.height !== h) {
      throw new UserError(`${displayPath(file)} is ${png.width}x${png.height}, but ${displayPath(firstFile)} is ${w}x${h}: the images of one --data folder must share one size`);
    }
  };
  const L = config.classes;
  let mapping: 'value' | 'binary';
  try {
    mapping = resolveMapping(labelMapping, L);
  } catch (error) {
    throw new UserError((error as Error).message);
  }
  const readLabels = (file: string, target: Uint8Array) => {
    const png = readPngSync(file);
    sameSize(png, file);
    try {
      // As training reads them (loadImageFolder): 0/1/255 maps keep 255 unlabelled.
      labelValues(png, file, mapping, target, true);
      checkLabels(displayPath(file), target, L, true);
    } catch (error) {
      if (error instanceof ImageFolderError || error instanceof RangeError) throw new UserError(`${(error as Error).message} (the model has ${L} classes)`);
      throw error;
    }
  };

  // The model's annotators, and the folder of labels/ each one's maps are in (if any).
  const R = config.annotators;
  const labelsDir = path.join(dir, 'labels');
  const folders = layout && isDirectory(labelsDir) ? fs.readdirSync(labelsDir).filter((n) => !n.startsWith('.') && isDirectory(path.join(labelsDir, n))).sort() : [];
  let annotatorNames = info.annotatorNames;
  if (!info.namesRecorded && folders.length > 0) {
    if (folders.length === R) {
      annotatorNames = folders;
      process.stderr.write(`note: ${path.basename(info.file)} records no annotator names: labels/'s folders, in sorted order (${folders.join(', ')}), are taken as its CM heads 0..${R - 1}\n`);
    } else {
      process.stderr.write(`note: ${path.basename(info.file)} records no annotator names, and labels/ has ${folders.length} folders for its ${R} CM heads: the labels are not read\n`);
    }
  }
  const unused = folders.filter((f) => !annotatorNames.includes(f));
  if (unused.length > 0 && annotatorNames !== folders && (info.namesRecorded || folders.length === R)) {
    process.stderr.write(`note: labels/${unused.join(', labels/')} ${unused.length === 1 ? 'is' : 'are'} not among the model's annotators (${annotatorNames.join(', ')}): not read\n`);
  }

  const consensusDir = path.join(dir, 'consensus');
  const hasConsensus = layout && isDirectory(consensusDir);
  const count = names.length;
  // images/a.png beside images/a.PNG: one label file would serve both, and predict's pictures (a-*.png) would overwrite each other.
  asUserError(() => checkNoCaseTwins(imagesDir));
  // Each folder's label files by pngKey: labels/<annotator>/a.PNG labels images/a.png (it was left unread).
  const labelFiles = annotatorNames.map((annotator) => (folders.includes(annotator) ? pngFilesByKey(path.join(labelsDir, annotator)) : new Map<string, string[]>()));
  const consensusFiles = hasConsensus ? pngFilesByKey(consensusDir) : new Map<string, string[]>();
  const pickFile = (folder: string, files: Map<string, string[]>, name: string) => asUserError(() => pngFileFor(folder, files, name));
  // Every image's label and consensus files are found now, by name only (nothing is decoded):
  // a missing consensus file is said before any image is predicted, and which annotators
  // labelled which image (present) is known for the whole folder while its images are read
  // a batch at a time (read).
  const labelNames = names.map((name) => annotatorNames.map((annotator, r) => pickFile(path.join(labelsDir, annotator), labelFiles[r], name)));
  const consensusNames = names.map((name) => {
    if (!hasConsensus) return undefined;
    const consensusName = pickFile(consensusDir, consensusFiles, name);
    if (consensusName === undefined) throw new UserError(`consensus/ exists but has no ${name}: ${displayPath(path.join(consensusDir, name))}`);
    return consensusName;
  });
  // Every file's size from its header (a few bytes each), so that a folder of mixed sizes is
  // refused before the first batch is predicted, as when the folder was read whole.
  names.forEach((name, n) => {
    const files = [path.join(imagesDir, name), ...annotatorNames.flatMap((annotator, r) => (labelNames[n][r] === undefined ? [] : [path.join(labelsDir, annotator, labelNames[n][r]!)]))];
    if (consensusNames[n] !== undefined) files.push(path.join(consensusDir, consensusNames[n]!));
    for (const file of files) {
      // A file that does not start as a PNG (a JPEG named .png, an empty file) is decoded now, to
      // be refused by what it is; so is one that does not end with IEND: a file cut part way was
      // refused only when its batch was read, after the earlier images' pictures (or eval's
      // rows) were written. (A whole PNG with bytes after its IEND is read, as PIL reads it.)
      const size = pngSizeSync(file);
      sameSize(size !== undefined && pngEndsWithIend(file) ? size : readPngSync(file), file);
    }
  });
  const present = new Uint8Array(count * R);
  labelNames.forEach((files, n) => files.forEach((file, r) => (present[n * R + r] = file === undefined ? 0 : 1)));
  const labelled = annotatorNames.filter((_, r) => labelNames.some((files) => files[r] !== undefined));

  /** Images start .. start + n - 1 (n cut at the folder's end) as a set of their own, decoded now. */
  const read = (start: number, n: number, options: { images?: boolean } = {}): AnnotatedSet & { names: string[] } => {
    if (!Number.isInteger(start) || !Number.isInteger(n) || start < 0 || n < 0) throw new RangeError(`read(${start}, ${n}): expected whole numbers >= 0`);
    const end = Math.min(count, start + n);
    const k = Math.max(0, end - start);
    // images: false (label maps only, for the fused labels' Dice): the images are not decoded.
    const withImages = options.images !== false;
    const images = new Float32Array(withImages ? k * channels * V : 0);
    const labels = annotatorNames.map(() => new Uint8Array(k * V).fill(UNLABELLED));
    const consensus = hasConsensus ? new Uint8Array(k * V) : undefined;
    for (let i = 0; i < k; i++) {
      const index = start + i;
      const name = names[index];
      const file = path.join(imagesDir, name);
      if (withImages) {
        const png = index === 0 ? first : readPngSync(file);
        sameSize(png, file);
        imageIntensities(png, channels, images.subarray(i * channels * V, (i + 1) * channels * V));
      }
      annotatorNames.forEach((annotator, r) => {
        const labelName = labelNames[index][r];
        if (labelName !== undefined) readLabels(path.join(labelsDir, annotator, labelName), labels[r].subarray(i * V, (i + 1) * V));
      });
      if (consensus) readLabels(path.join(consensusDir, consensusNames[index]!), consensus.subarray(i * V, (i + 1) * V));
    }
    return {
      count: k,
      channels,
      classes: L,
      spatial: [h, w],
      images,
      labels,
      present: present.slice(start * R, end * R),
      ...(consensus ? { consensus } : {}),
      annotatorNames: [...annotatorNames],
      names: names.slice(start, end),
    };
  };
  return { count, channels, classes: L, spatial: [h, w], annotatorNames: [...annotatorNames], names, imagesDir, labelled, hasConsensus, present, read };
}

/**
 * Reads every PNG of `dir` at once (see openImagesToPredict): one set of the whole folder. A
 * folder too large for memory is refused, naming its sizes; predict and eval read a folder a
 * batch at a time instead (openImagesToPredict's read), and take any number of images.
 */
export function loadImagesToPredict(dir: string, info: CheckpointInfo, labelMapping: LabelMapping = 'auto'): ImagesToPredict {
  const folder = openImagesToPredict(dir, info, labelMapping);
  asUserError(() => checkFolderFits(`--data ${displayPath(dir)}`, folder.count, folder.channels, folder.spatial[0] * folder.spatial[1], folder.annotatorNames.length + (folder.hasConsensus ? 1 : 0)));
  return { set: folder.read(0, folder.count), imagesDir: folder.imagesDir, labelled: folder.labelled };
}
