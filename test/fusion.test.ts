// fuse() from TypeScript: hand-checked mean and majority vote, STAPLE families
// on raters with known noise, absent raters, and input errors. (The native
// tests compare every method with SimpleITK.)
import t from 'tap';
import { fuse } from '../src/index';

t.test('mean and majority vote by hand', async (t) => {
  const a = new Uint8Array([0, 1, 1, 0, 2]);
  const b = new Uint8Array([0, 1, 0, 255, 2]);
  const c = new Uint8Array([1, 1, 0, 255, 1]);
  const mean = await fuse([a, b, c, null], { method: 'mean', classes: 3 });
  // voxel 0: votes 0,0,1 -> [2/3, 1/3, 0]; voxel 3: only rater a labelled it -> [1, 0, 0]
  // layout [L, V]: class 0 row, then class 1, then class 2
  t.same(Array.from(mean.probs!).map((x) => +x.toFixed(4)), [0.6667, 0, 0.6667, 1, 0, 0.3333, 1, 0.3333, 0, 0.3333, 0, 0, 0, 0, 0.6667]);
  const mode = await fuse([a, b, c], { method: 'mode', classes: 3 });
  t.same(Array.from(mode.labels!), [0, 1, 0, 0, 2]);
  const tie = await fuse([new Uint8Array([0, 1]), new Uint8Array([1, 1])], { method: 'mode', classes: 2, undecided: 255 });
  t.same(Array.from(tie.labels!), [255, 1], 'a tie goes to the undecided label');
});

t.test('STAPLE recovers raters of known quality', async (t) => {
  let s = 7;
  const rand = () => ((s = (s * 1664525 + 1013904223) >>> 0) / 4294967296);
  const V = 40000;
  const truth = new Uint8Array(V).map(() => (rand() < 0.3 ? 1 : 0));
  const flip = [0.05, 0.1, 0.3]; // rater r flips a label with this probability
  const raters = flip.map((f) => truth.map((y) => (rand() < f ? 1 - y : y)));
  const st = await fuse(raters, { method: 'staple', classes: 2, prior: 0.3 });
  for (let r = 0; r < 3; r++) {
    t.ok(Math.abs(st.sensitivity![r] - (1 - flip[r])) < 0.02, `rater ${r} sensitivity ${st.sensitivity![r].toFixed(3)}`);
    t.ok(Math.abs(st.specificity![r] - (1 - flip[r])) < 0.02, `rater ${r} specificity ${st.specificity![r].toFixed(3)}`);
  }
  let agree = 0;
  for (let v = 0; v < V; v++) agree += st.labels![v] === truth[v] ? 1 : 0;
  // Majority vote errs where two raters err: about 4.7% here; STAPLE weighs raters by reliability.
  const vote = await fuse(raters, { method: 'mode', classes: 2 });
  let voteAgree = 0;
  for (let v = 0; v < V; v++) voteAgree += vote.labels![v] === truth[v] ? 1 : 0;
  t.ok(agree / V > 0.95 && agree >= voteAgree, `STAPLE ${(100 * agree / V).toFixed(1)}% vs majority vote ${(100 * voteAgree / V).toFixed(1)}%`);
  const ml = await fuse(raters, { method: 'multi-staple', classes: 2, prior: [0.7, 0.3] });
  // cms[r][i][j] = p(rater says i | true j): the diagonal is 1 - flip rate.
  for (let r = 0; r < 3; r++) t.ok(Math.abs(ml.cms![r * 4 + 0] - (1 - flip[r])) < 0.02, `multi-label CM diagonal of rater ${r}`);
  const sp = await fuse(raters, { method: 'spatial-staple', classes: 2, shape: [200, 200], window: 40, stride: 8 });
  t.equal(sp.labels!.length, V);
  t.same(sp.grid, [25, 25]);
});

t.test('bad input is rejected with a message', async (t) => {
  await t.rejects(fuse([new Uint8Array([0, 1]), new Uint8Array([0, 7])], { method: 'mode', classes: 2 }), /rater 1: label 7 at index 1 >= classes \(2\)/);
  await t.rejects(fuse([new Uint8Array(3), new Uint8Array(4)], { method: 'mean', classes: 2 }), /maps\[1\] has 4 elements, expected 3/);
  await t.rejects(fuse([null, null], { method: 'mode', classes: 2 }), /no rater map given/);
  await t.rejects(fuse([new Uint8Array(2)], { method: 'vote' as never }), /unknown method 'vote'/);
  await t.rejects(fuse([new Uint8Array(2)], { method: 'mode', colour: 1 } as never), /unknown option 'colour' in fuse options/);
});

t.test('binary STAPLE on multi-label maps needs the foreground label', async (t) => {
  const maps = [Uint8Array.from([0, 1, 2, 2]), Uint8Array.from([0, 1, 2, 0]), Uint8Array.from([0, 2, 2, 2])];
  // Default foreground 1 would read every 2 as background: refused instead.
  await t.rejects(fuse(maps, { method: 'staple', classes: 3 }), { code: 'CMSEG_INVALID_ARGUMENT', message: /staple.*classes = 3: pass options.foreground .* or use method 'multi-staple'/ });
  const st = await fuse(maps, { method: 'staple', classes: 3, foreground: 2 });
  t.same(Array.from(st.labels!), [0, 0, 1, 1], 'label 2 is the foreground, 0 and 1 background');
  await t.rejects(fuse(maps, { method: 'multi-staple', classes: 3, foreground: 2 }), /options.foreground is for method 'staple'/);
  // Binary maps keep the default foreground 1.
  const binary = await fuse([Uint8Array.from([0, 1]), Uint8Array.from([0, 1])], { method: 'staple' });
  t.same(Array.from(binary.labels!), [0, 1]);
});

t.test('spatial STAPLE without a shape asks for options.shape', async (t) => {
  await t.rejects(fuse([new Uint8Array(4), new Uint8Array(4)], { method: 'spatial-staple', classes: 2 }), { code: 'CMSEG_INVALID_ARGUMENT', message: /pass options\.shape, the image's \[H, W\] or the volume's \[D, H, W\] \(4 voxels/ });
});

t.test('cmseg fuse: PNG and NIfTI rater files in, consensus (+ CMs) out', async (t) => {
  const fs = await import('fs');
  const os = await import('os');
  const path = await import('path');
  const { buildProgram } = await import('../src/cli/main');
  const { writePng, readPng } = await import('../src/data/png');
  const { writeNifti, readNifti } = await import('../src/data/nifti');
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cmseg-fuse-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const maps = [
    [0, 1, 1, 0, 2, 2],
    [0, 1, 0, 0, 2, 1],
    [1, 1, 0, 0, 2, 1],
  ].map((m) => Uint8Array.from(m));
  const pngs = await Promise.all(maps.map(async (m, r) => {
    const f = path.join(dir, `r${r}.png`);
    await writePng(f, { width: 3, height: 2, channels: 1, data: m });
    return f;
  }));
  const out: string[] = [];
  const write = process.stdout.write.bind(process.stdout);
  process.stdout.write = ((s: string) => (out.push(String(s)), true)) as typeof process.stdout.write;
  try {
    await buildProgram({ exitOverride: true }).parseAsync(['node', 'cmseg', 'fuse', '--method', 'mode', '-o', path.join(dir, 'vote.png'), ...pngs]);
    const niis = await Promise.all(maps.map(async (m, r) => {
      const f = path.join(dir, `r${r}.nii.gz`);
      await writeNifti(f, { dims: [3, 2, 1], data: Float32Array.from(m) }, { datatype: 'uint8' });
      return f;
    }));
    await buildProgram({ exitOverride: true }).parseAsync(['node', 'cmseg', 'fuse', '--method', 'multi-staple', '-o', path.join(dir, 'staple.nii.gz'), '--cms', path.join(dir, 'cms.json'), ...niis]);
  } finally {
    process.stdout.write = write;
  }
  t.same(Array.from((await readPng(path.join(dir, 'vote.png'))).data), [0, 1, 0, 0, 2, 1]);
  const staple = await readNifti(path.join(dir, 'staple.nii.gz'));
  t.same(staple.dims.slice(0, 2), [3, 2]);
  t.equal(staple.raw.length, 6);
  const cms = JSON.parse(fs.readFileSync(path.join(dir, 'cms.json'), 'utf8'));
  t.equal(cms.cms.length, 3);
  t.equal(cms.cms[0].length, 3);
  t.match(out.join(''), /outputs:\n\s+consensus\s+.*vote\.png/);
  t.match(out.join(''), /confusion matrices\s+.*cms\.json/);
});
