import { defineCommand } from '../command.ts';

// placeholder until this command lands
export const simCommand = defineCommand({
  name: 'sim',
  summary: '(not built yet)',
  usage: '',
  help: {},
  options: {},
  hidden: true,
  async run() {
    process.stderr.write('fleetlet sim: not built yet\n');
    return 1;
  },
});
