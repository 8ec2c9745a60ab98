import { createHash, createPublicKey, sign, verify, type KeyObject } from 'node:crypto';
import { closeSync, fsyncSync, openSync, readFileSync, renameSync, writeFileSync } from 'node:fs';
import { dirname, basename, join } from 'node:path';
import { z } from 'zod';
import { FleetError } from '../core/errors.ts';
import { canonicalJson, type SignatureEntry } from './format.ts';

/**
 * The trust root (root.json), TUF-style:
 *
 *   { "signed": { "type": "fleetlet-root", "version": N, "expires": ISO, "threshold": k,
 *                 "keys": { keyid: { "type": "ed25519", "public": hex32 } } },
 *     "signatures": [ { "keyid", "sig" } ] }
 *
 * Signatures are Ed25519 over canonicalJson(signed). keyid = sha256(raw public key), hex.
 * A root is valid on its own when at least `threshold` of its own keys signed it; a new root is
 * accepted (updateTrustRoot) only with version current+1 and signatures by the current root's
 * threshold AND by its own threshold. Root expiry does not stop rotation (a device offline for
 * a year must still be able to walk the chain) but verifyBundle refuses bundles under an expired
 * root (FLEET_BUNDLE_ROOT_EXPIRED).
 */
const hex64 = z.string().regex(/^[0-9a-f]{64}$/);
const RootSignedSchema = z
  .object({
    type: z.literal('fleetlet-root'),
    version: z.number().int().positive().max(Number.MAX_SAFE_INTEGER),
    expires: z.string().regex(/^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,3})?Z$/),
    threshold: z.number().int().min(1).max(64),
    keys: z.record(hex64, z.object({ type: z.literal('ed25519'), public: hex64 }).strict()),
  })
  .strict();
const RootFileSchema = z
  .object({
    signed: RootSignedSchema,
    signatures: z.array(z.object({ keyid: hex64, sig: z.string().regex(/^[0-9a-f]{128}$/) }).strict()).max(64),
  })
  .strict();
export type RootSigned = z.infer<typeof RootSignedSchema>;

export interface TrustRoot {
  readonly version: number;
  readonly threshold: number;
  /** ms since epoch */
  readonly expires: number;
  /** keyid → cached node:crypto public key (the verify hot path) */
  readonly keys: ReadonlyMap<string, KeyObject>;
  readonly signed: RootSigned;
  /** the root.json bytes as accepted, for persisting */
  readonly bytes: Buffer;
}

const SPKI_ED25519_PREFIX = Buffer.from('302a300506032b6570032100', 'hex');

export function publicKeyFromRaw(raw: Buffer): KeyObject {
  if (raw.length !== 32) throw new FleetError('FLEET_KEY_INVALID', `Ed25519 public key must be 32 bytes, got ${raw.length}`);
  return createPublicKey({ key: Buffer.concat([SPKI_ED25519_PREFIX, raw]), format: 'der', type: 'spki' });
}

export function rawPublicKey(key: KeyObject): Buffer {
  const pub = key.type === 'private' ? createPublicKey(key) : key;
  if (pub.asymmetricKeyType !== 'ed25519') throw new FleetError('FLEET_KEY_INVALID', `key type is ${pub.asymmetricKeyType}, not ed25519`);
  return pub.export({ format: 'der', type: 'spki' }).subarray(-32);
}

/** keyid = sha256 of the raw 32-byte public key, hex (works for a private key too). */
export function keyIdOf(key: KeyObject): string {
  return createHash('sha256').update(rawPublicKey(key)).digest('hex');
}

export function signWith(keys: readonly KeyObject[], data: Buffer): SignatureEntry[] {
  return keys.map((k) => ({ keyid: keyIdOf(k), sig: sign(null, data, k).toString('hex') }));
}

/**
 * Count distinct keys of `keys` with a valid signature over `data`. Signatures by unknown keys
 * are ignored; `bad` counts signatures by known keys that do not verify.
 */
export function countValid(keys: ReadonlyMap<string, KeyObject>, data: Buffer, sigs: readonly SignatureEntry[]): { valid: number; bad: number; known: number } {
  const ok = new Set<string>();
  let bad = 0;
  let known = 0;
  for (const s of sigs) {
    const key = keys.get(s.keyid);
    if (!key) continue;
    known++;
    if (ok.has(s.keyid)) continue;
    if (verify(null, data, key, Buffer.from(s.sig, 'hex'))) ok.add(s.keyid);
    else bad++;
  }
  return { valid: ok.size, bad, known };
}

function parseRoot(bytes: Buffer, where: string): { signed: RootSigned; signatures: SignatureEntry[]; keys: Map<string, KeyObject> } {
  let raw: unknown;
  try {
    raw = JSON.parse(bytes.toString('utf8'));
  } catch (err) {
    throw new FleetError('FLEET_BUNDLE_ROOT_INVALID', `${where}: not JSON: ${(err as Error).message}`, { cause: err });
  }
  const r = RootFileSchema.safeParse(raw);
  if (!r.success) throw new FleetError('FLEET_BUNDLE_ROOT_INVALID', `${where}: ${r.error.issues.map((i) => `${i.path.join('.')}: ${i.message}`).join('; ')}`);
  const { signed, signatures } = r.data;
  if (!Number.isFinite(Date.parse(signed.expires))) throw new FleetError('FLEET_BUNDLE_ROOT_INVALID', `${where}: signed.expires is not a valid time`);
  const keys = new Map<string, KeyObject>();
  for (const [keyid, k] of Object.entries(signed.keys)) {
    const raw32 = Buffer.from(k.public, 'hex');
    const id = createHash('sha256').update(raw32).digest('hex');
    if (id !== keyid) throw new FleetError('FLEET_BUNDLE_ROOT_INVALID', `${where}: keyid ${keyid} is not sha256 of its public key (${id})`);
    try {
      keys.set(keyid, publicKeyFromRaw(raw32));
    } catch (err) {
      throw new FleetError('FLEET_BUNDLE_ROOT_INVALID', `${where}: key ${keyid} is not a valid Ed25519 public key`, { cause: err });
    }
  }
  if (signed.threshold > keys.size) throw new FleetError('FLEET_BUNDLE_ROOT_INVALID', `${where}: threshold ${signed.threshold} is more than its ${keys.size} keys`);
  return { signed, signatures, keys };
}

function toTrustRoot(p: ReturnType<typeof parseRoot>, bytes: Buffer): TrustRoot {
  return Object.freeze({ version: p.signed.version, threshold: p.signed.threshold, expires: Date.parse(p.signed.expires), keys: p.keys, signed: p.signed, bytes: Buffer.from(bytes) });
}

/** Parse root.json bytes and check the root is signed by its own threshold. */
export function parseTrustRoot(bytes: Buffer, where = 'root.json'): TrustRoot {
  const p = parseRoot(bytes, where);
  const { valid } = countValid(p.keys, Buffer.from(canonicalJson(p.signed)), p.signatures);
  if (valid < p.signed.threshold) throw new FleetError('FLEET_BUNDLE_ROOT_THRESHOLD', `${where}: signed by ${valid} of its own keys, threshold ${p.signed.threshold}`, { details: { valid, threshold: p.signed.threshold } });
  return toTrustRoot(p, bytes);
}

/** Load a trusted root.json (shipped with the device or persisted by saveTrustRoot). */
export function loadTrustRoot(file: string): TrustRoot {
  let bytes: Buffer;
  try {
    bytes = readFileSync(file);
  } catch (err) {
    throw new FleetError('FLEET_BUNDLE_ROOT_INVALID', `cannot read trust root ${file}: ${(err as Error).message}`, { cause: err });
  }
  return parseTrustRoot(bytes, file);
}

/**
 * Rotation: accept `newRootBytes` as the next root when its version is current.version + 1 and
 * it is signed by current.threshold of the current keys and by its own threshold of its own keys.
 * Returns the new root; the caller persists it (saveTrustRoot) before using it.
 */
export function updateTrustRoot(current: TrustRoot, newRootBytes: Buffer): TrustRoot {
  const p = parseRoot(newRootBytes, `root v${current.version + 1}`);
  if (p.signed.version !== current.version + 1) {
    throw new FleetError('FLEET_BUNDLE_ROOT_VERSION', `new root has version ${p.signed.version}, expected ${current.version + 1}`, { details: { version: p.signed.version, expected: current.version + 1 } });
  }
  const data = Buffer.from(canonicalJson(p.signed));
  const byOld = countValid(current.keys, data, p.signatures).valid;
  if (byOld < current.threshold) {
    throw new FleetError('FLEET_BUNDLE_ROOT_THRESHOLD', `new root v${p.signed.version} is signed by ${byOld} keys of root v${current.version}, threshold ${current.threshold}`, { details: { byOld, threshold: current.threshold } });
  }
  const byNew = countValid(p.keys, data, p.signatures).valid;
  if (byNew < p.signed.threshold) {
    throw new FleetError('FLEET_BUNDLE_ROOT_THRESHOLD', `new root v${p.signed.version} is signed by ${byNew} of its own keys, threshold ${p.signed.threshold}`, { details: { byNew, threshold: p.signed.threshold } });
  }
  return toTrustRoot(p, newRootBytes);
}

/** Walk a chain of roots (v+1, v+2, ...) from `current`; every step as updateTrustRoot. */
export function verifyRootChain(current: TrustRoot, chain: readonly Buffer[]): TrustRoot {
  let root = current;
  for (const bytes of chain) root = updateTrustRoot(root, bytes);
  return root;
}

/** Persist an accepted root atomically: temp file, fsync, rename, fsync of the directory. */
export function saveTrustRoot(file: string, root: TrustRoot): void {
  const tmp = join(dirname(file), `.${basename(file)}.tmp-${process.pid}`);
  writeFileSync(tmp, root.bytes, { mode: 0o644 });
  const fd = openSync(tmp, 'r');
  try {
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
  renameSync(tmp, file);
  const dfd = openSync(dirname(file), 'r');
  try {
    fsyncSync(dfd);
  } finally {
    closeSync(dfd);
  }
}

/**
 * An in-memory root of these public keys (version 0, never expires, not persisted): for checking
 * a bundle by hand against known keys (`fleetlet bundle verify --pub`). Devices use root.json.
 */
export function trustRootOfKeys(keys: readonly KeyObject[], threshold: number): TrustRoot {
  const map = new Map<string, KeyObject>();
  const signedKeys: RootSigned['keys'] = {};
  for (const k of keys) {
    const pub = publicKeyFromRaw(rawPublicKey(k));
    map.set(keyIdOf(pub), pub);
    signedKeys[keyIdOf(pub)] = { type: 'ed25519', public: rawPublicKey(pub).toString('hex') };
  }
  if (threshold < 1 || threshold > map.size) throw new FleetError('FLEET_BUNDLE_ROOT_INVALID', `threshold ${threshold} is outside 1..${map.size}`);
  const signed: RootSigned = { type: 'fleetlet-root', version: 0, expires: '9999-12-31T23:59:59Z', threshold, keys: signedKeys };
  return Object.freeze({ version: 0, threshold, expires: Number.POSITIVE_INFINITY, keys: map, signed, bytes: Buffer.from(JSON.stringify({ signed, signatures: [] })) });
}

/** Build root.json bytes (for the CLI and tests): keys are public keys, signers private keys. */
export function createRootBytes(opts: { version: number; expires: string; threshold: number; keys: readonly KeyObject[]; signers: readonly KeyObject[] }): Buffer {
  const keys: Record<string, { type: 'ed25519'; public: string }> = {};
  for (const k of opts.keys) keys[keyIdOf(k)] = { type: 'ed25519', public: rawPublicKey(k).toString('hex') };
  const signed: RootSigned = { type: 'fleetlet-root', version: opts.version, expires: opts.expires, threshold: opts.threshold, keys };
  const signatures = signWith(opts.signers, Buffer.from(canonicalJson(signed)));
  return Buffer.from(JSON.stringify({ signed, signatures }, null, 2) + '\n');
}
