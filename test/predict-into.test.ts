// Predictions written into the caller's arrays (model.ts's predictInto, which sliding-window
// inference uses to reuse one set of outputs per volume): the same bits as a fresh prediction
// in every CM mode, every element written (arrays filled with NaN first), the very arrays
// returned, bad arrays refused by name, and slidingWindowPredict through it equal, bit for bit,
// to the same model's predictions in fresh arrays (short last batch, pipelined or not).
import t from 'tap';
import { createModel } from '../src/index';
import { predictInto, type Model, type Prediction, type PredictOutputs } from '../src/model/model';
import { slidingWindowPredict } from '../src/model/sliding-window';

function noise(length: number, seed: number): Float32Array {
  let s = seed >>> 0;
  return Float32Array.from({ length }, () => ((s = (s * 1664525 + 1013904223) >>> 0) / 2147483648) - 1);
}

const sameBits = (a: Float32Array | undefined, b: Float32Array | undefined) =>
  a !== undefined && b !== undefined && a.length === b.length && Buffer.compare(Buffer.from(a.buffer, a.byteOffset, a.byteLength), Buffer.from(b.buffer, b.byteOffset, b.byteLength)) === 0;

const into = (model: Model, images: Float32Array, shape: number[], options: { cms?: boolean; annotatorProbs?: boolean }, outputs: PredictOutputs): Promise<Prediction> =>
  (model as unknown as Record<symbol, (...a: unknown[]) => Promise<Prediction>>)[predictInto].call(model, images, shape, options, outputs);

const modes = [
  { cmMode: 'full' as const },
  { cmMode: 'lowrank' as const, cmRank: 1 },
  { cmMode: 'global' as const },
];

for (const mode of modes) {
  t.test(`predictInto writes every output, the same bits as predict (${mode.cmMode})`, async (t) => {
    const model = createModel({ ndim: 3, inChannels: 2, classes: 3, annotators: 2, depth: 2, baseChannels: 4, seed: 3, ...mode });
    t.teardown(() => model.dispose());
    const shape = [2, 2, 4, 6, 8];
    const images = noise(2 * 2 * 4 * 6 * 8, 11);
    const options = { cms: true, annotatorProbs: true };
    const fresh = await model.predict(images, shape, options);
    const V = 4 * 6 * 8;
    const given = {
      probs: new Float32Array(2 * 3 * V).fill(NaN),
      cms: new Float32Array(2 * 2 * 9 * V).fill(NaN),
      annotatorProbs: new Float32Array(2 * 2 * 3 * V).fill(NaN),
    };
    const out = await into(model, images, shape, options, given);
    t.equal(out.probs, given.probs, 'probs is the given array');
    t.equal(out.cms, given.cms, 'cms is the given array');
    t.equal(out.annotatorProbs, given.annotatorProbs, 'annotatorProbs is the given array');
    t.ok(sameBits(out.probs, fresh.probs), 'probs equal a fresh prediction bit for bit (no NaN left)');
    t.ok(sameBits(out.cms, fresh.cms), 'cms equal');
    t.ok(sameBits(out.annotatorProbs, fresh.annotatorProbs), 'annotatorProbs equal');
    t.same(out.cmsShape, [2, 2, 3, 3, 4, 6, 8]);
    // Only some given: the others are allocated as usual.
    const partial = await into(model, images, shape, options, { cms: new Float32Array(2 * 2 * 9 * V) });
    t.ok(sameBits(partial.probs, fresh.probs) && sameBits(partial.cms, fresh.cms) && sameBits(partial.annotatorProbs, fresh.annotatorProbs));
  });
}

t.test('predictInto refuses arrays it cannot write, naming them', async (t) => {
  const model = createModel({ ndim: 2, inChannels: 1, classes: 2, annotators: 2, depth: 2, baseChannels: 4, seed: 1 });
  t.teardown(() => model.dispose());
  const shape = [1, 1, 8, 8];
  const images = noise(64, 5);
  const both = { cms: true, annotatorProbs: true };
  await t.rejects(into(model, images, shape, both, { cms: new Float32Array(2 * 4 * 64 - 1) }), /predict outputs\.cms/);
  await t.rejects(into(model, images, shape, both, { probs: new Float64Array(128) as unknown as Float32Array }), /predict outputs\.probs.*Float32Array/);
  await t.rejects(into(model, images, shape, {}, { cms: new Float32Array(2 * 4 * 64) }), /predict outputs\.cms was given for an output not asked for/);
  await t.rejects(into(model, images, shape, both, { logits: new Float32Array(128) } as PredictOutputs), /logits/);
  // A GPU model reads its images in place while it writes the outputs (and predictInto does
  // not copy them): outputs sharing the images' memory are refused.
  const shared = new Float32Array(64 + 128);
  const imagesView = shared.subarray(0, 64);
  imagesView.set(images);
  await t.rejects(into(model, imagesView, shape, {}, { probs: shared.subarray(32, 160) }), /predict outputs\.probs shares memory with the images/);
  // q is computed from p: outputs sharing memory would give wrong numbers.
  const one = new Float32Array(128 + 2 * 2 * 64);
  await t.rejects(
    into(model, images, shape, { annotatorProbs: true }, { probs: one.subarray(0, 128), annotatorProbs: one.subarray(64, 64 + 256) }),
    /predict outputs\.annotatorProbs shares memory with predict outputs\.probs/,
  );
  // Disjoint views of one buffer are fine.
  const fresh = await model.predict(images, shape, { annotatorProbs: true });
  const ok = await into(model, images, shape, { annotatorProbs: true }, { probs: one.subarray(0, 128), annotatorProbs: one.subarray(128) });
  t.ok(sameBits(ok.probs, fresh.probs) && sameBits(ok.annotatorProbs, fresh.annotatorProbs), 'disjoint views of one buffer predict correctly');
  // The refusals left the model usable.
  t.ok(sameBits((await model.predict(images, shape)).probs, fresh.probs));
});

t.test('slidingWindowPredict writes a Model\'s batches into reused arrays, the same bits as fresh ones', async (t) => {
  const model = createModel({ ndim: 3, inChannels: 2, classes: 3, annotators: 2, depth: 2, baseChannels: 4, seed: 9 });
  t.teardown(() => model.dispose());
  const extent = { d: 8, h: 12, w: 20 };
  const volume = noise(2 * 8 * 12 * 20, 21);
  // 1 x 2 x 4 = 8 windows of 8^3 at overlap 0.5: batches of 3 leave a short last one.
  const base = { patch: [8, 8, 8], overlap: 0.5, batchSize: 3, cms: true, annotatorProbs: true };
  // A plain object is not the Model: its predictions come in fresh arrays.
  const plain = { config: model.config, predict: model.predict.bind(model) };
  const reference = await slidingWindowPredict(plain, volume, extent, base);
  t.equal(reference.windows, 8);
  const original = (model as unknown as Record<symbol, (...a: unknown[]) => Promise<Prediction>>)[predictInto];
  for (const pipeline of [false, true]) {
    const seen: Float32Array[] = [];
    Object.defineProperty(model, predictInto, {
      configurable: true,
      value(this: Model, ...args: unknown[]) {
        seen.push((args[3] as PredictOutputs).cms!);
        return original.apply(this, args);
      },
    });
    const got = await slidingWindowPredict(model, volume, extent, { ...base, pipeline });
    t.equal(seen.length, 3, `pipeline ${pipeline}: every batch went through predictInto`);
    const buffers = new Set(seen.map((a) => a.buffer));
    t.equal(buffers.size, pipeline ? 2 : 1, `pipeline ${pipeline}: ${pipeline ? 'two sets' : 'one set'} of output arrays reused`);
    t.equal(seen[2].length, (seen[0].length / 3) * 2, 'the short last batch writes a view of its two windows');
    t.ok(sameBits(got.probs, reference.probs), `pipeline ${pipeline}: probs equal`);
    t.ok(sameBits(got.cms, reference.cms), `pipeline ${pipeline}: cms equal`);
    t.ok(sameBits(got.annotatorProbs, reference.annotatorProbs), `pipeline ${pipeline}: annotatorProbs equal`);
  }
});

t.test('mirrored (TTA) writes a Model\'s mirrorings into one reused set, the same bits as fresh ones', async (t) => {
  const { mirrored } = await import('../src/model/tta');
  const model = createModel({ ndim: 3, inChannels: 2, classes: 3, annotators: 2, depth: 2, baseChannels: 4, seed: 13 });
  t.teardown(() => model.dispose());
  const shape = [2, 2, 4, 6, 8];
  const images = noise(2 * 2 * 4 * 6 * 8, 17);
  const plain = { config: model.config, predict: model.predict.bind(model) };
  const original = (model as unknown as Record<symbol, (...a: unknown[]) => Promise<Prediction>>)[predictInto];
  for (const options of [{ cms: true, annotatorProbs: true }, {}]) {
    const reference = await mirrored(plain).predict(images, shape, options);
    const seen: PredictOutputs[] = [];
    Object.defineProperty(model, predictInto, {
      configurable: true,
      value(this: Model, ...args: unknown[]) {
        seen.push(args[3] as PredictOutputs);
        return original.apply(this, args);
      },
    });
    const got = await mirrored(model).predict(images, shape, options);
    t.equal(seen.length, 7, 'the 7 mirrorings after the first went through predictInto');
    t.equal(new Set(seen.map((s) => s.probs)).size, 1, 'into one set of arrays');
    t.same(Object.keys(seen[0]).sort(), Object.keys(reference).filter((k) => !k.endsWith('Shape')).sort(), 'holding the outputs asked for');
    t.ok(sameBits(got.probs, reference.probs), 'probs equal');
    t.equal(got.cms === undefined, reference.cms === undefined);
    if (reference.cms) t.ok(sameBits(got.cms, reference.cms) && sameBits(got.annotatorProbs, reference.annotatorProbs), 'cms and annotatorProbs equal');
    t.not(got.probs, seen[0].probs, 'the mean is not the reused set');
    delete (model as unknown as Record<symbol, unknown>)[predictInto];
  }
});

t.test('ensemble writes its Model members after the first into one reused set, the same bits as fresh ones', async (t) => {
  const { ensemble } = await import('../src/model/ensemble');
  const members = [1, 2, 3].map((seed) => createModel({ ndim: 2, inChannels: 1, classes: 3, annotators: 2, depth: 2, baseChannels: 4, seed }));
  t.teardown(() => Promise.all(members.map((m) => m.dispose())));
  const shape = [2, 1, 8, 8];
  const images = noise(2 * 64, 19);
  const options = { cms: true, annotatorProbs: true };
  const plain = members.map((m) => ({ config: m.config, predict: m.predict.bind(m) }));
  const reference = await ensemble(plain).predict(images, shape, options);
  const seen: PredictOutputs[] = [];
  for (const m of members) {
    const original = (m as unknown as Record<symbol, (...a: unknown[]) => Promise<Prediction>>)[predictInto];
    Object.defineProperty(m, predictInto, {
      configurable: true,
      value(this: Model, ...args: unknown[]) {
        seen.push(args[3] as PredictOutputs);
        return original.apply(this, args);
      },
    });
  }
  const got = await ensemble([members[0], members[1], members[2], members[1]]).predict(images, shape, options);
  t.equal(seen.length, 2, 'members 1 and 2 (member 1 given twice predicts once) went through predictInto');
  t.equal(seen[0].cms, seen[1].cms, 'into one set');
  const weighted = await ensemble([plain[0], plain[1], plain[2], plain[1]]).predict(images, shape, options);
  t.ok(sameBits(got.probs, weighted.probs) && sameBits(got.cms, weighted.cms) && sameBits(got.annotatorProbs, weighted.annotatorProbs), 'the same bits as fresh arrays');
  t.notOk(sameBits(got.probs, reference.probs), 'the weighting of a member given twice is kept (not the plain mean)');
  t.not(got.probs, seen[0].probs, 'the mean is not the reused set');
});
