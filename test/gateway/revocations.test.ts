import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { test } from 'node:test';
import type { MqttClient } from 'mqtt';
import { isFleetError } from '../../core/errors.ts';
import { COAP_METHOD, decodeMessage, encodeRequest } from '../../esp32-sim/coap-lite.ts';
import { mcuKey, signMcuMessage } from '../../firmware-bridge/auth.ts';
import { COAP_PATH_ROOT, COAP_QUERY_COUNTER, COAP_QUERY_MAC } from '../../firmware-bridge/coap.ts';
import { GatewayConfigSchema } from '../../gateway/config.ts';
import { startGateway } from '../../gateway/index.ts';
import { McuRevocations } from '../../gateway/revocations.ts';
import { writeSecretFile } from '../../core/secrets.ts';
import { tempDir, testLogger, waitFor } from '../helpers.ts';
import { coap, connectMcu, nextCounter, of, udpPeer, withEnv } from './env.ts';

const reading = (v: number) => Buffer.from(JSON.stringify([{ n: 'temperature', v }]));

function publish(c: MqttClient, id: string, v: number): Promise<void> {
  return new Promise((resolve, reject) => c.publish(`mcu/v1/${id}/t`, reading(v), { qos: 1 }, (err) => (err ? reject(err) : resolve())));
}

/**
 * One stolen MCU cut off without re-provisioning the others: real hub, real gateway, real
 * MQTT and CoAP MCUs, the revoked list as a real file under the gateway's state dir that is
 * edited while everything runs (the gateway polls it every 2 s).
 */
test('gateway: MCUs added to the revoked list are cut off (MQTT session closed, CONNACK 5 after; CoAP 4.03 FLEET_MCU_REVOKED), others go on, and one taken off the list connects again — without a restart', { timeout: 60_000 }, async () => {
  await withEnv(async ({ gw, site, seen, gwDir }) => {
    const metric = (re: RegExp) => Number(re.exec(gw.metrics.render())?.[1] ?? 0);
    const revokedGauge = () => metric(/^fleet_gateway_mcus_revoked (\d+)$/m);
    const file = join(gwDir, 'revoked-mcus');

    const r1 = await connectMcu(gw.mqttPort, 'esp-r1', site);
    let r1Closed = false;
    r1.on('close', () => {
      r1Closed = true;
    });
    await publish(r1, 'esp-r1', 1);
    assert.equal((await coap(gw.coapPort, site, 'esp-r2', 't', 'POST', reading(1), { format: 50 })).code, '2.04');
    await waitFor(() => of(seen, 'esp-r1', 'telemetry').length === 1 && of(seen, 'esp-r2', 'telemetry').length === 1, 'both readings at the hub');

    // the operator revokes both (and makes a typo on a third line)
    writeFileSync(file, '# stolen from site 4, 2026-11-23\nesp-r1\nesp-r2   # its twin\nnot an id!\n');
    await waitFor(() => revokedGauge() === 2, 'the list read again', 10_000);
    await waitFor(() => r1Closed, 'the revoked MQTT session cut off', 5000);
    r1.end(true);
    await assert.rejects(connectMcu(gw.mqttPort, 'esp-r1', site), /Not authorized/i);
    const refused = await coap(gw.coapPort, site, 'esp-r2', 't', 'POST', reading(2), { format: 50 });
    assert.equal(refused.code, '4.03');
    assert.match(refused.body.toString(), /FLEET_MCU_REVOKED/);
    assert.equal(metric(/^fleet_gateway_mcu_dropped_total\{protocol="mqtt",reason="revoked"\} (\d+)$/m), 1);
    // at least: a retransmission of the CoAP request (a stall of over 2 s) is refused again
    assert.ok(metric(/^fleet_gateway_mcu_dropped_total\{protocol="coap",reason="revoked"\} (\d+)$/m) >= 1);
    // a revoked MCU's refusals are not counted as failed authentication (its key is right)
    assert.doesNotMatch(gw.metrics.render(), /^fleet_gateway_mcu_auth_failures_total\{protocol="(mqtt|coap)"\} [1-9]/m);

    // another MCU of the site goes on as before
    const ok = await connectMcu(gw.mqttPort, 'esp-ok', site);
    await publish(ok, 'esp-ok', 1);
    await ok.endAsync();
    await waitFor(() => of(seen, 'esp-ok', 'telemetry').length === 1, 'esp-ok’s reading at the hub');
    // nothing of the revoked ones got through
    assert.equal(of(seen, 'esp-r2', 'telemetry').length, 1);

    // esp-r1 recovered and put back into service: taken off the list, it connects again
    writeFileSync(file, 'esp-r2\n');
    await waitFor(() => revokedGauge() === 1, 'the shorter list read', 10_000);
    const back = await connectMcu(gw.mqttPort, 'esp-r1', site);
    await publish(back, 'esp-r1', 2);
    await back.endAsync();
    await waitFor(() => of(seen, 'esp-r1', 'telemetry').length === 2, 'esp-r1’s new reading at the hub');

    // the file deleted: nothing is revoked
    rmSync(file);
    await waitFor(() => revokedGauge() === 0, 'the list gone', 10_000);
    assert.equal((await coap(gw.coapPort, site, 'esp-r2', 't', 'POST', reading(3), { format: 50 })).code, '2.04');
  });
});

test('McuRevocations: an invalid line is reported with its number and skipped; a list that cannot be read keeps the previous one', async () => {
  const tmp = tempDir();
  const log = testLogger('revocations');
  const file = join(tmp.dir, 'revoked-mcus');
  const cut: string[] = [];
  writeFileSync(file, 'esp-a\n\n  # nothing\nesp b\nesp-b\n');
  const r = new McuRevocations(file, log, (ids) => cut.push(...ids));
  try {
    r.start();
    assert.equal(r.size, 2);
    assert.ok(r.has('esp-a') && r.has('esp-b'));
    const bad = log.lines.find((l) => l.msg === 'revoked MCU list: not an MCU id; line skipped');
    assert.equal(bad?.line, 4);
    assert.equal(bad?.code, 'FLEET_CONFIG_INVALID');
    // the path becomes something that cannot be read as a file: the list stays as it was
    rmSync(file);
    mkdirSync(file);
    await waitFor(() => log.lines.some((l) => l.msg === 'cannot read the revoked MCU list; the previous list stays'), 'the read error reported', 10_000);
    assert.equal(r.size, 2);
    assert.ok(r.has('esp-a'));
    // a readable list again: the new one applies, and only the newly added id is cut
    rmSync(file, { recursive: true });
    writeFileSync(file, 'esp-b\nesp-c\n');
    await waitFor(() => r.has('esp-c'), 'the new list read', 10_000);
    assert.equal(r.has('esp-a'), false);
    assert.deepEqual(cut, ['esp-a', 'esp-b', 'esp-c']);
  } finally {
    r.stop();
    tmp.cleanup();
  }
});

test('gateway: a CoAP MCU observing its mailbox when it is revoked loses its observation at once and is told (4.03 notification); a new GET cmd is refused', { timeout: 60_000 }, async () => {
  await withEnv(async ({ gw, site, gwDir }) => {
    const { got, send, close } = await udpPeer(gw.coapPort);
    const observers = () => Number(/^fleet_gateway_coap_observers (\d+)/m.exec(gw.metrics.render())?.[1]);
    const id = 'esp-obs-r';
    const getCmd = (observe: 0 | undefined, mid: number, token: number) => {
      const c = nextCounter();
      const mac = signMcuMessage(mcuKey(site, id), id, 'cmd', c, Buffer.alloc(0));
      return encodeRequest({ method: COAP_METHOD.GET, path: [...COAP_PATH_ROOT, id, 'cmd'], query: [`${COAP_QUERY_COUNTER}=${c}`, `${COAP_QUERY_MAC}=${mac}`], ...(observe === undefined ? {} : { observe }) }, 0, mid, token);
    };
    try {
      await send(getCmd(0, 0x4001, 0x1234));
      await waitFor(() => got.length === 1 && observers() === 1, 'observing its mailbox');
      writeFileSync(join(gwDir, 'revoked-mcus'), `${id}\n`);
      await waitFor(() => observers() === 0, 'the observation ended by the revocation', 10_000);
      // and the MCU is told: a last notification, 4.03 without an Observe option (RFC 7641 §3.2)
      await waitFor(() => got.length === 2, 'the final notification');
      const last = decodeMessage(got[1]!);
      assert.equal(last?.code, '4.03');
      assert.equal(last?.token, 0x1234);
      assert.equal(last?.res.observe, undefined);
      assert.equal(last?.res.payload.toString(), 'FLEET_MCU_REVOKED');
      await send(getCmd(undefined, 0x4002, 0x1235));
      await waitFor(() => got.length >= 3, 'answered');
      // a CoAP response header: version 1, type, token length; then the code byte (4.03 = 0x83)
      assert.equal(got.at(-1)![1], 0x83, 'GET cmd answered 4.03');
      assert.match(got.at(-1)!.toString('latin1'), /FLEET_MCU_REVOKED/);
    } finally {
      await close();
    }
  });
});

test('gateway start: a revoked list that exists but cannot be read stops the start with FLEET_CONFIG_INVALID (every revoked MCU would be let back in)', { timeout: 30_000 }, async () => {
  const tmp = tempDir();
  try {
    const stateDir = join(tmp.dir, 'gw');
    mkdirSync(join(stateDir, 'revoked-mcus'), { recursive: true }); // a directory where the list should be
    writeSecretFile(join(stateDir, 'token'), 'not-used-before-the-check');
    const config = GatewayConfigSchema.parse({ deviceId: 'gw-r', stateDir, hub: { url: 'mqtt://127.0.0.1:1' }, mcu: { mqttPort: 0, coapPort: 0 } });
    await assert.rejects(startGateway(config, testLogger('gateway'), '0.0.0-test'), (err: unknown) => isFleetError(err, 'FLEET_CONFIG_INVALID') && /revoked-mcus: not a regular file/.test((err as Error).message));
  } finally {
    tmp.cleanup();
  }
});

test('McuRevocations: a FIFO at the path is refused without blocking, and a file full of bad lines logs twenty and a count', () => {
  const tmp = tempDir();
  try {
    const fifo = join(tmp.dir, 'fifo');
    execFileSync('mkfifo', [fifo]);
    const r = new McuRevocations(fifo, testLogger('revocations'));
    // a blocking open or read would hang here (no writer ever comes)
    assert.throws(() => r.start(), (err: unknown) => isFleetError(err, 'FLEET_CONFIG_INVALID') && /not a regular file/.test((err as Error).message));
    r.stop();

    const junk = join(tmp.dir, 'junk');
    writeFileSync(junk, 'esp-fine\n' + Array.from({ length: 30 }, (_, i) => `bad id ${i}`).join('\n'));
    const log = testLogger('revocations');
    const j = new McuRevocations(junk, log);
    j.start();
    j.stop();
    assert.equal(j.size, 1);
    assert.equal(log.lines.filter((l) => l.msg === 'revoked MCU list: not an MCU id; line skipped').length, 20);
    assert.equal(log.lines.find((l) => l.msg === 'revoked MCU list: more lines skipped')?.skipped, 30);
  } finally {
    tmp.cleanup();
  }
});

test('fleetlet gateway revoke / unrevoke edit the list a running gateway polls: an MCU is cut off and let back in; comments and other ids stay; a bad id exits 2', { timeout: 90_000 }, async () => {
  await withEnv(async ({ gw, site, gwDir }) => {
    const cli = (...args: string[]) => spawnSync(process.execPath, ['--import', 'tsx', 'cli/main.ts', 'gateway', ...args, '--state-dir', gwDir], { encoding: 'utf8', timeout: 30_000 });
    const file = join(gwDir, 'revoked-mcus');
    writeFileSync(file, '# site 4\nesp-old\n');
    const c = await connectMcu(gw.mqttPort, 'esp-cli', site);
    let closed = false;
    c.on('close', () => {
      closed = true;
    });
    const r = cli('revoke', 'esp-cli', 'esp-old');
    assert.equal(r.status, 0, r.stderr);
    assert.match(r.stdout, /revoked: esp-cli; unchanged: esp-old/);
    const lines = readFileSync(file, 'utf8').split('\n');
    assert.deepEqual(lines.slice(0, 2), ['# site 4', 'esp-old']);
    assert.match(lines[2]!, /^esp-cli {2}# revoked \d{4}-\d\d-\d\dT/);
    await waitFor(() => closed, 'esp-cli cut off', 10_000);
    c.end(true);
    await assert.rejects(connectMcu(gw.mqttPort, 'esp-cli', site), /Not authorized/i);

    const u = cli('unrevoke', 'esp-cli');
    assert.equal(u.status, 0, u.stderr);
    assert.equal(readFileSync(file, 'utf8'), '# site 4\nesp-old\n');
    await waitFor(() => Number(/^fleet_gateway_mcus_revoked (\d+)$/m.exec(gw.metrics.render())?.[1]) === 1, 'the list read again', 10_000);
    const back = await connectMcu(gw.mqttPort, 'esp-cli', site);
    await back.endAsync();

    const bad = cli('revoke', 'not an id');
    assert.equal(bad.status, 2);
    assert.match(bad.stderr, /FLEET_USAGE/);
    assert.equal(readFileSync(file, 'utf8'), '# site 4\nesp-old\n', 'the list untouched');
  });
});

type HubApi = (method: string, path: string, auth?: boolean) => Promise<{ status: number; body: Record<string, unknown> }>;

/** The hub's HTTP API as the operator (with its token), or without a token (`auth` false). */
function hubApi(hub: { operatorTokenFile: string; httpPort: number }): HubApi {
  const token = readFileSync(hub.operatorTokenFile, 'utf8').trim();
  return async (method, path, auth = true) => {
    const res = await fetch(`http://127.0.0.1:${hub.httpPort}${path}`, { method, headers: auth ? { authorization: `Bearer ${token}` } : {} });
    return { status: res.status, body: (await res.json()) as Record<string, unknown> };
  };
}

/** PUT /api/v1/{list}/{id}: only the operator may revoke (401), only a valid id (400); the first call changes the list, a second is idempotent. */
async function revokeThroughApi(api: HubApi, list: string, id: string): Promise<void> {
  assert.equal((await api('PUT', `/api/v1/${list}/${id}`, false)).status, 401);
  assert.equal((await api('PUT', `/api/v1/${list}/not%20an%20id`)).status, 400);
  const put = await api('PUT', `/api/v1/${list}/${id}`);
  assert.equal(put.status, 200);
  assert.deepEqual(put.body, { id, revoked: true, changed: true });
  assert.equal((await api('PUT', `/api/v1/${list}/${id}`)).body.changed, false, 'idempotent');
}

/**
 * Revoking from the hub (PUT /api/v1/mcu-revocations/{id}): every gateway gets the list
 * (retained MCU_REVOCATIONS_TOPIC) and cuts the MCU off as it does for its own file; the hub
 * stops letting any gateway act for it; DELETE lets it back in. Real hub, gateway and MQTT MCUs.
 */
test('hub: an MCU revoked at the hub is cut off at its gateway and no longer delegated; lifting the revocation lets it back in', { timeout: 60_000 }, async () => {
  await withEnv(async ({ hub, gw, site, seen, dir }) => {
    const api = hubApi(hub);
    const gwGauge = () => Number(/^fleet_gateway_mcus_revoked (\d+)$/m.exec(gw.metrics.render())?.[1]);

    // the gateway has the list before any MCU: one revoked that never connected is refused
    // at its first connection (the gateway subscribes on connect, before any register)
    assert.equal((await api('PUT', '/api/v1/mcu-revocations/esp-never')).status, 200);
    await waitFor(() => gwGauge() === 1, 'the gateway got the list', 10_000);
    await assert.rejects(connectMcu(gw.mqttPort, 'esp-never', site), /Not authorized/i);

    const m = await connectMcu(gw.mqttPort, 'esp-h1', site);
    let closed = false;
    m.on('close', () => {
      closed = true;
    });
    await publish(m, 'esp-h1', 1);
    await waitFor(() => of(seen, 'esp-h1', 'telemetry').length === 1 && hub.broker.mcusOf('gw-1')?.has('esp-h1') === true, 'the reading at the hub, the MCU delegated');

    await revokeThroughApi(api, 'mcu-revocations', 'esp-h1');
    // the hub no longer lets the gateway act for it, and shows it offline with the reason
    assert.equal(hub.broker.mcusOf('gw-1')?.has('esp-h1'), false);
    await waitFor(() => hub.registry.get('esp-h1')?.online === false, 'the registry shows it offline');
    // the gateway got the list: the live session is cut, a new one refused
    await waitFor(() => closed, 'the MQTT session cut at the gateway', 10_000);
    assert.equal(gwGauge(), 2);
    m.end(true);
    await assert.rejects(connectMcu(gw.mqttPort, 'esp-h1', site), /Not authorized/i);
    const list = await api('GET', '/api/v1/mcu-revocations');
    assert.deepEqual((list.body.revoked as Array<{ id: string }>).map((r) => r.id), ['esp-h1', 'esp-never']);
    assert.match(readFileSync(join(dir, 'hub', 'mcu-revocations.json'), 'utf8'), /"esp-h1"/);

    // lifted: delegated again, and it connects and sends as before
    const del = await api('DELETE', '/api/v1/mcu-revocations/esp-h1');
    assert.deepEqual(del.body, { id: 'esp-h1', revoked: false, changed: true });
    assert.equal(hub.broker.mcusOf('gw-1')?.has('esp-h1'), true);
    await waitFor(() => gwGauge() === 1, 'the gateway got the shorter list', 10_000);
    const back = await connectMcu(gw.mqttPort, 'esp-h1', site);
    await publish(back, 'esp-h1', 2);
    await back.endAsync();
    await waitFor(() => of(seen, 'esp-h1', 'telemetry').length === 2, 'its new reading at the hub');
    // and the registry shows it online again (the gateway took it offline when it cut it)
    await waitFor(() => hub.registry.get('esp-h1')?.online === true, 'online again at the hub');
  });
});

test('McuRevocations: the hub\'s list is kept on disk for a start without the hub; a bad one is refused and changes nothing', () => {
  const tmp = tempDir();
  const log = testLogger('revocations');
  const cut: string[] = [];
  const file = join(tmp.dir, 'hub-revoked-mcus.json');
  try {
    const r = new McuRevocations(join(tmp.dir, 'revoked-mcus'), log, (ids) => cut.push(...ids));
    r.loadHubList(file); // none yet
    r.setHubList(Buffer.from(JSON.stringify({ v: 1, rev: 5, ts: 1, ids: ['esp-x', 'esp-y'] })), 1);
    assert.deepEqual(cut, ['esp-x', 'esp-y']);
    // on the same connection an older list (the retained copy read before the change) is ignored
    r.setHubList(Buffer.from(JSON.stringify({ v: 1, rev: 4, ts: 1, ids: [] })), 1);
    assert.ok(r.has('esp-x'));
    // a new connection's first list is taken even when lower (a hub whose clock went back)
    r.setHubList(Buffer.from(JSON.stringify({ v: 1, rev: 3, ts: 1, ids: ['esp-x', 'esp-y', 'esp-w'] })), 2);
    assert.ok(r.has('esp-w'));
    assert.deepEqual(cut, ['esp-x', 'esp-y', 'esp-w']);
    r.setHubList(Buffer.from('{"v":1,"rev":9,"ts":1,"ids":["bad id"]}'), 2);
    assert.ok(log.lines.some((l) => l.code === 'FLEET_MSG_INVALID'));
    assert.ok(r.has('esp-x') && r.has('esp-y'), 'a bad list changes nothing');
    // a later start, the hub not reachable: the list from disk
    const again = new McuRevocations(join(tmp.dir, 'revoked-mcus'), log);
    again.loadHubList(file);
    assert.ok(again.has('esp-x') && again.has('esp-y') && again.has('esp-w') && !again.has('esp-z'));
    assert.equal(again.size, 3);
    writeFileSync(file, '{"v":1,');
    assert.throws(() => new McuRevocations(join(tmp.dir, 'revoked-mcus'), log).loadHubList(file), (err: unknown) => isFleetError(err, 'FLEET_CONFIG_INVALID') && /delete it/.test(err.message));
  } finally {
    tmp.cleanup();
  }
});

test('McuRevocations: an MCU revoked here first and then at the hub stays revoked by the hub once the site lifts its own entry, and across a start without the hub (the hub\'s list was ignored when its new ids were on the local list)', () => {
  const tmp = tempDir();
  const log = testLogger('revocations');
  const cut: Array<[string, boolean]> = [];
  const local = join(tmp.dir, 'revoked-mcus');
  const file = join(tmp.dir, 'hub-revoked-mcus.json');
  try {
    writeFileSync(local, 'esp-7\n');
    const r = new McuRevocations(local, log, (ids, atHub) => cut.push(...ids.map((id): [string, boolean] => [id, atHub])));
    r.loadHubList(file);
    r.start();
    assert.ok(r.has('esp-7'));
    r.setHubList(Buffer.from(JSON.stringify({ v: 1, rev: 1, ts: 1, ids: ['esp-7'] })), 1);
    assert.deepEqual(cut, [['esp-7', false]], 'cut off by the local list, not again by the hub\'s');
    assert.ok(readFileSync(file, 'utf8').includes('esp-7'), 'the hub list is on disk');
    // the site lifts its own entry: the hub still revokes it
    writeFileSync(local, '# lifted here; the hub covers it\n');
    (r as unknown as { poll(): void }).poll();
    assert.equal(r.has('esp-7'), true);
    r.stop();
    const again = new McuRevocations(local, log);
    again.loadHubList(file);
    again.start();
    assert.equal(again.has('esp-7'), true, 'a start without the hub keeps the hub\'s revocation');
    again.stop();
  } finally {
    tmp.cleanup();
  }
});

/**
 * Revoking an agent or gateway at the hub (PUT /api/v1/device-revocations/{id}) without
 * rotating the fleet secret: its session is closed, every CONNECT with its token gets
 * CONNACK 5, its token fetches no artifact, and a gateway's MCUs are no longer its own.
 * DELETE lets it back in, and what it kept in its outbox meanwhile arrives. Real hub,
 * gateway (its hub client retries every 200 ms) and an MQTT MCU.
 */
test('hub: a gateway revoked at the hub is cut off (CONNACK 5, no artifacts, its MCUs shown offline) and keeps its MCUs\' readings until the revocation is lifted, when they arrive', { timeout: 60_000 }, async () => {
  await withEnv(async ({ hub, gw, site, seen, gwDir, dir, hubRefusals }) => {
    const api = hubApi(hub);
    const gwToken = readFileSync(join(gwDir, 'token'), 'utf8').trim();
    const artifactStatus = async () => (await fetch(`http://127.0.0.1:${hub.httpPort}/api/v1/artifacts/${'0'.repeat(64)}`, { headers: { authorization: `Basic ${Buffer.from(`gw-1:${gwToken}`).toString('base64')}` } })).status;
    const hubGauge = async () => Number(/^fleet_hub_devices_revoked (\d+)$/m.exec(await (await fetch(`http://127.0.0.1:${hub.httpPort}/metrics`)).text())?.[1]);

    const m = await connectMcu(gw.mqttPort, 'esp-g1', site);
    await publish(m, 'esp-g1', 1);
    await waitFor(() => of(seen, 'esp-g1', 'telemetry').length === 1, 'the first reading at the hub');
    await waitFor(() => hub.registry.get('esp-g1')?.online === true, 'esp-g1 online at the hub');
    assert.equal(hub.broker.mcusOf('gw-1')?.has('esp-g1'), true);
    assert.equal(await artifactStatus(), 403, 'the gateway token is good: an artifact not meant for it is 403, not 401');

    await revokeThroughApi(api, 'device-revocations', 'gw-1');
    assert.equal(await hubGauge(), 1);

    // cut off, and kept off: the gateway's client retries every 200 ms and is refused each time
    await waitFor(() => !gw.stats().hubConnected, 'the gateway disconnected', 10_000);
    await sleep(1000);
    assert.equal(gw.stats().hubConnected, false, 'no reconnect while revoked');
    assert.ok(hubRefusals().some((l) => /FLEET_DEVICE_REVOKED/.test(l)), 'the hub says why it refused');
    assert.equal(hub.broker.mcusOf('gw-1'), undefined, 'no MCU delegated to it');
    assert.equal(await artifactStatus(), 401, 'its token fetches no artifact');
    await waitFor(() => hub.registry.get('esp-g1')?.online === false, 'its MCU shown offline');
    assert.equal(hub.registry.get('esp-g1')?.reason, 'its gateway gw-1 is revoked at the hub');
    // its own last will is refused with everything it publishes: the hub says offline for it
    await waitFor(() => hub.registry.get('gw-1')?.online === false, 'the gateway shown offline');
    assert.equal(hub.registry.get('gw-1')?.reason, 'revoked at the hub');
    assert.deepEqual(((await api('GET', '/api/v1/device-revocations')).body.revoked as Array<{ id: string }>).map((r) => r.id), ['gw-1']);
    assert.match(readFileSync(join(dir, 'hub', 'device-revocations.json'), 'utf8'), /"gw-1"/);

    // the MCU goes on sending: the gateway keeps it in its outbox
    await publish(m, 'esp-g1', 2);
    await sleep(500);
    assert.equal(of(seen, 'esp-g1', 'telemetry').length, 1, 'nothing from the revoked gateway reaches the hub');

    const del = await api('DELETE', '/api/v1/device-revocations/gw-1');
    assert.deepEqual(del.body, { id: 'gw-1', revoked: false, changed: true });
    await waitFor(() => gw.stats().hubConnected, 'the gateway connected again', 10_000);
    await waitFor(() => of(seen, 'esp-g1', 'telemetry').length === 2, 'the reading kept meanwhile at the hub', 10_000);
    await waitFor(() => hub.broker.mcusOf('gw-1')?.has('esp-g1') === true, 'its MCU delegated to it again');
    await waitFor(() => hub.registry.get('esp-g1')?.online === true, 'its MCU online again');
    await waitFor(() => hub.registry.get('gw-1')?.online === true, 'the gateway online again');
    assert.equal(await artifactStatus(), 403);
    assert.equal(await hubGauge(), 0);
    await m.endAsync();
  });
});
