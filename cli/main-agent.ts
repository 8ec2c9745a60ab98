// The agent's part of the single executable: only `fleetlet agent` (and --version). The
// binary's start script (cli/sea-main.ts) runs this for `fleetlet agent …`, so a device's
// long-running agent holds the source of the agent and what it uses, not of the hub,
// gateway and simulator (about 0.8 MB less in the V8 heap; docs/build.md).
import { runCli } from './run.ts';
import { AGENT_COMMAND } from './commands/agent-entry.ts';

runCli([AGENT_COMMAND]);
