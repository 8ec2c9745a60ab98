#!/usr/bin/env node
// Rollback time (issue 5): from the moment the updater decides that probation failed to the
// old version running again — spawned, and healthy, since the test app has a health check.
//
// Each run installs v1 (good, exec health check every 200 ms) and then v2, which crashes at
// start, through the real updater and the real supervisor in a child process (the OTA test
// runner, bundled with esbuild), with signed bundles and real app processes. Two figures
// per run, both from the persisted update record and the app itself:
//   spawned: rollbackDecidedAt → the start time v1's app script writes when it runs again
//   healthy: rollbackDecidedAt → rollbackDoneAt (the updater marks the rollback done once
//            the supervisor reports v1 running and its health check passing)
// Target: at most 5 s. There is no external reference peer for this figure (no other
// updater runs here to compare against); the output says so.
//
// Usage: node scripts/bench/rollback.mjs [--runs 20] [--probation-ms 1000] [--label NAME]
// Writes scripts/bench/results/rollback-<date>[-label].json.
import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { cpus, loadavg, release, tmpdir, totalmem } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { register } from 'tsx/esm/api';

register();
const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');
const { values } = parseArgs({ options: { runs: { type: 'string', default: '20' }, 'probation-ms': { type: 'string', default: '1000' }, label: { type: 'string' } } });
const runs = Number(values.runs);
const probationMs = Number(values['probation-ms']);
const TARGET_MS = 5000;
const { buildRunner } = await import(join(ROOT, 'test/fixtures/ota/build-runner.ts'));
const { buildAppBundle, installTrustRoot, makeKeys } = await import(join(ROOT, 'test/fixtures/ota/kit.ts'));
const { RunnerProc } = await import(join(ROOT, 'test/fixtures/ota/proc.ts'));

const dir = mkdtempSync(join(tmpdir(), 'fleetlet-bench-rollback-'));
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const pct = (xs, p) => {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.max(0, Math.ceil((p / 100) * s.length) - 1))];
};

const spawned = [];
const healthy = [];
const reasons = new Set();
try {
  const runner = await buildRunner(dir);
  const keys = makeKeys();
  const v1 = await buildAppBundle({ dir, keys, name: 'web', version: '1.0.0', sequence: 1, withHealth: true });
  const v2 = await buildAppBundle({ dir, keys, name: 'web', version: '2.0.0', sequence: 2, withHealth: true, behaviour: 'crash' });
  for (let i = 0; i < runs; i++) {
    const state = join(dir, `run-${i}`);
    const trust = installTrustRoot(state, keys);
    const r = new RunnerProc(runner, state, trust, { probationMs, lockPollMs: 50 });
    try {
      await r.start({ queue: [v1.file, v2.file] });
      const deadline = Date.now() + 60_000;
      let rec = null;
      while (Date.now() < deadline) {
        const s = r.state();
        if (r.history().length >= 2 && s?.state === 'rolled-back' && s.reported) {
          rec = s;
          break;
        }
        await sleep(20);
      }
      if (!rec) throw new Error(`run ${i}: no rollback within 60 s\n${r.log()}`);
      const back = r.runs().find((x) => x.version === '1.0.0' && x.t >= rec.rollbackDecidedAt);
      if (!back) throw new Error(`run ${i}: v1 did not start again after the decision`);
      spawned.push(back.t - rec.rollbackDecidedAt);
      healthy.push(rec.rollbackDoneAt - rec.rollbackDecidedAt);
      reasons.add(rec.reason);
      process.stdout.write(`run ${String(i + 1).padStart(2)}: spawned ${String(back.t - rec.rollbackDecidedAt).padStart(5)} ms, healthy ${String(rec.rollbackDoneAt - rec.rollbackDecidedAt).padStart(5)} ms  (${rec.reason})\n`);
    } finally {
      await r.stop();
      rm(state);
    }
  }
} finally {
  rm(dir);
}

function rm(p) {
  if (existsSync(p)) rmSync(p, { recursive: true, force: true });
}

const summary = (xs) => ({ n: xs.length, medianMs: pct(xs, 50), p95Ms: pct(xs, 95), maxMs: Math.max(...xs), minMs: Math.min(...xs) });
const result = {
  bench: 'rollback',
  date: new Date().toISOString(),
  target: { maxMs: TARGET_MS, figure: 'decision that probation failed → old version running again (spawned, and healthy)' },
  reference: 'none: there is no external reference peer for this figure',
  method: `v1 (exec health check every 200 ms) then v2 crashing at start, probationMs ${probationMs}; the real updater and supervisor in a child process; ${runs} runs`,
  spawned: summary(spawned),
  healthy: summary(healthy),
  pass: pct(healthy, 95) <= TARGET_MS,
  reasons: [...reasons],
  machine: { cpus: cpus().length, cpuModel: cpus()[0]?.model, memBytes: totalmem(), kernel: release(), node: process.version, loadavg: loadavg() },
};
const date = result.date.slice(0, 10);
const out = join(ROOT, 'scripts/bench/results', `rollback-${date}${values.label ? `-${values.label}` : ''}.json`);
mkdirSync(dirname(out), { recursive: true });
writeFileSync(out, JSON.stringify(result, null, 2) + '\n');
const row = (name, s) => `${name.padEnd(30)} ${String(s.medianMs).padStart(7)} ${String(s.p95Ms).padStart(7)} ${String(s.maxMs).padStart(7)}   ≤ ${TARGET_MS}   ${s.p95Ms <= TARGET_MS ? 'pass' : 'FAIL'}`;
process.stdout.write(
  [
    '',
    `rollback time over ${runs} runs (ms)     median     p95     max   target  result`,
    row('decision → v1 spawned', result.spawned),
    row('decision → v1 running + healthy', result.healthy),
    'reference: none (no external reference peer for this figure)',
    `machine: ${result.machine.cpus} x ${result.machine.cpuModel}, load ${loadavg().map((x) => x.toFixed(2)).join(' ')}, node ${process.version}`,
    `written: ${out}`,
    '',
  ].join('\n'),
);
