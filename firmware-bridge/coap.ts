import { isDeviceId } from '../core/topics.ts';
import { MCU_DOWN_CHANNELS, MCU_UP_CHANNELS, type McuChannel } from './topics.ts';

/**
 * The CoAP side of the MCU contract (docs/mcu-protocol.md). Paths mirror the MQTT
 * topics; the app-level MAC and counter (auth.ts) travel as Uri-Query options so
 * the payload stays plain SenML and a request can be typed by hand with
 * libcoap's `coap-client-notls`:
 *
 *   POST coap://gateway/mcu/v1/{mcuId}/t?c={counter}&m={mac}    telemetry
 *   POST coap://gateway/mcu/v1/{mcuId}/hello|ack?c=..&m=..        version report, command ack
 *   POST|PUT coap://gateway/mcu/v1/{mcuId}/log?c=..&m=..          upload, Block1
 *   GET  coap://gateway/mcu/v1/{mcuId}/cmd?c=..&m=..              mailbox, Observe
 *   GET  coap://gateway/mcu/v1/{mcuId}/fw?c=..&m=..[&h=..]        firmware, Block2
 *
 * Responses: 2.04 Changed once the gateway stored the message in its outbox (not
 * before: 2.04 is the MCU's signal that it may forget it), 4.00 payload not SenML,
 * 4.01 MAC or counter refused, 4.03 id not allowed (e.g. the gateway's own), 4.04 unknown path, 4.05 wrong method, 4.13 too large,
 * 4.15 unsupported content format, 5.03 gateway cannot store right now (retry later).
 * Error responses carry the FleetError code as diagnostic payload (RFC 7252 §5.5.2).
 */
export const COAP_PATH_ROOT = ['mcu', 'v1'] as const;
export const COAP_QUERY_COUNTER = 'c';
export const COAP_QUERY_MAC = 'm';
/** optional on GET fw: the first 16 hex digits of the image sha256 the MCU is downloading */
export const COAP_QUERY_IMAGE = 'h';

export const COAP_CODES = {
  CHANGED: '2.04',
  CONTENT: '2.05',
  CONTINUE: '2.31',
  BAD_OPTION: '4.02',
  INCOMPLETE: '4.08',
  PRECONDITION_FAILED: '4.12',
  BAD_REQUEST: '4.00',
  UNAUTHORIZED: '4.01',
  FORBIDDEN: '4.03',
  NOT_FOUND: '4.04',
  METHOD_NOT_ALLOWED: '4.05',
  REQUEST_TOO_LARGE: '4.13',
  UNSUPPORTED_FORMAT: '4.15',
  SERVICE_UNAVAILABLE: '5.03',
} as const;

/** Content formats accepted for telemetry (RFC 8428 §12.3: 110 application/senml+json; 50 application/json). */
export const SENML_JSON_FORMAT = 110;
export const JSON_FORMAT = 50;
/** RFC 8428 §12.3: application/senml+cbor; RFC 7049: application/cbor */
export const SENML_CBOR_FORMAT = 112;
export const CBOR_FORMAT = 60;
/** The fleetlet compact binary telemetry form (docs/mcu-protocol.md), experimental range (RFC 7252 §12.3). */
export const COMPACT_FORMAT = 65001;
export const TEXT_FORMAT = 0;
export const OCTET_STREAM_FORMAT = 42;

/** Uri-Path of one MCU resource, e.g. `/mcu/v1/esp-1/t`. */
export function coapPath(mcuId: string, resource: McuChannel): string {
  return `/${COAP_PATH_ROOT.join('/')}/${mcuId}/${resource}`;
}

/** Uri-Query carrying the counter and MAC. */
export function coapAuthQuery(counter: number, mac: string): string {
  return `${COAP_QUERY_COUNTER}=${counter}&${COAP_QUERY_MAC}=${mac}`;
}

export interface ParsedCoapUrl {
  mcuId: string;
  resource: McuChannel;
  counter: string | null;
  mac: string | null;
  /** `h=` when present once (GET fw) */
  image?: string;
}

/** Channels with a CoAP resource (fwreq is MQTT only: CoAP uses Block2 on fw). */
const RESOURCES: ReadonlySet<string> = new Set<string>([...MCU_UP_CHANNELS.filter((c) => c !== 'fwreq'), ...MCU_DOWN_CHANNELS]);

/**
 * Parse the request URL the coap package builds ("/" + Uri-Path segments joined by
 * "/", then "?" + Uri-Query options joined by "&"); null when it is not an MCU resource.
 * A repeated `c` or `m` counts as absent, so a request cannot smuggle two values.
 */
export function parseCoapUrl(url: string): ParsedCoapUrl | null {
  if (url.length > 512) return null;
  const q = url.indexOf('?');
  const path = (q < 0 ? url : url.slice(0, q)).split('/').filter((s) => s.length > 0);
  if (path.length !== 4 || path[0] !== COAP_PATH_ROOT[0] || path[1] !== COAP_PATH_ROOT[1]) return null;
  const mcuId = path[2]!;
  const resource = path[3]!;
  if (!isDeviceId(mcuId) || !RESOURCES.has(resource)) return null;
  let counter: string | null = null;
  let mac: string | null = null;
  let image: string | null = null;
  let counterSeen = 0;
  let macSeen = 0;
  let imageSeen = 0;
  if (q >= 0) {
    for (const part of url.slice(q + 1).split('&')) {
      const eq = part.indexOf('=');
      const k = eq < 0 ? part : part.slice(0, eq);
      const v = eq < 0 ? '' : part.slice(eq + 1);
      if (k === COAP_QUERY_COUNTER) {
        counterSeen++;
        counter = v;
      } else if (k === COAP_QUERY_MAC) {
        macSeen++;
        mac = v;
      } else if (k === COAP_QUERY_IMAGE) {
        imageSeen++;
        image = v;
      }
    }
  }
  const out: ParsedCoapUrl = { mcuId, resource: resource as McuChannel, counter: counterSeen === 1 ? counter : null, mac: macSeen === 1 ? mac : null };
  if (imageSeen === 1 && image !== null) out.image = image;
  return out;
}

export interface CoapDatagramInfo {
  /** message type: 0 CON, 1 NON, 2 ACK, 3 RST */
  type: number;
  /** "c.dd", e.g. "0.02" for POST */
  code: string;
  /** option numbers present, in order */
  options: number[];
  payloadLength: number;
}

/** CoAP option numbers used in checks (RFC 7252 §5.10, RFC 7959 §2.1). */
export const COAP_OPTION = { OBSERVE: 6, URI_PATH: 11, CONTENT_FORMAT: 12, MAX_AGE: 14, URI_QUERY: 15, BLOCK2: 23, BLOCK1: 27, SIZE2: 28, SIZE1: 60, REQUEST_TAG: 292 } as const;

/**
 * Scan a raw CoAP datagram's header and options (RFC 7252 §3) without decoding
 * values. The gateway runs this before the coap package sees a datagram, to refuse
 * what the package handles unsafely (Block1 reassembly keeps unbounded state per
 * token). Returns null for anything that is not well-formed CoAP; never throws.
 */
export function scanCoapDatagram(buf: Uint8Array): CoapDatagramInfo | null {
  const head = coapHead(buf);
  if (!head) return null;
  const codeByte = buf[1]!;
  const options: number[] = [];
  const payloadAt = walkCoapOptions(buf, 4 + head.tkl, (number) => void options.push(number));
  if (payloadAt === null) return null;
  return { type: head.type, code: `${codeByte >> 5}.${String(codeByte & 0x1f).padStart(2, '0')}`, options, payloadLength: buf.length - payloadAt };
}

/** Version 1 and a token length of at most 8 that fits: the fixed header (RFC 7252 §3). */
function coapHead(buf: Uint8Array): { type: number; tkl: number } | null {
  if (buf.length < 4) return null;
  const b0 = buf[0]!;
  if (b0 >> 6 !== 1) return null; // version must be 1
  const tkl = b0 & 0x0f;
  if (tkl > 8 || 4 + tkl > buf.length) return null; // 9-15 are reserved: a message format error
  return { type: (b0 >> 4) & 0x3, tkl };
}

/**
 * Walk the options from `i` (RFC 7252 §3.1), calling `each` with every option's number and
 * value bounds. Returns where the payload starts (buf.length when there is none), or null on
 * any format error: reserved nibble 15, a truncated extension or value, a number past 65535,
 * or a payload marker followed by nothing. Never throws.
 */
function walkCoapOptions(buf: Uint8Array, i: number, each: (number: number, start: number, end: number) => void): number | null {
  let number = 0;
  const ext = (n: number): number | null => {
    if (n === 13) {
      if (i >= buf.length) return null;
      return buf[i++]! + 13;
    }
    if (n === 14) {
      if (i + 1 >= buf.length) return null;
      const v = ((buf[i]! << 8) | buf[i + 1]!) + 269;
      i += 2;
      return v;
    }
    return n;
  };
  while (i < buf.length) {
    const b = buf[i++]!;
    if (b === 0xff) return i >= buf.length ? null : i;
    if (b >> 4 === 15 || (b & 0x0f) === 15) return null;
    const delta = ext(b >> 4);
    if (delta === null) return null;
    const len = ext(b & 0x0f);
    if (len === null) return null;
    number += delta;
    if (number > 0xffff || i + len > buf.length) return null;
    each(number, i, i + len);
    i += len;
  }
  return buf.length;
}

/** One CoAP option: number and raw value. */
export interface CoapOption {
  number: number;
  value: Buffer;
}

/** A whole CoAP message (RFC 7252 §3), as parsed from or built into a datagram. */
export interface CoapPacket {
  /** 0 CON, 1 NON, 2 ACK, 3 RST */
  type: number;
  /** class * 32 + detail, e.g. 0x44 for 2.04 */
  code: number;
  messageId: number;
  token: Buffer;
  /** in ascending option-number order */
  options: CoapOption[];
  payload: Buffer;
}

/** Parse a datagram into a CoapPacket; null when it is not well-formed CoAP. Never throws. */
export function parseCoapPacket(buf: Buffer): CoapPacket | null {
  const head = coapHead(buf);
  if (!head) return null;
  const pkt: CoapPacket = { type: head.type, code: buf[1]!, messageId: buf.readUInt16BE(2), token: Buffer.from(buf.subarray(4, 4 + head.tkl)), options: [], payload: Buffer.alloc(0) };
  const payloadAt = walkCoapOptions(buf, 4 + head.tkl, (number, start, end) => void pkt.options.push({ number, value: Buffer.from(buf.subarray(start, end)) }));
  if (payloadAt === null) return null;
  pkt.payload = Buffer.from(buf.subarray(payloadAt));
  return pkt;
}

function extended(n: number): { nibble: number; ext: number[] } {
  if (n < 13) return { nibble: n, ext: [] };
  if (n < 269) return { nibble: 13, ext: [n - 13] };
  return { nibble: 14, ext: [(n - 269) >> 8, (n - 269) & 0xff] };
}

/** Build a datagram from a CoapPacket (options are sorted here). */
export function buildCoapPacket(pkt: CoapPacket): Buffer {
  const parts: Buffer[] = [Buffer.from([0x40 | (pkt.type << 4) | pkt.token.length, pkt.code, pkt.messageId >> 8, pkt.messageId & 0xff]), pkt.token];
  let prev = 0;
  for (const opt of [...pkt.options].sort((a, b) => a.number - b.number)) {
    const d = extended(opt.number - prev);
    const l = extended(opt.value.length);
    parts.push(Buffer.from([(d.nibble << 4) | l.nibble, ...d.ext, ...l.ext]), opt.value);
    prev = opt.number;
  }
  if (pkt.payload.length > 0) parts.push(Buffer.from([0xff]), pkt.payload);
  return Buffer.concat(parts);
}

/** Unsigned integer option value (RFC 7252 §3.2 uint: big-endian, no leading zeros). */
export function coapUint(value: Buffer): number {
  let n = 0;
  for (const b of value.subarray(0, 4)) n = n * 256 + b;
  return n;
}

export function coapUintValue(n: number): Buffer {
  if (n === 0) return Buffer.alloc(0);
  const out: number[] = [];
  while (n > 0) {
    out.unshift(n & 0xff);
    n = Math.floor(n / 256);
  }
  return Buffer.from(out);
}

/** A Block1/Block2 option value (RFC 7959 §2.2): block number, more flag, size 16..1024. */
export interface BlockOption {
  num: number;
  more: boolean;
  size: number;
}

export function parseBlockOption(value: Buffer): BlockOption | null {
  if (value.length > 3) return null;
  const v = coapUint(value);
  const szx = v & 7;
  if (szx === 7) return null; // reserved (BERT only over TCP, RFC 8323)
  return { num: v >> 4, more: (v & 8) !== 0, size: 1 << (szx + 4) };
}

export function blockOptionValue(b: BlockOption): Buffer {
  const szx = Math.log2(b.size) - 4;
  if (!Number.isInteger(szx) || szx < 0 || szx > 6) throw new RangeError(`block size ${b.size} is not 16..1024`);
  return coapUintValue((b.num << 4) | (b.more ? 8 : 0) | szx);
}

/** "2.04" → 0x44 */
export function coapCodeByte(code: string): number {
  const [c, d] = code.split('.');
  return (Number(c) << 5) | Number(d);
}

/** The request's Uri-Path and Uri-Query as the coap package renders `req.url`. */
export function coapUrlOf(pkt: CoapPacket): string {
  const path = pkt.options.filter((o) => o.number === COAP_OPTION.URI_PATH).map((o) => o.value.toString('utf8'));
  const query = pkt.options.filter((o) => o.number === COAP_OPTION.URI_QUERY).map((o) => o.value.toString('utf8'));
  return '/' + path.join('/') + (query.length > 0 ? '?' + query.join('&') : '');
}
