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
import { cleanups, tempDir, testLogger, waitFor } from '../helpers.ts';

/** The cleanup of one opened store (that store, not what a variable holds when the test ends): close() of a closed store returns at once. */
const closeOf = (ob: LevelOutbox) => () => ob.close();

async function drainAll(outbox: Outbox): Promise<string[]> {
  const ids: string[] = [];
  for (;;) {
    const batch = await outbox.peek(1000);
    if (batch.length === 0) return ids;
    ids.push(...batch.map((r) => r.id));
    await outbox.ack(batch.map((r) => r.id));
  }
}

test('LevelOutbox: records, counts and the id sequence survive a reopen; ids keep rising after a full drain', async (t) => {
  const defer = cleanups(t);
  const tmp = tempDir();
  defer(tmp.cleanup);
  let ob = await LevelOutbox.open(tmp.dir, { minFreeBytes: 0 });
  defer(closeOf(ob));
  const first = await Promise.all(Array.from({ length: 30 }, (_, i) => ob.append({ topic: 't', priority: (i % 3) as Priority, payload: Buffer.from(`p${i}`) })));
  await ob.close();
  ob = await LevelOutbox.open(tmp.dir, { minFreeBytes: 0 });
  defer(closeOf(ob));
  assert.equal(ob.stats().depth, 30);
  assert.deepEqual(ob.stats().depthByClass, { alert: 10, telemetry: 10, log: 10 });
  const ids = await drainAll(ob);
  assert.deepEqual([...ids].sort(), first.map((r) => r.id).sort());
  const last = BigInt(first.at(-1)!.id);
  await ob.close();
  ob = await LevelOutbox.open(tmp.dir, { minFreeBytes: 0 });
  defer(closeOf(ob));
  assert.equal(ob.stats().depth, 0);
  const next = await ob.append({ topic: 't', priority: Priority.LOG, payload: Buffer.from('x') });
  assert.ok(BigInt(next.id) > last, 'ids never go back, even after everything was acked');
  await ob.close();
});

test('LevelOutbox: a record whose payload a writer wrote into its stored form reads back the same after a reopen (checksum included)', async (t) => {
  const defer = cleanups(t);
  const tmp = tempDir();
  defer(tmp.cleanup);
  let ob = await LevelOutbox.open(tmp.dir, { minFreeBytes: 0 });
  defer(closeOf(ob));
  const written = [];
  for (let i = 0; i < 5; i++) {
    const text = `{"n":${i},"x":"${'ü'.repeat(i * 300)}"}`;
    written.push(await ob.append({ topic: `fleet/v1/d/gw-${i}/batch`, priority: Priority.TELEMETRY, payload: () => ({ size: Buffer.byteLength(text), write: (buf: Buffer, off: number) => off + buf.write(text, off, 'utf8') }) }));
  }
  await ob.close();
  ob = await LevelOutbox.open(tmp.dir, { minFreeBytes: 0, tailBytes: 0 });
  defer(closeOf(ob));
  const read = await ob.peek(10);
  assert.deepEqual(
    read.map((r) => [r.id, r.topic, r.payload.toString()]),
    written.map((r) => [r.id, r.topic, r.payload.toString()]),
  );
  assert.equal(ob.stats().corrupt, 0);
  await ob.close();
});

test('LevelOutbox: a corrupted record on disk is skipped with a corrupt event; everything else is delivered', async (t) => {
  const defer = cleanups(t);
  const tmp = tempDir();
  defer(tmp.cleanup);
  let ob = await LevelOutbox.open(tmp.dir, { minFreeBytes: 0 });
  defer(closeOf(ob));
  const recs = [];
  for (let i = 0; i < 10; i++) recs.push(await ob.append({ topic: 'fleet/v1/d/x/telemetry', priority: Priority.TELEMETRY, payload: Buffer.from(`{"n":${i}}`) }));
  await ob.close();
  // flip one byte of one stored record, the way a bad sector or a torn write would
  const raw = new Level<string, Buffer>(tmp.dir, { valueEncoding: 'buffer' });
  defer(() => raw.close()); // close() of a closed db returns at once
  const victimKey = `r1${BigInt(recs[4]!.id).toString(16).padStart(16, '0')}`;
  const v = await raw.get(victimKey);
  assert.ok(v, 'the record is where the key layout says');
  v[v.length - 2] ^= 0xff;
  await raw.put(victimKey, v);
  await raw.close();

  ob = await LevelOutbox.open(tmp.dir, { minFreeBytes: 0 });
  defer(closeOf(ob));
  const corrupt: Array<{ id: string; reason: string }> = [];
  ob.on('corrupt', (e) => corrupt.push(e));
  const ids = await drainAll(ob);
  assert.deepEqual(ids, recs.filter((_, i) => i !== 4).map((r) => r.id));
  assert.deepEqual(corrupt.map((c) => [c.id, c.reason]), [[recs[4]!.id, 'checksum mismatch']]);
  await waitFor(() => ob.stats().corrupt === 1 && ob.stats().depth === 0, 'damaged record removed and counted');
  await ob.close();
});

test('LevelOutbox: a disk read error after a commit (the heads of a backlog not in memory) is a fault event, not the end of the process; nothing is lost and the next writes read again (disk error injected into the iterator)', async (t) => {
  const defer = cleanups(t);
  const tmp = tempDir();
  defer(tmp.cleanup);
  const exits: unknown[] = [];
  const onUnhandled = (err: unknown) => exits.push(err);
  process.on('unhandledRejection', onUnhandled);
  defer(() => process.off('unhandledRejection', onUnhandled));
  // tailBytes 0: the backlog is not in memory, so every commit reads the heads from LevelDB
  const ob = await LevelOutbox.open(tmp.dir, { minFreeBytes: 0, tailBytes: 0 });
  defer(closeOf(ob));
  const faults: Array<{ op: string; reason: string }> = [];
  ob.on('fault', (e) => faults.push(e));
  const first = await ob.append({ topic: 'fleet/v1/d/x/telemetry', priority: Priority.TELEMETRY, payload: Buffer.from('a') });
  const db = (ob as unknown as { db: { iterator: (o: unknown) => unknown } }).db;
  const real = db.iterator.bind(db);
  const failing = () => ({
    next: () => Promise.reject(Object.assign(new Error('IO error: read failed (injected)'), { code: 'LEVEL_IO_ERROR' })),
    close: async () => undefined,
    [Symbol.asyncIterator]() {
      return { next: () => Promise.reject(new Error('IO error: read failed (injected)')), return: async () => ({ done: true, value: undefined }) };
    },
  });
  db.iterator = failing;
  defer(() => void (db.iterator = real)); // the store reads again before it is closed
  const second = await ob.append({ topic: 'fleet/v1/d/x/telemetry', priority: Priority.TELEMETRY, payload: Buffer.from('b') });
  await waitFor(() => faults.length > 0, 'the fault reported');
  assert.equal(faults[0]!.op, 'heads');
  assert.match(faults[0]!.reason, /read failed/);
  // the disk reads again: writes go on, and everything appended is there
  db.iterator = real;
  const third = await ob.append({ topic: 'fleet/v1/d/x/telemetry', priority: Priority.TELEMETRY, payload: Buffer.from('c') });
  assert.deepEqual(await drainAll(ob), [first.id, second.id, third.id]);
  await new Promise((r) => setImmediate(r));
  assert.deepEqual(exits, [], 'no unhandled rejection');
  await ob.close();
});

test('LevelOutbox: low disk space makes new records evict old ones by policy; alerts still go in', async (ctx) => {
  const defer = cleanups(ctx);
  const tmp = tempDir();
  defer(tmp.cleanup);
  let free = 1 << 30;
  let t = 0;
  const ob = await LevelOutbox.open(tmp.dir, { maxBytes: 1 << 20, minFreeBytes: 1 << 20, freeBytes: () => free, now: () => (t += 2000) });
  defer(closeOf(ob));
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
});

test('LevelOutbox: kill -9 of the writer during a flood loses nothing whose append had returned; all of it reaches a consumer at the hub', { timeout: 120_000 }, async (t) => {
  const defer = cleanups(t);
  const tmp = tempDir();
  defer(tmp.cleanup); // also when the flood phase fails before the hub starts
  const store = `${tmp.dir}/outbox`;
  const child = spawn(process.execPath, ['--import', 'tsx', 'test/fixtures/outbox-flood.ts', store], { stdio: ['ignore', 'pipe', 'inherit'] });
  defer(() => void child.kill('SIGKILL'));
  const returned: string[] = [];
  let ready = false;
  createInterface({ input: child.stdout }).on('line', (l) => (l === 'ready' ? (ready = true) : returned.push(l)));
  await waitFor(() => ready && returned.length >= 2000, 'the flood under way', 100_000);
  child.kill('SIGKILL');
  await new Promise((r) => child.once('exit', r));
  assert.ok(returned.length >= 2000);

  const hub = await startHub(HubConfigSchema.parse({ mqttPort: 0, httpPort: 0, stateDir: `${tmp.dir}/hub` }), testLogger('hub'));
  defer(() => hub.stop());
  const url = `mqtt://127.0.0.1:${hub.mqttPort}`;
  const seen = new Set<string>();
  const consumer = await mqtt.connectAsync(url, { username: 'operator', password: readFileSync(hub.operatorTokenFile, 'utf8').trim(), reconnectPeriod: 0 });
  defer(() => consumer.endAsync(true));
  await consumer.subscribeAsync('fleet/v1/d/flood/+', { qos: 1 });
  consumer.on('message', (_t, p) => seen.add((JSON.parse(p.toString()) as { mid: string }).mid));
  const outbox = await LevelOutbox.open(store, { minFreeBytes: 0 });
  defer(closeOf(outbox));
  const client = connectFleetClient({ url, deviceId: 'flood', token: deriveToken(readFileSync(hub.fleetSecretFile, 'utf8').trim(), 'device', 'flood'), kind: 'agent', version: '1', keepalive: 10 });
  defer(() => client.endAsync(true));
  const uplink = new Uplink({ client, outbox, log: testLogger(), deviceId: 'flood', rate: 0, batchDelayMs: 0 });
  defer(() => uplink.stop());
  await waitFor(() => outbox.stats().depth === 0, 'outbox drained into the hub', 60_000);
  const missing = returned.filter((id) => !seen.has(id));
  assert.deepEqual(missing.slice(0, 10), [], `${missing.length} of ${returned.length} returned appends never reached the consumer`);
});

/** Hold the store's batch writes until released (or failed): the write the outbox is in the middle of. Counts synced writes. */
function gateBatches(ob: LevelOutbox) {
  const db = (ob as unknown as { db: { _batch: (ops: unknown[], o: { sync: boolean }) => Promise<void> } }).db;
  const real = db._batch.bind(db);
  const held: Array<{ sync: boolean; go: () => void; fail: (e: Error) => void }> = [];
  let holding = true;
  const gate = {
    held,
    synced: 0,
    release: () => (holding = false),
    /** for the test's cleanup: writes pass again and those held go through (a store with a write held would never close) */
    end: () => {
      holding = false;
      for (const h of held.splice(0)) h.go();
    },
  };
  db._batch = (ops, o) => {
    if (o.sync) gate.synced++;
    if (!holding) return real(ops, o);
    return new Promise<void>((resolve, reject) => held.push({ sync: o.sync, go: () => real(ops, o).then(resolve, reject), fail: reject }));
  };
  return gate;
}

test('LevelOutbox: a record is peekable while its synced write is in flight; its append resolves only after the write, and a failed write takes it back (LevelDB writes held by the test, a write failure injected)', async (t) => {
  const defer = cleanups(t);
  const tmp = tempDir();
  defer(tmp.cleanup);
  const ob = await LevelOutbox.open(tmp.dir, { minFreeBytes: 0 });
  defer(closeOf(ob));
  // a fresh store's first record reserves ids on disk (it is shown once written): acked at once
  const first = await ob.append({ topic: 't', priority: Priority.TELEMETRY, payload: Buffer.from('first') });
  await ob.ack([first.id]);
  const gate = gateBatches(ob);
  defer(gate.end);
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
});

test('LevelOutbox: syncIntervalMs holds a synced batch open: what arrives meanwhile is peekable at once and shares the next write, an ack of a held record means it is never stored; close writes it at once (LevelDB writes counted and held by the test)', async (t) => {
  const defer = cleanups(t);
  const tmp = tempDir();
  defer(tmp.cleanup);
  const ob = await LevelOutbox.open(tmp.dir, { minFreeBytes: 0, syncIntervalMs: 60_000 });
  defer(closeOf(ob));
  const gate = gateBatches(ob);
  defer(gate.end);
  gate.release(); // count only
  // the first append after idle is written at once, not after the 60 s interval (30 s: a bound no slow machine reaches)
  const t0 = Date.now();
  const first = await ob.append({ topic: 't', priority: Priority.TELEMETRY, payload: Buffer.from('first') });
  assert.ok(Date.now() - t0 < 30_000, 'written without waiting for the interval');
  assert.equal(gate.synced, 1);
  // the next ones wait for the interval, but a reader sees them now
  const later = [1, 2, 3].map((i) => ob.append({ topic: 't', priority: Priority.TELEMETRY, payload: Buffer.from(`n${i}`) }));
  let settled = 0;
  for (const p of later) void p.then(() => settled++, () => settled++);
  await waitFor(async () => (await ob.peek(10)).length === 4, 'the held records peekable', 5000);
  await new Promise((r) => setTimeout(r, 200));
  assert.equal(settled, 0, 'held: their fsync is not due yet');
  assert.equal(gate.synced, 1);
  const more = ob.append({ topic: 't', priority: Priority.ALERT, payload: Buffer.from('alert') });
  await waitFor(async () => (await ob.peek(1))[0]?.payload.toString() === 'alert', 'an alert that joined the held batch, first in peek', 5000);
  // a held record sent and acked before its batch is written (a fast hub): never stored
  const n2 = (await ob.peek(10)).find((r) => r.payload.toString() === 'n2')!;
  const acked = ob.ack([n2.id]);
  await waitFor(async () => !(await ob.peek(10)).some((r) => r.id === n2.id), 'the acked held record hidden', 5000);
  const closing = Date.now();
  await ob.close();
  assert.ok(Date.now() - closing < 30_000, 'close writes the held batch at once, not after the 60 s interval');
  const recs = await Promise.all([...later, more]);
  await acked;
  assert.equal(gate.synced, 2, 'everything held went in one synced write, at close');
  assert.equal(ob.stats().depth, 4);
  const reopened = await LevelOutbox.open(tmp.dir, { minFreeBytes: 0 });
  defer(closeOf(reopened));
  assert.deepEqual((await reopened.peek(10)).map((r) => r.id), [recs[3]!.id, first.id, recs[0]!.id, recs[2]!.id], 'all stored but the acked one, in order');
  assert.equal(reopened.stats().depth, 4);
  await reopened.close();
});

test('LevelOutbox: records acked in a held batch do not make peek skip older stored records (read from disk) for the held newer ones', async (t) => {
  const defer = cleanups(t);
  const tmp = tempDir();
  defer(tmp.cleanup);
  let ob = await LevelOutbox.open(tmp.dir, { minFreeBytes: 0 });
  defer(closeOf(ob));
  const old: string[] = [];
  for (let i = 1; i <= 5; i++) old.push((await ob.append({ topic: 't', priority: Priority.TELEMETRY, payload: Buffer.from(`old${i}`) })).id);
  await ob.close();
  // tailBytes 0: every peek of stored records reads LevelDB
  ob = await LevelOutbox.open(tmp.dir, { minFreeBytes: 0, tailBytes: 0, syncIntervalMs: 60_000 });
  defer(closeOf(ob));
  await ob.append({ topic: 'l', priority: Priority.LOG, payload: Buffer.from('first') }); // written at once: what follows is held
  const held = [ob.ack(old.slice(0, 3)), ...[1, 2, 3].map((i) => ob.append({ topic: 't', priority: Priority.TELEMETRY, payload: Buffer.from(`new${i}`) }))];
  await waitFor(async () => (await ob.peek(10)).some((r) => r.payload.toString() === 'new3'), 'the held records peekable', 5000);
  for (let max = 1; max <= 6; max++) {
    const got = (await ob.peek(max)).map((r) => r.payload.toString());
    assert.deepEqual(got, ['old4', 'old5', 'new1', 'new2', 'new3', 'first'].slice(0, max), `peek(${max})`);
  }
  await ob.close();
  await Promise.all(held);
});

test('LevelOutbox: an id a reader may have seen is never handed out again — after a failed write, or after a crash while its record was held (LevelDB writes held by the test, a write failure injected)', async (t) => {
  const defer = cleanups(t);
  const tmp = tempDir();
  defer(tmp.cleanup);
  {
    const ob = await LevelOutbox.open(tmp.dir, { minFreeBytes: 0 });
    defer(closeOf(ob));
    // the first record of a fresh store moves the id reservation: shown only once written
    await ob.append({ topic: 't', priority: Priority.TELEMETRY, payload: Buffer.from('first') });
    const gate = gateBatches(ob);
    defer(gate.end);
    const a = ob.append({ topic: 't', priority: Priority.TELEMETRY, payload: Buffer.from('a') });
    await waitFor(() => gate.held.length === 1, 'the write of a', 5000);
    const seenA = (await ob.peek(10)).find((r) => r.payload.toString() === 'a');
    assert.ok(seenA, 'a is shown while its write is in flight');
    gate.held.shift()!.fail(new Error('disk on fire'));
    await assert.rejects(a);
    gate.release();
    const b = await ob.append({ topic: 't', priority: Priority.TELEMETRY, payload: Buffer.from('b') });
    assert.notEqual(b.id, seenA.id, 'a new record does not take the id of one a reader may have sent');
    // the late ack of what the reader sent under a's id must not delete b
    await ob.ack([seenA.id]);
    assert.deepEqual((await ob.peek(10)).map((r) => r.payload.toString()), ['first', 'b']);
    await ob.close();
  }

  // kill -9 while a record is held open (and was peeked): after the restart, ids go on above it.
  // Syncs 5 s apart: 'first' is written at once, 'second' at the next sync (the test's 5 s),
  // and 'held' not before 5 s after that, far longer than the parent needs to kill the child
  // once it printed (until November 2026 60 s, which made this test a minute long)
  const crash = tempDir();
  defer(crash.cleanup);
  {
    const script = `
      const { LevelOutbox } = await import(${JSON.stringify(new URL('../../core/outbox-level.ts', import.meta.url).pathname)});
      const ob = await LevelOutbox.open(${JSON.stringify(crash.dir)}, { minFreeBytes: 0, syncIntervalMs: 5000 });
      await ob.append({ topic: 't', priority: 1, payload: Buffer.from('first') });
      await ob.append({ topic: 't', priority: 1, payload: Buffer.from('second') });
      void ob.append({ topic: 't', priority: 1, payload: Buffer.from('held') });
      for (;;) {
        const recs = await ob.peek(10);
        const held = recs.find((r) => r.payload.toString() === 'held');
        if (held) { process.stdout.write(held.id + '\\n'); break; }
        await new Promise((r) => setTimeout(r, 10));
      }
      setInterval(() => {}, 1000);
    `;
    const child = spawn(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script], { stdio: ['ignore', 'pipe', 'inherit'] });
    defer(() => void child.kill('SIGKILL')); // it runs until killed
    const heldId = await new Promise<string>((resolve, reject) => {
      createInterface({ input: child.stdout! }).once('line', resolve);
      child.once('exit', (code) => reject(new Error(`child exited ${code} before peeking`)));
      setTimeout(() => reject(new Error('the child printed no held id within 60 s')), 60_000).unref();
    });
    child.kill('SIGKILL');
    await new Promise((r) => child.once('exit', r));
    const ob = await LevelOutbox.open(crash.dir, { minFreeBytes: 0 });
    defer(closeOf(ob));
    const next = await ob.append({ topic: 't', priority: Priority.TELEMETRY, payload: Buffer.from('after') });
    assert.ok(BigInt(next.id) > BigInt(heldId), `the id after the restart (${next.id}) is above the one a reader saw (${heldId})`);
    assert.deepEqual((await ob.peek(10)).map((r) => r.payload.toString()), ['first', 'second', 'after'], 'the held record was never written; the rest is');
    await ob.close();
  }
});

test('LevelOutbox: an append refused after evicting part of the room it needed keeps every stored record visible (stats and peek agree)', async (t) => {
  const defer = cleanups(t);
  const tmp = tempDir();
  defer(tmp.cleanup);
  const ob = await LevelOutbox.open(tmp.dir, { minFreeBytes: 0, maxBytes: 64 * 1024 + 100 });
  defer(closeOf(ob));
  await ob.append({ topic: 't', priority: Priority.ALERT, payload: Buffer.alloc(40 * 1024, 1) });
  await ob.append({ topic: 't', priority: Priority.TELEMETRY, payload: Buffer.alloc(20 * 1024, 2) });
  // a telemetry record that fits only if the alert went: it evicts the telemetry first, then must stop
  await assert.rejects(ob.append({ topic: 't', priority: Priority.TELEMETRY, payload: Buffer.alloc(60 * 1024, 3) }), (e: Error & { code?: string }) => e.code === 'FLEET_OUTBOX_FULL');
  const peeked = await ob.peek(10);
  assert.equal(ob.stats().depth, 2);
  assert.equal(peeked.length, 2, 'the telemetry record it would have evicted is still delivered');
  await ob.close();
});

test('LevelOutbox: a record that arrives while a held batch reads from disk is peekable at once, not after the hold (a LevelDB read held by the test)', async (t) => {
  const defer = cleanups(t);
  const tmp = tempDir();
  defer(tmp.cleanup);
  let ob = await LevelOutbox.open(tmp.dir, { minFreeBytes: 0 });
  defer(closeOf(ob));
  const old = await ob.append({ topic: 't', priority: Priority.LOG, payload: Buffer.from('old') });
  await ob.close();
  // reopened: 'old' is on disk only, so acking it reads from the store (getMany)
  ob = await LevelOutbox.open(tmp.dir, { minFreeBytes: 0, syncIntervalMs: 60_000 });
  defer(closeOf(ob));
  await ob.append({ topic: 't', priority: Priority.TELEMETRY, payload: Buffer.from('d') }); // written at once; starts the interval
  const db = (ob as unknown as { db: { getMany: (keys: string[]) => Promise<unknown[]> } }).db;
  const realGetMany = db.getMany.bind(db);
  let releaseRead!: () => void;
  const reading = new Promise<void>((r) => (releaseRead = r));
  defer(() => releaseRead()); // a store with a read held would never close
  let readStarted = false;
  db.getMany = async (keys) => {
    readStarted = true;
    await reading;
    return realGetMany(keys);
  };
  const c = ob.append({ topic: 't', priority: Priority.TELEMETRY, payload: Buffer.from('c') });
  const acked = ob.ack([old.id]);
  await waitFor(() => readStarted, 'the held batch reading from disk', 5000);
  const b = ob.append({ topic: 't', priority: Priority.ALERT, payload: Buffer.from('b') });
  releaseRead();
  await waitFor(async () => (await ob.peek(10)).some((r) => r.payload.toString() === 'b'), 'b peekable well before the 60 s hold ends', 5000);
  await ob.close();
  await Promise.all([c, acked, b]);
});

test('LevelOutbox and MemoryOutbox: a listener that throws does not strand the operation that emitted it; its error surfaces as an uncaught exception on the next tick', { timeout: 60_000 }, async () => {
  const tmp = tempDir();
  try {
    // in a child process: the test runner would take the uncaught exception as this test's failure
    const script = `
      const { LevelOutbox } = await import(${JSON.stringify(new URL('../../core/outbox-level.ts', import.meta.url).pathname)});
      const { MemoryOutbox } = await import(${JSON.stringify(new URL('../../core/outbox.ts', import.meta.url).pathname)});
      const caught = [];
      process.on('uncaughtException', (err) => caught.push(err.message));
      const out = {};
      for (const [name, ob] of [['level', await LevelOutbox.open(${JSON.stringify(tmp.dir)}, { minFreeBytes: 0, maxBytes: 4096 })], ['memory', new MemoryOutbox({ maxBytes: 4096 })]]) {
        ob.once('appended', () => { throw new Error(name + ' appended listener bug'); });
        ob.once('evicted', () => { throw new Error(name + ' evicted listener bug'); });
        const first = await Promise.all([1, 2, 3].map((i) => ob.append({ topic: 't', priority: 2, payload: Buffer.from('log' + i) })));
        // evicts the log records to make room
        await ob.append({ topic: 't', priority: 0, payload: Buffer.alloc(4080, 'a') });
        await ob.append({ topic: 't', priority: 0, payload: Buffer.from('after') });
        const recs = await ob.peek(10);
        out[name] = { appended: first.length, peek: recs.map((r) => r.payload.length > 100 ? 'big' : r.payload.toString()), depth: ob.stats().depth };
        await ob.close();
      }
      await new Promise((r) => setTimeout(r, 20));
      process.stdout.write(JSON.stringify({ out, caught }) + '\\n');
    `;
    const child = spawn(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script], { stdio: ['ignore', 'pipe', 'inherit'] });
    const line = await new Promise<string>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error('the child did not finish in 30 s: an operation was stranded')), 30_000);
      createInterface({ input: child.stdout! }).once('line', (l) => (clearTimeout(timer), resolve(l)));
      child.once('exit', (code) => (clearTimeout(timer), reject(new Error(`child exited ${code} before reporting`))));
    }).finally(() => child.kill('SIGKILL'));
    const { out, caught } = JSON.parse(line) as { out: Record<string, { appended: number; peek: string[]; depth: number }>; caught: string[] };
    for (const name of ['level', 'memory']) {
      const o = out[name]!;
      assert.equal(o.appended, 3, `${name}: every append settled`);
      assert.deepEqual(o.peek.slice(0, 2), ['big', 'after'], `${name}: the new records stored: ${JSON.stringify(o)}`);
      assert.ok(o.peek.length < 5, `${name}: log records evicted to make room: ${JSON.stringify(o)}`);
      assert.equal(o.depth, o.peek.length, `${name}: stats and peek agree: ${JSON.stringify(o)}`);
    }
    assert.deepEqual(caught.sort(), ['level appended listener bug', 'level evicted listener bug', 'memory appended listener bug', 'memory evicted listener bug']);
  } finally {
    tmp.cleanup();
  }
});

test('LevelOutbox: a peek that reads LevelDB while a batch commits reads again, so a record never comes before an older one of its class (the next batch, held in flight, after the committed one; a LevelDB iterator held by the test)', async (t) => {
  const defer = cleanups(t);
  const tmp = tempDir();
  defer(tmp.cleanup);
  // no in-memory tail: every peek of a class with stored records reads LevelDB
  const ob = await LevelOutbox.open(tmp.dir, { minFreeBytes: 0, tailBytes: 0 });
  defer(closeOf(ob));
  const put = (p: string) => ob.append({ topic: 't', priority: Priority.TELEMETRY, payload: Buffer.from(p) });
  await put('a');
  // the next iterator opened (the peek's) takes its snapshot and first entry at once, then
  // waits for `go`; others (the store's own reads) pass
  const db = (ob as unknown as { db: { iterator: (o: unknown) => AsyncIterableIterator<[string, Buffer]> & { next(): Promise<[string, Buffer] | undefined>; close(): Promise<void> } } }).db;
  const realIterator = db.iterator.bind(db);
  let go!: () => void;
  const opened = new Promise<void>((r) => (go = r));
  defer(() => go()); // the peek's iterator is not left waiting
  let arm = false;
  db.iterator = (o: unknown) => {
    const it = realIterator(o);
    if (!arm) return it;
    arm = false;
    const first = it.next();
    return (async function* () {
      try {
        await opened;
        for (let e = await first; e !== undefined; e = await it.next()) yield e;
      } finally {
        await it.close();
      }
    })() as never;
  };
  const gate = gateBatches(ob);
  defer(gate.end);
  const b1 = put('b1');
  await waitFor(() => gate.held.length === 1, 'b1 in flight', 5000);
  arm = true;
  const peek = ob.peek(10);
  await new Promise((r) => setTimeout(r, 50)); // the peek's iterator has its snapshot: a, not b1
  gate.held.shift()!.go();
  await b1; // committed
  const b2 = put('b2');
  await waitFor(() => gate.held.length === 1, 'b2 in flight', 5000);
  go();
  // before: ['a', 'b2'] (b1 in neither the snapshot nor the batch in flight)
  assert.deepEqual((await peek).map((r) => r.payload.toString()), ['a', 'b1', 'b2'], 'oldest first within the class');
  gate.release();
  gate.held.shift()!.go();
  await b2;
  await ob.close();
});
