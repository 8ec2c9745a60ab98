import { renameSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { defaultStateDir, logLevelFromEnv } from '../../core/config.ts';
import { FleetError, isFleetError } from '../../core/errors.ts';
import { createLogger } from '../../core/log.ts';
import { runUntilSignal, writeReadyFile } from '../../core/proc.ts';
import { readSecretFile } from '../../core/secrets.ts';
import { runSim, type SimOptions, type SimProtocol } from '../../esp32-sim/sim.ts';
import { defineCommand, EXIT, intFlag, strFlag } from '../command.ts';

const FORMATS = ['senml+json', 'senml+cbor', 'compact'] as const;
function formatFlag(raw: string | undefined): SimOptions['format'] {
  if (raw === undefined) return undefined;
  if (!(FORMATS as readonly string[]).includes(raw)) throw new FleetError('FLEET_USAGE', `--format: expected one of ${FORMATS.join(', ')}, got ${JSON.stringify(raw)}`);
  return raw as SimOptions['format'];
}

export const simCommand = defineCommand({
  name: 'sim',
  summary: 'simulate many ESP32 devices (telemetry, deep sleep, commands, firmware updates) against a gateway over MQTT or CoAP',
  usage: '[--devices N] [--protocol mqtt|coap] [--site-secret-file FILE] [options]',
  options: {
    devices: { type: 'string', short: 'n' },
    protocol: { type: 'string' },
    'gateway-host': { type: 'string' },
    'mqtt-port': { type: 'string' },
    'coap-port': { type: 'string' },
    'site-secret-file': { type: 'string' },
    prefix: { type: 'string' },
    'interval-ms': { type: 'string' },
    'first-index': { type: 'string' },
    'start-jitter-ms': { type: 'string' },
    'sleep-ms': { type: 'string' },
    'awake-ms': { type: 'string' },
    loss: { type: 'string' },
    'latency-ms': { type: 'string' },
    'latency-jitter-ms': { type: 'string' },
    'coap-ack-timeout-ms': { type: 'string' },
    'firmware-version': { type: 'string' },
    'fail-version': { type: 'string', multiple: true },
    hw: { type: 'string' },
    'fw-chunk-bytes': { type: 'string' },
    format: { type: 'string' },
    'no-hello': { type: 'boolean' },
    'no-mailbox': { type: 'boolean' },
    'stats-every-ms': { type: 'string' },
    'stats-file': { type: 'string' },
    'duration-s': { type: 'string' },
    'ready-file': { type: 'string' },
    'die-with-parent': { type: 'boolean' },
  },
  help: {
    devices: 'number of simulated devices (default 10)',
    protocol: 'mqtt or coap (default mqtt)',
    'gateway-host': 'gateway address (default 127.0.0.1)',
    'mqtt-port': 'gateway MCU MQTT port (default 1884)',
    'coap-port': 'gateway CoAP port (default 5683)',
    'site-secret-file': "the gateway's site secret (default: the local gateway's, <state>/gateway/site.secret)",
    prefix: 'device id prefix (default esp32-<protocol>-)',
    'interval-ms': 'telemetry period per device, ms (default 5000); each period varies by ±5% so devices drift apart',
    'first-index': 'index of the first device id (default 1), so several sim processes share one id space',
    'start-jitter-ms': 'devices boot at random over this many ms (default: the interval)',
    'sleep-ms': 'deep sleep: sleep this long after each awake period, ms (default 0 = never sleep)',
    'awake-ms': 'awake time per deep-sleep cycle, ms (default 3 x the interval)',
    loss: 'flaky link, 0..0.99: CoAP datagram loss either way; MQTT chance per publish that the link drops (default 0)',
    'latency-ms': 'added one-way latency on what devices send, ms (default 0)',
    'latency-jitter-ms': 'random extra latency 0..N ms (default 0)',
    'coap-ack-timeout-ms': 'CoAP ACK_TIMEOUT, ms (default 2000)',
    'firmware-version': 'the firmware version devices boot with (default 1.0.0)',
    'fail-version': 'a firmware version that fails to start, so the simulated bootloader rolls back (repeatable)',
    hw: 'the hardware class devices report in their hello, matched against firmware targets.deviceClass (default esp32-sim; "" for none)',
    'fw-chunk-bytes': 'firmware chunk size: MQTT 16..4096; CoAP Block2 16..1024, a power of two (default 512)',
    format: 'telemetry encoding: senml+json, senml+cbor or compact (default senml+json)',
    'no-hello': 'send no version report after boot',
    'no-mailbox': 'do not read the command mailbox (no MQTT subscribe, no CoAP Observe)',
    'stats-every-ms': 'log a progress line (and write --stats-file) this often, ms (default 10000)',
    'stats-file': 'write the counters, event-loop lag, RSS and CPU as JSON here every --stats-every-ms (for benchmarks)',
    'duration-s': 'stop after this many seconds; 0 = run until a signal (default 0)',
    'ready-file': 'write {pid, devices, protocol, firstDevice} here once started',
    'die-with-parent': 'exit when stdin closes (used by the demo)',
  },
  async run({ values }) {
    const devices = intFlag(values, 'devices', 1, 100_000) ?? 10;
    const protocolRaw = strFlag(values, 'protocol') ?? 'mqtt';
    if (protocolRaw !== 'mqtt' && protocolRaw !== 'coap') throw new FleetError('FLEET_USAGE', `--protocol: expected mqtt or coap, got ${JSON.stringify(protocolRaw)}`);
    const protocol: SimProtocol = protocolRaw;
    const intervalMs = intFlag(values, 'interval-ms', 10, 24 * 3600 * 1000) ?? 5000;
    const durationS = intFlag(values, 'duration-s', 0, 365 * 24 * 3600) ?? 0;
    const mqttPort = intFlag(values, 'mqtt-port', 1, 65535);
    const coapPort = intFlag(values, 'coap-port', 1, 65535);
    const prefix = strFlag(values, 'prefix');
    const host = strFlag(values, 'gateway-host') ?? '127.0.0.1';
    const dieWithParent = values['die-with-parent'] === true;
    const siteSecret = readSecretFile(strFlag(values, 'site-secret-file') ?? join(defaultStateDir('gateway'), 'site.secret'));

    const num = (name: string, min: number, max: number): number | undefined => {
      const raw = strFlag(values, name);
      if (raw === undefined) return undefined;
      const v = Number(raw);
      if (!Number.isFinite(v) || v < min || v > max) throw new FleetError('FLEET_USAGE', `--${name}: expected a number from ${min} to ${max}, got ${JSON.stringify(raw)}`);
      return v;
    };
    const firstIndex = intFlag(values, 'first-index', 1, 1_000_000);
    const extra = {
      firstIndex,
      startJitterMs: intFlag(values, 'start-jitter-ms', 0, 24 * 3600 * 1000),
      sleepMs: intFlag(values, 'sleep-ms', 0, 24 * 3600 * 1000),
      awakeMs: intFlag(values, 'awake-ms', 0, 24 * 3600 * 1000),
      loss: num('loss', 0, 0.99),
      latencyMs: intFlag(values, 'latency-ms', 0, 60_000),
      latencyJitterMs: intFlag(values, 'latency-jitter-ms', 0, 60_000),
      coapAckTimeoutMs: intFlag(values, 'coap-ack-timeout-ms', 10, 60_000),
      firmwareVersion: strFlag(values, 'firmware-version'),
      failVersions: Array.isArray(values['fail-version']) ? (values['fail-version'] as string[]) : undefined,
      hardwareClass: strFlag(values, 'hw'),
      fwChunkBytes: intFlag(values, 'fw-chunk-bytes', 16, 4096),
      format: formatFlag(strFlag(values, 'format')),
      hello: values['no-hello'] === true ? false : undefined,
      mailbox: values['no-mailbox'] === true ? false : undefined,
    };
    const statsEveryMs = intFlag(values, 'stats-every-ms', 100, 3600_000) ?? 10_000;

    const log = createLogger({ name: 'sim', level: logLevelFromEnv() ?? 'info' });
    // every option here comes from a flag: what runSim refuses is a usage error (exit 2)
    const sim = await runSim({
      devices,
      protocol,
      host,
      siteSecret,
      intervalMs,
      log,
      ...(mqttPort !== undefined ? { mqttPort } : {}),
      ...(coapPort !== undefined ? { coapPort } : {}),
      ...(prefix !== undefined ? { prefix } : {}),
      ...Object.fromEntries(Object.entries(extra).filter(([, v]) => v !== undefined)),
    }).catch((err: unknown) => {
      throw isFleetError(err, 'FLEET_CONFIG_INVALID') ? new FleetError('FLEET_USAGE', err.message) : err;
    });
    writeReadyFile(strFlag(values, 'ready-file'), { devices, protocol, firstDevice: sim.ids()[0] });
    const statsFile = strFlag(values, 'stats-file');
    // each interval's lag, the last 10 minutes of them, in every snapshot: a reader polling at
    // another rate (the bench) takes the intervals of its window, none missed or counted twice
    const lagHistory: Array<{ at: number; meanMs: number; maxMs: number; ran: number }> = [];
    const progress = setInterval(() => {
      const at = Date.now();
      const lag = sim.lag();
      lagHistory.push({ at, ...lag });
      if (lagHistory.length > Math.ceil(600_000 / statsEveryMs)) lagHistory.shift();
      const snap = { ...sim.stats(), lag, rssBytes: process.memoryUsage().rss, cpu: process.cpuUsage(), at };
      log.info('sim progress', snap);
      if (statsFile) {
        // the history only in the file (up to ~40 KB), not in every log line
        writeFileSync(`${statsFile}.tmp`, JSON.stringify({ ...snap, lagHistory }));
        renameSync(`${statsFile}.tmp`, statsFile);
      }
    }, statsEveryMs);
    let stopping: Promise<void> | undefined;
    const stop = () =>
      (stopping ??= (async () => {
        clearInterval(progress);
        const { connected } = sim.stats(); // as it was while running, not after disconnecting
        await sim.stop();
        // the summary is the command's output: one JSON line on stdout for scripts
        process.stdout.write(JSON.stringify({ ...sim.stats(), connected }) + '\n');
      })());
    const untilSignal = runUntilSignal(stop, { dieWithParent });
    if (durationS === 0) return untilSignal;
    const timedOut = await Promise.race([untilSignal.then((code) => ({ code })), new Promise<null>((r) => setTimeout(() => r(null), durationS * 1000).unref())]);
    if (timedOut) return timedOut.code;
    await stop();
    if (dieWithParent) process.stdin.pause(); // let the process end: a resumed stdin keeps it alive
    return sim.stats().sent > 0 ? EXIT.OK : EXIT.FAILURE;
  },
});
