import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { Agent, request as coapRequest } from 'coap';
import type { TelemetryBatch } from '../../core/messages.ts';
import { mcuKey, signMcuMessage } from '../../firmware-bridge/auth.ts';
import { coapAuthQuery, coapPath } from '../../firmware-bridge/coap.ts';
import { mcuTopic } from '../../firmware-bridge/topics.ts';
import { runSim } from '../../esp32-sim/sim.ts';
import { GatewayConfigSchema } from '../../gateway/config.ts';
import { McuRateLimit } from '../../gateway/rate-limit.ts';
import { testLogger, waitFor } from '../helpers.ts';
import { connectMcu, nextCounter, of, withEnv } from './env.ts';

test('rate limit (clock injected): a burst, then one message per 1/rate s; the wait names when the next token is free; MCUs apart; idle buckets swept; rate 0 is no limit', () => {
  let now = 1_000_000;
  const rl = new McuRateLimit(10, 3, () => now);
  assert.deepEqual([rl.take('a'), rl.take('a'), rl.take('a')], [0, 0, 0], 'the burst');
  assert.equal(rl.take('a'), 100, 'one token every 100 ms at 10/s');
  assert.equal(rl.take('b'), 0, 'another MCU has its own bucket');
  now += 50;
  assert.equal(rl.take('a'), 50, 'half a token so far: 50 ms to go; a refused take spends nothing');
  now += 50;
  assert.equal(rl.take('a'), 0);
  assert.equal(rl.take('a'), 100);
  now += 10_000;
  assert.deepEqual([rl.take('a'), rl.take('a'), rl.take('a'), rl.take('a')], [0, 0, 0, 100], 'refilled to the burst, not beyond');
  assert.equal(rl.size, 2);
  now += 60_000;
  rl.sweep();
  assert.equal(rl.size, 2, 'full but recently used: kept (no churn for MCUs that send every second)');
  now += 10 * 60_000;
  rl.sweep();
  assert.equal(rl.size, 0, 'idle for 10 minutes: forgotten');
  rl.take('y');
  now += 9.5 * 60_000;
  rl.sweep();
  assert.equal(rl.size, 1, 'not idle for 10 minutes yet');
  now += 40_000;
  rl.sweep();
  assert.equal(rl.size, 1, 'a sweep within a minute of the last does nothing');
  now += 30_000;
  rl.sweep();
  assert.equal(rl.size, 0);
  const off = new McuRateLimit(0, 1, () => now);
  for (let i = 0; i < 1000; i++) assert.equal(off.take('a'), 0);
  // a clock that goes back (the default is monotonic; an injected one may not be) stalls nobody
  assert.deepEqual([rl.take('c'), rl.take('c'), rl.take('c'), rl.take('c')], [0, 0, 0, 100]);
  now -= 3_600_000;
  assert.equal(rl.take('c'), 100, 'an hour back: still one token per 100 ms, not an hour');
  now += 100;
  assert.equal(rl.take('c'), 0);
  // the configured rate is bounded below, so no wait is longer than 10 s
  assert.equal(GatewayConfigSchema.safeParse({ deviceId: 'gw', mcu: { msgRate: 0.01 } }).success, false);
  assert.equal(GatewayConfigSchema.safeParse({ deviceId: 'gw', mcu: { msgRate: 0.1 } }).success, true);
});

test('rate limit (clock injected): a costly message (an upload, by its size) charges more tokens, into debt: the next message waits in proportion', () => {
  let now = 1_000_000;
  const rl = new McuRateLimit(10, 3, () => now);
  assert.equal(rl.take('a'), 0);
  rl.charge('a', 20); // 2 tokens left, 20 more charged: 18 in debt
  assert.equal(rl.take('a'), 1900, '19 tokens to earn at 10/s');
  now += 1900;
  assert.equal(rl.take('a'), 0);
  rl.charge('new', 5); // a first message that costs 5: from a full burst of 3
  assert.equal(rl.take('new'), 300);
  const off = new McuRateLimit(0, 3, () => now);
  off.charge('a', 100);
  assert.equal(off.take('a'), 0, 'rate 0: no limit');
});

test('rate limit over MQTT (mosquitto_pub -l as a runaway MCU): held back, not dropped — every reading reaches the hub, at about msgRate, and another MCU is served meanwhile', async () => {
  const RATE = 10;
  const BURST = 5;
  const N = 30;
  await withEnv(
    async ({ gw, site, seen }) => {
      const id = 'esp-flood';
      const lines = Array.from({ length: N }, (_, i) => JSON.stringify([{ n: 'seq', v: i + 1 }])).join('\n') + '\n';
      const started = Date.now();
      const pub = spawn('mosquitto_pub', ['-h', '127.0.0.1', '-p', String(gw.mqttPort), '-V', 'mqttv311', '-i', id, '-u', id, '-P', mcuKey(site, id), '-q', '1', '-t', mcuTopic(id, 't'), '-l'], { stdio: ['pipe', 'ignore', 'pipe'] });
      let stderr = '';
      pub.stderr.on('data', (c: Buffer) => (stderr += c.toString()));
      const exited = new Promise<number | null>((resolve) => pub.once('exit', resolve));
      let done = false;
      void exited.then(() => (done = true));
      pub.stdin.end(lines);

      await waitFor(() => gw.stats().throttled.mqtt > 0, 'the flooding MCU held back');
      // another MCU is not behind it: its reading is stored and acknowledged while the flood still waits
      const other = await connectMcu(gw.mqttPort, 'esp-calm', site);
      await other.publishAsync(mcuTopic('esp-calm', 't'), JSON.stringify([{ n: 'temp', v: 20 }]), { qos: 1 });
      const calmAckedDuringFlood = !done;
      other.end(true);

      assert.equal(await exited, 0, `mosquitto_pub: ${stderr}`);
      const elapsed = Date.now() - started;
      assert.ok(calmAckedDuringFlood, 'the other MCU was acknowledged before the flood was through');
      const values = () => of(seen, id, 'telemetry').flatMap((b) => (b as TelemetryBatch).samples.map((s) => s.v));
      await waitFor(() => values().length >= N, `${N} readings at the hub`);
      assert.deepEqual(values(), Array.from({ length: N }, (_, i) => i + 1), 'every reading, once, in order');
      // a lower bound only (a slower machine makes it longer): beyond the burst, one per 1/RATE s
      const floor = ((N - BURST - 1) / RATE) * 1000;
      assert.ok(elapsed >= floor * 0.9, `${N} readings took ${elapsed} ms; the limit allows them in no less than ~${floor} ms`);
      assert.equal(gw.stats().dropped.outbox_full ?? 0, 0);
      assert.match(gw.metrics.render(), /fleet_gateway_mcu_throttled_total\{protocol="mqtt"\} [1-9]/);
    },
    { msgRate: RATE, msgBurst: BURST },
  );
});

test('rate limit over MQTT, QoS 0 (mosquitto_pub -l -q 0, then DISCONNECT): what was received before the close is stored, also the part held back by the limit', async () => {
  await withEnv(
    async ({ gw, site, seen }) => {
      const id = 'esp-q0';
      const N = 10;
      const lines = Array.from({ length: N }, (_, i) => JSON.stringify([{ n: 'seq', v: i + 1 }])).join('\n') + '\n';
      const pub = spawn('mosquitto_pub', ['-h', '127.0.0.1', '-p', String(gw.mqttPort), '-V', 'mqttv311', '-i', id, '-u', id, '-P', mcuKey(site, id), '-q', '0', '-t', mcuTopic(id, 't'), '-l'], { stdio: ['pipe', 'ignore', 'inherit'] });
      const exited = new Promise<number | null>((resolve) => pub.once('exit', resolve));
      pub.stdin.end(lines);
      assert.equal(await exited, 0);
      const values = () => of(seen, id, 'telemetry').flatMap((b) => (b as TelemetryBatch).samples.map((s) => s.v));
      await waitFor(() => values().length >= N, `${N} readings at the hub`, 15_000).catch((err: Error) => {
        throw new Error(`${err.message}: got ${JSON.stringify(values())}, gateway ${JSON.stringify(gw.stats().dropped)}`);
      });
      assert.deepEqual(values(), Array.from({ length: N }, (_, i) => i + 1));
      assert.ok(gw.stats().throttled.mqtt > 0, 'the limit held some back');
    },
    { msgRate: 5, msgBurst: 2 },
  );
});

test('rate limit over MQTT, QoS 0 bursts each followed by a close (mosquitto_pub -l -q 0, three times in a row): they are stored at msgRate, not at once (the next connection waits for them) — connecting, flooding and closing gains nothing, and nothing is dropped', async () => {
  const RATE = 5;
  const BURST = 2;
  const CYCLES = 3;
  const PER = 10;
  const N = CYCLES * PER;
  await withEnv(
    async ({ gw, site, seen }) => {
      const id = 'esp-q0-loop';
      const values = () => of(seen, id, 'telemetry').flatMap((b) => (b as TelemetryBatch).samples.map((s) => s.v));
      const started = performance.now();
      for (let c = 0; c < CYCLES; c++) {
        const lines = Array.from({ length: PER }, (_, i) => JSON.stringify([{ n: 'seq', v: c * PER + i + 1 }])).join('\n') + '\n';
        const pub = spawn('mosquitto_pub', ['-h', '127.0.0.1', '-p', String(gw.mqttPort), '-V', 'mqttv311', '-i', id, '-u', id, '-P', mcuKey(site, id), '-q', '0', '-t', mcuTopic(id, 't'), '-l'], { stdio: ['pipe', 'ignore', 'inherit'] });
        const exited = new Promise<number | null>((resolve) => pub.once('exit', resolve));
        pub.stdin.end(lines);
        assert.equal(await exited, 0);
      }
      // the N QoS 0 readings reach the hub at the limit's pace, not at once. A lower bound only (a
      // slower machine makes it longer): N tokens need BURST + RATE·t ≥ N
      await waitFor(() => values().length >= N, `${N} readings at the hub`, 30_000);
      const elapsed = performance.now() - started;
      const floor = ((N - BURST) / RATE) * 1000;
      assert.ok(elapsed >= floor * 0.9, `${N} QoS 0 readings stored ${Math.round(elapsed)} ms after the first burst; the limit allows them in no less than ~${floor} ms`);
      // and a QoS 1 message on a new connection after them is acknowledged and stored too
      const next = await connectMcu(gw.mqttPort, id, site);
      try {
        await next.publishAsync(mcuTopic(id, 't'), JSON.stringify([{ n: 'seq', v: N + 1 }]), { qos: 1 });
      } finally {
        next.end(true);
      }
      await waitFor(() => values().length >= N + 1, `${N + 1} readings at the hub`, 15_000);
      assert.deepEqual(values(), Array.from({ length: N + 1 }, (_, i) => i + 1), 'every reading, once, in order: nothing dropped for the limit');
    },
    { msgRate: RATE, msgBurst: BURST },
  );
});

/** A signed CoAP POST of a reading with a given counter; the answer's code, diagnostic and Max-Age. */
function postReading(port: number, site: string, id: string, counter: number, payload: Buffer): Promise<{ code: string; body: string; maxAge: unknown }> {
  const mac = signMcuMessage(mcuKey(site, id), id, 't', counter, payload);
  return new Promise((resolve, reject) => {
    const req = coapRequest({ host: '127.0.0.1', port, method: 'POST', pathname: coapPath(id, 't'), query: coapAuthQuery(counter, mac), confirmable: true, agent: new Agent({ type: 'udp4' }) });
    req.setOption('Content-Format', 110);
    req.on('response', (res) => resolve({ code: res.code, body: res.payload.toString(), maxAge: res.headers['Max-Age'] }));
    req.on('error', reject);
    req.end(payload);
  });
}

test('rate limit over CoAP: past the burst a POST is answered 5.03 FLEET_MCU_RATE with Max-Age; the same message (same counter) sent again after it is stored once', async () => {
  await withEnv(
    async ({ gw, site, seen }) => {
      const id = 'esp-coap-fast';
      const body = (v: number) => Buffer.from(JSON.stringify([{ n: 'seq', v }]));
      for (const v of [1, 2]) assert.equal((await postReading(gw.coapPort, site, id, nextCounter(), body(v))).code, '2.04');
      const c3 = nextCounter();
      const refused = await postReading(gw.coapPort, site, id, c3, body(3));
      // one token every 4 s: the burst's two stored (each after an fsync) leave the third refused on a slow machine too
      assert.deepEqual({ ...refused, maxAge: undefined }, { code: '5.03', body: 'FLEET_MCU_RATE', maxAge: undefined });
      const maxAge = refused.maxAge as number;
      assert.ok(Number.isInteger(maxAge) && maxAge >= 1 && maxAge <= 4, `Max-Age ${String(refused.maxAge)}: the seconds until a token is free`);
      assert.equal(gw.stats().throttled.coap, 1);
      await new Promise((r) => setTimeout(r, maxAge * 1000 + 100));
      assert.equal((await postReading(gw.coapPort, site, id, c3, body(3))).code, '2.04', 'the refused message, same counter, after Max-Age');
      const values = () => of(seen, id, 'telemetry').flatMap((b) => (b as TelemetryBatch).samples.map((s) => s.v));
      await waitFor(() => values().length >= 3, 'three readings at the hub');
      await new Promise((r) => setTimeout(r, 200));
      assert.deepEqual(values(), [1, 2, 3]);
      assert.equal(gw.stats().dropped.replay ?? 0, 0, 'a throttled message does not spend its counter');
      assert.match(gw.metrics.render(), /fleet_gateway_mcu_throttled_total\{protocol="coap"\} 1/);
    },
    { msgRate: 0.25, msgBurst: 2 },
  );
});

test('rate limit with the CoAP simulator: devices sending faster than msgRate get 5.03 + Max-Age, keep their readings and send them again; no errors, every acknowledged reading at the hub', async () => {
  await withEnv(
    async ({ gw, site, seen }) => {
      const acked = new Set<string>();
      const sim = await runSim({ devices: 3, protocol: 'coap', siteSecret: site, coapPort: gw.coapPort, prefix: 'rl-sim-', intervalMs: 200, startJitterMs: 100, coapAckTimeoutMs: 500, log: testLogger('sim'), onAck: (id, seq) => acked.add(`${id}#${seq}`) });
      try {
        await waitFor(() => sim.stats().throttled >= 3 && sim.stats().sent >= 9, 'devices throttled and readings acknowledged', 20_000);
      } finally {
        await sim.stop();
      }
      const st = sim.stats();
      assert.equal(st.errors, 0, JSON.stringify(st));
      const ids = ['rl-sim-0001', 'rl-sim-0002', 'rl-sim-0003'];
      const atHub = () => new Set(ids.flatMap((id) => of(seen, id, 'telemetry').flatMap((b) => (b as TelemetryBatch).samples.filter((s) => s.n === 'seq').map((s) => `${id}#${String(s.v)}`))));
      await waitFor(() => {
        const hub = atHub();
        return [...acked].every((k) => hub.has(k));
      }, 'every acknowledged reading at the hub');
      assert.ok(gw.stats().throttled.coap >= 3);
    },
    { msgRate: 1, msgBurst: 1 },
  );
});
