// The command line: --help with an example for every command, a tiny `train` run end to
// end in a child process (the real entry point, shebang file, exit code), then eval,
// predict and simulate on its results, and one-line errors with exit code 1.
import t from 'tap';
import { spawnSync } from 'child_process';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { cliHelp, runCli } from './helpers/cli';
import { loadImageFolder } from '../src/data/image-folder';
import { backendInfo } from '../src/model/model';
import { readCheckpoint } from '../src/model/checkpoint';
import { readPngSync } from '../src/data/png';
import { classColor, cmFigure, cmHeatMaps, grid, heatMap, labelOverlay, upscale, viridis } from '../src/report/pictures';
import { unpadded } from './helpers/tables';

const root = path.resolve(__dirname, '..');
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cmseg-cli-'));
t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));

/** The CLI source in a child node, with the TypeScript loader tap gives this process. */
function cmseg(args: string[]) {
  const loader = process.execArgv.filter((a) => a.includes('typescript'));
  const r = spawnSync(process.execPath, [...loader, path.join(root, 'src/cli/main.ts'), ...args], {
    cwd: dir,
    encoding: 'utf8',
    env: { ...process.env, TS_NODE_TRANSPILE_ONLY: '1', CMSEG_NUM_THREADS: '2' },
  });
  return { code: r.status, stdout: r.stdout, stderr: r.stderr };
}

/** Runs a command in this process, capturing what it prints. */
const inProcess = (args: string[]) => runCli(args, dir);
const help = cliHelp;

// `npx cmseg` in the package runs dist/cli/main.js itself: it must be executable (tsc
// writes files without the execute bit; build:ts sets it).
t.test('the built CLI runs as a program (npx cmseg)', { skip: process.platform === 'win32' || !fs.existsSync(path.join(root, 'dist/cli/main.js')) ? 'no dist/ build (or Windows)' : false }, async (t) => {
  const bin = path.join(root, 'dist/cli/main.js');
  t.match(fs.readFileSync(bin, 'utf8').split('\n')[0], /^#!\/usr\/bin\/env node/, 'a node shebang');
  t.ok(fs.statSync(bin).mode & 0o111, 'the execute bit');
  const r = spawnSync(bin, ['--help'], { encoding: 'utf8' });
  t.equal(r.error, undefined, 'it starts');
  t.equal(r.status, 0, 'exit code 0');
  t.match(r.stdout, /Usage: cmseg/);
});

t.test('every command has --help with an example', async (t) => {
  t.match(await help(['--help']), /Usage: cmseg[\s\S]*train[\s\S]*eval[\s\S]*predict[\s\S]*simulate[\s\S]*Example/);
  for (const command of ['train', 'eval', 'predict', 'simulate', 'fuse', 'bench', 'info']) {
    const text = await help([command, '--help']);
    t.match(text, new RegExp(`Usage: cmseg ${command}`), `${command}: usage`);
    t.match(text, new RegExp(`Examples?:\\n  \\$ cmseg ${command}`), `${command}: an example`);
  }
  const train = await help(['train', '--help']);
  for (const flag of ['--preset', '--method', '--labels', '--epochs', '--steps', '--batch-size', '--lr', '--lambda', '--warmup-steps', '--seed', '--out', '--resume']) {
    t.match(train, flag, `train --help lists ${flag}`);
  }
  t.match(train, /Presets:\n  mnist /);
  // Every option whose default is "the preset's" is spelled out per preset.
  t.match(train, /What each preset sets \(a flag overrides it\):\n  preset +--labels +length +--batch-size +--schedule --lr +--optimizer +--lambda +depth\/c +augment\n  mnist +dense +6 epochs +32 +cosine 0\.003->0\.0001 +adam wd 0 +0\.01 +3\/16 +flips\+rot\n/);
  t.match(train, /\n  brats3d-gpu +dense +50 epochs +2 +poly 0\.001 /);
});

t.test('train --json prints one object for scripts', async (t) => {
  const r = await inProcess(['train', '--preset', 'mnist-tiny', '--steps', '2', '--out', 'runs/json', '--json', '--quiet']);
  t.equal(r.exitCode, 0, r.stderr);
  const lines = r.stdout.trim().split('\n');
  t.equal(lines.length, 1, 'nothing else on stdout');
  const out = JSON.parse(lines[0]);
  t.equal(out.status, 'completed');
  t.equal(out.step, 2);
  t.equal(out.method, 'cm');
  t.ok(fs.existsSync(out.files.last) && fs.existsSync(out.files.testMetrics));
  const saved = JSON.parse(fs.readFileSync(out.files.testMetrics, 'utf8'));
  t.same(out.test.metrics.averageDice, saved.metrics.averageDice, 'the test metrics of eval-test.json');
});

// The model options SPEC section 2-4 leaves to the user reach the model from the command
// line: CM head blocks, the CM initialisation, the warm-up's trace weight (read back from the
// checkpoint and from the CMs a fresh uniform-initialised global head predicts).
t.test('train --cm-head-blocks, --cm-init, --lambda-warmup reach the model and the checkpoint', async (t) => {
  const r = await inProcess(['train', '--preset', 'mnist-tiny', '--steps', '1', '--out', 'runs/heads', '--cm-head-blocks', '1', '--cm-init', 'uniform', '--lambda-warmup', '0.05', '--warmup-steps', '3', '--no-test', '--quiet']);
  t.equal(r.exitCode, 0, r.stderr);
  const ckpt = await readCheckpoint(path.join(dir, 'runs/heads/last.safetensors'));
  t.equal(ckpt.config.cmHeadBlocks, 1);
  t.equal(ckpt.config.cmInit, 'uniform');
  t.ok(Math.abs(ckpt.loss.lambdaWarmup - 0.05) < 1e-7, `lambdaWarmup ${ckpt.loss.lambdaWarmup}`);
  t.equal(ckpt.loss.warmupSteps, 3);
  t.ok(Object.keys(ckpt.weights).some((name) => name.startsWith('cmblock.0.0.conv1')), 'the head blocks are in the model');
  const resume = await inProcess(['train', '--out', 'runs/heads', '--resume', '--cm-head-blocks', '2', '--quiet']);
  t.equal(resume.exitCode, 1);
  t.match(resume.stderr, /with different settings: cmHeadBlocks 2 \(the run has 1\)/);
  t.match(await cliHelp(['train', '--cm-init', 'zeros']), /Allowed choices are identity, uniform/);
});

const run = path.join(dir, 'runs', 'tiny');

t.test('a tiny train run end to end, then eval, predict, resume', async (t) => {
  const r = cmseg(['train', '--preset', 'mnist-tiny', '--out', 'runs/tiny', '--steps', '3', '--quiet']);
  t.equal(r.code, 0, `exit code 0 (stderr: ${r.stderr})`);
  t.equal(r.stderr, '', 'quiet: nothing on stderr');
  t.match(r.stdout, /trained cm from step 0 to 3/);
  t.match(unpadded(r.stdout), /\| Dice digit +\| \d\.\d{4} ± \d\.\d{4} \|/);
  t.match(unpadded(r.stdout), /\| Mode labels \(tie: lower class\) \| /);
  t.match(r.stdout, /outputs:\n  checkpoints +runs\/tiny\/best\.safetensors, runs\/tiny\/last\.safetensors\n  training log +runs\/tiny\/train-log\.jsonl\n  curves +runs\/tiny\/curves\.png\n  test metrics +runs\/tiny\/eval-test\.json/);
  for (const f of ['best.safetensors', 'last.safetensors', 'train-log.jsonl', 'eval-test.json']) t.ok(fs.existsSync(path.join(run, f)), `${f} written`);
  const test = JSON.parse(fs.readFileSync(path.join(run, 'eval-test.json'), 'utf8'));
  t.equal(test.metrics.images, 32);
  t.ok(test.metrics.cmError.mean > 0, 'CM error scored');
  t.ok(test.fusedLabels.mode.averageDice.mean > 0.5, 'mode labels scored');

  const ev = await inProcess(['eval', '--checkpoint', 'runs/tiny/best.safetensors', '--split', 'validation']);
  t.equal(ev.exitCode, 0, ev.stderr);
  t.match(ev.stdout, /validation split/);
  t.match(ev.stdout, /outputs:\n  metrics +runs\/tiny\/eval-validation-best\.json/);

  const pr = await inProcess(['predict', '--checkpoint', 'runs/tiny/best.safetensors', '--out', 'pictures', '--count', '2']);
  t.equal(pr.exitCode, 0, pr.stderr);
  t.match(pr.stdout, /wrote 24 PNG files for 2 test images\noutputs:\n  pictures +pictures\n  legend +pictures\/README\.txt/);
  const sheet = readPngSync(path.join(dir, 'pictures', 'image-001-sheet.png'));
  t.ok(sheet.width > 256 && sheet.height > 256, 'a sheet of several pictures');
  const cm = readPngSync(path.join(dir, 'pictures', 'image-000-cm-over.png'));
  // The labelled CM figure of 2x2 tiles of 32x32 pixels at half the sheet's 8x scale (names and data aside, its layout).
  const figure = cmFigure(new Float32Array(1 * 4 * 2 * 2 * 32 * 32), 0, 1, 4, 2, 32, 32, 4, { annotator: 'over', classes: ['background', 'digit'] });
  t.same([cm.width, cm.height], [figure.width, figure.height], 'the CM figure: 2x2 heat maps with named axes and a colour bar');
  t.notSame([...cm.data.subarray((figure.gridY * cm.width + figure.gridX) * 3, (figure.gridY * cm.width + figure.gridX) * 3 + 3)], [255, 255, 255], 'a heat map where the grid starts');
  t.ok(fs.existsSync(path.join(dir, 'pictures', 'image-000-annotator-fracture.png')));
  // --no-cms: the same pictures but the CM heat maps (4 annotators x 2 images fewer);
  // --probs is a 3D option, said so rather than silently dropped.
  const noCms = await inProcess(['predict', '--checkpoint', 'runs/tiny/best.safetensors', '--out', 'pictures-no-cms', '--count', '2', '--no-cms', '--probs', 'uint8']);
  t.equal(noCms.exitCode, 0, noCms.stderr);
  t.match(noCms.stdout, /wrote 16 PNG files for 2 test images/);
  t.match(noCms.stderr, /--probs uint8 applies to 3D cases/);
  t.notOk(fs.readdirSync(path.join(dir, 'pictures-no-cms')).some((f) => f.includes('-cm-')), 'no CM pictures');
  t.ok(fs.existsSync(path.join(dir, 'pictures-no-cms', 'image-000-annotator-fracture.png')), 'annotator maps still drawn');
  t.match(fs.readFileSync(path.join(dir, 'pictures-no-cms', 'README.txt'), 'utf8'), /--no-cms: no CM pictures/);

  // --device: the CPU on request; 'cuda' where no GPU can run it fails with the reason.
  const onCpu = await inProcess(['eval', '--checkpoint', 'runs/tiny/best.safetensors', '--split', 'validation', '--device', 'cpu', '--out', 'eval-cpu.json']);
  t.equal(onCpu.exitCode, 0, onCpu.stderr);
  const a = JSON.parse(fs.readFileSync(path.join(dir, 'runs', 'tiny', 'eval-validation-best.json'), 'utf8'));
  const b = JSON.parse(fs.readFileSync(path.join(dir, 'eval-cpu.json'), 'utf8'));
  t.same(b.metrics, a.metrics, 'the same scores on the CPU as where it was trained (the CPU)');
  if (!backendInfo().gpuAvailable) {
    const onGpu = await inProcess(['predict', '--checkpoint', 'runs/tiny/best.safetensors', '--out', 'pictures-gpu', '--count', '1', '--device', 'cuda']);
    t.equal(onGpu.exitCode, 1);
    t.match(onGpu.stderr, /^cmseg: error: .*cuda/);
  }

  const again = await inProcess(['train', '--preset', 'mnist-tiny', '--out', 'runs/tiny', '--resume', '--no-test', '--quiet']);
  t.equal(again.exitCode, 0, again.stderr);
  t.match(again.stdout, /the run was already complete at step 3/);
  const conflict = await inProcess(['train', '--out', 'runs/tiny', '--resume', '--lambda', '0.5']);
  t.equal(conflict.exitCode, 1);
  t.match(conflict.stderr, /^cmseg: error: cannot resume .*last\.safetensors with different settings: lambda 0\.5 \(the run has 0\.01\)\n$/);
});

t.test('simulate writes an image folder that the loader reads back', async (t) => {
  const r = await inProcess(['simulate', '--out', 'sim', '--count', '12', '--labels', 'single', '--seed', '4']);
  t.equal(r.exitCode, 0, r.stderr);
  t.match(r.stdout, /simulated 12 MNIST images with annotators good, over, under, fracture \(single labels\)/);
  t.match(r.stdout, /outputs:\n  images +sim\/images\n  labels +sim\/labels\n  consensus +sim\/consensus\n  description +sim\/dataset\.json/);
  const folder = loadImageFolder(path.join(dir, 'sim'));
  t.equal(folder.count, 12);
  t.same(folder.annotators, ['fracture', 'good', 'over', 'under']);
  for (let n = 0; n < 12; n++) {
    let labelled = 0;
    for (let r = 0; r < 4; r++) labelled += folder.present[n * 4 + r];
    t.equal(labelled, 1, `image ${n}: one annotator in single mode`);
  }
  // the 'good' annotator's labels equal the consensus wherever it labelled
  const good = folder.annotators.indexOf('good');
  const V = 32 * 32;
  for (let n = 0; n < 12; n++) {
    if (!folder.present[n * 4 + good]) continue;
    t.same(folder.labels[good].subarray(n * V, (n + 1) * V), folder.consensus!.subarray(n * V, (n + 1) * V));
  }
  const description = JSON.parse(fs.readFileSync(path.join(dir, 'sim', 'dataset.json'), 'utf8'));
  t.equal(description.annotators.length, 4);
  const again = await inProcess(['simulate', '--out', 'sim']);
  t.equal(again.exitCode, 1);
  t.match(again.stderr, /already holds a data set/);
});

t.test('user errors: one line, exit code 1, no stack trace', async (t) => {
  const preset = cmseg(['train', '--preset', 'nope']);
  t.equal(preset.code, 1);
  t.match(preset.stderr, /^cmseg: error: option '--preset <name>' argument 'nope' is invalid\. Allowed choices are mnist, .*\n$/);
  t.notMatch(preset.stderr, /\n\s+at /, 'no stack trace');
  const missing = await inProcess(['eval', '--checkpoint', 'missing.safetensors']);
  t.equal(missing.exitCode, 1);
  t.match(missing.stderr, /^cmseg: error: checkpoint not found: .*missing\.safetensors\n$/);
  const both = await inProcess(['train', '--preset', 'mnist-tiny', '--epochs', '1', '--steps', '2', '--out', 'x']);
  t.match(both.stderr, /give --epochs or --steps, not both/);
  const bf16 = await inProcess(['train', '--preset', 'mnist-tiny', '--bf16', '--steps', '2', '--out', 'x']);
  t.equal(bf16.exitCode, 1);
  t.match(bf16.stderr, /^cmseg: error: --bf16 is for training on the GPU \(--preset brats3d-gpu\); --preset mnist-tiny trains on the CPU\n$/);
});

t.test('pictures: overlays, heat maps, grids', async (t) => {
  const image = Float32Array.from([0, 0.5, 1, 1]);
  const overlay = labelOverlay(image, Uint8Array.from([0, 1, 255, 2]), 2, 2, 1);
  t.same([...overlay.data.subarray(0, 3)], [0, 0, 0], 'background keeps the gray value');
  t.same([...overlay.data.subarray(3, 6)], [...classColor(1)], 'class 1 in its colour (alpha 1)');
  t.same([...overlay.data.subarray(6, 9)], [255, 255, 255], 'unlabelled keeps the gray value');
  t.same(viridis(0), [68, 1, 84]);
  t.same(viridis(1), [253, 231, 37]);
  const heat = heatMap([0, 1], 1, 2);
  t.same([...heat.data], [68, 1, 84, 253, 231, 37]);
  const big = upscale(heat, 3);
  t.same([big.width, big.height], [6, 3]);
  const sheet = grid([[heat, null], [heat, heat]], 2);
  t.same([sheet.width, sheet.height], [2 * 2 + 2, 1 * 2 + 2]);
  // CMs [N=1, R=2, L=2, L=2, 1x2]: annotator 1's grid is 2x2 tiles of 1x2 pixels, gap 2
  const cms = new Float32Array(1 * 2 * 4 * 2).map((_, i) => (i % 2) * 0.5);
  const cmGrid = cmHeatMaps(cms, 0, 1, 2, 2, 1, 2);
  t.same([cmGrid.width, cmGrid.height], [2 + 2 + 2, 1 + 2 + 1]);
  t.throws(() => cmHeatMaps(cms, 1, 0, 2, 2, 1, 2), /out of range/);
  // Tile (i, j) is A[i][j] = p(says i | true j): row i, column j. Values constant per tile,
  // (i * L + j) / 4, so a transposed grid shows tile (0, 1) where (1, 0) belongs.
  const tiles = new Float32Array(1 * 2 * 4 * 2);
  for (let r = 0; r < 2; r++) for (let k = 0; k < 4; k++) tiles.fill(k / 4, (r * 4 + k) * 2, (r * 4 + k + 1) * 2);
  const sheetOf = cmHeatMaps(tiles, 0, 1, 2, 2, 1, 2);
  const pixel = (x: number, y: number) => [...sheetOf.data.subarray((y * sheetOf.width + x) * 3, (y * sheetOf.width + x) * 3 + 3)];
  t.same(pixel(0, 0), viridis(0), 'tile (0, 0) at the top left');
  t.same(pixel(4, 0), viridis(1 / 4), 'tile (0, 1): first row, second column (after a 2-pixel gap)');
  t.same(pixel(0, 3), viridis(2 / 4), 'tile (1, 0): second row, first column');
  t.same(pixel(5, 3), viridis(3 / 4), 'tile (1, 1)');
});

t.test('info describes the installation and a checkpoint', async (t) => {
  const r = await inProcess(['info']);
  t.equal(r.exitCode, 0, r.stderr);
  t.match(r.stdout, /^cpu reference +yes\n/);
  t.match(r.stdout, new RegExp(`\nthreads +${backendInfo().threads} `));
  t.match(r.stdout, /\nCUDA backend +(yes|no \(built without CUDA and cuDNN\))\n/);
  const json = JSON.parse((await inProcess(['info', '--json'])).stdout);
  t.same({ ...json, node: undefined }, { ...backendInfo(), node: undefined }, '--json: backendInfo() as the API gives it');

  const run = await inProcess(['train', '--preset', 'mnist-tiny', '--steps', '2', '--no-test', '--quiet', '--out', 'runs/info']);
  t.equal(run.exitCode, 0, run.stderr);
  const c = await inProcess(['info', '--checkpoint', 'runs/info/last.safetensors']);
  t.equal(c.exitCode, 0, c.stderr);
  t.match(c.stdout, /\nwritten by +cmseg train\nmethod +cm\nstep +2 of 2, 1 epoch\(s\): complete\nbest validation +score \d\.\d{4} at epoch 1 \(step 2\)\nmodel +2D U-Net depth 2, c 4, 1 input channel\(s\), 2 classes\nannotators +4: good, over, under, fracture; CMs full\n/);
  t.match(c.stdout, /\npreset +mnist-tiny\ndata +MNIST 64\/32\/32 images, dense labels, data seed 0\n$/);
  const cj = JSON.parse((await inProcess(['info', '--checkpoint', 'runs/info/last.safetensors', '--json'])).stdout);
  t.equal(cj.step, 2);
  t.same(cj.annotatorNames, ['good', 'over', 'under', 'fracture']);
  const missing = await inProcess(['info', '--checkpoint', 'nope.safetensors']);
  t.equal(missing.exitCode, 1);
  t.match(missing.stderr, /^cmseg: error: .*nope\.safetensors/);
});
