import { FleetError } from './errors.ts';

/**
 * Fleet topic layout (docs/topics.md). Everything lives under one versioned root,
 * one subtree per device:
 *
 *   fleet/v1/d/{deviceId}/state      device → hub, retained; {online:false} is the MQTT last will
 *   fleet/v1/d/{deviceId}/telemetry  device → hub, batched samples
 *   fleet/v1/d/{deviceId}/events     device → hub
 *   fleet/v1/d/{deviceId}/logs       device → hub
 *   fleet/v1/d/{deviceId}/reply      device → hub, replies to commands
 *   fleet/v1/d/{deviceId}/register   gateway → hub, retained: the MCUs this gateway acts for
 *   fleet/v1/d/{deviceId}/batch      device → hub, many messages in one publish (core/batch.ts)
 *   fleet/v1/d/{deviceId}/cmd        hub → device, commands (QoS 1, with id and expiry)
 *   fleet/v1/d/{deviceId}/desired    hub → device, retained desired state
 */
export const TOPIC_ROOT = 'fleet/v1';
export const DEVICE_PREFIX = `${TOPIC_ROOT}/d/`;

export const UP_CHANNELS = ['state', 'telemetry', 'events', 'logs', 'reply', 'register', 'batch'] as const;
export const DOWN_CHANNELS = ['cmd', 'desired'] as const;
export type UpChannel = (typeof UP_CHANNELS)[number];
export type DownChannel = (typeof DOWN_CHANNELS)[number];
export type Channel = UpChannel | DownChannel;

/** Device ids are topic-safe: no '/', '+', '#', no leading dot, bounded length. */
export const DEVICE_ID_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;

export function isDeviceId(id: unknown): id is string {
  return typeof id === 'string' && DEVICE_ID_RE.test(id);
}

export function assertDeviceId(id: unknown): string {
  if (!isDeviceId(id)) throw new FleetError('FLEET_DEVICE_ID_INVALID', `invalid device id ${JSON.stringify(id)}`);
  return id;
}

export function deviceTopic(deviceId: string, channel: Channel): string {
  return `${DEVICE_PREFIX}${assertDeviceId(deviceId)}/${channel}`;
}

/** Wildcard subscription for one channel of every device. */
export function allDevices(channel: Channel): string {
  return `${DEVICE_PREFIX}+/${channel}`;
}

export interface ParsedTopic {
  deviceId: string;
  channel: Channel;
}

const CHANNELS: ReadonlySet<string> = new Set<string>([...UP_CHANNELS, ...DOWN_CHANNELS]);

/** Parse a concrete (non-wildcard) fleet topic; null when it is not one. */
export function parseTopic(topic: string): ParsedTopic | null {
  if (!topic.startsWith(DEVICE_PREFIX)) return null;
  // indexOf instead of split: the hub parses every routed MCU reading's topic
  const slash = topic.indexOf('/', DEVICE_PREFIX.length);
  if (slash < 0 || topic.indexOf('/', slash + 1) >= 0) return null;
  const deviceId = topic.slice(DEVICE_PREFIX.length, slash);
  const channel = topic.slice(slash + 1);
  if (!CHANNELS.has(channel) || !isDeviceId(deviceId)) return null;
  return { deviceId, channel: channel as Channel };
}

export function isUpChannel(c: Channel): c is UpChannel {
  return (UP_CHANNELS as readonly string[]).includes(c);
}

/**
 * The wildcard filters a gateway subscribes to receive the hub's cmd and desired messages for
 * all its MCUs at once; the hub delivers through them only what the subscriber may receive
 * (hub/acl.ts mayReceive). docs/topics.md#gateways.
 */
export const RELAY_CMD = `${TOPIC_ROOT}/d/+/cmd`;
/** Retained by the hub: the MCUs revoked fleet-wide, for gateways (docs/topics.md#gateways). */
export const MCU_REVOCATIONS_TOPIC = `${TOPIC_ROOT}/mcu-revocations`;
export const RELAY_DESIRED = `${TOPIC_ROOT}/d/+/desired`;
