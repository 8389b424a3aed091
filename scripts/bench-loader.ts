// Patch loader throughput: patches/s of 64^3 training patches (batch 2) read from a
// phantom BraTS cache, for several worker counts, and the CPU time each patch costs (the
// figure to trust on a shared machine, where wall-clock rates depend on the neighbours). The number to compare with is the
// trainer's step rate: the loader keeps up when it produces batches faster than the
// model consumes them (then next() never waits).
//
//   npx ts-node --transpile-only scripts/bench-loader.ts [--cases 4] [--size 160,160,112]
//       [--patch 64] [--batch 2] [--batches 30] [--workers 0,1,2,4] [--dtype float16] [--keep DIR]
//
// Everything is made in a temp folder (phantoms, then the cache) and deleted afterwards
// unless --keep names a folder to reuse.

import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { writeBratsPhantoms } from '../src/data/brats-phantom';
import { type CacheDtype, prepareCache } from '../src/data/cache';
import { PatchLoader } from '../src/data/patch-loader';

function option(name: string, fallback: string): string {
  const at = process.argv.indexOf(`--${name}`);
  return at >= 0 && at + 1 < process.argv.length ? process.argv[at + 1] : fallback;
}

async function main(): Promise<void> {
  if (process.argv.includes('--help')) {
    console.log('usage: npx ts-node --transpile-only scripts/bench-loader.ts [--cases 4] [--size 160,160,112] [--patch 64] [--batch 2] [--batches 30] [--workers 0,1,2,4] [--dtype float16] [--keep DIR]');
    return;
  }
  const cases = Number(option('cases', '4'));
  const size = option('size', '160,160,112').split(',').map(Number) as [number, number, number];
  const patch = Number(option('patch', '64'));
  const batchSize = Number(option('batch', '2'));
  const batches = Number(option('batches', '30'));
  const cpus = typeof os.availableParallelism === 'function' ? os.availableParallelism() : os.cpus().length;
  const workerCounts = option('workers', [0, 1, 2, 4].filter((w) => w <= Math.max(1, cpus)).join(','))
    .split(',')
    .map(Number);
  const dtype = option('dtype', 'float16') as CacheDtype;
  const keep = process.argv.includes('--keep') ? option('keep', '') : '';
  const root = keep || fs.mkdtempSync(path.join(os.tmpdir(), 'cmseg-bench-loader-'));
  const dataDir = path.join(root, 'data');
  const cacheDir = path.join(root, `cache-${dtype}`);

  try {
    let started = performance.now();
    if (!fs.existsSync(dataDir)) {
      await writeBratsPhantoms(dataDir, { cases, size, seed: 0 });
      console.log(`phantoms: ${cases} cases of ${size.join('x')} in ${((performance.now() - started) / 1000).toFixed(1)} s -> ${dataDir}`);
    }
    started = performance.now();
    const prepared = await prepareCache(dataDir, cacheDir, { dtype });
    const shapes = prepared.index.cases.map((c) => c.shape.slice(1).join('x'));
    console.log(`cache (${dtype}): ${prepared.prepared.length} prepared, ${prepared.skipped.length} reused in ${((performance.now() - started) / 1000).toFixed(1)} s; cropped cases ${shapes.join(', ')}`);
    console.log(`host: ${os.cpus()[0]?.model ?? 'unknown CPU'}, ${cpus} CPUs, node ${process.version}`);
    console.log(`patches ${patch}^3, batch ${batchSize}, ${batches} timed batches after 2 warm-up batches\n`);
    console.log('workers  mode         patches/s  batches/s  MB/s out  cpu ms/patch  startup ms  waited ms');
    for (const workers of workerCounts) {
      const opened = performance.now();
      const loader = await PatchLoader.open({ cacheDir, patchSize: patch, batchSize, workers, seed: 1 });
      await loader.next();
      await loader.next();
      const startupMs = performance.now() - opened;
      const waitedBefore = loader.waitedMs;
      const t0 = performance.now();
      const cpu0 = process.cpuUsage(); // all threads of the process, workers included
      let bytes = 0;
      for (let k = 0; k < batches; k++) {
        const batch = await loader.next();
        bytes += batch.images.byteLength + batch.consensus.byteLength + batch.labels.reduce((a, l) => a + l.byteLength, 0);
      }
      const seconds = (performance.now() - t0) / 1000;
      const cpu = process.cpuUsage(cpu0);
      await loader.close();
      const row = [
        String(workers).padStart(7),
        loader.mode.padEnd(11),
        ((batches * batchSize) / seconds).toFixed(1).padStart(10),
        (batches / seconds).toFixed(2).padStart(10),
        (bytes / 1e6 / seconds).toFixed(0).padStart(9),
        ((cpu.user + cpu.system) / 1000 / (batches * batchSize)).toFixed(1).padStart(12),
        startupMs.toFixed(0).padStart(11),
        (loader.waitedMs - waitedBefore).toFixed(0).padStart(10),
      ];
      console.log(row.join('  '));
    }
  } finally {
    if (!keep) fs.rmSync(root, { recursive: true, force: true });
  }
}

main().catch((err: unknown) => {
  console.error(err);
  process.exit(1);
});
