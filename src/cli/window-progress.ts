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
  return {
    onProgress: (done, total) => {
      if (!started) bar.start(total, 0), (started = true);
      bar.update(done);
    },
    stop: () => {
      if (started) bar.stop();
      started = false;
    },
  };
}
