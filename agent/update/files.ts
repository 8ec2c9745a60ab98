import { closeSync, fsyncSync, mkdirSync, openSync, readFileSync, readlinkSync, renameSync, rmSync, symlinkSync, writeSync } from 'node:fs';
import { basename, dirname, join, resolve } from 'node:path';

/** fsync a directory so a rename or symlink inside it survives power loss. */
export function fsyncDir(dir: string): void {
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

/** Write JSON crash-safely: temp file, fsync, rename over the target, fsync the directory. */
export function writeJsonAtomic(file: string, value: unknown): void {
  mkdirSync(dirname(file), { recursive: true });
  const tmp = `${file}.${process.pid}.tmp`;
  const fd = openSync(tmp, 'w', 0o600);
  try {
    writeSync(fd, JSON.stringify(value, null, 2) + '\n');
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
  renameSync(tmp, file);
  fsyncDir(dirname(file));
}

/** Parsed JSON, or `fallback` when the file is missing. A damaged file throws. */
export function readJson<T>(file: string, fallback: T): T {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return fallback;
    throw err;
  }
  return JSON.parse(text) as T;
}

/** Where the symlink points (absolute), or null when there is none. */
export function readLink(link: string): string | null {
  try {
    return resolve(dirname(link), readlinkSync(link));
  } catch {
    return null;
  }
}

/**
 * Point `link` at `target` atomically: a new symlink under a temp name renamed over the
 * old one (rename(2) replaces it in one step, so a reader sees the old or the new target,
 * never none). The target is stored relative so the state dir can move.
 */
export function switchSymlink(link: string, target: string): void {
  const dir = dirname(link);
  mkdirSync(dir, { recursive: true });
  const tmp = join(dir, `.${basename(link)}.${process.pid}.tmp`);
  rmSync(tmp, { force: true });
  const rel = target.startsWith(dir + '/') ? target.slice(dir.length + 1) : target;
  symlinkSync(rel, tmp);
  renameSync(tmp, link);
  fsyncDir(dir);
}
