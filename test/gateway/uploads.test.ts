import { test } from 'node:test';
import assert from 'node:assert/strict';
import type { AddressInfo } from 'node:net';
import { blockOptionValue, coapUint, COAP_OPTION, parseBlockOption, parseCoapPacket, type CoapPacket } from '../../firmware-bridge/coap.ts';
import { Block1Assembler } from '../../gateway/uploads.ts';

const peer: AddressInfo = { address: '10.0.0.7', port: 5683, family: 'IPv4' };

/** A POST /mcu/v1/esp-1/log block as libcoap sends it: a new token (and message id) per block. */
function block(num: number, more: boolean, size: number, payload: Buffer, opts: { mid?: number; tag?: Buffer; query?: string } = {}): CoapPacket {
  const options: CoapPacket['options'] = [
    ...['mcu', 'v1', 'esp-1', 'log'].map((p) => ({ number: COAP_OPTION.URI_PATH, value: Buffer.from(p) })),
    { number: COAP_OPTION.URI_QUERY, value: Buffer.from(opts.query ?? 'c=1&m=x') },
    { number: COAP_OPTION.BLOCK1, value: blockOptionValue({ num, more, size }) },
  ];
  if (opts.tag) options.push({ number: COAP_OPTION.REQUEST_TAG, value: opts.tag });
  return { type: 0, code: 2, messageId: opts.mid ?? 1000 + num, token: Buffer.from([num + 1, 0xaa]), options, payload };
}

const codeOf = (d: Buffer) => {
  const p = parseCoapPacket(d)!;
  return `${p.code >> 5}.${String(p.code & 31).padStart(2, '0')}`;
};

test('Block1 reassembly by peer, path, query and Request-Tag — not token (RFC 7959 §2.5, libcoap new token per block)', () => {
  const drops: string[] = [];
  const asm = new Block1Assembler({ maxBytes: 1000, maxUploads: 2, idleMs: 60_000 }, (why) => drops.push(why));
  try {
    const body = Buffer.from('x'.repeat(64) + 'y'.repeat(64) + 'z'.repeat(10));
    const v0 = asm.handle(block(0, true, 64, body.subarray(0, 64)), peer);
    assert.equal(v0.kind, 'reply');
    const r0 = parseCoapPacket((v0 as { datagram: Buffer }).datagram)!;
    assert.equal(codeOf((v0 as { datagram: Buffer }).datagram), '2.31');
    assert.equal(r0.type, 2); // piggybacked ACK
    assert.equal(r0.messageId, 1000);
    assert.deepEqual(parseBlockOption(r0.options.find((o) => o.number === COAP_OPTION.BLOCK1)!.value), { num: 0, more: true, size: 64 });
    // a retransmission of block 0 (same message id) is answered again, not appended twice
    assert.equal(asm.handle(block(0, true, 64, body.subarray(0, 64)), peer).kind, 'reply');
    assert.equal(asm.handle(block(1, true, 64, body.subarray(64, 128)), peer).kind, 'reply');
    assert.equal(asm.handle(block(1, true, 64, body.subarray(64, 128)), peer).kind, 'reply');
    const last = asm.handle(block(2, false, 64, body.subarray(128)), peer);
    assert.equal(last.kind, 'pass');
    const whole = parseCoapPacket((last as { datagram: Buffer }).datagram)!;
    assert.deepEqual(whole.payload, body);
    assert.equal(whole.options.some((o) => o.number === COAP_OPTION.BLOCK1), false);
    assert.equal(whole.messageId, 1002);
    // the final block retransmitted: the same whole request again (the package answers it from its cache)
    assert.equal(asm.handle(block(2, false, 64, body.subarray(128)), peer).kind, 'pass');
    assert.equal(asm.inProgress, 0);
  } finally {
    asm.close();
  }
});

test('Block1: gap 4.08, over the size limit 4.13 with Size1, too many at once 5.03, a block that grows 4.08; each counted', () => {
  const drops: string[] = [];
  const asm = new Block1Assembler({ maxBytes: 100, maxUploads: 2, idleMs: 60_000 }, (why) => drops.push(why));
  try {
    const b = Buffer.alloc(32, 1);
    asm.handle(block(0, true, 32, b), peer);
    assert.equal(codeOf((asm.handle(block(2, true, 32, b), peer) as { datagram: Buffer }).datagram), '4.08');
    assert.equal(codeOf((asm.handle(block(5, true, 32, b, { query: 'c=9&m=y' }), peer) as { datagram: Buffer }).datagram), '4.08');
    for (let n = 0; n < 3; n++) asm.handle(block(n, true, 32, b, { query: 'c=2&m=x' }), peer);
    const big = asm.handle(block(3, true, 32, b, { query: 'c=2&m=x' }), peer) as { datagram: Buffer };
    assert.equal(codeOf(big.datagram), '4.13');
    assert.equal(coapUint(parseCoapPacket(big.datagram)!.options.find((o) => o.number === COAP_OPTION.SIZE1)!.value), 100);
    // two uploads in progress (different Request-Tags), a third is refused
    asm.handle(block(0, true, 32, b, { tag: Buffer.from([1]) }), peer);
    asm.handle(block(0, true, 32, b, { tag: Buffer.from([2]) }), peer);
    assert.equal(codeOf((asm.handle(block(0, true, 32, b, { tag: Buffer.from([3]) }), peer) as { datagram: Buffer }).datagram), '5.03');
    // block size may shrink but not grow
    assert.equal(codeOf((asm.handle(block(1, true, 64, Buffer.alloc(64)), { ...peer, port: 1 }) as { datagram: Buffer }).datagram), '4.08');
    assert.ok(drops.length >= 4, drops.join(','));
  } finally {
    asm.close();
  }
});
