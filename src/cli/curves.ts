// `cmseg curves`: a run's training curves as a picture (src/report/curves.ts) from its
// train-log.jsonl. `cmseg train` draws <out>/curves.png itself when it stops; this command
// draws it for a run still going (from another terminal) or for any run folder.

import * as fs from 'fs';
import * as path from 'path';
import { Command } from 'commander';
import { writePng } from '../data/png';
import { trainingCurves } from '../report/curves';
import { displayPath, printOutputs, UserError, withExamples } from './common';

/** The file name of a run's curves picture, beside its log. */
export const CURVES_FILE = 'curves.png';

/** Draws the curves of the run in `runDir` into `out` (default <runDir>/curves.png); returns the file. */
export async function writeRunCurves(runDir: string, out = path.join(runDir, CURVES_FILE)): Promise<string> {
  const log = path.join(runDir, 'train-log.jsonl');
  if (!fs.existsSync(log)) throw new UserError(`${displayPath(runDir)} has no train-log.jsonl: is it a cmseg train --out folder?`);
  const events = readLogSoFar(log);
  if (!events.some((e) => e.event === 'step')) throw new UserError(`${displayPath(log)} has no training steps yet: nothing to draw`);
  await writePng(out, trainingCurves(events, { title: path.basename(path.resolve(runDir)) }));
  return out;
}

/**
 * The log's entries; a last line that does not parse is one being written by a run still
 * going, and is left out. An unreadable line before it is an error naming the line.
 */
function readLogSoFar(log: string): Record<string, unknown>[] {
  const lines = fs.readFileSync(log, 'utf8').split('\n').filter((l) => l.trim());
  const events: Record<string, unknown>[] = [];
  for (const [k, line] of lines.entries()) {
    try {
      events.push(JSON.parse(line) as Record<string, unknown>);
    } catch (err) {
      if (k === lines.length - 1) break;
      throw new UserError(`${displayPath(log)} line ${k + 1} is not a training log entry: ${(err as Error).message}`);
    }
  }
  return events;
}

export function registerCurvesCommand(program: Command): Command {
  const command = program
    .command('curves')
    .description("draw a run's training curves (loss per step, validation score and CM error) from its train-log.jsonl")
    .argument('<run>', 'a cmseg train --out folder')
    .option('-o, --out <file>', 'the picture (default <run>/curves.png)')
    .action(async (run: string, flags: { out?: string }) => {
      const file = await writeRunCurves(run, flags.out);
      printOutputs([['curves', file]]);
    });
  return withExamples(command, 'cmseg curves runs/cm', 'cmseg curves runs/brats --out brats-curves.png');
}
