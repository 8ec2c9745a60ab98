import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { MqttClient } from 'mqtt';
import { SeenCommands } from '../../agent/commands-seen.ts';
import { AgentConfigSchema } from '../../agent/config.ts';
import { startAgent } from '../../agent/index.ts';
import { deriveToken } from '../../core/credentials.ts';
import { decodeMessage, encodeMessage, type Command } from '../../core/messages.ts';
import { connectFleetClient, disconnectFleetClient } from '../../core/mqtt.ts';
import { deviceTopic, RELAY_CMD } from '../../core/topics.ts';
import type { CommandRecord } from '../../hub/commands.ts';
import { HubConfigSchema } from '../../hub/config.ts';
import { startHub, type HubHandle, type HubOptions } from '../../hub/index.ts';
import { tempDir, testLogger, waitFor } from '../helpers.ts';
import { connect, connectDevice, type HubCtx } from './harness.ts';

/** A real hub over `dir` (kept: a second hub may open it again), with command timing for tests. */
async function hubOn(dir: string, options: HubOptions = {}): Promise<{ hub: HubHandle; ctx: HubCtx }> {
  const log = testLogger('hub');
  const hub = await startHub(HubConfigSchema.parse({ mqttPort: 0, httpPort: 0, stateDir: dir }), log, options);
  return {
    hub,
    ctx: {
      log,
      secret: readFileSync(hub.fleetSecretFile, 'utf8').trim(),
      operator: readFileSync(hub.operatorTokenFile, 'utf8').trim(),
      url: `mqtt://127.0.0.1:${hub.mqttPort}`,
      http: `http://127.0.0.1:${hub.httpPort}`,
    },
  };
}

async function withCmdHub(options: HubOptions, fn: (hub: HubHandle, ctx: HubCtx) => Promise<void>): Promise<void> {
  const tmp = tempDir();
  const { hub, ctx } = await hubOn(tmp.dir, options);
  try {
    await fn(hub, ctx);
  } finally {
    await hub.stop();
    tmp.cleanup();
  }
}

const post = async (ctx: HubCtx, id: string, body: unknown): Promise<Response> =>
  fetch(`${ctx.http}/api/v1/devices/${id}/commands`, { method: 'POST', headers: { authorization: `Bearer ${ctx.operator}`, 'content-type': 'application/json' }, body: JSON.stringify(body) });
const getJson = async <T>(ctx: HubCtx, path: string): Promise<T> => {
  const r = await fetch(`${ctx.http}${path}`);
  assert.equal(r.status, 200, await r.clone().text());
  return (await r.json()) as T;
};
const one = (ctx: HubCtx, id: string, cid: string) => getJson<CommandRecord>(ctx, `/api/v1/devices/${id}/commands/${cid}`);

/** An agent-like device: the fleet client of core/mqtt.ts (clean session, retained state), subscribed to its cmd topic; collects commands. */
async function device(ctx: HubCtx, id: string): Promise<{ client: MqttClient; got: Command[] }> {
  const client = connectFleetClient({ url: ctx.url, deviceId: id, token: deriveToken(ctx.secret, 'device', id), kind: 'agent', version: '1.0.0', keepalive: 5, reconnectMs: 0 });
  const got: Command[] = [];
  client.on('message', (topic, payload) => {
    if (topic === deviceTopic(id, 'cmd')) got.push(decodeMessage('cmd', payload));
  });
  await new Promise<void>((resolve, reject) => client.once('connect', () => resolve()).once('error', reject));
  await client.subscribeAsync(deviceTopic(id, 'cmd'), { qos: 1 });
  return { client, got };
}
const replyTo = (client: MqttClient, id: string, cid: string, mid: string, ok = true) =>
  client.publishAsync(deviceTopic(id, 'reply'), encodeMessage({ v: 1, mid, id: cid, ok, ...(ok ? { result: { pong: true } } : { error: { code: 'X_FAILED', message: 'nope' } }) }), { qos: 1 });

test('commands: sent to an offline device, stored (202, pending), delivered when it connects; the reply makes it replied; list and get', async () => {
  await withCmdHub({}, async (_hub, ctx) => {
    const r = await post(ctx, 'dev-off', { name: 'ping', args: { n: 1 }, ttlMs: 60_000 });
    assert.equal(r.status, 202);
    const cmd = (await r.json()) as CommandRecord;
    assert.equal(cmd.status, 'pending');
    assert.equal(cmd.sends, 0);
    assert.ok(cmd.expiresAt > Date.now() + 50_000);
    const r2 = await post(ctx, 'dev-off', { name: 'ping', args: { n: 2 }, ttlMs: 60_000 });
    const cmd2 = (await r2.json()) as CommandRecord;
    assert.equal((await one(ctx, 'dev-off', cmd.id)).status, 'pending');

    const dev = await device(ctx, 'dev-off');
    try {
      await waitFor(() => dev.got.length >= 2, 'both stored commands delivered on connect');
      // oldest first
      assert.deepEqual(dev.got.map((c) => c.id), [cmd.id, cmd2.id]);
      assert.deepEqual(dev.got[0]!.args, { n: 1 });
      assert.equal(dev.got[0]!.expiresAt, cmd.expiresAt);
      await waitFor(async () => (await one(ctx, 'dev-off', cmd.id)).status === 'delivered', 'delivered');
      await replyTo(dev.client, 'dev-off', cmd.id, '1');
      await replyTo(dev.client, 'dev-off', cmd2.id, '2', false);
      await waitFor(async () => (await one(ctx, 'dev-off', cmd2.id)).status === 'replied', 'second replied');
      const first = await one(ctx, 'dev-off', cmd.id);
      assert.equal(first.status, 'replied');
      assert.equal(first.ok, true);
      assert.deepEqual(first.result, { pong: true });
      const second = await one(ctx, 'dev-off', cmd2.id);
      assert.equal(second.ok, false);
      assert.equal(second.error?.code, 'X_FAILED');

      // newest first, bounded by limit
      const list = await getJson<{ open: number; commands: CommandRecord[] }>(ctx, '/api/v1/devices/dev-off/commands');
      assert.deepEqual(list.commands.map((c) => c.id), [cmd2.id, cmd.id]);
      assert.equal(list.open, 0);
      const limited = await getJson<{ commands: CommandRecord[] }>(ctx, '/api/v1/devices/dev-off/commands?limit=1');
      assert.deepEqual(limited.commands.map((c) => c.id), [cmd2.id]);
      assert.equal((await fetch(`${ctx.http}/api/v1/devices/dev-off/commands/nope`)).status, 404);
      assert.equal((await fetch(`${ctx.http}/api/v1/devices/other/commands/${cmd.id}`)).status, 404, 'another device does not see it');
      assert.equal((await fetch(`${ctx.http}/api/v1/devices/dev-off/commands?limit=x`)).status, 400);

      // a device cannot answer another device's command: ignored
      const r3 = (await (await post(ctx, 'dev-b', { name: 'ping' })).json()) as CommandRecord;
      await replyTo(dev.client, 'dev-off', r3.id, '3');
      const metrics = await (await fetch(`${ctx.http}/metrics`)).text();
      assert.match(metrics, /fleet_hub_commands_total\{result="accepted"\} 3/);
      assert.equal((await one(ctx, 'dev-b', r3.id)).status, 'pending');
      // nothing was sent again: the device replied before any re-send was due
      assert.equal(dev.got.length, 2);
    } finally {
      await disconnectFleetClient(dev.client, 'dev-off', 'agent', '1.0.0');
    }
  });
});

test('commands: a device that never replies gets the command again at a backoff, then it expires (status expired, not sent after)', async () => {
  await withCmdHub({ commands: { resendInitialMs: 150, resendMaxMs: 300, tickMs: 25 } }, async (hub, ctx) => {
    const dev = await device(ctx, 'dev-mute');
    try {
      const cmd = await hub.sendCommand('dev-mute', 'reboot', {}, 1500);
      await waitFor(async () => (await one(ctx, 'dev-mute', cmd.id)).status === 'expired', 'expired', 10_000);
      const rec = await one(ctx, 'dev-mute', cmd.id);
      const n = dev.got.filter((c) => c.id === cmd.id).length;
      // first send at once, then 150, 300, 300, … ms apart within 1.5 s (a loaded machine may fit fewer)
      assert.ok(n >= 3, `sent ${n} times`);
      assert.equal(rec.sends, n);
      assert.ok(rec.expiredAt! >= cmd.expiresAt);
      assert.ok(dev.got.every((c) => c.id === cmd.id));
      await new Promise((r) => setTimeout(r, 500));
      assert.equal(dev.got.length, n, 'nothing sent after expiry');
      const list = await getJson<{ open: number; commands: CommandRecord[] }>(ctx, '/api/v1/devices/dev-mute/commands');
      assert.equal(list.open, 0);
      assert.match(await (await fetch(`${ctx.http}/metrics`)).text(), /fleet_hub_commands_total\{result="expired"\} 1/);
      // a late reply is still recorded: the device's word on what happened
      await replyTo(dev.client, 'dev-mute', cmd.id, '1', false);
      await waitFor(async () => (await one(ctx, 'dev-mute', cmd.id)).status === 'replied', 'late reply recorded');
      assert.ok((await one(ctx, 'dev-mute', cmd.id)).expiredAt);
    } finally {
      await disconnectFleetClient(dev.client, 'dev-mute', 'agent', '1.0.0');
    }
  });
});

test('commands: at most maxPendingPerDevice awaiting a reply: 429 FLEET_COMMAND_QUEUE_FULL, room again after a reply', async () => {
  await withCmdHub({ commands: { maxPendingPerDevice: 3 } }, async (_hub, ctx) => {
    const ids: string[] = [];
    for (let i = 0; i < 3; i++) {
      const r = await post(ctx, 'dev-full', { name: 'ping' });
      assert.equal(r.status, 202);
      ids.push(((await r.json()) as CommandRecord).id);
    }
    const refused = await post(ctx, 'dev-full', { name: 'ping' });
    assert.equal(refused.status, 429);
    assert.equal(refused.headers.get('retry-after'), '30');
    assert.equal(((await refused.json()) as { error: { code: string } }).error.code, 'FLEET_COMMAND_QUEUE_FULL');
    assert.equal((await post(ctx, 'dev-other', { name: 'ping' })).status, 202, 'the cap is per device');
    const dev = await device(ctx, 'dev-full');
    try {
      await waitFor(() => dev.got.length === 3, 'three delivered');
      await replyTo(dev.client, 'dev-full', ids[0]!, '1');
      await waitFor(async () => (await one(ctx, 'dev-full', ids[0]!)).status === 'replied', 'replied');
      assert.equal((await post(ctx, 'dev-full', { name: 'ping' })).status, 202);
    } finally {
      await disconnectFleetClient(dev.client, 'dev-full', 'agent', '1.0.0');
    }
  });
});

/** A gateway that registers `mcus` and subscribes the relay filter for commands; `got` lists "topic commandId" as they come. */
async function relayGateway(ctx: HubCtx, id: string, mcus: string[]): Promise<{ gw: MqttClient; got: string[] }> {
  const gw = await connectDevice(ctx, id);
  const got: string[] = [];
  gw.on('message', (topic, payload) => got.push(`${topic} ${decodeMessage('cmd', payload).id}`));
  await gw.publishAsync(deviceTopic(id, 'register'), encodeMessage({ v: 1, ts: Date.now(), mcus }), { qos: 1, retain: true });
  await gw.subscribeAsync(RELAY_CMD, { qos: 1 });
  return { gw, got };
}

test('commands: a hub restart keeps pending and finished commands; pending ones are delivered after it', async () => {
  const tmp = tempDir();
  try {
    let { hub, ctx } = await hubOn(tmp.dir);
    const done = await hub.sendCommand('dev-r', 'ping', {}, 60_000);
    const dev = await device(ctx, 'dev-r');
    await waitFor(() => dev.got.length === 1, 'first delivered');
    await replyTo(dev.client, 'dev-r', done.id, '1');
    await waitFor(async () => (await one(ctx, 'dev-r', done.id)).status === 'replied', 'replied');
    const clients = hub.broker.aedes.connectedClients;
    await disconnectFleetClient(dev.client, 'dev-r', 'agent', '1.0.0');
    // the hub sees the connection gone a moment after the client does: until then a command
    // goes to that connection and counts as delivered (CI saw 'delivered' below once)
    await waitFor(() => hub.broker.aedes.connectedClients === clients - 1, 'dev-r gone at the hub');
    const waiting = await hub.sendCommand('dev-r', 'restart-app', { app: 'web' }, 60_000);
    const mcuCmd = await hub.sendCommand('esp-r', 'blink', {}, 60_000);
    await hub.stop();

    ({ hub, ctx } = await hubOn(tmp.dir));
    try {
      assert.equal((await one(ctx, 'dev-r', done.id)).status, 'replied');
      assert.equal((await one(ctx, 'dev-r', waiting.id)).status, 'pending');
      assert.equal((await one(ctx, 'esp-r', mcuCmd.id)).status, 'pending');
      const again = await device(ctx, 'dev-r');
      try {
        await waitFor(() => again.got.length === 1, 'pending command delivered after the restart');
        assert.equal(again.got[0]!.id, waiting.id);
        assert.deepEqual(again.got[0]!.args, { app: 'web' });
        await replyTo(again.client, 'dev-r', waiting.id, '2');
        await waitFor(async () => (await one(ctx, 'dev-r', waiting.id)).status === 'replied', 'replied after restart');
      } finally {
        await disconnectFleetClient(again.client, 'dev-r', 'agent', '1.0.0');
      }
      // the MCU's command goes to the gateway that registers it, through the relay filter
      const { gw, got } = await relayGateway(ctx, 'gw-r', ['esp-r']);
      try {
        await waitFor(() => got.length === 1, 'MCU command delivered to its gateway');
        assert.equal(got[0], `${deviceTopic('esp-r', 'cmd')} ${mcuCmd.id}`);
        await waitFor(async () => (await one(ctx, 'esp-r', mcuCmd.id)).status === 'delivered', 'delivered to the gateway');
      } finally {
        await gw.endAsync();
      }
    } finally {
      await hub.stop();
    }
  } finally {
    tmp.cleanup();
  }
});

test('commands: an MCU registered after its gateway subscribed gets its command when the gateway reports it online', async () => {
  await withCmdHub({}, async (hub, ctx) => {
    const { gw, got } = await relayGateway(ctx, 'gw-1', ['esp-a']);
    try {
      const cmd = await hub.sendCommand('esp-b', 'blink', {}, 60_000);
      await new Promise((r) => setTimeout(r, 200));
      assert.equal((await one(ctx, 'esp-b', cmd.id)).status, 'pending', 'not registered by anyone yet');
      await gw.publishAsync(deviceTopic('gw-1', 'register'), encodeMessage({ v: 1, ts: Date.now(), mcus: ['esp-a', 'esp-b'] }), { qos: 1, retain: true });
      await gw.publishAsync(deviceTopic('esp-b', 'state'), encodeMessage({ v: 1, online: true, kind: 'mcu' as const, ts: Date.now(), via: 'gw-1' }), { qos: 1, retain: true });
      await waitFor(() => got.length === 1, 'delivered once the MCU is registered and online');
      assert.equal(got[0], `${deviceTopic('esp-b', 'cmd')} ${cmd.id}`);
      // a command for a registered MCU goes out at once (sleeping MCUs wait in the gateway's mailbox)
      const now = await hub.sendCommand('esp-a', 'blink', {}, 60_000);
      await waitFor(() => got.length === 2, 'sent at once');
      assert.equal(got[1], `${deviceTopic('esp-a', 'cmd')} ${now.id}`);
    } finally {
      await gw.endAsync();
    }
  });
});

test('commands: a real agent runs a command sent while it was offline once; repeats of the id, also after an agent restart, do not run it again', async () => {
  await withCmdHub({}, async (_hub, ctx) => {
    const tmp = tempDir();
    const starts = join(tmp.dir, 'starts');
    const tokenFile = join(tmp.dir, 'device.token');
    writeFileSync(tokenFile, deriveToken(ctx.secret, 'device', 'dev-ag'), { mode: 0o600 });
    const config = AgentConfigSchema.parse({
      deviceId: 'dev-ag',
      stateDir: join(tmp.dir, 'agent'),
      api: { port: 0, rateLimit: 0 },
      hub: { url: ctx.url, tokenFile, keepaliveS: 5 },
      apps: [{ name: 'web', command: '/bin/sh', args: ['-c', `echo start >> ${starts}; exec sleep 60`], stopTimeoutMs: 2000 }],
    });
    const startCount = () => {
      try {
        return readFileSync(starts, 'utf8').split('\n').filter(Boolean).length;
      } catch {
        return 0;
      }
    };
    const op = await connect(ctx.url, 'ops-ag', 'operator', ctx.operator);
    const replies: string[] = [];
    await op.subscribeAsync(deviceTopic('dev-ag', 'reply'), { qos: 1 });
    op.on('message', (_t, payload) => replies.push(decodeMessage('reply', payload).id));
    let agent = null as Awaited<ReturnType<typeof startAgent>> | null;
    try {
      const r = await post(ctx, 'dev-ag', { name: 'restart-app', args: { app: 'web' }, ttlMs: 60_000 });
      const cmd = (await r.json()) as CommandRecord;
      agent = await startAgent(config, testLogger('agent'), '1.0.0');
      await waitFor(async () => (await one(ctx, 'dev-ag', cmd.id)).status === 'replied', 'the agent ran it and replied', 20_000);
      const rec = await one(ctx, 'dev-ag', cmd.id);
      assert.equal(rec.ok, true, JSON.stringify(rec));
      await waitFor(() => startCount() === 2, 'app started, then restarted by the command');

      // the hub (or a broker redelivery) sends the same id again, twice: not run again, the reply is sent again
      const wire = encodeMessage({ v: 1, id: cmd.id, name: cmd.name, args: cmd.args, expiresAt: cmd.expiresAt } satisfies Command);
      await op.publishAsync(deviceTopic('dev-ag', 'cmd'), wire, { qos: 1 });
      await op.publishAsync(deviceTopic('dev-ag', 'cmd'), wire, { qos: 1 });
      await waitFor(() => replies.filter((id) => id === cmd.id).length >= 3, 'the stored reply re-sent for each repeat');
      assert.equal(startCount(), 2, 'the app was not restarted again');
      assert.equal(agent.supervisor.status().find((a) => a.name === 'web')?.restarts, 1);

      // an agent restart: the handled id is remembered on disk
      await agent.stop();
      agent = await startAgent(config, testLogger('agent'), '1.0.0');
      await waitFor(() => startCount() === 3, 'app started by the new agent');
      await waitFor(() => agent?.supervisor.status().find((a) => a.name === 'web')?.state === 'running', 'app running');
      // a new command through the hub: once it is replied, the agent is subscribed again
      const ping = (await (await post(ctx, 'dev-ag', { name: 'ping' })).json()) as CommandRecord;
      await waitFor(async () => (await one(ctx, 'dev-ag', ping.id)).status === 'replied', 'the restarted agent answers commands', 20_000);
      const before = replies.length;
      await op.publishAsync(deviceTopic('dev-ag', 'cmd'), wire, { qos: 1 });
      await waitFor(() => replies.length > before, 'the reply re-sent by the restarted agent');
      assert.equal(startCount(), 3, 'not run again after the agent restart');
      assert.equal(agent.supervisor.status().find((a) => a.name === 'web')?.restarts, 0);
    } finally {
      await agent?.stop();
      await op.endAsync();
      tmp.cleanup();
    }
  });
});

test('agent dedupe unit (SeenCommands, a real file): a command cut off by a restart is answered FLEET_COMMAND_INTERRUPTED, not run; expired and excess entries are forgotten', () => {
  const tmp = tempDir();
  try {
    const file = join(tmp.dir, 'seen.json');
    let now = 1_000_000;
    const s = SeenCommands.load(file, { max: 3, now: () => now });
    assert.deepEqual(s.begin('a', now + 10_000), { kind: 'new' });
    assert.deepEqual(s.begin('a', now + 10_000), { kind: 'running' });
    s.finish('a', { id: 'a', ok: true, result: { x: 1 } });
    assert.deepEqual(s.begin('a', now + 10_000), { kind: 'done', reply: { id: 'a', ok: true, result: { x: 1 } } });
    assert.deepEqual(s.begin('b', now + 5_000), { kind: 'new' }); // left running: the "agent" dies now

    const s2 = SeenCommands.load(file, { max: 3, now: () => now });
    assert.deepEqual(s2.begin('a', now + 10_000), { kind: 'done', reply: { id: 'a', ok: true, result: { x: 1 } } });
    const b = s2.begin('b', now + 5_000);
    assert.equal(b.kind, 'done');
    assert.equal(b.kind === 'done' && b.reply.error?.code, 'FLEET_COMMAND_INTERRUPTED');
    // a large result is not kept
    assert.deepEqual(s2.begin('big', now + 10_000), { kind: 'new' });
    s2.finish('big', { id: 'big', ok: true, result: 'x'.repeat(10_000) });
    assert.deepEqual(s2.begin('big', now + 10_000), { kind: 'done', reply: { id: 'big', ok: true, result: { truncated: true } } });
    // b expires: forgotten at the next write; beyond max the oldest finished go first
    now += 6_000;
    for (const id of ['c', 'd']) {
      s2.begin(id, now + 10_000);
      s2.finish(id, { id, ok: true });
    }
    assert.equal(s2.size, 3);
    assert.deepEqual(s2.begin('b', now + 10_000), { kind: 'new' }, 'expired: forgotten');
    assert.deepEqual(s2.begin('a', now + 10_000), { kind: 'new' }, 'evicted as the oldest finished');
    // a damaged file is an empty set, not a crash
    writeFileSync(file, '{not json');
    assert.equal(SeenCommands.load(file).size, 0);
  } finally {
    tmp.cleanup();
  }
});

test('commands: the limits are hub config keys (commands.*): a smaller per-device cap refuses the next command; a bad value names its key', async () => {
  const tmp = tempDir();
  try {
    const hub = await startHub(HubConfigSchema.parse({ mqttPort: 0, httpPort: 0, stateDir: tmp.dir, commands: { maxPendingPerDevice: 2 } }), testLogger('hub'));
    try {
      await hub.sendCommand('dev-c', 'ping', {}, 60_000);
      await hub.sendCommand('dev-c', 'ping', {}, 60_000);
      await assert.rejects(hub.sendCommand('dev-c', 'ping', {}, 60_000), (e: unknown) => (e as { code?: string }).code === 'FLEET_COMMAND_QUEUE_FULL');
    } finally {
      await hub.stop();
    }
    const bad = HubConfigSchema.safeParse({ commands: { maxPendingPerDevice: 0 } });
    assert.equal(bad.success, false);
    assert.deepEqual(bad.error?.issues[0]?.path, ['commands', 'maxPendingPerDevice']);
  } finally {
    tmp.cleanup();
  }
});
