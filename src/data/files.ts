// Small file helpers shared by the readers and writers in src/data.
//
// Two promises: a file we write is either the old one or the complete new one
// (never half written, even if the process dies mid-write), and a file we
// cannot find is reported by name together with what it was supposed to be.

import * as fs from 'fs';
import * as path from 'path';
import { randomBytes } from 'crypto';

/** A file the caller needed is not there. */
export class MissingFileError extends Error {
  readonly code = 'ENOENT';

  constructor(
    readonly path: string,
    /** What the file was supposed to be, e.g. "NIfTI image". */
    readonly what: string,
    options?: { cause?: unknown },
  ) {
    super(`${what} not found: ${path}`, options);
    this.name = 'MissingFileError';
  }
}

/** Writing `path` failed; the previous content of `path`, if any, is untouched. */
export class AtomicWriteError extends Error {
  constructor(
    readonly path: string,
    options?: { cause?: unknown },
  ) {
    const reason = options?.cause instanceof Error ? options.cause.message : String(options?.cause);
    super(`could not write ${path}: ${reason}`, options);
    this.name = 'AtomicWriteError';
  }
}

function isMissing(err: unknown): boolean {
  return (err as NodeJS.ErrnoException | undefined)?.code === 'ENOENT';
}

/** Reads a whole file; a missing file becomes a MissingFileError saying `what` it was. */
export async function readFileChecked(filePath: string, what: string): Promise<Buffer> {
  try {
    return await fs.promises.readFile(filePath);
  } catch (err) {
    if (isMissing(err)) throw new MissingFileError(filePath, what, { cause: err });
    throw err;
  }
}

/** Synchronous readFileChecked. */
export function readFileCheckedSync(filePath: string, what: string): Buffer {
  try {
    return fs.readFileSync(filePath);
  } catch (err) {
    if (isMissing(err)) throw new MissingFileError(filePath, what, { cause: err });
    throw err;
  }
}

// The temp file lives in the target's folder because rename() is only atomic
// within one file system. The leading dot keeps it out of most globs, and the
// random part lets concurrent writers of the same target not collide.
function tempPathFor(target: string): string {
  const suffix = `${process.pid}.${randomBytes(6).toString('hex')}`;
  return path.join(path.dirname(target), `.${path.basename(target)}.${suffix}.tmp`);
}

/** Whether `name` is a temp file left by writeFileAtomic for `target` (used by tests and cleanup). */
export function isAtomicTempFor(target: string, name: string): boolean {
  const base = path.basename(target);
  return name.startsWith(`.${base}.`) && name.endsWith('.tmp');
}

// After the rename the new directory entry itself must reach the disk, or a
// crash could bring back the old file. Directories cannot be opened on
// Windows, and some file systems refuse fsync on them; losing that extra
// durability there is acceptable, so failures are ignored.
function fsyncDirectorySync(dir: string): void {
  let fd: number | undefined;
  try {
    fd = fs.openSync(dir, 'r');
    fs.fsyncSync(fd);
  } catch {
    // best effort, see above
  } finally {
    if (fd !== undefined) fs.closeSync(fd);
  }
}

async function fsyncDirectory(dir: string): Promise<void> {
  let handle: fs.promises.FileHandle | undefined;
  try {
    handle = await fs.promises.open(dir, 'r');
    await handle.sync();
  } catch {
    // best effort, see fsyncDirectorySync
  } finally {
    await handle?.close();
  }
}

/**
 * Writes `data` to `filePath` so that readers see either the old file or the
 * complete new one: temp file in the same folder, fsync, rename over the target.
 * On failure the temp file is removed and an AtomicWriteError is thrown.
 */
export async function writeFileAtomic(filePath: string, data: Uint8Array): Promise<void> {
  const tempPath = tempPathFor(filePath);
  try {
    const handle = await fs.promises.open(tempPath, 'wx');
    try {
      await handle.writeFile(data);
      await handle.sync();
    } finally {
      await handle.close();
    }
    await fs.promises.rename(tempPath, filePath);
  } catch (err) {
    await fs.promises.rm(tempPath, { force: true }).catch(() => undefined);
    throw new AtomicWriteError(filePath, { cause: err });
  }
  await fsyncDirectory(path.dirname(filePath));
}

/** Synchronous writeFileAtomic. */
export function writeFileAtomicSync(filePath: string, data: Uint8Array): void {
  const tempPath = tempPathFor(filePath);
  try {
    const fd = fs.openSync(tempPath, 'wx');
    try {
      writeAllSync(fd, data);
      fs.fsyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
    fs.renameSync(tempPath, filePath);
  } catch (err) {
    try {
      fs.rmSync(tempPath, { force: true });
    } catch {
      // the original error is the one worth reporting
    }
    throw new AtomicWriteError(filePath, { cause: err });
  }
  fsyncDirectorySync(path.dirname(filePath));
}

// fs.writeSync may write fewer bytes than asked (large buffers, some file systems).
function writeAllSync(fd: number, data: Uint8Array): void {
  let written = 0;
  while (written < data.byteLength) {
    written += fs.writeSync(fd, data, written, data.byteLength - written);
  }
}

/** A path as the user will want to paste it: relative to the working folder when inside it. */
export function displayPath(file: string): string {
  const relative = path.relative(process.cwd(), file);
  return relative && !relative.startsWith('..') && !path.isAbsolute(relative) ? relative : file;
}
