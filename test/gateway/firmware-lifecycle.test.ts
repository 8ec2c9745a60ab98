import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { setTimeout as sleep } from 'node:timers/promises';
import type { CommandReply, EventMessage } from '../../core/messages.ts';
import { firmwareVerifier } from '../../cli/commands/gateway.ts';
import { mcuKey } from '../../firmware-bridge/auth.ts';
import { decodeMcuCommand } from '../../firmware-bridge/frames.ts';
import { craftBundle, makeRoot, manifestFor, newKeys } from '../bundles/fixtures.ts';
import { tempDir, waitFor } from '../helpers.ts';
import { coap, coapBlock, of, registered, signedFirmware, withEnv, type Env } from './env.ts';

/**
 * The firmware job's life beyond the happy path (firmware in mcu-contract.test.ts): a target
 * that changes or goes away, a rollback after the new version's first hello, a preparation
 * that failed, and the anti-rollback floor when several MCUs share a bundle.
 */

const image = (seed: number, n = 3000): Buffer => {
  const b = Buffer.alloc(n);
  for (let i = 0; i < n; i++) b[i] = (i * seed + 11) & 0xff;
  return b;
};
const sha256 = (b: Buffer) => createHash('sha256').update(b).digest('hex');

/** the command at the head of the MCU's mailbox, or null */
async function head(env: Env, id: string): Promise<{ id: string; n: string; a: Record<string, unknown> } | null> {
  const res = await coap(env.gw.coapPort, env.site, id, 'cmd', 'GET');
  assert.equal(res.code, '2.05');
  return res.body.length === 0 ? null : (decodeMcuCommand(mcuKey(env.site, id), id, res.body).cmd as { id: string; n: string; a: Record<string, unknown> });
}

async function boot(env: Env, id: string, fw: string, bootReason = 'power_on'): Promise<void> {
  assert.equal((await coap(env.gw.coapPort, env.site, id, 'hello', 'POST', Buffer.from(JSON.stringify({ fw, boot: bootReason })))).code, '2.04');
}

/** the desired state naming `bytes` (the bundle; an image for the raw-image verifier) at `file` by a file:// URL */
const desiredFile = (file: string, bytes: Buffer, version = '2.0.0') => ({ apps: {}, firmware: { version, url: pathToFileURL(file).href, sha256: sha256(bytes), size: bytes.length } });

/** an MCU on 1.0.0 at the gateway, registered at the hub, then offered `desired` */
async function bootAndOffer(env: Env, id: string, desired: ReturnType<typeof desiredFile>): Promise<void> {
  await boot(env, id, '1.0.0');
  await registered(env, [id]);
  await env.hub.setDesired(id, desired);
  await waitFor(() => env.gw.firmwareState(id)?.state === 'offered', `${id} offered`);
}

const cachedFiles = (env: Env) => readdirSync(join(env.gwDir, 'firmware')).filter((f) => /\.(bin|bundle)$/.test(f));

test('firmware: a new target takes the untaken offer back out of the mailbox (its head is the new one); a desired state without firmware withdraws it, reported failed (cancelled); the cache is pruned (raw-image verifier mock)', async () => {
  await withEnv(async (env) => {
    const { hub, gw, dir } = env;
    const a = image(31);
    const b = image(17);
    writeFileSync(join(dir, 'a.bin'), a);
    writeFileSync(join(dir, 'b.bin'), b);
    await boot(env, 'esp-l1', '1.0.0');
    await registered(env, ['esp-l1']);

    await hub.setDesired('esp-l1', desiredFile(join(dir, 'a.bin'), a));
    await waitFor(() => gw.firmwareState('esp-l1')?.state === 'offered', 'A offered');
    assert.equal((await head(env, 'esp-l1'))?.a.v, '2.0.0');

    await hub.setDesired('esp-l1', desiredFile(join(dir, 'b.bin'), b, '2.1.0'));
    await waitFor(() => gw.firmwareState('esp-l1')?.state === 'offered' && gw.firmwareState('esp-l1')?.version === '2.1.0', 'B offered');
    const offer = await head(env, 'esp-l1');
    assert.equal(offer?.n, 'fw.update');
    assert.deepEqual(offer?.a, { v: '2.1.0', sha256: sha256(b), size: b.length }, 'the head is the new offer, not the one for 2.0.0');
    // A's bundle and image leave the cache; B's stay (under the mock verifier both are the same bytes: one sha)
    await waitFor(() => !cachedFiles(env).some((f) => f.startsWith(sha256(a))), 'A no longer cached');
    assert.deepEqual(cachedFiles(env).sort(), [`${sha256(b)}.bin`, `${sha256(b)}.bundle`]);

    await hub.setDesired('esp-l1', { apps: {} });
    await waitFor(() => gw.firmwareState('esp-l1')?.state === 'failed', 'cancelled');
    assert.match(gw.firmwareState('esp-l1')?.reason ?? '', /cancelled/);
    assert.equal(await head(env, 'esp-l1'), null, 'nothing left in the mailbox');
    await waitFor(() => cachedFiles(env).length === 0, 'nothing cached');
    await waitFor(() => (of(env.seen, 'esp-l1', 'events') as EventMessage[]).some((e) => e.type === 'mcu.firmware' && e.data?.state === 'failed' && /cancelled/.test(String(e.data?.reason))), 'cancel reported to the hub');
  });
});

test('firmware: an MCU that booted into the target and was then rolled back by its bootloader is failed, and not offered the image again (raw-image verifier mock)', async () => {
  await withEnv(async (env) => {
    const { gw, dir } = env;
    const a = image(29);
    writeFileSync(join(dir, 'a.bin'), a);
    await bootAndOffer(env, 'esp-l2', desiredFile(join(dir, 'a.bin'), a));
    const offer = (await head(env, 'esp-l2'))!;
    assert.equal((await coap(gw.coapPort, env.site, 'esp-l2', 'ack', 'POST', Buffer.from(JSON.stringify({ id: offer.id, ok: true })))).code, '2.04');
    await boot(env, 'esp-l2', '2.0.0', 'ota');
    await waitFor(() => gw.firmwareState('esp-l2')?.state === 'succeeded', 'first boot of 2.0.0');
    // the new firmware did not confirm itself in time: the bootloader went back
    await boot(env, 'esp-l2', '1.0.0', 'rollback');
    await waitFor(() => gw.firmwareState('esp-l2')?.state === 'failed', 'failed after the rollback');
    assert.match(gw.firmwareState('esp-l2')?.reason ?? '', /rolled back to 1\.0\.0 after booting 2\.0\.0/);
    await sleep(200);
    assert.equal(gw.firmwareState('esp-l2')?.state, 'failed', 'not offered again');
    assert.equal(await head(env, 'esp-l2'), null, 'no new offer in the mailbox');
  });
});

test('firmware: a preparation that failed (the bundle was not there yet) is tried again when the same desired state comes again (raw-image verifier mock)', async () => {
  await withEnv(async (env) => {
    const { hub, gw, dir } = env;
    const a = image(23);
    const file = join(dir, 'late.bin');
    await boot(env, 'esp-l3', '1.0.0');
    await registered(env, ['esp-l3']);
    const desired = desiredFile(file, a);
    await hub.setDesired('esp-l3', desired);
    await waitFor(() => gw.firmwareState('esp-l3')?.state === 'failed', 'failed: no bundle yet');
    writeFileSync(file, a);
    // the hub's retained desired state comes again, e.g. when the gateway reconnects after an outage
    await hub.setDesired('esp-l3', desired);
    await waitFor(() => gw.firmwareState('esp-l3')?.state === 'offered', 'offered on the second try');
    assert.equal((await head(env, 'esp-l3'))?.a.v, '2.0.0');
    assert.equal(gw.firmwareState('esp-l3')?.reason, undefined);
  });
});

test('firmware: a hub command named fw.* (reserved for the gateway) is refused with FLEET_MSG_INVALID, not queued', async () => {
  await withEnv(async (env) => {
    const { hub } = env;
    await boot(env, 'esp-l4', '1.0.0');
    await registered(env, ['esp-l4']);
    const cmd = await hub.sendCommand('esp-l4', 'fw.info', {}, 60_000);
    await waitFor(() => (of(env.seen, 'esp-l4', 'reply') as CommandReply[]).some((r) => r.id === cmd.id), 'reply at the hub');
    const reply = (of(env.seen, 'esp-l4', 'reply') as CommandReply[]).find((r) => r.id === cmd.id)!;
    assert.equal(reply.ok, false);
    assert.equal(reply.error?.code, 'FLEET_MSG_INVALID');
    assert.equal(await head(env, 'esp-l4'), null, 'nothing queued for the MCU');
  });
});

test('firmware: the anti-rollback floor and the version are checked for every MCU, also when the bundle was fetched and verified for another one first', async () => {
  const [good] = newKeys(1);
  const { bytes: rootBytes } = makeRoot([good!], 1);
  const tmp = tempDir('fleetlet-fwl-');
  const trustFile = join(tmp.dir, 'root.json');
  writeFileSync(trustFile, rootBytes);
  try {
  await withEnv(
    async (env) => {
      const { hub, gw, dir } = env;
      const filesA = [{ path: 'firmware.bin', data: image(13) }];
      const filesB = [{ path: 'firmware.bin', data: image(19) }];
      const bundleA = craftBundle(join(dir, 'a.fbundle'), { files: filesA, manifest: manifestFor(filesA, { kind: 'firmware', name: 'esp32-fw', version: '2.0.0', sequence: 5 }), signers: [good!.privateKey] });
      const bundleB = craftBundle(join(dir, 'b.fbundle'), { files: filesB, manifest: manifestFor(filesB, { kind: 'firmware', name: 'esp32-fw', version: '3.0.0', sequence: 6 }), signers: [good!.privateKey] });
      const fwA = (version = '2.0.0') => desiredFile(join(dir, 'a.fbundle'), bundleA, version);
      const ids = ['esp-r1', 'esp-r2', 'esp-r3', 'esp-r4'];
      for (const id of ids) await boot(env, id, '1.0.0');
      await registered(env, ids);

      // esp-r1 is offered A (sequence 5) and does not take it yet: A's verified image stays in use
      await hub.setDesired('esp-r1', fwA());
      await waitFor(() => gw.firmwareState('esp-r1')?.state === 'offered', 'A offered to esp-r1');
      // esp-r2 boots into B (sequence 6): the floor of esp32-fw becomes 6
      await hub.setDesired('esp-r2', desiredFile(join(dir, 'b.fbundle'), bundleB, '3.0.0'));
      await waitFor(() => gw.firmwareState('esp-r2')?.state === 'offered', 'B offered to esp-r2');
      await boot(env, 'esp-r2', '3.0.0', 'ota');
      await waitFor(() => gw.firmwareState('esp-r2')?.state === 'succeeded', 'esp-r2 on B');
      // the offer of A that esp-r1 had not taken is below the floor now: taken back, failed
      await waitFor(() => gw.firmwareState('esp-r1')?.state === 'failed', 'esp-r1 offer withdrawn');
      assert.match(gw.firmwareState('esp-r1')?.reason ?? '', /FLEET_BUNDLE_ROLLBACK \(offer withdrawn\): .*sequence 5, below this gateway's floor 6 \(raised while it was offered\)/);
      assert.equal(await head(env, 'esp-r1'), null);

      await hub.setDesired('esp-r3', fwA());
      await waitFor(() => gw.firmwareState('esp-r3')?.state === 'failed', 'A refused for esp-r3');
      assert.match(gw.firmwareState('esp-r3')?.reason ?? '', /FLEET_BUNDLE_ROLLBACK: .*sequence 5, below this gateway's floor 6/);
      assert.equal(await head(env, 'esp-r3'), null);
      // the same desired state again (as after a reconnect): a bundle refused for itself is not tried again
      const events = () => (of(env.seen, 'esp-r3', 'events') as EventMessage[]).filter((e) => e.type === 'mcu.firmware').length;
      // the state turns 'failed' before its event is through the outbox and the uplink: count after it arrived
      await waitFor(() => (of(env.seen, 'esp-r3', 'events') as EventMessage[]).some((e) => e.type === 'mcu.firmware' && (e.data as { state?: string } | undefined)?.state === 'failed'), "esp-r3's failed event at the hub");
      const before = events();
      await hub.setDesired('esp-r3', fwA());
      await sleep(500);
      assert.equal(gw.firmwareState('esp-r3')?.state, 'failed');
      assert.equal(events(), before, 'no new attempt reported');

      // the same bundle named with another version than the one it holds
      await hub.setDesired('esp-r4', fwA('9.9.9'));
      await waitFor(() => gw.firmwareState('esp-r4')?.state === 'failed', 'wrong version refused');
      assert.match(gw.firmwareState('esp-r4')?.reason ?? '', /FLEET_MCU_FIRMWARE: the bundle holds firmware 2\.0\.0, the desired state says 9\.9\.9/);
    },
    {},
    { verifyFirmware: firmwareVerifier(trustFile, join(tmp.dir, 'work')) },
  );
  } finally {
    tmp.cleanup();
  }
});

test('firmware: cancelled while the bundle is still downloading, it is not offered when the download ends; the same target named again starts over (raw-image verifier mock)', async () => {
  await withEnv(async (env) => {
    const { hub, gw } = env;
    const a = image(37);
    let release: (() => void) | null = null;
    const requests: string[] = [];
    // an artifact store that answers only when told to
    const server = createServer((req, res) => {
      requests.push(req.url ?? '');
      const send = () => res.end(a);
      if (requests.length === 1) release = send;
      else send();
    });
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
    const url = `http://127.0.0.1:${(server.address() as AddressInfo).port}/a.bin`;
    try {
      await boot(env, 'esp-l5', '1.0.0');
      await registered(env, ['esp-l5']);
      const desired = { apps: {}, firmware: { version: '2.0.0', url, sha256: sha256(a), size: a.length } };
      await hub.setDesired('esp-l5', desired);
      await waitFor(() => release !== null, 'the download started');
      assert.equal(gw.firmwareState('esp-l5')?.state, 'fetching');
      await hub.setDesired('esp-l5', { apps: {} });
      await waitFor(() => gw.firmwareState('esp-l5')?.state === 'failed', 'cancelled while fetching');
      assert.match(gw.firmwareState('esp-l5')?.reason ?? '', /cancelled/);
      release!();
      await sleep(500);
      assert.equal(gw.firmwareState('esp-l5')?.state, 'failed', 'not offered when the download ended');
      assert.equal(await head(env, 'esp-l5'), null);
      // named again: starts over
      await hub.setDesired('esp-l5', desired);
      await waitFor(() => gw.firmwareState('esp-l5')?.state === 'offered', 'offered after being named again');
      assert.equal((await head(env, 'esp-l5'))?.a.v, '2.0.0');
    } finally {
      server.closeAllConnections();
      await new Promise<void>((r) => server.close(() => r()));
    }
  });
});

test('firmware: an MCU reflashed by hand after it succeeded is offered its target again, the pruned image fetched and verified again (a signed bundle, the real verifier)', async () => {
  const fw = signedFirmware();
  try {
    await withEnv(
      async (env) => {
        const { gw, dir } = env;
        const a = image(41);
        const bundle = fw.bundle(join(dir, 'a.fbundle'), a, '2.0.0');
        await bootAndOffer(env, 'esp-l6', desiredFile(join(dir, 'a.fbundle'), bundle));
        await boot(env, 'esp-l6', '2.0.0', 'ota');
        await waitFor(() => gw.firmwareState('esp-l6')?.state === 'succeeded', 'succeeded');
        await waitFor(() => cachedFiles(env).length === 0, 'the cache pruned once nothing needs it');
        await boot(env, 'esp-l6', '1.0.0', 'power_on');
        await waitFor(() => gw.firmwareState('esp-l6')?.state === 'offered', 'offered again');
        assert.ok(cachedFiles(env).length > 0, 'fetched again');
        // the image served is the one inside the bundle: only the verifier extracts it
        const block = await coapBlock(gw.coapPort, env.site, 'esp-l6', 0, 1024);
        assert.equal(block.code, '2.05');
        assert.equal(sha256(block.body), sha256(a), 'the whole image served again');
      },
      {},
      fw.extras,
    );
  } finally {
    fw.cleanup();
  }
});

test('firmware: a desired state set while the MCU is revoked at the hub reaches its gateway when the revocation is lifted (raw-image verifier mock)', async () => {
  await withEnv(async (env) => {
    const { hub, gw, dir } = env;
    const token = readFileSync(hub.operatorTokenFile, 'utf8').trim();
    const api = (method: string, id: string) => fetch(`http://127.0.0.1:${hub.httpPort}/api/v1/mcu-revocations/${id}`, { method, headers: { authorization: `Bearer ${token}` } });
    const a = image(23);
    writeFileSync(join(dir, 'a.bin'), a);
    await boot(env, 'esp-l9', '1.0.0');
    await registered(env, ['esp-l9']);
    assert.equal((await api('PUT', 'esp-l9')).status, 200);
    await hub.setDesired('esp-l9', desiredFile(join(dir, 'a.bin'), a));
    // not delivered to the gateway while revoked (the hub acts for no gateway for it)
    await sleep(500);
    assert.equal(gw.firmwareState('esp-l9'), undefined);
    assert.equal((await api('DELETE', 'esp-l9')).status, 200);
    await waitFor(() => gw.firmwareState('esp-l9')?.state === 'offered', 'offered after the lift');
  });
});
