import { createSocket, type Socket } from 'node:dgram';
import { isIPv6 } from 'node:net';
import type { Scheduler } from './sched.ts';

/**
 * A minimal CoAP client endpoint (RFC 7252) shared by many simulated devices: one UDP
 * socket, requests told apart by token and message id. Confirmable requests are
 * retransmitted with exponential back-off (ACK_TIMEOUT × 1–1.5, doubled up to
 * MAX_RETRANSMIT times); piggybacked and separate responses, Observe notifications
 * (RFC 7641) and Block2 options (RFC 7959) are handled; CON responses are ACKed and
 * duplicates of them ignored. Loss and latency knobs act on every datagram in both
 * directions, so flaky Wi-Fi can be simulated without touching the gateway.
 *
 * Not the coap package's Agent: its per-request objects, streams and timers cost far
 * more memory than 10,000 devices can afford, and it cannot drop or delay datagrams.
 */

export const COAP_METHOD = { GET: 1, POST: 2, PUT: 3, DELETE: 4 } as const;
export const OPT = { OBSERVE: 6, URI_PATH: 11, CONTENT_FORMAT: 12, MAX_AGE: 14, URI_QUERY: 15, ACCEPT: 17, BLOCK2: 23, BLOCK1: 27, SIZE2: 28 } as const;

export interface CoapRequest {
  method: number;
  path: readonly string[];
  query?: readonly string[];
  contentFormat?: number;
  accept?: number;
  /** 0 = register, 1 = deregister (RFC 7641) */
  observe?: 0 | 1;
  block2?: { num: number; szx: number };
  payload?: Buffer;
  /** default true */
  confirmable?: boolean;
}

export interface CoapResponse {
  /** "c.dd", e.g. "2.05" */
  code: string;
  payload: Buffer;
  observe?: number;
  block2?: { num: number; more: boolean; szx: number };
  contentFormat?: number;
  /** Max-Age option, s (a 5.03's "try again after") */
  maxAge?: number;
}

export type CoapCallback = (err: Error | null, res?: CoapResponse) => void;

export interface LinkKnobs {
  /** probability 0..1 that a datagram (either direction) is lost */
  loss: number;
  /** added one-way delay, ms */
  latencyMs: number;
  /** uniformly random extra delay 0..jitter, ms */
  latencyJitterMs: number;
}

export interface CoapEndpointOptions {
  host: string;
  port: number;
  sched: Scheduler;
  link: LinkKnobs;
  random: () => number;
  /** RFC 7252 ACK_TIMEOUT, ms (default 2000) */
  ackTimeoutMs?: number;
  /** RFC 7252 MAX_RETRANSMIT (default 4) */
  maxRetransmit?: number;
  /** how long to wait for a separate response after an empty ACK, ms (default 30000) */
  responseTimeoutMs?: number;
}

interface Pending {
  token: number;
  mid: number;
  datagram: Buffer;
  cb: CoapCallback;
  tries: number;
  timeoutMs: number;
  /** bumped whenever a scheduled retransmission/timeout should be ignored */
  gen: number;
  acked: boolean;
  done: boolean;
  observe: boolean;
}

export class CoapEndpoint {
  private socket!: Socket;
  private mid = Math.floor(Math.random() * 0xffff);
  private token = Math.floor(Math.random() * 0xffffffff);
  private readonly byToken = new Map<number, Pending>();
  private readonly byMid = new Map<number, Pending>();
  /** message ids of CON responses already handled (answered again with an ACK, not delivered twice) */
  private readonly seenMids = new Map<number, number>();
  private closed = false;
  readonly ackTimeoutMs: number;
  readonly maxRetransmit: number;
  readonly responseTimeoutMs: number;
  /** datagrams dropped by the loss knob */
  lost = 0;

  private constructor(private readonly o: CoapEndpointOptions) {
    this.ackTimeoutMs = o.ackTimeoutMs ?? 2000;
    this.maxRetransmit = o.maxRetransmit ?? 4;
    this.responseTimeoutMs = o.responseTimeoutMs ?? 30_000;
  }

  static async open(o: CoapEndpointOptions): Promise<CoapEndpoint> {
    const ep = new CoapEndpoint(o);
    const s = createSocket({ type: isIPv6(o.host) ? 'udp6' : 'udp4' });
    ep.socket = s;
    s.on('message', (m) => ep.delayed(m, ep.onDatagram));
    s.on('error', () => undefined);
    await new Promise<void>((r) => s.bind(0, () => r()));
    return ep;
  }

  get pending(): number {
    return this.byToken.size;
  }

  /** Send a request; `cb` runs once per response (more than once for an Observe registration, until `cancel`). */
  request(req: CoapRequest, cb: CoapCallback): number {
    if (this.closed) {
      cb(new Error('endpoint closed'));
      return 0;
    }
    const token = (this.token = (this.token + 1) >>> 0);
    const mid = this.nextMid();
    const con = req.confirmable !== false;
    const datagram = encodeRequest(req, con ? 0 : 1, mid, token);
    const p: Pending = { token, mid, datagram, cb, tries: 0, timeoutMs: this.ackTimeoutMs * (1 + this.o.random() * 0.5), gen: 0, acked: !con, done: false, observe: req.observe === 0 };
    this.byToken.set(token, p);
    if (con) this.byMid.set(mid, p);
    this.send(datagram);
    this.o.sched.after(con ? p.timeoutMs : this.responseTimeoutMs, this.retransmit, { ep: this, p, gen: p.gen });
    return token;
  }

  /** Forget a request (an Observe registration: the next notification is answered with RST). */
  cancel(token: number): void {
    const p = this.byToken.get(token);
    if (!p) return;
    p.done = true;
    p.gen++;
    this.byToken.delete(token);
    this.byMid.delete(p.mid);
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    for (const p of this.byToken.values()) {
      p.done = true;
      p.gen++;
    }
    this.byToken.clear();
    this.byMid.clear();
    try {
      this.socket.close();
    } catch {
      // already closed
    }
  }

  private nextMid(): number {
    this.mid = (this.mid + 1) & 0xffff;
    return this.mid;
  }

  private retransmit = ({ ep, p, gen }: { ep: CoapEndpoint; p: Pending; gen: number }): void => {
    if (ep.closed || p.done || p.gen !== gen) return;
    if (!p.acked && p.tries < ep.maxRetransmit) {
      p.tries++;
      p.timeoutMs *= 2;
      ep.send(p.datagram);
      ep.o.sched.after(p.timeoutMs, ep.retransmit, { ep, p, gen });
      return;
    }
    // no ACK after every retransmission, or no separate response in time
    ep.finish(p, new Error(p.acked ? 'CoAP response timeout' : 'CoAP request timed out (no ACK)'));
  };

  private finish(p: Pending, err: Error | null, res?: CoapResponse): void {
    if (p.done) return;
    if (!err && p.observe && res?.observe !== undefined) {
      // a registration stays: later notifications use the same token
      p.acked = true;
      p.gen++;
      this.byMid.delete(p.mid);
      p.cb(null, res);
      return;
    }
    p.done = true;
    p.gen++;
    this.byToken.delete(p.token);
    this.byMid.delete(p.mid);
    p.cb(err, res);
  }

  /** Apply the link knobs to one datagram: maybe drop it, maybe delay it. */
  private delayed(buf: Buffer, fn: (buf: Buffer) => void): void {
    const l = this.o.link;
    if (l.loss > 0 && this.o.random() < l.loss) {
      this.lost++;
      return;
    }
    const d = l.latencyMs + (l.latencyJitterMs > 0 ? this.o.random() * l.latencyJitterMs : 0);
    if (d <= 0) fn(buf);
    else this.o.sched.after(d, ({ ep, b }) => !ep.closed && fn.call(ep, b), { ep: this, b: buf });
  }

  private send(buf: Buffer): void {
    this.delayed(buf, this.sendNow);
  }

  private sendNow = (buf: Buffer): void => {
    if (this.closed) return;
    this.socket.send(buf, this.o.port, this.o.host);
  };

  private onDatagram = (buf: Buffer): void => {
    const m = decodeMessage(buf);
    if (!m) return;
    if (m.type === 2 || m.type === 3) {
      // ACK or RST for one of our CONs
      const p = this.byMid.get(m.mid);
      if (!p) return;
      if (m.type === 3) return this.finish(p, new Error('CoAP reset'));
      p.acked = true;
      p.gen++;
      this.byMid.delete(p.mid);
      if (m.code === '0.00') {
        // empty ACK: a separate response follows
        this.o.sched.after(this.responseTimeoutMs, this.retransmit, { ep: this, p, gen: p.gen });
        return;
      }
      if (m.token !== p.token) return;
      return this.finish(p, null, m.res);
    }
    // CON or NON: a separate response or an Observe notification
    if (m.type === 0) {
      this.sendNow(encodeEmpty(2, m.mid));
      const now = Date.now();
      if (this.seenMids.has(m.mid)) return;
      this.seenMids.set(m.mid, now);
      if (this.seenMids.size > 4096) for (const [k, t] of this.seenMids) if (now - t > 250_000 || this.seenMids.size > 4096) this.seenMids.delete(k);
    }
    const p = m.token === undefined ? undefined : this.byToken.get(m.token);
    if (!p) {
      if (m.type === 0) this.sendNow(encodeEmpty(3, m.mid)); // not interested (ends an Observe at the server)
      return;
    }
    this.finish(p, null, m.res);
  };
}

function encodeEmpty(type: number, mid: number): Buffer {
  return Buffer.from([0x40 | (type << 4), 0, mid >> 8, mid & 0xff]);
}

function uintBytes(v: number): Buffer {
  if (v === 0) return Buffer.alloc(0);
  const out: number[] = [];
  while (v > 0) {
    out.unshift(v & 0xff);
    v = Math.floor(v / 256);
  }
  return Buffer.from(out);
}

export function encodeRequest(req: CoapRequest, type: number, mid: number, token: number): Buffer {
  const opts: Array<[number, Buffer]> = [];
  if (req.observe !== undefined) opts.push([OPT.OBSERVE, uintBytes(req.observe)]);
  for (const s of req.path) opts.push([OPT.URI_PATH, Buffer.from(s, 'utf8')]);
  if (req.contentFormat !== undefined) opts.push([OPT.CONTENT_FORMAT, uintBytes(req.contentFormat)]);
  for (const q of req.query ?? []) opts.push([OPT.URI_QUERY, Buffer.from(q, 'utf8')]);
  if (req.accept !== undefined) opts.push([OPT.ACCEPT, uintBytes(req.accept)]);
  if (req.block2) opts.push([OPT.BLOCK2, uintBytes((req.block2.num << 4) | req.block2.szx)]);
  const parts: Buffer[] = [Buffer.from([0x44 | (type << 4), req.method, mid >> 8, mid & 0xff, token >>> 24, (token >>> 16) & 0xff, (token >>> 8) & 0xff, token & 0xff])];
  let last = 0;
  for (const [num, val] of opts) {
    const delta = num - last;
    last = num;
    const ext: number[] = [];
    const nib = (x: number): number => {
      if (x < 13) return x;
      if (x < 269) {
        ext.push(x - 13);
        return 13;
      }
      ext.push((x - 269) >> 8, (x - 269) & 0xff);
      return 14;
    };
    const d = nib(delta);
    const extDelta = ext.splice(0);
    const l = nib(val.length);
    parts.push(Buffer.from([(d << 4) | l, ...extDelta, ...ext]), val);
  }
  if (req.payload && req.payload.length > 0) parts.push(Buffer.from([0xff]), req.payload);
  return Buffer.concat(parts);
}

interface Decoded {
  type: number;
  code: string;
  mid: number;
  token: number | undefined;
  res: CoapResponse;
}

export function decodeMessage(buf: Buffer): Decoded | null {
  if (buf.length < 4 || buf[0]! >> 6 !== 1) return null;
  const type = (buf[0]! >> 4) & 3;
  const tkl = buf[0]! & 0x0f;
  if (tkl > 8 || buf.length < 4 + tkl) return null;
  const cb = buf[1]!;
  const code = `${cb >> 5}.${String(cb & 0x1f).padStart(2, '0')}`;
  const mid = buf.readUInt16BE(2);
  // our tokens are 4 bytes; other lengths are not ours
  const token = tkl === 4 ? buf.readUInt32BE(4) : undefined;
  const res: CoapResponse = { code, payload: Buffer.alloc(0) };
  let i = 4 + tkl;
  let num = 0;
  while (i < buf.length) {
    const b = buf[i++]!;
    if (b === 0xff) {
      res.payload = buf.subarray(i);
      break;
    }
    let delta = b >> 4;
    let len = b & 0x0f;
    if (delta === 15 || len === 15) return null;
    if (delta === 13) delta = buf[i++]! + 13;
    else if (delta === 14) {
      delta = buf.readUInt16BE(i) + 269;
      i += 2;
    }
    if (len === 13) len = buf[i++]! + 13;
    else if (len === 14) {
      len = buf.readUInt16BE(i) + 269;
      i += 2;
    }
    num += delta;
    if (i + len > buf.length) return null;
    const v = buf.subarray(i, i + len);
    i += len;
    const uint = () => v.reduce((a, x) => a * 256 + x, 0);
    if (num === OPT.OBSERVE) res.observe = uint();
    else if (num === OPT.CONTENT_FORMAT) res.contentFormat = uint();
    else if (num === OPT.MAX_AGE) res.maxAge = uint();
    else if (num === OPT.BLOCK2) {
      const x = uint();
      res.block2 = { num: Math.floor(x / 16), more: (x & 8) !== 0, szx: x & 7 };
    }
  }
  return { type, code, mid, token, res };
}
