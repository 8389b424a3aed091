// predict and eval on new 2D data (--data) at scale: the folder is read a batch at a time, not
// whole (5000 images of 1024x1024 are 21 GB as float32), with the same outputs as reading it
// whole: pictures compared with the whole folder's prediction (loadImagesToPredict, one
// predict call), metrics with evaluateModel / evaluateAgainstMajority / fusedLabelRows of the
// whole set. How many images are held at once is read from the order of file reads and
// predictions (fs.readFileSync and Model.prototype.predict spied on).
import t from 'tap';
import * as fs from 'fs';
import fsObject from 'fs';
import { syncBuiltinESMExports } from 'module';
import * as os from 'os';
import * as path from 'path';
import { runCli } from './helpers/cli';
import { createModel, Model, setNumThreads } from '../src/model/model';
import { loadCheckpoint, saveCheckpoint } from '../src/model/checkpoint';
import { readCheckpointInfo } from '../src/model/checkpoint-info';
import * as zlib from 'zlib';
import { encodePng, type PngImage, readPngSync, writePngSync } from '../src/data/png';
import { missingPythonModules, runPythonJson } from './helpers/python';
import { loadImagesToPredict } from '../src/data/image-files';
import { evaluateAgainstMajority, evaluateModel, fusedLabelRows, paddedToDepth } from '../src/train/evaluate';
import { argmaxClasses } from '../src/model/model';
import { grayImage, heatMap, labelOverlay, upscale, viridis } from '../src/report/pictures';

setNumThreads(1);
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cmseg-predict-scale-'));
t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
const cli = (args: string[]) => runCli(args, dir);
const CKPT = path.join(dir, 'm.safetensors');
const NAMES = ['ann', 'bob'];

/** A folder of `count` images h x w with labels/ann (not every third image), labels/bob (not n % 5 == 1) and, with `consensus`, consensus/. */
function makeFolder(root: string, count: number, h: number, w: number, consensus: boolean): void {
  for (const sub of ['images', 'labels/ann', 'labels/bob', ...(consensus ? ['consensus'] : [])]) fs.mkdirSync(path.join(root, sub), { recursive: true });
  for (let n = 0; n < count; n++) {
    const name = `img-${String(n).padStart(2, '0')}.png`;
    const img = Uint8Array.from({ length: h * w }, (_, i) => (i * 37 + n * 11 + ((i / w) | 0) * 5) % 256);
    const lab = (k: number) => Uint8Array.from({ length: h * w }, (_, i) => ((img[i] + k * 40) >> 7) % 3);
    writePngSync(path.join(root, 'images', name), { width: w, height: h, channels: 1, data: img });
    if (n % 3 !== 0) writePngSync(path.join(root, 'labels/ann', name), { width: w, height: h, channels: 1, data: lab(0) });
    if (n % 5 !== 1) writePngSync(path.join(root, 'labels/bob', name), { width: w, height: h, channels: 1, data: lab(1) });
    if (consensus) writePngSync(path.join(root, 'consensus', name), { width: w, height: h, channels: 1, data: lab(2) });
  }
}

/**
 * Runs `fn` while counting, at every read of a file of `imagesDir`, how many images were read
 * and not yet predicted (Model.prototype.predict counts its batch's images): the most held.
 */
async function mostHeld(imagesDir: string, fn: () => Promise<void>, readsOf?: Map<string, number>): Promise<number> {
  // The module object's readFileSync, synced to the modules that import it by name.
  const readFileSync = fsObject.readFileSync;
  const predict = Model.prototype.predict;
  let read = 0;
  let predicted = 0;
  let most = 0;
  fsObject.readFileSync = function (this: unknown, file: fs.PathOrFileDescriptor, ...rest: unknown[]) {
    if (typeof file === 'string' && path.dirname(path.resolve(file)) === imagesDir) most = Math.max(most, ++read - predicted);
    if (typeof file === 'string' && readsOf) readsOf.set(path.resolve(file), (readsOf.get(path.resolve(file)) ?? 0) + 1);
    return (readFileSync as (...args: unknown[]) => unknown).call(this, file, ...rest);
  } as typeof fs.readFileSync;
  syncBuiltinESMExports();
  Model.prototype.predict = function (this: Model, images, shape, options) {
    predicted += shape[0];
    return predict.call(this, images, shape, options);
  };
  try {
    await fn();
  } finally {
    fsObject.readFileSync = readFileSync;
    syncBuiltinESMExports();
    Model.prototype.predict = predict;
  }
  return most;
}

t.before(async () => {
  const model = createModel({ ndim: 2, inChannels: 1, classes: 3, annotators: 2, depth: 2, baseChannels: 4, seed: 3 });
  await saveCheckpoint(model, CKPT, { annotatorNames: NAMES });
  await model.dispose();
  makeFolder(path.join(dir, 'small'), 40, 12, 10, true);
  // 256x256: evaluateModel predicts 16 images a call, so 36 images take 3 calls (and 3 parts).
  makeFolder(path.join(dir, 'large'), 36, 256, 256, true);
  makeFolder(path.join(dir, 'large-nocons'), 36, 256, 256, false);
});

t.test('predict --data reads the folder a batch at a time; the pictures are the whole folder\'s', async (t) => {
  const imagesDir = path.join(dir, 'small', 'images');
  let run = { exitCode: -1, stderr: '', stdout: '' };
  const held = await mostHeld(imagesDir, async () => {
    run = await cli(['predict', '--checkpoint', CKPT, '--data', 'small', '--out', 'pred-small', '--scale', '2']);
  });
  t.equal(run.exitCode, 0, run.stderr);
  // 40 images: read whole, all 40 were held before the first prediction.
  t.ok(held <= 16, `at most one batch of 16 images held at once (held ${held})`);
  // The whole folder's prediction, in one call: each image's predicted consensus picture.
  const info = await readCheckpointInfo(CKPT);
  const { set } = loadImagesToPredict(path.join(dir, 'small'), info);
  const model = await loadCheckpoint(CKPT);
  t.teardown(() => model.dispose());
  const p = await paddedToDepth(model).predict(set.images, [set.count, 1, 12, 10], {});
  const consensus = argmaxClasses(p.probs, set.count, 3);
  const V = 120;
  for (let n = 0; n < set.count; n++) {
    const want = upscale(labelOverlay(set.images.subarray(n * V, (n + 1) * V), consensus.subarray(n * V, (n + 1) * V), 12, 10), 2);
    const got = readPngSync(path.join(dir, 'pred-small', `img-${String(n).padStart(2, '0')}-consensus.png`));
    if (!Buffer.from(got.data).equals(Buffer.from(want.data))) {
      t.fail(`image ${n}: consensus picture differs from the whole folder's prediction`);
      return;
    }
    const input = readPngSync(path.join(dir, 'pred-small', `img-${String(n).padStart(2, '0')}-input.png`));
    if (!Buffer.from(input.data).equals(Buffer.from(upscale(grayImage(set.images.subarray(n * V, (n + 1) * V), 12, 10), 2).data))) {
      t.fail(`image ${n}: input picture differs from the whole folder's`);
      return;
    }
  }
  t.pass('every consensus and input picture is the whole folder\'s');
});

t.test('eval --data reads the folder a predict call at a time; the metrics are the whole set\'s', async (t) => {
  const info = await readCheckpointInfo(CKPT);
  const model = await loadCheckpoint(CKPT);
  t.teardown(() => model.dispose());
  for (const name of ['large', 'large-nocons']) {
    const root = path.join(dir, name);
    let run = { exitCode: -1, stderr: '', stdout: '' };
    const reads = new Map<string, number>();
    const held = await mostHeld(
      path.join(root, 'images'),
      async () => {
        run = await cli(['eval', '--checkpoint', CKPT, '--data', name, '--out', `${name}.json`]);
      },
      reads,
    );
    const decodedTwice = [...reads].filter(([file, n]) => file.startsWith(root + path.sep) && file.endsWith('.png') && n > 1).map(([file]) => path.relative(root, file));
    t.same(decodedTwice.slice(0, 3), [], `${name}: every PNG of the folder is read once`);
    t.equal(run.exitCode, 0, run.stderr);
    t.ok(held <= 16, `${name}: at most one predict call's 16 images held at once (held ${held} of 36)`);
    // The whole set scored as before (one array of every image).
    const { set } = loadImagesToPredict(root, info);
    const scored = paddedToDepth(model);
    const metrics = set.consensus ? await evaluateModel(scored, set) : await evaluateAgainstMajority(scored, set);
    const record = JSON.parse(fs.readFileSync(path.join(dir, `${name}.json`), 'utf8'));
    t.equal(JSON.stringify(record.metrics), JSON.stringify(metrics), `${name}: metrics as the whole set's`);
    t.equal(JSON.stringify(record.fusedLabels), JSON.stringify(set.consensus ? fusedLabelRows(set) : null), `${name}: fused label rows as the whole set's`);
  }
});

/** The spec's heuristic done plainly: each row filtered five ways, the first of least signed-byte sum kept. */
function plainAdaptive(data: Uint8Array, width: number, height: number, bpp: number): number[] {
  const stride = width * bpp;
  const choices: number[] = [];
  let prev = new Uint8Array(stride);
  for (let y = 0; y < height; y++) {
    const row = data.subarray(y * stride, (y + 1) * stride);
    let best = -1;
    let bestCost = Infinity;
    for (let f = 0; f < 5; f++) {
      let cost = 0;
      for (let i = 0; i < stride; i++) {
        const a = i >= bpp ? row[i - bpp] : 0;
        const b = prev[i];
        const c = i >= bpp ? prev[i - bpp] : 0;
        const p = a + b - c;
        const paeth = Math.abs(p - a) <= Math.abs(p - b) && Math.abs(p - a) <= Math.abs(p - c) ? a : Math.abs(p - b) <= Math.abs(p - c) ? b : c;
        const d = (row[i] - [0, a, b, (a + b) >> 1, paeth][f]) & 0xff;
        cost += d < 128 ? d : 256 - d;
      }
      if (cost < bestCost) [best, bestCost] = [f, cost];
    }
    choices.push(best);
    prev = Uint8Array.from(row);
  }
  return choices;
}

/** The filter type byte of each row of a PNG with one IDAT. */
function rowFilters(png: Buffer, height: number, stride: number): number[] {
  const at = png.indexOf('IDAT');
  const raw = zlib.inflateSync(png.subarray(at + 4, at + 4 + png.readUInt32BE(at - 4)));
  return Array.from({ length: height }, (_, y) => raw[y * (stride + 1)]);
}

t.test('pictures: upscaled and plain images encode to PNGs that PIL decodes to their pixels, with the spec heuristic\'s filters', { skip: missingPythonModules('PIL', 'numpy') }, async (t) => {
  const out = path.join(dir, 'png');
  fs.mkdirSync(out);
  let seed = 7;
  const random = () => ((seed = (seed * 1103515245 + 12345) >>> 0) >>> 16) & 255;
  const cases: { name: string; image: PngImage }[] = [];
  for (const channels of [1, 2, 3, 4] as const) {
    const noise = { width: 13, height: 9, channels, data: Uint8Array.from({ length: 13 * 9 * channels }, random) };
    const smooth = { width: 17, height: 11, channels, data: Uint8Array.from({ length: 17 * 11 * channels }, (_, i) => (i * 3 + ((i / (17 * channels)) | 0) * 7) & 255) };
    cases.push({ name: `noise-${channels}`, image: noise }, { name: `noise-${channels}-x3`, image: upscale(noise, 3) }, { name: `smooth-${channels}-x4`, image: upscale(smooth, 4) });
  }
  // Rows of zeros then a repeated non-zero row: None's tie with Up at cost 0, then Up.
  cases.push({ name: 'zeros', image: { width: 8, height: 6, channels: 1, data: Uint8Array.from({ length: 48 }, (_, i) => (i < 24 ? 0 : 1 + (i % 8))) } });
  for (const { name, image } of cases) {
    const png = encodePng(image);
    fs.writeFileSync(path.join(out, `${name}.png`), png);
    t.same(rowFilters(png, image.height, image.width * image.channels), plainAdaptive(image.data, image.width, image.height, image.channels), `${name}: each row's filter is the heuristic's`);
  }
  const decoded = runPythonJson<Record<string, string>>(
    'import sys, json, os, numpy as np\nfrom PIL import Image\nd = sys.argv[1]\nprint(json.dumps({f[:-4]: np.asarray(Image.open(os.path.join(d, f))).astype(np.uint8).tobytes().hex() for f in os.listdir(d)}))',
    [out],
  );
  for (const { name, image } of cases) t.equal(decoded[name], Buffer.from(image.data).toString('hex'), `${name}: PIL reads the pixels back`);
  // upscale by hand: pixel (x, y) of the result is pixel (x / f, y / f) of the source.
  const src = cases[2].image;
  const up = upscale(src, 3);
  let same = up.width === src.width * 3 && up.height === src.height * 3;
  for (let y = 0; same && y < up.height; y++) {
    for (let x = 0; x < up.width; x++) for (let c = 0; c < src.channels; c++) same &&= up.data[(y * up.width + x) * src.channels + c] === src.data[(((y / 3) | 0) * src.width + ((x / 3) | 0)) * src.channels + c];
  }
  t.ok(same, 'upscale repeats each pixel f x f times');
});

t.test('predict --data: an image of another size late in the folder is refused before any picture is written', async (t) => {
  const root = path.join(dir, 'mixed');
  makeFolder(root, 20, 12, 10, true);
  // The 19th image (the second batch) and, in another folder, a label map of the 20th, are 10x12.
  writePngSync(path.join(root, 'images', 'img-18.png'), { width: 12, height: 10, channels: 1, data: new Uint8Array(120) });
  const run = await cli(['predict', '--checkpoint', CKPT, '--data', 'mixed', '--out', 'pred-mixed']);
  t.equal(run.exitCode, 1);
  t.match(run.stderr, /mixed\/images\/img-18\.png is 12x10, but .*mixed\/images\/img-00\.png is 10x12: the images of one --data folder must share one size/);
  const written = fs.existsSync(path.join(dir, 'pred-mixed')) ? fs.readdirSync(path.join(dir, 'pred-mixed')) : [];
  t.same(written, [], 'no pictures of the first batch');
  writePngSync(path.join(root, 'images', 'img-18.png'), { width: 10, height: 12, channels: 1, data: new Uint8Array(120) });
  writePngSync(path.join(root, 'labels', 'bob', 'img-19.png'), { width: 12, height: 10, channels: 1, data: new Uint8Array(120) });
  const labels = await cli(['eval', '--checkpoint', CKPT, '--data', 'mixed', '--out', 'mixed.json']);
  t.equal(labels.exitCode, 1);
  t.match(labels.stderr, /labels\/bob\/img-19\.png is 12x10, but .*img-00\.png is 10x12/);
  // An empty file named .png in the second batch: named for what it is, before any picture.
  writePngSync(path.join(root, 'labels', 'bob', 'img-19.png'), { width: 10, height: 12, channels: 1, data: new Uint8Array(120) });
  fs.writeFileSync(path.join(root, 'images', 'img-17.png'), '');
  const empty = await cli(['predict', '--checkpoint', CKPT, '--data', 'mixed', '--out', 'pred-mixed']);
  t.equal(empty.exitCode, 1);
  t.match(empty.stderr, /img-17\.png: an empty file \(0 bytes/);
  t.same(fs.existsSync(path.join(dir, 'pred-mixed')) ? fs.readdirSync(path.join(dir, 'pred-mixed')) : [], [], 'no pictures of the first batch');
});

t.test('CM heat maps: viridis by hand at its anchors and halfway, NaN gray', async (t) => {
  // viridis anchors at 0, 0.25, 0.5, 0.75, 1; 0.125 is halfway between the first two, rounded half up.
  const values = Float32Array.from([0, 0.25, 0.5, 0.75, 1, 0.125, NaN, Infinity, -Infinity, 2, -1]);
  const want = [
    [68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37],
    [64, 42, 112], [128, 128, 128], [253, 231, 37], [68, 1, 84], [253, 231, 37], [68, 1, 84],
  ];
  t.same(Array.from(heatMap(values, 1, values.length).data), want.flat(), 'each pixel');
  // vmin..vmax: 0.5 in 0..2 is 0.25 on the scale.
  t.same(Array.from(heatMap(Float32Array.from([0.5, 2]), 1, 2, 0, 2).data), [59, 82, 139, 253, 231, 37], 'scaled to vmin..vmax');
  const random = Float32Array.from({ length: 5000 }, (_, i) => Math.abs(Math.sin(i * 12.9898)) * 1.2 - 0.1);
  const map = heatMap(random, 50, 100);
  t.ok(random.every((v, i) => viridis(v).every((c, k) => map.data[i * 3 + k] === c)), 'every pixel is viridis of its value');
});
