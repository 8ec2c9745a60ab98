import { z } from 'zod';

/** Reconnect timing of a device's hub connection (core/mqtt.ts reconnectDelay). */
export const reconnectKeys = {
  /** first reconnect delay, ms; doubles per failed attempt (with jitter) */
  reconnectMs: z.number().int().min(100).max(300_000).default(1000),
  /** reconnect delay cap, ms */
  reconnectMaxMs: z.number().int().min(100).max(3_600_000).default(30_000),
};

/** The outbox and uplink sections shared by the agent's and the gateway's config (docs/config.md). */
export const OutboxConfigSchema = z
  .object({
    /** byte budget of stored records (topic + payload), bytes */
    maxBytes: z.number().int().min(64 * 1024).default(256 * 1024 * 1024),
    /** free space kept on the store's file system, bytes; below it new records evict old ones; 0 disables */
    minFreeBytes: z.number().int().min(0).default(64 * 1024 * 1024),
    /**
     * least time between two fsyncs of the store, ms: appends arriving meanwhile share the
     * next one (an append resolves up to this much later); 0 = an fsync per write
     */
    syncIntervalMs: z.number().int().min(0).max(1000).default(10),
  })
  .strict();

export const UplinkConfigSchema = z
  .object({
    /** publishes awaiting PUBACK at once */
    window: z.number().int().min(1).max(1000).default(16),
    /** records per batch publish (1 = no batching) */
    batchMax: z.number().int().min(1).max(10_000).default(256),
    /** bytes per batch publish */
    batchBytes: z.number().int().min(1024).max(1024 * 1024).default(128 * 1024),
    /** longest a record waits for others to share its publish, ms */
    batchDelayMs: z.number().int().min(0).max(60_000).default(20),
    /** records per second at most, 0 = unlimited; spreads the drain after an outage */
    rate: z.number().int().min(0).default(2000),
  })
  .strict();

export type OutboxConfig = z.infer<typeof OutboxConfigSchema>;
export type UplinkConfig = z.infer<typeof UplinkConfigSchema>;
