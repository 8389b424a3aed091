// README.md is what a user types from: this keeps it honest, mechanically.
//  - Every TypeScript block type-checks against the public API (src/index.ts, as 'cmseg'),
//    compiled as a CommonJS project like cmseg itself (a top-level await fails there, as it
//    does under ts-node and tsx in such a project), and the two examples run as written.
//  - The API section's names exist: every call of its table (a model method or an export),
//    the option and result fields it lists, the exported pieces, error classes and types.
//  - Every `--flag` README gives a command exists in that command's --help, with the values
//    README gives it among its choices; every other `--flag` exists in some command; the
//    lists of methods, presets and fusion methods match the commands' choices.
//  - The `npm run` scripts, repository files and CMSEG_* names README mentions exist, and a
//    training run writes the files README says it writes.
import t from 'tap';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { spawnSync } from 'child_process';
import ts from 'typescript';
import { cliHelp, runCli } from './helpers/cli';

const root = path.resolve(__dirname, '..');
const readme = fs.readFileSync(path.join(root, 'README.md'), 'utf8');
const lines = readme.split('\n');
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cmseg-readme-'));
t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));

// ---------------------------------------------------------------- README's parts

interface Block { lang: string; body: string; line: number } // line: 1-based, of the first body line
function fencedBlocks(): Block[] {
  const blocks: Block[] = [];
  let open: Block | undefined;
  lines.forEach((l, i) => {
    const fence = /^```(\w*)\s*$/.exec(l);
    if (!fence) {
      if (open) open.body += l + '\n';
      return;
    }
    if (open) (blocks.push(open), (open = undefined));
    else open = { lang: fence[1], body: '', line: i + 2 };
  });
  return blocks;
}
const blocks = fencedBlocks();
const tsBlocks = blocks.filter((b) => b.lang === 'ts' || b.lang === 'typescript');

/** README's prose (code blocks blanked, so line numbers stay), for inline `code` spans. */
const prose = (() => {
  const out = [...lines];
  for (const b of blocks) {
    const n = b.body.split('\n').length - 1;
    for (let i = 0; i < n; i++) out[b.line - 1 + i] = '';
  }
  return out;
})();

/** Inline code spans of the prose, with their line (a span never crosses a line here). */
function codeSpans(): { text: string; line: number }[] {
  const spans: { text: string; line: number }[] = [];
  prose.forEach((l, i) => {
    for (const m of l.matchAll(/`([^`]+)`/g)) spans.push({ text: m[1], line: i + 1 });
  });
  return spans;
}

/** The lines of a section (## or ### heading) up to the next heading of any level. */
function section(heading: string): { text: string; line: number } {
  const start = lines.findIndex((l) => /^#{2,3} /.test(l) && l.replace(/^#+ /, '') === heading);
  if (start < 0) throw new Error(`README has no section '${heading}'`);
  let end = start + 1;
  while (end < lines.length && !/^#{2,3} /.test(lines[end])) end++;
  return { text: prose.slice(start + 1, end).join('\n'), line: start + 2 };
}

// ---------------------------------------------------------------- the commands' help

const helpCache = new Map<string, string>();
async function help(command: string): Promise<string> {
  if (!helpCache.has(command)) helpCache.set(command, await cliHelp([...command.split(' '), '--help']));
  return helpCache.get(command)!;
}

/** Each option of a command's help: its long flag and its choices (when it has them). */
async function options(command: string): Promise<Map<string, string[] | undefined>> {
  const text = await help(command);
  const body = text.split(/^Options:\n/m)[1]?.split(/\n\n/)[0] ?? '';
  const result = new Map<string, string[] | undefined>();
  // One option: a line starting with '  -x, --flag' or '  --flag', and its wrapped description.
  for (const entry of body.split(/\n(?=\s{2}-)/)) {
    const flag = /^\s*(?:-\w, )?(--[\w-]+)/.exec(entry)?.[1];
    if (!flag) continue;
    const choices = /choices: ((?:"[^"]*",?\s*)+)/.exec(entry.replace(/\s+/g, ' '))?.[1];
    result.set(flag, choices ? [...choices.matchAll(/"([^"]*)"/g)].map((m) => m[1]) : undefined);
  }
  return result;
}

const COMMANDS = ['prepare', 'train', 'eval', 'predict', 'curves', 'simulate', 'fuse', 'phantom', 'info', 'bench'];
/** The command a `cmseg ...` line or span runs ('phantom brats' for the subcommand). */
function commandOf(words: string[]): string | undefined {
  if (!COMMANDS.includes(words[0])) return undefined;
  return words[0] === 'phantom' && words[1] && !words[1].startsWith('-') ? `phantom ${words[1]}` : words[0];
}

// ---------------------------------------------------------------- TypeScript

/** Type-checks files against src/index.ts as 'cmseg', compiled as a CommonJS project. */
function typeCheck(files: string[]): { file: string; line: number; message: string }[] {
  const program = ts.createProgram(files, {
    strict: true, noEmit: true, target: ts.ScriptTarget.ES2022, module: ts.ModuleKind.CommonJS,
    moduleResolution: ts.ModuleResolutionKind.Node10, baseUrl: root, paths: { cmseg: ['src/index.ts'] },
    types: ['node'], typeRoots: [path.join(root, 'node_modules', '@types')], skipLibCheck: true, esModuleInterop: true,
  });
  return ts.getPreEmitDiagnostics(program).map((d) => ({
    file: d.file?.fileName ?? '',
    line: d.file && d.start !== undefined ? d.file.getLineAndCharacterOfPosition(d.start).line : -1,
    message: ts.flattenDiagnosticMessageText(d.messageText, '\n'),
  }));
}

/** What README's API section says exists, as TypeScript that compiles only if it does. */
function apiClaims(): { source: string; readmeLines: number[] } {
  const out = [`import * as cmseg from 'cmseg';`, 'declare const model: cmseg.Model;'];
  const at = [0, 0];
  const emit = (code: string, line: number) => (out.push(code), at.push(line));
  const api = section('API');
  let v = 0;
  // The table: `model.x(...)` and bare `f(...)` calls in the first column; `{a, b}` arguments
  // are option objects whose fields must exist; `{...}` in the second column are the fields
  // of what the call returns (or, after "`name` is", of that argument).
  api.text.split('\n').forEach((row, i) => {
    const line = api.line + i;
    const cells = row.split(/(?<!\\)\|/).map((c) => c.trim());
    if (!/^\| `/.test(row) || cells.length < 4) return;
    const [call, what] = [cells[1], cells[2]];
    const onModel = call.includes('model.');
    const calls = [...call.matchAll(/(?:model\.)?(\w+)\(([^)]*)\)?/g)];
    const target = (name: string) => (onModel ? `cmseg.Model['${name}']` : `typeof cmseg.${name}`);
    for (const [, name] of calls) emit(onModel ? `model.${name};` : `cmseg.${name};`, line);
    const [, first, args = ''] = calls[0] ?? [];
    if (!first) return;
    const argNames: string[] = [];
    args.split(/,(?![^{]*\})/).forEach((arg, k) => {
      arg = arg.trim();
      argNames.push(arg.replace(/[^\w].*$/, ''));
      const fields = /^\{([^}]*)\}$/.exec(arg)?.[1];
      if (!fields) return;
      emit(`declare const v${v}: NonNullable<Parameters<${target(first)}>[${k}]>;`, line);
      for (const f of fields.split(',').map((s) => s.trim()).filter((s) => /^\w+$/.test(s))) emit(`v${v}.${f};`, line);
      v++;
    });
    for (const m of what.matchAll(/(?:`(\w+)` is )?`\{([^}]*)\}`/g)) {
      const k = m[1] ? argNames.indexOf(m[1]) : -1;
      const type = m[1] ? `Parameters<${target(first)}>[${k}]` : `Awaited<ReturnType<${target(first)}>>`;
      // `{device: 'cuda', inUseMB}`: the member of a union that the quoted value picks.
      const tag = /(\w+): ('[^']*')/.exec(m[2]);
      emit(`declare const v${v}: ${tag ? `Extract<NonNullable<${type}>, { ${tag[1]}: ${tag[2]} }>` : `NonNullable<${type}>`};`, line);
      for (const f of m[2].split(',').map((s) => s.trim().replace(/[:\[].*$/, '')).filter((s) => /^\w+$/.test(s))) emit(`v${v}.${f};`, line);
      v++;
    }
  });
  // The model's getters; in the API sections' prose, calls (a model method or an export),
  // error classes and types ("`PngImage`s").
  emit('declare function member(name: keyof typeof cmseg | keyof cmseg.Model): void;', api.line);
  const apiEnd = lines.findIndex((l) => l === '## The model');
  prose.forEach((l, i) => {
    const line = i + 1;
    const getters = /((?:`\w+`(?:, | and )?)+) getters/.exec(l)?.[1];
    if (getters) for (const m of getters.matchAll(/`(\w+)`/g)) emit(`model.${m[1]};`, line);
    if (line < api.line || line > apiEnd || l.startsWith('|')) return;
    for (const m of l.matchAll(/`([^`]+)`(s?)/g)) {
      const span = m[1];
      if (!/^(torch|safetensors|load_checkpoint)/.test(span)) {
        for (const c of span.matchAll(/(?<![.\w])([a-z]\w+)\(/g)) emit(`member('${c[1]}');`, line);
      }
      if (/^[A-Z]\w*Error$/.test(span) && !(span in globalThis)) emit(`{ const e: Error = cmseg.${span}.prototype; }`, line);
      else if (/^[A-Z]\w*$/.test(span) && m[2] && !(span in globalThis)) emit(`type T${v++} = cmseg.${span};`, line);
    }
  });
  // "The pieces are exported one by one as well: `readNifti` / `writeNifti`, ...": bare names
  // too (what parentheses add is left out: option names, `undefined`).
  const pieces = readme.indexOf('The pieces are exported one by one');
  if (pieces < 0) throw new Error('README no longer lists the exported pieces');
  let piecesText = readme.slice(pieces, readme.indexOf('\n\n', pieces));
  while (/\([^()]*\)/.test(piecesText)) piecesText = piecesText.replace(/\([^()]*\)/g, '');
  const piecesLine = readme.slice(0, pieces).split('\n').length;
  for (const m of piecesText.matchAll(/`([a-z]\w+)`/g)) emit(`cmseg.${m[1]};`, piecesLine);
  return { source: out.join('\n') + '\n', readmeLines: at };
}

t.test('every TypeScript block and API name of README type-checks against src/index.ts', async (t) => {
  t.ok(tsBlocks.length >= 2, 'README has its two TypeScript examples');
  t.ok(tsBlocks[0].body.split('\n').filter((l) => l.trim()).length <= 22, 'the first is about 20 lines');
  const files = tsBlocks.map((b, i) => {
    const file = path.join(dir, `block${i}.ts`);
    fs.writeFileSync(file, b.body);
    return file;
  });
  const claims = apiClaims();
  const claimsFile = path.join(dir, 'api-claims.ts');
  fs.writeFileSync(claimsFile, claims.source);
  t.ok(claims.readmeLines.length > 80, `the API section's names were found (${claims.readmeLines.length} checks)`);
  const where = (d: { file: string; line: number }) =>
    d.file === claimsFile
      ? `README.md:${claims.readmeLines[d.line]} (checked as: ${claims.source.split('\n')[d.line]})`
      : `README.md:${tsBlocks[files.indexOf(d.file)].line + d.line}`;
  t.same(typeCheck([...files, claimsFile]).map((d) => `${where(d)}: ${d.message}`), [], 'no type errors');
});

t.test('the parameter names README quotes are the model\'s', async (t) => {
  // "by SPEC name (`enc.0.conv1.weight`, `cm.2.bias`, ...)", "`cmblock.{r}.{b}.conv1.weight`"
  const quoted = new Set([...readme.matchAll(/`((?:enc|dec|bottleneck|up|seg|cm|cmblock)\.[\w.{}]+\.(?:weight|bias))`/g)].map((m) => m[1]));
  t.ok(quoted.size >= 3, `README quotes parameter names (${[...quoted].join(', ')})`);
  const { createModel } = await import('../src/index');
  const model = createModel({ ndim: 2, inChannels: 1, classes: 2, annotators: 3, depth: 2, baseChannels: 4, cmHeadBlocks: 1 });
  const names = Object.keys(model.getWeights());
  for (const q of quoted) t.ok(names.includes(q.replace(/\{\w\}/g, '0')), q);
  await model.dispose();
});

// ---------------------------------------------------------------- the examples run

/** A README block run as a TypeScript file in a child node, 'cmseg' read from the sources. */
function runBlock(block: Block, cwd: string) {
  const file = path.join(cwd, 'example.ts');
  fs.writeFileSync(file, block.body.replace(/from 'cmseg'/, `from ${JSON.stringify(path.join(root, 'src/index.ts'))}`));
  const loader = process.execArgv.filter((a) => a.includes('typescript'));
  return spawnSync(process.execPath, [...loader, file], {
    cwd, encoding: 'utf8', timeout: 120_000,
    env: { ...process.env, TS_NODE_TRANSPILE_ONLY: '1', CMSEG_NUM_THREADS: '2' },
  });
}

t.test('the first example (createModel, trainStep, predict) runs as written', async (t) => {
  const cwd = fs.mkdtempSync(path.join(dir, 'first-'));
  const run = runBlock(tsBlocks[0], cwd);
  t.equal(run.status, 0, run.stderr);
  const steps = run.stdout.split('\n').filter((l) => l.startsWith('step '));
  t.equal(steps.length, 5, run.stdout);
  for (const l of steps) t.match(l, /loss \d+\.\d{4}/);
  // 4 images of 32x32, 2 classes, 3 annotators: p is [4, 2, 32, 32], the CMs [4, 3, 2, 2, 32, 32].
  t.match(run.stdout, /consensus probabilities: 8192 values; annotator CMs: 49152 values/);
});

t.test('the API training example (train, loadExperimentData) runs as written', async (t) => {
  const block = tsBlocks.find((b) => /\btrain\(/.test(b.body));
  t.ok(block, 'README has the train() example');
  const cwd = fs.mkdtempSync(path.join(dir, 'api-'));
  const run = runBlock(block!, cwd);
  t.equal(run.status, 0, run.stderr);
  t.match(run.stdout, /^completed: test Dice 0\.\d{3}, CM error 0\.\d{3}$/m, run.stdout);
  for (const f of ['best.safetensors', 'last.safetensors', 'train-log.jsonl']) t.ok(fs.existsSync(path.join(cwd, 'runs/api', f)), `runs/api/${f}`);
});

// ---------------------------------------------------------------- the command line

// Flags of other programs that README quotes (cmake, ctest, cmake-js, torch_reference.py, docker).
const OTHER_PROGRAMS = /^(?:npx cmake-js|cmake|ctest|LSAN_OPTIONS|LD_PRELOAD|CMSEG_ADDON|\s*CMSEG_ADDON|python3?|torch_reference\.py|scripts\/)/;
const NOT_CMSEG_FLAGS = new Set(['--memory']); // "a container's `--memory`" (docker run)

interface FlagUse { command?: string; flag: string; values: string[]; line: number; text: string }

/** Every `--flag` README uses, with the command it belongs to when README says which. */
function flagUses(): FlagUse[] {
  const uses: FlagUse[] = [];
  const take = (text: string, line: number, command: string | undefined) => {
    for (const m of text.matchAll(/(?<![\w-])(--[a-z][\w-]*)(?:[ =]([\w.,|-]+))?/g)) {
      // Values such as `identity|uniform` (not placeholders such as NAME, N or <dir>).
      const values = m[2] && /^[a-z0-9]/.test(m[2]) ? m[2].split('|') : [];
      uses.push({ command, flag: m[1], values, line, text });
    }
  };
  // Shell blocks: a line's `cmseg <command>` owns the flags after it; other programs' lines are skipped.
  for (const b of blocks.filter((b) => b.lang === 'sh')) {
    b.body.split('\n').forEach((l, i) => {
      const code = l.replace(/\s+#.*$/, '');
      const cmseg = /(?:^|\s)cmseg\s+(.*)$/.exec(code);
      if (cmseg) return take(cmseg[1], b.line + i, commandOf(cmseg[1].split(/\s+/)) ?? '?');
      if (/^\s*npm /.test(code) || OTHER_PROGRAMS.test(code)) return;
      take(code, b.line + i, undefined);
    });
  }
  // Inline spans: `cmseg train --bf16`, `predict --no-cms`; other spans' flags belong to no one command.
  for (const { text, line } of codeSpans()) {
    if (OTHER_PROGRAMS.test(text)) continue;
    const words = text.replace(/^(npx )?cmseg /, '').split(/\s+/);
    const command = commandOf(words);
    if (command && words.slice(1).some((w) => /^\[?--/.test(w))) take(words.slice(1).join(' '), line, command);
    else if (/^(npx )?cmseg /.test(text)) take(text, line, '?');
    else take(text, line, undefined);
  }
  // Prose: "`--geometry-tolerance <mm>` of `prepare`, `train`, `predict` and `eval`", and
  // "`train`, `eval`, `predict` and `info` take `--threads N`".
  prose.forEach((l, i) => {
    const claims = [
      ...[...l.matchAll(/`(--[\w-]+)[^`]*` of ((?:`\w+`(?:,? and |, )?)+)/g)].map((m) => ({ text: m[0], flag: m[1], commands: m[2] })),
      ...[...l.matchAll(/((?:`\w+`(?:,? and |, ))*`\w+`) takes? `(--[\w-]+)[^`]*`/g)].map((m) => ({ text: m[0], flag: m[2], commands: m[1] })),
    ];
    for (const m of claims) {
      for (const c of m.commands.matchAll(/`(\w+)`/g)) uses.push({ command: c[1], flag: m.flag, values: [], line: i + 1, text: m.text });
    }
  });
  return uses;
}

t.test('every --flag README gives a command is in its --help, with the values README gives it', async (t) => {
  const uses = flagUses();
  t.ok(uses.filter((u) => u.command).length > 40, `README's command lines were found (${uses.length} flags)`);
  const all = new Map<string, Map<string, string[] | undefined>>();
  for (const c of [...COMMANDS.filter((c) => c !== 'phantom'), 'phantom brats']) all.set(c, await options(c));
  const problems: string[] = [];
  for (const u of uses) {
    if (u.flag === '--help' || NOT_CMSEG_FLAGS.has(u.flag)) continue;
    const where = `README.md:${u.line} (${u.text.trim()})`;
    if (u.command === '?') {
      problems.push(`${where}: 'cmseg' runs no command of that name`);
      continue;
    }
    const owners = u.command ? [u.command] : [...all.keys()].filter((c) => all.get(c)!.has(u.flag));
    const commandOptions = u.command ? all.get(u.command) : undefined;
    if (u.command && !commandOptions) problems.push(`${where}: no command '${u.command}'`);
    else if (u.command ? !commandOptions!.has(u.flag) : owners.length === 0) {
      problems.push(`${where}: ${u.flag} is not an option of ${u.command ? `cmseg ${u.command}` : 'any command'}`);
      continue;
    }
    // Values such as `--cm-init identity|uniform` or `--method multi-staple`: among the choices.
    for (const owner of owners) {
      const choices = all.get(owner)!.get(u.flag);
      if (!choices) continue;
      for (const value of u.values) if (!choices.includes(value)) problems.push(`${where}: ${u.flag} ${value}: cmseg ${owner} takes ${choices.join(', ')}`);
    }
  }
  t.same(problems, [], 'every flag exists where README uses it');
});

t.test("README's lists of methods, presets and fusion methods are the commands' choices", async (t) => {
  const train = await options('train');
  const fuse = await options('fuse');
  const ticked = (text: string) => [...text.matchAll(/`([\w-]+)`/g)].map((m) => m[1]);
  // "Training methods (`--method`, SPEC section 4): `cm` (...), ... and `oracle` (...); every method"
  const methods = /Training methods \(`--method`[^)]*\):([\s\S]*?)every method/.exec(readme)?.[1] ?? '';
  t.same(ticked(methods).sort(), [...train.get('--method')!].sort(), 'the training methods');
  // "`train --help` lists what each preset sets (`mnist`, the default, ..., `brats3d-gpu`)"
  const presets = (/lists what each preset sets \(([\s\S]*?)\)\s/.exec(readme)?.[1] ?? '').replace(/SPEC `[\w-]+`/g, '');
  t.same(ticked(presets).sort(), [...train.get('--preset')!].sort(), 'the presets');
  const fusion = section('Label fusion baselines').text.split('\n\n')[0];
  for (const m of fuse.get('--method')!) t.ok(ticked(fusion).includes(m), `fusion method ${m} is described`);
  const methodRe = /`(mean|mode|staple|multi-staple|spatial-staple|[\w-]*staple[\w-]*)` \(/g;
  for (const m of fusion.matchAll(methodRe)) t.ok(fuse.get('--method')!.includes(m[1]), `cmseg fuse --method ${m[1]} exists`);
});

t.test('every command has --help with an example, as README says', async (t) => {
  t.match(readme, /Every command has `--help` with an example/);
  for (const c of COMMANDS) t.match(await help(c), /^Examples?:\n\s+\$ cmseg /m, `cmseg ${c} --help`);
});

// ---------------------------------------------------------------- names and files

t.test("the npm scripts, files and CMSEG_* names README mentions exist", async (t) => {
  const scripts = (JSON.parse(fs.readFileSync(path.join(root, 'package.json'), 'utf8')) as { scripts: Record<string, string> }).scripts;
  for (const m of new Set([...readme.matchAll(/npm run ([\w:-]+)/g)].map((m) => m[1]))) t.ok(scripts[m], `npm run ${m}`);
  const files = new Set([...readme.matchAll(/`((?:scripts|test|src|native|bindings|results)\/[^`\s*]+)`/g)].map((m) => m[1]));
  t.ok(files.size > 10, 'README names repository files');
  for (const f of files) t.ok(fs.existsSync(path.join(root, f)), f);
  // The Layout block: each line's first column, a folder or file of the repository.
  const layoutAt = lines.indexOf('## Layout');
  const layout = blocks.find((b) => b.line > layoutAt);
  const entries = (layout?.body ?? '').split('\n').map((l) => /^(\S+\/)\s/.exec(l)?.[1]).filter((e): e is string => !!e);
  t.ok(entries.length >= 10, 'the Layout block lists folders');
  for (const e of entries) t.ok(fs.existsSync(path.join(root, e)), `Layout: ${e}`);
  // Error codes and environment variables: each must be read or set somewhere in the sources.
  const sources: string[] = [];
  const walk = (d: string) => {
    for (const e of fs.readdirSync(d, { withFileTypes: true })) {
      const p = path.join(d, e.name);
      if (e.isDirectory()) walk(p);
      else if (/\.(ts|mjs|js|cc|cpp|h|hpp|cu|cuh|sh|py|txt)$/.test(e.name)) sources.push(fs.readFileSync(p, 'utf8'));
    }
  };
  for (const d of ['src', 'bindings', 'native', 'scripts']) walk(path.join(root, d));
  sources.push(fs.readFileSync(path.join(root, 'CMakeLists.txt'), 'utf8'));
  const all = sources.join('\n');
  for (const name of new Set([...readme.matchAll(/\b(CMSEG_[A-Z0-9_]+)/g)].map((m) => m[1]))) t.ok(all.includes(name), name);
});

t.test('a training run writes the files README names, and eval its default metrics file', async (t) => {
  // "Training writes `best.safetensors`, `last.safetensors`, `train-log.jsonl` (...) and the
  // test metrics `eval-test.json`"; "`runs/cm/curves.png` ... (train draws it too)".
  const training = section('Training').text.replace(/\n/g, ' ');
  const written = /Training writes (.*?)\(and `<out>\/cache`/.exec(training)?.[1] ?? '';
  const names = [...written.matchAll(/`([\w.-]+\.(?:safetensors|jsonl|json))`/g)].map((m) => m[1]);
  t.same(names.sort(), ['best.safetensors', 'eval-test.json', 'last.safetensors', 'train-log.jsonl'], 'README lists them');
  t.match(readme, /runs\/cm\/curves\.png[^\n]*train draws it too/);
  const cwd = fs.mkdtempSync(path.join(dir, 'cli-'));
  const trained = await runCli(['train', '--preset', 'mnist-tiny', '--out', 'run', '--threads', '2', '-q'], cwd);
  t.equal(trained.exitCode, 0, trained.stderr);
  for (const f of [...names, 'curves.png']) t.ok(fs.existsSync(path.join(cwd, 'run', f)), `run/${f}`);
  // "--out <file> ... (default: eval-<split>-<checkpoint>.json ...)" as README's Predicting section says.
  t.match(readme, /`eval-<split>-<checkpoint>\.json`/);
  const evaluated = await runCli(['eval', '--checkpoint', 'run/best.safetensors', '--threads', '2'], cwd);
  t.equal(evaluated.exitCode, 0, evaluated.stderr);
  t.ok(fs.existsSync(path.join(cwd, 'run', 'eval-test-best.json')), 'run/eval-test-best.json');
});
