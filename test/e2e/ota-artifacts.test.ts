/** The hub's artifact store over real HTTP: bounds, hashes, auth, Range. */
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { existsSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { deriveToken } from '../../core/credentials.ts';
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
        assert.equal((await fetch(`${ctx.http}/api/v1/artifacts/${'1'.repeat(64)}`, { headers: { authorization: dev } })).status, 404);
        assert.equal((await fetch(url, { headers: { authorization: 'Bearer nope' } })).status, 401);
      },
      undefined,
      { artifactMaxBytes: 4096 },
    );
  });
});
