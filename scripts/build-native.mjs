#!/usr/bin/env node
// The native half of `npm install` (and `npm run build:native`, `build:native:debug`): the addon
// through cmake-js. The TypeScript half is scripts/build-ts.mjs.
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { delimiter, dirname, join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

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
// ---------------------------------------------------------------- the CUDA backend
// CMake builds it when it finds a CUDA compiler (CUDACXX, or nvcc on PATH) and cuDNN
// (CUDNN_ROOT, or the system's include and library folders). An install has no command line
// for -D options, so the places a GPU machine usually keeps them are looked up here:
//   nvcc: CUDACXX, PATH, then $CUDA_HOME, $CUDA_PATH and /usr/local/cuda (bin/nvcc);
//   cuDNN: CUDNN_ROOT, the system's cudnn.h, one in those CUDA folders, then the nvidia-cudnn-cuXX pip wheel that
//   PyTorch installs, when its CUDA major version is nvcc's (a cu12 cuDNN needs CUDA 12).
// CMSEG_CUDA=OFF skips the CUDA backend (its compile takes minutes), ON makes its absence
// an error, AUTO (the default) builds it when both are found.

/** The facts cudaOptions decides from; `probe()` reads them from this machine. */
export function probe(env = process.env) {
  // Switched off: no compiler or Python to ask (cudaOptions stops at the mode).
  if (/^off$/i.test(env.CMSEG_CUDA ?? '')) return { cudaMode: env.CMSEG_CUDA, nvccOnPath: false, systemCudnn: false };
  const onPath = (name) => (env.PATH ?? '').split(delimiter).filter(Boolean).map((d) => join(d, name)).find((f) => existsSync(f));
  const homes = [env.CUDA_HOME, env.CUDA_PATH, '/usr/local/cuda'].filter(Boolean);
  const nvccIn = homes.map((h) => join(h, 'bin', 'nvcc')).find((f) => existsSync(f));
  const nvcc = env.CUDACXX || onPath('nvcc') || nvccIn;
  // CMake's own search finds a cuDNN in the system's folders (a distribution's package); one
  // copied into the CUDA toolkit (NVIDIA's tarball instructions) needs CUDNN_ROOT.
  const systemCudnn = ['/usr/include', '/usr/local/include', '/usr/include/x86_64-linux-gnu', '/usr/include/aarch64-linux-gnu']
    .some((d) => existsSync(join(d, 'cudnn.h')));
  const homeCudnn = homes.find((h) => existsSync(join(h, 'include', 'cudnn.h')));
  return {
    cudaMode: env.CMSEG_CUDA,
    cudacxx: env.CUDACXX,
    nvccOnPath: Boolean(onPath('nvcc')),
    nvccInHome: nvccIn,
    nvccMajor: nvcc ? nvccMajor(nvcc) : undefined,
    cudnnRoot: env.CUDNN_ROOT,
    systemCudnn,
    homeCudnn,
    wheel: nvcc && !env.CUDNN_ROOT && !systemCudnn && !homeCudnn ? cudnnWheel(env.PYTHON || 'python3') : undefined,
  };
}

/** nvcc's major version ("release 12.4" in --version), or undefined when it does not run. */
function nvccMajor(nvcc) {
  const r = spawnSync(nvcc, ['--version'], { encoding: 'utf8', timeout: 30_000 });
  const m = /release (\d+)\./.exec(r.stdout ?? '');
  return m ? Number(m[1]) : undefined;
}

/** The cuDNN pip wheel's folder (include/, lib/) and its CUDA major version, or undefined. */
function cudnnWheel(python) {
  const script = [
    'import json, importlib.metadata as m',
    'try:',
    '    import nvidia.cudnn as c; folder = list(c.__path__)[0]',
    'except Exception:',
    '    folder = None',
    "names = [d.metadata['Name'] or '' for d in m.distributions()]",
    "print(json.dumps({'folder': folder, 'names': [n for n in names if n.lower().startswith('nvidia-cudnn-cu')]}))",
  ].join('\n');
  const r = spawnSync(python, ['-c', script], { encoding: 'utf8', timeout: 30_000 });
  try {
    const { folder, names } = JSON.parse(r.stdout.trim().split('\n').pop());
    if (!folder || !existsSync(join(folder, 'include', 'cudnn.h'))) return undefined;
    const majors = names.map((n) => Number(/-cu(\d+)$/i.exec(n)?.[1])).filter(Number.isFinite);
    return { folder, cudaMajors: majors };
  } catch {
    return undefined;
  }
}

/**
 * The cmake-js options for the CUDA backend, and lines that say what was found: a user with a
 * GPU learns at install time whether the CUDA backend is being built, and if not, why.
 */
export function cudaOptions(facts) {
  const args = [];
  const notes = [];
  const mode = facts.cudaMode === undefined || facts.cudaMode === '' ? 'AUTO' : String(facts.cudaMode).toUpperCase();
  if (!/^(ON|OFF|AUTO)$/.test(mode)) return { error: `CMSEG_CUDA is '${facts.cudaMode}': give ON, OFF or AUTO` };
  // Passed every time, AUTO too: CMake caches the option, so an OFF install would stay OFF.
  args.push(`--CDCMSEG_WITH_CUDA=${mode}`);
  if (mode === 'OFF') return { args, notes: ['CUDA backend: off (CMSEG_CUDA=OFF)'] };
  const without = mode === 'ON' ? 'CMSEG_CUDA=ON makes this an error' : 'building the CPU backends';
  if (!facts.cudacxx && !facts.nvccOnPath) {
    if (!facts.nvccInHome) {
      notes.push(`CUDA backend: no CUDA compiler found (CUDACXX, nvcc on PATH, CUDA_HOME, /usr/local/cuda): ${without}`);
      return { args, notes };
    }
    args.push(`--CDCMAKE_CUDA_COMPILER=${facts.nvccInHome}`);
  }
  const nvcc = facts.cudacxx || (facts.nvccOnPath ? 'nvcc on PATH' : facts.nvccInHome);
  const version = facts.nvccMajor ? ` (CUDA ${facts.nvccMajor})` : '';
  if (facts.cudnnRoot) {
    notes.push(`CUDA backend: ${nvcc}${version}, cuDNN from CUDNN_ROOT=${facts.cudnnRoot}`);
  } else if (facts.systemCudnn) {
    notes.push(`CUDA backend: ${nvcc}${version}, the system's cuDNN`);
  } else if (facts.homeCudnn) {
    args.push(`--CDCUDNN_ROOT=${facts.homeCudnn}`);
    notes.push(`CUDA backend: ${nvcc}${version}, cuDNN in ${facts.homeCudnn}`);
  } else if (facts.wheel) {
    const majors = facts.wheel.cudaMajors;
    if (facts.nvccMajor && majors.length && !majors.includes(facts.nvccMajor)) {
      notes.push(`CUDA backend: ${nvcc}${version}, but the cuDNN pip wheel in ${facts.wheel.folder} is for CUDA ${majors.join(', ')}: ` +
        `not used (set CUDNN_ROOT to a cuDNN for CUDA ${facts.nvccMajor}, e.g. pip install nvidia-cudnn-cu${facts.nvccMajor})`);
    } else {
      args.push(`--CDCUDNN_ROOT=${facts.wheel.folder}`);
      notes.push(`CUDA backend: ${nvcc}${version}, cuDNN from the pip wheel in ${facts.wheel.folder}`);
    }
  } else {
    notes.push(`CUDA backend: ${nvcc}${version}, but no cuDNN found (CUDNN_ROOT, the system's cudnn.h, the nvidia-cudnn-cu${facts.nvccMajor ?? 'XX'} pip wheel): ${without}`);
  }
  return { args, notes };
}

/** What the built addon has, one line: the user sees whether the GPU backend came out. */
function builtSummary(addonPath) {
  try {
    const b = createRequire(import.meta.url)(addonPath).backendInfo();
    const gpu = !b.cuda ? 'no CUDA backend' : b.gpuAvailable ? `CUDA with cuDNN ${b.cudnnVersion}, GPU ${b.gpu}` : `CUDA with cuDNN ${b.cudnnVersion}, no GPU usable now (${b.gpuUnavailableReason})`;
    return `built the native addon: CPU reference${b.onednn ? ', oneDNN fast path' : ''}; ${gpu}; ${b.defaultThreads} threads by default (${b.threadsReason})`;
  } catch (e) {
    return `built the native addon, but it does not load here: ${e.message}`;
  }
}

function main() {
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
  // Passed every time (ON when unset): CMake caches it, so a portable rebuild would stay portable.
  const arch = process.env.CMSEG_NATIVE_ARCH || 'ON';
  if (!/^(ON|OFF)$/i.test(arch)) fail(`CMSEG_NATIVE_ARCH is '${arch}': give ON or OFF`);
  if (!rest.some((r) => r.startsWith('--CDCMSEG_NATIVE_ARCH='))) args.push(`--CDCMSEG_NATIVE_ARCH=${arch.toUpperCase()}`);
  // Options given on the command line (--CDCMAKE_CUDA_COMPILER=..., --CDCUDNN_ROOT=...) win.
  const cuda = cudaOptions(probe());
  if (cuda.error) fail(cuda.error);
  for (const a of cuda.args) if (!rest.some((r) => r.startsWith(a.slice(0, a.indexOf('=') + 1)))) args.push(a);
  for (const note of cuda.notes) console.log(`cmseg: ${note}`);
  const run = spawnSync(process.execPath, args, { cwd: root, stdio: 'inherit' });
  if (run.status !== 0) {
    // cmake-js's last lines say what went wrong; this says what cmseg needs and how to retry.
    fail('building the native addon failed (see above). It needs cmake >= 3.18 and a C++17 compiler ' +
      '(g++ or clang++) on PATH. Once they are there, run `npm rebuild cmseg` in your project ' +
      '(`npm run build:native` in a clone of cmseg).');
  }
  if (command === 'compile' || command === 'build' || command === 'rebuild') {
    const addon = join(root, 'build', rest.includes('--debug') || rest.includes('-D') ? 'Debug' : 'Release', 'cmseg.node');
    if (existsSync(addon)) console.log(`cmseg: ${builtSummary(addon)}`);
  }
  process.exit(0);
}

// Run as a script (npm install, npm run build:native); imported by the tests for cudaOptions.
if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) main();
