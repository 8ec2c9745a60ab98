import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import mqtt from 'mqtt';
import { deriveToken } from '../../core/credentials.ts';
import { encodeBatch } from '../../core/batch.ts';
import { encodeMessage } from '../../core/messages.ts';
import { connectFleetClient } from '../../core/mqtt.ts';
import { MemoryOutbox, Priority, type OutboxRecord } from '../../core/outbox.ts';
import { deviceTopic } from '../../core/topics.ts';
import { Uplink } from '../../core/uplink.ts';
import { HubConfigSchema } from '../../hub/config.ts';
import { startHub } from '../../hub/index.ts';
import { tempDir, testLogger, waitFor } from '../helpers.ts';

/** An outbox whose peek answers late, with a result computed before an append lands. */
class StalePeekOutbox extends MemoryOutbox {
  onPeek: (() => Promise<void>) | null = null;
  override async peek(max: number, exclude?: ReadonlySet<string>): Promise<OutboxRecord[]> {
    const result = await super.peek(max, exclude);
    const hook = this.onPeek;
    this.onPeek = null;
    if (hook) await hook();
    return result;
  }
}

test('uplink: a record appended while a peek is in flight is still sent (no stranded record)', async () => {
  const tmp = tempDir();
  const hub = await startHub(HubConfigSchema.parse({ mqttPort: 0, httpPort: 0, stateDir: tmp.dir }), testLogger('hub'));
  const url = `mqtt://127.0.0.1:${hub.mqttPort}`;
  const consumer = await mqtt.connectAsync(url, { username: 'operator', password: readFileSync(hub.operatorTokenFile, 'utf8').trim(), reconnectPeriod: 0 });
  const got: string[] = [];
  await consumer.subscribeAsync(deviceTopic('dev-u', 'events'), { qos: 1 });
  consumer.on('message', (_t, p) => got.push((JSON.parse(p.toString()) as { type: string }).type));

  const outbox = new StalePeekOutbox();
  const client = connectFleetClient({ url, deviceId: 'dev-u', token: deriveToken(readFileSync(hub.fleetSecretFile, 'utf8').trim(), 'device', 'dev-u'), kind: 'agent', version: '1', keepalive: 10 });
  // the pump started by 'connect' peeks an empty outbox; the append lands during that peek
  outbox.onPeek = async () => {
    await outbox.append({ topic: deviceTopic('dev-u', 'events'), priority: Priority.ALERT, payload: (mid) => encodeMessage({ v: 1, mid, ts: Date.now(), type: 'late', severity: 'info' }) });
  };
  const uplink = new Uplink({ client, outbox, log: testLogger(), deviceId: 'dev-u', batchDelayMs: 0 });
  try {
    await waitFor(() => got.includes('late'), 'the late record at the consumer', 5000);
    await waitFor(() => outbox.stats().depth === 0, 'outbox drained after PUBACK');
    assert.equal(uplink.stats().sentRecords, 1);
  } finally {
    uplink.stop();
    await client.endAsync(true);
    await consumer.endAsync(true);
    await hub.stop();
    tmp.cleanup();
  }
});

test('uplink: a record that is a batch already (a gateway groups its MCUs’ telemetry) is sent with its items carried over, never nested; plain records join the same publish', async () => {
  const tmp = tempDir();
  const hub = await startHub(HubConfigSchema.parse({ mqttPort: 0, httpPort: 0, stateDir: tmp.dir }), testLogger('hub'));
  const url = `mqtt://127.0.0.1:${hub.mqttPort}`;
  const consumer = await mqtt.connectAsync(url, { username: 'operator', password: readFileSync(hub.operatorTokenFile, 'utf8').trim(), reconnectPeriod: 0 });
  const got: number[] = [];
  await consumer.subscribeAsync(deviceTopic('dev-b', 'telemetry'), { qos: 1 });
  consumer.on('message', (_t, p) => got.push((JSON.parse(p.toString()) as { samples: Array<{ v: number }> }).samples[0]!.v));

  const outbox = new MemoryOutbox();
  const tel = (mid: string, v: number) => encodeMessage({ v: 1, mid, ts: Date.now(), samples: [{ n: 'x', v, t: Date.now() }] });
  const topic = deviceTopic('dev-b', 'telemetry');
  await outbox.append({ topic: deviceTopic('dev-b', 'batch'), priority: Priority.TELEMETRY, payload: (id) => encodeBatch([1, 2, 3].map((v, k) => ({ topic, payload: tel(`${id}00${k}`, v) }))) });
  await outbox.append({ topic, priority: Priority.TELEMETRY, payload: (mid) => tel(mid, 4) });
  await outbox.append({ topic: deviceTopic('dev-b', 'batch'), priority: Priority.TELEMETRY, payload: (id) => encodeBatch([5, 6].map((v, k) => ({ topic, payload: tel(`${id}00${k}`, v) }))) });
  const client = connectFleetClient({ url, deviceId: 'dev-b', token: deriveToken(readFileSync(hub.fleetSecretFile, 'utf8').trim(), 'device', 'dev-b'), kind: 'agent', version: '1', keepalive: 10 });
  const uplink = new Uplink({ client, outbox, log: testLogger(), deviceId: 'dev-b', batchDelayMs: 0 });
  try {
    await waitFor(() => got.length === 6, 'all six readings at the consumer', 5000);
    assert.deepEqual(got, [1, 2, 3, 4, 5, 6]);
    await waitFor(() => outbox.stats().depth === 0, 'outbox drained after PUBACK');
    const st = uplink.stats();
    assert.equal(st.sentRecords, 3);
    assert.equal(st.publishes, 1, 'one publish for the three records');
  } finally {
    uplink.stop();
    await client.endAsync(true);
    await consumer.endAsync(true);
    await hub.stop();
    tmp.cleanup();
  }
});
