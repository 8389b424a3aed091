// Small tmpfs disks for the file-system failure tests (disk-audit, disk-followups): a full
// disk, a read-only file system. Mounting needs root on Linux: where it is not permitted the
// tests skip, saying why (mountUnavailable).

import type { Test } from 'tap';
import { execFileSync, spawnSync } from 'child_process';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { tempDir } from './files';

/** Why tmpfs mounts cannot be made here, or undefined when they can. */
export function mountUnavailable(): string | undefined {
  if (process.platform !== 'linux') return 'tmpfs mounts need Linux';
  if (process.getuid?.() !== 0) return 'mounting a small tmpfs needs root';
  const probe = fs.mkdtempSync(path.join(os.tmpdir(), 'cmseg-mount-probe-'));
  try {
    const r = spawnSync('mount', ['-t', 'tmpfs', '-o', 'size=64k', 'tmpfs', probe], { encoding: 'utf8' });
    if (r.status !== 0) return `mount -t tmpfs is not permitted here (${(r.stderr || r.error?.message || '').trim()})`;
    spawnSync('umount', [probe]);
    return undefined;
  } finally {
    fs.rmSync(probe, { recursive: true, force: true });
  }
}

/** A fresh tmpfs of `kb` KiB, unmounted (lazily, should a file be open) when `t` ends. */
export function smallDisk(t: Test, kb: number): string {
  const dir = tempDir(t, 'cmseg-disk-');
  execFileSync('mount', ['-t', 'tmpfs', '-o', `size=${kb}k`, 'tmpfs', dir]);
  // Registered after tempDir's removal, so it runs first (teardowns run in reverse order).
  t.teardown(() => {
    spawnSync('umount', [dir]);
    if (fs.readFileSync('/proc/mounts', 'utf8').includes(` ${dir} `)) spawnSync('umount', ['-l', dir]);
  });
  return dir;
}

/** Fills `dir`'s file system, then frees `leaveKb` KiB; returns the filler (delete it to free the space). */
export function fill(dir: string, leaveKb = 0): string {
  const filler = path.join(dir, 'filler');
  const fd = fs.openSync(filler, 'w');
  const block = Buffer.alloc(4096);
  try {
    for (;;) fs.writeSync(fd, block);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOSPC') throw err;
  }
  fs.ftruncateSync(fd, Math.max(0, fs.fstatSync(fd).size - leaveKb * 1024));
  fs.closeSync(fd);
  return filler;
}

/** Remounts `dir`'s tmpfs read-only. */
export function readOnly(dir: string): void {
  execFileSync('mount', ['-o', 'remount,ro', dir]);
}
