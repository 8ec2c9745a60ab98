import { closeSync, existsSync, fstatSync, mkdirSync, openSync, readSync, renameSync, rmSync, statSync, writeSync } from 'node:fs';
import { join } from 'node:path';

/**
 * Rotating log files for one app (docs/agent.md#logs): `<dir>/<app>.log` and up to
 * `files - 1` older generations `<app>.log.1` (newest) … `<app>.log.<files-1>` (oldest), each
 * at most about `maxBytes`. Lines are buffered and written in one write per flush, so a chatty
 * app costs one syscall per flush, not one per line.
 */
export interface LogFileSpec {
  maxBytes: number;
  files: number;
}

export const DEFAULT_LOG_FILES: LogFileSpec = { maxBytes: 10 * 1024 * 1024, files: 5 };

const FLUSH_MS = 200;
const FLUSH_BYTES = 64 * 1024;

export class RotatingLog {
  readonly path: string;
  private fd: number;
  private size: number;
  private buf: string[] = [];
  private bufBytes = 0;
  private timer: NodeJS.Timeout | null = null;
  /** write errors (disk full, …) are counted and the lines dropped: the app must keep running */
  writeErrors = 0;
  lastError: string | null = null;

  constructor(
    dir: string,
    name: string,
    private readonly spec: LogFileSpec,
  ) {
    mkdirSync(dir, { recursive: true, mode: 0o750 });
    this.path = join(dir, `${name}.log`);
    this.fd = openSync(this.path, 'a', 0o640);
    this.size = fstatSync(this.fd).size;
  }

  write(line: string): void {
    this.buf.push(line);
    this.bufBytes += Buffer.byteLength(line) + 1;
    if (this.bufBytes >= FLUSH_BYTES) this.flush();
    else this.timer ??= setTimeout(() => this.flush(), FLUSH_MS);
  }

  flush(): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    if (this.buf.length === 0) return;
    const lines = this.buf;
    this.buf = [];
    this.bufBytes = 0;
    // split at line boundaries so no file grows far past maxBytes
    let chunk: string[] = [];
    let chunkBytes = 0;
    for (const l of lines) {
      const n = Buffer.byteLength(l) + 1;
      if (this.size + chunkBytes + n > this.spec.maxBytes && this.size + chunkBytes > 0) {
        this.writeOut(chunk);
        chunk = [];
        chunkBytes = 0;
        this.rotate();
      }
      chunk.push(l);
      chunkBytes += n;
    }
    this.writeOut(chunk);
  }

  private writeOut(lines: string[]): void {
    if (lines.length === 0) return;
    const data = Buffer.from(`${lines.join('\n')}\n`);
    try {
      writeSync(this.fd, data);
      this.size += data.length;
    } catch (err) {
      this.writeErrors++;
      this.lastError = (err as Error).message;
    }
  }

  private rotate(): void {
    try {
      closeSync(this.fd);
      const gen = (i: number) => `${this.path}.${i}`;
      if (this.spec.files <= 1) rmSync(this.path, { force: true });
      else {
        rmSync(gen(this.spec.files - 1), { force: true });
        for (let i = this.spec.files - 2; i >= 1; i--) if (existsSync(gen(i))) renameSync(gen(i), gen(i + 1));
        renameSync(this.path, gen(1));
      }
    } catch (err) {
      this.writeErrors++;
      this.lastError = (err as Error).message;
    }
    this.fd = openSync(this.path, 'a', 0o640);
    this.size = 0;
  }

  /** The last `n` lines across the current file and older generations (newest last). */
  tail(n: number): string[] {
    this.flush();
    const out: string[] = [];
    for (let i = 0; i < this.spec.files && out.length < n; i++) {
      const file = i === 0 ? this.path : `${this.path}.${i}`;
      if (!existsSync(file)) break;
      const lines = tailFile(file, n - out.length);
      out.unshift(...lines);
    }
    return out.slice(-n);
  }

  files(): Array<{ path: string; bytes: number }> {
    this.flush();
    const list = [{ path: this.path, bytes: this.size }];
    for (let i = 1; i < this.spec.files; i++) {
      const p = `${this.path}.${i}`;
      if (existsSync(p)) list.push({ path: p, bytes: statSync(p).size });
    }
    return list;
  }

  close(): void {
    this.flush();
    closeSync(this.fd);
  }
}

/** Last `n` lines of a file, reading backwards in 64 KiB blocks (bounded memory for big files). */
export function tailFile(file: string, n: number): string[] {
  if (n <= 0) return [];
  const fd = openSync(file, 'r');
  try {
    let pos = fstatSync(fd).size;
    const blocks: Buffer[] = [];
    let newlines = 0;
    // read whole blocks backwards until there are more than n newlines (decoded once, so a
    // multi-byte character split across blocks stays intact)
    while (pos > 0 && newlines <= n) {
      const len = Math.min(64 * 1024, pos);
      pos -= len;
      const block = Buffer.alloc(len);
      readSync(fd, block, 0, len, pos);
      for (let i = block.indexOf(10); i !== -1; i = block.indexOf(10, i + 1)) newlines++;
      blocks.unshift(block);
    }
    const text = Buffer.concat(blocks).toString('utf8');
    const lines = text.split('\n');
    if (lines[lines.length - 1] === '') lines.pop();
    return lines.slice(-n);
  } finally {
    closeSync(fd);
  }
}
