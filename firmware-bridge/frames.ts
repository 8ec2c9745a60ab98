import { FleetError } from '../core/errors.ts';
import { parseCounter, signMcuMessage, verifyMcuMac, type MacResource } from './auth.ts';
import { checkSensorTable, type SensorTable } from './codecs.ts';

/**
 * The small framed messages of the MCU contract (docs/mcu-protocol.md): the MAC line
 * in front of MQTT payloads and of commands, the version report (`hello`), command
 * acks, and the firmware chunk request/response of the MQTT chunk topics. Decoders
 * read network bytes: bounded, and they throw only FleetError.
 */

// ---------------------------------------------------------------------------------
// MAC line: "c={counter}&m={mac}\n{payload}"

const MAC_LINE_MAX = 64;

export interface MacFramed {
  counter: string;
  mac: string;
  payload: Buffer;
}

const MAC_LINE_RE = /^c=([0-9]{1,16})&m=([A-Za-z0-9_-]{21}[AQgw])$/;
/** what looks like a MAC line (taken as one, and then refused when it is not a valid one) */
const MAC_LINE_SHAPE = /^c=[0-9]{1,20}&m=[A-Za-z0-9_-]{22}$/;

/**
 * Does a payload start with a MAC line, `c={counter}&m={mac}` and a newline? The whole line
 * is matched, not its first bytes: a log line may well start with `c=` (`c=3 wifi
 * reconnect`), and was taken for a bad MAC, dropped and counted as an auth failure.
 */
export function hasMacLine(payload: Uint8Array): boolean {
  if (payload.length < 2 || payload[0] !== 0x63 || payload[1] !== 0x3d) return false;
  const nl = payload.indexOf(0x0a);
  return nl > 0 && nl <= MAC_LINE_MAX && MAC_LINE_SHAPE.test(Buffer.from(payload.buffer, payload.byteOffset, nl).toString('latin1'));
}

/** Split "c=..&m=..\n" off a payload; FLEET_MCU_AUTH when the line is malformed. */
export function splitMacLine(payload: Buffer): MacFramed {
  const nl = payload.indexOf(0x0a);
  if (nl < 0 || nl > MAC_LINE_MAX) throw new FleetError('FLEET_MCU_AUTH', 'MAC line missing or too long');
  const line = payload.toString('latin1', 0, nl);
  const m = MAC_LINE_RE.exec(line);
  if (!m) throw new FleetError('FLEET_MCU_AUTH', 'MAC line is not c={counter}&m={mac}');
  return { counter: m[1]!, mac: m[2]!, payload: payload.subarray(nl + 1) };
}

/** Frame a payload with its MAC line (MQTT up messages with a MAC; commands down). */
export function frameWithMac(key: string, mcuId: string, resource: MacResource, counter: number, payload: Uint8Array): Buffer {
  const mac = signMcuMessage(key, mcuId, resource, counter, payload);
  return Buffer.concat([Buffer.from(`c=${counter}&m=${mac}\n`, 'latin1'), payload]);
}

// ---------------------------------------------------------------------------------
// Commands, gateway → MCU

/** A command as the MCU sees it (short keys: parsed on a small MCU). */
export interface McuCommand {
  id: string;
  /** name */
  n: string;
  /** arguments */
  a: Record<string, unknown>;
  /** expiry, Unix seconds */
  x: number;
}

/** Largest encoded command the mailbox takes (docs/mcu-protocol.md). */
export const MAX_COMMAND_BYTES = 1024;

export function encodeMcuCommand(key: string, mcuId: string, seq: number, cmd: McuCommand): Buffer {
  const body = Buffer.from(JSON.stringify({ id: cmd.id, n: cmd.n, a: cmd.a, x: cmd.x }));
  return frameWithMac(key, mcuId, 'cmd', seq, body);
}

/** What an MCU does with a command frame (the simulator and tests): verify, parse. */
export function decodeMcuCommand(key: string, mcuId: string, frame: Buffer): { seq: number; cmd: McuCommand } {
  const f = splitMacLine(frame);
  const seq = parseCounter(f.counter);
  verifyMcuMac(key, mcuId, 'cmd', seq, f.payload, f.mac);
  let raw: unknown;
  try {
    raw = JSON.parse(f.payload.toString('utf8'));
  } catch {
    throw new FleetError('FLEET_MCU_DECODE', 'command is not JSON');
  }
  if (!isObject(raw) || typeof raw.id !== 'string' || typeof raw.n !== 'string' || !isObject(raw.a) || typeof raw.x !== 'number') throw new FleetError('FLEET_MCU_DECODE', 'command is not {id, n, a, x}');
  return { seq, cmd: { id: raw.id, n: raw.n, a: raw.a, x: raw.x } };
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function parseJsonObject(payload: Uint8Array, max: number, what: string): Record<string, unknown> {
  if (payload.byteLength > max) throw new FleetError('FLEET_MCU_DECODE', `${what} of ${payload.byteLength} bytes exceeds ${max}`);
  let raw: unknown;
  try {
    raw = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(payload));
  } catch {
    throw new FleetError('FLEET_MCU_DECODE', `${what} is not UTF-8 JSON`);
  }
  if (!isObject(raw)) throw new FleetError('FLEET_MCU_DECODE', `${what} must be a JSON object`);
  return raw;
}

// ---------------------------------------------------------------------------------
// Command ack, MCU → gateway

export interface McuAck {
  id: string;
  ok: boolean;
  /** result when ok */
  r?: unknown;
  /** error message when not ok */
  e?: string;
  /** error code when not ok */
  code?: string;
}

export const MAX_ACK_BYTES = 1024;

export function decodeMcuAck(payload: Uint8Array): McuAck {
  const raw = parseJsonObject(payload, MAX_ACK_BYTES, 'ack');
  if (typeof raw.id !== 'string' || raw.id.length === 0 || raw.id.length > 64) throw new FleetError('FLEET_MCU_DECODE', 'ack: id must be a string of 1 to 64 characters');
  if (typeof raw.ok !== 'boolean') throw new FleetError('FLEET_MCU_DECODE', 'ack: ok must be a boolean');
  const ack: McuAck = { id: raw.id, ok: raw.ok };
  if (raw.r !== undefined) ack.r = raw.r;
  if (raw.e !== undefined) {
    if (typeof raw.e !== 'string' || raw.e.length > 256) throw new FleetError('FLEET_MCU_DECODE', 'ack: e must be a string of at most 256 characters');
    ack.e = raw.e;
  }
  if (raw.code !== undefined) {
    if (typeof raw.code !== 'string' || raw.code.length > 64) throw new FleetError('FLEET_MCU_DECODE', 'ack: code must be a string of at most 64 characters');
    ack.code = raw.code;
  }
  return ack;
}

// ---------------------------------------------------------------------------------
// Version report after boot, MCU → gateway

export const BOOT_REASONS = ['power_on', 'deep_sleep', 'ota', 'rollback', 'watchdog', 'panic', 'brownout', 'reset', 'other'] as const;
export type BootReason = (typeof BOOT_REASONS)[number];

export interface McuHello {
  fw: string;
  boot: BootReason;
  prev?: string;
  err?: string;
  /** declared sleep period, seconds; 0 = always awake */
  sleep?: number;
  sensors?: SensorTable;
  /** hardware class (board or module), matched against a firmware bundle's targets.deviceClass */
  hw?: string;
}

export const MAX_HELLO_BYTES = 4096;
/** a hardware class: what a bundle's targets.deviceClass lists */
export const HW_CLASS_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;
const VERSION_RE = /^[\x21-\x7e]{1,64}$/;
const BOOT: ReadonlySet<string> = new Set(BOOT_REASONS);

export function decodeMcuHello(payload: Uint8Array): McuHello {
  const raw = parseJsonObject(payload, MAX_HELLO_BYTES, 'hello');
  const bad = (m: string): never => {
    throw new FleetError('FLEET_MCU_DECODE', `hello: ${m}`);
  };
  if (typeof raw.fw !== 'string' || !VERSION_RE.test(raw.fw)) bad('fw must be 1 to 64 printable ASCII characters');
  if (typeof raw.boot !== 'string' || !BOOT.has(raw.boot)) bad(`boot must be one of ${BOOT_REASONS.join(', ')}`);
  const hello: McuHello = { fw: raw.fw as string, boot: raw.boot as BootReason };
  if (raw.prev !== undefined) {
    if (typeof raw.prev !== 'string' || !VERSION_RE.test(raw.prev)) bad('prev must be 1 to 64 printable ASCII characters');
    hello.prev = raw.prev as string;
  }
  if (raw.err !== undefined) {
    if (typeof raw.err !== 'string' || raw.err.length > 128) bad('err must be a string of at most 128 characters');
    hello.err = raw.err as string;
  }
  if (raw.sleep !== undefined) {
    if (typeof raw.sleep !== 'number' || !Number.isInteger(raw.sleep) || raw.sleep < 0 || raw.sleep > 604_800) bad('sleep must be whole seconds from 0 to 604800');
    hello.sleep = raw.sleep as number;
  }
  // [] is "no table" (firmware without compact sensors that still sends the key): its whole
  // report (fw, boot, sleep) used to be refused for it
  if (raw.sensors !== undefined && !(Array.isArray(raw.sensors) && raw.sensors.length === 0)) hello.sensors = checkSensorTable(raw.sensors);
  if (raw.hw !== undefined) {
    if (typeof raw.hw !== 'string' || !HW_CLASS_RE.test(raw.hw)) bad('hw must be 1 to 64 characters: letters, digits, . _ - (not first)');
    hello.hw = raw.hw as string;
  }
  return hello;
}

// ---------------------------------------------------------------------------------
// Firmware chunks over MQTT: request on fwreq, response on fw

export const FW_CHUNK_MIN = 16;
export const FW_CHUNK_MAX = 4096;
export const FW_CHUNK_HEADER = 16;

export interface FwChunkRequest {
  /** chunk number */
  n: number;
  /** chunk size, bytes */
  s: number;
}

export function decodeFwChunkRequest(payload: Uint8Array): FwChunkRequest {
  const raw = parseJsonObject(payload, 128, 'fwreq');
  const n = raw.n;
  const s = raw.s;
  if (typeof n !== 'number' || !Number.isInteger(n) || n < 0 || n > 0xffffffff) throw new FleetError('FLEET_MCU_DECODE', 'fwreq: n must be a chunk number');
  if (typeof s !== 'number' || !Number.isInteger(s) || s < FW_CHUNK_MIN || s > FW_CHUNK_MAX) throw new FleetError('FLEET_MCU_DECODE', `fwreq: s must be a chunk size from ${FW_CHUNK_MIN} to ${FW_CHUNK_MAX}`);
  return { n, s };
}

/** Build the response to chunk `n` of size `s` of `image` (null: no image offered). */
export function encodeFwChunk(image: { data: Buffer; sha256: Buffer } | null, req: FwChunkRequest): Buffer {
  const head = Buffer.alloc(FW_CHUNK_HEADER);
  head.writeUInt32BE(req.n, 0);
  if (!image) return head;
  head.writeUInt32BE(image.data.length, 4);
  image.sha256.copy(head, 8, 0, 8);
  const start = req.n * req.s;
  const data = start >= image.data.length ? Buffer.alloc(0) : image.data.subarray(start, Math.min(image.data.length, start + req.s));
  return Buffer.concat([head, data]);
}

export interface FwChunk {
  n: number;
  /** image size; 0 = no image offered */
  size: number;
  /** first 8 bytes of the image sha256, hex */
  shaPrefix: string;
  data: Buffer;
}

export function decodeFwChunk(payload: Buffer): FwChunk {
  if (payload.length < FW_CHUNK_HEADER) throw new FleetError('FLEET_MCU_DECODE', 'fw chunk shorter than its header');
  return { n: payload.readUInt32BE(0), size: payload.readUInt32BE(4), shaPrefix: payload.toString('hex', 8, 16), data: payload.subarray(FW_CHUNK_HEADER) };
}
