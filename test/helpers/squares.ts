// A tiny 2D training set shared by the trainer's tests: 8 images of 8x8, each a noisy square;
// annotator `copy` labels the square, `dilate` the square grown by one pixel.
import { Rng } from '../../src/data/random';
import type { AnnotatedSet } from '../../src/train/data';

export function squaresSet(): AnnotatedSet {
  const [count, size] = [8, 8];
  const V = size * size;
  const rng = new Rng(7);
  const images = new Float32Array(count * V);
  const labels = [new Uint8Array(count * V), new Uint8Array(count * V)];
  for (let n = 0; n < count; n++) {
    const [y0, x0, s] = [1 + rng.int(3), 1 + rng.int(3), 2 + rng.int(3)];
    for (let y = 0; y < size; y++)
      for (let x = 0; x < size; x++) {
        const i = n * V + y * size + x;
        const inside = (m: number) => y >= y0 - m && y < y0 + s + m && x >= x0 - m && x < x0 + s + m;
        labels[0][i] = inside(0) ? 1 : 0;
        labels[1][i] = inside(1) ? 1 : 0;
        images[i] = labels[0][i] + 0.2 * rng.normal();
      }
  }
  return { count, channels: 1, classes: 2, spatial: [size, size], images, labels, present: new Uint8Array(count * 2).fill(1), annotatorNames: ['copy', 'dilate'] };
}
