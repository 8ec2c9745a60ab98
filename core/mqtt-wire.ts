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
