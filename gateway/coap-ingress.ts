import { createSocket, type Socket } from 'node:dgram';
import { isIPv6, type AddressInfo } from 'node:net';
import { createServer, updateTiming, ObserveWriteStream, OutgoingMessage, type IncomingMessage, type Server } from 'coap';
import { FleetError, isFleetError, toFleetError, type ErrorCode } from '../core/errors.ts';
import type { Logger } from '../core/log.ts';
import { parseCounter, type McuKeys, recordCounter, ReplayGuard, verifyMcuMac, verifyMcuMessage } from '../firmware-bridge/auth.ts';
import { blockOptionValue, buildCoapPacket, COAP_CODES, COAP_OPTION, coapCodeByte, coapUint, coapUintValue, coapUrlOf, parseBlockOption, parseCoapPacket, parseCoapUrl, scanCoapDatagram, TEXT_FORMAT, type BlockOption, type CoapPacket, type ParsedCoapUrl } from '../firmware-bridge/coap.ts';
import { telemetryFormatOf } from '../firmware-bridge/codecs.ts';
import { deliverFailureReason, LogThrottle, type DropReason, type IngressHooks } from './ingress.ts';
import type { McuService } from './service.ts';
import { Block1Assembler, reservedSzx } from './uploads.ts';

export interface McuCoapIngressOptions {
  /** is this MCU's key revoked (mcu.revokedFile)? */
  revoked(mcuId: string): boolean;
  host: string;
  port: number;
  /** per-MCU keys (derived from the site secret) */
  keys: McuKeys;
  /** replay state, shared with the gateway's persistence */
  guard: ReplayGuard;
  maxPayloadBytes: number;
  maxRecords: number;
  /** largest Block1 upload, bytes */
  maxUploadBytes: number;
  /** Block1 uploads in progress at once */
  maxUploads: number;
  /** memory for answers kept for retransmitted requests, bytes (default RESPONSE_CACHE_BYTES, 16 MiB) */
  responseCacheBytes?: number | undefined;
  log: Logger;
  hooks: IngressHooks;
  service: McuService;
}

type CoapCode = (typeof COAP_CODES)[keyof typeof COAP_CODES];
/**
 * Whom a refusal is about (the log throttle's key): an MCU whose MAC checked out, or, before
 * that, only a claim: the id from the URL, anyone's to choose, and the source address.
 */
type Subject = { mcuId: string; verified: true } | { mcuId?: string | undefined; from: string };
/** Answers one request: a response code, an optional payload (the diagnostic for errors) and Max-Age (s). */
type Respond = (code: CoapCode, payload?: Buffer | string, maxAgeS?: number) => void;

/**
 * SO_RCVBUF of the MCU socket. Linux's default (rmem_default, 208 KiB) holds about 300 small
 * datagrams with their per-packet overhead: at 3,000 CoAP MCUs a stall of the event loop of
 * 0.1 s overflowed it, and every request dropped there came back only with the MCU's
 * retransmission, 2-3 s later (RcvbufErrors in /proc/net/snmp). The kernel caps it at
 * net.core.rmem_max (4 MiB here; raise that sysctl on a gateway for more).
 */
const RECV_BUFFER_BYTES = 4 * 1024 * 1024;

/** Room for header, token, Uri-Path and the Uri-Query with counter and MAC. */
const DATAGRAM_OVERHEAD = 512;
const UPLOAD_IDLE_MS = 60_000;

/**
 * The MCU CoAP listener (UDP, no DTLS: requests carry an app-level MAC and counter,
 * firmware-bridge/auth.ts). Resources (docs/mcu-protocol.md "CoAP"):
 * POST t / hello / ack, POST|PUT log (Block1), GET cmd (Observe), GET fw (Block2).
 *
 * Every datagram is scanned before the coap package parses it: oversized and malformed
 * ones are dropped, and Block1 requests go to our own reassembly (uploads.ts) — the
 * package's keys blocks by token, which libcoap changes per block, and throws on the
 * last block. Retransmitted CONs with the same message id are answered from the
 * package's response cache without reaching the handler (RFC 7252 §4.5), so a lost ACK
 * does not turn into a "replay".
 */
/**
 * Memory for the answers the coap package keeps for retransmitted requests (RFC 7252 §4.5),
 * each for EXCHANGE_LIFETIME (57 s). The package counts only a datagram's bytes (10-20 for
 * our ACKs), so its budget held about 1.2 million entries of ~550 bytes of heap each (key,
 * buffer, LRU slots; measured with the package's cache and coap-packet answers): 8 MiB
 * "counted" was about 650 MB. Each entry is counted here as its datagram plus
 * CACHE_ENTRY_OVERHEAD, so 16 MiB holds about 30,000 answers: the package path's requests
 * (GET cmd and fw, log, Block1 ends) for 57 s at 500 a second, or the first retransmissions
 * (2-3 s, ACK_TIMEOUT) at 10,000 a second. The oldest go first when it is full; a
 * retransmission whose answer went is handled again (a spent counter then gets 4.01 replay).
 */
const RESPONSE_CACHE_BYTES = 16 * 1024 * 1024;
/** heap per cached answer besides its datagram, bytes (measured ≈550 per entry with a 7-byte ACK) */
const CACHE_ENTRY_OVERHEAD = 544;
/**
 * How long a response may take and still go back piggybacked on the ACK (the package's
 * default is 50 ms). Telemetry is answered once it is in the outbox, a group commit with
 * fsync, which under load takes longer than 50 ms; the package then sends an empty ACK and
 * the answer as a separate confirmable response the MCU must acknowledge: twice the
 * datagrams, in both directions, just when the gateway is busiest. 1 s stays below the
 * MCU's first retransmission (ACK_TIMEOUT, 2 s) [RFC 7252 §5.2.1].
 */
const PIGGYBACK_MS = 1000;
/**
 * MAX_LATENCY of RFC 7252 §4.8.2, s: the package's default is the RFC's 100 s, meant for
 * the Internet, which makes EXCHANGE_LIFETIME (how long answers stay cached for
 * retransmissions) 247 s. MCUs reach their gateway over the site's LAN or Wi-Fi; 5 s gives
 * 57 s, still beyond MAX_TRANSMIT_SPAN (45 s), the last moment a client retransmits, and a
 * quarter of the cache's memory (measured: 107 KB per MCU sending once a second with 247 s).
 * It is the coap package's process-wide timing; the gateway is its only user in the process.
 */
const MAX_LATENCY_S = 5;

interface CachedResponse extends Buffer {
  sender?: { reset(): void };
}

/**
 * The coap package answers every request through a RetrySend whose timeout timer (MAX_RTT,
 * about 5 minutes, for a piggybacked ACK) keeps the sender, the response stream and the
 * request alive, and caches the response with the sender attached: measured 350 KB of
 * gateway memory per MCU at 2,000 CoAP MCUs sending once a second (scripts/bench/
 * gateway-scale.mjs --protocol coap), growing with the message rate. A response that is not
 * confirmable (an ACK, or a NON) is never retransmitted by the server, so once it is sent
 * its timers are cleared and the sender dropped from the cache entry; the datagram stays
 * cached for retransmitted requests. Confirmable responses (separate responses, Observe
 * notifications) keep their sender: it retransmits them until the MCU acknowledges.
 */
function releaseAnsweredExchanges(server: Server): void {
  const lru = (server as unknown as { _lru?: { set(key: string, value: CachedResponse, opts?: { size?: number }): unknown; delete?(key: string): unknown } })._lru;
  if (!lru || typeof lru.set !== 'function') return; // package internals changed: its defaults then apply
  const set = lru.set.bind(lru);
  lru.set = (key, buf) => {
    // the entry's real cost, not the package's datagram bytes (RESPONSE_CACHE_BYTES)
    const r = set(key, buf, { size: buf.length + CACHE_ENTRY_OVERHEAD });
    // the package attaches the sender and sends right after set(), in the same turn
    queueMicrotask(() => {
      const type = (buf[0]! >> 4) & 0x03; // 0 CON, 1 NON, 2 ACK, 3 RST
      if (type === 0) return;
      if (buf.sender) {
        buf.sender.reset();
        delete buf.sender;
      }
      // a refusal anyone can provoke (4.01 bad MAC or replay, 4.04, 4.05, 4.12, 4.13 …) is
      // not kept for retransmissions: a retransmitted request is checked again and gets the
      // same answer, and requests that need no key must not cost the gateway memory for a
      // minute each (docs/mcu-protocol.md: no state for a message whose MAC does not verify).
      // Kept: 4.00 and 5.xx, which come after the MAC checked out, some with the counter
      // spent (a retransmission would get 4.01 replay instead of the real answer)
      const code = buf[1]!;
      if (code >> 5 === 4 && code !== ((4 << 5) | 0)) lru.delete?.(key);
    });
    return r;
  };
}

/**
 * EXCHANGE_LIFETIME of RFC 7252 §4.8.2 with MAX_LATENCY_S: MAX_TRANSMIT_SPAN (45 s) +
 * 2 × MAX_LATENCY + PROCESSING_DELAY (2 s). A retransmission comes within MAX_TRANSMIT_SPAN.
 */
const EXCHANGE_LIFETIME_MS = (45 + 2 * MAX_LATENCY_S + 2) * 1000;
/** fast-path exchanges remembered per MCU at an endpoint (an MCU has one request outstanding, NSTART 1) */
const EXCHANGES_PER_ENDPOINT = 4;
/** endpoints (address, port and MCU) remembered, most recently active first out last */
const MAX_ENDPOINTS = 100_000;
/** endpoints beyond MAX_ENDPOINTS while their requests are being handled */
const EXCHANGE_SLACK = 1024;

interface Exchange {
  messageId: number;
  token: Buffer;
  at: number;
  /** the answer datagram; null while the request is being handled */
  answer: Buffer | null;
}

/**
 * The fast path's message-id de-duplication (RFC 7252 §4.5): the last few exchanges of each
 * endpoint, with their answers, for EXCHANGE_LIFETIME. A retransmission (same message id and
 * token) of an answered request gets the same answer again; one of a request still being
 * handled is dropped (the answer, piggybacked on the ACK, answers every copy). A message id
 * reused with another token is a new request (a stack that restarts its message ids after a
 * deep sleep, on a fixed port): handled, not answered with the old 2.04. Bounded by endpoints (the least
 * recently active go first) and by exchanges per endpoint: about 200 bytes per MCU, where the
 * coap package kept a response cache entry per exchange.
 */
export class RecentExchanges {
  private readonly endpoints = new Map<string, Exchange[]>();

  constructor(
    private readonly maxEndpoints = MAX_ENDPOINTS,
    private readonly lifetimeMs = EXCHANGE_LIFETIME_MS,
    private readonly perEndpoint = EXCHANGES_PER_ENDPOINT,
  ) {}

  get size(): number {
    return this.endpoints.size;
  }

  /** The exchange (`messageId`, `token`) of `endpoint` if it is recent, else a new one (returned with `fresh`). */
  begin(endpoint: string, messageId: number, token: Buffer, now: number): { ex: Exchange; fresh: boolean } {
    this.expire(now);
    let list = this.endpoints.get(endpoint);
    if (list) {
      this.endpoints.delete(endpoint); // re-inserted below: most recently active last
      const i = list.findIndex((ex) => ex.messageId === messageId && now - ex.at < this.lifetimeMs);
      if (i >= 0 && list[i]!.token.equals(token)) {
        this.endpoints.set(endpoint, list);
        return { ex: list[i]!, fresh: false };
      }
      if (i >= 0) list.splice(i, 1); // its message id reused by a new request: that one is over
    } else {
      list = [];
    }
    const ex: Exchange = { messageId, token, at: now, answer: null };
    list.push(ex);
    if (list.length > this.perEndpoint) list.shift();
    this.endpoints.set(endpoint, list);
    // the bound is kept when an answer is (kept()): a request refused before that (a forged
    // MAC) is dropped in the same turn and must not push out a real MCU's exchanges. Requests
    // still being handled may go beyond it, by EXCHANGE_SLACK at most
    while (this.endpoints.size > this.maxEndpoints + EXCHANGE_SLACK) this.endpoints.delete(this.endpoints.keys().next().value!);
    return { ex, fresh: true };
  }

  /** An answer was kept: the least recently active endpoints beyond the bound are forgotten. */
  kept(): void {
    while (this.endpoints.size > this.maxEndpoints) this.endpoints.delete(this.endpoints.keys().next().value!);
  }

  /** Forget one exchange (its answer is not to be repeated: the request is to be handled again if it comes again). */
  drop(endpoint: string, ex: Exchange): void {
    const list = this.endpoints.get(endpoint);
    if (!list) return;
    const i = list.indexOf(ex);
    if (i >= 0) list.splice(i, 1);
    if (list.length === 0) this.endpoints.delete(endpoint);
  }

  /**
   * Endpoints whose newest exchange is older than the lifetime are forgotten: they are at the
   * least recently active end of the map, so a look at its first few entries per call keeps
   * the map to what arrived within the lifetime, without a timer.
   */
  private expire(now: number): void {
    let n = 0;
    for (const [endpoint, list] of this.endpoints) {
      const newest = list.at(-1);
      if (n++ >= 4 || (newest && now - newest.at < this.lifetimeMs)) return;
      this.endpoints.delete(endpoint);
    }
  }
}

/**
 * The answer to a request (RFC 7252 §5.2): to a CON, piggybacked on the ACK (same message id);
 * to a NON, a NON with a message id of our own. The token is echoed; the only option is
 * Max-Age, when given (the rate limit's 5.03).
 */
function answerDatagram(request: CoapPacket, code: CoapCode, payload: Buffer | undefined, ownMessageId: number, maxAgeS?: number): Buffer {
  const tkl = request.token.length;
  const body = payload && payload.length > 0 ? payload : null;
  // Max-Age (option 14, the only option: delta 14 = nibble 13 and one extended byte, 1)
  const maxAge = maxAgeS === undefined ? null : coapUintValue(maxAgeS);
  const opt = maxAge === null ? 0 : 2 + maxAge.length;
  // its own memory, not a slice of Node's shared 8 KiB pool: a remembered answer would keep
  // its whole pool chunk (and the request copies made in it) alive
  const buf = Buffer.allocUnsafeSlow(4 + tkl + opt + (body ? 1 + body.length : 0));
  const confirmable = request.type === 0;
  const messageId = confirmable ? request.messageId : ownMessageId;
  buf[0] = 0x40 | ((confirmable ? 2 : 1) << 4) | tkl;
  buf[1] = coapCodeByte(code);
  buf[2] = messageId >> 8;
  buf[3] = messageId & 0xff;
  request.token.copy(buf, 4);
  if (maxAge !== null) {
    buf[4 + tkl] = (13 << 4) | maxAge.length;
    buf[5 + tkl] = COAP_OPTION.MAX_AGE - 13;
    maxAge.copy(buf, 6 + tkl);
  }
  if (body) {
    buf[4 + tkl + opt] = 0xff;
    body.copy(buf, 5 + tkl + opt);
  }
  return buf;
}

/**
 * Send one datagram; never throws. dgram's send checks port and address synchronously and
 * throws (ERR_SOCKET_BAD_PORT for port 0, which Linux delivers as a source port): a throw
 * from the socket's 'message' handler, or from the promise callback that answers a stored
 * reading, would end the process. Every error, thrown or reported later (EHOSTUNREACH,
 * EPERM from a firewall rule, EACCES for a broadcast address), goes to `onError`; the MCU
 * retransmits or gives up, as for a lost datagram.
 */
export function sendDatagram(socket: Socket, datagram: Buffer, to: { port: number; address: string }, onError: (err: unknown) => void): void {
  try {
    socket.send(datagram, to.port, to.address, (err) => {
      if (err) onError(err);
    });
  } catch (err) {
    onError(err);
  }
}

/** The Reset for a confirmable message (RFC 7252 §4.2): Empty, no token, its message id. */
function resetFor(msg: Buffer): Buffer {
  return Buffer.from([0x70, 0x00, msg[2]!, msg[3]!]);
}

/** Block2 size without a Block2 option in the request, and the largest: RFC 7959 §2.2 SZX 6 */
const MAX_BLOCK = 1024;

/**
 * End a (non-Observe) response with exactly this payload. The coap package's OutMessage.end
 * block-wises what it is given when the request has a Block2 option or the payload is 1024
 * bytes or more: it cuts a block out, sets Block2, and hashes the whole payload into an ETag
 * (coap 1.5 server.js). Our answers are whole already: a firmware block is cut by onFirmware,
 * and an error answer to a Block2 request must not carry Block2 (nor lose its diagnostic
 * payload, which the package dropped for blocks past the first).
 */
function endWhole(res: OutgoingMessage, payload?: Buffer): void {
  OutgoingMessage.prototype.end.call(res, payload);
}

/** resources a POST may reach on the fast path (small, whole in one datagram) */
const FAST_RESOURCES: ReadonlySet<string> = new Set(['t', 'hello', 'ack']);

export class McuCoapIngress {
  /** responses not ended yet: ended before the server closes (FACTS.md: closing under a pending response crashes) */
  private readonly open = new Set<OutgoingMessage>();
  private readonly pending = new Set<Promise<void>>();
  /** one Observe registration on the mailbox per MCU (the newest) */
  private readonly observers = new Map<string, OutgoingMessage>();
  /**
   * per MCU: the address its latest accepted counter-consuming request came from. Firmware
   * blocks go only there: their MAC'd query is reused for every block (its counter is not
   * consumed), so a captured one sent with a forged source address would otherwise make the
   * gateway send image blocks, ~15 times the request's size, to anyone (RFC 7252 §11.3)
   */
  private readonly authenticatedFrom = new Map<string, string>();
  /** per observation: the endpoint and token of its registration (only they may deregister it) */
  private readonly observerOwners = new WeakMap<OutgoingMessage, string>();
  /** final Block1 blocks turned into whole requests: their Block1 option, echoed in the response (RFC 7959 §2.3) */
  private readonly block1Echo = new Map<string, Buffer>();
  private readonly throttle: LogThrottle;
  private readonly uploads: Block1Assembler;
  /** answered and in-progress exchanges of the fast path */
  private readonly exchanges = new RecentExchanges();
  /** message ids of the fast path's NON answers */
  private nextMessageId = Math.floor(Math.random() * 0x10000);
  private stopping = false;
  private closed = false;

  private constructor(
    private readonly opts: McuCoapIngressOptions,
    private readonly server: Server,
    private readonly socket: Socket,
    readonly port: number,
  ) {
    this.throttle = new LogThrottle(opts.log);
    this.uploads = new Block1Assembler({ maxBytes: opts.maxUploadBytes, maxUploads: opts.maxUploads, idleMs: UPLOAD_IDLE_MS }, (why) => {
      opts.hooks.dropped('coap', 'upload', {});
      this.throttle.warn(`upload:${why}`, 'CoAP Block1 upload refused', { why });
    });
    opts.service.on('head', this.onHead);
  }

  static async start(opts: McuCoapIngressOptions): Promise<McuCoapIngress> {
    // our own socket, so bind errors are ours to report and the close order is ours
    const socket = createSocket({ type: isIPv6(opts.host) ? 'udp6' : 'udp4', recvBufferSize: RECV_BUFFER_BYTES });
    const port = await new Promise<number>((resolve, reject) => {
      const onError = (err: NodeJS.ErrnoException) => reject(new FleetError('FLEET_PORT_IN_USE', `cannot bind UDP ${opts.host}:${opts.port}: ${err.message}`, { cause: err }));
      socket.once('error', onError);
      socket.bind(opts.port, opts.host, () => {
        socket.off('error', onError);
        resolve(socket.address().port);
      });
    });
    // before the server is made: its response cache takes EXCHANGE_LIFETIME as it is then
    updateTiming({ maxLatency: MAX_LATENCY_S });
    const server = createServer({ type: isIPv6(opts.host) ? 'udp6' : 'udp4', cacheSize: opts.responseCacheBytes ?? RESPONSE_CACHE_BYTES, piggybackReplyMs: PIGGYBACK_MS });
    releaseAnsweredExchanges(server);
    // Every Block2 request must reach the handler (MAC check, progress per MCU), and one
    // cached copy of a firmware image per token would be memory for nothing: the
    // package's Block2 cache is switched off; the handler answers any block from the
    // image it already holds.
    server._block2Cache.add = () => undefined;
    // The package answers what it cannot handle (Observe on a POST, a FETCH without
    // Content-Format, a handler error) with _sendError, which sends to the sender's port on
    // *localhost*, not to the sender (coap 1.5: no address): a datagram from another host
    // could make the gateway send to a UDP service bound to its own loopback. Dropped and
    // counted instead, as malformed input is (docs/mcu-protocol.md).
    (server as unknown as { _sendError: (payload: unknown) => void })._sendError = (payload) => {
      opts.hooks.dropped('coap', 'bad_request', {});
      opts.log.debug('CoAP datagram refused by the coap package; dropped unanswered', { why: String(payload).slice(0, 200) });
    };
    let ingress: McuCoapIngress | undefined;
    // The package subscribes `handleRequest()` to the socket's 'message' event in
    // listen(): wrap it so every datagram passes our scan first.
    const inner = server.handleRequest.bind(server);
    server.handleRequest = () => {
      const handle = inner();
      return (msg: Buffer, rsinfo: AddressInfo) => {
        const admitted = ingress?.admit(msg, rsinfo);
        if (admitted) handle(admitted, rsinfo);
      };
    };
    server.on('error', (err: Error) => opts.log.warn('CoAP socket error', { err }));
    server.on('request', (req: IncomingMessage, res: OutgoingMessage) => ingress?.onRequest(req, res));
    ingress = new McuCoapIngress(opts, server, socket, port);
    server.listen(socket);
    return ingress;
  }

  /** Does `mcuId` observe its mailbox now? */
  isObserving(mcuId: string): boolean {
    return this.observers.has(mcuId);
  }

  /** an MCU the gateway no longer acts for (mcu.forgetAfterDays): its source address goes too */
  forget(mcuId: string): void {
    this.authenticatedFrom.delete(mcuId);
  }

  /** A revoked MCU: no more firmware blocks to its address, its mailbox observation ends. */
  revoke(mcuId: string): void {
    this.authenticatedFrom.delete(mcuId);
    const obs = this.observers.get(mcuId);
    if (obs) this.endObserver(mcuId, obs, { code: COAP_CODES.FORBIDDEN, error: 'FLEET_MCU_REVOKED' });
  }

  get observing(): number {
    return this.observers.size;
  }

  /** endpoints with answers kept for retransmissions (fast path) */
  get exchangeEndpoints(): number {
    return this.exchanges.size;
  }

  get uploadsInProgress(): number {
    return this.uploads.inProgress;
  }

  /** answers the coap package keeps for retransmitted requests (GET cmd and fw, Block1, log) */
  get cachedAnswers(): number {
    return (this.server as unknown as { _lru?: { size?: number } })._lru?.size ?? 0;
  }

  /** Send on the MCU socket: every datagram the gateway sends itself goes through here. */
  private send(datagram: Buffer, to: AddressInfo): void {
    if (this.closed) return; // the socket is gone; the MCU retransmits or times out
    sendDatagram(this.socket, datagram, to, this.onSendError);
  }

  private readonly onSendError = (err: unknown): void => {
    const code = typeof err === 'object' && err !== null && 'code' in err ? String(err.code) : '?';
    this.throttle.warn(`send:${code}`, 'CoAP answer not sent', { err });
  };

  /** Datagram-level checks before the coap package sees it; returns what to hand on. */
  private admit(msg: Buffer, rsinfo: AddressInfo): Buffer | null {
    if (this.closed) return null;
    // source port 0 (a raw socket, no key needed) cannot be answered: dropped before anything
    // can try to send to it (dgram throws for port 0; so do the coap package's sends)
    if (rsinfo.port === 0) {
      this.opts.hooks.dropped('coap', 'bad_request', {});
      return null;
    }
    if (msg.length > this.opts.maxPayloadBytes + DATAGRAM_OVERHEAD) {
      this.opts.hooks.dropped('coap', 'too_large', {});
      return null;
    }
    const info = scanCoapDatagram(msg);
    if (!info) {
      this.opts.hooks.dropped('coap', 'bad_request', {});
      return null;
    }
    if (info.code === '0.00' && info.type <= 1) {
      // A CON 0.00 is a CoAP ping (RFC 7252 §4.3): answered with a Reset of its message id, as
      // is one with bytes after the header (a message format error, §4.1, §4.2). An Empty NON
      // means nothing: dropped. Empty ACKs and RSTs go on: they settle the package's
      // confirmable responses and observations.
      if (info.type === 0) this.send(resetFor(msg), rsinfo);
      else this.opts.hooks.dropped('coap', 'bad_request', {});
      return null;
    }
    if (info.code === '0.01' && info.type <= 1 && info.options.includes(COAP_OPTION.OBSERVE) && this.deregister(msg, rsinfo)) return null;
    if (info.code.startsWith('0.') && info.code !== '0.00' && info.options.includes(COAP_OPTION.BLOCK1)) {
      if (this.stopping) return null;
      const pkt = parseCoapPacket(msg);
      if (!pkt) {
        this.opts.hooks.dropped('coap', 'bad_request', {});
        return null;
      }
      const verdict = this.uploads.handle(pkt, rsinfo);
      if (verdict.kind === 'drop') {
        this.opts.hooks.dropped('coap', verdict.reason, {});
        if (verdict.datagram) this.send(verdict.datagram, rsinfo);
        return null;
      }
      if (verdict.kind === 'reply') {
        this.send(verdict.datagram, rsinfo);
        return null;
      }
      this.block1Echo.set(`${rsinfo.address}|${rsinfo.port}|${pkt.messageId}`, verdict.block1);
      if (this.block1Echo.size > 1024) this.block1Echo.delete(this.block1Echo.keys().next().value!);
      return verdict.datagram;
    }
    if (info.code === '0.02' && info.type <= 1 && !info.options.includes(COAP_OPTION.BLOCK2) && !info.options.includes(COAP_OPTION.OBSERVE) && this.fastPost(msg, rsinfo)) return null;
    if (info.options.includes(COAP_OPTION.BLOCK2)) {
      // Block2 0/0/16 is a zero-length uint (RFC 7252 §3.2), which the coap package reads
      // as block size 0 and answers with empty blocks (libcoap's `-b 16` sends it): give
      // it the same value with one zero byte
      const pkt = parseCoapPacket(msg);
      const b2 = pkt?.options.find((o) => o.number === COAP_OPTION.BLOCK2);
      if (pkt && b2 && b2.value.length === 0) {
        b2.value = Buffer.from([0]);
        return buildCoapPacket(pkt);
      }
    }
    return msg;
  }

  /**
   * GET cmd with Observe 1 deregisters (RFC 7641 §3.6): answered here with an empty 2.05, not
   * by the coap package, which would keep the answer for EXCHANGE_LIFETIME: the request needs
   * no key (nothing is revealed, no counter spent), so anyone could fill the response cache
   * with them. Only the registration's own endpoint and token end it: anyone on the network
   * could otherwise silence an MCU's mailbox until it registers again. A retransmission is
   * handled again, to the same effect. Returns false when the request is not one (the coap
   * package handles it).
   */
  private deregister(msg: Buffer, rsinfo: AddressInfo): boolean {
    const pkt = parseCoapPacket(msg);
    const observe = pkt?.options.find((o) => o.number === COAP_OPTION.OBSERVE);
    if (!pkt || !observe || observe.value.length > 3 || coapUint(observe.value) !== 1) return false;
    const url = parseCoapUrl(coapUrlOf(pkt));
    if (!url || url.resource !== 'cmd') return false;
    const cur = this.observers.get(url.mcuId);
    if (cur && this.observerOwners.get(cur) === ownerKey(rsinfo.address, rsinfo.port, pkt.token)) this.endObserver(url.mcuId, cur);
    this.nextMessageId = (this.nextMessageId + 1) & 0xffff;
    this.send(answerDatagram(pkt, COAP_CODES.CONTENT, undefined, this.nextMessageId), rsinfo);
    return true;
  }

  /**
   * The fast path: a CON or NON POST of a reading, hello or ack in one datagram (no Block
   * option), handled here without the coap package. That package makes two streams, a
   * retransmission sender with its timers and a cache entry per request, and when an answer
   * is not ready within piggybackReplyMs it sends an empty ACK and the answer as a separate
   * confirmable response, which it retransmits until the MCU acknowledges it: under load,
   * twice the datagrams and state per reading (measured at 3,000 CoAP MCUs: 143 KB of gateway
   * memory per MCU, p99 2.2 s, 187 requests given up by their MCUs). Here the answer is always
   * piggybacked, sent once the reading is stored; a retransmission meanwhile is dropped, and
   * one after it gets the same answer (RecentExchanges). Returns false when the request is
   * not for the fast path (the coap package handles it, as before).
   */
  private fastPost(msg: Buffer, rsinfo: AddressInfo): boolean {
    const pkt = parseCoapPacket(msg);
    if (!pkt) return false; // the package's own parse reports it
    const url = parseCoapUrl(coapUrlOf(pkt));
    if (!url || !FAST_RESOURCES.has(url.resource)) return false;
    // per MCU at an endpoint: MCUs sharing a socket (behind one NAT port, the simulator's 500
    // a socket) would otherwise push each other's exchanges out within a retransmission's
    // time, and a retransmission of a stored reading be handled again, as a replay
    const endpoint = `${rsinfo.address}|${rsinfo.port}|${url.mcuId}`;
    const { ex, fresh } = this.exchanges.begin(endpoint, pkt.messageId, pkt.token, performance.now());
    if (!fresh) {
      if (ex.answer) this.send(ex.answer, rsinfo);
      return true;
    }
    const respond: Respond = (code, body, maxAgeS) => {
      if (ex.answer) return;
      this.nextMessageId = (this.nextMessageId + 1) & 0xffff;
      const answer = answerDatagram(pkt, code, body === undefined ? undefined : Buffer.from(body), this.nextMessageId, maxAgeS);
      // Remembered for retransmissions: a 2.04, and a 4.00 (authentic but undecodable: its
      // counter is spent, so handling it again would answer "replay"). Other errors keep no
      // state, so a sender without a valid MAC (or a flood from many ports) holds no memory
      // here, and a retransmission after a 5.03 is tried again; a refused request's
      // retransmission is refused again the same way.
      if (code.startsWith('2.') || code === COAP_CODES.BAD_REQUEST) {
        ex.answer = answer;
        this.exchanges.kept();
      } else this.exchanges.drop(endpoint, ex);
      this.send(answer, rsinfo);
    };
    if (this.stopping) {
      respond(COAP_CODES.SERVICE_UNAVAILABLE, 'FLEET_STORE');
      return true;
    }
    const cf = pkt.options.find((o) => o.number === COAP_OPTION.CONTENT_FORMAT);
    this.post(respond, url, pkt.payload, cf === undefined ? undefined : coapUint(cf.value), rsinfo.address);
    return true;
  }

  private reply(res: OutgoingMessage, code: CoapCode, payload?: Buffer | string, maxAgeS?: number): void {
    this.open.delete(res);
    if (this.closed) return; // the socket is gone; the MCU retransmits or times out
    try {
      if ((res as unknown) instanceof ObserveWriteStream) {
        // An Observe request refused (bad MAC, replay…): the coap package's observe stream
        // ignores `code` (it sends `statusCode`) and writes any payload as a notification with
        // an Observe option, so the MCU got a 2.05 "mailbox frame" reading FLEET_MCU_REPLAY.
        // An error answer carries no Observe option and ends the observation (RFC 7641 §4.2);
        // without a payload, the stream sends exactly that.
        (res as unknown as { statusCode: string }).statusCode = code;
        res.end();
        return;
      }
      res.code = code;
      if (maxAgeS !== undefined) res.setOption('Max-Age', maxAgeS);
      endWhole(res, payload === undefined ? undefined : Buffer.from(payload));
    } catch (err) {
      this.opts.log.debug('CoAP response failed', { err });
    }
  }

  private refuse(res: OutgoingMessage | Respond, code: CoapCode, reason: DropReason, err: unknown, who: Subject): void {
    const fe = toFleetError(err);
    const { mcuId } = who;
    this.opts.hooks.dropped('coap', reason, { mcuId, err: fe });
    // throttled per MCU only once its MAC checked out: the id in a URL is anyone's to choose,
    // and one warn line per forged datagram with a new id would flood the log
    const key = 'verified' in who ? `${reason}:${who.mcuId}` : `${reason}@${who.from}`;
    this.throttle.warn(key, 'CoAP MCU message refused', { mcu: mcuId, reason, code, err: fe });
    // the stable error code as diagnostic payload (RFC 7252 §5.5.2): enough for a firmware
    // developer, nothing an attacker does not already know
    if (typeof res === 'function') res(code, fe.code);
    else this.reply(res, code, fe.code);
  }

  /**
   * MAC and replay check; on failure the request is answered and 0 returned, else the
   * counter. `consume`: 'now' records the counter at once; 'later' only checks it (the
   * caller records it once the message is stored); false checks the MAC only.
   */
  private authenticate(res: OutgoingMessage | Respond, url: ParsedCoapUrl, payload: Buffer, consume: 'now' | 'later' | false, from: string): number {
    const { mcuId } = url;
    try {
      const key = this.opts.keys.get(mcuId);
      let counter: number;
      if (consume) counter = verifyMcuMessage(this.opts.guard, { key, mcuId, resource: url.resource, counter: url.counter, mac: url.mac, payload }, consume === 'now' ? 'record' : 'check');
      else {
        counter = parseCounter(url.counter);
        verifyMcuMac(key, mcuId, url.resource, counter, payload, url.mac);
      }
      // checked after the MAC: only the key's holder learns that it is revoked
      if (this.opts.revoked(mcuId)) throw new FleetError('FLEET_MCU_REVOKED', `${mcuId} is on the gateway's revoked list`);
      this.opts.keys.prove(mcuId, key);
      return counter;
    } catch (err) {
      // replay, MCU limit and revoked are found after the MAC checked out
      if (isFleetError(err, 'FLEET_MCU_REPLAY')) this.refuse(res, COAP_CODES.UNAUTHORIZED, 'replay', err, { mcuId, verified: true });
      else if (isFleetError(err, 'FLEET_FORBIDDEN')) this.refuse(res, COAP_CODES.SERVICE_UNAVAILABLE, 'mcu_limit', err, { mcuId, verified: true });
      else if (isFleetError(err, 'FLEET_MCU_REVOKED')) this.refuse(res, COAP_CODES.FORBIDDEN, 'revoked', err, { mcuId, verified: true });
      else {
        this.opts.hooks.authFailed('coap');
        this.refuse(res, COAP_CODES.UNAUTHORIZED, 'auth', err, { mcuId, from });
      }
      return 0;
    }
  }

  private onRequest(req: IncomingMessage, res: OutgoingMessage): void {
    // The package turns every failure of this response's sender into 'error' on it: a send
    // error, and a separate confirmable response (an answer later than PIGGYBACK_MS) the MCU
    // never acknowledges, after EXCHANGE_LIFETIME. Unheard, that 'error' ends the process.
    // Attached before anything can send; the MCU retransmits or gives up, as for a lost datagram.
    res.on('error', (err: unknown) => {
      this.open.delete(res);
      this.opts.log.debug('CoAP response failed', { err });
    });
    this.open.add(res);
    if (this.stopping) return this.reply(res, COAP_CODES.SERVICE_UNAVAILABLE, 'FLEET_STORE');
    const url = parseCoapUrl(req.url);
    if (!url) return this.refuse(res, COAP_CODES.NOT_FOUND, 'bad_request', new FleetError('FLEET_TOPIC_INVALID', `no MCU resource ${req.url.slice(0, 100)}`), { from: req.rsinfo.address });
    const echo = this.block1Echo.get(`${req.rsinfo.address}|${req.rsinfo.port}|${req._packet.messageId}`);
    if (echo) {
      this.block1Echo.delete(`${req.rsinfo.address}|${req.rsinfo.port}|${req._packet.messageId}`);
      res.setOption('Block1', echo);
    }
    const { mcuId, resource } = url;
    const notAllowed = () => this.refuse(res, COAP_CODES.METHOD_NOT_ALLOWED, 'bad_request', new FleetError('FLEET_MSG_INVALID', `${req.method} not allowed on ${req.url.split('?')[0]}`), { mcuId, from: req.rsinfo.address });
    const payload = req.payload ?? Buffer.alloc(0);
    switch (resource) {
      case 'cmd':
        if (req.method !== 'GET') return notAllowed();
        return this.onMailbox(req, res, url);
      case 'fw':
        if (req.method !== 'GET') return notAllowed();
        return this.onFirmware(req, res, url);
      case 'log':
        if (req.method !== 'POST' && req.method !== 'PUT') return notAllowed();
        break;
      case 't':
      case 'hello':
      case 'ack':
        if (req.method !== 'POST') return notAllowed();
        break;
      default:
        return notAllowed();
    }
    this.post((code, body, maxAgeS) => this.reply(res, code, body, maxAgeS), url, payload, req.headers['Content-Format'], req.rsinfo.address);
  }

  /**
   * POST t, hello, ack or log: size, format and MAC checks, hand to the service, and answer
   * 2.04 once it is stored, or the error. Both paths end here: the coap package's requests
   * and the fast path's (fastPost).
   */
  private post(res: Respond, url: ParsedCoapUrl, payload: Buffer, format: unknown, from: string): void {
    const { mcuId, resource } = url;
    if (resource === 'log' && payload.length > this.opts.maxUploadBytes) {
      return this.refuse(res, COAP_CODES.REQUEST_TOO_LARGE, 'too_large', new FleetError('FLEET_MCU_UPLOAD', `upload of ${payload.length} bytes exceeds ${this.opts.maxUploadBytes}`), { mcuId, from });
    }
    if (resource !== 'log' && payload.length > this.opts.maxPayloadBytes) {
      return this.refuse(res, COAP_CODES.REQUEST_TOO_LARGE, 'too_large', new FleetError('FLEET_MCU_DECODE', `payload of ${payload.length} bytes exceeds ${this.opts.maxPayloadBytes}`), { mcuId, from });
    }
    const telemetryFormat = resource === 't' ? telemetryFormatOf(format) : null;
    if (resource === 't' && telemetryFormat === null) {
      return this.refuse(res, COAP_CODES.UNSUPPORTED_FORMAT, 'unsupported', new FleetError('FLEET_MCU_DECODE', `content format ${String(format)} is not SenML JSON, SenML CBOR or the compact form`), { mcuId, from });
    }
    const counter = this.authenticate(res, url, payload, 'later', from);
    if (!counter) return;
    const guard = this.opts.guard;
    // the counter is recorded only once the message is stored: until then it is held, so a
    // copy arriving meanwhile from any address (a replay, or the MCU's resend) is not stored too
    try {
      guard.hold(mcuId, counter);
    } catch (err) {
      this.opts.hooks.dropped('coap', 'replay', { mcuId, err });
      return res(COAP_CODES.SERVICE_UNAVAILABLE, 'FLEET_MCU_IN_FLIGHT', 1);
    }
    const svc = this.opts.service;
    // over the MCU's rate (checked after the MAC, so forged requests cannot spend its tokens):
    // 5.03 with Max-Age; the counter is not spent, the MCU sends the same message again then
    const wait = svc.admit(mcuId);
    if (wait > 0) {
      guard.release(mcuId, counter);
      this.opts.hooks.throttled('coap', mcuId);
      return res(COAP_CODES.SERVICE_UNAVAILABLE, 'FLEET_MCU_RATE', Math.ceil(wait / 1000));
    }
    let work: Promise<void>;
    try {
      if (resource === 't') work = svc.telemetry(mcuId, 'coap', payload, telemetryFormat!);
      else if (resource === 'hello') work = svc.hello(mcuId, 'coap', payload);
      else if (resource === 'ack') work = svc.ack(mcuId, 'coap', payload);
      else work = svc.upload(mcuId, 'coap', payload, format === undefined || format === TEXT_FORMAT || format === 'text/plain');
    } catch (err) {
      work = Promise.reject(err);
    }
    // 2.04 only once it is stored: it tells the MCU it may forget it
    const p: Promise<void> = work.then(
      () => {
        // a revocation that came while this was stored leaves no address behind
        if (recordCounter(guard, mcuId, counter) && !this.opts.revoked(mcuId)) this.authenticatedFrom.set(mcuId, from);
        this.opts.hooks.accepted('coap', resource);
        res(COAP_CODES.CHANGED);
      },
      (err: unknown) => {
        const reason = deliverFailureReason(err);
        if (reason === 'decode') recordCounter(guard, mcuId, counter); // authentic, undecodable: spent
        else guard.release(mcuId, counter);
        // 4.00: authenticated but undecodable; 4.03: this id may not be used here;
        // otherwise 5.03: nothing wrong with the message, keep it and retry later
        const code = reason === 'decode' ? COAP_CODES.BAD_REQUEST : reason === 'forbidden' ? COAP_CODES.FORBIDDEN : COAP_CODES.SERVICE_UNAVAILABLE;
        this.refuse(res, code, reason, err, { mcuId, verified: true });
      },
    );
    this.pending.add(p);
    void p.finally(() => this.pending.delete(p));
  }

  /** GET cmd: the next command (or empty), and with Observe=0 the following ones as they come. */
  private onMailbox(req: IncomingMessage, res: OutgoingMessage, url: ParsedCoapUrl): void {
    const { mcuId } = url;
    // (a deregistration, Observe 1, never comes here: admit() answers it, see deregister())
    if (!this.authenticate(res, url, Buffer.alloc(0), 'now', req.rsinfo.address)) return;
    try {
      this.opts.service.touch(mcuId, 'coap');
    } catch (err) {
      return this.refuse(res, COAP_CODES.SERVICE_UNAVAILABLE, deliverFailureReason(err), err, { mcuId, verified: true });
    }
    // only an MCU the gateway acts for (touch refuses one beyond mcu.maxMcus): nothing else
    // would ever remove its entry
    this.authenticatedFrom.set(mcuId, req.rsinfo.address);
    this.opts.hooks.accepted('coap', 'cmd');
    const next = this.opts.service.nextCommand(mcuId) ?? Buffer.alloc(0);
    res.setOption('Content-Format', 'text/plain');
    if (req.headers.Observe !== 0) return this.reply(res, COAP_CODES.CONTENT, next);
    const old = this.observers.get(mcuId);
    if (old) this.endObserver(mcuId, old);
    this.observers.set(mcuId, res);
    this.observerOwners.set(res, observerOwner(req));
    const forget = () => {
      this.open.delete(res);
      if (this.observers.get(mcuId) === res) this.observers.delete(mcuId);
    };
    res.on('finish', forget);
    res.on('error', forget);
    try {
      res.write(next);
    } catch (err) {
      this.opts.log.debug('CoAP observe write failed', { err });
      forget();
    }
  }

  /**
   * End an observation. With `final`, the MCU is told: a last notification with that error
   * code and no Observe option, which ends the observation at the client too (RFC 7641 §3.2,
   * §4.2). The coap package's own end() sends nothing once a notification went out, so the
   * last one goes through its observe stream's send (an internal of coap 1.x, checked here).
   */
  private endObserver(mcuId: string, res: OutgoingMessage, final?: { code: CoapCode; error: ErrorCode }): void {
    this.observers.delete(mcuId);
    this.open.delete(res);
    const stream = res as unknown as { statusCode: string; _packet?: { options?: Array<{ name: string }> }; _doSend?: (data: Buffer) => void };
    if (final && !this.closed && (res as unknown) instanceof ObserveWriteStream && typeof stream._doSend === 'function' && Array.isArray(stream._packet?.options)) {
      try {
        stream.statusCode = final.code;
        stream._packet.options = stream._packet.options.filter((o) => o.name !== 'Observe' && o.name !== 'Content-Format');
        // the stable error code as diagnostic payload, as in refuse()
        stream._doSend(Buffer.from(final.error));
      } catch (err) {
        this.opts.log.debug('CoAP final notification failed', { err });
      }
    }
    try {
      res.end();
    } catch {
      /* already gone */
    }
  }

  /** The mailbox head changed: notify the MCU if it observes. */
  private onHead = (mcuId: string): void => {
    const res = this.observers.get(mcuId);
    if (!res || this.closed) return;
    const next = this.opts.service.nextCommand(mcuId);
    if (!next) return;
    try {
      res.write(next);
    } catch (err) {
      this.opts.log.debug('CoAP observe notification failed', { err });
      this.endObserver(mcuId, res);
    }
  };

  /** GET fw with Block2: any block of the offered image, of the size asked for. */
  private onFirmware(req: IncomingMessage, res: OutgoingMessage, url: ParsedCoapUrl): void {
    const { mcuId } = url;
    // the address first: a captured query (its counter is not consumed, below) replayed from
    // elsewhere gets this answer whatever the MCU's state, revoked or not, and costs no MAC
    if (this.authenticatedFrom.get(mcuId) !== req.rsinfo.address) {
      return this.refuse(res, COAP_CODES.UNAUTHORIZED, 'auth', new FleetError('FLEET_MCU_ADDRESS', `firmware for ${mcuId} is served to the address of its latest authenticated message; send one (e.g. GET cmd) from this address first`), { mcuId, from: req.rsinfo.address });
    }
    // every block repeats the query: MAC checked, counter not consumed (docs "CoAP")
    if (!this.authenticate(res, url, Buffer.alloc(0), false, req.rsinfo.address)) return;
    const image = this.opts.service.firmwareFor(mcuId);
    if (!image) return this.refuse(res, COAP_CODES.NOT_FOUND, 'bad_request', new FleetError('FLEET_MCU_NO_FIRMWARE', `no firmware is offered to ${mcuId}`), { mcuId, verified: true });
    if (url.image !== undefined && !image.sha256.toString('hex').startsWith(url.image.toLowerCase())) {
      return this.refuse(res, COAP_CODES.PRECONDITION_FAILED, 'bad_request', new FleetError('FLEET_MCU_NO_FIRMWARE', `the offered image is not ${url.image.slice(0, 64)}`), { mcuId, verified: true });
    }
    if (!((res as unknown) instanceof OutgoingMessage)) {
      // an Observe registration (the package's observe stream): firmware is not observable
      return this.refuse(res, COAP_CODES.BAD_REQUEST, 'bad_request', new FleetError('FLEET_MSG_INVALID', 'GET fw with Observe'), { mcuId, verified: true });
    }
    const options = req._packet.options ?? [];
    const raw = options.find((o) => o.name === 'Block2')?.value;
    let block: BlockOption | null = null;
    if (raw !== undefined) {
      block = Buffer.isBuffer(raw) ? parseBlockOption(raw) : null;
      // the reserved SZX 7: 4.00 (RFC 7959 §2.2); a value that is no block option at all
      // (over 3 bytes): 4.02, a bad critical option (RFC 7252 §5.4.1). Nothing counted as served
      if (Buffer.isBuffer(raw) && reservedSzx(raw)) return this.refuse(res, COAP_CODES.BAD_REQUEST, 'bad_request', new FleetError('FLEET_MSG_INVALID', 'Block2 with the reserved SZX 7'), { mcuId, verified: true });
      if (block === null) return this.reply(res, COAP_CODES.BAD_OPTION);
    }
    const data = image.data;
    const size = block?.size ?? MAX_BLOCK;
    const num = block?.num ?? 0;
    const start = num * size;
    if (start > 0 && start >= data.length) return this.reply(res, COAP_CODES.BAD_OPTION);
    const end = Math.min(data.length, start + size);
    try {
      this.opts.service.touch(mcuId, 'coap');
    } catch {
      /* serving a block does not need the MCU registered */
    }
    this.opts.service.firmwareServed(mcuId, 'coap', end, end - start);
    // The block is cut here (RFC 7959 §2.4), with an ETag that names the image: the first
    // 8 bytes of its sha256, computed once when it was loaded. The package's OutMessage.end
    // would cut it itself, and run a byte-by-byte XOR over the whole image, for every block
    // (about 3 ms per block of a 1.5 MiB image, O(image² / block size) per download).
    res.setOption('Content-Format', 'application/octet-stream');
    res.setOption('ETag', image.sha256.subarray(0, 8));
    // without a Block2 option, an image that fits one answer goes whole (as the package did)
    if (block !== null || data.length > MAX_BLOCK) res.setOption('Block2', blockOptionValue({ num, more: end < data.length, size }));
    // Size2 in a request (value 0) asks for the size of the whole (RFC 7959 §4)
    if (options.some((o) => o.name === 'Size2')) res.setOption('Size2', data.length);
    this.open.delete(res);
    try {
      endWhole(res, data.subarray(start, end));
    } catch (err) {
      this.opts.log.debug('CoAP firmware block failed', { err });
    }
  }

  /**
   * Close in the order the coap package needs: refuse new requests, end observers
   * (FACTS.md: closing under an Observe response crashes), let in-flight deliveries
   * answer (up to `graceMs`), end whatever response is still open, then close the
   * server, then the socket.
   */
  async close(graceMs = 2000): Promise<void> {
    if (this.closed) return;
    this.stopping = true;
    this.opts.service.off('head', this.onHead);
    for (const [mcuId, res] of [...this.observers]) this.endObserver(mcuId, res);
    if (this.pending.size > 0) {
      await Promise.race([Promise.allSettled([...this.pending]), new Promise((r) => setTimeout(r, graceMs).unref())]);
    }
    for (const res of [...this.open]) this.reply(res, COAP_CODES.SERVICE_UNAVAILABLE, 'FLEET_STORE');
    // let the last writes leave the socket before it closes
    await new Promise((r) => setImmediate(r));
    this.closed = true;
    this.uploads.close();
    await new Promise<void>((r) => this.server.close(() => r()));
    await new Promise<void>((r) => this.socket.close(() => r()));
  }
}

/** An Observe registration's endpoint and token (RFC 7641 §3.6: a deregistration matches both). */
function observerOwner(req: IncomingMessage): string {
  return ownerKey(req.rsinfo.address, req.rsinfo.port, req._packet.token);
}

function ownerKey(address: string, port: number, token: Buffer | undefined): string {
  return `${address}|${port}|${token?.toString('hex') ?? ''}`;
}
