import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { waitFor } from '../helpers.ts';

// scripts/test-orphan-guard.cjs, as scripts/run-tests.mjs uses it: a test file's runner
// leads a process group of its own, and must not outlive the run that started it, even when
// that run is SIGKILLed (a CI job's timeout) and can pass nothing on. Real processes.

const GUARD = fileURLToPath(new URL('../../scripts/test-orphan-guard.cjs', import.meta.url));

/** running: neither gone nor a zombie left for its parent to reap */
function running(pid: number): boolean {
  try {
    return !/^\d+ \(.*\) Z/.test(readFileSync(`/proc/${pid}/stat`, 'utf8'));
  } catch {
    return false;
  }
}

/** every runner and group leader the rigs started, killed when the test ends however it ends */
const spawned: Array<{ pid: number; group: boolean }> = [];

async function rig(guarded: boolean, noisy = false): Promise<{ runner: number; group: number[] }> {
  // the "runner": starts a detached group leader (with the guard, as run-tests.mjs does)
  // that starts a child of its own, prints both pids, and waits
  const leader = `
    const { spawn } = require('node:child_process');
    const c = spawn(process.execPath, ['-e', 'setInterval(() => {}, 1000)'], { stdio: 'ignore' });
    process.stdout.write(process.pid + ' ' + c.pid + '\\n');
    setInterval(() => { ${noisy ? "process.stdout.write('x'.repeat(1000) + '\\n');" : ''} }, 20);
  `;
  const runnerSrc = `
    const { spawn } = require('node:child_process');
    const args = ${JSON.stringify(guarded ? ['--require', GUARD] : [])}.concat(['-e', ${JSON.stringify(leader)}]);
    const l = spawn(process.execPath, args, { detached: true, stdio: ['ignore', 'pipe', 'inherit'], env: { ...process.env, FLEETLET_TEST_RUNNER_PID: String(process.pid) } });
    l.stdout.once('data', (d) => process.stdout.write(d));
    setInterval(() => {}, 1000);
  `;
  const runner = spawn(process.execPath, ['-e', runnerSrc], { stdio: ['ignore', 'pipe', 'inherit'] });
  spawned.push({ pid: runner.pid!, group: false });
  const line = await new Promise<string>((resolve, reject) => {
    runner.stdout.once('data', (d: Buffer) => resolve(d.toString()));
    runner.once('exit', () => reject(new Error('the runner exited first')));
  });
  const group = line.split('\n')[0]!.trim().split(' ').map(Number);
  spawned.push({ pid: group[0]!, group: true });
  assert.equal(group.length, 2);
  return { runner: runner.pid!, group };
}

test('test runner orphan guard: a file\'s process group dies within seconds of its runner being SIGKILLed; without the guard it stays (the control)', async (t) => {
  t.after(() => {
    for (const p of spawned) {
      try {
        process.kill(p.group ? -p.pid : p.pid, 'SIGKILL');
      } catch {
        // gone
      }
    }
  });
  const guarded = await rig(true);
  // one that prints without pause: the runner's death breaks its stdout pipe, and the EPIPE
  // ends the process before the guard's next check (its child is quiet and would stay). Here
  // the guard's exit check covers it; the node --test runner ends with no 'exit' event
  // (checked by hand with a noisy test file), which the stdout/stderr error check covers
  // (it fails without both)
  const noisy = await rig(true, true);
  const control = await rig(false);
  for (const pid of [...guarded.group, ...noisy.group, ...control.group]) assert.ok(running(pid), `${pid} runs before the kill`);
  process.kill(guarded.runner, 'SIGKILL');
  process.kill(noisy.runner, 'SIGKILL');
  process.kill(control.runner, 'SIGKILL');
  await waitFor(() => guarded.group.every((pid) => !running(pid)), 'the guarded group gone', 10_000);
  await waitFor(() => noisy.group.every((pid) => !running(pid)), 'the noisy guarded group gone', 10_000);
  // the control had as long, and more: both its processes still run
  for (const pid of control.group) assert.ok(running(pid), `unguarded ${pid} outlived its runner`);
});
