// The fleetlet command line: every part (`fleetlet --help`). The single executable runs
// this as its `all` part; `fleetlet agent` runs cli/main-agent.ts instead (docs/build.md).
import { runCli } from './run.ts';
import { COMMANDS } from './commands/index.ts';

runCli(COMMANDS);
