import { isDeviceId } from '../core/topics.ts';
import { MCU_UP_CHANNELS, type McuUpChannel } from './topics.ts';

/**
 * The CoAP side of the MCU contract (docs/mcu-protocol.md). Paths mirror the MQTT
 * topics; the app-level MAC and counter (auth.ts) travel as Uri-Query options so
 * the payload stays plain SenML and a request can be typed by hand with
 * libcoap's `coap-client-notls`:
 *
 *   POST coap://gateway/mcu/v1/{mcuId}/t?c={counter}&m={mac}    SenML JSON body
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

export const COAP_CODES = {
  CHANGED: '2.04',
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

/** Uri-Path of one MCU resource, e.g. `/mcu/v1/esp-1/t`. */
export function coapPath(mcuId: string, resource: McuUpChannel): string {
  return `/${COAP_PATH_ROOT.join('/')}/${mcuId}/${resource}`;
}

/** Uri-Query carrying the counter and MAC. */
export function coapAuthQuery(counter: number, mac: string): string {
  return `${COAP_QUERY_COUNTER}=${counter}&${COAP_QUERY_MAC}=${mac}`;
}

export interface ParsedCoapUrl {
  mcuId: string;
  resource: McuUpChannel;
  counter: string | null;
  mac: string | null;
}

const UP: ReadonlySet<string> = new Set(MCU_UP_CHANNELS);

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
  if (!isDeviceId(mcuId) || !UP.has(resource)) return null;
  let counter: string | null = null;
  let mac: string | null = null;
  let counterSeen = 0;
  let macSeen = 0;
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
      }
    }
  }
  return { mcuId, resource: resource as McuUpChannel, counter: counterSeen === 1 ? counter : null, mac: macSeen === 1 ? mac : null };
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
export const COAP_OPTION = { URI_PATH: 11, CONTENT_FORMAT: 12, URI_QUERY: 15, BLOCK2: 23, BLOCK1: 27 } as const;

/**
 * Scan a raw CoAP datagram's header and options (RFC 7252 §3) without decoding
 * values. The gateway runs this before the coap package sees a datagram, to refuse
 * what the package handles unsafely (Block1 reassembly keeps unbounded state per
 * token). Returns null for anything that is not well-formed CoAP; never throws.
 */
export function scanCoapDatagram(buf: Uint8Array): CoapDatagramInfo | null {
  if (buf.length < 4) return null;
  const b0 = buf[0]!;
  if (b0 >> 6 !== 1) return null; // version must be 1
  const type = (b0 >> 4) & 0x3;
  const tkl = b0 & 0x0f;
  if (tkl > 8) return null; // 9-15 are reserved: a message format error
  const codeByte = buf[1]!;
  const code = `${codeByte >> 5}.${String(codeByte & 0x1f).padStart(2, '0')}`;
  let i = 4 + tkl;
  if (i > buf.length) return null;
  const options: number[] = [];
  let number = 0;
  while (i < buf.length) {
    const b = buf[i++]!;
    if (b === 0xff) {
      // a payload marker followed by a zero-length payload is a format error (§3)
      if (i >= buf.length) return null;
      return { type, code, options, payloadLength: buf.length - i };
    }
    let delta = b >> 4;
    let len = b & 0x0f;
    if (delta === 15 || len === 15) return null;
    if (delta === 13) {
      if (i >= buf.length) return null;
      delta = buf[i++]! + 13;
    } else if (delta === 14) {
      if (i + 1 >= buf.length) return null;
      delta = ((buf[i]! << 8) | buf[i + 1]!) + 269;
      i += 2;
    }
    if (len === 13) {
      if (i >= buf.length) return null;
      len = buf[i++]! + 13;
    } else if (len === 14) {
      if (i + 1 >= buf.length) return null;
      len = ((buf[i]! << 8) | buf[i + 1]!) + 269;
      i += 2;
    }
    number += delta;
    if (number > 0xffff || i + len > buf.length) return null;
    options.push(number);
    i += len;
  }
  return { type, code, options, payloadLength: 0 };
}
