// A run's data as the commands read it (train, eval, predict): the experiment's data set,
// with one-line messages for the mistakes a user can fix.

import * as fs from 'fs';
import { cacheIndexPath, cacheLabelScheme, readCacheIndex } from '../data/cache';
import { ImageFolderError } from '../data/image-folder';
import * as path from 'path';
import type { BratsLabelScheme } from '../data/brats';
import { type DatasetSpec, type ExperimentData, type ExperimentRuntime, loadExperimentData, type RunRecipe, runCacheDir } from '../train/experiment';
import { sameNames, UserError } from './common';

/** loadExperimentData, with one-line messages for an image folder that moved or does not fit the run. */
export function loadRunData(dataset: DatasetSpec, seed: number, runtime?: ExperimentRuntime): ExperimentData {
  if (dataset.kind === 'folder' && dataset.root && !fs.existsSync(dataset.root)) {
    throw new UserError(`the run's image folder ${dataset.root} is gone; if it moved, name its new place with --data`);
  }
  if (dataset.kind === 'brats' && dataset.cache && !fs.existsSync(dataset.cache)) {
    throw new UserError(`the run's cache ${dataset.cache} is gone; if it moved, name its new place with --data (eval and predict: with the --split to read from it)`);
  }
  try {
    return loadExperimentData(dataset, seed, runtime);
  } catch (error) {
    if (error instanceof ImageFolderError) throw new UserError(error.message);
    throw error;
  }
}

/**
 * Checks that a BraTS run's cache still holds the run's annotators (and, to go on training,
 * its label mode). `cmseg prepare --rebuild` with other settings keeps the case ids, so the
 * run's split still loads; without this check --resume would train the CM heads on other
 * annotators' labels, and eval would score each head against another annotator, without a word.
 * `use` says what the cache is read for: 'resume' needs the labels too, 'eval' the names only,
 * 'consensus' (eval --no-cms, predict) neither. Every use needs the run's label scheme: the
 * same case ids read with another one give the classes other meanings.
 */
export function checkRunCache(dataset: DatasetSpec, annotatorNames: readonly string[], use: 'resume' | 'eval' | 'consensus'): void {
  if (dataset.kind !== 'brats' || !fs.existsSync(dataset.cache)) return; // a missing cache: loadRunData says so
  const index = readCacheIndex(dataset.cache);
  const changed: string[] = [];
  if (use !== 'consensus' && !sameNames(index.names, annotatorNames)) {
    changed.push(`annotators ${index.names.join(', ')} (the run's: ${annotatorNames.join(', ')})`);
  }
  if (use === 'resume' && index.settings.mode !== dataset.labels) changed.push(`${index.settings.mode} labels (the run's: ${dataset.labels})`);
  // The same case ids read with another label scheme: class 1 would be necrosis in one and
  // the non-enhancing tumour in the other, for training and scoring alike.
  const scheme = cacheLabelScheme(index);
  const runs = runLabelScheme(dataset)!;
  if (scheme !== runs) changed.push(`segmentations read with the label scheme ${scheme} (the run's: ${runs})`);
  if (changed.length === 0) return;
  const schemeFlag = runs !== 'brats' ? ` --label-scheme ${runs}` : '';
  const remedy =
    use === 'resume'
      ? `prepare the run's data into it again with the run's settings (cmseg prepare --rebuild --annotators ${annotatorNames.join(',')} --labels ${dataset.labels}${schemeFlag}), or start a new run`
      : scheme !== runs || use === 'consensus'
        ? `prepare the run's data into it again with --rebuild --annotators ${annotatorNames.join(',')}${schemeFlag}`
        : `score the consensus only with --no-cms, or prepare the run's data into it again with --rebuild --annotators ${annotatorNames.join(',')}`;
  throw new UserError(`the cache ${dataset.cache} was prepared again with other settings since this run trained on it: it holds ${changed.join('; ')}; ${remedy}`);
}

/**
 * A --label-scheme typed with a run's own data (eval, predict): the run's cache was read with
 * the scheme its model learnt, so another one cannot apply; said rather than ignored.
 */
export function checkRunLabelScheme(dataset: DatasetSpec, given: string | undefined): void {
  if (given === undefined) return;
  const runs = runLabelScheme(dataset);
  if (given === runs) return;
  throw new UserError(
    runs
      ? `--label-scheme ${given}: the run's cache was read with the label scheme ${runs}, which its model learnt; leave the option out (it is for new BraTS folders given with --data)`
      : `--label-scheme ${given}: this run has no BraTS data; the option is for BraTS folders given with --data`,
  );
}

/** The label scheme a BraTS run's cache was read with (absent in its record: 'brats'); undefined for other data. */
export function runLabelScheme(dataset: DatasetSpec): BratsLabelScheme | undefined {
  return dataset.kind === 'brats' ? (dataset.labelScheme ?? 'brats') : undefined;
}

/**
 * A BraTS run whose cache train prepared into the run folder (<out>/cache) moves with it, but
 * its checkpoints name the cache where the run was: once that is gone, the cache in `runDir`
 * is the run's, so a moved or copied run folder resumes, scores and predicts without --data.
 */
export function withOwnRunCache(recipe: RunRecipe, runDir: string): RunRecipe {
  const dataset = recipe.dataset;
  if (dataset.kind !== 'brats' || !dataset.cache || fs.existsSync(dataset.cache)) return recipe;
  const own = runCacheDir(runDir);
  if (path.basename(dataset.cache) !== path.basename(own) || !fs.existsSync(cacheIndexPath(own))) return recipe;
  return { ...recipe, dataset: { ...dataset, cache: own } };
}
