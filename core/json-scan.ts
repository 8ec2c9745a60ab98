/**
 * A cursor over JSON text for the per-message fast paths (the gateway's SenML transcoder,
 * firmware-bridge/senml-transcode.ts, and the hub's telemetry scanner, hub/telemetry-fast.ts):
 * they read the common form of a message in one pass, without JSON.parse's objects, and give
 * up (null, false, NaN) on anything they are not certain of, so that the full decoder, which
 * stays the authority on validity and errors, reads it instead.
 *
 * Strings: only printable ASCII without escapes (0x20-0x7e, no `\`); anything else gives
 * up. Such a string is its own JSON text, and JSON.stringify writes it back unchanged.
 *
 * The text is the payload decoded as latin1 (`JsonScanner.of`): one native call for the whole
 * payload, then charCodeAt and substring, which V8 inlines; a latin1 string keeps every byte
 * as one char code, so bytes above 0x7e (non-ASCII, never accepted here) are still seen.
 */
export class JsonScanner {
  i = 0;
  /** of the last string read: every character is in the table given (1 in it) */
  inTable = false;
  /** of the last number read: whether its text (from numStart to i) is what String() prints for its value */
  canonical = false;
  numStart = 0;

  constructor(readonly s: string) {}

  static text(payload: Uint8Array): string {
    return (Buffer.isBuffer(payload) ? payload : Buffer.from(payload.buffer, payload.byteOffset, payload.byteLength)).toString('latin1');
  }

  /** the char code at the cursor (NaN at the end: equal to nothing) */
  byte(): number {
    return this.s.charCodeAt(this.i);
  }

  /** Skip JSON whitespace. */
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

  /** after skipping whitespace, the next char code, consumed (NaN at the end) */
  next(): number {
    this.ws();
    return this.s.charCodeAt(this.i++);
  }

  /** only whitespace is left */
  atEnd(): boolean {
    this.ws();
    return this.i === this.s.length;
  }

  /**
   * A string of printable ASCII without escapes, or null (anything else: give up). With a
   * table (1 for each allowed char code below 128), `inTable` tells whether every character is
   * in it.
   */
  string(table?: Uint8Array): string | null {
    const s = this.s;
    if (s.charCodeAt(this.i) !== 0x22) return null;
    const start = this.i + 1;
    let i = start;
    let inTable = true;
    for (;;) {
      if (i >= s.length) return null;
      const c = s.charCodeAt(i);
      if (c === 0x22) break;
      if (c < 0x20 || c > 0x7e || c === 0x5c) return null;
      if (table !== undefined && table[c] === 0) inTable = false;
      i++;
    }
    this.i = i + 1;
    this.inTable = inTable;
    return s.substring(start, i);
  }

  /**
   * A number in JSON's grammar, or NaN when there is none here (Infinity for 1e999, as
   * JSON.parse). With at most 15 digits and no exponent its value is computed as it is read:
   * the digits as an integer (exact below 2^53), divided by a power of ten (exact up to
   * 10^22), is one correctly rounded IEEE operation on exact operands, so it is the double
   * nearest the decimal — what Number() of the text gives (Clinger's fast path). Otherwise
   * Number() of the text.
   *
   * Sets `numStart` and `canonical`: whether the text is exactly what String() prints for
   * its value, so it can be written as it is. That holds for an integer of at most 15 digits
   * other than -0 (JSON allows no leading zeros), and for a decimal without exponent whose
   * fraction does not end in 0, with at most 15 significant digits (at most 15 of them
   * survive the double unchanged, and no shorter text gives the same double, so it is the
   * shortest text String() looks for), and at least 1e-6 (at most five zeros after "0.";
   * below, String() switches to an exponent).
   */
  number(): number {
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
    let digits = 0;
    let c = s.charCodeAt(i);
    if (c === 0x30) c = s.charCodeAt(++i);
    else if (c >= 0x31 && c <= 0x39) {
      do {
        digits = digits * 10 + (c - 0x30);
        c = s.charCodeAt(++i);
      } while (c >= 0x30 && c <= 0x39);
    } else return NaN;
    const intEnd = i;
    let fracStart = -1;
    let fracEnd = -1;
    if (c === 0x2e) {
      fracStart = ++i;
      while ((c = s.charCodeAt(i)) >= 0x30 && c <= 0x39) {
        digits = digits * 10 + (c - 0x30);
        i++;
      }
      if (i === fracStart) return NaN;
      fracEnd = i;
    }
    let exponent = false;
    if (c === 0x65 || c === 0x45) {
      exponent = true;
      i++;
      if (s.charCodeAt(i) === 0x2b || s.charCodeAt(i) === 0x2d) i++;
      const expStart = i;
      while ((c = s.charCodeAt(i)) >= 0x30 && c <= 0x39) i++;
      if (i === expStart) return NaN;
    }
    this.i = i;
    const intDigits = intEnd - intStart;
    const fracDigits = fracStart < 0 ? 0 : fracEnd - fracStart;
    if (fracStart < 0) this.canonical = !exponent && intDigits <= 15 && !(neg && digits === 0);
    else if (!exponent && s.charCodeAt(fracEnd - 1) !== 0x30) {
      let significant: number;
      if (intDigits === 1 && s.charCodeAt(intStart) === 0x30) {
        let zeros = 0;
        while (s.charCodeAt(fracStart + zeros) === 0x30) zeros++;
        significant = zeros <= 5 ? fracDigits - zeros : 99;
      } else significant = intDigits + fracDigits;
      this.canonical = significant <= 15;
    }
    if (!exponent && intDigits + fracDigits <= 15) {
      const v = fracDigits === 0 ? digits : digits / POW10[fracDigits]!;
      return neg ? -v : v;
    }
    return Number(s.substring(start, i));
  }

  /** true or false, or null when neither is here */
  boolean(): boolean | null {
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

  /**
   * A key `"…"` followed by `:` (whitespace around allowed), returned as its text, or null
   * (not a plain string, or no colon).
   */
  key(): string | null {
    this.ws();
    const k = this.string();
    if (k === null || this.next() !== 0x3a) return null;
    this.ws();
    return k;
  }
}

/** A table for JsonScanner.string: 1 for each char code below 128 that `re` matches as a single character. */
export function charTable(re: RegExp): Uint8Array {
  const t = new Uint8Array(128);
  for (let c = 0; c < 128; c++) t[c] = re.test(String.fromCharCode(c)) ? 1 : 0;
  return t;
}

/** 10^0 … 10^15, each exact as a double */
const POW10 = Array.from({ length: 16 }, (_, k) => 10 ** k);
