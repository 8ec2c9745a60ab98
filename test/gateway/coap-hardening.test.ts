import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { createSocket, type Socket } from 'node:dgram';
import { EventEmitter } from 'node:events';
import { setTimeout as sleep } from 'node:timers/promises';
import { updateTiming } from 'coap';
import { ERROR_CODES } from '../../core/errors.ts';
import type { CommandReply } from '../../core/messages.ts';
import { McuKeys, mcuKey, ReplayGuard, signMcuMessage, type MacResource } from '../../firmware-bridge/auth.ts';
import { blockOptionValue, buildCoapPacket, COAP_OPTION, coapUint, coapUintValue, parseBlockOption, parseCoapPacket, SENML_JSON_FORMAT, type CoapPacket } from '../../firmware-bridge/coap.ts';
import { decodeMcuCommand } from '../../firmware-bridge/frames.ts';
import { McuCoapIngress, RecentExchanges, sendDatagram } from '../../gateway/coap-ingress.ts';
import type { ServedImage } from '../../gateway/firmware.ts';
import { LogThrottle, type DropReason } from '../../gateway/ingress.ts';
import type { McuService } from '../../gateway/service.ts';
import { testLogger, waitFor } from '../helpers.ts';
import { coap, of, registered, withEnv } from './env.ts';

/**
 * The gateway's CoAP ingress against hostile and unusual datagrams (review of session 17):
 * the real McuCoapIngress (coap package, ReplayGuard, McuKeys) on 127.0.0.1 port 0, a stand-in
 * for the McuService behind it, and raw UDP clients, so every byte sent and received is seen.
 */

const SITE = 'coap-hardening-site-secret-0001';

/** What McuCoapIngress calls on its service; stores after `storeMs` (an fsync). */
class StubService extends EventEmitter {
  storeMs = 0;
  stored: Array<{ resource: string; payload: Buffer }> = [];
  image: ServedImage | null = null;
  admit(): number {
    return 0;
  }
  touch(): void {}
  private store(resource: string, payload: Buffer): Promise<void> {
    return sleep(this.storeMs).then(() => void this.stored.push({ resource, payload }));
  }
  telemetry(_id: string, _p: string, payload: Buffer): Promise<void> {
    return this.store('t', payload);
  }
  hello(_id: string, _p: string, payload: Buffer): Promise<void> {
    return this.store('hello', payload);
  }
  ack(_id: string, _p: string, payload: Buffer): Promise<void> {
    return this.store('ack', payload);
  }
  upload(_id: string, _p: string, payload: Buffer): Promise<void> {
    return this.store('log', payload);
  }
  nextCommand(): Buffer | null {
    return null;
  }
  firmwareFor(): ServedImage | null {
    return this.image;
  }
  firmwareServed(): void {}
}

interface Rig {
  ing: McuCoapIngress;
  service: StubService;
  dropped: DropReason[];
  log: ReturnType<typeof testLogger>;
  /** a raw client on 127.0.0.1: every datagram it got, parsed */
  got: CoapPacket[];
  send(buf: Buffer): Promise<void>;
}

async function withIngress(fn: (rig: Rig) => Promise<void>, responseCacheBytes?: number): Promise<void> {
  const service = new StubService();
  const dropped: DropReason[] = [];
  const log = testLogger('coap');
  const ing = await McuCoapIngress.start({
    revoked: () => false,
    host: '127.0.0.1',
    port: 0,
    keys: new McuKeys(SITE, 1000),
    guard: new ReplayGuard({ window: 32, maxMcus: 1000 }),
    maxPayloadBytes: 16384,
    maxRecords: 256,
    maxUploadBytes: 65536,
    maxUploads: 8,
    responseCacheBytes,
    log,
    hooks: { accepted() {}, dropped: (_p, reason) => void dropped.push(reason), throttled() {}, authFailed() {}, subscribeDenied() {} },
    service: service as unknown as McuService,
  });
  const sock = createSocket('udp4');
  await new Promise<void>((r) => sock.bind(0, '127.0.0.1', () => r()));
  const got: CoapPacket[] = [];
  sock.on('message', (m) => got.push(parseCoapPacket(m)!));
  const send = (buf: Buffer) => new Promise<void>((r, j) => sock.send(buf, ing.port, '127.0.0.1', (err) => (err ? j(err) : r())));
  try {
    await fn({ ing, service, dropped, log, got, send });
  } finally {
    await new Promise<void>((r) => sock.close(() => r()));
    await ing.close(100);
  }
}

let counter = Date.now();
/** A request to /mcu/v1/{id}/{resource}, signed with the MCU's key (or `mac` as given). */
function request(o: { id: string; resource: MacResource; code?: number; type?: number; mid: number; token?: Buffer; payload?: Buffer; options?: CoapPacket['options']; mac?: string; query?: string }): Buffer {
  const c = ++counter;
  const payload = o.payload ?? Buffer.alloc(0);
  const mac = o.mac ?? signMcuMessage(mcuKey(SITE, o.id), o.id, o.resource, c, payload);
  const options: CoapPacket['options'] = [
    ...['mcu', 'v1', o.id, o.resource].map((s) => ({ number: COAP_OPTION.URI_PATH, value: Buffer.from(s) })),
    { number: COAP_OPTION.URI_QUERY, value: Buffer.from(`c=${c}`) },
    { number: COAP_OPTION.URI_QUERY, value: Buffer.from(`m=${mac}`) },
    ...(o.query ? [{ number: COAP_OPTION.URI_QUERY, value: Buffer.from(o.query) }] : []),
    ...(o.options ?? []),
  ];
  const code = o.code ?? (o.resource === 'cmd' || o.resource === 'fw' ? 0x01 : 0x02);
  return buildCoapPacket({ type: o.type ?? 0, code, messageId: o.mid, token: o.token ?? Buffer.from([o.mid & 0xff, 0x5a]), options, payload });
}

const FORGED = 'AAAAAAAAAAAAAAAAAAAAAA';
const codeOf = (p: CoapPacket) => `${p.code >> 5}.${String(p.code & 31).padStart(2, '0')}`;
const option = (p: CoapPacket, n: number) => p.options.find((o) => o.number === n)?.value;
const answerTo = (got: CoapPacket[], mid: number) => got.find((p) => p.messageId === mid && p.type === 2);

test('source port 0 (synthetic "message" event on the ingress socket, and the send helper directly: a real port-0 datagram needs a raw socket, i.e. root): dropped and counted, nothing thrown', async () => {
  // the helper every datagram the gateway sends itself goes through
  const sock: Socket = createSocket('udp4');
  await new Promise<void>((r) => sock.bind(0, '127.0.0.1', () => r()));
  try {
    const errors: unknown[] = [];
    assert.doesNotThrow(() => sendDatagram(sock, Buffer.from([0x70, 0, 0, 1]), { port: 0, address: '127.0.0.1' }, (err) => errors.push(err)));
    assert.equal(errors.length, 1);
    assert.equal((errors[0] as NodeJS.ErrnoException).code, 'ERR_SOCKET_BAD_PORT');
  } finally {
    await new Promise<void>((r) => sock.close(() => r()));
  }

  await withIngress(async ({ ing, dropped }) => {
    // what Linux delivers for a datagram with UDP source port 0 (port0.ts of the review, raw)
    const socket = (ing as unknown as { socket: Socket }).socket;
    const from = { address: '127.0.0.1', port: 0, family: 'IPv4', size: 0 };
    const forged = request({ id: 'esp-p0', resource: 't', mid: 7, payload: Buffer.from('[]'), mac: FORGED });
    const block1 = buildCoapPacket({ type: 0, code: 2, messageId: 8, token: Buffer.from([0xbb]), options: [{ number: COAP_OPTION.URI_PATH, value: Buffer.from('x') }, { number: COAP_OPTION.BLOCK1, value: blockOptionValue({ num: 3, more: true, size: 64 }) }], payload: Buffer.alloc(64) });
    const ping = Buffer.from([0x40, 0, 0, 9]);
    for (const d of [forged, block1, ping, request({ id: 'esp-p0', resource: 'cmd', mid: 10, mac: FORGED })]) {
      assert.doesNotThrow(() => socket.emit('message', d, { ...from, size: d.length }));
    }
    await sleep(100);
    assert.deepEqual(dropped, ['bad_request', 'bad_request', 'bad_request', 'bad_request']);
  });
});

test('a separate (CON) response the client never acknowledges does not crash the gateway (timing shortened with the coap package\'s updateTiming)', async () => {
  await withIngress(async ({ service, got, send, log }) => {
    service.storeMs = 1500; // over PIGGYBACK_MS (1 s): an empty ACK, then the answer as a separate CON
    // RetrySend gives up after EXCHANGE_LIFETIME: about 0.5 s here instead of 57 s
    updateTiming({ ackTimeout: 0.1, maxRetransmit: 1, maxLatency: 0.1 });
    try {
      await send(request({ id: 'esp-sep', resource: 'log', mid: 4242, payload: Buffer.from('boot: panic at 0x4008\n') }));
      await waitFor(() => got.some((p) => p.type === 0 && codeOf(p) === '2.04'), 'the separate 2.04');
      assert.ok(got.some((p) => p.type === 2 && p.code === 0 && p.messageId === 4242), 'the empty ACK first');
      // never acknowledged: the package's sender gives up and emits 'error' on the response
      await waitFor(() => log.lines.some((l) => l.msg === 'CoAP response failed'), 'the give-up logged', 5000);
      assert.equal(service.stored.length, 1);
    } finally {
      updateTiming({ ackTimeout: 2, maxRetransmit: 4, maxLatency: 5 });
    }
  });
});

test('a package-path answer whose send fails (EACCES: a forged GET cmd from the broadcast address, synthetic "message" event on the ingress socket) does not crash the gateway', async () => {
  await withIngress(async ({ ing, log, dropped }) => {
    const socket = (ing as unknown as { socket: Socket }).socket;
    const d = request({ id: 'esp-bc', resource: 'cmd', mid: 77, mac: FORGED });
    socket.emit('message', d, { address: '255.255.255.255', port: 5683, family: 'IPv4', size: d.length });
    await waitFor(() => log.lines.some((l) => l.msg === 'CoAP response failed'), 'the send error logged');
    assert.deepEqual(dropped, ['auth']);
  });
});

test('firmware Block2: blocks cut by the gateway with one ETag, the image sha256 prefix, for all blocks of a 4 MiB image; Size2 when asked; SZX 7 is 4.00; error answers carry no Block2 and keep their diagnostic', async () => {
  await withIngress(async ({ service, got, send }) => {
    const data = randomBytes(4 * 1024 * 1024);
    const sha256 = createHash('sha256').update(data).digest();
    service.image = { version: '2.0.0', data, sha256 };
    const id = 'esp-fw';
    // blocks go only to the address of a counter-consuming request: a mailbox read first
    await send(request({ id, resource: 'cmd', mid: 1 }));
    await waitFor(() => answerTo(got, 1), 'the mailbox answer');
    assert.equal(codeOf(answerTo(got, 1)!), '2.05');

    const block2 = (num: number, size: number) => ({ number: COAP_OPTION.BLOCK2, value: blockOptionValue({ num, more: false, size }) });
    const fetchBlock = async (mid: number, options: CoapPacket['options'], query?: string) => {
      await send(request({ id, resource: 'fw', mid, options, ...(query ? { query } : {}) }));
      return waitFor(() => answerTo(got, mid), `the answer to ${mid}`);
    };
    const etags = new Set<string>();
    for (const [mid, num, size] of [[10, 0, 1024], [11, 1, 1024], [12, 4095, 1024], [13, 1000, 64], [14, 7, 16]] as const) {
      const a = await fetchBlock(mid, [block2(num, size), ...(mid === 10 ? [{ number: COAP_OPTION.SIZE2, value: Buffer.alloc(0) }] : [])]);
      assert.equal(codeOf(a), '2.05');
      const b = parseBlockOption(option(a, COAP_OPTION.BLOCK2)!)!;
      assert.deepEqual(b, { num, more: (num + 1) * size < data.length, size });
      assert.deepEqual(a.payload, data.subarray(num * size, (num + 1) * size));
      etags.add(option(a, 4)!.toString('hex')); // ETag, RFC 7252 §5.10.6
      assert.equal(option(a, COAP_OPTION.SIZE2) === undefined, mid !== 10, 'Size2 only when asked');
      if (mid === 10) assert.equal(coapUint(option(a, COAP_OPTION.SIZE2)!), data.length);
    }
    assert.deepEqual([...etags], [sha256.subarray(0, 8).toString('hex')]);

    // past the end: 4.02; the reserved SZX 7: 4.00 (RFC 7959 §2.2)
    assert.equal(codeOf(await fetchBlock(20, [block2(4096, 1024)])), '4.02');
    const szx7 = await fetchBlock(21, [{ number: COAP_OPTION.BLOCK2, value: Buffer.from([0x17]) }]);
    assert.equal(codeOf(szx7), '4.00');
    assert.equal(szx7.payload.toString(), 'FLEET_MSG_INVALID');
    // an error answer to block 5 is the error, with its diagnostic, not a block
    const wrong = await fetchBlock(22, [block2(5, 256)], 'h=0000000000000000');
    assert.equal(codeOf(wrong), '4.12');
    assert.equal(wrong.payload.toString(), 'FLEET_MCU_NO_FIRMWARE');
    assert.equal(option(wrong, COAP_OPTION.BLOCK2), undefined);
    assert.equal(option(wrong, 4), undefined);
  });
});

test('Block1 with the reserved SZX 7 is answered 4.00 (RFC 7959 §2.2) and counted, not dropped in silence', async () => {
  await withIngress(async ({ got, send, dropped }) => {
    await send(request({ id: 'esp-b1', resource: 'log', mid: 31, payload: Buffer.alloc(16), options: [{ number: COAP_OPTION.BLOCK1, value: Buffer.from([0x0f]) }] }));
    const a = await waitFor(() => answerTo(got, 31), 'the answer');
    assert.equal(codeOf(a), '4.00');
    assert.equal(a.payload.toString(), 'FLEET_MSG_INVALID');
    assert.deepEqual(dropped, ['bad_request']);
  });
});

test('CoAP ping: an Empty CON gets a Reset with its message id; an Empty NON is dropped', async () => {
  await withIngress(async ({ got, send, dropped }) => {
    await send(Buffer.from([0x40, 0x00, 0x12, 0x34])); // CON 0.00, mid 0x1234, no token
    await waitFor(() => got.length === 1, 'the answer to the ping');
    assert.deepEqual({ type: got[0]!.type, code: got[0]!.code, mid: got[0]!.messageId, token: got[0]!.token.length, payload: got[0]!.payload.length }, { type: 3, code: 0, mid: 0x1234, token: 0, payload: 0 });
    await send(Buffer.from([0x50, 0x00, 0x12, 0x35])); // NON 0.00
    await waitFor(() => dropped.length === 1, 'the NON dropped');
    assert.deepEqual(dropped, ['bad_request']);
    await sleep(150); // an answer would have been sent with the drop
    assert.equal(got.length, 1, 'nothing for the NON');
  });
});

test('mailbox deregistrations (GET cmd, Observe 1: no key needed) are answered 2.05 and leave nothing in the response cache', async () => {
  await withIngress(async ({ ing, got, send }) => {
    const n = 100;
    for (let i = 0; i < n; i++) {
      const options = [...['mcu', 'v1', `esp-d${i}`, 'cmd'].map((s) => ({ number: COAP_OPTION.URI_PATH, value: Buffer.from(s) })), { number: COAP_OPTION.OBSERVE, value: coapUintValue(1) }];
      await send(buildCoapPacket({ type: 0, code: 0x01, messageId: 5000 + i, token: Buffer.from([i]), options, payload: Buffer.alloc(0) }));
    }
    await waitFor(() => got.length === n, `${n} answers`);
    assert.ok(got.every((p) => p.type === 2 && codeOf(p) === '2.05' && p.payload.length === 0));
    assert.equal(ing.cachedAnswers, 0);
  });
});

test('the response cache is bounded by what an entry really costs (~550 bytes), not by its datagram bytes', async () => {
  // a budget of about 20 entries; the package counted 6-20 bytes each, so it kept all 60
  await withIngress(async ({ ing, got, send }) => {
    const n = 60;
    for (let i = 0; i < n; i++) await send(request({ id: `esp-c${i % 3}`, resource: 'cmd', mid: 6000 + i }));
    await waitFor(() => got.length === n, `${n} answers`);
    assert.ok(got.every((p) => codeOf(p) === '2.05'));
    assert.ok(ing.cachedAnswers > 0 && ing.cachedAnswers <= 22, `cached ${ing.cachedAnswers}`);
  }, 20 * 560);
});

test('log throttle (clock injected): one warning per key and period; the ones held back go to debug, and the next warning counts them (suppressed)', () => {
  const log = testLogger('throttle');
  let now = 0;
  const t = new LogThrottle(log, 60_000, () => now);
  for (let i = 0; i < 6; i++) t.warn('auth:10.0.0.7', 'refused', { i });
  t.warn('auth:10.0.0.8', 'refused', { i: 'other' });
  now = 59_999;
  t.warn('auth:10.0.0.7', 'refused', { i: 6 });
  now = 60_000;
  t.warn('auth:10.0.0.7', 'refused', { i: 7 });
  now = 200_000;
  t.warn('auth:10.0.0.7', 'refused', { i: 8 });
  const warns = log.lines.filter((l) => l.level === 'warn').map((l) => [l.i, l.suppressed]);
  assert.deepEqual(warns, [[0, undefined], ['other', undefined], [7, 6], [8, undefined]]);
  assert.equal(log.lines.filter((l) => l.level === 'debug').length, 6, 'each one held back is at debug level');
});

test('log throttle: refusals before the MAC checked out are keyed by reason and source address, not by the MCU id in the URL; after it, by MCU id', async () => {
  await withIngress(async ({ got, send, log }) => {
    const warns = () => log.lines.filter((l) => l.level === 'warn' && l.msg === 'CoAP MCU message refused');
    for (let i = 0; i < 50; i++) await send(request({ id: `x${i}`, resource: 't', mid: 100 + i, payload: Buffer.from('[]'), mac: FORGED }));
    await waitFor(() => got.length === 50, 'the 50 refusals');
    assert.ok(got.every((p) => codeOf(p) === '4.01'));
    assert.equal(warns().length, 1, 'one warn line for 50 forged ids from one address');
    // a replayed counter is found after the MAC: throttled per MCU
    for (const id of ['esp-r1', 'esp-r2']) {
      const c = ++counter;
      const payload = Buffer.from('[{"n":"a","v":1}]');
      const mac = signMcuMessage(mcuKey(SITE, id), id, 't', c, payload);
      const build = (mid: number) => buildCoapPacket({ type: 0, code: 2, messageId: mid, token: Buffer.from([mid & 0xff]), options: [...['mcu', 'v1', id, 't'].map((s) => ({ number: COAP_OPTION.URI_PATH, value: Buffer.from(s) })), { number: COAP_OPTION.CONTENT_FORMAT, value: coapUintValue(SENML_JSON_FORMAT) }, { number: COAP_OPTION.URI_QUERY, value: Buffer.from(`c=${c}`) }, { number: COAP_OPTION.URI_QUERY, value: Buffer.from(`m=${mac}`) }], payload });
      const mid = id === 'esp-r1' ? 300 : 400;
      await send(build(mid));
      await waitFor(() => answerTo(got, mid), 'stored');
      await send(build(mid + 1)); // the same message again, a new message id: a replay
      await send(build(mid + 2));
      await waitFor(() => answerTo(got, mid + 2), 'refused');
      assert.equal(codeOf(answerTo(got, mid + 2)!), '4.01');
    }
    assert.deepEqual(warns().slice(1).map((l) => `${String(l.reason)} ${String(l.mcu)}`), ['replay esp-r1', 'replay esp-r2']);
  });
});

test('fast path: a message id reused with a new token is a new request (stored, answered with its own token); the same id and token is a retransmission', async () => {
  const T = (b: number) => Buffer.from([b, 0xee]);
  const ex = new RecentExchanges(10, 1000, 4);
  assert.equal(ex.begin('a|1', 9, T(1), 0).fresh, true);
  assert.equal(ex.begin('a|1', 9, T(1), 10).fresh, false);
  assert.equal(ex.begin('a|1', 9, T(2), 20).fresh, true, 'another token');
  assert.equal(ex.begin('a|1', 9, T(2), 30).fresh, false);

  await withIngress(async ({ service, got, send }) => {
    const reading = (token: Buffer, v: number) => request({ id: 'esp-tok', resource: 't', mid: 777, token, payload: Buffer.from(`[{"n":"a","v":${v}}]`), options: [{ number: COAP_OPTION.CONTENT_FORMAT, value: coapUintValue(SENML_JSON_FORMAT) }] });
    await send(reading(T(1), 1));
    await waitFor(() => got.length === 1, 'the first answer');
    const second = reading(T(2), 2); // after a deep sleep: message ids start over
    await send(second);
    await waitFor(() => got.length === 2, 'the second answer');
    assert.deepEqual(got.map((p) => [codeOf(p), p.token.toString('hex')]), [['2.04', T(1).toString('hex')], ['2.04', T(2).toString('hex')]]);
    assert.equal(service.stored.length, 2, 'both readings stored');
    await send(second); // its retransmission
    await waitFor(() => got.length === 3, 'the repeated answer');
    assert.equal(got[2]!.token.toString('hex'), T(2).toString('hex'));
    assert.equal(service.stored.length, 2, 'stored once');
  });
});

test('an MCU ack with ok:false and no code reaches the hub as FLEET_MCU_COMMAND, a stable code (core/errors.ts)', async () => {
  await withEnv(async ({ hub, gw, site, seen }) => {
    const id = 'esp-nack';
    assert.equal((await coap(gw.coapPort, site, id, 'hello', 'POST', Buffer.from('{"fw":"1.0.0","boot":"power_on"}'))).code, '2.04');
    await registered({ hub, gw }, [id]);
    const cmd = await hub.sendCommand(id, 'blink', {}, 60_000);
    const frame = await waitFor(async () => {
      const r = await coap(gw.coapPort, site, id, 'cmd', 'GET');
      return r.body.length > 0 ? r.body : null;
    }, 'the command in the mailbox');
    assert.equal(decodeMcuCommand(mcuKey(site, id), id, frame).cmd.id, cmd.id);
    assert.equal((await coap(gw.coapPort, site, id, 'ack', 'POST', Buffer.from(JSON.stringify({ id: cmd.id, ok: false, e: 'no LED' })))).code, '2.04');
    const reply = await waitFor(() => (of(seen, id, 'reply') as CommandReply[]).find((r) => r.id === cmd.id), 'the reply at the hub');
    assert.equal(reply.ok, false);
    assert.equal(reply.error?.code, 'FLEET_MCU_COMMAND');
    assert.ok(Object.hasOwn(ERROR_CODES, reply.error.code), 'listed in core/errors.ts and docs/errors.md');
    assert.equal(reply.error.message, 'no LED');
  });
});
