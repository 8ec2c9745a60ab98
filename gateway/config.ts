import { join } from 'node:path';
import { z } from 'zod';
import { defaultStateDir } from '../core/config.ts';
import { DEVICE_ID_RE } from '../core/topics.ts';
import { OutboxConfigSchema, reconnectKeys, UplinkConfigSchema } from '../core/outbox-config.ts';

/**
 * The gateway's uplink defaults differ from the agent's: one gateway relays for up to
 * 10,000 MCUs (10,000 msg/s at 1 msg/s each), so the agent's 2,000 records/s drain rate
 * and 256-record batches would queue a busy site forever. Keys and meaning are the same.
 */
const GatewayUplinkSchema = UplinkConfigSchema.extend({
  /**
   * records per batch publish (gateway default 256, as the agent's). The hub de-duplicates
   * a grouped record by its mid in the gateway's window (docs/topics.md#records), which must
   * cover every record the gateway can have in flight: uplink.window × batchMax = 16 × 256 =
   * 4096, the hub's default dedupWindow. With 1000, up to 16,000 small records (a backlog
   * drained after an outage) were in flight, and a resend of more than the window passed
   * whole as new. A grouped record holds the MCU messages of one turn, so 256 of them still
   * carry thousands of readings per publish (bounded by batchBytes).
   */
  batchMax: z.number().int().min(1).max(10_000).default(256),
  /** bytes per batch publish (gateway default 512 KiB) */
  batchBytes: z.number().int().min(1024).max(1024 * 1024).default(512 * 1024),
  /**
   * longest a record waits for others to share its publish, ms (gateway default 0: each
   * record is a group of MCU messages already, and under load the publish window batches
   * what queues behind it. Measured at 10,000 MQTT MCUs, five runs each, interleaved: p99
   * 38-71 ms (median 48) at 0 against 61-70 (median 64) at 5, for ~6% more of a core at
   * the hub; the agent's 20 ms had been most of the gateway's added latency)
   */
  batchDelayMs: z.number().int().min(0).max(60_000).default(0),
  /** records per second at most, 0 = unlimited (gateway default 20,000) */
  rate: z.number().int().min(0).default(20_000),
});

const port = z.number().int().min(0).max(65535);

/**
 * Gateway configuration (docs/config.md#gateway). File < command-line flags, validated
 * once at start by core/config.ts loadConfig, then frozen. Unknown keys are errors.
 * The `hub` block has the same shape as the agent's.
 */
export const GatewayConfigSchema = z
  .object({
    /** this gateway's device id at the hub (its MQTT client id and username there) */
    deviceId: z.string().regex(DEVICE_ID_RE, 'device ids are letters, digits, dot, dash and underscore, at most 64'),
    /** MCU replay counters, the list of known MCUs, and default places of the token and site secret */
    stateDir: z.string().min(1).default(defaultStateDir('gateway')),
    hub: z
      .object({
        url: z.string().regex(/^(mqtts?|wss?):\/\/\S+$/, 'hub.url must start with mqtt://, mqtts://, ws:// or wss://').default('mqtt://127.0.0.1:1883'),
        /** file with this gateway's device token (`fleetlet hub device-token <id>`), mode 0600; default <stateDir>/token */
        tokenFile: z.string().min(1).optional(),
        /** MQTT keep-alive, seconds; the hub marks the gateway offline about 1.5x this after it goes silent */
        keepaliveS: z.number().int().min(1).max(3600).default(30),
        ...reconnectKeys,
      })
      .strict()
      .prefault({}),
    mcu: z
      .object({
        /** address the MCU listeners (MQTT over TCP, CoAP over UDP) bind */
        host: z.string().min(1).default('127.0.0.1'),
        /**
         * MCU MQTT over plain TCP; 0 = any free port; null = no plain listener (MCUs must use
         * mqttTls, or CoAP). Stays on when mqttTls is set, so a site can move its MCUs over.
         */
        mqttPort: port.nullable().default(1884),
        /**
         * MCU MQTT over TLS (1.2 or newer) on its own port, same protocol and credentials as
         * the plain port. cert and key are PEM files (cert: the chain, leaf first), read and
         * checked once at start; the key file should be mode 0600.
         */
        mqttTls: z
          .object({
            /** TCP port; 0 = any free port */
            port: port.default(8884),
            cert: z.string().min(1),
            key: z.string().min(1),
          })
          .strict()
          .optional(),
        /** MCU CoAP port (UDP); 0 = any free port */
        coapPort: port.default(5683),
        /** file with the site secret every MCU key derives from, mode 0600, created when missing; default <stateDir>/site.secret */
        siteSecretFile: z.string().min(1).optional(),
        /** revoked MCUs, one id per line (`#` comments); re-read when it changes; default <stateDir>/revoked-mcus (absent = none) */
        revokedFile: z.string().min(1).optional(),
        /**
         * An MCU silent for longer than this is reported offline, ms. Unset: 3x the
         * interval observed between its messages (at least 1 s), or 60 s until known.
         */
        lostAfterMs: z.number().int().min(100).max(7 * 24 * 3600 * 1000).optional(),
        /** an MCU not heard from in this many days is forgotten, at start and hourly while running (its slot of maxMcus, its replay counters); 0 = never */
        forgetAfterDays: z.number().int().min(0).max(36_500).default(90),
        /** largest MCU message payload, bytes; CoAP is further bound by one datagram */
        maxPayloadBytes: z.number().int().min(256).max(1024 * 1024).default(16 * 1024),
        /** most SenML records in one message */
        maxRecords: z.number().int().min(1).max(10_000).default(256),
        /**
         * messages a second per MCU on average (telemetry, hello, ack, log), 0 = no limit; one
         * MCU over it is slowed, nothing is lost: MQTT gets its PUBACK later, CoAP a 5.03 with
         * Max-Age (docs/mcu-protocol.md "Rate limit")
         */
        msgRate: z
          .number()
          .min(0)
          .max(100_000)
          .refine((r) => r === 0 || r >= 0.1, 'at least 0.1 (one message in 10 s), or 0 for no limit')
          .default(20),
        /** messages an MCU may send at once above msgRate (a wake from deep sleep with kept readings) */
        msgBurst: z.number().int().min(1).max(1_000_000).default(200),
        /** most MCUs this gateway acts for; messages from further ones are refused */
        maxMcus: z.number().int().min(1).max(100_000).default(10_000),
        /**
         * MQTT connections not yet authenticated (TLS handshake or CONNECT pending) at once, in
         * all and from one remote address; one beyond is closed at accept and the MCU retries
         * later. Raise the per-address cap where many MCUs reach the gateway through one NAT
         */
        maxUnauthenticated: z.number().int().min(1).max(100_000).default(512),
        maxUnauthenticatedPerAddress: z.number().int().min(1).max(100_000).default(32),
        /** CoAP anti-replay window below the highest counter seen; 0 = strictly increasing; at most 32 */
        replayWindow: z.number().int().min(0).max(32).default(32),
        /** an MCU that declared a sleep period S is lost after S x lostFactor + lostGraceMs; without one, lostFactor x its observed interval */
        lostFactor: z.number().min(1).max(100).default(3),
        /** added to the declared sleep period's lost timeout, ms (time to boot and connect) */
        lostGraceMs: z.number().int().min(0).max(3_600_000).default(10_000),
        /**
         * Receive the MCUs' commands and desired state from the hub (the mailbox and firmware
         * updates need it): two wildcard subscriptions the hub filters per message to this
         * gateway's MCUs, whatever their number (docs/mcu-protocol.md).
         */
        hubDownlink: z.boolean().default(true),
        /** drop MQTT payloads that carry no MAC line (docs/mcu-protocol.md) */
        mqttRequireMac: z.boolean().default(false),
        /** commands waiting per MCU in the mailbox; more are refused to the hub with FLEET_MCU_MAILBOX_FULL */
        mailboxMax: z.number().int().min(1).max(1000).default(16),
        /** largest CoAP Block1 upload (logs, crash dumps), bytes */
        maxUploadBytes: z.number().int().min(1024).max(16 * 1024 * 1024).default(64 * 1024),
        /** CoAP Block1 uploads in progress at once */
        maxUploads: z.number().int().min(1).max(10_000).default(64),
      })
      .strict()
      .refine((m) => !m.mqttTls || m.mqttTls.port === 0 || m.mqttTls.port !== m.mqttPort, {
        message: 'must differ from mcu.mqttPort (set mcu.mqttPort: null for TLS only)',
        path: ['mqttTls', 'port'],
      })
      .prefault({}),
    /** the durable store-and-forward queue towards the hub, under <stateDir>/outbox */
    outbox: OutboxConfigSchema.prefault({}),
    uplink: GatewayUplinkSchema.prefault({}),
    /** the gateway's own HTTP endpoint: /metrics, /health, /ready */
    http: z
      .object({
        /** address to bind; keep loopback unless a scraper on the LAN needs it */
        host: z.string().min(1).default('127.0.0.1'),
        /** TCP port; unset = no HTTP endpoint (default); 0 = any free port */
        port: port.optional(),
      })
      .strict()
      .prefault({}),
    /**
     * Trust root (bundles' root.json) that MCU firmware bundles must verify against; without
     * it the gateway refuses firmware in desired states (FLEET_MCU_FIRMWARE)
     */
    firmwareTrustFile: z.string().min(1).optional(),
    /** base URL for firmware bundle URLs that are paths (the hub's HTTP address: its artifact store answers uploads with `/api/v1/artifacts/{sha256}`) */
    firmwareBaseUrl: z
      .string()
      .refine((u) => {
        try {
          return ['http:', 'https:'].includes(new URL(u).protocol);
        } catch {
          return false;
        }
      }, 'firmwareBaseUrl must be an http:// or https:// URL, e.g. http://hub:8080')
      .optional(),
    /** MCU firmware: largest image served, bytes */
    firmwareMaxBytes: z.number().int().min(1024).max(256 * 1024 * 1024).default(16 * 1024 * 1024),
    /** MCU firmware: an MCU that took the image must report the new version within this, s (at least 3 of its declared sleep periods) */
    firmwareInstallTimeoutS: z.number().int().min(10).max(7 * 24 * 3600).default(1800),
    /** MCU firmware: how long an offer waits in the MCU's mailbox, s; one not taken by then is renewed while the desired state stands */
    firmwareOfferTtlS: z.number().int().min(60).max(365 * 24 * 3600).default(7 * 24 * 3600),
    /** how often changed replay counters and the MCU list are written to stateDir, ms */
    stateFlushMs: z.number().int().min(50).max(60_000).default(2000),
  })
  .strict();

export type GatewayConfig = z.infer<typeof GatewayConfigSchema>;

/** Files that default to places under stateDir. */
export function gatewayPaths(config: Pick<GatewayConfig, 'stateDir' | 'hub' | 'mcu'>): { tokenFile: string; siteSecretFile: string; stateFile: string; revokedFile: string } {
  return {
    tokenFile: config.hub.tokenFile ?? join(config.stateDir, 'token'),
    siteSecretFile: config.mcu.siteSecretFile ?? join(config.stateDir, 'site.secret'),
    stateFile: join(config.stateDir, 'mcu-state.json'),
    revokedFile: config.mcu.revokedFile ?? join(config.stateDir, 'revoked-mcus'),
  };
}
