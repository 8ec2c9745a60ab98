#!/usr/bin/env node
// Runs scripts/bench/gateway-scale.mjs N times in a row and prints each figure's median and
// range over the runs, both phases. On a shared machine one run's p99 can be 2-4x another's
// with the same code (scripts/bench/README.md); a change is shown by a shift of the median over
// several runs, not by one run.
//
// Usage: node scripts/bench/gateway-scale-repeat.mjs --repeat 3 --tag name [any gateway-scale option]
// Each run writes its own results file (tag name-r1 … name-rN); this prints the summary and
// writes it to scripts/bench/results/gateway-scale-<date>-<name>-summary.json.
import { spawnSync } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';

const here = new URL('.', import.meta.url).pathname;
const args = process.argv.slice(2);
const take = (name, dflt) => {
  const i = args.indexOf(`--${name}`);
  if (i < 0) return dflt;
  const v = args[i + 1];
  args.splice(i, 2);
  return v;
};
const repeat = Number(take('repeat', '3'));
const tag = take('tag', 'repeat');
if (!Number.isInteger(repeat) || repeat < 1) throw new Error(`--repeat must be a positive integer, not ${repeat}`);
if (!/^[A-Za-z0-9._-]+$/.test(tag)) throw new Error(`--tag must be letters, digits, . _ - only, not ${tag}`);

const files = [];
for (let r = 1; r <= repeat; r++) {
  process.stderr.write(`[repeat] run ${r} of ${repeat}\n`);
  const res = spawnSync(process.execPath, [join(here, 'gateway-scale.mjs'), ...args, '--tag', `${tag}-r${r}`], { stdio: ['ignore', 'pipe', 'inherit'], encoding: 'utf8' });
  process.stdout.write(res.stdout);
  const m = /^results: (.+)$/m.exec(res.stdout);
  if (res.status !== 0 || !m) throw new Error(`run ${r} failed (exit ${res.status})`);
  files.push(m[1].trim());
}

const runs = files.map((f) => JSON.parse(readFileSync(f, 'utf8')));
const FIGURES = [
  ['p50Ms', 'p50, ms'],
  ['p99Ms', 'p99, ms'],
  ['p999Ms', 'p99.9, ms'],
  ['deliveredPerS', 'delivered readings/s'],
  ['lost', 'lost'],
  ['gaps', 'gaps'],
  ['kbPerDevice', 'server memory per device, KB'],
  ['serverCpuPct', 'server CPU, % of one core'],
  ['hubCpuPct', 'hub CPU, % of one core'],
  ['stealPct', 'steal, % of one core'],
];
const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
};
const summary = { bench: 'gateway-scale-repeat', repeat, files, phases: {} };
const lines = [`| figure | gateway → hub: median (min–max) over ${repeat} | Mosquitto: median (min–max) |`, '|---|---:|---:|'];
const cell = (phase, key) => {
  const xs = runs.map((r) => r[phase]?.[key]).filter((x) => typeof x === 'number' && Number.isFinite(x));
  if (xs.length === 0) return { text: '—', value: null };
  const v = { median: median(xs), min: Math.min(...xs), max: Math.max(...xs), runs: xs };
  (summary.phases[phase] ??= {})[key] = v;
  return { text: `${Math.round(v.median * 10) / 10} (${v.min}–${v.max})`, value: v };
};
for (const [key, label] of FIGURES) lines.push(`| ${label} | ${cell('gateway', key).text} | ${cell('mosquitto', key).text} |`);
console.log(lines.join('\n'));
const out = join(here, 'results', `gateway-scale-${new Date().toISOString().slice(0, 10)}-${tag}-summary.json`);
writeFileSync(out, JSON.stringify(summary, null, 2) + '\n');
console.log(`summary: ${out}`);
