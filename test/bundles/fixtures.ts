import { generateKeyPairSync, createHash, type KeyObject } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { canonicalJson, createRootBytes, encodePrefix, encodeTail, parseTrustRoot, type TrustRoot } from '../../bundles/index.ts';
import { signWith } from '../../bundles/trust.ts';

export interface KeyPair {
  privateKey: KeyObject;
  publicKey: KeyObject;
}

export function newKeys(n: number): KeyPair[] {
  return Array.from({ length: n }, () => generateKeyPairSync('ed25519'));
}

export const FAR_FUTURE = '2099-01-01T00:00:00Z';
export const NOW = Date.parse('2026-11-22T08:00:00Z');

/** A trust root of `keys` with `threshold`, signed by all of them. */
export function makeRoot(keys: readonly KeyPair[], threshold: number, version = 1, expires = FAR_FUTURE): { root: TrustRoot; bytes: Buffer } {
  const bytes = createRootBytes({ version, expires, threshold, keys: keys.map((k) => k.publicKey), signers: keys.map((k) => k.privateKey) });
  return { root: parseTrustRoot(bytes), bytes };
}

export const sha256 = (b: Buffer | string) => createHash('sha256').update(b).digest('hex');

export interface CraftFile {
  path: string;
  data: Buffer | string;
  mode?: number;
  type?: string;
  /** claim this sha256 instead of the real one */
  sha256?: string;
}

/** The payload bytes of these files, and the manifest's payload field for them. */
export function payloadOf(files: readonly CraftFile[]): { bytes: Buffer; field: { size: number; sha256: string } } {
  const bytes = Buffer.concat(files.map((f) => Buffer.from(f.data)));
  return { bytes, field: { size: bytes.length, sha256: sha256(Buffer.concat([encodePrefix(bytes.length), bytes])) } };
}

/** A manifest object with sensible defaults for raw crafting (bypasses buildBundle's checks). */
export function manifestFor(files: readonly CraftFile[], over: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    payload: payloadOf(files).field,
    format: 1,
    name: 'demo',
    kind: 'config',
    version: '1.0.0',
    sequence: 5,
    created: '2026-11-01T00:00:00Z',
    expires: FAR_FUTURE,
    targets: { arch: [], deviceClass: [] },
    files: files.map((f) => ({ path: f.path, size: Buffer.byteLength(f.data), sha256: f.sha256 ?? sha256(Buffer.from(f.data)), mode: f.mode ?? 0o644, ...(f.type ? { type: f.type } : {}) })),
    ...over,
  };
}

/**
 * Write a bundle byte by byte as an attacker (or a buggy builder) could: any manifest, signed by
 * any keys, with any payload. `manifestText` overrides the canonical encoding. Layout: 16-byte
 * prefix, payload (the files back to back), lengths, manifest, signatures.
 */
export function craftBundle(file: string, opts: { files: readonly CraftFile[]; manifest?: Record<string, unknown>; manifestText?: string; signers: readonly KeyObject[]; trailing?: Buffer }): Buffer {
  const m = opts.manifest ?? manifestFor(opts.files);
  const manifestBytes = Buffer.from(opts.manifestText ?? canonicalJson(m), 'utf8');
  const payload = payloadOf(opts.files).bytes;
  const tail = encodeTail(manifestBytes, signWith(opts.signers, manifestBytes));
  const bytes = Buffer.concat([encodePrefix(payload.length), payload, tail, opts.trailing ?? Buffer.alloc(0)]);
  writeFileSync(file, bytes);
  return bytes;
}
