// Prediction pictures (src/report/pictures.ts, src/report/font.ts) against independent truth:
// PNGs written by cmseg and decoded by Python's zlib + struct (not cmseg's reader), CM heat
// maps of hand-set CMs held to viridis anchors written out here, an asymmetric label map
// (a flip or transpose would move its labels), non-finite pixels and accented names.
import t from 'tap';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { writePngSync, type PngImage } from '../src/data/png';
import { cmFigure, grayImage, heatMap, labelOverlay } from '../src/report/pictures';
import { drawText, textWidth } from '../src/report/font';
import { lineChart, niceTicks } from '../src/report/chart';
import { missingPythonModules, runPythonJson } from './helpers/python';
import { runCli } from './helpers/cli';
import { readPngSync, writePngSync as writePng } from '../src/data/png';
import { createModel } from '../src/model/model';
import { saveCheckpoint } from '../src/model/checkpoint';
import { annotatorCaptions, tumourSlice } from '../src/cli/predict';

// Viridis at 0, 0.25, 0.5, 0.75, 1 (matplotlib's), linear in between, as README's colour bar.
const ANCHORS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
const rgb = (im: PngImage, x: number, y: number) => [...im.data.subarray((y * im.width + x) * 3, (y * im.width + x) * 3 + 3)];

// A PNG decoder of its own (every filter type), which prints [width, height, colour type, rows].
const DECODE = `
import sys, zlib, struct, json
b = open(sys.argv[1], 'rb').read()
assert b[:8] == b'\\x89PNG\\r\\n\\x1a\\n'
pos, idat, hdr = 8, b'', None
while pos < len(b):
    n, = struct.unpack('>I', b[pos:pos+4]); typ = b[pos+4:pos+8]; data = b[pos+8:pos+8+n]
    assert struct.unpack('>I', b[pos+8+n:pos+12+n])[0] == zlib.crc32(typ + data) & 0xffffffff
    if typ == b'IHDR': hdr = struct.unpack('>IIBBBBB', data)
    if typ == b'IDAT': idat += data
    pos += 12 + n
w, h, depth, ct = hdr[:4]
assert depth == 8 and hdr[6] == 0
ch = {0: 1, 2: 3, 6: 4}[ct]
raw = zlib.decompress(idat); stride = w * ch; prev = [0] * stride; rows = []
for y in range(h):
    f = raw[y * (stride + 1)]; line = raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)]; cur = [0] * stride
    for x in range(stride):
        a = cur[x - ch] if x >= ch else 0; up = prev[x]; c = prev[x - ch] if x >= ch else 0
        if f == 0: pr = 0
        elif f == 1: pr = a
        elif f == 2: pr = up
        elif f == 3: pr = (a + up) // 2
        else:
            p = a + up - c; pa, pb, pc = abs(p - a), abs(p - up), abs(p - c)
            pr = a if pa <= pb and pa <= pc else (up if pb <= pc else c)
        cur[x] = (line[x] + pr) & 255
    rows.append(cur); prev = cur
print(json.dumps([w, h, ct, rows]))
`;
const python = missingPythonModules('zlib');
const decoded = (file: string) => {
  const [width, height, colourType, rows] = runPythonJson<[number, number, number, number[][]]>(DECODE, [file]);
  const channels = colourType === 0 ? 1 : 3;
  return { width, height, colourType, px: (x: number, y: number) => rows[y].slice(x * channels, (x + 1) * channels) };
};
const tmp = (t: { teardown: (fn: () => void) => void }) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cmseg-pictures-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
};

t.test('a CM figure as a PNG: tile (i, j) is viridis(A[i][j]) over the whole tile, for an asymmetric A', { skip: python }, async (t) => {
  // 3 classes, a 3x5 image (not square), one annotator of two; A's columns sum to 1.
  const A = [[0.5, 0.25, 0], [0.25, 0.75, 0], [0.25, 0, 1]];
  const [L, R, h, w, scale] = [3, 2, 3, 5, 2];
  const V = h * w;
  const cms = new Float32Array(R * L * L * V).fill(0.5);
  for (let i = 0; i < L; i++) for (let j = 0; j < L; j++) cms.fill(A[i][j], (1 * L * L + i * L + j) * V, (1 * L * L + i * L + j + 1) * V);
  const figure = cmFigure(cms, 0, 1, R, L, h, w, scale, { annotator: 'b', classes: ['background', 'one', 'two'] });
  const file = path.join(tmp(t), 'cm.png');
  writePngSync(file, figure);
  const png = decoded(file);
  t.same([png.width, png.height, png.colourType], [figure.width, figure.height, 2], 'RGB, of the figure\'s size');
  const gap = Math.max(2, scale);
  for (let i = 0; i < L; i++) {
    for (let j = 0; j < L; j++) {
      const want = ANCHORS[A[i][j] * 4];
      const x0 = figure.gridX + j * (w * scale + gap);
      const y0 = figure.gridY + i * (h * scale + gap);
      const off = [];
      for (let y = y0; y < y0 + h * scale; y++) for (let x = x0; x < x0 + w * scale; x++) if (png.px(x, y).join() !== want.join()) off.push([x, y]);
      t.same(off, [], `tile (${i}, ${j}) = viridis(${A[i][j]})`);
    }
  }
});

t.test('a label overlay as a PNG keeps its labels where the map has them (no flip, no transpose)', { skip: python }, async (t) => {
  // 2 rows x 3 columns; gray 0..5 along the rows; class 1 at (row 0, column 2), class 2 at (row 1, column 0).
  const image = [0, 1, 2, 3, 4, 5];
  const labels = new Uint8Array([0, 0, 1, 2, 0, 0]);
  const file = path.join(tmp(t), 'overlay.png');
  writePngSync(file, labelOverlay(image, labels, 2, 3));
  const png = decoded(file);
  t.same([png.width, png.height, png.colourType], [3, 2, 2]);
  const gray = (v: number) => Math.round((v * 255) / 5);
  const blend = (g: number, c: number[]) => c.map((k) => Math.round(0.4 * g + 0.6 * k));
  t.same(png.px(0, 0), [0, 0, 0]);
  t.same(png.px(1, 0), [gray(1), gray(1), gray(1)]);
  t.same(png.px(2, 0), blend(gray(2), [230, 159, 0]), 'class 1 (orange) at row 0, column 2');
  t.same(png.px(0, 1), blend(gray(3), [86, 180, 233]), 'class 2 (sky blue) at row 1, column 0');
  t.same(png.px(2, 1), [255, 255, 255]);
});

t.test('gray pictures: a NaN or infinite pixel leaves the others scaled over the finite range', async (t) => {
  // Finite values 0, 1, 2 -> 0, 128, 255; NaN and -Infinity black, +Infinity white.
  t.same([...grayImage([0, 1, NaN, 2, Infinity, -Infinity], 1, 6).data], [0, 128, 0, 255, 255, 0]);
  t.same([...grayImage([4, NaN], 1, 2).data], [0, 0], 'one finite value: black, as a constant image');
  // An overlay's gray comes from the same scaling: the labelled pixel is blended with 128, not 0.
  const overlay = labelOverlay([0, 1, NaN, 2], new Uint8Array([0, 1, 0, 0]), 2, 2);
  t.same(rgb(overlay, 1, 0), [0.4 * 128 + 0.6 * 230, 0.4 * 128 + 0.6 * 159, 0.4 * 128].map(Math.round));
  t.same(rgb(overlay, 1, 1), [255, 255, 255]);
});

t.test('heat maps: +-Infinity at the ends of the scale, NaN in a gray off it, named under the CM figure', async (t) => {
  const values = [0, 0.25, 0.5, 0.75, 1, Infinity, -Infinity, 2, -1, NaN];
  const map = heatMap(values, 1, values.length);
  t.same(values.map((_, x) => rgb(map, x, 0)), [...ANCHORS, ANCHORS[4], ANCHORS[0], ANCHORS[4], ANCHORS[0], [128, 128, 128]]);
  const [L, h, w] = [2, 4, 4];
  const cms = new Float32Array(L * L * h * w).fill(0.5);
  const clean = cmFigure(cms, 0, 0, 1, L, h, w, 4, { annotator: 'a', classes: ['bg', 'fg'] });
  cms[3] = NaN;
  const withNaN = cmFigure(cms, 0, 0, 1, L, h, w, 4, { annotator: 'a', classes: ['bg', 'fg'] });
  const grays = (im: PngImage, y0: number) => {
    let n = 0;
    for (let y = y0; y < im.height; y++) for (let x = 0; x < im.width; x++) if (rgb(im, x, y).join() === '128,128,128') n++;
    return n;
  };
  const gridBottom = withNaN.gridY + 2 * h * 4 + Math.max(2, 4);
  t.equal(grays(withNaN, withNaN.gridY) - grays(withNaN, gridBottom), 16, 'the NaN pixel, 4x4 in its tile');
  t.ok(grays(withNaN, gridBottom) > 0, 'a gray swatch under the grid says what gray means');
  t.ok(withNaN.height > clean.height, 'with a line of legend for it');
  t.equal(grays(clean, 0), 0, 'no swatch when no entry is NaN');
});

t.test('accented names are drawn as their letters, not as ?', async (t) => {
  const draw = (text: string) => {
    const im: PngImage = { width: 80, height: 7, channels: 3, data: new Uint8Array(80 * 7 * 3).fill(255) };
    drawText(im, 0, 0, text, [0, 0, 0]);
    return Buffer.from(im.data).toString('hex');
  };
  t.equal(draw('Jürgen'), draw('JURGEN'));
  t.equal(draw('Zoe\u0301'), draw('ZOE'), 'a combining accent (decomposed form) is not a glyph of its own');
  t.equal(textWidth('Zoe\u0301'), textWidth('ZOE'));
  t.equal(draw('Søren Łukasz'), draw('SOREN LUKASZ'));
  t.not(draw('张'), draw('ZOE'), 'a character with no Latin letter is still drawn (as ?)');
});

t.test('chart ticks of tiny and huge ranges: finite, covering the data, no toFixed error', async (t) => {
  t.same(niceTicks(0, 1e-300), [0, 2e-301, 4e-301, 6e-301, 8e-301, 1e-300], 'steps of 2e-301');
  t.same(niceTicks(-1e308, 1e308), [-1e308, -5e307, 0, 5e307, 1e308], 'hi - lo overflows; steps of 5e307');
  const top = niceTicks(0, 1.7e308);
  t.ok(top.every(Number.isFinite) && top[0] <= 0 && top[top.length - 1] >= 1.7e308, `0..1.7e308 covered by finite ticks: ${top}`);
  const flat = niceTicks(1.7e308, 1.7e308);
  t.ok(flat.every(Number.isFinite) && flat[0] < 1.7e308 && flat[flat.length - 1] >= 1.7e308, `a flat series at 1.7e308: ${flat}`);
  // A series of values around 1e-120 drawn where its layout says (it threw before).
  const chart = lineChart([{ name: 'tiny', color: [255, 0, 0], points: [[0, 1e-120], [1, 3e-120]], marker: 5 }], { width: 300, height: 200, title: 't', xLabel: 'x' });
  for (const [x, y] of [[0, 1e-120], [1, 3e-120]]) {
    const [px, py] = chart.layout.toPixel(x, y).map(Math.round);
    t.ok(px >= chart.layout.plot.x && py >= chart.layout.plot.y && py < chart.layout.plot.y + chart.layout.plot.height, `(${x}, ${y}) inside the plot`);
    t.same(rgb(chart, Math.min(px, chart.layout.plot.x + chart.layout.plot.width - 1), py), [255, 0, 0], `(${x}, ${y}) drawn`);
  }
});

t.test('eval tables: an annotator named "a|b" keeps every row as many cells as its header', async (t) => {
  const dir = tmp(t);
  const sim = await runCli(['simulate', '--out', 'data', '--count', '6'], dir);
  t.equal(sim.exitCode, 0, sim.stderr);
  fs.renameSync(path.join(dir, 'data', 'labels', 'good'), path.join(dir, 'data', 'labels', 'a|b'));
  const trained = await runCli(['train', '--preset', 'images', '--data', 'data', '--steps', '2', '--depth', '2', '--base-channels', '4', '--quiet', '--threads', '1', '--out', 'run'], dir);
  t.equal(trained.exitCode, 0, trained.stderr);
  const ev = await runCli(['eval', '--checkpoint', 'run/best.safetensors', '--data', 'data', '--out', 'e.json', '--threads', '1'], dir);
  t.equal(ev.exitCode, 0, ev.stderr);
  for (const output of [trained.stdout, ev.stdout]) {
    // GitHub Markdown: a cell ends at every '|' not escaped by a backslash.
    const cells = (line: string) => line.split(/(?<!\\)\|/).length;
    const tables = output.split(/\n\n/).map((block) => block.split('\n').filter((l) => l.startsWith('|'))).filter((rows) => rows.length > 0);
    t.ok(tables.some((rows) => rows.some((r) => r.includes('a\\|b'))), 'the name is in a table, its bar escaped');
    for (const rows of tables) t.same(rows.map(cells), rows.map(() => cells(rows[0])), `rows of "${rows[0]}"`);
  }
});

t.test('cmseg curves --out refuses to replace a file that is not a picture (the run\'s own log)', async (t) => {
  const dir = tmp(t);
  const log = path.join(dir, 'run', 'train-log.jsonl');
  fs.mkdirSync(path.dirname(log));
  const text = [1, 2].map((step) => JSON.stringify({ event: 'step', step, loss: 1 / step, ce: [0.5] })).join('\n') + '\n';
  fs.writeFileSync(log, text);
  const r = await runCli(['curves', 'run', '--out', 'run/train-log.jsonl'], dir);
  t.equal(r.exitCode, 1);
  t.match(r.stderr, /--out run\/train-log\.jsonl is a file that is not a PNG picture \(the run's training log\): it would be replaced/);
  t.equal(fs.readFileSync(log, 'utf8'), text, 'the log is as it was');
  // An earlier picture is replaced, as the default does.
  for (let k = 0; k < 2; k++) t.equal((await runCli(['curves', 'run', '--out', 'run/c.png'], dir)).exitCode, 0);
  t.same([...fs.readFileSync(path.join(dir, 'run', 'c.png')).subarray(0, 4)], [0x89, 0x50, 0x4e, 0x47]);
});

t.test('the 3D picture slice holds tumour: of the slices with tumour, the nearest its centroid', async (t) => {
  const extent = { d: 9, h: 4, w: 4 };
  const at = (marks: [number, number][]) => {
    const labels = new Uint8Array(9 * 16);
    for (const [z, n] of marks) for (let i = 0; i < n; i++) labels[z * 16 + i] = 2;
    return labels;
  };
  // Two lesions at z 1 and 7: the centroid's slice (4) holds none; 1 and 7 are as near, 7 has more.
  t.equal(tumourSlice(at([[1, 3], [7, 5]]), extent), 7);
  t.equal(tumourSlice(at([[1, 5], [7, 3]]), extent), 1);
  t.equal(tumourSlice(at([[2, 4], [3, 4], [4, 4]]), extent), 3, 'one lesion: its middle slice');
  const unlabelled = new Uint8Array(9 * 16).fill(255);
  t.equal(tumourSlice(unlabelled, extent), undefined, 'unlabelled voxels are not tumour');
});

t.test('annotator captions fall back to the file-name parts where names would draw alike', async (t) => {
  // The font draws ASCII and accented Latin letters; 张伟 and 李娜 both drew as "??".
  t.same(annotatorCaptions(['张伟', '李娜'], ['__', '__-1']), ['__', '__-1']);
  t.same(annotatorCaptions(['Jürgen', 'Zoé'], ['J_rgen', 'Zo_']), ['Jürgen', 'Zoé'], 'accented names draw as their letters: kept');
  t.same(annotatorCaptions(['good', 'GOOD'], ['good', 'GOOD-1']), ['good', 'GOOD-1'], 'names the upper-case font draws alike');
  t.same(annotatorCaptions(['what?', 'over'], ['what_', 'over']), ['what?', 'over'], "a name's own '?' is drawn");
  t.same(annotatorCaptions([undefined, 'b'], ['annotator0', 'b']), ['annotator0', 'b']);
});

t.test('predict refuses a --scale whose sheet of pictures would be too large, before drawing', async (t) => {
  const dir = tmp(t);
  t.equal((await runCli(['train', '--preset', 'mnist-tiny', '--steps', '1', '--quiet', '--no-test', '--out', 'run'], dir)).exitCode, 0);
  // 32x32 MNIST pictures at --scale 100 (3200 a side, under the 4096 per picture): 4 annotators
  // make a 4x3 sheet of 123 million pixels (at --scale 128: 70 s and 3 GB).
  const r = await runCli(['predict', '--checkpoint', 'run/best.safetensors', '--scale', '100', '--out', 'p'], dir);
  t.equal(r.exitCode, 1);
  t.match(r.stderr, /--scale 100 would make a sheet of 4x3 pictures of 3200x3200 pixels, more than 64 million pixels in all \(--scale 73 or less here\)/);
  t.notOk(fs.existsSync(path.join(dir, 'p')) && fs.readdirSync(path.join(dir, 'p')).some((f) => f.endsWith('.png')), 'no picture written');
});

t.test('an RGB model\'s input is pictured in colour (an object only in green shows), its overlays over the luminance', async (t) => {
  const dir = tmp(t);
  const model = createModel({ ndim: 2, inChannels: 3, classes: 2, annotators: 1, depth: 2, baseChannels: 2, seed: 3 });
  await saveCheckpoint(model, path.join(dir, 'rgb.safetensors'));
  await model.dispose();
  // 8x8, red 60 everywhere, a green square (rows 2..5, columns 2..5), no blue.
  const data = new Uint8Array(8 * 8 * 3);
  for (let y = 0; y < 8; y++) for (let x = 0; x < 8; x++) {
    const i = (y * 8 + x) * 3;
    data[i] = 60;
    data[i + 1] = y >= 2 && y < 6 && x >= 2 && x < 6 ? 200 : 0;
  }
  fs.mkdirSync(path.join(dir, 'data', 'images'), { recursive: true });
  writePng(path.join(dir, 'data', 'images', 'a.png'), { width: 8, height: 8, channels: 3, data });
  const r = await runCli(['predict', '--checkpoint', 'rgb.safetensors', '--data', 'data', '--out', 'p', '--scale', '1'], dir);
  t.equal(r.exitCode, 0, r.stderr);
  const input = readPngSync(path.join(dir, 'p', 'a-input.png'));
  t.equal(input.channels, 3, 'an RGB picture');
  const at = (y: number, x: number) => Array.from(input.samples.subarray((y * 8 + x) * 3, (y * 8 + x) * 3 + 3));
  // One range for the three planes (0..200/255): red 60 -> 76 (76.5 less float rounding), green 200 -> 255.
  t.same(at(0, 0), [76, 0, 0], 'the background keeps its red');
  t.same(at(3, 3), [76, 255, 0], 'the square shows in green (the red channel alone had no trace of it)');
  t.match(fs.readFileSync(path.join(dir, 'p', 'README.txt'), 'utf8'), /in colour for an RGB model/);
});
