// Runs `cmseg` commands inside the test process: what they print is captured,
// the process's exit code is read and reset, and --help text is returned
// instead of exiting.
import { buildProgram, main } from '../../src/cli/main';

export interface CliRun {
  stdout: string;
  stderr: string;
  exitCode: number;
}

/**
 * Runs `cmseg ...args` with `cwd` as the working folder. `onStderr` sees every chunk
 * written to stderr (a test of Ctrl-C uses it to interrupt at a chosen moment).
 */
export async function runCli(args: string[], cwd: string, onStderr?: (chunk: string) => void): Promise<CliRun> {
  let stdout = '';
  let stderr = '';
  const write = process.stdout.write.bind(process.stdout);
  const writeErr = process.stderr.write.bind(process.stderr);
  process.stdout.write = ((chunk: string) => ((stdout += chunk), true)) as typeof process.stdout.write;
  process.stderr.write = ((chunk: string) => {
    stderr += chunk;
    onStderr?.(String(chunk));
    return true;
  }) as typeof process.stderr.write;
  const before = process.cwd();
  process.chdir(cwd);
  try {
    await main(['node', 'cmseg', ...args]);
  } finally {
    process.chdir(before);
    process.stdout.write = write;
    process.stderr.write = writeErr;
  }
  const exitCode = Number(process.exitCode ?? 0);
  process.exitCode = 0;
  return { stdout, stderr, exitCode };
}

/** What commander writes for --help or a bad option value (thrown, not exiting, here). */
export async function cliHelp(args: string[]): Promise<string> {
  let out = '';
  const program = buildProgram({ exitOverride: true, writeOut: (s) => (out += s), writeErr: (s) => (out += s) });
  try {
    await program.parseAsync(['node', 'cmseg', ...args]);
  } catch (error) {
    const code = (error as { code?: string }).code;
    if (code !== 'commander.helpDisplayed' && code !== 'commander.invalidArgument') throw error;
  }
  return out;
}
