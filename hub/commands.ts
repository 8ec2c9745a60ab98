import { randomBytes } from 'node:crypto';
import type { Level } from 'level';
import type { Client } from 'aedes';
import { FleetError } from '../core/errors.ts';
import type { Logger } from '../core/log.ts';
import { encodeMessage, type Command, type CommandReply } from '../core/messages.ts';
import type { Counter, MetricsRegistry } from '../core/metrics.ts';
import { parseTopic, RELAY_CMD } from '../core/topics.ts';

/**
 * The hub's command store (docs/topics.md "Command delivery"). Devices connect with clean
 * sessions, so a command published while its device is offline or not yet subscribed
 * reaches no one. Instead every command is stored here (LevelDB, written before the API
 * answers) until the device's reply with its id arrives or it expires, and published:
 *
 *  - at once when the device can receive it (a connection of its own, or of the gateway
 *    that registered it, holds a `cmd` subscription covering it: see DownlinkTracker);
 *  - when it becomes able to (a SUBSCRIBE to its cmd topic or the relay filter, or its
 *    registry state going online, the way MCUs come online through their gateway);
 *  - again while it stays reachable and no reply came, after `resendInitialMs` doubling
 *    up to `resendMaxMs` (a device may have lost it: it acknowledges on receipt, before it
 *    ran anything, and an agent killed in between never replies).
 *
 * Devices de-duplicate by command id, so a repeat never runs a command twice.
 *
 * Status of a command:
 *   pending    stored, not yet handed to a connection of the device (or its gateway)
 *   delivered  handed to such a connection at least once; awaiting the reply
 *   replied    the device's reply arrived (`ok`, `result` or `error` hold it)
 *   expired    `expiresAt` passed with no reply; never sent again
 * A reply that arrives after expiry is still recorded (status `replied`, `expiredAt` kept):
 * it is the device's own word on what happened.
 *
 * Keys in the store ({stateDir}/commands):  c!{deviceId}!{commandId} → CommandRecord JSON.
 * Finished commands (replied, expired) stay as history, at most `maxHistoryPerDevice` per
 * device and for at most `historyMs`.
 */
export type CommandStatus = 'pending' | 'delivered' | 'replied' | 'expired';

export interface CommandRecord {
  id: string;
  deviceId: string;
  name: string;
  args: Record<string, unknown>;
  /** ms since the epoch */
  createdAt: number;
  /** ms since the epoch; the device refuses it after this (FLEET_TIMEOUT) and the hub stops sending */
  expiresAt: number;
  status: CommandStatus;
  /** publishes so far */
  sends: number;
  lastSentAt?: number;
  /** first time it was handed to a connection of the device or its gateway */
  deliveredAt?: number;
  repliedAt?: number;
  ok?: boolean;
  result?: unknown;
  /** set when the result was larger than MAX_RESULT_BYTES and not kept */
  resultTruncated?: boolean;
  error?: { code: string; message: string };
  expiredAt?: number;
}

export interface CommandStoreOptions {
  db: Level<string, string>;
  log: Logger;
  /** publish a command payload on the device's cmd topic (QoS 1, not retained) */
  publish(deviceId: string, payload: Buffer): Promise<void>;
  /** the connection a command for this device would reach now, or undefined */
  route(deviceId: string): object | undefined;
  metrics?: MetricsRegistry;
  /** commands not yet replied or expired, per device; default 100 */
  maxPendingPerDevice?: number;
  /** the same over all devices; default 100,000 */
  maxPending?: number;
  /** finished commands kept for the API, per device; default 50 */
  maxHistoryPerDevice?: number;
  /** finished commands are forgotten after this, ms; default 24 h */
  historyMs?: number;
  /** first re-send after this, ms; doubles per send; default 30 s */
  resendInitialMs?: number;
  /** cap of the re-send interval, ms; default 5 min */
  resendMaxMs?: number;
  /** how often expiry and re-sends are checked, ms; default 1 s */
  tickMs?: number;
  now?: () => number;
}

const MAX_RESULT_BYTES = 16 * 1024;
const HISTORY_PRUNE_EVERY_MS = 60_000;
const UNSENT_SCAN_MS = 10_000;

export class CommandStore {
  /** every command known, per device, oldest first */
  private readonly byDevice = new Map<string, CommandRecord[]>();
  private readonly byId = new Map<string, CommandRecord>();
  /** pending and delivered ones, in creation order */
  private readonly open = new Set<CommandRecord>();
  private readonly openPerDevice = new Map<string, number>();
  /** in memory only: when the next re-send is due and over which connection it went last */
  private readonly next = new WeakMap<CommandRecord, { at: number; via: object | undefined }>();
  private readonly sending = new Set<CommandRecord>();
  /** writes go in call order (two puts of one key must not be reordered) */
  private writes: Promise<unknown> = Promise.resolve();
  private seq = 0;
  private lastHistoryPrune = 0;
  private lastUnsentScan = 0;
  private readonly timer: NodeJS.Timeout;
  private closed = false;
  private readonly now: () => number;
  private readonly o: Required<Omit<CommandStoreOptions, 'metrics' | 'now'>>;
  private readonly counted: Counter | undefined;
  private readonly publishes: Counter | undefined;

  private constructor(opts: CommandStoreOptions) {
    this.now = opts.now ?? Date.now;
    this.o = {
      maxPendingPerDevice: 100,
      maxPending: 100_000,
      maxHistoryPerDevice: 50,
      historyMs: 24 * 3600_000,
      resendInitialMs: 30_000,
      resendMaxMs: 300_000,
      tickMs: 1000,
      ...opts,
    };
    this.counted = opts.metrics?.counter('fleet_hub_commands_total', 'Commands by outcome: accepted, refused (queue full), replied, expired');
    this.publishes = opts.metrics?.counter('fleet_hub_command_publishes_total', 'Command publishes to devices, first sends and re-sends');
    opts.metrics?.gaugeFn('fleet_hub_commands_open', 'Commands stored and not yet replied or expired, by status', () => {
      let pending = 0;
      for (const r of this.open) if (r.status === 'pending') pending++;
      return [
        { labels: { status: 'pending' }, value: pending },
        { labels: { status: 'delivered' }, value: this.open.size - pending },
      ];
    });
    this.timer = setInterval(() => this.tick(), this.o.tickMs);
    this.timer.unref();
  }

  /** Open the store and load what an earlier run left: open commands are sent again when their device is reachable. */
  static async open(opts: CommandStoreOptions): Promise<CommandStore> {
    const s = new CommandStore(opts);
    const all: CommandRecord[] = [];
    for await (const [key, value] of opts.db.iterator({ gte: 'c!', lt: 'c"' })) {
      try {
        all.push(JSON.parse(value) as CommandRecord);
      } catch (err) {
        opts.log.warn('dropping an unreadable stored command', { key, err });
        await opts.db.del(key);
      }
    }
    all.sort((a, b) => a.createdAt - b.createdAt || (a.id < b.id ? -1 : a.id > b.id ? 1 : 0));
    for (const r of all) s.index(r);
    s.tick();
    return s;
  }

  private index(r: CommandRecord): void {
    const list = this.byDevice.get(r.deviceId) ?? [];
    list.push(r);
    this.byDevice.set(r.deviceId, list);
    this.byId.set(r.id, r);
    if (r.status === 'pending' || r.status === 'delivered') {
      this.open.add(r);
      this.openPerDevice.set(r.deviceId, (this.openPerDevice.get(r.deviceId) ?? 0) + 1);
    }
  }

  private close_(r: CommandRecord): void {
    if (!this.open.delete(r)) return;
    const n = (this.openPerDevice.get(r.deviceId) ?? 1) - 1;
    if (n > 0) this.openPerDevice.set(r.deviceId, n);
    else this.openPerDevice.delete(r.deviceId);
    this.trimHistory(r.deviceId);
  }

  private key(r: CommandRecord): string {
    return `c!${r.deviceId}!${r.id}`;
  }

  /** `sync`: on disk (fsync) before it resolves; later status changes need not be */
  private put(r: CommandRecord, sync = false): Promise<void> {
    const value = JSON.stringify(r);
    const key = this.key(r);
    const w = this.writes.then(() => this.o.db.put(key, value, { sync }));
    this.writes = w.catch(() => undefined);
    return w;
  }

  private del(r: CommandRecord): void {
    const key = this.key(r);
    const w = this.writes.then(() => this.o.db.del(key));
    this.writes = w.catch((err: unknown) => this.o.log.warn('cannot delete a stored command', { key, err }));
  }

  /** Store a command for a device and send it if the device can receive it now. */
  async create(deviceId: string, name: string, args: Record<string, unknown>, ttlMs: number): Promise<CommandRecord> {
    if (this.closed) throw new FleetError('FLEET_STORE', 'the command store is closed');
    const openHere = this.openPerDevice.get(deviceId) ?? 0;
    if (openHere >= this.o.maxPendingPerDevice || this.open.size >= this.o.maxPending) {
      this.counted?.inc({ result: 'refused' });
      const scope = openHere >= this.o.maxPendingPerDevice ? `${deviceId} already has ${openHere}` : `the hub already holds ${this.open.size}`;
      throw new FleetError('FLEET_COMMAND_QUEUE_FULL', `${scope} commands awaiting a reply (at most ${openHere >= this.o.maxPendingPerDevice ? this.o.maxPendingPerDevice : this.o.maxPending}); retry when some are replied or expired`);
    }
    const now = this.now();
    // time first (base 36, 8 digits until 2059), so ids sort by creation; a counter and
    // random bits keep two hubs or two restarts in the same millisecond apart
    const id = `c${now.toString(36)}${(this.seq++ % 1296).toString(36).padStart(2, '0')}${randomBytes(3).toString('hex')}`;
    const r: CommandRecord = { id, deviceId, name, args, createdAt: now, expiresAt: now + ttlMs, status: 'pending', sends: 0 };
    this.index(r);
    try {
      // the 202 tells the operator the command survives a crash or power loss of the hub
      await this.put(r, true);
    } catch (err) {
      this.forget(r);
      throw new FleetError('FLEET_STORE', `cannot store the command for ${deviceId}: ${(err as Error).message}`, { cause: err });
    }
    this.counted?.inc({ result: 'accepted' });
    // published once at once even when no connection can receive it, as before the store
    // existed: MQTT subscribers of the operator (fleet/v1/#) see every command when issued
    this.trySend(r, now, true, true);
    return r;
  }

  private forget(r: CommandRecord): void {
    this.close_(r);
    this.byId.delete(r.id);
    const list = this.byDevice.get(r.deviceId);
    const i = list?.indexOf(r) ?? -1;
    if (list && i >= 0) list.splice(i, 1);
    if (list && list.length === 0) this.byDevice.delete(r.deviceId);
  }

  /**
   * Send `r` if its device is reachable (`anyway`: also when it is not; it stays pending).
   * `force`: send even if the re-send is not due, unless it already went over this same
   * connection less than resendInitialMs ago (a SUBSCRIBE and an online state of one
   * connection are not two reasons to send).
   */
  private trySend(r: CommandRecord, now: number, force: boolean, anyway = false): void {
    if (this.closed || this.sending.has(r) || !this.open.has(r)) return;
    const n = this.next.get(r);
    // before route(): that costs a look at every gateway's MCUs
    if (n && !force && now < n.at) return;
    const via = this.o.route(r.deviceId);
    if (!via && !anyway) return;
    if (n && force && n.via === via && r.lastSentAt !== undefined && now - r.lastSentAt < this.o.resendInitialMs) return;
    const payload = encodeMessage({ v: 1, id: r.id, name: r.name, args: r.args, expiresAt: r.expiresAt } satisfies Command);
    this.sending.add(r);
    this.o
      .publish(r.deviceId, payload)
      .then(
        () => {
          this.publishes?.inc();
          if (!via) return; // no connection could receive it: still pending, not counted as a send
          const t = this.now();
          r.sends++;
          r.lastSentAt = t;
          const backoff = Math.min(this.o.resendMaxMs, this.o.resendInitialMs * 2 ** Math.min(r.sends - 1, 30));
          // a connection that took over while this was under way missed it: due again at once
          this.next.set(r, { at: this.o.route(r.deviceId) === via ? t + backoff : t, via });
          if (r.status === 'pending') {
            r.status = 'delivered';
            r.deliveredAt = t;
          }
          // informational (a lost write only costs a repeat after a restart): not awaited
          if (this.open.has(r)) this.put(r).catch((err: unknown) => this.o.log.warn('cannot store a command send', { id: r.id, err }));
        },
        (err: unknown) => this.o.log.warn('publishing a command failed; retried', { device: r.deviceId, id: r.id, err }),
      )
      .finally(() => this.sending.delete(r));
  }

  /** The device (or the gateway acting for it) can receive commands now: send what is open. */
  reachable(deviceId: string): void {
    const now = this.now();
    for (const r of this.byDevice.get(deviceId) ?? []) {
      if (!this.open.has(r)) continue;
      if (r.expiresAt <= now) this.expire(r, now);
      else this.trySend(r, now, true);
    }
  }

  /** The reply of `deviceId` to one of its commands (hub/index.ts subscribes the reply channel). */
  onReply(deviceId: string, reply: CommandReply): void {
    const r = this.byId.get(reply.id);
    if (!r || r.deviceId !== deviceId) return; // not ours, or another device's id: ignored
    if (r.status === 'replied') return; // a repeat (the device answers a duplicate again)
    r.status = 'replied';
    r.repliedAt = this.now();
    r.ok = reply.ok;
    if (reply.result !== undefined) {
      if (Buffer.byteLength(JSON.stringify(reply.result) ?? '') <= MAX_RESULT_BYTES) r.result = reply.result;
      else r.resultTruncated = true;
    }
    if (reply.error) r.error = reply.error;
    // stored before close_, which may trim history: a delete must come after this put
    this.put(r).catch((err: unknown) => this.o.log.warn('cannot store a command reply', { id: r.id, err }));
    this.close_(r);
    this.counted?.inc({ result: 'replied' });
  }

  private expire(r: CommandRecord, now: number): void {
    r.status = 'expired';
    r.expiredAt = now;
    this.put(r).catch((err: unknown) => this.o.log.warn('cannot store a command expiry', { id: r.id, err }));
    this.close_(r);
    this.counted?.inc({ result: 'expired' });
    this.o.log.info('command expired without a reply', { device: r.deviceId, id: r.id, name: r.name, sends: r.sends });
  }

  private tick(): void {
    if (this.closed) return;
    const now = this.now();
    // Commands never sent to a connection are sent on the events that make their device
    // reachable (SUBSCRIBE, online state); the scan looks at them only every
    // UNSENT_SCAN_MS, as a safety net, since many may wait for devices that are offline.
    const unsent = now - this.lastUnsentScan >= UNSENT_SCAN_MS;
    if (unsent) this.lastUnsentScan = now;
    for (const r of [...this.open]) {
      if (r.expiresAt <= now) this.expire(r, now);
      else if (unsent || this.next.has(r)) this.trySend(r, now, false);
    }
    if (now - this.lastHistoryPrune >= HISTORY_PRUNE_EVERY_MS) {
      this.lastHistoryPrune = now;
      for (const id of [...this.byDevice.keys()]) this.trimHistory(id);
    }
  }

  /** At most maxHistoryPerDevice finished commands per device, none older than historyMs. */
  private trimHistory(deviceId: string): void {
    const list = this.byDevice.get(deviceId);
    if (!list) return;
    const cutoff = this.now() - this.o.historyMs;
    let finished = 0;
    for (const r of list) if (!this.open.has(r)) finished++;
    for (const r of [...list]) {
      if (this.open.has(r)) continue;
      const at = r.repliedAt ?? r.expiredAt ?? r.createdAt;
      if (finished <= this.o.maxHistoryPerDevice && at >= cutoff) continue;
      finished--;
      this.forget(r);
      this.del(r);
    }
  }

  /** A device's commands, newest first, at most `limit`. */
  list(deviceId: string, limit: number): { open: number; commands: CommandRecord[] } {
    const list = this.byDevice.get(deviceId) ?? [];
    return { open: this.openPerDevice.get(deviceId) ?? 0, commands: list.slice(-limit).reverse() };
  }

  get(deviceId: string, id: string): CommandRecord | undefined {
    const r = this.byId.get(id);
    return r && r.deviceId === deviceId ? r : undefined;
  }

  /** Stop sending; waits for the writes under way (the db is the caller's to close). */
  async close(): Promise<void> {
    this.closed = true;
    clearInterval(this.timer);
    await this.writes;
  }
}

/**
 * Which connections can receive a device's commands, from the broker's SUBSCRIBE,
 * UNSUBSCRIBE and disconnect events. A device receives its own `fleet/v1/d/{id}/cmd`; a
 * gateway receives its MCUs' commands through the relay filter `fleet/v1/d/+/cmd` (or their
 * exact topics), filtered by the broker to the MCUs it registered (hub/acl.ts mayReceive).
 * Keyed by connection, so the late disconnect of a connection another one took over from
 * (same client id) does not forget the new one.
 */
export class DownlinkTracker {
  private readonly exact = new Map<string, Set<Client>>();
  private readonly relay = new Set<Client>();
  private readonly perClient = new Map<Client, Set<string>>();

  constructor(private readonly mcusOf: (gatewayId: string) => ReadonlySet<string> | undefined) {}

  /** Returns the device ids that became reachable (for a relay filter: the gateway and its MCUs). */
  subscribed(client: Client, topics: readonly string[]): string[] {
    const out: string[] = [];
    for (const topic of topics) {
      if (topic === RELAY_CMD) {
        this.relay.add(client);
        out.push(client.id, ...(this.mcusOf(client.id) ?? []));
        continue;
      }
      const t = parseTopic(topic);
      if (!t || t.channel !== 'cmd') continue;
      const set = this.exact.get(t.deviceId) ?? new Set();
      set.add(client);
      this.exact.set(t.deviceId, set);
      const mine = this.perClient.get(client) ?? new Set();
      mine.add(t.deviceId);
      this.perClient.set(client, mine);
      out.push(t.deviceId);
    }
    return out;
  }

  unsubscribed(client: Client, topics: readonly string[]): void {
    for (const topic of topics) {
      if (topic === RELAY_CMD) {
        this.relay.delete(client);
        continue;
      }
      const t = parseTopic(topic);
      if (!t || t.channel !== 'cmd') continue;
      this.dropExact(client, t.deviceId);
      this.perClient.get(client)?.delete(t.deviceId);
    }
  }

  disconnected(client: Client): void {
    this.relay.delete(client);
    for (const id of this.perClient.get(client) ?? []) this.dropExact(client, id);
    this.perClient.delete(client);
  }

  private dropExact(client: Client, id: string): void {
    const set = this.exact.get(id);
    set?.delete(client);
    if (set?.size === 0) this.exact.delete(id);
  }

  /** A connection that receives commands for `deviceId` now, or undefined. */
  route(deviceId: string): Client | undefined {
    for (const c of this.exact.get(deviceId) ?? []) if (!c.closed) return c;
    for (const c of this.relay) if (!c.closed && (c.id === deviceId || this.mcusOf(c.id)?.has(deviceId))) return c;
    return undefined;
  }
}
