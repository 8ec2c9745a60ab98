import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { createServer, type Server } from 'node:http';
import { copyFileSync, existsSync, mkdirSync, readdirSync, readFileSync, readlinkSync, rmSync, utimesSync, writeFileSync } from 'node:fs';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';
import { after, afterEach, before, describe, test } from 'node:test';
import { UpdateConfigSchema, type UpdateConfig } from '../../agent/update/config.ts';
import { download } from '../../agent/update/download.ts';
import { EVENTS, RESUME, STATES, TERMINAL, TRANSITIONS, nextState } from '../../agent/update/machine.ts';
import type { UpdateRecord } from '../../agent/update/types.ts';
import { Updater } from '../../agent/update/updater.ts';
import { Supervisor } from '../../agent/supervisor.ts';
import { isFleetError } from '../../core/errors.ts';
import { tempDir, testLogger, waitFor } from '../helpers.ts';
import { buildAppBundle, installTrustRoot, makeKeys, verifierFor, type Keys } from '../fixtures/ota/kit.ts';

describe('update state machine tables (pure)', () => {
  test('every state has a resume action and every transition leads to a known state', () => {
    for (const s of STATES) {
      assert.ok(RESUME[s], `resume entry for ${s}`);
      for (const [ev, to] of Object.entries(TRANSITIONS[s])) {
        assert.ok((EVENTS as readonly string[]).includes(ev), `${s}: event ${ev}`);
        assert.ok((STATES as readonly string[]).includes(to), `${s} --${ev}--> ${to}`);
      }
    }
  });
  test('every non-terminal state can fail or finish, and nothing after the switch fails without rolling back', () => {
    for (const s of STATES) {
      if (TERMINAL.has(s)) continue;
      assert.ok(TRANSITIONS[s].success, `${s} has success`);
    }
    for (const s of ['switching', 'probation'] as const) {
      assert.equal(nextState(s, 'failure'), 'rolling-back');
      assert.equal(nextState(s, 'loop-detected'), 'rolling-back');
    }
    for (const s of ['downloading', 'verifying', 'staging', 'staged', 'waiting-lock'] as const) assert.equal(nextState(s, 'failure'), 'failed');
    assert.equal(nextState('staged', 'locked'), 'waiting-lock');
    // once on its way to an end after the switch, an update only finishes (retried on errors)
    assert.equal(TRANSITIONS['rolling-back'].failure, undefined);
    assert.equal(TRANSITIONS.committing.failure, undefined);
    assert.throws(() => nextState('committed', 'failure'));
  });
  test('the happy path and the rollback path', () => {
    const walk = (events: Array<Parameters<typeof nextState>[1]>) => events.reduce<string[]>((chain, e) => [...chain, nextState(chain.at(-1) as never, e)], ['idle']);
    assert.deepEqual(walk(['start', 'success', 'success', 'success', 'success', 'success', 'success', 'success']), [
      'idle', 'downloading', 'verifying', 'staging', 'staged', 'switching', 'probation', 'committing', 'committed',
    ]);
    assert.deepEqual(walk(['start', 'success', 'success', 'success', 'success', 'success', 'failure', 'success']).slice(-3), ['probation', 'rolling-back', 'rolled-back']);
  });
});

interface Rig {
  dir: string;
  stateDir: string;
  supervisor: Supervisor;
  updater: Updater;
  events: Array<{ type: string; data: Record<string, unknown> }>;
  runlog: string;
  stop(): Promise<void>;
}

/**
 * Faults for "error in X": the rig's own callbacks (the supervisor apply and the verifier the
 * agent is given) fail when the test says so. No seams in the updater itself.
 */
interface Faults {
  /** throw from applyApps while an update to version 2.0.0 is in this state (once) */
  applyIn?: 'switching' | 'rolling-back';
  /** throw from the verifier on this call number (1 = verifying, 2 = staging) */
  verifyCall?: number;
}

/** rigs not stopped yet: stopped after each test, also when it failed half-way (their apps restart forever) */
const live = new Set<Rig>();
afterEach(async () => {
  for (const r of [...live]) await r.stop();
});
/** servers closed after each test (an open one keeps this file running) */
const servers = new Set<Server>();
afterEach(async () => {
  for (const s of [...servers]) {
    const closed = new Promise<void>((r) => s.close(() => r()));
    s.closeAllConnections();
    await closed;
  }
  servers.clear();
});
function served(handler: Parameters<typeof createServer>[1]): Promise<{ server: Server; base: string }> {
  const server = createServer(handler);
  servers.add(server);
  return new Promise((ok) => server.listen(0, '127.0.0.1', () => ok({ server, base: `http://127.0.0.1:${(server.address() as AddressInfo).port}` })));
}

async function rig(dir: string, keys: Keys, cfg: Partial<UpdateConfig> = {}, name = 'rig', faults: Faults = {}): Promise<Rig> {
  const stateDir = join(dir, name);
  mkdirSync(stateDir, { recursive: true });
  const trust = installTrustRoot(stateDir, keys);
  const runlog = join(stateDir, 'runlog');
  const savedRunlog = process.env.OTA_TEST_RUNLOG;
  process.env.OTA_TEST_RUNLOG = runlog; // inherited by the apps the supervisor starts
  const log = testLogger('update');
  const supervisor = new Supervisor({ log, crashLoopRestarts: 3, crashLoopWindowMs: 10_000 });
  const events: Rig['events'] = [];
  const updater: Updater = new Updater({
    stateDir,
    config: UpdateConfigSchema.parse({ probationMs: 1000, lockPollMs: 50, downloadBackoffMs: 20, ...cfg }),
    log,
    supervisor,
    applyApps: async () => {
      const cur = updater.status().current;
      if (faults.applyIn && cur?.version === '2.0.0' && cur.state === faults.applyIn) {
        delete faults.applyIn;
        throw new Error('injected: supervisor apply failed');
      }
      await supervisor.apply(updater.appSpecs());
    },
    verify: (file, o) => {
      verifyCalls++;
      if (verifyCalls === faults.verifyCall) throw new Error('injected: verification failed');
      return verify(file, o);
    },
    agentVersion: '0.0.0-test',
    emitEvent: (type, _severity, data) => void events.push({ type, data }),
  });
  const verify = verifierFor(trust);
  let verifyCalls = 0;
  const r: Rig = {
    dir,
    stateDir,
    supervisor,
    updater,
    events,
    runlog,
    async stop() {
      live.delete(r);
      await updater.stop();
      await supervisor.stopAll();
      if (process.env.OTA_TEST_RUNLOG !== runlog) return; // a later rig's now
      if (savedRunlog === undefined) delete process.env.OTA_TEST_RUNLOG;
      else process.env.OTA_TEST_RUNLOG = savedRunlog;
    },
  };
  live.add(r); // before the start: stopped after the test also when the start fails
  await updater.start();
  return r;
}

async function finished(r: Rig, before: number): Promise<UpdateRecord> {
  return waitFor(
    () => {
      const h = r.updater.status().history;
      return h.length > before ? h[0] : undefined;
    },
    'the update to finish',
    30_000,
  );
}

function currentVersion(r: Rig, app: string): string | null {
  try {
    const rel = readlinkSync(join(r.stateDir, 'apps', app, 'current'));
    return rel.replace(/^releases\//, '').replace(/-s\d+$/, '');
  } catch {
    return null;
  }
}

describe('updater with the real supervisor', () => {
  const tmp = tempDir('fleetlet-update-');
  const keys = makeKeys();
  after(() => tmp.cleanup());

  test('install, then a version that crashes at start is rolled back within probation with the reason reported', async () => {
    // 3 s of probation: the crash is seen within it on a slow machine too (a stall would let it commit)
    const r = await rig(tmp.dir, keys, { probationMs: 3000 }, 'crash');
    try {
      const v1 = await buildAppBundle({ dir: tmp.dir, keys, name: 'web', version: '1.0.0', sequence: 1 });
      r.updater.queueFile(v1.file);
      const first = await finished(r, 0);
      assert.equal(first.state, 'committed', JSON.stringify(first));
      assert.deepEqual(first.history.map((h) => h.state), ['downloading', 'verifying', 'staging', 'staged', 'switching', 'probation', 'committing', 'committed']);
      assert.equal(r.supervisor.apps.get('web')?.status().state, 'running');
      assert.equal(currentVersion(r, 'web'), '1.0.0');

      const v2 = await buildAppBundle({ dir: tmp.dir, keys, name: 'web', version: '2.0.0', sequence: 2, behaviour: 'crash' });
      r.updater.queueFile(v2.file);
      const second = await finished(r, 1);
      assert.equal(second.state, 'rolled-back');
      assert.equal(second.code, 'FLEET_UPDATE_PROBATION');
      assert.match(second.reason ?? '', /exited during probation \(code 3\)|crash-loop/);
      // decided inside the probation window (3 s), not after it
      const decided = second.history.find((h) => h.state === 'rolling-back')!.at;
      const probationStart = second.history.find((h) => h.state === 'probation')!.at;
      assert.ok(decided - probationStart < 3000, `rollback decided ${decided - probationStart} ms into probation`);
      assert.equal(currentVersion(r, 'web'), '1.0.0');
      await waitFor(() => r.supervisor.apps.get('web')?.status().state === 'running', 'v1 running again');
      assert.match(r.supervisor.apps.get('web')!.status().command, /1\.0\.0-s1\/app\.sh$/);
      const ev = r.events.find((e) => e.type === 'update.rolled-back');
      assert.ok(ev, 'update.rolled-back reported');
      assert.equal(ev.data.version, '2.0.0');
      assert.equal(ev.data.previousVersion, '1.0.0');
      assert.match(String(ev.data.reason), /probation/);
      assert.deepEqual((ev.data.chain as string[]).slice(-3), ['probation', 'rolling-back', 'rolled-back']);
      const record = JSON.parse(readFileSync(join(r.stateDir, 'apps', 'web', 'release.json'), 'utf8')) as { current: string; state: string };
      assert.equal(record.current, '1.0.0-s1');
      // the floor did not move: v2's sequence was never committed
      assert.deepEqual(JSON.parse(readFileSync(join(r.stateDir, 'update', 'floors.json'), 'utf8')), { web: 1 });
    } finally {
      await r.stop();
    }
  });

  test('a version whose health check fails is rolled back', async () => {
    const r = await rig(tmp.dir, keys, { probationMs: 4000 }, 'health');
    try {
      r.updater.queueFile((await buildAppBundle({ dir: tmp.dir, keys, name: 'api', version: '1.0.0', sequence: 1, withHealth: true })).file);
      assert.equal((await finished(r, 0)).state, 'committed');
      r.updater.queueFile((await buildAppBundle({ dir: tmp.dir, keys, name: 'api', version: '1.1.0', sequence: 2, withHealth: true, behaviour: 'unhealthy' })).file);
      const rec = await finished(r, 1);
      assert.equal(rec.state, 'rolled-back', JSON.stringify(rec));
      assert.match(rec.reason ?? '', /unhealthy/);
      assert.equal(currentVersion(r, 'api'), '1.0.0');
      await waitFor(() => r.supervisor.apps.get('api')?.status().health.status === 'healthy', 'v1 healthy again');
    } finally {
      await r.stop();
    }
  });

  test('a failing check command rolls back; a passing one commits', async () => {
    const r = await rig(tmp.dir, keys, { probationMs: 300, checkCommand: ['sh', '-c', 'grep -q "app 3.0.0" app.sh'] }, 'check');
    try {
      r.updater.queueFile((await buildAppBundle({ dir: tmp.dir, keys, name: 'svc', version: '3.0.0', sequence: 1 })).file);
      assert.equal((await finished(r, 0)).state, 'committed');
      r.updater.queueFile((await buildAppBundle({ dir: tmp.dir, keys, name: 'svc', version: '3.1.0', sequence: 2 })).file);
      const rec = await finished(r, 1);
      assert.equal(rec.state, 'rolled-back');
      assert.match(rec.reason ?? '', /check command .*exit code 1/);
      assert.equal(currentVersion(r, 'svc'), '3.0.0');
    } finally {
      await r.stop();
    }
  });

  test('an update lock holds the update in waiting-lock (not failed); it proceeds when the lock goes', async () => {
    const r = await rig(tmp.dir, keys, { probationMs: 200 }, 'lock');
    try {
      r.updater.queueFile((await buildAppBundle({ dir: tmp.dir, keys, name: 'db', version: '1.0.0', sequence: 1 })).file);
      assert.equal((await finished(r, 0)).state, 'committed');
      const lock = join(r.stateDir, 'apps', 'db', 'update.lock');
      writeFileSync(lock, 'held by a test\n');
      r.updater.queueFile((await buildAppBundle({ dir: tmp.dir, keys, name: 'db', version: '2.0.0', sequence: 2 })).file);
      await waitFor(() => r.updater.status().current?.state === 'waiting-lock', 'waiting-lock');
      await new Promise((res) => setTimeout(res, 500));
      assert.equal(r.updater.status().current?.state, 'waiting-lock');
      assert.equal(currentVersion(r, 'db'), '1.0.0');
      rmSync(lock);
      const rec = await finished(r, 1);
      assert.equal(rec.state, 'committed');
      assert.ok(rec.history.some((h) => h.state === 'waiting-lock'));
      assert.equal(currentVersion(r, 'db'), '2.0.0');
      // the previous release is kept for a rollback, older ones pruned
      assert.ok(existsSync(join(r.stateDir, 'apps', 'db', 'releases', '1.0.0-s1')));
    } finally {
      await r.stop();
    }
  });

  test('a bundle dropped into the watched directory (a USB stick) is applied; the newest valid one wins', async () => {
    const usb = join(tmp.dir, 'usb');
    mkdirSync(usb, { recursive: true });
    const r = await rig(tmp.dir, keys, { probationMs: 200, watchDir: usb, watchIntervalMs: 100 }, 'watch');
    try {
      const older = await buildAppBundle({ dir: tmp.dir, keys, name: 'kiosk', version: '1.0.0', sequence: 1 });
      const newer = await buildAppBundle({ dir: tmp.dir, keys, name: 'kiosk', version: '1.1.0', sequence: 2 });
      copyFileSync(older.file, join(usb, 'kiosk-1.0.0.bundle'));
      copyFileSync(newer.file, join(usb, 'kiosk-1.1.0.bundle'));
      utimesSync(join(usb, 'kiosk-1.0.0.bundle'), new Date(Date.now() - 60_000), new Date(Date.now() - 60_000));
      // both files are tried, newest first; the second can finish within a poll of the first,
      // so the records are told apart by hash, not by arrival
      await finished(r, 1);
      const history = r.updater.status().history; // newest first
      const rec = history.find((h) => h.sha256 === newer.sha256);
      assert.ok(rec, JSON.stringify(history));
      assert.equal(rec.state, 'committed', JSON.stringify(rec));
      assert.equal(rec.source, 'watch');
      assert.equal(rec.version, '1.1.0');
      // the older file on the stick is below the floor now: refused, nothing changes
      const again = history.find((h) => h.sha256 === older.sha256);
      assert.ok(again, JSON.stringify(history));
      assert.equal(again.state, 'failed', JSON.stringify(again));
      assert.equal(again.code, 'FLEET_BUNDLE_ROLLBACK');
      assert.deepEqual(history.map((h) => h.sha256), [older.sha256, newer.sha256], 'the newest file was applied first');
      assert.equal(currentVersion(r, 'kiosk'), '1.1.0');
      await new Promise((res) => setTimeout(res, 400));
      assert.equal(r.updater.status().history.length, 2, 'each file on the stick is tried once');
    } finally {
      await r.stop();
    }
  });

  test('a bundle still being written to the watched directory is taken only once it stops changing', async () => {
    const usb = join(tmp.dir, 'usb-slow');
    mkdirSync(usb, { recursive: true });
    const r = await rig(tmp.dir, keys, { probationMs: 200, watchDir: usb, watchIntervalMs: 100 }, 'watch-slow');
    try {
      const b = await buildAppBundle({ dir: tmp.dir, keys, name: 'slow', version: '1.0.0', sequence: 1, pad: 64 * 1024 });
      const whole = readFileSync(b.file);
      const target = join(usb, 'slow.bundle');
      // the file grows for a while, as a copy onto a stick does
      for (let n = 1; n <= 6; n++) {
        writeFileSync(target, whole.subarray(0, Math.floor((whole.length * n) / 8)));
        await new Promise((res) => setTimeout(res, 60));
        assert.equal(r.updater.status().current, null, `nothing is taken while the file grows (step ${n})`);
      }
      writeFileSync(target, whole);
      const rec = await finished(r, 0);
      assert.equal(rec.state, 'committed', JSON.stringify(rec));
      assert.equal(rec.source, 'watch');
      assert.equal(r.updater.status().history.length, 1, 'no failed attempt on a partial file');
      assert.equal(currentVersion(r, 'slow'), '1.0.0');
    } finally {
      await r.stop();
    }
  });

  test('reconcile: an app the hub installed goes when the desired state no longer names it; an uploaded app stays', async () => {
    const files = new Map<string, string>();
    const { base } = await served((req, res) => {
      const f = files.get(req.url ?? '');
      if (!f) return void res.writeHead(404).end();
      res.writeHead(200, { 'content-length': String(readFileSync(f).length) }).end(readFileSync(f));
    });
    const r = await rig(tmp.dir, keys, { probationMs: 200 }, 'reconcile');
    try {
      const web = await buildAppBundle({ dir: tmp.dir, keys, name: 'web', version: '1.0.0', sequence: 1 });
      files.set('/web.bundle', web.file);
      r.updater.onDesired({ v: 1, rev: 1, ts: Date.now(), apps: { web: { version: '1.0.0', url: `${base}/web.bundle`, sha256: web.sha256, size: web.size } } });
      assert.equal((await finished(r, 0)).state, 'committed');
      r.updater.queueFile((await buildAppBundle({ dir: tmp.dir, keys, name: 'local', version: '1.0.0', sequence: 1 })).file);
      assert.equal((await finished(r, 1)).state, 'committed');
      await waitFor(() => r.supervisor.apps.get('web')?.status().pid && r.supervisor.apps.get('local')?.status().pid, 'both apps running');
      const webPid = r.supervisor.apps.get('web')!.status().pid!;

      r.updater.onDesired({ v: 1, rev: 2, ts: Date.now(), apps: {} });
      const ev = await waitFor(() => r.events.find((e) => e.type === 'update.app-removed'), 'update.app-removed');
      assert.equal(ev.data.name, 'web');
      assert.equal(ev.data.version, '1.0.0');
      assert.equal(r.supervisor.apps.has('web'), false, 'no longer supervised');
      await waitFor(() => !existsSync(`/proc/${webPid}`) || /^State:\s+Z/m.test(readFileSync(`/proc/${webPid}/status`, 'utf8')), 'the app process is gone');
      assert.equal(existsSync(join(r.stateDir, 'apps', 'web')), false, 'its releases are deleted');
      assert.equal(currentVersion(r, 'local'), '1.0.0', 'the uploaded app is not the hub\'s to remove');
      assert.ok(r.supervisor.apps.get('local')?.status().pid);
      // the anti-rollback floor of the removed name stays
      assert.equal((JSON.parse(readFileSync(join(r.stateDir, 'update', 'floors.json'), 'utf8')) as Record<string, number>).web, 1);
      assert.equal(r.updater.status().history.length, 2, 'a removal is not an update record');
    } finally {
      await r.stop();
    }
  });

  test('reconcile: a removal cut short by a crash (marker left) is finished before any app starts', async () => {
    const r0 = await rig(tmp.dir, keys, { probationMs: 100 }, 'reconcile-crash');
    r0.updater.queueFile((await buildAppBundle({ dir: tmp.dir, keys, name: 'old', version: '1.0.0', sequence: 1 })).file);
    assert.equal((await finished(r0, 0)).state, 'committed');
    await r0.stop();
    // as a crash leaves it: the marker written, `current` still there
    writeFileSync(join(r0.stateDir, 'apps', 'old', '.removing'), '{}');
    const r = await rig(tmp.dir, keys, { probationMs: 100 }, 'reconcile-crash');
    try {
      assert.deepEqual(r.updater.appSpecs().map((a) => a.name), []);
      assert.equal(existsSync(join(r.stateDir, 'apps', 'old')), false);
    } finally {
      await r.stop();
    }
  });

  test('an unreadable state record is moved aside and reported; the device keeps its current release', async () => {
    const r0 = await rig(tmp.dir, keys, { probationMs: 100 }, 'corrupt');
    r0.updater.queueFile((await buildAppBundle({ dir: tmp.dir, keys, name: 'z', version: '1.0.0', sequence: 1 })).file);
    assert.equal((await finished(r0, 0)).state, 'committed');
    await r0.stop();
    writeFileSync(join(r0.stateDir, 'update', 'state.json'), '{"v":1,"state":"half-writ');
    const r = await rig(tmp.dir, keys, { probationMs: 100 }, 'corrupt');
    try {
      assert.equal(r.updater.status().current, null);
      assert.ok(r.events.some((e) => e.type === 'update.state-unreadable'));
      assert.equal(currentVersion(r, 'z'), '1.0.0');
      assert.equal(r.updater.appSpecs()[0]?.name, 'z');
    } finally {
      await r.stop();
    }
  });

  test('a forged bundle fails before anything changes, and an older sequence is refused', async () => {
    const r = await rig(tmp.dir, keys, { probationMs: 100 }, 'forged');
    try {
      r.updater.queueFile((await buildAppBundle({ dir: tmp.dir, keys, name: 'x', version: '5.0.0', sequence: 5 })).file);
      assert.equal((await finished(r, 0)).state, 'committed');
      const other = makeKeys();
      r.updater.queueFile((await buildAppBundle({ dir: tmp.dir, keys: other, name: 'x', version: '6.0.0', sequence: 6 })).file);
      const forged = await finished(r, 1);
      assert.equal(forged.state, 'failed');
      assert.match(forged.code ?? '', /^FLEET_BUNDLE_/);
      r.updater.queueFile((await buildAppBundle({ dir: tmp.dir, keys, name: 'x', version: '4.0.0', sequence: 4 })).file);
      const old = await finished(r, 2);
      assert.equal(old.state, 'failed');
      assert.equal(old.code, 'FLEET_BUNDLE_ROLLBACK');
      assert.equal(currentVersion(r, 'x'), '5.0.0');
      assert.ok(!old.history.some((h) => h.state === 'switching'));
    } finally {
      await r.stop();
    }
  });
});

describe('error in X: a step that fails ends the update on the old or the new version', () => {
  const tmp = tempDir('fleetlet-update-err-');
  const keys = makeKeys();
  after(() => tmp.cleanup());

  async function installed(name: string, faults: Faults, cfg: Partial<UpdateConfig> = {}): Promise<Rig> {
    const r = await rig(tmp.dir, keys, { probationMs: 200, ...cfg }, name, faults);
    r.updater.queueFile((await buildAppBundle({ dir: tmp.dir, keys, name: 'app', version: '1.0.0', sequence: 1 })).file);
    assert.equal((await finished(r, 0)).state, 'committed');
    return r;
  }

  test('error in downloading (HTTP 404): failed, nothing changed', async () => {
    const { base } = await served((_req, res) => res.writeHead(404).end());
    const r = await installed('e-download', {});
    try {
      r.updater.onDesired({ v: 1, rev: 1, ts: Date.now(), apps: { app: { version: '2.0.0', url: `${base}/x`, sha256: 'b'.repeat(64) } } });
      const rec = await finished(r, 1);
      assert.equal(rec.state, 'failed');
      assert.equal(rec.code, 'FLEET_UPDATE_HTTP_REFUSED');
      assert.equal(currentVersion(r, 'app'), '1.0.0');
    } finally {
      await r.stop();
    }
  });

  test('error in staging (the rig\'s verifier made to throw): failed, the partial release removed, nothing changed', async () => {
    // verifier calls: 1 and 2 are v1's verifying and staging, 3 and 4 v2's
    const r = await installed('e-staging', { verifyCall: 4 });
    try {
      r.updater.queueFile((await buildAppBundle({ dir: tmp.dir, keys, name: 'app', version: '2.0.0', sequence: 2 })).file);
      const rec = await finished(r, 1);
      assert.equal(rec.state, 'failed');
      assert.deepEqual(rec.history.map((h) => h.state).slice(-2), ['staging', 'failed']);
      assert.equal(currentVersion(r, 'app'), '1.0.0');
      assert.deepEqual(readdirSync(join(r.stateDir, 'apps', 'app', 'releases')), ['1.0.0-s1']);
    } finally {
      await r.stop();
    }
  });

  test('error in switching (the rig\'s supervisor apply made to throw): rolled back to the old release', async () => {
    const r = await installed('e-switch', { applyIn: 'switching' });
    try {
      r.updater.queueFile((await buildAppBundle({ dir: tmp.dir, keys, name: 'app', version: '2.0.0', sequence: 2 })).file);
      const rec = await finished(r, 1);
      assert.equal(rec.state, 'rolled-back');
      assert.match(rec.reason ?? '', /injected: supervisor apply failed/);
      assert.equal(currentVersion(r, 'app'), '1.0.0');
      await waitFor(() => /1\.0\.0-s1/.test(r.supervisor.apps.get('app')?.status().command ?? '') && r.supervisor.apps.get('app')?.status().state === 'running', 'v1 running');
    } finally {
      await r.stop();
    }
  });

  test('error in committing: retried until committed', async () => {
    const r = await installed('e-commit', {});
    try {
      // floors.json cannot be written while a directory sits where its temp file goes
      const floors = join(r.stateDir, 'update', 'floors.json');
      const blocker = `${floors}.${process.pid}.tmp`;
      mkdirSync(join(blocker, 'x'), { recursive: true });
      r.updater.queueFile((await buildAppBundle({ dir: tmp.dir, keys, name: 'app', version: '2.0.0', sequence: 2 })).file);
      await waitFor(() => r.updater.status().current?.history.some((h) => h.state === 'committing' && h.event === 'retry'), 'a retried commit', 20_000);
      rmSync(blocker, { recursive: true });
      const rec = await finished(r, 1);
      assert.equal(rec.state, 'committed');
      assert.equal(currentVersion(r, 'app'), '2.0.0');
      assert.deepEqual(JSON.parse(readFileSync(floors, 'utf8')), { app: 2 });
    } finally {
      await r.stop();
    }
  });

  test('error in rolling-back (the rig\'s supervisor apply made to throw once): retried until rolled back', async () => {
    const r = await installed('e-rollback', { applyIn: 'rolling-back' }, { probationMs: 500 });
    try {
      r.updater.queueFile((await buildAppBundle({ dir: tmp.dir, keys, name: 'app', version: '2.0.0', sequence: 2, behaviour: 'crash' })).file);
      const rec = await finished(r, 1);
      assert.equal(rec.state, 'rolled-back');
      assert.ok(rec.history.some((h) => h.state === 'rolling-back' && h.event === 'retry'), JSON.stringify(rec.history));
      assert.equal(currentVersion(r, 'app'), '1.0.0');
      await waitFor(() => r.supervisor.apps.get('app')?.status().state === 'running', 'v1 running');
    } finally {
      await r.stop();
    }
  });
});

describe('download with Range resume', () => {
  const tmp = tempDir('fleetlet-dl-');
  const body = Buffer.alloc(3 * 1024 * 1024);
  for (let i = 0; i < body.length; i++) body[i] = (i * 31) & 0xff;
  let server: Server;
  let url = '';
  const seen: Array<{ range: string | undefined }> = [];
  let cutOnce = true;
  before(async () => {
    server = createServer((req, res) => {
      seen.push({ range: req.headers.range });
      const m = /^bytes=(\d+)-$/.exec(req.headers.range ?? '');
      const start = m ? Number(m[1]) : 0;
      res.writeHead(m ? 206 : 200, { 'content-length': body.length - start, ...(m ? { 'content-range': `bytes ${start}-${body.length - 1}/${body.length}` } : {}) });
      if (cutOnce) {
        // the connection is cut a third of the way through
        cutOnce = false;
        // a FIN after the bytes (not a reset, which may throw away what the client has not read
        // yet): the client gets this first MiB, then a response cut short
        res.write(body.subarray(start, start + 1024 * 1024), () => setTimeout(() => res.socket?.end(), 50));
        return;
      }
      res.end(body.subarray(start));
    });
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    url = `http://127.0.0.1:${(server.address() as AddressInfo).port}/b`;
  });
  after(async () => {
    server.closeAllConnections();
    await new Promise<void>((r) => server.close(() => r()));
    tmp.cleanup();
  });
  const base = { reserveBytes: 0, maxBytes: 1 << 30, attempts: 5, backoffInitialMs: 10, backoffMaxMs: 100, idleTimeoutMs: 5000, log: testLogger('dl') };
  const sha = (b: Buffer) => createHash('sha256').update(b).digest('hex');

  test('a cut connection resumes with Range from where it stopped', async () => {
    const dest = join(tmp.dir, 'a.bundle');
    const res = await download({ ...base, url, dest, sha256: sha(body), size: body.length });
    assert.equal(res.size, body.length);
    assert.ok(readFileSync(dest).equals(body));
    assert.equal(seen.length, 2);
    assert.equal(seen[0]!.range, undefined);
    // from what the partial file held at the cut: some of the first MiB (what arrived but was
    // not yet written when the response broke off is asked for again), never more, never 0;
    // the whole file equal to the body (above) shows the offset and the file agreed
    assert.match(seen[1]!.range ?? '', /^bytes=\d+-$/);
    const from = Number(/\d+/.exec(seen[1]!.range!)![0]);
    assert.ok(from > 0 && from <= 1024 * 1024, `resumed from ${seen[1]!.range}`);
    assert.ok(!existsSync(`${dest}.part`));
  });

  test('not enough disk space is refused before the first byte', async () => {
    const dest = join(tmp.dir, 'b.bundle');
    const n = seen.length;
    await assert.rejects(download({ ...base, url, dest, size: body.length, freeBytes: () => 1000 }), (e: unknown) => isFleetError(e, 'FLEET_UPDATE_NO_SPACE'));
    assert.equal(seen.length, n);
  });

  test('a wrong hash is not renamed into place', async () => {
    const dest = join(tmp.dir, 'c.bundle');
    await assert.rejects(download({ ...base, url, dest, sha256: '0'.repeat(64) }), (e: unknown) => isFleetError(e, 'FLEET_UPDATE_HASH_MISMATCH'));
    assert.ok(!existsSync(dest));
    assert.ok(!existsSync(`${dest}.part`));
  });
});
