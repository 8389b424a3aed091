// The command line's contract for scripts: numbers parsed as decimal numbers (never hex),
// an empty path (an unset shell variable) refused instead of meaning the working folder,
// and commands cmseg suggests ("next: cmseg prepare --data ...") that a shell reads back
// as printed, whatever the folder's name.
import t, { type Test } from 'tap';
import { spawnSync } from 'child_process';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { cliHelp, runCli } from './helpers/cli';
import { parseNumber, shellWord } from '../src/cli/common';

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cmseg-cli-contract-'));
t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));

/**
 * The CLI source in a child node (commander ends the process itself on a bad option value,
 * so these cannot run in this one), with the TypeScript loader tap gives this process.
 */
function cmseg(args: string[], cwd: string) {
  const loader = process.execArgv.filter((a) => a.includes('typescript'));
  const r = spawnSync(process.execPath, [...loader, path.resolve(__dirname, '../src/cli/main.ts'), ...args], {
    cwd,
    encoding: 'utf8',
    env: { ...process.env, TS_NODE_TRANSPILE_ONLY: '1', CMSEG_NUM_THREADS: '1' },
  });
  return { exitCode: r.status, stdout: r.stdout, stderr: r.stderr };
}

function oneErrorLine(t: Test, stderr: string): string {
  const lines = stderr.trimEnd().split('\n');
  t.equal(lines.length, 1, `one line: ${stderr}`);
  t.match(lines[0], /^cmseg: error: /);
  t.notMatch(stderr, /    at /, 'no stack');
  return lines[0];
}

t.test('numbers: hex, binary and octal literals are refused, decimal forms taken', async (t) => {
  const lr = parseNumber(0, false);
  // Number("0x10") is 16: `--lr 0x10` trained at learning rate 16 without a word.
  for (const bad of ['0x10', '0X1', '0b11', '0o17', '', ' ', '1e', '.', '1,5', 'Infinity', '1_000']) {
    t.throws(() => lr(bad), /expected a number > 0/, JSON.stringify(bad));
  }
  t.equal(lr('.001'), 0.001);
  t.equal(lr('1e-3'), 0.001);
  t.equal(lr('2.'), 2);
  t.equal(lr('+0.5'), 0.5);
  t.equal(parseNumber(0)('0'), 0);

  const text = await cliHelp(['train', '--preset', 'mnist-tiny', '--lr', '0x10', '--steps', '1', '--out', path.join(dir, 'hex')]);
  t.match(text, /^cmseg: error: option '--lr <x>' argument '0x10' is invalid/);
  t.notOk(fs.existsSync(path.join(dir, 'hex')), 'nothing trained');
});

t.test('an empty --out ("$OUT" unset) is refused, not taken as the working folder', async (t) => {
  const cwd = fs.mkdtempSync(path.join(dir, 'empty-out-'));
  // In a child process: the exit code and what stdout holds, as a script sees them.
  for (const args of [
    ['simulate', '--out', '', '--count', '2'],
    ['phantom', 'brats', '--cases', '1', '--size', '8,8,8', '-q', '--out', ''],
  ]) {
    const r = cmseg(args, cwd);
    t.equal(r.exitCode, 1, args[0]);
    t.equal(r.stdout, '', args[0]);
    t.match(oneErrorLine(t, r.stderr), /--out <dir>.* --out is empty/, args[0]);
  }
  // curves -o "" said "could not write : its folder does not exist" after drawing.
  for (const args of [
    ['phantom', 'brats', '--cases', '1', '--out=  '],
    ['curves', cwd, '-o', ''],
    ['curves', ''],
    // train, predict, prepare wrote into the working folder with exit 0; eval evaluated first.
    ['train', '--preset', 'mnist-tiny', '--steps', '1', '--out', ''],
    ['train', '--preset', 'images', '--data', ''],
    ['predict', '--checkpoint', 'x.safetensors', '--out', ''],
    ['prepare', '--data', 'brats', '--out', ''],
    ['prepare', '--data', '', '--out', 'cache'],
    ['eval', '--checkpoint', 'x.safetensors', '--out', ''],
    ['fuse', '-o', '', 'a.png', 'b.png'],
    ['fuse', '-o', 'c.png', '--cms', '', 'a.png', 'b.png'],
  ]) {
    t.match(await cliHelp(args), /^cmseg: error: .*(--out|<run>|--data|--cms|--checkpoint) is empty/, args.join(' '));
  }
  t.same(fs.readdirSync(cwd), [], 'nothing written in the working folder');
});

t.test("phantom's suggested command reads back as printed in a shell, for any folder name", async (t) => {
  const cwd = fs.mkdtempSync(path.join(dir, 'quote-'));
  const name = "my phantoms (it's $HOME)";
  const r = await runCli(['phantom', 'brats', '--cases', '1', '--size', '8,8,8', '-q', '--out', name], cwd);
  t.equal(r.exitCode, 0, r.stderr);
  const next = /^next: cmseg prepare --data (.*) --out <cache folder>$/m.exec(r.stdout);
  t.ok(next, r.stdout);
  // What bash makes of the printed --data word: one argument, the folder's name.
  const words = spawnSync('bash', ['-c', `printf '%s\\n' ${next![1]}`], { cwd, encoding: 'utf8' }).stdout;
  t.equal(words, `${name}\n`);
  t.ok(fs.statSync(path.resolve(cwd, words.trimEnd())).isDirectory());

  // A second run into the same folder names the earlier case folders with the same command.
  fs.mkdirSync(path.join(cwd, name, 'old-case'));
  const again = await runCli(['phantom', 'brats', '--cases', '1', '--size', '8,8,8', '-q', '--out', name], cwd);
  const note = /`cmseg prepare --data (.*)` reads them too/.exec(again.stderr);
  t.ok(note, again.stderr);
  t.equal(spawnSync('bash', ['-c', `printf '%s\\n' ${note![1]}`], { cwd, encoding: 'utf8' }).stdout, `${name}\n`);

  // Plain names stay as they are.
  t.equal(shellWord('runs/cm-1/x.png'), 'runs/cm-1/x.png');
  t.equal(shellWord("a'b"), `'a'\\''b'`);
});

t.test('bench: a measurement that failed is not exit 0 (the results still printed, --json still one object a line)', async (t) => {
  // PyTorch that cannot run: its side fails at once (the cmseg side runs, or fails, as it may).
  const before = process.env.CMSEG_PYTHON;
  process.env.CMSEG_PYTHON = '/bin/false';
  t.teardown(() => {
    if (before === undefined) delete process.env.CMSEG_PYTHON;
    else process.env.CMSEG_PYTHON = before;
  });
  const r = await runCli(['bench', '--config', 'mnist2d', '--steps', '1', '--warmup', '0', '--threads', '1', '--json'], dir);
  t.equal(r.exitCode, 1, 'was 0 with every side failed');
  const lines = r.stdout.trimEnd().split('\n');
  t.equal(lines.length, 1, 'one JSON object for the one config');
  const result = JSON.parse(lines[0]);
  t.equal(result.config, 'mnist2d');
  t.equal(result.torchEager.ok, false);
  const last = r.stderr.trimEnd().split('\n').pop()!;
  t.match(last, /^cmseg: error: \d+ measurements? not done: .*mnist2d torchEager: false exited 1/);
});
