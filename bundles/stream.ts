import type { FileHandle } from 'node:fs/promises';
import { Worker } from 'node:worker_threads';
import { FleetError } from '../core/errors.ts';

/** Read size for payload streaming: large reads keep syscall and hash call overhead negligible. */
export const CHUNK_BYTES = 4 * 1024 * 1024;

/** Where readRange gets the buffer for each read (CHUNK_BYTES long). */
export interface ChunkSource {
  acquire(): Buffer | Promise<Buffer>;
}

/** Two buffers used in turn: memory stays at 2 × CHUNK_BYTES whatever the file size. */
export function alternatingBuffers(size = CHUNK_BYTES): ChunkSource {
  const bufs = [Buffer.allocUnsafe(size), Buffer.allocUnsafe(size)] as const;
  let i = 1;
  return {
    acquire() {
      i ^= 1;
      return bufs[i]!;
    },
  };
}

/**
 * Yields the bytes [start, end) of an open file in chunks of at most CHUNK_BYTES, reading the
 * next chunk while the consumer works on the current one. With the default source a yielded
 * chunk is valid until the consumer asks for the chunk after the next one; consumers finish
 * with each chunk before asking for the next. A file that ends early throws
 * FLEET_BUNDLE_TRUNCATED.
 */
export async function* readRange(fh: FileHandle, start: number, end: number, source: ChunkSource = alternatingBuffers(Math.min(CHUNK_BYTES, Math.max(1, end - start)))): AsyncGenerator<Buffer> {
  if (start >= end) return;
  let pos = start;
  const readInto = async (at: number): Promise<{ buf: Buffer; bytesRead: number }> => {
    const buf = await source.acquire();
    const { bytesRead } = await fh.read(buf, 0, Math.min(buf.length, end - at), at);
    return { buf, bytesRead };
  };
  let pending: Promise<{ buf: Buffer; bytesRead: number }> | undefined = readInto(pos);
  while (pending) {
    const { buf, bytesRead } = await pending;
    if (bytesRead === 0) throw new FleetError('FLEET_BUNDLE_TRUNCATED', `bundle ends at byte ${pos}, expected ${end}`);
    pos += bytesRead;
    pending = pos < end ? readInto(pos) : undefined;
    // a rejected read-ahead is seen when awaited; do not let it count as unhandled meanwhile
    pending?.catch(() => undefined);
    yield bytesRead === buf.length ? buf : buf.subarray(0, bytesRead);
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
 * after each chunk with the payload bytes done so far; `chunks` supplies the read buffers and
 * sees every chunk once all its files' handlers have run.
 */
export async function walkPayload(fh: FileHandle, start: number, sizes: readonly number[], h: PayloadHandlers, progress?: (done: number) => void, chunks?: { source: ChunkSource; after(chunk: Buffer): void }): Promise<void> {
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
  for await (const chunk of readRange(fh, start, start + total, chunks?.source)) {
    let off = 0;
    while (off < chunk.length) {
      const n = Math.min(remaining, chunk.length - off);
      const r = h.data(fi, n === chunk.length ? chunk : chunk.subarray(off, off + n));
      if (r) await r;
      off += n;
      remaining -= n;
      if (remaining === 0) await advance();
    }
    chunks?.after(chunk);
    done += chunk.length;
    progress?.(done);
  }
}

// Plain JS so it runs the same under tsx, the built bundle and the single executable.
const HASH_WORKER = `
const { parentPort, workerData } = require('node:worker_threads');
const { createHash } = require('node:crypto');
const { sab, chunk } = workerData;
const h = createHash('sha256');
parentPort.on('message', (m) => {
  if (m.t === 'u') {
    h.update(new Uint8Array(sab, m.slot * chunk, m.len));
    parentPort.postMessage({ t: 'a', slot: m.slot });
  } else if (m.t === 'b') {
    h.update(m.bytes);
  } else if (m.t === 'd') {
    parentPort.postMessage({ t: 'd', sha256: h.digest('hex') });
    parentPort.close();
  }
});
`;

/**
 * sha256 of a byte stream computed on a worker thread, fed from read buffers that live in one
 * SharedArrayBuffer: the main thread reads each chunk once, hashes it per file, and hands the
 * same bytes to the worker (no copy, no second read), so the whole-file hash is over exactly
 * the bytes that were verified, and the two hash passes run on two cores. A slot is reused only
 * after the worker has hashed it, so memory is SLOTS × CHUNK_BYTES.
 */
export class WorkerHasher implements ChunkSource {
  static readonly SLOTS = 4;
  private readonly worker: Worker;
  private readonly sab: SharedArrayBuffer;
  private readonly free: number[] = [];
  private readonly waiters: Array<{ resolve: (b: Buffer) => void; reject: (e: Error) => void }> = [];
  private digestWaiter: { resolve: (s: string) => void; reject: (e: Error) => void } | undefined;
  private failed: Error | undefined;

  /** undefined when no worker thread can be started (the caller hashes inline). */
  static start(): WorkerHasher | undefined {
    try {
      return new WorkerHasher();
    } catch {
      return undefined;
    }
  }

  private constructor() {
    this.sab = new SharedArrayBuffer(WorkerHasher.SLOTS * CHUNK_BYTES);
    this.worker = new Worker(HASH_WORKER, { eval: true, workerData: { sab: this.sab, chunk: CHUNK_BYTES }, execArgv: [], stdout: false, stderr: false });
    for (let i = WorkerHasher.SLOTS - 1; i >= 0; i--) this.free.push(i);
    this.worker.on('message', (m: { t: 'a'; slot: number } | { t: 'd'; sha256: string }) => {
      if (m.t === 'a') this.release(m.slot);
      else this.digestWaiter?.resolve(m.sha256);
    });
    this.worker.on('error', (err) => this.fail(new FleetError('FLEET_INTERNAL', `hash worker failed: ${err.message}`, { cause: err })));
    this.worker.on('exit', (code) => this.fail(new FleetError('FLEET_INTERNAL', `hash worker exited (code ${code})`)));
  }

  private view(slot: number): Buffer {
    return Buffer.from(this.sab, slot * CHUNK_BYTES, CHUNK_BYTES);
  }

  private release(slot: number): void {
    const w = this.waiters.shift();
    if (w) w.resolve(this.view(slot));
    else this.free.push(slot);
  }

  private fail(err: Error): void {
    if (this.failed) return;
    this.failed = err;
    for (const w of this.waiters.splice(0)) w.reject(err);
    this.digestWaiter?.reject(err);
  }

  acquire(): Buffer | Promise<Buffer> {
    if (this.failed) return Promise.reject(this.failed);
    const slot = this.free.pop();
    if (slot !== undefined) return this.view(slot);
    return new Promise((resolve, reject) => this.waiters.push({ resolve, reject }));
  }

  /** Hash bytes that are not in a slot (copied to the worker). */
  update(bytes: Buffer): void {
    this.worker.postMessage({ t: 'b', bytes: Uint8Array.from(bytes) });
  }

  /** Hash a chunk that acquire() handed out; its slot comes back once hashed. */
  submit(chunk: Buffer): void {
    if (chunk.buffer !== this.sab) throw new FleetError('FLEET_INTERNAL', 'WorkerHasher.submit: not one of its buffers');
    this.worker.postMessage({ t: 'u', slot: chunk.byteOffset / CHUNK_BYTES, len: chunk.length });
  }

  /** The sha256 of everything submitted, in order; the worker ends afterwards. */
  digest(): Promise<string> {
    if (this.failed) return Promise.reject(this.failed);
    const p = new Promise<string>((resolve, reject) => (this.digestWaiter = { resolve, reject }));
    this.worker.postMessage({ t: 'd' });
    return p;
  }

  async close(): Promise<void> {
    this.failed ??= new FleetError('FLEET_INTERNAL', 'hash worker closed');
    await this.worker.terminate();
  }
}
