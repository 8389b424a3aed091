// `cmseg predict`: what a checkpoint sees.
// 2D runs (MNIST, image folders): pictures of the run's own images: the input, the expert
// consensus, the predicted consensus (argmax p), each annotator's estimated labels
// (argmax A_r p) beside the labels it really gave, and each annotator's pixel-wise CM.
// An image folder's pictures are named after its images, read from the folder the run
// recorded (--data: where it is now, if it moved).
// 3D runs (BraTS): sliding-window inference over whole cases (a case folder, a BraTS
// folder, a cache, or by default the run's test split), written as NIfTI in each case's
// original geometry (the crop undone, the header of its t1 file), plus PNG pictures of
// an axial slice through the tumour centre.
// New data (--data) for any checkpoint, one written by the API's saveCheckpoint included:
// every PNG image of a folder (DIR/images/ with optional labels/ and consensus/, or a plain
// folder of PNGs) for a 2D model, padded to the sizes its depth takes; every case of a
// BraTS folder, case folder or cache for a 3D model of 4 input channels.
// Several checkpoints (--checkpoint a b ...) predict as one ensemble (their outputs averaged),
// and --tta averages the predictions of the mirrored inputs; the legend says which.

import * as fs from 'fs';
import * as path from 'path';
import { Command, InvalidArgumentError } from 'commander';
import { type BratsLabelScheme, type BratsNaming, BRATS_CLASSES, bratsClassNames, extentOfDims, releaseBratsLabels, uncropVolume } from '../data/brats';
import { type CaseList, cacheCases, casesInData } from '../data/brats-cases';
import { cacheIndexPath } from '../data/cache';
import { makeFolderSync, writeFileAtomic } from '../data/files';
import { openImagesToPredict } from '../data/image-files';
import type { Extent } from '../data/morphology';
import { writeNifti } from '../data/nifti';
import { type PngImage, writePng } from '../data/png';
import { argmaxAnnotatorProbs, hasNonFinite } from '../eval/metrics';
import type { Device } from '../model/config';
import { argmaxClasses, setNumThreads } from '../model/model';
import { slidingWindowPredict, windowStep } from '../model/sliding-window';
import { captionScale, captioned, classLegend, cmFigure, colorImage, grayImage, grid, labelImage, labelOverlay, legend, luminance, stack, upscale } from '../report/pictures';
import { countOf } from '../eval/report';
import { drawableText, hasGlyph } from '../report/font';
import type { AnnotatedSet } from '../train/data';
import { checkVolumeImages, type InferenceModel, predictImages } from '../train/evaluate';
import type { BratsDatasetSpec } from '../train/experiment';
import { choiceOption, displayPath, given, parseInteger, parseNumber, parsePath, printOutputs, UserError, withExamples } from './common';
import {
  checkBratsModel,
  checkSameRunData,
  dataTarget,
  distinctCheckpointCount,
  type InferenceInfo,
  inferenceMethod,
  loadInference,
  modelsDescription,
  paddingNote,
  readInferenceInfo,
  ttaDescription,
  windowPatch,
  withInferenceOptions,
} from './inference';
import { checkRunCache, checkRunLabelScheme, loadRunData } from './run-data';
import { windowProgress } from './window-progress';

interface PredictFlags {
  checkpoint: string[];
  tta?: boolean;
  out: string;
  data?: string;
  count?: number;
  split: 'test' | 'validation' | 'train' | 'all';
  scale?: number;
  overlap: number;
  patch?: number;
  windowBatch: number;
  /** false (--no-cms): no CM pictures (3D: and no CM sums over the volume); the annotators' maps still come from q_r. */
  cms: boolean;
  /** 3D: how <id>_probs.nii.gz is written: float32, uint8 (p * 255, rounded) or not at all. */
  probs: 'float32' | 'uint8' | 'none';
  device?: Device;
  threads?: number;
  quiet?: boolean;
  geometryTolerance: number;
  labelScheme?: BratsLabelScheme;
}

/** A sheet of captioned pictures with the classes' colours named under it. */
function sheetWithLegend(sheet: PngImage, classNames: readonly string[], unlabelled: boolean, scale: number): PngImage {
  const entries = classLegend(classNames, unlabelled);
  return entries.length ? stack([sheet, legend(entries, sheet.width, scale)], 4) : sheet;
}

/** The largest side of one enlarged picture: a sheet puts several side by side, in memory at once. */
const MAX_PICTURE_SIDE = 4096;

/** The most pixels of one sheet (RGB: 192 MiB), which holds `columns` x `rows` pictures at once. */
const MAX_SHEET_PIXELS = 1 << 26;

/**
 * --scale, or about 256 pixels a side; a scale past MAX_PICTURE_SIDE, or one whose sheet of
 * `columns` x `rows` pictures would pass MAX_SHEET_PIXELS (many annotators: 28 of them at a
 * large scale needed more than 4 GB), is refused before any picture is allocated.
 */
function pictureScale(flags: PredictFlags, h: number, w: number, columns: number, rows: number): number {
  const scale = flags.scale ?? Math.max(1, Math.floor(256 / Math.max(h, w)));
  const bySide = Math.floor(MAX_PICTURE_SIDE / Math.max(h, w));
  const largest = Math.max(1, Math.min(bySide, Math.floor(Math.sqrt(MAX_SHEET_PIXELS / (columns * rows * h * w)))));
  if (Math.max(h, w) * scale > MAX_PICTURE_SIDE) {
    const also = largest < bySide ? ': the sheet of pictures bounds it too' : '';
    throw new UserError(`--scale ${scale} would make the ${w}x${h} pictures ${w * scale}x${h * scale} pixels; at most ${MAX_PICTURE_SIDE} a side (--scale ${largest} or less here${also})`);
  }
  if (columns * rows * h * w * scale * scale > MAX_SHEET_PIXELS) {
    throw new UserError(
      `--scale ${scale} would make a sheet of ${columns}x${rows} pictures of ${w * scale}x${h * scale} pixels, more than ${MAX_SHEET_PIXELS / 2 ** 20} million pixels in all (--scale ${largest} or less here)`,
    );
  }
  return scale;
}

/** Images per predict call when drawing pictures (each brings R*L*L CM channels per pixel). */
const PICTURE_BATCH = 16;

async function runPredict(flags: PredictFlags, splitTyped: boolean): Promise<void> {
  if (flags.threads !== undefined) setNumThreads(flags.threads);
  const info = await readInferenceInfo(flags.checkpoint);
  const target = dataTarget(info, flags, splitTyped, 'predict');
  if (target.kind === 'run') checkSameRunData(info, 'predict');
  if (target.kind === 'images') return predictNewImages(flags, info, target.dir, target.labelMapping);
  if (target.kind === 'volumes') {
    checkBratsModel(info, false);
    return predictVolumes(flags, info, casesInData(target.dir, flags.geometryTolerance, false, flags.labelScheme));
  }
  const { recipe } = target;
  checkRunLabelScheme(recipe.dataset, flags.labelScheme);
  if (recipe.dataset.kind === 'brats') {
    checkRunCache(recipe.dataset, info.annotatorNames, 'consensus');
    return predictVolumes(flags, info, runCases(recipe.dataset, flags.split as 'test' | 'validation' | 'train'));
  }
  return predictRunImages(flags, info, recipe.dataset);
}

/** The 2D pictures of a run's own images (its --split). */
async function predictRunImages(flags: PredictFlags, info: InferenceInfo, dataset: Parameters<typeof loadRunData>[0]): Promise<void> {
  const split = flags.split as 'test' | 'validation' | 'train';
  const data = loadRunData(dataset, info.saved!.config.seed);
  try {
    const set = data.split?.(split);
    if (!set) throw new UserError(`the data of ${info.file} cannot be read as whole images; predict works on 2D in-memory data sets`);
    if (set.spatial.length !== 2) throw new UserError(`predict draws 2D images; this run's images are ${set.spatial.join('x')}`);
    const loaded = await loadInference(info, { device: flags.device, tta: flags.tta });
    const from = dataset.kind === 'folder' ? ` of ${dataset.root} (<image> = the image's file name)` : '';
    try {
      await drawPictures(flags, info, loaded.model, wholeSet(set), {
        count: flags.count ?? 8,
        what: `${split} images`,
        readmeWhat: (n) => `the first ${n} ${split} images${from}`,
        classNames: data.classNames,
      });
    } finally {
      await loaded.dispose();
    }
  } finally {
    await data.close?.();
  }
}

/** The 2D pictures of every image of a folder (new data). */
async function predictNewImages(flags: PredictFlags, info: InferenceInfo, dir: string, labelMapping?: Parameters<typeof openImagesToPredict>[2]): Promise<void> {
  // The folder is read a batch of PICTURE_BATCH images at a time, as they are drawn: read
  // whole, 5000 images of 1024x1024 (21 GB as float32) could not be predicted at all.
  const folder = openImagesToPredict(dir, info, labelMapping);
  const { imagesDir } = folder;
  const set = { count: folder.count };
  const note = paddingNote(folder.spatial, info.config.depth);
  if (note) process.stderr.write(note);
  const loaded = await loadInference(info, { device: flags.device, tta: flags.tta, pad: true });
  try {
    await drawPictures(flags, info, loaded.model, { ...folder, read: (start, n) => ({ set: folder.read(start, n), offset: 0 }) }, {
      count: flags.count ?? set.count,
      what: `images of ${displayPath(dir)}`,
      readmeWhat: (n) => `${n === set.count ? 'every one' : `the first ${n}`} of the ${set.count} images in ${imagesDir} (<image> = the image's file name)`,
    });
  } finally {
    await loaded.dispose();
  }
}

/**
 * The images drawPictures draws: their sizes and names, which annotators labelled which
 * image (present, [count, R]), and read(start, n): a set holding images start .. start + n - 1
 * from its image `offset` on (a run's split in memory: the split itself; a folder of new
 * images: those n images, read from their files only now).
 */
interface PictureSource {
  count: number;
  channels: number;
  classes: number;
  spatial: readonly number[];
  annotatorNames: string[];
  hasConsensus: boolean;
  present: Uint8Array;
  read(start: number, n: number): { set: AnnotatedSet; offset: number };
}

/** An in-memory set as a PictureSource. */
function wholeSet(set: AnnotatedSet): PictureSource {
  return { ...set, hasConsensus: set.consensus !== undefined, read: (start) => ({ set, offset: start }) };
}

/** Pictures of the first `count` images of `set`: input, truth, prediction, each annotator's estimate and CM, a sheet; and a legend. */
async function drawPictures(
  flags: PredictFlags,
  info: InferenceInfo,
  model: InferenceModel,
  set: PictureSource,
  words: { count: number; what: string; readmeWhat: (n: number) => string; classNames?: readonly string[] },
): Promise<void> {
  const [h, w] = set.spatial;
  const R = model.config.annotators;
  // The sheet: input, truth and prediction; the estimated annotators; their labels.
  const scale = pictureScale(flags, h, w, Math.max(3, R), info.learnsCms ? 3 : 2);
  const learnsCms = info.learnsCms;
  const drawCms = learnsCms && flags.cms !== false;
  // 2D predictions write pictures only: a probability volume is a 3D case's.
  if (flags.probs !== 'float32') process.stderr.write(`note: --probs ${flags.probs} applies to 3D cases (NIfTI probability volumes); 2D images get pictures only\n`);
  const method = inferenceMethod(info);
  const L = set.classes;
  const V = h * w;
  const C = set.channels;
  const count = Math.min(words.count, set.count);
  const classNames = Array.from({ length: L }, (_, c) => words.classNames?.[c] ?? (c === 0 ? 'background' : `class ${c}`));
  const names = set.annotatorNames.length === R ? set.annotatorNames : info.annotatorNames;
  const files = annotatorFileNames(Array.from({ length: R }, (_, r) => names[r] ?? `annotator${r}`));
  const captionNames = annotatorCaptions(names, files);
  const outDir = path.resolve(flags.out);
  makeFolderSync(outDir);
  const written: string[] = [];
  const save = async (name: string, image: Parameters<typeof writePng>[1]) => {
    const target = path.join(outDir, name);
    await writePng(target, image);
    written.push(target);
  };
  // Images whose p or q_r held NaN or Inf (a diverged model): their maps are the argmax of
  // garbage (class 0 everywhere NaN is), which drew as a confident "background". Their
  // captions, the legend and a warning say so.
  const nonFinite: string[] = [];
  for (let start = 0; start < count; start += PICTURE_BATCH) {
    const part = set.read(start, Math.min(PICTURE_BATCH, count - start));
    const p = await predictImages(model, part.set, Math.min(PICTURE_BATCH, count - start), part.offset);
    for (let n = 0; n < p.n; n++) {
      const index = start + n;
      // An image folder's own names say which picture is which; MNIST's images are numbered.
      const prefix = part.set.names ? path.parse(part.set.names[part.offset + n]).name : `image-${String(index).padStart(3, '0')}`;
      const badP = hasNonFinite(p.probs.subarray(n * L * V, (n + 1) * L * V));
      const badQ = Array.from({ length: R }, (_, r) => learnsCms && hasNonFinite(p.annotatorProbs.subarray((n * R + r) * L * V, (n * R + r + 1) * L * V)));
      if (badP || badQ.some(Boolean)) nonFinite.push(prefix);
      const nan = (bad: boolean) => (bad ? ' NaN OUTPUT' : '');
      // An RGB model's input in colour, its overlays over the luminance; otherwise the first channel.
      const pixels = p.batch.images.subarray(n * C * V, (n + 1) * C * V);
      const image = C === 3 ? luminance(pixels, V) : pixels.subarray(0, V);
      const map = (labels: Uint8Array) => labels.subarray(n * V, (n + 1) * V);
      const input = upscale(C === 3 ? colorImage(pixels, h, w) : grayImage(image, h, w), scale);
      const predicted = upscale(labelOverlay(image, map(p.consensus), h, w), scale);
      const truth = p.batch.consensus ? upscale(labelOverlay(image, map(p.batch.consensus), h, w), scale) : null;
      await save(`${prefix}-input.png`, input);
      await save(`${prefix}-consensus.png`, predicted);
      if (truth) await save(`${prefix}-truth.png`, truth);
      const estimated = [];
      const observed = [];
      let unlabelled = false; // whether a drawn label map has unlabelled (255) pixels: the legend then names their gray
      for (let r = 0; r < R; r++) {
        const name = files[r];
        const present = p.batch.present[n * R + r] !== 0;
        observed.push(present ? upscale(labelImage(map(p.batch.labels[r]), h, w), scale) : null);
        if (present && map(p.batch.labels[r]).includes(255)) unlabelled = true;
        if (!learnsCms) continue; // naive / oracle: the annotator heads were never trained
        const est = upscale(labelOverlay(image, map(p.annotatorMaps[r]), h, w), scale);
        estimated.push(est);
        await save(`${prefix}-annotator-${name}.png`, est);
        if (drawCms) await save(`${prefix}-cm-${name}.png`, cmFigure(p.cms, n, r, R, L, h, w, Math.max(1, Math.floor(scale / 2)), { annotator: captionNames[r], classes: classNames }));
      }
      // One sheet per image: input, truth, prediction; estimated annotators; their real labels.
      const rows = [
        [captioned(input, 'input'), captioned(truth, 'truth'), captioned(predicted, `prediction${nan(badP)}`)],
        ...(learnsCms ? [estimated.map((im, r) => captioned(im, `${captionNames[r]} (estimated)${nan(badQ[r])}`))] : []),
        observed.map((im, r) => captioned(im, `${captionNames[r]} (labels)`)),
      ];
      await save(`${prefix}-sheet.png`, sheetWithLegend(grid(rows, 4), classNames, unlabelled, captionScale(input.width)));
    }
  }
  const truthLine = set.hasConsensus
    ? ['<image>-truth.png               the expert consensus over the input']
    : ['(the folder has no consensus/: no truth pictures, and the sheet\'s first row has a gap where the truth would be)'];
  const anyLabels = set.present.some((x) => x !== 0);
  const readme = [
    `Predictions of ${modelsDescription(info)} on ${words.readmeWhat(count)}.`,
    ...(flags.tta ? [ttaDescription(2)] : []),
    '',
    '<image>-input.png               the input, scaled to its own range (in colour for an RGB model; otherwise its first channel in gray)',
    ...truthLine,
    '<image>-consensus.png           the predicted consensus, argmax p',
    '<image>-annotator-<name>.png    the estimated labels of that annotator, argmax A_r p',
    drawCms
      ? `<image>-cm-<name>.png           that annotator's pixel-wise CM: a ${L}x${L} grid, tile (i, j) = p(says i | true j) per pixel, rows and columns named, a colour bar (viridis, 0 dark .. 1 bright)`
      : '(--no-cms: no CM pictures)',
    `<image>-sheet.png               row 1 input, truth, prediction; row 2 estimated annotators; row 3 their real labels (each captioned; the classes' colours named under it)${anyLabels ? '' : ' (none here: the row is empty)'}`,
    ...(learnsCms ? [FILE_NAME_RULE] : [`(${method} does not learn annotator CMs: no annotator or CM pictures, and the sheet has rows 1 and 3 only)`]),
    `annotators: ${annotatorEntries(names, files).join(', ')}${!info.namesRecorded && names.every((n, r) => n === `annotator${r}`) ? ' (the checkpoint records no names: its CM heads in order)' : ''}`,
    ...(nonFinite.length > 0 ? ['', nonFiniteText(nonFinite, count, 'images')] : []),
    '',
  ].join('\n');
  const readmeFile = path.join(outDir, 'README.txt');
  await writeFileAtomic(readmeFile, Buffer.from(readme));
  noteEarlierOutputs(outDir, written, /-(input|consensus|truth|sheet|annotator-.+|cm-.+)\.png$/);
  if (nonFinite.length > 0) process.stderr.write(`warning: ${nonFiniteText(nonFinite, count, 'images')}\n`);
  process.stdout.write(`wrote ${countOf(written.length, 'PNG file')} for ${count} ${words.what}\n`);
  printOutputs([
    ['pictures', outDir],
    ['legend', readmeFile],
  ]);
}

// ---------------------------------------------------------------------------
// 3D: whole BraTS cases

/** A BraTS run's own cases: its --split, read from its cache. */
function runCases(spec: BratsDatasetSpec, split: 'test' | 'validation' | 'train'): CaseList {
  if (!fs.existsSync(cacheIndexPath(spec.cache))) throw new UserError(`the run's cache ${spec.cache} is gone; name the cases with --data`);
  const list = cacheCases(spec.cache, spec.splits[split]);
  return { ...list, from: `the ${split} split of the run (${list.from})` };
}

/**
 * Our labels 0..3 in the numbering of the case's own files (releaseBratsLabels): enhancing
 * tumour is 4 in BraTS 2018-2021 files; BraTS-PEDs 2024 files read with the label scheme
 * peds2024 get 1 ET, 2 NET, 4 ED. Only a model of BraTS's 4 classes has these classes: for any
 * other class count (an API model, which predict accepts) class 3 is not ET, and writing it as
 * 4 would merge it with a 5-class model's class 4; such labels stay the model's class indices.
 */
function releaseLabels(labels: Uint8Array, naming: BratsNaming, scheme: BratsLabelScheme, classes: number): Uint8Array {
  return classes === BRATS_CLASSES ? releaseBratsLabels(labels, naming, scheme) : labels;
}

/**
 * The axial slice (constant z) through the tumour of `labels`: of the slices that hold tumour
 * voxels, the one nearest their centroid (the centroid's own slice can hold none: two lesions,
 * or a ring); undefined when there are none.
 */
export function tumourSlice(labels: Uint8Array, extent: Extent): number | undefined {
  const plane = extent.h * extent.w;
  const perSlice = new Float64Array(extent.d);
  for (let i = 0; i < labels.length; i++) if (labels[i] !== 0 && labels[i] !== 255) perSlice[Math.floor(i / plane)]++;
  let sum = 0;
  let count = 0;
  perSlice.forEach((n, z) => ((sum += n * z), (count += n)));
  if (count === 0) return undefined;
  const centre = sum / count;
  let best = -1;
  for (let z = 0; z < extent.d; z++) {
    if (perSlice[z] === 0) continue;
    // Nearest the centroid; between two as near, the one with more tumour.
    const nearer = best < 0 || Math.abs(z - centre) < Math.abs(best - centre) || (Math.abs(z - centre) === Math.abs(best - centre) && perSlice[z] > perSlice[best]);
    if (nearer) best = z;
  }
  return best;
}

/** Slice z of every channel of a [K, D, H, W] array, as [K, H, W]. */
function axialSlice<T extends Float32Array | Uint8Array>(data: T, channels: number, extent: Extent, z: number): T {
  const plane = extent.h * extent.w;
  const V = extent.d * plane;
  const out = new (data.constructor as new (n: number) => T)(channels * plane);
  for (let k = 0; k < channels; k++) out.set(data.subarray(k * V + z * plane, k * V + (z + 1) * plane), k * plane);
  return out;
}

async function predictVolumes(flags: PredictFlags, info: InferenceInfo, list: CaseList): Promise<void> {
  const loaded = await loadInference(info, { device: flags.device, tta: flags.tta });
  try {
    await predictCases(flags, info, list, loaded.model);
  } finally {
    await loaded.dispose();
  }
}

/** predictVolumes' work with the model loaded: each case's volumes and pictures, then the legend. */
async function predictCases(flags: PredictFlags, info: InferenceInfo, list: CaseList, model: InferenceModel): Promise<void> {
  const ids = flags.count !== undefined ? list.ids.slice(0, flags.count) : list.ids;
  const patch = windowPatch(info, flags.patch);
  const method = inferenceMethod(info);
  const L = model.config.classes;
  const R = model.config.annotators;
  // Window predictions per window: one per distinct checkpoint and mirroring.
  const passes = distinctCheckpointCount(info) * (flags.tta ? 2 ** 3 : 1);
  const names = info.annotatorNames;
  const files = annotatorFileNames(names);
  const captionNames = annotatorCaptions(names, files);
  const learnsCms = info.learnsCms;
  // The CM sums are most of the stitching's memory and time (R*L*L of the R*L*L + R*L + L channels).
  const wantCms = learnsCms && flags.cms !== false;
  // BraTS's class names and release labels belong to a model of its 4 classes only.
  const brats = L === BRATS_CLASSES;
  const classNames = brats ? bratsClassNames(list.labelScheme) : Array.from({ length: L }, (_, c) => (c === 0 ? 'background' : `class ${c}`));
  noteHighOverlap(flags.overlap, patch);
  const outDir = path.resolve(flags.out);
  makeFolderSync(outDir);
  const volumes: string[] = [];
  const pictures: string[] = [];
  const namings = new Set<BratsNaming>();
  // Cases whose p or q_r held NaN or Inf: not written (a label volume of the argmax of NaN is
  // class 0, a "no tumour" that a pipeline would take as a prediction); the others go on.
  const nonFinite: string[] = [];
  for (const [k, id] of ids.entries()) {
    const started = Date.now();
    const c = await list.load(id);
    namings.add(c.naming);
    // A --scale too large for this case's pictures is refused now, before its sliding-window
    // prediction (minutes on a real case) and before any of its volumes is written.
    const scale = pictureScale(flags, c.extent.h, c.extent.w, Math.max(3, R), 2); // FLAIR, truth, prediction; the annotators
    // Named with the case (slidingWindowPredict's own check names only an index).
    checkVolumeImages({ id, images: c.images, extent: c.extent }, model.config.inChannels);
    const progress = windowProgress(`[${k + 1}/${ids.length}] ${id}`, process.stderr, flags.quiet);
    let p: Awaited<ReturnType<typeof slidingWindowPredict>>;
    try {
      p = await slidingWindowPredict(model, c.images, c.extent, {
        patch,
        overlap: flags.overlap,
        batchSize: flags.windowBatch,
        cms: wantCms,
        annotatorProbs: learnsCms,
        onProgress: progress.onProgress,
      });
    } finally {
      progress.stop();
    }
    if (hasNonFinite(p.probs) || (p.annotatorProbs !== undefined && hasNonFinite(p.annotatorProbs))) {
      nonFinite.push(id);
      process.stderr.write(`[${k + 1}/${ids.length}] ${id}: the model's output is non-finite (NaN or Inf): nothing written for this case\n`);
      continue;
    }
    const full = extentOfDims(c.original.dims);
    const V = c.extent.d * c.extent.h * c.extent.w;
    const dims = [...c.original.dims];
    const writeVolume = async (name: string, data: Uint8Array | Float32Array, datatype: 'uint8' | 'float32', volumeDims = dims, scaling?: { slope: number }) => {
      const target = path.join(outDir, name);
      await writeNifti(target, { dims: volumeDims, data, affine: c.original.affine }, { datatype, ...(c.header ? { header: c.header } : {}), ...(scaling ? { scaling } : {}), description: `cmseg ${method} ${name}` });
      volumes.push(target);
    };
    const labelsToRelease = (labels: Uint8Array) => uncropVolume(releaseLabels(labels, c.naming, c.labelScheme, L), c.crop, full);
    const consensus = argmaxClasses(p.probs, 1, L);
    // Pictures show the axial slice through the predicted tumour's centre (else the
    // expert's, else the middle). The CMs' slice is taken now and the whole-volume CMs
    // (R*L*L floats per voxel, most of the prediction's memory) let go before the writes.
    const z = tumourSlice(consensus, c.extent) ?? (c.seg ? tumourSlice(c.seg, c.extent) : undefined) ?? Math.floor(c.extent.d / 2);
    const cmSlice = wantCms ? axialSlice(p.cms!, R * L * L, c.extent, z) : undefined;
    delete p.cms;
    await writeVolume(`${id}_consensus.nii.gz`, labelsToRelease(consensus), 'uint8');
    // uint8: round(255 p) stored with scl_slope 1/255, so that a reader (nibabel's get_fdata)
    // gets p back, not 0..255.
    if (flags.probs !== 'none') {
      await writeVolume(`${id}_probs.nii.gz`, probsVolume(p.probs, L, c.crop, full, flags.probs), flags.probs, [...dims, L], flags.probs === 'uint8' ? { slope: 1 / 255 } : undefined);
    }
    const annotatorMaps = learnsCms ? argmaxAnnotatorProbs(p.annotatorProbs!, 1, R, L) : [];
    // Named by annotator, as the 2D pictures are (<image>-annotator-<name>.png).
    for (const [r, map] of annotatorMaps.entries()) await writeVolume(`${id}_annotator-${files[r]}.nii.gz`, labelsToRelease(map), 'uint8');

    const { h, w } = c.extent;
    const flair = axialSlice(c.images.subarray(3 * V, 4 * V), 1, c.extent, z);
    const overlay = (labels: Uint8Array) => upscale(labelOverlay(flair, axialSlice(labels, 1, c.extent, z), h, w), scale);
    const save = async (name: string, image: Parameters<typeof writePng>[1]) => {
      const target = path.join(outDir, name);
      await writePng(target, image);
      pictures.push(target);
    };
    const flairPicture = upscale(grayImage(flair, h, w), scale);
    const rows = [
      // z in the case's own voxels (the pictures are of the cropped case).
      [captioned(flairPicture, `FLAIR z ${c.crop.z0 + z}`), captioned(c.seg ? overlay(c.seg) : null, 'truth'), captioned(overlay(consensus), 'prediction')],
      annotatorMaps.map((map, r) => captioned(overlay(map), `${captionNames[r]} (estimated)`)),
    ];
    await save(`${id}_slice.png`, sheetWithLegend(grid(rows.filter((row) => row.length > 0), 4), classNames, false, captionScale(flairPicture.width)));
    if (cmSlice) {
      for (let r = 0; r < R; r++) await save(`${id}_cm-${files[r]}.png`, cmFigure(cmSlice, 0, r, R, L, h, w, Math.max(1, Math.floor(scale / 2)), { annotator: captionNames[r], classes: classNames }));
    } else if (k === 0 && !learnsCms) {
      process.stderr.write(`note: ${method} does not learn annotator CMs: no annotator volumes or CM pictures\n`);
    }
    const each = passes > 1 ? ` (each predicted ${passes} times)` : '';
    if (!flags.quiet) process.stderr.write(`[${k + 1}/${ids.length}] ${id}: ${p.windows} window${p.windows === 1 ? '' : 's'}${each} in ${((Date.now() - started) / 1000).toFixed(1)} s (slice z = ${c.crop.z0 + z})\n`);
  }
  const readme = [
    `Predictions of ${modelsDescription(info)} for ${ids.length} case(s) from ${list.from}.`,
    `Sliding windows of ${patch.join('x')} voxels, overlap ${flags.overlap}, Gaussian weighting. Every volume is on the case's original grid`,
    "(the crop to the brain undone) with the geometry of the case's t1 file (another modality's when the t1 has no orientation).",
    ...(flags.tta ? [`${ttaDescription(3)} Each window is mirrored, as in nnU-Net.`] : []),
    '',
    ...(brats && list.labelScheme === 'peds2024'
      ? [
          '<id>_consensus.nii.gz        uint8, the predicted consensus argmax p, in BraTS-PEDs 2024 labels (label scheme peds2024):',
          '                             0 background, 1 enhancing tumour (ET), 2 non-enhancing tumour (NET and CC: one class here), 4 edema (ED);',
          '                             never 3 (the cystic component is not told apart from NET)',
        ]
      : brats
      ? [
          '<id>_consensus.nii.gz        uint8, the predicted consensus argmax p, in the release\'s labels:',
          '                             0 background, 1 necrotic core (NCR), 2 edema (ED), 4 enhancing tumour (ET) for BraTS 2018-2021',
          '                             names; 3 for ET with BraTS 2023 names (the labels of the case\'s own files)',
        ]
      : [
          `<id>_consensus.nii.gz        uint8, the predicted consensus argmax p, as the model's class indices 0..${L - 1}`,
          `                             (it predicts ${L} classes, not BraTS's ${BRATS_CLASSES}: no BraTS labels or renumbering)`,
        ]),
    ...(flags.probs === 'none'
      ? ['(--probs none: no probability volumes)']
      : flags.probs === 'uint8'
        ? [
            `<id>_probs.nii.gz            uint8, 4D [x, y, z, class]: round(255 p(class)) for classes 0..${L - 1}${brats ? ' (class 3 = ET)' : ''}; 255 background outside the brain;`,
            '                             stored with scl_slope 1/255, so readers that apply it (nibabel\'s get_fdata()) give p(class) within 1/255',
          ]
        : [`<id>_probs.nii.gz            float32, 4D [x, y, z, class]: p(class) for classes 0..${L - 1}${brats ? ' (class 3 = ET)' : ''}; background = 1 outside the brain`]),
    ...(learnsCms
      ? [
          '<id>_annotator-<name>.nii.gz uint8, that annotator\'s estimated segmentation argmax A_r p, labels as the consensus',
          wantCms
            ? `<id>_cm-<name>.png           that annotator's pixel-wise CM on the slice: a ${L}x${L} grid, tile (i, j) = p(says i | true j), rows and columns named, a colour bar (viridis, 0 dark .. 1 bright)`
            : '(--no-cms: no CM pictures)',
          FILE_NAME_RULE,
        ]
      : [`(${method} does not learn annotator CMs: no annotator volumes or CM pictures)`]),
    '<id>_slice.png               row 1: FLAIR, expert labels (when known), predicted consensus; row 2: each annotator\'s estimate (each captioned; the classes\' colours named under it)',
    'Pictures show the axial slice through the predicted tumour (of the slices holding it, the nearest its centre; its z, in the case\'s voxels, is in the FLAIR caption), of the cropped case, rows = voxel y, columns = voxel x.',
    `annotators: ${annotatorEntries(names, files).map((n, r) => `${r} = ${n}`).join(', ')}`,
    ...(nonFinite.length > 0 ? ['', nonFiniteText(nonFinite, ids.length, 'cases')] : []),
    '',
  ].join('\n');
  const readmeFile = path.join(outDir, 'README.txt');
  await writeFileAtomic(readmeFile, Buffer.from(readme));
  noteEarlierOutputs(outDir, [...volumes, ...pictures], /_(consensus|probs|annotator-.+)\.nii\.gz$|_(slice|cm-.+)\.png$/);
  const predicted = ids.length - nonFinite.length;
  process.stdout.write(`predicted ${predicted} case(s) from ${list.from}: ${countOf(volumes.length, 'NIfTI volume')} and ${countOf(pictures.length, 'PNG picture')} (${!brats ? `labels: the model's class indices 0..${L - 1}` : list.labelScheme === 'peds2024' ? 'labels in BraTS-PEDs 2024 numbering: 1 ET, 2 NET, 4 ED' : `labels in BraTS ${[...namings].join('/')} numbering`})\n`);
  printOutputs([
    ['volumes', outDir],
    ['legend', readmeFile],
  ]);
  // The cases written stay; the command fails, so that a script does not take the set as complete.
  if (nonFinite.length > 0) throw new UserError(nonFiniteText(nonFinite, ids.length, 'cases'));
}

/**
 * The windows a case takes grow with the cube of 1 / (1 - overlap): 0.99 moves a 64^3 window
 * by one voxel, some 300,000 windows for a case of twice the patch, which looks like a hang.
 * Allowed (a user may want it), but said before the first case, with the default's count.
 */
function noteHighOverlap(overlap: number, patch: readonly number[]): void {
  const p = Math.min(...patch);
  const step = windowStep(p, overlap);
  if (step * 4 >= p) return; // up to 0.75: at most 125 windows for that case
  const windows = (s: number) => (Math.ceil(p / s) + 1) ** 3;
  process.stderr.write(
    `note: --overlap ${overlap} moves each ${p}-voxel window by ${step} voxel(s): about ${windows(step).toLocaleString('en-US')} windows for a case twice the patch on each axis ` +
      `(${windows(Math.floor(p / 2))} at the default 0.5, as nnU-Net)\n`,
  );
}

/**
 * Files in `outDir` named like predict's outputs (`pattern`) that this run did not write: an
 * earlier prediction's (another --probs, --no-cms, other annotators or images). They are
 * left alone (they may be wanted), but said, so that the folder is not read as one run's.
 */
function noteEarlierOutputs(outDir: string, written: readonly string[], pattern: RegExp): void {
  const ours = new Set(written.map((file) => path.basename(file)));
  const earlier = fs.readdirSync(outDir).filter((name) => pattern.test(name) && !ours.has(name)).sort();
  if (earlier.length === 0) return;
  const shown = earlier.slice(0, 4).join(', ') + (earlier.length > 4 ? `, ... (${earlier.length - 4} more)` : '');
  process.stderr.write(`note: ${displayPath(outDir)} also holds ${earlier.length} file(s) of an earlier prediction that this one did not write, left as they were: ${shown}\n`);
}

/** The legend's and the warning's words for the images (cases) whose outputs held NaN or Inf. */
function nonFiniteText(which: readonly string[], total: number, unit: 'images' | 'cases'): string {
  const shown = which.slice(0, 8).join(', ') + (which.length > 8 ? `, ... (${which.length - 8} more)` : '');
  return unit === 'images'
    ? `the model's output is non-finite (NaN or Inf: a diverged model?) on ${which.length} of ${total} images (${shown}): their predicted maps are not predictions (NaN draws as class 0); their captions say NaN OUTPUT`
    : `the model's output is non-finite (NaN or Inf: a diverged model?) on ${which.length} of ${total} cases (${shown}): no volumes or pictures were written for them`;
}

/** An annotator's name as a file-name part: anything but letters, digits, '.', '_' and '-' becomes '_'. */
function fileSafe(name: string): string {
  return name.replace(/[^A-Za-z0-9._-]/g, '_');
}

/** The legend's line on how annotators' names become file-name parts (annotatorFileNames). */
const FILE_NAME_RULE =
  "<name> is the annotator's name with every character but letters, digits, '.', '_' and '-' made '_'; names that then coincide (ignoring case) end in -<r>, r = the annotator's index";

/**
 * Each annotator's file-name part: fileSafe of its name, except that names that coincide once
 * made file-safe (compared ignoring case, for case-insensitive file systems) end in -<r>, r the
 * annotator's index (CM head), so that no file overwrites another's.
 */
export function annotatorFileNames(names: readonly string[]): string[] {
  const parts = names.map(fileSafe);
  // Appending -<r> can meet another name (x_y-1 beside x_y and x y): repeat until every part is unique.
  for (;;) {
    const count = new Map<string, number>();
    for (const part of parts) count.set(part.toLowerCase(), (count.get(part.toLowerCase()) ?? 0) + 1);
    const colliding = parts.flatMap((part, r) => (count.get(part.toLowerCase())! > 1 ? [r] : []));
    if (colliding.length === 0) return parts;
    for (const r of colliding) parts[r] = `${parts[r]}-${r}`;
  }
}

/**
 * The annotators' names as pictures caption them. The pictures' font draws ASCII and accented
 * Latin letters; a name with others (张伟, 李娜) draws as '??', the same for two annotators, so
 * then every caption uses the file-name parts instead (unique, and README.txt maps them).
 */
export function annotatorCaptions(names: readonly (string | undefined)[], files: readonly string[]): string[] {
  const wanted = files.map((file, r) => names[r] ?? file);
  const drawn = wanted.map((name) => [...drawableText(name)].map((ch) => (hasGlyph(ch) ? ch.toUpperCase() : '?')).join(''));
  const clash = drawn.some((d, r) => drawn.indexOf(d) !== r || (d.includes('?') && !wanted[r].includes('?')));
  return clash ? [...files] : wanted;
}

/** The legend's "annotators:" entries: each name, with its file-name part when that is not the name. */
function annotatorEntries(names: readonly string[], files: readonly string[]): string[] {
  return names.map((n, r) => (files[r] === n ? n : `${n} (files: ${files[r]})`));
}

export function registerPredictCommand(program: Command): Command {
  const command = program
    .command('predict')
    .description("a checkpoint's predictions: 2D pictures of its images, or 3D BraTS cases as NIfTI (consensus, probabilities, each annotator) with CM pictures")
    .requiredOption(
      '--checkpoint <files...>',
      "a checkpoint written by cmseg train, or by the API's saveCheckpoint (then --data is needed). Several: an ensemble, their outputs averaged " +
        "(same ndim, input channels, classes and annotators; the first one's run decides the data, and the others must have trained on the same split, else give --data)",
    )
    .option('--tta', 'test-time augmentation: also predict the inputs mirrored along every combination of spatial axes (4 in 2D, 8 in 3D) and average the flipped-back outputs')
    .requiredOption('--out <dir>', 'folder for the predictions', parsePath('--out'))
    .option(
      '--data <dir>',
      'new data, every image or case predicted. 2D models: a folder of PNGs (DIR/images/*.png, with labels/<annotator>/ and consensus/ drawn when there, or DIR/*.png); ' +
        'images of one size, padded to multiples of 2^(depth-1) by repeating edge pixels and cropped back. 3D models (4 input channels): a BraTS case folder, a BraTS folder or a cache. ' +
        "For an image-folder run, its own folder (where it was, where it moved if the old place is gone, or any folder with --split typed) gives the run's --split images",
      parsePath('--data'),
    )
    .option('--count <n>', "how many images (2D: default 8 of a run's split, all of --data) or cases (3D, default all)", parseInteger(1))
    .addOption(choiceOption('--split <name>', "which of the run's images or cases; all: every image or case of --data", ['test', 'validation', 'train', 'all']).default('test'))
    .option('--scale <n>', 'pixel enlargement of the pictures (default: about 256 pixels per picture)', parseInteger(1))
    .option('--overlap <x>', '3D: sliding-window overlap, 0 <= x < 1', parseOverlap, 0.5)
    .option('--no-cms', 'no CM pictures; 3D: also no CMs summed over the volume (about 3/4 of the stitching\'s memory and half its time). The annotators\' maps are still written')
    .addOption(
      choiceOption(
        '--probs <type>',
        '3D: <id>_probs.nii.gz as float32, as uint8 (round(255 p), a quarter of the size and much faster to compress), or none',
        ['float32', 'uint8', 'none'],
      ).default('float32'),
    );
  withInferenceOptions(command).action((flags: PredictFlags, cmd: Command) => runPredict(flags, given(cmd, 'split')));
  return withExamples(
    command,
    'cmseg predict --checkpoint runs/cm-dense/best.safetensors --out runs/cm-dense/pictures --count 4',
    'cmseg predict --checkpoint runs/brats-cm/best.safetensors --data data/BraTS2021/BraTS2021_00000 --out predictions',
    'cmseg predict --checkpoint model.safetensors --data my-images --out pictures',
    'cmseg predict --checkpoint runs/brats-a/best.safetensors runs/brats-b/best.safetensors --tta --out predictions',
  );
}

/**
 * The probabilities [L, cropped V] on the case's full grid, [L, full V] (outside the crop,
 * where the model is not asked, background has probability 1), as float32 or as uint8
 * round(255 p).
 */
function probsVolume(
  probs: Float32Array,
  L: number,
  crop: Parameters<typeof uncropVolume>[1],
  full: Extent,
  type: 'float32' | 'uint8',
): Float32Array | Uint8Array {
  const V = probs.length / L;
  const fullVoxels = full.d * full.h * full.w;
  const out = type === 'uint8' ? new Uint8Array(L * fullVoxels) : new Float32Array(L * fullVoxels);
  for (let cls = 0; cls < L; cls++) {
    const plane = uncropVolume(probs.subarray(cls * V, (cls + 1) * V), crop, full, 1, cls === 0 ? 1 : 0);
    if (type === 'float32') {
      out.set(plane, cls * fullVoxels);
    } else {
      for (let v = 0; v < fullVoxels; v++) out[cls * fullVoxels + v] = Math.min(255, Math.round(255 * plane[v]));
    }
  }
  return out;
}

function parseOverlap(value: string): number {
  const x = parseNumber(0)(value);
  if (x >= 1) throw new InvalidArgumentError('expected a number >= 0 and < 1.');
  return x;
}
