// What the eval and predict commands share: which data --data (or its absence) and --split
// mean for a checkpoint, loading its model for inference on the right device, and the checks
// and sizes of that inference (a BraTS model's channels and classes, the sliding window, the
// padding of images to what the U-Net's depth takes).

import * as fs from 'fs';
import * as path from 'path';
import { BRATS_CLASS_NAMES, BRATS_CLASSES, BRATS_CHANNELS, BRATS_MODALITIES } from '../data/brats';
import type { LabelMapping } from '../data/image-folder';
import { loadCheckpoint } from '../model/checkpoint';
import { type CheckpointInfo, readCheckpointInfo } from '../model/checkpoint-info';
import type { Device, ModelConfig } from '../model/config';
import { backendInfo, Model } from '../model/model';
import { paddedSize } from '../train/evaluate';
import type { DatasetSpec } from '../train/experiment';
import type { TrainerExtra } from '../train/trainer';
import { displayPath, UserError } from './common';
import type { RunRecipe } from './train';

/** The --device choices of eval and predict. */
export const DEVICES: readonly Device[] = ['cpu', 'cuda', 'auto'];

/** Why a checkpoint alone does not say what to predict or score, and what to pass instead. */
function noRecipeMessage(info: CheckpointInfo, command: 'predict' | 'eval'): string {
  const who = info.saved ? 'it was trained through the API, not by cmseg train' : "it was written by the API's saveCheckpoint, not by cmseg train";
  const what = info.config.ndim === 2 ? 'a folder of PNG images (DIR/images/*.png or DIR/*.png)' : 'a BraTS folder, a case folder or a cmseg cache';
  const reference = command === 'eval' ? (info.config.ndim === 2 ? ', with consensus/ or labels/ to score against' : ' whose cases have segmentations') : '';
  return `${path.basename(info.file)} records no training data (${who}): name the data to ${command === 'eval' ? 'score' : 'predict'} with --data <dir>, ${what}${reference}`;
}

/** A run's data set, read from `data` instead of where it was trained when given (--data: the image folder moved). */
export function relocatedDataset(recipe: RunRecipe, data: string | undefined, file: string): DatasetSpec {
  if (data === undefined) return recipe.dataset;
  if (recipe.dataset.kind !== 'folder') {
    throw new UserError(`--data is for runs on an image folder (--preset images); ${path.basename(file)} is a ${recipe.preset} run, which reads the data its checkpoint names`);
  }
  return { ...recipe.dataset, root: path.resolve(data) };
}

/** What eval or predict works on: the run's own split (of its data, or of its image folder moved to --data), or new data, whole. */
export type DataTarget =
  | { kind: 'run'; saved: TrainerExtra; recipe: RunRecipe }
  | { kind: 'images'; dir: string; labelMapping?: LabelMapping }
  | { kind: 'volumes'; dir: string };

/**
 * Which data `--data` (or its absence) means for a checkpoint. Without --data: the run's
 * --split (an API checkpoint has none: an error asking for --data). With it: an image-folder
 * run's folder where it is now when --data is that folder, the recorded one is gone (it
 * moved) or --split is typed; otherwise new data: every image or case of --data (--split all
 * asks for that in any case). A BraTS run's --data is always new cases.
 */
export function dataTarget(info: CheckpointInfo, flags: { data?: string; split: string }, splitTyped: boolean, command: 'predict' | 'eval'): DataTarget {
  const { recipe, saved } = info;
  const whole = (dir: string): DataTarget => {
    if (info.config.ndim === 3) return { kind: 'volumes', dir };
    const labelMapping = recipe?.dataset.kind === 'folder' ? recipe.dataset.labelMapping : undefined;
    return { kind: 'images', dir, ...(labelMapping ? { labelMapping } : {}) };
  };
  if (flags.data === undefined) {
    if (!recipe || !saved) throw new UserError(noRecipeMessage(info, command));
    if (flags.split !== 'all') return { kind: 'run', saved, recipe };
    if (recipe.dataset.kind === 'folder') {
      if (!fs.existsSync(recipe.dataset.root)) throw new UserError(`the run's image folder ${recipe.dataset.root} is gone; if it moved, name its new place with --data`);
      return whole(recipe.dataset.root);
    }
    if (recipe.dataset.kind === 'brats') return whole(recipe.dataset.cache);
    throw new UserError(`--split all ${command === 'eval' ? 'scores' : 'predicts'} every image of --data <dir>; an ${recipe.preset} run's own images are its splits (test, validation${command === 'predict' ? ', train' : ''})`);
  }
  const dir = path.resolve(flags.data);
  if (!fs.existsSync(dir)) throw new UserError(`--data not found: ${dir}`);
  if (!fs.statSync(dir).isDirectory()) throw new UserError(`--data must be a folder: ${dir}`);
  if (recipe && saved && recipe.dataset.kind === 'folder' && flags.split !== 'all') {
    const root = recipe.dataset.root;
    if (splitTyped || dir === path.resolve(root) || !fs.existsSync(root)) return { kind: 'run', saved, recipe: { ...recipe, dataset: { ...recipe.dataset, root: dir } } };
    process.stderr.write(
      `note: ${displayPath(dir)} is not the run's image folder (${displayPath(root)} is still there): ${command === 'eval' ? 'scoring' : 'predicting'} every image in it; ` +
        `--split ${command === 'eval' ? 'test|validation' : 'test|validation|train'} would read the run's split from it instead\n`,
    );
    return whole(dir);
  }
  if (splitTyped && flags.split !== 'all') {
    throw new UserError(`--split ${flags.split} picks among a run's own images; --data ${displayPath(dir)} is ${recipe ? 'new data for this run' : 'data this checkpoint records no split of'}, ${command === 'eval' ? 'scored' : 'predicted'} whole: leave out --split`);
  }
  return whole(dir);
}

/**
 * A checkpoint's model for inference, on `device` when given (--device; 'cuda' without a usable
 * GPU fails with the reason), else where it was trained, except that a GPU-trained one runs on the
 * CPU when no GPU can run it here.
 */
export async function loadModelForInference(file: string, saved: { config: { device?: Device } }, device?: Device): Promise<Model> {
  const overrides: Partial<ModelConfig> = {};
  if (device !== undefined) return loadCheckpoint(file, { device });
  const info = backendInfo() as ReturnType<typeof backendInfo> & { cudaTraining?: boolean };
  if (saved.config.device === 'cuda' && (!info.cuda || info.cudaTraining === false || !info.gpuAvailable)) {
    process.stderr.write('note: this checkpoint was trained on the GPU; no GPU can run it here, so it runs on the CPU\n');
    overrides.device = 'cpu';
  }
  return loadCheckpoint(file, overrides);
}

/** A note for images a U-Net of this depth cannot take as they are: how they are padded. */
export function paddingNote(spatial: readonly number[], depth: number): string | undefined {
  const padded = paddedSize(spatial, depth);
  if (padded.every((p, i) => p === spatial[i])) return undefined;
  return `note: the images are ${[...spatial].reverse().join('x')} pixels, not multiples of 2^(depth-1) = ${2 ** (depth - 1)} (depth ${depth}): each is padded to ${[...padded].reverse().join('x')} by repeating its edge pixels, and the predictions are cropped back\n`;
}

/** A 3D checkpoint fit for BraTS cases: 4 input channels (and, to be scored, 4 classes). */
export function checkBratsModel(info: CheckpointInfo, scoring: boolean): void {
  const { config } = info;
  const name = path.basename(info.file);
  if (config.ndim !== 3) throw new UserError(`${name} is a 2D model (config.ndim 2): its --data is a folder of PNG images, not BraTS cases`);
  if (config.inChannels !== BRATS_CHANNELS) {
    throw new UserError(`${name} takes ${config.inChannels} input channel(s), but BraTS cases give ${BRATS_CHANNELS} (${BRATS_MODALITIES.join(', ')}): this model cannot read them`);
  }
  if (scoring && config.classes !== BRATS_CLASSES) {
    throw new UserError(`${name} predicts ${config.classes} classes, but BraTS segmentations hold ${BRATS_CLASSES} (${BRATS_CLASS_NAMES.join(', ')}): eval cannot score it against them`);
  }
}

/** Default sliding-window size of a checkpoint that records none: 64, or the smallest size its depth takes. */
export const DEFAULT_PATCH = 64;

/** The sliding-window size for a 3D checkpoint: --patch, else the run's training patch, else DEFAULT_PATCH (rounded up to what the depth takes). */
export function windowPatch(info: CheckpointInfo, patch: number | undefined): number[] {
  const depth = info.config.depth;
  const multiple = 2 ** (depth - 1);
  if (patch !== undefined && patch % multiple !== 0) throw new UserError(`--patch ${patch} must be a multiple of 2^(depth-1) = ${multiple} (the model's depth is ${depth})`);
  const size = patch ?? (info.recipe?.dataset.kind === 'brats' ? info.recipe.dataset.patch : paddedSize([DEFAULT_PATCH], depth)[0]);
  return [size, size, size];
}
