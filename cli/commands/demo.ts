import { defineCommand } from '../command.ts';

// placeholder until this command lands
export const demoCommand = defineCommand({
  name: 'demo',
  summary: '(not built yet)',
  usage: '',
  help: {},
  options: {},
  hidden: true,
  async run() {
    process.stderr.write('fleetlet demo: not built yet\n');
    return 1;
  },
});
