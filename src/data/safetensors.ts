// The safetensors format: an 8-byte little-endian header length, a JSON header
// ({name: {dtype, shape, data_offsets}, __metadata__: {string: string}}), then
// the raw little-endian tensor bytes. PyTorch users load these files with
// `safetensors.torch.load_file`.
import { readFileChecked, readFileCheckedSync, writeFileAtomic } from './files';

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

function dtypeOf(a: SafeArray): SafeDtype {
  if (a instanceof Float32Array) return 'F32';
  if (a instanceof Float64Array) return 'F64';
  if (a instanceof Uint8Array) return 'U8';
  if (a instanceof Int32Array) return 'I32';
  if (a instanceof BigInt64Array) return 'I64';
  throw new SafetensorsError('unsupported typed array for a tensor');
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
  if (Object.keys(metadata).length) header.__metadata__ = metadata;
  const parts: Uint8Array[] = [];
  let offset = 0;
  for (const [name, t] of Object.entries(tensors)) {
    const data = 'shape' in t && !ArrayBuffer.isView(t) ? t.data : (t as SafeArray);
    const shape = 'shape' in t && !ArrayBuffer.isView(t) ? t.shape : [data.length];
    const count = shape.reduce((a, b) => a * b, 1);
    if (count !== data.length) throw new SafetensorsError(`tensor '${name}' has ${data.length} values but shape [${shape}]`);
    const bytes = new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
    header[name] = { dtype: dtypeOf(data), shape, data_offsets: [offset, offset + bytes.length] };
    parts.push(bytes);
    offset += bytes.length;
  }
  let json = JSON.stringify(header);
  json += ' '.repeat((8 - (json.length % 8)) % 8); // keep the data 8-byte aligned
  const head = Buffer.alloc(8);
  const jsonBytes = Buffer.from(json, 'utf8');
  head.writeBigUInt64LE(BigInt(jsonBytes.length));
  return Buffer.concat([head, jsonBytes, ...parts]);
}

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
  let header: Record<string, { dtype: string; shape: number[]; data_offsets: [number, number] } | Record<string, string>>;
  try {
    header = JSON.parse(buf.subarray(8, 8 + n).toString('utf8'));
  } catch (e) {
    throw new SafetensorsError(`corrupt header JSON (${(e as Error).message})`, path);
  }
  const dataStart = 8 + n;
  const out: SafeFile = { tensors: {}, metadata: {} };
  for (const [name, entry] of Object.entries(header)) {
    if (name === '__metadata__') {
      out.metadata = entry as Record<string, string>;
      continue;
    }
    const e = entry as { dtype: string; shape: number[]; data_offsets: [number, number] };
    if (!(e.dtype in BYTES)) throw new SafetensorsError(`tensor '${name}' has unsupported dtype ${e.dtype}`, path);
    const dtype = e.dtype as SafeDtype;
    const [b, end] = e.data_offsets;
    const count = e.shape.reduce((a, c) => a * c, 1);
    if (end - b !== count * BYTES[dtype]) throw new SafetensorsError(`tensor '${name}': offsets [${b}, ${end}] do not match shape [${e.shape}]`, path);
    if (dataStart + end > bytes.length)
      throw new SafetensorsError(`truncated: tensor '${name}' ends at byte ${dataStart + end} but the file has ${bytes.length}`, path);
    out.tensors[name] = { dtype, shape: e.shape, data: view(dtype, bytes.subarray(dataStart + b, dataStart + end)) };
  }
  return out;
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
