import { createReadStream, constants as fsc } from 'node:fs';
import { lstat, open, readdir, rename, rm, type FileHandle } from 'node:fs/promises';
import { createHash, type KeyObject } from 'node:crypto';
import { basename, dirname, join, relative, sep } from 'node:path';
import { FleetError } from '../core/errors.ts';
import { CHUNK_BYTES, readRange } from './stream.ts';
import {
  FORMAT_VERSION,
  ManifestSchema,
  PREFIX_BYTES,
  canonicalJson,
  checkFiles,
  encodePrefix,
  encodeTail,
  parseManifest,
  type BundleFile,
  type BundleManifest,
  type ManifestInput,
  type SignatureEntry,
} from './format.ts';
import { signWith } from './trust.ts';
import { readHead } from './verify.ts';

export interface BuildSource {
  /** path inside the bundle (normalized relative POSIX path) */
  path: string;
  /** file on disk to take the bytes from */
  source: string;
  /** permission bits (default: 0755 if the source is executable by its owner, else 0644) */
  mode?: number;
}

export interface BuildOptions {
  /** the bundle file to write (written to a temp file beside it, then renamed) */
  out: string;
  /** manifest fields; `created` defaults to now */
  manifest: Omit<ManifestInput, 'created'> & { created?: string };
  /** take every regular file under this directory (sorted by path); links are refused */
  dir?: string;
  /** or/and these files */
  files?: readonly BuildSource[];
  /** sign with these private keys (more can be added later with signBundle) */
  keys?: readonly KeyObject[];
  onProgress?: (done: number, total: number) => void;
}

export interface BuiltBundle {
  file: string;
  manifest: BundleManifest;
  manifestBytes: Buffer;
  signatures: SignatureEntry[];
  sha256: string;
  size: number;
}

async function walkDir(root: string): Promise<BuildSource[]> {
  const out: BuildSource[] = [];
  const visit = async (dir: string): Promise<void> => {
    const entries = await readdir(dir, { withFileTypes: true });
    for (const e of entries) {
      const abs = join(dir, e.name);
      const rel = relative(root, abs).split(sep).join('/');
      if (e.isDirectory()) await visit(abs);
      else if (e.isFile()) out.push({ path: rel, source: abs });
      else throw new FleetError('FLEET_BUNDLE_PATH', `${abs}: only regular files and directories can go in a bundle (no links, devices, sockets)`, { details: { path: rel } });
    }
  };
  await visit(root);
  return out;
}

async function writeAll(out: FileHandle, buf: Buffer): Promise<void> {
  let off = 0;
  while (off < buf.length) {
    const { bytesWritten } = await out.write(buf, off, buf.length - off);
    off += bytesWritten;
  }
}

async function syncDir(dir: string): Promise<void> {
  const d = await open(dir, fsc.O_RDONLY | fsc.O_DIRECTORY);
  try {
    await d.sync();
  } finally {
    await d.close();
  }
}

/** Canonical manifest bytes for a manifest object (validated, defaults filled in). */
export function encodeManifest(m: unknown): { manifest: BundleManifest; bytes: Buffer } {
  const r = ManifestSchema.safeParse(m);
  if (!r.success) throw new FleetError('FLEET_BUNDLE_MANIFEST_INVALID', `manifest: ${r.error.issues.map((i) => `${i.path.join('.')}: ${i.message}`).join('; ')}`);
  const bytes = Buffer.from(canonicalJson(r.data), 'utf8');
  const manifest = parseManifest(bytes);
  checkFiles(manifest);
  return { manifest, bytes };
}

/** Ed25519 signatures of each key over the exact manifest bytes. */
export function signManifest(manifestBytes: Buffer, keys: readonly KeyObject[]): SignatureEntry[] {
  return signWith(keys, manifestBytes);
}

/**
 * Build a bundle in one pass over the sources: the payload is written while each file's sha256
 * and the prefix+payload sha256 are computed, then the manifest (now complete) and its
 * signatures are appended. The manifest and paths are validated before anything is written; a
 * source file that changes size while it is copied fails the build.
 */
export async function buildBundle(opts: BuildOptions): Promise<BuiltBundle> {
  const sources = [...(opts.dir ? await walkDir(opts.dir) : []), ...(opts.files ?? [])];
  sources.sort((a, b) => (a.path < b.path ? -1 : a.path > b.path ? 1 : 0));
  const entries: BundleFile[] = [];
  for (const s of sources) {
    const st = await lstat(s.source);
    if (!st.isFile()) throw new FleetError('FLEET_BUNDLE_PATH', `${s.source}: not a regular file`, { details: { path: s.path } });
    entries.push({ path: s.path, size: st.size, sha256: '0'.repeat(64), mode: s.mode ?? (st.mode & 0o100 ? 0o755 : 0o644) });
  }
  const payloadSize = entries.reduce((n, f) => n + f.size, 0);
  const fields = { ...opts.manifest, created: opts.manifest.created ?? new Date().toISOString().replace(/\.\d{3}Z$/, 'Z'), format: FORMAT_VERSION };
  encodeManifest({ ...fields, files: entries, payload: { size: payloadSize, sha256: '0'.repeat(64) } }); // validate before writing

  const tmp = join(dirname(opts.out), `.${basename(opts.out)}.tmp-${process.pid}`);
  const out = await open(tmp, 'w', 0o644);
  let ok = false;
  try {
    const prefix = encodePrefix(payloadSize);
    const whole = createHash('sha256').update(prefix);
    await writeAll(out, prefix);
    const total = PREFIX_BYTES + payloadSize;
    let done = PREFIX_BYTES;
    for (let i = 0; i < sources.length; i++) {
      const f = entries[i]!;
      const h = createHash('sha256');
      let n = 0;
      for await (const c of createReadStream(sources[i]!.source, { highWaterMark: CHUNK_BYTES })) {
        const chunk = c as Buffer;
        n += chunk.length;
        if (n > f.size) break;
        h.update(chunk);
        whole.update(chunk);
        await writeAll(out, chunk);
        done += chunk.length;
        opts.onProgress?.(done, total);
      }
      if (n !== f.size) throw new FleetError('FLEET_BUNDLE_CHANGED', `${sources[i]!.source} changed size while the bundle was built`);
      f.sha256 = h.digest('hex');
    }
    const { manifest, bytes } = encodeManifest({ ...fields, files: entries, payload: { size: payloadSize, sha256: whole.copy().digest('hex') } });
    const signatures = signManifest(bytes, opts.keys ?? []);
    const tail = encodeTail(bytes, signatures);
    whole.update(tail);
    await writeAll(out, tail);
    await out.sync();
    await out.close();
    await rename(tmp, opts.out);
    await syncDir(dirname(opts.out));
    ok = true;
    return { file: opts.out, manifest, manifestBytes: bytes, signatures, sha256: whole.digest('hex'), size: total + tail.length };
  } finally {
    if (!ok) {
      await out.close().catch(() => undefined);
      await rm(tmp, { force: true });
    }
  }
}

export interface BundleInfo {
  manifest: BundleManifest;
  manifestBytes: Buffer;
  signatures: SignatureEntry[];
  size: number;
  /** offset of the tail (lengths, manifest, signatures) = 16 + payload size */
  tailOffset: number;
}

/** Read a bundle's manifest and signatures without any trust decision (inspect, signBundle). */
export async function inspectBundle(file: string): Promise<BundleInfo> {
  let fh: FileHandle;
  try {
    fh = await open(file, 'r');
  } catch (err) {
    throw new FleetError('FLEET_BUNDLE_FORMAT', `cannot open bundle ${file}: ${(err as Error).message}`, { cause: err });
  }
  try {
    const head = await readHead(fh);
    const manifest = parseManifest(head.manifestBytes);
    return { manifest, manifestBytes: Buffer.from(head.manifestBytes), signatures: head.signatures, size: head.size, tailOffset: head.layout.tailOffset };
  } finally {
    await fh.close();
  }
}

/**
 * Add signatures to an existing bundle (a signature by the same key replaces the old one). Only
 * the tail changes, but the file is still rewritten to a temp file and renamed, so a crash never
 * leaves a half-signed bundle.
 */
export async function signBundle(file: string, keys: readonly KeyObject[], onProgress?: (done: number, total: number) => void): Promise<{ signatures: SignatureEntry[]; sha256: string; size: number }> {
  const info = await inspectBundle(file);
  const added = signManifest(info.manifestBytes, keys);
  const byId = new Map(info.signatures.map((s) => [s.keyid, s]));
  for (const s of added) byId.set(s.keyid, s);
  const signatures = [...byId.values()];
  const tail = encodeTail(info.manifestBytes, signatures);
  const total = info.tailOffset + tail.length;
  const whole = createHash('sha256');
  const tmp = join(dirname(file), `.${basename(file)}.tmp-${process.pid}`);
  const src = await open(file, 'r');
  const out = await open(tmp, 'w', 0o644);
  let ok = false;
  try {
    let done = 0;
    for await (const chunk of readRange(src, 0, info.tailOffset)) {
      whole.update(chunk);
      await writeAll(out, chunk);
      done += chunk.length;
      onProgress?.(done, total);
    }
    whole.update(tail);
    await writeAll(out, tail);
    await out.sync();
    await out.close();
    await rename(tmp, file);
    await syncDir(dirname(file));
    ok = true;
  } finally {
    await src.close();
    if (!ok) {
      await out.close().catch(() => undefined);
      await rm(tmp, { force: true });
    }
  }
  return { signatures, sha256: whole.digest('hex'), size: total };
}
