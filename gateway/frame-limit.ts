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
 */
export class MqttFrameLimit extends Transform {
  private state: 'type' | 'length' | 'body' = 'type';
  private length = 0;
  private multiplier = 1;
  private lengthBytes = 0;
  private remaining = 0;

  constructor(
    private readonly maxRemainingLength: number,
    /** told once when the limit trips, before the stream fails */
    private readonly onExceeded?: (err: FleetError) => void,
  ) {
    super();
  }

  private fail(err: FleetError, cb: TransformCallback): void {
    this.onExceeded?.(err);
    cb(err);
  }

  override _transform(chunk: Buffer, _enc: BufferEncoding, cb: TransformCallback): void {
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
        if (this.length > this.maxRemainingLength) {
          this.fail(new FleetError('FLEET_MSG_INVALID', `MQTT packet of at least ${this.length} bytes exceeds the limit of ${this.maxRemainingLength}`), cb);
          return;
        }
        if (b & 0x80) {
          if (this.lengthBytes >= 4) {
            this.fail(new FleetError('FLEET_MSG_INVALID', 'malformed MQTT remaining length'), cb);
            return;
          }
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
