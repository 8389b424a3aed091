#!/usr/bin/env node
// The native half of `npm install` (and `npm run build:native`, `build:native:debug`): the addon
// through cmake-js. The TypeScript half is scripts/build-ts.mjs.
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');

function fail(message) {
  process.stderr.write(`cmseg: ${message}\n`);
  process.exit(1);
}

// `node scripts/build-native.mjs [command] [options]`: `cmake-js <command, default compile>
// --out build [options]`, options such as --debug or --CDNAME=VALUE passed on to cmake-js.
// A package made by `npm pack` ships no native/tests (package.json "files": the C++ tests are
// for the clone's `npm test`), so there the C++ tests and benchmarks are switched off: CMake
// would not find their sources, and they took half of the install's compile time.
let cmakeJs;
try {
  const require = createRequire(join(root, 'package.json'));
  cmakeJs = join(dirname(require.resolve('cmake-js/package.json')), 'bin', 'cmake-js');
} catch {
  fail(`cmake-js (a dependency of cmseg) is not installed where ${root} can find it: reinstall cmseg`);
}
const rest = process.argv.slice(2);
const command = rest[0] && !rest[0].startsWith('-') ? rest.shift() : 'compile';
const args = [cmakeJs, command, '--out', 'build', ...rest];
if (!existsSync(join(root, 'native', 'tests'))) args.push('--CDCMSEG_BUILD_TESTS=OFF');
// CMSEG_NATIVE_ARCH=OFF in the environment builds a portable addon (no -march=native): an
// install has no command line of its own to pass --CD options through.
const arch = process.env.CMSEG_NATIVE_ARCH;
if (arch !== undefined && arch !== '') {
  if (!/^(ON|OFF)$/i.test(arch)) fail(`CMSEG_NATIVE_ARCH is '${arch}': give ON or OFF`);
  args.push(`--CDCMSEG_NATIVE_ARCH=${arch.toUpperCase()}`);
}
const run = spawnSync(process.execPath, args, { cwd: root, stdio: 'inherit' });
if (run.status !== 0) {
  // cmake-js's last lines say what went wrong; this says what cmseg needs and how to retry.
  fail('building the native addon failed (see above). It needs cmake >= 3.18 and a C++17 compiler ' +
    '(g++ or clang++) on PATH. Once they are there, run `npm rebuild cmseg` in your project ' +
    '(`npm run build:native` in a clone of cmseg).');
}
process.exit(0);
