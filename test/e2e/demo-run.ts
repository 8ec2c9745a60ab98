import { spawn } from 'node:child_process';
import { createInterface } from 'node:readline';
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
  const child = spawn(command, [...args, 'demo', '--ephemeral-ports', '--json', '--interval-ms', '500', '--state-dir', stateDir], { stdio: ['ignore', 'pipe', 'pipe'], env: env ?? process.env });
  let output = '';
  let summary: DemoOutcome['summary'] | null = null;
  child.stderr.on('data', (d: Buffer) => (output += d.toString()));
  createInterface({ input: child.stdout }).on('line', (line) => {
    output += line + '\n';
    if (!line.startsWith('{')) return;
    const s = JSON.parse(line) as DemoOutcome['summary'];
    if (s.agents === 1 && s.gateways === 1 && s.mcus === 20 && s.messagesPerS > 0) summary = s;
  });
  const exited = new Promise<number | null>((r) => child.once('exit', (code) => r(code)));
  try {
    await waitFor(() => summary ?? (child.exitCode !== null ? Promise.reject(new Error(`demo exited ${child.exitCode}`)) : null), 'demo: everything online', 90_000, 100);
  } catch (err) {
    child.kill('SIGKILL');
    throw new Error(`${(err as Error).message}\n--- demo output ---\n${output.slice(-3000)}`);
  }
  child.kill('SIGINT');
  const exitCode = await exited;
  let leftovers: number[] = [];
  try {
    await waitFor(() => (leftovers = processesMentioning(stateDir)).length === 0, 'no process left', 8000);
  } catch {
    // reported through `leftovers`
  }
  return { summary: summary!, exitCode, leftovers, output };
}
