/**
 * "Killed in X" for every state X of an app update, the loop guard, and a randomized fault loop of 200
 * SIGKILLs (about 2–3 minutes on a loaded 2-core machine). The updater runs in a child
 * process with the real supervisor (test/fixtures/ota/runner.ts, bundled with esbuild so a
 * start costs a plain node start); apps are real processes; bundles are real signed files.
 */
import assert from 'node:assert/strict';
import { createReadStream, existsSync, readFileSync, rmSync, statSync } from 'node:fs';
import { createServer, type Server } from 'node:http';
import type { AddressInfo, Socket } from 'node:net';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { after, before, describe, test } from 'node:test';
import type { UpdateState } from '../../agent/update/machine.ts';
import type { UpdateRecord } from '../../agent/update/types.ts';
import { tempDir, waitFor } from '../helpers.ts';
import { buildRunner } from '../fixtures/ota/build-runner.ts';
import { buildAppBundle, installTrustRoot, makeKeys, type Keys } from '../fixtures/ota/kit.ts';
import { alive, RunnerProc } from '../fixtures/ota/proc.ts';

const UPDATE = { probationMs: 300, lockPollMs: 50, downloadBackoffMs: 20 };

type Case = { state: UpdateState; v2: 'good' | 'crash' | 'forged'; lock?: boolean; viaUrl?: boolean };
const CASES: Case[] = [
  // downloading: killed with half the bundle on disk (not parked at the state's entry like the others)
  { state: 'downloading', v2: 'good', viaUrl: true },
  { state: 'verifying', v2: 'good' },
  { state: 'staging', v2: 'good' },
  { state: 'staged', v2: 'good' },
  { state: 'waiting-lock', v2: 'good', lock: true },
  { state: 'switching', v2: 'good' },
  { state: 'probation', v2: 'good' },
  { state: 'committing', v2: 'good' },
  { state: 'committed', v2: 'good' },
  { state: 'rolling-back', v2: 'crash' },
  { state: 'rolled-back', v2: 'crash' },
  { state: 'failed', v2: 'forged' },
];

async function settled(r: RunnerProc, updates: number, timeoutMs = 30_000): Promise<UpdateRecord> {
  return waitFor(
    () => {
      const s = r.state();
      return s && r.history().length >= updates && ['committed', 'rolled-back', 'failed'].includes(s.state) && s.reported ? s : undefined;
    },
    `update ${updates} to settle (log:\n${r.log().slice(-1500)})`,
    timeoutMs,
  );
}

function events(r: RunnerProc): Array<{ type: string; data: Record<string, unknown> }> {
  const f = join(r.stateDir, 'events.jsonl');
  if (!existsSync(f)) return [];
  return readFileSync(f, 'utf8').trim().split('\n').filter(Boolean).map((l) => JSON.parse(l) as { type: string; data: Record<string, unknown> });
}

describe('killed in X: SIGKILL in every update state, restart, end committed on the old or the new version', () => {
  const tmp = tempDir('fleetlet-otakill-');
  const keys: Keys = makeKeys();
  let runner = '';
  let server: Server;
  let base = '';
  /** what the artifact server saw: path and Range header of each request */
  const seen: Array<{ path: string; range: string | undefined }> = [];
  const stalled = new Set<Socket>();
  before(async () => {
    runner = await buildRunner(tmp.dir);
    // a plain artifact server with Range, for the download case
    server = createServer((req, res) => {
      const file = join(tmp.dir, decodeURIComponent((req.url ?? '/').slice(1)));
      if (!existsSync(file)) {
        res.writeHead(404).end();
        return;
      }
      const size = statSync(file).size;
      const m = /^bytes=(\d+)-$/.exec(req.headers.range ?? '');
      const start = m ? Number(m[1]) : 0;
      seen.push({ path: req.url ?? '', range: req.headers.range });
      res.writeHead(m ? 206 : 200, { 'content-length': size - start, ...(m ? { 'content-range': `bytes ${start}-${size - 1}/${size}` } : {}) });
      if (!m) {
        // the first fetch gets half the file, then the link goes quiet: the agent is killed mid-download
        createReadStream(file, { start: 0, end: Math.floor(size / 2) - 1 }).on('data', (c) => res.write(c)).on('end', () => stalled.add(res.socket!));
        return;
      }
      createReadStream(file, { start }).pipe(res);
    });
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  });
  after(async () => {
    for (const s of stalled) s.destroy();
    server.closeAllConnections();
    await new Promise<void>((r) => server.close(() => r()));
    tmp.cleanup();
  });

  for (const c of CASES) {
    test(`killed in ${c.state}`, async () => {
      const dir = join(tmp.dir, c.state);
      const trust = installTrustRoot(dir, keys);
      const r = new RunnerProc(runner, dir, trust, UPDATE);
      try {
        const v1 = await buildAppBundle({ dir: tmp.dir, keys, name: 'web', version: '1.0.0', sequence: 1 });
        const v2 = await buildAppBundle({
          dir: join(tmp.dir),
          keys: c.v2 === 'forged' ? makeKeys() : keys,
          name: 'web',
          version: '2.0.0',
          sequence: 2,
          behaviour: c.v2 === 'crash' ? 'crash' : 'good',
          pad: c.viaUrl ? 256 * 1024 : 0,
        });
        const marker = join(dir, 'paused.json');
        const lock = join(dir, 'apps', 'web', 'update.lock');
        await r.start({
          queue: c.viaUrl ? [v1.file] : [v1.file, v2.file],
          ...(c.viaUrl ? { desired: { v: 1, rev: 1, ts: Date.now(), apps: { web: { version: '2.0.0', url: `${base}/${v2.file.slice(tmp.dir.length + 1)}`, sha256: v2.sha256, size: v2.size } } } } : {}),
          ...(c.viaUrl ? {} : { pauseIn: c.state }),
          pauseAfter: 1,
          pauseMarker: marker,
          ...(c.lock ? { lockOnStaged: lock } : {}),
        });
        if (c.viaUrl) {
          // killed mid-download: once half the bundle is in the partial file
          const part = join(dir, 'update', 'downloads', `${v2.sha256}.bundle.part`);
          await waitFor(() => existsSync(part) && statSync(part).size >= Math.floor(v2.size / 2), `half of the download (log:\n${r.log().slice(-1500)})`, 30_000);
        } else await waitFor(() => existsSync(marker), `the runner to reach ${c.state} (log:\n${r.log().slice(-1500)})`, 30_000);
        await r.kill9();
        const persisted = r.state();
        assert.equal(persisted?.state, c.state, 'the state was persisted before its action');
        // never on neither version: `current` points at a complete release of v1 or v2
        const atKill = r.currentVersion('web');
        assert.ok(atKill === '1.0.0' || atKill === '2.0.0', `current at kill: ${atKill}`);

        await r.start();
        if (c.lock) {
          await waitFor(() => r.state()?.state === 'waiting-lock' && (r.state()?.resumes ?? 0) >= 1, 'waiting-lock after the restart');
          await sleep(300);
          assert.equal(r.state()?.state, 'waiting-lock');
          rmSync(lock);
        }
        const fin = await settled(r, 2);
        if (c.viaUrl) {
          // the restarted updater asked only for the rest (HTTP Range), not the whole file again
          const v2Requests = seen.filter((x) => x.path.endsWith(v2.file.slice(tmp.dir.length + 1)));
          assert.equal(v2Requests.length, 2, JSON.stringify(v2Requests));
          assert.equal(v2Requests[1]!.range, `bytes=${Math.floor(v2.size / 2)}-`);
        }
        const want = c.v2 === 'good' ? { state: 'committed', version: '2.0.0' } : c.v2 === 'crash' ? { state: 'rolled-back', version: '1.0.0' } : { state: 'failed', version: '1.0.0' };
        assert.equal(fin.state, want.state, JSON.stringify(fin.history));
        assert.equal(r.currentVersion('web'), want.version);
        // the chain of states is recorded, with the resume after the kill
        const chain = fin.history.map((h) => h.state);
        assert.ok(chain.includes(c.state), `chain ${chain.join(' > ')}`);
        if (!['committed', 'rolled-back', 'failed'].includes(c.state)) {
          assert.ok(fin.history.some((h) => h.resumed && h.state === c.state), `resume of ${c.state} recorded: ${chain.join(' > ')}`);
          assert.equal(fin.resumes, 1);
        }
        // reported at least once, with the chain
        const ev = events(r).filter((e) => e.type === `update.${want.state}`);
        assert.ok(ev.length >= 1, `update.${want.state} reported`);
        // the app runs, from the version `current` names
        await waitFor(() => {
          const last = r.runs().at(-1);
          return last && last.version === want.version && alive(last.pid);
        }, `app ${want.version} running`);
      } finally {
        await r.stop();
      }
    });
  }
});

describe('loop guard', () => {
  const tmp = tempDir('fleetlet-otaloop-');
  after(() => tmp.cleanup());

  test('an update killed in probation on every start is rolled back after update.maxResumes resumes', async () => {
    const keys = makeKeys();
    const runner = await buildRunner(tmp.dir);
    const dir = join(tmp.dir, 'device');
    const trust = installTrustRoot(dir, keys);
    const v1 = await buildAppBundle({ dir: tmp.dir, keys, name: 'web', version: '1.0.0', sequence: 1 });
    const v2 = await buildAppBundle({ dir: tmp.dir, keys, name: 'web', version: '2.0.0', sequence: 2 });
    const install = new RunnerProc(runner, dir, trust, UPDATE);
    try {
      await install.start({ queue: [v1.file] });
      await settled(install, 1);
    } finally {
      await install.stop();
    }
    // a long probation, so every kill lands in it; two resumes allowed
    const r = new RunnerProc(runner, dir, trust, { ...UPDATE, probationMs: 60_000, maxResumes: 2 });
    try {
      const marker = join(dir, 'paused.json');
      await r.start({ queue: [v2.file], pauseIn: 'probation', pauseAfter: 1, pauseMarker: marker });
      await waitFor(() => existsSync(marker), 'probation');
      await r.kill9();
      for (let resume = 1; resume <= 2; resume++) {
        await r.start();
        await waitFor(() => r.state()?.state === 'probation' && r.state()?.resumes === resume, `resume ${resume} in probation`);
        assert.equal(r.currentVersion('web'), '2.0.0');
        await r.kill9();
      }
      await r.start();
      const fin = await settled(r, 2);
      assert.equal(fin.state, 'rolled-back');
      assert.equal(fin.code, 'FLEET_UPDATE_LOOP');
      assert.equal(fin.resumes, 3);
      assert.deepEqual(fin.history.slice(-3).map((h) => h.state), ['probation', 'rolling-back', 'rolled-back']);
      assert.equal(fin.history.filter((h) => h.resumed).length, 3);
      assert.equal(r.currentVersion('web'), '1.0.0');
      await waitFor(() => {
        const last = r.runs().at(-1);
        return last && last.version === '1.0.0' && alive(last.pid);
      }, 'app 1.0.0 running again');
    } finally {
      await r.stop();
    }
  });
});

describe('fault loop: 200 SIGKILLs at random moments of updates (about 2–3 min)', () => {
  const tmp = tempDir('fleetlet-otafault-');
  after(() => tmp.cleanup());

  test('zero devices left on neither version', { timeout: 400_000 }, async () => {
    const keys = makeKeys();
    const runner = await buildRunner(tmp.dir);
    const dir = join(tmp.dir, 'device');
    const trust = installTrustRoot(dir, keys);
    // every update stays in history.json (the test counts them there); the loop guard is off so each update gets through
    const r = new RunnerProc(runner, dir, trust, { ...UPDATE, maxResumes: 1000, historyLimit: 1000 });
    const KILLS = Number(process.env.OTA_FAULT_KILLS ?? 200);
    // versions alternate good and crashing, so both commit and rollback paths are hit
    const plan: Array<{ version: string; good: boolean }> = [];
    for (let i = 1; i <= 200; i++) plan.push({ version: `1.0.${i}`, good: i % 3 !== 0 });
    let next = 0;
    let committed: string | null = null;
    let inFlight: { version: string; good: boolean } | null = null;
    let finishedUpdates = 0;
    let outcomes = { committed: 0, 'rolled-back': 0, failed: 0 };
    const seed = Number(process.env.OTA_FAULT_SEED ?? Date.now() % 100_000);
    let rnd = seed;
    const random = () => ((rnd = (rnd * 1103515245 + 12345) % 2 ** 31) / 2 ** 31);
    const t0 = Date.now();
    try {
      for (let kill = 0; kill < KILLS; kill++) {
        const s = r.state();
        const settledNow = s && ['committed', 'rolled-back', 'failed'].includes(s.state) && s.reported && r.history().length === finishedUpdates + (inFlight ? 1 : 0);
        if (inFlight && settledNow) {
          outcomes[s.state as keyof typeof outcomes]++;
          finishedUpdates++;
          if (s.state === 'committed') committed = inFlight.version;
          inFlight = null;
        }
        if (!inFlight && next < plan.length) {
          inFlight = plan[next++]!;
          const b = await buildAppBundle({ dir: tmp.dir, keys, name: 'web', version: inFlight.version, sequence: next, behaviour: inFlight.good ? 'good' : 'crash' });
          r.drop(b.file);
        }
        r.spawnOnly();
        await sleep(Math.floor(random() * 900));
        await r.kill9();
        const cur = r.currentVersion('web');
        const allowed = new Set([committed, inFlight?.version ?? null]);
        assert.ok(allowed.has(cur), `kill ${kill} (seed ${seed}): current is ${cur}, expected one of ${[...allowed].join(', ')}; state ${JSON.stringify(r.state()?.history.map((h) => h.state))}`);
        // the very first install has no old version: nothing installed is allowed only before its first commit
        if (cur === null) assert.equal(committed, null, `kill ${kill}: nothing installed after a commit`);
      }
      // let the last update finish undisturbed
      await r.start();
      const fin = await settled(r, finishedUpdates + (inFlight ? 1 : 0), 60_000);
      if (inFlight) {
        outcomes[fin.state as keyof typeof outcomes]++;
        if (fin.state === 'committed') committed = inFlight.version;
      }
      assert.equal(r.currentVersion('web'), committed);
      await waitFor(() => {
        const last = r.runs().at(-1);
        return last && last.version === committed && alive(last.pid);
      }, `app ${committed} running at the end`);
      const secs = Math.round((Date.now() - t0) / 1000);
      process.stdout.write(`# fault loop: ${KILLS} kills in ${secs} s, seed ${seed}; updates finished: ${JSON.stringify(outcomes)}; final version ${committed}\n`);
      assert.ok(outcomes.committed + outcomes['rolled-back'] + outcomes.failed >= 3, 'several updates finished during the loop');
    } finally {
      await r.stop();
    }
  });
});
