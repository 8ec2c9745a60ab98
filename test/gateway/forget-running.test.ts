import assert from 'node:assert/strict';
import { mkdirSync, readFileSync } from 'node:fs';
import { createServer, connect, type AddressInfo, type Socket } from 'node:net';
import { join } from 'node:path';
import { test } from 'node:test';
import type { MqttClient } from 'mqtt';
import { deriveToken } from '../../core/credentials.ts';
import { decodeMessage, type GatewayRegistration } from '../../core/messages.ts';
import { writeSecretFile } from '../../core/secrets.ts';
import { deviceTopic } from '../../core/topics.ts';
import { GatewayConfigSchema } from '../../gateway/config.ts';
import { startGateway, type GatewayHandle } from '../../gateway/index.ts';
import { HubConfigSchema } from '../../hub/config.ts';
import { startHub, type HubHandle } from '../../hub/index.ts';
import { cleanups, tempDir, testLogger, waitFor } from '../helpers.ts';
import { coap, coapBlock, connectMcu, nextCounter } from './env.ts';

/**
 * A running gateway forgets MCUs silent longer than mcu.forgetAfterDays (it used to do so
 * only at start), keeps those with records still in its outbox until they are delivered,
 * and publishes the shrunk register to the hub. Real hub, real gateway, real MQTT MCUs; a
 * TCP relay between gateway and hub holds bytes back to keep a record in the outbox.
 * Time: an injected clock for MCU silence (GatewayExtras.now) moved 91 days ahead, and the
 * hourly check run every 100 ms (GatewayExtras.forgetCheckMs).
 */

const GW = 'gw-f';
const DAY = 86_400_000;

interface Seen {
  topic: string;
  payload: Buffer;
}

function publish(c: MqttClient, id: string, v: number): Promise<void> {
  return new Promise((resolve, reject) => c.publish(`mcu/v1/${id}/t`, JSON.stringify([{ n: 'temperature', v }]), { qos: 1 }, (err) => (err ? reject(err) : resolve())));
}

/** One MCU connects, sends one reading (PUBACK = stored at the gateway) and disconnects. */
async function speak(gw: GatewayHandle, site: string, id: string, v: number): Promise<void> {
  const c = await connectMcu(gw.mqttPort, id, site);
  try {
    await publish(c, id, v);
  } catch (err) {
    c.end(true); // not left connected (and reconnecting) when the publish failed
    throw err;
  }
  await c.endAsync();
}

/**
 * A TCP relay between the gateway and the hub that can hold the bytes back (`freeze`: the
 * connection stays up, nothing passes, as with a hub that stalls) and let them through
 * again (`thaw`). Real sockets both ways.
 */
async function stallableLink(target: number): Promise<{ port: number; freeze: () => void; thaw: () => void; close: () => Promise<void> }> {
  let frozen = false;
  const held: Array<() => void> = [];
  const socks = new Set<Socket>();
  const server = createServer((down) => {
    const up = connect({ port: target, host: '127.0.0.1' });
    socks.add(down).add(up);
    const pass = (from: Socket, to: Socket) =>
      from.on('data', (d: Buffer) => {
        if (frozen) held.push(() => to.write(d));
        else to.write(d);
      });
    pass(down, up);
    pass(up, down);
    for (const [a, b] of [[down, up], [up, down]] as const) {
      a.on('error', () => undefined);
      a.on('close', () => {
        socks.delete(a);
        b.destroy();
      });
    }
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  return {
    port: (server.address() as AddressInfo).port,
    freeze: () => {
      frozen = true;
    },
    thaw: () => {
      frozen = false;
      for (const f of held.splice(0)) f();
    },
    close: async () => {
      for (const s of socks) s.destroy();
      await new Promise<void>((r) => server.close(() => r()));
    },
  };
}

/**
 * A gateway GW under gwDir on hub `h`, reached at `hubPort` (the hub's own port or a relay in
 * front of it), that forgets MCUs silent for 90 days by the clock `now`, checked every 100 ms.
 */
async function startForgettingGateway(h: HubHandle, hubPort: number, gwDir: string, now: () => number): Promise<{ gw: GatewayHandle; log: ReturnType<typeof testLogger> }> {
  mkdirSync(gwDir, { recursive: true });
  writeSecretFile(join(gwDir, 'token'), deriveToken(readFileSync(h.fleetSecretFile, 'utf8').trim(), 'device', GW));
  const config = GatewayConfigSchema.parse({ deviceId: GW, stateDir: gwDir, hub: { url: `mqtt://127.0.0.1:${hubPort}`, reconnectMs: 100 }, mcu: { mqttPort: 0, coapPort: 0, forgetAfterDays: 90 }, stateFlushMs: 100 });
  const log = testLogger('gateway');
  return { gw: await startGateway(config, log, '0.0.0-test', { now, forgetCheckMs: 100 }), log };
}

test('gateway running (injected clock): MCUs silent past mcu.forgetAfterDays are forgotten by the periodic check, not one with a record still in the outbox (until the hub acknowledged it), one with a command in its mailbox or one still connected, and the register the hub holds shrinks', async (t) => {
  const defer = cleanups(t);
  const tmp = tempDir();
  defer(tmp.cleanup);
  let clock = Date.now();
  const h = await startHub(HubConfigSchema.parse({ mqttPort: 0, httpPort: 0, stateDir: join(tmp.dir, 'hub') }), testLogger('hub'));
  defer(() => h.stop());
  const link = await stallableLink(h.mqttPort);
  defer(() => link.close());
  const seen: Seen[] = [];
  const collect = (packet: { topic: string; payload: Buffer | string }, cb: () => void) => {
    seen.push({ topic: packet.topic, payload: Buffer.from(packet.payload) });
    cb();
  };
  await new Promise<void>((r) => h.broker.aedes.subscribe('fleet/v1/#', collect, r));
  defer(() => new Promise<void>((r) => h.broker.aedes.unsubscribe('fleet/v1/#', collect, r)));
  const lastRegister = (): string | undefined => {
    const r = seen.filter((s) => s.topic === deviceTopic(GW, 'register')).at(-1);
    return r ? [...(decodeMessage('register', r.payload) as GatewayRegistration).mcus].sort().join() : undefined;
  };
  const gwDir = join(tmp.dir, 'gateway');
  const { gw, log } = await startForgettingGateway(h, link.port, gwDir, () => clock);
  defer(async () => {
    link.thaw(); // a failed step may leave the link stalled: the gateway's stop would wait on it
    await gw.stop();
  });
  let idle: MqttClient | undefined;
  const forgottenLogged = () => log.lines.filter((l) => l.msg === 'MCUs not heard from in mcu.forgetAfterDays forgotten').flatMap((l) => l.examples as string[]);
  const site = readFileSync(gw.siteSecretFile, 'utf8').trim();
  await waitFor(() => gw.stats().hubConnected, 'gateway connected to the hub');
  // day 0: two MCUs speak and their readings reach the hub
  await speak(gw, site, 'esp-gone', 1);
  await speak(gw, site, 'esp-back', 1);
  // and one that the hub then sends a command: it waits in the gateway's mailbox (the MCU never picks it up)
  await speak(gw, site, 'esp-cmd', 1);
  // and one that stays connected and says nothing more (its client only pings)
  idle = await connectMcu(gw.mqttPort, 'esp-idle', site);
  defer(() => idle?.end(true));
  await publish(idle, 'esp-idle', 1);
  await waitFor(() => gw.stats().outbox.depth === 0 && lastRegister() === 'esp-back,esp-cmd,esp-gone,esp-idle', 'delivered, all four registered');
  const operator = readFileSync(h.operatorTokenFile, 'utf8').trim();
  const res = await fetch(`http://127.0.0.1:${h.httpPort}/api/v1/devices/esp-cmd/commands`, { method: 'POST', headers: { authorization: `Bearer ${operator}`, 'content-type': 'application/json' }, body: JSON.stringify({ name: 'blink', ttlMs: 3_600_000 }) });
  assert.equal(res.status, 202);
  await waitFor(() => gw.stats().mailboxDepth === 1, 'the command in esp-cmd’s mailbox');
  // the hub stalls (connection up, nothing acknowledged): a third MCU's reading stays in the outbox
  link.freeze();
  await speak(gw, site, 'esp-queued', 1);
  assert.equal(gw.stats().outbox.depth, 1);

  // 91 days later by the MCU clock: a fourth MCU speaks, the first three have been silent
  clock += 91 * DAY;
  await speak(gw, site, 'esp-today', 1);
  await waitFor(() => gw.stats().mcus === 4, 'the silent MCUs with nothing queued forgotten', 5000);
  assert.deepEqual(forgottenLogged().sort(), ['esp-back', 'esp-gone']);
  await new Promise((r) => setTimeout(r, 500)); // five more checks
  assert.equal(gw.stats().mcus, 4, 'esp-queued kept while its reading is in the outbox, esp-cmd while a command waits for it, esp-idle while connected');

  // the hub takes what was held: esp-queued's reading is delivered, then a check forgets it too
  link.thaw();
  await waitFor(() => seen.some((s) => s.topic === deviceTopic('esp-queued', 'telemetry')), 'esp-queued’s reading at the hub', 10_000);
  await waitFor(() => gw.stats().mcus === 3, 'esp-queued forgotten once delivered', 5000);
  assert.deepEqual(forgottenLogged().sort(), ['esp-back', 'esp-gone', 'esp-queued']);
  await waitFor(() => lastRegister() === 'esp-cmd,esp-idle,esp-today', 'the register at the hub lists esp-cmd, esp-idle and esp-today', 5000);

  // a forgotten MCU that speaks again is a new MCU: accepted, registered again, delivered
  await speak(gw, site, 'esp-gone', 2);
  await waitFor(() => lastRegister() === 'esp-cmd,esp-gone,esp-idle,esp-today', 'esp-gone registered again', 5000);
  await waitFor(() => seen.filter((s) => s.topic === deviceTopic('esp-gone', 'telemetry')).length === 2, 'its new reading at the hub', 5000);
  // the saved list follows
  await waitFor(() => {
    const saved = JSON.parse(readFileSync(join(gwDir, 'mcu-state.json'), 'utf8')) as { mcus: string[] };
    return [...saved.mcus].sort().join() === 'esp-cmd,esp-gone,esp-idle,esp-today';
  }, 'mcu-state.json lists the four left', 5000);
});

test('gateway running (injected clock): a CoAP MCU forgotten after mcu.forgetAfterDays loses the source address firmware blocks were served to (it must authenticate again before it gets blocks), but not its counters: a reading captured before is still a replay, also after a restart', async (t) => {
  const defer = cleanups(t);
  const tmp = tempDir();
  defer(tmp.cleanup);
  let clock = Date.now();
  const h = await startHub(HubConfigSchema.parse({ mqttPort: 0, httpPort: 0, stateDir: join(tmp.dir, 'hub') }), testLogger('hub'));
  defer(() => h.stop());
  let { gw } = await startForgettingGateway(h, h.mqttPort, join(tmp.dir, 'gateway'), () => clock);
  // whichever gateway runs when the test ends (it restarts it); stop() of a stopped one returns the first stop's promise
  defer(() => gw.stop());
  const site = readFileSync(gw.siteSecretFile, 'utf8').trim();
  await waitFor(() => gw.stats().hubConnected, 'gateway connected to the hub');
  // a reading over CoAP: counter consumed, this address is the MCU's
  const reading = Buffer.from(JSON.stringify([{ n: 'temperature', v: 1 }]));
  const first = nextCounter();
  assert.equal((await coap(gw.coapPort, site, 'esp-coap', 't', 'POST', reading, { format: 50, counter: first })).code, '2.04');
  await waitFor(() => gw.stats().mcus === 1 && gw.stats().outbox.depth === 0, 'esp-coap known and its reading delivered');
  // past the address check: nothing is offered to it (4.04, not 4.01)
  assert.equal((await coapBlock(gw.coapPort, site, 'esp-coap', 0, 64)).code, '4.04');
  clock += 91 * DAY;
  await waitFor(() => gw.stats().mcus === 0, 'esp-coap forgotten', 5000);
  // the same request from the same address: the address went with the MCU
  const after = await coapBlock(gw.coapPort, site, 'esp-coap', 0, 64);
  assert.equal(after.code, '4.01');
  assert.match(after.body.toString(), /FLEET_MCU_ADDRESS/);
  // the reading captured before it was forgotten, replayed: still a replay (its counter stays spent)
  const replayed = await coap(gw.coapPort, site, 'esp-coap', 't', 'POST', reading, { format: 50, counter: first });
  assert.equal(replayed.code, '4.01');
  assert.match(replayed.body.toString(), /FLEET_MCU_REPLAY/);
  assert.equal(gw.stats().mcus, 0, 'the replay did not bring it back');
  // the floor is written with the state: after a restart, still a replay
  await gw.stop();
  gw = (await startForgettingGateway(h, h.mqttPort, join(tmp.dir, 'gateway'), () => clock)).gw;
  const replayedAfterRestart = await coap(gw.coapPort, site, 'esp-coap', 't', 'POST', reading, { format: 50, counter: first });
  assert.equal(replayedAfterRestart.code, '4.01');
  assert.match(replayedAfterRestart.body.toString(), /FLEET_MCU_REPLAY/);
  // the MCU itself, with its next counter, is welcome back
  assert.equal((await coap(gw.coapPort, site, 'esp-coap', 't', 'POST', reading, { format: 50 })).code, '2.04');
  await waitFor(() => gw.stats().mcus === 1, 'esp-coap known again');
});
