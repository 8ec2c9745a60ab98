import { z } from 'zod';
import { defaultStateDir } from '../core/config.ts';

/** Hub configuration (docs/config.md#hub). Validated once at start, then frozen. */
export const HubConfigSchema = z
  .object({
    /** address every listener binds; anything but loopback needs TLS for MQTT in production */
    host: z.string().default('127.0.0.1'),
    /** MQTT over TCP; 0 = any free port */
    mqttPort: z.number().int().min(0).max(65535).default(1883),
    /** MQTT over TLS, only when tls.cert and tls.key are given */
    mqttsPort: z.number().int().min(0).max(65535).default(8883),
    /** operator HTTP API, /metrics, /health */
    httpPort: z.number().int().min(0).max(65535).default(8080),
    /** take a free port when a default one is taken (the demo sets this) */
    portFallback: z.boolean().default(false),
    /** broker persistence, registry, secrets */
    stateDir: z.string().default(defaultStateDir('hub')),
    tls: z.object({ cert: z.string(), key: z.string() }).strict().optional(),
    /** allow GET on the operator API without a token when host is loopback */
    openReadsOnLoopback: z.boolean().default(true),
    /** per-device de-duplication window (message ids remembered per device) */
    dedupWindow: z.number().int().min(16).max(1_000_000).default(4096),
    /** mids remembered across all devices (the memory bound, ~50–90 bytes each: docs/topics.md#de-duplication) */
    dedupMaxMids: z.number().int().min(1000).max(1_000_000_000).default(8_000_000),
    /** under that bound, windows are trimmed down to this many mids per device before whole devices are forgotten (at most dedupWindow) */
    dedupMinWindow: z.number().int().min(16).max(1_000_000).default(256),
    /** largest MQTT message payload accepted from a device, bytes */
    maxPayloadBytes: z.number().int().min(1024).max(16 * 1024 * 1024).default(1024 * 1024),
    /** HTTP requests per second per client address */
    httpRateLimit: z.number().int().min(0).default(50),
    /** an MCU moves to another gateway that registers it and sends for it once its gateway is offline or has not sent for it this long, ms */
    mcuClaimIdleMs: z.number().int().min(1000).default(300_000),
    /** the command store (docs/topics.md#command-delivery) */
    commands: z
      .object({
        /** commands awaiting a reply, per device; one more is refused with 429 */
        maxPendingPerDevice: z.number().int().min(1).max(100_000).default(100),
        /** the same over all devices */
        maxPending: z.number().int().min(1).max(10_000_000).default(100_000),
        /** finished commands kept for the API, per device */
        maxHistoryPerDevice: z.number().int().min(0).max(10_000).default(50),
        /** finished commands are forgotten after this, ms */
        historyMs: z.number().int().min(0).default(24 * 3600 * 1000),
        /** first re-send to a device that has not replied, ms; doubles per send */
        resendInitialMs: z.number().int().min(1000).default(30_000),
        /** cap of the re-send interval, ms */
        resendMaxMs: z.number().int().min(1000).default(300_000),
      })
      .strict()
      .prefault({}),
    /** largest bundle the artifact store accepts (POST /api/v1/artifacts), bytes */
    artifactMaxBytes: z.number().int().min(1024).default(2 * 1024 ** 3),
  })
  .strict();

export type HubConfig = z.infer<typeof HubConfigSchema>;
