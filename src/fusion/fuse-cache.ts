// STAPLE training targets for the BraTS cache: each case's annotator maps fused once, on
// their own, by the native multi-label or spatial STAPLE, and kept beside the case
// (CACHE/cases/<fusion>/<id>.bin; format and staleness rules in src/data/cache.ts,
// "Fused training labels"). Per case, not over the whole training set, because STAPLE
// estimates each rater's performance per subject: that is how a STAPLE baseline is
// built in medical imaging (SimpleITK's filters fuse one image at a time).
//
// Incremental and interrupt-safe like prepareCache, under the same lock: a case whose map
// is current is skipped; each map is written atomically and then recorded in the index,
// which is rewritten in linear work (CacheIndexWriter in src/data/cache.ts: not whole after
// each of a release's cases) and flushed when the run ends or stops; a run stopped at any
// point leaves the maps recorded so far, which the next reuses (an unrecorded one is fused again).

import * as path from 'path';
import {
  type CacheFusion,
  CacheError,
  type CacheIndex,
  CacheIndexWriter,
  CaseFileReader,
  type FusedLabelsRecord,
  caseFileStamp,
  cacheIndexPath,
  encodeFusedFile,
  fusedFileName,
  fusedLabelsCurrent,
  readCacheIndex,
  withCacheLock,
} from '../data/cache';
import { makeFolder, writeFileAtomic } from '../data/files';
import { fuse, stapleFuseOptions } from './fuse';

export interface FuseCacheProgress {
  id: string;
  /** 0-based position of this case among those asked for. */
  position: number;
  total: number;
  /** 'fused' now, or 'reused': the cache held a current map. */
  status: 'fused' | 'reused';
  ms: number;
}

export interface FuseCacheOptions {
  /**
   * Called after every case, once its map is on disk; throwing stops the run there (the
   * index then records every map finished before, as it does when the call returns).
   */
  onProgress?: (progress: FuseCacheProgress) => void | Promise<void>;
}

export interface FuseCacheResult {
  fusion: CacheFusion;
  fused: string[];
  reused: string[];
  /** Wall time of the whole call. */
  ms: number;
  /** The index as it is on disk afterwards. */
  index: CacheIndex;
}

/** The annotator maps of a case file (null for an annotator who did not label the case), without reading its images. */
export function readCaseAnnotatorMaps(file: string): { id: string; shape: [number, number, number]; names: string[]; present: number[]; maps: (Uint8Array | null)[] } {
  const reader = CaseFileReader.open(file);
  try {
    const { header } = reader;
    const [, d, h, w] = header.shape;
    return {
      id: header.id,
      shape: [d, h, w],
      names: header.names,
      present: header.present,
      maps: header.sections.labels.map((section) => (section ? reader.readSection(section) : null)),
    };
  } finally {
    reader.close();
  }
}

/**
 * Makes sure every case in `ids` has a current `fusion` map in the cache at cacheDir,
 * fusing those that are missing or stale. Throws CacheError('unknown-case') for an id
 * the cache lacks and CacheError('locked') while another process writes the cache (only
 * when a case must be fused: when every map is current no lock is taken, nothing is written).
 */
export async function fuseCachedCases(cacheDir: string, ids: readonly string[], fusion: CacheFusion, options: FuseCacheOptions = {}): Promise<FuseCacheResult> {
  const started = performance.now();
  // Every map current: nothing to write, so no lock. Taking it (a file in the cache) failed on
  // a cache shared read-only, and waited on another process's prepare, with nothing to do.
  // Otherwise the work below runs under the lock and looks at each case again there.
  const current = allFusedCurrent(cacheDir, ids, fusion);
  if (current) {
    for (let position = 0; position < ids.length; position++) {
      await options.onProgress?.({ id: ids[position], position, total: ids.length, status: 'reused', ms: 0 });
    }
    return { fusion, fused: [], reused: [...ids], ms: performance.now() - started, index: current };
  }
  return withCacheLock(cacheDir, async () => {
    const index = readCacheIndex(cacheDir);
    const byId = new Map(index.cases.map((entry) => [entry.id, entry]));
    const missing = ids.filter((id) => !byId.has(id));
    if (missing.length > 0) {
      throw new CacheError('unknown-case', cacheIndexPath(cacheDir), `case(s) ${missing.slice(0, 3).join(', ')}${missing.length > 3 ? ', ...' : ''} not in the cache at ${cacheDir}: run cmseg prepare on the data again`, missing);
    }
    const fused: string[] = [];
    const reused: string[] = [];
    const writer = new CacheIndexWriter(cacheDir, index);
    await writer.around(async () => {
      for (let position = 0; position < ids.length; position++) {
        const caseStarted = performance.now();
        const entry = byId.get(ids[position])!;
        const [, d, h, w] = entry.shape;
        const fuseOptions = stapleFuseOptions(fusion, index.classes, [d, h, w]);
        let status: FuseCacheProgress['status'] = 'reused';
        if (fusedLabelsCurrent(cacheDir, entry, fusion, fuseOptions)) {
          reused.push(entry.id);
        } else {
          const caseFile = path.join(cacheDir, entry.file);
          const from = caseFileStamp(cacheDir, entry);
          if (!from) throw new CacheError('bad-case-file', caseFile, `case file ${caseFile} of case ${entry.id} is missing: run \`cmseg prepare\` again`, caseFile);
          const labels = readCaseAnnotatorMaps(caseFile);
          if (labels.id !== entry.id || JSON.stringify(labels.shape) !== JSON.stringify([d, h, w])) {
            throw new CacheError('bad-case-file', caseFile, `case file ${caseFile} holds ${labels.id} ${JSON.stringify(labels.shape)}, the index says ${entry.id} ${JSON.stringify([d, h, w])}: prepare the cache again`, labels.id);
          }
          const result = await fuse(labels.maps, fuseOptions);
          const ms = performance.now() - caseStarted;
          const { bytes } = encodeFusedFile({
            id: entry.id,
            fusion,
            shape: [d, h, w],
            classes: index.classes,
            names: labels.names,
            present: labels.present,
            from,
            options: fuseOptions,
            labels: result.labels!,
            cms: result.cms,
            iterations: result.iterations,
            converged: result.converged,
          });
          const file = fusedFileName(entry.id, fusion);
          await makeFolder(path.dirname(path.join(cacheDir, file))); // the real cause on a read-only fs (Node says ENOENT)
          await writeFileAtomic(path.join(cacheDir, file), bytes);
          const record: FusedLabelsRecord = { file, bytes: bytes.byteLength, from, options: fuseOptions, ms: Math.round(ms) };
          entry.fused = { ...entry.fused, [fusion]: record };
          await writer.added(bytes.byteLength);
          fused.push(entry.id);
          status = 'fused';
        }
        await options.onProgress?.({ id: entry.id, position, total: ids.length, status, ms: performance.now() - caseStarted });
      }
    });
    return { fusion, fused, reused, ms: performance.now() - started, index };
  });
}

/** The cache's index when every case of `ids` has a current `fusion` map in it, else undefined (the locked path then says why). */
function allFusedCurrent(cacheDir: string, ids: readonly string[], fusion: CacheFusion): CacheIndex | undefined {
  let index: CacheIndex;
  try {
    index = readCacheIndex(cacheDir);
  } catch {
    return undefined;
  }
  const byId = new Map(index.cases.map((entry) => [entry.id, entry]));
  for (const id of ids) {
    const entry = byId.get(id);
    if (!entry) return undefined;
    const [, d, h, w] = entry.shape;
    if (!fusedLabelsCurrent(cacheDir, entry, fusion, stapleFuseOptions(fusion, index.classes, [d, h, w]))) return undefined;
  }
  return index;
}
