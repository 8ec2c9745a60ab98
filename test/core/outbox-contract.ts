import { test } from 'node:test';
import assert from 'node:assert/strict';
import { isFleetError } from '../../core/errors.ts';
import { Priority, type Outbox } from '../../core/outbox.ts';

/**
 * The contract every outbox backend must pass (STYLE.md: one suite, every store).
 * `make(maxBytes)` returns a fresh, empty outbox with that byte budget.
 */
export function outboxContract(name: string, make: (maxBytes: number) => Promise<{ outbox: Outbox; cleanup: () => Promise<void> }>): void {
  const payload = (n: number, size = 10) => Buffer.alloc(size, n % 256);

  test(`${name}: ids are unique and increase in append order; payload builders see their id`, async () => {
    const { outbox, cleanup } = await make(1 << 20);
    try {
      const seen: string[] = [];
      const ids: string[] = [];
      for (let i = 0; i < 50; i++) {
        const rec = await outbox.append({ topic: 't', priority: Priority.TELEMETRY, payload: (id) => (seen.push(id), Buffer.from(id)) });
        ids.push(rec.id);
        assert.equal(rec.payload.toString(), rec.id);
      }
      assert.deepEqual(seen, ids);
      assert.equal(new Set(ids).size, 50);
      for (let i = 1; i < ids.length; i++) assert.ok(BigInt(ids[i]!) > BigInt(ids[i - 1]!));
    } finally {
      await cleanup();
    }
  });

  test(`${name}: a payload writer's bytes are the record's payload, with their id, and count towards the budget like a Buffer`, async () => {
    const { outbox, cleanup } = await make(1 << 20);
    try {
      const recs = [];
      for (let i = 0; i < 20; i++) {
        recs.push(
          await outbox.append({
            topic: 'fleet/v1/d/é/telemetry',
            priority: Priority.TELEMETRY,
            payload: (id) => {
              const text = `{"mid":"${id}","n":${i},"unit":"°C"}`;
              return { size: Buffer.byteLength(text), write: (buf: Buffer, off: number) => off + buf.write(text, off, 'utf8') };
            },
          }),
        );
      }
      for (const [i, r] of recs.entries()) assert.equal(r.payload.toString(), `{"mid":"${r.id}","n":${i},"unit":"°C"}`);
      const peeked = await outbox.peek(100);
      assert.deepEqual(
        peeked.map((r) => r.payload.toString()),
        recs.map((r) => r.payload.toString()),
      );
      const bytes = recs.reduce((n, r) => n + r.payload.length + Buffer.byteLength(r.topic), 0);
      assert.equal(outbox.stats().bytes, bytes);
    } finally {
      await cleanup();
    }
  });

  test(`${name}: a payload writer that writes other than its announced size is refused (FLEET_STORE), and nothing is stored`, async () => {
    const { outbox, cleanup } = await make(1 << 20);
    try {
      const ok = await outbox.append({ topic: 't', priority: Priority.TELEMETRY, payload: Buffer.from('ok') });
      // 3 bytes written, or more than the 4 announced (the end it reports is past the buffer's)
      for (const ends of [3, 5]) {
        await assert.rejects(
          outbox.append({ topic: 't', priority: Priority.TELEMETRY, payload: () => ({ size: 4, write: (buf: Buffer, off: number) => (buf.write('x'.repeat(Math.min(ends, 4)), off, 'latin1'), off + ends) }) }),
          (err) => isFleetError(err, 'FLEET_STORE') && /wrote \d+ bytes, announced 4/.test(err.message),
        );
      }
      assert.deepEqual((await outbox.peek(10)).map((r) => r.id), [ok.id]);
      assert.equal(outbox.stats().depth, 1);
    } finally {
      await cleanup();
    }
  });

  test(`${name}: peek returns the most important class first, oldest first, and skips excluded ids`, async () => {
    const { outbox, cleanup } = await make(1 << 20);
    try {
      const log1 = await outbox.append({ topic: 'l', priority: Priority.LOG, payload: payload(1) });
      const tel1 = await outbox.append({ topic: 't', priority: Priority.TELEMETRY, payload: payload(2) });
      const alert1 = await outbox.append({ topic: 'a', priority: Priority.ALERT, payload: payload(3) });
      const tel2 = await outbox.append({ topic: 't', priority: Priority.TELEMETRY, payload: payload(4) });
      const all = await outbox.peek(10);
      assert.deepEqual(all.map((r) => r.id), [alert1.id, tel1.id, tel2.id, log1.id]);
      assert.deepEqual((await outbox.peek(2)).map((r) => r.id), [alert1.id, tel1.id]);
      assert.deepEqual((await outbox.peek(10, new Set([alert1.id, tel2.id]))).map((r) => r.id), [tel1.id, log1.id]);
      assert.deepEqual(all[0]!.payload, payload(3));
    } finally {
      await cleanup();
    }
  });

  test(`${name}: ack removes records; unknown ids are ignored; stats follow`, async () => {
    const { outbox, cleanup } = await make(1 << 20);
    try {
      const a = await outbox.append({ topic: 'x', priority: Priority.TELEMETRY, payload: payload(1, 100) });
      await outbox.append({ topic: 'x', priority: Priority.LOG, payload: payload(2, 100) });
      let s = outbox.stats();
      assert.equal(s.depth, 2);
      assert.equal(s.bytes, 202);
      assert.deepEqual(s.depthByClass, { alert: 0, telemetry: 1, log: 1 });
      await outbox.ack([a.id, '12345']);
      s = outbox.stats();
      assert.equal(s.depth, 1);
      assert.equal(s.bytes, 101);
      assert.equal(s.acked, 1);
      assert.equal((await outbox.peek(10)).length, 1);
    } finally {
      await cleanup();
    }
  });

  test(`${name}: over budget, the oldest of the least important class goes first; alerts survive while others remain`, async () => {
    // each record is 1 (topic) + 99 payload = 100 bytes; budget holds 5
    const { outbox, cleanup } = await make(500);
    try {
      const events: Array<{ evicted: number; byClass: Record<string, number> }> = [];
      outbox.on('evicted', (e) => events.push(e));
      const alert = await outbox.append({ topic: 'a', priority: Priority.ALERT, payload: payload(0, 99) });
      const tel = await outbox.append({ topic: 't', priority: Priority.TELEMETRY, payload: payload(1, 99) });
      const logs = [];
      for (let i = 0; i < 3; i++) logs.push(await outbox.append({ topic: 'l', priority: Priority.LOG, payload: payload(i, 99) }));
      // full; a new alert evicts the oldest log
      const alert2 = await outbox.append({ topic: 'a', priority: Priority.ALERT, payload: payload(9, 99) });
      let ids = (await outbox.peek(10)).map((r) => r.id);
      assert.ok(!ids.includes(logs[0]!.id));
      assert.deepEqual(events.at(-1)?.byClass, { log: 1 });
      // more alerts: logs go, then telemetry, never an alert
      for (let i = 0; i < 3; i++) await outbox.append({ topic: 'a', priority: Priority.ALERT, payload: payload(i, 99) });
      ids = (await outbox.peek(10)).map((r) => r.id);
      assert.ok(ids.includes(alert.id) && ids.includes(alert2.id));
      assert.ok(!ids.includes(tel.id), 'telemetry evicted before any alert');
      assert.equal(outbox.stats().evicted, 4);
      assert.equal(outbox.stats().depthByClass.alert, 5);
      // a log record cannot evict alerts: refused with a stable code
      await assert.rejects(outbox.append({ topic: 'l', priority: Priority.LOG, payload: payload(1, 99) }), (e: unknown) => isFleetError(e, 'FLEET_OUTBOX_FULL'));
      // a record larger than the whole budget is refused
      await assert.rejects(outbox.append({ topic: 'a', priority: Priority.ALERT, payload: payload(1, 600) }), (e: unknown) => isFleetError(e, 'FLEET_OUTBOX_FULL'));
    } finally {
      await cleanup();
    }
  });

  test(`${name}: an append refused for the budget evicts nothing; one that fits evicts only what it needs, least important first`, async () => {
    const { outbox, cleanup } = await make(1000);
    try {
      const events: Array<{ evicted: number; byClass: Record<string, number> }> = [];
      outbox.on('evicted', (e) => events.push(e));
      await outbox.append({ topic: 'a', priority: Priority.ALERT, payload: payload(0, 699) }); // 700
      for (let i = 0; i < 5; i++) await outbox.append({ topic: 't', priority: Priority.TELEMETRY, payload: payload(i, 49) }); // 5 x 50
      await outbox.append({ topic: 'l', priority: Priority.LOG, payload: payload(7, 39) }); // 40: 990 held
      const before = (await outbox.peek(100)).map((r) => r.id);
      // 400 bytes of telemetry: with every telemetry and log record gone, 700 + 400 > 1000.
      // An ack beside it: a backend that writes operations in batches writes this one's batch.
      const [refused, acked] = await Promise.allSettled([outbox.append({ topic: 't', priority: Priority.TELEMETRY, payload: payload(9, 399) }), outbox.ack(['1'])]);
      assert.equal(acked.status, 'fulfilled');
      assert.ok(refused.status === 'rejected' && isFleetError(refused.reason, 'FLEET_OUTBOX_FULL'), String(refused.status === 'rejected' ? refused.reason : 'appended'));
      assert.deepEqual((await outbox.peek(100)).map((r) => r.id), before, 'the refused append evicted nothing');
      assert.equal(outbox.stats().evicted, 0);
      assert.equal(outbox.stats().bytes, 990);
      assert.equal(events.length, 0);
      // 100 bytes fit once 90 are freed: the log record, then the oldest telemetry
      const rec = await outbox.append({ topic: 't', priority: Priority.TELEMETRY, payload: payload(9, 99) });
      const after = (await outbox.peek(100)).map((r) => r.id);
      assert.deepEqual(after, [before[0], ...before.slice(2, 6), rec.id]);
      assert.equal(outbox.stats().evicted, 2);
      assert.deepEqual(events.at(-1)?.byClass, { log: 1, telemetry: 1 });
      assert.equal(outbox.stats().bytes, 1000);
    } finally {
      await cleanup();
    }
  });

  test(`${name}: an id acked twice, or acked while a peek is running, is counted once`, async () => {
    const { outbox, cleanup } = await make(1 << 24);
    try {
      const n = 3000;
      await Promise.all(Array.from({ length: n }, (_, i) => outbox.append({ topic: 't', priority: (i % 3) as Priority, payload: payload(i) })));
      const delivered = new Set<string>();
      // peeks and acks overlap, and every batch is acked twice, as a resend after a lost PUBACK would
      for (let round = 0; round < 100 && outbox.stats().depth > 0; round++) {
        const [a, b] = await Promise.all([outbox.peek(200), outbox.peek(200)]);
        const ids = [...new Set([...a, ...b].map((r) => r.id))];
        await Promise.all([outbox.ack(ids), outbox.ack(ids), outbox.peek(50)]);
        for (const id of ids) delivered.add(id);
        const s = outbox.stats();
        assert.ok(s.depth >= 0 && s.bytes >= 0 && Object.values(s.depthByClass).every((d) => d >= 0), JSON.stringify(s));
      }
      assert.equal(delivered.size, n);
      assert.equal(outbox.stats().depth, 0);
      assert.equal(outbox.stats().bytes, 0);
      assert.equal(outbox.stats().acked, n);
    } finally {
      await cleanup();
    }
  });

  test(`${name}: stats report the age of the oldest record`, async () => {
    const { outbox, cleanup } = await make(1 << 20);
    try {
      assert.equal(outbox.stats().oldestAgeMs, 0);
      await outbox.append({ topic: 'x', priority: Priority.LOG, payload: payload(1) });
      await new Promise((r) => setTimeout(r, 30));
      assert.ok(outbox.stats().oldestAgeMs >= 25);
    } finally {
      await cleanup();
    }
  });
}
