import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { AgentConfigSchema } from '../../agent/config.ts';
import { startAgent } from '../../agent/index.ts';
import { loadConfig } from '../../core/config.ts';
import { isFleetError } from '../../core/errors.ts';
import { tempDir, testLogger, waitFor } from '../helpers.ts';

test('agent API: reads open on loopback; writes need the technician token; read-only token refused on writes', async () => {
  const tmp = tempDir();
  const agent = await startAgent(
    AgentConfigSchema.parse({
      deviceId: 'dev-api',
      stateDir: tmp.dir,
      api: { port: 0 },
      apps: [{ name: 'sleeper', command: '/bin/sh', args: ['-c', 'echo started; exec sleep 60'] }],
    }),
    testLogger(),
    '9.9.9',
  );
  const base = `http://127.0.0.1:${agent.apiPort}`;
  try {
    for (const f of Object.values(agent.tokenFiles)) assert.equal(statSync(f).mode & 0o777, 0o600, `${f} is 0600`);
    const tech = readFileSync(agent.tokenFiles.technician, 'utf8').trim();
    const ro = readFileSync(agent.tokenFiles.readonly, 'utf8').trim();
    const status = (await (await fetch(`${base}/api/v1/status`)).json()) as { deviceId: string; version: string; apps: Array<{ name: string }> };
    assert.equal(status.deviceId, 'dev-api');
    assert.equal(status.version, '9.9.9');
    assert.deepEqual(status.apps.map((a) => a.name), ['sleeper']);
    await waitFor(() => agent.supervisor.apps.get('sleeper')?.state === 'running', 'running');

    const restart = (auth?: string) => fetch(`${base}/api/v1/apps/sleeper/restart`, { method: 'POST', headers: auth ? { authorization: `Bearer ${auth}` } : {} });
    const missing = await restart();
    assert.equal(missing.status, 401);
    assert.equal(((await missing.json()) as { error: { code: string } }).error.code, 'FLEET_AUTH_FAILED');
    assert.equal((await restart('not-the-token-at-all')).status, 401);
    const forbidden = await restart(ro);
    assert.equal(forbidden.status, 403);
    assert.equal(((await forbidden.json()) as { error: { code: string } }).error.code, 'FLEET_FORBIDDEN');
    const ok = await restart(tech);
    assert.equal(ok.status, 200);
    assert.equal(((await ok.json()) as { restarts: number }).restarts, 1);

    const nope = await fetch(`${base}/api/v1/apps/ghost/restart`, { method: 'POST', headers: { authorization: `Bearer ${tech}` } });
    assert.equal(nope.status, 404);
    assert.equal(((await nope.json()) as { error: { code: string } }).error.code, 'FLEET_APP_NOT_FOUND');
    const logs = (await (await fetch(`${base}/api/v1/apps/sleeper/logs`)).json()) as { lines: Array<{ line: string }> };
    assert.ok(logs.lines.some((l) => l.line === 'started'));
    const page = await fetch(`${base}/`);
    assert.equal(page.status, 200);
    assert.match(await page.text(), /<title>fleetlet device<\/title>/);
    const metrics = await (await fetch(`${base}/metrics`)).text();
    assert.match(metrics, /fleet_agent_app_restarts\{app="sleeper"\} 1/);
  } finally {
    await agent.stop();
    tmp.cleanup();
  }
});

test('agent config: a bad value names the key and the file', () => {
  const tmp = tempDir();
  try {
    const file = join(tmp.dir, 'agent.yaml');
    writeFileSync(file, 'apps:\n  - name: web\n    command: /bin/true\n    restart: sometimes\napi:\n  prot: 8484\n');
    assert.throws(
      () => loadConfig(AgentConfigSchema, { file }),
      (err: unknown) => {
        assert.ok(isFleetError(err, 'FLEET_CONFIG_INVALID'));
        assert.match(err.message, new RegExp(`^${file.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}: `));
        assert.match(err.message, /apps\.0\.restart/);
        assert.match(err.message, /api: .*prot/);
        return true;
      },
    );
    writeFileSync(file, 'apps: [\n');
    assert.throws(() => loadConfig(AgentConfigSchema, { file }), (err: unknown) => isFleetError(err, 'FLEET_CONFIG_UNREADABLE') && err.message.includes(file));
  } finally {
    tmp.cleanup();
  }
});
