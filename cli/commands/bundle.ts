import { defineCommand } from '../command.ts';

// placeholder until this command lands
export const bundleCommand = defineCommand({
  name: 'bundle',
  summary: '(not built yet)',
  usage: '',
  help: {},
  options: {},
  hidden: true,
  async run() {
    process.stderr.write('fleetlet bundle: not built yet\n');
    return 1;
  },
});
