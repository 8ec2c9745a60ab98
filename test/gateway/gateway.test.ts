import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createSocket } from 'node:dgram';
import { readFileSync, writeFileSync } from 'node:fs';
import { createConnection } from 'node:net';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { Agent, request as coapRequest } from 'coap';
import mqtt, { type MqttClient } from 'mqtt';
import { deriveToken } from '../../core/credentials.ts';
import { decodeMessage, type Sample, type StateMessage, type TelemetryBatch } from '../../core/messages.ts';
import { writeSecretFile } from '../../core/secrets.ts';
import { deviceTopic } from '../../core/topics.ts';
import { mcuKey, signMcuMessage } from '../../firmware-bridge/auth.ts';
import { coapAuthQuery, coapPath } from '../../firmware-bridge/coap.ts';
import { encodeSenmlJson } from '../../firmware-bridge/senml.ts';
import { mcuTopic } from '../../firmware-bridge/topics.ts';
import { GatewayConfigSchema, type GatewayConfig } from '../../gateway/config.ts';
import { startGateway, type GatewayHandle } from '../../gateway/index.ts';
import { HubConfigSchema } from '../../hub/config.ts';
import { startHub, type HubHandle } from '../../hub/index.ts';
import { stablePort, tempDir, testLogger, waitFor } from '../helpers.ts';
import { nextCounter, withEnv, type Seen } from './env.ts';

function connectMcu(port: number, id: string, password: string): Promise<MqttClient> {
  return new Promise((resolve, reject) => {
    const c = mqtt.connect(`mqtt://127.0.0.1:${port}`, { clientId: id, username: id, password, reconnectPeriod: 0, connectTimeout: 5000 });
    c.once('connect', () => resolve(c));
    c.once('error', (err) => {
      c.end(true);
      reject(err);
    });
  });
}

interface CoapReply {
  code: string;
  body: string;
  /** the Max-Age option, when asked for (`withMaxAge`) */
  maxAge?: unknown;
}

/** One CoAP request through a fresh agent, which closes its socket once answered. */
function coapPost(port: number, path: string, query: string | undefined, payload: Buffer, method: 'POST' | 'GET' = 'POST', withMaxAge = false): Promise<CoapReply> {
  return new Promise((resolve, reject) => {
    const req = coapRequest({ host: '127.0.0.1', port, method, pathname: path, ...(query ? { query } : {}), confirmable: true, agent: new Agent({ type: 'udp4' }) });
    req.on('response', (res) => resolve({ code: res.code, body: res.payload.toString('utf8'), ...(withMaxAge ? { maxAge: res.headers['Max-Age'] } : {}) }));
    req.on('error', reject);
    req.on('timeout', reject);
    req.end(method === 'POST' ? payload : undefined);
  });
}

function signedPost(port: number, site: string, id: string, counter: number, payload: Buffer): Promise<CoapReply> {
  const mac = signMcuMessage(mcuKey(site, id), id, 't', counter, payload);
  return coapPost(port, coapPath(id, 't'), coapAuthQuery(counter, mac), payload);
}

const samples = (v: number): Sample[] => [
  { n: 'temperature', u: 'Cel', v, t: Date.now() },
  { n: 'rssi', u: 'dBm', v: -60, t: Date.now() },
];

const telemetryOf = (seen: Seen[], id: string): TelemetryBatch[] => seen.filter((s) => s.topic === deviceTopic(id, 'telemetry')).map((s) => decodeMessage('telemetry', s.payload));
const statesOf = (seen: Seen[], id: string): StateMessage[] => seen.filter((s) => s.topic === deviceTopic(id, 'state')).map((s) => decodeMessage('state', s.payload));
const registers = (seen: Seen[]): string[][] => seen.filter((s) => s.topic === deviceTopic('gw-1', 'register')).map((s) => decodeMessage('register', s.payload).mcus);

test('gateway: MQTT and CoAP MCU telemetry reaches the hub as TelemetryBatch, after register and online state', async () => {
  await withEnv(async ({ hub, gw, site, seen, hubRefusals }) => {
    await waitFor(() => gw.stats().hubConnected, 'gateway connected to the hub');

    const m1 = await connectMcu(gw.mqttPort, 'esp-m1', mcuKey(site, 'esp-m1'));
    await m1.publishAsync(mcuTopic('esp-m1', 't'), encodeSenmlJson(samples(21.5)), { qos: 1 });
    const coapReply = await signedPost(gw.coapPort, site, 'esp-c1', 1, encodeSenmlJson(samples(19.25)));
    assert.deepEqual(coapReply, { code: '2.04', body: '' });

    const m1Batch = await waitFor(() => telemetryOf(seen, 'esp-m1')[0], 'esp-m1 telemetry at the hub');
    assert.equal(m1Batch.samples[0]?.n, 'temperature');
    assert.equal(m1Batch.samples[0]?.v, 21.5);
    assert.equal(m1Batch.samples[0]?.u, 'Cel');
    assert.match(m1Batch.mid, /^[0-9]+$/);
    const c1Batch = await waitFor(() => telemetryOf(seen, 'esp-c1')[0], 'esp-c1 telemetry at the hub');
    assert.equal(c1Batch.samples[0]?.v, 19.25);

    // the hub took them as the MCUs' own telemetry, delivered through gw-1
    await waitFor(() => hub.registry.get('esp-m1')?.samples === 2 && hub.registry.get('esp-c1')?.samples === 2, 'hub registry counted the samples');
    assert.equal(hub.registry.get('esp-m1')?.via, 'gw-1');
    // the MCU's state (online) and its first telemetry travel as separate messages once the
    // register covers it; either may reach the hub first
    await waitFor(() => hub.registry.get('esp-c1')?.online === true, 'esp-c1 online in the hub registry');

    // the register lists all MCUs, and the hub never had to refuse a publish: a
    // message for an MCU ahead of its register would have been refused and would have
    // cost the gateway its connection (the operator's view is no proof of order:
    // aedes may deliver QoS 1 messages of different topics out of order)
    await waitFor(() => registers(seen).some((r) => r.length === 2), 'register listing both MCUs');
    assert.deepEqual([...registers(seen).find((r) => r.length === 2)!].sort(), ['esp-c1', 'esp-m1']);
    assert.deepEqual(hubRefusals(), []);
    for (const id of ['esp-m1', 'esp-c1']) {
      await waitFor(() => statesOf(seen, id).length === 1, `${id} state`);
      assert.deepEqual(statesOf(seen, id).map((s) => [s.online, s.kind, s.via]), [[true, 'mcu', 'gw-1']]);
    }
    const st = gw.stats();
    assert.deepEqual(st.messagesIn, { mqtt: 1, coap: 1 });
    assert.equal(st.mcus, 2);
    assert.equal(st.online, 2);
    assert.match(gw.metrics.render(), /fleet_gateway_mcu_messages_total\{channel="t",protocol="coap"\} 1/);
    await m1.endAsync();
  });
});

test('gateway: a refused CoAP Observe of the mailbox is answered with its error code and no Observe option, never as a 2.05 notification', async () => {
  await withEnv(async ({ gw, site }) => {
    // a mailbox Observe with a MAC made with another MCU's key: refused 4.01 (auth). With the
    // coap package's observe stream this went out as 2.05 + Observe + "FLEET_MCU_AUTH", which
    // an MCU takes for a command frame (the simulator counted it as a bad command)
    const c = nextCounter();
    const mac = signMcuMessage(mcuKey(site, 'esp-x2'), 'esp-x1', 'cmd', c, Buffer.alloc(0));
    const res = await new Promise<{ code: string; observe: unknown; body: Buffer }>((resolve, reject) => {
      const req = coapRequest({ host: '127.0.0.1', port: gw.coapPort, method: 'GET', pathname: coapPath('esp-x1', 'cmd'), query: coapAuthQuery(c, mac), observe: true, confirmable: true, agent: new Agent({ type: 'udp4' }) });
      req.on('response', (r) => {
        resolve({ code: r.code, observe: r.headers.Observe, body: r.payload });
        (r as unknown as { close?: () => void }).close?.();
      });
      req.on('error', reject);
      req.end();
    });
    assert.equal(res.code, '4.01');
    assert.equal(res.observe, undefined, 'no Observe option on an error');
    assert.notEqual(res.body.toString(), 'FLEET_MCU_AUTH');
    assert.equal(gw.stats().dropped.auth, 1);
  });
});

test('gateway: MQTT ACL — wrong key refused, other MCU topics refused, bad SenML dropped, oversized packet cut', async () => {
  await withEnv(
    async ({ gw, site, seen }) => {
      await assert.rejects(connectMcu(gw.mqttPort, 'esp-m1', mcuKey(site, 'esp-m2')), /Bad username or password/i);
      await assert.rejects(connectMcu(gw.mqttPort, 'esp-m1', 'not-the-key'), /Bad username or password/i);
      await assert.rejects(connectMcu(gw.mqttPort, 'bad/id', mcuKey(site, 'esp-m1')), /Bad username or password/i);
      assert.equal(gw.stats().dropped.auth, 3);

      const m1 = await connectMcu(gw.mqttPort, 'esp-m1', mcuKey(site, 'esp-m1'));
      // subscriptions: own command topic yes, another MCU's no (SUBACK 0x80; the connection stays)
      assert.equal((await m1.subscribeAsync(mcuTopic('esp-m1', 'cmd'), { qos: 1 }))[0]?.qos, 1);
      await assert.rejects(m1.subscribeAsync(mcuTopic('esp-m2', 'cmd'), { qos: 1 }), /Subscribe error/);
      await assert.rejects(m1.subscribeAsync('mcu/v1/+/t', { qos: 1 }), /Subscribe error/);

      // bad SenML: dropped and counted, connection kept
      await m1.publishAsync(mcuTopic('esp-m1', 't'), Buffer.from('{"not":"senml"}'), { qos: 1 });
      assert.equal(gw.stats().dropped.decode, 1);
      assert.ok(m1.connected);
      await m1.publishAsync(mcuTopic('esp-m1', 't'), encodeSenmlJson(samples(1)), { qos: 1 });
      await waitFor(() => telemetryOf(seen, 'esp-m1').length === 1, 'good telemetry after a bad one');

      // publishing into another MCU's subtree closes the connection; nothing reaches the hub
      const closed = new Promise<void>((r) => m1.once('close', () => r()));
      m1.publish(mcuTopic('esp-m2', 't'), encodeSenmlJson(samples(2)), { qos: 1 });
      await closed;
      assert.equal(gw.stats().dropped.forbidden, 1);
      m1.end(true);

      // a packet over the frame limit is cut before it is buffered
      const m2 = await connectMcu(gw.mqttPort, 'esp-m2', mcuKey(site, 'esp-m2'));
      const closed2 = new Promise<void>((r) => m2.once('close', () => r()));
      m2.publish(mcuTopic('esp-m2', 't'), Buffer.alloc(8 * 1024, 0x20), { qos: 1 });
      await closed2;
      m2.end(true);
      await waitFor(() => gw.stats().dropped.too_large === 1, 'oversized packet counted');

      // an unauthenticated peer announcing a huge CONNECT is cut at once as well
      const raw = createConnection({ host: '127.0.0.1', port: gw.mqttPort });
      await new Promise<void>((r) => raw.once('connect', () => r()));
      const rawClosed = new Promise<void>((r) => raw.once('close', () => r()));
      raw.on('error', () => undefined);
      raw.write(Buffer.from([0x10, 0xff, 0xff, 0xff, 0x7f])); // CONNECT of 256 MB
      await rawClosed;

      // still serving
      const m3 = await connectMcu(gw.mqttPort, 'esp-m3', mcuKey(site, 'esp-m3'));
      await m3.publishAsync(mcuTopic('esp-m3', 't'), encodeSenmlJson(samples(3)), { qos: 1 });
      await waitFor(() => telemetryOf(seen, 'esp-m3').length === 1, 'esp-m3 telemetry');
      await m3.endAsync();
      await sleep(100);
      assert.equal(telemetryOf(seen, 'esp-m2').length, 0, 'nothing from the refused messages reached the hub');
    },
    { maxPayloadBytes: 1024 },
  );
});

test('gateway: CoAP — bad MAC 4.01, replay 4.01, bad payload 4.00, wrong path/method, a Block1 block out of order refused; gateway stays up', async () => {
  await withEnv(async ({ gw, site, seen }) => {
    const id = 'esp-c1';
    const body = encodeSenmlJson(samples(20));
    const goodMac = signMcuMessage(mcuKey(site, id), id, 't', 10, body);

    const forged = await coapPost(gw.coapPort, coapPath(id, 't'), coapAuthQuery(10, signMcuMessage(mcuKey(site, 'esp-other'), id, 't', 10, body)), body);
    assert.deepEqual(forged, { code: '4.01', body: 'FLEET_MCU_AUTH' });
    const noMac = await coapPost(gw.coapPort, coapPath(id, 't'), 'c=10', body);
    assert.deepEqual(noMac, { code: '4.01', body: 'FLEET_MCU_AUTH' });

    assert.equal((await coapPost(gw.coapPort, coapPath(id, 't'), coapAuthQuery(10, goodMac), body)).code, '2.04');
    // the same datagram content again (a new CoAP message id, so not a retransmission): replay
    assert.deepEqual(await coapPost(gw.coapPort, coapPath(id, 't'), coapAuthQuery(10, goodMac), body), { code: '4.01', body: 'FLEET_MCU_REPLAY' });

    const junk = Buffer.from('not senml');
    assert.deepEqual(await signedPost(gw.coapPort, site, id, 11, junk), { code: '4.00', body: 'FLEET_MCU_DECODE' });
    assert.equal((await coapPost(gw.coapPort, '/mcu/v1/esp-c1/nope', undefined, body)).code, '4.04');
    // the gateway's own id cannot be an MCU, even with a valid MAC
    assert.deepEqual(await signedPost(gw.coapPort, site, 'gw-1', 1, body), { code: '4.03', body: 'FLEET_FORBIDDEN' });
    assert.equal((await coapPost(gw.coapPort, coapPath(id, 't'), undefined, body, 'GET')).code, '4.05');

    // a Block1 block that starts no upload (4.08) and garbage datagrams never reach the coap package
    const udp = createSocket('udp4');
    const block1 = Buffer.from([0x40, 0x02, 0x12, 0x34, 0xb1, 0x78, 0xd3, 0x03, 0xff, 0xff, 0xf6, 0xff, 0x68, 0x69]);
    await new Promise<void>((r) => udp.send(block1, gw.coapPort, '127.0.0.1', () => r()));
    await new Promise<void>((r) => udp.send(Buffer.from([0xde, 0xad, 0xbe, 0xef, 0x00]), gw.coapPort, '127.0.0.1', () => r()));
    await waitFor(() => gw.stats().dropped.upload === 1 && gw.stats().dropped.bad_request! >= 1, 'raw datagrams dropped');
    await new Promise<void>((r) => udp.close(() => r()));

    // still serving, and a fresh counter is fine
    assert.equal((await signedPost(gw.coapPort, site, id, 12, encodeSenmlJson(samples(22)))).code, '2.04');
    await waitFor(() => telemetryOf(seen, id).length === 2, 'two accepted messages at the hub');
    assert.deepEqual(
      telemetryOf(seen, id).map((b) => b.samples[0]?.v),
      [20, 22],
    );
    const d = gw.stats().dropped;
    assert.equal(d.auth, 2);
    assert.equal(d.replay, 1);
    assert.equal(d.decode, 1);
    assert.match(gw.metrics.render(), /fleet_gateway_mcu_dropped_total\{protocol="coap",reason="replay"\} 1/);
  });
});

test('gateway: CoAP — copies of a message sent from other addresses while it is being stored are not stored again (5.03 FLEET_MCU_IN_FLIGHT, Max-Age 1); once stored they are replays', async () => {
  // appends wait for the next fsync, at most one a second: after one just now, the next
  // store takes up to a second, and the copies arrive while it is held
  await withEnv(
    async ({ gw, site, seen }) => {
      const id = 'esp-c2';
      assert.equal((await signedPost(gw.coapPort, site, id, 29, encodeSenmlJson(samples(29)))).code, '2.04'); // a sync just now
      const body = encodeSenmlJson(samples(30));
      const query = coapAuthQuery(30, signMcuMessage(mcuKey(site, id), id, 't', 30, body));
      // one captured datagram sent five times at once, each from its own socket (a new address
      // and message id: no retransmission the exchange cache would answer)
      const replies = await Promise.all(Array.from({ length: 5 }, () => coapPost(gw.coapPort, coapPath(id, 't'), query, body, 'POST', true)));
      const codes = JSON.stringify(replies);
      assert.equal(replies.filter((r) => r.code === '2.04').length, 1, codes);
      const inFlight = replies.filter((r) => r.code === '5.03');
      // the copies came within milliseconds of each other, the store takes up to a second: at
      // least one is answered in flight (on a stalled machine a later one may find it stored: a replay)
      assert.ok(inFlight.length >= 1, codes);
      for (const r of inFlight) assert.deepEqual(r, { code: '5.03', body: 'FLEET_MCU_IN_FLIGHT', maxAge: 1 });
      for (const r of replies.filter((x) => x.code !== '2.04' && x.code !== '5.03')) assert.deepEqual(r, { code: '4.01', body: 'FLEET_MCU_REPLAY', maxAge: undefined });
      assert.deepEqual(await coapPost(gw.coapPort, coapPath(id, 't'), query, body), { code: '4.01', body: 'FLEET_MCU_REPLAY' });
      await waitFor(() => telemetryOf(seen, id).length === 2, 'both readings at the hub');
      await sleep(300);
      assert.deepEqual(telemetryOf(seen, id).map((b) => b.samples[0]?.v), [29, 30], 'the copied one stored once');
    },
    {},
    undefined,
    { outbox: { syncIntervalMs: 1000 } },
  );
});

test('gateway: a silent MCU is reported offline; replay counters and the MCU list survive a restart', async () => {
  await withEnv(
    async ({ hub, gw, site, seen, start }) => {
      const body = encodeSenmlJson(samples(5));
      const mac = signMcuMessage(mcuKey(site, 'esp-c1'), 'esp-c1', 't', 100, body);
      assert.equal((await coapPost(gw.coapPort, coapPath('esp-c1', 't'), coapAuthQuery(100, mac), body)).code, '2.04');
      // lost after 600 ms of silence
      await waitFor(() => statesOf(seen, 'esp-c1').some((s) => !s.online), 'esp-c1 reported offline', 5000);
      const lost = statesOf(seen, 'esp-c1').find((s) => !s.online)!;
      assert.equal(lost.via, 'gw-1');
      assert.match(lost.reason ?? '', /no contact for \d+ s \(lost after \d+ s\)/);
      // talking again brings it back online
      assert.equal((await signedPost(gw.coapPort, site, 'esp-c1', 101, body)).code, '2.04');
      await waitFor(() => statesOf(seen, 'esp-c1').at(-1)?.online === true, 'esp-c1 online again');

      await gw.stop();
      await waitFor(() => statesOf(seen, 'esp-c1').some((s) => s.reason === 'gateway stopped'), 'offline with "gateway stopped"');
      const gw2 = await start();
      // the captured message from before the restart is still a replay
      assert.deepEqual(await coapPost(gw2.coapPort, coapPath('esp-c1', 't'), coapAuthQuery(100, mac), body), { code: '4.01', body: 'FLEET_MCU_REPLAY' });
      assert.equal((await signedPost(gw2.coapPort, site, 'esp-c1', 102, body)).code, '2.04');
      // it was reported offline by the clean stop; talking after the restart makes it online again
      await waitFor(() => hub.registry.get('esp-c1')?.online === true, 'esp-c1 online after the restart');
      // the new gateway registers the MCUs it knew, before any new message of theirs
      await waitFor(() => gw2.stats().hubConnected, 'gw2 connected');
      await waitFor(() => registers(seen).length >= 2 && registers(seen).at(-1)!.includes('esp-c1'), 'register republished after restart');
    },
    { lostAfterMs: 600 },
  );
});

test('gateway: many MCUs appearing at once are registered in few coalesced messages, never refused by the hub', async () => {
  await withEnv(async ({ hub, gw, site, seen, hubRefusals }) => {
    await waitFor(() => gw.stats().hubConnected, 'gateway connected to the hub');
    const ids = Array.from({ length: 60 }, (_, i) => `esp-burst-${i}`);
    const replies = await Promise.all(ids.map((id) => signedPost(gw.coapPort, site, id, 1, encodeSenmlJson(samples(1)))));
    assert.ok(replies.every((r) => r.code === '2.04'));
    await waitFor(() => ids.every((id) => telemetryOf(seen, id).length === 1), 'telemetry of all 60 MCUs at the hub');
    await waitFor(() => registers(seen).some((r) => r.length === ids.length), 'a register listing all 60');
    const regs = registers(seen);
    assert.ok(regs.length < ids.length / 2, `${regs.length} register messages for ${ids.length} MCUs`);
    assert.deepEqual(hubRefusals(), []);
    assert.equal(hub.broker.mcusOf('gw-1')?.size, ids.length);
    assert.equal(hub.registry.get('gw-1')?.online, true, 'the gateway was never disconnected by an ACL refusal');
    await waitFor(() => gw.stats().uplinkSent === ids.length, 'every batch acknowledged by the hub');
  });
});

/**
 * A hub that ran once (its fleet secret and port are known) and is stopped now, and the
 * config of a gateway gw-1 pointing at it: for tests that start with the hub away.
 */
async function hubGone(dir: string): Promise<{ hubDir: string; port: number; config: GatewayConfig }> {
  const hubDir = join(dir, 'hub');
  // started again later on this port: one no port-0 listener can take meanwhile
  const hub = await startHub(HubConfigSchema.parse({ mqttPort: await stablePort(), httpPort: 0, stateDir: hubDir }), testLogger('hub'));
  const port = hub.mqttPort;
  const fleetSecret = readFileSync(hub.fleetSecretFile, 'utf8').trim();
  await hub.stop();
  const gwDir = join(dir, 'gateway');
  writeSecretFile(join(gwDir, 'token'), deriveToken(fleetSecret, 'device', 'gw-1'));
  const config = GatewayConfigSchema.parse({ deviceId: 'gw-1', stateDir: gwDir, hub: { url: `mqtt://127.0.0.1:${port}`, reconnectMs: 100 }, mcu: { mqttPort: 0, coapPort: 0 } });
  return { hubDir, port, config };
}

test('gateway: while the hub is down MCU data is acknowledged and stored, and delivered (after register) when it returns', async () => {
  const tmp = tempDir();
  const { hubDir, port, config } = await hubGone(tmp.dir);
  let hub: HubHandle | undefined;
  const gw = await startGateway(config, testLogger('gateway'));
  try {
    const site = readFileSync(gw.siteSecretFile, 'utf8').trim();
    for (let c = 1; c <= 3; c++) assert.equal((await signedPost(gw.coapPort, site, 'esp-c1', c, encodeSenmlJson(samples(c)))).code, '2.04');
    const m1 = await connectMcu(gw.mqttPort, 'esp-m1', mcuKey(site, 'esp-m1'));
    await m1.publishAsync(mcuTopic('esp-m1', 't'), encodeSenmlJson(samples(9)), { qos: 1 });
    await m1.endAsync();
    assert.equal(gw.stats().outbox.depth, 4);
    assert.equal(gw.stats().hubConnected, false);

    // the same port and state: the hub comes back
    const back = (hub = await startHub(HubConfigSchema.parse({ mqttPort: port, httpPort: 0, stateDir: hubDir }), testLogger('hub')));
    await waitFor(() => back.registry.get('esp-c1')?.telemetryBatches === 3 && back.registry.get('esp-m1')?.telemetryBatches === 1, 'stored telemetry delivered', 15_000);
    assert.equal(back.registry.get('esp-c1')?.latest.temperature?.v, 3);
    // its online state is a retained message of another topic: order across topics is not
    // promised (the hub stores a retained message before routing it), so it may come after
    await waitFor(() => back.registry.get('esp-m1')?.online === true, 'esp-m1 online at the hub');
    await waitFor(() => gw.stats().outbox.depth === 0, 'outbox drained');
  } finally {
    await gw.stop();
    await hub?.stop();
    tmp.cleanup();
  }
});

test('gateway: data of an MCU missing from the persisted MCU list (first seen just before a crash) is not hidden in the outbox after a restart', async () => {
  const tmp = tempDir();
  const { hubDir, port, config } = await hubGone(tmp.dir);
  let hub: HubHandle | undefined;
  let gw = await startGateway(config, testLogger('gateway'));
  try {
    const site = readFileSync(gw.siteSecretFile, 'utf8').trim();
    assert.equal((await signedPost(gw.coapPort, site, 'esp-late', 1, encodeSenmlJson(samples(7)))).code, '2.04');
    await gw.stop();
    // what a kill -9 within stateFlushMs of the MCU's first message leaves: the record in
    // the outbox, the MCU not in the list
    const stateFile = join(config.stateDir, 'mcu-state.json');
    const st = JSON.parse(readFileSync(stateFile, 'utf8')) as { mcus: string[] };
    writeFileSync(stateFile, JSON.stringify({ ...st, mcus: [] }));
    gw = await startGateway(config, testLogger('gateway'));
    const back = (hub = await startHub(HubConfigSchema.parse({ mqttPort: port, httpPort: 0, stateDir: hubDir }), testLogger('hub')));
    await waitFor(() => back.registry.get('esp-late')?.telemetryBatches === 1, 'the acknowledged reading delivered without the MCU talking again', 15_000);
    await waitFor(() => gw.stats().outbox.depth === 0, 'outbox drained');
  } finally {
    await gw.stop();
    await hub?.stop();
    tmp.cleanup();
  }
});

test('gateway: bad config is refused naming the key; missing token file is a clear error', async () => {
  const r = GatewayConfigSchema.safeParse({ deviceId: 'gw-1', mcu: { mqttPort: 70000, bogus: 1 } });
  assert.equal(r.success, false);
  const keys = r.error!.issues.map((i) => i.path.join('.'));
  assert.ok(keys.includes('mcu.mqttPort') && keys.includes('mcu'), keys.join(','));
  const tmp = tempDir();
  try {
    const config = GatewayConfigSchema.parse({ deviceId: 'gw-1', stateDir: tmp.dir, mcu: { mqttPort: 0, coapPort: 0 } });
    await assert.rejects(startGateway(config, testLogger('gateway')), (err: Error & { code?: string }) => err.code === 'FLEET_CONFIG_UNREADABLE' && err.message.includes(join(tmp.dir, 'token')) && err.message.includes('fleetlet hub device-token gw-'));
  } finally {
    tmp.cleanup();
  }
});

test('gateway: when its hub connection dies its MCUs go offline at the hub, and come back online when it reconnects', async () => {
  await withEnv(async ({ hub, gw, site }) => {
    const mcu = await connectMcu(gw.mqttPort, 'esp-gone', mcuKey(site, 'esp-gone'));
    await mcu.publishAsync(mcuTopic('esp-gone', 't'), Buffer.from(encodeSenmlJson([{ n: 'temp', v: 21, t: Date.now() }])), { qos: 1 });
    await waitFor(() => hub.registry.get('esp-gone')?.online === true, 'MCU online via the gateway');
    // cut the gateway's connection at the hub without a DISCONNECT: its last will fires
    const clients = (hub.broker.aedes as unknown as { clients: Record<string, { conn: { destroy(): void } }> }).clients;
    clients['gw-1']!.conn.destroy();
    await waitFor(() => hub.registry.get('esp-gone')?.online === false, 'MCU offline with its gateway');
    assert.equal(hub.registry.get('esp-gone')?.reason, 'gateway offline');
    // the gateway reconnects by itself and says again which MCUs are up; the MCU said nothing new
    await waitFor(() => hub.registry.get('gw-1')?.online === true && hub.registry.get('esp-gone')?.online === true, 'MCU online again after the gateway reconnected', 10_000);
    await mcu.endAsync();
  });
});

for (const key of ['maxUnauthenticatedPerAddress', 'maxUnauthenticated'] as const) {
  test(`gateway: mcu.${key} caps the MQTT connections held open without a CONNECT; an MCU connects again once one of them goes`, async () => {
  await withEnv(
    async ({ gw, site }) => {
      // two silent TCP connections from 127.0.0.1 (no CONNECT): the cap of 2 is taken
      const silent = await Promise.all([0, 1].map(() => new Promise<ReturnType<typeof createConnection>>((resolve, reject) => {
        const s = createConnection({ host: '127.0.0.1', port: gw.mqttPort }, () => resolve(s));
        s.on('error', reject);
      })));
      const unauthenticated = () => Number(/^fleet_gateway_mqtt_unauthenticated (\d+)$/m.exec(gw.metrics.render())?.[1]);
      const refused = () => Number(/^fleet_gateway_mcu_dropped_total\{protocol="mqtt",reason="mcu_limit"\} (\d+)$/m.exec(gw.metrics.render())?.[1] ?? 0);
      try {
        await waitFor(() => unauthenticated() === 2, 'both silent sockets accepted and counted');
        // a third from the same address is closed at accept: an MCU gets no CONNACK
        const third = mqtt.connect(`mqtt://127.0.0.1:${gw.mqttPort}`, { clientId: 'esp-cap', username: 'esp-cap', password: mcuKey(site, 'esp-cap'), reconnectPeriod: 0, connectTimeout: 5000 });
        const outcome = await new Promise<string>((resolve) => {
          third.once('connect', () => resolve('CONNACK'));
          third.once('close', () => resolve('closed'));
        });
        assert.equal(outcome, 'closed');
        third.end(true);
        await waitFor(() => refused() >= 1, 'the refusal counted');
        // one silent socket goes: the MCU connects
        silent[0]!.destroy();
        await waitFor(() => unauthenticated() <= 1, 'its slot released');
        const ok = mqtt.connect(`mqtt://127.0.0.1:${gw.mqttPort}`, { clientId: 'esp-cap', username: 'esp-cap', password: mcuKey(site, 'esp-cap'), reconnectPeriod: 0, connectTimeout: 5000 });
        await new Promise<void>((resolve, reject) => {
          ok.once('connect', () => resolve());
          ok.once('error', reject);
          ok.once('close', () => reject(new Error('closed before CONNACK')));
        });
        await ok.endAsync();
      } finally {
        for (const s of silent) s.destroy();
      }
    },
    { [key]: 2 },
  );
  });
}
