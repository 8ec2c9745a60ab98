import { test } from 'node:test';
import assert from 'node:assert/strict';
import { deriveToken } from '../../core/credentials.ts';
import { encodeMessage } from '../../core/messages.ts';
import { connectFleetClient } from '../../core/mqtt.ts';
import { deviceTopic } from '../../core/topics.ts';
import { tempDir, waitFor } from '../helpers.ts';
import { connect, telemetry, withHub } from './harness.ts';

test('hub: device with its derived token connects; wrong token, other client id, unknown user are refused', async () => {
  await withHub(async (_hub, { secret, url }) => {
    const ok = await connect(url, 'dev-1', 'dev-1', deriveToken(secret, 'device', 'dev-1'));
    await ok.endAsync();
    await assert.rejects(connect(url, 'dev-1', 'dev-1', 'wrong-token-wrong-token'), /Bad username or password/i);
    await assert.rejects(connect(url, 'dev-2', 'dev-1', deriveToken(secret, 'device', 'dev-1')), /Bad username or password/i);
    await assert.rejects(connect(url, 'x', 'not/an/id', 'whatever-whatever'), /Bad username or password/i);
  });
});

test('hub: online through retained state, offline through the last will when the connection drops', async () => {
  await withHub(async (hub, { secret, url }) => {
    const c = connectFleetClient({ url, deviceId: 'dev-1', token: deriveToken(secret, 'device', 'dev-1'), kind: 'agent', version: '1.2.3', keepalive: 5, reconnectMs: 0 });
    await waitFor(() => hub.registry.get('dev-1')?.online, 'dev-1 online');
    assert.equal(hub.registry.get('dev-1')?.version, '1.2.3');
    (c.stream as unknown as { destroy(): void }).destroy(); // abrupt loss: no DISCONNECT, so the will fires
    c.end(true);
    await waitFor(() => hub.registry.get('dev-1')?.online === false, 'dev-1 offline via will');
    assert.equal(hub.registry.get('dev-1')?.reason, 'connection lost');
  });
});

test('hub: ACL keeps a device inside its own subtree; operator sees traffic; duplicates are counted once', async () => {
  await withHub(async (hub, { secret, url, operator }) => {
    const seen: string[] = [];
    const op = await connect(url, 'ops-1', 'operator', operator);
    await op.subscribeAsync('fleet/v1/#', { qos: 1 });
    op.on('message', (topic, payload) => seen.push(`${topic} ${(JSON.parse(payload.toString()) as { mid?: string }).mid ?? ''}`.trim()));

    const dev = await connect(url, 'dev-1', 'dev-1', deriveToken(secret, 'device', 'dev-1'));
    const granted = await dev.subscribeAsync(deviceTopic('dev-1', 'desired'), { qos: 1 });
    assert.equal(granted[0]?.qos, 1);
    // refused subscriptions come back as 0x80 in the SUBACK; mqtt.js turns that into an error
    await assert.rejects(dev.subscribeAsync(deviceTopic('dev-2', 'cmd'), { qos: 1 }), /Subscribe error/);
    await assert.rejects(dev.subscribeAsync('fleet/v1/#', { qos: 1 }), /Subscribe error/);

    await dev.publishAsync(deviceTopic('dev-1', 'telemetry'), telemetry('100'), { qos: 1 });
    await dev.publishAsync(deviceTopic('dev-1', 'telemetry'), telemetry('100'), { qos: 1 }); // a re-send
    await dev.publishAsync(deviceTopic('dev-1', 'telemetry'), telemetry('101'), { qos: 1 });
    await waitFor(() => hub.registry.get('dev-1')?.telemetryBatches === 2, 'two unique batches');
    assert.equal(hub.registry.get('dev-1')?.duplicates, 1);

    // publishing into another device's subtree is acknowledged (so an at-least-once sender
    // does not loop on it) but reaches nobody, and is counted
    await dev.publishAsync(deviceTopic('dev-2', 'telemetry'), telemetry('1'), { qos: 1 });
    await dev.publishAsync(deviceTopic('dev-1', 'desired'), telemetry('1'), { qos: 1, retain: true });
    await dev.publishAsync(deviceTopic('dev-1', 'telemetry'), telemetry('102'), { qos: 1 });
    await waitFor(() => hub.registry.get('dev-1')?.telemetryBatches === 3, 'connection still usable after a refusal');
    assert.ok(dev.connected);
    await dev.endAsync();
    // the last publish reached the operator, so everything sent before it has been routed
    await waitFor(() => seen.includes(`${deviceTopic('dev-1', 'telemetry')} 102`), 'operator sees the last batch');
    assert.ok(!seen.some((s) => s.startsWith(deviceTopic('dev-2', 'telemetry'))), 'forged publish must not reach subscribers');
    assert.ok(!seen.some((s) => s.startsWith(deviceTopic('dev-1', 'desired'))), 'devices cannot write their desired state');
    assert.equal(hub.registry.get('dev-2'), undefined, 'the hub did not consume the forged message');
    const metrics = await (await fetch(`http://127.0.0.1:${hub.httpPort}/metrics`)).text();
    assert.match(metrics, /fleet_hub_acl_denied_total\{action="publish"\} 2/);
    assert.match(metrics, /fleet_hub_acl_denied_total\{action="subscribe"\} 2/);
    await op.endAsync();
  });
});

test('hub: a gateway acts only for the MCUs it registered, and cannot take another gateway’s MCU', async () => {
  await withHub(async (hub, { secret, url }) => {
    const gw = await connect(url, 'gw-1', 'gw-1', deriveToken(secret, 'device', 'gw-1'));
    await gw.publishAsync(deviceTopic('gw-1', 'register'), encodeMessage({ v: 1, ts: Date.now(), mcus: ['esp-1', 'esp-2'] }), { qos: 1, retain: true });
    await gw.publishAsync(deviceTopic('esp-1', 'telemetry'), telemetry('5'), { qos: 1 });
    await waitFor(() => hub.registry.get('esp-1')?.telemetryBatches === 1, 'MCU telemetry via gateway');

    const gw2 = await connect(url, 'gw-2', 'gw-2', deriveToken(secret, 'device', 'gw-2'));
    await gw2.publishAsync(deviceTopic('gw-2', 'register'), encodeMessage({ v: 1, ts: Date.now(), mcus: ['esp-1'] }), { qos: 1, retain: true });
    assert.equal(hub.broker.mcusOf('gw-2')?.has('esp-1'), false);
    await gw2.publishAsync(deviceTopic('esp-1', 'telemetry'), telemetry('6'), { qos: 1 });
    await gw.publishAsync(deviceTopic('esp-1', 'telemetry'), telemetry('7'), { qos: 1 });
    await waitFor(() => hub.registry.get('esp-1')?.telemetryBatches === 2, 'the owner gateway’s next batch');
    assert.equal(hub.registry.get('esp-1')?.duplicates, 0, 'mid 6 from the other gateway never reached the registry');
    await gw2.endAsync();
    await gw.endAsync();
  });
});

test('hub: operator API — reads open on loopback, writes need the token; desired state is retained for the device', async () => {
  await withHub(async (hub, { secret, url, http, operator }) => {
    const list = await (await fetch(`${http}/api/v1/devices`)).json() as { counts: { total: number } };
    assert.equal(list.counts.total, 0);
    const body = JSON.stringify({ apps: { sample: { version: '2.0.0' } } });
    const noAuth = await fetch(`${http}/api/v1/devices/dev-9/desired`, { method: 'PUT', body });
    assert.equal(noAuth.status, 401);
    assert.equal(((await noAuth.json()) as { error: { code: string } }).error.code, 'FLEET_AUTH_FAILED');
    const bad = await fetch(`${http}/api/v1/devices/dev-9/desired`, { method: 'PUT', body: '{"apps":5}', headers: { authorization: `Bearer ${operator}` } });
    assert.equal(bad.status, 400);
    const put = await fetch(`${http}/api/v1/devices/dev-9/desired`, { method: 'PUT', body, headers: { authorization: `Bearer ${operator}` } });
    assert.equal(put.status, 200);

    const dev = await connect(url, 'dev-9', 'dev-9', deriveToken(secret, 'device', 'dev-9'));
    const got = new Promise<Buffer>((r) => dev.once('message', (_t, p) => r(p)));
    await dev.subscribeAsync(deviceTopic('dev-9', 'desired'), { qos: 1 });
    const desired = JSON.parse((await got).toString()) as { apps: Record<string, { version: string }> };
    assert.equal(desired.apps.sample?.version, '2.0.0');
    await dev.endAsync();

    const metrics = await (await fetch(`${http}/metrics`)).text();
    assert.match(metrics, /# TYPE fleet_hub_devices gauge/);
    assert.equal((await fetch(`${http}/nope`)).status, 404);
    void hub;
  });
});

test('hub: the registry survives a restart; devices online before come back offline until they reconnect', async () => {
  const tmp = tempDir();
  try {
    await withHub(async (hub, { secret, url }) => {
      const c = connectFleetClient({ url, deviceId: 'dev-7', token: deriveToken(secret, 'device', 'dev-7'), kind: 'agent', version: '1', keepalive: 5, reconnectMs: 0 });
      await waitFor(() => hub.registry.get('dev-7')?.online, 'online');
      await hub.registry.flush();
      c.end(true);
    }, tmp.dir);
    await withHub(async (hub) => {
      const rec = hub.registry.get('dev-7');
      assert.ok(rec);
      assert.equal(rec.online, false);
    }, tmp.dir);
  } finally {
    tmp.cleanup();
  }
});

test('hub: stopping while a SUBSCRIBE still scans retained messages does not crash the process (LEVEL_ITERATOR_NOT_OPEN)', async () => {
  const { HubConfigSchema } = await import('../../hub/config.ts');
  const { startHub } = await import('../../hub/index.ts');
  const { testLogger } = await import('../helpers.ts');
  const tmp = tempDir();
  const hub = await startHub(HubConfigSchema.parse({ mqttPort: 0, httpPort: 0, stateDir: tmp.dir }), testLogger('hub'));
  try {
    await Promise.all(Array.from({ length: 3000 }, (_, i) => hub.broker.publish(deviceTopic(`dev-${i}`, 'desired'), Buffer.from('{}'), true)));
    const op = await connect(`mqtt://127.0.0.1:${hub.mqttPort}`, 'op-scan', 'operator', (await import('node:fs')).readFileSync(hub.operatorTokenFile, 'utf8').trim());
    // three scans of 3,000 retained messages start after this SUBACK; the hub stops under them
    await op.subscribeAsync(['fleet/v1/#', 'fleet/v1/d/+/desired', 'fleet/v1/d/+/cmd'], { qos: 1 });
    await hub.stop();
    // an uncaught 'error' from an abandoned scan would fail this test file here
    await new Promise((r) => setTimeout(r, 1000));
    op.end(true);
  } finally {
    tmp.cleanup();
  }
});
