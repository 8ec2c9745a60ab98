import { defineCommand } from '../command.ts';

// placeholder until this command lands
export const sampleAppCommand = defineCommand({
  name: 'sample-app',
  summary: '(not built yet)',
  usage: '',
  help: {},
  options: {},
  hidden: true,
  async run() {
    process.stderr.write('fleetlet sample-app: not built yet\n');
    return 1;
  },
});
