import { readFileSync, renameSync } from 'node:fs';
import { writeFileAtomic, writeFileAtomicSync } from '../core/atomic-file.ts';
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
  /** forgotten MCUs' highest counters: their old messages stay replays (ReplayGuard.forget) */
  floors?: Record<string, number>;
}

export function loadGatewayState(file: string, log: Logger): { mcus: string[]; replay: unknown; meta: Record<string, McuMeta>; floors: unknown } {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return { mcus: [], replay: {}, meta: {}, floors: {} };
    throw new FleetError('FLEET_STORE', `cannot read ${file}: ${(err as Error).message}`, { cause: err });
  }
  try {
    const data = JSON.parse(text) as Partial<PersistedGatewayState>;
    if (data.v !== 1 || !Array.isArray(data.mcus)) throw new Error('not a v1 gateway state file');
    const meta = typeof data.meta === 'object' && data.meta !== null && !Array.isArray(data.meta) ? data.meta : {};
    return { mcus: data.mcus.filter(isDeviceId), replay: data.replay ?? {}, meta, floors: data.floors ?? {} };
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
    return { mcus: [], replay: {}, meta: {}, floors: {} };
  }
}

/** Write the state file's text (encodeGatewayStateNow) synchronously: at stop. */
export function saveGatewayState(file: string, data: string): void {
  try {
    writeFileAtomicSync(file, data);
  } catch (err) {
    throw storeError(file, err);
  }
}

const storeError = (file: string, err: unknown): FleetError => new FleetError('FLEET_STORE', `cannot write ${file}: ${(err as Error).message}`, { cause: err });

/** The parts of the gateway state, walked lazily by encodeGatewayState (in chunks). */
export interface GatewayStateSource {
  mcus(): Iterator<string>;
  replay(): Iterator<[string, readonly [number, number]]>;
  meta(): Iterator<[string, McuMeta]>;
  floors?(): Iterator<[string, number]>;
}

/** entries encoded in one turn of the event loop */
const ENCODE_CHUNK = 500;
/** stateText: `chunk` entries were encoded since the last pause */
const PAUSE = Symbol('pause');

/**
 * The state file's text, as JSON.stringify of a PersistedGatewayState gives it, in pieces,
 * with PAUSE after every `chunk` entries. Entries are read as the walk reaches them.
 */
function* stateText(src: GatewayStateSource, chunk: number): Generator<string | typeof PAUSE> {
  let n = 0;
  function* entries<T>(it: Iterator<T>, encode: (v: T) => string): Generator<string | typeof PAUSE> {
    let sep = '';
    for (let r = it.next(); r.done !== true; r = it.next()) {
      yield sep + encode(r.value);
      sep = ',';
      if (++n % chunk === 0) yield PAUSE;
    }
  }
  yield '{"v":1,"mcus":[';
  yield* entries(src.mcus(), (id) => JSON.stringify(id));
  yield '],"replay":{';
  yield* entries(src.replay(), ([id, v]) => `${JSON.stringify(id)}:${JSON.stringify(v)}`);
  yield '},"meta":{';
  yield* entries(src.meta(), ([id, m]) => `${JSON.stringify(id)}:${JSON.stringify(m)}`);
  yield '},"floors":{';
  if (src.floors) yield* entries(src.floors(), ([id, f]) => `${JSON.stringify(id)}:${f}`);
  yield '}}';
}

/**
 * The state file's text, built `chunk` entries at a time with a turn of the event loop
 * between chunks. At 10,000 MCUs building the snapshot and stringifying it whole took 15 ms
 * on an idle core (about 1 MB) and 40–50 ms on a loaded gateway, every stateFlushMs (2 s): a
 * stall that every MCU message arriving meanwhile waited out, a visible part of the relay's
 * p99 latency. An entry changed during the walk is saved as it is then (replay counters only
 * grow); any change after takeChanged() also marks the state for the next save.
 */
export async function encodeGatewayState(src: GatewayStateSource, chunk = ENCODE_CHUNK): Promise<string> {
  const out: string[] = [];
  for (const piece of stateText(src, chunk)) {
    if (piece === PAUSE) await new Promise<void>((resolve) => setImmediate(resolve));
    else out.push(piece);
  }
  return out.join('');
}

/** The same text at once (at stop, when nothing else runs). */
export function encodeGatewayStateNow(src: GatewayStateSource): string {
  let out = '';
  for (const piece of stateText(src, Infinity)) if (piece !== PAUSE) out += piece;
  return out;
}

/**
 * saveGatewayState without blocking the event loop: the text comes from encodeGatewayState,
 * and the write, fsync and rename run on libuv's thread pool. The gateway saves every
 * stateFlushMs while MCUs send MAC-framed messages, i.e. continuously at scale, and a
 * synchronous fsync of a file listing 10,000 MCUs stalled every connection for its
 * duration. Same file layout and atomic rename.
 */
export async function saveGatewayStateAsync(file: string, data: string): Promise<void> {
  try {
    await writeFileAtomic(file, data);
  } catch (err) {
    throw storeError(file, err);
  }
}
