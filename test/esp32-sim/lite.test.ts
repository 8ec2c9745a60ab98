import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createServer } from 'node:net';
import { Aedes } from 'aedes';
import coap from 'coap';
import { CoapEndpoint, COAP_METHOD, type CoapResponse } from '../../esp32-sim/coap-lite.ts';
import { encodePublish, MqttLite } from '../../esp32-sim/mqtt-lite.ts';
import { fixedHeader } from '../../core/mqtt-wire.ts';
import { Scheduler } from '../../esp32-sim/sched.ts';
import { runSim } from '../../esp32-sim/sim.ts';
import { testLogger, waitFor } from '../helpers.ts';

test('sched: one timer runs entries in time order, same-time entries in insertion order, and stop drops the rest', async () => {
  const s = new Scheduler();
  const ran: string[] = [];
  const now = Date.now();
  const push = (x: string) => ran.push(x);
  s.at(now + 60, push, 'c');
  s.at(now + 20, push, 'a');
  s.at(now + 20, push, 'b');
  s.at(now - 5, push, 'late'); // already due: as soon as possible
  s.at(now + 5000, push, 'never');
  await waitFor(() => ran.length === 4, 'four entries ran', 2000, 5);
  assert.deepEqual(ran, ['late', 'a', 'b', 'c']);
  assert.equal(s.size, 1);
  s.stop();
  assert.equal(s.size, 0);
  const lag = s.lag();
  assert.equal(lag.ran, 4);
  assert.ok(lag.maxMs >= 5);
});

test('sched: 10,000 entries in one scheduler, each runs once', async () => {
  const s = new Scheduler({ maxPerTurn: 1000 });
  let n = 0;
  const now = Date.now();
  for (let i = 0; i < 10_000; i++) s.at(now + (i % 100), () => n++, null);
  await waitFor(() => n === 10_000, 'all ran', 5000, 5);
  assert.equal(s.size, 0);
  s.stop();
});

test('mqtt-lite: encodePublish writes one packet whose remaining length (1 to 4 bytes), topic, packet id, flags and payload read back, at every length boundary', () => {
  const topic = 'mcu/v1/esp32-0001/t';
  // remaining length = 2 + topic + 2 (QoS 1) + payload: sizes around 127, 16,383 and 2,097,151
  const base = 2 + topic.length + 2;
  const sizes = [0, 1, 50];
  for (const edge of [127, 16_383, 2_097_151]) for (let d = -2; d <= 2; d++) sizes.push(edge - base + d);
  for (const size of sizes) {
    const payload = Buffer.alloc(size, size % 251);
    for (const [qos, dup] of [[1, false], [1, true], [0, false]] as const) {
      const pid = qos ? 0xbeef : 0;
      const pkt = encodePublish(topic, payload, qos, pid, dup);
      const h = fixedHeader(pkt, 0, 256 * 1024 * 1024);
      assert.equal(h.kind, 'ok', `size ${size}`);
      if (h.kind !== 'ok') continue;
      assert.equal(h.start + h.len, pkt.length, `size ${size}: remaining length covers the packet exactly`);
      assert.equal(pkt[0], 0x30 | (dup ? 0x08 : 0) | (qos << 1));
      const body = pkt.subarray(h.start);
      const tl = body.readUInt16BE(0);
      assert.equal(body.toString('utf8', 2, 2 + tl), topic);
      let p = 2 + tl;
      if (qos) {
        assert.equal(body.readUInt16BE(p), pid);
        p += 2;
      }
      assert.ok(body.subarray(p).equals(payload), `size ${size}: payload`);
    }
  }
});

async function withBroker<T>(fn: (port: number, broker: Aedes) => Promise<T>): Promise<T> {
  const broker = await Aedes.createBroker();
  const server = createServer(broker.handle);
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  const port = (server.address() as { port: number }).port;
  try {
    return await fn(port, broker);
  } finally {
    await new Promise<void>((r) => broker.close(() => r()));
    await new Promise<void>((r) => server.close(() => r()));
  }
}

test('mqtt-lite: CONNECT with credentials, QoS 1 PUBLISH gets its PUBACK, SUBSCRIBE and a QoS 1 message in (PUBACKed), PINGREQ, DISCONNECT (aedes broker)', async () => {
  await withBroker(async (port, broker) => {
    const seenAuth: Array<[string, string | undefined, string | undefined]> = [];
    broker.authenticate = (client, username, password, done) => {
      seenAuth.push([client.id, username, password?.toString()]);
      done(null, true);
    };
    const published: Array<[string, string, number]> = [];
    broker.on('publish', (p, client) => {
      if (client) published.push([p.topic, p.payload.toString(), p.qos]);
    });
    const ev = { connack: [] as number[], puback: [] as number[], suback: [] as number[][], msgs: [] as string[], closed: 0 };
    const c = new MqttLite({
      connack: (rc) => ev.connack.push(rc),
      close: () => ev.closed++,
      puback: (pid) => ev.puback.push(pid),
      suback: (_pid, codes) => ev.suback.push(codes),
      message: (topic, payload, qos) => ev.msgs.push(`${topic}|${payload.toString()}|${qos}`),
    });
    c.connect({ host: '127.0.0.1', port, clientId: 'esp-1', username: 'esp-1', password: 'k'.repeat(43), keepaliveS: 30, clean: true });
    await waitFor(() => ev.connack.length === 1, 'CONNACK');
    assert.deepEqual(ev.connack, [0]);
    assert.deepEqual(seenAuth, [['esp-1', 'esp-1', 'k'.repeat(43)]]);
    assert.ok(c.writable);

    const big = Buffer.alloc(300, 0x61); // a remaining length over 127: two length bytes
    c.publish('mcu/v1/esp-1/t', big, 1, 7);
    c.publish('mcu/v1/esp-1/t', Buffer.from('q0'), 0);
    await waitFor(() => ev.puback.length === 1 && published.length === 2, 'PUBACK and both publishes at the broker');
    assert.deepEqual(ev.puback, [7]);
    assert.deepEqual(published.map(([t, p, q]) => [t, p.length, q]).sort((a, b) => Number(b[1]) - Number(a[1])), [['mcu/v1/esp-1/t', 300, 1], ['mcu/v1/esp-1/t', 2, 0]]);

    c.subscribe(9, 'mcu/v1/esp-1/#', 1);
    await waitFor(() => ev.suback.length === 1, 'SUBACK');
    assert.deepEqual(ev.suback, [[1]]);
    await new Promise<void>((r) => broker.publish({ cmd: 'publish', topic: 'mcu/v1/esp-1/cmd', payload: Buffer.from('hello'), qos: 1, retain: false, dup: false }, () => r()));
    await waitFor(() => ev.msgs.length === 1, 'a message in');
    assert.deepEqual(ev.msgs, ['mcu/v1/esp-1/cmd|hello|1']);

    c.ping();
    c.end();
    await waitFor(() => ev.closed === 1, 'closed after DISCONNECT');
    assert.equal(c.writable, false);
  });
});

test('mqtt-lite: a refused CONNECT reports its return code and closes', async () => {
  await withBroker(async (port, broker) => {
    broker.authenticate = (_c, _u, _p, done) => {
      const err = Object.assign(new Error('no'), { returnCode: 4 as const });
      done(err, null);
    };
    const ev = { connack: [] as number[], closed: 0 };
    const c = new MqttLite({ connack: (rc) => ev.connack.push(rc), close: () => ev.closed++, puback: () => undefined, suback: () => undefined, message: () => undefined });
    c.connect({ host: '127.0.0.1', port, clientId: 'x', username: 'x', password: 'bad', keepaliveS: 30, clean: true });
    await waitFor(() => ev.closed === 1, 'closed');
    assert.deepEqual(ev.connack, [4]);
  });
});

test('mqtt-lite: data arriving late on a connection it already left (DISCONNECT sent, server not yet closed) never mixes into the new connection', async () => {
  // a raw TCP peer plays the gateway, so the bytes and their timing are exact
  const conns: import('node:net').Socket[] = [];
  // allowHalfOpen: the peer keeps its side open after the client's FIN, as a gateway does until it
  // has read the DISCONNECT (a push it wrote just before still arrives)
  const server = createServer({ allowHalfOpen: true }, (sock) => {
    conns.push(sock);
    sock.once('data', () => sock.write(Buffer.from([0x20, 0x02, 0x00, 0x00]))); // CONNECT -> CONNACK
    sock.on('error', () => undefined);
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  const port = (server.address() as import('node:net').AddressInfo).port;
  const got: string[] = [];
  let connacks = 0;
  const c = new MqttLite({ connack: () => connacks++, close: () => undefined, puback: () => undefined, suback: () => undefined, message: (_t, p) => got.push(p.toString()) });
  const publish = (payload: string) => {
    const body = Buffer.concat([Buffer.from([0x00, 0x01]), Buffer.from('a'), Buffer.from(payload)]);
    return Buffer.concat([Buffer.from([0x30, body.length]), body]);
  };
  const opts = { host: '127.0.0.1', port, clientId: 'm', username: 'm', password: 'p', keepaliveS: 30, clean: true };
  try {
    c.connect(opts);
    await waitFor(() => connacks === 1, 'first CONNACK');
    c.end(); // DISCONNECT + FIN: as before deep sleep; the peer has not closed its side yet
    c.connect(opts);
    await waitFor(() => connacks === 2 && conns.length === 2, 'second CONNACK');
    const fresh = publish('on the new connection');
    conns[1]!.write(fresh.subarray(0, 5)); // the new connection holds half a packet
    await new Promise((r) => setTimeout(r, 50));
    conns[0]!.write(publish('late, on the old one'));
    await new Promise((r) => setTimeout(r, 50));
    conns[1]!.write(fresh.subarray(5));
    await waitFor(() => got.length >= 1, 'the message on the new connection');
    await new Promise((r) => setTimeout(r, 50));
    assert.deepEqual(got, ['on the new connection']);
  } finally {
    c.destroy();
    for (const s of conns) s.destroy();
    await new Promise<void>((r) => server.close(() => r()));
  }
});

async function withCoapServer<T>(handler: (req: coap.IncomingMessage, res: coap.OutgoingMessage) => void, fn: (port: number) => Promise<T>): Promise<T> {
  const server = coap.createServer();
  server.on('request', handler);
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  const port = (server as unknown as { _sock: { address(): { port: number } } })._sock.address().port;
  try {
    return await fn(port);
  } finally {
    // the coap package's close() leaves running the timer that sends the empty ACK of a request
    // not answered within piggybackReplyMs (50 ms): it would send on the closed socket and throw.
    // Timers fire in order of expiry, so waiting past it lets every such timer fire first.
    await new Promise((r) => setTimeout(r, 150));
    await new Promise<void>((r) => server.close(() => r()));
  }
}

const request = (ep: CoapEndpoint, req: Parameters<CoapEndpoint['request']>[0]) =>
  new Promise<CoapResponse>((resolve, reject) => ep.request(req, (err, res) => (err ? reject(err) : resolve(res!))));

test('coap-lite: POST with path, query and content format gets a piggybacked response; Block2 GET; many requests share one socket (coap package server)', async () => {
  const image = Buffer.from(Array.from({ length: 1000 }, (_, i) => i % 251));
  await withCoapServer(
    (req, res) => {
      if (req.method === 'POST') {
        res.code = '2.04';
        return res.end(`${req.url}|${String(req.headers['Content-Format'])}|${req.payload.toString()}`);
      }
      res.code = '2.05';
      res.end(image); // the coap package answers Block2 requests block by block
    },
    async (port) => {
      const sched = new Scheduler();
      const ep = await CoapEndpoint.open({ host: '127.0.0.1', port, sched, link: { loss: 0, latencyMs: 0, latencyJitterMs: 0 }, random: Math.random });
      try {
        const res = await request(ep, { method: COAP_METHOD.POST, path: ['mcu', 'v1', 'esp-1', 't'], query: ['c=5', 'm=abc'], contentFormat: 110, payload: Buffer.from('[]') });
        assert.equal(res.code, '2.04');
        assert.equal(res.payload.toString(), '/mcu/v1/esp-1/t?c=5&m=abc|application/senml+json|[]');

        const got: Buffer[] = [];
        for (let num = 0; ; num++) {
          const b = await request(ep, { method: COAP_METHOD.GET, path: ['fw'], block2: { num, szx: 2 } }); // 64-byte blocks
          assert.equal(b.code, '2.05');
          assert.equal(b.block2?.num, num);
          got.push(b.payload);
          if (!b.block2?.more) break;
        }
        assert.deepEqual(Buffer.concat(got), image);

        const many = await Promise.all(Array.from({ length: 200 }, (_, i) => request(ep, { method: COAP_METHOD.POST, path: ['d', String(i)], payload: Buffer.from(String(i)) })));
        many.forEach((r, i) => assert.equal(r.payload.toString(), `/d/${i}|undefined|${i}`));
        assert.equal(ep.pending, 0);
      } finally {
        ep.close();
        sched.stop();
      }
    },
  );
});

test('coap-lite: with 20% datagram loss each way, CON retransmissions still get every request answered (loss knob)', async () => {
  let handled = 0;
  await withCoapServer(
    (req, res) => {
      handled++;
      res.code = '2.04';
      res.end(req.payload);
    },
    async (port) => {
      const sched = new Scheduler();
      let seed = 42;
      const random = () => ((seed = (seed * 1103515245 + 12345) % 2 ** 31) / 2 ** 31);
      const ep = await CoapEndpoint.open({ host: '127.0.0.1', port, sched, link: { loss: 0.2, latencyMs: 5, latencyJitterMs: 10 }, random, ackTimeoutMs: 50, maxRetransmit: 10 });
      try {
        const res = await Promise.all(Array.from({ length: 50 }, (_, i) => request(ep, { method: COAP_METHOD.POST, path: ['x'], payload: Buffer.from(String(i)) })));
        res.forEach((r, i) => assert.equal(r.payload.toString(), String(i)));
        assert.ok(ep.lost > 0, 'datagrams were dropped');
        // retransmissions with the same message id are answered from the server's cache, not handled twice
        assert.equal(handled, 50);
      } finally {
        ep.close();
        sched.stop();
      }
    },
  );
});

test('coap-lite: an unanswered CON times out after its retransmissions', async () => {
  const sched = new Scheduler();
  const ep = await CoapEndpoint.open({ host: '127.0.0.1', port: 9, sched, link: { loss: 0, latencyMs: 0, latencyJitterMs: 0 }, random: () => 0, ackTimeoutMs: 20, maxRetransmit: 2 });
  try {
    await assert.rejects(request(ep, { method: COAP_METHOD.GET, path: ['x'] }), /timed out|reset/);
  } finally {
    ep.close();
    sched.stop();
  }
});

test('coap-lite: Observe — the registration stays and notifications arrive until cancelled', async () => {
  await withCoapServer(
    (req, res) => {
      if (req.headers.Observe !== 0) {
        res.code = '2.05';
        return res.end('plain');
      }
      res.code = '2.05';
      res.write('n0');
      let i = 1;
      const t = setInterval(() => {
        if (i > 3) {
          clearInterval(t);
          return res.end();
        }
        res.write(`n${i++}`);
      }, 30);
      res.on('finish', () => clearInterval(t));
    },
    async (port) => {
      const sched = new Scheduler();
      const ep = await CoapEndpoint.open({ host: '127.0.0.1', port, sched, link: { loss: 0, latencyMs: 0, latencyJitterMs: 0 }, random: Math.random });
      try {
        const got: string[] = [];
        const token = ep.request({ method: COAP_METHOD.GET, path: ['cmd'], observe: 0 }, (err, res) => {
          if (!err && res) got.push(res.payload.toString());
        });
        await waitFor(() => got.length >= 3, 'the first response and notifications', 3000);
        assert.deepEqual(got.slice(0, 3), ['n0', 'n1', 'n2']);
        ep.cancel(token);
        const before = got.length;
        await new Promise((r) => setTimeout(r, 150));
        assert.equal(got.length, before, 'nothing delivered after cancel');
      } finally {
        ep.close();
        sched.stop();
      }
    },
  );
});

interface Arrival {
  what: string;
  counter: number;
  at: number;
  answeredAt?: number;
}

/**
 * A coap package server standing in for the gateway, for the sim's counter order: it records
 * each request (method and resource, MAC counter, time) and answers it after
 * `delayMs(request, nth of its kind)` ms (a GET cmd as an Observe registration, kept open).
 */
function counterServer(delayMs: (a: Arrival, nth: number) => number) {
  const arrivals: Arrival[] = [];
  const pending = new Set<NodeJS.Timeout>();
  const handler = (req: coap.IncomingMessage, res: coap.OutgoingMessage) => {
    const a: Arrival = { what: `${req.method} ${req.url.split('?')[0]!.split('/').at(-1)}`, counter: Number(/[?&]c=(\d+)/.exec(req.url)?.[1]), at: Date.now() };
    arrivals.push(a);
    const nth = arrivals.filter((x) => x.what === a.what).length;
    const timer = setTimeout(() => {
      pending.delete(timer);
      a.answeredAt = Date.now();
      res.code = req.method === 'GET' ? '2.05' : '2.04';
      if (req.method === 'GET') res.write(Buffer.alloc(0));
      else res.end();
    }, delayMs(a, nth));
    pending.add(timer);
  };
  /** cancels the answers not yet sent: call before the server closes (an answer sent on the closed socket throws) */
  const stop = () => {
    for (const t of pending) clearTimeout(t);
    pending.clear();
  };
  /** what arrived while `held` was unanswered with a counter more than 31 above its (beyond the gateway's replay window) */
  const newerWhile = (held: Arrival) => arrivals.filter((x) => x.at > held.at && x.at < held.answeredAt! && x.counter > held.counter + 31);
  return { arrivals, handler, newerWhile, stop };
}

test('sim CoAP: a device sends nothing with a newer counter while a reading is outstanding (the mailbox Observe renewal waits), so the gateway never sees the reading after a much newer counter (coap package server standing in for the gateway, holding the reading 2 s)', async () => {
  // the first reading is held 2 s (a gateway busy storing it); everything else answered at once
  const srv = counterServer((a, nth) => (a.what === 'POST t' && nth === 1 ? 2000 : 0));
  await withCoapServer(srv.handler, async (port) => {
    const sim = await runSim({ devices: 1, protocol: 'coap', siteSecret: 'o'.repeat(43), coapPort: port, intervalMs: 200, startJitterMs: 0, hello: false, reobserveMs: 300, log: testLogger('sim') });
    try {
      const held = await waitFor(() => srv.arrivals.find((a) => a.what === 'POST t' && a.answeredAt !== undefined), 'the first reading answered', 10_000);
      await waitFor(() => srv.arrivals.some((a) => a.what === 'GET cmd' && a.at > held.answeredAt! + 50), 'then the Observe renewed', 10_000);
      assert.deepEqual(srv.newerWhile(held), [], `sent while the reading (counter ${held.counter}) was outstanding`);
    } finally {
      await sim.stop();
      srv.stop();
    }
  });
});

test('sim CoAP: a reading waits while a renewed mailbox Observe is unanswered (its counter is older), then goes (coap package server standing in for the gateway, holding the renewal 2 s)', async () => {
  // the first registration answered at once, the first renewal after 2 s
  const srv = counterServer((a, nth) => (a.what === 'GET cmd' && nth === 2 ? 2000 : 0));
  await withCoapServer(srv.handler, async (port) => {
    const sim = await runSim({ devices: 1, protocol: 'coap', siteSecret: 'p'.repeat(43), coapPort: port, intervalMs: 200, startJitterMs: 0, hello: false, reobserveMs: 500, log: testLogger('sim') });
    try {
      const renewalAnswered = () => {
        const r = srv.arrivals.filter((a) => a.what === 'GET cmd')[1];
        return r?.answeredAt !== undefined ? r : undefined;
      };
      const renewal = await waitFor(renewalAnswered, 'the renewal answered', 10_000);
      await waitFor(() => srv.arrivals.some((a) => a.what === 'POST t' && a.at > renewal.answeredAt!), 'then readings again', 10_000);
      assert.deepEqual(srv.newerWhile(renewal), [], `sent while the renewal (counter ${renewal.counter}) was unanswered`);
    } finally {
      await sim.stop();
      srv.stop();
    }
  });
});
