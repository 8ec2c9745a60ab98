import { FleetError, isFleetError } from '../core/errors.ts';
import { secretEquals } from '../core/http.ts';
import type { Logger } from '../core/log.ts';
import { isDeviceId } from '../core/topics.ts';
import { recordCounter, type McuKeys, verifyMcuMessage, type ReplayGuard } from '../firmware-bridge/auth.ts';
import { decodeFwChunkRequest, encodeFwChunk, hasMacLine, splitMacLine } from '../firmware-bridge/frames.ts';
import { mcuMaySubscribe, mcuTopic, mcuUpTopic, type McuChannel } from '../firmware-bridge/topics.ts';
import { deliverFailureReason, LogThrottle, type DropReason, type IngressHooks } from './ingress.ts';
import { LeanMqttServer, type LeanConn, type LeanConnect, type LeanPublish, type LeanTlsOptions, type PublishOutcome } from './mqtt-lean.ts';
import type { McuService } from './service.ts';

/** longest single wait of a throttled MQTT message before the connection is looked at again */
const MAX_THROTTLE_SLICE_MS = 1000;

export interface McuMqttIngressOptions {
  host: string;
  /** plain TCP port; null = no plain listener */
  port: number | null;
  /** MQTT over TLS on its own port, handled by the same code as the plain port */
  tls?: (LeanTlsOptions & { port: number }) | undefined;
  /** per-MCU keys (derived from the site secret) */
  keys: McuKeys;
  /** largest publish payload, bytes */
  maxPayloadBytes: number;
  maxRecords: number;
  /** most MCU connections at once (CONNACK 3 "server unavailable" beyond) */
  maxClients: number;
  /** most unauthenticated connections at once, in all and per remote address (mqtt-lean's defaults when absent) */
  maxUnauthenticated?: number;
  maxUnauthenticatedPerAddress?: number;
  /** replay state shared with CoAP, for MQTT payloads that carry a MAC line */
  guard: ReplayGuard;
  /** drop MQTT payloads without a MAC line */
  requireMac: boolean;
  /** is this MCU's key revoked (mcu.revokedFile)? */
  revoked(mcuId: string): boolean;
  log: Logger;
  hooks: IngressHooks;
  service: McuService;
}

/** Room for the topic, packet id and (MQTT 5) properties on top of the payload. */
const PACKET_OVERHEAD = 1024;
/**
 * listen(2) backlog of the MCU port: thousands of MCUs come up together after a power cut
 * or a gateway restart, and a full accept queue makes their connects time out and back
 * off (Node's default is 511; the kernel caps it at net.core.somaxconn).
 */
const BACKLOG = 4096;

/**
 * The MCU MQTT listener: its own MQTT server on its own TCP port (not the hub's), so MCU
 * traffic and MCU credentials never reach the hub directly. Plain TCP, TLS on another port,
 * or both (mcu.mqttPort, mcu.mqttTls): one server, one set of sessions, the same handling. A lean MQTT 3.1.1 server
 * (gateway/mqtt-lean.ts) rather than a broker: MCU messages are consumed here and only the
 * gateway sends anything down, so a connection needs little more than its socket.
 *
 * - CONNECT: client id = username = MCU id, password = its derived key, compared in
 *   constant time; CONNACK 4 otherwise [MQTT-3.2.2-3], CONNACK 3 beyond maxClients, CONNACK 5
 *   for an MCU on the revoked list (mcu.revokedFile);
 * - PUBLISH: only the MCU's own up channels; anything else closes the connection (MQTT
 *   3.1.1 cannot refuse one PUBLISH, FACTS.md). Telemetry is decoded and handed to the
 *   relay, and the PUBACK written only once that resolved: a QoS 1 PUBACK means "stored in
 *   the outbox". Packets of one connection are handled one at a time, in order;
 * - SUBSCRIBE: only its own down channels; a refused subscription alone gets 0x80, the
 *   connection stays. Commands from the mailbox are pushed to an MCU subscribed to its cmd
 *   topic.
 */
export class McuMqttIngress {
  private readonly throttle: LogThrottle;
  /** close() called: QoS 0 messages waiting for a rate-limit token are stored at once */
  private closing = false;

  private constructor(
    private readonly opts: McuMqttIngressOptions,
    private readonly lean: LeanMqttServer,
    /** bound plain TCP port, null when off */
    readonly port: number | null,
    /** bound TLS port, null when off */
    readonly tlsPort: number | null,
  ) {
    this.throttle = new LogThrottle(opts.log);
    opts.service.on('head', this.pushCommand);
  }

  /** Publish the next mailbox command to a subscribed MCU (QoS 1; at least once until acked). */
  private pushCommand = (mcuId: string): void => {
    const conn = this.lean.sessions.get(mcuId);
    if (!conn || conn.subCmd < 0) return;
    const next = this.opts.service.nextCommand(mcuId);
    if (!next) return;
    conn.send(mcuTopic(mcuId, 'cmd'), next, conn.subCmd > 0 ? 1 : 0);
  };

  static async start(opts: McuMqttIngressOptions): Promise<McuMqttIngress> {
    let ingress: McuMqttIngress | undefined;
    const lean = new LeanMqttServer({
      maxRemainingLength: opts.maxPayloadBytes + PACKET_OVERHEAD,
      // authenticated connections: the MCU limit and a few spare for reconnect overlap
      // (unauthenticated ones are capped apart by mqtt-lean: maxPreAuth, per address too)
      maxConnections: opts.maxClients + 64,
      maxPreAuth: opts.maxUnauthenticated,
      maxPreAuthPerAddress: opts.maxUnauthenticatedPerAddress,
      connectTimeoutMs: 10_000,
      backlog: BACKLOG,
      hooks: {
        authenticate: (c, remote) => ingress!.authenticate(c, remote),
        onPublish: (conn, p) => ingress!.onPublish(conn, p),
        onSubscribe: (conn, filter, qos) => ingress!.onSubscribe(conn, filter, qos),
        onSubscribed: (conn, filters) => {
          const id = conn.id!;
          if (conn.subCmd >= 0 && filters.some((f) => f === mcuTopic(id, 'cmd') || f.endsWith('/#'))) ingress!.pushCommand(id);
        },
        onMalformed: (err, conn) => {
          // protocol errors (garbage, malformed packets) are counted; a peer that just went away is not
          opts.hooks.dropped('mqtt', 'bad_request', { mcuId: conn.id ?? undefined, err });
          opts.log.debug('MCU MQTT protocol error; connection closed', { mcu: conn.id, remote: conn.remote, err });
        },
        onTooLarge: (err, conn) => {
          opts.hooks.dropped('mqtt', 'too_large', { mcuId: conn.id ?? undefined, err });
          opts.log.debug('MCU connection closed: packet too large', { mcu: conn.id, remote: conn.remote, err });
        },
        // too many unauthenticated sockets (mqtt-lean caps; not logged: a flood), or a peer
        // closed for not reading what it asked for (the gateway's write backlog cap)
        onRefused: (_remote, why) => opts.hooks.dropped('mqtt', why === 'write_backlog' ? 'unavailable' : 'mcu_limit', {}),
        onDuplicate: (_conn, reconnected) => opts.hooks.duplicate?.('mqtt', reconnected),
        onTlsError: (err, remote) => {
          opts.hooks.dropped('mqtt', 'bad_request', { err });
          tlsThrottle.warn(`tls:${remote}`, 'MCU TLS handshake failed; connection closed', { remote, err });
        },
      },
    });
    const tlsThrottle = new LogThrottle(opts.log);
    try {
      const port = opts.port === null ? null : await lean.listen(opts.host, opts.port);
      const tlsPort = opts.tls ? await lean.listenTls(opts.host, opts.tls.port, opts.tls) : null;
      ingress = new McuMqttIngress(opts, lean, port, tlsPort);
    } catch (err) {
      await lean.close(); // a listener that did bind is released
      throw err;
    }
    return ingress;
  }

  get connectedClients(): number {
    return this.lean.connectedClients;
  }

  /** MQTT connections not authenticated yet (TLS handshake or CONNECT pending) */
  get unauthenticated(): number {
    return this.lean.unauthenticated;
  }

  /** Cut the session of a revoked MCU (it gets CONNACK 5 when it comes back). */
  revoke(mcuId: string): void {
    this.lean.sessions.get(mcuId)?.destroy();
  }

  /** Is a connected MCU revoked now? Then what it sent is dropped (counted) and its connection closed. */
  private revokedNow(mcuId: string): boolean {
    if (!this.opts.revoked(mcuId)) return false;
    this.opts.hooks.dropped('mqtt', 'revoked', { mcuId });
    return true;
  }

  /** Is `mcuId` connected (an authenticated MQTT session) now? */
  isConnected(mcuId: string): boolean {
    return this.lean.sessions.has(mcuId);
  }

  private authenticate(c: LeanConnect, remote: string | undefined): { rc: 0; id: string } | { rc: 2 | 3 | 4 | 5 } {
    const username = c.username;
    const refuse = (rc: 2 | 3 | 4 | 5, why: string): { rc: 2 | 3 | 4 | 5 } => {
      if (rc === 4) this.opts.hooks.authFailed('mqtt');
      this.opts.hooks.dropped('mqtt', rc === 4 ? 'auth' : rc === 5 ? 'revoked' : rc === 2 ? 'bad_request' : 'mcu_limit', { mcuId: isDeviceId(username) ? username : undefined });
      // throttled per peer address, not per user name (a peer picks any number of those),
      // and the name cut short: a flood of refused CONNECTs cannot flood the log
      const code = rc === 4 ? 'FLEET_MCU_AUTH' : rc === 5 ? 'FLEET_MCU_REVOKED' : rc === 2 ? 'FLEET_DEVICE_ID_INVALID' : 'FLEET_FORBIDDEN';
      this.throttle.warn(`auth:${remote ?? '?'}`, 'MCU MQTT connection refused', { code, mcu: typeof username === 'string' ? username.slice(0, 64) : username, remote, why });
      return { rc }; // 2 identifier rejected, 3 server unavailable, 4 bad user name or password, 5 not authorized [MQTT-3.2.2-3]
    };
    // the client id is the MCU id: a zero-length one is not assigned one here, whatever the
    // clean session flag [MQTT-3.1.3-8, -9]; checked before the credentials, which it makes moot
    if (c.clientId.length === 0) return refuse(2, 'zero-length client id');
    if (!isDeviceId(username)) return refuse(4, 'username is not an MCU id');
    if (c.clientId !== username) return refuse(4, 'client id must equal the MCU id');
    const key = this.opts.keys.get(username);
    if (!secretEquals(c.password?.toString('utf8') ?? '', key)) return refuse(4, 'wrong MCU key');
    // checked after the key: only its holder learns that it is revoked
    if (this.opts.revoked(username)) return refuse(5, 'FLEET_MCU_REVOKED: the MCU is on the revoked list');
    this.opts.keys.prove(username, key);
    // an MCU reconnecting takes its old connection over: not counted against the limit
    if (this.lean.connectedClients >= this.opts.maxClients && !this.lean.sessions.has(username)) return refuse(3, `${this.opts.maxClients} MCU connections already open`);
    return { rc: 0, id: username };
  }

  private onPublish(conn: LeanConn, packet: LeanPublish): PublishOutcome | Promise<PublishOutcome> {
    const mcuId = conn.id!;
    // revoked since it connected: packets read before its session was cut are not stored
    if (this.revokedNow(mcuId)) return 'close';
    const topic = mcuUpTopic(mcuId, packet.topic);
    if (topic === null) {
      this.opts.hooks.dropped('mqtt', 'forbidden', { mcuId });
      this.throttle.warn(`acl:${mcuId}`, 'MCU publish outside its subtree; closing the connection', { code: 'FLEET_FORBIDDEN', mcu: mcuId, topic: packet.topic.slice(0, 200) });
      return 'close';
    }
    // consumed here; the retain flag means nothing on the MCU port
    const payload = packet.payload;
    if (payload.length > this.opts.maxPayloadBytes) {
      this.opts.hooks.dropped('mqtt', 'too_large', { mcuId });
      this.throttle.warn(`size:${mcuId}`, 'MCU message too large; dropped', { mcu: mcuId, bytes: payload.length, max: this.opts.maxPayloadBytes });
      return 'ack';
    }
    const channel = topic.channel;
    let body = payload;
    /** the MAC counter, recorded once the message is stored (a store that fails must not turn the MCU's resend into a "replay") */
    let counter = 0;
    if (hasMacLine(payload)) {
      try {
        const framed = splitMacLine(payload);
        body = framed.payload;
        counter = verifyMcuMessage(this.opts.guard, { key: this.opts.keys.get(mcuId), mcuId, resource: channel, counter: framed.counter, mac: framed.mac, payload: body }, 'check');
      } catch (err) {
        if (isFleetError(err, 'FLEET_MCU_REPLAY')) return this.drop(mcuId, channel, 'replay', err);
        if (isFleetError(err, 'FLEET_FORBIDDEN')) {
          // the gateway acts for as many MCUs as it can: not stored, so no PUBACK (as for
          // a message without a MAC line); the MCU tries again later
          this.opts.hooks.dropped('mqtt', 'mcu_limit', { mcuId, err });
          this.throttle.warn(`limit:${mcuId}`, 'MCU refused: the gateway acts for as many MCUs as it may; closing the connection', { mcu: mcuId, err });
          return 'close';
        }
        this.opts.hooks.authFailed('mqtt');
        return this.drop(mcuId, channel, 'auth', err);
      }
    } else if (this.opts.requireMac) {
      this.opts.hooks.authFailed('mqtt');
      return this.drop(mcuId, channel, 'auth', new FleetError('FLEET_MCU_AUTH', 'this gateway requires a MAC line on MQTT payloads (mcu.mqttRequireMac)'));
    }
    // over the MCU's rate: handled when a token is free. The connection is busy meanwhile, so
    // its next packets wait (the socket is paused once about one more packet is held) and the
    // MCU gets this PUBACK late
    const wait = channel === 'fwreq' ? 0 : this.opts.service.admit(mcuId);
    if (wait > 0) {
      // revoked while it waited out the rate limit: not stored either
      return this.throttled(conn, mcuId, wait, packet.qos).then((go) => (go && !this.revokedNow(mcuId) ? this.store(conn, mcuId, channel, body, counter, packet.qos) : 'close'));
    }
    return this.store(conn, mcuId, channel, body, counter, packet.qos);
  }

  /**
   * Wait out the rate limit. When the connection closes meanwhile, a QoS 1/2 message is not
   * stored (false: it cannot be acknowledged any more, and the MCU resends it). A QoS 0 one
   * still waits for its token, as every QoS 0 message received before the close does
   * (mqtt-lean drainClosed): the MCU's next connection is held until they are handled, so
   * connecting, sending a burst and closing gets nothing past the limit, and nothing is
   * dropped. Only a stopping gateway stores them at once.
   */
  private async throttled(conn: LeanConn, mcuId: string, wait: number, qos: 0 | 1 | 2): Promise<boolean> {
    this.opts.hooks.throttled('mqtt', mcuId);
    for (let w = wait; w > 0; w = this.opts.service.admit(mcuId)) {
      if (conn.isClosed && qos !== 0) return false;
      if (this.closing) return qos === 0;
      // not silent: what it sent waits here, so the keep-alive check must not take it for a
      // dead connection (refreshed at least every MAX_THROTTLE_SLICE_MS)
      conn.lastRx = performance.now();
      await new Promise((r) => setTimeout(r, Math.min(w, MAX_THROTTLE_SLICE_MS)));
    }
    return qos === 0 || !conn.isClosed;
  }

  /** Hand an authenticated message to the service; 'ack' once it is stored. */
  private store(conn: LeanConn, mcuId: string, channel: McuChannel, body: Buffer, counter: number, qos: 0 | 1 | 2): PublishOutcome | Promise<PublishOutcome> {
    const svc = this.opts.service;
    if (counter > 0) {
      // claimed while it is stored, as CoAP does: a copy of this MAC'd message replayed over
      // CoAP meanwhile (or stored by one since the check, e.g. while this one was throttled)
      // is not stored a second time
      try {
        this.opts.guard.check(mcuId, counter);
        this.opts.guard.hold(mcuId, counter);
      } catch (err) {
        if (isFleetError(err, 'FLEET_MCU_REPLAY')) return this.drop(mcuId, channel, 'replay', err);
        if (isFleetError(err, 'FLEET_FORBIDDEN')) {
          // the replay table filled up since the first check: as there, no PUBACK
          this.opts.hooks.dropped('mqtt', 'mcu_limit', { mcuId, err });
          return 'close';
        }
        // the other copy is being stored: no PUBACK (QoS 1/2: the MCU's resend after
        // reconnecting is then a replay, or new again if that store failed); QoS 0 is dropped
        this.opts.hooks.dropped('mqtt', 'unavailable', { mcuId, err });
        return qos === 0 ? 'ack' : 'close';
      }
    }
    let work: Promise<void>;
    try {
      switch (channel) {
        case 't':
          work = svc.telemetry(mcuId, 'mqtt', body, 'sniff');
          break;
        case 'hello':
          work = svc.hello(mcuId, 'mqtt', body);
          break;
        case 'ack':
          work = svc.ack(mcuId, 'mqtt', body);
          break;
        case 'log':
          work = svc.upload(mcuId, 'mqtt', body, true);
          break;
        case 'fwreq':
          work = this.onChunkRequest(conn, mcuId, body);
          break;
        default:
          if (counter > 0) this.opts.guard.release(mcuId, counter);
          return this.drop(mcuId, channel, 'forbidden', new FleetError('FLEET_FORBIDDEN', `${channel} is not an up channel`));
      }
    } catch (err) {
      work = Promise.reject(err);
    }
    return work.then(
      (): PublishOutcome => {
        if (counter > 0) recordCounter(this.opts.guard, mcuId, counter);
        this.opts.hooks.accepted('mqtt', channel);
        return 'ack';
      },
      (err: unknown): PublishOutcome => {
        const reason = deliverFailureReason(err);
        if (reason === 'decode') {
          // authentic but undecodable: sending it again cannot help, so its counter is spent
          if (counter > 0) recordCounter(this.opts.guard, mcuId, counter);
          return this.drop(mcuId, channel, 'decode', err);
        }
        // not stored: no PUBACK; closing the connection makes the MCU resend it later
        if (counter > 0) this.opts.guard.release(mcuId, counter);
        this.opts.hooks.dropped('mqtt', reason, { mcuId, err });
        this.throttle.warn(`deliver:${mcuId}`, 'MCU message not stored; closing the connection', { mcu: mcuId, channel, reason, err });
        return 'close';
      },
    );
  }

  /**
   * MQTT 3.1.1 has no way to refuse one message: count it, tell the operator, keep the
   * connection (closing it would make the MCU resend the same bad payload forever).
   */
  private drop(mcuId: string, channel: string, reason: DropReason, err: unknown): PublishOutcome {
    this.opts.hooks.dropped('mqtt', reason, { mcuId, err });
    this.throttle.warn(`${reason}:${mcuId}`, 'MCU message dropped', { mcu: mcuId, channel, reason, err });
    return 'ack';
  }

  /** fwreq: answer with the chunk on the MCU's fw topic (before the request's PUBACK). */
  private async onChunkRequest(conn: LeanConn, mcuId: string, body: Buffer): Promise<void> {
    const req = decodeFwChunkRequest(body);
    this.opts.service.touch(mcuId, 'mqtt');
    const image = this.opts.service.firmwareFor(mcuId);
    const chunk = encodeFwChunk(image, req);
    // delivered only to a subscriber of its fw topic, as a broker would; progress counts what was sent
    if (conn.subFw < 0) return;
    conn.send(mcuTopic(mcuId, 'fw'), chunk, conn.subFw > 0 ? 1 : 0);
    if (image) {
      const start = Math.min(image.data.length, req.n * req.s);
      const end = Math.min(image.data.length, start + req.s);
      this.opts.service.firmwareServed(mcuId, 'mqtt', end, end - start);
    }
  }

  private onSubscribe(conn: LeanConn, filter: string, qos: number): number {
    const mcuId = conn.id!;
    if (mcuMaySubscribe(mcuId, filter)) return Math.min(qos, 1); // down messages go at QoS 1 at most
    this.opts.hooks.subscribeDenied();
    this.throttle.warn(`sub:${mcuId}`, 'MCU subscription refused', { code: 'FLEET_FORBIDDEN', mcu: mcuId, topic: filter.slice(0, 200) });
    return 0x80; // refuse this one subscription; keep the connection
  }

  /** Stop accepting, disconnect every MCU, release the port. */
  async close(): Promise<void> {
    this.closing = true;
    this.opts.service.off('head', this.pushCommand);
    await this.lean.close();
  }
}
