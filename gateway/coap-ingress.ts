import { createSocket, type Socket } from 'node:dgram';
import { isIPv6, type AddressInfo } from 'node:net';
import { createServer, updateTiming, ObserveWriteStream, type IncomingMessage, type OutgoingMessage, type Server } from 'coap';
import { FleetError, isFleetError, toFleetError } from '../core/errors.ts';
import type { Logger } from '../core/log.ts';
import { mcuKey, parseCounter, recordCounter, ReplayGuard, verifyMcuMac, verifyMcuMessage } from '../firmware-bridge/auth.ts';
import { buildCoapPacket, COAP_CODES, COAP_OPTION, parseBlockOption, parseCoapPacket, parseCoapUrl, scanCoapDatagram, TEXT_FORMAT, type ParsedCoapUrl } from '../firmware-bridge/coap.ts';
import { telemetryFormatOf } from '../firmware-bridge/codecs.ts';
import { deliverFailureReason, LogThrottle, type DropReason, type IngressHooks } from './ingress.ts';
import type { McuService } from './service.ts';
import { Block1Assembler } from './uploads.ts';

export interface McuCoapIngressOptions {
  host: string;
  port: number;
  siteSecret: string;
  /** replay state, shared with the gateway's persistence */
  guard: ReplayGuard;
  maxPayloadBytes: number;
  maxRecords: number;
  /** largest Block1 upload, bytes */
  maxUploadBytes: number;
  /** Block1 uploads in progress at once */
  maxUploads: number;
  log: Logger;
  hooks: IngressHooks;
  service: McuService;
}

type CoapCode = (typeof COAP_CODES)[keyof typeof COAP_CODES];

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
 * Bytes of responses the coap package keeps for answering retransmitted requests (RFC 7252
 * §4.5; counted as the response datagrams' bytes, about 10-20 each for our ACKs). Its
 * default, 32 MiB, let it hold millions of entries for EXCHANGE_LIFETIME (247 s); this
 * holds about 500,000: 50 s of 10,000 requests a second, beyond MAX_TRANSMIT_SPAN (45 s),
 * the longest a client retransmits. The oldest go first when it is full.
 */
const RESPONSE_CACHE_BYTES = 8 * 1024 * 1024;
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
  const lru = (server as unknown as { _lru?: { set(key: string, value: CachedResponse): unknown } })._lru;
  if (!lru || typeof lru.set !== 'function') return; // package internals changed: its defaults then apply
  const set = lru.set.bind(lru);
  lru.set = (key, buf) => {
    const r = set(key, buf);
    // the package attaches the sender and sends right after set(), in the same turn
    queueMicrotask(() => {
      const type = (buf[0]! >> 4) & 0x03; // 0 CON, 1 NON, 2 ACK, 3 RST
      if (type === 0 || !buf.sender) return;
      buf.sender.reset();
      delete buf.sender;
    });
    return r;
  };
}

export class McuCoapIngress {
  /** responses not ended yet: ended before the server closes (FACTS.md: closing under a pending response crashes) */
  private readonly open = new Set<OutgoingMessage>();
  private readonly pending = new Set<Promise<void>>();
  /** one Observe registration on the mailbox per MCU (the newest) */
  private readonly observers = new Map<string, OutgoingMessage>();
  /** final Block1 blocks turned into whole requests: their Block1 option, echoed in the response (RFC 7959 §2.3) */
  private readonly block1Echo = new Map<string, Buffer>();
  private readonly throttle: LogThrottle;
  private readonly uploads: Block1Assembler;
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
    const socket = createSocket({ type: isIPv6(opts.host) ? 'udp6' : 'udp4' });
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
    const server = createServer({ type: isIPv6(opts.host) ? 'udp6' : 'udp4', cacheSize: RESPONSE_CACHE_BYTES, piggybackReplyMs: PIGGYBACK_MS });
    releaseAnsweredExchanges(server);
    // Every Block2 request must reach the handler (MAC check, progress per MCU), and one
    // cached copy of a firmware image per token would be memory for nothing: the
    // package's Block2 cache is switched off; the handler answers any block from the
    // image it already holds.
    server._block2Cache.add = () => undefined;
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

  get observing(): number {
    return this.observers.size;
  }

  get uploadsInProgress(): number {
    return this.uploads.inProgress;
  }

  /** Datagram-level checks before the coap package sees it; returns what to hand on. */
  private admit(msg: Buffer, rsinfo: AddressInfo): Buffer | null {
    if (this.closed) return null;
    if (msg.length > this.opts.maxPayloadBytes + DATAGRAM_OVERHEAD) {
      this.opts.hooks.dropped('coap', 'too_large', {});
      return null;
    }
    const info = scanCoapDatagram(msg);
    if (!info) {
      this.opts.hooks.dropped('coap', 'bad_request', {});
      return null;
    }
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
        return null;
      }
      if (verdict.kind === 'reply') {
        this.socket.send(verdict.datagram, rsinfo.port, rsinfo.address);
        return null;
      }
      this.block1Echo.set(`${rsinfo.address}|${rsinfo.port}|${pkt.messageId}`, verdict.block1);
      if (this.block1Echo.size > 1024) this.block1Echo.delete(this.block1Echo.keys().next().value!);
      return verdict.datagram;
    }
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

  private reply(res: OutgoingMessage, code: CoapCode, payload?: Buffer | string): void {
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
      res.end(payload === undefined ? undefined : Buffer.from(payload));
    } catch (err) {
      this.opts.log.debug('CoAP response failed', { err });
    }
  }

  private refuse(res: OutgoingMessage, code: CoapCode, reason: DropReason, err: unknown, mcuId?: string): void {
    const fe = toFleetError(err);
    this.opts.hooks.dropped('coap', reason, { mcuId, err: fe });
    this.throttle.warn(`${reason}:${mcuId ?? '?'}`, 'CoAP MCU message refused', { mcu: mcuId, reason, code, err: fe });
    // the stable error code as diagnostic payload (RFC 7252 §5.5.2): enough for a firmware
    // developer, nothing an attacker does not already know
    this.reply(res, code, fe.code);
  }

  /**
   * MAC and replay check; on failure the request is answered and 0 returned, else the
   * counter. `consume`: 'now' records the counter at once; 'later' only checks it (the
   * caller records it once the message is stored); false checks the MAC only.
   */
  private authenticate(req: IncomingMessage, res: OutgoingMessage, url: ParsedCoapUrl, payload: Buffer, consume: 'now' | 'later' | false): number {
    const { mcuId } = url;
    try {
      const key = mcuKey(this.opts.siteSecret, mcuId);
      if (consume) return verifyMcuMessage(this.opts.guard, { key, mcuId, resource: url.resource, counter: url.counter, mac: url.mac, payload }, consume === 'now' ? 'record' : 'check');
      const counter = parseCounter(url.counter);
      verifyMcuMac(key, mcuId, url.resource, counter, payload, url.mac);
      return counter;
    } catch (err) {
      if (isFleetError(err, 'FLEET_MCU_REPLAY')) this.refuse(res, COAP_CODES.UNAUTHORIZED, 'replay', err, mcuId);
      else if (isFleetError(err, 'FLEET_FORBIDDEN')) this.refuse(res, COAP_CODES.SERVICE_UNAVAILABLE, 'mcu_limit', err, mcuId);
      else {
        this.opts.hooks.authFailed('coap');
        this.refuse(res, COAP_CODES.UNAUTHORIZED, 'auth', err, mcuId);
      }
      return 0;
    }
  }

  private onRequest(req: IncomingMessage, res: OutgoingMessage): void {
    this.open.add(res);
    if (this.stopping) return this.reply(res, COAP_CODES.SERVICE_UNAVAILABLE, 'FLEET_STORE');
    const url = parseCoapUrl(req.url);
    if (!url) return this.refuse(res, COAP_CODES.NOT_FOUND, 'bad_request', new FleetError('FLEET_TOPIC_INVALID', `no MCU resource ${req.url.slice(0, 100)}`));
    const echo = this.block1Echo.get(`${req.rsinfo.address}|${req.rsinfo.port}|${req._packet.messageId}`);
    if (echo) {
      this.block1Echo.delete(`${req.rsinfo.address}|${req.rsinfo.port}|${req._packet.messageId}`);
      res.setOption('Block1', echo);
    }
    const { mcuId, resource } = url;
    const notAllowed = () => this.refuse(res, COAP_CODES.METHOD_NOT_ALLOWED, 'bad_request', new FleetError('FLEET_MSG_INVALID', `${req.method} not allowed on ${req.url.split('?')[0]}`), mcuId);
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
        if (payload.length > this.opts.maxUploadBytes) return this.refuse(res, COAP_CODES.REQUEST_TOO_LARGE, 'too_large', new FleetError('FLEET_MCU_UPLOAD', `upload of ${payload.length} bytes exceeds ${this.opts.maxUploadBytes}`), mcuId);
        break;
      case 't':
      case 'hello':
      case 'ack':
        if (req.method !== 'POST') return notAllowed();
        if (payload.length > this.opts.maxPayloadBytes) return this.refuse(res, COAP_CODES.REQUEST_TOO_LARGE, 'too_large', new FleetError('FLEET_MCU_DECODE', `payload of ${payload.length} bytes exceeds ${this.opts.maxPayloadBytes}`), mcuId);
        break;
      default:
        return notAllowed();
    }
    const format = req.headers['Content-Format'];
    const telemetryFormat = resource === 't' ? telemetryFormatOf(format) : null;
    if (resource === 't' && telemetryFormat === null) {
      return this.refuse(res, COAP_CODES.UNSUPPORTED_FORMAT, 'unsupported', new FleetError('FLEET_MCU_DECODE', `content format ${String(format)} is not SenML JSON, SenML CBOR or the compact form`), mcuId);
    }
    const counter = this.authenticate(req, res, url, payload, 'later');
    if (!counter) return;
    const svc = this.opts.service;
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
        recordCounter(this.opts.guard, mcuId, counter);
        this.opts.hooks.accepted('coap', resource);
        this.reply(res, COAP_CODES.CHANGED);
      },
      (err: unknown) => {
        const reason = deliverFailureReason(err);
        if (reason === 'decode') recordCounter(this.opts.guard, mcuId, counter); // authentic, undecodable: spent
        // 4.00: authenticated but undecodable; 4.03: this id may not be used here;
        // otherwise 5.03: nothing wrong with the message, keep it and retry later
        const code = reason === 'decode' ? COAP_CODES.BAD_REQUEST : reason === 'forbidden' ? COAP_CODES.FORBIDDEN : COAP_CODES.SERVICE_UNAVAILABLE;
        this.refuse(res, code, reason, err, mcuId);
      },
    );
    this.pending.add(p);
    void p.finally(() => this.pending.delete(p));
  }

  /** GET cmd: the next command (or empty), and with Observe=0 the following ones as they come. */
  private onMailbox(req: IncomingMessage, res: OutgoingMessage, url: ParsedCoapUrl): void {
    const { mcuId } = url;
    // Observe=1 deregisters (RFC 7641 §3.6): nothing is revealed, no counter is spent
    if (req.headers.Observe === 1) {
      const cur = this.observers.get(mcuId);
      if (cur) this.endObserver(mcuId, cur);
      return this.reply(res, COAP_CODES.CONTENT);
    }
    if (!this.authenticate(req, res, url, Buffer.alloc(0), 'now')) return;
    try {
      this.opts.service.touch(mcuId, 'coap');
    } catch (err) {
      return this.refuse(res, COAP_CODES.SERVICE_UNAVAILABLE, deliverFailureReason(err), err, mcuId);
    }
    this.opts.hooks.accepted('coap', 'cmd');
    const next = this.opts.service.nextCommand(mcuId) ?? Buffer.alloc(0);
    res.setOption('Content-Format', 'text/plain');
    if (req.headers.Observe !== 0) return this.reply(res, COAP_CODES.CONTENT, next);
    const old = this.observers.get(mcuId);
    if (old) this.endObserver(mcuId, old);
    this.observers.set(mcuId, res);
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

  private endObserver(mcuId: string, res: OutgoingMessage): void {
    this.observers.delete(mcuId);
    this.open.delete(res);
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
    // every block repeats the query: MAC checked, counter not consumed (docs "CoAP")
    if (!this.authenticate(req, res, url, Buffer.alloc(0), false)) return;
    const image = this.opts.service.firmwareFor(mcuId);
    if (!image) return this.refuse(res, COAP_CODES.NOT_FOUND, 'bad_request', new FleetError('FLEET_MCU_NO_FIRMWARE', `no firmware is offered to ${mcuId}`), mcuId);
    if (url.image !== undefined && !image.sha256.toString('hex').startsWith(url.image.toLowerCase())) {
      return this.refuse(res, COAP_CODES.PRECONDITION_FAILED, 'bad_request', new FleetError('FLEET_MCU_NO_FIRMWARE', `the offered image is not ${url.image.slice(0, 64)}`), mcuId);
    }
    const raw = req._packet.options?.find((o) => o.name === 'Block2')?.value;
    const block = Buffer.isBuffer(raw) ? parseBlockOption(raw) : null;
    const size = block?.size ?? 1024;
    const num = block?.num ?? 0;
    const start = num * size;
    if (start >= image.data.length && image.data.length > 0) return this.reply(res, COAP_CODES.BAD_OPTION);
    const end = Math.min(image.data.length, start + size);
    try {
      this.opts.service.touch(mcuId, 'coap');
    } catch {
      /* serving a block does not need the MCU registered */
    }
    this.opts.service.firmwareServed(mcuId, 'coap', end, end - start);
    res.setOption('Content-Format', 'application/octet-stream');
    // the package's OutMessage.end cuts the block the request asked for (RFC 7959 §2.4)
    this.open.delete(res);
    try {
      res.end(image.data);
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
