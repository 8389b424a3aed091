#!/usr/bin/env node
// `npm test`: the native C++ tests (CTest) and the tap tests, then one summary
// line `N passed, N failed` counting native test cases and tap assertions.
// The summary is also written to build/test-summary.txt for .ci/run.
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const buildDir = process.env.CMSEG_BUILD_DIR ?? join(root, 'build');
let passed = 0;
let failed = 0;

function run(cmd, args, env = {}) {
  const r = spawnSync(cmd, args, { cwd: root, encoding: 'utf8', env: { ...process.env, ...env }, maxBuffer: 1 << 28 });
  process.stdout.write(r.stdout ?? '');
  process.stderr.write(r.stderr ?? '');
  return { code: r.status ?? 1, out: (r.stdout ?? '') + (r.stderr ?? '') };
}

// ---- native tests: each executable prints "# a passed, b failed, c skipped"
function nativeTests(dir, label, env = {}, jobs = 1) {
  if (!existsSync(join(dir, 'CTestTestfile.cmake'))) {
    console.error(`native tests (${label}): ${dir} has no CTest file; run \`npm run build:native\` first`);
    failed += 1;
    return;
  }
  console.log(`== native tests: ${label}`);
  const { code, out } = run('ctest', ['--test-dir', dir, '--output-on-failure', '-V', '-j', String(jobs)], env);
  let cases = 0;
  let skipped = 0;
  let exesWithFailures = 0;
  for (const m of out.matchAll(/# (\d+) passed, (\d+) failed(?:, (\d+) skipped)?/g)) {
    passed += Number(m[1]);
    failed += Number(m[2]);
    skipped += Number(m[3] ?? 0);
    cases += Number(m[1]) + Number(m[2]);
    if (Number(m[2]) > 0) exesWithFailures += 1;
  }
  // Skipped cases (a missing tool or device) are neither; each printed its reason. Cases
  // skipped for one reason (test_cuda's without a GPU) are listed on one line.
  const byReason = new Map();
  for (const m of out.matchAll(/^(?:\d+: )?skip (\S+): (.*)$/gm)) byReason.set(m[2], [...(byReason.get(m[2]) ?? []), m[1]]);
  for (const [reason, names] of byReason) {
    const which = names.length > 3 ? `${names.length} cases (${names.slice(0, 2).join(', ')}, ...)` : names.join(', ');
    console.log(`native (${label}): skipped ${which}: ${reason}`);
  }
  // An executable that crashed or timed out printed no summary of its own: count it as one failure.
  const ctestFailed = out.match(/(\d+) tests failed out of \d+/);
  const failedExes = ctestFailed ? Number(ctestFailed[1]) : code !== 0 ? 1 : 0;
  failed += Math.max(0, failedExes - exesWithFailures);
  console.log(`native (${label}): ${cases} cases${skipped ? `, ${skipped} skipped` : ''}`);
}

const cache = existsSync(join(buildDir, 'CMakeCache.txt')) ? readFileSync(join(buildDir, 'CMakeCache.txt'), 'utf8') : '';
const withOnednn = /CMSEG_DNNL_LIBRARY:FILEPATH=\/|dnnl_DIR:PATH=\//.test(cache) && existsSync(join(buildDir, 'test_onednn'));
nativeTests(buildDir, withOnednn ? 'oneDNN fast path on' : 'CPU reference');
// With oneDNN built, the layers dispatch to it: run everything again on the reference path.
if (withOnednn) nativeTests(buildDir, 'CPU reference (CMSEG_ONEDNN=0)', { CMSEG_ONEDNN: '0' });
// Further builds to test (CI: the CUDA compile on a machine without a GPU).
// Their entries time no code, so they share the cores (the SIMT emulation's two take minutes each).
for (const dir of (process.env.CMSEG_EXTRA_BUILD_DIRS ?? '').split(',').filter(Boolean))
  nativeTests(join(root, dir), dir, {}, 2);

// ---- tap tests
{
  const args = ['tap', ...process.argv.slice(2)];
  const { code, out } = run('npx', args, { FORCE_COLOR: '0' });
  const summary = [...out.matchAll(/# \{ total: (\d+), pass: (\d+)(?:, fail: (\d+))?[^}]*\}/g)].pop();
  if (summary) {
    passed += Number(summary[2]);
    // Failures as tap counts them; skipped tests (each says why) are neither.
    failed += Number(summary[3] ?? 0);
  } else if (code !== 0) {
    failed += 1;
  }
  if (code !== 0 && summary && Number(summary[3] ?? 0) === 0) failed += 1; // a file failed to load or timed out
}

const line = `${passed} passed, ${failed} failed`;
mkdirSync(buildDir, { recursive: true });
writeFileSync(join(buildDir, 'test-summary.txt'), line + '\n');
console.log(line);
process.exit(failed ? 1 : 0);
