import { EventEmitter } from 'node:events';
import type { MqttClient } from 'mqtt';
import { FleetError } from '../core/errors.ts';
import type { Logger } from '../core/log.ts';
import { encodeMessage, encodeTelemetry, sampleCount, telemetryJson, type EventMessage, type GatewayRegistration, type StateMessage, type TelemetryBatch, type TelemetrySamples } from '../core/messages.ts';
import { Priority, type EvictionEvent, type Outbox, type OutboxAppend, type OutboxRecord, type OutboxStats } from '../core/outbox.ts';
import { deviceTopic, MCU_REVOCATIONS_TOPIC, parseTopic, RELAY_CMD, RELAY_DESIRED, type Channel } from '../core/topics.ts';
import type { SensorTable } from '../firmware-bridge/codecs.ts';
import type { McuHello } from '../firmware-bridge/frames.ts';
import { Uplink } from '../core/uplink.ts';
import { batchWriter, countItems, decodeBatch, RECORD_TOPIC, recordMarkerJson, type BatchItemSource } from '../core/batch.ts';
import type { UplinkConfig } from '../core/outbox-config.ts';
import { deferred, type Deferred } from '../core/deferred.ts';

export type McuProtocol = 'mqtt' | 'coap';

export interface RelayOptions {
  gatewayId: string;
  /** does the MCU have a live session (MQTT: connected, keep-alive answered)? Such an MCU is in contact, sending or not */
  inSession?: (mcuId: string) => boolean;
  /** write the gateway's state (the MCUs' meta) now; resolves once it is on disk */
  persist?: () => Promise<void>;
  /** the gateway's connection to the hub (core/mqtt.ts connectFleetClient) */
  client: MqttClient;
  outbox: Outbox;
  log: Logger;
  /** most MCUs this gateway acts for */
  maxMcus: number;
  /** fixed silence after which an MCU is reported offline, ms; unset = 3x its observed interval, or 60 s */
  lostAfterMs?: number | undefined;
  /** uplink tuning (window, batching, rate) */
  uplink?: Partial<UplinkConfig>;
  /** an MCU that declared a sleep period is lost after period x lostFactor + lostGraceMs (default 3, 10 s) */
  lostFactor?: number;
  lostGraceMs?: number;
  /** what the hub sends down for an MCU (cmd, desired), after the gateway subscribed for it */
  onDown?: (mcuId: string, channel: 'cmd' | 'desired', payload: Buffer) => Promise<void>;
  /** the MCUs revoked at the hub (MCU_REVOCATIONS_TOPIC, retained: on every connection and change); `conn` numbers the connection */
  onRevocations?: (payload: Buffer, conn: number) => void;
  /** the wall clock (message timestamps, days seen), ms since the epoch */
  now?: () => number;
  /**
   * a monotonic clock, ms, for silence and intervals (lost detection): a wall-clock step
   * (NTP at boot on a board without an RTC) must not mark every MCU lost, nor keep a dead one
   * online until the clock catches up. Default performance.now(); with only `now` given
   * (tests), `now`.
   */
  elapsed?: () => number;
}

/** What an MCU said about itself in its last hello (persisted with the MCU list). */
export interface McuMeta {
  fw?: string;
  boot?: string;
  prev?: string;
  sleepS?: number;
  sensors?: SensorTable;
  /** hardware class from its hello (firmware targets.deviceClass are matched against it) */
  hw?: string;
  /** the day (since the epoch, UTC) the MCU was last heard from: a long-silent MCU is forgotten at start */
  seenDay?: number;
  /**
   * the interval between its telemetry messages as last saved (ms): after a restart its lost
   * timeout starts from it, not from DEFAULT_LOST_AFTER_MS. Saved when the estimate moved
   * by more than half (INTERVAL_SAVE_CHANGE), not on every message: a saved value is then at
   * least two thirds of the real interval, and lostFactor (3) times it still twice the interval
   */
  intervalMs?: number;
}

/** the interval estimate is saved again when it moved by more than this fraction (a state-file write for all MCUs at most every stateFlushMs) */
const INTERVAL_SAVE_CHANGE = 0.5;
/** gaps seen online before an MCU's period counts as known (then a lost period's gap is capped) */
const ESTABLISHED_GAPS = 3;

const DAY_MS = 86_400_000;

interface McuEntry {
  /** position in registration order; the register message lists MCUs in this order */
  index: number;
  protocol: McuProtocol | null;
  /** last time the MCU said anything, ms of the monotonic clock (elapsed) */
  lastSeen: number;
  /** smoothed interval between its messages, ms; 0 until two were seen */
  intervalMs: number;
  /** telemetry gaps seen while it was online (this run) */
  onlineGaps: number;
  /** it went offline (lost, revoked) since its last telemetry: the next telemetry gap spans that, whatever it sends first */
  gapEndsLost?: boolean;
  online: boolean;
  /** known from before a restart and not heard since: what the hub shows is unknown */
  stale: boolean;
  messages: number;
  /** when its last telemetry message came, ms; 0 = none yet */
  lastTelemetry: number;
  /**
   * Date.now() once the last outbox record naming it was stored (records from before the
   * gateway started count as stored at the start); 0 = none. Every record in the outbox
   * stored after this holds nothing of it (forgetSilent)
   */
  queuedAt: number;
  meta: McuMeta;
}

/** Until an MCU's interval is known it counts as lost after this long silent, ms. */
export const DEFAULT_LOST_AFTER_MS = 60_000;
/** Floor for the interval-derived timeout, so an MCU that sends a quick burst does not flap. */
const MIN_LOST_AFTER_MS = 1000;
/** least time between two SUBSCRIBEs of the desired filter (each makes the hub scan its retained messages) */
const RESUBSCRIBE_MS = 2000;
/** after a refused or failed subscribe, ms */
const SUBSCRIBE_RETRY_MS = 60_000;
/** least time between two registers on one connection (the first goes at once) */
const REGISTER_GAP_MS = 250;
/**
 * The register lists every MCU in one retained publish, which the hub refuses above its
 * payload limit (maxPayloadBytes, 1 MiB by default) — and then every MCU's data with it. An
 * MCU that would push the list past this is refused like one beyond mcu.maxMcus (about
 * 15,000 ids of the longest kind, 45,000 of 20 characters).
 */
const REGISTER_MAX_BYTES = 1024 * 1024 - 4096;
/** bytes an id adds to the register's JSON: quotes and comma (ids are plain ASCII) */
const registerEntryBytes = (id: string): number => id.length + 3;

/** most MCU telemetry messages in one outbox record (item mids carry the index in three digits) */
const GROUP_MAX = 1000;

/** An MCU message waiting in the relay's group for flushGroup. */
interface GroupItem {
  mcuId: string;
  ts: number;
  /** NO_SAMPLES once encoded */
  samples: TelemetrySamples;
}
const NO_SAMPLES: TelemetrySamples = Object.freeze([]);
const RESOLVED: Promise<void> = Promise.resolve();

/** bytes of a grouped record at most (by the bound below) */
const GROUP_MAX_BYTES = 256 * 1024;

/**
 * An upper bound of the bytes one MCU message takes in a grouped record: its topic and the
 * TelemetryBatch JSON, every string counted as if JSON escaping made each character six bytes.
 */
function itemBytesBound(mcuId: string, samples: TelemetrySamples): number {
  let n = 120 + mcuId.length;
  // already JSON (ASCII): its length is its bytes
  if ('json' in samples) return n + samples.json.length;
  for (const s of samples) n += 80 + 6 * (s.n.length + (s.vs?.length ?? 0) + (s.u?.length ?? 0));
  return n;
}

/**
 * The relay between MCUs and the hub.
 *
 * Registration. The hub lets the gateway publish for an MCU only once the gateway's
 * retained `register` message lists it, checked in packet order on the connection.
 * The list is complete each time, so publishing it per new MCU would cost O(N²) bytes
 * while a site's MCUs come up (measured: 2,000 CoAP MCUs starting together buried the
 * hub in register messages and stalled the uplink). Instead registers are coalesced —
 * at most one awaiting its PUBACK; MCUs that arrive meanwhile go into the next — and
 * nothing for an MCU is sent before a register covering it was sent on the current
 * connection: its state waits in `pendingState`, and its telemetry stays in the outbox,
 * hidden from the Uplink by the GatedOutbox view below until then. Telemetry is still
 * appended at once, so the MCU's acknowledgement means "stored", hub or no hub.
 *
 * State. Each MCU's retained state is `online` when it talks after being offline and
 * `offline` when it has been silent longer than its lost timeout. States are
 * latest-value: while the hub is unreachable only the newest per MCU is kept.
 *
 * Telemetry goes out as TelemetryBatch through the outbox and Uplink (at-least-once,
 * the outbox id is the message's `mid`).
 */
export class Relay {
  private readonly mcus = new Map<string, McuEntry>();
  /** bytes the MCU ids take in the register message (registerEntryBytes each) */
  private registerBytes = 0;
  private readonly pendingState = new Map<string, Buffer>();
  /** MCUs of outbox records that could not be adopted (warned once each) */
  private readonly notAdopted = new Set<string>();
  private statesInFlight = 0;
  /** MCUs with index below this are covered by a register sent on the current connection */
  private registeredUpTo = 0;
  private registerInFlight = false;
  /** MCUs were forgotten: the next register goes out even with no new MCU (the hub's list shrinks) */
  private registerStale = false;
  /** MCUs with index below this have cmd and desired subscribed on the current connection */
  private subscribedUpTo = 0;
  private subscribeInFlight = false;
  private lastSubAckAt = 0;
  private resubTimer: NodeJS.Timeout | null = null;
  /** a failed subscribe was logged on this connection */
  private subscribeWarned = false;
  private registerTimer: NodeJS.Timeout | null = null;
  private lastRegisterAt = 0;
  /** bumped on every connect and close, so callbacks from an old connection are ignored */
  private connGen = 0;
  private changed = false;
  private readonly sweepTimer: NodeJS.Timeout;
  private readonly gated: GatedOutbox;
  private readonly uplink: Uplink;
  private readonly now: () => number;
  private readonly elapsed: () => number;
  private stopped = false;
  /** telemetry of this turn of the event loop, stored together by flushGroup */
  private group: GroupItem[] = [];
  /** settles when the group is stored: every accept() of the group returns it */
  private groupDone: Deferred | null = null;
  private groupBytes = 0;
  /** a grouped record stays below this (and so below the hub's payload limit, 1 MiB by default) */
  private readonly groupMaxBytes: number;
  private readonly batchTopic: string;

  constructor(private readonly opts: RelayOptions) {
    this.now = opts.now ?? Date.now;
    this.elapsed = opts.elapsed ?? opts.now ?? (() => performance.now());
    this.batchTopic = deviceTopic(opts.gatewayId, 'batch');
    this.groupMaxBytes = Math.min(GROUP_MAX_BYTES, opts.uplink?.batchBytes ?? GROUP_MAX_BYTES);
    // Registered before the Uplink's own 'connect' listener (created just below), so on
    // every (re)connect the register and states go out before queued telemetry.
    opts.client.on('connect', this.onConnect);
    opts.client.on('close', this.onClose);
    // Commands and desired states for MCUs are acknowledged to the hub (PUBACK) only once
    // handled — in the mailbox on disk — so a gateway killed in between gets them again.
    // mqtt.js sends the PUBACK when handleMessage calls back.
    if (opts.onDown || opts.onRevocations) opts.client.handleMessage = (packet, callback) => void this.handleDown(packet.topic, Buffer.from(packet.payload)).then(() => callback(), () => callback());
    // the relay subscribes for its MCUs itself, after the register that lets it (and
    // paced); mqtt.js' own resubscribe would send them all at once before the register
    if (opts.onDown || opts.onRevocations) opts.client.options.resubscribe = false;
    this.gated = new GatedOutbox(opts.outbox, this.batchTopic, (mcuId) => this.covered(mcuId), () => this.flush(), (mcuId) => this.adopt(mcuId));
    this.uplink = new Uplink({ client: opts.client, outbox: this.gated, log: opts.log, deviceId: opts.gatewayId, ...opts.uplink });
    const sweepMs = opts.lostAfterMs ? Math.min(1000, Math.max(25, Math.floor(opts.lostAfterMs / 4))) : 500;
    this.sweepTimer = setInterval(this.sweep, sweepMs);
    // connected already (the client was made before the stores this relay needs were opened):
    // this connection's start as if its 'connect' came now (register, revocation list)
    if (opts.client.connected) this.onConnect();
  }

  /**
   * MCUs known from before a restart: registered again on connect. The hub may show
   * them online (the gateway crashed) or offline (it stopped cleanly), so each is
   * reported online when it talks, or offline once silent for its lost timeout.
   */
  restore(ids: readonly string[], meta?: Readonly<Record<string, McuMeta>>, forgetAfterDays = 0): string[] {
    const now = this.now();
    const forgotten: string[] = [];
    const cutoff = forgetAfterDays > 0 ? Math.floor(now / DAY_MS) - forgetAfterDays : -Infinity;
    for (let i = 0; i < ids.length; i++) {
      const id = ids[i]!;
      if (id === this.opts.gatewayId || this.mcus.has(id)) continue;
      const seenDay = meta?.[id]?.seenDay;
      if (typeof seenDay === 'number' && seenDay < cutoff) {
        forgotten.push(id);
        continue;
      }
      if (this.mcus.size >= this.opts.maxMcus || this.registerBytes + registerEntryBytes(id) > REGISTER_MAX_BYTES) {
        this.opts.log.warn('MCUs from the saved list not restored: this gateway acts for no more (mcu.maxMcus, or the register size limit)', { restored: this.mcus.size, notRestored: ids.length - i });
        break;
      }
      this.registerBytes += registerEntryBytes(id);
      const m: McuMeta = { ...meta?.[id] };
      // a list saved before seenDay existed: its silence is counted from now, so it is forgotten in time too
      if (typeof m.seenDay !== 'number') {
        m.seenDay = Math.floor(now / DAY_MS);
        this.changed = true;
      }
      this.addMcu(id, null, this.elapsed(), true, Date.now(), m);
    }
    if (forgotten.length > 0) {
      this.changed = true; // the saved list loses them too
      // the hub's delegation must shrink too, also when no MCU is left to list (flush sends
      // a register only for MCUs beyond the last one sent, or when it is stale)
      this.registerStale = true;
      this.opts.log.info('MCUs not heard from in mcu.forgetAfterDays forgotten', { forgotten: forgotten.length, days: forgetAfterDays, examples: forgotten.slice(0, 5) });
    }
    this.flush();
    return forgotten;
  }

  /**
   * Forget, while running, the MCUs not heard from in `days` days (restore does it at
   * start; the gateway calls this hourly), so a gateway that runs for years does not fill
   * mcu.maxMcus with MCUs long gone. Never one that is online (heard from within its lost
   * timeout), one `inUse` names (the gateway: commands in its mailbox or a firmware update
   * under way), one whose state message awaits sending, or one
   * with a record still in the outbox: its last record was stored at `queuedAt`, so it has
   * none left once every record in the outbox is younger than that. The register goes out
   * again without them (the hub's delegation shrinks). Returns the ids forgotten (the
   * caller drops their replay counters).
   */
  forgetSilent(days: number, inUse: (mcuId: string) => boolean = () => false): string[] {
    if (days <= 0 || this.stopped) return [];
    const cutoff = Math.floor(this.now() / DAY_MS) - days;
    // every record in the outbox was stored at or after this (the clock read before the
    // outbox's own read of it, so this errs early: an MCU is kept rather than forgotten)
    const t = Date.now();
    const st = this.opts.outbox.stats();
    const oldestStored = st.depth === 0 ? Infinity : t - st.oldestAgeMs;
    const gone: string[] = [];
    for (const [id, e] of this.mcus) {
      const seen = e.meta.seenDay;
      if (typeof seen !== 'number' || seen >= cutoff) continue;
      if (e.online || e.queuedAt >= oldestStored || this.pendingState.has(id) || inUse(id)) continue;
      gone.push(id);
    }
    if (gone.length === 0) return gone;
    for (const id of gone) {
      this.mcus.delete(id);
      this.registerBytes -= registerEntryBytes(id);
    }
    // registration order is kept; positions close up, and so do the covered prefixes
    let index = 0;
    let registered = 0;
    let subscribed = 0;
    for (const e of this.mcus.values()) {
      if (e.index < this.registeredUpTo) registered++;
      if (e.index < this.subscribedUpTo) subscribed++;
      e.index = index++;
    }
    this.registeredUpTo = registered;
    this.subscribedUpTo = subscribed;
    this.registerStale = true;
    this.changed = true;
    this.opts.log.info('MCUs not heard from in mcu.forgetAfterDays forgotten', { forgotten: gone.length, days, remaining: this.mcus.size, examples: gone.slice(0, 5) });
    this.flush();
    return gone;
  }

  /**
   * Accept samples from an authenticated MCU. Resolves once the telemetry is in the
   * outbox (the ingress acknowledges the MCU only then). An empty sample list still
   * counts as a sign of life. Throws FLEET_FORBIDDEN when the MCU limit is reached.
   */
  accept(mcuId: string, protocol: McuProtocol, samples: TelemetrySamples): Promise<void> {
    // not async: the group's one promise is returned as it is, not wrapped in one per message
    let now: number;
    try {
      now = this.touch(mcuId, protocol, true);
    } catch (err) {
      return Promise.reject(err);
    }
    if (sampleCount(samples) === 0) return RESOLVED;
    // An MCU that no register sent on this connection covers yet (a new one, while the
    // register naming it awaits its PUBACK) is stored alone, as before grouping: its record
    // waits hidden for that register, and a group with it would hold back every MCU in it.
    // While the hub is away nothing is covered, and the register sent on reconnect covers
    // every MCU known by then, so grouping goes on.
    if (this.opts.client.connected && !this.covered(mcuId)) return this.appendTelemetry(mcuId, now, samples);
    // one promise for the whole group, not one (and its two resolvers) per message: what a
    // message allocates lives until its record is stored, long enough at thousands of messages
    // a second to be copied by the young generation's collections (see flushGroup)
    let done = this.groupDone;
    if (done === null) {
      done = this.groupDone = deferred();
      // shared by the group's accept() calls: a rejection none of them awaits any more is not "unhandled"
      done.promise.catch(() => undefined);
    }
    this.group.push({ mcuId, ts: now, samples });
    this.groupBytes += itemBytesBound(mcuId, samples);
    if (this.group.length >= GROUP_MAX || this.groupBytes >= this.groupMaxBytes) this.flushGroup();
    else if (this.group.length === 1) setImmediate(this.flushGroup);
    return done.promise;
  }

  /** One MCU message as a plain outbox record (its mid is the record's id). */
  private appendTelemetry(mcuId: string, ts: number, samples: TelemetrySamples): Promise<void> {
    return this.opts.outbox
      .append({
        topic: deviceTopic(mcuId, 'telemetry'),
        priority: Priority.TELEMETRY,
        payload: (mid) => encodeTelemetry(mid, ts, samples),
      })
      .then(() => this.queued(mcuId));
  }

  /** A new entry at the end of the registration order (restored, new, or adopted from the outbox). */
  private addMcu(id: string, protocol: McuProtocol | null, lastSeen: number, stale: boolean, queuedAt: number, meta: McuMeta): McuEntry {
    // the saved interval, if it is a sane one (the file may be old or edited)
    const saved = meta.intervalMs;
    const intervalMs = typeof saved === 'number' && Number.isFinite(saved) && saved > 0 ? Math.round(saved) : 0;
    if (saved !== undefined && intervalMs === 0) delete meta.intervalMs;
    const e: McuEntry = { index: this.mcus.size, protocol, lastSeen, intervalMs, onlineGaps: 0, online: false, stale, messages: 0, lastTelemetry: 0, queuedAt, meta };
    this.mcus.set(id, e);
    return e;
  }

  /** A record naming this MCU is stored (after its append resolved: its time is at or after the record's). */
  private queued(mcuId: string): void {
    const e = this.mcus.get(mcuId);
    if (e) e.queuedAt = Date.now();
  }

  /**
   * Telemetry that arrived in one turn of the event loop goes into the outbox as one record:
   * a batch (core/batch.ts) on the gateway's own batch topic, each item an MCU's
   * TelemetryBatch with its own mid, after a record marker (core/batch.ts) carrying the
   * record's id. The Uplink sends such a record as it is; the hub unpacks and checks it item
   * by item as any batch, and de-duplicates it as a whole by the marker's mid in this
   * gateway's window (no de-duplication window per MCU at the hub). One record instead of
   * one per MCU message is one LevelDB put and one delete, one entry in the outbox's memory
   * and the Uplink's in-flight set, per turn instead of per reading (at thousands of MCU
   * messages a second that per-record work was most of the gateway's CPU after the MQTT
   * listener). Each MCU is acknowledged only once the record holding its message is stored,
   * as before. A turn with a single message stores it as a plain record, as before.
   *
   * Item mids: the record's id followed by the item's index as three digits (at most
   * GROUP_MAX items), so they are unique per MCU, never equal to a plain record's id (three
   * digits longer) and at most 19 digits (ids are about 16).
   */
  private readonly flushGroup = (): void => {
    const items = this.group;
    const done = this.groupDone;
    if (items.length === 0 || done === null) return;
    this.group = [];
    this.groupDone = null;
    this.groupBytes = 0;
    let work: Promise<unknown>;
    if (items.length === 1) {
      const it = items[0]!;
      work = this.appendTelemetry(it.mcuId, it.ts, it.samples);
      it.samples = NO_SAMPLES;
    } else {
      let noted: string | null = null;
      work = this.opts.outbox.append({
        topic: this.batchTopic,
        priority: Priority.TELEMETRY,
        payload: (id) => {
          // told before the record can be peeked: the Uplink need not decode it to learn its MCUs
          this.gated.noteGroup(id, items.map((it) => it.mcuId));
          noted = id;
          // the marker: the hub de-duplicates the record as a whole by its id (core/batch.ts)
          // written straight into the stored record, its JSON never a Buffer of its own
          // (core/outbox.ts PayloadWriter)
          const batch = batchWriter([
            { topic: RECORD_TOPIC, payload: recordMarkerJson(id, items.length) },
            ...items.map((it, k): BatchItemSource => ({
              topic: deviceTopic(it.mcuId, 'telemetry'),
              payload: telemetryJson(`${id}${String(k).padStart(3, '0')}`, it.ts, it.samples),
            })),
          ]);
          // encoded: the samples need not live until the record is stored
          for (const it of items) it.samples = NO_SAMPLES;
          return batch;
        },
      });
      // refused (budget, store): the record will never be peeked or acked
      work.catch(() => noted !== null && this.gated.forgetGroup(noted));
    }
    work.then(
      () => {
        if (items.length > 1) for (const it of items) this.queued(it.mcuId); // a single one: appendTelemetry did
        done.resolve();
      },
      (err: unknown) => done.reject(err),
    );
  };

  /**
   * An authenticated MCU said something (any channel): it is online; new MCUs are
   * added (FLEET_FORBIDDEN beyond maxMcus). Returns "now".
   */
  touch(mcuId: string, protocol: McuProtocol, telemetry = false): number {
    if (this.stopped) throw new FleetError('FLEET_STORE', 'gateway is stopping; not storing');
    if (mcuId === this.opts.gatewayId) throw new FleetError('FLEET_FORBIDDEN', `MCU id ${mcuId} is the gateway's own id`);
    const now = this.now();
    const t = this.elapsed();
    let e = this.mcus.get(mcuId);
    if (!e) {
      if (this.mcus.size >= this.opts.maxMcus) throw new FleetError('FLEET_FORBIDDEN', `this gateway acts for at most ${this.opts.maxMcus} MCUs; refusing ${mcuId}`, { details: { limit: this.opts.maxMcus } });
      if (this.registerBytes + registerEntryBytes(mcuId) > REGISTER_MAX_BYTES) {
        throw new FleetError('FLEET_FORBIDDEN', `the register listing this gateway's ${this.mcus.size} MCUs would exceed ${REGISTER_MAX_BYTES} bytes, above the hub's payload limit; refusing ${mcuId}`, { details: { limit: this.mcus.size } });
      }
      this.registerBytes += registerEntryBytes(mcuId);
      e = this.addMcu(mcuId, protocol, t, false, 0, {});
      this.changed = true;
      this.opts.log.info('new MCU', { mcu: mcuId, protocol });
    } else if (telemetry && e.lastTelemetry > 0) {
      // the interval between telemetry messages only: a burst of firmware blocks or
      // mailbox polls says nothing about how often the MCU wakes
      const gap = Math.round(t - e.lastTelemetry);
      // decided by what happened since the last reading, not by `online` now: a hello or a
      // mailbox poll first after the outage has made it online already
      const endsLost = e.gapEndsLost === true;
      e.gapEndsLost = false;
      if (gap > 0 && endsLost && e.onlineGaps >= ESTABLISHED_GAPS) {
        // the gap that ended a lost period of an MCU whose period was seen: an outage
        // (powered off for two hours, a week), or a period that really grew. Raised at most
        // to twice the timeout that just ran out: taken whole, an outage kept the MCU
        // "online" for three outages after it failed again; a period that grew gets there
        // in a few cycles
        e.intervalMs = Math.max(e.intervalMs, Math.min(gap, 2 * this.lostAfter(e)));
      } else if (gap > 0) {
        // rises at once, falls slowly: the longest recent gap is the MCU's period. An MCU that
        // sends a few messages per wake has short gaps within each burst; averaged in (as
        // before), they pulled the estimate far below the wake period, and the MCU was reported
        // lost and back online on every sleep cycle. A steady fast reporter still converges to
        // its short interval (lost soon after it stops); one late message raises the lost
        // timeout for a while, which errs towards "sleeping", not "lost"
        e.intervalMs = e.intervalMs === 0 || gap > e.intervalMs ? gap : Math.round(e.intervalMs * 0.9 + gap * 0.1);
      }
      if (!endsLost) e.onlineGaps++;
      // Kept across restarts, saved with the state file when it moved enough to matter and
      // this gap, seen online, bears it out (within half): never from a gap that ended a lost
      // period, nor while the estimate still carries one (it decays over the next gaps)
      const saved = e.meta.intervalMs;
      if (!endsLost && e.online && e.intervalMs > 0 && Math.abs(gap - e.intervalMs) <= e.intervalMs * INTERVAL_SAVE_CHANGE && (saved === undefined || Math.abs(e.intervalMs - saved) > saved * INTERVAL_SAVE_CHANGE)) {
        e.meta.intervalMs = e.intervalMs;
        this.changed = true;
      }
    }
    if (telemetry) e.lastTelemetry = t;
    const day = Math.floor(now / DAY_MS);
    if (e.meta.seenDay !== day) {
      e.meta.seenDay = day; // saved with the state file (once a day per MCU)
      this.changed = true;
    }
    e.protocol = protocol;
    e.lastSeen = t;
    e.stale = false;
    e.messages++;
    if (!e.online) {
      e.online = true;
      this.publishState(mcuId, this.onlineState(e, now));
    }
    return now;
  }

  private onlineState(e: McuEntry, now: number): StateMessage {
    const msg: StateMessage = { v: 1, online: true, kind: 'mcu', ts: now, via: this.opts.gatewayId };
    if (e.meta.fw !== undefined) msg.version = e.meta.fw;
    if (e.meta.boot !== undefined || e.meta.sleepS !== undefined || e.meta.hw !== undefined) {
      msg.mcu = {};
      if (e.meta.boot !== undefined) msg.mcu.boot = e.meta.boot;
      if (e.meta.prev !== undefined) msg.mcu.prev = e.meta.prev;
      if (e.meta.sleepS !== undefined) msg.mcu.sleepS = e.meta.sleepS;
      if (e.meta.hw !== undefined) msg.mcu.hw = e.meta.hw;
    }
    return msg;
  }

  /**
   * The version report after boot: remembered (and persisted), relayed as the MCU's
   * state when anything in it changed, plus an `mcu.boot` event when the firmware
   * version changed. Resolves once the event (if any) is in the outbox.
   */
  async hello(mcuId: string, protocol: McuProtocol, hello: McuHello): Promise<void> {
    const now = this.touch(mcuId, protocol);
    const e = this.mcus.get(mcuId)!;
    const previous = { ...e.meta };
    const meta: McuMeta = { fw: hello.fw, boot: hello.boot };
    if (hello.prev !== undefined) meta.prev = hello.prev;
    if (hello.sleep !== undefined) meta.sleepS = hello.sleep;
    meta.sensors = hello.sensors ?? previous.sensors;
    // the board does not change with its firmware: one that stops saying it keeps it
    const hw = hello.hw ?? previous.hw;
    if (hw !== undefined) meta.hw = hw;
    if (previous.seenDay !== undefined) meta.seenDay = previous.seenDay;
    if (previous.intervalMs !== undefined) meta.intervalMs = previous.intervalMs;
    e.meta = meta;
    const changed = previous.fw !== meta.fw || previous.boot !== meta.boot || previous.prev !== meta.prev || previous.sleepS !== meta.sleepS || previous.hw !== meta.hw;
    if (changed || JSON.stringify(previous.sensors) !== JSON.stringify(meta.sensors)) this.changed = true;
    if (changed) this.publishState(mcuId, this.onlineState(e, now));
    try {
      if (previous.fw !== meta.fw) await this.event(mcuId, 'mcu.boot', 'info', { fw: meta.fw, boot: meta.boot, ...(meta.prev !== undefined ? { prev: meta.prev } : {}), ...(previous.fw !== undefined ? { was: previous.fw } : {}) });
      // what later messages are read by (the sensor table of compact telemetry), judged by
      // (the sleep period) or decided by (the firmware version) is on disk before the hello
      // is acknowledged: the MCU says it once per boot, and a gateway that crashed with it
      // only in memory decoded compact readings with the old table after its restart
      if (this.opts.persist && (previous.fw !== meta.fw || previous.sleepS !== meta.sleepS || previous.hw !== meta.hw || JSON.stringify(previous.sensors) !== JSON.stringify(meta.sensors))) await this.opts.persist();
    } catch (err) {
      // not stored, so the MCU gets no acknowledgement and sends its hello again: that one
      // must still see the change (and make the event, and the save), so the old meta is put back
      if (e.meta === meta) {
        e.meta = previous;
        this.changed = true;
      }
      throw err;
    }
  }

  meta(mcuId: string): McuMeta | undefined {
    return this.mcus.get(mcuId)?.meta;
  }

  /** [id, meta] of the MCUs whose hello said something, read as the walk reaches them */
  *metaEntries(): Generator<[string, McuMeta]> {
    for (const [id, e] of this.mcus) if (Object.keys(e.meta).length > 0) yield [id, e.meta];
  }

  isKnown(mcuId: string): boolean {
    return this.mcus.has(mcuId);
  }

  /** Append a message for an MCU the gateway acts for (reply, events, logs) to the outbox. */
  async append(mcuId: string, channel: Channel, priority: (typeof Priority)[keyof typeof Priority], build: (mid: string) => Buffer): Promise<void> {
    if (!this.mcus.has(mcuId)) throw new FleetError('FLEET_FORBIDDEN', `${mcuId} is not an MCU of this gateway`);
    await this.opts.outbox.append({ topic: deviceTopic(mcuId, channel), priority, payload: build });
    this.queued(mcuId);
  }

  /** An event for an MCU, through the outbox. */
  async event(mcuId: string, type: string, severity: EventMessage['severity'], data: Record<string, unknown>): Promise<void> {
    const ts = this.now();
    await this.append(mcuId, 'events', Priority.ALERT, (mid) => encodeMessage({ v: 1, mid, ts, type, severity, data } satisfies EventMessage));
  }

  private lostAfter(e: McuEntry): number {
    const factor = this.opts.lostFactor ?? 3;
    // a declared sleep period wins: silent that long is sleeping, not lost
    if (e.meta.sleepS) return e.meta.sleepS * 1000 * factor + (this.opts.lostGraceMs ?? 10_000);
    if (this.opts.lostAfterMs) return this.opts.lostAfterMs;
    return e.intervalMs > 0 ? Math.max(MIN_LOST_AFTER_MS, factor * e.intervalMs) : DEFAULT_LOST_AFTER_MS;
  }

  /**
   * The MCU was revoked and cut off: offline from now, so its first message after the
   * revocation is lifted says online again. Revoked by this gateway's own list, the hub is
   * told why; revoked at the hub, the hub has marked it offline itself (and refuses states
   * for it).
   */
  revoked(mcuId: string, atHub: boolean): void {
    const e = this.mcus.get(mcuId);
    if (!e?.online) return;
    e.online = false;
    e.gapEndsLost = true;
    if (!atHub) this.publishState(mcuId, { v: 1, online: false, kind: 'mcu', ts: this.now(), via: this.opts.gatewayId, reason: 'revoked at the gateway' });
  }

  private sweep = (): void => {
    const now = this.now();
    const t = this.elapsed();
    for (const [id, e] of this.mcus) {
      if (!e.online && !e.stale) continue;
      // a live session is contact (an actuator that only answers keep-alives and waits for
      // commands): silent from when it ends
      if (e.online && this.opts.inSession?.(id)) {
        e.lastSeen = t;
        continue;
      }
      const silent = t - e.lastSeen;
      if (silent > this.lostAfter(e)) {
        const limit = this.lostAfter(e);
        const sleeps = e.meta.sleepS ? `, sleeps ${e.meta.sleepS} s` : '';
        const reason = e.stale ? `not heard since the gateway restarted ${Math.round(silent / 1000)} s ago (lost after ${Math.round(limit / 1000)} s${sleeps})` : `no contact for ${Math.round(silent / 1000)} s (lost after ${Math.round(limit / 1000)} s${sleeps})`;
        e.online = false;
        e.gapEndsLost = true;
        e.stale = false;
        this.opts.log.info('MCU lost', { mcu: id, silentMs: silent });
        this.publishState(id, { v: 1, online: false, kind: 'mcu', ts: now, via: this.opts.gatewayId, reason });
      }
    }
  };

  /**
   * A record in the outbox names an MCU the relay does not know: it was first seen less
   * than `stateFlushMs` before a crash, so the persisted MCU list lacks it, but its data
   * was acknowledged. Adopt it (as restored: registered on the next register, state
   * unknown until it talks), or its records would stay hidden until it talks again.
   * Also beyond mcu.maxMcus (new MCUs may have taken the free slots while the hub was
   * away): its data was acknowledged when it had a slot, and MCUs are forgotten later as
   * usual. False only when the register has no room left for it (the hub would refuse the
   * register, and with it every MCU's data): its records then go without one, and the hub
   * keeps them as dead letters for the operator.
   */
  private adopt(mcuId: string): boolean {
    if (this.mcus.has(mcuId)) return true;
    if (mcuId === this.opts.gatewayId) return false; // the gateway's own record: needs no register
    if (this.registerBytes + registerEntryBytes(mcuId) > REGISTER_MAX_BYTES) {
      if (this.notAdopted.size < 1000 && !this.notAdopted.has(mcuId)) {
        this.notAdopted.add(mcuId);
        this.opts.log.warn('records in the outbox for an MCU that cannot be registered (the register is full): sent without a register, the hub keeps them as dead letters', { mcu: mcuId });
      }
      return false;
    }
    if (this.mcus.size >= this.opts.maxMcus) this.opts.log.warn('MCU adopted from the outbox beyond mcu.maxMcus (its data was acknowledged before a crash)', { mcu: mcuId, limit: this.opts.maxMcus });
    this.registerBytes += registerEntryBytes(mcuId);
    // seen today: its record says it spoke shortly before the crash
    const now = this.now();
    this.addMcu(mcuId, null, this.elapsed(), true, Date.now(), { seenDay: Math.floor(now / DAY_MS) });
    this.changed = true;
    this.opts.log.info('MCU adopted from the outbox (not in the persisted list)', { mcu: mcuId });
    return true;
  }

  private covered(mcuId: string): boolean {
    const e = this.mcus.get(mcuId);
    return e !== undefined && e.index < this.registeredUpTo;
  }

  private onConnect = (): void => {
    this.connGen++;
    this.subscribeWarned = false;
    this.subscribedUpTo = 0;
    this.subscribeInFlight = false;
    this.registeredUpTo = 0;
    this.registerInFlight = false;
    // the hub marks our MCUs offline while we are away (our last will): say again which are up
    const now = this.now();
    for (const [id, e] of this.mcus) {
      if (e.online && !this.pendingState.has(id)) this.pendingState.set(id, encodeMessage(this.onlineState(e, now)));
    }
    // the full list again on every connection: cheap, and it makes a hub that lost its
    // retained messages whole again
    this.flush();
    this.subscribeRevocations(this.connGen);
  };

  /**
   * The hub's MCU revocation list (retained: it comes with the SUBACK, and again on every
   * change), on every connection, whatever MCUs there are: a gateway must know it before the
   * first MCU connects. A SUBSCRIBE of its own, so a hub without it (an older one refuses the
   * topic) costs nothing else: logged once per connection, tried again every minute; the
   * gateway's own list applies meanwhile.
   */
  private subscribeRevocations(gen: number): void {
    if (!this.opts.onRevocations || gen !== this.connGen || this.stopped || !this.opts.client.connected || this.opts.client.disconnecting) return;
    this.opts.client.subscribe({ [MCU_REVOCATIONS_TOPIC]: { qos: 1 } }, (err, granted) => {
      if (gen !== this.connGen || this.stopped) return;
      if (!err && !granted?.some((g) => g.qos === 128)) return;
      this.opts.log.warn('the hub refused its MCU revocation list (an older hub?); only this gateway\'s own list applies; trying again every minute', { err, granted });
      setTimeout(() => this.subscribeRevocations(gen), SUBSCRIBE_RETRY_MS).unref();
    });
  }

  private onClose = (): void => {
    this.connGen++;
    if (this.resubTimer) clearTimeout(this.resubTimer);
    this.resubTimer = null;
    if (this.registerTimer) clearTimeout(this.registerTimer);
    this.registerTimer = null;
    this.subscribedUpTo = 0;
    this.subscribeInFlight = false;
    this.registeredUpTo = 0;
    this.registerInFlight = false;
  };

  private publishState(mcuId: string, msg: StateMessage): void {
    this.pendingState.set(mcuId, encodeMessage(msg));
    this.flush();
  }

  /**
   * Send what may be sent. Never while disconnected: mqtt.js would queue it offline and
   * could deliver an older register after a newer one.
   */
  private flush(): void {
    // nor while the client is ending: mqtt.js fails a publish on a disconnecting client at
    // once, from inside publish() (stop() itself still sends the MCUs' last states)
    if (!this.opts.client.connected || this.opts.client.disconnecting || this.disposed) return;
    if ((this.mcus.size > this.registeredUpTo || this.registerStale) && !this.registerInFlight) {
      // the first register of a connection at once; later ones (MCUs still arriving) at
      // least REGISTER_GAP_MS apart, so a ramp of thousands of MCUs sends a few complete lists
      // rather than one per PUBACK (each one the hub decodes and stores whole)
      const wait = this.registeredUpTo === 0 ? 0 : this.lastRegisterAt + REGISTER_GAP_MS - Date.now();
      if (wait <= 0) this.sendRegister();
      else
        this.registerTimer ??= setTimeout(() => {
          this.registerTimer = null;
          this.flush();
        }, wait);
    }
    // over a copy: a publish that fails at once puts its state back into the map, and a Map
    // iterator visits re-added entries again (the gateway spun here, at 100% CPU, when it was
    // stopped with its hub link stalled)
    for (const [id, buf] of [...this.pendingState]) {
      if (!this.covered(id)) continue; // after the register that covers it
      this.pendingState.delete(id);
      this.statesInFlight++;
      this.opts.client.publish(deviceTopic(id, 'state'), buf, { qos: 1, retain: true }, (err) => {
        this.statesInFlight--;
        // not delivered and nothing newer queued: keep it for the next connection (unless the
        // MCU was forgotten meanwhile: it would never be covered again, and stop() would wait
        // for it)
        if (err && !this.pendingState.has(id) && this.mcus.has(id)) this.pendingState.set(id, buf);
      });
    }
  }

  private sendRegister(): void {
    const gen = this.connGen;
    const mcus = [...this.mcus.keys()];
    const msg: GatewayRegistration = { v: 1, ts: this.now(), mcus };
    this.registerInFlight = true;
    this.registerStale = false;
    this.lastRegisterAt = Date.now();
    this.opts.client.publish(deviceTopic(this.opts.gatewayId, 'register'), encodeMessage(msg), { qos: 1, retain: true }, () => {
      if (gen !== this.connGen) return; // a new connection sends its own
      this.registerInFlight = false;
      this.flush(); // MCUs that arrived meanwhile get the next register
    });
    // Telemetry and states of these MCUs may follow it on this connection right away:
    // the hub applies the register when it reads it, before the packets behind it.
    this.registeredUpTo = mcus.length;
    this.gated.coverageChanged();
    this.subscribeCovered();
  }

  /**
   * Receive what the hub sends down for our MCUs: two wildcard subscriptions
   * (`fleet/v1/d/+/cmd`, `…/+/desired`) that the hub filters per message to the MCUs this
   * gateway registered (hub/acl.ts RELAY_FILTERS, mayReceive). One retained scan at the hub
   * per subscribe, whatever the number of MCUs. Sent behind a register on the same
   * connection, so the hub knows the delegation. Subscribing again is how MCUs registered
   * later get their retained desired state (MQTT 3.1.1 §3.8.4: a repeated SUBSCRIBE re-sends
   * the retained messages); that repeat waits at least RESUBSCRIBE_MS after the last one, so a
   * site where MCUs keep arriving does not make the hub scan continuously.
   */
  private subscribeCovered(): void {
    if (!this.opts.onDown || this.subscribeInFlight || this.subscribedUpTo >= this.registeredUpTo) return;
    if (!this.opts.client.connected || this.opts.client.disconnecting || this.stopped) return;
    const wait = this.lastSubAckAt + RESUBSCRIBE_MS - Date.now();
    if (this.subscribedUpTo > 0 && wait > 0) {
      this.resubTimer ??= setTimeout(() => {
        this.resubTimer = null;
        this.subscribeCovered();
      }, wait);
      return;
    }
    const to = this.registeredUpTo;
    const topics: Record<string, { qos: 1 }> = {};
    // commands are not retained: one subscription per connection is enough
    if (this.subscribedUpTo === 0) topics[RELAY_CMD] = { qos: 1 };
    topics[RELAY_DESIRED] = { qos: 1 };
    const gen = this.connGen;
    this.subscribeInFlight = true;
    this.opts.client.subscribe(topics, (err, granted) => {
      if (gen !== this.connGen) return;
      this.subscribeInFlight = false;
      this.lastSubAckAt = Date.now();
      if (err || granted?.some((g) => g.qos === 128)) {
        if (this.stopped) return;
        // tried again later, not at once: mqtt.js fails a subscribe on a disconnecting client
        // from inside subscribe() (this recursed until the stack overflowed), and a hub that
        // refuses would be asked again in a tight loop. Once a minute, logged once per
        // connection (a refusing hub does not change its mind within one).
        if (!this.subscribeWarned) this.opts.log.warn('subscribing to MCU commands and desired state failed (an older hub?); trying again every minute', { err, granted });
        this.subscribeWarned = true;
        this.resubTimer ??= setTimeout(() => {
          this.resubTimer = null;
          this.subscribeCovered();
        }, SUBSCRIBE_RETRY_MS);
        this.resubTimer.unref();
        return;
      }
      this.subscribedUpTo = to;
      this.subscribeCovered();
    });
  }

  private async handleDown(topic: string, payload: Buffer): Promise<void> {
    if (topic === MCU_REVOCATIONS_TOPIC) {
      try {
        this.opts.onRevocations?.(payload, this.connGen);
      } catch (err) {
        this.opts.log.error('applying the hub\'s MCU revocation list failed', { err });
      }
      return;
    }
    const t = parseTopic(topic);
    if (!t || (t.channel !== 'cmd' && t.channel !== 'desired')) return;
    if (!this.mcus.has(t.deviceId)) {
      // forgotten here (silent for mcu.forgetAfterDays) while the hub still delegated it: the
      // hub learns from the next register; said here, so the command is not lost in silence
      if (t.channel === 'cmd') this.opts.log.warn('command from the hub for an MCU this gateway no longer acts for; dropped', { mcu: t.deviceId });
      return;
    }
    try {
      await this.opts.onDown?.(t.deviceId, t.channel, payload);
    } catch (err) {
      this.opts.log.error('handling a message from the hub for an MCU failed', { mcu: t.deviceId, channel: t.channel, err });
    }
  }


  /** True once after the MCU list changed (the owner persists it). */
  takeChanged(): boolean {
    const c = this.changed;
    this.changed = false;
    return c;
  }

  /** MCUs whose cmd and desired are subscribed at the hub on this connection */
  get downlinkMcus(): number {
    return this.subscribedUpTo;
  }

  /** the MCU ids in registration order, read as the walk reaches them */
  mcuIdIterator(): Iterator<string> {
    return this.mcus.keys();
  }

  get hubConnected(): boolean {
    return this.opts.client.connected;
  }

  /** MCU messages delivered to the hub (PUBACKed), a grouped record counting each message */
  get uplinkSent(): number {
    return this.gated.ackedMessages;
  }

  /** records and publishes awaiting the hub's PUBACK now */
  get uplinkInFlight(): { records: number; publishes: number } {
    const s = this.uplink.stats();
    return { records: s.inFlight, publishes: s.inFlightPublishes };
  }

  counts(): { mcus: number; online: number; byProtocol: Record<McuProtocol, number> } {
    let online = 0;
    const byProtocol: Record<McuProtocol, number> = { mqtt: 0, coap: 0 };
    for (const e of this.mcus.values()) {
      if (e.online) online++;
      if (e.protocol) byProtocol[e.protocol]++;
    }
    return { mcus: this.mcus.size, online, byProtocol };
  }

  /** stop() finished: nothing is published any more */
  private disposed = false;

  /**
   * Report every online MCU offline ("gateway stopped"), then give the uplink up to
   * `drainMs` to deliver what is queued while the hub is reachable.
   */
  async stop(drainMs = 2000): Promise<void> {
    if (this.stopped) return;
    this.stopped = true;
    clearInterval(this.sweepTimer);
    const now = this.now();
    for (const [id, e] of this.mcus) {
      if (!e.online) continue;
      e.online = false;
      e.gapEndsLost = true;
      this.publishState(id, { v: 1, online: false, kind: 'mcu', ts: now, via: this.opts.gatewayId, reason: 'gateway stopped' });
    }
    const deadline = Date.now() + drainMs;
    while (Date.now() < deadline && this.opts.client.connected) {
      if (this.opts.outbox.stats().depth === 0 && this.pendingState.size === 0 && this.statesInFlight === 0 && !this.registerInFlight && !this.subscribeInFlight) break;
      await new Promise((r) => setTimeout(r, 20));
    }
    if (this.resubTimer) clearTimeout(this.resubTimer);
    this.resubTimer = null;
    if (this.registerTimer) clearTimeout(this.registerTimer);
    this.registerTimer = null;
    this.uplink.stop();
    this.gated.dispose();
    // stopped for good: a publish callback that comes later (the client's in-flight messages
    // are failed when it ends) sends nothing again
    this.disposed = true;
    this.opts.client.off('connect', this.onConnect);
    this.opts.client.off('close', this.onClose);
  }
}

/**
 * The outbox as the Uplink sees it: records of MCUs not yet covered by a register on
 * this connection are hidden (and a register is requested), so the Uplink can never
 * send them ahead of it. Everything else passes straight through to the real outbox.
 */
class GatedOutbox extends EventEmitter implements Outbox {
  private retryTimer: NodeJS.Timeout | undefined;
  /** messages in grouped records, by record id, from when written (noteGroup) or first peeked until acked */
  private readonly groupSizes = new Map<string, number>();
  /** records held back (an MCU not covered by a register) since the last register was sent */
  private readonly parked = new Set<string>();
  /**
   * the MCUs of the parked records: a later record naming any of them is held back too, so
   * an MCU's messages reach the hub in the order they were stored (a grouped record restored
   * after a crash can name an MCU the saved list lacks: its other MCUs wait with it)
   */
  private readonly blocked = new Set<string>();
  /** the MCUs of grouped records seen by peek, by record id, until acked */
  private readonly groupMcus = new Map<string, readonly string[]>();
  /** MCU messages acknowledged by the hub (a grouped record counts its items) */
  ackedMessages = 0;

  constructor(
    private readonly inner: Outbox,
    /** the gateway's batch topic: records there hold several MCUs' telemetry */
    private readonly batchTopic: string,
    private readonly covered: (mcuId: string) => boolean,
    private readonly requestRegister: () => void,
    /** told of records whose MCU the relay does not know; false if it can never be registered */
    private readonly adopt: (mcuId: string) => boolean,
  ) {
    super();
    inner.on('appended', () => this.kick());
    inner.on('evicted', (e: EvictionEvent) => this.emit('evicted', e));
  }

  /**
   * A grouped record `id` is being written with one message for each of `mcuIds` (in item
   * order). Its MCUs and size are then known without decoding it, as for every record this
   * gateway grouped since it started (decoding each on peek was 5% of the gateway's CPU at
   * 10,000 MCUs); a record from before a restart is decoded once.
   */
  noteGroup(id: string, mcuIds: readonly string[]): void {
    if (this.groupMcus.size >= 100_000) this.groupMcus.clear(); // bounded: a cache
    this.groupMcus.set(id, mcuIds.length === 1 ? mcuIds : [...new Set(mcuIds)]);
    if (this.groupSizes.size >= 100_000) this.groupSizes.clear(); // bounded: records evicted unsent stay until then
    this.groupSizes.set(id, mcuIds.length);
  }

  /** A record noted by noteGroup that was not stored. */
  forgetGroup(id: string): void {
    this.groupMcus.delete(id);
    this.groupSizes.delete(id);
  }

  /**
   * The MCUs a record is for: its topic's device, or every item's of a grouped record
   * (decoded once: a record held back waiting for a register is looked at on every peek).
   */
  private mcusOf(rec: OutboxRecord): readonly string[] | null {
    if (rec.topic !== this.batchTopic) {
      const id = parseTopic(rec.topic)?.deviceId;
      return id === undefined ? null : [id];
    }
    const known = this.groupMcus.get(rec.id);
    if (known) return known;
    try {
      const ids = [...new Set(decodeBatch(rec.payload).flatMap((it) => (it.topic === RECORD_TOPIC ? [] : [parseTopic(it.topic)?.deviceId ?? ''])))];
      if (this.groupMcus.size >= 100_000) this.groupMcus.clear(); // bounded: a cache
      this.groupMcus.set(rec.id, ids);
      return ids;
    } catch {
      return null; // not ours to judge: the hub refuses a malformed batch
    }
  }

  /**
   * May a record for these MCUs go now? Each must be covered by a register (unknown ones are
   * adopted; one that cannot be registered at all is let through, for the hub to keep as a
   * dead letter rather than held here forever), and none may have an earlier record held back.
   */
  private sendable(ids: readonly string[]): boolean {
    let all = true;
    for (const id of ids) {
      if (this.covered(id)) continue;
      if (!this.adopt(id)) continue;
      if (!this.covered(id)) all = false;
    }
    if (!all || this.blocked.size === 0) return all;
    for (const id of ids) if (this.blocked.has(id)) return false;
    return true;
  }

  /** Wake the Uplink: there is something new, or records it could not send may be sendable now. */
  kick(): void {
    this.emit('appended');
  }

  /**
   * A register was sent: records held back may be sendable now. Forgets which records were
   * held back (each is judged again once) and wakes the Uplink.
   */
  coverageChanged(): void {
    this.parked.clear();
    this.blocked.clear();
    this.emit('appended');
  }

  append(entry: OutboxAppend): Promise<OutboxRecord> {
    return this.inner.append(entry);
  }

  async peek(max: number, exclude?: ReadonlySet<string>): Promise<OutboxRecord[]> {
    const first = await this.visible(max, exclude);
    if (!first.hidden) return first.records;
    this.requestRegister(); // may send a register right now that covers them
    const second = await this.visible(max, exclude);
    if (second.hidden) this.retryLater();
    return second.records;
  }

  /** Up to `max` records of covered MCUs; `hidden` when records of others were passed over. */
  private async visible(max: number, exclude?: ReadonlySet<string>): Promise<{ records: OutboxRecord[]; hidden: boolean }> {
    const records: OutboxRecord[] = [];
    let hidden = false;
    // later rounds must skip everything seen so far, returned or passed over: the ids of
    // this call on top of the caller's (not a copy of those: at a backlog the Uplink has
    // thousands in flight, and copying them on every peek was a visible part of its CPU)
    const mine = new Set<string>();
    // records held back since the last register are skipped without being looked at again:
    // with thousands of them (a register slow to come back at a busy hub) judging them on every
    // peek — every append wakes the Uplink — took the whole CPU (measured at 8,000 MCUs)
    const parked = this.parked;
    const seen = { has: (id: string) => mine.has(id) || parked.has(id) || exclude?.has(id) === true, get size() { return mine.size + parked.size + (exclude?.size ?? 0); } } as unknown as ReadonlySet<string>;
    // a few rounds, so records of covered MCUs behind a run of uncovered ones still go
    for (let round = 0; round < 4 && records.length < max; round++) {
      const want = max - records.length;
      const batch = await this.inner.peek(want, seen);
      let passedOver = 0;
      for (const rec of batch) {
        mine.add(rec.id);
        const ids = this.mcusOf(rec);
        if (ids === null || this.sendable(ids)) {
          records.push(rec);
          if (rec.topic === this.batchTopic && !this.groupSizes.has(rec.id)) this.groupSizes.set(rec.id, countItems(rec.payload, false));
        } else {
          passedOver++;
          this.parked.add(rec.id);
          for (const id of ids) this.blocked.add(id);
        }
      }
      if (passedOver > 0) hidden = true;
      // nothing passed over, or the outbox has no more: another round finds nothing new
      if (passedOver === 0 || batch.length < want) break;
    }
    return { records, hidden };
  }

  /**
   * Hidden records become sendable when the register's PUBACK arrives, which no append
   * announces: wake the Uplink again shortly while records are hidden.
   */
  private retryLater(): void {
    this.retryTimer ??= setTimeout(() => {
      this.retryTimer = undefined;
      this.emit('appended');
    }, 50).unref();
  }

  ack(ids: readonly string[]): Promise<void> {
    return this.inner.ack(ids).then(() => {
      for (const id of ids) {
        const n = this.groupSizes.get(id);
        this.ackedMessages += n ?? 1;
        if (n !== undefined) this.groupSizes.delete(id);
        this.groupMcus.delete(id);
      }
    });
  }

  stats(): OutboxStats {
    return this.inner.stats();
  }

  close(): Promise<void> {
    clearTimeout(this.retryTimer);
    return this.inner.close();
  }

  /** Stop waking the Uplink (the relay is stopping). */
  dispose(): void {
    clearTimeout(this.retryTimer);
    this.retryTimer = undefined;
  }
}
