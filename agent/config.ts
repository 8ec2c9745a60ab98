import { hostname } from 'node:os';
import { z } from 'zod';
import { defaultStateDir } from '../core/config.ts';
import { DEVICE_ID_RE } from '../core/topics.ts';
import { OutboxConfigSchema, reconnectKeys, UplinkConfigSchema } from '../core/outbox-config.ts';
import { UpdateConfigSchema } from './update/config.ts';
import { cronProblem } from './jobs.ts';
import { DEFAULT_LOG_FILES } from './logfiles.ts';

/** Health check of an app (docs/agent.md#health-checks); Docker's semantics. */
export const HealthSchema = z
  .object({
    type: z.enum(['http', 'tcp', 'exec']),
    /** http: a 2xx or 3xx answer to GET is healthy */
    url: z.string().regex(/^https?:\/\//, 'health.url must start with http:// or https://').optional(),
    /** tcp: a connection that opens is healthy */
    host: z.string().default('127.0.0.1'),
    port: z.number().int().min(1).max(65535).optional(),
    /** exec: exit status 0 is healthy (runs in the app's cwd) */
    command: z.string().min(1).optional(),
    args: z.array(z.string()).default([]),
    /** time between checks, ms */
    intervalMs: z.number().int().min(100).max(3_600_000).default(10_000),
    /** a check slower than this fails, ms */
    timeoutMs: z.number().int().min(10).max(600_000).default(3000),
    /** consecutive failures that make the app unhealthy (and restart it) */
    retries: z.number().int().min(1).max(100).default(3),
    /** failures in this time after a start do not count, ms */
    startPeriodMs: z.number().int().min(0).max(3_600_000).default(0),
  })
  .strict()
  .superRefine((h, ctx) => {
    const need = { http: 'url', tcp: 'port', exec: 'command' } as const;
    const key = need[h.type];
    if (h[key] === undefined) ctx.addIssue({ code: 'custom', path: [key], message: `a ${h.type} health check needs ${key}` });
  });

export const LimitsSchema = z
  .object({
    /** memory limit, MiB (cgroup memory.max, else RLIMIT_DATA per process) */
    memoryMb: z.number().int().min(4).max(1_048_576).optional(),
    /** CPU cap in percent of one core (cgroup cpu.max only) */
    cpuPercent: z.number().int().min(1).max(102_400).optional(),
    /** scheduling priority, -20 (highest) to 19 */
    nice: z.number().int().min(-20).max(19).optional(),
  })
  .strict();

export const LogFilesSchema = z
  .object({
    /** size at which the log file rotates, bytes */
    maxBytes: z.number().int().min(4096).max(1024 ** 3).default(DEFAULT_LOG_FILES.maxBytes),
    /** files kept per app, the current one included */
    files: z.number().int().min(1).max(100).default(DEFAULT_LOG_FILES.files),
  })
  .strict();

/** A supervised app (docs/config.md#agent). */
export const AppSpecSchema = z
  .object({
    name: z.string().regex(/^[a-z0-9][a-z0-9-]{0,31}$/, 'app names are lower-case letters, digits and dashes, at most 32'),
    command: z.string().min(1),
    args: z.array(z.string()).default([]),
    env: z.record(z.string(), z.string()).default({}),
    cwd: z.string().optional(),
    /** restart policy */
    restart: z.enum(['always', 'on-failure', 'never']).default('always'),
    /** grace period between SIGTERM to the app's process group and SIGKILL, ms */
    stopTimeoutMs: z.number().int().min(0).max(600_000).default(10_000),
    /** run as this user (name or uid); needs the agent to run as root */
    user: z.string().min(1).max(64).optional(),
    health: HealthSchema.optional(),
    limits: LimitsSchema.optional(),
    /** rotating files under <stateDir>/logs/<app>/ */
    logs: LogFilesSchema.prefault({}),
  })
  .strict();
export type AppSpec = z.infer<typeof AppSpecSchema>;
export type JobConfig = z.infer<typeof JobSpecSchema>;

/** Scheduled jobs: a command or an app restart on a cron expression (node-cron syntax, optional seconds field). */
export const JobSpecSchema = z
  .object({
    name: z.string().regex(/^[a-z0-9][a-z0-9-]{0,31}$/, 'job names are lower-case letters, digits and dashes, at most 32'),
    schedule: z.string().min(1).max(128).refine((e) => cronProblem(e) === null, { message: 'not a valid cron expression (node-cron: [second] minute hour day month weekday)' }),
    timezone: z.string().max(64).optional(),
    command: z.string().min(1).optional(),
    args: z.array(z.string()).default([]),
    env: z.record(z.string(), z.string()).default({}),
    cwd: z.string().optional(),
    user: z.string().min(1).max(64).optional(),
    /** restart this app instead of running a command */
    restartApp: z.string().optional(),
    /** a run longer than this is killed, ms */
    timeoutMs: z.number().int().min(100).max(86_400_000).default(3_600_000),
  })
  .strict()
  .refine((j) => (j.command === undefined) !== (j.restartApp === undefined), { message: 'a job has either command or restartApp, not both' });

function defaultDeviceId(): string {
  const h = hostname().replace(/[^A-Za-z0-9._-]/g, '-').replace(/^[^A-Za-z0-9]+/, '');
  return DEVICE_ID_RE.test(h) ? h : 'device';
}

export const AgentConfigSchema = z
  .object({
    deviceId: z.string().regex(DEVICE_ID_RE, 'device ids are letters, digits, dot, dash and underscore, at most 64').default(defaultDeviceId()),
    stateDir: z.string().default(defaultStateDir('agent')),
    /** the hub; without it the agent runs offline-only (supervision and local API still work) */
    hub: z
      .object({
        url: z.string().regex(/^mqtts?:\/\//, 'hub.url must start with mqtt:// or mqtts://'),
        /** file with this device's token (mode 0600) */
        tokenFile: z.string(),
        /** MQTT keep-alive, seconds; the hub marks the device offline about 1.5x this after it goes silent */
        keepaliveS: z.number().int().min(1).max(3600).default(30),
        ...reconnectKeys,
      })
      .strict()
      .optional(),
    /** the durable store-and-forward queue towards the hub, under <stateDir>/outbox */
    outbox: OutboxConfigSchema.prefault({}),
    uplink: UplinkConfigSchema.prefault({}),
    api: z
      .object({
        /** 127.0.0.1 by default; any other address requires tokens for every call */
        host: z.string().default('127.0.0.1'),
        port: z.number().int().min(0).max(65535).default(8484),
        portFallback: z.boolean().default(false),
        /** requests per second per client address */
        rateLimit: z.number().int().min(0).default(20),
      })
      .strict()
      .default({ host: '127.0.0.1', port: 8484, portFallback: false, rateLimit: 20 }),
    metrics: z
      .object({
        /** sampling period of the per-second figures, ms */
        sampleMs: z.number().int().min(100).max(3_600_000).default(1000),
        /** how often samples go upstream as one telemetry batch, ms */
        publishMs: z.number().int().min(100).max(3_600_000).default(10_000),
      })
      .strict()
      .default({ sampleMs: 1000, publishMs: 10_000 }),
    apps: z.array(AppSpecSchema).default([]),
    jobs: z.array(JobSpecSchema).default([]),
    /** the updater: bundles from the hub, the local API and a watched directory (docs/ota.md) */
    update: UpdateConfigSchema.prefault({}),
    supervisor: z
      .object({
        /** restarts within crashLoopWindowMs that put an app in crash-loop */
        crashLoopRestarts: z.number().int().min(2).max(1000).default(5),
        crashLoopWindowMs: z.number().int().min(1000).max(86_400_000).default(60_000),
        /** restart backoff: PM2's defaults */
        backoffInitialMs: z.number().int().min(10).max(600_000).default(100),
        backoffFactor: z.number().min(1).max(10).default(1.5),
        backoffMaxMs: z.number().int().min(10).max(3_600_000).default(15_000),
        /** a run this long resets the backoff and leaves crash-loop */
        backoffResetAfterMs: z.number().int().min(100).max(86_400_000).default(30_000),
      })
      .strict()
      .prefault({}),
  })
  .strict()
  .superRefine((c, ctx) => {
    const seen = new Set<string>();
    c.apps.forEach((a, i) => {
      if (seen.has(a.name)) ctx.addIssue({ code: 'custom', path: ['apps', i, 'name'], message: `duplicate app name "${a.name}"` });
      seen.add(a.name);
    });
    const jobs = new Set<string>();
    c.jobs.forEach((j, i) => {
      if (jobs.has(j.name)) ctx.addIssue({ code: 'custom', path: ['jobs', i, 'name'], message: `duplicate job name "${j.name}"` });
      jobs.add(j.name);
      if (j.restartApp !== undefined && !seen.has(j.restartApp)) ctx.addIssue({ code: 'custom', path: ['jobs', i, 'restartApp'], message: `no app named "${j.restartApp}"` });
    });
  });

export type AgentConfig = z.infer<typeof AgentConfigSchema>;
