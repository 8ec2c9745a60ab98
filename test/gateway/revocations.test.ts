import assert from 'node:assert/strict';
import { mkdirSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import type { MqttClient } from 'mqtt';
import { McuRevocations } from '../../gateway/revocations.ts';
import { tempDir, testLogger, waitFor } from '../helpers.ts';
import { coap, connectMcu, of, withEnv } from './env.ts';

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
    assert.equal(metric(/^fleet_gateway_mcu_dropped_total\{protocol="coap",reason="revoked"\} (\d+)$/m), 1);
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
