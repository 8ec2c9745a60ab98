// One holder at a time of a lock file, across processes on one machine (build.mjs's dist/).
//
// The lock is a file created with O_EXCL holding its owner's pid. A lock whose owner is
// gone (a killed build) is taken over, and only under a second, short-lived guard file:
// without it, two waiters that both saw the dead owner could each remove the lock, the
// second removing the one the first had just taken, and both would hold it. Under the
// guard a waiter reads the owner again and removes the lock only if it still names the
// dead pid; pids of living processes are unique, so a lock taken meanwhile is never removed.
//
// The guard is held for a read and an unlink. A guard older than GUARD_STALE_MS is left by
// a process killed in that window and is removed. What this does not cover: two waiters
// removing a stale guard in the same instant (a kill inside that microsecond window first),
// and a waiter stopped (SIGSTOP, a frozen VM) between its read and its unlink for longer
// than GUARD_STALE_MS, whose unlink may then remove a lock taken meanwhile.
import { randomBytes } from 'node:crypto';
import { readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';

export const GUARD_STALE_MS = 30_000;

/** The pid a lock file names, 0 when absent, empty or unreadable. */
function ownerOf(path) {
  try {
    return Number(readFileSync(path, 'utf8').trim()) || 0;
  } catch {
    return 0;
  }
}

function isAlive(pid) {
  if (pid <= 0) return false;
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return err.code === 'EPERM';
  }
}

function tryCreate(path, content = String(process.pid)) {
  try {
    writeFileSync(path, content, { flag: 'wx' });
    return true;
  } catch (err) {
    if (err.code === 'EEXIST') return false;
    throw err;
  }
}

/**
 * The lock's state as a waiter sees it: `dead` when its owner is gone, or when it has stayed
 * empty for GUARD_STALE_MS (its creator was killed between creating it and writing its pid).
 */
function inspect(lock) {
  const owner = ownerOf(lock);
  if (owner > 0) return { owner, dead: !isAlive(owner) };
  try {
    return { owner: 0, dead: Date.now() - statSync(lock).mtimeMs > GUARD_STALE_MS };
  } catch {
    return { owner: 0, dead: false }; // gone: the next create will tell
  }
}

/** Removes a dead lock if it is still the one seen; false when another waiter holds the guard. */
function takeOver(lock, seen) {
  const guard = `${lock}.takeover`;
  // a token of its own: the guard is removed only while it is still this waiter's
  const token = `${process.pid}-${randomBytes(8).toString('hex')}`;
  if (!tryCreate(guard, token)) {
    try {
      if (Date.now() - statSync(guard).mtimeMs > GUARD_STALE_MS) rmSync(guard, { force: true });
    } catch {
      // gone meanwhile: its holder finished
    }
    return false;
  }
  try {
    const now = inspect(lock);
    if (now.dead && now.owner === seen) rmSync(lock, { force: true });
    return true;
  } finally {
    try {
      if (readFileSync(guard, 'utf8') === token) rmSync(guard, { force: true });
    } catch {
      // removed as stale meanwhile (this waiter was stopped for GUARD_STALE_MS)
    }
  }
}

/**
 * Waits until this process holds `lock`, released when the process exits normally (or by
 * process.exit); one killed by a signal leaves it behind, and the next waiter takes it over
 * (its owner is gone). Throws after `timeoutMs`, naming the holder.
 */
export async function acquireLock(lock, { timeoutMs = 10 * 60_000, pollMs = 250 } = {}) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (tryCreate(lock)) {
      process.on('exit', () => {
        if (ownerOf(lock) === process.pid) rmSync(lock, { force: true });
      });
      return;
    }
    const { owner, dead } = inspect(lock);
    if (dead && takeOver(lock, owner)) continue;
    if (Date.now() > deadline) throw new Error(`another process (pid ${owner || 'unknown'}) holds ${lock}`);
    await new Promise((r) => setTimeout(r, pollMs));
  }
}
