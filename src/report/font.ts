// A 5x7 pixel font for the captions, legends and axis labels of the prediction pictures
// (src/report/pictures.ts), so that a sheet says what each tile is without a viewer that
// reads metadata. Upper case, digits and the punctuation the captions use; lower case is
// drawn in upper case, anything else as '?'.

import type { PngImage } from '../data/png';

export const GLYPH_W = 5;
export const GLYPH_H = 7;
/** Columns of background between two glyphs (before scaling). */
export const GLYPH_GAP = 1;

// Each glyph: 7 rows of 5 columns, '#' ink and '.' paper.
const GLYPHS: Record<string, string> = {
  A: '.###. #...# #...# ##### #...# #...# #...#',
  B: '####. #...# #...# ####. #...# #...# ####.',
  C: '.###. #...# #.... #.... #.... #...# .###.',
  D: '####. #...# #...# #...# #...# #...# ####.',
  E: '##### #.... #.... ####. #.... #.... #####',
  F: '##### #.... #.... ####. #.... #.... #....',
  G: '.###. #...# #.... #.### #...# #...# .####',
  H: '#...# #...# #...# ##### #...# #...# #...#',
  I: '.###. ..#.. ..#.. ..#.. ..#.. ..#.. .###.',
  J: '..### ...#. ...#. ...#. ...#. #..#. .##..',
  K: '#...# #..#. #.#.. ##... #.#.. #..#. #...#',
  L: '#.... #.... #.... #.... #.... #.... #####',
  M: '#...# ##.## #.#.# #.#.# #...# #...# #...#',
  N: '#...# #...# ##..# #.#.# #..## #...# #...#',
  O: '.###. #...# #...# #...# #...# #...# .###.',
  P: '####. #...# #...# ####. #.... #.... #....',
  Q: '.###. #...# #...# #...# #.#.# #..#. .##.#',
  R: '####. #...# #...# ####. #.#.. #..#. #...#',
  S: '.#### #.... #.... .###. ....# ....# ####.',
  T: '##### ..#.. ..#.. ..#.. ..#.. ..#.. ..#..',
  U: '#...# #...# #...# #...# #...# #...# .###.',
  V: '#...# #...# #...# #...# #...# .#.#. ..#..',
  W: '#...# #...# #...# #.#.# #.#.# #.#.# .#.#.',
  X: '#...# #...# .#.#. ..#.. .#.#. #...# #...#',
  Y: '#...# #...# .#.#. ..#.. ..#.. ..#.. ..#..',
  Z: '##### ....# ...#. ..#.. .#... #.... #####',
  '0': '.###. #...# #..## #.#.# ##..# #...# .###.',
  '1': '..#.. .##.. ..#.. ..#.. ..#.. ..#.. .###.',
  '2': '.###. #...# ....# ...#. ..#.. .#... #####',
  '3': '##### ...#. ..#.. ...#. ....# #...# .###.',
  '4': '...#. ..##. .#.#. #..#. ##### ...#. ...#.',
  '5': '##### #.... ####. ....# ....# #...# .###.',
  '6': '..##. .#... #.... ####. #...# #...# .###.',
  '7': '##### ....# ...#. ..#.. .#... .#... .#...',
  '8': '.###. #...# #...# .###. #...# #...# .###.',
  '9': '.###. #...# #...# .#### ....# ...#. .##..',
  ' ': '..... ..... ..... ..... ..... ..... .....',
  '.': '..... ..... ..... ..... ..... .##.. .##..',
  ',': '..... ..... ..... ..... .##.. ..#.. .#...',
  ':': '..... .##.. .##.. ..... .##.. .##.. .....',
  '-': '..... ..... ..... ##### ..... ..... .....',
  _: '..... ..... ..... ..... ..... ..... #####',
  '(': '...#. ..#.. .#... .#... .#... ..#.. ...#.',
  ')': '.#... ..#.. ...#. ...#. ...#. ..#.. .#...',
  '/': '..... ....# ...#. ..#.. .#... #.... .....',
  '|': '..#.. ..#.. ..#.. ..#.. ..#.. ..#.. ..#..',
  '=': '..... ..... ##### ..... ##### ..... .....',
  '+': '..... ..#.. ..#.. ##### ..#.. ..#.. .....',
  "'": '..#.. ..#.. .#... ..... ..... ..... .....',
  '<': '...#. ..#.. .#... #.... .#... ..#.. ...#.',
  '>': '.#... ..#.. ...#. ....# ...#. ..#.. .#...',
  '%': '##... ##..# ...#. ..#.. .#... #..## ...##',
  '?': '.###. #...# ....# ...#. ..#.. ..... ..#..',
};

// Latin letters that NFD does not split into a base letter and a mark.
const LATIN_EXTRA: Record<string, string> = { ß: 'ss', ẞ: 'SS', æ: 'ae', Æ: 'AE', œ: 'oe', Œ: 'OE', ø: 'o', Ø: 'O', ł: 'l', Ł: 'L', đ: 'd', Đ: 'D', ı: 'i' };

/**
 * `text` as the font can draw it: accents dropped ("Jürgen" -> "Jurgen", NFD's letter without
 * its combining marks) rather than drawn as '?' ("J?rgen"), which made annotators named
 * "Zoé" and "Zoë" alike unreadable. Characters with no Latin base stay and are drawn as '?'.
 */
export function drawableText(text: string): string {
  return text
    .normalize('NFD')
    .replace(/\p{M}/gu, '')
    .replace(/[ßẞæÆœŒøØłŁđĐı]/g, (ch) => LATIN_EXTRA[ch]);
}

/** Whether `ch` (one character of drawableText's output) has a glyph of its own, not '?'. */
export function hasGlyph(ch: string): boolean {
  return ch.toUpperCase() in GLYPHS;
}

/** The glyph of `ch` as 7 rows of 5 booleans (lower case as upper case; unknown characters as '?'). */
export function glyph(ch: string): boolean[][] {
  const rows = (GLYPHS[ch.toUpperCase()] ?? GLYPHS['?']).split(' ');
  return rows.map((row) => [...row].map((c) => c === '#'));
}

/** Width in pixels of `text` drawn at `scale` (no gap after the last glyph). */
export function textWidth(text: string, scale = 1): number {
  const n = [...drawableText(text)].length;
  return n === 0 ? 0 : (n * (GLYPH_W + GLYPH_GAP) - GLYPH_GAP) * scale;
}

/** Height in pixels of one line of text at `scale`. */
export function textHeight(scale = 1): number {
  return GLYPH_H * scale;
}

/** The longest start of `text` (ending in '..' when cut) that fits `width` pixels at `scale`. */
export function fitText(text: string, width: number, scale = 1): string {
  text = drawableText(text);
  if (textWidth(text, scale) <= width) return text;
  const chars = [...text];
  for (let n = chars.length - 1; n > 0; n--) {
    const cut = chars.slice(0, n).join('').trimEnd() + '..';
    if (textWidth(cut, scale) <= width) return cut;
  }
  return '';
}

/** Draws `text` into an RGB image with its top-left corner at (x, y); pixels outside the image are skipped. */
export function drawText(image: PngImage, x: number, y: number, text: string, color: readonly [number, number, number], scale = 1): void {
  if (image.channels !== 3) throw new RangeError(`drawText needs an RGB image, got ${image.channels} channel(s)`);
  if (!Number.isInteger(scale) || scale < 1) throw new RangeError(`text scale ${scale} must be an integer >= 1`);
  let left = x;
  for (const ch of drawableText(text)) {
    const g = glyph(ch);
    for (let gy = 0; gy < GLYPH_H; gy++) {
      for (let gx = 0; gx < GLYPH_W; gx++) {
        if (!g[gy][gx]) continue;
        for (let sy = 0; sy < scale; sy++) {
          const py = y + gy * scale + sy;
          if (py < 0 || py >= image.height) continue;
          for (let sx = 0; sx < scale; sx++) {
            const px = left + gx * scale + sx;
            if (px >= 0 && px < image.width) image.data.set(color, (py * image.width + px) * 3);
          }
        }
      }
    }
    left += (GLYPH_W + GLYPH_GAP) * scale;
  }
}
