import type { CommandSpec } from '../command.ts';
import { hubCommand } from './hub.ts';
import { agentCommand } from './agent.ts';
import { gatewayCommand } from './gateway.ts';
import { simCommand } from './sim.ts';
import { bundleCommand } from './bundle.ts';
import { demoCommand } from './demo.ts';
import { selftestCommand } from './selftest.ts';
import { sampleAppCommand } from './sample-app.ts';

/** Every command, in the order `fleetlet --help` lists them. */
export const COMMANDS: readonly CommandSpec[] = [demoCommand, hubCommand, agentCommand, gatewayCommand, simCommand, bundleCommand, selftestCommand, sampleAppCommand];
