import { closeSync, fsyncSync, mkdirSync, openSync, readdirSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { mkdir, open, rename, rm } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';

/**
 * Crash-safe file replacement, shared by every part that keeps state in a file: the data is
 * written to a temp file beside the target (same directory, so the rename is atomic), synced,
 * and renamed over the target. A crash leaves the old file or the new one, never a mix or an
 * empty file (and may leave the temp file, `{file}.{pid}.tmp`, which the next process to write
 * that file removes, once its writer is gone); a write that fails removes its temp file.
 * `syncDir` also syncs the directory, so the rename itself survives power loss.
 */
export interface AtomicWriteOptions {
  /** the file's mode (default 0o600: state files hold ids, counters, keys' derivatives) */
  mode?: number;
  /** mode of the directory, created when missing (default 0o700) */
  dirMode?: number;
  /** fsync the directory after the rename */
  syncDir?: boolean;
}

const tmpName = (file: string): string => {
  sweepStaleTemps(file);
  return `${file}.${process.pid}.tmp`;
};

/** files whose stale temp files this process has looked for (once each) */
const swept = new Set<string>();

/** Is process `pid` running (EPERM: it is, under another user)? */
function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/**
 * Remove `{file}.{pid}.tmp` left by writers that crashed mid-write (their process is gone),
 * once per file per process. A live writer's temp file is left alone.
 */
function sweepStaleTemps(file: string): void {
  if (swept.has(file)) return;
  swept.add(file);
  const dir = dirname(file);
  const prefix = `${basename(file)}.`;
  let names: string[];
  try {
    names = readdirSync(dir);
  } catch {
    return; // no directory yet: nothing left behind
  }
  for (const name of names) {
    if (!name.startsWith(prefix) || !name.endsWith('.tmp')) continue;
    const pid = name.slice(prefix.length, -'.tmp'.length);
    if (!/^[0-9]{1,10}$/.test(pid) || Number(pid) === process.pid || alive(Number(pid))) continue;
    rmSync(join(dir, name), { force: true });
  }
}

export function writeFileAtomicSync(file: string, data: string | Uint8Array, opts: AtomicWriteOptions = {}): void {
  mkdirSync(dirname(file), { recursive: true, mode: opts.dirMode ?? 0o700 });
  const tmp = tmpName(file);
  try {
    const fd = openSync(tmp, 'w', opts.mode ?? 0o600);
    try {
      writeFileSync(fd, data); // all of it (writeSync may write part)
      fsyncSync(fd);
    } finally {
      closeSync(fd);
    }
    renameSync(tmp, file);
  } catch (err) {
    rmSync(tmp, { force: true }); // a full disk keeps no half-written copy (a firmware image is MBs)
    throw err;
  }
  if (opts.syncDir) fsyncDirSync(dirname(file));
}

/** writeFileAtomicSync with the writes, fsync and rename on libuv's thread pool. */
export async function writeFileAtomic(file: string, data: string | Uint8Array, opts: AtomicWriteOptions = {}): Promise<void> {
  await mkdir(dirname(file), { recursive: true, mode: opts.dirMode ?? 0o700 });
  const tmp = tmpName(file);
  try {
    const fh = await open(tmp, 'w', opts.mode ?? 0o600);
    try {
      await fh.writeFile(data);
      await fh.sync();
    } finally {
      await fh.close();
    }
    await rename(tmp, file);
  } catch (err) {
    await rm(tmp, { force: true });
    throw err;
  }
  if (opts.syncDir) await fsyncDir(dirname(file));
}

/** fsync a directory so a rename or link inside it survives power loss. */
export function fsyncDirSync(dir: string): void {
  let fd: number | null = null;
  try {
    fd = openSync(dir, 'r');
    fsyncSync(fd);
  } catch {
    // some filesystems refuse fsync on directories (EINVAL); the rename is still atomic
  } finally {
    if (fd !== null) closeSync(fd);
  }
}

/** fsyncDirSync on the thread pool. */
export async function fsyncDir(dir: string): Promise<void> {
  let fh: Awaited<ReturnType<typeof open>> | null = null;
  try {
    fh = await open(dir, 'r');
    await fh.sync();
  } catch {
    // as fsyncDirSync
  } finally {
    await fh?.close();
  }
}
