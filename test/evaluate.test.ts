// evaluateModel against the same figures computed here in one piece: its batches, its
// slices of the CMs and annotator probabilities, and its pairing of labels, presence
// flags and consensus with images must not change a number.
import t from 'tap';
import { argmaxAnnotatorProbs, argmaxClasses, createModel, evaluateSegmentation, type MeanStd } from '../src/index';
import { evaluateModel } from '../src/train/evaluate';
import type { AnnotatedSet } from '../src/train/data';

function rng(seed: number) {
  let s = seed >>> 0;
  return () => (s = (s * 1664525 + 1013904223) >>> 0) / 4294967296;
}

t.test('evaluateModel in batches equals the figures of the whole set at once', async (t) => {
  const rand = rng(7);
  const count = 7;
  const L = 3;
  const R = 2;
  const spatial = [8, 8];
  const V = 64;
  const images = Float32Array.from({ length: count * V }, () => rand() * 2 - 1);
  // Annotators agree with the consensus most of the time, each differently; 255 here and there.
  const consensus = Uint8Array.from({ length: count * V }, () => Math.floor(rand() * L));
  const labels = [0, 1].map(() => consensus.map((c) => (rand() < 0.1 ? 255 : rand() < 0.7 ? c : Math.floor(rand() * L))));
  const present = new Uint8Array(count * R).fill(1);
  present[3 * R + 1] = 0; // annotator 1 did not label image 3
  const set: AnnotatedSet = { count, channels: 1, classes: L, spatial, images, labels, present, consensus, annotatorNames: ['a', 'b'] };
  const model = createModel({ ndim: 2, inChannels: 1, classes: L, annotators: R, depth: 2, baseChannels: 4, seed: 3 });

  const summary = await evaluateModel(model, set, { batchSize: 3 });

  // The same predictions (batches of the same images: the model's numbers do not depend on
  // how evaluateModel slices them), scored in one call.
  const probs = new Float32Array(count * L * V);
  const cms = new Float32Array(count * R * L * L * V);
  const q = new Float32Array(count * R * L * V);
  for (let start = 0; start < count; start += 3) {
    const n = Math.min(3, count - start);
    const p = await model.predict(images.slice(start * V, (start + n) * V), [n, 1, ...spatial], { cms: true, annotatorProbs: true });
    probs.set(p.probs, start * L * V);
    cms.set(p.cms!, start * R * L * L * V);
    q.set(p.annotatorProbs!, start * R * L * V);
  }
  const report = evaluateSegmentation({
    pred: argmaxClasses(probs, count, L),
    truth: consensus,
    n: count,
    classes: L,
    cms,
    annotatorLabels: labels,
    present,
    annotatorPreds: argmaxAnnotatorProbs(q, count, R, L),
  });

  const same = (a: MeanStd | undefined, b: MeanStd | undefined, what: string) =>
    t.ok(a && b && Math.abs(a.mean - b.mean) < 1e-12 && Math.abs(a.std - b.std) < 1e-12, `${what}: ${a?.mean} vs ${b?.mean}`);
  t.equal(summary.images, count);
  summary.dicePerClass.forEach((d, k) => same(d, report.dicePerClass[k], `Dice of class ${k}`));
  same(summary.averageDice, report.averageDice, 'average Dice');
  same(summary.totalDice, report.totalDice, 'Total Dice');
  same(summary.cmError, report.cmError, 'CM error');
  summary.cmErrorPerAnnotator!.forEach((e, r) => same(e, report.cmErrorPerAnnotator![r], `CM error of annotator ${r}`));
  same(summary.ged, report.ged, 'GED');
  t.same(summary.reliability, report.reliability, 'reliability');
  t.same(summary.incompetence, report.incompetence, 'incompetence');
  t.same(summary.annotatorNames, ['a', 'b']);
  t.ok(summary.cmError!.mean > 0 && summary.averageDice.mean > 0, 'the figures are not trivially 0');
});
