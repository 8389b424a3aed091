// cmseg as a published package (`npm pack`, then `npm install cmseg-*.tgz` in another
// project): the tarball holds every file its install script builds from and nothing of the
// development tree; the packed sources configure with the flags the install passes; a strict
// TypeScript consumer type-checks the README's examples through the `exports` map.
// The full native install is too slow for this file (minutes); it is checked by hand.
import t from 'tap';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { spawnSync } from 'child_process';

const root = path.resolve(__dirname, '..');
const pkg = JSON.parse(fs.readFileSync(path.join(root, 'package.json'), 'utf8'));
const tscBin = path.join(root, 'node_modules', 'typescript', 'bin', 'tsc');

/** Every file under `dir` (relative to the repository root, '/'-separated). */
function walk(dir: string): string[] {
  const out: string[] = [];
  for (const entry of fs.readdirSync(path.join(root, dir), { withFileTypes: true })) {
    const rel = `${dir}/${entry.name}`;
    if (entry.isDirectory()) out.push(...walk(rel));
    else if (entry.isFile()) out.push(rel);
  }
  return out;
}

/** What `npm pack` would put in the tarball (no lifecycle scripts: prepack would rebuild dist/). */
function packList(cwd = root): { files: string[]; unpackedSize: number } {
  const run = spawnSync('npm', ['pack', '--dry-run', '--json', '--ignore-scripts'], {
    cwd, encoding: 'utf8', timeout: 60_000, env: { ...process.env, npm_config_loglevel: 'silent' },
  });
  if (run.status !== 0) throw new Error(`npm pack --dry-run failed: ${run.stderr}`);
  const [info] = JSON.parse(run.stdout) as { files: { path: string }[]; unpackedSize: number }[];
  return { files: info.files.map((f) => f.path), unpackedSize: info.unpackedSize };
}

// Development-only native sources: the C++ tests, benchmarks and the host emulation of the
// CUDA layer API. CMakeLists.txt compiles them only with CMSEG_BUILD_TESTS / CMSEG_CUDA_EMULATION.
const devNative = /^native\/(tests\/|cuda\/emulation\/|[^/]+\/bench\/)/;

t.test('the tarball holds what the install builds from, and nothing of the development tree', async (t) => {
  const { files, unpackedSize } = packList();
  const listed = new Set(files);
  const missing = (want: string[]) => want.filter((f) => !listed.has(f));

  // The install script's inputs: CMake project, bindings, library sources, build script.
  const buildInputs = [
    'package.json', 'README.md', 'CMakeLists.txt', 'scripts/build-ts.mjs', 'scripts/build-native.mjs',
    ...walk('bindings'),
    ...walk('native').filter((f) => !devNative.test(f) && !/\/\.sass-diff-/.test(f)),
  ];
  t.same(missing(buildInputs), [], 'every build input is packed');
  // `cmseg bench` runs the PyTorch side from the package (src/bench/run.ts).
  t.same(missing(['scripts/torch_reference.py']), [], 'the bench reference script is packed');

  // The compiled TypeScript (dist/ is built before packing: prepack, or `npm install` in CI).
  if (fs.existsSync(path.join(root, 'dist', 'index.js'))) {
    const entry = [pkg.main, pkg.types, pkg.bin.cmseg, pkg.exports['.'].types, pkg.exports['.'].default]
      .map((p: string) => p.replace(/^\.\//, ''));
    t.same(missing(entry), [], 'main, types, bin and exports targets are packed');
    const compiled = walk('src').filter((f) => f.endsWith('.ts'))
      .flatMap((f) => [f.replace(/^src\//, 'dist/').replace(/\.ts$/, '.js'), f.replace(/^src\//, 'dist/').replace(/\.ts$/, '.d.ts')])
      .filter((f) => fs.existsSync(path.join(root, f)));
    t.same(missing(compiled), [], 'every compiled module and its declarations are packed');
  } else {
    t.comment('dist/ is not built here: its files are not checked');
  }
  t.match(fs.readFileSync(path.join(root, 'src', 'cli', 'main.ts'), 'utf8'), /^#!\/usr\/bin\/env node\n/, 'the bin has a shebang');

  const unwanted = files.filter((f) =>
    /^(build|build-[^/]+|src|test|results|node_modules|\.cuda|\.cuda-tools|\.tap|\.ci|\.device|device-out)\//.test(f) ||
    devNative.test(f) ||
    /\.(map|node|log|o|a|so)$/.test(f) || // source maps name src/ files the package does not have
    (f.startsWith('scripts/') && f !== 'scripts/build-ts.mjs' && f !== 'scripts/build-native.mjs' && f !== 'scripts/torch_reference.py'));
  t.same(unwanted, [], 'no build outputs, tests, source maps or development scripts');
  t.ok(unpackedSize < 2_500_000, `unpacked size ${unpackedSize} bytes`);
});

t.test('files left in the packed folders by development tools stay out', async (t) => {
  // npm applies neither .gitignore nor .npmignore inside the folders "files" names, so what
  // .gitignore keeps out of native/ must be excluded in "files" itself.
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cmseg-packlist-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  fs.copyFileSync(path.join(root, 'package.json'), path.join(dir, 'package.json'));
  fs.copyFileSync(path.join(root, '.gitignore'), path.join(dir, '.gitignore'));
  const made = ['native/cuda/adam.cu', 'native/cuda/.sass-diff-123-adam.cu', 'native/tests/test_model.cpp', 'native/onednn/bench/bench_step.cpp'];
  for (const f of made) {
    fs.mkdirSync(path.dirname(path.join(dir, f)), { recursive: true });
    fs.writeFileSync(path.join(dir, f), '// x\n');
  }
  t.same(packList(dir).files.filter((f) => f.startsWith('native/')), ['native/cuda/adam.cu']);
});

t.test('the packed sources configure with the flags the install passes', async (t) => {
  const { files } = packList();
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cmseg-pack-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  for (const f of files.filter((f) => !f.startsWith('dist/'))) {
    fs.mkdirSync(path.dirname(path.join(dir, f)), { recursive: true });
    fs.copyFileSync(path.join(root, f), path.join(dir, f));
  }
  fs.symlinkSync(path.join(root, 'node_modules'), path.join(dir, 'node_modules'), 'dir');
  // The install script's native half (also what loadNative's message tells a user to run in
  // node_modules/cmseg), configure only: no compile (minutes).
  t.match(pkg.scripts.install, /^npm run build:native && /, 'install runs build:native');
  const run = spawnSync('npm', ['run', 'build:native', '--', 'configure'], {
    cwd: dir, encoding: 'utf8', timeout: 120_000,
  });
  t.equal(run.status, 0, run.status === 0 ? 'configures' : `configure in the unpacked package:\n${run.stdout}\n${run.stderr}`);
  const cache = fs.readFileSync(path.join(dir, 'build', 'CMakeCache.txt'), 'utf8');
  t.match(cache, /^CMSEG_BUILD_TESTS:BOOL=OFF$/m, 'the package builds the addon without the C++ tests');
  const ninja = path.join(dir, 'build', 'build.ninja');
  const rules = fs.readFileSync(fs.existsSync(ninja) ? ninja : path.join(dir, 'build', 'Makefile'), 'utf8');
  t.match(rules, /cmseg_addon/, 'the addon target is configured');
  t.notMatch(rules, /test_model|bench_fusion_main/, 'no test or benchmark targets');
  t.match(cache, /^CMSEG_NATIVE_ARCH:BOOL=ON$/m, 'compiled for the build machine by default');
  // A portable addon (CMSEG_NATIVE_ARCH=OFF in the environment: an install has no command line).
  fs.rmSync(path.join(dir, 'build'), { recursive: true, force: true });
  const portable = spawnSync(process.execPath, ['scripts/build-native.mjs', 'configure'], {
    cwd: dir, encoding: 'utf8', timeout: 120_000, env: { ...process.env, CMSEG_NATIVE_ARCH: 'off' },
  });
  t.equal(portable.status, 0, portable.stderr);
  t.match(fs.readFileSync(path.join(dir, 'build', 'CMakeCache.txt'), 'utf8'), /^CMSEG_NATIVE_ARCH:BOOL=OFF$/m, 'CMSEG_NATIVE_ARCH=off builds without -march=native');
  // The next build without it, in the same folder, is native again (CMake's cache kept OFF before).
  const again = spawnSync(process.execPath, ['scripts/build-native.mjs', 'configure'], {
    cwd: dir, encoding: 'utf8', timeout: 120_000, env: { ...process.env, CMSEG_NATIVE_ARCH: '' },
  });
  t.equal(again.status, 0, again.stderr);
  t.match(fs.readFileSync(path.join(dir, 'build', 'CMakeCache.txt'), 'utf8'), /^CMSEG_NATIVE_ARCH:BOOL=ON$/m, 'unset again: native again');
  // cmake run by hand on the package (no --CD from the script) leaves the tests out too.
  fs.rmSync(path.join(dir, 'build'), { recursive: true, force: true });
  const byHand = spawnSync('cmake', ['-S', dir, '-B', path.join(dir, 'build'), `-DCMAKE_JS_INC=${path.join(root, 'node_modules', 'node-api-headers', 'include')}`], { encoding: 'utf8', timeout: 120_000 });
  t.equal(byHand.status, 0, byHand.stderr);
  t.match(fs.readFileSync(path.join(dir, 'build', 'CMakeCache.txt'), 'utf8'), /^CMSEG_BUILD_TESTS:BOOL=OFF$/m, 'CMakeLists.txt defaults the tests off where native/tests is absent');

  // Without cmake on PATH (node is run by its full path): cmake-js says what is missing, and
  // the last line says what cmseg needs and how to retry from the user's project.
  fs.rmSync(path.join(dir, 'build'), { recursive: true, force: true });
  const empty = fs.mkdtempSync(path.join(os.tmpdir(), 'cmseg-nopath-'));
  t.teardown(() => fs.rmSync(empty, { recursive: true, force: true }));
  const bare = spawnSync(process.execPath, ['scripts/build-native.mjs', 'configure'], {
    cwd: dir, encoding: 'utf8', timeout: 60_000, env: { ...process.env, PATH: empty },
  });
  t.equal(bare.status, 1, 'the install fails');
  const said = `${bare.stdout}\n${bare.stderr}`;
  t.match(said, /CMake executable is not found|C\+\+ Compiler toolset is not available/, 'cmake-js names what is missing');
  t.match(bare.stderr.trim().split('\n').pop()!, /^cmseg: building the native addon failed .*cmake >= 3\.18 and a C\+\+17 compiler.*`npm rebuild cmseg`/);
});

/**
 * A consumer project with node_modules/cmseg as installed: package.json and dist/ (compiled
 * here from src/, so that a stale dist/ does not hide a change; no addon: loaded lazily).
 * The package's own dependencies are found through NODE_PATH (see `env`).
 */
let consumer: string | undefined;
function consumerProject(): string {
  if (consumer) return consumer;
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cmseg-consumer-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true })); // the file's root test: shared by two subtests
  const installed = path.join(dir, 'node_modules', 'cmseg');
  fs.mkdirSync(installed, { recursive: true });
  fs.copyFileSync(path.join(root, 'package.json'), path.join(installed, 'package.json'));
  // tsc's exit status is not checked: a type error elsewhere in src/ is tsc --noEmit's business;
  // the files this test needs are checked for below.
  spawnSync(process.execPath, [tscBin, '-p', path.join(root, 'tsconfig.json'), '--sourceMap', 'false', '--outDir', path.join(installed, 'dist')], { encoding: 'utf8', timeout: 120_000 });
  consumer = dir;
  return dir;
}
const env = { ...process.env, NODE_PATH: path.join(root, 'node_modules') };

t.test('a strict TypeScript consumer type-checks the README examples through the exports map', async (t) => {
  const dir = consumerProject();
  t.ok(fs.existsSync(path.join(dir, 'node_modules', 'cmseg', pkg.types)), 'declarations emitted');

  const readme = fs.readFileSync(path.join(root, 'README.md'), 'utf8');
  const blocks = [...readme.matchAll(/```(ts|typescript)\n([\s\S]*?)```/g)].filter((m) => /from 'cmseg'/.test(m[2]));
  t.ok(blocks.length >= 2, 'the README has its TypeScript examples');
  blocks.forEach((m, i) => fs.writeFileSync(path.join(dir, `readme${i}.${/^\s*(const|let) \w+ = await /m.test(m[2]) ? 'mts' : 'ts'}`), m[2]));
  fs.writeFileSync(path.join(dir, 'cjs.cts'), [
    "import cmseg = require('cmseg');",
    "import type { Batch, ModelConfig, BackendInfo } from 'cmseg';",
    "const config: ModelConfig = { ndim: 2, inChannels: 1, classes: 2, annotators: 2, depth: 2, baseChannels: 4 };",
    'export const model: cmseg.Model = cmseg.createModel(config);',
    "export const batch: Batch = { images: new Float32Array(16), shape: [1, 1, 4, 4], labels: [new Uint8Array(16), new Uint8Array(16)] };",
    'export const info: BackendInfo = cmseg.backendInfo();',
    "import packageJson = require('cmseg/package.json');",
    'export const version: string = packageJson.version;',
    '',
  ].join('\n'));
  const options = {
    target: 'ES2022', strict: true, noEmit: true, skipLibCheck: false, noUncheckedIndexedAccess: true,
    exactOptionalPropertyTypes: true, resolveJsonModule: true, types: ['node'], typeRoots: [path.join(root, 'node_modules', '@types')],
  };
  const check = (name: string, compilerOptions: object, include: string[]) => {
    fs.writeFileSync(path.join(dir, `${name}.json`), JSON.stringify({ compilerOptions: { ...options, ...compilerOptions }, include }));
    return spawnSync(process.execPath, [tscBin, '-p', path.join(dir, `${name}.json`)], { cwd: dir, encoding: 'utf8', timeout: 120_000 });
  };
  const all = ['*.ts', '*.mts', '*.cts'];
  const nodenext = check('nodenext', { module: 'nodenext', moduleResolution: 'nodenext' }, all);
  t.equal(nodenext.status, 0, `module nodenext:\n${nodenext.stdout}`);
  // The other resolutions differ only in how they find the entry point: the library's own
  // declarations were checked above (skipLibCheck false), so skip them here (time).
  const node10 = check('node10', { module: 'commonjs', moduleResolution: 'node10', skipLibCheck: true }, ['*.ts']);
  t.equal(node10.status, 0, `module commonjs, node10 resolution (main/types):\n${node10.stdout}`);
  const bundler = check('bundler', { module: 'esnext', moduleResolution: 'bundler', skipLibCheck: true }, ['*.ts', '*.mts']);
  t.equal(bundler.status, 0, `bundler resolution:\n${bundler.stdout}`);

  // The types are real (not `any`): a wrong use is an error in the consumer's file.
  fs.writeFileSync(path.join(dir, 'wrong.ts'), "import { backendInfo } from 'cmseg';\nexport const gpu: number = backendInfo().gpu;\n");
  const wrong = check('wrong', { module: 'nodenext', moduleResolution: 'nodenext', skipLibCheck: true }, ['wrong.ts']);
  t.not(wrong.status, 0, 'a type error is reported');
  t.match(wrong.stdout, /wrong\.ts\(2,14\): error TS2322/);
});

t.test('ESM and CommonJS consumers see the same exports, and the bin runs', async (t) => {
  const dir = consumerProject();
  // Node's ESM loader finds a CommonJS module's named exports by scanning its source
  // (cjs-module-lexer): every export must be importable by name from an .mjs file.
  fs.writeFileSync(path.join(dir, 'esm.mjs'), [
    "import * as esm from 'cmseg';",
    "import { createModel, train, readNifti } from 'cmseg';",
    "import { createRequire } from 'node:module';",
    "const cjs = createRequire(import.meta.url)('cmseg');",
    "const missing = Object.keys(cjs).filter((k) => !(k in esm));",
    "console.log(JSON.stringify({ missing, count: Object.keys(cjs).length, functions: [typeof createModel, typeof train, typeof readNifti] }));",
    '',
  ].join('\n'));
  const esm = spawnSync(process.execPath, ['esm.mjs'], { cwd: dir, encoding: 'utf8', env, timeout: 60_000 });
  t.equal(esm.status, 0, esm.stderr);
  const seen = JSON.parse(esm.stdout);
  t.same(seen.missing, [], 'every CommonJS export is a named ESM export');
  t.ok(seen.count > 50, `${seen.count} exports`);
  t.same(seen.functions, ['function', 'function', 'function']);
  // Internals stay behind the exports map.
  const deep = spawnSync(process.execPath, ['-e', "require('cmseg/dist/model/model')"], { cwd: dir, encoding: 'utf8', env, timeout: 60_000 });
  t.match(deep.stderr, /ERR_PACKAGE_PATH_NOT_EXPORTED/, 'dist/ internals are not exported');
  // The bin reads the version from the package's package.json (two folders up from dist/cli).
  const bin = path.join(dir, 'node_modules', 'cmseg', pkg.bin.cmseg);
  const version = spawnSync(process.execPath, [bin, '--version'], { cwd: dir, encoding: 'utf8', env, timeout: 60_000 });
  t.equal(version.stdout.trim(), pkg.version, version.stderr);
});

t.test('without its addon, the package says how to build it where the user stands: a clone or an installed package', async (t) => {
  // dist/native.js looks for build/Release/cmseg.node beside dist/; a copy with no build/ has none.
  const copy = fs.mkdtempSync(path.join(os.tmpdir(), 'cmseg-noaddon-'));
  t.teardown(() => fs.rmSync(copy, { recursive: true, force: true }));
  fs.cpSync(path.join(root, 'dist'), path.join(copy, 'dist'), { recursive: true });
  const load = () => {
    const run = spawnSync(process.execPath, ['-e', "try { require('./dist/native.js').loadNative() } catch (e) { console.log(e.message) }"], {
      cwd: copy, encoding: 'utf8', env: { ...process.env, CMSEG_ADDON: '' },
    });
    return run.stdout;
  };
  const installed = load();
  t.match(installed, /^the native addon is not built \(looked for .*build\/Release\/cmseg\.node/, 'no doubled "cmseg: " (the CLI adds its own)');
  t.match(installed, /Build it with `npm rebuild cmseg` in your project \(needs cmake >= 3\.18 and a C\+\+17 compiler; npm 11 may first want `npm install-scripts approve cmseg`\)/);
  t.notMatch(installed, /npm run build:native/, 'no script the depending project does not have');
  fs.mkdirSync(path.join(copy, 'src'));
  t.match(load(), new RegExp(`Build it with \`npm run build:native\` in ${copy.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')} \\(needs cmake`), 'a clone builds with its own script');
  // An addon that is there but cannot be loaded (here: not a shared object at all).
  fs.mkdirSync(path.join(copy, 'build', 'Release'), { recursive: true });
  fs.writeFileSync(path.join(copy, 'build', 'Release', 'cmseg.node'), 'not a library');
  fs.rmSync(path.join(copy, 'src'), { recursive: true });
  t.match(load(), /^the native addon at .*cmseg\.node exists but failed to load: .*\nRebuild it with `npm rebuild cmseg` in your project/);
});
