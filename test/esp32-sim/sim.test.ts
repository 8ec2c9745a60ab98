import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { isFleetError } from '../../core/errors.ts';
import { runSim, type SimCommand, type SimHandle, type SimProtocol } from '../../esp32-sim/sim.ts';
import { tempDir, testLogger, waitFor } from '../helpers.ts';
import { Consumer, Stack } from './harness.ts';

/**
 * The simulator against a real hub and gateway (child processes from source, real
 * sockets on loopback), a few dozen devices with fast intervals. One hub and gateway
 * serve every test in this file; each test uses its own device ids.
 */
let tmp: ReturnType<typeof tempDir>;
let stack: Stack;
let consumer: Consumer;
const sims: SimHandle[] = [];

before(async () => {
  tmp = tempDir('fleetlet-sim-');
  stack = new Stack(tmp.dir, 'gw-sim');
  await stack.startHub();
  await stack.startGateway();
  consumer = await Consumer.connect(stack, 'sim-test-consumer');
});

after(async () => {
  for (const s of sims) await s.stop().catch(() => undefined);
  await consumer?.close().catch(() => undefined);
  await stack?.stop();
  tmp?.cleanup();
});

async function sim(opts: Omit<Parameters<typeof runSim>[0], 'siteSecret'>): Promise<SimHandle> {
  const s = await runSim({ siteSecret: stack.siteSecret, mqttPort: stack.gw.ready.mqttPort, coapPort: stack.gw.ready.coapPort, coapAckTimeoutMs: 500, log: testLogger('sim'), ...opts });
  sims.push(s);
  return s;
}

const ids = (prefix: string, n: number) => Array.from({ length: n }, (_, i) => `${prefix}${String(i + 1).padStart(4, '0')}`);

for (const protocol of ['mqtt', 'coap'] as const satisfies readonly SimProtocol[]) {
  test(`sim ${protocol}: 20 ESP32s boot with a version report, then their telemetry reaches the hub through the gateway`, async () => {
    const N = 20;
    const s = await sim({ devices: N, protocol, prefix: `tel-${protocol}-`, intervalMs: 250, startJitterMs: 300, firmwareVersion: '2.1.0' });
    const list = ids(`tel-${protocol}-`, N);
    await waitFor(() => list.every((id) => consumer.readingsOf(id) >= 3), 'three readings from every device at the hub consumer', 20_000);
    // a correctness check, not a speed one: 20 s is generous for a loaded 2-core machine; on
    // failure it names the devices still without the version and what the hub has for them
    await waitFor(() => list.every((id) => consumer.lastState(id)?.version === '2.1.0'), 'the reported version in every device state at the hub', 20_000).catch((err: Error) => {
      const missing = list.filter((id) => consumer.lastState(id)?.version !== '2.1.0').map((id) => ({ id, state: consumer.lastState(id), sim: s.device(id) }));
      throw new Error(`${err.message}: ${JSON.stringify(missing).slice(0, 3000)}; sim ${JSON.stringify(s.stats())}`);
    });
    for (const id of list) {
      const st = consumer.lastState(id)!;
      assert.equal(st.online, true, id);
      assert.equal(st.kind, 'mcu', id);
      assert.equal(st.via, 'gw-sim', id);
      assert.equal((st.mcu as { boot?: string } | undefined)?.boot, 'power_on', id);
      // readings carry their id; sample times are the device's clock
      assert.ok(consumer.seen.has(`${id}#1`), `${id} reading 1`);
    }
    // a reading can reach the hub before its device has the gateway's ack (the gateway shows
    // a record to its uplink before the outbox's fsync, and acks the device after it), so
    // the sim's count of acknowledged readings may trail the hub's by a sync interval
    await waitFor(() => s.stats().sent >= 3 * N, `${3 * N} readings acknowledged to the devices`, 20_000);
    const st = s.stats();
    assert.equal(st.errors, 0, JSON.stringify(st));
    assert.equal(st.hellos, N, JSON.stringify(st));
    assert.equal(st.boots, N, JSON.stringify(st));
    assert.equal(st.badCommands, 0, JSON.stringify(st));
    await s.stop();
    assert.equal(s.stats().connected, 0);
  });
}

test('sim: SenML CBOR and compact binary telemetry over MQTT and CoAP reach the hub with the same readings', async () => {
  const runs = [];
  for (const protocol of ['mqtt', 'coap'] as const) {
    for (const format of ['senml+cbor', 'compact'] as const) {
      const prefix = `fmt-${protocol}-${format === 'compact' ? 'bin' : 'cbor'}-`;
      runs.push({ prefix, sim: await sim({ devices: 3, protocol, prefix, format, intervalMs: 250, startJitterMs: 200 }) });
    }
  }
  for (const { prefix, sim: s } of runs) {
    await waitFor(() => ids(prefix, 3).every((id) => consumer.readingsOf(id) >= 3), `readings from ${prefix}*`, 15_000);
    assert.equal(s.stats().errors, 0, `${prefix}: ${JSON.stringify(s.stats())}`);
    await s.stop();
  }
});

test('sim: flaky links (5% loss, 20±20 ms latency) — devices drop and resend, and every acknowledged reading still reaches the hub', async () => {
  const acked = new Set<string>();
  const onAck = (id: string, seq: number) => acked.add(`${id}#${seq}`);
  const runs = [
    await sim({ devices: 10, protocol: 'mqtt', prefix: 'flaky-m-', intervalMs: 200, startJitterMs: 200, loss: 0.05, latencyMs: 20, latencyJitterMs: 20, onAck }),
    await sim({ devices: 10, protocol: 'coap', prefix: 'flaky-c-', intervalMs: 200, startJitterMs: 200, loss: 0.05, latencyMs: 20, latencyJitterMs: 20, coapAckTimeoutMs: 200, onAck }),
  ];
  await waitFor(() => runs.every((s) => s.stats().linkDrops >= 5 && s.stats().sent >= 100), 'link faults injected and readings acknowledged', 30_000);
  for (const s of runs) await s.stop();
  await consumer.waitAll(acked, 'every acknowledged reading at the hub', 30_000);
  const [m, c] = runs.map((s) => s.stats()) as [ReturnType<SimHandle['stats']>, ReturnType<SimHandle['stats']>];
  assert.ok(m.resent > 0 && m.connects > 10, `MQTT devices reconnected and resent: ${JSON.stringify(m)}`);
  assert.ok(c.linkDrops > 0, `CoAP datagrams were lost: ${JSON.stringify(c)}`);
});

test('sim: deep sleep — devices that declare their sleep stay online (sleeping, not lost) across sleep cycles; undeclared ones go offline while asleep', async () => {
  const N = 6;
  const declared = [
    await sim({ devices: N, protocol: 'mqtt', prefix: 'nap-m-', intervalMs: 200, startJitterMs: 200, sleepMs: 2500, awakeMs: 700 }),
    await sim({ devices: N, protocol: 'coap', prefix: 'nap-c-', intervalMs: 200, startJitterMs: 200, sleepMs: 2500, awakeMs: 700 }),
  ];
  // the same devices without a version report: the gateway cannot know they sleep
  const control = await sim({ devices: N, protocol: 'mqtt', prefix: 'nap-x-', intervalMs: 200, startJitterMs: 200, sleepMs: 2500, awakeMs: 700, hello: false });
  const napping = [...ids('nap-m-', N), ...ids('nap-c-', N)];
  // three full cycles
  await waitFor(() => declared.every((s) => s.stats().boots >= 3 * N) && control.stats().boots >= 3 * N, 'three wake-ups per device', 30_000);
  await waitFor(() => napping.every((id) => consumer.readingsOf(id) >= 6), 'readings from every wake', 10_000);
  for (const s of [...declared, control]) {
    const st = s.stats();
    assert.equal(st.errors, 0, JSON.stringify(st));
    assert.ok(st.sleeping >= 0 && st.sleeping <= N);
  }
  for (const id of napping) {
    const states = consumer.states.get(id) ?? [];
    const firstOnline = states.findIndex((m) => m.online === true);
    assert.ok(firstOnline >= 0, `${id} came online`);
    const offline = states.slice(firstOnline).filter((m) => m.online === false);
    assert.deepEqual(offline, [], `${id} was never reported offline while sleeping`);
    const last = consumer.lastState(id)!;
    assert.equal((last.mcu as { sleepS?: number } | undefined)?.sleepS, 3, `${id} declared sleep at the hub`);
  }
  const lost = ids('nap-x-', N).filter((id) => (consumer.states.get(id) ?? []).some((m) => m.online === false));
  assert.ok(lost.length >= N / 2, `undeclared sleepers reported offline while asleep: ${lost.length} of ${N}`);
  for (const s of [...declared, control]) await s.stop();
});

for (const protocol of ['mqtt', 'coap'] as const satisfies readonly SimProtocol[]) {
  test(`sim ${protocol}: command round trip through the mailbox — run once, acked, replied at the hub; a sleeping device gets its command when it wakes`, async () => {
    const ran: Array<[string, SimCommand]> = [];
    const onCommand = (id: string, cmd: SimCommand) => ran.push([id, cmd]);
    const awake = await sim({ devices: 3, protocol, prefix: `cmd-${protocol}-`, intervalMs: 300, startJitterMs: 200, onCommand });
    const sleeper = await sim({ devices: 1, protocol, prefix: `cmdz-${protocol}-`, intervalMs: 200, startJitterMs: 100, sleepMs: 3000, awakeMs: 600, onCommand });
    const [a1, a2, a3] = ids(`cmd-${protocol}-`, 3) as [string, string, string];
    const z1 = `cmdz-${protocol}-0001`;
    await waitFor(() => [a1, a2, a3, z1].every((id) => consumer.lastState(id)?.online === true), 'devices online at the hub', 15_000);

    const send = async (id: string, name: string, args: Record<string, unknown>) => {
      const r = await stack.api<{ id: string }>('POST', `/api/v1/devices/${id}/commands`, { name, args, ttlMs: 60_000 });
      assert.equal(r.status, 202, JSON.stringify(r.body));
      return r.body.id;
    };
    const replyTo = (id: string, cmdId: string) => consumer.replies.get(id)?.find((r) => r.id === cmdId);

    const c1 = await send(a1, 'set-interval', { s: 0.5 });
    const c2 = await send(a2, 'echo', { hello: 'world' });
    const c3 = await send(a3, 'self-destruct', {});
    await waitFor(() => replyTo(a1, c1) && replyTo(a2, c2) && replyTo(a3, c3), 'three replies at the hub', 20_000);
    assert.equal(replyTo(a1, c1)!.ok, true);
    assert.deepEqual(replyTo(a1, c1)!.result, { interval: 0.5 });
    assert.equal(awake.device(a1)!.intervalMs, 500);
    assert.equal(replyTo(a2, c2)!.ok, true);
    assert.deepEqual((replyTo(a2, c2)!.result as { a: unknown }).a, { hello: 'world' });
    assert.equal(replyTo(a3, c3)!.ok, false);
    assert.equal(replyTo(a3, c3)!.error?.code, 'UNKNOWN');

    // the sleeper: a command sent while it sleeps waits in the mailbox for its next wake
    await waitFor(() => sleeper.device(z1)!.state === 'sleeping', 'the sleeper asleep', 10_000);
    const bootsBefore = sleeper.stats().boots;
    const c4 = await send(z1, 'echo', { n: 4 });
    await waitFor(() => replyTo(z1, c4), 'the sleeper replied after waking', 20_000);
    assert.ok(sleeper.stats().boots > bootsBefore, 'it woke up first');
    assert.equal(replyTo(z1, c4)!.ok, true);

    // every command ran exactly once
    const names = ran.map(([id, c]) => `${id}:${c.n}`).sort();
    assert.deepEqual(names, [`${a1}:set-interval`, `${a2}:echo`, `${a3}:self-destruct`, `${z1}:echo`].sort());
    for (const s of [awake, sleeper]) {
      assert.equal(s.stats().badCommands, 0);
      await s.stop();
    }
  });
}

test('sim: options are validated with FLEET_CONFIG_INVALID naming the option', async () => {
  for (const [opts, key] of [
    [{ devices: 0 }, 'devices'],
    [{ devices: 1, protocol: 'http' }, 'protocol'],
    [{ devices: 1, intervalMs: 1 }, 'intervalMs'],
    [{ devices: 1, prefix: 'bad/' }, 'prefix'],
    [{ devices: 1, loss: 1 }, 'loss'],
    [{ devices: 1, protocol: 'coap', fwChunkBytes: 100 }, 'fwChunkBytes'],
    [{ devices: 1, format: 'xml' }, 'format'],
  ] as const) {
    await assert.rejects(
      runSim({ protocol: 'mqtt', siteSecret: 'x'.repeat(32), ...opts } as Parameters<typeof runSim>[0]),
      (err: unknown) => isFleetError(err, 'FLEET_CONFIG_INVALID') && err.message.includes(key),
      key,
    );
  }
});
