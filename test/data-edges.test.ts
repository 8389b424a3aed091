// Training data as the trainer sees it, checked against numpy (and PIL for PNG decoding):
// 2D augmentation of non-square images, the 3D patch loader's padding and flips, and the
// intensities an image folder gives the model.

import t from 'tap';
import * as fs from 'fs';
import * as path from 'path';
import { augmentBatch, drawTransform } from '../src/train/augment';
import { Rng } from '../src/data/random';
import { UNLABELLED } from '../src/data/annotators';
import { prepareCache, readCachedCase, readCacheIndex } from '../src/data/cache';
import { writeNifti, type Matrix4 } from '../src/data/nifti';
import { PatchSampler, resolveSamplingSettings } from '../src/data/patch-loader';
import { loadImageFolder } from '../src/data/image-folder';
import { loadImagesToPredict } from '../src/data/image-files';
import { missingPythonModules, runPythonJson } from './helpers/python';
import { tempDir } from './helpers/files';

const noNumpy = missingPythonModules('numpy');

function save(dir: string, name: string, data: Float32Array | Uint8Array): string {
  const file = path.join(dir, name);
  fs.writeFileSync(file, Buffer.from(data.buffer, data.byteOffset, data.byteLength));
  return file;
}

t.test('non-square 2D images turned by 180 degrees: every channel, label map, consensus and fused map match numpy.rot90 / flip', { skip: noNumpy }, async (t) => {
  const dir = tempDir(t, 'cmseg-augment-');
  const [N, C, R] = [12, 2, 2];
  for (const [H, W] of [[4, 6], [6, 4]]) {
    const V = H * W;
    const rng = new Rng(H * 10 + W);
    // Channel 0 names its pixel, channel 1 is random; labels hold classes and 255.
    const images = Float32Array.from({ length: N * C * V }, (_, i) => (Math.floor(i / V) % C === 0 ? i % V : rng.normal()));
    const labels = Array.from({ length: R }, () => Uint8Array.from({ length: N * V }, () => [0, 1, 2, UNLABELLED][rng.int(4)]));
    const consensus = Uint8Array.from({ length: N * V }, () => rng.int(3));
    const fused = Uint8Array.from({ length: N * V }, () => rng.int(3));
    const present = new Uint8Array(N * R).fill(1);
    const options = { flips: true, rotations: true };
    const out = augmentBatch({ images, shape: [N, C, H, W], labels, present, consensus, fused }, options, new Rng(9));
    // augmentBatch draws one transform per image, in order, from the stream it is given.
    const draw = new Rng(9);
    const transforms = Array.from({ length: N }, () => drawTransform([H, W], options, draw));
    t.ok(transforms.some((tr) => tr.quarterTurns === 2), `${H}x${W}: some images turned by 180 degrees`);
    const files = {
      images: save(dir, 'images', images), out: save(dir, 'out', out.images),
      labels: save(dir, 'labels', Uint8Array.from([...labels[0], ...labels[1], ...consensus, ...fused])),
      outLabels: save(dir, 'outLabels', Uint8Array.from([...out.labels[0], ...out.labels[1], ...out.consensus!, ...out.fused!])),
    };
    const result = runPythonJson<{ images: number; maps: number; nan: number }>(
      `
import json, sys, numpy as np
N, C, H, W = ${N}, ${C}, ${H}, ${W}
tr = json.loads(sys.argv[1])
img = np.fromfile(${JSON.stringify(files.images)}, np.float32).reshape(N, C, H, W)
out = np.fromfile(${JSON.stringify(files.out)}, np.float32).reshape(N, C, H, W)
lab = np.fromfile(${JSON.stringify(files.labels)}, np.uint8).reshape(4, N, H, W)
outLab = np.fromfile(${JSON.stringify(files.outLabels)}, np.uint8).reshape(4, N, H, W)
def move(a, t):
    a = np.rot90(a, t['quarterTurns'], axes=(-2, -1))
    if t['flips'][0]: a = np.flip(a, -2)
    if t['flips'][1]: a = np.flip(a, -1)
    return a
bad_images = sum(int(not np.array_equal(move(img[n], tr[n]), out[n])) for n in range(N))
bad_maps = sum(int(not np.array_equal(move(lab[m, n], tr[n]), outLab[m, n])) for m in range(4) for n in range(N))
print(json.dumps({'images': bad_images, 'maps': bad_maps, 'nan': int(np.isnan(out).sum())}))
`,
      [JSON.stringify(transforms)],
    );
    t.equal(result.nan, 0, `${H}x${W}: no pixel read from outside the image`);
    t.equal(result.images, 0, `${H}x${W}: images as numpy moves them`);
    t.equal(result.maps, 0, `${H}x${W}: label maps, consensus and fused map as numpy moves them (255 kept)`);
  }
});

// A case whose t1 value names its voxel (as in patch-loader.test.ts), smaller than the patch
// along every axis, so that every patch is padded; single-label mode leaves annotators absent.
const GRID: [number, number, number] = [9, 7, 5]; // NIfTI x, y, z: the cache holds [D, H, W] = [5, 7, 9]

async function gridCache(dir: string): Promise<string> {
  const [nx, ny, nz] = GRID;
  const data = path.join(dir, 'data');
  const id = 'Grid_002';
  fs.mkdirSync(path.join(data, id), { recursive: true });
  const voxels = nx * ny * nz;
  const affine: Matrix4 = [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]];
  const seg = new Uint8Array(voxels);
  for (let z = 0; z < nz; z++)
    for (let y = 0; y < ny; y++)
      for (let x = 0; x < nx; x++) {
        const r = Math.hypot(x - 2, y - 4, (z - 1) * 1.5);
        seg[x + nx * (y + ny * z)] = r < 1.5 ? 1 : r < 2.5 ? 4 : r < 3.5 ? 2 : 0;
      }
  await Promise.all(
    ['t1', 't1ce', 't2', 'flair'].map((m, c) =>
      writeNifti(path.join(data, id, `${id}_${m}.nii`), { dims: GRID, data: Float32Array.from({ length: voxels }, (_, i) => (c === 0 ? 1 + i : 50 + c + (i % 5))), affine }),
    ),
  );
  await writeNifti(path.join(data, id, `${id}_seg.nii`), { dims: GRID, data: seg, affine }, { datatype: 'uint8' });
  const cache = path.join(dir, 'cache');
  await prepareCache(data, cache, { dtype: 'float32', mode: 'single', seed: 4 });
  return cache;
}

t.test('3D patches larger than the case: padding and flips along D, H, W match numpy.pad / flip for the image and every map', { skip: noNumpy }, async (t) => {
  const dir = tempDir(t, 'cmseg-patches-edges-');
  const cache = await gridCache(dir);
  const index = readCacheIndex(cache);
  const cached = await readCachedCase(cache, index.cases[0].id, index);
  const [C, D, H, W] = cached.shape;
  t.same([D, H, W], [GRID[2], GRID[1], GRID[0]], 'not cropped');
  const absent = [...cached.present].filter((p) => p === 0).length;
  t.ok(absent > 0, 'single mode leaves annotators absent');
  const patch: [number, number, number] = [8, 10, 12];
  const B = 6;
  const settings = resolveSamplingSettings({ patchSize: patch, batchSize: B, seed: 5, intensityScale: [1, 1], intensityShift: [0, 0], foregroundFraction: 0.5 });
  const sampler = new PatchSampler([{ id: cached.id, file: path.join(cache, index.cases[0].file), shape: cached.shape }], settings, index.names);
  t.teardown(() => sampler.close());
  const batches = [0, 1, 2].map((k) => sampler.batch(k));
  const samples = batches.flatMap((b) => b.samples);
  t.ok([0, 1, 2].every((a) => samples.some((s) => s.flip[a]) && samples.some((s) => !s.flip[a])), 'flips and no flips along every axis');
  const R = index.names.length;
  const maps = (pick: (b: (typeof batches)[number]) => Uint8Array[]) => Uint8Array.from(batches.flatMap((b) => pick(b).flatMap((m) => [...m])));
  const files = {
    images: save(dir, 'case-images', cached.images),
    maps: save(dir, 'case-maps', Uint8Array.from([...cached.consensus, ...cached.labels.flatMap((l) => [...l])])),
    outImages: save(dir, 'out-images', Float32Array.from(batches.flatMap((b) => [...b.images]))),
    // per batch: consensus [B, *P], then each annotator's [B, *P]
    outMaps: save(dir, 'out-maps', maps((b) => [b.consensus, ...b.labels])),
  };
  const result = runPythonJson<{ images: number; maps: number; present: number[] }>(
    `
import json, sys, numpy as np
C, D, H, W, R, B = ${C}, ${D}, ${H}, ${W}, ${R}, ${B}
P = ${JSON.stringify(patch)}
samples = json.loads(sys.argv[1]); present = json.loads(sys.argv[2])
img = np.fromfile(${JSON.stringify(files.images)}, np.float32).reshape(C, D, H, W)
maps = np.fromfile(${JSON.stringify(files.maps)}, np.uint8).reshape(1 + R, D, H, W)
out = np.fromfile(${JSON.stringify(files.outImages)}, np.float32).reshape(-1, C, *P)
outMaps = np.fromfile(${JSON.stringify(files.outMaps)}, np.uint8).reshape(-1, 1 + R, B, *P)
def cut(a, s, fill):
    # the case padded by a patch on every side, the patch cut at origin, then flipped
    pad = [(0, 0)] * (a.ndim - 3) + [(p, p) for p in P]
    a = np.pad(a, pad, constant_values=fill)
    o = [s['origin'][k] + P[k] for k in range(3)]
    a = a[..., o[0]:o[0] + P[0], o[1]:o[1] + P[1], o[2]:o[2] + P[2]]
    for k in range(3):
        if s['flip'][k]: a = np.flip(a, a.ndim - 3 + k)
    return a
bad_images = bad_maps = 0
for i, s in enumerate(samples):
    bad_images += int(not np.array_equal(cut(img, s, 0), out[i]))
    k, b = divmod(i, B)
    # padding: background (0) in the consensus and a present annotator's map, 255 in an absent one's
    want = [cut(maps[0], s, 0)] + [cut(maps[1 + r], s, 0 if present[r] else 255) for r in range(R)]
    bad_maps += sum(int(not np.array_equal(want[m], outMaps[k, m, b])) for m in range(1 + R))
print(json.dumps({'images': bad_images, 'maps': bad_maps, 'present': present}))
`,
    [JSON.stringify(samples), JSON.stringify([...cached.present])],
  );
  t.equal(result.images, 0, 'every image patch is numpy.pad + slice + flip of the case');
  t.equal(result.maps, 0, 'consensus and every annotator map cut and flipped as the image, padded with 0 or 255 (absent)');
  for (const b of batches) for (let s = 0; s < B; s++) t.same([...b.present.subarray(s * R, (s + 1) * R)], [...cached.present], 'presence is the case\'s');
});

t.test('image folders: the intensities the model gets are PIL/numpy\'s samples / (2^bits - 1), RGB as Rec. 601 luma', { skip: missingPythonModules('numpy', 'PIL') }, async (t) => {
  const root = tempDir(t, 'cmseg-folder-norm-');
  const expected = runPythonJson<Record<string, { gray: number[]; rgb: number[] }>>(
    `
import json, os, sys, numpy as np
from PIL import Image
root = sys.argv[1]
os.makedirs(root + '/images'); os.makedirs(root + '/labels/a')
rng = np.random.default_rng(0)
H, W = 4, 6
rgb = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
made = {
    'g8': Image.fromarray(rng.integers(0, 256, (H, W), dtype=np.uint8), 'L'),
    'g16': Image.fromarray(rng.integers(0, 65536, (H, W)).astype(np.uint16)),
    'rgb': Image.fromarray(rgb, 'RGB'),
    'la': Image.fromarray(rng.integers(0, 256, (H, W, 2), dtype=np.uint8), 'LA'),
    'rgba': Image.fromarray(rng.integers(0, 256, (H, W, 4), dtype=np.uint8), 'RGBA'),
    'pal': Image.fromarray(rgb, 'RGB').convert('P', palette=Image.ADAPTIVE, colors=8),
    'bit1': Image.fromarray(rng.integers(0, 2, (H, W)).astype(bool)),
}
out = {}
luma = np.array([0.299, 0.587, 0.114])
for name, im in made.items():
    im.save(f'{root}/images/{name}.png')
    Image.fromarray((rng.integers(0, 2, (H, W)) * 255).astype(np.uint8), 'L').save(f'{root}/labels/a/{name}.png')
    back = Image.open(f'{root}/images/{name}.png')
    a = np.array(back)
    if back.mode == 'I;16' or back.mode == 'I': planes = np.repeat((a / 65535.0)[..., None], 3, -1)
    elif back.mode == '1': planes = np.repeat(a.astype(float)[..., None], 3, -1)
    elif back.mode in ('L', 'LA'): planes = np.repeat((np.array(back.convert('L')) / 255.0)[..., None], 3, -1)
    else: planes = np.array(back.convert('RGB')) / 255.0
    gray = planes[..., 0] if back.mode in ('I;16', 'I', '1', 'L', 'LA') else planes @ luma
    out[name + '.png'] = {'gray': gray.ravel().tolist(), 'rgb': planes.transpose(2, 0, 1).ravel().tolist()}
print(json.dumps(out))
`,
    [root],
  );
  const gray = loadImageFolder(root);
  const rgb = loadImageFolder(root, { imageChannels: 3 });
  const V = 4 * 6;
  t.same(gray.names, Object.keys(expected).sort());
  gray.names.forEach((name, n) => {
    const worst = (got: Float32Array, want: number[]) => want.reduce((m, v, i) => Math.max(m, Math.abs(got[i] - v)), 0);
    t.ok(worst(gray.images.subarray(n * V, (n + 1) * V), expected[name].gray) < 1e-6, `${name}: gray`);
    t.ok(worst(rgb.images.subarray(n * 3 * V, (n + 1) * 3 * V), expected[name].rgb) < 1e-6, `${name}: 3 channels`);
  });
});

t.test('2-class label maps of 0, 1 and 255 keep 255 unlabelled (SPEC section 1); 0/255 masks still read 255 as foreground', { skip: missingPythonModules('numpy', 'PIL') }, async (t) => {
  const root = tempDir(t, 'cmseg-folder-255-');
  // Rows: 0 = background, 1 = foreground (1 or 255 in a mask), 2 = unlabelled (255 in a SPEC map).
  const maps = runPythonJson<Record<string, number[]>>(
    `
import json, os, sys, numpy as np
from PIL import Image
root = sys.argv[1]
for d in ['images', 'labels/spec', 'labels/mask', 'labels/soft', 'consensus']: os.makedirs(f'{root}/{d}')
spec = np.array([[0, 0, 0, 0], [1, 1, 1, 1], [255, 255, 255, 255], [0, 1, 0, 1]], np.uint8)
mask = np.where(spec == 1, 255, 0).astype(np.uint8)
soft = np.array([[0, 0, 0, 0], [1, 128, 255, 255], [255, 255, 255, 1], [0, 1, 0, 1]], np.uint8)  # e.g. a resized mask
for name in ['a.png', 'b.png']:
    Image.fromarray(np.full((4, 4), 7, np.uint8)).save(f'{root}/images/{name}')
    Image.fromarray(spec).save(f'{root}/labels/spec/{name}')
    Image.fromarray(mask).save(f'{root}/labels/mask/{name}')
    Image.fromarray(soft).save(f'{root}/labels/soft/{name}')
    Image.fromarray(spec).save(f'{root}/consensus/{name}')
print(json.dumps({'spec': spec.ravel().tolist(), 'mask': (mask // 255).ravel().tolist(), 'soft': (soft > 0).astype(int).ravel().tolist()}))
`,
    [root],
  );
  const folder = loadImageFolder(root);
  t.same(folder.annotators, ['mask', 'soft', 'spec']);
  const V = 16;
  for (let n = 0; n < 2; n++) {
    t.same([...folder.labels[2].subarray(n * V, (n + 1) * V)], maps.spec, `image ${n}: the 0/1/255 map as stored, 255 unlabelled`);
    t.same([...folder.labels[0].subarray(n * V, (n + 1) * V)], maps.mask, `image ${n}: the 0/255 mask as background / foreground`);
    t.same([...folder.labels[1].subarray(n * V, (n + 1) * V)], maps.soft, `image ${n}: other maps: every non-zero sample is foreground`);
    t.same([...folder.consensus!.subarray(n * V, (n + 1) * V)], maps.spec, `image ${n}: the consensus read alike`);
  }
  // eval / predict read the same files the same way.
  const info = { file: path.join(root, 'm.safetensors'), config: { ndim: 2, inChannels: 1, classes: 2, annotators: 3 }, annotatorNames: ['mask', 'soft', 'spec'], namesRecorded: true };
  const { set } = loadImagesToPredict(root, info as unknown as Parameters<typeof loadImagesToPredict>[1]);
  t.same([...set.labels[2].subarray(0, V)], maps.spec, 'loadImagesToPredict keeps 255 unlabelled too');
  t.same([...set.labels[0].subarray(0, V)], maps.mask);
});
