import { test } from 'node:test';
import assert from 'node:assert/strict';
import type { MqttClient } from 'mqtt';
import { encodeBatch, type BatchItem } from '../../core/batch.ts';
import { encodeMessage } from '../../core/messages.ts';
import { deviceTopic } from '../../core/topics.ts';
import { tempDir, waitFor } from '../helpers.ts';
import { connect, connectDevice, event, logs, metric, telemetry, withHub, type HubCtx } from './harness.ts';

/** An operator consumer on everything under the fleet root, recording `topic mid` in arrival order. */
async function consumer(ctx: HubCtx, id = 'ops-1'): Promise<{ client: MqttClient; seen: string[] }> {
  const client = await connect(ctx.url, id, 'operator', ctx.operator);
  const seen: string[] = [];
  client.on('message', (topic, payload) => {
    let mid = '';
    try {
      mid = (JSON.parse(payload.toString()) as { mid?: string }).mid ?? '';
    } catch {
      mid = '<not json>';
    }
    seen.push(`${topic} ${mid}`.trim());
  });
  await client.subscribeAsync('fleet/v1/#', { qos: 1 });
  return { client, seen };
}

const item = (deviceId: string, channel: 'telemetry' | 'events' | 'logs', mid: string): BatchItem => ({
  topic: deviceTopic(deviceId, channel),
  payload: channel === 'telemetry' ? telemetry(mid) : channel === 'events' ? event(mid) : logs(mid),
});
const line = (it: BatchItem) => `${it.topic} ${(JSON.parse(it.payload.toString()) as { mid: string }).mid}`;
const upOnly = (seen: string[]) => seen.filter((s) => !s.includes('/state'));

test('batch: items reach the consumer on their own topics, in order, and the PUBACK comes after they are routed', async () => {
  await withHub(async (hub, ctx) => {
    const op = await consumer(ctx);
    const dev = await connectDevice(ctx, 'dev-1');
    const channels = ['telemetry', 'events', 'logs'] as const;
    const items = Array.from({ length: 30 }, (_, i) => item('dev-1', channels[i % 3]!, String(i + 2)));

    // a direct publish, a batch and another direct publish all in flight at once: the hub
    // keeps the sender's order across them
    const first = item('dev-1', 'telemetry', '1');
    const last = item('dev-1', 'telemetry', '32');
    await Promise.all([
      dev.publishAsync(first.topic, first.payload, { qos: 1 }),
      dev.publishAsync(deviceTopic('dev-1', 'batch'), encodeBatch(items), { qos: 1 }),
      dev.publishAsync(last.topic, last.payload, { qos: 1 }),
    ]);
    // the hub's own consumer is subscribed inside the broker: once the batch is acknowledged
    // its items have been through it, no waiting needed
    assert.equal(hub.registry.get('dev-1')?.events, 10);
    assert.equal(hub.registry.get('dev-1')?.telemetryBatches, 12);

    const want = [first, ...items, last].map(line);
    await waitFor(() => upOnly(op.seen).length >= want.length, 'all items at the consumer');
    assert.deepEqual(upOnly(op.seen), want);
    assert.ok(!op.seen.some((s) => s.includes('/batch')), 'the batch itself reaches no subscriber');
    assert.equal(await metric(hub, 'fleet_hub_batches_total'), 1);
    assert.equal(await metric(hub, 'fleet_hub_batch_items_total{result="routed"}'), 30);
    await dev.endAsync();
    await op.client.endAsync();
  });
});

test('batch: an item for another device is dropped and counted, the others go; a batch goes on the sender’s own topic only', async () => {
  await withHub(async (hub, ctx) => {
    const op = await consumer(ctx);
    const dev = await connectDevice(ctx, 'dev-1');
    const state = encodeMessage({ v: 1, online: true, kind: 'agent' as const, ts: Date.now() });
    const batch: BatchItem[] = [
      item('dev-1', 'telemetry', '1'),
      item('dev-2', 'telemetry', '2'), // another device's subtree
      { topic: deviceTopic('dev-1', 'state'), payload: state }, // not an outbox channel: it would lose its retain flag
      { topic: deviceTopic('dev-1', 'cmd'), payload: telemetry('4') }, // hub → device channel
      { topic: 'elsewhere/entirely', payload: telemetry('5') },
      item('dev-1', 'events', '6'),
    ];
    await dev.publishAsync(deviceTopic('dev-1', 'batch'), encodeBatch(batch), { qos: 1 });
    assert.equal(await metric(hub, 'fleet_hub_acl_denied_total{action="publish"}'), 4);
    assert.equal(await metric(hub, 'fleet_hub_batch_items_total{result="denied"}'), 4);
    assert.equal(await metric(hub, 'fleet_hub_batch_items_total{result="routed"}'), 2);

    // on another device's batch topic, or retained: the whole publish is refused
    await dev.publishAsync(deviceTopic('dev-2', 'batch'), encodeBatch([item('dev-2', 'telemetry', '7')]), { qos: 1 });
    await dev.publishAsync(deviceTopic('dev-1', 'batch'), encodeBatch([item('dev-1', 'telemetry', '8')]), { qos: 1, retain: true });
    assert.equal(await metric(hub, 'fleet_hub_acl_denied_total{action="publish"}'), 6);

    const sentinel = item('dev-1', 'telemetry', '9');
    await dev.publishAsync(sentinel.topic, sentinel.payload, { qos: 1 });
    await waitFor(() => op.seen.includes(line(sentinel)), 'sentinel');
    assert.deepEqual(upOnly(op.seen), [line(batch[0]!), line(batch[5]!), line(sentinel)]);
    assert.equal(hub.registry.get('dev-2'), undefined);
    assert.ok(dev.connected);
    await dev.endAsync();
    await op.client.endAsync();
  });
});

test('batch: a mid sent directly and again inside a later batch (and twice in that batch) reaches the consumer once', async () => {
  await withHub(async (hub, ctx) => {
    const op = await consumer(ctx);
    const dev = await connectDevice(ctx, 'dev-1');
    const m10 = item('dev-1', 'telemetry', '10');
    await dev.publishAsync(m10.topic, m10.payload, { qos: 1 });
    const batch = [m10, item('dev-1', 'telemetry', '11'), item('dev-1', 'telemetry', '11'), item('dev-1', 'events', '12')];
    await dev.publishAsync(deviceTopic('dev-1', 'batch'), encodeBatch(batch), { qos: 1 });
    // and the batch resent whole, as after a lost PUBACK
    await dev.publishAsync(deviceTopic('dev-1', 'batch'), encodeBatch(batch), { qos: 1 });
    const sentinel = item('dev-1', 'telemetry', '13');
    await dev.publishAsync(sentinel.topic, sentinel.payload, { qos: 1 });
    await waitFor(() => op.seen.includes(line(sentinel)), 'sentinel');
    assert.deepEqual(upOnly(op.seen), [line(m10), line(batch[1]!), line(batch[3]!), line(sentinel)]);
    assert.equal(await metric(hub, 'fleet_hub_duplicates_total'), 6);
    assert.equal(await metric(hub, 'fleet_hub_batch_items_total{result="duplicate"}'), 6);
    assert.equal(hub.registry.get('dev-1')?.duplicates, 6, 'the registry still shows duplicates per device');
    assert.equal(hub.registry.get('dev-1')?.telemetryBatches, 3);
    await dev.endAsync();
    await op.client.endAsync();
  });
});

test('batch: malformed batches and messages without a mid are counted, route nothing, and the connection stays usable', async () => {
  await withHub(async (hub, ctx) => {
    const op = await consumer(ctx);
    const dev = await connectDevice(ctx, 'dev-1');
    const valid = encodeBatch([item('dev-1', 'telemetry', '1'), item('dev-1', 'telemetry', '2')]);
    const malformed = [
      Buffer.from('not a batch at all'),
      valid.subarray(0, valid.length - 3), // truncated
      Buffer.from([0xfb, 0x02, ...valid.subarray(2)]), // unknown version
      Buffer.from([0xfb, 0x01, 0xff, 0xff, 0xff, 0xff, 0x7f]), // over-long varint
      Buffer.alloc(0),
    ];
    for (const m of malformed) await dev.publishAsync(deviceTopic('dev-1', 'batch'), m, { qos: 1 });
    assert.equal(await metric(hub, 'fleet_hub_messages_invalid_total{channel="batch"}'), malformed.length);
    assert.equal(await metric(hub, 'fleet_hub_batches_total'), 0);

    // outbox messages must carry a mid, direct or in a batch
    const noMid = encodeMessage({ v: 1, ts: Date.now(), samples: [] });
    await dev.publishAsync(deviceTopic('dev-1', 'telemetry'), noMid, { qos: 1 });
    await dev.publishAsync(deviceTopic('dev-1', 'batch'), encodeBatch([{ topic: deviceTopic('dev-1', 'telemetry'), payload: noMid }]), { qos: 1 });
    assert.equal(await metric(hub, 'fleet_hub_messages_invalid_total{channel="telemetry"}'), 2);
    assert.equal(await metric(hub, 'fleet_hub_batch_items_total{result="invalid"}'), 1);

    assert.ok(dev.connected);
    await dev.publishAsync(deviceTopic('dev-1', 'batch'), valid, { qos: 1 });
    await waitFor(() => upOnly(op.seen).length >= 2, 'the valid batch');
    assert.deepEqual(upOnly(op.seen), [`${deviceTopic('dev-1', 'telemetry')} 1`, `${deviceTopic('dev-1', 'telemetry')} 2`]);
    await dev.endAsync();
    await op.client.endAsync();
  });
});

test('batch: a gateway batches for the MCUs it registered; an unregistered MCU’s item is dropped', async () => {
  await withHub(async (hub, ctx) => {
    const op = await consumer(ctx);
    const gw = await connectDevice(ctx, 'gw-1');
    await gw.publishAsync(deviceTopic('gw-1', 'register'), encodeMessage({ v: 1, ts: Date.now(), mcus: ['esp-1', 'esp-2'] }), { qos: 1, retain: true });
    // one sequence of mids for all of the gateway's messages
    const batch = [item('esp-1', 'telemetry', '1'), item('esp-2', 'telemetry', '2'), item('gw-1', 'events', '3'), item('esp-3', 'telemetry', '4'), item('esp-1', 'telemetry', '5')];
    await gw.publishAsync(deviceTopic('gw-1', 'batch'), encodeBatch(batch), { qos: 1 });
    assert.equal(hub.registry.get('esp-1')?.telemetryBatches, 2);
    assert.equal(hub.registry.get('esp-2')?.telemetryBatches, 1);
    assert.equal(hub.registry.get('esp-3'), undefined);
    assert.equal(await metric(hub, 'fleet_hub_batch_items_total{result="denied"}'), 1);

    // a gateway's batch goes on its own topic, not on an MCU's
    await gw.publishAsync(deviceTopic('esp-1', 'batch'), encodeBatch([item('esp-1', 'telemetry', '6')]), { qos: 1 });
    // resending the batch: everything in it is a duplicate now
    await gw.publishAsync(deviceTopic('gw-1', 'batch'), encodeBatch(batch), { qos: 1 });
    assert.equal(await metric(hub, 'fleet_hub_duplicates_total'), 4);
    assert.equal(hub.registry.get('esp-1')?.duplicates, 2);

    const sentinel = item('esp-2', 'telemetry', '7');
    await gw.publishAsync(sentinel.topic, sentinel.payload, { qos: 1 });
    await waitFor(() => op.seen.includes(line(sentinel)), 'sentinel');
    assert.deepEqual(
      op.seen.filter((s) => !s.includes('/register')),
      [batch[0]!, batch[1]!, batch[2]!, batch[4]!, sentinel].map(line),
    );
    await gw.endAsync();
    await op.client.endAsync();
  });
});

test('batch: de-duplication survives a graceful hub restart: a resend after the restart is not delivered again', async () => {
  const tmp = tempDir();
  const direct = Array.from({ length: 5 }, (_, i) => item('dev-1', 'telemetry', String(i + 1)));
  const batched = Array.from({ length: 10 }, (_, i) => item('dev-1', 'events', String(i + 6)));
  const sendAll = async (dev: MqttClient, extra: BatchItem[]) => {
    for (const d of direct) await dev.publishAsync(d.topic, d.payload, { qos: 1 });
    await dev.publishAsync(deviceTopic('dev-1', 'batch'), encodeBatch([...batched, ...extra]), { qos: 1 });
  };
  try {
    await withHub(async (_hub, ctx) => {
      const op = await consumer(ctx);
      const dev = await connectDevice(ctx, 'dev-1');
      await sendAll(dev, []);
      await waitFor(() => upOnly(op.seen).length === 15, 'all 15 routed');
      await dev.endAsync();
      await op.client.endAsync();
    }, tmp.dir);
    await withHub(async (hub, ctx) => {
      const op = await consumer(ctx);
      const dev = await connectDevice(ctx, 'dev-1');
      const fresh = item('dev-1', 'events', '16');
      await sendAll(dev, [fresh]); // the device resends what it had in flight, plus a new one
      const sentinel = item('dev-1', 'telemetry', '17');
      await dev.publishAsync(sentinel.topic, sentinel.payload, { qos: 1 });
      await waitFor(() => op.seen.includes(line(sentinel)), 'sentinel');
      assert.deepEqual(upOnly(op.seen), [line(fresh), line(sentinel)]);
      assert.equal(await metric(hub, 'fleet_hub_duplicates_total'), 15);
      assert.equal(hub.registry.get('dev-1')?.duplicates, 15);
      await dev.endAsync();
      await op.client.endAsync();
    }, tmp.dir);
  } finally {
    tmp.cleanup();
  }
});

test('batch: the deliveries of a 1,000-item batch leave in a few socket writes, all in order (hub coalesceWrites)', async () => {
  await withHub(async (hub, ctx) => {
    const op = await consumer(ctx);
    // count the flushes of the hub's socket to the consumer: aedes writes each delivery from
    // its own immediate, and without coalescing each was flushed by itself (one writev per
    // one to three deliveries)
    const conn = (Reflect.get(hub.broker.aedes, 'clients') as Record<string, { conn: unknown }>)['ops-1']?.conn as { _writev: (...a: unknown[]) => void; _write: (...a: unknown[]) => void } | undefined;
    assert.ok(conn, 'the consumer is connected');
    let flushes = 0;
    for (const name of ['_writev', '_write'] as const) {
      const orig = conn[name];
      conn[name] = function (this: unknown, ...a: unknown[]) {
        flushes++;
        return Reflect.apply(orig, this, a);
      };
    }
    const dev = await connectDevice(ctx, 'dev-1');
    const items = Array.from({ length: 1000 }, (_, i) => item('dev-1', 'telemetry', String(i + 1)));
    const before = flushes;
    await dev.publishAsync(deviceTopic('dev-1', 'batch'), encodeBatch(items), { qos: 1 });
    await waitFor(() => upOnly(op.seen).length >= items.length, 'all items at the consumer');
    assert.deepEqual(upOnly(op.seen), items.map(line));
    const used = flushes - before;
    assert.ok(used <= 20, `the hub flushed the 1,000 deliveries in ${used} writes; expected at most 20`);
    op.client.end(true);
    dev.end(true);
  });
});
