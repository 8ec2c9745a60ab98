import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { openStore } from '../../core/store.ts';
import { DedupWindow, Deduplicator, type DedupOptions } from '../../hub/dedup.ts';
import { rng, testLogger } from '../helpers.ts';
import { withDedup } from './dedup-rig.ts';

const DEVICES = 100;
const dev = (i: number) => `mcu-${String(i).padStart(3, '0')}`;

test('dedup budget: 100 devices with full windows beyond maxEntries all recognise a resend of their newest mids', async () => {
  await withDedup(async (open) => {
    let t = 1_000_000;
    const d = await open({ window: 64, minWindow: 16, maxEntries: 2000, now: () => (t += 10) });
    // round-robin, one reading per device per "second", until every window would be full
    for (let r = 0; r < 64; r++) {
      for (let i = 0; i < DEVICES; i++) {
        assert.ok(d.admit(dev(i), String(1_000 * i + r)));
        assert.ok(d.stats().mids <= 2000);
      }
    }
    // every device resends its newest 16 (a gateway reconnecting with its in-flight records)
    let passed = 0;
    for (let i = 0; i < DEVICES; i++) for (let r = 48; r < 64; r++) if (d.admit(dev(i), String(1_000 * i + r))) passed++;
    assert.equal(passed, 0, `${passed} of ${DEVICES * 16} resent mids passed as new`);
    await d.close();
  });
});

/** Every device: one reading per round, mids 1000·i + r. */
async function fill(d: Deduplicator, rounds: number, from = 0, max = 2000): Promise<void> {
  for (let r = from; r < from + rounds; r++) {
    for (let i = 0; i < DEVICES; i++) {
      assert.ok(d.admit(dev(i), String(1_000 * i + r)), `${dev(i)} ${1_000 * i + r} is new`);
      assert.ok(d.stats().mids <= max, `the bound holds after every admission (${d.stats().mids})`);
    }
  }
}

/** How many of the newest `n` mids (before round `end`) of every device pass as new. */
function resendPasses(d: Deduplicator, end: number, n: number): number {
  let passed = 0;
  for (let i = 0; i < DEVICES; i++) for (let r = end - n; r < end; r++) if (d.admit(dev(i), String(1_000 * i + r))) passed++;
  return passed;
}

const BUDGET = { window: 64, minWindow: 16, maxEntries: 2000 };

test('dedup budget: trimming is counted and announced once a minute, not per trim', async () => {
  await withDedup(async (open) => {
    const log = testLogger('dedup');
    let t = 1_000_000;
    let counted = 0;
    const d = await open({ ...BUDGET, log, now: () => (t += 1), onTrimmed: (n) => (counted += n), onForgotten: () => assert.fail('forgotten') });
    await fill(d, 64);
    const s = d.stats();
    assert.equal(counted, s.trimmed, 'onTrimmed adds up to the total');
    assert.equal(s.forgotten, 0, 'no device was forgotten');
    assert.equal(s.devices, DEVICES);
    assert.ok(s.trimmed > 0);
    const warns = log.lines.filter((l) => l.level === 'warn' && String(l.msg).includes('trimming'));
    assert.ok(warns.length >= 1 && warns.length <= 2, `${warns.length} warnings`);
    assert.equal(warns[0]!.maxMids, 2000);
    assert.equal(warns[0]!.floor, 16);
    assert.equal(typeof warns[0]!.windowDownTo, 'number');
    await d.close();
  });
});

test('dedup budget: out-of-order mids (an alert overtaking telemetry) are all admitted after trimming; nothing new is dropped', async () => {
  await withDedup(async (open) => {
    let t = 1_000_000;
    const d = await open({ ...BUDGET, now: () => (t += 10) });
    await fill(d, 64);
    for (let i = 0; i < DEVICES; i++) {
      // the outbox sends the alert (a higher mid) before the telemetry appended before it
      assert.ok(d.admit(dev(i), String(1_000 * i + 90)), 'the alert');
      for (let r = 64; r < 74; r++) assert.ok(d.admit(dev(i), String(1_000 * i + r)), `telemetry ${r} after the alert`);
      // and all of them are resent (newest 11 ≤ the floor of 16): all duplicates
      for (const r of [90, 64, 65, 66, 67, 68, 69, 70, 71, 72, 73]) assert.equal(d.admit(dev(i), String(1_000 * i + r)), false, `${r} resent`);
    }
    assert.ok(d.stats().mids <= 2000);
    await d.close();
  });
});

test('dedup budget: a seeded random workload never drops a new mid, always recognises the newest 16 of every device, and stays within the bound', async () => {
  await withDedup(async (open) => {
    const seed = 20261122;
    const rand = rng(seed);
    let t = 1_000_000;
    const d = await open({ ...BUDGET, now: () => (t += 1 + rand(50)) });
    const next = new Array<number>(DEVICES).fill(0);
    /** per device: mids in the order admitted */
    const sent: string[][] = Array.from({ length: DEVICES }, () => []);
    for (let step = 0; step < 20_000; step++) {
      // a few devices are much busier than the rest (a gateway draining a backlog)
      const i = rand(4) === 0 ? rand(5) : rand(DEVICES);
      if (rand(10) === 0 && sent[i]!.length > 0) {
        // a resend of one of its newest 16
        const recent = sent[i]!.slice(-16);
        const mid = recent[rand(recent.length)]!;
        assert.equal(d.admit(dev(i), mid), false, `seed ${seed} step ${step}: resend of ${dev(i)} ${mid} passed`);
      } else {
        // out of order: now and then a mid a little ahead of the sequence (an alert), then the skipped ones
        const n = rand(8) === 0 ? [next[i]! + 3, next[i]!, next[i]! + 1, next[i]! + 2] : [next[i]!];
        next[i] = Math.max(...n) + 1;
        for (const k of n) {
          const mid = String(1_000_000 * i + k);
          assert.ok(d.admit(dev(i), mid), `seed ${seed} step ${step}: new ${dev(i)} ${mid} dropped`);
          sent[i]!.push(mid);
        }
      }
      assert.ok(d.stats().mids <= 2000, `seed ${seed} step ${step}: ${d.stats().mids} mids`);
    }
    assert.ok(d.stats().trimmed > 0);
    assert.equal(d.stats().forgotten, 0);
    // the busy devices grew back beyond the floor: they remember more than 16
    /** how many of its newest mids a device is remembered with */
    const kept = (i: number): number => {
      let n = 0;
      for (let k = sent[i]!.length - 1; k >= 0 && d.seen(dev(i), sent[i]![k]!); k--) n++;
      return n;
    };
    for (let i = 0; i < DEVICES; i++) assert.ok(kept(i) >= Math.min(16, sent[i]!.length), `${dev(i)} keeps its newest 16 at least (${kept(i)})`);
    // the busy devices (the most recently active) kept their full windows: the idle ones were trimmed
    for (let i = 0; i < 5; i++) assert.equal(kept(i), 64, `busy ${dev(i)}`);
    await d.close();
  });
});

test('dedup budget: trimmed windows survive a restart and a crash (journal replay), and grow back when the budget allows', async () => {
  await withDedup(async (open, handle, peek) => {
    let t = 1_000_000;
    const now = () => (t += 10);
    let d = await open({ ...BUDGET, now, compactMs: 1e12 });
    await fill(d, 40);
    assert.ok(d.stats().trimmed > 0);
    await d.close();
    const sizes = await peek(async (db) => {
      const out: number[] = [];
      for (let i = 0; i < DEVICES; i++) out.push(Number((await db.get(`${dev(i)}/h`))!.split(':')[1]));
      return out;
    });
    assert.ok(sizes.some((s) => s < 64), `trimmed sizes are persisted (${sizes.join(' ')})`);

    d = await open({ ...BUDGET, now, compactMs: 1e12 });
    assert.ok(d.stats().mids <= 2000);
    assert.equal(resendPasses(d, 40, 16), 0, 'remembered across the restart');
    await fill(d, 40, 40);
    await d.flush(); // to the journal only (compactMs is huge)
    assert.equal(await handle().get(`${dev(0)}/c1`), undefined);
    // kill -9: the store goes away without the compaction at close
    await handle().close();
    await d.close().catch(() => undefined);

    d = await open({ ...BUDGET, now });
    assert.ok(d.stats().mids <= 2000, `within the bound after the replay (${d.stats().mids})`);
    assert.equal(resendPasses(d, 80, 16), 0, 'remembered across the crash');
    assert.equal(d.stats().forgotten, 0);
    await d.close();

    // a bigger budget: an active device's window grows back to the full 64
    d = await open({ ...BUDGET, maxEntries: 100_000, now });
    for (let r = 100; r < 164; r++) assert.ok(d.admit(dev(7), String(7_000 + r)));
    for (let r = 100; r < 164; r++) assert.equal(d.seen(dev(7), String(7_000 + r)), true, `mid ${r} of the grown window`);
    await d.close();
    d = await open({ ...BUDGET, maxEntries: 100_000, now });
    for (let r = 100; r < 164; r++) assert.equal(d.seen(dev(7), String(7_000 + r)), true, `mid ${r} of the grown window after a restart`);
    await d.close();
    assert.equal((await peek((db) => db.get(`${dev(7)}/h`)))!.split(':')[1], '64');
  });
});

test('dedup budget: windows, stale chunks and a journal written in the existing format load (a larger window keeps its newest mids)', async () => {
  await withDedup(async (open, _handle, peek) => {
    // as the hub before trimming wrote them: window 64, next seq 100, slot = seq % 64
    const slots64 = Array.from({ length: 64 }, (_, slot) => String(1_000 + (slot < 36 ? slot + 64 : slot)));
    // a window of 128 (dedupWindow was 128), next seq 200
    const slots128 = Array.from({ length: 128 }, (_, slot) => String(5_000 + (slot < 72 ? slot + 128 : slot)));
    await peek((db) => db.batch([
      { type: 'put', key: 'old/h', value: '100:64:1700000000000' },
      { type: 'put', key: 'old/c0', value: slots64.join(',') },
      { type: 'put', key: 'big/h', value: '200:128:1700000001000' },
      { type: 'put', key: 'big/c0', value: slots128.slice(0, 64).join(',') },
      { type: 'put', key: 'big/c1', value: slots128.slice(64).join(',') },
      { type: 'put', key: '!j/000000000003', value: '1700000002000\nold 9000\nbig 9001' },
    ]));
    const d = await open({ window: 64 });
    // each window holds its newest 63 and the journaled mid (admitted after them)
    for (let s = 37; s < 100; s++) assert.equal(d.seen('old', String(1_000 + s)), true, `old seq ${s}`);
    assert.equal(d.seen('old', '1036'), false, 'pushed out by the journaled mid');
    for (let s = 137; s < 200; s++) assert.equal(d.seen('big', String(5_000 + s)), true, `big seq ${s}`);
    assert.equal(d.seen('big', String(5_000 + 136)), false, 'older than the new window of 64');
    assert.ok(d.seen('old', '9000') && d.seen('big', '9001'), 'the journal replayed');
    assert.deepEqual(d.stats(), { devices: 2, mids: 128, trimmed: 0, forgotten: 0 });
    await d.close();
    assert.equal(await peek((db) => db.get('big/c1')), undefined, 'the chunk past the re-laid window is deleted');
    assert.match((await peek((db) => db.get('big/h')))!, /^201:64:/);
    const again = await open({ window: 64 });
    assert.ok(again.seen('big', '9001') && again.seen('big', '5199') && again.seen('old', '1037'));
    await again.close();
  });
});

test('dedup budget: pending mids of a trimmed window: confirmed ones are persisted, forgotten ones pass again, the count stays right', async () => {
  await withDedup(async (open) => {
    let t = 1_000_000;
    let d = await open({ ...BUDGET, now: () => (t += 10) });
    const pending = [];
    for (let r = 0; r < 64; r++) {
      const p = d.admitPending('pend', String(900_000 + r));
      assert.ok(p);
      pending.push(p);
    }
    await fill(d, 64); // the others' traffic trims the window of 'pend', the least recently active
    assert.equal(d.seen('pend', '900000'), false, 'its oldest pending mids were trimmed');
    assert.ok(d.seen('pend', '900063'));
    const before = d.stats().mids;
    pending[60]!.forget(); // still in the window: forgotten, one mid less
    pending[10]!.forget(); // trimmed already: nothing to forget
    assert.equal(d.stats().mids, before - 1);
    for (const p of pending) p.confirm(); // the rest were routed (settled ones ignore this)
    const mids = d.stats().mids;
    await d.close();
    d = await open({ ...BUDGET, now: () => (t += 10) });
    assert.equal(d.stats().mids, mids, 'what was counted is what was written');
    for (let r = 48; r < 64; r++) if (r !== 60) assert.equal(d.admit('pend', String(900_000 + r)), false, `confirmed ${r} is remembered`);
    assert.ok(d.admit('pend', '900060'), 'the forgotten one passes');
    await d.close();
  });
});

test('dedup budget: maxDevices still forgets whole devices; below the floor of 16 whole devices go too; the bound holds at every admission', async () => {
  await withDedup(async (open) => {
    let t = 1_000_000;
    // 100 devices round robin, 50 remembered: each is forgotten whole before it sends again
    // (the mid bound alone would have kept all: devices are not trimmed for maxDevices)
    let d = await open({ window: 64, maxDevices: 50, maxEntries: 2000, now: () => (t += 10) });
    await fill(d, 64);
    let s = d.stats();
    assert.equal(s.devices, 50);
    assert.equal(s.forgotten, DEVICES * 64 - 50);
    assert.equal(s.trimmed, 0);
    for (let i = 0; i < DEVICES; i++) assert.equal(d.seen(dev(i), String(1_000 * i + 63)), i >= 50, dev(i));
    await d.close();

    // 100 devices × the hard floor of 16 do not fit 1,000 mids: trimmed to 16, then the least
    // recently active are forgotten whole; those remembered keep their newest 16
    d = await open({ window: 64, maxEntries: 1000, now: () => (t += 10) });
    s = d.stats();
    assert.ok(s.mids <= 1000, `after the load (${s.mids})`);
    await fill(d, 64, 64, 1000);
    s = d.stats();
    assert.ok(s.forgotten > 0, 'devices were forgotten');
    // what a device is remembered with is always its newest mids (since it was last forgotten)
    for (let i = 0; i < DEVICES; i++) {
      const seen = Array.from({ length: 64 }, (_, r) => d.seen(dev(i), String(1_000 * i + 64 + r)));
      const first = seen.indexOf(true);
      if (first >= 0) assert.ok(seen.slice(first).every(Boolean), `${dev(i)}: ${seen.map(Number).join('')}`);
      assert.ok(seen.filter(Boolean).length <= 16, 'at the floor');
    }
    await d.close();
  });
});

test('dedup window: trim, grow, resized and restore keep the newest seqs and their slots', () => {
  const w = new DedupWindow(8);
  for (let i = 0; i < 12; i++) w.admit(String(100 + i)); // seqs 0…11; 4…11 held
  w.trim(4); // in place: 108…111 held
  assert.equal(w.count, 4);
  assert.equal(w.cap, 4);
  assert.equal(w.has('107'), false);
  assert.ok(w.has('108') && w.has('111'));
  assert.equal(w.holds(7), false);
  assert.ok(w.holds(8));
  w.admit('200'); // seq 12 pushes seq 8 out of the cap of 4
  assert.equal(w.has('108'), false);
  assert.equal(w.count, 4);
  w.grow(8); // from now on 8 are held; the trimmed ones stay forgotten
  for (const m of ['201', '202', '203', '204']) w.admit(m);
  assert.equal(w.count, 8);
  assert.deepEqual([...w.inOrder()], ['109', '110', '111', '200', '201', '202', '203', '204']);
  // persisted and read back: the cap is recovered from the ring (a trimmed window stays trimmed)
  w.trim(3);
  const r = DedupWindow.restore(8, w.nextSeq, Array.from({ length: w.slots }, (_, i) => w.midAt(i)));
  assert.equal(r.cap, 3);
  assert.deepEqual([...r.inOrder()], ['202', '203', '204']);
  // rebuilt smaller and larger, under the same seqs
  const small = r.resized(2);
  assert.deepEqual([...small.inOrder()], ['203', '204']);
  assert.equal(small.nextSeq, r.nextSeq);
  assert.equal(small.slots, 2);
  const big = small.resized(16);
  assert.deepEqual([...big.inOrder()], ['203', '204']);
  assert.equal(big.cap, 16);
  assert.ok(big.admit('300') === r.nextSeq);
  assert.equal(big.admit('204'), -1);
  assert.throws(() => w.trim(0), RangeError);
});
