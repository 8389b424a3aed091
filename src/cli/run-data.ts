// A run's data as the commands read it (train, eval, predict): the experiment's data set,
// with one-line messages for the mistakes a user can fix.

import * as fs from 'fs';
import { ImageFolderError } from '../data/image-folder';
import { type DatasetSpec, type ExperimentData, type ExperimentRuntime, loadExperimentData } from '../train/experiment';
import { UserError } from './common';

/** loadExperimentData, with one-line messages for an image folder that moved or does not fit the run. */
export function loadRunData(dataset: DatasetSpec, seed: number, runtime?: ExperimentRuntime): ExperimentData {
  if (dataset.kind === 'folder' && dataset.root && !fs.existsSync(dataset.root)) {
    throw new UserError(`the run's image folder ${dataset.root} is gone; if it moved, name its new place with --data`);
  }
  try {
    return loadExperimentData(dataset, seed, runtime);
  } catch (error) {
    if (error instanceof ImageFolderError) throw new UserError(error.message);
    throw error;
  }
}
