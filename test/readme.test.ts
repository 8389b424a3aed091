// The README's TypeScript example must type-check against the public API and
// run as written: this extracts the first ```ts block and executes it.
import t from 'tap';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { spawnSync } from 'child_process';
import ts from 'typescript';

const root = path.resolve(__dirname, '..');

t.test('README example type-checks and runs', async (t) => {
  const readme = fs.readFileSync(path.join(root, 'README.md'), 'utf8');
  const match = readme.match(/```ts\n([\s\S]*?)```/);
  t.ok(match, 'README has a ```ts block');
  const source = match![1];
  t.ok(source.split('\n').filter((l) => l.trim()).length <= 22, 'about 20 lines');

  // Type-check with 'cmseg' resolved to this package's sources.
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cmseg-readme-'));
  const file = path.join(dir, 'train.ts');
  fs.writeFileSync(file, source);
  const program = ts.createProgram([file], {
    strict: true, noEmit: true, target: ts.ScriptTarget.ES2022, module: ts.ModuleKind.CommonJS,
    moduleResolution: ts.ModuleResolutionKind.Node10, baseUrl: root, paths: { cmseg: ['src/index.ts'] },
    types: ['node'], typeRoots: [path.join(root, 'node_modules', '@types')], skipLibCheck: true,
  });
  const diagnostics = ts.getPreEmitDiagnostics(program).map((d) => ts.flattenDiagnosticMessageText(d.messageText, '\n'));
  t.same(diagnostics, [], 'no type errors');

  // Run it against the built package (dist/ and the addon), as a user would.
  const js = ts.transpileModule(source, { compilerOptions: { module: ts.ModuleKind.CommonJS, target: ts.ScriptTarget.ES2022 } }).outputText;
  const jsFile = path.join(dir, 'train.js');
  fs.writeFileSync(jsFile, js.replace(/require\("cmseg"\)/, `require(${JSON.stringify(root)})`));
  const run = spawnSync(process.execPath, [jsFile], { encoding: 'utf8', timeout: 120_000 });
  t.equal(run.status, 0, run.stderr);
  const steps = run.stdout.split('\n').filter((l) => l.startsWith('step '));
  t.equal(steps.length, 5, run.stdout);
  for (const l of steps) t.match(l, /loss \d+\.\d{4}/);
  t.match(run.stdout, /annotator CMs: \d+ values/);
  fs.rmSync(dir, { recursive: true, force: true });
});
