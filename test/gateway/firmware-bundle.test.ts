import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import type { EventMessage } from '../../core/messages.ts';
import { firmwareVerifier } from '../../cli/commands/gateway.ts';
import { craftBundle, makeRoot, manifestFor, newKeys } from '../bundles/fixtures.ts';
import { tempDir, waitFor } from '../helpers.ts';
import type { HubHandle } from '../../hub/index.ts';
import { coap, coapBlock, of, registered, signedFirmware, withEnv } from './env.ts';

/** Wait for an MCU's firmware job to reach `state`; a timeout names the state it has. */
async function firmwareReaches(gw: { firmwareState(id: string): { state: string } | undefined }, id: string, state: string, what: string): Promise<void> {
  await waitFor(() => gw.firmwareState(id)?.state === state, what, 15_000).catch((err: unknown) => {
    throw new Error(`${String(err)}; state ${JSON.stringify(gw.firmwareState(id))}`);
  });
}

/**
 * The whole firmware path with real parts: a signed firmware bundle (bundles/ format,
 * verified by the CLI's verifier that wraps verifyBundle) uploaded to the hub's artifact
 * store, named by the desired state with an http URL, downloaded by the gateway with its
 * device credentials (HTTP Basic), verified, cached and served over CoAP Block2.
 */
test('firmware bundle from the hub artifact store: downloaded with the device token, signature verified, image served; a bundle by an unknown key is refused and reported failed', async () => {
  const tmp = tempDir('fleetlet-fwb-');
  try {
    const [good, stranger] = newKeys(2);
    const { bytes: rootBytes } = makeRoot([good!], 1);
    const trustFile = join(tmp.dir, 'root.json');
    writeFileSync(trustFile, rootBytes);
    const image = Buffer.alloc(4096 + 123);
    for (let i = 0; i < image.length; i++) image[i] = (i * 7 + 3) & 0xff;
    const files = [{ path: 'firmware.bin', data: image }];
    const okBundle = craftBundle(join(tmp.dir, 'ok.fbundle'), { files, manifest: manifestFor(files, { kind: 'firmware', name: 'esp32-fw', version: '2.0.0' }), signers: [good!.privateKey] });
    const badBundle = craftBundle(join(tmp.dir, 'bad.fbundle'), { files, manifest: manifestFor(files, { kind: 'firmware', name: 'esp32-fw', version: '2.0.1' }), signers: [stranger!.privateKey] });
    // validly signed, but an older sequence of the same name (5 is manifestFor's default)
    const oldBundle = craftBundle(join(tmp.dir, 'old.fbundle'), { files, manifest: manifestFor(files, { kind: 'firmware', name: 'esp32-fw', version: '1.9.0', sequence: 4 }), signers: [good!.privateKey] });
    // for one board only (targets.deviceClass), matched against the hello's hw
    const s3Bundle = craftBundle(join(tmp.dir, 's3.fbundle'), { files, manifest: manifestFor(files, { kind: 'firmware', name: 'esp32-s3-fw', version: '3.0.0', targets: { arch: [], deviceClass: ['esp32-s3'] } }), signers: [good!.privateKey] });

    await withEnv(
      async ({ hub, gw, site, seen }) => {
        const operator = readFileSync(hub.operatorTokenFile, 'utf8').trim();
        const upload = async (b: Buffer) => {
          const res = await fetch(`http://127.0.0.1:${hub.httpPort}/api/v1/artifacts`, { method: 'POST', headers: { authorization: `Bearer ${operator}`, 'content-type': 'application/octet-stream' }, body: new Uint8Array(b) });
          assert.ok(res.ok, await res.clone().text());
          return (await res.json()) as { sha256: string; url: string };
        };
        const ok = await upload(okBundle);
        const bad = await upload(badBundle);
        for (const id of ['esp-b1', 'esp-b2']) assert.equal((await coap(gw.coapPort, site, id, 'hello', 'POST', Buffer.from('{"fw":"1.0.0","boot":"power_on"}'))).code, '2.04');
        await registered({ hub, gw }, ['esp-b2']);
        await hub.setDesired('esp-b1', { apps: {}, firmware: { version: '2.0.0', url: `http://127.0.0.1:${hub.httpPort}${ok.url}`, sha256: ok.sha256, size: okBundle.length } });
        await hub.setDesired('esp-b2', { apps: {}, firmware: { version: '2.0.1', url: `http://127.0.0.1:${hub.httpPort}${bad.url}`, sha256: bad.sha256, size: badBundle.length } });

        await firmwareReaches(gw, 'esp-b1', 'offered', 'the verified image offered');
        const got = await coapBlock(gw.coapPort, site, 'esp-b1', 0, 256);
        assert.equal(createHash('sha256').update(got.body).digest('hex'), createHash('sha256').update(image).digest('hex'));

        await waitFor(() => gw.firmwareState('esp-b2')?.state === 'failed', 'the stranger-signed bundle refused', 15_000);
        assert.match(gw.firmwareState('esp-b2')?.reason ?? '', /FLEET_BUNDLE_UNKNOWN_KEY/);
        assert.equal((await coapBlock(gw.coapPort, site, 'esp-b2', 0, 256)).code, '4.04');
        await waitFor(() => (of(seen, 'esp-b2', 'events') as EventMessage[]).some((e) => e.type === 'mcu.firmware' && e.data?.state === 'failed'), 'failure event at the hub');

        // anti-rollback at the gateway (the MCU cannot check it): once an MCU booted into
        // esp32-fw sequence 5, a validly signed esp32-fw of sequence 4 is refused for any MCU
        assert.equal((await coap(gw.coapPort, site, 'esp-b1', 'hello', 'POST', Buffer.from('{"fw":"2.0.0","boot":"ota"}'))).code, '2.04');
        await waitFor(() => gw.firmwareState('esp-b1')?.state === 'succeeded', 'esp-b1 booted into 2.0.0');
        const old = await upload(oldBundle);
        assert.equal((await coap(gw.coapPort, site, 'esp-b3', 'hello', 'POST', Buffer.from('{"fw":"1.0.0","boot":"power_on"}'))).code, '2.04');
        await registered({ hub, gw }, ['esp-b3']);
        await hub.setDesired('esp-b3', { apps: {}, firmware: { version: '1.9.0', url: `http://127.0.0.1:${hub.httpPort}${old.url}`, sha256: old.sha256, size: oldBundle.length } });
        await waitFor(() => gw.firmwareState('esp-b3')?.state === 'failed', 'the older sequence refused', 15_000);
        assert.match(gw.firmwareState('esp-b3')?.reason ?? '', /FLEET_BUNDLE_ROLLBACK: .*sequence 4, below this gateway's floor 5/);
        assert.equal((await coapBlock(gw.coapPort, site, 'esp-b3', 0, 256)).code, '4.04', 'nothing is served');

        // the hardware class: an MCU on another board is not offered the image; on the listed one it is
        const s3 = await upload(s3Bundle);
        assert.equal((await coap(gw.coapPort, site, 'esp-b4', 'hello', 'POST', Buffer.from('{"fw":"1.0.0","boot":"power_on","hw":"esp32-c3"}'))).code, '2.04');
        await waitFor(() => (of(seen, 'esp-b4', 'state') as Array<{ mcu?: { hw?: string } }>).some((st) => st.mcu?.hw === 'esp32-c3'), 'its hw in its state at the hub');
        await registered({ hub, gw }, ['esp-b4']);
        await hub.setDesired('esp-b4', { apps: {}, firmware: { version: '3.0.0', url: `http://127.0.0.1:${hub.httpPort}${s3.url}`, sha256: s3.sha256, size: s3Bundle.length } });
        await waitFor(() => gw.firmwareState('esp-b4')?.state === 'failed', 'refused for its board', 15_000);
        assert.match(gw.firmwareState('esp-b4')?.reason ?? '', /FLEET_BUNDLE_TARGET: .*is for esp32-s3; this MCU is esp32-c3/);
        await waitFor(() => (of(seen, 'esp-b4', 'events') as EventMessage[]).some((e) => e.type === 'mcu.firmware' && e.data?.cause === 'target' && e.data?.code === 'FLEET_BUNDLE_TARGET'), 'failed (target) at the hub');
        assert.equal((await coapBlock(gw.coapPort, site, 'esp-b4', 0, 256)).code, '4.04', 'nothing is served');
        assert.equal((await coap(gw.coapPort, site, 'esp-b4', 'hello', 'POST', Buffer.from('{"fw":"1.0.0","boot":"power_on","hw":"esp32-s3"}'))).code, '2.04');
        await waitFor(() => gw.firmwareState('esp-b4')?.state === 'offered', 'offered once its hello names a listed board', 15_000);
        const s3got = await coapBlock(gw.coapPort, site, 'esp-b4', 0, 256);
        assert.equal(s3got.code, '2.05');
      },
      {},
      { verifyFirmware: firmwareVerifier(trustFile, join(tmp.dir, 'work')) },
    );
  } finally {
    tmp.cleanup();
  }
});

test('firmware by the path the artifact upload answers (/api/v1/artifacts/<sha256>): without firmwareBaseUrl the preparation fails naming it, and the same bundle named again by an absolute URL is fetched; with firmwareBaseUrl the path is fetched from the hub', async () => {
  const fw = signedFirmware();
  const image = Buffer.alloc(2048 + 5, 0x5a);
  const upload = async (hub: HubHandle, b: Buffer) => {
    const operator = readFileSync(hub.operatorTokenFile, 'utf8').trim();
    const res = await fetch(`http://127.0.0.1:${hub.httpPort}/api/v1/artifacts`, { method: 'POST', headers: { authorization: `Bearer ${operator}`, 'content-type': 'application/octet-stream' }, body: new Uint8Array(b) });
    assert.ok(res.ok, await res.clone().text());
    return (await res.json()) as { sha256: string; url: string };
  };
  try {
    // no firmwareBaseUrl: a path is refused, and a corrected URL for the same bundle is taken
    await withEnv(
      async ({ hub, gw, site, dir, start }) => {
        const bundle = fw.bundle(join(dir, 'p.fbundle'), image, '2.0.0');
        const art = await upload(hub, bundle);
        assert.match(art.url, /^\/api\/v1\/artifacts\/[0-9a-f]{64}$/);
        assert.equal((await coap(gw.coapPort, site, 'esp-p1', 'hello', 'POST', Buffer.from('{"fw":"1.0.0","boot":"power_on"}'))).code, '2.04');
        await registered({ hub, gw }, ['esp-p1']);
        const desired = (url: string) => ({ apps: {}, firmware: { version: '2.0.0', url, sha256: art.sha256, size: bundle.length } });
        await hub.setDesired('esp-p1', desired(art.url));
        await waitFor(() => gw.firmwareState('esp-p1')?.state === 'failed', 'a path URL refused without firmwareBaseUrl', 15_000);
        assert.match(gw.firmwareState('esp-p1')?.reason ?? '', /is a path and firmwareBaseUrl is not set/);
        await hub.setDesired('esp-p1', desired(`http://127.0.0.1:${hub.httpPort}${art.url}`));
        await waitFor(() => gw.firmwareState('esp-p1')?.state === 'offered', 'the corrected URL fetched and the image offered', 15_000);
        const got = await coapBlock(gw.coapPort, site, 'esp-p1', 0, 1024);
        assert.equal(createHash('sha256').update(got.body).digest('hex'), createHash('sha256').update(image).digest('hex'));

        // the other way out: the same path for another MCU fails, the operator sets
        // firmwareBaseUrl and restarts the gateway, and the same desired state (sent again by
        // the hub at the reconnect) is fetched: a missing setting is no verdict on the bundle
        // (another bundle: the first one's verified image is cached and would need no fetch)
        const other = fw.bundle(join(dir, 'p3.fbundle'), Buffer.alloc(1500, 0x33), '2.0.0');
        const art3 = await upload(hub, other);
        assert.equal((await coap(gw.coapPort, site, 'esp-p3', 'hello', 'POST', Buffer.from('{"fw":"1.0.0","boot":"power_on"}'))).code, '2.04');
        await registered({ hub, gw }, ['esp-p3']);
        await hub.setDesired('esp-p3', { apps: {}, firmware: { version: '2.0.0', url: art3.url, sha256: art3.sha256, size: other.length } });
        await firmwareReaches(gw, 'esp-p3', 'failed', 'the path refused without firmwareBaseUrl');
        await gw.stop();
        const gw2 = await start({}, { firmwareBaseUrl: `http://127.0.0.1:${hub.httpPort}` });
        await firmwareReaches(gw2, 'esp-p3', 'offered', 'fetched after the restart with firmwareBaseUrl');
      },
      {},
      fw.extras,
    );
    // firmwareBaseUrl = the hub's HTTP address: the path as the upload answered it
    await withEnv(
      async ({ hub, gw, site, dir }) => {
        const bundle = fw.bundle(join(dir, 'q.fbundle'), image, '2.0.0');
        const art = await upload(hub, bundle);
        assert.equal((await coap(gw.coapPort, site, 'esp-p2', 'hello', 'POST', Buffer.from('{"fw":"1.0.0","boot":"power_on"}'))).code, '2.04');
        await registered({ hub, gw }, ['esp-p2']);
        await hub.setDesired('esp-p2', { apps: {}, firmware: { version: '2.0.0', url: art.url, sha256: art.sha256, size: bundle.length } });
        await firmwareReaches(gw, 'esp-p2', 'offered', 'fetched from the hub by its path');
      },
      {},
      fw.extras,
      (hub) => ({ firmwareBaseUrl: `http://127.0.0.1:${hub.httpPort}` }),
    );
  } finally {
    fw.cleanup();
  }
});

test('trust root rotated while offers stand: the MCU whose bundle was signed by the removed key is served nothing more mid-download and reported failed (FLEET_BUNDLE_UNKNOWN_KEY, offer withdrawn); the one signed by a key still trusted goes on', async () => {
  const tmp = tempDir('fleetlet-fwrot-');
  try {
    const [kept, removed] = newKeys(2);
    const trustFile = join(tmp.dir, 'root.json');
    writeFileSync(trustFile, makeRoot([kept!, removed!], 1).bytes);
    const image = Buffer.alloc(3000, 0x6b);
    const files = [{ path: 'firmware.bin', data: image }];
    const byRemoved = craftBundle(join(tmp.dir, 'r.fbundle'), { files, manifest: manifestFor(files, { kind: 'firmware', name: 'esp32-fw', version: '2.0.0' }), signers: [removed!.privateKey] });
    const byKept = craftBundle(join(tmp.dir, 'k.fbundle'), { files, manifest: manifestFor(files, { kind: 'firmware', name: 'esp32-fw', version: '2.0.1' }), signers: [kept!.privateKey] });
    await withEnv(
      async ({ hub, gw, site, seen }) => {
        for (const id of ['esp-r1', 'esp-r2']) assert.equal((await coap(gw.coapPort, site, id, 'hello', 'POST', Buffer.from('{"fw":"1.0.0","boot":"power_on"}'))).code, '2.04');
        await registered({ hub, gw }, ['esp-r1', 'esp-r2']);
        const sha = (b: Buffer) => createHash('sha256').update(b).digest('hex');
        // esp-r2's job first: a pass verifies bundles again in the order of their first job,
        // so once esp-r1 is withdrawn, esp-r2's bundle has been judged under the new root too
        await hub.setDesired('esp-r2', { apps: {}, firmware: { version: '2.0.1', url: `file://${join(tmp.dir, 'k.fbundle')}`, sha256: sha(byKept), size: byKept.length } });
        await firmwareReaches(gw, 'esp-r2', 'offered', 'esp-r2 offered');
        await hub.setDesired('esp-r1', { apps: {}, firmware: { version: '2.0.0', url: `file://${join(tmp.dir, 'r.fbundle')}`, sha256: sha(byRemoved), size: byRemoved.length } });
        await firmwareReaches(gw, 'esp-r1', 'offered', 'esp-r1 offered');
        assert.equal((await coapBlock(gw.coapPort, site, 'esp-r1', 0, 256)).code, '2.05', 'esp-r1 starts its download');
        assert.equal(gw.firmwareState('esp-r1')?.state, 'transferring');

        // the operator rotates the root: the removed key is gone (the file rewritten in place)
        writeFileSync(trustFile, makeRoot([kept!], 1, 2).bytes);
        await firmwareReaches(gw, 'esp-r1', 'failed', 'esp-r1\'s offer withdrawn at the next tick');
        assert.equal(gw.firmwareState('esp-r1')?.code, 'FLEET_BUNDLE_UNKNOWN_KEY');
        assert.match(gw.firmwareState('esp-r1')?.reason ?? '', /offer withdrawn/);
        assert.equal((await coapBlock(gw.coapPort, site, 'esp-r1', 1, 256)).code, '4.04', 'no more chunks for esp-r1');
        await waitFor(() => (of(seen, 'esp-r1', 'events') as EventMessage[]).some((e) => e.type === 'mcu.firmware' && e.data?.state === 'failed' && e.data?.code === 'FLEET_BUNDLE_UNKNOWN_KEY'), 'the failure at the hub');
        // judged in the same pass, before esp-r1: still offered, and served
        assert.equal(gw.firmwareState('esp-r2')?.state, 'offered');
        const got = await coapBlock(gw.coapPort, site, 'esp-r2', 0, 1024);
        assert.equal(got.code, '2.05');
        assert.deepEqual(got.body, image, 'the whole image, block by block');
      },
      {},
      { verifyFirmware: firmwareVerifier(trustFile, join(tmp.dir, 'work')) },
    );
  } finally {
    tmp.cleanup();
  }
});
