import { isUpChannel, MCU_REVOCATIONS_TOPIC, parseTopic, RELAY_CMD, RELAY_DESIRED, TOPIC_ROOT } from '../core/topics.ts';

/**
 * Topic ACL as pure functions (docs/security.md). A device may publish only on the
 * device→hub channels of its own subtree, and subscribe only to its own hub→device
 * channels; a gateway may do the same for the MCUs it registered. Operators may
 * subscribe anywhere under the fleet root and publish commands and desired state.
 */
export type Identity = { kind: 'device'; id: string } | { kind: 'operator' };

/** The MCUs a gateway currently acts for. */
export type Delegations = (gatewayId: string) => ReadonlySet<string> | undefined;

/** Retain is allowed only where the contract says the message is retained. */
const RETAINED_UP = new Set(['state', 'register']);

export function mayActFor(identity: Identity, deviceId: string, delegations: Delegations): boolean {
  if (identity.kind !== 'device') return false;
  return identity.id === deviceId || (delegations(identity.id)?.has(deviceId) ?? false);
}

/**
 * Why a device's publish fails `canPublish` for a reason other than who it may act for (the
 * channel, retain, register or batch on another's topic), in words for a dead letter; null
 * when only acting for the topic's device is in question. Kept beside canPublish, in its order.
 */
export function deviceRuleBroken(identity: Identity & { kind: 'device' }, topic: string, retain: boolean): string | null {
  const t = parseTopic(topic);
  if (!t) return 'not a fleet topic';
  if (!isUpChannel(t.channel)) return `a device does not publish on ${t.channel} (the hub sends it)`;
  if (retain && !RETAINED_UP.has(t.channel)) return `${t.channel} is not retained (only state and register are)`;
  if ((t.channel === 'register' || t.channel === 'batch') && t.deviceId !== identity.id) return `${t.channel} goes on the sender's own topic only`;
  return null;
}

export function canPublish(identity: Identity, topic: string, retain: boolean, delegations: Delegations): boolean {
  const t = parseTopic(topic);
  if (!t) return false;
  if (identity.kind === 'operator') return !isUpChannel(t.channel);
  if (!isUpChannel(t.channel)) return false;
  if (retain && !RETAINED_UP.has(t.channel)) return false;
  // only a device itself registers MCUs; a gateway cannot register on an MCU's behalf.
  // A batch goes on the sender's own topic: a gateway's batch carries its MCUs' messages
  // as items, each checked against this ACL when the hub unpacks it.
  if (t.channel === 'register' || t.channel === 'batch') return t.deviceId === identity.id;
  return mayActFor(identity, t.deviceId, delegations);
}

/**
 * The two wildcard filters a gateway uses to receive what the hub sends down for its MCUs:
 * one subscription for all of them (a per-MCU subscription made the broker scan its retained
 * messages once per topic). What is delivered through them is filtered per message by
 * `mayReceive`, so a device still gets only its own and its MCUs' messages.
 */
export const RELAY_FILTERS: readonly string[] = [RELAY_CMD, RELAY_DESIRED];

export function canSubscribe(identity: Identity, filter: string, delegations: Delegations): boolean {
  if (identity.kind === 'operator') return filter === '#' || filter === `${TOPIC_ROOT}/#` || filter.startsWith(`${TOPIC_ROOT}/`);
  if (RELAY_FILTERS.includes(filter)) return true;
  if (filter === MCU_REVOCATIONS_TOPIC) return true; // any device (mayReceive)
  if (filter.includes('+') || filter.includes('#')) return false;
  const t = parseTopic(filter);
  if (!t || isUpChannel(t.channel)) return false;
  return mayActFor(identity, t.deviceId, delegations);
}

/**
 * Per delivery (aedes authorizeForward): a device receives a fleet message only for itself or
 * an MCU it acts for right now. This is what makes RELAY_FILTERS safe, and it also holds for
 * retained messages sent on subscribe.
 */
export function mayReceive(identity: Identity | undefined, topic: string, delegations: Delegations): boolean {
  // the MCU revocation list goes to devices: a gateway needs it before its first MCU connects,
  // so before its first register, and the hub cannot tell it from an agent until then (ids of
  // revoked MCUs, nothing secret). An operator's fleet/v1/# consumer does not get it
  // (operators read it from the API)
  if (topic === MCU_REVOCATIONS_TOPIC) return identity?.kind === 'device';
  if (!identity || identity.kind === 'operator') return true;
  const t = parseTopic(topic);
  if (!t) return !topic.startsWith(`${TOPIC_ROOT}/`);
  return mayActFor(identity, t.deviceId, delegations);
}
