// `cmseg eval`: scores a checkpoint on its run's validation or test split with the SPEC
// section 6 metrics; the data is rebuilt from the recipe stored in the checkpoint. BraTS
// runs score every case of the split as a whole volume (sliding windows) and add the
// challenge's region Dice (whole tumour, tumour core, enhancing tumour). Image-folder runs
// read the folder named in the checkpoint (--data: where it is now, if it moved); without
// an expert consensus they are scored against the annotators' majority vote.
//
// Any checkpoint (one written by the API's saveCheckpoint too, which names no data) is
// scored on new data with --data: every image of a 2D folder (against its consensus/, else
// its annotators' majority vote), or every case of a BraTS folder, case folder or cache
// that has a segmentation (3D).
//
// Several checkpoints (--checkpoint a b ...) are scored as one ensemble (their outputs
// averaged), and --tta averages the predictions of the mirrored inputs; the metrics JSON
// records both ("checkpoints", "tta"; an ensemble's "methods", and its "method" is theirs
// when they share one, else "ensemble").

import { createHash } from 'crypto';
import * as fs from 'fs';
import * as path from 'path';
import { Command } from 'commander';
import { type BratsLabelScheme, bratsClassNames } from '../data/brats';
import { casesInData } from '../data/brats-cases';
import { checkWritableSync, makeFolderSync, writeFileAtomic } from '../data/files';
import { openImagesToPredict } from '../data/image-files';
import type { Device } from '../model/config';
import { setNumThreads } from '../model/model';
import { bratsText, evaluationText, referenceNote } from '../report/tables';
import { type EvaluationSummary, evaluateAgainstMajority, evaluateModel, evaluateVolumes, fusedLabelRows, withFusedLabelRows } from '../train/evaluate';
import type { SplitName } from '../train/experiment';
import { choiceOption, displayPath, given, parsePath, printOutputs, sameNames, UserError, withExamples, WRITE_FAILURES } from './common';
import {
  checkBratsModel,
  checkSameRunData,
  type DataTarget,
  dataTarget,
  type InferenceInfo,
  inferenceLabel,
  inferenceRecord,
  loadInference,
  paddingNote,
  readInferenceInfo,
  windowPatch,
  withInferenceOptions,
} from './inference';
import { checkRunCache, checkRunLabelScheme, loadRunData } from './run-data';
import { caseBars } from './window-progress';

interface EvalFlags {
  checkpoint: string[];
  tta?: boolean;
  split: SplitName | 'all';
  out?: string;
  data?: string;
  patch?: number;
  windowBatch: number;
  geometryTolerance: number;
  labelScheme?: BratsLabelScheme;
  device?: Device;
  threads?: number;
  quiet?: boolean;
  /** false (--no-cms): the consensus scores only, no annotator CMs predicted or scored. */
  cms: boolean;
}

/** Whether the annotators' CMs are predicted and scored: a method that learns them, unless --no-cms. */
function scoresCms(info: { learnsCms: boolean }, flags: EvalFlags): boolean {
  return info.learnsCms && flags.cms !== false;
}

async function runEval(flags: EvalFlags, splitTyped: boolean, made: string[]): Promise<void> {
  if (flags.threads !== undefined) setNumThreads(flags.threads);
  const info = await readInferenceInfo(flags.checkpoint);
  const file = info.file;
  const target = dataTarget(info, flags, splitTyped, 'eval');
  if (target.kind !== 'run') return evalWhole(flags, info, target, made);
  checkSameRunData(info, 'eval');
  const { saved, recipe } = target;
  const split = flags.split as SplitName;
  const name = `eval-${split}-${outputStem(info, flags)}.json`;
  const out = path.resolve(flags.out ?? path.join(path.dirname(file), name));
  prepareOutput(out, flags, made, { split }, name);
  checkRunLabelScheme(recipe.dataset, flags.labelScheme);
  checkRunCache(recipe.dataset, info.annotatorNames, scoresCms(info, flags) ? 'eval' : 'consensus');
  const data = loadRunData(recipe.dataset, saved.config.seed);
  try {
    const loaded = await loadInference(info, { device: flags.device, tta: flags.tta });
    let summary: EvaluationSummary;
    try {
      // Methods without trained CMs (naive, oracle) are scored on the consensus only. A BraTS
      // run's cases are scored with the window predict uses (--patch, else the training patch
      // rounded up to what an ensemble's deepest member takes).
      const bars = caseBars({ quiet: flags.quiet });
      const window =
        recipe.dataset.kind === 'brats'
          ? { patch: windowPatch(info, flags.patch), windowBatch: flags.windowBatch, onWindows: bars.onWindows, onVolume: bars.onVolume }
          : {};
      try {
        summary = await data.evaluate(loaded.model, split, { annotators: scoresCms(info, flags), ...window });
      } finally {
        bars.stop();
      }
    } finally {
      await loaded.dispose();
    }
    const fused = split === 'test' ? data.fusedLabelRows?.() : undefined;
    const record = {
      checkpoint: file,
      ...inferenceRecord(info, flags.tta === true),
      ...methodRecord(info),
      preset: recipe.preset,
      dataset: recipe.dataset,
      seed: saved.config.seed,
      step: saved.state.step,
      split,
      metrics: summary,
      fusedLabels: fused ?? null,
    };
    // The tables first: should the file still fail (the disk filled meanwhile), the scores are not lost.
    process.stdout.write(`${inferenceLabel(info, flags.tta === true)}, ${split} split${referenceNote(summary)}:\n` + evaluationText(summary, fused, { classNames: data.classNames }) + bratsText(summary) + '\n');
    await writeFileAtomic(out, Buffer.from(JSON.stringify(record, null, 2) + '\n'));
    printOutputs([['metrics', out]]);
  } finally {
    await data.close?.();
  }
}

/**
 * The default metrics file's name after the split or data: the checkpoint's, and for an
 * ensemble or TTA what sets it apart (not to overwrite the plain scores). An ensemble's name
 * also carries a hash of its members (the first 8 hex digits of the SHA-1 of their absolute
 * paths, one a line, in order), so that two ensembles led by one checkpoint keep apart.
 */
function outputStem(info: InferenceInfo, flags: EvalFlags): string {
  const ensemble = info.members.length > 1 ? `-ensemble${info.members.length}-${ensembleHash(info.members.map((m) => m.file))}` : '';
  // --no-cms scores fewer figures: its own file, not one that replaces a full evaluation's.
  return `${path.basename(info.file, '.safetensors')}${ensemble}${flags.tta ? '-tta' : ''}${flags.cms === false ? '-no-cms' : ''}`;
}

/** The first 8 hex digits of the SHA-1 of the checkpoints' paths, one a line: what tells ensembles apart in file names. */
function ensembleHash(files: readonly string[]): string {
  return createHash('sha1').update(files.join('\n')).digest('hex').slice(0, 8);
}

/**
 * What the metrics JSON says of the method: "method", the members' common method (null for
 * checkpoints that name none), else "ensemble"; and for an ensemble "methods", each member's.
 */
function methodRecord(info: InferenceInfo): { method: string | null; methods?: (string | null)[] } {
  const methods = info.members.map((m) => m.method ?? null);
  const method = methods.every((m) => m === methods[0]) ? methods[0] : 'ensemble';
  return info.members.length > 1 ? { method, methods } : { method };
}

/**
 * Scores a checkpoint on every image or case of new data (--data): 2D against the folder's
 * consensus/ (else the majority vote of its labels/), 3D against each case's segmentation.
 */
async function evalWhole(flags: EvalFlags, info: InferenceInfo, target: Extract<DataTarget, { kind: 'images' | 'volumes' }>, made: string[]): Promise<void> {
  const { file } = info;
  const dir = target.dir;
  const name = `eval-${path.basename(dir)}-${outputStem(info, flags)}.json`;
  const out = path.resolve(flags.out ?? path.join(path.dirname(file), name));
  prepareOutput(out, flags, made, { data: dir }, name);
  let summary: EvaluationSummary;
  let fused: ReturnType<typeof fusedLabelRows> | undefined;
  let classNames: string[] | undefined;
  let what: string;
  if (target.kind === 'images') {
    // The folder is read one predict call's images at a time while it is scored (evaluate.ts
    // PartedSet): read whole, a folder larger than memory could not be scored at all.
    const set = openImagesToPredict(dir, info, target.labelMapping);
    const { labelled } = set;
    if (!set.hasConsensus && labelled.length === 0) {
      throw new UserError(
        `${displayPath(dir)} has no consensus/ and no labels/<annotator>/ maps of this model's annotators (${set.annotatorNames.join(', ')}): eval needs a reference to score against (cmseg predict draws predictions without one)`,
      );
    }
    const note = paddingNote(set.spatial, info.config.depth);
    if (note) process.stderr.write(note);
    const loaded = await loadInference(info, { device: flags.device, tta: flags.tta, pad: true });
    try {
      const scored = loaded.model;
      // The CM figures need the annotators' own maps; a vote of them stands in for a missing consensus.
      const annotators = scoresCms(info, flags) && labelled.length > 0;
      if (set.hasConsensus) {
        // The fused labels' Dice is gathered from the parts as they are scored: the label maps are decoded once.
        const along = withFusedLabelRows(set);
        summary = await evaluateModel(scored, along.set, { annotators });
        fused = labelled.length > 0 ? along.rows() : undefined;
      } else {
        summary = await evaluateAgainstMajority(scored, set, { annotators });
      }
    } finally {
      await loaded.dispose();
    }
    classNames = set.classes === 2 ? ['background', 'foreground'] : undefined;
    what = `${set.count} images of ${displayPath(dir)}`;
  } else {
    checkBratsModel(info, true);
    const list = casesInData(dir, flags.geometryTolerance, true, flags.labelScheme);
    const patch = windowPatch(info, flags.patch);
    const overlap = info.recipe?.dataset.kind === 'brats' ? info.recipe.dataset.overlap : 0.5;
    const R = info.config.annotators;
    // A cache's annotators are scored when they are the model's (same count, and the same names when the checkpoint records them).
    const cacheAnnotators = list.annotators;
    const annotators =
      scoresCms(info, flags) &&
      cacheAnnotators !== undefined &&
      cacheAnnotators.length === R &&
      (!info.namesRecorded || sameNames(cacheAnnotators, info.annotatorNames));
    // Otherwise the CM figures would vanish from the report unexplained: say why.
    if (scoresCms(info, flags) && cacheAnnotators !== undefined && !annotators) {
      process.stderr.write(`note: the cache's annotators (${cacheAnnotators.join(', ')}) are not this model's (${info.annotatorNames.join(', ')}): only the consensus is scored\n`);
    }
    const loaded = await loadInference(info, { device: flags.device, tta: flags.tta });
    const bars = caseBars({ quiet: flags.quiet });
    try {
      summary = await evaluateVolumes(
        loaded.model,
        list.ids,
        async (id) => {
          const c = await list.load(id);
          if (!c.seg) throw new UserError(`case ${id} has no usable segmentation to score against`);
          // original: the voxel size, for the HD95 in mm
          return { id, images: c.images, extent: c.extent, consensus: c.seg, labels: c.labels ?? [], present: c.present ?? new Uint8Array(0), original: c.original };
        },
        {
          patch,
          overlap,
          windowBatch: flags.windowBatch,
          annotators,
          annotatorNames: annotators ? [...cacheAnnotators!] : info.annotatorNames,
          bratsRegions: true,
          onWindows: bars.onWindows,
          onVolume: bars.onVolume,
        },
      );
    } finally {
      bars.stop();
      await loaded.dispose();
    }
    classNames = [...bratsClassNames(list.labelScheme)];
    what = `${list.ids.length} case(s) from ${list.from}`;
  }
  const record = {
    checkpoint: file,
    ...inferenceRecord(info, flags.tta === true),
    ...methodRecord(info),
    preset: info.recipe?.preset ?? null,
    data: dir,
    step: info.step,
    split: 'all',
    metrics: summary,
    fusedLabels: fused ?? null,
  };
  // The tables first: should the file still fail (the disk filled meanwhile), the scores are not lost.
  process.stdout.write(`${inferenceLabel(info, flags.tta === true)}, ${what}${referenceNote(summary)}:\n` + evaluationText(summary, fused, { classNames }) + bratsText(summary) + '\n');
  await writeFileAtomic(out, Buffer.from(JSON.stringify(record, null, 2) + '\n'));
  printOutputs([['metrics', out]]);
}

/**
 * Makes the metrics file's folder and checks a file can be written there, before the evaluation
 * (hours for BraTS): it used to fail only then, on a checkpoint in a read-only or full folder,
 * with the scores lost. makeFolderSync: Node's recursive mkdir says ENOENT on a read-only fs.
 */
function prepareOutput(out: string, flags: EvalFlags, made: string[], scored: { split: string } | { data: string }, defaultName: string): void {
  const elsewhere = flags.out === undefined ? 'write it elsewhere with --out FILE' : 'choose another --out';
  if (flags.out === undefined) checkDefaultOutput(out, scored);
  // `--out` naming a checkpoint (one being scored, through a link too, or any .safetensors)
  // replaced the trained model with the metrics JSON, without a word.
  const real = (file: string) => {
    try {
      return fs.realpathSync(file);
    } catch {
      return path.resolve(file);
    }
  };
  if (/\.safetensors$/i.test(out) || flags.checkpoint.some((file) => real(file) === real(out))) {
    throw new UserError(`cannot write the metrics file ${displayPath(out)}: it is a checkpoint (a safetensors file), not a metrics JSON; ${elsewhere}, e.g. ${displayPath(out.replace(/(\.safetensors)?$/i, '.json'))} (nothing was evaluated)`);
  }
  // `--out <a folder>`: the whole evaluation ran (hours for BraTS) and only then failed,
  // "a folder of that name is in the way".
  if (fs.existsSync(out) && fs.statSync(out).isDirectory()) {
    throw new UserError(`cannot write the metrics file ${displayPath(out)}: it is a folder; name a file, e.g. ${displayPath(path.join(out, defaultName))} (nothing was evaluated)`);
  }
  // The folders made here, innermost first: removed again (while empty) should the command fail.
  for (let d = path.dirname(out); !fs.existsSync(d) && path.dirname(d) !== d; d = path.dirname(d)) made.push(d);
  try {
    makeFolderSync(path.dirname(out));
    checkWritableSync(out);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    const why = (code && WRITE_FAILURES[code]) ?? (err as Error).message;
    throw new UserError(`cannot write the metrics file ${displayPath(out)}: ${why}; ${elsewhere} (nothing was evaluated)`);
  }
}

/**
 * The default metrics file is named after the split or the data folder's name only: a folder
 * of new images named "test" (or two folders named alike, siteA/test and siteB/test) had the
 * name of the run's test split scores, and replaced them without a word. Refused when the file
 * there holds the scores of other data; the same split or folder again rewrites it.
 */
function checkDefaultOutput(out: string, scored: { split: string } | { data: string }): void {
  let record: { split?: unknown; data?: unknown };
  try {
    record = JSON.parse(fs.readFileSync(out, 'utf8'));
  } catch {
    return; // none there, or not a metrics file of ours: written as before
  }
  if (record === null || typeof record !== 'object') return;
  const theirs: { split: string } | { data: string } | undefined =
    typeof record.data === 'string' ? { data: record.data } : typeof record.split === 'string' ? { split: record.split } : undefined;
  if (theirs === undefined) return;
  const same = 'data' in scored ? 'data' in theirs && path.resolve(theirs.data) === path.resolve(scored.data) : 'split' in theirs && theirs.split === scored.split;
  if (same) return;
  const what = (s: { split: string } | { data: string }) => ('data' in s ? displayPath(s.data) : `the run's ${s.split} split`);
  throw new UserError(`the default metrics file ${displayPath(out)} holds the scores of ${what(theirs)}, not of ${what(scored)}: name this one's file with --out (nothing was evaluated)`);
}

export function registerEvalCommand(program: Command): Command {
  const command = program
    .command('eval')
    .description('score a checkpoint on its run\'s test (or validation) split, or on new data (--data): Dice, CM error, GED, reliability; BraTS volumes also region Dice (WT, TC, ET) and HD95 in mm')
    .requiredOption(
      '--checkpoint <files...>',
      "a checkpoint written by cmseg train (best.safetensors or last.safetensors), or by the API's saveCheckpoint (then --data is needed). Several: scored as an ensemble, " +
        "their outputs averaged (same ndim, input channels, classes and annotators; the first one's run decides the split, and the others must have trained on the same one, else give --data)",
    )
    .option('--tta', 'test-time augmentation: also predict the inputs mirrored along every combination of spatial axes (4 in 2D, 8 in 3D) and average the flipped-back outputs')
    .addOption(choiceOption('--split <name>', "which of the run's splits to score; all: every image or case of --data", ['test', 'validation', 'all']).default('test'))
    .option(
      '--out <file>',
      'where to write the metrics JSON (default: eval-<split>-<checkpoint>.json, or eval-<data folder>-<checkpoint>.json for --data, beside the (first) checkpoint; ' +
        '<checkpoint> ends in -ensemble<N>-<hash> for N checkpoints, <hash> the first 8 hex digits of the SHA-1 of their absolute paths (one a line, in order), and in -tta with --tta)',
      parsePath('--out'),
    )
    .option(
      '--data <dir>',
      "new data, scored whole: 2D a folder of PNGs (DIR/images/ with consensus/ or labels/<annotator>/ to score against); 3D a BraTS folder, case folder or cache " +
        "(cases with a segmentation). For an image-folder run, its own folder (where it was, where it moved if the old place is gone, or any folder with --split typed) gives the run's --split",
      parsePath('--data'),
    )
    .option(
      '--no-cms',
      "the consensus scores only: no annotator CMs predicted, no CM error, incompetence or reliability (3D: about 3/4 less of the stitching's memory, half its time)",
    );
  withInferenceOptions(command).action(async (flags: EvalFlags, cmd: Command) => {
    const made: string[] = [];
    try {
      await runEval(flags, given(cmd, 'split'), made);
    } catch (error) {
      // The output's folders are made before the evaluation (prepareOutput): not left behind empty.
      for (const dir of made) {
        try {
          fs.rmdirSync(dir);
        } catch {
          break; // not empty (or never made): it and its parents stay
        }
      }
      throw error;
    }
  });
  return withExamples(
    command,
    'cmseg eval --checkpoint runs/cm-dense/best.safetensors --split test',
    'cmseg eval --checkpoint runs/brats-cm/best.safetensors --split validation',
    'cmseg eval --checkpoint model.safetensors --data data/noisy',
    'cmseg eval --checkpoint runs/brats-a/best.safetensors runs/brats-b/best.safetensors --tta',
  );
}
