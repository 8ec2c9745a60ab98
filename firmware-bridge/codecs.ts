// the entry without the optional native cbor-extract (it would be bundled into the single
// binary and fail to load there); our packs are small, so the JS decoder is enough
import { Decoder } from 'cbor-x/decode';
import { Encoder } from 'cbor-x/encode';
import { FleetError } from '../core/errors.ts';
import type { Sample, TelemetrySamples } from '../core/messages.ts';
import { CBOR_FORMAT, COMPACT_FORMAT, JSON_FORMAT, SENML_CBOR_FORMAT, SENML_JSON_FORMAT } from './coap.ts';
import { decodeSenmlJson, DEFAULT_SENML_LIMITS, resolveSenmlPack, SENML_MAX_TIME_MS, SENML_NAME_RE, SENML_RELATIVE_TIME_LIMIT, SENML_UNIT_RE, type SenmlDecodeOptions } from './senml.ts';
import { transcodeSenmlJson } from './senml-transcode.ts';

/**
 * Telemetry codecs of the MCU contract (docs/mcu-protocol.md "Telemetry payloads"):
 * SenML JSON (senml.ts), SenML CBOR (RFC 8428 §6) and the fleetlet compact binary
 * form. Every decoder reads bytes straight from the network: bounded in bytes, records,
 * nesting and lengths, and throws nothing but FleetError FLEET_MCU_DECODE (fuzzed in
 * test/firmware-bridge/codecs-fuzz.test.ts).
 */
export type TelemetryFormat = 'senml+json' | 'senml+cbor' | 'compact';

/** First byte of a compact payload: magic and version 1. */
export const COMPACT_MAGIC = 0xf1;
/** Most entries in a sensor table (indexes 0..63). */
export const MAX_SENSORS = 64;
const MAX_SENSOR_NAME = 64;

/** A per-MCU sensor table for the compact form: index → [name, unit ('' for none)]. */
export type SensorTable = ReadonlyArray<readonly [name: string, unit: string]>;

export interface TelemetryDecodeOptions extends SenmlDecodeOptions {
  /** the MCU's sensor table from its last hello (compact form) */
  sensors?: SensorTable | undefined;
}

function fail(message: string): never {
  throw new FleetError('FLEET_MCU_DECODE', message);
}

/**
 * The format of a payload from its first byte (MQTT, and CoAP without Content-Format):
 * `[` (after JSON whitespace) SenML JSON, a CBOR array head (0x80–0x9f) SenML CBOR,
 * 0xF1 compact. Null for anything else.
 */
export function sniffTelemetryFormat(payload: Uint8Array): TelemetryFormat | null {
  for (let i = 0; i < payload.length && i < 64; i++) {
    const b = payload[i]!;
    if (b === 0x20 || b === 0x09 || b === 0x0a || b === 0x0d) continue;
    if (b === 0x5b) return 'senml+json';
    if (i > 0) return null;
    if (b >= 0x80 && b <= 0x9f) return 'senml+cbor';
    if (b === COMPACT_MAGIC) return 'compact';
    return null;
  }
  return null;
}

/**
 * The format a CoAP Content-Format names: a TelemetryFormat, 'sniff' when absent, null
 * when unsupported. The coap package gives registered formats as their names and
 * others as numbers, so both are accepted.
 */
export function telemetryFormatOf(contentFormat: unknown): TelemetryFormat | 'sniff' | null {
  switch (contentFormat) {
    case undefined:
    case null:
      return 'sniff';
    case SENML_JSON_FORMAT:
    case JSON_FORMAT:
    case 'application/senml+json':
    case 'application/json':
      return 'senml+json';
    case SENML_CBOR_FORMAT:
    case CBOR_FORMAT:
    case 'application/senml+cbor':
    case 'application/cbor':
      return 'senml+cbor';
    case COMPACT_FORMAT:
      return 'compact';
    default:
      return null;
  }
}

/**
 * Telemetry for relaying: as decodeTelemetry, but SenML JSON in the common form comes back
 * already as the samples' JSON (firmware-bridge/senml-transcode.ts), the same bytes that
 * JSON.stringify of decodeTelemetry's samples gives. Anything that path is not certain of,
 * and the other formats, are decoded by decodeTelemetry, with its errors.
 */
export function decodeTelemetryForRelay(payload: Uint8Array, format: TelemetryFormat | 'sniff', opts: TelemetryDecodeOptions = {}): TelemetrySamples {
  const f = format === 'sniff' ? sniffTelemetryFormat(payload) : format;
  if (f === 'senml+json') {
    const fast = transcodeSenmlJson(payload, opts);
    if (fast !== null) return fast;
  }
  return decodeTelemetry(payload, f ?? 'sniff', opts);
}

/** Decode telemetry in a known format, or sniffed from its first byte. */
export function decodeTelemetry(payload: Uint8Array, format: TelemetryFormat | 'sniff', opts: TelemetryDecodeOptions = {}): Sample[] {
  const f = format === 'sniff' ? sniffTelemetryFormat(payload) : format;
  switch (f) {
    case 'senml+json':
      return decodeSenmlJson(payload, opts);
    case 'senml+cbor':
      return decodeSenmlCbor(payload, opts);
    case 'compact':
      return decodeCompact(payload, opts);
    default:
      return fail('payload is neither SenML JSON, SenML CBOR nor the compact form (first byte)');
  }
}

// ---------------------------------------------------------------------------------
// SenML CBOR (RFC 8428 §6)

/** RFC 8428 §6 Table 4: integer labels of SenML CBOR. */
export const SENML_CBOR_LABELS: Readonly<Record<string, number>> = Object.freeze({ bver: -1, bn: -2, bt: -3, bu: -4, bv: -5, bs: -6, n: 0, u: 1, v: 2, vs: 3, vb: 4, s: 5, t: 6, ut: 7, vd: 8 });
const LABEL_NAMES = new Map<number, string>(Object.entries(SENML_CBOR_LABELS).map(([k, v]) => [v, k]));

/** bytes: 1024 characters (the longest vs) of up to 4 UTF-8 bytes each */
const MAX_CBOR_STRING = 4096;
const strictUtf8 = new TextDecoder('utf-8', { fatal: true });

/**
 * Structural check of a SenML CBOR pack before cbor-x decodes it: an array (definite or
 * indefinite) of definite-length maps whose keys are integers or text and whose values
 * are integers, floats, text, booleans or byte strings — no tags, no nesting beyond
 * that, lengths within the buffer. So cbor-x never sees input that could make it
 * allocate by a declared length, build objects from tags, or recurse. Returns the
 * record count.
 */
function scanSenmlCbor(buf: Uint8Array, maxRecords: number): number {
  let i = 0;
  const head = (): { major: number; info: number; value: number } => {
    if (i >= buf.length) fail('CBOR: truncated');
    const b = buf[i++]!;
    const major = b >> 5;
    const info = b & 0x1f;
    let value = info;
    if (info === 24) {
      if (i + 1 > buf.length) fail('CBOR: truncated');
      value = buf[i]!;
      i += 1;
    } else if (info === 25) {
      if (i + 2 > buf.length) fail('CBOR: truncated');
      value = (buf[i]! << 8) | buf[i + 1]!;
      i += 2;
    } else if (info === 26) {
      if (i + 4 > buf.length) fail('CBOR: truncated');
      value = ((buf[i]! << 24) >>> 0) + (buf[i + 1]! << 16) + (buf[i + 2]! << 8) + buf[i + 3]!;
      i += 4;
    } else if (info === 27) {
      if (i + 8 > buf.length) fail('CBOR: truncated');
      const hi = ((buf[i]! << 24) >>> 0) + (buf[i + 1]! << 16) + (buf[i + 2]! << 8) + buf[i + 3]!;
      const lo = ((buf[i + 4]! << 24) >>> 0) + (buf[i + 5]! << 16) + (buf[i + 6]! << 8) + buf[i + 7]!;
      i += 8;
      // only floats (major 7) may use 8 bytes; integers must be JavaScript-safe
      value = major === 7 ? 0 : hi * 2 ** 32 + lo;
      if (major !== 7 && (hi >= 2 ** 21 || !Number.isSafeInteger(value))) fail('CBOR: integer beyond 2^53');
    } else if (info === 31) {
      value = -1; // indefinite length
    } else if (info > 27) {
      fail('CBOR: reserved additional information');
    }
    return { major, info, value };
  };
  const skipString = (len: number, text: boolean): string | undefined => {
    if (len < 0) fail('CBOR: indefinite-length strings are not accepted');
    if (len > MAX_CBOR_STRING) fail(`CBOR: string of ${len} bytes exceeds ${MAX_CBOR_STRING}`);
    if (i + len > buf.length) fail('CBOR: truncated string');
    let decoded: string | undefined;
    if (text) {
      // RFC 8949 §3.1: a text string that is not UTF-8 is not well-formed (cbor-x would
      // make U+FFFD of it; the JSON path refuses it too)
      try {
        decoded = strictUtf8.decode(buf.subarray(i, i + len));
      } catch {
        fail('CBOR: a text string is not valid UTF-8');
      }
    }
    i += len;
    return decoded;
  };
  const scalar = (what: 'key' | 'value'): void => {
    const h = head();
    switch (h.major) {
      case 0:
      case 1:
        if (h.value < 0) fail('CBOR: indefinite integer');
        // by value, however it is encoded: 0x02 and 0x18 0x02 are the same label
        if (what === 'key') lastKey = `${h.major}:${h.value}`;
        return;
      case 2:
        if (what === 'key') fail('CBOR: byte string as a label');
        skipString(h.value, false);
        return;
      case 3: {
        const text = skipString(h.value, true);
        if (what === 'key') lastKey = `t:${text}`;
        return;
      }
      case 7:
        if (what === 'key') fail('CBOR: simple value or float as a label');
        if (h.info === 20 || h.info === 21 || h.info === 25 || h.info === 26 || h.info === 27) return;
        return fail('CBOR: only true, false and floats are accepted as simple values');
      default:
        return fail(`CBOR: major type ${h.major} (${h.major === 6 ? 'tag' : 'nested array or map'}) not accepted in a record`);
    }
  };
  let lastKey = '';
  const top = head();
  if (top.major !== 4) fail('CBOR: a SenML pack must be an array');
  let records = 0;
  const indefinite = top.value < 0;
  if (!indefinite && top.value > maxRecords) fail(`${top.value} records exceed the limit of ${maxRecords}`);
  for (;;) {
    if (indefinite) {
      if (i >= buf.length) fail('CBOR: truncated array');
      if (buf[i] === 0xff) {
        i++;
        break;
      }
    } else if (records === top.value) break;
    if (++records > maxRecords) fail(`more than ${maxRecords} records`);
    const m = head();
    if (m.major !== 5 || m.value < 0) fail(`SenML record ${records - 1}: must be a definite-length map`);
    if (m.value > 32) fail(`SenML record ${records - 1}: ${m.value} fields`);
    const keys = new Set<string>();
    for (let k = 0; k < m.value; k++) {
      scalar('key');
      // cbor-x keeps the last of duplicate keys; RFC 8949 §5.6 calls such a map invalid
      if (keys.has(lastKey)) fail(`SenML record ${records - 1}: a label appears twice`);
      keys.add(lastKey);
      scalar('value');
    }
  }
  if (i !== buf.length) fail('CBOR: bytes after the pack');
  return records;
}

const cborDecoder = new Decoder({ mapsAsObjects: false, useRecords: false });
const cborEncoder = new Encoder({ mapsAsObjects: false, useRecords: false, useFloat32: 0 });

/** Decode a SenML CBOR pack into resolved samples; FLEET_MCU_DECODE on anything malformed. */
export function decodeSenmlCbor(payload: Uint8Array, opts: SenmlDecodeOptions = {}): Sample[] {
  const maxBytes = opts.maxBytes ?? DEFAULT_SENML_LIMITS.maxBytes;
  const maxRecords = opts.maxRecords ?? DEFAULT_SENML_LIMITS.maxRecords;
  if (payload.byteLength > maxBytes) fail(`payload of ${payload.byteLength} bytes exceeds ${maxBytes}`);
  scanSenmlCbor(payload, maxRecords);
  let decoded: unknown;
  try {
    decoded = cborDecoder.decode(payload);
  } catch (err) {
    throw new FleetError('FLEET_MCU_DECODE', `CBOR: ${(err as Error).message}`, { cause: err });
  }
  if (!Array.isArray(decoded)) fail('CBOR: a SenML pack must be an array');
  const pack = decoded.map((rec: unknown, index: number) => {
    if (!(rec instanceof Map)) fail(`SenML record ${index}: must be a map`);
    // no prototype: a "__proto__" label is a field like any other (refused as must-understand, as in JSON)
    const out: Record<string, unknown> = Object.create(null) as Record<string, unknown>;
    for (const [k, v] of rec) {
      let name: string | undefined;
      if (typeof k === 'number') name = LABEL_NAMES.get(k);
      else if (typeof k === 'string') name = k;
      if (name === undefined) {
        // RFC 8428 §6: unknown integer labels are ignored like unknown JSON fields
        continue;
      }
      if (Object.prototype.hasOwnProperty.call(out, name)) fail(`SenML record ${index}: label ${name} appears twice`);
      if (v instanceof Uint8Array || Buffer.isBuffer(v)) {
        out[name] = name === 'vd' ? true : v; // vd is refused by the resolver; any other bytes fail their type check
        continue;
      }
      out[name] = typeof v === 'bigint' ? fail(`SenML record ${index}: integer beyond 2^53`) : v;
    }
    return out;
  });
  return resolveSenmlPack(pack, { maxRecords, maxNameLength: opts.maxNameLength ?? DEFAULT_SENML_LIMITS.maxNameLength, now: opts.now ?? Date.now() });
}

/**
 * Encode samples as SenML CBOR with integer labels (what the simulator sends): base
 * time on the first record, offsets on the others.
 */
export function encodeSenmlCbor(samples: readonly Sample[], opts: { baseName?: string } = {}): Buffer {
  const first = samples[0];
  const L = SENML_CBOR_LABELS;
  const records = samples.map((s, i) => {
    const m = new Map<number, unknown>();
    if (i === 0 && opts.baseName) m.set(L.bn!, opts.baseName);
    if (i === 0) m.set(L.bt!, first!.t / 1000);
    m.set(L.n!, s.n);
    if (s.u !== undefined) m.set(L.u!, s.u);
    if (s.v !== undefined) m.set(L.v!, s.v);
    else if (s.vs !== undefined) m.set(L.vs!, s.vs);
    else if (s.vb !== undefined) m.set(L.vb!, s.vb);
    if (i > 0 && s.t !== first!.t) m.set(L.t!, (s.t - first!.t) / 1000);
    return m;
  });
  return Buffer.from(cborEncoder.encode(records));
}

// ---------------------------------------------------------------------------------
// Compact binary (docs/mcu-protocol.md "Compact binary")

export const COMPACT_TYPE = { F32: 0, F64: 1, I8: 2, I16: 3, I32: 4, FALSE: 5, TRUE: 6, U16_CENTI: 7 } as const;
const VALUE_BYTES = [4, 8, 1, 2, 4, 0, 0, 2];
const FLAG_BASE_TIME = 1;
const FLAG_TABLE = 2;
const TYPE_HAS_TIME = 0x10;

/** Validate a sensor table (from a hello or an inline table); FLEET_MCU_DECODE when it is not one. */
export function checkSensorTable(table: unknown): SensorTable {
  if (!Array.isArray(table) || table.length === 0 || table.length > MAX_SENSORS) fail(`a sensor table has 1 to ${MAX_SENSORS} entries`);
  return table.map((e: unknown, i) => {
    if (!Array.isArray(e) || e.length !== 2 || typeof e[0] !== 'string' || typeof e[1] !== 'string') fail(`sensor ${i}: must be [name, unit]`);
    const [name, unit] = e as [string, string];
    if (name.length === 0 || name.length > MAX_SENSOR_NAME || !SENML_NAME_RE.test(name)) fail(`sensor ${i}: bad name`);
    if (unit !== '' && !SENML_UNIT_RE.test(unit)) fail(`sensor ${i}: bad unit`);
    return [name, unit] as const;
  });
}

/** Decode the compact binary form; names come from the inline table or `opts.sensors`. */
export function decodeCompact(payload: Uint8Array, opts: TelemetryDecodeOptions = {}): Sample[] {
  const maxBytes = opts.maxBytes ?? DEFAULT_SENML_LIMITS.maxBytes;
  const maxRecords = opts.maxRecords ?? DEFAULT_SENML_LIMITS.maxRecords;
  const now = opts.now ?? Date.now();
  const buf = Buffer.from(payload.buffer, payload.byteOffset, payload.byteLength);
  if (buf.length > maxBytes) fail(`payload of ${buf.length} bytes exceeds ${maxBytes}`);
  if (buf.length < 2 || buf[0] !== COMPACT_MAGIC) fail('compact: bad header');
  const flags = buf[1]!;
  if ((flags & ~(FLAG_BASE_TIME | FLAG_TABLE)) !== 0) fail('compact: unknown flags');
  let i = 2;
  let baseMs = now;
  if (flags & FLAG_BASE_TIME) {
    if (i + 4 > buf.length) fail('compact: truncated base time');
    const bt = buf.readUInt32BE(i);
    i += 4;
    if (bt < SENML_RELATIVE_TIME_LIMIT) fail('compact: base time must be absolute Unix seconds');
    baseMs = bt * 1000;
  }
  let table: SensorTable | undefined = opts.sensors;
  if (flags & FLAG_TABLE) {
    if (i >= buf.length) fail('compact: truncated sensor table');
    const count = buf[i++]!;
    if (count === 0 || count > MAX_SENSORS) fail(`compact: sensor table of ${count} entries`);
    const entries: Array<[string, string]> = [];
    for (let k = 0; k < count; k++) {
      if (i >= buf.length) fail('compact: truncated sensor table');
      const nl = buf[i++]!;
      if (i + nl + 1 > buf.length) fail('compact: truncated sensor name');
      const name = buf.toString('latin1', i, i + nl);
      i += nl;
      const ul = buf[i++]!;
      if (i + ul > buf.length) fail('compact: truncated sensor unit');
      const unit = buf.toString('latin1', i, i + ul);
      i += ul;
      entries.push([name, unit]);
    }
    table = checkSensorTable(entries);
  }
  const out: Sample[] = [];
  while (i < buf.length) {
    if (out.length >= maxRecords) fail(`compact: more than ${maxRecords} records`);
    if (i + 2 > buf.length) fail('compact: truncated record');
    const index = buf[i++]!;
    const type = buf[i++]!;
    const vt = type & 0x0f;
    if ((type & ~(0x0f | TYPE_HAS_TIME)) !== 0 || vt >= VALUE_BYTES.length) fail(`compact: record ${out.length}: unknown type ${type}`);
    const entry = table?.[index];
    if (!entry) fail(`compact: record ${out.length}: sensor index ${index} is not in the sensor table (send hello again)`);
    const size = VALUE_BYTES[vt]!;
    if (i + size > buf.length) fail(`compact: record ${out.length}: truncated value`);
    const sample: Sample = { n: entry[0], t: 0 };
    switch (vt) {
      case COMPACT_TYPE.F32:
        sample.v = buf.readFloatBE(i);
        break;
      case COMPACT_TYPE.F64:
        sample.v = buf.readDoubleBE(i);
        break;
      case COMPACT_TYPE.I8:
        sample.v = buf.readInt8(i);
        break;
      case COMPACT_TYPE.I16:
        sample.v = buf.readInt16BE(i);
        break;
      case COMPACT_TYPE.I32:
        sample.v = buf.readInt32BE(i);
        break;
      case COMPACT_TYPE.FALSE:
        sample.vb = false;
        break;
      case COMPACT_TYPE.TRUE:
        sample.vb = true;
        break;
      case COMPACT_TYPE.U16_CENTI:
        sample.v = buf.readUInt16BE(i) / 100;
        break;
    }
    i += size;
    if (sample.v !== undefined && !Number.isFinite(sample.v)) fail(`compact: record ${out.length}: value is not finite`);
    let t = baseMs;
    if (type & TYPE_HAS_TIME) {
      if (i + 2 > buf.length) fail(`compact: record ${out.length}: truncated time offset`);
      t += buf.readInt16BE(i) * 1000;
      i += 2;
    }
    t = Math.round(t);
    if (!Number.isSafeInteger(t) || t < 0 || t > SENML_MAX_TIME_MS) fail(`compact: record ${out.length}: time out of range`);
    sample.t = t;
    if (entry[1] !== '') sample.u = entry[1];
    out.push(sample);
  }
  return out;
}

export interface CompactEncodeOptions {
  /** the sensor table the gateway knows (from the hello); sample names must be in it */
  table: SensorTable;
  /** put the table into the message too (flag bit 1) */
  inlineTable?: boolean;
  /** leave out the base time: times become offsets from the gateway's "now" (an MCU without a clock) */
  noClock?: boolean;
}

/** Encode samples in the compact form (the simulator; firmware does the same in C). */
export function encodeCompact(samples: readonly Sample[], opts: CompactEncodeOptions): Buffer {
  const index = new Map<string, number>();
  opts.table.forEach(([name], i) => index.set(name, i));
  const first = samples[0];
  const base = first && !opts.noClock ? Math.floor(first.t / 1000) : 0;
  const parts: number[] = [COMPACT_MAGIC, (base ? FLAG_BASE_TIME : 0) | (opts.inlineTable ? FLAG_TABLE : 0)];
  const push = (b: Buffer) => parts.push(...b);
  if (base) {
    const b = Buffer.alloc(4);
    b.writeUInt32BE(base);
    push(b);
  }
  if (opts.inlineTable) {
    parts.push(opts.table.length);
    for (const [name, unit] of opts.table) {
      parts.push(name.length, ...Buffer.from(name, 'latin1'), unit.length, ...Buffer.from(unit, 'latin1'));
    }
  }
  for (const s of samples) {
    const idx = index.get(s.n);
    if (idx === undefined) throw new FleetError('FLEET_MCU_DECODE', `sample ${s.n} is not in the sensor table`);
    let vt: number;
    let value = Buffer.alloc(0);
    if (s.vb !== undefined) vt = s.vb ? COMPACT_TYPE.TRUE : COMPACT_TYPE.FALSE;
    else if (s.v === undefined) throw new FleetError('FLEET_MCU_DECODE', `sample ${s.n}: the compact form carries numbers and booleans only`);
    else if (Number.isInteger(s.v) && s.v >= -128 && s.v <= 127) {
      vt = COMPACT_TYPE.I8;
      value = Buffer.alloc(1);
      value.writeInt8(s.v);
    } else if (Number.isInteger(s.v) && s.v >= -32768 && s.v <= 32767) {
      vt = COMPACT_TYPE.I16;
      value = Buffer.alloc(2);
      value.writeInt16BE(s.v);
    } else if (Number.isInteger(s.v) && s.v >= -(2 ** 31) && s.v < 2 ** 31) {
      vt = COMPACT_TYPE.I32;
      value = Buffer.alloc(4);
      value.writeInt32BE(s.v);
    } else if (Math.fround(s.v) === s.v) {
      vt = COMPACT_TYPE.F32;
      value = Buffer.alloc(4);
      value.writeFloatBE(s.v);
    } else {
      vt = COMPACT_TYPE.F64;
      value = Buffer.alloc(8);
      value.writeDoubleBE(s.v);
    }
    const offsetS = opts.noClock ? Math.round((s.t - (first?.t ?? s.t)) / 1000) : Math.round(s.t / 1000) - base;
    const hasTime = offsetS !== 0 && !opts.noClock ? true : opts.noClock ? offsetS !== 0 : false;
    parts.push(idx, vt | (hasTime ? TYPE_HAS_TIME : 0));
    push(value);
    if (hasTime) {
      if (offsetS < -32768 || offsetS > 32767) throw new FleetError('FLEET_MCU_DECODE', `sample ${s.n}: time offset ${offsetS} s does not fit 16 bits`);
      const t = Buffer.alloc(2);
      t.writeInt16BE(offsetS);
      push(t);
    }
  }
  return Buffer.from(parts);
}
