import { closeSync, openSync, readFileSync, readSync, writeFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { parse as parseYaml } from 'yaml';
import { FleetError, isFleetError } from '../../core/errors.ts';
import {
  BUNDLE_KINDS,
  MAGIC,
  buildBundle,
  createRootBytes,
  inspectBundle,
  keyIdOf,
  loadTrustRoot,
  parseTrustRoot,
  signBundle,
  trustRootOfKeys,
  verifyBundle,
  type BundleKind,
  type BuildOptions,
  type TrustRoot,
} from '../../bundles/index.ts';
import { generateKeyFiles, loadPrivateKey, loadPublicKey, signBytes, verifyBytes } from '../../bundles/sign.ts';
import { defineCommand, EXIT, intFlag, strFlag } from '../command.ts';

function readInput(file: string): Buffer {
  try {
    return readFileSync(file);
  } catch (err) {
    throw new FleetError('FLEET_USAGE', `cannot read ${file}: ${(err as Error).message}`);
  }
}

/** True when `file` starts with the bundle magic; other files get detached signatures. */
function isBundleFile(file: string): boolean {
  let fd: number;
  try {
    fd = openSync(file, 'r');
  } catch (err) {
    throw new FleetError('FLEET_USAGE', `cannot read ${file}: ${(err as Error).message}`);
  }
  try {
    const b = Buffer.alloc(MAGIC.length);
    return readSync(fd, b, 0, b.length, 0) === b.length && b.equals(MAGIC);
  } finally {
    closeSync(fd);
  }
}

function list(values: Record<string, unknown>, name: string): string[] {
  const v = values[name];
  if (Array.isArray(v)) return v.filter((x): x is string => typeof x === 'string');
  return typeof v === 'string' ? [v] : [];
}

const MiB = 1024 * 1024;

/** Progress on stderr for large files: a rewritten line on a terminal, a line per 10% otherwise. */
function progressPrinter(label: string): (done: number, total: number) => void {
  const tty = process.stderr.isTTY === true;
  let lastAt = 0;
  let lastTenth = -1;
  const started = Date.now();
  return (done, total) => {
    if (total < 32 * MiB) return;
    const now = Date.now();
    const tenth = Math.floor((done / total) * 10);
    const mbps = done / MiB / Math.max(0.001, (now - started) / 1000);
    const line = `${label} ${(done / MiB).toFixed(0)}/${(total / MiB).toFixed(0)} MiB (${((done / total) * 100).toFixed(0)}%, ${mbps.toFixed(0)} MiB/s)`;
    if (tty) {
      if (now - lastAt >= 200 || done === total) {
        lastAt = now;
        process.stderr.write(`\r${line}${done === total ? '\n' : ''}`);
      }
    } else if (tenth !== lastTenth) {
      lastTenth = tenth;
      process.stderr.write(line + '\n');
    }
  };
}

function readManifestInput(file: string): Record<string, unknown> {
  const text = readInput(file).toString('utf8');
  try {
    const v: unknown = file.endsWith('.json') ? JSON.parse(text) : parseYaml(text);
    if (typeof v !== 'object' || v === null || Array.isArray(v)) throw new Error('expected an object');
    return v as Record<string, unknown>;
  } catch (err) {
    throw new FleetError('FLEET_BUNDLE_MANIFEST_INVALID', `${file}: ${(err as Error).message}`, { cause: err });
  }
}

function isoIn(days: number): string {
  return new Date(Date.now() + days * 86_400_000).toISOString().replace(/\.\d{3}Z$/, 'Z');
}

export const bundleCommand = defineCommand({
  name: 'bundle',
  summary: 'signed update bundles: keygen, root, build, sign, verify, inspect',
  usage: [
    'keygen --out BASE',
    '       root --pub K.pub... --threshold K --key K.key... [--root-version N] [--expires-days D] --out root.json',
    '       build --dir DIR --manifest M.yaml --out B.fltb [--key K.key...] [--sequence N] [--version V] [--expires-days D]',
    '       sign --key K.key... FILE            (a bundle gets its signature added; any other file a detached FILE.sig)',
    '       verify (--root root.json | --pub K.pub) FILE [--floor N] [--arch A] [--device-class C] [--agent-version V] [--kind K] [--extract DIR]',
    '       inspect FILE                          (shows the manifest and signatures without verifying them)',
  ].join('\n'),
  positionals: true,
  options: {
    out: { type: 'string' },
    key: { type: 'string', multiple: true },
    pub: { type: 'string', multiple: true },
    sig: { type: 'string' },
    root: { type: 'string' },
    threshold: { type: 'string' },
    'root-version': { type: 'string' },
    'expires-days': { type: 'string' },
    dir: { type: 'string' },
    manifest: { type: 'string' },
    sequence: { type: 'string' },
    version: { type: 'string' },
    floor: { type: 'string' },
    arch: { type: 'string' },
    'device-class': { type: 'string' },
    'agent-version': { type: 'string' },
    kind: { type: 'string' },
    extract: { type: 'string' },
    json: { type: 'boolean' },
  },
  help: {
    out: 'keygen: write BASE.key (0600) and BASE.pub; root/build: the file to write',
    key: 'private key (PEM, PKCS#8); repeat for several signers',
    pub: 'public key (PEM, SPKI); root: the root keys (repeat); verify: trust this one key (threshold 1)',
    sig: 'detached signature file for a non-bundle FILE (default FILE.sig)',
    root: 'verify: the trust root (root.json)',
    threshold: 'root: signatures needed (k of n)',
    'root-version': 'root: version of the new root (default 1; a rotation is the current version + 1)',
    'expires-days': 'root/build: expiry from now, in days (root default 365; build default 365 unless the manifest has expires)',
    dir: 'build: the directory whose regular files go in the bundle (no links)',
    manifest: 'build: manifest fields as YAML or JSON (name, kind, version, sequence, targets, app, expires)',
    sequence: 'build: override the manifest sequence',
    version: 'build: override the manifest version',
    floor: 'verify: refuse a sequence below this (the device floor)',
    arch: 'verify: check targets for this architecture (Node process.arch names)',
    'device-class': 'verify: check targets for this device class',
    'agent-version': 'verify: check targets for this agent version',
    kind: `verify: refuse another kind (${BUNDLE_KINDS.join(', ')})`,
    extract: 'verify: then extract into this new directory (must not exist)',
    json: 'print the result as JSON',
  },
  async run({ values, positionals }) {
    const [sub, ...rest] = positionals;
    const json = values.json === true;
    const print = (obj: Record<string, unknown>, text: string) => process.stdout.write(json ? JSON.stringify(obj) + '\n' : text + '\n');
    const file = () => {
      if (rest.length !== 1) throw new FleetError('FLEET_USAGE', `bundle ${sub}: exactly one FILE expected`);
      return rest[0]!;
    };
    const need = (name: string) => {
      const v = strFlag(values, name);
      if (!v) throw new FleetError('FLEET_USAGE', `bundle ${sub}: --${name} is required`);
      return v;
    };
    const needList = (name: string) => {
      const v = list(values, name);
      if (v.length === 0) throw new FleetError('FLEET_USAGE', `bundle ${sub}: --${name} is required`);
      return v;
    };
    switch (sub) {
      case 'keygen': {
        const files = generateKeyFiles(need('out'));
        const keyid = keyIdOf(loadPublicKey(files.publicFile));
        print({ ...files, keyid }, `wrote ${files.privateFile} (keep secret) and ${files.publicFile}; keyid ${keyid}`);
        return EXIT.OK;
      }
      case 'root': {
        const keys = needList('pub').map(loadPublicKey);
        const signers = needList('key').map(loadPrivateKey);
        const threshold = intFlag(values, 'threshold', 1, 64);
        if (threshold === undefined) throw new FleetError('FLEET_USAGE', 'bundle root: --threshold is required');
        const version = intFlag(values, 'root-version', 1) ?? 1;
        const bytes = createRootBytes({ version, expires: isoIn(intFlag(values, 'expires-days', 1, 36_500) ?? 365), threshold, keys, signers });
        const root = parseTrustRoot(bytes, 'new root'); // checks its own threshold
        const out = need('out');
        writeFileSync(out, bytes);
        print({ file: out, version: root.version, threshold: root.threshold, keys: [...root.keys.keys()] }, `wrote ${out}: root v${root.version}, ${root.threshold} of ${root.keys.size} keys`);
        return EXIT.OK;
      }
      case 'build': {
        const input = readManifestInput(need('manifest'));
        const seq = intFlag(values, 'sequence', 0);
        if (seq !== undefined) input.sequence = seq;
        const ver = strFlag(values, 'version');
        if (ver !== undefined) input.version = ver;
        const days = intFlag(values, 'expires-days', 1, 36_500);
        if (days !== undefined || input.expires === undefined) input.expires = isoIn(days ?? 365);
        if (input.targets === undefined) input.targets = {};
        const out = need('out');
        const built = await buildBundle({
          out,
          dir: need('dir'),
          manifest: input as BuildOptions['manifest'],
          keys: list(values, 'key').map(loadPrivateKey),
          onProgress: json ? undefined : progressPrinter('build'),
        });
        const m = built.manifest;
        print(
          { file: out, sha256: built.sha256, size: built.size, name: m.name, kind: m.kind, version: m.version, sequence: m.sequence, files: m.files.length, signatures: built.signatures.map((s) => s.keyid) },
          `wrote ${out}: ${m.kind} ${m.name} ${m.version} (sequence ${m.sequence}), ${m.files.length} files, ${built.size} bytes, ${built.signatures.length} signature(s), sha256 ${built.sha256}`,
        );
        return EXIT.OK;
      }
      case 'sign': {
        const f = file();
        const keys = needList('key').map(loadPrivateKey);
        if (isBundleFile(f)) {
          const r = await signBundle(f, keys, json ? undefined : progressPrinter('sign'));
          print({ file: f, signatures: r.signatures.map((s) => s.keyid), sha256: r.sha256, size: r.size }, `signed ${f}: ${r.signatures.length} signature(s) now, sha256 ${r.sha256}`);
          return EXIT.OK;
        }
        // any other file: a detached signature (64 raw bytes) over its exact bytes
        if (keys.length !== 1) throw new FleetError('FLEET_USAGE', 'bundle sign: a detached signature takes exactly one --key');
        const sigFile = strFlag(values, 'sig') ?? `${f}.sig`;
        writeFileSync(sigFile, signBytes(keys[0]!, readInput(f)));
        print({ file: f, signature: sigFile }, `signed ${f} → ${sigFile}`);
        return EXIT.OK;
      }
      case 'verify': {
        const f = file();
        const rootFile = strFlag(values, 'root');
        const pubs = list(values, 'pub');
        if (!isBundleFile(f)) {
          if (pubs.length !== 1) throw new FleetError('FLEET_USAGE', 'bundle verify: a detached signature is checked with exactly one --pub');
          const sigFile = strFlag(values, 'sig') ?? `${f}.sig`;
          verifyBytes(loadPublicKey(pubs[0]!), readInput(f), readInput(sigFile));
          print({ file: f, ok: true }, `ok: ${f} is signed by ${pubs[0]}`);
          return EXIT.OK;
        }
        let trust: TrustRoot;
        if (rootFile) trust = loadTrustRoot(rootFile);
        else if (pubs.length > 0) {
          // --pub: an ad-hoc root of these keys, threshold 1, for checking a bundle by hand
          trust = trustRootOfKeys(pubs.map(loadPublicKey), 1);
        } else throw new FleetError('FLEET_USAGE', 'bundle verify: --root (or --pub) is required');
        const kind = strFlag(values, 'kind');
        if (kind !== undefined && !(BUNDLE_KINDS as readonly string[]).includes(kind)) throw new FleetError('FLEET_USAGE', `--kind: expected one of ${BUNDLE_KINDS.join(', ')}`);
        const arch = strFlag(values, 'arch');
        const deviceClass = strFlag(values, 'device-class');
        const agentVersion = strFlag(values, 'agent-version');
        const device = arch !== undefined || deviceClass !== undefined || agentVersion !== undefined ? { arch: arch ?? process.arch, ...(deviceClass ? { deviceClass } : {}), ...(agentVersion ? { agentVersion } : {}) } : undefined;
        const extract = strFlag(values, 'extract');
        try {
          const v = await verifyBundle(f, { trust, floor: intFlag(values, 'floor', 0), device, kind: kind as BundleKind | undefined, onProgress: json ? undefined : progressPrinter('verify') });
          if (extract) await v.extractTo(resolve(extract), { onProgress: json ? undefined : progressPrinter('extract') });
          const m = v.manifest;
          print(
            { file: f, ok: true, sha256: v.sha256, size: v.size, name: m.name, kind: m.kind, version: m.version, sequence: m.sequence, signedBy: v.signedBy, ...(extract ? { extractedTo: resolve(extract) } : {}) },
            `ok: ${f}: ${m.kind} ${m.name} ${m.version} (sequence ${m.sequence}), signed by ${v.signedBy.length} trusted key(s), sha256 ${v.sha256}${extract ? `, extracted to ${resolve(extract)}` : ''}`,
          );
          return EXIT.OK;
        } catch (err) {
          if (json && isFleetError(err)) {
            print({ file: f, ok: false, error: err.toJSON() }, '');
          }
          throw err;
        }
      }
      case 'inspect': {
        const f = file();
        const info = await inspectBundle(f);
        const m = info.manifest;
        if (json) {
          print({ file: f, size: info.size, verified: false, manifest: m, signatures: info.signatures.map((s) => s.keyid) }, '');
          return EXIT.OK;
        }
        const lines = [
          `${f}: ${info.size} bytes (NOT verified: use \`fleetlet bundle verify\`)`,
          `  ${m.kind} ${m.name} ${m.version}, sequence ${m.sequence}`,
          `  created ${m.created}, expires ${m.expires}`,
          `  payload ${m.payload.size} bytes, sha256 ${m.payload.sha256} (of prefix + payload)`,
          `  targets: arch ${m.targets.arch.join(',') || 'any'}, device class ${m.targets.deviceClass.join(',') || 'any'}, agent ≥ ${m.targets.minAgentVersion ?? 'any'}`,
          ...(m.app ? [`  app: ${[m.app.command, ...m.app.args].join(' ')}`] : []),
          `  signatures (${info.signatures.length}): ${info.signatures.map((s) => s.keyid.slice(0, 16)).join(', ') || 'none'}`,
          `  files (${m.files.length}):`,
          ...m.files.map((x) => `    ${x.mode.toString(8).padStart(4, '0')} ${String(x.size).padStart(12)} ${x.sha256.slice(0, 16)} ${x.path}`),
        ];
        process.stdout.write(lines.join('\n') + '\n');
        return EXIT.OK;
      }
      default:
        throw new FleetError('FLEET_USAGE', sub ? `unknown bundle subcommand "${sub}"` : 'bundle: a subcommand is required (keygen, root, build, sign, verify, inspect)');
    }
  },
});
