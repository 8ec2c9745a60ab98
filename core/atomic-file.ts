import { closeSync, fsyncSync, mkdirSync, openSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { mkdir, open, rename, rm } from 'node:fs/promises';
import { dirname } from 'node:path';

/**
 * Crash-safe file replacement, shared by every part that keeps state in a file: the data is
 * written to a temp file beside the target (same directory, so the rename is atomic), synced,
 * and renamed over the target. A crash leaves the old file or the new one, never a mix or an
 * empty file (and may leave the temp file, `{file}.{pid}.tmp`); a write that fails removes
 * its temp file. `syncDir` also syncs the directory, so the rename itself survives power loss.
 */
export interface AtomicWriteOptions {
  /** the file's mode (default 0o600: state files hold ids, counters, keys' derivatives) */
  mode?: number;
  /** mode of the directory, created when missing (default 0o700) */
  dirMode?: number;
  /** fsync the directory after the rename */
  syncDir?: boolean;
}

const tmpName = (file: string): string => `${file}.${process.pid}.tmp`;

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
