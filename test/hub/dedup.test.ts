import { setTimeout as sleep } from 'node:timers/promises';
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { openStore } from '../../core/store.ts';
import { DedupWindow, Deduplicator, NOT_KEPT, type DedupOptions } from '../../hub/dedup.ts';
import { tempDir, testLogger, waitFor } from '../helpers.ts';
import { withDedup } from './dedup-rig.ts';

test('dedup window: remembers the last `size` mids in arrival order, forgets the oldest first', () => {
  const w = new DedupWindow(3);
  assert.equal(w.admit('1'), 0);
  assert.equal(w.admit('1'), -1);
  assert.equal(w.admit('3'), 1);
  assert.equal(w.admit('2'), 2); // out of numeric order (priority classes): still remembered
  assert.equal(w.count, 3);
  assert.equal(w.admit('4'), 3); // pushes '1' out
  assert.equal(w.has('1'), false);
  assert.ok(w.has('2') && w.has('3') && w.has('4'));
  assert.equal(w.admit('1'), NOT_KEPT, 'a mid older than the window passes again, but is not kept: it would push out a newer one');
  assert.deepEqual([...w.inOrder()], ['3', '2', '4']);
  assert.equal(w.admit('5'), 4, 'a newer one pushes out the oldest');
  assert.deepEqual([...w.inOrder()], ['2', '4', '5']);
});

test('dedup window: mids are compared as the strings they are; huge and zero-padded ones work', () => {
  const w = new DedupWindow(8);
  assert.ok(w.admit('7') >= 0);
  assert.ok(w.admit('007') >= 0, '"007" is not "7"');
  assert.ok(w.admit('99999999999999999999') >= 0);
  assert.equal(w.admit('99999999999999999999'), -1);
  assert.ok(w.admit('9007199254740993') >= 0);
  assert.ok(w.admit('9007199254740992') >= 0, 'neighbours above 2^53 stay distinct');
  assert.equal(w.admit('0'), 5);
  assert.equal(w.admit('0'), -1);
});

test('dedup window: forget frees a mid (its message was never routed), and only while it is in the window', () => {
  const w = new DedupWindow(2);
  const a = w.admit('10');
  w.admit('11');
  w.forget(a);
  assert.equal(w.has('10'), false);
  assert.equal(w.count, 1);
  assert.ok(w.admit('10') >= 0, 'the resend is accepted');
  const b = w.admit('12'); // pushes '11' out
  w.forget(0); // seq 0 left the window long ago: no effect
  assert.ok(w.has('10') && w.has('12'));
  assert.ok(w.holds(b));
});

test('dedup window: restore rebuilds the same window from its ring', () => {
  const w = new DedupWindow(4);
  for (const m of ['1', '2', '3', '4', '5', '6']) w.admit(m);
  const slots = Array.from({ length: w.slots }, (_, i) => w.midAt(i));
  const r = DedupWindow.restore(4, w.nextSeq, slots);
  assert.deepEqual([...r.inOrder()], [...w.inOrder()]);
  r.admit('7');
  assert.equal(r.has('3'), false, 'the oldest goes first after a restore too');
  assert.ok(r.has('4'));
});

test('deduplicator: windows survive close and reopen; a window of another size is re-laid', async () => {
  await withDedup(async (open) => {
    let d = await open();
    for (let i = 1; i <= 200; i++) assert.ok(d.admit('dev-1', String(i)));
    assert.ok(d.admit('dev-2', '5'));
    assert.equal(d.admit('dev-1', '150'), false);
    await d.close();

    d = await open();
    assert.equal(d.admit('dev-1', '150'), false, 'remembered across the restart');
    assert.equal(d.admit('dev-1', '200'), false);
    assert.equal(d.admit('dev-2', '5'), false);
    assert.ok(d.admit('dev-1', '100'), 'older than the window of 64: passes');
    assert.deepEqual(d.stats(), { devices: 2, mids: 65, trimmed: 0, forgotten: 0 }, '... and is not kept: it would push out a newer mid');
    await d.close();

    d = await open({ window: 16 });
    assert.equal(d.admit('dev-1', '190'), false, 'the newest mids are kept when the window shrinks');
    assert.ok(d.admit('dev-1', '180'), 'older than the 16 newest: passes');
    assert.ok(d.admit('dev-1', '201'));
    await d.close();
    d = await open({ window: 16 });
    assert.equal(d.admit('dev-1', '201'), false, 'the re-laid window persists');
    assert.equal(d.admit('dev-1', '186'), false);
    assert.equal(d.stats().mids, 17);
    await d.close();
  });
});

test('deduplicator: a pending mid counts at once but is persisted only when confirmed; forget lets the resend pass', async () => {
  await withDedup(async (open) => {
    let d = await open();
    const a = d.admitPending('dev-1', '1');
    const b = d.admitPending('dev-1', '2');
    const c = d.admitPending('dev-1', '3');
    assert.ok(a && b && c);
    assert.equal(d.admitPending('dev-1', '1'), null, 'a repeat inside the same batch');
    a.confirm();
    c.forget();
    assert.ok(d.admit('dev-1', '3'), 'forgotten: the resend is accepted');
    await d.flush();
    // '2' was never confirmed (as if the hub died while routing it): a resend must get through
    await d.close();
    d = await open();
    assert.equal(d.admit('dev-1', '1'), false);
    assert.ok(d.admit('dev-1', '2'));
    assert.equal(d.admit('dev-1', '3'), false);
    b.confirm(); // late confirm on the closed instance: harmless
    await d.close();
  });
});

test('deduplicator: a duplicate of a mid still pending learns how its first copy ended (settling); one not pending gets null', async () => {
  await withDedup(async (open) => {
    const d = await open();
    const a = d.admitPending('dev-1', '10')!;
    const b = d.admitPending('dev-1', '11')!;
    assert.ok(d.admit('dev-1', '12'));
    const waitA = [d.settling('dev-1', '10'), d.settling('dev-1', '10')];
    const waitB = d.settling('dev-1', '11');
    assert.ok(waitA.every((w) => w !== null) && waitB !== null);
    assert.equal(d.settling('dev-1', '12'), null, 'admitted, not pending');
    assert.equal(d.settling('dev-1', '13'), null, 'never seen');
    assert.equal(d.settling('dev-2', '10'), null, 'another device');
    a.confirm();
    b.forget();
    assert.deepEqual(await Promise.all([...waitA, waitB]), [true, true, false]);
    assert.equal(d.settling('dev-1', '10'), null, 'settled: no longer pending');
    await d.close();
  });
});

test('deduplicator: without a flush (a crash), what was admitted since the last flush is forgotten', async () => {
  await withDedup(async (open, handle) => {
    const d = await open();
    d.admit('dev-1', '1');
    await d.flush();
    d.admit('dev-1', '2');
    // kill -9: the store goes away without the final flush
    await handle().close();
    const again = await open();
    assert.equal(again.admit('dev-1', '1'), false);
    assert.ok(again.admit('dev-1', '2'), 'admitted after the last flush: a duplicate gets through');
    await again.close();
  });
});

test('deduplicator: bounded by devices (the least recently active is forgotten whole, to within 1 s, on disk too) and by mids (the oldest mids are trimmed)', async () => {
  await withDedup(async (open) => {
    // an injected clock, 1 s per admission: the LRU order is kept to within a second
    let t = 1_000_000;
    const now = () => (t += 1000);
    let forgotten = 0;
    let d = await open({ maxDevices: 3, maxEntries: 1000, now, onForgotten: (n) => (forgotten += n) });
    for (const id of ['a', 'b', 'c']) d.admit(id, '1');
    d.admit('a', '2'); // a is now the most recent
    d.admit('d', '1'); // evicts b
    assert.equal(d.stats().devices, 3);
    assert.equal(d.seen('b', '1'), false);
    assert.ok(d.seen('a', '1') && d.seen('c', '1') && d.seen('d', '1'));
    assert.equal(d.stats().forgotten, 1);
    assert.equal(forgotten, 1, 'counted');
    await d.close();
    d = await open({ maxDevices: 3, maxEntries: 1000, now });
    assert.equal(d.seen('b', '1'), false, 'its keys were cleared');
    assert.ok(d.seen('a', '2'));
    await d.close();

    // within the same second a device is not moved again: the older order decides
    const frozen = () => 5_000_000;
    d = await open({ maxDevices: 2, maxEntries: 1000, now: frozen });
    d.admit('p', '1');
    d.admit('q', '1');
    d.admit('p', '2'); // same second as its first admission: p stays the older of the two
    d.admit('r', '1'); // evicts p, not q
    assert.equal(d.seen('p', '1'), false);
    assert.ok(d.seen('q', '1') && d.seen('r', '1'));
    await d.close();

    // the mid bound trims the oldest mids of the least recently active device; nobody is forgotten
    d = await open({ maxDevices: 100, maxEntries: 100, window: 64, now });
    for (let i = 0; i < 60; i++) d.admit('x', String(i));
    for (let i = 0; i < 60; i++) {
      d.admit('y', String(i));
      assert.ok(d.stats().mids <= 100);
    }
    assert.equal(d.seen('x', '0'), false, 'x was least recently active: its oldest mids went first');
    assert.ok(d.seen('x', '59') && d.seen('x', '50'), 'its newest are still remembered');
    assert.ok(d.seen('y', '59'));
    assert.equal(d.stats().forgotten, 0);
    assert.ok(d.stats().trimmed > 0);
    await d.close();
  });
});

test('deduplicator: flushes by itself on its timer, to the journal; a crash after that flush forgets nothing', async () => {
  await withDedup(async (open, handle) => {
    let d = await open({ flushMs: 20 });
    d.admit('dev-1', '42');
    const p = d.admitPending('dev-2', '7');
    assert.ok(p);
    p.confirm();
    const q = d.admitPending('dev-2', '8');
    assert.ok(q);
    q.forget(); // never routed: never persisted
    await waitFor(async () => (await handle().get('!j/000000000000')) !== undefined, 'the timer flush');
    assert.equal(await handle().get('dev-1/h'), undefined, 'a flush appends to the journal; it does not rewrite windows');
    // a crash: the store is closed under the deduplicator, which never gets to compact
    await handle().close();
    await d.close().catch(() => undefined);
    d = await open();
    assert.equal(d.admit('dev-1', '42'), false, 'replayed from the journal');
    assert.equal(d.admit('dev-2', '7'), false, 'a confirmed pending mid is journaled');
    assert.ok(d.admit('dev-2', '8'), 'a forgotten mid is not');
    assert.ok((await handle().get('dev-1/h')) !== undefined, 'the replayed journal is compacted into the windows at start');
    const keys: string[] = [];
    for await (const k of handle().keys({ gte: '!j/', lt: '!j0' })) keys.push(k);
    assert.deepEqual(keys, [], 'and the journal deleted');
    await d.close();
  });
});

test('deduplicator: compacts on its timer: the windows are written and the journal deleted', async () => {
  await withDedup(async (open, handle) => {
    const d = await open({ flushMs: 10, compactMs: 150 });
    for (let i = 1; i <= 5; i++) {
      d.admit('dev-1', String(i));
      await sleep(30);
    }
    await waitFor(async () => (await handle().get('dev-1/h')) !== undefined, 'the compaction');
    await d.flush(); // anything journaled after it
    await d.close();
    const d2 = await open();
    for (let i = 1; i <= 5; i++) assert.equal(d2.admit('dev-1', String(i)), false, `mid ${i} remembered`);
    await d2.close();
  });
});

test('dedup window: a resend of more than the window, in its original order, lets through only what was forgotten (no cascade)', () => {
  const w = new DedupWindow(64);
  for (let i = 1; i <= 100; i++) assert.ok(w.admit(String(1_700_000_000_000_000 + i)) >= 0);
  // the sender resends all 100 (its PUBACKs were lost): 1..36 were forgotten and pass once
  // more; 37..100 are still remembered, and stay so while 1..36 pass
  const passed: number[] = [];
  for (let i = 1; i <= 100; i++) if (w.admit(String(1_700_000_000_000_000 + i)) !== -1) passed.push(i);
  assert.deepEqual(passed, Array.from({ length: 36 }, (_, i) => i + 1));
  // trimmed to 16 (the hub's budget), the same: only what the trim forgot passes
  w.trim(16);
  const again: number[] = [];
  for (let i = 1; i <= 100; i++) if (w.admit(String(1_700_000_000_000_000 + i)) !== -1) again.push(i);
  assert.deepEqual(again, Array.from({ length: 84 }, (_, i) => i + 1));
});
