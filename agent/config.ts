import { hostname } from 'node:os';
import { z } from 'zod';
import { defaultStateDir } from '../core/config.ts';
import { DEVICE_ID_RE } from '../core/topics.ts';
import { OutboxConfigSchema, reconnectKeys, UplinkConfigSchema } from '../core/outbox-config.ts';

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
  })
  .strict();
export type AppSpec = z.infer<typeof AppSpecSchema>;

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
  })
  .strict()
  .superRefine((c, ctx) => {
    const seen = new Set<string>();
    c.apps.forEach((a, i) => {
      if (seen.has(a.name)) ctx.addIssue({ code: 'custom', path: ['apps', i, 'name'], message: `duplicate app name "${a.name}"` });
      seen.add(a.name);
    });
  });

export type AgentConfig = z.infer<typeof AgentConfigSchema>;
