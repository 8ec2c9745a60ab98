import { defineCommand } from '../command.ts';

// placeholder until this command lands
export const hubCommand = defineCommand({
  name: 'hub',
  summary: '(not built yet)',
  usage: '',
  help: {},
  options: {},
  hidden: true,
  async run() {
    process.stderr.write('fleetlet hub: not built yet\n');
    return 1;
  },
});
