import { createSocket, type Socket } from 'node:dgram';
import { isIPv6 } from 'node:net';
import { Agent, type IncomingMessage } from 'coap';
import mqtt, { type MqttClient } from 'mqtt';
import { FleetError } from '../core/errors.ts';
import type { Logger } from '../core/log.ts';
import type { Sample } from '../core/messages.ts';
import { isDeviceId } from '../core/topics.ts';
import { mcuKey, signMcuMessage } from '../firmware-bridge/auth.ts';
import { coapAuthQuery, coapPath, COAP_CODES, SENML_JSON_FORMAT } from '../firmware-bridge/coap.ts';
import { encodeSenmlJson } from '../firmware-bridge/senml.ts';
import { mcuTopic } from '../firmware-bridge/topics.ts';

export type SimProtocol = 'mqtt' | 'coap';

export interface SimOptions {
  /** how many ESP32s to simulate */
  devices: number;
  protocol: SimProtocol;
  /** the site secret the gateway derives MCU keys from */
  siteSecret: string;
  /** gateway address (default 127.0.0.1) */
  host?: string;
  /** gateway MCU MQTT port (default 1884) */
  mqttPort?: number;
  /** gateway CoAP port (default 5683) */
  coapPort?: number;
  /** device id prefix; ids are prefix + zero-padded index from 1 (default `esp32-<protocol>-`) */
  prefix?: string;
  /** telemetry period per device, ms (default 5000) */
  intervalMs?: number;
  /** devices boot spread evenly at random over this many ms, so they do not all connect at once (default intervalMs) */
  startJitterMs?: number;
  log?: Logger;
  /** random source in [0, 1), for reproducible runs */
  random?: () => number;
}

export interface SimStats {
  devices: number;
  /** MQTT: connected clients; CoAP: devices whose last request was answered */
  connected: number;
  /** telemetry messages the gateway acknowledged (PUBACK / 2.04) */
  sent: number;
  /** refused connects, refused or unanswered messages */
  errors: number;
}

export interface SimHandle {
  stats(): SimStats;
  stop(): Promise<void>;
}

/** Devices per shared UDP socket; each socket's 16-bit message ids and 32-bit tokens stay far from wrapping. */
const DEVICES_PER_COAP_SOCKET = 500;

/**
 * One simulated ESP32: a few numbers of state, no timers of its own. The simulator's
 * one shared tick decides when each device boots and sends.
 */
interface Device {
  id: string;
  key: string;
  bootAt: number;
  nextAt: number;
  booted: boolean;
  connected: boolean;
  /** a message awaiting its acknowledgement; like real firmware, one at a time */
  busy: boolean;
  counter: number;
  temp: number;
  humidity: number;
  rssi: number;
  client?: MqttClient;
  agent?: Agent;
}

function validate(opts: SimOptions): void {
  const bad = (key: string, why: string): never => {
    throw new FleetError('FLEET_CONFIG_INVALID', `sim option ${key}: ${why}`);
  };
  if (!Number.isInteger(opts.devices) || opts.devices < 1 || opts.devices > 100_000) bad('devices', 'must be an integer from 1 to 100000');
  if (opts.protocol !== 'mqtt' && opts.protocol !== 'coap') bad('protocol', 'must be mqtt or coap');
  if (opts.intervalMs !== undefined && (!Number.isInteger(opts.intervalMs) || opts.intervalMs < 10)) bad('intervalMs', 'must be an integer of at least 10');
  if (!opts.siteSecret) bad('siteSecret', 'is required');
}

/**
 * Run N simulated ESP32 devices in this process against a gateway, over MQTT (one TCP
 * connection per device, as real devices have) or CoAP (devices share a few UDP
 * sockets; identity is in the path and the MAC, not the source port). Each device
 * boots at a random moment within the start jitter, then sends SenML JSON telemetry
 * (temperature, humidity, rssi, uptime) every `intervalMs`.
 */
export async function runSim(opts: SimOptions): Promise<SimHandle> {
  validate(opts);
  const host = opts.host ?? '127.0.0.1';
  const interval = opts.intervalMs ?? 5000;
  const jitter = opts.startJitterMs ?? interval;
  const random = opts.random ?? Math.random;
  const prefix = opts.prefix ?? `esp32-${opts.protocol}-`;
  const width = Math.max(4, String(opts.devices).length);
  const log = opts.log;
  const started = Date.now();
  let sent = 0;
  let errors = 0;
  let stopped = false;

  const noteError = (d: Device, what: string, detail?: unknown) => {
    errors++;
    // the first few at warn, then only a trickle: 10,000 devices against a stopped gateway would flood the log
    if (errors <= 5) log?.warn(`sim device ${what}`, { device: d.id, err: detail });
    else if (errors % 1000 === 0) log?.warn('sim errors continue', { errors, last: what });
  };

  const devices: Device[] = [];
  for (let i = 1; i <= opts.devices; i++) {
    const id = `${prefix}${String(i).padStart(width, '0')}`;
    if (!isDeviceId(id)) throw new FleetError('FLEET_CONFIG_INVALID', `sim option prefix: ${JSON.stringify(id)} is not a valid device id`);
    const bootAt = started + Math.floor(random() * jitter);
    devices.push({
      id,
      key: mcuKey(opts.siteSecret, id),
      bootAt,
      nextAt: bootAt,
      booted: false,
      connected: false,
      busy: false,
      counter: 0,
      temp: 18 + random() * 8,
      humidity: 35 + random() * 20,
      rssi: -45 - Math.round(random() * 40),
    });
  }

  // CoAP: a few shared sockets. Agents get the socket passed in so they keep it open
  // between requests (an agent that owns its socket closes it whenever idle).
  const sockets: Socket[] = [];
  const agents: Agent[] = [];
  if (opts.protocol === 'coap') {
    const type = isIPv6(host) ? 'udp6' : 'udp4';
    for (let i = 0; i < Math.ceil(devices.length / DEVICES_PER_COAP_SOCKET); i++) {
      const socket = createSocket({ type });
      await new Promise<void>((r) => socket.bind(0, () => r()));
      socket.on('error', (err) => log?.warn('sim UDP socket error', { err }));
      sockets.push(socket);
      const agent = new Agent({ socket });
      agent.on('error', (err: Error) => log?.debug('sim CoAP agent error', { err }));
      agents.push(agent);
    }
    devices.forEach((d, i) => (d.agent = agents[Math.floor(i / DEVICES_PER_COAP_SOCKET)]!));
  }

  const mqttUrl = `mqtt://${isIPv6(host) ? `[${host}]` : host}:${opts.mqttPort ?? 1884}`;
  const boot = (d: Device) => {
    d.booted = true;
    if (opts.protocol !== 'mqtt') return;
    const client = mqtt.connect(mqttUrl, {
      clientId: d.id,
      username: d.id,
      password: d.key,
      keepalive: 60,
      protocolVersion: 4,
      clean: true,
      connectTimeout: 10_000,
      // spread reconnects too, so a gateway restart is not met by a synchronized storm
      reconnectPeriod: 1000 + Math.floor(random() * 2000),
      queueQoSZero: false,
    });
    client.on('connect', () => {
      d.connected = true;
      d.nextAt = Math.min(d.nextAt, Date.now()); // first reading right after (re)connecting, as firmware does
    });
    client.on('close', () => {
      d.connected = false;
      d.busy = false; // mqtt.js resends the in-flight message itself after reconnecting
    });
    client.on('error', (err) => noteError(d, 'connection error', err));
    d.client = client;
  };

  const telemetry = (d: Device, now: number): Buffer => {
    // a slow random walk, so dashboards show something plausible
    d.temp = Math.min(35, Math.max(10, d.temp + (random() - 0.5) * 0.4));
    d.humidity = Math.min(90, Math.max(20, d.humidity + (random() - 0.5)));
    d.rssi = Math.min(-30, Math.max(-95, d.rssi + Math.round((random() - 0.5) * 4)));
    const samples: Sample[] = [
      { n: 'temperature', u: 'Cel', v: Math.round(d.temp * 100) / 100, t: now },
      { n: 'humidity', u: '%RH', v: Math.round(d.humidity * 10) / 10, t: now },
      { n: 'rssi', u: 'dBm', v: d.rssi, t: now },
      { n: 'uptime', u: 's', v: Math.floor((now - d.bootAt) / 1000), t: now },
    ];
    return encodeSenmlJson(samples);
  };

  const sendMqtt = (d: Device, payload: Buffer) => {
    if (!d.client || !d.connected) return; // offline: an ESP32 would sample again next period
    d.busy = true;
    d.client.publish(mcuTopic(d.id, 't'), payload, { qos: 1 }, (err) => {
      d.busy = false;
      if (err) noteError(d, 'publish failed', err);
      else sent++;
    });
  };

  const sendCoap = (d: Device, payload: Buffer) => {
    // the counter must only grow; starting from the clock survives a restart without storage
    d.counter = Math.max(d.counter + 1, Date.now());
    const mac = signMcuMessage(d.key, d.id, 't', d.counter, payload);
    d.busy = true;
    const req = d.agent!.request({
      host,
      port: opts.coapPort ?? 5683,
      method: 'POST',
      pathname: coapPath(d.id, 't'),
      query: coapAuthQuery(d.counter, mac),
      confirmable: true,
      contentFormat: SENML_JSON_FORMAT,
    });
    let done = false;
    const finish = () => {
      const first = !done;
      done = true;
      d.busy = false;
      return first;
    };
    req.on('response', (res: IncomingMessage) => {
      if (!finish()) return;
      d.connected = true;
      if (res.code === COAP_CODES.CHANGED) sent++;
      else noteError(d, `refused with ${res.code}`, res.payload?.toString('utf8').slice(0, 100));
    });
    req.on('timeout', (err: Error) => {
      if (!finish()) return;
      d.connected = false;
      noteError(d, 'request timed out', err);
    });
    req.on('error', (err: Error) => {
      if (!finish()) return;
      d.connected = false;
      noteError(d, 'request failed', err);
    });
    req.end(payload);
  };

  const tickMs = Math.min(250, Math.max(10, Math.floor(interval / 20)));
  const tick = () => {
    const now = Date.now();
    for (const d of devices) {
      if (now < d.nextAt) continue;
      if (!d.booted) boot(d);
      // keep the phase; after a long stall, skip ahead instead of bursting
      d.nextAt = now - d.nextAt > interval ? now + interval : d.nextAt + interval;
      if (d.busy) continue; // the previous message is still unacknowledged: skip this sample
      if (opts.protocol === 'mqtt') sendMqtt(d, telemetry(d, now));
      else sendCoap(d, telemetry(d, now));
    }
  };
  const timer = setInterval(tick, tickMs);
  tick();
  log?.info('sim started', { devices: devices.length, protocol: opts.protocol, host, intervalMs: interval, first: devices[0]?.id });

  return {
    stats(): SimStats {
      let connected = 0;
      for (const d of devices) if (d.connected) connected++;
      return { devices: devices.length, connected, sent, errors };
    },
    async stop() {
      if (stopped) return;
      stopped = true;
      clearInterval(timer);
      await Promise.all(devices.map((d) => (d.client ? d.client.endAsync(true).catch(() => undefined) : undefined)));
      // Agent.close() with a socket passed in never calls back; it aborts pending
      // requests and their retransmission timers, which is all that is needed
      for (const a of agents) a.close();
      await Promise.all(sockets.map((s) => new Promise<void>((r) => s.close(() => r()))));
      for (const d of devices) d.connected = false;
      log?.info('sim stopped', { sent, errors });
    },
  };
}
