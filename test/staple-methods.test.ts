// The naive STAPLE methods: the training set is fused once (native STAPLE), the
// fused map travels with each image through batching and augmentation, and the
// model trains on it with plain cross-entropy.
import t from 'tap';
import { fuseTrainingSet } from '../src/train/experiment';
import { gatherBatch, AnnotatedSet } from '../src/train/data';
import { methodBatch, methodDefinition } from '../src/train/methods';
import { augmentBatch } from '../src/train/augment';
import { Rng } from '../src/data/random';

function set(): AnnotatedSet {
  const count = 6, V = 16;
  const consensus = new Uint8Array(count * V).map((_, i) => ((i * 7) % 5 < 2 ? 1 : 0));
  // Two faithful annotators and one that marks everything foreground.
  const labels = [consensus.slice(), consensus.slice(), new Uint8Array(count * V).fill(1)];
  return { count, channels: 1, classes: 2, spatial: [4, 4], images: Float32Array.from(consensus, (x) => x * 2 - 1), labels, present: new Uint8Array(count * 3).fill(1), consensus, annotatorNames: ['a', 'b', 'c'] };
}

t.test('STAPLE fusion of the training set recovers the consensus and rides along with the batch', async (t) => {
  for (const fusion of ['multi-staple', 'spatial-staple'] as const) {
    const s = set();
    s.fused = await fuseTrainingSet(s, fusion);
    t.same(Array.from(s.fused), Array.from(s.consensus!), `${fusion}: two reliable raters outvote the third`);
    const batch = gatherBatch(s, [4, 1]);
    t.same(Array.from(batch.fused!), Array.from(s.consensus!.subarray(64, 80)).concat(Array.from(s.consensus!.subarray(16, 32))));
    const aug = augmentBatch(batch, { flips: true, rotations: true }, new Rng(3));
    // The fused map moves exactly like the consensus.
    t.same(Array.from(aug.fused!), Array.from(aug.consensus!));
    const mb = methodBatch(methodDefinition(fusion === 'multi-staple' ? 'naive-staple' : 'naive-spatial-staple'), aug, 2);
    t.equal(mb.target, aug.fused);
    t.equal(mb.labels, undefined);
  }
  t.throws(() => methodBatch(methodDefinition('naive-staple'), gatherBatch(set(), [0]), 2), /were not prepared/);
});
