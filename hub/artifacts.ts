import { createHash, randomBytes } from 'node:crypto';
import { createReadStream, createWriteStream, existsSync, mkdirSync, readdirSync, renameSync, rmSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { pipeline } from 'node:stream/promises';
import { deriveToken } from '../core/credentials.ts';
import { FleetError } from '../core/errors.ts';
import { secretEquals, type Ctx } from '../core/http.ts';
import type { Logger } from '../core/log.ts';
import { DEVICE_ID_RE } from '../core/topics.ts';

export interface ArtifactStoreOptions {
  /** <stateDir>/artifacts */
  dir: string;
  /** largest artifact accepted, bytes */
  maxBytes: number;
  fleetSecret: string;
  operatorToken: string;
  log: Logger;
  /** devices whose tokens are revoked (registry deny list), when the hub has one */
  denied?: (deviceId: string) => boolean;
  /**
   * May this device fetch this artifact? The hub answers from desired states: a device gets
   * what its own desired state names, a gateway also what its MCUs' desired states name.
   * Without it any authenticated device may fetch any artifact.
   */
  mayFetch?: (deviceId: string, sha256: string) => boolean;
}

const SHA_RE = /^[0-9a-f]{64}$/;

/**
 * The hub's artifact store (docs/ota.md#hub-artifact-store): bundles uploaded by operators,
 * stored content-addressed by sha256 under <stateDir>/artifacts, downloaded by devices with
 * HTTP Range (RFC 9110 §14) so a cut download resumes where it stopped.
 *
 * Downloads authenticate either as a device (HTTP Basic, user = device id, password = the
 * device's derived token, the same credentials as MQTT) or as the operator (Bearer token).
 * A device may fetch only what a desired state it acts for names (`mayFetch`).
 */
export class ArtifactStore {
  constructor(private readonly o: ArtifactStoreOptions) {
    mkdirSync(join(o.dir, 'tmp'), { recursive: true });
    // uploads cut short by a crash leave temp files only
    for (const f of readdirSync(join(o.dir, 'tmp'))) rmSync(join(o.dir, 'tmp', f), { force: true });
  }

  path(sha256: string): string {
    if (!SHA_RE.test(sha256)) throw new FleetError('FLEET_HTTP_NOT_FOUND', 'artifact ids are lower-case sha256 hex');
    return join(this.o.dir, sha256);
  }

  list(): Array<{ sha256: string; size: number; storedAt: number }> {
    return readdirSync(this.o.dir)
      .filter((f) => SHA_RE.test(f))
      .map((f) => {
        const st = statSync(join(this.o.dir, f));
        return { sha256: f, size: st.size, storedAt: st.mtimeMs };
      })
      .sort((a, b) => b.storedAt - a.storedAt);
  }

  /** POST /api/v1/artifacts (operator): the body is the bundle, streamed to disk and hashed on the way. */
  upload = async (ctx: Ctx): Promise<{ sha256: string; size: number; url: string }> => {
    const declared = Number(ctx.req.headers['content-length'] ?? 0);
    if (declared > this.o.maxBytes) throw new FleetError('FLEET_HTTP_BODY_TOO_LARGE', `artifact of ${declared} bytes exceeds artifactMaxBytes (${this.o.maxBytes})`);
    const expect = ctx.url.searchParams.get('sha256');
    const tmp = join(this.o.dir, 'tmp', `${process.pid}-${randomBytes(6).toString('hex')}`);
    const hash = createHash('sha256');
    let size = 0;
    const max = this.o.maxBytes;
    try {
      await pipeline(
        ctx.req,
        async function* (src: AsyncIterable<Buffer>) {
          for await (const chunk of src) {
            size += chunk.length;
            if (size > max) throw new FleetError('FLEET_HTTP_BODY_TOO_LARGE', `artifact exceeds artifactMaxBytes (${max})`);
            hash.update(chunk);
            yield chunk;
          }
        },
        createWriteStream(tmp, { mode: 0o600 }),
      );
    } catch (err) {
      rmSync(tmp, { force: true });
      throw err;
    }
    const sha256 = hash.digest('hex');
    if (expect && expect !== sha256) {
      rmSync(tmp, { force: true });
      throw new FleetError('FLEET_HTTP_BAD_REQUEST', `uploaded artifact has sha256 ${sha256}, not the ${expect} given`);
    }
    const dest = this.path(sha256);
    if (existsSync(dest)) rmSync(tmp, { force: true });
    else renameSync(tmp, dest);
    this.o.log.info('artifact stored', { sha256, size });
    ctx.res.statusCode = 201;
    return { sha256, size, url: `/api/v1/artifacts/${sha256}` };
  };

  /** Who is asking: 'operator', a device id, or throws FLEET_AUTH_FAILED. */
  authenticate(ctx: Ctx): string {
    const h = ctx.req.headers.authorization ?? '';
    if (h.startsWith('Bearer ') && secretEquals(h.slice(7).trim(), this.o.operatorToken)) return 'operator';
    if (h.startsWith('Basic ')) {
      const raw = Buffer.from(h.slice(6).trim(), 'base64').toString('utf8');
      const i = raw.indexOf(':');
      const id = i > 0 ? raw.slice(0, i) : '';
      if (DEVICE_ID_RE.test(id) && secretEquals(raw.slice(i + 1), deriveToken(this.o.fleetSecret, 'device', id)) && !this.o.denied?.(id)) return id;
    }
    throw new FleetError('FLEET_AUTH_FAILED', 'artifact downloads need a device token (Basic id:token) or the operator token (Bearer)');
  }

  /** GET/HEAD /api/v1/artifacts/:sha256 with single-range Range support. */
  download = async (ctx: Ctx): Promise<void> => {
    const who = this.authenticate(ctx);
    const file = this.path(ctx.params.sha256 ?? '');
    // checked before the file is looked at: a device learns nothing of artifacts not meant for it
    if (who !== 'operator' && this.o.mayFetch && !this.o.mayFetch(who, ctx.params.sha256 ?? '')) {
      throw new FleetError('FLEET_FORBIDDEN', `artifact ${ctx.params.sha256} is not in the desired state of ${who} or of an MCU it relays`);
    }
    let size: number;
    try {
      size = statSync(file).size;
    } catch {
      throw new FleetError('FLEET_HTTP_NOT_FOUND', `no artifact ${ctx.params.sha256}`);
    }
    const res = ctx.res;
    const headers: Record<string, string | number> = {
      'content-type': 'application/octet-stream',
      'accept-ranges': 'bytes',
      etag: `"${ctx.params.sha256}"`,
      'cache-control': 'private, max-age=31536000, immutable',
    };
    let start = 0;
    let end = size - 1;
    let status = 200;
    const range = ctx.req.headers.range;
    // If-Range with another validator means the client's partial copy is of something else: send it all
    const ifRange = ctx.req.headers['if-range'];
    if (range && (!ifRange || ifRange === headers.etag)) {
      const m = /^bytes=(\d*)-(\d*)$/.exec(range.trim());
      if (!m || (m[1] === '' && m[2] === '')) {
        res.writeHead(416, { 'content-range': `bytes */${size}` });
        res.end();
        return;
      }
      if (m[1] === '') {
        start = Math.max(0, size - Number(m[2])); // suffix range: the last N bytes
      } else {
        start = Number(m[1]);
        if (m[2] !== '') end = Math.min(end, Number(m[2]));
      }
      if (start >= size || start > end) {
        res.writeHead(416, { 'content-range': `bytes */${size}` });
        res.end();
        return;
      }
      status = 206;
      headers['content-range'] = `bytes ${start}-${end}/${size}`;
    }
    headers['content-length'] = size === 0 ? 0 : end - start + 1;
    res.writeHead(status, headers);
    if (ctx.req.method === 'HEAD' || size === 0) {
      res.end();
      return;
    }
    this.o.log.debug('artifact download', { sha256: ctx.params.sha256, who, start, end });
    await pipeline(createReadStream(file, { start, end }), res).catch(() => undefined); // a client that goes away is normal
  };
}
