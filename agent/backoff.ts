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
