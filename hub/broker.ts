import { Aedes, type AuthenticateError, type Client, type PublishPacket, type Subscription } from 'aedes';
import aedesPersistenceLevel from 'aedes-persistence-level';
import type { Level } from 'level';
import { deriveToken } from '../core/credentials.ts';
import { secretEquals } from '../core/http.ts';
import type { Logger } from '../core/log.ts';
import { decodeMessage } from '../core/messages.ts';
import type { Counter } from '../core/metrics.ts';
import { isDeviceId, parseTopic } from '../core/topics.ts';
import { canPublish, canSubscribe, type Identity } from './acl.ts';

export interface BrokerOptions {
  db: Level<string, Buffer>;
  log: Logger;
  fleetSecret: string;
  operatorToken: string;
  maxPayloadBytes: number;
  denied: Counter;
  authFailures: Counter;
}

export const OPERATOR_USERNAME = 'operator';
/** Where refused publishes go: nowhere anyone can subscribe. */
export const REFUSED_TOPIC = '$fleetlet/refused';

/**
 * The hub's aedes broker with device identity and ACLs. Every client authenticates:
 * devices as username = client id = device id with their derived token, operators
 * (dashboards, consumers) as `operator` with the operator token. There is no anonymous
 * access, on loopback either.
 */
export class HubBroker {
  readonly aedes: Aedes;
  private readonly identities = new WeakMap<Client, Identity>();
  /** gateway id → MCU ids it acts for (from its retained register message) */
  private readonly delegations = new Map<string, Set<string>>();
  /** MCU id → the gateway that claimed it first */
  private readonly claimedBy = new Map<string, string>();

  private constructor(
    aedes: Aedes,
    private readonly opts: BrokerOptions,
  ) {
    this.aedes = aedes;
  }

  static async create(opts: BrokerOptions): Promise<HubBroker> {
    const persistence = aedesPersistenceLevel(opts.db);
    const aedes = await Aedes.createBroker({ persistence, id: 'fleetlet-hub' });
    const hub = new HubBroker(aedes, opts);
    aedes.authenticate = hub.authenticate;
    aedes.authorizePublish = hub.authorizePublish;
    aedes.authorizeSubscribe = hub.authorizeSubscribe;
    aedes.on('clientError', (client, err) => opts.log.debug('mqtt client error', { client: client?.id, err }));
    aedes.on('connectionError', (client, err) => opts.log.debug('mqtt connection error', { client: client?.id, err }));
    return hub;
  }

  /** MCUs a gateway acts for. */
  mcusOf = (gatewayId: string): ReadonlySet<string> | undefined => this.delegations.get(gatewayId);

  private authenticate = (client: Client, username: string | undefined, password: Buffer | undefined, done: (err: AuthenticateError | null, ok: boolean | null) => void): void => {
    const fail = (why: string) => {
      this.opts.authFailures.inc();
      this.opts.log.warn('mqtt authentication refused', { client: client.id, username, why });
      const err = new Error(`not authorized: ${why}`) as AuthenticateError;
      err.returnCode = 4; // bad user name or password [MQTT-3.2.2-3 table 3.1]
      done(err, null);
    };
    const pw = password?.toString('utf8') ?? '';
    if (username === OPERATOR_USERNAME) {
      if (!secretEquals(pw, this.opts.operatorToken)) return fail('wrong operator token');
      this.identities.set(client, { kind: 'operator' });
      return done(null, true);
    }
    if (!isDeviceId(username)) return fail('username is not a device id');
    if (client.id !== username) return fail('client id must equal the device id');
    if (this.claimedBy.has(username)) return fail('id belongs to an MCU behind a gateway');
    if (!secretEquals(pw, deriveToken(this.opts.fleetSecret, 'device', username))) return fail('wrong device token');
    this.identities.set(client, { kind: 'device', id: username });
    done(null, true);
  };

  private authorizePublish = (client: Client | null, packet: PublishPacket, done: (err?: Error | null) => void): void => {
    if (client === null) return done(null); // the hub's own publishes
    const identity = this.identities.get(client);
    if (!identity) return done(new Error('publish refused: not authenticated'));
    const deny = (why: string) => {
      this.opts.denied.inc({ action: 'publish' });
      this.opts.log.warn('mqtt publish refused', { client: client.id, topic: packet.topic, why });
      // MQTT 3.1.1 cannot refuse one PUBLISH, and closing the connection (aedes' answer to
      // an error here) makes an at-least-once sender resend the same record forever. So the
      // publish is acknowledged and diverted to a $-topic: '#' and '+' never match those
      // [MQTT-4.7.2-1] and the ACL lets nobody subscribe there, so it reaches no one.
      packet.topic = REFUSED_TOPIC;
      packet.retain = false;
      done(null);
    };
    const size = Buffer.isBuffer(packet.payload) ? packet.payload.length : Buffer.byteLength(String(packet.payload));
    if (size > this.opts.maxPayloadBytes) return deny(`payload of ${size} bytes exceeds ${this.opts.maxPayloadBytes}`);
    if (!canPublish(identity, packet.topic, packet.retain, this.mcusOf)) return deny('topic outside the ACL');
    const t = parseTopic(packet.topic);
    if (t?.channel === 'register' && identity.kind === 'device') {
      try {
        this.applyRegistration(identity.id, decodeMessage('register', packet.payload as Buffer).mcus);
      } catch (err) {
        return deny(`bad register message: ${(err as Error).message}`);
      }
    }
    done(null);
  };

  /** A gateway's MCU list; an id already claimed by another gateway, or not a device id, is ignored. */
  applyRegistration(gatewayId: string, mcus: readonly string[]): void {
    const set = new Set<string>();
    for (const id of mcus) {
      if (!isDeviceId(id) || id === gatewayId) continue;
      const owner = this.claimedBy.get(id);
      if (owner !== undefined && owner !== gatewayId) {
        this.opts.log.warn('MCU already registered by another gateway', { mcu: id, gateway: gatewayId, owner });
        continue;
      }
      this.claimedBy.set(id, gatewayId);
      set.add(id);
    }
    for (const old of this.delegations.get(gatewayId) ?? []) if (!set.has(old)) this.claimedBy.delete(old);
    this.delegations.set(gatewayId, set);
  }

  private authorizeSubscribe = (client: Client, sub: Subscription, done: (err: Error | null, sub?: Subscription | null) => void): void => {
    const identity = this.identities.get(client);
    if (identity && canSubscribe(identity, sub.topic, this.mcusOf)) return done(null, sub);
    this.opts.denied.inc({ action: 'subscribe' });
    this.opts.log.warn('mqtt subscription refused', { client: client.id, topic: sub.topic });
    done(null, null); // refuse this subscription only: the client sees 0x80 (FACTS.md)
  };

  /** Publish from the hub itself (desired state, commands). */
  publish(topic: string, payload: Buffer, retain: boolean): Promise<void> {
    return new Promise((resolve, reject) =>
      this.aedes.publish({ cmd: 'publish', topic, payload, qos: 1, retain, dup: false }, (err) => (err ? reject(err) : resolve())),
    );
  }

  /** Rebuild gateway delegations from retained register messages after a restart. */
  async restoreDelegations(): Promise<void> {
    const persistence = (this.aedes as unknown as { persistence: { createRetainedStreamCombi(p: string[]): AsyncIterable<{ topic: string; payload: Buffer }> } }).persistence;
    for await (const packet of persistence.createRetainedStreamCombi(['fleet/v1/d/+/register'])) {
      const t = parseTopic(packet.topic);
      if (!t) continue;
      try {
        this.applyRegistration(t.deviceId, decodeMessage('register', packet.payload).mcus);
      } catch (err) {
        this.opts.log.warn('ignoring bad retained register message', { topic: packet.topic, err });
      }
    }
  }

  close(): Promise<void> {
    return new Promise((resolve) => this.aedes.close(() => resolve()));
  }
}
