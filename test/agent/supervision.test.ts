import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync, mkdirSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { loadConfig } from '../../core/config.ts';
import { FleetError } from '../../core/errors.ts';
import { backoffDelay, DEFAULT_BACKOFF, RestartTracker } from '../../agent/backoff.ts';
import { AgentConfigSchema, AppSpecSchema, JobSpecSchema } from '../../agent/config.ts';
import { JobScheduler } from '../../agent/jobs.ts';
import { detectCgroup, prepareLimits } from '../../agent/limits.ts';
import { RotatingLog } from '../../agent/logfiles.ts';
import { HealthMonitor } from '../../agent/health.ts';
import { Supervisor } from '../../agent/supervisor.ts';
import { resolveUser } from '../../agent/users.ts';
import { tempDir, testLogger, waitFor } from '../helpers.ts';

const fast = { initialMs: 20, factor: 1.5, maxMs: 200, resetAfterMs: 30_000 };

/** pids whose process group is `pgid` (from /proc/<pid>/stat, field 5) */
function groupMembers(pgid: number): number[] {
  const out: number[] = [];
  for (const d of readdirSync('/proc')) {
    if (!/^\d+$/.test(d)) continue;
    try {
      const stat = readFileSync(`/proc/${d}/stat`, 'utf8');
      const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      if (fields[0] !== 'Z' && Number(fields[2]) === pgid) out.push(Number(d));
    } catch {
      // raced with an exit
    }
  }
  return out;
}

test('restart tracker: PM2 schedule, reset after stable uptime, crash-loop enter and leave (injected clock)', () => {
  const t = new RestartTracker(DEFAULT_BACKOFF, { restarts: 5, windowMs: 60_000 });
  let now = 1_000_000;
  const rows: Array<[number, number, boolean]> = [];
  // six quick crashes, one second apart
  for (let i = 0; i < 6; i++) {
    const d = t.onExit(now, 500);
    rows.push([d.delayMs, i, d.crashLoop]);
    now += 1000;
  }
  assert.deepEqual(
    rows.map((r) => r[0]),
    [100, 150, 225, 338, 506, 759],
  );
  assert.deepEqual(
    rows.map((r) => r[2]),
    [false, false, false, false, true, true],
    'the fifth restart within 60 s enters crash-loop',
  );
  // the cap
  for (let i = 0; i < 20; i++) t.onExit((now += 1000), 10);
  assert.equal(t.onExit((now += 1000), 10).delayMs, 15_000);
  // a run that stayed up 30 s resets the backoff and leaves crash-loop
  now += 120_000;
  const after = t.onExit(now, 30_000);
  assert.equal(after.delayMs, 100);
  assert.equal(after.crashLoop, false);
  // a person's restart clears the streak
  t.onExit((now += 100), 10);
  t.reset();
  assert.equal(t.onExit((now += 100), 10).delayMs, 100);
  assert.equal(backoffDelay(DEFAULT_BACKOFF, 100), 15_000);
});

test('supervisor: an exec health check that starts failing restarts the app and reports unhealthy', async () => {
  const { dir, cleanup } = tempDir();
  const flag = join(dir, 'healthy');
  writeFileSync(flag, '');
  const sup = new Supervisor({ log: testLogger(), backoff: fast, logDir: join(dir, 'logs') });
  const events: Array<Record<string, unknown>> = [];
  sup.on('health', (e) => events.push(e));
  sup.on('unhealthy', (e) => events.push({ unhealthy: true, ...e }));
  try {
    await sup.apply([
      AppSpecSchema.parse({
        name: 'checked',
        command: '/bin/sh',
        args: ['-c', 'echo up; exec sleep 60'],
        stopTimeoutMs: 500,
        health: { type: 'exec', command: '/bin/sh', args: ['-c', `test -f ${flag}`], intervalMs: 100, timeoutMs: 1000, retries: 2 },
      }),
    ]);
    const app = sup.apps.get('checked')!;
    await waitFor(() => app.status().health.status === 'healthy', 'healthy');
    const firstPid = app.status().pid;
    assert.equal(app.restarts, 0);
    rmSync(flag);
    await waitFor(() => events.some((e) => e.unhealthy), 'unhealthy event');
    await waitFor(() => app.restarts >= 1 && app.status().state === 'running', 'restarted');
    assert.notEqual(app.status().pid, firstPid, 'a new process');
    assert.ok(events.some((e) => e.status === 'unhealthy' && String(e.lastError).startsWith('exit 1')), JSON.stringify(events));
    // healthy again once the check passes
    writeFileSync(flag, '');
    await waitFor(() => app.status().health.status === 'healthy', 'healthy again');
  } finally {
    await sup.stopAll();
    cleanup();
  }
});

test('health monitor: restarted (stop, start) while a probe is under way, it keeps one probe loop: the old probe\'s result is ignored and nothing probes after stop (real HTTP server holding the first probe)', async () => {
  const held: Array<() => void> = [];
  let probes = 0;
  const server = createServer((_req, res) => {
    probes++;
    if (probes === 1) held.push(() => res.writeHead(500).end());
    else res.writeHead(200).end();
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  const changes: string[] = [];
  const mon = new HealthMonitor(
    { probe: { type: 'http', url: `http://127.0.0.1:${(server.address() as AddressInfo).port}/` }, intervalMs: 50, timeoutMs: 5000, retries: 1, startPeriodMs: 0 },
    { onChange: (st) => changes.push(st.status), onUnhealthy: () => changes.push('restart asked') },
  );
  try {
    mon.start();
    await waitFor(() => held.length === 1, 'the first probe held');
    mon.stop();
    mon.start(); // as the supervisor does when the app restarts
    held[0]!(); // the old process's probe fails now
    await waitFor(() => changes.includes('healthy'), 'the new run healthy');
    assert.ok(!changes.includes('unhealthy') && !changes.includes('restart asked'), `the old probe's 500 counted: ${changes.join(', ')}`);
    mon.stop();
    const after = probes;
    await sleep(400); // 8 intervals: a second loop left behind would probe again
    assert.equal(probes, after, 'a probe after stop');
  } finally {
    mon.stop();
    server.closeAllConnections();
    await new Promise<void>((r) => server.close(() => r()));
  }
});

test('supervisor: HTTP and TCP health checks against a real server', async () => {
  let healthy = true;
  const server = createServer((_req, res) => {
    res.statusCode = healthy ? 200 : 503;
    res.end();
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const port = (server.address() as { port: number }).port;
  const sup = new Supervisor({ log: testLogger(), backoff: fast });
  const unhealthy: Array<Record<string, unknown>> = [];
  sup.on('unhealthy', (e) => unhealthy.push(e));
  try {
    await sup.apply([
      AppSpecSchema.parse({ name: 'web', command: 'sleep', args: ['60'], stopTimeoutMs: 500, health: { type: 'http', url: `http://127.0.0.1:${port}/health`, intervalMs: 100, retries: 2 } }),
      AppSpecSchema.parse({ name: 'sock', command: 'sleep', args: ['60'], stopTimeoutMs: 500, health: { type: 'tcp', port, intervalMs: 100, retries: 2 } }),
    ]);
    await waitFor(() => sup.apps.get('web')!.status().health.status === 'healthy' && sup.apps.get('sock')!.status().health.status === 'healthy', 'both healthy');
    healthy = false;
    await waitFor(() => sup.apps.get('web')!.restarts >= 1, 'web restarted after HTTP 503');
    assert.deepEqual(unhealthy[0], { app: 'web', reason: 'HTTP 503' });
    assert.equal(sup.apps.get('sock')!.restarts, 0, 'the TCP check still passes');
    // closing waits for idle keep-alive connections (the probes' pooled sockets): end them now
    const closed = new Promise<void>((r) => server.close(() => r()));
    server.closeAllConnections();
    await closed;
    await waitFor(() => sup.apps.get('sock')!.restarts >= 1, 'sock restarted once the port is closed');
  } finally {
    await sup.stopAll();
    server.close();
  }
});

test('supervisor: no orphans after the agent process is SIGKILLed (process groups checked in /proc)', async () => {
  const { dir, cleanup } = tempDir();
  const script = join(dir, 'mini-agent.mts');
  const root = process.cwd();
  writeFileSync(
    script,
    `import { Supervisor } from ${JSON.stringify(join(root, 'agent/supervisor.ts'))};
import { AppSpecSchema } from ${JSON.stringify(join(root, 'agent/config.ts'))};
import { createLogger } from ${JSON.stringify(join(root, 'core/log.ts'))};
const sup = new Supervisor({ log: createLogger({ name: 'mini', level: 'silent' }) });
await sup.apply([
  AppSpecSchema.parse({ name: 'a', command: '/bin/sh', args: ['-c', 'sleep 300 & sleep 300 & wait'], stopTimeoutMs: 1000 }),
  AppSpecSchema.parse({ name: 'b', command: '/bin/sh', args: ['-c', 'trap "" TERM; sleep 300 & wait'], stopTimeoutMs: 1000 }),
]);
setTimeout(() => console.log(JSON.stringify(sup.status().map((s) => s.pid))), 500);
setInterval(() => {}, 1000);
`,
  );
  const child = spawn(process.execPath, ['--import', 'tsx', script], { stdio: ['ignore', 'pipe', 'inherit'] });
  try {
    let out = '';
    child.stdout.on('data', (b: Buffer) => (out += b.toString()));
    const pids = await waitFor(() => (out.includes(']') ? (JSON.parse(out.trim().split('\n')[0]!) as number[]) : null), 'app pids', 20_000);
    assert.equal(pids.length, 2);
    for (const pgid of pids) await waitFor(() => groupMembers(pgid).length >= 2, `group ${pgid} has the app and its children`);
    const before = pids.map((p) => groupMembers(p));
    child.kill('SIGKILL');
    // the watcher sends SIGTERM at once and SIGKILL after the 1 s grace (b ignores SIGTERM)
    for (const pgid of pids) await waitFor(() => groupMembers(pgid).length === 0, `process group ${pgid} (${before.join('/')}) empty`, 8000);
  } finally {
    child.kill('SIGKILL');
    cleanup();
  }
});

test('log files: rotation by size keeps N files; tail spans generations; the app writes through the supervisor', async (t) => {
  const { dir, cleanup } = tempDir();
  try {
    const log = new RotatingLog(join(dir, 'x'), 'x', { maxBytes: 4096, files: 3 });
    for (let i = 0; i < 1000; i++) log.write(`line ${String(i).padStart(4, '0')} ${'x'.repeat(20)}`);
    log.flush();
    const files = log.files();
    assert.equal(files.length, 3, JSON.stringify(files));
    for (const f of files) assert.ok(f.bytes <= 4096, `${f.path} ${f.bytes}`);
    assert.ok(!existsSync(join(dir, 'x', 'x.log.3')), 'no fourth generation');
    const tail = log.tail(200);
    assert.equal(tail.length, 200);
    assert.match(tail.at(-1)!, /^line 0999 /);
    assert.match(tail[0]!, /^line 0800 /);
    log.close();

    const sup = new Supervisor({ log: testLogger(), backoff: fast, logDir: join(dir, 'logs') });
    t.after(() => sup.stopAll()); // also when an assertion fails
    await sup.apply([AppSpecSchema.parse({ name: 'talker', command: '/bin/sh', args: ['-c', 'echo out-line; echo err-line >&2; exec sleep 60'], stopTimeoutMs: 300 })]);
    const app = sup.apps.get('talker')!;
    await waitFor(() => app.lines.length >= 2, 'two lines');
    const file = app.status().logFile!;
    await waitFor(() => readFileSync(file, 'utf8').includes('err-line'), 'file has the lines', 3000);
    const text = readFileSync(file, 'utf8');
    assert.match(text, /^\d{4}-\d\d-\d\dT[\d:.]+Z stdout out-line$/m);
    assert.match(text, /stderr err-line$/m);
    assert.equal(statSync(file).mode & 0o777, 0o640);
    await sup.stopAll();
  } finally {
    cleanup();
  }
});

test('limits: without a writable cgroup v2, memory becomes RLIMIT_DATA in the app and the API says so', async () => {
  const sup = new Supervisor({ log: testLogger(), backoff: fast, cgroup: null });
  try {
    await sup.apply([AppSpecSchema.parse({ name: 'lim', command: '/bin/sh', args: ['-c', 'ulimit -d; exec sleep 60'], limits: { memoryMb: 64, cpuPercent: 50, nice: 5 }, stopTimeoutMs: 300 })]);
    const app = sup.apps.get('lim')!;
    await waitFor(() => app.lines.length > 0, 'ulimit output');
    assert.equal(app.lines[0]!.line, String(64 * 1024), 'RLIMIT_DATA in KiB as seen by the app');
    const pid = app.status().pid!;
    const niceField = Number(readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1]!.split(' ')[16]);
    assert.equal(niceField, 5, 'nice applied');
    const lim = app.status().limits;
    assert.equal(lim.memory.enforced, 'rlimit-data');
    assert.equal(lim.cpu.enforced, 'none');
    assert.ok(lim.notes.some((n) => n.includes('not capped')), JSON.stringify(lim.notes));
  } finally {
    await sup.stopAll();
  }
});

test('limits: cgroup v2 path (cgroupfs simulated in a temp dir: no writable cgroup v2 on this machine)', () => {
  const { dir, cleanup } = tempDir();
  try {
    // a fake unified hierarchy: the agent's own cgroup is /system.slice/fleetlet.service
    const own = join(dir, 'system.slice', 'fleetlet.service');
    mkdirSync(own, { recursive: true });
    writeFileSync(join(dir, 'cgroup.controllers'), 'cpu memory io pids');
    writeFileSync(join(own, 'cgroup.controllers'), 'cpu memory pids');
    writeFileSync(join(dir, 'self-cgroup'), '0::/system.slice/fleetlet.service\n');
    const cg = detectCgroup(testLogger(), dir, join(dir, 'self-cgroup'), 4242);
    assert.ok(cg);
    assert.equal(readFileSync(join(own, 'agent', 'cgroup.procs'), 'utf8'), '4242', 'the agent moved itself to a leaf');
    assert.equal(readFileSync(join(own, 'cgroup.subtree_control'), 'utf8'), '+memory +cpu');
    const { enforced, shim } = prepareLimits('web', { memoryMb: 128, cpuPercent: 50 }, cg);
    assert.equal(enforced.memory.enforced, 'cgroup');
    assert.equal(enforced.cpu.enforced, 'cgroup');
    assert.equal(readFileSync(join(own, 'app-web', 'memory.max'), 'utf8'), String(128 * 1024 * 1024));
    assert.equal(readFileSync(join(own, 'app-web', 'cpu.max'), 'utf8'), '50000 100000');
    assert.deepEqual(shim, {}, 'no rlimit fallback when the cgroup enforces memory');
    // no v2 mount at all: detection says so instead of guessing
    assert.equal(detectCgroup(testLogger(), join(dir, 'nope')), null);
  } finally {
    cleanup();
  }
});

test('users: apps run as the named user (as root), or refuse clearly', async () => {
  const nobody = resolveUser('nobody');
  assert.equal(nobody.uid, 65534);
  assert.throws(() => resolveUser('no-such-user-here'), (e: unknown) => e instanceof FleetError && e.code === 'FLEET_APP_USER');
  const sup = new Supervisor({ log: testLogger(), backoff: fast });
  try {
    await sup.apply([AppSpecSchema.parse({ name: 'who', command: '/bin/sh', args: ['-c', 'id -u; echo $HOME; exec sleep 60'], user: 'nobody', stopTimeoutMs: 300 })]);
    const app = sup.apps.get('who')!;
    if (process.getuid?.() === 0) {
      await waitFor(() => app.lines.length >= 2, 'output');
      assert.equal(app.lines[0]!.line, '65534');
      assert.equal(app.lines[1]!.line, nobody.home);
    } else {
      await waitFor(() => app.status().startError, 'start error');
      assert.match(app.status().startError!, /needs the agent to run as root/);
    }
  } finally {
    await sup.stopAll();
  }
});

test('jobs: cron runs never overlap, time out, and can restart an app', async () => {
  const { dir, cleanup } = tempDir();
  const sup = new Supervisor({ log: testLogger(), backoff: fast });
  const lines: string[] = [];
  const jobs = new JobScheduler(testLogger(), {
    restartApp: async (name) => {
      await sup.apps.get(name)!.restart();
    },
    line: (_job, _stream, line) => lines.push(line),
  });
  try {
    await sup.apply([AppSpecSchema.parse({ name: 'svc', command: 'sleep', args: ['60'], stopTimeoutMs: 300 })]);
    jobs.start([
      // every second; each run takes 2.5 s, so ticks meet a running job
      JobSpecSchema.parse({ name: 'slow', schedule: '* * * * * *', command: '/bin/sh', args: ['-c', `echo run >> ${join(dir, 'runs')}; echo hello; sleep 2.5`] }),
      JobSpecSchema.parse({ name: 'bounce', schedule: '* * * * * *', restartApp: 'svc' }),
      JobSpecSchema.parse({ name: 'stuck', schedule: '* * * * * *', command: 'sleep', args: ['30'], timeoutMs: 300 }),
    ]);
    await waitFor(() => jobs.status().find((j) => j.name === 'slow')!.skippedOverlap >= 2, 'overlapping ticks skipped', 15_000);
    await waitFor(() => sup.apps.get('svc')!.restarts >= 1, 'svc restarted by the job');
    await waitFor(() => jobs.status().find((j) => j.name === 'stuck')!.lastRun, 'stuck job ended');
    // a run is counted as it starts and its shell writes its line a little later: compared when they agree
    // (a skipped tick that started the command anyway would leave the file ahead for good)
    const fileRuns = () => readFileSync(join(dir, 'runs'), 'utf8').trim().split('\n').length;
    const slowRuns = () => jobs.status().find((j) => j.name === 'slow')!.runs;
    await waitFor(() => fileRuns() === slowRuns(), 'a skipped tick did not start the command (runs counted = runs in the file)', 10_000).catch((err: Error) => {
      throw new Error(`${err.message}: file ${fileRuns()}, counted ${slowRuns()}`);
    });
    assert.ok(lines.includes('hello'));
    const stuck = jobs.status().find((j) => j.name === 'stuck')!;
    assert.equal(stuck.lastRun!.ok, false);
    assert.match(stuck.lastRun!.result, /timed out after 300 ms/);
    assert.ok(stuck.nextRun, 'next run known');
  } finally {
    await jobs.stop();
    await sup.stopAll();
    cleanup();
  }
});

test('config: bad health, limits and job entries name the key and the file', () => {
  const { dir, cleanup } = tempDir();
  try {
    const cases: Array<[unknown, RegExp]> = [
      [{ apps: [{ name: 'a', command: 'x', health: { type: 'tcp' } }] }, /apps\.0\.health\.port: a tcp health check needs port/],
      [{ apps: [{ name: 'a', command: 'x', limits: { nice: 40 } }] }, /apps\.0\.limits\.nice/],
      [{ apps: [{ name: 'a', command: 'x' }], jobs: [{ name: 'j', schedule: 'every day', command: 'true' }] }, /jobs\.0\.schedule: not a valid cron expression/],
      [{ apps: [{ name: 'a', command: 'x' }], jobs: [{ name: 'j', schedule: '0 * * * *', restartApp: 'b' }] }, /jobs\.0\.restartApp: no app named "b"/],
      [{ jobs: [{ name: 'j', schedule: '0 * * * *' }] }, /jobs\.0: a job has either command or restartApp/],
    ];
    for (const [raw, re] of cases) {
      const file = join(dir, 'agent.json');
      writeFileSync(file, JSON.stringify(raw));
      assert.throws(
        () => loadConfig(AgentConfigSchema, { file }),
        (e: unknown) => e instanceof FleetError && e.code === 'FLEET_CONFIG_INVALID' && re.test(e.message) && e.message.includes(file),
        `${JSON.stringify(raw)} → ${re}`,
      );
    }
  } finally {
    cleanup();
  }
});

test('supervisor: a failing step is planned again with backoff (reconcile loop)', async () => {
  const { dir, cleanup } = tempDir();
  // a log dir that cannot be created (a file is in the way) fails the start step
  const blocker = join(dir, 'logs');
  writeFileSync(blocker, '');
  const sup = new Supervisor({ log: testLogger(), backoff: fast, logDir: blocker });
  try {
    setTimeout(() => rmSync(blocker), 150);
    const steps = await sup.apply([AppSpecSchema.parse({ name: 'late', command: 'sleep', args: ['60'], stopTimeoutMs: 300 })]);
    assert.deepEqual(
      steps.map((s) => s.kind),
      ['start'],
    );
    await waitFor(() => sup.apps.get('late')?.status().state === 'running', 'running after the retry');
  } finally {
    await sup.stopAll();
    cleanup();
  }
  await sleep(10);
});
