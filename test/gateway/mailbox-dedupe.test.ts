import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { encodeMessage, type Command } from '../../core/messages.ts';
import { openStore } from '../../core/store.ts';
import { deviceTopic } from '../../core/topics.ts';
import { mcuKey } from '../../firmware-bridge/auth.ts';
import { decodeMcuCommand } from '../../firmware-bridge/frames.ts';
import { mcuTopic } from '../../firmware-bridge/topics.ts';
import { Mailbox, REMEMBER_PER_MCU } from '../../gateway/mailbox.ts';
import { connect } from '../hub/harness.ts';
import { tempDir, waitFor } from '../helpers.ts';
import { connectMcu, withEnv } from './env.ts';

const cmd = (id: string, expiresAt: number, name = 'blink') => ({ id, name, args: {}, expiresAt });

test('mailbox dedupe (real LevelDB): an id queued, or acknowledged and not expired, is not queued again, also after a reopen; fw.* offers may repeat', async () => {
  const tmp = tempDir();
  const dir = join(tmp.dir, 'mailbox');
  try {
    const now = Date.now();
    let db = await openStore<string>(dir, 'utf8');
    let mb = await Mailbox.open(db, 16);
    assert.equal((await mb.enqueue('esp-1', cmd('c1', now + 60_000), now)).duplicate, false);
    assert.equal((await mb.enqueue('esp-1', cmd('c1', now + 60_000), now)).duplicate, true, 'still queued');
    assert.equal(mb.depth, 1);
    // the MCU acknowledges it: out of the queue, remembered until it expires
    assert.ok(await mb.remove('esp-1', 'c1', now));
    const again = await mb.enqueue('esp-1', cmd('c1', now + 60_000), now);
    assert.equal(again.duplicate, true, 'acknowledged: not queued again');
    assert.equal(again.entry.ackedAt, now);
    assert.equal(mb.depth, 0);
    assert.equal(mb.head('esp-1', now), undefined);
    // another MCU with the same id is another command
    assert.equal((await mb.enqueue('esp-2', cmd('c1', now + 60_000), now)).duplicate, false);
    // the gateway's own firmware offers repeat their id by design
    await mb.enqueue('esp-1', cmd('fw-1.0.0-abcd', now + 60_000, 'fw.update'), now);
    await mb.remove('esp-1', 'fw-1.0.0-abcd', now);
    assert.equal((await mb.enqueue('esp-1', cmd('fw-1.0.0-abcd', now + 60_000, 'fw.update'), now)).duplicate, false, 'offer made again');
    await mb.remove('esp-1', 'fw-1.0.0-abcd', now);
    // a short-lived command, acknowledged
    await mb.enqueue('esp-1', cmd('c2', now + 1000), now);
    await mb.remove('esp-1', 'c2', now);
    await db.close();

    // a gateway restart: still remembered
    db = await openStore<string>(dir, 'utf8');
    mb = await Mailbox.open(db, 16);
    assert.equal((await mb.enqueue('esp-1', cmd('c1', now + 60_000), now)).duplicate, true, 'remembered across a restart');
    assert.equal(mb.depth, 1, 'only esp-2 c1 is queued');
    // once expired it is forgotten (the gateway refuses an expired command before this anyway)
    assert.equal(mb.acknowledged('esp-1', 'c2', now + 2000), undefined);
    assert.equal((await mb.enqueue('esp-1', cmd('c2', now + 5000), now + 2000)).duplicate, false);
    await db.close();

    // bounded: at most REMEMBER_PER_MCU acknowledged ids per MCU, the oldest forgotten first
    db = await openStore<string>(dir, 'utf8');
    mb = await Mailbox.open(db, 16);
    for (let i = 0; i < REMEMBER_PER_MCU + 5; i++) {
      await mb.enqueue('esp-3', cmd(`b${i}`, now + 60_000), now);
      await mb.remove('esp-3', `b${i}`, now + i);
    }
    assert.equal(mb.acknowledged('esp-3', 'b0', now), undefined, 'the oldest is forgotten');
    assert.ok(mb.acknowledged('esp-3', `b${REMEMBER_PER_MCU + 4}`, now));
    let stored = 0;
    for await (const _k of db.keys({ gte: 'a!esp-3!', lt: 'a!esp-3"' })) stored++;
    assert.equal(stored, REMEMBER_PER_MCU, 'and deleted from disk');
    await db.close();
  } finally {
    tmp.cleanup();
  }
});

test('gateway: the hub sending a command again after the MCU acknowledged it does not queue or push it twice', async () => {
  await withEnv(async ({ hub, gw, site, hubUrl }) => {
    const id = 'esp-dd';
    const m0 = await connectMcu(gw.mqttPort, id, site);
    await m0.publishAsync(mcuTopic(id, 'hello'), JSON.stringify({ fw: '1.0.0', boot: 'power_on', sleep: 60 }), { qos: 1 });
    await m0.endAsync();
    await waitFor(() => hub.broker.mcusOf('gw-1')?.has(id), 'registered');
    const c1 = await hub.sendCommand(id, 'set-interval', { s: 30 }, 60_000);
    await waitFor(() => gw.stats().mailboxDepth === 1, 'queued at the gateway');
    await waitFor(async () => hub.commands.get(id, c1.id)?.status === 'delivered', 'delivered to the gateway');

    // the hub sends it again while it is still queued (a re-send, or a redelivery)
    const op = await connect(hubUrl, 'ops-dd', 'operator', readFileSync(hub.operatorTokenFile, 'utf8').trim());
    const wire = encodeMessage({ v: 1, id: c1.id, name: c1.name, args: c1.args, expiresAt: c1.expiresAt } satisfies Command);
    try {
      await op.publishAsync(deviceTopic(id, 'cmd'), wire, { qos: 1 });
      await sleep(300);
      assert.equal(gw.stats().mailboxDepth, 1, 'a queued id is stored once');

      const m1 = await connectMcu(gw.mqttPort, id, site);
      const got: string[] = [];
      m1.on('message', (_t, p) => got.push(decodeMcuCommand(mcuKey(site, id), id, Buffer.from(p)).cmd.id));
      await m1.subscribeAsync(mcuTopic(id, 'cmd'), { qos: 1 });
      await waitFor(() => got.length === 1, 'pushed to the MCU');
      await m1.publishAsync(mcuTopic(id, 'ack'), JSON.stringify({ id: c1.id, ok: true }), { qos: 1 });
      await waitFor(async () => hub.commands.get(id, c1.id)?.status === 'replied', 'replied at the hub');
      assert.equal(gw.stats().mailboxDepth, 0);

      // again after the acknowledgement (the reply could have crossed a re-send)
      await op.publishAsync(deviceTopic(id, 'cmd'), wire, { qos: 1 });
      await sleep(500);
      assert.equal(gw.stats().mailboxDepth, 0, 'an acknowledged id is not queued again');
      assert.deepEqual(got, [c1.id], 'and not pushed to the MCU again');
      const metrics = await (await fetch(`http://127.0.0.1:${gw.httpPort}/metrics`)).text();
      assert.match(metrics, /fleet_gateway_mailbox_commands_total\{result="queued"\} 1\n/);
      await m1.endAsync();
    } finally {
      await op.endAsync();
    }
  });
});
