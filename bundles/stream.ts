import type { FileHandle } from 'node:fs/promises';
import { Worker } from 'node:worker_threads';
import { FleetError } from '../core/errors.ts';

/** Read size for payload streaming: large reads keep syscall and hash call overhead negligible. */
export const CHUNK_BYTES = 4 * 1024 * 1024;

/**
 * Yields the bytes [start, end) of an open file in chunks of at most CHUNK_BYTES, reading the
 * next chunk while the consumer works on the current one (two buffers, so memory stays at
 * 2 × CHUNK_BYTES whatever the file size). A yielded chunk is valid until the consumer asks for
 * the chunk after the next one; consumers finish with each chunk before asking for the next.
 * A file that ends early throws FLEET_BUNDLE_TRUNCATED.
 */
export async function* readRange(fh: FileHandle, start: number, end: number): AsyncGenerator<Buffer> {
  if (start >= end) return;
  const bufs = [Buffer.allocUnsafe(Math.min(CHUNK_BYTES, end - start)), Buffer.allocUnsafe(Math.min(CHUNK_BYTES, end - start))] as const;
  let pos = start;
  let i = 0;
  let pending: Promise<{ bytesRead: number }> | undefined = fh.read(bufs[0], 0, Math.min(bufs[0].length, end - pos), pos);
  while (pending) {
    const { bytesRead } = await pending;
    if (bytesRead === 0) throw new FleetError('FLEET_BUNDLE_TRUNCATED', `bundle ends at byte ${pos}, expected ${end}`);
    const cur = bufs[i]!;
    pos += bytesRead;
    i ^= 1;
    const next = bufs[i]!;
    pending = pos < end ? fh.read(next, 0, Math.min(next.length, end - pos), pos) : undefined;
    yield bytesRead === cur.length ? cur : cur.subarray(0, bytesRead);
  }
}

export interface PayloadHandlers {
  begin(index: number): void | Promise<void>;
  data(index: number, chunk: Buffer): void | Promise<void>;
  end(index: number): void | Promise<void>;
}

/**
 * Walk the payload: the files' bytes back to back from `start`, in manifest order, calling
 * begin/data/end per file (zero-size files get begin and end only). `progress(bytes)` is called
 * after each chunk with the payload bytes done so far.
 */
export async function walkPayload(fh: FileHandle, start: number, sizes: readonly number[], h: PayloadHandlers, progress?: (done: number) => void): Promise<void> {
  const total = sizes.reduce((a, b) => a + b, 0);
  let fi = -1;
  let remaining = 0;
  const advance = async (): Promise<void> => {
    while (remaining === 0) {
      if (fi >= 0) await h.end(fi);
      fi++;
      if (fi >= sizes.length) return;
      await h.begin(fi);
      remaining = sizes[fi]!;
    }
  };
  await advance();
  let done = 0;
  for await (const chunk of readRange(fh, start, start + total)) {
    let off = 0;
    while (off < chunk.length) {
      const n = Math.min(remaining, chunk.length - off);
      const r = h.data(fi, n === chunk.length ? chunk : chunk.subarray(off, off + n));
      if (r) await r;
      off += n;
      remaining -= n;
      if (remaining === 0) await advance();
    }
    done += chunk.length;
    progress?.(done);
  }
}

// Plain JS so it runs the same under tsx, the built bundle and the single executable.
const HASH_WORKER = `
const { parentPort, workerData } = require('node:worker_threads');
const { readSync } = require('node:fs');
const { createHash } = require('node:crypto');
const { fd, size, chunk } = workerData;
try {
  const h = createHash('sha256');
  const buf = Buffer.allocUnsafe(Math.max(1, Math.min(chunk, size)));
  let pos = 0;
  while (pos < size) {
    const n = readSync(fd, buf, 0, Math.min(buf.length, size - pos), pos);
    if (n === 0) throw new Error('file ended at byte ' + pos + ', expected ' + size);
    h.update(n === buf.length ? buf : buf.subarray(0, n));
    pos += n;
  }
  parentPort.postMessage({ sha256: h.digest('hex') });
} catch (e) {
  parentPort.postMessage({ error: String((e && e.message) || e) });
}
`;

export interface WholeFileHash {
  /** resolves to the sha256 hex of bytes [0, size) of the fd */
  result: Promise<string>;
  /** stop early (on a refusal); safe to call after completion */
  cancel(): Promise<void>;
}

/**
 * sha256 of a whole open file, computed on a worker thread that reads the same fd with
 * positional reads (the same open file, even if the path is renamed over meanwhile). This runs
 * beside the main thread's per-file hashing, so the two passes over the bytes cost wall time
 * once on a machine with two cores. Returns undefined when no worker can be started; the caller
 * then hashes inline.
 */
export function hashFileOnWorker(fd: number, size: number): WholeFileHash | undefined {
  let worker: Worker;
  try {
    worker = new Worker(HASH_WORKER, { eval: true, workerData: { fd, size, chunk: CHUNK_BYTES }, execArgv: [], stdout: false, stderr: false });
  } catch {
    return undefined;
  }
  let settled = false;
  const result = new Promise<string>((resolve, reject) => {
    worker.once('message', (m: { sha256?: string; error?: string }) => {
      settled = true;
      if (m.sha256) resolve(m.sha256);
      else reject(new FleetError('FLEET_BUNDLE_TRUNCATED', `whole-file hash: ${m.error ?? 'failed'}`));
    });
    worker.once('error', (err) => {
      settled = true;
      reject(new FleetError('FLEET_INTERNAL', `hash worker failed: ${err.message}`, { cause: err }));
    });
    worker.once('exit', (code) => {
      if (!settled) reject(new FleetError('FLEET_INTERNAL', `hash worker exited with code ${code}`));
    });
  });
  result.catch(() => undefined); // a rejection seen only through cancel() is not unhandled
  return {
    result,
    async cancel() {
      await worker.terminate();
    },
  };
}
