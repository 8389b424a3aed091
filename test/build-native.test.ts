// The install's native half (scripts/build-native.mjs) looks up the CUDA compiler and cuDNN
// where a GPU machine usually keeps them, since `npm install` has no command line for CMake's
// -D options: nvcc in CUDA_HOME, CUDA_PATH or /usr/local/cuda; cuDNN in the system, in the
// CUDA folder, or PyTorch's nvidia-cudnn-cuXX pip wheel (only for nvcc's CUDA major). Checked
// on given facts (every branch), then for real: configuring a copy of the package with only
// CUDACXX set makes CMake build the CUDA backend with the wheel's cuDNN, where this machine
// has a CUDA compiler and the wheel (CI assembles both: scripts/install-cuda-toolchain.sh).
import t from 'tap';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { spawnSync } from 'child_process';

const root = path.join(__dirname, '..');
const script = path.join(root, 'scripts', 'build-native.mjs');

interface Facts {
  cudaMode?: string;
  cudacxx?: string;
  nvccOnPath: boolean;
  nvccInHome?: string;
  nvccMajor?: number;
  cudnnRoot?: string;
  systemCudnn: boolean;
  homeCudnn?: string;
  wheel?: { folder: string; cudaMajors: number[] };
}
interface Options {
  args?: string[];
  notes?: string[];
  error?: string;
}
type BuildNative = { cudaOptions(f: Facts): Options; probe(env?: NodeJS.ProcessEnv): Facts };
// A real dynamic import (tsc would turn import() into require() in this CommonJS project).
const load = new Function('u', 'return import(u)') as (u: string) => Promise<BuildNative>;
const none: Facts = { nvccOnPath: false, systemCudnn: false };

t.test('cudaOptions: what is passed to CMake, and what the user is told', async (t) => {
  const { cudaOptions } = await load(`file://${script}`);
  // Nothing found: no options, one line saying so.
  let o = cudaOptions(none);
  t.same(o.args, ['--CDCMSEG_WITH_CUDA=AUTO'], 'AUTO passed too (CMake caches the option: an OFF build would stay OFF)');
  t.match(o.notes![0], /no CUDA compiler found .*building the CPU backends/);
  // CMSEG_CUDA: OFF passes OFF and looks no further; ON passes ON (CMake then fails loudly without nvcc); junk is refused.
  t.same(cudaOptions({ ...none, cudaMode: 'off', nvccOnPath: true }), { args: ['--CDCMSEG_WITH_CUDA=OFF'], notes: ['CUDA backend: off (CMSEG_CUDA=OFF)'] });
  t.same(cudaOptions({ ...none, cudaMode: 'On' }), { args: ['--CDCMSEG_WITH_CUDA=ON'], notes: ['CUDA backend: no CUDA compiler found (CUDACXX, nvcc on PATH, CUDA_HOME, /usr/local/cuda): CMSEG_CUDA=ON makes this an error'] });
  t.match(cudaOptions({ ...none, cudaMode: 'yes' }).error, /CMSEG_CUDA is 'yes': give ON, OFF or AUTO/);
  // nvcc only in CUDA_HOME: the compiler is named; the system's cuDNN needs nothing more.
  o = cudaOptions({ ...none, nvccInHome: '/opt/cuda/bin/nvcc', nvccMajor: 12, systemCudnn: true });
  t.same(o.args, ['--CDCMSEG_WITH_CUDA=AUTO', '--CDCMAKE_CUDA_COMPILER=/opt/cuda/bin/nvcc']);
  t.same(o.notes, ["CUDA backend: /opt/cuda/bin/nvcc (CUDA 12), the system's cuDNN"]);
  // nvcc on PATH: CMake finds it itself; cuDNN copied into the CUDA folder is given as CUDNN_ROOT.
  o = cudaOptions({ ...none, nvccOnPath: true, nvccMajor: 12, homeCudnn: '/usr/local/cuda' });
  t.same(o.args, ['--CDCMSEG_WITH_CUDA=AUTO', '--CDCUDNN_ROOT=/usr/local/cuda']);
  // The user's CUDNN_ROOT is CMake's to read from the environment: nothing added.
  o = cudaOptions({ ...none, cudacxx: '/x/nvcc', cudnnRoot: '/y', systemCudnn: true, homeCudnn: '/z' });
  t.same(o.args, ['--CDCMSEG_WITH_CUDA=AUTO']);
  t.match(o.notes![0], /cuDNN from CUDNN_ROOT=\/y/);
  // The pip wheel: used for nvcc's CUDA major, refused with the pip line for another.
  const wheel = { folder: '/site/nvidia/cudnn', cudaMajors: [12] };
  o = cudaOptions({ ...none, nvccOnPath: true, nvccMajor: 12, wheel });
  t.same(o.args, ['--CDCMSEG_WITH_CUDA=AUTO', '--CDCUDNN_ROOT=/site/nvidia/cudnn']);
  o = cudaOptions({ ...none, nvccOnPath: true, nvccMajor: 13, wheel });
  t.same(o.args, ['--CDCMSEG_WITH_CUDA=AUTO']);
  t.match(o.notes![0], /pip wheel in \/site\/nvidia\/cudnn is for CUDA 12: not used \(set CUDNN_ROOT .*pip install nvidia-cudnn-cu13\)/);
  // No cuDNN anywhere: said, with where it was looked for.
  o = cudaOptions({ ...none, nvccOnPath: true, nvccMajor: 12 });
  t.same(o.args, ['--CDCMSEG_WITH_CUDA=AUTO']);
  t.match(o.notes![0], /no cuDNN found \(CUDNN_ROOT, the system's cudnn\.h, the nvidia-cudnn-cu12 pip wheel\): building the CPU backends/);
});

t.test('probe reads CUDA_HOME, CUDACXX and nvcc --version from this machine', async (t) => {
  const { probe } = await load(`file://${script}`);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cmseg-cudahome-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  // A fake toolkit: bin/nvcc prints a release line; include/cudnn.h exists.
  fs.mkdirSync(path.join(dir, 'bin'));
  fs.mkdirSync(path.join(dir, 'include'));
  fs.writeFileSync(path.join(dir, 'bin', 'nvcc'), '#!/bin/sh\necho "Cuda compilation tools, release 12.6, V12.6.77"\n', { mode: 0o755 });
  fs.writeFileSync(path.join(dir, 'include', 'cudnn.h'), '');
  const f = probe({ PATH: '/nonexistent', CUDA_HOME: dir });
  t.equal(f.nvccOnPath, false);
  t.equal(f.nvccInHome, path.join(dir, 'bin', 'nvcc'));
  t.equal(f.nvccMajor, 12);
  t.equal(f.homeCudnn, dir);
  t.equal(f.wheel, undefined, 'no wheel looked up when the CUDA folder has cuDNN');
  const g = probe({ PATH: path.join(dir, 'bin') });
  t.equal(g.nvccOnPath, true);
  t.equal(g.nvccMajor, 12);
});

/** The CUDA compiler CI assembles from pip wheels (.cuda/bin/nvcc), when it is here and runs. */
function wheelNvcc(): string | undefined {
  const nvcc = path.join(root, '.cuda', 'bin', 'nvcc');
  return fs.existsSync(nvcc) && spawnSync(nvcc, ['--version']).status === 0 ? nvcc : undefined;
}
function cudnnWheelFolder(): string | undefined {
  const r = spawnSync('python3', ['-c', 'import nvidia.cudnn as c; print(list(c.__path__)[0])'], { encoding: 'utf8' });
  const folder = r.status === 0 ? r.stdout.trim() : '';
  return folder && fs.existsSync(path.join(folder, 'include', 'cudnn.h')) ? folder : undefined;
}

t.test('configuring with only CUDACXX set builds the CUDA backend with the pip wheel\'s cuDNN', async (t) => {
  const nvcc = wheelNvcc();
  const wheel = cudnnWheelFolder();
  if (!nvcc || !wheel) return t.skip(`needs the pip-wheel CUDA compiler (.cuda/bin/nvcc: scripts/install-cuda-toolchain.sh) and the nvidia-cudnn wheel (${nvcc ? 'no wheel' : 'no nvcc'})`);
  const systemCudnn = ['/usr/include', '/usr/local/include'].some((d) => fs.existsSync(path.join(d, 'cudnn.h')));
  if (systemCudnn) return t.skip('a system cuDNN is installed here: CMake would take it instead of the wheel');
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cmseg-cudaconf-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  for (const f of ['package.json', 'CMakeLists.txt']) fs.copyFileSync(path.join(root, f), path.join(dir, f));
  for (const d of ['native', 'bindings', 'scripts']) fs.cpSync(path.join(root, d), path.join(dir, d), { recursive: true });
  fs.symlinkSync(path.join(root, 'node_modules'), path.join(dir, 'node_modules'), 'dir');
  fs.rmSync(path.join(dir, 'native', 'tests'), { recursive: true, force: true }); // as packed: the addon only
  const env: NodeJS.ProcessEnv = { ...process.env, CUDACXX: nvcc };
  for (const k of ['CUDNN_ROOT', 'CUDA_HOME', 'CUDA_PATH', 'CMSEG_CUDA']) delete env[k];
  const run = spawnSync(process.execPath, ['scripts/build-native.mjs', 'configure', '--CDCMSEG_WITH_ONEDNN=OFF'], { cwd: dir, env, encoding: 'utf8', timeout: 300_000 });
  const said = `${run.stdout}\n${run.stderr}`;
  t.equal(run.status, 0, run.status === 0 ? 'configures' : said.slice(-2000));
  t.match(said, `cmseg: CUDA backend: ${nvcc} (CUDA`, 'the install says which compiler');
  t.match(said, `cuDNN from the pip wheel in ${wheel}`, 'and which cuDNN');
  t.match(said, /cmseg backends: cpu=1 onednn=0 cuda=1 cudnn=1/, 'CMake builds the CUDA backend');
  const cache = fs.readFileSync(path.join(dir, 'build', 'CMakeCache.txt'), 'utf8');
  t.match(cache, new RegExp(`^CUDNN_INCLUDE_DIR:PATH=${wheel.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}/include$`, 'm'));
  // CMSEG_CUDA=OFF: configured without it, said so.
  fs.rmSync(path.join(dir, 'build'), { recursive: true, force: true });
  const off = spawnSync(process.execPath, ['scripts/build-native.mjs', 'configure', '--CDCMSEG_WITH_ONEDNN=OFF'], { cwd: dir, env: { ...env, CMSEG_CUDA: 'off' }, encoding: 'utf8', timeout: 300_000 });
  t.equal(off.status, 0, off.stderr);
  t.match(off.stdout, 'cmseg: CUDA backend: off (CMSEG_CUDA=OFF)');
  t.match(`${off.stdout}\n${off.stderr}`, /cmseg backends: cpu=1 onednn=0 cuda=0 cudnn=0/);
  // Configured again in the same build folder without CMSEG_CUDA: CUDA is back (not the cached OFF).
  const again = spawnSync(process.execPath, ['scripts/build-native.mjs', 'configure', '--CDCMSEG_WITH_ONEDNN=OFF'], { cwd: dir, env, encoding: 'utf8', timeout: 300_000 });
  t.equal(again.status, 0, again.stderr);
  t.match(`${again.stdout}\n${again.stderr}`, /cmseg backends: cpu=1 onednn=0 cuda=1 cudnn=1/, 'AUTO after OFF builds CUDA again');
  // A junk CMSEG_CUDA stops the install before CMake runs, naming the value.
  const junk = spawnSync(process.execPath, ['scripts/build-native.mjs', 'configure'], { cwd: dir, env: { ...env, CMSEG_CUDA: 'maybe' }, encoding: 'utf8' });
  t.equal(junk.status, 1);
  t.match(junk.stderr, "cmseg: CMSEG_CUDA is 'maybe': give ON, OFF or AUTO");
});
