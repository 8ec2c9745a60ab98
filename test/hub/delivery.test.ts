import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import mqtt, { type IClientOptions, type MqttClient } from 'mqtt';
import { encodeBatch, type BatchItem } from '../../core/batch.ts';
import { deriveToken } from '../../core/credentials.ts';
import { encodeMessage } from '../../core/messages.ts';
import { deviceTopic } from '../../core/topics.ts';
import { HubConfigSchema } from '../../hub/config.ts';
import { startHub, type HubHandle } from '../../hub/index.ts';
import { rng, stablePort, tempDir, testLogger, waitFor } from '../helpers.ts';
import { connect, connectDevice, event, logs, metric, patchStore, telemetry, withHub, type HubCtx } from './harness.ts';

/**
 * Delivery at a consumer subscribed at the hub: every message once, nothing lost. aedes 1.2
 * loses QoS 1 deliveries that reach a client out of brokerCounter order (hub/broker.ts,
 * fixDeliveryOrder); a durable subscriber and retained publishes are what reorder them.
 */

interface Consumer {
  client: MqttClient;
  /** `topic mid` → times seen */
  counts: Map<string, number>;
  /** `topic mid` in arrival order */
  order: string[];
  /** state messages seen, per topic */
  states: Map<string, number>;
}

async function consumer(ctx: HubCtx, id: string, filters: string[], extra: IClientOptions = {}): Promise<Consumer> {
  const client = await connect(ctx.url, id, 'operator', ctx.operator, extra);
  const counts = new Map<string, number>();
  const order: string[] = [];
  const states = new Map<string, number>();
  client.on('message', (topic, payload, packet) => {
    if (topic.endsWith('/state')) {
      if (!packet.retain) states.set(topic, (states.get(topic) ?? 0) + 1); // retained copies come on subscribe
      return;
    }
    if (topic.endsWith('/register')) return;
    const mid = (JSON.parse(payload.toString()) as { mid?: string }).mid ?? '?';
    const k = `${topic} ${mid}`;
    counts.set(k, (counts.get(k) ?? 0) + 1);
    order.push(k);
  });
  for (const f of filters) await client.subscribeAsync(f, { qos: 1 });
  return { client, counts, order, states };
}

type Channel = 'telemetry' | 'events' | 'logs';
const build = (device: string, channel: Channel, mid: string): BatchItem => ({
  topic: deviceTopic(device, channel),
  payload: channel === 'telemetry' ? telemetry(mid) : channel === 'events' ? event(mid) : logs(mid),
});
const key = (it: BatchItem) => `${it.topic} ${(JSON.parse(it.payload.toString()) as { mid: string }).mid}`;

/** One publish: a direct message, a batch, or the sender's retained state. */
type Publish = { kind: 'direct'; item: BatchItem } | { kind: 'batch'; items: BatchItem[] } | { kind: 'state' };

/**
 * A sender's traffic: `n` messages with mids 1..n spread over `targets` (a gateway numbers
 * all its MCUs' messages from one sequence), cut into publishes of 1–64 messages (1 goes
 * direct, more in a batch), about 10% of messages repeated (inside a later batch or sent
 * directly again, as after a lost PUBACK), and a retained state publish every 8 publishes.
 */
function plan(sender: string, targets: string[], n: number, rand: (n: number) => number): { publishes: Publish[]; unique: BatchItem[]; repeats: number } {
  const channels: Channel[] = ['telemetry', 'events', 'logs'];
  const unique = Array.from({ length: n }, (_, i) => build(targets[rand(targets.length)]!, channels[rand(3)]!, String(i + 1)));
  const publishes: Publish[] = [];
  let repeats = 0;
  for (let i = 0; i < n; ) {
    const size = rand(4) === 0 ? 1 : 1 + rand(64);
    const chunk = unique.slice(i, i + size);
    i += chunk.length;
    const extra: BatchItem[] = [];
    for (let j = 0; j < chunk.length; j++) {
      if (rand(10) !== 0) continue;
      // a repeat of a recent message (well inside the dedup window)
      const again = unique[Math.max(0, i - 1 - rand(Math.min(i, 200)))]!;
      repeats++;
      if (rand(2) === 0) extra.push(again);
      else publishes.push({ kind: 'direct', item: again });
    }
    const all = [...chunk, ...extra];
    publishes.push(all.length === 1 ? { kind: 'direct', item: all[0]! } : { kind: 'batch', items: all });
    if (publishes.length % 8 === 0) publishes.push({ kind: 'state' });
  }
  return { publishes, unique, repeats };
}

/** Send with up to `window` publishes awaiting their PUBACK, like the uplink. */
async function pump(c: MqttClient, sender: string, publishes: Publish[], window = 16): Promise<void> {
  const inflight = new Set<Promise<unknown>>();
  for (const p of publishes) {
    const sent =
      p.kind === 'direct'
        ? c.publishAsync(p.item.topic, p.item.payload, { qos: 1 })
        : p.kind === 'batch'
          ? c.publishAsync(deviceTopic(sender, 'batch'), encodeBatch(p.items), { qos: 1 })
          : c.publishAsync(deviceTopic(sender, 'state'), encodeMessage({ v: 1, online: true, kind: 'agent' as const, ts: Date.now() }), { qos: 1, retain: true });
    const tracked: Promise<unknown> = sent.finally(() => inflight.delete(tracked));
    inflight.add(tracked);
    if (inflight.size >= window) await Promise.race(inflight);
  }
  await Promise.all(inflight);
}

test('delivery: N messages in batches of mixed sizes with 10% repeats reach every consumer exactly once and in order (clean, durable, overlapping subscriptions)', async () => {
  await withHub(async (hub, ctx) => {
    const rand = rng(Number(process.env.FLEETLET_DELIVERY_SEED ?? 20240517));
    const senders = [
      { id: 'dev-a', targets: ['dev-a'] },
      { id: 'dev-b', targets: ['dev-b'] },
      { id: 'dev-c', targets: ['dev-c'] },
      { id: 'gw-1', targets: ['gw-1', 'esp-1', 'esp-2'] },
    ];
    const plans = senders.map((s) => ({ ...s, ...plan(s.id, s.targets, 700, rand) }));
    const expected = new Set(plans.flatMap((p) => p.unique.map(key)));
    const expectedStates = new Map(plans.map((p) => [deviceTopic(p.id, 'state'), p.publishes.filter((x) => x.kind === 'state').length]));
    const repeats = plans.reduce((a, p) => a + p.repeats, 0);

    const consumers = [
      await consumer(ctx, 'ops-clean', ['fleet/v1/#']),
      // a durable session: every publish now also goes through a LevelDB queue write
      await consumer(ctx, 'ops-durable', ['fleet/v1/#'], { clean: false }),
      // overlapping filters: MQTT allows a copy per subscription [MQTT-3.3.5-1]; the hub sends one
      await consumer(ctx, 'ops-overlap', ['fleet/v1/#', 'fleet/v1/d/+/telemetry']),
    ];
    const clients = await Promise.all(senders.map((s) => connectDevice(ctx, s.id)));
    const gw = clients[3]!;
    await gw.publishAsync(deviceTopic('gw-1', 'register'), encodeMessage({ v: 1, ts: Date.now(), mcus: ['esp-1', 'esp-2'] }), { qos: 1, retain: true });

    const t0 = performance.now();
    await Promise.all(plans.map((p, i) => pump(clients[i]!, p.id, p.publishes)));
    const sendMs = performance.now() - t0;

    // every sender's last word: when it has arrived everywhere, so has everything before it
    const sentinels = senders.map((s) => build(s.id, 'telemetry', '999999'));
    await Promise.all(sentinels.map((it, i) => clients[i]!.publishAsync(it.topic, it.payload, { qos: 1 })));
    for (const c of consumers) {
      // on a timeout the assertions below name what is missing
      await waitFor(() => sentinels.every((it) => c.counts.has(key(it))) && c.counts.size >= expected.size + sentinels.length, 'all messages', 20_000).catch(() => undefined);
    }

    for (const c of consumers) {
      const name = String(c.client.options.clientId);
      const missing = [...expected].filter((k) => !c.counts.has(k));
      const twice = [...c.counts].filter(([, n]) => n > 1).map(([k]) => k);
      assert.deepEqual(missing, [], `${name}: lost ${missing.length} of ${expected.size} messages`);
      assert.deepEqual(twice, [], `${name}: duplicates`);
      assert.equal(c.counts.size, expected.size + sentinels.length, `${name}: exactly N`);
      assert.deepEqual(c.states, expectedStates, `${name}: every retained state publish arrived once`);
      // and each sender's messages in the order it sent them (first copies; repeats were dropped)
      for (const p of plans) {
        const mine = new Set(p.unique.map(key));
        assert.deepEqual(c.order.filter((k) => mine.has(k)), firstOccurrences(p.publishes), `${name}: order of ${p.id}`);
      }
    }
    assert.equal(await metric(hub, 'fleet_hub_duplicates_total'), repeats);
    assert.equal(hub.registry.get('esp-1')?.telemetryBatches, plans[3]!.unique.filter((it) => it.topic === deviceTopic('esp-1', 'telemetry')).length);
    const batches = plans.reduce((a, p) => a + p.publishes.filter((x) => x.kind === 'batch').length, 0);
    assert.equal(await metric(hub, 'fleet_hub_batches_total'), batches);
    hubLog(`${expected.size} unique + ${repeats} repeats in ${batches} batches from ${senders.length} senders: sent in ${Math.round(sendMs)} ms`);

    await Promise.all([...clients, ...consumers.map((c) => c.client)].map((c) => c.endAsync()));
  });
});

test('delivery: retained messages interleaved with other traffic are not lost at a subscriber', async () => {
  // A retained publish reaches subscribers only after its LevelDB put, so traffic started
  // after it overtakes it; stock aedes 1.2 then drops it at every subscriber (all of them,
  // measured). Desired state (retained) and commands from the hub, started together, show it.
  await withHub(async (hub, ctx) => {
    const seen = { desired: 0, cmd: 0 };
    const ops = await connect(ctx.url, 'ops-clean', 'operator', ctx.operator);
    ops.on('message', (topic, _p, packet) => {
      if (topic.endsWith('/desired') && !packet.retain) seen.desired++;
      if (topic.endsWith('/cmd')) seen.cmd++;
    });
    await ops.subscribeAsync('fleet/v1/#', { qos: 1 });
    const devices = 100;
    const work: Array<Promise<unknown>> = [];
    for (let i = 0; i < devices; i++) {
      work.push(hub.setDesired(`dev-${i}`, { apps: { app: { version: `1.0.${i}` } } }));
      for (let j = 0; j < 3; j++) work.push(hub.sendCommand(`dev-${i}`, 'ping', {}, 60_000));
    }
    await Promise.all(work);
    await waitFor(() => seen.desired === devices && seen.cmd === devices * 3, 'every desired state and command', 20_000).catch(() => undefined);
    assert.deepEqual(seen, { desired: devices, cmd: devices * 3 });
    await ops.endAsync();
  });
});

test('delivery: retained publishes on one topic in quick succession (an MCU\'s states from its gateway) reach a subscriber in the order sent, and the last one sent is the one retained (the first put held 300 ms, injected)', async () => {
  // each retained publish waits for its LevelDB put, and puts run on several threads: two
  // puts to one key could finish, be delivered and even be stored in the other order. The
  // first put is held here, as a busy thread pool would
  let first = true;
  const restore = patchStore('storeRetained', (store) =>
    async function (this: unknown, ...args: unknown[]) {
      const packet = args[0] as { topic: string };
      if (first && packet.topic === deviceTopic('dev-r', 'state')) {
        first = false;
        await new Promise((r) => setTimeout(r, 300));
      }
      return store.apply(this, args);
    },
  );
  try {
    await withHub(async (_hub, ctx) => {
    const topic = deviceTopic('dev-r', 'state');
    const got: number[] = [];
    const ops = await connect(ctx.url, 'ops-retained-order', 'operator', ctx.operator);
    ops.on('message', (_t, p) => got.push((JSON.parse(p.toString()) as { ts: number }).ts));
    await ops.subscribeAsync(topic, { qos: 1 });
    const dev = await connectDevice(ctx, 'dev-r', { reconnectPeriod: 0 });
    const n = 300;
    const sent = Array.from({ length: n }, (_, i) => 1_000_000 + i);
    await Promise.all(sent.map((ts) => dev.publishAsync(topic, encodeMessage({ v: 1, online: true, kind: 'agent', ts }), { qos: 1, retain: true })));
    await waitFor(() => got.length >= n, `${n} states at the subscriber`, 20_000);
    assert.deepEqual(got, sent, 'in the order sent');
    // a new subscriber gets the retained one: the last sent
    const late = await connect(ctx.url, 'ops-retained-late', 'operator', ctx.operator);
    const retained = new Promise<number>((r) => late.once('message', (_t, p) => r((JSON.parse(p.toString()) as { ts: number }).ts)));
    await late.subscribeAsync(topic, { qos: 1 });
    assert.equal(await retained, sent.at(-1));
    await Promise.all([ops.endAsync(), dev.endAsync(), late.endAsync()]);
    });
  } finally {
    restore();
  }
});

test('delivery: a graceful hub restart in the middle of a flood — a durable consumer sees every message exactly once', async () => {
  const tmp = tempDir();
  const config = (mqttPort: number) => HubConfigSchema.parse({ mqttPort, httpPort: 0, stateDir: join(tmp.dir, 'hub') });
  // restarted on the same port: one no port-0 listener can take meanwhile
  let hub: HubHandle = await startHub(config(await stablePort()), testLogger('hub'));
  const clients: MqttClient[] = [];
  try {
    const url = `mqtt://127.0.0.1:${hub.mqttPort}`;
    const secret = readFileSync(hub.fleetSecretFile, 'utf8').trim();
    const seen = new Map<string, number>();
    const consumer = await connect(url, 'ops-durable', 'operator', readFileSync(hub.operatorTokenFile, 'utf8').trim(), { clean: false, reconnectPeriod: 100 });
    clients.push(consumer);
    consumer.on('message', (_t, p) => {
      const mid = (JSON.parse(p.toString()) as { mid: string }).mid;
      seen.set(mid, (seen.get(mid) ?? 0) + 1);
    });
    await consumer.subscribeAsync('fleet/v1/d/+/telemetry', { qos: 1 });
    // mqtt.js with a persistent session resends its unacknowledged publishes after a
    // reconnect: an at-least-once sender, like the uplink
    const dev = await connect(url, 'dev-1', 'dev-1', deriveToken(secret, 'device', 'dev-1'), { clean: false, reconnectPeriod: 100 });
    clients.push(dev);
    const n = 3000;
    const acked: Array<Promise<unknown>> = [];
    let restarted: Promise<void> = Promise.resolve();
    for (let i = 1; i <= n; i++) {
      acked.push(dev.publishAsync(deviceTopic('dev-1', 'telemetry'), telemetry(String(i)), { qos: 1 }));
      if (i % 20 === 0) await new Promise((r) => setImmediate(r)); // let the hub keep up a little
      if (i === n / 2) {
        const port = hub.mqttPort;
        restarted = (async () => {
          await hub.stop();
          hub = await startHub(config(port), testLogger('hub'));
        })();
        restarted.catch(() => undefined); // awaited below; not an unhandled rejection meanwhile
      }
    }
    await restarted;
    await Promise.all(acked);
    await waitFor(() => seen.size >= n, 'every message at the consumer', 20_000).catch(() => undefined);
    const lost = Array.from({ length: n }, (_, i) => String(i + 1)).filter((m) => !seen.has(m));
    const twice = [...seen].filter(([, c]) => c > 1).map(([m]) => m);
    assert.deepEqual(lost, [], `lost ${lost.length} of ${n}`);
    assert.deepEqual(twice, [], `${twice.length} duplicates at the consumer`);
  } finally {
    await Promise.all(clients.map((c) => c.endAsync(true)));
    await hub.stop().catch(() => undefined); // already stopped if the restart failed
    tmp.cleanup();
  }
});

/**
 * A durable consumer leaves three times during a flood from two devices and comes back at
 * once. Its queue is replayed on reconnect while live traffic goes on; the hub keeps the two
 * apart. Every message must arrive, and none the consumer acknowledged may come again.
 */
async function leaveDuringFlood(ctx: HubCtx): Promise<void> {
  const seen = new Map<string, number>();
  /** messages whose PUBACK the consumer actually wrote (mqtt.js 'packetsend'): only these must never come again */
  const acked = new Set<string>();
  const again: string[] = [];
  let leaving = false;
  const join = async () => {
    leaving = false;
    // handlers go on before the CONNACK: the replay may come in the same read as the CONNACK,
    // and mqtt.js handles (and acknowledges) it before a promise for the connection resolves
    const c = mqtt.connect(ctx.url, { clientId: 'ops-durable', username: 'operator', password: ctx.operator, clean: false, reconnectPeriod: 0, connectTimeout: 5000 });
    // Once it has sent DISCONNECT a client must send nothing more [MQTT-3.14.4-2]. mqtt.js
    // still acknowledges what arrives after end(): that write fails ("write after end"), the
    // socket is destroyed, and the hub's copy of the connection goes with the PUBACKs it had
    // received and not read yet. Those messages are then sent again, rightly, though the
    // consumer had written their PUBACKs. So while leaving it acknowledges nothing (an error
    // from handleMessage skips the PUBACK), and end() returns when the hub has closed.
    c.handleMessage = (_packet, done) => (leaving ? done(new Error('leaving: no PUBACK after DISCONNECT')) : done());
    // packet id → message, on this connection (ids are per connection)
    const byPid = new Map<number, string>();
    c.on('message', (topic, p, packet) => {
      const k = `${topic} ${(JSON.parse(p.toString()) as { mid: string }).mid}`;
      seen.set(k, (seen.get(k) ?? 0) + 1);
      if (acked.has(k)) again.push(k); // it came back after the consumer acknowledged it
      if (packet.messageId !== undefined) byPid.set(packet.messageId, k);
    });
    c.on('packetsend', (packet) => {
      if (packet.cmd !== 'puback') return;
      const k = byPid.get(packet.messageId!);
      if (k !== undefined) acked.add(k);
    });
    await new Promise<void>((resolve, reject) => {
      c.once('connect', () => resolve());
      c.once('error', reject);
    });
    c.on('error', () => undefined);
    await c.subscribeAsync('fleet/v1/d/+/telemetry', { qos: 1 });
    return c;
  };
  let ops = await join();
  const devs = await Promise.all(['dev-a', 'dev-b'].map((id) => connectDevice(ctx, id)));
  const n = 1500;
  const flood = Promise.all(
    devs.map(async (dev, d) => {
      const topic = deviceTopic(d === 0 ? 'dev-a' : 'dev-b', 'telemetry');
      const inflight = new Set<Promise<unknown>>();
      for (let i = 1; i <= n; i++) {
        const t: Promise<unknown> = dev.publishAsync(topic, telemetry(String(i)), { qos: 1 }).finally(() => inflight.delete(t));
        inflight.add(t);
        if (inflight.size >= 16) await Promise.race(inflight);
      }
      await Promise.all(inflight);
    }),
  );
  for (let round = 0; round < 3; round++) {
    await waitFor(() => seen.size >= (round + 1) * 500, `traffic before leave #${round}`);
    leaving = true;
    await ops.endAsync(); // a DISCONNECT: the session and its queue stay
    await new Promise((r) => setTimeout(r, 50)); // away for a moment: the queue fills
    ops = await join();
  }
  await flood;
  await waitFor(() => seen.size >= 2 * n, 'every message', 20_000).catch(() => undefined);
  assert.equal(seen.size, 2 * n, 'none lost');
  // what it saw while leaving is sent again on the last connection, maybe after the last
  // new message arrived (that replay first waits for the clears of the connection before)
  await waitFor(() => acked.size >= 2 * n, 'every message acknowledged', 20_000).catch(() => undefined);
  assert.equal(acked.size, 2 * n, `the consumer acknowledged ${acked.size} of ${2 * n}`);
  // a message the consumer received but did not acknowledge before it left is delivered
  // again, as QoS 1 requires [MQTT-4.4.0-1]; one it acknowledged must not be
  assert.deepEqual(again, [], `${again.length} duplicates of acknowledged messages`);
  await Promise.all([...devs, ops].map((c) => c.endAsync()));
}

test('delivery: a durable consumer that leaves and comes back during a flood gets every message, and again only what it did not acknowledge', async () => {
  await withHub(async (_hub, ctx) => leaveDuringFlood(ctx));
});

test('delivery: the same with a slow store (each queue delete held 150 ms, injected): a reconnect waits for the acknowledgements of the connection before', async () => {
  // aedes clears an acknowledged delivery (a LevelDB get and delete) without waiting for it
  // before the DISCONNECT closes the connection. Without the wait in ReplayGate the next
  // connection's replay read a queue with those clears still under way: acknowledged
  // messages came again, and the traffic stalled (hub/delivery-order.ts).
  let slowed = 0;
  const restore = patchStore('outgoingClearMessageId', (clear) =>
    async function (this: unknown, ...args: unknown[]) {
      // PUBACKs only: a refused live copy's clear has no messageId (and finds nothing)
      if ((args[1] as { messageId?: number }).messageId !== undefined) {
        slowed++;
        await new Promise((r) => setTimeout(r, 150));
      }
      return clear.apply(this, args);
    },
  );
  try {
    await withHub(async (_hub, ctx) => leaveDuringFlood(ctx));
    assert.ok(slowed >= 3000, `the store's deletes of acknowledged deliveries were slowed (${slowed})`);
  } finally {
    restore();
  }
});

test('delivery: a clean session discards the queue a durable session of its client id left [MQTT-3.1.2-6]; the next durable session does not get it', async () => {
  await withHub(async (_hub, ctx) => {
    const id = 'ops-switch';
    const durable = await connect(ctx.url, id, 'operator', ctx.operator, { clean: false });
    await durable.subscribeAsync('fleet/v1/d/+/telemetry', { qos: 1 });
    await durable.endAsync();
    const dev = await connectDevice(ctx, 'dev-1');
    for (const mid of ['1', '2', '3']) await dev.publishAsync(deviceTopic('dev-1', 'telemetry'), telemetry(mid), { qos: 1 });
    // queued for the durable session; a clean session of the same id throws it away
    const clean = await connect(ctx.url, id, 'operator', ctx.operator, { clean: true });
    const atClean: string[] = [];
    clean.on('message', (_t, p) => atClean.push((JSON.parse(p.toString()) as { mid: string }).mid));
    await new Promise((r) => setTimeout(r, 300));
    await clean.endAsync();
    const again = await connect(ctx.url, id, 'operator', ctx.operator, { clean: false });
    const mids: string[] = [];
    again.on('message', (_t, p) => mids.push((JSON.parse(p.toString()) as { mid: string }).mid));
    await again.subscribeAsync('fleet/v1/d/+/telemetry', { qos: 1 });
    await dev.publishAsync(deviceTopic('dev-1', 'telemetry'), telemetry('4'), { qos: 1 });
    await waitFor(() => mids.includes('4'), 'the new message');
    await new Promise((r) => setTimeout(r, 200));
    assert.deepEqual(atClean, [], 'a clean session is not sent the old queue');
    assert.deepEqual(mids, ['4'], 'the old queue is gone');
    await Promise.all([dev, again].map((c) => c.endAsync()));
  });
});

test('delivery: a durable consumer on "#" gets nothing from the hub’s $fleetlet sinks, also when its queue is replayed', async () => {
  await withHub(async (_hub, ctx) => {
    let ops = await consumer(ctx, 'ops-durable', ['#'], { clean: false });
    await ops.client.endAsync();
    const dev = await connectDevice(ctx, 'dev-1');
    // refused, duplicate and batch publishes all end in $fleetlet/… while ops is away
    await dev.publishAsync(deviceTopic('dev-2', 'telemetry'), telemetry('1'), { qos: 1 });
    await dev.publishAsync(deviceTopic('dev-1', 'telemetry'), telemetry('2'), { qos: 1 });
    await dev.publishAsync(deviceTopic('dev-1', 'telemetry'), telemetry('2'), { qos: 1 });
    await dev.publishAsync(deviceTopic('dev-1', 'batch'), encodeBatch([build('dev-1', 'events', '3')]), { qos: 1 });
    await dev.endAsync();

    const topics: string[] = [];
    const client = await connect(ctx.url, 'ops-durable', 'operator', ctx.operator, { clean: false });
    client.on('message', (topic) => topics.push(topic));
    // the queued messages are replayed after the CONNACK: wait for the last one queued
    await waitFor(() => topics.includes(deviceTopic('dev-1', 'events')), 'replayed queue');
    assert.deepEqual(topics.filter((t) => !t.endsWith('/state')), [deviceTopic('dev-1', 'telemetry'), deviceTopic('dev-1', 'events')]);
    ops = { ...ops, client };
    await ops.client.endAsync();
  });
});

function firstOccurrences(publishes: Publish[]): string[] {
  const seen = new Set<string>();
  for (const p of publishes) for (const it of p.kind === 'direct' ? [p.item] : p.kind === 'batch' ? p.items : []) seen.add(key(it));
  return [...seen];
}

function hubLog(msg: string): void {
  if (process.env.FLEETLET_TEST_LOG === '1') process.stderr.write(`${msg}\n`);
}

test('delivery: a durable consumer back with unacknowledged messages queued gets new deliveries under other packet ids than those [MQTT-2.3.1-2]; each PUBACK clears its own message (new connection forced to start at a queued id)', async () => {
  await withHub(async (hub, ctx) => {
    const opts = { clientId: 'ops-ids', username: 'operator', password: ctx.operator, clean: false, reconnectPeriod: 0 } as const;
    // 1. five deliveries the consumer does not acknowledge, then it leaves: queued with their ids
    const first = mqtt.connect(ctx.url, opts);
    first.handleMessage = (_p, done) => done(new Error('not acknowledging'));
    first.on('error', () => undefined);
    const queuedIds: number[] = [];
    first.on('message', (_t, _p, packet) => queuedIds.push(packet.messageId!));
    await new Promise<void>((r) => first.once('connect', () => r()));
    await first.subscribeAsync('fleet/v1/d/+/telemetry', { qos: 1 });
    const dev = await connectDevice(ctx, 'dev-ids');
    for (let i = 1; i <= 5; i++) await dev.publishAsync(deviceTopic('dev-ids', 'telemetry'), telemetry(String(i)), { qos: 1 });
    await waitFor(() => queuedIds.length === 5, 'five deliveries');
    await first.endAsync();
    await waitFor(() => hub.broker.ids.inUse('ops-ids') === 5, 'the five ids held by the queue');

    // 2. back, on a connection whose own id counter starts at the first queued id (aedes
    // draws it from Math.random in its Client constructor), still acknowledging nothing: the
    // five replayed messages keep their ids, and five live ones must get others (without the
    // guard the first live one took the first queued id while its message still held it)
    const start = Math.min(...queuedIds);
    const random = Math.random;
    const inFlight = new Map<number, string>();
    const clash: string[] = [];
    const back = mqtt.connect(ctx.url, opts);
    back.handleMessage = (_p, done) => done(new Error('not acknowledging'));
    back.on('error', () => undefined);
    back.on('message', (_t, p, packet) => {
      const k = (JSON.parse(p.toString()) as { mid: string }).mid;
      const id = packet.messageId!;
      if (inFlight.has(id) && inFlight.get(id) !== k) clash.push(`id ${id}: ${inFlight.get(id)} and ${k}`);
      inFlight.set(id, k);
    });
    Math.random = () => (start - 0.5) / 65535;
    try {
      await new Promise<void>((r) => back.once('connect', () => r()));
    } finally {
      Math.random = random;
    }
    for (let i = 6; i <= 10; i++) await dev.publishAsync(deviceTopic('dev-ids', 'telemetry'), telemetry(String(i)), { qos: 1 });
    await waitFor(() => new Set(inFlight.values()).size === 10, `ten messages in flight (${[...inFlight.values()].join(',')})`);
    assert.deepEqual(clash, [], 'no packet id given to two unacknowledged messages');
    assert.equal(inFlight.size, 10, 'ten distinct packet ids');
    await back.endAsync();
    // 3. back once more, acknowledging: each of the ten comes once and its PUBACK clears it
    const seen: string[] = [];
    const third = mqtt.connect(ctx.url, opts);
    third.on('message', (_t, p) => seen.push((JSON.parse(p.toString()) as { mid: string }).mid));
    await new Promise<void>((r) => third.once('connect', () => r()));
    await waitFor(() => seen.length >= 10, `the ten again (${seen.join(',')})`);
    await waitFor(() => hub.broker.ids.inUse('ops-ids') === 0, 'every queued id cleared by its PUBACK');
    assert.deepEqual([...seen].sort((a, b) => Number(a) - Number(b)), ['1', '2', '3', '4', '5', '6', '7', '8', '9', '10']);
    await third.endAsync();
    const fourth = await mqtt.connectAsync(ctx.url, opts);
    const again: string[] = [];
    fourth.on('message', (_t, p) => again.push((JSON.parse(p.toString()) as { mid: string }).mid));
    await new Promise((r) => setTimeout(r, 300));
    assert.deepEqual(again, [], 'nothing acknowledged comes again');
    await fourth.endAsync();
    await dev.endAsync();
  });
});
