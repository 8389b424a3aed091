// The oneDNN primitive cache (native/onednn/context.cpp) kept every primitive it made, and
// each image size makes a new set: predicting on a folder of differently sized images grew
// the process by about 1 MB a size without bound (120 sizes of this model: +110 MB; 400 sizes
// of a depth-2 one: 189 -> 365 MB). It is now bounded (least recently used out first), so
// after a few dozen sizes the process stops growing, as it does on the reference layers
// (CMSEG_ONEDNN=0). Each run is a child Node, so that its RSS is its own.
import t from 'tap';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { spawnSync } from 'child_process';

// CMSEG_ADDON as src/native.ts reads it: the children load the addon the in-process tests do.
const addon = process.env.CMSEG_ADDON ? path.resolve(process.env.CMSEG_ADDON) : path.join(__dirname, '..', 'build', 'Release', 'cmseg.node');
const skip = process.platform === 'linux' && fs.existsSync(addon) ? false : 'Linux (RSS from process.memoryUsage) with a built addon only';
const SIZES = 120;
const MB = 1048576;

// 120 distinct 2D sizes on the depth-4 grid (multiples of 8, 16x16 to 104x88), largest
// first so that the activation buffers have their final size after the first call. RSS is
// read after 60 sizes and after 120: by 60 the bounded cache (256 entries, 18 a size here)
// and oneDNN's own cache (1024 kernels) are full; an unbounded one grows on by ~1 MB a size.
const body = `
const { NativeModel } = require(${JSON.stringify(addon)});
const rss = () => process.memoryUsage().rss / ${MB};
(async () => {
  const m = new NativeModel({ ndim: 2, classes: 2, annotators: 2, depth: 4, baseChannels: 16 });
  const sizes = [];
  for (let j = 0; j < ${SIZES}; j++) sizes.push([16 + 8 * (j % 12), 16 + 8 * Math.floor(j / 12)]);
  sizes.sort((a, b) => b[0] * b[1] - a[0] * a[1]);
  let at5 = 0, at60 = 0, probs = 0;
  for (let i = 0; i < sizes.length; i++) {
    const [h, w] = sizes[i];
    const p = await m.predict(new Float32Array(h * w).map((_, k) => Math.sin(k)), [1, 1, h, w], {});
    probs += p.probs.length === 2 * h * w ? 1 : 0;
    if (i === 4) at5 = rss();
    if (i === 59) at60 = rss();
  }
  console.log(JSON.stringify({ at5, at60, end: rss(), probs }));
})().catch((e) => { console.error(e); process.exit(1); });`;

function run(onednn: string): Record<string, number> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cmseg-onednn-cache-'));
  try {
    const file = path.join(dir, 'child.js');
    fs.writeFileSync(file, body);
    const r = spawnSync(process.execPath, [file], {
      encoding: 'utf8',
      timeout: 50_000,
      env: { ...process.env, CMSEG_NUM_THREADS: '2', CMSEG_ONEDNN: onednn, CMSEG_ONEDNN_CACHE_ENTRIES: '' },
    });
    if (r.status !== 0) throw new Error(`child (CMSEG_ONEDNN=${onednn}) failed: ${r.signal ?? r.status} ${r.stderr}`);
    return JSON.parse(r.stdout.trim().split('\n').pop() ?? '{}');
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

t.test(`predicting ${SIZES} distinct image sizes: RSS stops growing with oneDNN as without`, { skip }, async (t) => {
  const on = run('1');
  const off = run('0');
  t.equal(on.probs, SIZES, 'every prediction has its size');
  t.equal(off.probs, SIZES, 'every prediction has its size (reference)');
  const grownOn = on.end - on.at60, grownOff = off.end - off.at60;
  t.comment(
    `RSS with oneDNN ${on.at5.toFixed(1)} -> ${on.at60.toFixed(1)} -> ${on.end.toFixed(1)} MB; ` +
      `without ${off.at5.toFixed(1)} -> ${off.at60.toFixed(1)} -> ${off.end.toFixed(1)} MB (after 5, 60, ${SIZES} sizes)`,
  );
  // Unbounded, sizes 60-120 added about 55 MB here (0.9 MB a size); bounded, 1-3 MB. The
  // limit is the reference's growth plus 20 MB of noise (glibc arenas, V8's heap).
  t.ok(grownOn < grownOff + 20, `sizes 60-${SIZES}: RSS grew ${grownOn.toFixed(1)} MB with oneDNN, ${grownOff.toFixed(1)} MB without (limit: without + 20 MB)`);
  // And the whole run stays within a bound: the two caches full, not a megabyte a size.
  t.ok(on.end - on.at5 < off.end - off.at5 + 80, `sizes 5-${SIZES}: RSS grew ${(on.end - on.at5).toFixed(1)} MB with oneDNN, ${(off.end - off.at5).toFixed(1)} MB without (limit: without + 80 MB)`);
});
