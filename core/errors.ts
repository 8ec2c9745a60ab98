/**
 * Stable error codes. Every error the system reports carries one of these codes;
 * callers branch on `code`, never on message text. docs/errors.md lists them and
 * test/core/errors.test.ts checks that the list and the docs agree.
 */
export const ERROR_CODES = {
  FLEET_USAGE: 'bad command line: unknown command, unknown flag or bad flag value (exit code 2)',
  FLEET_CONFIG_UNREADABLE: 'the config file could not be read or parsed (YAML/JSON syntax)',
  FLEET_CONFIG_INVALID: 'the config has a key with a bad value or an unknown key; the message names the key and the file',
  FLEET_PORT_IN_USE: 'a listener could not bind its port',
  FLEET_NATIVE_LOAD: 'the native LevelDB addon could not be extracted or loaded',
  FLEET_STORE: 'the on-disk store could not be opened or written',
  FLEET_AUTH_FAILED: 'credentials were missing or wrong',
  FLEET_FORBIDDEN: 'the credentials are valid but do not allow this action (ACL, role)',
  FLEET_MSG_INVALID: 'a message did not match its schema; it was dropped and counted',
  FLEET_TOPIC_INVALID: 'a topic is outside the fleet topic layout',
  FLEET_DEVICE_ID_INVALID: 'a device id does not match [A-Za-z0-9][A-Za-z0-9._-]{0,63}',
  FLEET_OUTBOX_FULL: 'the outbox byte budget is reached and nothing of lower priority is left to evict',
  FLEET_MCU_AUTH: 'an MCU message failed its MAC check; dropped and counted',
  FLEET_MCU_REVOKED: 'the MCU is on the gateway\'s revoked list (mcu.revokedFile): MQTT CONNACK 5, CoAP 4.03; its connection is cut when it is added',
  FLEET_DEVICE_REVOKED: 'the agent or gateway is revoked at the hub (PUT /api/v1/device-revocations/{id}): MQTT CONNACK 5, its session closed, its token refused for artifacts',
  FLEET_MCU_REPLAY: 'an MCU message reused an old counter; dropped and counted',
  FLEET_MCU_DECODE: 'an MCU payload could not be decoded (SenML JSON or CBOR, compact form, hello, ack); dropped and counted',
  FLEET_HTTP_NOT_FOUND: 'no such HTTP route or resource',
  FLEET_HTTP_METHOD: 'the HTTP method is not allowed on this route',
  FLEET_HTTP_BODY_TOO_LARGE: 'the HTTP request body is larger than the route allows',
  FLEET_HTTP_BAD_REQUEST: 'the HTTP request body is not valid JSON or not the expected shape',
  FLEET_HTTP_RATE_LIMITED: 'too many requests from this client; retry after the time given',
  FLEET_APP_NOT_FOUND: 'no supervised app with this name',
  FLEET_APP_USER: 'an app or job names a user that does not exist, or the agent may not switch to it (not root)',
  FLEET_JOB_NOT_FOUND: 'no scheduled job with this name',
  FLEET_CHILD_FAILED: 'a child process of the demo or test harness exited before it was ready',
  FLEET_TIMEOUT: 'an operation did not finish within its time limit',
  FLEET_SELFTEST_FAILED: 'at least one selftest check failed',
  FLEET_SIGNATURE_INVALID: 'a signature did not verify against the given public key',
  FLEET_KEY_INVALID: 'a key file is not a valid Ed25519 key',
  // bundles (docs/bundle-format.md): one code per refusal
  FLEET_BUNDLE_FORMAT: 'not a bundle, or its header or signatures block is malformed, or bytes follow the last file',
  FLEET_BUNDLE_TRUNCATED: 'the bundle file is shorter than its header and manifest say',
  FLEET_BUNDLE_MANIFEST_TOO_LARGE: 'the bundle header declares a manifest larger than the limit (1 MiB); refused before reading it',
  FLEET_BUNDLE_MANIFEST_INVALID: 'the bundle manifest is not canonical JSON or does not match the manifest schema',
  FLEET_BUNDLE_BAD_SIGNATURE: 'a signature by a trusted key does not verify over the manifest bytes (tampered manifest or signature)',
  FLEET_BUNDLE_UNKNOWN_KEY: 'no signature on the bundle is by a key of the trust root',
  FLEET_BUNDLE_THRESHOLD: 'fewer valid signatures by distinct trust-root keys than the root threshold',
  FLEET_BUNDLE_EXPIRED: 'the bundle manifest has expired',
  FLEET_BUNDLE_ROLLBACK: 'the bundle sequence is below the device floor for this bundle name (anti-rollback)',
  FLEET_BUNDLE_TARGET: 'the bundle targets another architecture, device class, or a newer agent',
  FLEET_BUNDLE_KIND: 'the bundle is of another kind than the caller expects (app, agent, firmware, config)',
  FLEET_BUNDLE_HASH: 'a file in the bundle payload does not match its sha256 in the manifest',
  FLEET_BUNDLE_PATH: 'a bundle file path is not a normalized relative path (.., absolute, empty part) or is a link or special entry',
  FLEET_BUNDLE_DUPLICATE_PATH: 'two bundle entries have the same path, or one path is both a file and a directory',
  FLEET_BUNDLE_CHANGED: 'the bundle file changed between verify and extract',
  FLEET_BUNDLE_STAGING: 'the staging directory for extraction already exists or could not be written',
  FLEET_BUNDLE_ROOT_INVALID: 'a trust root (root.json) is malformed',
  FLEET_BUNDLE_ROOT_THRESHOLD: 'a trust root is not signed by the threshold of the previous root and of its own keys',
  FLEET_BUNDLE_ROOT_VERSION: 'a new trust root does not have version current + 1',
  FLEET_BUNDLE_ROOT_EXPIRED: 'the trust root has expired (bundles are refused until a newer root is installed)',
  // agent local API (docs/api.md#agent-local-api)
  FLEET_HTTP_TOO_MANY_STREAMS: 'the agent API already serves its maximum of server-sent-event streams (log followers), or is stopping; HTTP 503, retry after the time given',
  // updater and artifact store (docs/ota.md)
  FLEET_UPDATE_DOWNLOAD: 'a bundle download failed after every resumed attempt (network, server error, short read)',
  FLEET_UPDATE_HTTP_REFUSED: 'the artifact server refused the bundle download (HTTP 4xx: auth, not found); not retried',
  FLEET_UPDATE_HASH_MISMATCH: 'the bundle file does not have the sha256 the desired state or upload named',
  FLEET_UPDATE_TOO_LARGE: 'the bundle to download is larger than update.maxBundleBytes',
  FLEET_UPDATE_NO_SPACE: 'not enough free disk space for the bundle plus the reserve; checked before downloading',
  FLEET_UPDATE_UNSUPPORTED: 'the bundle does not fit this update: another kind or name than asked, no app section, already current',
  FLEET_UPDATE_PROBATION: 'the new release failed probation (exited, crash loop, unhealthy, check command failed, agent not connected); rolled back',
  FLEET_UPDATE_LOOP: 'the update was resumed more than update.maxResumes times (loop guard); abandoned or rolled back',
  FLEET_UPDATE_BOOT: 'a new agent binary did not become healthy within update.agentMaxStarts starts or update.agentHealthyWithinS; the previous binary was restored',
  FLEET_UPDATE_STATE: 'the persisted update state is unreadable or inconsistent',
  // agent install and status (docs/agent.md#install)
  FLEET_INSTALL: '`fleetlet agent install` could not write a file or directory (permissions, read-only file system)',
  FLEET_AGENT_UNREACHABLE: '`fleetlet agent status` could not reach the agent API (agent not running, other address or port, or it did not answer in time)',
  // gateway and MCU contract (docs/mcu-protocol.md)
  FLEET_MCU_MAILBOX_FULL: 'the gateway mailbox of this MCU holds mcu.mailboxMax commands already, or the command is larger than 1 KiB; answered to the hub at once',
  FLEET_MCU_NO_FIRMWARE: 'no firmware image is offered to this MCU (or not the one it asked for with h=)',
  FLEET_MCU_ADDRESS: 'firmware over CoAP is served only to the address the MCU\'s latest accepted counter-consuming request (a reading, hello, ack, log or GET cmd) came from; send one from this address first (after a gateway restart, after the MCU was forgotten (mcu.forgetAfterDays), or when the MCU\'s address changed)',
  FLEET_MCU_IN_FLIGHT: 'a CoAP message whose counter belongs to a message still being stored (a replayed copy, or the MCU\'s own resend): 5.03 with Max-Age 1; send it again after that: it is then stored, or answered 4.01 FLEET_MCU_REPLAY when the first copy was stored',
  FLEET_MCU_RATE: 'an MCU sends faster than mcu.msgRate allows: CoAP gets 5.03 with Max-Age (send the same message again after it), MQTT its PUBACK later; nothing is dropped',
  FLEET_MCU_UPLOAD: 'an MCU Block1 upload is out of order, too large, timed out, or the gateway has too many in progress',
  FLEET_MCU_FIRMWARE: 'the gateway could not fetch, check or verify the MCU firmware bundle the desired state names',
  FLEET_MCU_COMMAND: 'the MCU refused or failed a command: its ack said `ok:false` without a `code` of its own (the message is the MCU\'s `e`); an MCU\'s own `code` is passed on to the hub as it is, so a command reply\'s `error.code` is not always a FLEET_ code',
  // hub routing (docs/topics.md#records)
  FLEET_ROUTE_FAILED: 'a publish repeats a message whose first copy the hub was still routing, and that routing failed (the hub is closing, or a durable queue write failed); no PUBACK, so the sender resends it, and that resend passes',
  // hub command delivery (docs/topics.md#command-delivery)
  FLEET_COMMAND_QUEUE_FULL: 'the hub already holds the most commands awaiting a reply for this device (100) or in all (100,000); HTTP 429, retry once some are replied or expired',
  FLEET_COMMAND_INTERRUPTED: 'the agent restarted while it was running this command; it is not run again (it may or may not have taken effect)',
  FLEET_INTERNAL: 'an unexpected internal error; the message has details',
} as const;

export type ErrorCode = keyof typeof ERROR_CODES;

export class FleetError extends Error {
  readonly code: ErrorCode;
  readonly details: Record<string, unknown> | undefined;
  constructor(code: ErrorCode, message: string, options?: { cause?: unknown; details?: Record<string, unknown> }) {
    super(message, options?.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'FleetError';
    this.code = code;
    this.details = options?.details;
  }
  toJSON(): { code: ErrorCode; message: string; details?: Record<string, unknown> } {
    return this.details ? { code: this.code, message: this.message, details: this.details } : { code: this.code, message: this.message };
  }
}

export function isFleetError(err: unknown, code?: ErrorCode): err is FleetError {
  return err instanceof FleetError && (code === undefined || err.code === code);
}

/** Normalise anything thrown into a FleetError without losing the original. */
export function toFleetError(err: unknown): FleetError {
  if (err instanceof FleetError) return err;
  const message = err instanceof Error ? err.message : String(err);
  return new FleetError('FLEET_INTERNAL', message, { cause: err });
}
