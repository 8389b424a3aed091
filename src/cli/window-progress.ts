// The bar a whole-volume prediction shows while its sliding windows run (cmseg predict and
// eval on 3D cases): on stderr when it is a terminal, nothing otherwise (logs keep the
// one line per case the commands print). A BraTS case on the CPU takes about a minute, 8
// times that with --tta.
import { SingleBar } from 'cli-progress';

export interface WindowProgress {
  /** slidingWindowPredict's onProgress: windows done of the case's total. */
  onProgress: (done: number, total: number) => void;
  /** Clears the bar (before the case's own line is printed). */
  stop: () => void;
}

export function windowProgress(label: string, stream: NodeJS.WritableStream & { isTTY?: boolean } = process.stderr): WindowProgress {
  if (!stream.isTTY) return { onProgress: () => {}, stop: () => {} };
  const bar = new SingleBar({
    stream: stream as NodeJS.WriteStream,
    format: `${label} [{bar}] {value}/{total} windows | {eta_formatted}`,
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
        bar.start(total, 0);
        started = true;
        process.once('SIGINT', onSignal);
        process.once('SIGTERM', onSignal);
      }
      bar.update(done);
    },
    stop,
  };
}
