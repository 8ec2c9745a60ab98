import { createHash, timingSafeEqual } from 'node:crypto';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo, Server as NetServer } from 'node:net';
import { FleetError, toFleetError, type ErrorCode } from './errors.ts';
import type { Logger } from './log.ts';

/**
 * A small JSON HTTP layer shared by the hub's operator API and the agent's local API:
 * exact-path and `:param` routes, bounded bodies, JSON errors with stable codes,
 * bearer tokens compared in constant time, a per-client token-bucket rate limit.
 */
export interface Ctx {
  req: IncomingMessage;
  res: ServerResponse;
  params: Record<string, string>;
  url: URL;
  /** role of the bearer token presented, or null when none/invalid */
  role: string | null;
  body(): Promise<unknown>;
}

export type Handler = (ctx: Ctx) => Promise<unknown> | unknown;

interface Route {
  method: string;
  parts: string[];
  handler: Handler;
  /** roles allowed; undefined = public */
  roles?: readonly string[];
}

const STATUS: Partial<Record<ErrorCode, number>> = {
  FLEET_AUTH_FAILED: 401,
  FLEET_FORBIDDEN: 403,
  FLEET_HTTP_NOT_FOUND: 404,
  FLEET_APP_NOT_FOUND: 404,
  FLEET_JOB_NOT_FOUND: 404,
  FLEET_HTTP_METHOD: 405,
  FLEET_HTTP_BODY_TOO_LARGE: 413,
  FLEET_HTTP_BAD_REQUEST: 400,
  FLEET_MSG_INVALID: 400,
  FLEET_DEVICE_ID_INVALID: 400,
  FLEET_HTTP_RATE_LIMITED: 429,
};

export function sendJson(res: ServerResponse, status: number, body: unknown): void {
  const text = JSON.stringify(body);
  res.writeHead(status, { 'content-type': 'application/json; charset=utf-8', 'content-length': Buffer.byteLength(text), 'cache-control': 'no-store' });
  res.end(text);
}

export function sendText(res: ServerResponse, status: number, contentType: string, body: string | Buffer): void {
  res.writeHead(status, { 'content-type': contentType, 'content-length': Buffer.byteLength(body) });
  res.end(body);
}

export function sendError(res: ServerResponse, err: unknown): void {
  const fe = toFleetError(err);
  // a refused bundle or update is the request's fault (422), not the server's
  const status = STATUS[fe.code] ?? (fe.code.startsWith('FLEET_BUNDLE_') ? 422 : 500);
  if (res.headersSent) {
    res.destroy();
    return;
  }
  if (fe.code === 'FLEET_AUTH_FAILED') res.setHeader('www-authenticate', 'Bearer');
  sendJson(res, status, { error: fe.toJSON() });
}

export async function readBody(req: IncomingMessage, limit: number): Promise<Buffer> {
  const declared = Number(req.headers['content-length'] ?? 0);
  if (declared > limit) throw new FleetError('FLEET_HTTP_BODY_TOO_LARGE', `body of ${declared} bytes exceeds ${limit}`);
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of req as AsyncIterable<Buffer>) {
    size += chunk.length;
    if (size > limit) throw new FleetError('FLEET_HTTP_BODY_TOO_LARGE', `body exceeds ${limit} bytes`);
    chunks.push(chunk);
  }
  return Buffer.concat(chunks);
}

/** Constant-time comparison of secrets of any length (hash first so lengths match). */
export function secretEquals(a: string, b: string): boolean {
  const ha = createHash('sha256').update(a).digest();
  const hb = createHash('sha256').update(b).digest();
  return timingSafeEqual(ha, hb) && a.length === b.length;
}

export interface TokenRole {
  token: string;
  role: string;
}

export function roleForRequest(req: IncomingMessage, tokens: readonly TokenRole[]): string | null {
  const h = req.headers.authorization;
  if (!h || !h.startsWith('Bearer ')) return null;
  const presented = h.slice(7).trim();
  let role: string | null = null;
  // check every token so timing does not reveal which one matched
  for (const t of tokens) if (secretEquals(presented, t.token)) role = t.role;
  return role;
}

export interface RouterOptions {
  log: Logger;
  tokens?: () => readonly TokenRole[];
  bodyLimit?: number;
  /** requests per second per client address, burst = 2x; 0 disables */
  rateLimit?: number;
}

export class Router {
  private readonly routes: Route[] = [];
  private readonly buckets = new Map<string, { tokens: number; at: number }>();
  constructor(private readonly opts: RouterOptions) {}

  add(method: string, path: string, handler: Handler, roles?: readonly string[]): this {
    this.routes.push({ method, parts: path.split('/').filter(Boolean), handler, ...(roles ? { roles } : {}) });
    return this;
  }
  get(path: string, h: Handler, roles?: readonly string[]): this {
    return this.add('GET', path, h, roles);
  }
  post(path: string, h: Handler, roles?: readonly string[]): this {
    return this.add('POST', path, h, roles);
  }
  put(path: string, h: Handler, roles?: readonly string[]): this {
    return this.add('PUT', path, h, roles);
  }
  delete(path: string, h: Handler, roles?: readonly string[]): this {
    return this.add('DELETE', path, h, roles);
  }

  private match(parts: string[]): Array<{ route: Route; params: Record<string, string> }> {
    const found: Array<{ route: Route; params: Record<string, string> }> = [];
    for (const route of this.routes) {
      if (route.parts.length !== parts.length) continue;
      const params: Record<string, string> = {};
      let ok = true;
      for (let i = 0; i < parts.length && ok; i++) {
        const want = route.parts[i]!;
        if (want.startsWith(':')) {
          try {
            params[want.slice(1)] = decodeURIComponent(parts[i]!);
          } catch {
            throw new FleetError('FLEET_HTTP_BAD_REQUEST', `bad percent-encoding in the path segment ${JSON.stringify(parts[i])}`);
          }
        }
        else ok = want === parts[i];
      }
      if (ok) found.push({ route, params });
    }
    return found;
  }

  private allow(key: string): boolean {
    const rate = this.opts.rateLimit ?? 0;
    if (rate <= 0) return true;
    // the monotonic clock: a wall-clock step back (NTP) must not refuse every request until it catches up
    const now = performance.now();
    const b = this.buckets.get(key) ?? { tokens: rate * 2, at: now };
    b.tokens = Math.min(rate * 2, b.tokens + ((now - b.at) / 1000) * rate);
    b.at = now;
    if (this.buckets.size > 10_000) this.buckets.clear(); // bounded memory under address churn
    this.buckets.set(key, b);
    if (b.tokens < 1) return false;
    b.tokens -= 1;
    return true;
  }

  handle = async (req: IncomingMessage, res: ServerResponse): Promise<void> => {
    try {
      if (!this.allow(req.socket.remoteAddress ?? '?')) {
        res.setHeader('retry-after', '1');
        throw new FleetError('FLEET_HTTP_RATE_LIMITED', 'rate limit exceeded');
      }
      const url = new URL(req.url ?? '/', 'http://local');
      const candidates = this.match(url.pathname.split('/').filter(Boolean));
      if (candidates.length === 0) throw new FleetError('FLEET_HTTP_NOT_FOUND', `no route ${url.pathname}`);
      const hit = candidates.find((c) => c.route.method === req.method || (req.method === 'HEAD' && c.route.method === 'GET'));
      if (!hit) throw new FleetError('FLEET_HTTP_METHOD', `${req.method} not allowed on ${url.pathname}`);
      const role = roleForRequest(req, this.opts.tokens?.() ?? []);
      if (hit.route.roles) {
        if (role === null) throw new FleetError('FLEET_AUTH_FAILED', 'a valid bearer token is required');
        if (!hit.route.roles.includes(role)) throw new FleetError('FLEET_FORBIDDEN', `role ${role} may not ${req.method} ${url.pathname}`);
      }
      const limit = this.opts.bodyLimit ?? 64 * 1024;
      const ctx: Ctx = {
        req,
        res,
        url,
        role,
        params: hit.params,
        body: async () => {
          const buf = await readBody(req, limit);
          if (buf.length === 0) return {};
          try {
            return JSON.parse(buf.toString('utf8'));
          } catch {
            throw new FleetError('FLEET_HTTP_BAD_REQUEST', 'body is not valid JSON');
          }
        },
      };
      const out = await hit.route.handler(ctx);
      // a handler may set another status (202, 201, 503) before returning its body
      if (!res.headersSent && !res.writableEnded) sendJson(res, res.statusCode, out ?? { ok: true });
    } catch (err) {
      const fe = toFleetError(err);
      if (fe.code === 'FLEET_INTERNAL') this.opts.log.error('http handler failed', { url: req.url, err: fe.cause ?? fe });
      sendError(res, fe);
    }
  };
}

export interface Listening {
  server: Server;
  port: number;
  host: string;
  close(): Promise<void>;
}

/** Listen on host:port; when `fallback` and the port is taken, take a free one instead. */
export async function listenHttp(handler: (req: IncomingMessage, res: ServerResponse) => void, host: string, port: number, fallback = false): Promise<Listening> {
  const server = createServer(handler);
  server.headersTimeout = 10_000;
  server.requestTimeout = 30_000;
  const bound = await listenOn(server, host, port, fallback);
  return {
    server,
    port: bound,
    host,
    close: () =>
      new Promise<void>((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}

/** Bind any net.Server; returns the bound port. */
export function listenOn(server: NetServer, host: string, port: number, fallback: boolean): Promise<number> {
  return new Promise((resolve, reject) => {
    const onError = (err: NodeJS.ErrnoException) => {
      if (err.code === 'EADDRINUSE' && fallback && port !== 0) {
        port = 0; // the default is taken: any free port will do (the demo prints what it got)
        server.once('error', onError);
        server.listen(0, host);
        return;
      }
      server.off('listening', onListening);
      reject(new FleetError('FLEET_PORT_IN_USE', `cannot listen on ${host}:${port}: ${err.message}`, { cause: err }));
    };
    const onListening = () => {
      server.off('error', onError);
      resolve((server.address() as AddressInfo).port);
    };
    server.once('error', onError);
    server.once('listening', onListening);
    server.listen(port, host);
  });
}
