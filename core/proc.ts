import { spawn, type ChildProcess, type SpawnOptions } from 'node:child_process';
import { readFileSync, renameSync, writeFileSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { FleetError } from './errors.ts';
import { isSea } from './native.ts';

/**
 * How fleetlet runs itself as child processes (the demo, tests, the agent's sample app):
 * `selfCommand()` is the binary inside a single executable, or node with the same loader
 * flags and entry script in development. A child started with `--ready-file F` writes
 * its bound ports to F (atomically) once it serves; with `--die-with-parent` it exits
 * when its stdin pipe closes, so a parent killed with SIGKILL leaves no child behind.
 */
export function selfCommand(): { command: string; args: string[] } {
  if (isSea()) return { command: process.execPath, args: [] };
  const entry = process.argv[1];
  if (!entry) throw new FleetError('FLEET_INTERNAL', 'cannot tell how this process was started');
  return { command: process.execPath, args: [...process.execArgv, entry] };
}

export function writeReadyFile(file: string | undefined, info: Record<string, unknown>): void {
  if (!file) return;
  const tmp = `${file}.${process.pid}.tmp`;
  writeFileSync(tmp, JSON.stringify({ pid: process.pid, ...info }));
  renameSync(tmp, file);
}

/** Poll for a child's ready file; fails early if the child exits first. */
export async function waitReadyFile<T = Record<string, unknown>>(file: string, child: ChildProcess, timeoutMs = 20_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (child.exitCode !== null || child.signalCode !== null) {
      throw new FleetError('FLEET_CHILD_FAILED', `child ${child.spawnargs.slice(0, 4).join(' ')} exited (${child.exitCode ?? child.signalCode}) before it was ready`);
    }
    try {
      return JSON.parse(readFileSync(file, 'utf8')) as T;
    } catch {
      await sleep(50);
    }
  }
  throw new FleetError('FLEET_TIMEOUT', `child not ready after ${timeoutMs} ms (${file})`);
}

/** Exit when stdin closes: the parent died or closed our pipe. */
export function dieWithParent(onParentGone: () => void): void {
  process.stdin.on('end', onParentGone);
  process.stdin.on('error', onParentGone);
  process.stdin.resume();
}

/** Spawn `fleetlet <args>` as a child that dies with us. */
export function spawnSelf(args: string[], opts: SpawnOptions = {}): ChildProcess {
  const self = selfCommand();
  return spawn(self.command, [...self.args, ...args, '--die-with-parent'], { stdio: ['pipe', 'inherit', 'inherit'], ...opts });
}

/**
 * Run until SIGINT/SIGTERM, then call `stop` once; a second signal forces exit.
 * Resolves with the exit code (130 for SIGINT, 0 for SIGTERM).
 */
export function runUntilSignal(stop: () => Promise<void>, extra?: { dieWithParent?: boolean; stopTimeoutMs?: number }): Promise<number> {
  return new Promise((resolve) => {
    let stopping = false;
    const shutdown = (code: number) => {
      if (stopping) process.exit(code);
      stopping = true;
      // a stop that hangs (a peer that never answers) must not keep the process alive
      const watchdog = setTimeout(() => {
        process.stderr.write(`fleetlet: stop did not finish within ${extra?.stopTimeoutMs ?? 20_000} ms; exiting\n`);
        process.exit(1);
      }, extra?.stopTimeoutMs ?? 20_000);
      watchdog.unref();
      stop().then(
        () => resolve(code),
        () => resolve(1),
      );
    };
    process.on('SIGINT', () => shutdown(130));
    process.on('SIGTERM', () => shutdown(0));
    if (extra?.dieWithParent) dieWithParent(() => shutdown(0));
  });
}

/** SIGTERM a child, wait up to `graceMs`, then SIGKILL. Resolves when it has exited. */
export async function stopChild(child: ChildProcess, graceMs = 5000): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise<void>((r) => child.once('exit', () => r()));
  child.kill('SIGTERM');
  const t = setTimeout(() => child.kill('SIGKILL'), graceMs);
  await exited;
  clearTimeout(t);
}
