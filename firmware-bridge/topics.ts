import { assertDeviceId, isDeviceId } from '../core/topics.ts';

/**
 * MCU-side topic layout on the gateway's MQTT listener (docs/mcu-protocol.md).
 * Deliberately short — ESP32 firmware builds these strings on every publish, and
 * every byte is airtime on a weak Wi-Fi link — and separate from the fleet layout
 * (core/topics.ts): the gateway translates between the two, so the hub never sees
 * MCU wire formats and MCUs never see fleet ones.
 *
 *   mcu/v1/{mcuId}/t      MCU → gateway  telemetry: SenML JSON, SenML CBOR, compact binary
 *   mcu/v1/{mcuId}/hello  MCU → gateway  version report after boot (JSON)
 *   mcu/v1/{mcuId}/ack    MCU → gateway  command acknowledgement (JSON)
 *   mcu/v1/{mcuId}/log    MCU → gateway  log text or crash dump
 *   mcu/v1/{mcuId}/fwreq  MCU → gateway  firmware chunk request (JSON)
 *   mcu/v1/{mcuId}/cmd    gateway → MCU  commands from the mailbox (framed, MAC'd)
 *   mcu/v1/{mcuId}/fw     gateway → MCU  firmware chunks (16-byte header + data)
 *
 * An MCU may publish only on its own up channels and subscribe only to its own down
 * channels (or `mcu/v1/{mcuId}/#`); the gateway's broker enforces that.
 */
export const MCU_TOPIC_ROOT = 'mcu/v1';
export const MCU_PREFIX = `${MCU_TOPIC_ROOT}/`;

export const MCU_UP_CHANNELS = ['t', 'hello', 'ack', 'log', 'fwreq'] as const;
export const MCU_DOWN_CHANNELS = ['cmd', 'fw'] as const;
export type McuUpChannel = (typeof MCU_UP_CHANNELS)[number];
export type McuDownChannel = (typeof MCU_DOWN_CHANNELS)[number];
export type McuChannel = McuUpChannel | McuDownChannel;

const UP: ReadonlySet<string> = new Set(MCU_UP_CHANNELS);
const DOWN: ReadonlySet<string> = new Set(MCU_DOWN_CHANNELS);

export interface ParsedMcuTopic {
  mcuId: string;
  channel: McuChannel;
  direction: 'up' | 'down';
}

/** The topic of one MCU channel. MCU ids follow the fleet device-id rule (core/topics.ts). */
export function mcuTopic(mcuId: string, channel: McuChannel): string {
  return `${MCU_PREFIX}${assertDeviceId(mcuId)}/${channel}`;
}

/** Parse a concrete (non-wildcard) MCU topic; null when it is not one. */
export function parseMcuTopic(topic: string): ParsedMcuTopic | null {
  if (topic.length > 256 || !topic.startsWith(MCU_PREFIX)) return null;
  const rest = topic.slice(MCU_PREFIX.length).split('/');
  if (rest.length !== 2) return null;
  const [mcuId, channel] = rest as [string, string];
  if (!isDeviceId(mcuId)) return null;
  if (UP.has(channel)) return { mcuId, channel: channel as McuUpChannel, direction: 'up' };
  if (DOWN.has(channel)) return { mcuId, channel: channel as McuDownChannel, direction: 'down' };
  return null;
}

/** `topic` parsed when MCU `mcuId` may publish on it (one of its own up channels), else null. */
export function mcuUpTopic(mcuId: string, topic: string): ParsedMcuTopic | null {
  const t = parseMcuTopic(topic);
  return t !== null && t.mcuId === mcuId && t.direction === 'up' ? t : null;
}

/** May MCU `mcuId` publish on `topic`? Only its own up channels. */
export function mcuMayPublish(mcuId: string, topic: string): boolean {
  return mcuUpTopic(mcuId, topic) !== null;
}

/**
 * May MCU `mcuId` subscribe to `filter`? Its own down channels, or its whole subtree
 * with `mcu/v1/{id}/#` (it receives only what the gateway sends there). Any other
 * wildcard would reach other MCUs' topics.
 */
export function mcuMaySubscribe(mcuId: string, filter: string): boolean {
  if (!isDeviceId(mcuId)) return false;
  if (filter === `${MCU_PREFIX}${mcuId}/#`) return true;
  if (filter.includes('+') || filter.includes('#')) return false;
  const t = parseMcuTopic(filter);
  return t !== null && t.mcuId === mcuId && t.direction === 'down';
}
