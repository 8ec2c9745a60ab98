/**
 * A small Prometheus text-format (0.0.4) registry: counters and gauges with labels,
 * plus gauges computed at scrape time. Hand-written rather than prom-client because
 * prom-client pulls an optional OpenTelemetry require that stays unbundled and warns
 * at every start of the single executable, and we need only counters and gauges.
 */
import { monitorEventLoopDelay } from 'node:perf_hooks';

type Labels = Record<string, string>;
type Kind = 'counter' | 'gauge';

interface Family {
  name: string;
  help: string;
  kind: Kind;
  values: Map<string, { labels: Labels; value: number }>;
  collect?: () => Array<{ labels?: Labels; value: number }> | number;
}

const NAME_RE = /^[a-zA-Z_:][a-zA-Z0-9_:]*$/;

/**
 * The series key of a label set: its pairs sorted by name, each name and value prefixed by
 * its length, so no value can pass for another pair (with `k=v` joined by commas, the values
 * a="1,b=2" and a="1", b="2" were one series). Sorted in place by insertion (label sets are
 * a few names) and built by concatenation: counters are incremented once per MCU message at
 * the gateway, and the sort-map-join this replaces was 7% of the gateway's allocations at
 * 10,000 messages a second (and 3x slower).
 */
function labelKey(labels: Labels): string {
  const keys = Object.keys(labels);
  for (let i = 1; i < keys.length; i++) {
    const k = keys[i]!;
    let j = i - 1;
    for (; j >= 0 && keys[j]! > k; j--) keys[j + 1] = keys[j]!;
    keys[j + 1] = k;
  }
  let out = '';
  for (const k of keys) {
    const v = labels[k]!;
    out += k.length + ':' + k + v.length + ':' + v;
  }
  return out;
}

function escapeLabel(v: string): string {
  return v.replace(/\\/g, '\\\\').replace(/\n/g, '\\n').replace(/"/g, '\\"');
}

function fmt(labels: Labels | undefined): string {
  if (!labels) return '';
  const keys = Object.keys(labels).sort();
  return keys.length ? `{${keys.map((k) => `${k}="${escapeLabel(labels[k]!)}"`).join(',')}}` : '';
}

function fmtNum(v: number): string {
  if (Number.isNaN(v)) return 'NaN';
  if (v === Infinity) return '+Inf';
  if (v === -Infinity) return '-Inf';
  return String(v);
}

export class Counter {
  constructor(private readonly fam: Family) {}
  inc(labels: Labels = {}, by = 1): void {
    const key = labelKey(labels);
    const cur = this.fam.values.get(key);
    if (cur) cur.value += by;
    else this.fam.values.set(key, { labels, value: by });
  }
  get(labels: Labels = {}): number {
    return this.fam.values.get(labelKey(labels))?.value ?? 0;
  }
}

export class Gauge {
  constructor(private readonly fam: Family) {}
  set(value: number, labels: Labels = {}): void {
    this.fam.values.set(labelKey(labels), { labels, value });
  }
}

export class MetricsRegistry {
  private readonly families = new Map<string, Family>();

  private family(name: string, help: string, kind: Kind, collect?: Family['collect']): Family {
    if (!NAME_RE.test(name)) throw new Error(`bad metric name ${name}`);
    if (this.families.has(name)) throw new Error(`metric ${name} registered twice`);
    const fam: Family = { name, help, kind, values: new Map(), ...(collect ? { collect } : {}) };
    this.families.set(name, fam);
    return fam;
  }

  counter(name: string, help: string): Counter {
    if (!name.endsWith('_total')) throw new Error(`counter ${name} must end in _total`);
    return new Counter(this.family(name, help, 'counter'));
  }

  gauge(name: string, help: string): Gauge {
    return new Gauge(this.family(name, help, 'gauge'));
  }

  /** A gauge whose value(s) are computed at scrape time. */
  gaugeFn(name: string, help: string, collect: NonNullable<Family['collect']>): void {
    this.family(name, help, 'gauge', collect);
  }

  /**
   * A gauge of the p99 event-loop delay since the previous scrape (the histogram is reset at
   * each scrape, so one scrape a second gives a per-second figure): every message the
   * process handles waits for this loop, so its stalls are its latency tail.
   */
  eventLoopDelayP99(name: string, help: string): void {
    const h = monitorEventLoopDelay({ resolution: 10 });
    h.enable();
    this.gaugeFn(name, help, () => {
      const v = h.percentile(99) / 1e9;
      h.reset();
      return Number.isFinite(v) ? v : 0;
    });
  }

  render(): string {
    const out: string[] = [];
    for (const fam of this.families.values()) {
      out.push(`# HELP ${fam.name} ${fam.help.replace(/\\/g, '\\\\').replace(/\n/g, '\\n')}`);
      out.push(`# TYPE ${fam.name} ${fam.kind}`);
      if (fam.collect) {
        const r = fam.collect();
        const rows = typeof r === 'number' ? [{ value: r }] : r;
        for (const row of rows) out.push(`${fam.name}${fmt(row.labels)} ${fmtNum(row.value)}`);
      } else {
        for (const { labels, value } of fam.values.values()) out.push(`${fam.name}${fmt(labels)} ${fmtNum(value)}`);
      }
    }
    return out.join('\n') + '\n';
  }
}

export const PROM_CONTENT_TYPE = 'text/plain; version=0.0.4; charset=utf-8';
