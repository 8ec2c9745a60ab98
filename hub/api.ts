import { z } from 'zod';
import { FleetError, isFleetError } from '../core/errors.ts';
import { Router, sendJson, sendText } from '../core/http.ts';
import type { Logger } from '../core/log.ts';
import { DesiredAppSchema, DesiredArtifactSchema, DesiredSchema, type DesiredState } from '../core/messages.ts';
import { PROM_CONTENT_TYPE, type MetricsRegistry } from '../core/metrics.ts';
import { assertDeviceId } from '../core/topics.ts';
import type { ArtifactStore } from './artifacts.ts';
import type { CommandRecord } from './commands.ts';
import type { DeadLetters } from './dead-letters.ts';
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
  /** store a command and send it when the device can receive it (hub/commands.ts) */
  sendCommand(deviceId: string, name: string, args: Record<string, unknown>, ttlMs: number): Promise<CommandRecord>;
  commands: {
    list(deviceId: string, limit: number): { open: number; commands: CommandRecord[] };
    get(deviceId: string, id: string): CommandRecord | undefined;
  };
  /** bundles for devices (hub/artifacts.ts) */
  artifacts?: ArtifactStore;
  /** messages acknowledged but not routed (hub/dead-letters.ts) */
  deadLetters?: Pick<DeadLetters, 'list' | 'stats'>;
  /** MCUs revoked fleet-wide (hub/revocations.ts); `set` resolves to whether the list changed, once it is on disk and sent to the gateways */
  mcuRevocations?: RevocationList;
  /** agents and gateways revoked (hub/revocations.ts); `set` resolves to whether the list changed, once it is on disk and the device cut off */
  deviceRevocations?: RevocationList;
}

interface RevocationList {
  list(): Array<{ id: string; revokedAt: number }>;
  set(id: string, revoked: boolean): Promise<boolean>;
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

/** An integer query parameter: absent → `def`; above `max` → `max`; anything but a non-negative integer → 400. */
function intParam(url: URL, name: string, def: number, max: number): number {
  const raw = url.searchParams.get(name);
  if (raw === null || raw === '') return def;
  if (!/^\d{1,15}$/.test(raw)) throw new FleetError('FLEET_HTTP_BAD_REQUEST', `query parameter ${name} must be a non-negative integer`);
  return Math.min(max, Number(raw));
}

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
  if (d.deadLetters) {
    const dl = d.deadLetters;
    r.get(
      '/api/v1/dead-letters',
      async (ctx) => {
        const after = ctx.url.searchParams.get('after') ?? undefined;
        if (after !== undefined && !/^[0-9]{15}![0-9]{9}$/.test(after)) throw new FleetError('FLEET_HTTP_BAD_REQUEST', 'query parameter after must be the id of a dead letter');
        const items = await dl.list(intParam(ctx.url, 'limit', 100, 1000), after);
        // oldest first; the next page starts after the last id
        return { ...dl.stats(), deadLetters: items, next: items.at(-1)?.id ?? null };
      },
      read,
    );
  }
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
      try {
        const cmd = await d.sendCommand(id, body.name, body.args, body.ttlMs);
        // stored on disk by now: the hub delivers it whenever the device can receive it
        ctx.res.statusCode = 202;
        return cmd;
      } catch (err) {
        // the device's queue is full: a temporary refusal the caller may retry (core/http.ts
        // knows no status for this code, so the answer is written here)
        if (!isFleetError(err, 'FLEET_COMMAND_QUEUE_FULL')) throw err;
        ctx.res.setHeader('retry-after', '30');
        sendJson(ctx.res, 429, { error: err.toJSON() });
        return undefined;
      }
    },
    write,
  );
  r.get(
    '/api/v1/devices/:id/commands',
    (ctx) => {
      const id = assertDeviceId(ctx.params.id);
      // newest first; at most the history the store keeps (50 finished + 100 open)
      return d.commands.list(id, intParam(ctx.url, 'limit', 50, 200));
    },
    read,
  );
  r.get(
    '/api/v1/devices/:id/commands/:cid',
    (ctx) => {
      const id = assertDeviceId(ctx.params.id);
      const cmd = d.commands.get(id, ctx.params.cid ?? '');
      if (!cmd) throw new FleetError('FLEET_HTTP_NOT_FOUND', `no command ${ctx.params.cid} for ${id}`);
      return cmd;
    },
    read,
  );
  const revocations = (path: string, rv: RevocationList): void => {
    r.get(`/api/v1/${path}`, () => ({ revoked: rv.list() }), read);
    // PUT revokes, DELETE lifts it; both idempotent (changed says whether this call did it)
    r.put(`/api/v1/${path}/:id`, async (ctx) => {
      const id = assertDeviceId(ctx.params.id);
      return { id, revoked: true, changed: await rv.set(id, true) };
    }, write);
    r.delete(`/api/v1/${path}/:id`, async (ctx) => {
      const id = assertDeviceId(ctx.params.id);
      return { id, revoked: false, changed: await rv.set(id, false) };
    }, write);
  };
  if (d.mcuRevocations) revocations('mcu-revocations', d.mcuRevocations);
  if (d.deviceRevocations) revocations('device-revocations', d.deviceRevocations);
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
