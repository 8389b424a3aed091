// torch_reference.py's CLI on bad input, as a PyTorch user drives it: a checkpoint cut short,
// a file that is not safetensors, an output folder that is missing, no images, bad bench
// arguments. Each is one JSON line naming the problem, exit 2 (caller error), no traceback.
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { spawnSync } from 'child_process';
import t from 'tap';
import { createModel, readSafetensors, saveCheckpoint, writeSafetensors } from '../src/index';
import { missingPythonModules, PYTHON } from './helpers/python';

const SCRIPT = path.resolve(__dirname, '..', 'scripts', 'torch_reference.py');

// Each case through torch_reference.main(argv) in one Python process (one torch import, not
// one per case: that was 3 s each), with what a traceback would have been kept as stderr.
const DRIVER = `
import contextlib, io, json, sys, traceback
sys.path.insert(0, sys.argv[1])
import torch_reference
results = []
for argv in json.loads(sys.argv[2]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = torch_reference.main(argv)
        except SystemExit as e:
            status = e.code
        except BaseException:
            traceback.print_exc()
            status = 1
    results.append({"status": status, "stdout": out.getvalue(), "stderr": err.getvalue()})
print(json.dumps(results))
`;

t.test('torch_reference.py refuses unreadable files and bad bench arguments: one JSON line, exit 2, no traceback', { skip: missingPythonModules('torch', 'safetensors') }, async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cmseg-torch-cli-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const model = createModel({ ndim: 2, inChannels: 1, classes: 3, annotators: 2, depth: 2, baseChannels: 4, seed: 5 });
  const ckpt = path.join(dir, 'model.safetensors');
  await saveCheckpoint(model, ckpt);
  const images = path.join(dir, 'images.safetensors');
  await writeSafetensors(images, { images: { data: new Float32Array(64), shape: [1, 1, 8, 8] } });
  const nan = path.join(dir, 'nan.safetensors');
  await writeSafetensors(nan, { images: { data: Float32Array.from({ length: 128 }, (_, i) => (i === 64 + 9 ? NaN : 0)), shape: [2, 1, 8, 8] } });
  const none = path.join(dir, 'none.safetensors');
  await writeSafetensors(none, { images: { data: new Float32Array(0), shape: [0, 1, 8, 8] } });
  // A checkpoint cut short by a failed copy, and a file that is not safetensors at all.
  const truncated = path.join(dir, 'truncated.safetensors');
  fs.writeFileSync(truncated, fs.readFileSync(ckpt).subarray(0, 20000));
  const garbage = path.join(dir, 'garbage.safetensors');
  fs.writeFileSync(garbage, 'not a safetensors file');
  // A checkpoint with a tensor its config has no parameter for (written over by another tool).
  const extra = path.join(dir, 'extra.safetensors');
  const original = await readSafetensors(ckpt);
  await writeSafetensors(extra, { ...original.tensors, 'head.bias': { data: new Float32Array(3), shape: [3] } }, original.metadata);
  const out = path.join(dir, 'out.safetensors');
  const cases: [string[], RegExp][] = [
    [['predict', '--checkpoint', truncated, '--images', images, '--out', out], /truncated\.safetensors/],
    [['predict', '--checkpoint', ckpt, '--images', garbage, '--out', out], /garbage\.safetensors/],
    [['predict', '--checkpoint', ckpt, '--images', images, '--out', path.join(dir, 'no', 'such', 'dir', 'o.safetensors')], /no\/such\/dir/],
    [['predict', '--checkpoint', ckpt, '--images', none, '--out', out], /no image/],
    [['run', '--case', garbage, '--out', out], /garbage\.safetensors/],
    [['predict', '--checkpoint', extra, '--images', images, '--out', out], /extra\.safetensors: checkpoint has tensors that are not parameters of this config: \['head\.bias'\]/],
    // cmseg's predict refuses it too (SPEC 1); the reference wrote NaN maps with "ok": true.
    [['predict', '--checkpoint', ckpt, '--images', nan, '--out', out], /NaN at index 73 \(image 1, channel 0\)/],
    [['bench', '--config', 'mnist2d', '--steps', '1', '--threads', '-1'], /--threads -1/],
    [['bench', '--config', 'mnist2d', '--steps', '1', '--warmup', '0', '--shape', '1,1,30,30'], /not divisible/],
  ];
  // Where torch sees no GPU (this test's usual machine), --device cuda is refused by name.
  if (spawnSync(PYTHON, ['-c', 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)']).status === 1) {
    cases.push([['bench', '--config', 'brats3d-gpu-predict', '--device', 'cuda', '--steps', '1'], /--device cuda: torch .* sees no usable CUDA device/]);
    cases.push([['predict', '--checkpoint', ckpt, '--images', images, '--out', out, '--device', 'cuda'], /--device cuda: torch .* sees no usable CUDA device/]);
  }
  const runs: { status: number | null; stdout: string; stderr: string }[] = JSON.parse(
    spawnSync(PYTHON, ['-c', DRIVER, path.dirname(SCRIPT), JSON.stringify(cases.map(([args]) => args))], { encoding: 'utf8', timeout: 300_000 }).stdout,
  );
  // And one as its own process: main's status is the exit status.
  const alone = spawnSync(PYTHON, [SCRIPT, ...cases[0][0]], { encoding: 'utf8', timeout: 120_000 });
  t.equal(alone.status, 2, alone.stderr.slice(-300));
  t.same(JSON.parse(alone.stdout.trim()), JSON.parse(runs[0].stdout.trim()));
  for (const [k, [args, why]] of cases.entries()) {
    const run = runs[k];
    const label = args.join(' ').replaceAll(dir, '$DIR');
    t.equal(run.status, 2, `${label}: exit 2 (${run.stderr.slice(-300)})`);
    t.notMatch(run.stderr, /Traceback/, `${label}: no traceback`);
    const lines = run.stdout.trim().split('\n');
    let report: { ok?: boolean; error?: string } = {};
    try {
      report = JSON.parse(lines[lines.length - 1]);
    } catch {
      t.fail(`${label}: stdout's last line is not JSON: ${run.stdout.slice(-300)}`);
    }
    t.equal(report.ok, false, label);
    t.match(report.error, why, `${label}: ${report.error}`);
  }
  t.notOk(fs.existsSync(out), 'no output written');
});

