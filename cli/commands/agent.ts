import { defineCommand } from '../command.ts';

// placeholder until this command lands
export const agentCommand = defineCommand({
  name: 'agent',
  summary: '(not built yet)',
  usage: '',
  help: {},
  options: {},
  hidden: true,
  async run() {
    process.stderr.write('fleetlet agent: not built yet\n');
    return 1;
  },
});
