// scripts/install-cuda-toolchain.sh --cuda 12 finds an installed CUDA 12 toolkit (NVIDIA's
// cu12 wheels have no nvcc) and takes cuDNN from the nvidia-cudnn-cu12 wheel. CI has no CUDA
// 12 toolkit, so these cases run the script's choices on made-up toolkits (an nvcc that only
// answers --version) and a made-up Python (one that only answers which wheels it has): which
// toolkit is taken, and what the user is told when something is missing or would collide.
// Nothing here compiles; the real CUDA 12 build is described in README (Backends).
import t from 'tap';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { spawnSync } from 'child_process';

const root = path.join(__dirname, '..');
const script = path.join(root, 'scripts', 'install-cuda-toolchain.sh');

function run(args: string[], env: NodeJS.ProcessEnv) {
  const r = spawnSync('bash', [script, ...args], { encoding: 'utf8', env, timeout: 60_000 });
  return { status: r.status, out: r.stdout, err: r.stderr };
}

// A folder with NVIDIA's toolkit layout whose nvcc reports `release`.
function fakeToolkit(dir: string, release: string): string {
  for (const d of ['bin', 'nvvm/bin', 'include', 'lib64']) fs.mkdirSync(path.join(dir, d), { recursive: true });
  const exe = (f: string, body: string) => fs.writeFileSync(path.join(dir, f), `#!/bin/sh\n${body}\n`, { mode: 0o755 });
  exe('bin/nvcc', `echo "Cuda compilation tools, release ${release}, V${release}.99"`);
  exe('nvvm/bin/cicc', 'exit 1');
  fs.writeFileSync(path.join(dir, 'bin/nvcc.profile'), '');
  fs.writeFileSync(path.join(dir, 'include/cuda_runtime.h'), '');
  fs.writeFileSync(path.join(dir, 'lib64/libcudart.so.12'), '');
  return dir;
}

// A stand-in for PYTHON: `python - NAME` (the script's installed-version question) prints the
// version of NAME when it is one of `wheels`, and nothing otherwise.
function fakePython(file: string, wheels: Record<string, string>): string {
  const cases = Object.entries(wheels).map(([n, v]) => `  ${n}) echo ${v} ;;`).join('\n');
  fs.writeFileSync(file, `#!/bin/sh\ncat >/dev/null\ncase "$2" in\n${cases}\n  *) ;;\nesac\n`, { mode: 0o755 });
  return file;
}

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'cmseg-cuda12-'));
t.teardown(() => fs.rmSync(tmp, { recursive: true, force: true }));
const cuda12 = fakeToolkit(path.join(tmp, 'cuda-12.4'), '12.4');
const cuda13 = fakeToolkit(path.join(tmp, 'cuda-13.2'), '13.2');
const noWheels = fakePython(path.join(tmp, 'python-empty'), {});
const cu13Wheels = fakePython(path.join(tmp, 'python-cu13'), { 'nvidia-cudnn-cu13': '9.26.0.51' });
const prefix = path.join(tmp, 'prefix');
const base = { PATH: '/usr/bin:/bin', HOME: tmp };

t.test('--cuda takes 12 or 13, and --help says how CUDA 12 is found', async (t) => {
  const bad = run(['--cuda', '11'], base);
  t.equal(bad.status, 2);
  t.match(bad.err, /--cuda takes 12 or 13, not '11'/);
  t.equal(run(['--cuda'], base).status, 2);
  const help = run(['--help'], base);
  t.equal(help.status, 0);
  t.match(help.out, /\[--cuda 13\|12\]/);
  t.match(help.out, /CUDA12_HOME/);
  t.match(help.out, /nvidia-cuda-nvcc-cu12 holds only ptxas/);
});

t.test('CUDA12_HOME that is not CUDA 12 is refused, naming what it is', async (t) => {
  const r = run([prefix, '--cuda', '12', '--no-install'], { ...base, CUDA12_HOME: cuda13, PYTHON: noWheels });
  t.equal(r.status, 1);
  t.match(r.err, `CUDA12_HOME=${cuda13} is not a CUDA 12 toolkit`);
  t.match(r.err, /not 13\.2/);
  const missing = run([prefix, '--cuda=12', '--no-install'], { ...base, CUDA12_HOME: path.join(tmp, 'nothing'), PYTHON: noWheels });
  t.equal(missing.status, 1);
  t.match(missing.err, /is not a CUDA 12 toolkit \(bin\/nvcc of release 12\.x;/);
  t.notOk(fs.existsSync(prefix), 'no folder made');
});

t.test('a CUDA 12 toolkit is taken from CUDA_HOME or the nvcc on PATH; cuDNN must be the cu12 wheel', async (t) => {
  // The Python with nvidia-cudnn-cu13 would put a CUDA 13 cuDNN beside a CUDA 12 runtime.
  const viaHome = run([prefix, '--cuda', '12'], { ...base, CUDA_HOME: cuda12, PYTHON: cu13Wheels });
  t.match(viaHome.out, `CUDA 12.4 toolkit at ${cuda12}`);
  t.equal(viaHome.status, 1);
  t.match(viaHome.err, /has nvidia-cudnn-cu13 9\.26\.0\.51, which shares site-packages\/nvidia\/cudnn/);
  // --no-install with no cuDNN wheel at all: says to install it.
  const viaPath = run([prefix, '--cuda', '12', '--no-install'], { ...base, PATH: `${cuda12}/bin:/usr/bin:/bin`, PYTHON: noWheels });
  t.match(viaPath.out, `CUDA 12.4 toolkit at ${cuda12}`);
  t.equal(viaPath.status, 1);
  t.match(viaPath.err, /no nvidia-cudnn-cu12 in .*run without --no-install/);
  // A CUDA 13 nvcc on PATH is passed over.
  const only13 = run([prefix, '--cuda', '12', '--no-install'], { ...base, PATH: `${cuda13}/bin:/usr/bin:/bin`, PYTHON: noWheels });
  t.equal(only13.status, 1);
  t.notMatch(only13.out, /toolkit at/);
  if (!fs.existsSync('/usr/local/cuda') && !fs.readdirSync('/usr/local').some((d) => d.startsWith('cuda-12.'))) {
    t.match(only13.err, /no CUDA 12 toolkit found .*NVIDIA's cu12 wheels have no nvcc/);
  }
});

t.test('the CUDA 13 default refuses to pip-install nvidia-cudnn-cu13 over a CUDA 12 cuDNN', async (t) => {
  // PyTorch's CUDA 12 builds install nvidia-cudnn-cu12; the cu13 wheel unpacks into the same
  // folder and would break that PyTorch. Refused before pip runs, even for the runtime (the
  // fake Python has no pip: it would only answer 'installed nothing').
  const torch12 = fakePython(path.join(tmp, 'python-torch-cu12'), { 'nvidia-cudnn-cu12': '9.10.2.21' });
  const r = run([prefix], { ...base, PYTHON: torch12 });
  t.equal(r.status, 1);
  t.match(r.err, /has nvidia-cudnn-cu12 9\.10\.2\.21 \(PyTorch's CUDA 12 builds install it\), which shares site-packages\/nvidia\/cudnn with nvidia-cudnn-cu13/);
  t.match(r.err, /or --cuda 12 for a CUDA 12 driver/);
  t.notMatch(r.out, /installing|pip install/, 'nothing installed');
  t.notOk(fs.existsSync(prefix), 'no folder made');
});
