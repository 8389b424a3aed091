// BraTS folders as the real releases come, with their quirks (files written with nibabel,
// the way the organisers' tools write them): what a downloaded and unpacked release holds
// beside the cases must not stop `prepare` or `predict`.
import t from 'tap';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { runCli } from './helpers/cli';
import { missingPythonModules, runPython } from './helpers/python';
import { readCacheIndex } from '../src/data/cache';

const skip = missingPythonModules('numpy', 'nibabel');
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cmseg-brats-real-'));
t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
const cmseg = (args: string[]) => runCli(args, dir);

// Two small 2021-named cases (int16 images, uint8 seg, labels 0, 1, 2, 4), LPS-ish affine.
const WRITE_CASES = `
import numpy as np, nibabel as nib, os, sys
root = sys.argv[1]
A = np.diag([-1., -1., 1., 1.]); A[:3, 3] = [0., 239., 0.]
shape = (24, 24, 16)
X, Y, Z = np.meshgrid(*[np.arange(n) for n in shape], indexing='ij')
for k, cid in enumerate(sys.argv[2:]):
    d = os.path.join(root, cid); os.makedirs(d, exist_ok=True)
    brain = ((X - 12) / 9.) ** 2 + ((Y - 12) / 9.) ** 2 + ((Z - 8) / 6.) ** 2 < 1
    r = np.sqrt((X - 12 - k) ** 2 + (Y - 12) ** 2 + (Z - 8) ** 2)
    seg = np.zeros(shape, np.uint8); seg[(r < 5) & brain] = 2; seg[r < 3] = 4; seg[r < 1.5] = 1
    for m, name in enumerate(['t1', 't1ce', 't2', 'flair']):
        img = nib.Nifti1Image((brain * (100 + 20 * m) + seg * 10).astype(np.int16), A)
        img.set_qform(A, code=1); img.set_sform(A, code=1)
        nib.save(img, os.path.join(d, f'{cid}_{name}.nii.gz'))
    img = nib.Nifti1Image(seg, A); img.set_qform(A, code=1); img.set_sform(A, code=1)
    nib.save(img, os.path.join(d, f'{cid}_seg.nii.gz'))
`;

// A release zipped on macOS and unpacked elsewhere holds a __MACOSX/ folder mirroring the
// cases with AppleDouble files (._BraTS2021_00000_t1.nii.gz, resource forks, not NIfTI),
// and copies from a Mac onto FAT/exFAT disks leave such ._ files beside the real ones.
t.test('a release unpacked from a macOS zip (__MACOSX/, ._ files) is read as its cases', { skip }, async (t) => {
  const data = path.join(dir, 'mac');
  runPython(WRITE_CASES, [data, 'BraTS2021_00000', 'BraTS2021_00001']);
  const appleDouble = Buffer.from([0x00, 0x05, 0x16, 0x07, 0, 2, 0, 0]);
  for (const id of ['BraTS2021_00000', 'BraTS2021_00001']) {
    fs.mkdirSync(path.join(data, '__MACOSX', id), { recursive: true });
    for (const name of fs.readdirSync(path.join(data, id))) {
      fs.writeFileSync(path.join(data, '__MACOSX', id, `._${name}`), appleDouble);
      fs.writeFileSync(path.join(data, id, `._${name}`), appleDouble);
    }
  }
  fs.writeFileSync(path.join(data, '.DS_Store'), 'x');
  fs.writeFileSync(path.join(data, '__MACOSX', '._BraTS2021_00000'), appleDouble);

  const prepared = await cmseg(['prepare', '--data', 'mac', '--out', 'mac-cache']);
  t.equal(prepared.exitCode, 0, prepared.stderr);
  t.same(readCacheIndex(path.join(dir, 'mac-cache')).cases.map((c) => c.id), ['BraTS2021_00000', 'BraTS2021_00001']);
  t.notMatch(prepared.stderr, /rename it \._/);
});

// A failed conversion can leave one modality with neither qform nor sform (codes 0): it is on
// the case's grid by its dims only. The case's geometry (what predictions are written with)
// and the check that the other files share one grid must come from a file that has one.
t.test('a t1 without orientation: the other files give the grid, and are still checked against each other', { skip }, async (t) => {
  const data = path.join(dir, 'noori');
  runPython(WRITE_CASES, [data, 'BraTS2021_00010', 'BraTS2021_00011', 'BraTS2021_00012']);
  const stripT1 = `
import nibabel as nib, sys
f = sys.argv[1]; i = nib.load(f)
i.header.set_qform(None, code=0); i.header.set_sform(None, code=0)
nib.save(nib.Nifti1Image(i.get_fdata().astype('int16'), None, i.header), f)
h = nib.load(f).header; assert h['qform_code'] == 0 and h['sform_code'] == 0
`;
  for (const id of ['BraTS2021_00010', 'BraTS2021_00011', 'BraTS2021_00012']) runPython(stripT1, [path.join(data, id, `${id}_t1.nii.gz`)]);
  const train = await cmseg(['train', '--preset', 'brats3d', '--data', 'noori', '--out', 'noori-run', '--steps', '1', '--patch', '8', '--base-channels', '2', '--depth', '2', '--val-cases', '1', '--no-test', '--quiet']);
  t.equal(train.exitCode, 0, train.stderr);
  const predicted = await cmseg(['predict', '--checkpoint', 'noori-run/best.safetensors', '--data', 'noori/BraTS2021_00010', '--out', 'noori-pred', '--no-cms']);
  t.equal(predicted.exitCode, 0, predicted.stderr);
  const geometry = JSON.parse(
    runPython(
      `
import nibabel as nib, numpy as np, sys, json
p = nib.load(sys.argv[1]); ref = nib.load(sys.argv[2])
print(json.dumps({'shape': list(p.shape), 'same': bool(np.allclose(p.affine, ref.affine)), 'codes': [int(p.header['qform_code']), int(p.header['sform_code'])], 'dtype': str(p.get_data_dtype())}))
`,
      [path.join(dir, 'noori-pred/BraTS2021_00010_consensus.nii.gz'), path.join(data, 'BraTS2021_00010/BraTS2021_00010_t1ce.nii.gz')],
    ),
  );
  t.same(geometry, { shape: [24, 24, 16], same: true, codes: [1, 1], dtype: 'uint8' }, 'the prediction is on the t1ce/t2/flair/seg grid');

  // The flair moved 5 mm: with the t1 as the reference nothing was compared at all.
  runPython(
    `
import nibabel as nib, sys
f = sys.argv[1]; i = nib.load(f); A = i.affine.copy(); A[0, 3] += 5
img = nib.Nifti1Image(i.get_fdata().astype('int16'), A); img.set_qform(A, code=1); img.set_sform(A, code=1); nib.save(img, f)
`,
    [path.join(data, 'BraTS2021_00011/BraTS2021_00011_flair.nii.gz')],
  );
  const shifted = await cmseg(['prepare', '--data', 'noori', '--out', 'noori-cache']);
  t.equal(shifted.exitCode, 1);
  t.match(shifted.stderr, /BraTS2021_00011_flair\.nii\.gz has affine\[0\]\[3\][\s\S]*up to 5\.00 mm apart/);
});

// One folder as the releases come, every quirk at once: 2018/2019 HGG/ and LGG/ grouping,
// 2020 and 2021 names, uncompressed .nii, .NII.GZ, the 2023 challenges' prefixes with labels
// 1, 2, 3; images int16, uint16, float64, segs uint8, int16, float64; scl_slope NaN or 0
// ("no scaling"); an LPS-ish affine with a non-zero origin, qfac -1, sform 0 with qform 1 and
// the reverse; stray files (.DS_Store, README.txt, ID_seg_old, an extra ID_mask modality).
// The written predictions must be on each case's own grid with its release's labels, and
// eval's scores those of numpy on the written files.
const WRITE_RELEASE = `
import numpy as np, nibabel as nib, os, sys, struct, gzip, shutil
root = sys.argv[1]
shape = (20, 22, 12)
X, Y, Z = np.meshgrid(*[np.arange(n) for n in shape], indexing='ij')
def lps(origin, flip_z=False):
    A = np.diag([-1., -1., -1. if flip_z else 1., 1.]); A[:3, 3] = origin; return A
def setscl(path, slope):
    opener = gzip.open if path.lower().endswith('.gz') else open
    with opener(path, 'rb') as f: raw = bytearray(f.read())
    raw[112:116] = struct.pack('<f', slope); raw[116:120] = struct.pack('<f', 0.)
    with opener(path, 'wb') as f: f.write(bytes(raw))
def case(sub, cid, sep, mods, et, img_dtype, seg_dtype, ext, A, qcode, scode, slope, k):
    d = os.path.join(root, sub, cid); os.makedirs(d, exist_ok=True)
    brain = ((X - 10) / 8.) ** 2 + ((Y - 11) / 9.) ** 2 + ((Z - 6) / 5.5) ** 2 < 1
    r = np.sqrt((X - 10 - k % 3) ** 2 + (Y - 11 + k % 2) ** 2 + (Z - 6) ** 2)
    seg = np.zeros(shape, np.uint8); seg[(r < 4.5) & brain] = 2; seg[r < 3] = et; seg[r < 1.5] = 1
    files = [(m, (brain * (90 + 25 * i) + seg * (7 + i)).astype(img_dtype)) for i, m in enumerate(mods)] + [('seg', seg.astype(seg_dtype))]
    for m, data in files:
        img = nib.Nifti1Image(data, A); img.set_qform(A, code=qcode); img.set_sform(A, code=scode)
        p = os.path.join(d, f'{cid}{sep}{m}{ext}'); nib.save(img, p)
        if slope is not None: setscl(p, slope)
    return d
M21 = ['t1', 't1ce', 't2', 'flair']; M23 = ['t1n', 't1c', 't2w', 't2f']
case('HGG', 'BraTS19_2013_10_1', '_', M21, 4, np.int16, np.uint8, '.nii.gz', lps([0., 239., 0.]), 1, 1, None, 0)
case('LGG', 'BraTS19_TCIA09_141_1', '_', M21, 4, np.float64, np.float64, '.nii.gz', lps([119.5, 119.5, 77.], True), 1, 0, None, 1)
d = case('', 'BraTS20_Training_003', '_', M21, 4, np.uint16, np.int16, '.nii', lps([0., 239., 0.]), 0, 1, 0.0, 2)
open(os.path.join(d, '.DS_Store'), 'w').write('x')
d = case('', 'BraTS2021_00000', '_', M21, 4, np.int16, np.uint8, '.nii.gz', lps([-0.5, 238.5, -1.]), 1, 1, None, 3)
shutil.copy(os.path.join(d, 'BraTS2021_00000_seg.nii.gz'), os.path.join(d, 'BraTS2021_00000_seg_old.nii.gz'))
shutil.copy(os.path.join(d, 'BraTS2021_00000_t1.nii.gz'), os.path.join(d, 'BraTS2021_00000_mask.nii.gz'))
case('', 'BraTS2021_00002', '_', M21, 4, np.int16, np.uint8, '.NII.GZ', lps([0., 239., 0.]), 1, 1, None, 4)
case('', 'BraTS-GLI-00000-000', '-', M23, 3, np.uint16, np.uint8, '.nii.gz', lps([0., 239., 0.]), 1, 1, None, 5)
case('', 'BraTS-MET-00001-000', '-', M23, 3, np.float64, np.uint8, '.nii.gz', lps([0., 239., 0.]), 1, 1, None, 6)
case('', 'BraTS-SSA-00002-000', '-', M23, 3, np.int16, np.float64, '.nii.gz', lps([0., 239., 0.]), 2, 1, None, 7)
open(os.path.join(root, 'README.txt'), 'w').write('release notes')
open(os.path.join(root, '.DS_Store'), 'w').write('x')
`;

// For every case of eval's JSON: its prediction file against its t1 (grid, header, dtype,
// labels of its release) and numpy's region Dice and HD95 against its segmentation file.
const CHECK_RELEASE = `
import json, glob, os, sys
import numpy as np, nibabel as nib
from scipy import ndimage
root, pred, report = sys.argv[1:4]
cases = json.load(open(report))['metrics']['perCase']
def find(cid, suffix):
    for f in glob.glob(os.path.join(root, '**', cid, '*'), recursive=True):
        n = os.path.basename(f).lower()
        if n in (f'{cid}{suffix}.nii.gz'.lower(), f'{cid}{suffix}.nii'.lower()): return f
def surface(m): return m & ~ndimage.binary_erosion(m, ndimage.generate_binary_structure(3, 1))
def hd95(a, b, sp):
    if not a.any() or not b.any(): return None
    sa, sb = surface(a), surface(b)
    return float(max(np.percentile(ndimage.distance_transform_edt(~sb, sampling=sp)[sa], 95), np.percentile(ndimage.distance_transform_edt(~sa, sampling=sp)[sb], 95)))
out = {}
for c in cases:
    cid = c['id']; new = cid.startswith('BraTS-'); et = 3 if new else 4; sep = '-' if new else '_'
    t1 = nib.load(find(cid, sep + ('t1n' if new else 't1'))); seg = nib.load(find(cid, sep + 'seg'))
    p = nib.load(os.path.join(pred, f'{cid}_consensus.nii.gz'))
    keys = ['qform_code', 'sform_code', 'srow_x', 'srow_y', 'srow_z', 'quatern_b', 'quatern_c', 'quatern_d', 'qoffset_x', 'qoffset_y', 'qoffset_z']
    header = all(np.array_equal(p.header[k], t1.header[k]) for k in keys) and np.array_equal(p.header['pixdim'][:4], t1.header['pixdim'][:4])
    P = np.asarray(p.dataobj).astype(int); S = np.asarray(seg.dataobj).astype(int)
    labels = sorted(set(np.unique(P).tolist()))
    regions = {}
    for name, ls in {'wholeTumour': [1, 2, et], 'tumourCore': [1, et], 'enhancingTumour': [et]}.items():
        a, b = np.isin(P, ls), np.isin(S, ls)
        dice = 2 * (a & b).sum() / (a.sum() + b.sum()) if a.sum() + b.sum() else 1.0
        regions[name] = [bool(abs(dice - c['regions'][name]) < 1e-9), hd95(a, b, seg.header.get_zooms()[:3]), (c.get('hd95') or {}).get(name)]
    out[cid] = {'shape': list(p.shape) == list(t1.shape), 'affine': bool(np.allclose(p.affine, t1.affine)), 'header': bool(header),
                'dtype': str(p.get_data_dtype()), 'labels': labels, 'releaseLabels': set(labels) <= ({0, 1, 2, 3} if new else {0, 1, 2, 4}), 'regions': regions}
print(json.dumps(out))
`;

t.test('a release with its real-world quirks: prepare, train, predict and eval', { skip: skip || missingPythonModules('scipy') }, async (t) => {
  const data = path.join(dir, 'release');
  runPython(WRITE_RELEASE, [data]);
  const ids = ['BraTS-GLI-00000-000', 'BraTS-MET-00001-000', 'BraTS-SSA-00002-000', 'BraTS19_2013_10_1', 'BraTS19_TCIA09_141_1', 'BraTS2021_00000', 'BraTS2021_00002', 'BraTS20_Training_003'];
  const prepared = await cmseg(['prepare', '--data', 'release', '--out', 'release-cache']);
  t.equal(prepared.exitCode, 0, prepared.stderr);
  t.same(readCacheIndex(path.join(dir, 'release-cache')).cases.map((c) => c.id), ids);
  const train = await cmseg(['train', '--preset', 'brats3d', '--data', 'release-cache', '--out', 'release-run', '--steps', '1', '--seed', '2', '--patch', '8', '--base-channels', '2', '--depth', '2', '--val-cases', '1', '--no-test', '--quiet']);
  t.equal(train.exitCode, 0, train.stderr);
  const predicted = await cmseg(['predict', '--checkpoint', 'release-run/best.safetensors', '--data', 'release', '--out', 'release-pred', '--no-cms']);
  t.equal(predicted.exitCode, 0, predicted.stderr);
  const scored = await cmseg(['eval', '--checkpoint', 'release-run/best.safetensors', '--data', 'release', '--out', 'release-eval.json', '--no-cms']);
  t.equal(scored.exitCode, 0, scored.stderr);
  const checks = JSON.parse(runPython(CHECK_RELEASE, [data, path.join(dir, 'release-pred'), path.join(dir, 'release-eval.json')])) as Record<
    string,
    { shape: boolean; affine: boolean; header: boolean; dtype: string; labels: number[]; releaseLabels: boolean; regions: Record<string, [boolean, number | null, number | null | undefined]> }
  >;
  t.same(Object.keys(checks).sort(), ids);
  // (Seed 2's one step predicts every class, so the ET mapping (3 <-> 4) is exercised: if the
  // model changes and it no longer does, pick another seed.)
  t.ok(
    Object.entries(checks).some(([id, c]) => c.labels.includes(id.startsWith('BraTS-') ? 3 : 4)),
    'some prediction holds enhancing tumour',
  );
  for (const [id, c] of Object.entries(checks)) {
    t.same([c.shape, c.affine, c.header, c.dtype, c.releaseLabels], [true, true, true, 'uint8', true], `${id}: on its t1's grid, uint8, its release's labels`);
    for (const [region, [diceSame, hd, theirs]] of Object.entries(c.regions)) {
      t.ok(diceSame, `${id} ${region}: eval's Dice is numpy's on the written files`);
      if (hd === null) t.notOk(typeof theirs === 'number', `${id} ${region}: no HD95 where a region is empty`);
      else t.ok(typeof theirs === 'number' && Math.abs(theirs - hd) < 1e-6, `${id} ${region}: HD95 ${theirs} vs numpy ${hd}`);
    }
  }
});
