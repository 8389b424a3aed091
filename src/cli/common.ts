// Pieces every command shares: argument parsers that reject bad values with commander's
// one-line message, the error type for mistakes the user can fix, and the closing
// "outputs" block that says where a command's files went (STYLE: every command does).

import { Command, InvalidArgumentError, Option } from 'commander';

import { displayPath } from '../data/files';
import { loadNative } from '../native';

export { UserError } from '../errors';
export { displayPath };

/** Whether two lists of names are the same names in the same order (annotators: a CM head is one annotator's). */
export function sameNames(a: readonly string[], b: readonly string[]): boolean {
  return a.length === b.length && a.every((name, i) => name === b[i]);
}

export function parseInteger(min: number, max = Number.MAX_SAFE_INTEGER): (value: string) => number {
  return (value) => {
    const n = Number(value);
    if (!/^[-+]?\d+$/.test(value.trim()) || !Number.isSafeInteger(n) || n < min || n > max) {
      throw new InvalidArgumentError(max === Number.MAX_SAFE_INTEGER ? `expected an integer >= ${min}.` : `expected an integer in ${min}..${max}.`);
    }
    return n;
  };
}

/** The most native threads the engine takes (setNumThreads, CMSEG_NUM_THREADS). */
export const MAX_THREADS = 1024;

/**
 * --threads: checked while parsing, as every other option. Past 1024 the engine's own check
 * failed after the command had started, as "setNumThreads expects an integer in 1..1024, got 5e+03".
 */
export const parseThreads = parseInteger(1, MAX_THREADS);

// A decimal number as people write it: 3, -2, 0.001, .001, 1e-3. Number() alone also took
// "0x10" (16), "0b11" and "0o17", so `--lr 0x10` trained at learning rate 16 without a word.
const DECIMAL = /^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$/;

export function parseNumber(min: number, inclusive = true): (value: string) => number {
  return (value) => {
    const x = Number(value);
    if (!DECIMAL.test(value.trim()) || !Number.isFinite(x) || (inclusive ? x < min : x <= min)) {
      throw new InvalidArgumentError(`expected a number ${inclusive ? '>=' : '>'} ${min}.`);
    }
    return x;
  };
}

/**
 * A file or folder option's value, refused when empty: `--out "$OUT"` with the variable unset
 * reached the command as "" and path.resolve("") is the working folder, so the command wrote
 * its files there without a word.
 */
export function parsePath(flag: string): (value: string) => string {
  return (value) => {
    if (value.trim() === '') throw new InvalidArgumentError(`${flag} is empty: name a path (an unset shell variable?).`);
    return value;
  };
}

/**
 * A path as one word a shell reads back unchanged, for the commands cmseg suggests ("next:
 * cmseg prepare --data ..."): a folder with a space or quote in its name was printed bare and
 * the pasted command split it in two.
 */
export function shellWord(text: string): string {
  return /^[\w@%+=:,./-]+$/.test(text) ? text : `'${text.replace(/'/g, `'\\''`)}'`;
}

/** An option whose value must be one of `choices` (commander lists them in --help and in the error). */
export function choiceOption(flags: string, description: string, choices: readonly string[]): Option {
  return new Option(flags, description).choices(choices as string[]);
}

/** Whether the user typed this option (rather than it having its default). */
export function given(command: Command, key: string): boolean {
  const source = command.getOptionValueSource(key);
  return source === 'cli' || source === 'env';
}

/** Appends "Example:" lines to a command's --help. */
export function withExamples(command: Command, ...examples: string[]): Command {
  return command.addHelpText('after', `\nExample${examples.length > 1 ? 's' : ''}:\n${examples.map((e) => `  $ ${e}`).join('\n')}\n`);
}


/** Why a file could not be written, by the error's code, in words (undefined for an unlisted code). */
export const WRITE_FAILURES: Readonly<Record<string, string>> = {
  EACCES: 'no permission to write in its folder',
  EPERM: 'no permission to write in its folder',
  EROFS: 'its folder is on a read-only file system',
  ENOSPC: 'no space left on the device',
  EDQUOT: 'the disk quota is used up',
  ENOENT: 'its folder does not exist (or cannot hold new files)',
  ENOTDIR: 'a part of its folder path is a file, not a folder',
  EISDIR: 'a folder of that name is in the way',
  EIO: 'an input/output error on the device',
  // The temp file's name is the target's plus about 25 characters: a name near the 255-byte limit fits, its temp does not.
  ENAMETOOLONG: 'its name is too long for the file system (cmseg writes it under a temporary name about 25 characters longer first)',
};

/** The closing block of every command: what was written, and where. */
export function printOutputs(entries: readonly [string, string | readonly string[]][]): void {
  const width = Math.max(...entries.map(([label]) => label.length));
  process.stdout.write('outputs:\n');
  for (const [label, files] of entries) {
    const list = typeof files === 'string' ? [files] : files;
    process.stdout.write(`  ${label.padEnd(width)}  ${list.map(displayPath).join(', ')}\n`);
  }
}

export function fmt(x: number | undefined, digits = 4): string {
  return x === undefined || !Number.isFinite(x) ? '-' : x.toFixed(digits);
}

/**
 * Ends the command at once with `code` (a second Ctrl-C, or a signal with no step to finish).
 * process.exit() would first wait for the native call in progress on a worker thread (seconds
 * for a 3D step); this runs the 'exit' listeners as process.exit does (run-folder locks
 * released, a progress bar's hidden cursor shown again), then ends without that wait.
 */
export function quitNow(code: number): never {
  let exitNow: ((code: number) => never) | undefined;
  try {
    exitNow = loadNative().exitNow;
  } catch {
    exitNow = undefined; // no addon, so no native call to wait for either
  }
  if (typeof exitNow !== 'function') process.exit(code);
  process.exitCode = code;
  process.emit('exit', code);
  return exitNow(code);
}
