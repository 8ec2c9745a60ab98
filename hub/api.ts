import { z } from 'zod';
import { FleetError } from '../core/errors.ts';
import { Router, sendText } from '../core/http.ts';
import type { Logger } from '../core/log.ts';
import { DesiredAppSchema, DesiredArtifactSchema, DesiredSchema, type Command, type DesiredState } from '../core/messages.ts';
import { PROM_CONTENT_TYPE, type MetricsRegistry } from '../core/metrics.ts';
import { assertDeviceId } from '../core/topics.ts';
import type { ArtifactStore } from './artifacts.ts';
import type { Registry } from './registry.ts';

export interface ApiDeps {
  log: Logger;
  registry: Registry;
  metrics: MetricsRegistry;
  operatorToken: string;
  /** allow GET without a token (loopback only) */
  openReads: boolean;
  rateLimit: number;
  ready: () => boolean;
  setDesired(deviceId: string, spec: DesiredSpec): Promise<DesiredState>;
  sendCommand(deviceId: string, name: string, args: Record<string, unknown>, ttlMs: number): Promise<Command>;
  /** bundles for devices (hub/artifacts.ts) */
  artifacts?: ArtifactStore;
}

const DesiredBody = z
  .object({
    apps: z.record(z.string(), DesiredAppSchema).default({}),
    agent: DesiredArtifactSchema.optional(),
    firmware: DesiredArtifactSchema.optional(),
    trustRoots: DesiredSchema.shape.trustRoots,
  })
  .strict();
/** what an operator sets; the hub adds v, rev and ts */
export type DesiredSpec = Pick<DesiredState, 'apps' | 'agent' | 'firmware' | 'trustRoots'>;
const CommandBody = z
  .object({
    name: z.string().min(1).max(64),
    args: z.record(z.string(), z.unknown()).default({}),
    /** time to live, ms; default 10 minutes, at most 7 days */
    ttlMs: z.number().int().min(1000).max(7 * 24 * 3600 * 1000).default(600_000),
  })
  .strict();

function parseBody<T>(schema: z.ZodType<T>, body: unknown): T {
  const r = schema.safeParse(body);
  if (!r.success) {
    const i = r.error.issues[0];
    throw new FleetError('FLEET_HTTP_BAD_REQUEST', `${i?.path.join('.') || '(body)'}: ${i?.message}`);
  }
  return r.data;
}

/** Operator HTTP API (docs/api.md). Writes always need the operator token. */
export function buildApi(d: ApiDeps): Router {
  const r = new Router({ log: d.log, tokens: () => [{ token: d.operatorToken, role: 'operator' }], rateLimit: d.rateLimit, bodyLimit: 256 * 1024 });
  const read = d.openReads ? undefined : ['operator'];
  const write = ['operator'];
  const started = Date.now();

  r.get('/health', () => ({ status: 'ok' }));
  r.get('/ready', (ctx) => {
    if (d.ready()) return { status: 'ready' };
    ctx.res.statusCode = 503;
    return { status: 'not-ready' };
  });
  r.get('/health/detailed', (ctx) => {
    const t0 = performance.now();
    const ok = d.ready();
    const checks = [{ name: 'broker', status: ok ? 'pass' : 'fail', message: ok ? 'accepting connections' : 'closed', durationMs: performance.now() - t0 }];
    if (!ok) ctx.res.statusCode = 503;
    return { status: ok ? 'pass' : 'fail', uptimeS: Math.round((Date.now() - started) / 1000), checks };
  });
  r.get('/metrics', (ctx) => sendText(ctx.res, 200, PROM_CONTENT_TYPE, d.metrics.render()));
  r.get('/api/v1/devices', () => ({ counts: d.registry.counts(), devices: d.registry.list() }), read);
  r.get(
    '/api/v1/devices/:id',
    (ctx) => {
      const dev = d.registry.get(assertDeviceId(ctx.params.id));
      if (!dev) throw new FleetError('FLEET_HTTP_NOT_FOUND', `no device ${ctx.params.id}`);
      return dev;
    },
    read,
  );
  r.put(
    '/api/v1/devices/:id/desired',
    async (ctx) => {
      const id = assertDeviceId(ctx.params.id);
      const body = parseBody(DesiredBody, await ctx.body());
      return d.setDesired(id, body);
    },
    write,
  );
  r.post(
    '/api/v1/devices/:id/commands',
    async (ctx) => {
      const id = assertDeviceId(ctx.params.id);
      const body = parseBody(CommandBody, await ctx.body());
      ctx.res.statusCode = 202;
      return d.sendCommand(id, body.name, body.args, body.ttlMs);
    },
    write,
  );
  if (d.artifacts) {
    const a = d.artifacts;
    // uploads stream past the router's JSON body limit; the store bounds them itself
    r.post('/api/v1/artifacts', (ctx) => a.upload(ctx), write);
    r.get('/api/v1/artifacts', () => ({ artifacts: a.list() }), read);
    // devices (Basic id:token) or the operator (Bearer): checked by the store
    r.get('/api/v1/artifacts/:sha256', (ctx) => a.download(ctx));
  }
  return r;
}
