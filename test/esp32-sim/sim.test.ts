import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { deriveToken } from '../../core/credentials.ts';
import { isFleetError } from '../../core/errors.ts';
import { writeSecretFile } from '../../core/secrets.ts';
import { runSim, type SimProtocol } from '../../esp32-sim/sim.ts';
import { GatewayConfigSchema } from '../../gateway/config.ts';
import { startGateway } from '../../gateway/index.ts';
import { HubConfigSchema } from '../../hub/config.ts';
import { startHub } from '../../hub/index.ts';
import { tempDir, testLogger, waitFor } from '../helpers.ts';

const DEVICES = 20;

for (const protocol of ['mqtt', 'coap'] as const satisfies readonly SimProtocol[]) {
  test(`sim: ${DEVICES} ESP32s over ${protocol} all send telemetry through a gateway to the hub`, async () => {
    const tmp = tempDir();
    const hub = await startHub(HubConfigSchema.parse({ mqttPort: 0, httpPort: 0, stateDir: join(tmp.dir, 'hub') }), testLogger('hub'));
    const gwDir = join(tmp.dir, 'gateway');
    writeSecretFile(join(gwDir, 'token'), deriveToken(readFileSync(hub.fleetSecretFile, 'utf8').trim(), 'device', 'gw-1'));
    const gw = await startGateway(
      GatewayConfigSchema.parse({ deviceId: 'gw-1', stateDir: gwDir, hub: { url: `mqtt://127.0.0.1:${hub.mqttPort}`, reconnectMs: 200 }, mcu: { mqttPort: 0, coapPort: 0 } }),
      testLogger('gateway'),
    );
    const sim = await runSim({
      devices: DEVICES,
      protocol,
      siteSecret: readFileSync(gw.siteSecretFile, 'utf8').trim(),
      mqttPort: gw.mqttPort,
      coapPort: gw.coapPort,
      intervalMs: 250,
      startJitterMs: 200,
      log: testLogger('sim'),
    });
    try {
      const ids = Array.from({ length: DEVICES }, (_, i) => `esp32-${protocol}-${String(i + 1).padStart(4, '0')}`);
      // every device's samples reach the hub, twice at least, through gw-1
      await waitFor(() => ids.every((id) => (hub.registry.get(id)?.telemetryBatches ?? 0) >= 2), 'two telemetry batches from every device at the hub', 20_000);
      for (const id of ids) {
        const rec = hub.registry.get(id)!;
        assert.equal(rec.via, 'gw-1', id);
        assert.equal(rec.online, true, id);
        assert.deepEqual(Object.keys(rec.latest).sort(), ['humidity', 'rssi', 'temperature', 'uptime'], id);
        assert.equal(rec.latest.temperature?.u, 'Cel');
      }
      const st = sim.stats();
      assert.equal(st.devices, DEVICES);
      assert.equal(st.connected, DEVICES);
      assert.equal(st.errors, 0);
      assert.ok(st.sent >= 2 * DEVICES, `sent ${st.sent}`);
      const gs = gw.stats();
      assert.equal(gs.mcus, DEVICES);
      assert.ok(gs.messagesIn[protocol] >= 2 * DEVICES);
      assert.deepEqual(gs.dropped, {});
    } finally {
      await sim.stop();
      assert.equal(sim.stats().connected, 0);
      await gw.stop();
      await hub.stop();
      tmp.cleanup();
    }
  });
}

test('sim: options are validated with FLEET_CONFIG_INVALID naming the option', async () => {
  for (const [opts, key] of [
    [{ devices: 0 }, 'devices'],
    [{ devices: 1, protocol: 'http' }, 'protocol'],
    [{ devices: 1, intervalMs: 1 }, 'intervalMs'],
    [{ devices: 1, prefix: 'bad/' }, 'prefix'],
  ] as const) {
    await assert.rejects(
      runSim({ protocol: 'mqtt', siteSecret: 'x'.repeat(32), ...opts } as Parameters<typeof runSim>[0]),
      (err: unknown) => isFleetError(err, 'FLEET_CONFIG_INVALID') && err.message.includes(key),
      key,
    );
  }
});
