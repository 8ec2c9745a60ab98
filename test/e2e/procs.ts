import { spawn, type ChildProcess } from 'node:child_process';
import { closeSync, openSync, readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { stopChild, waitReadyFile } from '../../core/proc.ts';

const ROOT = new URL('../../', import.meta.url).pathname;

/** Runs `fleetlet <args>` from source as a real child process; logs go to <dir>/<name>.log. */
export class Parts {
  readonly children: Array<{ name: string; child: ChildProcess }> = [];
  constructor(readonly dir: string) {}

  async start<T = Record<string, unknown>>(name: string, args: string[]): Promise<{ child: ChildProcess; ready: T }> {
    const readyFile = join(this.dir, `${name}.ready.json`);
    const log = openSync(join(this.dir, `${name}.log`), 'a');
    const child = spawn(process.execPath, ['--import', 'tsx', join(ROOT, 'cli/main.ts'), ...args, '--ready-file', readyFile, '--die-with-parent'], {
      cwd: ROOT,
      stdio: ['pipe', log, log],
    });
    closeSync(log); // the child has its own copy
    this.children.push({ name, child });
    try {
      return { child, ready: await waitReadyFile<T>(readyFile, child, 60_000) };
    } catch (err) {
      throw new Error(`${name} did not start: ${(err as Error).message}\n--- ${name}.log ---\n${this.log(name)}`);
    }
  }

  log(name: string): string {
    try {
      return readFileSync(join(this.dir, `${name}.log`), 'utf8').slice(-4000);
    } catch {
      return '';
    }
  }

  async stopAll(): Promise<void> {
    for (const { child } of [...this.children].reverse()) await stopChild(child, 5000);
  }

  /** SIGTERM every running part at once (as a host shutdown does); how each one ended. */
  async terminateAllAtOnce(): Promise<Record<string, string>> {
    const running = this.children.filter(({ child }) => child.exitCode === null && child.signalCode === null);
    const ended = running.map(
      ({ name, child }) =>
        new Promise<[string, string]>((resolve) => {
          // a part that needs SIGKILL after 10 s did not stop by itself: that is the failure reported
          const t = setTimeout(() => child.kill('SIGKILL'), 10_000);
          child.once('exit', (code, signal) => {
            clearTimeout(t);
            resolve([name, signal ?? `exit ${code}`]);
          });
        }),
    );
    for (const { child } of running) child.kill('SIGTERM');
    return Object.fromEntries(await Promise.all(ended));
  }
}

/** pids of live processes whose command line mentions `needle` (zombies excluded). */
export function processesMentioning(needle: string): number[] {
  const out: number[] = [];
  for (const entry of readdirSafe('/proc')) {
    if (!/^\d+$/.test(entry) || Number(entry) === process.pid) continue;
    try {
      const cmd = readFileSync(`/proc/${entry}/cmdline`, 'utf8');
      const stat = readFileSync(`/proc/${entry}/stat`, 'utf8');
      if (cmd.includes(needle) && !/\) Z /.test(stat)) out.push(Number(entry));
    } catch {
      // gone meanwhile
    }
  }
  return out;
}

function readdirSafe(p: string): string[] {
  try {
    return readdirSync(p);
  } catch {
    return [];
  }
}
