/**
 * JSON structured logs, one object per line. Hand-written rather than pino: pino's
 * transports run in worker threads loaded from files, which do not exist inside a
 * single executable, and what we need (levels, child bindings, redaction) is small.
 */
export type LogLevel = 'debug' | 'info' | 'warn' | 'error' | 'silent';
const LEVELS: Record<LogLevel, number> = { debug: 20, info: 30, warn: 40, error: 50, silent: 100 };

/** Keys whose values are never written to a log, at any depth. */
const SECRET_KEY = /pass(word)?|secret|token|authorization|private|^key$|psk/i;

export interface Logger {
  debug(msg: string, fields?: Record<string, unknown>): void;
  info(msg: string, fields?: Record<string, unknown>): void;
  warn(msg: string, fields?: Record<string, unknown>): void;
  error(msg: string, fields?: Record<string, unknown>): void;
  child(bindings: Record<string, unknown>): Logger;
  readonly level: LogLevel;
}

export interface LoggerOptions {
  name: string;
  level?: LogLevel;
  /** Where lines go; default process.stderr so stdout stays free for command output. */
  write?: (line: string) => void;
}

export function redact(value: unknown, depth = 0): unknown {
  if (depth > 6 || value === null || typeof value !== 'object') return value;
  if (value instanceof Error) {
    const out: Record<string, unknown> = { message: value.message, name: value.name };
    const code = (value as { code?: unknown }).code;
    if (code !== undefined) out.code = code;
    return out;
  }
  if (Array.isArray(value)) return value.map((v) => redact(v, depth + 1));
  if (Buffer.isBuffer(value)) return `<${value.length} bytes>`;
  const out: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(value)) out[k] = SECRET_KEY.test(k) ? '[redacted]' : redact(v, depth + 1);
  return out;
}

export function createLogger(opts: LoggerOptions, bindings: Record<string, unknown> = {}): Logger {
  const level = opts.level ?? 'info';
  const min = LEVELS[level];
  const write = opts.write ?? ((line: string) => process.stderr.write(line));
  const emit = (lvl: Exclude<LogLevel, 'silent'>, msg: string, fields?: Record<string, unknown>) => {
    if (LEVELS[lvl] < min) return;
    const rec = { ts: new Date().toISOString(), level: lvl, name: opts.name, msg, ...(redact(bindings) as object), ...(fields ? (redact(fields) as object) : {}) };
    write(JSON.stringify(rec) + '\n');
  };
  return {
    level,
    debug: (m, f) => emit('debug', m, f),
    info: (m, f) => emit('info', m, f),
    warn: (m, f) => emit('warn', m, f),
    error: (m, f) => emit('error', m, f),
    child: (b) => createLogger(opts, { ...bindings, ...b }),
  };
}
