import { isFleetError } from '../core/errors.ts';
import type { Logger } from '../core/log.ts';
import type { McuChannel } from '../firmware-bridge/topics.ts';
import type { McuProtocol } from './relay.ts';

/**
 * Why an MCU message was dropped — the `reason` label of
 * fleet_gateway_mcu_dropped_total. Stable: dashboards and alerts use these names.
 */
export type DropReason =
  | 'auth' // MQTT password or CoAP MAC wrong
  | 'replay' // CoAP counter already used or too old
  | 'decode' // payload is not valid SenML JSON
  | 'too_large' // payload or datagram over the limit
  | 'forbidden' // topic outside the MCU's own subtree, or an id that may not be an MCU here
  | 'bad_request' // not an MCU resource, wrong method, malformed datagram
  | 'unsupported' // content format or CoAP feature not supported (Block1)
  | 'mcu_limit' // the gateway already acts for maxMcus MCUs
  | 'revoked' // the MCU is on the revoked list (mcu.revokedFile)
  | 'outbox_full' // the outbox cannot take it (byte budget of higher-priority records)
  | 'unavailable' // the gateway is stopping or its store failed
  | 'upload'; // a Block1 upload out of order, too large, timed out, or too many at once

/** What an ingress calls; index.ts wires it to the relay and the metrics. */
export interface IngressHooks {
  /** one message accepted (counted per protocol and channel) */
  accepted(protocol: McuProtocol, channel: McuChannel): void;
  /** one message (or connection) refused */
  dropped(protocol: McuProtocol, reason: DropReason, info: { mcuId?: string | undefined; err?: unknown }): void;
  /** one message held back (MQTT) or answered 5.03 (CoAP) by the per-MCU rate limit */
  throttled(protocol: McuProtocol, mcuId: string): void;
  /** one MQTT connect or CoAP message whose credentials did not verify */
  authFailed(protocol: McuProtocol): void;
  /** one subscription refused by the ACL */
  subscribeDenied(): void;
  /** one retransmission of a message stored already, acknowledged again and not stored twice (MQTT DUP; `reconnected`: resent on a new connection) */
  duplicate?(protocol: McuProtocol, reconnected: boolean): void;
}

/** Drop reason for an error from the relay's `deliver`. */
export function deliverFailureReason(err: unknown): DropReason {
  if (isFleetError(err, 'FLEET_FORBIDDEN')) return err.details?.limit !== undefined ? 'mcu_limit' : 'forbidden';
  if (isFleetError(err, 'FLEET_OUTBOX_FULL')) return 'outbox_full';
  if (isFleetError(err, 'FLEET_MCU_DECODE')) return 'decode';
  return 'unavailable';
}

/**
 * Warn at most once per key per period, so a fleet of misconfigured MCUs cannot flood
 * the log; everything is still counted in the metrics. The ones held back are logged at
 * debug level (FLEETLET_LOG_LEVEL=debug shows each), and the next warning for the key says
 * how many there were (`suppressed`), so a field engineer reading warnings knows they went on.
 */
export class LogThrottle {
  private readonly last = new Map<string, { at: number; suppressed: number }>();
  constructor(
    private readonly log: Logger,
    private readonly periodMs = 60_000,
    private readonly now: () => number = () => performance.now(),
  ) {}

  warn(key: string, msg: string, fields: Record<string, unknown>): void {
    const now = this.now();
    const prev = this.last.get(key);
    if (prev !== undefined && now - prev.at < this.periodMs) {
      prev.suppressed++;
      this.log.debug(msg, fields);
      return;
    }
    if (prev === undefined && this.last.size >= 10_000) this.last.clear(); // bounded under id churn
    this.last.set(key, { at: now, suppressed: 0 });
    // `suppressed`: how many more since the last such warning (each logged at debug level)
    this.log.warn(msg, prev?.suppressed ? { ...fields, suppressed: prev.suppressed } : fields);
  }
}
