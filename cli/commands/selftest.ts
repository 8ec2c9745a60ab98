import { defineCommand } from '../command.ts';

// placeholder until this command lands
export const selftestCommand = defineCommand({
  name: 'selftest',
  summary: '(not built yet)',
  usage: '',
  help: {},
  options: {},
  hidden: true,
  async run() {
    process.stderr.write('fleetlet selftest: not built yet\n');
    return 1;
  },
});
