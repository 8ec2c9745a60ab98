import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import type { MqttClient } from 'mqtt';
import { countItems, encodeBatch, parseRecordMarker, recordMarker, RECORD_TOPIC, type BatchItem } from '../../core/batch.ts';
import { encodeMessage } from '../../core/messages.ts';
import { openStore } from '../../core/store.ts';
import { deviceTopic } from '../../core/topics.ts';
import { RecordRoute, type RouteItem } from '../../hub/broker.ts';
import { Deduplicator } from '../../hub/dedup.ts';
import type { HubHandle } from '../../hub/index.ts';
import { tempDir, testLogger, waitFor } from '../helpers.ts';
import { connect, connectDevice, deadLetters, metric, patchStore, telemetry, withHub, type HubCtx } from './harness.ts';

// Records: a gateway's grouped MCU telemetry carries a marker with the record's own mid, and
// the hub de-duplicates the record as a whole in the gateway's window (docs/topics.md#records).

const GW = 'gw-1';
const MCUS = Array.from({ length: 50 }, (_, i) => `esp-${i}`);
const mcuItem = (mcu: string, mid: string): BatchItem => ({ topic: deviceTopic(mcu, 'telemetry'), payload: telemetry(mid) });
/** A grouped record as the gateway writes it: marker, then one item per MCU with mid = record id + 3-digit index. */
const record = (id: string, mcus: readonly string[]): BatchItem[] => [recordMarker(id, mcus.length), ...mcus.map((m, k) => mcuItem(m, `${id}${String(k).padStart(3, '0')}`))];

async function consumer(ctx: HubCtx): Promise<{ client: MqttClient; seen: string[] }> {
  const client = await connect(ctx.url, 'ops-1', 'operator', ctx.operator);
  const seen: string[] = [];
  client.on('message', (topic, payload) => seen.push(`${topic} ${(JSON.parse(payload.toString()) as { mid?: string }).mid ?? ''}`));
  await client.subscribeAsync('fleet/v1/d/+/telemetry', { qos: 1 });
  return { client, seen };
}

async function gateway(ctx: HubCtx): Promise<MqttClient> {
  const gw = await connectDevice(ctx, GW);
  await gw.publishAsync(deviceTopic(GW, 'register'), encodeMessage({ v: 1, ts: Date.now(), mcus: MCUS }), { qos: 1, retain: true });
  return gw;
}

/** Publish a marker telemetry of the gateway itself and wait for it: whatever the hub routed before it has arrived. */
async function settle(gw: MqttClient, seen: string[], mid: string): Promise<void> {
  await gw.publishAsync(deviceTopic(GW, 'telemetry'), telemetry(mid), { qos: 1 });
  await waitFor(() => seen.includes(`${deviceTopic(GW, 'telemetry')} ${mid}`), `sentinel ${mid} at the consumer`);
}

test('records: the marker round-trips; countItems can leave markers out', () => {
  const items = record('1700000000001', MCUS.slice(0, 3));
  assert.deepEqual(parseRecordMarker(items[0]!.payload), { mid: '1700000000001', items: 3 });
  const buf = encodeBatch(items);
  assert.equal(countItems(buf), 4);
  assert.equal(countItems(buf, false), 3, 'messages, not items');
  for (const bad of ['{}', '{"v":1,"mid":"12","items":0}', '{"v":1,"mid":"1a","items":2}', '{"v":2,"mid":"12","items":2}', 'not json', `{"v":1,"mid":"12","items":${10_001}}`]) {
    assert.equal(parseRecordMarker(Buffer.from(bad)), null, bad);
  }
});

test('records: a resent record is dropped whole, by one mid in the gateway’s window; no MCU gets a window', async () => {
  await withHub(async (hub, ctx) => {
    const op = await consumer(ctx);
    const gw = await gateway(ctx);
    const rec = encodeBatch(record('1700000000001', MCUS));
    await gw.publishAsync(deviceTopic(GW, 'batch'), rec, { qos: 1 });
    await settle(gw, op.seen, '1700000000002');
    assert.equal(op.seen.length, 51);
    assert.equal(await metric(hub, 'fleet_hub_batch_items_total{result="routed"}'), 50);
    // the record's mid and the sentinel's, both in the gateway's window; nothing per MCU
    assert.equal(await metric(hub, 'fleet_hub_dedup_devices'), 1);
    assert.equal(await metric(hub, 'fleet_hub_dedup_mids'), 2);
    assert.equal(hub.registry.get('esp-7')?.telemetryBatches, 1, 'the hub’s own consumer saw each item once');

    // the gateway resends it (its PUBACK was lost): nothing reaches anyone
    await gw.publishAsync(deviceTopic(GW, 'batch'), rec, { qos: 1 });
    await settle(gw, op.seen, '1700000000003');
    assert.equal(op.seen.length, 52, 'only the second sentinel arrived');
    assert.equal(await metric(hub, 'fleet_hub_duplicates_total'), 50);
    assert.equal(await metric(hub, 'fleet_hub_batch_items_total{result="duplicate"}'), 50);
    assert.equal(hub.registry.get('esp-7')?.duplicates, 1, 'duplicates are counted per MCU');
    assert.equal(hub.registry.get('esp-7')?.telemetryBatches, 1);
    await gw.endAsync();
    await op.client.endAsync();
  });
});

test('records: records and plain items share one publish (as the uplink sends them); a denied item is dead-lettered once', async () => {
  await withHub(async (hub, ctx) => {
    const op = await consumer(ctx);
    const gw = await gateway(ctx);
    const stranger = mcuItem('esp-not-registered', '1700000000010001');
    const publish = encodeBatch([
      recordMarker('1700000000010', 2), // esp-1's item and the stranger's
      mcuItem('esp-1', '1700000000010000'),
      stranger,
      ...record('1700000000011', ['esp-2', 'esp-3']),
      mcuItem('esp-4', '1700000000012'), // a plain record: judged on its own, in esp-4's window
    ]);
    await gw.publishAsync(deviceTopic(GW, 'batch'), publish, { qos: 1 });
    await settle(gw, op.seen, '1700000000013');
    assert.deepEqual(op.seen.slice(0, 4), [
      `${deviceTopic('esp-1', 'telemetry')} 1700000000010000`,
      `${deviceTopic('esp-2', 'telemetry')} 1700000000011000`,
      `${deviceTopic('esp-3', 'telemetry')} 1700000000011001`,
      `${deviceTopic('esp-4', 'telemetry')} 1700000000012`,
    ]);
    assert.equal(await metric(hub, 'fleet_hub_acl_denied_total{action="publish"}'), 1);
    assert.equal((await deadLetters(ctx)).records, 1);
    assert.equal(await metric(hub, 'fleet_hub_dedup_devices'), 2, 'the gateway, and esp-4 for its plain record');

    await gw.publishAsync(deviceTopic(GW, 'batch'), publish, { qos: 1 });
    await settle(gw, op.seen, '1700000000014');
    assert.equal(op.seen.length, 6, 'the resend routed nothing');
    assert.equal(await metric(hub, 'fleet_hub_batch_items_total{result="duplicate"}'), 5, 'both records whole (2 + 2 items) and the plain item');
    assert.equal((await deadLetters(ctx)).records, 1, 'the denied item of a duplicate record is not dead-lettered again');
    await gw.endAsync();
    await op.client.endAsync();
  });
});

test('records: a marker that cannot be trusted is dead-lettered and the items after it are judged one by one (nothing lost)', async () => {
  await withHub(async (hub, ctx) => {
    const op = await consumer(ctx);
    const gw = await gateway(ctx);
    const items = [
      recordMarker('1700000000020', 5), // claims 5 items, 2 follow
      mcuItem('esp-1', '1700000000020000'),
      mcuItem('esp-2', '1700000000020001'),
    ];
    const garbled = [{ topic: RECORD_TOPIC, payload: Buffer.from('{"v":1,"mid":"x"}') }, mcuItem('esp-3', '1700000000021000')];
    await gw.publishAsync(deviceTopic(GW, 'batch'), encodeBatch([...garbled, ...items]), { qos: 1 });
    await settle(gw, op.seen, '1700000000022');
    assert.equal(op.seen.length, 4, 'the three items and the sentinel');
    assert.equal(await metric(hub, 'fleet_hub_batch_items_total{result="invalid"}'), 2);
    assert.equal(await metric(hub, 'fleet_hub_messages_invalid_total{channel="batch"}'), 2);
    assert.equal((await deadLetters(ctx)).records, 2);
    // judged per item, so a resend is still caught, in each MCU's window
    await gw.publishAsync(deviceTopic(GW, 'batch'), encodeBatch([...garbled, ...items]), { qos: 1 });
    await settle(gw, op.seen, '1700000000023');
    assert.equal(op.seen.length, 5);
    assert.equal(await metric(hub, 'fleet_hub_batch_items_total{result="duplicate"}'), 3);
    await gw.endAsync();
    await op.client.endAsync();
  });
});

test('records: when some items of a record were not routed (hub closing), the record’s mid is forgotten and its routed items are remembered each (real LevelDB)', async () => {
  const tmp = tempDir();
  try {
    const db = await openStore<string>(join(tmp.dir, 'dedup'), 'utf8');
    const dedup = await Deduplicator.open(db, { window: 64, log: testLogger('dedup') });
    const item = (deviceId: string, mid: string): RouteItem => ({ topic: deviceTopic(deviceId, 'telemetry'), deviceId, channel: 'telemetry', payload: Buffer.alloc(0), qos: 1, pending: null, record: null, mid, ok: false });

    // all routed: the record's mid stands for its items
    const whole = new RecordRoute(dedup.admitPending(GW, '100')!, dedup);
    const a = [item('esp-1', '100000'), item('esp-2', '100001')];
    for (const it of a) whole.expect(it);
    whole.sealed();
    for (const it of a) {
      it.ok = true;
      whole.settled();
    }
    assert.ok(dedup.seen(GW, '100'));
    assert.ok(!dedup.seen('esp-1', '100000'), 'no per-MCU window for a whole record');

    // one failed: the resend must pass, and drop what was routed already
    const half = new RecordRoute(dedup.admitPending(GW, '101')!, dedup);
    const b = [item('esp-1', '101000'), item('esp-2', '101001'), item('esp-3', '101002')];
    for (const it of b) half.expect(it);
    half.sealed();
    b[0]!.ok = true;
    half.settled();
    half.settled(); // b[1]: its publish failed
    b[2]!.ok = true;
    half.settled();
    assert.ok(!dedup.seen(GW, '101'), 'the record passes when resent');
    assert.ok(dedup.seen('esp-1', '101000') && dedup.seen('esp-3', '101002'), 'its routed items are caught one by one');
    assert.ok(!dedup.seen('esp-2', '101001'), 'the failed item is routed on the resend');

    // a record with nothing to route (all denied) is settled when sealed
    const empty = new RecordRoute(dedup.admitPending(GW, '102')!, dedup);
    empty.sealed();
    await dedup.close();
    await db.close();
    const db2 = await openStore<string>(join(tmp.dir, 'dedup'), 'utf8');
    const again = await Deduplicator.open(db2, { window: 64, log: testLogger('dedup') });
    assert.ok(again.seen(GW, '100') && again.seen(GW, '102') && !again.seen(GW, '101'), 'confirmed record mids survive a restart, the forgotten one does not');
    assert.ok(again.seen('esp-1', '101000'));
    await again.close();
    await db2.close();
  } finally {
    tmp.cleanup();
  }
});

test('records: a resent record counts its duplicates for devices the sender may publish for only (a marker cannot charge another device’s count)', async () => {
  await withHub(async (hub, ctx) => {
    const victim = await connectDevice(ctx, 'agent-victim');
    const gw = await gateway(ctx);
    const forged = encodeBatch([recordMarker('42', 5), ...Array.from({ length: 5 }, (_, k) => ({ topic: deviceTopic('agent-victim', 'telemetry'), payload: telemetry(`42${String(k).padStart(3, '0')}`) }))]);
    for (let i = 0; i < 3; i++) await gw.publishAsync(deviceTopic(GW, 'batch'), forged, { qos: 1 });
    assert.equal(await metric(hub, 'fleet_hub_acl_denied_total{action="publish"}'), 5, 'refused by the ACL the first time');
    assert.equal(hub.registry.get('agent-victim')?.duplicates ?? 0, 0);
    assert.equal(hub.registry.get(GW)?.duplicates, 10, 'the two resends, counted for the sender');
    await gw.endAsync();
    await victim.endAsync();
  });
});

/**
 * Hold the hub's durable-queue writes of MCU telemetry (aedes-persistence-level's
 * outgoingEnqueueCombi) until `release`: routing to a durable consumer waits for them, so a
 * record's first copy stays "being routed" as long as the test wants. `release(err)` fails
 * them as a full disk would. A fault injected into the real store.
 */
function holdQueueWrites(): { held: () => number; release: (err?: Error) => void; restore: () => void } {
  let resolve!: () => void;
  let gate: { promise: Promise<void>; resolve: () => void; err?: Error } | null = { promise: new Promise<void>((r) => (resolve = r)), resolve };
  let held = 0;
  const restore = patchStore('outgoingEnqueueCombi', (enqueue) =>
    async function (this: unknown, ...args: unknown[]) {
      const g = gate;
      if (g !== null && /^fleet\/v1\/d\/esp-/.test((args[1] as { topic: string }).topic)) {
        held++;
        await g.promise;
        if (g.err) throw g.err;
      }
      return enqueue.apply(this, args);
    },
  );
  return {
    held: () => held,
    release: (err) => {
      const g = gate;
      if (g === null) return;
      gate = null;
      g.err = err;
      g.resolve();
    },
    restore,
  };
}

/** Publish and note how it ended: 'acked' (PUBACK), 'failed' (an error, or the connection closed first). */
function publishTracked(c: MqttClient, topic: string, payload: Buffer): { state: () => 'waiting' | 'acked' | 'failed' } {
  let state: 'waiting' | 'acked' | 'failed' = 'waiting';
  c.publish(topic, payload, { qos: 1 }, (err) => {
    if (state === 'waiting') state = err ? 'failed' : 'acked';
  });
  c.once('close', () => {
    if (state === 'waiting') state = 'failed';
  });
  return { state: () => state };
}

for (const outcome of ['routed', 'failed'] as const) {
  test(`records: a resend arriving while the first copy is still being routed is acknowledged only after it, and ${outcome === 'routed' ? 'then as a duplicate (counted)' : 'not at all when that routing failed (store write failed, injected): the next resend passes, and no duplicate is counted'}`, async () => {
    const hold = holdQueueWrites();
    try {
      await withHub(async (hub, ctx) => {
        // a failed assertion must not leave routing held: the hub's stop waits for it
        try {
          await resendDuringRouting(hub, ctx, hold, outcome);
          // the resend counts as a duplicate only if its first copy was routed: else it was
          // refused as well, and the copy after it went through as the first one routed
          assert.equal(await metric(hub, 'fleet_hub_duplicates_total'), outcome === 'routed' ? 3 : 0);
          for (const m of MCUS.slice(0, 3)) assert.equal(hub.registry.get(m)?.duplicates ?? 0, outcome === 'routed' ? 1 : 0, m);
        } finally {
          hold.release();
        }
      });
    } finally {
      hold.restore();
    }
  });
}

async function resendDuringRouting(hub: HubHandle, ctx: HubCtx, hold: ReturnType<typeof holdQueueWrites>, outcome: 'routed' | 'failed'): Promise<void> {
  // a durable consumer: routing its messages waits for their queue writes (held)
  const ops = await connect(ctx.url, 'ops-durable', 'operator', ctx.operator, { clean: false });
  const seen: string[] = [];
  ops.on('message', (topic, payload) => seen.push(`${topic} ${(JSON.parse(payload.toString()) as { mid: string }).mid}`));
  await ops.subscribeAsync('fleet/v1/d/+/telemetry', { qos: 1 });
  const rec = encodeBatch(record('700', MCUS.slice(0, 3)));
  const first = await gateway(ctx);
  const one = publishTracked(first, deviceTopic(GW, 'batch'), rec);
  await waitFor(() => hold.held() >= 1, 'the first copy held in routing');
  // the gateway comes back on a new connection (taking the session over) and resends it
  const second = await connectDevice(ctx, GW);
  const two = publishTracked(second, deviceTopic(GW, 'batch'), rec);
  // the hub has judged the resend: its three items counted as duplicates of the record in routing
  await waitFor(async () => (await metric(hub, 'fleet_hub_batch_items_total{result="duplicate"}')) === 3, 'the resend judged a duplicate');
  await new Promise((r) => setTimeout(r, 100));
  assert.equal(two.state(), 'waiting', 'no PUBACK for the resend while its first copy is being routed');
  if (outcome === 'routed') {
    hold.release();
    await waitFor(() => two.state() !== 'waiting', 'the resend answered');
    assert.equal(two.state(), 'acked');
  } else {
    hold.release(new Error('injected: no space left on device'));
    await waitFor(() => two.state() !== 'waiting', 'the resend answered');
    assert.equal(two.state(), 'failed', 'no PUBACK: the first copy was not routed, so the resend must come again');
    assert.notEqual(one.state(), 'acked');
    await new Promise((r) => setTimeout(r, 100));
    assert.deepEqual(seen, [], 'the first copy was not routed');
    const third = await connectDevice(ctx, GW);
    await third.publishAsync(deviceTopic(GW, 'batch'), rec, { qos: 1 });
    await third.endAsync();
  }
  const want = MCUS.slice(0, 3).map((m, k) => `${deviceTopic(m, 'telemetry')} 700${String(k).padStart(3, '0')}`);
  await waitFor(() => want.every((w) => seen.includes(w)), 'every item at the consumer');
  await new Promise((r) => setTimeout(r, 100));
  assert.deepEqual([...seen].sort(), want, 'each item once');
  await Promise.all([first, second, ops].map((c) => c.endAsync(true)));
}
