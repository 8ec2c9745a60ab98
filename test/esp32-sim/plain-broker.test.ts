import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { createServer, type AddressInfo } from 'node:net';
import { Aedes } from 'aedes';
import { runSim } from '../../esp32-sim/sim.ts';
import { mcuKey } from '../../firmware-bridge/auth.ts';
import { decodeFwChunkRequest, encodeFwChunk, encodeMcuCommand } from '../../firmware-bridge/frames.ts';
import { cleanups, testLogger, waitFor } from '../helpers.ts';

/**
 * The simulated ESP32 against a plain aedes broker on loopback standing in for the gateway
 * (the test plays the gateway's part: commands in the MCU wire format, firmware chunks).
 *
 * It keeps its MQTT connection alive when its period outgrows the keep-alive
 * it chose at CONNECT (set-interval), as esp-mqtt does from its own task. The peer is a plain
 * aedes broker on loopback (it closes a client silent for 1.5 keep-alives, as the gateway does);
 * the command is published by the test in the MCU wire format.
 */
test('sim MQTT: after set-interval beyond the keep-alive the device pings between readings: no broker-side disconnect, no early reading per reconnect; the period holds', async (t) => {
  const defer = cleanups(t);
  const broker = await Aedes.createBroker();
  defer(() => new Promise<void>((r) => broker.close(() => r())));
  const server = createServer(broker.handle);
  defer(() => void server.close());
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  const port = (server.address() as AddressInfo).port;
  let disconnects = 0;
  broker.on('clientDisconnect', () => disconnects++);
  const secret = 'k'.repeat(43);
  const acked: number[] = [];
  const sim = await runSim({ devices: 1, protocol: 'mqtt', siteSecret: secret, mqttPort: port, intervalMs: 500, startJitterMs: 0, hello: false, mqttKeepaliveS: 2, log: testLogger('sim'), onAck: () => void acked.push(Date.now()) });
  defer(() => sim.stop());
  const id = sim.ids()[0]!;
  await waitFor(() => acked.length >= 2, 'readings at the start period');
  broker.publish({ cmd: 'publish', topic: `mcu/v1/${id}/cmd`, payload: encodeMcuCommand(mcuKey(secret, id), id, Date.now(), { id: 'c-1', n: 'set-interval', a: { s: 6 }, x: Math.floor(Date.now() / 1000) + 600 }), qos: 1, retain: false, dup: false }, () => undefined);
  await waitFor(() => sim.device(id)?.intervalMs === 6000, 'the new period taken');
  const from = Date.now();
  const before = acked.length;
  await new Promise((r) => setTimeout(r, 8000)); // 4 keep-alives
  const after = acked.filter((t) => t > from).length;
  assert.equal(disconnects, 0, `the broker closed the device ${disconnects} time(s) for silence`);
  assert.equal(sim.stats().connects, 1, JSON.stringify(sim.stats()));
  // at a 6 s period, 8 s hold at least one reading and at most two (one already due may come first)
  assert.ok(after >= 1 && after <= 2, `readings in 8 s at a 6 s period: ${after} (${acked.length - before})`);
});

test('sim MQTT: a device with a verified image waiting for its ack\'s delivery does not go to deep sleep; it reboots into the image, and sleeping never counts more devices than there are', async (t) => {
  const defer = cleanups(t);
  const secret = 'y'.repeat(43);
  const image = Buffer.alloc(1000, 7);
  const sha = createHash('sha256').update(image).digest();
  const broker = await Aedes.createBroker();
  defer(() => new Promise<void>((r) => broker.close(() => r())));
  // the gateway is slow to acknowledge the device's ack (its rate limit, a busy loop): 8 s
  const slowAcks = new Set<NodeJS.Timeout>();
  defer(() => {
    for (const timer of slowAcks) clearTimeout(timer); // not answered into the closed broker
  });
  broker.authorizePublish = (_client, packet, cb) => {
    if (!packet.topic.endsWith('/ack')) return cb(null);
    const t = setTimeout(() => {
      slowAcks.delete(t);
      cb(null);
    }, 8000);
    slowAcks.add(t);
  };
  const hellos: string[] = [];
  broker.on('subscribe', (subs, client) => {
    if (!client || !subs.some((s) => s.topic.endsWith('/cmd'))) return;
    const id = client.id;
    broker.publish({ cmd: 'publish', topic: `mcu/v1/${id}/cmd`, payload: encodeMcuCommand(mcuKey(secret, id), id, Date.now(), { id: 'fw-1', n: 'fw.update', a: { v: '2.0.0', sha256: sha.toString('hex'), size: image.length }, x: Math.floor(Date.now() / 1000) + 600 }), qos: 1, retain: false, dup: false }, () => undefined);
  });
  broker.on('publish', (packet, client) => {
    if (!client) return;
    if (packet.topic.endsWith('/fwreq')) broker.publish({ cmd: 'publish', topic: `mcu/v1/${client.id}/fw`, payload: encodeFwChunk({ data: image, sha256: sha }, decodeFwChunkRequest(packet.payload as Buffer)), qos: 1, retain: false, dup: false }, () => undefined);
    if (packet.topic.endsWith('/hello')) hellos.push(`${(JSON.parse(packet.payload.toString()) as { fw: string }).fw}`);
  });
  const server = createServer(broker.handle);
  defer(() => void server.close());
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  const port = (server.address() as AddressInfo).port;
  const sim = await runSim({ devices: 1, protocol: 'mqtt', siteSecret: secret, mqttPort: port, intervalMs: 500, startJitterMs: 0, sleepMs: 20_000, awakeMs: 1000, log: testLogger('sim') });
  defer(() => sim.stop());
  const id = sim.ids()[0]!;
  let maxSleeping = 0;
  let sleptOnOld = false;
  for (let i = 0; i < 24 && !hellos.includes('2.0.0'); i++) {
    await new Promise((r) => setTimeout(r, 500));
    maxSleeping = Math.max(maxSleeping, sim.stats().sleeping);
    if (sim.device(id)?.state === 'sleeping' && sim.device(id)?.version === '1.0.0') sleptOnOld = true;
  }
  assert.deepEqual(hellos.slice(0, 2), ['1.0.0', '2.0.0'], 'booted into the image');
  assert.equal(sleptOnOld, false, 'no deep sleep between the verified image and the reboot into it');
  await new Promise((r) => setTimeout(r, 3000)); // asleep on 2.0.0 now
  maxSleeping = Math.max(maxSleeping, sim.stats().sleeping);
  assert.ok(maxSleeping <= 1, `sleeping ${maxSleeping} of 1 device`);
});
