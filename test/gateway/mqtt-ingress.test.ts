import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync } from 'node:fs';
import { connect as netConnect, createServer, type AddressInfo } from 'node:net';
import { join } from 'node:path';
import { Level } from 'level';
import mqtt, { type MqttClient } from 'mqtt';
import { isFleetError } from '../../core/errors.ts';
import { writeSecretFile } from '../../core/secrets.ts';
import { mcuKey, ReplayGuard } from '../../firmware-bridge/auth.ts';
import { frameWithMac } from '../../firmware-bridge/frames.ts';
import { GatewayConfigSchema, type GatewayConfig } from '../../gateway/config.ts';
import { startGateway, type GatewayHandle } from '../../gateway/index.ts';
import { closingServer, tempDir, testLogger } from '../helpers.ts';
import { coap, connectMcu } from './env.ts';

test('replay guard: check() refuses what accept() would and records nothing', () => {
  const g = new ReplayGuard({ maxMcus: 1 });
  g.check('esp-1', 5);
  g.check('esp-1', 5);
  assert.equal(g.high('esp-1'), 0, 'nothing recorded');
  g.accept('esp-1', 5);
  assert.throws(() => g.check('esp-1', 5), (e: unknown) => isFleetError(e, 'FLEET_MCU_REPLAY'));
  g.check('esp-1', 4); // inside the window, unseen
  assert.throws(() => g.check('esp-2', 1), (e: unknown) => isFleetError(e, 'FLEET_FORBIDDEN'), 'guard full');
});

/**
 * A gateway on its own (its hub unreachable: a closed port) in a temp dir, with `mcu` and
 * other config merged in; `prepare` may write files into its state dir first. `start`
 * starts it (again), and the last one started is stopped at the end.
 */
async function withLoneGateway(
  config: { mcu?: Partial<GatewayConfig['mcu']>; outbox?: Record<string, unknown> },
  fn: (ctx: { gw: GatewayHandle; site: string; dir: string; log: ReturnType<typeof testLogger>; start: () => Promise<GatewayHandle>; stop: () => Promise<void> }) => Promise<void>,
  prepare: (dir: string) => void = () => undefined,
): Promise<void> {
  const tmp = tempDir();
  writeSecretFile(join(tmp.dir, 'token'), 'x'.repeat(32));
  prepare(tmp.dir);
  const parsed = GatewayConfigSchema.parse({ deviceId: 'gw-r', stateDir: tmp.dir, hub: { url: 'mqtt://127.0.0.1:1', reconnectMs: 200 }, ...config, mcu: { mqttPort: 0, coapPort: 0, ...config.mcu } });
  const log = testLogger('gateway');
  let current: GatewayHandle | null = null;
  const start = async () => (current = await startGateway(parsed, log, '0.0.0-test'));
  const stop = async () => {
    const g = current;
    current = null;
    await g?.stop();
  };
  try {
    const gw = await start();
    await fn({ gw, site: readFileSync(gw.siteSecretFile, 'utf8').trim(), dir: tmp.dir, log, start, stop });
  } finally {
    await stop();
    tmp.cleanup();
  }
}
/** QoS 1 publish: 'puback', or 'closed' when the connection closed without one */
function pub(c: MqttClient, topic: string, payload: Buffer | string): Promise<'puback' | 'closed'> {
  return new Promise((resolve, reject) => {
    const onClose = () => resolve('closed');
    c.once('close', onClose);
    c.publish(topic, payload, { qos: 1 }, (err) => {
      c.off('close', onClose);
      if (err) reject(err);
      else resolve('puback');
    });
  });
}

test('gateway MQTT: a MAC-framed message the gateway could not store is not acknowledged, and its resend is not taken for a replay (it used to be PUBACKed and dropped)', async () => {
  // the hub is unreachable and the outbox small: it fills with alerts
  await withLoneGateway({ outbox: { maxBytes: 65536, minFreeBytes: 0 } }, async ({ gw, site }) => {
    const id = 'esp-r1';
    let c = await connectMcu(gw.mqttPort, id, site);
    // mcu.boot events (alerts) from hellos with a new firmware version each, until the
    // outbox evicts: telemetry can no longer be stored
    for (let n = 0; gw.stats().outbox.evicted === 0; n++) assert.equal(await pub(c, `mcu/v1/${id}/hello`, JSON.stringify({ fw: `1.0.${n}-${'x'.repeat(50)}`, boot: 'power_on' })), 'puback');
    const framed = frameWithMac(mcuKey(site, id), id, 't', 1_000_000, Buffer.from(JSON.stringify(Array.from({ length: 10 }, (_, i) => ({ n: `temperature${i}`, u: 'Cel', v: 21.5 })))));
    c = await connectMcu(gw.mqttPort, id, site);
    assert.equal(await pub(c, `mcu/v1/${id}/t`, framed), 'closed', 'not stored: no PUBACK');
    // the MCU resends the same bytes after reconnecting: still not stored, so still no PUBACK
    c = await connectMcu(gw.mqttPort, id, site);
    assert.equal(await pub(c, `mcu/v1/${id}/t`, framed), 'closed', 'the resend is not PUBACKed as a "replay"');
    assert.equal(gw.stats().dropped.replay, undefined, JSON.stringify(gw.stats().dropped));
    assert.equal(gw.stats().dropped.outbox_full, 2);
    c.end(true);
  });
});

test('gateway MQTT + CoAP: a MAC-framed MQTT message is held while it is stored: the same bytes replayed over CoAP meanwhile get 5.03 FLEET_MCU_IN_FLIGHT, not a second store; a well-formed but wrong MAC line is an auth failure, a log line starting with c= is a plain log', async (t) => {
  // appends wait for the next fsync, at most one a second: a store takes up to a second
  await withLoneGateway({ outbox: { syncIntervalMs: 1000 } }, async ({ gw, site }) => {
    const id = 'esp-h1';
    let c = await connectMcu(gw.mqttPort, id, site);
    assert.equal(await pub(c, `mcu/v1/${id}/hello`, JSON.stringify({ fw: '1.0.0', boot: 'power_on' })), 'puback'); // a sync just now
    const body = Buffer.from(JSON.stringify([{ n: 'temperature', u: 'Cel', v: 21.5 }]));
    const counter = 2_000_000;
    const mqttAck = pub(c, `mcu/v1/${id}/t`, frameWithMac(mcuKey(site, id), id, 't', counter, body));
    await new Promise((r) => setTimeout(r, 150)); // the MQTT copy is (normally) being stored
    const replayed = await coap(gw.coapPort, site, id, 't', 'POST', body, { counter });
    const mqttOutcome = await mqttAck;
    // exactly one copy stored, whichever came first on a slow machine: the other is refused
    // as in flight (CoAP 5.03 FLEET_MCU_IN_FLIGHT, or MQTT without PUBACK, the connection
    // closed), or, when the MQTT copy was stored already (a stalled machine), as a replay
    const outcome = `coap ${replayed.code} ${replayed.body.toString()} / mqtt ${mqttOutcome}`;
    const coapBody = replayed.body.toString();
    assert.ok(
      (replayed.code === '5.03' && /FLEET_MCU_IN_FLIGHT/.test(coapBody) && mqttOutcome === 'puback') ||
        (replayed.code === '4.01' && /FLEET_MCU_REPLAY/.test(coapBody) && mqttOutcome === 'puback') ||
        (replayed.code === '2.04' && mqttOutcome === 'closed'),
      `one copy stored, the other refused: ${outcome}`,
    );
    if (replayed.code === '4.01') t.diagnostic('the MQTT copy was stored before the CoAP one arrived: the in-flight case was not exercised this run');
    const again = await coap(gw.coapPort, site, id, 't', 'POST', body, { counter });
    assert.equal(again.code, '4.01', 'once stored, the copy is a replay');
    if (mqttOutcome === 'closed') c = await connectMcu(gw.mqttPort, id, site);
    // a log that happens to start with c=: stored as a log, not an auth failure
    const depth = gw.stats().outbox.depth;
    assert.equal(await pub(c, `mcu/v1/${id}/log`, 'c=3 wifi reconnect\nboot ok\n'), 'puback');
    assert.equal(gw.stats().dropped.auth, undefined, `not an auth failure: ${JSON.stringify(gw.stats().dropped)}`);
    assert.equal(gw.stats().outbox.depth, depth + 1, 'stored as a log record');
    // a well-formed MAC line with a wrong MAC still is one
    const forged = Buffer.concat([Buffer.from(`c=${counter + 5}&m=${'A'.repeat(22)}\n`), body]);
    assert.equal(await pub(c, `mcu/v1/${id}/t`, forged), 'puback');
    assert.equal(gw.stats().dropped.auth, 1, JSON.stringify(gw.stats().dropped));
    c.end(true);
  });
});

test('gateway MQTT: telemetry of several MCUs arriving together that the outbox cannot take is acknowledged to none of them (the grouped record fails for all)', async () => {
  // the hub is unreachable and the outbox small: it fills with alerts (as in the test above)
  await withLoneGateway({ outbox: { maxBytes: 65536, minFreeBytes: 0 } }, async ({ gw, site }) => {
    const filler = await connectMcu(gw.mqttPort, 'esp-fill', site);
    for (let n = 0; gw.stats().outbox.evicted === 0; n++) assert.equal(await pub(filler, 'mcu/v1/esp-fill/hello', JSON.stringify({ fw: `1.0.${n}-${'x'.repeat(50)}`, boot: 'power_on' })), 'puback');
    filler.end(true);
    const ids = ['esp-g1', 'esp-g2', 'esp-g3', 'esp-g4', 'esp-g5'];
    const reading = JSON.stringify([{ n: 'temperature', u: 'Cel', v: 21.5 }]);
    const clients = await Promise.all(ids.map((id) => connectMcu(gw.mqttPort, id, site)));
    // all five at once: the gateway groups what arrives in one turn into one record
    const outcomes = await Promise.all(clients.map((c, i) => pub(c, `mcu/v1/${ids[i]}/t`, reading)));
    assert.deepEqual(outcomes, ids.map(() => 'closed'), 'not stored: no PUBACK for any of them');
    assert.equal(gw.stats().dropped.outbox_full, ids.length, JSON.stringify(gw.stats().dropped));
    for (const c of clients) c.end(true);
  });
});

test('gateway MQTT: beyond mcu.maxMcus a new MCU’s MAC-framed message is refused without a PUBACK, as a plain one is (it used to be PUBACKed and dropped)', async () => {
  await withLoneGateway({ mcu: { maxMcus: 1 } }, async ({ gw, site }) => {
    const framed = (id: string) => frameWithMac(mcuKey(site, id), id, 't', 7, Buffer.from(JSON.stringify([{ n: 'temperature', v: 20 }])));
    const a = await connectMcu(gw.mqttPort, 'esp-a', site);
    assert.equal(await pub(a, 'mcu/v1/esp-a/t', framed('esp-a')), 'puback');
    await a.endAsync();
    const b = await connectMcu(gw.mqttPort, 'esp-b', site);
    assert.equal(await pub(b, 'mcu/v1/esp-b/t', framed('esp-b')), 'closed');
    assert.equal(gw.stats().dropped.mcu_limit, 1);
    assert.equal(gw.stats().outbox.depthByClass.telemetry, 1, 'only esp-a’s reading is stored');
  });
});

test('gateway MQTT: a flood of refused CONNECTs with ever new long user names from one peer logs a few short lines, not one per attempt', async () => {
  await withLoneGateway({}, async ({ gw, log }) => {
    for (let i = 0; i < 100; i++) {
      const name = `esp-${i}-${'x'.repeat(4000)}`;
      await new Promise<void>((resolve) => {
        const c = mqtt.connect(`mqtt://127.0.0.1:${gw.mqttPort}`, { clientId: name, username: name, password: 'wrong', reconnectPeriod: 0, connectTimeout: 5000 });
        c.once('error', () => undefined);
        c.once('close', () => {
          c.end(true);
          resolve();
        });
      });
    }
    const refused = log.lines.filter((l) => l.msg === 'MCU MQTT connection refused' && l.level === 'warn');
    assert.ok(refused.length >= 1 && refused.length <= 3, `${refused.length} warnings`);
    assert.ok(JSON.stringify(refused).length < 2000, 'user names cut short');
    assert.ok(refused.every((l) => l.code === 'FLEET_MCU_AUTH'), 'with the stable code (docs/errors.md)');
    assert.equal(gw.stats().dropped.auth, 100, 'every attempt still counted');
  });
});

test('gateway: an MCU that would push the register past the hub’s payload limit is refused (no PUBACK), not accepted and then refused at the hub with every MCU’s data', async () => {
  // 15,589 known MCUs with 64-character ids: their register is 17 bytes under the limit
  const ids = Array.from({ length: 15_589 }, (_, i) => `m${String(i).padStart(63, '0')}`);
  const saveIds = (dir: string) => writeFileSync(join(dir, 'mcu-state.json'), JSON.stringify({ v: 1, mcus: ids, replay: {} }));
  await withLoneGateway({ mcu: { maxMcus: 100_000 } }, async ({ gw, site }) => {
    const known = await connectMcu(gw.mqttPort, ids[0]!, site);
    assert.equal(await pub(known, `mcu/v1/${ids[0]}/t`, JSON.stringify([{ n: 'temperature', v: 20 }])), 'puback', 'a known MCU goes on');
    await known.endAsync();
    const id = `n${'1'.repeat(63)}`;
    const c = await connectMcu(gw.mqttPort, id, site);
    assert.equal(await pub(c, `mcu/v1/${id}/t`, JSON.stringify([{ n: 'temperature', v: 20 }])), 'closed');
  }, saveIds);
});

test('gateway: an MCU not heard from in mcu.forgetAfterDays is forgotten at start (its slot; its highest counter stays as a floor); one heard from recently is kept', async () => {
  const today = Math.floor(Date.now() / 86_400_000);
  const saveState = (dir: string) =>
    writeFileSync(
      join(dir, 'mcu-state.json'),
      JSON.stringify({ v: 1, mcus: ['esp-old', 'esp-new', 'esp-legacy'], replay: { 'esp-old': [500, 1], 'esp-new': [500, 1] }, meta: { 'esp-old': { fw: '1.0.0', seenDay: today - 100 }, 'esp-new': { fw: '1.0.0', seenDay: today - 2 } } }),
    );
  await withLoneGateway({ mcu: { forgetAfterDays: 90 } }, async ({ gw, site, dir, start, stop }) => {
    assert.equal(gw.stats().mcus, 2, 'esp-old forgotten; esp-new and esp-legacy (no day saved, from before this) kept');
    const framed = (id: string, counter: number) => frameWithMac(mcuKey(site, id), id, 't', counter, Buffer.from(JSON.stringify([{ n: 'temperature', v: 20 }])));
    // esp-old's slot is free, but its highest counter stays as a floor: counter 10 (below
    // its saved 500) is a replay (PUBACKed and dropped, counted); its next one, 501, is welcome
    const old = await connectMcu(gw.mqttPort, 'esp-old', site);
    assert.equal(await pub(old, 'mcu/v1/esp-old/t', framed('esp-old', 10)), 'puback');
    assert.equal(gw.stats().dropped.replay, 1);
    assert.equal(gw.stats().mcus, 2, 'the replay did not bring it back');
    assert.equal(await pub(old, 'mcu/v1/esp-old/t', framed('esp-old', 501)), 'puback');
    await old.endAsync();
    // esp-new's are kept: counter 10 is a replay
    const recent = await connectMcu(gw.mqttPort, 'esp-new', site);
    await pub(recent, 'mcu/v1/esp-new/t', framed('esp-new', 10));
    await recent.endAsync();
    assert.equal(gw.stats().dropped.replay, 2);
    await stop();
    const saved = JSON.parse(readFileSync(join(dir, 'mcu-state.json'), 'utf8')) as { mcus: string[]; meta: Record<string, { seenDay?: number }> };
    assert.deepEqual([...saved.mcus].sort(), ['esp-legacy', 'esp-new', 'esp-old'], 'esp-old is back: it spoke again');
    assert.equal(saved.meta['esp-old']?.seenDay, today, 'the day it was heard is saved');
    assert.equal((await start()).stats().mcus, 3);
  }, saveState);
});

test('gateway MQTT [MQTT-3.1.3-8, -9, MQTT-4.7.3-1]: a zero-length client id gets CONNACK 2 (identifier rejected), with clean session or without, counted as bad_request, not as an authentication failure; a PUBLISH with a zero-length topic closes the connection as malformed (bad_request), not as an ACL refusal (forbidden)', async () => {
  await withLoneGateway({}, async ({ gw, site }) => {
    const field = (x: string) => Buffer.concat([Buffer.from([0, Buffer.byteLength(x)]), Buffer.from(x)]);
    const packet = (first: number, body: Buffer) => Buffer.concat([Buffer.from([first, body.length]), body]); // bodies below 128 bytes here
    /** CONNECT with user name and password (flags 0xc0, plus 0x02 for clean session) */
    const connect = (clientId: string, clean: boolean) => packet(0x10, Buffer.concat([field('MQTT'), Buffer.from([4, clean ? 0xc2 : 0xc0, 0, 60]), field(clientId), field('esp-1'), field(mcuKey(site, 'esp-1'))]));
    const exchange = (bytes: Buffer): Promise<string> =>
      new Promise((resolve) => {
        const s = netConnect({ port: gw.mqttPort, host: '127.0.0.1' }, () => s.write(bytes));
        const got: Buffer[] = [];
        s.on('data', (d) => got.push(d));
        s.on('error', () => undefined);
        s.on('close', () => resolve(Buffer.concat(got).toString('hex')));
      });
    for (const clean of [false, true]) assert.equal(await exchange(connect('', clean)), '20020002', `clean session ${clean}`);
    assert.equal(gw.stats().dropped.bad_request, 2);
    assert.equal(gw.stats().dropped.auth, undefined);
    assert.equal(await exchange(Buffer.concat([connect('esp-1', true), packet(0x30, Buffer.concat([field(''), Buffer.from('[]')]))])), '20020000', 'CONNACK 0, then closed');
    assert.equal(gw.stats().dropped.bad_request, 3);
    assert.equal(gw.stats().dropped.forbidden, undefined);
  });
});

test('gateway start that fails binding its MCU ports (one taken) never connects to the hub: no online/offline flap there', async () => {
  const tmp = tempDir();
  const hub = await closingServer();
  const taken = createServer();
  await new Promise<void>((r) => taken.listen(0, '127.0.0.1', () => r()));
  writeSecretFile(join(tmp.dir, 'token'), 'x'.repeat(32));
  try {
    const parsed = GatewayConfigSchema.parse({ deviceId: 'gw-port', stateDir: tmp.dir, hub: { url: `mqtt://127.0.0.1:${hub.port}`, reconnectMs: 100 }, mcu: { host: '127.0.0.1', mqttPort: (taken.address() as AddressInfo).port, coapPort: 0 } });
    await assert.rejects(startGateway(parsed, testLogger('gateway'), '0.0.0-test'), (err: Error & { code?: string }) => err.code === 'FLEET_PORT_IN_USE');
    await new Promise((r) => setTimeout(r, 500));
    assert.equal(hub.connections(), 0, 'the hub saw no connection from a gateway that could not start');
  } finally {
    await new Promise<void>((r) => taken.close(() => r()));
    await hub.close();
    tmp.cleanup();
  }
});

test('gateway start that fails after its hub client was made (the MCU store locked by another process on the same state directory) ends that client: no reconnects under its identity afterwards', async () => {
  const tmp = tempDir();
  // a "hub" that closes every connection at once: a live client reconnects every reconnectMs
  const hub = await closingServer();
  writeSecretFile(join(tmp.dir, 'token'), 'x'.repeat(32));
  const lock = new Level<string, string>(join(tmp.dir, 'mcu-db'));
  await lock.open(); // LevelDB's lock: the gateway cannot open its MCU store
  try {
    const parsed = GatewayConfigSchema.parse({ deviceId: 'gw-fail', stateDir: tmp.dir, hub: { url: `mqtt://127.0.0.1:${hub.port}`, reconnectMs: 100 }, mcu: { mqttPort: 0, coapPort: 0 } });
    await assert.rejects(startGateway(parsed, testLogger('gateway'), '0.0.0-test'), (err: Error & { code?: string }) => {
      // failed where meant: the MCU store, opened after the hub client was made (gateway/index.ts)
      assert.equal(err.code, 'FLEET_STORE', err.message);
      assert.match(err.message, /cannot open store .*mcu-db: another process holds its lock: is a fleetlet process already running on this state directory\?/);
      return true;
    });
    await new Promise((r) => setTimeout(r, 300));
    const after = hub.connections();
    await new Promise((r) => setTimeout(r, 1500));
    assert.equal(hub.connections(), after, `no connection attempts after the failed start (${hub.connections() - after} in 1.5 s)`);
  } finally {
    await lock.close();
    await hub.close();
    tmp.cleanup();
  }
});
