// Captions, legends and labelled CM figures of the prediction pictures (src/report/font.ts,
// src/report/pictures.ts): glyphs where the pattern says, text cut to fit, swatches in the
// class colours, and the CM figure's heat maps pixel for pixel where its layout says.
import t from 'tap';
import { drawText, fitText, glyph, textHeight, textWidth } from '../src/report/font';
import {
  captioned, classColor, classLegend, cmFigure, cmHeatMaps, colorBar, legend, shortClassName, stack, textStrip, viridis,
} from '../src/report/pictures';
import type { PngImage } from '../src/data/png';

const white = (width: number, height: number): PngImage => ({ width, height, channels: 3, data: new Uint8Array(width * height * 3).fill(255) });
const rgb = (im: PngImage, x: number, y: number) => [...im.data.subarray((y * im.width + x) * 3, (y * im.width + x) * 3 + 3)];
const isInk = (im: PngImage, x: number, y: number) => rgb(im, x, y).every((v) => v === 0);
/** The image's pixels as '#' (black) and '.' (anything else), row by row. */
const inkRows = (im: PngImage) => Array.from({ length: im.height }, (_, y) => Array.from({ length: im.width }, (_, x) => (isInk(im, x, y) ? '#' : '.')).join(''));

t.test('glyphs are drawn where their pattern says, at every scale', async (t) => {
  const one = white(5, 7);
  drawText(one, 0, 0, 'H', [0, 0, 0]);
  t.same(inkRows(one), ['#...#', '#...#', '#...#', '#####', '#...#', '#...#', '#...#'], 'H: two uprights and a bar');

  // "T1" at scale 2: 2 glyphs of 5 + a 1-column gap, all doubled.
  t.equal(textWidth('T1', 2), 22);
  t.equal(textHeight(2), 14);
  const two = white(22, 14);
  drawText(two, 0, 0, 'T1', [0, 0, 0], 2);
  const rows = inkRows(two);
  t.equal(rows[0].slice(0, 10), '##########', "T's bar spans the glyph, doubled");
  t.equal(rows[1], rows[0], 'each glyph row drawn twice');
  t.equal(rows[13].slice(0, 10), '....##....', "T's stem in the middle at the bottom");
  t.ok(rows.every((r) => r.slice(10, 12) === '..'), 'the gap between glyphs is empty');
  t.equal(rows[13].slice(12), '..######..', "1's foot");

  t.same(glyph('a'), glyph('A'), 'lower case is drawn in upper case');
  t.same(glyph('\u00e9'), glyph('?'), 'a character the font lacks is drawn as ?');
  t.notSame(glyph('O'), glyph('0'), 'O and zero differ');

  // Clipped at the edges; a grey-scale image is refused.
  const edge = white(2, 3);
  drawText(edge, -3, -3, 'H', [0, 0, 0]);
  t.same(inkRows(edge), ['##', '.#', '.#'], "only the part inside is drawn (H's lower right corner)");
  t.throws(() => drawText({ width: 1, height: 1, channels: 1, data: new Uint8Array(1) }, 0, 0, 'A', [0, 0, 0]), /RGB/);
});

t.test('text is cut to fit, ending in ..', async (t) => {
  t.equal(fitText('edema', 100), 'edema', 'fits: unchanged');
  const cut = fitText('enhancing tumour', textWidth('enhanc..'));
  t.equal(cut, 'enhanc..');
  t.ok(textWidth(cut) <= textWidth('enhanc..'));
  t.equal(fitText('ab cd', textWidth('ab .')), 'ab..', 'no space left before the dots');
  t.equal(fitText('abc', 3), '', 'nothing fits');

  // A strip draws in its scale when the text fits, else in the smallest type.
  const big = textStrip('ok', 100, 2);
  t.equal(big.height, 14 + 8, 'a line at scale 2 plus its margins');
  const inkWidth = (im: PngImage) => {
    let lo = Infinity;
    let hi = -1;
    for (let y = 0; y < im.height; y++) for (let x = 0; x < im.width; x++) if (isInk(im, x, y)) [lo, hi] = [Math.min(lo, x), Math.max(hi, x)];
    return hi - lo + 1;
  };
  t.equal(inkWidth(big), textWidth('ok', 2), 'drawn at scale 2');
  const long = 'a caption longer than the strip';
  const small = textStrip(long, textWidth(long, 2) - 10, 2);
  t.equal(small.height, big.height, 'same height');
  t.equal(inkWidth(small), textWidth(long, 1), 'drawn at scale 1, whole');
});

t.test('captions, stacks and legends', async (t) => {
  const tile = { width: 10, height: 4, channels: 1 as const, data: new Uint8Array(40).fill(7) };
  t.equal(captioned(null, 'truth'), null, 'no picture: still a gap');
  const c = captioned(tile, 'x', 1)!;
  t.same([c.width, c.height], [10, 7 + 4 + 4], 'a caption strip over the picture');
  t.same(rgb(c, 0, 11), [7, 7, 7], 'the picture under the strip, gray as RGB');
  t.ok(isInk(c, 2, 2), 'the caption starts after its margin');

  const s = stack([tile, { ...tile, width: 4 }], 3);
  t.same([s.width, s.height], [10, 11]);
  t.same(rgb(s, 5, 8), [255, 255, 255], 'a narrower picture leaves white beside it');

  t.equal(shortClassName('necrotic core (NCR)'), 'NCR');
  t.equal(shortClassName('digit'), 'digit');
  const entries = classLegend(['background', 'NCR', 'ED'], true);
  t.same(entries.map((e) => e.text), ['NCR', 'ED', 'unlabelled'], 'background is not in the legend');
  t.same(entries[1].color, classColor(2));
  t.same(entries[2].color, [128, 128, 128], 'unlabelled pixels are mid gray');

  // Each swatch is a square in its colour with its name after it; a line too narrow for both wraps.
  const wide = legend(entries.slice(0, 2), 200, 1);
  t.equal(wide.height, 7 + 4, 'one line');
  t.same(rgb(wide, 2, 2), [...classColor(1)], 'first swatch');
  t.ok(isInk(wide, 2 + 7 + 2, 2 + 3), 'its name after the swatch (the N of NCR)');
  const narrow = legend(entries.slice(0, 2), textWidth('NCR') + 7 + 14, 1);
  t.equal(narrow.height, 2 * (7 + 4), 'two lines');
  t.same(rgb(narrow, 2, 11 + 2), [...classColor(2)], 'second swatch on the second line');
});

t.test('a CM figure: the heat maps where its layout says, named axes, a colour bar', async (t) => {
  // CMs [N=1, R=2, L=2, L=2, 4x20]: annotator 1's entries constant per tile, (i * L + j) / 3.
  const [h, w, L, R] = [4, 20, 2, 2];
  const cms = new Float32Array(R * L * L * h * w);
  for (let r = 0; r < R; r++) for (let k = 0; k < L * L; k++) cms.fill(k / 3, (r * L * L + k) * h * w, (r * L * L + k + 1) * h * w);
  const scale = 6; // tiles 120 pixels wide: captions at scale 2, the column names in smaller type
  const fig = cmFigure(cms, 0, 1, R, L, h, w, scale, { annotator: 'over', classes: ['background', 'edema (ED)'] });
  const bare = cmHeatMaps(cms, 0, 1, R, L, h, w, scale);
  let same = 0;
  for (let y = 0; y < bare.height; y++) for (let x = 0; x < bare.width; x++) if (rgb(fig, fig.gridX + x, fig.gridY + y).join() === rgb(bare, x, y).join()) same++;
  t.equal(same, bare.width * bare.height, 'every heat-map pixel at (gridX, gridY) + its place in the bare grid');
  t.ok(fig.gridX >= textWidth('says background'), 'row names fit left of the grid');
  t.ok(fig.gridY >= 2 * textHeight(1), 'a title and the column names above the grid');
  // Row names: ink left of each tile row, none beside the gap between rows.
  const inkIn = (x0: number, x1: number, y0: number, y1: number) => {
    let n = 0;
    for (let y = y0; y < y1; y++) for (let x = x0; x < x1; x++) if (isInk(fig, x, y)) n++;
    return n;
  };
  const tileH = h * scale;
  t.ok(inkIn(0, fig.gridX, fig.gridY, fig.gridY + tileH) > 0, 'a name beside the first row');
  t.ok(inkIn(0, fig.gridX, fig.gridY + tileH + 3, fig.gridY + 2 * tileH + 3) > 0, 'a name beside the second row');
  // Column names between the title (a line at scale 2 and its margins) and the grid, over each column.
  const titleH = textHeight(2) + 8;
  const tileW = w * scale;
  t.ok(inkIn(fig.gridX, fig.gridX + tileW, titleH, fig.gridY) > 0, 'a name over the first column');
  t.ok(inkIn(fig.gridX + tileW + scale, fig.width, titleH, fig.gridY) > 0, 'a name over the second column');
  // The colour bar under the grid: viridis(0) at its left end, viridis(1) at its right.
  const barY = fig.gridY + bare.height + 1;
  const coloured = Array.from({ length: fig.width }, (_, x) => x).filter((x) => rgb(fig, x, barY).join() !== '255,255,255');
  t.ok(coloured.length > bare.width * 0.9, 'a bar nearly as wide as the grid');
  t.same(rgb(fig, coloured[0], barY), viridis(0), 'dark at 0');
  t.same(rgb(fig, coloured[coloured.length - 1], barY), viridis(1), 'bright at 1');
  const bar = colorBar(100, 1);
  t.same(rgb(bar, 2 + 48, 0), viridis(48 / 95), 'linear in between');
});
