import { z } from 'zod';
import { FleetError } from '../core/errors.ts';

/**
 * The bundle container (docs/bundle-format.md is the normative text):
 *
 *   offset 0          8 bytes  magic "FLTBNDL1"
 *   offset 8          u64 BE   P, payload length
 *   offset 16         P bytes  payload: the bytes of every manifest file, concatenated in manifest order
 *   16 + P            u32 BE   M, manifest length (2 ≤ M ≤ MAX_MANIFEST_BYTES)
 *   16 + P + 4        u32 BE   S, signatures block length (2 ≤ S ≤ MAX_SIGNATURES_BYTES)
 *   16 + P + 8        M bytes  manifest: canonical JSON (below), the bytes the signatures cover
 *   16 + P + 8 + M    S bytes  signatures block: canonical JSON [{"keyid","sig"}]
 *   EOF exactly at 16 + P + 8 + M + S
 *
 * The manifest carries payload.sha256 = sha256 of bytes [0, 16 + P) (prefix and payload). So
 * one SHA-256 pass from the start of the file gives both that signed digest (a copy of the hash
 * state at 16 + P) and, continued over the tail, the whole-file sha256 that names the bundle.
 */
export const MAGIC = Buffer.from('FLTBNDL1', 'latin1');
export const PREFIX_BYTES = 16;
export const TAIL_HEADER_BYTES = 8;
/** A manifest larger than this is refused from its length field alone (FLEET_BUNDLE_MANIFEST_TOO_LARGE). */
export const MAX_MANIFEST_BYTES = 1024 * 1024;
export const MAX_SIGNATURES_BYTES = 64 * 1024;
export const MAX_FILES = 100_000;
export const MAX_PATH_BYTES = 1024;
export const MAX_SEGMENT_BYTES = 255;
export const FORMAT_VERSION = 1;

export const BUNDLE_KINDS = ['app', 'agent', 'firmware', 'config'] as const;
export type BundleKind = (typeof BUNDLE_KINDS)[number];

const hex64 = z.string().regex(/^[0-9a-f]{64}$/);
const isoTime = z.string().regex(/^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,3})?Z$/).refine((s) => Number.isFinite(Date.parse(s)), 'not a valid UTC time');
const name = z.string().regex(/^[a-z0-9][a-z0-9._-]{0,63}$/);
const version = z.string().regex(/^[0-9A-Za-z][0-9A-Za-z.+_-]{0,63}$/);

/**
 * One payload entry. Only regular files exist in a bundle: directories are implied by paths and
 * created 0755 at extraction; links and special files cannot be expressed (`type` other than
 * "file" is refused with FLEET_BUNDLE_PATH, see checkFiles).
 */
export const BundleFileSchema = z
  .object({
    path: z.string().min(1).max(MAX_PATH_BYTES),
    size: z.number().int().nonnegative().max(Number.MAX_SAFE_INTEGER),
    sha256: hex64,
    /** permission bits only (0..0o777); no setuid, setgid or sticky */
    mode: z.number().int().min(0).max(0o777),
    /** optional; if present it must be "file" */
    type: z.string().max(32).optional(),
  })
  .strict();
export type BundleFile = z.infer<typeof BundleFileSchema>;

const HealthSchema = z
  .object({
    http: z.string().max(2048).optional(),
    tcp: z.number().int().min(1).max(65535).optional(),
    exec: z.array(z.string().max(4096)).min(1).max(64).optional(),
    intervalMs: z.number().int().positive().optional(),
    timeoutMs: z.number().int().positive().optional(),
    retries: z.number().int().nonnegative().optional(),
    startPeriodMs: z.number().int().nonnegative().optional(),
  })
  .strict();

export const AppSectionSchema = z
  .object({
    /** relative to the install directory; must be one of the bundle's files */
    command: z.string().min(1).max(MAX_PATH_BYTES),
    args: z.array(z.string().max(4096)).max(256).default([]),
    env: z.record(z.string().regex(/^[A-Za-z_][A-Za-z0-9_]{0,127}$/), z.string().max(8192)).default({}),
    health: HealthSchema.optional(),
  })
  .strict();

export const TargetsSchema = z
  .object({
    /** Node's process.arch names (x64, arm64, arm, ...); empty = any */
    arch: z.array(z.string().min(1).max(32)).max(32).default([]),
    /** device classes this bundle is for; empty = any */
    deviceClass: z.array(z.string().min(1).max(64)).max(256).default([]),
    /** the agent must be at least this version (major.minor.patch) */
    minAgentVersion: z.string().regex(/^\d+\.\d+\.\d+([-+].*)?$/).max(64).optional(),
  })
  .strict();

export const ManifestSchema = z
  .object({
    format: z.literal(FORMAT_VERSION),
    name,
    kind: z.enum(BUNDLE_KINDS),
    version,
    /** monotonic per name; the device refuses a sequence below its floor */
    sequence: z.number().int().nonnegative().max(Number.MAX_SAFE_INTEGER),
    created: isoTime,
    expires: isoTime,
    targets: TargetsSchema,
    files: z.array(BundleFileSchema).max(MAX_FILES),
    /** size = Σ files[].size; sha256 = sha256 of the file's bytes [0, 16 + size) (prefix + payload) */
    payload: z.object({ size: z.number().int().nonnegative().max(Number.MAX_SAFE_INTEGER), sha256: hex64 }).strict(),
    app: AppSectionSchema.optional(),
    /** free-form labels (changelog id, git commit); not interpreted */
    labels: z.record(z.string().max(64), z.string().max(1024)).optional(),
  })
  .strict();

export type BundleManifest = z.infer<typeof ManifestSchema>;
/** What a caller gives to build a manifest (format, files and payload are filled in by buildBundle). */
export type ManifestInput = Omit<z.input<typeof ManifestSchema>, 'format' | 'files' | 'payload'>;

export interface SignatureEntry {
  /** sha256 of the raw 32-byte Ed25519 public key, hex */
  keyid: string;
  /** 64-byte Ed25519 signature, hex */
  sig: string;
}
const SignaturesSchema = z.array(z.object({ keyid: hex64, sig: z.string().regex(/^[0-9a-f]{128}$/) }).strict()).min(0).max(64);

/**
 * Canonical JSON: object keys sorted by UTF-16 code unit order (JS default sort), no
 * whitespace, JSON.stringify escaping for strings, integers only for numbers. The manifest must
 * be exactly its own canonical encoding, so one manifest has one byte form (no duplicate keys,
 * no alternative spellings that another parser might read differently).
 */
export function canonicalJson(value: unknown): string {
  if (value === null || typeof value === 'boolean' || typeof value === 'string') return JSON.stringify(value);
  if (typeof value === 'number') {
    if (!Number.isSafeInteger(value)) throw new FleetError('FLEET_BUNDLE_MANIFEST_INVALID', `canonical JSON allows safe integers only, got ${value}`);
    return JSON.stringify(value);
  }
  if (Array.isArray(value)) return `[${value.map(canonicalJson).join(',')}]`;
  if (typeof value === 'object') {
    const entries = Object.entries(value as Record<string, unknown>).filter(([, v]) => v !== undefined);
    entries.sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
    return `{${entries.map(([k, v]) => `${JSON.stringify(k)}:${canonicalJson(v)}`).join(',')}}`;
  }
  throw new FleetError('FLEET_BUNDLE_MANIFEST_INVALID', `canonical JSON cannot encode ${typeof value}`);
}

export function encodePrefix(payloadLength: number): Buffer {
  const h = Buffer.alloc(PREFIX_BYTES);
  MAGIC.copy(h, 0);
  h.writeBigUInt64BE(BigInt(payloadLength), 8);
  return h;
}

export function encodeSignatures(signatures: readonly SignatureEntry[]): Buffer {
  return Buffer.from(canonicalJson(signatures.map((s) => ({ keyid: s.keyid, sig: s.sig }))), 'utf8');
}

/** Everything after the payload: lengths, manifest bytes, signatures block. */
export function encodeTail(manifestBytes: Buffer, signatures: readonly SignatureEntry[]): Buffer {
  const sigBytes = encodeSignatures(signatures);
  const lens = Buffer.alloc(TAIL_HEADER_BYTES);
  lens.writeUInt32BE(manifestBytes.length, 0);
  lens.writeUInt32BE(sigBytes.length, 4);
  return Buffer.concat([lens, manifestBytes, sigBytes]);
}

export interface Layout {
  payloadLength: number;
  manifestLength: number;
  signaturesLength: number;
  /** offset of the tail (lengths, manifest, signatures) = 16 + payloadLength */
  tailOffset: number;
}

/** Checks magic and payload length against the file size (the first 16 bytes). */
export function decodePrefix(h: Buffer, fileSize: number): number {
  const magicOk = h.length >= MAGIC.length && h.subarray(0, MAGIC.length).equals(MAGIC);
  if (!magicOk) throw new FleetError('FLEET_BUNDLE_FORMAT', 'not a fleetlet bundle (no FLTBNDL1 magic)');
  if (h.length < PREFIX_BYTES) throw new FleetError('FLEET_BUNDLE_TRUNCATED', `bundle ends inside its ${PREFIX_BYTES}-byte prefix`);
  const p = h.readBigUInt64BE(8);
  if (p > BigInt(Number.MAX_SAFE_INTEGER)) throw new FleetError('FLEET_BUNDLE_FORMAT', `payload length ${p} is not a safe integer`);
  const payloadLength = Number(p);
  if (fileSize < PREFIX_BYTES + payloadLength + TAIL_HEADER_BYTES) {
    throw new FleetError('FLEET_BUNDLE_TRUNCATED', `bundle is ${fileSize} bytes, shorter than its ${payloadLength}-byte payload and lengths say`, { details: { size: fileSize, payloadLength } });
  }
  return payloadLength;
}

/** Checks the manifest and signatures lengths (the 8 bytes after the payload) and the file size. */
export function decodeTailHeader(t: Buffer, fileSize: number, payloadLength: number): Layout {
  const manifestLength = t.readUInt32BE(0);
  const signaturesLength = t.readUInt32BE(4);
  if (manifestLength > MAX_MANIFEST_BYTES) {
    throw new FleetError('FLEET_BUNDLE_MANIFEST_TOO_LARGE', `manifest is ${manifestLength} bytes, the limit is ${MAX_MANIFEST_BYTES}`, { details: { manifestLength, limit: MAX_MANIFEST_BYTES } });
  }
  if (manifestLength < 2) throw new FleetError('FLEET_BUNDLE_FORMAT', `manifest length ${manifestLength} is too small`);
  if (signaturesLength < 2 || signaturesLength > MAX_SIGNATURES_BYTES) throw new FleetError('FLEET_BUNDLE_FORMAT', `signatures block length ${signaturesLength} is outside 2..${MAX_SIGNATURES_BYTES}`);
  const tailOffset = PREFIX_BYTES + payloadLength;
  const expected = tailOffset + TAIL_HEADER_BYTES + manifestLength + signaturesLength;
  if (fileSize < expected) throw new FleetError('FLEET_BUNDLE_TRUNCATED', `bundle is ${fileSize} bytes, its lengths say ${expected}`, { details: { size: fileSize, expected } });
  if (fileSize > expected) throw new FleetError('FLEET_BUNDLE_FORMAT', `bundle has ${fileSize - expected} bytes after its signatures block`, { details: { size: fileSize, expected } });
  return { payloadLength, manifestLength, signaturesLength, tailOffset };
}

export function parseSignatures(bytes: Buffer): SignatureEntry[] {
  let raw: unknown;
  try {
    raw = JSON.parse(bytes.toString('utf8'));
  } catch (err) {
    throw new FleetError('FLEET_BUNDLE_FORMAT', `signatures block is not JSON: ${(err as Error).message}`, { cause: err });
  }
  const r = SignaturesSchema.safeParse(raw);
  if (!r.success) throw new FleetError('FLEET_BUNDLE_FORMAT', `signatures block: ${r.error.issues.map((i) => `${i.path.join('.')}: ${i.message}`).join('; ')}`);
  return r.data;
}

/**
 * Parse and validate manifest bytes. The bytes must be valid UTF-8, canonical JSON and match
 * the schema; an app bundle must have an `app` section whose command is one of its files.
 * Path rules are checked separately (checkFiles) so they get their own codes.
 */
export function parseManifest(bytes: Buffer): BundleManifest {
  const text = bytes.toString('utf8');
  if (!Buffer.from(text, 'utf8').equals(bytes)) throw new FleetError('FLEET_BUNDLE_MANIFEST_INVALID', 'manifest is not valid UTF-8');
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (err) {
    throw new FleetError('FLEET_BUNDLE_MANIFEST_INVALID', `manifest is not JSON: ${(err as Error).message}`, { cause: err });
  }
  let canonical: string;
  try {
    canonical = canonicalJson(raw);
  } catch (err) {
    throw new FleetError('FLEET_BUNDLE_MANIFEST_INVALID', `manifest: ${(err as Error).message}`, { cause: err });
  }
  if (canonical !== text) throw new FleetError('FLEET_BUNDLE_MANIFEST_INVALID', 'manifest bytes are not canonical JSON (sorted keys, no whitespace, no duplicate keys)');
  const r = ManifestSchema.safeParse(raw);
  if (!r.success) throw new FleetError('FLEET_BUNDLE_MANIFEST_INVALID', `manifest: ${r.error.issues.map((i) => `${i.path.join('.')}: ${i.message}`).join('; ')}`);
  const m = r.data;
  if (m.kind === 'app' && !m.app) throw new FleetError('FLEET_BUNDLE_MANIFEST_INVALID', 'manifest: kind app needs an "app" section');
  if (m.kind !== 'app' && m.app) throw new FleetError('FLEET_BUNDLE_MANIFEST_INVALID', `manifest: an "app" section is only allowed for kind app, not ${m.kind}`);
  const sum = m.files.reduce((n, f) => n + f.size, 0);
  if (sum !== m.payload.size) throw new FleetError('FLEET_BUNDLE_MANIFEST_INVALID', `manifest: files add up to ${sum} bytes, payload.size is ${m.payload.size}`);
  return m;
}

/**
 * Path rule: a normalized relative POSIX path. Parts separated by single "/", each part 1..255
 * bytes, not "." or "..", no NUL or backslash; no leading or trailing "/". Returns a reason or
 * undefined when the path is fine.
 */
export function pathProblem(p: string): string | undefined {
  if (p.length === 0) return 'empty path';
  if (Buffer.byteLength(p, 'utf8') > MAX_PATH_BYTES) return `longer than ${MAX_PATH_BYTES} bytes`;
  if (p.startsWith('/')) return 'absolute path';
  if (/^[A-Za-z]:/.test(p)) return 'drive-letter path';
  if (p.includes('\\')) return 'backslash in path';
  if (p.includes('\0')) return 'NUL in path';
  // eslint-disable-next-line no-control-regex
  if (/[\u0000-\u001f\u007f]/.test(p)) return 'control character in path';
  for (const part of p.split('/')) {
    if (part === '') return 'empty path part (// or trailing /)';
    if (part === '.' || part === '..') return `"${part}" part`;
    if (Buffer.byteLength(part, 'utf8') > MAX_SEGMENT_BYTES) return `part longer than ${MAX_SEGMENT_BYTES} bytes`;
  }
  return undefined;
}

/**
 * Every entry must be a regular file with a good path; no two entries may share a path and no
 * path may be both a file and a directory ("a" and "a/b"). Also checks that the app command is
 * a listed file. Throws FLEET_BUNDLE_PATH or FLEET_BUNDLE_DUPLICATE_PATH.
 */
export function checkFiles(m: BundleManifest): void {
  const files = new Set<string>();
  const dirs = new Set<string>();
  for (const f of m.files) {
    if (f.type !== undefined && f.type !== 'file') {
      throw new FleetError('FLEET_BUNDLE_PATH', `${JSON.stringify(f.path)}: entry type "${f.type}" is not allowed (only regular files; no links)`, { details: { path: f.path, type: f.type } });
    }
    const problem = pathProblem(f.path);
    if (problem) throw new FleetError('FLEET_BUNDLE_PATH', `${JSON.stringify(f.path)}: ${problem}`, { details: { path: f.path } });
    if (files.has(f.path) || dirs.has(f.path)) throw new FleetError('FLEET_BUNDLE_DUPLICATE_PATH', `${JSON.stringify(f.path)} appears twice (or as a file and a directory)`, { details: { path: f.path } });
    files.add(f.path);
    const parts = f.path.split('/');
    for (let i = 1; i < parts.length; i++) {
      const d = parts.slice(0, i).join('/');
      if (files.has(d)) throw new FleetError('FLEET_BUNDLE_DUPLICATE_PATH', `${JSON.stringify(d)} is both a file and a directory`, { details: { path: d } });
      dirs.add(d);
    }
  }
  if (m.app) {
    const problem = pathProblem(m.app.command);
    if (problem) throw new FleetError('FLEET_BUNDLE_PATH', `app.command ${JSON.stringify(m.app.command)}: ${problem}`, { details: { path: m.app.command } });
    if (!files.has(m.app.command)) throw new FleetError('FLEET_BUNDLE_MANIFEST_INVALID', `app.command ${JSON.stringify(m.app.command)} is not one of the bundle's files`);
  }
}

/** Compare dotted numeric versions (major.minor.patch; a pre-release sorts before its release). */
export function compareVersions(a: string, b: string): number {
  const parse = (v: string) => {
    const m = /^(\d+)\.(\d+)\.(\d+)(?:-([^+]*))?/.exec(v);
    if (!m) return undefined;
    return { nums: [Number(m[1]), Number(m[2]), Number(m[3])], pre: m[4] };
  };
  const pa = parse(a);
  const pb = parse(b);
  if (!pa || !pb) return a === b ? 0 : a < b ? -1 : 1;
  for (let i = 0; i < 3; i++) if (pa.nums[i] !== pb.nums[i]) return pa.nums[i]! < pb.nums[i]! ? -1 : 1;
  if (pa.pre === pb.pre) return 0;
  if (pa.pre === undefined) return 1;
  if (pb.pre === undefined) return -1;
  return pa.pre < pb.pre ? -1 : 1;
}
