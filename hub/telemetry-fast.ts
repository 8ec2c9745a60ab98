import { decodeMessage, type TelemetryBatch } from '../core/messages.ts';

/**
 * decodeMessage('telemetry', …) for the hub's per-reading path, without zod for the
 * common case. The hub decodes every telemetry message it routes (the registry keeps each
 * device's latest samples), and at thousands of MCU readings a second behind a gateway
 * zod's validation was a visible share of the hub's CPU. A plain check accepts only
 * messages that TelemetrySchema certainly accepts unchanged (no unknown keys, which zod
 * would strip; every field of the type and range the schema asks); anything else goes
 * through decodeMessage, which stays the authority for what is invalid and why.
 *
 * String lengths here are UTF-16 code units; zod (4.6) measures code points, which are never
 * more, so a string within the limit here is within it for zod too, and one over it here
 * (astral characters) goes to zod, which may still accept it. test/hub/telemetry-fast.test.ts
 * compares the two over 20,000 generated payloads.
 */
const MID_RE = /^[0-9]{1,20}$/;
const TOP_KEYS = new Set(['v', 'mid', 'ts', 'samples']);
const SAMPLE_KEYS = new Set(['n', 'v', 'vs', 'vb', 'u', 't']);

const isTs = (x: unknown): boolean => typeof x === 'number' && Number.isSafeInteger(x) && x >= 0;
const isObject = (x: unknown): x is Record<string, unknown> => typeof x === 'object' && x !== null && !Array.isArray(x) && Object.getPrototypeOf(x) === Object.prototype;

function plainValid(raw: unknown): raw is TelemetryBatch {
  if (!isObject(raw)) return false;
  for (const k in raw) if (!TOP_KEYS.has(k)) return false;
  if (raw.v !== 1 || typeof raw.mid !== 'string' || !MID_RE.test(raw.mid) || !isTs(raw.ts)) return false;
  const samples = raw.samples;
  if (!Array.isArray(samples) || samples.length > 10_000) return false;
  for (const s of samples) {
    if (!isObject(s)) return false;
    for (const k in s) if (!SAMPLE_KEYS.has(k)) return false;
    if (typeof s.n !== 'string' || s.n.length < 1 || s.n.length > 128 || !isTs(s.t)) return false;
    if (s.v !== undefined && !(typeof s.v === 'number' && Number.isFinite(s.v))) return false;
    if (s.vs !== undefined && !(typeof s.vs === 'string' && s.vs.length <= 1024)) return false;
    if (s.vb !== undefined && typeof s.vb !== 'boolean') return false;
    if (s.u !== undefined && !(typeof s.u === 'string' && s.u.length <= 16)) return false;
  }
  return true;
}

export function decodeTelemetryFast(payload: Buffer): TelemetryBatch {
  let raw: unknown;
  try {
    raw = JSON.parse(payload.toString('utf8'));
  } catch {
    return decodeMessage('telemetry', payload); // throws FLEET_MSG_INVALID with the reason
  }
  // what plainValid accepts is what zod returns, the same keys and values, as parsed: only
  // the order of an object's keys may differ (zod's follows its schema), which no reader of
  // a decoded message depends on; no copy of every sample
  return plainValid(raw) ? raw : decodeMessage('telemetry', payload);
}
