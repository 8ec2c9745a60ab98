import { FleetError } from '../core/errors.ts';
import type { Sample } from '../core/messages.ts';

/**
 * SenML in JSON (RFC 8428) ⇄ fleet samples (core/messages.ts Sample).
 *
 * Decoding resolves every record (RFC 8428 §4.6): base name + name, base time + time,
 * base unit, base value + value, carrying base fields forward to later records
 * (§4.1). It reads bytes straight from the network, so it is bounded (payload bytes,
 * records, name length), strict about types, and throws only FleetError
 * FLEET_MCU_DECODE — the caller counts the drop and stays up.
 *
 * What is deliberately not supported yet (refused with a clear message, never
 * silently dropped): data values `vd` and sum-only records `s` (Sample has no field
 * for them), and "must understand" fields ending in `_` (§4.4 requires refusing them).
 * Unknown fields without the `_` suffix are ignored, as §4.4 allows.
 */
export interface SenmlLimits {
  /** largest payload accepted, bytes (default 16384) */
  maxBytes: number;
  /** most records in one pack (default 256) */
  maxRecords: number;
  /** longest resolved name (bn + n), characters; at most 128, the fleet Sample limit (default 128) */
  maxNameLength: number;
}

export const DEFAULT_SENML_LIMITS: Readonly<SenmlLimits> = Object.freeze({ maxBytes: 16 * 1024, maxRecords: 256, maxNameLength: 128 });

export interface SenmlDecodeOptions extends Partial<SenmlLimits> {
  /** "now" in ms since the epoch, for records without time or with relative time (default Date.now()) */
  now?: number;
}

/** RFC 8428 §4.5.3: times below 2^28 s are relative to now; larger ones are absolute Unix seconds. */
export const SENML_RELATIVE_TIME_LIMIT = 2 ** 28;
/** The SenML version this decoder implements (RFC 8428 §4.4, `bver`). */
export const SENML_VERSION = 10;

/** RFC 8428 §4.5.1: names start with a letter or digit and use only these characters. */
export const SENML_NAME_RE = /^[A-Za-z0-9][A-Za-z0-9\-:./_]*$/;
/** Units are short printable tokens ("Cel", "%RH", "m/s2"); 16 is the fleet Sample limit. */
export const SENML_UNIT_RE = /^[\x21-\x7e]{1,16}$/;
export const SENML_MAX_VS = 1024; // fleet Sample limit for string values
export const SENML_MAX_TIME_MS = 253_402_300_799_000; // 9999-12-31T23:59:59Z: anything later is a corrupt clock

const utf8 = new TextDecoder('utf-8', { fatal: true });

function fail(message: string, index?: number): never {
  throw new FleetError('FLEET_MCU_DECODE', index === undefined ? `SenML: ${message}` : `SenML record ${index}: ${message}`, index === undefined ? undefined : { details: { record: index } });
}

function isRecord(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function has(rec: Record<string, unknown>, key: string): boolean {
  return Object.prototype.hasOwnProperty.call(rec, key);
}

function num(rec: Record<string, unknown>, key: string, index: number): number | undefined {
  if (!has(rec, key)) return undefined;
  const v = rec[key];
  // JSON.parse turns 1e999 into Infinity: refuse it like any other non-number
  if (typeof v !== 'number' || !Number.isFinite(v)) fail(`"${key}" must be a finite number`, index);
  return v;
}

function str(rec: Record<string, unknown>, key: string, index: number): string | undefined {
  if (!has(rec, key)) return undefined;
  const v = rec[key];
  if (typeof v !== 'string') fail(`"${key}" must be a string`, index);
  return v;
}

/** Decode a SenML JSON pack into resolved samples; throws FLEET_MCU_DECODE on anything malformed. */
export function decodeSenmlJson(payload: Buffer | Uint8Array | string, opts: SenmlDecodeOptions = {}): Sample[] {
  const maxBytes = opts.maxBytes ?? DEFAULT_SENML_LIMITS.maxBytes;
  const maxRecords = opts.maxRecords ?? DEFAULT_SENML_LIMITS.maxRecords;
  const maxNameLength = Math.min(opts.maxNameLength ?? DEFAULT_SENML_LIMITS.maxNameLength, 128);
  const now = opts.now ?? Date.now();

  const size = typeof payload === 'string' ? Buffer.byteLength(payload) : payload.byteLength;
  if (size > maxBytes) fail(`payload of ${size} bytes exceeds ${maxBytes}`);
  let text: string;
  try {
    text = typeof payload === 'string' ? payload : utf8.decode(payload);
  } catch {
    fail('payload is not valid UTF-8');
  }
  let pack: unknown;
  try {
    pack = JSON.parse(text);
  } catch {
    fail('payload is not JSON');
  }
  return resolveSenmlPack(pack, { maxRecords, maxNameLength, now });
}

/**
 * Resolve a parsed SenML pack (JSON, or CBOR with its labels mapped to the JSON names)
 * into samples (RFC 8428 §4.6). Throws FLEET_MCU_DECODE on anything malformed.
 */
export function resolveSenmlPack(pack: unknown, opts: { maxRecords: number; maxNameLength: number; now: number }): Sample[] {
  const { maxRecords, now } = opts;
  const maxNameLength = Math.min(opts.maxNameLength, 128);
  if (!Array.isArray(pack)) fail('a pack must be an array of records');
  if (pack.length > maxRecords) fail(`${pack.length} records exceed the limit of ${maxRecords}`);

  // base fields carry forward to later records until replaced (RFC 8428 §4.1)
  let bn = '';
  let bt = 0;
  let bu: string | undefined;
  let bv = 0;
  const out: Sample[] = [];

  for (let i = 0; i < pack.length; i++) {
    const rec: unknown = pack[i];
    if (!isRecord(rec)) fail('must be a map (JSON object)', i);
    for (const key of Object.keys(rec)) {
      if (key.endsWith('_')) fail(`must-understand field "${key}" is not supported`, i);
    }
    const bver = num(rec, 'bver', i);
    if (bver !== undefined && (!Number.isInteger(bver) || bver < 1 || bver > SENML_VERSION)) fail(`unsupported SenML version ${bver}`, i);
    const nbn = str(rec, 'bn', i);
    if (nbn !== undefined) bn = nbn;
    const nbt = num(rec, 'bt', i);
    if (nbt !== undefined) bt = nbt;
    const nbu = str(rec, 'bu', i);
    if (nbu !== undefined) bu = nbu;
    const nbv = num(rec, 'bv', i);
    if (nbv !== undefined) bv = nbv;
    num(rec, 'bs', i); // type-checked, not used: sums are not supported yet
    num(rec, 'ut', i);

    const name = bn + (str(rec, 'n', i) ?? '');
    if (name.length === 0) fail('has no name (n or bn)', i);
    if (name.length > maxNameLength) fail(`name of ${name.length} characters exceeds ${maxNameLength}`, i);
    if (!SENML_NAME_RE.test(name)) fail(`name ${JSON.stringify(name.slice(0, 64))} has characters outside [A-Za-z0-9-:./_] or does not start with a letter or digit`, i);

    const unit = str(rec, 'u', i) ?? bu;
    if (unit !== undefined && !SENML_UNIT_RE.test(unit)) fail('unit must be 1 to 16 printable ASCII characters', i);

    const v = num(rec, 'v', i);
    const vs = str(rec, 'vs', i);
    const vbRaw = has(rec, 'vb') ? rec.vb : undefined;
    if (vbRaw !== undefined && typeof vbRaw !== 'boolean') fail('"vb" must be a boolean', i);
    if (has(rec, 'vd')) fail('data values ("vd") are not supported', i);
    num(rec, 's', i);
    const present = (v !== undefined ? 1 : 0) + (vs !== undefined ? 1 : 0) + (vbRaw !== undefined ? 1 : 0);
    if (present === 0) fail('has no value (v, vs or vb)', i);
    if (present > 1) fail('has more than one value field', i);
    if (vs !== undefined && vs.length > SENML_MAX_VS) fail(`string value of ${vs.length} characters exceeds ${SENML_MAX_VS}`, i);

    const t = bt + (num(rec, 't', i) ?? 0);
    // §4.5.3: small (or negative) times are offsets from now, in seconds
    const seconds = t >= SENML_RELATIVE_TIME_LIMIT ? t : now / 1000 + t;
    const ms = Math.round(seconds * 1000);
    if (!Number.isSafeInteger(ms) || ms < 0 || ms > SENML_MAX_TIME_MS) fail(`time ${t} is out of range`, i);

    const sample: Sample = { n: name, t: ms };
    if (v !== undefined) {
      const value = v + bv;
      if (!Number.isFinite(value)) fail('value + base value overflows', i);
      sample.v = value;
    } else if (vs !== undefined) sample.vs = vs;
    else sample.vb = vbRaw as boolean;
    if (unit !== undefined) sample.u = unit;
    out.push(sample);
  }
  return out;
}

export interface SenmlEncodeOptions {
  /** base name put on the first record; sample names must then be relative to it */
  baseName?: string;
}

/**
 * Encode samples as a compact SenML JSON pack: the first sample's time becomes the base
 * time (absolute Unix seconds, ms precision) and every record carries only its offset,
 * which is what an ESP32 with SNTP sends. `decodeSenmlJson(encodeSenmlJson(s))`
 * returns `s` (with names prefixed by `baseName` when one is given).
 */
export function encodeSenmlJson(samples: readonly Sample[], opts: SenmlEncodeOptions = {}): Buffer {
  const first = samples[0];
  if (!first) return Buffer.from('[]');
  const records = samples.map((s, i) => {
    const rec: Record<string, unknown> = {};
    if (i === 0) {
      if (opts.baseName) rec.bn = opts.baseName;
      rec.bt = first.t / 1000;
    }
    rec.n = s.n;
    if (s.u !== undefined) rec.u = s.u;
    if (s.v !== undefined) rec.v = s.v;
    else if (s.vs !== undefined) rec.vs = s.vs;
    else if (s.vb !== undefined) rec.vb = s.vb;
    if (s.t !== first.t) rec.t = (s.t - first.t) / 1000;
    return rec;
  });
  return Buffer.from(JSON.stringify(records));
}
