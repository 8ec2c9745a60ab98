import { spawn } from 'node:child_process';
import { EventEmitter } from 'node:events';
import cron from 'node-cron';
import type { Logger } from '../core/log.ts';

/**
 * Scheduled jobs (docs/agent.md#scheduled-jobs): a cron expression runs a command or restarts
 * an app. A run never overlaps the previous one: a tick that finds the job still running is
 * skipped and counted. A command runs in its own process group and is killed (group, SIGTERM
 * then SIGKILL) when it exceeds its timeout.
 */
export interface JobSpec {
  name: string;
  schedule: string;
  timezone?: string | undefined;
  command?: string | undefined;
  args: string[];
  env: Record<string, string>;
  cwd?: string | undefined;
  uid?: number | undefined;
  gid?: number | undefined;
  restartApp?: string | undefined;
  timeoutMs: number;
}

export interface JobRun {
  startedAt: number;
  endedAt: number;
  ok: boolean;
  /** exit code, or the reason the run failed */
  result: string;
}

export interface JobStatus {
  name: string;
  schedule: string;
  action: string;
  running: boolean;
  runs: number;
  skippedOverlap: number;
  lastRun: JobRun | null;
  nextRun: string | null;
}

export interface JobHooks {
  restartApp(name: string): Promise<void>;
  /** output lines of a command job */
  line(job: string, stream: 'stdout' | 'stderr', line: string): void;
}

/** Validates a cron expression with node-cron's own parser; returns the reason when invalid. */
export function cronProblem(expr: string): string | null {
  return cron.validate(expr) ? null : `invalid cron expression "${expr}"`;
}

class Job {
  running: Promise<void> | null = null;
  runs = 0;
  skippedOverlap = 0;
  lastRun: JobRun | null = null;
  task: ReturnType<typeof cron.schedule> | null = null;
  child: ReturnType<typeof spawn> | null = null;
  constructor(readonly spec: JobSpec) {}
}

export class JobScheduler extends EventEmitter {
  private readonly jobs = new Map<string, Job>();

  constructor(
    private readonly log: Logger,
    private readonly hooks: JobHooks,
  ) {
    super();
  }

  start(specs: readonly JobSpec[]): void {
    for (const spec of specs) {
      const job = new Job(spec);
      job.task = cron.schedule(spec.schedule, () => this.tick(job), { name: spec.name, ...(spec.timezone ? { timezone: spec.timezone } : {}) });
      this.jobs.set(spec.name, job);
    }
  }

  /** Runs a job now (a cron tick, or by hand through the API); false when it was still running. */
  tick(job: Job | string): boolean {
    const j = typeof job === 'string' ? this.jobs.get(job) : job;
    if (!j) return false;
    if (j.running) {
      j.skippedOverlap++;
      this.log.warn('job still running; this tick is skipped', { job: j.spec.name, skipped: j.skippedOverlap });
      return false;
    }
    j.running = this.run(j).finally(() => (j.running = null));
    return true;
  }

  private async run(j: Job): Promise<void> {
    const startedAt = Date.now();
    j.runs++;
    let ok = false;
    let result: string;
    try {
      if (j.spec.restartApp) {
        await this.hooks.restartApp(j.spec.restartApp);
        ok = true;
        result = `restarted ${j.spec.restartApp}`;
      } else {
        const r = await this.exec(j);
        ok = r.ok;
        result = r.result;
      }
    } catch (err) {
      result = (err as Error).message;
    }
    j.lastRun = { startedAt, endedAt: Date.now(), ok, result };
    this.log[ok ? 'info' : 'warn']('job ran', { job: j.spec.name, ok, result, ms: j.lastRun.endedAt - startedAt });
    this.emit('run', { job: j.spec.name, ...j.lastRun });
  }

  private exec(j: Job): Promise<{ ok: boolean; result: string }> {
    const spec = j.spec;
    return new Promise((resolve) => {
      const child = spawn(spec.command!, spec.args, {
        cwd: spec.cwd,
        env: { ...process.env, ...spec.env },
        detached: true,
        stdio: ['ignore', 'pipe', 'pipe'],
        ...(spec.uid !== undefined ? { uid: spec.uid } : {}),
        ...(spec.gid !== undefined ? { gid: spec.gid } : {}),
      });
      j.child = child;
      let timedOut = false;
      let killTimer: NodeJS.Timeout | null = null;
      const timer = setTimeout(() => {
        timedOut = true;
        killGroup(child.pid, 'SIGTERM');
        killTimer = setTimeout(() => killGroup(child.pid, 'SIGKILL'), 5000);
      }, spec.timeoutMs);
      for (const stream of ['stdout', 'stderr'] as const) {
        let rest = '';
        child[stream]!.on('data', (b: Buffer) => {
          const parts = (rest + b.toString('utf8')).split('\n');
          rest = parts.pop() ?? '';
          if (rest.length > 8192) rest = rest.slice(0, 8192);
          for (const p of parts) this.hooks.line(spec.name, stream, p);
        });
        child[stream]!.on('end', () => rest && this.hooks.line(spec.name, stream, rest));
      }
      const done = (r: { ok: boolean; result: string }) => {
        clearTimeout(timer);
        if (killTimer) clearTimeout(killTimer);
        killGroup(child.pid, 'SIGKILL'); // nothing of the job outlives it
        j.child = null;
        resolve(r);
      };
      child.once('error', (err) => done({ ok: false, result: err.message }));
      child.once('exit', (code, signal) =>
        done(timedOut ? { ok: false, result: `timed out after ${spec.timeoutMs} ms` } : { ok: code === 0, result: code !== null ? `exit ${code}` : `signal ${signal}` }),
      );
    });
  }

  status(): JobStatus[] {
    return [...this.jobs.values()].map((j) => {
      let nextRun: string | null = null;
      try {
        const next = j.task?.getNextRun();
        nextRun = next ? next.toISOString() : null;
      } catch {
        nextRun = null;
      }
      return {
        name: j.spec.name,
        schedule: j.spec.schedule,
        action: j.spec.restartApp ? `restart ${j.spec.restartApp}` : [j.spec.command, ...j.spec.args].join(' '),
        running: j.running !== null,
        runs: j.runs,
        skippedOverlap: j.skippedOverlap,
        lastRun: j.lastRun,
        nextRun,
      };
    });
  }

  has(name: string): boolean {
    return this.jobs.has(name);
  }

  /** Stops the schedules; running commands are killed, and stop() waits for them. */
  async stop(): Promise<void> {
    const running: Array<Promise<void>> = [];
    for (const j of this.jobs.values()) {
      await j.task?.stop();
      await j.task?.destroy();
      if (j.child) killGroup(j.child.pid, 'SIGTERM');
      if (j.running) running.push(j.running);
    }
    await Promise.all(running);
    this.jobs.clear();
  }
}

function killGroup(pid: number | undefined, signal: NodeJS.Signals): void {
  if (pid === undefined) return;
  try {
    process.kill(-pid, signal);
  } catch {
    // gone
  }
}
