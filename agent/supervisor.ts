import { spawn, type ChildProcess } from 'node:child_process';
import { EventEmitter } from 'node:events';
import { createInterface } from 'node:readline';
import type { Logger } from '../core/log.ts';
import { backoffDelay, DEFAULT_BACKOFF, type BackoffPolicy } from './backoff.ts';
import type { AppSpec } from './config.ts';
import { planApps, type Executors, type Step } from './plan.ts';

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
}

export interface SupervisorOptions {
  log: Logger;
  backoff?: BackoffPolicy;
  /** restarts within `crashLoopWindowMs` that mark an app as crash-looping */
  crashLoopRestarts?: number;
  crashLoopWindowMs?: number;
  /** lines of output kept per app for the API */
  logLines?: number;
  now?: () => number;
}

const MAX_LINE = 8192;

/** One supervised app: its own process group, restart policy, backoff, output ring. */
export class SupervisedApp extends EventEmitter {
  state: AppState = 'stopped';
  child: ChildProcess | null = null;
  restarts = 0;
  startedAt: number | null = null;
  lastExit: AppStatus['lastExit'] = null;
  readonly lines: LogLine[] = [];
  private consecutive = 0;
  private recentRestarts: number[] = [];
  private timer: NodeJS.Timeout | null = null;
  private wanted = false;

  constructor(
    public spec: AppSpec,
    private readonly opts: Required<Omit<SupervisorOptions, 'log'>> & { log: Logger },
  ) {
    super();
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
    let child: ChildProcess;
    try {
      child = spawn(spec.command, spec.args, {
        cwd: spec.cwd,
        env: { ...process.env, ...spec.env },
        // its own process group, so stop() can signal the app and everything it started
        detached: true,
        stdio: ['ignore', 'pipe', 'pipe'],
      });
    } catch (err) {
      this.onExit(null, null, err as Error);
      return;
    }
    this.child = child;
    this.startedAt = opts.now();
    child.once('spawn', () => {
      this.state = 'running';
      this.emit('change', this.status());
    });
    child.once('error', (err) => {
      // spawn failure (ENOENT, EACCES): no 'exit' follows
      if (child.pid === undefined) this.onExit(null, null, err);
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
    this.emit('line', rec);
  }

  private onExit(code: number | null, signal: NodeJS.Signals | null, err?: Error): void {
    const now = this.opts.now();
    const upMs = this.startedAt ? now - this.startedAt : 0;
    this.child = null;
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
    if (upMs >= this.opts.backoff.resetAfterMs) this.consecutive = 0;
    const delay = backoffDelay(this.opts.backoff, this.consecutive++);
    this.recentRestarts = [...this.recentRestarts.filter((t) => now - t < this.opts.crashLoopWindowMs), now];
    const looping = this.recentRestarts.length >= this.opts.crashLoopRestarts;
    if (looping && this.state !== 'crash-loop') this.emit('crash-loop', { app: this.spec.name, restarts: this.recentRestarts.length, windowMs: this.opts.crashLoopWindowMs });
    this.state = looping ? 'crash-loop' : 'backoff';
    this.emit('change', this.status());
    this.timer = setTimeout(() => {
      this.timer = null;
      if (!this.wanted) return;
      this.restarts++;
      this.spawnChild();
    }, delay);
  }

  /** SIGTERM to the whole process group, SIGKILL after the grace period. */
  async stop(): Promise<void> {
    this.wanted = false;
    if (this.timer) {
      clearTimeout(this.timer);
      this.timer = null;
    }
    const child = this.child;
    if (!child || child.pid === undefined) {
      this.state = 'stopped';
      return;
    }
    this.state = 'stopping';
    const exited = new Promise<void>((r) => this.once('stopped', r));
    const pgid = child.pid;
    killGroup(pgid, 'SIGTERM');
    const t = setTimeout(() => killGroup(pgid, 'SIGKILL'), this.spec.stopTimeoutMs);
    await exited;
    clearTimeout(t);
    killGroup(pgid, 'SIGKILL'); // anything of the group that outlived its leader
  }

  /** Stop then start; counts as a restart. */
  async restart(): Promise<void> {
    await this.stop();
    this.restarts++;
    this.consecutive = 0;
    this.start();
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
  private readonly opts: Required<Omit<SupervisorOptions, 'log'>> & { log: Logger };
  private readonly executors: Executors;

  constructor(options: SupervisorOptions) {
    super();
    this.opts = {
      log: options.log,
      backoff: options.backoff ?? DEFAULT_BACKOFF,
      crashLoopRestarts: options.crashLoopRestarts ?? 5,
      crashLoopWindowMs: options.crashLoopWindowMs ?? 60_000,
      logLines: options.logLines ?? 500,
      now: options.now ?? Date.now,
    };
    this.executors = {
      start: async ({ spec }) => {
        const app = new SupervisedApp(spec, this.opts);
        app.on('change', (s: AppStatus) => this.emit('change', s));
        app.on('line', (l: LogLine) => this.emit('line', l));
        app.on('crash-loop', (e: unknown) => this.emit('crash-loop', e));
        this.apps.set(spec.name, app);
        app.start();
      },
      stop: async ({ name }) => {
        await this.apps.get(name)?.stop();
        this.apps.delete(name);
      },
      replace: async ({ spec }) => {
        await this.executors.stop({ kind: 'stop', name: spec.name });
        await this.executors.start({ kind: 'start', spec });
      },
    };
  }

  async apply(desired: readonly AppSpec[]): Promise<Step[]> {
    const steps = planApps(this.apps, desired);
    for (const step of steps) {
      this.opts.log.info('supervisor step', { kind: step.kind, app: step.kind === 'stop' ? step.name : step.spec.name });
      await (this.executors[step.kind] as (s: Step) => Promise<void>)(step);
    }
    return steps;
  }

  status(): AppStatus[] {
    return [...this.apps.values()].map((a) => a.status());
  }

  async stopAll(): Promise<void> {
    await this.apply([]);
  }
}
