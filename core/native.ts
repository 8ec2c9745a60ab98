import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, readdirSync, readFileSync, renameSync, statSync, unlinkSync, writeFileSync } from 'node:fs';
import { basename, join } from 'node:path';
import { createRequire } from 'node:module';
import { defaultStateDir } from './config.ts';
import { FleetError } from './errors.ts';

/**
 * Native addon loading for the single executable. LevelDB (classic-level) is an N-API
 * addon; inside the executable it travels as an SEA asset, is extracted once under the
 * part's state directory (content-addressed name, atomic rename) and loaded with
 * process.dlopen. Not under /tmp: hardened devices mount it noexec (FACTS.md).
 *
 * The build replaces classic-level/binding.js with a call to `classicLevelBinding()`,
 * which returns a proxy: the addon is loaded on first use, after the part has said
 * where its state directory is.
 */
let nativeDir: string | undefined;

/** Called by each part at start, before the first store is opened. */
export function setNativeDir(stateDir: string): void {
  nativeDir = join(stateDir, 'native');
}

export function isSea(): boolean {
  try {
    const req = createRequire(import.meta.url);
    return (req('node:sea') as typeof import('node:sea')).isSea();
  } catch {
    return false;
  }
}

export const CLASSIC_LEVEL_ASSET = 'classic-level.node';

/** An extracted asset's name parts: `<stem>-<first 16 hex of sha256><ext>` (e.g. classic-level-48843c7375f755db.node). */
function assetName(asset: string): { stem: string; ext: string } {
  const dot = asset.lastIndexOf('.');
  return { stem: asset.slice(0, dot), ext: asset.slice(dot) };
}

/** Extract an SEA asset to `dir` under a content-addressed name; returns the path. Idempotent. */
export function extractAsset(asset: string, dir: string): string {
  const req = createRequire(import.meta.url);
  const sea = req('node:sea') as typeof import('node:sea');
  const bytes = Buffer.from(sea.getAsset(asset));
  const hash = createHash('sha256').update(bytes).digest('hex').slice(0, 16);
  const { stem, ext } = assetName(asset);
  const file = join(dir, `${stem}-${hash}${ext}`);
  if (existsSync(file)) {
    const have = createHash('sha256').update(readFileSync(file)).digest('hex').slice(0, 16);
    if (have === hash) return file;
  }
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  const tmp = `${file}.${process.pid}.tmp`;
  writeFileSync(tmp, bytes, { mode: 0o500 });
  renameSync(tmp, file);
  return file;
}

/**
 * a `.tmp` left by an extraction this much older is from a process that died writing it; an
 * addon file younger than this may be another binary's, between its extraction and its dlopen
 */
const STALE_MS = 10 * 60_000;

/**
 * Remove what earlier binaries left in the native directory: addon files of other contents
 * (another binary's `<name>-<hash>.node`) and temporary files of extractions that died, both
 * by their age (STALE_MS: a younger one may be another process writing or about to load it). Safe for a binary
 * still running on an older file (on Linux an unlinked file stays mapped) and for a rollback
 * to it (each binary carries its addon and extracts it again). Best effort: a file that
 * cannot be removed is left, and the addon in use is never touched. Returns what was removed.
 */
export function pruneNativeDir(dir: string, keep: string, now = Date.now()): string[] {
  const kept = basename(keep);
  const { stem, ext } = assetName(CLASSIC_LEVEL_ASSET);
  const addon = new RegExp(`^${stem}-[0-9a-f]{16}\\${ext}$`);
  const tmp = new RegExp(`^${stem}-[0-9a-f]{16}\\${ext}\\.[0-9]+\\.tmp$`);
  const removed: string[] = [];
  let names: string[];
  try {
    names = readdirSync(dir);
  } catch {
    return removed;
  }
  for (const name of names) {
    if (name === kept) continue;
    const path = join(dir, name);
    try {
      if ((addon.test(name) || tmp.test(name)) && now - statSync(path).mtimeMs > STALE_MS) {
        unlinkSync(path);
        removed.push(name);
      }
    } catch {
      // gone meanwhile, or not ours to remove: left as it is
    }
  }
  return removed;
}

let loaded: Record<string, unknown> | undefined;

function loadClassicLevel(): Record<string, unknown> {
  if (loaded) return loaded;
  const dir = nativeDir ?? join(defaultStateDir('native'));
  let file: string;
  let exports: Record<string, unknown>;
  try {
    file = extractAsset(CLASSIC_LEVEL_ASSET, dir);
    const mod = { exports: {} as Record<string, unknown> };
    process.dlopen(mod, file);
    exports = mod.exports;
  } catch (err) {
    throw new FleetError('FLEET_NATIVE_LOAD', `cannot load LevelDB addon from ${dir}: ${(err as Error).message}`, { cause: err });
  }
  try {
    pruneNativeDir(dir, file);
  } catch {
    // best effort (it catches its own errors): never a reason to fail a load that worked
  }
  loaded = exports;
  return loaded;
}

/** The object classic-level expects from its binding, loaded lazily (see build.mjs). */
export function classicLevelBinding(): Record<string, unknown> {
  return new Proxy({} as Record<string, unknown>, {
    get: (_t, prop) => loadClassicLevel()[prop as string],
    has: (_t, prop) => prop in loadClassicLevel(),
  });
}
