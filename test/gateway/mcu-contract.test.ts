import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { setTimeout as sleep } from 'node:timers/promises';
import { Agent, request as coapRequest } from 'coap';
import type { CommandReply, EventMessage, StateMessage, TelemetryBatch } from '../../core/messages.ts';
import { mcuKey, signMcuMessage } from '../../firmware-bridge/auth.ts';
import { COAP_PATH_ROOT, COAP_QUERY_COUNTER, COAP_QUERY_MAC, coapAuthQuery, coapPath, COMPACT_FORMAT, SENML_CBOR_FORMAT } from '../../firmware-bridge/coap.ts';
import { createSocket } from 'node:dgram';
import { COAP_METHOD, decodeMessage, encodeRequest } from '../../esp32-sim/coap-lite.ts';
import { encodeCompact, encodeSenmlCbor } from '../../firmware-bridge/codecs.ts';
import { decodeFwChunk, decodeMcuCommand, frameWithMac } from '../../firmware-bridge/frames.ts';
import { mcuTopic } from '../../firmware-bridge/topics.ts';
import { readFileSync } from 'node:fs';
import mqtt from 'mqtt';
import { deriveToken } from '../../core/credentials.ts';
import { RELAY_CMD, RELAY_DESIRED } from '../../core/topics.ts';
import { waitFor } from '../helpers.ts';
import { coap, coapBlock, connectMcu, nextCounter, of, registered, withEnv } from './env.ts';

test('mailbox over MQTT: hub command queued for a sleeping MCU, pushed on subscribe with a valid MAC, acked, reply at the hub; survives a gateway restart', async () => {
  await withEnv(async ({ hub, gw, site, seen, restart }) => {
    const id = 'esp-m1';
    // the MCU said hello once (so the gateway acts for it and subscribed to its cmd)
    const m0 = await connectMcu(gw.mqttPort, id, site);
    await m0.publishAsync(mcuTopic(id, 'hello'), JSON.stringify({ fw: '1.0.0', boot: 'power_on', sleep: 60 }), { qos: 1 });
    await m0.endAsync();
    await waitFor(() => of(seen, id, 'state').some((s) => s.online && s.version === '1.0.0' && s.mcu?.sleepS === 60), 'state with version and sleep period at the hub');
    await registered({ hub, gw }, [id]);
    // the MCU sleeps; the operator sends two commands
    const c1 = await hub.sendCommand(id, 'set-interval', { s: 30 }, 60_000);
    const c2 = await hub.sendCommand(id, 'blink', {}, 60_000);
    await waitFor(() => gw.stats().mailboxDepth === 2, 'two commands in the mailbox');
    // restart the gateway: the mailbox is on disk
    await gw.stop();
    const gw2 = await restart();
    assert.equal(gw2.stats().mailboxDepth, 2);
    // the MCU wakes, subscribes: gets the first command, MAC'd with its own key
    const m1 = await connectMcu(gw2.mqttPort, id, site);
    const got: Buffer[] = [];
    m1.on('message', (_t, p) => got.push(Buffer.from(p)));
    await m1.subscribeAsync(mcuTopic(id, 'cmd'), { qos: 1 });
    await waitFor(() => got.length >= 1, 'first command pushed');
    const first = decodeMcuCommand(mcuKey(site, id), id, got[0]!);
    assert.equal(first.cmd.id, c1.id);
    assert.equal(first.cmd.n, 'set-interval');
    assert.deepEqual(first.cmd.a, { s: 30 });
    await m1.publishAsync(mcuTopic(id, 'ack'), JSON.stringify({ id: c1.id, ok: true, r: { interval: 30 } }), { qos: 1 });
    // the next one follows the ack, with a higher seq
    await waitFor(() => got.length >= 2, 'second command pushed after the ack');
    const second = decodeMcuCommand(mcuKey(site, id), id, got.at(-1)!);
    assert.equal(second.cmd.id, c2.id);
    assert.ok(second.seq > first.seq);
    await m1.publishAsync(mcuTopic(id, 'ack'), JSON.stringify({ id: c2.id, ok: false, e: 'no LED', code: 'NO_LED' }), { qos: 1 });
    await waitFor(() => of(seen, id, 'reply').length >= 2, 'both replies at the hub');
    const replies = of(seen, id, 'reply') as CommandReply[];
    assert.deepEqual(replies.find((r) => r.id === c1.id)?.result, { interval: 30 });
    assert.deepEqual(replies.find((r) => r.id === c2.id)?.error, { code: 'NO_LED', message: 'no LED' });
    assert.equal(gw2.stats().mailboxDepth, 0);
    await m1.endAsync();
    const metrics = await (await fetch(`http://127.0.0.1:${gw2.httpPort}/metrics`)).text();
    assert.match(metrics, /fleet_gateway_mailbox_commands_total\{result="acked"\} 2/);
    assert.match(metrics, /fleet_gateway_mailbox_depth 0/);
  });
});

test('mailbox over CoAP: GET returns the command (empty when none), Observe pushes the next one; an expired command is answered FLEET_TIMEOUT', async () => {
  await withEnv(async ({ hub, gw, site, seen }) => {
    const id = 'esp-c1';
    assert.equal((await coap(gw.coapPort, site, id, 'hello', 'POST', Buffer.from('{"fw":"2.0.0","boot":"deep_sleep","sleep":1}'))).code, '2.04');
    const empty = await coap(gw.coapPort, site, id, 'cmd', 'GET');
    assert.equal(empty.code, '2.05');
    assert.equal(empty.body.length, 0);
    await waitFor(() => hub.broker.mcusOf('gw-1')?.has(id), 'registered');
    // and the gateway's subscription for it is in place: a command sent before would expire at the hub, unsent
    await waitFor(async () => /fleet_gateway_downlink_mcus 1\b/.test(await (await fetch(`http://127.0.0.1:${gw.httpPort}/metrics`)).text()), 'downlink covers the MCU');
    // a command that expires before the MCU acks it
    const short = await hub.sendCommand(id, 'quick', {}, 400);
    await waitFor(() => (of(seen, id, 'reply') as CommandReply[]).some((r) => r.id === short.id), 'expiry reply', 5000);
    const expired = (of(seen, id, 'reply') as CommandReply[]).find((r) => r.id === short.id)!;
    assert.equal(expired.ok, false);
    assert.equal(expired.error?.code, 'FLEET_TIMEOUT');

    // Observe: register, then a command arrives and is notified
    const c = nextCounter();
    const mac = signMcuMessage(mcuKey(site, id), id, 'cmd', c, Buffer.alloc(0));
    const notes: Buffer[] = [];
    const obs = coapRequest({ host: '127.0.0.1', port: gw.coapPort, method: 'GET', pathname: coapPath(id, 'cmd'), query: coapAuthQuery(c, mac), observe: true, agent: new Agent({ type: 'udp4' }) });
    const stream = await new Promise<NodeJS.ReadableStream & { close(): void }>((resolve, reject) => {
      obs.on('response', (res) => resolve(res as unknown as NodeJS.ReadableStream & { close(): void }));
      obs.on('error', reject);
      obs.end();
    });
    stream.on('data', (d: Buffer) => notes.push(Buffer.from(d)));
    // a deregistration (Observe 1, RFC 7641 §3.6) from another endpoint and token ends nothing:
    // without a MAC, anyone could otherwise silence the MCU's mailbox until it registers again
    const dereg = await new Promise<string>((resolve, reject) => {
      const r = coapRequest({ host: '127.0.0.1', port: gw.coapPort, method: 'GET', pathname: coapPath(id, 'cmd'), confirmable: true, agent: new Agent({ type: 'udp4' }) });
      r.setOption('Observe', 1);
      r.on('response', (x) => resolve(x.code));
      r.on('error', reject);
      r.end();
    });
    assert.equal(dereg, '2.05');
    const cmd = await hub.sendCommand(id, 'reboot', { delay: 1 }, 60_000);
    await waitFor(() => notes.some((n) => n.length > 0), 'command notified to the observer');
    const frame = notes.find((n) => n.length > 0)!;
    assert.equal(decodeMcuCommand(mcuKey(site, id), id, frame).cmd.id, cmd.id);
    stream.close();
    // a plain GET returns the same command until it is acked
    assert.equal(decodeMcuCommand(mcuKey(site, id), id, (await coap(gw.coapPort, site, id, 'cmd', 'GET')).body).cmd.id, cmd.id);
    assert.equal((await coap(gw.coapPort, site, id, 'ack', 'POST', Buffer.from(JSON.stringify({ id: cmd.id, ok: true })))).code, '2.04');
    assert.equal((await coap(gw.coapPort, site, id, 'cmd', 'GET')).body.length, 0);
    await waitFor(() => (of(seen, id, 'reply') as CommandReply[]).some((r) => r.id === cmd.id && r.ok), 'ok reply at the hub');
  });
});

test('telemetry in SenML CBOR (112) and the compact form (65001, table from the hello) over CoAP and MQTT reaches the hub', async () => {
  await withEnv(async ({ gw, site, seen }) => {
    const table = [
      ['temperature', 'Cel'],
      ['door', ''],
    ] as const;
    const id = 'esp-x1';
    assert.equal((await coap(gw.coapPort, site, id, 'hello', 'POST', Buffer.from(JSON.stringify({ fw: '1.0.0', boot: 'power_on', sensors: table })))).code, '2.04');
    const t = 1_700_000_000_000;
    assert.equal((await coap(gw.coapPort, site, id, 't', 'POST', encodeSenmlCbor([{ n: 'temperature', u: 'Cel', v: 20.5, t }]), { format: SENML_CBOR_FORMAT })).code, '2.04');
    assert.equal((await coap(gw.coapPort, site, id, 't', 'POST', encodeCompact([{ n: 'door', vb: true, t }], { table }), { format: COMPACT_FORMAT })).code, '2.04');
    // compact naming an index outside the table: 4.00, counted
    assert.equal((await coap(gw.coapPort, site, id, 't', 'POST', Buffer.from('f100050600', 'hex'), { format: COMPACT_FORMAT })).code, '4.00');
    const m = await connectMcu(gw.mqttPort, 'esp-x2', site);
    await m.publishAsync(mcuTopic('esp-x2', 't'), encodeSenmlCbor([{ n: 'rssi', u: 'dBm', v: -61, t }]), { qos: 1 });
    // with a MAC line (optional on MQTT), and then the same again: a replay, dropped
    const framed = frameWithMac(mcuKey(site, 'esp-x2'), 'esp-x2', 't', 5, encodeCompact([{ n: 'temperature', u: 'Cel', v: 1, t }], { table, inlineTable: true }));
    await m.publishAsync(mcuTopic('esp-x2', 't'), framed, { qos: 1 });
    await m.publishAsync(mcuTopic('esp-x2', 't'), framed, { qos: 1 });
    await m.endAsync();
    await waitFor(() => of(seen, id, 'telemetry').length === 2 && of(seen, 'esp-x2', 'telemetry').length === 2, 'telemetry at the hub');
    const s1 = (of(seen, id, 'telemetry') as TelemetryBatch[]).flatMap((b) => b.samples);
    assert.deepEqual(s1, [
      { n: 'temperature', u: 'Cel', v: 20.5, t },
      { n: 'door', vb: true, t },
    ]);
    assert.equal(gw.stats().dropped.decode, 1);
    assert.equal(gw.stats().dropped.replay, 1);
  });
});

test('sleeping vs lost: an MCU that declared a 1 s sleep stays online for 1 s x factor + grace, then is lost with the reason', async () => {
  await withEnv(
    async ({ gw, site, seen }) => {
      const id = 'esp-s1';
      assert.equal((await coap(gw.coapPort, site, id, 'hello', 'POST', Buffer.from('{"fw":"1.0.0","boot":"power_on","sleep":1}'))).code, '2.04');
      await sleep(1500); // silent longer than its sleep period, less than 1 s x 2 + 3 s
      assert.equal(of(seen, id, 'state').at(-1)?.online, true, 'still sleeping, not lost');
      await waitFor(() => of(seen, id, 'state').at(-1)?.online === false, 'lost', 15_000);
      assert.match((of(seen, id, 'state').at(-1) as StateMessage).reason ?? '', /no contact for \d+ s \(lost after 5 s, sleeps 1 s\)/);
    },
    { lostFactor: 2, lostGraceMs: 3000 },
  );
});

test('firmware: desired firmware (file:// bundle, raw-image verifier mock) is offered, served over CoAP Block2 and MQTT chunks, success on the new version; rollback reported failed', async () => {
  await withEnv(async ({ hub, gw, site, seen, dir }) => {
    const image = Buffer.alloc(5000);
    for (let i = 0; i < image.length; i++) image[i] = (i * 31 + 7) & 0xff;
    const file = join(dir, 'fw-2.0.0.bin');
    writeFileSync(file, image);
    const sha = createHash('sha256').update(image).digest('hex');
    const ids = ['esp-f1', 'esp-f2'];
    for (const id of ids) assert.equal((await coap(gw.coapPort, site, id, 'hello', 'POST', Buffer.from('{"fw":"1.0.0","boot":"power_on"}'))).code, '2.04');
    await registered({ hub, gw }, ids);
    for (const id of ids) await hub.setDesired(id, { apps: {}, firmware: { version: '2.0.0', url: pathToFileURL(file).href, sha256: sha, size: image.length } });
    await waitFor(() => ids.every((id) => gw.firmwareState(id)?.state === 'offered'), 'offered to both');

    // esp-f1 over CoAP: the offer from the mailbox, then Block2 in 64-byte blocks, resumed mid-way
    const offer = decodeMcuCommand(mcuKey(site, 'esp-f1'), 'esp-f1', (await coap(gw.coapPort, site, 'esp-f1', 'cmd', 'GET')).body).cmd;
    assert.equal(offer.n, 'fw.update');
    assert.deepEqual(offer.a, { v: '2.0.0', sha256: sha, size: image.length });
    // the coap package's client follows Block2 by itself: asking for block n returns
    // bytes n*64.. to the end, fetched block by block (each a GET with the same MAC'd query)
    const whole = await coapBlock(gw.coapPort, site, 'esp-f1', 0, 64, `&h=${sha.slice(0, 16)}`);
    assert.equal(whole.code, '2.05');
    assert.equal(createHash('sha256').update(whole.body).digest('hex'), sha);
    // resume mid-way, as after a deep sleep: from block 40 of 64 bytes
    // the same MAC'd query from another address (a captured one with a forged source): no
    // image blocks to it, only the short refusal; the MCU's own address is served
    const other = createSocket('udp4');
    await new Promise<void>((r) => other.bind(0, '127.0.0.2', () => r()));
    const fwc = nextCounter();
    const fwq = [`${COAP_QUERY_COUNTER}=${fwc}`, `${COAP_QUERY_MAC}=${signMcuMessage(mcuKey(site, 'esp-f1'), 'esp-f1', 'fw', fwc, Buffer.alloc(0))}`];
    const fromOther = await new Promise<Buffer>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error('no answer to the other address in 10 s')), 10_000);
      other.once('message', (m) => {
        clearTimeout(timer);
        resolve(m);
      });
      other.send(encodeRequest({ method: COAP_METHOD.GET, path: [...COAP_PATH_ROOT, 'esp-f1', 'fw'], query: fwq, block2: { num: 0, szx: 6 } }, 0, 0x2345, 0x99), gw.coapPort, '127.0.0.1');
    });
    await new Promise<void>((r) => other.close(() => r()));
    const refused = decodeMessage(fromOther)!;
    assert.equal(refused.code, '4.01');
    assert.equal(refused.res.payload.toString('utf8'), 'FLEET_MCU_ADDRESS');
    assert.ok(fromOther.length < 40, `a short answer (${fromOther.length} bytes)`);
    const rest = await coapBlock(gw.coapPort, site, 'esp-f1', 40, 64, `&h=${sha.slice(0, 16)}`);
    assert.deepEqual(rest.body, image.subarray(40 * 64));
    assert.equal(gw.firmwareState('esp-f1')?.state, 'transferring');
    assert.equal((await coapBlock(gw.coapPort, site, 'esp-f1', 0, 64, '&h=0000000000000000')).code, '4.12');
    assert.equal((await coap(gw.coapPort, site, 'esp-f1', 'ack', 'POST', Buffer.from(JSON.stringify({ id: offer.id, ok: true })))).code, '2.04');
    assert.equal(gw.firmwareState('esp-f1')?.state, 'installing');
    assert.equal((await coap(gw.coapPort, site, 'esp-f1', 'hello', 'POST', Buffer.from('{"fw":"2.0.0","boot":"ota","prev":"1.0.0"}'))).code, '2.04');
    await waitFor(() => gw.firmwareState('esp-f1')?.state === 'succeeded', 'esp-f1 succeeded');

    // esp-f2 over MQTT chunks; its bootloader rolls back
    const m = await connectMcu(gw.mqttPort, 'esp-f2', site);
    const inbox: Array<{ topic: string; payload: Buffer }> = [];
    m.on('message', (topic, payload) => inbox.push({ topic, payload: Buffer.from(payload) }));
    await m.subscribeAsync(`mcu/v1/esp-f2/#`, { qos: 1 });
    await waitFor(() => inbox.some((x) => x.topic.endsWith('/cmd')), 'offer pushed');
    const offer2 = decodeMcuCommand(mcuKey(site, 'esp-f2'), 'esp-f2', inbox.find((x) => x.topic.endsWith('/cmd'))!.payload).cmd;
    const chunks: Buffer[] = [];
    for (let n = 0; n * 1024 < image.length; n++) {
      const before = inbox.length;
      await m.publishAsync(mcuTopic('esp-f2', 'fwreq'), JSON.stringify({ n, s: 1024 }), { qos: 1 });
      await waitFor(() => inbox.length > before, `chunk ${n}`);
      const c = decodeFwChunk(inbox.at(-1)!.payload);
      assert.equal(c.n, n);
      assert.equal(c.size, image.length);
      assert.equal(c.shaPrefix, sha.slice(0, 16));
      chunks.push(c.data);
    }
    assert.equal(createHash('sha256').update(Buffer.concat(chunks)).digest('hex'), sha);
    await m.publishAsync(mcuTopic('esp-f2', 'ack'), JSON.stringify({ id: offer2.id, ok: true }), { qos: 1 });
    await m.publishAsync(mcuTopic('esp-f2', 'hello'), JSON.stringify({ fw: '1.0.0', boot: 'rollback', prev: '2.0.0', err: 'app did not confirm' }), { qos: 1 });
    await m.endAsync();
    await waitFor(() => gw.firmwareState('esp-f2')?.state === 'failed', 'esp-f2 failed');
    assert.match(gw.firmwareState('esp-f2')?.reason ?? '', /came back on 1\.0\.0 \(boot rollback: app did not confirm\)/);
    await waitFor(() => ids.every((id) => (of(seen, id, 'events') as EventMessage[]).some((e) => e.type === 'mcu.firmware' && ['succeeded', 'failed'].includes(String(e.data?.state)))), 'firmware events at the hub');
    const failed = (of(seen, 'esp-f2', 'events') as EventMessage[]).find((e) => e.data?.state === 'failed')!;
    assert.equal(failed.severity, 'warning');
    const metrics = await (await fetch(`http://127.0.0.1:${gw.httpPort}/metrics`)).text();
    assert.match(metrics, /fleet_gateway_firmware_mcus\{state="succeeded"\} 1/);
    assert.match(metrics, /fleet_gateway_firmware_mcus\{state="failed"\} 1/);
    assert.match(metrics, /fleet_gateway_firmware_bytes_served_total\{protocol="mqtt"\} 5000/);
  });
});


test('mcu.mqttRequireMac: MQTT payloads without a MAC line are dropped (auth); with one they pass the shared replay check', async () => {
  await withEnv(
    async ({ gw, site, seen }) => {
      const id = 'esp-r1';
      const m = await connectMcu(gw.mqttPort, id, site);
      const body = Buffer.from('[{"n":"a","v":1}]');
      await m.publishAsync(mcuTopic(id, 't'), body, { qos: 1 });
      await m.publishAsync(mcuTopic(id, 't'), frameWithMac(mcuKey(site, id), id, 't', 7, body), { qos: 1 });
      // the counter space is shared with CoAP: 7 again over CoAP is a replay
      const mac = signMcuMessage(mcuKey(site, id), id, 't', 7, body);
      await m.endAsync();
      const replay = await new Promise<string>((resolve, reject) => {
        const req = coapRequest({ host: '127.0.0.1', port: gw.coapPort, method: 'POST', pathname: coapPath(id, 't'), query: coapAuthQuery(7, mac), agent: new Agent({ type: 'udp4' }) });
        req.on('response', (res) => resolve(`${res.code} ${res.payload.toString()}`));
        req.on('error', reject);
        req.end(body);
      });
      assert.equal(replay, '4.01 FLEET_MCU_REPLAY');
      await waitFor(() => of(seen, id, 'telemetry').length === 1, 'the MAC-framed message at the hub');
      assert.equal(gw.stats().dropped.auth, 1);
      assert.equal(gw.stats().dropped.replay, 1);
    },
    { mqttRequireMac: true },
  );
});

test('downlink: one wildcard subscription for all MCUs; the hub delivers each device only its own MCUs\' commands, and retained desired states reach MCUs registered later', async () => {
  await withEnv(async ({ hub, gw, site }) => {
    const secret = readFileSync(hub.fleetSecretFile, 'utf8').trim();
    // another device that subscribes the same wildcard filters: it must receive nothing of gw-1's MCUs
    const nosy = await mqtt.connectAsync(`mqtt://127.0.0.1:${hub.mqttPort}`, { clientId: 'nosy', username: 'nosy', password: deriveToken(secret, 'device', 'nosy'), reconnectPeriod: 0 });
    const leaked: string[] = [];
    nosy.on('message', (t) => leaked.push(t));
    const granted = await nosy.subscribeAsync({ [RELAY_CMD]: { qos: 1 }, [RELAY_DESIRED]: { qos: 1 } });
    assert.deepEqual(granted.map((g) => g.qos), [1, 1], 'the relay filters are granted to any device');
    try {
      // a retained desired state for an MCU nobody has registered yet
      await hub.setDesired('esp-late', { apps: {}, firmware: { version: '9.9.9', url: 'file:///nonexistent', sha256: 'a'.repeat(64) } });
      for (const id of ['esp-d1', 'esp-d2']) assert.equal((await coap(gw.coapPort, site, id, 'hello', 'POST', Buffer.from('{"fw":"1.0.0","boot":"power_on"}'))).code, '2.04');
      await waitFor(() => hub.broker.mcusOf('gw-1')?.has('esp-d2'), 'both registered');
      await waitFor(async () => /fleet_gateway_downlink_mcus 2\b/.test(await (await fetch(`http://127.0.0.1:${gw.httpPort}/metrics`)).text()), 'downlink covers both MCUs');
      await hub.sendCommand('esp-d1', 'a', {}, 60_000);
      await hub.sendCommand('esp-d2', 'b', {}, 60_000);
      await waitFor(() => gw.stats().mailboxDepth === 2, 'both MCUs get their command through the wildcard');
      // an MCU registered after the subscribe gets its retained desired state (the gateway subscribes again)
      const events: string[] = [];
      hub.broker.aedes.subscribe('fleet/v1/d/esp-late/events', (p: { payload: Buffer | string }, cb: () => void) => {
        events.push(Buffer.from(p.payload).toString());
        cb();
      }, () => undefined);
      assert.equal((await coap(gw.coapPort, site, 'esp-late', 'hello', 'POST', Buffer.from('{"fw":"1.0.0","boot":"power_on"}'))).code, '2.04');
      await waitFor(() => events.some((e) => e.includes('9.9.9')), 'the late MCU\'s firmware desired state reached the gateway (its firmware event)', 15_000);
      await sleep(300);
      assert.deepEqual(leaked, [], 'nothing for another device\'s MCUs');
    } finally {
      await nosy.endAsync();
    }
  });
});

test('a hello that changes the sensor table, sleep period or firmware is on disk (mcu-state.json) when it is acknowledged, over MQTT and CoAP', async () => {
  await withEnv(async ({ gw, site, gwDir }) => {
    const saved = (id: string) => {
      try {
        return (JSON.parse(readFileSync(join(gwDir, 'mcu-state.json'), 'utf8')) as { meta?: Record<string, { fw?: string; sleepS?: number; sensors?: unknown }> }).meta?.[id];
      } catch {
        return undefined;
      }
    };
    const table = [['temperature', 'Cel'], ['humidity', '%RH']];
    const m = await connectMcu(gw.mqttPort, 'esp-dur1', site);
    try {
      // publishAsync resolves at the PUBACK
      await m.publishAsync(mcuTopic('esp-dur1', 'hello'), JSON.stringify({ fw: '2.0.0', boot: 'ota', sensors: table, sleep: 300 }), { qos: 1 });
      const meta = saved('esp-dur1');
      assert.deepEqual([meta?.fw, meta?.sleepS, meta?.sensors], ['2.0.0', 300, table], 'on disk at the PUBACK');
    } finally {
      await m.endAsync();
    }
    assert.equal((await coap(gw.coapPort, site, 'esp-dur2', 'hello', 'POST', Buffer.from(JSON.stringify({ fw: '3.1.0', boot: 'power_on', sensors: table })))).code, '2.04');
    assert.equal(saved('esp-dur2')?.fw, '3.1.0', 'on disk at the 2.04');
    assert.deepEqual(saved('esp-dur2')?.sensors, table);
  });
});
