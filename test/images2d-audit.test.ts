// Users' own 2D data as real multi-annotator sets come: label maps saved as palette PNGs by
// colour quantization, label files whose extension differs in case from their image's, and
// folders too large to hold in memory. Truth comes from PIL/NumPy (the masks as written,
// and as PIL's convert('L') reads them), not from cmseg's own reader.
import t from 'tap';
import * as fs from 'fs';
import * as path from 'path';
import { loadImageFolder } from '../src/data/image-folder';
import { loadImagesToPredict } from '../src/data/image-files';
import type { CheckpointInfo } from '../src/model/checkpoint-info';
import { readPngSync, writePngSync } from '../src/data/png';
import { missingPythonModules, runPythonJson } from './helpers/python';
import { firstDifference, tempDir } from './helpers/files';

const noPil = missingPythonModules('numpy', 'PIL');

/** A 2D checkpoint's info as loadImagesToPredict reads it (no model file is opened). */
function fakeInfo(annotatorNames: string[], classes = 2): CheckpointInfo {
  return {
    file: 'model.safetensors',
    config: { ndim: 2, inChannels: 1, classes, annotators: annotatorNames.length, depth: 2 },
    step: 1,
    learnsCms: true,
    annotatorNames,
    namesRecorded: true,
  } as unknown as CheckpointInfo;
}

t.test('palette label maps saved through colour quantization are read as the mask looks, not by palette index', { skip: noPil }, async (t) => {
  const dir = tempDir(t, 'cmseg-img2d-');
  // PIL's ADAPTIVE palette and quantize() order the palette brightest first: a 0/255 mask's
  // white becomes index 0, a 0/1/2 map's 2 index 0. A colour (VOC style) palette keeps indices.
  const truth = runPythonJson<{ bin: number[]; voc: number[]; multi: number[]; palettes: number[][] }>(
    `
import numpy as np, json, sys, os
from PIL import Image
root = sys.argv[1]
rng = np.random.default_rng(5)
for d in ['bin/images', 'bin/labels/quant', 'bin/labels/voc', 'bin/consensus', 'multi/images', 'multi/labels/quant']:
    os.makedirs(os.path.join(root, d))
img = rng.integers(0, 256, (8, 12), dtype=np.uint8)
m = np.zeros((8, 12), np.uint8); m[2:5, 3:9] = 1; m[6, 0] = 1
Image.fromarray(img).save(f'{root}/bin/images/a.png')
q = Image.fromarray(m * 255).convert('P', palette=Image.ADAPTIVE, colors=2)
q.save(f'{root}/bin/labels/quant/a.png')
Image.fromarray(m * 255).convert('RGB').quantize(2).save(f'{root}/bin/consensus/a.png')
v = m.copy(); v[0, :] = 1  # another mask, by index into a colour palette
voc = Image.fromarray(v, 'P'); voc.putpalette([0, 0, 0, 128, 0, 0]); voc.save(f'{root}/bin/labels/voc/a.png')
k = np.zeros((8, 12), np.uint8); k[1:4, 1:5] = 1; k[5:7, 6:11] = 2
Image.fromarray(img).save(f'{root}/multi/images/a.png')
Image.fromarray(k).convert('RGB').quantize(3).save(f'{root}/multi/labels/quant/a.png')
seen = lambda f: (np.array(Image.open(f).convert('L')) > 0).astype(int).ravel().tolist()
print(json.dumps({'bin': seen(f'{root}/bin/labels/quant/a.png'), 'voc': v.ravel().tolist(), 'multi': k.ravel().tolist(),
  'palettes': [q.getpalette()[:6], Image.open(f'{root}/multi/labels/quant/a.png').getpalette()[:9]]}))
`,
    [dir],
  );
  // The files are what this test is about: white (or class 2) at palette index 0.
  t.same(truth.palettes, [[255, 255, 255, 0, 0, 0], [2, 2, 2, 1, 1, 1, 0, 0, 0]], 'PIL wrote the palettes brightest first');
  const bin = loadImageFolder(path.join(dir, 'bin'));
  t.equal(firstDifference(bin.labels[bin.annotators.indexOf('quant')], truth.bin), -1, 'quantized 0/255 mask: white is foreground');
  t.equal(firstDifference(bin.consensus!, truth.bin), -1, 'quantized consensus too');
  t.equal(firstDifference(bin.labels[bin.annotators.indexOf('voc')], truth.voc), -1, 'a colour palette is still read by index');
  const multi = loadImageFolder(path.join(dir, 'multi'), { classes: 3 });
  t.equal(firstDifference(multi.labels[0], truth.multi), -1, 'quantized 0/1/2 map: classes 0 and 2 not swapped');
  // The new-data reader (eval, predict --data) reads them alike.
  const mine = loadImagesToPredict(path.join(dir, 'bin'), fakeInfo(['quant', 'voc']));
  t.equal(firstDifference(mine.set.labels[0], truth.bin), -1, 'eval/predict: quantized mask');
  t.equal(firstDifference(mine.set.consensus!, truth.bin), -1, 'eval/predict: quantized consensus');
});

t.test('label and consensus files named a.PNG for images/a.png are read, by training and by eval/predict', async (t) => {
  const dir = tempDir(t, 'cmseg-img2d-');
  const [h, w] = [6, 8];
  for (const sub of ['images', 'labels/r1', 'labels/r2', 'consensus']) fs.mkdirSync(path.join(dir, sub), { recursive: true });
  const masks: Record<string, Uint8Array> = {};
  for (const [n, name] of ['a', 'b'].entries()) {
    writePngSync(path.join(dir, 'images', `${name}.png`), { width: w, height: h, channels: 1, data: Uint8Array.from({ length: h * w }, (_, i) => (i * 37 + n) % 256) });
    const mask = Uint8Array.from({ length: h * w }, (_, i) => ((i + n) % 3 === 0 ? 1 : 0));
    masks[name] = mask;
    const png = { width: w, height: h, channels: 1 as const, data: mask.map((v) => v * 255) };
    writePngSync(path.join(dir, 'labels/r1', `${name}.PNG`), png); // a Windows export
    writePngSync(path.join(dir, 'labels/r2', `${name}.png`), png);
    writePngSync(path.join(dir, 'consensus', `${name}.Png`), png);
  }
  const expected = Uint8Array.from([...masks.a, ...masks.b]);
  const batch = loadImageFolder(dir);
  t.same(batch.annotators, ['r1', 'r2']);
  t.same([...batch.present], [1, 1, 1, 1], 'every image labelled by both annotators');
  t.equal(firstDifference(batch.labels[0], expected), -1, 'r1 read from a.PNG and b.PNG');
  t.equal(firstDifference(batch.consensus!, expected), -1, 'consensus read from a.Png and b.Png');
  const mine = loadImagesToPredict(dir, fakeInfo(['r1', 'r2']));
  t.same(mine.labelled, ['r1', 'r2'], 'eval/predict: r1 is labelled, not left unread');
  t.same([...mine.set.present], [1, 1, 1, 1]);
  t.equal(firstDifference(mine.set.labels[0], expected), -1);
  t.equal(firstDifference(mine.set.consensus!, expected), -1);

  // a.png and a.PNG in one annotator's folder: which is the label? Refused, naming both.
  writePngSync(path.join(dir, 'labels/r2', 'a.PNG'), { width: w, height: h, channels: 1, data: new Uint8Array(h * w) });
  t.throws(() => loadImageFolder(dir), /labels\/r2\/a\.PNG and .*labels\/r2\/a\.png differ only in the case of their extension|labels\/r2\/a\.png and .*labels\/r2\/a\.PNG differ only in the case of their extension/);
  // A twin added beside an image outside a run's split (names asked) does not break the run.
  fs.rmSync(path.join(dir, 'labels/r2', 'a.PNG'));
  for (const name of ['c.png', 'c.PNG']) writePngSync(path.join(dir, 'images', name), { width: w, height: h, channels: 1, data: new Uint8Array(h * w) });
  t.throws(() => loadImageFolder(dir), /images\/c\.(PNG|png) and .*images\/c\.(png|PNG) differ only in the case of their extension/);
  t.same(loadImageFolder(dir, { names: ['a.png', 'b.png'] }).names, ['a.png', 'b.png']);
  // Two images a.png and a.PNG in a folder to predict: their pictures (a-input.png, ...) would overwrite each other.
  const plain = path.join(dir, 'plain');
  fs.mkdirSync(plain);
  for (const name of ['a.png', 'a.PNG']) writePngSync(path.join(plain, name), { width: w, height: h, channels: 1, data: new Uint8Array(h * w) });
  t.throws(() => loadImagesToPredict(plain, fakeInfo(['r1'])), { name: 'UserError', message: /plain\/a\.(PNG|png) and .*plain\/a\.(png|PNG) differ only in the case of their extension/ });
});

t.test('a folder too large to read into memory is refused before allocating, with its sizes', async (t) => {
  const dir = tempDir(t, 'cmseg-img2d-');
  for (const sub of ['images', 'labels/r1']) fs.mkdirSync(path.join(dir, sub), { recursive: true });
  // 5000 images of 1024x1024 (hard links of one small file): 21 GB as float32, past one
  // typed array's 2^32 values. V8 said only "Invalid typed array length: 5242880000".
  const one = path.join(dir, 'one.png');
  writePngSync(one, { width: 1024, height: 1024, channels: 1, data: new Uint8Array(1024 * 1024) });
  for (let n = 0; n < 5000; n++) {
    const name = `im${String(n).padStart(4, '0')}.png`;
    fs.linkSync(one, path.join(dir, 'images', name));
    if (n < 3) fs.linkSync(one, path.join(dir, 'labels/r1', name));
  }
  const message = /5000 image\(s\) of 1048576 pixels x 1 channel\(s\) .*(2[0-9]\.[0-9] GB).*use fewer or smaller images/;
  t.throws(() => loadImageFolder(dir), { name: 'ImageFolderError', message });
  t.throws(() => loadImagesToPredict(dir, fakeInfo(['r1'])), { name: 'UserError', message });
});

t.test('a mask stored in the alpha channel (one colour over transparency) is refused, not read as all background', async (t) => {
  const dir = tempDir(t, 'cmseg-img2d-');
  const [h, w] = [4, 6];
  for (const sub of ['images', 'labels/la', 'labels/rgba', 'labels/pal']) fs.mkdirSync(path.join(dir, sub), { recursive: true });
  const mask = Uint8Array.from({ length: h * w }, (_, i) => (i % 4 === 1 ? 1 : 0));
  for (const name of ['a', 'b', 'c']) writePngSync(path.join(dir, 'images', `${name}.png`), { width: w, height: h, channels: 1, data: new Uint8Array(h * w).fill(9) });
  // Gray 0 everywhere, alpha 255 on the mask (LA), and black RGBA alike: the mask is only in alpha.
  writePngSync(path.join(dir, 'labels/la', 'a.png'), { width: w, height: h, channels: 2, data: Uint8Array.from({ length: 2 * h * w }, (_, i) => (i % 2 === 1 ? mask[i >> 1] * 255 : 0)) });
  const rgba = new Uint8Array(4 * h * w);
  mask.forEach((m, p) => (rgba[4 * p + 3] = m * 255));
  writePngSync(path.join(dir, 'labels/rgba', 'b.png'), { width: w, height: h, channels: 4, data: rgba });
  // A palette of two blacks, told apart by tRNS: its indices are the labels (as documented).
  writePngSync(path.join(dir, 'labels/pal', 'c.png'), { width: w, height: h, channels: 1, data: mask }, { palette: Uint8Array.from([0, 0, 0, 0, 0, 0]), paletteAlpha: Uint8Array.from([0, 255]) });
  t.throws(() => loadImageFolder(dir, { annotators: ['la'] }), { name: 'ImageFolderError', message: /labels\/la\/a\.png: every pixel has the value 0, and only its alpha \(transparency\) varies/ });
  t.throws(() => loadImageFolder(dir, { annotators: ['rgba'] }), /labels\/rgba\/b\.png: every pixel has the value 0, and only its alpha/);
  const pal = loadImageFolder(dir, { annotators: ['pal'] });
  t.equal(firstDifference(pal.labels[0].subarray(2 * h * w), mask), -1, 'two black palette entries: read by index');
  // An opaque gray+alpha mask (alpha all 255) is read from its gray.
  writePngSync(path.join(dir, 'labels/la', 'a.png'), { width: w, height: h, channels: 2, data: Uint8Array.from({ length: 2 * h * w }, (_, i) => (i % 2 === 1 ? 255 : mask[i >> 1] * 255)) });
  t.equal(firstDifference(loadImageFolder(dir, { annotators: ['la'] }).labels[0].subarray(0, h * w), mask), -1);
});

t.test('a JPEG named .png, an empty file and a cut PNG are named for what they are', { skip: noPil }, async (t) => {
  const dir = tempDir(t, 'cmseg-img2d-');
  runPythonJson(
    `
import sys, json, numpy as np
from PIL import Image
Image.fromarray(np.zeros((4, 4), np.uint8)).save(sys.argv[1] + '/photo.png', format='JPEG')
Image.fromarray(np.zeros((4, 4), np.uint8)).save(sys.argv[1] + '/scan.png', format='TIFF')
print(json.dumps(0))
`,
    [dir],
  );
  fs.writeFileSync(path.join(dir, 'empty.png'), '');
  fs.writeFileSync(path.join(dir, 'cut.png'), Buffer.from([0x89, 0x50, 0x4e]));
  t.throws(() => readPngSync(path.join(dir, 'photo.png')), /photo\.png: a JPEG file named \.png/);
  t.throws(() => readPngSync(path.join(dir, 'scan.png')), /scan\.png: a TIFF file named \.png/);
  t.throws(() => readPngSync(path.join(dir, 'empty.png')), /empty\.png: an empty file \(0 bytes/);
  t.throws(() => readPngSync(path.join(dir, 'cut.png')), /cut\.png: the first 3 bytes of a PNG file only/);
});
