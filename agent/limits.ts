import { accessSync, constants, existsSync, mkdirSync, readFileSync, rmdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { cpus } from 'node:os';
import type { Logger } from '../core/log.ts';

/**
 * Resource limits for apps (docs/agent.md#resource-limits).
 *
 * cgroup v2 when the agent may write its own cgroup (systemd `Delegate=yes`, see
 * `fleetlet agent install`): one child cgroup per app with memory.max and cpu.max, and
 * cgroup.kill to stop it. Otherwise the best available fallback, applied by the launch shim:
 * RLIMIT_DATA for memory (bounds heap and private mappings, not page cache or shared memory)
 * and `nice` for CPU priority (a priority, not a cap). What is actually enforced is reported
 * per app, so nobody mistakes a request for a guarantee.
 */
export interface LimitSpec {
  memoryMb?: number | undefined;
  /** percent of one core (200 = two cores) */
  cpuPercent?: number | undefined;
  nice?: number | undefined;
}

export type MemoryEnforcement = 'cgroup' | 'rlimit-data' | 'none';
export type CpuEnforcement = 'cgroup' | 'none';

export interface EnforcedLimits {
  memory: { requestedMb: number | null; enforced: MemoryEnforcement };
  cpu: { requestedPercent: number | null; enforced: CpuEnforcement };
  nice: number | null;
  /** the app's cgroup directory when cgroup v2 is used */
  cgroup: string | null;
  /** why a requested limit is not enforced the way it was asked */
  notes: string[];
}

/** What the launch shim must apply itself. */
export interface ShimLimits {
  dataKb?: number;
  nice?: number;
}

export interface CgroupInfo {
  /** the delegated cgroup directory in which the agent creates one child per app */
  base: string;
  controllers: Set<string>;
}

const CGROUP_ROOT = '/sys/fs/cgroup';

/**
 * Finds a writable cgroup v2 for the agent. The "no internal processes" rule means the agent
 * cannot put apps in children of a cgroup it sits in itself and also enable controllers there,
 * so it moves itself into `<own>/agent` and creates apps as `<own>/app-<name>`.
 * `root` is injectable for the test that runs against a cgroupfs laid out in a temp dir.
 */
export function detectCgroup(log: Logger, root = CGROUP_ROOT, procSelfCgroup = '/proc/self/cgroup', selfPid = process.pid): CgroupInfo | null {
  try {
    if (!existsSync(join(root, 'cgroup.controllers'))) return null; // not a v2 (unified) mount
    const line = readFileSync(procSelfCgroup, 'utf8')
      .split('\n')
      .find((l) => l.startsWith('0::'));
    if (!line) return null;
    const own = join(root, line.slice(3).trim());
    accessSync(own, constants.W_OK);
    const available = new Set(readFileSync(join(own, 'cgroup.controllers'), 'utf8').trim().split(/\s+/).filter(Boolean));
    const leaf = join(own, 'agent');
    mkdirSync(leaf, { recursive: true });
    writeFileSync(join(leaf, 'cgroup.procs'), String(selfPid));
    const wanted = ['memory', 'cpu'].filter((c) => available.has(c));
    if (wanted.length) writeFileSync(join(own, 'cgroup.subtree_control'), wanted.map((c) => `+${c}`).join(' '));
    const controllers = new Set(readFileSync(join(own, 'cgroup.subtree_control'), 'utf8').trim().split(/\s+/).filter(Boolean).map((c) => c.replace(/^\+/, '')));
    log.info('cgroup v2 delegated; app limits use cgroups', { base: own, controllers: [...controllers] });
    return { base: own, controllers };
  } catch (err) {
    log.info('no writable cgroup v2; app limits use rlimits and nice', { reason: (err as Error).message });
    return null;
  }
}

/** Decides how each requested limit is enforced; creates and configures the app's cgroup. */
export function prepareLimits(app: string, spec: LimitSpec | undefined, cg: CgroupInfo | null): { enforced: EnforcedLimits; shim: ShimLimits } {
  const enforced: EnforcedLimits = {
    memory: { requestedMb: spec?.memoryMb ?? null, enforced: 'none' },
    cpu: { requestedPercent: spec?.cpuPercent ?? null, enforced: 'none' },
    nice: spec?.nice ?? null,
    cgroup: null,
    notes: [],
  };
  const shim: ShimLimits = {};
  if (spec?.nice !== undefined) shim.nice = spec.nice;
  const useCg = cg !== null && (spec?.memoryMb !== undefined || spec?.cpuPercent !== undefined);
  if (useCg) {
    const dir = join(cg.base, `app-${app}`);
    mkdirSync(dir, { recursive: true });
    enforced.cgroup = dir;
    if (spec?.memoryMb !== undefined) {
      if (cg.controllers.has('memory')) {
        writeFileSync(join(dir, 'memory.max'), String(spec.memoryMb * 1024 * 1024));
        enforced.memory.enforced = 'cgroup';
      } else enforced.notes.push('memory controller not delegated');
    }
    if (spec?.cpuPercent !== undefined) {
      if (cg.controllers.has('cpu')) {
        const period = 100_000;
        writeFileSync(join(dir, 'cpu.max'), `${Math.max(1000, Math.round((spec.cpuPercent / 100) * period))} ${period}`);
        enforced.cpu.enforced = 'cgroup';
      } else enforced.notes.push('cpu controller not delegated');
    }
  }
  if (spec?.memoryMb !== undefined && enforced.memory.enforced === 'none') {
    shim.dataKb = spec.memoryMb * 1024;
    enforced.memory.enforced = 'rlimit-data';
    enforced.notes.push('memory: RLIMIT_DATA bounds heap and private mappings of each process, not the group total');
  }
  if (spec?.cpuPercent !== undefined && enforced.cpu.enforced === 'none') {
    enforced.notes.push(`cpu: no cgroup v2 available, ${spec.cpuPercent}% of a core is not capped${spec.nice === undefined ? '' : '; nice lowers its priority only'}`);
    if (spec.cpuPercent > cpus().length * 100) enforced.notes.push(`cpu: ${spec.cpuPercent}% exceeds the ${cpus().length} cores here`);
  }
  return { enforced, shim };
}

/** Moves a process into the app's cgroup (before the shim execs the app). */
export function joinCgroup(enforced: EnforcedLimits, pid: number): void {
  if (enforced.cgroup) writeFileSync(join(enforced.cgroup, 'cgroup.procs'), String(pid));
}

/** Kills everything in the app's cgroup (also processes that left the process group) and removes it. */
export function killCgroup(enforced: EnforcedLimits, remove: boolean): void {
  if (!enforced.cgroup) return;
  try {
    if (existsSync(join(enforced.cgroup, 'cgroup.kill'))) writeFileSync(join(enforced.cgroup, 'cgroup.kill'), '1');
  } catch {
    // the kernel before 5.14 has no cgroup.kill: the process-group kill already ran
  }
  if (remove) {
    try {
      rmdirSync(enforced.cgroup);
    } catch {
      // still has processes for a moment, or is not ours to remove: left for the next start
    }
  }
}
