/**
 * The update as a state machine (STYLE.md, mender): a closed set of states and events,
 * a transition table `(state, event) → next state`, and a resume table that says what a
 * freshly started agent does when it finds a given state persisted.
 *
 * The state names are a persisted contract (docs/ota.md): never rename or reuse one; add
 * new ones and bump STATE_VERSION when the record's meaning changes.
 */
export const STATE_VERSION = 1;

export const STATES = [
  'idle',
  'downloading',
  'verifying',
  'staging',
  'staged',
  'waiting-lock',
  'switching',
  'probation',
  'committing',
  'committed',
  'rolling-back',
  'rolled-back',
  'failed',
] as const;
export type UpdateState = (typeof STATES)[number];

export const EVENTS = ['start', 'success', 'failure', 'retry', 'locked', 'loop-detected'] as const;
export type UpdateEvent = (typeof EVENTS)[number];

export const TERMINAL: ReadonlySet<UpdateState> = new Set(['idle', 'committed', 'rolled-back', 'failed']);

/**
 * Before `switching`, nothing on the device has changed: a failure only cleans up (failed).
 * From `switching` on, the device may run the new release: a failure rolls back.
 */
export const AFTER_SWITCH: ReadonlySet<UpdateState> = new Set(['switching', 'probation', 'committing', 'rolling-back']);

type Table = { readonly [S in UpdateState]: Partial<Readonly<Record<UpdateEvent, UpdateState>>> };

export const TRANSITIONS: Table = {
  idle: { start: 'downloading' },
  downloading: { success: 'verifying', retry: 'downloading', failure: 'failed', 'loop-detected': 'failed' },
  verifying: { success: 'staging', failure: 'failed', 'loop-detected': 'failed' },
  staging: { success: 'staged', failure: 'failed', 'loop-detected': 'failed' },
  staged: { success: 'switching', locked: 'waiting-lock', failure: 'failed', 'loop-detected': 'failed' },
  'waiting-lock': { success: 'switching', retry: 'waiting-lock', failure: 'failed', 'loop-detected': 'failed' },
  switching: { success: 'probation', failure: 'rolling-back', 'loop-detected': 'rolling-back' },
  probation: { success: 'committing', failure: 'rolling-back', 'loop-detected': 'rolling-back' },
  // committing only records the floor and prunes; it is idempotent, so it is redone, not undone
  committing: { success: 'committed', retry: 'committing' },
  // a rollback is always finished (retried until it is): there is no state to fall back to from here
  'rolling-back': { success: 'rolled-back', retry: 'rolling-back' },
  committed: { start: 'downloading' },
  'rolled-back': { start: 'downloading' },
  failed: { start: 'downloading' },
};

/** The next state, or throws: an event a state has no row for is a bug, not a runtime condition. */
export function nextState(state: UpdateState, event: UpdateEvent): UpdateState {
  const next = TRANSITIONS[state][event];
  if (next === undefined) throw new Error(`update state machine: no transition from ${state} on ${event}`);
  return next;
}

/**
 * What to do on start-up in each persisted state (after a crash, kill -9 or power loss).
 * - `nothing`: at rest.
 * - `rerun`: run the state again; its action is idempotent or cleans up first
 *   (downloading resumes from the partial file with Range; verifying re-verifies; staging
 *   removes the partial staging dir and extracts again; switching re-points the symlink and
 *   re-applies; probation restarts the window; committing and rolling-back finish).
 * - `report`: at rest, but the final report may not have reached the outbox: send it again.
 */
export type ResumeAction = 'nothing' | 'rerun' | 'report';
export const RESUME: { readonly [S in UpdateState]: ResumeAction } = {
  idle: 'nothing',
  downloading: 'rerun',
  verifying: 'rerun',
  staging: 'rerun',
  staged: 'rerun',
  'waiting-lock': 'rerun',
  switching: 'rerun',
  probation: 'rerun',
  committing: 'rerun',
  'rolling-back': 'rerun',
  committed: 'report',
  'rolled-back': 'report',
  failed: 'report',
};

/**
 * The loop guard: after this many resumes of one update (agent starts that found it in
 * progress), the update is abandoned with `loop-detected` (failed before the switch,
 * rolled back after it). committing and rolling-back are exempt: they only ever finish.
 */
export function loopGuardApplies(state: UpdateState): boolean {
  return state !== 'committing' && state !== 'rolling-back' && !TERMINAL.has(state);
}

export function isUpdateState(s: unknown): s is UpdateState {
  return typeof s === 'string' && (STATES as readonly string[]).includes(s);
}
