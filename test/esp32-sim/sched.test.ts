import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createServer } from 'node:net';
import { Aedes } from 'aedes';
import mqtt from 'mqtt';
import { decodeSenmlJson } from '../../firmware-bridge/senml.ts';
import { Scheduler } from '../../esp32-sim/sched.ts';
import { runSim } from '../../esp32-sim/sim.ts';
import { cleanups, testLogger, waitFor } from '../helpers.ts';

test('sched: 5,000 entries with many equal due times run in (due time, insertion) order, each with its own argument and tag, also when entries are added while it runs', async (t) => {
  const defer = cleanups(t);
  const s = new Scheduler({ maxPerTurn: 700 });
  defer(() => s.stop());
  const now = Date.now();
  // a fixed pseudo-random sequence, so a failure is reproducible
  let x = 42;
  const rnd = (n: number) => (x = (x * 1103515245 + 12345) % 2 ** 31) % n;
  const want: Array<{ at: number; k: number }> = [];
  const ran: number[] = [];
  let k = 0;
  let wrongTag = 0;
  const run = (id: number, _now: number, tag: number) => {
    ran.push(id);
    if (tag !== id * 2 + 0.5) wrongTag++;
  };
  // all due already (so the test never waits on the clock), 60 distinct times: many ties
  for (let i = 0; i < 5000; i++) {
    const at = now - 1000 + rnd(60) + (rnd(4) === 0 ? 0.5 : 0);
    want.push({ at, k });
    s.at(at, run, k, k * 2 + 0.5);
    k++;
  }
  // entries added from inside a callback join the order by their own due time and insertion
  s.at(now - 2000, () => {
    for (let i = 0; i < 50; i++) {
      const at = now - 1000 + rnd(60);
      want.push({ at, k });
      s.at(at, run, k, k * 2 + 0.5);
      k++;
    }
  }, null);
  await waitFor(() => ran.length === 5050, 'every entry ran', 5000, 5);
  assert.equal(s.size, 0);
  assert.deepEqual(ran, [...want].sort((a, b) => a.at - b.at || a.k - b.k).map((e) => e.k));
  assert.equal(wrongTag, 0, 'every entry got its own tag');
  s.stop();
});

test('sched: entries due later wait for their time; stop() drops what is left and releases it', async (t) => {
  const defer = cleanups(t);
  const s = new Scheduler();
  defer(() => s.stop()); // its entry due in 60 s would hold the file that long
  const now = Date.now();
  const ran: number[] = [];
  for (let i = 0; i < 3000; i++) s.at(now + 30 + (i % 7) * 10, (v: number) => ran.push(v), i);
  s.at(now + 60_000, () => ran.push(-1), null);
  await waitFor(() => ran.length === 3000, '3,000 entries', 5000, 5);
  assert.equal(s.size, 1);
  assert.ok(s.lag().ran >= 3000);
  s.stop();
  assert.equal(s.size, 0);
  s.at(now, () => ran.push(-2), null); // stopped: ignored
  await new Promise((r) => setTimeout(r, 30));
  assert.ok(!ran.includes(-1) && !ran.includes(-2));
});

test('sim mqtt against a plain aedes broker: every device sends once per interval (±5%: never faster than its schedule, nor slower without skipped readings), its seqs 1..n without gaps, boots spread over the start jitter, and each payload carries its seq and sample time', { timeout: 60_000 }, async (t) => {
  const defer = cleanups(t);
  const broker = await Aedes.createBroker();
  const closeBroker = () => new Promise<void>((r) => broker.close(() => r()));
  defer(closeBroker);
  const server = createServer(broker.handle);
  // the broker first (a second close() calls back at once): it ends the connections server.close() waits for
  defer(async () => {
    await closeBroker();
    await new Promise<void>((r) => server.close(() => r()));
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  const port = (server.address() as import('node:net').AddressInfo).port;
  const sub = await mqtt.connectAsync(`mqtt://127.0.0.1:${port}`, { clientId: 'sched-test-sub', reconnectPeriod: 0 });
  defer(() => sub.endAsync(true));
  const N = 150;
  const intervalMs = 300;
  const acked = new Map<string, Array<{ seq: number; t: number }>>();
  const seen = new Map<string, { seq: number; t: number }>();
  let bad = 0;
  sub.on('message', (topic, payload) => {
    try {
      const samples = decodeSenmlJson(payload);
      const seq = samples.find((x) => x.n === 'seq');
      if (!seq || samples.length !== 5 || samples.some((x) => x.t !== seq.t)) bad++;
      else seen.set(`${topic.split('/')[2]}/${seq.v}`, { seq: seq.v!, t: seq.t });
    } catch {
      bad++;
    }
  });
  await sub.subscribeAsync('mcu/v1/+/t', { qos: 1 });
  const sim = await runSim({
    devices: N,
    protocol: 'mqtt',
    siteSecret: 'sched-test-site-secret',
    mqttPort: port,
    prefix: 'sched-',
    intervalMs,
    startJitterMs: 600,
    mailbox: false,
    log: testLogger('sim'),
    onAck: (id, seq, t) => {
      let a = acked.get(id);
      if (!a) acked.set(id, (a = []));
      a.push({ seq, t });
    },
  });
  defer(() => sim.stop()); // stopped in the test already (a second stop() returns at once)
  const t0 = Date.now();
  await waitFor(() => acked.size === N && [...acked.values()].every((a) => a.length >= 8), 'every device acked 8 readings', 30_000, 50);
  const elapsed = Date.now() - t0;
  // how late the sim's scheduler ran entries (since the start: lag() was not called before)
  const lateMs = sim.lag().maxMs;
  await sim.stop();
  await waitFor(() => [...acked].every(([id, a]) => a.every((r) => seen.has(`${id}/${r.seq}`))), 'every acked reading at the subscriber', 10_000, 50);
  assert.equal(bad, 0, 'every payload is a 5-record SenML pack with one sample time');
  const firsts: number[] = [];
  for (const [id, a] of acked) {
    // sequence numbers: 1..n, in order, no gap, no repeat
    assert.deepEqual(a.map((r) => r.seq), a.map((_, i) => i + 1), id);
    // the payload names the same reading and sample time the device was acked for
    for (const r of a) assert.equal(seen.get(`${id}/${r.seq}`)?.t, r.t, `${id}/${r.seq}`);
    // once per interval, each period 300 ms ± 5%, on a schedule that late turns do not move:
    // a reading taken late (its sample time is when it ran) may be followed by one on time,
    // so two sample times are at least the period less the scheduler's worst lateness apart
    for (let i = 1; i < a.length; i++) assert.ok(a[i]!.t - a[i - 1]!.t >= 0.95 * intervalMs - 5 - lateMs, `${id}: readings ${a[i - 1]!.t} and ${a[i]!.t} closer than the interval (scheduler at most ${lateMs.toFixed(1)} ms late)`);
    // and not fewer than the elapsed time allows (a generous bound: the machine is shared)
    assert.ok(a.length <= Math.ceil(elapsed / (0.95 * intervalMs)) + 2, `${id}: ${a.length} readings in ${elapsed} ms`);
    // nor slower: n readings span at most n-1 periods of 105% of the interval, plus the
    // scheduler's worst lateness (the last one late, the first on time); a skipped reading
    // (its predecessor unacked at its tick) leaves a gap of a period, so only without skips
    if (sim.stats().skipped === 0) {
      const span = a[a.length - 1]!.t - a[0]!.t;
      assert.ok(span <= (a.length - 1) * 1.05 * intervalMs + 5 + lateMs, `${id}: ${a.length} readings over ${span} ms: slower than every ${intervalMs} ms + 5% (scheduler at most ${lateMs.toFixed(1)} ms late)`);
    }
    firsts.push(a[0]!.t);
  }
  // boots spread over the start jitter: the first readings are not bunched in one slice of it
  const min = Math.min(...firsts);
  const buckets = new Array<number>(6).fill(0);
  for (const f of firsts) buckets[Math.min(5, Math.floor((f - min) / 100))]!++;
  // (a scheduler late by a slice or more bunches them: then not checked, and said so)
  if (lateMs < 100) assert.ok(buckets.filter((b) => b > 0).length >= 5, `first readings by 100 ms slice: ${buckets.join(' ')}`);
  else t.diagnostic(`NOT CHECKED: boots spread (scheduler ${lateMs.toFixed(1)} ms late: a stalled machine; first readings by 100 ms slice ${buckets.join(' ')})`);
  // a reading is skipped when the previous one is still unacked at the next tick: that
  // happens only when the process stalled for a good part of an interval
  if (lateMs < intervalMs / 2) assert.equal(sim.stats().skipped, 0, `scheduler at most ${lateMs.toFixed(1)} ms late`);
  else t.diagnostic(`NOT CHECKED: skipped readings (scheduler ${lateMs.toFixed(1)} ms late: a stalled machine; ${sim.stats().skipped} readings skipped)`);
});

test('Scheduler: lateness is measured as entries run, not from the turn\'s start: the last of 2,000 entries due together, each busy 30 µs, is reported late by the time the turn took', async (t) => {
  const defer = cleanups(t);
  const s = new Scheduler();
  defer(() => s.stop());
  let done = 0;
  const busy = () => {
    const until = performance.now() + 0.03;
    while (performance.now() < until);
    done++;
  };
  const due = Date.now() + 5;
  for (let i = 0; i < 2000; i++) s.at(due, busy, null);
  const t0 = performance.now();
  await new Promise<void>((r) => {
    const check = () => (done === 2000 ? r() : setTimeout(check, 5));
    check();
  });
  const turnMs = performance.now() - t0;
  const lag = s.lag();
  s.stop();
  // 2,000 x 30 µs is at least 60 ms of running: the entries at the end of the turn ran that late
  assert.ok(lag.maxMs >= 40, `max lateness ${lag.maxMs} ms reported for a turn of ${Math.round(turnMs)} ms`);
});
