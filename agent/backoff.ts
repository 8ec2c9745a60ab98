/**
 * Restart backoff (docs/agent.md): starts at `initialMs`, multiplies by `factor` per
 * consecutive restart, capped at `maxMs`; a run that stayed up `resetAfterMs` resets it.
 * Defaults follow PM2: 100 ms, x1.5, 15 s cap, reset after 30 s up.
 */
export interface BackoffPolicy {
  initialMs: number;
  factor: number;
  maxMs: number;
  resetAfterMs: number;
}

export const DEFAULT_BACKOFF: BackoffPolicy = { initialMs: 100, factor: 1.5, maxMs: 15_000, resetAfterMs: 30_000 };

export function backoffDelay(policy: BackoffPolicy, consecutive: number): number {
  return Math.min(policy.maxMs, Math.round(policy.initialMs * policy.factor ** Math.max(0, consecutive)));
}

export interface CrashLoopPolicy {
  /** restarts within `windowMs` that mark an app as crash-looping */
  restarts: number;
  windowMs: number;
}

export const DEFAULT_CRASH_LOOP: CrashLoopPolicy = { restarts: 5, windowMs: 60_000 };

/**
 * The restart decision of one app as a pure state holder with an injected clock: given when
 * the app started and when it exited, the delay before the next start and whether the app is
 * now crash-looping. An app in crash-loop keeps being restarted at the capped delay (a device
 * far from anyone should recover by itself once the cause goes away) and leaves crash-loop
 * after a run that stays up `resetAfterMs`.
 */
export class RestartTracker {
  private consecutive = 0;
  private recent: number[] = [];
  crashLooping = false;

  constructor(
    private readonly backoff: BackoffPolicy = DEFAULT_BACKOFF,
    private readonly loop: CrashLoopPolicy = DEFAULT_CRASH_LOOP,
  ) {}

  /** Called when a run ends and a restart is due; `upMs` is how long the run lasted. */
  onExit(now: number, upMs: number): { delayMs: number; crashLoop: boolean; enteredCrashLoop: boolean } {
    if (upMs >= this.backoff.resetAfterMs) {
      this.consecutive = 0;
      this.crashLooping = false;
    }
    const delayMs = backoffDelay(this.backoff, this.consecutive++);
    this.recent = [...this.recent.filter((t) => now - t < this.loop.windowMs), now];
    const entered = !this.crashLooping && this.recent.length >= this.loop.restarts;
    if (entered) this.crashLooping = true;
    return { delayMs, crashLoop: this.crashLooping, enteredCrashLoop: entered };
  }

  /** A restart asked for by a person or a job: start again at once, forget the streak. */
  reset(): void {
    this.consecutive = 0;
    this.recent = [];
    this.crashLooping = false;
  }
}
