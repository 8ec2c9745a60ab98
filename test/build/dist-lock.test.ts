import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, readFileSync, utimesSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { acquireLock, GUARD_STALE_MS } from '../../scripts/dist-lock.mjs';
import { tempDir } from '../helpers.ts';

// The build lock (scripts/dist-lock.mjs) with real processes on a real file: the holders
// of one lock never overlap, also when they all start at once on a lock left by a killed
// build (the takeover race two waiters that both see the dead owner would otherwise run).

const LOCK_MODULE = fileURLToPath(new URL('../../scripts/dist-lock.mjs', import.meta.url));

/** A pid that belonged to a process which has exited. */
function deadPid(): number {
  const r = spawnSync(process.execPath, ['-e', 'process.stdout.write(String(process.pid))'], { encoding: 'utf8', timeout: 30_000 });
  const pid = Number(r.stdout);
  assert.ok(pid > 0, `child printed its pid: ${JSON.stringify(r.stdout)}`);
  return pid;
}

/**
 * `n` processes that each wait for the wall-clock instant `goAt`, take the lock (polling
 * every 5 ms), write `+pid` and, 60 ms later, `-pid` into `log`, and exit.
 */
function holders(n: number, lock: string, log: string, goAt: number): Promise<number[]> {
  const script = `
    import { appendFileSync } from 'node:fs';
    import { acquireLock } from ${JSON.stringify(LOCK_MODULE)};
    while (Date.now() < ${goAt});
    await acquireLock(${JSON.stringify(lock)}, { timeoutMs: 60000, pollMs: 5 });
    appendFileSync(${JSON.stringify(log)}, '+' + process.pid + '\\n');
    await new Promise((r) => setTimeout(r, 60));
    appendFileSync(${JSON.stringify(log)}, '-' + process.pid + '\\n');
  `;
  return Promise.all(
    Array.from({ length: n }, () => new Promise<number>((resolve, reject) => {
      const child = spawn(process.execPath, ['--input-type=module', '-e', script], { stdio: ['ignore', 'ignore', 'inherit'] });
      const kill = setTimeout(() => child.kill('SIGKILL'), 120_000);
      child.on('error', reject);
      child.on('exit', (code) => { clearTimeout(kill); resolve(code ?? -1); });
    })),
  );
}

/** Asserts the log is n enter/leave pairs of one process each, none inside another. */
function assertOneAtATime(log: string, n: number): void {
  const lines = readFileSync(log, 'utf8').trim().split('\n');
  assert.equal(lines.length, 2 * n, `every holder entered and left once:\n${lines.join('\n')}`);
  for (let i = 0; i < lines.length; i += 2) {
    assert.ok(lines[i].startsWith('+') && lines[i + 1] === `-${lines[i].slice(1)}`, `holders overlapped at line ${i + 1}:\n${lines.join('\n')}`);
  }
}

test('dist lock: 8 processes starting at once on a lock left by a killed build hold it one at a time, and the last leaves no lock behind', async (t) => {
  const { dir, cleanup } = tempDir('fleetlet-lock-');
  t.after(cleanup);
  const lock = join(dir, '.build.lock');
  const log = join(dir, 'log');
  // three rounds: each is one chance for the takeover race, which needs two waiters to read
  // the dead owner before either removes it
  for (let round = 0; round < 3; round++) {
    writeFileSync(lock, String(deadPid()));
    writeFileSync(log, '');
    const codes = await holders(8, lock, log, Date.now() + 1500);
    assert.deepEqual(codes, Array(8).fill(0), 'every holder exited 0');
    assertOneAtATime(log, 8);
    assert.equal(existsSync(lock), false, 'the last holder removed the lock at exit');
    assert.equal(existsSync(`${lock}.takeover`), false, 'no takeover guard left behind');
  }
});

test('dist lock: a live holder is waited for and never taken over; the waiter times out naming it', async (t) => {
  const { dir, cleanup } = tempDir('fleetlet-lock-');
  t.after(cleanup);
  const lock = join(dir, '.build.lock');
  writeFileSync(lock, String(process.pid)); // this test process: alive
  await assert.rejects(acquireLock(lock, { timeoutMs: 300, pollMs: 20 }), new RegExp(`pid ${process.pid}\\) holds`));
  assert.equal(readFileSync(lock, 'utf8'), String(process.pid), 'the live holder\'s lock is untouched');
});

test('dist lock: an empty lock (creator killed before writing its pid) is taken over only once it is older than the stale limit', async (t) => {
  const { dir, cleanup } = tempDir('fleetlet-lock-');
  t.after(cleanup);
  const lock = join(dir, '.build.lock');
  writeFileSync(lock, '');
  await assert.rejects(acquireLock(lock, { timeoutMs: 300, pollMs: 20 }), /pid unknown\) holds/, 'a fresh empty lock is a creator still writing');
  const old = (Date.now() - GUARD_STALE_MS - 5_000) / 1000;
  utimesSync(lock, old, old);
  // a guard left by a waiter killed during a takeover, as old: removed, then the takeover runs
  writeFileSync(`${lock}.takeover`, '');
  utimesSync(`${lock}.takeover`, old, old);
  await acquireLock(lock, { timeoutMs: 5_000, pollMs: 20 });
  assert.equal(readFileSync(lock, 'utf8'), String(process.pid), 'this process holds the lock');
  assert.equal(existsSync(`${lock}.takeover`), false, 'the stale guard was removed');
});
