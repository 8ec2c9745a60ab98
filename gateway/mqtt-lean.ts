import { isUtf8 } from 'node:buffer';
import { createServer, type Server, type Socket } from 'node:net';
import { createServer as createTlsServer } from 'node:tls';
import { crc32 } from '../core/crc32.ts';
import { FleetError } from '../core/errors.ts';
import { fixedHeader, remainingLengthBytes, writeRemainingLength, type FixedHeader } from '../core/mqtt-wire.ts';

/**
 * A lean MQTT 3.1.1 server for MCUs: the subset of the protocol a device needs, on one
 * small object per connection, with no broker behind it (MCU messages are consumed by the
 * gateway and only the gateway sends anything down). It replaced aedes on the MCU port:
 * aedes keeps a full broker client per connection (its own parser, stream pipeline and
 * closures, plus our frame-size Transform and Duplex around each socket), measured at
 * about 95 KB of gateway memory per connected MCU at 7,000 MCUs (scripts/bench/README.md).
 *
 * It listens on plain TCP, on TLS (1.2 or newer), or both: every listener hands its
 * connections to the same `accept`, so a TLS connection runs exactly the code of a plain one.
 *
 * What it speaks (MQTT 3.1.1, OASIS 2014; 3.1 "MQIsdp" is accepted too):
 * CONNECT/CONNACK, PUBLISH QoS 0, 1 and 2 from the client (PUBACK, or PUBREC/PUBREL/
 * PUBCOMP), PUBLISH QoS 0 and 1 to the client (its PUBACK is accepted and ignored: delivery
 * of commands is the mailbox's business, by its ack channel), SUBSCRIBE/SUBACK,
 * UNSUBSCRIBE/UNSUBACK, PINGREQ/PINGRESP, DISCONNECT. Every session is clean: CONNACK
 * says "no session present" and nothing is kept after a disconnect. A will is parsed and
 * never published. "MQTT" with a protocol level other than 4 (MQTT 5, 3.1's level 3 under
 * the new name) gets CONNACK 1 (unacceptable protocol version) [MQTT-3.1.2-2].
 *
 * Guarantees the ingress builds on:
 * - packets of one connection are handled strictly one after another: the next packet is
 *   not looked at until the handler of the previous one has finished (its PUBACK, if any,
 *   written). So a PUBACK is written only when `onPublish` resolved, and PUBACKs go out in
 *   the order of the PUBLISHes [MQTT-4.6.0-2];
 * - bounded input: a packet that declares a remaining length above `maxRemainingLength` is
 *   refused from its fixed header (before its body is buffered, also for CONNECT), and
 *   while a handler runs at most about that many bytes more are buffered before the socket
 *   is paused (plain 'data' events and pause/resume; the socket is never read otherwise);
 * - linear receive cost: a packet that arrives in many TCP segments is kept as the chunks
 *   received and copied together once, when complete (a chunk of whole packets is not
 *   copied at all); `rxCopiedBytes` counts what was copied;
 * - a peer that sends no CONNECT within `connectTimeoutMs`, or nothing within 1.5x its
 *   keep-alive, is disconnected [MQTT-3.1.2-24]; every accepted socket has TCP keepalive on
 *   (first probe after 60 s idle), so a half-open connection (an MCU that lost power) dies
 *   even with MQTT keep-alive 0;
 * - a peer that closes its side (FIN, with or without DISCONNECT) while a PUBLISH is being
 *   stored: the complete packets it sent before are still handled once that store is done,
 *   QoS 0 PUBLISHes only (nothing can be acknowledged any more; a QoS 1/2 PUBLISH not yet
 *   acknowledged is resent by the MCU on its next connection, so storing it would make a
 *   duplicate). Nothing is written to a closed socket;
 * - a QoS 1 PUBLISH with DUP set and the packet id of the connection's last acknowledged
 *   QoS 1 PUBLISH (esp-mqtt retransmits on the same connection after its timeout) is
 *   acknowledged again, not handed to `onPublish` twice. Packets are handled in order, so a
 *   retransmission that arrives while the first copy is being stored is answered once that
 *   store is done. The same after a reconnect (`onDuplicate`, `reconnected`): a DUP with the
 *   packet id and payload (14 bits of its CRC-32) of one of the last QoS 1 PUBLISHes
 *   acknowledged on the MCU's previous connection, or stored there after the link dropped,
 *   is acknowledged and not stored again; the server remembers this for at most
 *   `maxConnections` MCUs gone (the longest gone forgotten first);
 * - a new connection of an MCU whose previous one is still being handled (a store in
 *   progress, and after a close the QoS 0 PUBLISHes queued behind it) reads nothing after
 *   its CONNECT until that is done (`adopt`, `drained`): the MCU's messages are stored in
 *   the order it sent them, across connections, and a DUP resend of the PUBLISH being
 *   stored there finds it acknowledged;
 * - connections not authenticated yet (TLS handshake or CONNECT pending) are capped, in all
 *   and per remote address (`maxPreAuth`, `maxPreAuthPerAddress`); a socket beyond either
 *   cap is destroyed at once and reported through `onRefused`. Authenticated connections
 *   do not count against these caps;
 * - protocol violations (a malformed packet, anything before CONNECT, a second CONNECT,
 *   reserved packet types or flags) close the connection and are reported once through
 *   `onMalformed`.
 */

export interface LeanConnect {
  clientId: string;
  username: string | undefined;
  password: Buffer | undefined;
  clean: boolean;
  keepaliveS: number;
}

export interface LeanPublish {
  topic: string;
  payload: Buffer;
  qos: 0 | 1 | 2;
}

/** What the handler of a PUBLISH decides. */
export type PublishOutcome = 'ack' | 'close';

export interface LeanServerHooks {
  /**
   * 0 = accept (the value is the session's id from now on), 2 identifier rejected (a
   * zero-length client id when the hook assigns none [MQTT-3.1.3-8, -9]), 3 server
   * unavailable, 4 bad user name or password, 5 not authorized
   */
  authenticate(c: LeanConnect, remote: string | undefined): { rc: 0; id: string } | { rc: 2 | 3 | 4 | 5 };
  /** 'ack': acknowledge (QoS 1/2) and go on; 'close': drop the connection without an acknowledgement */
  onPublish(conn: LeanConn, p: LeanPublish): Promise<PublishOutcome> | PublishOutcome;
  /** granted QoS (0 or 1) or 0x80 (refused) */
  onSubscribe(conn: LeanConn, filter: string, qos: number): number;
  /** after the SUBACK of a SUBSCRIBE packet was written */
  onSubscribed?(conn: LeanConn, filters: readonly string[]): void;
  onUnsubscribe?(conn: LeanConn, filters: readonly string[]): void;
  /** an authenticated session ended (any reason) */
  onClose?(conn: LeanConn): void;
  /** a protocol error; the connection is closed after this */
  onMalformed(err: FleetError, conn: LeanConn): void;
  /** a packet declared more than the limit; the connection is closed after this */
  onTooLarge(err: FleetError, conn: LeanConn): void;
  /** a new socket was destroyed at once: too many unauthenticated connections, in all or from its address */
  onRefused?(remote: string | undefined, why: 'pre_auth_total' | 'pre_auth_address' | 'write_backlog'): void;
  /** a TLS handshake failed (plain MQTT on the TLS port, a client that does not trust the certificate, no handshake within connectTimeoutMs); the socket is closed */
  onTlsError?(err: Error, remote: string | undefined): void;
  /** a QoS 1 retransmission (DUP) of a PUBLISH acknowledged already, on this connection or (`reconnected`) on the MCU's previous one: acknowledged again, not handed to onPublish */
  onDuplicate?(conn: LeanConn, reconnected: boolean): void;
}

/** Certificate and key of a TLS listener (PEM, as read from the files). */
export interface LeanTlsOptions {
  /** certificate chain, leaf first */
  cert: Buffer;
  key: Buffer;
}

export interface LeanServerOptions {
  maxRemainingLength: number;
  /**
   * most authenticated connections at once, per listener; each listener accepts this plus
   * `maxPreAuth` sockets (Node closes the ones beyond at accept), so unauthenticated
   * sockets cannot take the slots of MCUs
   */
  maxConnections: number;
  /** most unauthenticated connections (TLS handshake or CONNECT pending) at once, all listeners (default 512) */
  maxPreAuth?: number;
  /** most unauthenticated connections at once from one remote address (default 32) */
  maxPreAuthPerAddress?: number;
  /**
   * bytes written but not yet taken by the peers, over all connections (default 64 MiB);
   * beyond it the connections holding the most are closed, largest first (each one is also
   * bounded on its own, at 1 MiB)
   */
  maxWriteBacklogTotal?: number;
  connectTimeoutMs?: number;
  /** listen(2) backlog (the kernel caps it at net.core.somaxconn) */
  backlog?: number;
  hooks: LeanServerHooks;
}

const enum T {
  CONNECT = 1,
  CONNACK = 2,
  PUBLISH = 3,
  PUBACK = 4,
  PUBREC = 5,
  PUBREL = 6,
  PUBCOMP = 7,
  SUBSCRIBE = 8,
  SUBACK = 9,
  UNSUBSCRIBE = 10,
  UNSUBACK = 11,
  PINGREQ = 12,
  PINGRESP = 13,
  DISCONNECT = 14,
}

const PINGRESP = Buffer.from([0xd0, 0x00]);
/** bytes queued for a peer that does not read before it is cut off */
const MAX_WRITE_BACKLOG = 1024 * 1024;
/** stored PUBLISHes answered per turn of the event loop at least (LeanMqttServer.settle): half of what waits, and no fewer than this */
const SETTLE_SLICE = 128;
/** QoS 1 packet ids remembered per connection for DUP resends (LeanConn.ackedRing) */
const RECENT_ACKED = 16;
/** QoS 2 publishes awaiting PUBREL per connection */
const MAX_QOS2_PENDING = 4096;
/** defaults of LeanServerOptions.maxPreAuth and maxPreAuthPerAddress */
export const DEFAULT_MAX_PRE_AUTH = 512;
export const DEFAULT_MAX_PRE_AUTH_PER_ADDRESS = 32;
/** default of LeanServerOptions.maxWriteBacklogTotal */
export const DEFAULT_MAX_WRITE_BACKLOG_TOTAL = 64 * 1024 * 1024;
/** TCP keepalive: first probe after this long without traffic (kernel interval and count after) */
export const TCP_KEEPALIVE_MS = 60_000;
/** how long a connection we ended (a refused CONNECT, DISCONNECT) may stay open for the peer to close it */
const END_GRACE_MS = 5000;
/** acknowledged QoS 1 ids remembered per connection once it pipelines (see ackedRing) */
const RECENT_ACKED_PIPELINED = 1024;
/** held chunks of one incomplete packet before they are copied together (1-byte TCP segments cost ~200 B of heap each) */
const MAX_HELD_CHUNKS = 64;
/**
 * topic filters in one SUBSCRIBE: the packet size bounds them already (4 bytes each at
 * least), this bounds the onSubscribe calls per packet; far above what a device sends
 * (the ACL grants an MCU 3 filters)
 */
const MAX_SUBSCRIBE_FILTERS = 1024;

class Malformed extends Error {}

/** Chunks received behind an incomplete packet (LeanConn.more), not copied yet. */
interface HeldChunks {
  chunks: Buffer[];
  /** index of the first chunk not moved to `rx` yet (the ones before are EMPTY) */
  at: number;
  /** bytes in chunks[at..] */
  bytes: number;
  /** bytes of the packet at the front (header and body) once its header was read, 0 = not yet */
  need: number;
}

const EMPTY = Buffer.alloc(0);
const MORE: FixedHeader = { kind: 'more' };

/**
 * Header plus body bytes of the packet in `buf`, whose fixed header fixedHeader found well
 * formed and within the limit but incomplete ('more'); 0 while its remaining length is not
 * all here [MQTT-2.2.3].
 */
function packetLength(buf: Buffer): number {
  let len = 0;
  let mul = 1;
  for (let i = 1; i < 5 && i < buf.length; i++) {
    const b = buf[i]!;
    len += (b & 0x7f) * mul;
    mul *= 128;
    if ((b & 0x80) === 0) return i + 1 + len;
  }
  return 0;
}

/** One MQTT connection. Fields are few on purpose: there are 10,000 of these. */
export class LeanConn {
  /** the MCU id once authenticated, else null */
  id: string | null = null;
  keepaliveMs = 0;
  /**
   * set on every packet: a number from the start, not a field first declared undefined (ES2022
   * class fields), so V8 keeps it as a double in place; undefined first made every store a new
   * heap number living ~1 s, 10,000 a second promoted to the old generation (a heap snapshot)
   */
  lastRx = 0;
  readonly openedAt: number;
  /** granted QoS of the down subscriptions, -1 when not subscribed */
  subCmd = -1;
  subFw = -1;
  /** filters subscribed as given (at most a few: the ACL allows only the MCU's own) */
  filters: Map<string, number> | null = null;
  /** the received bytes not handled yet start here: one chunk, or the front of a packet copied together */
  private rx: Buffer | null = null;
  /** chunks received behind `rx` while its packet is incomplete (null in the common case: whole packets per chunk) */
  private more: HeldChunks | null = null;
  private busy = false;
  private closed = false;
  private paused = false;
  private pid = 0;
  /**
   * the last RECENT_ACKED QoS 1 PUBLISHes acknowledged (a ring; null until the first), each
   * as `pid << 14 | fingerprint` (ackedEntry: a small integer, 14 bits of the payload's
   * CRC-32): a DUP resend of one of them is acknowledged again, not stored again. More than
   * the last one, because an MCU with several messages in flight resends all of them when
   * its PUBACKs are late (the rate limit, a slow store), and they arrive behind the originals.
   * A plain array of small integers: a Uint16Array with its own ArrayBuffer measured ~0.7 KB
   * more gateway memory per connected MCU (10,000 MCUs, s10-ab-*, s10-exp-noring)
   */
  private ackedRing: number[] | null = null;
  private ackedPos = 0;
  /**
   * the ring's size: RECENT_ACKED, or RECENT_ACKED_PIPELINED once a PUBLISH is acknowledged
   * while more of the MCU's packets wait behind it (it pipelines, and its PUBACKs are late:
   * all of its messages in flight may come again with DUP, and a ring smaller than that window
   * forgot the first ones: each stored twice, evicting the next, 34 stores for 17 messages)
   */
  private ackedCap = RECENT_ACKED;
  /**
   * the ring of this MCU's previous connection (LeanMqttServer.adopt): a DUP resend after a
   * reconnect of a PUBLISH acknowledged there (its PUBACK lost with the link) matches on
   * packet id and payload fingerprint, and is acknowledged again, not stored again
   */
  private prevAcked: readonly number[] | null = null;
  /** ackedEntry of the QoS 1 PUBLISH being stored (a connection stores one at a time) */
  private storingEntry = 0;
  /** counted against the server's unauthenticated-connection caps (until authenticated or closed) */
  preAuth = false;
  private qos2: Set<number> | null = null;

  constructor(
    readonly socket: Socket,
    private readonly server: LeanMqttServer,
    /** when the TCP connection was accepted (before a TLS handshake: it counts against the CONNECT timeout) */
    acceptedAt = performance.now(),
  ) {
    this.openedAt = acceptedAt;
    this.lastRx = performance.now();
  }

  get isClosed(): boolean {
    return this.closed;
  }

  /** a handler runs (a PUBLISH being stored), or it waits for its MCU's previous connection (hold) */
  get isBusy(): boolean {
    return this.busy;
  }

  get remote(): string | undefined {
    return this.socket.remoteAddress;
  }

  onData(chunk: Buffer): void {
    if (this.closed || chunk.length === 0) return;
    this.lastRx = performance.now();
    if (this.rx === null) this.rx = chunk;
    else {
      // Behind an incomplete packet: kept as received and copied once, when the packet is
      // complete (frame). Concatenating on every chunk copied a large packet that came in
      // many small TCP segments over and over: O(n²) bytes.
      const m = (this.more ??= { chunks: [], at: 0, bytes: 0, need: 0 });
      m.chunks.push(chunk);
      m.bytes += chunk.length;
      // a packet trickled in tiny TCP segments: each Buffer costs ~200 B of heap, 200 times a
      // 1-byte segment's size, held until the packet is complete. Copied together every
      // MAX_HELD_CHUNKS chunks: the heap stays near the bytes held (the copying is quadratic
      // only in such a sender's own packet, at most maxRemainingLength)
      if (m.chunks.length - m.at > MAX_HELD_CHUNKS) {
        m.chunks = [Buffer.concat(m.at === 0 ? m.chunks : m.chunks.slice(m.at))];
        m.at = 0;
      }
      // its packet's length is known and not reached yet: nothing to handle (O(1) per chunk)
      if (m.need > 0 && this.rx.length + m.bytes < m.need) return this.flowControl();
    }
    this.drain();
  }

  /**
   * The fixed header of the packet at the front [MQTT-2.2.3], with the whole packet
   * contiguous in `rx` once it is `ok`. With one chunk held (the common case) that is
   * `rx` as received, no copy. With later chunks held (`more`), only the header's bytes
   * (at most 5) are copied together until its length is known, then the whole packet once,
   * when all of it is here.
   */
  private frame(limit: number): FixedHeader {
    const m = this.more;
    if (m === null || m.need === 0) {
      let h = fixedHeader(this.rx!, 0, limit);
      // the packet is within rx (as when chunks of whole packets queued behind a handler), or refused
      if (h.kind !== 'more' || m === null) return h;
      if (this.rx!.length < 5) {
        this.take(Math.min(5 - this.rx!.length, m.bytes));
        h = fixedHeader(this.rx!, 0, limit);
        if (h.kind !== 'more') return h;
      }
      const need = packetLength(this.rx!);
      // the length is not complete yet (fewer than 5 bytes here), or nothing else is held
      // (take used it all: the next chunk reads these few bytes again)
      if (need === 0 || this.more === null) return h;
      m.need = need;
    }
    if (this.rx!.length + m.bytes < m.need) return MORE;
    const n = m.need - this.rx!.length;
    m.need = 0;
    this.take(n);
    return fixedHeader(this.rx!, 0, limit);
  }

  /** Copy `n` more bytes of the held chunks behind `rx` into one new `rx` (counted in rxCopiedBytes). */
  private take(n: number): void {
    const m = this.more!;
    const rx = this.rx!;
    if (n <= 0) return;
    // its own memory, not a slice of Node's shared pool: the drain's "small rest on a large
    // buffer" check would copy a pool slice again
    const out = Buffer.allocUnsafeSlow(rx.length + n);
    rx.copy(out, 0);
    let o = rx.length;
    while (o < out.length) {
      const c = m.chunks[m.at]!;
      const k = Math.min(c.length, out.length - o);
      c.copy(out, o, 0, k);
      o += k;
      if (k === c.length) m.chunks[m.at++] = EMPTY;
      else m.chunks[m.at] = c.subarray(k);
    }
    m.bytes -= n;
    this.server.rxCopiedBytes += out.length;
    this.rx = out;
    if (m.bytes === 0 && m.need === 0) this.more = null;
    else if (m.at > 64 && m.at * 2 > m.chunks.length) {
      m.chunks.splice(0, m.at);
      m.at = 0;
    }
  }

  /** The packet of `buf` that ended at `end` was handled: what follows it is next. */
  private advance(buf: Buffer, end: number): void {
    if (end < buf.length) {
      this.rx = buf.subarray(end);
      return;
    }
    const m = this.more;
    if (m === null) {
      this.rx = null;
      return;
    }
    // the next held chunk moves to the front as it is (no copy)
    const c = m.chunks[m.at]!;
    m.chunks[m.at++] = EMPTY;
    m.bytes -= c.length;
    this.rx = c;
    if (m.bytes === 0) this.more = null;
  }

  /** Drop what is held (closed, or what follows cannot be trusted). */
  private dropRx(): void {
    this.rx = null;
    this.more = null;
  }

  /** Handle the complete packets buffered, one at a time; stops while a handler runs. */
  private drain(): void {
    const limit = this.server.opts.maxRemainingLength;
    while (!this.busy && !this.closed && this.rx !== null) {
      const buf = this.rx;
      // the first byte alone tells a packet this side never accepts: refused at once, not
      // after waiting for a body that a stray peer (an HTTP request, noise) never sends
      const bad = this.badHeader(buf[0]!);
      if (bad) return this.malformed(bad);
      const h = this.frame(limit);
      if (h.kind === 'tooLarge') return this.tooLarge(`MQTT packet of at least ${h.len} bytes exceeds the limit of ${limit}`);
      if (h.kind === 'malformed') return this.malformed('malformed MQTT remaining length');
      if (h.kind === 'more') break;
      const { start: i, len } = h;
      const whole = this.rx;
      const header = whole[0]!;
      const body = whole.subarray(i, i + len);
      this.advance(whole, i + len);
      try {
        this.packet(header, body);
      } catch (err) {
        return this.malformed(err instanceof Malformed ? err.message : `bad packet: ${(err as Error).message}`);
      }
    }
    if (this.closed) return;
    if (this.rx !== null && this.rx.length === 0) this.rx = null;
    // do not pin a large read buffer for a small rest (copied when that frees at least 4 KiB:
    // at most as many bytes as it frees, so linear, and never for a rest of a small chunk)
    if (this.rx !== null && this.rx.length < 4096 && this.rx.buffer.byteLength - this.rx.length >= 4096) {
      this.server.rxCopiedBytes += this.rx.length;
      const own = Buffer.allocUnsafeSlow(this.rx.length);
      this.rx.copy(own, 0);
      this.rx = own;
    }
    this.flowControl();
  }

  /** Pause reading while a handler runs and more than about one packet is held; resume after. */
  private flowControl(): void {
    const held = (this.rx?.length ?? 0) + (this.more?.bytes ?? 0);
    const limit = this.server.opts.maxRemainingLength;
    // a handler is running and the peer keeps sending: stop reading beyond about one packet
    if (this.busy && !this.paused && held > limit) {
      this.paused = true;
      this.socket.pause();
    } else if (this.paused && !this.busy) {
      this.paused = false;
      this.socket.resume();
    }
  }

  /** Why a fixed header's first byte is not acceptable here and now, or null. */
  private badHeader(h: number): string | null {
    const type = h >> 4;
    const flags = h & 0x0f;
    if (this.id === null) return h === 0x10 ? null : `packet type ${type} (flags ${flags}) before CONNECT`;
    switch (type) {
      case T.PUBLISH:
        return (flags & 0x06) === 0x06 ? 'PUBLISH QoS 3 [MQTT-3.3.1-4]' : null;
      case T.PUBREL:
      case T.SUBSCRIBE:
      case T.UNSUBSCRIBE:
        return flags === 2 ? null : `packet type ${type} with flags ${flags} [MQTT-2.2.2-2]`;
      case T.PUBACK:
      case T.PUBREC:
      case T.PUBCOMP:
      case T.PINGREQ:
      case T.DISCONNECT:
        return flags === 0 ? null : `packet type ${type} with flags ${flags} [MQTT-2.2.2-2]`;
      case T.CONNECT:
        return 'second CONNECT [MQTT-3.1.0-2]';
      default:
        return `packet type ${type} not allowed from a client`;
    }
  }

  private packet(header: number, body: Buffer): void {
    const type = header >> 4;
    const flags = header & 0x0f;
    if (this.id === null) {
      if (type !== T.CONNECT) throw new Malformed(`packet type ${type} before CONNECT`);
      return this.connect(flags, body);
    }
    switch (type) {
      case T.PUBLISH:
        return this.publish(flags, body);
      case T.PUBACK:
      case T.PUBCOMP:
        // acknowledgements of what we sent: deliveries are tracked by the mailbox, not here
        if (flags !== 0 || body.length !== 2) throw new Malformed('bad PUBACK');
        return;
      case T.PUBREC:
        // we never send QoS 2, so nothing to release: answer as the protocol asks
        if (flags !== 0 || body.length !== 2) throw new Malformed('bad PUBREC');
        this.write(Buffer.from([0x62, 0x02, body[0]!, body[1]!]));
        return;
      case T.PUBREL: {
        if (flags !== 2 || body.length !== 2) throw new Malformed('bad PUBREL');
        this.qos2?.delete(body.readUInt16BE(0));
        this.write(Buffer.from([0x70, 0x02, body[0]!, body[1]!]));
        return;
      }
      case T.SUBSCRIBE:
        if (flags !== 2) throw new Malformed('bad SUBSCRIBE flags');
        return this.subscribe(body);
      case T.UNSUBSCRIBE:
        if (flags !== 2) throw new Malformed('bad UNSUBSCRIBE flags');
        return this.unsubscribe(body);
      case T.PINGREQ:
        if (flags !== 0 || body.length !== 0) throw new Malformed('bad PINGREQ');
        this.write(PINGRESP);
        return;
      case T.DISCONNECT:
        if (flags !== 0 || body.length !== 0) throw new Malformed('bad DISCONNECT');
        this.end();
        return;
      case T.CONNECT:
        throw new Malformed('second CONNECT [MQTT-3.1.0-2]');
      default:
        throw new Malformed(`packet type ${type} not allowed from a client`);
    }
  }

  private connect(flags: number, body: Buffer): void {
    if (flags !== 0) throw new Malformed('bad CONNECT flags');
    const r = new Reader(body);
    const proto = r.str();
    const level = r.u8();
    if (proto === 'MQTT' && level !== 4) {
      // unacceptable protocol level [MQTT-3.1.2-2]: CONNACK 1 (the 3.1.1 form, to MQTT 5
      // too) then close, so a client that probes versions (MQTT.js, Paho) learns why
      this.write(Buffer.from([0x20, 0x02, 0x00, 0x01]));
      this.end();
      return;
    }
    // any other protocol name may be closed at once [MQTT-3.1.2-1]; 3.1's "MQIsdp" level 3 is spoken
    if (!(proto === 'MQTT' || (proto === 'MQIsdp' && level === 3))) throw new Malformed(`unknown protocol ${JSON.stringify(proto.slice(0, 16))} level ${level}`);
    const cf = r.u8();
    if (cf & 0x01) throw new Malformed('CONNECT reserved flag set [MQTT-3.1.2-3]');
    if ((cf & 0xc0) === 0x40) throw new Malformed('CONNECT password flag without user name flag [MQTT-3.1.2-22]');
    const keepaliveS = r.u16();
    const clientId = r.str();
    if (cf & 0x04) {
      if (((cf >> 3) & 3) === 3) throw new Malformed('will QoS 3');
      r.str(); // will topic
      r.bin(); // will message: parsed, never published (MCU messages only come from live PUBLISHes)
    } else if (cf & 0x38) throw new Malformed('will QoS or retain without a will [MQTT-3.1.2-11]');
    const username = cf & 0x80 ? r.str() : undefined;
    const password = cf & 0x40 ? r.bin() : undefined;
    if (!r.done()) throw new Malformed('bytes after the CONNECT payload');
    const verdict = this.server.opts.hooks.authenticate({ clientId, username, password, clean: (cf & 0x02) !== 0, keepaliveS }, this.socket.remoteAddress);
    if (verdict.rc !== 0) {
      this.write(Buffer.from([0x20, 0x02, 0x00, verdict.rc]));
      this.end();
      return;
    }
    this.keepaliveMs = keepaliveS * 1000;
    this.server.adopt(this, verdict.id);
    this.write(Buffer.from([0x20, 0x02, 0x00, 0x00]));
  }

  private publish(flags: number, body: Buffer): void {
    const qos = (flags >> 1) & 3;
    if (qos === 3) throw new Malformed('PUBLISH QoS 3 [MQTT-3.3.1-4]');
    const r = new Reader(body);
    const topic = r.str();
    if (topic.length === 0) throw new Malformed('PUBLISH with a zero-length topic [MQTT-4.7.3-1]');
    const pid = qos > 0 ? r.u16() : 0;
    if (qos > 0 && pid === 0) throw new Malformed('PUBLISH packet id 0 [MQTT-2.3.1-1]');
    const payload = r.rest();
    if (qos === 1) {
      const entry = ackedEntry(pid, payload);
      if ((flags & 0x08) !== 0) {
        // a same-connection retransmission (DUP [MQTT-3.3.1-1]) of a QoS 1 publish acknowledged lately: its
        // PUBACK again, nothing twice (packets are handled in order, so the first copy is stored;
        // a new message reusing the id was handled, and put in the ring, before its own DUP).
        // Or one resent after a reconnect, of a publish acknowledged on the MCU's previous
        // connection: the same id and the same payload
        const here = this.ackedRing !== null && ringHasPid(this.ackedRing, pid);
        if (here || this.prevAcked?.includes(entry)) {
          this.write(ackPacket(0x40, pid));
          this.server.opts.hooks.onDuplicate?.(this, !here);
          return;
        }
      }
      this.storingEntry = entry;
    }
    if (qos === 2 && this.qos2?.has(pid)) {
      // a resend of a QoS 2 publish we stored already: PUBREC again, nothing twice
      this.write(ackPacket(0x50, pid));
      return;
    }
    // checked before it is stored: one stored without its PUBREC would be stored again when
    // the MCU resends it on its next connection. Pipelining clients (MQTT.js, esp-mqtt send
    // as fast as publish is called) have their PUBRELs queued behind their PUBLISHes, so the
    // limit is well above what one sends in a burst
    if (qos === 2 && (this.qos2?.size ?? 0) >= MAX_QOS2_PENDING) return this.malformed(`more than ${MAX_QOS2_PENDING} QoS 2 publishes without PUBREL`);
    let out: Promise<PublishOutcome> | PublishOutcome;
    try {
      out = this.server.opts.hooks.onPublish(this, { topic, payload, qos: qos as 0 | 1 | 2 });
    } catch (err) {
      out = Promise.reject(err);
    }
    if (typeof out === 'string') return this.published(out, qos, pid);
    this.busy = true;
    out.then(
      (o) => this.server.settle(this, o, qos, pid),
      () => this.server.settle(this, 'close', qos, pid),
    );
  }

  /** the outcome of the PUBLISH being stored, while it waits in the server's settle queue */
  settleOutcome: PublishOutcome = 'ack';
  settleQos = 0;
  settlePid = 0;

  /**
   * The last RECENT_ACKED entries acknowledged on this connection, for the MCU's next one.
   * Only this connection's: what its predecessor acknowledged is not passed on again. A
   * connection that acknowledged nothing (the link died before the MCU's PUBLISH was read)
   * passes nothing on, so a resend of that never-stored PUBLISH, which can carry the id and
   * payload of an older one (ids restarting at boot, a reading without a timestamp), is stored.
   */
  recentAcked(): readonly number[] | null {
    const ring = this.ackedRing;
    if (ring === null || ring.length === 0) return null;
    if (ring.length < this.ackedCap) return ring.slice(-RECENT_ACKED);
    // full: oldest at ackedPos
    const ordered = [...ring.slice(this.ackedPos), ...ring.slice(0, this.ackedPos)];
    return ordered.slice(-RECENT_ACKED);
  }

  /** What the MCU's previous connection acknowledged last (LeanMqttServer.adopt; a list of its own, never changed in place). */
  inherit(acked: readonly number[] | null): void {
    this.prevAcked = acked;
  }

  /** One more stored on the previous connection after this one began (LeanMqttServer.ackedAfterClose). */
  inheritOne(entry: number): void {
    this.prevAcked = [...(this.prevAcked ?? []), entry].slice(-RECENT_ACKED);
  }

  /**
   * Read nothing more, after this CONNECT, until `proceed` (LeanMqttServer.adopt: the MCU's
   * previous connection is still being handled). What arrives meanwhile is held and the
   * socket paused beyond about one packet, as behind a store.
   */
  hold(): void {
    this.busy = true;
  }

  /** The MCU's previous connection was handled to its end (LeanMqttServer.drained): handle what this one received. */
  proceed(): void {
    this.busy = false;
    // closed while it waited: its QoS 0 PUBLISHes are still stored, as behind a store
    if (this.closed) return this.drainClosed();
    this.drain();
  }

  /** Called by the server's settle queue: answer the stored PUBLISH, then handle what came after it. */
  resumeAfter(o: PublishOutcome, qos: number, pid: number): void {
    this.busy = false;
    if (this.closed) {
      // the peer closed while this was being stored (gone()): what it sent before is
      // handled still, QoS 0 only; a store that failed ends that too
      if (o === 'close') this.dropRx();
      // stored, and its PUBACK lost with the link: the MCU resends it on its next connection
      else if (qos === 1) this.server.ackedAfterClose(this, this.storingEntry);
      return this.drainClosed();
    }
    this.published(o, qos, pid);
    this.drain();
  }

  /**
   * After the peer closed its side while a PUBLISH was being stored: handle the complete
   * packets it sent before, QoS 0 PUBLISHes only. A QoS 1/2 PUBLISH cannot be acknowledged
   * any more and the MCU resends it on its next connection (stored now it would be stored
   * twice); nothing else needs an answer, and nothing is written (the socket is closed).
   */
  private drainClosed(): void {
    const limit = this.server.opts.maxRemainingLength;
    while (!this.busy && this.rx !== null) {
      const h = this.frame(limit);
      // incomplete, malformed or too large: nothing after it can be handled
      if (h.kind !== 'ok') break;
      const { start: i, len } = h;
      const buf = this.rx;
      const header = buf[0]!;
      this.advance(buf, i + len);
      if (header >> 4 === T.DISCONNECT) break;
      if ((header & 0xf6) !== 0x30) continue; // not a QoS 0 PUBLISH (DUP and retain bits aside)
      try {
        this.publish(header & 0x0f, buf.subarray(i, i + len));
      } catch {
        break; // malformed: what follows is not trusted either
      }
    }
    if (this.busy) return;
    // handled to its end: the MCU's next connection, if one waits, reads on
    this.dropRx();
    this.server.drained(this);
  }

  private published(o: PublishOutcome, qos: number, pid: number): void {
    if (o === 'close') {
      this.dropRx(); // also after the peer closed: a failed store ends the handling
      return this.destroy();
    }
    if (qos === 1) {
      let ring = (this.ackedRing ??= []);
      if (this.ackedCap === RECENT_ACKED && ring.length === RECENT_ACKED && (this.rx !== null || this.more !== null)) {
        // pipelining: the ring in acknowledgement order, then grown
        ring = this.ackedRing = [...ring.slice(this.ackedPos), ...ring.slice(0, this.ackedPos)];
        this.ackedPos = ring.length;
        this.ackedCap = RECENT_ACKED_PIPELINED;
      }
      ring[this.ackedPos] = this.storingEntry;
      this.ackedPos = (this.ackedPos + 1) % this.ackedCap;
      this.write(ackPacket(0x40, pid));
    } else if (qos === 2) {
      (this.qos2 ??= new Set()).add(pid);
      this.write(ackPacket(0x50, pid));
    }
  }

  private subscribe(body: Buffer): void {
    const r = new Reader(body);
    const pid = r.u16();
    if (pid === 0) throw new Malformed('SUBSCRIBE packet id 0 [MQTT-2.3.1-1]');
    // the whole packet is checked before any filter reaches the hook
    const filters: string[] = [];
    const qoss: number[] = [];
    while (!r.done()) {
      const filter = r.str();
      const q = r.u8();
      if (q > 2 || filter.length === 0) throw new Malformed('bad subscription [MQTT-3.8.3-4]');
      if (filters.length === MAX_SUBSCRIBE_FILTERS) throw new Malformed(`more than ${MAX_SUBSCRIBE_FILTERS} filters in one SUBSCRIBE`);
      filters.push(filter);
      qoss.push(q);
    }
    if (filters.length === 0) throw new Malformed('SUBSCRIBE without a filter [MQTT-3.8.3-3]');
    const granted: string[] = [];
    // SUBACK: the packet id and one return code per filter, in order [MQTT-3.8.4-5]; its
    // remaining length takes 2 bytes from 126 filters on [MQTT-2.2.3]
    const len = 2 + filters.length;
    const out = Buffer.allocUnsafe(1 + remainingLengthBytes(len) + len);
    out[0] = 0x90;
    const at = writeRemainingLength(out, 1, len);
    out.writeUInt16BE(pid, at);
    for (let k = 0; k < filters.length; k++) {
      const g = this.server.opts.hooks.onSubscribe(this, filters[k]!, qoss[k]!);
      out[at + 2 + k] = g;
      if (g !== 0x80) {
        (this.filters ??= new Map()).set(filters[k]!, g);
        granted.push(filters[k]!);
      }
    }
    this.recomputeSubs();
    this.write(out);
    if (granted.length > 0) this.server.opts.hooks.onSubscribed?.(this, granted);
  }

  private unsubscribe(body: Buffer): void {
    const r = new Reader(body);
    const pid = r.u16();
    if (pid === 0) throw new Malformed('UNSUBSCRIBE packet id 0 [MQTT-2.3.1-1]');
    const filters: string[] = [];
    while (!r.done()) {
      const f = r.str();
      if (f.length === 0) throw new Malformed('UNSUBSCRIBE with a zero-length filter [MQTT-4.7.3-1]');
      filters.push(f);
    }
    if (filters.length === 0) throw new Malformed('UNSUBSCRIBE without a filter [MQTT-3.10.3-2]');
    for (const f of filters) this.filters?.delete(f);
    this.recomputeSubs();
    this.write(ackPacket(0xb0, pid));
    this.server.opts.hooks.onUnsubscribe?.(this, filters);
  }

  /** subCmd/subFw from the filters: an MCU may only hold its own cmd, fw or `#` (the ACL). */
  private recomputeSubs(): void {
    this.subCmd = -1;
    this.subFw = -1;
    if (!this.filters) return;
    for (const [f, q] of this.filters) {
      if (f.endsWith('/#')) {
        this.subCmd = Math.max(this.subCmd, q);
        this.subFw = Math.max(this.subFw, q);
      } else if (f.endsWith('/cmd')) this.subCmd = Math.max(this.subCmd, q);
      else if (f.endsWith('/fw')) this.subFw = Math.max(this.subFw, q);
    }
  }

  /** Send a PUBLISH (QoS 0 or 1) to this client. False when the connection is gone. */
  send(topic: string, payload: Buffer, qos: 0 | 1): boolean {
    if (this.closed) return false;
    const tl = Buffer.byteLength(topic);
    const len = 2 + tl + (qos ? 2 : 0) + payload.length;
    const out = Buffer.allocUnsafe(1 + remainingLengthBytes(len) + len);
    out[0] = 0x30 | (qos << 1);
    let o = writeRemainingLength(out, 1, len);
    out.writeUInt16BE(tl, o);
    o += 2;
    o += out.write(topic, o, 'utf8');
    if (qos) {
      this.pid = (this.pid % 0xffff) + 1;
      out.writeUInt16BE(this.pid, o);
      o += 2;
    }
    payload.copy(out, o);
    this.write(out);
    return true;
  }

  private write(buf: Buffer): void {
    if (this.closed || this.socket.destroyed) return;
    if (this.socket.writableLength > MAX_WRITE_BACKLOG) {
      this.destroy();
      return;
    }
    this.socket.write(buf);
  }

  private tooLarge(msg: string): void {
    if (this.closed) return;
    this.server.opts.hooks.onTooLarge(new FleetError('FLEET_MSG_INVALID', msg), this);
    this.destroy();
  }

  private malformed(msg: string): void {
    if (this.closed) return;
    this.server.opts.hooks.onMalformed(new FleetError('FLEET_MSG_INVALID', msg), this);
    this.destroy();
  }

  /** Close after what was written (CONNACK refusals, DISCONNECT). */
  end(): void {
    if (this.closed) return;
    this.closed = true;
    this.dropRx();
    this.socket.end();
    // a peer that does not close its side is cut off 5 s later, whatever it sends meanwhile
    // (an idle timer would be restarted by every byte: a refused client trickling bytes kept
    // its socket, and its place in the unauthenticated-connection caps, for good); what it
    // sends is not read any more
    this.socket.pause();
    const cut = setTimeout(() => this.socket.destroy(), END_GRACE_MS);
    cut.unref();
    this.socket.once('close', () => clearTimeout(cut));
    this.server.forget(this);
  }

  destroy(): void {
    if (!this.closed) {
      this.closed = true;
      this.dropRx();
      this.server.forget(this);
    }
    this.socket.destroy();
  }

  /**
   * The peer closed its side (FIN or reset). While a PUBLISH is being stored the complete
   * packets behind it stay buffered: its handler's end handles their QoS 0 PUBLISHes
   * (drainClosed). Nothing is written from now on.
   */
  gone(): void {
    if (this.closed) return;
    this.closed = true;
    if (!this.busy) this.dropRx(); // every complete packet was handled already
    this.server.forget(this);
  }
}

function ackPacket(first: number, pid: number): Buffer {
  return Buffer.from([first, 0x02, pid >> 8, pid & 0xff]);
}

/** Reads MQTT fields; throws Malformed past the end. */
class Reader {
  private o = 0;
  constructor(private readonly b: Buffer) {}
  u8(): number {
    if (this.o + 1 > this.b.length) throw new Malformed('packet ends early');
    return this.b[this.o++]!;
  }
  u16(): number {
    if (this.o + 2 > this.b.length) throw new Malformed('packet ends early');
    const v = this.b.readUInt16BE(this.o);
    this.o += 2;
    return v;
  }
  bin(): Buffer {
    const n = this.u16();
    if (this.o + n > this.b.length) throw new Malformed('string runs past the packet');
    const v = this.b.subarray(this.o, this.o + n);
    this.o += n;
    return v;
  }
  str(): string {
    const v = this.bin();
    // ill-formed UTF-8 (surrogates and overlong forms included) or U+0000 [MQTT-1.5.3-1, -2],
    // checked on the bytes: a correctly encoded U+FFFD is a character like any other, and a
    // BOM (EF BB BF) is kept as U+FEFF, not stripped [MQTT-1.5.3-3]
    if (!isUtf8(v) || v.includes(0)) throw new Malformed('string is not well-formed UTF-8');
    return v.toString('utf8');
  }
  rest(): Buffer {
    const v = this.b.subarray(this.o);
    this.o = this.b.length;
    return v;
  }
  done(): boolean {
    return this.o >= this.b.length;
  }
}

/** A ring entry of LeanConn.ackedRing: the packet id and 14 bits of the payload's CRC-32 (a small integer, 30 bits). */
function ackedEntry(pid: number, payload: Buffer): number {
  return (pid << 14) | (crc32(payload) & 0x3fff);
}

function ringHasPid(ring: readonly number[], pid: number): boolean {
  for (let i = 0; i < ring.length; i++) if (ring[i]! >>> 14 === pid) return true;
  return false;
}

/** TCP sockets destroyed by admit() (weak: nothing to clean up) */
const refusedSockets = new WeakSet<Socket>();

export class LeanMqttServer {
  /** authenticated sessions by id, across every listener (an MCU may move from plain TCP to TLS) */
  readonly sessions = new Map<string, LeanConn>();
  private readonly conns = new Set<LeanConn>();
  /** the bound listeners (plain TCP and/or TLS); every one feeds `accept` */
  private readonly servers: Server[] = [];
  /** TCP sockets under the TLS listeners: one still in its handshake is not in `conns` yet, and close() must cut it too */
  private readonly tlsSockets = new Set<Socket>();
  /** unauthenticated connections (TCP sockets in their TLS handshake, and LeanConns before CONNACK 0): in all and by remote address */
  private preAuth = 0;
  private readonly preAuthBy = new Map<string, number>();
  /** TCP sockets counted in `preAuth` while in their TLS handshake, by "address port" (handed to their LeanConn after it) */
  private readonly handshaking = new Map<string, Socket>();
  /** when each TLS socket's TCP connection was accepted */
  private readonly acceptedAt = new WeakMap<Socket, number>();
  private readonly sweepTimer: NodeJS.Timeout;
  /**
   * bytes copied to put received packets together (a packet split over TCP segments, a
   * small rest moved off a large read buffer); whole packets per segment cost none. Each
   * packet is copied at most about once, so this stays within about the bytes received
   */
  rxCopiedBytes = 0;
  /** connections whose stored PUBLISH waits to be answered (settle), oldest first; `settleHead` is the next */
  private settleQueue: LeanConn[] = [];
  private settleHead = 0;
  private settleScheduled = false;
  /**
   * the last QoS 1 PUBLISHes acknowledged on an MCU's closed connection, by MCU id (oldest
   * first, at most maxConnections MCUs): given to its next connection, so a resend of one
   * whose PUBACK was lost with the link is not stored twice (LeanConn.prevAcked)
   */
  private readonly ackedBefore = new Map<string, readonly number[]>();
  /**
   * by MCU id: its newest connection that closed while busy (a store in progress, QoS 0
   * PUBLISHes held behind it), until drainClosed is done; at most one per MCU
   */
  private readonly draining = new Map<string, LeanConn>();
  /** a connection that reads nothing yet (LeanConn.hold), by its MCU's previous connection it waits for */
  private readonly waiting = new Map<LeanConn, LeanConn>();

  constructor(readonly opts: LeanServerOptions) {
    this.sweepTimer = setInterval(() => this.sweep(), 1000);
    this.sweepTimer.unref();
  }

  /** Listen for MQTT over plain TCP; resolves to the bound port. */
  listen(host: string, port: number): Promise<number> {
    return this.bind(
      createServer({ noDelay: true }, (socket) => {
        if (!this.admit(socket)) return;
        socket.setKeepAlive(true, TCP_KEEPALIVE_MS);
        this.accept(socket, true);
      }),
      host,
      port,
    );
  }

  /**
   * Listen for MQTT over TLS (1.2 or newer) on another port. Once the handshake is done a
   * connection is handled exactly as a plain one (`accept`: same packet code, same
   * sessions). The handshake must finish within the CONNECT timeout. Throws if the
   * certificate or key cannot be used (the caller checks them first to name the key).
   */
  listenTls(host: string, port: number, tls: LeanTlsOptions): Promise<number> {
    const server = createTlsServer(
      { cert: tls.cert, key: tls.key, minVersion: 'TLSv1.2', handshakeTimeout: this.opts.connectTimeoutMs ?? 10_000, noDelay: true },
      (socket) => {
        // the handshake's count moves to the connection (released at CONNACK 0 or close)
        const key = `${socket.remoteAddress} ${socket.remotePort}`;
        const raw = this.handshaking.get(key);
        if (raw !== undefined) this.handshaking.delete(key);
        // the CONNECT timeout counts from the TCP accept, handshake included (not twice over)
        this.accept(socket, raw !== undefined, raw === undefined ? undefined : this.acceptedAt.get(raw));
      },
    );
    // runs before the TLS server's own listener: a socket beyond the caps gets no handshake
    server.prependListener('connection', (raw: Socket) => {
      if (!this.admit(raw)) return;
      const key = `${raw.remoteAddress} ${raw.remotePort}`;
      this.handshaking.set(key, raw);
      this.acceptedAt.set(raw, performance.now());
      this.tlsSockets.add(raw);
      // TCP keepalive (on plain sockets too): a peer that vanished (power cut, half-open
      // connection) is found even with MQTT keep-alive 0, which the sweep never times out
      raw.setKeepAlive(true, TCP_KEEPALIVE_MS);
      raw.once('close', () => {
        this.tlsSockets.delete(raw);
        // still in its handshake (never handed to a LeanConn): release its count here
        if (this.handshaking.get(key) === raw) {
          this.handshaking.delete(key);
          this.release(raw.remoteAddress);
        }
      });
    });
    // With a listener here Node leaves the socket open after a failed handshake (measured: a
    // silent peer stayed connected past its handshake timeout until close()), so end it here
    server.on('tlsClientError', (err, socket) => {
      socket.destroy();
      // a TCP socket refused by admit() fails its handshake too: reported once, as refused.
      // (Node's TLSSocket keeps its TCP socket in `_parent`, not public: were it gone, such
      // a socket would only be counted twice)
      if (refusedSockets.has((socket as Socket & { _parent?: Socket })._parent as Socket)) return;
      this.opts.hooks.onTlsError?.(err, socket.remoteAddress);
    });
    return this.bind(server, host, port);
  }

  private bind(server: Server, host: string, port: number): Promise<number> {
    // unauthenticated sockets are capped by admit(): room for them on top of the authenticated ones
    server.maxConnections = this.opts.maxConnections + (this.opts.maxPreAuth ?? DEFAULT_MAX_PRE_AUTH);
    return new Promise((resolve, reject) => {
      const onError = (err: NodeJS.ErrnoException) => reject(new FleetError('FLEET_PORT_IN_USE', `cannot listen on ${host}:${port}: ${err.message}`, { cause: err }));
      server.once('error', onError);
      server.listen({ host, port, backlog: this.opts.backlog ?? 511 }, () => {
        server.off('error', onError);
        this.servers.push(server);
        const a = server.address();
        resolve(typeof a === 'object' && a ? a.port : port);
      });
    });
  }

  get connectedClients(): number {
    return this.sessions.size;
  }

  /**
   * Count a new TCP socket against the unauthenticated caps, or destroy it at once (false).
   * Reads its remote address now: Node keeps it for later reads, after the socket closed too.
   */
  private admit(socket: Socket): boolean {
    const addr = socket.remoteAddress ?? '';
    const n = this.preAuthBy.get(addr) ?? 0;
    const why = this.preAuth >= (this.opts.maxPreAuth ?? DEFAULT_MAX_PRE_AUTH) ? 'pre_auth_total' : n >= (this.opts.maxPreAuthPerAddress ?? DEFAULT_MAX_PRE_AUTH_PER_ADDRESS) ? 'pre_auth_address' : null;
    if (why !== null) {
      refusedSockets.add(socket);
      socket.on('error', () => undefined);
      socket.destroy();
      this.opts.hooks.onRefused?.(socket.remoteAddress, why);
      return false;
    }
    this.preAuth++;
    this.preAuthBy.set(addr, n + 1);
    return true;
  }

  private release(addr: string | undefined): void {
    const a = addr ?? '';
    this.preAuth--;
    const n = (this.preAuthBy.get(a) ?? 1) - 1;
    if (n > 0) this.preAuthBy.set(a, n);
    else this.preAuthBy.delete(a);
  }

  get unauthenticated(): number {
    return this.preAuth;
  }

  private accept(socket: Socket, counted: boolean, acceptedAt?: number): void {
    const conn = new LeanConn(socket, this, acceptedAt);
    conn.preAuth = counted;
    this.conns.add(conn);
    socket.on('data', (d: Buffer) => conn.onData(d));
    socket.on('error', () => undefined); // 'close' follows
    // the peer's FIN: nothing can be written any more (Node ends our side too)
    socket.on('end', () => conn.gone());
    socket.on('close', () => {
      conn.gone();
      this.conns.delete(conn);
      if (conn.preAuth) {
        conn.preAuth = false;
        this.release(socket.remoteAddress);
      }
    });
  }

  /**
   * A QoS 1 PUBLISH of a connection that closed meanwhile was stored: its PUBACK cannot be
   * sent, so the MCU resends it on its next connection. Remembered as acknowledged, for that
   * connection (or given to it, when it is open already).
   */
  ackedAfterClose(conn: LeanConn, entry: number): void {
    const id = conn.id;
    if (id === null) return;
    const current = this.sessions.get(id);
    if (current !== undefined && current !== conn) {
      current.inheritOne(entry);
      return;
    }
    this.keepAcked(id, [...(this.ackedBefore.get(id) ?? []), entry].slice(-RECENT_ACKED));
  }

  /** Remember what a closed connection of `id` acknowledged last, for its next one (oldest MCU first out). */
  private keepAcked(id: string, acked: readonly number[]): void {
    this.ackedBefore.delete(id); // re-inserted: the map is oldest first
    this.ackedBefore.set(id, acked);
    // bounded: at most as many MCUs as may be connected; the longest gone are forgotten
    if (this.ackedBefore.size > this.opts.maxConnections) this.ackedBefore.delete(this.ackedBefore.keys().next().value!);
  }

  /**
   * A CONNECT was accepted: the newest connection of an id takes over [MQTT-3.1.4-2]. While
   * the MCU's previous connection is still being handled (a store in progress, taken over
   * or closed, and after a close the QoS 0 PUBLISHes behind it: drainClosed), the new one
   * reads nothing after its CONNECT until that is done (`drained`). Else its PUBLISHes were
   * stored in between the old ones (a QoS 0 burst and a close, then a reconnect: each held
   * one waits for its own outbox commit), out of the order the MCU sent them.
   */
  adopt(conn: LeanConn, id: string): void {
    if (conn.preAuth) {
      conn.preAuth = false;
      this.release(conn.socket.remoteAddress);
    }
    const old = this.sessions.get(id);
    conn.id = id;
    this.sessions.set(id, conn);
    const prev = old !== undefined && old !== conn ? old : this.draining.get(id);
    if (prev?.isBusy) {
      // one waiter per connection: `prev` is the newest of its id, so the only one adopted after it
      this.waiting.set(prev, conn);
      conn.hold();
    }
    if (old && old !== conn) {
      // a takeover: the old connection is still open (a half-open link the MCU gave up on)
      conn.inherit(old.recentAcked());
      old.destroy();
    } else {
      conn.inherit(this.ackedBefore.get(id) ?? null);
    }
    this.ackedBefore.delete(id);
  }

  /**
   * A PUBLISH's store settled: its PUBACK, and the packets its connection sent meanwhile,
   * are handled from a queue, half of what waits (at least SETTLE_SLICE) per turn of the
   * event loop. The stores of thousands of MCUs settle together (one outbox commit); answering all of them
   * in one go held the event loop for tens of milliseconds (a write(2) per PUBACK), and
   * with it the reading of every other MCU and the uplink of what was read. Sliced, the
   * loop polls sockets between slices, so what arrives meanwhile is forwarded without
   * waiting for the last PUBACK of the commit before it. The connection stays busy until its
   * turn (its order and its read pause hold), and a connection has one PUBLISH in the
   * queue at most. Half, not a fixed number: while a connection waits here its next PUBLISH
   * waits too, and a fixed 128 a turn fell behind when turns grew long (the simulated MCUs
   * skipped readings whose predecessor was unanswered for a second, s16-ab-new-1/-2).
   */
  settle(conn: LeanConn, o: PublishOutcome, qos: number, pid: number): void {
    conn.settleOutcome = o;
    conn.settleQos = qos;
    conn.settlePid = pid;
    this.settleQueue.push(conn);
    if (!this.settleScheduled) {
      this.settleScheduled = true;
      setImmediate(this.settleSlice);
    }
  }

  private readonly settleSlice = (): void => {
    const q = this.settleQueue;
    // at least SETTLE_SLICE, and half of what waits: a backlog is halved every turn, so the
    // answers keep up with any load (128 a turn fell behind when turns grew long, and a
    // connection waiting for its answer holds its next PUBLISH)
    const end = Math.min(q.length, this.settleHead + Math.max(SETTLE_SLICE, Math.ceil((q.length - this.settleHead) / 2)));
    while (this.settleHead < end) {
      const conn = q[this.settleHead]!;
      q[this.settleHead++] = undefined as unknown as LeanConn; // not pinned until the queue empties
      try {
        conn.resumeAfter(conn.settleOutcome, conn.settleQos, conn.settlePid);
      } catch (err) {
        // a hook that throws is a bug: its connection is closed, the rest of this slice is
        // still answered, and the error is rethrown (uncaught, as an unhandled rejection
        // of the store's promise was before the queue); a connection of its MCU waiting for
        // it reads on
        conn.destroy();
        this.drained(conn);
        process.nextTick(() => {
          throw err;
        });
      }
    }
    if (this.settleHead < q.length) {
      // under a load that never lets the queue empty, the answered head is dropped now and then
      if (this.settleHead >= 4096 && this.settleHead * 2 >= q.length) {
        this.settleQueue = q.slice(this.settleHead);
        this.settleHead = 0;
      }
      setImmediate(this.settleSlice);
      return;
    }
    this.settleQueue = [];
    this.settleHead = 0;
    this.settleScheduled = false;
  };

  forget(conn: LeanConn): void {
    if (conn.id !== null && this.sessions.get(conn.id) === conn) {
      this.sessions.delete(conn.id);
      // closed with a store in progress (or waiting for its own predecessor): the MCU's
      // next connection waits for the rest of its handling (adopt)
      if (conn.isBusy) this.draining.set(conn.id, conn);
      const acked = conn.recentAcked();
      if (acked !== null && acked.length > 0) this.keepAcked(conn.id, acked);
      this.opts.hooks.onClose?.(conn);
    }
  }

  /** A closed connection was handled to its end (drainClosed): the next one of its MCU, if one waits, reads on. */
  drained(conn: LeanConn): void {
    if (conn.id !== null && this.draining.get(conn.id) === conn) this.draining.delete(conn.id);
    const next = this.waiting.get(conn);
    if (next === undefined) return;
    this.waiting.delete(conn);
    next.proceed();
  }

  /** Keep-alive [MQTT-3.1.2-24] and CONNECT timeouts, once a second for all connections. */
  private sweep(): void {
    // the monotonic clock: a wall-clock step (NTP at boot on a board without an RTC) must
    // neither drop every connection at once nor keep dead ones open until it catches up
    const now = performance.now();
    const connectTimeout = this.opts.connectTimeoutMs ?? 10_000;
    let backlog = 0;
    for (const c of this.conns) {
      if (c.isClosed) continue;
      if (c.id === null) {
        if (now - c.openedAt > connectTimeout) c.destroy();
      } else if (c.keepaliveMs > 0 && now - c.lastRx > c.keepaliveMs * 1.5) c.destroy();
      backlog += c.socket.writableLength;
    }
    const cap = this.opts.maxWriteBacklogTotal ?? DEFAULT_MAX_WRITE_BACKLOG_TOTAL;
    if (backlog > cap) this.shedBacklog(backlog, cap);
  }

  /**
   * Peers that do not read what they asked for (firmware chunks) hold gateway memory: over
   * all connections at most `cap`; the ones holding the most are closed first (they resume
   * after a reconnect, as after any disconnect).
   */
  private shedBacklog(total: number, cap: number): void {
    const holders = [...this.conns].filter((c) => !c.isClosed && c.socket.writableLength > 0).sort((a, b) => b.socket.writableLength - a.socket.writableLength);
    for (const c of holders) {
      if (total <= cap) break;
      total -= c.socket.writableLength;
      this.opts.hooks.onRefused?.(c.remote, 'write_backlog');
      c.destroy();
    }
  }

  async close(): Promise<void> {
    clearInterval(this.sweepTimer);
    const closed = this.servers.map((s) => new Promise<void>((r) => s.close(() => r())));
    for (const c of this.conns) c.destroy();
    for (const raw of this.tlsSockets) raw.destroy();
    await Promise.all(closed);
  }
}
