import { FleetError } from './errors.ts';
import type { PayloadWriter } from './outbox.ts';

/**
 * Batch framing: many small fleet messages in one MQTT publish on
 * `fleet/v1/d/{sender}/batch` (docs/topics.md#batches). The hub unpacks a batch, checks
 * each item against the sender's ACL, drops duplicates by (device, mid) and routes
 * every item to its own topic, so consumers see ordinary per-device messages.
 *
 *   0xFB 0x01 | ( varint topicLength | topic (UTF-8) | varint payloadLength | payload )*
 *
 * varint = unsigned LEB128, at most 4 bytes. Items keep their order.
 */
export const BATCH_MAGIC = 0xfb;
export const BATCH_VERSION = 1;
export const MAX_BATCH_ITEMS = 10_000;
const MAX_TOPIC = 1024;

export interface BatchItem {
  topic: string;
  payload: Buffer;
}

function varintSize(n: number): number {
  return n < 0x80 ? 1 : n < 0x4000 ? 2 : n < 0x200000 ? 3 : 4;
}

export function writeVarint(buf: Buffer, off: number, n: number): number {
  while (n >= 0x80) {
    buf[off++] = (n & 0x7f) | 0x80;
    n >>>= 7;
  }
  buf[off++] = n;
  return off;
}

/** Encoded size of one item, for callers that fill a batch up to a byte limit. */
export function batchItemSize(topic: string, payload: Buffer): number {
  const t = Buffer.byteLength(topic);
  return varintSize(t) + t + varintSize(payload.length) + payload.length;
}

export function encodeBatch(items: readonly BatchItem[]): Buffer {
  const w = batchWriter(items);
  const buf = Buffer.allocUnsafe(w.size);
  w.write(buf, 0);
  return buf;
}

/** An item to frame whose payload may still be a string (written as UTF-8). */
export interface BatchItemSource {
  topic: string;
  payload: string | Buffer;
}

/**
 * The batch of `items` (the framing above) as an outbox PayloadWriter: the store writes it
 * straight into the record that keeps it, and string payloads (JSON as built) never become
 * Buffers of their own. encodeBatch is this, written into a Buffer of its own.
 */
export function batchWriter(items: readonly BatchItemSource[]): PayloadWriter {
  const lengths: number[] = new Array(items.length * 2);
  let size = 2;
  for (let i = 0; i < items.length; i++) {
    const it = items[i]!;
    const t = (lengths[2 * i] = Buffer.byteLength(it.topic));
    const p = (lengths[2 * i + 1] = typeof it.payload === 'string' ? Buffer.byteLength(it.payload) : it.payload.length);
    size += varintSize(t) + t + varintSize(p) + p;
  }
  return {
    size,
    write(buf: Buffer, at: number): number {
      buf[at] = BATCH_MAGIC;
      buf[at + 1] = BATCH_VERSION;
      let off = at + 2;
      for (let i = 0; i < items.length; i++) {
        const it = items[i]!;
        off = writeVarint(buf, off, lengths[2 * i]!);
        off += buf.write(it.topic, off, 'utf8');
        off = writeVarint(buf, off, lengths[2 * i + 1]!);
        off += typeof it.payload === 'string' ? buf.write(it.payload, off, 'utf8') : it.payload.copy(buf, off);
      }
      return off;
    },
  };
}

/** Decode a batch; throws FLEET_MSG_INVALID on anything malformed (nothing is half-applied). */
export function decodeBatch(buf: Buffer): BatchItem[] {
  const bad = (why: string) => new FleetError('FLEET_MSG_INVALID', `batch: ${why}`);
  if (buf.length < 2 || buf[0] !== BATCH_MAGIC) throw bad('not a batch (magic)');
  if (buf[1] !== BATCH_VERSION) throw bad(`unsupported version ${buf[1]}`);
  const items: BatchItem[] = [];
  let off = 2;
  const varint = (): number => {
    let n = 0;
    for (let shift = 0; shift < 28; shift += 7) {
      if (off >= buf.length) throw bad('truncated length');
      const b = buf[off++]!;
      n += (b & 0x7f) * 2 ** shift;
      if (b < 0x80) return n;
    }
    throw bad('length too long');
  };
  while (off < buf.length) {
    if (items.length >= MAX_BATCH_ITEMS) throw bad(`more than ${MAX_BATCH_ITEMS} items`);
    const tl = varint();
    if (tl === 0 || tl > MAX_TOPIC || off + tl > buf.length) throw bad('bad topic length');
    const topic = buf.toString('utf8', off, off + tl);
    off += tl;
    const pl = varint();
    if (off + pl > buf.length) throw bad('payload runs past the end');
    items.push({ topic, payload: buf.subarray(off, off + pl) });
    off += pl;
  }
  return items;
}

/**
 * Topic of a record marker: an item that says the `items` items after it are one record of
 * the sender's outbox, stored once and never changed (a gateway's grouped MCU telemetry), with
 * the record's own `mid` from the sender's sequence. The hub then de-duplicates the record as
 * a whole in the sender's window instead of each item in its MCU's (docs/topics.md#records).
 * Never routed: '$' topics are not fleet topics, so a hub that predates markers refuses the
 * marker item alone (a dead letter) and still routes the items.
 */
export const RECORD_TOPIC = '$fleetlet/record';

export interface RecordMarker {
  mid: string;
  items: number;
}

export function recordMarker(mid: string, items: number): BatchItem {
  return { topic: RECORD_TOPIC, payload: Buffer.from(recordMarkerJson(mid, items)) };
}

/** A record marker's payload as a string (for batchWriter). */
export function recordMarkerJson(mid: string, items: number): string {
  return JSON.stringify({ v: 1, mid, items });
}

const MARKER_MID_RE = /^[0-9]{1,20}$/;

/** A marker item's payload read back; null when it is not a well-formed marker. */
export function parseRecordMarker(payload: Buffer): RecordMarker | null {
  if (payload.length > 128) return null;
  let m: unknown;
  try {
    m = JSON.parse(payload.toString('utf8'));
  } catch {
    return null;
  }
  if (typeof m !== 'object' || m === null) return null;
  const { v, mid, items } = m as Record<string, unknown>;
  if (v !== 1 || typeof mid !== 'string' || !MARKER_MID_RE.test(mid)) return null;
  if (typeof items !== 'number' || !Number.isInteger(items) || items < 1 || items > MAX_BATCH_ITEMS) return null;
  return { mid, items };
}

/** Read the `mid` of a fleet message without a full schema check (hub de-duplication). */
export function peekMid(payload: Buffer): string | null {
  // messages are JSON objects written by JSON.stringify; mid is a decimal string
  const i = payload.indexOf('"mid":"');
  if (i < 0) return null;
  const start = i + 7;
  const end = payload.indexOf(0x22, start);
  if (end < 0 || end - start > 20 || end === start) return null;
  for (let k = start; k < end; k++) if (payload[k]! < 0x30 || payload[k]! > 0x39) return null;
  return payload.toString('latin1', start, end);
}

const RECORD_TOPIC_BYTES = Buffer.from(RECORD_TOPIC);

/**
 * Items in a batch payload (the framing above), counted without decoding them; a malformed one
 * counts as MAX_BATCH_ITEMS, so it goes alone. `markers: false` leaves record markers out
 * (messages, not items).
 */
export function countItems(buf: Buffer, markers = true): number {
  let off = 2;
  let n = 0;
  let len = 0;
  const length = (): boolean => {
    len = 0;
    for (let shift = 0; shift < 28; shift += 7) {
      if (off >= buf.length) return false;
      const b = buf[off++]!;
      len += (b & 0x7f) * 2 ** shift;
      if (b < 0x80) return off + len <= buf.length;
    }
    return false;
  };
  while (off < buf.length) {
    if (!length()) return MAX_BATCH_ITEMS;
    const marker = !markers && len === RECORD_TOPIC_BYTES.length && buf.compare(RECORD_TOPIC_BYTES, 0, len, off, off + len) === 0;
    off += len;
    if (!length()) return MAX_BATCH_ITEMS;
    off += len;
    if (!marker) n++;
  }
  return n;
}
