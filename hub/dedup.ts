import type { Level } from 'level';
import type { Logger } from '../core/log.ts';

/**
 * De-duplication of at-least-once delivery at the broker (docs/topics.md#de-duplication).
 *
 * Devices send through a durable outbox with QoS 1 and resend whatever was in flight after
 * a reconnect, so the hub sees some messages twice. Every outbox message carries `mid`, a
 * decimal id monotonic per sender (a gateway numbers all its MCUs' messages from one
 * sequence, so mids are unique per device too). The hub remembers the last `window` mids
 * of each device and drops a repeat before it is routed, so no subscriber sees it.
 *
 * Confirmed mids are appended to a journal in LevelDB every `flushMs` while something
 * changed; the windows themselves are rewritten from memory every `compactMs` and on close,
 * which deletes the journal. At start the windows are read back and the journal replayed:
 * a device that resends after a graceful hub restart, or a crash, is still
 * recognised. After a crash (kill -9) the mids admitted since the last flush are
 * forgotten and their resends get through once more (duplicates, never loss).
 *
 * A mid is persisted only once the message it belongs to has been routed (see
 * `admitPending`), so a crash between admission and routing can never make the hub
 * drop the resend of a message that nobody received.
 *
 * Memory is bounded by `maxEntries` mids in all. What a sender may resend are the mids it
 * had in flight when its connection dropped: its NEWEST ones. So when the budget is
 * reached the hub trims the OLDEST mids of the least recently active devices (their
 * windows shrink, down to a floor) rather than forgetting devices whole, and an active
 * device's window grows back while the budget allows. Only when every device is down to
 * the floor are whole devices forgotten (and `maxDevices` forgets whole devices). A
 * "high-water mark" per device (drop every mid <= the largest seen) would need no memory
 * but is wrong here: mids do not arrive sorted (alerts overtake telemetry in the outbox),
 * and it would drop messages never admitted before. Trimming only ever forgets: the worst
 * it does is let a resend through (a duplicate), never drop a new message.
 */

/**
 * A mid as a Set key: canonical decimals below 2^53 as numbers, anything else as the
 * string itself, so "7" and "007" stay as distinct as the strings are. Heap per remembered
 * mid in full windows of 4096 on Node 20 (Set, ring slot and key): 49 bytes below 2^31
 * (small integers), 81 up to 2^53 (boxed doubles: an outbox mid has 16 digits), 89 for a
 * 19-digit string (a gateway's item mid).
 */
type MidKey = number | string;
const CANONICAL_SAFE = /^(?:0|[1-9][0-9]{0,14})$/;
const midKey = (mid: string): MidKey => (CANONICAL_SAFE.test(mid) ? Number(mid) : mid);
const MID_RE = /^[0-9]{1,20}$/;

/** DedupWindow.admit: admitted, not remembered (older than all a full window holds) */
export const NOT_KEPT = -2;

/** `a` is an older mid than `b`: numerically smaller (decimals compare by length, then digits). */
function olderMid(a: MidKey, b: MidKey): boolean {
  if (typeof a === 'number' && typeof b === 'number') return a < b;
  const x = String(a);
  const y = String(b);
  return x.length !== y.length ? x.length < y.length : x < y;
}

/** The PendingMid of a mid that was admitted but not remembered: nothing to confirm or forget. */
const UNKEPT: PendingMid = { confirm: () => undefined, forget: () => undefined };

/**
 * The newest `cap` mids admitted for one device, oldest forgotten first (arrival order, not
 * numeric order: the outbox sends alerts before telemetry, so mids do not arrive sorted).
 * Every admission gets a sequence number `seq`; its slot in the ring is `seq % size`.
 * `cap` (≤ size) is the number of newest seqs held: it is lowered when the hub trims the
 * window to stay within its budget, and raised again when the window grows back. A window
 * whose cap fell to half its ring or less is rebuilt smaller (`resized`), so the ring never
 * has more than twice as many slots as the window may hold mids.
 */
export class DedupWindow {
  private readonly seen = new Set<MidKey>();
  /** slot → mid; undefined for a slot whose mid was forgotten */
  private ring: Array<MidKey | undefined> = [];
  private next = 0;
  private held: number;

  constructor(readonly size: number) {
    if (!Number.isInteger(size) || size < 1) throw new RangeError(`window size must be a positive integer, got ${size}`);
    this.held = size;
  }

  /** mids remembered now */
  get count(): number {
    return this.seen.size;
  }

  /** seq the next admission gets (= admissions so far) */
  get nextSeq(): number {
    return this.next;
  }

  /** how many of the newest seqs are held (≤ size) */
  get cap(): number {
    return this.held;
  }

  has(mid: string): boolean {
    return this.seen.has(midKey(mid));
  }

  /**
   * Records `mid`; returns its seq, -1 when `mid` is in the window (a duplicate), or NOT_KEPT
   * when the window is full and `mid` is older (numerically smaller) than the mid it would
   * push out: it passes (it is not in the window) but is not remembered. A newer mid is never
   * pushed out to keep an older one. A sender that resends more than its window holds resends
   * in its original order: else each forgotten mid, admitted again, pushed out a newer one
   * still waiting to be resent, and the whole resend passed as new; so only what was
   * forgotten passes. (Costs a new mid that arrives out of order into a full window: not
   * remembered, its own resend would pass.)
   */
  admit(mid: string): number {
    const k = midKey(mid);
    if (this.seen.has(k)) return -1;
    // full: admitting pushes out the oldest held seq, next - held
    const full = this.next >= this.held;
    const oldest = (this.next - this.held) % this.size;
    if (full) {
      const victim = this.ring[oldest];
      if (victim !== undefined && olderMid(k, victim)) return NOT_KEPT;
    }
    if (this.next < this.size) this.ring.push(k);
    else {
      const slot = this.next % this.size;
      const old = this.ring[slot];
      if (old !== undefined) this.seen.delete(old);
      this.ring[slot] = k;
    }
    // a trimmed window: the seq that falls out of the cap is forgotten
    if (full && this.held < this.size) this.clear(oldest);
    this.seen.add(k);
    return this.next++;
  }

  /** Forgets the mid admitted as `seq` (its message was not routed, so a resend must pass). */
  forget(seq: number): void {
    if (this.holds(seq)) this.clear(seq % this.size);
  }

  private clear(slot: number): void {
    const k = this.ring[slot];
    if (k === undefined) return;
    this.seen.delete(k);
    this.ring[slot] = undefined;
  }

  /** true while `seq` has not been pushed out of the window by newer admissions (or trimmed) */
  holds(seq: number): boolean {
    return seq >= 0 && seq < this.next && seq >= this.next - this.held;
  }

  /** Forget all but the newest `cap` seqs, in place: O(mids forgotten). */
  trim(cap: number): void {
    if (!Number.isInteger(cap) || cap < 1) throw new RangeError(`window cap must be a positive integer, got ${cap}`);
    if (cap >= this.held) return;
    for (let seq = Math.max(0, this.next - this.held); seq < this.next - cap; seq++) this.clear(seq % this.size);
    this.held = cap;
  }

  /** Hold up to `cap` (≤ size) newest seqs from now on; the ones trimmed before stay forgotten. */
  grow(cap: number): void {
    if (!Number.isInteger(cap) || cap > this.size) throw new RangeError(`window cap must be an integer up to ${this.size}, got ${cap}`);
    if (cap > this.held) this.held = cap;
  }

  /** Slots in use (≤ size). */
  get slots(): number {
    return this.ring.length;
  }

  /** The mid in `slot` as a decimal string, or '' when the slot is empty. */
  midAt(slot: number): string {
    const k = this.ring[slot];
    return k === undefined ? '' : String(k);
  }

  /** The seq of the admission that `slot` holds now, or -1 when none has. */
  seqAt(slot: number): number {
    if (slot >= this.next) return -1;
    return slot + this.size * Math.floor((this.next - 1 - slot) / this.size);
  }

  /** Mids in arrival order, oldest first (empty slots skipped). */
  *inOrder(): Generator<string> {
    for (let seq = Math.max(0, this.next - this.held); seq < this.next; seq++) {
      const m = this.midAt(seq % this.size);
      if (m !== '') yield m;
    }
  }

  /**
   * A window of another `size` (its cap too) holding this one's newest mids, under the same
   * seqs: a pending seq stays valid (or is no longer held, when it was trimmed). A fresh Set
   * and ring, so the memory of forgotten mids is freed, not just their Set entries.
   * O(min(size, cap)).
   */
  resized(size: number): DedupWindow {
    const w = new DedupWindow(size);
    // allocated at its length: grown by push it would keep up to half as many slots unused
    w.ring = new Array<MidKey | undefined>(Math.min(this.next, size)).fill(undefined);
    for (let seq = Math.max(0, this.next - Math.min(size, this.held)); seq < this.next; seq++) {
      const k = this.ring[seq % this.size];
      if (k === undefined) continue;
      w.ring[seq % size] = k;
      w.seen.add(k);
    }
    w.next = this.next;
    return w;
  }

  /**
   * Rebuild a window from its persisted ring: `slots[i]` is the mid in slot i or '' for an
   * empty one, `next` the seq the next admission gets. The cap is recovered from the ring:
   * it spans the seqs from the oldest one holding a mid (the persisted layout has no cap of
   * its own, so a trimmed window stays trimmed across a restart and older hubs read it).
   */
  static restore(size: number, next: number, slots: readonly string[]): DedupWindow {
    const w = new DedupWindow(size);
    const used = Math.min(next, size);
    for (let i = 0; i < used; i++) {
      const m = slots[i] ?? '';
      const k = m === '' || w.seen.has(midKey(m)) ? undefined : midKey(m);
      w.ring.push(k);
      if (k !== undefined) w.seen.add(k);
    }
    w.next = next;
    if (next > size) {
      let seq = next - size;
      while (seq < next && w.ring[seq % size] === undefined) seq++;
      if (seq < next) w.held = next - seq;
    }
    return w;
  }
}

/** Handle for a mid admitted before its message is routed. */
export interface PendingMid {
  /** the message was routed: the mid may now be persisted */
  confirm(): void;
  /** the message was not routed: forget the mid so the sender's resend is accepted */
  forget(): void;
}

/** A PendingMid as a small object (no closures: one is made per message routed). */
class Pending implements PendingMid {
  private settled = false;
  constructor(
    private readonly dedup: Deduplicator,
    private readonly st: DeviceState,
    private readonly seq: number,
    private readonly mid: string,
  ) {}
  confirm(): void {
    if (this.settled) return;
    this.settled = true;
    this.dedup.confirmPending(this.st, this.seq, this.mid);
  }
  forget(): void {
    if (this.settled) return;
    this.settled = true;
    this.dedup.forgetPending(this.st, this.seq, this.mid);
  }
}

export interface DedupOptions {
  /** mids remembered per device at most (config `dedupWindow`) */
  window: number;
  /**
   * Trimming stops at this many mids per device while the budget allows it (config
   * `dedupMinWindow`). Default 256, at most `window`. When even this does not fit
   * (devices × minWindow > maxEntries), windows go down to the fair share
   * maxEntries / devices, but not below 16 (or `minWindow` if smaller): only then are whole
   * devices forgotten. The floor is rounded down to a power of two (see pow2Floor).
   */
  minWindow?: number;
  /** devices remembered at most; the least recently active is forgotten (whole) first. Default 100,000. */
  maxDevices?: number;
  /**
   * mids remembered across all devices, the real memory bound (config `dedupMaxMids`; see
   * docs/topics.md#de-duplication for the measured bytes per mid); when it is reached the
   * oldest mids of the least recently active devices are trimmed. Default 8,000,000.
   */
  maxEntries?: number;
  /** called with the number of mids each trim forgot (for a counter; `stats().trimmed` has the total) */
  onTrimmed?: (mids: number) => void;
  /** called with the number of devices forgotten whole, by either bound (`stats().forgotten` has the total) */
  onForgotten?: (devices: number) => void;
  /** how long a change may wait before it is written (to the journal), ms. Default 500. */
  flushMs?: number;
  /** how often the windows themselves are rewritten from memory and the journal cleared, ms. Default 30,000. */
  compactMs?: number;
  /** ... or after this many journal lines, whichever comes first. Default 500,000. */
  compactLines?: number;
  log: Logger;
  now?: () => number;
}

interface DeviceState {
  readonly id: string;
  /** replaced by a resized copy when trimmed or grown */
  win: DedupWindow;
  /** chunk keys `{id}/c{n}` that may exist on disk: n < this (stale ones are deleted at the next compaction) */
  chunksOnDisk: number;
  lastUsed: number;
  /** when it was last moved to the most recently active end of the LRU order, ms */
  movedAt: number;
  /** ring chunks to write at the next flush */
  readonly dirtyChunks: Set<number>;
  /** seqs admitted whose messages are not routed yet: written as empty slots until confirmed */
  readonly pending: Set<number>;
  /** the same, by mid (for `settling`); made on demand */
  pendingByMid?: Map<MidKey, number>;
  /** pending seq → duplicates waiting to learn how its routing ended (rare: made on demand) */
  waiters?: Map<number, Array<(routed: boolean) => void>>;
}

/**
 * Persisted layout, one LevelDB of its own (utf8 keys and values):
 *
 *   {deviceId}/h      "{nextSeq}:{windowSize}:{lastUsedMs}"
 *   {deviceId}/c{n}   mids of ring slots n*64 … n*64+63, comma-separated, '' for an empty slot
 *
 *   !j/{n}            journal: "{flushMs}\n{deviceId} {mid}\n…" (see JOURNAL_PREFIX)
 *
 * Device ids never contain '/', so the keys of device X are exactly the range
 * [`X/`, `X0`) ('0' follows '/' in ASCII) and can be cleared at once. A change writes only
 * the chunks it touched (one 64-slot chunk per flush for a device sending slowly), not the
 * whole window.
 */
const CHUNK = 64;
/** a device moves to the recent end of the LRU order at most this often, ms */
const LRU_MOVE_MS = 1000;
/**
 * Journal keys: `!j/{n, 12 digits}` → "{flush time ms}\n{deviceId} {mid}\n…", the mids
 * confirmed since the previous flush in confirmation order. '!' sorts before every device id
 * (ids start with a letter or digit), so the journal is read first and never mistaken for a
 * window.
 */
const JOURNAL_PREFIX = '!j/';
const JOURNAL_DIGITS = 12;
/** windows are never trimmed below this (or below `minWindow` when that is smaller) before whole devices are forgotten */
const HARD_FLOOR = 16;
/**
 * The largest power of two ≤ n (n ≥ 1). Trimmed windows hold a power of two of mids: a Set
 * that rotates `n` keys settles at a capacity of the smallest power of two ≥ 2n (V8's
 * OrderedHashSet), so a window of 4096 costs 40 bytes of Set per mid and one of 4097 or
 * 2100 costs twice that (measured: 87 bytes per mid with windows trimmed to odd sizes
 * against 49 with powers of two).
 */
const pow2Floor = (n: number): number => 2 ** Math.floor(Math.log2(n));
/** a trim frees 1/SLACK of the bound (see Deduplicator.target) */
const SLACK = 256;
/** at most one warning about trimming (and one about forgetting devices) per this, ms */
const WARN_EVERY_MS = 60_000;

export class Deduplicator {
  /** insertion order = least recently active first */
  private readonly devices = new Map<string, DeviceState>();
  private readonly dirty = new Set<DeviceState>();
  /** devices forgotten since the last flush: their keys are cleared before anything is written */
  private readonly evicted = new Set<string>();
  private entries = 0;
  private timer: NodeJS.Timeout | undefined;
  private flushing: Promise<void> = Promise.resolve();
  private closed = false;
  /** confirmed mids not yet written, as journal lines "{deviceId} {mid}" */
  private journal: string[] = [];
  /** the number the next journal key gets */
  private journalNext = 0;
  /** journal keys written since the last compaction (deleted by the next one) */
  private journalKeys: string[] = [];
  private linesSinceCompact = 0;
  private lastCompact = 0;
  /** the next flush compacts (set at close and after load replayed a journal) */
  private compactNext = false;
  /** a compaction due for a journal written while nothing else changes */
  private compactTimer: NodeJS.Timeout | undefined;
  private readonly compactMs: number;
  private readonly compactLines: number;
  private readonly maxDevices: number;
  private readonly maxEntries: number;
  /**
   * a trim brings the mids down to this, maxEntries less 1/256 of it, so the next trim is that
   * many admissions away (the cost of trimming is amortised, not paid per admission). A trim
   * pauses the hub for about 0.5 µs per mid it forgets: 1/256 of 8,000,000 is about 15 ms
   * (1/64 measured 65 ms)
   */
  private readonly target: number;
  private readonly window: number;
  private readonly minWindow: number;
  private readonly flushMs: number;
  private readonly now: () => number;
  /** mids trimmed from windows, devices forgotten whole, since start */
  private trimmed = 0;
  private forgotten = 0;
  private lastTrimWarn = -Infinity;
  private lastForgetWarn = -Infinity;

  private constructor(
    private readonly db: Level<string, string>,
    private readonly opts: DedupOptions,
  ) {
    this.maxDevices = opts.maxDevices ?? 100_000;
    this.maxEntries = opts.maxEntries ?? 8_000_000;
    for (const [k, v] of [['maxDevices', this.maxDevices], ['maxEntries', this.maxEntries], ['minWindow', opts.minWindow ?? 1]] as const) {
      if (!Number.isInteger(v) || v < 1) throw new RangeError(`dedup ${k} must be a positive integer, got ${v}`);
    }
    this.target = this.maxEntries - Math.floor(this.maxEntries / SLACK);
    this.window = opts.window;
    this.minWindow = Math.min(opts.window, opts.minWindow ?? 256);
    this.flushMs = opts.flushMs ?? 500;
    this.compactMs = opts.compactMs ?? 30_000;
    this.compactLines = opts.compactLines ?? 500_000;
    this.now = opts.now ?? Date.now;
    this.lastCompact = this.now();
  }

  /** Open over `db` (owned from now on: `close` closes it) and load what it holds. */
  static async open(db: Level<string, string>, opts: DedupOptions): Promise<Deduplicator> {
    const d = new Deduplicator(db, opts);
    await d.load();
    return d;
  }

  /**
   * devices and mids remembered now; mids trimmed from windows (the oldest of least recently
   * active devices, to stay within maxEntries) and devices forgotten whole, since start
   */
  stats(): { devices: number; mids: number; trimmed: number; forgotten: number } {
    return { devices: this.devices.size, mids: this.entries, trimmed: this.trimmed, forgotten: this.forgotten };
  }

  /** true when `mid` is remembered for `deviceId` (no side effect) */
  seen(deviceId: string, mid: string): boolean {
    return this.devices.get(deviceId)?.win.has(mid) ?? false;
  }

  /** Admit a message its caller has routed already (nothing left to confirm): false when it is a duplicate. */
  admit(deviceId: string, mid: string): boolean {
    const st = this.state(deviceId);
    const seq = this.record(st, mid);
    if (seq === NOT_KEPT) return true;
    if (seq < 0) return false;
    this.markDirty(st, seq);
    this.journal.push(`${deviceId} ${mid}`);
    return true;
  }

  /**
   * Admit a message about to be routed: null when it is a duplicate. The mid counts as seen
   * at once (so a repeat inside the same batch, or one arriving while the first copy is
   * still being routed, is a duplicate), but it is persisted only after `confirm`.
   */
  admitPending(deviceId: string, mid: string): PendingMid | null {
    const st = this.state(deviceId);
    const seq = this.record(st, mid);
    if (seq === NOT_KEPT) return UNKEPT;
    if (seq < 0) return null;
    st.pending.add(seq);
    (st.pendingByMid ??= new Map()).set(midKey(mid), seq);
    this.markDirty(st, -1); // the head (next seq) changed
    return new Pending(this, st, seq, mid);
  }

  /**
   * For a duplicate whose first copy is still being routed (admitted, neither confirmed nor
   * forgotten): a promise of how that ends, true when it was routed. Null when `mid` is not
   * pending (its message was routed long ago, or it is not remembered at all). The hub holds
   * the duplicate's PUBACK on it: acknowledged at once, a resend that arrived during the first
   * copy's routing would be lost if that routing then failed (the first copy's mid is
   * forgotten, but the sender, acknowledged, never sends again). One lookup.
   */
  settling(deviceId: string, mid: string): Promise<boolean> | null {
    const st = this.devices.get(deviceId);
    if (st === undefined || st.pending.size === 0) return null;
    const seq = st.pendingByMid?.get(midKey(mid));
    if (seq === undefined || !st.win.holds(seq)) return null;
    const waiters = (st.waiters ??= new Map());
    return new Promise((resolve) => {
      const list = waiters.get(seq);
      if (list === undefined) waiters.set(seq, [resolve]);
      else list.push(resolve);
    });
  }

  /** Tell the duplicates waiting on `seq` how its routing ended. */
  private settle(st: DeviceState, seq: number, routed: boolean): void {
    const list = st.waiters?.get(seq);
    if (list === undefined) return;
    st.waiters!.delete(seq);
    if (st.waiters!.size === 0) st.waiters = undefined;
    for (const resolve of list) resolve(routed);
  }

  /** `seq` (admitted for `mid`) is pending no more (an entry of another seq for the same mid is
   * left alone, though a mid pushed out of its window comes back as not kept, never pending) */
  private unpend(st: DeviceState, seq: number, mid: string): void {
    const byMid = st.pendingByMid;
    if (byMid === undefined) return;
    const k = midKey(mid);
    if (byMid.get(k) === seq) byMid.delete(k);
    if (byMid.size === 0) st.pendingByMid = undefined;
  }

  /** Pending.confirm */
  confirmPending(st: DeviceState, seq: number, mid: string): void {
    st.pending.delete(seq);
    this.unpend(st, seq, mid);
    this.settle(st, seq, true);
    if (this.devices.get(st.id) === st && st.win.holds(seq)) {
      this.markDirty(st, seq);
      this.journal.push(`${st.id} ${mid}`);
    }
  }

  /** Pending.forget */
  forgetPending(st: DeviceState, seq: number, mid: string): void {
    st.pending.delete(seq);
    this.unpend(st, seq, mid);
    this.settle(st, seq, false);
    const before = st.win.count;
    st.win.forget(seq);
    if (this.devices.get(st.id) === st) this.entries += st.win.count - before;
  }


  private state(deviceId: string): DeviceState {
    let st = this.devices.get(deviceId);
    if (st) {
      // move to the most recently active end, at most once per LRU_MOVE_MS: a Map delete and
      // set per admission was 2% of a hub CPU profile at 10,000 MCU readings a second. So
      // eviction takes the least recently active device to within that time.
      const now = this.now();
      if (now - st.movedAt >= LRU_MOVE_MS) {
        this.devices.delete(deviceId);
        this.devices.set(deviceId, st);
        st.movedAt = now;
      }
      st.lastUsed = now;
      return st;
    }
    const now = this.now();
    st = { id: deviceId, win: new DedupWindow(this.window), chunksOnDisk: 0, lastUsed: now, movedAt: now, dirtyChunks: new Set(), pending: new Set() };
    this.devices.set(deviceId, st);
    if (this.devices.size > this.maxDevices) this.forgetDevices(st, Infinity);
    return st;
  }

  private record(st: DeviceState, mid: string): number {
    let w = st.win;
    // a trimmed window that is full grows back (doubling its cap, up to `window`) when the
    // budget has room for the growth: in place while its ring is large enough, else rebuilt,
    // O(cap) once per `cap` admissions at most. Not when the budget has no room: trimmed and
    // grown back at once, it would be rebuilt for nothing.
    if (w.cap < this.window && w.nextSeq >= w.cap && this.entries + w.cap <= this.target) {
      const cap = Math.min(this.window, w.cap * 2);
      if (cap <= w.size) w.grow(cap);
      else w = this.resize(st, cap);
    }
    const before = w.count;
    const seq = w.admit(mid);
    this.entries += w.count - before;
    if (seq >= 0 && this.entries > this.maxEntries) this.reclaim(st);
    return seq;
  }

  /** Replace the window of `st` by a resized copy; its chunks are rewritten in the new layout at the next compaction. */
  private resize(st: DeviceState, size: number): DedupWindow {
    const before = st.win.count;
    const w = (st.win = st.win.resized(size));
    this.entries += w.count - before;
    st.dirtyChunks.clear();
    for (let c = 0; c * CHUNK < w.slots; c++) st.dirtyChunks.add(c);
    this.dirty.add(st);
    this.schedule();
    return w;
  }

  /**
   * Trim the window of `st` to its newest `cap` seqs: in place (O(mids forgotten)) while
   * its ring stays less than twice the cap, else rebuilt smaller, which frees the ring too
   * (O(cap), and at least as many mids were forgotten since its ring last had that size).
   */
  private trim(st: DeviceState, cap: number): void {
    const w = st.win;
    const before = w.count;
    if (cap * 2 <= w.slots) this.resize(st, cap);
    else {
      const from = Math.max(0, w.nextSeq - w.cap);
      const to = w.nextSeq - cap;
      w.trim(cap);
      this.entries += w.count - before;
      // the chunks of the slots just emptied
      for (let seq = from; seq < to; seq++) st.dirtyChunks.add(Math.floor((seq % w.size) / CHUNK));
      this.dirty.add(st);
      this.schedule();
    }
    this.trimmed += before - st.win.count;
  }

  /**
   * Bring the mids remembered down to `target`, taking the OLDEST mids of the least recently
   * active devices first (what a device may resend are its newest ones): in that order,
   * each window above the floor is halved, but not below the floor (and again, pass after
   * pass, while that is not enough). Only when every device
   * is down to the floor are whole devices forgotten (never `keep`). The floor is
   * `minWindow` while devices × minWindow fits the budget, else the fair share (not below
   * HARD_FLOOR). It runs once per `maxEntries / 256` mids admitted at most, and its work is
   * O(devices visited + mids trimmed), so its cost is amortised.
   */
  private reclaim(keep: DeviceState): void {
    const floor = pow2Floor(Math.max(Math.min(HARD_FLOOR, this.minWindow), Math.min(this.minWindow, Math.floor(this.target / this.devices.size))));
    const trimmedBefore = this.trimmed;
    let smallest = Infinity;
    // pass after pass (each halves a window at most once, so at most log2(window / floor) passes)
    for (let trimming = true; trimming && this.entries > this.target; ) {
      trimming = false;
      for (const st of this.devices.values()) {
        if (this.entries <= this.target) break;
        const c = st.win.count;
        if (c <= floor) continue;
        const cap = Math.max(floor, pow2Floor(c >> 1));
        this.trim(st, cap);
        smallest = Math.min(smallest, cap);
        trimming = true;
      }
    }
    if (this.trimmed > trimmedBefore) this.opts.onTrimmed?.(this.trimmed - trimmedBefore);
    const now = this.now();
    if (this.trimmed > trimmedBefore && now - this.lastTrimWarn >= WARN_EVERY_MS) {
      this.lastTrimWarn = now;
      this.opts.log.warn('dedup: mid budget reached, trimming the oldest mids of the least recently active devices', {
        maxMids: this.maxEntries,
        devices: this.devices.size,
        windowDownTo: smallest,
        floor,
        midsTrimmed: this.trimmed,
        devicesForgotten: this.forgotten,
      });
    }
    if (this.entries > this.target) this.forgetDevices(keep, this.target);
  }

  /** Forget least recently active devices whole (memory and disk, never `keep`) until maxDevices holds and at most `maxMids` are remembered. */
  private forgetDevices(keep: DeviceState, maxMids: number): void {
    const before = this.forgotten;
    for (const st of this.devices.values()) {
      if (this.devices.size <= this.maxDevices && this.entries <= maxMids) break;
      if (st === keep) continue;
      this.devices.delete(st.id);
      this.dirty.delete(st);
      this.entries -= st.win.count;
      this.evicted.add(st.id);
      this.forgotten++;
    }
    if (this.forgotten === before) return;
    this.opts.onForgotten?.(this.forgotten - before);
    this.schedule();
    const now = this.now();
    if (now - this.lastForgetWarn >= WARN_EVERY_MS) {
      this.lastForgetWarn = now;
      this.opts.log.warn('dedup: forgetting whole devices (least recently active first): their resends will pass as new', {
        maxDevices: this.maxDevices,
        maxMids: this.maxEntries,
        devices: this.devices.size,
        devicesForgotten: this.forgotten,
      });
    }
  }

  /** Clear the keys of `id` at the next flush; a device still remembered is then written whole. */
  private scheduleClear(id: string): void {
    this.evicted.add(id);
    const st = this.devices.get(id);
    if (st) {
      for (let c = 0; c * CHUNK < st.win.slots; c++) st.dirtyChunks.add(c);
      this.dirty.add(st);
    }
    this.schedule();
  }

  private markDirty(st: DeviceState, seq: number): void {
    if (seq >= 0) st.dirtyChunks.add(Math.floor((seq % st.win.size) / CHUNK));
    this.dirty.add(st);
    this.schedule();
  }

  private schedule(): void {
    if (this.closed || this.timer) return;
    this.timer = setTimeout(() => {
      this.timer = undefined;
      this.flush().catch((err: unknown) => this.opts.log.error('dedup flush failed', { err }));
    }, this.flushMs);
    this.timer.unref();
  }

  /** Write every change made so far. Flushes run one at a time, in call order. */
  flush(): Promise<void> {
    const run = this.flushing.then(() => this.writeChanges());
    // a failed flush must not block the next one; the caller of this one sees the error
    this.flushing = run.catch(() => undefined);
    return run;
  }

  /**
   * Every flush appends the mids confirmed since the last one to the journal: one put, however
   * many devices sent. Every `compactMs` (or `compactLines`), at close, and when a device was
   * forgotten, the changed windows are written whole instead and the journal is deleted, in
   * one atomic batch. Rewriting each changed window's chunk at every flush instead cost the hub
   * a put of ~1 KB per device per flush: 20,000 puts/s and a sixth of its CPU with 10,000 MCUs
   * sending once a second (scripts/bench/gateway-scale.mjs).
   */
  private async writeChanges(): Promise<void> {
    const now = this.now();
    const compact = this.compactNext || this.evicted.size > 0 || now - this.lastCompact >= this.compactMs || this.linesSinceCompact + this.journal.length >= this.compactLines;
    if (!compact) return this.appendJournal(now);
    this.compactNext = false;
    clearTimeout(this.compactTimer);
    this.compactTimer = undefined;
    const cleared = [...this.evicted];
    this.evicted.clear();
    try {
      for (const id of cleared) await this.db.clear({ gte: `${id}/`, lt: `${id}0` });
    } catch (err) {
      for (const id of cleared) this.scheduleClear(id);
      throw err;
    }
    // snapshot synchronously: admissions during the write below go to the next flush
    const ops: Array<{ type: 'put'; key: string; value: string } | { type: 'del'; key: string }> = [];
    const written: Array<[DeviceState, number[], number]> = [];
    for (const st of this.dirty) {
      const w = st.win;
      written.push([st, [...st.dirtyChunks], st.chunksOnDisk]);
      const chunks = Math.ceil(w.slots / CHUNK);
      // a window trimmed or grown since its last write has a new layout: drop the chunks past its end
      for (let c = chunks; c < st.chunksOnDisk; c++) ops.push({ type: 'del', key: `${st.id}/c${c}` });
      st.chunksOnDisk = chunks;
      for (const c of st.dirtyChunks) {
        if (c >= chunks) continue;
        const parts: string[] = [];
        for (let slot = c * CHUNK; slot < Math.min((c + 1) * CHUNK, w.slots); slot++) {
          // an unconfirmed mid is written as an empty slot: see the class comment
          parts.push(st.pending.size > 0 && st.pending.has(w.seqAt(slot)) ? '' : w.midAt(slot));
        }
        ops.push({ type: 'put', key: `${st.id}/c${c}`, value: parts.join(',') });
      }
      st.dirtyChunks.clear();
      ops.push({ type: 'put', key: `${st.id}/h`, value: `${w.nextSeq}:${w.size}:${st.lastUsed}` });
    }
    this.dirty.clear();
    // the windows just snapshotted hold every confirmed mid, the journaled ones included
    const journalKeys = this.journalKeys;
    const journal = this.journal;
    this.journalKeys = [];
    this.journal = [];
    for (const key of journalKeys) ops.push({ type: 'del', key });
    this.lastCompact = now;
    const lines = this.linesSinceCompact;
    this.linesSinceCompact = 0;
    if (ops.length === 0) return;
    try {
      await this.db.batch(ops);
    } catch (err) {
      // keep the changes for the next flush
      for (const [st, chunks, onDisk] of written) {
        st.chunksOnDisk = Math.max(st.chunksOnDisk, onDisk);
        if (this.devices.get(st.id) !== st) continue;
        for (const c of chunks) st.dirtyChunks.add(c);
        this.dirty.add(st);
      }
      this.journalKeys = journalKeys.concat(this.journalKeys);
      this.journal = journal.concat(this.journal);
      this.linesSinceCompact += lines;
      this.compactNext = true;
      this.schedule();
      throw err;
    }
  }

  private async appendJournal(now: number): Promise<void> {
    if (this.journal.length === 0) return;
    const lines = this.journal;
    this.journal = [];
    const key = JOURNAL_PREFIX + String(this.journalNext++).padStart(JOURNAL_DIGITS, '0');
    try {
      await this.db.put(key, `${now}\n${lines.join('\n')}`);
    } catch (err) {
      this.journal = lines.concat(this.journal);
      this.schedule();
      throw err;
    }
    this.journalKeys.push(key);
    this.linesSinceCompact += lines.length;
    // a journal does not wait for the next change to be compacted
    if (!this.compactTimer && !this.closed) {
      this.compactTimer = setTimeout(() => {
        this.compactTimer = undefined;
        this.compactNext = true;
        this.flush().catch((err: unknown) => this.opts.log.error('dedup flush failed', { err }));
      }, Math.max(0, this.lastCompact + this.compactMs - now));
      this.compactTimer.unref();
    }
  }

  /** Stop the timer, write what is left and close the db. */
  async close(): Promise<void> {
    if (this.closed) return;
    clearTimeout(this.timer);
    this.timer = undefined;
    clearTimeout(this.compactTimer);
    this.compactTimer = undefined;
    this.compactNext = true;
    try {
      await this.flush();
    } finally {
      this.closed = true;
      await this.db.close();
    }
  }

  /**
   * Admit the journaled mids again, in the order they were confirmed, on top of the windows
   * read from their chunks (a mid both in a window and in the journal is simply seen again).
   * The journal keys are deleted by the compaction this schedules.
   */
  private replayJournal(entries: ReadonlyArray<[string, string]>): void {
    let lines = 0;
    for (const [key, value] of entries) {
      const n = Number(key.slice(JOURNAL_PREFIX.length));
      if (Number.isSafeInteger(n)) this.journalNext = Math.max(this.journalNext, n + 1);
      this.journalKeys.push(key);
      const rows = value.split('\n');
      const at = Number(rows[0]);
      let bad = 0;
      for (let i = 1; i < rows.length; i++) {
        const sp = rows[i]!.indexOf(' ');
        const id = rows[i]!.slice(0, sp);
        const mid = rows[i]!.slice(sp + 1);
        if (sp < 1 || !MID_RE.test(mid) || id.includes('/')) {
          bad++;
          continue;
        }
        const st = this.state(id);
        if (Number.isFinite(at)) st.lastUsed = at;
        const seq = this.record(st, mid);
        if (seq >= 0) this.markDirty(st, seq);
        lines++;
      }
      if (bad > 0) this.opts.log.warn('dedup: ignoring damaged journal lines', { key, lines: bad });
    }
    if (entries.length > 0) {
      this.compactNext = true;
      this.opts.log.debug('dedup journal replayed', { keys: entries.length, lines });
    }
  }

  private async load(): Promise<void> {
    const found = new Map<string, { head?: string; chunks: Map<number, string> }>();
    const journal: Array<[string, string]> = [];
    for await (const [key, value] of this.db.iterator()) {
      if (key.startsWith(JOURNAL_PREFIX)) {
        journal.push([key, value]); // in key order: the order they were written
        continue;
      }
      const cut = key.lastIndexOf('/');
      const id = key.slice(0, cut);
      const part = key.slice(cut + 1);
      let f = found.get(id);
      if (!f) found.set(id, (f = { chunks: new Map() }));
      if (part === 'h') f.head = value;
      else if (/^c[0-9]{1,6}$/.test(part)) f.chunks.set(Number(part.slice(1)), value);
    }
    const loaded: DeviceState[] = [];
    for (const [id, f] of found) {
      const state = restoreState(id, f.head, f.chunks);
      if (!state) {
        this.opts.log.warn('dedup: ignoring a damaged window', { device: id });
        this.evicted.add(id);
        continue;
      }
      loaded.push(state);
    }
    // least recently active first, as if they had been admitted in that order
    loaded.sort((a, b) => a.lastUsed - b.lastUsed);
    for (const st of loaded) {
      this.devices.set(st.id, st);
      this.entries += st.win.count;
      // a window persisted larger than `window` now (the config changed) keeps its newest
      // mids; one persisted smaller (trimmed, or an older config) stays so and grows back
      if (st.win.size > this.window) {
        this.resize(st, this.window);
        this.compactNext = true;
      }
    }
    const newest = loaded.at(-1);
    if (newest) {
      if (this.devices.size > this.maxDevices) this.forgetDevices(newest, Infinity);
      if (this.entries > this.maxEntries) this.reclaim(newest);
    }
    this.replayJournal(journal);
    if (this.evicted.size > 0 || this.dirty.size > 0 || this.compactNext) await this.flush();
    this.opts.log.debug('dedup windows loaded', { devices: this.devices.size, mids: this.entries });

    function restoreState(id: string, head: string | undefined, chunks: Map<number, string>): DeviceState | null {
      const h = /^([0-9]{1,15}):([0-9]{1,7}):([0-9]{1,15})$/.exec(head ?? '');
      if (!h) return null;
      const next = Number(h[1]);
      const size = Number(h[2]);
      const lastUsed = Number(h[3]);
      if (size < 1) return null;
      const slots: string[] = [];
      const used = Math.min(next, size);
      for (let c = 0; c * CHUNK < used; c++) {
        const mids = (chunks.get(c) ?? '').split(',');
        for (let i = 0; i < CHUNK && c * CHUNK + i < used; i++) {
          const m = mids[i] ?? '';
          if (m !== '' && !MID_RE.test(m)) return null;
          slots.push(m);
        }
      }
      const win = DedupWindow.restore(size, next, slots);
      const chunksOnDisk = chunks.size === 0 ? 0 : Math.max(...chunks.keys()) + 1;
      return { id, win, chunksOnDisk, lastUsed, movedAt: lastUsed, dirtyChunks: new Set(), pending: new Set() };
    }
  }
}
