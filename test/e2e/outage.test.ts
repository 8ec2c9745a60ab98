import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import mqtt from 'mqtt';
import { deriveToken } from '../../core/credentials.ts';
import { encodeMessage } from '../../core/messages.ts';
import { connectFleetClient } from '../../core/mqtt.ts';
import { LevelOutbox } from '../../core/outbox-level.ts';
import { Priority } from '../../core/outbox.ts';
import { deviceTopic } from '../../core/topics.ts';
import { Uplink } from '../../core/uplink.ts';
import { HubConfigSchema } from '../../hub/config.ts';
import { startHub, type HubHandle } from '../../hub/index.ts';
import { stablePort, tempDir, testLogger, waitFor } from '../helpers.ts';

/** The issue's scenario: the hub is away for a whole minute while devices keep producing. */
const OUTAGE_MS = 60_000;

test('outage: the hub stopped for a minute during a flood — zero loss and no duplicates at a consumer on the hub', { timeout: 240_000 }, async () => {
  const tmp = tempDir('fleetlet-outage-');
  const hubConfig = (mqttPort: number) => HubConfigSchema.parse({ mqttPort, httpPort: 0, stateDir: join(tmp.dir, 'hub') });
  // restarted on the same port after the outage: one no port-0 listener can take meanwhile
  const port = await stablePort();
  let hub: HubHandle = await startHub(hubConfig(port), testLogger('hub'));
  const url = `mqtt://127.0.0.1:${port}`;
  const secret = readFileSync(hub.fleetSecretFile, 'utf8').trim();

  // a consumer with a persistent session: the hub keeps its subscription and queues for it across the restart
  const seen = new Map<string, number>();
  const consumer = mqtt.connect(url, { clientId: 'outage-consumer', clean: false, username: 'operator', password: readFileSync(hub.operatorTokenFile, 'utf8').trim(), reconnectPeriod: 500 });
  consumer.on('message', (_t, p) => {
    const mid = (JSON.parse(p.toString()) as { mid: string }).mid;
    seen.set(mid, (seen.get(mid) ?? 0) + 1);
  });
  await new Promise<void>((r) => consumer.once('connect', () => r()));
  await consumer.subscribeAsync('fleet/v1/d/+/telemetry', { qos: 1 });

  const outbox = await LevelOutbox.open(join(tmp.dir, 'outbox'), { minFreeBytes: 0 });
  const device = connectFleetClient({ url, deviceId: 'flooder', token: deriveToken(secret, 'device', 'flooder'), kind: 'agent', version: '1', keepalive: 5, reconnectMs: 200, reconnectMaxMs: 2000 });
  const uplink = new Uplink({ client: device, outbox, log: testLogger('uplink'), deviceId: 'flooder', rate: 0 });
  const appended: string[] = [];
  let flooding = true;
  const flood = (async () => {
    // about 500 messages/s from 5 producers, for the whole test
    await Promise.all(
      Array.from({ length: 5 }, async () => {
        while (flooding) {
          const rec = await outbox.append({
            topic: deviceTopic('flooder', 'telemetry'),
            priority: Priority.TELEMETRY,
            payload: (mid) => encodeMessage({ v: 1, mid, ts: Date.now(), samples: [{ n: 'x', v: Math.random(), t: Date.now() }] }),
          });
          appended.push(rec.id);
          await new Promise((r) => setTimeout(r, 10));
        }
      }),
    );
  })();

  try {
    await waitFor(() => seen.size >= 500, 'traffic flowing before the outage', 30_000);
    await hub.stop();
    const atStop = appended.length;
    await new Promise((r) => setTimeout(r, OUTAGE_MS));
    const queuedDuringOutage = appended.length - atStop;
    assert.ok(queuedDuringOutage > 1000, `the flood went on during the outage (${queuedDuringOutage} queued)`);
    hub = await startHub(hubConfig(port), testLogger('hub'));
    await new Promise((r) => setTimeout(r, 3000));
    flooding = false;
    await flood;
    await waitFor(() => outbox.stats().depth === 0, 'backlog drained after the hub returned', 60_000).catch((err: Error) => {
      throw new Error(`${err.message}; outbox ${JSON.stringify(outbox.stats())}; uplink ${JSON.stringify(uplink.stats())}; seen ${seen.size} of ${appended.length}`);
    });
    await waitFor(() => appended.every((id) => seen.has(id)), 'every appended message at the consumer', 30_000).catch(() => undefined);
    const lost = appended.filter((id) => !seen.has(id));
    const dups = [...seen.entries()].filter(([, n]) => n > 1);
    assert.equal(lost.length, 0, `lost ${lost.length} of ${appended.length}: ${lost.slice(0, 5).join(',')}`);
    assert.equal(dups.length, 0, `duplicates at the consumer: ${dups.slice(0, 5).map(([id, n]) => `${id}x${n}`).join(',')}`);
    assert.equal(seen.size, appended.length);
  } finally {
    flooding = false;
    await flood.catch(() => undefined);
    uplink.stop();
    await device.endAsync(true);
    await consumer.endAsync(true);
    await outbox.close();
    await hub.stop();
    tmp.cleanup();
  }
});
