import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { encodeBatch } from '../../core/batch.ts';
import { encodeMessage } from '../../core/messages.ts';
import { openStore } from '../../core/store.ts';
import { deviceTopic } from '../../core/topics.ts';
import { DeadLetters, type DeadLetter } from '../../hub/dead-letters.ts';
import { tempDir, testLogger, waitFor } from '../helpers.ts';
import { connectDevice, deadLetters, metric, telemetry, withHub } from './harness.ts';


test('dead letters: batch items another gateway registered, and messages without a mid, are kept with the reason; the rest is routed; they survive a hub restart', async () => {
  const tmp = tempDir();
  try {
    const mcu1 = telemetry('11');
    await withHub(async (hub, ctx) => {
      const a = await connectDevice(ctx, 'gw-a');
      await a.publishAsync(deviceTopic('gw-a', 'register'), encodeMessage({ v: 1, ts: Date.now(), mcus: ['mcu-1'] }), { qos: 1, retain: true });
      const b = await connectDevice(ctx, 'gw-b');
      // gw-b claims mcu-1 too (it moved, or is heard by both): the hub keeps it with gw-a
      await b.publishAsync(deviceTopic('gw-b', 'register'), encodeMessage({ v: 1, ts: Date.now(), mcus: ['mcu-1', 'mcu-2'] }), { qos: 1, retain: true });
      const noMid = Buffer.from(JSON.stringify({ v: 1, ts: Date.now(), samples: [] }));
      await b.publishAsync(
        deviceTopic('gw-b', 'batch'),
        encodeBatch([
          { topic: deviceTopic('mcu-1', 'telemetry'), payload: mcu1 },
          { topic: deviceTopic('mcu-2', 'telemetry'), payload: telemetry('12') },
          { topic: deviceTopic('mcu-2', 'telemetry'), payload: noMid },
        ]),
        { qos: 1 },
      );
      // acknowledged: mcu-2's reading is routed, the two others are dead letters
      assert.equal(hub.registry.get('mcu-2')?.telemetryBatches, 1);
      assert.equal(hub.registry.get('mcu-1'), undefined);
      const got = await deadLetters(ctx);
      assert.equal(got.records, 2);
      const [first, second] = got.deadLetters;
      assert.equal(first?.from, 'gw-b');
      assert.equal(first?.topic, deviceTopic('mcu-1', 'telemetry'));
      assert.equal(first?.reason, 'acl');
      assert.match(first?.detail ?? '', /registered by gateway gw-a/);
      assert.deepEqual(Buffer.from(first!.payload, 'base64'), mcu1, 'the payload is kept byte for byte');
      assert.equal(first?.truncated, false);
      assert.equal(second?.reason, 'invalid');
      assert.equal(second?.topic, deviceTopic('mcu-2', 'telemetry'));
      assert.equal(await metric(hub, 'fleet_hub_dead_letters'), 2);

      // a direct publish over the payload limit is kept too, cut to 64 KiB
      const big = Buffer.alloc(200 * 1024, 0x61);
      await b.publishAsync(deviceTopic('gw-b', 'telemetry'), big, { qos: 1 });
      await waitFor(async () => (await deadLetters(ctx)).records === 3, 'the oversized publish as a dead letter');
      const third = (await deadLetters(ctx, `?after=${encodeURIComponent(second!.id)}`)).deadLetters;
      assert.equal(third.length, 1, 'paging after the second record');
      assert.equal(third[0]?.reason, 'too_large');
      assert.equal(third[0]?.size, big.length);
      assert.equal(third[0]?.truncated, true);
      assert.equal(Buffer.from(third[0]!.payload, 'base64').length, 64 * 1024);

      const bad = await fetch(`${ctx.http}/api/v1/dead-letters?after=x`, { headers: { authorization: `Bearer ${ctx.operator}` } });
      assert.equal(bad.status, 400);
      await a.endAsync();
      await b.endAsync();
    }, tmp.dir, { maxPayloadBytes: 128 * 1024 });
    await withHub(async (_hub, ctx) => {
      const again = await deadLetters(ctx);
      assert.equal(again.records, 3, 'kept across a restart');
      assert.deepEqual(Buffer.from(again.deadLetters[0]!.payload, 'base64'), mcu1);
    }, tmp.dir);
  } finally {
    tmp.cleanup();
  }
});

test('dead letters: bounded by records and bytes, the oldest dropped first; a reopened store counts what it holds', async () => {
  const tmp = tempDir();
  try {
    const dir = join(tmp.dir, 'dl');
    let t = 1_000;
    let db = await openStore<string>(dir, 'utf8');
    let store = await DeadLetters.open(db, { log: testLogger('dl'), maxRecords: 5, now: () => t++ });
    for (let i = 0; i < 8; i++) await store.add('gw', [{ topic: `fleet/v1/d/m-${i}/telemetry`, payload: Buffer.from(`p${i}`), reason: 'acl', detail: 'test' }]);
    assert.deepEqual(store.stats(), { records: 5, bytes: store.stats().bytes, added: 8, evicted: 3 });
    assert.deepEqual((await store.list(10)).map((d) => d.topic), [3, 4, 5, 6, 7].map((i) => `fleet/v1/d/m-${i}/telemetry`));
    // a byte bound too: a reopened store knows its size and trims by it
    await db.close();
    db = await openStore<string>(dir, 'utf8');
    store = await DeadLetters.open(db, { log: testLogger('dl'), maxRecords: 100, maxBytes: 600, now: () => t++ });
    assert.equal(store.stats().records, 5);
    await store.add('gw', [{ topic: 'fleet/v1/d/m-8/telemetry', payload: Buffer.alloc(100), reason: 'acl', detail: 'test' }]);
    assert.ok(store.stats().bytes <= 600, `bytes ${store.stats().bytes}`);
    const left = (await store.list(10)).map((d) => d.topic);
    assert.equal(left.at(-1), 'fleet/v1/d/m-8/telemetry', 'the newest is kept');
    assert.ok(!left.includes('fleet/v1/d/m-3/telemetry'), 'the oldest went first');
    await db.close();
  } finally {
    tmp.cleanup();
  }
});
