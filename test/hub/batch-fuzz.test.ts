import { test } from 'node:test';
import assert from 'node:assert/strict';
import { BATCH_MAGIC, BATCH_VERSION, MAX_BATCH_ITEMS, batchWriter, decodeBatch, encodeBatch, peekMid, type BatchItem } from '../../core/batch.ts';
import { isFleetError } from '../../core/errors.ts';
import { encodeMessage } from '../../core/messages.ts';
import { rng as xorshift } from '../helpers.ts';

/** integers and bytes from one reproducible stream; the seed is in the failure message */
function rng(seed: number): { int(n: number): number; bytes(n: number): Buffer } {
  const next = xorshift(seed);
  return { int: next, bytes: (n) => Buffer.from(Array.from({ length: n }, () => next(256))) };
}


/** decodeBatch either returns well-formed items or throws FLEET_MSG_INVALID; nothing else. */
function check(buf: Buffer, what: string): BatchItem[] | null {
  let items: BatchItem[];
  try {
    items = decodeBatch(buf);
  } catch (err) {
    assert.ok(isFleetError(err, 'FLEET_MSG_INVALID'), `${what}: threw ${String(err)}`);
    return null;
  }
  assert.ok(Array.isArray(items), what);
  assert.ok(items.length <= MAX_BATCH_ITEMS, what);
  let total = 2;
  for (const it of items) {
    assert.equal(typeof it.topic, 'string', what);
    const tl = Buffer.byteLength(it.topic);
    assert.ok(tl > 0 && tl <= 1024 * 3, `${what}: topic length ${tl}`); // ≤ 1024 input bytes, U+FFFD may widen
    assert.ok(Buffer.isBuffer(it.payload), what);
    // payloads are views into the input, never past its end
    assert.equal(it.payload.buffer, buf.buffer, what);
    assert.ok(it.payload.byteOffset >= buf.byteOffset && it.payload.byteOffset + it.payload.length <= buf.byteOffset + buf.length, what);
    total += it.payload.length;
  }
  assert.ok(total <= buf.length, what);
  // peekMid is the other parser that reads device bytes at the hub
  for (const it of items) {
    const mid = peekMid(it.payload);
    assert.ok(mid === null || /^[0-9]{1,20}$/.test(mid), what);
  }
  return items;
}

function validBatch(r: ReturnType<typeof rng>): { buf: Buffer; items: BatchItem[] } {
  const n = 1 + r.int(20);
  const items: BatchItem[] = [];
  for (let i = 0; i < n; i++) {
    const payload = r.int(4) === 0 ? r.bytes(r.int(300)) : encodeMessage({ v: 1, mid: String(r.int(1e9)), ts: 1, samples: [] });
    items.push({ topic: `fleet/v1/d/dev-${r.int(5)}/telemetry`, payload });
  }
  return { buf: encodeBatch(items), items };
}

test('batch fuzz: random bytes, truncations and mutations of valid batches only ever decode or throw FLEET_MSG_INVALID', () => {
  const seed = Number(process.env.FLEETLET_FUZZ_SEED ?? 0x5eed);
  const r = rng(seed);
  let decoded = 0;
  let refused = 0;
  const count = (x: BatchItem[] | null) => (x ? decoded++ : refused++);

  for (let i = 0; i < 3000; i++) {
    // random bytes, half of them behind a valid header so the item loop is reached
    const body = r.bytes(r.int(200));
    const buf = r.int(2) ? Buffer.concat([Buffer.from([BATCH_MAGIC, BATCH_VERSION]), body]) : body;
    count(check(buf, `seed ${seed} random #${i}`));
  }
  for (let i = 0; i < 300; i++) {
    const { buf, items } = validBatch(r);
    const back = check(buf, `seed ${seed} valid #${i}`);
    assert.ok(back);
    assert.deepEqual(back.map((x) => [x.topic, x.payload.toString('hex')]), items.map((x) => [x.topic, x.payload.toString('hex')]));
    assert.ok(encodeBatch(back).equals(buf), 'round trip');
    // every truncation of some of them (quadratic: a sample is enough)
    if (i % 10 === 0) for (let cut = 0; cut < buf.length; cut++) count(check(buf.subarray(0, cut), `seed ${seed} valid #${i} cut at ${cut}`));
    // mutations: flip, insert, delete bytes
    for (let m = 0; m < 20; m++) {
      const mut = Buffer.from(buf);
      const k = 1 + r.int(4);
      let out: Buffer = mut;
      for (let j = 0; j < k; j++) {
        const at = r.int(out.length);
        const op = r.int(3);
        if (op === 0) out[at] = r.int(256);
        else if (op === 1) out = Buffer.concat([out.subarray(0, at), r.bytes(1 + r.int(4)), out.subarray(at)]);
        else out = Buffer.concat([out.subarray(0, at), out.subarray(at + 1 + r.int(4))]);
      }
      count(check(out, `seed ${seed} valid #${i} mutation #${m}`));
    }
  }
  assert.ok(decoded > 100 && refused > 100, `both outcomes exercised (${decoded} decoded, ${refused} refused)`);
});

test('batch fuzz: the bounds hold — item count, topic length, varint length', () => {
  const many = encodeBatch(Array.from({ length: MAX_BATCH_ITEMS + 1 }, () => ({ topic: 't', payload: Buffer.alloc(0) })));
  assert.throws(() => decodeBatch(many), (e) => isFleetError(e, 'FLEET_MSG_INVALID'));
  assert.equal(decodeBatch(many.subarray(0, many.length - 3)).length, MAX_BATCH_ITEMS);
  const longTopic = encodeBatch([{ topic: 'x'.repeat(1025), payload: Buffer.alloc(1) }]);
  assert.throws(() => decodeBatch(longTopic), (e) => isFleetError(e, 'FLEET_MSG_INVALID'));
  // a fifth varint byte is refused, whatever follows
  assert.throws(() => decodeBatch(Buffer.from([BATCH_MAGIC, BATCH_VERSION, 0x81, 0x80, 0x80, 0x80, 0x00])), (e) => isFleetError(e, 'FLEET_MSG_INVALID'));
  // a payload length far past the end
  assert.throws(() => decodeBatch(Buffer.from([BATCH_MAGIC, BATCH_VERSION, 0x01, 0x74, 0xff, 0xff, 0xff, 0x7f])), (e) => isFleetError(e, 'FLEET_MSG_INVALID'));
  assert.deepEqual(decodeBatch(Buffer.from([BATCH_MAGIC, BATCH_VERSION])), []);
});

/** The framing of docs/topics.md written out plainly, byte by byte: the oracle for batchWriter and encodeBatch. */
function referenceBatch(items: ReadonlyArray<{ topic: string; payload: Buffer }>): Buffer {
  const out: number[] = [BATCH_MAGIC, BATCH_VERSION];
  const varint = (n: number) => {
    while (n >= 0x80) {
      out.push((n & 0x7f) | 0x80);
      n = Math.floor(n / 128);
    }
    out.push(n);
  };
  for (const it of items) {
    const t = Buffer.from(it.topic, 'utf8');
    varint(t.length);
    out.push(...t);
    varint(it.payload.length);
    out.push(...it.payload);
  }
  return Buffer.from(out);
}

test('batchWriter and encodeBatch write the documented framing (string and Buffer payloads, multi-byte UTF-8, 2-byte varints), at any offset; decodeBatch reads it back', () => {
  const r = rng(7);
  for (let round = 0; round < 200; round++) {
    const items = Array.from({ length: 1 + r.int(40) }, (_, i) => {
      const text = `{"v":1,"mid":"${round}${i}","s":"${'é'.repeat(r.int(3) === 0 ? 100 : r.int(5))}"}`;
      return { topic: `fleet/v1/d/mcü-${r.int(1000)}/telemetry`, text, bin: r.int(4) === 0 ? r.bytes(r.int(300)) : null };
    });
    const asBuffers = items.map((it) => ({ topic: it.topic, payload: it.bin ?? Buffer.from(it.text) }));
    const expected = referenceBatch(asBuffers);
    assert.ok(encodeBatch(asBuffers).equals(expected), `round ${round}: encodeBatch`);
    assert.deepEqual(decodeBatch(expected), asBuffers, `round ${round}: decodeBatch`);
    const w = batchWriter(items.map((it) => ({ topic: it.topic, payload: it.bin ?? it.text })));
    assert.equal(w.size, expected.length, `round ${round}`);
    const at = r.int(16);
    const buf = Buffer.alloc(at + w.size + 3, 0xee);
    w.write(buf, at);
    assert.ok(buf.subarray(at, at + w.size).equals(expected), `round ${round}`);
    assert.ok(buf.subarray(0, at).every((b) => b === 0xee) && buf.subarray(at + w.size).every((b) => b === 0xee), `round ${round}: wrote outside its bytes`);
  }
});
