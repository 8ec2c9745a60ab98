import { EventEmitter } from 'node:events';
import type { Level } from 'level';
import { FleetError } from '../core/errors.ts';
import { MAX_COMMAND_BYTES, type McuCommand } from '../firmware-bridge/frames.ts';

/**
 * The command mailbox (docs/mcu-protocol.md "Commands"): per MCU, commands waiting for
 * the device to wake, in arrival order, each with an expiry and a down-counter `seq`
 * (the MAC counter of the framed command; clock based, see nextSeq). Kept in LevelDB
 * (written with sync before `enqueue` resolves, so a command the gateway took from the hub
 * survives kill -9) and mirrored in memory for the hot path (GET / subscribe of a waking MCU).
 *
 *   q!{mcuId}!{seq, 16 digits}  → MailboxEntry (JSON)
 *   s!{mcuId}                   → highest seq handed out (never reused, even after acks)
 *   a!{mcuId}!{seq, 16 digits}  → MailboxEntry with ackedAt: a hub command the MCU acked,
 *                                 remembered until it expires
 *
 * The hub sends a command again until the MCU's reply reaches it (docs/topics.md#command-delivery),
 * so `enqueue` stores a command id once: while it is queued, and after the MCU acknowledged
 * it until its expiry (at most REMEMBER_PER_MCU per MCU, oldest acknowledged forgotten
 * first). Commands the gateway makes itself (`fw.*`) are not remembered: their ids repeat
 * by design (an offer made again).
 *
 * Emits 'head' (mcuId) when the command at the head of an MCU's queue changes.
 */
export interface MailboxEntry {
  seq: number;
  /** the hub's command id */
  id: string;
  name: string;
  args: Record<string, unknown>;
  /** ms since the epoch */
  expiresAt: number;
  /** ms since the epoch */
  queuedAt: number;
  /** set once sent to the MCU at least once */
  delivered?: boolean;
  /** ms since the epoch; set on a remembered (acknowledged) command */
  ackedAt?: number;
}

const SEQ_DIGITS = 16;

/**
 * The next down-counter `seq` for an MCU whose last one from this gateway was `last`:
 * `max(last + 1, now)`, ms since the epoch, like the MCUs' clock-based up counters
 * (docs/mcu-protocol.md "What the MCU receives"). The MCU ignores a seq below the highest
 * it ran, whichever gateway sent that one, so a count kept per gateway from 1 was ignored
 * after the MCU moved to another gateway of its site or its gateway was replaced. From the
 * clock, any gateway's next seq is above what another sent earlier as long as their clocks
 * roughly agree; `last + 1` keeps it growing here when this clock steps back, and takes a
 * gateway upgraded with small counts in its store straight up to clock values. 13 digits
 * until the year 2286: within the counter range (1 to 2^53 − 1) and SEQ_DIGITS.
 */
export function nextSeq(last: number, now: number): number {
  return Number.isFinite(now) ? Math.max(last + 1, Math.floor(now)) : last + 1;
}

/** acknowledged hub commands remembered per MCU (for de-duplication) */
export const REMEMBER_PER_MCU = 256;
/** a command the gateway originates itself (docs/mcu-protocol.md "Commands"): never remembered */
const isInternal = (name: string): boolean => name.startsWith('fw.');

export class Mailbox extends EventEmitter {
  private readonly queues = new Map<string, MailboxEntry[]>();
  private readonly seqs = new Map<string, number>();
  /** per MCU: acknowledged hub commands by id, in acknowledgement order */
  private readonly acked = new Map<string, Map<string, MailboxEntry>>();
  private depthCount = 0;

  private constructor(
    private readonly db: Level<string, string>,
    private readonly maxPerMcu: number,
  ) {
    super();
  }

  static async open(db: Level<string, string>, maxPerMcu: number): Promise<Mailbox> {
    const mb = new Mailbox(db, maxPerMcu);
    for await (const [key, value] of db.iterator({ gte: 'q!', lt: 'q"' })) {
      const parts = key.split('!');
      const mcu = parts[1]!;
      try {
        const e = JSON.parse(value) as MailboxEntry;
        const q = mb.queues.get(mcu) ?? [];
        q.push(e);
        mb.queues.set(mcu, q);
        mb.depthCount++;
      } catch {
        await db.del(key);
      }
    }
    for await (const [key, value] of db.iterator({ gte: 's!', lt: 's"' })) {
      // an unreadable counter goes on from the clock (nextSeq) and the queue (below)
      const n = Number(value);
      mb.seqs.set(key.slice(2), Number.isSafeInteger(n) && n > 0 ? n : 0);
    }
    for (const [mcu, q] of mb.queues) {
      q.sort((a, b) => a.seq - b.seq);
      const top = q[q.length - 1]!.seq;
      if (Number.isSafeInteger(top) && top > (mb.seqs.get(mcu) ?? 0)) mb.seqs.set(mcu, top);
    }
    const stale: string[] = [];
    const acked: Array<{ mcu: string; e: MailboxEntry }> = [];
    for await (const [key, value] of db.iterator({ gte: 'a!', lt: 'a"' })) {
      try {
        const e = JSON.parse(value) as MailboxEntry;
        if (e.expiresAt <= Date.now()) stale.push(key);
        else acked.push({ mcu: key.split('!')[1]!, e });
      } catch {
        stale.push(key);
      }
    }
    acked.sort((a, b) => (a.e.ackedAt ?? 0) - (b.e.ackedAt ?? 0));
    for (const { mcu, e } of acked) {
      const m = mb.acked.get(mcu) ?? new Map<string, MailboxEntry>();
      m.set(e.id, e);
      mb.acked.set(mcu, m);
    }
    if (stale.length) await db.batch(stale.map((key) => ({ type: 'del' as const, key })));
    return mb;
  }

  private ackedKey(mcuId: string, seq: number): string {
    return `a!${mcuId}!${String(seq).padStart(SEQ_DIGITS, '0')}`;
  }

  /** Forget this MCU's remembered commands that expired by `now` (and the oldest beyond the bound). */
  private pruneAcked(mcuId: string, now: number, room = 0): Array<{ type: 'del'; key: string }> {
    const m = this.acked.get(mcuId);
    const ops: Array<{ type: 'del'; key: string }> = [];
    if (!m) return ops;
    for (const [id, e] of m) {
      if (e.expiresAt > now && m.size + room <= REMEMBER_PER_MCU) continue;
      m.delete(id);
      ops.push({ type: 'del', key: this.ackedKey(mcuId, e.seq) });
    }
    if (m.size === 0) this.acked.delete(mcuId);
    return ops;
  }

  /** The acknowledged hub command with this id, while remembered (not expired at `now`). */
  acknowledged(mcuId: string, id: string, now: number): MailboxEntry | undefined {
    const e = this.acked.get(mcuId)?.get(id);
    return e && e.expiresAt > now ? e : undefined;
  }

  private key(mcuId: string, seq: number): string {
    return `q!${mcuId}!${String(seq).padStart(SEQ_DIGITS, '0')}`;
  }

  get depth(): number {
    return this.depthCount;
  }

  /**
   * Queue a command; a duplicate id is stored once: one still queued, or a hub command the
   * MCU acknowledged and that has not expired (then `entry.ackedAt` is set and nothing is
   * queued). FLEET_MCU_MAILBOX_FULL beyond the limits.
   */
  async enqueue(mcuId: string, cmd: { id: string; name: string; args: Record<string, unknown>; expiresAt: number }, now: number): Promise<{ entry: MailboxEntry; duplicate: boolean }> {
    const q = this.queues.get(mcuId) ?? [];
    const dup = q.find((e) => e.id === cmd.id);
    if (dup) return { entry: dup, duplicate: true };
    const done = isInternal(cmd.name) ? undefined : this.acknowledged(mcuId, cmd.id, now);
    if (done) return { entry: done, duplicate: true };
    if (q.length >= this.maxPerMcu) throw new FleetError('FLEET_MCU_MAILBOX_FULL', `the mailbox of ${mcuId} already holds ${this.maxPerMcu} commands`);
    const size = Buffer.byteLength(JSON.stringify(toMcuCommand({ seq: 0, ...cmd, queuedAt: now })));
    if (size > MAX_COMMAND_BYTES - 64) throw new FleetError('FLEET_MCU_MAILBOX_FULL', `command ${cmd.id} is ${size} bytes encoded; at most ${MAX_COMMAND_BYTES - 64}`);
    // taken before the write: two commands arriving together must not share a seq
    const seq = nextSeq(this.seqs.get(mcuId) ?? 0, now);
    this.seqs.set(mcuId, seq);
    const entry: MailboxEntry = { seq, id: cmd.id, name: cmd.name, args: cmd.args, expiresAt: cmd.expiresAt, queuedAt: now };
    // in the queue at once too, so a duplicate arriving during the write is seen
    q.push(entry);
    this.queues.set(mcuId, q);
    this.depthCount++;
    try {
      await this.db.batch(
        [
          { type: 'put', key: this.key(mcuId, seq), value: JSON.stringify(entry) },
          { type: 'put', key: `s!${mcuId}`, value: String(seq) },
        ],
        { sync: true },
      );
    } catch (err) {
      const i = q.indexOf(entry);
      if (i >= 0) q.splice(i, 1);
      this.depthCount--;
      throw new FleetError('FLEET_STORE', `cannot store a command for ${mcuId}: ${(err as Error).message}`, { cause: err });
    }
    if (q[0] === entry) this.emit('head', mcuId);
    return { entry, duplicate: false };
  }

  /** The oldest command not expired at `now` (expired ones are left for `sweep`). */
  head(mcuId: string, now: number): MailboxEntry | undefined {
    return this.queues.get(mcuId)?.find((e) => e.expiresAt > now);
  }

  entries(mcuId: string): readonly MailboxEntry[] {
    return this.queues.get(mcuId) ?? [];
  }

  markDelivered(mcuId: string, entry: MailboxEntry): void {
    if (entry.delivered) return;
    entry.delivered = true;
    // best effort: only informational
    this.db.put(this.key(mcuId, entry.seq), JSON.stringify(entry)).catch(() => {});
  }

  /**
   * Remove a command by id (acknowledged, or expired); returns it, or undefined when it is
   * not (any more) there. A hub command removed before its expiry (`now`) was acknowledged:
   * it is remembered until then, in the same write, so a repeat from the hub is not queued.
   */
  async remove(mcuId: string, id: string, now = Date.now()): Promise<MailboxEntry | undefined> {
    const q = this.queues.get(mcuId);
    const i = q?.findIndex((e) => e.id === id) ?? -1;
    if (!q || i < 0) return undefined;
    const [entry] = q.splice(i, 1);
    this.depthCount--;
    if (q.length === 0) this.queues.delete(mcuId);
    const ops: Array<{ type: 'del'; key: string } | { type: 'put'; key: string; value: string }> = [{ type: 'del', key: this.key(mcuId, entry!.seq) }];
    if (entry!.expiresAt > now && !isInternal(entry!.name)) {
      ops.push(...this.pruneAcked(mcuId, now, 1));
      const done: MailboxEntry = { ...entry!, ackedAt: now };
      const m = this.acked.get(mcuId) ?? new Map<string, MailboxEntry>();
      m.set(done.id, done);
      this.acked.set(mcuId, m);
      ops.push({ type: 'put', key: this.ackedKey(mcuId, done.seq), value: JSON.stringify(done) });
    } else ops.push(...this.pruneAcked(mcuId, now));
    await this.db.batch(ops, { sync: true });
    if (i === 0) this.emit('head', mcuId);
    return entry;
  }

  /** Every command expired at `now` (still in the mailbox: the caller answers, then removes). */
  expired(now: number): Array<{ mcuId: string; entry: MailboxEntry }> {
    const out: Array<{ mcuId: string; entry: MailboxEntry }> = [];
    for (const [mcuId, q] of this.queues) for (const e of q) if (e.expiresAt <= now) out.push({ mcuId, entry: e });
    return out;
  }

  /** The command with this id, if it is (still) in the MCU's mailbox. */
  find(mcuId: string, id: string): MailboxEntry | undefined {
    return this.queues.get(mcuId)?.find((e) => e.id === id);
  }
}

/** The command as the MCU sees it (expiry in Unix seconds). */
export function toMcuCommand(e: MailboxEntry): McuCommand {
  return { id: e.id, n: e.name, a: e.args, x: Math.floor(e.expiresAt / 1000) };
}
