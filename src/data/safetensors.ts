// The safetensors format: an 8-byte little-endian header length, a JSON header
// ({name: {dtype, shape, data_offsets}, __metadata__: {string: string}}), then
// the raw little-endian tensor bytes. PyTorch users load these files with
// `safetensors.torch.load_file`.
import { readFileChecked, readFileCheckedSync, writeFileAtomic } from './files';
import { arrayKind } from '../errors';

export type SafeDtype = 'F32' | 'F64' | 'U8' | 'I32' | 'I64';
export type SafeArray = Float32Array | Float64Array | Uint8Array | Int32Array | BigInt64Array;

export interface SafeTensor {
  dtype: SafeDtype;
  shape: number[];
  data: SafeArray;
}

export interface SafeFile {
  tensors: Record<string, SafeTensor>;
  metadata: Record<string, string>;
}

export class SafetensorsError extends Error {
  /** `message` is prefixed with `path: ` when a path is given, unless `prefixed` is false. */
  constructor(message: string, readonly path?: string, prefixed = true) {
    super(path && prefixed ? `${path}: ${message}` : message);
    this.name = 'SafetensorsError';
  }
}

/** The safetensors reference implementation refuses headers above 100 MB. */
const MAX_HEADER_BYTES = 100_000_000;

const BYTES: Record<SafeDtype, number> = { F32: 4, F64: 8, U8: 1, I32: 4, I64: 8 };

function dtypeOf(a: unknown, name: string): SafeDtype {
  if (a instanceof Float32Array) return 'F32';
  if (a instanceof Float64Array) return 'F64';
  if (a instanceof Uint8Array) return 'U8';
  if (a instanceof Int32Array) return 'I32';
  if (a instanceof BigInt64Array) return 'I64';
  throw new SafetensorsError(`tensor '${name}' is ${arrayKind(a)}: cmseg writes Float32Array, Float64Array, Uint8Array, Int32Array or BigInt64Array`);
}

function view(dtype: SafeDtype, bytes: Uint8Array): SafeArray {
  // Copy into an aligned buffer: the tensor bytes need not be aligned in the file.
  const copy = new Uint8Array(bytes.length);
  copy.set(bytes);
  switch (dtype) {
    case 'F32': return new Float32Array(copy.buffer);
    case 'F64': return new Float64Array(copy.buffer);
    case 'U8': return copy;
    case 'I32': return new Int32Array(copy.buffer);
    case 'I64': return new BigInt64Array(copy.buffer);
  }
}

/** Encodes tensors (shape given, or 1-D) and string metadata as safetensors bytes. */
export function encodeSafetensors(
  tensors: Record<string, SafeArray | { data: SafeArray; shape: number[] }>,
  metadata: Record<string, string> = {},
): Buffer {
  const header: Record<string, unknown> = {};
  for (const [key, value] of Object.entries(metadata))
    if (typeof value !== 'string') throw new SafetensorsError(`metadata '${key}' is ${describe(value)}: safetensors metadata values are strings`);
  if (Object.keys(metadata).length) header.__metadata__ = metadata;
  const parts: Uint8Array[] = [];
  let offset = 0;
  for (const [name, t] of Object.entries(tensors)) {
    const data = 'shape' in t && !ArrayBuffer.isView(t) ? t.data : (t as SafeArray);
    // The type first: a plain array has a length but no bytes, and would pass the shape checks.
    const dtype = dtypeOf(data, name);
    const shape = 'shape' in t && !ArrayBuffer.isView(t) ? t.shape : [data.length];
    if (!Array.isArray(shape) || !shape.every(isCount))
      throw new SafetensorsError(`tensor '${name}' has shape ${Array.isArray(shape) ? list(shape) : describe(shape)}: a shape is an array of non-negative integers`);
    const count = shape.reduce((a, b) => a * b, 1);
    if (count !== data.length) throw new SafetensorsError(`tensor '${name}' has ${data.length} values but shape [${shape}]`);
    const bytes = new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
    if (name === '__metadata__') throw new SafetensorsError(`a tensor cannot be named '__metadata__': the header keeps that key for the metadata`);
    setOwn(header, name, { dtype, shape, data_offsets: [offset, offset + bytes.length] });
    parts.push(bytes);
    offset += bytes.length;
  }
  let json = JSON.stringify(header);
  json += ' '.repeat((8 - (Buffer.byteLength(json, 'utf8') % 8)) % 8); // keep the data 8-byte aligned
  // The reference reader (and decodeSafetensors) refuse headers over MAX_HEADER_BYTES:
  // writing one would make a file that nothing can read back, an unreadable checkpoint.
  const headerBytes = Buffer.byteLength(json, 'utf8');
  if (headerBytes > MAX_HEADER_BYTES)
    throw new SafetensorsError(`the header (names, shapes and metadata) would take ${headerBytes} bytes; safetensors readers refuse headers over ${MAX_HEADER_BYTES} bytes`);
  const head = Buffer.alloc(8);
  const jsonBytes = Buffer.from(json, 'utf8');
  head.writeBigUInt64LE(BigInt(jsonBytes.length));
  return Buffer.concat([head, jsonBytes, ...parts]);
}

/**
 * Reads safetensors bytes, validating the header as the reference implementation
 * (huggingface/safetensors) does: the header is a UTF-8 JSON object; `__metadata__`,
 * when present and not null, maps strings to strings; every other entry is
 * `{dtype, shape, data_offsets}` with `shape` an array of non-negative integers and
 * `data_offsets` two non-negative integers `[begin, end]`, `begin <= end`, `end` within
 * the data, `end - begin` = element count x dtype size. Like the reference, the tensors
 * must tile the data exactly: sorted by offsets, each starts where the previous one ended,
 * the first at 0 and the last at the end of the file, so no two tensors share bytes and
 * no byte belongs to none. Every error names the file (when `path` is given) and the tensor.
 * Two differences: the header must start with '{' (the reference also skips leading
 * whitespace), so that other files are told apart as "not a safetensors file"; and only
 * the dtypes cmseg uses (F32, F64, U8, I32, I64) are read.
 */
export function decodeSafetensors(bytes: Uint8Array, path?: string): SafeFile {
  if (bytes.length < 8) throw new SafetensorsError(`truncated: ${bytes.length} bytes, no header length`, path);
  const buf = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const big = buf.readBigUInt64LE(0);
  const n = Number(big);
  // A header longer than the reference's limit, or one that does not open a JSON
  // object, means these bytes are something else (a text file, an image, ...);
  // a plausible header that runs past the end means the file was cut short.
  const notSafetensors = (why: string) =>
    new SafetensorsError(`${path ?? 'the data'} is not a safetensors file (${why})`, path, false);
  if (big > BigInt(MAX_HEADER_BYTES))
    throw notSafetensors(`its header length ${big} is implausible: the file has ${bytes.length} bytes and headers are at most ${MAX_HEADER_BYTES}`);
  if (bytes.length > 8 && bytes[8] !== 0x7b /* '{' */)
    throw notSafetensors(`its header of ${n} bytes does not start with a JSON object`);
  if (n > bytes.length - 8) throw new SafetensorsError(`truncated: header of ${n} bytes but only ${bytes.length - 8} follow`, path);
  let text: string;
  try {
    text = new TextDecoder('utf-8', { fatal: true }).decode(buf.subarray(8, 8 + n));
  } catch {
    throw new SafetensorsError('corrupt header: its bytes are not valid UTF-8', path);
  }
  let header: unknown;
  try {
    header = JSON.parse(text);
  } catch (e) {
    throw new SafetensorsError(`corrupt header JSON (${(e as Error).message})`, path);
  }
  const fail = (message: string) => new SafetensorsError(`corrupt header: ${message}`, path);
  if (!isPlainObject(header)) throw fail(`the header must be a JSON object, got ${describe(header)}`);
  const dataStart = 8 + n;
  const dataLength = bytes.length - dataStart;
  const out: SafeFile = { tensors: {}, metadata: {} };
  const spans: { name: string; begin: number; end: number }[] = [];
  const entries: { name: string; dtype: SafeDtype; shape: number[]; begin: number; end: number }[] = [];
  for (const [name, entry] of Object.entries(header)) {
    if (name === '__metadata__') {
      out.metadata = checkMetadata(entry, fail);
      continue;
    }
    const where = `tensor '${name}'`;
    if (!isPlainObject(entry)) throw fail(`${where} must be an object {dtype, shape, data_offsets}, got ${describe(entry)}`);
    for (const key of ['dtype', 'shape', 'data_offsets'])
      if (!Object.hasOwn(entry, key)) throw fail(`${where} has no '${key}'`);
    const { dtype, shape, data_offsets: offsets } = entry as { dtype: unknown; shape: unknown; data_offsets: unknown };
    if (typeof dtype !== 'string') throw fail(`${where} has dtype ${describe(dtype)}, expected a string such as "F32"`);
    if (!Object.hasOwn(BYTES, dtype))
      throw new SafetensorsError(`tensor '${name}' has unsupported dtype ${dtype} (cmseg reads ${Object.keys(BYTES).join(', ')})`, path);
    if (!Array.isArray(shape)) throw fail(`${where} has shape ${describe(shape)}, expected an array of non-negative integers`);
    shape.forEach((d: unknown, i) => {
      if (!isCount(d)) throw fail(`${where} has shape ${list(shape)}: shape[${i}] = ${describe(d)} ${tooLarge(d) ? 'is too large' : 'is not a non-negative integer'}`);
    });
    if (!Array.isArray(offsets) || offsets.length !== 2)
      throw fail(`${where} has data_offsets ${describe(offsets)}, expected [begin, end]`);
    offsets.forEach((o: unknown, i) => {
      if (!isCount(o)) throw fail(`${where} has data_offsets ${list(offsets)}: ${i ? 'end' : 'begin'} ${describe(o)} ${tooLarge(o) ? 'is too large' : 'is not a non-negative integer'}`);
    });
    const [begin, end] = offsets as [number, number];
    if (begin > end) throw fail(`${where} has data_offsets [${begin}, ${end}]: begin is after end`);
    // Exact sizes whatever the shape: a product past 2^53 cannot match offsets within the file.
    const count = (shape as number[]).reduce((a, d) => a * BigInt(d), 1n);
    const size = count * BigInt(BYTES[dtype as SafeDtype]);
    if (BigInt(end - begin) !== size)
      throw new SafetensorsError(`tensor '${name}': offsets [${begin}, ${end}] (${end - begin} bytes) do not match shape ${list(shape)} of ${dtype} (${size} bytes)`, path);
    if (dataStart + end > bytes.length)
      throw new SafetensorsError(`truncated: tensor '${name}' ends at byte ${dataStart + end} but the file has ${bytes.length}`, path);
    spans.push({ name, begin, end });
    entries.push({ name, dtype: dtype as SafeDtype, shape: shape as number[], begin, end });
  }
  // The reference reader's rule: sorted by [begin, end], the tensors tile [0, data length).
  spans.sort((a, b) => a.begin - b.begin || a.end - b.end);
  let covered = 0;
  let previous: (typeof spans)[number] | undefined;
  for (const s of spans) {
    if (s.begin < covered)
      throw fail(`tensor '${s.name}' (data_offsets [${s.begin}, ${s.end}]) overlaps tensor '${previous!.name}' (data_offsets [${previous!.begin}, ${previous!.end}])`);
    if (s.begin > covered)
      throw fail(`bytes ${covered}..${s.begin} of the data belong to no tensor (${previous ? `between tensor '${previous.name}' and` : 'before'} tensor '${s.name}'); safetensors data must be contiguous`);
    covered = s.end;
    previous = s;
  }
  if (covered !== dataLength)
    throw fail(`the header's tensors cover ${covered} bytes of data but ${dataLength} follow the header (${dataLength - covered} bytes belong to no tensor)`);
  for (const e of entries)
    setOwn(out.tensors, e.name, { dtype: e.dtype, shape: e.shape, data: view(e.dtype, bytes.subarray(dataStart + e.begin, dataStart + e.end)) });
  return out;
}

/** A JSON object (not null, not an array). */
export function isPlainObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/** A JSON number that is an exact non-negative integer (usize in the reference). */
function isCount(v: unknown): v is number {
  return typeof v === 'number' && Number.isSafeInteger(v) && v >= 0;
}

/** An integer past 2^53 - 1: JSON allows it, but no offset or size in a file this reader can hold reaches it. */
function tooLarge(v: unknown): boolean {
  return typeof v === 'number' && Number.isInteger(v) && v > Number.MAX_SAFE_INTEGER;
}

/** A JSON value as errors show it: `-8`, `"4"`, `null`, `an array [...]`, `an object`, `missing`. */
function describe(v: unknown, depth = 0): string {
  if (v === undefined) return 'missing';
  if (Array.isArray(v)) return `an array ${list(v, depth)}`;
  if (v !== null && typeof v === 'object') return 'an object';
  return JSON.stringify(v) ?? String(v);
}

/**
 * `[0, 144]`, `[0.5, 8, 3]`, `["4"]`: a JSON array as errors show it (the first 8 entries).
 * Arrays nested more than 2 deep show as `[...]`: a hostile header of 100,000 nested
 * arrays would otherwise overflow the stack here (a RangeError naming no file).
 */
function list(values: readonly unknown[], depth = 0): string {
  const nested = (x: unknown) => (depth >= 2 && Array.isArray(x) ? '[...]' : describe(x, depth + 1));
  const shown = values.slice(0, 8).map((x) => (Array.isArray(x) || (x !== null && typeof x === 'object') ? nested(x) : JSON.stringify(x) ?? String(x)));
  return `[${shown.join(', ')}${values.length > 8 ? ', ...' : ''}]`;
}

/** `__metadata__`: absent or null (as the reference reads it) is none; else an object of strings. */
function checkMetadata(entry: unknown, fail: (message: string) => SafetensorsError): Record<string, string> {
  if (entry === null) return {};
  if (!isPlainObject(entry)) throw fail(`__metadata__ must be an object of strings, got ${describe(entry)}`);
  for (const [key, value] of Object.entries(entry))
    if (typeof value !== 'string') throw fail(`__metadata__ '${key}' is ${describe(value)}, not a string`);
  return entry as Record<string, string>;
}

/** Sets an own property, even one named `__proto__` (a legal tensor name). */
export function setOwn<T>(record: Record<string, T>, key: string, value: T): void {
  Object.defineProperty(record, key, { value, enumerable: true, writable: true, configurable: true });
}

export async function readSafetensors(path: string): Promise<SafeFile> {
  try {
    return decodeSafetensors(await readFileChecked(path, 'safetensors file'), path);
  } catch (error) {
    throw namedFolderError(error, path);
  }
}

export function readSafetensorsSync(path: string): SafeFile {
  try {
    return decodeSafetensors(readFileCheckedSync(path, 'safetensors file'), path);
  } catch (error) {
    throw namedFolderError(error, path);
  }
}

/** Reading a folder fails with an EISDIR that names no path: say which one. Other errors pass through. */
function namedFolderError(error: unknown, path: string): unknown {
  if ((error as NodeJS.ErrnoException).code !== 'EISDIR') return error;
  return new SafetensorsError(`${path} is a folder, not a safetensors file`, path, false);
}

export async function writeSafetensors(
  path: string,
  tensors: Record<string, SafeArray | { data: SafeArray; shape: number[] }>,
  metadata: Record<string, string> = {},
): Promise<void> {
  await writeFileAtomic(path, encodeSafetensors(tensors, metadata));
}
