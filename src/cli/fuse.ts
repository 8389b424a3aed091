// `cmseg fuse`: one consensus from several raters' label maps (NIfTI or PNG),
// with the native fusion baselines (mean, majority vote, STAPLE family).
import * as path from 'path';
import { Command } from 'commander';
import { fuse, FusionMethod } from '../fusion/fuse';
import { argmaxClasses } from '../model/model';
import { readNifti, writeNifti, NiftiVolume } from '../data/nifti';
import { readPng, writePng } from '../data/png';
import { writeFileAtomic } from '../data/files';
import { choiceOption, parseInteger, printOutputs, UserError, withExamples } from './common';

const METHODS: FusionMethod[] = ['mode', 'mean', 'staple', 'multi-staple', 'spatial-staple'];

interface LabelImage {
  labels: Uint8Array;
  /** [H, W] or [D, H, W] in C-order */
  shape: number[];
  nifti?: NiftiVolume;
}

const isNifti = (f: string) => /\.nii(\.gz)?$/i.test(f);

async function readLabels(file: string): Promise<LabelImage> {
  if (isNifti(file)) {
    const v = await readNifti(file);
    const labels = new Uint8Array(v.data.length);
    for (let i = 0; i < v.data.length; i++) {
      const x = v.data[i];
      if (!(x >= 0 && x <= 255 && Number.isInteger(x))) throw new UserError(`${file}: voxel ${i} holds ${x}, not a label in 0..255`);
      labels[i] = x;
    }
    // NIfTI is x fastest: as C-order that is [z, y, x].
    const [nx, ny, nz = 1] = v.dims;
    return { labels, shape: nz > 1 ? [nz, ny, nx] : [ny, nx], nifti: v };
  }
  if (/\.png$/i.test(file)) {
    const png = await readPng(file);
    if (png.channels !== 1) throw new UserError(`${file}: a label map must be a grayscale PNG (it has ${png.channels} channels)`);
    return { labels: Uint8Array.from(png.data), shape: [png.height, png.width] };
  }
  throw new UserError(`${file}: unsupported file type (expected .nii, .nii.gz or .png)`);
}

async function writeLabels(file: string, like: LabelImage, data: Uint8Array | Float32Array, datatype: 'uint8' | 'float32') {
  if (isNifti(file)) {
    if (!like.nifti) throw new UserError(`${file}: NIfTI output needs NIfTI inputs (the geometry comes from the first input)`);
    await writeNifti(file, { dims: like.nifti.dims.slice(0, 3), data, header: like.nifti.header }, { datatype });
  } else if (/\.png$/i.test(file)) {
    if (like.shape.length !== 2) throw new UserError(`${file}: PNG output needs 2D inputs`);
    const bytes = data instanceof Uint8Array ? data : Uint8Array.from(data, (p) => Math.round(255 * p));
    await writePng(file, { width: like.shape[1], height: like.shape[0], channels: 1, data: bytes });
  } else {
    throw new UserError(`${file}: unsupported output type (expected .nii, .nii.gz or .png)`);
  }
}

export function registerFuseCommand(program: Command): Command {
  const cmd = program
    .command('fuse')
    .description('fuse several raters\' label maps into one consensus (majority vote, mean, STAPLE, multi-label STAPLE, spatial STAPLE)')
    .argument('<inputs...>', 'one label map per rater (.nii, .nii.gz or grayscale .png), all the same size')
    .requiredOption('-o, --out <file>', 'consensus label map (.nii.gz or .png)')
    .addOption(choiceOption('--method <name>', 'fusion method', METHODS).default('mode'))
    .option('--classes <n>', 'number of classes (default: largest label + 1; 255 = unlabelled)', parseInteger(2))
    .option('--undecided <label>', 'label for ties (default: the lowest tied class)', parseInteger(0))
    .option('--posterior <file>', 'also write the consensus probability of the foreground (binary) as float32 NIfTI/PNG')
    .option('--cms <file>', 'also write each rater\'s estimated confusion matrix (STAPLE methods) as JSON')
    .option('--window <n>', 'spatial STAPLE window edge in pixels', parseInteger(1))
    .option('--stride <n>', 'spatial STAPLE stride in pixels', parseInteger(1));
  withExamples(cmd, 'cmseg fuse --method multi-staple -o consensus.nii.gz rater1.nii.gz rater2.nii.gz rater3.nii.gz', 'cmseg fuse --method mode -o vote.png a.png b.png c.png');
  cmd.action(async (inputs: string[], opts) => {
    if (inputs.length < 2) throw new UserError('fuse needs at least two label maps');
    const images = await Promise.all(inputs.map(readLabels));
    for (const [i, im] of images.entries())
      if (im.labels.length !== images[0].labels.length || im.shape.join('x') !== images[0].shape.join('x'))
        throw new UserError(`${inputs[i]} is ${im.shape.join('x')}, but ${inputs[0]} is ${images[0].shape.join('x')}`);
    let maxLabel = 1;
    for (const im of images) for (const x of im.labels) if (x !== 255 && x > maxLabel) maxLabel = x;
    const classes: number = opts.classes ?? maxLabel + 1;
    const method = opts.method as FusionMethod;
    const result = await fuse(
      images.map((im) => im.labels),
      {
        method,
        classes,
        shape: images[0].shape,
        ...(opts.undecided !== undefined ? { undecided: opts.undecided } : {}),
        ...(opts.window ? { window: opts.window } : {}),
        ...(opts.stride ? { stride: opts.stride } : {}),
      },
    );
    const V = images[0].labels.length;
    let consensus = result.labels;
    if (!consensus && result.probs) {
      // mean: the soft label's argmax (ties to the lowest class)
      consensus = argmaxClasses(result.probs, 1, classes);
    }
    const written: [string, string][] = [];
    const out = path.resolve(opts.out);
    await writeLabels(out, images[0], consensus!, 'uint8');
    written.push(['consensus', out]);
    if (opts.posterior) {
      const source = result.posterior ?? result.probs;
      if (!source) throw new UserError(`--posterior: method ${method} gives no probabilities`);
      const fg = source.length === V ? source : source.subarray(V, 2 * V); // binary: foreground row
      const file = path.resolve(opts.posterior);
      await writeLabels(file, images[0], Float32Array.from(fg), 'float32');
      written.push(['posterior', file]);
    }
    if (opts.cms) {
      const file = path.resolve(opts.cms);
      const report: Record<string, unknown> = { method, classes, raters: inputs };
      if (result.cms) report.cms = inputs.map((_, r) => Array.from({ length: classes }, (_, i) => Array.from(result.cms!.subarray((r * classes + i) * classes, (r * classes + i + 1) * classes))));
      if (result.sensitivity) report.sensitivity = Array.from(result.sensitivity);
      if (result.specificity) report.specificity = Array.from(result.specificity);
      report.convention = 'cms[r][i][j] = p(rater r says i | true class j); columns sum to 1';
      await writeFileAtomic(file, Buffer.from(JSON.stringify(report, null, 2) + '\n'));
      written.push(['confusion matrices', file]);
    }
    printOutputs(written);
  });
  return cmd;
}
