import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { openStore } from '../../core/store.ts';
import { Registry } from '../../hub/registry.ts';
import { tempDir } from '../helpers.ts';

test('registry: a flush of many records is written in chunks, letting the event loop run between them, and every record survives a reopen (real LevelDB)', async () => {
  const tmp = tempDir();
  try {
    const dir = join(tmp.dir, 'registry');
    let db = await openStore<string>(dir, 'utf8');
    const reg = new Registry(db);
    const now = Date.now();
    const n = 1_750; // more than three chunks
    for (let i = 0; i < n; i++) reg.onTelemetry(`mcu-${i}`, { v: 1, mid: String(i + 1), ts: now, samples: [{ n: 'seq', v: i, t: now }] });
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

    db = await openStore<string>(dir, 'utf8');
    const again = new Registry(db);
    await again.load();
    for (const i of [0, 499, 500, 1_000, n - 1]) assert.equal(again.get(`mcu-${i}`)?.latest.seq?.v, i, `mcu-${i} was written`);
    assert.equal(again.counts().total, n);
    await db.close();
  } finally {
    tmp.cleanup();
  }
});

test('registry: a flush started while a chunked one is under way waits for it, so the database can be closed after it (real LevelDB)', async () => {
  const tmp = tempDir();
  try {
    const dir = join(tmp.dir, 'registry');
    let db = await openStore<string>(dir, 'utf8');
    const reg = new Registry(db);
    const now = Date.now();
    for (let i = 0; i < 1_200; i++) reg.onTelemetry(`mcu-${i}`, { v: 1, mid: String(i + 1), ts: now, samples: [{ n: 'seq', v: i, t: now }] });
    const first = reg.flush(); // the traffic timer's flush, say: three chunks
    reg.onTelemetry('mcu-late', { v: 1, mid: '1', ts: now, samples: [{ n: 'seq', v: 7, t: now }] });
    await reg.flush(); // the hub stopping
    await db.close(); // would fail the first flush's later chunks if it were still running
    await first;
    db = await openStore<string>(dir, 'utf8');
    const again = new Registry(db);
    await again.load();
    assert.equal(again.counts().total, 1_201);
    assert.equal(again.get('mcu-late')?.latest.seq?.v, 7);
    await db.close();
  } finally {
    tmp.cleanup();
  }
});
