/**
 * Agent self-update where the new binary exits at once. Real processes all the way: a real
 * hub, `fleetlet agent` from source behind a tiny `fleetlet` launcher script installed as
 * the agent's first release, and a shell loop playing systemd (Restart=always, with the
 * boot check as ExecStartPre run by the `committed` binary, as docs/ota.md tells the unit to).
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync, openSync, readFileSync, readlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, describe, test } from 'node:test';
import { bootstrapAgentRelease } from '../../agent/update/selfupdate.ts';
import { VERSION } from '../../cli/version.ts';
import { deriveToken } from '../../core/credentials.ts';
import type { EventMessage } from '../../core/messages.ts';
import { writeSecretFile } from '../../core/secrets.ts';
import { tempDir, waitFor } from '../helpers.ts';
import { withHub } from '../hub/harness.ts';
import { buildAgentBundle, installTrustRoot, makeKeys } from '../fixtures/ota/kit.ts';
import { processesMentioning } from './procs.ts';

const ROOT = new URL('../../', import.meta.url).pathname;

describe('agent self-update', () => {
  const tmp = tempDir('fleetlet-selfupdate-');
  after(() => tmp.cleanup());

  test('a new agent binary that exits at once: the boot counter restores the previous binary, which reports the failure', { timeout: 180_000 }, async () => {
    await withHub(async (hub, ctx) => {
      const keys = makeKeys();
      const id = 'self-upd-1';
      const stateDir = join(tmp.dir, 'state');
      installTrustRoot(stateDir, keys);
      const tokenFile = join(tmp.dir, 'device.token');
      writeSecretFile(tokenFile, deriveToken(ctx.secret, 'device', id));
      const cfg = join(tmp.dir, 'agent.json');
      writeFileSync(cfg, JSON.stringify({ update: { agentMaxStarts: 2, agentHealthyWithinS: 600, downloadBackoffMs: 50 } }));
      const hubEvents: EventMessage[] = [];
      hub.registry.on('event', (dev: string, msg: EventMessage) => dev === id && hubEvents.push(msg));

      // the installed agent: a launcher for the real CLI from source, as release <VERSION>-s0
      const launcher = join(tmp.dir, 'fleetlet-from-source');
      writeFileSync(launcher, `#!/bin/sh\ncd '${ROOT}' && exec '${process.execPath}' --import tsx '${join(ROOT, 'cli/main.ts')}' "$@"\n`, { mode: 0o755 });
      const v1Dir = bootstrapAgentRelease(stateDir, launcher, VERSION);

      // systemd, played by a shell loop: ExecStartPre = committed/fleetlet agent boot-check, ExecStart = current/fleetlet agent, Restart=always
      const starts = join(tmp.dir, 'starts.log');
      const stop = join(tmp.dir, 'stop');
      const unit = join(tmp.dir, 'systemd-loop.sh');
      writeFileSync(
        unit,
        [
          '#!/bin/sh',
          `S='${stateDir}'`,
          `while [ ! -e '${stop}' ]; do`,
          `  "$S/agent/committed/fleetlet" agent boot-check --config '${cfg}' --state-dir "$S"`,
          `  echo "start $(readlink "$S/agent/current")" >> '${starts}'`,
          `  "$S/agent/current/fleetlet" agent --config '${cfg}' --device-id ${id} --state-dir "$S" --hub ${ctx.url} --token-file '${tokenFile}' --api-port 0 --ready-file '${join(tmp.dir, 'ready.json')}'`,
          `  echo "exit $?" >> '${starts}'`,
          '  sleep 0.2',
          'done',
          '',
        ].join('\n'),
        { mode: 0o755 },
      );
      const log = openSync(join(tmp.dir, 'loop.log'), 'a');
      const loop = spawn('/bin/sh', [unit], { detached: true, stdio: ['ignore', log, log] });
      const loopExited = new Promise<void>((r) => loop.once('exit', () => r()));
      const tail = () => `\n--- starts ---\n${existsSync(starts) ? readFileSync(starts, 'utf8') : ''}\n--- loop.log ---\n${readFileSync(join(tmp.dir, 'loop.log'), 'utf8').slice(-3000)}`;
      try {
        await waitFor(() => hub.registry.get(id)?.online, `agent ${VERSION} online${tail()}`, 60_000, 100);

        // the operator publishes an agent bundle whose binary exits at once
        const bad = await buildAgentBundle({ dir: tmp.dir, keys, version: '99.0.0', sequence: 1, script: '#!/bin/sh\necho "agent 99.0.0: exiting at once" >&2\nexit 1\n' });
        const up = await fetch(`${ctx.http}/api/v1/artifacts`, { method: 'POST', headers: { authorization: `Bearer ${ctx.operator}` }, body: readFileSync(bad.file) });
        const art = (await up.json()) as { url: string; sha256: string; size: number };
        const put = await fetch(`${ctx.http}/api/v1/devices/${id}/desired`, {
          method: 'PUT',
          headers: { authorization: `Bearer ${ctx.operator}`, 'content-type': 'application/json' },
          body: JSON.stringify({ apps: {}, agent: { version: '99.0.0', url: `${ctx.http}${art.url}`, sha256: art.sha256, size: art.size } }),
        });
        assert.equal(put.status, 200);

        const ev = await waitFor(() => hubEvents.find((e) => e.type === 'update.rolled-back'), `update.rolled-back from the restored agent${tail()}`, 120_000, 200);
        assert.equal(ev.data?.kind, 'agent');
        assert.equal(ev.data?.version, '99.0.0');
        assert.equal(ev.data?.code, 'FLEET_UPDATE_BOOT');
        assert.match(String(ev.data?.reason), /within 2 starts/);
        assert.deepEqual((ev.data?.chain as string[]).slice(-3), ['probation', 'rolling-back', 'rolled-back']);

        // the new binary really was started (and failed) twice, then the old one came back
        const lines = readFileSync(starts, 'utf8').trim().split('\n');
        const newStarts = lines.filter((l) => l === 'start releases/99.0.0-s1').length;
        assert.equal(newStarts, 2, lines.join('\n'));
        assert.equal(readlinkSync(join(stateDir, 'agent', 'current')), `releases/${v1Dir.split('/').pop()}`);
        assert.equal(lines.filter((l) => l.startsWith('start ')).at(-1), `start releases/${VERSION}-s0`);
        // the restored agent runs, is connected, and shows the failed update
        await waitFor(() => hub.registry.get(id)?.online, 'restored agent online', 60_000, 100);
        const ready = JSON.parse(readFileSync(join(tmp.dir, 'ready.json'), 'utf8')) as { apiPort: number };
        const view = (await (await fetch(`http://127.0.0.1:${ready.apiPort}/api/v1/updates`)).json()) as { history: Array<{ state: string; kind: string; version: string }> };
        assert.equal(view.history[0]?.state, 'rolled-back');
        assert.equal(view.history[0]?.kind, 'agent');
        const status = (await (await fetch(`http://127.0.0.1:${ready.apiPort}/api/v1/status`)).json()) as { version: string };
        assert.equal(status.version, VERSION);
      } finally {
        writeFileSync(stop, '');
        try {
          process.kill(-(loop.pid ?? 0), 'SIGTERM');
        } catch {
          // gone
        }
        const t = setTimeout(() => {
          try {
            process.kill(-(loop.pid ?? 0), 'SIGKILL');
          } catch {
            // gone
          }
        }, 10_000);
        await loopExited;
        clearTimeout(t);
        await waitFor(() => processesMentioning(stateDir).length === 0, 'no agent process left', 20_000, 100);
      }
    });
  });
});
