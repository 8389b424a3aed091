// `cmseg prepare`: preprocesses a BraTS folder once into the training cache
// (src/data/cache.ts): brain crop, z-score per modality, the synthetic annotators of
// SPEC section 7, one compact file per case. Incremental: a second run skips every case
// whose source files are unchanged. Ctrl-C stops after the case in progress; because the
// cache writes each case file and then the index atomically, an interrupted run (even a
// killed one) leaves a valid cache of the cases finished so far, and the same command
// continues it.

import * as fs from 'fs';
import * as path from 'path';
import { Command, InvalidArgumentError, Option } from 'commander';
import { SingleBar } from 'cli-progress';
import type { AnnotatorKind, AnnotatorSpec, LabelMode } from '../data/annotators';
import { BRATS_GEOMETRY_TOLERANCE_MM, BRATS_LABEL_SCHEMES, type BratsCase, type BratsLabelScheme, discoverBratsCases } from '../data/brats';
import { sameFileAt } from '../data/files';
import { barEta } from '../train/progress';
import {
  BRATS_DEFAULT_ANNOTATORS,
  cacheIndexPath,
  cacheLabelScheme,
  type CacheDtype,
  type PrepareCacheOptions,
  type PrepareCacheResult,
  type PrepareProgress,
  prepareCache,
} from '../data/cache';
import { choiceOption, displayPath, parseInteger, parseNumber, parsePath, printOutputs, quitNow, UserError, withExamples } from './common';

const ANNOTATOR_KINDS: readonly AnnotatorKind[] = ['good', 'over', 'under', 'fracture', 'wrong'];

/** "over,under,wrong" as annotator specs (SPEC section 7 defaults for each kind). */
export function parseAnnotatorList(value: string): AnnotatorSpec[] {
  const kinds = value.split(',').map((k) => k.trim()).filter((k) => k !== '');
  if (kinds.length === 0) throw new InvalidArgumentError('expected a comma-separated list of annotator kinds.');
  for (const kind of kinds) {
    if (!ANNOTATOR_KINDS.includes(kind as AnnotatorKind)) {
      throw new InvalidArgumentError(`unknown annotator kind '${kind}'; choose from ${ANNOTATOR_KINDS.join(', ')}.`);
    }
  }
  return kinds.map((kind) => ({ kind }) as AnnotatorSpec);
}

/** Thrown from the progress callback to stop prepareCache between two cases. */
class PrepareInterrupted extends Error {
  constructor(readonly done: number) {
    super('interrupted');
  }
}

export interface PrepareRun {
  result?: PrepareCacheResult;
  /** Set when Ctrl-C stopped the run: cases finished (prepared or skipped) before it. */
  interruptedAfter?: number;
  total: number;
}

/**
 * prepareCache with the command line's progress (a bar on stderr when it is a terminal,
 * otherwise one line per case) and Ctrl-C handling. Shared by `cmseg prepare` and by
 * `cmseg train` when it is given a BraTS folder.
 */
export async function prepareWithProgress(dataDir: string, cacheDir: string, options: Omit<PrepareCacheOptions, 'onProgress' | 'onNote'>, output: { quiet?: boolean } = {}): Promise<PrepareRun> {
  // Discover first: a missing or empty folder is reported before the cache folder is made.
  const stream = process.stderr;
  const cases = discoverBratsCases(dataDir, { requireSeg: true, onSkipped: (note) => stream.write(`note: ${note}\n`) });
  const total = cases.length;
  const pedsNote = pediatricCasesNote(cases, options.labelScheme ?? 'brats');
  if (pedsNote) stream.write(`note: ${pedsNote}\n`);
  const bar = !output.quiet && stream.isTTY ? new SingleBar({ stream, format: 'prepare [{bar}] {value}/{total} cases | {id} | ETA {eta_run}', barsize: 24, hideCursor: true }) : undefined;
  const eta = barEta();
  // Notes about single cases (a modality of zeros): written at once, or after the bar, which
  // a line written under it would break.
  const heldNotes: string[] = [];
  const onNote = (note: string) => (bar ? heldNotes.push(note) : stream.write(`note: ${note}\n`));
  let interrupted = false;
  const onSigint = () => {
    if (interrupted) {
      bar?.stop(); // shows the cursor again, which the bar hid
      stream.write('\nsecond interrupt: quitting now; the cache still holds every case finished so far\n');
      // The index lags the case files of small cases: quitNow runs the 'exit' listeners, and
      // CacheIndexWriter's lists them there.
      quitNow(130);
    }
    interrupted = true;
    stream.write('\ninterrupt: finishing the case in progress (Ctrl-C again quits at once)\n');
  };
  process.on('SIGINT', onSigint);
  eta.start();
  bar?.start(total, 0, { id: '', eta_run: eta.text(0, total) });
  try {
    const result = await prepareCache(dataDir, cacheDir, {
      ...options,
      onNote,
      onProgress: (p: PrepareProgress) => {
        const done = p.position + 1;
        if (bar) bar.update(done, { id: `${p.id} ${p.status}`, eta_run: eta.text(done, p.total) });
        else if (!output.quiet) {
          const what = p.status === 'prepared' ? `prepared in ${(p.ms / 1000).toFixed(1)} s` : 'up to date, skipped';
          stream.write(`[${done}/${p.total}] ${p.id} ${what}\n`);
        }
        if (interrupted && done < p.total) throw new PrepareInterrupted(done);
      },
    });
    return { result, total };
  } catch (error) {
    if (error instanceof PrepareInterrupted) return { interruptedAfter: error.done, total };
    throw error;
  } finally {
    bar?.stop();
    for (const note of heldNotes) stream.write(`note: ${note}\n`);
    process.off('SIGINT', onSigint);
  }
}

/**
 * A note when cases named as BraTS pediatric cases (BraTS-PED-...) are read with the default
 * label scheme: BraTS-PEDs 2023 files number 1, 2, 3 as the 2023 release (read right), but
 * BraTS-PEDs 2024 files number 1 ET, 2 NET, 3 CC, 4 ED under the same names. A 2024 case with
 * an edema is refused (its 4), but one without edema would be read silently wrong (ET as
 * necrosis, NET as edema, CC as ET), and nothing in the files tells the releases apart.
 */
export function pediatricCasesNote(cases: readonly BratsCase[], labelScheme: BratsLabelScheme): string | undefined {
  const isPeds = (c: BratsCase) => /^BraTS-PED-/i.test(c.id);
  if (labelScheme === 'peds2024') {
    // The other way round: BraTS-PEDs cases are all named BraTS-PED-...; another release's
    // 2023 files read as PEDs would have their ET (3) taken for a cyst, also without an error.
    const others = cases.filter((c) => c.naming === '2023' && !isPeds(c));
    if (others.length === 0) return undefined;
    return (
      `${others.length} case(s) are read as BraTS-PEDs 2024 (--label-scheme peds2024: 1 ET, 2 NET, 3 CC, 4 ED) but are not named as pediatric cases ` +
      `(BraTS-PED-...: ${others[0].id}${others.length > 1 ? ', ...' : ''}); if they are BraTS 2023 files (1 NCR, 2 ED, 3 ET), leave the option out`
    );
  }
  const peds = cases.filter((c) => c.naming === '2023' && isPeds(c));
  if (peds.length === 0) return undefined;
  return (
    `${peds.length} case(s) are pediatric (${peds[0].id}${peds.length > 1 ? ', ...' : ''}), read with the BraTS 2023 labels (1 NCR, 2 ED, 3 ET: as BraTS-PEDs 2023); ` +
    'if they are BraTS-PEDs 2024 files (1 ET, 2 NET, 3 CC, 4 ED), prepare them with --label-scheme peds2024'
  );
}

interface PrepareFlags {
  data: string;
  out: string;
  annotators: AnnotatorSpec[];
  labels: LabelMode;
  dtype: CacheDtype;
  seed: number;
  margin: number;
  geometryTolerance: number;
  labelScheme: BratsLabelScheme;
  rebuild?: boolean;
  quiet?: boolean;
}

/**
 * Bytes of the files under `dir`, for the summary line. Only a summary: an entry that cannot
 * be measured (a dangling link, a temp file another cmseg process renamed meanwhile) counts
 * 0 rather than failing a prepare whose cache is already written. Links are not followed.
 */
function folderBytes(dir: string): number {
  let bytes = 0;
  for (const entry of fs.readdirSync(dir, { withFileTypes: true })) {
    const full = path.join(dir, entry.name);
    try {
      bytes += entry.isDirectory() ? folderBytes(full) : entry.isFile() ? fs.statSync(full).size : 0;
    } catch {
      // gone or unreadable: see above
    }
  }
  return bytes;
}

async function runPrepare(flags: PrepareFlags): Promise<void> {
  const dataDir = path.resolve(flags.data);
  const cacheDir = path.resolve(flags.out);
  if (!fs.existsSync(dataDir)) throw new UserError(`--data folder not found: ${dataDir}`);
  if (!fs.statSync(dataDir).isDirectory()) throw new UserError(`--data ${dataDir} is a file: give the folder that holds the BraTS case folders`);
  // A cache given as the data (say after `train --data <cache>` worked): "no BraTS cases" would not say why.
  if (fs.existsSync(cacheIndexPath(dataDir))) {
    throw new UserError(`--data ${dataDir} is a cmseg cache (it has ${path.basename(cacheIndexPath(dataDir))}), already prepared: train, eval and predict read it as --data; prepare reads the BraTS folder of NIfTI cases it was made from`);
  }
  // The same folder by another name too (a symbolic link, a bind mount): the cache would go into
  // the data folder, which prepare then refuses as a cache.
  if (path.relative(dataDir, cacheDir) === '' || sameFileAt(dataDir, cacheDir)) throw new UserError('--out must be another folder than --data');
  const run = await prepareWithProgress(
    dataDir,
    cacheDir,
    {
      annotators: flags.annotators,
      mode: flags.labels,
      dtype: flags.dtype,
      seed: flags.seed,
      margin: flags.margin,
      rebuild: flags.rebuild,
      geometryTolerance: flags.geometryTolerance,
      labelScheme: flags.labelScheme,
    },
    { quiet: flags.quiet },
  );
  const outputs: [string, string][] = [
    ['cache index', cacheIndexPath(cacheDir)],
    ['case files', path.join(cacheDir, 'cases')],
  ];
  if (run.interruptedAfter !== undefined) {
    // With --rebuild the same command would start over (it prepares every case again): a long
    // rebuild interrupted more than once would never finish. The cache already holds the new
    // settings, so the command without --rebuild continues it.
    process.stdout.write(
      `interrupted after ${run.interruptedAfter} of ${run.total} cases: the cache is valid and holds them; ` +
        (flags.rebuild
          ? `run the same command without --rebuild to prepare the rest (with --rebuild it starts over)\n`
          : `run the same command again to prepare the rest\n`),
    );
    printOutputs(outputs);
    process.exitCode = 130;
    return;
  }
  const { index, prepared, skipped, removed } = run.result!;
  const megabytes = folderBytes(cacheDir) / 2 ** 20;
  process.stdout.write(
    `prepared ${prepared.length} case(s), ${skipped.length} up to date` +
      (removed.length ? `, ${removed.length} removed (no longer in ${displayPath(dataDir)})` : '') +
      `; the cache holds ${index.cases.length} cases (${megabytes.toFixed(1)} MB) with annotators ${index.names.join(', ')} (${index.settings.mode} labels, ${index.settings.dtype}` +
      (cacheLabelScheme(index) === 'peds2024' ? ', BraTS-PEDs 2024 segmentations: ET, NET + CC as the non-enhancing core, ED' : '') +
      ')\n',
  );
  printOutputs(outputs);
}

export function registerPrepareCommand(program: Command): Command {
  const command = program
    .command('prepare')
    .description('preprocess a BraTS folder once into a training cache: crop, z-score, synthetic annotators')
    .requiredOption('--data <dir>', 'BraTS folder: one subfolder per case (2018-2021 or 2023 file names), or HGG/ and LGG/ subfolders of cases (2018/2019)', parsePath('--data'))
    .requiredOption('--out <dir>', 'cache folder (created; a cache already there is updated)', parsePath('--out'))
    .addOption(
      new Option('--annotators <kinds>', `synthetic annotators, comma-separated (${ANNOTATOR_KINDS.join(', ')})`)
        .argParser(parseAnnotatorList)
        .default([...BRATS_DEFAULT_ANNOTATORS], BRATS_DEFAULT_ANNOTATORS.map((a) => a.kind).join(',')),
    )
    .addOption(choiceOption('--labels <mode>', 'dense: every annotator labels every case; single: one annotator per case', ['dense', 'single']).default('dense'))
    .addOption(choiceOption('--dtype <type>', 'image storage: float16 halves the disk and read traffic (relative error ~5e-4)', ['float16', 'float32']).default('float16'))
    .option('--seed <n>', 'seed of the synthetic annotators', parseInteger(0), 0)
    .option('--margin <n>', 'voxels kept around the brain when cropping', parseInteger(0), 0)
    .addOption(
      choiceOption(
        '--label-scheme <scheme>',
        'how segmentation numbers are read: brats (by the file names: 2018-2021 ET = 4, 2023 ET = 3) or peds2024 ' +
          '(BraTS-PEDs 2024, 2023 names: 1 ET, 2 NET, 3 CC, 4 ED; NET and CC become one non-enhancing core class, so WT, TC, ET are the challenge\'s)',
        BRATS_LABEL_SCHEMES,
      ).default('brats'),
    )
    .option('--geometry-tolerance <mm>', "how far apart a case's files may put one voxel and still count as one grid", parseNumber(0), BRATS_GEOMETRY_TOLERANCE_MM)
    .option('--rebuild', 'prepare every case again (needed to change the settings of an existing cache)')
    .option('-q, --quiet', 'no progress output')
    .action((flags: PrepareFlags) => runPrepare(flags));
  command.addHelpText(
    'after',
    '\nIncremental: cases whose source files are unchanged are skipped, so running the command again after\n' +
      'adding cases prepares only the new ones. Safe to interrupt: Ctrl-C finishes the case in progress and\n' +
      'stops; the cache is valid at every moment (each case file and the index are written atomically), holds\n' +
      'the cases finished so far, and the same command continues where it stopped (without --rebuild, which\n' +
      'starts over).\n',
  );
  return withExamples(
    command,
    'cmseg prepare --data data/BraTS2021 --out cache/brats2021',
    'cmseg prepare --data data/phantoms --out cache/phantoms --annotators over,under,wrong --labels single --seed 1',
    'cmseg prepare --data data/BraTS-PEDs-2024 --out cache/peds --label-scheme peds2024',
  );
}
