// `cmseg eval`: scores a checkpoint on its run's validation or test split with the SPEC
// section 6 metrics; the data is rebuilt from the recipe stored in the checkpoint. BraTS
// runs score every case of the split as a whole volume (sliding windows) and add the
// challenge's region Dice (whole tumour, tumour core, enhancing tumour). Image-folder runs
// read the folder named in the checkpoint (--data: where it is now, if it moved); without
// an expert consensus they are scored against the annotators' majority vote.

import * as fs from 'fs';
import * as path from 'path';
import { Command } from 'commander';
import { writeFileAtomic } from '../data/files';
import type { BratsDiceReport } from '../eval/brats-regions';
import { formatBratsReport } from '../eval/report';
import { loadCheckpoint } from '../model/checkpoint';
import type { Device, ModelConfig } from '../model/config';
import { backendInfo, Model, setNumThreads } from '../model/model';
import { evaluationText } from '../report/tables';
import type { EvaluationSummary } from '../train/evaluate';
import { ImageFolderError } from '../data/image-folder';
import { type DatasetSpec, type ExperimentData, type ExperimentRuntime, loadExperimentData, type SplitName } from '../train/experiment';
import { methodDefinition } from '../train/methods';
import { readTrainerState, TrainerExtra } from '../train/trainer';
import { choiceOption, parseInteger, printOutputs, UserError, withExamples } from './common';
import type { RunRecipe } from './train';

/** The --device choices of eval and predict. */
export const DEVICES: readonly Device[] = ['cpu', 'cuda', 'auto'];

interface EvalFlags {
  checkpoint: string;
  split: SplitName;
  out?: string;
  data?: string;
  device?: Device;
  threads?: number;
}

/** The trainer state and run recipe of a checkpoint written by `cmseg train`. */
export async function checkpointRecipe(file: string): Promise<{ saved: TrainerExtra; recipe: RunRecipe }> {
  if (!fs.existsSync(file)) throw new UserError(`checkpoint not found: ${file}`);
  const saved = await readTrainerState(file);
  const recipe = saved.run as unknown as RunRecipe;
  if (!recipe?.dataset) throw new UserError(`${file} does not say which data it was trained on (it was not written by cmseg train)`);
  return { saved, recipe };
}

/** The trainer state and data of a checkpoint written by `cmseg train`; `data`: the run's image folder, moved there. */
export async function checkpointExperiment(file: string, data?: string): Promise<{ saved: TrainerExtra; recipe: RunRecipe; data: ExperimentData }> {
  const { saved, recipe } = await checkpointRecipe(file);
  const dataset = relocatedDataset(recipe, data, file);
  return { saved, recipe: { ...recipe, dataset }, data: loadRunData(dataset, saved.config.seed) };
}

/** A run's data set, read from `data` instead of where it was trained when given (--data: the image folder moved). */
export function relocatedDataset(recipe: RunRecipe, data: string | undefined, file: string): DatasetSpec {
  if (data === undefined) return recipe.dataset;
  if (recipe.dataset.kind !== 'folder') {
    throw new UserError(`--data is for runs on an image folder (--preset images); ${path.basename(file)} is a ${recipe.preset} run, which reads the data its checkpoint names`);
  }
  return { ...recipe.dataset, root: path.resolve(data) };
}

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

/** How a summary's heading says what the consensus figures compare with (nothing for an expert consensus). */
export function referenceNote(summary: EvaluationSummary): string {
  return summary.reference ? `, against the annotators' ${summary.reference} (no expert consensus, so no CM error)` : '';
}

/**
 * A checkpoint's model for inference, on `device` when given (--device; 'cuda' without a usable
 * GPU fails with the reason), else where it was trained, except that a GPU-trained one runs on the
 * CPU when no GPU can run it here.
 */
export async function loadModelForInference(file: string, saved: TrainerExtra, device?: Device): Promise<Model> {
  const overrides: Partial<ModelConfig> = {};
  if (device !== undefined) return loadCheckpoint(file, { device });
  const info = backendInfo() as ReturnType<typeof backendInfo> & { cudaTraining?: boolean };
  if (saved.config.device === 'cuda' && (!info.cuda || info.cudaTraining === false || !info.gpuAvailable)) {
    process.stderr.write('note: this checkpoint was trained on the GPU; no GPU can run it here, so it runs on the CPU\n');
    overrides.device = 'cpu';
  }
  return loadCheckpoint(file, overrides);
}

/** The BraTS region table of a summary (empty for other data sets). */
export function bratsText(summary: EvaluationSummary): string {
  if (!summary.brats) return '';
  // formatBratsReport reads the summary figures only, never the per-image arrays.
  const report = { images: summary.images, ...summary.brats } as unknown as BratsDiceReport;
  return '\n' + formatBratsReport(report) + '\n';
}

async function runEval(flags: EvalFlags): Promise<void> {
  if (flags.threads !== undefined) setNumThreads(flags.threads);
  const file = path.resolve(flags.checkpoint);
  const { saved, recipe, data } = await checkpointExperiment(file, flags.data);
  try {
    const model = await loadModelForInference(file, saved, flags.device);
    // Methods without trained CMs (naive, oracle) are scored on the consensus only.
    const summary = await data.evaluate(model, flags.split, { annotators: methodDefinition(saved.config.method).learnsCms });
    const fused = flags.split === 'test' ? data.fusedLabelRows?.() : undefined;
    const out = path.resolve(flags.out ?? path.join(path.dirname(file), `eval-${flags.split}-${path.basename(file, '.safetensors')}.json`));
    fs.mkdirSync(path.dirname(out), { recursive: true });
    const record = { checkpoint: file, method: saved.config.method, preset: recipe.preset, dataset: recipe.dataset, seed: saved.config.seed, step: saved.state.step, split: flags.split, metrics: summary, fusedLabels: fused ?? null };
    await writeFileAtomic(out, Buffer.from(JSON.stringify(record, null, 2) + '\n'));
    process.stdout.write(`${saved.config.method} at step ${saved.state.step}, ${flags.split} split${referenceNote(summary)}:\n` + evaluationText(summary, fused, { classNames: data.classNames }) + bratsText(summary) + '\n');
    printOutputs([['metrics', out]]);
  } finally {
    await data.close?.();
  }
}

export function registerEvalCommand(program: Command): Command {
  const command = program
    .command('eval')
    .description('score a trained checkpoint on its test (or validation) split: Dice, CM error, GED, reliability')
    .requiredOption('--checkpoint <file>', 'a checkpoint written by cmseg train (best.safetensors or last.safetensors)')
    .addOption(choiceOption('--split <name>', 'which split to score', ['test', 'validation']).default('test'))
    .option('--out <file>', 'where to write the metrics JSON (default: eval-<split>-<checkpoint>.json beside the checkpoint)')
    .option('--data <dir>', "image-folder runs: the run's folder, if it moved (default: where it was when the run started)")
    .addOption(choiceOption('--device <name>', 'where the model runs (default: where it was trained; the CPU when no GPU can run it)', DEVICES))
    .option('--threads <n>', 'native threads', parseInteger(1))
    .action((flags: EvalFlags) => runEval(flags));
  return withExamples(command, 'cmseg eval --checkpoint runs/cm-dense/best.safetensors --split test', 'cmseg eval --checkpoint runs/brats-cm/best.safetensors --split validation');
}
