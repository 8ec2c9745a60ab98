import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { deriveToken } from '../../core/credentials.ts';
import { writeSecretFile } from '../../core/secrets.ts';
import { runSim, type SimHandle } from '../../esp32-sim/sim.ts';
import { GatewayConfigSchema } from '../../gateway/config.ts';
import { startGateway, type VerifyFirmware } from '../../gateway/index.ts';
import { HubConfigSchema } from '../../hub/config.ts';
import { startHub } from '../../hub/index.ts';
import { tempDir, testLogger, waitFor } from '../helpers.ts';

/**
 * A raw-image "verifier" (mock of the bundle signature check, which the gateway gets
 * injected by the CLI and which is not what these tests are about): the bundle file is
 * the image. Named in the test title.
 */
const rawImageVerifierMock: VerifyFirmware = async (file, expect) => ({ version: expect.version, image: readFileSync(file) });

test('sim firmware (raw-image verifier mock at the gateway): MQTT chunks and CoAP Block2 downloads over flaky links, hash check, reboot into the new version; a version set to fail rolls back and the gateway reports it failed', { timeout: 120_000 }, async (t) => {
  const tmp = tempDir('fleetlet-sim-fw-');
  const hub = await startHub(HubConfigSchema.parse({ mqttPort: 0, httpPort: 0, stateDir: join(tmp.dir, 'hub') }), testLogger('hub'));
  const gwDir = join(tmp.dir, 'gateway');
  writeSecretFile(join(gwDir, 'token'), deriveToken(readFileSync(hub.fleetSecretFile, 'utf8').trim(), 'device', 'gw-fw'));
  const gw = await startGateway(
    GatewayConfigSchema.parse({ deviceId: 'gw-fw', stateDir: gwDir, hub: { url: `mqtt://127.0.0.1:${hub.mqttPort}`, reconnectMs: 200 }, mcu: { mqttPort: 0, coapPort: 0 } }),
    testLogger('gateway'),
    '0.0.0-test',
    { verifyFirmware: rawImageVerifierMock },
  );
  const sims: SimHandle[] = [];
  t.after(async () => {
    for (const s of sims) await s.stop();
    await gw.stop();
    await hub.stop();
    tmp.cleanup();
  });
  await waitFor(() => gw.stats().hubConnected, 'gateway connected to the hub');
  const site = readFileSync(gw.siteSecretFile, 'utf8').trim();

  const booted: Array<[string, string, string]> = [];
  const simLog = testLogger('sim');
  const common = {
    siteSecret: site,
    mqttPort: gw.mqttPort,
    coapPort: gw.coapPort,
    intervalMs: 400,
    startJitterMs: 300,
    coapAckTimeoutMs: 300,
    firmwareVersion: '1.0.0',
    failVersions: ['1.2.0'],
    onFirmware: (id: string, ev: { version: string; boot: string }) => booted.push([id, ev.boot, ev.version]),
    log: simLog,
  };
  // flaky links: MQTT connections drop now and then mid-download (resume from the last chunk), CoAP loses datagrams
  const mqttSim = await runSim({ ...common, devices: 4, protocol: 'mqtt', prefix: 'fw-m-', fwChunkBytes: 512, loss: 0.01 });
  sims.push(mqttSim);
  const coapSim = await runSim({ ...common, devices: 4, protocol: 'coap', prefix: 'fw-c-', fwChunkBytes: 256, loss: 0.03 });
  sims.push(coapSim);
  const good = ['fw-m-0001', 'fw-m-0002', 'fw-c-0001', 'fw-c-0002'];
  const bad = ['fw-m-0003', 'fw-c-0003'];
  const untouched = ['fw-m-0004', 'fw-c-0004'];
  const simOf = (id: string) => (id.startsWith('fw-m-') ? mqttSim : coapSim);
  await waitFor(() => [...good, ...bad, ...untouched].every((id) => hub.registry.get(id)?.version === '1.0.0'), 'every MCU reported 1.0.0 at the hub', 20_000);

  const image = (size: number, v: string) => {
    const data = randomBytes(size);
    const file = join(tmp.dir, `fw-${v}.bin`);
    writeFileSync(file, data);
    return { version: v, url: pathToFileURL(file).href, sha256: createHash('sha256').update(data).digest('hex'), size };
  };
  const v11 = image(24 * 1024 + 77, '1.1.0');
  const v12 = image(8 * 1024 + 5, '1.2.0');
  for (const id of good) await hub.setDesired(id, { apps: {}, firmware: v11 });
  for (const id of bad) await hub.setDesired(id, { apps: {}, firmware: v12 });

  await waitFor(() => good.every((id) => gw.firmwareState(id)?.state === 'succeeded') && bad.every((id) => gw.firmwareState(id)?.state === 'failed'), 'updates succeeded and failed as set up', 90_000).catch((err: Error) => {
    throw new Error(`${err.message}: ${JSON.stringify(Object.fromEntries([...good, ...bad].map((id) => [id, { gw: gw.firmwareState(id), sim: simOf(id).device(id) }])))}; mqtt ${JSON.stringify(mqttSim.stats())}; coap ${JSON.stringify(coapSim.stats())}`);
  });
  for (const id of good) {
    assert.equal(simOf(id).device(id)!.version, '1.1.0', id);
    await waitFor(() => hub.registry.get(id)?.version === '1.1.0', `${id} runs 1.1.0 at the hub`, 10_000);
  }
  for (const id of bad) {
    assert.equal(simOf(id).device(id)!.version, '1.0.0', `${id} rolled back`);
    assert.match(gw.firmwareState(id)?.reason ?? '', /1\.0\.0/, id);
  }
  for (const id of untouched) assert.equal(simOf(id).device(id)!.version, '1.0.0');
  assert.deepEqual(booted.map(([id, boot, v]) => `${id} ${boot} ${v}`).sort(), [...good.map((id) => `${id} ota 1.1.0`), ...bad.map((id) => `${id} rollback 1.0.0`)].sort());
  for (const s of [mqttSim, coapSim]) {
    const st = s.stats();
    assert.equal(st.fwHashFailed, 0, JSON.stringify(st));
    assert.equal(st.fwDownloaded, 3, JSON.stringify(st));
    assert.equal(st.fwBooted, 2);
    assert.equal(st.fwRolledBack, 1);
    assert.equal(st.badCommands, 0, `${JSON.stringify(st)}; refused: ${JSON.stringify(simLog.lines.filter((l) => /refused/.test(String(l.msg))))}`);
    assert.ok(st.fwBytes >= 2 * v11.size + v12.size);
  }
  // telemetry kept flowing through the updates, and the sleeping/lost logic saw reboots, not losses
  for (const id of [...good, ...bad]) await waitFor(() => (hub.registry.get(id)?.telemetryBatches ?? 0) >= 3, `${id} telemetry at the hub`, 10_000);
  t.diagnostic(`mqtt ${JSON.stringify(mqttSim.stats())}; coap ${JSON.stringify(coapSim.stats())}`);
});
