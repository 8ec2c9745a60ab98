import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import { connectFleetClient, logHubError } from '../../core/mqtt.ts';
import { testLogger, waitFor } from '../helpers.ts';

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
