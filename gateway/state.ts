import { closeSync, fsyncSync, mkdirSync, openSync, readFileSync, renameSync, writeSync } from 'node:fs';
import { mkdir, open, rename } from 'node:fs/promises';
import { dirname } from 'node:path';
import { FleetError } from '../core/errors.ts';
import type { Logger } from '../core/log.ts';
import { isDeviceId } from '../core/topics.ts';
import type { ReplaySnapshot } from '../firmware-bridge/auth.ts';
import type { McuMeta } from './relay.ts';

/**
 * What the gateway keeps across restarts (`<stateDir>/mcu-state.json`): the MCUs it
 * acts for, so its register message does not shrink after a restart, and the CoAP
 * replay counters, without which every message an attacker ever captured could be
 * replayed once the gateway restarts. Written whole, fsynced, then renamed into
 * place, so a crash leaves either the old or the new file.
 */
export interface PersistedGatewayState {
  v: 1;
  mcus: string[];
  replay: ReplaySnapshot;
  /** what each MCU said in its last hello (firmware version, sleep period, sensor table) */
  meta?: Record<string, McuMeta>;
}

export function loadGatewayState(file: string, log: Logger): { mcus: string[]; replay: unknown; meta: Record<string, McuMeta> } {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return { mcus: [], replay: {}, meta: {} };
    throw new FleetError('FLEET_STORE', `cannot read ${file}: ${(err as Error).message}`, { cause: err });
  }
  try {
    const data = JSON.parse(text) as Partial<PersistedGatewayState>;
    if (data.v !== 1 || !Array.isArray(data.mcus)) throw new Error('not a v1 gateway state file');
    const meta = typeof data.meta === 'object' && data.meta !== null && !Array.isArray(data.meta) ? data.meta : {};
    return { mcus: data.mcus.filter(isDeviceId), replay: data.replay ?? {}, meta };
  } catch (err) {
    // Starting without counters re-opens replay of old captures, so say so loudly; but
    // refusing to start would take every MCU at the site offline over one bad file.
    const aside = `${file}.corrupt-${Date.now()}`;
    try {
      renameSync(file, aside);
    } catch {
      /* keep going: the next save replaces it */
    }
    log.error('gateway state file unreadable; starting without MCU replay counters', { file, movedTo: aside, err });
    return { mcus: [], replay: {}, meta: {} };
  }
}

export function saveGatewayState(file: string, state: PersistedGatewayState): void {
  const tmp = `${file}.${process.pid}.tmp`;
  try {
    mkdirSync(dirname(file), { recursive: true, mode: 0o700 });
    const fd = openSync(tmp, 'w', 0o600);
    try {
      writeSync(fd, JSON.stringify(state));
      fsyncSync(fd);
    } finally {
      closeSync(fd);
    }
    renameSync(tmp, file);
  } catch (err) {
    throw new FleetError('FLEET_STORE', `cannot write ${file}: ${(err as Error).message}`, { cause: err });
  }
}

/**
 * saveGatewayState without blocking the event loop: the write, fsync and rename run on
 * libuv's thread pool. The gateway saves every stateFlushMs while MCUs send MAC-framed
 * messages, i.e. continuously at scale, and a synchronous fsync of a file listing 10,000
 * MCUs stalled every connection for its duration. Same file layout and atomic rename.
 */
export async function saveGatewayStateAsync(file: string, state: PersistedGatewayState): Promise<void> {
  const tmp = `${file}.${process.pid}.tmp`;
  const data = JSON.stringify(state);
  try {
    await mkdir(dirname(file), { recursive: true, mode: 0o700 });
    const fh = await open(tmp, 'w', 0o600);
    try {
      await fh.writeFile(data);
      await fh.sync();
    } finally {
      await fh.close();
    }
    await rename(tmp, file);
  } catch (err) {
    throw new FleetError('FLEET_STORE', `cannot write ${file}: ${(err as Error).message}`, { cause: err });
  }
}
