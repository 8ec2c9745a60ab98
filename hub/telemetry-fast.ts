import { charTable, JsonScanner } from '../core/json-scan.ts';
import { decodeMessage, type Sample, type TelemetryBatch } from '../core/messages.ts';

/**
 * decodeMessage('telemetry', …) for the hub's per-reading path, without zod for the
 * common case. The hub decodes every telemetry message it routes (the registry keeps each
 * device's latest samples), and at thousands of MCU readings a second behind a gateway
 * zod's validation was a visible share of the hub's CPU. A plain check accepts only
 * messages that TelemetrySchema certainly accepts unchanged (no unknown keys, which zod
 * would strip; every field of the type and range the schema asks); anything else goes
 * through decodeMessage, which stays the authority for what is invalid and why.
 *
 * String lengths here are UTF-16 code units; zod (4.6) measures code points, which are never
 * more, so a string within the limit here is within it for zod too, and one over it here
 * (astral characters) goes to zod, which may still accept it. test/hub/telemetry-fast.test.ts
 * compares the two over 20,000 generated payloads.
 */
const MID_RE = /^[0-9]{1,20}$/;
const TOP_KEYS = new Set(['v', 'mid', 'ts', 'samples']);
const SAMPLE_KEYS = new Set(['n', 'v', 'vs', 'vb', 'u', 't']);

const isTs = (x: unknown): boolean => typeof x === 'number' && Number.isSafeInteger(x) && x >= 0;
const isObject = (x: unknown): x is Record<string, unknown> => typeof x === 'object' && x !== null && !Array.isArray(x) && Object.getPrototypeOf(x) === Object.prototype;

function plainValid(raw: unknown): raw is TelemetryBatch {
  if (!isObject(raw)) return false;
  for (const k in raw) if (!TOP_KEYS.has(k)) return false;
  if (raw.v !== 1 || typeof raw.mid !== 'string' || !MID_RE.test(raw.mid) || !isTs(raw.ts)) return false;
  const samples = raw.samples;
  if (!Array.isArray(samples) || samples.length > 10_000) return false;
  for (const s of samples) {
    if (!isObject(s)) return false;
    for (const k in s) if (!SAMPLE_KEYS.has(k)) return false;
    if (typeof s.n !== 'string' || s.n.length < 1 || s.n.length > 128 || !isTs(s.t)) return false;
    if (s.v !== undefined && !(typeof s.v === 'number' && Number.isFinite(s.v))) return false;
    if (s.vs !== undefined && !(typeof s.vs === 'string' && s.vs.length <= 1024)) return false;
    if (s.vb !== undefined && typeof s.vb !== 'boolean') return false;
    if (s.u !== undefined && !(typeof s.u === 'string' && s.u.length <= 16)) return false;
  }
  return true;
}

export function decodeTelemetryFast(payload: Buffer): TelemetryBatch {
  let raw: unknown;
  try {
    raw = JSON.parse(payload.toString('utf8'));
  } catch {
    return decodeMessage('telemetry', payload); // throws FLEET_MSG_INVALID with the reason
  }
  // what plainValid accepts is what zod returns, the same keys and values, as parsed: only
  // the order of an object's keys may differ (zod's follows its schema), which no reader of
  // a decoded message depends on; no copy of every sample
  return plainValid(raw) ? raw : decodeMessage('telemetry', payload);
}

/**
 * One telemetry message read by scanTelemetry: its samples as reused objects (the first
 * `count`; absent fields undefined), valid until the next scan into the same instance.
 */
export class ScannedTelemetry {
  mid = '';
  ts = 0;
  count = 0;
  readonly samples: Sample[] = [];

  /** the message as decodeTelemetryFast would return it (copies: for the rare reader that keeps it) */
  toBatch(): TelemetryBatch {
    const samples: Sample[] = [];
    for (let i = 0; i < this.count; i++) {
      const s = this.samples[i]!;
      const o: Sample = { n: s.n, t: s.t };
      if (s.v !== undefined) o.v = s.v;
      if (s.vs !== undefined) o.vs = s.vs;
      if (s.vb !== undefined) o.vb = s.vb;
      if (s.u !== undefined) o.u = s.u;
      samples.push(o);
    }
    return { v: 1, mid: this.mid, ts: this.ts, samples };
  }
}

const DIGITS = charTable(/[0-9]/);

/**
 * The hub's per-reading path without JSON.parse: reads a telemetry message in one pass into
 * `out`'s reused sample objects and returns true, when it is certain the message is valid
 * and what decodeTelemetryFast would return (the same fields and values) — plain ASCII
 * strings, the known keys each once, numbers in JSON's grammar; false for anything else
 * (escapes, non-ASCII, null, unknown keys, any value the schema refuses), and the
 * caller decodes with decodeTelemetryFast, which decides and says what is wrong. At 10,000
 * MCU readings a second JSON.parse and its objects were the hub's largest own cost (s14/s15
 * profiles: decodeTelemetryFast ~7% of its wall time). test/hub/telemetry-fast.test.ts
 * compares the three decoders over generated payloads.
 */
export function scanTelemetry(payload: Buffer, out: ScannedTelemetry): boolean {
  const p = new JsonScanner(JsonScanner.text(payload));
  out.count = 0;
  if (p.next() !== 0x7b) return false; // {
  let seen = 0;
  for (;;) {
    const k = p.key();
    if (k === null) return false;
    if (k === 'samples') {
      if (seen & 8 || !scanSamples(p, out)) return false;
      seen |= 8;
    } else if (k === 'v') {
      if (seen & 1 || p.number() !== 1) return false;
      seen |= 1;
    } else if (k === 'mid') {
      const mid = p.string(DIGITS);
      if (seen & 2 || mid === null || !p.inTable || mid.length < 1 || mid.length > 20) return false;
      out.mid = mid;
      seen |= 2;
    } else if (k === 'ts') {
      const ts = p.number();
      if (seen & 4 || !isTs(ts)) return false;
      out.ts = ts;
      seen |= 4;
    } else return false;
    const c = p.next();
    if (c === 0x7d) break; // }
    if (c !== 0x2c) return false; // ,
  }
  return seen === 15 && p.atEnd();
}

/** The samples array: `[` … `]`, each sample as plainValid checks it. */
function scanSamples(p: JsonScanner, out: ScannedTelemetry): boolean {
  if (p.next() !== 0x5b) return false; // [
  p.ws();
  if (p.byte() === 0x5d) {
    p.i++;
    return true; // no samples
  }
  for (;;) {
    if (out.count === 10_000 || p.next() !== 0x7b) return false; // {
    let s = out.samples[out.count];
    if (s === undefined) out.samples.push((s = { n: '', t: 0, v: undefined, vs: undefined, vb: undefined, u: undefined }));
    else s.v = s.vs = s.vb = s.u = undefined;
    let seen = 0;
    for (;;) {
      const k = p.key();
      if (k === null || k.length !== 1 && k.length !== 2) return false;
      let bit: number;
      if (k === 'n') {
        const n = p.string();
        if (n === null || n.length < 1 || n.length > 128) return false;
        s.n = n;
        bit = 1;
      } else if (k === 't') {
        const t = p.number();
        if (!isTs(t)) return false;
        s.t = t;
        bit = 2;
      } else if (k === 'v') {
        const v = p.number();
        if (!Number.isFinite(v)) return false;
        s.v = v;
        bit = 4;
      } else if (k === 'u') {
        const u = p.string();
        if (u === null || u.length > 16) return false;
        s.u = u;
        bit = 8;
      } else if (k === 'vs') {
        const vs = p.string();
        if (vs === null || vs.length > 1024) return false;
        s.vs = vs;
        bit = 16;
      } else if (k === 'vb') {
        const vb = p.boolean();
        if (vb === null) return false;
        s.vb = vb;
        bit = 32;
      } else return false;
      // a key given twice: its last value stands, as with JSON.parse
      seen |= bit;
      const c = p.next();
      if (c === 0x7d) break; // }
      if (c !== 0x2c) return false; // ,
    }
    if ((seen & 3) !== 3) return false; // n and t
    out.count++;
    const c = p.next();
    if (c === 0x5d) return true; // ]
    if (c !== 0x2c) return false; // ,
  }
}
