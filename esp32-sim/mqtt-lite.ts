import { connect, type Socket } from 'node:net';
import { fixedHeader, mqttFrame as frame, remainingLengthBytes, writeRemainingLength } from '../core/mqtt-wire.ts';

/**
 * A minimal MQTT 3.1.1 client, the size of what an ESP32 runs (esp-mqtt, PubSubClient):
 * CONNECT/CONNACK, PUBLISH QoS 0 and 1 both ways with PUBACK, SUBSCRIBE/SUBACK,
 * PINGREQ/PINGRESP and DISCONNECT over one net.Socket. No QoS 2, no MQTT 5, no
 * client-side stores or timers: the simulator's scheduler drives keep-alive and
 * retries, and the device keeps its one in-flight message itself.
 *
 * Why not mqtt.js: each mqtt.js client carries streams, stores and timers of its own,
 * measured at tens of KB per client, which 10,000 devices in one process cannot afford
 * (docs/esp32-sim.md has the figures).
 */
export interface MqttLiteEvents {
  /** CONNACK arrived; rc 0 = accepted */
  connack(rc: number): void;
  /** the connection is gone (any reason, also after `end()`); once per connection */
  close(hadError: boolean): void;
  puback(pid: number): void;
  suback(pid: number, codes: number[]): void;
  /** an incoming PUBLISH (the client sends the PUBACK for QoS 1 itself) */
  message(topic: string, payload: Buffer, qos: number): void;
}

export interface MqttConnectOptions {
  host: string;
  port: number;
  clientId: string;
  username?: string;
  password?: string;
  keepaliveS: number;
  clean: boolean;
}

/** Largest packet accepted from the broker; commands and firmware chunks are far smaller. */
const MAX_IN_PACKET = 256 * 1024;

/** The read buffer of every client (see `connect`): 64 KiB, what one read of libuv asks for. */
const sharedRx = Buffer.allocUnsafe(64 * 1024);

const PINGREQ = Buffer.from([0xc0, 0x00]);
const DISCONNECT = Buffer.from([0xe0, 0x00]);

export class MqttLite {
  socket: Socket | null = null;
  /** bytes of a partial packet carried over between reads */
  private rx: Buffer | null = null;
  private pid = 0;
  /** when something was last written, for keep-alive */
  lastWrite = 0;
  connected = false;

  constructor(private readonly ev: MqttLiteEvents) {}

  nextPid(): number {
    this.pid = (this.pid % 0xffff) + 1;
    return this.pid;
  }

  connect(o: MqttConnectOptions): void {
    // `onread`: reads land in one buffer shared by every client and go straight to onData,
    // without the Readable stream (a Buffer, a push and a 'data' event per read), which at
    // 10,000 PUBACKs/s was a large part of the simulator's own CPU. onData is synchronous
    // and copies what it keeps (a partial packet, an incoming PUBLISH's payload).
    const s: Socket = connect({ host: o.host, port: o.port, noDelay: true, onread: { buffer: sharedRx, callback: (n) => (this.onData(s, n), true) } });
    this.socket = s;
    this.rx = null;
    this.connected = false;
    s.on('connect', () => this.write(encodeConnect(o)));
    s.on('error', () => undefined); // 'close' follows with hadError
    s.once('close', (hadError) => {
      if (this.socket !== s) return;
      this.socket = null;
      this.connected = false;
      this.rx = null;
      this.ev.close(hadError);
    });
  }

  get writable(): boolean {
    return this.socket !== null && this.connected && !this.socket.destroyed;
  }

  publish(topic: string, payload: Buffer, qos: 0 | 1, pid = 0, dup = false): void {
    this.write(encodePublish(topic, payload, qos, pid, dup));
  }

  subscribe(pid: number, filter: string, qos: 0 | 1): void {
    const t = Buffer.from(filter, 'utf8');
    const body = Buffer.allocUnsafe(2 + 2 + t.length + 1);
    body.writeUInt16BE(pid, 0);
    body.writeUInt16BE(t.length, 2);
    t.copy(body, 4);
    body[4 + t.length] = qos;
    this.write(frame(0x82, body));
  }

  ping(): void {
    this.write(PINGREQ);
  }

  /** Clean disconnect (DISCONNECT, then FIN), as firmware does before deep sleep. */
  end(): void {
    const s = this.socket;
    if (!s) return;
    if (this.connected && !s.destroyed) s.end(DISCONNECT);
    else s.destroy();
  }

  /** Cut the link without a DISCONNECT (power loss, Wi-Fi gone). */
  destroy(): void {
    this.socket?.destroy();
  }

  write(buf: Buffer): void {
    const s = this.socket;
    if (!s || s.destroyed) return;
    this.lastWrite = Date.now();
    s.write(buf);
  }

  /** `n` bytes arrived in `sharedRx` on socket `s` */
  private onData(s: Socket, n: number): void {
    const data = sharedRx;
    // a connection already left (end() before deep sleep, then a new connect()) can still
    // deliver what the peer wrote before it read our DISCONNECT: dropped (QoS 1 is sent again
    // on the next session), never parsed together with the new connection's bytes in `rx`
    if (this.socket !== s) return;
    // the common case, one whole PUBACK per read: no parsing objects at all
    if (n === 4 && this.rx === null && data[0] === 0x40 && data[1] === 0x02) return this.ev.puback((data[2]! << 8) | data[3]!);
    let buf: Buffer;
    if (this.rx) {
      buf = Buffer.concat([this.rx, data.subarray(0, n)]);
      this.rx = null;
    } else buf = data.subarray(0, n);
    let off = 0;
    while (off < buf.length) {
      if (buf.length - off < 2) break;
      let i: number;
      let len: number;
      if (buf[off + 1]! < 0x80) {
        // a one-byte remaining length (every PUBACK, SUBACK, CONNACK, PINGRESP and most commands)
        i = off + 2;
        len = buf[off + 1]!;
        if (buf.length - i < len) break;
      } else {
        const h = fixedHeader(buf, off, MAX_IN_PACKET);
        if (h.kind === 'malformed' || h.kind === 'tooLarge') return void s.destroy();
        if (h.kind === 'more') break;
        ({ start: i, len } = h);
      }
      this.onPacket(buf[off]!, buf.subarray(i, i + len));
      if (this.socket !== s) return;
      off = i + len;
    }
    // keep a copy: the read buffer is shared by every client and reused by the next read
    if (off < buf.length) this.rx = Buffer.from(buf.subarray(off));
  }

  private onPacket(h: number, body: Buffer): void {
    switch (h >> 4) {
      case 2: {
        const rc = body[1] ?? 255;
        this.connected = rc === 0;
        this.ev.connack(rc);
        if (rc !== 0) this.socket?.destroy();
        return;
      }
      case 3: {
        const qos = (h >> 1) & 3;
        const tl = body.readUInt16BE(0);
        const topic = body.toString('utf8', 2, 2 + tl);
        let p = 2 + tl;
        if (qos > 0) {
          const pid = body.readUInt16BE(p);
          p += 2;
          this.write(Buffer.from([0x40, 0x02, pid >> 8, pid & 0xff]));
        }
        // a copy: the body lies in the shared read buffer (commands and firmware chunks are rare)
        this.ev.message(topic, Buffer.from(body.subarray(p)), qos);
        return;
      }
      case 4:
        if (body.length >= 2) this.ev.puback(body.readUInt16BE(0));
        return;
      case 9:
        if (body.length >= 2) this.ev.suback(body.readUInt16BE(0), [...body.subarray(2)]);
        return;
      case 13: // PINGRESP
        return;
      default:
        return;
    }
  }
}

function str(s: string): Buffer {
  const b = Buffer.from(s, 'utf8');
  const out = Buffer.allocUnsafe(2 + b.length);
  out.writeUInt16BE(b.length, 0);
  b.copy(out, 2);
  return out;
}

export function encodeConnect(o: MqttConnectOptions): Buffer {
  let flags = o.clean ? 0x02 : 0;
  if (o.username !== undefined) flags |= 0x80;
  if (o.password !== undefined) flags |= 0x40;
  const parts = [Buffer.from([0x00, 0x04, 0x4d, 0x51, 0x54, 0x54, 0x04, flags, o.keepaliveS >> 8, o.keepaliveS & 0xff]), str(o.clientId)];
  if (o.username !== undefined) parts.push(str(o.username));
  if (o.password !== undefined) parts.push(str(o.password));
  return frame(0x10, Buffer.concat(parts));
}

/** A PUBLISH packet in one buffer: fixed header, topic, packet id (QoS 1), payload. */
export function encodePublish(topic: string, payload: Buffer, qos: 0 | 1, pid: number, dup: boolean): Buffer {
  const tl = Buffer.byteLength(topic, 'utf8');
  const rem = 2 + tl + (qos > 0 ? 2 : 0) + payload.length;
  const out = Buffer.allocUnsafe(1 + remainingLengthBytes(rem) + rem);
  out[0] = 0x30 | (dup ? 0x08 : 0) | (qos << 1);
  let p = writeRemainingLength(out, 1, rem);
  out[p++] = tl >> 8;
  out[p++] = tl & 0xff;
  out.write(topic, p, tl, 'utf8');
  p += tl;
  if (qos > 0) {
    out[p++] = pid >> 8;
    out[p++] = pid & 0xff;
  }
  out.set(payload, p);
  return out;
}
