import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, readFileSync } from 'node:fs';
import { AppSpecSchema } from '../../agent/config.ts';
import { Supervisor } from '../../agent/supervisor.ts';
import { testLogger, waitFor } from '../helpers.ts';

const fast = { initialMs: 20, factor: 1.5, maxMs: 200, resetAfterMs: 30_000 };
const alive = (pid: number) => existsSync(`/proc/${pid}`) && !/^State:\s+Z/m.test(safeRead(`/proc/${pid}/status`));
function safeRead(p: string): string {
  try {
    return readFileSync(p, 'utf8');
  } catch {
    return '';
  }
}

test('supervisor: a crashing app is restarted with backoff and marked crash-loop', async (t) => {
  const sup = new Supervisor({ log: testLogger(), backoff: fast, crashLoopRestarts: 4, crashLoopWindowMs: 10_000 });
  t.after(() => sup.stopAll()); // also when an assertion fails (a restarting app would keep the file running)
  const loops: unknown[] = [];
  sup.on('crash-loop', (e) => loops.push(e));
  await sup.apply([AppSpecSchema.parse({ name: 'crasher', command: '/bin/sh', args: ['-c', 'echo boom >&2; exit 3'] })]);
  const app = sup.apps.get('crasher')!;
  await waitFor(() => app.state === 'crash-loop', 'crash-loop state');
  assert.equal(loops.length, 1, 'one crash-loop event when entering the state');
  assert.ok(app.restarts >= 3, `restarts ${app.restarts}`);
  assert.equal(app.lastExit?.code, 3);
  assert.ok(app.lines.some((l) => l.stream === 'stderr' && l.line === 'boom'));
  await sup.stopAll();
  assert.equal(sup.apps.size, 0);
});

test("supervisor: apps inherit the agent's environment minus what FLEETLET_AGENT_ONLY_ENV names; an app's own env wins", async () => {
  const saved = { a: process.env.MALLOC_ARENA_MAX, o: process.env.FLEETLET_AGENT_ONLY_ENV, k: process.env.FLEETLET_TEST_KEPT };
  process.env.MALLOC_ARENA_MAX = '2';
  process.env.FLEETLET_AGENT_ONLY_ENV = 'MALLOC_ARENA_MAX';
  process.env.FLEETLET_TEST_KEPT = 'kept';
  const sup = new Supervisor({ log: testLogger(), backoff: fast });
  try {
    const show = 'echo "arena=${MALLOC_ARENA_MAX-unset} only=${FLEETLET_AGENT_ONLY_ENV-unset} kept=${FLEETLET_TEST_KEPT-unset}"';
    await sup.apply([
      AppSpecSchema.parse({ name: 'plain', command: '/bin/sh', args: ['-c', show], restart: 'never' }),
      AppSpecSchema.parse({ name: 'own', command: '/bin/sh', args: ['-c', show], restart: 'never', env: { MALLOC_ARENA_MAX: '8' } }),
    ]);
    const line = (n: string) => sup.apps.get(n)!.lines.find((l) => l.stream === 'stdout')?.line;
    await waitFor(() => line('plain') !== undefined && line('own') !== undefined, 'both printed');
    assert.equal(line('plain'), 'arena=unset only=unset kept=kept');
    assert.equal(line('own'), 'arena=8 only=unset kept=kept');
  } finally {
    await sup.stopAll();
    for (const [k, v] of [['MALLOC_ARENA_MAX', saved.a], ['FLEETLET_AGENT_ONLY_ENV', saved.o], ['FLEETLET_TEST_KEPT', saved.k]] as const) {
      if (v === undefined) delete process.env[k];
      else process.env[k] = v;
    }
  }
});

test('supervisor: restart policies never and on-failure', async (t) => {
  const sup = new Supervisor({ log: testLogger(), backoff: fast });
  t.after(() => sup.stopAll()); // also when an assertion fails (a restarting app would keep the file running)
  await sup.apply([
    AppSpecSchema.parse({ name: 'once', command: '/bin/sh', args: ['-c', 'exit 1'], restart: 'never' }),
    AppSpecSchema.parse({ name: 'clean', command: '/bin/sh', args: ['-c', 'exit 0'], restart: 'on-failure' }),
  ]);
  await waitFor(() => sup.apps.get('once')!.state === 'exited' && sup.apps.get('clean')!.state === 'exited', 'both exited');
  await new Promise((r) => setTimeout(r, 200));
  assert.equal(sup.apps.get('once')!.restarts, 0);
  assert.equal(sup.apps.get('clean')!.restarts, 0);
  await sup.stopAll();
});

test('supervisor: graceful stop SIGKILLs the whole process group of an app that ignores SIGTERM', async (t) => {
  const sup = new Supervisor({ log: testLogger(), backoff: fast });
  t.after(() => sup.stopAll()); // also when an assertion fails (a restarting app would keep the file running)
  // the shell ignores TERM and has a grandchild; both must be gone after stop()
  await sup.apply([AppSpecSchema.parse({ name: 'stubborn', command: '/bin/sh', args: ['-c', 'trap "" TERM; sleep 60 & echo child $!; wait'], stopTimeoutMs: 300 })]);
  const app = sup.apps.get('stubborn')!;
  const line = await waitFor(() => app.lines.find((l) => l.line.startsWith('child ')), 'grandchild pid');
  const grandchild = Number(line.line.split(' ')[1]);
  const leader = app.child!.pid!;
  assert.ok(alive(grandchild));
  const t0 = Date.now();
  await sup.stopAll();
  const took = Date.now() - t0;
  assert.ok(took >= 250, `waited for the grace period (${took} ms)`);
  await waitFor(() => !alive(leader) && !alive(grandchild), 'process group gone', 3000);
});
