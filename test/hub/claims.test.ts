import { test } from 'node:test';
import assert from 'node:assert/strict';
import { setTimeout as sleep } from 'node:timers/promises';
import { encodeBatch } from '../../core/batch.ts';
import { encodeMessage } from '../../core/messages.ts';
import { deviceTopic } from '../../core/topics.ts';
import { tempDir, waitFor } from '../helpers.ts';
import { connect, connectDevice, deadLetters, metric, telemetry, withHub } from './harness.ts';

const register = (gw: string, mcus: string[]) => [deviceTopic(gw, 'register'), encodeMessage({ v: 1, ts: Date.now(), mcus }), { qos: 1 as const, retain: true }] as const;
const batchOf = (gw: string, mcu: string, mid: string) => [deviceTopic(gw, 'batch'), encodeBatch([{ topic: deviceTopic(mcu, 'telemetry'), payload: telemetry(mid) }]), { qos: 1 as const }] as const;

test('MCU claims: an MCU moves to a gateway that registers it and sends for it once its gateway is offline or idle for it, never while that one is connected and active', async () => {
  await withHub(
    async (hub, ctx) => {
      const a = await connectDevice(ctx, 'gw-a', { reconnectPeriod: 0 });
      await a.publishAsync(...register('gw-a', ['esp-1']));
      await a.publishAsync(...batchOf('gw-a', 'esp-1', '100'));
      assert.equal(hub.registry.get('esp-1')?.samples, 1);

      // gw-b hears esp-1 too while gw-a is connected and active: refused (a dead letter)
      const b = await connectDevice(ctx, 'gw-b', { reconnectPeriod: 0 });
      await b.publishAsync(...register('gw-b', ['esp-1', 'esp-2']));
      await b.publishAsync(...batchOf('gw-b', 'esp-1', '200'));
      assert.equal(hub.registry.get('esp-1')?.samples, 1);
      assert.equal(hub.broker.mcusOf('gw-b')?.has('esp-1'), false);
      assert.equal(await metric(hub, 'fleet_hub_mcu_claims_moved_total'), 0);

      // gw-a goes away: the next reading through gw-b moves esp-1 there and is routed
      const clients = hub.broker.aedes.connectedClients;
      await a.endAsync();
      await waitFor(() => hub.broker.aedes.connectedClients === clients - 1, 'gw-a gone at the hub');
      await b.publishAsync(...batchOf('gw-b', 'esp-1', '201'));
      assert.equal(hub.registry.get('esp-1')?.samples, 2);
      assert.equal(hub.broker.mcusOf('gw-b')?.has('esp-1'), true);
      assert.equal(hub.broker.mcusOf('gw-a')?.has('esp-1'), false);
      assert.equal(await metric(hub, 'fleet_hub_mcu_claims_moved_total'), 1);
      // a direct publish (state, as a gateway reports an MCU) goes too now
      await b.publishAsync(deviceTopic('esp-1', 'state'), encodeMessage({ v: 1, online: true, kind: 'mcu', ts: Date.now(), via: 'gw-b' }), { qos: 1, retain: true });
      await waitFor(() => hub.registry.get('esp-1')?.via === 'gw-b', 'esp-1 via gw-b');

      // gw-a is back and sends for esp-1 at once: gw-b holds it, connected and active
      const a2 = await connectDevice(ctx, 'gw-a', { reconnectPeriod: 0 });
      await a2.publishAsync(...batchOf('gw-a', 'esp-1', '101'));
      assert.equal(hub.registry.get('esp-1')?.samples, 2, 'refused while gw-b is active for it');
      // ... but once gw-b has sent nothing for esp-1 for mcuClaimIdleMs (4 s here: the steps that must come within it do on a slow machine too), the MCU
      // is where it is heard now: back at gw-a, though gw-b stays connected
      await sleep(4200);
      await a2.publishAsync(...batchOf('gw-a', 'esp-1', '102'));
      assert.equal(hub.registry.get('esp-1')?.samples, 3);
      assert.equal(hub.broker.mcusOf('gw-a')?.has('esp-1'), true);
      assert.equal(await metric(hub, 'fleet_hub_mcu_claims_moved_total'), 2);

      // a gateway whose register does not list the MCU never takes it, idle or not
      const c = await connectDevice(ctx, 'gw-c', { reconnectPeriod: 0 });
      await c.publishAsync(...register('gw-c', ['esp-3']));
      await sleep(4200);
      await c.publishAsync(...batchOf('gw-c', 'esp-1', '300'));
      assert.equal(hub.registry.get('esp-1')?.samples, 3);
      assert.equal(hub.broker.mcusOf('gw-a')?.has('esp-1'), true);

      // the refused readings are dead letters, with why
      const dl = (await (await fetch(`${ctx.http}/api/v1/dead-letters`, { headers: { authorization: `Bearer ${ctx.operator}` } })).json()) as { deadLetters: Array<{ from: string; detail: string }> };
      assert.deepEqual(dl.deadLetters.map((d) => d.from), ['gw-b', 'gw-a', 'gw-c']);
      assert.match(dl.deadLetters[0]!.detail, /registered by gateway gw-a, which is connected and sent for it within 4 s/);
      assert.match(dl.deadLetters[2]!.detail, /register does not list it/);
      await Promise.all([a2.endAsync(), b.endAsync(), c.endAsync()]);
    },
    undefined,
    { mcuClaimIdleMs: 4000 },
  );
});

test('MCU claims: a gateway cannot claim a device of the fleet as its MCU (it could take over its state and commands and lock it out), also after a hub restart', async () => {
  const tmp = tempDir();
  try {
    await withHub(async (hub, ctx) => {
      const pi = await connectDevice(ctx, 'pi-01', { reconnectPeriod: 0 });
      const gw = await connectDevice(ctx, 'gw-1', { reconnectPeriod: 0 });
      await gw.publishAsync(...register('gw-1', ['pi-01', 'esp-1']));
      assert.deepEqual([...(hub.broker.mcusOf('gw-1') ?? [])], ['esp-1']);
      // state "for" pi-01 from the gateway is refused (a dead letter), the device's own stays
      await gw.publishAsync(deviceTopic('pi-01', 'state'), encodeMessage({ v: 1, online: true, kind: 'mcu', ts: Date.now(), via: 'gw-1' }), { qos: 1, retain: true });
      const dead = (await deadLetters(ctx)).deadLetters;
      assert.deepEqual(dead.map((d) => d.topic), ['fleet/v1/d/pi-01/state']);
      assert.match(dead[0]!.detail ?? '', /topic outside the ACL: pi-01 is a device of the fleet \(it connects to the hub itself\), never an MCU of a gateway/);
      await pi.endAsync();
      await gw.endAsync();
      // the device can still connect
      const again = await connectDevice(ctx, 'pi-01', { reconnectPeriod: 0 });
      await again.endAsync();
      assert.notEqual(hub.registry.get('pi-01')?.via, 'gw-1');
    }, tmp.dir);
    // after a restart, with pi-01 offline, the registry still knows it as a device
    await withHub(async (hub, ctx) => {
      const gw = await connectDevice(ctx, 'gw-1', { reconnectPeriod: 0 });
      await gw.publishAsync(...register('gw-1', ['pi-01', 'esp-1']));
      assert.deepEqual([...(hub.broker.mcusOf('gw-1') ?? [])], ['esp-1']);
      await gw.endAsync();
      const pi = await connectDevice(ctx, 'pi-01', { reconnectPeriod: 0 });
      await pi.endAsync();
    }, tmp.dir);
  } finally {
    tmp.cleanup();
  }
});

test('MCU claims: a register listing many MCUs another gateway holds, and devices of the fleet, is logged once per kind with a count and a few examples, not once per MCU', async () => {
  await withHub(async (hub, ctx) => {
    const ids = Array.from({ length: 40 }, (_, i) => `esp-${i}`);
    const pi = await connectDevice(ctx, 'pi-07', { reconnectPeriod: 0 });
    const a = await connectDevice(ctx, 'gw-a', { reconnectPeriod: 0 });
    const b = await connectDevice(ctx, 'gw-b', { reconnectPeriod: 0 });
    try {
      await a.publishAsync(...register('gw-a', ids));
      const from = ctx.log.lines.length;
      await b.publishAsync(...register('gw-b', [...ids, 'esp-new', 'pi-07']));
      await b.publishAsync(...register('gw-b', [...ids, 'esp-new', 'pi-07'])); // as the next register repeats them
      assert.deepEqual([...(hub.broker.mcusOf('gw-b') ?? [])], ['esp-new']);
      const lines = ctx.log.lines.slice(from).filter((l) => l.level === 'warn');
      const held = lines.filter((l) => /already registered by another gateway/.test(String(l.msg)));
      const fleet = lines.filter((l) => /devices of the fleet/.test(String(l.msg)));
      assert.equal(held.length, 2, `one line per register: ${JSON.stringify(lines)}`);
      assert.equal(held[0]!.count, 40);
      assert.deepEqual(held[0]!.first, ids.slice(0, 3).map((mcu) => ({ mcu, owner: 'gw-a' })));
      assert.equal(fleet.length, 2);
      assert.equal(fleet[0]!.count, 1);
      assert.equal(lines.length, 4, JSON.stringify(lines));
    } finally {
      await Promise.all([pi.endAsync(), a.endAsync(), b.endAsync()]);
    }
  });
});

test('MCU claims: an offline state from a gateway that still lists a moved MCU does not take it (data or an online state would); after a hub restart, the first gateway to send data for an MCU two registers list takes it', async () => {
  const tmp = tempDir();
  try {
    await withHub(
      async (hub, ctx) => {
        const a = await connectDevice(ctx, 'gw-a', { reconnectPeriod: 0 });
        await a.publishAsync(...register('gw-a', ['esp-9']));
        await a.publishAsync(...batchOf('gw-a', 'esp-9', '100'));
        // gw-b heard esp-9 once and still lists it; esp-9 sleeps longer than mcuClaimIdleMs
        const b = await connectDevice(ctx, 'gw-b', { reconnectPeriod: 0 });
        await b.publishAsync(...register('gw-b', ['esp-9']));
        await sleep(1200);
        // gw-b's sweep reports it lost: refused, the MCU stays with gw-a
        await b.publishAsync(deviceTopic('esp-9', 'state'), encodeMessage({ v: 1, online: false, kind: 'mcu', ts: Date.now(), via: 'gw-b', reason: 'no contact' }), { qos: 1, retain: true });
        assert.equal(hub.broker.mcusOf('gw-a')?.has('esp-9'), true);
        assert.equal(hub.broker.mcusOf('gw-b')?.has('esp-9'), false);
        assert.equal(await metric(hub, 'fleet_hub_mcu_claims_moved_total'), 0);
        await a.publishAsync(...batchOf('gw-a', 'esp-9', '101'));
        assert.equal(hub.registry.get('esp-9')?.samples, 2, "gw-a's next reading is routed");
        await Promise.all([a.endAsync(), b.endAsync()]);
      },
      tmp.dir,
      { mcuClaimIdleMs: 1000 },
    );
    // the hub restarts: both retained registers list esp-9 (gw-a's sorts first); gw-b serves it now
    await withHub(
      async (hub, ctx) => {
        const a = await connectDevice(ctx, 'gw-a', { reconnectPeriod: 0 });
        const b = await connectDevice(ctx, 'gw-b', { reconnectPeriod: 0 });
        await b.publishAsync(...batchOf('gw-b', 'esp-9', '200'));
        assert.equal(hub.broker.mcusOf('gw-b')?.has('esp-9'), true, 'the first gateway to send data for it takes it');
        assert.equal(hub.registry.get('esp-9')?.samples, 3);
        await Promise.all([a.endAsync(), b.endAsync()]);
      },
      tmp.dir,
      { mcuClaimIdleMs: 60_000 },
    );
  } finally {
    tmp.cleanup();
  }
});

test('MCU claims: a device that connects with a valid token under an id a gateway listed as its MCU is let in, and the gateway loses the claim (its desired state and commands no longer reach the gateway); a wrong token is still refused', async () => {
  await withHub(async (hub, ctx) => {
    const gw = await connectDevice(ctx, 'gw-x', { reconnectPeriod: 0 });
    // pi-future: an agent provisioned (token, staged desired state) but not yet powered on
    await gw.publishAsync(...register('gw-x', ['pi-future', 'esp-1']));
    assert.equal(hub.broker.mcusOf('gw-x')?.has('pi-future'), true, 'claimable while the device has never connected');
    await assert.rejects(connect(ctx.url, 'pi-future', 'pi-future', 'not-the-token', { reconnectPeriod: 0 }), 'a wrong token is refused');
    const pi = await connectDevice(ctx, 'pi-future', { reconnectPeriod: 0 });
    assert.equal(hub.broker.mcusOf('gw-x')?.has('pi-future'), false, 'the claim is dropped');
    assert.equal(hub.broker.mcusOf('gw-x')?.has('esp-1'), true, 'its other MCUs stay');
    const got: string[] = [];
    gw.on('message', (topic) => got.push(topic));
    await gw.subscribeAsync({ 'fleet/v1/d/+/desired': { qos: 1 }, 'fleet/v1/d/+/cmd': { qos: 1 } });
    const op = await connect(ctx.url, 'ops', 'operator', ctx.operator, { reconnectPeriod: 0 });
    await op.publishAsync('fleet/v1/d/pi-future/desired', encodeMessage({ v: 1, rev: 1, ts: Date.now(), apps: {} }), { qos: 1, retain: true });
    await op.publishAsync('fleet/v1/d/pi-future/cmd', encodeMessage({ v: 1, id: 'c1', name: 'ping', args: {}, expiresAt: Date.now() + 60_000 }), { qos: 1 });
    await op.publishAsync('fleet/v1/d/esp-1/cmd', encodeMessage({ v: 1, id: 'c2', name: 'ping', args: {}, expiresAt: Date.now() + 60_000 }), { qos: 1 });
    await waitFor(() => got.includes('fleet/v1/d/esp-1/cmd'), 'its own MCU\'s command');
    assert.deepEqual(got.filter((t) => t.includes('pi-future')), [], 'nothing of pi-future reaches the gateway');
    // listing it again does not take it back: it is a device of the fleet now
    await gw.publishAsync(...register('gw-x', ['pi-future', 'esp-1']));
    assert.equal(hub.broker.mcusOf('gw-x')?.has('pi-future'), false);
    await Promise.all([gw.endAsync(), pi.endAsync(), op.endAsync()]);
  });
});

test('MCU claims: replies and events a gateway makes up itself for an MCU that roamed away (an expired command\'s FLEET_TIMEOUT) do not take it back; an MCU its holder stops listing goes to a connected gateway that lists it', async () => {
  await withHub(
    async (hub, ctx) => {
      const holder = () => (hub.broker.mcusOf('gw-a')?.has('esp-1') ? 'gw-a' : hub.broker.mcusOf('gw-b')?.has('esp-1') ? 'gw-b' : 'none');
      const a = await connectDevice(ctx, 'gw-a', { reconnectPeriod: 0 });
      const b = await connectDevice(ctx, 'gw-b', { reconnectPeriod: 0 });
      await a.publishAsync(...register('gw-a', ['esp-1']));
      await b.publishAsync(...register('gw-b', ['esp-1']));
      await a.publishAsync(...batchOf('gw-a', 'esp-1', '100'));
      await sleep(1200); // gw-a idle for it: esp-1 roams to gw-b
      await b.publishAsync(...batchOf('gw-b', 'esp-1', '200'));
      assert.equal(holder(), 'gw-b');
      await sleep(1200); // esp-1 sleeps: gw-b idle for it
      const timeoutReply = encodeMessage({ v: 1, mid: '101', id: 'c-1', ok: false, error: { code: 'FLEET_TIMEOUT', message: 'expired' } });
      await a.publishAsync(deviceTopic('gw-a', 'batch'), encodeBatch([{ topic: deviceTopic('esp-1', 'reply'), payload: timeoutReply }]), { qos: 1 });
      assert.equal(holder(), 'gw-b', 'a reply made up by the gateway it left is not contact');
      await b.publishAsync(...batchOf('gw-b', 'esp-1', '201'));
      assert.equal(hub.registry.get('esp-1')?.samples, 3, 'gw-b\'s readings are routed (mids 100, 200, 201)');
      const dead = (await deadLetters(ctx)).deadLetters;
      assert.deepEqual(dead.map((d) => d.topic), ['fleet/v1/d/esp-1/reply'], JSON.stringify(dead));
      assert.match(dead[0]!.detail ?? '', /a reply gw-a makes up itself, e.g. a FLEET_TIMEOUT reply or a firmware event, is no contact/);

      // gw-b stops listing esp-1 (forgotten, or a fresh state directory): gw-a lists it and is connected
      await b.publishAsync(...register('gw-b', []));
      assert.equal(holder(), 'gw-a', 'given to the connected gateway that lists it');
      await a.publishAsync(...batchOf('gw-a', 'esp-1', '102'));
      assert.equal(hub.registry.get('esp-1')?.samples, 4);
      // and when no gateway held it, the first to send its readings while listing it takes it
      await a.publishAsync(...register('gw-a', []));
      assert.equal(holder(), 'none');
      await a.publishAsync(...register('gw-a', ['esp-2']));
      await b.publishAsync(...register('gw-b', ['esp-1']));
      assert.equal(holder(), 'gw-b', 'registered by gw-b while held by no one: its own');
      await Promise.all([a.endAsync(), b.endAsync()]);
    },
    undefined,
    { mcuClaimIdleMs: 1000 },
  );
});

test('MCU states: a gateway\'s state for its MCU must say kind mcu and via the gateway itself; another kind or via is refused (a dead letter), not filed in the registry', async () => {
  await withHub(async (hub, ctx) => {
    const gw = await connectDevice(ctx, 'gw-s', { reconnectPeriod: 0 });
    await gw.publishAsync(...register('gw-s', ['esp-s1']));
    const state = (o: Record<string, unknown>) => encodeMessage({ v: 1, online: true, ts: Date.now(), ...o } as never);
    await gw.publishAsync(deviceTopic('esp-s1', 'state'), state({ kind: 'agent', via: 'gw-s' }), { qos: 1, retain: true });
    await gw.publishAsync(deviceTopic('esp-s1', 'state'), state({ kind: 'mcu', via: 'gw-other' }), { qos: 1, retain: true });
    await sleep(200);
    assert.equal(hub.registry.get('esp-s1')?.online ?? false, false, 'neither filed');
    const dead = (await deadLetters(ctx)).deadLetters;
    assert.deepEqual(dead.map((d) => [d.reason, /kind must be mcu|via must be the gateway/.test(d.detail ?? '')]), [['invalid', true], ['invalid', true]], JSON.stringify(dead));
    await gw.publishAsync(deviceTopic('esp-s1', 'state'), state({ kind: 'mcu', via: 'gw-s' }), { qos: 1, retain: true });
    await waitFor(() => hub.registry.get('esp-s1')?.online === true && hub.registry.get('esp-s1')?.via === 'gw-s', 'filed');
    // refused for what it is, not blamed on the registration: desired (the hub's channel) and retained telemetry for its own MCU
    await gw.publishAsync(deviceTopic('esp-s1', 'desired'), encodeMessage({ v: 1, ts: Date.now(), apps: {} } as never), { qos: 1 });
    await gw.publishAsync(deviceTopic('esp-s1', 'telemetry'), telemetry('9'), { qos: 1, retain: true });
    const refused = (await deadLetters(ctx)).deadLetters.slice(2).map((d) => d.detail);
    assert.deepEqual(refused, ['topic outside the ACL: a device does not publish on desired (the hub sends it)', 'topic outside the ACL: telemetry is not retained (only state and register are)']);
    await gw.endAsync();
  });
});

test('MCU claims: an MCU that sends no readings (an actuator answering commands) moves with its replies; a FLEET_TIMEOUT the gateway it left makes up neither moves it back nor keeps that gateway active; an MCU handed on because its holder stopped listing it is idle there, so the gateway it talks to takes it at once', async () => {
  // 4 s: between the publishes that must fall within it, a loaded machine can stall a second
  const IDLE_MS = 4000;
  await withHub(
    async (hub, ctx) => {
      const holder = () => (hub.broker.mcusOf('gw-a')?.has('esp-1') ? 'gw-a' : hub.broker.mcusOf('gw-b')?.has('esp-1') ? 'gw-b' : 'none');
      const reply = (mid: string, o: Record<string, unknown>) => encodeMessage({ v: 1, mid, id: `c-${mid}`, ...o } as never);
      const replyOf = (gw: string, mid: string, o: Record<string, unknown>) => [deviceTopic(gw, 'batch'), encodeBatch([{ topic: deviceTopic('esp-1', 'reply'), payload: reply(mid, o) }]), { qos: 1 as const }] as const;
      const a = await connectDevice(ctx, 'gw-a', { reconnectPeriod: 0 });
      const b = await connectDevice(ctx, 'gw-b', { reconnectPeriod: 0 });
      await a.publishAsync(...register('gw-a', ['esp-1']));
      await b.publishAsync(...register('gw-b', ['esp-1']));
      await a.publishAsync(...replyOf('gw-a', '100', { ok: true }));
      await sleep(IDLE_MS + 200); // the actuator left gw-a: nothing from it there since
      await a.publishAsync(...replyOf('gw-a', '101', { ok: false, error: { code: 'FLEET_TIMEOUT', message: 'expired' } }));
      await b.publishAsync(...replyOf('gw-b', '200', { ok: true, result: { on: true } }));
      assert.equal(holder(), 'gw-b', 'its answer through gw-b moved it; gw-a\'s own timeout did not keep gw-a active');
      // an MCU's own refusal is contact too; gw-a's made-up timeout does not move it back
      await sleep(IDLE_MS + 200);
      await a.publishAsync(...replyOf('gw-a', '102', { ok: false, error: { code: 'FLEET_TIMEOUT', message: 'expired' } }));
      assert.equal(holder(), 'gw-b');
      await b.publishAsync(...replyOf('gw-b', '201', { ok: false, error: { code: 'FLEET_MCU_COMMAND', message: 'busy' } }));
      assert.equal(holder(), 'gw-b');
      // gw-b's last answer before the refusal (200) is over mcuClaimIdleMs old: only the refusal
      // keeps it active, so a reading through gw-a now is refused and the MCU stays
      await a.publishAsync(...batchOf('gw-a', 'esp-1', '103'));
      assert.equal(holder(), 'gw-b', 'the MCU\'s own refusal through gw-b was contact: gw-b is active for it');
      assert.equal((await deadLetters(ctx)).deadLetters.filter((d) => d.topic === deviceTopic('esp-1', 'telemetry')).length, 1, 'gw-a\'s reading refused');

      // gw-b (fresh state directory) stops listing it: handed to gw-a, idle; when the MCU talks
      // to gw-b again and gw-b lists it, gw-b takes it at once, not after mcuClaimIdleMs
      await b.publishAsync(...register('gw-b', []));
      assert.equal(holder(), 'gw-a');
      await b.publishAsync(...register('gw-b', ['esp-1']));
      await b.publishAsync(...batchOf('gw-b', 'esp-1', '202'));
      assert.equal(holder(), 'gw-b', 'taken at once from the idle hand-over');
      await Promise.all([a.endAsync(), b.endAsync()]);
    },
    undefined,
    { mcuClaimIdleMs: IDLE_MS },
  );
});
