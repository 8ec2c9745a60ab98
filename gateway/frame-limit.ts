import type { Socket } from 'node:net';
import { Duplex, pipeline, Transform, type TransformCallback } from 'node:stream';
import { FleetError } from '../core/errors.ts';

/**
 * A byte bound on incoming MQTT packets. aedes (and mqtt-packet under it) buffers a
 * packet until its declared length has arrived, up to 256 MB, before any hook runs —
 * also before authentication, for CONNECT. This transform reads only the fixed header
 * of each packet ([MQTT-2.2.3] remaining length, a 1-4 byte varint) as bytes pass and
 * fails the stream as soon as a packet declares more than `maxRemainingLength`, so a
 * peer cannot make the gateway buffer more than that. Bodies are skipped in bulk and
 * chunks are passed through unchanged.
 *
 * The state machine behind the bound: fed every byte received, in order, it reads only the
 * fixed header of each packet ([MQTT-2.2.3] remaining length, a 1-4 byte varint) and skips
 * bodies in bulk. `scan` returns the error once a packet declares more than
 * `maxRemainingLength` (or a malformed length), null otherwise.
 */
export class MqttFrameScanner {
  private state: 'type' | 'length' | 'body' = 'type';
  private length = 0;
  private multiplier = 1;
  private lengthBytes = 0;
  private remaining = 0;

  constructor(private readonly maxRemainingLength: number) {}

  scan(chunk: Buffer): FleetError | null {
    let i = 0;
    while (i < chunk.length) {
      if (this.state === 'type') {
        i++;
        this.state = 'length';
        this.length = 0;
        this.multiplier = 1;
        this.lengthBytes = 0;
      } else if (this.state === 'length') {
        const b = chunk[i++]!;
        this.length += (b & 0x7f) * this.multiplier;
        this.multiplier *= 128;
        this.lengthBytes++;
        if (this.length > this.maxRemainingLength) return new FleetError('FLEET_MSG_INVALID', `MQTT packet of at least ${this.length} bytes exceeds the limit of ${this.maxRemainingLength}`);
        if (b & 0x80) {
          if (this.lengthBytes >= 4) return new FleetError('FLEET_MSG_INVALID', 'malformed MQTT remaining length');
        } else {
          this.remaining = this.length;
          this.state = this.remaining > 0 ? 'body' : 'type';
        }
      } else {
        const take = Math.min(this.remaining, chunk.length - i);
        i += take;
        this.remaining -= take;
        if (this.remaining === 0) this.state = 'type';
      }
    }
    return null;
  }
}

/**
 * A byte bound on incoming MQTT packets, as a Transform (see MqttFrameScanner): fails the
 * stream as soon as a packet declares more than `maxRemainingLength`. Chunks pass unchanged.
 */
export class MqttFrameLimit extends Transform {
  private readonly scanner: MqttFrameScanner;

  constructor(
    maxRemainingLength: number,
    /** told once when the limit trips, before the stream fails */
    private readonly onExceeded?: (err: FleetError) => void,
  ) {
    super();
    this.scanner = new MqttFrameScanner(maxRemainingLength);
  }

  override _transform(chunk: Buffer, _enc: BufferEncoding, cb: TransformCallback): void {
    const err = this.scanner.scan(chunk);
    if (err) {
      this.onExceeded?.(err);
      cb(err);
      return;
    }
    cb(null, chunk);
  }
}

/**
 * Wrap a TCP socket for aedes: reads pass through an MqttFrameLimit, writes go to the
 * socket. When the limit trips, the socket is destroyed (and `onExceeded` called once).
 */
export function limitMqttFrames(socket: Socket, maxRemainingLength: number, onExceeded?: (err: FleetError) => void): Duplex {
  const limiter = new MqttFrameLimit(maxRemainingLength, onExceeded);
  // on error pipeline destroys both streams; the error itself reaches aedes through the Duplex
  pipeline(socket, limiter, () => undefined);
  return Duplex.from({ readable: limiter, writable: socket });
}

/**
 * The same bound without extra streams, for aedes, which reads its connection with
 * `conn.read()` on 'readable': the socket's own `read` is wrapped so every chunk handed out
 * is scanned first; when the limit trips the socket is destroyed with the error (and
 * `onExceeded` called once) and the chunk is withheld. A Transform plus a Duplex per
 * connection (limitMqttFrames) cost two stream objects with their buffers per MCU and a
 * stream hop for every packet each way; at 10,000 MCUs that was a measurable part of the
 * gateway's CPU and memory.
 */
export function guardMqttFrames(socket: Socket, maxRemainingLength: number, onExceeded?: (err: FleetError) => void): Socket {
  const scanner = new MqttFrameScanner(maxRemainingLength);
  const read = socket.read;
  let tripped = false;
  socket.read = function guardedRead(this: Socket, size?: number) {
    if (tripped) return null;
    const chunk = read.call(this, size) as Buffer | string | null;
    if (chunk === null || typeof chunk === 'string') return chunk;
    const err = scanner.scan(chunk);
    if (!err) return chunk;
    tripped = true;
    onExceeded?.(err);
    this.destroy(err);
    return null;
  };
  return socket;
}
