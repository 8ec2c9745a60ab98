import { createHash } from 'node:crypto';
import { createReadStream, createWriteStream, mkdirSync, renameSync, rmSync, statSync, statfsSync } from 'node:fs';
import { dirname } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { FleetError } from '../../core/errors.ts';
import type { Logger } from '../../core/log.ts';

export interface DownloadOptions {
  url: string;
  /** final file; the partial download lives at `${dest}.part` and is resumed from there */
  dest: string;
  /** expected sha256 of the whole file (hex); checked before the file is renamed into place */
  sha256?: string;
  /** expected size in bytes, for the free-space check before the first byte */
  size?: number;
  /** sent as the Authorization header */
  authorization?: string;
  /** bytes that must stay free on the filesystem after the download */
  reserveBytes: number;
  /** largest file accepted, bytes */
  maxBytes: number;
  /** attempts before giving up (each one resumes where the last stopped) */
  attempts: number;
  backoffInitialMs: number;
  backoffMaxMs: number;
  /** per-attempt inactivity limit, ms */
  idleTimeoutMs: number;
  log: Logger;
  signal?: AbortSignal;
  /** free bytes on the filesystem holding `dir` (injectable for tests; default statfs) */
  freeBytes?: (dir: string) => number;
  onProgress?: (have: number, total: number | null) => void;
}

export function statfsFree(dir: string): number {
  const s = statfsSync(dir);
  return Number(s.bavail) * Number(s.bsize);
}

function fileSize(file: string): number {
  try {
    return statSync(file).size;
  } catch {
    return 0;
  }
}

export async function sha256File(file: string): Promise<string> {
  const h = createHash('sha256');
  for await (const chunk of createReadStream(file, { highWaterMark: 1 << 20 })) h.update(chunk as Buffer);
  return h.digest('hex');
}

function checkSpace(o: DownloadOptions, total: number | null, have: number): void {
  if (total === null) return;
  if (total > o.maxBytes) throw new FleetError('FLEET_UPDATE_TOO_LARGE', `bundle of ${total} bytes exceeds update.maxBundleBytes (${o.maxBytes})`);
  const free = (o.freeBytes ?? statfsFree)(dirname(o.dest));
  const need = total - have + o.reserveBytes;
  if (free < need) throw new FleetError('FLEET_UPDATE_NO_SPACE', `need ${need} bytes free for the download (${total - have} to fetch + ${o.reserveBytes} reserve), have ${free}`);
}

/** Retry decisions read codes, never message text: these end the download at once. */
const FATAL = new Set(['FLEET_UPDATE_TOO_LARGE', 'FLEET_UPDATE_NO_SPACE', 'FLEET_UPDATE_HASH_MISMATCH', 'FLEET_UPDATE_HTTP_REFUSED']);

/**
 * Download with HTTP Range resume (RFC 9110 §14): each attempt asks for the bytes after
 * what the partial file already holds; a 206 appends, a 200 (server ignores Range) starts
 * over. Attempts back off exponentially. The whole file's sha256 is checked before the
 * rename into `dest`, so `dest` only ever holds a complete, matching file.
 */
export async function download(o: DownloadOptions): Promise<{ size: number; sha256: string }> {
  mkdirSync(dirname(o.dest), { recursive: true });
  const part = `${o.dest}.part`;
  checkSpace(o, o.size ?? null, fileSize(part));
  let lastErr: unknown = null;
  for (let attempt = 0; attempt < o.attempts; attempt++) {
    if (attempt > 0) {
      const delay = Math.min(o.backoffMaxMs, o.backoffInitialMs * 2 ** (attempt - 1));
      // jitter: a fleet that lost the same server must not come back in lockstep
      await sleep(Math.round(delay * (0.5 + Math.random() * 0.5)), undefined, { signal: o.signal });
    }
    try {
      await attemptOnce(o, part);
      const sha = await sha256File(part);
      if (o.sha256 && sha !== o.sha256) {
        rmSync(part, { force: true });
        throw new FleetError('FLEET_UPDATE_HASH_MISMATCH', `downloaded file has sha256 ${sha}, expected ${o.sha256}`);
      }
      const size = fileSize(part);
      renameSync(part, o.dest);
      return { size, sha256: sha };
    } catch (err) {
      if (o.signal?.aborted) throw err;
      if (err instanceof FleetError && FATAL.has(err.code)) throw err;
      lastErr = err;
      o.log.warn('download attempt failed; will resume', { url: o.url, attempt: attempt + 1, have: fileSize(part), err: (err as Error).message });
    }
  }
  throw new FleetError('FLEET_UPDATE_DOWNLOAD', `download of ${o.url} failed after ${o.attempts} attempts: ${(lastErr as Error | null)?.message ?? 'unknown'}`, { cause: lastErr });
}

async function attemptOnce(o: DownloadOptions, part: string): Promise<void> {
  const have = fileSize(part);
  if (o.size !== undefined && have === o.size) return; // complete already (killed before the rename)
  const headers: Record<string, string> = {};
  if (o.authorization) headers.authorization = o.authorization;
  if (have > 0) headers.range = `bytes=${have}-`;
  const ac = new AbortController();
  const onAbort = () => ac.abort();
  o.signal?.addEventListener('abort', onAbort);
  let idle: NodeJS.Timeout = setTimeout(() => ac.abort(), o.idleTimeoutMs);
  const touch = () => {
    clearTimeout(idle);
    idle = setTimeout(() => ac.abort(), o.idleTimeoutMs);
  };
  try {
    const res = await fetch(o.url, { headers, signal: ac.signal });
    if (res.status === 416 && have > 0) {
      // the partial file already holds everything the server has (or more): start over
      await res.body?.cancel();
      rmSync(part, { force: true });
      throw new FleetError('FLEET_UPDATE_DOWNLOAD', 'range not satisfiable; restarting the download');
    }
    if (res.status >= 400 && res.status < 500 && res.status !== 408 && res.status !== 429) {
      await res.body?.cancel();
      throw new FleetError('FLEET_UPDATE_HTTP_REFUSED', `GET ${o.url}: HTTP ${res.status}`);
    }
    if (res.status !== 200 && res.status !== 206) {
      await res.body?.cancel();
      throw new FleetError('FLEET_UPDATE_DOWNLOAD', `GET ${o.url}: HTTP ${res.status}`);
    }
    const append = res.status === 206 && have > 0;
    if (res.status === 206) {
      const m = /^bytes (\d+)-\d+\/(\d+|\*)$/.exec(res.headers.get('content-range') ?? '');
      if (!m || Number(m[1]) !== have) {
        await res.body?.cancel();
        rmSync(part, { force: true });
        throw new FleetError('FLEET_UPDATE_DOWNLOAD', `server answered a different range (${res.headers.get('content-range')}); restarting`);
      }
    }
    const len = Number(res.headers.get('content-length') ?? NaN);
    const total = Number.isFinite(len) ? len + (append ? have : 0) : (o.size ?? null);
    checkSpace(o, total, append ? have : 0);
    const out = createWriteStream(part, { flags: append ? 'a' : 'w' });
    const closed = new Promise<void>((resolve, reject) => {
      out.once('close', resolve);
      out.once('error', reject);
    });
    let got = append ? have : 0;
    try {
      if (!res.body) throw new FleetError('FLEET_UPDATE_DOWNLOAD', 'empty response');
      for await (const chunk of res.body as unknown as AsyncIterable<Uint8Array>) {
        touch();
        got += chunk.length;
        if (got > o.maxBytes) throw new FleetError('FLEET_UPDATE_TOO_LARGE', `bundle exceeds update.maxBundleBytes (${o.maxBytes})`);
        if (!out.write(chunk)) await new Promise<void>((r) => out.once('drain', () => r()));
        o.onProgress?.(got, total);
      }
    } finally {
      out.end();
      await closed;
    }
    if (total !== null && got !== total) throw new FleetError('FLEET_UPDATE_DOWNLOAD', `connection ended after ${got} of ${total} bytes`);
  } finally {
    clearTimeout(idle);
    o.signal?.removeEventListener('abort', onAbort);
  }
}
