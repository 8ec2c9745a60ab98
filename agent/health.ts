import { spawn } from 'node:child_process';
import { request as httpRequest } from 'node:http';
import { request as httpsRequest } from 'node:https';
import { connect } from 'node:net';

/**
 * App health checks (docs/agent.md#health-checks), Docker's semantics: a check runs every
 * `intervalMs` with `timeoutMs`; failures during `startPeriodMs` after a start do not count;
 * `retries` consecutive failures make the app unhealthy, and the supervisor restarts it.
 */
export type HealthProbe =
  | { type: 'http'; url: string }
  | { type: 'tcp'; host: string; port: number }
  | { type: 'exec'; command: string; args: string[] };

export interface HealthSpec {
  probe: HealthProbe;
  intervalMs: number;
  timeoutMs: number;
  retries: number;
  startPeriodMs: number;
}

export type HealthState = 'none' | 'starting' | 'healthy' | 'unhealthy';

export interface HealthStatus {
  status: HealthState;
  /** consecutive failures counted so far */
  failures: number;
  lastCheck: number | null;
  lastError: string | null;
}

/** Runs one probe; resolves with null when healthy, else with the reason. */
export function runProbe(probe: HealthProbe, timeoutMs: number, cwd?: string): Promise<string | null> {
  return new Promise((resolve) => {
    let done = false;
    const finish = (err: string | null) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      cleanup();
      resolve(err);
    };
    let cleanup = () => {};
    const timer = setTimeout(() => finish(`timed out after ${timeoutMs} ms`), timeoutMs);
    if (probe.type === 'http') {
      const req = (probe.url.startsWith('https:') ? httpsRequest : httpRequest)(probe.url, { method: 'GET', headers: { 'user-agent': 'fleetlet-health' } }, (res) => {
        res.resume();
        const code = res.statusCode ?? 0;
        finish(code >= 200 && code < 400 ? null : `HTTP ${code}`);
      });
      req.on('error', (err) => finish(err.message));
      req.end();
      cleanup = () => req.destroy();
    } else if (probe.type === 'tcp') {
      const sock = connect({ host: probe.host, port: probe.port });
      sock.once('connect', () => finish(null));
      sock.once('error', (err) => finish(err.message));
      cleanup = () => sock.destroy();
    } else {
      const child = spawn(probe.command, probe.args, { cwd, detached: true, stdio: ['ignore', 'ignore', 'pipe'] });
      let stderr = '';
      child.stderr.on('data', (b: Buffer) => {
        if (stderr.length < 512) stderr += b.toString('utf8');
      });
      child.once('error', (err) => finish(err.message));
      child.once('exit', (code, signal) => finish(code === 0 ? null : `exit ${code ?? signal}${stderr ? `: ${stderr.trim().slice(0, 200)}` : ''}`));
      cleanup = () => {
        if (child.exitCode === null && child.pid) {
          try {
            process.kill(-child.pid, 'SIGKILL');
          } catch {
            // gone
          }
        }
      };
    }
  });
}

/** Health of one running app; `onUnhealthy` fires once per transition to unhealthy. */
export class HealthMonitor {
  private timer: NodeJS.Timeout | null = null;
  private startedAt = 0;
  private running = false;
  /** bumped by every start() and stop(): a probe that returns into a later run is ignored */
  private run = 0;
  readonly state: HealthStatus = { status: 'starting', failures: 0, lastCheck: null, lastError: null };

  constructor(
    private readonly spec: HealthSpec,
    private readonly events: { onChange(s: HealthStatus): void; onUnhealthy(reason: string): void },
    private readonly cwd?: string,
    private readonly now: () => number = Date.now,
  ) {}

  /** (Re)start checking after the app started. */
  start(): void {
    this.stop();
    this.running = true;
    this.startedAt = this.now();
    Object.assign(this.state, { status: 'starting', failures: 0, lastError: null });
    this.schedule();
  }

  stop(): void {
    this.running = false;
    this.run++;
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
  }

  private schedule(): void {
    if (!this.running) return;
    this.timer = setTimeout(() => void this.check(), this.spec.intervalMs);
  }

  private async check(): Promise<void> {
    this.timer = null;
    const run = this.run;
    const err = await runProbe(this.spec.probe, this.spec.timeoutMs, this.cwd);
    // stopped meanwhile, or stopped and started again (the app restarted while this probe ran):
    // its result is about the old process, and the new run has its own timer
    if (!this.running || run !== this.run) return;
    const before = this.state.status;
    this.state.lastCheck = this.now();
    if (err === null) {
      this.state.failures = 0;
      this.state.lastError = null;
      this.state.status = 'healthy';
    } else {
      this.state.lastError = err;
      const inStartPeriod = this.now() - this.startedAt < this.spec.startPeriodMs;
      if (!inStartPeriod) this.state.failures++;
      if (this.state.failures >= this.spec.retries) this.state.status = 'unhealthy';
    }
    if (this.state.status !== before) this.events.onChange({ ...this.state });
    if (this.state.status === 'unhealthy' && before !== 'unhealthy') {
      this.events.onUnhealthy(err ?? 'unhealthy');
      return; // the supervisor restarts the app, which calls start() again
    }
    this.schedule();
  }
}
