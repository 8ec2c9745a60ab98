import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createServer } from 'node:http';
import { createServer as createNetServer, type AddressInfo } from 'node:net';
import { Aedes } from 'aedes';
import type { MqttClient } from 'mqtt';
import { connectFleetClient, disconnectFleetClient, logHubError } from '../../core/mqtt.ts';
import { closingServer, testLogger, waitFor } from '../helpers.ts';

test('hub client: a hub.url that reaches an HTTP server (the hub\'s HTTP port given as its MQTT one) is logged as that, with the fix, not as a bare parser error', async () => {
  const http = createServer((_req, res) => res.end('not mqtt'));
  await new Promise<void>((r) => http.listen(0, '127.0.0.1', () => r()));
  const log = testLogger('agent');
  const client = connectFleetClient({ url: `mqtt://127.0.0.1:${(http.address() as AddressInfo).port}`, deviceId: 'dev-1', token: 't'.repeat(43), kind: 'agent', version: '1.0.0', keepalive: 5, reconnectMs: 0 });
  client.on('error', (err) => logHubError(log, err));
  try {
    const line = await waitFor(() => log.lines.find((l) => l.level === 'error'), 'the connection error logged');
    assert.match(String(line.msg), /does not answer MQTT: is hub\.url the hub's MQTT port \(default 1883\), not its HTTP port/);
  } finally {
    await client.endAsync(true);
    http.closeAllConnections();
    await new Promise<void>((r) => http.close(() => r()));
  }
});

test('hub client: once stopped (disconnectFleetClient) it never reconnects, also with a short reconnect delay; a dropped connection is retried', async () => {
  const broker = await Aedes.createBroker();
  const server = createNetServer(broker.handle);
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  let connects = 0;
  broker.on('client', () => connects++);
  const url = `mqtt://127.0.0.1:${(server.address() as AddressInfo).port}`;
  const clients: MqttClient[] = [];
  try {
    for (const manualConnect of [false, true]) {
      const before = connects;
      const client = connectFleetClient({ url, deviceId: 'dev-2', token: 't'.repeat(43), kind: 'agent', version: '1.0.0', keepalive: 5, reconnectMs: 20, manualConnect });
      clients.push(client);
      if (manualConnect) client.connect();
      await waitFor(() => client.connected, 'connected');
      // a dropped connection is retried (the reconnect logic is live)
      client.stream.destroy();
      await waitFor(() => connects === before + 2 && client.connected, 'reconnected after a drop');
      await disconnectFleetClient(client, 'dev-2', 'agent', '1.0.0');
      await new Promise((r) => setTimeout(r, 600)); // 30 reconnect delays
      assert.equal(connects, before + 2, `no connection after the stop (manualConnect ${manualConnect})`);
    }
  } finally {
    for (const c of clients) c.end(true); // stopped also when an assertion failed (it would retry every 20 ms)
    await new Promise<void>((r) => broker.close(() => r()));
    await new Promise<void>((r) => server.close(() => r()));
  }
});

test('hub client: stopped while its hub refuses it (every connection closed at once), it makes no attempt after the stop', async () => {
  const hub = await closingServer();
  const url = `mqtt://127.0.0.1:${hub.port}`;
  const clients: MqttClient[] = [];
  try {
    for (const manualConnect of [false, true]) {
      const client = connectFleetClient({ url, deviceId: 'dev-3', token: 't'.repeat(43), kind: 'agent', version: '1.0.0', keepalive: 5, reconnectMs: 10, reconnectMaxMs: 20, manualConnect });
      clients.push(client);
      client.on('error', () => undefined);
      if (manualConnect) client.connect();
      const from = hub.connections();
      await waitFor(() => hub.connections() >= from + 3, 'a few attempts');
      await disconnectFleetClient(client, 'dev-3', 'agent', '1.0.0');
      await new Promise((r) => setTimeout(r, 100));
      const after = hub.connections();
      await new Promise((r) => setTimeout(r, 500));
      assert.equal(hub.connections(), after, `no attempt after the stop (manualConnect ${manualConnect}): ${hub.connections() - after} in 0.5 s`);
    }
  } finally {
    for (const c of clients) c.end(true);
    await hub.close();
  }
});
