import { EventEmitter } from 'node:events';
import type { Level } from 'level';
import type { CommandReply, DesiredState, EventMessage, Sample, StateMessage, TelemetryBatch } from '../core/messages.ts';
import type { ScannedTelemetry } from './telemetry-fast.ts';

/**
 * The fleet registry: what the hub knows of every device. Kept in memory, written
 * through to LevelDB so it survives a hub restart. Devices that were online when the
 * hub stopped come back as offline ("hub restarted") until they reconnect and say so.
 */
export interface DeviceRecord {
  id: string;
  kind: StateMessage['kind'];
  online: boolean;
  /** last time the hub heard anything from or about the device, ms */
  lastSeen: number;
  /** when `online` last changed, ms */
  since: number;
  version?: string;
  via?: string;
  reason?: string;
  telemetryBatches: number;
  samples: number;
  duplicates: number;
  /** last value of each metric */
  latest: Record<string, { v?: number; vs?: string; vb?: boolean; u?: string; t: number }>;
  desired?: DesiredState;
  events: number;
  lastReplies: CommandReply[];
  /** it connected to the hub itself (an agent or gateway), so it is never an MCU */
  direct?: boolean;
}

const MAX_LATEST = 256;

/**
 * A sample without its name, keys in the schema's order (as decoded samples have them). Spelled
 * out: an object rest (`const { n, ...rest } = s`) per reading was 4.7% of a CPU profile of the
 * hub at 10,000 MCU readings a second, and is about 5x slower than this.
 */
function latestOf(s: Sample): DeviceRecord['latest'][string] {
  const o: Partial<DeviceRecord['latest'][string]> = {};
  if (s.v !== undefined) o.v = s.v;
  if (s.vs !== undefined) o.vs = s.vs;
  if (s.vb !== undefined) o.vb = s.vb;
  if (s.u !== undefined) o.u = s.u;
  o.t = s.t;
  return o as DeviceRecord['latest'][string];
}

/**
 * Store `s` as the latest value of its metric. The entry of the previous reading is updated
 * in place when it has the same fields (a sensor reports the same kind of value each time):
 * a new object per sample lived until the device's next reading, about a second, long
 * enough to survive the young generation's collections and be copied into the old one, so at
 * thousands of readings a second it was a steady share of the hub's garbage-collection time.
 */
function setLatest(latest: DeviceRecord['latest'], s: Sample): void {
  // own properties only: a metric named "__proto__" or "constructor" must not reach (and
  // update) Object.prototype or Object through the prototype chain
  const prev = Object.hasOwn(latest, s.n) ? latest[s.n] : undefined;
  if (prev !== undefined && (prev.v === undefined) === (s.v === undefined) && (prev.vs === undefined) === (s.vs === undefined) && (prev.vb === undefined) === (s.vb === undefined) && (prev.u === undefined) === (s.u === undefined)) {
    if (s.v !== undefined) prev.v = s.v;
    if (s.vs !== undefined) prev.vs = s.vs;
    if (s.vb !== undefined) prev.vb = s.vb;
    if (s.u !== undefined && prev.u !== s.u) prev.u = s.u;
    prev.t = s.t;
    return;
  }
  // defined, not assigned: assigning to "__proto__" would replace the object's prototype
  Object.defineProperty(latest, s.n, { value: latestOf(s), writable: true, enumerable: true, configurable: true });
}

const MAX_REPLIES = 20;
/** how long a change of state, desired state or replies may wait to be written, ms */
const FLUSH_MS = 500;
/**
 * ... and one that only counts traffic (last seen, latest values, counters). At 10,000 MCUs
 * sending once a second, writing those every 500 ms was 20,000 JSON records a second and a
 * tenth of the hub's CPU; a hub killed with -9 loses at most this much of them (the device
 * keeps sending; the next message sets them again).
 */
const TRAFFIC_FLUSH_MS = 30_000;
/** device records serialized and written per batch in a flush (about 2–5 ms of the event loop each) */
const FLUSH_CHUNK = 500;
/**
 * The traffic flush's chunks are spread over up to half of TRAFFIC_FLUSH_MS (the time left
 * shared evenly among the chunks left), at most this far apart: 10,000 records written back
 * to back every 30 s (~5 MB into LevelDB, then its compaction) came with a latency burst at
 * every hop of the 10,000-MCU bench; spread, the same writes are a steady trickle.
 */
const TRAFFIC_CHUNK_GAP_MAX_MS = 1000;

export class Registry extends EventEmitter {
  private readonly devices = new Map<string, DeviceRecord>();
  /** records with a change of state, desired state or replies: written within FLUSH_MS */
  private readonly dirty = new Set<string>();
  /** records whose traffic counters changed only: written within TRAFFIC_FLUSH_MS */
  private readonly trafficDirty = new Set<string>();
  /** traffic-only records taken by the traffic flush, written a chunk at a time (pace) */
  private readonly trafficQueue = new Set<string>();
  private pacing = false;
  /** a chunk write failed: told to the hub (logged); the records are written again later */
  onFlushError: ((err: unknown) => void) | null = null;
  private flushTimer: NodeJS.Timeout | undefined;
  private trafficTimer: NodeJS.Timeout | undefined;
  /** the last flush started (flushes run one after another) */
  private flushing: Promise<void> = Promise.resolve();

  constructor(
    private readonly db: Level<string, string>,
    /** TRAFFIC_FLUSH_MS; shorter in tests */
    private readonly trafficFlushMs = TRAFFIC_FLUSH_MS,
  ) {
    super();
  }

  async load(): Promise<void> {
    const now = Date.now();
    for await (const [id, json] of this.db.iterator()) {
      const rec = JSON.parse(json) as DeviceRecord;
      if (rec.online) Object.assign(rec, { online: false, since: now, reason: 'hub restarted' });
      this.devices.set(id, rec);
    }
  }

  private record(id: string, kind: StateMessage['kind'] = 'agent'): DeviceRecord {
    let rec = this.devices.get(id);
    if (!rec) {
      rec = { id, kind, online: false, lastSeen: 0, since: Date.now(), telemetryBatches: 0, samples: 0, duplicates: 0, latest: {}, events: 0, lastReplies: [] };
      this.devices.set(id, rec);
    }
    return rec;
  }

  /**
   * Mark `rec` to be written within FLUSH_MS, or TRAFFIC_FLUSH_MS when only its traffic
   * counters changed. The quick flush writes only what needs it (MCUs coming online while
   * others send would otherwise rewrite every busy record twice a second).
   */
  private touch(rec: DeviceRecord, traffic = false): void {
    if (traffic) {
      if (this.dirty.has(rec.id)) return;
      this.trafficDirty.add(rec.id);
      this.trafficTimer ??= setTimeout(this.flushTraffic, this.trafficFlushMs);
      return;
    }
    this.trafficDirty.delete(rec.id);
    this.dirty.add(rec.id);
    this.flushTimer ??= setTimeout(() => void this.flush(false), FLUSH_MS);
  }

  /** `id` authenticated at the hub itself: remembered (written), so no gateway can claim it as an MCU. */
  markDirect(id: string): void {
    const rec = this.record(id);
    if (rec.direct) return;
    rec.direct = true;
    this.touch(rec);
  }

  /** The broker dropped a duplicate for this device (counted only for devices known here). */
  countDuplicate(id: string): void {
    const rec = this.devices.get(id);
    if (!rec) return;
    rec.duplicates++;
    this.touch(rec, true);
  }

  onState(id: string, msg: StateMessage): void {
    const rec = this.record(id, msg.kind);
    const changed = rec.online !== msg.online;
    rec.kind = msg.kind;
    rec.online = msg.online;
    rec.lastSeen = Date.now();
    if (changed) rec.since = rec.lastSeen;
    if (msg.version !== undefined) rec.version = msg.version;
    if (msg.via !== undefined) rec.via = msg.via;
    if (msg.reason !== undefined) rec.reason = msg.reason;
    else delete rec.reason;
    this.touch(rec);
    if (changed) this.emit('state', rec);
    // MCUs reached only through this gateway cannot be online while it is not; the gateway
    // reports them online again when it is back (gateway/relay.ts onConnect)
    if (msg.kind === 'gateway' && !msg.online) {
      for (const d of this.devices.values()) {
        if (d.kind !== 'mcu' || d.via !== id || !d.online) continue;
        d.online = false;
        d.since = rec.lastSeen;
        d.reason = 'gateway offline';
        this.touch(d);
        this.emit('state', d);
      }
    }
  }

  onTelemetry(id: string, msg: TelemetryBatch): void {
    this.applyTelemetry(id, msg.samples, msg.samples.length);
    this.emit('telemetry', id, msg);
  }

  /**
   * onTelemetry for a message read by scanTelemetry (hub/telemetry-fast.ts): its sample
   * objects are reused for the next message, so setLatest copies what it keeps, and the
   * 'telemetry' event, when someone listens, gets a copy of the message.
   */
  onTelemetryScanned(id: string, msg: ScannedTelemetry): void {
    this.applyTelemetry(id, msg.samples, msg.count);
    if (this.listenerCount('telemetry') > 0) this.emit('telemetry', id, msg.toBatch());
  }

  private applyTelemetry(id: string, samples: readonly Sample[], count: number): void {
    const rec = this.record(id);
    rec.lastSeen = Date.now();
    rec.telemetryBatches++;
    rec.samples += count;
    for (let i = 0; i < count; i++) {
      const s = samples[i]!;
      if (!Object.hasOwn(rec.latest, s.n) && Object.keys(rec.latest).length >= MAX_LATEST) continue;
      setLatest(rec.latest, s);
    }
    this.touch(rec, true);
  }

  onEvent(id: string, msg: EventMessage): void {
    const rec = this.record(id);
    rec.lastSeen = Date.now();
    rec.events++;
    this.touch(rec, true);
    this.emit('event', id, msg);
  }

  onReply(id: string, msg: CommandReply): void {
    const rec = this.record(id);
    rec.lastReplies = [msg, ...rec.lastReplies].slice(0, MAX_REPLIES);
    this.touch(rec);
  }

  setDesired(id: string, desired: DesiredState): void {
    const rec = this.record(id);
    rec.desired = desired;
    this.touch(rec);
  }

  get(id: string): DeviceRecord | undefined {
    return this.devices.get(id);
  }

  list(): DeviceRecord[] {
    return [...this.devices.values()].sort((a, b) => a.id.localeCompare(b.id));
  }

  counts(): { total: number; online: number; byKind: Record<string, number> } {
    let online = 0;
    const byKind: Record<string, number> = {};
    for (const d of this.devices.values()) {
      if (d.online) online++;
      byKind[d.kind] = (byKind[d.kind] ?? 0) + 1;
    }
    return { total: this.devices.size, online, byKind };
  }

  /**
   * Write the changed records: all of them, or (`all` false) those with more than traffic
   * changed. Flushes run one
   * after another: one written in chunks yields to the event loop, and a flush started
   * meanwhile (the hub stopping, then closing the database) must not overtake it.
   */
  flush(all = true): Promise<void> {
    return this.inTurn(() => this.flushNow(all));
  }

  /** Run `write` after every write before it (a failed one does not stop the next). */
  private inTurn(write: () => Promise<void>): Promise<void> {
    const run = this.flushing.then(write);
    this.flushing = run.catch(() => undefined);
    return run;
  }

  /**
   * The traffic timer: the records that only counted traffic are written a chunk at a time,
   * spread out (TRAFFIC_CHUNK_GAP_MAX_MS), each chunk in turn with the other flushes (a state
   * change waits for one chunk at most, not for all of them). flush(true) writes what is
   * still queued at once.
   */
  private readonly flushTraffic = (): void => {
    this.trafficTimer = undefined;
    for (const id of this.trafficDirty) this.trafficQueue.add(id);
    this.trafficDirty.clear();
    if (!this.pacing) void this.pace();
  };

  private async pace(): Promise<void> {
    this.pacing = true;
    // the chunks end within half the interval: the time left is shared among the chunks left
    const deadline = performance.now() + this.trafficFlushMs / 2;
    try {
      while (this.trafficQueue.size > 0) {
        const chunk: string[] = [];
        for (const id of this.trafficQueue) {
          chunk.push(id);
          this.trafficQueue.delete(id);
          if (chunk.length === FLUSH_CHUNK) break;
        }
        try {
          await this.inTurn(() => this.write(chunk));
        } catch (err) {
          // written again with the next traffic flush: nothing of them is lost while the hub runs
          for (const id of chunk) this.trafficDirty.add(id);
          this.trafficTimer ??= setTimeout(this.flushTraffic, this.trafficFlushMs);
          this.onFlushError?.(err);
          return;
        }
        const chunksLeft = Math.ceil(this.trafficQueue.size / FLUSH_CHUNK);
        if (chunksLeft > 0) {
          const gap = Math.min(TRAFFIC_CHUNK_GAP_MAX_MS, Math.max(0, Math.floor((deadline - performance.now()) / (chunksLeft + 1))));
          await new Promise((r) => setTimeout(r, gap).unref());
        }
      }
    } finally {
      this.pacing = false;
    }
  }

  /** One batch: the records of `ids` as they are now. */
  private async write(ids: readonly string[]): Promise<void> {
    const ops: Array<{ type: 'put'; key: string; value: string }> = [];
    for (const id of ids) {
      const rec = this.devices.get(id);
      if (rec) ops.push({ type: 'put', key: id, value: JSON.stringify(rec) });
    }
    if (ops.length > 0) await this.db.batch(ops);
  }

  private async flushNow(all: boolean): Promise<void> {
    clearTimeout(this.flushTimer);
    this.flushTimer = undefined;
    let ids = [...this.dirty];
    this.dirty.clear();
    if (all) {
      clearTimeout(this.trafficTimer);
      this.trafficTimer = undefined;
      for (const id of this.trafficDirty) ids.push(id);
      this.trafficDirty.clear();
      // and what the paced traffic flush has not written yet (it finds nothing left)
      for (const id of this.trafficQueue) ids.push(id);
      this.trafficQueue.clear();
      ids = [...new Set(ids)]; // a record can be in the queue and marked again
    }
    // In chunks, each its own batch, yielding to the event loop between them: the traffic
    // flush of 10,000 device records in one go held the hub's loop 45-100 ms (measured),
    // every TRAFFIC_FLUSH_MS, and every message routed meanwhile waited. A record is
    // serialized when its chunk is written, so it is never older than when it was marked.
    for (let i = 0; i < ids.length; i += FLUSH_CHUNK) {
      if (i > 0) await new Promise((r) => setImmediate(r));
      await this.write(ids.slice(i, i + FLUSH_CHUNK));
    }
  }

}
