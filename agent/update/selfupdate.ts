import { chmodSync, copyFileSync, existsSync, mkdirSync, renameSync } from 'node:fs';
import { join } from 'node:path';
import type { Logger } from '../../core/log.ts';
import type { UpdateConfig } from './config.ts';
import { readJson, switchSymlink, writeJsonAtomic } from './files.ts';
import { Layout, META_FILE } from './layout.ts';
import { advance } from './record.ts';
import type { ReleaseMeta, UpdateRecord } from './types.ts';

export type BootCheckResult = 'no-update' | 'counted' | 'rolled-back';

/**
 * The agent self-update boot counter (docs/ota.md#agent-self-update).
 *
 * After the switch to a new agent binary the update sits in `probation`. Every start of the
 * agent counts once: `fleetlet agent boot-check` (systemd ExecStartPre, run by the
 * `committed` binary, which is known to work) counts and marks the start as counted; the
 * agent's own start-up check counts only if no boot-check ran for this start. A new binary
 * that exits at once never reaches its own check, so the ExecStartPre count is what saves
 * the device; without systemd the agent's own check still covers binaries that start.
 *
 * When the starts exceed update.agentMaxStarts, or update.agentHealthyWithinS has passed
 * since the switch, `current` goes back to the previous binary and the update is marked
 * rolled-back (reported by whichever agent runs next).
 */
export function bootCheck(stateDir: string, config: UpdateConfig, log: Logger, from: 'pre-start' | 'agent', now = Date.now()): BootCheckResult {
  const layout = new Layout(stateDir);
  const rec = readJson<(UpdateRecord & { bootPending?: boolean }) | null>(layout.stateFile, null);
  if (!rec || rec.kind !== 'agent' || rec.state !== 'probation') return 'no-update';
  if (from === 'agent' && rec.bootPending) {
    // this start was counted by the pre-start check already
    rec.bootPending = false;
    writeJsonAtomic(layout.stateFile, rec);
  } else {
    rec.boots = (rec.boots ?? 0) + 1;
    rec.bootPending = from === 'pre-start';
    writeJsonAtomic(layout.stateFile, rec);
  }
  const boots = rec.boots ?? 0;
  const elapsedS = (now - (rec.switchedAt ?? now)) / 1000;
  let reason: string | null = null;
  if (boots > config.agentMaxStarts) reason = `new agent ${rec.version} did not become healthy and connected within ${config.agentMaxStarts} starts`;
  else if (elapsedS > config.agentHealthyWithinS) reason = `new agent ${rec.version} did not become healthy and connected within ${config.agentHealthyWithinS} s`;
  if (!reason) {
    log.info('agent self-update on probation', { version: rec.version, start: boots, maxStarts: config.agentMaxStarts, elapsedS: Math.round(elapsedS) });
    return 'counted';
  }
  log.warn('agent self-update failed; restoring the previous binary', { reason });
  advance(rec, { event: 'failure', reason, code: 'FLEET_UPDATE_BOOT' }, layout, now);
  rec.bootPending = false;
  writeJsonAtomic(layout.stateFile, rec);
  const link = layout.currentLink('agent', rec.name ?? 'fleetlet');
  if (rec.previous) switchSymlink(link, join(layout.releases('agent', rec.name ?? 'fleetlet'), rec.previous));
  rec.rollbackDoneAt = Date.now();
  advance(rec, { event: 'success' }, layout);
  writeJsonAtomic(layout.stateFile, rec);
  return 'rolled-back';
}

/**
 * Install `binary` as the agent's first release (releases/<version>-s0/fleetlet) and point
 * `current` and `committed` at it, unless the agent is installed that way already. Self-update
 * needs this layout: the unit's ExecStart runs <stateDir>/agent/current/fleetlet.
 */
export function bootstrapAgentRelease(stateDir: string, binary: string, version: string, name = 'fleetlet'): string {
  const layout = new Layout(stateDir);
  const link = layout.currentLink('agent', name);
  const existing = layout.currentRelease('agent', name);
  if (existing) return join(layout.releases('agent', name), existing);
  const release = `${version}-s0`;
  const dir = join(layout.releases('agent', name), release);
  mkdirSync(dir, { recursive: true });
  if (!existsSync(join(dir, 'fleetlet'))) {
    copyFileSync(binary, join(dir, 'fleetlet.tmp'));
    chmodSync(join(dir, 'fleetlet.tmp'), 0o755);
    renameSync(join(dir, 'fleetlet.tmp'), join(dir, 'fleetlet'));
  }
  const meta: ReleaseMeta = { name, kind: 'agent', version, sequence: 0, sha256: '', stagedAt: Date.now() };
  writeJsonAtomic(join(dir, META_FILE), meta);
  switchSymlink(link, dir);
  switchSymlink(layout.agentCommitted, dir);
  return dir;
}
