// fuse() and `cmseg fuse` where the other fusion tests do not look: binary STAPLE's ties
// against SimpleITK's posterior, options a method does not read, and the CLI's checks that
// depend on the method or the output name alone (made before any input is read).
import * as fs from 'fs';
import * as path from 'path';
import t from 'tap';
import { fuse } from '../src/fusion/fuse';
import { readPng, writePng } from '../src/data/png';
import { runCli } from './helpers/cli';
import { tempDir } from './helpers/files';
import { missingPythonModules, runPythonJson } from './helpers/python';

// Two raters who disagree on pixels 2 and 3, one each way: by symmetry STAPLE estimates
// them alike and its posterior there is exactly 0.5 (SimpleITK's too).
const A = [0, 1, 1, 0];
const B = [0, 1, 0, 1];

t.test('binary STAPLE gives voxels whose posterior is 0.5 the undecided label, as SimpleITK\'s W says', { skip: missingPythonModules('SimpleITK', 'numpy') }, async (t) => {
  const W = runPythonJson<number[]>(
    `import json, sys, numpy as np, SimpleITK as sitk
maps = [sitk.GetImageFromArray(np.array([m], dtype=np.uint8)) for m in json.loads(sys.argv[1])]
print(json.dumps(sitk.GetArrayFromImage(sitk.STAPLE(maps, 1.0)).ravel().tolist()))`,
    [JSON.stringify([A, B])],
  );
  const expected = (undecided: number) => W.map((w) => (w === 0.5 ? undecided : w > 0.5 ? 1 : 0));
  t.same(expected(9), [0, 1, 9, 9], 'the oracle has the two ties');
  const maps = [Uint8Array.from(A), Uint8Array.from(B)];
  const plain = await fuse(maps, { method: 'staple' });
  // (Elsewhere W only nears SimpleITK's: both creep towards 0.5, ITK for 14617 iterations.)
  const ties = (w: ArrayLike<number>) => Array.from(w).flatMap((x, v) => (x === 0.5 ? [v] : []));
  t.same(ties(plain.posterior!), ties(W), 'the posterior is 0.5 where SimpleITK\'s is');
  t.same(Array.from(plain.labels!), [0, 1, 0, 0], 'without undecided: the lowest tied class');
  for (const undecided of [9, 255, 0]) {
    const r = await fuse(maps, { method: 'staple', undecided });
    t.same(Array.from(r.labels!), expected(undecided), `undecided ${undecided}`);
  }
  // As multi-label STAPLE and the vote give the same pixels to undecided.
  t.same(Array.from((await fuse(maps, { method: 'multi-staple', undecided: 9 })).labels!), expected(9));
  t.same(Array.from((await fuse(maps, { method: 'mode', undecided: 9 })).labels!), expected(9));
  // A voxel nobody labelled stays unlabelled, not undecided.
  const gap = await fuse([Uint8Array.from([...A, 255]), Uint8Array.from([...B, 255])], { method: 'staple', undecided: 9 });
  t.same(Array.from(gap.labels!), [...expected(9), 255]);
  await t.rejects(fuse(maps, { method: 'staple', undecided: 256 }), { code: 'CMSEG_INVALID_ARGUMENT', message: 'staple: undecided = 256, expected -1 (lowest tied class) or a label 0..255' });

  const dir = tempDir(t);
  await writePng(path.join(dir, 'a.png'), { width: 4, height: 1, channels: 1, data: Uint8Array.from(A) });
  await writePng(path.join(dir, 'b.png'), { width: 4, height: 1, channels: 1, data: Uint8Array.from(B) });
  const run = await runCli(['fuse', '--method', 'staple', '--undecided', '7', '-o', 'st.png', 'a.png', 'b.png'], dir);
  t.equal(run.exitCode, 0, run.stderr);
  t.same(Array.from((await readPng(path.join(dir, 'st.png'))).data), expected(7), 'cmseg fuse --undecided too');
});

t.test('fuse() refuses an option the method does not read, as it refuses a prior or foreground', async (t) => {
  const maps = [Uint8Array.from(A), Uint8Array.from(B)];
  await t.rejects(fuse(maps, { method: 'mode', window: 5 }), { code: 'CMSEG_INVALID_ARGUMENT', message: "fuse options.window is for method 'spatial-staple'; 'mode' does not read it" });
  await t.rejects(fuse(maps, { method: 'multi-staple', stride: 1 }), { message: "fuse options.stride is for method 'spatial-staple'; 'multi-staple' does not read it" });
  await t.rejects(fuse(maps, { method: 'staple', priorWeight: 0.5 }), { message: "fuse options.priorWeight is for method 'spatial-staple'; 'staple' does not read it" });
  await t.rejects(fuse(maps, { method: 'mean', undecided: 7 }), { message: "fuse options.undecided is for method 'mode', 'staple', 'multi-staple', 'spatial-staple'; 'mean' does not read it" });
  await t.rejects(fuse(maps, { method: 'mode', threshold: 1e-3 }), { message: "fuse options.threshold is for method 'staple', 'multi-staple', 'spatial-staple'; 'mode' does not read it" });
  await t.rejects(fuse(maps, { method: 'mean', maxIterations: 5 }), { message: /^fuse options\.maxIterations is for method 'staple'/ });
  // The methods that read them still take them.
  const spatial = await fuse(maps, { method: 'spatial-staple', shape: [2, 2], window: 3, stride: 1, priorWeight: 0.5, threshold: 1e-3, maxIterations: 5, undecided: 9 });
  t.same(Array.from(spatial.labels!), [0, 1, 9, 9]);
  t.same(Array.from((await fuse(maps, { method: 'mode', undecided: 9 })).labels!), [0, 1, 9, 9]);
});

/** Writes the 4x2 rater PNGs of `maps` into dir; returns their names. */
async function pngs(dir: string, maps: number[][]): Promise<string[]> {
  return Promise.all(
    maps.map(async (m, r) => {
      await writePng(path.join(dir, `r${r}.png`), { width: 4, height: 2, channels: 1, data: Uint8Array.from(m) });
      return `r${r}.png`;
    }),
  );
}

const RATERS = [
  [0, 1, 1, 0, 1, 0, 0, 1],
  [0, 1, 0, 0, 1, 1, 0, 1],
  [1, 1, 1, 0, 0, 0, 0, 1],
];

t.test('cmseg fuse --cms is refused for methods that estimate no confusion matrix, before anything is written', async (t) => {
  const dir = tempDir(t);
  const files = await pngs(dir, RATERS);
  for (const method of ['mode', 'mean']) {
    const run = await runCli(['fuse', '--method', method, '--cms', 'cms.json', '-o', 'out.png', ...files], dir);
    t.equal(run.exitCode, 1, method);
    t.match(run.stderr, `--cms: method ${method} estimates no rater confusion matrices (methods that do: staple, multi-staple, spatial-staple)`);
    t.notOk(fs.existsSync(path.join(dir, 'cms.json')), `${method}: no CM file`);
    t.notOk(fs.existsSync(path.join(dir, 'out.png')), `${method}: no consensus`);
  }
  const multi = await runCli(['fuse', '--method', 'multi-staple', '--cms', 'cms.json', '-o', 'out.png', ...files], dir);
  t.equal(multi.exitCode, 0, multi.stderr);
  const cms = JSON.parse(fs.readFileSync(path.join(dir, 'cms.json'), 'utf8'));
  t.equal(cms.cms.length, 3);
  t.equal(cms.convention, 'cms[r][i][j] = p(rater r says i | true class j); columns sum to 1');
  // Binary STAPLE's file holds sensitivities and specificities, and says how to read those
  // (it said how to read cms it does not hold).
  const staple = await runCli(['fuse', '--method', 'staple', '--cms', 'st.json', '-o', 'st.png', ...files], dir);
  t.equal(staple.exitCode, 0, staple.stderr);
  const st = JSON.parse(fs.readFileSync(path.join(dir, 'st.json'), 'utf8'));
  t.same(Object.keys(st).sort(), ['classes', 'convention', 'method', 'raters', 'sensitivity', 'specificity']);
  t.equal(st.convention, 'sensitivity[r] = p(rater r says 1 | true 1); specificity[r] = p(rater r says another label | true label is not 1)');
});

t.test('cmseg fuse refuses an output it cannot write and method-only options before reading the inputs', async (t) => {
  const dir = tempDir(t);
  // The inputs do not exist: an error about them would mean they were read first.
  const missing = ['nobody0.nii.gz', 'nobody1.nii.gz'];
  const cases: [string[], string][] = [
    [['-o', 'out.txt'], 'out.txt: unsupported output type (expected .nii, .nii.gz or .png)'],
    [['-o', 'out.png', '--posterior', 'p.tif'], 'p.tif: unsupported output type'],
    [['--method', 'mode', '--posterior', 'p.png', '-o', 'out.png'], '--posterior: method mode gives no probabilities'],
    [['--method', 'mode', '--window', '5', '-o', 'out.png'], '--window is for --method spatial-staple; mode has no local estimates'],
    [['--method', 'multi-staple', '--stride', '2', '-o', 'out.png'], '--stride is for --method spatial-staple; multi-staple has no local estimates'],
  ];
  for (const [args, message] of cases) {
    const run = await runCli(['fuse', ...args, ...missing], dir);
    t.equal(run.exitCode, 1, args.join(' '));
    t.match(run.stderr, message, args.join(' '));
    t.notMatch(run.stderr, /nobody/, `${args.join(' ')}: refused before reading the inputs`);
  }
});

t.test('cmseg fuse: a window that is not an odd multiple of the stride says which one is the default', async (t) => {
  const dir = tempDir(t);
  const files = await pngs(dir, RATERS);
  const stride = await runCli(['fuse', '--method', 'spatial-staple', '--stride', '3', '-o', 'out.png', ...files], dir);
  t.equal(stride.exitCode, 1);
  t.match(stride.stderr, 'cmseg: error: --window 40 (the default) is not an odd multiple of --stride 3: a window is a whole, odd number of cells of stride pixels (e.g. --window 9 --stride 3)');
  const window = await runCli(['fuse', '--method', 'spatial-staple', '--window', '3', '-o', 'out.png', ...files], dir);
  t.match(window.stderr, 'cmseg: error: --window 3 is not an odd multiple of --stride 8 (the default)');
  const both = await runCli(['fuse', '--method', 'spatial-staple', '--window', '4', '--stride', '2', '-o', 'out.png', ...files], dir);
  t.match(both.stderr, 'cmseg: error: --window 4 is not an odd multiple of --stride 2: ');
  t.notOk(fs.existsSync(path.join(dir, 'out.png')));
  // --stride alone with a window the default fits, and both given, run.
  const ok = await runCli(['fuse', '--method', 'spatial-staple', '--stride', '8', '-o', 'out.png', ...files], dir);
  t.equal(ok.exitCode, 0, ok.stderr);
  const small = await runCli(['fuse', '--method', 'spatial-staple', '--window', '3', '--stride', '1', '-o', 'small.png', ...files], dir);
  t.equal(small.exitCode, 0, small.stderr);
});

t.test('cmseg fuse refuses the same rater file given twice (it would count that rater twice)', async (t) => {
  const dir = tempDir(t);
  const files = await pngs(dir, RATERS);
  fs.symlinkSync(path.join(dir, 'r1.png'), path.join(dir, 'link.png'));
  fs.linkSync(path.join(dir, 'r1.png'), path.join(dir, 'hard.png'));
  // r0, r1, r1 again: the vote would be r1's map; r0 and r2 alone tie nowhere but disagree.
  for (const again of ['r1.png', `../${path.basename(dir)}/r1.png`, 'link.png', 'hard.png']) {
    const run = await runCli(['fuse', '--method', 'mode', '-o', 'out.png', 'r0.png', 'r1.png', again], dir);
    t.equal(run.exitCode, 1, again);
    t.match(run.stderr, `cmseg: error: ${again} is the same file as r1.png: each rater's map is given once`);
  }
  t.notOk(fs.existsSync(path.join(dir, 'out.png')));
});

// numpy broadcasts a (W, H, 1) consensus against (W, H) raters instead of comparing voxel by
// voxel, so the consensus keeps its raters' axes. The raters differ in dtype and scaling as
// real files do (uint8, int16 stored as 2 x label with scl_slope 0.5, float32); nibabel
// writes them and reads the outputs, numpy votes.
t.test('cmseg fuse: 2D NIfTI raters give a 2D consensus and posterior, on their grid, as nibabel reads them', { skip: missingPythonModules('nibabel', 'numpy') }, async (t) => {
  const dir = tempDir(t);
  const report = runPythonJson<{ shapes: number[][]; vote: number[] }>(
    `import json, sys, os, numpy as np, nibabel as nib
d = sys.argv[1]
rng = np.random.default_rng(5)
truth = (rng.random((6, 5)) < 0.4).astype(np.uint8)
aff = np.array([[0.8, 0, 0, -3], [0, 1.2, 0, 4], [0, 0, 2.5, 1], [0, 0, 0, 1]])
maps = []
for r, dtype in enumerate([np.uint8, np.int16, np.float32]):
    m = truth.copy(); flip = rng.random(m.shape) < 0.2; m[flip] = 1 - m[flip]; maps.append(m)
    img = nib.Nifti1Image((2 * m).astype(dtype) if dtype == np.int16 else m.astype(dtype), aff)
    if dtype == np.int16: img.header.set_slope_inter(0.5, 0)
    nib.save(img, os.path.join(d, f'r{r}.nii.gz'))
vote = (np.sum(maps, axis=0) >= 2).astype(np.uint8)
print(json.dumps({'shapes': [list(nib.load(os.path.join(d, f'r{r}.nii.gz')).shape) for r in range(3)], 'vote': vote.ravel().tolist()}))`,
    [dir],
  );
  t.same(report.shapes, [[6, 5], [6, 5], [6, 5]], 'the raters are 2D files');
  const files = ['r0.nii.gz', 'r1.nii.gz', 'r2.nii.gz'];
  for (const method of ['mode', 'staple']) {
    const run = await runCli(['fuse', '--method', method, '-o', `${method}.nii.gz`, ...(method === 'staple' ? ['--posterior', 'p.nii.gz'] : []), ...files], dir);
    t.equal(run.exitCode, 0, run.stderr);
  }
  const out = runPythonJson<Record<string, { shape: number[]; dim0: number; dtype: string; affine: boolean; values: number[] }>>(
    `import json, sys, os, numpy as np, nibabel as nib
d = sys.argv[1]
ref = nib.load(os.path.join(d, 'r0.nii.gz'))
out = {}
for name in ['mode', 'staple', 'p']:
    img = nib.load(os.path.join(d, name + '.nii.gz'))
    a = np.asanyarray(img.dataobj)
    out[name] = {'shape': list(img.shape), 'dim0': int(img.header['dim'][0]), 'dtype': str(img.get_data_dtype()),
                 'affine': bool(np.allclose(img.affine, ref.affine)), 'values': a.ravel().tolist()}
print(json.dumps(out))`,
    [dir],
  );
  for (const [name, dtype] of [['mode', 'uint8'], ['staple', 'uint8'], ['p', 'float32']]) {
    t.same(out[name].shape, [6, 5], `${name}: the raters' shape`);
    t.equal(out[name].dim0, 2, `${name}: dim[0] = 2`);
    t.equal(out[name].dtype, dtype, `${name}: ${dtype}`);
    t.ok(out[name].affine, `${name}: the raters' affine`);
  }
  t.same(out.mode.values, report.vote, 'the majority vote, as numpy counts it');
  t.same(out.staple.values, out.p.values.map((w) => (w > 0.5 ? 1 : 0)), 'STAPLE labels are its posterior > 0.5');
});
