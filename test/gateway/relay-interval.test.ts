import { test } from 'node:test';
import assert from 'node:assert/strict';
import { EventEmitter } from 'node:events';
import type { MqttClient } from 'mqtt';
import { MemoryOutbox } from '../../core/outbox.ts';
import { Relay } from '../../gateway/relay.ts';
import { testLogger } from '../helpers.ts';

/**
 * The relay's lost timeout follows an MCU's wake period, not the gaps within one wake. A
 * stand-in for the hub connection (a disconnected EventEmitter: nothing is published) and a
 * fake clock; the relay, its sweep and the outbox are the real ones.
 */
test('relay (hub connection mocked, fake clock): an MCU that sends a burst of 3 readings every 60 s stays online through its sleeps once its period was seen; silent for 3 periods it is lost', async () => {
  const client = Object.assign(new EventEmitter(), { connected: false, disconnecting: false, options: {}, publish: () => undefined, subscribe: () => undefined }) as unknown as MqttClient;
  let now = 1_700_000_000_000;
  const relay = new Relay({ gatewayId: 'gw-t', client, outbox: new MemoryOutbox(), log: testLogger('relay'), maxMcus: 10, now: () => now });
  const sweep = () => (relay as unknown as { sweep(): void }).sweep();
  const online = () => relay.counts().online;
  try {
    const sample = [{ n: 'temp', v: 21, t: now }];
    let minOnline = Infinity;
    for (let wake = 0; wake < 8; wake++) {
      for (let k = 0; k < 3; k++) {
        await relay.accept('esp-burst', 'mqtt', sample);
        now += 20;
      }
      // asleep until the next wake, swept every half second
      for (let t = 60; t < 60_000; t += 500) {
        now += 500;
        sweep();
        if (wake > 0) minOnline = Math.min(minOnline, online());
      }
    }
    assert.equal(minOnline, 1, 'never reported lost between wakes (with the burst gaps averaged in, lost after ~44 s)');
    // silent for good: lost after 3 periods
    for (let t = 0; t < 200_000 && online() === 1; t += 500) {
      now += 500;
      sweep();
    }
    assert.equal(online(), 0, 'lost once silent for three periods');
  } finally {
    await relay.stop(0);
  }
});

test('relay (hub connection mocked): when a restart forgets every saved MCU (silent for mcu.forgetAfterDays), an empty register still goes out, so the hub drops their delegation', async () => {
  const published: Array<{ topic: string; payload: string }> = [];
  const client = Object.assign(new EventEmitter(), {
    connected: true,
    disconnecting: false,
    options: {},
    publish: (topic: string, payload: Buffer, _opts: unknown, cb?: () => void) => {
      published.push({ topic, payload: payload.toString('utf8') });
      cb?.();
    },
    subscribe: (_t: unknown, _o: unknown, cb?: (err: null, granted: unknown[]) => void) => cb?.(null, []),
  }) as unknown as MqttClient;
  const now = 1_700_000_000_000;
  const relay = new Relay({ gatewayId: 'gw-t', client, outbox: new MemoryOutbox(), log: testLogger('relay'), maxMcus: 10, now: () => now });
  try {
    const day = Math.floor(now / 86_400_000);
    const forgotten = relay.restore(['esp-old-1', 'esp-old-2'], { 'esp-old-1': { seenDay: day - 100 }, 'esp-old-2': { seenDay: day - 95 } }, 90);
    assert.deepEqual(forgotten.sort(), ['esp-old-1', 'esp-old-2']);
    const registers = published.filter((p) => p.topic === 'fleet/v1/d/gw-t/register');
    assert.equal(registers.length, 1, 'a register was sent');
    assert.deepEqual((JSON.parse(registers[0]!.payload) as { mcus: string[] }).mcus, []);
  } finally {
    await relay.stop(0);
  }
});

test('relay (hub connection mocked, fake clock): the interval learned for an MCU is kept across a restart (in the saved meta), so one that sends every 5 minutes is not reported lost after 60 s; an outage is not saved as its interval; a saved value that is not a number is ignored', async () => {
  const client = Object.assign(new EventEmitter(), { connected: false, disconnecting: false, options: {}, publish: () => undefined, subscribe: () => undefined }) as unknown as MqttClient;
  let now = 1_700_000_000_000;
  const make = () => new Relay({ gatewayId: 'gw-t', client, outbox: new MemoryOutbox(), log: testLogger('relay'), maxMcus: 10, now: () => now });
  const sample = () => [{ n: 'temp', v: 21, t: now }];
  const first = make();
  let saved: Record<string, unknown> = {};
  try {
    for (let k = 0; k < 3; k++) {
      await first.accept('esp-slow', 'mqtt', sample());
      now += 300_000;
    }
    assert.ok(first.takeChanged(), 'the learned interval marks the state to be saved');
    saved = Object.fromEntries(first.metaEntries());
    assert.equal((saved['esp-slow'] as { intervalMs?: number }).intervalMs, 300_000);
    // an outage (silent for 2 hours, reported lost) does not become the saved interval
    const sweep1 = () => (first as unknown as { sweep(): void }).sweep();
    for (let t = 0; t < 7_200_000; t += 10_000) {
      now += 10_000;
      sweep1();
    }
    assert.equal(first.counts().online, 0, 'lost during the outage');
    await first.accept('esp-slow', 'mqtt', sample());
    assert.equal(Object.fromEntries(first.metaEntries())['esp-slow']?.intervalMs, 300_000, 'the outage is not saved as its interval');
  } finally {
    await first.stop(0);
  }
  // the restart: the saved list and meta, and the MCU's first message after it
  const second = make();
  const sweep = () => (second as unknown as { sweep(): void }).sweep();
  try {
    second.restore(['esp-slow', 'esp-odd'], { ...saved, 'esp-odd': { intervalMs: 'soon' } } as never);
    await second.accept('esp-slow', 'mqtt', sample());
    await second.accept('esp-odd', 'mqtt', sample());
    // 4 minutes of silence: past the 60 s default, well within 3 × 5 minutes
    for (let t = 0; t < 240_000; t += 1000) {
      now += 1000;
      sweep();
    }
    const isOnline = (id: string) => (second as unknown as { mcus: Map<string, { online: boolean }> }).mcus.get(id)?.online;
    assert.equal(isOnline('esp-slow'), true, 'esp-slow still online');
    assert.equal(isOnline('esp-odd'), false, 'esp-odd (no usable interval saved) lost after the default 60 s');
    assert.equal(Object.fromEntries(second.metaEntries())['esp-odd']?.intervalMs, undefined, 'the bad value is dropped');
  } finally {
    await second.stop(0);
  }
});

for (const first of ['telemetry', 'hello'] as const) test(`relay (hub connection mocked, fake clock): an MCU back from a 2-hour outage (its first message back: ${first}) that fails again is lost within minutes, not after 3 outages; the outage is not saved as its interval, not even on its second message back`, async () => {
  const client = Object.assign(new EventEmitter(), { connected: false, disconnecting: false, options: {}, publish: () => undefined, subscribe: () => undefined }) as unknown as MqttClient;
  let now = 1_700_000_000_000;
  const relay = new Relay({ gatewayId: 'gw-t', client, outbox: new MemoryOutbox(), log: testLogger('relay'), maxMcus: 10, now: () => now });
  const sweep = () => (relay as unknown as { sweep(): void }).sweep();
  const sample = () => [{ n: 'temp', v: 21, t: now }];
  try {
    // a reading a minute for an hour
    for (let k = 0; k < 60; k++) {
      await relay.accept('esp-m', 'mqtt', sample());
      now += 60_000;
      sweep();
    }
    // silent for 2 hours: lost
    for (let t = 0; t < 7_200_000; t += 10_000) {
      now += 10_000;
      sweep();
    }
    assert.equal(relay.counts().online, 0, 'lost during the outage');
    // back (after a power cut an MCU says hello first, which makes it online before its first reading)
    if (first === 'hello') await relay.hello('esp-m', 'mqtt', { fw: '1.0.0', boot: 'power_on' });
    // 10 readings a minute apart
    for (let k = 0; k < 10; k++) {
      await relay.accept('esp-m', 'mqtt', sample());
      now += 60_000;
      sweep();
    }
    assert.equal(relay.counts().online, 1);
    assert.ok((Object.fromEntries(relay.metaEntries())['esp-m']?.intervalMs ?? 0) <= 60_000, `the saved interval stays about a minute (${Object.fromEntries(relay.metaEntries())['esp-m']?.intervalMs})`);
    // fails again: lost within minutes of its last reading (the estimate still decays from
    // twice the timeout that ran out, 6 min), not after 3 x 2 hours
    let silent = 0;
    while (relay.counts().online === 1 && silent < 3 * 3_600_000) {
      now += 10_000;
      silent += 10_000;
      sweep();
    }
    assert.ok(silent <= 10 * 60_000, `lost after ${silent / 60_000} min`);
  } finally {
    await relay.stop(0);
  }
});

test('relay (hub connection mocked, fake clock): an MCU in a live session (MQTT, answering keep-alives) is not lost while it sends nothing; lost once the session ends and it stays silent', async () => {
  const client = Object.assign(new EventEmitter(), { connected: false, disconnecting: false, options: {}, publish: () => undefined, subscribe: () => undefined }) as unknown as MqttClient;
  let now = 1_700_000_000_000;
  let session = true;
  const relay = new Relay({ gatewayId: 'gw-t', client, outbox: new MemoryOutbox(), log: testLogger('relay'), maxMcus: 10, now: () => now, inSession: (id) => id === 'esp-act' && session });
  const sweep = () => (relay as unknown as { sweep(): void }).sweep();
  try {
    await relay.accept('esp-act', 'mqtt', [{ n: 'relay', v: 1, t: now }]);
    for (let t = 0; t < 3_600_000; t += 10_000) {
      now += 10_000;
      sweep();
    }
    assert.equal(relay.counts().online, 1, 'an hour of keep-alives only: still online');
    session = false;
    let silent = 0;
    while (relay.counts().online === 1 && silent < 3_600_000) {
      now += 1000;
      silent += 1000;
      sweep();
    }
    assert.ok(silent >= 60_000 && silent <= 70_000, `lost ${silent / 1000} s after the session ended (default 60 s)`);
  } finally {
    await relay.stop(0);
  }
});

test('relay (hub connection mocked, fake clocks): lost detection runs on the monotonic clock: a wall-clock step forward of 5 h (NTP at boot without an RTC) marks no MCU lost, a step back of a day does not keep a silent MCU online', async () => {
  const client = Object.assign(new EventEmitter(), { connected: false, disconnecting: false, options: {}, publish: () => undefined, subscribe: () => undefined }) as unknown as MqttClient;
  let wall = 1_700_000_000_000;
  let mono = 50_000;
  const relay = new Relay({ gatewayId: 'gw-t', client, outbox: new MemoryOutbox(), log: testLogger('relay'), maxMcus: 10, now: () => wall, elapsed: () => mono, lostAfterMs: 30_000 });
  const sweep = () => (relay as unknown as { sweep(): void }).sweep();
  const online = () => relay.counts().online;
  const tick = (ms: number) => {
    wall += ms;
    mono += ms;
  };
  try {
    await relay.accept('esp-a', 'mqtt', [{ n: 'temp', v: 21, t: wall }]);
    assert.equal(online(), 1);
    tick(1000);
    wall += 5 * 3600_000; // the step: the wall clock only
    sweep();
    assert.equal(online(), 1, 'a wall-clock step forward is not silence');
    for (let i = 0; i < 20; i++) {
      tick(1000);
      await relay.accept('esp-a', 'mqtt', [{ n: 'temp', v: 21, t: wall }]);
      sweep();
    }
    assert.equal(online(), 1, 'still online while it reports every second');
    wall -= 24 * 3600_000; // a step back
    for (let i = 0; i < 40 && online() === 1; i++) {
      tick(1000);
      sweep();
    }
    assert.equal(online(), 0, 'silent for lostAfterMs of monotonic time: lost, whatever the wall clock did');
  } finally {
    await relay.stop(0);
  }
});
