// `cmseg predict`: pictures of what a checkpoint sees in its run's images: the input, the
// expert consensus, the predicted consensus (argmax p), each annotator's estimated labels
// (argmax A_r p) beside the labels it really gave, and each annotator's pixel-wise CM.

import * as fs from 'fs';
import * as path from 'path';
import { Command } from 'commander';
import { writeFileAtomic } from '../data/files';
import { writePng } from '../data/png';
import { loadCheckpoint } from '../model/checkpoint';
import { setNumThreads } from '../model/model';
import { cmHeatMaps, grayImage, grid, labelImage, labelOverlay, upscale } from '../report/pictures';
import { predictImages } from '../train/evaluate';
import { methodDefinition } from '../train/methods';
import { choiceOption, parseInteger, printOutputs, UserError, withExamples } from './common';
import { checkpointExperiment } from './eval';

interface PredictFlags {
  checkpoint: string;
  out: string;
  count: number;
  split: 'test' | 'validation' | 'train';
  scale?: number;
  threads?: number;
}

async function runPredict(flags: PredictFlags): Promise<void> {
  if (flags.threads !== undefined) setNumThreads(flags.threads);
  const file = path.resolve(flags.checkpoint);
  const { saved, data } = await checkpointExperiment(file);
  try {
    const set = data.split?.(flags.split);
    if (!set) throw new UserError(`the data of ${file} cannot be read as whole images; predict works on 2D in-memory data sets`);
    if (set.spatial.length !== 2) throw new UserError(`predict draws 2D images; this run's images are ${set.spatial.join('x')}`);
    const model = await loadCheckpoint(file);
    const [h, w] = set.spatial;
    const scale = flags.scale ?? Math.max(1, Math.floor(256 / Math.max(h, w)));
    const p = await predictImages(model, set, flags.count);
    const R = model.config.annotators;
    const learnsCms = methodDefinition(saved.config.method).learnsCms;
    const L = set.classes;
    const V = h * w;
    const outDir = path.resolve(flags.out);
    fs.mkdirSync(outDir, { recursive: true });
    const written: string[] = [];
    const save = async (name: string, image: Parameters<typeof writePng>[1]) => {
      const target = path.join(outDir, name);
      await writePng(target, image);
      written.push(target);
    };
    for (let n = 0; n < p.n; n++) {
      const prefix = `image-${String(n).padStart(3, '0')}`;
      const image = p.batch.images.subarray(n * set.channels * V, n * set.channels * V + V); // first channel
      const map = (labels: Uint8Array) => labels.subarray(n * V, (n + 1) * V);
      const input = upscale(grayImage(image, h, w), scale);
      const predicted = upscale(labelOverlay(image, map(p.consensus), h, w), scale);
      const truth = p.batch.consensus ? upscale(labelOverlay(image, map(p.batch.consensus), h, w), scale) : null;
      await save(`${prefix}-input.png`, input);
      await save(`${prefix}-consensus.png`, predicted);
      if (truth) await save(`${prefix}-truth.png`, truth);
      const estimated = [];
      const observed = [];
      for (let r = 0; r < R; r++) {
        const name = set.annotatorNames[r] ?? `annotator${r}`;
        observed.push(p.batch.present[n * R + r] ? upscale(labelImage(map(p.batch.labels[r]), h, w), scale) : null);
        if (!learnsCms) continue; // naive / oracle: the annotator heads were never trained
        const est = upscale(labelOverlay(image, map(p.annotatorMaps[r]), h, w), scale);
        estimated.push(est);
        await save(`${prefix}-annotator-${name}.png`, est);
        await save(`${prefix}-cm-${name}.png`, cmHeatMaps(p.cms, n, r, R, L, h, w, Math.max(1, Math.floor(scale / 2))));
      }
      // One sheet per image: input, truth, prediction; estimated annotators; their real labels.
      await save(`${prefix}-sheet.png`, grid(learnsCms ? [[input, truth, predicted], estimated, observed] : [[input, truth, predicted], observed], 4));
    }
    const readme = [
      `Predictions of ${file} (${saved.config.method}, step ${saved.state.step}) on the first ${p.n} ${flags.split} images.`,
      '',
      '<image>-input.png               the input',
      '<image>-truth.png               the expert consensus over the input',
      '<image>-consensus.png           the predicted consensus, argmax p',
      '<image>-annotator-<name>.png    the estimated labels of that annotator, argmax A_r p',
      `<image>-cm-<name>.png           that annotator's pixel-wise CM: an ${L}x${L} grid, tile (i, j) = p(says i | true j) per pixel (viridis, 0 dark .. 1 bright)`,
      '<image>-sheet.png               row 1 input, truth, prediction; row 2 estimated annotators; row 3 their real labels',
      ...(learnsCms ? [] : [`(${saved.config.method} does not learn annotator CMs: no annotator or CM pictures, and the sheet has rows 1 and 3 only)`]),
      `annotators: ${set.annotatorNames.join(', ')}`,
      '',
    ].join('\n');
    const readmeFile = path.join(outDir, 'README.txt');
    await writeFileAtomic(readmeFile, Buffer.from(readme));
    process.stdout.write(`wrote ${written.length} PNG files for ${p.n} ${flags.split} images\n`);
    printOutputs([
      ['pictures', outDir],
      ['legend', readmeFile],
    ]);
  } finally {
    await data.close?.();
  }
}

export function registerPredictCommand(program: Command): Command {
  const command = program
    .command('predict')
    .description("draw a checkpoint's predictions: consensus, each annotator's estimated labels and CM heat maps (PNG)")
    .requiredOption('--checkpoint <file>', 'a checkpoint written by cmseg train')
    .requiredOption('--out <dir>', 'folder for the pictures')
    .option('--count <n>', 'how many images', parseInteger(1), 8)
    .addOption(choiceOption('--split <name>', 'which images', ['test', 'validation', 'train']).default('test'))
    .option('--scale <n>', 'pixel enlargement (default: about 256 pixels per picture)', parseInteger(1))
    .option('--threads <n>', 'native threads', parseInteger(1))
    .action((flags: PredictFlags) => runPredict(flags));
  return withExamples(command, 'cmseg predict --checkpoint runs/cm-dense/best.safetensors --out runs/cm-dense/pictures --count 4');
}
