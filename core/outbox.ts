import { EventEmitter } from 'node:events';
import { FleetError } from './errors.ts';

/**
 * The outbox: everything a device or gateway sends upstream is appended here first
 * and removed only when the hub acknowledged it (at-least-once). This file holds the
 * interface every backend implements and the in-memory backend; the durable LevelDB
 * backend implements the same interface and must pass the same contract suite
 * (test/core/outbox-contract.ts).
 *
 * Priority classes, most important first. Eviction under the byte budget removes the
 * oldest record of the least important class present; ALERT is never evicted while a
 * record of another class remains.
 */
export const Priority = { ALERT: 0, TELEMETRY: 1, LOG: 2 } as const;
export type Priority = (typeof Priority)[keyof typeof Priority];
/**
 * Emit an outbox event without letting a listener's throw leave the store half way through
 * an operation (a batch written but not settled, records evicted but the new one not added):
 * the error is rethrown on the next tick, where it is an uncaught exception like any other.
 */
export function notify(em: EventEmitter, event: string, ...args: unknown[]): void {
  try {
    em.emit(event, ...args);
  } catch (err) {
    process.nextTick(() => {
      throw err;
    });
  }
}

export const PRIORITY_NAMES: Record<Priority, string> = { 0: 'alert', 1: 'telemetry', 2: 'log' };

export interface OutboxEntry {
  topic: string;
  payload: Buffer;
  priority: Priority;
}

/**
 * A payload the store writes straight into its own buffer for the record: `size` bytes that
 * `write` puts at `offset` of `buf`. It saves the payload a Buffer of its own and the copy
 * into the stored form. That matters at thousands of records a second: a Buffer (or the 8 KiB
 * pool a small one is cut from) that outlives the young generation is kept until V8's next
 * full collection and counts towards starting it (measured: docs/outbox.md, "Memory").
 */
export interface PayloadWriter {
  readonly size: number;
  /** writes the payload at `offset`; returns where it ended (offset + size, or the store refuses the record) */
  write(buf: Buffer, offset: number): number;
}

/** What callers append: the payload may be built from the id the outbox assigns (to embed it as `mid`). */
export interface OutboxAppend {
  topic: string;
  payload: Buffer | ((id: string) => Buffer | PayloadWriter);
  priority: Priority;
}

/** The payload of an append as a Buffer (a writer writes into a new one). */
export function payloadOf(input: OutboxAppend, id: string): Buffer {
  const p = typeof input.payload === 'function' ? input.payload(id) : input.payload;
  if (Buffer.isBuffer(p)) return p;
  const buf = Buffer.allocUnsafe(p.size);
  checkWritten(p, p.write(buf, 0), 0);
  return buf;
}

/** A writer that wrote other than its `size` left unwritten (allocUnsafe: old memory) or cut bytes: refused. */
export function checkWritten(p: PayloadWriter, end: number, offset: number): void {
  if (end !== offset + p.size) throw new FleetError('FLEET_STORE', `payload writer wrote ${end - offset} bytes, announced ${p.size}`);
}

export interface OutboxRecord extends OutboxEntry {
  /** message id: decimal, unique per outbox and monotonic in append order */
  id: string;
  /** append time, ms since epoch */
  ts: number;
}

export interface OutboxStats {
  depth: number;
  bytes: number;
  depthByClass: Record<string, number>;
  /** age in ms of the oldest record, 0 when empty */
  oldestAgeMs: number;
  evicted: number;
  /** records found damaged on disk, skipped and deleted (durable backends) */
  corrupt?: number;
  appended: number;
  acked: number;
}

export interface EvictionEvent {
  evicted: number;
  bytes: number;
  byClass: Record<string, number>;
}

export interface Outbox {
  /** Append; resolves once the record is stored (durably, for durable backends). */
  append(entry: OutboxAppend): Promise<OutboxRecord>;
  /** Up to `max` records, most important class first, oldest first within a class, skipping `exclude`. */
  peek(max: number, exclude?: ReadonlySet<string>): Promise<OutboxRecord[]>;
  /** Remove records by id (after the hub acknowledged them). Unknown ids are ignored. */
  ack(ids: readonly string[]): Promise<void>;
  stats(): OutboxStats;
  close(): Promise<void>;
  /**
   * 'evicted' (EvictionEvent) when the byte budget forced records out; 'appended' when new
   * records can be peeked (a durable backend may show them before their write ends: peek can
   * return a record whose append has not resolved yet, docs/outbox.md); 'corrupt' ({key, id,
   * reason}) when a damaged record was skipped; 'fault' ({op, reason}) when a read the store
   * does for itself failed (the disk): nothing stored is lost, and the next write tries again.
   */
  on(event: 'evicted', fn: (e: EvictionEvent) => void): this;
  on(event: 'appended', fn: () => void): this;
  on(event: 'corrupt', fn: (e: { key: string; id: string; reason: string }) => void): this;
  on(event: 'fault', fn: (e: { op: string; reason: string }) => void): this;
  off(event: 'evicted' | 'appended' | 'corrupt' | 'fault', fn: (...args: any[]) => void): this; // eslint-disable-line @typescript-eslint/no-explicit-any
}

export interface MemoryOutboxOptions {
  /** byte budget for payload+topic bytes; default 64 MiB */
  maxBytes?: number;
  /** first id; default Date.now()*1000 so ids stay monotonic across restarts of an in-memory outbox */
  firstId?: number;
  now?: () => number;
}

const recordBytes = (e: OutboxEntry) => e.payload.length + Buffer.byteLength(e.topic);

/** In-memory backend: for tests and for parts that choose not to persist. Loses everything on exit. */
export class MemoryOutbox extends EventEmitter implements Outbox {
  private readonly classes: OutboxRecord[][] = [[], [], []];
  private readonly maxBytes: number;
  private readonly now: () => number;
  private nextId: number;
  private bytes = 0;
  /** bytes held per class: whether a record fits is known before anything is evicted */
  private readonly classBytes = [0, 0, 0];
  private counters = { evicted: 0, appended: 0, acked: 0 };
  private closed = false;

  constructor(opts: MemoryOutboxOptions = {}) {
    super();
    this.maxBytes = opts.maxBytes ?? 64 * 1024 * 1024;
    this.now = opts.now ?? Date.now;
    this.nextId = opts.firstId ?? Date.now() * 1000;
  }

  async append(input: OutboxAppend): Promise<OutboxRecord> {
    if (this.closed) throw new FleetError('FLEET_STORE', 'outbox is closed');
    const id = String(this.nextId);
    const entry: OutboxEntry = { topic: input.topic, payload: payloadOf(input, id), priority: input.priority };
    const size = recordBytes(entry);
    if (size > this.maxBytes) throw new FleetError('FLEET_OUTBOX_FULL', `record of ${size} bytes exceeds the outbox budget of ${this.maxBytes}`);
    this.makeRoom(size, entry.priority);
    this.nextId++;
    const rec: OutboxRecord = { ...entry, id, ts: this.now() };
    this.classes[entry.priority]!.push(rec);
    this.bytes += size;
    this.classBytes[entry.priority]! += size;
    this.counters.appended++;
    notify(this, 'appended');
    return rec;
  }

  /**
   * Evict oldest records of the least important class until `size` fits. A record that would
   * not fit even with every record of its own and less important classes gone is refused
   * before anything is evicted: a refused append loses nothing.
   */
  private makeRoom(size: number, priority: Priority): void {
    if (this.bytes + size <= this.maxBytes) return;
    let evictable = 0;
    for (let c = priority; c < this.classes.length; c++) evictable += this.classBytes[c]!;
    if (this.bytes - evictable + size > this.maxBytes) {
      throw new FleetError('FLEET_OUTBOX_FULL', `outbox budget of ${this.maxBytes} bytes reached; nothing of lower priority left to evict`);
    }
    const ev: EvictionEvent = { evicted: 0, bytes: 0, byClass: {} };
    while (this.bytes + size > this.maxBytes) {
      // least important non-empty class; a record never evicts a more important class
      let c = 2;
      while (this.classes[c]!.length === 0) c--;
      const victim = this.classes[c]!.shift()!;
      const b = recordBytes(victim);
      this.bytes -= b;
      this.classBytes[c]! -= b;
      ev.evicted++;
      ev.bytes += b;
      const name = PRIORITY_NAMES[c as Priority];
      ev.byClass[name] = (ev.byClass[name] ?? 0) + 1;
    }
    this.counters.evicted += ev.evicted;
    notify(this, 'evicted', ev);
  }

  async peek(max: number, exclude?: ReadonlySet<string>): Promise<OutboxRecord[]> {
    const out: OutboxRecord[] = [];
    for (const cls of this.classes) {
      for (const rec of cls) {
        if (out.length >= max) return out;
        if (!exclude?.has(rec.id)) out.push(rec);
      }
    }
    return out;
  }

  async ack(ids: readonly string[]): Promise<void> {
    const set = new Set(ids);
    for (let c = 0; c < this.classes.length; c++) {
      const kept: OutboxRecord[] = [];
      for (const rec of this.classes[c]!) {
        if (set.has(rec.id)) {
          const b = recordBytes(rec);
          this.bytes -= b;
          this.classBytes[c]! -= b;
          this.counters.acked++;
        } else kept.push(rec);
      }
      this.classes[c] = kept;
    }
  }

  stats(): OutboxStats {
    let oldest = Infinity;
    const depthByClass: Record<string, number> = {};
    let depth = 0;
    this.classes.forEach((cls, c) => {
      depthByClass[PRIORITY_NAMES[c as Priority]] = cls.length;
      depth += cls.length;
      if (cls[0] && cls[0].ts < oldest) oldest = cls[0].ts;
    });
    return { depth, bytes: this.bytes, depthByClass, oldestAgeMs: depth ? Math.max(0, this.now() - oldest) : 0, ...this.counters };
  }

  async close(): Promise<void> {
    this.closed = true;
  }
}
