/**
 * One scheduler for every simulated device: a binary min-heap of due times driven by a
 * single Node timer, instead of N setIntervals/setTimeouts. An entry is a few numbers
 * and a shared callback per kind, so 10,000 devices with a few pending events each cost
 * well under a megabyte. Cancelling is lazy: the caller keeps a generation number and
 * ignores stale firings (see `Scheduler.at`).
 */
export type Task<T> = (arg: T, now: number) => void;

interface Entry {
  at: number;
  seq: number;
  fn: Task<never>;
  arg: unknown;
}

export class Scheduler {
  private heap: Entry[] = [];
  private seq = 0;
  private timer: NodeJS.Timeout | undefined;
  private timerAt = Infinity;
  private running = false;
  private stopped = false;
  /** most entries run in one turn before yielding to I/O, so a burst cannot starve sockets */
  private readonly maxPerTurn: number;
  /** how late entries ran, ms (sum and max since the last `lag()` call): the sim's own event-loop pressure */
  private lateSum = 0;
  private lateMax = 0;
  private lateCount = 0;

  constructor(opts: { maxPerTurn?: number } = {}) {
    this.maxPerTurn = opts.maxPerTurn ?? 2000;
  }

  get size(): number {
    return this.heap.length;
  }

  /** Run `fn(arg)` at `at` (ms since the epoch, Date.now() clock), or as soon as possible. */
  at<T>(at: number, fn: Task<T>, arg: T): void {
    if (this.stopped) return;
    const e: Entry = { at, seq: this.seq++, fn: fn as Task<never>, arg };
    const h = this.heap;
    h.push(e);
    let i = h.length - 1;
    while (i > 0) {
      const p = (i - 1) >> 1;
      if (!less(e, h[p]!)) break;
      h[i] = h[p]!;
      i = p;
    }
    h[i] = e;
    if (!this.running && at < this.timerAt) this.arm();
  }

  after<T>(ms: number, fn: Task<T>, arg: T): void {
    this.at(Date.now() + ms, fn, arg);
  }

  /** Entry lateness since the last call: mean and max ms. */
  lag(): { meanMs: number; maxMs: number; ran: number } {
    const r = { meanMs: this.lateCount ? this.lateSum / this.lateCount : 0, maxMs: this.lateMax, ran: this.lateCount };
    this.lateSum = this.lateMax = this.lateCount = 0;
    return r;
  }

  stop(): void {
    this.stopped = true;
    if (this.timer) clearTimeout(this.timer);
    this.timer = undefined;
    this.heap = [];
  }

  private arm(): void {
    const top = this.heap[0];
    if (this.timer) clearTimeout(this.timer);
    this.timer = undefined;
    this.timerAt = Infinity;
    if (!top || this.stopped) return;
    this.timerAt = top.at;
    this.timer = setTimeout(this.run, Math.max(0, top.at - Date.now()));
  }

  private run = (): void => {
    this.timer = undefined;
    this.timerAt = Infinity;
    this.running = true;
    const now = Date.now();
    let n = 0;
    try {
      while (this.heap.length > 0 && this.heap[0]!.at <= now && n < this.maxPerTurn && !this.stopped) {
        const e = this.pop();
        n++;
        const late = now - e.at;
        this.lateSum += late;
        this.lateCount++;
        if (late > this.lateMax) this.lateMax = late;
        (e.fn as Task<unknown>)(e.arg, now);
      }
    } finally {
      this.running = false;
    }
    if (this.stopped) return;
    if (n >= this.maxPerTurn) {
      // more are due: let sockets breathe first
      this.timerAt = now;
      this.timer = setTimeout(this.run, 0);
    } else this.arm();
  };

  private pop(): Entry {
    const h = this.heap;
    const top = h[0]!;
    const last = h.pop()!;
    if (h.length > 0) {
      let i = 0;
      const n = h.length;
      for (;;) {
        const l = 2 * i + 1;
        if (l >= n) break;
        const r = l + 1;
        const c = r < n && less(h[r]!, h[l]!) ? r : l;
        if (!less(h[c]!, last)) break;
        h[i] = h[c]!;
        i = c;
      }
      h[i] = last;
    }
    return top;
  }
}

function less(a: Entry, b: Entry): boolean {
  return a.at < b.at || (a.at === b.at && a.seq < b.seq);
}
