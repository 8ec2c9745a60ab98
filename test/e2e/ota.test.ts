/**
 * OTA end to end: a real hub (artifact store, desired state, events) and `fleetlet agent`
 * as a real process from source, with real signed bundles and real app processes.
 */
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, describe, test } from 'node:test';
import { deriveToken } from '../../core/credentials.ts';
import type { EventMessage } from '../../core/messages.ts';
import { writeSecretFile } from '../../core/secrets.ts';
import { tempDir, waitFor } from '../helpers.ts';
import { withHub } from '../hub/harness.ts';
import { buildAppBundle, installTrustRoot, makeKeys } from '../fixtures/ota/kit.ts';
import { Parts } from './procs.ts';

interface UpdatesView {
  current: { state: string; version?: string } | null;
  history: Array<{ id: string; state: string; version?: string; reason?: string; history: Array<{ state: string }> }>;
}

describe('OTA through the hub: artifact store, desired state, commit, rollback reported to the hub, upload on the local API', () => {
  const tmp = tempDir('fleetlet-ota-e2e-');
  after(() => tmp.cleanup());

  test('desired state → download (device credentials, Range) → commit; crashing version → rolled back with the reason at the hub; local upload', { timeout: 120_000 }, async () => {
    await withHub(async (hub, ctx) => {
      const keys = makeKeys();
      const id = 'ota-dev-1';
      const stateDir = join(tmp.dir, 'agent');
      installTrustRoot(stateDir, keys);
      const tokenFile = join(tmp.dir, 'device.token');
      writeSecretFile(tokenFile, deriveToken(ctx.secret, 'device', id));
      const cfg = join(tmp.dir, 'agent.json');
      writeFileSync(cfg, JSON.stringify({ update: { probationMs: 1500, downloadBackoffMs: 50 }, metrics: { publishMs: 500 } }));
      const hubEvents: EventMessage[] = [];
      hub.registry.on('event', (dev: string, msg: EventMessage) => dev === id && hubEvents.push(msg));

      const upload = async (file: string) => {
        const res = await fetch(`${ctx.http}/api/v1/artifacts`, { method: 'POST', headers: { authorization: `Bearer ${ctx.operator}` }, body: readFileSync(file) });
        assert.equal(res.status, 201);
        return (await res.json()) as { sha256: string; size: number; url: string };
      };
      const desire = async (version: string, a: { sha256: string; size: number; url: string }) => {
        const res = await fetch(`${ctx.http}/api/v1/devices/${id}/desired`, {
          method: 'PUT',
          headers: { authorization: `Bearer ${ctx.operator}`, 'content-type': 'application/json' },
          body: JSON.stringify({ apps: { web: { version, url: `${ctx.http}${a.url}`, sha256: a.sha256, size: a.size } } }),
        });
        assert.equal(res.status, 200);
      };

      // the artifact store: operator upload, device download with Range, refusals
      const v1 = await buildAppBundle({ dir: tmp.dir, keys, name: 'web', version: '1.0.0', sequence: 1 });
      const a1 = await upload(v1.file);
      assert.equal(a1.sha256, v1.sha256);
      const basic = `Basic ${Buffer.from(`${id}:${deriveToken(ctx.secret, 'device', id)}`).toString('base64')}`;
      // a device fetches only what its desired state names
      assert.equal((await fetch(`${ctx.http}${a1.url}`, { headers: { authorization: basic } })).status, 403);
      await desire('1.0.0', a1);
      const part = await fetch(`${ctx.http}${a1.url}`, { headers: { authorization: basic, range: 'bytes=10-' } });
      assert.equal(part.status, 206);
      assert.equal(part.headers.get('content-range'), `bytes 10-${v1.size - 1}/${v1.size}`);
      assert.ok(Buffer.from(await part.arrayBuffer()).equals(readFileSync(v1.file).subarray(10)));
      assert.equal((await fetch(`${ctx.http}${a1.url}`)).status, 401);
      assert.equal((await fetch(`${ctx.http}${a1.url}`, { headers: { authorization: `Basic ${Buffer.from(`${id}:wrong`).toString('base64')}` } })).status, 401);
      assert.equal((await fetch(`${ctx.http}${a1.url}`, { headers: { authorization: basic, range: `bytes=${v1.size}-` } })).status, 416);

      const parts = new Parts(tmp.dir);
      try {
        const { ready } = await parts.start<{ apiPort: number; technicianTokenFile: string }>('agent', [
          'agent', '--config', cfg, '--device-id', id, '--state-dir', stateDir, '--hub', ctx.url, '--token-file', tokenFile, '--api-port', '0',
        ]);
        const api = `http://127.0.0.1:${ready.apiPort}`;
        const technician = readFileSync(ready.technicianTokenFile, 'utf8').trim();
        const updates = async () => (await (await fetch(`${api}/api/v1/updates`)).json()) as UpdatesView;
        const finishedCount = async (n: number) => waitFor(async () => ((await updates()).history.length >= n ? (await updates()).history[0] : undefined), `update ${n} finished (agent log:\n${parts.log('agent')})`, 60_000, 200);
        const webCommand = async () => ((await (await fetch(`${api}/api/v1/apps/web`)).json()) as { state: string; command: string });

        await desire('1.0.0', a1);
        const first = await finishedCount(1);
        assert.equal(first.state, 'committed', JSON.stringify(first));
        await waitFor(async () => (await webCommand()).state === 'running', 'web 1.0.0 running');
        assert.match((await webCommand()).command, /1\.0\.0-s1\/app\.sh$/);

        const v2 = await buildAppBundle({ dir: tmp.dir, keys, name: 'web', version: '2.0.0', sequence: 2, behaviour: 'crash' });
        await desire('2.0.0', await upload(v2.file));
        const second = await finishedCount(2);
        assert.equal(second.state, 'rolled-back');
        assert.match(second.reason ?? '', /probation/);
        await waitFor(async () => (await webCommand()).state === 'running' && /1\.0\.0-s1/.test((await webCommand()).command), 'web 1.0.0 running again');
        // the hub heard why
        const ev = await waitFor(() => hubEvents.find((e) => e.type === 'update.rolled-back'), 'update.rolled-back at the hub', 20_000);
        assert.equal(ev.data?.version, '2.0.0');
        assert.match(String(ev.data?.reason), /exited during probation|crash-loop/);
        assert.ok(hubEvents.some((e) => e.type === 'update.committed' && e.data?.version === '1.0.0'));

        // the technician's upload: read-only callers may not, the technician may
        const v3 = await buildAppBundle({ dir: tmp.dir, keys, name: 'web', version: '3.0.0', sequence: 3 });
        const body = readFileSync(v3.file);
        assert.equal((await fetch(`${api}/api/v1/updates`, { method: 'POST', body })).status, 401);
        const up = await fetch(`${api}/api/v1/updates`, { method: 'POST', headers: { authorization: `Bearer ${technician}`, 'content-type': 'application/octet-stream' }, body });
        assert.equal(up.status, 202, await up.clone().text());
        const third = await finishedCount(3);
        assert.equal(third.state, 'committed');
        assert.equal(third.version, '3.0.0');
        await waitFor(async () => /3\.0\.0-s3/.test((await webCommand()).command) && (await webCommand()).state === 'running', 'web 3.0.0 running');
      } finally {
        await parts.stopAll();
      }
    });
  });
});
