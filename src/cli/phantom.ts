// `cmseg phantom brats`: synthetic BraTS cases (src/data/brats-phantom.ts) written in the
// real release layout, so that prepare, train, predict and eval can be tried, and
// tested, without the challenge data.

import * as fs from 'fs';
import * as path from 'path';
import { SingleBar } from 'cli-progress';
import { Command, InvalidArgumentError, Option } from 'commander';
import type { BratsNaming } from '../data/brats';
import { BRATS_PHANTOM_DEFAULT_SIZE, writeBratsPhantoms } from '../data/brats-phantom';
import { makeFolderSync } from '../data/files';
import { barEta } from '../train/progress';
import { choiceOption, displayPath, parseInteger, parsePath, printOutputs, shellWord, withExamples } from './common';

/** "X,Y,Z" as NIfTI dims [nx, ny, nz]. */
export function parseSize(value: string): [number, number, number] {
  const parts = value.split(',').map((p) => p.trim());
  const numbers = parts.map(Number);
  if (parts.length !== 3 || parts.some((p) => !/^\d+$/.test(p)) || numbers.some((n) => n < 8 || n > 1024)) {
    throw new InvalidArgumentError('expected three integers X,Y,Z in 8..1024, e.g. 96,96,64.');
  }
  return numbers as [number, number, number];
}

/**
 * Progress of writing `total` cases: on a terminal one bar that redraws (as prepare's), since
 * a line per case is a screen-flooding 1251 lines for a release-sized set; in a log (not a
 * terminal) one line per case, with the time the case took.
 */
export function phantomProgress(stream: NodeJS.WriteStream, total: number, now: () => number = Date.now): { onCase(id: string, index: number): void; stop(): void } {
  if (stream.isTTY) {
    const bar = new SingleBar({ stream, format: 'phantom [{bar}] {value}/{total} cases | {id} | ETA {eta_run}', barsize: 24, hideCursor: true });
    const eta = barEta(now);
    bar.start(total, 0, { id: '', eta_run: eta.text(0, total) });
    return { onCase: (id, index) => bar.update(index + 1, { id, eta_run: eta.text(index + 1, total) }), stop: () => bar.stop() };
  }
  let last = Date.now();
  return {
    onCase: (id, index) => {
      const now = Date.now();
      stream.write(`[${index + 1}/${total}] ${id} written in ${((now - last) / 1000).toFixed(1)} s\n`);
      last = now;
    },
    stop: () => undefined,
  };
}

interface PhantomBratsFlags {
  cases: number;
  out: string;
  size: [number, number, number];
  seed: number;
  naming: BratsNaming;
  quiet?: boolean;
}

async function runPhantomBrats(flags: PhantomBratsFlags): Promise<void> {
  const outDir = path.resolve(flags.out);
  // Made here rather than by writeBratsPhantoms's recursive mkdir, which says "no such file or
  // directory" when the real cause is a read-only or full file system (makeFolderSync).
  makeFolderSync(outDir);
  const started = Date.now();
  const progress = flags.quiet ? undefined : phantomProgress(process.stderr, flags.cases);
  let written;
  try {
    written = await writeBratsPhantoms(outDir, {
      cases: flags.cases,
      size: flags.size,
      seed: flags.seed,
      naming: flags.naming,
      onCase: (c, index) => progress?.onCase(c.id, index),
    });
  } finally {
    progress?.stop(); // shows the cursor again, which the bar hid
  }
  const [nx, ny, nz] = flags.size;
  process.stdout.write(
    `wrote ${written.length} synthetic BraTS ${flags.naming} case(s) of ${nx}x${ny}x${nz} voxels (seed ${flags.seed}) in ${((Date.now() - started) / 1000).toFixed(1)} s: ` +
      `${written[0].id}${written.length > 1 ? ` .. ${written[written.length - 1].id}` : ''}\n`,
  );
  printOutputs([
    ['cases', outDir],
    ['first case', written.map((c) => c.dir).slice(0, 1)],
  ]);
  // A command to paste: the folder quoted where a shell would split or change it.
  process.stdout.write(`next: cmseg prepare --data ${shellWord(displayPath(outDir))} --out <cache folder>\n`);
  // Files of this run overwrite those of an earlier one, but an earlier run's other cases
  // (more of them, another --naming) stay, and prepare would read them with these: say so.
  const ours = new Set(written.map((c) => c.id));
  const others = fs
    .readdirSync(outDir, { withFileTypes: true })
    .filter((entry) => entry.isDirectory() && !ours.has(entry.name))
    .map((entry) => entry.name)
    .sort();
  if (others.length > 0) {
    const listed = others.slice(0, 5).join(', ') + (others.length > 5 ? ', ...' : '');
    process.stderr.write(
      `note: ${displayPath(outDir)} holds ${others.length} other case folder${others.length === 1 ? '' : 's'} (${listed}) ` +
        `from an earlier run; \`cmseg prepare --data ${shellWord(displayPath(outDir))}\` reads them too (remove them, or write to another --out)\n`,
    );
  }
}

export function registerPhantomCommand(program: Command): Command {
  const phantom = program.command('phantom').description('write synthetic data sets in the layout of real ones (for trying cmseg and for tests)');
  const brats = phantom
    .command('brats')
    .description('synthetic BraTS cases: four MR modalities and a tumour segmentation per case, in the release layout')
    .requiredOption('--cases <n>', 'how many cases', parseInteger(1))
    .requiredOption('--out <dir>', 'folder for the cases (one subfolder per case; files already there are overwritten)', parsePath('--out'))
    .addOption(
      new Option('--size <x,y,z>', 'volume size in voxels (real BraTS: 240,240,155)')
        .argParser(parseSize)
        .default([...BRATS_PHANTOM_DEFAULT_SIZE], BRATS_PHANTOM_DEFAULT_SIZE.join(',')),
    )
    .option('--seed <n>', 'seed of the phantoms (case k is the same for any --cases > k)', parseInteger(0), 0)
    .addOption(choiceOption('--naming <release>', "file names and labels: 2021 (ID_t1.nii.gz, ET = 4) or 2023 (ID-t1n.nii.gz, ET = 3)", ['2021', '2023']).default('2021'))
    .option('-q, --quiet', 'no progress lines')
    .action((flags: PhantomBratsFlags) => runPhantomBrats(flags));
  withExamples(brats, 'cmseg phantom brats --cases 8 --out data/phantoms', 'cmseg phantom brats --cases 3 --out data/small --size 48,48,32 --naming 2023 --seed 1');
  return withExamples(phantom, 'cmseg phantom brats --cases 8 --out data/phantoms');
}
