import { existsSync, readdirSync } from 'node:fs';
import { isAbsolute, join } from 'node:path';
import { AppSpecSchema, type AppSpec } from '../config.ts';
import { readJson, readLink } from './files.ts';
import type { ReleaseMeta } from './types.ts';

/**
 * Where updates live on the device (docs/ota.md#file-layout):
 *
 *   <stateDir>/update/state.json          the update in progress (or the last one)
 *   <stateDir>/update/history.json        finished updates, newest first
 *   <stateDir>/update/floors.json         committed sequence per bundle name (anti-rollback floor)
 *   <stateDir>/update/downloads/          <sha256>.bundle (+ .part while downloading)
 *   <stateDir>/update/incoming/           uploads and copies from the watched directory
 *   <stateDir>/apps/<name>/releases/<version>-s<sequence>/   one dir per release, side by side
 *   <stateDir>/apps/<name>/current        symlink to the release that runs
 *   <stateDir>/apps/<name>/release.json   { current, previous } release names (informational)
 *   <stateDir>/apps/<name>/update.lock    present: updates of this app wait
 *   <stateDir>/agent/releases/<version>-s<sequence>/fleetlet
 *   <stateDir>/agent/current              symlink; systemd's ExecStart runs current/fleetlet
 *   <stateDir>/agent/committed            symlink to the last agent that proved healthy (runs the boot check)
 */
export const META_FILE = '.fleetlet-release.json';

export class Layout {
  constructor(readonly stateDir: string) {}
  get updateDir(): string {
    return join(this.stateDir, 'update');
  }
  get stateFile(): string {
    return join(this.updateDir, 'state.json');
  }
  get historyFile(): string {
    return join(this.updateDir, 'history.json');
  }
  get floorsFile(): string {
    return join(this.updateDir, 'floors.json');
  }
  get downloads(): string {
    return join(this.updateDir, 'downloads');
  }
  get incoming(): string {
    return join(this.updateDir, 'incoming');
  }
  /** base dir of a bundle: apps/<name> for apps, agent for the agent itself */
  base(kind: string, name: string): string {
    return kind === 'agent' ? join(this.stateDir, 'agent') : join(this.stateDir, 'apps', name);
  }
  releases(kind: string, name: string): string {
    return join(this.base(kind, name), 'releases');
  }
  currentLink(kind: string, name: string): string {
    return join(this.base(kind, name), 'current');
  }
  get agentCommitted(): string {
    return join(this.stateDir, 'agent', 'committed');
  }
  /** name of the release dir `current` points to, or null */
  currentRelease(kind: string, name: string): string | null {
    const t = readLink(this.currentLink(kind, name));
    return t ? t.slice(t.lastIndexOf('/') + 1) : null;
  }
  meta(kind: string, name: string, release: string): ReleaseMeta | null {
    try {
      return readJson<ReleaseMeta | null>(join(this.releases(kind, name), release, META_FILE), null);
    } catch {
      return null;
    }
  }
  /** every directory under apps/, installed or not */
  appDirs(): string[] {
    const dir = join(this.stateDir, 'apps');
    if (!existsSync(dir)) return [];
    return readdirSync(dir, { withFileTypes: true })
      .filter((e) => e.isDirectory())
      .map((e) => e.name);
  }
  /** names of apps installed by the updater (those with a `current` link) */
  installedApps(): string[] {
    const dir = join(this.stateDir, 'apps');
    if (!existsSync(dir)) return [];
    return readdirSync(dir)
      .filter((n) => readLink(this.currentLink('app', n)) !== null)
      .sort();
  }
}

/** Map the manifest's health section (bundles/format.ts) onto the supervisor's health spec, when it has one. */
function healthFrom(h: unknown): Record<string, unknown> | undefined {
  if (!h || typeof h !== 'object') return undefined;
  const m = h as { http?: string; tcp?: number; exec?: string[]; intervalMs?: number; timeoutMs?: number; retries?: number; startPeriodMs?: number };
  const timing = Object.fromEntries(Object.entries({ intervalMs: m.intervalMs, timeoutMs: m.timeoutMs, retries: m.retries, startPeriodMs: m.startPeriodMs }).filter(([, v]) => v !== undefined));
  if (m.http) return { type: 'http', url: m.http, ...timing };
  if (m.tcp) return { type: 'tcp', port: m.tcp, ...timing };
  if (m.exec && m.exec[0]) return { type: 'exec', command: m.exec[0], args: m.exec.slice(1), ...timing };
  return undefined;
}

/**
 * The supervisor's spec for an app release: command relative to the release dir (a bare
 * name such as `sh` is looked up on PATH), cwd = the release dir itself (not the
 * `current` link, so a later switch never changes what a running process sees).
 */
export function appSpecFor(name: string, releaseDir: string, meta: ReleaseMeta): AppSpec {
  const app = meta.app ?? { command: 'run' };
  const command = isAbsolute(app.command) || !app.command.includes('/') && !existsSync(join(releaseDir, app.command)) ? app.command : join(releaseDir, app.command);
  const base = { name, command, args: [...(app.args ?? [])], env: { ...(app.env ?? {}), FLEETLET_APP_VERSION: meta.version, FLEETLET_RELEASE_DIR: releaseDir }, cwd: releaseDir };
  const health = healthFrom(app.health);
  if (health) {
    // the supervisor's health schema may not take every timing key the manifest can carry
    const withHealth = AppSpecSchema.safeParse({ ...base, health });
    if (withHealth.success) return withHealth.data;
    const { type, url, port, command: c, args } = health as Record<string, unknown>;
    const bare = AppSpecSchema.safeParse({ ...base, health: Object.fromEntries(Object.entries({ type, url, port, command: c, args }).filter(([, v]) => v !== undefined)) });
    if (bare.success) return bare.data;
  }
  return AppSpecSchema.parse(base);
}
