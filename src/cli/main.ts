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
import { withExamples } from './common';

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
    await buildProgram().parseAsync(argv);
  } catch (error) {
    const message = describeError(error);
    process.stderr.write(`cmseg: error: ${message}\n`);
    if (process.env.CMSEG_DEBUG && error instanceof Error && error.stack) process.stderr.write(error.stack + '\n');
    process.exitCode = 1;
  }
}

// Node's file-system errors name the call, not what the user asked for: say it plainly.
function describeError(error: unknown): string {
  if (!(error instanceof Error)) return String(error);
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
    default:
      return error.message;
  }
}

if (require.main === module) void main();
