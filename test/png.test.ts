// PNG encoder/decoder, checked against itself and against PNGs written by an independent
// Python writer (zlib + struct only), plus the image-folder dataset reader built on it.
import t from 'tap';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { spawnSync } from 'child_process';
import {
  type PngChannels,
  type PngFilter,
  type PngImage,
  PngColorType,
  crc32,
  decodePng,
  encodePng,
  readPng,
  readPngSync,
  writePng,
  writePngSync,
} from '../src/data/png';
import { loadImageFolder } from '../src/data/image-folder';
import { Rng } from '../src/data/random';

/** The part of a tap test that tempDir needs. */
interface HasTeardown {
  teardown(cleanup: () => void): void;
}

function tempDir(t: HasTeardown, prefix: string): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/** A smooth gradient plus noise, so that every filter type has something to predict. */
function testImage(width: number, height: number, channels: PngChannels, seed: number): PngImage {
  const rng = new Rng(seed);
  const data = new Uint8Array(width * height * channels);
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      for (let c = 0; c < channels; c++) {
        data[(y * width + x) * channels + c] = (x * 7 + y * 13 + c * 50 + rng.int(9)) & 0xff;
      }
    }
  }
  return { width, height, channels, data };
}

const PYTHON = spawnSync('python3', ['-c', 'import zlib, struct, json'], { encoding: 'utf8' });
const pythonMissing = PYTHON.status === 0 ? false : `python3 with zlib/struct/json is not available (${PYTHON.error?.message ?? PYTHON.stderr})`;

// An independent PNG writer and reader for cross-checking, using only Python's standard library.
const PYTHON_PNG = String.raw`
import json, struct, sys, zlib

def chunk(kind, data):
    return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data) & 0xffffffff)

def paeth(a, b, c):
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    if pa <= pb and pa <= pc:
        return a
    return b if pb <= pc else c

def predict(kind, a, b, c):
    return [0, a, b, (a + b) // 2, paeth(a, b, c)][kind]

def pack_row(samples, depth):
    if depth == 8:
        return bytes(samples)
    if depth == 16:
        return b''.join(struct.pack('>H', s) for s in samples)
    per = 8 // depth
    out = bytearray((len(samples) + per - 1) // per)
    for i, s in enumerate(samples):
        out[i // per] |= s << (8 - depth * (i % per + 1))
    return bytes(out)

CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}

ADAM7 = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]

def filtered_rows(rows, bpp):
    raw, prev = bytearray(), None
    for y, row in enumerate(rows):
        prev = prev or bytes(len(row))
        kind = y % 5  # every filter type, in turn
        raw.append(kind)
        for i in range(len(row)):
            a = row[i - bpp] if i >= bpp else 0
            c = prev[i - bpp] if i >= bpp else 0
            raw.append((row[i] - predict(kind, a, prev[i], c)) & 0xff)
        prev = row
    return raw

def write_png(path, width, height, depth, color, samples, extra=(), interlace=0, split=1):
    spp = CHANNELS[color]
    bpp = max(1, spp * depth // 8)
    pixel = lambda x, y: samples[(y * width + x) * spp:(y * width + x + 1) * spp]
    raw = bytearray()
    # Adam7 (PNG spec 8.2): seven sub-images, each filtered as an image of its own.
    for x0, y0, dx, dy in (ADAM7 if interlace else [(0, 0, 1, 1)]):
        xs, ys = range(x0, width, dx), range(y0, height, dy)
        if not xs or not ys:
            continue
        rows = [pack_row([v for x in xs for v in pixel(x, y)], depth) for y in ys]
        raw += filtered_rows(rows, bpp)
    data = zlib.compress(bytes(raw), 9)
    step = (len(data) + split - 1) // split
    idats = [chunk(b'IDAT', data[i:i + step]) for i in range(0, len(data), step)]
    header = struct.pack('>IIBBBBB', width, height, depth, color, 0, 0, interlace)
    body = chunk(b'IHDR', header) + b''.join(chunk(k, d) for k, d in extra) + b''.join(idats)
    with open(path, 'wb') as f:
        f.write(b'\x89PNG\r\n\x1a\n' + body + chunk(b'IEND', b''))

def read_png(path):
    blob = open(path, 'rb').read()
    assert blob[:8] == b'\x89PNG\r\n\x1a\n'
    pos, idat, header = 8, b'', None
    while pos < len(blob):
        (length,) = struct.unpack('>I', blob[pos:pos + 4])
        kind, data = blob[pos + 4:pos + 8], blob[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack('>I', blob[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + data) & 0xffffffff, 'bad CRC in ' + kind.decode()
        if kind == b'IHDR':
            header = struct.unpack('>IIBBBBB', data)
        if kind == b'IDAT':
            idat += data
        pos += 12 + length
    width, height, depth, color = header[:4]
    assert depth == 8
    spp = CHANNELS[color]
    stride = width * spp
    raw = zlib.decompress(idat)
    out, prev = [], bytes(stride)
    for y in range(height):
        kind = raw[y * (stride + 1)]
        row = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = row[i - spp] if i >= spp else 0
            c = prev[i - spp] if i >= spp else 0
            row[i] = (row[i] + predict(kind, a, prev[i], c)) & 0xff
        out.extend(row)
        prev = bytes(row)
    return {'width': width, 'height': height, 'colorType': color, 'samples': out}

if sys.argv[1] == 'read':
    print(json.dumps(read_png(sys.argv[2])))
    sys.exit(0)

folder, cases = sys.argv[2], json.loads(sys.stdin.read())
for case in cases:
    extra = [(k.encode(), bytes(v)) for k, v in case.get('extra', [])]
    write_png(folder + '/' + case['name'] + '.png', case['width'], case['height'], case['bitDepth'],
              case['colorType'], case['samples'], extra, case.get('interlace', 0), case.get('split', 1))
`;

function runPython(args: string[], input = ''): string {
  const result = spawnSync('python3', ['-c', PYTHON_PNG, ...args], { input, encoding: 'utf8' });
  if (result.status !== 0) throw new Error(`python3 failed: ${result.stderr}`);
  return result.stdout;
}

interface PythonCase {
  name: string;
  width: number;
  height: number;
  bitDepth: number;
  colorType: number;
  samples: number[];
  extra?: Array<[string, number[]]>;
  interlace?: number;
  split?: number;
}

function samplesFor(width: number, height: number, perPixel: number, maxValue: number, seed: number): number[] {
  const rng = new Rng(seed);
  return Array.from({ length: width * height * perPixel }, (_, i) => (i * 37 + rng.int(5)) % (maxValue + 1));
}

const PYTHON_CASES: PythonCase[] = [
  { name: 'gray8', width: 7, height: 6, bitDepth: 8, colorType: 0, samples: samplesFor(7, 6, 1, 255, 1) },
  { name: 'gray-alpha8', width: 5, height: 5, bitDepth: 8, colorType: 4, samples: samplesFor(5, 5, 2, 255, 2) },
  { name: 'rgb8', width: 6, height: 5, bitDepth: 8, colorType: 2, samples: samplesFor(6, 5, 3, 255, 3) },
  { name: 'rgba8', width: 4, height: 6, bitDepth: 8, colorType: 6, samples: samplesFor(4, 6, 4, 255, 4) },
  { name: 'gray16', width: 5, height: 5, bitDepth: 16, colorType: 0, samples: samplesFor(5, 5, 1, 65535, 5).map((v) => v * 1021 % 65536) },
  { name: 'rgba16', width: 3, height: 5, bitDepth: 16, colorType: 6, samples: samplesFor(3, 5, 4, 65535, 6).map((v) => v * 331 % 65536) },
  { name: 'gray1', width: 11, height: 5, bitDepth: 1, colorType: 0, samples: samplesFor(11, 5, 1, 1, 7) },
  { name: 'gray2', width: 7, height: 5, bitDepth: 2, colorType: 0, samples: samplesFor(7, 5, 1, 3, 8) },
  {
    name: 'palette4',
    width: 9,
    height: 5,
    bitDepth: 4,
    colorType: 3,
    samples: samplesFor(9, 5, 1, 4, 9),
    extra: [['PLTE', [0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255, 9, 99, 199]], ['tRNS', [0, 128]]],
  },
  { name: 'split-idat', width: 40, height: 30, bitDepth: 8, colorType: 0, samples: samplesFor(40, 30, 1, 255, 10), split: 4 },
  { name: 'interlaced', width: 4, height: 4, bitDepth: 8, colorType: 0, samples: samplesFor(4, 4, 1, 255, 11), interlace: 1 },
  // Adam7 with passes of partial bytes and empty passes (widths under 8), and with every pass full.
  { name: 'interlaced-2bit', width: 7, height: 5, bitDepth: 2, colorType: 0, samples: samplesFor(7, 5, 1, 3, 12), interlace: 1 },
  { name: 'interlaced-1x1', width: 1, height: 1, bitDepth: 8, colorType: 2, samples: samplesFor(1, 1, 3, 255, 13), interlace: 1 },
  { name: 'interlaced-rgba16', width: 19, height: 13, bitDepth: 16, colorType: 6, samples: samplesFor(19, 13, 4, 65535, 14), interlace: 1 },
];

t.test('CRC-32 of the IEND chunk type is the constant every PNG ends with', async (t) => {
  t.equal(crc32(Buffer.from('IEND')), 0xae426082);
  t.equal(crc32(Buffer.from('IE'), Buffer.from('ND')), 0xae426082, 'in parts');
});

t.test('encode -> decode round trip, every colour type and filter', async (t) => {
  const colorTypes: Record<PngChannels, number> = { 1: PngColorType.Gray, 2: PngColorType.GrayAlpha, 3: PngColorType.Rgb, 4: PngColorType.Rgba };
  const filters: Array<PngFilter | 'adaptive'> = [0, 1, 2, 3, 4, 'adaptive'];
  for (const channels of [1, 2, 3, 4] as const) {
    for (const filter of filters) {
      const image = testImage(13, 9, channels, channels * 10 + filters.indexOf(filter));
      const decoded = decodePng(encodePng(image, { filter }));
      t.same(
        { width: decoded.width, height: decoded.height, channels: decoded.channels, colorType: decoded.colorType, bitDepth: decoded.bitDepth },
        { width: 13, height: 9, channels, colorType: colorTypes[channels], bitDepth: 8 },
        `channels ${channels}, filter ${filter}: header`,
      );
      t.same(decoded.data, image.data, `channels ${channels}, filter ${filter}: pixels`);
      t.same(decoded.samples, image.data, `channels ${channels}, filter ${filter}: samples`);
    }
  }
  const single = decodePng(encodePng({ width: 1, height: 1, channels: 1, data: Uint8Array.from([200]) }));
  t.same(single.data, Uint8Array.from([200]), '1x1 image');
});

t.test('palette round trip, with and without transparency', async (t) => {
  const palette = Uint8Array.from([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255]);
  const indices = Uint8Array.from({ length: 20 }, (_, i) => i % 4);
  const image: PngImage = { width: 5, height: 4, channels: 1, data: indices };
  const opaque = decodePng(encodePng(image, { palette }));
  t.equal(opaque.colorType, PngColorType.Palette);
  t.equal(opaque.channels, 3, 'expanded to RGB');
  t.same(opaque.samples, indices, 'samples are the palette indices');
  t.same(opaque.palette, palette);
  t.same([...opaque.data.subarray(3, 6)], [255, 0, 0], 'index 1 is red');
  const alpha = decodePng(encodePng(image, { palette, paletteAlpha: Uint8Array.from([0, 100]) }));
  t.equal(alpha.channels, 4, 'tRNS gives RGBA');
  t.same([...alpha.data.subarray(0, 12)], [0, 0, 0, 0, 255, 0, 0, 100, 0, 255, 0, 255, ], 'alpha from tRNS, opaque past its end');
  t.throws(() => encodePng({ width: 1, height: 1, channels: 1, data: Uint8Array.from([4]) }, { palette }), /palette index 4, the palette has 4 entries/);
});

t.test('encoder rejects what it cannot write', async (t) => {
  t.throws(() => encodePng({ width: 2, height: 2, channels: 3, data: new Uint8Array(11) }), /11 bytes, 2x2x3 needs 12/);
  t.throws(() => encodePng({ width: 0, height: 2, channels: 1, data: new Uint8Array(0) }), /0x2 image/);
  t.throws(() => encodePng({ width: 1, height: 1, channels: 5 as PngChannels, data: new Uint8Array(5) }), /channels 5/);
});

t.test('decoder rejects broken files with a clear message', async (t) => {
  const good = encodePng(testImage(4, 4, 1, 0));
  t.throws(() => decodePng(Buffer.from('not a png at all'), 'x.png'), /x\.png: not a PNG file/);
  const badCrc = Buffer.from(good);
  badCrc[20] ^= 0xff; // inside IHDR's data
  t.throws(() => decodePng(badCrc, 'crc.png'), /crc\.png: chunk IHDR at byte 8 has CRC/);
  t.throws(() => decodePng(good.subarray(0, good.length - 20), 'cut.png'), /cut\.png: (truncated|chunk)/);
});

t.test('decodes PNGs written by Python (every filter, bit depth, colour type)', { skip: pythonMissing }, async (t) => {
  const dir = tempDir(t, 'cmseg-png-');
  runPython(['write', dir], JSON.stringify(PYTHON_CASES));
  for (const c of PYTHON_CASES) {
    const file = path.join(dir, `${c.name}.png`);
    const png = readPngSync(file);
    t.same(
      { width: png.width, height: png.height, bitDepth: png.bitDepth, colorType: png.colorType },
      { width: c.width, height: c.height, bitDepth: c.bitDepth, colorType: c.colorType },
      `${c.name}: header`,
    );
    t.same([...png.samples], c.samples, `${c.name}: samples`);
    if (c.colorType !== PngColorType.Palette) {
      const max = 2 ** c.bitDepth - 1;
      t.same([...png.data], c.samples.map((v) => Math.round((v * 255) / max)), `${c.name}: scaled to 8 bits`);
    }
  }
  const palette = readPngSync(path.join(dir, 'palette4.png'));
  t.equal(palette.channels, 4);
  const firstIndex = PYTHON_CASES[8].samples[0];
  const rgba = [[0, 0, 0, 0], [255, 0, 0, 128], [0, 255, 0, 255], [0, 0, 255, 255], [9, 99, 199, 255]][firstIndex];
  t.same([...palette.data.subarray(0, 4)], rgba, 'palette expanded with tRNS alpha');
});

t.test('Python decodes what we write', { skip: pythonMissing }, async (t) => {
  const dir = tempDir(t, 'cmseg-png-');
  for (const channels of [1, 2, 3, 4] as const) {
    const image = testImage(17, 11, channels, 100 + channels);
    const file = path.join(dir, `ours-${channels}.png`);
    await writePng(file, image);
    const decoded = JSON.parse(runPython(['read', file])) as { width: number; height: number; samples: number[] };
    t.same([decoded.width, decoded.height], [17, 11]);
    t.same(decoded.samples, [...image.data], `channels ${channels}`);
  }
});

t.test('file helpers write atomically and read back', async (t) => {
  const dir = tempDir(t, 'cmseg-png-');
  const image = testImage(8, 8, 3, 5);
  const file = path.join(dir, 'picture.png');
  writePngSync(file, image);
  t.same((await readPng(file)).data, image.data);
  await writePng(file, testImage(8, 8, 1, 6));
  t.equal(readPngSync(file).channels, 1, 'overwritten in place');
  t.same(fs.readdirSync(dir), ['picture.png'], 'no temp files left behind');
  await t.rejects(readPng(path.join(dir, 'missing.png')), /PNG image not found: .*missing\.png/);
});

// ---------------------------------------------------------------------------------------
// The image-folder dataset reader (src/data/image-folder.ts), which reads these PNGs.

function gray(width: number, height: number, value: (x: number, y: number) => number): PngImage {
  const data = new Uint8Array(width * height);
  for (let y = 0; y < height; y++) for (let x = 0; x < width; x++) data[y * width + x] = value(x, y);
  return { width, height, channels: 1, data };
}

function makeFolder(t: HasTeardown): string {
  const root = tempDir(t, 'cmseg-folder-');
  for (const dir of ['images', 'labels/rater-b', 'labels/rater-a']) fs.mkdirSync(path.join(root, dir), { recursive: true });
  const image = (n: number) => gray(6, 4, (x, y) => (n * 50 + x * 10 + y) % 256);
  const mask = (n: number) => gray(6, 4, (x, y) => (x > n && y > 0 ? 255 : 0));
  for (const [n, name] of ['c', 'a', 'b'].entries()) writePngSync(path.join(root, 'images', `${name}.png`), image(n));
  writePngSync(path.join(root, 'labels/rater-a/a.png'), mask(1));
  writePngSync(path.join(root, 'labels/rater-a/b.png'), mask(2));
  writePngSync(path.join(root, 'labels/rater-b/a.png'), mask(3));
  writePngSync(path.join(root, 'labels/rater-b/c.png'), mask(0));
  return root;
}

t.test('image folder: LIDC-style layout with missing annotations', async (t) => {
  const root = makeFolder(t);
  const batch = loadImageFolder(root);
  t.same(batch.names, ['a.png', 'b.png', 'c.png'], 'sorted by name');
  t.same(batch.annotators, ['rater-a', 'rater-b'], 'sorted by name');
  t.same(batch.extent, { d: 1, h: 4, w: 6 });
  t.equal(batch.count, 3);
  t.equal(batch.images.length, 3 * 1 * 4 * 6, 'images [N, 1, H, W]');
  t.same([...batch.present], [1, 1, 1, 0, 0, 1], 'present[n][r]');
  // a.png was written as image(1): value at (x=2, y=3) = 50 + 20 + 3.
  t.ok(Math.abs(batch.images[3 * 6 + 2] - 73 / 255) < 1e-6, 'intensity = value / 255');
  const a = batch.labels[0];
  t.equal(a[1 * 6 + 2], 1, '255 in a 0/255 mask is foreground (binary mapping for 2 classes)');
  t.equal(a[1 * 6 + 1], 0);
  t.ok(batch.labels[0].subarray(2 * 24).every((v) => v === 255), 'rater-a did not label c.png: 255');
  t.equal(batch.consensus, undefined, 'no consensus/ folder');

  const only = loadImageFolder(root, { annotators: ['rater-b'] });
  t.same(only.annotators, ['rater-b']);
  t.same([...only.present], [1, 0, 1]);
  const rgb = loadImageFolder(root, { imageChannels: 3 });
  t.equal(rgb.images.length, 3 * 3 * 24, 'gray repeated into 3 channels');
  t.equal(rgb.images[24 + 5], rgb.images[5], 'channel 1 equals channel 0');
});

t.test('image folder: multi-class palette labels and a consensus', async (t) => {
  const root = tempDir(t, 'cmseg-folder-');
  for (const dir of ['images', 'labels/x', 'consensus']) fs.mkdirSync(path.join(root, dir), { recursive: true });
  const colour: PngImage = { width: 3, height: 2, channels: 3, data: Uint8Array.from([255, 0, 0, 0, 255, 0, 0, 0, 255, 10, 10, 10, 0, 0, 0, 255, 255, 255]) };
  writePngSync(path.join(root, 'images/one.png'), colour);
  const palette = Uint8Array.from([0, 0, 0, 200, 0, 0, 0, 200, 0, 0, 0, 200]);
  const labels = Uint8Array.from([0, 1, 2, 3, 2, 1]);
  writePngSync(path.join(root, 'labels/x/one.png'), { width: 3, height: 2, channels: 1, data: labels }, { palette });
  writePngSync(path.join(root, 'consensus/one.png'), { width: 3, height: 2, channels: 1, data: Uint8Array.from([0, 1, 2, 3, 255, 0]) });
  const batch = loadImageFolder(root, { classes: 4 });
  t.same(batch.labels[0], labels, 'palette indices are the labels');
  t.same(batch.consensus, Uint8Array.from([0, 1, 2, 3, 255, 0]), 'value mapping keeps 255 as unlabelled');
  t.ok(Math.abs(batch.images[0] - 0.299) < 1e-6 && Math.abs(batch.images[1] - 0.587) < 1e-6, 'RGB to luma (Rec. 601)');
  t.equal(batch.images[5], 1);

  writePngSync(path.join(root, 'labels/x/one.png'), { width: 3, height: 2, channels: 1, data: Uint8Array.from([0, 1, 2, 3, 7, 1]) });
  t.throws(() => loadImageFolder(root, { classes: 4 }), /one\.png: label 7 at index 4 >= classes \(4\)/);
  writePngSync(path.join(root, 'labels/x/one.png'), colour);
  t.throws(() => loadImageFolder(root, { classes: 4 }), /pixel 0 is a colour \(255, 0, 0\)/);
  t.throws(() => loadImageFolder(root, { classes: 4, labelMapping: 'binary' }), /'binary' needs classes = 2/);
});

t.test('image folder: errors name the folder or file', async (t) => {
  const root = makeFolder(t);
  t.throws(() => loadImageFolder(path.join(root, 'nope')), /dataset folder not found: .*nope/);
  t.throws(() => loadImageFolder(root, { annotators: ['rater-z'] }), /annotator folder not found: .*rater-z/);
  writePngSync(path.join(root, 'labels/rater-a/zzz.png'), gray(6, 4, () => 0));
  t.throws(() => loadImageFolder(root), /zzz\.png has no image .*images.zzz\.png/);
  fs.rmSync(path.join(root, 'labels/rater-a/zzz.png'));
  writePngSync(path.join(root, 'labels/rater-b/a.png'), gray(5, 4, () => 0));
  t.throws(() => loadImageFolder(root), /rater-b.a\.png is 5x4, but .*images.a\.png is 6x4/);
  fs.rmSync(path.join(root, 'labels'), { recursive: true });
  t.throws(() => loadImageFolder(root), /no labels\/ folder in/);
  fs.rmSync(path.join(root, 'images'), { recursive: true });
  t.throws(() => loadImageFolder(root), /no images\/ folder in/);
});
