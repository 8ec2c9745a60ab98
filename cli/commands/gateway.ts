import { defineCommand } from '../command.ts';

// placeholder until this command lands
export const gatewayCommand = defineCommand({
  name: 'gateway',
  summary: '(not built yet)',
  usage: '',
  help: {},
  options: {},
  hidden: true,
  async run() {
    process.stderr.write('fleetlet gateway: not built yet\n');
    return 1;
  },
});
