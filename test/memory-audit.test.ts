// Memory of a long-lived process (a script that creates, trains, predicts with and drops or
// disposes many models, fuses many maps, and meets rejected calls): resident memory must stop
// growing after a warm-up. Each check runs in a child Node so that its RSS is its own; the
// thresholds are 10x (or more) below the growth a leak of the round's buffers would give, and
// 10x above the noise measured here (RSS moves by a few MB as glibc trims its arenas).
import t, { Test } from 'tap';
import * as fs from 'fs';
import { ADDON, runChild } from './helpers/child';

// The children load the addon the in-process tests do.
const addon = ADDON;
const linux = process.platform === 'linux' && fs.existsSync(addon) ? false : 'Linux (RSS from process.memoryUsage) with a built addon only';
const MB = 1048576;

/** Runs `body` (CommonJS; `NativeModel`, `fuse`, `rss()` and `gc()` in scope; prints one JSON line) in a child Node. */
function child(t: Test, body: string, env: Record<string, string> = {}, gcFlag = true): Record<string, number> {
  const run = runChild(
    t,
    `const { NativeModel, fuse } = require(${JSON.stringify(addon)});
const rss = () => process.memoryUsage().rss / ${MB};
// Collections, with a turn of the event loop between them: node runs native finalizers there.
const gc = async () => { global.gc(); await new Promise((r) => setImmediate(r)); global.gc(); };
(async () => {
${body}
})().catch((e) => { console.error(e); process.exit(1); });`,
    { gc: gcFlag, timeoutMs: 120_000, env: { CMSEG_NUM_THREADS: '2', ...env } },
  );
  t.equal(run.signal, null, 'no signal');
  t.equal(run.status, 0, run.stderr);
  return run.out as Record<string, number>;
}

// A CPU model keeps its activation buffers between calls. V8 was told only of its parameters
// (16 bytes each: 0.4 MB here), not of those buffers (a 2x32^3 step: 44 MB), so a loop that
// creates and trains models without dispose() never triggered a collection: RSS grew by 44 MB a
// round, to 3 GB after 60 rounds. The bindings now report the buffers too, and V8 collects.
t.test('models trained and dropped without dispose() are collected: RSS stays bounded without forced GC', { skip: linux }, async (t) => {
  const out = child(
    t,
    `
    const side = 32, V = side ** 3, n = 2;
    const images = new Float32Array(n * V).map((_, i) => Math.sin(i));
    const labels = [0, 1].map((r) => new Uint8Array(n * V).map((_, i) => (Math.sin(i) > 0.1 * r ? 1 : 0)));
    const config = { ndim: 3, classes: 2, annotators: 2, depth: 2, baseChannels: 8 };
    // What one model holds after its step: the third of three models kept alive (the first
    // also loads oneDNN), so no collection can hand the memory of one to the next.
    let kept = [], before = 0, first = 0, at10 = 0, peak = 0;
    for (let k = 0; k < 3; k++) {
      if (k === 2) before = rss();
      kept.push(new NativeModel(config));
      await kept[k].trainStep({ images, shape: [n, 1, side, side, side], labels });
    }
    first = rss() - before;
    kept = null;
    for (let i = 1; i <= 40; i++) {
      const m = new NativeModel(config);
      await m.trainStep({ images, shape: [n, 1, side, side, side], labels });
      if (i === 10) at10 = rss();
      peak = Math.max(peak, rss());
    }
    console.log(JSON.stringify({ first, growth: rss() - at10, peak }));`,
    {},
    false,
  );
  t.ok(out.first > 20, `one trained model holds ${out.first?.toFixed(1)} MB (the size a dropped model would leak)`);
  // Before the fix: 1.3 GB over these 30 rounds. Now V8 collects once the reported memory has
  // grown by its 64 MB step, so a few dropped models (about 60 MB each) are alive at a time:
  // RSS moves within about 250 MB. The limit is 10 dropped models.
  const limit = 10 * out.first;
  t.ok(out.growth < limit, `RSS grew ${out.growth?.toFixed(1)} MB over rounds 10-40 (limit ${limit?.toFixed(0)} MB; peak ${out.peak?.toFixed(0)} MB)`);
});

// createModel + trainStep + predict + dispose, 2D and 3D, every CM mode and the plain-CE target,
// on the oneDNN path and the reference: nothing of a disposed model may stay behind.
for (const onednn of ['1', '0']) {
  t.test(`create/train/predict/dispose rounds do not grow RSS (CMSEG_ONEDNN=${onednn})`, { skip: linux }, async (t) => {
    const out = child(
      t,
      `
      const cases = [];
      for (const ndim of [2, 3]) {
        const S = ndim === 2 ? [48, 48] : [16, 16, 16], V = S.reduce((a, b) => a * b), n = 2;
        const images = new Float32Array(n * V).map((_, i) => Math.sin(i));
        const labels = [0, 1].map((r) => new Uint8Array(n * V).map((_, i) => (Math.sin(i) > 0.1 * r ? 1 : 0)));
        for (const cmMode of ['full', 'lowrank', 'global', 'target'])
          cases.push({ ndim, S, n, images, cmMode, batch: cmMode === 'target' ? { images, shape: [n, 1, ...S], target: labels[0] } : { images, shape: [n, 1, ...S], labels } });
      }
      const round = async () => {
        for (const c of cases) {
          const m = new NativeModel({ ndim: c.ndim, classes: 2, annotators: 2, depth: 2, baseChannels: 8, cmMode: c.cmMode === 'target' ? 'full' : c.cmMode });
          await m.trainStep(c.batch);
          const p = await m.predict(c.images, [c.n, 1, ...c.S], { cms: true, annotatorProbs: true });
          if (p.probs.length !== c.n * 2 * c.S.reduce((a, b) => a * b)) throw new Error('probs of the wrong size');
          m.dispose();
        }
      };
      const rows = [];
      for (let i = 1; i <= 60; i++) {
        await round();
        if (i % 10 === 0) { await gc(); rows.push(rss()); }
      }
      console.log(JSON.stringify({ at20: rows[1], at60: rows[5], growth: rows[5] - rows[1] }));`,
      { CMSEG_ONEDNN: onednn },
    );
    // A round frees 8 models of 0.4-3 MB each (parameters, moments, activations): a leak of
    // them would grow RSS by over 400 MB in 40 rounds.
    t.ok(out.growth < 40, `RSS ${out.at20?.toFixed(1)} MB at round 20, ${out.at60?.toFixed(1)} MB at round 60 (growth limit 40 MB)`);
  });
}

// Calls the engine rejects (NaN images, a bad label, a shape off the model's grid, outputs
// beyond the machine) copy their inputs or allocate outputs first: those must be freed too.
t.test('rejected calls and fuse() rounds free their buffers', { skip: linux }, async (t) => {
  const out = child(
    t,
    `
    const side = 256, V = side * side;
    const m = new NativeModel({ ndim: 2, classes: 2, annotators: 2, depth: 2, baseChannels: 4 });
    const nan = new Float32Array(V).map((_, i) => Math.sin(i)); nan[V - 1] = NaN;
    const good = new Float32Array(V).map((_, i) => Math.sin(i));
    const zeros = [new Uint8Array(V), new Uint8Array(V)];
    const sevens = [new Uint8Array(V), new Uint8Array(V).fill(7)];
    const odd = new Float32Array(255 * 255);
    const maps = [3, 4, 5].map((r) => new Uint8Array(32 ** 3).map((_, i) => ((i * r) >> 4) % 3 === 0 ? 1 : 0));
    let rejected = 0;
    const expectReject = async (call) => { try { await call(); } catch { rejected++; return; } throw new Error('a bad call resolved'); };
    const round = async () => {
      await expectReject(() => m.trainStep({ images: nan, shape: [1, 1, side, side], labels: zeros }));
      await expectReject(() => m.trainStep({ images: good, shape: [1, 1, side, side], labels: sevens }));
      await expectReject(() => m.predict(nan, [1, 1, side, side], { cms: true, annotatorProbs: true }));
      await expectReject(() => m.predict(odd, [1, 1, 255, 255], { cms: true }));
      await expectReject(() => m.predict(good, [1e9, 1, side, side], {}));
      for (const method of ['mean', 'mode', 'staple', 'multi-staple', 'spatial-staple'])
        await fuse(maps, { method, classes: 2, ...(method === 'spatial-staple' ? { shape: [32, 32, 32] } : {}) });
    };
    const rows = [];
    for (let i = 1; i <= 60; i++) {
      await round();
      if (i % 10 === 0) { await gc(); rows.push(rss()); }
    }
    console.log(JSON.stringify({ rejected, growth: rows[5] - rows[1] }));`,
  );
  t.equal(out.rejected, 300, 'every bad call rejected');
  // A round copies 1.5 MB of inputs for the rejected calls and fuses 3 x 32 KB maps into
  // 0.5 MB of outputs: 40 rounds of a leak of them would be over 60 MB.
  t.ok(out.growth < 20, `RSS grew ${out.growth?.toFixed(1)} MB over rounds 20-60 (limit 20 MB)`);
});
