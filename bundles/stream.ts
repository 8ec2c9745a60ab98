import type { FileHandle } from 'node:fs/promises';
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
