import { join } from 'node:path';
import type { Logger } from '../../core/log.ts';
import { readSecretFile } from '../../core/secrets.ts';
import type { AgentConfig, AppSpec } from '../config.ts';
import type { Supervisor } from '../supervisor.ts';
import { bootCheck } from './selfupdate.ts';
import type { VerifiedBundleLike, VerifyBundleFn } from './types.ts';
import { Updater } from './updater.ts';

export { Updater } from './updater.ts';
export { bootCheck, bootstrapAgentRelease } from './selfupdate.ts';
export { UpdateConfigSchema, type UpdateConfig } from './config.ts';

/**
 * The part of bundles/ the updater uses. agent/ does not import bundles/ (layout rule); the
 * CLI passes `await import('../bundles/index.ts')`, which fits this shape.
 */
export interface BundleApi<T> {
  loadTrustRoot(file: string): T;
  /** the next root, accepted only when signed by the current root's threshold and its own */
  updateTrustRoot(current: T, newRootBytes: Buffer): T;
  saveTrustRoot(file: string, root: T): void;
  verifyBundle(file: string, opts: { trust: T; floor?: number; kind?: 'app' | 'agent'; device: { arch: string; deviceClass?: string; agentVersion?: string } }): Promise<VerifiedBundleLike>;
}

export function trustRootFile(config: AgentConfig): string {
  return config.update.trustRoot ?? join(config.stateDir, 'trust', 'root.json');
}

/** A verifier over the device's trust root (read at each use, so a rotated root.json applies at once). */
export function makeVerifier<T>(api: BundleApi<T>, config: AgentConfig, agentVersion: string): VerifyBundleFn {
  const device = { arch: process.arch, agentVersion, ...(config.update.deviceClass ? { deviceClass: config.update.deviceClass } : {}) };
  return (file, o) => api.verifyBundle(file, { trust: api.loadTrustRoot(trustRootFile(config)), device, ...o });
}

/**
 * Trust root rotation (docs/bundle-format.md#trust-root): applies, oldest first, each root
 * document whose version is above the device's, each checked against the one before it, and
 * saves the result atomically. Documents at or below the current version are skipped, so the
 * hub may keep sending the whole chain. Returns the versions applied; throws the first refusal
 * (FLEET_BUNDLE_ROOT_*), keeping what was applied before it.
 */
export function applyTrustRoots<T extends { version: number }>(api: BundleApi<T>, file: string, docs: readonly Buffer[]): number[] {
  let current = api.loadTrustRoot(file);
  const applied: number[] = [];
  for (const doc of docs) {
    const version = peekRootVersion(doc);
    if (version !== null && version <= current.version) continue;
    current = api.updateTrustRoot(current, doc);
    api.saveTrustRoot(file, current);
    applied.push(current.version);
  }
  return applied;
}

function peekRootVersion(doc: Buffer): number | null {
  try {
    const v = (JSON.parse(doc.toString('utf8')) as { signed?: { version?: unknown } }).signed?.version;
    return typeof v === 'number' ? v : null;
  } catch {
    return null; // updateTrustRoot names what is wrong with it
  }
}

/** Config apps plus the apps the updater installed; an installed release wins over a config entry of the same name. */
export function mergeApps(configApps: readonly AppSpec[], installed: readonly AppSpec[]): AppSpec[] {
  const names = new Set(installed.map((a) => a.name));
  return [...configApps.filter((a) => !names.has(a.name)), ...installed];
}

export interface AgentUpdaterDeps<T> {
  config: AgentConfig;
  log: Logger;
  supervisor: Supervisor;
  version: string;
  bundles: BundleApi<T>;
  emitEvent(type: string, severity: 'info' | 'warning' | 'alert', data: Record<string, unknown>): unknown;
  connected(): boolean;
}

/**
 * The agent's updater, wired: the self-update boot check runs first (it may restore the
 * previous agent binary before anything else happens), downloads authenticate to the hub's
 * artifact store as this device (HTTP Basic, id:token), and a switch to a new agent binary
 * ends this process with SIGTERM so the service manager (Restart=always) starts `current`.
 */
export function createAgentUpdater<T>(d: AgentUpdaterDeps<T>): Updater {
  const { config, log } = d;
  bootCheck(config.stateDir, config.update, log.child({ part: 'boot-check' }), 'agent');
  const hub = config.hub;
  const updater: Updater = new Updater({
    stateDir: config.stateDir,
    config: config.update,
    log: log.child({ part: 'updater' }),
    supervisor: d.supervisor,
    applyApps: async () => {
      await d.supervisor.apply(mergeApps(config.apps, updater.appSpecs()));
    },
    verify: makeVerifier(d.bundles, config, d.version),
    agentVersion: d.version,
    emitEvent: d.emitEvent,
    authorization: hub ? () => `Basic ${Buffer.from(`${config.deviceId}:${readSecretFile(hub.tokenFile)}`).toString('base64')}` : () => undefined,
    connected: d.connected,
    hubConfigured: hub !== undefined,
    exitForRestart: () => process.kill(process.pid, 'SIGTERM'),
  });
  return updater;
}
