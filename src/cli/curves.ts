// `cmseg curves`: a run's training curves as a picture (src/report/curves.ts) from its
// train-log.jsonl. `cmseg train` draws <out>/curves.png itself when it stops; this command
// draws it for a run still going (from another terminal) or for any run folder.

import * as fs from 'fs';
import * as path from 'path';
import { Command } from 'commander';
import { AtomicWriteError, makeFolderSync, sameFileAt } from '../data/files';
import { isPngFile, writePng } from '../data/png';
import { drawnPart, trainingCurves } from '../report/curves';
import { forEachTrainLogEntry } from '../train/trainer';
import { displayPath, parsePath, printOutputs, shellWord, UserError, withExamples } from './common';

/** The file name of a run's curves picture, beside its log. */
export const CURVES_FILE = 'curves.png';

/** How many times readCurvesEvents reads a log that changed while it was read. */
export const CURVES_READ_ATTEMPTS = 3;

/** Whether the file at `file` is another file, or was written, since `before` (ino, size, mtime). */
function changedSince(file: string, before: fs.Stats): boolean {
  const now = fs.statSync(file, { throwIfNoEntry: false });
  return !now || now.ino !== before.ino || now.size !== before.size || now.mtimeMs !== before.mtimeMs;
}

/**
 * What the curves draw of each entry of a run's log (drawnPart: a step's loss and CE sum, a
 * validation's score and CM error), the log read in pieces: a 250,000-step log (85 MB) read
 * whole took 300 MB of heap, at the end of `cmseg train` in the process that still holds its
 * model and data.
 *
 * A resume of the run cuts the log in place (the entries past its checkpoint) and appends: read
 * meanwhile, the next piece began inside a line, and curves failed with "line N is not a training
 * log entry" for a log that is fine; or, cut and not yet appended to, the cut entries were drawn.
 * So a log that failed to parse and changed (ino, size or mtime) since its read began, or that
 * is shorter now than when it began (cut) or another file (replaced), or that changed and whose
 * steps went backwards (cut and appended past its old size, the next piece on a whole line), is read again, up to
 * CURVES_READ_ATTEMPTS times in all; a log still broken then is reported (a live run's log
 * grows all the time: a line broken for good is read that many times, then reported).
 * `hooks.visited` (tests) is called before each entry.
 */
export function readCurvesEvents(log: string, hooks: { visited?: (line: number, attempt: number) => void } = {}): Record<string, unknown>[] {
  for (let attempt = 1; ; attempt++) {
    const events: Record<string, unknown>[] = [];
    let before: fs.Stats;
    // A drawn step below one drawn before it: the log is written in step order, so this read
    // joined two logs (a cut and appended one whose next piece began on a whole line parses fine).
    let latest = -Infinity;
    let backwards = false;
    try {
      before = fs.statSync(log);
      forEachTrainLogEntry(
        log,
        (e, line) => {
          hooks.visited?.(line, attempt);
          if (e.event === 'step' || e.event === 'validation') {
            events.push(drawnPart(e));
            if (typeof e.step === 'number') {
              if (e.step < latest) backwards = true;
              latest = Math.max(latest, e.step);
            }
          }
        },
        { whileWritten: true },
      );
    } catch (err) {
      // (`before` is set: a SyntaxError comes from the read, after the stat.)
      if (attempt < CURVES_READ_ATTEMPTS && err instanceof SyntaxError && changedSince(log, before!)) continue;
      throw new UserError(`${displayPath(log)} ${(err as Error).message}`);
    }
    const now = fs.statSync(log, { throwIfNoEntry: false });
    // Cut while read (the cut entries may have been drawn), replaced whole (a resume that rewrites
    // it), or cut and appended to past its old size while read (steps drawn twice, from both
    // logs: `backwards`): read it as it is now.
    if (attempt < CURVES_READ_ATTEMPTS && now && (now.ino !== before.ino || now.size < before.size || (backwards && changedSince(log, before)))) continue;
    return events;
  }
}

/** Draws the curves of the run in `runDir` into `named` (default <runDir>/curves.png); returns the file. */
export async function writeRunCurves(runDir: string, named?: string): Promise<string> {
  const out = named ?? path.join(runDir, CURVES_FILE);
  const log = path.join(runDir, 'train-log.jsonl');
  // The log itself named instead of its folder: say which argument is wanted.
  if (fs.statSync(runDir, { throwIfNoEntry: false })?.isFile()) {
    throw new UserError(`${displayPath(runDir)} is a file: name the run folder that holds train-log.jsonl (cmseg curves ${shellWord(displayPath(path.dirname(runDir)))})`);
  }
  if (!fs.existsSync(log)) throw new UserError(`${displayPath(runDir)} has no train-log.jsonl: is it a cmseg train --out folder?`);
  // --out names a file: a folder there would only fail at the end, with the temp file's name.
  if (fs.statSync(out, { throwIfNoEntry: false })?.isDirectory()) {
    throw new UserError(`--out ${displayPath(out)} is a folder: name the picture's file (e.g. ${displayPath(path.join(out, CURVES_FILE))})`);
  }
  // --out is replaced whole: naming the run's log (or its checkpoint, or any file that is not a
  // picture) destroyed it, and the log is the only record of the run's curves. A PNG already
  // there (an earlier curves.png) is replaced; the default <run>/curves.png always is.
  const existing = named === undefined ? undefined : fs.statSync(out, { throwIfNoEntry: false });
  if (existing?.isFile() && existing.size > 0 && !isPngFile(out)) {
    throw new UserError(`--out ${displayPath(out)} is a file that is not a PNG picture${sameFileAt(out, log) ? " (the run's training log)" : ''}: it would be replaced; name a .png file (e.g. ${displayPath(path.join(runDir, CURVES_FILE))})`);
  }
  const events = readCurvesEvents(log);
  if (!events.some((e) => e.event === 'step')) throw new UserError(`${displayPath(log)} has no training steps yet: nothing to draw`);
  const picture = trainingCurves(events, { title: path.basename(path.resolve(runDir)) });
  // As eval's --out: a folder that does not exist yet is made.
  makeFolderSync(path.dirname(path.resolve(out)));
  await writePng(out, picture);
  return out;
}

export function registerCurvesCommand(program: Command): Command {
  const command = program
    .command('curves')
    .description("draw a run's training curves (loss per step, validation score and CM error) from its train-log.jsonl")
    .argument('<run>', 'a cmseg train --out folder', parsePath('<run>'))
    .option('-o, --out <file>', 'the picture (default <run>/curves.png)', parsePath('--out'))
    .action(async (run: string, flags: { out?: string }) => {
      let file: string;
      try {
        file = await writeRunCurves(run, flags.out);
      } catch (err) {
        // A run folder that cannot be written (another user's run, a read-only share): the
        // picture can still be drawn, elsewhere; say how.
        const code = err instanceof AtomicWriteError ? (err.cause as NodeJS.ErrnoException | undefined)?.code : undefined;
        if (flags.out === undefined && (code === 'EROFS' || code === 'EACCES' || code === 'EPERM')) {
          const why = code === 'EROFS' ? 'the run folder is on a read-only file system' : 'no permission to write in the run folder';
          throw new UserError(`could not write ${displayPath((err as AtomicWriteError).path)}: ${why}; draw the picture elsewhere with --out <file>.png`);
        }
        throw err;
      }
      printOutputs([['curves', file]]);
    });
  return withExamples(command, 'cmseg curves runs/cm', 'cmseg curves runs/brats --out brats-curves.png');
}
