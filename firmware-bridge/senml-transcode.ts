import type { SamplesJson } from '../core/messages.ts';
import { DEFAULT_SENML_LIMITS, SENML_MAX_TIME_MS, SENML_MAX_VS, SENML_RELATIVE_TIME_LIMIT, SENML_VERSION, type SenmlDecodeOptions } from './senml.ts';

/**
 * SenML JSON straight to the JSON of fleet samples, for the gateway's per-reading path.
 *
 * `decodeSenmlJson` + `JSON.stringify` of the samples cost the gateway about 9 µs per MCU
 * reading here (JSON.parse into objects, resolving them, and printing new objects), ~15% of
 * its CPU at 10,000 readings a second. This reads the bytes once and writes the samples'
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
  // one native call for the whole payload, then charCodeAt and substring, which V8 inlines:
  // a latin1 string keeps every byte as one char code, so bytes above 0x7e are still seen
  const text = (Buffer.isBuffer(payload) ? payload : Buffer.from(payload.buffer, payload.byteOffset, payload.byteLength)).toString('latin1');
  const p = new Parser(text);
  const now = opts.now ?? Date.now();
  p.ws();
  if (p.byte() !== 0x5b) return null; // [
  p.i++;
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
    // the unit: SENML_UNIT_RE, 1 to 16 characters 0x21-0x7e (read strings have no others but the space)
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
      // the number's own text where it is what String(value) gives (Parser.number)
      json += `,"v":${bv === 0 && r.vText !== null ? r.vText : value}`;
    } else if (values === F.vs) {
      if (r.vs.length > SENML_MAX_VS) return null;
      json += `,"vs":"${r.vs}"`;
    } else json += `,"vb":${r.vb}`;
    json += unit === undefined ? '}' : `,"u":"${unit}"}`;
    count++;
    p.ws();
    const c = p.byte();
    p.i++;
    if (c === 0x5d) break; // ]
    if (c !== 0x2c) return null; // ,
    p.ws();
  }
  p.ws();
  if (p.i !== text.length) return null; // something after the pack
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
  /** bn has only SenML name characters */
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

class Parser {
  i = 0;
  /** of the last string read: every character is one SenML allows in names */
  nameChars = false;
  /** of the last string read: it has a space */
  space = false;
  /** of the last number read: where its text starts, and whether that text is String() of its value */
  numStart = 0;
  canonical = false;
  constructor(private readonly s: string) {}

  /** the byte at the cursor (NaN at the end: equal to nothing) */
  byte(): number {
    return this.s.charCodeAt(this.i);
  }

  ws(): void {
    const s = this.s;
    let i = this.i;
    while (i < s.length) {
      const c = s.charCodeAt(i);
      if (c !== 0x20 && c !== 0x0a && c !== 0x0d && c !== 0x09) break;
      i++;
    }
    this.i = i;
  }

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
      this.ws();
      if (this.byte() !== 0x3a) return false; // :
      this.i++;
      this.ws();
      if (f & NUMBER_FIELDS) {
        const v = this.number();
        if (!Number.isFinite(v)) return false; // NaN: not a number; Infinity: 1e999
        if (f === F.v) {
          r.v = v;
          r.vText = this.canonical ? this.s.substring(this.numStart, this.i) : null;
        }
        else if (f === F.t) r.t = v;
        else if (f === F.bt) r.bt = v;
        else if (f === F.bv) r.bv = v;
        else if (f === F.bver) r.bver = v;
        // bs, ut, s: type-checked only, as decodeSenmlJson does
      } else if (f & STRING_FIELDS) {
        const s = this.string();
        if (s === null) return false;
        if (f === F.n) {
          r.n = s;
          r.nOk = this.nameChars;
        } else if (f === F.u) {
          r.u = s;
          r.uOk = isUnit(s, this.space);
        } else if (f === F.bn) {
          r.bn = s;
          r.bnOk = this.nameChars;
        } else if (f === F.bu) {
          r.bu = s;
          r.buOk = isUnit(s, this.space);
        }
        else if (f === F.vs) r.vs = s;
        // vd: refused by the caller
      } else {
        const v = this.boolean();
        if (v === null) return false;
        r.vb = v;
      }
      this.ws();
      const c = this.byte();
      this.i++;
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

  /** A string of printable ASCII without escapes, or null (anything else goes to the generic path). */
  private string(): string | null {
    const s = this.s;
    if (s.charCodeAt(this.i) !== 0x22) return null;
    const start = this.i + 1;
    let i = start;
    let nameChars = true;
    let space = false;
    for (;;) {
      if (i >= s.length) return null;
      const c = s.charCodeAt(i);
      if (c === 0x22) break;
      if (c < 0x20 || c > 0x7e || c === 0x5c) return null;
      if (NAME_CHAR[c] === 0) {
        nameChars = false;
        if (c === 0x20) space = true;
      }
      i++;
    }
    this.i = i + 1;
    this.nameChars = nameChars;
    this.space = space;
    return s.substring(start, i);
  }

  /**
   * A number in JSON's grammar, or NaN when there is none here. Sets `numStart` and
   * `canonical`: whether the text is exactly what String() prints for its value, so it can be
   * written as it is. That holds for an integer of at most 15 digits other than -0 (JSON allows
   * no leading zeros), and for a decimal without exponent whose fraction does not end in 0,
   * with at most 15 significant digits (at most 15 of them survive the double unchanged, and
   * no shorter text gives the same double, so it is the shortest text String() looks for), and
   * at least 1e-6 (at most five zeros after "0."; below, String() switches to an exponent).
   */
  private number(): number {
    const s = this.s;
    const start = this.i;
    this.numStart = start;
    this.canonical = false;
    let i = start;
    let neg = false;
    if (s.charCodeAt(i) === 0x2d) {
      neg = true;
      i++;
    }
    const intStart = i;
    let c = s.charCodeAt(i);
    if (c === 0x30) i++;
    else if (c >= 0x31 && c <= 0x39) {
      i++;
      while ((c = s.charCodeAt(i)) >= 0x30 && c <= 0x39) i++;
    } else return NaN;
    const intEnd = i;
    let fracStart = -1;
    let fracEnd = -1;
    if (s.charCodeAt(i) === 0x2e) {
      i++;
      fracStart = i;
      while ((c = s.charCodeAt(i)) >= 0x30 && c <= 0x39) i++;
      if (i === fracStart) return NaN;
      fracEnd = i;
    }
    let exponent = false;
    if (s.charCodeAt(i) === 0x65 || s.charCodeAt(i) === 0x45) {
      exponent = true;
      i++;
      if (s.charCodeAt(i) === 0x2b || s.charCodeAt(i) === 0x2d) i++;
      const expStart = i;
      while ((c = s.charCodeAt(i)) >= 0x30 && c <= 0x39) i++;
      if (i === expStart) return NaN;
    }
    this.i = i;
    const intDigits = intEnd - intStart;
    if (fracStart < 0 && !exponent && intDigits <= 15) {
      // up to 15 digits the sum is exact: the same double as Number() of the text
      let v = 0;
      for (let k = intStart; k < intEnd; k++) v = v * 10 + (s.charCodeAt(k) - 0x30);
      this.canonical = !(neg && v === 0);
      return neg ? -v : v;
    }
    if (fracStart >= 0 && !exponent && s.charCodeAt(fracEnd - 1) !== 0x30) {
      let significant: number;
      if (intDigits === 1 && s.charCodeAt(intStart) === 0x30) {
        let zeros = 0;
        while (s.charCodeAt(fracStart + zeros) === 0x30) zeros++;
        significant = zeros <= 5 ? fracEnd - fracStart - zeros : 99;
      } else significant = intDigits + fracEnd - fracStart;
      this.canonical = significant <= 15;
    }
    return Number(s.substring(start, i));
  }

  private boolean(): boolean | null {
    const s = this.s;
    const i = this.i;
    if (s.charCodeAt(i) === 0x74 && s.charCodeAt(i + 1) === 0x72 && s.charCodeAt(i + 2) === 0x75 && s.charCodeAt(i + 3) === 0x65) {
      this.i = i + 4;
      return true;
    }
    if (s.charCodeAt(i) === 0x66 && s.charCodeAt(i + 1) === 0x61 && s.charCodeAt(i + 2) === 0x6c && s.charCodeAt(i + 3) === 0x73 && s.charCodeAt(i + 4) === 0x65) {
      this.i = i + 5;
      return false;
    }
    return null;
  }
}

/** 1 for the characters SENML_NAME_RE allows in a name: A-Z a-z 0-9 - : . / _ */
const NAME_CHAR = new Uint8Array(128);
for (let c = 0; c < 128; c++) NAME_CHAR[c] = /[A-Za-z0-9\-:./_]/.test(String.fromCharCode(c)) ? 1 : 0;

function isAlnum(c: number): boolean {
  return (c >= 0x30 && c <= 0x39) || (c >= 0x41 && c <= 0x5a) || (c >= 0x61 && c <= 0x7a);
}

/** SENML_UNIT_RE for a string read by Parser.string (printable ASCII, no `"` or `\`): 1 to 16 characters, no space */
function isUnit(u: string, space: boolean): boolean {
  return u.length >= 1 && u.length <= 16 && !space;
}
