// MNIST as a segmentation task: the package's digits, padded to 32x32, thresholded, split.
import t from 'tap';
import {
  MNIST_PAD,
  MNIST_SIZE,
  MNIST_THRESHOLD,
  loadMnistDigits,
  loadMnistSplits,
  mnistBatch,
  padDigits,
} from '../src/data/mnist';
import { simulateAnnotators } from '../src/data/annotators';

t.test('the package ships 10,000 digits in [0, 1]', async (t) => {
  const digits = loadMnistDigits();
  t.equal(digits.count, 10000);
  t.equal(digits.images.length, 10000 * 28 * 28);
  const perDigit = new Array(10).fill(0);
  for (const d of digits.digits) perDigit[d]++;
  t.ok(perDigit.every((k) => k > 800), `digits per class ${perDigit}`);
  let min = Infinity;
  let max = -Infinity;
  for (const v of digits.images) {
    if (v < min) min = v;
    if (v > max) max = v;
  }
  t.ok(min >= 0 && max <= 1 && max > 0.9, `intensities in [${min}, ${max}]`);
  t.equal(loadMnistDigits(), digits, 'read once per process');
});

t.test('padding puts the 28x28 digit in the middle of 32x32', async (t) => {
  const raw = new Float32Array(28 * 28).map((_, i) => (i + 1) / 784);
  const padded = padDigits(raw, 1);
  t.equal(padded.length, 32 * 32);
  t.equal(padded[MNIST_PAD * 32 + MNIST_PAD], raw[0], 'first pixel moves to (2, 2)');
  t.equal(padded[(MNIST_PAD + 27) * 32 + MNIST_PAD + 27], raw[783], 'last pixel moves to (29, 29)');
  let border = 0;
  for (let y = 0; y < 32; y++) {
    for (let x = 0; x < 32; x++) {
      const inside = y >= 2 && y < 30 && x >= 2 && x < 30;
      if (!inside) border += padded[y * 32 + x];
    }
  }
  t.equal(border, 0, 'the 2-pixel frame is zero');
  t.throws(() => padDigits(raw, 2), /784 values is not 2 x 28 x 28/);
});

t.test('default split: 8000 / 1000 / 1000, disjoint, fixed by the seed', async (t) => {
  const splits = loadMnistSplits();
  const { train, validation, test } = splits;
  t.equal(train.count, 8000);
  t.equal(validation.count, 1000);
  t.equal(test.count, 1000);
  t.equal(train.images.length, 8000 * 1 * MNIST_SIZE * MNIST_SIZE, 'images [N, 1, 32, 32]');
  t.equal(train.consensus.length, 8000 * MNIST_SIZE * MNIST_SIZE, 'consensus [N, 32, 32]');
  t.ok(train.images instanceof Float32Array && train.consensus instanceof Uint8Array);
  t.same(train.extent, { d: 1, h: 32, w: 32 });
  t.equal(train.classes, 2);
  t.equal(train.channels, 1);

  const seen = new Set<number>();
  for (const batch of [train, validation, test]) for (const i of batch.sourceIndices) seen.add(i);
  t.equal(seen.size, 10000, 'every digit in exactly one split');

  let mismatched = 0;
  let frame = 0;
  for (let i = 0; i < test.images.length; i++) {
    if (test.consensus[i] !== (test.images[i] > MNIST_THRESHOLD ? 1 : 0)) mismatched++;
    const y = Math.floor(i / 32) % 32;
    const x = i % 32;
    if ((y < 2 || y >= 30 || x < 2 || x >= 30) && test.images[i] !== 0) frame++;
  }
  t.equal(mismatched, 0, `consensus = intensity > ${MNIST_THRESHOLD}`);
  t.equal(frame, 0, 'padding is zero');
  const mixed = new Set(train.digits.subarray(0, 50));
  t.ok(mixed.size >= 8, 'the split is shuffled, not ordered by digit');

  const again = loadMnistSplits();
  t.same(again.validation.sourceIndices, validation.sourceIndices, 'same seed, same split');
  const other = loadMnistSplits({ seed: 1 });
  t.not(Buffer.from(other.test.sourceIndices.buffer).toString('hex'), Buffer.from(test.sourceIndices.buffer).toString('hex'), 'another seed, another split');
  const small = loadMnistSplits({ train: 100 });
  t.equal(small.train.count, 100);
  t.same(small.test.sourceIndices, test.sourceIndices, 'changing the train size keeps test');
  t.same(small.validation.sourceIndices, validation.sourceIndices, 'and validation');
  t.throws(() => loadMnistSplits({ train: 9000, validation: 1000, test: 1000 }), /11000 exceed the 10000 digits/);
  t.throws(() => loadMnistSplits({ train: -1 }), /train size -1/);
  t.throws(() => mnistBatch([10000]), /MNIST index 10000/);
});

t.test('the four MNIST annotators run on real digits', async (t) => {
  const { train } = loadMnistSplits({ train: 200, validation: 0, test: 0 });
  const sim = simulateAnnotators(
    train.consensus,
    train.extent,
    2,
    [{ kind: 'good' }, { kind: 'over' }, { kind: 'under' }, { kind: 'fracture' }],
    { seed: 0 },
  );
  const area = sim.labels.map((labels) => labels.reduce((sum, v) => sum + v, 0));
  t.ok(area[1] > area[0] && area[2] < area[0] && area[3] < area[0], `foreground pixels good/over/under/fracture ${area}`);
});
