import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createServer, type AddressInfo } from 'node:net';
import { Aedes } from 'aedes';
import { runSim } from '../../esp32-sim/sim.ts';
import { mcuKey } from '../../firmware-bridge/auth.ts';
import { encodeMcuCommand } from '../../firmware-bridge/frames.ts';
import { testLogger, waitFor } from '../helpers.ts';

/**
 * The simulated ESP32 keeps its MQTT connection alive when its period outgrows the keep-alive
 * it chose at CONNECT (set-interval), as esp-mqtt does from its own task. The peer is a plain
 * aedes broker on loopback (it closes a client silent for 1.5 keep-alives, as the gateway does);
 * the command is published by the test in the MCU wire format.
 */
test('sim MQTT: after set-interval beyond the keep-alive the device pings between readings: no broker-side disconnect, no early reading per reconnect; the period holds', async () => {
  const broker = await Aedes.createBroker();
  const server = createServer(broker.handle);
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  const port = (server.address() as AddressInfo).port;
  let disconnects = 0;
  broker.on('clientDisconnect', () => disconnects++);
  const secret = 'k'.repeat(43);
  const acked: number[] = [];
  const sim = await runSim({ devices: 1, protocol: 'mqtt', siteSecret: secret, mqttPort: port, intervalMs: 500, startJitterMs: 0, hello: false, mqttKeepaliveS: 2, log: testLogger('sim'), onAck: () => void acked.push(Date.now()) });
  try {
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
    assert.ok(after <= 2, `readings in 8 s at a 6 s period (one already due may come first): ${after} (${acked.length - before})`);
  } finally {
    await sim.stop();
    await new Promise<void>((r) => broker.close(() => r()));
    server.close();
  }
});
