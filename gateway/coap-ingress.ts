import { createSocket, type Socket } from 'node:dgram';
import { isIPv6, type AddressInfo } from 'node:net';
import { createServer, type IncomingMessage, type OutgoingMessage, type Server } from 'coap';
import { FleetError, isFleetError, toFleetError } from '../core/errors.ts';
import type { Logger } from '../core/log.ts';
import type { Sample } from '../core/messages.ts';
import { mcuKey, ReplayGuard, verifyMcuMessage } from '../firmware-bridge/auth.ts';
import { COAP_CODES, COAP_OPTION, parseCoapUrl, scanCoapDatagram } from '../firmware-bridge/coap.ts';
import { decodeSenmlJson } from '../firmware-bridge/senml.ts';
import { deliverFailureReason, LogThrottle, type DropReason, type IngressHooks } from './ingress.ts';

export interface McuCoapIngressOptions {
  host: string;
  port: number;
  siteSecret: string;
  /** replay state, shared with the gateway's persistence */
  guard: ReplayGuard;
  maxPayloadBytes: number;
  maxRecords: number;
  log: Logger;
  hooks: IngressHooks;
}

type CoapCode = (typeof COAP_CODES)[keyof typeof COAP_CODES];

/** Room for header, token, Uri-Path and the Uri-Query with counter and MAC. */
const DATAGRAM_OVERHEAD = 512;
const ACCEPTED_FORMATS: ReadonlySet<unknown> = new Set(['application/senml+json', 'application/json', 110, 50]);

/**
 * The MCU CoAP listener (UDP, no DTLS: messages carry an app-level MAC and counter,
 * firmware-bridge/auth.ts). One resource for now: POST /mcu/v1/{id}/t with SenML JSON.
 *
 * Every datagram is scanned before the coap package parses it: oversized ones and
 * Block1 requests are dropped unanswered, because the package reassembles Block1
 * uploads without a bound per peer (and FACTS.md: libcoap's Block1 does not
 * interoperate with it anyway). Retransmitted CONs with the same message id are
 * answered from the package's response cache without reaching the handler
 * (RFC 7252 §4.5), so a lost ACK does not turn into a "replay".
 */
export class McuCoapIngress {
  /** responses not ended yet: ended before the server closes (FACTS.md: closing under a pending response crashes) */
  private readonly open = new Set<OutgoingMessage>();
  private readonly pending = new Set<Promise<void>>();
  private readonly throttle: LogThrottle;
  private stopping = false;
  private closed = false;

  private constructor(
    private readonly opts: McuCoapIngressOptions,
    private readonly server: Server,
    private readonly socket: Socket,
    readonly port: number,
  ) {
    this.throttle = new LogThrottle(opts.log);
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
    const server = createServer({ type: isIPv6(opts.host) ? 'udp6' : 'udp4' });
    let ingress: McuCoapIngress | undefined;
    // The package subscribes `handleRequest()` to the socket's 'message' event in
    // listen(): wrap it so every datagram passes our scan first.
    const inner = server.handleRequest.bind(server);
    server.handleRequest = () => {
      const handle = inner();
      return (msg: Buffer, rsinfo: AddressInfo) => {
        if (ingress?.admit(msg)) handle(msg, rsinfo);
      };
    };
    server.on('error', (err: Error) => opts.log.warn('CoAP socket error', { err }));
    server.on('request', (req: IncomingMessage, res: OutgoingMessage) => ingress?.onRequest(req, res));
    ingress = new McuCoapIngress(opts, server, socket, port);
    server.listen(socket);
    return ingress;
  }

  /** Datagram-level checks before the coap package sees it. */
  private admit(msg: Buffer): boolean {
    if (this.closed) return false;
    if (msg.length > this.opts.maxPayloadBytes + DATAGRAM_OVERHEAD) {
      this.opts.hooks.dropped('coap', 'too_large', {});
      return false;
    }
    const info = scanCoapDatagram(msg);
    if (!info) {
      this.opts.hooks.dropped('coap', 'bad_request', {});
      return false;
    }
    if (info.code.startsWith('0.') && info.code !== '0.00' && info.options.includes(COAP_OPTION.BLOCK1)) {
      this.opts.hooks.dropped('coap', 'unsupported', {});
      this.throttle.warn('block1', 'CoAP Block1 request dropped (not supported)', {});
      return false;
    }
    return true;
  }

  private reply(res: OutgoingMessage, code: CoapCode, diagnostic?: string): void {
    this.open.delete(res);
    if (this.closed) return; // the socket is gone; the MCU retransmits or times out
    try {
      res.code = code;
      res.end(diagnostic === undefined ? undefined : Buffer.from(diagnostic));
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

  private onRequest(req: IncomingMessage, res: OutgoingMessage): void {
    this.open.add(res);
    if (this.stopping) return this.reply(res, COAP_CODES.SERVICE_UNAVAILABLE, 'FLEET_STORE');
    const url = parseCoapUrl(req.url);
    if (!url) return this.refuse(res, COAP_CODES.NOT_FOUND, 'bad_request', new FleetError('FLEET_TOPIC_INVALID', `no MCU resource ${req.url.slice(0, 100)}`));
    const { mcuId } = url;
    if (req.method !== 'POST') return this.refuse(res, COAP_CODES.METHOD_NOT_ALLOWED, 'bad_request', new FleetError('FLEET_MSG_INVALID', `${req.method} not allowed on ${req.url.split('?')[0]}`), mcuId);
    const format = req.headers['Content-Format'];
    if (format !== undefined && !ACCEPTED_FORMATS.has(format)) {
      return this.refuse(res, COAP_CODES.UNSUPPORTED_FORMAT, 'unsupported', new FleetError('FLEET_MCU_DECODE', `content format ${String(format)} is not SenML JSON`), mcuId);
    }
    const payload = req.payload ?? Buffer.alloc(0);
    if (payload.length > this.opts.maxPayloadBytes) {
      return this.refuse(res, COAP_CODES.REQUEST_TOO_LARGE, 'too_large', new FleetError('FLEET_MCU_DECODE', `payload of ${payload.length} bytes exceeds ${this.opts.maxPayloadBytes}`), mcuId);
    }
    try {
      verifyMcuMessage(this.opts.guard, { key: mcuKey(this.opts.siteSecret, mcuId), mcuId, resource: url.resource, counter: url.counter, mac: url.mac, payload });
    } catch (err) {
      if (isFleetError(err, 'FLEET_MCU_REPLAY')) return this.refuse(res, COAP_CODES.UNAUTHORIZED, 'replay', err, mcuId);
      if (isFleetError(err, 'FLEET_FORBIDDEN')) return this.refuse(res, COAP_CODES.SERVICE_UNAVAILABLE, 'mcu_limit', err, mcuId);
      this.opts.hooks.authFailed('coap');
      return this.refuse(res, COAP_CODES.UNAUTHORIZED, 'auth', err, mcuId);
    }
    let samples: Sample[];
    try {
      samples = decodeSenmlJson(payload, { maxBytes: this.opts.maxPayloadBytes, maxRecords: this.opts.maxRecords });
    } catch (err) {
      return this.refuse(res, COAP_CODES.BAD_REQUEST, 'decode', err, mcuId);
    }
    // 2.04 only once the samples are in the outbox: it tells the MCU it may forget them
    const p: Promise<void> = this.opts.hooks.deliver(mcuId, 'coap', samples).then(
      () => {
        this.opts.hooks.accepted('coap');
        this.reply(res, COAP_CODES.CHANGED);
      },
      (err: unknown) => {
        const reason = deliverFailureReason(err);
        // 4.03: this id may not be used here; otherwise 5.03: nothing wrong with the
        // message, the MCU should keep it and retry later
        this.refuse(res, reason === 'forbidden' ? COAP_CODES.FORBIDDEN : COAP_CODES.SERVICE_UNAVAILABLE, reason, err, mcuId);
      },
    );
    this.pending.add(p);
    void p.finally(() => this.pending.delete(p));
  }

  /**
   * Close in the order the coap package needs: refuse new requests, let in-flight
   * deliveries answer (up to `graceMs`), end whatever response is still open, then
   * close the server, then the socket.
   */
  async close(graceMs = 2000): Promise<void> {
    if (this.closed) return;
    this.stopping = true;
    if (this.pending.size > 0) {
      await Promise.race([Promise.allSettled([...this.pending]), new Promise((r) => setTimeout(r, graceMs).unref())]);
    }
    for (const res of [...this.open]) this.reply(res, COAP_CODES.SERVICE_UNAVAILABLE, 'FLEET_STORE');
    this.closed = true;
    await new Promise<void>((r) => this.server.close(() => r()));
    await new Promise<void>((r) => this.socket.close(() => r()));
  }
}
