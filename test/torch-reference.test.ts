// The PyTorch reference checks itself (finite differences in float64, a NumPy
// re-implementation of the loss, the closed-form SPEC gradients) before the
// parity tests trust it.
import t from 'tap';
import * as path from 'path';
import { spawnSync } from 'child_process';
import { missingPythonModules, PYTHON } from './helpers/python';

t.test('scripts/test_torch_reference.py passes', { skip: missingPythonModules('torch', 'safetensors', 'numpy') }, async (t) => {
  const run = spawnSync(PYTHON, [path.join(__dirname, '..', 'scripts', 'test_torch_reference.py')], { encoding: 'utf8', timeout: 600_000 });
  t.equal(run.status, 0, `${run.stdout.slice(-3000)}\n${run.stderr.slice(-3000)}`);
});
