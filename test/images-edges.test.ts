// Edge cases of the 2D image path found by adversarial testing: PNG files whose image
// data inflates far past what the header declares (a few kilobytes that become
// gigabytes), and `cmseg fuse` outputs that would overwrite a rater's file or each other,
// go into folders that do not exist yet, or come from the mean's consensus.
import * as fs from 'fs';
import * as path from 'path';
import * as zlib from 'zlib';
import t from 'tap';
import { runCli } from './helpers/cli';
import { tempDir } from './helpers/files';
import { PngError, decodePng, pngChunk as chunk, readPng, writePng } from '../src/data/png';

/** A gray 8-bit PNG of the given header size whose IDAT holds `raw` (filter bytes included). */
function pngWithData(width: number, height: number, raw: Buffer): Buffer {
  const header = Buffer.alloc(13);
  header.writeUInt32BE(width, 0);
  header.writeUInt32BE(height, 4);
  header[8] = 8; // bit depth; colour type 0 (gray), no interlace
  const signature = Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);
  return Buffer.concat([signature, chunk('IHDR', header), chunk('IDAT', zlib.deflateSync(raw, { level: 9 })), chunk('IEND', new Uint8Array(0))]);
}

t.test('PNG: image data that inflates past the header size is refused, not inflated whole', async (t) => {
  // 10x10 needs 110 bytes; 64 MiB of zeros deflate to about 64 KiB.
  const bomb = pngWithData(10, 10, Buffer.alloc(64 << 20));
  t.ok(bomb.length < 100_000, `the file is small (${bomb.length} bytes)`);
  t.throws(() => decodePng(bomb, 'bomb.png'), { name: 'PngError', message: /bomb\.png: image data inflates to more than the 110 bytes a 10x10 image needs/ });
  // The exact size and a short stream still behave as before.
  const exact = Buffer.alloc(110);
  for (let y = 0; y < 10; y++) exact[y * 11 + 1] = 7; // filter 0, first pixel 7
  t.equal(decodePng(pngWithData(10, 10, exact)).data[10], 7);
  t.throws(() => decodePng(pngWithData(10, 10, Buffer.alloc(50)), 'short.png'), /short\.png: image data has 50 bytes, 10x10 needs 110/);
});

t.test('PNG: a huge declared size in a tiny file fails without allocating it', async (t) => {
  const file = pngWithData(100000, 100000, Buffer.alloc(1000));
  const before = process.memoryUsage().arrayBuffers;
  t.throws(() => decodePng(file, 'huge.png'), PngError);
  t.ok(process.memoryUsage().arrayBuffers - before < 64 << 20, 'no large buffer was made');
});

const MASKS = [
  [0, 255, 255, 0, 255, 0, 0, 255],
  [0, 255, 0, 0, 255, 255, 0, 255],
  [255, 255, 255, 0, 0, 0, 0, 255],
];

async function writeMasks(dir: string, maps: number[][] = MASKS): Promise<string[]> {
  return Promise.all(
    maps.map(async (m, r) => {
      const file = `r${r}.png`;
      await writePng(path.join(dir, file), { width: 4, height: 2, channels: 1, data: Uint8Array.from(m) });
      return file;
    }),
  );
}

t.test('fuse refuses to write an output over a rater\'s file or over another output', async (t) => {
  const dir = tempDir(t);
  const files = await writeMasks(dir);
  const before = fs.readFileSync(path.join(dir, 'r0.png'));
  const over = await runCli(['fuse', '-o', 'r0.png', ...files], dir);
  t.equal(over.exitCode, 1);
  t.match(over.stderr, /-o .*r0\.png is the input r0\.png: writing it would overwrite that rater's map/);
  t.same(fs.readFileSync(path.join(dir, 'r0.png')), before, 'the rater file is untouched');
  // Through a link, or as --posterior / --cms, too.
  fs.symlinkSync('r1.png', path.join(dir, 'link.png'));
  const linked = await runCli(['fuse', '--method', 'staple', '-o', 'out.png', '--posterior', 'link.png', ...files], dir);
  t.match(linked.stderr, /--posterior .*link\.png is the input r1\.png/);
  t.notOk(fs.existsSync(path.join(dir, 'out.png')), 'no consensus written either');
  const twice = await runCli(['fuse', '--method', 'staple', '-o', 'out.png', '--posterior', './out.png', ...files], dir);
  t.equal(twice.exitCode, 1);
  t.match(twice.stderr, /--posterior .*out\.png is also the file of -o: each output needs its own file/);
  t.notOk(fs.existsSync(path.join(dir, 'out.png')));
  const folder = await runCli(['fuse', '-o', 'sub.png', ...files], (fs.mkdirSync(path.join(dir, 'sub.png')), dir));
  t.match(folder.stderr, /-o .*sub\.png is a folder; name a file in it/);
});

t.test('fuse makes missing output folders, and writes nothing when one cannot be made', async (t) => {
  const dir = tempDir(t);
  const files = await writeMasks(dir);
  const run = await runCli(['fuse', '--method', 'staple', '-o', 'a/b/vote.png', '--posterior', 'c/p.png', '--cms', 'd/e/cms.json', ...files], dir);
  t.equal(run.exitCode, 0, run.stderr);
  t.same(Array.from((await readPng(path.join(dir, 'a/b/vote.png'))).data), [0, 255, 255, 0, 255, 0, 0, 255], 'the consensus of 0/255 raters as a 0/255 mask');
  t.ok(fs.existsSync(path.join(dir, 'c/p.png')));
  t.ok(fs.existsSync(path.join(dir, 'd/e/cms.json')));
  // --posterior's folder is under a file: refused before the consensus is written.
  fs.writeFileSync(path.join(dir, 'plain'), 'x');
  const blocked = await runCli(['fuse', '--method', 'staple', '-o', 'vote2.png', '--posterior', 'plain/p.png', ...files], dir);
  t.equal(blocked.exitCode, 1);
  t.match(blocked.stderr, /plain/);
  t.notOk(fs.existsSync(path.join(dir, 'vote2.png')), 'no consensus left behind');
});

t.test('fuse --method mean: unlabelled pixels stay 255 and ties follow --undecided, as with mode', async (t) => {
  const dir = tempDir(t);
  // Pixel 2: nobody labelled it; pixel 3: a three-way tie; pixel 1: a 2-1 majority.
  const files = await writeMasks(dir, [
    [0, 1, 255, 2],
    [0, 2, 255, 1],
    [1, 1, 255, 0],
  ].map((m) => [...m, 0, 0, 0, 0]));
  for (const method of ['mode', 'mean']) {
    const plain = await runCli(['fuse', '--method', method, '-o', `${method}.png`, ...files], dir);
    t.equal(plain.exitCode, 0, plain.stderr);
    t.same(Array.from((await readPng(path.join(dir, `${method}.png`))).data).slice(0, 4), [0, 1, 255, 0], `${method}: lowest tied class, 255 kept`);
    const undecided = await runCli(['fuse', '--method', method, '--undecided', '7', '-o', `${method}7.png`, ...files], dir);
    t.equal(undecided.exitCode, 0, undecided.stderr);
    t.same(Array.from((await readPng(path.join(dir, `${method}7.png`))).data).slice(0, 4), [0, 1, 255, 7], `${method}: the tie gets --undecided`);
  }
  const tooBig = await runCli(['fuse', '--method', 'mean', '--undecided', '300', '-o', 'big.png', ...files], dir);
  t.equal(tooBig.exitCode, 1);
  t.match(tooBig.stderr, /--undecided 300 is not a label: labels are 8-bit/);
  t.notOk(fs.existsSync(path.join(dir, 'big.png')));
  // Three classes: --posterior has no one foreground map to write, so it is refused, not class 1's.
  const multi = await runCli(['fuse', '--method', 'mean', '--posterior', 'p.png', '-o', 'm.png', ...files], dir);
  t.equal(multi.exitCode, 1);
  t.match(multi.stderr, /--posterior writes one foreground probability map, and this fusion has 3 classes/);
  t.notOk(fs.existsSync(path.join(dir, 'm.png')), 'no consensus left behind');
});
