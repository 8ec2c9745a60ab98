import { test } from 'node:test';
import assert from 'node:assert/strict';
import { FleetError } from '../../core/errors.ts';
import { decodeMessage, encodeMessage, telemetryJson, type Sample } from '../../core/messages.ts';
import { decodeTelemetryFast, ScannedTelemetry, scanTelemetry } from '../../hub/telemetry-fast.ts';
import { rng as xorshift } from '../helpers.ts';

/**
 * Differential test of the hub's telemetry fast path (hub/telemetry-fast.ts) against the
 * schema decode it stands in for (core/messages.ts decodeMessage('telemetry', …)): for every
 * payload, both accept with the same result (deep-equal; key order may differ) or both refuse
 * with the same error code and message. Payloads are generated as JSON *text* (key order,
 * duplicate keys, whitespace, escapes and number notation are chosen, not left to
 * JSON.stringify), then some are damaged as bytes (truncation, flipped bytes, non-UTF-8).
 * Reproducible: the seed is in every failure message (FLEETLET_FUZZ_SEED picks another).
 */

// ---------------------------------------------------------------- JSON text writer

/** verbatim JSON text (a number in a chosen notation, a literal, junk) */
class Raw {
  constructor(readonly text: string) {}
}
/** an object as ordered entries: duplicate keys and key order are part of the test */
class Obj {
  constructor(readonly entries: Array<[string, Node]>) {}
  get(k: string): Node | undefined {
    for (let i = this.entries.length - 1; i >= 0; i--) if (this.entries[i]![0] === k) return this.entries[i]![1];
    return undefined;
  }
  set(k: string, v: Node): void {
    const e = this.entries.find((x) => x[0] === k);
    if (e) e[1] = v;
    else this.entries.push([k, v]);
  }
  delete(k: string): void {
    for (let i = this.entries.length - 1; i >= 0; i--) if (this.entries[i]![0] === k) this.entries.splice(i, 1);
  }
}
type Node = Raw | Obj | Node[] | string | number | boolean | null;

interface Rand {
  int(n: number): number;
  chance(p: number): boolean;
  pick<T>(xs: readonly T[]): T;
}

function makeRand(seed: number): Rand {
  const next = xorshift(seed);
  return {
    int: (n) => next(n),
    chance: (p) => next(1_000_000) < p * 1_000_000,
    pick: (xs) => xs[next(xs.length)]!,
  };
}

const WS = [' ', '\t', '\n', '\r', '  ', '\n  '];
function ws(r: Rand): string {
  return r.chance(0.15) ? r.pick(WS) : '';
}

/** `\\uXXXX` in lower or upper case hex */
function hexEscape(r: Rand, c: number): string {
  const h = c.toString(16).padStart(4, '0');
  return '\\u' + (r.chance(0.5) ? h : h.toUpperCase());
}

const PLAIN_STRING = /^[A-Za-z0-9._ %-]*$/;

function writeString(r: Rand, s: string, escapeP: number): string {
  if (escapeP === 0 && PLAIN_STRING.test(s)) return '"' + s + '"'; // nothing to choose (most strings)
  let out = '"';
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    const hi = c >= 0xd800 && c <= 0xdbff;
    const lo = c >= 0xdc00 && c <= 0xdfff;
    const paired = (hi && i + 1 < s.length && (s.charCodeAt(i + 1) & 0xfc00) === 0xdc00) || (lo && i > 0 && (s.charCodeAt(i - 1) & 0xfc00) === 0xd800);
    if (c === 0x22) out += '\\"';
    else if (c === 0x5c) out += '\\\\';
    else if (c < 0x20) out += r.chance(0.5) && c === 0x0a ? '\\n' : hexEscape(r, c);
    // a lone surrogate cannot be written as UTF-8: only its escape carries it through
    else if ((hi || lo) && !paired) out += hexEscape(r, c);
    else if (c === 0x2f && r.chance(0.3)) out += '\\/';
    else if (escapeP > 0 && r.chance(escapeP)) out += hexEscape(r, c);
    else out += s[i];
  }
  return out + '"';
}

function write(r: Rand, n: Node, escapeP: number): string {
  if (n instanceof Raw) return n.text;
  if (n instanceof Obj) return '{' + ws(r) + n.entries.map(([k, v]) => writeString(r, k, escapeP) + ws(r) + ':' + ws(r) + write(r, v, escapeP)).join(ws(r) + ',' + ws(r)) + ws(r) + '}';
  if (Array.isArray(n)) return '[' + ws(r) + n.map((x) => write(r, x, escapeP)).join(ws(r) + ',' + ws(r)) + ws(r) + ']';
  if (typeof n === 'string') return writeString(r, n, escapeP);
  if (typeof n === 'number') return numberText(r, n);
  return JSON.stringify(n);
}

/** a JSON spelling of a finite number: plain, exponent (e/E, +/-), padded fraction, -0 */
function numberText(r: Rand, x: number): string {
  if (Object.is(x, -0)) return r.pick(['-0', '-0.0', '-0e0', '-0E+3']);
  const plain = String(x); // may already be exponent form (1e+21, 5e-324)
  switch (r.int(6)) {
    case 0:
      return x.toExponential();
    case 1:
      return x.toExponential().toUpperCase();
    case 2:
      return Number.isInteger(x) && Math.abs(x) < 1e15 ? `${plain}.0` : plain;
    case 3:
      return Number.isInteger(x) && Math.abs(x) < 1e15 && x !== 0 ? `${plain}0e-1` : plain; // 12 -> 120e-1
    default:
      return plain;
  }
}

// ---------------------------------------------------------------- value generators

const ALNUM = 'abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-/';
const UNICODE = ['é', 'ü', 'ß', 'Ω', '温', '度', '€', '℃', '\u0301', '\u200d', '\ufeff', '\u2028', '\u0000', '\u007f', '"', '\\', '\n', '\t', '😀', '🌡', '\u{10ffff}', '\ud800', '\udfff'];

/** a string of exactly `len` UTF-16 code units (unicode, astral pairs, lone surrogates, controls) */
function str(r: Rand, len: number, unicodeP = 0.2): string {
  let s = '';
  while (s.length < len) {
    let c = r.chance(unicodeP) ? r.pick(UNICODE) : ALNUM[r.int(ALNUM.length)]!;
    if (s.length + c.length > len) c = 'x';
    s += c;
  }
  return s;
}

/** a length near the interesting points of 0..max */
function lenUpTo(r: Rand, min: number, max: number): number {
  switch (r.int(5)) {
    case 0:
      return min;
    case 1:
      return max;
    case 2:
      return Math.max(min, max - 1);
    default:
      return min + r.int(Math.min(max - min + 1, 24));
  }
}

function anyFinite(r: Rand): number {
  const sign = r.chance(0.4) ? -1 : 1;
  switch (r.int(9)) {
    case 0:
      return sign * r.int(1000);
    case 1:
      return r.pick([0, -0, 1, -1, 0.1, 0.5, 1e-7, 0.1 + 0.2, 100.25, 21.5]);
    case 2:
      return sign * r.pick([Number.MAX_VALUE, Number.MIN_VALUE, Number.MAX_SAFE_INTEGER, Number.MAX_SAFE_INTEGER + 2, 2 ** 63, 1e21, 1e300, 5e-324, 2.2250738585072014e-308]);
    case 3:
      return sign * (r.int(2 ** 30) / 2 ** 30) * 10 ** (r.int(600) - 300);
    default:
      return sign * (r.int(2 ** 30) / 1024);
  }
}

/** a valid ts / t: a safe non-negative integer */
function anyTs(r: Rand): number {
  return r.pick([0, 1, Number.MAX_SAFE_INTEGER, 1_700_000_000_000 + r.int(2 ** 30), r.int(2 ** 31), 2 ** 52]);
}

function anyMid(r: Rand): string {
  const n = r.pick([1, 1, 2, 5, 10, 19, 20]);
  let s = '';
  for (let i = 0; i < n; i++) s += String(r.int(10));
  return s;
}

/** junk of any JSON type, sometimes deeply nested */
function junk(r: Rand, depth = 0): Node {
  switch (r.int(depth > 3 ? 6 : 9)) {
    case 0:
      return null;
    case 1:
      return r.chance(0.5);
    case 2:
      return anyFinite(r);
    case 3:
      return str(r, r.int(12));
    case 4:
      return new Raw(r.pick(['"NaN"', '"Infinity"', '"-Infinity"', '"1"', '"0x10"', '"1e3"', '""', '" "', '"true"', '"null"']));
    case 5:
      return new Raw(r.pick(['1e400', '-1e400', '1E309', '123456789012345678901234567890']));
    case 6:
      return Array.from({ length: r.int(4) }, () => junk(r, depth + 1));
    case 7:
      return new Obj(Array.from({ length: r.int(4) }, () => [str(r, 1 + r.int(4)), junk(r, depth + 1)]));
    default:
      return new Raw('['.repeat(50 + r.int(200)) + ']'.repeat(50 + r.int(200))); // deep, often unbalanced
  }
}

const EXTRA_KEYS = ['x', 'extra', 'samples2', 'V', 'T', 'N', '__proto__', 'constructor', 'toString', 'hasOwnProperty', 'valueOf', '', ' n', 'n ', 'ü'];

function shuffle<T>(r: Rand, xs: T[]): T[] {
  for (let i = xs.length - 1; i > 0; i--) {
    const j = r.int(i + 1);
    [xs[i], xs[j]] = [xs[j]!, xs[i]!];
  }
  return xs;
}

interface Gen {
  /** what the generator meant; the assertion does not depend on it, the coverage counts do */
  kind: 'valid' | 'valid-extra' | 'invalid-field' | 'invalid-text' | 'boundary';
  /** with a fixed description for the fixed cases */
  what: string;
  bytes: Buffer;
}

function validSample(r: Rand): Obj {
  const e: Array<[string, Node]> = [['n', str(r, lenUpTo(r, 1, 128))]];
  if (r.chance(0.6)) e.push(['v', anyFinite(r)]);
  if (r.chance(0.25)) e.push(['vs', str(r, lenUpTo(r, 0, 1024))]);
  if (r.chance(0.2)) e.push(['vb', r.chance(0.5)]);
  if (r.chance(0.4)) e.push(['u', r.chance(0.5) ? r.pick(['Cel', '%', 'B', 's', 'lx', 'm/s2', '']) : str(r, lenUpTo(r, 0, 16))]);
  e.push(['t', anyTs(r)]);
  return new Obj(r.chance(0.7) ? e : shuffle(r, e));
}

function validBatch(r: Rand): Obj {
  const count = r.chance(0.1) ? 0 : r.chance(0.85) ? 1 + r.int(5) : r.chance(0.8) ? 6 + r.int(45) : 51 + r.int(100);
  const e: Array<[string, Node]> = [
    ['v', 1],
    ['mid', anyMid(r)],
    ['ts', anyTs(r)],
    ['samples', Array.from({ length: count }, () => validSample(r))],
  ];
  return new Obj(r.chance(0.7) ? e : shuffle(r, e));
}

/** Keep it valid but not canonical: extra keys (zod strips them), duplicate keys (last wins). */
function decorate(r: Rand, b: Obj): void {
  const targets: Obj[] = [b, ...samplesOf(b)];
  const t = r.pick(targets);
  if (r.chance(0.5)) t.entries.splice(r.int(t.entries.length + 1), 0, [r.pick(EXTRA_KEYS), junk(r)]);
  else {
    // an earlier duplicate with another value: JSON.parse keeps the last one
    const [k] = r.pick(t.entries);
    t.entries.unshift([k, junk(r)]);
  }
}

/** the samples that are still objects (a first breakField may have replaced some) */
function samplesOf(b: Obj): Obj[] {
  const got = b.get('samples');
  return Array.isArray(got) ? got.filter((s): s is Obj => s instanceof Obj) : [];
}

/** Make exactly one thing wrong (or, rarely, two). */
function breakField(r: Rand, b: Obj): string {
  const got = b.get('samples');
  const samples: Node[] = Array.isArray(got) ? got : [];
  const i = r.int(Math.max(1, samples.length));
  const s = samples[i];
  if (s instanceof Obj && r.chance(0.55)) {
    const field = r.pick(['n', 'v', 'vs', 'vb', 'u', 't', 'whole', 'dup-last']);
    const bad: Record<string, () => Node> = {
      n: () => r.pick<Node>(['', str(r, 129), str(r, 129 + r.int(50)), junk(r)]),
      v: () => r.pick<Node>([new Raw('1e400'), new Raw('-1e400'), '1', 'NaN', 'Infinity', null, true, [], new Obj([]), junk(r)]),
      vs: () => r.pick<Node>([str(r, 1025), anyFinite(r), null, false, junk(r)]),
      vb: () => r.pick<Node>(['true', 1, 0, null, 'false', junk(r)]),
      u: () => r.pick<Node>([str(r, 17, 0), str(r, 17 + r.int(30), 0), 1, null, junk(r)]),
      t: () => r.pick<Node>([-1, 1.5, Number.MAX_SAFE_INTEGER + 1, 2 ** 60, new Raw('1e400'), '1', null, -0.5, new Raw('1.0000000000000002'), junk(r)]),
    };
    if (field === 'whole') {
      samples[i] = junk(r);
      return `samples.${i} replaced by junk`;
    }
    if (field === 'dup-last') {
      const k = r.pick(['n', 't', 'v', 'u']);
      s.entries.push([k, bad[k]!()]);
      return `samples.${i}.${k} duplicated, last one bad`;
    }
    if ((field === 'n' || field === 't') && r.chance(0.25)) {
      s.delete(field);
      return `samples.${i}.${field} missing`;
    }
    s.set(field, bad[field]!());
    return `samples.${i}.${field} bad`;
  }
  const field = r.pick(['v', 'mid', 'ts', 'samples']);
  if (r.chance(0.2)) {
    b.delete(field);
    return `${field} missing`;
  }
  const bad: Record<string, () => Node> = {
    v: () => r.pick<Node>([0, 2, '1', 1.5, true, null, new Raw('1e0'), junk(r)]), // 1e0 and 1.0 are 1: still valid, both must agree
    mid: () => r.pick<Node>(['', '-1', '1.5', 'a1', ' 1', '1 ', '1\n', '０', '١٢', '1'.repeat(21), '9'.repeat(21), '+1', '0x1', 1, 123, null, junk(r)]),
    ts: () => r.pick<Node>([-1, 1.5, Number.MAX_SAFE_INTEGER + 1, 2 ** 53, new Raw('1e400'), new Raw('9007199254740993'), '0', 'NaN', null, junk(r)]),
    samples: () => r.pick<Node>([null, new Obj([]), 'samples', 1, [1, 2], [null], [[]], ['{"n":"a","t":1}'], junk(r)]),
  };
  b.set(field, bad[field]!());
  return `${field} bad`;
}

/** Damage the bytes: truncation, flipped bytes, non-UTF-8, BOMs, trailing junk. */
function breakText(r: Rand, text: Buffer): { bytes: Buffer; what: string } {
  const at = r.int(text.length + 1);
  const insert = (b: Buffer) => Buffer.concat([text.subarray(0, at), b, text.subarray(at)]);
  switch (r.int(9)) {
    case 0:
      return { bytes: text.subarray(0, at), what: `truncated at ${at}` };
    case 1: {
      const b = Buffer.from(text);
      const k = r.int(Math.max(1, b.length));
      b[k] = r.int(256);
      return { bytes: b, what: `byte ${k} replaced` };
    }
    case 2:
      return { bytes: insert(Buffer.from([0x80 + r.int(0x80)])), what: `stray byte >= 0x80 at ${at}` };
    case 3:
      return { bytes: insert(Buffer.from(r.pick([[0xc0, 0xaf], [0xed, 0xa0, 0x80], [0xf4, 0x90, 0x80, 0x80], [0xe2, 0x82], [0xff, 0xfe], [0xc3]]))), what: `ill-formed UTF-8 at ${at}` };
    case 4:
      return { bytes: Buffer.concat([Buffer.from(r.pick([[0xef, 0xbb, 0xbf], [0xff, 0xfe], [0xfe, 0xff]])), text]), what: 'BOM in front' };
    case 5:
      return { bytes: Buffer.concat([text, Buffer.from(r.pick([',', '}', ']', ' x', '{}', '\u0000', 'null']))]), what: 'trailing junk' };
    case 6:
      return { bytes: Buffer.from(text.toString('utf8'), 'utf16le'), what: 'UTF-16' };
    case 7:
      return { bytes: insert(Buffer.from(r.pick(['NaN', 'Infinity', '-', '.', 'e', ',', ':', '"', '\\', '/*x*/', "'"]))), what: `token inserted at ${at}` };
    default: {
      // a stray byte inside a string keeps the JSON valid: U+FFFD in the decoded value
      const q = text.indexOf(0x22, at);
      const k = q < 0 ? at : q + 1;
      return { bytes: Buffer.concat([text.subarray(0, k), Buffer.from([0x80 + r.int(0x80)]), text.subarray(k)]), what: `stray byte in a string at ${k}` };
    }
  }
}

function generate(r: Rand): Gen {
  const roll = r.int(100);
  const b = validBatch(r);
  const escapeP = r.chance(0.2) ? 0.1 : 0;
  if (roll < 35) return { kind: 'valid', what: 'valid', bytes: Buffer.from(write(r, b, escapeP)) };
  if (roll < 50) {
    decorate(r, b);
    if (r.chance(0.3)) decorate(r, b);
    return { kind: 'valid-extra', what: 'valid with extra or duplicate keys', bytes: Buffer.from(write(r, b, escapeP)) };
  }
  if (roll < 85) {
    let what = breakField(r, b);
    if (r.chance(0.1)) what += '; ' + breakField(r, b);
    return { kind: 'invalid-field', what, bytes: Buffer.from(write(r, b, escapeP)) };
  }
  const t = breakText(r, Buffer.from(write(r, b, escapeP)));
  return { kind: 'invalid-text', what: t.what, bytes: t.bytes };
}

/** Fixed cases at the edges that a random stream would rarely hit. */
function boundaries(): Gen[] {
  const sample = '{"n":"a","t":1}';
  const batch = (samples: string) => `{"v":1,"mid":"1","ts":1,"samples":[${samples}]}`;
  const cases: Array<[string, string | Buffer]> = [
    ['10,000 samples (the limit)', batch(Array(10_000).fill(sample).join(','))],
    ['10,001 samples', batch(Array(10_001).fill(sample).join(','))],
    ['empty payload', ''],
    ['whitespace only', ' \n\t'],
    ['null', 'null'],
    ['array', '[]'],
    ['number', '1'],
    ['string', '"telemetry"'],
    ['true', 'true'],
    ['empty object', '{}'],
    ['minimal valid', batch('')],
    ['n of 128 units', batch(`{"n":"${'n'.repeat(128)}","t":1}`)],
    ['n of 129 units', batch(`{"n":"${'n'.repeat(129)}","t":1}`)],
    ['n of 64 astral chars (128 units)', batch(`{"n":"${'😀'.repeat(64)}","t":1}`)],
    ['n of 65 astral chars (130 units, 65 code points)', batch(`{"n":"${'😀'.repeat(65)}","t":1}`)],
    ['n of 128 code points in 129 units', batch(`{"n":"${'n'.repeat(127)}😀","t":1}`)],
    ['u of 9 astral chars (18 units, 9 code points)', batch(`{"n":"a","u":"${'🌡'.repeat(9)}","t":1}`)],
    ['u of 17 code points', batch(`{"n":"a","u":"${'u'.repeat(17)}","t":1}`)],
    ['vs of 1024 units', batch(`{"n":"a","vs":"${'s'.repeat(1024)}","t":1}`)],
    ['vs of 1025 units', batch(`{"n":"a","vs":"${'s'.repeat(1025)}","t":1}`)],
    ['vs of 600 astral chars', batch(`{"n":"a","vs":"${'😀'.repeat(600)}","t":1}`)],
    ['n a lone high surrogate', batch('{"n":"\\ud800","t":1}')],
    ['n a lone surrogate pair, escaped', batch('{"n":"\\ud83d\\ude00","t":1}')],
    ['n a lone surrogate, as UTF-8 bytes', Buffer.concat([Buffer.from(batch('{"n":"').slice(0, -2)), Buffer.from([0xed, 0xa0, 0x80]), Buffer.from('","t":1}]}')])],
    ['n the empty string, escaped', batch('{"n":"\\u0000","t":1}')],
    ['ts max safe', '{"v":1,"mid":"1","ts":9007199254740991,"samples":[]}'],
    ['ts max safe + 1', '{"v":1,"mid":"1","ts":9007199254740992,"samples":[]}'],
    ['ts -0', '{"v":1,"mid":"1","ts":-0,"samples":[]}'],
    ['ts 1.0', '{"v":1,"mid":"1","ts":1.0,"samples":[]}'],
    ['ts 1e3', '{"v":1,"mid":"1","ts":1e3,"samples":[]}'],
    ['ts 0.1e1', '{"v":1,"mid":"1","ts":0.1e1,"samples":[]}'],
    ['ts 1.0000000000000001 (rounds to 1)', '{"v":1,"mid":"1","ts":1.0000000000000001,"samples":[]}'],
    ['v 1.0', '{"v":1.0,"mid":"1","ts":1,"samples":[]}'],
    ['v 1e0', '{"v":1e0,"mid":"1","ts":1,"samples":[]}'],
    ['v 0.99999999999999999 (rounds to 1)', '{"v":0.99999999999999999,"mid":"1","ts":1,"samples":[]}'],
    ['mid of 20 digits', '{"v":1,"mid":"99999999999999999999","ts":1,"samples":[]}'],
    ['mid of 21 digits', '{"v":1,"mid":"999999999999999999999","ts":1,"samples":[]}'],
    ['mid with a trailing newline', '{"v":1,"mid":"1\\n","ts":1,"samples":[]}'],
    ['mid in Arabic-Indic digits', '{"v":1,"mid":"١","ts":1,"samples":[]}'],
    ['v 1e400 in a sample', batch('{"n":"a","v":1e400,"t":1}')],
    ['v 5e-324 in a sample', batch('{"n":"a","v":5e-324,"t":1}')],
    ['v 1e-400 (underflows to 0)', batch('{"n":"a","v":1e-400,"t":1}')],
    ['v -0 in a sample', batch('{"n":"a","v":-0,"t":1}')],
    ['v given twice, first bad', batch('{"n":"a","v":"x","v":2,"t":1}')],
    ['v given twice, last bad', batch('{"n":"a","v":2,"v":"x","t":1}')],
    ['__proto__ key in a sample', batch('{"n":"a","t":1,"__proto__":{"n":"b"}}')],
    ['__proto__ key at the top', '{"__proto__":{"v":2},"v":1,"mid":"1","ts":1,"samples":[]}'],
    ['constructor key at the top', '{"v":1,"mid":"1","ts":1,"samples":[],"constructor":null}'],
    ['every optional field at once', batch('{"t":5,"u":"Cel","vb":false,"vs":"","v":-1.5e-3,"n":"x"}')],
    ['BOM in front of a valid batch', Buffer.concat([Buffer.from([0xef, 0xbb, 0xbf]), Buffer.from(batch(''))])],
    ['NUL after a valid batch', batch('') + '\u0000'],
    ['deep nesting in samples', batch('['.repeat(5000) + ']'.repeat(5000))],
    ['deep nesting as v', batch(`{"n":"a","t":1,"v":${'['.repeat(3000)}${']'.repeat(3000)}}`)],
    ['samples as an object with numeric keys', '{"v":1,"mid":"1","ts":1,"samples":{"0":{"n":"a","t":1},"length":1}}'],
  ];
  return cases.map(([what, p]) => ({ kind: 'boundary' as const, what, bytes: Buffer.isBuffer(p) ? p : Buffer.from(p) }));
}

// ---------------------------------------------------------------- comparison

type Outcome = { ok: true; value: unknown } | { ok: false; code: string | undefined; message: string; fleet: boolean };

function outcome(fn: () => unknown): Outcome {
  try {
    return { ok: true, value: fn() };
  } catch (err) {
    return { ok: false, code: (err as { code?: string }).code, message: String((err as Error).message), fleet: err instanceof FleetError };
  }
}

/** null when the two agree, else why not */
function disagreement(ref: Outcome, fast: Outcome): string | null {
  if (ref.ok !== fast.ok) return ref.ok ? `schema accepts, fast path throws ${fast.ok ? '' : `${fast.code}: ${fast.message}`}` : `schema refuses (${ref.code}: ${ref.message}), fast path accepts ${JSON.stringify(fast.ok ? fast.value : null)?.slice(0, 300)}`;
  if (ref.ok && fast.ok) {
    try {
      assert.deepStrictEqual(fast.value, ref.value);
    } catch (err) {
      return `different results: ${(err as Error).message.slice(0, 600)}`;
    }
    // key order is not compared: the fast path returns the parsed objects as sent (the
    // registry, its one caller, reads fields by name), zod builds them in its schema's order
    return null;
  }
  if (!ref.ok && !fast.ok) {
    if (!ref.fleet || !fast.fleet) return `not a FleetError: schema ${ref.code}, fast ${fast.code}`;
    if (ref.code !== fast.code) return `different codes: schema ${ref.code}, fast ${fast.code}`;
    if (ref.message !== fast.message) return `different messages: schema "${ref.message}", fast "${fast.message}"`;
  }
  return null;
}

function show(bytes: Buffer): string {
  const s = bytes.toString('utf8');
  return JSON.stringify(s.length > 400 ? `${s.slice(0, 400)}… (${bytes.length} bytes)` : s);
}

const PER_SEED = 10_000;
const SEEDS = process.env.FLEETLET_FUZZ_SEED ? [Number(process.env.FLEETLET_FUZZ_SEED)] : [0x7e1e, 0xfa57];

test(`telemetry fast path: ${PER_SEED * SEEDS.length} generated payloads plus fixed boundaries — same result as the schema decode, or the same error`, (t) => {
  const counts: Record<Gen['kind'], { accepted: number; refused: number }> = {
    valid: { accepted: 0, refused: 0 },
    'valid-extra': { accepted: 0, refused: 0 },
    'invalid-field': { accepted: 0, refused: 0 },
    'invalid-text': { accepted: 0, refused: 0 },
    boundary: { accepted: 0, refused: 0 },
  };
  const codes = new Set<string>();
  const diverged: string[] = [];
  // the scanner (scanTelemetry): when it answers, the same message as the schema decode; it
  // never answers for a refused one; its sample objects are reused from payload to payload
  const scanned = new ScannedTelemetry();
  let scannedValid = 0;
  const check = (g: Gen, where: string) => {
    const ref = outcome(() => decodeMessage('telemetry', g.bytes));
    const fast = outcome(() => decodeTelemetryFast(g.bytes));
    const why = disagreement(ref, fast);
    if (why) diverged.push(`${where} [${g.kind}: ${g.what}] ${why}\n  payload ${show(g.bytes)}`);
    if (scanTelemetry(g.bytes, scanned)) {
      const whyScan = disagreement(ref, { ok: true, value: scanned.toBatch() });
      if (whyScan) diverged.push(`${where} [${g.kind}: ${g.what}] scanner: ${whyScan}\n  payload ${show(g.bytes)}`);
      else scannedValid++;
    }
    if (ref.ok) counts[g.kind].accepted++;
    else {
      counts[g.kind].refused++;
      codes.add(String(ref.code));
    }
  };
  for (const g of boundaries()) check(g, 'fixed');
  for (const seed of SEEDS) {
    const r = makeRand(seed);
    for (let i = 0; i < PER_SEED; i++) check(generate(r), `seed 0x${seed.toString(16)} #${i}`);
  }
  assert.equal(diverged.length, 0, `${diverged.length} divergences (FLEETLET_FUZZ_SEED=<seed> reruns one seed); first ones:\n${diverged.slice(0, 8).join('\n')}`);

  t.diagnostic(`schema outcomes by generator intent: ${JSON.stringify(counts)}`);
  // the generator must reach both sides often, or the test proves little
  const total = PER_SEED * SEEDS.length;
  assert.ok(counts.valid.accepted > total * 0.25, JSON.stringify(counts));
  assert.ok(counts['valid-extra'].accepted > total * 0.05, JSON.stringify(counts));
  assert.ok(counts['invalid-field'].refused > total * 0.25, JSON.stringify(counts));
  assert.ok(counts['invalid-text'].refused > total * 0.08, JSON.stringify(counts));
  // every refusal is the schema's one code
  assert.deepEqual([...codes], ['FLEET_MSG_INVALID']);
  // this generator writes most strings with non-ASCII characters or escapes, which the scanner
  // leaves to decodeTelemetryFast; it must still have answered for many (the next test has the
  // common form, where it answers for every one)
  t.diagnostic(`scanner answered for ${scannedValid} of ${counts.valid.accepted} valid payloads`);
  assert.ok(scannedValid > counts.valid.accepted * 0.05, `scanner answered for ${scannedValid} of ${counts.valid.accepted} valid payloads`);
});

test('the scanner answers for the telemetry gateways and agents write, with the schema decode\'s result', () => {
  const r = makeRand(0x5ca7);
  const scanned = new ScannedTelemetry();
  const names = ['temperature', 'humidity', 'cpu.util', 'mem.used', 'disk./var.free', 'rssi'];
  for (let i = 0; i < 3000; i++) {
    const samples: Sample[] = [];
    for (let k = r.int(8); k > 0; k--) {
      const s: Sample = { n: r.pick(names), t: 1_795_400_000_000 + r.int(1_000_000) };
      const kind = r.int(4);
      if (kind === 0) s.vs = r.pick(['ok', 'degraded', '', 'a b c']);
      else if (kind === 1) s.vb = r.chance(0.5);
      else if (kind === 2) s.v = (r.int(2_000_000) - 1_000_000) / 1000;
      else s.v = r.int(1 << 30);
      if (r.chance(0.6)) s.u = r.pick(['Cel', '%RH', '%', 'B', 's', 'dBm']);
      samples.push(s);
    }
    // a gateway's item (telemetryJson) and an agent's message (encodeMessage)
    for (const bytes of [Buffer.from(telemetryJson(String(1_795_400_000_000_000 + i), 1_795_400_000_000 + i, samples)), encodeMessage({ v: 1, mid: String(i + 1), ts: 1_795_400_000_000, samples })]) {
      assert.ok(scanTelemetry(bytes, scanned), `not scanned: ${bytes.toString()}`);
      assert.deepStrictEqual(scanned.toBatch(), decodeMessage('telemetry', bytes));
    }
  }
});
