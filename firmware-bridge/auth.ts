import { createHmac, timingSafeEqual } from 'node:crypto';
import { deriveToken } from '../core/credentials.ts';
import { FleetError } from '../core/errors.ts';
import { isDeviceId } from '../core/topics.ts';
import type { McuChannel } from './topics.ts';

/**
 * Application-level authentication of MCU messages over CoAP, which here runs without
 * DTLS (docs/mcu-protocol.md has the threat model).
 *
 *   key     = deriveToken(siteSecret, 'mcu', mcuId)   — the same string the MCU uses as
 *             its MQTT password; its UTF-8 bytes are the HMAC key, so firmware stores
 *             one provisioned secret in one form
 *   input   = "fleetlet-mcu-mac:v1\n" mcuId "\n" resource "\n" counter "\n" payload
 *   mac     = first 16 bytes of HMAC-SHA256(key, input), base64url without padding
 *
 * The fields before the payload cannot contain "\n" (ids follow the device-id rule,
 * the resource is a fixed token, the counter is canonical decimal), so the input is
 * unambiguous. The MAC binds the message to its MCU, its resource (a telemetry MAC
 * cannot be replayed onto another resource) and its counter; the counter must grow
 * per MCU, which the ReplayGuard enforces.
 */
export const MAC_LABEL = 'fleetlet-mcu-mac:v1';
/** 128-bit tag: HMAC-SHA256 truncated as RFC 2104 §5 allows (at least half the output). */
export const MAC_BYTES = 16;
/** 16 bytes in base64url without padding */
export const MAC_CHARS = 22;
/** Counters are positive integers that JSON and JavaScript carry exactly. */
export const MAX_COUNTER = Number.MAX_SAFE_INTEGER;

/**
 * The canonical base64url of 16 bytes: 22 characters carry 132 bits, so the last one holds 2
 * bits of the MAC and 4 zero bits (A, Q, g or w). Without this, 16 strings verified for one MAC.
 */
export const MAC_RE = /^[A-Za-z0-9_-]{21}[AQgw]$/;
const COUNTER_RE = /^[1-9][0-9]{0,15}$/;

export type MacResource = McuChannel;

/** The per-MCU key, derived from the gateway's site secret. */
export function mcuKey(siteSecret: string, mcuId: string): string {
  return deriveToken(siteSecret, 'mcu', mcuId);
}

/**
 * The gateway's per-MCU keys: derived from the site secret, and remembered for MCUs that
 * proved they hold theirs (a verified MAC or MQTT password), so an MCU's next message costs
 * no derivation (one HMAC, about 4 µs: 7% of the gateway's CPU at 5,000 CoAP readings a
 * second). Only proven ids are kept, so requests under made-up ids fill nothing; at most
 * `max` (the oldest proven first out: it is derived again when it comes back).
 */
export class McuKeys {
  private readonly proven = new Map<string, string>();

  constructor(
    private readonly siteSecret: string,
    private readonly max = 100_000,
  ) {}

  /** The key of `mcuId`; throws FLEET_DEVICE_ID_INVALID for an id that is not a device id. */
  get(mcuId: string): string {
    return this.proven.get(mcuId) ?? mcuKey(this.siteSecret, mcuId);
  }

  /** `mcuId` showed it holds `key` (its MAC or password checked out): remember the key. */
  prove(mcuId: string, key: string): void {
    if (this.proven.has(mcuId)) return;
    if (this.proven.size >= this.max) this.proven.delete(this.proven.keys().next().value!);
    this.proven.set(mcuId, key);
  }

  /** keys remembered now */
  get size(): number {
    return this.proven.size;
  }
}

function macOf(key: string, mcuId: string, resource: MacResource, counter: number, payload: Uint8Array): Buffer {
  return createHmac('sha256', key)
    .update(`${MAC_LABEL}\n${mcuId}\n${resource}\n${counter}\n`)
    .update(payload)
    .digest()
    .subarray(0, MAC_BYTES);
}

/** Sign one message (the simulator and test clients; real firmware does the same in C). */
export function signMcuMessage(key: string, mcuId: string, resource: MacResource, counter: number, payload: Uint8Array): string {
  if (!isDeviceId(mcuId)) throw new FleetError('FLEET_DEVICE_ID_INVALID', `invalid MCU id ${JSON.stringify(mcuId)}`);
  if (!Number.isSafeInteger(counter) || counter < 1) throw new FleetError('FLEET_MCU_AUTH', `counter must be an integer from 1 to ${MAX_COUNTER}`);
  return macOf(key, mcuId, resource, counter, payload).toString('base64url');
}

/** Parse a counter from the wire: canonical decimal, 1..2^53-1; FLEET_MCU_AUTH otherwise. */
export function parseCounter(raw: string | undefined | null): number {
  if (typeof raw !== 'string' || !COUNTER_RE.test(raw)) throw new FleetError('FLEET_MCU_AUTH', 'counter missing or not a positive decimal integer');
  const n = Number(raw);
  if (!Number.isSafeInteger(n)) throw new FleetError('FLEET_MCU_AUTH', `counter exceeds ${MAX_COUNTER}`);
  return n;
}

/** Check a MAC in constant time; FLEET_MCU_AUTH when it is malformed or wrong. Stateless. */
export function verifyMcuMac(key: string, mcuId: string, resource: MacResource, counter: number, payload: Uint8Array, mac: string | undefined | null): void {
  if (typeof mac !== 'string' || !MAC_RE.test(mac)) throw new FleetError('FLEET_MCU_AUTH', `MAC missing or not ${MAC_CHARS} base64url characters`);
  const presented = Buffer.from(mac, 'base64url');
  const expected = macOf(key, mcuId, resource, counter, payload);
  if (presented.length !== MAC_BYTES || !timingSafeEqual(presented, expected)) throw new FleetError('FLEET_MCU_AUTH', 'MAC does not verify');
}

export interface ReplayGuardOptions {
  /**
   * How far below the highest counter seen a counter may still arrive (out of order,
   * e.g. reordered non-confirmable datagrams), each at most once. 0 = strictly
   * increasing. At most 32. Default 32.
   */
  window?: number;
  /** most MCUs tracked; a new one beyond that is refused (FLEET_FORBIDDEN). Default 100,000. */
  maxMcus?: number;
}

/** Per-MCU replay state: the highest counter accepted and a bitmap of the `window` below it. */
export type ReplaySnapshot = Record<string, [high: number, seen: number]>;

/**
 * Anti-replay with a sliding window, as IPsec does for sequence numbers (RFC 4303
 * §3.4.3): bit i of `seen` means counter `high - i` was accepted. Counters above
 * `high` move the window; counters inside it are accepted once; anything older is a
 * replay. Entries are never evicted, since forgetting an MCU would re-open replay
 * of everything it ever sent.
 */
/** how long a held counter stays held when its holder never records or releases it, ms */
export const HOLD_MS = 60_000;
/** counter floors of forgotten MCUs kept at most (the longest forgotten dropped first); ~100 bytes each */
export const MAX_FLOORS = 200_000;

export class ReplayGuard {
  private readonly state = new Map<string, { high: number; seen: number }>();
  /**
   * Forgotten MCUs' highest counters (`forget`): a message from one needs a counter above
   * it, so forgetting an MCU frees its slot without re-opening the replay of what it sent.
   * Not counted against maxMcus; at most MAX_FLOORS, the longest forgotten dropped first.
   */
  private readonly floors = new Map<string, number>();
  /** counters checked and not recorded yet (their messages are being stored): `${mcuId}\n${counter}` → held until (monotonic ms) */
  private readonly held = new Map<string, number>();
  private readonly window: number;
  private readonly maxMcus: number;
  private changed = false;

  constructor(opts: ReplayGuardOptions = {}) {
    const w = opts.window ?? 32;
    if (!Number.isInteger(w) || w < 0 || w > 32) throw new RangeError('replay window must be an integer from 0 to 32');
    this.window = w;
    this.maxMcus = opts.maxMcus ?? 100_000;
  }

  get size(): number {
    return this.state.size;
  }

  /**
   * Forget `mcuId` (the gateway forgot the MCU after a long silence): its slot of `maxMcus`
   * is freed, and its highest counter is kept as a floor: its next message must be above
   * it, as if it had never been forgotten, so what was captured from it before cannot be
   * replayed. Only beyond MAX_FLOORS forgotten MCUs is the longest forgotten one's floor
   * dropped (then its old messages could be replayed, once each, in counter order).
   */
  forget(mcuId: string): void {
    const st = this.state.get(mcuId);
    if (!st) return;
    this.state.delete(mcuId);
    this.setFloor(mcuId, st.high);
    this.changed = true;
  }

  private setFloor(mcuId: string, high: number): void {
    this.floors.delete(mcuId); // re-inserted last: the most recently forgotten
    this.floors.set(mcuId, high);
    if (this.floors.size > MAX_FLOORS) this.floors.delete(this.floors.keys().next().value!);
  }

  private checkFloor(mcuId: string, counter: number): void {
    const floor = this.floors.get(mcuId);
    if (floor !== undefined && counter <= floor) throw new FleetError('FLEET_MCU_REPLAY', `counter ${counter} is not above ${floor}, the last one ${mcuId} used before this gateway forgot it`, { details: { mcu: mcuId } });
  }

  /** [id, floor] of the forgotten MCUs (persisted with the state), the longest forgotten first */
  *floorEntries(): Generator<[string, number]> {
    yield* this.floors;
  }

  /** Load persisted floors (`floorEntries`); malformed entries are skipped (counted in the result). */
  restoreFloors(snap: unknown): { restored: number; skipped: number } {
    let restored = 0;
    let skipped = 0;
    if (typeof snap !== 'object' || snap === null || Array.isArray(snap)) return { restored, skipped };
    for (const [id, v] of Object.entries(snap)) {
      if (!isDeviceId(id) || !Number.isSafeInteger(v) || (v as number) < 1) {
        skipped++;
        continue;
      }
      // an MCU with live state needs no floor; never lower one
      if (!this.state.has(id) && (this.floors.get(id) ?? 0) < (v as number)) this.setFloor(id, v as number);
      restored++;
    }
    return { restored, skipped };
  }

  /** Highest counter accepted from `mcuId`, 0 when none. */
  high(mcuId: string): number {
    return this.state.get(mcuId)?.high ?? 0;
  }

  /**
   * Would `accept` take `counter` from `mcuId` now? Throws what it would throw
   * (FLEET_MCU_REPLAY, FLEET_FORBIDDEN, FLEET_MCU_AUTH) and records nothing: a message is
   * checked before it is stored and its counter recorded only once it is (a message the
   * gateway failed to store is then not refused as a replay when the MCU sends it again).
   */
  check(mcuId: string, counter: number): void {
    if (!Number.isSafeInteger(counter) || counter < 1) throw new FleetError('FLEET_MCU_AUTH', 'counter out of range');
    const st = this.state.get(mcuId);
    if (!st) {
      this.checkFloor(mcuId, counter);
      if (this.state.size >= this.maxMcus) throw new FleetError('FLEET_FORBIDDEN', `replay state for ${this.maxMcus} MCUs is full; refusing new MCU ${mcuId}`);
      return;
    }
    if (counter > st.high) return;
    const age = st.high - counter;
    if (age >= this.window) throw new FleetError('FLEET_MCU_REPLAY', `counter ${counter} is not above ${st.high - this.window} for ${mcuId}`, { details: { mcu: mcuId } });
    if ((st.seen & ((1 << age) >>> 0)) !== 0) throw new FleetError('FLEET_MCU_REPLAY', `counter ${counter} was already used by ${mcuId}`, { details: { mcu: mcuId } });
  }

  /**
   * Claim a counter that `check` passed while its message is being stored, so the same
   * message sent again meanwhile (a copy captured on the network and replayed from another
   * address, or the MCU's own resend) is not stored a second time: that copy gets
   * FLEET_MCU_IN_FLIGHT (try again shortly: by then the counter is recorded, a replay, or
   * released, free). The claim ends with `accept` (stored) or `release` (not stored), or
   * after HOLD_MS if neither comes.
   */
  hold(mcuId: string, counter: number, now = performance.now()): void {
    const k = `${mcuId}\n${counter}`;
    const until = this.held.get(k);
    if (until !== undefined && until > now) throw new FleetError('FLEET_MCU_IN_FLIGHT', `a message with counter ${counter} from ${mcuId} is being stored`, { details: { mcu: mcuId } });
    if (this.held.size >= 10_000) for (const [key, u] of this.held) if (u <= now) this.held.delete(key);
    this.held.set(k, now + HOLD_MS);
  }

  /** End a `hold` whose message was not stored: the counter may be used again. */
  release(mcuId: string, counter: number): void {
    if (this.held.size > 0) this.held.delete(`${mcuId}\n${counter}`);
  }

  /** Record `counter` for `mcuId` (ending a `hold` of it); FLEET_MCU_REPLAY when it was seen or is too old. Call only after the MAC verified. */
  accept(mcuId: string, counter: number): void {
    if (!Number.isSafeInteger(counter) || counter < 1) throw new FleetError('FLEET_MCU_AUTH', 'counter out of range');
    this.release(mcuId, counter);
    const st = this.state.get(mcuId);
    if (!st) {
      this.checkFloor(mcuId, counter);
      if (this.state.size >= this.maxMcus) throw new FleetError('FLEET_FORBIDDEN', `replay state for ${this.maxMcus} MCUs is full; refusing new MCU ${mcuId}`);
      this.state.set(mcuId, { high: counter, seen: 1 });
      this.floors.delete(mcuId); // its state holds more now
      this.changed = true;
      return;
    }
    if (counter > st.high) {
      const shift = counter - st.high;
      st.seen = shift >= 32 ? 1 : ((st.seen << shift) | 1) >>> 0;
      st.high = counter;
      this.changed = true;
      return;
    }
    const age = st.high - counter;
    if (age >= this.window) throw new FleetError('FLEET_MCU_REPLAY', `counter ${counter} is not above ${st.high - this.window} for ${mcuId}`, { details: { mcu: mcuId } });
    const bit = (1 << age) >>> 0;
    if ((st.seen & bit) !== 0) throw new FleetError('FLEET_MCU_REPLAY', `counter ${counter} was already used by ${mcuId}`, { details: { mcu: mcuId } });
    st.seen = (st.seen | bit) >>> 0;
    this.changed = true;
  }

  /** True once after any change; the owner uses it to decide when to persist. */
  takeChanged(): boolean {
    const c = this.changed;
    this.changed = false;
    return c;
  }

  snapshot(): ReplaySnapshot {
    return Object.fromEntries(this.entries());
  }

  /** [id, [high, seen]] per MCU (the snapshot's entries), read as the walk reaches them */
  *entries(): Generator<[string, [number, number]]> {
    for (const [id, st] of this.state) yield [id, [st.high, st.seen]];
  }

  /** Load persisted state; entries that are not well-formed are skipped (and counted in the result). */
  restore(snap: unknown): { restored: number; skipped: number } {
    let restored = 0;
    let skipped = 0;
    if (typeof snap !== 'object' || snap === null || Array.isArray(snap)) return { restored, skipped };
    for (const [id, v] of Object.entries(snap)) {
      if (!isDeviceId(id) || !Array.isArray(v) || v.length !== 2 || !Number.isSafeInteger(v[0]) || v[0] < 1 || !Number.isInteger(v[1]) || v[1] < 0 || v[1] > 0xffffffff) {
        skipped++;
        continue;
      }
      const cur = this.state.get(id);
      // never move a counter backwards: restoring older state must not re-open a replay
      if (!cur || cur.high < (v[0] as number)) this.state.set(id, { high: v[0] as number, seen: v[1] as number });
      restored++;
    }
    return { restored, skipped };
  }
}

export interface VerifyInput {
  key: string;
  mcuId: string;
  resource: MacResource;
  /** the counter as it came off the wire */
  counter: string | undefined | null;
  payload: Uint8Array;
  mac: string | undefined | null;
}

/**
 * The gateway's whole check for one message: counter well-formed, MAC valid, counter
 * not replayed. Throws FLEET_MCU_AUTH, FLEET_MCU_REPLAY or FLEET_FORBIDDEN; returns the
 * counter. `record` (default) records the counter at once; 'check' leaves that to the
 * caller (`guard.accept` once the message is stored). The MAC is checked before any state
 * is touched, so an attacker without the key cannot move an MCU's counter.
 */
export function verifyMcuMessage(guard: ReplayGuard, input: VerifyInput, mode: 'record' | 'check' = 'record'): number {
  const counter = parseCounter(input.counter);
  verifyMcuMac(input.key, input.mcuId, input.resource, counter, input.payload, input.mac);
  if (mode === 'record') guard.accept(input.mcuId, counter);
  else guard.check(input.mcuId, counter);
  return counter;
}

/**
 * Record a counter checked earlier with verifyMcuMessage(…, 'check') whose message is now
 * stored. A repeat recorded meanwhile (the MCU resent it on another connection while this
 * one was being stored: both are stored, a duplicate, never a loss) and a guard that filled
 * up meanwhile are not errors here; false then.
 */
export function recordCounter(guard: ReplayGuard, mcuId: string, counter: number): boolean {
  try {
    guard.accept(mcuId, counter);
    return true;
  } catch {
    return false;
  }
}
