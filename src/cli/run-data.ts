// A run's data as the commands read it (train, eval, predict): the experiment's data set,
// with one-line messages for the mistakes a user can fix.

import * as fs from 'fs';
import { readCacheIndex } from '../data/cache';
import { ImageFolderError } from '../data/image-folder';
import { type DatasetSpec, type ExperimentData, type ExperimentRuntime, loadExperimentData } from '../train/experiment';
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
 * `use` says what the cache is read for: 'resume' needs the labels too, 'eval' the names only.
 */
export function checkRunCache(dataset: DatasetSpec, annotatorNames: readonly string[], use: 'resume' | 'eval'): void {
  if (dataset.kind !== 'brats' || !fs.existsSync(dataset.cache)) return; // a missing cache: loadRunData says so
  const index = readCacheIndex(dataset.cache);
  const changed: string[] = [];
  if (!sameNames(index.names, annotatorNames)) {
    changed.push(`annotators ${index.names.join(', ')} (the run's: ${annotatorNames.join(', ')})`);
  }
  if (use === 'resume' && index.settings.mode !== dataset.labels) changed.push(`${index.settings.mode} labels (the run's: ${dataset.labels})`);
  if (changed.length === 0) return;
  const remedy =
    use === 'resume'
      ? `prepare the run's data into it again with the run's settings (cmseg prepare --rebuild --annotators ${annotatorNames.join(',')} --labels ${dataset.labels}), or start a new run`
      : `score the consensus only with --no-cms, or prepare the run's data into it again with --rebuild --annotators ${annotatorNames.join(',')}`;
  throw new UserError(`the cache ${dataset.cache} was prepared again with other settings since this run trained on it: it holds ${changed.join('; ')}; ${remedy}`);
}
