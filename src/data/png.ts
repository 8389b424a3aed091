// PNG reading and writing, written here rather than pulled in as a dependency: we write
// segmentation and confusion-matrix pictures and read users' 2D datasets (image-folder.ts).
// Only zlib comes from node. Reference: the PNG specification (W3C, 2nd edition).
//
// Decoding: colour types gray, gray+alpha, RGB, RGBA and palette; bit depths 1, 2, 4, 8
// and 16; all five filter types; plain and Adam7-interlaced; chunk CRCs are checked; image
// data that inflates a little past the image, or a zlib stream without its adler-32, is read
// as PIL reads it (inflateImageData). A tRNS chunk is used for palette images only (gray
// and RGB colour keys are ignored: no alpha channel is made up). Encoding: 8-bit gray, gray+alpha, RGB, RGBA and palette, one
// filter for all rows or the adaptive choice per row.

import * as fs from 'fs';
import * as zlib from 'zlib';
import { constants as bufferConstants } from 'buffer';
import { readFileChecked, readFileCheckedSync, writeFileAtomic, writeFileAtomicSync } from './files';
import { arrayKind } from '../errors';

/** A PNG could not be decoded or encoded; the message names the file and the offending value. */
export class PngError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'PngError';
  }
}

export type PngChannels = 1 | 2 | 3 | 4;

/** An 8-bit image, samples interleaved per pixel, rows top to bottom. */
export interface PngImage {
  width: number;
  height: number;
  /** 1 gray, 2 gray + alpha, 3 RGB, 4 RGBA. */
  channels: PngChannels;
  data: Uint8Array;
}

/** IHDR colour types (PNG spec 11.2.2). */
export const PngColorType = { Gray: 0, Rgb: 2, Palette: 3, GrayAlpha: 4, Rgba: 6 } as const;
export type PngColorType = (typeof PngColorType)[keyof typeof PngColorType];

export interface DecodedPng extends PngImage {
  colorType: PngColorType;
  bitDepth: number;
  /**
   * The stored samples before any scaling: one per channel of the colour type (one
   * palette index per pixel for palette images). Uint16Array for 16-bit files. Label maps
   * are read from these, since scaling to 8 bits would change the label values.
   */
  samples: Uint8Array | Uint16Array;
  /** Palette images: RGB triples. */
  palette?: Uint8Array;
}

/** The largest Buffer (and typed array) node makes, in bytes. */
const MAX_LENGTH = bufferConstants.MAX_LENGTH;

const SIGNATURE = Uint8Array.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);

const CRC_TABLE = (() => {
  const table = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    table[n] = c >>> 0;
  }
  return table;
})();

/** CRC-32 (ISO 3309, the one PNG chunks carry) of the given byte ranges, in order. */
export function crc32(...parts: Uint8Array[]): number {
  let crc = 0xffffffff;
  for (const part of parts) {
    for (let i = 0; i < part.length; i++) crc = CRC_TABLE[(crc ^ part[i]) & 0xff] ^ (crc >>> 8);
  }
  return (crc ^ 0xffffffff) >>> 0;
}

const CHANNELS_OF: Record<number, PngChannels> = {
  [PngColorType.Gray]: 1,
  [PngColorType.Rgb]: 3,
  [PngColorType.Palette]: 1,
  [PngColorType.GrayAlpha]: 2,
  [PngColorType.Rgba]: 4,
};

const BIT_DEPTHS_OF: Record<number, readonly number[]> = {
  [PngColorType.Gray]: [1, 2, 4, 8, 16],
  [PngColorType.Rgb]: [8, 16],
  [PngColorType.Palette]: [1, 2, 4, 8],
  [PngColorType.GrayAlpha]: [8, 16],
  [PngColorType.Rgba]: [8, 16],
};

// ---------------------------------------------------------------------------------------
// Filters (PNG spec section 9). `a` left, `b` above, `c` above-left, by whole pixels of
// `bpp` bytes (at least one byte for bit depths below 8).

export type PngFilter = 0 | 1 | 2 | 3 | 4;

function paeth(a: number, b: number, c: number): number {
  const p = a + b - c;
  const pa = Math.abs(p - a);
  const pb = Math.abs(p - b);
  const pc = Math.abs(p - c);
  if (pa <= pb && pa <= pc) return a;
  return pb <= pc ? b : c;
}

function predictor(filter: PngFilter, a: number, b: number, c: number): number {
  switch (filter) {
    case 0:
      return 0;
    case 1:
      return a;
    case 2:
      return b;
    case 3:
      return (a + b) >>> 1;
    case 4:
      return paeth(a, b, c);
  }
}

/** Reverses a row's filter in place; `previous` is the already unfiltered row above (zeros for the first). */
function unfilterRow(filter: number, row: Uint8Array, previous: Uint8Array, bpp: number, where: string): void {
  if (filter < 0 || filter > 4) throw new PngError(`${where}: unknown filter type ${filter}`);
  // One loop per filter, the same arithmetic as predictor(): a call and a switch per byte
  // made decoding a 1024x1024 image take 40 ms, and a folder of thousands is read at every start.
  const n = row.length;
  const first = Math.min(bpp, n); // bytes with no left neighbour (a = c = 0)
  switch (filter) {
    case 0:
      return;
    case 1:
      for (let i = bpp; i < n; i++) row[i] = (row[i] + row[i - bpp]) & 0xff;
      return;
    case 2:
      for (let i = 0; i < n; i++) row[i] = (row[i] + previous[i]) & 0xff;
      return;
    case 3:
      for (let i = 0; i < first; i++) row[i] = (row[i] + (previous[i] >>> 1)) & 0xff;
      for (let i = first; i < n; i++) row[i] = (row[i] + ((row[i - bpp] + previous[i]) >>> 1)) & 0xff;
      return;
    case 4:
      for (let i = 0; i < first; i++) row[i] = (row[i] + previous[i]) & 0xff; // paeth(0, b, 0) = b
      for (let i = first; i < n; i++) row[i] = (row[i] + paeth(row[i - bpp], previous[i], previous[i - bpp])) & 0xff;
      return;
  }
}

function filterRow(filter: PngFilter, row: Uint8Array, previous: Uint8Array, bpp: number, out: Uint8Array): void {
  // One loop per filter (the arithmetic of predictor()): predict's pictures of a 1024x1024
  // image are sheets of 10 million RGB pixels, each row filtered five ways to choose one.
  const n = row.length;
  const first = Math.min(bpp, n); // bytes with no left neighbour (a = c = 0)
  switch (filter) {
    case 0:
      out.set(row.subarray(0, n));
      return;
    case 1:
      for (let i = 0; i < first; i++) out[i] = row[i];
      for (let i = first; i < n; i++) out[i] = (row[i] - row[i - bpp]) & 0xff;
      return;
    case 2:
      for (let i = 0; i < n; i++) out[i] = (row[i] - previous[i]) & 0xff;
      return;
    case 3:
      for (let i = 0; i < first; i++) out[i] = (row[i] - (previous[i] >>> 1)) & 0xff;
      for (let i = first; i < n; i++) out[i] = (row[i] - ((row[i - bpp] + previous[i]) >>> 1)) & 0xff;
      return;
    case 4:
      for (let i = 0; i < first; i++) out[i] = (row[i] - previous[i]) & 0xff;
      // paeth() inlined: a call per byte was most of this loop.
      for (let i = first; i < n; i++) {
        const a = row[i - bpp];
        const b = previous[i];
        const c = previous[i - bpp];
        const p = a + b - c;
        const pa = Math.abs(p - a);
        const pb = Math.abs(p - b);
        const pc = Math.abs(p - c);
        out[i] = (row[i] - (pa <= pb && pa <= pc ? a : pb <= pc ? b : c)) & 0xff;
      }
      return;
  }
}

/** A filtered byte's cost: its value read as signed, made positive. */
const byteCost = (d: number): number => ((d & 0xff) < 128 ? d & 0xff : 256 - (d & 0xff));

/**
 * The adaptive choice of filter for a row: of None, Sub, Up, Average and Paeth, the first with
 * the least cost (the sum of the filtered bytes read as signed: the spec's suggested heuristic), as filtering the row five ways and comparing would choose, but the
 * five costs are summed in one pass and nothing is written (filtering five times made the
 * filter choice half of a 1024x1024 picture's encoding). A row equal to the row above (every
 * upscaled picture's rows come in runs) is Up's, cost 0 (None and Sub tie at 0 only for a row
 * of zeros: then None), without the pass.
 */
function adaptiveFilter(row: Uint8Array, previous: Uint8Array, bpp: number, sameAsPrevious: boolean): PngFilter {
  const n = row.length;
  if (sameAsPrevious) {
    for (let i = 0; i < n; i++) if (row[i] !== 0) return 2;
    return 0;
  }
  const first = Math.min(bpp, n);
  let none = 0;
  let sub = 0;
  let up = 0;
  let average = 0;
  let paethCost = 0;
  for (let i = 0; i < first; i++) {
    const x = row[i];
    const b = previous[i];
    none += byteCost(x);
    sub += byteCost(x);
    up += byteCost(x - b);
    average += byteCost(x - (b >>> 1));
    paethCost += byteCost(x - b); // a = c = 0: Paeth predicts b
  }
  for (let i = first; i < n; i++) {
    const x = row[i];
    const a = row[i - bpp];
    const b = previous[i];
    const c = previous[i - bpp];
    none += byteCost(x);
    sub += byteCost(x - a);
    up += byteCost(x - b);
    average += byteCost(x - ((a + b) >>> 1));
    const p = a + b - c;
    const pa = Math.abs(p - a);
    const pb = Math.abs(p - b);
    const pc = Math.abs(p - c);
    paethCost += byteCost(x - (pa <= pb && pa <= pc ? a : pb <= pc ? b : c));
  }
  const costs = [none, sub, up, average, paethCost];
  let best = 0;
  for (let f = 1; f < 5; f++) if (costs[f] < costs[best]) best = f;
  return best as PngFilter;
}

/** Whether two rows hold the same bytes. */
function sameRow(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== b.length) return false;
  return Buffer.from(a.buffer, a.byteOffset, a.byteLength).equals(Buffer.from(b.buffer, b.byteOffset, b.byteLength));
}


// ---------------------------------------------------------------------------------------
// Decoding

interface Header {
  width: number;
  height: number;
  bitDepth: number;
  colorType: PngColorType;
  interlace: number;
}

function readHeader(data: Uint8Array, where: string): Header {
  if (data.length !== 13) throw new PngError(`${where}: IHDR has ${data.length} bytes, expected 13`);
  const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
  const header: Header = {
    width: view.getUint32(0),
    height: view.getUint32(4),
    bitDepth: data[8],
    colorType: data[9] as PngColorType,
    interlace: data[12],
  };
  if (header.width === 0 || header.height === 0) {
    throw new PngError(`${where}: image size ${header.width}x${header.height} is empty`);
  }
  const depths = BIT_DEPTHS_OF[header.colorType];
  if (!depths) throw new PngError(`${where}: unknown colour type ${header.colorType}`);
  if (!depths.includes(header.bitDepth)) {
    throw new PngError(`${where}: bit depth ${header.bitDepth} is not allowed for colour type ${header.colorType}`);
  }
  if (data[10] !== 0) throw new PngError(`${where}: unknown compression method ${data[10]}`);
  if (data[11] !== 0) throw new PngError(`${where}: unknown filter method ${data[11]}`);
  if (header.interlace !== 0 && header.interlace !== 1) throw new PngError(`${where}: unknown interlace method ${header.interlace}`);
  return header;
}

interface Chunks {
  header: Header;
  palette?: Uint8Array;
  transparency?: Uint8Array;
  compressed: Buffer;
}

/**
 * `bytes` bytes of a file, from its start or (`fromEnd`) ending at its end; undefined when it
 * cannot be opened or read, or is shorter. A folder opens but does not read (EISDIR, which
 * names no path): undefined, so that the caller's readPngSync says which path is a folder.
 */
function fileBytes(filePath: string, bytes: number, fromEnd = false): Buffer | undefined {
  let fd: number;
  try {
    fd = fs.openSync(filePath, 'r');
  } catch {
    return undefined;
  }
  try {
    const position = fromEnd ? fs.fstatSync(fd).size - bytes : 0;
    if (position < 0) return undefined;
    const out = Buffer.alloc(bytes);
    return fs.readSync(fd, out, 0, bytes, position) === bytes ? out : undefined;
  } catch {
    return undefined;
  } finally {
    fs.closeSync(fd);
  }
}

/**
 * A PNG file's width and height from its IHDR (the first 24 bytes), without reading the rest;
 * undefined when the file cannot be opened or does not start as a PNG (decoding it says why).
 * Lets a folder read a batch at a time check every file's size before the first batch.
 */
export function pngSizeSync(filePath: string): { width: number; height: number } | undefined {
  const head = fileBytes(filePath, 24);
  if (!head || !head.subarray(0, SIGNATURE.length).equals(SIGNATURE) || head.toString('latin1', 12, 16) !== 'IHDR') return undefined;
  return { width: head.readUInt32BE(16), height: head.readUInt32BE(20) };
}

/** The IEND chunk, the last 12 bytes of every whole PNG: length 0, its type, the CRC of its type. */
const IEND_CHUNK = Buffer.from([0, 0, 0, 0, 0x49, 0x45, 0x4e, 0x44, 0xae, 0x42, 0x60, 0x82]);

/**
 * Whether the file's last 12 bytes are an IEND chunk (false when it cannot be read), reading
 * those bytes only: a folder read a batch at a time (predict and eval --data) checks every file
 * with it before the first batch, so that a file cut part way (a copy that stopped) is named
 * before any output is written, not when its batch comes. False is not a refusal: a PNG with
 * bytes after its IEND is whole too (PIL and decodePng read it), so the caller decodes the file
 * to know (about 1000 files a few milliseconds: one open, fstat and a read of the last 20 bytes each: a file shorter than signature + IEND is no whole PNG).
 */
export function pngEndsWithIend(filePath: string): boolean {
  return fileBytes(filePath, SIGNATURE.length + IEND_CHUNK.length, true)?.subarray(SIGNATURE.length).equals(IEND_CHUNK) ?? false;
}

/** Whether the file at `filePath` starts with the PNG signature (false when it cannot be read). */
export function isPngFile(filePath: string): boolean {
  return fileBytes(filePath, SIGNATURE.length)?.equals(SIGNATURE) ?? false;
}

/**
 * What a file that is not a PNG is, from its first bytes: datasets ship JPEG, TIFF and BMP
 * files renamed .png, and a copy that stopped part way leaves an empty file; "bad signature"
 * alone did not say which.
 */
function notPngReason(bytes: Uint8Array): string {
  const starts = (...magic: number[]) => magic.every((b, i) => bytes[i] === b);
  if (bytes.length === 0) return 'an empty file (0 bytes: a copy or download that stopped?)';
  if (starts(0xff, 0xd8, 0xff)) return 'a JPEG file named .png: save it as a PNG (for label maps, from the original: JPEG compression changes label values)';
  if (starts(0x49, 0x49, 0x2a, 0x00) || starts(0x4d, 0x4d, 0x00, 0x2a)) return 'a TIFF file named .png: save it as a PNG';
  if (starts(0x42, 0x4d)) return 'a BMP file named .png: save it as a PNG';
  if (bytes.length < SIGNATURE.length && SIGNATURE.subarray(0, bytes.length).every((b, i) => bytes[i] === b)) return `the first ${bytes.length} bytes of a PNG file only (cut short)`;
  return 'not a PNG file (bad signature)';
}

function readChunks(bytes: Uint8Array, where: string): Chunks {
  for (let i = 0; i < SIGNATURE.length; i++) {
    if (bytes[i] !== SIGNATURE[i]) throw new PngError(`${where}: ${notPngReason(bytes)}`);
  }
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  let header: Header | undefined;
  let palette: Uint8Array | undefined;
  let transparency: Uint8Array | undefined;
  const idat: Uint8Array[] = [];
  let offset = SIGNATURE.length;
  let ended = false;
  while (!ended) {
    // A file that ends before its IEND is cut short (a copy or download that stopped), whatever
    // PIL makes of it: it reads one whose image data happens to be whole, unchecked (no CRC).
    if (offset + 12 > bytes.length) throw new PngError(`${where}: truncated at byte ${offset} (no IEND chunk): the file is cut short (a copy or download that stopped?)`);
    const length = view.getUint32(offset);
    const typeBytes = bytes.subarray(offset + 4, offset + 8);
    const type = String.fromCharCode(...typeBytes);
    const dataEnd = offset + 8 + length;
    if (dataEnd + 4 > bytes.length) {
      throw new PngError(`${where}: chunk ${type} at byte ${offset} runs past the end of the file (${bytes.length} bytes): the file is cut short (a copy or download that stopped?)`);
    }
    const data = bytes.subarray(offset + 8, dataEnd);
    const storedCrc = view.getUint32(dataEnd);
    const actualCrc = crc32(typeBytes, data);
    if (storedCrc !== actualCrc) {
      throw new PngError(`${where}: chunk ${type} at byte ${offset} has CRC ${hex(storedCrc)}, computed ${hex(actualCrc)}`);
    }
    if (header === undefined && type !== 'IHDR') throw new PngError(`${where}: first chunk is ${type}, expected IHDR`);
    switch (type) {
      case 'IHDR':
        header = readHeader(data, where);
        break;
      case 'PLTE':
        if (length % 3 !== 0 || length === 0 || length > 768) throw new PngError(`${where}: PLTE has ${length} bytes`);
        palette = data;
        break;
      case 'tRNS':
        transparency = data;
        break;
      case 'IDAT':
        idat.push(data);
        break;
      case 'IEND':
        ended = true;
        break;
      default:
        // Bit 5 of the first letter clear (upper case) marks a chunk a decoder must understand.
        if ((typeBytes[0] & 0x20) === 0) throw new PngError(`${where}: unknown critical chunk ${type}`);
    }
    offset = dataEnd + 4;
  }
  if (!header) throw new PngError(`${where}: no IHDR chunk`);
  if (idat.length === 0) throw new PngError(`${where}: no IDAT chunk`);
  return { header, palette, transparency, compressed: Buffer.concat(idat) };
}

function hex(value: number): string {
  return `0x${value.toString(16).padStart(8, '0')}`;
}

/** One pass of the image data: every `dx`-th pixel of every `dy`-th row from (x0, y0). */
interface ImagePass {
  index: number;
  x0: number;
  y0: number;
  dx: number;
  dy: number;
  width: number;
  height: number;
  /** Bytes per row, filter byte not included. */
  stride: number;
}

/** Adam7's seven passes (PNG spec 8.2): x0, y0, dx, dy. */
const ADAM7 = [
  [0, 0, 8, 8],
  [4, 0, 8, 8],
  [0, 4, 4, 8],
  [2, 0, 4, 4],
  [0, 2, 2, 4],
  [1, 0, 2, 2],
  [0, 1, 1, 2],
] as const;

/**
 * The passes the image data holds, in order: the whole image once, or Adam7's seven
 * sub-images. A pass with no pixels (a small image) has no rows and no filter bytes.
 */
function imagePasses(header: Header): ImagePass[] {
  const bitsPerPixel = CHANNELS_OF[header.colorType] * header.bitDepth;
  const grids = header.interlace === 1 ? ADAM7 : ([[0, 0, 1, 1]] as const);
  return grids
    .map(([x0, y0, dx, dy], index) => {
      const width = Math.max(0, Math.ceil((header.width - x0) / dx));
      const height = width === 0 ? 0 : Math.max(0, Math.ceil((header.height - y0) / dy));
      return { index: index + 1, x0, y0, dx, dy, width, height, stride: Math.ceil((width * bitsPerPixel) / 8) };
    })
    .filter((pass) => pass.height > 0);
}

/** Unpacks one unfiltered row into samples (bit depths below 8 hold several per byte). */
function unpackRow(row: Uint8Array, count: number, bitDepth: number, out: Uint8Array | Uint16Array, at: number): void {
  if (bitDepth === 8) {
    out.set(row.subarray(0, count), at);
  } else if (bitDepth === 16) {
    for (let i = 0; i < count; i++) out[at + i] = (row[2 * i] << 8) | row[2 * i + 1];
  } else {
    const perByte = 8 / bitDepth;
    const mask = (1 << bitDepth) - 1;
    for (let i = 0; i < count; i++) {
      const shift = 8 - bitDepth * ((i % perByte) + 1); // leftmost pixel in the high bits
      out[at + i] = (row[Math.floor(i / perByte)] >> shift) & mask;
    }
  }
}

/**
 * Refuses a header whose image could not be held in memory here (a Buffer or typed array
 * of at most buffer.constants.MAX_LENGTH bytes), before anything is inflated or allocated.
 */
function checkDecodedSize(rawBytes: number, largestArray: number, header: Header, where: string): void {
  const bytes = Math.max(rawBytes, largestArray);
  if (bytes > MAX_LENGTH) {
    throw new PngError(`${where}: a ${header.width}x${header.height} image of bit depth ${header.bitDepth} needs ${bytes} bytes decoded, more than the ${MAX_LENGTH} one array can hold`);
  }
}

/**
 * How many bytes past the image's own the IDAT stream may inflate to and still be read: PIL
 * (and libpng, with a warning) read a stream that holds more than the image and ignore the
 * rest, and some writers leave a few extra bytes or rows. More than this is refused (a wrong
 * header, or a decompression bomb: a few kilobytes of zeros inflate to gigabytes).
 */
export const PNG_EXTRA_IMAGE_DATA = 1 << 20;

/**
 * Inflates the IDAT stream, never past the `expected` bytes the header's size needs plus
 * PNG_EXTRA_IMAGE_DATA: an unbounded inflate lets a tiny file (or one whose header is wrong)
 * exhaust the memory before any size check runs. The stream's end is not required (Z_SYNC_FLUSH
 * returns what inflated so far): a stream cut after the image's bytes (PIL reads one without its
 * adler-32, as writers that stream PNGs out leave it) is read, and one cut before them comes back
 * short, for decodePng to refuse with the sizes. A wrong adler-32 or corrupt deflate data is
 * still refused, as PIL refuses it.
 */
function inflateImageData(compressed: Buffer, expected: number, header: Header, where: string): Buffer {
  const limit = Math.min(MAX_LENGTH, expected + PNG_EXTRA_IMAGE_DATA);
  try {
    return zlib.inflateSync(compressed, { maxOutputLength: Math.max(1, limit), finishFlush: zlib.constants.Z_SYNC_FLUSH });
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ERR_BUFFER_TOO_LARGE') {
      throw new PngError(
        `${where}: image data inflates to more than the ${expected} bytes a ${header.width}x${header.height} image needs, by over ${PNG_EXTRA_IMAGE_DATA} bytes (a wrong header, or data that is not this image's)`,
      );
    }
    throw new PngError(`${where}: image data does not inflate: ${(error as Error).message}`);
  }
}

/** Decodes a PNG file's bytes. `where` names the file in error messages. */
export function decodePng(bytes: Uint8Array, where = 'PNG'): DecodedPng {
  const { header, palette, transparency, compressed } = readChunks(bytes, where);
  const { width, height, bitDepth, colorType } = header;
  if (colorType === PngColorType.Palette && !palette) throw new PngError(`${where}: palette image without a PLTE chunk`);
  const samplesPerPixel = CHANNELS_OF[colorType];
  const bitsPerPixel = samplesPerPixel * bitDepth;
  const bpp = Math.max(1, bitsPerPixel >> 3);
  const passes = imagePasses(header);
  const expected = passes.reduce((sum, pass) => sum + pass.height * (pass.stride + 1), 0);
  const sampleCount = width * height * samplesPerPixel;
  checkDecodedSize(expected, sampleCount * (colorType === PngColorType.Palette ? 4 : bitDepth === 16 ? 2 : 1), header, where);
  const raw = inflateImageData(compressed, expected, header, where);
  if (raw.length < expected) {
    // Z_SYNC_FLUSH: a cut zlib stream lands here too, with the bytes it gave.
    throw new PngError(`${where}: image data has ${raw.length} bytes, ${width}x${height} needs ${expected} (the file is cut short, or its data is not this image's)`);
  }
  const samples = bitDepth === 16 ? new Uint16Array(sampleCount) : new Uint8Array(sampleCount);
  const rowSamples = bitDepth === 16 ? new Uint16Array(width * samplesPerPixel) : new Uint8Array(width * samplesPerPixel);
  let start = 0;
  for (const pass of passes) {
    // Each pass is a small image of its own: its first row is filtered against zeros.
    let previous: Uint8Array = new Uint8Array(pass.stride);
    const count = pass.width * samplesPerPixel;
    for (let y = 0; y < pass.height; y++, start += pass.stride + 1) {
      // A copy (unfiltering writes into it) made by the typed-array constructor: Uint8Array.from
      // iterates byte by byte, a third of the time of decoding a large image.
      const row = new Uint8Array(raw.subarray(start + 1, start + 1 + pass.stride));
      const imageY = pass.y0 + y * pass.dy;
      unfilterRow(raw[start], row, previous, bpp, `${where} row ${imageY}${passes.length > 1 ? ` (Adam7 pass ${pass.index})` : ''}`);
      if (pass.dx === 1) {
        unpackRow(row, count, bitDepth, samples, imageY * width * samplesPerPixel); // a whole row: straight into place
      } else {
        unpackRow(row, count, bitDepth, rowSamples, 0);
        for (let x = 0; x < pass.width; x++) {
          const at = (imageY * width + pass.x0 + x * pass.dx) * samplesPerPixel;
          for (let k = 0; k < samplesPerPixel; k++) samples[at + k] = rowSamples[x * samplesPerPixel + k];
        }
      }
      previous = row;
    }
  }
  if (colorType === PngColorType.Palette) {
    return expandPalette(header, samples as Uint8Array, palette as Uint8Array, transparency, where);
  }
  const maxSample = (1 << bitDepth) - 1;
  let data: Uint8Array;
  if (bitDepth === 8) {
    data = (samples as Uint8Array).slice(); // already 0..255 (a copy: callers may change one or the other)
  } else if (bitDepth === 16) {
    // Math.round(v * 255 / 65535) = round(v / 257) in integers (v / 257 is never a half), on a
    // Uint16Array known as such: the loop over the Uint8Array | Uint16Array union was most of
    // the time of decoding a 16-bit image.
    const wide = samples as Uint16Array;
    data = new Uint8Array(sampleCount);
    for (let i = 0; i < sampleCount; i++) data[i] = ((2 * wide[i] + 257) / 514) | 0;
  } else {
    const narrow = samples as Uint8Array;
    data = new Uint8Array(sampleCount);
    for (let i = 0; i < sampleCount; i++) data[i] = Math.round((narrow[i] * 255) / maxSample);
  }
  return { width, height, channels: samplesPerPixel, data, colorType, bitDepth, samples };
}

/** Palette images come back as RGB, or RGBA when a tRNS chunk gives alpha values. */
function expandPalette(
  header: Header,
  indices: Uint8Array,
  palette: Uint8Array,
  transparency: Uint8Array | undefined,
  where: string,
): DecodedPng {
  const entries = palette.length / 3;
  const channels: PngChannels = transparency ? 4 : 3;
  const data = new Uint8Array(indices.length * channels);
  for (let i = 0; i < indices.length; i++) {
    const index = indices[i];
    if (index >= entries) throw new PngError(`${where}: pixel ${i} uses palette index ${index}, the palette has ${entries} entries`);
    data[i * channels] = palette[3 * index];
    data[i * channels + 1] = palette[3 * index + 1];
    data[i * channels + 2] = palette[3 * index + 2];
    if (transparency) data[i * channels + 3] = index < transparency.length ? transparency[index] : 255;
  }
  return {
    width: header.width,
    height: header.height,
    channels,
    data,
    colorType: PngColorType.Palette,
    bitDepth: header.bitDepth,
    samples: indices,
    palette: Uint8Array.from(palette),
  };
}

// ---------------------------------------------------------------------------------------
// Encoding

export interface PngEncodeOptions {
  /** A filter for every row, or 'adaptive' (default): per row the one with the smallest cost. */
  filter?: PngFilter | 'adaptive';
  /** zlib level 0..9; default 6. */
  compressionLevel?: number;
  /** Write a palette image: `data` holds one index per pixel (channels 1), this holds RGB triples. */
  palette?: Uint8Array;
  /** Alpha per palette entry (tRNS); entries past its end are opaque. */
  paletteAlpha?: Uint8Array;
}

const COLOR_TYPE_OF: Record<PngChannels, PngColorType> = {
  1: PngColorType.Gray,
  2: PngColorType.GrayAlpha,
  3: PngColorType.Rgb,
  4: PngColorType.Rgba,
};

function checkImage(image: PngImage): void {
  const { width, height, channels, data } = image;
  if (!Number.isInteger(width) || !Number.isInteger(height) || width < 1 || height < 1 || width > 0x7fffffff || height > 0x7fffffff) {
    throw new PngError(`cannot encode a ${width}x${height} image`);
  }
  if (!(channels in COLOR_TYPE_OF)) throw new PngError(`channels ${channels} must be 1, 2, 3 or 4`);
  // 8-bit samples only: a Float32Array's 0.5 would be stored as 0 and a Uint16Array's 300 as 44.
  if (!(data instanceof Uint8Array)) {
    throw new PngError(`image data is ${arrayKind(data)}: PNG samples are written from a Uint8Array (0..255)`);
  }
  if (data.length !== width * height * channels) {
    throw new PngError(`image data has ${data.length} bytes, ${width}x${height}x${channels} needs ${width * height * channels}`);
  }
}

function checkPalette(image: PngImage, palette: Uint8Array, alpha: Uint8Array | undefined): void {
  if (image.channels !== 1) throw new PngError(`a palette image holds one index per pixel, got channels ${image.channels}`);
  const entries = palette.length / 3;
  if (!Number.isInteger(entries) || entries < 1 || entries > 256) {
    throw new PngError(`palette has ${palette.length} bytes, expected 3 per entry and 1..256 entries`);
  }
  if (alpha && alpha.length > entries) throw new PngError(`paletteAlpha has ${alpha.length} entries, the palette ${entries}`);
  for (let i = 0; i < image.data.length; i++) {
    if (image.data[i] >= entries) throw new PngError(`pixel ${i} uses palette index ${image.data[i]}, the palette has ${entries} entries`);
  }
}

/** One chunk: length, type, data, CRC of type and data (PNG spec 5.3). */
export function pngChunk(type: string, data: Uint8Array): Buffer {
  const out = Buffer.alloc(12 + data.length);
  out.writeUInt32BE(data.length, 0);
  out.write(type, 4, 'latin1');
  out.set(data, 8);
  out.writeUInt32BE(crc32(out.subarray(4, 8 + data.length)), 8 + data.length);
  return out;
}

/** Encodes an 8-bit image as PNG bytes. */
export function encodePng(image: PngImage, options: PngEncodeOptions = {}): Buffer {
  checkImage(image);
  const { width, height, channels, data } = image;
  const filterChoice = options.filter ?? 'adaptive';
  if (filterChoice !== 'adaptive' && ![0, 1, 2, 3, 4].includes(filterChoice)) {
    throw new PngError(`filter ${String(filterChoice)} must be 0..4 or 'adaptive'`);
  }
  const { palette, paletteAlpha } = options;
  if (palette) checkPalette(image, palette, paletteAlpha);
  const colorType = palette ? PngColorType.Palette : COLOR_TYPE_OF[channels];
  const stride = width * channels;
  const filtered = Buffer.alloc(height * (stride + 1));
  let previous: Uint8Array = new Uint8Array(stride);
  for (let y = 0; y < height; y++) {
    const row = data.subarray(y * stride, (y + 1) * stride);
    // Palette indices are not magnitudes, so predicting them gains nothing (spec 12.8).
    const same = filterChoice === 'adaptive' && !palette && y > 0 && sameRow(row, previous);
    const best: PngFilter = filterChoice !== 'adaptive' ? filterChoice : palette ? 0 : adaptiveFilter(row, previous, channels, same);
    const at = y * (stride + 1);
    filtered[at] = best;
    // The winner alone is filtered, straight into its place; Up of a repeated row is zeros, as allocated.
    if (!(same && best === 2)) filterRow(best, row, previous, channels, filtered.subarray(at + 1, at + 1 + stride));
    previous = row;
  }
  const header = Buffer.alloc(13);
  header.writeUInt32BE(width, 0);
  header.writeUInt32BE(height, 4);
  header[8] = 8;
  header[9] = colorType;
  const level = options.compressionLevel ?? 6;
  const parts = [Buffer.from(SIGNATURE), pngChunk('IHDR', header)];
  if (palette) parts.push(pngChunk('PLTE', palette));
  if (palette && paletteAlpha) parts.push(pngChunk('tRNS', paletteAlpha));
  parts.push(pngChunk('IDAT', zlib.deflateSync(filtered, { level })), pngChunk('IEND', new Uint8Array(0)));
  return Buffer.concat(parts);
}

// ---------------------------------------------------------------------------------------
// Files

/** Writes a PNG atomically (readers never see half a file). */
export async function writePng(filePath: string, image: PngImage, options?: PngEncodeOptions): Promise<void> {
  await writeFileAtomic(filePath, encodePng(image, options));
}

export function writePngSync(filePath: string, image: PngImage, options?: PngEncodeOptions): void {
  writeFileAtomicSync(filePath, encodePng(image, options));
}

export async function readPng(filePath: string): Promise<DecodedPng> {
  return decodePng(await readFileChecked(filePath, 'PNG image'), filePath);
}

export function readPngSync(filePath: string): DecodedPng {
  return decodePng(readFileCheckedSync(filePath, 'PNG image'), filePath);
}
