// How a training run reports itself while it runs. On a terminal: one cli-progress bar
// on stderr with the step, loss, CE, trace and the last validation Dice. Not on a
// terminal (logs, CI, pipes): one plain line per epoch. `quiet`: nothing. The full record
// is always the JSON-lines log next to the checkpoints (trainer.ts).

import { SingleBar } from 'cli-progress';

export interface ProgressFields {
  epoch: number;
  epochs: number;
  loss: number;
  ce: number;
  trace: number;
  lr: number;
  /** Last validation score, NaN before the first validation. */
  valDice: number;
}

export interface ProgressReporter {
  start(totalSteps: number, step: number, fields: ProgressFields): void;
  step(step: number, fields: ProgressFields): void;
  /** End of an epoch (after validation, if any). */
  epoch(step: number, fields: ProgressFields, seconds: number): void;
  stop(): void;
}

export const silentProgress: ProgressReporter = { start() {}, step() {}, epoch() {}, stop() {} };

function fmt(x: number, digits = 4): string {
  return Number.isFinite(x) ? x.toFixed(digits) : '-';
}

function payload(f: ProgressFields): Record<string, string> {
  return {
    ep: `${f.epoch + 1}/${f.epochs}`,
    loss: fmt(f.loss),
    ce: fmt(f.ce),
    trace: fmt(f.trace, 3),
    dice: fmt(f.valDice),
  };
}

class BarProgress implements ProgressReporter {
  private readonly bar: SingleBar;

  constructor(stream: NodeJS.WriteStream) {
    this.bar = new SingleBar({
      stream,
      format: 'epoch {ep} [{bar}] step {value}/{total} | loss {loss} | CE {ce} | trace {trace} | val Dice {dice} | {eta_formatted}',
      barsize: 24,
      hideCursor: true,
      etaBuffer: 50,
    });
  }

  start(total: number, step: number, fields: ProgressFields): void {
    this.bar.start(total, step, payload(fields));
  }

  step(step: number, fields: ProgressFields): void {
    this.bar.update(step, payload(fields));
  }

  epoch(step: number, fields: ProgressFields): void {
    this.bar.update(step, payload(fields));
  }

  stop(): void {
    this.bar.stop();
  }
}

class LineProgress implements ProgressReporter {
  private total = 0;

  constructor(private readonly stream: NodeJS.WritableStream) {}

  start(total: number, step: number): void {
    this.total = total;
    if (step > 0) this.stream.write(`resuming at step ${step}/${total}\n`);
  }

  step(): void {}

  epoch(step: number, f: ProgressFields, seconds: number): void {
    this.stream.write(
      `epoch ${f.epoch + 1}/${f.epochs}  step ${step}/${this.total}  loss ${fmt(f.loss)}  CE ${fmt(f.ce)}  trace ${fmt(f.trace, 3)}  val Dice ${fmt(f.valDice)}  (${seconds.toFixed(1)} s)\n`,
    );
  }

  stop(): void {}
}

/** A bar on a TTY, epoch lines otherwise, nothing when quiet. */
export function createProgress(options: { quiet?: boolean; stream?: NodeJS.WriteStream } = {}): ProgressReporter {
  if (options.quiet) return silentProgress;
  const stream = options.stream ?? process.stderr;
  return stream.isTTY ? new BarProgress(stream) : new LineProgress(stream);
}
