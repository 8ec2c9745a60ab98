import { execFile } from 'node:child_process';
import { readdirSync, readFileSync, statfsSync } from 'node:fs';
import { join } from 'node:path';
import type { Sample } from '../core/messages.ts';
import type { Counter, MetricsRegistry } from '../core/metrics.ts';
import { isSea } from '../core/native.ts';

/**
 * Per-second device and app figures read straight from /proc and /sys: far cheaper than
 * calling systeminformation at 1 Hz (FACTS.md: ~3.8% of a core, mostly `df` spawns and
 * its network stats). One sample costs a handful of small file reads, one statfs per
 * watched path every DISK_EVERY_MS, and one scan of /proc/<pid>/stat for all apps.
 * systeminformation is used only for the inventory (`Inventory` below), at start, every
 * hour and on SIGHUP, in a lazily loaded module.
 *
 * Everything reads from injectable roots (`procRoot`, `sysRoot`) so a test can give
 * thermal zones to a machine that has none; the agent always uses /proc and /sys.
 */

/** USER_HZ: the unit of the tick counts in /proc/<pid>/stat and /proc/stat; 100 on every Linux ABI */
const CLK_TCK = 100;
/** statfs is one syscall, but a stuck remote file system blocks the event loop: not every second */
const DISK_EVERY_MS = 10_000;

export interface DiskSnapshot {
  /** the path that was statfs'ed ("/" and the agent's state directory) */
  path: string;
  totalBytes: number;
  /** free for unprivileged users (f_bavail), what an app can still write */
  availBytes: number;
  /** free including the root reserve (f_bfree) */
  freeBytes: number;
}

export interface NetSnapshot {
  iface: string;
  rxBytes: number;
  txBytes: number;
  rxPackets: number;
  txPackets: number;
  rxErrors: number;
  txErrors: number;
  /** rates over the last sample period; null on the first sample of an interface */
  rxBytesPerS: number | null;
  txBytesPerS: number | null;
  rxPacketsPerS: number | null;
  txPacketsPerS: number | null;
}

export interface ThermalSnapshot {
  /** the sysfs zone name, e.g. thermal_zone0 */
  zone: string;
  /** the zone's type as the kernel names it, e.g. cpu-thermal (Pi), CPU-therm (Jetson), x86_pkg_temp */
  type: string;
  celsius: number;
}

export interface DeviceSnapshot {
  t: number;
  /** percent of all CPUs busy over the last sample period; null on the first sample */
  cpuUtil: number | null;
  cpus: number;
  load1: number;
  load5: number;
  load15: number;
  memTotal: number;
  memAvailable: number;
  swapTotal: number;
  swapFree: number;
  uptimeS: number;
  /** the state directory's file system (kept for the page and older readers) */
  diskTotal: number | null;
  diskFree: number | null;
  disks: DiskSnapshot[];
  net: NetSnapshot[];
  /** empty when the device has no thermal zones (most VMs and x86 servers without ACPI zones) */
  thermal: ThermalSnapshot[];
}

export interface AppSnapshot {
  name: string;
  /** pid of the group leader = the app's process group id; null when not running */
  pgid: number | null;
  /**
   * processes in the app's process group at this sample; includes the supervisor's launch-shim
   * watcher (agent/shim.ts, a small sh subshell) that lives in the group to kill it if the agent dies
   */
  processes: number;
  /** percent of one core used by the whole group over the last sample period; null on the first sample of a run */
  cpuPercent: number | null;
  /** CPU seconds of the app's group since this agent started it (all its runs) */
  cpuSecondsTotal: number;
  /** sum of the resident set of every process in the group (shared pages count once per process) */
  rssBytes: number;
  restarts: number;
  running: boolean;
  /** from the supervisor's health checks when the app has one: 'healthy' | 'unhealthy' | 'starting' | ... */
  health: string | null;
}

/** What the collector needs of an app (a subset of the supervisor's AppStatus). */
export interface AppLike {
  name: string;
  pid: number | null;
  state: string;
  restarts: number;
  /** the supervisor's health field, when health checks exist: a status string or { status } */
  health?: unknown;
}

export interface MetricsReaderOptions {
  /** paths whose file systems are reported (statfs) */
  diskPaths: string[];
  procRoot?: string;
  sysRoot?: string;
  /** report the loopback interface too (default false: it only carries local traffic) */
  includeLoopback?: boolean;
  /** period of the full /proc pass that finds the processes of each app's group, ms (default 10 s) */
  appScanMs?: number;
}

function read(file: string): string | null {
  try {
    return readFileSync(file, 'utf8');
  } catch {
    return null;
  }
}

function readCpuTimes(procRoot: string): { idle: number; total: number; cpus: number } | null {
  const text = read(join(procRoot, 'stat'));
  if (!text) return null;
  const first = text.slice(0, text.indexOf('\n'));
  const f = first.trim().split(/\s+/).slice(1).map(Number);
  // guest and guest_nice (fields 9, 10) are already inside user and nice: leave them out
  const total = f.slice(0, 8).reduce((a, b) => a + (Number.isFinite(b) ? b : 0), 0);
  const cpus = (text.match(/^cpu\d+ /gm) ?? []).length;
  return { idle: (f[3] ?? 0) + (f[4] ?? 0), total, cpus };
}

export function parseMeminfo(text: string): { total: number; available: number; swapTotal: number; swapFree: number } {
  const kb = (key: string) => Number(new RegExp(`^${key}:\\s+(\\d+)`, 'm').exec(text)?.[1] ?? 0) * 1024;
  return { total: kb('MemTotal'), available: kb('MemAvailable'), swapTotal: kb('SwapTotal'), swapFree: kb('SwapFree') };
}

/** /proc/net/dev: "  eth0: rxBytes rxPackets rxErrs rxDrop fifo frame compressed multicast txBytes txPackets txErrs ..." */
export function parseNetDev(text: string): Array<{ iface: string; rxBytes: number; rxPackets: number; rxErrors: number; txBytes: number; txPackets: number; txErrors: number }> {
  const out = [];
  for (const line of text.split('\n').slice(2)) {
    const colon = line.indexOf(':');
    if (colon < 0) continue;
    const f = line.slice(colon + 1).trim().split(/\s+/).map(Number);
    if (f.length < 11) continue;
    out.push({ iface: line.slice(0, colon).trim(), rxBytes: f[0]!, rxPackets: f[1]!, rxErrors: f[2]!, txBytes: f[8]!, txPackets: f[9]!, txErrors: f[10]! });
  }
  return out;
}

/**
 * /proc/<pid>/stat: "pid (comm) state ppid pgrp session ... utime stime cutime cstime ... rss ...".
 * comm may hold spaces and parentheses, so fields are counted after the last ')'.
 */
export function parsePidStat(text: string): { pgrp: number; ticks: number; rssPages: number } | null {
  const end = text.lastIndexOf(')');
  if (end < 0) return null;
  const f = text.slice(end + 2).split(' ');
  // f[0] is field 3 (state): pgrp is field 5, utime 14, stime 15, rss 24
  const pgrp = Number(f[2]);
  const ticks = Number(f[11]) + Number(f[12]);
  const rssPages = Number(f[21]);
  if (!Number.isFinite(pgrp) || !Number.isFinite(ticks)) return null;
  return { pgrp, ticks, rssPages: Number.isFinite(rssPages) ? rssPages : 0 };
}

/**
 * The kernel's page size, without a native call: VmRSS (kB) over the resident page count
 * of the same process read at once, rounded to a power of two. 4 KiB on x86 and the Pi 4,
 * 16 KiB on the Pi 5's default kernel, 4 or 64 KiB on Jetson kernels.
 */
export function pageSize(procRoot = '/proc'): number {
  for (let i = 0; i < 3; i++) {
    const statm = read(join(procRoot, 'self', 'statm'));
    const status = read(join(procRoot, 'self', 'status'));
    const pages = Number(statm?.split(' ')[1]);
    const kb = Number(/VmRSS:\s+(\d+)/.exec(status ?? '')?.[1]);
    if (pages > 0 && kb > 0) {
      const p = 2 ** Math.round(Math.log2((kb * 1024) / pages));
      if (p >= 4096 && p <= 65536) return p;
    }
  }
  return 4096;
}

/** The supervisor's health (a status string, or { status }); null for an app without a health check ('none'). */
function healthOf(h: unknown): string | null {
  const status = typeof h === 'string' ? h : h && typeof h === 'object' && 'status' in h ? (h as { status: unknown }).status : null;
  return typeof status === 'string' && status !== 'none' ? status : null;
}

/**
 * Per-app CPU and memory over each app's whole process group. Apps run in their own
 * group (the supervisor spawns them detached), so the group id is the leader's pid.
 *
 * Finding a group's members needs a pass over every /proc/<pid>/stat (about 2 ms for 120
 * processes here, 0.2% of a core if done every second). So the full pass runs every
 * `fullScanMs` (10 s), and at once when an app (re)started; in between only the known
 * members' stat files are read. A process an app starts between two full passes is found
 * by the next one: its CPU time is not lost (a process seen for the first time counts in
 * full, it started after the previous pass), it only shows up to 10 s late.
 *
 * CPU is the sum of per-process tick deltas: a process that ended during the period loses
 * its last partial period. Children's cutime/cstime are not used, since adding them would
 * count a reaped child twice.
 */
export class AppMetrics {
  private prev = new Map<number, { ticks: number; pgrp: number }>();
  private prevAt = 0;
  private lastFullScan = 0;
  private readonly page: number;
  private readonly cpuTotal = new Map<string, number>();
  /** full passes over /proc so far (for tests and the curious) */
  fullScans = 0;

  constructor(
    private readonly procRoot = '/proc',
    private readonly fullScanMs = 10_000,
  ) {
    this.page = pageSize(procRoot);
  }

  sample(apps: readonly AppLike[], now = Date.now()): AppSnapshot[] {
    const groups = new Map<number, { processes: number; dticks: number; rssPages: number; fresh: boolean }>();
    for (const a of apps) if (a.pid !== null && a.pid > 0) groups.set(a.pid, { processes: 0, dticks: 0, rssPages: 0, fresh: !this.prev.has(a.pid) });
    const next = new Map<number, { ticks: number; pgrp: number }>();
    const visit = (pid: number, text: string | null) => {
      if (!text) return; // exited
      const s = parsePidStat(text);
      if (!s) return;
      const g = groups.get(s.pgrp);
      if (!g) return;
      next.set(pid, { ticks: s.ticks, pgrp: s.pgrp });
      const before = this.prev.get(pid);
      g.processes++;
      g.rssPages += s.rssPages;
      g.dticks += before && before.pgrp === s.pgrp ? Math.max(0, s.ticks - before.ticks) : s.ticks;
    };
    const newLeader = [...groups.values()].some((g) => g.fresh);
    if (groups.size > 0 && (newLeader || now - this.lastFullScan >= this.fullScanMs)) {
      this.fullScans++;
      this.lastFullScan = now;
      let entries: string[] = [];
      try {
        entries = readdirSync(this.procRoot);
      } catch {
        // no /proc: report zeros
      }
      for (const e of entries) {
        const c = e.charCodeAt(0);
        if (c < 48 || c > 57) continue; // only numeric entries are processes
        visit(Number(e), read(join(this.procRoot, e, 'stat')));
      }
    } else if (groups.size > 0) {
      for (const pid of this.prev.keys()) visit(pid, read(join(this.procRoot, String(pid), 'stat')));
    }
    const elapsedS = this.prevAt ? (now - this.prevAt) / 1000 : 0;
    this.prev = next;
    this.prevAt = now;
    const names = new Set(apps.map((a) => a.name));
    for (const k of this.cpuTotal.keys()) if (!names.has(k)) this.cpuTotal.delete(k);
    return apps.map((a) => {
      const g = a.pid !== null ? groups.get(a.pid) : undefined;
      const cpu = g && !g.fresh && elapsedS > 0 ? Math.round((1000 * g.dticks) / CLK_TCK / elapsedS) / 10 : null;
      const total = (this.cpuTotal.get(a.name) ?? 0) + (g?.dticks ?? 0) / CLK_TCK;
      this.cpuTotal.set(a.name, total);
      return {
        name: a.name,
        pgid: g && g.processes > 0 ? a.pid : null,
        processes: g?.processes ?? 0,
        cpuPercent: cpu,
        cpuSecondsTotal: Math.round(total * 100) / 100,
        rssBytes: (g?.rssPages ?? 0) * this.page,
        restarts: a.restarts,
        running: a.state === 'running',
        health: healthOf(a.health),
      };
    });
  }
}

/** Device-wide figures from /proc and /sys. */
export class DeviceMetrics {
  private readonly procRoot: string;
  private readonly sysRoot: string;
  private readonly includeLoopback: boolean;
  private prevCpu: { idle: number; total: number; cpus: number } | null;
  private prevNet = new Map<string, { rx: number; tx: number; rxp: number; txp: number; t: number }>();
  private diskAt = 0;
  private disks: DiskSnapshot[] = [];
  private readonly zones: Array<{ zone: string; type: string }>;

  constructor(private readonly opts: MetricsReaderOptions) {
    this.procRoot = opts.procRoot ?? '/proc';
    this.sysRoot = opts.sysRoot ?? '/sys';
    this.includeLoopback = opts.includeLoopback ?? false;
    this.prevCpu = readCpuTimes(this.procRoot);
    this.zones = listThermalZones(this.sysRoot);
  }

  /** Thermal zones found at start (empty when the device has none: nothing is made up). */
  get thermalZones(): ReadonlyArray<{ zone: string; type: string }> {
    return this.zones;
  }

  sample(now = Date.now()): DeviceSnapshot {
    const cur = readCpuTimes(this.procRoot);
    let cpuUtil: number | null = null;
    if (cur && this.prevCpu && cur.total > this.prevCpu.total) {
      cpuUtil = Math.round(1000 * (1 - (cur.idle - this.prevCpu.idle) / (cur.total - this.prevCpu.total))) / 10;
      cpuUtil = Math.min(100, Math.max(0, cpuUtil));
    }
    this.prevCpu = cur;
    const mem = parseMeminfo(read(join(this.procRoot, 'meminfo')) ?? '');
    const load = (read(join(this.procRoot, 'loadavg')) ?? '0 0 0').split(' ').map(Number);
    const uptimeS = Number((read(join(this.procRoot, 'uptime')) ?? '0').split(' ')[0]);

    if (now - this.diskAt >= DISK_EVERY_MS || this.diskAt === 0) {
      this.disks = [];
      for (const path of new Set(this.opts.diskPaths)) {
        try {
          const s = statfsSync(path);
          this.disks.push({ path, totalBytes: s.blocks * s.bsize, availBytes: s.bavail * s.bsize, freeBytes: s.bfree * s.bsize });
        } catch {
          // the path is gone (state dir removed under us): leave it out rather than report zeros
        }
      }
      this.diskAt = now;
    }

    const net: NetSnapshot[] = [];
    const seen = new Set<string>();
    for (const n of parseNetDev(read(join(this.procRoot, 'net', 'dev')) ?? '')) {
      if (n.iface === 'lo' && !this.includeLoopback) continue;
      seen.add(n.iface);
      const p = this.prevNet.get(n.iface);
      const dt = p ? (now - p.t) / 1000 : 0;
      // a counter that went down was reset (interface re-created, 32-bit wrap): no rate this time
      const rate = (cur: number, before: number | undefined) => (p && dt > 0 && before !== undefined && cur >= before ? Math.round((cur - before) / dt) : null);
      net.push({
        ...n,
        rxBytesPerS: rate(n.rxBytes, p?.rx),
        txBytesPerS: rate(n.txBytes, p?.tx),
        rxPacketsPerS: rate(n.rxPackets, p?.rxp),
        txPacketsPerS: rate(n.txPackets, p?.txp),
      });
      this.prevNet.set(n.iface, { rx: n.rxBytes, tx: n.txBytes, rxp: n.rxPackets, txp: n.txPackets, t: now });
    }
    for (const k of this.prevNet.keys()) if (!seen.has(k)) this.prevNet.delete(k);

    const thermal: ThermalSnapshot[] = [];
    for (const z of this.zones) {
      // some zones answer EIO/ENODATA while their sensor is off: skip them for this sample
      const text = read(join(this.sysRoot, 'class', 'thermal', z.zone, 'temp'))?.trim();
      if (text && Number.isFinite(Number(text))) thermal.push({ ...z, celsius: Number(text) / 1000 });
    }

    const stateDisk = this.disks.find((d) => d.path === this.opts.diskPaths[0]) ?? null;
    return {
      t: now,
      cpuUtil,
      cpus: cur?.cpus ?? 0,
      load1: load[0] ?? 0,
      load5: load[1] ?? 0,
      load15: load[2] ?? 0,
      memTotal: mem.total,
      memAvailable: mem.available,
      swapTotal: mem.swapTotal,
      swapFree: mem.swapFree,
      uptimeS,
      diskTotal: stateDisk?.totalBytes ?? null,
      diskFree: stateDisk?.availBytes ?? null,
      disks: this.disks,
      net,
      thermal,
    };
  }
}

function listThermalZones(sysRoot: string): Array<{ zone: string; type: string }> {
  const dir = join(sysRoot, 'class', 'thermal');
  let names: string[];
  try {
    names = readdirSync(dir).filter((n) => /^thermal_zone\d+$/.test(n));
  } catch {
    return [];
  }
  names.sort((a, b) => Number(a.slice(12)) - Number(b.slice(12)));
  return names.map((zone) => ({ zone, type: (read(join(dir, zone, 'type')) ?? '').trim() || zone }));
}

/** The kernel counters of a network interface that /metrics exposes as Prometheus counters. */
const NET_COUNTERS = [
  ['rxBytes', 'fleet_device_network_receive_bytes_total', 'Bytes received by the interface'],
  ['txBytes', 'fleet_device_network_transmit_bytes_total', 'Bytes sent by the interface'],
  ['rxPackets', 'fleet_device_network_receive_packets_total', 'Packets received by the interface'],
  ['txPackets', 'fleet_device_network_transmit_packets_total', 'Packets sent by the interface'],
  ['rxErrors', 'fleet_device_network_receive_errors_total', 'Receive errors of the interface'],
  ['txErrors', 'fleet_device_network_transmit_errors_total', 'Transmit errors of the interface'],
] as const;

export interface MetricsSample {
  device: DeviceSnapshot;
  apps: AppSnapshot[];
}

/**
 * Device + app metrics, sampled together at the agent's sample period. Holds the latest
 * sample for /metrics and the status API, turns samples into telemetry, and keeps the
 * Prometheus counters in step with the kernel's counters.
 */
export class MetricsCollector {
  readonly device: DeviceMetrics;
  readonly appMetrics: AppMetrics;
  last: MetricsSample;
  private readonly counters: Array<{ key: (typeof NET_COUNTERS)[number][0]; counter: Counter }> = [];
  private appCpuCounter: Counter | null = null;
  /** what the Prometheus counters have been advanced to, per series */
  private readonly exported = new Map<string, number>();

  constructor(
    opts: MetricsReaderOptions,
    private readonly apps: () => readonly AppLike[],
  ) {
    this.device = new DeviceMetrics(opts);
    this.appMetrics = new AppMetrics(opts.procRoot, opts.appScanMs);
    this.last = { device: this.device.sample(), apps: this.appMetrics.sample(apps()) };
  }

  sample(now = Date.now()): MetricsSample {
    this.last = { device: this.device.sample(now), apps: this.appMetrics.sample(this.apps(), now) };
    this.advanceCounters();
    return this.last;
  }

  /**
   * Counters follow the kernel's (and the app CPU) totals: advanced by the difference
   * since the last sample; a total that went down (interface re-created, a new app run)
   * counts from zero again, which Prometheus' rate() reads as a counter reset.
   */
  private advanceCounters(): void {
    const advance = (counter: Counter, labels: Record<string, string>, series: string, value: number) => {
      const before = this.exported.get(series);
      const by = before === undefined || value < before ? value : value - before;
      this.exported.set(series, value);
      if (by > 0 || before === undefined) counter.inc(labels, by);
    };
    for (const n of this.last.device.net) for (const c of this.counters) advance(c.counter, { iface: n.iface }, `${c.key}/${n.iface}`, n[c.key]);
    if (this.appCpuCounter) for (const a of this.last.apps) advance(this.appCpuCounter, { app: a.name }, `cpu/${a.name}`, a.cpuSecondsTotal);
  }

  /** Telemetry samples of one sampling round (SenML-style names and units). */
  toSamples(s: MetricsSample = this.last): Sample[] {
    const d = s.device;
    const t = d.t;
    const out: Sample[] = [
      { n: 'load.1m', v: d.load1, t },
      { n: 'load.5m', v: d.load5, t },
      { n: 'load.15m', v: d.load15, t },
      { n: 'mem.used', v: d.memTotal - d.memAvailable, u: 'B', t },
      { n: 'mem.total', v: d.memTotal, u: 'B', t },
      { n: 'swap.used', v: d.swapTotal - d.swapFree, u: 'B', t },
      { n: 'uptime', v: d.uptimeS, u: 's', t },
    ];
    if (d.cpuUtil !== null) out.push({ n: 'cpu.util', v: d.cpuUtil, u: '%', t });
    if (d.diskFree !== null) out.push({ n: 'disk.free', v: d.diskFree, u: 'B', t });
    d.disks.forEach((k, i) => {
      const role = i === 0 ? 'state' : k.path === '/' ? 'root' : `path${i}`;
      out.push({ n: `disk.${role}.avail`, v: k.availBytes, u: 'B', t }, { n: `disk.${role}.total`, v: k.totalBytes, u: 'B', t });
    });
    for (const n of d.net) {
      // an interface that never carried a byte (a down port, ifb/dummy devices) is on /metrics only
      if (n.rxBytes === 0 && n.txBytes === 0) continue;
      if (n.rxBytesPerS !== null) out.push({ n: `net.${n.iface}.rx`, v: n.rxBytesPerS, u: 'B/s', t });
      if (n.txBytesPerS !== null) out.push({ n: `net.${n.iface}.tx`, v: n.txBytesPerS, u: 'B/s', t });
      if (n.rxPacketsPerS !== null) out.push({ n: `net.${n.iface}.rx.packets`, v: n.rxPacketsPerS, u: '1/s', t });
      if (n.txPacketsPerS !== null) out.push({ n: `net.${n.iface}.tx.packets`, v: n.txPacketsPerS, u: '1/s', t });
    }
    for (const z of d.thermal) out.push({ n: `temp.${z.zone}`, v: z.celsius, u: 'Cel', t });
    for (const a of s.apps) {
      if (a.cpuPercent !== null) out.push({ n: `app.${a.name}.cpu`, v: a.cpuPercent, u: '%', t });
      if (a.running) out.push({ n: `app.${a.name}.rss`, v: a.rssBytes, u: 'B', t });
    }
    return out;
  }

  /** Slow-moving app figures, once per telemetry batch. */
  appStateSamples(t = Date.now()): Sample[] {
    const out: Sample[] = [];
    for (const a of this.last.apps) {
      out.push({ n: `app.${a.name}.up`, vb: a.running, t }, { n: `app.${a.name}.restarts`, v: a.restarts, t });
      if (a.health !== null) out.push({ n: `app.${a.name}.health`, vs: a.health, t });
    }
    return out;
  }

  /** The device and per-app families on /metrics (Prometheus names with units). */
  register(m: MetricsRegistry): void {
    const dev = () => this.last.device;
    const apps = () => this.last.apps;
    m.gaugeFn('fleet_device_cpu_utilization_percent', 'Device CPU utilisation over the last sample period, percent of all CPUs', () => dev().cpuUtil ?? 0);
    m.gaugeFn('fleet_device_cpus', 'CPUs the kernel reports online', () => dev().cpus);
    m.gaugeFn('fleet_device_load1', 'One-minute load average', () => dev().load1);
    m.gaugeFn('fleet_device_load5', 'Five-minute load average', () => dev().load5);
    m.gaugeFn('fleet_device_load15', 'Fifteen-minute load average', () => dev().load15);
    m.gaugeFn('fleet_device_memory_total_bytes', 'Device memory (MemTotal)', () => dev().memTotal);
    m.gaugeFn('fleet_device_memory_available_bytes', 'Memory available for new work without swapping (MemAvailable)', () => dev().memAvailable);
    m.gaugeFn('fleet_device_memory_used_bytes', 'Device memory in use (total - available)', () => dev().memTotal - dev().memAvailable);
    m.gaugeFn('fleet_device_swap_total_bytes', 'Swap space', () => dev().swapTotal);
    m.gaugeFn('fleet_device_swap_free_bytes', 'Unused swap space', () => dev().swapFree);
    m.gaugeFn('fleet_device_uptime_seconds', 'Seconds since the device booted', () => dev().uptimeS);
    m.gaugeFn('fleet_device_filesystem_size_bytes', 'Size of the file system holding the path', () => dev().disks.map((d) => ({ labels: { path: d.path }, value: d.totalBytes })));
    m.gaugeFn('fleet_device_filesystem_avail_bytes', 'Space left for unprivileged writers on the file system holding the path', () => dev().disks.map((d) => ({ labels: { path: d.path }, value: d.availBytes })));
    m.gaugeFn('fleet_device_filesystem_free_bytes', 'Free space including the root reserve on the file system holding the path', () => dev().disks.map((d) => ({ labels: { path: d.path }, value: d.freeBytes })));
    for (const [key, name, help] of NET_COUNTERS) this.counters.push({ key, counter: m.counter(name, help) });
    m.gaugeFn('fleet_device_network_receive_bytes_per_second', 'Receive rate of the interface over the last sample period', () =>
      dev().net.flatMap((n) => (n.rxBytesPerS === null ? [] : [{ labels: { iface: n.iface }, value: n.rxBytesPerS }])),
    );
    m.gaugeFn('fleet_device_network_transmit_bytes_per_second', 'Transmit rate of the interface over the last sample period', () =>
      dev().net.flatMap((n) => (n.txBytesPerS === null ? [] : [{ labels: { iface: n.iface }, value: n.txBytesPerS }])),
    );
    m.gaugeFn('fleet_device_temperature_celsius', 'Temperature of a thermal zone (/sys/class/thermal); absent when the device has none', () =>
      dev().thermal.map((z) => ({ labels: { zone: z.zone, type: z.type }, value: z.celsius })),
    );
    m.gaugeFn('fleet_agent_app_cpu_utilization_percent', "CPU used by the app's whole process group over the last sample period, percent of one core", () =>
      apps().map((a) => ({ labels: { app: a.name }, value: a.cpuPercent ?? 0 })),
    );
    this.appCpuCounter = m.counter('fleet_agent_app_cpu_seconds_total', "CPU time of the app's whole process group since the agent started it");
    m.gaugeFn('fleet_agent_app_memory_rss_bytes', "Resident memory summed over the app's process group (shared pages count once per process)", () =>
      apps().map((a) => ({ labels: { app: a.name }, value: a.rssBytes })),
    );
    m.gaugeFn('fleet_agent_app_processes', "Processes in the app's process group", () => apps().map((a) => ({ labels: { app: a.name }, value: a.processes })));
    m.gaugeFn('fleet_agent_app_healthy', '1 when the app passes its health check, 0 when it fails; absent for apps without one', () =>
      apps().flatMap((a) => (a.health === null ? [] : [{ labels: { app: a.name }, value: a.health === 'healthy' ? 1 : 0 }])),
    );
    // the agent's own footprint (the idle budget is 60 MB RSS, 1% of a core: scripts/bench/agent-idle.mjs)
    m.gaugeFn('fleet_agent_process_resident_memory_bytes', 'Resident memory of the agent process itself (apps not included)', () => process.memoryUsage.rss());
    m.gaugeFn('fleet_agent_process_heap_bytes', 'V8 heap of the agent process: used and total (reserved by V8)', () => {
      const u = process.memoryUsage();
      return [
        { labels: { kind: 'used' }, value: u.heapUsed },
        { labels: { kind: 'total' }, value: u.heapTotal },
        { labels: { kind: 'external' }, value: u.external },
      ];
    });
    this.advanceCounters();
  }
}

export type InventoryData = Record<string, unknown>;

export interface InventoryOptions {
  /** how the inventory is gathered (default: defaultInventoryCollector()) */
  collect?: () => Promise<InventoryData>;
  /** refresh period, ms (default one hour); 0 disables the timer */
  everyMs?: number;
  /** refresh on SIGHUP too (default true) */
  onSighup?: boolean;
  /** called with the first inventory and whenever a refresh finds it changed */
  onChange?: (inv: InventoryData) => void;
  onError?: (err: unknown) => void;
}

/**
 * The device's inventory through systeminformation: OS, kernel, model, CPU, memory,
 * network interfaces. Gathered at start, every hour and on SIGHUP, never per second.
 * systeminformation is imported on first use, so a command that never asks for the
 * inventory never loads it.
 */
export class Inventory {
  current: InventoryData | null = null;
  private timer: NodeJS.Timeout | null = null;
  private running: Promise<void> | null = null;
  private stopped = false;
  private readonly hup = () => void this.refresh();

  constructor(private readonly opts: InventoryOptions = {}) {}

  start(): void {
    this.stopped = false;
    void this.refresh();
    const every = this.opts.everyMs ?? 3_600_000;
    if (every > 0) {
      this.timer = setInterval(() => void this.refresh(), every);
      this.timer.unref();
    }
    if (this.opts.onSighup ?? true) process.on('SIGHUP', this.hup);
  }

  /** Gather again; resolves when done (a refresh already under way is shared). */
  refresh(): Promise<void> {
    if (this.stopped) return Promise.resolve();
    this.running ??= (async () => {
      try {
        const inv = await (this.opts.collect ?? defaultInventoryCollector())();
        // stopped meanwhile: what it reports to (the agent's outbox) may be closed
        if (this.stopped) return;
        const changed = JSON.stringify(inv) !== JSON.stringify(this.current);
        this.current = inv;
        if (changed) this.opts.onChange?.(inv);
      } catch (err) {
        if (!this.stopped) this.opts.onError?.(err);
      } finally {
        this.running = null;
      }
    })();
    return this.running;
  }

  /** No refresh after this; one under way reports nothing (its systeminformation children end by themselves). */
  stop(): void {
    this.stopped = true;
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
    process.off('SIGHUP', this.hup);
  }
}

/**
 * The single binary gathers the inventory in a child process, itself run as
 * `fleetlet agent inventory`, so systeminformation is never evaluated in the long-running
 * agent (measured: about 1 MiB of the idle agent's RSS, scripts/bench/README.md); once an
 * hour that costs one short-lived process. From source (tests, development) it stays in
 * process.
 */
export function defaultInventoryCollector(): () => Promise<InventoryData> {
  return isSea() ? () => collectInventoryInChild(process.execPath, ['agent', 'inventory']) : collectInventory;
}

/** Runs `command args…`, which prints the inventory as one JSON object. */
export function collectInventoryInChild(command: string, args: string[], timeoutMs = 60_000): Promise<InventoryData> {
  return new Promise((resolve, reject) => {
    execFile(command, args, { encoding: 'utf8', timeout: timeoutMs, maxBuffer: 4 * 1024 * 1024 }, (err, stdout, stderr) => {
      if (err) return reject(new Error(`inventory child ${command} ${args.join(' ')} failed: ${err.message}${stderr ? `: ${stderr.trim().slice(-500)}` : ''}`, { cause: err }));
      try {
        const inv = JSON.parse(stdout) as unknown;
        if (!inv || typeof inv !== 'object' || Array.isArray(inv)) throw new Error('not a JSON object');
        resolve(inv as InventoryData);
      } catch (e) {
        reject(new Error(`inventory child ${command} printed no inventory: ${(e as Error).message}`, { cause: e }));
      }
    });
  });
}

/** The inventory through systeminformation (loaded here, on first use). */
export async function collectInventory(): Promise<InventoryData> {
  const { default: si } = await import('systeminformation');
  const [os, sys, cpu, mem, ifaces] = await Promise.all([si.osInfo(), si.system(), si.cpu(), si.mem(), si.networkInterfaces()]);
  const list = Array.isArray(ifaces) ? ifaces : [ifaces];
  return {
    os: `${os.distro} ${os.release}`.trim(),
    kernel: os.kernel,
    arch: os.arch,
    hostname: os.hostname,
    model: sys.model,
    manufacturer: sys.manufacturer,
    serial: sys.serial || undefined,
    cpu: { brand: `${cpu.manufacturer} ${cpu.brand}`.trim(), cores: cpu.cores, physicalCores: cpu.physicalCores },
    memTotal: mem.total,
    interfaces: list.filter((i) => !i.internal).map((i) => ({ iface: i.iface, mac: i.mac, ip4: i.ip4 || undefined, ip6: i.ip6 || undefined, speedMbps: i.speed ?? undefined })),
    thermalZones: listThermalZones('/sys'),
  };
}
