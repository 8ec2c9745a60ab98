import type { Duplex } from 'node:stream';
import { createServer as createNetServer, type Server as NetServer } from 'node:net';
import { createServer as createTlsServer } from 'node:tls';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { listenHttp, listenOn, type Listening } from '../core/http.ts';
import { isLoopback } from '../core/net.ts';
import { loadTlsPair } from '../core/tls.ts';
import type { Logger } from '../core/log.ts';
import { decodeMessage, encodeMessage, type DesiredState, type StateMessage } from '../core/messages.ts';
import { MetricsRegistry } from '../core/metrics.ts';
import { setNativeDir } from '../core/native.ts';
import { loadOrCreateSecret } from '../core/secrets.ts';
import { openStore } from '../core/store.ts';
import { deferred, type Deferred } from '../core/deferred.ts';
import { allDevices, deviceTopic, MCU_REVOCATIONS_TOPIC, parseTopic, type Channel } from '../core/topics.ts';
import { buildApi, type DesiredSpec } from './api.ts';
import { ArtifactStore } from './artifacts.ts';
import { CommandStore, DownlinkTracker, type CommandRecord, type CommandStoreOptions } from './commands.ts';
import { DEVICE_REVOCATIONS, MCU_REVOCATIONS, RevocationStore } from './revocations.ts';
import { decodeTelemetryFast, ScannedTelemetry, scanTelemetry } from './telemetry-fast.ts';
import { coalesceWrites, HubBroker } from './broker.ts';
import type { HubConfig } from './config.ts';
import { DeadLetters } from './dead-letters.ts';
import { Deduplicator } from './dedup.ts';
import { Registry } from './registry.ts';

export interface HubHandle {
  mqttPort: number;
  mqttsPort: number | null;
  httpPort: number;
  /** file holding the fleet secret devices' tokens derive from (mode 0600) */
  fleetSecretFile: string;
  /** file holding the operator token (mode 0600) */
  operatorTokenFile: string;
  registry: Registry;
  broker: HubBroker;
  setDesired(deviceId: string, spec: DesiredSpec): Promise<DesiredState>;
  /** stores the command (hub/commands.ts) and sends it whenever the device can receive it */
  sendCommand(deviceId: string, name: string, args: Record<string, unknown>, ttlMs: number): Promise<CommandRecord>;
  commands: CommandStore;
  stop(): Promise<void>;
}

/** Tuning that is not (yet) in HubConfig: command store limits and re-send timing (tests shorten them). */
export interface HubOptions {
  commands?: Partial<Pick<CommandStoreOptions, 'maxPendingPerDevice' | 'maxPending' | 'maxHistoryPerDevice' | 'historyMs' | 'resendInitialMs' | 'resendMaxMs' | 'tickMs'>>;
}

/**
 * Bytes a connection's socket may buffer before aedes waits for it to drain (Node's default
 * is 16 KiB). The hub acknowledges a device's publish — a gateway's batch of hundreds of
 * MCU readings — only once every item was handed to every subscriber, and aedes hands over
 * a message to a subscriber whose socket is above this mark only after 'drain': with 16 KiB
 * (about 100 readings) every batch waited for the consumer to read most of it, and the
 * gateway's uplink waited behind it (bench: records 1-2 s in flight at the hub). This
 * bounds what a slow consumer can hold in the hub's memory, per connection.
 */
const SUBSCRIBER_HIGH_WATER_MARK = 1024 * 1024;

export async function startHub(config: HubConfig, log: Logger, options: HubOptions = {}): Promise<HubHandle> {
  // checked before anything is opened: a bad path fails the start naming the config key
  const tlsPair = config.tls ? loadTlsPair(config.tls, 'tls', log) : null;
  setNativeDir(config.stateDir);
  const fleetSecretFile = join(config.stateDir, 'fleet.secret');
  const operatorTokenFile = join(config.stateDir, 'operator.token');
  const fleetSecret = loadOrCreateSecret(fleetSecretFile);
  const operatorToken = loadOrCreateSecret(operatorTokenFile);

  const metrics = new MetricsRegistry();
  const messages = metrics.counter('fleet_hub_messages_total', 'Fleet messages received from devices, by channel');
  const invalid = metrics.counter('fleet_hub_messages_invalid_total', 'Fleet messages dropped because they did not match their schema');
  const duplicates = metrics.counter('fleet_hub_duplicates_total', 'Messages dropped as duplicates of at-least-once delivery (direct and inside batches)');
  const denied = metrics.counter('fleet_hub_acl_denied_total', 'Publishes and subscriptions refused by the ACL (batch items count as publishes)');
  const authFailures = metrics.counter('fleet_hub_auth_failures_total', 'MQTT connections refused for bad credentials');
  const batches = metrics.counter('fleet_hub_batches_total', 'Batch publishes unpacked (malformed ones count as invalid messages, channel="batch")');
  const batchItems = metrics.counter('fleet_hub_batch_items_total', 'Messages found in batches, by result: routed, duplicate, denied, invalid');

  const brokerDb = await openStore<Buffer>(join(config.stateDir, 'broker'), 'buffer');
  const registryDb = await openStore<string>(join(config.stateDir, 'registry'), 'utf8');
  const registry = new Registry(registryDb);
  registry.onFlushError = (err) => log.error('writing device records failed; they are written again with the next flush', { err });
  await registry.load();
  const dedupTrimmed = metrics.counter('fleet_hub_dedup_mids_trimmed_total', 'Message ids forgotten early to stay within dedupMaxMids: the oldest of the least recently active senders (docs/topics.md#de-duplication)');
  const dedupForgotten = metrics.counter('fleet_hub_dedup_devices_forgotten_total', 'Senders whose de-duplication window was forgotten whole (beyond 100,000 senders, or with every window down to its floor)');
  const dedup = await Deduplicator.open(await openStore<string>(join(config.stateDir, 'dedup'), 'utf8'), {
    window: config.dedupWindow,
    minWindow: config.dedupMinWindow,
    maxEntries: config.dedupMaxMids,
    onTrimmed: (n) => dedupTrimmed.inc({}, n),
    onForgotten: (n) => dedupForgotten.inc({}, n),
    log,
  });
  metrics.gaugeFn('fleet_hub_dedup_devices', 'Senders with a de-duplication window in memory (devices, gateways, and MCUs sending outside records)', () => dedup.stats().devices);
  metrics.gaugeFn('fleet_hub_dedup_mids', 'Message ids remembered for de-duplication across all senders (bounded: docs/topics.md#de-duplication)', () => dedup.stats().mids);
  const deadLettersDb = await openStore<string>(join(config.stateDir, 'dead-letters'), 'utf8');
  const deadLetters = await DeadLetters.open(deadLettersDb, { log });
  metrics.gaugeFn('fleet_hub_dead_letters', 'Messages acknowledged but not routed (ACL, invalid, too large), kept for the operator: GET /api/v1/dead-letters', () => [{ value: deadLetters.stats().records }]);
  metrics.gaugeFn('fleet_hub_dead_letters_dropped', 'Dead letters dropped (oldest first) to stay within their bounds since the hub started', () => [{ value: deadLetters.stats().evicted }]);
  // The hub's own consumer of device traffic. Outbox messages (telemetry, events, replies)
  // come from the broker as it routes them (BrokerOptions.onRouted): after de-duplication,
  // and batch items as ordinary messages. State is routed by aedes itself (retained, and the
  // broker's last wills), so it comes through an internal subscription.
  //
  // Consumed after the routing that produced it: onRouted fires once a message was handed to
  // every subscriber (their writes made), and the registry's bookkeeping (JSON-decoding every
  // reading for the latest values) runs from an immediate queued then, not inline in the
  // callbacks of a batch's publishes, where it ran before the writes of the next batch's
  // deliveries (coalesceWrites flushes at the start of the next turn). The PUBACK waits for it
  // (BrokerOptions.whenConsumed), so an acknowledged message is in the registry, as before.
  // Stop drains the queue before the registry's last flush.
  let consumeQueue: Array<{ channel: Channel; deviceId: string; payload: Buffer }> = [];
  let consumed: Deferred | null = null;
  const drainConsumed = (): void => {
    const q = consumeQueue;
    const done = consumed;
    consumeQueue = [];
    consumed = null;
    try {
      for (const m of q) {
        try {
          consumeNow(m.channel, m.deviceId, m.payload);
        } catch (err) {
          // consumeNow counts and logs what it cannot decode; this is for its own failures
          log.error('registry consumer failed; message skipped', { device: m.deviceId, channel: m.channel, err });
        }
      }
    } finally {
      // the PUBACKs waiting on this drain go out whatever happened in it
      done?.resolve();
    }
  };
  function consume(channel: Channel, deviceId: string, payload: Buffer): void {
    if (consumeQueue.push({ channel, deviceId, payload }) === 1) {
      consumed = deferred();
      setImmediate(drainConsumed);
    }
  }
  // one message's samples at a time, reused (consumeNow is synchronous)
  const scanned = new ScannedTelemetry();
  function consumeNow(channel: Channel, deviceId: string, payload: Buffer): void {
    try {
      if (channel === 'telemetry') {
        if (scanTelemetry(payload, scanned)) registry.onTelemetryScanned(deviceId, scanned);
        else registry.onTelemetry(deviceId, decodeTelemetryFast(payload));
      }
      else if (channel === 'state') registry.onState(deviceId, decodeMessage('state', payload));
      else if (channel === 'events') registry.onEvent(deviceId, decodeMessage('events', payload));
      else if (channel === 'reply') registry.onReply(deviceId, decodeMessage('reply', payload));
      else return;
      messages.inc({ channel });
    } catch (err) {
      messages.inc({ channel });
      invalid.inc({ channel });
      log.warn('dropped invalid message', { device: deviceId, channel, err });
    }
  }
  // MCUs revoked fleet-wide: read before the broker, which must never act for one
  const mcuRevocations = RevocationStore.load(join(config.stateDir, 'mcu-revocations.json'), MCU_REVOCATIONS);
  // agents and gateways revoked one by one (their tokens stay derived from the fleet secret)
  const deviceRevocations = RevocationStore.load(join(config.stateDir, 'device-revocations.json'), DEVICE_REVOCATIONS);
  const broker = await HubBroker.create({
    db: brokerDb,
    log,
    fleetSecret,
    operatorToken,
    maxPayloadBytes: config.maxPayloadBytes,
    dedup,
    denied,
    authFailures,
    invalid,
    duplicates,
    batches,
    batchItems,
    onDuplicate: (id) => registry.countDuplicate(id),
    onRouted: (id, channel, payload) => consume(channel, id, payload),
    whenConsumed: () => consumed?.promise ?? null,
    onRefused: (from, items) => void deadLetters.add(from, items),
    mcuClaimIdleMs: config.mcuClaimIdleMs,
    isDevice: (id) => registry.get(id)?.direct === true,
    isRevokedMcu: (id) => mcuRevocations.has(id),
    isRevokedDevice: (id) => deviceRevocations.has(id),
    onDeviceAuthenticated: (id) => registry.markDirect(id),
    claimsMoved: metrics.counter('fleet_hub_mcu_claims_moved_total', 'MCUs moved from one gateway to another (roamed, or the old gateway went away)'),
  });
  await broker.restoreDelegations();
  // retained for the gateways, the current list at every start (a list emptied while the hub
  // was down must replace the one the broker kept)
  await broker.publish(MCU_REVOCATIONS_TOPIC, mcuRevocations.message(), true);
  metrics.gaugeFn('fleet_hub_mcus_revoked', 'MCUs revoked fleet-wide (PUT /api/v1/mcu-revocations/{id})', () => [{ value: mcuRevocations.size }]);
  metrics.gaugeFn('fleet_hub_devices_revoked', 'Agents and gateways whose tokens are revoked at the hub (PUT /api/v1/device-revocations/{id})', () => [{ value: deviceRevocations.size }]);
  /** Say `id` is offline (retained, as the hub itself), with the reason, when the registry shows it online: what no device will say for it any more. */
  const markOffline = async (id: string, reason: string, kind?: StateMessage['kind']): Promise<void> => {
    const rec = registry.get(id);
    if (rec?.online && (kind === undefined || rec.kind === kind)) await broker.publish(deviceTopic(id, 'state'), encodeMessage({ v: 1, online: false, kind: rec.kind, ts: Date.now(), reason }), true);
  };
  const setDeviceRevoked = async (id: string, revoked: boolean): Promise<boolean> => {
    if (!(await deviceRevocations.set(id, revoked))) return false;
    log.info(revoked ? 'device revoked at the hub' : 'device revocation lifted', { device: id });
    if (!revoked) return true; // it connects again with its token (and says online); a gateway registers its MCUs again
    const freed = broker.revokeDevice(id);
    // a gateway's MCUs that no other gateway lists: offline, with the reason
    for (const mcu of freed) {
      await markOffline(mcu, `its gateway ${id} is revoked at the hub`, 'mcu');
    }
    // its sessions are closed, and its last will is refused with everything else it would
    // publish: the hub says offline for it (retained), with the reason. For a gateway the
    // registry takes the MCUs it still relayed offline too, as when any gateway goes offline
    await markOffline(id, 'revoked at the hub');
    return true;
  };
  const setMcuRevoked = async (id: string, revoked: boolean): Promise<boolean> => {
    if (!(await mcuRevocations.set(id, revoked))) return false;
    if (revoked) broker.revokeMcu(id);
    else broker.unrevokeMcu(id);
    await broker.publish(MCU_REVOCATIONS_TOPIC, mcuRevocations.message(), true);
    log.info(revoked ? 'MCU revoked fleet-wide' : 'MCU revocation lifted', { mcu: id });
    // lifted: its desired state again, after the list (the same connection keeps the order).
    // While revoked, no gateway received it (the hub delivers an MCU's messages only to the
    // gateway acting for it), and a gateway gets retained ones only when it subscribes
    const desired = revoked ? undefined : registry.get(id)?.desired;
    if (desired) await broker.publish(deviceTopic(id, 'desired'), encodeMessage(desired), true);
    // the registry shows it offline, with the reason (its gateway's own state for it is refused from now on)
    if (revoked) await markOffline(id, 'revoked at the hub', 'mcu');
    return true;
  };

  metrics.gaugeFn('fleet_hub_devices', 'Devices known to the registry, by state', () => {
    const c = registry.counts();
    return [
      { labels: { state: 'online' }, value: c.online },
      { labels: { state: 'offline' }, value: c.total - c.online },
    ];
  });
  metrics.eventLoopDelayP99('fleet_hub_event_loop_delay_p99_seconds', 'p99 event-loop delay since the previous scrape: every routed message waits for this loop');
  metrics.gaugeFn('fleet_hub_mqtt_clients', 'Connected MQTT clients', () => broker.aedes.connectedClients);

  const consumeState = (packet: { topic: string; payload: Buffer | string }, cb: () => void): void => {
    const t = parseTopic(packet.topic);
    if (t) consume('state', t.deviceId, Buffer.isBuffer(packet.payload) ? packet.payload : Buffer.from(packet.payload));
    cb();
  };
  const subs: Array<[string, typeof consumeState]> = [[allDevices('state'), consumeState]];
  await Promise.all(subs.map(([topic, fn]) => new Promise<void>((r) => broker.aedes.subscribe(topic, fn, r))));
  registry.on('state', (rec: { id: string; online: boolean; reason?: string }) => log.info('device state', { device: rec.id, online: rec.online, reason: rec.reason }));

  // Commands (hub/commands.ts): stored until replied or expired, sent whenever a connection
  // of the device or of its gateway holds a cmd subscription. Wired before the listeners
  // open, so no SUBSCRIBE goes unseen.
  const commandsDb = await openStore<string>(join(config.stateDir, 'commands'), 'utf8');
  const downlink = new DownlinkTracker(broker.mcusOf);
  const commands = await CommandStore.open({
    db: commandsDb,
    log,
    metrics,
    publish: (deviceId, payload) => broker.publish(deviceTopic(deviceId, 'cmd'), payload, false),
    route: (deviceId) => downlink.route(deviceId),
    ...config.commands,
    ...options.commands,
  });
  broker.aedes.on('subscribe', (subscriptions, client) => {
    // a refused subscription is reported with qos 128 (aedes handlers/subscribe.js)
    const granted = subscriptions.filter((s) => Number(s.qos) !== 128).map((s) => s.topic);
    for (const id of downlink.subscribed(client, granted)) commands.reachable(id);
  });
  broker.aedes.on('unsubscribe', (topics, client) => downlink.unsubscribed(client, topics));
  broker.aedes.on('clientDisconnect', (client) => downlink.disconnected(client));
  // an MCU its gateway reports online may be newly registered behind a relay subscription
  registry.on('state', (rec: { id: string; online: boolean }) => rec.online && commands.reachable(rec.id));
  const onCommandReply = (packet: { topic: string; payload: Buffer | string }, cb: () => void): void => {
    try {
      const t = parseTopic(packet.topic);
      if (t) commands.onReply(t.deviceId, decodeMessage('reply', Buffer.isBuffer(packet.payload) ? packet.payload : Buffer.from(packet.payload)));
    } catch {
      // counted as invalid by the registry's consumer of the same message
    } finally {
      cb();
    }
  };
  await new Promise<void>((r) => broker.aedes.subscribe(allDevices('reply'), onCommandReply, r));

  const accept = (socket: Duplex): void => {
    coalesceWrites(socket);
    broker.aedes.handle(socket);
  };
  const mqttServer: NetServer = createNetServer({ highWaterMark: SUBSCRIBER_HIGH_WATER_MARK, noDelay: true }, accept);
  const mqttPort = await listenOn(mqttServer, config.host, config.mqttPort, config.portFallback);
  let mqttsServer: NetServer | null = null;
  let mqttsPort: number | null = null;
  if (tlsPair) {
    mqttsServer = createTlsServer({ ...tlsPair, minVersion: 'TLSv1.2', highWaterMark: SUBSCRIBER_HIGH_WATER_MARK, noDelay: true }, accept);
    mqttsPort = await listenOn(mqttsServer, config.host, config.mqttsPort, config.portFallback);
  }

  let desiredRev = Date.now();
  const setDesired = async (deviceId: string, spec: DesiredSpec): Promise<DesiredState> => {
    // revisions only grow, also across hub restarts (time-based start)
    desiredRev = Math.max(desiredRev + 1, Date.now());
    const desired: DesiredState = { v: 1, rev: desiredRev, ts: Date.now(), apps: spec.apps };
    if (spec.agent) desired.agent = spec.agent;
    if (spec.firmware) desired.firmware = spec.firmware;
    if (spec.trustRoots?.length) desired.trustRoots = spec.trustRoots;
    await broker.publish(deviceTopic(deviceId, 'desired'), encodeMessage(desired), true);
    registry.setDesired(deviceId, desired);
    return desired;
  };
  const sendCommand = (deviceId: string, name: string, args: Record<string, unknown>, ttlMs: number): Promise<CommandRecord> => commands.create(deviceId, name, args, ttlMs);

  /** least privilege for downloads: a device gets what its desired state, or one of its MCUs', names */
  const names = (d: DesiredState | undefined, sha: string): boolean =>
    d !== undefined && (Object.values(d.apps).some((a) => a.sha256 === sha) || d.agent?.sha256 === sha || d.firmware?.sha256 === sha);
  const mayFetch = (deviceId: string, sha: string): boolean => {
    if (names(registry.get(deviceId)?.desired, sha)) return true;
    for (const mcu of broker.mcusOf(deviceId) ?? []) if (names(registry.get(mcu)?.desired, sha)) return true;
    return false;
  };
  const artifacts = new ArtifactStore({ dir: join(config.stateDir, 'artifacts'), maxBytes: config.artifactMaxBytes, fleetSecret, operatorToken, log, mayFetch, denied: (id) => deviceRevocations.has(id) });
  let ready = true;
  const api = buildApi({ artifacts, log, registry, metrics, operatorToken, openReads: config.openReadsOnLoopback && isLoopback(config.host), rateLimit: config.httpRateLimit, setDesired, sendCommand, commands, deadLetters, mcuRevocations: { list: () => mcuRevocations.list(), set: setMcuRevoked }, deviceRevocations: { list: () => deviceRevocations.list(), set: setDeviceRevoked }, ready: () => ready && !broker.aedes.closed });
  const http: Listening = await listenHttp(api.handle, config.host, config.httpPort, config.portFallback);
  log.info('hub listening', { host: config.host, mqttPort, mqttsPort, httpPort: http.port, stateDir: config.stateDir });

  return {
    mqttPort,
    mqttsPort,
    httpPort: http.port,
    fleetSecretFile,
    operatorTokenFile,
    registry,
    broker,
    setDesired,
    sendCommand,
    commands,
    async stop() {
      ready = false;
      await http.close();
      await commands.close(); // no more sends; replies still recorded until its db closes
      // no new connections; close() calls back once the existing ones are gone too
      const listenersClosed = [mqttServer, mqttsServer].map((s) => s && new Promise<void>((r) => s.close(() => r())));
      await broker.drain();
      await Promise.all(subs.map(([topic, fn]) => new Promise<void>((r) => broker.aedes.unsubscribe(topic, fn, r))));
      await new Promise<void>((r) => broker.aedes.unsubscribe(allDevices('reply'), onCommandReply, r));
      // after the broker (and the routing it waits for) so no mid is admitted after the last flush
      await broker.close();
      await Promise.all(listenersClosed);
      await dedup.close();
      drainConsumed(); // what the last routing left for the registry
      await registry.flush();
      await registryDb.close();
      await deadLetters.flush();
      await deadLettersDb.close();
      await commands.close();
      await commandsDb.close();
      await brokerDb.close();
      log.info('hub stopped');
    },
  };
}
