/**
 * Agent self-update with real processes all the way: a real hub, `fleetlet agent` from source
 * behind a small `fleetlet` launcher script installed as the agent's first release, and a shell
 * loop playing systemd (Restart=always, with the boot check as ExecStartPre run by the
 * `committed` binary, as docs/ota.md tells the unit to).
 */
import assert from 'node:assert/strict';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, openSync, readFileSync, readlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { bootstrapAgentRelease } from '../../agent/update/selfupdate.ts';
import { VERSION } from '../../cli/version.ts';
import { deriveToken } from '../../core/credentials.ts';
import type { EventMessage } from '../../core/messages.ts';
import { writeSecretFile } from '../../core/secrets.ts';
import type { HubHandle } from '../../hub/index.ts';
import { tempDir, waitFor } from '../helpers.ts';
import { withHub, type HubCtx } from '../hub/harness.ts';
import { buildAgentBundle, installTrustRoot, makeKeys, type Keys } from '../fixtures/ota/kit.ts';
import { processesMentioning } from './procs.ts';

const ROOT = new URL('../../', import.meta.url).pathname;

interface Device {
  id: string;
  stateDir: string;
  keys: Keys;
  launcher: string;
  v1Dir: string;
  hubEvents: EventMessage[];
  /** lines of starts.log: "start releases/<rel>" and "exit <code>" */
  starts(): string[];
  apiPort(): Promise<number>;
  tail(): string;
  stop(): Promise<void>;
}

/**
 * A device: trust root, token, the agent installed as release <VERSION>-s0 (a launcher script
 * for the CLI from source, or `binary`: a real single executable), and the systemd loop running it.
 */
function startDevice(dir: string, hub: HubHandle, ctx: HubCtx, id: string, update: Record<string, unknown>, binary?: string): Device {
  mkdirSync(dir, { recursive: true });
  const keys = makeKeys();
  const stateDir = join(dir, 'state');
  installTrustRoot(stateDir, keys);
  const tokenFile = join(dir, 'device.token');
  writeSecretFile(tokenFile, deriveToken(ctx.secret, 'device', id));
  const cfg = join(dir, 'agent.json');
  writeFileSync(cfg, JSON.stringify({ update: { downloadBackoffMs: 50, ...update } }));
  const hubEvents: EventMessage[] = [];
  hub.registry.on('event', (dev: string, msg: EventMessage) => dev === id && hubEvents.push(msg));
  // the installed agent: a launcher for the real CLI from source, as release <VERSION>-s0
  const launcher = join(dir, 'fleetlet-from-source');
  writeFileSync(launcher, `#!/bin/sh\ncd '${ROOT}' && exec '${process.execPath}' --import tsx '${join(ROOT, 'cli/main.ts')}' "$@"\n`, { mode: 0o755 });
  const v1Dir = bootstrapAgentRelease(stateDir, binary ?? launcher, VERSION);
  // systemd, played by a shell loop: ExecStartPre = committed/fleetlet agent boot-check, ExecStart = current/fleetlet agent, Restart=always
  const starts = join(dir, 'starts.log');
  const stopFile = join(dir, 'stop');
  const unit = join(dir, 'systemd-loop.sh');
  const ready = join(dir, 'ready.json');
  writeFileSync(
    unit,
    [
      '#!/bin/sh',
      `S='${stateDir}'`,
      `while [ ! -e '${stopFile}' ]; do`,
      `  "$S/agent/committed/fleetlet" agent boot-check --config '${cfg}' --state-dir "$S"`,
      `  echo "start $(readlink "$S/agent/current")" >> '${starts}'`,
      `  rm -f '${ready}'`, // written again once this start's API listens
      `  "$S/agent/current/fleetlet" agent --config '${cfg}' --device-id ${id} --state-dir "$S" --hub ${ctx.url} --token-file '${tokenFile}' --api-port 0 --ready-file '${ready}'`,
      `  echo "exit $?" >> '${starts}'`,
      '  sleep 0.2',
      'done',
      '',
    ].join('\n'),
    { mode: 0o755 },
  );
  const logFile = join(dir, 'loop.log');
  const loop: ChildProcess = spawn('/bin/sh', [unit], { detached: true, stdio: ['ignore', openSync(logFile, 'a'), openSync(logFile, 'a')] });
  const loopExited = new Promise<void>((r) => loop.once('exit', () => r()));
  const group = (sig: NodeJS.Signals) => {
    try {
      process.kill(-(loop.pid ?? 0), sig);
    } catch {
      // gone
    }
  };
  return {
    id,
    stateDir,
    keys,
    launcher,
    v1Dir,
    hubEvents,
    starts: () => (existsSync(starts) ? readFileSync(starts, 'utf8').trim().split('\n') : []),
    // the agent connects to the hub before its API listens: wait for this start's ready file
    apiPort: () => waitFor(() => (existsSync(ready) ? (JSON.parse(readFileSync(ready, 'utf8')) as { apiPort: number }).apiPort : 0), 'the agent API ready', 30_000, 50),
    tail: () => `\n--- starts ---\n${existsSync(starts) ? readFileSync(starts, 'utf8') : ''}\n--- loop.log ---\n${readFileSync(logFile, 'utf8').slice(-3000)}`,
    async stop() {
      writeFileSync(stopFile, '');
      group('SIGTERM');
      const t = setTimeout(() => group('SIGKILL'), 10_000);
      await loopExited;
      clearTimeout(t);
      await waitFor(() => processesMentioning(stateDir).length === 0, 'no agent process left', 20_000, 100);
    },
  };
}

async function updatesView(d: Device): Promise<{ history: Array<{ state: string; kind: string; version: string; chain?: string[]; history: Array<{ state: string }> }> }> {
  return (await (await fetch(`http://127.0.0.1:${await d.apiPort()}/api/v1/updates`)).json()) as never;
}

describe('agent self-update', () => {
  const tmp = tempDir('fleetlet-selfupdate-');
  after(() => tmp.cleanup());
  before(
    () => {
      // the last test runs the shipped single executable: a copy made under the build lock
      // (another test file may rebuild dist/ while this one runs)
      const r = spawnSync(process.execPath, [join(ROOT, 'scripts', 'build.mjs'), '--copy-to', join(tmp.dir, 'dist')], { encoding: 'utf8', timeout: 600_000 });
      assert.equal(r.status, 0, `build failed:\n${r.stdout}\n${r.stderr}`);
    },
    { timeout: 620_000 },
  );

  test('a new agent binary that exits at once: the boot counter restores the previous binary, which reports the failure', { timeout: 180_000 }, async () => {
    await withHub(async (hub, ctx) => {
      const d = startDevice(join(tmp.dir, 'bad'), hub, ctx, 'self-upd-1', { agentMaxStarts: 2, agentHealthyWithinS: 600 });
      try {
        await waitFor(() => hub.registry.get(d.id)?.online, `agent ${VERSION} online${d.tail()}`, 60_000, 100);

        // the operator publishes an agent bundle whose binary exits at once
        const bad = await buildAgentBundle({ dir: tmp.dir, keys: d.keys, version: '99.0.0', sequence: 1, script: '#!/bin/sh\necho "agent 99.0.0: exiting at once" >&2\nexit 1\n' });
        const up = await fetch(`${ctx.http}/api/v1/artifacts`, { method: 'POST', headers: { authorization: `Bearer ${ctx.operator}` }, body: readFileSync(bad.file) });
        const art = (await up.json()) as { url: string; sha256: string; size: number };
        const put = await fetch(`${ctx.http}/api/v1/devices/${d.id}/desired`, {
          method: 'PUT',
          headers: { authorization: `Bearer ${ctx.operator}`, 'content-type': 'application/json' },
          body: JSON.stringify({ apps: {}, agent: { version: '99.0.0', url: `${ctx.http}${art.url}`, sha256: art.sha256, size: art.size } }),
        });
        assert.equal(put.status, 200);

        const ev = await waitFor(() => d.hubEvents.find((e) => e.type === 'update.rolled-back'), `update.rolled-back from the restored agent${d.tail()}`, 120_000, 200);
        assert.equal(ev.data?.kind, 'agent');
        assert.equal(ev.data?.version, '99.0.0');
        assert.equal(ev.data?.code, 'FLEET_UPDATE_BOOT');
        assert.match(String(ev.data?.reason), /within 2 starts/);
        assert.deepEqual((ev.data?.chain as string[]).slice(-3), ['probation', 'rolling-back', 'rolled-back']);

        // the new binary really was started (and failed) twice, then the old one came back
        const lines = d.starts();
        assert.equal(lines.filter((l) => l === 'start releases/99.0.0-s1').length, 2, lines.join('\n'));
        assert.equal(readlinkSync(join(d.stateDir, 'agent', 'current')), `releases/${d.v1Dir.split('/').pop()}`);
        assert.equal(lines.filter((l) => l.startsWith('start ')).at(-1), `start releases/${VERSION}-s0`);
        // the restored agent runs, is connected, and shows the failed update
        await waitFor(() => hub.registry.get(d.id)?.online, 'restored agent online', 60_000, 100);
        // the agent writes its history after the event's append resolves, and the event can
        // reach the hub before that (records go up before the outbox's fsync)
        const view = await waitFor(async () => {
          const v = await updatesView(d);
          return v.history[0]?.state === 'rolled-back' ? v : null;
        }, 'the rollback in the agent\'s update history', 10_000, 100);
        assert.equal(view.history[0]?.kind, 'agent');
        const status = (await (await fetch(`http://127.0.0.1:${await d.apiPort()}/api/v1/status`)).json()) as { version: string };
        assert.equal(status.version, VERSION);
      } finally {
        await d.stop();
      }
    });
  });

  test('a new agent binary that comes up and connects is committed (uploaded on the local API)', { timeout: 180_000 }, async () => {
    await withHub(async (hub, ctx) => {
      const d = startDevice(join(tmp.dir, 'good'), hub, ctx, 'self-upd-2', { agentMaxStarts: 3, agentHealthyWithinS: 600 });
      try {
        await waitFor(() => hub.registry.get(d.id)?.online, `agent online${d.tail()}`, 60_000, 100);
        // the "new build": the same launcher, re-signed as sequence 1 (a re-deploy under the same version)
        const good = await buildAgentBundle({ dir: tmp.dir, keys: d.keys, version: VERSION, sequence: 1, script: readFileSync(d.launcher, 'utf8') });
        const technician = readFileSync(join(d.stateDir, 'tokens', 'technician.token'), 'utf8').trim();
        const up = await fetch(`http://127.0.0.1:${await d.apiPort()}/api/v1/updates`, { method: 'POST', headers: { authorization: `Bearer ${technician}` }, body: readFileSync(good.file) });
        assert.equal(up.status, 202, await up.clone().text());

        const ev = await waitFor(() => d.hubEvents.find((e) => e.type === 'update.committed'), `update.committed from the new agent${d.tail()}`, 120_000, 200);
        assert.equal(ev.data?.kind, 'agent');
        const chain = ev.data?.chain as string[];
        assert.deepEqual(chain.slice(-4), ['probation', 'probation', 'committing', 'committed'], chain.join(' > ')); // the second is the resume in the new binary
        const rel = `releases/${VERSION}-s1`;
        assert.equal(readlinkSync(join(d.stateDir, 'agent', 'current')), rel);
        assert.equal(readlinkSync(join(d.stateDir, 'agent', 'committed')), rel);
        const lines = d.starts();
        assert.equal(lines.filter((l) => l === `start ${rel}`).length, 1, lines.join('\n'));
        assert.ok(!d.hubEvents.some((e) => e.type === 'update.rolled-back'));
        // the floor of the agent bundle moved
        assert.deepEqual(JSON.parse(readFileSync(join(d.stateDir, 'update', 'floors.json'), 'utf8')), { fleetlet: 1 });
      } finally {
        await d.stop();
      }
    });
  });
  test('the real single executable updates itself: the new binary starts from its release, connects and is committed', { timeout: 240_000 }, async () => {
    // dist/fleetlet as the installed agent and, re-signed as sequence 1, as the update: the
    // binary's start script, its agent part, its LevelDB addon extracted under the state dir,
    // the boot check run by committed/fleetlet, all from the file that ships
    const bin = join(tmp.dir, 'dist', 'fleetlet');
    await withHub(async (hub, ctx) => {
      const d = startDevice(join(tmp.dir, 'binary'), hub, ctx, 'self-upd-3', { agentMaxStarts: 3, agentHealthyWithinS: 600 }, bin);
      try {
        await waitFor(() => hub.registry.get(d.id)?.online, `agent (single binary) online${d.tail()}`, 60_000, 100);
        const next = await buildAgentBundle({ dir: tmp.dir, keys: d.keys, version: VERSION, sequence: 1, binary: bin });
        const technician = readFileSync(join(d.stateDir, 'tokens', 'technician.token'), 'utf8').trim();
        const up = await fetch(`http://127.0.0.1:${await d.apiPort()}/api/v1/updates`, { method: 'POST', headers: { authorization: `Bearer ${technician}` }, body: readFileSync(next.file) });
        assert.equal(up.status, 202, await up.clone().text());

        const ev = await waitFor(() => d.hubEvents.find((e) => e.type === 'update.committed'), `update.committed from the new binary${d.tail()}`, 120_000, 200);
        assert.equal(ev.data?.kind, 'agent');
        const rel = `releases/${VERSION}-s1`;
        assert.equal(readlinkSync(join(d.stateDir, 'agent', 'current')), rel);
        assert.equal(readlinkSync(join(d.stateDir, 'agent', 'committed')), rel);
        const lines = d.starts();
        assert.equal(lines.filter((l) => l === `start ${rel}`).length, 1, lines.join('\n'));
        // the committed release is the very binary that was bundled, and it runs
        const installed = join(d.stateDir, 'agent', rel, 'fleetlet');
        assert.equal(readFileSync(installed).equals(readFileSync(bin)), true);
        const version = (file: string) => spawnSync(file, ['--version'], { encoding: 'utf8', env: { PATH: '/usr/bin:/bin' } }).stdout.trim();
        assert.match(version(installed), /^fleetlet \d+\.\d+\.\d+/);
        assert.equal(version(installed), version(bin));
        await waitFor(() => hub.registry.get(d.id)?.online, 'new binary online', 60_000, 100);
        assert.ok(!d.hubEvents.some((e) => e.type === 'update.rolled-back'));
      } finally {
        await d.stop();
      }
    });
  });
});
