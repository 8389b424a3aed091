// The safetensors reader against the official python library (huggingface/safetensors):
// files it writes load with their exact bytes, and headers edited into what its reader
// rejects (negative or overlapping offsets, bad shapes, missing fields, uncovered bytes,
// bad metadata) are rejected here too, with an error naming the file and the tensor.
import t from 'tap';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { decodeSafetensors, encodeSafetensors, readSafetensors, readSafetensorsSync, SafetensorsError } from '../src/data/safetensors';
import { missingPythonModules, runPythonJson } from './helpers/python';

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cmseg-safetensors-'));
t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));

type Header = Record<string, any>; // eslint-disable-line @typescript-eslint/no-explicit-any

/** The header JSON text and the data bytes of a safetensors file. */
function split(bytes: Buffer): { text: string; data: Buffer } {
  const n = Number(bytes.readBigUInt64LE(0));
  return { text: bytes.subarray(8, 8 + n).toString('utf8'), data: bytes.subarray(8 + n) };
}

/** A file of this header text (or raw header bytes) and data, with the length prefix the header needs. */
function join(header: string | Buffer, data: Buffer): Buffer {
  const json = typeof header === 'string' ? Buffer.from(header, 'utf8') : header;
  const head = Buffer.alloc(8);
  head.writeBigUInt64LE(BigInt(json.length));
  return Buffer.concat([head, json, data]);
}

/** `bytes` with its header JSON edited by `edit` (and the data replaced by `data` when given). */
function rewrite(bytes: Buffer, edit: (h: Header) => void, data?: Buffer): Buffer {
  const parts = split(bytes);
  const header = JSON.parse(parts.text) as Header;
  edit(header);
  return join(JSON.stringify(header), data ?? parts.data);
}

/** Whether the official reader opens each file and reads every tensor: 'ok', or its error. */
function official(files: string[]): Record<string, string> {
  return runPythonJson<Record<string, string>>(
    `import json, sys
from safetensors import safe_open
out = {}
for name in sys.argv[1:]:
    try:
        with safe_open(name, 'np') as f:
            f.metadata()
            for k in f.keys(): f.get_tensor(k)
        out[name] = 'ok'
    except Exception as e:
        out[name] = type(e).__name__ + ': ' + str(e)
print(json.dumps(out))`,
    files,
  );
}

const escape = (s: string) => s.replace(/[.*+?^${}()|[\]\\/]/g, '\\$&');

t.test('a file written by python safetensors loads with its exact shapes, dtypes and bytes', async (t) => {
  const skip = missingPythonModules('safetensors', 'numpy');
  if (skip) return t.skip(skip);
  const file = path.join(dir, 'python.safetensors');
  const expected = runPythonJson<Record<string, { dtype: string; shape: number[]; hex: string }>>(
    `import json, sys
import numpy as np
from safetensors.numpy import save_file
rng = np.random.default_rng(7)
f32 = rng.standard_normal((2, 3, 4)).astype(np.float32)
f32.flat[0] = -0.0; f32.flat[1] = np.float32(1e-45); f32.flat[2] = np.finfo(np.float32).max
t = {
  'w.f32': f32,
  'w.f64': rng.standard_normal((3, 5)),
  'mask.u8': rng.integers(0, 256, (7,), dtype=np.uint8),
  'idx.i32': rng.integers(-2**31, 2**31, (2, 2), dtype=np.int32),
  'idx.i64': rng.integers(-2**62, 2**62, (3,), dtype=np.int64),
  'scalar': np.array(2.5, dtype=np.float32),
  'empty': np.zeros((0, 3), dtype=np.float32),
}
save_file(t, sys.argv[1], metadata={'format': 'test', 'note': 'caf\\u00e9'})
names = {'float32': 'F32', 'float64': 'F64', 'uint8': 'U8', 'int32': 'I32', 'int64': 'I64'}
print(json.dumps({k: {'dtype': names[str(v.dtype)], 'shape': list(v.shape), 'hex': v.astype(v.dtype.newbyteorder('<')).tobytes().hex()} for k, v in t.items()}))`,
    [file],
  );
  for (const read of [await readSafetensors(file), readSafetensorsSync(file)]) {
    t.same(Object.keys(read.tensors).sort(), Object.keys(expected).sort());
    for (const [name, e] of Object.entries(expected)) {
      const got = read.tensors[name];
      t.equal(got.dtype, e.dtype, `${name}: dtype`);
      t.same(got.shape, e.shape, `${name}: shape`);
      t.equal(Buffer.from(got.data.buffer, got.data.byteOffset, got.data.byteLength).toString('hex'), e.hex, `${name}: exact bytes`);
    }
    t.same(read.metadata, { format: 'test', note: 'café' });
  }
});

t.test('headers the official reader rejects are rejected, naming the file and the tensor', async (t) => {
  const skip = missingPythonModules('safetensors', 'numpy');
  if (skip) return t.skip(skip);
  const base = path.join(dir, 'base.safetensors');
  // a: 4 F32 (bytes 0..16), b: 2x2 F32 (16..32), as python writes them.
  runPythonJson(
    `import sys, json, numpy as np
from safetensors.numpy import save_file
save_file({'a': np.arange(4, dtype=np.float32), 'b': np.arange(4, dtype=np.float32).reshape(2, 2) + 10}, sys.argv[1], metadata={'k': 'v'})
print(json.dumps(0))`,
    [base],
  );
  const good = fs.readFileSync(base);
  t.same(JSON.parse(split(good).text).b, { dtype: 'F32', shape: [2, 2], data_offsets: [16, 32] }, 'the layout the cases edit');
  const { data } = split(good);
  const cases: [string, Buffer, RegExp][] = [
    ['negative-begin', rewrite(good, (h) => (h.a.data_offsets = [-8, 8])), /corrupt header: tensor 'a' has data_offsets \[-8, 8\]: begin -8 is not a non-negative integer/],
    ['negative-end', rewrite(good, (h) => (h.a.data_offsets = [0, -16])), /tensor 'a' has data_offsets \[0, -16\]: end -16 is not a non-negative integer/],
    ['fractional-offset', rewrite(good, (h) => (h.b.data_offsets = [16.5, 32])), /tensor 'b' has data_offsets \[16\.5, 32\]: begin 16\.5 is not a non-negative integer/],
    ['string-offset', rewrite(good, (h) => (h.b.data_offsets = ['16', 32])), /tensor 'b' has data_offsets \["16", 32\]: begin "16" is not a non-negative integer/],
    ['three-offsets', rewrite(good, (h) => (h.a.data_offsets = [0, 16, 16])), /tensor 'a' has data_offsets an array \[0, 16, 16\], expected \[begin, end\]/],
    ['offsets-object', rewrite(good, (h) => (h.a.data_offsets = { begin: 0, end: 16 })), /tensor 'a' has data_offsets an object, expected \[begin, end\]/],
    ['begin-after-end', rewrite(good, (h) => ((h.a.shape = [0]), (h.a.data_offsets = [16, 0]))), /tensor 'a' has data_offsets \[16, 0\]: begin is after end/],
    ['negative-shape', rewrite(good, (h) => (h.b.shape = [-2, -2])), /tensor 'b' has shape \[-2, -2\]: shape\[0\] = -2 is not a non-negative integer/],
    ['fractional-shape', rewrite(good, (h) => (h.b.shape = [0.5, 8])), /tensor 'b' has shape \[0\.5, 8\]: shape\[0\] = 0\.5 is not a non-negative integer/],
    ['string-shape', rewrite(good, (h) => (h.b.shape = ['4'])), /tensor 'b' has shape \["4"\]: shape\[0\] = "4" is not a non-negative integer/],
    ['shape-not-array', rewrite(good, (h) => (h.b.shape = 4)), /tensor 'b' has shape 4, expected an array of non-negative integers/],
    ['huge-shape', rewrite(good, (h) => (h.b.shape = [2 ** 62, 2 ** 62, 4])), /tensor 'b' has shape \[4611686018427388000, 4611686018427388000, 4\]: shape\[0\] = 4611686018427388000 is too large/],
    ['count-mismatch', rewrite(good, (h) => (h.b.shape = [3, 2])), /tensor 'b': offsets \[16, 32\] \(16 bytes\) do not match shape \[3, 2\] of F32 \(24 bytes\)/],
    ['missing-shape', rewrite(good, (h) => delete h.a.shape), /corrupt header: tensor 'a' has no 'shape'/],
    ['missing-offsets', rewrite(good, (h) => delete h.a.data_offsets), /corrupt header: tensor 'a' has no 'data_offsets'/],
    ['missing-dtype', rewrite(good, (h) => delete h.b.dtype), /corrupt header: tensor 'b' has no 'dtype'/],
    ['null-entry', rewrite(good, (h) => (h.b = null)), /corrupt header: tensor 'b' must be an object \{dtype, shape, data_offsets\}, got null/],
    ['array-entry', rewrite(good, (h) => (h.b = [1, 2])), /corrupt header: tensor 'b' must be an object .*, got an array \[1, 2\]/],
    ['number-dtype', rewrite(good, (h) => (h.a.dtype = 4)), /tensor 'a' has dtype 4, expected a string/],
    ['unknown-dtype', rewrite(good, (h) => (h.a.dtype = 'f32')), /tensor 'a' has unsupported dtype f32/],
    ['inherited-dtype', rewrite(good, (h) => (h.a.dtype = 'toString')), /tensor 'a' has unsupported dtype toString/],
    ['overlap', rewrite(good, (h) => (h.b.data_offsets = [8, 24])), /corrupt header: tensor 'b' \(data_offsets \[8, 24\]\) overlaps tensor 'a' \(data_offsets \[0, 16\]\)/],
    ['same-bytes', rewrite(good, (h) => ((h.b.shape = [4]), (h.b.data_offsets = [0, 16])), data.subarray(0, 16)), /tensor '[ab]' \(data_offsets \[0, 16\]\) overlaps tensor '[ab]' \(data_offsets \[0, 16\]\)/],
    ['gap', rewrite(good, (h) => ((h.a.data_offsets = [8, 24]), (h.b.data_offsets = [24, 40])), Buffer.concat([Buffer.alloc(8), data])), /corrupt header: bytes 0\.\.8 of the data belong to no tensor \(before tensor 'a'\)/],
    ['gap-between', rewrite(good, (h) => (h.b.data_offsets = [24, 40]), Buffer.concat([data, Buffer.alloc(8)])), /bytes 16\.\.24 of the data belong to no tensor \(between tensor 'a' and tensor 'b'\)/],
    ['trailing-bytes', join(split(good).text, Buffer.concat([data, Buffer.alloc(8)])), /the header's tensors cover 32 bytes of data but 40 follow the header \(8 bytes belong to no tensor\)/],
    ['metadata-number', rewrite(good, (h) => (h.__metadata__ = { k: 1 })), /corrupt header: __metadata__ 'k' is 1, not a string/],
    ['metadata-array', rewrite(good, (h) => (h.__metadata__ = ['k'])), /corrupt header: __metadata__ must be an object of strings, got an array \["k"\]/],
    ['metadata-string', rewrite(good, (h) => (h.__metadata__ = 'k')), /corrupt header: __metadata__ must be an object of strings, got "k"/],
    ['header-array', join('[1, 2]', data), /is not a safetensors file \(its header of 6 bytes does not start with a JSON object\)/],
    ['header-not-json', join('{"a": ', data), /corrupt header JSON/],
    ['header-not-utf8', join(Buffer.concat([Buffer.from('{"a'), Buffer.from([0xff, 0xfe]), Buffer.from('": 1}')]), data), /corrupt header: its bytes are not valid UTF-8/],
  ];
  const files = cases.map(([name, bytes]) => {
    const file = path.join(dir, `${name}.safetensors`);
    fs.writeFileSync(file, bytes);
    return file;
  });
  const verdicts = official([base, ...files]);
  t.equal(verdicts[base], 'ok', 'the official reader opens the unedited file');
  cases.forEach(([name, , pattern], i) => {
    const file = files[i];
    t.not(verdicts[file], 'ok', `${name}: the official reader rejects it too (${verdicts[file]})`);
    const err = (() => {
      try {
        readSafetensorsSync(file);
      } catch (e) {
        return e as SafetensorsError;
      }
      return undefined;
    })();
    t.ok(err, `${name}: rejected`);
    if (!err) return;
    t.equal(err.name, 'SafetensorsError', `${name}: a SafetensorsError`);
    t.equal(err.path, file, `${name}: err.path`);
    t.ok(err.message.startsWith(file), `${name}: the message names the file: ${err.message}`);
    t.match(err.message, pattern, `${name}: the message says what is wrong`);
  });
  // The async reader and the in-memory decoder give the same errors.
  await t.rejects(readSafetensors(files[0]), { name: 'SafetensorsError', message: new RegExp(`^${escape(files[0])}: corrupt header: tensor 'a'`) });
  t.throws(() => decodeSafetensors(fs.readFileSync(files[0])), { message: /^corrupt header: tensor 'a' has data_offsets \[-8, 8\]/ });
});

t.test('headers the official reader accepts are read the same way', async (t) => {
  const skip = missingPythonModules('safetensors', 'numpy');
  if (skip) return t.skip(skip);
  const good = encodeSafetensors({ a: new Float32Array([1, 2, 3, 4]), b: { data: new Float32Array([10, 11, 12, 13]), shape: [2, 2] } }, { k: 'v' });
  const { data } = split(good);
  const cases: [string, Buffer, (r: ReturnType<typeof decodeSafetensors>) => void][] = [
    ['metadata-null', rewrite(good, (h) => (h.__metadata__ = null)), (r) => t.same(r.metadata, {}, 'metadata null: no metadata')],
    ['no-metadata', rewrite(good, (h) => delete h.__metadata__), (r) => t.same(r.metadata, {})],
    ['extra-key', rewrite(good, (h) => (h.a.note = 'ignored')), (r) => t.same(Array.from(r.tensors.a.data as Float32Array), [1, 2, 3, 4])],
    // Listed out of offset order: b's bytes first.
    ['reordered', rewrite(good, (h) => ((h.a.data_offsets = [16, 32]), (h.b.data_offsets = [0, 16])), Buffer.concat([data.subarray(16), data.subarray(0, 16)])),
      (r) => t.same([Array.from(r.tensors.a.data as Float32Array), Array.from(r.tensors.b.data as Float32Array)], [[1, 2, 3, 4], [10, 11, 12, 13]])],
    ['zero-size', rewrite(good, (h) => ((h.z = { dtype: 'F32', shape: [0, 3], data_offsets: [32, 32] }), (h.y = { dtype: 'U8', shape: [0], data_offsets: [0, 0] }))),
      (r) => t.same([r.tensors.z.shape, r.tensors.z.data.length, r.tensors.y.data.length], [[0, 3], 0, 0])],
    ['scalar', rewrite(good, (h) => ((h.b.shape = [2]), (h.b.data_offsets = [16, 24]), (h.s = { dtype: 'F32', shape: [], data_offsets: [24, 28] }), (h.t = { dtype: 'F32', shape: [1], data_offsets: [28, 32] }))),
      (r) => t.same([r.tensors.s.shape, Array.from(r.tensors.s.data as Float32Array)], [[], [12]])],
    ['padded-header', join(split(good).text + '        ', data), (r) => t.same(r.tensors.b.shape, [2, 2])],
    // A tensor named __proto__ is an ordinary tensor, not the object's prototype.
    ['proto-name', join(split(good).text.replace('"a"', '"__proto__"'), data),
      (r) => t.same([Object.hasOwn(r.tensors, '__proto__'), Array.from(r.tensors['__proto__'].data as Float32Array)], [true, [1, 2, 3, 4]])],
  ];
  const files = cases.map(([name, bytes]) => {
    const file = path.join(dir, `ok-${name}.safetensors`);
    fs.writeFileSync(file, bytes);
    return file;
  });
  const verdicts = official(files);
  for (const [i, [name, , check]] of cases.entries()) {
    t.equal(verdicts[files[i]], 'ok', `${name}: the official reader accepts it`);
    check(readSafetensorsSync(files[i]));
  }
});

t.test('the writer makes files the official reader accepts, and refuses what it could not write', async (t) => {
  // Non-ASCII names: the header is padded to 8 bytes, not 8 UTF-16 units.
  const bytes = encodeSafetensors({ 'gewicht.ü': new Float32Array([1.5, -2]), 'schicht.€': { data: new Int32Array([1, 2, 3, 4, 5, 6]), shape: [2, 3] } }, { 'schlüssel': 'wert' });
  t.equal(Number(bytes.readBigUInt64LE(0)) % 8, 0, 'the data starts 8-byte aligned');
  const back = decodeSafetensors(bytes);
  t.same(Array.from(back.tensors['gewicht.ü'].data as Float32Array), [1.5, -2]);
  t.same(back.tensors['schicht.€'].shape, [2, 3]);
  t.throws(() => encodeSafetensors({ x: { data: new Float32Array(4), shape: [-2, -2] } }), /tensor 'x' has shape \[-2, -2\]: a shape is an array of non-negative integers/);
  t.throws(() => encodeSafetensors({ x: { data: new Float32Array(4), shape: [0.5, 8] } }), /tensor 'x' has shape \[0\.5, 8\]/);
  t.throws(() => encodeSafetensors({ __metadata__: new Float32Array(1) }), /cannot be named '__metadata__'/);
  t.throws(() => encodeSafetensors({ x: new Float32Array(1) }, { n: 1 as unknown as string }), /metadata 'n' is 1: safetensors metadata values are strings/);
  const skip = missingPythonModules('safetensors', 'numpy');
  if (skip) return t.skip(skip);
  const file = path.join(dir, 'written.safetensors');
  fs.writeFileSync(file, bytes);
  const read = runPythonJson<Record<string, unknown>>(
    `import json, sys
from safetensors.numpy import load_file
from safetensors import safe_open
d = load_file(sys.argv[1])
with safe_open(sys.argv[1], 'np') as f: meta = f.metadata()
print(json.dumps({'meta': meta, **{k: v.tolist() for k, v in d.items()}}))`,
    [file],
  );
  t.same(read, { meta: { 'schlüssel': 'wert' }, 'gewicht.ü': [1.5, -2], 'schicht.€': [[1, 2, 3], [4, 5, 6]] });
});
