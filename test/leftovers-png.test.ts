// PNGs whose IDAT zlib stream is not the textbook one, decided with PIL as the oracle: the files
// are written by Python (zlib + struct), and PIL (ImageFile.LOAD_TRUNCATED_IMAGES off, its
// default) says which it reads; the pixels they hold are known from how they were made. And
// the up-front check that a folder's PNGs are whole (pngEndsWithIend), before predict or eval
// writes anything.
import * as fs from 'fs';
import * as path from 'path';
import * as zlib from 'zlib';
import t from 'tap';
import { missingPythonModules, runPythonJson } from './helpers/python';
import { tempDir } from './helpers/files';
import { PNG_EXTRA_IMAGE_DATA, PngError, decodePng, encodePng, pngChunk, pngEndsWithIend } from '../src/data/png';
import { openImagesToPredict } from '../src/data/image-files';
import type { CheckpointInfo } from '../src/model/checkpoint-info';

const skip = missingPythonModules('PIL', 'numpy');

/**
 * Writes each case's file into argv[1] and prints, per case: PIL's verdict, whether PIL's
 * pixels are the ones encoded, and those samples (row by row, channels interleaved).
 */
const CRAFT = String.raw`
import io, json, os, struct, sys, zlib
import numpy as np
from PIL import Image, ImageFile
ImageFile.LOAD_TRUNCATED_IMAGES = False
out = sys.argv[1]
def chunk(t, d): return struct.pack('>I', len(d)) + t + d + struct.pack('>I', zlib.crc32(t + d) & 0xffffffff)
def png(w, h, colour, idats, crc_bad=False):
    parts = [b'\x89PNG\r\n\x1a\n', chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, 8, colour, 0, 0, 0))]
    for d in idats:
        c = chunk(b'IDAT', d)
        if crc_bad: c = c[:-1] + bytes([c[-1] ^ 1])
        parts.append(c)
    parts.append(chunk(b'IEND', b''))
    return b''.join(parts)
rng = np.random.default_rng(3)
images = {'gray': (10, 10, 0, 1), 'rgb': (9, 7, 2, 3)}
result = {}
for kind, (w, h, colour, ch) in images.items():
    pixels = rng.integers(0, 256, size=(h, w * ch), dtype=np.uint8)
    raw = bytearray()
    for y in range(h):
        row = pixels[y].astype(np.int32)
        sub = (row - np.concatenate([np.zeros(ch, np.int32), row[:-ch]])) & 0xff  # filter 1 (Sub)
        raw += bytes([1]) + bytes(sub.astype(np.uint8))
    raw = bytes(raw)
    z = zlib.compress(raw, 9)
    cases = {
        'whole': [z],
        'ten extra bytes': [zlib.compress(raw + bytes(range(10)), 9)],
        'extra rows (100 KiB)': [zlib.compress(raw + b'\x00' * (100 << 10), 9)],
        'no adler-32': [z[:-4]],
        'half an adler-32': [z[:-2]],
        'no adler-32, three IDATs': [z[:5], z[5:9], z[9:-4]],
        'data after the stream': [z + b'trailing'],
        'wrong adler-32': [z[:-4] + bytes([z[-4] ^ 1]) + z[-3:]],
        'too few bytes': [zlib.compress(raw[: len(raw) // 2], 9)],
        'deflate cut in half': [z[: len(z) // 2]],
        'corrupt deflate': [z[:2] + b'\xff\xff\xff\xff' + z[6:]],
        'bad zlib header': [b'\x78\x00' + z[2:]],
    }
    for name, idats in cases.items():
        key = kind + ': ' + name
        data = png(w, h, colour, idats)
        with open(os.path.join(out, key.replace(' ', '_').replace(':', '') + '.png'), 'wb') as f: f.write(data)
        try:
            im = Image.open(io.BytesIO(data)); im.load()
            verdict = {'pil': 'reads', 'pilSame': bool(np.array_equal(np.asarray(im).reshape(h, w * ch), pixels))}
        except Exception as e:
            verdict = {'pil': 'refuses', 'why': str(e)}
        result[key] = dict(verdict, file=key.replace(' ', '_').replace(':', '') + '.png', samples=pixels.reshape(-1).tolist())
print(json.dumps(result))
`;

interface Verdict {
  pil: 'reads' | 'refuses';
  pilSame?: boolean;
  why?: string;
  file: string;
  samples: number[];
}

t.test('PNG: image data PIL reads is read with its pixels, what PIL refuses is refused', { skip }, async (t) => {
  const dir = tempDir(t, 'cmseg-leftovers-png-');
  const verdicts = runPythonJson<Record<string, Verdict>>(CRAFT, [dir]);
  // The oracle says what the brief expects of it (a PIL that changed its mind would change the test).
  for (const kind of ['gray', 'rgb']) {
    for (const name of ['whole', 'ten extra bytes', 'extra rows (100 KiB)', 'no adler-32', 'half an adler-32', 'no adler-32, three IDATs', 'data after the stream']) {
      t.same([verdicts[`${kind}: ${name}`].pil, verdicts[`${kind}: ${name}`].pilSame], ['reads', true], `PIL reads ${kind}: ${name} with its pixels`);
    }
    for (const name of ['wrong adler-32', 'too few bytes', 'deflate cut in half', 'corrupt deflate', 'bad zlib header']) {
      const v = verdicts[`${kind}: ${name}`];
      // gray's "too few bytes" is 5 whole rows of 10: PIL reads it, the other rows black.
      t.ok(v.pil === 'refuses' || v.pilSame === false, `PIL refuses ${kind}: ${name}, or reads wrong pixels`);
    }
  }
  t.same([verdicts['gray: too few bytes'].pil, verdicts['gray: too few bytes'].pilSame], ['reads', false], "PIL reads a stream that ends on a row's end, the rows missing black");
  for (const [key, verdict] of Object.entries(verdicts)) {
    const bytes = fs.readFileSync(path.join(dir, verdict.file));
    // Read when PIL reads the right pixels; refused when PIL refuses it or reads wrong pixels.
    if (verdict.pil === 'reads' && verdict.pilSame) {
      let samples: number[] | undefined;
      try {
        samples = Array.from(decodePng(bytes, key).samples);
      } catch (error) {
        t.fail(`${key}: PIL reads it, decodePng refused it: ${(error as Error).message}`);
        continue;
      }
      t.same(samples, verdict.samples, `${key}: the encoded pixels`);
    } else {
      t.throws(() => decodePng(bytes, key), PngError, `${key}: refused (PIL: ${verdict.why})`);
    }
  }
  // Refusals say what is wrong: a short stream gives its sizes.
  const short = fs.readFileSync(path.join(dir, verdicts['gray: deflate cut in half'].file));
  t.throws(() => decodePng(short, 'cut.png'), { message: /cut\.png: image data has \d+ bytes, 10x10 needs 110 \(the file is cut short/ });
  const adler = fs.readFileSync(path.join(dir, verdicts['gray: wrong adler-32'].file));
  t.throws(() => decodePng(adler, 'adler.png'), { message: /adler\.png: image data does not inflate: incorrect data check/ });
});

t.test('PNG: image data far past the image is still refused without inflating it all (decompression bomb)', async (t) => {
  // PIL reads this too (it stops at the image's bytes); zlib here cannot stop part way, so the
  // stream is inflated at most PNG_EXTRA_IMAGE_DATA past the image, and past that it is refused.
  const raw = Buffer.alloc(110); // filter bytes and pixels all 0
  const png = encodePng({ width: 10, height: 10, channels: 1, data: new Uint8Array(100) });
  // Swap the encoded IDAT for one of the image's 110 bytes plus 2 MiB of zeros.
  const idatAt = png.indexOf('IDAT') - 4;
  const bomb = Buffer.concat([png.subarray(0, idatAt), pngChunk('IDAT', zlib.deflateSync(Buffer.concat([raw, Buffer.alloc(2 * PNG_EXTRA_IMAGE_DATA)]))), pngChunk('IEND', new Uint8Array(0))]);
  const before = process.memoryUsage().arrayBuffers;
  t.throws(() => decodePng(bomb, 'bomb.png'), { message: /bomb\.png: image data inflates to more than the 110 bytes a 10x10 image needs, by over 1048576 bytes/ });
  t.ok(process.memoryUsage().arrayBuffers - before < 8 * PNG_EXTRA_IMAGE_DATA, 'not inflated whole');
  // Just under the bound: read, the extra bytes ignored.
  const under = Buffer.concat([png.subarray(0, idatAt), pngChunk('IDAT', zlib.deflateSync(Buffer.concat([raw, Buffer.alloc(PNG_EXTRA_IMAGE_DATA - 1000)]))), pngChunk('IEND', new Uint8Array(0))]);
  t.same(Array.from(decodePng(under).data), new Array(100).fill(0));
});

/** A 2D checkpoint's info as openImagesToPredict reads it (no model file is opened). */
function fakeInfo(annotatorNames: string[]): CheckpointInfo {
  return {
    file: 'model.safetensors',
    config: { ndim: 2, inChannels: 1, classes: 2, annotators: annotatorNames.length, depth: 2 },
    step: 1,
    learnsCms: true,
    annotatorNames,
    namesRecorded: true,
  } as unknown as CheckpointInfo;
}

t.test('predict/eval --data: a PNG cut part way in a later batch is named before the first batch is read', { skip }, async (t) => {
  const dir = tempDir(t, 'cmseg-leftovers-png-');
  // 20 images (predict reads 16 a batch), each with a label map; PIL writes them, and says
  // which it reads once one image and one label map are cut and one image has bytes after IEND.
  const pil = runPythonJson<Record<string, string>>(
    String.raw`
import os, sys, json, io
import numpy as np
from PIL import Image
root = sys.argv[1]
for d in ['whole/images', 'whole/labels/r1']: os.makedirs(os.path.join(root, d))
rng = np.random.default_rng(1)
for i in range(20):
    Image.fromarray(rng.integers(0, 256, (6, 8), dtype=np.uint8)).save(f'{root}/whole/images/{i:02d}.png')
    Image.fromarray((rng.integers(0, 2, (6, 8)) * 255).astype(np.uint8)).save(f'{root}/whole/labels/r1/{i:02d}.png')
import shutil
for name in ['cut-image', 'cut-label', 'tail']: shutil.copytree(f'{root}/whole', f'{root}/{name}')
def cut(f):  # half the file: part of the image data is gone
    b = open(f, 'rb').read(); open(f, 'wb').write(b[: len(b) // 2])
cut(f'{root}/cut-image/images/18.png')
cut(f'{root}/cut-label/labels/r1/19.png')
with open(f'{root}/tail/images/17.png', 'ab') as f: f.write(b'written after IEND by some tool')
def verdict(f):
    try:
        Image.open(f).load(); return 'reads'
    except Exception as e:
        return 'refuses: ' + str(e)
print(json.dumps({k: verdict(f'{root}/{k}') for k in ['cut-image/images/18.png', 'cut-label/labels/r1/19.png', 'tail/images/17.png']}))
`,
    [dir],
  );
  t.match(pil['cut-image/images/18.png'], /^refuses/, 'PIL refuses the cut image');
  t.match(pil['cut-label/labels/r1/19.png'], /^refuses/, 'PIL refuses the cut label map');
  t.equal(pil['tail/images/17.png'], 'reads', 'PIL reads a PNG with bytes after its IEND');
  const info = fakeInfo(['r1']);
  t.equal(openImagesToPredict(path.join(dir, 'whole'), info).count, 20);
  t.throws(() => openImagesToPredict(path.join(dir, 'cut-image'), info), { name: 'PngError', message: /cut-image\/images\/18\.png: (truncated|chunk \w+ at byte \d+ runs past the end).*: the file is cut short/ }, 'the cut image, before any batch');
  t.throws(() => openImagesToPredict(path.join(dir, 'cut-label'), info), { name: 'PngError', message: /cut-label\/labels\/r1\/19\.png: (truncated|chunk \w+ at byte \d+ runs past the end).*: the file is cut short/ }, 'the cut label map, before any batch');
  const tail = openImagesToPredict(path.join(dir, 'tail'), info);
  const whole = openImagesToPredict(path.join(dir, 'whole'), info);
  t.same(Array.from(tail.read(16, 4).images), Array.from(whole.read(16, 4).images), 'bytes after IEND: the same pixels');
});

t.test('pngEndsWithIend: the last 12 bytes only, 1000 files in milliseconds', async (t) => {
  const dir = tempDir(t, 'cmseg-leftovers-png-');
  const png = encodePng({ width: 64, height: 64, channels: 1, data: new Uint8Array(64 * 64).fill(9) });
  const files = Array.from({ length: 1000 }, (_, i) => path.join(dir, `${i}.png`));
  for (const file of files) fs.writeFileSync(file, png);
  fs.writeFileSync(files[999], png.subarray(0, png.length - 1)); // cut by one byte
  fs.writeFileSync(files[998], Buffer.concat([png.subarray(0, png.length - 12), Buffer.alloc(12)])); // zeros where IEND was
  const started = process.hrtime.bigint();
  const ends = files.map(pngEndsWithIend);
  const ms = Number(process.hrtime.bigint() - started) / 1e6;
  t.same([ends.slice(0, 998).every(Boolean), ends[998], ends[999]], [true, false, false]);
  t.equal(pngEndsWithIend(path.join(dir, 'missing.png')), false, 'a file that is not there');
  t.comment(`1000 files checked in ${ms.toFixed(1)} ms`);
  t.ok(ms < 500, `1000 files in ${ms.toFixed(1)} ms`);
});

t.test('predict/eval --data: a folder named like a PNG among the images is named', async (t) => {
  const dir = tempDir(t, 'cmseg-leftovers-png-');
  fs.mkdirSync(path.join(dir, 'images', 'zz.png'), { recursive: true });
  fs.writeFileSync(path.join(dir, 'images', 'a.png'), encodePng({ width: 4, height: 3, channels: 1, data: new Uint8Array(12) }));
  // The folder opens but does not read: the header read's EISDIR named no path ("cmseg: error: a path is a folder").
  t.throws(() => openImagesToPredict(dir, fakeInfo(['r1'])), { code: 'EISDIR', path: path.join(dir, 'images', 'zz.png'), message: /zz\.png is a folder, but a PNG image file was expected there/ });
});
