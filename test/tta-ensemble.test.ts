// Test-time augmentation by mirroring (src/model/tta.ts) and ensembles of checkpoints
// (src/model/ensemble.ts), through the API and through `cmseg predict` / `cmseg eval`.
//
// Independent references: flipReference below mirrors an array through its multi-index
// (not the implementation's row walk), and the expected means are summed in Float64 here,
// while the wrappers keep a running mean in Float32.
// Tolerances: 2e-6 absolute between a wrapper and the Float64 mean of the same native
// predictions (values in [0, 1]; the running mean of <= 8 terms rounds a few float32 ulps);
// 1e-5 for the column sums of averaged CMs and for a U-Net with mirror-symmetric kernels
// against its own plain prediction (convolution sums taken in mirrored order round apart).
// Exact (bit for bit): a pointwise model (mirror-equivariant by construction) with and
// without TTA; an ensemble of one model twice against the model; `--checkpoint a a`
// against `--checkpoint a` on the command line.
// On the command line, `--checkpoint a b [--tta]` is held to handEnsemble: the checkpoints
// loaded through the API, each predicting every mirror image (flipped by flipReference), the
// outputs flipped back and averaged in Float64. 2D eval: Dice per class, Average and Total
// Dice and the reliabilities recomputed by hand from that prediction (1e-12; 1e-8 for the
// reliabilities), CM error and GED of it (1e-8, 1e-9). 3D predict: the written
// <id>_probs.nii.gz, inside the crop, against the case windowed as predict does with that
// model (1e-5), and the consensus and background-outside-the-crop checks of
// helpers/brats-predictions.ts.
// Every model is tiny (base width 4, depth 2 or 3, a step or two of training).
import t from 'tap';
import { createHash } from 'crypto';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { cliHelp, runCli } from './helpers/cli';
import { createModel, type Model, setNumThreads } from '../src/model/model';
import { saveCheckpoint } from '../src/model/checkpoint';
import { readNifti } from '../src/data/nifti';
import { ensemble } from '../src/model/ensemble';
import { flipSpatial, mirrored, mirrorings } from '../src/model/tta';
import { slidingWindowPredict, type SlidingWindowModel } from '../src/model/sliding-window';
import { loadCheckpoint } from '../src/model/checkpoint';
import { casesInData } from '../src/data/brats-cases';
import { BRATS_GEOMETRY_TOLERANCE_MM } from '../src/data/brats';
import { loadExperimentData, type DatasetSpec } from '../src/train/experiment';
import { gatherBatch } from '../src/train/data';
import { evaluateModel, type EvaluationSummary } from '../src/train/evaluate';
import { checkReleasedPrediction, cropOfProbs } from './helpers/brats-predictions';

setNumThreads(1);
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cmseg-tta-ensemble-'));
t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
const cli = (args: string[]) => runCli(args, dir);
const json = (file: string) => JSON.parse(fs.readFileSync(path.join(dir, file), 'utf8'));
/** What an ensemble's default metrics file carries: the first 8 hex digits of the SHA-1 of its members' absolute paths, one a line. */
const hashOf = (...files: string[]) =>
  createHash('sha1')
    .update(files.map((f) => path.join(dir, f)).join('\n'))
    .digest('hex')
    .slice(0, 8);

const OUTPUTS = ['probs', 'cms', 'annotatorProbs'] as const;
type Outputs = { probs: Float32Array; cms?: Float32Array; annotatorProbs?: Float32Array };

/** `data` of shape `dims` mirrored along the listed dimensions (indices into dims), index by index. */
function flipReference(data: Float32Array, dims: readonly number[], flip: readonly number[]): Float32Array {
  const out = new Float32Array(data.length);
  const index = new Array<number>(dims.length).fill(0);
  for (let i = 0; i < data.length; i++) {
    let rest = i;
    for (let d = dims.length - 1; d >= 0; d--) {
      index[d] = rest % dims[d];
      rest = Math.floor(rest / dims[d]);
    }
    let src = 0;
    for (let d = 0; d < dims.length; d++) src = src * dims[d] + (flip.includes(d) ? dims[d] - 1 - index[d] : index[d]);
    out[i] = data[src];
  }
  return out;
}

/** The largest |a - b| over two arrays of one length. */
function maxDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  if (a.length !== b.length) return Infinity;
  let worst = 0;
  for (let i = 0; i < a.length; i++) worst = Math.max(worst, Math.abs(a[i] - b[i]));
  return worst;
}

/** Indices at which two arrays differ in any bit (NaN never occurs here). */
const differing = (a: Float32Array, b: Float32Array) => (a.length !== b.length ? Infinity : a.reduce((n, x, i) => n + (x === b[i] ? 0 : 1), 0));

/** Deterministic inputs in [-1, 1]. */
const inputs = (n: number, seed: number) => Float32Array.from({ length: n }, (_, i) => Math.sin(i * 12.9898 + seed * 78.233) * 0.9);

/** Every spatial-axis subset of a [N, C, *S] array, as dimension indices of the full shape. */
const spatialFlips = (ndim: number) => mirrorings(Array.from({ length: ndim }, (_, i) => i + 2));

/**
 * The mean over every mirroring f of f(model.predict(f(x))), summed in Float64: each output
 * [N, K, *S] flipped back along the same spatial dimensions.
 */
async function meanOfMirrored(model: SlidingWindowModel, images: Float32Array, shape: number[]): Promise<Record<string, Float64Array>> {
  const flips = spatialFlips(shape.length - 2);
  const sums: Record<string, Float64Array> = {};
  for (const flip of flips) {
    const p = (await model.predict(flipReference(images, shape, flip), shape, { cms: true, annotatorProbs: true })) as Outputs;
    for (const name of OUTPUTS) {
      const values = p[name]!;
      const spatial = shape.slice(2);
      const channels = values.length / (shape[0] * spatial.reduce((a, b) => a * b, 1));
      const back = flipReference(values, [shape[0], channels, ...spatial], flip);
      sums[name] ??= new Float64Array(values.length);
      back.forEach((x, i) => (sums[name][i] += x));
    }
  }
  for (const name of OUTPUTS) sums[name] = sums[name].map((x) => x / flips.length);
  return sums;
}

/**
 * The reference for `--checkpoint a b [--tta]` on the command line, built from the members'
 * own predict() and plain array ops only: for every member m and every mirroring f (with
 * `mirror`; else the input as it is), f(m.predict(f(x))) flipped by flipReference, and their
 * plain mean summed in Float64 (the code under test nests mirrored() around ensemble(), flips
 * with its own row walk and keeps a Float32 running mean).
 */
function handEnsemble(members: readonly SlidingWindowModel[], mirror: boolean): SlidingWindowModel {
  const { ndim, inChannels, classes, annotators } = members[0].config;
  return {
    config: { ndim, inChannels, classes, annotators, depth: Math.max(...members.map((m) => m.config.depth)) },
    predict: async (images, shape, options = {}) => {
      const flips = mirror ? spatialFlips(shape.length - 2) : [[]];
      const spatial = shape.slice(2);
      const V = spatial.reduce((a, b) => a * b, 1);
      const sums: Partial<Record<(typeof OUTPUTS)[number], Float64Array>> = {};
      for (const member of members) {
        for (const flip of flips) {
          const p = (await member.predict(flipReference(images, shape, flip), shape, options)) as Outputs;
          for (const name of OUTPUTS) {
            const values = p[name];
            if (!values) continue;
            const back = flipReference(values, [shape[0], values.length / (shape[0] * V), ...spatial], flip);
            const sum = (sums[name] ??= new Float64Array(values.length));
            back.forEach((x, i) => (sum[i] += x));
          }
        }
      }
      const terms = members.length * flips.length;
      const mean = (name: (typeof OUTPUTS)[number]) => Float32Array.from(sums[name]!, (x) => x / terms);
      return { probs: mean('probs'), ...(sums.cms ? { cms: mean('cms') } : {}), ...(sums.annotatorProbs ? { annotatorProbs: mean('annotatorProbs') } : {}) };
    },
  };
}

/**
 * The consensus Dice figures and the annotators' reliabilities of a prediction of N images
 * against `truth`, by their definitions (SPEC section 6), written out here: per image and
 * class, Dice = 2|P & Y| / (|P| + |Y|) (1 when both are empty) with P = argmax p (the first
 * class on ties); Average Dice = the mean over the non-background classes; Total Dice = the
 * voxel accuracy; each a mean over images. Reliability of annotator r = the mean over every
 * voxel of trace(A_r) / L.
 */
function handFigures(p: Outputs, truth: Uint8Array, N: number, L: number, R: number) {
  const V = truth.length / N;
  const dice = new Array<number>(L).fill(0);
  let average = 0;
  let total = 0;
  for (let n = 0; n < N; n++) {
    const both = new Array<number>(L).fill(0);
    const predicted = new Array<number>(L).fill(0);
    const actual = new Array<number>(L).fill(0);
    for (let v = 0; v < V; v++) {
      let best = 0;
      for (let k = 1; k < L; k++) if (p.probs[(n * L + k) * V + v] > p.probs[(n * L + best) * V + v]) best = k;
      const y = truth[n * V + v];
      predicted[best]++;
      actual[y]++;
      if (best === y) both[y]++;
    }
    const perClass = both.map((b, c) => (predicted[c] + actual[c] === 0 ? 1 : (2 * b) / (predicted[c] + actual[c])));
    perClass.forEach((d, c) => (dice[c] += d / N));
    average += perClass.slice(1).reduce((a, b) => a + b, 0) / (L - 1) / N;
    total += both.reduce((a, b) => a + b, 0) / V / N;
  }
  const reliability = Array.from({ length: R }, (_, r) => {
    let trace = 0;
    for (let n = 0; n < N; n++) for (let i = 0; i < L; i++) for (let v = 0; v < V; v++) trace += p.cms![(((n * R + r) * L + i) * L + i) * V + v];
    return trace / (N * V * L);
  });
  return { dice, average, total, reliability };
}

/** Every CM column A[.][j] of [N, R, L, L, *S] sums to 1 (within tol) and lies in [0, 1]. */
function cmColumnsWorst(cms: Float32Array, N: number, R: number, L: number, V: number): { sum: number; range: boolean } {
  let worst = 0;
  let range = true;
  for (let nr = 0; nr < N * R; nr++) {
    for (let j = 0; j < L; j++) {
      for (let v = 0; v < V; v++) {
        let sum = 0;
        for (let i = 0; i < L; i++) {
          const a = cms[((nr * L + i) * L + j) * V + v];
          if (!(a >= 0 && a <= 1)) range = false;
          sum += a;
        }
        worst = Math.max(worst, Math.abs(sum - 1));
      }
    }
  }
  return { sum: worst, range };
}

const tiny = (ndim: 2 | 3, seed: number, extra: Record<string, unknown> = {}) =>
  createModel({ ndim, inChannels: ndim === 3 ? 2 : 1, classes: 3, annotators: 2, depth: 2, baseChannels: 4, seed, ...extra });

/**
 * A pointwise model (each pixel's outputs depend on its own intensity only), so mirroring
 * the input mirrors the outputs exactly: p = softmax(x * [1, 2, 3]), CMs with columns
 * (1 - e, e/2, e/2) rolled, e = 0.1 + 0.2 * sigmoid(x), q = A p. Fresh arrays per call.
 */
const pointwise: SlidingWindowModel = {
  config: { ndim: 2, inChannels: 1, classes: 3, annotators: 1, depth: 2 },
  predict: async (images, shape, options = {}) => {
    const [N, , ...spatial] = shape;
    const V = spatial.reduce((a, b) => a * b, 1);
    const L = 3;
    const probs = new Float32Array(N * L * V);
    const cms = new Float32Array(N * L * L * V);
    const q = new Float32Array(N * L * V);
    for (let n = 0; n < N; n++) {
      for (let v = 0; v < V; v++) {
        const x = images[n * V + v];
        const z = [x, 2 * x, 3 * x].map(Math.exp);
        const total = z[0] + z[1] + z[2];
        const e = 0.1 + 0.2 / (1 + Math.exp(-x));
        for (let j = 0; j < L; j++) {
          probs[(n * L + j) * V + v] = z[j] / total;
          for (let i = 0; i < L; i++) cms[((n * L + i) * L + j) * V + v] = i === j ? 1 - e : e / 2;
        }
        for (let i = 0; i < L; i++) {
          let s = 0;
          for (let j = 0; j < L; j++) s += cms[((n * L + i) * L + j) * V + v] * probs[(n * L + j) * V + v];
          q[(n * L + i) * V + v] = s;
        }
      }
    }
    return { probs, ...(options.cms ? { cms } : {}), ...(options.annotatorProbs ? { annotatorProbs: q } : {}) };
  },
};

t.test('mirrorings and flips', async (t) => {
  t.same(mirrorings([0, 1]), [[], [0], [1], [0, 1]], '2D: 4 mirrorings, the input itself first');
  t.equal(mirrorings([0, 1, 2]).length, 8, '3D: 8, as nnU-Net');
  t.equal(new Set(mirrorings([0, 1, 2]).map((m) => m.join())).size, 8, 'all different');
  const shape2 = [2, 3, 4, 5];
  const shape3 = [2, 2, 3, 4, 5];
  for (const shape of [shape2, shape3]) {
    const ndim = shape.length - 2;
    const data = inputs(shape.reduce((a, b) => a * b, 1), 1);
    for (const axes of mirrorings(Array.from({ length: ndim }, (_, i) => i))) {
      const flipped = flipSpatial(data, shape[0] * shape[1], shape.slice(2), axes);
      t.equal(differing(flipped, flipReference(data, shape, axes.map((a) => a + 2))), 0, `${ndim}D flip [${axes}] matches the index-by-index flip`);
      t.equal(differing(flipSpatial(flipped, shape[0] * shape[1], shape.slice(2), axes), data), 0, `${ndim}D flip [${axes}] is its own inverse`);
    }
  }
  const model = tiny(2, 1);
  t.teardown(() => model.dispose());
  t.throws(() => mirrored(model, [2]), /mirror axis 2 \(entry 0\) is not a spatial axis of a 2D model \(0\.\.1\)/);
  t.throws(() => mirrored(model, [1, 1]), /mirror axis 1 is listed twice/);
  t.equal(mirrored(model, []), model, 'no axes: the model itself');
});

t.test('TTA = the mean of the flipped-back predictions of the mirrored inputs (2D and 3D U-Nets)', async (t) => {
  for (const [ndim, shape] of [
    [2, [2, 1, 8, 12]],
    [3, [1, 2, 4, 8, 6]],
  ] as const) {
    const model = tiny(ndim, 7);
    t.teardown(() => model.dispose());
    const images = inputs(shape.reduce((a, b) => a * b, 1), ndim);
    const expected = await meanOfMirrored(model, images, [...shape]);
    const got = (await mirrored(model).predict(images, [...shape], { cms: true, annotatorProbs: true })) as Outputs & { probsShape: number[] };
    for (const name of OUTPUTS) t.ok(maxDiff(got[name]!, expected[name]) < 2e-6, `${ndim}D ${name}: max |TTA - mean| = ${maxDiff(got[name]!, expected[name]).toExponential(2)}`);
    t.same(got.probsShape, [shape[0], 3, ...shape.slice(2)], 'the shapes of the model');
    const plain = await model.predict(images, [...shape]);
    t.ok(maxDiff(plain.probs, got.probs) > 1e-4, `${ndim}D: a random U-Net is not mirror-symmetric, so TTA changes its output`);
    const V = shape.slice(2).reduce((a, b) => a * b, 1);
    const columns = cmColumnsWorst(got.cms!, shape[0], 2, 3, V);
    t.ok(columns.range && columns.sum < 1e-5, `${ndim}D: averaged CM columns are distributions (worst |sum - 1| ${columns.sum.toExponential(2)})`);
    // Only the asked-for outputs, as the model.
    const probsOnly = await mirrored(model).predict(images, [...shape]);
    t.equal(probsOnly.cms, undefined);
    t.ok(maxDiff(probsOnly.probs, expected.probs) < 2e-6);
  }
});

t.test('a mirror-symmetric model: TTA returns the plain prediction', async (t) => {
  const images = inputs(2 * 10 * 6, 3);
  const shape = [2, 1, 10, 6];
  const plain = (await pointwise.predict(images, shape, { cms: true, annotatorProbs: true })) as Outputs;
  const tta = (await mirrored(pointwise).predict(images, shape, { cms: true, annotatorProbs: true })) as Outputs;
  for (const name of OUTPUTS) t.equal(differing(tta[name]!, plain[name]!), 0, `pointwise model: ${name} bit for bit`);
  const window = await slidingWindowPredict(pointwise, images.subarray(0, 60), { d: 1, h: 10, w: 6 }, { patch: [4, 4], cms: true, mirror: true });
  const noMirror = await slidingWindowPredict(pointwise, images.subarray(0, 60), { d: 1, h: 10, w: 6 }, { patch: [4, 4], cms: true });
  t.equal(differing(window.probs, noMirror.probs), 0, 'sliding windows with mirror: the same bits');
  t.equal(differing(window.cms!, noMirror.cms!), 0);

  // A U-Net whose every kernel is mirror-symmetric (3x3 convolutions, 2x2 transposed
  // convolutions) is equivariant up to rounding: TTA stays at its plain prediction.
  const model = tiny(2, 5, { depth: 3 });
  t.teardown(() => model.dispose());
  const weights = model.getWeights();
  for (const { name, shape: s } of model.parameters()) {
    if (s.length !== 4 || s[2] === 1) continue;
    const flips = mirrorings([2, 3]);
    const sum = new Float64Array(weights[name].length);
    for (const flip of flips) flipReference(weights[name], s, flip).forEach((x, i) => (sum[i] += x / flips.length));
    weights[name] = Float32Array.from(sum);
  }
  model.setWeights(weights);
  const x = inputs(2 * 8 * 12, 9);
  const sym = await model.predict(x, [2, 1, 8, 12], { cms: true, annotatorProbs: true });
  const symTta = await mirrored(model).predict(x, [2, 1, 8, 12], { cms: true, annotatorProbs: true });
  for (const name of OUTPUTS) t.ok(maxDiff(sym[name]!, symTta[name]!) < 1e-5, `symmetric U-Net: ${name} within 1e-5 (${maxDiff(sym[name]!, symTta[name]!).toExponential(2)})`);
});

t.test('sliding windows with mirror: each window mirrored; one window = the mean of the mirrored predictions', async (t) => {
  const model = tiny(3, 11);
  t.teardown(() => model.dispose());
  const extent = { d: 8, h: 8, w: 8 };
  const volume = inputs(2 * 512, 4);
  const one = await slidingWindowPredict(model, volume, extent, { patch: [8, 8, 8], cms: true, annotatorProbs: true, mirror: true });
  t.equal(one.windows, 1);
  const expected = await meanOfMirrored(model, volume, [1, 2, 8, 8, 8]);
  for (const name of OUTPUTS) t.ok(maxDiff(one[name]!, expected[name]) < 2e-6, `${name}: max diff ${maxDiff(one[name]!, expected[name]).toExponential(2)}`);
  // Several windows: the option is the mirrored() wrapper around each window's prediction.
  const big = { d: 6, h: 12, w: 10 };
  const vol = inputs(2 * 6 * 12 * 10, 5);
  const a = await slidingWindowPredict(model, vol, big, { patch: [4, 8, 8], cms: true, mirror: true });
  const b = await slidingWindowPredict(mirrored(model), vol, big, { patch: [4, 8, 8], cms: true });
  t.equal(differing(a.probs, b.probs) + differing(a.cms!, b.cms!), 0, 'option = wrapper, bit for bit');
  const columns = cmColumnsWorst(a.cms!, 1, 2, 3, 6 * 12 * 10);
  t.ok(columns.range && columns.sum < 1e-5, `stitched TTA CM columns sum to 1 (worst ${columns.sum.toExponential(2)})`);
  const axes = await slidingWindowPredict(model, vol, big, { patch: [4, 8, 8], mirror: [2] });
  const axesWrapped = await slidingWindowPredict(mirrored(model, [2]), vol, big, { patch: [4, 8, 8] });
  t.equal(differing(axes.probs, axesWrapped.probs), 0, 'mirror: [2] mirrors along w only');
  await t.rejects(slidingWindowPredict(model, vol, big, { patch: [4, 8, 8], mirror: [3] }), /mirror axis 3/);
});

t.test('ensemble = the mean of its members', async (t) => {
  const members: Model[] = [tiny(2, 1), tiny(2, 2), tiny(2, 3, { depth: 3 })];
  t.teardown(() => Promise.all(members.map((m) => m.dispose())));
  const shape = [2, 1, 8, 12];
  const images = inputs(2 * 96, 6);
  const each = [];
  for (const m of members) each.push((await m.predict(images, shape, { cms: true, annotatorProbs: true })) as Outputs);
  const mean = ensemble(members);
  t.equal(mean.config.depth, 3, "the ensemble's depth is its deepest member's");
  const got = (await mean.predict(images, shape, { cms: true, annotatorProbs: true })) as Outputs;
  for (const name of OUTPUTS) {
    const expected = new Float64Array(got[name]!.length);
    for (const p of each) p[name]!.forEach((x, i) => (expected[i] += x / each.length));
    t.ok(maxDiff(got[name]!, expected) < 2e-6, `${name}: max |ensemble - mean| ${maxDiff(got[name]!, expected).toExponential(2)}`);
  }
  const columns = cmColumnsWorst(got.cms!, 2, 2, 3, 96);
  t.ok(columns.range && columns.sum < 1e-5, `averaged CM columns sum to 1 (worst ${columns.sum.toExponential(2)})`);
  const twice = await ensemble([members[0], members[0]]).predict(images, shape, { cms: true, annotatorProbs: true });
  for (const name of OUTPUTS) t.equal(differing(twice[name]!, each[0][name]!), 0, `one model twice: ${name} bit for bit`);
  t.equal(ensemble([members[0]]), members[0], 'one member: the model itself');

  // TTA of an ensemble: the mean over mirrorings and members alike.
  const both = await mirrored(mean).predict(images, shape);
  const expected = new Float64Array(both.probs.length);
  for (const m of members) (await meanOfMirrored(m, images, shape)).probs.forEach((x, i) => (expected[i] += x / members.length));
  t.ok(maxDiff(both.probs, expected) < 2e-6, 'mirrored(ensemble): mean over members and mirrorings');

  const other = tiny(2, 4, { classes: 2 });
  const threeD = tiny(3, 4);
  t.teardown(() => Promise.all([other.dispose(), threeD.dispose()]));
  t.throws(() => ensemble([members[0], other]), /ensemble member 1 has classes 2, member 0 has classes 3: members must share ndim, inChannels, classes, annotators/);
  t.throws(() => ensemble([members[0], members[1], threeD]), /ensemble member 2 has ndim 3, member 0 has ndim 2/);
  t.throws(() => ensemble([]), /at least one model/);
});

// ---------------------------------------------------------------------------
// The command line

/** A tiny model saved through the API after one Adam step on thresholded random images. */
async function apiCheckpoint(file: string, config: { ndim: 2 | 3; inChannels: number; classes: number; annotators: number; depth: number }, size: number[], seed: number): Promise<void> {
  const model = createModel({ ...config, baseChannels: 4, seed, optimizer: { kind: 'adam', lr: 1e-3 } });
  const V = size.reduce((a, b) => a * b, 1);
  const images = Float32Array.from({ length: 2 * config.inChannels * V }, (_, i) => ((i * 7919 + seed) % 101) / 100);
  const labels = Array.from({ length: config.annotators }, (_, r) => Uint8Array.from({ length: 2 * V }, (_, i) => (images[i] > 0.3 + 0.1 * r ? i % config.classes : 0)));
  await model.trainStep({ images, shape: [2, config.inChannels, ...size], labels });
  await saveCheckpoint(model, path.join(dir, file));
  await model.dispose();
}

t.test('cmseg eval and predict on mnist-tiny runs: --tta, two checkpoints, mismatches', async (t) => {
  for (const [out, extra] of [
    ['runs/a', []],
    ['runs/b', ['--seed', '1']],
    ['runs/other-data', ['--data-seed', '1']],
    ['runs/naive', ['--method', 'naive-mean']],
  ] as const) {
    const r = await cli(['train', '--preset', 'mnist-tiny', '--steps', '2', '--out', out, '--no-test', '--quiet', ...extra]);
    t.equal(r.exitCode, 0, r.stderr);
  }
  await apiCheckpoint('api-3classes.safetensors', { ndim: 2, inChannels: 1, classes: 3, annotators: 4, depth: 2 }, [8, 8], 1);
  const [a, b] = ['runs/a/best.safetensors', 'runs/b/best.safetensors'];

  const plain = await cli(['eval', '--checkpoint', a, '--split', 'validation', '--out', 'plain.json']);
  t.equal(plain.exitCode, 0, plain.stderr);
  t.same(json('plain.json').checkpoints, [path.join(dir, a)]);
  t.equal(json('plain.json').tta, false);
  t.equal(json('plain.json').method, 'cm');
  t.notOk('methods' in json('plain.json'), 'one checkpoint: no "methods"');
  const twice = await cli(['eval', '--checkpoint', a, a, '--split', 'validation', '--out', 'twice.json']);
  t.equal(twice.exitCode, 0, twice.stderr);
  t.same(json('twice.json').metrics, json('plain.json').metrics, 'an ensemble of one checkpoint twice scores as that checkpoint');

  const both = await cli(['eval', '--checkpoint', a, '--checkpoint', b, '--tta', '--split', 'validation']);
  t.equal(both.exitCode, 0, both.stderr);
  t.match(both.stdout, /^ensemble of 2 checkpoints \(cm at step 2, cm at step 2\) with mirroring TTA \(4 flips\), validation split:\n/);
  const bothFile = `runs/a/eval-validation-best-ensemble2-${hashOf(a, b)}-tta.json`;
  t.match(both.stdout, `outputs:\n  metrics  ${bothFile}\n`, 'its own default file, beside the plain scores');
  const record = json(bothFile);
  t.same(record.checkpoints, [path.join(dir, a), path.join(dir, b)], 'the repeated flag collects both');
  t.equal(record.tta, true);
  t.same([record.method, record.methods], ['cm', ['cm', 'cm']], 'members of one method: that method, and each');
  t.ok(record.metrics.averageDice.mean >= 0 && record.metrics.cmError.mean > 0, 'scored, with the CM error');

  // What those scores must be: both checkpoints loaded through the API, every validation image
  // predicted by each of them on the 4 mirror images (flipped by hand, flipped back by hand),
  // the 8 predictions averaged in Float64, and the figures computed from that prediction.
  // Without --tta the reference is the mean of the two plain predictions.
  const members = [await loadCheckpoint(path.join(dir, a)), await loadCheckpoint(path.join(dir, b))];
  t.teardown(() => Promise.all(members.map((m) => m.dispose())));
  const set = loadExperimentData(record.dataset as DatasetSpec, record.seed).split!('validation');
  const batch = gatherBatch(set, Array.from({ length: set.count }, (_, i) => i));
  const [N, L, R] = [set.count, set.classes, set.labels.length];
  t.notOk(batch.consensus!.includes(255), 'the validation consensus labels every pixel (the hand Dice counts them all)');
  const plainEnsemble = await cli(['eval', '--checkpoint', a, b, '--split', 'validation', '--out', 'ensemble-plain.json']);
  t.equal(plainEnsemble.exitCode, 0, plainEnsemble.stderr);
  const references: [string, EvaluationSummary, boolean][] = [
    ['--checkpoint a b --tta', record.metrics, true],
    ['--checkpoint a b', json('ensemble-plain.json').metrics, false],
  ];
  const totals: number[] = [];
  for (const [label, metrics, mirror] of references) {
    const reference = handEnsemble(members, mirror);
    const expected = (await reference.predict(batch.images, batch.shape, { cms: true, annotatorProbs: true })) as Outputs;
    const hand = handFigures(expected, batch.consensus!, N, L, R);
    totals.push(hand.total);
    t.equal(metrics.images, N, `${label}: every validation image`);
    t.ok(maxDiff(metrics.dicePerClass.map((d) => d.mean), hand.dice) < 1e-12, `${label}: Dice per class ${metrics.dicePerClass.map((d) => d.mean)} = the hand figures ${hand.dice}`);
    t.ok(Math.abs(metrics.averageDice.mean - hand.average) < 1e-12, `${label}: Average Dice ${metrics.averageDice.mean} = ${hand.average}`);
    t.ok(Math.abs(metrics.totalDice.mean - hand.total) < 1e-12, `${label}: Total Dice ${metrics.totalDice.mean} = ${hand.total}`);
    // Float32 running mean vs Float64 mean: a few ulps per CM entry, below 1e-8 in a mean over
    // pixels (2.7e-10 seen); the mirrorings move these reliabilities by about 7e-6.
    t.ok(maxDiff(metrics.reliability!, hand.reliability) < 1e-8, `${label}: reliability ${metrics.reliability} = mean trace(A_r)/L of the hand prediction ${hand.reliability} (max diff ${maxDiff(metrics.reliability!, hand.reliability).toExponential(2)})`);
    // The CM error and GED of the same hand prediction (the metric code is tested elsewhere: here the prediction is).
    const scored = await evaluateModel(reference, set);
    t.ok(Math.abs(metrics.cmError!.mean - scored.cmError!.mean) < 1e-8, `${label}: CM error ${metrics.cmError!.mean} = that of the hand prediction ${scored.cmError!.mean}`);
    t.ok(maxDiff(metrics.cmErrorPerAnnotator!.map((e) => e.mean), scored.cmErrorPerAnnotator!.map((e) => e.mean)) < 1e-8, `${label}: CM error per annotator`);
    t.ok(Math.abs(metrics.ged!.mean - scored.ged!.mean) < 1e-9, `${label}: GED ${metrics.ged!.mean} = that of the hand prediction ${scored.ged!.mean}`);
  }
  // The references tell TTA from no TTA (so the checks above can fail): the mirrorings move the Total Dice.
  t.ok(Math.abs(totals[0] - totals[1]) > 1e-3, `TTA changes the hand Total Dice (${totals[0]} vs ${totals[1]})`);
  const plainTotal = json('ensemble-plain.json').metrics.totalDice.mean;
  t.ok(Math.abs(record.metrics.totalDice.mean - plainTotal) > 1e-3, `--tta scores differ from the plain ensemble's (Total Dice ${record.metrics.totalDice.mean} vs ${plainTotal})`);

  // Another ensemble led by the same checkpoint: a file of its own (not to overwrite the one above), and a mixed method.
  const n = 'runs/naive/best.safetensors';
  const mixed = await cli(['eval', '--checkpoint', a, n, '--tta', '--split', 'validation']);
  t.equal(mixed.exitCode, 0, mixed.stderr);
  const mixedFile = `runs/a/eval-validation-best-ensemble2-${hashOf(a, n)}-tta.json`;
  t.not(mixedFile, bothFile);
  t.match(mixed.stdout, `outputs:\n  metrics  ${mixedFile}\n`);
  t.same(json(bothFile).checkpoints, [path.join(dir, a), path.join(dir, b)], 'the first ensemble\'s scores are still there');
  const mixedRecord = json(mixedFile);
  t.same([mixedRecord.method, mixedRecord.methods], ['ensemble', ['cm', 'naive-mean']], 'members of different methods: "ensemble", and each one\'s');
  const help = (await cliHelp(['eval', '--help'])).replace(/\s+/g, ' ');
  t.match(help, '-ensemble<N>-<hash> for N checkpoints, <hash> the first 8 hex digits of the SHA-1 of their absolute paths (one a line, in order)', '--help says so');

  const pictures = await cli(['predict', '--checkpoint', a, b, '--tta', '--out', 'pictures', '--count', '1']);
  t.equal(pictures.exitCode, 0, pictures.stderr);
  t.match(pictures.stdout, /wrote 12 PNG files for 1 test images/);
  const legend = fs.readFileSync(path.join(dir, 'pictures', 'README.txt'), 'utf8');
  t.match(legend, /^Predictions of the mean \(ensemble\) of 2 checkpoints: .*runs\/a\/best\.safetensors \(cm, step 2\), .*runs\/b\/best\.safetensors \(cm, step 2\) on the first 1 test images\.\nTest-time augmentation \(--tta\): every output is the mean of the predictions of the 4 mirror images/);

  const data = await cli(['eval', '--checkpoint', a, 'runs/other-data/best.safetensors', '--split', 'validation']);
  t.equal(data.exitCode, 1);
  t.match(data.stderr, /^cmseg: error: runs\/other-data\/best\.safetensors was trained on other data than runs\/a\/best\.safetensors \(dataset\.dataSeed: 1 vs 0\): .*give --data <dir>/);
  const arch = await cli(['predict', '--checkpoint', a, 'api-3classes.safetensors', '--out', 'x']);
  t.equal(arch.exitCode, 1);
  t.match(arch.stderr, /^cmseg: error: api-3classes\.safetensors and runs\/a\/best\.safetensors cannot be averaged: classes 3 in api-3classes\.safetensors, 2 in runs\/a\/best\.safetensors \(the checkpoints of an ensemble must share ndim, inChannels, classes, annotators\)\n$/);
});

t.test('cmseg predict and eval on a tiny BraTS phantom: --tta, two checkpoints', async (t) => {
  const phantom = await cli(['phantom', 'brats', '--cases', '3', '--out', 'brats', '--size', '32,32,24', '--seed', '4']);
  t.equal(phantom.exitCode, 0, phantom.stderr);
  const config = { ndim: 3 as const, inChannels: 4, classes: 4, annotators: 3, depth: 2 };
  await apiCheckpoint('api3d-a.safetensors', config, [8, 8, 8], 1);
  await apiCheckpoint('api3d-b.safetensors', config, [8, 8, 8], 2);
  await apiCheckpoint('api3d-1ch.safetensors', { ...config, inChannels: 1 }, [8, 8, 8], 3);

  const pred = await cli(['predict', '--checkpoint', 'api3d-a.safetensors', 'api3d-b.safetensors', '--tta', '--data', 'brats', '--patch', '16', '--out', 'pred3d']);
  t.equal(pred.exitCode, 0, pred.stderr);
  t.match(pred.stderr, /\[1\/3\] BraTS2021_00000: \d+ windows \(each predicted 16 times\)/);
  const legend = fs.readFileSync(path.join(dir, 'pred3d', 'README.txt'), 'utf8');
  t.match(legend, /^Predictions of the mean \(ensemble\) of 2 checkpoints: .*api3d-a\.safetensors \(model, step 1\), .*api3d-b\.safetensors \(model, step 1\) for 3 case\(s\)/);
  t.match(legend, /Test-time augmentation \(--tta\): .* the 8 mirror images .* Each window is mirrored, as in nnU-Net\./);
  const probs = await readNifti(path.join(dir, 'pred3d', 'BraTS2021_00000_probs.nii.gz'));
  const V = probs.dims.slice(0, 3).reduce((x, y) => x * y, 1);
  let worst = 0;
  for (let v = 0; v < V; v++) worst = Math.max(worst, Math.abs(probs.data[v] + probs.data[V + v] + probs.data[2 * V + v] + probs.data[3 * V + v] - 1));
  t.ok(worst < 1e-5, `averaged probabilities sum to 1 per voxel (worst ${worst.toExponential(2)})`);

  // What the file must hold: the case's crop, windowed as predict windows it (16^3, overlap 0.5,
  // 2 windows a batch), each window predicted by both checkpoints (loaded through the API) on
  // its 8 mirror images, flipped and flipped back by hand and averaged in Float64; in class
  // order, put back on the case's grid (background 1 outside the crop), with the consensus
  // the BraTS 2021 label of the most probable class.
  const members3d = [await loadCheckpoint(path.join(dir, 'api3d-a.safetensors')), await loadCheckpoint(path.join(dir, 'api3d-b.safetensors'))];
  t.teardown(() => Promise.all(members3d.map((m) => m.dispose())));
  const case0 = await casesInData(path.join(dir, 'brats'), BRATS_GEOMETRY_TOLERANCE_MM).load('BraTS2021_00000');
  const released = await checkReleasedPrediction(t, path.join(dir, 'pred3d'), 'BraTS2021_00000', case0.crop);
  const byHand = await slidingWindowPredict(handEnsemble(members3d, true), case0.images, case0.extent, { patch: [16, 16, 16], overlap: 0.5, batchSize: 2 });
  const written = cropOfProbs(released.probs, released.dims, case0.crop);
  t.ok(maxDiff(written, byHand.probs) < 1e-5, `the written probabilities = the hand TTA ensemble's, class by class (max diff ${maxDiff(written, byHand.probs).toExponential(2)})`);
  const plainA = await slidingWindowPredict(members3d[0], case0.images, case0.extent, { patch: [16, 16, 16], overlap: 0.5, batchSize: 2 });
  t.ok(maxDiff(written, plainA.probs) > 1e-3, `and far from checkpoint a's plain prediction (max diff ${maxDiff(written, plainA.probs).toExponential(2)})`);

  const once = await cli(['eval', '--checkpoint', 'api3d-a.safetensors', '--data', 'brats', '--patch', '16', '--out', 'once.json']);
  t.equal(once.exitCode, 0, once.stderr);
  const twice = await cli(['eval', '--checkpoint', 'api3d-a.safetensors', 'api3d-a.safetensors', '--data', 'brats', '--patch', '16', '--out', 'twice3d.json']);
  t.equal(twice.exitCode, 0, twice.stderr);
  t.same(json('twice3d.json').metrics, json('once.json').metrics, 'one checkpoint twice scores as that checkpoint');
  const tta = await cli(['eval', '--checkpoint', 'api3d-a.safetensors', 'api3d-b.safetensors', '--tta', '--data', 'brats', '--patch', '16']);
  t.equal(tta.exitCode, 0, tta.stderr);
  t.match(tta.stdout, /^ensemble of 2 checkpoints \(model at step 1, model at step 1\) with mirroring TTA \(8 flips\), 3 case\(s\) from /);
  const record = json(`eval-brats-api3d-a-ensemble2-${hashOf('api3d-a.safetensors', 'api3d-b.safetensors')}-tta.json`);
  t.equal(record.tta, true);
  t.same(record.checkpoints, [path.join(dir, 'api3d-a.safetensors'), path.join(dir, 'api3d-b.safetensors')]);
  t.ok(record.metrics.brats.regions.wholeTumour.mean >= 0, 'region Dice scored');

  // Two runs on one cache: the first run's test split, scored and predicted by both, mirrored.
  const prepare = await cli(['prepare', '--data', 'brats', '--out', 'cache', '--quiet']);
  t.equal(prepare.exitCode, 0, prepare.stderr);
  for (const [out, seed] of [['runs/brats-a', '0'], ['runs/brats-b', '1']]) {
    const train = await cli(['train', '--preset', 'brats3d', '--data', 'cache', '--steps', '1', '--out', out, '--seed', seed, '--workers', '0', '--no-test', '--patch', '16', '--base-channels', '4', '--val-cases', '1', '--quiet']);
    t.equal(train.exitCode, 0, train.stderr);
  }
  const runs = ['runs/brats-a/best.safetensors', 'runs/brats-b/best.safetensors'];
  const runEval = await cli(['eval', '--checkpoint', ...runs, '--tta']);
  t.equal(runEval.exitCode, 0, runEval.stderr);
  t.match(runEval.stdout, /^ensemble of 2 checkpoints \(cm at step 1, cm at step 1\) with mirroring TTA \(8 flips\), test split:\n/);
  const runRecord = json(`runs/brats-a/eval-test-best-ensemble2-${hashOf(...runs)}-tta.json`);
  t.same([runRecord.tta, runRecord.checkpoints.length, runRecord.metrics.images], [true, 2, 1], 'the test case of the first run, by both, mirrored');

  // A shallower first run whose training patch (18) the deeper member's depth 4 cannot take: eval
  // scores the split with predict's window, 18 rounded up to a multiple of 8 (24), or --patch.
  const shallow = await cli(['train', '--preset', 'brats3d', '--data', 'cache', '--steps', '1', '--out', 'runs/brats-d2', '--depth', '2', '--patch', '18', '--workers', '0', '--no-test', '--base-channels', '4', '--val-cases', '1', '--quiet']);
  t.equal(shallow.exitCode, 0, shallow.stderr);
  const mixedDepths = ['runs/brats-d2/best.safetensors', runs[0]];
  const rounded = await cli(['eval', '--checkpoint', ...mixedDepths, '--out', 'depths.json']);
  t.equal(rounded.exitCode, 0, rounded.stderr);
  t.match(rounded.stdout, /^ensemble of 2 checkpoints \(cm at step 1, cm at step 1\), test split:\n/);
  t.equal(json('depths.json').metrics.images, 1);
  const patched = await cli(['eval', '--checkpoint', ...mixedDepths, '--patch', '16', '--out', 'depths16.json']);
  t.equal(patched.exitCode, 0, patched.stderr);
  t.equal(json('depths16.json').metrics.images, 1);
  const badPatch = await cli(['eval', '--checkpoint', ...mixedDepths, '--patch', '12']);
  t.equal(badPatch.exitCode, 1, '--patch is read on a run\'s split too');
  t.match(badPatch.stderr, /^cmseg: error: --patch 12 must be a multiple of 2\^\(depth-1\) = 8 \(the deepest of the 2 checkpoints has depth 4\)\n$/);
  const runPredict = await cli(['predict', '--checkpoint', ...runs, '--tta', '--out', 'pred-run']);
  t.equal(runPredict.exitCode, 0, runPredict.stderr);
  t.match(fs.readFileSync(path.join(dir, 'pred-run', 'README.txt'), 'utf8'), /^Predictions of the mean \(ensemble\) of 2 checkpoints: .*\(cm, step 1\), .*\(cm, step 1\) for 1 case\(s\) from the test split of the run/);
  const apiWithRun = await cli(['eval', '--checkpoint', runs[0], 'api3d-a.safetensors']);
  t.equal(apiWithRun.exitCode, 1);
  t.match(apiWithRun.stderr, /^cmseg: error: api3d-a\.safetensors records no training data, so it cannot be checked to share the split of runs\/brats-a\/best\.safetensors: give --data <dir>/);

  const mismatch = await cli(['eval', '--checkpoint', 'api3d-a.safetensors', 'api3d-1ch.safetensors', '--data', 'brats']);
  t.equal(mismatch.exitCode, 1);
  t.match(mismatch.stderr, /^cmseg: error: api3d-1ch\.safetensors and api3d-a\.safetensors cannot be averaged: inChannels 1 in api3d-1ch\.safetensors, 4 in api3d-a\.safetensors/);
});
