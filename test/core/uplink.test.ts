import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import mqtt from 'mqtt';
import { deriveToken } from '../../core/credentials.ts';
import { encodeBatch } from '../../core/batch.ts';
import { encodeMessage } from '../../core/messages.ts';
import { connectFleetClient } from '../../core/mqtt.ts';
import { MemoryOutbox, Priority, type Outbox, type OutboxRecord } from '../../core/outbox.ts';
import { deviceTopic } from '../../core/topics.ts';
import { Uplink, type UplinkOptions } from '../../core/uplink.ts';
import { HubConfigSchema } from '../../hub/config.ts';
import { startHub } from '../../hub/index.ts';
import { cleanups, tempDir, testLogger, waitFor } from '../helpers.ts';

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

/**
 * A real hub, an operator consumer on one device topic, and that device's fleet client and
 * Uplink over `outbox`; `run` gets the Uplink, and everything is closed when test `t` ends
 * (also when a step before `run` fails).
 */
async function withHubDevice(
  t: TestContext,
  deviceId: string,
  channel: 'events' | 'telemetry',
  onMessage: (payload: Buffer) => void,
  outbox: Outbox,
  run: (uplink: Uplink) => Promise<void>,
  /** runs after the consumer subscribed, before the device connects */
  before: () => Promise<void> = async () => {},
  uplinkOpts: Partial<UplinkOptions> = {},
): Promise<void> {
  const defer = cleanups(t);
  const tmp = tempDir();
  defer(tmp.cleanup);
  const hub = await startHub(HubConfigSchema.parse({ mqttPort: 0, httpPort: 0, stateDir: tmp.dir }), testLogger('hub'));
  defer(() => hub.stop());
  const url = `mqtt://127.0.0.1:${hub.mqttPort}`;
  const consumer = await mqtt.connectAsync(url, { username: 'operator', password: readFileSync(hub.operatorTokenFile, 'utf8').trim(), reconnectPeriod: 0 });
  defer(() => consumer.endAsync(true));
  await consumer.subscribeAsync(deviceTopic(deviceId, channel), { qos: 1 });
  consumer.on('message', (_t, p) => onMessage(p));
  await before();
  const client = connectFleetClient({ url, deviceId, token: deriveToken(readFileSync(hub.fleetSecretFile, 'utf8').trim(), 'device', deviceId), kind: 'agent', version: '1', keepalive: 10 });
  defer(() => client.endAsync(true));
  const uplink = new Uplink({ client, outbox, log: testLogger(), deviceId, batchDelayMs: 0, ...uplinkOpts });
  defer(() => uplink.stop());
  await run(uplink);
}

test('uplink: a record appended while a peek is in flight is still sent (no stranded record) (a MemoryOutbox whose peek the test holds to append during it)', async (t) => {
  const got: string[] = [];
  const outbox = new StalePeekOutbox();
  // the pump started by 'connect' peeks an empty outbox; the append lands during that peek
  outbox.onPeek = async () => {
    await outbox.append({ topic: deviceTopic('dev-u', 'events'), priority: Priority.ALERT, payload: (mid) => encodeMessage({ v: 1, mid, ts: Date.now(), type: 'late', severity: 'info' }) });
  };
  await withHubDevice(t, 'dev-u', 'events', (p) => got.push((JSON.parse(p.toString()) as { type: string }).type), outbox, async (uplink) => {
    await waitFor(() => got.includes('late'), 'the late record at the consumer', 5000);
    await waitFor(() => outbox.stats().depth === 0, 'outbox drained after PUBACK');
    assert.equal(uplink.stats().sentRecords, 1);
  });
});

test('uplink: a record that is a batch already (a gateway groups its MCUs’ telemetry) is sent with its items carried over, never nested; plain records join the same publish', async (t) => {
  const got: number[] = [];
  const outbox = new MemoryOutbox();
  const tel = (mid: string, v: number) => encodeMessage({ v: 1, mid, ts: Date.now(), samples: [{ n: 'x', v, t: Date.now() }] });
  const topic = deviceTopic('dev-b', 'telemetry');
  const fill = async () => {
    await outbox.append({ topic: deviceTopic('dev-b', 'batch'), priority: Priority.TELEMETRY, payload: (id) => encodeBatch([1, 2, 3].map((v, k) => ({ topic, payload: tel(`${id}00${k}`, v) }))) });
    await outbox.append({ topic, priority: Priority.TELEMETRY, payload: (mid) => tel(mid, 4) });
    await outbox.append({ topic: deviceTopic('dev-b', 'batch'), priority: Priority.TELEMETRY, payload: (id) => encodeBatch([5, 6].map((v, k) => ({ topic, payload: tel(`${id}00${k}`, v) }))) });
  };
  await withHubDevice(
    t,
    'dev-b',
    'telemetry',
    (p) => got.push((JSON.parse(p.toString()) as { samples: Array<{ v: number }> }).samples[0]!.v),
    outbox,
    async (uplink) => {
      await waitFor(() => got.length === 6, 'all six readings at the consumer', 5000);
      assert.deepEqual(got, [1, 2, 3, 4, 5, 6]);
      await waitFor(() => outbox.stats().depth === 0, 'outbox drained after PUBACK');
      const st = uplink.stats();
      assert.equal(st.sentRecords, 3);
      assert.equal(st.publishes, 1, 'one publish for the three records');
    },
    fill, // before the device connects: the three records go out together
  );
});

/** An outbox whose acks are applied only when released (as when the next fsync is not due yet); counts what peek hands out. */
class HeldAckOutbox extends MemoryOutbox {
  held: Array<() => void> = [];
  readonly handedOut = new Map<string, number>();
  override async peek(max: number, exclude?: ReadonlySet<string>): Promise<OutboxRecord[]> {
    const recs = await super.peek(max, exclude);
    for (const r of recs) this.handedOut.set(r.id, (this.handedOut.get(r.id) ?? 0) + 1);
    return recs;
  }
  override ack(ids: readonly string[]): Promise<void> {
    return new Promise((resolve, reject) => this.held.push(() => void super.ack(ids).then(resolve, reject)));
  }
}

test('uplink: a publish frees its place in the window at its PUBACK, not once the outbox applied the ack; its record is not sent again meanwhile, nor after a reconnect (a MemoryOutbox whose acks the test holds)', async (t) => {
  const got: string[] = [];
  const outbox = new HeldAckOutbox();
  await withHubDevice(
    t,
    'dev-w',
    'events',
    (p) => got.push((JSON.parse(p.toString()) as { type: string }).type),
    outbox,
    async (uplink) => {
      for (const type of ['a', 'b', 'c']) await outbox.append({ topic: deviceTopic('dev-w', 'events'), priority: Priority.ALERT, payload: (mid) => encodeMessage({ v: 1, mid, ts: Date.now(), type, severity: 'info' }) });
      // a window of one publish: b and c can go only if a's PUBACK freed it, the acks being held
      // the consumer can have c a loop turn before the device has c's PUBACK
      await waitFor(() => got.length === 3 && outbox.held.length === 3, 'all three at the consumer and PUBACKed while every ack waits', 5000);
      assert.deepEqual(got, ['a', 'b', 'c']);
      assert.equal(outbox.held.length, 3);
      assert.equal(outbox.stats().depth, 3);
      assert.equal(uplink.stats().inFlight, 0, 'none awaits a PUBACK');
      assert.equal(uplink.stats().awaitingAck, 3, 'all three await their outbox ack');
      await new Promise((r) => setTimeout(r, 300));
      assert.deepEqual([...outbox.handedOut.values()], [1, 1, 1], 'no record handed to the uplink twice while its ack waits');
      // the connection drops and comes back while the acks still wait: what the hub has is not sent again
      const client = (uplink as unknown as { opts: { client: mqtt.MqttClient } }).opts.client;
      let reconnected = false;
      client.once('connect', () => (reconnected = true));
      client.stream.destroy();
      await waitFor(() => reconnected && client.connected, 'the device client reconnected', 10_000);
      await new Promise((r) => setTimeout(r, 300));
      assert.deepEqual([...outbox.handedOut.values()], [1, 1, 1], 'not handed out again after the reconnect either');
      assert.equal(uplink.stats().awaitingAck, 3);
      for (const go of outbox.held.splice(0)) go();
      await waitFor(() => outbox.stats().depth === 0, 'the acks applied');
      assert.equal(uplink.stats().awaitingAck, 0);
      assert.equal(uplink.stats().sentRecords, 3);
    },
    async () => {},
    { window: 1, batchMax: 1 },
  );
});
