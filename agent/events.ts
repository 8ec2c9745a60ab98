/**
 * The agent's recent events for the local API and page: a bounded in-memory ring
 * (default 500) with a monotonically increasing sequence number as the cursor.
 * Everything the agent reports upstream as an event also lands here, plus local-only
 * app state transitions. It is not durable: the outbox is what carries events to the hub.
 */
export type EventSeverity = 'info' | 'warning' | 'alert';

export interface AgentEvent {
  /** cursor: strictly increasing for the life of the process, starting at 1 */
  seq: number;
  /** ms since the epoch */
  t: number;
  type: string;
  severity: EventSeverity;
  data: Record<string, unknown>;
}

export interface EventPage {
  events: AgentEvent[];
  /** pass as `since` to get what came after this page */
  next: number;
  /** true when events after `since` were already pushed out of the ring (the reader missed some) */
  truncated: boolean;
}

export class EventLog {
  private readonly ring: AgentEvent[] = [];
  private seq = 0;
  private readonly listeners = new Set<(e: AgentEvent) => void>();

  constructor(
    readonly capacity = 500,
    private readonly now: () => number = Date.now,
  ) {
    if (!Number.isInteger(capacity) || capacity < 1) throw new RangeError('EventLog capacity must be a positive integer');
  }

  record(type: string, severity: EventSeverity, data: Record<string, unknown> = {}): AgentEvent {
    const e: AgentEvent = { seq: ++this.seq, t: this.now(), type, severity, data };
    this.ring.push(e);
    if (this.ring.length > this.capacity) this.ring.shift();
    for (const fn of this.listeners) fn(e);
    return e;
  }

  /** The sequence number of the newest event (0 before the first). */
  get last(): number {
    return this.seq;
  }

  /** Events with seq > since, oldest first, at most `limit` (the oldest ones first, so paging forward loses nothing). */
  since(since: number, limit = this.capacity): EventPage {
    let cursor = Math.max(0, Math.floor(since));
    let truncated = false;
    // a cursor from before an agent restart (seq starts again at 1): start over, and say so
    if (cursor > this.seq) {
      cursor = 0;
      truncated = true;
    }
    const first = this.ring[0]?.seq ?? this.seq + 1;
    if (cursor + 1 < first) truncated = true;
    // seqs in the ring are contiguous, so the start index is arithmetic
    const from = Math.max(0, cursor + 1 - first);
    const events = this.ring.slice(from, from + Math.max(0, limit));
    return { events, next: events.length ? events[events.length - 1]!.seq : cursor, truncated };
  }

  /** The newest `n` events, oldest first. */
  tail(n: number): AgentEvent[] {
    return n <= 0 ? [] : this.ring.slice(-n);
  }

  /** Called for every event recorded; returns the unsubscribe function. */
  subscribe(fn: (e: AgentEvent) => void): () => void {
    this.listeners.add(fn);
    return () => this.listeners.delete(fn);
  }
}
