// Edges of the synthetic annotators (SPEC section 7) and their morphology: annotator specs
// checked before any image is simulated, and radii far larger than the volume, both
// checked against scipy.ndimage.
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import t from 'tap';
import { Rng } from '../src/data/random';
import { type Extent, dilateBinary, erodeBinary } from '../src/data/morphology';
import { type AnnotatorSpec, fractureAnnotator, simulateAnnotators } from '../src/data/annotators';
import { generateBratsPhantom, writeBratsPhantoms } from '../src/data/brats-phantom';
import type { BratsNaming } from '../src/data/brats';
import { simulateDataset } from '../src/cli/simulate';
import { runCli } from './helpers/cli';
import { missingPythonModules, runPythonJson } from './helpers/python';

function randomMask(extent: Extent, p: number, rng: Rng): Uint8Array {
  const mask = new Uint8Array(extent.d * extent.h * extent.w);
  for (let i = 0; i < mask.length; i++) mask[i] = rng.uniform() < p ? 1 : 0;
  return mask;
}

t.test('annotator specs are checked before any image, whichever images a spec gets', async (t) => {
  const extent: Extent = { d: 1, h: 8, w: 8 };
  // Image 0 has a digit-like bar, images 1 and 2 are empty.
  const consensus = new Uint8Array(3 * 64);
  consensus.fill(1, 20, 40);
  const bad: Array<[AnnotatorSpec, RegExp]> = [
    [{ kind: 'over', rOver: -1 }, /annotator 1 \('over'\).*rOver -1/],
    [{ kind: 'under', rUnder: Number.NaN }, /annotator 1 \('under'\).*rUnder NaN/],
    [{ kind: 'fracture', numFractures: 1.5 }, /annotator 1 \('fracture'\).*numFractures 1\.5/],
    [{ kind: 'fracture', thickness: 0 }, /annotator 1 \('fracture'\).*thickness 0/],
    [{ kind: 'typo' } as unknown as AnnotatorSpec, /annotator 1.*unknown annotator kind "typo"/],
  ];
  for (const [spec, message] of bad) {
    // Single mode: seeds 0..7 give the bad annotator different images, or none of them.
    for (let seed = 0; seed < 8; seed++) {
      t.throws(
        () => simulateAnnotators(consensus, extent, 2, [{ kind: 'good' }, spec], { seed, mode: 'single' }),
        message,
        `single mode, seed ${seed}: ${JSON.stringify(spec)} refused`,
      );
    }
    // Dense mode on images without foreground (nothing to dilate or erode) and on no images.
    t.throws(
      () => simulateAnnotators(new Uint8Array(2 * 64), extent, 2, [{ kind: 'good' }, spec], { seed: 0 }),
      message,
      `dense mode, empty images: ${JSON.stringify(spec)} refused`,
    );
    t.throws(
      () => simulateAnnotators(new Uint8Array(0), extent, 2, [{ kind: 'good' }, spec], { seed: 0 }),
      message,
      `no images: ${JSON.stringify(spec)} refused`,
    );
  }
  t.throws(
    () => simulateAnnotators(consensus, extent, 2, [{ kind: 'over', rOver: Infinity }], { seed: 0 }),
    /annotator 0 \('over'\).*rOver Infinity/,
    'an infinite radius is named',
  );
});

t.test('radii far larger than the volume: scipy.ndimage results, no crash and no hang', async (t) => {
  const skip = missingPythonModules('numpy', 'scipy');
  if (skip) return t.skip(skip);
  const rng = new Rng(7);
  const cases: Array<{ extent: Extent; radius: number; mask: Uint8Array }> = [
    // 2D: a disk of radius 1e6 used to be a 4e12-entry element (heap out of memory).
    { extent: { d: 1, h: 32, w: 32 }, radius: 1e6, mask: randomMask({ d: 1, h: 32, w: 32 }, 0.02, rng) },
    // Radii around the size of the volume, where the border decides the erosion.
    { extent: { d: 1, h: 9, w: 13 }, radius: 6, mask: randomMask({ d: 1, h: 9, w: 13 }, 0.9, rng) },
    { extent: { d: 1, h: 9, w: 13 }, radius: 12.5, mask: randomMask({ d: 1, h: 9, w: 13 }, 0.05, rng) },
    { extent: { d: 1, h: 1, w: 13 }, radius: 40, mask: randomMask({ d: 1, h: 1, w: 13 }, 0.2, rng) },
    { extent: { d: 1, h: 20, w: 20 }, radius: 7.5, mask: randomMask({ d: 1, h: 20, w: 20 }, 0.97, rng) },
    // 3D: a ball of radius 300 used to be a 1.1e8-entry element per foreground voxel.
    { extent: { d: 16, h: 16, w: 16 }, radius: 300, mask: randomMask({ d: 16, h: 16, w: 16 }, 0.3, rng) },
    { extent: { d: 6, h: 7, w: 9 }, radius: 4, mask: randomMask({ d: 6, h: 7, w: 9 }, 0.15, rng) },
    { extent: { d: 6, h: 7, w: 9 }, radius: 2.5, mask: randomMask({ d: 6, h: 7, w: 9 }, 0.97, rng) },
    { extent: { d: 3, h: 30, w: 30 }, radius: 5, mask: randomMask({ d: 3, h: 30, w: 30 }, 0.05, rng) },
    { extent: { d: 12, h: 12, w: 12 }, radius: 3, mask: new Uint8Array(12 ** 3) },
    // Small radii and sparse foreground (stamped element by element, as MNIST and BraTS use them).
    { extent: { d: 1, h: 32, w: 32 }, radius: 2, mask: randomMask({ d: 1, h: 32, w: 32 }, 0.05, rng) },
    { extent: { d: 12, h: 12, w: 12 }, radius: 1, mask: randomMask({ d: 12, h: 12, w: 12 }, 0.3, rng) },
  ];
  const started = Date.now();
  const ours = cases.map(({ extent, radius, mask }) => ({
    dilated: Array.from(dilateBinary(mask, extent, radius)),
    eroded: Array.from(erodeBinary(mask, extent, radius)),
  }));
  t.ok(Date.now() - started < 10_000, `all cases in ${Date.now() - started} ms`);
  const oracle = runPythonJson<Array<{ dilated: number[]; eroded: number[] }>>(
    `
import json, sys, numpy as np
from scipy import ndimage as nd
out = []
for c in json.load(open(sys.argv[1])):
    d, h, w = c['extent']['d'], c['extent']['h'], c['extent']['w']
    m = np.array(c['mask'], np.uint8).reshape(d, h, w).astype(bool)
    r = c['radius']
    # Offsets longer than the volume's diagonal join no two voxels, and offsets of an axis's
    # size land outside from every voxel: clipping the radius and the element there keeps
    # scipy's results (and its memory) as they are for the full element.
    r = min(r, float(np.sqrt(d * d + h * h + w * w)) + 1)
    ry, rx = min(int(r), h), min(int(r), w)
    rz = min(int(r), d) if d > 1 else 0
    z, y, x = np.mgrid[-rz:rz + 1, -ry:ry + 1, -rx:rx + 1]
    se = (z * z + y * y + x * x) <= r * r + 1e-9
    dil = nd.binary_dilation(m, se)
    ero = nd.binary_erosion(m, se, border_value=0)
    out.append({'dilated': dil.astype(int).ravel().tolist(), 'eroded': ero.astype(int).ravel().tolist()})
print(json.dumps(out))
`,
    [writeCases(cases)],
  );
  // A radius beyond the volume's diagonal: everything is within reach of a foreground voxel,
  // and every voxel within reach of the outside.
  const big: Extent = { d: 40, h: 40, w: 40 };
  const bigMask = randomMask(big, 0.3, rng);
  const bigStarted = Date.now();
  t.ok(dilateBinary(bigMask, big, 300).every((v) => v === 1), '40^3, radius 300: the dilation is the whole volume');
  t.ok(erodeBinary(bigMask, big, 300).every((v) => v === 0), '40^3, radius 300: the erosion is empty');
  t.ok(Date.now() - bigStarted < 5_000, `40^3, radius 300, in ${Date.now() - bigStarted} ms`);
  cases.forEach(({ extent, radius }, k) => {
    const label = `${extent.d}x${extent.h}x${extent.w}, radius ${radius}`;
    t.same(ours[k].dilated, oracle[k].dilated, `dilation ${label}`);
    t.same(ours[k].eroded, oracle[k].eroded, `erosion ${label}`);
  });
});

function writeCases(cases: Array<{ extent: Extent; radius: number; mask: Uint8Array }>): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cmseg-morph-'));
  const file = path.join(dir, 'cases.json');
  fs.writeFileSync(file, JSON.stringify(cases.map((c) => ({ ...c, mask: Array.from(c.mask) }))));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  return file;
}

t.test('a consensus with unlabelled voxels is refused with a message that says so', async (t) => {
  const extent: Extent = { d: 1, h: 4, w: 4 };
  const consensus = new Uint8Array(16);
  consensus[5] = 1;
  consensus[9] = 255;
  t.throws(
    () => simulateAnnotators(consensus, extent, 2, [{ kind: 'good' }], { seed: 0 }),
    /consensus: label 255 \(unlabelled\) at index 9.*every voxel/,
  );
  consensus[9] = 2;
  t.throws(() => simulateAnnotators(consensus, extent, 2, [{ kind: 'good' }], { seed: 0 }), /consensus: label 2 at index 9 >= classes \(2\)/);
});

t.test('phantom case indices and namings are checked', async (t) => {
  const size = [8, 8, 8] as const;
  for (const index of [-1, 1.5, Number.NaN, 100000]) {
    t.throws(() => generateBratsPhantom(index, { size }), /case index .* must be an integer in 0\.\.99999/, `index ${index} refused`);
  }
  t.throws(() => generateBratsPhantom(0, { size, naming: '2022' as BratsNaming }), /naming "2022" must be '2021' or '2023'/);
  const out = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'cmseg-phantom-')), 'cases');
  t.teardown(() => fs.rmSync(path.dirname(out), { recursive: true, force: true }));
  await t.rejects(writeBratsPhantoms(out, { cases: 100001, size }), /cases 100001 must be an integer in 1\.\.100000/, 'more cases than five-digit ids');
  t.notOk(fs.existsSync(out), 'refused before any case is written');
  // Case 7 is the same whether made alone or as the 8th of a set, and the namings differ only in ET's label.
  const a = generateBratsPhantom(7, { size: [16, 16, 12], seed: 3, naming: '2021' });
  const b = generateBratsPhantom(7, { size: [16, 16, 12], seed: 3, naming: '2023' });
  t.equal(a.id, 'BraTS2021_00007');
  t.equal(b.id, 'BraTS-GLI-00007-000');
  t.same(a.images, b.images, 'same images in both namings');
  t.same(Array.from(a.seg, (v) => (v === 4 ? 3 : v)), Array.from(b.seg), 'ET is 4 (2021) or 3 (2023), the rest is equal');
});

t.test('simulate: a run that stops part way leaves no image without its labels, and says it is unfinished', async (t) => {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'cmseg-simulate-'));
  t.teardown(() => fs.rmSync(root, { recursive: true, force: true }));
  const out = path.join(root, 'set');
  // A folder where image 3's 'under' label file should go makes that write fail: the run
  // stops there, as a full disk or a Ctrl-C would stop it.
  fs.mkdirSync(path.join(out, 'labels', 'under', 'mnist-00003.png'), { recursive: true });
  await t.rejects(simulateDataset(out, 6, 'dense', 1));
  const images = fs.readdirSync(path.join(out, 'images')).sort();
  t.same(images, ['mnist-00000.png', 'mnist-00001.png', 'mnist-00002.png'], 'only the images whose files were all written');
  for (const name of images) {
    for (const annotator of ['good', 'over', 'under', 'fracture']) {
      t.ok(fs.statSync(path.join(out, 'labels', annotator, name)).isFile(), `${annotator} labelled ${name}`);
    }
    t.ok(fs.existsSync(path.join(out, 'consensus', name)), `consensus of ${name}`);
  }
  t.notOk(fs.existsSync(path.join(out, 'dataset.json')), 'no dataset.json');
  await t.rejects(simulateDataset(out, 6, 'dense', 1), /unfinished.*no dataset\.json/, 'a rerun names the unfinished set');
});

t.test('phantom brats names case folders an earlier run left in --out', async (t) => {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'cmseg-phantom-cli-'));
  t.teardown(() => fs.rmSync(root, { recursive: true, force: true }));
  const first = await runCli(['phantom', 'brats', '--cases', '3', '--out', 'ph', '--size', '8,8,8', '-q'], root);
  t.equal(first.exitCode, 0, first.stderr);
  t.notMatch(first.stderr, /other case folder/, 'a fresh folder: no note');
  // Fewer cases in the 2023 naming into the same folder: the three 2021 cases stay, and
  // `prepare --data ph` would read all four.
  const second = await runCli(['phantom', 'brats', '--cases', '1', '--out', 'ph', '--size', '8,8,8', '--naming', '2023', '-q'], root);
  t.equal(second.exitCode, 0, second.stderr);
  t.same(fs.readdirSync(path.join(root, 'ph')).sort(), ['BraTS-GLI-00000-000', 'BraTS2021_00000', 'BraTS2021_00001', 'BraTS2021_00002']);
  t.match(second.stderr, /holds 3 other case folders \(BraTS2021_00000, BraTS2021_00001, BraTS2021_00002\)/);
});

t.test('a huge 3D numFractures neither runs out of memory nor runs on once the lesion is all cut', async (t) => {
  const extent: Extent = { d: 12, h: 12, w: 12 };
  const ball = new Uint8Array(12 * 12 * 12);
  for (let z = 0; z < 12; z++) for (let y = 0; y < 12; y++) for (let x = 0; x < 12; x++) ball[(z * 12 + y) * 12 + x] = (z - 5.5) ** 2 + (y - 5.5) ** 2 + (x - 5.5) ** 2 <= 16 ? 1 : 0;
  const started = Date.now();
  // Planning a billion cuts first held a list of them (~100 GB); each cut also removes its centre.
  const out = fractureAnnotator(ball, extent, { kind: 'fracture', numFractures: 1e9 }, new Rng(3));
  t.equal(out.reduce((n, v) => n + v, 0), 0, 'every foreground voxel is cut');
  t.ok(Date.now() - started < 20_000, `finished in ${Date.now() - started} ms`);
  // A few cuts: the same draws as before, cut by cut (the same seed gives the same map twice,
  // and each cut is a slab through the ball, so some foreground stays).
  const three = fractureAnnotator(ball, extent, { kind: 'fracture', numFractures: 3 }, new Rng(3));
  t.same(three, fractureAnnotator(ball, extent, { kind: 'fracture', numFractures: 3 }, new Rng(3)));
  const left = three.reduce((n, v) => n + v, 0);
  t.ok(left > 0 && left < ball.reduce((n, v) => n + v, 0), `3 cuts leave ${left} voxels`);
});
