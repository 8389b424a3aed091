// How a training run reports itself while it runs. On a terminal: one cli-progress bar
// on stderr with the step, loss, CE, trace (the last step's, or the epoch's means once it
// ends, labelled) and the last validation Dice. Not on a
// terminal (logs, CI, pipes): one plain line per epoch, and within an epoch a line at most
// every minute; while an epoch's validation scores cases (BraTS: minutes of whole volumes),
// the bar says "validating 3/8" and a log a line at most every minute too. `quiet`: nothing.
// The full record
// is always the JSON-lines log next to the checkpoints (trainer.ts). The STAPLE baselines'
// fusion before training reports the same way, per case.

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
  /**
   * During the validation after `step` (optional: reporters written before it need not have
   * it): `done` of `total` cases scored, `id` the case scored now (absent at the end). The
   * trainer calls it as the validator reports (hooks.validate's second argument); epoch()
   * follows the validation and returns to the training display.
   */
  validation?(step: number, fields: ProgressFields, done: number, total: number, id?: string): void;
  /** End of an epoch (after validation, if any). */
  epoch(step: number, fields: ProgressFields, seconds: number): void;
  stop(): void;
}

export const silentProgress: ProgressReporter = { start() {}, step() {}, validation() {}, epoch() {}, stop() {} };

function fmt(x: number, digits = 4): string {
  return Number.isFinite(x) ? x.toFixed(digits) : '-';
}

/**
 * The bar's fields; `status` is the training figures, or where a validation stands while one
 * runs. Within an epoch the figures are the last step's, after it the epoch's means (smoother,
 * so the loss seemed to jump at each epoch's end): `means` says which, and the bar labels them.
 */
function payload(f: ProgressFields, validating?: string, means = false): Record<string, string> {
  return {
    // A finished run stands after its last epoch (a resumed one showed "epoch 7/6").
    ep: `${Math.min(f.epoch + 1, f.epochs)}/${f.epochs}`,
    status: validating ?? `${means ? 'epoch mean' : 'last step'}: loss ${fmt(f.loss)} | CE ${fmt(f.ce)} | trace ${fmt(f.trace, 3)}`,
    dice: fmt(f.valDice),
  };
}

/** "validating 3/8 cases" and the case scored now: what the bar says while a validation runs. */
function validatingText(done: number, total: number, id: string | undefined): string {
  return `validating ${done}/${total} case${total === 1 ? '' : 's'}${id !== undefined && done < total ? ` (now ${id})` : ''}`;
}

/**
 * Stops `bar` (showing the terminal's cursor again) when the process exits while it runs: a
 * second Ctrl-C during training, or a signal with no step to finish, ends by process.exit(),
 * which skipped the bar's stop() and left the user's terminal with a hidden cursor.
 * Returns what removes the guard (call it when the bar stops normally).
 */
function stopOnExit(bar: SingleBar): () => void {
  const onExit = () => bar.stop();
  process.once('exit', onExit);
  return () => process.off('exit', onExit);
}

/** Seconds left as the bar shows them: 45s, 12m05s, 7h36m, 3d04h; '-' when not known yet. */
export function etaText(seconds: number): string {
  if (!Number.isFinite(seconds) || seconds < 0) return '-';
  const s = Math.round(seconds);
  const two = (v: number) => String(v).padStart(2, '0');
  // Days, not cli-progress's "INF" past 115 days or "250h12m": a 3D run on a CPU takes weeks.
  if (s >= 86_400) return `${Math.floor(s / 86_400)}d${two(Math.floor((s % 86_400) / 3600))}h`;
  if (s >= 3600) return `${Math.floor(s / 3600)}h${two(Math.floor((s % 3600) / 60))}m`;
  if (s >= 60) return `${Math.floor(s / 60)}m${two(s % 60)}s`;
  return `${s}s`;
}

/**
 * Seconds left at `step` of `total` as the run has gone since it (re)started at `startStep` at
 * `startMs`: the wall time per step so far, validations and checkpoints included; NaN before
 * the first step.
 */
function secondsLeft(startStep: number, startMs: number, step: number, total: number, nowMs: number): number {
  const done = step - startStep;
  return done > 0 ? ((nowMs - startMs) / 1000 / done) * (total - step) : NaN;
}

/**
 * The ETA text of a cli-progress bar of cases or windows, as train's bar has it: the time left
 * at the rate since the bar started ('-' before the first one is done). cli-progress's own
 * {eta_formatted} drew "NFs" before the first one (its "INF" cut to the 2 characters of its
 * seconds) and "LLs" (NULL) at times. `start` when the bar starts; `text` at each update, for
 * the payload's `eta_run`.
 */
export function barEta(now: () => number = Date.now): { start(value?: number): void; text(value: number, total: number): string } {
  let startValue = 0;
  let startMs = now();
  return {
    start(value = 0) {
      startValue = value;
      startMs = now();
    },
    text: (value, total) => etaText(secondsLeft(startValue, startMs, value, total, now())),
  };
}

class BarProgress implements ProgressReporter {
  private readonly bar: SingleBar;
  private unguard = () => {};
  private total = 0;
  private startStep = 0;
  private startTime = 0;

  constructor(
    stream: NodeJS.WriteStream,
    private readonly now: () => number,
  ) {
    this.bar = new SingleBar({
      stream,
      format: 'epoch {ep} [{bar}] step {value}/{total} | {status} | val Dice {dice} | ETA {eta_run}',
      barsize: 24,
      hideCursor: true,
    });
  }

  /**
   * The fields, and the time left as the run has gone so far: the wall time since the bar
   * started over the steps taken since, times the steps left. cli-progress's own ETA took the
   * rate of its last 50 updates: in a long run whose epochs end with a long validation (a BraTS
   * run: 250 steps, then minutes of sliding-window validation) those are steps only in the middle
   * of an epoch (an ETA 2.25 times too short) and a validation's pause right after one (3.3
   * times too long), never the truth. The run's rate counts each epoch's validation and
   * checkpoints as often as they come.
   */
  private payload(step: number, fields: ProgressFields, validating?: string, means = false): Record<string, string> {
    return { ...payload(fields, validating, means), eta_run: etaText(secondsLeft(this.startStep, this.startTime, step, this.total, this.now())) };
  }

  start(total: number, step: number, fields: ProgressFields): void {
    this.total = total;
    this.startStep = step;
    this.startTime = this.now();
    this.bar.start(total, step, this.payload(step, fields));
    this.unguard();
    this.unguard = stopOnExit(this.bar);
  }

  step(step: number, fields: ProgressFields): void {
    this.bar.update(step, this.payload(step, fields));
  }

  // The bar stays at the epoch's last step, its ETA at the whole run's rate (the time this
  // validation takes so far counts as the validations do in it); epoch() then draws the
  // training figures again.
  validation(step: number, fields: ProgressFields, done: number, total: number, id?: string): void {
    this.bar.update(step, this.payload(step, fields, validatingText(done, total, id)));
  }

  epoch(step: number, fields: ProgressFields): void {
    this.bar.update(step, this.payload(step, fields, undefined, true));
  }

  stop(): void {
    this.unguard();
    this.bar.stop();
  }
}

/** How often a log (not a terminal) gets a line within an epoch: a 3D epoch on a CPU takes minutes. */
export const LINE_EVERY_MS = 60_000;

class LineProgress implements ProgressReporter {
  private total = 0;
  private last: number;
  private startStep = 0;
  private startTime = 0;

  constructor(
    private readonly stream: NodeJS.WritableStream,
    private readonly everyMs: number,
    private readonly now: () => number,
  ) {
    this.last = now();
  }

  start(total: number, step: number): void {
    this.total = total;
    this.last = this.now();
    this.startStep = step;
    this.startTime = this.last;
    if (step > 0) this.stream.write(`resuming at step ${step}/${total}\n`);
  }

  // A batch-job log would otherwise say nothing for a whole epoch (minutes): a line with the
  // step at most every `everyMs`, so that a stalled run can be told from a slow one.
  step(step: number, f: ProgressFields): void {
    const now = this.now();
    const elapsed = now - this.last;
    if (elapsed < this.everyMs) return;
    this.last = now;
    this.stream.write(`  step ${step}/${this.total} of epoch ${f.epoch + 1}/${f.epochs}  loss ${fmt(f.loss)}  CE ${fmt(f.ce)}  trace ${fmt(f.trace, 3)}  (${(elapsed / 1000).toFixed(1)} s since the last line)\n`);
  }

  // A validation of whole volumes (BraTS: about a minute a case on a CPU) is a silence of
  // minutes: like the steps, a line at most every `everyMs`, saying where it stands. A quick
  // one (2D images, or a few small cases) writes none: the epoch's line follows at once.
  validation(step: number, f: ProgressFields, done: number, total: number): void {
    const now = this.now();
    const elapsed = now - this.last;
    if (elapsed < this.everyMs) return;
    this.last = now;
    this.stream.write(`  validating after step ${step}/${this.total} of epoch ${f.epoch + 1}/${f.epochs}: ${done}/${total} case(s) scored  (${(elapsed / 1000).toFixed(1)} s since the last line)\n`);
  }

  epoch(step: number, f: ProgressFields, seconds: number): void {
    this.last = this.now();
    // A batch job's log is where a multi-day run is watched: the time left as on the bar (the
    // whole run's rate, validations included), on each epoch's line but the last.
    const left = secondsLeft(this.startStep, this.startTime, step, this.total, this.last);
    const eta = step < this.total && Number.isFinite(left) ? `, ETA ${etaText(left)}` : '';
    this.stream.write(
      `epoch ${f.epoch + 1}/${f.epochs}  step ${step}/${this.total}  loss ${fmt(f.loss)}  CE ${fmt(f.ce)}  trace ${fmt(f.trace, 3)}  val Dice ${fmt(f.valDice)}  (${seconds.toFixed(1)} s${eta})\n`,
    );
  }

  stop(): void {}
}

/**
 * A bar on a TTY; otherwise a line per epoch and, within an epoch, one at most every
 * `lineEveryMs` (LINE_EVERY_MS); nothing when quiet. `now` is the clock (tests).
 */
export function createProgress(options: { quiet?: boolean; stream?: NodeJS.WriteStream; lineEveryMs?: number; now?: () => number } = {}): ProgressReporter {
  if (options.quiet) return silentProgress;
  const stream = options.stream ?? process.stderr;
  const now = options.now ?? Date.now;
  return stream.isTTY ? new BarProgress(stream, now) : new LineProgress(stream, options.lineEveryMs ?? LINE_EVERY_MS, now);
}

/** Progress of fusing the STAPLE baselines' training targets, one case at a time. */
export interface FusionProgressReporter {
  start(total: number, what: string): void;
  /** After case `done` of `total`: fused now (with its time) or found current in the cache. */
  case(done: number, id: string, status: 'fused' | 'reused', seconds: number): void;
  stop(): void;
}

export const silentFusionProgress: FusionProgressReporter = { start() {}, case() {}, stop() {} };

/** A bar on a TTY, one line per case otherwise (as `cmseg prepare`), nothing when quiet. */
export function createFusionProgress(options: { quiet?: boolean; stream?: NodeJS.WriteStream; now?: () => number } = {}): FusionProgressReporter {
  if (options.quiet) return silentFusionProgress;
  const stream = options.stream ?? process.stderr;
  if (stream.isTTY) {
    const bar = new SingleBar({ stream, format: '{what} [{bar}] {value}/{total} cases | {id} | ETA {eta_run}', barsize: 24, hideCursor: true });
    const eta = barEta(options.now);
    let unguard = () => {};
    let total = 0;
    return {
      start: (n, what) => {
        total = n;
        eta.start();
        bar.start(n, 0, { what, id: '', eta_run: eta.text(0, n) });
        unguard();
        unguard = stopOnExit(bar);
      },
      case: (done, id, status) => bar.update(done, { id: `${id} ${status}`, eta_run: eta.text(done, total) }),
      stop: () => {
        unguard();
        bar.stop();
      },
    };
  }
  let total = 0;
  return {
    start: (n) => {
      total = n;
    },
    case: (done, id, status, seconds) => {
      stream.write(`[${done}/${total}] ${id} ${status === 'fused' ? `fused in ${seconds.toFixed(1)} s` : 'up to date in the cache, reused'}\n`);
    },
    stop: () => {},
  };
}
