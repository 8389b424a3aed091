// The bar a whole-volume prediction shows while its sliding windows run (cmseg predict and
// eval on 3D cases): on stderr when it is a terminal, nothing otherwise (logs keep the
// one line per case the commands print). A BraTS case on the CPU takes about a minute, 8
// times that with --tta.
import { SingleBar } from 'cli-progress';
import { barEta } from '../train/progress';
import type { VolumeScore } from '../train/evaluate';

export interface WindowProgress {
  /** slidingWindowPredict's onProgress: windows done of the case's total. */
  onProgress: (done: number, total: number) => void;
  /** Clears the bar (before the case's own line is printed). */
  stop: () => void;
}

/** `now`: the clock of the bar's ETA (tests). */
export function windowProgress(label: string, stream: NodeJS.WritableStream & { isTTY?: boolean } = process.stderr, quiet = false, now: () => number = Date.now): WindowProgress {
  if (!stream.isTTY || quiet) return { onProgress: () => {}, stop: () => {} };
  const eta = barEta(now);
  const bar = new SingleBar({
    stream: stream as NodeJS.WriteStream,
    format: `${label} [{bar}] {value}/{total} windows | ETA {eta_run}`,
    barsize: 24,
    hideCursor: true,
    clearOnComplete: true,
  });
  let started = false;
  // eval and predict leave Ctrl-C and SIGTERM to the default (the process ends at once), which
  // left the terminal's cursor hidden by the bar. While the bar runs, a signal first shows the
  // cursor again, then is raised once more: with this listener gone, it ends the process as
  // before (exit status 130 or 143 to the shell), or reaches whoever else handles it.
  const onSignal = (signal: NodeJS.Signals) => {
    stop();
    process.kill(process.pid, signal);
  };
  const stop = () => {
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
    if (started) bar.stop();
    started = false;
  };
  return {
    onProgress: (done, total) => {
      if (!started) {
        eta.start();
        bar.start(total, 0, { eta_run: eta.text(0, total) });
        started = true;
        process.once('SIGINT', onSignal);
        process.once('SIGTERM', onSignal);
      }
      bar.update(done, { eta_run: eta.text(done, total) });
    },
    stop,
  };
}

/**
 * One window bar per case on a terminal, replaced at each new case, and a line per scored case
 * (evaluateVolumes' onWindows and onVolume): eval, and train's test scores of a BraTS run
 * (hours for a release's test cases, which passed without a line).
 */
export function caseBars(options: { quiet?: boolean } = {}) {
  if (options.quiet) return { onWindows: () => {}, onVolume: () => {}, stop: () => {} };
  let bar: WindowProgress | undefined;
  const stop = () => {
    bar?.stop();
    bar = undefined;
  };
  return {
    onWindows: (id: string, done: number, total: number) => {
      bar ??= windowProgress(id);
      bar.onProgress(done, total);
    },
    // The case's line (on a terminal after its bar is cleared; in logs the only trace of it).
    onVolume: (score: VolumeScore, done: number, total: number) => {
      stop();
      process.stderr.write(`[${done}/${total}] ${score.id}: ${volumeLine(score)}\n`);
    },
    stop,
  };
}

/** One scored volume as a progress line: total Dice, and the BraTS regions' Dice and HD95 (mm). */
function volumeLine(score: VolumeScore): string {
  // Undefined figures (a reference that labels no voxel) print '-', as an undefined HD95 does.
  // A volume whose probabilities were NaN or Inf has no figures: the line says so, not '-' (no tumour).
  if (score.nonFinite) return 'not scored: the model\'s output is non-finite (NaN or Inf)';
  const figure = (x: number, digits: number) => (Number.isFinite(x) ? x.toFixed(digits) : '-');
  const line = [`total Dice ${figure(score.totalDice, 4)}`];
  if (score.regions) {
    const { wholeTumour: wt, tumourCore: tc, enhancingTumour: et } = score.regions;
    line.push(`Dice WT/TC/ET ${figure(wt, 3)}/${figure(tc, 3)}/${figure(et, 3)}`);
  }
  if (score.hd95) {
    const mm = (x: number) => figure(x, 1);
    line.push(`HD95 ${mm(score.hd95.wholeTumour)}/${mm(score.hd95.tumourCore)}/${mm(score.hd95.enhancingTumour)} mm`);
  }
  return line.join(', ');
}
