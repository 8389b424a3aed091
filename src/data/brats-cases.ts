// New 3D data for a checkpoint (eval and predict --data, or a BraTS run's own split): whole
// BraTS cases from a cmseg cache, a case folder or a BraTS folder, each loaded ready for the
// model with what is needed to put its prediction back in the case's original geometry.

import * as fs from 'fs';
import { UserError } from '../errors';
import { displayPath } from './files';
import {
  type BratsCase,
  type BratsLabelScheme,
  type BratsNaming,
  type CropBox,
  type VolumeGeometry,
  BratsError,
  bratsCaseInFolder,
  bratsLayoutHint,
  discoverBratsCases,
  emptyModalitiesNote,
  loadBratsCase,
  preprocessBratsCase,
} from './brats';
import { cacheIndexPath, cacheLabelScheme, readCacheIndex, readCachedCase, readCachedCaseForScoring } from './cache';
import type { Extent } from './morphology';
import type { NiftiHeader } from './nifti';

/** One case ready for the model, and what is needed to put its prediction back. */
export interface CaseToPredict {
  id: string;
  naming: BratsNaming;
  /**
   * How the case's segmentation was read ('peds2024': BraTS-PEDs 2024): predictions written in
   * its numbering go through releaseBratsLabels(labels, naming, labelScheme).
   */
  labelScheme: BratsLabelScheme;
  /** z-scored, cropped [C, D, H, W]. */
  images: Float32Array;
  extent: Extent;
  crop: CropBox;
  original: VolumeGeometry;
  /** The case's t1 header (another modality's when the t1 has no orientation): written predictions copy its geometry bit for bit. */
  header?: NiftiHeader;
  /** Cropped expert labels 0..3, when the case has them. */
  seg?: Uint8Array;
  /** A cache's annotators: one cropped map per annotator, and which labelled the case. */
  labels?: Uint8Array[];
  present?: Uint8Array;
}

export interface CaseList {
  ids: string[];
  /** Where they come from, for the report. */
  from: string;
  /** The annotators of a cache, in its order. */
  annotators?: string[];
  /** How the cases' segmentations are read: a cache's own scheme, or the one given for a folder. */
  labelScheme: BratsLabelScheme;
  load(id: string): Promise<CaseToPredict>;
}

/**
 * The cases of a cache. For scoring (`forScoring`), each case comes with every annotator's
 * labels, also from a cache prepared in single mode (readCachedCaseForScoring).
 */
export function cacheCases(cacheDir: string, ids?: readonly string[], forScoring = false): CaseList {
  const index = readCacheIndex(cacheDir);
  const labelScheme = cacheLabelScheme(index);
  const naming = new Map(index.cases.map((c) => [c.id, c.naming]));
  return {
    ids: ids ? [...ids] : index.cases.map((c) => c.id),
    from: `the cache at ${displayPath(cacheDir)}`,
    annotators: [...index.names],
    labelScheme,
    load: async (id) => {
      const c = await (forScoring ? readCachedCaseForScoring : readCachedCase)(cacheDir, id, index);
      return {
        id,
        naming: naming.get(id) ?? '2021',
        labelScheme,
        images: c.images,
        extent: c.extent,
        crop: c.crop,
        original: c.original,
        header: c.niftiHeader,
        seg: c.consensus,
        labels: c.labels,
        present: c.present,
      };
    },
  };
}

/**
 * Cases read from NIfTI files and preprocessed as `cmseg prepare` does. For prediction
 * (`requireSeg` false) a case's segmentation is optional and a bad one only warned about;
 * for scoring, cases without one are left out with a note and a bad one is an error.
 */
export function folderCases(dir: string, geometryTolerance: number, requireSeg = false, labelScheme: BratsLabelScheme = 'brats'): CaseList {
  const single = singleCase(dir);
  let cases = single ? [single] : [];
  try {
    if (!single) cases = discoverBratsCases(dir, { requireSeg: false, onSkipped: (note) => process.stderr.write(`note: ${note}\n`) });
  } catch (error) {
    if (error instanceof BratsError && error.kind === 'no-cases') {
      const hint = bratsLayoutHint(dir);
      throw new UserError(`--data ${dir} is not a BraTS case, a BraTS folder or a cmseg cache${hint ? `: ${hint}` : ''}`);
    }
    throw error;
  }
  if (requireSeg) {
    const without = cases.filter((c) => !c.seg);
    if (without.length === cases.length) {
      throw new UserError(`no case in ${displayPath(dir)} has a segmentation (${cases[0].naming === '2023' ? 'ID-seg' : 'ID_seg'}.nii.gz): eval needs one to score against (cmseg predict predicts without)`);
    }
    if (without.length > 0) {
      process.stderr.write(`note: ${without.length} case(s) without a segmentation are not scored: ${without.slice(0, 3).map((c) => c.id).join(', ')}${without.length > 3 ? ', ...' : ''}\n`);
      cases = cases.filter((c) => c.seg);
    }
  }
  const byId = new Map(cases.map((c) => [c.id, c]));
  return {
    ids: cases.map((c) => c.id),
    from: single ? `the case folder ${displayPath(dir)}` : `the BraTS folder ${displayPath(dir)}`,
    labelScheme,
    load: async (id) => {
      const c = byId.get(id)!;
      // For predictions the segmentation only draws the expert picture: a bad one is no reason not to predict.
      const onBadSeg = (error: Error) =>
        process.stderr.write(`warning: ${oneLine(error.message)}; predicting ${id} without its segmentation (used only for the picture)\n`);
      const volume = await loadBratsCase(c, { geometryTolerance, labelScheme, ...(requireSeg ? {} : { onBadSeg }) });
      const pre = preprocessBratsCase(volume);
      // As `cmseg prepare` says it of training cases: most likely a broken export.
      const note = emptyModalitiesNote(c, pre.stats);
      if (note) process.stderr.write(`note: ${note}\n`);
      return { id, naming: c.naming, labelScheme, images: pre.images, extent: pre.extent, crop: pre.crop, original: pre.original, header: volume.header, seg: pre.seg };
    },
  };
}

/** The case `dir` is the folder of, or undefined when it holds no case's own files (a BraTS folder, perhaps with stray NIfTI files). */
function singleCase(dir: string): BratsCase | undefined {
  try {
    return bratsCaseInFolder(dir, { requireSeg: false });
  } catch (error) {
    if (error instanceof BratsError && (error.kind === 'not-a-case' || error.kind === 'misnamed-case')) return undefined;
    throw error;
  }
}

function oneLine(text: string): string {
  return text.replace(/\s*\n\s*/g, ' ');
}

/**
 * The cases of --data: a cmseg cache, or NIfTI cases (a case folder or a BraTS folder).
 * `requireSeg` is for scoring: cases without a segmentation are left out, and a cache's
 * cases come with every annotator's labels (also from a single-mode cache). `labelScheme`
 * (when the user gave one) reads NIfTI segmentations; a cache was read with its own, and
 * one given that differs from it is a UserError rather than silently not applied.
 */
export function casesInData(dir: string, geometryTolerance: number, requireSeg = false, labelScheme?: BratsLabelScheme): CaseList {
  if (!fs.existsSync(cacheIndexPath(dir))) return folderCases(dir, geometryTolerance, requireSeg, labelScheme);
  const list = cacheCases(dir, undefined, requireSeg);
  if (labelScheme !== undefined && list.labelScheme !== labelScheme) {
    throw new UserError(`--label-scheme ${labelScheme} asked, but the cache ${displayPath(dir)} was prepared with the label scheme ${list.labelScheme}, which its labels keep: leave the option out, or prepare the cache again with it`);
  }
  return list;
}
