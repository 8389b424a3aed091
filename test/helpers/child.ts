// A script run in a child Node, for checks that must not risk the test process: a native crash
// (a segfault shows as the child's signal), a memory limit (`ulimit -v`: a request the native
// side fails to refuse fails with the allocator's message in the child), the child's own RSS or
// garbage collections. The script prints its result as JSON on its last stdout line.
import type { Test } from 'tap';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { spawnSync } from 'child_process';

/** The addon the in-process tests load (CMSEG_ADDON as src/native.ts reads it), for a child's require(). */
export const ADDON = process.env.CMSEG_ADDON ? path.resolve(process.env.CMSEG_ADDON) : path.join(__dirname, '..', '..', 'build', 'Release', 'cmseg.node');

export interface ChildOptions {
  /** Arguments after the script (process.argv[2] ...). */
  args?: string[];
  /** Run with --expose-gc (global.gc in scope). */
  gc?: boolean;
  /** `ulimit -v` of the child, in KiB. */
  limitKiB?: number | 'unlimited';
  /** Added to this process's environment. */
  env?: Record<string, string>;
  /** Default 60 s. */
  timeoutMs?: number;
}

export interface ChildRun {
  status: number | null;
  signal: string | null;
  /** The last stdout line as JSON; `{ stdout }` when it is not JSON (a crash before it). */
  out: Record<string, unknown>;
  stdout: string;
  stderr: string;
}

/** Writes `script` (CommonJS) to a temporary file (removed at the test's end) and runs it in a child Node. */
export function runChild(t: Test, script: string, options: ChildOptions = {}): ChildRun {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cmseg-child-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const file = path.join(dir, 'child.js');
  fs.writeFileSync(file, script);
  const node = [...(options.gc ? ['--expose-gc'] : []), file, ...(options.args ?? [])];
  const how = { encoding: 'utf8' as const, timeout: options.timeoutMs ?? 60_000, env: { ...process.env, ...options.env } };
  const run =
    options.limitKiB === undefined
      ? spawnSync(process.execPath, node, how)
      : spawnSync('bash', ['-c', `ulimit -v ${options.limitKiB}; exec "$@"`, 'bash', process.execPath, ...node], how);
  let out: Record<string, unknown>;
  try {
    out = JSON.parse(run.stdout.trim().split('\n').pop() ?? '');
  } catch {
    out = { stdout: run.stdout };
  }
  return { status: run.status, signal: run.signal, out, stdout: run.stdout, stderr: run.stderr };
}
