#!/usr/bin/env node
// Gateway at scale (issue 6): N simulated ESP32s over MQTT at R msg/s each, through
// `fleetlet gateway` to `fleetlet hub`, measured at an operator subscriber on the hub;
// then, in the same run, the same simulated devices publishing one message per reading
// to a Mosquitto broker, measured at a subscriber on Mosquitto. Figures side by side,
// with the ratio and the targets (no loss; p99 <= 50 ms at 10,000 msg/s; <= 25 KB of
// gateway memory per connected MCU).
//
// Usage: node scripts/bench/gateway-scale.mjs [--devices 10000] [--sims 2] [--interval-ms 1000]
//          [--window-s 30] [--ramp-s 20] [--only gateway|mosquitto] [--uplink-rate 0] [--uplink-window N] [--uplink-batch-delay-ms N] [--uplink-batch-bytes N] [--outbox-sync-interval-ms N] [--tag name]
// Writes scripts/bench/results/gateway-scale-<date>[-<tag>].json with the machine's details.
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { cpus, loadavg, release, setPriority, tmpdir, totalmem } from 'node:os';
import { join } from 'node:path';
import { monitorEventLoopDelay } from 'node:perf_hooks';
import { parseArgs } from 'node:util';
import mqtt from 'mqtt';

const ROOT = new URL('../../', import.meta.url).pathname;
const { values } = parseArgs({
  options: {
    devices: { type: 'string', default: '10000' },
    sims: { type: 'string' },
    'interval-ms': { type: 'string', default: '1000' },
    'window-s': { type: 'string', default: '30' },
    'ramp-s': { type: 'string', default: '20' },
    'settle-s': { type: 'string', default: '10' },
    'drain-s': { type: 'string', default: '180' },
    only: { type: 'string' },
    'uplink-rate': { type: 'string', default: '0' },
    'uplink-window': { type: 'string' },
    'uplink-batch-delay-ms': { type: 'string' },
    'uplink-batch-bytes': { type: 'string' },
    'outbox-sync-interval-ms': { type: 'string' },
    'mcu-msg-rate': { type: 'string' },
    tag: { type: 'string' },
    keep: { type: 'boolean' },
    'cpu-prof': { type: 'boolean' },
    // how the simulated MCUs reach the gateway; the Mosquitto reference is always MQTT
    protocol: { type: 'string', default: 'mqtt' },
    // V8 flags for the gateway and hub processes, e.g. "--max-semi-space-size=16"
    'node-flags': { type: 'string', default: '' },
    'hub-node-flags': { type: 'string', default: '' },
    // nice value of the sim processes (the load generator), both phases; 0 = same priority as the servers
    'sim-nice': { type: 'string', default: '0' },
  },
});
const N = Number(values.devices);
const SIMS = Number(values.sims ?? (N > 3000 ? 2 : 1));
const INTERVAL = Number(values['interval-ms']);
const PROTOCOL = values.protocol;
if (PROTOCOL !== 'mqtt' && PROTOCOL !== 'coap') throw new Error(`--protocol must be mqtt or coap, not ${PROTOCOL}`);
const WINDOW_S = Number(values['window-s']);
const RAMP_S = Number(values['ramp-s']);
const SETTLE_S = Number(values['settle-s']);
const DRAIN_S = Number(values['drain-s']);
const TARGET_RATE = (N * 1000) / INTERVAL;
const SIM_NICE = Number(values['sim-nice']);
const MOSQUITTO = ['/usr/sbin/mosquitto', '/usr/bin/mosquitto'].find((p) => existsSync(p));

// ---- process helpers ------------------------------------------------------------------
const clk = 100; // USER_HZ on Linux
const cpuS = (pid) => {
  try {
    const f = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1].split(' ');
    return (Number(f[11]) + Number(f[12])) / clk;
  } catch {
    return NaN;
  }
};
/** the machine's steal time so far, s (all CPUs; /proc/stat, USER_HZ) */
const machineSteal = () => {
  try {
    return Number(readFileSync('/proc/stat', 'utf8').split('\n')[0].trim().split(/\s+/)[8]) / clk;
  } catch {
    return null;
  }
};
const rssKb = (pid) => {
  try {
    return Number(/VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))[1]);
  } catch {
    return NaN;
  }
};
const gauge = (text, name) => {
  const m = new RegExp(`^${name}(?:\\{[^}]*\\})? ([0-9.eE+-]+)$`, 'm').exec(text);
  return m ? Number(m[1]) : null;
};
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const progress = (m) => process.stderr.write(`[${new Date().toISOString().slice(11, 19)}] ${m}\n`);
const freePort = () =>
  new Promise((resolve, reject) => {
    const s = createServer();
    s.listen(0, '127.0.0.1', () => {
      const p = s.address().port;
      s.close(() => resolve(p));
    });
    s.on('error', reject);
  });
const waitJson = async (f, timeoutMs = 60_000) => {
  const end = Date.now() + timeoutMs;
  while (Date.now() < end) {
    try {
      return JSON.parse(readFileSync(f, 'utf8'));
    } catch {
      await sleep(100);
    }
  }
  throw new Error(`no ${f} after ${timeoutMs} ms`);
};

const fdLimit = (() => {
  try {
    return Number(/Max open files\s+(\d+)/.exec(readFileSync('/proc/self/limits', 'utf8'))[1]);
  } catch {
    return NaN;
  }
})();
const perSim = Math.ceil(N / SIMS);
if (fdLimit < perSim + 512 || fdLimit < N + 512) {
  console.error(`open-file limit ${fdLimit} is too low for ${N} connections in one process: run \`ulimit -n ${N + 2048}\` (hard limit: \`ulimit -Hn\`) first`);
  process.exit(1);
}

// under the repo's .tmp/ (gitignored, a real disk here: the gateway's outbox fsyncs), else the system temp dir
let base = join(ROOT, '.tmp');
try {
  mkdirSync(base, { recursive: true });
} catch {
  base = tmpdir();
}
const dir = mkdtempSync(join(base, 'gateway-scale-'));
const children = [];
const env = { ...process.env, FLEETLET_LOG_LEVEL: process.env.FLEETLET_LOG_LEVEL ?? 'warn' };
const fleetlet = (name, args, nodeArgs = []) => {
  const log = join(dir, `${name}.log`);
  const c = spawn(process.execPath, [...nodeArgs, '--import', 'tsx', join(ROOT, 'cli/main.ts'), ...args, '--die-with-parent'], { cwd: ROOT, stdio: ['pipe', 'pipe', 'pipe'], env });
  let out = '';
  c.stdout.on('data', (d) => (out += d));
  c.stderr.on('data', (d) => writeFileSync(log, d, { flag: 'a' }));
  c.output = () => out;
  c.benchName = name;
  children.push(c);
  return c;
};
const stop = async (c, graceMs = 10_000) => {
  if (!c || c.exitCode !== null || c.signalCode !== null) return;
  const done = new Promise((r) => c.once('exit', r));
  c.kill('SIGTERM');
  const t = setTimeout(() => c.kill('SIGKILL'), graceMs);
  await done;
  clearTimeout(t);
};
let cleaned = false;
const cleanup = async () => {
  if (cleaned) return;
  cleaned = true;
  for (const c of [...children].reverse()) await stop(c, 5000).catch(() => undefined);
  // --keep: each child's stdout too (e.g. what --node-flags=--trace-gc prints)
  if (values.keep) for (const c of children) writeFileSync(join(dir, `${c.benchName}.out`), c.output());
  if (values.keep) progress(`kept ${dir}`);
  else rmSync(dir, { recursive: true, force: true });
};
process.on('SIGINT', () => cleanup().then(() => process.exit(130)));

/** mean of per-interval lags weighted by the scheduler entries each ran (ms, one decimal); null without any */
function lagMean(list) {
  const ran = list.reduce((a, l) => a + l.ran, 0);
  return ran > 0 ? Math.round((list.reduce((a, l) => a + l.meanMs * l.ran, 0) / ran) * 10) / 10 : null;
}

// ---- the subscriber: readings by (device, seq), latency from the sample time --------------
class Meter {
  constructor() {
    this.perDevice = new Map(); // id -> Set(seq)
    this.dups = 0;
    this.messages = 0;
    this.lat = []; // latencies of first arrivals inside the window
    this.inWindow = 0; // readings taken in the window (whenever they arrived)
    this.arrivedInWindow = 0; // readings that arrived in the window (whenever taken)
    this.window = null; // [from, to] sample times
    this.bySecond = new Map(); // arrival second (from the window start) -> latencies of window readings
  }
  /** `ts`: when the gateway received the reading (its fleet message's ts), to split the latency in two; absent at Mosquitto */
  add(id, seq, t, ts) {
    const now = Date.now();
    this.messages++;
    let s = this.perDevice.get(id);
    if (!s) this.perDevice.set(id, (s = new Set()));
    if (s.has(seq)) return void this.dups++;
    s.add(seq);
    if (this.window && now >= this.window[0] && now < this.window[1]) this.arrivedInWindow++;
    if (this.window && t >= this.window[0] && t < this.window[1]) {
      this.inWindow++;
      this.lat.push(now - t);
      const sec = Math.floor((now - this.window[0]) / 1000);
      let l = this.bySecond.get(sec);
      if (!l) this.bySecond.set(sec, (l = { all: [], toGw: [], fromGw: [] }));
      l.all.push(now - t);
      if (ts !== undefined) {
        l.toGw.push(ts - t);
        l.fromGw.push(now - ts);
      }
    }
  }
  distinct() {
    let n = 0;
    for (const s of this.perDevice.values()) n += s.size;
    return n;
  }
  /** readings missing below each device's highest seq seen (a gap is a loss) */
  gaps() {
    let g = 0;
    for (const s of this.perDevice.values()) {
      let max = 0;
      for (const v of s) if (v > max) max = v;
      g += max - s.size;
    }
    return g;
  }
  /**
   * Per arrival second: readings, p50, p99 and max latency (ms), to tell a steady queue from
   * stalls; with the gateway, also p50/p99 of device→gateway (the fleet message's ts minus the
   * sample time) and gateway→subscriber (arrival minus ts).
   */
  seconds() {
    const q = (l, p) => {
      const a = Float64Array.from(l).sort();
      return a.length ? a[Math.min(a.length - 1, Math.floor(p * a.length))] : null;
    };
    return [...this.bySecond].sort((a, b) => a[0] - b[0]).map(([s, l]) => ({
      s,
      n: l.all.length,
      p50: q(l.all, 0.5),
      p99: q(l.all, 0.99),
      max: q(l.all, 1),
      ...(l.toGw.length ? { toGwP50: q(l.toGw, 0.5), toGwP99: q(l.toGw, 0.99), fromGwP50: q(l.fromGw, 0.5), fromGwP99: q(l.fromGw, 0.99) } : {}),
    }));
  }
  percentile(p) {
    if (this.lat.length === 0) return NaN;
    const a = Float64Array.from(this.lat).sort();
    return a[Math.min(a.length - 1, Math.floor((p / 100) * a.length))];
  }
}

const profDir = join(ROOT, '.tmp', `gateway-scale-prof-${new Date().toISOString().slice(0, 19).replace(/:/g, '')}`);
/** --cpu-prof for a sim process (the servers' own flags are not the sim's) */
const simProfArgs = (name) => (values['cpu-prof'] ? ['--cpu-prof', `--cpu-prof-dir=${join(profDir, name)}`] : []);

const simArgs = (port, i, statsFile, protocol) => [
  'sim', '--devices', String(perSim), '--first-index', String(i * perSim + 1), '--protocol', protocol, '--gateway-host', '127.0.0.1', protocol === 'coap' ? '--coap-port' : '--mqtt-port', String(port),
  '--site-secret-file', join(dir, 'site.secret'), '--interval-ms', String(INTERVAL), '--start-jitter-ms', String(RAMP_S * 1000), '--prefix', 'bench-',
  '--stats-file', statsFile, '--stats-every-ms', '1000',
];

/**
 * One phase: start the sims against `port`, wait for every device connected, settle,
 * measure a window, stop the sims and wait for the stragglers.
 */
async function phase(name, port, meter, server, protocol = 'mqtt') {
  const sims = [];
  const statsFiles = [];
  for (let i = 0; i < SIMS; i++) {
    const f = join(dir, `${name}-sim-${i}.stats.json`);
    statsFiles.push(f);
    const sim = fleetlet(`${name}-sim-${i}`, simArgs(port, i, f, protocol), simProfArgs(`${name}-sim-${i}`));
    // --sim-nice: the load generator yields the CPU to the servers under test, as it would on
    // machines of its own (a diagnostic: the default runs everything at the same priority)
    if (SIM_NICE !== 0) setPriority(sim.pid, SIM_NICE);
    sims.push(sim);
  }
  const simStats = () => statsFiles.map((f) => { try { return JSON.parse(readFileSync(f, 'utf8')); } catch { return null; } });
  const sum = (k) => simStats().reduce((a, s) => a + (s?.[k] ?? 0), 0);
  const rampEnd = Date.now() + RAMP_S * 1000 + 60_000;
  let connected = 0;
  while (Date.now() < rampEnd) {
    await sleep(1000);
    connected = sum('connected');
    if (connected >= N) break;
    for (const s of sims) if (s.exitCode !== null) throw new Error(`${name} sim exited early: ${readFileSync(join(dir, `${name}-sim-${sims.indexOf(s)}.log`), 'utf8').slice(-2000)}`);
  }
  progress(`${name}: ${connected}/${N} devices connected; settling ${SETTLE_S} s`);
  await sleep(SETTLE_S * 1000);
  // Scrape both /metrics once before the window: Node loads its fetch (undici) on the first
  // call, tens of ms of synchronous work in this process, which is the counting subscriber,
  // and at near saturation such a stall takes seconds to work off (before this, every run
  // showed a latency burst in the window's first seconds); and the scrape resets the
  // servers' event-loop delay histograms, so the first sample in the window covers the
  // window only, not the ramp.
  for (const url of [server.metricsUrl, server.hubMetricsUrl]) if (url) await fetch(url, { signal: AbortSignal.timeout(2000) }).then((r) => r.text()).catch(() => undefined);
  await sleep(1000);
  // the window: readings taken in it, CPU and memory across it
  const t0 = Date.now();
  // the monotonic clock's offset from the wall clock (ms): V8 CPU profiles (--cpu-prof) time
  // their samples on the monotonic clock, so this places them in the window's seconds
  const monoOffsetMs = t0 - Number(process.hrtime.bigint() / 1000n) / 1000;
  meter.window = [t0, t0 + WINDOW_S * 1000];
  const pids = { server: server.pid, hub: server.hubPid, sims: sims.map((s) => s.pid) };
  const steal0 = machineSteal();
  const cpu0 = { server: cpuS(pids.server), hub: pids.hub ? cpuS(pids.hub) : NaN, sims: pids.sims.map(cpuS), bench: cpuS(process.pid) };
  const sent0 = sum('sent');
  const lags = new Map();
  // this process's own loop: it is the counting subscriber, so its stalls show as latency too
  const benchLoop = monitorEventLoopDelay({ resolution: 10 });
  benchLoop.enable();
  const rss = [];
  const connectedSamples = [];
  const outbox = [];
  while (Date.now() < t0 + WINDOW_S * 1000) {
    await sleep(1000);
    // each sim's per-interval lags (lagHistory): every interval ending in the window once,
    // however this loop's rate drifts from the sims' (the reset-on-read `lag` alone missed or
    // repeated intervals)
    simStats().forEach((s, i) => {
      for (const l of s?.lagHistory ?? []) if (l.at > t0) lags.set(`${i}:${l.at}`, l);
    });
    rss.push(rssKb(pids.server));
    connectedSamples.push(sum('connected'));
    if (server.metricsUrl) {
      try {
        const text = await (await fetch(server.metricsUrl, { signal: AbortSignal.timeout(800) })).text();
        const hubText = server.hubMetricsUrl ? await (await fetch(server.hubMetricsUrl, { signal: AbortSignal.timeout(800) })).text().catch(() => '') : '';
        outbox.push({ depth: gauge(text, 'fleet_gateway_outbox_depth'), oldestS: gauge(text, 'fleet_gateway_outbox_oldest_age_seconds'), inflight: gauge(text, 'fleet_gateway_uplink_inflight_records'), inflightPublishes: gauge(text, 'fleet_gateway_uplink_inflight_publishes'), loopP99Ms: Math.round((gauge(text, 'fleet_gateway_event_loop_delay_p99_seconds') ?? NaN) * 1000), hubLoopP99Ms: Math.round((gauge(hubText, 'fleet_hub_event_loop_delay_p99_seconds') ?? NaN) * 1000), benchLoopP99Ms: Math.round(benchLoop.percentile(99) / 1e6) });
        benchLoop.reset();
      } catch {
        outbox.push({ depth: null, oldestS: null });
      }
    }
  }
  const t1 = Date.now();
  const connectedAtEnd = sum('connected');
  const simRssKb = Math.round(sum('rssBytes') / 1024);
  const steal1 = machineSteal();
  const cpu1 = { server: cpuS(pids.server), hub: pids.hub ? cpuS(pids.hub) : NaN, sims: pids.sims.map(cpuS), bench: cpuS(process.pid) };
  const sent1 = sum('sent');
  const rssEnd = rssKb(pids.server);
  // stop the devices; whatever they were acked for must arrive
  for (const s of sims) await stop(s, 20_000);
  const finals = sims.map((s) => { try { return JSON.parse(s.output().trim().split('\n').pop()); } catch { return null; } });
  const acked = finals.reduce((a, f) => a + (f?.sent ?? 0), 0);
  // drain: wait while readings still arrive (up to --drain-s); a backlog left in the gateway's outbox is reported as such, not as lost
  const depthNow = async () => {
    if (!server.metricsUrl) return null;
    try {
      return gauge(await (await fetch(server.metricsUrl, { signal: AbortSignal.timeout(2000) })).text(), 'fleet_gateway_outbox_depth');
    } catch {
      return null;
    }
  };
  const drainStart = Date.now();
  const drainEnd = drainStart + DRAIN_S * 1000;
  let last = -1;
  let stillSince = Date.now();
  while (Date.now() < drainEnd) {
    const d = meter.distinct();
    if (d >= acked) break;
    if (d !== last) {
      last = d;
      stillSince = Date.now();
    } else if (Date.now() - stillSince > 15_000) break;
    await sleep(500);
  }
  await sleep(1000);
  const drainS = Math.round((Date.now() - drainStart) / 100) / 10;
  const backlogAtEnd = await depthNow();
  const secs = (t1 - t0) / 1000;
  const pct = (a, b) => Math.round(((b - a) / secs) * 1000) / 10;
  return {
    // CPU time the hypervisor gave to others while this machine wanted it (steal), % of one core over the window
    stealPct: steal0 !== null && steal1 !== null ? pct(steal0, steal1) : null,
    windowStartMs: t0,
    monoOffsetMs,
    connected,
    connectedMinInWindow: Math.min(...connectedSamples),
    connectedAtEnd,
    simRssKb,
    simKbPerDevice: Math.round((simRssKb / N) * 10) / 10,
    windowS: Math.round(secs * 10) / 10,
    ackedPerS: Math.round((sent1 - sent0) / secs),
    // arrivals are counted in [t0, t0 + WINDOW_S) exactly; `secs` runs to the end of the
    // last metrics scrape (up to a second longer), which would understate the rate
    deliveredPerS: Math.round(meter.arrivedInWindow / WINDOW_S),
    windowReadingsDelivered: meter.inWindow,
    p50Ms: meter.percentile(50),
    p99Ms: meter.percentile(99),
    p999Ms: meter.percentile(99.9),
    maxMs: meter.lat.reduce((a, b) => (b > a ? b : a), -Infinity),
    latencySamples: meter.lat.length,
    latencyBySecond: meter.seconds(),
    acked,
    distinctAtSubscriber: meter.distinct(),
    drainS,
    backlogAtEnd,
    // acked readings the subscriber never got, when nothing is left queued in the gateway; with a backlog, they are "still queued"
    lost: backlogAtEnd ? null : Math.max(0, acked - meter.distinct()),
    notYetDelivered: Math.max(0, acked - meter.distinct()),
    gaps: meter.gaps(),
    duplicates: meter.dups,
    serverCpuPct: pct(cpu0.server, cpu1.server),
    hubCpuPct: pids.hub ? pct(cpu0.hub, cpu1.hub) : null,
    simCpuPct: cpu0.sims.map((c, i) => pct(c, cpu1.sims[i])),
    // this process: the subscriber that counts every reading (and the polling)
    benchCpuPct: pct(cpu0.bench, cpu1.bench),
    // weighted by the entries each interval ran
    simLagMeanMs: lagMean([...lags.values()]),
    simLagMaxMs: lags.size ? Math.max(...[...lags.values()].map((l) => l.maxMs)) : null,
    serverRssKbEnd: rssEnd,
    ...(server.metricsUrl ? { outboxDepthMax: Math.max(...outbox.map((o) => o.depth ?? -1)), outboxOldestSMax: Math.max(...outbox.map((o) => o.oldestS ?? -1)), outboxSamples: outbox.length, outboxTrace: outbox } : {}),
    serverRssKbMax: Math.max(...rss),
    simFinal: finals,
  };
}

/** (RSS at the end of the window − RSS with no devices) / devices connected then */
const perDevice = (r, rss0) => Math.round(((r.serverRssKbEnd - rss0) / Math.max(1, r.connectedAtEnd)) * 10) / 10;

async function gatewayPhase() {
  progress(`gateway: hub + gateway + ${SIMS} sim process(es), ${N} ${PROTOCOL.toUpperCase()} devices every ${INTERVAL} ms`);
  // --cpu-prof: the gateway and the hub write V8 CPU profiles on exit (to find what limits them)
  const nodeFlags = values['node-flags'].split(' ').filter(Boolean);
  const hubFlags = values['hub-node-flags'].split(' ').filter(Boolean);
  const profArgs = (name) => [...nodeFlags, ...(name === 'hub' ? hubFlags : []), ...(values['cpu-prof'] ? ['--cpu-prof', `--cpu-prof-dir=${join(profDir, name)}`] : [])];
  if (values['cpu-prof']) progress(`CPU profiles go to ${profDir}`);
  const hub = fleetlet('hub', ['hub', '--mqtt-port', '0', '--http-port', '0', '--state-dir', join(dir, 'hub'), '--ready-file', join(dir, 'hub.ready')], profArgs('hub'));
  const hubReady = await waitJson(join(dir, 'hub.ready'));
  const token = execFileSync(process.execPath, ['--import', 'tsx', join(ROOT, 'cli/main.ts'), 'hub', 'device-token', 'bench-gw', '--state-dir', join(dir, 'hub')], { cwd: ROOT }).toString().trim();
  writeFileSync(join(dir, 'gw.token'), token + '\n', { mode: 0o600 });
  const gwConfig = {
    deviceId: 'bench-gw',
    stateDir: join(dir, 'gateway'),
    hub: { url: `mqtt://127.0.0.1:${hubReady.mqttPort}`, tokenFile: join(dir, 'gw.token') },
    // every simulated MCU connects from 127.0.0.1; real ones each have an address of their own
    // (Mosquitto has no such cap): the caps on connections before CONNECT (per address, and
    // in all, which bounds the other) are raised to N
    mcu: { mqttPort: 0, coapPort: 0, siteSecretFile: join(dir, 'site.secret'), maxMcus: Math.max(10_000, N + 100), maxUnauthenticated: Math.max(512, N), maxUnauthenticatedPerAddress: Math.max(32, N), ...(values['mcu-msg-rate'] !== undefined ? { msgRate: Number(values['mcu-msg-rate']) } : {}) },
    uplink: { rate: Number(values['uplink-rate']), ...(values['uplink-window'] ? { window: Number(values['uplink-window']) } : {}), ...(values['uplink-batch-delay-ms'] ? { batchDelayMs: Number(values['uplink-batch-delay-ms']) } : {}), ...(values['uplink-batch-bytes'] ? { batchBytes: Number(values['uplink-batch-bytes']) } : {}) },
    // /metrics: the outbox depth tells a backlog in the gateway from one further on
    http: { port: await freePort() },
    ...(values['outbox-sync-interval-ms'] ? { outbox: { syncIntervalMs: Number(values['outbox-sync-interval-ms']) } } : {}),
  };
  writeFileSync(join(dir, 'gateway.json'), JSON.stringify(gwConfig));
  const gw = fleetlet('gateway', ['gateway', '--config', join(dir, 'gateway.json'), '--ready-file', join(dir, 'gw.ready')], profArgs('gateway'));
  const gwReady = await waitJson(join(dir, 'gw.ready'));
  const meter = new Meter();
  // a live consumer (clean session: no per-message persistence for it at the hub) with a long keep-alive, so a
  // subscriber starved of CPU for a while is not disconnected (it would lose what arrives meanwhile); disconnects are printed
  const sub = await mqtt.connectAsync(`mqtt://127.0.0.1:${hubReady.mqttPort}`, { clientId: 'bench-consumer', keepalive: 300, username: 'operator', password: readFileSync(hubReady.operatorTokenFile, 'utf8').trim(), reconnectPeriod: 500 });
  sub.on('offline', () => progress('hub subscriber disconnected'));
  sub.on('message', (topic, payload) => {
    const id = topic.split('/')[3];
    const m = JSON.parse(payload.toString());
    const s = m.samples?.find((x) => x.n === 'seq');
    if (s) meter.add(id, s.v, s.t, m.ts);
  });
  await sub.subscribeAsync('fleet/v1/d/+/telemetry', { qos: 1 });
  await sleep(3000);
  const rss0 = rssKb(gw.pid);
  progress(`gateway: RSS with 0 devices ${Math.round(rss0 / 1024)} MiB`);
  let gwExit = null;
  let stopping = false;
  gw.once('exit', (code, signal) => {
    if (stopping) return;
    gwExit = { code, signal, at: new Date().toISOString() };
    progress(`gateway process exited (${signal ?? `code ${code}`}) during the run`);
  });
  const r = await phase('gateway', PROTOCOL === 'coap' ? gwReady.coapPort : gwReady.mqttPort, meter, { pid: gw.pid, hubPid: hub.pid, metricsUrl: `http://127.0.0.1:${gwConfig.http.port}/metrics`, hubMetricsUrl: `http://127.0.0.1:${hubReady.httpPort}/metrics` }, PROTOCOL);
  if (gwExit) {
    // the figures after a crash are not the gateway's: say so, with what it printed
    let tail = '';
    try {
      tail = readFileSync(join(dir, 'gateway.log'), 'utf8').slice(-3000);
    } catch {
      // no log
    }
    r.gatewayCrashed = { ...gwExit, logTail: tail };
  }
  await sub.endAsync(true);
  stopping = true;
  await stop(gw, 30_000);
  await stop(hub, 30_000);
  return { ...r, serverRssKbIdle: rss0, kbPerDevice: perDevice(r, rss0), uplink: gwConfig.uplink };
}

async function mosquittoPhase() {
  if (!MOSQUITTO) throw new Error('mosquitto not found in /usr/sbin or /usr/bin');
  const port = await freePort();
  const conf = join(dir, 'mosquitto.conf');
  // stock Mosquitto drops QoS 1 beyond 1,000 queued per client (FACTS.md): unbounded here, and losses counted
  writeFileSync(conf, [`listener ${port} 127.0.0.1`, 'allow_anonymous true', 'max_queued_messages 0', 'max_inflight_messages 0', 'max_connections -1', 'persistence false', 'log_type error', ''].join('\n'));
  progress(`mosquitto: ${MOSQUITTO} on port ${port} + ${SIMS} sim process(es), ${N} MQTT devices every ${INTERVAL} ms`);
  const m = spawn('timeout', ['900', MOSQUITTO, '-c', conf], { stdio: ['ignore', 'ignore', 'pipe'] });
  children.push(m);
  await sleep(500);
  // the broker's pid is timeout's child
  const pid = Number(execFileSync('pgrep', ['-P', String(m.pid)]).toString().trim().split('\n')[0]);
  const meter = new Meter();
  const sub = await mqtt.connectAsync(`mqtt://127.0.0.1:${port}`, { clientId: 'bench-consumer', keepalive: 300, reconnectPeriod: 500 });
  sub.on('offline', () => progress('mosquitto subscriber disconnected'));
  sub.on('message', (topic, payload) => {
    const id = topic.split('/')[2];
    const recs = JSON.parse(payload.toString());
    const bt = recs[0]?.bt;
    const s = recs.find((x) => x.n === 'seq');
    if (s && typeof bt === 'number') meter.add(id, s.v, Math.round(bt * 1000 + (s.t ?? 0) * 1000));
  });
  await sub.subscribeAsync('mcu/v1/+/t', { qos: 1 });
  await sleep(1000);
  const rss0 = rssKb(pid);
  const r = await phase('mosquitto', port, meter, { pid });
  await sub.endAsync(true);
  await stop(m, 5000);
  return { ...r, serverRssKbIdle: rss0, kbPerDevice: perDevice(r, rss0) };
}

const date = new Date().toISOString();
const git = (() => {
  try {
    return execFileSync('git', ['rev-parse', '--short', 'HEAD'], { cwd: ROOT }).toString().trim();
  } catch {
    return null;
  }
})();
const machine = {
  cpus: cpus().length,
  model: cpus()[0]?.model ?? '?',
  memoryGiB: Math.round(totalmem() / 2 ** 30),
  kernel: release(),
  node: process.version,
  mosquitto: MOSQUITTO ? spawnSync(MOSQUITTO, ['-h']).stdout.toString().split('\n')[0] : null,
  openFileLimit: fdLimit,
  loadavgAtStart: loadavg().map((x) => Math.round(x * 100) / 100),
};
// the sims need the site secret before the gateway creates one
writeFileSync(join(dir, 'site.secret'), (await import('node:crypto')).randomBytes(32).toString('base64url') + '\n', { mode: 0o600 });

const result = { bench: 'gateway-scale', date, git, machine, devices: N, simProcesses: SIMS, intervalMs: INTERVAL, offeredPerS: TARGET_RATE, windowS: WINDOW_S, protocol: PROTOCOL, nodeFlags: values['node-flags'] || null, hubNodeFlags: values['hub-node-flags'] || null, simNice: SIM_NICE };
let exit = 0;
try {
  if (values.only !== 'mosquitto') {
    try {
      result.gateway = await gatewayPhase();
    } catch (err) {
      result.gateway = { error: String(err?.stack ?? err) };
      exit = 1;
    }
  }
  if (values.only !== 'gateway') {
    try {
      result.mosquitto = await mosquittoPhase();
    } catch (err) {
      result.mosquitto = { error: String(err?.stack ?? err) };
      exit = 1;
    }
  }
} finally {
  await cleanup();
}

// ---- the table -------------------------------------------------------------------------
const g = result.gateway ?? {};
const q = result.mosquitto ?? {};
const ratio = (a, b) => (typeof a === 'number' && typeof b === 'number' && b !== 0 && Number.isFinite(a) && Number.isFinite(b) ? `${(a / b).toFixed(2)}x` : '—');
const rows = [
  ['devices connected (of N) at the end of the window', g.connectedAtEnd, q.connectedAtEnd, String(N), g.connectedAtEnd === N],
  ['delivered readings/s (window)', g.deliveredPerS, q.deliveredPerS, `${TARGET_RATE} offered`, g.deliveredPerS >= TARGET_RATE * 0.98],
  ['lost (acked, never delivered; — while a backlog is queued)', g.lost, q.lost, '0', g.lost === null || g.lost === undefined ? null : g.lost === 0],
  ['acked, not delivered when the bench stopped waiting', g.notYetDelivered, q.notYetDelivered, '0', null],
  ['gateway outbox backlog when the bench stopped waiting / drain wait (s)', g.backlogAtEnd !== undefined ? `${g.backlogAtEnd} / ${g.drainS}` : null, q.drainS !== undefined ? `— / ${q.drainS}` : null, '0', null],
  ['gaps in per-device sequences', g.gaps, q.gaps, '0', g.gaps === 0],
  ['duplicates at the subscriber', g.duplicates, q.duplicates, '—', null],
  ['p50 device→subscriber, ms', g.p50Ms, q.p50Ms, '—', null],
  ['p99 device→subscriber, ms', g.p99Ms, q.p99Ms, '≤ 50 at 10,000 msg/s', g.p99Ms <= 50 && TARGET_RATE >= 10_000],
  ['p99.9, ms', g.p999Ms, q.p999Ms, '—', null],
  ['server memory per connected device, KB', g.kbPerDevice, q.kbPerDevice, '≤ 25', g.kbPerDevice <= 25],
  ['server CPU, % of one core (gateway | mosquitto)', g.serverCpuPct, q.serverCpuPct, '—', null],
  ['hub CPU, % of one core', g.hubCpuPct, null, '—', null],
  ['gateway outbox depth / oldest age (s), max in window', g.outboxDepthMax !== undefined ? `${g.outboxDepthMax} / ${g.outboxOldestSMax}` : null, null, '—', null],
  ['sim CPU, % of one core per process', g.simCpuPct?.join(' + '), q.simCpuPct?.join(' + '), '—', null],
  ['bench process (the counting subscriber) CPU, % of one core', g.benchCpuPct, q.benchCpuPct, '—', null],
  ['sim RSS per simulated device (whole process incl. ~90 MB Node+tsx / N), KB', g.simKbPerDevice, q.simKbPerDevice, '—', null],
  ['machine steal time in the window (hypervisor), % of one core', g.stealPct, q.stealPct, '—', null],
  ['sim event-loop lag mean / max, ms', g.simLagMeanMs !== undefined ? `${g.simLagMeanMs} / ${Math.round(g.simLagMaxMs)}` : null, q.simLagMeanMs !== undefined ? `${q.simLagMeanMs} / ${Math.round(q.simLagMaxMs)}` : null, '—', null],
];
result.table = rows.map(([figure, ours, mosq, target, pass]) => ({ figure, gateway: ours ?? null, mosquitto: mosq ?? null, ratio: ratio(ours, mosq), target, pass }));
const fmt = (v) => (v === null || v === undefined ? '—' : typeof v === 'number' ? String(Math.round(v * 10) / 10) : String(v));
console.log(`gateway-scale — ${N} ${PROTOCOL.toUpperCase()} devices (Mosquitto: MQTT) × ${1000 / INTERVAL} msg/s (${TARGET_RATE} msg/s offered), ${SIMS} sim process(es)${SIM_NICE ? ` at nice ${SIM_NICE}` : ""}, ${WINDOW_S} s window; ${machine.cpus} × ${machine.model}, Node ${machine.node}, ${machine.mosquitto}`);
console.log('| figure | gateway → hub | Mosquitto | ratio | target | pass |');
console.log('|---|---:|---:|---:|---|---|');
for (const r of result.table) console.log(`| ${r.figure} | ${fmt(r.gateway)} | ${fmt(r.mosquitto)} | ${r.ratio} | ${r.target} | ${r.pass === null ? '' : r.pass ? 'pass' : 'FAIL'} |`);
if (g.error) console.log(`gateway phase failed: ${g.error.split('\n')[0]}`);
if (g.gatewayCrashed) {
  console.log(`THE GATEWAY PROCESS DIED during the run (${g.gatewayCrashed.signal ?? `exit ${g.gatewayCrashed.code}`} at ${g.gatewayCrashed.at}); its figures above are not valid. Last lines of its log:`);
  console.log(g.gatewayCrashed.logTail.split('\n').filter((l) => l.trim()).slice(-8).join('\n'));
  exit = 1;
}
if (q.error) console.log(`mosquitto phase failed: ${q.error.split('\n')[0]}`);
mkdirSync(join(ROOT, 'scripts/bench/results'), { recursive: true });
const out = join(ROOT, `scripts/bench/results/gateway-scale-${date.slice(0, 10)}${values.tag ? `-${values.tag}` : ''}.json`);
writeFileSync(out, JSON.stringify(result, null, 2) + '\n');
console.log(`results: ${out}`);
process.exit(exit);
