import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { loadConfig, logLevelFromEnv } from '../../core/config.ts';
import { FleetError } from '../../core/errors.ts';
import { AgentConfigSchema } from '../../agent/config.ts';
import { defineCommand, EXIT, intFlag, strFlag } from '../command.ts';
import { VERSION } from '../version.ts';

type Values = Record<string, string | boolean | string[] | boolean[] | undefined>;

/** Where `agent status` looks for the config when --config is not given. */
const SYSTEM_CONFIG = '/etc/fleetlet/agent.yaml';

export const agentCommand = defineCommand({
  name: 'agent',
  summary: 'run the device agent (or: agent install | agent status)',
  usage: [
    '[--config /etc/fleetlet/agent.yaml] [options]',
    '       fleetlet agent install [--prefix DIR] [--unit-dir DIR] [--config FILE] [--state-dir DIR] [--bin FILE] [--dry-run] [--force]',
    '       fleetlet agent status [--config FILE | --url http://127.0.0.1:8484] [--json]',
  ].join('\n'),
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
    // install
    prefix: { type: 'string' },
    'unit-dir': { type: 'string' },
    bin: { type: 'string' },
    link: { type: 'string' },
    'no-link': { type: 'boolean' },
    'rw-path': { type: 'string', multiple: true },
    'dry-run': { type: 'boolean' },
    force: { type: 'boolean' },
    // status
    url: { type: 'string' },
    'api-token-file': { type: 'string' },
    timeout: { type: 'string' },
  },
  help: {
    config: 'YAML or JSON config file (docs/config.md#agent); install: where to write it (default /etc/fleetlet/agent.yaml)',
    'device-id': 'this device’s id (default: from the host name)',
    'state-dir': 'state directory (default /var/lib/fleetlet/agent as root)',
    hub: 'hub MQTT URL, e.g. mqtt://hub.example:1883',
    'token-file': 'file with this device’s hub token (mode 0600)',
    keepalive: 'MQTT keep-alive in seconds',
    'api-host': 'local API address (default 127.0.0.1)',
    'api-port': 'local API port (default 8484)',
    'port-fallback': 'take a free port when the API port is taken',
    'publish-ms': 'telemetry batch period in ms',
    json: 'install, status: print JSON',
    'ready-file': 'write {apiPort} here once serving',
    'die-with-parent': 'exit when stdin closes (used by the demo)',
    prefix: 'install: write every file under this directory (DESTDIR); paths inside the files stay the real ones',
    'unit-dir': 'install: systemd unit directory (default /etc/systemd/system)',
    bin: 'install: the fleetlet binary to install (default: this executable, when it is the single binary)',
    link: 'install: symlink to the current binary for the CLI (default /usr/local/bin/fleetlet)',
    'no-link': 'install: no symlink on the PATH',
    'rw-path': 'install: another path apps may write (ReadWritePaths=), repeatable',
    'dry-run': 'install: print what would be written, write nothing',
    force: 'install: replace an existing config, a foreign --link and the current binary link',
    url: 'status: the agent API base URL (default: from the config, http://127.0.0.1:8484)',
    'api-token-file': 'status: API token file (default <stateDir>/tokens/readonly.token when readable)',
    timeout: 'status: seconds to wait for the agent (default 5)',
  },
  async run({ values, positionals }) {
    const [sub, ...more] = positionals;
    if (more.length > 0) throw new FleetError('FLEET_USAGE', `unexpected argument "${more[0]}"`);
    if (sub === 'install') return install(values);
    if (sub === 'status') return status(values);
    if (sub === 'boot-check') return bootCheckCommand(values);
    if (sub === 'inventory') {
      // the device inventory as JSON; the agent runs this as a child (agent/metrics.ts defaultInventoryCollector)
      const { collectInventory } = await import('../../agent/metrics.ts');
      process.stdout.write(JSON.stringify(await collectInventory()) + '\n');
      return EXIT.OK;
    }
    if (sub !== undefined) throw new FleetError('FLEET_USAGE', `unknown agent subcommand "${sub}" (install, status, inventory, boot-check)`);
    return runAgent(values);
  },
});

async function runAgent(values: Values): Promise<number> {
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
  // loaded here, not at the top: `agent install` and `agent status` need none of the agent
  // (mqtt, LevelDB, the API), and the single binary only evaluates what is imported
  const [{ startAgent }, { createLogger }, { runUntilSignal, writeReadyFile }] = await Promise.all([
    import('../../agent/index.ts'),
    import('../../core/log.ts'),
    import('../../core/proc.ts'),
  ]);
  const log = createLogger({ name: 'agent', level: logLevelFromEnv() ?? 'info' });
  // the updater verifies bundles with bundles/ (agent/ does not import it: layout rule)
  const agent = await startAgent(config, log, VERSION, { bundles: await import('../../bundles/index.ts') });
  writeReadyFile(strFlag(values, 'ready-file'), { apiPort: agent.apiPort, deviceId: agent.deviceId, technicianTokenFile: agent.tokenFiles.technician });
  return runUntilSignal(() => agent.stop(), { dieWithParent: values['die-with-parent'] === true });
}

/**
 * `fleetlet agent boot-check`: the self-update boot counter (docs/ota.md#agent-self-update),
 * run by systemd's ExecStartPre with the last known-good binary before every start. It never
 * fails the start: whatever happens, it exits 0.
 */
async function bootCheckCommand(values: Values): Promise<number> {
  const { config } = loadConfig(AgentConfigSchema, { file: strFlag(values, 'config'), overrides: { stateDir: strFlag(values, 'state-dir') } });
  const [{ bootCheck }, { createLogger }] = await Promise.all([import('../../agent/update/selfupdate.ts'), import('../../core/log.ts')]);
  const log = createLogger({ name: 'agent', level: logLevelFromEnv() ?? 'info' });
  try {
    const result = bootCheck(config.stateDir, config.update, log, 'pre-start');
    if (values.json) process.stdout.write(JSON.stringify({ result }) + '\n');
  } catch (err) {
    log.error('boot check failed; starting the current agent anyway', { err });
  }
  return EXIT.OK;
}

async function install(values: Values): Promise<number> {
  const { INSTALL_DEFAULTS, describePlan, executeInstall, planInstall, UNIT_NAME } = await import('../../agent/install.ts');
  const { isSea } = await import('../../core/native.ts');
  const dryRun = values['dry-run'] === true;
  const bin = strFlag(values, 'bin') ?? (isSea() ? process.execPath : null);
  const rw = values['rw-path'];
  const plan = planInstall({
    prefix: strFlag(values, 'prefix') ?? INSTALL_DEFAULTS.prefix,
    unitDir: strFlag(values, 'unit-dir') ?? INSTALL_DEFAULTS.unitDir,
    configFile: strFlag(values, 'config') ?? INSTALL_DEFAULTS.configFile,
    stateDir: strFlag(values, 'state-dir') ?? INSTALL_DEFAULTS.stateDir,
    binSource: bin,
    linkPath: values['no-link'] === true ? null : (strFlag(values, 'link') ?? INSTALL_DEFAULTS.linkPath),
    readWritePaths: Array.isArray(rw) ? rw.map(String) : [],
    version: VERSION,
    force: values.force === true,
    restartSec: INSTALL_DEFAULTS.restartSec,
  });
  if (bin !== null && !existsSync(bin)) throw new FleetError('FLEET_USAGE', `--bin ${bin}: no such file`);
  if (!dryRun) executeInstall(plan);
  if (values.json) {
    const steps = plan.steps.map((s) => (s.kind === 'write' ? { ...s, content: undefined, bytes: s.content.length } : s));
    process.stdout.write(JSON.stringify({ dryRun, paths: plan.paths, steps, notes: plan.notes }, null, 2) + '\n');
    return EXIT.OK;
  }
  const out = [dryRun ? 'fleetlet agent install (dry run: nothing written)' : 'fleetlet agent install', ...describePlan(plan, dryRun)];
  for (const n of plan.notes) out.push(`  note: ${n}`);
  if (!strFlag(values, 'prefix')) {
    out.push('', 'next:', '  systemctl daemon-reload', `  systemctl enable --now ${UNIT_NAME}`, '  fleetlet agent status');
  }
  process.stdout.write(out.join('\n') + '\n');
  return EXIT.OK;
}

interface StatusLike {
  deviceId?: string;
  version?: string;
  uptimeS?: number;
  hub?: { configured?: boolean; connected?: boolean; outbox?: { depth?: number; oldestAgeMs?: number } };
  device?: { cpuUtil?: number | null; load1?: number; memTotal?: number; memAvailable?: number; diskFree?: number | null; thermal?: Array<{ type: string; celsius: number }> };
  appMetrics?: Array<{ name: string; cpuPercent: number | null; rssBytes: number }>;
}
interface AppLike {
  name: string;
  state: string;
  restarts: number;
  pid?: number | null;
  health?: { status?: string } | string;
}

async function status(values: Values): Promise<number> {
  let base = strFlag(values, 'url');
  let tokenFile = strFlag(values, 'api-token-file');
  if (!base || !tokenFile) {
    const file = strFlag(values, 'config') ?? (existsSync(SYSTEM_CONFIG) ? SYSTEM_CONFIG : undefined);
    const overrides = { stateDir: strFlag(values, 'state-dir'), api: { host: strFlag(values, 'api-host'), port: intFlag(values, 'api-port', 1, 65535) } };
    const { config } = loadConfig(AgentConfigSchema, { file, overrides });
    const host = config.api.host === '0.0.0.0' || config.api.host === '::' ? '127.0.0.1' : config.api.host;
    base ??= `http://${host.includes(':') ? `[${host}]` : host}:${config.api.port}`;
    tokenFile ??= join(config.stateDir, 'tokens', 'readonly.token');
  }
  base = base.replace(/\/+$/, '');
  let token: string | null = null;
  try {
    token = readFileSync(tokenFile, 'utf8').trim() || null;
  } catch {
    // no token readable (not root, or none yet): fine on loopback, where reads are open
  }
  const timeoutS = intFlag(values, 'timeout', 1, 600) ?? 5;
  const get = async <T>(path: string): Promise<T> => {
    let res: Response;
    try {
      res = await fetch(`${base}${path}`, { headers: token ? { authorization: `Bearer ${token}` } : {}, signal: AbortSignal.timeout(timeoutS * 1000) });
    } catch (err) {
      const e = err as Error & { cause?: { code?: string; message?: string } };
      const why = e.name === 'TimeoutError' ? `no answer within ${timeoutS} s` : (e.cause?.code ?? e.cause?.message ?? e.message);
      throw new FleetError('FLEET_AGENT_UNREACHABLE', `cannot reach the agent API at ${base} (${why}); is the agent running? (systemctl status fleetlet-agent)`, { cause: err });
    }
    if (res.status === 401 || res.status === 403) throw new FleetError('FLEET_AUTH_FAILED', `the agent API at ${base} refused ${path} (HTTP ${res.status}): give a token with --api-token-file (${tokenFile} ${token ? 'was refused' : 'was not readable'})`);
    if (!res.ok) throw new FleetError('FLEET_AGENT_UNREACHABLE', `the agent API at ${base} answered ${path} with HTTP ${res.status}`);
    return (await res.json()) as T;
  };
  const s = await get<StatusLike>('/api/v1/status');
  const { apps } = await get<{ apps: AppLike[] }>('/api/v1/apps');
  if (values.json) {
    process.stdout.write(JSON.stringify({ url: base, status: s, apps }, null, 2) + '\n');
    return EXIT.OK;
  }
  process.stdout.write(formatStatus(base, s, apps));
  return EXIT.OK;
}

const mib = (b: number) => `${Math.round(b / 2 ** 20)} MiB`;
const gib = (b: number) => `${(b / 2 ** 30).toFixed(1)} GiB`;
function dur(s: number): string {
  const d = Math.floor(s / 86400);
  const h = Math.floor((s % 86400) / 3600);
  const m = Math.floor((s % 3600) / 60);
  return d ? `${d}d${h}h` : h ? `${h}h${m}m` : `${m}m${Math.floor(s % 60)}s`;
}

export function formatStatus(base: string, s: StatusLike, apps: AppLike[]): string {
  const lines: string[] = [];
  const hub = !s.hub?.configured ? 'no hub configured' : s.hub.connected ? 'online' : 'OFFLINE';
  const outbox = s.hub?.outbox ? `  outbox ${s.hub.outbox.depth ?? 0} records` : '';
  lines.push(`device ${s.deviceId ?? '?'}  agent ${s.version ?? '?'}  up ${dur(s.uptimeS ?? 0)}  uplink ${hub}${outbox}  (${base})`);
  const d = s.device;
  if (d) {
    const parts = [`cpu ${d.cpuUtil ?? '-'}%`, `load ${d.load1 ?? '-'}`];
    if (d.memTotal) parts.push(`mem ${mib(d.memTotal - (d.memAvailable ?? 0))} / ${mib(d.memTotal)}`);
    if (d.diskFree !== null && d.diskFree !== undefined) parts.push(`disk ${gib(d.diskFree)} free`);
    for (const z of d.thermal ?? []) parts.push(`${z.type} ${z.celsius.toFixed(1)} °C`);
    lines.push(parts.join('  '));
  }
  const m = new Map((s.appMetrics ?? []).map((a) => [a.name, a]));
  if (apps.length === 0) lines.push('no apps');
  else {
    lines.push(`${'APP'.padEnd(20)} ${'STATE'.padEnd(11)} ${'HEALTH'.padEnd(10)} ${'RESTARTS'.padStart(8)} ${'CPU%'.padStart(6)} ${'RSS'.padStart(9)}  PID`);
    for (const a of apps) {
      const h = typeof a.health === 'string' ? a.health : a.health?.status;
      const health = !h || h === 'none' ? '-' : h; // 'none': the app has no health check
      const am = m.get(a.name);
      lines.push(
        `${a.name.padEnd(20)} ${a.state.padEnd(11)} ${health.padEnd(10)} ${String(a.restarts).padStart(8)} ${String(am?.cpuPercent ?? '-').padStart(6)} ${(am && am.rssBytes ? mib(am.rssBytes) : '-').padStart(9)}  ${a.pid ?? '-'}`,
      );
    }
  }
  return lines.join('\n') + '\n';
}
