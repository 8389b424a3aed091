// Learning-rate schedules. The trainer asks for the rate of every optimiser step and
// hands it to model.setOptimizer({lr}) before the step, so a schedule is a pure function
// of (step, total steps): a resumed run gets the same rates as an uninterrupted one.

export type ScheduleKind = 'constant' | 'step' | 'cosine' | 'poly';
export const SCHEDULE_KINDS: readonly ScheduleKind[] = ['constant', 'step', 'cosine', 'poly'];

export interface LrSchedule {
  kind: ScheduleKind;
  /** Base (initial) learning rate. */
  lr: number;
  /** `step`: multiply by `gamma` every `stepSize` steps. Default gamma 0.1, stepSize a third of the run. */
  gamma?: number;
  stepSize?: number;
  /**
   * `cosine`: the rate the run ends on, default 0: reached at step `totalSteps` (the end of the
   * run), so the last optimiser step (totalSteps - 1) runs just above it, exactly as
   * torch.optim.lr_scheduler.CosineAnnealingLR(T_max = totalSteps, eta_min = minLr).
   */
  minLr?: number;
  /** `poly`: lr * (1 - step / total)^power, default 0.9 (as nnU-Net). */
  power?: number;
}

export function checkSchedule(schedule: LrSchedule): void {
  const { kind, lr } = schedule;
  if (!SCHEDULE_KINDS.includes(kind)) throw new RangeError(`schedule ${JSON.stringify(kind)} must be one of ${SCHEDULE_KINDS.join(', ')}`);
  if (!(lr > 0) || !Number.isFinite(lr)) throw new RangeError(`learning rate ${lr} must be a finite number > 0`);
  // The engine keeps the rate in a float: below ~1.4e-45 it is 0 there, and the run would
  // take its steps without changing a weight.
  if (Math.fround(lr) === 0) throw new RangeError(`learning rate ${lr} is 0 in float32 (the engine's precision): the model would not train`);
  const positive = (name: string, value: number | undefined, allowZero = false) => {
    if (value === undefined) return;
    if (!Number.isFinite(value) || value < 0 || (!allowZero && value === 0)) {
      throw new RangeError(`schedule ${name} ${value} must be a finite number ${allowZero ? '>=' : '>'} 0`);
    }
  };
  positive('gamma', schedule.gamma);
  positive('minLr', schedule.minLr, true);
  positive('power', schedule.power);
  if (schedule.stepSize !== undefined && (!Number.isInteger(schedule.stepSize) || schedule.stepSize < 1)) {
    throw new RangeError(`schedule stepSize ${schedule.stepSize} must be an integer >= 1`);
  }
}

/** The settings each schedule reads (besides `kind` and `lr`). */
export const SCHEDULE_SETTINGS: Readonly<Record<ScheduleKind, readonly (keyof LrSchedule)[]>> = {
  constant: [],
  step: ['gamma', 'stepSize'],
  cosine: ['minLr'],
  poly: ['power'],
};

/**
 * Refuses a setting the schedule's kind does not read: a misspelled one (torch's `eta_min`
 * for minLr) or one of another kind (`gamma` on a cosine) was ignored without a word, so the
 * run went on at rates other than the caller meant. The trainer asks this of a new run's
 * schedule; learningRate() does not (a checkpoint's extra.schedule also holds `nextLr`).
 */
export function checkScheduleSettings(schedule: LrSchedule): void {
  const allowed = ['kind', 'lr', ...(SCHEDULE_SETTINGS[schedule.kind] ?? [])];
  const extra = Object.keys(schedule).filter((key) => !allowed.includes(key) && schedule[key as keyof LrSchedule] !== undefined);
  if (extra.length) {
    throw new RangeError(`schedule has no setting ${extra.map((k) => `'${k}'`).join(', ')} (${schedule.kind} takes ${allowed.join(', ')})`);
  }
}

/**
 * `schedule` with every setting its kind reads spelled out (the defaults above: gamma 0.1 and
 * stepSize a third of the run for `step`, minLr 0 for `cosine`, power 0.9 for `poly`): the
 * schedule the rates come from. learningRate reads it, and a resume compares these (a run saved
 * as {kind: 'cosine', lr} has the same schedule as {kind: 'cosine', lr, minLr: 0}). Any other
 * key is kept as it is, so that a resume still sees it as a difference (checkScheduleSettings
 * refuses it in a new run).
 */
export function scheduleWithDefaults(schedule: LrSchedule, totalSteps: number): LrSchedule {
  switch (schedule.kind) {
    case 'step':
      return { ...schedule, gamma: schedule.gamma ?? 0.1, stepSize: schedule.stepSize ?? Math.max(1, Math.ceil(Math.max(1, totalSteps) / 3)) };
    case 'cosine':
      return { ...schedule, minLr: schedule.minLr ?? 0 };
    case 'poly':
      return { ...schedule, power: schedule.power ?? 0.9 };
    default:
      return { ...schedule };
  }
}

/**
 * The learning rate of optimiser step `step` (0-based: the first step is 0) in a run of
 * `totalSteps` steps, as PyTorch's ConstantLR, StepLR, CosineAnnealingLR(T_max = totalSteps)
 * and PolynomialLR(total_iters = totalSteps) give it. Steps at or past the end get the
 * end-of-run rate (that of step `totalSteps`: minLr for cosine, 0 for poly); torch's cosine
 * would climb back up, its StepLR keep decaying.
 */
export function learningRate(schedule: LrSchedule, step: number, totalSteps: number): number {
  // A public function: a bad schedule or step would otherwise come back as a NaN, negative
  // or infinite rate (e.g. stepSize 0 gives 0/0), found only when setOptimizer refuses it.
  checkSchedule(schedule);
  if (Number.isNaN(step) || step < 0) throw new RangeError(`step ${step} must be a number >= 0`);
  if (!Number.isFinite(totalSteps) || totalSteps < 0) throw new RangeError(`total steps ${totalSteps} must be a finite number >= 0`);
  const full = scheduleWithDefaults(schedule, totalSteps);
  const { lr } = full;
  const total = Math.max(1, totalSteps);
  const t = Math.min(step, total);
  switch (full.kind) {
    case 'constant':
      return lr;
    case 'step':
      return lr * full.gamma! ** Math.floor(t / full.stepSize!);
    case 'cosine': {
      const minLr = full.minLr!;
      return minLr + (lr - minLr) * 0.5 * (1 + Math.cos((Math.PI * t) / total));
    }
    case 'poly':
      return lr * (1 - t / total) ** full.power!;
    default: {
      const unknown: never = full.kind;
      throw new RangeError(`unknown schedule ${JSON.stringify(unknown)}`);
    }
  }
}
