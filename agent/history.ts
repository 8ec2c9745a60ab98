/**
 * Metrics history for the technician's page: the last hour in memory, downsampled into
 * fixed buckets (default 10 s → 360 buckets), each keeping min/avg/max per series.
 * Memory is bounded by `spanMs / bucketMs` buckets whatever the sampling rate.
 * Time is passed in by the caller (the sample's own timestamp), so tests need no clock.
 */
export interface Stat {
  min: number;
  avg: number;
  max: number;
}

export interface HistoryPoint<K extends string> {
  /** start of the bucket, ms since the epoch */
  t: number;
  /** samples that fell into the bucket */
  n: number;
  /** null when no sample of the bucket had a value for this series (e.g. the first CPU reading) */
  values: Record<K, Stat | null>;
}

export interface HistoryOptions {
  /** bucket width, ms; default 10_000 */
  bucketMs?: number;
  /** how far back buckets are kept, ms; default 3_600_000 (one hour) */
  spanMs?: number;
}

interface Acc {
  min: number;
  max: number;
  sum: number;
  count: number;
}

interface Bucket<K extends string> {
  t: number;
  n: number;
  acc: Partial<Record<K, Acc>>;
}

export class MetricsHistory<K extends string> {
  readonly bucketMs: number;
  readonly spanMs: number;
  private readonly buckets: Array<Bucket<K>> = [];

  constructor(
    private readonly series: readonly K[],
    opts: HistoryOptions = {},
  ) {
    this.bucketMs = opts.bucketMs ?? 10_000;
    this.spanMs = opts.spanMs ?? 3_600_000;
    if (this.bucketMs <= 0 || this.spanMs < this.bucketMs) throw new RangeError('history: need 0 < bucketMs <= spanMs');
  }

  /** Most buckets ever held. */
  get capacity(): number {
    return Math.ceil(this.spanMs / this.bucketMs);
  }

  /** Add one sample taken at `t`; a null/undefined/NaN value leaves that series untouched. */
  add(t: number, values: Partial<Record<K, number | null>>): void {
    const start = t - (t % this.bucketMs);
    let b = this.buckets[this.buckets.length - 1];
    // a sample older than the newest bucket (clock stepped back): fold it into the newest
    // bucket rather than reorder history
    if (!b || start > b.t) {
      b = { t: start, n: 0, acc: {} };
      this.buckets.push(b);
    }
    b.n++;
    for (const k of this.series) {
      const v = values[k];
      if (v === null || v === undefined || !Number.isFinite(v)) continue;
      const a = b.acc[k];
      if (a) {
        a.min = Math.min(a.min, v);
        a.max = Math.max(a.max, v);
        a.sum += v;
        a.count++;
      } else b.acc[k] = { min: v, max: v, sum: v, count: 1 };
    }
    this.prune(t);
  }

  private prune(now: number): void {
    const oldest = now - this.spanMs;
    let drop = 0;
    while (drop < this.buckets.length && this.buckets[drop]!.t + this.bucketMs <= oldest) drop++;
    if (this.buckets.length - drop > this.capacity) drop = this.buckets.length - this.capacity;
    if (drop > 0) this.buckets.splice(0, drop);
  }

  /** Oldest first; the newest bucket may still be filling. */
  points(): Array<HistoryPoint<K>> {
    return this.buckets.map((b) => {
      const values = {} as Record<K, Stat | null>; // filled for every key just below
      for (const k of this.series) {
        const a = b.acc[k];
        values[k] = a ? { min: round(a.min), avg: round(a.sum / a.count), max: round(a.max) } : null;
      }
      return { t: b.t, n: b.n, values };
    });
  }
}

const round = (v: number) => Math.round(v * 10) / 10;
