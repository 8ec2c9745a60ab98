import { readFileSync } from 'node:fs';
import { homedir } from 'node:os';
import { join } from 'node:path';
import { parse as parseYaml } from 'yaml';
import type { z } from 'zod';
import { FleetError } from './errors.ts';

/**
 * Config is read once at start: file (YAML or JSON) < command-line overrides, validated
 * against the part's schema, frozen and passed in. This module is the only one that reads
 * process.env (see `env`). Errors name the key and the file.
 */
export interface LoadedConfig<T> {
  config: Readonly<T>;
  /** the file it came from, or null when built from defaults and flags only */
  file: string | null;
}

/** Read an environment variable. The single place in the code base that touches process.env. */
export function env(name: 'FLEETLET_LOG_LEVEL' | 'FLEETLET_STATE_DIR' | 'HOME' | 'XDG_STATE_HOME' | 'NO_COLOR'): string | undefined {
  const v = process.env[name];
  return v === undefined || v === '' ? undefined : v;
}

export function readConfigFile(file: string): unknown {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (err) {
    throw new FleetError('FLEET_CONFIG_UNREADABLE', `cannot read config file ${file}: ${(err as Error).message}`, { cause: err });
  }
  try {
    const data: unknown = file.endsWith('.json') ? JSON.parse(text) : parseYaml(text);
    return data ?? {};
  } catch (err) {
    throw new FleetError('FLEET_CONFIG_UNREADABLE', `cannot parse config file ${file}: ${(err as Error).message}`, { cause: err });
  }
}

function isPlainObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/** Deep merge, `over` wins; arrays are replaced, not merged. */
export function mergeConfig(base: unknown, over: unknown): unknown {
  if (!isPlainObject(base) || !isPlainObject(over)) return over === undefined ? base : over;
  const out: Record<string, unknown> = { ...base };
  for (const [k, v] of Object.entries(over)) if (v !== undefined) out[k] = mergeConfig(base[k], v);
  return out;
}

function deepFreeze<T>(v: T): T {
  if (v && typeof v === 'object' && !Object.isFrozen(v)) {
    Object.freeze(v);
    for (const x of Object.values(v)) deepFreeze(x);
  }
  return v;
}

/**
 * Validate `raw` against `schema`. Every problem is listed, each as `key.path: message`,
 * prefixed with the file, e.g. `agent.yaml: apps.0.restart: Invalid option: expected one of ...`.
 */
export function validateConfig<S extends z.ZodType>(schema: S, raw: unknown, file: string | null): Readonly<z.infer<S>> {
  const res = schema.safeParse(raw ?? {});
  if (!res.success) {
    const where = file ?? '(command line)';
    const problems = res.error.issues.map((i) => {
      const key = i.path.length ? i.path.join('.') : '(root)';
      const extra = i.code === 'unrecognized_keys' ? ` (${(i as { keys?: string[] }).keys?.join(', ')})` : '';
      return `${key}: ${i.message}${extra}`;
    });
    throw new FleetError('FLEET_CONFIG_INVALID', `${where}: ${problems.join('; ')}`, {
      details: { file: where, keys: res.error.issues.map((i) => i.path.join('.')) },
    });
  }
  return deepFreeze(res.data) as Readonly<z.infer<S>>;
}

export function loadConfig<S extends z.ZodType>(schema: S, opts: { file?: string | undefined; overrides?: unknown }): LoadedConfig<z.infer<S>> {
  const fromFile = opts.file ? readConfigFile(opts.file) : {};
  const merged = mergeConfig(fromFile, opts.overrides ?? {});
  return { config: validateConfig(schema, merged, opts.file ?? null), file: opts.file ?? null };
}

/** Default state directory: $FLEETLET_STATE_DIR, else /var/lib/fleetlet as root, else XDG state dir. */
export function defaultStateDir(part: string): string {
  const fromEnv = env('FLEETLET_STATE_DIR');
  if (fromEnv) return join(fromEnv, part);
  if (process.getuid?.() === 0) return join('/var/lib/fleetlet', part);
  const xdg = env('XDG_STATE_HOME') ?? join(env('HOME') ?? homedir(), '.local', 'state');
  return join(xdg, 'fleetlet', part);
}

export function logLevelFromEnv(): 'debug' | 'info' | 'warn' | 'error' | 'silent' | undefined {
  const v = env('FLEETLET_LOG_LEVEL');
  return v === 'debug' || v === 'info' || v === 'warn' || v === 'error' || v === 'silent' ? v : undefined;
}
