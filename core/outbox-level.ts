import { EventEmitter } from 'node:events';
import { statfsSync } from 'node:fs';
import type { Level } from 'level';
import { crc32 } from './crc32.ts';
import { FleetError } from './errors.ts';
import { checkWritten, notify, PRIORITY_NAMES, type EvictionEvent, type Outbox, type OutboxAppend, type OutboxEntry, type OutboxRecord, type OutboxStats, type PayloadWriter, type Priority } from './outbox.ts';
import { openStore } from './store.ts';

/**
 * The durable outbox on LevelDB (docs/outbox.md). Same contract as MemoryOutbox
 * (test/core/outbox-contract.ts runs against both), plus:
 *
 * - append() resolves only after its record is on disk: appends that arrive together are
 *   written as one LevelDB batch with sync (group commit), so many producers share one fsync,
 *   and under a steady stream at most one fsync per `syncIntervalMs`;
 * - a record is peekable from the moment it joins a batch, before that batch's fsync (the
 *   uplink need not wait for the disk; if the write then fails the hub may get a duplicate);
 * - every record carries a CRC-32; a record that fails it is skipped, deleted and reported
 *   ('corrupt' event), and everything else is still delivered;
 * - the id sequence and the per-class counts/bytes are written in the same atomic batch as
 *   the records, so after kill -9 they agree with what is on disk;
 * - a free-space reserve: when the file system holding the store runs low, the budget
 *   shrinks to what is stored now, so eviction makes room before LevelDB meets ENOSPC
 *   (LevelDB's write error is sticky until reopen).
 *
 * Keys: `r<class><seq as 16 hex digits>` (records sort by class, then age), `m:seq`, `m:stats`.
 * Value: crc32(u32, over the rest) | version u8 | class u8 | ts u48 | topicLen u16 | topic | payload.
 */
const HEADER = 4 + 1 + 1 + 6 + 2;
const VERSION = 1;
const SEQ_KEY = 'm:seq';
/**
 * Ids reserved on disk at a time. A record is shown to peek before its write only when its id
 * is below the reservation already on disk (`m:seq`), so no id a reader may have sent is ever
 * handed out again, after a failed write or a crash; the batch that moves the reservation
 * shows its records once written (one batch in this many ids).
 */
const ID_BLOCK = 100_000n;
/** how many recently deleted ids peek remembers to skip */
const DELETED_MEMORY = 65_536;
/** default bytes (topic + payload) of stored records also kept in memory, see `tail` */
const TAIL_BYTES = 16 * 1024 * 1024;
const STATS_KEY = 'm:stats';

export interface LevelOutboxOptions {
  /** byte budget (topic + payload bytes of stored records); default 256 MiB */
  maxBytes?: number;
  /** keep at least this much free on the store's file system; default 64 MiB (0 disables) */
  minFreeBytes?: number;
  now?: () => number;
  /** free bytes of the store's file system; injectable for tests */
  freeBytes?: (dir: string) => number;
  /**
   * bytes (topic + payload) of the newest stored records also kept in memory, so peek and
   * ack do not read back what was just written; default 16 MiB, 0 disables
   */
  tailBytes?: number;
  /**
   * least time between the starts of two synced writes, ms: appends that arrive meanwhile
   * share the next fsync (their append resolves up to this much later). Bounds the fsyncs a
   * second under a steady stream of appends (flash wear, CPU). Default 0: write at once.
   */
  syncIntervalMs?: number;
}

interface Persisted {
  count: [number, number, number];
  bytes: [number, number, number];
  evicted: number;
  corrupt: number;
}

type Op =
  // input: null once encoded (its payload function may hold what the caller built the
  // payload from; the op itself lives until its batch is written)
  | { kind: 'append'; input: OutboxAppend | null; resolve: (r: OutboxRecord) => void; reject: (e: unknown) => void }
  | { kind: 'ack'; ids: readonly string[]; resolve: () => void; reject: (e: unknown) => void }
  | { kind: 'drop'; key: string; bytes: number; resolve: () => void; reject: (e: unknown) => void };

/** A LevelDB batch being assembled by LevelOutbox.prepare, then written by commit. */
interface Batch {
  writes: Array<{ type: 'put'; key: string; value: Buffer } | { type: 'del'; key: string }>;
  put: (k: string, value: Buffer) => void;
  del: (k: string) => void;
  /** the counts and sequence as they will be once the batch is written */
  st: Persisted;
  seq: bigint;
  /** the id reservation this batch writes (`m:seq`): every id below it may have been used */
  reserve: bigint;
  /** records of this batch not shown before the write (their ids were not reserved yet) */
  hidden: number;
  /** carries appends: written with sync */
  sync: boolean;
  ev: EvictionEvent;
  done: Array<() => void>;
  failed: Array<(e: unknown) => void>;
  /** records of this batch per class, oldest first: eviction may have to take them too */
  fresh: Array<Array<{ k: string; bytes: number; id: string }>>;
  /** keys deleted by this batch */
  gone: Set<string>;
  deletedNow: string[];
  written: Array<{ k: string; rec: OutboxRecord; bytes: number }>;
  budget: number;
  /** cursors over stored records, oldest first, for eviction */
  stored: Array<{ list: Array<{ k: string; bytes: number; id: string }>; next: string | null; started: boolean }>;
  appends: number;
}

const key = (cls: number, seq: bigint) => `r${cls}${seq.toString(16).padStart(16, '0')}`;
const recordBytes = (e: OutboxEntry) => e.payload.length + Buffer.byteLength(e.topic);

/**
 * A record's stored form: header, topic, payload, in one allocation. A payload writer
 * (PayloadWriter) writes straight into it, and the record's payload is then that part of the
 * stored form: no Buffer of its own, no copy (core/outbox.ts PayloadWriter says why that matters).
 */
export function encodeRecord(topic: string, priority: number, ts: number, payload: Buffer | PayloadWriter): { value: Buffer; payload: Buffer } {
  const tl = Buffer.byteLength(topic);
  const size = Buffer.isBuffer(payload) ? payload.length : payload.size;
  const buf = Buffer.allocUnsafe(HEADER + tl + size);
  buf[4] = VERSION;
  buf[5] = priority;
  buf.writeUIntBE(ts, 6, 6);
  buf.writeUInt16BE(tl, 12);
  buf.write(topic, HEADER, 'utf8');
  if (Buffer.isBuffer(payload)) payload.copy(buf, HEADER + tl);
  else checkWritten(payload, payload.write(buf, HEADER + tl), HEADER + tl);
  buf.writeUInt32BE(crc32(buf, 4), 0);
  return { value: buf, payload: Buffer.isBuffer(payload) ? payload : buf.subarray(HEADER + tl) };
}

/** Decode a stored value; throws with the reason when it is damaged. */
export function decodeRecord(k: string, buf: Buffer): OutboxRecord {
  if (buf.length < HEADER) throw new Error('shorter than the header');
  if (buf.readUInt32BE(0) !== crc32(buf, 4)) throw new Error('checksum mismatch');
  if (buf[4] !== VERSION) throw new Error(`unknown record version ${buf[4]}`);
  const priority = buf[5]!;
  if (priority > 2 || String(priority) !== k[1]) throw new Error('class does not match its key');
  const tl = buf.readUInt16BE(12);
  if (HEADER + tl > buf.length) throw new Error('topic runs past the end');
  return {
    id: BigInt(`0x${k.slice(2)}`).toString(),
    priority: priority as Priority,
    ts: buf.readUIntBE(6, 6),
    topic: buf.toString('utf8', HEADER, HEADER + tl),
    payload: Buffer.from(buf.subarray(HEADER + tl)),
  };
}

function defaultFreeBytes(dir: string): number {
  const s = statfsSync(dir);
  return s.bavail * s.bsize;
}

export class LevelOutbox extends EventEmitter implements Outbox {
  private readonly queue: Op[] = [];
  private writing = false;
  private closed = false;
  /** ids handed out by peek → where they live, so ack can find them */
  private readonly known = new Map<string, { k: string; bytes: number; cls: number }>();
  /** oldest record time per class (refreshed after writes) */
  private readonly heads: Array<number | null> = [null, null, null];
  private counters = { appended: 0, acked: 0 };
  /**
   * Ids deleted (acked, evicted, dropped) lately. A peek reads from an iterator snapshot, so
   * it can return a record that a concurrent batch is deleting; peek skips these ids, and
   * ack checks that a record still exists before it counts it (no double count, ever).
   */
  private readonly deleted = new Set<string>();
  /**
   * ring buffer of the same ids, oldest first from `deletedNext` (Array.shift is O(n)); it
   * grows to DELETED_MEMORY by push, so an idle agent does not hold a 512 KB array of holes
   */
  private readonly deletedRing: string[] = [];
  private deletedNext = 0;
  /**
   * Lowest stored key per class. Keys only grow (ids are monotonic), so every key below it
   * is deleted: seeking from here skips the tombstones of acked records that LevelDB has
   * not compacted yet, which a seek from the class start would walk again every time.
   */
  private readonly headKey: Array<string | null> = [null, null, null];
  private freeCheckedAt = 0;
  private bytesAtCheck = 0;
  private lowOnDisk = false;
  private readonly maxBytes: number;
  private readonly minFree: number;
  private readonly now: () => number;
  private readonly freeBytes: (dir: string) => number;
  /**
   * Records written by this process and still stored, per class, in key order (ids only
   * grow, and a Map keeps insertion order): a copy in memory of the newest part of each
   * class. Added once their batch is on disk, removed when deleted, and the oldest dropped
   * beyond `tailBytes`. While a class's tail holds as many records as the class has stored
   * (the usual case of a store that keeps up), peek, ack and the oldest-record time are
   * answered from memory; otherwise from disk as before. Durability is unchanged: an append
   * still resolves only after its synced batch.
   */
  private readonly tail: Array<Map<string, { k: string; rec: OutboxRecord; bytes: number }>> = [new Map(), new Map(), new Map()];
  private tailSize = 0;
  /**
   * The new records of the batch being written, per class, in key order: peek returns them
   * after the stored ones while their synced write is in flight, so the uplink does not wait
   * for the fsync before it sends (docs/outbox.md, "sent before durable"). Their appends
   * still resolve only after the write. Moved to the tail once written; gone if it fails.
   */
  private readonly writingNow: Array<Map<string, { k: string; rec: OutboxRecord; bytes: number }>> = [new Map(), new Map(), new Map()];
  private readonly tailMax: number;
  /** `m:seq` as on disk: ids from here on were never shown to a reader */
  private reserved: bigint;
  private readonly syncIntervalMs: number;
  /** batches committed so far (a peek that read LevelDB across a commit reads again) */
  private commits = 0;
  /** performance.now() when the last synced write began */
  private lastSyncAt = -Infinity;
  /** set while a synced batch is held open: prepares what arrived */
  private arrival: (() => void) | null = null;
  /** close() was called: an open batch is written at once */
  private closing = false;

  private constructor(
    private readonly db: Level<string, Buffer>,
    private readonly dir: string,
    private seq: bigint,
    private readonly st: Persisted,
    opts: LevelOutboxOptions,
  ) {
    super();
    this.maxBytes = opts.maxBytes ?? 256 * 1024 * 1024;
    this.minFree = opts.minFreeBytes ?? 64 * 1024 * 1024;
    this.now = opts.now ?? Date.now;
    this.freeBytes = opts.freeBytes ?? defaultFreeBytes;
    this.tailMax = opts.tailBytes ?? TAIL_BYTES;
    this.syncIntervalMs = opts.syncIntervalMs ?? 0;
    this.reserved = seq;
  }

  /** Is every stored record of class `c` in the tail? */
  private inMemory(c: number): boolean {
    return this.tail[c]!.size === this.st.count[c];
  }

  private tailAdd(c: number, k: string, rec: OutboxRecord, bytes: number): void {
    if (this.tailMax <= 0) return;
    this.tail[c]!.set(rec.id, { k, rec, bytes });
    this.tailSize += bytes;
    // over the bound: drop the oldest of the least important class first; that class is
    // then read from disk until what was dropped is acked
    for (let d = 2; d >= 0 && this.tailSize > this.tailMax; d--) {
      const m = this.tail[d]!;
      for (const [id, e] of m) {
        if (this.tailSize <= this.tailMax) break;
        m.delete(id);
        this.tailSize -= e.bytes;
      }
    }
  }

  private tailDelete(id: string): void {
    for (const m of this.tail) {
      const e = m.get(id);
      if (e) {
        m.delete(id);
        this.tailSize -= e.bytes;
        return;
      }
    }
  }

  static async open(dir: string, opts: LevelOutboxOptions = {}): Promise<LevelOutbox> {
    const db = await openStore<Buffer>(dir, 'buffer');
    try {
      const seqBuf = await db.get(SEQ_KEY);
      // a fresh store starts from the clock, so ids stay monotonic even if the store is wiped
      const seq = seqBuf ? BigInt(seqBuf.toString()) : BigInt(Date.now()) * 1000n;
      const statsBuf = await db.get(STATS_KEY);
      const st = statsBuf ? (JSON.parse(statsBuf.toString()) as Persisted) : await LevelOutbox.rebuildStats(db);
      const ob = new LevelOutbox(db, dir, seq, st, opts);
      await ob.refreshHeads();
      return ob;
    } catch (err) {
      await db.close().catch(() => undefined);
      throw new FleetError('FLEET_STORE', `cannot open outbox ${dir}: ${(err as Error).message}`, { cause: err });
    }
  }

  /** Counts from the records themselves (a store written before stats existed, or damaged stats). */
  private static async rebuildStats(db: Level<string, Buffer>): Promise<Persisted> {
    const st: Persisted = { count: [0, 0, 0], bytes: [0, 0, 0], evicted: 0, corrupt: 0 };
    for await (const [k, v] of db.iterator({ gte: 'r', lt: 's' })) {
      const cls = Number(k[1]);
      if (!(cls >= 0 && cls <= 2)) continue;
      st.count[cls]!++;
      st.bytes[cls]! += Math.max(0, v.length - HEADER);
    }
    return st;
  }

  append(input: OutboxAppend): Promise<OutboxRecord> {
    return new Promise((resolve, reject) => this.enqueue({ kind: 'append', input, resolve, reject }));
  }

  ack(ids: readonly string[]): Promise<void> {
    return new Promise((resolve, reject) => this.enqueue({ kind: 'ack', ids, resolve, reject }));
  }

  private enqueue(op: Op): void {
    if (this.closed) {
      op.reject(new FleetError('FLEET_STORE', 'outbox is closed'));
      return;
    }
    this.queue.push(op);
    this.arrival?.();
    if (!this.writing) {
      this.writing = true;
      // let the appends of this turn of the event loop join the same batch
      setImmediate(this.startWriteLoop);
    }
  }

  /**
   * The write loop, started without an awaiter: what it cannot settle through an operation
   * (each batch rejects its own operations) is reported as a 'fault', never an unhandled
   * rejection, which would end the process (the gateway's MCUs and hub link with it).
   */
  private readonly startWriteLoop = (): void => {
    this.writeLoop().catch((err: unknown) => notify(this, 'fault', { op: 'write', reason: (err as Error)?.message ?? String(err) }));
  };

  private async writeLoop(): Promise<void> {
    try {
      while (this.queue.length > 0) await this.writeBatch(this.queue.splice(0, this.queue.length));
    } finally {
      this.writing = false;
      if (this.queue.length > 0 && !this.closed) {
        this.writing = true;
        setImmediate(this.startWriteLoop);
      }
    }
  }

  private budget(): number {
    if (this.minFree <= 0) return this.maxBytes;
    const now = this.now();
    // look again every second, or sooner when much was written since (a fast fill must not
    // overshoot the reserve between two looks)
    if (now - this.freeCheckedAt > 1000 || this.totalBytes() - this.bytesAtCheck > this.minFree / 8) {
      this.freeCheckedAt = now;
      this.bytesAtCheck = this.totalBytes();
      try {
        this.lowOnDisk = this.freeBytes(this.dir) < this.minFree;
      } catch {
        this.lowOnDisk = false;
      }
    }
    // low on disk: hold at what is stored now, so new records must evict old ones
    return this.lowOnDisk ? Math.min(this.maxBytes, this.totalBytes()) : this.maxBytes;
  }

  private totalBytes(): number {
    return this.st.bytes[0] + this.st.bytes[1] + this.st.bytes[2];
  }

  /**
   * One atomic LevelDB batch for a group of operations; appends make it a synced write.
   * Operations join it as they arrive (prepare) until it is written (commit). A synced batch
   * is held open until `syncIntervalMs` after the previous synced write began, so under a
   * steady stream of appends the store makes at most 1000 / syncIntervalMs fsyncs a second,
   * however many producers there are; what arrives meanwhile joins, and its records are
   * peekable as soon as they joined.
   */
  private async writeBatch(ops: Op[]): Promise<void> {
    const b = this.openBatch();
    await this.prepare(b, ops);
    while (b.sync && this.syncIntervalMs > 0 && !this.closing) {
      const wait = this.lastSyncAt + this.syncIntervalMs - performance.now();
      if (wait <= 0) break;
      // what arrived: told by `arrival`, or while a prepare was reading from disk (no one was waiting to be told)
      if (this.queue.length > 0) {
        await this.prepare(b, this.queue.splice(0, this.queue.length));
        continue;
      }
      await new Promise<void>((resolve) => {
        const t = setTimeout(() => {
          this.arrival = null;
          resolve();
        }, Math.ceil(wait));
        // an arrival is prepared at once (with the rest of its turn of the event loop)
        this.arrival = () => {
          this.arrival = null;
          clearTimeout(t);
          setImmediate(resolve);
        };
      });
    }
    await this.commit(b);
  }

  private openBatch(): Batch {
    const writes: Batch['writes'] = [];
    return {
      writes,
      put: (k: string, value: Buffer) => writes.push({ type: 'put', key: k, value }),
      del: (k: string) => writes.push({ type: 'del', key: k }),
      st: { count: [...this.st.count], bytes: [...this.st.bytes], evicted: this.st.evicted, corrupt: this.st.corrupt },
      seq: this.seq,
      reserve: this.reserved,
      hidden: 0,
      sync: false,
      ev: { evicted: 0, bytes: 0, byClass: {} },
      done: [],
      failed: [],
      fresh: [[], [], []],
      gone: new Set(),
      deletedNow: [],
      written: [],
      budget: this.budget(),
      stored: [0, 1, 2].map(() => ({ list: [], next: null, started: false })),
      appends: 0,
    };
  }

  /** Turn operations into writes of batch `b`; new records become peekable, deleted ones hidden. */
  private async prepare(b: Batch, ops: Op[]): Promise<void> {
    const { st, fresh, gone, stored } = b;
    const takeOldest = async (c: number): Promise<{ k: string; bytes: number; id: string } | null> => {
      const cur = stored[c]!;
      for (;;) {
        while (cur.list.length > 0) {
          const v = cur.list.shift()!;
          if (!gone.has(v.k)) return v;
        }
        if (cur.started && cur.next === null) break;
        const page: Array<{ k: string; bytes: number; id: string }> = [];
        const from = cur.started ? { gt: cur.next! } : this.from(c);
        cur.started = true;
        for await (const [k, v] of this.db.iterator({ ...from, lt: `r${c + 1}`, limit: 256 })) {
          page.push({ k, bytes: Math.max(0, v.length - HEADER), id: BigInt(`0x${k.slice(2)}`).toString() });
        }
        cur.next = page.length === 256 ? page[page.length - 1]!.k : null;
        cur.list.push(...page);
      }
      const f = fresh[c]!.find((x) => !gone.has(x.k));
      return f ?? null;
    };

    // a record that would not fit with every record of its own and less important classes gone
    // is refused before anything is evicted: a refused append loses nothing
    const makeRoom = async (size: number, priority: number): Promise<void> => {
      const held = st.bytes[0] + st.bytes[1] + st.bytes[2];
      if (held + size <= b.budget) return;
      let evictable = 0;
      for (let c = priority; c < 3; c++) evictable += st.bytes[c]!;
      if (held - evictable + size > b.budget) {
        throw new FleetError('FLEET_OUTBOX_FULL', `outbox budget of ${b.budget} bytes reached${this.lowOnDisk ? ' (disk low)' : ''}; nothing of lower priority left to evict`);
      }
      while (st.bytes[0] + st.bytes[1] + st.bytes[2] + size > b.budget) {
        let c = 2;
        while (c > priority && st.count[c] === 0) c--;
        const victim = await takeOldest(c);
        if (!victim) throw new FleetError('FLEET_INTERNAL', `outbox counts say class ${c} has records but none was found`);
        remove(victim.k, victim.id, c, victim.bytes);
        this.known.delete(victim.id);
        st.evicted++;
        b.ev.evicted++;
        b.ev.bytes += victim.bytes;
        const name = PRIORITY_NAMES[c as Priority];
        b.ev.byClass[name] = (b.ev.byClass[name] ?? 0) + 1;
      }
    };

    /** a stored (or this batch's) record leaves: deleted in this batch, hidden from peek now */
    const remove = (k: string, id: string, cls: number, bytes: number): void => {
      gone.add(k);
      this.forget(b, id);
      b.del(k);
      st.count[cls]!--;
      st.bytes[cls]! -= bytes;
    };

    let shown = 0;
    for (const op of ops) {
      try {
        if (op.kind === 'append') {
          const input = op.input!;
          op.input = null;
          const id = b.seq.toString();
          const made = typeof input.payload === 'function' ? input.payload(id) : input.payload;
          const ts = this.now();
          const stored = encodeRecord(input.topic, input.priority, ts, made);
          const rec: OutboxRecord = { id, topic: input.topic, payload: stored.payload, priority: input.priority, ts };
          const size = recordBytes(rec);
          if (size > this.maxBytes) throw new FleetError('FLEET_OUTBOX_FULL', `record of ${size} bytes exceeds the outbox budget of ${this.maxBytes}`);
          await makeRoom(size, rec.priority);
          const k = key(rec.priority, b.seq);
          // shown before the write only under an id reserved on disk already (ID_BLOCK)
          const reservedOnDisk = b.seq < this.reserved;
          if (b.seq >= b.reserve) b.reserve = b.seq + ID_BLOCK;
          b.seq++;
          b.put(k, stored.value);
          const w = { k, rec, bytes: size };
          fresh[rec.priority]!.push({ k, bytes: size, id });
          b.written.push(w);
          if (reservedOnDisk) {
            // peekable from now on (after the stored records): the reader need not wait for the fsync
            this.writingNow[rec.priority]!.set(id, w);
            shown++;
          } else b.hidden++;
          st.count[rec.priority]!++;
          st.bytes[rec.priority]! += size;
          b.sync = true;
          b.appends++;
          b.done.push(() => op.resolve(rec));
          b.failed.push(op.reject);
        } else if (op.kind === 'ack') {
          let removed = 0;
          const candidates: string[] = [];
          for (const id of op.ids) {
            if (this.deleted.has(id)) continue;
            // appended by this very batch (peeked, sent and acked while the batch was held
            // open; batches are prepared and written one after the other, so writingNow holds
            // only this one's records): its delete follows its put in the same write
            const w = this.writingNow[0]!.get(id) ?? this.writingNow[1]!.get(id) ?? this.writingNow[2]!.get(id);
            if (w) {
              if (gone.has(w.k)) continue;
              remove(w.k, id, w.rec.priority, w.bytes);
              removed++;
            } else candidates.push(id);
          }
          // only what is still stored counts: the same id may be acked twice (a resend after a stale peek)
          for (const where of await this.locateMany(candidates)) {
            if (gone.has(where.k)) continue;
            remove(where.k, where.id, where.cls, where.bytes);
            removed++;
          }
          b.done.push(() => {
            for (const id of op.ids) this.known.delete(id);
            this.counters.acked += removed;
            op.resolve();
          });
          b.failed.push(op.reject);
        } else {
          if (!gone.has(op.key) && (await this.db.get(op.key)) !== undefined) {
            gone.add(op.key);
            this.forget(b, BigInt(`0x${op.key.slice(2)}`).toString());
            b.del(op.key);
            const cls = Number(op.key[1]);
            st.count[cls] = Math.max(0, st.count[cls]! - 1);
            st.bytes[cls] = Math.max(0, st.bytes[cls]! - op.bytes);
            st.corrupt++;
          }
          b.done.push(op.resolve);
          b.failed.push(op.reject);
        }
      } catch (err) {
        op.reject(err);
      }
    }
    if (shown > 0) notify(this, 'appended');
  }

  /** An id deleted by batch `b`: hidden from peeks from now on (shown again if the write fails). */
  private forget(b: Batch, id: string): void {
    b.deletedNow.push(id);
    this.markDeleted(id);
  }

  /** Write batch `b` (synced if it carries appends), then settle its operations. */
  private async commit(b: Batch): Promise<void> {
    const { st, gone } = b;
    if (b.done.length === 0) {
      // nothing to write (every operation was refused): what they marked deleted is not
      for (const id of b.deletedNow) this.deleted.delete(id);
      return;
    }
    b.put(SEQ_KEY, Buffer.from((b.reserve > b.seq ? b.reserve : b.seq).toString()));
    b.put(STATS_KEY, Buffer.from(JSON.stringify(st)));
    try {
      if (b.sync) this.lastSyncAt = performance.now();
      // sync only when the batch carries appends: an ack lost in a crash means a resend, which the hub drops
      await this.rawBatch(b.writes, b.sync);
    } catch (err) {
      // the ids stay used: a reader may have sent a record under one of them
      this.seq = b.seq;
      for (const w of b.written) this.writingNow[w.rec.priority]!.delete(w.rec.id);
      for (const id of b.deletedNow) this.deleted.delete(id);
      const fe = new FleetError('FLEET_STORE', `outbox write failed: ${(err as Error).message}`, { cause: err });
      for (const reject of b.failed) reject(fe);
      return;
    }
    this.seq = b.seq;
    this.commits++;
    if (b.reserve > this.reserved) this.reserved = b.reserve;
    Object.assign(this.st, st);
    for (const id of b.deletedNow) this.tailDelete(id);
    for (const w of b.written) {
      this.writingNow[w.rec.priority]!.delete(w.rec.id);
      // records appended and evicted in the same batch are not stored
      if (!gone.has(w.k)) this.tailAdd(w.rec.priority, w.k, w.rec, w.bytes);
    }
    for (const fn of b.done) fn();
    this.counters.appended += b.appends;
    if (b.ev.evicted > 0) notify(this, 'evicted', b.ev);
    if (b.hidden > 0) notify(this, 'appended');
    // the batch is stored and its operations settled: a failed read here (a disk read
    // error where the oldest records are not in memory) leaves the heads as they were
    // (the oldest-record age only); the next commit reads them again
    try {
      await this.refreshHeads();
    } catch (err) {
      notify(this, 'fault', { op: 'heads', reason: (err as Error)?.message ?? String(err) });
    }
  }

  /**
   * db.batch without abstract-level's per-operation work. Our keys are strings and our
   * values Buffers, already in the form classic-level's native batch takes, and the store
   * has no hooks, sublevels or 'write' listeners; yet abstract-level clones every operation
   * and looks up its encodings again (measured on a gateway relaying 5,000 MCU readings a
   * second, two operations each: #arrayBatch was 7% of its CPU). The public path is kept
   * for any other store (and while the store is not open, so its errors stay the same).
   */
  private rawBatch(writes: Array<{ type: 'put'; key: string; value: Buffer } | { type: 'del'; key: string }>, sync: boolean): Promise<void> {
    const raw = (this.db as unknown as { _batch?: (ops: unknown[], o: { sync: boolean }) => Promise<void> })._batch;
    if (this.db.status === 'open' && typeof raw === 'function' && this.db.constructor.name === 'ClassicLevel') return raw.call(this.db, writes, { sync });
    return this.db.batch(writes, { sync });
  }

  private markDeleted(id: string): void {
    if (this.deleted.has(id)) return;
    if (this.deletedRing.length < DELETED_MEMORY) {
      this.deletedRing.push(id);
    } else {
      this.deleted.delete(this.deletedRing[this.deletedNext]);
      this.deletedRing[this.deletedNext] = id;
      this.deletedNext = (this.deletedNext + 1) % DELETED_MEMORY;
    }
    this.deleted.add(id);
  }

  /** Where a scan of class `c` starts: its lowest stored key, or the class start. */
  private from(c: number): { gte: string } | { gt: string } {
    const h = this.headKey[c];
    return h ? { gte: h } : { gt: `r${c}` };
  }

  /** The stored records among `ids` (one read for all), with their key, size and class. */
  private async locateMany(ids: readonly string[]): Promise<Array<{ id: string; k: string; bytes: number; cls: number }>> {
    const keys: string[] = [];
    const meta: Array<{ id: string; cls: number }> = [];
    const out: Array<{ id: string; k: string; bytes: number; cls: number }> = [];
    for (const id of ids) {
      if (!/^[0-9]{1,20}$/.test(id)) continue;
      // in the tail means stored: no read needed
      let inTail = false;
      for (let c = 0; c < 3 && !inTail; c++) {
        const e = this.tail[c]!.get(id);
        if (e) {
          out.push({ id, k: e.k, bytes: e.bytes, cls: c });
          inTail = true;
        }
      }
      if (inTail) continue;
      const known = this.known.get(id);
      // a peeked id's class is known; otherwise (ack after a restart) try all three
      for (const cls of known ? [known.cls] : [0, 1, 2]) {
        keys.push(key(cls, BigInt(id)));
        meta.push({ id, cls });
      }
    }
    if (keys.length === 0) return out;
    const values = await this.db.getMany(keys);
    values.forEach((v, i) => {
      if (v !== undefined) out.push({ ...meta[i]!, k: keys[i]!, bytes: Math.max(0, v.length - HEADER) });
    });
    return out;
  }

  private async refreshHeads(): Promise<void> {
    for (let c = 0; c < 3; c++) {
      if (this.st.count[c] === 0) {
        this.heads[c] = null;
        continue;
      }
      if (this.inMemory(c)) {
        const first = this.tail[c]!.values().next().value!;
        this.headKey[c] = first.k;
        this.heads[c] = first.rec.ts;
        continue;
      }
      for await (const [k, v] of this.db.iterator({ ...this.from(c), lt: `r${c + 1}`, limit: 1 })) {
        this.headKey[c] = k;
        this.heads[c] = v.length >= HEADER ? v.readUIntBE(6, 6) : null;
      }
    }
  }

  async peek(max: number, exclude?: ReadonlySet<string>): Promise<OutboxRecord[]> {
    const out: OutboxRecord[] = [];
    for (let c = 0; c < 3 && out.length < max; c++) {
      // A batch that commits while LevelDB is being read is in neither the iterator's snapshot
      // nor writingNow afterwards: its records would come after newer ones (the next batch's,
      // from writingNow). Read again then; after a few tries, take what was read (the next
      // peek brings the rest)
      for (let tries = 0; this.st.count[c] > 0; tries++) {
        const commits = this.commits;
        const mark = out.length;
        // the in-memory tail is read at once, and a commit updates it at once: no race there
        if (!(await this.peekStored(c, max, out, exclude)) || commits === this.commits || tries === 2) break;
        out.length = mark;
      }
      // then the newer ones of the batch being written (an iterator opened as that write
      // landed may have returned some of them already)
      const writing = this.writingNow[c]!;
      if (writing.size === 0 || out.length >= max) continue;
      const had = new Set(out.map((r) => r.id));
      for (const [id, e] of writing) {
        if (out.length >= max) break;
        if (exclude?.has(id) || this.deleted.has(id) || had.has(id)) continue;
        out.push({ ...e.rec });
      }
    }
    return out;
  }

  /** The stored records of class `c` (oldest first) into `out`, up to `max` in all; true if they were read from LevelDB. */
  private async peekStored(c: number, max: number, out: OutboxRecord[], exclude?: ReadonlySet<string>): Promise<boolean> {
    if (this.inMemory(c)) {
      for (const [id, e] of this.tail[c]!) {
        if (out.length >= max) break;
        if (exclude?.has(id) || this.deleted.has(id)) continue;
        // ack finds it in the tail (or, dropped from it meanwhile, tries every class)
        out.push({ ...e.rec });
      }
      return false;
    }
    // Read in pages sized for what is still wanted: records skipped (excluded, deleted by the
    // batch being prepared or held, corrupt) use up a page, and the next one goes on after it.
    // Stopping at the first page would put the held newer records (writingNow) before older
    // stored ones still on disk.
    let from: { gte: string } | { gt: string } = this.from(c);
    for (;;) {
      const limit = max - out.length + (exclude?.size ?? 0);
      let seen = 0;
      let last = '';
      for await (const [k, v] of this.db.iterator({ ...from, lt: `r${c + 1}`, limit })) {
        seen++;
        last = k;
        if (out.length >= max) break;
        const id = BigInt(`0x${k.slice(2)}`).toString();
        if (exclude?.has(id) || this.deleted.has(id)) continue;
        let rec: OutboxRecord;
        try {
          rec = decodeRecord(k, v);
        } catch (err) {
          notify(this, 'corrupt', { key: k, id, reason: (err as Error).message });
          void new Promise<void>((resolve, reject) => this.enqueue({ kind: 'drop', key: k, bytes: Math.max(0, v.length - HEADER), resolve, reject })).catch(() => undefined);
          continue;
        }
        this.known.set(id, { k, bytes: v.length - HEADER, cls: c });
        out.push(rec);
      }
      if (out.length >= max || seen < limit) break;
      from = { gt: last };
    }
    return true;
  }

  stats(): OutboxStats {
    const depthByClass: Record<string, number> = {};
    this.st.count.forEach((n, c) => (depthByClass[PRIORITY_NAMES[c as Priority]] = n));
    const oldest = this.heads.reduce<number | null>((a, h) => (h === null ? a : a === null ? h : Math.min(a, h)), null);
    const depth = this.st.count[0] + this.st.count[1] + this.st.count[2];
    return {
      depth,
      bytes: this.totalBytes(),
      depthByClass,
      oldestAgeMs: depth && oldest !== null ? Math.max(0, this.now() - oldest) : 0,
      evicted: this.st.evicted,
      corrupt: this.st.corrupt,
      ...this.counters,
    };
  }

  async close(): Promise<void> {
    if (this.closed) return;
    // finish what was accepted (an open batch is written at once), then refuse more
    this.closing = true;
    this.arrival?.();
    while (this.writing || this.queue.length > 0) await new Promise((r) => setImmediate(r));
    this.closed = true;
    await this.db.close();
  }
}
