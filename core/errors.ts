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
  FLEET_MCU_REPLAY: 'an MCU message reused an old counter; dropped and counted',
  FLEET_MCU_DECODE: 'an MCU payload could not be decoded (SenML JSON); dropped and counted',
  FLEET_HTTP_NOT_FOUND: 'no such HTTP route or resource',
  FLEET_HTTP_METHOD: 'the HTTP method is not allowed on this route',
  FLEET_HTTP_BODY_TOO_LARGE: 'the HTTP request body is larger than the route allows',
  FLEET_HTTP_BAD_REQUEST: 'the HTTP request body is not valid JSON or not the expected shape',
  FLEET_HTTP_RATE_LIMITED: 'too many requests from this client; retry after the time given',
  FLEET_APP_NOT_FOUND: 'no supervised app with this name',
  FLEET_CHILD_FAILED: 'a child process of the demo or test harness exited before it was ready',
  FLEET_TIMEOUT: 'an operation did not finish within its time limit',
  FLEET_SELFTEST_FAILED: 'at least one selftest check failed',
  FLEET_SIGNATURE_INVALID: 'a signature did not verify against the given public key',
  FLEET_KEY_INVALID: 'a key file is not a valid Ed25519 key',
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
