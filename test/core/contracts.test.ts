import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { ERROR_CODES, isFleetError } from '../../core/errors.ts';
import { createLogger } from '../../core/log.ts';
import { decodeMessage, encodeMessage, encodeTelemetry, type Sample } from '../../core/messages.ts';
import { MetricsRegistry } from '../../core/metrics.ts';
import { deviceTopic, parseTopic } from '../../core/topics.ts';
import { canPublish, canSubscribe, mayReceive } from '../../hub/acl.ts';
import { stablePort } from '../helpers.ts';

test('topics: build and parse; ids that would break the topic tree are refused', () => {
  assert.equal(deviceTopic('pi-01', 'telemetry'), 'fleet/v1/d/pi-01/telemetry');
  assert.deepEqual(parseTopic('fleet/v1/d/pi-01/state'), { deviceId: 'pi-01', channel: 'state' });
  for (const bad of ['fleet/v1/d/pi-01/nope', 'fleet/v1/d/pi/01/state', 'fleet/v2/d/pi/state', 'fleet/v1/d/+/state', 'fleet/v1/d//state']) assert.equal(parseTopic(bad), null, bad);
  for (const id of ['a/b', '+', '#', '', '.hidden', 'x'.repeat(65), 'ü']) assert.throws(() => deviceTopic(id, 'state'), (e: unknown) => isFleetError(e, 'FLEET_DEVICE_ID_INVALID'), id);
});

test('messages: valid decode; invalid ones fail with FLEET_MSG_INVALID naming the field', () => {
  const t = decodeMessage('telemetry', JSON.stringify({ v: 1, mid: '17', ts: 1, samples: [{ n: 'x', v: 1, t: 1 }] }));
  assert.equal(t.samples[0]?.n, 'x');
  const cases: Array<[string, string, RegExp]> = [
    ['telemetry', '{', /not JSON/],
    ['telemetry', JSON.stringify({ v: 1, mid: 'abc', ts: 1, samples: [] }), /mid/],
    ['telemetry', JSON.stringify({ v: 2, mid: '1', ts: 1, samples: [] }), /v:/],
    ['state', JSON.stringify({ v: 1, online: 'yes', kind: 'agent', ts: 1 }), /online/],
    ['desired', JSON.stringify({ v: 1, rev: 1, ts: 1, apps: { 'Bad Name': { version: '1' } } }), /apps/],
  ];
  for (const [channel, payload, re] of cases) {
    assert.throws(() => decodeMessage(channel as 'telemetry', payload), (e: unknown) => isFleetError(e, 'FLEET_MSG_INVALID') && re.test(e.message), payload);
  }
});

test('messages: encodeTelemetry writes what encodeMessage writes for the same TelemetryBatch, byte for byte', () => {
  const samples: Sample[][] = [[], [{ n: 'temp', v: 21.5, u: 'Cel', t: 1 }], [{ n: 'ok', vb: true, t: 2 }, { n: 's', vs: 'a "quoted" ü\n', t: 3 }, { n: 'big', v: -1e21, t: 4 }]];
  for (const ss of samples) for (const mid of ['1', '123456789012345678']) {
    const a = encodeTelemetry(mid, 1732000000000, ss);
    assert.deepEqual(a, encodeMessage({ v: 1, mid, ts: 1732000000000, samples: ss }));
    assert.deepEqual(decodeMessage('telemetry', a).samples, ss);
  }
});

test('ACL: devices stay in their subtree, gateways act for their MCUs, operators read everything', () => {
  const gw = { kind: 'device' as const, id: 'gw-1' };
  const dev = { kind: 'device' as const, id: 'pi-1' };
  const op = { kind: 'operator' as const };
  const delegations = (id: string) => (id === 'gw-1' ? new Set(['esp-1']) : undefined);
  assert.ok(canPublish(dev, 'fleet/v1/d/pi-1/telemetry', false, delegations));
  assert.ok(canPublish(dev, 'fleet/v1/d/pi-1/state', true, delegations));
  assert.ok(!canPublish(dev, 'fleet/v1/d/pi-1/telemetry', true, delegations), 'telemetry is never retained');
  assert.ok(!canPublish(dev, 'fleet/v1/d/pi-2/telemetry', false, delegations));
  assert.ok(!canPublish(dev, 'fleet/v1/d/pi-1/desired', true, delegations), 'devices do not write their desired state');
  assert.ok(!canPublish(dev, 'other/topic', false, delegations));
  assert.ok(canPublish(gw, 'fleet/v1/d/esp-1/telemetry', false, delegations));
  assert.ok(!canPublish(gw, 'fleet/v1/d/esp-2/telemetry', false, delegations));
  assert.ok(!canPublish(gw, 'fleet/v1/d/esp-1/register', true, delegations));
  assert.ok(canSubscribe(dev, 'fleet/v1/d/pi-1/desired', delegations));
  assert.ok(canSubscribe(gw, 'fleet/v1/d/esp-1/cmd', delegations));
  // the relay filters are open to any device; what flows through them is filtered per message
  assert.ok(canSubscribe(dev, 'fleet/v1/d/+/desired', delegations));
  assert.ok(canSubscribe(gw, 'fleet/v1/d/+/cmd', delegations));
  assert.ok(!canSubscribe(dev, 'fleet/v1/d/+/telemetry', delegations));
  assert.ok(!canSubscribe(dev, 'fleet/v1/d/+/+', delegations));
  assert.ok(!canSubscribe(dev, 'fleet/v1/#', delegations));
  assert.ok(mayReceive(gw, 'fleet/v1/d/esp-1/desired', delegations), 'a gateway receives its MCU');
  assert.ok(!mayReceive(gw, 'fleet/v1/d/esp-9/cmd', delegations), 'not another gateway\'s MCU');
  assert.ok(!mayReceive(dev, 'fleet/v1/d/esp-1/cmd', delegations), 'not an MCU of someone else');
  assert.ok(mayReceive(dev, 'fleet/v1/d/pi-1/cmd', delegations));
  assert.ok(mayReceive(op, 'fleet/v1/d/esp-9/cmd', delegations));
  assert.ok(!canSubscribe(dev, 'fleet/v1/d/pi-1/telemetry', delegations));
  assert.ok(canSubscribe(op, 'fleet/v1/#', delegations));
  assert.ok(canPublish(op, 'fleet/v1/d/pi-1/desired', true, delegations));
  assert.ok(!canPublish(op, 'fleet/v1/d/pi-1/telemetry', false, delegations), 'operators cannot forge device data');
  // the MCU revocation list: for devices (a gateway before its first register too), published by the hub only
  assert.ok(canSubscribe(gw, 'fleet/v1/mcu-revocations', delegations));
  assert.ok(mayReceive(gw, 'fleet/v1/mcu-revocations', delegations));
  assert.ok(canSubscribe(dev, 'fleet/v1/mcu-revocations', delegations));
  assert.ok(mayReceive(dev, 'fleet/v1/mcu-revocations', delegations));
  assert.ok(!canPublish(gw, 'fleet/v1/mcu-revocations', true, delegations));
  assert.ok(!canPublish(op, 'fleet/v1/mcu-revocations', true, delegations), 'through the API only');
  assert.ok(!mayReceive(op, 'fleet/v1/mcu-revocations', delegations), 'an operator\'s fleet/v1/# consumer does not get it');
});

test('logs: JSON lines; secrets are never written', () => {
  const lines: string[] = [];
  const log = createLogger({ name: 't', write: (l) => lines.push(l) }).child({ device: 'd1' });
  log.info('connect', { token: 'abc123', nested: { password: 'p', ok: 1 }, authorization: 'Bearer x' });
  log.debug('hidden at info');
  assert.equal(lines.length, 1);
  const rec = JSON.parse(lines[0]!) as Record<string, unknown>;
  assert.equal(rec.device, 'd1');
  assert.equal(rec.token, '[redacted]');
  assert.deepEqual(rec.nested, { password: '[redacted]', ok: 1 });
  assert.ok(!lines[0]!.includes('abc123'));
});

test('metrics: Prometheus text format with escaped labels', () => {
  const m = new MetricsRegistry();
  m.counter('x_total', 'a counter').inc({ a: 'q"u\\o\nte' }, 2);
  m.gaugeFn('y', 'a gauge', () => [{ labels: { k: 'v' }, value: 1.5 }]);
  assert.equal(m.render(), '# HELP x_total a counter\n# TYPE x_total counter\nx_total{a="q\\"u\\\\o\\nte"} 2\n# HELP y a gauge\n# TYPE y gauge\ny{k="v"} 1.5\n');
  assert.throws(() => m.counter('bad', 'no _total suffix'));
});

test('metrics: one series per label set whatever the order its labels are given in; distinct sets stay apart', () => {
  const m = new MetricsRegistry();
  const c = m.counter('z_total', 'a counter');
  c.inc({ protocol: 'mqtt', channel: 't' });
  c.inc({ channel: 't', protocol: 'mqtt' }, 2);
  c.inc({ c: '1', a: '2', b: '3' });
  c.inc({ b: '3', c: '1', a: '2' });
  c.inc({ protocol: 'coap', channel: 't' });
  // 'a=1,b=2' against 'a=1' + 'b=2,…': names and values are kept apart
  c.inc({ a: '1,b=2' });
  c.inc({ a: '1', b: '2' });
  c.inc();
  assert.equal(c.get({ channel: 't', protocol: 'mqtt' }), 3);
  assert.equal(c.get({ a: '2', b: '3', c: '1' }), 2);
  assert.equal(c.get({ protocol: 'coap', channel: 't' }), 1);
  assert.equal(c.get({}), 1);
  assert.equal(m.render().split('\n').filter((l) => l.startsWith('z_total')).length, 6);
});

test('errors: every code is listed in docs/errors.md and every listed code exists', () => {
  const doc = readFileSync(new URL('../../docs/errors.md', import.meta.url), 'utf8');
  const documented = new Set([...doc.matchAll(/^\| `(FLEET_[A-Z0-9_]+)` \|/gm)].map((m) => m[1]));
  assert.deepEqual([...documented].sort(), Object.keys(ERROR_CODES).sort());
});

test('ports: a taken default is replaced by 0 (any free port), a free one is kept', async () => {
  const { createServer } = await import('node:net');
  const { preferPort } = await import('../../core/net.ts');
  const s = createServer();
  await new Promise<void>((r) => s.listen(0, '127.0.0.1', r));
  const taken = (s.address() as { port: number }).port;
  try {
    assert.equal(await preferPort('127.0.0.1', taken, 'tcp'), 0);
  } finally {
    await new Promise((r) => s.close(r));
  }
  // a free one: below the ephemeral range, so no port-0 listener of another test file takes it meanwhile
  const free = await stablePort();
  assert.equal(await preferPort('127.0.0.1', free, 'tcp'), free);
});

test('isLoopback: what the agent and hub APIs treat as this-machine-only', async () => {
  const { isLoopback } = await import('../../core/net.ts');
  for (const h of ['127.0.0.1', '127.1.2.3', '::1', 'localhost']) assert.ok(isLoopback(h), h);
  for (const h of ['0.0.0.0', '::', '192.0.2.1', '10.0.0.1', 'device.local', '127.evil.example', '127.0.0.1.nip.io']) assert.ok(!isLoopback(h), h);
});

test("router: a handler's status code is kept; bad percent-encoding is a 400 with a code", async () => {
  const { Router, listenHttp } = await import('../../core/http.ts');
  const r = new Router({ log: createLogger({ name: 't', level: 'silent' }), rateLimit: 0 });
  r.post('/jobs/:id', (ctx) => {
    ctx.res.statusCode = 202;
    return { accepted: ctx.params.id };
  });
  r.get('/things/:id', (ctx) => ({ id: ctx.params.id }));
  const srv = await listenHttp(r.handle, '127.0.0.1', 0, false);
  try {
    const a = await fetch(`http://127.0.0.1:${srv.port}/jobs/x%20y`, { method: 'POST' });
    assert.equal(a.status, 202);
    assert.deepEqual(await a.json(), { accepted: 'x y' });
    const b = await fetch(`http://127.0.0.1:${srv.port}/things/%E0%A4%A`);
    assert.equal(b.status, 400);
    assert.equal(((await b.json()) as { error: { code: string } }).error.code, 'FLEET_HTTP_BAD_REQUEST');
  } finally {
    await srv.close();
  }
});
