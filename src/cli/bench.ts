// `cmseg bench`: the side-by-side benchmark of SPEC section 8.
import { Command } from 'commander';
import { formatBenchTable, formatMachine, runBench, type BenchResult } from '../bench/run';
import { BENCH_CONFIGS } from '../bench/configs';
import { choiceOption, parseInteger, parseThreads } from './common';

export function benchCommand(): Command {
  return new Command('bench')
    .description('time training steps and predictions of cmseg and the PyTorch reference side by side (SPEC section 8 configs)')
    // Checked while parsing, before the minutes the machine probe and the runs take.
    .addOption(choiceOption('--config <name...>', 'configs to run; default: the CPU ones, and the GPU ones when a GPU is usable', BENCH_CONFIGS.map((b) => b.name)))
    .option('--steps <n>', 'timed steps per side (median reported)', parseInteger(1), 5)
    .option('--warmup <n>', 'untimed warm-up steps', parseInteger(0), 1)
    .option('--threads <n>', 'threads for both sides (default: what cmseg would use: CMSEG_NUM_THREADS, else every usable CPU)', parseThreads)
    .option('--compile', 'also time PyTorch with torch.compile (slow to compile)')
    .option('--rounds <n>', 'rounds of cmseg and PyTorch eager back to back; the ratio is the median over rounds', parseInteger(1), 1)
    .option('--json', 'print one JSON object per configuration instead of a table')
    .addHelpText('after', '\nExample:\n  $ cmseg bench --config brats3d-cpu --steps 5\n  $ npm run bench')
    .action((opts) => {
      if (Number(opts.steps) < 5 || Number(opts.warmup) < 1) {
        // Allowed for quick looks; said so that such numbers are not reported as the protocol's.
        process.stderr.write('note: SPEC section 8 reports the median of at least 5 steps after 1 warm-up step; these numbers do not follow it\n');
      }
      const results = runBench({
        configs: opts.config,
        steps: Number(opts.steps),
        warmup: Number(opts.warmup),
        threads: opts.threads ? Number(opts.threads) : undefined,
        compile: !!opts.compile,
        rounds: opts.rounds,
        log: opts.json ? undefined : (line) => process.stderr.write(line + '\n'),
      });
      if (opts.json) for (const r of results) console.log(JSON.stringify(r));
      else console.log(`\n${formatMachine(results)}\n\n${formatBenchTable(results)}`);
      // A measurement that failed (or a config asked for by name and skipped) was not done:
      // the results are still printed, but the exit status says so, as for every command.
      // It was 0 with every side "failed", so `cmseg bench --json > x && publish x` went on.
      const missing = notMeasured(results, opts.config !== undefined);
      if (missing.length > 0) {
        process.stderr.write(`cmseg: error: ${missing.length} measurement${missing.length === 1 ? '' : 's'} not done: ${missing.join('; ')}\n`);
        process.exitCode = 1;
      }
    });
}

/** "config side: why" for each side that failed, and each named config that was skipped. */
function notMeasured(results: readonly BenchResult[], named: boolean): string[] {
  const sides = ['cmseg', 'torchEager', 'torchCompile', 'cmsegBf16', 'torchBf16'] as const;
  const missing: string[] = [];
  for (const r of results) {
    if (r.skipped !== undefined) {
      if (named) missing.push(`${r.config}: skipped, ${r.skipped}`);
      continue;
    }
    for (const side of sides) {
      const result = r[side];
      if (result && !result.ok) missing.push(`${r.config} ${side}: ${(result.error ?? 'failed').replace(/\s+/g, ' ').trim()}`);
    }
  }
  return missing;
}
