import { readFileSync, statfsSync } from 'node:fs';
import type { Sample } from '../core/messages.ts';

/**
 * Per-second device figures read straight from /proc: far cheaper than calling
 * systeminformation at 1 Hz (FACTS.md: ~3.8% of a core, mostly `df` spawns).
 * systeminformation is used for the inventory, once at start.
 */
export interface DeviceSnapshot {
  t: number;
  cpuUtil: number | null;
  load1: number;
  memTotal: number;
  memAvailable: number;
  uptimeS: number;
  diskTotal: number | null;
  diskFree: number | null;
}

function readCpuTimes(): { idle: number; total: number } | null {
  try {
    const line = readFileSync('/proc/stat', 'utf8').split('\n', 1)[0]!;
    const f = line.trim().split(/\s+/).slice(1).map(Number);
    const idle = (f[3] ?? 0) + (f[4] ?? 0);
    return { idle, total: f.reduce((a, b) => a + b, 0) };
  } catch {
    return null;
  }
}

function meminfo(): { total: number; available: number } {
  const text = readFileSync('/proc/meminfo', 'utf8');
  const kb = (key: string) => Number(new RegExp(`^${key}:\\s+(\\d+)`, 'm').exec(text)?.[1] ?? 0) * 1024;
  return { total: kb('MemTotal'), available: kb('MemAvailable') };
}

export class DeviceMetrics {
  private prev = readCpuTimes();
  private diskAt = 0;
  private disk: { total: number; free: number } | null = null;

  constructor(private readonly diskPath: string) {}

  sample(now = Date.now()): DeviceSnapshot {
    const cur = readCpuTimes();
    let cpuUtil: number | null = null;
    if (cur && this.prev && cur.total > this.prev.total) {
      cpuUtil = 100 * (1 - (cur.idle - this.prev.idle) / (cur.total - this.prev.total));
    }
    this.prev = cur;
    const mem = meminfo();
    const load1 = Number(readFileSync('/proc/loadavg', 'utf8').split(' ')[0]);
    const uptimeS = Number(readFileSync('/proc/uptime', 'utf8').split(' ')[0]);
    // disk changes slowly: statfs every 30 s is plenty (one syscall, no `df` spawn)
    if (now - this.diskAt > 30_000) {
      try {
        const s = statfsSync(this.diskPath);
        this.disk = { total: s.blocks * s.bsize, free: s.bavail * s.bsize };
      } catch {
        this.disk = null;
      }
      this.diskAt = now;
    }
    return {
      t: now,
      cpuUtil: cpuUtil === null ? null : Math.round(cpuUtil * 10) / 10,
      load1,
      memTotal: mem.total,
      memAvailable: mem.available,
      uptimeS,
      diskTotal: this.disk?.total ?? null,
      diskFree: this.disk?.free ?? null,
    };
  }
}

export function snapshotToSamples(s: DeviceSnapshot): Sample[] {
  const out: Sample[] = [
    { n: 'load.1m', v: s.load1, t: s.t },
    { n: 'mem.used', v: s.memTotal - s.memAvailable, u: 'B', t: s.t },
    { n: 'mem.total', v: s.memTotal, u: 'B', t: s.t },
    { n: 'uptime', v: s.uptimeS, u: 's', t: s.t },
  ];
  if (s.cpuUtil !== null) out.push({ n: 'cpu.util', v: s.cpuUtil, u: '%', t: s.t });
  if (s.diskFree !== null) out.push({ n: 'disk.free', v: s.diskFree, u: 'B', t: s.t });
  return out;
}
