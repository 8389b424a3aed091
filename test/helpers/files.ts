// Small helpers the file-heavy tests share.

import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import type { Test } from 'tap';

/**
 * Index of the first difference between two arrays (NaN equals NaN, -0 differs from 0), -1
 * when they are equal. tap's deep diff is far too slow on big typed arrays.
 */
export function firstDifference(a: ArrayLike<number>, b: ArrayLike<number>): number {
  if (a.length !== b.length) return Math.min(a.length, b.length);
  for (let i = 0; i < a.length; i++) if (!Object.is(a[i], b[i])) return i;
  return -1;
}

/** A fresh folder under the system's temporary folder, removed when test `t` ends. */
export function tempDir(t: Test, prefix = 'cmseg-test-'): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}
