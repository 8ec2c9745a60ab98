import { z } from 'zod';
import { FleetError } from './errors.ts';
import { DEVICE_ID_RE } from './topics.ts';

/**
 * Fleet message shapes (docs/topics.md). Every message carries `v` (schema version).
 * Messages that go through the outbox carry `mid`, a per-device monotonic message id
 * the hub uses to drop duplicates of at-least-once delivery.
 */
const mid = z.string().regex(/^[0-9]{1,20}$/, 'mid must be a decimal sequence number');
const ts = z.number().int().nonnegative();

export const SampleSchema = z.object({
  /** metric name, e.g. "cpu.util" */
  n: z.string().min(1).max(128),
  /** numeric value */
  v: z.number().optional(),
  /** string value */
  vs: z.string().max(1024).optional(),
  /** boolean value */
  vb: z.boolean().optional(),
  /** unit (SenML unit names where one exists: "%", "Cel", "B", "s") */
  u: z.string().max(16).optional(),
  /** time of the sample, ms since the Unix epoch */
  t: ts,
});
export type Sample = z.infer<typeof SampleSchema>;

export const StateSchema = z.object({
  v: z.literal(1),
  online: z.boolean(),
  kind: z.enum(['agent', 'gateway', 'mcu']),
  ts,
  version: z.string().max(64).optional(),
  /** for MCUs: the gateway they are reached through */
  via: z.string().max(64).optional(),
  reason: z.string().max(256).optional(),
  /** for MCUs: from the version report after boot (docs/mcu-protocol.md "hello") */
  mcu: z
    .object({
      /** why it last booted: power_on, deep_sleep, ota, rollback, watchdog, panic, brownout, reset, other */
      boot: z.string().max(32).optional(),
      /** firmware version before that boot */
      prev: z.string().max(64).optional(),
      /** declared sleep period, s: silent this long (times the gateway's lost factor) is sleeping, not lost */
      sleepS: z.number().int().nonnegative().optional(),
      /** hardware class (board), matched against firmware targets.deviceClass */
      hw: z.string().max(64).optional(),
    })
    .optional(),
});
export type StateMessage = z.infer<typeof StateSchema>;

export const TelemetrySchema = z.object({ v: z.literal(1), mid, ts, samples: z.array(SampleSchema).max(10_000) });
export type TelemetryBatch = z.infer<typeof TelemetrySchema>;

export const EventSchema = z.object({
  v: z.literal(1),
  mid,
  ts,
  type: z.string().min(1).max(64),
  severity: z.enum(['info', 'warning', 'alert']),
  data: z.record(z.string(), z.unknown()).optional(),
});
export type EventMessage = z.infer<typeof EventSchema>;

export const LogBatchSchema = z.object({
  v: z.literal(1),
  mid,
  ts,
  lines: z.array(z.object({ t: ts, app: z.string().max(64), stream: z.enum(['stdout', 'stderr']), line: z.string().max(8192) })).max(10_000),
});
export type LogBatch = z.infer<typeof LogBatchSchema>;

export const CommandSchema = z.object({
  v: z.literal(1),
  id: z.string().min(1).max(64),
  name: z.string().min(1).max(64),
  args: z.record(z.string(), z.unknown()).default({}),
  /** ms since epoch after which the device must not run the command */
  expiresAt: ts,
});
export type Command = z.infer<typeof CommandSchema>;

export const ReplySchema = z.object({
  v: z.literal(1),
  mid,
  id: z.string().min(1).max(64),
  ok: z.boolean(),
  result: z.unknown().optional(),
  error: z.object({ code: z.string(), message: z.string() }).optional(),
});
export type CommandReply = z.infer<typeof ReplySchema>;

export const DesiredAppSchema = z.object({
  version: z.string().min(1).max(64),
  bundle: z.string().max(256).optional(),
  /** where the signed bundle is fetched (the hub's artifact store, /api/v1/artifacts/<sha256>) */
  url: z.string().max(2048).optional(),
  /** sha256 of the whole bundle file, checked before the signature */
  sha256: z.string().regex(/^[0-9a-f]{64}$/).optional(),
  /** bundle size in bytes, for the free-space check before download */
  size: z.number().int().nonnegative().optional(),
});
/** A signed bundle the device should run: the agent itself (kind agent) or MCU firmware (kind firmware). */
export const DesiredArtifactSchema = z.object({
  version: z.string().min(1).max(64),
  url: z.string().max(2048),
  sha256: z.string().regex(/^[0-9a-f]{64}$/),
  size: z.number().int().nonnegative().optional(),
});
export type DesiredArtifact = z.infer<typeof DesiredArtifactSchema>;
export const DesiredSchema = z.object({
  v: z.literal(1),
  /** revision, increasing; the agent ignores a revision older than the one it has */
  rev: z.number().int().nonnegative(),
  ts,
  apps: z.record(z.string().regex(/^[a-z0-9][a-z0-9-]{0,31}$/), DesiredAppSchema),
  /** agent self-update (agents only) */
  agent: DesiredArtifactSchema.optional(),
  /** MCU firmware (MCU ids; the MCU's gateway acts on it) */
  firmware: DesiredArtifactSchema.optional(),
  /**
   * trust root rotation: root.json documents, oldest first; the device applies in order each one
   * whose version is above its own, each signed by the threshold of the root before it
   * (docs/bundle-format.md#trust-root)
   */
  trustRoots: z.array(z.string().max(256 * 1024)).max(16).optional(),
});
export type DesiredState = z.infer<typeof DesiredSchema>;

export const RegisterSchema = z.object({ v: z.literal(1), ts, mcus: z.array(z.string()).max(100_000) });
export type GatewayRegistration = z.infer<typeof RegisterSchema>;

/**
 * The MCUs revoked at the hub (docs/mcu-protocol.md "Revoking one MCU"): retained on
 * MCU_REVOCATIONS_TOPIC, the whole list each time, for every gateway.
 */
export const MCU_REVOCATIONS_MAX = 20_000;
export const McuRevocationsSchema = z.object({
  v: z.literal(1),
  /** grows with every change within a hub's run: a gateway ignores, on one connection, a list older than the one it has (a retained copy read before the change may arrive after the change itself) */
  rev: z.number().int().nonnegative(),
  ts,
  ids: z.array(z.string().regex(DEVICE_ID_RE)).max(MCU_REVOCATIONS_MAX),
});
export type McuRevocationList = z.infer<typeof McuRevocationsSchema>;

export const SCHEMAS = {
  state: StateSchema,
  telemetry: TelemetrySchema,
  events: EventSchema,
  logs: LogBatchSchema,
  reply: ReplySchema,
  register: RegisterSchema,
  cmd: CommandSchema,
  desired: DesiredSchema,
  'mcu-revocations': McuRevocationsSchema,
} as const;

export type MessageOf<C extends keyof typeof SCHEMAS> = z.infer<(typeof SCHEMAS)[C]>;

/** Decode and validate one message; throws FLEET_MSG_INVALID naming the bad field. */
export function decodeMessage<C extends keyof typeof SCHEMAS>(channel: C, payload: Buffer | string): MessageOf<C> {
  let raw: unknown;
  try {
    raw = JSON.parse(typeof payload === 'string' ? payload : payload.toString('utf8'));
  } catch (err) {
    throw new FleetError('FLEET_MSG_INVALID', `${channel}: payload is not JSON`, { cause: err });
  }
  const res = SCHEMAS[channel].safeParse(raw);
  if (!res.success) {
    const issue = res.error.issues[0];
    const path = issue && issue.path.length ? issue.path.join('.') : '(root)';
    throw new FleetError('FLEET_MSG_INVALID', `${channel}: ${path}: ${issue?.message ?? 'invalid'}`);
  }
  return res.data as MessageOf<C>;
}

/**
 * Encode a message as JSON with `v` and `mid` as its first keys: the hub reads `mid` for
 * de-duplication without parsing the whole message (core/batch.ts peekMid).
 */
/**
 * encodeMessage of a TelemetryBatch, byte for byte, without its copies (the gateway makes one
 * per MCU reading: thousands a second).
 */
export function encodeTelemetry(mid: string, ts: number, samples: TelemetrySamples): Buffer {
  return Buffer.from(telemetryJson(mid, ts, samples));
}

/**
 * Samples already in JSON: `json` is exactly what JSON.stringify writes for the array of
 * `count` samples (firmware-bridge/senml-transcode.ts makes it from SenML JSON without
 * building the samples as objects).
 */
export interface SamplesJson {
  readonly json: string;
  readonly count: number;
}
export type TelemetrySamples = readonly Sample[] | SamplesJson;

export function sampleCount(samples: TelemetrySamples): number {
  return 'json' in samples ? samples.count : samples.length;
}

/** encodeTelemetry's JSON as a string (for a writer that puts it straight into a larger buffer). */
export function telemetryJson(mid: string, ts: number, samples: TelemetrySamples): string {
  // the same bytes as JSON.stringify of the whole batch (a number prints as String() prints it)
  if ('json' in samples) return `{"v":1,"mid":${JSON.stringify(mid)},"ts":${ts},"samples":${samples.json}}`;
  return JSON.stringify({ v: 1, mid, ts, samples });
}

export function encodeMessage<M extends { v: number; mid?: string }>(msg: M): Buffer {
  // insertion order decides key order: v and mid first, the rest as given
  const { v, mid, ...rest } = msg;
  return Buffer.from(JSON.stringify(mid === undefined ? { v, ...rest } : { v, mid, ...rest }));
}
