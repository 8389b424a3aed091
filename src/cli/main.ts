#!/usr/bin/env node
// The `cmseg` command line: one file per command, registered here. Every error ends the
// process with one line on stderr and exit code 1; set CMSEG_DEBUG=1 to see the stack.

import { Command } from 'commander';
import { benchCommand } from './bench';
import { registerCurvesCommand } from './curves';
import { registerEvalCommand } from './eval';
import { registerFuseCommand } from './fuse';
import { registerInfoCommand } from './info';
import { registerPhantomCommand } from './phantom';
import { registerPredictCommand } from './predict';
import { registerPrepareCommand } from './prepare';
import { registerSimulateCommand } from './simulate';
import { registerTrainCommand } from './train';
import * as fs from 'fs';
import * as path from 'path';
import { UserError, withExamples, WRITE_FAILURES } from './common';
import { AtomicWriteError } from '../data/files';

// eslint-disable-next-line @typescript-eslint/no-require-imports
const { version } = require('../../package.json') as { version: string };

export interface ProgramOptions {
  /** Throw commander's errors (and --help's exit) instead of exiting the process: for tests. */
  exitOverride?: boolean;
  /** Where commander writes help and its own errors (default stdout / stderr). */
  writeOut?: (text: string) => void;
  writeErr?: (text: string) => void;
}

export function buildProgram(options: ProgramOptions = {}): Command {
  const program = new Command();
  // Settings made before .command() are inherited by every subcommand.
  if (options.exitOverride) program.exitOverride();
  program.configureOutput({
    ...(options.writeOut ? { writeOut: options.writeOut } : {}),
    ...(options.writeErr ? { writeErr: options.writeErr } : {}),
    // commander's own errors ("error: unknown option ...") get the prefix of ours.
    outputError: (text, write) => write(`cmseg: ${text}`),
  });
  program
    .name('cmseg')
    .description('Learn segmentation from several noisy annotators: the consensus and each annotator\'s pixel-wise confusion matrix')
    .version(version);
  registerPrepareCommand(program);
  registerTrainCommand(program);
  registerEvalCommand(program);
  registerPredictCommand(program);
  registerCurvesCommand(program);
  registerSimulateCommand(program);
  registerFuseCommand(program);
  registerPhantomCommand(program);
  registerInfoCommand(program);
  // bench.ts builds its command itself; give it the settings the others inherit.
  program.addCommand(benchCommand().copyInheritedSettings(program));
  withExamples(program, 'cmseg train --preset mnist --method cm --out runs/cm', 'cmseg train --help');
  return program;
}

// `cmseg ... | head` (or a closed log pipe) ends the reader early. The command goes on
// without that stream rather than stopping: a training run still finishes its step and
// saves, and nothing prints a stack trace for a write nobody reads.
const guarded = new WeakSet<NodeJS.WriteStream>();
function quietOnClosedPipe(stream: NodeJS.WriteStream): void {
  if (guarded.has(stream)) return; // main() runs many times in one test process
  guarded.add(stream);
  stream.on('error', (err: NodeJS.ErrnoException) => {
    if (err.code !== 'EPIPE') throw err;
    stream.write = (() => true) as typeof stream.write; // later writes go nowhere
  });
}

export async function main(argv: string[] = process.argv): Promise<void> {
  quietOnClosedPipe(process.stdout);
  quietOnClosedPipe(process.stderr);
  try {
    refuseSpecialOutputs(argv);
    await buildProgram().parseAsync(argv);
  } catch (error) {
    const described = describeError(error);
    const message = described.includes('~') ? described + tildeHint(argv) : described;
    process.stderr.write(`cmseg: error: ${message}\n`);
    if (process.env.CMSEG_DEBUG && error instanceof Error && error.stack) process.stderr.write(error.stack + '\n');
    process.exitCode = 1;
  }
}

// The options that name a file a command writes (eval/curves --out, fuse -o, --cms, --posterior).
const OUTPUT_FILE_FLAGS = ['--out', '-o', '--cms', '--posterior'];

// Every output is written whole: a temp file beside the target, renamed over it. Over a device,
// FIFO or socket (`--out /dev/null`, `--out /dev/stdout`, a named pipe) that rename replaces the
// special file itself with a regular one: as root, /dev/null of the whole machine. Refused before
// anything runs, with what to do instead.
function refuseSpecialOutputs(argv: readonly string[]): void {
  const args = argv.slice(2);
  for (let i = 0; i < args.length; i++) {
    const eq = args[i].indexOf('=');
    const flag = eq > 0 ? args[i].slice(0, eq) : args[i];
    if (!OUTPUT_FILE_FLAGS.includes(flag)) continue;
    const value = eq > 0 ? args[i].slice(eq + 1) : args[i + 1];
    if (value === undefined || value === '') continue;
    let stat: fs.Stats | undefined;
    try {
      stat = fs.statSync(value, { throwIfNoEntry: false });
    } catch (err) {
      // Was a raw "ENAMETOOLONG: name too long, stat ...". Said now, not after the command's
      // work (an evaluation of hours) fails to write it.
      if ((err as NodeJS.ErrnoException).code === 'ENAMETOOLONG') {
        throw new UserError(`${flag} ${value}: the name is too long for the file system (at most 255 bytes a file or folder name, 4096 the whole path); choose a shorter one`);
      }
      throw err; // a file in its folder path, no permission: described as before
    }
    // /dev/stdout -> /proc/self/fd/1 is a regular file when stdout is redirected to one: the
    // rename would still replace the link in /dev. Nothing under /dev or /proc is a cmseg output,
    // except in /dev/shm, the memory-backed scratch folder of many clusters.
    const resolved = path.resolve(value);
    const special = /^\/(dev|proc)\//.test(resolved) && !/^\/dev\/shm\/./.test(resolved);
    if (special || (stat && !stat.isFile() && !stat.isDirectory())) {
      throw new UserError(
        `${flag} ${value} is not a regular file (a device, pipe or socket): cmseg writes its outputs whole, renaming a finished temp file over the name, which would replace it; name an ordinary file instead (and read it from there)`,
      );
    }
  }
}

// `--data "~/brats"` (quoted, or from a config file or script variable) reaches cmseg with the
// `~` unexpanded, and fails as "not found: /work/~/brats": say why, which the path alone does not.
function tildeHint(argv: readonly string[]): string {
  const tilde = argv.slice(2).some((arg) => /^~($|\/)/.test(arg) || /^--?[\w-]+=~($|\/)/.test(arg));
  return tilde ? " (note: the shell does not expand a quoted '~': write $HOME or the full path)" : '';
}

// Node's file-system errors name the call, not what the user asked for: say it plainly.
function describeError(error: unknown): string {
  if (!(error instanceof Error)) return String(error);
  // An atomic write fails on its temp file (".name.<pid>.<hex>.tmp"), which the user never
  // named and which is gone again: say which file could not be written, and why, plainly.
  if (error instanceof AtomicWriteError) {
    const cause = error.cause as NodeJS.ErrnoException | undefined;
    const why = cause?.code ? WRITE_FAILURES[cause.code] : undefined;
    if (why) return `could not write ${error.path}: ${why}`;
    return error.message;
  }
  const e = error as NodeJS.ErrnoException;
  const file = e.path ? `'${e.path}'` : 'a path';
  switch (e.code) {
    case 'EEXIST':
      return e.syscall === 'mkdir' ? `cannot make the folder ${file}: a file of that name exists` : error.message;
    case 'EISDIR':
      return `${file} is a folder, but a file was expected there`;
    case 'ENOTDIR':
      return `${file}: a part of this path is a file, not a folder`;
    case 'EACCES':
    case 'EPERM':
      return `no permission to access ${file}`;
    case 'ENOSPC':
      return `no space left on the device while writing ${file}`;
    case 'EROFS':
      return `${file} is on a read-only file system`;
    case 'ENAMETOOLONG':
      return `${file}: the name is too long for the file system (at most 255 bytes a file or folder name)`;
    default:
      return error.message;
  }
}

if (require.main === module) void main();
