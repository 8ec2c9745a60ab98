import { FleetError } from '../core/errors.ts';
import { Router, sendText, type TokenRole } from '../core/http.ts';
import type { Logger } from '../core/log.ts';
import { PROM_CONTENT_TYPE, type MetricsRegistry } from '../core/metrics.ts';
import { PAGE_HTML } from './page.ts';
import type { Supervisor } from './supervisor.ts';

export interface AgentApiDeps {
  log: Logger;
  supervisor: Supervisor;
  metrics: MetricsRegistry;
  tokens: readonly TokenRole[];
  /** GETs without a token: only when the API listens on loopback */
  openReads: boolean;
  rateLimit: number;
  status(): Record<string, unknown>;
  history(): Array<{ t: number; cpu: number | null; mem: number }>;
  ready(): boolean;
}

export const ROLES = { READONLY: 'readonly', TECHNICIAN: 'technician' } as const;

/** The local API for field technicians (docs/agent.md#local-api). */
export function buildAgentApi(d: AgentApiDeps): Router {
  const r = new Router({ log: d.log, tokens: () => d.tokens, rateLimit: d.rateLimit, bodyLimit: 16 * 1024 });
  const read = d.openReads ? undefined : [ROLES.READONLY, ROLES.TECHNICIAN];
  const write = [ROLES.TECHNICIAN];
  const app = (name: string | undefined) => {
    const a = name ? d.supervisor.apps.get(name) : undefined;
    if (!a) throw new FleetError('FLEET_APP_NOT_FOUND', `no app named ${JSON.stringify(name)}`);
    return a;
  };

  r.get('/', (ctx) => {
    ctx.res.setHeader('content-security-policy', "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data:");
    sendText(ctx.res, 200, 'text/html; charset=utf-8', PAGE_HTML);
  }, read);
  r.get('/health', () => ({ status: 'ok' }));
  r.get('/ready', (ctx) => {
    if (d.ready()) return { status: 'ready' };
    ctx.res.statusCode = 503;
    return { status: 'not-ready' };
  });
  r.get('/metrics', (ctx) => sendText(ctx.res, 200, PROM_CONTENT_TYPE, d.metrics.render()), read);
  r.get('/api/v1/status', () => d.status(), read);
  r.get('/api/v1/metrics/history', () => ({ points: d.history() }), read);
  r.get('/api/v1/apps', () => ({ apps: d.supervisor.status() }), read);
  r.get('/api/v1/apps/:name', (ctx) => app(ctx.params.name).status(), read);
  r.get('/api/v1/apps/:name/logs', (ctx) => {
    const n = Math.min(500, Math.max(1, Number(ctx.url.searchParams.get('lines') ?? 100) || 100));
    return { lines: app(ctx.params.name).lines.slice(-n) };
  }, read);
  r.post('/api/v1/apps/:name/restart', async (ctx) => {
    const a = app(ctx.params.name);
    d.log.info('app restart requested', { app: a.spec.name, via: 'local-api' });
    await a.restart();
    return a.status();
  }, write);
  r.post('/api/v1/apps/:name/stop', async (ctx) => {
    const a = app(ctx.params.name);
    await a.stop();
    return a.status();
  }, write);
  r.post('/api/v1/apps/:name/start', (ctx) => {
    const a = app(ctx.params.name);
    a.start();
    return a.status();
  }, write);
  return r;
}
