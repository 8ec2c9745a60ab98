import mqtt, { type IClientOptions, type MqttClient } from 'mqtt';
import { encodeMessage, type StateMessage } from './messages.ts';
import { deviceTopic } from './topics.ts';

export interface FleetClientOptions {
  url: string;
  deviceId: string;
  token: string;
  kind: StateMessage['kind'];
  version: string;
  /** MQTT keep-alive in seconds; the hub marks the device offline 1.5x this after silence */
  keepalive: number;
  /** reconnect period in ms */
  reconnectMs?: number;
  protocolVersion?: 4 | 5;
}

/**
 * Connect a device (agent or gateway) to the hub: client id = username = device id,
 * the device token as password, and a retained `{online:false}` last will on the
 * device's state topic, so the hub learns of a lost device from the broker itself.
 * On every (re)connect the device publishes its retained `{online:true}` state.
 */
export function connectFleetClient(opts: FleetClientOptions): MqttClient {
  const stateTopic = deviceTopic(opts.deviceId, 'state');
  const state = (online: boolean, reason?: string): Buffer =>
    encodeMessage({ v: 1, online, kind: opts.kind, ts: Date.now(), version: opts.version, ...(reason ? { reason } : {}) } satisfies StateMessage);
  const options: IClientOptions = {
    clientId: opts.deviceId,
    username: opts.deviceId,
    password: opts.token,
    keepalive: opts.keepalive,
    reconnectPeriod: opts.reconnectMs ?? 1000,
    connectTimeout: 10_000,
    protocolVersion: opts.protocolVersion ?? 4,
    clean: true,
    will: { topic: stateTopic, payload: state(false, 'connection lost'), qos: 1, retain: true },
  };
  const client = mqtt.connect(opts.url, options);
  client.on('connect', () => {
    client.publish(stateTopic, state(true), { qos: 1, retain: true });
  });
  return client;
}

/** Publish the retained offline state and disconnect cleanly (a clean disconnect suppresses the will). */
export async function disconnectFleetClient(client: MqttClient, deviceId: string, kind: StateMessage['kind'], version: string, graceMs = 2000): Promise<void> {
  if (client.connected) {
    const msg = encodeMessage({ v: 1, online: false, kind, ts: Date.now(), version, reason: 'stopped' } satisfies StateMessage);
    // bounded: when the hub goes away at the same moment the PUBACK never comes, and mqtt.js
    // would keep the message for a reconnect that a stopping process will never make
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([
      client.publishAsync(deviceTopic(deviceId, 'state'), msg, { qos: 1, retain: true }).catch(() => undefined),
      new Promise<void>((resolve) => (timer = setTimeout(resolve, graceMs))),
    ]);
    clearTimeout(timer);
  }
  await client.endAsync(true).catch(() => undefined);
}
