import type { Duplex } from 'node:stream';
import { setTimeout as sleep } from 'node:timers/promises';
import { Aedes, type AedesPublishPacket, type AuthenticateError, type Client, type PublishPacket, type Subscription } from 'aedes';
import aedesPersistenceLevel, { type LevelPersistence } from 'aedes-persistence-level';
import type { Level } from 'level';
import { decodeBatch, parseRecordMarker, peekMid, RECORD_TOPIC, type BatchItem } from '../core/batch.ts';
import { deriveToken } from '../core/credentials.ts';
import { FleetError } from '../core/errors.ts';
import { secretEquals } from '../core/http.ts';
import type { Logger } from '../core/log.ts';
import { warmMqttPacketLengths } from '../core/mqtt-packet-lengths.ts';
import { decodeMessage, type StateMessage } from '../core/messages.ts';
import type { Counter } from '../core/metrics.ts';
import { deviceTopic, isDeviceId, MCU_REVOCATIONS_TOPIC, parseTopic, type Channel } from '../core/topics.ts';
import { canPublish, canSubscribe, deviceRuleBroken, mayReceive, type Identity } from './acl.ts';
import type { DeadLetterInput } from './dead-letters.ts';
import type { Deduplicator, PendingMid } from './dedup.ts';
import { CopyFilter, ReplayGate, disableCounterDedupe, orderPersistence } from './delivery-order.ts';
import { OutgoingIds } from './packet-ids.ts';

export interface BrokerOptions {
  db: Level<string, Buffer>;
  log: Logger;
  fleetSecret: string;
  operatorToken: string;
  maxPayloadBytes: number;
  /** remembers recent mids per device; owned by the caller */
  dedup: Deduplicator;
  denied: Counter;
  authFailures: Counter;
  /** messages dropped as invalid, label `channel` (`batch` for a malformed batch) */
  invalid: Counter;
  /** messages dropped as duplicates (direct and inside batches) */
  duplicates: Counter;
  /** batches unpacked */
  batches: Counter;
  /** batch items, label `result`: routed, duplicate, denied, invalid */
  batchItems: Counter;
  /** told about every duplicate dropped, with the device the message belongs to */
  onDuplicate?: (deviceId: string) => void;
  /**
   * The hub's own consumer of outbox messages (registry): called for every message routed,
   * once its publish went through, in wire order. Called directly instead of through a broker
   * subscription, which cost a match and a dispatch per message on top of the topic parse
   * done here already.
   */
  onRouted?: (deviceId: string, channel: Channel, payload: Buffer) => void;
  /**
   * When onRouted defers its work: a promise of that work being done (null when nothing is
   * pending). A routed message is acknowledged only after it, so a PUBACK still means the
   * hub's own consumer has seen the message too.
   */
  whenConsumed?: () => Promise<void> | null;
  /**
   * Told of every message acknowledged but not routed, other than duplicates: refused by
   * the ACL, over the payload limit, malformed or without a mid (hub/dead-letters.ts keeps
   * them). `from` is the client id of the sender.
   */
  onRefused?: (from: string, items: DeadLetterInput[]) => void;
  /**
   * An MCU claimed by one gateway moves to another that lists it in its register and sends
   * for it, once the first is offline or has sent nothing for the MCU this long (ms).
   * Default 5 minutes.
   */
  mcuClaimIdleMs?: number;
  /** MCU claims moved from one gateway to another */
  claimsMoved?: Counter;
  /** Is `id` a device that connects to the hub itself (an agent or gateway, connected now or before)? Such an id is never an MCU. */
  isDevice?: (id: string) => boolean;
  /** MCUs revoked fleet-wide (hub/revocations.ts): no gateway acts for them */
  isRevokedMcu?: (id: string) => boolean;
  /** agents and gateways whose tokens are revoked (hub/revocations.ts): CONNACK 5, and no publish of theirs is taken */
  isRevokedDevice?: (id: string) => boolean;
  /** told of every device that authenticated (the registry remembers it as a direct device) */
  onDeviceAuthenticated?: (id: string) => void;
}

export const OPERATOR_USERNAME = 'operator';
/**
 * Sinks for publishes the hub acknowledges but routes nowhere (after routing their content
 * itself, for outbox messages and batches). '#' and '+' never match a topic starting with
 * '$' [MQTT-4.7.2-1], the ACL lets nobody subscribe under `$fleetlet/`, they are never
 * queued for a durable subscriber and authorizeForward refuses them, so they reach no one.
 */
export const SINK_PREFIX = '$fleetlet/';
/** refused by the ACL, or invalid (no mid, malformed batch) */
export const REFUSED_TOPIC = '$fleetlet/refused';
/** a duplicate of a message already routed */
export const DUPLICATE_TOPIC = '$fleetlet/duplicate';
/** a batch, once the hub has routed its items to their own topics */
export const BATCH_TOPIC = '$fleetlet/batch';
/** an outbox message, once the hub has routed it on the sender's behalf */
export const ROUTED_TOPIC = '$fleetlet/routed';

/** Channels that go through the device outbox: they carry a mid and may travel in a batch. */
export const OUTBOX_CHANNELS: ReadonlySet<Channel> = new Set<Channel>(['telemetry', 'events', 'logs', 'reply']);

const EMPTY = Buffer.alloc(0);
/** Refused batch items, and MCUs a register could not take, are logged once per message with this many examples. */
const LOG_EXAMPLES = 3;

/**
 * What the hub does with one outbox message: route it, or divert it to a sink. `first`: it
 * is a duplicate whose first copy is still being routed; its PUBACK waits for that
 * (Deduplicator.settling).
 */
type Verdict = { route: true; pending: PendingMid } | { route: false; sink: string; first?: Promise<boolean> };

/**
 * The hub's aedes broker with device identity and ACLs. Every client authenticates:
 * devices as username = client id = device id with their derived token, operators
 * (dashboards, consumers) as `operator` with the operator token. There is no anonymous
 * access, on loopback either.
 */
export class HubBroker {
  readonly aedes: Aedes;
  private readonly identities = new WeakMap<Client, Identity>();
  /** gateway id → MCU ids it acts for (from its retained register message) */
  private readonly delegations = new Map<string, Set<string>>();
  /** MCU id → the gateway that holds its claim */
  private readonly claimedBy = new Map<string, string>();
  /** gateway id → every MCU id its register lists (also those another gateway holds) */
  private readonly wanted = new Map<string, Set<string>>();
  /** MCU id → when its holder last claimed it or sent for it, ms */
  private readonly claimActive = new Map<string, number>();
  /** connected device ids, operators not included (a count: a takeover connects before the old one is gone) */
  private readonly online = new Map<string, number>();
  /** everything still routing, for close() to wait on */
  private readonly routing = new Set<Promise<void>>();
  /** connected clients (registered with aedes), for drain() */
  private readonly clients = new Set<Client>();
  private readonly copies: CopyFilter;
  private readonly gate: ReplayGate;
  private orderFixMissing = false;

  private constructor(
    aedes: Aedes,
    private readonly persistence: LevelPersistence,
    private readonly readQueue: LevelPersistence['outgoingStream'],
    gate: ReplayGate,
    /** packet ids durable queues hold (read by the tests too) */
    readonly ids: OutgoingIds,
    private readonly opts: BrokerOptions,
  ) {
    this.aedes = aedes;
    this.copies = new CopyFilter(aedes.id);
    this.gate = gate;
  }

  static async create(opts: BrokerOptions): Promise<HubBroker> {
    // queue writes complete in call order, the sinks are never queued, and a durable
    // client's reconnect replay does not overlap its live deliveries: hub/delivery-order.ts
    const gate = new ReplayGate();
    // packet ids a durable client's queue still holds: new deliveries skip them (hub/packet-ids.ts)
    const ids = new OutgoingIds();
    await ids.load(opts.db);
    const store = ids.track(aedesPersistenceLevel(opts.db));
    // the stop's check for unacknowledged deliveries reads a queue as it is: through the gate
    // it would take the snapshot of a client whose replay has not started yet
    const readQueue = store.outgoingStream.bind(store);
    const persistence = gate.wrap(
      orderPersistence(
        store,
        // the sinks, and the MCU revocation list: a gateway gets that (retained) on every
        // connection's SUBSCRIBE, and no operator receives it (hub/acl.ts mayReceive)
        (topic) => topic.startsWith(SINK_PREFIX) || topic === MCU_REVOCATIONS_TOPIC,
        gate,
      ),
    );
    // A new id at every start: durable queues are keyed by (broker id, counter) and the
    // counter starts again at 0, so a fixed id would reuse keys of entries still queued.
    // Base-36 milliseconds keep the ids of successive starts in sorting order, and with them
    // the replay order of what different runs queued.
    skipCleanPubackLookup(persistence);
    quietRetainedScans(persistence, opts.log);
    // concurrency: publishes mqemitter delivers at once before it queues the rest (aedes'
    // default 100). A gateway's batch is routed as one publish per item and acknowledged when
    // all are delivered, and aedes reads that connection's next packets only then: with 100,
    // a batch of thousands of MCU readings went through in waves of 100, each a few turns of
    // the event loop, and the gateway's uplink queued behind it (seconds of latency at 8,000
    // MCUs with the hub's CPU not saturated).
    // aedes writes with mqtt-packet: its cache of packet lengths, made in one go (core/mqtt-packet-lengths.ts)
    warmMqttPacketLengths();
    const aedes = await Aedes.createBroker({ persistence, id: `fleetlet-hub-${Date.now().toString(36)}`, concurrency: 10_000 });
    const hub = new HubBroker(aedes, persistence, readQueue, gate, ids, opts);
    aedes.authenticate = hub.authenticate;
    aedes.authorizePublish = hub.authorizePublish;
    aedes.authorizeSubscribe = hub.authorizeSubscribe;
    aedes.authorizeForward = hub.authorizeForward;
    aedes.on('client', (client) => {
      hub.clients.add(client);
      // devices only: an operator's client id says nothing about the fleet's device ids
      if (hub.identities.get(client)?.kind === 'device') hub.online.set(client.id, (hub.online.get(client.id) ?? 0) + 1);
      // revoked between its authentication and now (aedes reads the session in between):
      // closed here, so revokeDevice, which closes the clients it knows, misses none
      if (hub.identities.get(client)?.kind === 'device' && opts.isRevokedDevice?.(client.id)) client.close();
    });
    aedes.on('clientDisconnect', (client) => {
      if (!hub.clients.delete(client) || hub.identities.get(client)?.kind !== 'device') return;
      const n = (hub.online.get(client.id) ?? 1) - 1;
      if (n > 0) hub.online.set(client.id, n);
      else hub.online.delete(client.id);
    });
    aedes.on('clientError', (client, err) => opts.log.debug('mqtt client error', { client: client?.id, err }));
    aedes.on('connectionError', (client, err) => opts.log.debug('mqtt connection error', { client: client?.id, err }));
    return hub;
  }

  /** MCUs a gateway acts for. */
  mcusOf = (gatewayId: string): ReadonlySet<string> | undefined => this.delegations.get(gatewayId);

  private authenticate = (client: Client, username: string | undefined, password: Buffer | undefined, done: (err: AuthenticateError | null, ok: boolean | null) => void): void => {
    const fail = (why: string, returnCode: 4 | 5 = 4) => {
      this.opts.authFailures.inc();
      this.opts.log.warn('mqtt authentication refused', { code: returnCode === 5 ? 'FLEET_DEVICE_REVOKED' : 'FLEET_AUTH_FAILED', client: client.id, username, why });
      const err = new Error(`not authorized: ${why}`) as AuthenticateError;
      // 4 bad user name or password, 5 not authorized [MQTT-3.2.2-3 table 3.1]
      err.returnCode = returnCode;
      done(err, null);
    };
    const pw = password?.toString('utf8') ?? '';
    if (username === OPERATOR_USERNAME) {
      if (!secretEquals(pw, this.opts.operatorToken)) return fail('wrong operator token');
      this.identities.set(client, { kind: 'operator' });
      this.fixDeliveryOrder(client);
      return done(null, true);
    }
    if (!isDeviceId(username)) return fail('username is not a device id');
    if (client.id !== username) return fail('client id must equal the device id');
    if (!secretEquals(pw, deriveToken(this.opts.fleetSecret, 'device', username))) return fail('wrong device token');
    // checked after the token: only its holder learns that it is revoked
    if (this.opts.isRevokedDevice?.(username)) return fail('FLEET_DEVICE_REVOKED: the device is revoked at the hub', 5);
    // a valid device token proves the id is a device of the fleet, not an MCU: a gateway
    // that listed it (a device not yet connected, or an MCU id that collides) loses the claim,
    // and with it the device's desired state, commands and artifacts (refusing the device
    // instead locked it out for as long as the claim stood)
    this.releaseDeviceId(username);
    this.identities.set(client, { kind: 'device', id: username });
    this.opts.onDeviceAuthenticated?.(username);
    this.fixDeliveryOrder(client);
    done(null, true);
  };

  /** Before the client can subscribe: see hub/delivery-order.ts. */
  private fixDeliveryOrder(client: Client): void {
    if (!client.clean) {
      this.gate.begin(client);
      this.ids.guard(client);
    }
    if (disableCounterDedupe(client, this.aedes.id) || this.orderFixMissing) return;
    this.orderFixMissing = true;
    this.opts.log.error('aedes internals changed (client.duplicates): QoS 1 deliveries reordered by persistence may be lost');
  }

  private authorizeForward = (client: Client, packet: AedesPublishPacket): AedesPublishPacket | null => {
    // the sinks: live delivery skips them for '#' and '+' subscribers already, and
    // orderPersistence keeps them out of durable queues; this also covers queue entries
    // written before (an older hub) that a durable '#' subscriber would get replayed
    if (packet.topic.startsWith(SINK_PREFIX)) return null;
    if (!mayReceive(this.identities.get(client), packet.topic, this.mcusOf)) return null;
    if (!this.gate.mayForward(client, packet)) return null;
    return this.copies.isCopy(client, packet) ? null : packet;
  };

  private authorizePublish = (client: Client | null, packet: PublishPacket, done: (err?: Error | null) => void): void => {
    // Only PUBLISH packets from the wire and last wills come through here: aedes.publish()
    // (the hub's own publishes, batch items included) does not call this hook in aedes 1.2,
    // so routed items are never checked or de-duplicated twice. Null is a guard.
    if (client === null) return done(null);
    const identity = this.identities.get(client);
    if (!identity) return done(new Error('publish refused: not authenticated'));
    // revoked while connected: what its closing session still sends is not taken (no PUBACK)
    if (identity.kind === 'device' && this.opts.isRevokedDevice?.(identity.id)) return done(new Error('publish refused: the device is revoked at the hub'));
    const deny = (why: string, reason: DeadLetterInput['reason'] = 'acl') => {
      this.opts.onRefused?.(client.id, [{ topic: packet.topic, payload, reason, detail: why }]);
      this.opts.denied.inc({ action: 'publish' });
      this.opts.log.warn('mqtt publish refused', { client: client.id, topic: packet.topic, why });
      // MQTT 3.1.1 cannot refuse one PUBLISH, and closing the connection (aedes' answer to
      // an error here) makes an at-least-once sender resend the same record forever. So the
      // publish is acknowledged and diverted to a sink topic that reaches no one.
      divert(packet, REFUSED_TOPIC);
      done(null);
    };
    const payload = Buffer.isBuffer(packet.payload) ? packet.payload : Buffer.from(packet.payload);
    if (payload.length > this.opts.maxPayloadBytes) return deny(`payload of ${payload.length} bytes exceeds ${this.opts.maxPayloadBytes}`, 'too_large');
    if (!canPublish(identity, packet.topic, packet.retain, this.mcusOf) && !this.claimMoves(identity, packet.topic, packet.retain, payload)) {
      const pt = identity.kind === 'device' ? parseTopic(packet.topic) : null;
      const rule = identity.kind === 'device' ? deviceRuleBroken(identity, packet.topic, packet.retain) : null;
      return deny(rule ? `topic outside the ACL: ${rule}` : identity.kind === 'device' && pt && pt.deviceId !== identity.id ? `topic outside the ACL: ${this.whyDenied(identity.id, pt, payload, true)}` : 'topic outside the ACL');
    }
    const t = parseTopic(packet.topic);
    if (!t || identity.kind !== 'device') return done(null); // operators: cmd and desired
    if (t.channel === 'state' && t.deviceId !== identity.id) {
      // a gateway speaks for its MCU: the state must say so, or the registry would file the
      // MCU as another kind (a fleet-wide MCU revocation then left it shown online) or under
      // another gateway (taken offline with that one)
      const why = mcuStateProblem(payload, identity.id);
      if (why) return deny(`state of MCU ${t.deviceId}: ${why}`, 'invalid');
    }
    if (t.channel === 'register') {
      try {
        this.applyRegistration(identity.id, decodeMessage('register', payload).mcus);
      } catch (err) {
        return deny(`bad register message: ${(err as Error).message}`, 'invalid');
      }
    }
    if (t.channel === 'batch') return this.acknowledgeAfter(client, packet, done, this.routeBatch(client, identity, payload));
    if (!OUTBOX_CHANNELS.has(t.channel)) return done(null); // state, register: aedes routes them after the PUBACK
    const v = this.judge(t.deviceId, t.channel, payload);
    if (!v.route) {
      if (v.sink === REFUSED_TOPIC) this.opts.onRefused?.(client.id, [{ topic: packet.topic, payload, reason: 'invalid', detail: 'outbox message without a mid' }]);
      if (v.first) return this.acknowledgeAfter(client, packet, done, afterFirstCopies([v.first], v.sink));
      divert(packet, v.sink);
      return done(null);
    }
    // Outbox messages are routed by the hub, now, and acknowledged once routed. Left to
    // aedes, the message would be published only after its PUBACK was written, and not at
    // all when that write fails (connection lost while waiting for the socket to drain):
    // its mid admitted, the sender's resend would then be dropped as a duplicate.
    // Starting every route here also keeps the wire order (see route()).
    if (t.deviceId !== identity.id && isMcuContact(t.channel, payload)) this.claimActive.set(t.deviceId, Date.now());
    const routed = this.route([{ topic: packet.topic, deviceId: t.deviceId, channel: t.channel, payload, qos: packet.qos, pending: v.pending, record: null, mid: null, ok: false }]).then(() => ROUTED_TOPIC);
    this.acknowledgeAfter(client, packet, done, routed);
  };

  /**
   * Route or divert one outbox message of `deviceId` by its mid. A mid admitted is
   * persisted only once its message is routed (PendingMid.confirm).
   */
  private judge(deviceId: string, channel: Channel, payload: Buffer): Verdict {
    const mid = peekMid(payload);
    if (mid === null) {
      this.opts.invalid.inc({ channel });
      this.opts.log.warn('outbox message without a mid refused', { device: deviceId, channel });
      return { route: false, sink: REFUSED_TOPIC };
    }
    const pending = this.opts.dedup.admitPending(deviceId, mid);
    if (pending) return { route: true, pending };
    const first = this.opts.dedup.settling(deviceId, mid);
    this.duplicate([deviceId], first);
    return { route: false, sink: DUPLICATE_TOPIC, first: first ?? undefined };
  }

  /**
   * Count a duplicate for each of `deviceIds`. While the first copy is still being routed
   * (`first`), only once it was: if its routing fails, this copy is refused too (no PUBACK)
   * and the sender's next resend is no duplicate, so this one was not either.
   */
  private duplicate(deviceIds: readonly string[], first: Promise<boolean> | null = null): void {
    const count = (): void => {
      try {
        this.opts.duplicates.inc({}, deviceIds.length);
        if (this.opts.onDuplicate) for (const id of deviceIds) this.opts.onDuplicate(id);
      } catch (err) {
        // run from a promise callback below: a throw there would be an unhandled rejection
        this.opts.log.error('counting a duplicate failed', { err });
      }
    };
    if (first === null) return count();
    // after the hub's own consumer has seen the first copy too: the registry counts
    // duplicates only for devices it knows, and a first message makes it know them
    void first.then((routed) => routed && this.afterConsumed(count));
  }

  /** Run `fn` once the hub's own consumer has seen what was routed so far (at once if it has). */
  private afterConsumed(fn: () => void): void | Promise<void> {
    const consumed = this.opts.whenConsumed?.() ?? null;
    return consumed === null ? fn() : consumed.then(fn);
  }

  /**
   * Unpack a batch (docs/topics.md#batches) and route its items; resolves to the sink the
   * batch packet itself goes to. Every item is judged in order (ACL of the sender, mid,
   * duplicate), so a repeat inside the batch is caught too; then the accepted items are
   * routed. Everything up to the start of their publishes runs synchronously, before the
   * first await, so they start in wire order after the sender's earlier publishes.
   *
   * Items after a record marker (core/batch.ts RECORD_TOPIC: a gateway's grouped MCU
   * telemetry) are de-duplicated as one record by its mid in the sender's window, not each in
   * its MCU's: one admission per record, and no window per MCU (docs/topics.md#records).
   */
  private async routeBatch(client: Client, identity: Identity & { kind: 'device' }, payload: Buffer): Promise<string> {
    let items: BatchItem[];
    try {
      items = decodeBatch(payload);
    } catch (err) {
      this.opts.invalid.inc({ channel: 'batch' });
      this.opts.log.warn('malformed batch refused', { client: client.id, err });
      this.opts.onRefused?.(client.id, [{ topic: deviceTopic(identity.id, 'batch'), payload, reason: 'invalid', detail: `malformed batch: ${(err as Error).message}` }]);
      return REFUSED_TOPIC;
    }
    this.opts.batches.inc();
    const j: BatchJudgement = { accepted: [], refused: [], dead: [], denied: 0, mcuItems: 0, firsts: [], records: [] };
    try {
      this.judgeBatch(identity, items, j);
    } catch (err) {
      // nothing was routed: what was admitted is forgotten, or a resend would wait on it forever
      for (const it of j.accepted) it.pending?.forget();
      for (const r of j.records) r.abort();
      throw err;
    }
    await this.route(j.accepted);
    this.opts.batchItems.inc({ result: 'routed' }, j.accepted.length);
    return j.firsts.length === 0 ? BATCH_TOPIC : afterFirstCopies(j.firsts, BATCH_TOPIC);
  }

  /** routeBatch's judging: every item in order, into `j` (nothing routed yet). */
  private judgeBatch(identity: Identity & { kind: 'device' }, items: readonly BatchItem[], j: BatchJudgement): void {
    for (let i = 0; i < items.length; ) {
      const item = items[i++]!;
      if (item.topic !== RECORD_TOPIC) {
        this.judgeItem(identity, item, null, j);
        continue;
      }
      const marker = parseRecordMarker(item.payload);
      if (marker === null || marker.items > items.length - i) {
        // not a marker to trust: kept as a dead letter, and the items after it are judged one by one
        this.opts.invalid.inc({ channel: 'batch' });
        this.opts.batchItems.inc({ result: 'invalid' });
        j.dead.push({ topic: item.topic, payload: item.payload, reason: 'invalid', detail: marker === null ? 'malformed record marker' : `record marker for ${marker.items} items, ${items.length - i} follow` });
        continue;
      }
      const end = i + marker.items;
      const pending = this.opts.dedup.admitPending(identity.id, marker.mid);
      if (pending === null) {
        const first = this.opts.dedup.settling(identity.id, marker.mid);
        if (first !== null) j.firsts.push(first);
        // the whole record was handled before (the sender resent it): counted as duplicates,
        // each for its device when the sender may publish for it (else for the sender: the
        // marker must not let it charge anyone's count)
        const ids: string[] = [];
        for (; i < end; i++) {
          const t = parseTopic(items[i]!.topic);
          ids.push(t && OUTBOX_CHANNELS.has(t.channel) && canPublish(identity, items[i]!.topic, false, this.mcusOf) ? t.deviceId : identity.id);
        }
        this.duplicate(ids, first);
        this.opts.batchItems.inc({ result: 'duplicate' }, marker.items);
        continue;
      }
      const record = new RecordRoute(pending, this.opts.dedup);
      j.records.push(record);
      for (; i < end; i++) this.judgeItem(identity, items[i]!, record, j);
      record.sealed();
    }
    const { accepted, refused, dead, denied } = j;
    if (denied > 0) {
      this.opts.denied.inc({ action: 'publish' }, denied);
      this.opts.log.warn('batch items refused by the ACL (kept as dead letters)', { client: identity.id, denied, of: items.length, examples: refused });
    }
    if (dead.length > 0) this.opts.onRefused?.(identity.id, dead);
    if (j.mcuItems > 0) {
      const now = Date.now();
      for (const it of accepted) if (it.deviceId !== identity.id && isMcuContact(it.channel, it.payload)) this.claimActive.set(it.deviceId, now);
    }
  }

  /**
   * One batch item: the sender's ACL, its mid, and whether it is a duplicate — judged in the
   * item's device window, or, inside a record, only looked up there (an item routed by an
   * attempt of the record that failed half-way is remembered there: RecordRoute).
   */
  private judgeItem(identity: Identity & { kind: 'device' }, item: BatchItem, record: RecordRoute | null, j: BatchJudgement): void {
    const t = parseTopic(item.topic);
    // only outbox channels travel in a batch: a state or register item would lose its
    // retain flag (and register its effect on the ACL), a nested batch would reach
    // subscribers as raw bytes
    if (!t || !OUTBOX_CHANNELS.has(t.channel) || (!canPublish(identity, item.topic, false, this.mcusOf) && !this.claimMoves(identity, item.topic, false, item.payload))) {
      j.denied++;
      if (j.refused.length < LOG_EXAMPLES) j.refused.push(item.topic);
      this.opts.batchItems.inc({ result: 'denied' });
      j.dead.push({ topic: item.topic, payload: item.payload, reason: 'acl', detail: this.whyDenied(identity.id, t, item.payload) });
      return;
    }
    let pending: PendingMid | null = null;
    let mid: string | null = null;
    if (record === null) {
      const v = this.judge(t.deviceId, t.channel, item.payload);
      if (!v.route) {
        const dup = v.sink === DUPLICATE_TOPIC;
        if (v.first) j.firsts.push(v.first);
        this.opts.batchItems.inc({ result: dup ? 'duplicate' : 'invalid' });
        if (!dup) j.dead.push({ topic: item.topic, payload: item.payload, reason: 'invalid', detail: 'outbox message without a mid' });
        return;
      }
      pending = v.pending;
    } else {
      mid = peekMid(item.payload);
      if (mid === null) {
        this.opts.invalid.inc({ channel: t.channel });
        this.opts.batchItems.inc({ result: 'invalid' });
        j.dead.push({ topic: item.topic, payload: item.payload, reason: 'invalid', detail: 'outbox message without a mid' });
        return;
      }
      if (this.opts.dedup.seen(t.deviceId, mid)) {
        this.duplicate([t.deviceId]);
        this.opts.batchItems.inc({ result: 'duplicate' });
        return;
      }
    }
    const it: RouteItem = { topic: item.topic, deviceId: t.deviceId, channel: t.channel, payload: item.payload, qos: 1, pending, record, mid, ok: false };
    record?.expect(it);
    j.accepted.push(it);
    if (t.deviceId !== identity.id) j.mcuItems++;
  }

  /**
   * Publish items from the hub, all started at once (synchronously, in order); resolves
   * when every publish callback has fired, i.e. each message was handed to every subscriber
   * or queued for a durable one. They reach subscribers in the order they started because
   * queue writes complete in call order (hub/delivery-order.ts). Items whose publish failed
   * (the broker is closing) are forgotten by the de-duplication and the error goes to aedes,
   * which closes the connection without a PUBACK: the sender resends, and what was routed
   * already is dropped then as a duplicate.
   */
  private route(items: readonly RouteItem[]): Promise<void> {
    // one callback and one promise per call, not per item (a batch holds thousands)
    return new Promise((resolve, reject) => {
      let left = items.length;
      let failed: unknown = null;
      if (left === 0) return resolve();
      const onRouted = this.opts.onRouted;
      const one = (err?: unknown) => {
        if (err) failed ??= err;
        if (--left === 0) {
          if (failed === null) resolve();
          else reject(failed);
        }
      };
      let i = 0;
      try {
        for (; i < items.length; i++) this.publishItem(items[i]!, one, onRouted);
      } catch (err) {
        // a publish that throws never calls back: it and the ones after it count as failed
        failed ??= err;
        for (; i < items.length; i++) {
          items[i]!.pending?.forget();
          items[i]!.record?.settled();
          if (--left === 0) reject(failed);
        }
      }
    });
  }

  /** One item's publish; `done` once it was handed to every subscriber (or failed). */
  private publishItem(it: RouteItem, done: (err?: unknown) => void, onRouted: BrokerOptions['onRouted']): void {
    this.aedes.publish({ cmd: 'publish', topic: it.topic, payload: it.payload, qos: it.qos, retain: false, dup: false }, (err) => {
      if (err) {
        it.pending?.forget();
        it.record?.settled();
      } else {
        it.ok = true;
        it.pending?.confirm();
        it.record?.settled();
        onRouted?.(it.deviceId, it.channel, it.payload);
      }
      done(err ?? undefined);
    });
  }

  /**
   * Once `work` has routed what `packet` carried, divert `packet` to the sink it names and
   * let aedes acknowledge it (done(null) → PUBACK, so the sender's PUBACK means "in the
   * broker"); if routing failed, aedes closes the connection without a PUBACK.
   */
  private acknowledgeAfter(client: Client, packet: PublishPacket, done: (err?: Error | null) => void, work: Promise<string>): void {
    const settled: Promise<void> = work.then(
      (sink) =>
        this.afterConsumed(() => {
          divert(packet, sink);
          done(null);
        }),
      (err: unknown) => {
        this.opts.log.warn('routing failed; no PUBACK, the sender will resend', { client: client.id, err });
        done(err instanceof Error ? err : new Error(String(err)));
      },
    );
    this.routing.add(settled);
    void settled.finally(() => this.routing.delete(settled));
  }

  /** Why a publish (`direct`) or a batch item of `senderId` on topic `t` was refused by the ACL, for the dead letter. */
  private whyDenied(senderId: string, t: ReturnType<typeof parseTopic>, payload?: Buffer, direct = false): string {
    if (!t) return 'not a fleet topic';
    if (!direct && !OUTBOX_CHANNELS.has(t.channel)) return `channel ${t.channel} cannot travel in a batch`;
    if (t.deviceId !== senderId && this.isFleetDevice(t.deviceId)) return `${t.deviceId} is a device of the fleet (it connects to the hub itself), never an MCU of a gateway`;
    if (this.opts.isRevokedMcu?.(t.deviceId)) return `MCU ${t.deviceId} is revoked at the hub`;
    const owner = this.claimedBy.get(t.deviceId);
    const listed = this.wanted.get(senderId)?.has(t.deviceId) === true;
    const moves = isMcuContact(t.channel, payload);
    if (owner !== undefined && owner !== senderId) {
      const how = !listed ? ` (and ${senderId}'s register does not list it)` : moves ? `, which is connected and sent for it within ${Math.round((this.opts.mcuClaimIdleMs ?? 300_000) / 1000)} s` : ` (a ${t.channel} ${senderId} makes up itself, e.g. a FLEET_TIMEOUT reply or a firmware event, is no contact with the MCU and does not move it)`;
      return `MCU ${t.deviceId} is registered by gateway ${owner}${how}, not by ${senderId}`;
    }
    if (owner === undefined && listed) return `MCU ${t.deviceId} is held by no gateway; ${senderId} lists it, and takes it with a sign of contact (readings, logs, an answer, an online state), not with this ${t.channel}`;
    return `${t.deviceId} is not among the MCUs ${senderId} registered`;
  }

  /**
   * A gateway's MCU list. An id another gateway holds is not given to this one now, but
   * remembered: it may move here later (claimMoves). Ids that are not device ids are ignored.
   */
  applyRegistration(gatewayId: string, mcus: readonly string[]): void {
    const set = new Set<string>();
    const want = new Set<string>();
    const now = Date.now();
    // one log line per register and kind of refusal, not per MCU: a gateway lists up to tens
    // of thousands, and in a site of two gateways the MCUs the other one holds come up in
    // every register
    const fleetDevices = { count: 0, first: [] as string[] };
    const heldElsewhere = { count: 0, first: [] as Array<{ mcu: string; owner: string }> };
    for (const id of mcus) {
      if (!isDeviceId(id) || id === gatewayId) continue;
      // an id of the fleet's own devices is never an MCU: claiming it would let a gateway
      // (with a site key minted for that id) replace the device's state, receive its
      // commands, and lock the device itself out (authenticate refuses claimed ids)
      if (this.isFleetDevice(id)) {
        if (fleetDevices.count++ < LOG_EXAMPLES) fleetDevices.first.push(id);
        continue;
      }
      want.add(id);
      // revoked at the hub: remembered as wanted (unrevokeMcu gives it back), not delegated
      if (this.opts.isRevokedMcu?.(id)) continue;
      const owner = this.claimedBy.get(id);
      if (owner !== undefined && owner !== gatewayId) {
        if (heldElsewhere.count++ < LOG_EXAMPLES) heldElsewhere.first.push({ mcu: id, owner });
        continue;
      }
      if (owner === undefined) this.claimActive.set(id, now);
      this.claimedBy.set(id, gatewayId);
      set.add(id);
    }
    const released: string[] = [];
    for (const old of this.delegations.get(gatewayId) ?? []) {
      if (set.has(old)) continue;
      this.claimedBy.delete(old);
      this.claimActive.delete(old);
      released.push(old);
    }
    if (fleetDevices.count > 0) {
      this.opts.log.warn('a gateway listed devices of the fleet as its MCUs; refused', { gateway: gatewayId, count: fleetDevices.count, first: fleetDevices.first });
    }
    if (heldElsewhere.count > 0) {
      // GET /api/v1/devices/{id} tells where one MCU is
      this.opts.log.warn('MCUs already registered by another gateway; one moves here when this gateway sends for it while that one is offline or idle for it', { gateway: gatewayId, count: heldElsewhere.count, first: heldElsewhere.first });
    }
    this.delegations.set(gatewayId, set);
    this.wanted.set(gatewayId, want);
    // no longer listed by its holder (forgotten, a fresh state directory, a lower maxMcus): a
    // gateway whose register lists it takes it now, not only once it happens to register again
    for (const mcu of released) this.giveToWanting(mcu);
  }

  /**
   * A device published for `topic` outside its ACL: when it is a gateway that lists the
   * topic's MCU in its register, and the gateway holding the MCU is offline or has not sent
   * for it in `mcuClaimIdleMs`, the MCU moves to this gateway (it roamed, or its old gateway
   * was replaced) and true is returned. Otherwise false: the publish stays refused (a dead
   * letter). A fresh claim counts as activity, so a claim is never taken within that time
   * of being made while its holder is connected.
   */
  private claimMoves(identity: Identity, topic: string, retain: boolean, payload?: Buffer): boolean {
    if (identity.kind !== 'device') return false;
    const t = parseTopic(topic);
    if (!t || (retain && t.channel !== 'state')) return false;
    // only a sign of contact moves an MCU (isMcuContact): its readings, logs and answers to
    // commands, or a state saying it is online. A gateway that still lists an MCU which moved
    // away reports it lost after a while (or at its restart), answers its expired commands
    // (FLEET_TIMEOUT replies) and ends its firmware jobs (events): none of that is contact,
    // and none may take the MCU from the gateway serving it
    if (!isMcuContact(t.channel, payload)) return false;
    if (t.channel === 'state' && mcuStateProblem(payload!, identity.id) !== null) return false;
    const mcu = t.deviceId;
    if (!this.wanted.get(identity.id)?.has(mcu) || this.isFleetDevice(mcu) || this.opts.isRevokedMcu?.(mcu)) return false;
    const owner = this.claimedBy.get(mcu);
    if (owner === identity.id) return false;
    if (owner === undefined) {
      // held by no one (its holder stopped listing it): the first gateway to show contact takes it
      let mine = this.delegations.get(identity.id);
      if (!mine) this.delegations.set(identity.id, (mine = new Set()));
      mine.add(mcu);
      this.claimedBy.set(mcu, identity.id);
      this.claimActive.set(mcu, Date.now());
      this.opts.claimsMoved?.inc();
      this.opts.log.info('MCU held by no gateway taken by one that lists it', { mcu, to: identity.id });
      return canPublish(identity, topic, retain, this.mcusOf);
    }
    const now = Date.now();
    const idleMs = now - (this.claimActive.get(mcu) ?? 0);
    const ownerOnline = this.online.has(owner);
    if (ownerOnline && idleMs < (this.opts.mcuClaimIdleMs ?? 300_000)) return false;
    this.delegations.get(owner)?.delete(mcu);
    let mine = this.delegations.get(identity.id);
    if (!mine) this.delegations.set(identity.id, (mine = new Set()));
    mine.add(mcu);
    this.claimedBy.set(mcu, identity.id);
    this.claimActive.set(mcu, now);
    this.opts.claimsMoved?.inc();
    this.opts.log.info('MCU moved to another gateway', { mcu, from: owner, to: identity.id, fromOnline: ownerOnline, idleS: Math.round(idleMs / 1000) });
    return canPublish(identity, topic, retain, this.mcusOf);
  }


  private authorizeSubscribe = (client: Client, sub: Subscription, done: (err: Error | null, sub?: Subscription | null) => void): void => {
    const identity = this.identities.get(client);
    if (identity && canSubscribe(identity, sub.topic, this.mcusOf)) return done(null, sub);
    this.opts.denied.inc({ action: 'subscribe' });
    this.opts.log.warn('mqtt subscription refused', { client: client.id, topic: sub.topic });
    done(null, null); // refuse this subscription only: the client sees 0x80 (FACTS.md)
  };

  /** Publish from the hub itself (desired state, commands). */
  publish(topic: string, payload: Buffer, retain: boolean): Promise<void> {
    return new Promise((resolve, reject) =>
      this.aedes.publish({ cmd: 'publish', topic, payload, qos: 1, retain, dup: false }, (err) => (err ? reject(err) : resolve())),
    );
  }

  /**
   * An MCU was revoked at the hub (isRevokedMcu says so from now on): no gateway acts for it
   * any more, so what one still sends for it is refused (a dead letter, "revoked at the hub")
   * and nothing is delivered to a gateway for it. Its gateway learns it from
   * MCU_REVOCATIONS_TOPIC and cuts the MCU off.
   */
  revokeMcu(id: string): void {
    const owner = this.claimedBy.get(id);
    if (owner === undefined) return;
    this.delegations.get(owner)?.delete(id);
    this.claimedBy.delete(id);
    this.claimActive.delete(id);
  }

  /**
   * An agent or gateway was revoked (isRevokedDevice says so from now on): its sessions are
   * closed, and a gateway's MCUs are no longer its own. Each goes to another gateway whose
   * register lists it (a connected one first), or back to this one if its revocation is
   * lifted and it registers again. Returns the MCUs left with no gateway.
   */
  revokeDevice(id: string): string[] {
    for (const client of this.clients) {
      const who = this.identities.get(client);
      if (who?.kind === 'device' && who.id === id) client.close();
    }
    const freed = [...(this.delegations.get(id) ?? [])];
    for (const mcu of freed) {
      this.claimedBy.delete(mcu);
      this.claimActive.delete(mcu);
    }
    this.delegations.delete(id);
    this.wanted.delete(id);
    for (const mcu of freed) if (!this.opts.isRevokedMcu?.(mcu)) this.giveToWanting(mcu);
    return freed.filter((mcu) => !this.claimedBy.has(mcu));
  }

  /** An MCU's revocation was lifted: it goes back to a gateway whose register lists it (a connected one first). */
  unrevokeMcu(id: string): void {
    if (this.claimedBy.has(id)) return;
    this.giveToWanting(id);
  }

  /** An id of the fleet's own devices (connected now, or ever seen connecting): never an MCU. */
  private isFleetDevice(id: string): boolean {
    return this.online.has(id) || this.opts.isDevice?.(id) === true;
  }

  /** `id` authenticated as a device: no gateway holds or wants it as an MCU any more. */
  private releaseDeviceId(id: string): void {
    const owner = this.claimedBy.get(id);
    if (owner !== undefined) {
      this.opts.log.warn('a device connected with an id a gateway had registered as its MCU; the gateway no longer acts for it', { device: id, gateway: owner });
      this.delegations.get(owner)?.delete(id);
      this.claimedBy.delete(id);
      this.claimActive.delete(id);
    }
    for (const want of this.wanted.values()) want.delete(id);
  }

  /** An unclaimed MCU goes to a gateway whose register lists it (a connected one first), if any, idle. */
  private giveToWanting(id: string): void {
    if (this.isFleetDevice(id) || this.opts.isRevokedMcu?.(id)) return;
    let to: string | undefined;
    for (const [gw, want] of this.wanted) {
      if (!want.has(id)) continue;
      to ??= gw;
      if (this.online.has(gw)) {
        to = gw;
        break;
      }
    }
    if (to === undefined) return;
    let mine = this.delegations.get(to);
    if (!mine) this.delegations.set(to, (mine = new Set()));
    mine.add(id);
    this.claimedBy.set(id, to);
    // idle: it may have left that gateway long ago, so the first listing gateway to show
    // contact with it takes it (the one it talks to now), not only after mcuClaimIdleMs
    this.claimActive.delete(id);
  }

  /**
   * Rebuild gateway delegations from retained register messages after a restart. An MCU two
   * registers list goes to the first in key order, not necessarily the gateway that served
   * it last, so restored claims start idle: the first gateway that sends data for it (or
   * says it is online) while listing it takes it, as after any idle time (claimMoves).
   */
  async restoreDelegations(): Promise<void> {
    for await (const packet of this.persistence.createRetainedStreamCombi(['fleet/v1/d/+/register'])) {
      const t = parseTopic(packet.topic);
      if (!t || this.opts.isRevokedDevice?.(t.deviceId)) continue;
      try {
        this.applyRegistration(t.deviceId, decodeMessage('register', packet.payload).mcus);
      } catch (err) {
        this.opts.log.warn('ignoring bad retained register message', { topic: packet.topic, err });
      }
    }
    this.claimActive.clear();
  }

  /**
   * The first step of a graceful stop (the listeners closed already): disconnect the
   * devices so that nothing new comes in, let the routing under way finish, then give
   * durable subscribers up to `timeoutMs` to acknowledge what they were sent. Without this,
   * what a durable consumer had received but not yet acknowledged stays in its queue and
   * is delivered again after the restart (a duplicate at the consumer); the devices' own
   * unacknowledged publishes are resent and dropped by the de-duplication.
   */
  async drain(timeoutMs = 2000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    for (const c of this.clients) if (this.identities.get(c)?.kind === 'device') c.close();
    await Promise.allSettled([...this.routing]);
    const durable = () => [...this.clients].filter((c) => !c.clean && !c.closed);
    for (;;) {
      const waiting: Client[] = [];
      for (const c of durable()) if (!(await this.queueEmpty(c))) waiting.push(c);
      if (waiting.length === 0) return;
      if (Date.now() >= deadline) {
        this.opts.log.warn('stopping with unacknowledged deliveries; they are sent again after the restart', { clients: waiting.map((c) => c.id) });
        return;
      }
      await sleep(10);
    }
  }

  private async queueEmpty(client: Client): Promise<boolean> {
    for await (const _ of this.readQueue(client)) return false;
    return true;
  }

  /** Close the broker, then wait for the routing still under way (it fails fast once closed). */
  async close(): Promise<void> {
    await new Promise<void>((resolve) => this.aedes.close(() => resolve()));
    await Promise.allSettled([...this.routing]);
  }
}

export interface RouteItem {
  topic: string;
  deviceId: string;
  channel: Channel;
  payload: Buffer;
  qos: 0 | 1 | 2;
  /** its own admission (items outside a record) */
  pending: PendingMid | null;
  /** the record it belongs to, whose admission stands for it */
  record: RecordRoute | null;
  /** its mid (items of a record) */
  mid: string | null;
  /** its publish completed */
  ok: boolean;
}

interface BatchJudgement {
  accepted: RouteItem[];
  /** example topics refused by the ACL, for the log */
  refused: string[];
  dead: DeadLetterInput[];
  denied: number;
  mcuItems: number;
  /** duplicates whose first copies are still being routed: the PUBACK waits for them */
  firsts: Promise<boolean>[];
  /** the records admitted (their markers' mids) */
  records: RecordRoute[];
}

/**
 * `sink` once the first copies of these duplicates were routed. If one was not (the hub is
 * closing), the publish carrying the duplicate fails: no PUBACK, and the sender resends it,
 * which passes then (the first copy's mid was forgotten).
 */
async function afterFirstCopies(firsts: readonly Promise<boolean>[], sink: string): Promise<string> {
  const routed = await Promise.all(firsts);
  if (!routed.every(Boolean)) throw new FleetError('FLEET_ROUTE_FAILED', 'a message this publish repeats was not routed (the hub is closing, or its store failed); no PUBACK, so the sender resends it');
  return sink;
}

/**
 * A record (its marker's mid admitted in the sender's window) while its items are routed. When
 * every item it routes has been published, its mid is confirmed (persisted) and stands for all
 * of them. If any publish failed (the hub is closing: no PUBACK, the sender resends the
 * record), the record's mid is forgotten so that the resend passes, and the items that were
 * published are admitted each in its device's window, so the resend drops them one by one.
 */
export class RecordRoute {
  private readonly items: RouteItem[] = [];
  private left = 0;
  private done = false;

  constructor(
    private readonly pending: PendingMid,
    private readonly dedup: Deduplicator,
  ) {}

  expect(it: RouteItem): void {
    this.items.push(it);
    this.left++;
  }

  /**
   * Every item was judged: a record with nothing to route (all denied, invalid or duplicates)
   * is settled now. Called before any of its items is routed (routeBatch judges the whole
   * batch before route() starts), so `settled` never sees the count reach 0 early.
   */
  sealed(): void {
    if (this.left === 0) this.settle();
  }

  /** One of its items' publish completed (`ok` set) or failed. */
  settled(): void {
    if (--this.left === 0) this.settle();
  }

  /** The batch was given up before its items were routed (a throw): the record counts as not routed. */
  abort(): void {
    if (this.done) return;
    this.done = true;
    this.pending.forget();
  }

  private settle(): void {
    if (this.done) return;
    this.done = true;
    if (this.items.every((it) => it.ok)) return this.pending.confirm();
    this.pending.forget();
    for (const it of this.items) if (it.ok) this.dedup.admit(it.deviceId, it.mid!);
  }
}

/**
 * Hold a connection's writes until the end of the event-loop iteration, so that everything
 * written to it in one iteration leaves in one writev. aedes writes each delivery from its
 * own setImmediate callback, and Node runs the nextTick queue between two immediates, so
 * mqtt-packet's own cork (uncorked on nextTick) flushed every delivery by itself: with one
 * consumer, a batch of 1,000 MCU readings cost about 300 writev calls, 14% of the hub's CPU
 * (profile of a hub routing 1,000-item batches).
 *
 * The writes of a delivery happen in the check phase (immediates), and an immediate queued
 * there runs only in the next iteration's check phase, after its poll phase: at thousands of
 * MCU readings a second that poll phase routes the gateway's next batch, 10-30 ms during which
 * every delivery of the previous one waited. So the release is also a 0 ms timer: the next
 * iteration runs its timers before polling, and the check phase that wrote is over by then
 * (a timer not yet due, after a check phase under 1 ms, leaves the immediate to release).
 * Whichever comes first releases. end() and destroy() flush or drop the held data as they
 * would without the cork.
 */
export function coalesceWrites(socket: Duplex): void {
  let held = false;
  let timer: NodeJS.Timeout | undefined;
  const release = (): void => {
    if (!held) return;
    held = false;
    clearTimeout(timer);
    timer = undefined;
    if (socket.writableCorked > 0) socket.uncork();
  };
  const write = socket.write;
  socket.write = function (this: Duplex, ...args: unknown[]): boolean {
    if (!held && !socket.destroyed && !socket.writableEnded) {
      held = true;
      socket.cork();
      setImmediate(release);
      timer = setTimeout(release, 0);
    }
    return Reflect.apply(write, this, args) as boolean;
  } as Duplex['write'];
}

/** Send an acknowledged publish to a sink instead of its topic; its payload goes nowhere. */
function divert(packet: PublishPacket, sink: string): void {
  packet.topic = sink;
  packet.retain = false;
  packet.payload = EMPTY;
}

/**
 * aedes stores nothing for a QoS 1 delivery to a clean-session client (lib/client.js
 * deliverQoS writes directly when `client.clean`), yet every PUBACK from such a client costs
 * a LevelDB lookup that always misses (lib/handlers/puback.js → outgoingClearMessageId).
 * Measured with the outbox bench: 37% of the hub's CPU during a drain to a clean consumer.
 * Answer those from memory; durable clients still go to the store.
 */
export function skipCleanPubackLookup(persistence: LevelPersistence): void {
  const clear = persistence.outgoingClearMessageId.bind(persistence);
  // PUBACKs only: aedes also clears through here what a clean session's CONNECT finds queued
  // under its client id (emptyQueue: a durable session's queue, which a clean one discards
  // [MQTT-3.1.2-6]); those entries exist and must be deleted
  persistence.outgoingClearMessageId = (client, packet) => (client.clean === true && Reflect.get(packet, 'cmd') === 'puback' ? Promise.resolve(undefined) : clear(client, packet));
}

/**
 * aedes scans the retained messages for every SUBSCRIBE on a stream it never listens to for
 * errors. A scan still running when the hub closes its store fails with
 * LEVEL_ITERATOR_NOT_OPEN, an uncaught 'error' event, and the process died at stop. The scan
 * is abandoned instead (the subscriber is being disconnected anyway) and logged.
 */
export function quietRetainedScans(persistence: LevelPersistence, log: Logger): void {
  const scan = persistence.createRetainedStreamCombi.bind(persistence);
  persistence.createRetainedStreamCombi = (patterns) => {
    // a Readable stream at run time (aedes pipes it); typed as what our own code iterates
    const stream = scan(patterns);
    (stream as unknown as NodeJS.EventEmitter).on('error', (err: Error & { code?: string }) => {
      const level = err.code === 'LEVEL_ITERATOR_NOT_OPEN' || err.code === 'LEVEL_DATABASE_NOT_OPEN' ? 'debug' : 'warn';
      log[level]('retained-message scan ended early', { patterns, err });
    });
    return stream;
  };
}

/** Is this a valid state message saying the device is online? */
/** What is wrong with a state a gateway publishes for one of its MCUs, or null. */
function mcuStateProblem(payload: Buffer, gatewayId: string): string | null {
  let st: StateMessage;
  try {
    st = decodeMessage('state', payload);
  } catch (err) {
    return `not a state message (${(err as Error).message})`;
  }
  if (st.kind !== 'mcu') return `kind must be mcu, not ${st.kind}`;
  if (st.via !== gatewayId) return `via must be the gateway that sends it, ${gatewayId}, not ${st.via ?? '(none)'}`;
  return null;
}

/**
 * Is this message a gateway sends for an MCU a sign of contact with the MCU, not something
 * the gateway made up itself? Readings, logs, an online state, and replies that carry the
 * MCU's answer (ok, or its own refusal: FLEET_MCU_COMMAND or a code of its own); not the
 * gateway's own replies (FLEET_TIMEOUT for an expired command, a full mailbox, ...), its
 * events (firmware outcomes; a boot comes with an online state) or offline states. Only
 * contact moves a claim or keeps its holder active.
 */
function isMcuContact(channel: string, payload: Buffer | undefined): boolean {
  switch (channel) {
    case 'telemetry':
    case 'logs':
      return true;
    case 'state':
      return statesOnline(payload);
    case 'reply': {
      if (!payload) return false;
      try {
        const r = decodeMessage('reply', payload);
        const code = r.error?.code;
        return r.ok || code === undefined || code === 'FLEET_MCU_COMMAND' || !code.startsWith('FLEET_');
      } catch {
        return false;
      }
    }
    default:
      return false;
  }
}

function statesOnline(payload: Buffer | undefined): boolean {
  if (!payload) return false;
  try {
    return decodeMessage('state', payload).online;
  } catch {
    return false;
  }
}
