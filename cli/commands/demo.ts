import type { ChildProcess } from 'node:child_process';
import { mkdirSync, openSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { defaultStateDir } from '../../core/config.ts';
import { deriveToken } from '../../core/credentials.ts';
import { preferPort } from '../../core/net.ts';
import { selfCommand, spawnSelf, stopChild, waitReadyFile } from '../../core/proc.ts';
import { loadOrCreateSecret, writeSecretFile } from '../../core/secrets.ts';
import { defineCommand, EXIT, intFlag, strFlag } from '../command.ts';

const HOST = '127.0.0.1';
const MCUS_PER_PROTOCOL = 10;

interface Summary {
  t: number;
  online: number;
  total: number;
  agents: number;
  gateways: number;
  mcus: number;
  messagesPerS: number;
}

export const demoCommand = defineCommand({
  name: 'demo',
  summary: 'run hub, gateway, an agent and 20 simulated ESP32s on loopback',
  usage: '[--state-dir DIR] [--duration-s N] [--ephemeral-ports] [--json]',
  options: {
    'state-dir': { type: 'string' },
    'duration-s': { type: 'string' },
    'ephemeral-ports': { type: 'boolean' },
    'interval-ms': { type: 'string', default: '2000' },
    json: { type: 'boolean' },
  },
  help: {
    'state-dir': 'where the demo keeps its state (default: the fleetlet state dir + /demo)',
    'duration-s': 'stop by itself after this many seconds (0 = until Ctrl-C)',
    'ephemeral-ports': 'use free ports for everything instead of the defaults',
    'interval-ms': 'telemetry period of the simulated devices',
    json: 'print the summary as JSON lines',
  },
  async run({ values }) {
    const dir = strFlag(values, 'state-dir') ?? defaultStateDir('demo');
    const duration = intFlag(values, 'duration-s', 0) ?? 0;
    const interval = intFlag(values, 'interval-ms', 100, 3_600_000) ?? 2000;
    const ephemeral = values['ephemeral-ports'] === true;
    const json = values.json === true;
    const run = join(dir, 'run');
    rmSync(run, { recursive: true, force: true });
    mkdirSync(run, { recursive: true, mode: 0o700 });
    const port = (p: number, proto: 'tcp' | 'udp') => (ephemeral ? Promise.resolve(0) : preferPort(HOST, p, proto));
    const children: Array<{ name: string; child: ChildProcess }> = [];
    const say = (line: string) => process.stdout.write(line + '\n');
    const start = async <T>(name: string, args: string[]): Promise<T> => {
      const ready = join(run, `${name}.json`);
      // each part logs (JSON lines) to its own file; the terminal keeps the summary
      const logFd = openSync(join(run, `${name}.log`), 'a', 0o600);
      const child = spawnSelf([...args, '--ready-file', ready], { stdio: ['pipe', logFd, logFd] });
      children.push({ name, child });
      return waitReadyFile<T>(ready, child, 30_000);
    };
    let stopping = false;
    const stopAll = async () => {
      stopping = true;
      for (const { child } of [...children].reverse()) await stopChild(child, 5000);
    };
    const onSignal = () => {
      if (stopping) return;
      say('\nstopping…');
      void stopAll().then(() => process.exit(EXIT.INTERRUPTED));
    };
    process.on('SIGINT', onSignal);
    process.on('SIGTERM', onSignal);

    try {
      const hub = await start<{ mqttPort: number; httpPort: number; fleetSecretFile: string; operatorTokenFile: string }>('hub', [
        'hub', '--host', HOST, '--mqtt-port', String(await port(1883, 'tcp')), '--http-port', String(await port(8080, 'tcp')), '--port-fallback', '--state-dir', join(dir, 'hub'),
      ]);
      const hubUrl = `mqtt://${HOST}:${hub.mqttPort}`;
      const fleetSecret = readFileSync(hub.fleetSecretFile, 'utf8').trim();
      const tokenFile = (id: string) => {
        const f = join(dir, 'credentials', `${id}.token`);
        writeSecretFile(f, deriveToken(fleetSecret, 'device', id));
        return f;
      };
      const siteSecretFile = join(dir, 'credentials', 'site.secret');
      loadOrCreateSecret(siteSecretFile);

      const gw = await start<{ mqttPort: number; coapPort: number }>('gateway', [
        'gateway', '--hub', hubUrl, '--id', 'demo-gateway', '--token-file', tokenFile('demo-gateway'), '--site-secret-file', siteSecretFile,
        '--host', HOST, '--mqtt-port', String(await port(1884, 'tcp')), '--coap-port', String(await port(5683, 'udp')), '--state-dir', join(dir, 'gateway'),
      ]);

      const self = selfCommand();
      const agentConfig = join(run, 'agent-config.json');
      writeFileSync(agentConfig, JSON.stringify({ apps: [{ name: 'sample', command: self.command, args: [...self.args, 'sample-app', '--port', '0'], restart: 'always' }] }, null, 2));
      const agent = await start<{ apiPort: number; technicianTokenFile: string }>('agent', [
        'agent', '--config', agentConfig, '--device-id', 'demo-agent', '--hub', hubUrl, '--token-file', tokenFile('demo-agent'), '--keepalive', '5',
        '--state-dir', join(dir, 'agent'), '--api-port', String(await port(8484, 'tcp')), '--port-fallback', '--publish-ms', '2000',
      ]);

      for (const protocol of ['mqtt', 'coap'] as const) {
        await start(`sim-${protocol}`, [
          'sim', '--devices', String(MCUS_PER_PROTOCOL), '--protocol', protocol, '--gateway-host', HOST, '--mqtt-port', String(gw.mqttPort), '--coap-port', String(gw.coapPort),
          '--site-secret-file', siteSecretFile, '--interval-ms', String(interval),
        ]);
      }

      const api = `http://${HOST}:${hub.httpPort}`;
      say('');
      say('fleetlet demo is running on loopback:');
      say(`  hub API        ${api}/api/v1/devices   (metrics: ${api}/metrics)`);
      say(`  hub MQTT       ${hubUrl}   (operator token: ${hub.operatorTokenFile})`);
      say(`  agent page     http://${HOST}:${agent.apiPort}/   (technician token: ${agent.technicianTokenFile})`);
      say(`  gateway        MQTT ${HOST}:${gw.mqttPort}, CoAP udp ${HOST}:${gw.coapPort}`);
      say(`  logs           ${run}/*.log`);
      say(`  devices        1 agent, 1 gateway, ${MCUS_PER_PROTOCOL} MQTT + ${MCUS_PER_PROTOCOL} CoAP simulated ESP32s`);
      say('Ctrl-C stops everything.');
      say('');

      let prevSamples: { t: number; n: number } | null = null;
      const deadline = duration > 0 ? Date.now() + duration * 1000 : Infinity;
      while (!stopping && Date.now() < deadline) {
        for (const { name, child } of children) {
          if (child.exitCode !== null || child.signalCode !== null) throw new Error(`${name} exited unexpectedly (${child.exitCode ?? child.signalCode})`);
        }
        try {
          const body = (await (await fetch(`${api}/api/v1/devices`)).json()) as { devices: Array<{ kind: string; online: boolean; telemetryBatches: number }> };
          const online = body.devices.filter((d) => d.online);
          const n = body.devices.reduce((a, d) => a + d.telemetryBatches, 0);
          const now = Date.now();
          const rate = prevSamples && now > prevSamples.t ? ((n - prevSamples.n) * 1000) / (now - prevSamples.t) : 0;
          prevSamples = { t: now, n };
          const s: Summary = {
            t: now,
            online: online.length,
            total: body.devices.length,
            agents: online.filter((d) => d.kind === 'agent').length,
            gateways: online.filter((d) => d.kind === 'gateway').length,
            mcus: online.filter((d) => d.kind === 'mcu').length,
            messagesPerS: Math.round(rate * 10) / 10,
          };
          if (json) say(JSON.stringify(s));
          else {
            const line = `devices online ${s.online}/${s.total} (agents ${s.agents}, gateways ${s.gateways}, MCUs ${s.mcus})  telemetry ${s.messagesPerS} msg/s`;
            if (process.stdout.isTTY) process.stdout.write(`\r${line}   `);
            else say(line);
          }
        } catch {
          // the hub may be busy for a moment; the next round will tell
        }
        await new Promise((r) => setTimeout(r, 2000));
      }
    } catch (err) {
      await stopAll();
      throw err;
    }
    await stopAll();
    if (process.stdout.isTTY && !json) say('');
    return EXIT.OK;
  },
});
