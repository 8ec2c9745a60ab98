import type { AddressInfo } from 'node:net';
import { blockOptionValue, buildCoapPacket, coapCodeByte, coapUint, coapUintValue, COAP_CODES, COAP_OPTION, parseBlockOption, type CoapPacket } from '../firmware-bridge/coap.ts';

/**
 * Block1 uploads (RFC 7959 §2.5) reassembled at the datagram level, before the coap
 * package sees them. The package keys its Block1 state by token, and libcoap's
 * `coap-client` uses a new token for every block (allowed by RFC 7959 §2.4, the blocks
 * are tied by Request-Tag, RFC 9175) — so the package stores each block alone and then
 * throws on the last one, from inside the socket's message handler (FACTS.md). Here an
 * upload is keyed by (peer address and port, Uri-Path, Uri-Query, Request-Tag):
 *
 * - non-final blocks are stored and answered 2.31 Continue here directly;
 * - the final block becomes one ordinary request (Block1 removed, the whole body as
 *   payload, the final block's message id and token) handed to the package, so the
 *   normal request path (MAC over the whole body, replay, 2.04) applies once;
 * - a retransmitted block (same message id) is answered again; a gap is 4.08; a body
 *   beyond `maxBytes` is 4.13 with Size1; more than `maxUploads` at once is 5.03; the
 *   reserved SZX 7 is 4.00 (RFC 7959 §2.2); uploads idle for `idleMs` are dropped.
 *
 * Nothing with a Block1 option ever reaches the package.
 */
export interface UploadLimits {
  maxBytes: number;
  maxUploads: number;
  idleMs: number;
}

interface Upload {
  chunks: Buffer[];
  received: number;
  blockSize: number;
  lastSeen: number;
  /** message id → the reply we sent for it, for retransmissions */
  replies: Map<number, Buffer>;
}

interface Completed {
  messageId: number;
  datagram: Buffer;
  block1: Buffer;
  at: number;
}

export type UploadVerdict =
  | { kind: 'reply'; datagram: Buffer } // answer with this, do not pass on
  | { kind: 'pass'; datagram: Buffer; block1: Buffer } // hand this (reassembled) request to the package
  | { kind: 'drop'; reason: 'upload' | 'bad_request'; datagram?: Buffer }; // count it; answer with `datagram` if there is one

/**
 * A Block1 or Block2 option value with the reserved SZX 7 (RFC 7959 §2.2: "MUST lead to a
 * 4.00 Bad Request response code upon reception in a request"; BERT is CoAP over TCP only).
 */
export function reservedSzx(value: Buffer): boolean {
  return value.length <= 3 && (coapUint(value) & 7) === 7;
}

export class Block1Assembler {
  private readonly uploads = new Map<string, Upload>();
  private readonly completed = new Map<string, Completed>();
  private readonly timer: NodeJS.Timeout;

  constructor(
    private readonly limits: UploadLimits,
    private readonly onDrop: (why: string) => void,
    /** a monotonic clock: a step of the wall clock must not keep abandoned uploads in their slots */
    private readonly now: () => number = () => performance.now(),
  ) {
    this.timer = setInterval(() => this.sweep(), Math.max(1000, Math.floor(limits.idleMs / 4)));
    this.timer.unref();
  }

  get inProgress(): number {
    return this.uploads.size;
  }

  private sweep(): void {
    const now = this.now();
    for (const [k, u] of this.uploads) if (now - u.lastSeen > this.limits.idleMs) {
      this.uploads.delete(k);
      this.onDrop('idle');
    }
    for (const [k, c] of this.completed) if (now - c.at > this.limits.idleMs) this.completed.delete(k);
  }

  /** Handle a request datagram that carries Block1. */
  handle(pkt: CoapPacket, rsinfo: AddressInfo): UploadVerdict {
    const b1opt = pkt.options.find((o) => o.number === COAP_OPTION.BLOCK1);
    const block = b1opt ? parseBlockOption(b1opt.value) : null;
    if (b1opt && reservedSzx(b1opt.value)) return { kind: 'drop', reason: 'bad_request', datagram: this.error(pkt, COAP_CODES.BAD_REQUEST, 'FLEET_MSG_INVALID') };
    if (!b1opt || !block) return { kind: 'drop', reason: 'bad_request' };
    const tag = pkt.options.find((o) => o.number === COAP_OPTION.REQUEST_TAG)?.value.toString('hex') ?? '';
    const path = pkt.options
      .filter((o) => o.number === COAP_OPTION.URI_PATH || o.number === COAP_OPTION.URI_QUERY)
      .map((o) => `${o.number}=${o.value.toString('hex')}`)
      .join('&');
    const key = `${rsinfo.address}|${rsinfo.port}|${pkt.code}|${path}|${tag}`;
    const now = this.now();

    const done = this.completed.get(key);
    if (done && done.messageId === pkt.messageId) return { kind: 'pass', datagram: done.datagram, block1: done.block1 };

    let up = this.uploads.get(key);
    if (up) {
      const again = up.replies.get(pkt.messageId);
      if (again) return { kind: 'reply', datagram: again };
    }
    if (block.num === 0 && up) {
      // the client started over
      this.uploads.delete(key);
      up = undefined;
    }
    if (!up) {
      if (block.num !== 0) {
        this.onDrop('out of order');
        return { kind: 'reply', datagram: this.error(pkt, COAP_CODES.INCOMPLETE, 'FLEET_MCU_UPLOAD') };
      }
      if (this.uploads.size >= this.limits.maxUploads) {
        this.onDrop('too many uploads');
        return { kind: 'reply', datagram: this.error(pkt, COAP_CODES.SERVICE_UNAVAILABLE, 'FLEET_MCU_UPLOAD') };
      }
      up = { chunks: [], received: 0, blockSize: block.size, lastSeen: now, replies: new Map() };
      this.uploads.set(key, up);
    }
    up.lastSeen = now;
    const offset = block.num * block.size;
    // RFC 7959 §2.5: the size may shrink between blocks, never grow
    if (block.size > up.blockSize || offset !== up.received || (block.more && pkt.payload.length !== block.size)) {
      this.uploads.delete(key);
      this.onDrop('out of order');
      return { kind: 'reply', datagram: this.error(pkt, COAP_CODES.INCOMPLETE, 'FLEET_MCU_UPLOAD') };
    }
    up.blockSize = block.size;
    if (up.received + pkt.payload.length > this.limits.maxBytes) {
      this.uploads.delete(key);
      this.onDrop('too large');
      return { kind: 'reply', datagram: this.error(pkt, COAP_CODES.REQUEST_TOO_LARGE, 'FLEET_MCU_UPLOAD', [{ number: COAP_OPTION.SIZE1, value: coapUintValue(this.limits.maxBytes) }]) };
    }
    up.chunks.push(pkt.payload);
    up.received += pkt.payload.length;
    if (block.more) {
      const reply = this.response(pkt, COAP_CODES.CONTINUE, Buffer.alloc(0), [{ number: COAP_OPTION.BLOCK1, value: blockOptionValue({ num: block.num, more: true, size: block.size }) }]);
      if (up.replies.size > 4) up.replies.clear(); // only the latest few can be retransmitted
      up.replies.set(pkt.messageId, reply);
      return { kind: 'reply', datagram: reply };
    }
    this.uploads.delete(key);
    const whole: CoapPacket = {
      ...pkt,
      options: pkt.options.filter((o) => o.number !== COAP_OPTION.BLOCK1 && o.number !== COAP_OPTION.SIZE1 && o.number !== COAP_OPTION.REQUEST_TAG),
      payload: Buffer.concat(up.chunks),
    };
    const datagram = buildCoapPacket(whole);
    const block1 = blockOptionValue({ num: block.num, more: false, size: block.size });
    if (this.completed.size >= this.limits.maxUploads) this.completed.delete(this.completed.keys().next().value!);
    this.completed.set(key, { messageId: pkt.messageId, datagram, block1, at: now });
    return { kind: 'pass', datagram, block1 };
  }

  private response(req: CoapPacket, code: string, payload: Buffer, options: CoapPacket['options'] = []): Buffer {
    // piggybacked ACK for a CON (RFC 7252 §5.2.1); a NON gets a NON with a fresh id
    const con = req.type === 0;
    return buildCoapPacket({ type: con ? 2 : 1, code: coapCodeByte(code), messageId: con ? req.messageId : (Math.random() * 0x10000) | 0, token: req.token, options, payload });
  }

  private error(req: CoapPacket, code: string, diagnostic: string, options: CoapPacket['options'] = []): Buffer {
    return this.response(req, code, Buffer.from(diagnostic), options);
  }

  close(): void {
    clearInterval(this.timer);
    this.uploads.clear();
    this.completed.clear();
  }
}
