import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { createInterface } from 'node:readline';
import { Level } from 'level';
import mqtt from 'mqtt';
import { deriveToken } from '../../core/credentials.ts';
import { connectFleetClient } from '../../core/mqtt.ts';
import { LevelOutbox } from '../../core/outbox-level.ts';
import { Priority, type Outbox } from '../../core/outbox.ts';
import { Uplink } from '../../core/uplink.ts';
import { HubConfigSchema } from '../../hub/config.ts';
import { startHub } from '../../hub/index.ts';
import { tempDir, testLogger, waitFor } from '../helpers.ts';

async function drainAll(outbox: Outbox): Promise<string[]> {
  const ids: string[] = [];
  for (;;) {
    const batch = await outbox.peek(1000);
    if (batch.length === 0) return ids;
    ids.push(...batch.map((r) => r.id));
    await outbox.ack(batch.map((r) => r.id));
  }
}

test('LevelOutbox: records, counts and the id sequence survive a reopen; ids keep rising after a full drain', async () => {
  const tmp = tempDir();
  try {
    let ob = await LevelOutbox.open(tmp.dir, { minFreeBytes: 0 });
    const first = await Promise.all(Array.from({ length: 30 }, (_, i) => ob.append({ topic: 't', priority: (i % 3) as Priority, payload: Buffer.from(`p${i}`) })));
    await ob.close();
    ob = await LevelOutbox.open(tmp.dir, { minFreeBytes: 0 });
    assert.equal(ob.stats().depth, 30);
    assert.deepEqual(ob.stats().depthByClass, { alert: 10, telemetry: 10, log: 10 });
    const ids = await drainAll(ob);
    assert.deepEqual([...ids].sort(), first.map((r) => r.id).sort());
    const last = BigInt(first.at(-1)!.id);
    await ob.close();
    ob = await LevelOutbox.open(tmp.dir, { minFreeBytes: 0 });
    assert.equal(ob.stats().depth, 0);
    const next = await ob.append({ topic: 't', priority: Priority.LOG, payload: Buffer.from('x') });
    assert.ok(BigInt(next.id) > last, 'ids never go back, even after everything was acked');
    await ob.close();
  } finally {
    tmp.cleanup();
  }
});

test('LevelOutbox: a corrupted record on disk is skipped with a corrupt event; everything else is delivered', async () => {
  const tmp = tempDir();
  try {
    let ob = await LevelOutbox.open(tmp.dir, { minFreeBytes: 0 });
    const recs = [];
    for (let i = 0; i < 10; i++) recs.push(await ob.append({ topic: 'fleet/v1/d/x/telemetry', priority: Priority.TELEMETRY, payload: Buffer.from(`{"n":${i}}`) }));
    await ob.close();
    // flip one byte of one stored record, the way a bad sector or a torn write would
    const raw = new Level<string, Buffer>(tmp.dir, { valueEncoding: 'buffer' });
    const victimKey = `r1${BigInt(recs[4]!.id).toString(16).padStart(16, '0')}`;
    const v = await raw.get(victimKey);
    assert.ok(v, 'the record is where the key layout says');
    v[v.length - 2] ^= 0xff;
    await raw.put(victimKey, v);
    await raw.close();

    ob = await LevelOutbox.open(tmp.dir, { minFreeBytes: 0 });
    const corrupt: Array<{ id: string; reason: string }> = [];
    ob.on('corrupt', (e) => corrupt.push(e));
    const ids = await drainAll(ob);
    assert.deepEqual(ids, recs.filter((_, i) => i !== 4).map((r) => r.id));
    assert.deepEqual(corrupt.map((c) => [c.id, c.reason]), [[recs[4]!.id, 'checksum mismatch']]);
    await waitFor(() => ob.stats().corrupt === 1 && ob.stats().depth === 0, 'damaged record removed and counted');
    await ob.close();
  } finally {
    tmp.cleanup();
  }
});

test('LevelOutbox: low disk space makes new records evict old ones by policy; alerts still go in', async () => {
  const tmp = tempDir();
  try {
    let free = 1 << 30;
    let t = 0;
    const ob = await LevelOutbox.open(tmp.dir, { maxBytes: 1 << 20, minFreeBytes: 1 << 20, freeBytes: () => free, now: () => (t += 2000) });
    const evictions: Array<{ byClass: Record<string, number> }> = [];
    ob.on('evicted', (e) => evictions.push(e));
    for (let i = 0; i < 5; i++) await ob.append({ topic: 'l', priority: Priority.LOG, payload: Buffer.alloc(99) });
    for (let i = 0; i < 5; i++) await ob.append({ topic: 't', priority: Priority.TELEMETRY, payload: Buffer.alloc(99) });
    assert.equal(evictions.length, 0);
    free = 1000; // the file system is nearly full: hold at what is stored
    for (let i = 0; i < 7; i++) await ob.append({ topic: 'a', priority: Priority.ALERT, payload: Buffer.alloc(99) });
    const s = ob.stats();
    assert.deepEqual(s.depthByClass, { alert: 7, telemetry: 3, log: 0 }, 'logs first, then the oldest telemetry');
    assert.equal(s.bytes, 1000);
    assert.equal(evictions.reduce((a, e) => a + (e.byClass.log ?? 0), 0), 5);
    await ob.close();
  } finally {
    tmp.cleanup();
  }
});

test('LevelOutbox: kill -9 of the writer during a flood loses nothing whose append had returned; all of it reaches a consumer at the hub', { timeout: 120_000 }, async (t) => {
  const tmp = tempDir();
  t.after(() => tmp.cleanup()); // also when the flood phase fails before the hub starts
  const store = `${tmp.dir}/outbox`;
  const child = spawn(process.execPath, ['--import', 'tsx', 'test/fixtures/outbox-flood.ts', store], { stdio: ['ignore', 'pipe', 'inherit'] });
  const returned: string[] = [];
  let ready = false;
  t.after(() => void child.kill('SIGKILL'));
  createInterface({ input: child.stdout }).on('line', (l) => (l === 'ready' ? (ready = true) : returned.push(l)));
  await waitFor(() => ready && returned.length >= 2000, 'the flood under way', 100_000);
  child.kill('SIGKILL');
  await new Promise((r) => child.once('exit', r));
  assert.ok(returned.length >= 2000);

  const hub = await startHub(HubConfigSchema.parse({ mqttPort: 0, httpPort: 0, stateDir: `${tmp.dir}/hub` }), testLogger('hub'));
  const url = `mqtt://127.0.0.1:${hub.mqttPort}`;
  const seen = new Set<string>();
  const consumer = await mqtt.connectAsync(url, { username: 'operator', password: readFileSync(hub.operatorTokenFile, 'utf8').trim(), reconnectPeriod: 0 });
  await consumer.subscribeAsync('fleet/v1/d/flood/+', { qos: 1 });
  consumer.on('message', (_t, p) => seen.add((JSON.parse(p.toString()) as { mid: string }).mid));
  const outbox = await LevelOutbox.open(store, { minFreeBytes: 0 });
  const client = connectFleetClient({ url, deviceId: 'flood', token: deriveToken(readFileSync(hub.fleetSecretFile, 'utf8').trim(), 'device', 'flood'), kind: 'agent', version: '1', keepalive: 10 });
  const uplink = new Uplink({ client, outbox, log: testLogger(), deviceId: 'flood', rate: 0, batchDelayMs: 0 });
  try {
    await waitFor(() => outbox.stats().depth === 0, 'outbox drained into the hub', 60_000);
    const missing = returned.filter((id) => !seen.has(id));
    assert.deepEqual(missing.slice(0, 10), [], `${missing.length} of ${returned.length} returned appends never reached the consumer`);
  } finally {
    uplink.stop();
    await client.endAsync(true);
    await consumer.endAsync(true);
    await outbox.close();
    await hub.stop();
    tmp.cleanup();
  }
});

