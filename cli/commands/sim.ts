import { join } from 'node:path';
import { defaultStateDir, logLevelFromEnv } from '../../core/config.ts';
import { FleetError } from '../../core/errors.ts';
import { createLogger } from '../../core/log.ts';
import { runUntilSignal, writeReadyFile } from '../../core/proc.ts';
import { readSecretFile } from '../../core/secrets.ts';
import { runSim, type SimProtocol } from '../../esp32-sim/sim.ts';
import { defineCommand, EXIT, intFlag, strFlag } from '../command.ts';

export const simCommand = defineCommand({
  name: 'sim',
  summary: 'simulate many ESP32 devices sending telemetry to a gateway over MQTT or CoAP',
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
    'interval-ms': 'telemetry period per device, ms (default 5000)',
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

    const log = createLogger({ name: 'sim', level: logLevelFromEnv() ?? 'info' });
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
    });
    writeReadyFile(strFlag(values, 'ready-file'), { devices, protocol, firstDevice: `${prefix ?? `esp32-${protocol}-`}${'1'.padStart(Math.max(4, String(devices).length), '0')}` });
    const progress = setInterval(() => log.info('sim progress', { ...sim.stats() }), 10_000);
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
