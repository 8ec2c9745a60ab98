import type { CommandEntry } from './index.ts';

/** `fleetlet agent`: shared by the full command list and the agent's own part (cli/main-agent.ts). */
export const AGENT_COMMAND: CommandEntry = { name: 'agent', load: async () => (await import('./agent.ts')).agentCommand };
