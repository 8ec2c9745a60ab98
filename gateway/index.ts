import { existsSync, mkdirSync, readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { loadTlsPair } from '../core/tls.ts';
import { FleetError, isFleetError } from '../core/errors.ts';
import { listenHttp, sendJson, sendText, type Listening } from '../core/http.ts';
import type { Logger } from '../core/log.ts';
import { MetricsRegistry, PROM_CONTENT_TYPE } from '../core/metrics.ts';
import { isLoopback } from '../core/net.ts';
import { openStore } from '../core/store.ts';
import { connectFleetClient, disconnectFleetClient, logHubError } from '../core/mqtt.ts';
import { warmMqttPacketLengths } from '../core/mqtt-packet-lengths.ts';
import type { OutboxStats } from '../core/outbox.ts';
import { LevelOutbox } from '../core/outbox-level.ts';
import { setNativeDir } from '../core/native.ts';
import { loadOrCreateSecret, readDeviceToken } from '../core/secrets.ts';
import { McuKeys, ReplayGuard } from '../firmware-bridge/auth.ts';
import { McuCoapIngress } from './coap-ingress.ts';
import { gatewayPaths, type GatewayConfig } from './config.ts';
import { FirmwareManager, type VerifyFirmware } from './firmware.ts';
import { LogThrottle, type DropReason, type IngressHooks } from './ingress.ts';
import { Mailbox } from './mailbox.ts';
import { McuRevocations } from './revocations.ts';
import { McuMqttIngress } from './mqtt-ingress.ts';
import type { LeanTlsOptions } from './mqtt-lean.ts';
import { McuRateLimit } from './rate-limit.ts';
import { Relay, type McuProtocol } from './relay.ts';
import { McuService } from './service.ts';
import { encodeGatewayState, encodeGatewayStateNow, loadGatewayState, saveGatewayState, saveGatewayStateAsync, type GatewayStateSource } from './state.ts';

export type { GatewayConfig } from './config.ts';
export { GatewayConfigSchema } from './config.ts';
export type { VerifyFirmware } from './firmware.ts';

export interface GatewayExtras {
  /** checks a firmware bundle and returns the MCU image (the CLI wires bundles/ here) */
  verifyFirmware?: VerifyFirmware;
  /** tests only: the clock of MCU silence (lost timeouts, mcu.forgetAfterDays), ms since the epoch; default Date.now */
  now?: () => number;
  /** tests only: how often a running gateway forgets MCUs silent for mcu.forgetAfterDays, ms (default FORGET_CHECK_MS, an hour) */
  forgetCheckMs?: number;
}

/** A running gateway looks for MCUs silent longer than mcu.forgetAfterDays this often (ms). */
export const FORGET_CHECK_MS = 3_600_000;

export interface GatewayStats {
  /** MCUs this gateway acts for (registered at the hub) */
  mcus: number;
  /** of those, currently online */
  online: number;
  hubConnected: boolean;
  /** MCU messages accepted (authenticated, decoded, stored), per protocol */
  messagesIn: Record<McuProtocol, number>;
  /** MCU messages or connections refused, by reason (see gateway/ingress.ts DropReason) */
  dropped: Partial<Record<DropReason, number>>;
  /** MCU messages held back (MQTT) or answered 5.03 (CoAP) by the per-MCU rate limit (mcu.msgRate) */
  throttled: Record<McuProtocol, number>;
  /** connected MCU MQTT clients */
  mqttClients: number;
  /** telemetry messages delivered to the hub (PUBACKed) */
  uplinkSent: number;
  outbox: OutboxStats;
  /** commands waiting in MCU mailboxes */
  mailboxDepth: number;
  /** MCU firmware updates by state */
  firmware: Record<string, number>;
}

export interface GatewayHandle {
  /** the plain-TCP MCU MQTT port; 0 when mcu.mqttPort is null (no plain listener) */
  mqttPort: number;
  /** the MCU MQTT-over-TLS port; null unless mcu.mqttTls is set */
  mqttTlsPort: number | null;
  coapPort: number;
  /** the HTTP port of /metrics, /health, /ready; undefined when http.port is unset */
  httpPort: number | undefined;
  /** firmware update state of one MCU (tests, status) */
  firmwareState(mcuId: string): { state: string; version: string; progress: number; reason?: string | undefined; cause?: string | undefined; code?: string | undefined } | undefined;
  /** the file MCU keys derive from (`deriveToken(secret, 'mcu', id)`), mode 0600 */
  siteSecretFile: string;
  /** Prometheus registry with the gateway's counters and gauges */
  metrics: MetricsRegistry;
  stats(): GatewayStats;
  stop(): Promise<void>;
}

/**
 * Start a gateway: MCU listeners (MQTT and CoAP), the relay to the hub with its outbox
 * and uplink, and persistence of MCU replay counters. Resolves once both listeners are
 * bound; the hub connection comes up (and reconnects) in the background, and MCU data
 * is stored meanwhile.
 */
export async function startGateway(config: GatewayConfig, log: Logger, version = '0.0.0-dev', extras: GatewayExtras = {}): Promise<GatewayHandle> {
  // the TLS files first: a bad path fails the start before anything is opened or bound
  const mqttTls = config.mcu.mqttTls ? loadMcuTls(config.mcu.mqttTls, log) : undefined;
  const paths = gatewayPaths(config);
  mkdirSync(config.stateDir, { recursive: true, mode: 0o700 });
  const token = readDeviceToken(paths.tokenFile, config.deviceId);
  const siteSecret = loadOrCreateSecret(paths.siteSecretFile);
  // revoked MCUs (mcu.revokedFile): refused at authentication. Read before anything is
  // opened: a list that exists but cannot be read stops the start (FLEET_CONFIG_INVALID)
  let cutRevoked: (ids: string[], atHub: boolean) => void = () => undefined;
  const revocations = new McuRevocations(paths.revokedFile, log, (ids, atHub) => cutRevoked(ids, atHub));
  revocations.start();
  // and the hub's list as last received (MCU_REVOCATIONS_TOPIC), for a start without the hub
  revocations.loadHubList(join(config.stateDir, 'hub-revoked-mcus.json'));
  if (config.mcu.revokedFile !== undefined && !existsSync(config.mcu.revokedFile)) log.warn('mcu.revokedFile does not exist: no MCU is revoked (is the path right?)', { file: config.mcu.revokedFile });
  const revoked = (mcuId: string): boolean => revocations.has(mcuId);

  const metrics = new MetricsRegistry();
  const messagesIn = metrics.counter('fleet_gateway_mcu_messages_total', 'MCU messages accepted (authenticated, decoded and stored), by protocol and channel');
  const mailboxCommands = metrics.counter('fleet_gateway_mailbox_commands_total', 'MCU mailbox commands by outcome: queued, delivered, acked, expired, refused, withdrawn');
  const firmwareBytes = metrics.counter('fleet_gateway_firmware_bytes_served_total', 'MCU firmware bytes served, by protocol');
  const dropped = metrics.counter('fleet_gateway_mcu_dropped_total', 'MCU messages or connections refused, by protocol and reason');
  const authFailures = metrics.counter('fleet_gateway_mcu_auth_failures_total', 'MCU MQTT connects and CoAP messages whose credentials did not verify');
  const throttled = metrics.counter('fleet_gateway_mcu_throttled_total', 'MCU messages held back (MQTT: PUBACK later) or answered 5.03 with Max-Age (CoAP) by the per-MCU rate limit, by protocol');
  const subDenied = metrics.counter('fleet_gateway_mcu_subscribe_denied_total', 'MCU subscriptions refused by the ACL');
  const duplicates = metrics.counter('fleet_gateway_mcu_duplicates_total', 'MCU retransmissions of messages stored already (MQTT QoS 1 with DUP), acknowledged again and not stored twice; by protocol and whether they came on a new connection (reconnected: the PUBACK was lost with the link)');
  const droppedByReason: Partial<Record<DropReason, number>> = {};

  const persisted = loadGatewayState(paths.stateFile, log);
  const guard = new ReplayGuard({ window: config.mcu.replayWindow, maxMcus: config.mcu.maxMcus });
  const restored = guard.restore(persisted.replay);
  const floors = guard.restoreFloors(persisted.floors);
  if (restored.skipped + floors.skipped > 0) log.warn('skipped malformed replay counters in the state file', { file: paths.stateFile, skipped: restored.skipped + floors.skipped });

  setNativeDir(config.stateDir);
  // a larger in-memory tail than the agent's 16 MiB: a gateway's backlog behind a slow or
  // absent hub is tens of thousands of records a minute, and past the tail every peek reads
  // LevelDB again, in the threadpool its fsyncs keep busy (measured at 7,000+ MCUs: the
  // uplink stalled while the backlog was read back from disk)
  const outbox = await LevelOutbox.open(join(config.stateDir, 'outbox'), { ...config.outbox, tailBytes: 64 * 1024 * 1024 }).catch((err: unknown) => {
    revocations.stop();
    throw err;
  });
  outbox.on('evicted', (e) => log.warn('outbox over budget; evicted oldest records', { ...e }));
  outbox.on('corrupt', (e) => log.error('outbox record damaged on disk; skipped', e));
  outbox.on('fault', (e) => log.error('outbox could not read its store (the disk); nothing stored is lost, trying again at the next write', e));
  const client = connectFleetClient({
    url: config.hub.url,
    deviceId: config.deviceId,
    token,
    kind: 'gateway',
    version,
    keepalive: config.hub.keepaliveS,
    reconnectMs: config.hub.reconnectMs,
    reconnectMaxMs: config.hub.reconnectMaxMs,
    // connected once the MCU ports are bound: a start that fails there (a port taken) does not
    // show the gateway online and offline at the hub
    manualConnect: true,
  });
  // the uplink's publishes vary in size without end: mqtt-packet's length cache made in one go
  // (after the client: it has switched mqtt-packet's number cache off)
  warmMqttPacketLengths();
  let hubWasConnected = false;
  client.on('connect', () => {
    hubWasConnected = true;
    log.info('connected to hub', { url: config.hub.url });
  });
  let shuttingDown = false;
  client.on('close', () => {
    if (hubWasConnected && !shuttingDown) log.warn('hub connection lost; storing MCU data until it returns', { url: config.hub.url });
    hubWasConnected = false;
  });
  client.on('error', (err) => logHubError(log, err, { url: config.hub.url }));

  // A start that fails from here on (the MCU store locked by another gateway on the same
  // state directory, a damaged mailbox, ...) ends what it opened: the hub client would go on
  // reconnecting under the gateway's identity in the process (tests, the demo; the CLI exits)
  let opened: { db?: { close(): Promise<void> }; relay?: Relay } = {};
  const abortStart = async (err: unknown): Promise<never> => {
    revocations.stop();
    if (client.stream as unknown) client.end(true);
    await opened.relay?.stop(0).catch(() => undefined);
    await outbox.close().catch(() => undefined);
    await opened.db?.close().catch(() => undefined);
    opened = {};
    throw err;
  };
  const db = await openStore<string>(join(config.stateDir, 'mcu-db'), 'utf8').catch(abortStart);
  opened.db = db;
  const mailbox = await Mailbox.open(db, config.mcu.mailboxMax).catch(abortStart);
  let service: McuService | undefined;
  let firmware: FirmwareManager | undefined;
  /** an MCU with a live MQTT session (the ingress starts after the relay) */
  let mcuInSession = (_mcuId: string): boolean => false;
  const relay = new Relay({
    gatewayId: config.deviceId,
    client,
    outbox,
    log,
    maxMcus: config.mcu.maxMcus,
    lostAfterMs: config.mcu.lostAfterMs,
    lostFactor: config.mcu.lostFactor,
    lostGraceMs: config.mcu.lostGraceMs,
    inSession: (mcuId) => mcuInSession(mcuId),
    persist: () => persistNow(),
    uplink: config.uplink,
    now: extras.now,
    onRevocations: (payload, conn) => revocations.setHubList(payload, conn),
    onDown: !config.mcu.hubDownlink ? undefined : async (mcuId, channel, payload) => void (await (channel === 'cmd' ? service?.hubCommand(mcuId, payload) : firmware?.desired(mcuId, payload))),
  });
  opened.relay = relay;
  try {
    for (const id of relay.restore(persisted.mcus, persisted.meta, config.mcu.forgetAfterDays)) guard.forget(id);
  } catch (err) {
    await abortStart(err);
  }
  firmware = await FirmwareManager.open({
    dir: join(config.stateDir, 'firmware'),
    db,
    relay,
    // a run restarted by open() (an image missing from the cache) could finish before the
    // service exists: that preparation fails and is tried again (the retry timer, or the next desired state)
    offer: (mcuId, cmd) => (service ? service.enqueueInternal(mcuId, cmd) : Promise.reject(new FleetError('FLEET_STORE', 'the gateway is still starting'))),
    withdraw: (mcuId, id) => (service ? service.withdrawInternal(mcuId, id) : mailbox.remove(mcuId, id)),
    verify: extras.verifyFirmware,
    gatewayId: config.deviceId,
    token,
    baseUrl: config.firmwareBaseUrl,
    log: log.child({ part: 'firmware' }),
    maxImageBytes: config.firmwareMaxBytes,
    installTimeoutMs: config.firmwareInstallTimeoutS * 1000,
    offerTtlMs: config.firmwareOfferTtlS * 1000,
    onBytes: (protocol, bytes) => firmwareBytes.inc({ protocol }, bytes),
  }).catch(abortStart);
  // one per gateway: what an MCU proved on one protocol saves the derivation on the other too
  const keys = new McuKeys(siteSecret, config.mcu.maxMcus);
  service = new McuService({
    relay,
    mailbox,
    firmware,
    keys,
    log,
    maxPayloadBytes: config.mcu.maxPayloadBytes,
    maxRecords: config.mcu.maxRecords,
    onMailbox: (result) => mailboxCommands.inc({ result }),
    rate: new McuRateLimit(config.mcu.msgRate, config.mcu.msgBurst),
  });
  const svc = service;
  const fwm = firmware;

  const rateLog = new LogThrottle(log);
  const hooks: IngressHooks = {
    accepted: (protocol, channel) => messagesIn.inc({ protocol, channel }),
    dropped: (protocol, reason, info) => {
      dropped.inc({ protocol, reason });
      droppedByReason[reason] = (droppedByReason[reason] ?? 0) + 1;
      if (reason === 'unavailable' && info.err && !isFleetError(info.err, 'FLEET_STORE')) log.error('storing MCU data failed', { mcu: info.mcuId, err: info.err });
    },
    authFailed: (protocol) => authFailures.inc({ protocol }),
    throttled: (protocol, mcuId) => {
      throttled.inc({ protocol });
      rateLog.warn(`rate:${mcuId}`, 'MCU over its message rate (mcu.msgRate); slowed down, nothing dropped', { mcu: mcuId, protocol, rate: config.mcu.msgRate, burst: config.mcu.msgBurst });
    },
    subscribeDenied: () => subDenied.inc(),
    duplicate: (protocol, reconnected) => duplicates.inc({ protocol, reconnected: String(reconnected) }),
  };

  const limits = { maxPayloadBytes: config.mcu.maxPayloadBytes, maxRecords: config.mcu.maxRecords };
  let mqtt: McuMqttIngress | undefined;
  let coap: McuCoapIngress | undefined;
  // one added to the revoked list while connected is cut off
  cutRevoked = (ids, atHub) => {
    for (const id of ids) {
      mqtt?.revoke(id);
      coap?.revoke(id);
      relay.revoked(id, atHub);
    }
  };
  /** a save failed, or changes came while one was under way: the next tick saves even without new changes */
  let saveAgain = false;
  let saving: Promise<void> | null = null;
  /** true when the state changed since the last save (or that save failed) */
  const takeChanged = () => {
    // both flags must be taken (not short-circuited) so neither change is lost
    const a = relay.takeChanged();
    const b = guard.takeChanged();
    if (!a && !b && !saveAgain) return false;
    saveAgain = false;
    return true;
  };
  const source: GatewayStateSource = { mcus: () => relay.mcuIdIterator(), replay: () => guard.entries(), meta: () => relay.metaEntries(), floors: () => guard.floorEntries() };
  /** callers of persistNow waiting for the next save to start, and to end */
  let waiting: Array<{ resolve: () => void; reject: (err: unknown) => void }> = [];
  /** every stateFlushMs, and at once when someone waits (persistNow): encoded in chunks, written off the event loop, one save at a time */
  const persistSoon = () => {
    if (saving) return; // a waiter is served by the save after this one (finally)
    const changed = takeChanged();
    const these = waiting;
    waiting = [];
    if (!changed) {
      for (const w of these) w.resolve(); // nothing new since the last save ended
      return;
    }
    saving = encodeGatewayState(source)
      .then((text) => saveGatewayStateAsync(paths.stateFile, text))
      .then(
        () => {
          for (const w of these) w.resolve();
        },
        (err: unknown) => {
          saveAgain = true;
          log.error('cannot persist MCU state; trying again', { err });
          for (const w of these) w.reject(err);
        },
      )
      .finally(() => {
        saving = null;
        if (waiting.length > 0) persistSoon();
      });
  };
  /** Save the state now (with whatever else changed meanwhile: one save serves every waiter); resolves once it is on disk. */
  const persistNow = (): Promise<void> =>
    new Promise<void>((resolve, reject) => {
      waiting.push({ resolve, reject });
      persistSoon();
    });
  /** at stop: after any save under way, the last state, synchronously */
  const persist = async () => {
    await saving;
    if (!takeChanged()) return;
    try {
      saveGatewayState(paths.stateFile, encodeGatewayStateNow(source));
    } catch (err) {
      log.error('cannot persist MCU state', { err });
    }
  };
  const flushTimer = setInterval(persistSoon, config.stateFlushMs);
  let forgetTimer: NodeJS.Timeout | undefined;

  let http: Listening | undefined;
  const shutdown = async () => {
    shuttingDown = true;
    revocations.stop();
    clearInterval(flushTimer);
    clearInterval(forgetTimer);
    await http?.close();
    await coap?.close();
    await mqtt?.close();
    svc.stop();
    fwm.close();
    await relay.stop();
    await persist();
    await disconnectFleetClient(client, config.deviceId, 'gateway', version);
    await outbox.close();
    await db.close();
  };

  try {
    mqtt = await McuMqttIngress.start({ host: config.mcu.host, port: config.mcu.mqttPort, tls: mqttTls, keys, maxClients: config.mcu.maxMcus, maxUnauthenticated: config.mcu.maxUnauthenticated, maxUnauthenticatedPerAddress: config.mcu.maxUnauthenticatedPerAddress, revoked, guard, requireMac: config.mcu.mqttRequireMac, log: log.child({ ingress: 'mqtt' }), hooks, service: svc, ...limits });
    const mqttNow = mqtt;
    mcuInSession = (mcuId) => mqttNow.isConnected(mcuId);
    coap = await McuCoapIngress.start({
      host: config.mcu.host,
      port: config.mcu.coapPort,
      keys,
      guard,
      revoked,
      log: log.child({ ingress: 'coap' }),
      hooks,
      service: svc,
      maxUploadBytes: config.mcu.maxUploadBytes,
      maxUploads: config.mcu.maxUploads,
      ...limits,
    });
    if (config.http.port !== undefined) {
      http = await listenHttp(
        (req, res) => {
          const path = (req.url ?? '/').split('?')[0];
          if (req.method !== 'GET') return sendJson(res, 405, { error: { code: 'FLEET_HTTP_METHOD', message: 'GET only' } });
          if (path === '/metrics') return sendText(res, 200, PROM_CONTENT_TYPE, metrics.render());
          if (path === '/health') return sendJson(res, 200, { ok: true });
          if (path === '/ready') return sendJson(res, relay.hubConnected ? 200 : 503, { ready: relay.hubConnected });
          return sendJson(res, 404, { error: { code: 'FLEET_HTTP_NOT_FOUND', message: 'no such route' } });
        },
        config.http.host,
        config.http.port,
      );
    }
  } catch (err) {
    await shutdown();
    throw err;
  }
  client.connect();
  const mqttIngress = mqtt;
  const coapIngress = coap;
  // MCUs silent for mcu.forgetAfterDays are forgotten at start (restore, above) and then
  // hourly, so a gateway that runs for years does not fill mcu.maxMcus with MCUs long gone;
  // never one still connected (an MQTT session that only pings) or observing its mailbox
  if (config.mcu.forgetAfterDays > 0) {
    // a revoked MCU is not kept for a firmware job or command it can never finish
    const keep = (mcuId: string): boolean => !revoked(mcuId) && (svc.hasPending(mcuId) || mqttIngress.isConnected(mcuId) || coapIngress.isObserving(mcuId));
    forgetTimer = setInterval(() => {
      for (const id of relay.forgetSilent(config.mcu.forgetAfterDays, keep)) {
        guard.forget(id);
        coapIngress.forget(id);
      }
    }, extras.forgetCheckMs ?? FORGET_CHECK_MS);
    forgetTimer.unref();
  }

  metrics.gaugeFn('fleet_gateway_mcus', 'MCUs this gateway acts for, by state', () => {
    const c = relay.counts();
    return [
      { labels: { state: 'online' }, value: c.online },
      { labels: { state: 'offline' }, value: c.mcus - c.online },
    ];
  });
  metrics.gaugeFn('fleet_gateway_downlink_mcus', 'MCUs covered by the downlink subscription (commands and desired state from the hub)', () => relay.downlinkMcus);
  metrics.gaugeFn('fleet_gateway_mailbox_depth', 'Commands waiting in MCU mailboxes', () => mailbox.depth);
  metrics.gaugeFn('fleet_gateway_firmware_mcus', 'MCU firmware updates by state', () => Object.entries(fwm.counts()).map(([state, value]) => ({ labels: { state }, value })));
  metrics.gaugeFn('fleet_gateway_mcus_revoked', 'MCUs revoked: on the revoked list (mcu.revokedFile) or at the hub', () => revocations.size);
  metrics.gaugeFn('fleet_gateway_mqtt_unauthenticated', 'MCU MQTT connections not authenticated yet (TLS handshake or CONNECT pending); capped by mcu.maxUnauthenticated and, per address, mcu.maxUnauthenticatedPerAddress', () => mqttIngress.unauthenticated);
  metrics.gaugeFn('fleet_gateway_coap_observers', 'MCUs observing their CoAP mailbox', () => coapIngress.observing);
  metrics.gaugeFn('fleet_gateway_coap_uploads_in_progress', 'CoAP Block1 uploads in progress', () => coapIngress.uploadsInProgress);
  metrics.gaugeFn('fleet_gateway_coap_cached_answers', 'CoAP answers the gateway keeps for retransmitted requests (mailbox, firmware, Block1 and log exchanges; refusals are not kept)', () => coapIngress.cachedAnswers);
  metrics.gaugeFn('fleet_gateway_coap_exchange_endpoints', 'CoAP endpoints (address, port and MCU) whose recent answers the gateway keeps for retransmissions', () => coapIngress.exchangeEndpoints);
  metrics.gaugeFn('fleet_gateway_mcu_mqtt_clients', 'Connected MCU MQTT clients', () => mqttIngress.connectedClients);
  metrics.gaugeFn('fleet_gateway_hub_connected', '1 while connected to the hub', () => (relay.hubConnected ? 1 : 0));
  metrics.eventLoopDelayP99('fleet_gateway_event_loop_delay_p99_seconds', 'p99 event-loop delay since the previous scrape: every MCU PUBACK waits for this loop');
  metrics.gaugeFn('fleet_gateway_uplink_inflight_records', 'Records sent to the hub and awaiting its PUBACK', () => relay.uplinkInFlight.records);
  metrics.gaugeFn('fleet_gateway_uplink_inflight_publishes', 'Publishes to the hub awaiting its PUBACK (at most uplink.window)', () => relay.uplinkInFlight.publishes);
  metrics.gaugeFn('fleet_gateway_outbox_depth', 'Messages waiting in the outbox', () => outbox.stats().depth);
  metrics.gaugeFn('fleet_gateway_outbox_bytes', 'Bytes waiting in the outbox', () => outbox.stats().bytes);
  metrics.gaugeFn('fleet_gateway_outbox_oldest_age_seconds', 'Age of the oldest message in the outbox', () => outbox.stats().oldestAgeMs / 1000);

  log.info('gateway listening', { gateway: config.deviceId, host: config.mcu.host, mqttPort: mqttIngress.port, mqttTlsPort: mqttIngress.tlsPort, coapPort: coapIngress.port, httpPort: http?.port ?? null, hub: config.hub.url, stateDir: config.stateDir });
  if (mqttIngress.port !== null && !isLoopback(config.mcu.host)) {
    // once, at start: MQTT CONNECT carries the MCU key as its password
    log.warn('MCU MQTT on plain TCP outside loopback: MCU keys and data cross the network in clear', {
      host: config.mcu.host,
      mqttPort: mqttIngress.port,
      fix: mqttIngress.tlsPort === null ? 'configure mcu.mqttTls (cert, key) and move the MCUs to it, then set mcu.mqttPort: null' : 'set mcu.mqttPort: null once every MCU uses the TLS port',
    });
  }
  if (mqttIngress.port === null && mqttIngress.tlsPort === null) log.info('no MCU MQTT listener (mcu.mqttPort is null and mcu.mqttTls unset); MCUs use CoAP');

  let stopping: Promise<void> | undefined;
  return {
    mqttPort: mqttIngress.port ?? 0,
    mqttTlsPort: mqttIngress.tlsPort,
    coapPort: coapIngress.port,
    httpPort: http?.port,
    firmwareState(mcuId) {
      const j = fwm.state(mcuId);
      return j ? { state: j.state, version: j.version, progress: j.progress, reason: j.reason, cause: j.cause, code: j.code } : undefined;
    },
    siteSecretFile: paths.siteSecretFile,
    metrics,
    stats(): GatewayStats {
      const c = relay.counts();
      return {
        mcus: c.mcus,
        online: c.online,
        hubConnected: relay.hubConnected,
        messagesIn: { mqtt: messagesIn.get({ protocol: 'mqtt', channel: 't' }), coap: messagesIn.get({ protocol: 'coap', channel: 't' }) },
        dropped: { ...droppedByReason },
        throttled: { mqtt: throttled.get({ protocol: 'mqtt' }), coap: throttled.get({ protocol: 'coap' }) },
        mqttClients: mqttIngress.connectedClients,
        uplinkSent: relay.uplinkSent,
        outbox: outbox.stats(),
        mailboxDepth: mailbox.depth,
        firmware: fwm.counts(),
      };
    },
    stop() {
      // MCU listeners first (no new data), then the relay reports MCUs offline and
      // drains, then the hub connection goes with the gateway's own offline state
      stopping ??= shutdown().then(() => log.info('gateway stopped'));
      return stopping;
    },
  };
}

/** Read and check the MCU TLS certificate and key (mcu.mqttTls): see core/tls.ts. */
function loadMcuTls(tls: NonNullable<GatewayConfig['mcu']['mqttTls']>, log: Logger): LeanTlsOptions & { port: number } {
  return { port: tls.port, ...loadTlsPair(tls, 'mcu.mqttTls', log) };
}
