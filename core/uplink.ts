import { EventEmitter } from 'node:events';
import type { MqttClient } from 'mqtt';
import { BATCH_MAGIC, BATCH_VERSION, batchItemSize, countItems, MAX_BATCH_ITEMS, writeVarint } from './batch.ts';
import type { Logger } from './log.ts';
import type { Outbox, OutboxRecord } from './outbox.ts';
import { deviceTopic } from './topics.ts';

export interface UplinkOptions {
  client: MqttClient;
  outbox: Outbox;
  log: Logger;
  /** the sending device: batches go to fleet/v1/d/{deviceId}/batch */
  deviceId: string;
  /** most publishes (single records or batches) awaiting PUBACK at once; default 16 */
  window?: number;
  /** most records in one batch publish; 1 disables batching; default 256 */
  batchMax?: number;
  /** most bytes in one batch publish; default 128 KiB */
  batchBytes?: number;
  /** longest a record waits for others to share its publish, ms; default 20 */
  batchDelayMs?: number;
  /** records per second sent at most (token bucket, burst = one full batch); 0 = unlimited; default 2000 */
  rate?: number;
  now?: () => number;
}

export interface UplinkStats {
  connected: boolean;
  /** records awaiting PUBACK */
  inFlight: number;
  /** records the hub acknowledged whose outbox ack is not applied yet */
  awaitingAck: number;
  /** publishes awaiting PUBACK (at most `window`) */
  inFlightPublishes: number;
  sentRecords: number;
  publishes: number;
  batches: number;
}

/**
 * Sends the outbox to the hub (docs/outbox.md): QoS 1, a bounded window of publishes in
 * flight, small records batched into one publish (by count, bytes and time), a record
 * acked in the outbox only after the PUBACK of the publish that carried it
 * (at-least-once; the hub drops duplicates by mid), and a token-bucket rate so that a
 * thousand devices reconnecting at once drain their backlogs without flattening the hub.
 * Only pumps while connected, so nothing piles up in the MQTT client's memory.
 */
export class Uplink extends EventEmitter {
  /** ids of records in flight, for peek to skip */
  private readonly inflightIds = new Set<string>();
  /**
   * ids of records the hub acknowledged whose outbox ack is not applied yet (it can wait for
   * the next fsync): peek skips them too, and unlike those in flight they are not released
   * when the connection closes, so a reconnect does not send them again
   */
  private readonly acking = new Set<string>();
  /** what peek skips: in flight or being acked */
  private readonly skip = ((u: Uplink) =>
    ({
      has: (id: string): boolean => u.inflightIds.has(id) || u.acking.has(id),
      get size(): number {
        return u.inflightIds.size + u.acking.size;
      },
    }) as unknown as ReadonlySet<string>)(this);
  private inflightPublishes = 0;
  private pumping = false;
  /** a kick arrived while pumping: the pump's last peek may predate a new record */
  private again = false;
  private stopped = false;
  private timer: NodeJS.Timeout | null = null;
  private tokens: number;
  private tokensAt: number;
  private readonly o: Required<Omit<UplinkOptions, 'client' | 'outbox' | 'log' | 'deviceId'>>;
  private readonly batchTopic: string;
  private readonly counters = { sentRecords: 0, publishes: 0, batches: 0 };
  /**
   * Bumped when the connection closes. What was in flight then is released at once (it
   * stays in the outbox and goes again after the reconnect): mqtt.js may never call back for
   * a QoS 1 publish it had in flight on a closed clean session, and a window that waits for
   * those callbacks stays full forever. A late callback from an older connection still acks
   * (acks are idempotent) but no longer touches the window.
   */
  private gen = 0;

  constructor(private readonly opts: UplinkOptions) {
    super();
    this.o = {
      window: opts.window ?? 16,
      batchMax: opts.batchMax ?? 256,
      batchBytes: opts.batchBytes ?? 128 * 1024,
      batchDelayMs: opts.batchDelayMs ?? 20,
      rate: opts.rate ?? 2000,
      now: opts.now ?? Date.now,
    };
    this.batchTopic = deviceTopic(opts.deviceId, 'batch');
    this.tokens = this.burst();
    this.tokensAt = this.o.now();
    opts.client.on('connect', this.kick);
    opts.client.on('close', this.onClose);
    opts.outbox.on('appended', this.kick);
  }

  private onClose = (): void => {
    this.gen++;
    this.inflightIds.clear();
    this.inflightPublishes = 0;
  };

  get connected(): boolean {
    return this.opts.client.connected;
  }

  get inFlight(): number {
    return this.inflightIds.size;
  }

  stats(): UplinkStats {
    return { connected: this.connected, inFlight: this.inflightIds.size, awaitingAck: this.acking.size, inFlightPublishes: this.inflightPublishes, ...this.counters };
  }

  private burst(): number {
    return Math.max(this.o.batchMax, 1);
  }

  private refill(): void {
    if (this.o.rate <= 0) return;
    const now = this.o.now();
    this.tokens = Math.min(this.burst(), this.tokens + ((now - this.tokensAt) * this.o.rate) / 1000);
    this.tokensAt = now;
  }

  private kick = (): void => {
    void this.pump();
  };

  private wakeIn(ms: number): void {
    if (this.timer || this.stopped) return;
    this.timer = setTimeout(() => {
      this.timer = null;
      this.kick();
    }, Math.max(1, Math.ceil(ms)));
  }

  private async pump(): Promise<void> {
    if (this.stopped) return;
    if (this.pumping) {
      this.again = true;
      return;
    }
    this.pumping = true;
    try {
      this.again = false;
      while (!this.stopped && this.opts.client.connected && this.inflightPublishes < this.o.window) {
        this.refill();
        const allowance = this.o.rate > 0 ? Math.floor(this.tokens) : this.o.batchMax;
        if (allowance < 1) {
          this.wakeIn(((1 - this.tokens) * 1000) / this.o.rate);
          break;
        }
        const recs = await this.opts.outbox.peek(Math.min(this.o.batchMax, allowance), this.skip);
        if (recs.length === 0) {
          // an append (or ack) during that peek may not be in its result: look once more
          if (!this.again) break;
          this.again = false;
          continue;
        }
        // a lone record waits up to batchDelayMs for company, counted from its append
        if (recs.length < this.o.batchMax && this.o.batchMax > 1 && allowance >= this.o.batchMax) {
          const wait = Math.min(...recs.map((r) => r.ts)) + this.o.batchDelayMs - this.o.now();
          if (wait > 0) {
            this.wakeIn(wait);
            break;
          }
        }
        this.send(this.fitBytes(recs));
      }
    } catch (err) {
      this.opts.log.error('uplink pump failed', { err });
    } finally {
      this.pumping = false;
    }
  }

  /**
   * Records on the sender's own batch topic are batches already (a gateway stores the
   * telemetry of many MCUs as one record): their items are carried over into the publish
   * as they are, never nested (the hub refuses a batch inside a batch).
   */
  private isBatch(r: OutboxRecord): boolean {
    return r.topic === this.batchTopic && r.payload.length >= 2 && r.payload[0] === BATCH_MAGIC && r.payload[1] === BATCH_VERSION;
  }

  /** The longest prefix that fits batchBytes and the hub's item limit (always at least one record). */
  private fitBytes(recs: OutboxRecord[]): OutboxRecord[] {
    let size = 2;
    let items = 0;
    let n = 0;
    for (const r of recs) {
      const batch = this.isBatch(r);
      size += batch ? r.payload.length - 2 : batchItemSize(r.topic, r.payload);
      items += batch ? countItems(r.payload) : 1;
      if (n > 0 && (size > this.o.batchBytes || items > MAX_BATCH_ITEMS)) break;
      n++;
    }
    return recs.slice(0, n);
  }

  /** One batch payload for several records: plain records become items, batch records give theirs. */
  private encode(recs: readonly OutboxRecord[]): Buffer {
    let size = 2;
    for (const r of recs) size += this.isBatch(r) ? r.payload.length - 2 : batchItemSize(r.topic, r.payload);
    const buf = Buffer.allocUnsafe(size);
    buf[0] = BATCH_MAGIC;
    buf[1] = BATCH_VERSION;
    let off = 2;
    for (const r of recs) {
      if (this.isBatch(r)) {
        off += r.payload.copy(buf, off, 2);
        continue;
      }
      off = writeVarint(buf, off, Buffer.byteLength(r.topic));
      off += buf.write(r.topic, off, 'utf8');
      off = writeVarint(buf, off, r.payload.length);
      off += r.payload.copy(buf, off);
    }
    return buf;
  }

  private send(recs: OutboxRecord[]): void {
    const ids = recs.map((r) => r.id);
    const gen = this.gen;
    for (const id of ids) this.inflightIds.add(id);
    this.inflightPublishes++;
    // the rate counts messages: a batch record counts its items
    if (this.o.rate > 0) this.tokens -= recs.reduce((n, r) => n + (this.isBatch(r) ? countItems(r.payload, false) : 1), 0);
    const single = recs.length === 1;
    const topic = single ? recs[0]!.topic : this.batchTopic;
    const payload = single ? recs[0]!.payload : this.encode(recs);
    this.opts.client.publish(topic, payload, { qos: 1 }, (err) => {
      if (err) {
        // stays in the outbox; sent again after reconnect
        this.release(ids, gen);
        return;
      }
      // the hub has it: its place in the window is free now, not once the outbox applied the
      // ack (with outbox.syncIntervalMs that waits for the next fsync, and a window held by
      // acks in waiting stalled the sending); its ids move to `acking`, so no peek returns
      // them again, even after a reconnect, until the ack is applied
      this.release(ids, gen);
      for (const id of ids) this.acking.add(id);
      this.opts.outbox.ack(ids).then(
        () => {
          for (const id of ids) this.acking.delete(id);
          this.counters.sentRecords += ids.length;
          this.counters.publishes++;
          if (!single) this.counters.batches++;
          this.emit('sent', ids.length);
        },
        (e: unknown) => {
          // still stored: sendable again (the hub drops the copy by its mid)
          for (const id of ids) this.acking.delete(id);
          this.opts.log.error('outbox ack failed', { err: e });
          this.kick();
        },
      );
      this.kick();
    });
  }

  private release(ids: string[], gen: number): void {
    if (gen !== this.gen) return; // released when its connection closed
    for (const id of ids) this.inflightIds.delete(id);
    this.inflightPublishes--;
  }

  stop(): void {
    this.stopped = true;
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    this.opts.client.off('connect', this.kick);
    this.opts.client.off('close', this.onClose);
    this.opts.outbox.off('appended', this.kick);
  }
}
