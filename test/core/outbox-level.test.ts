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


/** Hold the store's batch writes until released (or failed): the write the outbox is in the middle of. */
function gateBatches(ob: LevelOutbox) {
  const db = (ob as unknown as { db: { _batch: (ops: unknown[], o: { sync: boolean }) => Promise<void> } }).db;
  const real = db._batch.bind(db);
  const held: Array<{ sync: boolean; go: () => void; fail: (e: Error) => void }> = [];
  let holding = true;
  db._batch = (ops, o) => {
    if (!holding) return real(ops, o);
    return new Promise<void>((resolve, reject) => held.push({ sync: o.sync, go: () => real(ops, o).then(resolve, reject), fail: reject }));
  };
  return { held, release: () => (holding = false) };
}

test('LevelOutbox: a record is peekable while its synced write is in flight; its append resolves only after the write, and a failed write takes it back', async () => {
  const tmp = tempDir();
  try {
    const ob = await LevelOutbox.open(tmp.dir, { minFreeBytes: 0 });
    const gate = gateBatches(ob);
    let appended = 0;
    ob.on('appended', () => appended++);
    let resolved = false;
    const a = ob.append({ topic: 't', priority: Priority.TELEMETRY, payload: Buffer.from('a') }).then((r) => ((resolved = true), r));
    await waitFor(() => gate.held.length === 1, 'the write of the first append', 5000);
    assert.equal(gate.held[0]!.sync, true, 'an append is a synced write');
    assert.equal(appended, 1, "'appended' is emitted before the write");
    const seen = await ob.peek(10);
    assert.deepEqual(seen.map((r) => r.payload.toString()), ['a'], 'peekable while its write is in flight');
    assert.equal(resolved, false, 'the append has not resolved: its write is not done');
    // the consumer acks it before the write finished (a fast hub): the delete follows the write
    const ack = ob.ack([seen[0]!.id]);
    gate.held.shift()!.go();
    const rec = await a;
    assert.equal(rec.id, seen[0]!.id);
    await waitFor(() => gate.held.length === 1, 'the ack write', 5000);
    gate.held.shift()!.go();
    await ack;
    assert.deepEqual(await ob.peek(10), [], 'acked');
    assert.equal(ob.stats().depth, 0);

    // a failed write: the append rejects and its record is no longer shown
    const b = ob.append({ topic: 't', priority: Priority.TELEMETRY, payload: Buffer.from('b') });
    await waitFor(() => gate.held.length === 1, 'the write of the second append', 5000);
    assert.deepEqual((await ob.peek(10)).map((r) => r.payload.toString()), ['b']);
    gate.held.shift()!.fail(new Error('disk on fire'));
    await assert.rejects(b, (e: Error & { code?: string }) => e.code === 'FLEET_STORE' && /disk on fire/.test(e.message));
    assert.deepEqual(await ob.peek(10), [], 'a record whose write failed is not shown');
    assert.equal(ob.stats().depth, 0);
    gate.release();
    await ob.close();
  } finally {
    tmp.cleanup();
  }
});

test('LevelOutbox: syncIntervalMs holds a synced batch open: what arrives meanwhile is peekable at once and shares the next write, an ack of a held record means it is never stored; close writes it at once', async () => {
  const tmp = tempDir();
  try {
    const ob = await LevelOutbox.open(tmp.dir, { minFreeBytes: 0, syncIntervalMs: 60_000 });
    const gate = gateBatches(ob);
    gate.release(); // count only
    const db = (ob as unknown as { db: { _batch: (ops: unknown[], o: { sync: boolean }) => Promise<void> } }).db;
    const inner = db._batch;
    let synced = 0;
    db._batch = (ops, o) => {
      if (o.sync) synced++;
      return inner(ops, o);
    };
    // the first append after idle is written at once: no fsync for 60 s before it
    const first = await ob.append({ topic: 't', priority: Priority.TELEMETRY, payload: Buffer.from('first') });
    assert.equal(synced, 1);
    // the next ones wait for the interval, but a reader sees them now
    const later = [1, 2, 3].map((i) => ob.append({ topic: 't', priority: Priority.TELEMETRY, payload: Buffer.from(`n${i}`) }));
    let settled = 0;
    for (const p of later) void p.then(() => settled++, () => settled++);
    await waitFor(async () => (await ob.peek(10)).length === 4, 'the held records peekable', 5000);
    await new Promise((r) => setTimeout(r, 200));
    assert.equal(settled, 0, 'held: their fsync is not due yet');
    assert.equal(synced, 1);
    const more = ob.append({ topic: 't', priority: Priority.ALERT, payload: Buffer.from('alert') });
    await waitFor(async () => (await ob.peek(1))[0]?.payload.toString() === 'alert', 'an alert that joined the held batch, first in peek', 5000);
    // a held record sent and acked before its batch is written (a fast hub): never stored
    const n2 = (await ob.peek(10)).find((r) => r.payload.toString() === 'n2')!;
    const acked = ob.ack([n2.id]);
    await waitFor(async () => !(await ob.peek(10)).some((r) => r.id === n2.id), 'the acked held record hidden', 5000);
    await ob.close();
    const recs = await Promise.all([...later, more]);
    await acked;
    assert.equal(synced, 2, 'everything held went in one synced write, at close');
    assert.equal(ob.stats().depth, 4);
    const reopened = await LevelOutbox.open(tmp.dir, { minFreeBytes: 0 });
    assert.deepEqual((await reopened.peek(10)).map((r) => r.id), [recs[3]!.id, first.id, recs[0]!.id, recs[2]!.id], 'all stored but the acked one, in order');
    assert.equal(reopened.stats().depth, 4);
    await reopened.close();
  } finally {
    tmp.cleanup();
  }
});
