import { createHash, type Hash } from 'node:crypto';
import { FleetError } from '../core/errors.ts';
import type { Logger } from '../core/log.ts';
import { isDeviceId } from '../core/topics.ts';
import { mcuKey, signMcuMessage } from '../firmware-bridge/auth.ts';
import { coapAuthQuery, COAP_CODES, COAP_PATH_ROOT, COAP_QUERY_IMAGE, COMPACT_FORMAT, JSON_FORMAT, SENML_CBOR_FORMAT, SENML_JSON_FORMAT } from '../firmware-bridge/coap.ts';
import { encodeCompact, encodeSenmlCbor, type SensorTable, type TelemetryFormat } from '../firmware-bridge/codecs.ts';
import { decodeFwChunk, decodeMcuCommand, HW_CLASS_RE, type BootReason, type McuCommand } from '../firmware-bridge/frames.ts';
import { MCU_PREFIX, type McuChannel, type McuUpChannel } from '../firmware-bridge/topics.ts';
import { CoapEndpoint, COAP_METHOD, type CoapResponse, type LinkKnobs } from './coap-lite.ts';
import { MqttLite } from './mqtt-lite.ts';
import { encodeReadingSenmlJson, readingSamples, type Reading } from './reading.ts';
import { Scheduler } from './sched.ts';

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
  /** first index (default 1), so several sim processes can share one id space */
  firstIndex?: number;
  /** telemetry period per device, ms (default 5000) */
  intervalMs?: number;
  /** each period is intervalMs × (1 ± this/2), so devices drift apart instead of firing together (default 0.1) */
  intervalJitter?: number;
  /** devices boot spread evenly at random over this many ms, so they do not all connect at once (default intervalMs) */
  startJitterMs?: number;
  /**
   * Deep sleep: after `awakeMs` awake a device declares its sleep period (in its hello),
   * disconnects cleanly and sleeps `sleepMs`; then it wakes (a boot with reason
   * `deep_sleep`, RTC memory kept), reconnects, reads its mailbox and sends.
   * 0 = never sleeps (default).
   */
  sleepMs?: number;
  /** time awake per cycle before sleeping, ms (default 3 × intervalMs) */
  awakeMs?: number;
  /**
   * Flaky link. CoAP: probability that a datagram (either way) is lost. MQTT (TCP has
   * no datagram loss): probability per publish that the Wi-Fi link drops around it —
   * half before the PUBLISH is written, half after (the PUBACK is lost, so the device
   * resends with DUP after reconnecting; the gateway acknowledges it and does not store it
   * twice when it had stored the first copy: docs/mcu-protocol.md "Delivery semantics").
   */
  loss?: number;
  /** added one-way latency on everything the device sends, ms (default 0) */
  latencyMs?: number;
  /** uniformly random extra latency 0..this, ms (default 0) */
  latencyJitterMs?: number;
  /** CoAP ACK_TIMEOUT, ms (default 2000; RFC 7252) */
  coapAckTimeoutMs?: number;
  /** devices per shared UDP socket (default 500) */
  devicesPerSocket?: number;
  /** telemetry encoding (default senml+json) */
  format?: TelemetryFormat;
  /** send a version report (`hello`) after every boot (default true) */
  hello?: boolean;
  /** read the command mailbox (MQTT: subscribe; CoAP: GET with Observe) (default true) */
  mailbox?: boolean;
  /** firmware version every device boots with (default 1.0.0) */
  firmwareVersion?: string;
  /** firmware versions that fail to start: the simulated bootloader rolls back to the previous one */
  failVersions?: readonly string[];
  /** hardware class every device reports in its hello (`hw`; default esp32-sim; '' = none) */
  hardwareClass?: string;
  /** MQTT keep-alive, s (default max(30, 3 × intervalMs)) */
  mqttKeepaliveS?: number;
  /** CoAP: how often a device registers its mailbox Observe again, ms (default 60 s or 20 intervals, the longer) */
  reobserveMs?: number;
  /** firmware chunk size, bytes: MQTT 16..4096, CoAP Block2 16..1024 (power of two) (default 512) */
  fwChunkBytes?: number;
  /** called for every telemetry message the gateway acknowledged (PUBACK / 2.04), with the message's sample id */
  onAck?: (deviceId: string, seq: number, t: number) => void;
  /** called for every command a device ran (not for redeliveries) */
  onCommand?: (deviceId: string, cmd: SimCommand) => void;
  /** called whenever a device finished booting a firmware image (after an update or a rollback) */
  onFirmware?: (deviceId: string, ev: { version: string; boot: 'ota' | 'rollback'; prev: string }) => void;
  log?: Logger;
  /** random source in [0, 1), for reproducible runs */
  random?: () => number;
}

export type SimCommand = McuCommand;

export interface SimStats {
  devices: number;
  /** MQTT: connected clients; CoAP: awake devices whose last request was answered */
  connected: number;
  /** in deep sleep right now */
  sleeping: number;
  /** telemetry messages the gateway acknowledged (PUBACK / 2.04) */
  sent: number;
  /** telemetry messages written (first tries) */
  published: number;
  /** resends: MQTT DUP after a reconnect, CoAP application-level retries */
  resent: number;
  /** CoAP: answered 5.03 with Max-Age by the gateway's rate limit, sent again after it */
  throttled: number;
  /** MQTT: connection attempts (TCP connect + CONNECT), first ones and retries */
  connectAttempts: number;
  /** MQTT: attempts given up after 10 s without a CONNACK */
  connectTimeouts: number;
  /** MQTT: attempts whose connection closed before a CONNACK (timeouts included) */
  connectFailures: number;
  /** MQTT: slowest attempt to CONNACK so far, ms */
  connectMaxMs: number;
  /** readings not taken because the previous one was still unacknowledged */
  skipped: number;
  /** refused connects, refused or unanswered messages */
  errors: number;
  /** boots, wake-ups included */
  boots: number;
  /** MQTT: (re)connects accepted */
  connects: number;
  /** link drops injected by the loss knob (MQTT) or datagrams lost (CoAP) */
  linkDrops: number;
  /** version reports acknowledged */
  hellos: number;
  /** commands run (redeliveries not counted), acks acknowledged by the gateway */
  commands: number;
  acks: number;
  /** down messages dropped: bad MAC or malformed */
  badCommands: number;
  /** command frames older than the newest one run (a delayed redelivery over a flaky link, or a replay): ignored */
  staleCommands: number;
  /** firmware images downloaded and verified / refused (hash) / booted / rolled back */
  fwDownloaded: number;
  fwHashFailed: number;
  fwBooted: number;
  fwRolledBack: number;
  /** firmware bytes received */
  fwBytes: number;
}

export interface SimDeviceInfo {
  id: string;
  version: string;
  state: 'off' | 'connecting' | 'online' | 'sleeping';
  seq: number;
  /** highest command sequence run */
  cmdSeq: number;
  intervalMs: number;
  /** firmware download progress, bytes, while one runs */
  fwOffset?: number;
}

export interface SimHandle {
  stats(): SimStats;
  /** the simulator's own event-loop pressure: how late scheduled events ran since the last call */
  lag(): { meanMs: number; maxMs: number; ran: number };
  /** ids of the simulated devices, in order */
  ids(): string[];
  device(id: string): SimDeviceInfo | undefined;
  stop(): Promise<void>;
}

type UpChannel = Exclude<McuUpChannel, 'log'>;

/** The sensor table of the compact form, declared in every hello. */
const SENSORS: SensorTable = [
  ['temperature', 'Cel'],
  ['humidity', '%RH'],
  ['rssi', 'dBm'],
  ['uptime', 's'],
  ['seq', ''],
];
const CONTENT_FORMAT: Record<TelemetryFormat, number> = { 'senml+json': SENML_JSON_FORMAT, 'senml+cbor': SENML_CBOR_FORMAT, compact: COMPACT_FORMAT };

/** One message on its way up; like firmware, a device has one in flight at a time. */
interface Up {
  ch: UpChannel;
  payload: Buffer;
  /** telemetry: the reading's id and time */
  seq: number;
  t: number;
  pid: number;
  sentOnce: boolean;
  then?: (d: Device) => void;
}

interface FwDownload {
  cmdId: string;
  cmdSeq: number;
  version: string;
  sha256: string;
  size: number;
  offset: number;
  hash: Hash;
  /** CoAP: one counter and MAC for the whole download (not consumed, docs/mcu-protocol.md) */
  counter: number;
  mac: string;
  busy: boolean;
}

/**
 * One simulated ESP32: a few fields and no timers of its own; the shared scheduler
 * decides when each one boots, sends and sleeps.
 */
interface Device {
  id: string;
  key: string;
  /** bumped whenever the device reboots, sleeps or loses its link, so stale scheduled events are ignored */
  gen: number;
  state: 'off' | 'connecting' | 'online' | 'sleeping';
  bootedAt: number;
  bootReason: BootReason;
  prevVersion?: string;
  bootErr?: string;
  awakeUntil: number;
  interval: number;
  /** when the next reading is due (RTC memory): a reconnect resumes the period, not restarts it with a reading at once */
  nextTickAt: number;
  /** a verified image waits for the reboot into it (after its ack's delivery): no deep sleep meanwhile */
  rebootPending?: boolean;
  connected: boolean;
  /** when the current MQTT connection attempt started, ms */
  connectStarted: number;
  q: Up[];
  busy: boolean;
  seq: number;
  counter: number;
  /** highest command sequence run, and the id it had (for acking a redelivery again) */
  cmdSeq: number;
  cmdId: string;
  /** the ack sent for cmdSeq, null while that command still runs */
  lastAck: Buffer | null;
  temp: number;
  humidity: number;
  rssi: number;
  reconnectDelay: number;
  nextWriteAt: number;
  mqtt?: MqttLite;
  /** MQTT: `mcu/v1/{id}/t`, built once */
  tTopic?: string;
  ep?: CoapEndpoint;
  observeToken: number;
  /** when the mailbox Observe was last registered (CoAP) */
  observedAt: number;
  /** the latest mailbox registration, `pending` until its first answer: nothing with a newer counter goes out meanwhile (docs/mcu-protocol.md "Send in counter order") */
  observeReg: { pending: boolean } | null;
  version: string;
  fw: FwDownload | null;
}

interface Ev {
  d: Device;
  gen: number;
}

function validate(opts: SimOptions): void {
  const bad = (key: string, why: string): never => {
    throw new FleetError('FLEET_CONFIG_INVALID', `sim option ${key}: ${why}`);
  };
  if (!Number.isInteger(opts.devices) || opts.devices < 1 || opts.devices > 100_000) bad('devices', 'must be an integer from 1 to 100000');
  if (opts.protocol !== 'mqtt' && opts.protocol !== 'coap') bad('protocol', 'must be mqtt or coap');
  if (opts.reobserveMs !== undefined && (!Number.isInteger(opts.reobserveMs) || opts.reobserveMs < 100)) bad('reobserveMs', 'must be an integer of at least 100');
  if (opts.mqttKeepaliveS !== undefined && (!Number.isInteger(opts.mqttKeepaliveS) || opts.mqttKeepaliveS < 1 || opts.mqttKeepaliveS > 65_535)) bad('mqttKeepaliveS', 'must be an integer from 1 to 65535');
  if (opts.hardwareClass !== undefined && opts.hardwareClass !== '' && !HW_CLASS_RE.test(opts.hardwareClass)) bad('hardwareClass', 'must be 1 to 64 letters, digits, . _ - (not first), or empty for none');
  if (opts.intervalMs !== undefined && (!Number.isInteger(opts.intervalMs) || opts.intervalMs < 10)) bad('intervalMs', 'must be an integer of at least 10');
  if (opts.loss !== undefined && !(opts.loss >= 0 && opts.loss < 1)) bad('loss', 'must be from 0 to below 1');
  if (opts.intervalJitter !== undefined && !(opts.intervalJitter >= 0 && opts.intervalJitter <= 1)) bad('intervalJitter', 'must be from 0 to 1');
  for (const k of ['latencyMs', 'latencyJitterMs', 'sleepMs', 'awakeMs', 'startJitterMs'] as const) {
    const v = opts[k];
    if (v !== undefined && !(Number.isFinite(v) && v >= 0)) bad(k, 'must be a number of at least 0');
  }
  if (opts.fwChunkBytes !== undefined) {
    const c = opts.fwChunkBytes;
    const max = opts.protocol === 'coap' ? 1024 : 4096;
    if (!Number.isInteger(c) || c < 16 || c > max || (opts.protocol === 'coap' && (c & (c - 1)) !== 0)) bad('fwChunkBytes', `must be 16..${max}${opts.protocol === 'coap' ? ', a power of two' : ''}`);
  }
  if (opts.format !== undefined && !(opts.format in CONTENT_FORMAT)) bad('format', `must be one of ${Object.keys(CONTENT_FORMAT).join(', ')}`);
  if (!opts.siteSecret) bad('siteSecret', 'is required');
}

const MAX_QUEUE = 8;

/** Is a reading waiting (or in flight)? A loop, not `q.some(closure)`: this runs for every device every period. */
function hasReading(q: readonly Up[]): boolean {
  for (let i = 0; i < q.length; i++) if (q[i]!.ch === 't') return true;
  return false;
}

/**
 * Run N simulated ESP32 devices in this process against a gateway, over MQTT (one TCP
 * connection per device, as real devices have, with a minimal MQTT 3.1.1 client) or
 * CoAP (devices share a few UDP sockets; identity is in the path and the MAC, not the
 * source port). Each device boots, reports its version, reads its command mailbox,
 * sends telemetry, sleeps and updates its firmware as docs/mcu-protocol.md describes;
 * docs/esp32-sim.md describes the knobs.
 */
export async function runSim(opts: SimOptions): Promise<SimHandle> {
  validate(opts);
  const host = opts.host ?? '127.0.0.1';
  const interval = opts.intervalMs ?? 5000;
  const ijit = opts.intervalJitter ?? 0.1;
  const startJitter = opts.startJitterMs ?? interval;
  const random = opts.random ?? Math.random;
  const prefix = opts.prefix ?? `esp32-${opts.protocol}-`;
  const first = opts.firstIndex ?? 1;
  const width = Math.max(4, String(first + opts.devices - 1).length);
  const sleepMs = opts.sleepMs ?? 0;
  const awakeMs = opts.awakeMs ?? 3 * interval;
  const loss = opts.loss ?? 0;
  const hello = opts.hello ?? true;
  const format: TelemetryFormat = opts.format ?? 'senml+json';
  const mailbox = opts.mailbox ?? true;
  const failVersions = new Set(opts.failVersions ?? []);
  const hardwareClass = opts.hardwareClass ?? 'esp32-sim';
  const chunk = opts.fwChunkBytes ?? 512;
  /** longest a verified image waits for its ack's delivery before the device reboots into it */
  const FW_ACK_WAIT_MS = 5000;
  const link: LinkKnobs = { loss, latencyMs: opts.latencyMs ?? 0, latencyJitterMs: opts.latencyJitterMs ?? 0 };
  const keepaliveS = opts.mqttKeepaliveS ?? Math.max(30, Math.ceil((3 * interval) / 1000));
  const keepaliveMs = keepaliveS * 1000;
  /** CoAP: how often an awake device registers its mailbox Observe again */
  const reobserveMs = opts.reobserveMs ?? Math.max(60_000, 20 * interval);
  const mqttPort = opts.mqttPort ?? 1884;
  const log = opts.log;
  const sched = new Scheduler();
  const st: SimStats = {
    devices: opts.devices, connected: 0, sleeping: 0, sent: 0, published: 0, resent: 0, throttled: 0, connectAttempts: 0, connectTimeouts: 0, connectFailures: 0, connectMaxMs: 0, skipped: 0, errors: 0, boots: 0, connects: 0, linkDrops: 0,
    hellos: 0, commands: 0, acks: 0, badCommands: 0, staleCommands: 0, fwDownloaded: 0, fwHashFailed: 0, fwBooted: 0, fwRolledBack: 0, fwBytes: 0,
  };
  let stopped = false;

  const noteError = (d: Device, what: string, detail?: unknown) => {
    st.errors++;
    // the first few at warn, then only a trickle: 10,000 devices against a stopped gateway would flood the log
    if (st.errors <= 5) log?.warn(`sim device ${what}`, { device: d.id, err: detail instanceof Error ? detail.message : detail });
    else if (st.errors % 1000 === 0) log?.warn('sim errors continue', { errors: st.errors, last: what });
  };

  const noteBad = (d: Device, what: string, detail: Record<string, unknown>) => {
    st.badCommands++;
    if (st.badCommands <= 5) log?.warn(`sim device ${what}`, { device: d.id, ...detail });
  };

  const started = Date.now();
  const devices: Device[] = [];
  const byId = new Map<string, Device>();
  for (let i = first; i < first + opts.devices; i++) {
    const id = `${prefix}${String(i).padStart(width, '0')}`;
    if (!isDeviceId(id)) throw new FleetError('FLEET_CONFIG_INVALID', `sim option prefix: ${JSON.stringify(id)} is not a valid device id`);
    const d: Device = {
      id,
      key: mcuKey(opts.siteSecret, id),
      gen: 0,
      state: 'off',
      bootedAt: 0,
      bootReason: 'power_on',
      awakeUntil: Infinity,
      nextTickAt: 0,
      interval,
      connected: false,
      connectStarted: 0,
      q: [],
      busy: false,
      seq: 0,
      counter: 0,
      cmdSeq: 0,
      cmdId: '',
      lastAck: null,
      temp: 18 + random() * 8,
      humidity: 35 + random() * 20,
      rssi: -45 - Math.round(random() * 40),
      reconnectDelay: 1000,
      nextWriteAt: 0,
      observeToken: 0,
      observedAt: 0,
      observeReg: null,
      version: opts.firmwareVersion ?? '1.0.0',
      fw: null,
    };
    devices.push(d);
    byId.set(id, d);
  }

  // CoAP: a few shared sockets
  const endpoints: CoapEndpoint[] = [];
  if (opts.protocol === 'coap') {
    const per = opts.devicesPerSocket ?? 500;
    for (let i = 0; i < Math.ceil(devices.length / per); i++) {
      endpoints.push(
        await CoapEndpoint.open({ host, port: opts.coapPort ?? 5683, sched, link, random, ...(opts.coapAckTimeoutMs !== undefined ? { ackTimeoutMs: opts.coapAckTimeoutMs } : {}) }),
      );
    }
    devices.forEach((d, i) => (d.ep = endpoints[Math.floor(i / per)]!));
  }

  const period = (d: Device) => d.interval * (1 + (random() - 0.5) * ijit);
  const nextCounter = (d: Device) => (d.counter = Math.max(d.counter + 1, Date.now()));
  const mac = (d: Device, resource: McuChannel, counter: number, payload: Uint8Array) => signMcuMessage(d.key, d.id, resource, counter, payload);

  const up = (d: Device) => {
    if (!d.connected) {
      d.connected = true;
      st.connected++;
    }
  };
  const down = (d: Device) => {
    if (d.connected) {
      d.connected = false;
      st.connected--;
    }
  };

  // ---- lifecycle -------------------------------------------------------------------

  /** the version report (hello) as this boot gives it */
  const helloUp = (d: Device, now: number) => {
    const h: Record<string, unknown> = { fw: d.version, boot: d.bootReason };
    if (d.prevVersion) h.prev = d.prevVersion;
    if (d.bootErr) h.err = d.bootErr;
    if (sleepMs > 0) h.sleep = Math.max(1, Math.ceil(sleepMs / 1000));
    if (format === 'compact') h.sensors = SENSORS;
    if (hardwareClass) h.hw = hardwareClass;
    return { ch: 'hello' as const, payload: Buffer.from(JSON.stringify(h)), seq: 0, t: now, pid: 0, sentOnce: false, then: () => st.hellos++ };
  };

  const boot = ({ d, gen }: Ev, now: number) => {
    if (stopped || gen !== d.gen) return;
    st.boots++;
    if (d.state === 'sleeping') st.sleeping--;
    d.state = 'connecting';
    d.bootedAt = now;
    d.awakeUntil = sleepMs > 0 ? now + awakeMs : Infinity;
    d.nextTickAt = now;
    // RAM is gone after a boot; what is left is what firmware keeps in RTC memory / NVS:
    // the unacknowledged message, counters, the command seq, a firmware download's progress
    d.busy = false;
    d.observeReg = null;
    d.q = d.q.filter((u) => u.ch === 't');
    if (hello) d.q.unshift(helloUp(d, now));
    d.prevVersion = undefined;
    d.bootErr = undefined;
    if (opts.protocol === 'mqtt') connectMqtt(d);
    else {
      // CoAP needs no connection: report, read the mailbox, send the first reading
      d.state = 'online';
      if (mailbox) observeMailbox(d);
      if (d.fw) sched.at(now, fwNext, { d, gen: d.gen });
      sched.at(now, tick, d, d.gen);
      pump(d);
    }
  };

  const reboot = (d: Device, reason: BootReason, delayMs = 200) => {
    if (d.state === 'sleeping') st.sleeping--;
    d.gen++;
    d.bootReason = reason;
    cancelObserve(d);
    d.mqtt?.end();
    down(d);
    d.state = 'off';
    sched.after(delayMs, boot, { d, gen: d.gen });
  };

  const goToSleep = (d: Device, now: number) => {
    d.gen++;
    d.state = 'sleeping';
    st.sleeping++;
    cancelObserve(d);
    // a clean DISCONNECT; an unacknowledged reading stays in RTC memory
    d.mqtt?.end();
    down(d);
    d.bootReason = 'deep_sleep';
    sched.at(now + sleepMs, boot, { d, gen: d.gen });
  };

  // ---- the up queue: one message in flight, like firmware ---------------------------

  const enqueue = (d: Device, u: Up, front = false) => {
    // "front": next after the one in flight (which must stay at the head until acknowledged)
    if (front) d.q.splice(d.busy ? 1 : 0, 0, u);
    else d.q.push(u);
    pump(d);
  };

  const pump = (d: Device) => {
    if (stopped || d.busy || d.q.length === 0 || d.state !== 'online') return;
    // a registration renewed while nothing was outstanding is answered first (its counter is older)
    if (d.observeReg?.pending && Date.now() - d.observedAt > 20) return;
    const u = d.q[0]!;
    if (opts.protocol === 'mqtt') {
      if (!d.mqtt?.writable) return;
      d.busy = true;
      if (u.sentOnce) st.resent++;
      else if (u.ch === 't') st.published++;
      const dup = u.sentOnce;
      if (!u.sentOnce || u.pid === 0) u.pid = d.mqtt.nextPid();
      u.sentOnce = true;
      mqttWrite(d, u, dup);
    } else {
      d.busy = true;
      postCoap(d, u);
    }
  };

  const acked = (d: Device, u: Up) => {
    if (d.q[0] !== u) return;
    d.q.shift();
    d.busy = false;
    if (u.ch === 't') {
      st.sent++;
      opts.onAck?.(d.id, u.seq, u.t);
    }
    u.then?.(d);
    pump(d);
  };

  // ---- MQTT ----------------------------------------------------------------------

  const connectMqtt = (d: Device) => {
    const gen = d.gen;
    if (!d.mqtt) {
      d.mqtt = new MqttLite({
        connack: (rc) => {
          if (rc !== 0) return noteError(d, `connection refused with CONNACK ${rc}`);
          st.connects++;
          st.connectMaxMs = Math.max(st.connectMaxMs, Date.now() - d.connectStarted);
          d.reconnectDelay = 1000;
          d.state = 'online';
          up(d);
          const now = Date.now();
          // the two down topics by name, not `${id}/#`: through a plain broker (the bench's
          // Mosquitto reference) '#' also matched the device's own readings and every one came
          // back to it: 70% more CPU for Mosquitto and 26% more for the sim (3,000 devices)
          if (mailbox || d.fw) {
            d.mqtt!.subscribe(d.mqtt!.nextPid(), `${MCU_PREFIX}${d.id}/cmd`, 1);
            d.mqtt!.subscribe(d.mqtt!.nextPid(), `${MCU_PREFIX}${d.id}/fw`, 1);
          }
          d.busy = false;
          pump(d); // the unacknowledged message first (DUP, same packet id), as a QoS 1 client must
          if (d.fw) sched.at(now, fwNext, { d, gen: d.gen });
          // after a boot the first reading at once; after a reconnect when it was due anyway
          sched.at(Math.max(now, d.nextTickAt), tick, d, d.gen);
          keepAliveFrom(d, now);
        },
        close: () => {
          if (d.state === 'connecting') st.connectFailures++;
          down(d);
          d.busy = false;
          if (d.fw) d.fw.busy = false;
          if (stopped || d.state === 'sleeping' || d.state === 'off') return;
          d.state = 'connecting';
          // Wi-Fi gone or gateway away: back off 0.5–1.5 times a delay that starts at 1 s and doubles to 30 s (so 0.5–1.5 s first, 15–45 s at most), spread so a gateway restart is not met by a storm
          const delay = d.reconnectDelay * (0.5 + random());
          d.reconnectDelay = Math.min(30_000, d.reconnectDelay * 2);
          d.gen++;
          sched.after(delay, reconnect, { d, gen: d.gen });
        },
        puback: (pid) => {
          const u = d.q[0];
          if (u && d.busy && u.pid === pid) acked(d, u);
        },
        suback: () => undefined,
        message: (topic, payload) => onDown(d, topic, payload),
      });
    }
    st.connectAttempts++;
    d.connectStarted = Date.now();
    d.mqtt.connect({ host, port: mqttPort, clientId: d.id, username: d.id, password: d.key, keepaliveS, clean: true });
    sched.after(10_000, connectTimeout, { d, gen });
  };

  const connectTimeout = ({ d, gen }: Ev) => {
    if (stopped || gen !== d.gen || d.state !== 'connecting' || d.connected) return;
    st.connectTimeouts++;
    d.mqtt?.destroy();
  };

  const reconnect = ({ d, gen }: Ev) => {
    if (stopped || gen !== d.gen) return;
    connectMqtt(d);
  };

  const mqttWrite = (d: Device, u: Up, dup: boolean) => {
    const m = d.mqtt!;
    if (loss > 0 && random() < loss) {
      st.linkDrops++;
      if (random() < 0.5) return m.destroy(); // lost before it left
      writeDelayed(d, u, dup);
      return m.destroy(); // written, but the link drops before the PUBACK
    }
    writeDelayed(d, u, dup);
  };

  const writeDelayed = (d: Device, u: Up, dup: boolean) => {
    // the telemetry topic is kept per device (built every period otherwise); a string, not a
    // Buffer: a small Buffer is a slice of an 8 KiB pool and would keep its whole pool alive
    const topic = u.ch === 't' ? (d.tTopic ??= `${MCU_PREFIX}${d.id}/t`) : `${MCU_PREFIX}${d.id}/${u.ch}`;
    const delay = link.latencyMs + (link.latencyJitterMs > 0 ? random() * link.latencyJitterMs : 0);
    if (delay <= 0) return d.mqtt!.publish(topic, u.payload, 1, u.pid, dup);
    const at = Math.max(d.nextWriteAt, Date.now() + delay);
    d.nextWriteAt = at;
    sched.at(at, delayedPublish, { d, gen: d.gen, topic, u, dup });
  };
  const delayedPublish = ({ d, gen, topic, u, dup }: Ev & { topic: string; u: Up; dup: boolean }) => {
    if (gen !== d.gen || !d.mqtt?.writable) return;
    d.mqtt.publish(topic, u.payload, 1, u.pid, dup);
  };

  const onDown = (d: Device, topic: string, payload: Buffer) => {
    const ch = topic.slice(topic.lastIndexOf('/') + 1);
    if (ch === 'cmd') onCommandFrame(d, payload);
    else if (ch === 'fw') onFwChunk(d, payload);
  };

  // ---- telemetry -------------------------------------------------------------------

  const reading = (d: Device, now: number): Up => {
    // a slow random walk, so dashboards show something plausible
    d.temp = Math.min(35, Math.max(10, d.temp + (random() - 0.5) * 0.4));
    d.humidity = Math.min(90, Math.max(20, d.humidity + (random() - 0.5)));
    d.rssi = Math.min(-30, Math.max(-95, d.rssi + Math.round((random() - 0.5) * 4)));
    const seq = ++d.seq;
    const r: Reading = { t: now, temperature: Math.round(d.temp * 100) / 100, humidity: Math.round(d.humidity * 10) / 10, rssi: d.rssi, uptime: Math.floor((now - d.bootedAt) / 1000), seq };
    const payload = format === 'senml+json' ? encodeReadingSenmlJson(r) : format === 'senml+cbor' ? encodeSenmlCbor(readingSamples(r)) : encodeCompact(readingSamples(r), { table: SENSORS });
    return { ch: 't', payload, seq, t: now, pid: 0, sentOnce: false };
  };

  /**
   * MQTT keep-alive between readings further apart than half the keep-alive (a set-interval
   * beyond the one the keep-alive was chosen for at CONNECT): esp-mqtt pings from its own task
   * whatever the application's period. Without it the broker closed the connection after 1.5
   * keep-alives and every reconnect sent a reading early. Nothing is scheduled otherwise.
   */
  const keepAliveFrom = (d: Device, now: number) => {
    if (opts.protocol === 'mqtt' && d.nextTickAt - now > keepaliveMs / 2) sched.at(now + keepaliveMs / 2, keepAlive, d, d.gen);
  };
  const keepAlive = (d: Device, now: number, gen: number): void => {
    if (stopped || gen !== d.gen || d.state !== 'online' || !d.mqtt) return;
    if (now - d.mqtt.lastWrite > keepaliveMs / 2) d.mqtt.ping();
    keepAliveFrom(d, now);
  };

  // the device and its generation travel as the entry's argument and tag: no object per reading
  const tick = (d: Device, now: number, gen: number): void => {
    if (stopped || gen !== d.gen) return;
    // asleep once the queue is empty (an unacknowledged reading stays in RTC memory; a little later it sleeps anyway), never mid-update
    if (now >= d.awakeUntil && !d.fw && !d.rebootPending && (d.q.length === 0 || now >= d.awakeUntil + 2 * d.interval)) return goToSleep(d, now);
    d.nextTickAt = now + period(d);
    sched.at(d.nextTickAt, tick, d, gen);
    if (d.state !== 'online') return;
    keepAliveFrom(d, now);
    if (opts.protocol === 'mqtt' && d.mqtt && now - d.mqtt.lastWrite > keepaliveMs / 2) d.mqtt.ping();
    // an Observe registration dies silently with a gateway restart: register again now and then, as firmware should;
    // not while a message is outstanding (its counter is older: one that reached the gateway after
    // the registration's would be refused as a replay, docs/mcu-protocol.md "Send in counter order")
    if (opts.protocol === 'coap' && mailbox && !d.busy && !d.observeReg?.pending && now - d.observedAt > reobserveMs) observeMailbox(d);
    if (d.q.length >= MAX_QUEUE || hasReading(d.q)) {
      st.skipped++; // the previous reading is still unacknowledged: skip this one, as firmware with one buffer does
      return;
    }
    // the sample time is taken now, not at the start of the scheduler turn: latency figures must not include the turn
    enqueue(d, reading(d, Date.now()));
  };

  // ---- CoAP ----------------------------------------------------------------------

  const coapPath = (d: Device, ch: McuChannel) => [...COAP_PATH_ROOT, d.id, ch];

  const postCoap = (d: Device, u: Up) => {
    if (u.sentOnce) st.resent++;
    else if (u.ch === 't') st.published++;
    u.sentOnce = true;
    // the counter must only grow; starting from the clock survives a reboot without storage
    const c = nextCounter(d);
    const gen = d.gen;
    d.ep!.request(
      {
        method: COAP_METHOD.POST,
        path: coapPath(d, u.ch),
        query: coapAuthQuery(c, mac(d, u.ch, c, u.payload)).split('&'),
        contentFormat: u.ch === 't' ? CONTENT_FORMAT[format] : JSON_FORMAT,
        payload: u.payload,
      },
      (err: Error | null, res?: CoapResponse) => {
        if (stopped || d.q[0] !== u) return;
        if (err || !res) {
          down(d);
          noteError(d, 'request failed', err);
          d.busy = false;
          // keep the message; send it again a period later with a new counter
          if (gen === d.gen) sched.after(period(d), retryPump, { d, gen });
          return;
        }
        if (d.state === 'online') up(d);
        if (res.code === COAP_CODES.CHANGED) return acked(d, u);
        d.busy = false;
        if (res.code === COAP_CODES.SERVICE_UNAVAILABLE && res.maxAge !== undefined) {
          // the gateway's rate limit: keep the message, send it again after Max-Age
          st.throttled++;
          if (gen === d.gen) sched.after(Math.max(res.maxAge * 1000, period(d)), retryPump, { d, gen });
          return;
        }
        noteError(d, `${u.ch} refused with ${res.code}`, res.payload.toString('utf8').slice(0, 100));
        if (res.code.startsWith('5.')) {
          if (gen === d.gen) sched.after(period(d), retryPump, { d, gen });
        } else {
          d.q.shift(); // a 4.xx will not get better by resending
          pump(d);
        }
      },
    );
  };
  const retryPump = ({ d, gen }: Ev) => {
    if (stopped || gen !== d.gen) return;
    pump(d);
  };

  const observeMailbox = (d: Device) => {
    cancelObserve(d);
    d.observedAt = Date.now();
    const c = nextCounter(d);
    const gen = d.gen;
    const reg = { pending: true };
    d.observeReg = reg;
    d.observeToken = d.ep!.request(
      { method: COAP_METHOD.GET, path: coapPath(d, 'cmd'), query: coapAuthQuery(c, mac(d, 'cmd', c, Buffer.alloc(0))).split('&'), observe: 0 },
      (err, res) => {
        if (stopped || gen !== d.gen) return;
        if (reg.pending) {
          reg.pending = false;
          if (d.observeReg === reg) sched.at(Date.now(), retryPump, { d, gen }); // what waited for the answer goes now
        }
        if (err || !res) {
          d.observeToken = 0;
          // try again a little later while awake
          sched.after(period(d), reobserve, { d, gen });
          return;
        }
        if (res.code !== '2.05') {
          noteError(d, `mailbox refused with ${res.code}`, res.payload.toString('utf8').slice(0, 100));
          d.observeToken = 0;
          return;
        }
        if (res.observe === undefined) {
          // the gateway answered without registering: poll again next period
          d.observeToken = 0;
          sched.after(period(d), reobserve, { d, gen });
        }
        if (res.payload.length > 0) onCommandFrame(d, res.payload);
      },
    );
  };
  const reobserve = ({ d, gen }: Ev) => {
    if (stopped || gen !== d.gen || d.observeToken !== 0) return;
    if (d.busy) return void sched.after(period(d), reobserve, { d, gen }); // in counter order (above)
    observeMailbox(d);
  };
  const cancelObserve = (d: Device) => {
    if (d.observeToken && d.ep) d.ep.cancel(d.observeToken);
    d.observeToken = 0;
    d.observeReg = null;
  };

  // ---- commands ------------------------------------------------------------------

  const ack = (d: Device, body: Record<string, unknown>, then?: (d: Device) => void) => {
    const payload = Buffer.from(JSON.stringify(body));
    // kept (with the command seq, as in NVS) so a redelivery is answered with the same ack
    if (body.id === d.cmdId) d.lastAck = payload;
    enqueue(d, { ch: 'ack', payload, seq: 0, t: Date.now(), pid: 0, sentOnce: false, then: (dd) => (st.acks++, then?.(dd)) }, true);
  };

  const onCommandFrame = (d: Device, frame: Buffer) => {
    // c={seq}&m={mac}\n{json}: verify the MAC first; a forged or malformed frame is ignored
    let seq: number;
    let cmd: McuCommand;
    try {
      ({ seq, cmd } = decodeMcuCommand(d.key, d.id, frame));
    } catch (err) {
      return noteBad(d, 'command frame refused', { err: (err as Error).message, bytes: frame.length, head: frame.subarray(0, 40).toString('latin1') });
    }
    if (seq < d.cmdSeq) {
      st.staleCommands++; // at-least-once delivery over a link with latency: an older push may arrive late
      return;
    }
    if (seq === d.cmdSeq) {
      // a redelivery (its ack was lost, or the gateway pushes the mailbox head again after a
      // reconnect): never run it twice; send the same ack again, or nothing while it is still
      // running (a firmware download in progress must not be acked before the hash check)
      if (d.lastAck && !d.q.some((u) => u.ch === 'ack')) enqueue(d, { ch: 'ack', payload: d.lastAck, seq: 0, t: Date.now(), pid: 0, sentOnce: false, then: () => st.acks++ }, true);
      return;
    }
    d.cmdSeq = seq;
    d.lastAck = null;
    d.cmdId = cmd.id;
    st.commands++;
    opts.onCommand?.(d.id, cmd);
    run(d, cmd);
  };

  const run = (d: Device, cmd: SimCommand) => {
    const a = cmd.a;
    switch (cmd.n) {
      case 'ping':
      case 'echo':
        return ack(d, { id: cmd.id, ok: true, r: { fw: d.version, uptime: Math.floor((Date.now() - d.bootedAt) / 1000), a } });
      case 'set-interval': {
        const s = Number(a.s);
        if (!Number.isFinite(s) || s < 0.01 || s > 86_400) return ack(d, { id: cmd.id, ok: false, e: 'a.s must be seconds from 0.01 to 86400', code: 'BAD_ARGS' });
        d.interval = Math.round(s * 1000);
        return ack(d, { id: cmd.id, ok: true, r: { interval: s } });
      }
      case 'reboot':
        return ack(d, { id: cmd.id, ok: true }, () => reboot(d, 'reset'));
      case 'fw.update':
        return startFirmware(d, cmd);
      default:
        return ack(d, { id: cmd.id, ok: false, e: `unknown command ${cmd.n.slice(0, 64)}`, code: 'UNKNOWN' });
    }
  };

  // ---- firmware ------------------------------------------------------------------

  const startFirmware = (d: Device, cmd: SimCommand) => {
    const a = cmd.a;
    const version = String(a.v ?? '');
    const sha256 = String(a.sha256 ?? '').toLowerCase();
    const size = Number(a.size);
    if (!version || !/^[0-9a-f]{64}$/.test(sha256) || !Number.isSafeInteger(size) || size < 1) {
      return ack(d, { id: cmd.id, ok: false, e: 'fw.update needs a.v, a.sha256 and a.size', code: 'BAD_ARGS' });
    }
    // offered the version it runs (the gateway did not know it yet): taken, and reported
    // again, so the update is decided without a reboot (docs/mcu-protocol.md "Firmware updates")
    if (version === d.version) return ack(d, { id: cmd.id, ok: true, r: 'already running' }, (dd) => enqueue(dd, helloUp(dd, Date.now())));
    if (d.fw && d.fw.sha256 === sha256) {
      // offered again (a new command for the same image): keep downloading, answer the new one at the end
      d.fw.cmdId = cmd.id;
      d.fw.cmdSeq = d.cmdSeq;
      return;
    }
    const c = nextCounter(d);
    d.fw = { cmdId: cmd.id, cmdSeq: d.cmdSeq, version, sha256, size, offset: 0, hash: createHash('sha256'), counter: c, mac: mac(d, 'fw', c, Buffer.alloc(0)), busy: false };
    sched.at(Date.now(), fwNext, { d, gen: d.gen });
  };

  /** Ask for the next chunk: it resumes from `offset`, after a reconnect or a wake just the same. */
  const fwNext = ({ d, gen }: Ev) => {
    const f = d.fw;
    if (stopped || gen !== d.gen || !f || f.busy || d.state !== 'online') return;
    if (f.offset >= f.size) return fwDone(d);
    f.busy = true;
    if (opts.protocol === 'mqtt') {
      const n = Math.floor(f.offset / chunk);
      enqueue(d, { ch: 'fwreq', payload: Buffer.from(JSON.stringify({ n, s: chunk })), seq: 0, t: Date.now(), pid: 0, sentOnce: false });
      // no chunk within a while (lost on a dropped link): ask again
      sched.after(Math.max(5000, 3 * d.interval), fwStall, { d, gen, offset: f.offset });
      return;
    }
    const szx = Math.log2(chunk) - 4;
    const num = Math.floor(f.offset / chunk);
    d.ep!.request(
      { method: COAP_METHOD.GET, path: coapPath(d, 'fw'), query: [...coapAuthQuery(f.counter, f.mac).split('&'), `${COAP_QUERY_IMAGE}=${f.sha256.slice(0, 16)}`], block2: { num, szx } },
      (err, res) => {
        if (stopped || d.fw !== f) return;
        f.busy = false;
        if (err || !res) {
          noteError(d, 'firmware block failed', err);
          sched.after(period(d), fwNext, { d, gen: d.gen });
          return;
        }
        if (res.code !== '2.05') {
          noteError(d, `firmware block refused with ${res.code}`, res.payload.toString('utf8').slice(0, 100));
          // 5.xx: try again later; FLEET_MCU_ADDRESS (the gateway restarted, or this address is
          // new to it): the next reading validates the address, then the download goes on
          if (res.code.startsWith('5.') || res.payload.toString('utf8') === 'FLEET_MCU_ADDRESS') return void sched.after(period(d), fwNext, { d, gen: d.gen });
          return fwAbort(d, `download refused with ${res.code}`);
        }
        const b = res.block2;
        const start = (b?.num ?? 0) * chunk;
        if (start !== f.offset) return void sched.at(Date.now(), fwNext, { d, gen: d.gen }); // not the block asked for
        fwData(d, res.payload);
        if (b && !b.more && f.offset < f.size) return fwAbort(d, `image ended at ${f.offset} of ${f.size} bytes`);
        sched.at(Date.now(), fwNext, { d, gen: d.gen });
      },
    );
  };

  const fwStall = ({ d, gen, offset }: Ev & { offset: number }) => {
    const f = d.fw;
    if (stopped || gen !== d.gen || !f || f.offset !== offset || !f.busy) return;
    f.busy = false;
    fwNext({ d, gen });
  };

  const onFwChunk = (d: Device, payload: Buffer) => {
    const f = d.fw;
    if (!f) return;
    let c: ReturnType<typeof decodeFwChunk>;
    try {
      c = decodeFwChunk(payload);
    } catch (err) {
      return noteBad(d, 'firmware chunk refused', { err: (err as Error).message, bytes: payload.length });
    }
    if (c.size === 0 || c.shaPrefix !== f.sha256.slice(0, 16) || c.size !== f.size) return fwAbort(d, c.size === 0 ? 'no image offered' : 'the offered image changed');
    if (c.n * chunk !== f.offset) return; // a stale or repeated chunk
    f.busy = false;
    fwData(d, c.data);
    sched.at(Date.now(), fwNext, { d, gen: d.gen });
  };

  const fwData = (d: Device, data: Buffer) => {
    const f = d.fw!;
    const take = data.subarray(0, Math.max(0, f.size - f.offset));
    f.hash.update(take);
    f.offset += take.length;
    st.fwBytes += take.length;
  };

  const fwAbort = (d: Device, why: string) => {
    const f = d.fw!;
    d.fw = null;
    ack(d, { id: f.cmdId, ok: false, e: why.slice(0, 128), code: 'DOWNLOAD' });
  };

  const fwDone = (d: Device) => {
    const f = d.fw!;
    d.fw = null;
    const got = f.hash.digest('hex');
    if (got !== f.sha256) {
      st.fwHashFailed++;
      return ack(d, { id: f.cmdId, ok: false, e: `sha256 mismatch: got ${got.slice(0, 16)}…`, code: 'HASH' });
    }
    st.fwDownloaded++;
    // written and verified: ack, then reboot into it; the bootloader decides what runs. The
    // reboot waits for the ack's delivery, at most FW_ACK_WAIT_MS: an ack stuck on a bad link
    // (or refused) must not keep the device on the old image forever. The gateway learns the
    // outcome from the version the device reports after booting, and the ack, kept as in NVS,
    // is answered again if the command is pushed again.
    let rebooted = false;
    // no deep sleep before that reboot (the image waits in flash, the ack in RTC memory)
    d.rebootPending = true;
    const rebootInto = () => {
      if (rebooted) return;
      rebooted = true;
      d.rebootPending = false;
      const prev = d.version;
      if (failVersions.has(f.version)) {
        st.fwRolledBack++;
        d.prevVersion = f.version;
        d.bootErr = 'new image did not confirm (simulated failure); bootloader rolled back';
        opts.onFirmware?.(d.id, { version: prev, boot: 'rollback', prev: f.version });
        reboot(d, 'rollback', 500);
      } else {
        st.fwBooted++;
        d.version = f.version;
        d.prevVersion = prev;
        opts.onFirmware?.(d.id, { version: f.version, boot: 'ota', prev });
        reboot(d, 'ota', 500);
      }
    };
    ack(d, { id: f.cmdId, ok: true, r: { v: f.version } }, rebootInto);
    sched.after(FW_ACK_WAIT_MS, () => !stopped && rebootInto(), null);
  };

  // ---- start -------------------------------------------------------------------------

  for (const d of devices) sched.at(started + Math.floor(random() * startJitter), boot, { d, gen: d.gen });
  log?.info('sim started', { devices: devices.length, protocol: opts.protocol, host, intervalMs: interval, sleepMs, loss, latencyMs: link.latencyMs, first: devices[0]?.id });

  return {
    stats(): SimStats {
      let lost = 0;
      for (const e of endpoints) lost += e.lost;
      return { ...st, linkDrops: st.linkDrops + lost };
    },
    lag: () => sched.lag(),
    ids: () => devices.map((d) => d.id),
    device(id) {
      const d = byId.get(id);
      if (!d) return undefined;
      return { id, version: d.version, state: d.state, seq: d.seq, cmdSeq: d.cmdSeq, intervalMs: d.interval, ...(d.fw ? { fwOffset: d.fw.offset } : {}) };
    },
    async stop() {
      if (stopped) return;
      stopped = true;
      sched.stop();
      const closing: Promise<void>[] = [];
      for (const d of devices) {
        const s = d.mqtt?.socket;
        if (s && !s.destroyed) {
          closing.push(new Promise<void>((r) => s.once('close', () => r())));
          d.mqtt!.end();
          // a peer that never answers the FIN must not hold stop forever
          setTimeout(() => s.destroy(), 2000).unref();
        }
        down(d);
      }
      await Promise.all(closing);
      for (const e of endpoints) e.close();
      log?.info('sim stopped', { sent: st.sent, errors: st.errors });
    },
  };
}
