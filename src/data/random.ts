// Seeded pseudo-random numbers for everything the data pipeline draws: dataset splits,
// synthetic annotators (SPEC section 7), the single-label mode. Every result downstream is
// a pure function of the seed, so two runs with the same seed see the same data.
//
// Generator: xoshiro128** (Blackman and Vigna), 128 bits of state, seeded through a
// splitmix32 mixer. `fork(label)` derives an independent stream from this stream's key
// and a label, without consuming anything from the parent: a stream for "annotator 2,
// image 17" is the same no matter how many numbers other streams have drawn.

const TWO_POW_32 = 0x1_0000_0000;
const TWO_POW_53 = 2 ** 53;

/** One splitmix32 step: a bijective 32-bit hash that spreads every input bit. */
function splitmix32(x: number): number {
  let z = (x + 0x9e3779b9) | 0;
  z = Math.imul(z ^ (z >>> 16), 0x85ebca6b);
  z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35);
  return (z ^ (z >>> 16)) >>> 0;
}

/** Folds a list of 32-bit words into a new 128-bit key (four words). */
function mixKey(words: readonly number[]): Uint32Array {
  let acc = 0x6a09e667;
  for (const word of words) acc = splitmix32(acc ^ word);
  const key = new Uint32Array(4);
  for (let i = 0; i < 4; i++) {
    acc = splitmix32(acc ^ (0x3c6ef372 + i));
    key[i] = acc;
  }
  // xoshiro's all-zero state is a fixed point; astronomically unlikely, but cheap to exclude.
  if ((key[0] | key[1] | key[2] | key[3]) === 0) key[0] = 1;
  return key;
}

function labelWords(label: string): number[] {
  const words = [label.length];
  for (let i = 0; i < label.length; i++) words.push(label.charCodeAt(i));
  return words;
}

function seedWords(seed: number): number[] {
  if (!Number.isSafeInteger(seed)) {
    throw new RangeError(`seed ${seed} must be a safe integer`);
  }
  const low = ((seed % TWO_POW_32) + TWO_POW_32) % TWO_POW_32;
  const high = Math.floor(seed / TWO_POW_32) | 0;
  return [low, high];
}

/** Anything indexable with a length: arrays and typed arrays, so `shuffle` works on both. */
export interface MutableIndexable<T> {
  length: number;
  [index: number]: T;
}

export class Rng {
  /** The key this stream was started from; forks derive from it, not from the state. */
  private key: Uint32Array;
  private state: Uint32Array;

  /** `seed`: any safe integer. */
  constructor(seed: number) {
    this.key = mixKey(seedWords(seed));
    this.state = Uint32Array.from(this.key);
  }

  private static fromKey(key: Uint32Array): Rng {
    // Bypasses the constructor, which only knows how to start from a seed.
    const rng = Object.create(Rng.prototype) as Rng;
    rng.key = key;
    rng.state = Uint32Array.from(key);
    return rng;
  }

  /** Next raw 32-bit output of xoshiro128**. */
  nextUint32(): number {
    const s = this.state;
    const result = Math.imul(rotl(Math.imul(s[1], 5), 7), 9) >>> 0;
    const t = s[1] << 9;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 11);
    return result;
  }

  /** Uniform in [0, 1) with 53 random bits, the full precision of a double. */
  uniform(): number {
    const high = this.nextUint32() >>> 5; // 27 bits
    const low = this.nextUint32() >>> 6; // 26 bits
    return (high * 67108864 + low) / TWO_POW_53;
  }

  /** Uniform integer in [0, n). The bias of flooring a 53-bit uniform is below 2^-21 for n < 2^32. */
  int(n: number): number {
    if (!Number.isInteger(n) || n < 1 || n > TWO_POW_32) {
      throw new RangeError(`int(n): n = ${n} must be an integer in [1, 2^32]`);
    }
    return Math.floor(this.uniform() * n);
  }

  /** Normal deviate (Box-Muller); 1 - uniform() keeps the logarithm's argument in (0, 1]. */
  normal(mean = 0, std = 1): number {
    const u = 1 - this.uniform();
    const v = this.uniform();
    return mean + std * Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * v);
  }

  /** Fisher-Yates shuffle in place; returns the same array. */
  shuffle<T, A extends MutableIndexable<T>>(items: A): A {
    for (let i = items.length - 1; i > 0; i--) {
      const j = this.int(i + 1);
      const tmp = items[i];
      items[i] = items[j];
      items[j] = tmp;
    }
    return items;
  }

  /** A uniformly random ordering of 0..n-1. */
  permutation(n: number): Uint32Array {
    const order = new Uint32Array(n);
    for (let i = 0; i < n; i++) order[i] = i;
    return this.shuffle(order);
  }

  /** One element chosen uniformly. */
  pick<T>(items: readonly T[]): T {
    if (items.length === 0) throw new RangeError('pick: cannot choose from an empty list');
    return items[this.int(items.length)];
  }

  /**
   * An independent stream named by `label`, derived from this stream's seed only: it does
   * not advance this stream, and the same label always gives the same stream.
   */
  fork(label: string | number): Rng {
    const words = typeof label === 'number' ? [0xf0f0, ...seedWords(label)] : labelWords(label);
    return Rng.fromKey(mixKey([...this.key, ...words]));
  }
}

function rotl(x: number, k: number): number {
  return (x << k) | (x >>> (32 - k));
}
