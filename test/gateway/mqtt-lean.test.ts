import assert from 'node:assert/strict';
import { execFile, execFileSync, spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { connect, type Socket } from 'node:net';
import { join } from 'node:path';
import { test } from 'node:test';
import { promisify } from 'node:util';
import mqttPacket from 'mqtt-packet';
import type { TelemetryBatch } from '../../core/messages.ts';
import { mcuKey } from '../../firmware-bridge/auth.ts';
import { mcuTopic } from '../../firmware-bridge/topics.ts';
import type { LeanServerHooks, LeanServerOptions } from '../../gateway/mqtt-lean.ts';
import { tempDir, waitFor } from '../helpers.ts';
import { connectMcu, of, withEnv } from './env.ts';
import { connectPk, leanRig, pk, publishPk, type LeanRig } from './lean-rig.ts';

/**
 * gateway/mqtt-lean.ts edge cases found in review: a QoS 0 burst followed by the MCU
 * closing its side, a same-connection DUP retransmission, sockets that never send CONNECT,
 * TCP keepalive. Real sockets on 127.0.0.1 (and 127.0.0.2-4 as other peers), a
 * LeanMqttServer on port 0 or the real gateway and hub (env.ts).
 */

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const run = promisify(execFile);
/** The shared rig (lean-rig.ts) with a 20 ms store, also recording closes and refusals in `events`. */
const lean = (opts: Partial<LeanServerOptions> = {}, storeMs = 20, hooks: Partial<LeanServerHooks> = {}): Promise<LeanRig> =>
  leanRig(opts, storeMs, (events) => ({ onClose: () => events.push('close'), onRefused: (remote, why) => events.push(`refused ${remote} ${why}`), ...hooks }));

/** TLS on the rig's server with a throwaway self-signed P-256 certificate for 127.0.0.1 (openssl), in `dir`; its port */
function listenTlsSelfSigned(l: LeanRig, dir: string): Promise<number> {
  execFileSync('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-days', '1', '-keyout', join(dir, 'k.pem'), '-out', join(dir, 'c.pem'), '-subj', '/CN=127.0.0.1'], { stdio: 'ignore' });
  return l.srv.listenTls('127.0.0.1', 0, { cert: readFileSync(join(dir, 'c.pem')), key: readFileSync(join(dir, 'k.pem')) });
}

/** A raw TCP client that records every MQTT packet the server sends. */
async function raw(port: number, localAddress = '127.0.0.1', allowHalfOpen = false): Promise<{ s: Socket; got: mqttPacket.Packet[]; closed: Promise<void>; bytes: () => number }> {
  const s = connect({ port, host: '127.0.0.1', localAddress, allowHalfOpen });
  const got: mqttPacket.Packet[] = [];
  let n = 0;
  const parser = mqttPacket.parser({ protocolVersion: 4 });
  parser.on('packet', (p) => got.push(p));
  s.on('data', (d) => {
    n += d.length;
    parser.parse(d);
  });
  s.on('error', () => undefined);
  const closed = new Promise<void>((r) => s.once('close', () => r()));
  await new Promise((r, j) => {
    s.once('connect', r);
    s.once('error', j);
  });
  return { s, got, closed, bytes: () => n };
}

test('mqtt-lean: QoS 0 PUBLISHes sent back to back and then a FIN (with or without DISCONNECT) are all stored; a QoS 1 one behind the pending store is not (the MCU resends it), and nothing is written after the FIN', async () => {
  const l = await lean({}, 50);
  try {
    for (const disconnect of [false, true]) {
      l.stored.length = 0;
      const c = await raw(l.port, '127.0.0.1', true); // half-open: it could still read anything written after its FIN
      const parts = [connectPk(`m-${disconnect}`)];
      for (let i = 0; i < 5; i++) parts.push(publishPk('mcu/v1/m/t', `r${i}`, 0));
      parts.push(publishPk('mcu/v1/m/t', 'q1', 1, 9)); // not acknowledged before the FIN: not stored
      parts.push(publishPk('mcu/v1/m/t', 'r5', 0));
      if (disconnect) parts.push(pk({ cmd: 'disconnect' }), publishPk('mcu/v1/m/t', 'after-disconnect', 0));
      c.s.end(Buffer.concat(parts));
      await waitFor(() => l.stored.length >= 6, `6 QoS 0 stored`, 5000);
      await c.closed;
      await sleep(200);
      assert.deepEqual(l.stored.map(String), ['r0', 'r1', 'r2', 'r3', 'r4', 'r5'], disconnect ? 'DISCONNECT then FIN' : 'FIN only');
      // only the CONNACK reached the client: no PUBACK for the QoS 1 one, nothing after the FIN
      assert.deepEqual(c.got.map((p) => p.cmd), ['connack']);
      assert.equal(c.bytes(), 4);
    }
    assert.equal(l.srv.connectedClients, 0);
    assert.equal(l.srv.unauthenticated, 0);
  } finally {
    await l.srv.close();
  }
});

test('mqtt-lean: a QoS 1 PUBLISH retransmitted with DUP on the same connection (esp-mqtt) is acknowledged twice and stored once; a new message reusing the id (no DUP) and a DUP of another id are stored', async () => {
  const l = await lean({}, 50);
  try {
    const c = await raw(l.port);
    c.s.write(connectPk('esp'));
    // the retransmission arrives while the first copy is still being stored
    c.s.write(Buffer.concat([publishPk('mcu/v1/esp/t', 'a', 1, 7), publishPk('mcu/v1/esp/t', 'a', 1, 7, true)]));
    await waitFor(() => c.got.filter((p) => p.cmd === 'puback').length >= 2, 'two PUBACKs');
    await sleep(150);
    assert.deepEqual(l.stored.map(String), ['a']);
    c.s.write(publishPk('mcu/v1/esp/t', 'b', 1, 7)); // the id reused for a new message after its PUBACK
    c.s.write(publishPk('mcu/v1/esp/t', 'c', 1, 8, true)); // DUP of a message never seen on this connection (sent before a reconnect)
    c.s.write(publishPk('mcu/v1/esp/t', 'c', 1, 8, true)); // and its retransmission
    await waitFor(() => c.got.filter((p) => p.cmd === 'puback').length >= 5, 'five PUBACKs');
    await sleep(150);
    assert.deepEqual(l.stored.map(String), ['a', 'b', 'c']);
    assert.deepEqual(
      c.got.filter((p) => p.cmd === 'puback').map((p) => (p as mqttPacket.IPubackPacket).messageId),
      [7, 7, 7, 8, 8],
    );
    c.s.destroy();
  } finally {
    await l.srv.close();
  }
});

test('mqtt-lean: sockets that never send CONNECT are capped per address and in all (destroyed at once, onRefused); an MCU from another address still connects, and authenticated connections are not capped', async () => {
  const l = await lean({ maxConnections: 8, maxPreAuth: 6, maxPreAuthPerAddress: 3, connectTimeoutMs: 60_000 });
  const socks: Socket[] = [];
  try {
    const idle = async (addr: string) => {
      const c = await raw(l.port, addr);
      socks.push(c.s);
      return c;
    };
    const attackers = [];
    for (let i = 0; i < 5; i++) attackers.push(await idle('127.0.0.2'));
    await Promise.all(attackers.slice(3).map((c) => c.closed)); // the 4th and 5th destroyed by the gateway
    assert.equal(l.events.filter((e) => e === 'refused 127.0.0.2 pre_auth_address').length, 2);
    await sleep(100);
    assert.ok(attackers.slice(0, 3).every((c) => !c.s.destroyed), 'the first 3 stay (until the CONNECT timeout)');
    assert.equal(l.srv.unauthenticated, 3);
    // more MCUs from one address than the per-address cap: they authenticate (only maxConnections bounds them)
    const mcus = [];
    for (let i = 0; i < 6; i++) {
      const c = await raw(l.port);
      c.s.write(connectPk(`mcu-${i}`));
      await waitFor(() => c.got.some((p) => p.cmd === 'connack'), `CONNACK ${i}`);
      assert.equal((c.got[0] as mqttPacket.IConnackPacket).returnCode, 0);
      mcus.push(c);
    }
    assert.equal(l.srv.connectedClients, 6);
    assert.equal(l.srv.unauthenticated, 3);
    // the global cap: 3 more from another address fill it, the next address is refused
    for (let i = 0; i < 3; i++) await idle('127.0.0.3');
    const late = await idle('127.0.0.4');
    await late.closed;
    assert.ok(l.events.includes('refused 127.0.0.4 pre_auth_total'), l.events.join('; '));
    // a slot freed is usable again; a refused CONNECT (CONNACK 4) frees its slot too
    attackers[0]!.s.destroy();
    await waitFor(() => l.srv.unauthenticated === 5, 'slot released');
    const bad = await raw(l.port, '127.0.0.4');
    bad.s.write(connectPk('x', { username: 'x', password: Buffer.from('bad') }));
    await bad.closed;
    assert.equal((bad.got[0] as mqttPacket.IConnackPacket).returnCode, 4);
    for (const s of socks) s.destroy();
    for (const c of mcus) c.s.destroy();
    await waitFor(() => l.srv.unauthenticated === 0 && l.srv.connectedClients === 0, 'all released');
  } finally {
    for (const s of socks) s.destroy();
    await l.srv.close();
  }
});

test('mqtt-lean: what peers do not read is bounded over all connections: beyond maxWriteBacklogTotal the connection holding the most is closed', async () => {
  const l = await lean({ maxWriteBacklogTotal: 1024 * 1024 });
  const peers: Array<Awaited<ReturnType<typeof raw>>> = [];
  try {
    for (const id of ['a', 'b']) {
      const c = await raw(l.port);
      c.s.write(connectPk(`m-${id}`));
      await waitFor(() => c.got.some((p) => p.cmd === 'connack'), 'CONNACK');
      c.s.pause(); // reads nothing more: what the server writes piles up
      peers.push(c);
    }
    // each under the 1 MiB a single connection may hold, together over the 1 MiB cap
    const chunk = Buffer.alloc(16 * 1024, 0x61);
    const fill = async (id: string, bytes: number) => {
      const conn = l.srv.sessions.get(id)!;
      for (let i = 0; i < 4000 && conn.socket.writableLength < bytes; i++) {
        conn.send(`mcu/v1/${id}/fw`, chunk, 0);
        if (i % 16 === 15) await sleep(1); // let the kernel buffers fill first
      }
      assert.ok(conn.socket.writableLength >= bytes, `${id} holds ${conn.socket.writableLength}`);
    };
    await fill('m-a', 700 * 1024);
    await fill('m-b', 500 * 1024);
    await waitFor(() => l.events.some((e) => e.endsWith('write_backlog')), 'a connection closed for the backlog', 5000);
    await sleep(1500); // another sweep: one was enough
    assert.equal(l.events.filter((e) => e.endsWith('write_backlog')).length, 1);
    assert.equal(l.srv.sessions.has('m-a'), false, 'the larger holder went');
    assert.equal(l.srv.sessions.has('m-b'), true, 'the other stays');
  } finally {
    for (const c of peers) c.s.destroy();
    await l.srv.close();
  }
});

test('mqtt-lean: accepted sockets have TCP keepalive on (plain and TLS), so a half-open connection with MQTT keep-alive 0 dies', async (t) => {
  const tmp = tempDir('fleetlet-lean-');
  const l = await lean();
  try {
    const tlsPort = await listenTlsSelfSigned(l, tmp.dir);
    const c = await raw(l.port);
    c.s.write(connectPk('ka', { keepalive: 0 }));
    const tlsRaw = await raw(tlsPort); // a TCP connection to the TLS port (handshake pending)
    await waitFor(() => c.got.length === 1, 'CONNACK');
    // the server's side of each connection, as the kernel reports it (`ss -o`: timer:(keepalive,...))
    for (const port of [l.port, tlsPort]) {
      const { stdout } = await run('ss', ['-tnoH', 'state', 'established', `( sport = :${port} )`]);
      t.diagnostic(stdout.trim());
      assert.match(stdout, /timer:\(keepalive,/, `TCP keepalive on the server socket of port ${port}`);
    }
    c.s.destroy();
    tlsRaw.s.destroy();
  } finally {
    await l.srv.close();
    tmp.cleanup();
  }
});

test('mqtt-lean: several QoS 1 PUBLISHes in flight, all retransmitted with DUP behind the originals (late PUBACKs: the rate limit, a slow store): each stored once, each acknowledged twice', async () => {
  const l = await lean({}, 30);
  try {
    const c = await raw(l.port);
    c.s.write(connectPk('esp'));
    c.s.write(Buffer.concat([1, 2, 3].map((pid) => publishPk('mcu/v1/esp/t', `m${pid}`, 1, pid))));
    c.s.write(Buffer.concat([1, 2, 3].map((pid) => publishPk('mcu/v1/esp/t', `m${pid}`, 1, pid, true))));
    await waitFor(() => c.got.filter((p) => p.cmd === 'puback').length >= 6, 'six PUBACKs');
    await sleep(150);
    assert.deepEqual(l.stored.map(String), ['m1', 'm2', 'm3']);
    assert.deepEqual(
      c.got.filter((p) => p.cmd === 'puback').map((p) => (p as mqttPacket.IPubackPacket).messageId),
      [1, 2, 3, 1, 2, 3],
    );
    c.s.destroy();
  } finally {
    await l.srv.close();
  }
});

test('mqtt-lean via the gateway: mosquitto_pub -l -q 0 (10 lines, then DISCONNECT and close) stores all 10; an esp-mqtt style DUP retransmission reaches the hub once, on the same connection or after a reconnect; 68 idle sockets from one address do not keep an MCU out', async () => {
  await withEnv(
    async ({ gw, site, seen }) => {
      // QoS 0 burst then close: every reading reaches the hub
      const id = 'esp-burst';
      const p = spawn('mosquitto_pub', ['-h', '127.0.0.1', '-p', String(gw.mqttPort), '-V', 'mqttv311', '-i', id, '-u', id, '-P', mcuKey(site, id), '-q', '0', '-l', '-t', mcuTopic(id, 't')], { stdio: ['pipe', 'ignore', 'inherit'] });
      p.stdin.end(Array.from({ length: 10 }, (_, i) => JSON.stringify([{ n: 'r', v: i }])).join('\n') + '\n');
      const code = await new Promise((r) => p.once('exit', r));
      assert.equal(code, 0);
      const values = () => (of(seen, id, 'telemetry') as TelemetryBatch[]).flatMap((b) => b.samples.map((s) => s.v));
      await waitFor(() => values().length >= 10, `10 readings at the hub`, 10_000);
      assert.deepEqual([...values()].sort((a, b) => Number(a) - Number(b)), [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);

      // DUP on the same connection: two PUBACKs, one message at the hub
      const dupId = 'esp-dup';
      const c = await raw(gw.mqttPort);
      c.s.write(connectPk(dupId, { username: dupId, password: Buffer.from(mcuKey(site, dupId)) }));
      const t = mcuTopic(dupId, 't');
      c.s.write(Buffer.concat([publishPk(t, '[{"n":"x","v":1}]', 1, 7), publishPk(t, '[{"n":"x","v":1}]', 1, 7, true)]));
      c.s.write(publishPk(t, '[{"n":"x","v":2}]', 1, 8)); // stored after the first (in order): when it is at the hub, a second copy would be too
      await waitFor(() => c.got.filter((q) => q.cmd === 'puback').length >= 3, 'three PUBACKs');
      const dupValues = () => (of(seen, dupId, 'telemetry') as TelemetryBatch[]).flatMap((b) => b.samples.map((s) => s.v));
      await waitFor(() => dupValues().includes(2), 'the next message at the hub', 10_000);
      await sleep(300);
      assert.deepEqual(dupValues(), [1, 2]);
      c.s.destroy();

      // the link drops after the PUBACK was written, before the MCU read it: it resends with DUP
      // on its next connection, and the hub still gets the reading once (the gateway's metric counts it)
      await c.closed;
      const c2 = await raw(gw.mqttPort);
      c2.s.write(connectPk(dupId, { username: dupId, password: Buffer.from(mcuKey(site, dupId)) }));
      c2.s.write(Buffer.concat([publishPk(t, '[{"n":"x","v":2}]', 1, 8, true), publishPk(t, '[{"n":"x","v":3}]', 1, 9)]));
      await waitFor(() => c2.got.filter((q) => q.cmd === 'puback').length >= 2, 'two PUBACKs on the new connection');
      await waitFor(() => dupValues().includes(3), 'the message after the resend at the hub', 10_000);
      await sleep(300);
      assert.deepEqual(dupValues(), [1, 2, 3]);
      const metrics = await (await fetch(`http://127.0.0.1:${gw.httpPort}/metrics`)).text();
      assert.match(metrics, /fleet_gateway_mcu_duplicates_total\{protocol="mqtt",reconnected="true"\} 1\b/);
      assert.match(metrics, /fleet_gateway_mcu_duplicates_total\{protocol="mqtt",reconnected="false"\} 1\b/);
      c2.s.destroy();

      // pre-auth idle sockets (maxMcus 4 + 64, as in the review) from one address; a real MCU from another connects
      const socks: Socket[] = [];
      try {
        for (let i = 0; i < 68; i++) socks.push((await raw(gw.mqttPort, '127.0.0.2')).s);
        await waitFor(() => socks.filter((s) => s.destroyed).length === 68 - 32, '36 destroyed (32 per address)');
        const m = await connectMcu(gw.mqttPort, 'esp-legit', site);
        assert.ok(m.connected);
        m.end(true);
      } finally {
        for (const s of socks) s.destroy();
      }
    },
    { maxMcus: 4 },
  );
});

test('mqtt-lean: 40 QoS 1 PUBLISHes pipelined behind a slow store, then all 40 again with DUP: each stored once (the remembered ids grow with the window; 16 used to cascade into double stores)', async () => {
  const l = await lean({}, 5);
  try {
    const c = await raw(l.port);
    const ids = Array.from({ length: 40 }, (_, i) => i + 1);
    c.s.write(connectPk('esp'));
    c.s.write(Buffer.concat(ids.map((pid) => publishPk('mcu/v1/esp/t', `m${pid}`, 1, pid))));
    c.s.write(Buffer.concat(ids.map((pid) => publishPk('mcu/v1/esp/t', `m${pid}`, 1, pid, true))));
    await waitFor(() => c.got.filter((p) => p.cmd === 'puback').length >= 80, '80 PUBACKs', 15_000);
    await sleep(100);
    assert.deepEqual(l.stored.map(String), ids.map((i) => `m${i}`));
    c.s.destroy();
  } finally {
    await l.srv.close();
  }
});

test('mqtt-lean: 100 QoS 2 PUBLISHes pipelined (as MQTT.js and esp-mqtt send them, PUBRELs behind) are each stored once and the connection stays', async () => {
  const l = await lean({}, 0);
  try {
    const c = await raw(l.port);
    const ids = Array.from({ length: 100 }, (_, i) => i + 1);
    c.s.write(connectPk('esp2'));
    c.s.write(Buffer.concat(ids.map((pid) => pk({ cmd: 'publish', topic: 'mcu/v1/esp2/t', payload: Buffer.from(`q${pid}`), qos: 2, dup: false, retain: false, messageId: pid }))));
    await waitFor(() => c.got.filter((p) => p.cmd === 'pubrec').length >= 100, '100 PUBRECs', 10_000);
    c.s.write(Buffer.concat(ids.map((pid) => pk({ cmd: 'pubrel', messageId: pid }))));
    await waitFor(() => c.got.filter((p) => p.cmd === 'pubcomp').length >= 100, '100 PUBCOMPs', 10_000);
    assert.deepEqual(l.stored.map(String), ids.map((i) => `q${i}`));
    assert.ok(!l.events.some((e) => e.startsWith('malformed')), l.events.join('; '));
    c.s.destroy();
  } finally {
    await l.srv.close();
  }
});

test('mqtt-lean: a refused client that never closes its side and trickles bytes is cut off 5 s after the refusal, freeing its place in the unauthenticated caps', async () => {
  const l = await lean({ maxPreAuthPerAddress: 2, connectTimeoutMs: 1000 });
  const socks: Socket[] = [];
  try {
    const zombies = await Promise.all([0, 1].map(() => raw(l.port, '127.0.0.3', true)));
    for (const z of zombies) {
      socks.push(z.s);
      z.s.write(connectPk('esp-z', { username: 'esp-z', password: Buffer.from('bad') }));
    }
    await waitFor(() => zombies.every((z) => z.got.some((p) => p.cmd === 'connack')), 'both refused');
    const trickle = setInterval(() => zombies.forEach((z) => z.s.writable && z.s.write(Buffer.from([0]))), 1000);
    try {
      const t0 = Date.now();
      const cut = await Promise.race([Promise.all(zombies.map((z) => z.closed)).then(() => true), sleep(9000).then(() => false)]);
      // 5 s after the refusal; 9 s leaves a slow machine 4 s of slack (never cut, on the old code)
      assert.ok(cut, `both cut off within 9 s of the refusal (${Date.now() - t0} ms)`);
    } finally {
      clearInterval(trickle);
    }
    // their places are free: a third connection from the address is served
    const ok = await raw(l.port, '127.0.0.3');
    socks.push(ok.s);
    ok.s.write(connectPk('esp-ok'));
    await waitFor(() => ok.got.some((p) => p.cmd === 'connack' && (p as mqttPacket.IConnackPacket).returnCode === 0), 'the next client accepted');
  } finally {
    for (const s of socks) s.destroy();
    await l.srv.close();
  }
});

test('mqtt-lean: a PUBLISH trickled in 1-byte TCP segments is stored intact', async () => {
  const l = await lean({}, 0);
  try {
    const c = await raw(l.port);
    c.s.setNoDelay(true);
    c.s.write(connectPk('esp-t'));
    await waitFor(() => c.got.some((p) => p.cmd === 'connack'), 'connected');
    const payload = Buffer.alloc(600, 0x61);
    const bytes = publishPk('mcu/v1/esp-t/t', payload, 1, 7);
    for (let i = 0; i < bytes.length; i++) {
      c.s.write(bytes.subarray(i, i + 1));
      if (i % 4 === 0) await sleep(1);
    }
    await waitFor(() => c.got.some((p) => p.cmd === 'puback'), 'acknowledged');
    assert.equal(l.stored.length, 1);
    assert.deepEqual(l.stored[0], payload);
    c.s.destroy();
  } finally {
    await l.srv.close();
  }
});

test('mqtt-lean over TLS: the CONNECT timeout counts from the TCP accept, the handshake included (a slow handshake does not get the timeout twice over)', async () => {
  // 8 s: the late handshake below (5 s after the accept) has 3 s to finish before the timeout
  const l = await lean({ connectTimeoutMs: 8000 });
  const tmp = tempDir();
  try {
    const tlsPort = await listenTlsSelfSigned(l, tmp.dir);
    const tcp = connect({ port: tlsPort, host: '127.0.0.1' });
    await new Promise((r) => tcp.once('connect', r));
    const t0 = Date.now();
    // a slow client: its handshake starts late (within the handshake timeout, also 8 s), then it sends no CONNECT
    await sleep(5000);
    const { connect: tlsConnect } = await import('node:tls');
    const s = tlsConnect({ socket: tcp, rejectUnauthorized: false });
    s.on('error', () => undefined);
    const closedP = new Promise((r) => s.once('close', () => r(true)));
    assert.ok(await Promise.race([new Promise((r) => s.once('secureConnect', () => r(true))), closedP.then(() => false)]), 'handshake done');
    const closed = await Promise.race([closedP, sleep(16_000).then(() => false)]);
    const took = Date.now() - t0;
    assert.ok(closed, 'closed without a CONNECT');
    // 8 s after the accept, plus up to 1 s for the sweep (and slack for a loaded machine): well
    // before 5 s + 8 s, when the timeout started over after the handshake
    assert.ok(took < 12_000, `closed ${took} ms after the TCP accept`);
    s.destroy();
  } finally {
    await l.srv.close();
    tmp.cleanup();
  }
});

test('mqtt-lean: 400 stores settling together (one outbox commit) are answered over a few turns of the event loop (half of what waits, at least 128, per turn), not all in one; every PUBLISH is acknowledged and stored once, in order per connection', async () => {
  const N = 400;
  let release!: () => void;
  const commit = new Promise<void>((r) => (release = r));
  let firsts = 0;
  /** second PUBLISHes reaching the store per turn of the event loop (counted by an immediate per turn) */
  let turn = 0;
  const laterByTurn = new Map<number, number>();
  const stored = new Map<string, string[]>();
  const l = await lean({ maxConnections: N + 10 }, 0, {
    onPublish: (conn, p) => {
      const body = String(p.payload);
      const list = stored.get(conn.id!) ?? [];
      stored.set(conn.id!, list);
      list.push(body);
      if (body.endsWith('#1')) {
        // every first PUBLISH waits for the same commit, as the relay's group does
        if (++firsts === N) release();
        return commit.then(() => 'ack' as const);
      }
      // the second PUBLISH of a connection: handled right after its first was answered
      if (body.endsWith('#2')) laterByTurn.set(turn, (laterByTurn.get(turn) ?? 0) + 1);
      return 'ack';
    },
  });
  let ticking = true;
  const tick = (): void => {
    turn++;
    if (ticking) setImmediate(tick);
  };
  setImmediate(tick);
  const clients: Awaited<ReturnType<typeof raw>>[] = [];
  try {
    for (let i = 0; i < N; i++) {
      const c = await raw(l.port);
      c.s.write(Buffer.concat([connectPk(`m${i}`), ...[1, 2, 3].map((k) => publishPk(`mcu/v1/m${i}/t`, `m${i}#${k}`, 1, k))]));
      clients.push(c);
    }
    await waitFor(() => clients.every((c) => c.got.filter((p) => p.cmd === 'puback').length === 3), `${3 * N} PUBACKs`, 30_000);
    for (const [i, c] of clients.entries()) {
      assert.deepEqual(c.got.filter((p) => p.cmd === 'puback').map((p) => (p as mqttPacket.IPubackPacket).messageId), [1, 2, 3], `m${i}'s PUBACKs in order`);
      assert.deepEqual(stored.get(`m${i}`), [1, 2, 3].map((k) => `m${i}#${k}`), `m${i} stored once each, in order`);
    }
    const perTurn = [...laterByTurn.values()];
    assert.equal(perTurn.reduce((a, b) => a + b, 0), N);
    // a connection answered in a slice handles what it sent next in that turn: half of what
    // waits per turn (at least 128), so 200, 128, 72 here, never all 400 at once, and in a
    // few turns (a fixed 128 a turn fell behind under load)
    assert.ok(Math.max(...perTurn) <= N / 2, `at most half the waiting connections answered per turn, saw ${Math.max(...perTurn)}`);
    assert.ok(perTurn.length >= 2 && perTurn.length <= 4, `answered over a few turns: ${perTurn.join(', ')}`);
  } finally {
    ticking = false;
    for (const c of clients) c.s.destroy();
    await l.srv.close();
  }
});

test('mqtt-lean: a QoS 1 PUBLISH resent with DUP after a reconnect (its PUBACK lost with the link) is acknowledged and not stored twice: acknowledged before the close, stored while the link went down, or on a connection taken over; a new payload under the same id is stored', async () => {
  const l = await lean({}, 150, { onDuplicate: (c, reconnected) => l.events.push(`dup ${c.id} ${reconnected}`) });
  const pubacks = (c: Awaited<ReturnType<typeof raw>>) => c.got.filter((p) => p.cmd === 'puback').map((p) => (p as mqttPacket.IPubackPacket).messageId);
  try {
    // acknowledged, then the link drops (the MCU never saw the PUBACK): resent on the next connection
    const a1 = await raw(l.port);
    a1.s.write(Buffer.concat([connectPk('esp-a'), publishPk('mcu/v1/esp-a/t', 'a5', 1, 5)]));
    await waitFor(() => pubacks(a1).includes(5), 'PUBACK 5');
    a1.s.destroy();
    await a1.closed;
    const a2 = await raw(l.port);
    a2.s.write(Buffer.concat([connectPk('esp-a'), publishPk('mcu/v1/esp-a/t', 'a5', 1, 5, true), publishPk('mcu/v1/esp-a/t', 'a5-other', 1, 5, true), publishPk('mcu/v1/esp-a/t', 'a6', 1, 6)]));
    await waitFor(() => pubacks(a2).length === 3, 'three PUBACKs on the new connection', 5000);
    assert.deepEqual(pubacks(a2), [5, 5, 6]);

    // the link drops while the PUBLISH is being stored: stored, its PUBACK never written
    const b1 = await raw(l.port);
    b1.s.write(connectPk('esp-b'));
    await waitFor(() => b1.got.some((p) => p.cmd === 'connack'), 'CONNACK');
    b1.s.write(publishPk('mcu/v1/esp-b/t', 'b9', 1, 9));
    await sleep(30); // read, store under way
    b1.s.destroy();
    await waitFor(() => l.stored.map(String).includes('b9'), 'b9 stored after the close');
    await sleep(20);
    const b2 = await raw(l.port);
    b2.s.write(Buffer.concat([connectPk('esp-b'), publishPk('mcu/v1/esp-b/t', 'b9', 1, 9, true)]));
    await waitFor(() => pubacks(b2).includes(9), 'PUBACK 9 on the new connection');

    // a new connection takes over one still open (the MCU gave up on a half-open link)
    const c1 = await raw(l.port);
    c1.s.write(Buffer.concat([connectPk('esp-c'), publishPk('mcu/v1/esp-c/t', 'c3', 1, 3)]));
    await waitFor(() => pubacks(c1).includes(3), 'PUBACK 3');
    const c2 = await raw(l.port);
    c2.s.write(Buffer.concat([connectPk('esp-c'), publishPk('mcu/v1/esp-c/t', 'c3', 1, 3, true)]));
    await waitFor(() => pubacks(c2).includes(3), 'PUBACK 3 on the connection that took over');
    await c1.closed;

    await sleep(200);
    assert.deepEqual(l.stored.map(String), ['a5', 'a5-other', 'a6', 'b9', 'c3'], 'each message stored once; a different payload under a resent id is a new message');
    assert.deepEqual(l.events.filter((e) => e.startsWith('dup')), ['dup esp-a true', 'dup esp-b true', 'dup esp-c true']);
    for (const c of [a2, b2, c2]) c.s.destroy();
  } finally {
    await l.srv.close();
  }
});

test('mqtt-lean: what closed connections acknowledged is remembered for at most maxConnections MCUs (the longest gone forgotten first), and only by the next connection; a plain resend without DUP is a new message', async () => {
  const l = await lean({ maxConnections: 2 }, 0);
  const once = async (id: string, payload: string, dup: boolean, pid = 1) => {
    const c = await raw(l.port);
    c.s.write(Buffer.concat([connectPk(id), publishPk(`mcu/v1/${id}/t`, payload, 1, pid, dup)]));
    await waitFor(() => c.got.some((p) => p.cmd === 'puback'), `PUBACK to ${id}`);
    c.s.destroy();
    await c.closed;
    await sleep(10);
  };
  try {
    for (const id of ['m1', 'm2', 'm3']) await once(id, `${id}-x`, false);
    await once('m1', 'm1-x', true); // forgotten: m3 pushed it out
    await once('m3', 'm3-x', true); // remembered
    await once('m3', 'm3-x', false); // no DUP: a new message that happens to repeat the last
    // only the previous connection counts: one that acknowledged nothing (its PUBLISH never
    // read) passes nothing on, so the resend of that PUBLISH is stored even though it
    // repeats the id and payload of one acknowledged two connections back
    await once('m3', 'm3-x', true); // remembered from the connection before: not stored
    const silent = await raw(l.port);
    silent.s.write(connectPk('m3'));
    await waitFor(() => silent.got.some((p) => p.cmd === 'connack'), 'CONNACK');
    silent.s.destroy();
    await silent.closed;
    await sleep(10);
    await once('m3', 'm3-x', true);
    assert.deepEqual(l.stored.map(String), ['m1-x', 'm2-x', 'm3-x', 'm1-x', 'm3-x', 'm3-x']);
  } finally {
    await l.srv.close();
  }
});

/**
 * A rig whose store completes a PUBLISH whose payload starts with `gate` only when `open()`
 * is called (the others at once), and records payloads in `done` as their stores complete.
 */
async function gatedLean(): Promise<{ l: LeanRig; done: string[]; called: string[]; open: () => void }> {
  const done: string[] = [];
  const called: string[] = [];
  let open!: () => void;
  const gate = new Promise<void>((r) => (open = r));
  const l = await lean({}, 0, {
    onPublish: async (_conn, p) => {
      const body = String(p.payload);
      called.push(body);
      if (body.startsWith('gate')) await gate;
      done.push(body);
      return 'ack' as const;
    },
    onDuplicate: (c, reconnected) => l.events.push(`dup ${c.id} ${reconnected}`),
  });
  return { l, done, called, open };
}

test('mqtt-lean: a burst of 50 QoS 0 PUBLISHes and a FIN behind a slow store (10 ms), then a reconnect that publishes at once: the reconnected connection waits, and the MCU’s messages are stored in the order sent (old-0..old-49, then new-0)', async () => {
  const l = await lean({}, 10);
  try {
    const a = await raw(l.port);
    a.s.end(Buffer.concat([connectPk('esp-1'), ...Array.from({ length: 50 }, (_, i) => publishPk('mcu/v1/esp-1/t', `old-${i}`, 0))]));
    await a.closed;
    // the MCU reconnects at once and sends its next readings
    const b = await raw(l.port);
    b.s.write(Buffer.concat([connectPk('esp-1'), publishPk('mcu/v1/esp-1/t', 'new-0', 0), publishPk('mcu/v1/esp-1/t', 'new-1', 1, 1)]));
    await waitFor(() => b.got.some((p) => p.cmd === 'puback'), 'PUBACK of new-1', 10_000);
    assert.deepEqual(l.stored.map(String), [...Array.from({ length: 50 }, (_, i) => `old-${i}`), 'new-0', 'new-1']);
    assert.equal(b.got[0]?.cmd, 'connack', 'the CONNACK is not held back');
    b.s.destroy();
  } finally {
    await l.srv.close();
  }
});

test('mqtt-lean: a connection that closed while its store was pending hands over in order across several reconnects: B (closed while waiting) has its QoS 0 stored after A’s, then C; nothing is written to B', async () => {
  const { l, done, called, open } = await gatedLean();
  try {
    const a = await raw(l.port);
    a.s.end(Buffer.concat([connectPk('esp-1'), publishPk('mcu/v1/esp-1/t', 'gate-a0', 0), publishPk('mcu/v1/esp-1/t', 'a1', 0), publishPk('mcu/v1/esp-1/t', 'a2', 0)]));
    await a.closed;
    await waitFor(() => called.includes('gate-a0'), 'A’s first store pending');
    const b = await raw(l.port, '127.0.0.1', true); // half-open: it could still read anything written after its FIN
    b.s.end(Buffer.concat([connectPk('esp-1'), publishPk('mcu/v1/esp-1/t', 'b1', 0), publishPk('mcu/v1/esp-1/t', 'b2', 0)]));
    await waitFor(() => b.got.some((p) => p.cmd === 'connack'), 'CONNACK to B');
    await b.closed;
    const c = await raw(l.port);
    c.s.write(Buffer.concat([connectPk('esp-1'), publishPk('mcu/v1/esp-1/t', 'c1', 0), publishPk('mcu/v1/esp-1/t', 'c2', 1, 1)]));
    await waitFor(() => c.got.some((p) => p.cmd === 'connack'), 'CONNACK to C');
    assert.deepEqual(called, ['gate-a0'], 'B and C read nothing while A’s store is pending');
    open();
    await waitFor(() => c.got.some((p) => p.cmd === 'puback'), 'PUBACK of c2');
    assert.deepEqual(done, ['gate-a0', 'a1', 'a2', 'b1', 'b2', 'c1', 'c2']);
    assert.equal(b.bytes(), 4, 'only the CONNACK reached B');
    assert.equal(l.srv.connectedClients, 1);
    c.s.destroy();
  } finally {
    open();
    await l.srv.close();
  }
});

test('mqtt-lean: a new connection that takes over one whose store is pending waits for it: its PUBLISH is stored after, and its DUP resend of the pending QoS 1 PUBLISH is acknowledged, not stored twice (also when the old link was cut)', async () => {
  for (const cut of [false, true]) {
    const { l, done, called, open } = await gatedLean();
    try {
      const a = await raw(l.port);
      a.s.write(Buffer.concat([connectPk('esp-1'), publishPk('mcu/v1/esp-1/t', 'gate', 1, 5)]));
      await waitFor(() => called.includes('gate'), 'A’s store pending');
      if (cut) {
        a.s.destroy(); // the link dropped: A closed before B comes
        await a.closed;
      }
      // the MCU never saw the PUBACK: it resends with DUP on its next connection, then goes on
      const b = await raw(l.port);
      b.s.write(Buffer.concat([connectPk('esp-1'), publishPk('mcu/v1/esp-1/t', 'gate', 1, 5, true), publishPk('mcu/v1/esp-1/t', 'b1', 0), publishPk('mcu/v1/esp-1/t', 'b2', 1, 6)]));
      await waitFor(() => b.got.some((p) => p.cmd === 'connack'), 'CONNACK to B');
      if (!cut) await a.closed; // taken over
      assert.deepEqual(called, ['gate'], 'B reads nothing while A’s store is pending');
      open();
      await waitFor(() => b.got.filter((p) => p.cmd === 'puback').length === 2, 'two PUBACKs to B');
      assert.deepEqual(b.got.filter((p) => p.cmd === 'puback').map((p) => (p as mqttPacket.IPubackPacket).messageId), [5, 6]);
      assert.deepEqual(done, ['gate', 'b1', 'b2'], cut ? 'link cut' : 'taken over');
      assert.deepEqual(l.events.filter((e) => e.startsWith('dup')), ['dup esp-1 true']);
      b.s.destroy();
    } finally {
      open();
      await l.srv.close();
    }
  }
});

test('mqtt-lean (wall clock mocked): keep-alive runs on the monotonic clock: a wall-clock step forward of 5 h drops no live connection, a step back of a day does not keep a silent one open', async (t) => {
  const l = await lean();
  const realNow = Date.now.bind(Date);
  let offset = 0;
  t.mock.method(Date, 'now', () => realNow() + offset);
  try {
    const live = await raw(l.port);
    live.s.write(connectPk('ka-live', { keepalive: 2 }));
    await waitFor(() => live.got.length === 1, 'CONNACK');
    offset = 5 * 3600_000; // NTP steps the clock forward at boot
    let closed = false;
    void live.closed.then(() => (closed = true));
    // silent for 1.5 s first: a keep-alive sweep (every second) runs before the next packet,
    // so its last packet's time is one read before the step
    await sleep(1500);
    for (let i = 0; i < 4; i++) {
      live.s.write(pk({ cmd: 'pingreq' }));
      await sleep(500);
    }
    assert.equal(closed, false, 'a live connection survives the step (the keep-alive sweep runs every second)');
    live.s.destroy();

    const silent = await raw(l.port);
    silent.s.write(connectPk('ka-silent', { keepalive: 1 }));
    await waitFor(() => silent.got.length === 1, 'CONNACK');
    offset = -24 * 3600_000; // and back
    const t0 = performance.now();
    // due 1.5 s after its last packet, plus up to 1 s for the sweep; kept open (the bug this
    // guards against) it would still be open at 20 s, so 15 s leaves a stalled machine 12 s
    // (an unref'd timer: once closed, the pending sleep does not keep the file's process up)
    const closedIn = await Promise.race([silent.closed.then(() => true), new Promise<boolean>((r) => setTimeout(r, 20_000, false).unref())]);
    const waited = performance.now() - t0;
    assert.ok(closedIn && waited < 15_000, `the silent connection is closed 1.5 keep-alives after its last packet (waited ${Math.round(waited)} ms)`);
  } finally {
    await l.srv.close();
  }
});
