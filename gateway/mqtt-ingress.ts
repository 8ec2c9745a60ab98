import { createServer, type Server, type Socket } from 'node:net';
import { Aedes, type AuthenticateError, type Client, type PublishPacket, type Subscription } from 'aedes';
import { FleetError, isFleetError } from '../core/errors.ts';
import { listenOn, secretEquals } from '../core/http.ts';
import type { Logger } from '../core/log.ts';
import { isDeviceId } from '../core/topics.ts';
import { mcuKey, verifyMcuMessage, type ReplayGuard } from '../firmware-bridge/auth.ts';
import { decodeFwChunkRequest, encodeFwChunk, hasMacLine, splitMacLine } from '../firmware-bridge/frames.ts';
import { MCU_PREFIX, mcuMayPublish, mcuMaySubscribe, mcuTopic, parseMcuTopic } from '../firmware-bridge/topics.ts';
import { limitMqttFrames } from './frame-limit.ts';
import { deliverFailureReason, LogThrottle, type DropReason, type IngressHooks } from './ingress.ts';
import type { McuService } from './service.ts';

export interface McuMqttIngressOptions {
  host: string;
  port: number;
  siteSecret: string;
  /** largest publish payload, bytes */
  maxPayloadBytes: number;
  maxRecords: number;
  /** most MCU connections at once (CONNACK 3 "server unavailable" beyond) */
  maxClients: number;
  /** replay state shared with CoAP, for MQTT payloads that carry a MAC line */
  guard: ReplayGuard;
  /** drop MQTT payloads without a MAC line */
  requireMac: boolean;
  log: Logger;
  hooks: IngressHooks;
  service: McuService;
}

/** Room for the topic, packet id and (MQTT 5) properties on top of the payload. */
const PACKET_OVERHEAD = 1024;

/**
 * The MCU MQTT listener: its own aedes broker on its own TCP port (not the hub's), so
 * MCU traffic and MCU credentials never reach the hub directly. Hooks:
 *
 * - authenticate: client id = username = MCU id, password = its derived key,
 *   compared in constant time; CONNACK 4 otherwise [MQTT-3.2.2-3];
 * - authorizePublish: only the MCU's own up channels; anything else closes the
 *   connection (MQTT 3.1.1 cannot refuse one PUBLISH, FACTS.md). Telemetry is decoded
 *   and handed to the relay *inside* this hook, because aedes sends the PUBACK after
 *   the hook and before `published`: so a QoS 1 PUBACK means "stored in the outbox";
 * - authorizeSubscribe: only its own down channels; a refused subscription alone
 *   gets 0x80, the connection stays.
 */
export class McuMqttIngress {
  private readonly ids = new WeakMap<Client, string>();
  /** MCUs subscribed to their cmd topic right now (the mailbox pushes to them) */
  private readonly cmdSubscribers = new Map<string, Client>();
  private readonly throttle: LogThrottle;

  private constructor(
    private readonly opts: McuMqttIngressOptions,
    private readonly broker: Aedes,
    private readonly server: Server,
    readonly port: number,
  ) {
    this.throttle = new LogThrottle(opts.log);
    opts.service.on('head', this.pushCommand);
    broker.on('subscribe', (subs, client) => {
      const mcuId = client ? this.ids.get(client) : undefined;
      if (!mcuId) return;
      const cmd = mcuTopic(mcuId, 'cmd');
      if (subs.some((s) => s.topic === cmd || s.topic === `${MCU_PREFIX}${mcuId}/#`)) {
        this.cmdSubscribers.set(mcuId, client);
        this.pushCommand(mcuId);
      }
    });
    broker.on('unsubscribe', (topics, client) => {
      const mcuId = client ? this.ids.get(client) : undefined;
      if (mcuId && topics.some((t) => t === mcuTopic(mcuId, 'cmd') || t === `${MCU_PREFIX}${mcuId}/#`) && this.cmdSubscribers.get(mcuId) === client) this.cmdSubscribers.delete(mcuId);
    });
    broker.on('clientDisconnect', (client) => {
      const mcuId = this.ids.get(client);
      if (mcuId && this.cmdSubscribers.get(mcuId) === client) this.cmdSubscribers.delete(mcuId);
    });
  }

  /** Publish the next mailbox command to a subscribed MCU (QoS 1; at least once until acked). */
  private pushCommand = (mcuId: string): void => {
    if (!this.cmdSubscribers.has(mcuId)) return;
    const next = this.opts.service.nextCommand(mcuId);
    if (!next) return;
    this.broker.publish({ cmd: 'publish', topic: mcuTopic(mcuId, 'cmd'), payload: next, qos: 1, retain: false, dup: false }, (err) => {
      if (err) this.opts.log.debug('command push to MCU failed', { mcu: mcuId, err });
    });
  };

  static async start(opts: McuMqttIngressOptions): Promise<McuMqttIngress> {
    // heartbeats on $SYS would only be noise: nothing subscribes to them here
    const broker = await Aedes.createBroker({ id: 'fleetlet-gateway-mcu', heartbeatInterval: 24 * 3600 * 1000, connectTimeout: 10_000, maxClientsIdLength: 64, drainTimeout: 30_000, concurrency: 0 });
    const server = createServer((socket: Socket) => {
      const conn = limitMqttFrames(socket, opts.maxPayloadBytes + PACKET_OVERHEAD, (err) => {
        opts.hooks.dropped('mqtt', 'too_large', { err });
        opts.log.debug('MCU connection closed: packet too large', { remote: socket.remoteAddress, err });
      });
      broker.handle(conn);
    });
    // bound file descriptors before authentication: a few spare for reconnect overlap
    server.maxConnections = opts.maxClients + 64;
    let port: number;
    try {
      port = await listenOn(server, opts.host, opts.port, false);
    } catch (err) {
      await new Promise<void>((r) => broker.close(() => r()));
      throw err;
    }
    const ingress = new McuMqttIngress(opts, broker, server, port);
    broker.authenticate = ingress.authenticate;
    broker.authorizePublish = ingress.authorizePublish;
    broker.authorizeSubscribe = ingress.authorizeSubscribe;
    // MCU messages are consumed by the gateway: only its own down messages (cmd, fw) are
    // delivered to subscribers, never an MCU's up message echoed back to it
    broker.authorizeForward = (_client, packet) => (parseMcuTopic(packet.topic)?.direction === 'down' ? packet : null);
    // protocol errors (garbage, malformed packets) are counted; a peer that just went away is not
    const malformed = (err: NodeJS.ErrnoException) => !['ECONNRESET', 'EPIPE', 'ETIMEDOUT', 'ERR_STREAM_PREMATURE_CLOSE'].includes(err.code ?? '') && !/too large|exceeds the limit/.test(err.message);
    broker.on('clientError', (client, err) => {
      if (malformed(err)) opts.hooks.dropped('mqtt', 'bad_request', { mcuId: client?.id, err });
      opts.log.debug('MCU MQTT client error', { mcu: client?.id, err });
    });
    broker.on('connectionError', (client, err) => {
      if (malformed(err)) opts.hooks.dropped('mqtt', 'bad_request', { err });
      opts.log.debug('MCU MQTT connection error', { mcu: client?.id, err });
    });
    return ingress;
  }

  get connectedClients(): number {
    return this.broker.connectedClients;
  }

  private authenticate = (client: Client, username: string | undefined, password: Buffer | undefined, done: (err: AuthenticateError | null, ok: boolean | null) => void): void => {
    const refuse = (returnCode: 3 | 4, why: string) => {
      if (returnCode === 4) this.opts.hooks.authFailed('mqtt');
      this.opts.hooks.dropped('mqtt', returnCode === 4 ? 'auth' : 'mcu_limit', { mcuId: isDeviceId(username) ? username : undefined });
      this.throttle.warn(`auth:${username}`, 'MCU MQTT connection refused', { mcu: username, why });
      const err = new Error(`connection refused: ${why}`) as AuthenticateError;
      err.returnCode = returnCode; // 3 server unavailable, 4 bad user name or password [MQTT-3.2.2-3]
      done(err, null);
    };
    if (!isDeviceId(username)) return refuse(4, 'username is not an MCU id');
    if (client.id !== username) return refuse(4, 'client id must equal the MCU id');
    if (!secretEquals(password?.toString('utf8') ?? '', mcuKey(this.opts.siteSecret, username))) return refuse(4, 'wrong MCU key');
    // connectedClients does not count this one yet
    if (this.broker.connectedClients >= this.opts.maxClients) return refuse(3, `${this.opts.maxClients} MCU connections already open`);
    this.ids.set(client, username);
    done(null, true);
  };

  private authorizePublish = (client: Client | null, packet: PublishPacket, done: (err?: Error | null) => void): void => {
    // null client: aedes publishing a stored will of a client that is gone; MCUs get no
    // delivery on the gateway's broker outside the hooks, so refuse it
    const mcuId = client ? this.ids.get(client) : undefined;
    if (!mcuId) return done(new FleetError('FLEET_FORBIDDEN', 'not an authenticated MCU'));
    if (!mcuMayPublish(mcuId, packet.topic)) {
      this.opts.hooks.dropped('mqtt', 'forbidden', { mcuId });
      this.throttle.warn(`acl:${mcuId}`, 'MCU publish outside its subtree; closing the connection', { mcu: mcuId, topic: packet.topic.slice(0, 200) });
      return done(new FleetError('FLEET_FORBIDDEN', `${mcuId} may not publish on ${packet.topic.slice(0, 200)}`));
    }
    // consumed here; never kept as a retained message on the gateway's broker
    packet.retain = false;
    const payload = typeof packet.payload === 'string' ? Buffer.from(packet.payload) : packet.payload;
    if (payload.length > this.opts.maxPayloadBytes) {
      this.opts.hooks.dropped('mqtt', 'too_large', { mcuId });
      this.throttle.warn(`size:${mcuId}`, 'MCU message too large; dropped', { mcu: mcuId, bytes: payload.length, max: this.opts.maxPayloadBytes });
      return done(null);
    }
    const channel = parseMcuTopic(packet.topic)!.channel;
    const drop = (reason: DropReason, err: unknown) => {
      // MQTT 3.1.1 has no way to refuse one message: count it, tell the operator, keep the
      // connection (closing it would make the MCU resend the same bad payload forever)
      this.opts.hooks.dropped('mqtt', reason, { mcuId, err });
      this.throttle.warn(`${reason}:${mcuId}`, 'MCU message dropped', { mcu: mcuId, channel, reason, err });
      done(null);
    };
    let body = payload;
    if (hasMacLine(payload)) {
      try {
        const framed = splitMacLine(payload);
        body = framed.payload;
        verifyMcuMessage(this.opts.guard, { key: mcuKey(this.opts.siteSecret, mcuId), mcuId, resource: channel, counter: framed.counter, mac: framed.mac, payload: body });
      } catch (err) {
        if (isFleetError(err, 'FLEET_MCU_REPLAY')) return drop('replay', err);
        if (isFleetError(err, 'FLEET_FORBIDDEN')) return drop('mcu_limit', err);
        this.opts.hooks.authFailed('mqtt');
        return drop('auth', err);
      }
    } else if (this.opts.requireMac) {
      this.opts.hooks.authFailed('mqtt');
      return drop('auth', new FleetError('FLEET_MCU_AUTH', 'this gateway requires a MAC line on MQTT payloads (mcu.mqttRequireMac)'));
    }
    const svc = this.opts.service;
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
          work = this.onChunkRequest(mcuId, body);
          break;
        default:
          return drop('forbidden', new FleetError('FLEET_FORBIDDEN', `${channel} is not an up channel`));
      }
    } catch (err) {
      work = Promise.reject(err);
    }
    work.then(
      () => {
        this.opts.hooks.accepted('mqtt', channel);
        done(null);
      },
      (err: unknown) => {
        const reason = deliverFailureReason(err);
        if (reason === 'decode') return drop('decode', err);
        // not stored: no PUBACK; closing the connection makes the MCU resend it later
        this.opts.hooks.dropped('mqtt', reason, { mcuId, err });
        this.throttle.warn(`deliver:${mcuId}`, 'MCU message not stored; closing the connection', { mcu: mcuId, channel, reason, err });
        done(isFleetError(err) ? err : new FleetError('FLEET_INTERNAL', String(err)));
      },
    );
  };

  /** fwreq: answer with the chunk on the MCU's fw topic. */
  private async onChunkRequest(mcuId: string, body: Buffer): Promise<void> {
    const req = decodeFwChunkRequest(body);
    this.opts.service.touch(mcuId, 'mqtt');
    const image = this.opts.service.firmwareFor(mcuId);
    const chunk = encodeFwChunk(image, req);
    if (image) {
      const start = Math.min(image.data.length, req.n * req.s);
      const end = Math.min(image.data.length, start + req.s);
      this.opts.service.firmwareServed(mcuId, 'mqtt', end, end - start);
    }
    await new Promise<void>((resolve) => {
      this.broker.publish({ cmd: 'publish', topic: mcuTopic(mcuId, 'fw'), payload: chunk, qos: 1, retain: false, dup: false }, (err) => {
        if (err) this.opts.log.debug('firmware chunk publish failed', { mcu: mcuId, err });
        resolve();
      });
    });
  }

  private authorizeSubscribe = (client: Client, sub: Subscription, done: (err: Error | null, sub?: Subscription | null) => void): void => {
    const mcuId = this.ids.get(client);
    if (mcuId && mcuMaySubscribe(mcuId, sub.topic)) return done(null, sub);
    this.opts.hooks.subscribeDenied();
    this.throttle.warn(`sub:${mcuId}`, 'MCU subscription refused', { mcu: mcuId, topic: sub.topic.slice(0, 200) });
    done(null, null); // refuse this one subscription (SUBACK 0x80); keep the connection
  };

  /** Stop accepting, disconnect every MCU, release the port. */
  async close(): Promise<void> {
    this.opts.service.off('head', this.pushCommand);
    const serverClosed = new Promise<void>((r) => this.server.close(() => r()));
    await new Promise<void>((r) => this.broker.close(() => r()));
    await serverClosed;
  }
}
