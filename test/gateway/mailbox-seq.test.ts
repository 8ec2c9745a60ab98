import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import type { MqttClient } from 'mqtt';
import { deriveToken } from '../../core/credentials.ts';
import { writeSecretFile } from '../../core/secrets.ts';
import { openStore } from '../../core/store.ts';
import { mcuKey } from '../../firmware-bridge/auth.ts';
import { decodeMcuCommand, encodeMcuCommand } from '../../firmware-bridge/frames.ts';
import { mcuTopic } from '../../firmware-bridge/topics.ts';
import { GatewayConfigSchema } from '../../gateway/config.ts';
import { startGateway, type GatewayHandle } from '../../gateway/index.ts';
import { Mailbox, toMcuCommand } from '../../gateway/mailbox.ts';
import { HubConfigSchema } from '../../hub/config.ts';
import { startHub } from '../../hub/index.ts';
import { tempDir, testLogger, waitFor } from '../helpers.ts';
import { connectMcu } from './env.ts';

/**
 * The MCU side of the command rule (docs/mcu-protocol.md "What the MCU receives"): verify
 * the MAC, then one stored `seq` whichever gateway sent the command. Above it: run, keep
 * it, ack. Equal: a redelivery, ack again without running. Below: a replay, ignore.
 */
class McuCommandRule {
  stored = 0;
  readonly ran: string[] = [];
  readonly ignored: string[] = [];
  constructor(
    private readonly key: string,
    private readonly id: string,
  ) {}

  /** What the MCU does with one command frame; the ack it sends, if any. */
  onFrame(frame: Buffer): { id: string; ok: true; r: unknown } | undefined {
    const { seq, cmd } = decodeMcuCommand(this.key, this.id, frame);
    if (seq < this.stored) {
      this.ignored.push(cmd.id);
      return undefined;
    }
    if (seq === this.stored) return { id: cmd.id, ok: true, r: 'duplicate' };
    this.stored = seq;
    this.ran.push(cmd.id);
    return { id: cmd.id, ok: true, r: { ran: cmd.n } };
  }
}

const cmd = (id: string, expiresAt: number) => ({ id, name: 'set-interval', args: { s: 60 }, expiresAt });

test('mailbox seq (two LevelDB stores, one MCU-side seq rule): commands from a second gateway\'s store run after the MCU roamed, and back; clock skew and an in-place upgrade as documented', async () => {
  const tmp = tempDir();
  const site = 'example-site-secret-for-mailbox-seq-test';
  const id = 'esp-roam';
  const key = mcuKey(site, id);
  const mcu = new McuCommandRule(key, id);
  // one gateway's delivery of its mailbox head: framed and signed as service.ts does, then
  // given to the MCU; an ack (run or duplicate) removes it, as the gateway does on the ack
  const deliver = async (mb: Mailbox, now: number): Promise<string | undefined> => {
    const head = mb.head(id, now);
    assert.ok(head, 'a command waits');
    const ack = mcu.onFrame(encodeMcuCommand(key, id, head.seq, toMcuCommand(head)));
    if (ack) await mb.remove(id, ack.id, now);
    return ack ? (typeof ack.r === 'string' ? ack.r : 'ran') : undefined;
  };
  const dbA = await openStore<string>(join(tmp.dir, 'gw-a'), 'utf8');
  const dbB = await openStore<string>(join(tmp.dir, 'gw-b'), 'utf8');
  try {
    const t0 = Date.now();
    const a = await Mailbox.open(dbA, 16);
    const b = await Mailbox.open(dbB, 16);

    // gw-a serves the MCU: two commands
    await a.enqueue(id, cmd('a1', t0 + 60_000), t0);
    await a.enqueue(id, cmd('a2', t0 + 60_000), t0);
    assert.equal(await deliver(a, t0), 'ran');
    assert.equal(await deliver(a, t0), 'ran');
    assert.equal(mcu.stored, t0 + 1, 'clock based, and two in the same ms still grow');

    // the MCU roams to gw-b (or gw-a is replaced by a new box: a fresh store)
    const b1 = (await b.enqueue(id, cmd('b1', t0 + 65_000), t0 + 5000)).entry;
    assert.equal(b1.seq, t0 + 5000);
    assert.equal(await deliver(b, t0 + 5000), 'ran', 'a per-gateway count from 1 would be ignored here');
    // ... and back to gw-a, whose own last seq is below what gw-b sent
    await a.enqueue(id, cmd('a3', t0 + 66_000), t0 + 6000);
    assert.equal(await deliver(a, t0 + 6000), 'ran');

    // gw-b's clock 10 s behind: what it queues within the skew is at or below the MCU's
    // seq and ignored until it expires (bounded by the skew); what it queues after its
    // clock passed gw-a's last seq runs
    const skewed = t0 + 7000 - 10_000;
    await b.enqueue(id, cmd('b2', skewed + 1000), skewed);
    assert.equal(await deliver(b, skewed), undefined, 'ignored, as documented');
    assert.deepEqual(mcu.ignored, ['b2']);
    assert.ok(await b.remove(id, 'b2', skewed + 1000), 'expired');
    await b.enqueue(id, cmd('b3', t0 + 70_000), t0 + 6001);
    assert.equal(await deliver(b, t0 + 6001), 'ran');

    // one gateway never repeats or lowers a seq: its clock stepped back
    const back1 = (await b.enqueue(id, cmd('b4', t0 + 70_000), t0 - 60_000)).entry;
    assert.equal(back1.seq, t0 + 6002);
    assert.equal(await deliver(b, t0 - 60_000), 'ran');
    assert.deepEqual(mcu.ran, ['a1', 'a2', 'b1', 'a3', 'b3', 'b4']);
  } finally {
    await dbA.close();
    await dbB.close();
  }

  // a gateway upgraded in place: small seqs from the old per-gateway count in its store,
  // one command still queued with one; it goes out first and runs, the next jumps to the clock
  const dbC = await openStore<string>(join(tmp.dir, 'gw-c'), 'utf8');
  try {
    const t1 = Date.now();
    const old = { seq: 57, id: 'old-57', name: 'set-interval', args: { s: 30 }, expiresAt: t1 + 60_000, queuedAt: t1 - 1000 };
    await dbC.batch([
      { type: 'put', key: `q!esp-up!${String(57).padStart(16, '0')}`, value: JSON.stringify(old) },
      { type: 'put', key: 's!esp-up', value: '57' },
    ]);
    const c = await Mailbox.open(dbC, 16);
    const next = (await c.enqueue('esp-up', cmd('new-1', t1 + 60_000), t1)).entry;
    assert.equal(next.seq, t1);
    assert.deepEqual(c.entries('esp-up').map((e) => [e.id, e.seq]), [['old-57', 57], ['new-1', t1]], 'arrival order kept');
    const up = new McuCommandRule(mcuKey(site, 'esp-up'), 'esp-up');
    up.stored = 56;
    for (const e of [...c.entries('esp-up')]) {
      assert.ok(up.onFrame(encodeMcuCommand(mcuKey(site, 'esp-up'), 'esp-up', e.seq, toMcuCommand(e))));
      await c.remove('esp-up', e.id, t1);
    }
    assert.deepEqual(up.ran, ['old-57', 'new-1']);
    // persisted: a restart goes on above it
    await dbC.close();
    const dbC2 = await openStore<string>(join(tmp.dir, 'gw-c'), 'utf8');
    try {
      const c2 = await Mailbox.open(dbC2, 16);
      assert.equal((await c2.enqueue('esp-up', cmd('new-2', t1 + 60_000), t1 - 5000)).entry.seq, t1 + 1);
    } finally {
      await dbC2.close();
    }
  } finally {
    if (dbC.status === 'open') await dbC.close();
    tmp.cleanup();
  }
});

test('gateway: two gateways with one site secret serve one MCU in turn; a command sent through the second one after the MCU moved is run and acked', async () => {
  const tmp = tempDir();
  const hub = await startHub(HubConfigSchema.parse({ mqttPort: 0, httpPort: 0, stateDir: join(tmp.dir, 'hub') }), testLogger('hub'));
  const fleetSecret = readFileSync(hub.fleetSecretFile, 'utf8').trim();
  const siteSecretFile = join(tmp.dir, 'site.secret');
  const gws: GatewayHandle[] = [];
  const clients: MqttClient[] = [];
  const startGw = async (gwId: string): Promise<GatewayHandle> => {
    const stateDir = join(tmp.dir, gwId);
    writeSecretFile(join(stateDir, 'token'), deriveToken(fleetSecret, 'device', gwId));
    const config = GatewayConfigSchema.parse({ deviceId: gwId, stateDir, hub: { url: `mqtt://127.0.0.1:${hub.mqttPort}`, reconnectMs: 200 }, mcu: { mqttPort: 0, coapPort: 0, siteSecretFile } });
    const gw = await startGateway(config, testLogger(gwId), '0.0.0-test');
    gws.push(gw);
    await waitFor(() => gw.stats().hubConnected, `${gwId} connected to the hub`);
    return gw;
  };
  const id = 'esp-roam';
  try {
    const gwA = await startGw('gw-a');
    const gwB = await startGw('gw-b');
    const site = readFileSync(siteSecretFile, 'utf8').trim();
    // the simulated MCU's stored seq lives across connections and gateways (its NVS)
    const mcu = new McuCommandRule(mcuKey(site, id), id);
    const attach = async (gw: GatewayHandle): Promise<MqttClient> => {
      const m = await connectMcu(gw.mqttPort, id, site);
      clients.push(m);
      m.on('message', (_t, p) => {
        const ack = mcu.onFrame(Buffer.from(p));
        if (ack) m.publish(mcuTopic(id, 'ack'), JSON.stringify(ack), { qos: 1 });
      });
      await m.publishAsync(mcuTopic(id, 'hello'), JSON.stringify({ fw: '1.0.0', boot: 'power_on' }), { qos: 1 });
      await m.subscribeAsync(mcuTopic(id, 'cmd'), { qos: 1 });
      return m;
    };
    const run = async (name: string, s: number) => {
      const c = await hub.sendCommand(id, name, { s }, 60_000);
      const r = await waitFor(() => (hub.commands.get(id, c.id)?.status === 'replied' ? hub.commands.get(id, c.id) : undefined), `reply to ${c.id}`);
      return { id: c.id, ok: r.ok, result: r.result };
    };

    // the MCU at gw-a: two commands run (seq 1 and 2 with a per-gateway count)
    const ma = await attach(gwA);
    await waitFor(() => hub.broker.mcusOf('gw-a')?.has(id), 'registered by gw-a');
    const r1 = await run('set-interval', 10);
    const r2 = await run('set-interval', 20);
    assert.deepEqual([r1.result, r2.result], [{ ran: 'set-interval' }, { ran: 'set-interval' }]);

    // gw-a fails; the MCU associates with gw-b, which takes it on at the hub
    await ma.endAsync();
    await gwA.stop();
    gws.splice(gws.indexOf(gwA), 1);
    await attach(gwB);
    await waitFor(() => hub.broker.mcusOf('gw-b')?.has(id), 'the MCU moved to gw-b at the hub');

    // a command through gw-b: its seq must be above what gw-a sent, or the MCU ignores it
    // (seq below: no ack, FLEET_TIMEOUT) or takes it for a redelivery (equal: acked, not run)
    const r3 = await run('set-interval', 30);
    assert.equal(r3.ok, true);
    assert.deepEqual(r3.result, { ran: 'set-interval' }, 'run, not acked as a duplicate');
    assert.deepEqual(mcu.ran, [r1.id, r2.id, r3.id]);
    assert.deepEqual(mcu.ignored, []);
    await waitFor(() => gwB.stats().mailboxDepth === 0, 'gw-b mailbox empty');
  } finally {
    for (const m of clients) await m.endAsync().catch(() => undefined);
    for (const g of gws) await g.stop();
    await hub.stop();
    tmp.cleanup();
  }
});
