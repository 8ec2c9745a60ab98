#!/usr/bin/env node
// Idle cost of the agent from the single executable: RSS and CPU after a settle time,
// with N supervised sample apps and metrics at 1 Hz, connected to a local hub.
// Usage: node scripts/bench/agent-idle.mjs [--apps 1] [--seconds 60] [--bin dist/fleetlet]
// Writes results (with machine details) to scripts/bench/results/agent-idle-<date>.json.
import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync, mkdirSync } from 'node:fs';
import { cpus, totalmem, tmpdir, release } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';

const { values } = parseArgs({ options: { apps: { type: 'string', default: '1' }, seconds: { type: 'string', default: '60' }, bin: { type: 'string', default: 'dist/fleetlet' } } });
const bin = join(process.cwd(), values.bin);
const apps = Number(values.apps);
const seconds = Number(values.seconds);
const dir = mkdtempSync(join(tmpdir(), 'fleetlet-bench-'));
const clk = 100; // USER_HZ on Linux
const procStat = (pid) => {
  const f = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1].split(' ');
  return (Number(f[11]) + Number(f[12])) / clk; // utime + stime, s
};
const rssKb = (pid) => Number(/VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))[1]);
const waitFile = async (f) => { for (let i = 0; i < 400; i++) { try { return JSON.parse(readFileSync(f, 'utf8')); } catch { await new Promise((r) => setTimeout(r, 50)); } } throw new Error(`no ${f}`); };

const children = [];
const start = (args) => { const c = spawn(bin, [...args, '--die-with-parent'], { stdio: ['pipe', 'ignore', 'ignore'], env: { PATH: '/usr/bin:/bin', FLEETLET_LOG_LEVEL: 'warn' } }); children.push(c); return c; };
try {
  start(['hub', '--mqtt-port', '0', '--http-port', '0', '--state-dir', join(dir, 'hub'), '--ready-file', join(dir, 'hub.json')]);
  const hub = await waitFile(join(dir, 'hub.json'));
  const tokenFile = join(dir, 'agent.token');
  const tok = spawn(bin, ['hub', 'device-token', 'bench-agent', '--state-dir', join(dir, 'hub')], { env: { PATH: '/usr/bin:/bin' } });
  let token = '';
  tok.stdout.on('data', (d) => (token += d));
  await new Promise((r) => tok.on('exit', r));
  writeFileSync(tokenFile, token.trim() + '\n', { mode: 0o600 });
  writeFileSync(join(dir, 'agent.json'), JSON.stringify({ metrics: { sampleMs: 1000, publishMs: 10000 }, apps: Array.from({ length: apps }, (_, i) => ({ name: `app-${i}`, command: bin, args: ['sample-app', '--port', '0'] })) }));
  const agent = start(['agent', '--config', join(dir, 'agent.json'), '--device-id', 'bench-agent', '--hub', `mqtt://127.0.0.1:${hub.mqttPort}`, '--token-file', tokenFile, '--state-dir', join(dir, 'agent'), '--api-port', '0', '--ready-file', join(dir, 'agent.json.ready')]);
  await waitFile(join(dir, 'agent.json.ready'));
  const settle = 10;
  await new Promise((r) => setTimeout(r, settle * 1000));
  const cpu0 = procStat(agent.pid);
  await new Promise((r) => setTimeout(r, (seconds - settle) * 1000));
  const cpu1 = procStat(agent.pid);
  const result = {
    date: new Date().toISOString(),
    machine: { cpus: cpus().length, model: cpus()[0]?.model, memGiB: Math.round(totalmem() / 2 ** 30), kernel: release(), node: process.version },
    apps,
    seconds,
    agentRssMiB: Math.round(rssKb(agent.pid) / 102.4) / 10,
    agentCpuPercentOfOneCore: Math.round(((cpu1 - cpu0) / (seconds - settle)) * 1000) / 10,
  };
  console.log(JSON.stringify(result, null, 2));
  mkdirSync(join(process.cwd(), 'scripts/bench/results'), { recursive: true });
  writeFileSync(join(process.cwd(), `scripts/bench/results/agent-idle-${result.date.slice(0, 10)}.json`), JSON.stringify(result, null, 2) + '\n');
} finally {
  for (const c of children.reverse()) c.kill('SIGTERM');
  await new Promise((r) => setTimeout(r, 1500));
  rmSync(dir, { recursive: true, force: true });
}
