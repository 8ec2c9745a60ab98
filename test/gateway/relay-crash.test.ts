import assert from 'node:assert/strict';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { deriveToken } from '../../core/credentials.ts';
import { encodeBatch } from '../../core/batch.ts';
import { decodeMessage, encodeTelemetry, type TelemetryBatch } from '../../core/messages.ts';
import { Priority } from '../../core/outbox.ts';
import { LevelOutbox } from '../../core/outbox-level.ts';
import { writeSecretFile } from '../../core/secrets.ts';
import { deviceTopic } from '../../core/topics.ts';
import { GatewayConfigSchema, type GatewayConfig } from '../../gateway/config.ts';
import { startGateway } from '../../gateway/index.ts';
import { HubConfigSchema } from '../../hub/config.ts';
import { startHub, type HubHandle } from '../../hub/index.ts';
import { tempDir, testLogger, waitFor } from '../helpers.ts';

/**
 * After a gateway crash the outbox can hold records of an MCU the persisted MCU list lacks
 * (the list is saved every stateFlushMs, the outbox at once). Such a record is held back
 * until a register covers that MCU; it used to let later records of the other MCUs in the
 * same grouped record go first, so those MCUs' messages reached the hub out of order.
 * Here the state dir is built by hand as a crash leaves it (mcu-state.json without the MCU,
 * the outbox with its records), then a real gateway starts on it against a real hub.
 */

const GW = 'gw-1';
const sample = (v: number) => [{ n: 'temp', v, u: 'Cel', t: 1_700_000_000_000 + v }];

interface Seen {
  topic: string;
  payload: Buffer;
}

async function hubWithCollector(dir: string): Promise<{ hub: HubHandle; seen: Seen[]; stop: () => Promise<void> }> {
  const hub = await startHub(HubConfigSchema.parse({ mqttPort: 0, httpPort: 0, stateDir: join(dir, 'hub') }), testLogger('hub'));
  const seen: Seen[] = [];
  const collect = (packet: { topic: string; payload: Buffer | string }, cb: () => void) => {
    seen.push({ topic: packet.topic, payload: Buffer.from(packet.payload) });
    cb();
  };
  await new Promise<void>((r) => hub.broker.aedes.subscribe('fleet/v1/#', collect, r));
  return {
    hub,
    seen,
    stop: async () => {
      await new Promise<void>((r) => hub.broker.aedes.unsubscribe('fleet/v1/#', collect, r));
      await hub.stop();
    },
  };
}

function gatewayConfig(gwDir: string, hub: HubHandle, mcu: Partial<GatewayConfig['mcu']> = {}): GatewayConfig {
  return GatewayConfigSchema.parse({ deviceId: GW, stateDir: gwDir, hub: { url: `mqtt://127.0.0.1:${hub.mqttPort}`, reconnectMs: 200 }, mcu: { mqttPort: 0, coapPort: 0, ...mcu } });
}

async function deadLetters(hub: HubHandle): Promise<unknown[]> {
  const res = await fetch(`http://127.0.0.1:${hub.httpPort}/api/v1/dead-letters`, { headers: { authorization: `Bearer ${readFileSync(hub.operatorTokenFile, 'utf8').trim()}` } });
  assert.equal(res.status, 200);
  return ((await res.json()) as { deadLetters: unknown[] }).deadLetters;
}

/** Values of `mcu`'s telemetry as the hub accepted it, in order. */
const values = (seen: Seen[], mcu: string): number[] =>
  seen.filter((s) => s.topic === deviceTopic(mcu, 'telemetry')).flatMap((s) => (decodeMessage('telemetry', s.payload) as TelemetryBatch).samples.map((x) => x.v as number));

for (const maxMcus of [100, 2]) {
test(`gateway after a crash: a grouped record holding an MCU missing from the saved list is not overtaken by later records of the other MCUs in it (per-MCU order kept), and every message reaches the hub once (mcu.maxMcus ${maxMcus}${maxMcus === 2 ? ': the missing MCU is adopted beyond the limit, its data was acknowledged' : ''})`, async () => {
  const tmp = tempDir();
  const h = await hubWithCollector(tmp.dir);
  try {
    const gwDir = join(tmp.dir, 'gateway');
    mkdirSync(gwDir, { recursive: true });
    writeSecretFile(join(gwDir, 'token'), deriveToken(readFileSync(h.hub.fleetSecretFile, 'utf8').trim(), 'device', GW));
    // what a crash leaves: the saved list names mcu-a and mcu-b, but not mcu-x (first seen < stateFlushMs before the kill)
    writeFileSync(join(gwDir, 'mcu-state.json'), JSON.stringify({ v: 1, mcus: ['mcu-a', 'mcu-b'], replay: {}, meta: {} }));
    const outbox = await LevelOutbox.open(join(gwDir, 'outbox'));
    const batchTopic = deviceTopic(GW, 'batch');
    const telemetry = (mcu: string, v: number) => ({ topic: deviceTopic(mcu, 'telemetry'), priority: Priority.TELEMETRY, payload: (mid: string) => encodeTelemetry(mid, 1_700_000_000_000 + v, sample(v)) });
    const grouped = (items: Array<[string, number]>) => ({
      topic: batchTopic,
      priority: Priority.TELEMETRY,
      payload: (id: string) => encodeBatch(items.map(([mcu, v], k) => ({ topic: deviceTopic(mcu, 'telemetry'), payload: encodeTelemetry(`${id}${String(k).padStart(3, '0')}`, 1_700_000_000_000 + v, sample(v)) }))),
    });
    // in the order the gateway stored them before the crash
    await outbox.append(telemetry('mcu-a', 1));
    await outbox.append(grouped([['mcu-a', 2], ['mcu-x', 1], ['mcu-b', 1]]));
    await outbox.append(telemetry('mcu-a', 3));
    await outbox.append(grouped([['mcu-a', 4], ['mcu-b', 2]]));
    await outbox.append(telemetry('mcu-x', 2));
    await outbox.append(telemetry('mcu-b', 3));
    await outbox.close();

    const gw = await startGateway(gatewayConfig(gwDir, h.hub, { maxMcus }), testLogger('gateway'), '0.0.0-test');
    try {
      await waitFor(() => values(h.seen, 'mcu-a').length >= 4 && values(h.seen, 'mcu-b').length >= 3 && values(h.seen, 'mcu-x').length >= 2, 'all 9 MCU messages at the hub', 15_000);
      await waitFor(() => gw.stats().outbox.depth === 0, 'outbox drained');
      assert.deepEqual(values(h.seen, 'mcu-a'), [1, 2, 3, 4], 'mcu-a in order');
      assert.deepEqual(values(h.seen, 'mcu-b'), [1, 2, 3], 'mcu-b in order');
      assert.deepEqual(values(h.seen, 'mcu-x'), [1, 2], 'mcu-x in order');
      // mcu-x adopted: registered, and kept in the MCU list
      assert.equal(gw.stats().mcus, 3);
      assert.deepEqual(await deadLetters(h.hub), [], 'no dead letters at the hub');
    } finally {
      await gw.stop();
    }
  } finally {
    await h.stop();
    tmp.cleanup();
  }
});
}
