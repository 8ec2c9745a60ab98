import { charTable, JsonScanner } from '../core/json-scan.ts';
import type { SamplesJson } from '../core/messages.ts';
import { DEFAULT_SENML_LIMITS, SENML_MAX_TIME_MS, SENML_MAX_VS, SENML_RELATIVE_TIME_LIMIT, SENML_VERSION, type SenmlDecodeOptions } from './senml.ts';

/**
 * SenML JSON straight to the JSON of fleet samples, for the gateway's per-reading path.
 *
 * `decodeSenmlJson` + `JSON.stringify` of the samples cost the gateway about 11.7 µs per MCU
 * reading here (JSON.parse into objects, resolving them, and printing new objects; this path:
 * 4.8), ~15% of its CPU at 10,000 readings a second. This reads the bytes once and writes the samples'
 * JSON as it goes, with no object per record.
 *
 * It handles only what it is certain of: ASCII strings without escapes, the SenML fields
 * that `resolveSenmlPack` knows, each at most once per record, numbers in JSON's grammar,
 * booleans. For anything else — an escape, a non-ASCII byte, null, a nested value, an
 * unknown field, a duplicate field, a value `decodeSenmlJson` would refuse — it returns
 * null, and the caller decodes the payload with `decodeSenmlJson`, which stays the
 * authority on what is accepted and on the error message. So when it returns a result,
 * that is exactly `JSON.stringify(decodeSenmlJson(payload, opts))` (the samples' keys in the
 * order that resolveSenmlPack creates them: n, t, the value, u), and `count` is the number of
 * samples. test/firmware-bridge/senml-transcode.test.ts compares the two over generated and
 * mutated payloads.
 */
export function transcodeSenmlJson(payload: Uint8Array, opts: SenmlDecodeOptions = {}): SamplesJson | null {
  const maxBytes = opts.maxBytes ?? DEFAULT_SENML_LIMITS.maxBytes;
  const maxRecords = opts.maxRecords ?? DEFAULT_SENML_LIMITS.maxRecords;
  const maxNameLength = Math.min(opts.maxNameLength ?? DEFAULT_SENML_LIMITS.maxNameLength, 128);
  if (payload.byteLength > maxBytes) return null;
  const p = new SenmlScanner(JsonScanner.text(payload));
  const now = opts.now ?? Date.now();
  if (p.next() !== 0x5b) return null; // [
  p.ws();
  if (p.byte() === 0x5d) return null; // an empty pack: rare, the generic path has it
  // base fields carry forward to later records until replaced (RFC 8428 §4.1)
  let bn = '';
  let bnOk = true;
  let bt = 0;
  let bu: string | undefined;
  let buOk = true;
  let bv = 0;
  let json = '[';
  let count = 0;
  // the records of a pack mostly share one time: its text is made once (a 13-digit number
  // prints at ~0.25 µs here)
  let lastMs = -1;
  let lastMsText = '';
  const r = new RecordFields();
  for (;;) {
    if (count === maxRecords) return null;
    if (!p.record(r)) return null;
    const seen = r.seen;
    if (seen & F.vd) return null;
    if (seen & F.bver) {
      const bver = r.bver;
      if (!Number.isInteger(bver) || bver < 1 || bver > SENML_VERSION) return null;
    }
    if (seen & F.bn) {
      bn = r.bn;
      bnOk = r.bnOk;
    }
    if (seen & F.bt) bt = r.bt;
    if (seen & F.bu) {
      bu = r.bu;
      buOk = r.buOk;
    }
    if (seen & F.bv) bv = r.bv;
    // the name: SENML_NAME_RE, checked as the strings were read (each character in its
    // class; the first a letter or digit)
    const name = seen & F.n ? bn + r.n : bn;
    if (name.length === 0 || name.length > maxNameLength || !bnOk || (seen & F.n && !r.nOk) || !isAlnum(name.charCodeAt(0))) return null;
    // the unit: SENML_UNIT_RE, 1 to 16 characters 0x21-0x7e
    let unit = bu;
    let unitOk = buOk;
    if (seen & F.u) {
      unit = r.u;
      unitOk = r.uOk;
    }
    if (unit !== undefined && !unitOk) return null;
    const values = seen & (F.v | F.vs | F.vb);
    if (values !== F.v && values !== F.vs && values !== F.vb) return null; // none, or more than one
    const t = bt + (seen & F.t ? r.t : 0);
    // §4.5.3: small (or negative) times are offsets from now, in seconds
    const seconds = t >= SENML_RELATIVE_TIME_LIMIT ? t : now / 1000 + t;
    const ms = Math.round(seconds * 1000);
    if (!Number.isSafeInteger(ms) || ms < 0 || ms > SENML_MAX_TIME_MS) return null;
    if (ms !== lastMs) {
      lastMs = ms;
      lastMsText = String(ms);
    }
    // names, units and string values here are printable ASCII without `"` or `\`, which
    // JSON.stringify writes as they are; numbers it writes as String() does
    json += `${count === 0 ? '' : ','}{"n":"${name}","t":${lastMsText}`;
    if (values === F.v) {
      const value = r.v + bv;
      if (!Number.isFinite(value)) return null;
      // the number's own text where it is what String(value) gives (JsonScanner.number)
      json += `,"v":${bv === 0 && r.vText !== null ? r.vText : value}`;
    } else if (values === F.vs) {
      if (r.vs.length > SENML_MAX_VS) return null;
      json += `,"vs":"${r.vs}"`;
    } else json += `,"vb":${r.vb}`;
    json += unit === undefined ? '}' : `,"u":"${unit}"}`;
    count++;
    const c = p.next();
    if (c === 0x5d) break; // ]
    if (c !== 0x2c) return null; // ,
    p.ws();
  }
  if (!p.atEnd()) return null; // something after the pack
  return { json: json + ']', count };
}

/** Bits of RecordFields.seen: which fields the record has. */
const enum F {
  bver = 1,
  bn = 2,
  bt = 4,
  bu = 8,
  bv = 16,
  bs = 32,
  ut = 64,
  n = 128,
  u = 256,
  v = 512,
  vs = 1024,
  vb = 2048,
  vd = 4096,
  s = 8192,
  t = 16384,
}
/** fields whose value is a number; the others are strings, except vb (a boolean) */
const NUMBER_FIELDS = F.bver | F.bt | F.bv | F.bs | F.ut | F.v | F.s | F.t;
const STRING_FIELDS = F.bn | F.bu | F.n | F.u | F.vs | F.vd;

/** One record's fields, reused from record to record (only those in `seen` are current). */
class RecordFields {
  seen = 0;
  bver = 0;
  bn = '';
  /** bn has only characters SENML_NAME_RE allows */
  bnOk = true;
  bt = 0;
  bu = '';
  /** bu is a unit SENML_UNIT_RE accepts */
  buOk = true;
  bv = 0;
  n = '';
  nOk = true;
  u = '';
  uOk = true;
  v = 0;
  /** v's text when it is exactly String(v), else null */
  vText: string | null = null;
  vs = '';
  vb = false;
  t = 0;
}

/** The SenML records on top of the JSON cursor. */
class SenmlScanner extends JsonScanner {
  /** One `{…}` record into `r`; false when it is not one this path handles. */
  record(r: RecordFields): boolean {
    r.seen = 0;
    if (this.byte() !== 0x7b) return false; // {
    this.i++;
    this.ws();
    if (this.byte() === 0x7d) return false; // {}: no name, no value
    for (;;) {
      const f = this.field();
      if (f === 0 || r.seen & f) return false; // unknown, or twice in one record
      r.seen |= f;
      if (this.next() !== 0x3a) return false; // :
      this.ws();
      if (f & NUMBER_FIELDS) {
        const v = this.number();
        if (!Number.isFinite(v)) return false; // NaN: not a number; Infinity: 1e999
        if (f === F.v) {
          r.v = v;
          r.vText = this.canonical ? this.s.substring(this.numStart, this.i) : null;
        } else if (f === F.t) r.t = v;
        else if (f === F.bt) r.bt = v;
        else if (f === F.bv) r.bv = v;
        else if (f === F.bver) r.bver = v;
        // bs, ut, s: type-checked only, as decodeSenmlJson does
      } else if (f & STRING_FIELDS) {
        const s = this.string(f & (F.n | F.bn) ? NAME_CHARS : UNIT_CHARS);
        if (s === null) return false;
        if (f === F.n) {
          r.n = s;
          r.nOk = this.inTable;
        } else if (f === F.u) {
          r.u = s;
          r.uOk = this.inTable && s.length >= 1 && s.length <= 16;
        } else if (f === F.bn) {
          r.bn = s;
          r.bnOk = this.inTable;
        } else if (f === F.bu) {
          r.bu = s;
          r.buOk = this.inTable && s.length >= 1 && s.length <= 16;
        } else if (f === F.vs) r.vs = s;
        // vd: refused by the caller
      } else {
        const v = this.boolean();
        if (v === null) return false;
        r.vb = v;
      }
      const c = this.next();
      if (c === 0x7d) return true; // }
      if (c !== 0x2c) return false; // ,
      this.ws();
    }
  }

  /** A field name known to SenML (its F bit), or 0. */
  private field(): number {
    const s = this.s;
    const i = this.i;
    if (s.charCodeAt(i) !== 0x22) return 0;
    const a = s.charCodeAt(i + 1);
    const c = s.charCodeAt(i + 2);
    if (c === 0x22) {
      this.i = i + 3;
      switch (a) {
        case 0x6e: return F.n;
        case 0x75: return F.u;
        case 0x76: return F.v;
        case 0x74: return F.t;
        case 0x73: return F.s;
        default: return 0;
      }
    }
    if (s.charCodeAt(i + 3) === 0x22) {
      this.i = i + 4;
      if (a === 0x62) {
        switch (c) {
          case 0x6e: return F.bn;
          case 0x74: return F.bt;
          case 0x75: return F.bu;
          case 0x76: return F.bv;
          case 0x73: return F.bs;
          default: return 0;
        }
      }
      if (a === 0x76) return c === 0x73 ? F.vs : c === 0x62 ? F.vb : c === 0x64 ? F.vd : 0;
      if (a === 0x75 && c === 0x74) return F.ut;
      return 0;
    }
    // "bver"
    if (a === 0x62 && c === 0x76 && s.charCodeAt(i + 3) === 0x65 && s.charCodeAt(i + 4) === 0x72 && s.charCodeAt(i + 5) === 0x22) {
      this.i = i + 6;
      return F.bver;
    }
    return 0;
  }

}

/** the characters SENML_NAME_RE allows in a name: A-Z a-z 0-9 - : . / _ */
const NAME_CHARS = charTable(/[A-Za-z0-9\-:./_]/);
/** the characters SENML_UNIT_RE allows in a unit: 0x21-0x7e */
const UNIT_CHARS = charTable(/[\x21-\x7e]/);

function isAlnum(c: number): boolean {
  return (c >= 0x30 && c <= 0x39) || (c >= 0x41 && c <= 0x5a) || (c >= 0x61 && c <= 0x7a);
}
