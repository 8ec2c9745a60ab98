import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, statSync, writeFileSync } from 'node:fs';
import { request, type IncomingHttpHeaders } from 'node:http';
import { join } from 'node:path';
import { buildAgentApi, loopbackHost, PAGE_CSP, ROLES } from '../../agent/api.ts';
import { AgentConfigSchema, AppSpecSchema } from '../../agent/config.ts';
import { EventLog } from '../../agent/events.ts';
import { MetricsHistory } from '../../agent/history.ts';
import { startAgent } from '../../agent/index.ts';
import { Supervisor } from '../../agent/supervisor.ts';
import { loadConfig } from '../../core/config.ts';
import { isFleetError } from '../../core/errors.ts';
import { listenHttp } from '../../core/http.ts';
import { MetricsRegistry } from '../../core/metrics.ts';
import { tempDir, testLogger, waitFor } from '../helpers.ts';

type ErrorBody = { error: { code: string; message: string } };
const code = async (r: Response) => ((await r.json()) as ErrorBody).error.code;

/** A raw GET (node:http, so the Host header can be set) collecting the body as it streams. */
interface Sse {
  status: number;
  headers: IncomingHttpHeaders;
  /** parsed events so far (comments excluded) */
  events: Array<{ event: string; data: unknown }>;
  /** comment lines (heartbeats) so far */
  comments: string[];
  raw: string;
  ended: Promise<void>;
  close(): void;
}
function get(port: number, path: string, headers: Record<string, string> = {}): Promise<Sse> {
  return new Promise((resolve, reject) => {
    const req = request({ host: '127.0.0.1', port, path, headers }, (res) => {
      const out: Sse = {
        status: res.statusCode ?? 0,
        headers: res.headers,
        events: [],
        comments: [],
        raw: '',
        ended: new Promise((r) => res.once('close', () => r())),
        close: () => req.destroy(),
      };
      let buf = '';
      res.setEncoding('utf8');
      res.on('data', (chunk: string) => {
        out.raw += chunk;
        buf += chunk;
        let i: number;
        while ((i = buf.indexOf('\n\n')) >= 0) {
          const block = buf.slice(0, i);
          buf = buf.slice(i + 2);
          let event = 'message';
          const data: string[] = [];
          for (const line of block.split('\n')) {
            if (line.startsWith(':')) out.comments.push(line);
            else if (line.startsWith('event: ')) event = line.slice(7);
            else if (line.startsWith('data: ')) data.push(line.slice(6));
          }
          if (data.length) out.events.push({ event, data: JSON.parse(data.join('\n')) as unknown });
        }
      });
      res.on('error', () => {});
      resolve(out);
    });
    req.on('error', reject);
    req.end();
  });
}

test('agent API: reads open on loopback; writes need the technician token; read-only token refused on writes', async () => {
  const tmp = tempDir();
  const agent = await startAgent(
    AgentConfigSchema.parse({
      deviceId: 'dev-api',
      stateDir: tmp.dir,
      api: { port: 0 },
      apps: [{ name: 'sleeper', command: '/bin/sh', args: ['-c', 'echo started; exec sleep 60'] }],
    }),
    testLogger(),
    '9.9.9',
  );
  const base = `http://127.0.0.1:${agent.apiPort}`;
  try {
    for (const f of Object.values(agent.tokenFiles)) assert.equal(statSync(f).mode & 0o777, 0o600, `${f} is 0600`);
    const tech = readFileSync(agent.tokenFiles.technician, 'utf8').trim();
    const ro = readFileSync(agent.tokenFiles.readonly, 'utf8').trim();
    const status = (await (await fetch(`${base}/api/v1/status`)).json()) as { deviceId: string; version: string; apps: Array<{ name: string }> };
    assert.equal(status.deviceId, 'dev-api');
    assert.equal(status.version, '9.9.9');
    assert.deepEqual(status.apps.map((a) => a.name), ['sleeper']);
    await waitFor(() => agent.supervisor.apps.get('sleeper')?.state === 'running', 'running');

    const restart = (auth?: string) => fetch(`${base}/api/v1/apps/sleeper/restart`, { method: 'POST', headers: auth ? { authorization: `Bearer ${auth}` } : {} });
    const missing = await restart();
    assert.equal(missing.status, 401);
    assert.equal(((await missing.json()) as { error: { code: string } }).error.code, 'FLEET_AUTH_FAILED');
    assert.equal((await restart('not-the-token-at-all')).status, 401);
    const forbidden = await restart(ro);
    assert.equal(forbidden.status, 403);
    assert.equal(((await forbidden.json()) as { error: { code: string } }).error.code, 'FLEET_FORBIDDEN');
    const ok = await restart(tech);
    assert.equal(ok.status, 200);
    assert.equal(((await ok.json()) as { restarts: number }).restarts, 1);

    // bodies are bounded (16 KiB) and must be JSON when present
    const big = await fetch(`${base}/api/v1/apps/sleeper/restart`, { method: 'POST', headers: { authorization: `Bearer ${tech}`, 'content-type': 'application/json' }, body: JSON.stringify({ pad: 'x'.repeat(20_000) }) });
    assert.equal(big.status, 413);
    assert.equal(await code(big), 'FLEET_HTTP_BODY_TOO_LARGE');
    const bad = await fetch(`${base}/api/v1/apps/sleeper/stop`, { method: 'POST', headers: { authorization: `Bearer ${tech}` }, body: '{nope' });
    assert.equal(bad.status, 400);
    assert.equal(await code(bad), 'FLEET_HTTP_BAD_REQUEST');
    assert.equal(agent.supervisor.apps.get('sleeper')?.restarts, 1, 'refused calls did nothing');
    const nope = await fetch(`${base}/api/v1/apps/ghost/restart`, { method: 'POST', headers: { authorization: `Bearer ${tech}` } });
    assert.equal(nope.status, 404);
    assert.equal(((await nope.json()) as { error: { code: string } }).error.code, 'FLEET_APP_NOT_FOUND');
    // 'running' is set at spawn, before the app's first output: wait for the line, through the API
    await waitFor(async () => ((await (await fetch(`${base}/api/v1/apps/sleeper/logs`)).json()) as { lines: Array<{ line: string }> }).lines.some((l) => l.line === 'started'), "the app's output in /logs");
    assert.equal((await fetch(`${base}/api/v1/apps/sleeper/logs?lines=-1`)).status, 400);
    const page = await fetch(`${base}/`);
    assert.equal(page.status, 200);
    assert.equal(page.headers.get('content-security-policy'), PAGE_CSP);
    assert.doesNotMatch(PAGE_CSP, /unsafe|http:|https:|\*/);
    const html = await page.text();
    assert.match(html, /<title>fleetlet device<\/title>/);
    assert.doesNotMatch(html, /<script>|<style>| style=| on[a-z]+=/, 'no inline script, style or handler (CSP allows none)');
    assert.match(html, /<script src="\/page\.js" defer><\/script>/);
    const js = await fetch(`${base}/page.js`);
    assert.equal(js.status, 200);
    assert.match(js.headers.get('content-type') ?? '', /^text\/javascript/);
    assert.doesNotMatch(await js.text(), /innerHTML|outerHTML|insertAdjacentHTML|document\.write|eval\(/, 'the page script never parses API data as HTML');
    assert.equal((await fetch(`${base}/page.css`)).status, 200);

    // readiness, detailed health, status
    assert.deepEqual(await (await fetch(`${base}/ready`)).json(), { status: 'ready' });
    const hd = await fetch(`${base}/health/detailed`);
    assert.equal(hd.status, 200);
    const hdb = (await hd.json()) as { status: string; checks: Array<{ name: string; status: string; message: string; durationMs: number }> };
    assert.equal(hdb.status, 'pass', JSON.stringify(hdb));
    assert.deepEqual(hdb.checks.map((c) => c.name), ['api', 'ready', 'apps', 'uplink']);
    assert.match(hdb.checks[3]!.message, /^no hub configured; \d+ queued/);
    assert.ok(hdb.checks.every((c) => typeof c.durationMs === 'number'));
    const st = (await (await fetch(`${base}/api/v1/status`)).json()) as { node: string; hub: { configured: boolean; outbox: { depth: number } } };
    assert.equal(st.node, process.versions.node);
    assert.equal(st.hub.configured, false);
    assert.equal(typeof st.hub.outbox.depth, 'number');

    // events: a cursor-paged ring of what the agent reported (app state changes here)
    const ev1 = (await (await fetch(`${base}/api/v1/events?since=0`)).json()) as { events: Array<{ seq: number; type: string; data: { app?: string } }>; next: number; last: number; truncated: boolean };
    assert.ok(ev1.events.some((e) => e.type === 'app.running' && e.data.app === 'sleeper'), JSON.stringify(ev1.events));
    assert.equal(ev1.next, ev1.events[ev1.events.length - 1]!.seq);
    assert.equal(ev1.truncated, false);
    // from the cursor on: only what came since (the agent's inventory event may land meanwhile)
    const ev2 = (await (await fetch(`${base}/api/v1/events?since=${ev1.next}`)).json()) as { events: Array<{ seq: number; type: string }>; next: number };
    assert.ok(ev2.events.every((e) => e.seq > ev1.next && !e.type.startsWith('app.')), JSON.stringify(ev2.events));
    assert.equal(ev2.next, ev2.events.at(-1)?.seq ?? ev1.next);
    assert.equal(await code(await fetch(`${base}/api/v1/events?since=abc`)), 'FLEET_HTTP_BAD_REQUEST');

    // metrics history: 10 s buckets over the last hour, min/avg/max
    const hist = (await (await fetch(`${base}/api/v1/metrics/history`)).json()) as { bucketMs: number; spanMs: number; points: unknown[] };
    assert.equal(hist.bucketMs, 10_000);
    assert.equal(hist.spanMs, 3_600_000);
    assert.ok(Array.isArray(hist.points));

    // DNS rebinding: open reads only for a loopback Host header; public paths stay public
    const port = agent.apiPort;
    assert.equal((await get(port, '/api/v1/status', { host: 'evil.example' })).status, 401);
    assert.equal((await get(port, '/api/v1/status', { host: `localhost:${port}` })).status, 200);
    assert.equal((await get(port, '/api/v1/status', { host: 'evil.example', authorization: `Bearer ${ro}` })).status, 200);
    assert.equal((await get(port, '/', { host: 'evil.example' })).status, 200);
    // where reads are open, a presented token must still be valid
    assert.equal(await code(await fetch(`${base}/api/v1/status`, { headers: { authorization: 'Bearer wrong' } })), 'FLEET_AUTH_FAILED');
    assert.equal((await fetch(`${base}/api/v1/status`, { headers: { authorization: `Bearer ${ro}` } })).status, 200);
    assert.equal((await fetch(`${base}/health`, { headers: { authorization: 'Bearer wrong' } })).status, 200);
    const head = await fetch(`${base}/api/v1/apps/sleeper/logs/follow`, { method: 'HEAD' });
    assert.equal(head.status, 200);
    assert.match(head.headers.get('content-type') ?? '', /^text\/event-stream/);

    // follow over server-sent events: backlog, then live lines and state changes
    const sse = await get(port, '/api/v1/apps/sleeper/logs/follow?lines=10');
    assert.equal(sse.status, 200);
    assert.match(String(sse.headers['content-type']), /^text\/event-stream/);
    await waitFor(() => sse.events.some((e) => e.event === 'line' && (e.data as { line: string }).line === 'started'), 'backlog line');
    const n0 = sse.events.length;
    await fetch(`${base}/api/v1/apps/sleeper/restart`, { method: 'POST', headers: { authorization: `Bearer ${tech}` } });
    await waitFor(() => sse.events.slice(n0).some((e) => e.event === 'line' && (e.data as { line: string }).line === 'started'), 'live line after restart');
    assert.ok(sse.events.slice(n0).some((e) => e.event === 'state' && (e.data as { restarts: number }).restarts === 2), 'state events in the stream');
    assert.match(await (await fetch(`${base}/metrics`)).text(), /^fleet_agent_api_streams 1$/m);
    sse.close();
    await waitFor(async () => /^fleet_agent_api_streams 0$/m.test(await (await fetch(`${base}/metrics`)).text()), 'stream released when the client left');
    assert.equal((await get(port, '/api/v1/apps/ghost/logs/follow')).status, 404);
    const metrics = await (await fetch(`${base}/metrics`)).text();
    assert.match(metrics, /fleet_agent_app_restarts\{app="sleeper"\} 2/);
  } finally {
    await agent.stop();
    tmp.cleanup();
  }
});

test('agent config: a bad value names the key and the file', () => {
  const tmp = tempDir();
  try {
    const file = join(tmp.dir, 'agent.yaml');
    writeFileSync(file, 'apps:\n  - name: web\n    command: /bin/true\n    restart: sometimes\napi:\n  prot: 8484\n');
    assert.throws(
      () => loadConfig(AgentConfigSchema, { file }),
      (err: unknown) => {
        assert.ok(isFleetError(err, 'FLEET_CONFIG_INVALID'));
        assert.match(err.message, new RegExp(`^${file.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}: `));
        assert.match(err.message, /apps\.0\.restart/);
        assert.match(err.message, /api: .*prot/);
        return true;
      },
    );
    writeFileSync(file, 'apps: [\n');
    assert.throws(() => loadConfig(AgentConfigSchema, { file }), (err: unknown) => isFleetError(err, 'FLEET_CONFIG_UNREADABLE') && err.message.includes(file));
  } finally {
    tmp.cleanup();
  }
});

test('agent API off loopback (LAN): every read needs a token, no token in the URL, bounded log streams, streams end when the agent stops (the API built on loopback with the options startAgent passes for a LAN address, status stubbed: tests bind loopback only)', async () => {
  const log = testLogger();
  const supervisor = new Supervisor({ log });
  await supervisor.apply([AppSpecSchema.parse({ name: 'ticker', command: '/bin/sh', args: ['-c', 'while :; do echo tick; sleep 0.1; done'], stopTimeoutMs: 2000 })]);
  const tokens = [
    { token: 'tech-token-0123456789abcdef', role: ROLES.TECHNICIAN },
    { token: 'ro-token-0123456789abcdef', role: ROLES.READONLY },
  ];
  const api = buildAgentApi({
    log,
    supervisor,
    metrics: new MetricsRegistry(),
    tokens,
    openReads: false, // what startAgent passes when api.host is not a loopback address
    rateLimit: 0,
    status: () => ({ deviceId: 'dev-lan' }),
    history: new MetricsHistory(['cpu', 'mem'] as const),
    events: new EventLog(),
    ready: () => true,
    maxStreams: 2,
    heartbeatMs: 100,
  });
  const http = await listenHttp((req, res) => void api.handle(req, res), '127.0.0.1', 0);
  const base = `http://127.0.0.1:${http.port}`;
  const ro = { authorization: `Bearer ${tokens[1]!.token}` };
  const streams: Sse[] = [];
  try {
    // reads: missing 401, wrong 401, read-only 200; page shell and probes public
    const missing = await fetch(`${base}/api/v1/status`);
    assert.equal(missing.status, 401);
    assert.equal(missing.headers.get('www-authenticate'), 'Bearer');
    assert.equal(await code(missing), 'FLEET_AUTH_FAILED');
    assert.equal((await fetch(`${base}/api/v1/status`, { headers: { authorization: 'Bearer wrong' } })).status, 401);
    assert.equal((await fetch(`${base}/api/v1/status`, { headers: { authorization: `Basic ${tokens[1]!.token}` } })).status, 401);
    assert.deepEqual(await (await fetch(`${base}/api/v1/status`, { headers: ro })).json(), { deviceId: 'dev-lan', node: process.versions.node });
    for (const p of ['/api/v1/apps', '/api/v1/events', '/api/v1/metrics/history', '/metrics', '/api/v1/apps/ticker/logs']) {
      assert.equal((await fetch(`${base}${p}`)).status, 401, p);
      assert.equal((await fetch(`${base}${p}`, { headers: ro })).status, 200, p);
    }
    for (const p of ['/', '/page.js', '/page.css', '/health', '/ready']) assert.equal((await fetch(`${base}${p}`)).status, 200, p);
    // writes: read-only 403 with a stable code, technician 200
    const forbidden = await fetch(`${base}/api/v1/apps/ticker/restart`, { method: 'POST', headers: ro });
    assert.equal(forbidden.status, 403);
    assert.equal(await code(forbidden), 'FLEET_FORBIDDEN');

    // the log stream takes the token in the header only (a token in a URL leaks into logs and history)
    assert.equal((await get(http.port, `/api/v1/apps/ticker/logs/follow?token=${tokens[1]!.token}`)).status, 401);
    const s1 = await get(http.port, '/api/v1/apps/ticker/logs/follow?lines=0', ro);
    streams.push(s1);
    assert.equal(s1.status, 200);
    await waitFor(() => s1.events.filter((e) => e.event === 'line').length >= 3 && s1.comments.some((c) => c.startsWith(': heartbeat')), 'live lines and heartbeats');
    assert.ok(s1.raw.startsWith('retry: 3000\n\n'), 'reconnect delay first');
    // the bound: a third concurrent stream is refused with 503 and a stable code
    streams.push(await get(http.port, '/api/v1/apps/ticker/logs/follow', ro));
    const third = await fetch(`${base}/api/v1/apps/ticker/logs/follow`, { headers: ro });
    assert.equal(third.status, 503);
    assert.equal(third.headers.get('retry-after'), '5');
    assert.equal(await code(third), 'FLEET_HTTP_TOO_MANY_STREAMS');
    assert.equal(api.streams(), 2);

    // stopping: streams get an `end` event and close; /ready says so
    api.close();
    await Promise.all(streams.map((s) => s.ended));
    for (const s of streams) assert.deepEqual(s.events[s.events.length - 1], { event: 'end', data: { reason: 'agent stopping' } });
    assert.equal(api.streams(), 0);
    const ready = await fetch(`${base}/ready`);
    assert.equal(ready.status, 503);
    assert.deepEqual(await ready.json(), { status: 'stopping' });
    const hd = await fetch(`${base}/health/detailed`, { headers: ro });
    assert.equal(hd.status, 503);
    const hdb = (await hd.json()) as { status: string; checks: Array<{ name: string; status: string }> };
    assert.equal(hdb.status, 'fail');
    assert.deepEqual(hdb.checks.map((c) => [c.name, c.status]), [['api', 'fail'], ['ready', 'pass'], ['apps', 'pass']]);
  } finally {
    for (const s of streams) s.close();
    await http.close();
    await supervisor.stopAll();
  }
});

test('agent API: rate limit per client answers 429 with a stable code and Retry-After', async () => {
  const tmp = tempDir();
  const agent = await startAgent(AgentConfigSchema.parse({ deviceId: 'dev-rate', stateDir: tmp.dir, api: { port: 0, rateLimit: 1 } }), testLogger(), '0.0.0');
  try {
    // rate 1/s, burst 2: of 12 back-to-back requests at least 3 are refused, unless they were
    // spread over more than 7 s
    const res = await Promise.all(Array.from({ length: 12 }, () => fetch(`http://127.0.0.1:${agent.apiPort}/health`)));
    const limited = res.filter((r) => r.status === 429);
    assert.ok(limited.length >= 3, `429s: ${limited.length}`);
    assert.equal(limited[0]!.headers.get('retry-after'), '1');
    assert.equal(await code(limited[0]!), 'FLEET_HTTP_RATE_LIMITED');
    await Promise.all(res.filter((r) => r.status !== 429).map((r) => r.arrayBuffer()));
  } finally {
    await agent.stop();
    tmp.cleanup();
  }
});

test('agent API (wall clock mocked): the rate limit runs on the monotonic clock: after a wall-clock step back of a day (NTP), a client is served again a second later, not a day later', async (t) => {
  const tmp = tempDir();
  const agent = await startAgent(AgentConfigSchema.parse({ deviceId: 'dev-rate-step', stateDir: tmp.dir, api: { port: 0, rateLimit: 1 } }), testLogger(), '0.0.0');
  const realNow = Date.now.bind(Date);
  try {
    // spend the burst (2 at rate 1) until refused, so that only a refill can serve the next
    let refused = false;
    for (let i = 0; i < 10 && !refused; i++) {
      const r = await fetch(`http://127.0.0.1:${agent.apiPort}/health`);
      await r.arrayBuffer();
      refused = r.status === 429;
    }
    assert.ok(refused, 'the burst was spent');
    t.mock.method(Date, 'now', () => realNow() - 24 * 3600_000);
    await new Promise((r) => setTimeout(r, 1100));
    const after = await fetch(`http://127.0.0.1:${agent.apiPort}/health`);
    await after.arrayBuffer();
    assert.equal(after.status, 200, 'served: the bucket refilled by the time that passed, not by the step');
  } finally {
    t.mock.restoreAll();
    await agent.stop();
    tmp.cleanup();
  }
});

test('loopbackHost: only loopback names and addresses, with or without a port', () => {
  for (const h of ['127.0.0.1', '127.0.0.1:8484', 'localhost:8484', 'localhost', '[::1]:8484', '127.1.2.3']) assert.equal(loopbackHost(h), true, h);
  for (const h of [undefined, '', 'evil.example', 'evil.example:8484', '192.168.1.5:8484', 'localhost.evil.example', '127.0.0.1.evil.example', '[::2]:80']) assert.equal(loopbackHost(h), false, String(h));
});

test('EventLog: bounded ring, cursor paging, truncation and a cursor from before a restart', () => {
  let now = 1000;
  const ev = new EventLog(3, () => now++);
  assert.deepEqual(ev.since(0), { events: [], next: 0, truncated: false });
  for (const type of ['a', 'b', 'c']) ev.record(type, 'info', { type });
  const p1 = ev.since(0, 2);
  assert.deepEqual(p1.events.map((e) => e.type), ['a', 'b']);
  assert.equal(p1.next, 2);
  assert.deepEqual(ev.since(p1.next).events.map((e) => [e.seq, e.type]), [[3, 'c']]);
  ev.record('d', 'warning');
  ev.record('e', 'alert');
  // a and b fell out: a reader at cursor 1 is told it missed some
  const p2 = ev.since(1);
  assert.deepEqual(p2.events.map((e) => e.type), ['c', 'd', 'e']);
  assert.equal(p2.truncated, true);
  assert.equal(ev.since(2).truncated, false);
  assert.deepEqual(ev.since(5), { events: [], next: 5, truncated: false });
  // cursor 99 is from an earlier agent process: start over and say so
  const p3 = ev.since(99);
  assert.equal(p3.truncated, true);
  assert.deepEqual(p3.events.map((e) => e.seq), [3, 4, 5]);
  assert.deepEqual(ev.tail(2).map((e) => e.type), ['d', 'e']);
  const seen: string[] = [];
  const off = ev.subscribe((e) => seen.push(e.type));
  ev.record('f', 'info');
  off();
  ev.record('g', 'info');
  assert.deepEqual(seen, ['f']);
  assert.equal(ev.last, 7);
});

test('MetricsHistory: 10 s buckets with min/avg/max, nulls skipped, one hour kept', () => {
  const h = new MetricsHistory(['cpu', 'mem'] as const);
  assert.equal(h.capacity, 360);
  const t0 = 1_700_000_000_000; // a multiple of 10 s
  h.add(t0, { cpu: 10, mem: 50 });
  h.add(t0 + 1000, { cpu: 30, mem: 52 });
  h.add(t0 + 9999, { cpu: null, mem: 54 });
  h.add(t0 + 10_000, { cpu: 5, mem: 40 });
  assert.deepEqual(h.points(), [
    { t: t0, n: 3, values: { cpu: { min: 10, avg: 20, max: 30 }, mem: { min: 50, avg: 52, max: 54 } } },
    { t: t0 + 10_000, n: 1, values: { cpu: { min: 5, avg: 5, max: 5 }, mem: { min: 40, avg: 40, max: 40 } } },
  ]);
  // a bucket with no CPU reading at all
  h.add(t0 + 20_000, { mem: 1 });
  assert.equal(h.points()[2]!.values.cpu, null);
  // 1 Hz for two hours: never more than an hour of buckets, the oldest dropped first
  for (let t = t0; t < t0 + 7_200_000; t += 1000) h.add(t + 30_000, { cpu: 1, mem: 1 });
  const pts = h.points();
  assert.ok(pts.length <= h.capacity + 1, `${pts.length} buckets`);
  assert.ok(pts[0]!.t >= t0 + 7_200_000 + 30_000 - 3_600_000 - 10_000);
  assert.equal(pts[pts.length - 1]!.n, 10);
  // a clock stepping back folds into the newest bucket instead of reordering
  const last = pts[pts.length - 1]!.t;
  h.add(last - 50_000, { cpu: 99 });
  assert.equal(h.points()[h.points().length - 1]!.values.cpu!.max, 99);
  assert.throws(() => new MetricsHistory(['x'], { bucketMs: 0 }), RangeError);
});

test('agent API: scheduled jobs are listed and run by hand (never overlapping); log tail from the rotating files', async () => {
  const tmp = tempDir();
  const agent = await startAgent(
    AgentConfigSchema.parse({
      deviceId: 'dev-jobs',
      stateDir: tmp.dir,
      api: { port: 0, rateLimit: 0 },
      apps: [{ name: 'talker', command: '/bin/sh', args: ['-c', 'for i in 1 2 3; do echo line-$i; done; exec sleep 60'] }],
      // a yearly schedule: only the manual run fires during the test
      // in UTC: nextRun is printed in UTC, and midnight of 1 January elsewhere is not 1 January there
      jobs: [{ name: 'report', schedule: '0 0 1 1 *', timezone: 'UTC', command: '/bin/sh', args: ['-c', 'sleep 1'] }],
    }),
    testLogger(),
    '0.0.0',
  );
  const base = `http://127.0.0.1:${agent.apiPort}`;
  const tech = readFileSync(agent.tokenFiles.technician, 'utf8').trim();
  const run = () => fetch(`${base}/api/v1/jobs/report/run`, { method: 'POST', headers: { authorization: `Bearer ${tech}` } });
  try {
    const list = (await (await fetch(`${base}/api/v1/jobs`)).json()) as { jobs: Array<{ name: string; nextRun: string | null; runs: number }> };
    assert.equal(list.jobs[0]!.name, 'report');
    assert.match(list.jobs[0]!.nextRun ?? '', /-01-01T/);
    const first = await run();
    assert.equal(first.status, 202);
    const second = await run();
    assert.equal(second.status, 409, 'a second run while the first is running is refused');
    assert.equal(((await second.json()) as { started: boolean }).started, false);
    const missing = await fetch(`${base}/api/v1/jobs/nope/run`, { method: 'POST', headers: { authorization: `Bearer ${tech}` } });
    assert.equal(missing.status, 404);
    assert.equal(await code(missing), 'FLEET_JOB_NOT_FOUND');
    await waitFor(async () => ((await (await fetch(`${base}/api/v1/jobs`)).json()) as { jobs: Array<{ lastRun: { ok: boolean } | null }> }).jobs[0]!.lastRun?.ok, 'job done');

    await waitFor(() => agent.supervisor.apps.get('talker')!.lines.length >= 3, 'app output');
    const tail = await waitFor(async () => {
      const t = (await (await fetch(`${base}/api/v1/apps/talker/logs?source=file&lines=2`)).json()) as { text: string[]; file: string };
      return t.text.length === 2 ? t : null;
    }, 'file tail');
    assert.match(tail.text[0]!, / stdout line-2$/);
    assert.match(tail.text[1]!, / stdout line-3$/);
    assert.equal(tail.file, join(tmp.dir, 'logs', 'talker', 'talker.log'));
  } finally {
    await agent.stop();
    tmp.cleanup();
  }
});
