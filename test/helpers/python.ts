// Runs python3 snippets from tests, so that cmseg can be checked against the
// Python tools (nibabel, numpy) its users compare with. Tests that need a
// module ask `missingPythonModules` first and skip with its reason.

import { spawnSync } from 'child_process';

/** The interpreter; override with CMSEG_PYTHON=/path/to/python. */
export const PYTHON = process.env.CMSEG_PYTHON ?? 'python3';

export class PythonError extends Error {
  constructor(
    readonly status: number | null,
    readonly stderr: string,
  ) {
    super(`${PYTHON} exited with ${status}:\n${stderr.trim()}`);
    this.name = 'PythonError';
  }
}

/**
 * Runs `code` with `args` as sys.argv[1:] and returns its stdout.
 * Throws PythonError (with stderr) if it fails or python cannot start.
 */
export function runPython(code: string, args: readonly string[] = []): string {
  const result = spawnSync(PYTHON, ['-c', code, ...args], { encoding: 'utf8', maxBuffer: 256 * 1024 * 1024 });
  if (result.error) throw new PythonError(null, result.error.message);
  if (result.status !== 0) throw new PythonError(result.status, result.stderr);
  return result.stdout;
}

/** Runs `code`, which must print one JSON document, and parses it. */
export function runPythonJson<T>(code: string, args: readonly string[] = []): T {
  return JSON.parse(runPython(code, args)) as T;
}

const importable = new Map<string, boolean>();

/** Whether `import <module>` works in PYTHON (false when python itself is missing). */
export function pythonHasModule(module: string): boolean {
  let known = importable.get(module);
  if (known === undefined) {
    known = spawnSync(PYTHON, ['-c', `import ${module}`], { stdio: 'ignore' }).status === 0;
    importable.set(module, known);
  }
  return known;
}

/** A skip reason such as "nibabel not installed for python3", or false when all modules import. */
export function missingPythonModules(...modules: string[]): string | false {
  if (spawnSync(PYTHON, ['--version'], { stdio: 'ignore' }).status !== 0) return `${PYTHON} not found`;
  const missing = modules.filter((m) => !pythonHasModule(m));
  return missing.length === 0 ? false : `${missing.join(', ')} not installed for ${PYTHON}`;
}
