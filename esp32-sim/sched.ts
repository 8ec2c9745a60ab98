/**
 * One scheduler for every simulated device: a binary min-heap of due times driven by a
 * single Node timer, instead of N setIntervals/setTimeouts. An entry is a few numbers
 * and a shared callback per kind, so 10,000 devices with a few pending events each cost
 * well under a megabyte. Cancelling is lazy: the caller keeps a generation number and
 * ignores stale firings (see `Scheduler.at`).
 *
 * The heap's keys (due time, insertion number) live in two Float64Arrays and its
 * callbacks and arguments in two parallel arrays, not in an object per entry: sifting
 * compares keys only, which sit in a few contiguous cache lines, where object entries
 * cost a cache miss per level at 10,000 entries (about 10,000 pops and pushes a second
 * at 1 reading/s per device). Order is the same: due time, then insertion order.
 */
/** `tag`: the number given to `at` (0 by default), e.g. a generation, so hot callers need no object per entry */
export type Task<T> = (arg: T, now: number, tag: number) => void;

export class Scheduler {
  /** heap slot i: due time at[i], insertion number seqs[i], callback fns[i](args[i], now, tags[i]) */
  private at_ = new Float64Array(1024);
  private seqs = new Float64Array(1024);
  private tags = new Float64Array(1024);
  private fns: Array<Task<never> | undefined> = [];
  private args: unknown[] = [];
  private n = 0;
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
    return this.n;
  }

  /** Run `fn(arg, now, tag)` at `at` (ms since the epoch, Date.now() clock), or as soon as possible. */
  at<T>(at: number, fn: Task<T>, arg: T, tag = 0): void {
    if (this.stopped) return;
    if (this.n === this.at_.length) this.grow();
    const A = this.at_;
    const S = this.seqs;
    const Tg = this.tags;
    const seq = this.seq++;
    let i = this.n++;
    while (i > 0) {
      const p = (i - 1) >> 1;
      const pa = A[p]!;
      if (pa < at || (pa === at && S[p]! < seq)) break;
      A[i] = pa;
      S[i] = S[p]!;
      Tg[i] = Tg[p]!;
      this.fns[i] = this.fns[p];
      this.args[i] = this.args[p];
      i = p;
    }
    A[i] = at;
    S[i] = seq;
    Tg[i] = tag;
    this.fns[i] = fn as Task<never>;
    this.args[i] = arg;
    if (!this.running && at < this.timerAt) this.arm();
  }

  after<T>(ms: number, fn: Task<T>, arg: T, tag = 0): void {
    this.at(Date.now() + ms, fn, arg, tag);
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
    this.n = 0;
    this.fns = [];
    this.args = [];
  }

  private arm(): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = undefined;
    this.timerAt = Infinity;
    if (this.n === 0 || this.stopped) return;
    this.timerAt = this.at_[0]!;
    this.timer = setTimeout(this.run, Math.max(0, this.timerAt - Date.now()));
  }

  private run = (): void => {
    this.timer = undefined;
    this.timerAt = Infinity;
    this.running = true;
    const now = Date.now();
    let n = 0;
    // lateness by the clock as entries run, read every 64 of them: a full turn runs for tens
    // of ms, and by the turn's start time its last entries were reported on time
    let clock = now;
    try {
      while (this.n > 0 && this.at_[0]! <= now && n < this.maxPerTurn && !this.stopped) {
        if (n > 0 && (n & 63) === 0) clock = Date.now();
        const late = clock - this.at_[0]!;
        const fn = this.fns[0] as Task<unknown>;
        const arg = this.args[0];
        const tag = this.tags[0]!;
        this.pop();
        n++;
        this.lateSum += late;
        this.lateCount++;
        if (late > this.lateMax) this.lateMax = late;
        fn(arg, now, tag);
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

  /** Remove the top entry (the caller read it first). */
  private pop(): void {
    const A = this.at_;
    const S = this.seqs;
    const Tg = this.tags;
    const F = this.fns;
    const G = this.args;
    const n = --this.n;
    if (n > 0) {
      // sift the last entry down from the root
      const la = A[n]!;
      const ls = S[n]!;
      const lt = Tg[n]!;
      const lf = F[n];
      const lg = G[n];
      let i = 0;
      for (;;) {
        const l = 2 * i + 1;
        if (l >= n) break;
        const r = l + 1;
        const c = r < n && (A[r]! < A[l]! || (A[r] === A[l] && S[r]! < S[l]!)) ? r : l;
        const ca = A[c]!;
        if (la < ca || (la === ca && ls < S[c]!)) break;
        A[i] = ca;
        S[i] = S[c]!;
        Tg[i] = Tg[c]!;
        F[i] = F[c];
        G[i] = G[c];
        i = c;
      }
      A[i] = la;
      S[i] = ls;
      Tg[i] = lt;
      F[i] = lf;
      G[i] = lg;
    }
    // drop the references the vacated slot held
    F[n] = undefined;
    G[n] = undefined;
  }

  private grow(): void {
    const a = new Float64Array(this.at_.length * 2);
    a.set(this.at_);
    this.at_ = a;
    const q = new Float64Array(this.seqs.length * 2);
    q.set(this.seqs);
    this.seqs = q;
    const g = new Float64Array(this.tags.length * 2);
    g.set(this.tags);
    this.tags = g;
  }
}
