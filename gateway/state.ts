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

/** The parts of the gateway state, walked lazily by encodeGatewayState (in chunks). */
export interface GatewayStateSource {
  mcus(): Iterator<string>;
  replay(): Iterator<[string, readonly [number, number]]>;
  meta(): Iterator<[string, McuMeta]>;
}

/** entries encoded in one turn of the event loop */
const ENCODE_CHUNK = 500;

/**
 * The state file's text, as JSON.stringify of a PersistedGatewayState gives it, built
 * `chunk` entries at a time with a turn of the event loop between chunks. At 10,000 MCUs
 * building the snapshot and stringifying it whole took 15 ms on an idle core (about 1 MB)
 * and 40–50 ms on a loaded gateway, every stateFlushMs (2 s): a stall that every MCU message
 * arriving meanwhile waited out, a visible part of the relay's p99 latency. Entries are read
 * as the walk reaches them, so one changed during the walk is saved as it is then (replay
 * counters only grow); any change after takeChanged() also marks the state for the next save.
 */
export async function encodeGatewayState(src: GatewayStateSource, chunk = ENCODE_CHUNK): Promise<string> {
  const out: string[] = ['{"v":1,"mcus":['];
  await encodeEntries(out, src.mcus(), (id) => JSON.stringify(id), chunk);
  out.push('],"replay":{');
  await encodeEntries(out, src.replay(), ([id, v]) => `${JSON.stringify(id)}:${JSON.stringify(v)}`, chunk);
  out.push('},"meta":{');
  await encodeEntries(out, src.meta(), ([id, m]) => `${JSON.stringify(id)}:${JSON.stringify(m)}`, chunk);
  out.push('}}');
  return out.join('');
}

async function encodeEntries<T>(out: string[], it: Iterator<T>, encode: (v: T) => string, chunk: number): Promise<void> {
  let sep = '';
  for (;;) {
    for (let i = 0; i < chunk; i++) {
      const r = it.next();
      if (r.done === true) return;
      out.push(sep + encode(r.value));
      sep = ',';
    }
    await new Promise<void>((resolve) => setImmediate(resolve));
  }
}

/**
 * saveGatewayState without blocking the event loop: the text comes from encodeGatewayState,
 * and the write, fsync and rename run on libuv's thread pool. The gateway saves every
 * stateFlushMs while MCUs send MAC-framed messages, i.e. continuously at scale, and a
 * synchronous fsync of a file listing 10,000 MCUs stalled every connection for its
 * duration. Same file layout and atomic rename.
 */
export async function saveGatewayStateAsync(file: string, data: string): Promise<void> {
  const tmp = `${file}.${process.pid}.tmp`;
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
