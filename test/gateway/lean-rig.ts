import mqttPacket from 'mqtt-packet';
import { LeanMqttServer, type LeanServerHooks, type LeanServerOptions, type PublishOutcome } from '../../gateway/mqtt-lean.ts';

/**
 * A LeanMqttServer on 127.0.0.1 port 0 for the gateway/mqtt-lean.ts tests, and raw MQTT
 * packets to feed it. The store is a stand-in for the outbox append: it waits `storeMs`
 * (an fsync) and records the payload; clients authenticate as their client id, except with
 * the password `bad`.
 */

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

// eslint-disable-next-line @typescript-eslint/no-explicit-any
export const pk = (p: object): Buffer => mqttPacket.generate(p as any);
export const connectPk = (id: string, extra: object = {}): Buffer => pk({ cmd: 'connect', protocolId: 'MQTT', protocolVersion: 4, clean: true, clientId: id, keepalive: 60, ...extra });
export const publishPk = (topic: string, payload: Buffer | string, qos: 0 | 1, messageId?: number, dup = false): Buffer =>
  pk({ cmd: 'publish', topic, payload: Buffer.from(payload), qos, dup, retain: false, ...(qos ? { messageId } : {}) });

export interface LeanRig {
  srv: LeanMqttServer;
  port: number;
  /** payloads handed to onPublish, in order */
  stored: Buffer[];
  /** `malformed …` and `tooLarge …`, and whatever `moreHooks` records */
  events: string[];
}

export async function leanRig(opts: Partial<LeanServerOptions> = {}, storeMs = 0, moreHooks: (events: string[]) => Partial<LeanServerHooks> = () => ({})): Promise<LeanRig> {
  const stored: Buffer[] = [];
  const events: string[] = [];
  const srv = new LeanMqttServer({
    maxRemainingLength: 17 * 1024,
    maxConnections: 100,
    ...opts,
    hooks: {
      authenticate: (c) => (c.password?.toString() === 'bad' ? { rc: 4 } : { rc: 0, id: c.clientId }),
      onPublish: async (_conn, p): Promise<PublishOutcome> => {
        if (storeMs > 0) await sleep(storeMs);
        stored.push(Buffer.from(p.payload));
        return 'ack';
      },
      onSubscribe: () => 0,
      onMalformed: (e) => events.push(`malformed ${e.message}`),
      onTooLarge: (e) => events.push(`tooLarge ${e.message}`),
      ...moreHooks(events),
    },
  });
  return { srv, port: await srv.listen('127.0.0.1', 0), stored, events };
}
