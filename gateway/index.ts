import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { isFleetError } from '../core/errors.ts';
import type { Logger } from '../core/log.ts';
import { MetricsRegistry } from '../core/metrics.ts';
import { connectFleetClient, disconnectFleetClient } from '../core/mqtt.ts';
import type { OutboxStats } from '../core/outbox.ts';
import { LevelOutbox } from '../core/outbox-level.ts';
import { setNativeDir } from '../core/native.ts';
import { loadOrCreateSecret, readSecretFile } from '../core/secrets.ts';
import { ReplayGuard } from '../firmware-bridge/auth.ts';
import { McuCoapIngress } from './coap-ingress.ts';
import { gatewayPaths, type GatewayConfig } from './config.ts';
import type { DropReason, IngressHooks } from './ingress.ts';
import { McuMqttIngress } from './mqtt-ingress.ts';
import { Relay, type McuProtocol } from './relay.ts';
import { loadGatewayState, saveGatewayState } from './state.ts';

export type { GatewayConfig } from './config.ts';
export { GatewayConfigSchema } from './config.ts';

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
  /** connected MCU MQTT clients */
  mqttClients: number;
  /** telemetry messages delivered to the hub (PUBACKed) */
  uplinkSent: number;
  outbox: OutboxStats;
}

export interface GatewayHandle {
  mqttPort: number;
  coapPort: number;
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
export async function startGateway(config: GatewayConfig, log: Logger, version = '0.0.0-dev'): Promise<GatewayHandle> {
  const paths = gatewayPaths(config);
  mkdirSync(config.stateDir, { recursive: true, mode: 0o700 });
  const token = readSecretFile(paths.tokenFile);
  const siteSecret = loadOrCreateSecret(paths.siteSecretFile);

  const metrics = new MetricsRegistry();
  const messagesIn = metrics.counter('fleet_gateway_mcu_messages_total', 'MCU messages accepted (authenticated, decoded and stored), by protocol');
  const dropped = metrics.counter('fleet_gateway_mcu_dropped_total', 'MCU messages or connections refused, by protocol and reason');
  const authFailures = metrics.counter('fleet_gateway_mcu_auth_failures_total', 'MCU MQTT connects and CoAP messages whose credentials did not verify');
  const subDenied = metrics.counter('fleet_gateway_mcu_subscribe_denied_total', 'MCU subscriptions refused by the ACL');
  const droppedByReason: Partial<Record<DropReason, number>> = {};

  const persisted = loadGatewayState(paths.stateFile, log);
  const guard = new ReplayGuard({ window: config.mcu.replayWindow, maxMcus: config.mcu.maxMcus });
  const restored = guard.restore(persisted.replay);
  if (restored.skipped > 0) log.warn('skipped malformed replay counters in the state file', { file: paths.stateFile, skipped: restored.skipped });

  setNativeDir(config.stateDir);
  const outbox = await LevelOutbox.open(join(config.stateDir, 'outbox'), config.outbox);
  outbox.on('evicted', (e) => log.warn('outbox over budget; evicted oldest records', { ...e }));
  outbox.on('corrupt', (e) => log.error('outbox record damaged on disk; skipped', e));
  const client = connectFleetClient({
    url: config.hub.url,
    deviceId: config.deviceId,
    token,
    kind: 'gateway',
    version,
    keepalive: config.hub.keepaliveS,
    reconnectMs: config.hub.reconnectMs,
    reconnectMaxMs: config.hub.reconnectMaxMs,
  });
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
  client.on('error', (err) => log.warn('hub connection error', { url: config.hub.url, err }));

  const relay = new Relay({ gatewayId: config.deviceId, client, outbox, log, maxMcus: config.mcu.maxMcus, lostAfterMs: config.mcu.lostAfterMs, uplink: config.uplink });
  relay.restore(persisted.mcus);

  const hooks: IngressHooks = {
    deliver: (mcuId, protocol, samples) => relay.accept(mcuId, protocol, samples),
    accepted: (protocol) => messagesIn.inc({ protocol }),
    dropped: (protocol, reason, info) => {
      dropped.inc({ protocol, reason });
      droppedByReason[reason] = (droppedByReason[reason] ?? 0) + 1;
      if (reason === 'unavailable' && info.err && !isFleetError(info.err, 'FLEET_STORE')) log.error('storing MCU data failed', { mcu: info.mcuId, err: info.err });
    },
    authFailed: (protocol) => authFailures.inc({ protocol }),
    subscribeDenied: () => subDenied.inc(),
  };

  const limits = { maxPayloadBytes: config.mcu.maxPayloadBytes, maxRecords: config.mcu.maxRecords };
  let mqtt: McuMqttIngress | undefined;
  let coap: McuCoapIngress | undefined;
  const persist = () => {
    // both flags must be taken (not short-circuited) so neither change is lost
    const a = relay.takeChanged();
    const b = guard.takeChanged();
    if (!a && !b) return;
    try {
      saveGatewayState(paths.stateFile, { v: 1, mcus: relay.mcuIds(), replay: guard.snapshot() });
    } catch (err) {
      log.error('cannot persist MCU state', { err });
    }
  };
  const flushTimer = setInterval(persist, config.stateFlushMs);

  const shutdown = async () => {
    shuttingDown = true;
    clearInterval(flushTimer);
    await coap?.close();
    await mqtt?.close();
    await relay.stop();
    persist();
    await disconnectFleetClient(client, config.deviceId, 'gateway', version);
    await outbox.close();
  };

  try {
    mqtt = await McuMqttIngress.start({ host: config.mcu.host, port: config.mcu.mqttPort, siteSecret, maxClients: config.mcu.maxMcus, log: log.child({ ingress: 'mqtt' }), hooks, ...limits });
    coap = await McuCoapIngress.start({ host: config.mcu.host, port: config.mcu.coapPort, siteSecret, guard, log: log.child({ ingress: 'coap' }), hooks, ...limits });
  } catch (err) {
    await shutdown();
    throw err;
  }
  const mqttIngress = mqtt;
  const coapIngress = coap;

  metrics.gaugeFn('fleet_gateway_mcus', 'MCUs this gateway acts for, by state', () => {
    const c = relay.counts();
    return [
      { labels: { state: 'online' }, value: c.online },
      { labels: { state: 'offline' }, value: c.mcus - c.online },
    ];
  });
  metrics.gaugeFn('fleet_gateway_mcu_mqtt_clients', 'Connected MCU MQTT clients', () => mqttIngress.connectedClients);
  metrics.gaugeFn('fleet_gateway_hub_connected', '1 while connected to the hub', () => (relay.hubConnected ? 1 : 0));
  metrics.gaugeFn('fleet_gateway_outbox_depth', 'Messages waiting in the outbox', () => outbox.stats().depth);
  metrics.gaugeFn('fleet_gateway_outbox_bytes', 'Bytes waiting in the outbox', () => outbox.stats().bytes);
  metrics.gaugeFn('fleet_gateway_outbox_oldest_age_seconds', 'Age of the oldest message in the outbox', () => outbox.stats().oldestAgeMs / 1000);

  log.info('gateway listening', { gateway: config.deviceId, host: config.mcu.host, mqttPort: mqttIngress.port, coapPort: coapIngress.port, hub: config.hub.url, stateDir: config.stateDir });

  let stopping: Promise<void> | undefined;
  return {
    mqttPort: mqttIngress.port,
    coapPort: coapIngress.port,
    siteSecretFile: paths.siteSecretFile,
    metrics,
    stats(): GatewayStats {
      const c = relay.counts();
      return {
        mcus: c.mcus,
        online: c.online,
        hubConnected: relay.hubConnected,
        messagesIn: { mqtt: messagesIn.get({ protocol: 'mqtt' }), coap: messagesIn.get({ protocol: 'coap' }) },
        dropped: { ...droppedByReason },
        mqttClients: mqttIngress.connectedClients,
        uplinkSent: relay.uplinkSent,
        outbox: outbox.stats(),
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
