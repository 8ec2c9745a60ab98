import type { Level } from 'level';
import type { Logger } from '../core/log.ts';

/**
 * Messages the hub acknowledged but could not route: batch items outside the sender's ACL
 * (typically an MCU another gateway registered first), outbox messages without a mid,
 * publishes over the payload limit or outside the ACL. MQTT 3.1.1 cannot refuse one
 * PUBLISH, and not acknowledging makes an at-least-once sender resend it forever, so the
 * hub acknowledges them (docs/topics.md#batches); without this store that acknowledgement
 * was the last anyone saw of the data. Here they are kept, bounded, for an operator to
 * read (`GET /api/v1/dead-letters`), counted in `/metrics` and logged when they arrive.
 *
 * One LevelDB of its own (`{stateDir}/dead-letters`), keys `{ms, 15 digits}!{n, 9 digits}`
 * in arrival order; the oldest are dropped first beyond `maxRecords` or `maxBytes`.
 * Payloads are kept up to `maxPayloadBytes` (the rest is cut, and the record says so).
 */
export type DeadLetterReason = 'acl' | 'invalid' | 'too_large';

export interface DeadLetterInput {
  topic: string;
  payload: Buffer;
  reason: DeadLetterReason;
  /** what exactly was wrong, for the operator */
  detail: string;
}

export interface DeadLetter {
  /** key, for paging (`after`) */
  id: string;
  /** ms since the epoch */
  at: number;
  /** the client that sent it (a device or gateway id) */
  from: string;
  topic: string;
  reason: DeadLetterReason;
  detail: string;
  /** base64 */
  payload: string;
  /** bytes of the original payload */
  size: number;
  truncated: boolean;
}

export interface DeadLetterOptions {
  maxRecords?: number;
  maxBytes?: number;
  maxPayloadBytes?: number;
  log: Logger;
  now?: () => number;
}

/** what is stored per record: the key holds the rest */
type Stored = Omit<DeadLetter, 'id' | 'at'>;

export class DeadLetters {
  private count = 0;
  private bytes = 0;
  private seq = 0;
  private evictedTotal = 0;
  private addedTotal = 0;
  private writing: Promise<void> = Promise.resolve();
  private readonly maxRecords: number;
  private readonly maxBytes: number;
  private readonly maxPayloadBytes: number;
  private readonly now: () => number;

  private constructor(
    private readonly db: Level<string, string>,
    private readonly opts: DeadLetterOptions,
  ) {
    this.maxRecords = opts.maxRecords ?? 100_000;
    this.maxBytes = opts.maxBytes ?? 64 * 1024 * 1024;
    this.maxPayloadBytes = opts.maxPayloadBytes ?? 64 * 1024;
    this.now = opts.now ?? Date.now;
  }

  static async open(db: Level<string, string>, opts: DeadLetterOptions): Promise<DeadLetters> {
    const d = new DeadLetters(db, opts);
    for await (const [key, value] of db.iterator()) {
      d.count++;
      d.bytes += key.length + value.length;
      const n = Number(key.slice(16));
      if (Number.isSafeInteger(n)) d.seq = Math.max(d.seq, n + 1);
    }
    return d;
  }

  stats(): { records: number; bytes: number; added: number; evicted: number } {
    return { records: this.count, bytes: this.bytes, added: this.addedTotal, evicted: this.evictedTotal };
  }

  /**
   * Keep `items` sent by `from`. Written in the background, in call order (the publish was
   * acknowledged already; waiting would hold the sender's connection); a failed write is
   * logged with what was lost.
   */
  add(from: string, items: readonly DeadLetterInput[]): Promise<void> {
    if (items.length === 0) return this.writing;
    const at = this.now();
    const ops = items.map((it) => {
      const cut = it.payload.length > this.maxPayloadBytes;
      const value: Stored = {
        from,
        topic: it.topic.slice(0, 1024),
        reason: it.reason,
        detail: it.detail.slice(0, 512),
        payload: (cut ? it.payload.subarray(0, this.maxPayloadBytes) : it.payload).toString('base64'),
        size: it.payload.length,
        truncated: cut,
      };
      const key = `${String(at).padStart(15, '0')}!${String(this.seq++ % 1e9).padStart(9, '0')}`;
      return { type: 'put' as const, key, value: JSON.stringify(value) };
    });
    const run = this.writing.then(async () => {
      try {
        // synced: a dead letter is the only copy of what the sender was told was delivered
        await this.db.batch(ops, { sync: true });
      } catch (err) {
        this.opts.log.error('dead letters could not be stored; these messages are lost', { from, count: ops.length, topics: items.slice(0, 3).map((i) => i.topic), err });
        return;
      }
      this.addedTotal += ops.length;
      this.count += ops.length;
      for (const op of ops) this.bytes += op.key.length + op.value.length;
      await this.trim();
    });
    this.writing = run.catch(() => undefined);
    return run;
  }

  /** Drop the oldest records beyond the bounds. */
  private async trim(): Promise<void> {
    if (this.count <= this.maxRecords && this.bytes <= this.maxBytes) return;
    const dels: Array<{ type: 'del'; key: string }> = [];
    let count = this.count;
    let bytes = this.bytes;
    for await (const [key, value] of this.db.iterator()) {
      if (count <= this.maxRecords && bytes <= this.maxBytes) break;
      dels.push({ type: 'del', key });
      count--;
      bytes -= key.length + value.length;
    }
    try {
      await this.db.batch(dels);
    } catch (err) {
      this.opts.log.warn('could not drop old dead letters; trying again with the next ones', { err });
      return;
    }
    this.count = count;
    this.bytes = bytes;
    this.evictedTotal += dels.length;
    this.opts.log.warn('oldest dead letters dropped to stay within bounds', { dropped: dels.length, maxRecords: this.maxRecords, maxBytes: this.maxBytes });
  }

  /** Oldest first, from after `after` (an id from a previous page), at most `limit`. */
  async list(limit: number, after?: string): Promise<DeadLetter[]> {
    await this.writing;
    const out: DeadLetter[] = [];
    const range = after ? { gt: after, limit } : { limit };
    for await (const [key, value] of this.db.iterator(range)) {
      const s = JSON.parse(value) as Stored;
      out.push({ id: key, at: Number(key.slice(0, 15)), ...s });
    }
    return out;
  }

  /** Wait for the writes under way (the db is the caller's to close). */
  flush(): Promise<void> {
    return this.writing;
  }
}
