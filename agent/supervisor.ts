import { spawn, type ChildProcess } from 'node:child_process';
import { EventEmitter } from 'node:events';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { FleetError } from '../core/errors.ts';
import type { Logger } from '../core/log.ts';
import { backoffDelay, DEFAULT_BACKOFF, RestartTracker, type BackoffPolicy } from './backoff.ts';
import type { AppSpec } from './config.ts';
import { HealthMonitor, type HealthProbe, type HealthSpec, type HealthStatus } from './health.ts';
import { joinCgroup, killCgroup, prepareLimits, type CgroupInfo, type EnforcedLimits } from './limits.ts';
import { RotatingLog } from './logfiles.ts';
import { planApps, type Executors, type Step } from './plan.ts';
import { shimArgv } from './shim.ts';
import { resolveUser, type ResolvedUser } from './users.ts';

export type AppState = 'starting' | 'running' | 'backoff' | 'stopping' | 'stopped' | 'exited' | 'crash-loop';

export interface LogLine {
  t: number;
  app: string;
  stream: 'stdout' | 'stderr';
  line: string;
}

export interface AppStatus {
  name: string;
  state: AppState;
  pid: number | null;
  restarts: number;
  startedAt: number | null;
  lastExit: { code: number | null; signal: string | null; at: number } | null;
  restart: AppSpec['restart'];
  command: string;
  /** the app is restarting too often (also while it is briefly up between crashes) */
  crashLoop: boolean;
  health: HealthStatus;
  limits: EnforcedLimits;
  user: string | null;
  /** current log file, when logs go to files */
  logFile: string | null;
  /** why the last start failed before the app ran (bad user, cgroup, …) */
  startError: string | null;
}

export interface SupervisorOptions {
  log: Logger;
  backoff?: BackoffPolicy;
  /** restarts within `crashLoopWindowMs` that mark an app as crash-looping */
  crashLoopRestarts?: number;
  crashLoopWindowMs?: number;
  /** lines of output kept in memory per app for the API and page */
  logLines?: number;
  /** rotating log files go to <logDir>/<app>/<app>.log; none when absent */
  logDir?: string | undefined;
  /** delegated cgroup v2 for limits (agent/limits.ts detectCgroup); null: rlimit/nice fallbacks */
  cgroup?: CgroupInfo | null;
  now?: () => number;
}

type ResolvedOptions = Required<Omit<SupervisorOptions, 'log' | 'logDir' | 'cgroup'>> & { log: Logger; logDir: string | undefined; cgroup: CgroupInfo | null };

const MAX_LINE = 8192;

function healthSpec(spec: AppSpec): HealthSpec | null {
  const h = spec.health;
  if (!h) return null;
  const probe: HealthProbe =
    h.type === 'http' ? { type: 'http', url: h.url! } : h.type === 'tcp' ? { type: 'tcp', host: h.host, port: h.port! } : { type: 'exec', command: h.command!, args: h.args };
  return { probe, intervalMs: h.intervalMs, timeoutMs: h.timeoutMs, retries: h.retries, startPeriodMs: h.startPeriodMs };
}

/**
 * One supervised app. It runs through the launch shim (agent/shim.ts) in its own process
 * group, so a stop reaches everything it started and nothing outlives the agent; restart
 * policy with backoff and crash-loop detection; optional health check; output to an
 * in-memory ring (API/page) and rotating files.
 */
export class SupervisedApp extends EventEmitter {
  state: AppState = 'stopped';
  child: ChildProcess | null = null;
  restarts = 0;
  startedAt: number | null = null;
  lastExit: AppStatus['lastExit'] = null;
  readonly lines: LogLine[] = [];
  readonly file: RotatingLog | null;
  private readonly tracker: RestartTracker;
  private readonly health: HealthMonitor | null;
  private limits: EnforcedLimits;
  private user: ResolvedUser | null = null;
  private startError: string | null = null;
  private timer: NodeJS.Timeout | null = null;
  private wanted = false;
  private killTimer: NodeJS.Timeout | null = null;

  constructor(
    public spec: AppSpec,
    private readonly opts: ResolvedOptions,
  ) {
    super();
    this.tracker = new RestartTracker(opts.backoff, { restarts: opts.crashLoopRestarts, windowMs: opts.crashLoopWindowMs });
    this.file = opts.logDir ? new RotatingLog(join(opts.logDir, spec.name), spec.name, spec.logs) : null;
    this.limits = prepareLimits(spec.name, undefined, null).enforced;
    const hs = healthSpec(spec);
    this.health = hs
      ? new HealthMonitor(
          hs,
          {
            onChange: (h) => {
              this.opts.log.info('app health changed', { app: spec.name, health: h.status, error: h.lastError });
              this.emit('health', { app: spec.name, ...h });
              this.emit('change', this.status());
            },
            onUnhealthy: (reason) => this.onUnhealthy(reason),
          },
          spec.cwd,
          opts.now,
        )
      : null;
  }

  status(): AppStatus {
    return {
      name: this.spec.name,
      state: this.state,
      pid: this.child?.pid ?? null,
      restarts: this.restarts,
      startedAt: this.startedAt,
      lastExit: this.lastExit,
      restart: this.spec.restart,
      command: this.spec.command,
      crashLoop: this.tracker.crashLooping,
      health: this.health ? { ...this.health.state } : { status: 'none', failures: 0, lastCheck: null, lastError: null },
      limits: this.limits,
      user: this.spec.user ?? null,
      logFile: this.file?.path ?? null,
      startError: this.startError,
    };
  }

  start(): void {
    this.wanted = true;
    if (this.child || this.timer) return;
    this.spawnChild();
  }

  private spawnChild(): void {
    const { spec, opts } = this;
    this.state = 'starting';
    this.startError = null;
    let child: ChildProcess;
    try {
      if (spec.user !== undefined) this.user ??= resolveUser(spec.user);
      const prepared = prepareLimits(spec.name, spec.limits, opts.cgroup);
      this.limits = prepared.enforced;
      const env: NodeJS.ProcessEnv = { ...inheritedEnv(process.env), ...(this.user ? { HOME: this.user.home, USER: this.user.name, LOGNAME: this.user.name } : {}), ...spec.env };
      child = spawn('/bin/sh', shimArgv({ graceS: spec.stopTimeoutMs / 1000, ...prepared.shim }, spec.command, spec.args), {
        cwd: spec.cwd,
        env,
        // its own process group, so stop() can signal the app and everything it started
        detached: true,
        stdio: ['pipe', 'pipe', 'pipe'],
        ...(this.user ? { uid: this.user.uid, gid: this.user.gid } : {}),
      });
    } catch (err) {
      this.startError = (err as Error).message;
      this.onExit(null, null, err as Error);
      return;
    }
    this.child = child;
    this.startedAt = opts.now();
    child.stdin!.on('error', () => {}); // EPIPE when the shim is gone: its exit is handled below
    child.once('spawn', () => {
      try {
        joinCgroup(this.limits, child.pid!);
      } catch (err) {
        this.limits.notes.push(`could not join the app's cgroup: ${(err as Error).message}`);
      }
      child.stdin!.write('go\n');
      this.state = 'running';
      this.health?.start();
      this.emit('change', this.status());
    });
    child.once('error', (err) => {
      // spawn failure (ENOENT cwd, EACCES, EPERM for uid): no 'exit' follows
      if (child.pid === undefined) {
        this.startError = err.message;
        this.onExit(null, null, err);
      }
    });
    child.once('exit', (code, signal) => this.onExit(code, signal));
    for (const stream of ['stdout', 'stderr'] as const) {
      const rl = createInterface({ input: child[stream]!, crlfDelay: Infinity });
      rl.on('line', (line) => this.pushLine(stream, line));
    }
  }

  private pushLine(stream: LogLine['stream'], line: string): void {
    const rec: LogLine = { t: this.opts.now(), app: this.spec.name, stream, line: line.length > MAX_LINE ? line.slice(0, MAX_LINE) : line };
    this.lines.push(rec);
    if (this.lines.length > this.opts.logLines) this.lines.shift();
    this.file?.write(`${new Date(rec.t).toISOString()} ${stream} ${rec.line}`);
    this.emit('line', rec);
  }

  private onUnhealthy(reason: string): void {
    this.opts.log.warn('app unhealthy; restarting it', { app: this.spec.name, reason });
    this.emit('unhealthy', { app: this.spec.name, reason });
    const child = this.child;
    if (!child?.pid) return;
    // stop it like a graceful stop; onExit then applies the restart policy as for a crash
    const pgid = child.pid;
    killGroup(pgid, 'SIGTERM');
    this.killTimer = setTimeout(() => killGroup(pgid, 'SIGKILL'), this.spec.stopTimeoutMs);
  }

  private onExit(code: number | null, signal: NodeJS.Signals | null, err?: Error): void {
    const now = this.opts.now();
    const upMs = this.startedAt ? now - this.startedAt : 0;
    const pgid = this.child?.pid;
    this.child?.stdin?.destroy(); // the shim's watcher sees EOF and clears what is left of the group
    this.child = null;
    this.health?.stop();
    if (this.killTimer) clearTimeout(this.killTimer);
    this.killTimer = null;
    if (pgid !== undefined && this.state !== 'stopping') killGroup(pgid, 'SIGTERM'); // leftovers of a crashed app
    killCgroup(this.limits, false);
    this.lastExit = { code, signal, at: now };
    if (err) this.pushLine('stderr', `[fleetlet] cannot start ${this.spec.command}: ${err.message}`);
    this.opts.log.info('app exited', { app: this.spec.name, code, signal, upMs, err: err?.message });
    const failed = err !== undefined || code !== 0;
    const again = this.wanted && (this.spec.restart === 'always' || (this.spec.restart === 'on-failure' && failed));
    if (!again) {
      this.state = this.wanted ? 'exited' : 'stopped';
      this.emit('change', this.status());
      this.emit('stopped');
      return;
    }
    const d = this.tracker.onExit(now, upMs);
    if (d.enteredCrashLoop) this.emit('crash-loop', { app: this.spec.name, restarts: this.opts.crashLoopRestarts, windowMs: this.opts.crashLoopWindowMs, lastExit: this.lastExit });
    this.state = d.crashLoop ? 'crash-loop' : 'backoff';
    this.emit('change', this.status());
    this.timer = setTimeout(() => {
      this.timer = null;
      if (!this.wanted) return;
      this.restarts++;
      this.spawnChild();
    }, d.delayMs);
  }

  /** SIGTERM to the whole process group, SIGKILL after the grace period. */
  async stop(): Promise<void> {
    this.wanted = false;
    this.health?.stop();
    if (this.timer) {
      clearTimeout(this.timer);
      this.timer = null;
    }
    const child = this.child;
    if (!child || child.pid === undefined) {
      this.state = 'stopped';
      this.emit('change', this.status());
      return;
    }
    this.state = 'stopping';
    const exited = new Promise<void>((r) => this.once('stopped', r));
    const pgid = child.pid;
    killGroup(pgid, 'SIGTERM');
    const t = setTimeout(() => {
      killGroup(pgid, 'SIGKILL');
      killCgroup(this.limits, false);
    }, this.spec.stopTimeoutMs);
    await exited;
    clearTimeout(t);
    killGroup(pgid, 'SIGKILL'); // anything of the group that outlived its leader
  }

  /** Stop then start; counts as a restart and clears the crash-loop streak. */
  async restart(): Promise<void> {
    await this.stop();
    this.restarts++;
    this.tracker.reset();
    this.start();
  }

  /** Releases files and the cgroup after the app is stopped for good. */
  dispose(): void {
    this.file?.close();
    killCgroup(this.limits, true);
  }
}

function killGroup(pgid: number, signal: NodeJS.Signals): void {
  try {
    process.kill(-pgid, signal);
  } catch {
    // ESRCH: the group is gone already
  }
}

/** All apps: reconciles toward the desired list through planApps + executors. */
export class Supervisor extends EventEmitter {
  readonly apps = new Map<string, SupervisedApp>();
  private readonly opts: ResolvedOptions;
  private readonly executors: Executors;

  constructor(options: SupervisorOptions) {
    super();
    this.opts = {
      log: options.log,
      backoff: options.backoff ?? DEFAULT_BACKOFF,
      crashLoopRestarts: options.crashLoopRestarts ?? 5,
      crashLoopWindowMs: options.crashLoopWindowMs ?? 60_000,
      logLines: options.logLines ?? 500,
      logDir: options.logDir,
      cgroup: options.cgroup ?? null,
      now: options.now ?? Date.now,
    };
    this.executors = {
      start: async ({ spec }) => {
        const app = new SupervisedApp(spec, this.opts);
        app.on('change', (s: AppStatus) => this.emit('change', s));
        app.on('line', (l: LogLine) => this.emit('line', l));
        app.on('crash-loop', (e: unknown) => this.emit('crash-loop', e));
        app.on('health', (e: unknown) => this.emit('health', e));
        app.on('unhealthy', (e: unknown) => this.emit('unhealthy', e));
        this.apps.set(spec.name, app);
        app.start();
      },
      stop: async ({ name }) => {
        const app = this.apps.get(name);
        await app?.stop();
        app?.dispose();
        this.apps.delete(name);
      },
      replace: async ({ spec }) => {
        await this.executors.stop({ kind: 'stop', name: spec.name });
        await this.executors.start({ kind: 'start', spec });
      },
    };
  }

  /**
   * Reconciles toward `desired`: plan, execute, and plan again until the plan is empty. A step
   * that throws is retried with capped backoff; after `maxAttempts` the error is thrown.
   */
  async apply(desired: readonly AppSpec[], maxAttempts = 5): Promise<Step[]> {
    const done: Step[] = [];
    for (let attempt = 0; ; attempt++) {
      const steps = planApps(this.apps, desired);
      if (steps.length === 0) return done;
      try {
        for (const step of steps) {
          this.opts.log.info('supervisor step', { kind: step.kind, app: step.kind === 'stop' ? step.name : step.spec.name });
          await (this.executors[step.kind] as (s: Step) => Promise<void>)(step);
          done.push(step);
        }
      } catch (err) {
        if (attempt + 1 >= maxAttempts) throw new FleetError('FLEET_INTERNAL', `supervisor could not reach the desired apps: ${(err as Error).message}`, { cause: err });
        const delay = backoffDelay({ ...DEFAULT_BACKOFF, initialMs: 200 }, attempt);
        this.opts.log.warn('supervisor step failed; planning again', { err, attempt, delayMs: delay });
        await new Promise((r) => setTimeout(r, delay));
      }
    }
  }

  status(): AppStatus[] {
    return [...this.apps.values()].map((a) => a.status());
  }

  async stopAll(): Promise<void> {
    await this.apply([]);
  }
}

/**
 * The agent's environment as its apps inherit it: without the variables the agent's unit set
 * for the agent alone (named in FLEETLET_AGENT_ONLY_ENV, e.g. MALLOC_ARENA_MAX, docs/agent.md#install)
 * and without that list itself. An app that wants one of them sets it in its own `env`.
 */
export function inheritedEnv(env: NodeJS.ProcessEnv): NodeJS.ProcessEnv {
  const only = (env.FLEETLET_AGENT_ONLY_ENV ?? '').split(/[\s,]+/).filter(Boolean);
  if (only.length === 0 && env.FLEETLET_AGENT_ONLY_ENV === undefined) return env;
  const out = { ...env };
  for (const k of [...only, 'FLEETLET_AGENT_ONLY_ENV']) delete out[k];
  return out;
}
