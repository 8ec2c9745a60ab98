import { writeFileSync, renameSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import type { MqttClient } from 'mqtt';
import { FleetError, toFleetError } from '../core/errors.ts';
import { listenHttp, type Listening, type TokenRole } from '../core/http.ts';
import { isLoopback } from '../core/net.ts';
import type { Logger } from '../core/log.ts';
import { CommandSchema, decodeMessage, encodeMessage, type CommandReply, type DesiredState, type EventMessage, type LogBatch, type Sample } from '../core/messages.ts';
import { MetricsRegistry } from '../core/metrics.ts';
import { connectFleetClient, disconnectFleetClient, logHubError } from '../core/mqtt.ts';
import { setNativeDir } from '../core/native.ts';
import { Priority, type Outbox } from '../core/outbox.ts';
import { LevelOutbox } from '../core/outbox-level.ts';
import { loadOrCreateSecret, readDeviceToken } from '../core/secrets.ts';
import { deviceTopic } from '../core/topics.ts';
import { Uplink } from '../core/uplink.ts';
import { buildAgentApi, ROLES } from './api.ts';
import type { AgentConfig } from './config.ts';
import { Inventory, MetricsCollector } from './metrics.ts';
import { applyTrustRoots, createAgentUpdater, mergeApps, trustRootFile, type BundleApi } from './update/index.ts';
import { Supervisor, type AppStatus, type LogLine } from './supervisor.ts';
import { JobScheduler } from './jobs.ts';
import { detectCgroup } from './limits.ts';
import { resolveUser } from './users.ts';
import { EventLog } from './events.ts';
import { MetricsHistory } from './history.ts';
import { SeenCommands, type Reply } from './commands-seen.ts';

export interface AgentHandle {
  apiPort: number;
  deviceId: string;
  supervisor: Supervisor;
  outbox: Outbox;
  /** files holding the local API tokens (mode 0600) */
  tokenFiles: { technician: string; readonly: string };
  stop(): Promise<void>;
}

const LOG_FLUSH_MS = 1000;
/** app output beyond this many lines per flush period is counted, not sent (a chatty app must not flood the uplink) */
const MAX_LOG_LINES_PER_BATCH = 1000;

export async function startAgent<T>(config: AgentConfig, log: Logger, version: string, deps: { bundles?: BundleApi<T> } = {}): Promise<AgentHandle> {
  // uptime on the monotonic clock: a wall-clock step (NTP at boot without an RTC) is not uptime
  const started = performance.now();
  setNativeDir(config.stateDir);
  mkdirSync(config.stateDir, { recursive: true, mode: 0o700 });
  const tokenFiles = { technician: join(config.stateDir, 'tokens', 'technician.token'), readonly: join(config.stateDir, 'tokens', 'readonly.token') };
  const tokens: TokenRole[] = [
    { token: loadOrCreateSecret(tokenFiles.technician), role: ROLES.TECHNICIAN },
    { token: loadOrCreateSecret(tokenFiles.readonly), role: ROLES.READONLY },
  ];

  const outbox: Outbox = await LevelOutbox.open(join(config.stateDir, 'outbox'), config.outbox);
  // every event goes upstream through the outbox and into the local ring the API and page read
  const events = new EventLog();
  const emitEvent = (type: string, severity: EventMessage['severity'], data: Record<string, unknown>) => {
    events.record(type, severity, data);
    return outbox
      .append({
        topic: deviceTopic(config.deviceId, 'events'),
        priority: Priority.ALERT,
        payload: (mid) => encodeMessage({ v: 1, mid, ts: Date.now(), type, severity, data } satisfies EventMessage),
      })
      .catch((err: unknown) => log.error('cannot queue event', { type, err }));
  };
  // what the budget pushed out is itself reported upstream (an alert is never evicted for it)
  outbox.on('evicted', (e) => {
    log.warn('outbox over budget; evicted oldest records', { ...e });
    void emitEvent('outbox.evicted', 'warning', { ...e });
  });
  outbox.on('corrupt', (e) => {
    log.error('outbox record damaged on disk; skipped', e);
    void emitEvent('outbox.corrupt', 'warning', e);
  });
  outbox.on('fault', (e) => log.error('outbox could not read its store (the disk); nothing stored is lost, trying again at the next write', e));

  const sv = config.supervisor;
  const supervisor = new Supervisor({
    log: log.child({ part: 'supervisor' }),
    backoff: { initialMs: sv.backoffInitialMs, factor: sv.backoffFactor, maxMs: sv.backoffMaxMs, resetAfterMs: sv.backoffResetAfterMs },
    crashLoopRestarts: sv.crashLoopRestarts,
    crashLoopWindowMs: sv.crashLoopWindowMs,
    logDir: join(config.stateDir, 'logs'),
    cgroup: config.apps.some((a) => a.limits?.memoryMb !== undefined || a.limits?.cpuPercent !== undefined) ? detectCgroup(log) : null,
  });
  supervisor.on('health', (e: Record<string, unknown>) => void emitEvent('app.health', e.status === 'unhealthy' ? 'warning' : 'info', e));
  supervisor.on('unhealthy', (e: Record<string, unknown>) => log.warn('app unhealthy', e));
  supervisor.on('crash-loop', (e: Record<string, unknown>) => {
    log.warn('app is crash-looping', e);
    void emitEvent('app.crash-loop', 'alert', e);
  });
  supervisor.on('change', (s: AppStatus) => {
    if (s.state === 'running' || s.state === 'exited') void emitEvent(`app.${s.state}`, 'info', { app: s.name, restarts: s.restarts, pid: s.pid, lastExit: s.lastExit });
    // local only (the page shows them; upstream they would be noise)
    else if (s.state === 'backoff' || s.state === 'stopped') events.record(`app.${s.state}`, 'info', { app: s.name, restarts: s.restarts, lastExit: s.lastExit });
  });
  // app output goes upstream as log batches (lowest priority: evicted first when space runs short)
  let logLines: LogBatch['lines'] = [];
  let logsDropped = 0;
  supervisor.on('line', (l: LogLine) => {
    if (logLines.length >= MAX_LOG_LINES_PER_BATCH) logsDropped++;
    else logLines.push({ t: l.t, app: l.app, stream: l.stream, line: l.line });
  });
  const logTimer = setInterval(() => {
    if (logLines.length === 0) return;
    const lines = logLines;
    logLines = [];
    outbox
      .append({ topic: deviceTopic(config.deviceId, 'logs'), priority: Priority.LOG, payload: (mid) => encodeMessage({ v: 1, mid, ts: Date.now(), lines } satisfies LogBatch) })
      .catch((err: unknown) => log.warn('cannot queue app logs', { err }));
  }, LOG_FLUSH_MS);
  // the updater (docs/ota.md) needs the bundle verifier, passed in by the CLI (agent/ does not import bundles/)
  const updater = deps.bundles ? createAgentUpdater({ config, log, supervisor, version, bundles: deps.bundles, emitEvent, connected: () => client?.connected ?? false }) : null;
  await supervisor.apply(mergeApps(config.apps, updater?.appSpecs() ?? []));
  /** trust root rotation from the hub's desired state or the technician (docs/bundle-format.md#trust-root) */
  const rotateTrust = (docs: readonly Buffer[], source: string): { applied: number[]; version: number } => {
    const api = deps.bundles;
    if (!api) throw new FleetError('FLEET_HTTP_NOT_FOUND', 'bundle verification is not enabled on this agent');
    const file = trustRootFile(config);
    try {
      const applied = applyTrustRoots(api as unknown as BundleApi<{ version: number }>, file, docs);
      const version = (api.loadTrustRoot(file) as unknown as { version: number }).version;
      if (applied.length) {
        log.info('trust root rotated', { source, applied, version });
        void emitEvent('trust.rotated', 'info', { source, applied, version });
      }
      return { applied, version };
    } catch (err) {
      const fe = toFleetError(err);
      log.warn('trust root rotation refused', { source, err: fe });
      void emitEvent('trust.refused', 'warning', { source, code: fe.code, reason: fe.message });
      throw fe;
    }
  };
  const jobs = new JobScheduler(log.child({ part: 'jobs' }), {
    restartApp: async (name) => {
      const app = supervisor.apps.get(name);
      if (!app) throw new FleetError('FLEET_APP_NOT_FOUND', `no app named ${JSON.stringify(name)}`);
      await app.restart();
    },
    line: (job, stream, line) => log.info('job output', { job, stream, line }),
  });
  jobs.on('run', (r: Record<string, unknown>) => void emitEvent('job.run', r.ok ? 'info' : 'warning', r));
  jobs.start(
    config.jobs.map((j) => {
      const u = j.user !== undefined ? resolveUser(j.user) : null;
      return { ...j, ...(u ? { uid: u.uid, gid: u.gid } : {}) };
    }),
  );

  // --- metrics: cheap /proc readers at sampleMs, one telemetry batch per publishMs
  const collector = new MetricsCollector({ diskPaths: [config.stateDir, '/'] }, () => supervisor.status());
  let last = collector.last.device;
  let pending: Sample[] = [];
  const history = new MetricsHistory(['cpu', 'mem'] as const); // last hour, 10 s buckets (min/avg/max)
  const sampleTimer = setInterval(() => {
    last = collector.sample().device;
    pending.push(...collector.toSamples());
    const mem = last.memTotal ? Math.round((1000 * (last.memTotal - last.memAvailable)) / last.memTotal) / 10 : 0;
    history.add(last.t, { cpu: last.cpuUtil, mem });
  }, config.metrics.sampleMs);
  const publishTimer = setInterval(() => {
    const samples = [...pending];
    samples.push(...collector.appStateSamples());
    pending = [];
    if (samples.length === 0) return;
    outbox
      .append({ topic: deviceTopic(config.deviceId, 'telemetry'), priority: Priority.TELEMETRY, payload: (mid) => encodeMessage({ v: 1, mid, ts: Date.now(), samples }) })
      .catch((err: unknown) => log.error('cannot queue telemetry', { err }));
  }, config.metrics.publishMs);

  // systeminformation at start, hourly and on SIGHUP only; published as an event when it changes
  const inventory = new Inventory({ onChange: (inv) => void emitEvent('inventory', 'info', inv), onError: (err) => log.warn('inventory failed', { err }) });
  inventory.start();

  // --- uplink to the hub
  let client: MqttClient | null = null;
  let uplink: Uplink | null = null;
  let desired: DesiredState | null = null;
  if (config.hub) {
    const token = readDeviceToken(config.hub.tokenFile, config.deviceId);
    client = connectFleetClient({
      url: config.hub.url,
      deviceId: config.deviceId,
      token,
      kind: 'agent',
      version,
      keepalive: config.hub.keepaliveS,
      reconnectMs: config.hub.reconnectMs,
      reconnectMaxMs: config.hub.reconnectMaxMs,
    });
    uplink = new Uplink({ client, outbox, log: log.child({ part: 'uplink' }), deviceId: config.deviceId, ...config.uplink });
    const c = client;
    c.on('connect', () => {
      log.info('connected to hub', { url: config.hub?.url });
      c.subscribe([deviceTopic(config.deviceId, 'desired'), deviceTopic(config.deviceId, 'cmd')], { qos: 1 }, (err) => {
        if (err) log.error('subscribe failed', { err });
      });
    });
    c.on('offline', () => log.warn('hub unreachable; queuing in the outbox'));
    c.on('error', (err) => logHubError(log, err));
    c.on('message', (topic, payload) => {
      try {
        if (topic === deviceTopic(config.deviceId, 'desired')) {
          const d = decodeMessage('desired', payload);
          if (desired && d.rev <= desired.rev) return;
          desired = d;
          const file = join(config.stateDir, 'desired.json');
          writeFileSync(`${file}.tmp`, JSON.stringify(d));
          renameSync(`${file}.tmp`, file);
          log.info('desired state received', { rev: d.rev, apps: Object.keys(d.apps) });
          void emitEvent('desired.received', 'info', { rev: d.rev });
          // a rotated root first, so bundles signed by the new keys verify
          if (d.trustRoots?.length) {
            try {
              rotateTrust(d.trustRoots.map((t) => Buffer.from(t, 'utf8')), 'hub');
            } catch {
              // reported as trust.refused; bundles keep verifying against the current root
            }
          }
          updater?.onDesired(d);
        } else void handleCommand(decodeMessage('cmd', payload));
      } catch (err) {
        log.warn('dropped invalid message from hub', { topic, err });
      }
    });
  }

  const reply = (r: Omit<CommandReply, 'v' | 'mid'>) =>
    outbox.append({ topic: deviceTopic(config.deviceId, 'reply'), priority: Priority.ALERT, payload: (mid) => encodeMessage({ v: 1, mid, ...r }) });
  // The hub may send a command more than once (docs/topics.md#command-delivery): repeats are
  // recognised by id, across agent restarts too (agent/commands-seen.ts)
  const seenCommands = SeenCommands.load(join(config.stateDir, 'commands-seen.json'), { onError: (err) => log.warn('cannot write the handled-commands file', { err }) });
  async function handleCommand(cmd: ReturnType<typeof CommandSchema.parse>): Promise<void> {
    if (cmd.expiresAt < Date.now()) {
      await reply({ id: cmd.id, ok: false, error: { code: 'FLEET_TIMEOUT', message: 'command expired before it reached the device' } });
      return;
    }
    const seen = seenCommands.begin(cmd.id, cmd.expiresAt);
    if (seen.kind === 'running') return; // its reply follows when it ends
    if (seen.kind === 'done') {
      log.info('repeated command not run again; its reply is sent again', { id: cmd.id, name: cmd.name });
      await reply(seen.reply);
      return;
    }
    // the result is recorded before its reply is queued: a repeat that arrives while the reply
    // is still being written gets that reply again (it used to be dropped as `running`), and a
    // crash between the two leaves the real result on disk, not FLEET_COMMAND_INTERRUPTED
    const answer = async (r: Reply) => {
      seenCommands.finish(cmd.id, r);
      await reply(r);
    };
    try {
      if (cmd.name === 'ping') await answer({ id: cmd.id, ok: true, result: { uptimeS: (performance.now() - started) / 1000 } });
      else if (cmd.name === 'restart-app') {
        const app = supervisor.apps.get(String(cmd.args.app));
        if (!app) await answer({ id: cmd.id, ok: false, error: { code: 'FLEET_APP_NOT_FOUND', message: `no app ${String(cmd.args.app)}` } });
        else {
          await app.restart();
          await answer({ id: cmd.id, ok: true, result: app.status() });
        }
      } else await answer({ id: cmd.id, ok: false, error: { code: 'FLEET_USAGE', message: `unknown command ${cmd.name}` } });
    } catch (err) {
      await answer({ id: cmd.id, ok: false, error: { code: 'FLEET_INTERNAL', message: (err as Error).message } });
    }
  }

  // --- local API
  const metrics = new MetricsRegistry();
  metrics.gaugeFn('fleet_agent_up_seconds', 'Seconds since the agent started', () => (performance.now() - started) / 1000);
  metrics.gaugeFn('fleet_agent_uplink_connected', '1 when the MQTT connection to the hub is up', () => (client?.connected ? 1 : 0));
  metrics.gaugeFn('fleet_agent_outbox_records', 'Records waiting in the outbox, by priority class', () =>
    Object.entries(outbox.stats().depthByClass).map(([cls, v]) => ({ labels: { class: cls }, value: v })),
  );
  metrics.gaugeFn('fleet_agent_outbox_bytes', 'Bytes waiting in the outbox', () => outbox.stats().bytes);
  metrics.gaugeFn('fleet_agent_outbox_oldest_age_seconds', 'Age of the oldest record in the outbox', () => outbox.stats().oldestAgeMs / 1000);
  metrics.gaugeFn('fleet_agent_outbox_evicted_records', 'Records the outbox evicted to stay within its budget (since the store was created)', () => outbox.stats().evicted);
  metrics.gaugeFn('fleet_agent_outbox_corrupt_records', 'Records found damaged on disk and skipped (since the store was created)', () => outbox.stats().corrupt ?? 0);
  metrics.gaugeFn('fleet_agent_app_log_lines_dropped', 'App output lines not sent upstream because of the per-flush cap', () => logsDropped);
  metrics.gaugeFn('fleet_agent_app_up', '1 when the app is running', () => supervisor.status().map((a) => ({ labels: { app: a.name }, value: a.state === 'running' ? 1 : 0 })));
  metrics.gaugeFn('fleet_agent_app_restarts', 'Restarts of the app since the agent started', () => supervisor.status().map((a) => ({ labels: { app: a.name }, value: a.restarts })));
  collector.register(metrics);

  const status = () => ({
    deviceId: config.deviceId,
    version,
    uptimeS: (performance.now() - started) / 1000,
    hub: { configured: config.hub !== undefined, connected: client?.connected ?? false, inFlight: uplink?.inFlight ?? 0, outbox: outbox.stats() },
    desired,
    device: last,
    appMetrics: collector.last.apps,
    inventory: inventory.current,
    apps: supervisor.status(),
    jobs: jobs.status(),
    updates: updater?.status() ?? null,
  });
  const api = buildAgentApi({
    log,
    supervisor,
    metrics,
    tokens,
    openReads: isLoopback(config.api.host),
    rateLimit: config.api.rateLimit,
    status,
    history,
    events,
    jobs,
    updates: updater,
    rotateTrust: deps.bundles ? (doc: Buffer) => rotateTrust([doc], 'local-api') : undefined,
    ready: () => true,
    uplink: () => ({ configured: config.hub !== undefined, connected: client?.connected ?? false, ...outbox.stats() }),
  });
  await updater?.start();
  const http: Listening = await listenHttp(api.handle, config.api.host, config.api.port, config.api.portFallback);
  log.info('agent started', { deviceId: config.deviceId, api: `http://${config.api.host}:${http.port}/`, apps: config.apps.length, hub: config.hub?.url ?? null });

  return {
    apiPort: http.port,
    deviceId: config.deviceId,
    supervisor,
    outbox,
    tokenFiles,
    async stop() {
      api.close(); // /ready turns 503, log streams end with an `end` event
      clearInterval(sampleTimer);
      clearInterval(publishTimer);
      inventory.stop();
      await jobs.stop();
      await updater?.stop();
      clearInterval(logTimer);
      await supervisor.stopAll();
      await http.close();
      uplink?.stop();
      if (client) await disconnectFleetClient(client, config.deviceId, 'agent', version);
      await outbox.close();
      log.info('agent stopped');
    },
  };
}
