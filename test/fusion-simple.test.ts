// Naive label fusion by hand: mean (soft) labels, majority vote and their tie rules,
// absent annotators and unlabelled pixels.
import t from 'tap';
import { meanLabels, meanLabelsHard, modeLabels } from '../src/fusion/simple';

// One image of 4 pixels, three annotators, binary.
const three = [Uint8Array.from([0, 1, 1, 0]), Uint8Array.from([0, 1, 0, 1]), Uint8Array.from([1, 1, 0, 255])];

t.test('mean labels are the fraction of voting annotators per class', async (t) => {
  const soft = meanLabels({ labels: three, count: 1, classes: 2 });
  // layout [N, L, V]: class 0 row then class 1 row
  const third = 1 / 3;
  const expected = [1 - third, 0, 1 - third, 0.5, third, 1, third, 0.5];
  t.equal(soft.length, 8);
  expected.forEach((x, i) => t.ok(Math.abs(soft[i] - x) < 1e-6, `entry ${i}: ${soft[i]} vs ${x}`));
});

t.test('majority vote; ties go to the lowest class', async (t) => {
  t.same([...modeLabels({ labels: three, count: 1, classes: 2 })], [0, 1, 0, 0]);
  // pixel 3: votes 0 and 1 (the third annotator left it unlabelled): a tie
});

t.test('the hard mean breaks ties towards the higher class (mean >= 0.5)', async (t) => {
  t.same([...meanLabelsHard({ labels: three, count: 1, classes: 2 })], [0, 1, 0, 1]);
});

t.test('multi-class votes', async (t) => {
  const maps = [Uint8Array.from([2, 1, 0]), Uint8Array.from([2, 3, 3]), Uint8Array.from([1, 3, 2]), Uint8Array.from([0, 1, 2])];
  t.same([...modeLabels({ labels: maps, count: 1, classes: 4 })], [2, 1, 2]);
  // pixel 1: 1 and 3 tie at two votes each -> lowest (1) for the mode, highest (3) for the mean
  t.same([...meanLabelsHard({ labels: maps, count: 1, classes: 4 })], [2, 3, 2]);
});

t.test('absent annotators do not vote; pixels nobody labelled stay unlabelled', async (t) => {
  // two images of 2 pixels; annotator 1 did not label image 0, annotator 0 did not label image 1
  const a = Uint8Array.from([1, 1, 0, 0]);
  const b = Uint8Array.from([0, 0, 1, 255]);
  const present = Uint8Array.from([1, 0, 0, 1]);
  t.same([...modeLabels({ labels: [a, b], present, count: 2, classes: 2 })], [1, 1, 1, 255]);
  const soft = meanLabels({ labels: [a, b], present, count: 2, classes: 2 });
  t.same([...soft], [0, 0, 1, 1, 0, 0, 1, 0]);
});

t.test('bad inputs are rejected with the offending value', async (t) => {
  t.throws(() => modeLabels({ labels: [Uint8Array.from([0, 2])], count: 1, classes: 2 }), /label 2 at index 1 >= classes \(2\)/);
  t.throws(() => modeLabels({ labels: [new Uint8Array(4), new Uint8Array(3)], count: 1, classes: 2 }), /annotator 1 map has 3 voxels/);
  t.throws(() => meanLabels({ labels: [], count: 1, classes: 2 }), /at least one annotator/);
  t.throws(() => meanLabels({ labels: [new Uint8Array(4)], present: new Uint8Array(3), count: 2, classes: 2 }), /present has 3 entries/);
});
