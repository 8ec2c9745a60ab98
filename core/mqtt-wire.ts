/** Bytes the remaining length `n` takes in a fixed header [MQTT-2.2.3]: 1 to 4. */
export function remainingLengthBytes(n: number): number {
  return n < 0x80 ? 1 : n < 0x4000 ? 2 : n < 0x200000 ? 3 : 4;
}

/** Write the remaining length `n` at `off` (7 bits a byte, low first) [MQTT-2.2.3]; returns the offset after it. */
export function writeRemainingLength(out: Buffer, off: number, n: number): number {
  do {
    let b = n % 128;
    n = Math.floor(n / 128);
    if (n > 0) b |= 0x80;
    out[off++] = b;
  } while (n > 0);
  return off;
}

/** A whole packet: the first byte (type and flags), the remaining length, the body. */
export function mqttFrame(first: number, body: Buffer): Buffer {
  const out = Buffer.allocUnsafe(1 + remainingLengthBytes(body.length) + body.length);
  out[0] = first;
  body.copy(out, writeRemainingLength(out, 1, body.length));
  return out;
}

/** An MQTT fixed header read from a buffer (core/mqtt-wire.ts fixedHeader). */
export type FixedHeader = { kind: 'ok'; start: number; len: number } | { kind: 'more' } | { kind: 'malformed' } | { kind: 'tooLarge'; len: number };

/**
 * The MQTT fixed header at `off` in `buf` [MQTT-2.2.3]: type/flags, then the remaining
 * length in 1-4 bytes of 7 bits. `ok` once the whole packet is buffered (`start` = where its
 * body begins); `more` while it is not; `tooLarge` as soon as the length passes `limit`
 * (before the body arrives); `malformed` for a fifth length byte. Used by the gateway's MCU
 * listener and the simulator's client.
 */
export function fixedHeader(buf: Buffer, off: number, limit: number): FixedHeader {
  let len = 0;
  let mul = 1;
  for (let i = off + 1; i < off + 5 && i < buf.length; ) {
    const b = buf[i++]!;
    len += (b & 0x7f) * mul;
    mul *= 128;
    if (len > limit) return { kind: 'tooLarge', len };
    if ((b & 0x80) === 0) return buf.length - i < len ? { kind: 'more' } : { kind: 'ok', start: i, len };
    if (i === off + 5) return { kind: 'malformed' };
  }
  return { kind: 'more' };
}
