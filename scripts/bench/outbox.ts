#!/usr/bin/env node
// Outbox bench: durable appends, drain into a live hub, a large backlog's disk use and drain
// time, each printed beside a reference measured in the same run (the machine is shared and
// noisy: compare ratios, not absolute times).
//
//   node --import tsx scripts/bench/outbox.ts [--quick] [--only 1,2,3] [--cpu-prof]
//
//   1. durable appends/s: LevelOutbox, 256 concurrent producers, ~120-byte telemetry payloads;
//      reference (a) raw classic-level db.batch(records, {sync:true}) in groups of the size the
//      outbox's group commit reached, reference (b) the disk's write+fsync rate (128 B, 2 s).
//   2. drain rate into a live hub (startHub in its own process, like the broker it is compared
//      with): prefilled LevelOutbox → Uplink (rate 0, batchDelayMs 0, batchMax 256, window 16)
//      → hub → operator consumer counting unique mids. Reference: Mosquitto fed by the same
//      outbox+Uplink code with batchMax 1 (one publish per message, all a broker without
//      batching gets).
//   3. backlog: bytes on disk of the LevelOutbox directory after 1,000,000 appends, against the
//      raw topic+payload bytes, then the time to drain it into the hub.
//
// --quick: 20,000 / 20,000 / 100,000 records. --only: run some of the figures (1, 2, 3; or only
// part of 2: 2-hub, 2-mosquitto, 2-memory). --cpu-prof: the
// hub processes write V8 CPU profiles under .tmp/outbox-prof-<date>/ and their top functions
// are printed (profile this process with `node --cpu-prof --import tsx scripts/bench/outbox.ts`,
// summarise any profile with `--summarize-prof <file.cpuprofile>`).
//
// Every phase has a time limit and stops by itself; children (hub process, mosquitto) and the
// temp dir are removed on success, failure, Ctrl-C and SIGTERM. The temp dir is on a real disk:
// the repo's .tmp/ (gitignored) when that is not tmpfs, else os.tmpdir() when that is not tmpfs.
// Writes scripts/bench/results/outbox-<date>[-quick].json. Exit code 0 when every phase ran
// (targets missed are reported as "fail" in the table), 1 when a phase could not run.
import { EventEmitter } from 'node:events';
import { spawn, spawnSync, execFileSync, type ChildProcess } from 'node:child_process';
import { closeSync, existsSync, fdatasyncSync, fsyncSync, mkdirSync, mkdtempSync, openSync, readdirSync, readFileSync, rmSync, statfsSync, statSync, writeFileSync, writeSync } from 'node:fs';
import { createServer, connect as netConnect } from 'node:net';
import { cpus, freemem, loadavg, release, tmpdir, totalmem } from 'node:os';
import { join, resolve } from 'node:path';
import { createInterface } from 'node:readline';
import { performance } from 'node:perf_hooks';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import mqtt, { type MqttClient } from 'mqtt';
import { deriveToken } from '../../core/credentials.ts';
import { createLogger, type Logger } from '../../core/log.ts';
import { connectFleetClient } from '../../core/mqtt.ts';
import { encodeRecord, LevelOutbox } from '../../core/outbox-level.ts';
import { payloadOf, Priority, type Outbox, type OutboxAppend, type OutboxRecord, type OutboxStats } from '../../core/outbox.ts';
import { Uplink } from '../../core/uplink.ts';

const THIS_FILE = fileURLToPath(import.meta.url);
const REPO = resolve(THIS_FILE, '../../..');
const DEVICE = 'bench';
/** publishes in flight (the product default is core/outbox-config.ts uplink.window); BENCH_UPLINK_WINDOW overrides for A/B runs */
const UPLINK_WINDOW = Number(process.env.BENCH_UPLINK_WINDOW ?? 16);
const TOPIC = `fleet/v1/d/${DEVICE}/telemetry`;
const PRODUCERS = 256;
const MB = 1e6;

// ---------------------------------------------------------------- hub child process mode
/** The hub in its own process (Mosquitto, the reference, is one too). Exits when stdin closes. */
async function hubChild(stateDir: string, lifetimeMs: number): Promise<void> {
  const { startHub } = await import('../../hub/index.ts');
  const { HubConfigSchema } = await import('../../hub/config.ts');
  const log = createLogger({ name: 'bench-hub', level: 'warn' });
  const hub = await startHub(HubConfigSchema.parse({ host: '127.0.0.1', mqttPort: 0, httpPort: 0, stateDir }), log);
  process.stdout.write(JSON.stringify({ mqttPort: hub.mqttPort, httpPort: hub.httpPort, operatorTokenFile: hub.operatorTokenFile, fleetSecretFile: hub.fleetSecretFile }) + '\n');
  let stopping = false;
  const stop = async (code: number) => {
    if (stopping) return;
    stopping = true;
    setTimeout(() => process.exit(code), 10_000).unref();
    await hub.stop().catch(() => undefined);
    process.exit(code);
  };
  process.stdin.on('end', () => void stop(0));
  process.stdin.on('error', () => void stop(0));
  process.stdin.resume();
  process.on('SIGTERM', () => void stop(0));
  process.on('SIGINT', () => void stop(0));
  // bounded even if the parent forgets us
  setTimeout(() => void stop(3), lifetimeMs).unref();
}

// ---------------------------------------------------------------- helpers
const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));
const fmt = (n: number, digits = 0) => (Number.isFinite(n) ? n.toLocaleString('en-US', { maximumFractionDigits: digits, minimumFractionDigits: digits }) : String(n));
const round = (n: number, digits = 2) => Math.round(n * 10 ** digits) / 10 ** digits;
const progress = (msg: string) => process.stderr.write(`[${new Date().toISOString().slice(11, 19)}] ${msg}\n`);

class TimeoutError extends Error {}
class StallError extends Error {}

/** Wait for `p`, at most `ms`; on timeout call `onTimeout` (to stop the work) and throw. */
async function bounded<T>(p: Promise<T>, ms: number, what: string, onTimeout?: () => void): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([
      p,
      new Promise<never>((_, reject) => {
        timer = setTimeout(() => {
          onTimeout?.();
          reject(new TimeoutError(`${what}: timed out after ${Math.round(ms / 1000)} s`));
        }, ms);
      }),
    ]);
  } finally {
    clearTimeout(timer);
  }
}

/** A telemetry message of about 120 bytes whose mid is the outbox record id. */
function telemetry(id: string): Buffer {
  const ts = Date.now();
  return Buffer.from(JSON.stringify({ v: 1, mid: id, ts, samples: [{ n: 'cpu.util', v: Math.round(Math.random() * 10_000) / 100, u: '%', t: ts }] }));
}

/** Read the mid without a full parse (consumers count unique mids). */
function midOf(payload: Buffer): string | null {
  const i = payload.indexOf('"mid":"');
  if (i < 0) return null;
  const end = payload.indexOf(0x22, i + 7);
  return end < 0 ? null : payload.toString('latin1', i + 7, end);
}

const FS_TYPES: Record<number, string> = {
  0x01021994: 'tmpfs',
  0x858458f6: 'ramfs',
  0xef53: 'ext2/3/4',
  0x58465342: 'xfs',
  0x9123683e: 'btrfs',
  0x794c7630: 'overlayfs',
  0x6969: 'nfs',
  0x2fc12fc1: 'zfs',
  0x65735546: 'fuse',
  0xf2f52010: 'f2fs',
};

function fsInfo(dir: string): { type: string; source: string; freeBytes: number; memoryBacked: boolean } {
  const s = statfsSync(dir);
  let type = FS_TYPES[s.type] ?? `0x${s.type.toString(16)}`;
  let source = '?';
  try {
    const [t, src] = execFileSync('findmnt', ['-no', 'FSTYPE,SOURCE', '-T', dir], { encoding: 'utf8', timeout: 5000 }).trim().split(/\s+/);
    if (t) type = t;
    if (src) source = src;
  } catch {
    /* findmnt missing: the statfs magic will do */
  }
  return { type, source, freeBytes: s.bavail * s.bsize, memoryBacked: s.type === 0x01021994 || s.type === 0x858458f6 };
}

/** du -sb: apparent sizes of every file under dir; also the allocated blocks. */
function dirBytes(dir: string): { apparent: number; allocated: number; files: number } {
  let apparent = 0;
  let allocated = 0;
  let files = 0;
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    const p = join(dir, e.name);
    if (e.isDirectory()) {
      const sub = dirBytes(p);
      apparent += sub.apparent;
      allocated += sub.allocated;
      files += sub.files;
    } else {
      const st = statSync(p);
      apparent += st.size;
      allocated += st.blocks * 512;
      files++;
    }
  }
  return { apparent, allocated, files };
}

/** CPU seconds (user+system) of a process from /proc. */
function procCpuSec(pid: number | undefined): number {
  if (!pid) return NaN;
  try {
    const f = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1]!.split(' ');
    return (Number(f[11]) + Number(f[12])) / 100; // utime + stime in USER_HZ ticks
  } catch {
    return NaN;
  }
}

function childPid(ppid: number): number | undefined {
  try {
    const c = readFileSync(`/proc/${ppid}/task/${ppid}/children`, 'utf8').trim().split(/\s+/)[0];
    if (c) return Number(c);
  } catch {
    /* fall through */
  }
  for (const d of readdirSync('/proc')) {
    if (!/^\d+$/.test(d)) continue;
    try {
      if (Number(readFileSync(`/proc/${d}/stat`, 'utf8').split(') ')[1]!.split(' ')[1]) === ppid) return Number(d);
    } catch {
      /* gone */
    }
  }
  return undefined;
}

async function freePort(): Promise<number> {
  const srv = createServer();
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
  const port = (srv.address() as { port: number }).port;
  await new Promise<void>((r) => srv.close(() => r()));
  return port;
}

function benchLogger(name: string): Logger {
  return createLogger({ name, level: 'warn', write: (l) => process.stderr.write(`  ${l}`) });
}

// ---------------------------------------------------------------- children and cleanup
const children = new Set<ChildProcess>();
/** processes our children started (mosquitto under `timeout`) */
const grandchildren = new Set<number>();
let benchDir: string | undefined;

function cleanupSync(): void {
  // SIGTERM, not SIGKILL: `timeout` passes it on to mosquitto, the hub process stops its hub
  // (and exits by itself within 10 s whatever happens)
  for (const c of children) {
    try {
      c.kill('SIGTERM');
    } catch {
      /* gone */
    }
  }
  for (const pid of grandchildren) {
    try {
      process.kill(pid, 'SIGTERM');
    } catch {
      /* gone */
    }
  }
  children.clear();
  grandchildren.clear();
  if (benchDir) {
    rmSync(benchDir, { recursive: true, force: true, maxRetries: 5, retryDelay: 200 });
    benchDir = undefined;
  }
}

async function stopChild(c: ChildProcess, how: 'stdin' | 'SIGTERM'): Promise<void> {
  if (c.exitCode !== null || c.signalCode !== null) {
    children.delete(c);
    return;
  }
  const exited = new Promise<void>((r) => c.once('exit', () => r()));
  if (how === 'stdin') c.stdin?.end();
  else c.kill('SIGTERM');
  try {
    await bounded(exited, 10_000, 'child exit');
  } catch {
    c.kill('SIGKILL');
    await bounded(exited, 5000, 'child kill').catch(() => undefined);
  }
  children.delete(c);
}

interface Broker {
  kind: 'hub' | 'mosquitto';
  url: string;
  /** the process doing the broker work, for its CPU time */
  pid: number | undefined;
  consumerAuth: { username?: string; password?: string };
  deviceToken: string;
  warnings: () => { count: number; first: string[] };
  metrics?: () => Promise<Record<string, number>>;
  stop(): Promise<void>;
}

function collectLines(c: ChildProcess) {
  const first: string[] = [];
  let count = 0;
  if (c.stderr) createInterface({ input: c.stderr }).on('line', (l) => {
    count++;
    if (first.length < 5) first.push(l.slice(0, 400));
  });
  return () => ({ count, first });
}

async function startHubChild(stateDir: string, lifetimeMs: number, profDir: string | null): Promise<Broker> {
  const args = [...(profDir ? ['--cpu-prof', `--cpu-prof-dir=${profDir}`] : []), '--import', 'tsx', THIS_FILE, '--hub-child', stateDir, String(lifetimeMs)];
  const c = spawn(process.execPath, args, { cwd: REPO, stdio: ['pipe', 'pipe', 'pipe'] });
  children.add(c);
  const warnings = collectLines(c);
  const rl = createInterface({ input: c.stdout! });
  const info = await bounded(
    new Promise<{ mqttPort: number; httpPort: number; operatorTokenFile: string; fleetSecretFile: string }>((res, rej) => {
      rl.once('line', (l) => res(JSON.parse(l)));
      c.once('exit', (code) => rej(new Error(`hub process exited with ${code} before it listened: ${warnings().first.join(' | ')}`)));
    }),
    60_000,
    'hub start',
  );
  const fleetSecret = readFileSync(info.fleetSecretFile, 'utf8').trim();
  return {
    kind: 'hub',
    url: `mqtt://127.0.0.1:${info.mqttPort}`,
    pid: c.pid,
    consumerAuth: { username: 'operator', password: readFileSync(info.operatorTokenFile, 'utf8').trim() },
    deviceToken: deriveToken(fleetSecret, 'device', DEVICE),
    warnings,
    async metrics() {
      const out: Record<string, number> = {};
      try {
        const res = await fetch(`http://127.0.0.1:${info.httpPort}/metrics`, { signal: AbortSignal.timeout(5000) });
        for (const line of (await res.text()).split('\n')) {
          const m = /^(fleet_hub_[a-z_]+(?:\{[^}]*\})?) ([0-9.e+-]+)$/.exec(line);
          if (m) out[m[1]!] = Number(m[2]);
        }
      } catch (err) {
        out.error = NaN;
        progress(`  hub /metrics unavailable: ${(err as Error).message}`);
      }
      return out;
    },
    stop: () => stopChild(c, 'stdin'),
  };
}

function mosquittoBinary(): string | null {
  for (const p of ['/usr/sbin/mosquitto', '/usr/local/sbin/mosquitto', '/usr/bin/mosquitto']) if (existsSync(p)) return p;
  try {
    return execFileSync('sh', ['-c', 'command -v mosquitto'], { encoding: 'utf8' }).trim() || null;
  } catch {
    return null;
  }
}

async function startMosquitto(dir: string, lifetimeMs: number): Promise<Broker> {
  const bin = mosquittoBinary();
  if (!bin) throw new Error('mosquitto is not installed (Debian: apt-get install mosquitto)');
  const port = await freePort();
  mkdirSync(dir, { recursive: true });
  const conf = join(dir, 'mosquitto.conf');
  // the fairness settings of FACTS.md: no per-client queue limit (stock drops QoS 1 beyond 1,000)
  writeFileSync(conf, [`listener ${port} 127.0.0.1`, 'allow_anonymous true', 'max_queued_messages 0', 'persistence false', 'log_dest stderr', 'log_type error', 'log_type warning', ''].join('\n'));
  // `mosquitto -h` prints its version and exits 3
  const version = spawnSync(bin, ['-h'], { encoding: 'utf8', timeout: 5000 }).stdout.split('\n')[0]?.trim() || '?';
  // `timeout` bounds its life even if this process is SIGKILLed
  const c = spawn('timeout', ['-k', '5', String(Math.ceil(lifetimeMs / 1000)), bin, '-c', conf], { stdio: ['ignore', 'ignore', 'pipe'] });
  children.add(c);
  const warnings = collectLines(c);
  const deadline = Date.now() + 10_000;
  for (;;) {
    const ok = await new Promise<boolean>((r) => {
      const s = netConnect(port, '127.0.0.1');
      s.once('connect', () => (s.destroy(), r(true)));
      s.once('error', () => r(false));
    });
    if (ok) break;
    if (c.exitCode !== null || Date.now() > deadline) {
      await stopChild(c, 'SIGTERM');
      throw new Error(`mosquitto did not start: ${warnings().first.join(' | ')}`);
    }
    await sleep(50);
  }
  progress(`  ${version} on 127.0.0.1:${port}`);
  const pid = childPid(c.pid!);
  if (pid) grandchildren.add(pid);
  return {
    kind: 'mosquitto',
    url: `mqtt://127.0.0.1:${port}`,
    pid: pid ?? c.pid,
    consumerAuth: {},
    deviceToken: 'anonymous-is-allowed',
    warnings,
    stop: async () => {
      await stopChild(c, 'SIGTERM');
      if (pid) grandchildren.delete(pid);
    },
  };
}

// ---------------------------------------------------------------- outbox filling

interface BatchProbe {
  syncBatches: number;
  syncRecords: number;
  otherBatches: number;
  batchMs: number;
  available: boolean;
}

/** Count the outbox's LevelDB batches (records per fsync, time inside the write) by wrapping its db.batch. */
function probeBatches(ob: LevelOutbox): BatchProbe {
  const p: BatchProbe = { syncBatches: 0, syncRecords: 0, otherBatches: 0, batchMs: 0, available: false };
  type Db = { batch: (ops: Array<{ type: string; key: string }>, o?: { sync?: boolean }) => Promise<void> };
  const db = (ob as unknown as { db?: Db }).db;
  if (!db || typeof db.batch !== 'function') return p;
  const orig = db.batch.bind(db);
  p.available = true;
  db.batch = async (ops, o) => {
    const t = performance.now();
    try {
      return await orig(ops, o);
    } finally {
      p.batchMs += performance.now() - t;
      if (o?.sync) {
        p.syncBatches++;
        for (const op of ops) if (op.type === 'put' && op.key.charCodeAt(0) === 0x72 /* r */) p.syncRecords++;
      } else p.otherBatches++;
    }
  };
  return p;
}

/** n appends from `producers` concurrent producers, each awaiting its durable append before the next. */
async function fill(ob: Outbox, n: number, timeoutMs: number, what: string): Promise<{ seconds: number; appended: number; groups: number }> {
  let issued = 0;
  let done = 0;
  let stop = false;
  let groups = 0;
  const onAppended = () => groups++;
  ob.on('appended', onAppended);
  let lastReport = performance.now();
  const producer = async () => {
    while (!stop && issued < n) {
      issued++;
      await ob.append({ topic: TOPIC, priority: Priority.TELEMETRY, payload: telemetry });
      done++;
      if (done % 10_000 === 0 && performance.now() - lastReport > 10_000) {
        lastReport = performance.now();
        progress(`  ${what}: ${fmt(done)} of ${fmt(n)}`);
      }
    }
  };
  const t0 = performance.now();
  const all = Promise.all(Array.from({ length: PRODUCERS }, producer));
  try {
    await bounded(all, timeoutMs, what, () => (stop = true));
  } catch (err) {
    await bounded(all, 30_000, `${what} (stopping)`).catch(() => undefined);
    ob.off('appended', onAppended);
    throw Object.assign(err as Error, { partial: { appended: done, seconds: (performance.now() - t0) / 1000 } });
  }
  ob.off('appended', onAppended);
  return { seconds: (performance.now() - t0) / 1000, appended: done, groups };
}

// ---------------------------------------------------------------- phase 1: durable appends

async function phaseAppends(dir: string, n: number) {
  const out: Record<string, unknown> = { n, producers: PRODUCERS };
  const ob = await LevelOutbox.open(join(dir, 'p1-outbox'));
  const probe = probeBatches(ob);
  const cpu0 = process.cpuUsage();
  let r: Awaited<ReturnType<typeof fill>>;
  try {
    r = await fill(ob, n, Math.max(60_000, n), 'durable appends');
  } finally {
    await ob.close();
  }
  const cpu = process.cpuUsage(cpu0);
  const payloadBytes = ob.stats().bytes / r.appended;
  const perSec = r.appended / r.seconds;
  // records per fsync: the outbox emits 'appended' once per synced batch carrying appends
  const perFsync = probe.available && probe.syncBatches > 0 ? probe.syncRecords / probe.syncBatches : r.appended / Math.max(1, r.groups);
  Object.assign(out, {
    seconds: round(r.seconds, 3),
    appendsPerSec: Math.round(perSec),
    recordsPerFsync: round(perFsync, 1),
    syncBatches: probe.available ? probe.syncBatches : r.groups,
    avgTopicPlusPayloadBytes: round(payloadBytes, 1),
    timeInsideDbBatchPct: probe.available ? round((100 * probe.batchMs) / 1000 / r.seconds, 1) : null,
    cpuSecondsOfThisProcess: round((cpu.user + cpu.system) / 1e6, 2),
  });
  progress(`  ours: ${fmt(r.appended)} durable appends in ${r.seconds.toFixed(2)} s → ${fmt(perSec)}/s, ${perFsync.toFixed(1)} records per fsync (${probe.available ? 'counted by wrapping db.batch' : "from 'appended' events"}), ${out.timeInsideDbBatchPct ?? '?'}% of the time inside db.batch, CPU ${out.cpuSecondsOfThisProcess} s`);

  // reference (a): raw classic-level batches with sync, same record bytes, same group size
  const group = Math.max(1, Math.round(perFsync));
  const { ClassicLevel } = await import('classic-level');
  const raw = new ClassicLevel<string, Buffer>(join(dir, 'p1-raw'), { valueEncoding: 'buffer' });
  await raw.open();
  try {
    let seq = BigInt(Date.now()) * 1000n;
    const ops: Array<{ type: 'put'; key: string; value: Buffer }> = [];
    for (let i = 0; i < n; i++, seq++) {
      const id = seq.toString();
      ops.push({ type: 'put', key: `r1${seq.toString(16).padStart(16, '0')}`, value: encodeRecord(TOPIC, Priority.TELEMETRY, Date.now(), telemetry(id)).value });
    }
    let stop = false;
    let written = 0;
    const t0 = performance.now();
    await bounded(
      (async () => {
        for (let i = 0; i < n && !stop; i += group) {
          const g = ops.slice(i, i + group);
          await raw.batch(g, { sync: true });
          written += g.length;
        }
      })(),
      Math.max(60_000, n / 2),
      'raw classic-level reference',
      () => (stop = true),
    );
    const secs = (performance.now() - t0) / 1000;
    out.rawBatch = { groupSize: group, seconds: round(secs, 3), recordsPerSec: Math.round(written / secs), batchesPerSec: Math.round(written / group / secs) };
    progress(`  reference (a): raw classic-level db.batch(${group} records, {sync:true}) → ${fmt(written / secs)} records/s (${fmt(written / group / secs)} batches/s)`);
  } finally {
    await raw.close();
  }

  // reference (b): the disk's fsync rate (and fdatasync, which LevelDB 1.20 uses)
  const syncRate = (fn: (fd: number) => void) => {
    const f = join(dir, 'fsync.probe');
    const fd = openSync(f, 'w');
    const buf = Buffer.alloc(128, 0x61);
    let k = 0;
    const t0 = performance.now();
    try {
      while (performance.now() - t0 < 2000) {
        writeSync(fd, buf);
        fn(fd);
        k++;
      }
    } finally {
      closeSync(fd);
      rmSync(f, { force: true });
    }
    return k / ((performance.now() - t0) / 1000);
  };
  const fsyncPerSec = syncRate(fsyncSync);
  const fdatasyncPerSec = syncRate(fdatasyncSync);
  out.disk = { fsyncPerSec: Math.round(fsyncPerSec), fdatasyncPerSec: Math.round(fdatasyncPerSec), ceilingAtOurGroupSize: Math.round(fsyncPerSec * perFsync) };
  progress(`  reference (b): write(128 B)+fsync ${fmt(fsyncPerSec)}/s, +fdatasync ${fmt(fdatasyncPerSec)}/s → fsync-bound ceiling at ${perFsync.toFixed(0)} records per fsync: ${fmt(fsyncPerSec * perFsync)}/s`);
  return out;
}

// ---------------------------------------------------------------- phase 2/3: drain into a broker

interface DrainResult {
  broker: 'hub' | 'mosquitto';
  batchMax: number;
  n: number;
  seconds: number;
  msgPerSec: number;
  unique: number;
  losses: number;
  duplicatesSeenByConsumer: number;
  /** resends the hub recognised and dropped (its fleet_hub_duplicates_total) */
  duplicatesDroppedByHub?: number;
  /** records the Uplink sent, resends included */
  sentRecords: number;
  /** the outbox's depth counter when the store was found empty (should be 0) */
  outboxDepthCounterAtEnd: number | null;
  rawBatchPublishesSeenByConsumer: number;
  publishes: number;
  batches: number;
  reconnects: number;
  cpuSeconds: { deviceAndConsumerProcess: number; broker: number };
  brokerWarnings: { count: number; first: string[] };
  hubMetrics?: Record<string, number>;
  error?: string;
  /** 'time limit' or 'stalled': the figures are what was delivered until then */
  stopped?: string;
}

async function drain(broker: Broker, ob: Outbox, n: number, batchMax: number, timeoutMs: number): Promise<DrainResult> {
  const seen = new Set<string>();
  let duplicates = 0;
  let rawBatches = 0;
  let finished: (() => void) | null = null;
  let t1 = 0;
  let uplink: Uplink | undefined;
  let peeking = false;
  let depthAtEnd: number | null = null;
  const done = () => {
    t1 = performance.now();
    depthAtEnd = ob.stats().depth;
    finished?.();
  };
  // done = every mid at the consumer and nothing left in the outbox. The depth counter is the
  // cheap test; when it disagrees (it has gone negative before) the store itself is asked, once
  // nothing is in flight, and the disagreement is reported instead of stalling the bench.
  const check = () => {
    if (t1 || seen.size < n) return;
    if (ob.stats().depth === 0) return done();
    if (peeking || !uplink || uplink.inFlight > 0) return;
    peeking = true;
    ob.peek(1).then(
      (left) => {
        peeking = false;
        if (!t1 && left.length === 0 && uplink!.inFlight === 0) done();
      },
      () => (peeking = false),
    );
  };
  const consumer: MqttClient = await bounded(mqtt.connectAsync(broker.url, { ...broker.consumerAuth, clientId: `bench-consumer-${process.pid}`, reconnectPeriod: 0, clean: true }), 15_000, 'consumer connect');
  let client: MqttClient | undefined;
  const res: DrainResult = {
    broker: broker.kind,
    batchMax,
    n,
    seconds: NaN,
    msgPerSec: NaN,
    unique: 0,
    losses: n,
    duplicatesSeenByConsumer: 0,
    sentRecords: 0,
    outboxDepthCounterAtEnd: null,
    rawBatchPublishesSeenByConsumer: 0,
    publishes: 0,
    batches: 0,
    reconnects: 0,
    cpuSeconds: { deviceAndConsumerProcess: NaN, broker: NaN },
    brokerWarnings: { count: 0, first: [] },
  };
  try {
    consumer.on('message', (topic, payload) => {
      if (topic.endsWith('/batch')) {
        rawBatches++;
        return;
      }
      if (topic !== TOPIC) return; // the retained state message and anything else
      const mid = midOf(payload);
      if (!mid) return;
      if (seen.has(mid)) duplicates++;
      else {
        seen.add(mid);
        if (seen.size >= n) check();
      }
    });
    const granted = await consumer.subscribeAsync(`fleet/v1/d/${DEVICE}/#`, { qos: 1 });
    if (granted[0]?.qos !== 1) throw new Error(`consumer subscription not granted at QoS 1: ${JSON.stringify(granted)}`);

    let t0 = 0;
    let cpu0 = process.cpuUsage();
    let brokerCpu0 = NaN;
    const connected = new Promise<void>((r) => {
      client = connectFleetClient({ url: broker.url, deviceId: DEVICE, token: broker.deviceToken, kind: 'agent', version: 'bench', keepalive: 60 });
      // registered before the Uplink's own listener: the clock starts as the pump starts
      client.on('connect', () => {
        if (t0) {
          res.reconnects++;
          return;
        }
        t0 = performance.now();
        cpu0 = process.cpuUsage();
        brokerCpu0 = procCpuSec(broker.pid);
        r();
      });
    });
    client!.on('error', (err) => progress(`  device client error: ${err.message}`));
    uplink = new Uplink({ client: client!, outbox: ob, log: benchLogger('bench-uplink'), deviceId: DEVICE, rate: 0, batchDelayMs: 0, window: UPLINK_WINDOW, batchMax });
    uplink.on('sent', check);
    await bounded(connected, 15_000, 'device connect');

    // progress, stall detection, and an early, clear stop when batches are not unpacked
    let lastProgress = { at: performance.now(), unique: 0, depth: ob.stats().depth };
    let lastPrint = performance.now();
    let fail: (e: Error) => void = () => undefined;
    const watch = setInterval(() => {
      const now = performance.now();
      const depth = ob.stats().depth;
      if (seen.size !== lastProgress.unique || depth !== lastProgress.depth) lastProgress = { at: now, unique: seen.size, depth };
      if (now - lastPrint > 10_000) {
        lastPrint = now;
        progress(`  ${broker.kind}: ${fmt(seen.size)} of ${fmt(n)} unique at the consumer, outbox depth ${fmt(depth)}, ${fmt(seen.size / ((now - t0) / 1000))} msg/s`);
      }
      if (rawBatches > 0 && seen.size === 0 && now - t0 > 5000) fail(new Error(`the consumer received ${rawBatches} raw batch publishes and no items: the hub does not unpack fleet/v1/d/{id}/batch`));
      else if (now - lastProgress.at > 30_000) fail(new StallError(`stalled for 30 s at ${seen.size} unique, outbox depth ${depth}`));
    }, 250);
    try {
      await bounded(
        new Promise<void>((resolve, reject) => {
          finished = resolve;
          fail = reject;
          check();
        }),
        timeoutMs,
        `drain into ${broker.kind}`,
      );
    } finally {
      clearInterval(watch);
      // no new peeks from here (a pump racing the outbox's close only makes noise)
      uplink.stop();
      const end = t1 || performance.now();
      const cpu = process.cpuUsage(cpu0);
      res.seconds = round((end - t0) / 1000, 3);
      res.msgPerSec = Math.round(seen.size / ((end - t0) / 1000));
      res.cpuSeconds = { deviceAndConsumerProcess: round((cpu.user + cpu.system) / 1e6, 2), broker: round(procCpuSec(broker.pid) - brokerCpu0, 2) };
      const st = uplink.stats();
      res.publishes = st.publishes;
      res.batches = st.batches;
      res.sentRecords = st.sentRecords;
      res.outboxDepthCounterAtEnd = depthAtEnd;
    }
  } catch (err) {
    res.error = (err as Error).message;
    if (err instanceof TimeoutError) res.stopped = 'time limit';
    else if (err instanceof StallError) res.stopped = 'stalled';
  } finally {
    res.unique = seen.size;
    res.losses = n - seen.size;
    res.rawBatchPublishesSeenByConsumer = rawBatches;
    // late duplicates (a resend racing its PUBACK) would arrive right after, and a pump already
    // inside peek() finishes (the caller closes the outbox next): give both a moment
    uplink?.stop();
    await sleep(500);
    res.duplicatesSeenByConsumer = duplicates;
    res.brokerWarnings = broker.warnings();
    if (broker.metrics) {
      res.hubMetrics = await broker.metrics();
      res.duplicatesDroppedByHub = res.hubMetrics['fleet_hub_duplicates_total'];
    }
    uplink?.stop();
    await client?.endAsync(true).catch(() => undefined);
    await consumer.endAsync(true).catch(() => undefined);
  }
  return res;
}

function printDrain(r: DrainResult): void {
  progress(
    `  ${r.broker} (batchMax ${r.batchMax}): ${fmt(r.unique)} of ${fmt(r.n)} unique in ${r.seconds} s → ${fmt(r.msgPerSec)} msg/s; ${r.stopped ? `undelivered when stopped (${r.stopped})` : 'lost'} ${fmt(r.losses)}, duplicates at the consumer ${fmt(r.duplicatesSeenByConsumer)}${r.duplicatesDroppedByHub !== undefined ? `, resends dropped by the hub ${fmt(r.duplicatesDroppedByHub)}` : ''}; ${fmt(r.sentRecords)} records sent in ${fmt(r.publishes)} publishes (${fmt(r.batches)} batches)${r.outboxDepthCounterAtEnd ? `; outbox depth counter ${fmt(r.outboxDepthCounterAtEnd)} with the store empty (should be 0)` : ''}; CPU s: device+consumer ${r.cpuSeconds.deviceAndConsumerProcess}, broker ${r.cpuSeconds.broker}${r.reconnects ? `, ${r.reconnects} reconnects` : ''}${r.brokerWarnings.count ? `, ${r.brokerWarnings.count} broker warning lines (first: ${r.brokerWarnings.first[0]})` : ''}${r.error ? ` — ERROR: ${r.error}` : ''}`,
  );
}

/**
 * Bench-only outbox: in memory, O(1) peek and ack, no durability. Fed to the same Uplink it
 * takes the outbox out of the broker comparison (an info figure beside the required ones).
 */
class IdealOutbox extends EventEmitter implements Outbox {
  private readonly recs = new Map<string, OutboxRecord>();
  private nextId = Date.now() * 1000;
  private bytes = 0;
  private counters = { appended: 0, acked: 0 };

  async append(e: OutboxAppend): Promise<OutboxRecord> {
    const id = String(this.nextId++);
    const payload = payloadOf(e, id);
    const rec: OutboxRecord = { id, topic: e.topic, payload, priority: e.priority, ts: Date.now() };
    this.recs.set(id, rec);
    this.bytes += payload.length + Buffer.byteLength(e.topic);
    this.counters.appended++;
    this.emit('appended');
    return rec;
  }

  async peek(max: number, exclude?: ReadonlySet<string>): Promise<OutboxRecord[]> {
    const out: OutboxRecord[] = [];
    for (const r of this.recs.values()) {
      if (out.length >= max) break;
      if (!exclude?.has(r.id)) out.push(r);
    }
    return out;
  }

  async ack(ids: readonly string[]): Promise<void> {
    for (const id of ids) {
      const r = this.recs.get(id);
      if (!r) continue;
      this.recs.delete(id);
      this.bytes -= r.payload.length + Buffer.byteLength(r.topic);
      this.counters.acked++;
    }
  }

  stats(): OutboxStats {
    return { depth: this.recs.size, bytes: this.bytes, depthByClass: { telemetry: this.recs.size }, oldestAgeMs: 0, evicted: 0, ...this.counters };
  }

  async close(): Promise<void> {}
}

type DrainOutput = DrainResult & { outbox: 'LevelOutbox' | 'bench-only in-memory'; prefillSeconds?: number };

/** Prefill an outbox (unless given one), start the broker, drain, stop the broker. */
async function drainInto(kind: 'hub' | 'mosquitto', dir: string, n: number, o: { profDir?: string | null; prefilled?: LevelOutbox; ideal?: boolean; batchMax?: number } = {}): Promise<DrainOutput> {
  const timeoutMs = Math.max(60_000, n); // fails below 1,000 msg/s
  const batchMax = o.batchMax ?? (kind === 'hub' ? 256 : 1);
  let ob: Outbox | undefined = o.prefilled;
  let prefillSeconds: number | undefined;
  let broker: Broker | undefined;
  try {
    if (!ob) {
      ob = o.ideal ? new IdealOutbox() : await LevelOutbox.open(join(dir, `outbox-${kind}-${Date.now()}`));
      const f = await fill(ob, n, Math.max(60_000, n), `prefill for ${kind}`);
      prefillSeconds = round(f.seconds, 2);
      progress(`  prefilled ${fmt(n)} records${o.ideal ? ' (bench-only in-memory outbox)' : ''} in ${f.seconds.toFixed(1)} s`);
    }
    const life = timeoutMs + 120_000;
    broker = kind === 'hub' ? await startHubChild(join(dir, `hub-${Date.now()}`), life, o.profDir ?? null) : await startMosquitto(join(dir, `mosquitto-${Date.now()}`), life);
    const r = await drain(broker, ob, n, batchMax, timeoutMs);
    printDrain(r);
    return { ...r, outbox: o.ideal ? 'bench-only in-memory' : 'LevelOutbox', prefillSeconds };
  } finally {
    await broker?.stop();
    if (!o.prefilled) await ob?.close();
  }
}

// ---------------------------------------------------------------- phase 3: backlog

async function phaseBacklog(dir: string, n: number, profDir: string | null) {
  const obDir = join(dir, 'p3-outbox');
  let ob = await LevelOutbox.open(obDir);
  let f: Awaited<ReturnType<typeof fill>>;
  try {
    f = await fill(ob, n, Math.max(60_000, n), 'backlog appends');
  } catch (err) {
    await ob.close();
    throw err;
  }
  const rawBytes = ob.stats().bytes; // topic + payload bytes of every stored record
  const depth = ob.stats().depth;
  const afterAppend = dirBytes(obDir);
  progress(`  ${fmt(f.appended)} appended in ${f.seconds.toFixed(1)} s (${fmt(f.appended / f.seconds)}/s); on disk ${fmt(afterAppend.apparent / MB, 1)} MB in ${afterAppend.files} files (allocated ${fmt(afterAppend.allocated / MB, 1)} MB); raw topic+payload ${fmt(rawBytes / MB, 1)} MB → ${(afterAppend.apparent / rawBytes).toFixed(2)}x`);
  await ob.close();
  const afterClose = dirBytes(obDir);
  const tOpen = performance.now();
  ob = await LevelOutbox.open(obDir);
  const reopenSeconds = (performance.now() - tOpen) / 1000;
  const afterReopen = dirBytes(obDir);
  progress(`  closed: ${fmt(afterClose.apparent / MB, 1)} MB; reopened in ${reopenSeconds.toFixed(2)} s: ${fmt(afterReopen.apparent / MB, 1)} MB in ${afterReopen.files} files; depth ${fmt(ob.stats().depth)}`);
  let peak = Math.max(afterAppend.apparent, afterClose.apparent, afterReopen.apparent);
  let d: DrainResult;
  const sampler = setInterval(() => {
    try {
      peak = Math.max(peak, dirBytes(obDir).apparent);
    } catch {
      /* a file vanished mid-walk (compaction) */
    }
  }, 2000);
  try {
    d = await drainInto('hub', dir, n, { profDir, prefilled: ob });
  } finally {
    clearInterval(sampler);
    await ob.close();
  }
  const afterDrain = dirBytes(obDir);
  return {
    n,
    depthBeforeDrain: depth,
    appendSeconds: round(f.seconds, 2),
    appendsPerSec: Math.round(f.appended / f.seconds),
    rawTopicPlusPayloadBytes: rawBytes,
    onDisk: { afterAppendBytes: afterAppend.apparent, afterAppendAllocatedBytes: afterAppend.allocated, afterCloseBytes: afterClose.apparent, afterReopenBytes: afterReopen.apparent, peakSampledBytes: peak, afterDrainBytes: afterDrain.apparent },
    reopenSeconds: round(reopenSeconds, 2),
    drain: d,
  };
}

// ---------------------------------------------------------------- summary

interface Row {
  figure: string;
  ours: string;
  reference: string;
  ratio: string;
  target: string;
  verdict: 'pass' | 'fail' | 'info' | 'n/a';
}

function table(rows: Row[]): string {
  const head: Row = { figure: 'figure', ours: 'ours', reference: 'reference', ratio: 'ratio', target: 'target', verdict: 'pass' };
  const cols: Array<keyof Row> = ['figure', 'ours', 'reference', 'ratio', 'target', 'verdict'];
  const w = cols.map((c) => Math.max(...[head, ...rows].map((r) => String(r[c]).length), c === 'verdict' ? 9 : 0));
  const line = (r: Row | Record<keyof Row, string>) => '| ' + cols.map((c, i) => String(r[c]).padEnd(w[i]!)).join(' | ') + ' |';
  return [line({ ...head, verdict: 'pass/fail' }), '|' + w.map((x) => '-'.repeat(x + 2)).join('|') + '|', ...rows.map(line)].join('\n');
}

/** Records sent more than once (the device's own resends, not a reconnect's), and the outbox's depth counter at the end. */
function resendRow(ours: DrainResult, ref: DrainResult | null): Row {
  const resent = (r: DrainResult) => Math.max(0, r.sentRecords - r.n);
  const depth = (r: DrainResult) => (r.outboxDepthCounterAtEnd ? `, depth counter ${fmt(r.outboxDepthCounterAtEnd)}` : '');
  return {
    figure: '   records sent twice (hub dropped)',
    ours: `${fmt(resent(ours))}${ours.duplicatesDroppedByHub !== undefined ? ` (${fmt(ours.duplicatesDroppedByHub)})` : ''}${depth(ours)}`,
    reference: ref ? `${fmt(resent(ref))}${depth(ref)}` : '',
    ratio: `${((100 * resent(ours)) / ours.n).toFixed(1)}% of n`,
    target: '0, depth 0',
    verdict: resent(ours) > 0 || ours.outboxDepthCounterAtEnd ? 'fail' : ours.error ? 'n/a' : 'pass',
  };
}

// ---------------------------------------------------------------- main

async function main(): Promise<void> {
  const { values } = parseArgs({ options: { quick: { type: 'boolean', default: false }, only: { type: 'string', default: '1,2,3' }, 'cpu-prof': { type: 'boolean', default: false } } });
  const quick = values.quick!;
  const only = new Set(values.only!.split(',').map((s) => s.trim()));
  const N1 = quick ? 20_000 : 200_000;
  const N2 = quick ? 20_000 : 200_000;
  const N3 = quick ? 100_000 : 1_000_000;
  const date = new Date().toISOString();
  const resultsDir = join(REPO, 'scripts/bench/results');
  // profiles are large: under the gitignored .tmp/, kept after the run
  const profDir = values['cpu-prof'] ? join(REPO, '.tmp', `outbox-prof-${date.replace(/[:.]/g, '-')}`) : null;

  for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const)
    process.on(sig, () => {
      progress(`${sig}: stopping, cleaning up`);
      cleanupSync();
      process.exit(130);
    });
  process.on('exit', cleanupSync);
  // whole-run bound, beyond the per-phase ones
  const watchdogMs = (quick ? 15 : 80) * 60_000;
  setTimeout(() => {
    progress(`the whole bench exceeded ${watchdogMs / 60_000} min: stopping`);
    cleanupSync();
    process.exit(2);
  }, watchdogMs).unref();

  // a temp dir on a real disk: fsync on tmpfs measures nothing
  const repoTmp = join(REPO, '.tmp');
  mkdirSync(repoTmp, { recursive: true });
  let base = repoTmp;
  let where = "the repo's .tmp/ (gitignored)";
  let fs = fsInfo(repoTmp);
  if (fs.memoryBacked) {
    const t = fsInfo(tmpdir());
    if (t.memoryBacked) throw new Error(`both ${repoTmp} and ${tmpdir()} are memory-backed (${fs.type}); durable figures would be meaningless`);
    base = tmpdir();
    where = 'os.tmpdir()';
    fs = t;
  }
  // a run killed with SIGKILL cannot clean up: remove its dir once no run can still own it
  for (const d of readdirSync(base)) {
    const p = join(base, d);
    try {
      if (d.startsWith('bench-outbox-') && Date.now() - statSync(p).mtimeMs > 2 * watchdogMs) rmSync(p, { recursive: true, force: true });
    } catch {
      /* raced with another cleaner */
    }
  }
  benchDir = mkdtempSync(join(base, 'bench-outbox-'));
  const need = (N3 + N1 + 2 * N2) * 400;
  if (fs.freeBytes < need) throw new Error(`${fmt(fs.freeBytes / MB)} MB free under ${base}; the bench needs about ${fmt(need / MB)} MB`);

  let git: { head: string; dirty: boolean } | null = null;
  try {
    git = { head: execFileSync('git', ['rev-parse', '--short', 'HEAD'], { cwd: REPO, encoding: 'utf8' }).trim(), dirty: execFileSync('git', ['status', '--porcelain', '--', 'core', 'hub'], { cwd: REPO, encoding: 'utf8' }).trim() !== '' };
  } catch {
    /* not a checkout */
  }
  const machine = {
    cpus: cpus().length,
    model: cpus()[0]?.model ?? '?',
    memoryGiB: round(totalmem() / 2 ** 30, 1),
    freeMemoryGiB: round(freemem() / 2 ** 30, 1),
    kernel: release(),
    node: process.version,
    loadavgAtStart: loadavg().map((x) => round(x, 2)),
    disk: { dir: benchDir, where, fsType: fs.type, source: fs.source, freeGB: round(fs.freeBytes / 1e9, 1) },
  };
  progress(`outbox bench${quick ? ' (quick)' : ''}: ${machine.cpus} × ${machine.model}, ${machine.memoryGiB} GiB, Linux ${machine.kernel}, Node ${machine.node}, load ${machine.loadavgAtStart.join(' ')}`);
  progress(`bench dir ${benchDir} — ${where}, ${fs.type} on ${fs.source}, ${fmt(fs.freeBytes / 1e9, 1)} GB free${git ? `; git ${git.head}${git.dirty ? ' with uncommitted changes in core/ or hub/' : ''}` : ''}`);

  const result: Record<string, unknown> = { bench: 'outbox', date, quick, machine, git, sizes: { appends: N1, drain: N2, backlog: N3 } };
  const rows: Row[] = [];
  const errors: string[] = [];
  try {
    if (only.has('1')) {
      progress(`[1/3] durable appends: ${fmt(N1)} records, ${PRODUCERS} producers`);
      try {
        const p = await phaseAppends(benchDir, N1);
        result.appends = p;
        const raw = p.rawBatch as { recordsPerSec: number; groupSize: number };
        const disk = p.disk as { fsyncPerSec: number; ceilingAtOurGroupSize: number };
        const ours = p.appendsPerSec as number;
        rows.push({ figure: '1. durable appends/s (256 producers)', ours: `${fmt(ours)}/s`, reference: `raw db.batch sync, ${raw.groupSize}/batch: ${fmt(raw.recordsPerSec)}/s`, ratio: (ours / raw.recordsPerSec).toFixed(2), target: '>= 20,000/s', verdict: ours >= 20_000 ? 'pass' : 'fail' });
        rows.push({ figure: '   records per fsync (group commit)', ours: String(p.recordsPerFsync), reference: `disk write+fsync: ${fmt(disk.fsyncPerSec)}/s (× group: ${fmt(disk.ceilingAtOurGroupSize / 1e6, 2)}M/s)`, ratio: '', target: '', verdict: 'info' });
      } catch (err) {
        errors.push(`appends: ${(err as Error).message}`);
        result.appends = { error: (err as Error).message, partial: (err as { partial?: unknown }).partial };
        rows.push({ figure: '1. durable appends/s', ours: 'ERROR', reference: '', ratio: '', target: '>= 20,000/s', verdict: 'fail' });
        progress(`  ERROR: ${(err as Error).message}`);
      }
    }

    const sub = (t: string) => only.has('2') || only.has(`2-${t}`);
    if (sub('hub') || sub('mosquitto') || sub('memory')) {
      progress(`[2/3] drain ${fmt(N2)} prefilled records: hub (batchMax 256) vs Mosquitto (batchMax 1), then both again from a bench-only in-memory outbox`);
      const run = async (label: string, f: () => Promise<DrainOutput>): Promise<DrainOutput | null> => {
        try {
          const r = await f();
          if (r.error && !r.stopped) errors.push(`${label}: ${r.error}`);
          return r;
        } catch (err) {
          errors.push(`${label}: ${(err as Error).message}`);
          progress(`  ERROR (${label}): ${(err as Error).message}`);
          return null;
        }
      };
      const hub = sub('hub') ? await run('drain/hub', () => drainInto('hub', benchDir!, N2, { profDir })) : null;
      const mosq = sub('mosquitto') ? await run('drain/mosquitto', () => drainInto('mosquitto', benchDir!, N2)) : null;
      // the same two brokers with the outbox taken out: how much of the above is the outbox
      const hubIdeal = sub('memory') ? await run('drain/hub, in-memory outbox', () => drainInto('hub', benchDir!, N2, { ideal: true, profDir })) : null;
      const mosqIdeal = sub('memory') ? await run('drain/mosquitto, in-memory outbox', () => drainInto('mosquitto', benchDir!, N2, { ideal: true })) : null;
      result.drain = { hub, mosquitto: mosq, hubInMemoryOutbox: hubIdeal, mosquittoInMemoryOutbox: mosqIdeal };
      const rate = (r: DrainResult | null) => (r ? `${fmt(r.msgPerSec)} msg/s${r.stopped ? ` (${r.stopped}: ${fmt(r.unique)} of ${fmt(r.n)})` : ''}` : 'ERROR');
      const ok = hub && !hub.error && hub.losses === 0;
      rows.push({
        figure: '2. drain into hub, msg/s',
        ours: rate(hub),
        reference: `mosquitto, batchMax 1: ${rate(mosq)}`,
        ratio: hub && mosq ? (hub.msgPerSec / mosq.msgPerSec).toFixed(2) : '',
        target: '>= 10,000 msg/s, 0 lost',
        verdict: ok && hub!.msgPerSec >= 10_000 ? 'pass' : 'fail',
      });
      rows.push({ figure: '   lost / duplicates at consumer', ours: hub ? `${fmt(hub.losses)} / ${fmt(hub.duplicatesSeenByConsumer)}` : '', reference: mosq ? `${mosq.stopped ? `${fmt(mosq.losses)} undelivered` : fmt(mosq.losses)} / ${fmt(mosq.duplicatesSeenByConsumer)}` : '', ratio: '', target: '0 lost', verdict: hub ? (hub.losses === 0 ? 'pass' : 'fail') : 'fail' });
      if (hub) rows.push(resendRow(hub, mosq));
      if (hub && mosq) rows.push({ figure: '   broker CPU s (device+consumer CPU s)', ours: `${hub.cpuSeconds.broker} (${hub.cpuSeconds.deviceAndConsumerProcess})`, reference: `${mosq.cpuSeconds.broker} (${mosq.cpuSeconds.deviceAndConsumerProcess})`, ratio: (hub.cpuSeconds.broker / mosq.cpuSeconds.broker).toFixed(1), target: '', verdict: 'info' });
      rows.push({
        figure: '   same, in-memory O(1) outbox (bench-only)',
        ours: rate(hubIdeal),
        reference: `mosquitto, batchMax 1: ${rate(mosqIdeal)}`,
        ratio: hubIdeal && mosqIdeal ? (hubIdeal.msgPerSec / mosqIdeal.msgPerSec).toFixed(2) : '',
        target: '',
        verdict: 'info',
      });
      if (hubIdeal && mosqIdeal) rows.push({ figure: '   broker CPU s, in-memory outbox', ours: `${hubIdeal.cpuSeconds.broker} (${hubIdeal.cpuSeconds.deviceAndConsumerProcess})`, reference: `${mosqIdeal.cpuSeconds.broker} (${mosqIdeal.cpuSeconds.deviceAndConsumerProcess})`, ratio: (hubIdeal.cpuSeconds.broker / mosqIdeal.cpuSeconds.broker).toFixed(1), target: '', verdict: 'info' });
    }

    if (only.has('3')) {
      progress(`[3/3] backlog of ${fmt(N3)} records`);
      try {
        const p = await phaseBacklog(benchDir, N3, profDir);
        result.backlog = p;
        const onDisk = p.onDisk.afterAppendBytes;
        rows.push({ figure: `3. backlog ${fmt(N3)}: bytes on disk`, ours: `${fmt(onDisk / MB, 1)} MB`, reference: `raw topic+payload: ${fmt(p.rawTopicPlusPayloadBytes / MB, 1)} MB`, ratio: (onDisk / p.rawTopicPlusPayloadBytes).toFixed(2), target: `<= ${quick ? 20 : 200} MB`, verdict: onDisk <= (quick ? 20 : 200) * MB ? 'pass' : 'fail' });
        rows.push({ figure: '   peak on disk (sampled, incl. reopen/drain)', ours: `${fmt(p.onDisk.peakSampledBytes / MB, 1)} MB`, reference: '', ratio: (p.onDisk.peakSampledBytes / p.rawTopicPlusPayloadBytes).toFixed(2), target: '', verdict: 'info' });
        const d = p.drain;
        if (d.error && !d.stopped) errors.push(`backlog drain: ${d.error}`);
        rows.push(resendRow(d, null));
        rows.push({ figure: `   backlog drain into hub`, ours: `${d.seconds} s (${fmt(d.msgPerSec)} msg/s${d.stopped ? `, ${d.stopped}: ${fmt(d.unique)} of ${fmt(d.n)}` : ''})`, reference: '', ratio: '', target: `<= ${fmt(N3 / 10_000)} s (10k msg/s), 0 lost`, verdict: !d.error && d.losses === 0 && d.msgPerSec >= 10_000 ? 'pass' : 'fail' });
      } catch (err) {
        errors.push(`backlog: ${(err as Error).message}`);
        result.backlog = { error: (err as Error).message, partial: (err as { partial?: unknown }).partial };
        rows.push({ figure: `3. backlog ${fmt(N3)}`, ours: 'ERROR', reference: '', ratio: '', target: '<= 200 MB', verdict: 'fail' });
        progress(`  ERROR: ${(err as Error).message}`);
      }
    }
  } finally {
    result.summary = rows;
    result.errors = errors;
    result.loadavgAtEnd = loadavg().map((x) => round(x, 2));
    const part = values.only === '1,2,3' ? '' : `-only-${[...only].join('-')}`;
    const out = join(resultsDir, `outbox-${date.slice(0, 10)}${quick ? '-quick' : ''}${part}.json`);
    mkdirSync(resultsDir, { recursive: true });
    writeFileSync(out, JSON.stringify(result, null, 2) + '\n');
    console.log('');
    console.log(`outbox bench${quick ? ' (quick)' : ''} — ${machine.cpus} × ${machine.model}, Node ${machine.node}, ${where} (${fs.type})`);
    console.log(table(rows));
    if (errors.length) console.log(`errors:\n  ${errors.join('\n  ')}`);
    console.log(`results: ${out}`);
    if (profDir && existsSync(profDir)) {
      for (const file of readdirSync(profDir).filter((x) => x.endsWith('.cpuprofile'))) {
        console.log(`\nhub CPU profile ${join(profDir, file)}, top self time:`);
        for (const line of summarizeProfile(join(profDir, file), 15)) console.log(`  ${line}`);
      }
    }
    // children are stopped by the phases; anything left is killed, the temp dir removed
    cleanupSync();
  }
  process.exitCode = errors.length ? 1 : 0;
}

// ---------------------------------------------------------------- profile summary

function summarizeProfile(file: string, top: number): string[] {
  interface Node {
    id: number;
    callFrame: { functionName: string; url: string; lineNumber: number };
    children?: number[];
  }
  const prof = JSON.parse(readFileSync(file, 'utf8')) as { nodes: Node[]; samples: number[]; timeDeltas: number[] };
  const byId = new Map(prof.nodes.map((n) => [n.id, n]));
  const self = new Map<number, number>();
  prof.samples.forEach((id, i) => self.set(id, (self.get(id) ?? 0) + (prof.timeDeltas[i] ?? 0)));
  const total = prof.timeDeltas.reduce((a, b) => a + b, 0);
  const agg = new Map<string, number>();
  const pkg = new Map<string, number>();
  for (const [id, us] of self) {
    const n = byId.get(id)!;
    const url = n.callFrame.url.replace(/^file:\/\//, '').replace(REPO + '/', '');
    const name = `${n.callFrame.functionName || '(anonymous)'} ${url ? `${url.split('node_modules/').pop()}:${n.callFrame.lineNumber + 1}` : ''}`.trim();
    agg.set(name, (agg.get(name) ?? 0) + us);
    const m = /node_modules\/((?:@[^/]+\/)?[^/]+)/.exec(url);
    const group = m ? m[1]! : url.startsWith('node:') ? 'node internals' : url ? url.split('/').slice(0, 1).join('/') + '/' : n.callFrame.functionName.startsWith('(') ? n.callFrame.functionName : '(native)';
    pkg.set(group, (pkg.get(group) ?? 0) + us);
  }
  const pct = (us: number) => `${((100 * us) / total).toFixed(1).padStart(5)}%`;
  const lines = [`total ${(total / 1e6).toFixed(1)} s sampled; by package:`];
  for (const [g, us] of [...pkg].sort((a, b) => b[1] - a[1]).slice(0, 10)) lines.push(`  ${pct(us)}  ${g}`);
  lines.push('by function:');
  for (const [f, us] of [...agg].sort((a, b) => b[1] - a[1]).slice(0, top)) lines.push(`  ${pct(us)}  ${f}`);
  return lines;
}

// ---------------------------------------------------------------- entry (last: every const above is initialised)
if (process.argv[2] === '--hub-child') {
  await hubChild(process.argv[3]!, Number(process.argv[4]));
} else if (process.argv[2] === '--summarize-prof') {
  for (const line of summarizeProfile(process.argv[3]!, 20)) console.log(line);
} else {
  await main();
}
