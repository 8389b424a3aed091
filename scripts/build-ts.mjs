#!/usr/bin/env node
// The TypeScript half of `npm install` (and `npm run build:ts`): compiles src/ into dist/
// and makes the CLI executable. The native half is scripts/build-native.mjs.
//
// Where it runs decides what there is to do:
//   a clone (src/ present, devDependencies installed)  compile with the project's tsc;
//   a packed cmseg (npm pack / a registry: no src/)     dist/ ships prebuilt (prepack), nothing to do;
//   a clone installed into another project without its own node_modules (no tsc to run):
//                                                      keep a dist/ that is already there, else say
//                                                      exactly what to run first.
import { spawnSync } from 'node:child_process';
import { chmodSync, existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const cli = join(root, 'dist', 'cli', 'main.js');

function fail(message) {
  process.stderr.write(`cmseg: ${message}\n`);
  process.exit(1);
}

if (!existsSync(join(root, 'src'))) {
  if (!existsSync(cli)) fail('this copy of cmseg has neither src/ nor a built dist/: reinstall it from a clone or a package made by `npm pack`');
  process.exit(0);
}

let tsc;
try {
  tsc = createRequire(join(root, 'package.json')).resolve('typescript/bin/tsc');
} catch {
  if (existsSync(cli)) {
    process.stderr.write('cmseg: TypeScript is not installed here; keeping the dist/ already built\n');
    process.exit(0);
  }
  fail(`TypeScript (a devDependency) is not installed in ${root}, so src/ cannot be compiled: run \`npm install\` inside that folder first (it installs TypeScript and builds dist/), then install cmseg from it`);
}

const run = spawnSync(process.execPath, [tsc, '-p', join(root, 'tsconfig.json')], { stdio: 'inherit' });
if (run.status !== 0) process.exit(run.status ?? 1);
chmodSync(cli, 0o755); // tsc writes files without the execute bit; `npx cmseg` runs this one
