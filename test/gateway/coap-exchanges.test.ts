import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createSocket, type Socket } from 'node:dgram';
import { COAP_PATH_ROOT, COAP_QUERY_COUNTER, COAP_QUERY_MAC, SENML_JSON_FORMAT } from '../../firmware-bridge/coap.ts';
import { mcuKey, signMcuMessage } from '../../firmware-bridge/auth.ts';
import { COAP_METHOD, decodeMessage, encodeRequest } from '../../esp32-sim/coap-lite.ts';
import { RecentExchanges } from '../../gateway/coap-ingress.ts';
import { waitFor } from '../helpers.ts';
import { nextCounter, of, udpPeer, withEnv } from './env.ts';

const timers = () => process.getActiveResourcesInfo().filter((r) => r === 'Timeout').length;

/**
 * A raw CoAP MCU client on one UDP socket (the simulator's wire encoder, no client library,
 * so no timers of its own in this process): `request` builds a confirmable signed reading of
 * MCU `id` with message id `mid`; every answer is kept by its message id.
 */
async function rawClient(port: number, site: string): Promise<{ replies: Map<number, Buffer[]>; send(buf: Buffer): Promise<void>; request(id: string, mid: number, value: number): Buffer; close(): void }> {
  const sock = createSocket('udp4');
  await new Promise<void>((r) => sock.bind(0, '127.0.0.1', () => r()));
  const replies = new Map<number, Buffer[]>();
  sock.on('message', (msg) => {
    const d = decodeMessage(msg);
    if (d) replies.set(d.mid, [...(replies.get(d.mid) ?? []), msg]);
  });
  return {
    replies,
    send: (buf) => new Promise<void>((r, j) => sock.send(buf, port, '127.0.0.1', (err) => (err ? j(err) : r()))),
    request: (id, mid, value) => {
      const payload = Buffer.from(JSON.stringify([{ n: 'temp', v: value }]));
      const c = nextCounter();
      const mac = signMcuMessage(mcuKey(site, id), id, 't', c, payload);
      return encodeRequest({ method: COAP_METHOD.POST, path: [...COAP_PATH_ROOT, id, 't'], query: [`${COAP_QUERY_COUNTER}=${c}`, `${COAP_QUERY_MAC}=${mac}`], contentFormat: SENML_JSON_FORMAT, payload }, 0, mid, 0x1000 + mid);
    },
    close: () => sock.close(),
  };
}

/** Answered CoAP exchanges at the gateway: a raw UDP client (rawClient) sends confirmable telemetry. */
test('gateway CoAP: a retransmitted request gets the same piggybacked 2.04 from the cache, stored once; answered exchanges keep no timers', async () => {
  await withEnv(async ({ gw, site, seen }) => {
    const { replies, send, request, close } = await rawClient(gw.coapPort, site);
    try {
      // warm up (first MCU registration, outbox open) so the timer count below is steady
      await send(request('esp-x0', 1, 1));
      await waitFor(() => replies.has(1), 'the first answer');
      const before = timers();
      const n = 60;
      for (let i = 0; i < n; i++) await send(request(`esp-x${(i % 6) + 1}`, 100 + i, i));
      await waitFor(() => replies.size === n + 1, `answers to ${n} requests`);
      for (let i = 0; i < n; i++) {
        const d = decodeMessage(replies.get(100 + i)![0]!)!;
        assert.equal(d.type, 2, 'piggybacked on the ACK');
        assert.equal(d.code, '2.04');
      }
      // The package used to keep one ~5 minute timer per answered exchange (its RetrySend
      // MAX_RTT timeout), holding request and response alive: 60 more timers here.
      const after = timers();
      assert.ok(after - before < 10, `timers before ${before}, after ${after}`);

      // a retransmission (same message id and token, e.g. the ACK was lost): the same
      // answer again, from the cache, not a replay refusal; and the reading is stored once
      const again = request('esp-x9', 500, 42);
      await send(again);
      await waitFor(() => replies.get(500)?.length === 1, 'the answer');
      await send(again);
      await waitFor(() => replies.get(500)?.length === 2, 'the answer to the retransmission');
      assert.deepEqual(replies.get(500)![1], replies.get(500)![0], 'byte for byte the same 2.04');
      await waitFor(() => of(seen, 'esp-x9', 'telemetry').length >= 1, 'the reading at the hub');
      await new Promise((r) => setTimeout(r, 300));
      assert.equal(of(seen, 'esp-x9', 'telemetry').length, 1, 'stored once');
    } finally {
      close();
    }
  });
});

test('gateway CoAP: MCUs sharing one socket (as the simulator\'s do) keep their own exchanges: a retransmission after eight other MCUs\' requests from that socket still gets its 2.04, not a replay refusal', async () => {
  await withEnv(async ({ gw, site, seen }) => {
    const { replies, send, request, close } = await rawClient(gw.coapPort, site);
    try {
      const mine = request('esp-s0', 700, 7);
      await send(mine);
      await waitFor(() => replies.get(700)?.length === 1, 'the answer');
      for (let i = 1; i <= 8; i++) await send(request(`esp-s${i}`, 700 + i, i));
      await waitFor(() => [1, 2, 3, 4, 5, 6, 7, 8].every((i) => replies.has(700 + i)), 'the other MCUs answered');
      // its ACK was lost: the MCU retransmits (same message id, token and counter)
      await send(mine);
      await waitFor(() => replies.get(700)?.length === 2, 'the answer to the retransmission');
      assert.deepEqual(replies.get(700)![1], replies.get(700)![0], 'the same 2.04 again, not 4.01 FLEET_MCU_REPLAY');
      await waitFor(() => of(seen, 'esp-s0', 'telemetry').length >= 1, 'the reading at the hub');
      await new Promise((r) => setTimeout(r, 300));
      assert.equal(of(seen, 'esp-s0', 'telemetry').length, 1, 'stored once');
    } finally {
      close();
    }
  });
});

test('gateway CoAP fast path: a NON POST is answered by a NON 2.04 with its token; a forged one gets 4.01 with the error code; both answered again, unchanged, on retransmission', async () => {
  await withEnv(async ({ gw, site, seen }) => {
    const { got: replies, send, close } = await udpPeer(gw.coapPort);
    const request = (id: string, type: number, mid: number, token: number, forge = false): Buffer => {
      const payload = Buffer.from(JSON.stringify([{ n: 'temp', v: mid }]));
      const c = nextCounter();
      const mac = signMcuMessage(mcuKey(forge ? 'not-the-site-secret' : site, id), id, 't', c, payload);
      return encodeRequest({ method: COAP_METHOD.POST, path: [...COAP_PATH_ROOT, id, 't'], query: [`${COAP_QUERY_COUNTER}=${c}`, `${COAP_QUERY_MAC}=${mac}`], contentFormat: SENML_JSON_FORMAT, payload }, type, mid, token);
    };
    try {
      const non = request('esp-n1', 1, 700, 0xabcd0001);
      await send(non);
      await waitFor(() => replies.length === 1, 'the answer to the NON');
      const a = decodeMessage(replies[0]!)!;
      assert.equal(a.type, 1, 'a NON answer to a NON request');
      assert.equal(a.code, '2.04');
      assert.equal(a.token, 0xabcd0001, 'the token echoed');
      await send(non);
      await waitFor(() => replies.length === 2, 'the answer to the repeated NON');
      assert.deepEqual(replies[1], replies[0], 'the same answer, not a replay refusal');
      await waitFor(() => of(seen, 'esp-n1', 'telemetry').length >= 1, 'the reading at the hub');

      const forged = request('esp-n2', 0, 701, 0xabcd0002, true);
      await send(forged);
      await waitFor(() => replies.length === 3, 'the answer to the forged request');
      const f = decodeMessage(replies[2]!)!;
      assert.equal(f.type, 2, 'piggybacked on the ACK');
      assert.equal(f.mid, 701);
      assert.equal(f.code, '4.01');
      assert.equal(f.res.payload.toString(), 'FLEET_MCU_AUTH');
      await send(forged);
      await waitFor(() => replies.length === 4, 'the answer to its retransmission');
      assert.deepEqual(replies[3], replies[2]);
      await new Promise((r) => setTimeout(r, 200));
      assert.equal(of(seen, 'esp-n1', 'telemetry').length, 1, 'stored once');
      assert.equal(of(seen, 'esp-n2', 'telemetry').length, 0, 'the forged one not at all');
    } finally {
      await close();
    }
  });
});

test('RecentExchanges: a repeated message id is found within its lifetime; the last 4 per endpoint and the most recently active endpoints are kept', () => {
  const T = Buffer.from([0x01]); // the token: the same throughout here
  const ex = new RecentExchanges(3, 1000, 4);
  const a = ex.begin('a|1', 1, T, 0);
  assert.equal(a.fresh, true);
  a.ex.answer = Buffer.from('x');
  assert.equal(ex.begin('a|1', 1, T, 999).fresh, false, 'a retransmission within the lifetime');
  assert.equal(ex.begin('a|1', 1, T, 999).ex.answer?.toString(), 'x');
  assert.equal(ex.begin('a|1', 1, T, 2000).fresh, true, 'the same id after the lifetime is a new exchange');
  for (let id = 2; id <= 5; id++) ex.begin('a|1', id, T, 2000);
  assert.equal(ex.begin('a|1', 5, T, 2000).fresh, false);
  assert.equal(ex.begin('a|1', 1, T, 2000).fresh, true, 'only the last 4 of an endpoint are kept');
  ex.begin('b|1', 1, T, 2000);
  ex.begin('c|1', 1, T, 2000);
  ex.begin('a|1', 9, T, 2000); // a is the most recently active now
  // a request refused before its answer is kept (a forged MAC) is dropped: it pushes no one out
  const forged = ex.begin('x|1', 1, T, 2000);
  ex.drop('x|1', forged.ex);
  assert.equal(ex.size, 3);
  assert.equal(ex.begin('b|1', 1, T, 2000).fresh, false, 'b still there after the forged request');
  ex.begin('c|1', 1, T, 2000); // c is more recent than b again
  ex.begin('a|1', 9, T, 2000);
  ex.begin('d|1', 1, T, 2000).ex.answer = Buffer.from('y');
  ex.kept(); // d's answer kept: evicts b, the least recently active
  assert.equal(ex.size, 3);
  assert.equal(ex.begin('c|1', 1, T, 2000).fresh, false);
  assert.equal(ex.begin('b|1', 1, T, 2000).fresh, true, 'b was forgotten');

  // endpoints silent for the lifetime are forgotten as new requests come, without a timer
  const t = new RecentExchanges(100, 1000, 4);
  for (let i = 0; i < 50; i++) t.begin(`old|${i}`, 1, T, 0);
  for (let i = 0; i < 20; i++) t.begin(`new|${i}`, 1, T, 5000);
  for (let i = 20; i < 40; i++) t.begin(`new|${i}`, 1, T, 5000);
  assert.equal(t.size, 40, 'the 50 silent endpoints are gone after 40 requests (up to 4 each)');
  // a dropped exchange is handled again when its message id comes again
  const d = t.begin('new|1', 7, T, 5000);
  assert.equal(d.fresh, true);
  t.drop('new|1', d.ex);
  assert.equal(t.begin('new|1', 7, T, 5000).fresh, true);
});

test('gateway CoAP fast path: requests refused for their MAC leave no state behind (a flood from many ports holds no memory)', async () => {
  await withEnv(async ({ gw }) => {
    const socks = await Promise.all(
      Array.from({ length: 20 }, async () => {
        const s = createSocket('udp4');
        await new Promise<void>((r) => s.bind(0, '127.0.0.1', () => r()));
        return s;
      }),
    );
    let answers = 0;
    for (const s of socks) s.on('message', () => answers++);
    try {
      let mid = 900;
      for (const s of socks) {
        for (let k = 0; k < 4; k++) {
          const payload = Buffer.from(JSON.stringify([{ n: 'temp', v: k }]));
          const c = nextCounter();
          const mac = signMcuMessage(mcuKey('not-the-site-secret', 'esp-f'), 'esp-f', 't', c, payload);
          const req = encodeRequest({ method: COAP_METHOD.POST, path: [...COAP_PATH_ROOT, 'esp-f', 't'], query: [`${COAP_QUERY_COUNTER}=${c}`, `${COAP_QUERY_MAC}=${mac}`], contentFormat: SENML_JSON_FORMAT, payload }, 0, mid, mid);
          mid++;
          await new Promise<void>((r, j) => s.send(req, gw.coapPort, '127.0.0.1', (err) => (err ? j(err) : r())));
        }
      }
      await waitFor(() => answers === 80, 'a 4.01 for each of the 80 forged requests');
      assert.match(gw.metrics.render(), /^fleet_gateway_coap_exchange_endpoints 0$/m, 'no exchange remembered');
    } finally {
      for (const s of socks) s.close();
    }
  });
});

test('gateway CoAP: refusals of requests anyone can send (a mailbox GET with a bad MAC) are not kept for retransmissions; each is answered again', async () => {
  await withEnv(async ({ gw }) => {
    const sock = createSocket('udp4');
    await new Promise<void>((r) => sock.bind(0, '127.0.0.1', () => r()));
    const codes: number[] = [];
    sock.on('message', (msg) => codes.push(msg[1]!));
    const metric = async () => Number(/^fleet_gateway_coap_cached_answers (\d+)/m.exec(await (await fetch(`http://127.0.0.1:${gw.httpPort}/metrics`)).text())?.[1]);
    try {
      const before = await metric();
      const n = 200;
      // forged mailbox reads: a GET cmd goes through the coap package, which caches answers
      for (let i = 0; i < n; i++) {
        const req = encodeRequest({ method: COAP_METHOD.GET, path: [...COAP_PATH_ROOT, 'esp-lru', 'cmd'], query: [`${COAP_QUERY_COUNTER}=${i + 1}`, `${COAP_QUERY_MAC}=AAAAAAAAAAAAAAAAAAAAAA`] }, 0, 2000 + i, 0x5000 + i);
        await new Promise<void>((r, j) => sock.send(req, gw.coapPort, '127.0.0.1', (err) => (err ? j(err) : r())));
      }
      await waitFor(() => codes.length === n, `${n} answers`);
      assert.ok(codes.every((c) => c === ((4 << 5) | 1)), 'every one 4.01');
      assert.equal((await metric()) - before, 0, 'no answer kept for them');
      // a retransmission of one is refused again, from the same checks
      const again = encodeRequest({ method: COAP_METHOD.GET, path: [...COAP_PATH_ROOT, 'esp-lru', 'cmd'], query: [`${COAP_QUERY_COUNTER}=1`, `${COAP_QUERY_MAC}=AAAAAAAAAAAAAAAAAAAAAA`] }, 0, 2000, 0x5000);
      await new Promise<void>((r, j) => sock.send(again, gw.coapPort, '127.0.0.1', (err) => (err ? j(err) : r())));
      await waitFor(() => codes.length === n + 1, 'the retransmission answered');
      assert.equal(codes.at(-1), (4 << 5) | 1);
      assert.equal(gw.stats().dropped.auth, n + 1);
    } finally {
      await new Promise<void>((r) => sock.close(() => r()));
    }
  });
});

test('gateway CoAP: what the coap package itself would refuse (Observe on a POST) is dropped and counted, never answered to localhost in place of the sender', async () => {
  await withEnv(async ({ gw }) => {
    // the package's own error answers went to <its port> on localhost, not to the sender: a
    // sender at 127.0.0.2 made the gateway write to whatever listens on 127.0.0.1 at that port
    // a sender port whose number is free on 127.0.0.1 too (another file may hold it there)
    const bindTo = (sock: Socket, port: number, host: string) =>
      new Promise<boolean>((r) => {
        sock.once('error', () => r(false));
        sock.bind(port, host, () => r(true));
      });
    let sender!: Socket;
    let bystander!: Socket;
    for (let tries = 0; ; tries++) {
      sender = createSocket('udp4');
      bystander = createSocket('udp4');
      if ((await bindTo(sender, 0, '127.0.0.2')) && (await bindTo(bystander, sender.address().port, '127.0.0.1'))) break;
      sender.close();
      bystander.close();
      if (tries === 10) throw new Error('no port free on both 127.0.0.2 and 127.0.0.1 in 10 tries');
    }
    const gotBystander: Buffer[] = [];
    const gotSender: Buffer[] = [];
    bystander.on('message', (m) => gotBystander.push(m));
    sender.on('message', (m) => gotSender.push(m));
    try {
      const before = gw.stats().dropped.bad_request ?? 0;
      const req = encodeRequest({ method: COAP_METHOD.POST, path: [...COAP_PATH_ROOT, 'esp-odd', 't'], observe: 0, contentFormat: SENML_JSON_FORMAT }, 0, 0x4242, 0x77);
      await new Promise<void>((r, j) => sender.send(req, gw.coapPort, '127.0.0.1', (err) => (err ? j(err) : r())));
      await waitFor(() => (gw.stats().dropped.bad_request ?? 0) > before, 'dropped and counted');
      await new Promise((r) => setTimeout(r, 200));
      assert.deepEqual(gotBystander, [], 'nothing sent to 127.0.0.1');
      assert.deepEqual(gotSender, [], 'nor answered');
    } finally {
      await new Promise<void>((r) => sender.close(() => r()));
      await new Promise<void>((r) => bystander.close(() => r()));
    }
  });
});

test('gateway CoAP: a mailbox Observe is ended by a deregistration (Observe 1) from its own endpoint and token, not by one with another token', async () => {
  await withEnv(async ({ gw, site }) => {
    const { got, send, close } = await udpPeer(gw.coapPort);
    const observers = async () => Number(/^fleet_gateway_coap_observers (\d+)/m.exec(await (await fetch(`http://127.0.0.1:${gw.httpPort}/metrics`)).text())?.[1]);
    const id = 'esp-obs';
    try {
      const c = nextCounter();
      const mac = signMcuMessage(mcuKey(site, id), id, 'cmd', c, Buffer.alloc(0));
      await send(encodeRequest({ method: COAP_METHOD.GET, path: [...COAP_PATH_ROOT, id, 'cmd'], query: [`${COAP_QUERY_COUNTER}=${c}`, `${COAP_QUERY_MAC}=${mac}`], observe: 0 }, 0, 0x3001, 0xabc));
      await waitFor(() => got.length === 1, 'registered');
      assert.equal(await observers(), 1);
      const dereg = (token: number, mid: number) => encodeRequest({ method: COAP_METHOD.GET, path: [...COAP_PATH_ROOT, id, 'cmd'], observe: 1 }, 0, mid, token);
      await send(dereg(0xdef, 0x3002)); // the same endpoint, another token
      await waitFor(() => got.length === 2, 'answered');
      assert.equal(await observers(), 1, 'another token ends nothing');
      await send(dereg(0xabc, 0x3003)); // its own token
      await waitFor(() => got.length >= 3, 'answered');
      await waitFor(async () => (await observers()) === 0, 'deregistered');
    } finally {
      await close();
    }
  });
});
