import mqtt, { type IClientOptions, type MqttClient } from 'mqtt';
import type { Logger } from './log.ts';
import { encodeMessage, type StateMessage } from './messages.ts';
import { deviceTopic } from './topics.ts';

export interface FleetClientOptions {
  url: string;
  deviceId: string;
  token: string;
  kind: StateMessage['kind'];
  version: string;
  /** MQTT keep-alive in seconds; the hub marks the device offline 1.5x this after silence */
  keepalive: number;
  /** first reconnect delay in ms (0 = never reconnect); default 1000 */
  reconnectMs?: number;
  /** cap of the reconnect delay in ms; default 30000 */
  reconnectMaxMs?: number;
  protocolVersion?: 4 | 5;
  /** do not connect yet: the caller calls `client.connect()` (a gateway once its MCU ports are bound) */
  manualConnect?: boolean;
}

/**
 * Connect a device (agent or gateway) to the hub: client id = username = device id,
 * the device token as password, and a retained `{online:false}` last will on the
 * device's state topic, so the hub learns of a lost device from the broker itself.
 * On every (re)connect the device publishes its retained `{online:true}` state.
 */
export function connectFleetClient(opts: FleetClientOptions): MqttClient {
  const stateTopic = deviceTopic(opts.deviceId, 'state');
  const state = (online: boolean, reason?: string): Buffer =>
    encodeMessage({ v: 1, online, kind: opts.kind, ts: Date.now(), version: opts.version, ...(reason ? { reason } : {}) } satisfies StateMessage);
  const options: IClientOptions = {
    clientId: opts.deviceId,
    username: opts.deviceId,
    password: opts.token,
    keepalive: opts.keepalive,
    // reconnects are ours (below): mqtt.js only knows a fixed period
    reconnectPeriod: 0,
    connectTimeout: 10_000,
    protocolVersion: opts.protocolVersion ?? 4,
    clean: true,
    // mqtt-packet's number cache is 65,536 two-byte Buffers (one per packet id / length),
    // ~6.5 MB of V8 heap in every process that connects, built on the first packet; without
    // it each such number costs one 2-byte allocation per packet, nothing at our rates
    writeCache: false,
    will: { topic: stateTopic, payload: state(false, 'connection lost'), qos: 1, retain: true },
    ...(opts.manualConnect ? { manualConnect: true } : {}),
  };
  const client = mqtt.connect(opts.url, options);
  let attempt = 0;
  let timer: NodeJS.Timeout | null = null;
  client.on('connect', () => {
    (client.stream as { setNoDelay?: (on: boolean) => void } | undefined)?.setNoDelay?.(true);
    attempt = 0;
    client.publish(stateTopic, state(true), { qos: 1, retain: true });
  });
  const initial = opts.reconnectMs ?? 1000;
  if (initial > 0) {
    // ended by its owner (end()): never reconnected again. mqtt.js clears `disconnecting` once
    // an end is done (reconnectPeriod 0, manualConnect), and the stream's 'close' can come
    // after that: the flag alone let a stopped gateway reconnect under its identity
    let ended = false;
    client.on('close', () => {
      if (ended || client.disconnecting || timer) return;
      timer = setTimeout(() => {
        timer = null;
        if (!ended && !client.disconnecting && !client.connected) client.reconnect();
      }, reconnectDelay(initial, opts.reconnectMaxMs ?? 30_000, attempt++));
    });
    client.on('end', () => {
      ended = true;
      if (timer) clearTimeout(timer);
      timer = null;
    });
  }
  return client;
}

/**
 * Exponential backoff with "equal jitter": a random delay between half and all of
 * min(max, initial * 2^attempt). After a hub outage a fleet's devices come back spread
 * out instead of in one wave.
 */
export function reconnectDelay(initialMs: number, maxMs: number, attempt: number, random: () => number = Math.random): number {
  const ceiling = Math.min(maxMs, initialMs * 2 ** Math.min(attempt, 30));
  return Math.round(ceiling / 2 + random() * (ceiling / 2));
}

/** Publish the retained offline state and disconnect cleanly (a clean disconnect suppresses the will). */
export async function disconnectFleetClient(client: MqttClient, deviceId: string, kind: StateMessage['kind'], version: string, graceMs = 2000): Promise<void> {
  // made with manualConnect and never connected: there is nothing to end (mqtt.js's end would
  // reach for a stream that does not exist)
  if (!(client.stream as unknown)) return;
  if (client.connected) {
    const msg = encodeMessage({ v: 1, online: false, kind, ts: Date.now(), version, reason: 'stopped' } satisfies StateMessage);
    // bounded: when the hub goes away at the same moment the PUBACK never comes, and mqtt.js
    // would keep the message for a reconnect that a stopping process will never make
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([
      client.publishAsync(deviceTopic(deviceId, 'state'), msg, { qos: 1, retain: true }).catch(() => undefined),
      new Promise<void>((resolve) => (timer = setTimeout(resolve, graceMs))),
    ]);
    clearTimeout(timer);
    // end with a DISCONNECT, so that the hub drops the last will: a forced end (no DISCONNECT)
    // had the broker publish it, and its "connection lost" replaced the retained "stopped".
    // What the uplink still has in flight is not waited for: its records stay in the outbox
    // and are sent again after the restart (the callers stop their uplink before this)
    for (const id of Object.keys(client.outgoing)) client.removeOutgoingMessage(Number(id));
    let cut: NodeJS.Timeout | undefined;
    const clean = await Promise.race([
      client.endAsync(false).then(
        () => true,
        () => false,
      ),
      new Promise<boolean>((resolve) => (cut = setTimeout(() => resolve(false), graceMs))),
    ]);
    clearTimeout(cut);
    if (clean) return;
    client.stream?.destroy(); // the DISCONNECT did not get out in time (the hub away at the same moment)
  }
  await client.endAsync(true).catch(() => undefined);
}

/**
 * Log an error of a device's hub connection. A refused CONNECT says why in words an operator
 * can act on (the client goes on retrying with backoff, and the outbox keeps everything):
 * 4 is a wrong token, 5 a device revoked at the hub.
 */
export function logHubError(log: Logger, err: Error & { code?: unknown }, fields: Record<string, unknown> = {}): void {
  if (err.code === 5) log.error('the hub refuses this device (CONNACK 5, not authorized): it is revoked at the hub (DELETE /api/v1/device-revocations/{id} lifts it); retrying with backoff, the outbox keeps everything', { ...fields, err });
  else if (err.code === 4) log.error('the hub refuses this device\'s token (CONNACK 4): check the token file against `fleetlet hub device-token <id>`; retrying with backoff', { ...fields, err });
  // bytes that are not MQTT (mqtt-packet's parser: "Invalid header flag bits…", "Invalid
  // protocolId"…): most often the hub's HTTP port (8080) given as its MQTT one
  else if (/^Invalid |Unknown command|not supported/.test(String(err.message))) log.error('the hub address does not answer MQTT: is hub.url the hub\'s MQTT port (default 1883), not its HTTP port (8080)? retrying with backoff', { ...fields, err });
  else log.warn('hub connection error', { ...fields, err });
}
