#!/usr/bin/env node
// Runs every test file under test/ with node's test runner via tsx. Node 20's --test
// does not expand globs or find .ts files itself (FACTS.md), so we pass the files.
// Usage: node scripts/run-tests.mjs [path-filter ...]
//
// Each file runs in a node --test process of its own, two at a time (FLEETLET_TEST_CONCURRENCY),
// its output printed as a whole when it ends, so that:
//  - a file whose process does not end (a leaked socket, timer or client keeps Node 20's
//    runner waiting for ever) is killed after FLEETLET_TEST_FILE_TIMEOUT_MIN minutes (default
//    15) and named, instead of holding the whole run until CI gives up;
//  - a skipped or todo test fails the run: nothing here may be skipped silently;
//  - the summary names the files that failed.
import { readdirSync, statSync } from 'node:fs';
import { join, relative } from 'node:path';
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';

const root = new URL('..', import.meta.url).pathname;
const GUARD = fileURLToPath(new URL('./test-orphan-guard.cjs', import.meta.url));
const filters = process.argv.slice(2);
/** a positive number from the environment, or `dflt`; anything else stops the run (a typo must not run nothing and pass) */
function envNumber(name, dflt) {
  const raw = process.env[name];
  if (raw === undefined || raw === '') return dflt;
  const v = Number(raw);
  if (!Number.isFinite(v) || v <= 0) {
    console.error(`${name}=${JSON.stringify(raw)}: expected a positive number`);
    process.exit(2);
  }
  return v;
}
const concurrency = Math.max(1, Math.floor(envNumber('FLEETLET_TEST_CONCURRENCY', 2)));
const fileTimeoutMs = Math.max(1, envNumber('FLEETLET_TEST_FILE_TIMEOUT_MIN', 15)) * 60_000;

function walk(dir) {
  const out = [];
  for (const name of readdirSync(dir)) {
    const p = join(dir, name);
    if (name === 'fixtures' || name === 'node_modules') continue;
    if (statSync(p).isDirectory()) out.push(...walk(p));
    else if (name.endsWith('.test.ts')) out.push(relative(root, p));
  }
  return out;
}

const files = walk(join(root, 'test'))
  .filter((f) => filters.length === 0 || filters.some((x) => f.includes(x)))
  .sort();
if (files.length === 0) {
  console.error('no test files matched');
  process.exit(1);
}

const KEYS = ['tests', 'pass', 'fail', 'cancelled', 'skipped', 'todo'];
const total = Object.fromEntries(KEYS.map((k) => [k, 0]));
/** files that failed, with why */
const bad = [];
const started = Date.now();

/** process groups of the runners under way: node --test runs the file in a process of its own, which a kill of the runner alone leaves behind */
const running = new Set();
const killGroup = (pid) => {
  try {
    process.kill(-pid, 'SIGKILL');
  } catch {
    // gone already
  }
};
for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP']) {
  process.on(sig, () => {
    for (const pid of running) killGroup(pid);
    process.exit(128 + { SIGHUP: 1, SIGINT: 2, SIGTERM: 15 }[sig]);
  });
}

/** One file in its own runner; resolves once it ended (or was killed) and its output was printed. */
function runFile(file) {
  return new Promise((resolve) => {
    const t0 = Date.now();
    // a process group of its own (detached), so that a kill reaches the file's process too
    // (test-orphan-guard.cjs: the group dies with this runner too, even by SIGKILL)
    const child = spawn(process.execPath, ['--require', GUARD, '--import', 'tsx', '--test', '--test-reporter=tap', '--test-timeout=600000', file], { cwd: root, stdio: ['ignore', 'pipe', 'pipe'], detached: true, env: { ...process.env, FLEETLET_TEST_RUNNER_PID: String(process.pid) } });
    running.add(child.pid);
    const out = [];
    child.stdout.on('data', (d) => out.push(d));
    child.stderr.on('data', (d) => out.push(d));
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      killGroup(child.pid);
    }, fileTimeoutMs);
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      running.delete(child.pid);
      // whatever the file left running (a server it started, a leaked child) goes with it
      killGroup(child.pid);
      const text = Buffer.concat(out).toString('utf8');
      // the runner's summary is the last of its lines (a test's own output may print such lines too)
      const last = (k) => [...text.matchAll(new RegExp(`^# ${k} (\\d+)$`, 'gm'))].at(-1)?.[1];
      const counts = Object.fromEntries(KEYS.map((k) => [k, Number(last(k) ?? 0)]));
      for (const k of KEYS) total[k] += counts[k];
      const secs = ((Date.now() - t0) / 1000).toFixed(1);
      process.stdout.write(`\n# ==== ${file} (${secs} s) ====\n${text}`);
      const why = timedOut
        ? `still running after ${fileTimeoutMs / 60_000} min: killed (a test hangs, or a leaked handle keeps the process alive)`
        : counts.fail > 0 || counts.cancelled > 0
          ? `${counts.fail} failed, ${counts.cancelled} cancelled`
          : counts.skipped > 0 || counts.todo > 0
            ? `${counts.skipped} skipped, ${counts.todo} todo: nothing may be skipped`
            : code !== 0
              ? `its runner exited with ${signal ?? `code ${code}`}`
              : counts.tests === 0
                ? 'no tests ran'
                : null;
      if (why) bad.push(`${file}: ${why}`);
      finished++;
      resolve();
    });
  });
}

let finished = 0;
const queue = [...files];
await Promise.all(
  Array.from({ length: Math.min(concurrency, files.length) }, async () => {
    while (queue.length > 0) await runFile(queue.shift());
  }),
);

console.log(`\n# ==== all ${files.length} files (${((Date.now() - started) / 1000).toFixed(0)} s) ====`);
for (const k of KEYS) console.log(`# ${k} ${total[k]}`);
console.log(`${total.pass} passed, ${total.fail + total.cancelled} failed, ${total.skipped + total.todo} skipped`);
if (finished !== files.length) bad.push(`only ${finished} of ${files.length} files ran`);
if (total.tests === 0) bad.push('no test ran');
if (bad.length > 0) {
  console.log(`# ${bad.length} file(s) not clean:`);
  for (const b of bad) console.log(`#   ${b}`);
  process.exit(1);
}
