import { test } from 'node:test';
import assert from 'node:assert/strict';
import { isFleetError } from '../../core/errors.ts';
import { telemetryJson } from '../../core/messages.ts';
import { decodeTelemetry, decodeTelemetryForRelay } from '../../firmware-bridge/codecs.ts';
import { decodeSenmlJson, type SenmlDecodeOptions } from '../../firmware-bridge/senml.ts';
import { transcodeSenmlJson } from '../../firmware-bridge/senml-transcode.ts';
import { encodeReadingSenmlJson } from '../../esp32-sim/reading.ts';
import { rng } from '../helpers.ts';

/**
 * Differential test of the gateway's SenML JSON fast path (firmware-bridge/senml-transcode.ts)
 * against the decoder it stands in for: whenever the fast path returns a result, it is exactly
 * JSON.stringify(decodeSenmlJson(payload)) with the same sample count, and it returns null
 * whenever decodeSenmlJson refuses the payload. Payloads are written as JSON text (field order,
 * duplicate fields, whitespace, escapes and number notation chosen here), and some are damaged
 * as bytes. The test also asserts that the fast path is taken for the common forms, so it
 * cannot pass by always falling back. FLEETLET_FUZZ_SEED reruns one seed.
 */

const NOW = 1_795_400_000_000;
const OPTS: SenmlDecodeOptions = { now: NOW };

type Outcome = { ok: true; json: string; count: number } | { ok: false; code: string };

function generic(payload: Buffer, opts: SenmlDecodeOptions): Outcome {
  try {
    const samples = decodeSenmlJson(payload, opts);
    return { ok: true, json: JSON.stringify(samples), count: samples.length };
  } catch (err) {
    assert.ok(isFleetError(err), `decodeSenmlJson threw a non-FleetError: ${String(err)}`);
    return { ok: false, code: err.code };
  }
}

/** Compare one payload; returns whether the fast path produced a result. */
function check(payload: Buffer, label: string, opts: SenmlDecodeOptions = OPTS): boolean {
  const fast = transcodeSenmlJson(payload, opts);
  if (fast === null) return false;
  const want = generic(payload, opts);
  assert.ok(want.ok, `${label}: fast path accepted what decodeSenmlJson refuses (${want.ok ? '' : want.code}): ${payload.toString('latin1')}`);
  assert.equal(fast.json, want.json, `${label}: ${payload.toString('latin1')}`);
  assert.equal(fast.count, want.count, label);
  return true;
}

// ------------------------------------------------------------------ fixed cases

test('the simulator\'s readings take the fast path and equal the generic decode', () => {
  for (let i = 0; i < 500; i++) {
    const p = encodeReadingSenmlJson({ t: NOW - 5000 + i * 7, temperature: Math.round((18 + i / 37) * 100) / 100, humidity: Math.round((40 + i / 13) * 10) / 10, rssi: -40 - (i % 50), uptime: i * 13, seq: i });
    assert.ok(check(p, `reading ${i}`), `reading ${i} fell back: ${p.toString()}`);
  }
});

test('RFC 8428 forms take the fast path: base fields carried, relative times, units, string and boolean values', () => {
  const cases = [
    '[{"n":"urn:dev:ow:10e2073a01080063","u":"Cel","v":23.1}]', // §5.1.1, relative time 0: now
    '[{"bn":"urn:dev:ow:10e2073a01080063:","n":"voltage","u":"V","v":120.1},{"n":"current","u":"A","v":1.2}]',
    '[{"bn":"urn:dev:ow:10e2073a0108006:","bt":1.276020076001e+09,"bu":"A","bver":5,"n":"voltage","u":"V","v":120.1},{"n":"current","t":-5,"v":1.2},{"n":"current","t":-4,"v":1.3}]',
    '[{"bn":"dev1/","bt":1795400000.5,"bv":10,"n":"a","v":1},{"n":"b","v":-2.5,"t":0.25},{"n":"c","vs":"hello world","t":1},{"n":"d","vb":false},{"n":"e","vb":true,"u":"%"}]',
    '[ {"n" : "x" , "v" : 0 } , { "n":"y","v":-0.000001,"t":-1.5 } ]',
    '\n[{"n":"big","v":123456789012345},{"n":"bigger","v":1234567890123456789},{"n":"tiny","v":0.0000001},{"n":"e","v":1E-3},{"n":"z","v":-0}]\r\n',
    '[{"bn":"a","n":"","v":1,"bs":3,"ut":60,"s":1}]',
  ];
  for (const c of cases) assert.ok(check(Buffer.from(c), c), `fell back: ${c}`);
});

test('what the fast path is not sure of falls back, and decodeTelemetryForRelay then gives the generic result or error', () => {
  const fallbacks = [
    '[{"n":"t\\u0065mp","v":1}]', // an escape
    '[{"n":"temp","vs":"caf\u00e9"}]', // non-ASCII
    '\ufeff[{"n":"temp","v":1}]', // a BOM (decodeSenmlJson's TextDecoder drops it)
    '[{"n":"temp","v":1,"x":{"nested":true}}]', // an unknown field
    '[{"n":"temp","v":1,"v":2}]', // a field twice
    '[{"n":"temp","v":null}]',
    '[{"n":"temp","v":1,"vd":"AAEC"}]',
    '[{"n":"temp","v":1,"foo_":1}]', // must-understand
    '[]',
    '[{"n":"temp","v":1e999}]',
    '[{"n":"temp","v":1}] x',
    '[{"n":"-temp","v":1}]',
    '[{"n":"te mp","v":1}]',
    '[{"n":"temp","u":"d eg","v":1}]',
    '[{"n":"temp","u":"","v":1}]',
    '[{"n":"temp","u":"abcdefghijklmnopq","v":1}]',
    '[{"n":"temp"}]',
    '[{"n":"temp","v":1,"vb":true}]',
    '[{"bver":11,"n":"temp","v":1}]',
    '[{"n":"temp","v":1,"t":-1795400001}]', // before 1970
    '[{"n":"temp","v":01}]',
    '[{"n":"temp","v":1.}]',
    '[{"n":"temp","v":.5}]',
    '[{"n":"temp","v":+1}]',
    '[{"n":"temp","v":1},]',
    '{"n":"temp","v":1}',
  ];
  for (const c of fallbacks) {
    const p = Buffer.from(c);
    assert.equal(transcodeSenmlJson(p, OPTS), null, `expected a fallback: ${c}`);
    let want: unknown;
    let wantErr: unknown;
    try {
      want = JSON.stringify(decodeTelemetry(p, 'sniff', OPTS));
    } catch (err) {
      wantErr = err;
    }
    if (wantErr === undefined) {
      assert.equal(JSON.stringify(decodeTelemetryForRelay(p, 'sniff', OPTS)), want, c);
    } else {
      assert.throws(() => decodeTelemetryForRelay(p, 'sniff', OPTS), (err: unknown) => isFleetError(err) && isFleetError(wantErr) && err.code === wantErr.code && err.message === wantErr.message, c);
    }
  }
});

test('limits: bytes, records and name length fall back exactly where decodeSenmlJson refuses', () => {
  const recs = (n: number) => `[${Array.from({ length: n }, (_, i) => `{"n":"s${i}","v":${i}}`).join(',')}]`;
  assert.notEqual(transcodeSenmlJson(Buffer.from(recs(4)), { ...OPTS, maxRecords: 4 }), null);
  assert.equal(transcodeSenmlJson(Buffer.from(recs(5)), { ...OPTS, maxRecords: 4 }), null);
  const p = Buffer.from(recs(3));
  assert.notEqual(transcodeSenmlJson(p, { ...OPTS, maxBytes: p.length }), null);
  assert.equal(transcodeSenmlJson(p, { ...OPTS, maxBytes: p.length - 1 }), null);
  const name = 'a'.repeat(20);
  assert.ok(check(Buffer.from(`[{"bn":"${name}","n":"${name}","v":1}]`), 'name 40', { ...OPTS, maxNameLength: 40 }));
  assert.equal(transcodeSenmlJson(Buffer.from(`[{"bn":"${name}","n":"${name}a","v":1}]`), { ...OPTS, maxNameLength: 40 }), null);
});

test('relayed through telemetryJson, the fast result is the same fleet message as the samples', () => {
  const p = Buffer.from('[{"bn":"d/","bt":1795400000.25,"n":"a","u":"Cel","v":21.37},{"n":"b","vs":"x y","t":0.5},{"n":"c","vb":true}]');
  const fast = transcodeSenmlJson(p, OPTS);
  assert.ok(fast);
  assert.equal(telemetryJson('1795400000000123', NOW, fast), telemetryJson('1795400000000123', NOW, decodeSenmlJson(p, OPTS)));
});

// ------------------------------------------------------------------ generated

const SEEDS = process.env.FLEETLET_FUZZ_SEED ? [Number(process.env.FLEETLET_FUZZ_SEED)] : [0x5e1, 0xc0ffee, 0x1d2b3, 0x7777];
const PER_SEED = 6000;

/** numbers in many notations, chosen to hit the "own text" rule's edges (Parser.number) */
function numberText(r: (n: number) => number): string {
  const sign = r(4) === 0 ? '-' : '';
  switch (r(10)) {
    case 0:
      return `${sign}${r(1000)}`;
    case 1:
      return `${sign}${r(10)}.${'0'.repeat(r(8))}${r(1000)}`; // 0.000…, trailing zeros or not
    case 2:
      return `${sign}${1 + r(9)}${'0'.repeat(r(22))}`; // up to 23 digits
    case 3:
      return `${sign}${r(100000)}.${r(100000)}${r(3) === 0 ? '0' : ''}`;
    case 4:
      return `${sign}${1 + r(9)}${r(1e9)}${r(1e6)}.${r(1e4)}`; // around 15-20 significant digits
    case 5:
      return `${sign}${r(10)}${['e', 'E'][r(2)]}${['', '+', '-'][r(3)]}${r(30)}`;
    case 6:
      return `${sign}0`;
    case 7:
      return `${sign}${(r(1e6) / 997).toString()}`; // what JS prints, e.g. 123.45678833400201
    case 8:
      return `${sign}1795${r(1e6)}.${r(1000)}`; // a Unix time in seconds
    default:
      return `${sign}${r(1e9) / 8}`;
  }
}

const GOOD_NAMES = ['temp', 'humidity', 'a', 'x1', 'dev/1:t', 'room_3.t-1', 'Z', '9lives'];
const NAMES = [...GOOD_NAMES, '', '-bad', 'sp ace', 'caf\u00e9', 'q"uote', 'back\\slash', 'a'.repeat(130)];
const GOOD_UNITS = ['Cel', '%RH', 'V', 'm/s2', '%', 'dBm', '~x'];
const UNITS = [...GOOD_UNITS, '', 'd eg', 'x'.repeat(17), 'W"', '\u00e9'];
const GOOD_KEYS = ['u', 't', 'bn', 'bt', 'bu', 'bv', 'bver', 'bs', 'ut', 's'];
const KEYS = [...GOOD_KEYS, 'n', 'v', 'vs', 'vb', 'vd', 'x', 'foo_'];

/**
 * One pack's generator: `wild` draws from everything (most packs invalid), a tame one from
 * valid names, units and fields, one value per record (most packs valid, to exercise the
 * fast path's results rather than its refusals).
 */
class Gen {
  constructor(
    private readonly r: (n: number) => number,
    private readonly wild: boolean,
  ) {}

  pick<T>(xs: readonly T[]): T {
    return xs[this.r(xs.length)]!;
  }

  str(s: string): string {
    // JSON.stringify escapes what must be; sometimes an escape where none is needed
    const r = this.r;
    return r(20) === 0 && s.length > 0 ? `"\\u${s.charCodeAt(0).toString(16).padStart(4, '0')}${JSON.stringify(s.slice(1)).slice(1)}` : JSON.stringify(s);
  }

  value(key: string): string {
    const r = this.r;
    if (this.wild && r(30) === 0) return this.pick(['null', '{}', '[1]', '"1"', 'true', '1e999', '01', '.5', '1.', '-']);
    switch (key) {
      case 'n':
      case 'bn':
        return this.str(this.pick(this.wild ? NAMES : GOOD_NAMES));
      case 'u':
      case 'bu':
        return this.str(this.pick(this.wild ? UNITS : GOOD_UNITS));
      case 'vs':
      case 'vd':
        return this.str(this.pick(['ok', 'hello world', '', 'x'.repeat(r(3) === 0 ? 1025 : 10), 'tab\there', '~!@#$%^&*()']));
      case 'vb':
        return r(2) === 0 ? 'true' : 'false';
      case 'bver':
        return String(this.wild ? r(12) : 1 + r(10));
      case 't':
        return r(3) === 0 ? numberText(r) : `${-r(100)}`;
      case 'bt':
        return r(2) === 0 ? `1795${r(1e6)}.${r(1000)}` : numberText(r);
      default:
        return numberText(r);
    }
  }

  ws(): string {
    const r = this.r;
    return r(8) === 0 ? this.pick([' ', '\n', '\t', '\r\n', '  ']) : '';
  }

  record(): string {
    const r = this.r;
    const fields: string[] = [];
    if (!this.wild || r(5) !== 0) fields.push('n');
    if (!this.wild || r(5) !== 0) fields.push(this.pick(['v', 'v', 'v', 'vs', 'vb']));
    for (let k = r(this.wild ? 4 : 3); k > 0; k--) {
      const key = this.pick(this.wild ? KEYS : GOOD_KEYS);
      if (this.wild || !fields.includes(key)) fields.push(key);
    }
    // field order is free in JSON
    for (let i = fields.length - 1; i > 0; i--) {
      const j = r(i + 1);
      [fields[i], fields[j]] = [fields[j]!, fields[i]!];
    }
    return `{${fields.map((k) => `${this.ws()}"${k}"${this.ws()}:${this.ws()}${this.value(k)}${this.ws()}`).join(',')}}`;
  }

  pack(): string {
    const recs: string[] = [];
    for (let i = 1 + this.r(6); i > 0; i--) recs.push(`${this.ws()}${this.record()}${this.ws()}`);
    return `${this.ws()}[${recs.join(',')}]${this.ws()}`;
  }
}

function damage(b: Buffer, r: (n: number) => number): Buffer {
  const out = Buffer.from(b);
  switch (r(4)) {
    case 0:
      out[r(out.length)] = r(256);
      return out;
    case 1:
      return out.subarray(0, r(out.length));
    case 2: {
      const at = r(out.length);
      return Buffer.concat([out.subarray(0, at), Buffer.from([[0x2c, 0x22, 0x5d, 0x7d, 0x5c, 0x30, 0x2e][r(7)]!]), out.subarray(at)]);
    }
    default: {
      const at = r(out.length);
      return Buffer.concat([out.subarray(0, at), out.subarray(at + 1)]);
    }
  }
}

test('generated and damaged packs: the fast path equals decodeSenmlJson whenever it answers, and answers for most valid ones', () => {
  let fast = 0;
  let genericOk = 0;
  let damagedFast = 0;
  for (const seed of SEEDS) {
    const r = rng(seed);
    for (let i = 0; i < PER_SEED; i++) {
      const p = Buffer.from(new Gen(r, r(3) === 0).pack(), 'utf8');
      const label = `seed 0x${seed.toString(16)} #${i}`;
      if (check(p, label)) fast++;
      if (generic(p, OPTS).ok) genericOk++;
      if (check(damage(p, r), `${label} damaged`)) damagedFast++;
    }
  }
  // the generator makes many valid packs and the fast path takes most of them: it is exercised
  assert.ok(genericOk > SEEDS.length * PER_SEED * 0.3, `only ${genericOk} valid packs generated`);
  assert.ok(fast > genericOk * 0.5, `the fast path answered ${fast} of ${genericOk} valid packs`);
  assert.ok(damagedFast > 0, 'no damaged pack took the fast path');
});
