import { test } from 'node:test';
import assert from 'node:assert/strict';
import { generateKeyPairSync, type KeyObject } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { AgentConfigSchema } from '../../agent/config.ts';
import { startAgent, type AgentHandle } from '../../agent/index.ts';
import * as bundles from '../../bundles/index.ts';
import { deriveToken } from '../../core/credentials.ts';
import { buildAppBundle, installTrustRoot } from '../fixtures/ota/kit.ts';
import { withHub } from '../hub/harness.ts';
import { tempDir, testLogger, waitFor } from '../helpers.ts';

type Pair = { priv: KeyObject; pub: KeyObject };
const pair = (): Pair => {
  const { privateKey, publicKey } = generateKeyPairSync('ed25519');
  return { priv: privateKey, pub: publicKey };
};
const expires = new Date(Date.now() + 365 * 24 * 3600 * 1000).toISOString().replace(/\.\d{3}Z$/, 'Z');
/** root v`version` trusting `keys`, signed by the previous root's keys and its own */
const root = (version: number, keys: Pair[], signers: Pair[]) =>
  bundles.createRootBytes({ version, expires, threshold: 1, keys: keys.map((k) => k.pub), signers: signers.map((k) => k.priv) }).toString('utf8');

test('trust root rotation: the hub sends the chain v2, v3 in desired state; the device applies both, then trusts only the newest key; a forged root is refused on the local API', async () => {
  const a = pair();
  const b = pair();
  const c = pair();
  const forger = pair();
  await withHub(async (hub, ctx) => {
    // the agent and the temp dir are released here, inside withHub: the hub is stopped after them
    const tmp = tempDir();
    let agent: AgentHandle | undefined;
    try {
      const state = join(tmp.dir, 'agent');
      const trustFile = installTrustRoot(state, a);
      const tokenFile = join(tmp.dir, 'device.token');
      writeFileSync(tokenFile, deriveToken(ctx.secret, 'device', 'dev-rot'), { mode: 0o600 });
      agent = await startAgent(
        AgentConfigSchema.parse({ deviceId: 'dev-rot', stateDir: state, api: { port: 0, rateLimit: 0 }, hub: { url: ctx.url, tokenFile, keepaliveS: 5 }, update: { probationMs: 300 } }),
        testLogger('agent'),
        '1.0.0',
        { bundles },
      );
      const api = `http://127.0.0.1:${agent.apiPort}`;
      const tech = readFileSync(agent.tokenFiles.technician, 'utf8').trim();
      const upload = async (file: string) => {
        const r = await fetch(`${api}/api/v1/updates`, { method: 'POST', headers: { authorization: `Bearer ${tech}` }, body: readFileSync(file) });
        assert.equal(r.status, 202, await r.clone().text());
      };
      const history = async () => ((await (await fetch(`${api}/api/v1/updates`)).json()) as { history: Array<{ state: string; code?: string; version?: string }> }).history;
      await waitFor(async () => ((await (await fetch(`${ctx.http}/api/v1/devices/dev-rot`)).json()) as { online?: boolean }).online, 'agent online at the hub');
      // v2 moves trust from A to B; v3 from B to C. The device is at v1: it needs both, in order.
      await hub.setDesired('dev-rot', { apps: {}, trustRoots: [root(2, [b], [a, b]), root(3, [c], [b, c])] });
      await waitFor(() => bundles.loadTrustRoot(trustFile).version === 3, 'root v3 installed');
      const r3 = bundles.loadTrustRoot(trustFile);
      assert.deepEqual([...r3.keys.keys()], [bundles.keyIdOf(c.pub)]);

      // a bundle signed by the old key A is now refused; one signed by C installs
      await upload((await buildAppBundle({ dir: tmp.dir, keys: a, name: 'web', version: '1.0.0', sequence: 1 })).file);
      await waitFor(async () => (await history()).length >= 1, 'first update finished');
      assert.equal((await history())[0]!.code, 'FLEET_BUNDLE_UNKNOWN_KEY');
      await upload((await buildAppBundle({ dir: tmp.dir, keys: c, name: 'web', version: '1.0.1', sequence: 2 })).file);
      await waitFor(async () => (await history()).some((h) => h.state === 'committed' && h.version === '1.0.1'), 'bundle by C committed');

      // by hand: a v4 signed only by a stranger is refused with its code; the root stays at v3
      const forged = await fetch(`${api}/api/v1/trust/root`, { method: 'POST', headers: { authorization: `Bearer ${tech}`, 'content-type': 'application/json' }, body: root(4, [forger], [forger]) });
      assert.equal(forged.status, 422);
      assert.equal(((await forged.json()) as { error: { code: string } }).error.code, 'FLEET_BUNDLE_ROOT_THRESHOLD');
      assert.equal(bundles.loadTrustRoot(trustFile).version, 3);
      // a proper v4 (signed by C and by its own key) is accepted
      const d = pair();
      const ok = await fetch(`${api}/api/v1/trust/root`, { method: 'POST', headers: { authorization: `Bearer ${tech}`, 'content-type': 'application/json' }, body: root(4, [d], [c, d]) });
      assert.equal(ok.status, 200, await ok.clone().text());
      assert.deepEqual(await ok.json(), { applied: [4], version: 4 });
      const events = async () => ((await (await fetch(`${api}/api/v1/events?since=0`)).json()) as { events: Array<{ type: string; data: Record<string, unknown> }> }).events;
      assert.ok((await events()).some((e) => e.type === 'trust.rotated' && e.data.source === 'hub' && (e.data.applied as number[]).join() === '2,3'));
      assert.equal((await events()).filter((e) => e.type === 'trust.refused' && e.data.code === 'FLEET_BUNDLE_ROOT_THRESHOLD').length, 1);
      // the hub's older chain, sent again, changes nothing: versions at or below the device's are skipped
      await hub.setDesired('dev-rot', { apps: {}, trustRoots: [root(2, [b], [a, b]), root(3, [c], [b, c])] });
      await waitFor(async () => (await events()).filter((e) => e.type === 'desired.received').length >= 2, 'second desired state received');
      assert.equal(bundles.loadTrustRoot(trustFile).version, 4);
      assert.equal((await events()).filter((e) => e.type.startsWith('trust.')).length, 3, 'no new rotation or refusal');
    } finally {
      try {
        await agent?.stop();
      } finally {
        tmp.cleanup();
      }
    }
  });
});
