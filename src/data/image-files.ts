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
import { type DecodedPng, readPngSync } from './png';

/** Every image of a folder, with whatever labels and consensus it has, ready for a checkpoint's model. */
export interface ImagesToPredict {
  /** names: the image file names, sorted; annotatorNames: the model's CM heads. */
  set: AnnotatedSet & { names: string[] };
  /** Where the images are: DIR/images or DIR itself. */
  imagesDir: string;
  /** Annotators with at least one label file. */
  labelled: string[];
}

function holdsNifti(folder: string): boolean {
  return fs.readdirSync(folder).some(isNiftiName);
}

/**
 * Reads every PNG of `dir` for a 2D checkpoint: DIR/images/*.png (then DIR/labels/<annotator>/
 * and DIR/consensus/ are read too, when there) or, without images/, DIR/*.png. Images of any
 * one size (the model pads them: paddedToDepth); a model of 1 input channel reads them as
 * gray, of 3 as RGB. Label maps are read for the model's annotators by name; a checkpoint
 * that records no names takes labels/'s folders in sorted order when there are R of them.
 */
export function loadImagesToPredict(dir: string, info: CheckpointInfo, labelMapping: LabelMapping = 'auto'): ImagesToPredict {
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
  const sameSize = (png: DecodedPng, file: string) => {
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
  // Every image is read into memory at once: refuse a folder that cannot be, naming the sizes.
  const labelMaps = annotatorNames.length + (hasConsensus ? 1 : 0);
  let labelFiles: Map<string, string[]>[];
  let consensusFiles: Map<string, string[]>;
  try {
    checkFolderFits(`--data ${displayPath(dir)}`, count, channels, V, labelMaps);
    // images/a.png beside images/a.PNG: one label file would serve both, and predict's pictures (a-*.png) would overwrite each other.
    checkNoCaseTwins(imagesDir);
    // Each folder's label files by pngKey: labels/<annotator>/a.PNG labels images/a.png (it was left unread).
    labelFiles = annotatorNames.map((annotator) => (folders.includes(annotator) ? pngFilesByKey(path.join(labelsDir, annotator)) : new Map<string, string[]>()));
    consensusFiles = hasConsensus ? pngFilesByKey(consensusDir) : new Map<string, string[]>();
  } catch (error) {
    if (error instanceof ImageFolderError) throw new UserError(error.message);
    throw error;
  }
  const pickFile = (folder: string, files: Map<string, string[]>, name: string) => {
    try {
      return pngFileFor(folder, files, name);
    } catch (error) {
      if (error instanceof ImageFolderError) throw new UserError(error.message);
      throw error;
    }
  };
  const images = new Float32Array(count * channels * V);
  const labels = annotatorNames.map(() => new Uint8Array(count * V).fill(UNLABELLED));
  const present = new Uint8Array(count * R);
  const consensus = hasConsensus ? new Uint8Array(count * V) : undefined;
  const labelled = new Set<string>();
  names.forEach((name, n) => {
    const file = path.join(imagesDir, name);
    const png = n === 0 ? first : readPngSync(file);
    sameSize(png, file);
    imageIntensities(png, channels, images.subarray(n * channels * V, (n + 1) * channels * V));
    annotatorNames.forEach((annotator, r) => {
      const labelName = pickFile(path.join(labelsDir, annotator), labelFiles[r], name);
      if (labelName === undefined) return;
      const labelFile = path.join(labelsDir, annotator, labelName);
      readLabels(labelFile, labels[r].subarray(n * V, (n + 1) * V));
      present[n * R + r] = 1;
      labelled.add(annotator);
    });
    if (consensus) {
      const consensusName = pickFile(consensusDir, consensusFiles, name);
      if (consensusName === undefined) throw new UserError(`consensus/ exists but has no ${name}: ${displayPath(path.join(consensusDir, name))}`);
      const consensusFile = path.join(consensusDir, consensusName);
      readLabels(consensusFile, consensus.subarray(n * V, (n + 1) * V));
    }
  });
  const set = { count, channels, classes: L, spatial: [h, w], images, labels, present, ...(consensus ? { consensus } : {}), annotatorNames: [...annotatorNames], names };
  return { set, imagesDir, labelled: annotatorNames.filter((a) => labelled.has(a)) };
}
