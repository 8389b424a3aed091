// Seeded random streams, morphology and the synthetic annotators of SPEC section 7.
import t from 'tap';
import { Rng } from '../src/data/random';
import {
  type Extent,
  ballElement,
  countComponents,
  countForeground,
  dilateBinary,
  dilateLabels,
  erodeBinary,
  erodeLabels,
  skeletonize2d,
  squaredDistanceToBackground,
} from '../src/data/morphology';
import {
  type AnnotatorSpec,
  ANNOTATOR_DEFAULTS,
  defaultPermutation,
  fractureAnnotator,
  simulateAnnotators,
  trueConfusionMatrix,
  wrongClassAnnotator,
} from '../src/data/annotators';

/** Parses a picture like "..#.\n.##." into a mask: '#' = 1, digits = that label. */
function picture(rows: string): { mask: Uint8Array; extent: Extent } {
  const lines = rows.trim().split('\n').map((line) => line.trim());
  const h = lines.length;
  const w = lines[0].length;
  const mask = new Uint8Array(h * w);
  lines.forEach((line, y) => {
    for (let x = 0; x < w; x++) {
      const ch = line[x];
      mask[y * w + x] = ch === '#' ? 1 : ch === '.' ? 0 : Number(ch);
    }
  });
  return { mask, extent: { d: 1, h, w } };
}

/** The inverse of picture(); `one` is how label 1 is drawn ('#' for masks, '1' for label maps). */
function draw(mask: Uint8Array, extent: Extent, one = '#'): string {
  const lines: string[] = [];
  for (let y = 0; y < extent.h; y++) {
    let line = '';
    for (let x = 0; x < extent.w; x++) {
      const v = mask[y * extent.w + x];
      line += v === 0 ? '.' : v === 1 ? one : String(v);
    }
    lines.push(line);
  }
  return lines.join('\n');
}

function cube(size: number, from: number, to: number): Uint8Array {
  const mask = new Uint8Array(size ** 3);
  for (let z = from; z < to; z++) {
    for (let y = from; y < to; y++) for (let x = from; x < to; x++) mask[(z * size + y) * size + x] = 1;
  }
  return mask;
}

t.test('random streams', async (t) => {
  const a = new Rng(42);
  const b = new Rng(42);
  const first = Array.from({ length: 8 }, () => a.nextUint32());
  t.same(first, Array.from({ length: 8 }, () => b.nextUint32()), 'same seed, same stream');
  const other = new Rng(43);
  t.not(first.join(), Array.from({ length: 8 }, () => other.nextUint32()).join(), 'different seed, different stream');

  const parent = new Rng(7);
  const before = parent.fork('x').uniform();
  parent.uniform();
  parent.uniform();
  t.equal(parent.fork('x').uniform(), before, 'fork does not depend on what the parent drew');
  t.not(parent.fork('y').uniform(), before, 'different labels, different streams');
  t.not(parent.fork(1).uniform(), parent.fork(2).uniform(), 'numeric labels too');

  const rng = new Rng(1);
  let sum = 0;
  let sumNormal = 0;
  let sumNormal2 = 0;
  const n = 20000;
  const bins = new Array(5).fill(0);
  for (let i = 0; i < n; i++) {
    const u = rng.uniform();
    if (!(u >= 0 && u < 1)) t.fail(`uniform ${u} outside [0, 1)`);
    sum += u;
    bins[rng.int(5)]++;
    const z = rng.normal();
    sumNormal += z;
    sumNormal2 += z * z;
  }
  t.ok(Math.abs(sum / n - 0.5) < 0.01, `uniform mean ${sum / n}`);
  t.ok(bins.every((count) => Math.abs(count - n / 5) < 300), `int(5) bins ${bins}`);
  t.ok(Math.abs(sumNormal / n) < 0.03, `normal mean ${sumNormal / n}`);
  t.ok(Math.abs(sumNormal2 / n - 1) < 0.05, `normal variance ${sumNormal2 / n}`);

  const order = new Rng(3).permutation(100);
  t.same([...order].sort((x, y) => x - y), Array.from({ length: 100 }, (_, i) => i), 'permutation holds every index once');
  t.same(new Rng(3).shuffle([1, 2, 3, 4, 5]), new Rng(3).shuffle([1, 2, 3, 4, 5]), 'shuffle is deterministic');
  t.throws(() => new Rng(1.5), /seed 1.5/);
  t.throws(() => rng.int(0), /n = 0/);
});

t.test('disk and ball elements have the counts you can draw', async (t) => {
  t.equal(ballElement(0, false).dx.length, 1);
  t.equal(ballElement(1, false).dx.length, 5, 'disk r=1: the centre and 4 neighbours');
  t.equal(ballElement(Math.SQRT2, false).dx.length, 9, 'disk r=sqrt(2): the 3x3 square');
  t.equal(ballElement(2, false).dx.length, 13, 'disk r=2: 1 + 4 + 4 + 4');
  t.equal(ballElement(1, true).dx.length, 7, 'ball r=1: the centre and 6 face neighbours');
  t.equal(ballElement(2, true).dx.length, 33, 'ball r=2: 1 + 6 + 12 + 8 + 6');
});

t.test('binary dilation and erosion, 2D', async (t) => {
  const dot = picture(`
.......
.......
.......
...#...
.......
.......
.......`);
  t.equal(
    draw(dilateBinary(dot.mask, dot.extent, 1), dot.extent),
    `.......
.......
...#...
..###..
...#...
.......
.......`,
    'a single pixel dilated by 1 is the 5-pixel plus',
  );
  t.equal(
    draw(dilateBinary(dot.mask, dot.extent, 2), dot.extent),
    `.......
...#...
..###..
.#####.
..###..
...#...
.......`,
    'a single pixel dilated by 2 is the 13-pixel disk',
  );
  const square = picture(`
.......
.#####.
.#####.
.#####.
.#####.
.#####.
.......`);
  t.equal(
    draw(erodeBinary(square.mask, square.extent, 1), square.extent),
    `.......
.......
..###..
..###..
..###..
.......
.......`,
    'a 5x5 square eroded by 1 is 3x3',
  );
  t.equal(countForeground(erodeBinary(square.mask, square.extent, 2)), 1, 'eroded by 2 only the centre remains');
  const atBorder = picture(`
###
###
###`);
  t.equal(draw(erodeBinary(atBorder.mask, atBorder.extent, 1), atBorder.extent), `...\n.#.\n...`, 'outside counts as background');
  t.equal(countForeground(dilateBinary(dot.mask, dot.extent, 0)), 1, 'radius 0 is the identity');
  t.throws(() => dilateBinary(dot.mask, { d: 1, h: 6, w: 7 }, 1), /49 voxels, extent 1x6x7 needs 42/);
  t.throws(() => dilateBinary(dot.mask, dot.extent, -1), /radius -1/);
});

t.test('binary dilation and erosion, 3D', async (t) => {
  const size = 9;
  const extent = { d: size, h: size, w: size };
  const voxel = new Uint8Array(size ** 3);
  voxel[(4 * size + 4) * size + 4] = 1;
  t.equal(countForeground(dilateBinary(voxel, extent, 1)), 7);
  t.equal(countForeground(dilateBinary(voxel, extent, 2)), 33);
  t.equal(countForeground(erodeBinary(cube(size, 2, 7), extent, 1)), 27, 'a 5^3 cube eroded by 1 is 3^3');
  t.same(erodeBinary(cube(size, 2, 7), extent, 1), cube(size, 3, 6));
});

t.test('per-class dilation and erosion', async (t) => {
  const labels = picture(`
.........
.1.....2.
.........
....1....
.........`);
  t.equal(
    draw(dilateLabels(labels.mask, labels.extent, 1), labels.extent, '1'),
    `.1.....2.
111...222
.1..1..2.
...111...
....1....`,
  );
  // Background between 1 and 2 is reached by both: the higher class wins; 1 and 2 keep their pixels.
  const touching = picture(`
.....
.1.2.
.....`);
  t.equal(draw(dilateLabels(touching.mask, touching.extent, 1), touching.extent, '1'), `.1.2.\n11222\n.1.2.`);
  const nested = picture(`
2222222
2211122
2211122
2211122
2222222`);
  t.equal(
    draw(erodeLabels(nested.mask, nested.extent, 1), nested.extent),
    `.......
.......
...#...
.......
.......`,
    'class 2 touches the border or class 1 everywhere: eroded away; class 1 keeps its centre',
  );
  const eroded = erodeLabels(nested.mask, nested.extent, 1);
  t.equal(eroded[2 * 7 + 3], 1, 'the centre of class 1 survives');
  t.equal(countForeground(eroded.map((v) => (v === 1 ? 1 : 0))), 1, 'only the centre of the 3x3 class-1 block survives');
  t.equal(eroded[0], 0, 'class 2 at the border is eroded');
  const withUnlabelled = Uint8Array.from([0, 1, 255]);
  t.same(dilateLabels(withUnlabelled, { d: 1, h: 1, w: 3 }, 1), Uint8Array.from([1, 1, 255]), '255 is left alone');
});

t.test('distance transform matches brute force', async (t) => {
  const rng = new Rng(5);
  for (const extent of [{ d: 1, h: 9, w: 13 }, { d: 6, h: 7, w: 5 }]) {
    const mask = new Uint8Array(extent.d * extent.h * extent.w);
    for (let i = 0; i < mask.length; i++) mask[i] = rng.uniform() < 0.8 ? 1 : 0;
    const fast = squaredDistanceToBackground(mask, extent);
    let mismatches = 0;
    for (let z = 0, i = 0; z < extent.d; z++) {
      for (let y = 0; y < extent.h; y++) {
        for (let x = 0; x < extent.w; x++, i++) {
          // Background voxels, and the outside of the volume: one layer around it suffices.
          let best = mask[i] ? Infinity : 0;
          const zRange = extent.d > 1 ? [-1, extent.d] : [0, 0];
          for (let zz = zRange[0]; zz <= zRange[1]; zz++) {
            for (let yy = -1; yy <= extent.h; yy++) {
              for (let xx = -1; xx <= extent.w; xx++) {
                const outside = zz < 0 || zz >= extent.d || yy < 0 || yy >= extent.h || xx < 0 || xx >= extent.w;
                if (!outside && mask[(zz * extent.h + yy) * extent.w + xx]) continue;
                best = Math.min(best, (zz - z) ** 2 + (yy - y) ** 2 + (xx - x) ** 2);
              }
            }
          }
          if (fast[i] !== best) mismatches++;
        }
      }
    }
    t.equal(mismatches, 0, `extent ${extent.d}x${extent.h}x${extent.w}`);
  }
});

t.test('skeleton of a bar is one pixel wide', async (t) => {
  const bar = picture(`
..............
.############.
.############.
.############.
..............`);
  const skeleton = skeletonize2d(bar.mask, bar.extent);
  const rows = draw(skeleton, bar.extent).split('\n');
  t.equal(rows.filter((row) => row.includes('#')).length, 1, `a single row:\n${draw(skeleton, bar.extent)}`);
  t.equal(countComponents(skeleton, bar.extent), 1);
});

t.test('over and under move the foreground area the right way', async (t) => {
  const blob = picture(`
..........
..######..
.########.
.########.
..######..
..........`);
  const sim = simulateAnnotators(blob.mask, blob.extent, 2, [{ kind: 'good' }, { kind: 'over' }, { kind: 'under' }], { seed: 0 });
  t.same(sim.names, ['good', 'over', 'under']);
  const [good, over, under] = sim.labels.map(countForeground);
  t.equal(good, countForeground(blob.mask));
  t.ok(over > good, `over ${over} > good ${good}`);
  t.ok(under < good, `under ${under} < good ${good}`);
  t.same(sim.labels[0], blob.mask, 'good is the consensus');
  t.same(sim.labels[1], dilateBinary(blob.mask, blob.extent, ANNOTATOR_DEFAULTS.rOver2d), 'over: rOver = 2 in 2D');
  t.same(sim.labels[2], erodeBinary(blob.mask, blob.extent, 1), 'under: rUnder = 1');
  const volume = cube(9, 2, 7);
  const extent3 = { d: 9, h: 9, w: 9 };
  const sim3 = simulateAnnotators(volume, extent3, 2, [{ kind: 'over' }, { kind: 'under', rUnder: 1 }], { seed: 0 });
  t.same(sim3.labels[0], dilateBinary(volume, extent3, 1), 'over: rOver = 1 voxel in 3D');
  t.equal(countForeground(sim3.labels[1]), 27);
});

t.test('wrong permutes the foreground classes exactly', async (t) => {
  t.same(defaultPermutation(4), [0, 3, 1, 2], 'BraTS: 1 -> 3, 2 -> 1, 3 -> 2');
  const consensus = Uint8Array.from([0, 1, 2, 3, 255, 3, 1]);
  t.same(wrongClassAnnotator(consensus, 4, { kind: 'wrong' }), Uint8Array.from([0, 3, 1, 2, 255, 2, 3]));
  t.same(wrongClassAnnotator(consensus, 4, { kind: 'wrong', permutation: [0, 2, 3, 1] }), Uint8Array.from([0, 2, 3, 1, 255, 1, 2]));
  t.throws(() => wrongClassAnnotator(consensus, 4, { kind: 'wrong', permutation: [1, 0, 2, 3] }), /permutation\[0\] = 1/);
  t.throws(() => wrongClassAnnotator(consensus, 4, { kind: 'wrong', permutation: [0, 1, 1, 3] }), /not a permutation/);
  t.throws(() => simulateAnnotators(Uint8Array.from([0, 1]), { d: 1, h: 1, w: 2 }, 2, [{ kind: 'wrong' }], { seed: 0 }), /classes >= 3/);
});

t.test('fracture reduces the foreground and breaks a bar', async (t) => {
  const bar = picture(`
..............................
..............................
..##########################..
..##########################..
..##########################..
..............................
..............................`);
  const fractured = fractureAnnotator(bar.mask, bar.extent, { kind: 'fracture' }, new Rng(0));
  t.ok(countForeground(fractured) < countForeground(bar.mask), draw(fractured, bar.extent));
  t.equal(countComponents(fractured, bar.extent), 1 + ANNOTATOR_DEFAULTS.numFractures, `three breaks:\n${draw(fractured, bar.extent)}`);
  for (let i = 0; i < fractured.length; i++) {
    if (fractured[i] && !bar.mask[i]) t.fail(`fracture added pixel ${i}`);
  }
  const diagonal = new Uint8Array(24 * 24);
  for (let y = 0; y < 24; y++) {
    for (let x = 0; x < 24; x++) if (Math.abs(x - y) <= 1 && x > 1 && x < 22) diagonal[y * 24 + x] = 1;
  }
  const cutDiagonal = fractureAnnotator(diagonal, { d: 1, h: 24, w: 24 }, { kind: 'fracture', numFractures: 1 }, new Rng(4));
  t.equal(countComponents(cutDiagonal, { d: 1, h: 24, w: 24 }), 2, 'a diagonal stroke breaks too (8-connectivity)');

  const size = 16;
  const extent3 = { d: size, h: size, w: size };
  const rod = new Uint8Array(size ** 3);
  for (let z = 1; z < 15; z++) for (let y = 6; y < 10; y++) for (let x = 6; x < 10; x++) rod[(z * size + y) * size + x] = 1;
  let broken = 0;
  for (let seed = 0; seed < 10; seed++) {
    const slabbed = fractureAnnotator(rod, extent3, { kind: 'fracture', numFractures: 1 }, new Rng(seed));
    if (countForeground(slabbed) >= countForeground(rod)) t.fail(`seed ${seed}: nothing cut`);
    if (countComponents(slabbed, extent3) > 1) broken++;
  }
  t.ok(broken >= 8, `3D slabs cut the rod in ${broken} of 10 seeds`);
  t.same(fractureAnnotator(bar.mask, bar.extent, { kind: 'fracture', numFractures: 0 }, new Rng(0)), bar.mask, 'zero breaks');
  t.same(fractureAnnotator(new Uint8Array(9), { d: 1, h: 3, w: 3 }, { kind: 'fracture' }, new Rng(0)), new Uint8Array(9), 'empty stays empty');
});

const SIDE = 16;
const PIXELS = SIDE * SIDE;

/** Random thick strokes (segments within distance 1.2 of a random line), [N, 16, 16]. */
function strokeBatch(count: number, seed: number): { consensus: Uint8Array; extent: Extent } {
  const extent = { d: 1, h: SIDE, w: SIDE };
  const rng = new Rng(seed);
  const consensus = new Uint8Array(count * PIXELS);
  for (let n = 0; n < count; n++) {
    const [y0, x0, y1, x1] = [2 + rng.int(12), 2 + rng.int(12), 2 + rng.int(12), 2 + rng.int(12)];
    const length2 = (y1 - y0) ** 2 + (x1 - x0) ** 2 || 1;
    for (let y = 0; y < SIDE; y++) {
      for (let x = 0; x < SIDE; x++) {
        const along = Math.min(1, Math.max(0, ((y - y0) * (y1 - y0) + (x - x0) * (x1 - x0)) / length2));
        const dy = y - (y0 + along * (y1 - y0));
        const dx = x - (x0 + along * (x1 - x0));
        if (dy * dy + dx * dx <= 1.44) consensus[n * PIXELS + y * SIDE + x] = 1;
      }
    }
  }
  return { consensus, extent };
}

const FOUR: AnnotatorSpec[] = [{ kind: 'good' }, { kind: 'over' }, { kind: 'under' }, { kind: 'fracture' }];

t.test('simulation is deterministic per seed', async (t) => {
  const { consensus, extent } = strokeBatch(40, 1);
  const a = simulateAnnotators(consensus, extent, 2, FOUR, { seed: 11 });
  const b = simulateAnnotators(consensus, extent, 2, FOUR, { seed: 11 });
  const c = simulateAnnotators(consensus, extent, 2, FOUR, { seed: 12 });
  t.same(a.labels, b.labels, 'same seed, same labels');
  t.not(Buffer.from(a.labels[3]).toString('hex'), Buffer.from(c.labels[3]).toString('hex'), 'different seed, different fractures');
  const firstTen = simulateAnnotators(consensus.subarray(0, 10 * PIXELS), extent, 2, FOUR, { seed: 11 });
  t.same(firstTen.labels[3], a.labels[3].subarray(0, 10 * PIXELS), 'an image does not depend on the others in the batch');
  t.same(a.present, new Uint8Array(40 * 4).fill(1), 'dense: everyone labels everything');
});

t.test('single mode: one annotator per image, chosen uniformly', async (t) => {
  const count = 4000;
  const { consensus, extent } = strokeBatch(count, 2);
  const single = simulateAnnotators(consensus, extent, 2, FOUR, { seed: 3, mode: 'single' });
  const dense = simulateAnnotators(consensus, extent, 2, FOUR, { seed: 3 });
  const perAnnotator = [0, 0, 0, 0];
  let wrongCount = 0;
  let mismatched = 0;
  for (let n = 0; n < count; n++) {
    let labelled = 0;
    for (let r = 0; r < 4; r++) {
      const map = single.labels[r].subarray(n * PIXELS, (n + 1) * PIXELS);
      if (single.present[n * 4 + r]) {
        labelled++;
        perAnnotator[r]++;
        if (Buffer.compare(map, dense.labels[r].subarray(n * PIXELS, (n + 1) * PIXELS)) !== 0) mismatched++;
      } else if (!map.every((v) => v === 255)) {
        mismatched++;
      }
    }
    if (labelled !== 1) wrongCount++;
  }
  t.equal(wrongCount, 0, 'exactly one annotator per image');
  t.equal(mismatched, 0, 'the kept labels equal dense mode, absent maps are 255');
  // Binomial(4000, 1/4): sd 27; allow about 4.5 sd.
  t.ok(perAnnotator.every((k) => Math.abs(k - count / 4) < 120), `counts ${perAnnotator}`);
});

t.test('true confusion matrices (SPEC section 6)', async (t) => {
  const { consensus, extent } = strokeBatch(50, 4);
  const sim = simulateAnnotators(consensus, extent, 2, FOUR, { seed: 0, mode: 'single' });
  for (let r = 0; r < 4; r++) {
    const { matrix } = trueConfusionMatrix(sim.labels[r], consensus, 2);
    for (let j = 0; j < 2; j++) t.ok(Math.abs(matrix[j] + matrix[2 + j] - 1) < 1e-12, `${sim.names[r]} column ${j} sums to 1`);
  }
  t.same([...trueConfusionMatrix(sim.labels[0], consensus, 2).matrix], [1, 0, 0, 1], 'good: identity');
  const over = trueConfusionMatrix(sim.labels[1], consensus, 2).matrix;
  t.equal(over[3], 1, 'over: every foreground pixel stays foreground');
  t.ok(over[2] > 0, 'over: some background called foreground');
  const under = trueConfusionMatrix(sim.labels[2], consensus, 2).matrix;
  t.equal(under[0], 1, 'under: background stays background');
  t.ok(under[1] > 0, 'under: some foreground called background');

  const brats = Uint8Array.from([0, 0, 1, 1, 2, 3, 3, 3]);
  const wrong = wrongClassAnnotator(brats, 4, { kind: 'wrong' });
  const { matrix, counts } = trueConfusionMatrix(wrong, brats, 4);
  const expected = [
    [1, 0, 0, 0],
    [0, 0, 1, 0],
    [0, 0, 0, 1],
    [0, 1, 0, 0],
  ].flat();
  t.same([...matrix], expected, 'wrong: the permutation matrix, T[perm[j]][j] = 1');
  t.equal(counts[3 * 4 + 1], 2, 'two class-1 pixels labelled 3');
  const missing = trueConfusionMatrix(Uint8Array.from([0, 1]), Uint8Array.from([0, 0]), 2).matrix;
  t.ok(Number.isNaN(missing[1]) && Number.isNaN(missing[3]), 'a class absent from the consensus gives a NaN column');
  t.throws(() => trueConfusionMatrix(Uint8Array.from([0, 5]), Uint8Array.from([0, 1]), 2), /label 5 at index 1 >= classes \(2\)/);
  t.throws(() => simulateAnnotators(Uint8Array.from([0, 7]), { d: 1, h: 1, w: 2 }, 2, FOUR, { seed: 0 }), /consensus: label 7 at index 1/);
  t.throws(() => simulateAnnotators(new Uint8Array(10), { d: 1, h: 2, w: 3 }, 2, FOUR, { seed: 0 }), /not a multiple of 1x2x3 = 6/);
});
