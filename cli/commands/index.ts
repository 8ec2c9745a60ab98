import type { CommandSpec } from '../command.ts';
import { AGENT_COMMAND } from './agent-entry.ts';

/** A command known by name; its module is loaded only when the command runs or its help is shown. */
export interface CommandEntry {
  name: string;
  /** hidden from `fleetlet --help` (must agree with the spec's own `hidden`) */
  hidden?: boolean;
  load(): Promise<CommandSpec>;
}

/**
 * Every command, in the order `fleetlet --help` lists them. Each is imported on demand:
 * in the single binary (an esbuild CJS bundle) a dynamic import becomes a lazy module
 * initialiser, so a command's dependencies (aedes and LevelDB persistence for the hub,
 * CoAP for the gateway and simulator, mqtt for the agent…) are evaluated only when that
 * command runs. `fleetlet agent` thus never builds the hub's or the gateway's modules,
 * which is most of the agent's idle memory (docs/build.md).
 */
export const COMMANDS: readonly CommandEntry[] = [
  { name: 'demo', load: async () => (await import('./demo.ts')).demoCommand },
  { name: 'hub', load: async () => (await import('./hub.ts')).hubCommand },
  AGENT_COMMAND,
  { name: 'gateway', load: async () => (await import('./gateway.ts')).gatewayCommand },
  { name: 'sim', load: async () => (await import('./sim.ts')).simCommand },
  { name: 'bundle', load: async () => (await import('./bundle.ts')).bundleCommand },
  { name: 'selftest', load: async () => (await import('./selftest.ts')).selftestCommand },
  { name: 'sample-app', hidden: true, load: async () => (await import('./sample-app.ts')).sampleAppCommand },
];
