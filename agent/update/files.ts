import { mkdirSync, readFileSync, readlinkSync, renameSync, rmSync, symlinkSync } from 'node:fs';
import { basename, dirname, join, resolve } from 'node:path';
import { fsyncDirSync, writeFileAtomicSync } from '../../core/atomic-file.ts';

/** fsync a directory so a rename or symlink inside it survives power loss (core/atomic-file.ts). */
export const fsyncDir = fsyncDirSync;

/** Write JSON crash-safely: temp file, fsync, rename over the target, fsync the directory. */
export function writeJsonAtomic(file: string, value: unknown): void {
  // directories made here get the default mode, as before (the release tree's own modes rule)
  writeFileAtomicSync(file, JSON.stringify(value, null, 2) + '\n', { syncDir: true, dirMode: 0o777 });
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
