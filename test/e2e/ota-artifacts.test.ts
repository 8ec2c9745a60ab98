/** The hub's artifact store over real HTTP: bounds, hashes, auth, Range. */
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { existsSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { createServer, connect, type Socket } from 'node:net';
import type { AddressInfo } from 'node:net';
import { describe, test } from 'node:test';
import { download } from '../../agent/update/download.ts';
import { deriveToken } from '../../core/credentials.ts';
import { tempDir, testLogger } from '../helpers.ts';
import { withHub } from '../hub/harness.ts';

describe('hub artifact store', () => {
  test('operator upload is content-addressed and bounded; devices and the operator download with Range', async () => {
    await withHub(
      async (hub, ctx) => {
        const op = { authorization: `Bearer ${ctx.operator}` };
        const body = randomBytes(3000);
        const sha = createHash('sha256').update(body).digest('hex');

        // bounded by artifactMaxBytes (4096 here): refused with 413, nothing kept
        const big = await fetch(`${ctx.http}/api/v1/artifacts`, { method: 'POST', headers: op, body: randomBytes(5000) });
        assert.equal(big.status, 413);
        assert.equal(((await big.json()) as { error: { code: string } }).error.code, 'FLEET_HTTP_BODY_TOO_LARGE');
        // a declared hash that does not match: refused
        const wrong = await fetch(`${ctx.http}/api/v1/artifacts?sha256=${'0'.repeat(64)}`, { method: 'POST', headers: op, body });
        assert.equal(wrong.status, 400);
        // devices may not upload
        const dev = `Basic ${Buffer.from(`d1:${deriveToken(ctx.secret, 'device', 'd1')}`).toString('base64')}`;
        assert.equal((await fetch(`${ctx.http}/api/v1/artifacts`, { method: 'POST', headers: { authorization: dev }, body })).status, 401);

        const ok = await fetch(`${ctx.http}/api/v1/artifacts?sha256=${sha}`, { method: 'POST', headers: op, body });
        assert.equal(ok.status, 201);
        assert.deepEqual(await ok.json(), { sha256: sha, size: 3000, url: `/api/v1/artifacts/${sha}` });
        // the same bytes again: the same artifact, stored once
        assert.equal((await fetch(`${ctx.http}/api/v1/artifacts`, { method: 'POST', headers: op, body })).status, 201);
        const list = (await (await fetch(`${ctx.http}/api/v1/artifacts`, { headers: op })).json()) as { artifacts: Array<{ sha256: string }> };
        assert.deepEqual(list.artifacts.map((a) => a.sha256), [sha]);
        const dir = join(hub.fleetSecretFile, '..', 'artifacts');
        assert.ok(existsSync(join(dir, sha)));
        assert.deepEqual(readdirSync(join(dir, 'tmp')), [], 'no temp files left behind by refused uploads');

        const url = `${ctx.http}/api/v1/artifacts/${sha}`;
        // least privilege: a device gets only what a desired state it acts for names
        const denied = await fetch(url, { headers: { authorization: dev } });
        assert.equal(denied.status, 403);
        assert.equal(((await denied.json()) as { error: { code: string } }).error.code, 'FLEET_FORBIDDEN');
        await hub.setDesired('d1', { apps: { blob: { version: '1.0.0', url: `/api/v1/artifacts/${sha}`, sha256: sha, size: body.length } } });
        const other = `Basic ${Buffer.from(`d9:${deriveToken(ctx.secret, 'device', 'd9')}`).toString('base64')}`;
        assert.equal((await fetch(url, { headers: { authorization: other } })).status, 403, 'another device still may not');
        const whole = await fetch(url, { headers: { authorization: dev } });
        assert.equal(whole.status, 200);
        assert.equal(whole.headers.get('accept-ranges'), 'bytes');
        assert.ok(Buffer.from(await whole.arrayBuffer()).equals(body));
        const mid = await fetch(url, { headers: { authorization: dev, range: 'bytes=100-199' } });
        assert.equal(mid.status, 206);
        assert.equal(mid.headers.get('content-range'), 'bytes 100-199/3000');
        assert.ok(Buffer.from(await mid.arrayBuffer()).equals(body.subarray(100, 200)));
        const suffix = await fetch(url, { headers: { ...op, range: 'bytes=-10' } });
        assert.equal(suffix.status, 206);
        assert.ok(Buffer.from(await suffix.arrayBuffer()).equals(body.subarray(2990)));
        // If-Range with another validator: the whole file, not a piece of something else
        const stale = await fetch(url, { headers: { authorization: dev, range: 'bytes=100-', 'if-range': '"other"' } });
        assert.equal(stale.status, 200);
        await stale.arrayBuffer();
        const head = await fetch(url, { method: 'HEAD', headers: { authorization: dev } });
        assert.equal(head.headers.get('content-length'), '3000');
        assert.equal((await fetch(`${ctx.http}/api/v1/artifacts/${'1'.repeat(64)}`, { headers: op })).status, 404);
        assert.equal((await fetch(`${ctx.http}/api/v1/artifacts/${'1'.repeat(64)}`, { headers: { authorization: dev } })).status, 403, 'a device cannot probe for artifacts');
        assert.equal((await fetch(url, { headers: { authorization: 'Bearer nope' } })).status, 401);
      },
      undefined,
      { artifactMaxBytes: 4096 },
    );
  });

  test('the agent downloader against the hub through a link that is cut mid-download resumes with Range', async () => {
    const tmp = tempDir('fleetlet-artifact-cut-');
    try {
      await withHub(async (hub, ctx) => {
        const body = randomBytes(2 * 1024 * 1024);
        const sha = createHash('sha256').update(body).digest('hex');
        const up = await fetch(`${ctx.http}/api/v1/artifacts`, { method: 'POST', headers: { authorization: `Bearer ${ctx.operator}` }, body });
        assert.equal(up.status, 201);
        await hub.setDesired('d2', { apps: { big: { version: '1.0.0', url: `/api/v1/artifacts/${sha}`, sha256: sha, size: body.length } } });
        // a TCP relay in front of the hub that cuts the first connection after 600 KB of response
        const requests: string[] = [];
        const sockets = new Set<Socket>();
        let conn = 0;
        const relay = createServer((client) => {
          const n = conn++;
          const upstream = connect(Number(new URL(ctx.http).port), '127.0.0.1');
          sockets.add(client).add(upstream);
          let relayed = 0;
          client.on('data', (d: Buffer) => {
            requests.push(d.toString('latin1').split('\r\n\r\n')[0] ?? '');
            upstream.write(d);
          });
          upstream.on('data', (d: Buffer) => {
            relayed += d.length;
            if (n === 0 && relayed > 600 * 1024) {
              client.destroy();
              upstream.destroy();
              return;
            }
            client.write(d);
          });
          const end = () => {
            client.destroy();
            upstream.destroy();
          };
          client.on('error', end).on('close', end);
          upstream.on('error', end).on('close', end);
        });
        await new Promise<void>((r) => relay.listen(0, '127.0.0.1', r));
        try {
          const port = (relay.address() as AddressInfo).port;
          const dest = join(tmp.dir, 'b.bundle');
          const got = await download({
            url: `http://127.0.0.1:${port}/api/v1/artifacts/${sha}`,
            dest,
            sha256: sha,
            size: body.length,
            authorization: `Basic ${Buffer.from(`d2:${deriveToken(ctx.secret, 'device', 'd2')}`).toString('base64')}`,
            reserveBytes: 0,
            maxBytes: 1 << 30,
            attempts: 4,
            backoffInitialMs: 20,
            backoffMaxMs: 100,
            idleTimeoutMs: 5000,
            log: testLogger('dl'),
          });
          assert.equal(got.sha256, sha);
          assert.equal(requests.length, 2, requests.join('\n---\n'));
          assert.doesNotMatch(requests[0]!, /^range:/im);
          const m = /^range: bytes=(\d+)-$/im.exec(requests[1]!);
          assert.ok(m, `second request resumes with Range: ${requests[1]}`);
          assert.ok(Number(m[1]) > 0 && Number(m[1]) < body.length);
        } finally {
          for (const s of sockets) s.destroy();
          await new Promise<void>((r) => relay.close(() => r()));
        }
      });
    } finally {
      tmp.cleanup();
    }
  });
});
