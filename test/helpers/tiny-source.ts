// The tiny training set of the trainer's API tests: four 4x4 images, two annotators
// ('a', 'b') labelling alternate pixels; with batches of 2 an epoch is two steps of a tiny
// model (well under a second).
import { InMemorySource } from '../../src/train/data';

export const TINY_IMAGES = 4;
export const TINY_PIXELS = 16;

export function tinySource(): InMemorySource {
  const N = TINY_IMAGES, V = TINY_PIXELS;
  return new InMemorySource(
    {
      count: N,
      channels: 1,
      classes: 2,
      spatial: [4, 4],
      images: Float32Array.from({ length: N * V }, (_, i) => Math.sin(i)),
      labels: [0, 1].map((r) => Uint8Array.from({ length: N * V }, (_, i) => (i + r) % 2)),
      present: new Uint8Array(N * 2).fill(1),
      annotatorNames: ['a', 'b'],
    },
    0,
  );
}
