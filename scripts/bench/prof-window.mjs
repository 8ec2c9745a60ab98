#!/usr/bin/env node
// Reads a V8 CPU profile written by `gateway-scale.mjs --cpu-prof` and places it in that run's
// 30 s window (the results' windowStartMs and monoOffsetMs: profiles time their samples on the
// monotonic clock). Per window second it prints the run's p99 and the gateway's / hub's event-loop
// p99 beside what the profiled process did: busy ms (samples not idle), GC ms, the longest
// stretch without an idle sample (the loop never waited for I/O), and the longest gap between
// samples (the process did not run: descheduled). Then the functions that ran in stretches of
// at least --stretch-ms.
//
//   node scripts/bench/prof-window.mjs <profile.cpuprofile> <results.json> [--stretch-ms 25]
import { readFileSync } from 'node:fs';
import { parseArgs } from 'node:util';

const { values, positionals } = parseArgs({ allowPositionals: true, options: { 'stretch-ms': { type: 'string', default: '25' } } });
const [profFile, resFile] = positionals;
if (!profFile || !resFile) {
  console.error('usage: prof-window.mjs <profile.cpuprofile> <results.json> [--stretch-ms 25]');
  process.exit(2);
}
const prof = JSON.parse(readFileSync(profFile, 'utf8'));
const res = JSON.parse(readFileSync(resFile, 'utf8'));
const phase = res.gateway;
if (phase?.windowStartMs === undefined || phase.monoOffsetMs === undefined) {
  console.error('these results have no windowStartMs/monoOffsetMs (written by gateway-scale.mjs since session 11)');
  process.exit(2);
}
const minStretch = Number(values['stretch-ms']);
const byId = new Map(prof.nodes.map((n) => [n.id, n]));
const parent = new Map();
for (const n of prof.nodes) for (const c of n.children ?? []) parent.set(c, n.id);
const name = (id) => {
  const c = byId.get(id).callFrame;
  return `${c.functionName || '(anonymous)'} ${c.url.split('/').pop()}:${c.lineNumber + 1}`;
};
/** window second of a sample time (µs, monotonic); NaN outside the window */
const second = (us) => {
  const s = Math.floor((us / 1000 + phase.monoOffsetMs - phase.windowStartMs) / 1000);
  return s >= 0 && s < res.windowS ? s : NaN;
};

const secs = Array.from({ length: res.windowS }, () => ({ busy: 0, gc: 0, stretch: 0, gap: 0 }));
const selfInStretches = new Map();
let stretchMs = 0;
let run = [];
let t = prof.startTime;
for (let i = 0; i < prof.samples.length; i++) {
  const dt = prof.timeDeltas[i];
  t += dt;
  const s = second(t);
  if (Number.isNaN(s)) continue;
  const e = secs[s];
  const fn = byId.get(prof.samples[i]).callFrame.functionName;
  e.gap = Math.max(e.gap, dt / 1000);
  if (fn === '(idle)') {
    if (stretchMs >= minStretch) for (const id of run) selfInStretches.set(name(id), (selfInStretches.get(name(id)) ?? 0) + 1);
    stretchMs = 0;
    run = [];
    continue;
  }
  e.busy += dt / 1000;
  if (fn === '(garbage collector)') e.gc += dt / 1000;
  stretchMs += dt / 1000;
  run.push(prof.samples[i]);
  e.stretch = Math.max(e.stretch, stretchMs);
}

const bySecond = new Map(phase.latencyBySecond.map((x) => [x.s, x]));
console.log('second | p99 ms | loop p99 gateway/hub ms | busy ms | GC ms | longest stretch ms | longest gap ms');
secs.forEach((e, s) => {
  const l = bySecond.get(s) ?? {};
  const tr = phase.outboxTrace?.[s] ?? {};
  console.log(`${String(s).padStart(6)} | ${String(l.p99 ?? '—').padStart(6)} | ${`${tr.loopP99Ms ?? '—'}/${tr.hubLoopP99Ms ?? '—'}`.padStart(23)} | ${e.busy.toFixed(0).padStart(7)} | ${e.gc.toFixed(0).padStart(5)} | ${e.stretch.toFixed(0).padStart(18)} | ${e.gap.toFixed(1).padStart(14)}`);
});
const total = [...selfInStretches.values()].reduce((a, b) => a + b, 0);
console.log(`\nself time in stretches of ${minStretch} ms or more (${total} samples):`);
for (const [k, v] of [...selfInStretches].sort((a, b) => b[1] - a[1]).slice(0, 20)) console.log(`${((100 * v) / total).toFixed(1).padStart(5)}%  ${k}`);
