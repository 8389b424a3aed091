// Small file helpers shared by the readers and writers in src/data.
//
// Two promises: a file we write is either the old one or the complete new one
// (never half written, even if the process dies mid-write), and a file we
// cannot find is reported by name together with what it was supposed to be.

import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { randomBytes } from 'crypto';
import { loadNative } from '../native';

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
    throw namedFolderError(err, filePath, what);
  }
}

/** Synchronous readFileChecked. */
export function readFileCheckedSync(filePath: string, what: string): Buffer {
  try {
    return fs.readFileSync(filePath);
  } catch (err) {
    if (isMissing(err)) throw new MissingFileError(filePath, what, { cause: err });
    throw namedFolderError(err, filePath, what);
  }
}

/** Reading a folder fails with an EISDIR that names no path: name it (code and path kept). */
function namedFolderError(err: unknown, filePath: string, what: string): unknown {
  if ((err as NodeJS.ErrnoException).code !== 'EISDIR') return err;
  const named: NodeJS.ErrnoException = new Error(`${filePath} is a folder, but a ${what} file was expected there`, { cause: err });
  named.code = 'EISDIR';
  named.path = filePath;
  return named;
}

// The temp file lives in the target's folder because rename() is only atomic
// within one file system. The leading dot keeps it out of most globs, and the
// random part lets concurrent writers of the same target not collide.
function tempPathFor(target: string): string {
  return path.join(path.dirname(target), tempNameFor(target));
}

/** The name of a temp file for `target`: `.<name>.<pid>.<12 hex digits>.tmp`, the name cut to fit. */
export function tempNameFor(target: string): string {
  return `.${tempStem(target)}.${process.pid}.${randomBytes(6).toString('hex')}.tmp`;
}

// A file name holds 255 bytes; the temp name adds 26 to the target's (a pid of up to 7 digits,
// Linux's largest). A longer target name is cut to the bytes that fit, on a letter boundary, so
// every name that may be written can be written atomically. The cut does not depend on the
// writer's pid, so isAtomicTempFor recognises any writer's temp files.
const TEMP_NAME_ROOM = 255 - '..1234567.0123456789ab.tmp'.length;

function tempStem(target: string): string {
  const base = path.basename(target);
  if (Buffer.byteLength(base) <= TEMP_NAME_ROOM) return base;
  let stem = '';
  let bytes = 0;
  for (const letter of base) {
    bytes += Buffer.byteLength(letter);
    if (bytes > TEMP_NAME_ROOM) break;
    stem += letter;
  }
  return stem;
}

/** Whether `name` is a temp file left by writeFileAtomic for `target` (used by tests and cleanup). */
export function isAtomicTempFor(target: string, name: string): boolean {
  return name.startsWith(`.${tempStem(target)}.`) && ATOMIC_TEMP.test(name);
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
/**
 * A device, pipe or socket under the target's name would be replaced by the rename (as root,
 * `/dev/null` of the whole machine): refused. A folder there is left to the rename's EISDIR.
 */
function refuseSpecialTarget(filePath: string): void {
  let stat: fs.Stats | undefined;
  try {
    stat = fs.statSync(filePath, { throwIfNoEntry: false });
  } catch {
    // A name too long, a file in the folder path: the write below fails the same way and
    // reports it as an AtomicWriteError naming the file, as every other write failure.
    return;
  }
  if (stat && !stat.isFile() && !stat.isDirectory()) {
    throw new AtomicWriteError(filePath, {
      cause: new Error('it is a device, pipe or socket, not a regular file, and writing whole (a temp file renamed over the name) would replace it; name an ordinary file'),
    });
  }
}

/**
 * Where writing `filePath` goes: the file a symbolic link there points to (a `latest.json`
 * linked to a dated file, a case file linked to another disk), as a shell's `>` writes. The
 * rename of a temp file over the link itself replaced the link with a regular file and
 * left the file it pointed to unchanged. A link to nothing is replaced, as before.
 */
function writeTarget(filePath: string): string {
  try {
    if (fs.lstatSync(filePath).isSymbolicLink()) return fs.realpathSync(filePath);
  } catch {
    // no such file, or a link to nothing: the name itself
  }
  return filePath;
}

export async function writeFileAtomic(given: string, data: Uint8Array): Promise<void> {
  const filePath = writeTarget(given);
  refuseSpecialTarget(filePath);
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
export function writeFileAtomicSync(given: string, data: Uint8Array): void {
  const filePath = writeTarget(given);
  refuseSpecialTarget(filePath);
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

/**
 * Appends `text` to `filePath` (a log of one JSON object a line) whole or not at all: when the
 * write fails part-way (a full disk), the file is cut back to its old length, so no half
 * line is left for readers to stumble on. The error names the file: Node's write errors
 * name none ("ENOSPC: no space left on device, write").
 */
export function appendFileWholeSync(filePath: string, text: string): void {
  let fd: number | undefined;
  let size = 0;
  try {
    fd = fs.openSync(filePath, 'a');
    size = fs.fstatSync(fd).size;
    writeAllSync(fd, Buffer.from(text));
  } catch (err) {
    if (fd !== undefined) {
      try {
        fs.ftruncateSync(fd, size);
      } catch {
        // the original error is the one worth reporting
      }
    }
    const e = err as NodeJS.ErrnoException;
    if (e && typeof e === 'object' && e.path === undefined) e.path = filePath;
    if (e instanceof Error && !e.message.includes(filePath)) e.message += ` (appending to ${filePath})`;
    throw err;
  } finally {
    if (fd !== undefined) fs.closeSync(fd);
  }
}

/**
 * Checks, before long work whose result goes to `target`, that a file can be written there:
 * writes and removes a probe under the temp name the real write will use (so a name too long
 * for that shows too), with one page of data (a full disk shows). Throws the file system's
 * error (ENOSPC, EROFS, EACCES, ENAMETOOLONG, ...) with `target` as its path. Best effort:
 * space can still run out by the time the result is written.
 */
export function checkWritableSync(target: string): void {
  const probe = tempPathFor(writeTarget(target));
  let fd: number | undefined;
  try {
    fd = fs.openSync(probe, 'wx');
    writeAllSync(fd, Buffer.alloc(4096));
  } catch (err) {
    const e = err as NodeJS.ErrnoException;
    if (e && typeof e === 'object') {
      e.path = target;
      if (e instanceof Error) e.message = `${e.code ?? 'error'}: cannot write ${target}: ${e.message}`;
    }
    throw err;
  } finally {
    if (fd !== undefined) fs.closeSync(fd);
    try {
      fs.rmSync(probe, { force: true });
    } catch {
      // the error above is the one worth reporting
    }
  }
}

/**
 * A path as the user will want to paste it: relative to the working folder when inside it.
 * A quoted `--out "~/x"` is not expanded by the shell and makes a folder named `~` here: shown
 * as `~/x` it would read as the home folder (and a later `rm -rf ~/x` would hit that), so such
 * a path is shown as `./~/x`.
 */
export function displayPath(file: string): string {
  const relative = path.relative(process.cwd(), file);
  const shown = relative && !relative.startsWith('..') && !path.isAbsolute(relative) ? relative : file;
  return shown === '~' || shown.startsWith(`~${path.sep}`) || shown.startsWith('~/') ? `.${path.sep}${shown}` : shown;
}

/**
 * fs.mkdirSync(dir, {recursive: true}), failing with the real cause. Node's recursive mkdir
 * (v20) reports a read-only file system as ENOENT ("no such file or directory, mkdir DIR"):
 * the user is told the folder does not exist, which is what they asked to make. The error
 * thrown instead is that of making the first missing folder on its own (EROFS, EACCES, ...),
 * with its path; a symbolic link to a folder that is gone is named as such.
 */
export function makeFolderSync(dir: string): void {
  try {
    fs.mkdirSync(dir, { recursive: true });
  } catch (err) {
    throw realFolderError(dir, err);
  }
}

/** Asynchronous makeFolderSync. */
export async function makeFolder(dir: string): Promise<void> {
  try {
    await fs.promises.mkdir(dir, { recursive: true });
  } catch (err) {
    throw realFolderError(dir, err);
  }
}

function realFolderError(dir: string, err: unknown): unknown {
  const code = (err as NodeJS.ErrnoException | undefined)?.code;
  if (code !== 'ENOENT' && code !== 'ENOTDIR') return err;
  // The first missing folder on the way to `dir`: its parent exists.
  let missing = path.resolve(dir);
  while (path.dirname(missing) !== missing && !fs.existsSync(path.dirname(missing))) missing = path.dirname(missing);
  // A symbolic link to a folder that is gone (`runs -> /scratch/runs` after scratch was
  // purged): Node says "no such file or directory, mkdir runs/x", or that runs is not a folder.
  const link = symlinkTarget(missing);
  if (link !== undefined && !fs.existsSync(missing)) {
    return namedMkdirError(missing, `it is a symbolic link to ${link}, which does not exist (make that folder, or remove the link)`, 'ENOENT', err);
  }
  if (code !== 'ENOENT') return err;
  try {
    fs.mkdirSync(missing);
  } catch (real) {
    const realCode = (real as NodeJS.ErrnoException).code;
    if (realCode === 'EEXIST' || realCode === 'ENOENT') return err; // made meanwhile, or a parent gone meanwhile: the original error
    return namedMkdirError(missing, (real as Error).message, realCode, real);
  }
  // It could be made now (space freed meanwhile): undo (it is empty), and report what happened first.
  try {
    fs.rmdirSync(missing);
  } catch {
    // another process put something in it meanwhile: leave it
  }
  return err;
}

function symlinkTarget(file: string): string | undefined {
  try {
    return fs.lstatSync(file).isSymbolicLink() ? fs.readlinkSync(file) : undefined;
  } catch {
    return undefined;
  }
}

function namedMkdirError(folder: string, why: string, code: string | undefined, cause: unknown): NodeJS.ErrnoException {
  const named: NodeJS.ErrnoException = new Error(`cannot make the folder ${folder}: ${why}`, { cause });
  named.code = code;
  named.errno = (cause as NodeJS.ErrnoException | undefined)?.errno;
  named.syscall = 'mkdir';
  named.path = folder;
  return named;
}

// ---------------------------------------------------------------------------
// Lock files: one writer per folder across processes.
//
// A lock is a file (e.g. RUN/.train.lock, CACHE/.prepare.lock) holding the pid and host of
// the process that holds it. It appears atomically with its content: written to a temp
// file that is then hard-linked to the lock's name, which fails if the name exists (so a
// second process never sees an empty lock, nor takes one that is being written). File
// systems without hard links get an exclusive create instead. A lock whose pid is not
// alive on this host (SIGKILL, power loss) is taken over: removed, one takeover at a time
// (removeStaleLock), only if it is still the file that was found stale, so two processes
// taking over one stale lock at once cannot both win. A lock of another host (a folder on
// a network file system) is held as long as it is there: that host's pids cannot be
// checked from here. A pid reused by an unrelated live process keeps the lock held; the
// holder's message names the file to delete then. Within one process (worker threads share
// its pid) the locks held are claimed in the addon's process-wide set (processClaim).

/** A lock file is held by another live process, or already by this one. */
export class LockHeldError extends Error {
  constructor(
    readonly lockFile: string,
    /** The holder's pid (process.pid when sameProcess). */
    readonly holder: number,
    /** This process already holds the lock (a second writer in one process, in this thread or another). */
    readonly sameProcess: boolean,
    /** The holder's host, when it is another machine (a folder shared over the network). */
    readonly host?: string,
  ) {
    super(sameProcess ? `this process already holds ${lockFile}` : `${lockFile} is held by the process with ${lockHolderText(holder, host)}`);
    this.name = 'LockHeldError';
  }
}

/** "pid 123", or "pid 123 on otherhost" for another machine's process: how messages name a lock's holder. */
export function lockHolderText(pid: number, host?: string): string {
  return `pid ${pid}${host ? ` on ${host}` : ''}`;
}

/** A lock taken by acquireLockFile; release() removes its file (once; later calls do nothing). */
export interface FileLock {
  /** The lock file, as given. */
  readonly file: string;
  /** Whether this process still holds it. */
  readonly held: boolean;
  release(): void;
}

/** Whether a process with this pid exists (one we may not signal counts as existing). */
function processAlive(pid: number): boolean {
  if (!Number.isSafeInteger(pid) || pid <= 0) return false;
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

interface FileId {
  dev: number;
  ino: number;
}

const sameFile = (a: FileId, b: FileId) => a.dev === b.dev && a.ino === b.ino;

/** Whether two paths name one existing file (links and relative names included). */
export function sameFileAt(a: string, b: string): boolean {
  const sa = fs.statSync(a, { throwIfNoEntry: false });
  const sb = fs.statSync(b, { throwIfNoEntry: false });
  return sa !== undefined && sb !== undefined && sameFile(sa, sb);
}

/** Locks this thread holds, by resolved path. */
const heldLocks = new Map<string, { release(): void }>();

// Lock files claimed by any thread of this process (worker threads have their own heldLocks,
// and one pid): the addon's process-wide set, or this thread's own when the addon cannot load.
const localClaims = new Set<string>();
function processClaim(file: string, take: boolean): boolean {
  let claim: ((name: string, take: boolean) => boolean) | undefined;
  try {
    claim = loadNative().processClaim;
  } catch {
    claim = undefined;
  }
  if (claim) return claim(file, take);
  if (take) return localClaims.has(file) ? false : (localClaims.add(file), true);
  return localClaims.delete(file);
}

let exitHookInstalled = false;

// process.exit() (a second Ctrl-C, an uncaught error) still runs 'exit' listeners:
// the locks go with the process. Only SIGKILL and the like leave a stale lock behind.
function installExitHook(): void {
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  process.on('exit', () => {
    for (const lock of [...heldLocks.values()]) lock.release();
  });
}

/** Creates the lock file with our pid and host; undefined when it exists already. */
function createLockFile(file: string): FileId | undefined {
  const content = `${process.pid} ${os.hostname()}\n`;
  const temp = tempPathFor(file);
  try {
    // Inside the try: on a full disk the temp file is created and then its write fails; it
    // must not stay behind (the finally removes it).
    fs.writeFileSync(temp, content, { flag: 'wx' });
    const id = fs.statSync(temp);
    try {
      fs.linkSync(temp, file);
      return { dev: id.dev, ino: id.ino };
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'EEXIST') return undefined;
      // No hard links on this file system: an exclusive create (its content follows at once).
    }
    let fd: number;
    try {
      fd = fs.openSync(file, 'wx');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'EEXIST') return undefined;
      throw err;
    }
    try {
      writeAllSync(fd, Buffer.from(content));
      const st = fs.fstatSync(fd);
      return { dev: st.dev, ino: st.ino };
    } finally {
      fs.closeSync(fd);
    }
  } finally {
    fs.rmSync(temp, { force: true });
  }
}

/**
 * The lock file's holder (pid undefined: no pid in it; host undefined: written without one,
 * taken as this machine) and identity; undefined when it is gone.
 */
function readLockFile(file: string): (FileId & { pid: number | undefined; host: string | undefined; ageMs: number }) | undefined {
  let fd: number;
  try {
    fd = fs.openSync(file, 'r');
  } catch (err) {
    if (isMissing(err)) return undefined;
    throw err;
  }
  try {
    const st = fs.fstatSync(fd);
    const match = /^\s*(\d+)(?:[ \t]+(\S+))?\s*$/.exec(fs.readFileSync(fd, 'utf8'));
    return { dev: st.dev, ino: st.ino, pid: match ? Number(match[1]) : undefined, host: match?.[2], ageMs: Date.now() - st.mtimeMs };
  } finally {
    fs.closeSync(fd);
  }
}

/**
 * Removes the stale lock `found` if it is still the file at `file`. Takeovers run one at a
 * time, each holding FILE.takeover (an exclusive create): while it is held nobody else removes
 * a lock, and nobody can create one while the stale file holds the name, so the check and
 * the removal cannot be overtaken. (A rename-aside-and-put-back scheme lost a fresh lock when
 * a third process took the name in between.) A guard left by a process killed inside this
 * function is cleared after 10 s.
 */
function removeStaleLock(file: string, found: FileId & { pid: number | undefined }): void {
  const guard = `${file}.takeover`;
  let fd: number;
  try {
    fd = fs.openSync(guard, 'wx');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
    try {
      if (Date.now() - fs.statSync(guard).mtimeMs > 10_000) fs.rmSync(guard, { force: true });
    } catch {
      // gone meanwhile
    }
    sleepSync(20); // another process is taking it over: look again
    return;
  }
  fs.closeSync(fd);
  try {
    const now = readLockFile(file);
    // Still the stale lock found (a removed file's inode is reused at once: the pid must match too).
    if (now && sameFile(now, found) && now.pid === found.pid) fs.rmSync(file, { force: true });
  } finally {
    fs.rmSync(guard, { force: true });
  }
}

function sleepSync(ms: number): void {
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms);
}

/**
 * Takes the lock file `file` (its folder must exist) for this process, taking over a lock
 * whose process is gone. Throws LockHeldError when a live process holds it, this one
 * included (a second writer in one process is refused, not let in).
 */
export function acquireLockFile(given: string): FileLock {
  // Absolute from here on: a process.chdir() while it is held must not release another file.
  const file = path.resolve(given);
  // Held here or by another thread of this process: a lock file with our pid is then not stale.
  if (heldLocks.has(file) || !processClaim(file, true)) throw new LockHeldError(given, process.pid, true);
  try {
    return takeLockFile(given, file);
  } catch (err) {
    processClaim(file, false);
    // A file-system error (a full disk, a read-only file system, the folder gone) names the
    // lock's temp file (`..train.lock.<pid>.<hex>.tmp`), which the user never named and
    // which is gone again, or no file at all: name the lock file, keeping the cause and its code.
    if (typeof (err as NodeJS.ErrnoException | undefined)?.code === 'string' && (err as NodeJS.ErrnoException).syscall !== undefined) {
      throw new AtomicWriteError(given, { cause: err });
    }
    throw err;
  }
}

/** acquireLockFile's work once this process's claim on `file` is ours. */
function takeLockFile(given: string, file: string): FileLock {
  const deadline = Date.now() + 5000;
  for (;;) {
    const id = createLockFile(file);
    if (id) {
      let held = true;
      const lock: FileLock = {
        file: given,
        get held() {
          return held;
        },
        release() {
          if (!held) return;
          held = false;
          heldLocks.delete(file);
          try {
            // Only our own lock file: never one another process made after taking ours over
            // (or after someone deleted ours), which may even have reused its inode.
            const now = readLockFile(file);
            if (now && sameFile(now, id) && now.pid === process.pid) fs.rmSync(file, { force: true });
          } catch {
            // already gone
          } finally {
            processClaim(file, false);
          }
        },
      };
      heldLocks.set(file, lock);
      installExitHook();
      return lock;
    }
    const found = readLockFile(file);
    if (Date.now() > deadline) {
      throw new Error(`could not take the lock ${given}: other processes keep taking it (holder now: ${found?.pid ?? 'none'})`);
    }
    if (!found) continue; // released meanwhile
    // (A modification time in the future, a clock set back, is no sign of a writer at work.)
    if (found.pid === undefined && found.ageMs >= 0 && found.ageMs < 2000) {
      sleepSync(20); // just created without links: its pid follows at once
      continue;
    }
    // Another machine's process (a folder on a network file system): its pid says nothing here.
    if (found.pid !== undefined && found.host !== undefined && found.host !== os.hostname()) {
      throw new LockHeldError(given, found.pid, false, found.host);
    }
    // Our own pid in a lock no thread of this process holds (we hold its claim): a dead process whose pid we reuse.
    if (found.pid !== undefined && found.pid !== process.pid && processAlive(found.pid)) throw new LockHeldError(given, found.pid, false);
    removeStaleLock(file, found);
  }
}

/**
 * Takes the lock of a folder's writers (acquireLockFile) and then removes, from each of
 * `folders`, the temp files that writers killed mid-write left there
 * (removeStaleAtomicTemps): with the lock held no live writer can be starting one.
 */
export function acquireFolderLock(lockFile: string, folders: readonly string[]): FileLock {
  const lock = acquireLockFile(lockFile);
  try {
    for (const dir of folders) removeStaleAtomicTemps(dir);
  } catch (err) {
    lock.release();
    throw err;
  }
  return lock;
}

// writeFileAtomic's temp files: `.<name>.<pid>.<12 hex digits>.tmp` (tempPathFor).
const ATOMIC_TEMP = /^\..+\.(\d+)\.[0-9a-f]{12}\.tmp$/;

/** The pid in the name of a temp file of writeFileAtomic (or of a lock), or undefined if `name` is not one. */
export function atomicTempWriter(name: string): number | undefined {
  const match = ATOMIC_TEMP.exec(name);
  return match ? Number(match[1]) : undefined;
}

/**
 * Removes the temp files of writeFileAtomic in `dir` (not its subfolders) whose writing
 * process is gone, e.g. killed mid-write; those of live processes stay. Returns their
 * names. Call it holding the folder's lock, so no writer of the folder can be starting.
 */
export function removeStaleAtomicTemps(dir: string): string[] {
  let names: string[];
  try {
    names = fs.readdirSync(dir);
  } catch (err) {
    if (isMissing(err)) return [];
    throw err;
  }
  const removed: string[] = [];
  for (const name of names) {
    const pid = atomicTempWriter(name);
    if (pid === undefined || processAlive(pid)) continue;
    try {
      const file = path.join(dir, name);
      if (!fs.lstatSync(file).isFile()) continue;
      fs.rmSync(file, { force: true });
      removed.push(name);
    } catch {
      // gone meanwhile, or not ours to remove: leave it
    }
  }
  return removed;
}
