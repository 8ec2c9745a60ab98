import { loadConfig, logLevelFromEnv } from '../../core/config.ts';
import { FleetError } from '../../core/errors.ts';
import { createLogger } from '../../core/log.ts';
import { runUntilSignal, writeReadyFile } from '../../core/proc.ts';
import { startAgent } from '../../agent/index.ts';
import { AgentConfigSchema } from '../../agent/config.ts';
import { defineCommand, EXIT, intFlag, strFlag } from '../command.ts';
import { VERSION } from '../version.ts';

export const agentCommand = defineCommand({
  name: 'agent',
  summary: 'run the device agent (or: agent status)',
  usage: '[--config /etc/fleetlet/agent.yaml] [options]\n       fleetlet agent status [--api-port N] [--json]',
  positionals: true,
  options: {
    config: { type: 'string', short: 'c' },
    'device-id': { type: 'string' },
    'state-dir': { type: 'string' },
    hub: { type: 'string' },
    'token-file': { type: 'string' },
    keepalive: { type: 'string' },
    'api-host': { type: 'string' },
    'api-port': { type: 'string' },
    'port-fallback': { type: 'boolean' },
    'publish-ms': { type: 'string' },
    json: { type: 'boolean' },
    'ready-file': { type: 'string' },
    'die-with-parent': { type: 'boolean' },
  },
  help: {
    config: 'YAML or JSON config file (docs/config.md#agent)',
    'device-id': 'this device’s id (default: from the host name)',
    'state-dir': 'state directory (default /var/lib/fleetlet/agent as root)',
    hub: 'hub MQTT URL, e.g. mqtt://hub.example:1883',
    'token-file': 'file with this device’s hub token (mode 0600)',
    keepalive: 'MQTT keep-alive in seconds',
    'api-host': 'local API address (default 127.0.0.1)',
    'api-port': 'local API port (default 8484)',
    'port-fallback': 'take a free port when the API port is taken',
    'publish-ms': 'telemetry batch period in ms',
    json: 'agent status: print JSON',
    'ready-file': 'write {apiPort} here once serving',
    'die-with-parent': 'exit when stdin closes (used by the demo)',
  },
  async run({ values, positionals }) {
    const hubUrl = strFlag(values, 'hub');
    const tokenFile = strFlag(values, 'token-file');
    if ((hubUrl === undefined) !== (tokenFile === undefined)) throw new FleetError('FLEET_USAGE', '--hub and --token-file go together');
    const overrides = {
      deviceId: strFlag(values, 'device-id'),
      stateDir: strFlag(values, 'state-dir'),
      hub: hubUrl && tokenFile ? { url: hubUrl, tokenFile, keepaliveS: intFlag(values, 'keepalive', 1, 3600) } : undefined,
      api: { host: strFlag(values, 'api-host'), port: intFlag(values, 'api-port', 0, 65535), portFallback: values['port-fallback'] === true ? true : undefined },
      metrics: { publishMs: intFlag(values, 'publish-ms', 100, 3_600_000) },
    };
    const { config } = loadConfig(AgentConfigSchema, { file: strFlag(values, 'config'), overrides });
    const [sub] = positionals;
    if (sub === 'status') {
      const res = await fetch(`http://${config.api.host}:${config.api.port}/api/v1/status`).catch((err: unknown) => {
        throw new FleetError('FLEET_TIMEOUT', `agent API at ${config.api.host}:${config.api.port} unreachable: ${(err as Error).message}`);
      });
      const s = (await res.json()) as { deviceId: string; version: string; hub: { connected: boolean; outbox: { depth: number } }; apps: Array<{ name: string; state: string; restarts: number }> };
      if (values.json) process.stdout.write(JSON.stringify(s, null, 2) + '\n');
      else {
        process.stdout.write(`device ${s.deviceId}  agent ${s.version}  uplink ${s.hub.connected ? 'online' : 'offline'}  outbox ${s.hub.outbox.depth}\n`);
        for (const a of s.apps) process.stdout.write(`  ${a.name.padEnd(20)} ${a.state.padEnd(11)} restarts ${a.restarts}\n`);
      }
      return EXIT.OK;
    }
    if (sub !== undefined) throw new FleetError('FLEET_USAGE', `unknown agent subcommand "${sub}"`);
    const log = createLogger({ name: 'agent', level: logLevelFromEnv() ?? 'info' });
    const agent = await startAgent(config, log, VERSION);
    writeReadyFile(strFlag(values, 'ready-file'), { apiPort: agent.apiPort, deviceId: agent.deviceId, technicianTokenFile: agent.tokenFiles.technician });
    return runUntilSignal(() => agent.stop(), { dieWithParent: values['die-with-parent'] === true });
  },
});
