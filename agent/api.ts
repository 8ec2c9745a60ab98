import type { IncomingMessage, ServerResponse } from 'node:http';
import { isIPv4 } from 'node:net';
import { FleetError } from '../core/errors.ts';
import { roleForRequest, Router, sendError, sendJson, sendText, type Ctx, type TokenRole } from '../core/http.ts';
import type { Logger } from '../core/log.ts';
import { PROM_CONTENT_TYPE, type MetricsRegistry } from '../core/metrics.ts';
import { isLoopback } from '../core/net.ts';
import type { EventLog } from './events.ts';
import type { MetricsHistory } from './history.ts';
import { PAGE_CSS, PAGE_HTML, PAGE_JS } from './page.ts';
import type { AppStatus, LogLine, Supervisor } from './supervisor.ts';
import type { JobScheduler } from './jobs.ts';

export interface AgentApiDeps {
  log: Logger;
  supervisor: Supervisor;
  metrics: MetricsRegistry;
  tokens: readonly TokenRole[];
  /** GETs without a token: only when the API listens on loopback (and the Host header is a loopback name) */
  openReads: boolean;
  /** requests per second per client address (burst 2x); 0 disables */
  rateLimit: number;
  status(): Record<string, unknown>;
  /** device CPU and memory (percent), downsampled (agent/history.ts) */
  history: MetricsHistory<'cpu' | 'mem'>;
  /** the agent's recent events (agent/events.ts) */
  events: EventLog;
  /** the supervisor has applied the config and the outbox is open */
  ready(): boolean;
  /** the link to the hub, for /health/detailed (absent: no uplink check) */
  uplink?(): UplinkHealth;
  /** installs the next trust root(s) from a root.json document (absent: no bundle support) */
  rotateTrust?: ((doc: Buffer) => { applied: number[]; version: number }) | undefined;
  /** scheduled jobs (agent/jobs.ts) */
  jobs?: JobScheduler;
  /** the updater (agent/update, docs/ota.md); null: not enabled */
  updates?: { status(): unknown; acceptUpload(req: IncomingMessage): Promise<unknown> } | null;
  /** most server-sent-event streams open at once, all clients together; default 8 */
  maxStreams?: number;
  /** comment line sent on idle streams so proxies and clients see the stream alive, ms; default 15_000 */
  heartbeatMs?: number;
}

export interface UplinkHealth {
  configured: boolean;
  connected: boolean;
  /** records waiting in the outbox */
  depth: number;
  oldestAgeMs: number;
}

/** One check of /health/detailed (status words as in the IETF health-check draft: pass, warn, fail). */
export interface HealthCheck {
  name: string;
  status: 'pass' | 'warn' | 'fail';
  message: string;
  durationMs: number;
}

export interface AgentApi {
  /** the node:http request listener */
  handle(req: IncomingMessage, res: ServerResponse): Promise<void>;
  /** open server-sent-event streams */
  streams(): number;
  /** End every stream with an `end` event and turn /ready to 503; call first when the agent stops. */
  close(): void;
}

export const ROLES = { READONLY: 'readonly', TECHNICIAN: 'technician' } as const;

/** JSON bodies of mutating calls (none takes more than a few fields). */
export const BODY_LIMIT = 16 * 1024;
/** a slow SSE reader gets lines dropped (and a `gap` event) beyond this much unsent output */
const STREAM_BUFFER_LIMIT = 256 * 1024;
const MAX_TAIL = 500;
const MAX_FILE_TAIL = 5000;

/** Routes anyone may GET: the page and its assets hold no device data, and probes need no token. */
const PUBLIC_PATHS = new Set(['/', '/page.js', '/page.css', '/health', '/ready']);
const CHECK_ORDER = { pass: 0, warn: 1, fail: 2 } as const;

/**
 * Content-Security-Policy of the page: nothing but this origin, no inline script or style
 * (the script and style are served as /page.js and /page.css from inside the binary).
 */
export const PAGE_CSP =
  "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

function pageHeaders(res: ServerResponse): void {
  res.setHeader('content-security-policy', PAGE_CSP);
  res.setHeader('x-content-type-options', 'nosniff');
  res.setHeader('referrer-policy', 'no-referrer');
  res.setHeader('x-frame-options', 'DENY');
  res.setHeader('cache-control', 'no-cache');
}

/**
 * A Host header naming this machine. With open reads on loopback, a page on another site
 * could rebind its own DNS name to 127.0.0.1 and read the API from the technician's
 * browser (DNS rebinding); such requests carry the attacker's name in Host, so they
 * need a token like any LAN request.
 */
export function loopbackHost(host: string | undefined): boolean {
  if (!host) return false;
  try {
    const name = new URL(`http://${host}`).hostname.replace(/^\[(.*)\]$/, '$1');
    // an exact name or address: `127.0.0.1.evil.example` is a DNS name anyone can point anywhere
    return name === 'localhost' || name === '::1' || (isIPv4(name) && isLoopback(name));
  } catch {
    return false;
  }
}

/** An integer query parameter: absent → `def`; above `max` → `max`; anything but a non-negative integer → 400. */
function intParam(url: URL, name: string, def: number, max: number): number {
  const raw = url.searchParams.get(name);
  if (raw === null || raw === '') return def;
  if (!/^\d{1,15}$/.test(raw)) throw new FleetError('FLEET_HTTP_BAD_REQUEST', `query parameter ${name} must be a non-negative integer`);
  return Math.min(max, Number(raw));
}

/** One server-sent-event stream (https://html.spec.whatwg.org/multipage/server-sent-events.html). */
class SseStream {
  private dropped = 0;
  private readonly beat: NodeJS.Timeout;
  closed = false;

  constructor(
    private readonly res: ServerResponse,
    heartbeatMs: number,
    private readonly onClose: () => void,
  ) {
    res.writeHead(200, {
      'content-type': 'text/event-stream; charset=utf-8',
      'cache-control': 'no-store',
      'x-content-type-options': 'nosniff',
      // reverse proxies (nginx) must not buffer the stream
      'x-accel-buffering': 'no',
    });
    // `retry` tells an EventSource how long to wait before reconnecting, ms
    res.write('retry: 3000\n\n');
    this.beat = setInterval(() => this.write(`: heartbeat ${Date.now()}\n\n`), heartbeatMs);
    this.beat.unref();
    // the client went away (or the socket was destroyed): release the slot
    res.once('close', () => this.dispose());
  }

  /** One event; `data` is JSON, which never contains a raw line break, so it is one `data:` line. */
  send(event: string, data: unknown): void {
    if (this.closed) return;
    if (this.res.writableLength > STREAM_BUFFER_LIMIT) {
      this.dropped++;
      return;
    }
    if (this.dropped > 0) {
      this.write(`event: gap\ndata: ${JSON.stringify({ dropped: this.dropped })}\n\n`);
      this.dropped = 0;
    }
    this.write(`event: ${event}\ndata: ${JSON.stringify(data)}\n\n`);
  }

  private write(chunk: string): void {
    if (!this.closed) this.res.write(chunk);
  }

  end(event: string, data: unknown): void {
    if (this.closed) return;
    this.send(event, data);
    this.res.end();
    this.dispose();
  }

  private dispose(): void {
    if (this.closed) return;
    this.closed = true;
    clearInterval(this.beat);
    this.onClose();
  }
}

/** The local API for field technicians (docs/api.md, "Agent local API"). */
export function buildAgentApi(d: AgentApiDeps): AgentApi {
  const r = new Router({ log: d.log, tokens: () => d.tokens, rateLimit: d.rateLimit, bodyLimit: BODY_LIMIT });
  const read = d.openReads ? undefined : [ROLES.READONLY, ROLES.TECHNICIAN];
  const write = [ROLES.TECHNICIAN];
  const maxStreams = d.maxStreams ?? 8;
  const heartbeatMs = d.heartbeatMs ?? 15_000;
  let closing = false;

  const app = (name: string | undefined) => {
    const a = name ? d.supervisor.apps.get(name) : undefined;
    if (!a) throw new FleetError('FLEET_APP_NOT_FOUND', `no app named ${JSON.stringify(name)}`);
    return a;
  };
  /** Mutating calls take an optional JSON body; reading it enforces the size bound (413) and JSON syntax (400). */
  const writeCall = (fn: (ctx: Ctx) => Promise<unknown> | unknown) => async (ctx: Ctx) => {
    await ctx.body();
    return fn(ctx);
  };

  // --- log followers: one supervisor listener fans out to every open stream
  const followers = new Map<SseStream, string>();
  const onLine = (l: LogLine) => {
    for (const [s, name] of followers) if (name === l.app) s.send('line', l);
  };
  const onChange = (st: AppStatus) => {
    for (const [s, name] of followers) if (name === st.name) s.send('state', { app: st.name, state: st.state, pid: st.pid, restarts: st.restarts, t: Date.now() });
  };
  d.supervisor.on('line', onLine);
  d.supervisor.on('change', onChange);
  d.metrics.gaugeFn('fleet_agent_api_streams', 'Server-sent-event streams (log followers) open on the local API', () => followers.size);

  r.get('/', (ctx) => {
    pageHeaders(ctx.res);
    sendText(ctx.res, 200, 'text/html; charset=utf-8', PAGE_HTML);
  });
  r.get('/page.js', (ctx) => {
    pageHeaders(ctx.res);
    sendText(ctx.res, 200, 'text/javascript; charset=utf-8', PAGE_JS);
  });
  r.get('/page.css', (ctx) => {
    pageHeaders(ctx.res);
    sendText(ctx.res, 200, 'text/css; charset=utf-8', PAGE_CSS);
  });
  r.get('/health', () => ({ status: 'ok' }));
  r.get('/ready', (ctx) => {
    if (!closing && d.ready()) return { status: 'ready' };
    // sent here: the router answers whatever a handler returns with 200
    sendJson(ctx.res, 503, { status: closing ? 'stopping' : 'not-ready' });
    return undefined;
  });
  r.get('/health/detailed', (ctx) => {
    const checks: HealthCheck[] = [];
    const check = (name: string, fn: () => Omit<HealthCheck, 'name' | 'durationMs'>) => {
      const t0 = performance.now();
      let out: Omit<HealthCheck, 'name' | 'durationMs'>;
      try {
        out = fn();
      } catch (err) {
        out = { status: 'fail', message: err instanceof Error ? err.message : String(err) };
      }
      checks.push({ name, ...out, durationMs: Math.round((performance.now() - t0) * 1000) / 1000 });
    };
    check('api', () => (closing ? { status: 'fail', message: 'the agent is stopping' } : { status: 'pass', message: `${followers.size}/${maxStreams} log streams open` }));
    check('ready', () => (d.ready() ? { status: 'pass', message: 'config applied, outbox open' } : { status: 'fail', message: 'not ready' }));
    check('apps', () => {
      const apps = d.supervisor.status();
      const looping = apps.filter((a) => a.state === 'crash-loop' || a.crashLoop).map((a) => a.name);
      const unhealthy = apps.filter((a) => a.health?.status === 'unhealthy').map((a) => a.name);
      const bad = [...(looping.length ? [`crash-looping: ${looping.join(', ')}`] : []), ...(unhealthy.length ? [`unhealthy: ${unhealthy.join(', ')}`] : [])];
      // an app's trouble is the app's, not the agent's: warn, never fail
      return bad.length ? { status: 'warn', message: bad.join('; ') } : { status: 'pass', message: `${apps.length} apps, none crash-looping or unhealthy` };
    });
    if (d.uplink) {
      const uplink = d.uplink;
      check('uplink', () => {
        const u = uplink();
        const queued = `${u.depth} queued${u.depth ? `, oldest ${Math.round(u.oldestAgeMs / 1000)} s` : ''}`;
        if (!u.configured) return { status: 'pass', message: `no hub configured; ${queued}` };
        // offline is the normal life of an edge device: the outbox keeps everything
        return u.connected ? { status: 'pass', message: `connected; ${queued}` } : { status: 'warn', message: `offline; ${queued}` };
      });
    }
    const status = checks.reduce<HealthCheck['status']>((w, c) => (CHECK_ORDER[c.status] > CHECK_ORDER[w] ? c.status : w), 'pass');
    sendJson(ctx.res, status === 'fail' ? 503 : 200, { status, checks });
    return undefined;
  }, read);
  r.get('/metrics', (ctx) => sendText(ctx.res, 200, PROM_CONTENT_TYPE, d.metrics.render()), read);
  r.get('/api/v1/status', () => ({ ...d.status(), node: process.versions.node }), read);
  r.get('/api/v1/metrics/history', () => ({
    bucketMs: d.history.bucketMs,
    spanMs: d.history.spanMs,
    points: d.history.points().map((p) => ({ t: p.t, n: p.n, ...p.values })),
  }), read);
  r.get('/api/v1/events', (ctx) => {
    const page = d.events.since(intParam(ctx.url, 'since', 0, Number.MAX_SAFE_INTEGER), intParam(ctx.url, 'limit', d.events.capacity, d.events.capacity));
    return { ...page, last: d.events.last };
  }, read);
  r.get('/api/v1/apps', () => ({ apps: d.supervisor.status() }), read);
  r.get('/api/v1/apps/:name', (ctx) => app(ctx.params.name).status(), read);
  r.get('/api/v1/apps/:name/logs', (ctx) => {
    const a = app(ctx.params.name);
    // ?source=file reads the rotating log files (older than the 500 lines kept in memory)
    if (ctx.url.searchParams.get('source') === 'file') {
      if (!a.file) throw new FleetError('FLEET_HTTP_NOT_FOUND', `app ${a.spec.name} has no log files`);
      const n = Math.max(1, intParam(ctx.url, 'lines', 100, MAX_FILE_TAIL));
      return { file: a.file.path, files: a.file.files(), text: a.file.tail(n) };
    }
    const n = Math.max(1, intParam(ctx.url, 'lines', 100, MAX_TAIL));
    return { lines: a.lines.slice(-n) };
  }, read);
  r.get('/api/v1/apps/:name/logs/follow', (ctx) => {
    const a = app(ctx.params.name);
    const backlog = intParam(ctx.url, 'lines', 50, MAX_TAIL);
    if (closing || followers.size >= maxStreams) {
      // 503 + Retry-After: the limit is the agent's, not this client's (so not 429)
      ctx.res.setHeader('retry-after', '5');
      const why = closing ? 'the agent is stopping' : `${maxStreams} log streams are open already; retry later`;
      sendJson(ctx.res, 503, { error: new FleetError('FLEET_HTTP_TOO_MANY_STREAMS', why).toJSON() });
      return;
    }
    if (ctx.req.method === 'HEAD') {
      // no stream for HEAD: it would hold a slot with nothing to carry
      ctx.res.writeHead(200, { 'content-type': 'text/event-stream; charset=utf-8', 'cache-control': 'no-store' });
      ctx.res.end();
      return;
    }
    const name = a.spec.name;
    const s = new SseStream(ctx.res, heartbeatMs, () => followers.delete(s));
    // backlog and subscription in the same tick: no line is lost or sent twice in between
    if (backlog > 0) for (const l of a.lines.slice(-backlog)) s.send('line', l);
    const st = a.status();
    s.send('state', { app: name, state: st.state, pid: st.pid, restarts: st.restarts, t: Date.now() });
    if (!s.closed) followers.set(s, name);
  }, read);
  r.get('/api/v1/jobs', () => ({ jobs: d.jobs?.status() ?? [] }), read);
  // trust root rotation by hand (e.g. a device that missed rotations while offline): the body is
  // the next root.json, signed by the current root's threshold; 200 with the version now trusted
  r.post('/api/v1/trust/root', async (ctx) => {
    const body = await ctx.body(); // bounded and JSON-checked like every write body
    if (!d.rotateTrust) throw new FleetError('FLEET_HTTP_NOT_FOUND', 'bundle verification is not enabled on this agent');
    d.log.info('trust root upload', { via: 'local-api' });
    return d.rotateTrust(Buffer.from(JSON.stringify(body)));
  }, write);
  r.post('/api/v1/jobs/:name/run', writeCall((ctx) => {
    const name = ctx.params.name ?? '';
    if (!d.jobs?.has(name)) throw new FleetError('FLEET_JOB_NOT_FOUND', `no job named ${JSON.stringify(name)}`);
    d.log.info('job run requested', { job: name, via: 'local-api' });
    const started = d.jobs.tick(name);
    ctx.res.statusCode = started ? 202 : 409;
    return { job: name, started, reason: started ? undefined : 'still running; runs never overlap' };
  }), write);
  r.post('/api/v1/apps/:name/restart', writeCall(async (ctx) => {
    const a = app(ctx.params.name);
    d.log.info('app restart requested', { app: a.spec.name, via: 'local-api' });
    await a.restart();
    return a.status();
  }), write);
  r.post('/api/v1/apps/:name/stop', writeCall(async (ctx) => {
    const a = app(ctx.params.name);
    d.log.info('app stop requested', { app: a.spec.name, via: 'local-api' });
    await a.stop();
    return a.status();
  }), write);
  r.post('/api/v1/apps/:name/start', writeCall((ctx) => {
    const a = app(ctx.params.name);
    d.log.info('app start requested', { app: a.spec.name, via: 'local-api' });
    a.start();
    return a.status();
  }), write);
  // updates (docs/ota.md): the update in progress and the finished ones; upload a bundle as the raw body
  r.get('/api/v1/updates', () => d.updates?.status() ?? { current: null, queued: 0, history: [] }, read);
  r.post('/api/v1/updates', async (ctx) => {
    if (!d.updates) throw new FleetError('FLEET_HTTP_NOT_FOUND', 'the updater is not enabled on this agent');
    d.log.info('bundle upload', { via: 'local-api', bytes: ctx.req.headers['content-length'] });
    const queued = await d.updates.acceptUpload(ctx.req); // streamed to disk, bounded by update.maxBundleBytes
    ctx.res.statusCode = 202;
    return queued;
  }, write);

  return {
    handle: async (req, res) => {
      const path = URL.canParse(req.url ?? '/', 'http://local') ? new URL(req.url ?? '/', 'http://local').pathname : '';
      if (!PUBLIC_PATHS.has(path)) {
        const presented = req.headers.authorization !== undefined;
        // where reads are open, a token that is presented must still be valid (RFC 6750 §3.1
        // invalid_token), so a technician with a mistyped token learns it before pressing a button
        if ((presented || (d.openReads && !loopbackHost(req.headers.host))) && roleForRequest(req, d.tokens) === null) {
          const why = presented ? 'the bearer token is not valid' : 'a bearer token is required when the Host header is not a loopback address';
          sendError(res, new FleetError('FLEET_AUTH_FAILED', why));
          return;
        }
      }
      await r.handle(req, res);
    },
    streams: () => followers.size,
    close: () => {
      closing = true;
      d.supervisor.off('line', onLine);
      d.supervisor.off('change', onChange);
      for (const s of [...followers.keys()]) s.end('end', { reason: 'agent stopping' });
      followers.clear();
    },
  };
}
