import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import mqtt from 'mqtt';
import { deriveToken } from '../../core/credentials.ts';
import { decodeMessage } from '../../core/messages.ts';
import { loadOrCreateSecret, writeSecretFile } from '../../core/secrets.ts';
import { parseTopic } from '../../core/topics.ts';
import { tempDir, waitFor } from '../helpers.ts';
import { Parts, processesMentioning } from './procs.ts';

const KEEPALIVE_S = 1;

test('e2e: hub, gateway, agent and simulated MCUs as real processes on loopback', { timeout: 180_000 }, async (t) => {
  const tmp = tempDir('fleetlet-e2e-');
  const parts = new Parts(tmp.dir);
  const op = { client: null as mqtt.MqttClient | null };
  t.after(async () => {
    op.client?.end(true);
    await parts.stopAll();
    tmp.cleanup();
  });

  const hub = await parts.start<{ mqttPort: number; httpPort: number; fleetSecretFile: string; operatorTokenFile: string }>('hub', [
    'hub', '--mqtt-port', '0', '--http-port', '0', '--state-dir', join(tmp.dir, 'hub'),
  ]);
  const hubUrl = `mqtt://127.0.0.1:${hub.ready.mqttPort}`;
  const api = `http://127.0.0.1:${hub.ready.httpPort}`;
  const secret = readFileSync(hub.ready.fleetSecretFile, 'utf8').trim();
  const token = (id: string) => {
    const f = join(tmp.dir, 'cred', `${id}.token`);
    writeSecretFile(f, deriveToken(secret, 'device', id));
    return f;
  };

  // a consumer on the hub sees everything under the fleet root
  const telemetryFrom = new Map<string, number>();
  op.client = await mqtt.connectAsync(hubUrl, { clientId: 'e2e-consumer', username: 'operator', password: readFileSync(hub.ready.operatorTokenFile, 'utf8').trim(), reconnectPeriod: 0 });
  await op.client.subscribeAsync('fleet/v1/#', { qos: 1 });
  op.client.on('message', (topic, payload) => {
    const p = parseTopic(topic);
    if (p?.channel !== 'telemetry') return;
    const batch = decodeMessage('telemetry', payload);
    telemetryFrom.set(p.deviceId, (telemetryFrom.get(p.deviceId) ?? 0) + batch.samples.length);
  });

  const siteSecret = join(tmp.dir, 'cred', 'site.secret');
  loadOrCreateSecret(siteSecret);
  const gw = await parts.start<{ mqttPort: number; coapPort: number; httpPort: number }>('gateway', [
    'gateway', '--hub', hubUrl, '--id', 'e2e-gw', '--token-file', token('e2e-gw'), '--site-secret-file', siteSecret,
    '--mqtt-port', '0', '--coap-port', '0', '--http-port', '0', '--state-dir', join(tmp.dir, 'gateway'),
  ]);
  // the HTTP port taken (0 = any free one) is in the ready file
  assert.deepEqual(await (await fetch(`http://127.0.0.1:${gw.ready.httpPort}/health`)).json(), { ok: true });

  const agentConfig = join(tmp.dir, 'agent.json');
  const { writeFileSync } = await import('node:fs');
  writeFileSync(agentConfig, JSON.stringify({ apps: [{ name: 'sample', command: process.execPath, args: ['--import', 'tsx', join(process.cwd(), 'cli/main.ts'), 'sample-app', '--port', '0', '--log-every-ms', '200'] }] }));
  const agent = await parts.start<{ apiPort: number }>('agent', [
    'agent', '--config', agentConfig, '--device-id', 'e2e-agent', '--hub', hubUrl, '--token-file', token('e2e-agent'), '--keepalive', String(KEEPALIVE_S),
    '--state-dir', join(tmp.dir, 'agent'), '--api-port', '0', '--publish-ms', '300',
  ]);

  for (const protocol of ['mqtt', 'coap']) {
    await parts.start(`sim-${protocol}`, [
      'sim', '--devices', '1', '--protocol', protocol, '--mqtt-port', String(gw.ready.mqttPort), '--coap-port', String(gw.ready.coapPort),
      '--site-secret-file', siteSecret, '--interval-ms', '300', '--prefix', `e2e-${protocol}-`,
    ]);
  }

  // the agent's device is online in the registry, its telemetry reaches the consumer
  const device = async (id: string) => ((await (await fetch(`${api}/api/v1/devices/${id}`)).json()) as { online?: boolean; kind?: string; via?: string });
  await waitFor(async () => (await device('e2e-agent')).online === true, 'agent online in the hub registry', 30_000);
  await waitFor(() => (telemetryFrom.get('e2e-agent') ?? 0) > 0, 'agent telemetry at the hub consumer', 30_000);

  // MCU telemetry over MQTT and over CoAP arrives through the gateway
  await waitFor(() => (telemetryFrom.get('e2e-mqtt-0001') ?? 0) > 0, 'MQTT MCU telemetry at the hub', 30_000);
  await waitFor(() => (telemetryFrom.get('e2e-coap-0001') ?? 0) > 0, 'CoAP MCU telemetry at the hub', 30_000);
  // its state (kind, via) is a retained publish the hub reads apart from the telemetry: waited for
  const mcu = await waitFor(async () => {
    const d = await device('e2e-coap-0001');
    return d.kind === 'mcu' ? d : null;
  }, 'the CoAP MCU known as an MCU at the hub', 30_000);
  assert.equal(mcu.via, 'e2e-gw');

  // the sample app runs under the agent
  const apps = (await (await fetch(`http://127.0.0.1:${agent.ready.apiPort}/api/v1/apps`)).json()) as { apps: Array<{ name: string; state: string; pid: number }> };
  const sample = apps.apps.find((a) => a.name === 'sample');
  assert.equal(sample?.state, 'running');
  assert.ok(sample.pid > 0 && processesMentioning('sample-app').includes(sample.pid));

  // SIGKILL the agent: the hub marks it offline within 1.5 x keep-alive (+ slack for a loaded
  // machine running other test files: the hub is a child process, read over HTTP)
  const killedAt = Date.now();
  agent.child.kill('SIGKILL');
  await waitFor(async () => (await device('e2e-agent')).online === false, 'agent offline after SIGKILL', 10_000, 50);
  const took = Date.now() - killedAt;
  t.diagnostic(`agent offline at the hub ${took} ms after SIGKILL (keep-alive ${KEEPALIVE_S} s)`);
  assert.ok(took <= KEEPALIVE_S * 1500 + 5000, `offline after ${took} ms`);
  // and the orphaned sample app does not outlive its supervisor
  await waitFor(() => !processesMentioning(tmp.dir).includes(sample.pid) && !processesMentioning('sample-app').includes(sample.pid), 'sample app gone after agent SIGKILL', 10_000);

  // everything left stops by itself on SIGTERM, although the hub goes away at the same moment
  const ended = await parts.terminateAllAtOnce();
  assert.deepEqual(ended, { hub: 'exit 0', gateway: 'exit 0', 'sim-mqtt': 'exit 0', 'sim-coap': 'exit 0' });
});
