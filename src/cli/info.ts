// `cmseg info`: what this installation can run (backends, GPU, threads), or what a
// checkpoint holds (model, method, step, annotators, the data it was trained on) — the
// first things to check when a run will not start or a checkpoint comes from elsewhere.

import * as path from 'path';
import { Command } from 'commander';
import { readCheckpointInfo, methodLabel, type CheckpointInfo } from '../model/checkpoint-info';
import type { DatasetSpec } from '../train/experiment';
import type { TrainerState } from '../train/trainer';
import { backendInfo, setNumThreads } from '../model/model';
import type { NativeBackendInfo } from '../native';
import { parseThreads, UserError, withExamples } from './common';

interface InfoFlags {
  checkpoint?: string;
  json?: boolean;
  threads?: number;
}

/** The build's backends and the machine they see, as lines of `name  value`. */
function backendLines(): [string, string][] {
  const b = backendInfo();
  const yes = (x: boolean) => (x ? 'yes' : 'no');
  const why = b.gpuUnavailableReason ? ` (${b.gpuUnavailableReason})` : '';
  return [
    ['cpu reference', yes(b.cpu)],
    ['oneDNN fast path', b.onednn ? 'yes' : 'no (built without oneDNN: the CPU reference runs every layer)'],
    ['CUDA backend', b.cuda ? `yes${b.cudnn ? `, cuDNN ${b.cudnnVersion}` : ''}` : 'no (built without CUDA and cuDNN)'],
    ['GPU', b.gpuAvailable ? (b.gpu ?? 'yes') : b.cuda ? `none usable${why}` : '-'],
    ['GPU training', b.cuda ? `${yes(b.cudaTraining)}${b.gpuPrecisions.length ? ` (${b.gpuPrecisions.join(', ')})` : ''}` : '-'],
    ['threads', threadsText(b)],
    ['SIMD', b.simd],
    ['compiler', b.compiler],
    ['node', process.version],
  ];
}

/** The pool's threads, the default's reason, and how to change them. */
function threadsText(b: NativeBackendInfo): string {
  const why = b.threads === b.defaultThreads ? b.threadsReason : `set; the default is ${b.defaultThreads}: ${b.threadsReason}`;
  return `${b.threads} (${why}; CMSEG_NUM_THREADS or --threads to change)`;
}

function datasetText(d: DatasetSpec): string {
  switch (d.kind) {
    case 'mnist':
      return `MNIST ${d.train}/${d.validation}/${d.test} images, ${d.labels} labels, data seed ${d.dataSeed}`;
    case 'brats':
      return `BraTS cache ${d.cache}: ${d.splits.train.length}/${d.splits.validation.length}/${d.splits.test.length} cases, patch ${d.patch}^3, data seed ${d.dataSeed}`;
    case 'folder':
      return `image folder ${d.root}: ${d.splits.train.length}/${d.splits.validation.length}/${d.splits.test.length} images, ${d.classes} classes, data seed ${d.dataSeed}`;
  }
}

/** The step, and for a trainer's checkpoint where it stands in its run (a run of days is watched by its checkpoints). */
function stepText(info: CheckpointInfo): string {
  const s = info.saved?.state;
  // A state another writer made (the API's saveCheckpoint with a trainer-like extra) may lack these.
  const whole = (v: unknown) => Number.isSafeInteger(v) && (v as number) >= 0;
  if (!s || !whole(s.totalSteps) || !whole(s.batchesPerEpoch) || s.batchesPerEpoch === 0 || !whole(s.epoch)) return String(info.step);
  const epochs = Math.ceil(s.totalSteps / s.batchesPerEpoch);
  // Saved before the validation after its last step (`last` is saved before a validation that
  // reports its cases, BraTS's, so a run stopped, killed or still validating holds this, and
  // at a stop in any validation): the resume still has that to do.
  if (s.step >= s.totalSteps && s.pendingValidation) return `${s.step} of ${s.totalSteps}, ${epochs} epoch(s): its last validation is not done (stopped, killed or still running; resume to run it)`;
  if (s.step >= s.totalSteps) return `${s.step} of ${s.totalSteps}, ${epochs} epoch(s): complete`;
  // Stopped during an earlier epoch's validation: without this it read as a run that had
  // validated that epoch (its best "none yet" as a run without validations).
  const pending = s.pendingValidation && s.epoch > 0 ? `; the validation after epoch ${s.epoch} is not done (stopped, killed or still running; the resume runs it first)` : '';
  return `${s.step} of ${s.totalSteps}, epoch ${s.epoch + 1} of ${epochs}${pending}`;
}

/** The best validation a trainer's checkpoint records; undefined when it records none in that form. */
function bestText(s: TrainerState | undefined): string | undefined {
  if (!s || !('best' in s)) return undefined;
  const b = s.best;
  if (b === null) return 'none yet';
  if (typeof b !== 'object' || ![b.score, b.epoch, b.step].every(Number.isFinite)) return undefined;
  return `score ${b.score.toFixed(4)} at epoch ${b.epoch + 1} (step ${b.step})`;
}

/** A checkpoint's description, as lines of `name  value`. */
function checkpointLines(info: CheckpointInfo): [string, string][] {
  const c = info.config;
  const lines: [string, string][] = [
    ['file', info.file],
    ['written by', info.recipe ? 'cmseg train' : info.saved ? "the API's train()" : "the API's saveCheckpoint"],
    ['method', methodLabel(info)],
    ['step', stepText(info)],
    ...(bestText(info.saved?.state) ? [['best validation', bestText(info.saved?.state)!] as [string, string]] : []),
    ['model', `${c.ndim}D U-Net depth ${c.depth}, c ${c.baseChannels}, ${c.inChannels} input channel(s), ${c.classes} classes`],
    ['annotators', `${c.annotators}: ${info.annotatorNames.join(', ')}${info.namesRecorded ? '' : ' (no names recorded)'}; CMs ${c.cmMode}${info.learnsCms ? '' : ' (heads not trained by this method)'}`],
    ['trained on', c.device === 'cuda' ? `GPU${c.bf16 ? ', bf16 convolutions' : c.tf32 ? ', TF32' : ''}` : 'CPU'],
  ];
  if (info.recipe) lines.push(['preset', info.recipe.preset], ['data', datasetText(info.recipe.dataset)]);
  else lines.push(['data', 'not recorded: eval and predict need --data']);
  return lines;
}

function table(lines: [string, string][]): string {
  const width = Math.max(...lines.map(([k]) => k.length));
  return lines.map(([k, v]) => `${k.padEnd(width)}  ${v}`).join('\n') + '\n';
}

async function runInfo(flags: InfoFlags): Promise<void> {
  if (flags.threads !== undefined) setNumThreads(flags.threads);
  // `--checkpoint "$CKPT"` with the variable unset is an empty name: an error, not the backends' table.
  if (flags.checkpoint !== undefined) {
    if (flags.checkpoint.trim() === '') throw new UserError('--checkpoint is empty: name a checkpoint file');
    const info = await readCheckpointInfo(path.resolve(flags.checkpoint));
    if (flags.json) {
      const { file, config, step, method, learnsCms, annotatorNames, namesRecorded, recipe } = info;
      process.stdout.write(JSON.stringify({ file, config, step, method: method ?? null, learnsCms, annotatorNames, namesRecorded, recipe: recipe ?? null }) + '\n');
    } else {
      process.stdout.write(table(checkpointLines(info)));
    }
    return;
  }
  if (flags.json) process.stdout.write(JSON.stringify({ ...backendInfo(), node: process.version }) + '\n');
  else process.stdout.write(table(backendLines()));
}

export function registerInfoCommand(program: Command): Command {
  const cmd = program
    .command('info')
    .description('what this installation can run (backends, GPU, threads), or what a checkpoint holds (--checkpoint)')
    .option('--checkpoint <file>', 'describe this checkpoint: model, method, step, annotators, the data it was trained on')
    .option('--json', 'print one JSON object instead of text')
    .option('--threads <n>', 'native threads (default: CMSEG_NUM_THREADS, else every usable CPU: the cores, fewer under a CPU affinity mask or cgroup quota)', parseThreads)
    .action((flags: InfoFlags) => runInfo(flags));
  return withExamples(cmd, 'cmseg info', 'cmseg info --checkpoint runs/cm/best.safetensors');
}
