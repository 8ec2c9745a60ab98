import { join } from 'node:path';
import { loadConfig, logLevelFromEnv } from '../../core/config.ts';
import { deriveToken } from '../../core/credentials.ts';
import { FleetError } from '../../core/errors.ts';
import { tuneServerHeap } from '../../core/heap-tuning.ts';
import { createLogger } from '../../core/log.ts';
import { runUntilSignal, writeReadyFile } from '../../core/proc.ts';
import { provisioningSecret, writeSecretFile } from '../../core/secrets.ts';
import { startHub } from '../../hub/index.ts';
import { HubConfigSchema } from '../../hub/config.ts';
import { defineCommand, EXIT, intFlag, strFlag } from '../command.ts';

export const hubCommand = defineCommand({
  name: 'hub',
  summary: 'run the central broker and control plane (or: hub device-token <id>)',
  usage: '[--config hub.yaml] [options]\n       fleetlet hub device-token <device-id> [--state-dir DIR] [--out FILE]',
  positionals: true,
  options: {
    config: { type: 'string', short: 'c' },
    host: { type: 'string' },
    'mqtt-port': { type: 'string' },
    'http-port': { type: 'string' },
    'state-dir': { type: 'string' },
    'port-fallback': { type: 'boolean' },
    'ready-file': { type: 'string' },
    'die-with-parent': { type: 'boolean' },
    create: { type: 'boolean' },
    out: { type: 'string' },
  },
  help: {
    config: 'YAML or JSON config file (docs/config.md#hub)',
    host: 'address to bind (default 127.0.0.1)',
    'mqtt-port': 'MQTT port (default 1883; 0 = any free port)',
    'http-port': 'operator API and /metrics port (default 8080)',
    'state-dir': 'broker persistence, registry and secrets',
    'port-fallback': 'take free ports when the configured ones are taken',
    'ready-file': 'write {mqttPort, httpPort, ...} here once serving',
    'die-with-parent': 'exit when stdin closes (used by the demo)',
    out: 'device-token: write the token to this file (mode 0600) instead of stdout',
    create: 'device-token: make the fleet secret when the state directory has none yet (before the hub\'s first start)',
  },
  async run({ values, positionals }) {
    const overrides = {
      host: strFlag(values, 'host'),
      mqttPort: intFlag(values, 'mqtt-port', 0, 65535),
      httpPort: intFlag(values, 'http-port', 0, 65535),
      stateDir: strFlag(values, 'state-dir'),
      portFallback: values['port-fallback'] === true ? true : undefined,
    };
    const { config } = loadConfig(HubConfigSchema, { file: strFlag(values, 'config'), overrides });
    const [sub, ...args] = positionals;
    if (sub === 'device-token') {
      if (args.length !== 1) throw new FleetError('FLEET_USAGE', 'usage: fleetlet hub device-token <device-id>');
      const secret = provisioningSecret(join(config.stateDir, 'fleet.secret'), { create: values.create === true, whose: 'hub', created: (f) => process.stderr.write(`created a new fleet secret at ${f}\n`) });
      const token = deriveToken(secret, 'device', args[0]!);
      const out = strFlag(values, 'out');
      // a token file must be 0600 (the agent refuses others); `> file` would make it 0644
      if (out) writeSecretFile(out, token);
      else process.stdout.write(token + '\n');
      return EXIT.OK;
    }
    if (sub !== undefined) throw new FleetError('FLEET_USAGE', `unknown hub subcommand "${sub}"`);
    const log = createLogger({ name: 'hub', level: logLevelFromEnv() ?? 'info' });
    tuneServerHeap();
    const hub = await startHub(config, log);
    writeReadyFile(strFlag(values, 'ready-file'), {
      mqttPort: hub.mqttPort,
      mqttsPort: hub.mqttsPort,
      httpPort: hub.httpPort,
      fleetSecretFile: hub.fleetSecretFile,
      operatorTokenFile: hub.operatorTokenFile,
    });
    return runUntilSignal(() => hub.stop(), { dieWithParent: values['die-with-parent'] === true });
  },
});
