// `cmseg fuse` on the files users actually have: 0/255 PNG masks (what `cmseg simulate`
// and most image tools write), intensity images passed by mistake, NIfTI raters on
// different grids or with a 4th axis, and multi-label maps given to binary STAPLE.
import * as fs from 'fs';
import * as path from 'path';
import * as zlib from 'zlib';
import t from 'tap';
import { cliHelp, runCli } from './helpers/cli';
import { pngChunk, readPng, writePng } from '../src/data/png';
import { readNifti, writeNifti, type Matrix4 } from '../src/data/nifti';
import { tempDir } from './helpers/files';

/** Writes one 4x2 gray PNG per map; returns the file names. */
async function pngs(dir: string, maps: number[][], prefix = 'r'): Promise<string[]> {
  return Promise.all(
    maps.map(async (m, r) => {
      const file = `${prefix}${r}.png`;
      await writePng(path.join(dir, file), { width: 4, height: 2, channels: 1, data: Uint8Array.from(m) });
      return file;
    }),
  );
}

const consensusOf = async (file: string) => Array.from((await readPng(file)).data);

// Three raters' binary masks; the majority vote is [0, 1, 1, 0, 1, 0, 0, 1].
const BINARY = [
  [0, 1, 1, 0, 1, 0, 0, 1],
  [0, 1, 0, 0, 1, 1, 0, 1],
  [1, 1, 1, 0, 0, 0, 0, 1],
];
const VOTE = [0, 1, 1, 0, 1, 0, 0, 1];
const as255 = (maps: number[][]) => maps.map((m) => m.map((x) => 255 * x));

t.test('0/255 PNG masks: 255 is read as foreground, and stderr says so', async (t) => {
  const dir = tempDir(t);
  const files = await pngs(dir, as255(BINARY));
  for (const method of ['mode', 'mean', 'staple', 'multi-staple']) {
    const run = await runCli(['fuse', '--method', method, '-o', `${method}.png`, ...files], dir);
    t.equal(run.exitCode, 0, `${method}: ${run.stderr}`);
    t.same(await consensusOf(path.join(dir, `${method}.png`)), VOTE.map((x) => 255 * x), `${method}: the consensus of the masks, as a 0/255 mask`);
    t.match(run.stderr, /^note: rater maps are 0\/255 masks: 255 read as foreground \(1\)/m);
    t.match(run.stderr, /^note: the consensus is written as a 0\/255 mask, like its raters$/m);
  }
  // A tie label of 255 would read as foreground in a 0/255 mask: the consensus stays 0/1.
  const two = files.slice(0, 2); // r0 and r1 disagree at pixels 2 and 5
  const tied = await runCli(['fuse', '--method', 'mode', '--undecided', '255', '-o', 'tied.png', ...two], dir);
  t.equal(tied.exitCode, 0, tied.stderr);
  t.same(await consensusOf(path.join(dir, 'tied.png')), [0, 1, 255, 0, 1, 255, 0, 1]);
  t.match(tied.stderr, /--undecided 255 marks ties, so the consensus is written as 0\/1 labels/);
  const marked = await runCli(['fuse', '--method', 'mode', '--undecided', '7', '-o', 'marked.png', ...two], dir);
  t.same(await consensusOf(path.join(dir, 'marked.png')), [0, 255, 7, 0, 255, 7, 0, 255], 'another tie label is kept beside the 0/255 mask');
  // The CMs are estimated on the masks, not on "every foreground pixel unlabelled" (all perfect).
  const run = await runCli(['fuse', '--method', 'multi-staple', '-o', 'ms.png', '--cms', 'cms.json', ...files], dir);
  t.equal(run.exitCode, 0);
  const cms = JSON.parse(fs.readFileSync(path.join(dir, 'cms.json'), 'utf8')).cms as number[][][];
  t.ok(cms.some((cm) => cm[0][0] < 0.99 || cm[1][1] < 0.99), 'some rater is estimated imperfect');
});

/** A 16-bit gray PNG (filter 0 on every row), written here so the reader is not its own oracle. */
function png16(file: string, width: number, height: number, values: number[]): void {
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(width, 0);
  ihdr.writeUInt32BE(height, 4);
  ihdr[8] = 16; // bit depth
  ihdr[9] = 0; // gray
  const raw = Buffer.alloc(height * (1 + 2 * width));
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) raw.writeUInt16BE(values[y * width + x], y * (1 + 2 * width) + 1 + 2 * x);
  }
  const signature = Buffer.from([137, 80, 78, 71, 13, 10, 26, 10]);
  fs.writeFileSync(file, Buffer.concat([signature, pngChunk('IHDR', ihdr), pngChunk('IDAT', zlib.deflateSync(raw)), pngChunk('IEND', new Uint8Array(0))]));
}

t.test('16-bit 0/65535 masks are fused like 0/255 masks (training reads both as binary)', async (t) => {
  const dir = tempDir(t);
  const files = BINARY.map((m, r) => {
    png16(path.join(dir, `w${r}.png`), 4, 2, m.map((x) => 65535 * x));
    return `w${r}.png`;
  });
  const run = await runCli(['fuse', '--method', 'mode', '-o', 'vote.png', ...files], dir);
  t.equal(run.exitCode, 0, run.stderr);
  t.same(await consensusOf(path.join(dir, 'vote.png')), VOTE.map((x) => 255 * x));
  t.match(run.stderr, /^note: rater maps are 0\/65535 masks: 65535 read as foreground \(1\)/m);
  // Beside an 8-bit mask: both kinds named.
  const mixed = await runCli(['fuse', '--method', 'staple', '-o', 'staple.png', files[0], files[1], (await pngs(dir, as255(BINARY.slice(2)), 'e'))[0]], dir);
  t.equal(mixed.exitCode, 0, mixed.stderr);
  t.same(await consensusOf(path.join(dir, 'staple.png')), VOTE.map((x) => 255 * x));
  t.match(mixed.stderr, /rater maps are 0\/65535 or 0\/255 masks: 255 and 65535 read as foreground/);
  // A 16-bit map of small labels is a label map; a value past 8 bits is refused by name.
  png16(path.join(dir, 'l0.png'), 4, 2, [0, 1, 2, 0, 1, 0, 0, 1]);
  png16(path.join(dir, 'l1.png'), 4, 2, [0, 1, 2, 0, 2, 0, 0, 1]);
  png16(path.join(dir, 'l2.png'), 4, 2, [0, 1, 300, 0, 2, 0, 0, 1]);
  const labels = await runCli(['fuse', '--method', 'mode', '-o', 'labels.png', 'l0.png', 'l1.png'], dir);
  t.equal(labels.exitCode, 0, labels.stderr);
  t.same(await consensusOf(path.join(dir, 'labels.png')), [0, 1, 2, 0, 1, 0, 0, 1], 'tie at pixel 4 to the lowest class');
  const wide = await runCli(['fuse', '--method', 'mode', '-o', 'wide.png', 'l0.png', 'l2.png'], dir);
  t.equal(wide.exitCode, 1);
  t.match(wide.stderr, /l2\.png: label 300 at pixel 2 does not fit in 8 bits/);
});

t.test('--mask-255 unlabelled keeps 255 as unlabelled; foreground forces it for 0/1/255 maps', async (t) => {
  const dir = tempDir(t);
  const files = await pngs(dir, as255(BINARY));
  const run = await runCli(['fuse', '--method', 'mode', '--mask-255', 'unlabelled', '-o', 'vote.png', ...files], dir);
  t.equal(run.exitCode, 0, run.stderr);
  t.notMatch(run.stderr, /0\/255 masks/);
  // Only background votes count; pixels every rater left at 255 stay unlabelled.
  t.same(await consensusOf(path.join(dir, 'vote.png')), [0, 255, 0, 0, 0, 0, 0, 255]);

  // A 0/1 map with 255 = unlabelled is a label map: auto leaves its 255s alone.
  const mixed = await pngs(dir, [[0, 1, 255, 0, 1, 0, 0, 1], [0, 1, 255, 0, 1, 1, 0, 1]], 'm');
  const auto = await runCli(['fuse', '--method', 'mode', '-o', 'auto.png', ...mixed], dir);
  t.equal(auto.exitCode, 0, auto.stderr);
  t.notMatch(auto.stderr, /0\/255 masks/);
  t.same(await consensusOf(path.join(dir, 'auto.png')), [0, 1, 255, 0, 1, 0, 0, 1]);
  const forced = await runCli(['fuse', '--method', 'mode', '--mask-255', 'foreground', '-o', 'forced.png', ...mixed], dir);
  t.equal(forced.exitCode, 0, forced.stderr);
  t.same(await consensusOf(path.join(dir, 'forced.png')), [0, 1, 1, 0, 1, 0, 0, 1]);

  const multi = await pngs(dir, [[0, 2, 255, 0, 1, 0, 0, 1], [0, 1, 255, 0, 1, 1, 0, 1]], 'x');
  const refused = await runCli(['fuse', '--mask-255', 'foreground', '-o', 'x.png', ...multi], dir);
  t.equal(refused.exitCode, 1);
  t.match(refused.stderr, /--mask-255 foreground reads binary masks, but x0\.png holds label 2/);
  t.match(await cliHelp(['fuse', '--mask-255', 'sometimes', '-o', 'x.png', ...multi]), /Allowed choices are auto, foreground, unlabelled/);
});

t.test('an intensity image is refused as a label map unless --classes allows its values', async (t) => {
  const dir = tempDir(t);
  const gray = Array.from({ length: 8 }, (_, i) => i);
  await writePng(path.join(dir, 'image.png'), { width: 20, height: 5, channels: 1, data: Uint8Array.from({ length: 100 }, (_, i) => 2 * i) });
  await writePng(path.join(dir, 'mask.png'), { width: 20, height: 5, channels: 1, data: new Uint8Array(100) });
  const run = await runCli(['fuse', '-o', 'x.png', 'mask.png', 'image.png'], dir);
  t.equal(run.exitCode, 1);
  t.match(run.stderr, /cmseg: error: image\.png holds 100 distinct values \(0\.\.198\): an intensity image, not a label map\? If these are labels, pass --classes/);
  const allowed = await runCli(['fuse', '--classes', '199', '-o', 'x.png', 'mask.png', 'image.png'], dir);
  t.equal(allowed.exitCode, 0, allowed.stderr);
  const small = await runCli(['fuse', '--classes', '100', '-o', 'x.png', 'mask.png', 'image.png'], dir);
  t.equal(small.exitCode, 1);
  t.match(small.stderr, /image\.png: label 100 at index 50 >= classes \(100\): raise --classes/);
  // A few labels are fine without --classes.
  const files = await pngs(dir, [gray, gray]);
  t.equal((await runCli(['fuse', '-o', 'y.png', ...files], dir)).exitCode, 0);
});

async function nifti(dir: string, file: string, dims: number[], affine?: Matrix4, values?: number[]): Promise<string> {
  const n = dims.reduce((a, b) => a * b, 1);
  const data = Float32Array.from(values ?? Array.from({ length: n }, (_, i) => i % 2));
  await writeNifti(path.join(dir, file), { dims, data, ...(affine ? { affine } : {}) }, { datatype: 'uint8' });
  return file;
}

const AFFINE: Matrix4 = [[-1.2, 0, 0, 10], [0, 1, 0, -5], [0, 0, 1.5, 3], [0, 0, 0, 1]];

t.test('NIfTI raters on different grids are refused, naming both files and what differs', async (t) => {
  const dir = tempDir(t);
  const dims = [4, 3, 2];
  const r0 = await nifti(dir, 'r0.nii.gz', dims, AFFINE);
  const r1 = await nifti(dir, 'r1.nii.gz', dims, AFFINE);
  const same = await runCli(['fuse', '-o', 'ok.nii.gz', r0, r1], dir);
  t.equal(same.exitCode, 0, same.stderr);
  t.same((await readNifti(path.join(dir, 'ok.nii.gz'))).affine.map((row) => row.map((x) => +x.toFixed(4))), AFFINE);

  const identity = await nifti(dir, 'identity.nii.gz', dims, [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]);
  const spacing = await runCli(['fuse', '-o', 'x.nii.gz', r0, r1, identity], dir);
  t.equal(spacing.exitCode, 1);
  t.match(spacing.stderr, /cmseg: error: identity\.nii\.gz has voxels of 1x1x1 mm but r0\.nii\.gz has 1\.2x1x1\.5 mm: they put a voxel up to [\d.]+ mm apart, .* the raters are not on one grid/);

  const shifted: Matrix4 = AFFINE.map((row) => [...row]) as Matrix4;
  shifted[1][3] = -4;
  const moved = await nifti(dir, 'moved.nii.gz', dims, shifted);
  const origin = await runCli(['fuse', '-o', 'x.nii.gz', r0, moved], dir);
  t.equal(origin.exitCode, 1);
  t.match(origin.stderr, /moved\.nii\.gz has affine\[1\]\[3\] = -4 but r0\.nii\.gz has -5: they put a voxel up to 1\.00 mm apart, more than the tolerance of 0\.1 mm, so the raters are not on one grid \(if they are meant to be, allow it with --geometry-tolerance <mm>\)/);
  t.equal((await runCli(['fuse', '--geometry-tolerance', '1.5', '-o', 'z.nii.gz', r0, moved], dir)).exitCode, 0, 'a looser tolerance accepts it');
  // Tools that write one grid differ in the last float32 bits: tolerated as by prepare.
  const nudged: Matrix4 = AFFINE.map((row) => [...row]) as Matrix4;
  nudged[0][3] = 10.01;
  const close = await nifti(dir, 'close.nii.gz', dims, nudged);
  t.equal((await runCli(['fuse', '-o', 'y.nii.gz', r0, close], dir)).exitCode, 0);
});

t.test('shape errors say what differs, x (width) first', async (t) => {
  const dir = tempDir(t);
  const r0 = await nifti(dir, 'r0.nii.gz', [4, 3, 2], AFFINE);
  const r4d = await nifti(dir, 'r4d.nii.gz', [4, 3, 2, 2], AFFINE);
  const run = await runCli(['fuse', '-o', 'x.nii.gz', r4d, r0], dir);
  t.equal(run.exitCode, 1);
  t.match(run.stderr, /cmseg: error: r4d\.nii\.gz is 4D \(4x3x2x2\); fuse needs 2D or 3D label maps/);
  const other = await nifti(dir, 'other.nii.gz', [4, 3, 5], AFFINE);
  const shape = await runCli(['fuse', '-o', 'x.nii.gz', r0, other], dir);
  t.match(shape.stderr, /cmseg: error: other\.nii\.gz is 4x3x5, but r0\.nii\.gz is 4x3x2/);
  await writePng(path.join(dir, 'wide.png'), { width: 4, height: 2, channels: 1, data: new Uint8Array(8) });
  await writePng(path.join(dir, 'tall.png'), { width: 2, height: 4, channels: 1, data: new Uint8Array(8) });
  const png = await runCli(['fuse', '-o', 'x.png', 'wide.png', 'tall.png'], dir);
  t.match(png.stderr, /cmseg: error: tall\.png is 2x4, but wide\.png is 4x2/);
});

t.test('binary STAPLE on multi-label maps needs --foreground', async (t) => {
  const dir = tempDir(t);
  const dims = [4, 2, 1];
  const maps = [
    [0, 1, 2, 2, 0, 2, 1, 0],
    [0, 1, 2, 0, 0, 2, 2, 0],
    [0, 2, 2, 2, 1, 2, 1, 0],
  ];
  const files = await Promise.all(maps.map((m, r) => nifti(dir, `r${r}.nii.gz`, dims, AFFINE, m)));
  const run = await runCli(['fuse', '--method', 'staple', '-o', 'x.nii.gz', ...files], dir);
  t.equal(run.exitCode, 1);
  t.match(run.stderr, /--method staple is binary, but r0\.nii\.gz holds label 2: pass --foreground <label> .* or use --method multi-staple/);

  const fg = await runCli(['fuse', '--method', 'staple', '--foreground', '2', '-o', 'fg.nii.gz', '--cms', 'cms.json', ...files], dir);
  t.equal(fg.exitCode, 0, fg.stderr);
  t.same(Array.from((await readNifti(path.join(dir, 'fg.nii.gz'))).data), [0, 0, 1, 1, 0, 1, 0, 0], 'label 2 against the rest');
  t.equal(JSON.parse(fs.readFileSync(path.join(dir, 'cms.json'), 'utf8')).foreground, 2);

  // A label no rater drew fuses to all background (a case without a lesion): said, not refused.
  const absent = await runCli(['fuse', '--method', 'staple', '--foreground', '7', '-o', 'none.nii.gz', ...files], dir);
  t.equal(absent.exitCode, 0, absent.stderr);
  t.match(absent.stderr, /^note: --foreground 7: no rater map holds that label \(they hold 0, 1, 2\), so the consensus is all background$/m);
  t.ok((await readNifti(path.join(dir, 'none.nii.gz'))).data.every((x) => x === 0), 'all background');

  const forMode = await runCli(['fuse', '--method', 'mode', '--foreground', '2', '-o', 'x.nii.gz', ...files], dir);
  t.equal(forMode.exitCode, 1);
  t.match(forMode.stderr, /--foreground is for --method staple; mode fuses every class/);
  // Binary maps with --classes 3 would also leave a class out silently.
  const binary = await Promise.all(BINARY.map((m, r) => nifti(dir, `b${r}.nii.gz`, dims, AFFINE, m)));
  const classes = await runCli(['fuse', '--method', 'staple', '--classes', '3', '-o', 'x.nii.gz', ...binary], dir);
  t.equal(classes.exitCode, 1);
  t.match(classes.stderr, /--method staple is binary, but --classes is 3: pass --foreground/);
  t.equal((await runCli(['fuse', '--method', 'staple', '-o', 'b.nii.gz', ...binary], dir)).exitCode, 0);
});

t.test('a 0/255 map beside 3-class maps keeps 255 as unlabelled (the others set the class count)', async (t) => {
  const dir = tempDir(t);
  // m0 and m1 hold labels 0..2; m2 holds only 0 and 255: with 3 classes its 255 is "unlabelled".
  const files = await pngs(dir, [
    [0, 1, 2, 2, 0, 1, 1, 0],
    [0, 1, 2, 1, 0, 1, 2, 0],
    [0, 255, 255, 255, 0, 255, 255, 0],
  ]);
  const run = await runCli(['fuse', '--method', 'mode', '-o', 'vote.png', ...files], dir);
  t.equal(run.exitCode, 0, run.stderr);
  t.notMatch(run.stderr, /0\/255 mask/, 'no mask note');
  // Pixel 3: m0 says 2, m1 says 1, m2 nothing: a tie, to the lowest class (1). Pixel 6: 1 vs 2 -> 1.
  t.same(await consensusOf(path.join(dir, 'vote.png')), [0, 1, 2, 1, 0, 1, 1, 0]);
  const two = await runCli(['fuse', '--method', 'mode', '--undecided', '2', '-o', 'vote2.png', ...files], dir);
  t.same((await consensusOf(path.join(dir, 'vote2.png')))[2], 2, 'pixel 2: both labelled raters say 2, m2 adds no vote');
});

t.test('a refused --posterior leaves no consensus file behind', async (t) => {
  const dir = tempDir(t);
  const files = await pngs(dir, BINARY);
  const run = await runCli(['fuse', '--method', 'mode', '--posterior', 'p.png', '-o', 'out.png', ...files], dir);
  t.equal(run.exitCode, 1);
  t.match(run.stderr, /--posterior: method mode gives no probabilities/);
  t.notOk(fs.existsSync(path.join(dir, 'out.png')), 'nothing written');
  const bad = await runCli(['fuse', '--method', 'mean', '--posterior', 'p.txt', '-o', 'out2.png', ...files], dir);
  t.equal(bad.exitCode, 1);
  t.match(bad.stderr, /p\.txt: unsupported output type/);
  t.notOk(fs.existsSync(path.join(dir, 'out2.png')), 'nothing written');
});

// The CM file's orientation, against the raters' empirical CMs: rater 0 misses 20% of the
// foreground but marks only 2% of the background, so p(says 0 | true 1) = 0.2 while
// p(says 1 | true 0) = 0.02. A transposed CM, or sensitivity and specificity swapped,
// cannot match. Five raters with independent errors let STAPLE recover the truth.
t.test('fuse --cms: cms[r][i][j] = p(says i | true j) and sensitivity/specificity, against the empirical ones', async (t) => {
  const dir = tempDir(t);
  const W = 64, H = 64, V = W * H;
  let s = 12345;
  const rand = () => ((s = (s * 1664525 + 1013904223) >>> 0) / 4294967296);
  const truth = Array.from({ length: V }, (_, v) => ((v % W) - 30) ** 2 + (Math.floor(v / W) - 34) ** 2 < 18 ** 2 ? 1 : 0);
  const flips = [
    { miss: 0.2, extra: 0.02 },
    { miss: 0.05, extra: 0.05 },
    { miss: 0.04, extra: 0.03 },
    { miss: 0.06, extra: 0.04 },
    { miss: 0.03, extra: 0.05 },
  ];
  const raters = flips.map(({ miss, extra }) => truth.map((y) => (y === 1 ? (rand() < miss ? 0 : 1) : rand() < extra ? 1 : 0)));
  const files = await Promise.all(
    raters.map(async (m, r) => {
      const file = `rater${r}.png`;
      await writePng(path.join(dir, file), { width: W, height: H, channels: 1, data: Uint8Array.from(m, (x) => 255 * x) });
      return file;
    }),
  );
  // Empirical p(says i | true j) of each rater.
  const empirical = raters.map((m) => {
    const counts = [[0, 0], [0, 0]];
    const totals = [0, 0];
    m.forEach((x, v) => {
      counts[x][truth[v]]++;
      totals[truth[v]]++;
    });
    return counts.map((row) => row.map((c, j) => c / totals[j]));
  });
  t.ok(Math.abs(empirical[0][0][1] - 0.2) < 0.03 && Math.abs(empirical[0][1][0] - 0.02) < 0.01, 'rater 0 is as asymmetric as meant');

  const multi = await runCli(['fuse', '--method', 'multi-staple', '-o', 'ms.png', '--cms', 'ms.json', ...files], dir);
  t.equal(multi.exitCode, 0, multi.stderr);
  const cms = JSON.parse(fs.readFileSync(path.join(dir, 'ms.json'), 'utf8')).cms as number[][][];
  t.equal(cms.length, 5);
  cms.forEach((cm, r) => {
    for (let j = 0; j < 2; j++) t.ok(Math.abs(cm[0][j] + cm[1][j] - 1) < 1e-6, `rater ${r}: column ${j} sums to 1`);
    for (let i = 0; i < 2; i++) {
      for (let j = 0; j < 2; j++) {
        t.ok(Math.abs(cm[i][j] - empirical[r][i][j]) < 0.03, `rater ${r}: p(says ${i} | true ${j}) ${cm[i][j].toFixed(3)} vs empirical ${empirical[r][i][j].toFixed(3)}`);
      }
    }
  });

  const binary = await runCli(['fuse', '--method', 'staple', '-o', 'st.png', '--cms', 'st.json', ...files], dir);
  t.equal(binary.exitCode, 0, binary.stderr);
  const report = JSON.parse(fs.readFileSync(path.join(dir, 'st.json'), 'utf8')) as { sensitivity: number[]; specificity: number[] };
  report.sensitivity.forEach((p, r) => t.ok(Math.abs(p - empirical[r][1][1]) < 0.03, `rater ${r}: sensitivity ${p.toFixed(3)} vs ${empirical[r][1][1].toFixed(3)}`));
  report.specificity.forEach((q, r) => t.ok(Math.abs(q - empirical[r][0][0]) < 0.03, `rater ${r}: specificity ${q.toFixed(3)} vs ${empirical[r][0][0].toFixed(3)}`));
});
