import type { Layout } from './layout.ts';
import { nextState, type UpdateEvent, type UpdateState } from './machine.ts';
import type { UpdateRecord } from './types.ts';

export type Outcome = { event: UpdateEvent; reason?: string; code?: string };

/**
 * Apply one transition to the record (in memory; the caller persists it before running the
 * new state's action). Also captures what later states need: where a switch came from,
 * when a rollback was decided, and the chain of states.
 */
export function advance(rec: UpdateRecord, out: Outcome, layout: Layout, now = Date.now()): UpdateState {
  const from = rec.state;
  const to = nextState(from, out.event);
  rec.state = to;
  rec.updatedAt = now;
  rec.history.push({ state: to, at: now, event: out.event, ...(out.reason ? { reason: out.reason } : {}) });
  if (out.reason && (out.event === 'failure' || out.event === 'loop-detected')) {
    rec.reason = out.reason;
    if (out.code) rec.code = out.code;
  }
  if (to === 'rolling-back' && from !== 'rolling-back') rec.rollbackDecidedAt = now;
  if (to === 'switching' && from !== 'switching') {
    // captured before the switch's side effects, so a resumed switch or a rollback knows where it came from
    const kind = rec.kind ?? 'app';
    const cur = layout.currentRelease(kind, rec.name ?? '');
    rec.previous = cur === rec.release ? (rec.previous ?? null) : cur;
    rec.previousVersion = rec.previous ? (layout.meta(kind, rec.name ?? '', rec.previous)?.version ?? null) : null;
  }
  return to;
}
