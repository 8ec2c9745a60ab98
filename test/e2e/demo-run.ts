import { spawn } from 'node:child_process';
import { createInterface } from 'node:readline';
import { setTimeout as sleep } from 'node:timers/promises';
import { waitFor } from '../helpers.ts';
import { processesMentioning } from './procs.ts';

export interface DemoOutcome {
  summary: { online: number; agents: number; gateways: number; mcus: number; messagesPerS: number };
  exitCode: number | null;
  leftovers: number[];
  output: string;
}

/**
 * Runs `fleetlet demo --ephemeral-ports --json` until the whole system is online
 * (1 agent, 1 gateway, 20 MCUs), then presses Ctrl-C (SIGINT) and reports how it ended
 * and which processes mentioning its state dir are left.
 */
export async function runDemoUntilOnline(command: string, args: string[], stateDir: string, env?: NodeJS.ProcessEnv): Promise<DemoOutcome> {
  // a process group of its own: on a failure everything it started is killed with it (its
  // parts hold its output pipes open, and this file would not exit while they run)
  const child = spawn(command, [...args, 'demo', '--ephemeral-ports', '--json', '--interval-ms', '500', '--state-dir', stateDir], { stdio: ['ignore', 'pipe', 'pipe'], env: env ?? process.env, detached: true });
  const killGroup = () => {
    // the group, and what runs in groups of its own (the agent's apps) from the state dir
    for (const pid of [-child.pid!, ...processesMentioning(stateDir)]) {
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        // already gone
      }
    }
  };
  let output = '';
  const fail = (why: string) => {
    killGroup();
    return new Error(`${why}\n--- demo output ---\n${output.slice(-3000)}`);
  };
  const exited = new Promise<number | null>((r) => child.once('exit', (code) => r(code)));
  const online = new Promise<DemoOutcome['summary']>((resolve, reject) => {
    child.stderr.on('data', (d: Buffer) => (output += d.toString()));
    createInterface({ input: child.stdout }).on('line', (line) => {
      output += line + '\n';
      if (!line.startsWith('{')) return;
      const s = JSON.parse(line) as DemoOutcome['summary'];
      if (s.agents === 1 && s.gateways === 1 && s.mcus === 20 && s.messagesPerS > 0) resolve(s);
    });
    void exited.then((code) => reject(new Error(`demo exited ${code} before everything was online`)));
    setTimeout(() => reject(new Error('demo: not everything online in 90 s')), 90_000).unref();
  });
  let summary: DemoOutcome['summary'];
  try {
    summary = await online;
  } catch (err) {
    throw fail((err as Error).message);
  }
  child.kill('SIGINT');
  const exitCode = await Promise.race([exited, sleep(30_000, undefined, { ref: false }).then(() => 'hung' as const)]);
  if (exitCode === 'hung') throw fail('demo did not exit within 30 s of SIGINT');
  let leftovers: number[] = [];
  try {
    await waitFor(() => (leftovers = processesMentioning(stateDir)).length === 0, 'no process left', 8000);
  } catch {
    // reported through `leftovers`
  }
  if (leftovers.length > 0) killGroup(); // reported above; not left running after the test
  return { summary, exitCode, leftovers, output };
}
