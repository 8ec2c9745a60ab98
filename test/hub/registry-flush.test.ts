import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { openStore } from '../../core/store.ts';
import { Registry } from '../../hub/registry.ts';
import { tempDir, waitFor } from '../helpers.ts';

type Db = Awaited<ReturnType<typeof openStore<string>>>;

/** One reading of `seq` = v from `id`. */
const reading = (reg: Registry, id: string, v: number): void => {
  const now = Date.now();
  reg.onTelemetry(id, { v: 1, mid: String(v + 1), ts: now, samples: [{ n: 'seq', v, t: now }] });
};

/**
 * A registry over a real LevelDB in a temp dir with `n` devices that sent a reading each
 * (`mcu-{i}`, seq i); `reopen` closes nothing: it opens the same LevelDB again (the caller
 * closes the first handle) and loads a fresh registry from it.
 */
async function withRegistry(n: number, fn: (reg: Registry, db: Db, reopen: () => Promise<{ reg: Registry; db: Db }>) => Promise<void>): Promise<void> {
  const tmp = tempDir();
  const dir = join(tmp.dir, 'registry');
  const open: Db[] = [];
  try {
    const db = await openStore<string>(dir, 'utf8');
    open.push(db);
    const reg = new Registry(db);
    for (let i = 0; i < n; i++) reading(reg, `mcu-${i}`, i);
    await fn(reg, db, async () => {
      const again = await openStore<string>(dir, 'utf8');
      open.push(again);
      const r = new Registry(again);
      await r.load();
      return { reg: r, db: again };
    });
  } finally {
    for (const db of open) if (db.status === 'open') await db.close();
    tmp.cleanup();
  }
}

test('registry: a flush of many records is written in chunks, letting the event loop run between them, and every record survives a reopen (real LevelDB)', async () => {
  const n = 1_750; // more than three chunks
  await withRegistry(n, async (reg, db, reopen) => {
    // the batches the flush writes, by size, and whether the event loop ran before each
    const sizes: number[] = [];
    let ticked = 0;
    const ticks: number[] = [];
    const batch = db.batch.bind(db) as (ops: unknown[]) => Promise<void>;
    (db as unknown as { batch: (ops: unknown[]) => Promise<void> }).batch = (ops) => {
      sizes.push(ops.length);
      ticks.push(ticked);
      setImmediate(() => ticked++);
      return batch(ops);
    };
    await reg.flush();
    assert.deepEqual(sizes, [500, 500, 500, 250], 'written in chunks of at most 500 records');
    assert.ok(ticks.every((t, i) => i === 0 || t > ticks[i - 1]!), `the event loop ran between the chunks (${ticks.join(',')})`);
    await db.close();

    const again = (await reopen()).reg;
    for (const i of [0, 499, 500, 1_000, n - 1]) assert.equal(again.get(`mcu-${i}`)?.latest.seq?.v, i, `mcu-${i} was written`);
    assert.equal(again.counts().total, n);
  });
});

test('registry: the traffic timer writes its records a chunk at a time, spread out; a state change meanwhile is written without waiting for the rest, and a final flush writes what is left at once (real LevelDB)', async () => {
  const tmp = tempDir();
  const db = await openStore<string>(join(tmp.dir, 'registry'), 'utf8');
  try {
    // traffic flushed 3 s after the first reading: 4 chunks spread over up to 1.5 s (gaps of
    // about 375 ms), longer than a state change may wait (FLUSH_MS, 500 ms)
    const reg = new Registry(db, 3000);
    const writes: Array<{ at: number; n: number; ids: string[] }> = [];
    const batch = db.batch.bind(db) as unknown as (ops: Array<{ key: string }>) => Promise<void>;
    (db as unknown as { batch: (ops: Array<{ key: string }>) => Promise<void> }).batch = (ops) => {
      writes.push({ at: performance.now(), n: ops.length, ids: ops.map((o) => o.key) });
      return batch(ops);
    };
    for (let i = 0; i < 1_750; i++) reading(reg, `mcu-${i}`, i);
    await waitFor(() => writes.length >= 2, 'the traffic flush began', 5000);
    // a state change now: written within FLUSH_MS (500), between two traffic chunks
    reg.onState('mcu-state', { v: 1, online: true, kind: 'agent', ts: Date.now() });
    await waitFor(() => writes.some((w) => w.ids.includes('mcu-state')), 'the state change written', 3000);
    const traffic = () => writes.filter((w) => !w.ids.includes('mcu-state'));
    assert.ok(traffic().length < 4, `the state change did not wait for every traffic chunk (${traffic().length} of 4 written before it)`);
    await waitFor(() => traffic().length === 4, 'every traffic chunk written', 5000);
    assert.deepEqual(traffic().map((w) => w.n), [500, 500, 500, 250]);
    // planned: about 375 ms apart, the last ~1.1 s after the first. A late machine makes the
    // product shorten the gaps left to keep its deadline (one gap alone proves nothing), and
    // can only push writes later: the span is at least ~3/4 of the time left after the first
    // write, and back to back would be a few ms. The upper bound is loose: a soft deadline.
    const gaps = traffic().slice(1).map((w, i) => w.at - traffic()[i]!.at);
    const span = traffic()[3]!.at - traffic()[0]!.at;
    assert.ok(span >= 500, `chunks spread out, not back to back (gaps ${gaps.map((g) => g.toFixed(0)).join(', ')} ms)`);
    assert.ok(span <= 3_000, `and done about within half the interval (${span.toFixed(0)} ms)`);

    // the next round: stopped half way by a final flush, which writes the rest at once
    writes.length = 0;
    for (let i = 0; i < 1_750; i++) reading(reg, `mcu-${i}`, i + 10_000);
    await waitFor(() => writes.length >= 1, 'the second traffic flush began', 5000);
    await reg.flush();
    const written = new Set(writes.flatMap((w) => w.ids));
    assert.equal(written.size, 1_751 - 1, 'every record written by the time flush() resolved (mcu-state was not marked again)');
    await db.close();
    const again = await openStore<string>(join(tmp.dir, 'registry'), 'utf8');
    const r2 = new Registry(again);
    await r2.load();
    assert.equal(r2.get('mcu-1749')?.latest.seq?.v, 11_749);
    await again.close();
  } finally {
    if (db.status === 'open') await db.close();
    tmp.cleanup();
  }
});

test('registry: a flush started while a chunked one is under way waits for it, so the database can be closed after it (real LevelDB)', async () => {
  await withRegistry(1_200, async (reg, db, reopen) => {
    const first = reg.flush(); // the traffic timer's flush, say: three chunks
    reading(reg, 'mcu-late', 7);
    await reg.flush(); // the hub stopping
    await db.close(); // would fail the first flush's later chunks if it were still running
    await first;
    const again = (await reopen()).reg;
    assert.equal(again.counts().total, 1_201);
    assert.equal(again.get('mcu-late')?.latest.seq?.v, 7);
  });
});

test('latest values: each reading replaces the last (updated in place when the kind of value is the same), a change of kind leaves no stale field, and the disk copy matches', async () => {
  await withRegistry(0, async (reg, db, reopen) => {
    const send = (samples: Array<Record<string, unknown>>) => reg.onTelemetry('mcu-x', { v: 1, mid: String(Date.now()), ts: 1, samples: samples as never });
    send([{ n: 'temp', v: 20.5, u: 'Cel', t: 100 }, { n: 'door', vb: false, t: 100 }]);
    const first = reg.get('mcu-x')!.latest.temp;
    send([{ n: 'temp', v: 21.25, u: 'Cel', t: 200 }, { n: 'door', vb: true, t: 200 }]);
    assert.deepEqual(reg.get('mcu-x')!.latest, { temp: { v: 21.25, u: 'Cel', t: 200 }, door: { vb: true, t: 200 } });
    assert.equal(reg.get('mcu-x')!.latest.temp, first, 'same kind of value: the entry was updated in place');
    // the unit changes: still the same fields
    send([{ n: 'temp', v: 70.7, u: 'degF', t: 300 }]);
    assert.deepEqual(reg.get('mcu-x')!.latest.temp, { v: 70.7, u: 'degF', t: 300 });
    // a number becomes a string without a unit: no v and no u left over from before
    send([{ n: 'temp', vs: 'sensor fault', t: 400 }]);
    assert.deepEqual(reg.get('mcu-x')!.latest.temp, { vs: 'sensor fault', t: 400 });
    assert.notEqual(reg.get('mcu-x')!.latest.temp, first);
    // and back to a number with a unit
    send([{ n: 'temp', v: 19, u: 'Cel', t: 500 }]);
    assert.deepEqual(reg.get('mcu-x')!.latest.temp, { v: 19, u: 'Cel', t: 500 });
    await reg.flush();
    await db.close();
    const { reg: again } = await reopen();
    assert.deepEqual(again.get('mcu-x')!.latest, { temp: { v: 19, u: 'Cel', t: 500 }, door: { vb: true, t: 200 } });
  });
});

test('latest values: metrics named "__proto__", "constructor" or "toString" are the device\'s own entries; nothing reaches Object.prototype (a device chooses its metric names)', async () => {
  await withRegistry(0, async (reg, db, reopen) => {
    const send = (samples: Array<Record<string, unknown>>) => reg.onTelemetry('mcu-p', { v: 1, mid: String(Date.now()), ts: 1, samples: samples as never });
    try {
      // no value fields at all: "the same fields" as Object.prototype, if that were looked up
      send([{ n: '__proto__', t: 42 }, { n: 'constructor', t: 7 }, { n: 'toString', v: 1, t: 8 }]);
      send([{ n: '__proto__', t: 43 }, { n: 'constructor', v: 2, t: 9 }]);
      assert.equal(Reflect.get({}, 't'), undefined, 'Object.prototype untouched');
      assert.equal(Reflect.get(Object, 't'), undefined, 'Object untouched');
      assert.equal(Object.getPrototypeOf(reg.get('mcu-p')!.latest), Object.prototype, 'the prototype of latest is not replaced');
      const latest = reg.get('mcu-p')!.latest;
      assert.deepEqual(Object.keys(latest).sort(), ['__proto__', 'constructor', 'toString']);
      assert.deepEqual(Object.getOwnPropertyDescriptor(latest, '__proto__')?.value, { t: 43 });
      assert.deepEqual(Object.getOwnPropertyDescriptor(latest, 'constructor')?.value, { v: 2, t: 9 });
      await reg.flush();
      await db.close();
      const { reg: again } = await reopen();
      const back = again.get('mcu-p')!.latest;
      assert.deepEqual(Object.getOwnPropertyDescriptor(back, '__proto__')?.value, { t: 43 });
      assert.deepEqual(Object.getOwnPropertyDescriptor(back, 'toString')?.value, { v: 1, t: 8 });
    } finally {
      // whatever happened, do not leave a polluted prototype to the other tests
      Reflect.deleteProperty(Object.prototype, 't');
      Reflect.deleteProperty(Object, 't');
    }
  });
});
