import { readFileSync } from 'node:fs';
import { writeFileAtomic } from '../core/atomic-file.ts';
import { FleetError } from '../core/errors.ts';
import { encodeMessage, MCU_REVOCATIONS_MAX, type McuRevocationList } from '../core/messages.ts';
import { assertDeviceId } from '../core/topics.ts';

/** What a list revokes: shown in its errors. */
export interface RevocationKind {
  /** "MCUs", "devices" */
  noun: string;
  /** most ids on the list */
  max: number;
  /** what else the operator can do at the limit */
  remedy: string;
}

/** MCUs revoked fleet-wide (docs/mcu-protocol.md "Revoking one MCU"): `{stateDir}/mcu-revocations.json`. */
export const MCU_REVOCATIONS: RevocationKind = { noun: 'MCUs', max: MCU_REVOCATIONS_MAX, remedy: 'unrevoke retired ones, or rotate the site secret' };
/** Agents and gateways whose device tokens are revoked (docs/security.md): `{stateDir}/device-revocations.json`. */
export const DEVICE_REVOCATIONS: RevocationKind = { noun: 'devices', max: 100_000, remedy: 'unrevoke retired ones, or rotate the fleet secret' };

/**
 * Ids revoked by the operator at the hub, kept in a JSON file and changed through the API.
 *
 * - MCUs (MCU_REVOCATIONS) are published retained for the gateways
 *   (MCU_REVOCATIONS_TOPIC, `message()`), which refuse those MCUs as they refuse the ones on
 *   their own list; the hub itself no longer lets any gateway act for them (hub/broker.ts),
 *   so what a gateway that has not heard of the revocation yet sends for one is kept as a
 *   dead letter, never routed.
 * - Devices (DEVICE_REVOCATIONS: agents, gateways) are refused by the hub itself: their MQTT
 *   CONNECT gets CONNACK 5, a live session is closed, and their token no longer fetches
 *   artifacts. Their tokens stay derived from the fleet secret; the list is what sets one
 *   apart.
 *
 * Changes are serialised and written (atomically) before they are published or applied: the
 * API answers only once a revocation is on disk.
 */
export class RevocationStore {
  /** id → when it was revoked (ms) */
  private readonly ids = new Map<string, number>();
  private chain: Promise<void> = Promise.resolve();
  /** the list's revision: grows with every change (and starts from the clock at each start) */
  private rev = Date.now();

  private constructor(
    readonly file: string,
    private readonly kind: RevocationKind,
  ) {}

  /** Read the list; a missing file is an empty list, a damaged one stops the hub (FLEET_CONFIG_INVALID): it must not start with revoked ids let back in. */
  static load(file: string, kind: RevocationKind): RevocationStore {
    const s = new RevocationStore(file, kind);
    let text: string;
    try {
      text = readFileSync(file, 'utf8');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return s;
      throw new FleetError('FLEET_CONFIG_INVALID', `${file}: ${(err as Error).message}`, { cause: err });
    }
    try {
      const raw = JSON.parse(text) as { v?: unknown; revoked?: unknown };
      if (raw.v !== 1 || typeof raw.revoked !== 'object' || raw.revoked === null || Array.isArray(raw.revoked)) throw new Error('not a v1 revocation list');
      for (const [id, at] of Object.entries(raw.revoked)) s.ids.set(assertDeviceId(id), typeof at === 'number' ? at : 0);
      if (s.ids.size > kind.max) throw new Error(`${s.ids.size} ids, more than ${kind.max}`);
    } catch (err) {
      throw new FleetError('FLEET_CONFIG_INVALID', `${file}: ${(err as Error).message}; fix or remove it (a missing file revokes no ${kind.noun})`, { cause: err });
    }
    return s;
  }

  has(id: string): boolean {
    return this.ids.has(id);
  }

  get size(): number {
    return this.ids.size;
  }

  list(): Array<{ id: string; revokedAt: number }> {
    return [...this.ids].map(([id, revokedAt]) => ({ id, revokedAt })).sort((a, b) => a.id.localeCompare(b.id));
  }

  /** The retained message for the gateways (the MCU list). */
  message(): Buffer {
    // valid ids, at most kind.max (MCU_REVOCATIONS_MAX for MCUs): load() and set() let in no other
    const msg: McuRevocationList = { v: 1, rev: this.rev, ts: Date.now(), ids: [...this.ids.keys()].sort() };
    return encodeMessage(msg);
  }

  /**
   * Add (`revoked` true) or remove an id; resolves to whether the list changed, once the new
   * list is on disk. FLEET_DEVICE_ID_INVALID for a bad id; FLEET_FORBIDDEN beyond the
   * kind's `max` ids.
   */
  set(id: string, revoked: boolean): Promise<boolean> {
    assertDeviceId(id);
    const run = this.chain.then(async () => {
      if (revoked === this.ids.has(id)) return false;
      if (revoked && this.ids.size >= this.kind.max) throw new FleetError('FLEET_FORBIDDEN', `at most ${this.kind.max} ${this.kind.noun} can be revoked at the hub; ${this.kind.remedy}`);
      const next = new Map(this.ids);
      if (revoked) next.set(id, Date.now());
      else next.delete(id);
      await writeFileAtomic(this.file, JSON.stringify({ v: 1, revoked: Object.fromEntries(next) }), { mode: 0o600 });
      if (revoked) this.ids.set(id, next.get(id)!);
      else this.ids.delete(id);
      this.rev = Math.max(this.rev + 1, Date.now());
      return true;
    });
    this.chain = run.then(
      () => undefined,
      () => undefined,
    );
    return run;
  }
}
