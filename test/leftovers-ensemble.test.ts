// A checkpoint named more than once in an ensemble (h-leftovers): `--checkpoint a a b`, `a ./a`
// or a link to a is loaded once and counted as often as it was named, so the mean stays the one
// the user typed (a a b: 2/3 a, 1/3 b), held to a mean of the members' own predictions made by
// hand through the API. Tiny BraTS-shaped models on a tiny phantom case.
import t from 'tap';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { loadInference, readInferenceInfo } from '../src/cli/inference';
import { BRATS_GEOMETRY_TOLERANCE_MM } from '../src/data/brats';
import { casesInData } from '../src/data/brats-cases';
import { readNifti } from '../src/data/nifti';
import { loadCheckpoint, saveCheckpoint } from '../src/model/checkpoint';
import { createModel, setNumThreads } from '../src/model/model';
import { slidingWindowPredict } from '../src/model/sliding-window';
import { runCli } from './helpers/cli';
import { cropOfProbs } from './helpers/brats-predictions';
import { captureStderr } from './helpers/stderr';

setNumThreads(1);
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cmseg-leftovers-ensemble-'));
t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
const cli = (args: string[]) => runCli(args, dir);

/** A BraTS-shaped model (4 channels, 4 classes, 2 annotators) after one step, saved by the API. */
async function checkpoint(file: string, seed: number): Promise<void> {
  const model = createModel({ ndim: 3, inChannels: 4, classes: 4, annotators: 2, depth: 2, baseChannels: 4, seed, optimizer: { kind: 'adam', lr: 1e-2 } });
  const size = [8, 8, 8];
  const V = 512;
  const images = Float32Array.from({ length: 2 * 4 * V }, (_, i) => ((i * 7919 + seed) % 101) / 100);
  const labels = Array.from({ length: 2 }, (_, r) => Uint8Array.from({ length: 2 * V }, (_, i) => (images[i] > 0.3 + 0.1 * r ? i % 4 : 0)));
  await model.trainStep({ images, shape: [2, 4, ...size], labels });
  await saveCheckpoint(model, path.join(dir, file));
  await model.dispose();
}


const maxDiff = (a: ArrayLike<number>, b: ArrayLike<number>) => {
  if (a.length !== b.length) return Infinity;
  let worst = 0;
  for (let i = 0; i < a.length; i++) worst = Math.max(worst, Math.abs(a[i] - b[i]));
  return worst;
};

t.before(async () => {
  const phantom = await cli(['phantom', 'brats', '--cases', '1', '--out', 'brats', '--size', '24,24,16', '--seed', '2']);
  if (phantom.exitCode !== 0) throw new Error(phantom.stderr);
  await checkpoint('a.safetensors', 1);
  await checkpoint('b.safetensors', 2);
  fs.symlinkSync(path.join(dir, 'a.safetensors'), path.join(dir, 'link-to-a.safetensors'));
});

t.test('loadInference loads a file named twice once (by path, ./path or a link) and weighs it as named', async (t) => {
  const a = path.join(dir, 'a.safetensors');
  const b = path.join(dir, 'b.safetensors');
  const images = Float32Array.from({ length: 4 * 512 }, (_, i) => Math.sin(i * 0.37));
  const shape = [1, 4, 8, 8, 8];
  const [ma, mb] = [await loadCheckpoint(a), await loadCheckpoint(b)];
  t.teardown(() => Promise.all([ma.dispose(), mb.dispose()]));
  const [pa, pb] = [await ma.predict(images, shape, { cms: true }), await mb.predict(images, shape, { cms: true })];
  for (const [names, distinct, weights] of [
    [[a, a, b], 2, [2 / 3, 1 / 3]],
    [[b, a, b], 2, [1 / 3, 2 / 3]],
    [[a, path.join(dir, '.', 'sub', '..', 'a.safetensors'), path.join(dir, 'link-to-a.safetensors')], 1, [1, 0]],
    [[a, b], 2, [1 / 2, 1 / 2]],
  ] as const) {
    const info = await readInferenceInfo(names);
    t.same(info.members.map((m) => m.file), names.map((n) => path.resolve(n)), 'every naming stays a member, under the path it was given');
    const { value: loaded, stderr } = await captureStderr(() => loadInference(info, {}));
    try {
      t.equal(loaded.models.length, distinct, `${names.length} names, ${distinct} file(s): ${distinct} model(s) loaded`);
      if (distinct < names.length) t.match(stderr, /^note: .*(a|b)\.safetensors is named (2|3) times.*: loaded and predicted once, it counts as often as named in the mean of the \d checkpoints\n$/);
      else t.equal(stderr, '');
      const got = await loaded.model.predict(images, shape, { cms: true });
      for (const key of ['probs', 'cms'] as const) {
        const want = pa[key]!.map((x, i) => weights[0] * x + weights[1] * pb[key]![i]);
        t.ok(maxDiff(got[key]!, want) < 2e-6, `${names.length} names, ${key}: the weighted mean of the members (max diff ${maxDiff(got[key]!, want).toExponential(2)})`);
      }
    } finally {
      await loaded.dispose();
    }
  }
});

t.test('cmseg predict --checkpoint a a b writes 2/3 a + 1/3 b; a and a link to it write a', async (t) => {
  const case0 = await casesInData(path.join(dir, 'brats'), BRATS_GEOMETRY_TOLERANCE_MM).load('BraTS2021_00000');
  const window = { patch: [16, 16, 16], overlap: 0.5, batchSize: 2 };
  const [ma, mb] = [await loadCheckpoint(path.join(dir, 'a.safetensors')), await loadCheckpoint(path.join(dir, 'b.safetensors'))];
  t.teardown(() => Promise.all([ma.dispose(), mb.dispose()]));
  // Stitching is linear in the windows' outputs: the stitched mean is the mean of the stitched.
  const pa = (await slidingWindowPredict(ma, case0.images, case0.extent, window)).probs;
  const pb = (await slidingWindowPredict(mb, case0.images, case0.extent, window)).probs;
  const written = async (out: string) => {
    const probs = await readNifti(path.join(dir, out, 'BraTS2021_00000_probs.nii.gz'));
    return cropOfProbs(probs.data as Float32Array, probs.dims.slice(0, 3), case0.crop);
  };
  const aab = await cli(['predict', '--checkpoint', 'a.safetensors', 'a.safetensors', 'b.safetensors', '--data', 'brats', '--patch', '16', '--out', 'aab', '--no-cms']);
  t.equal(aab.exitCode, 0, aab.stderr);
  t.match(aab.stderr, /note: a\.safetensors is named 2 times: loaded and predicted once, it counts as often as named in the mean of the 3 checkpoints/);
  const want = pa.map((x, i) => (2 / 3) * x + (1 / 3) * pb[i]);
  const got = await written('aab');
  t.ok(maxDiff(got, want) < 1e-5, `a a b: 2/3 a + 1/3 b (max diff ${maxDiff(got, want).toExponential(2)})`);
  const half = pa.map((x, i) => 0.5 * x + 0.5 * pb[i]);
  t.ok(maxDiff(got, half) > 1e-4, 'not the mean of a and b once each');
  const linked = await cli(['predict', '--checkpoint', 'a.safetensors', './link-to-a.safetensors', '--data', 'brats', '--patch', '16', '--out', 'aa', '--no-cms']);
  t.equal(linked.exitCode, 0, linked.stderr);
  t.match(linked.stderr, /note: a\.safetensors is named 2 times \(as a\.safetensors, link-to-a\.safetensors\): loaded and predicted once/);
  t.ok(maxDiff(await written('aa'), pa) < 1e-6, 'a and a link to it: a');
});
