import assert from 'node:assert/strict';
import { connect, type Socket } from 'node:net';
import { test } from 'node:test';
import mqttPacket from 'mqtt-packet';
import type { LeanServerOptions } from '../../gateway/mqtt-lean.ts';
import { rng, waitFor } from '../helpers.ts';
import { connectPk, leanRig, pk, publishPk, type LeanRig } from './lean-rig.ts';

/**
 * gateway/mqtt-lean.ts receive buffering: a packet split over many TCP segments is copied
 * together once (it used to be concatenated again on every segment, O(n²) bytes), whole
 * packets per segment are not copied at all, and splitting changes nothing that is handled.
 * Real sockets on 127.0.0.1 with TCP_NODELAY; the writer yields to the event loop between
 * writes so the server reads them as separate chunks (counted on the server's socket).
 * No timing assertions: copying is read from the server's rxCopiedBytes counter.
 */

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const turn = () => new Promise((r) => setImmediate(r));
const rig = (opts: Partial<LeanServerOptions> = {}, storeMs = 0): Promise<LeanRig> => leanRig(opts, storeMs);

/** A TCP_NODELAY client, CONNECTed as `id`; `chunks()` counts the 'data' events of the server's side of it; `closed` = the server closed. */
async function client(r: LeanRig, id: string): Promise<{ s: Socket; got: mqttPacket.Packet[]; chunks: () => number; closed: Promise<void> }> {
  const s = connect({ port: r.port, host: '127.0.0.1', noDelay: true, allowHalfOpen: true });
  const got: mqttPacket.Packet[] = [];
  const parser = mqttPacket.parser({ protocolVersion: 4 });
  parser.on('packet', (p) => got.push(p));
  s.on('data', (d) => parser.parse(d));
  s.on('error', () => undefined);
  // the server's FIN or reset (the client is half-open capable: 'end' comes before any 'close')
  const closed = new Promise<void>((res) => {
    s.once('end', () => res());
    s.once('close', () => res());
  });
  await new Promise((res, rej) => {
    s.once('connect', res);
    s.once('error', rej);
  });
  s.write(connectPk(id));
  await waitFor(() => got.some((p) => p.cmd === 'connack'), 'CONNACK');
  let n = 0;
  r.srv.sessions.get(id)!.socket.on('data', () => n++);
  return { s, got, chunks: () => n, closed };
}

/** Write `buf` in pieces of the given sizes (cycled), yielding to the event loop after each. */
async function writeInPieces(s: Socket, buf: Buffer, size: (i: number) => number): Promise<number> {
  let writes = 0;
  for (let o = 0; o < buf.length; writes++) {
    const n = Math.max(1, size(writes));
    s.write(buf.subarray(o, o + n));
    o += n;
    await turn();
  }
  return writes;
}

test('mqtt-lean rx: a 16 KB PUBLISH written 1 byte at a time (TCP_NODELAY, thousands of segments) is stored intact and copied about once, not once per segment', async () => {
  const r = await rig();
  try {
    const c = await client(r, 'big');
    const payload = Buffer.alloc(16_000);
    for (let i = 0; i < payload.length; i++) payload[i] = (i * 31 + 7) & 0xff;
    const packet = publishPk('mcu/v1/big/t', payload, 1, 5);
    const before = r.srv.rxCopiedBytes;
    await writeInPieces(c.s, packet, () => 1);
    await waitFor(() => c.got.some((p) => p.cmd === 'puback'), 'PUBACK of the large packet');
    const copied = r.srv.rxCopiedBytes - before;
    assert.equal(r.stored.length, 1);
    assert.ok(r.stored[0]!.equals(payload), 'payload stored byte for byte');
    assert.deepEqual(r.events, []);
    // the test is only meaningful if the server really saw the packet in many pieces
    assert.ok(c.chunks() > 1000, `server read ${c.chunks()} chunks`);
    // once: the packet plus the few header bytes copied while its length was incomplete
    // (concatenating per chunk copied about n²/2 / chunk size: 128 MB here at 1 byte per chunk)
    assert.ok(copied <= 2 * packet.length, `copied ${copied} bytes for a ${packet.length}-byte packet in ${c.chunks()} chunks`);
    c.s.destroy();
  } finally {
    await r.srv.close();
  }
});

test('mqtt-lean rx: whole small packets, one per segment (the hot path), are not copied at all', async () => {
  const r = await rig();
  try {
    const c = await client(r, 'hot');
    const before = r.srv.rxCopiedBytes;
    for (let i = 0; i < 300; i++) {
      c.s.write(publishPk('mcu/v1/hot/t', `m${i}`, (i % 2) as 0 | 1, i + 1));
      if (i % 10 === 9) await sleep(1);
    }
    await waitFor(() => r.stored.length === 300, '300 stored');
    assert.deepEqual(r.stored.map(String), Array.from({ length: 300 }, (_, i) => `m${i}`));
    assert.equal(r.srv.rxCopiedBytes - before, 0);
    c.s.destroy();
  } finally {
    await r.srv.close();
  }
});

test('mqtt-lean rx: a stream of QoS 0/1 PUBLISHes of 0 B to 5 KB cut at random places (seeded) is handled exactly as whole: every payload in order, PUBACKs in order, copying linear; also behind a slow store (15 ms per PUBLISH)', async () => {
  for (const storeMs of [0, 15]) {
    const r = await rig({ maxRemainingLength: 8 * 1024 }, storeMs);
    try {
      const seed = 0x5eed + storeMs;
      const rand = rng(seed);
      const c = await client(r, 'rand');
      const payloads: Buffer[] = [];
      const parts: Buffer[] = [];
      for (let i = 0; i < 120; i++) {
        const p = Buffer.alloc(rand(4) === 0 ? rand(5000) : rand(40), i & 0xff);
        payloads.push(p);
        parts.push(publishPk('mcu/v1/rand/t', p, (i % 2) as 0 | 1, i + 1));
      }
      parts.push(pk({ cmd: 'pingreq' }));
      const stream = Buffer.concat(parts);
      const before = r.srv.rxCopiedBytes;
      await writeInPieces(c.s, stream, () => [1, 2, 3, 7, 64, 700, 3000][rand(7)]!);
      await waitFor(() => c.got.some((p) => p.cmd === 'pingresp'), `PINGRESP (seed ${seed})`, 20_000);
      assert.equal(r.stored.length, payloads.length, `seed ${seed}`);
      for (let i = 0; i < payloads.length; i++) assert.ok(r.stored[i]!.equals(payloads[i]!), `payload ${i} (seed ${seed})`);
      assert.deepEqual(
        c.got.filter((p) => p.cmd === 'puback').map((p) => (p as mqttPacket.IPubackPacket).messageId),
        Array.from({ length: 60 }, (_, k) => 2 * k + 2),
      );
      assert.deepEqual(r.events, []);
      const copied = r.srv.rxCopiedBytes - before;
      assert.ok(copied <= 2 * stream.length, `copied ${copied} of ${stream.length} bytes (seed ${seed})`);
      c.s.destroy();
    } finally {
      await r.srv.close();
    }
  }
});

test('mqtt-lean rx: refusals still come from the first bytes when they arrive one at a time: a bad first byte at once, a too-large length before its body', async () => {
  const r = await rig({ maxRemainingLength: 1024 });
  try {
    // a packet type a client never sends, as the first byte after CONNECT, alone
    const a = await client(r, 'bad');
    a.s.write(Buffer.from([0x20]));
    await a.closed;
    assert.match(r.events[0] ?? '', /^malformed packet type 2/);
    // a PUBLISH declaring 2,000,000 bytes, its length in three 1-byte segments: refused without a body
    const b = await client(r, 'large');
    for (const byte of [0x30, 0x80, 0x89, 0x7a]) {
      if (b.s.destroyed) break;
      b.s.write(Buffer.from([byte]));
      await sleep(5);
    }
    await b.closed;
    assert.match(r.events[1] ?? '', /^tooLarge MQTT packet of at least \d+ bytes exceeds the limit of 1024/);
    // five length bytes: malformed, also when they come one by one
    const m = await client(r, 'five');
    for (const byte of [0x30, 0x80, 0x80, 0x80, 0x80, 0x01]) {
      if (m.s.destroyed) break;
      m.s.write(Buffer.from([byte]));
      await sleep(5);
    }
    await m.closed;
    assert.ok(r.events[2]?.startsWith('malformed') || r.events[2]?.startsWith('tooLarge'), r.events[2]);
  } finally {
    await r.srv.close();
  }
});

test('mqtt-lean rx: QoS 0 PUBLISHes that arrived in pieces while a store was pending, then a FIN, are still stored (drainClosed over held pieces)', async () => {
  const r = await rig({}, 80);
  try {
    const c = await client(r, 'fin');
    const parts = [publishPk('mcu/v1/fin/t', 'first', 0)];
    for (let i = 0; i < 4; i++) parts.push(publishPk('mcu/v1/fin/t', Buffer.alloc(900, 65 + i), 0));
    const stream = Buffer.concat(parts);
    // the first PUBLISH whole (its store takes 80 ms), the rest in 50-byte pieces behind it, then FIN
    const first = parts[0]!.length;
    c.s.write(stream.subarray(0, first));
    await sleep(5);
    await writeInPieces(c.s, stream.subarray(first), () => 50);
    c.s.end();
    await waitFor(() => r.stored.length === 5, '5 stored');
    await c.closed;
    assert.deepEqual(r.stored.map((b) => b.toString().slice(0, 5)), ['first', 'AAAAA', 'BBBBB', 'CCCCC', 'DDDDD']);
    assert.deepEqual(r.stored.slice(1).map((b) => b.length), [900, 900, 900, 900]);
  } finally {
    await r.srv.close();
  }
});
