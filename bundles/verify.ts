import { constants as fsc } from 'node:fs';
import { open, mkdir, rm, type FileHandle } from 'node:fs/promises';
import { createHash, type Hash } from 'node:crypto';
import { dirname, join, resolve } from 'node:path';
import { FleetError, isFleetError } from '../core/errors.ts';
import {
  PREFIX_BYTES,
  TAIL_HEADER_BYTES,
  checkFiles,
  compareVersions,
  decodePrefix,
  decodeTailHeader,
  parseManifest,
  parseSignatures,
  type BundleKind,
  type BundleManifest,
  type Layout,
  type SignatureEntry,
} from './format.ts';
import { readRange, walkPayload } from './stream.ts';
import { countValid, type TrustRoot } from './trust.ts';

export interface DeviceFacts {
  /** Node's process.arch name of the device (x64, arm64, arm, ...) */
  arch: string;
  deviceClass?: string;
  /** the running agent's version (major.minor.patch) */
  agentVersion?: string;
}

export interface VerifyOptions {
  trust: TrustRoot;
  /**
   * The device's sequence floor for this bundle name (the sequence of the installed bundle).
   * A sequence below the floor is refused with FLEET_BUNDLE_ROLLBACK; equal is accepted so the
   * installed bundle can be re-installed (repair). Omitted: no rollback check (first install).
   */
  floor?: number;
  /** Target check; omitted: targets are not checked (the updater always passes it). */
  device?: DeviceFacts;
  /** clock for expiry checks, ms since epoch (default Date.now()) */
  now?: number;
  /** refuse a bundle of another kind (FLEET_BUNDLE_KIND) */
  kind?: BundleKind;
  /** bytes of the file processed so far, and the file size */
  onProgress?: (done: number, total: number) => void;
}

export interface VerifiedBundle {
  manifest: BundleManifest;
  /** sha256 of the whole bundle file, hex (what the hub's desired state names) */
  sha256: string;
  /** size of the whole file in bytes */
  size: number;
  /** the exact signed manifest bytes */
  manifestBytes: Buffer;
  /** keyids of the trust-root keys whose signatures verified */
  signedBy: string[];
  /**
   * Extract into `dir`, which must not exist (its parent must): re-reads the file, re-checks
   * the header and manifest bytes and every file hash while writing, fsyncs every file and
   * directory, and removes `dir` on any failure. The caller renames `dir` into place.
   */
  extractTo(dir: string, opts?: { onProgress?: (done: number, total: number) => void }): Promise<void>;
}

/** Signature policy: `threshold` distinct trust-root keys must sign the exact manifest bytes. */
export function checkManifestSignatures(trust: TrustRoot, manifestBytes: Buffer, sigs: readonly SignatureEntry[]): string[] {
  const { valid, bad } = countValid(trust.keys, manifestBytes, sigs);
  if (valid >= trust.threshold) {
    const ids = new Set<string>();
    for (const s of sigs) if (trust.keys.has(s.keyid)) ids.add(s.keyid);
    return [...ids];
  }
  if (bad > 0) throw new FleetError('FLEET_BUNDLE_BAD_SIGNATURE', `${bad} signature(s) by trusted keys do not verify over the manifest (tampered manifest or signature)`, { details: { valid, bad, threshold: trust.threshold } });
  if (valid === 0) throw new FleetError('FLEET_BUNDLE_UNKNOWN_KEY', `none of the ${sigs.length} signature(s) is by a key of trust root v${trust.version}`, { details: { signatures: sigs.length, rootVersion: trust.version } });
  throw new FleetError('FLEET_BUNDLE_THRESHOLD', `signed by ${valid} trusted key(s), trust root v${trust.version} needs ${trust.threshold}`, { details: { valid, threshold: trust.threshold } });
}

/** Policy checks on a manifest whose signatures verified: kind, expiry, rollback, targets. */
export function checkPolicy(m: BundleManifest, opts: Omit<VerifyOptions, 'trust' | 'onProgress'>): void {
  const now = opts.now ?? Date.now();
  if (opts.kind !== undefined && m.kind !== opts.kind) throw new FleetError('FLEET_BUNDLE_KIND', `bundle ${m.name} is of kind ${m.kind}, expected ${opts.kind}`, { details: { kind: m.kind, expected: opts.kind } });
  const expires = Date.parse(m.expires);
  if (now >= expires) throw new FleetError('FLEET_BUNDLE_EXPIRED', `bundle ${m.name} ${m.version} expired at ${m.expires}`, { details: { expires: m.expires, now: new Date(now).toISOString() } });
  if (opts.floor !== undefined && m.sequence < opts.floor) {
    throw new FleetError('FLEET_BUNDLE_ROLLBACK', `bundle ${m.name} has sequence ${m.sequence}, below the device floor ${opts.floor}`, { details: { sequence: m.sequence, floor: opts.floor } });
  }
  const d = opts.device;
  if (d) {
    const t = m.targets;
    if (t.arch.length > 0 && !t.arch.includes(d.arch)) throw new FleetError('FLEET_BUNDLE_TARGET', `bundle ${m.name} is for ${t.arch.join(', ')}, this device is ${d.arch}`, { details: { target: 'arch', want: t.arch, have: d.arch } });
    if (t.deviceClass.length > 0 && (d.deviceClass === undefined || !t.deviceClass.includes(d.deviceClass))) {
      throw new FleetError('FLEET_BUNDLE_TARGET', `bundle ${m.name} is for device class ${t.deviceClass.join(', ')}, this device is ${d.deviceClass ?? '(no class)'}`, { details: { target: 'deviceClass', want: t.deviceClass, have: d.deviceClass ?? null } });
    }
    if (t.minAgentVersion !== undefined && (d.agentVersion === undefined || compareVersions(d.agentVersion, t.minAgentVersion) < 0)) {
      throw new FleetError('FLEET_BUNDLE_TARGET', `bundle ${m.name} needs agent ${t.minAgentVersion} or newer, this agent is ${d.agentVersion ?? '(unknown)'}`, { details: { target: 'minAgentVersion', want: t.minAgentVersion, have: d.agentVersion ?? null } });
    }
  }
}

async function readExact(fh: FileHandle, len: number, pos: number): Promise<Buffer> {
  const buf = Buffer.alloc(len);
  let off = 0;
  while (off < len) {
    const { bytesRead } = await fh.read(buf, off, len - off, pos + off);
    if (bytesRead === 0) break;
    off += bytesRead;
  }
  return off === len ? buf : buf.subarray(0, off);
}

interface Head {
  layout: Layout;
  prefixBytes: Buffer;
  /** lengths, manifest and signatures: bytes [tailOffset, size) */
  tailBytes: Buffer;
  manifestBytes: Buffer;
  signatures: SignatureEntry[];
  size: number;
}

/** Read and frame-check prefix, lengths, manifest bytes and signatures block (no trust decisions). */
export async function readHead(fh: FileHandle): Promise<Head> {
  const st = await fh.stat();
  if (!st.isFile()) throw new FleetError('FLEET_BUNDLE_FORMAT', 'a bundle must be a regular file');
  const size = st.size;
  const prefixBytes = await readExact(fh, PREFIX_BYTES, 0);
  const payloadLength = decodePrefix(prefixBytes, size);
  const tailOffset = PREFIX_BYTES + payloadLength;
  const lens = await readExact(fh, TAIL_HEADER_BYTES, tailOffset);
  if (lens.length < TAIL_HEADER_BYTES) throw new FleetError('FLEET_BUNDLE_TRUNCATED', 'bundle ends before its manifest');
  // the manifest size limit is enforced here, before the manifest is read
  const layout = decodeTailHeader(lens, size, payloadLength);
  const rest = await readExact(fh, layout.manifestLength + layout.signaturesLength, tailOffset + TAIL_HEADER_BYTES);
  if (rest.length < layout.manifestLength + layout.signaturesLength) throw new FleetError('FLEET_BUNDLE_TRUNCATED', 'bundle ends inside its manifest or signatures block');
  const manifestBytes = rest.subarray(0, layout.manifestLength);
  const signatures = parseSignatures(rest.subarray(layout.manifestLength));
  return { layout, prefixBytes, tailBytes: Buffer.concat([lens, rest]), manifestBytes, signatures, size };
}

/**
 * Verify a bundle file: frame, signatures (trust root threshold over the exact manifest bytes),
 * manifest schema and paths, kind, expiry, rollback floor, targets, then one SHA-256 pass over
 * prefix and payload that must give the signed payload.sha256; the same hash continued over the
 * tail is the whole-file sha256. Per-file hashes are implied (the payload is the files back to
 * back with signed sizes) and checked again file by file at extraction. Nothing is written.
 * Memory is bounded: two 4 MiB read buffers plus the manifest (at most 1 MiB).
 */
export async function verifyBundle(file: string, opts: VerifyOptions): Promise<VerifiedBundle> {
  const { trust } = opts;
  const now = opts.now ?? Date.now();
  let fh: FileHandle;
  try {
    fh = await open(file, fsc.O_RDONLY | fsc.O_NOFOLLOW);
  } catch (err) {
    throw new FleetError('FLEET_BUNDLE_FORMAT', `cannot open bundle ${file}: ${(err as Error).message}`, { cause: err });
  }
  try {
    const head = await readHead(fh);
    if (now >= trust.expires) throw new FleetError('FLEET_BUNDLE_ROOT_EXPIRED', `trust root v${trust.version} expired at ${new Date(trust.expires).toISOString()}`);
    const signedBy = checkManifestSignatures(trust, head.manifestBytes, head.signatures);
    const manifest = parseManifest(head.manifestBytes);
    checkFiles(manifest);
    checkPolicy(manifest, { ...opts, now });
    if (manifest.payload.size !== head.layout.payloadLength) {
      throw new FleetError('FLEET_BUNDLE_FORMAT', `payload is ${head.layout.payloadLength} bytes, the manifest says ${manifest.payload.size}`, { details: { payloadLength: head.layout.payloadLength, manifest: manifest.payload.size } });
    }

    const total = head.size;
    const h = createHash('sha256');
    let done = 0;
    for await (const chunk of readRange(fh, 0, head.layout.tailOffset)) {
      h.update(chunk);
      done += chunk.length;
      opts.onProgress?.(done, total);
    }
    const payloadSha = h.copy().digest('hex');
    if (payloadSha !== manifest.payload.sha256) {
      throw new FleetError('FLEET_BUNDLE_HASH', `payload sha256 ${payloadSha} does not match the manifest (${manifest.payload.sha256})`, { details: { expected: manifest.payload.sha256, actual: payloadSha } });
    }
    h.update(head.tailBytes);
    const sha256 = h.digest('hex');
    opts.onProgress?.(total, total);
    const manifestBytes = Buffer.from(head.manifestBytes);
    const frame = { prefixBytes: head.prefixBytes, tailBytes: head.tailBytes, tailOffset: head.layout.tailOffset };
    return {
      manifest,
      sha256,
      size: total,
      manifestBytes,
      signedBy,
      extractTo: (dir, xopts) => extractBundle(file, { ...frame, manifest, size: total }, dir, xopts?.onProgress),
    };
  } finally {
    await fh.close();
  }
}

async function fsyncDir(dir: string): Promise<void> {
  const d = await open(dir, fsc.O_RDONLY | fsc.O_DIRECTORY);
  try {
    await d.sync();
  } finally {
    await d.close();
  }
}

/**
 * Extraction into a fresh directory. Every path was checked by verifyBundle; here the tree is
 * created by us alone (mkdir without recursive, files with O_CREAT|O_EXCL|O_NOFOLLOW), so no
 * entry can follow a link out of `dir`. Anything that differs from what verify saw (size,
 * header, manifest, a file hash) is refused and `dir` removed.
 */
async function extractBundle(file: string, v: { prefixBytes: Buffer; tailBytes: Buffer; tailOffset: number; manifest: BundleManifest; size: number }, dir: string, onProgress?: (done: number, total: number) => void): Promise<void> {
  const target = resolve(dir);
  try {
    await mkdir(target, { mode: 0o755 });
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    throw new FleetError('FLEET_BUNDLE_STAGING', code === 'EEXIST' ? `staging directory ${target} already exists` : `cannot create staging directory ${target}: ${(err as Error).message}`, { cause: err });
  }
  let ok = false;
  let fh: FileHandle | undefined;
  let out: FileHandle | undefined;
  const dirs: string[] = [];
  try {
    try {
      fh = await open(file, fsc.O_RDONLY | fsc.O_NOFOLLOW);
    } catch (err) {
      throw new FleetError('FLEET_BUNDLE_CHANGED', `cannot reopen bundle ${file}: ${(err as Error).message}`, { cause: err });
    }
    const st = await fh.stat();
    if (st.size !== v.size) throw new FleetError('FLEET_BUNDLE_CHANGED', `bundle ${file} is ${st.size} bytes now, ${v.size} when verified`);
    const prefix = await readExact(fh, v.prefixBytes.length, 0);
    const tail = await readExact(fh, v.tailBytes.length, v.tailOffset);
    if (!prefix.equals(v.prefixBytes) || !tail.equals(v.tailBytes)) throw new FleetError('FLEET_BUNDLE_CHANGED', `bundle ${file}: prefix, manifest or signatures changed since verify`);
    const made = new Set<string>();
    const files = v.manifest.files;
    let h: Hash = createHash('sha256');
    await walkPayload(
      fh,
      PREFIX_BYTES,
      files.map((f) => f.size),
      {
        async begin(i) {
          const parts = files[i]!.path.split('/');
          for (let k = 1; k < parts.length; k++) {
            const rel = parts.slice(0, k).join('/');
            if (made.has(rel)) continue;
            const abs = join(target, rel);
            await mkdir(abs, { mode: 0o755 });
            made.add(rel);
            dirs.push(abs);
          }
          try {
            out = await open(join(target, files[i]!.path), fsc.O_WRONLY | fsc.O_CREAT | fsc.O_EXCL | fsc.O_NOFOLLOW, 0o600);
          } catch (err) {
            throw new FleetError('FLEET_BUNDLE_STAGING', `cannot create ${files[i]!.path}: ${(err as Error).message}`, { cause: err });
          }
          h = createHash('sha256');
        },
        async data(_i, chunk) {
          h.update(chunk);
          let off = 0;
          while (off < chunk.length) {
            const { bytesWritten } = await out!.write(chunk, off, chunk.length - off);
            off += bytesWritten;
          }
        },
        async end(i) {
          const f = files[i]!;
          const got = h.digest('hex');
          if (got !== f.sha256) throw new FleetError('FLEET_BUNDLE_HASH', `${f.path}: sha256 ${got} does not match the manifest (${f.sha256}) while extracting`, { details: { path: f.path, expected: f.sha256, actual: got } });
          await out!.chmod(f.mode);
          await out!.sync();
          await out!.close();
          out = undefined;
        },
      },
      onProgress ? (done) => onProgress(PREFIX_BYTES + done, v.size) : undefined,
    );
    // Directories deepest first, then the staging dir and its parent (so the new entry is durable).
    for (const d of dirs.reverse()) await fsyncDir(d);
    await fsyncDir(target);
    await fsyncDir(dirname(target));
    ok = true;
  } catch (err) {
    if (isFleetError(err)) throw err;
    throw new FleetError('FLEET_BUNDLE_STAGING', `extracting into ${target} failed: ${(err as Error).message}`, { cause: err });
  } finally {
    await out?.close().catch(() => undefined);
    await fh?.close().catch(() => undefined);
    if (!ok) await rm(target, { recursive: true, force: true });
  }
}
