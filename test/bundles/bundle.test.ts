import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, mkdirSync, openSync, readFileSync, readdirSync, statSync, truncateSync, writeFileSync, writeSync, closeSync, symlinkSync } from 'node:fs';
import { join } from 'node:path';
import { isFleetError, type ErrorCode } from '../../core/errors.ts';
import { buildBundle, encodePrefix, encodeTail, inspectBundle, signBundle, verifyBundle, type VerifyOptions } from '../../bundles/index.ts';
import { MAX_MANIFEST_BYTES } from '../../bundles/format.ts';
import { tempDir } from '../helpers.ts';
import { craftBundle, makeRoot, manifestFor, newKeys, NOW, payloadOf, sha256, type CraftFile } from './fixtures.ts';

const [k1, k2, k3, outsider] = newKeys(4);
const { root } = makeRoot([k1!, k2!, k3!], 2);
const signers = [k1!.privateKey, k2!.privateKey];

const FILES: CraftFile[] = [
  { path: 'bin/app', data: '#!/bin/sh\nexec sleep 1000\n', mode: 0o755 },
  { path: 'etc/app.conf', data: 'level=debug\n' },
  { path: 'empty', data: '' },
  { path: 'data/blob.bin', data: Buffer.alloc(300_000, 7) },
];
/** offset of the last payload byte (the payload is bytes [16, 16 + P) of the file) */
const LAST_PAYLOAD_BYTE = 16 + payloadOf(FILES).bytes.length - 1;

/** lengths of manifest and signatures (the 8 bytes after the payload) */
function lens(m: number, s: number): Buffer {
  const b = Buffer.alloc(8);
  b.writeUInt32BE(m, 0);
  b.writeUInt32BE(s, 4);
  return b;
}

/**
 * Verify, then extract into <releases>/new; on refusal assert the code and that nothing at all
 * was written into the releases directory (the install dir next to it is untouched).
 */
async function expectRefused(file: string, code: ErrorCode, opts: Partial<VerifyOptions> = {}, dir?: string): Promise<void> {
  const base = dir ?? join(file, '..');
  const releases = join(base, `releases-${code}`);
  mkdirSync(releases, { recursive: true });
  const install = join(base, 'install');
  mkdirSync(install, { recursive: true });
  writeFileSync(join(install, 'current.txt'), 'old version');
  await assert.rejects(
    (async () => {
      const v = await verifyBundle(file, { trust: root, now: NOW, ...opts });
      await v.extractTo(join(releases, 'new'));
    })(),
    (e: unknown) => {
      assert.ok(isFleetError(e, code), `expected ${code}, got ${isFleetError(e) ? e.code : String(e)}: ${String((e as Error).message)}`);
      return true;
    },
  );
  assert.deepEqual(readdirSync(releases), [], 'nothing left in the releases dir');
  assert.deepEqual(readdirSync(install), ['current.txt']);
  assert.equal(readFileSync(join(install, 'current.txt'), 'utf8'), 'old version');
}

test('a good bundle verifies, reports sha256 and size of the whole file, and extracts with modes', async () => {
  const tmp = tempDir();
  try {
    const src = join(tmp.dir, 'src');
    mkdirSync(join(src, 'bin'), { recursive: true });
    writeFileSync(join(src, 'bin/app'), '#!/bin/sh\necho hi\n', { mode: 0o755 });
    writeFileSync(join(src, 'README'), 'hello');
    const out = join(tmp.dir, 'app.fltb');
    const built = await buildBundle({
      out,
      dir: src,
      keys: signers,
      manifest: { name: 'demo', kind: 'app', version: '1.2.0', sequence: 7, expires: '2099-01-01T00:00:00Z', targets: { arch: ['x64', 'arm64'], deviceClass: ['pi4'], minAgentVersion: '0.1.0' }, app: { command: 'bin/app', args: ['--port', '8080'], env: { MODE: 'prod' } } },
    });
    const bytes = readFileSync(out);
    assert.equal(built.sha256, sha256(bytes));
    const progress: number[] = [];
    const v = await verifyBundle(out, { trust: root, floor: 7, now: NOW, kind: 'app', device: { arch: 'arm64', deviceClass: 'pi4', agentVersion: '0.1.0' }, onProgress: (d, t) => progress.push(d / t) });
    assert.equal(v.sha256, sha256(bytes));
    assert.equal(v.size, bytes.length);
    assert.equal(v.manifest.name, 'demo');
    assert.equal(v.manifest.app?.command, 'bin/app');
    assert.deepEqual(v.manifest.files.map((f) => f.path), ['README', 'bin/app']);
    assert.equal(v.signedBy.length, 2);
    assert.equal(progress.at(-1), 1);
    const stage = join(tmp.dir, 'releases', '7');
    mkdirSync(join(tmp.dir, 'releases'));
    await v.extractTo(stage);
    assert.equal(readFileSync(join(stage, 'bin/app'), 'utf8'), '#!/bin/sh\necho hi\n');
    assert.equal(statSync(join(stage, 'bin/app')).mode & 0o777, 0o755);
    assert.equal(statSync(join(stage, 'README')).mode & 0o777, 0o644);
    // a staging dir that exists is refused and left alone
    await assert.rejects(v.extractTo(stage), (e: unknown) => isFleetError(e, 'FLEET_BUNDLE_STAGING'));
    assert.equal(readFileSync(join(stage, 'README'), 'utf8'), 'hello');

    // a third signature added later keeps it valid; inspect shows it
    await signBundle(out, [k3!.privateKey]);
    const info = await inspectBundle(out);
    assert.equal(info.signatures.length, 3);
    assert.equal((await verifyBundle(out, { trust: root, now: NOW })).signedBy.length, 3);
  } finally {
    tmp.cleanup();
  }
});

test('equal sequence is accepted (re-install), lower is FLEET_BUNDLE_ROLLBACK', async () => {
  const tmp = tempDir();
  try {
    const f = join(tmp.dir, 'b.fltb');
    craftBundle(f, { files: FILES, signers });
    const v = await verifyBundle(f, { trust: root, now: NOW, floor: 5 });
    assert.equal(v.manifest.sequence, 5);
    await expectRefused(f, 'FLEET_BUNDLE_ROLLBACK', { floor: 6 });
  } finally {
    tmp.cleanup();
  }
});

test('refusals: each with its own code, nothing left in staging or install', async (t) => {
  const tmp = tempDir();
  const n = { i: 0 };
  const file = () => join(tmp.dir, `b${n.i++}.fltb`);
  try {
    await t.test('tampered payload byte → FLEET_BUNDLE_HASH', async () => {
      const f = file();
      const bytes = craftBundle(f, { files: FILES, signers });
      bytes[LAST_PAYLOAD_BYTE - 1000]! ^= 0x01;
      writeFileSync(f, bytes);
      await expectRefused(f, 'FLEET_BUNDLE_HASH');
    });
    await t.test('tampered payload in a file that is not the last one → FLEET_BUNDLE_HASH', async () => {
      const f = file();
      const bytes = craftBundle(f, { files: FILES, signers });
      const at = bytes.indexOf('exec sleep');
      bytes[at]! ^= 0x20;
      writeFileSync(f, bytes);
      await expectRefused(f, 'FLEET_BUNDLE_HASH');
    });
    await t.test('signed payload.sha256 that does not match the payload (file hashes right) → FLEET_BUNDLE_HASH', async () => {
      const f = file();
      craftBundle(f, { files: FILES, signers, manifest: manifestFor(FILES, { payload: { size: payloadOf(FILES).field.size, sha256: sha256('other') } }) });
      await expectRefused(f, 'FLEET_BUNDLE_HASH');
    });
    await t.test('signed payload.size or file sizes that disagree with the prefix → FORMAT / MANIFEST_INVALID', async () => {
      const f = file();
      const files = [{ path: 'a', data: 'abc' }];
      const m = manifestFor(files);
      craftBundle(f, { files: [{ path: 'a', data: 'abcd' }], signers, manifest: { ...m, payload: { size: 4, sha256: payloadOf([{ path: 'a', data: 'abcd' }]).field.sha256 } } });
      await expectRefused(f, 'FLEET_BUNDLE_MANIFEST_INVALID');
      const g = file();
      craftBundle(g, { files: [{ path: 'a', data: 'abcd' }], signers, manifest: m });
      await expectRefused(g, 'FLEET_BUNDLE_FORMAT');
    });
    await t.test('tampered manifest → FLEET_BUNDLE_BAD_SIGNATURE', async () => {
      const f = file();
      const bytes = craftBundle(f, { files: FILES, signers });
      const at = bytes.indexOf('"version":"1.0.0"') + '"version":"1.0.'.length;
      bytes[at] = '9'.charCodeAt(0);
      writeFileSync(f, bytes);
      await expectRefused(f, 'FLEET_BUNDLE_BAD_SIGNATURE');
    });
    await t.test('tampered signature → FLEET_BUNDLE_BAD_SIGNATURE', async () => {
      const f = file();
      const bytes = craftBundle(f, { files: FILES, signers });
      const at = bytes.indexOf('"sig":"') + 10;
      bytes[at] = bytes[at] === 0x61 ? 0x62 : 0x61;
      writeFileSync(f, bytes);
      await expectRefused(f, 'FLEET_BUNDLE_BAD_SIGNATURE');
    });
    await t.test('signed by a key outside the trust root → FLEET_BUNDLE_UNKNOWN_KEY', async () => {
      const f = file();
      craftBundle(f, { files: FILES, signers: [outsider!.privateKey] });
      await expectRefused(f, 'FLEET_BUNDLE_UNKNOWN_KEY');
    });
    await t.test('no signatures at all → FLEET_BUNDLE_UNKNOWN_KEY', async () => {
      const f = file();
      craftBundle(f, { files: FILES, signers: [] });
      await expectRefused(f, 'FLEET_BUNDLE_UNKNOWN_KEY');
    });
    await t.test('1 of 2 required signatures (the same key twice counts once) → FLEET_BUNDLE_THRESHOLD', async () => {
      const f = file();
      craftBundle(f, { files: FILES, signers: [k1!.privateKey, k1!.privateKey, outsider!.privateKey] });
      await expectRefused(f, 'FLEET_BUNDLE_THRESHOLD');
    });
    await t.test('expired → FLEET_BUNDLE_EXPIRED (injected clock)', async () => {
      const f = file();
      craftBundle(f, { files: FILES, signers, manifest: manifestFor(FILES, { expires: '2026-11-22T07:59:59Z' }) });
      await expectRefused(f, 'FLEET_BUNDLE_EXPIRED');
      await verifyBundle(f, { trust: root, now: Date.parse('2026-11-22T07:59:58Z') });
    });
    await t.test('trust root expired → FLEET_BUNDLE_ROOT_EXPIRED', async () => {
      const f = file();
      craftBundle(f, { files: FILES, signers });
      await expectRefused(f, 'FLEET_BUNDLE_ROOT_EXPIRED', { now: Date.parse('2099-01-01T00:00:00Z') });
    });
    await t.test('older sequence → FLEET_BUNDLE_ROLLBACK', async () => {
      const f = file();
      craftBundle(f, { files: FILES, signers, manifest: manifestFor(FILES, { sequence: 4 }) });
      await expectRefused(f, 'FLEET_BUNDLE_ROLLBACK', { floor: 5 });
    });
    await t.test('wrong arch, wrong device class, agent too old → FLEET_BUNDLE_TARGET', async () => {
      const f = file();
      craftBundle(f, { files: FILES, signers, manifest: manifestFor(FILES, { targets: { arch: ['arm64'], deviceClass: ['jetson'], minAgentVersion: '1.2.0' } }) });
      const good = { arch: 'arm64', deviceClass: 'jetson', agentVersion: '1.2.0' };
      await verifyBundle(f, { trust: root, now: NOW, device: good });
      await expectRefused(f, 'FLEET_BUNDLE_TARGET', { device: { ...good, arch: 'x64' } });
      await expectRefused(f, 'FLEET_BUNDLE_TARGET', { device: { ...good, deviceClass: 'pi4' } });
      await expectRefused(f, 'FLEET_BUNDLE_TARGET', { device: { arch: 'arm64', agentVersion: '1.2.0' } });
      await expectRefused(f, 'FLEET_BUNDLE_TARGET', { device: { ...good, agentVersion: '1.1.9' } });
      await expectRefused(f, 'FLEET_BUNDLE_TARGET', { device: { ...good, agentVersion: '1.2.0-rc.1' } });
    });
    await t.test('another kind than expected → FLEET_BUNDLE_KIND', async () => {
      const f = file();
      craftBundle(f, { files: FILES, signers });
      await expectRefused(f, 'FLEET_BUNDLE_KIND', { kind: 'agent' });
    });
    for (const [label, p] of [
      ['..', '../escape'],
      ['.. inside', 'bin/../../escape'],
      ['absolute', '/etc/passwd'],
      ['empty part', 'bin//app2'],
      ['dot part', './app2'],
      ['trailing slash', 'bin/'],
      ['backslash', '..\\escape'],
    ] as const) {
      await t.test(`path ${label} (${p}) → FLEET_BUNDLE_PATH, even validly signed`, async () => {
        const f = file();
        const files = [...FILES, { path: p, data: 'owned' }];
        craftBundle(f, { files, signers });
        await expectRefused(f, 'FLEET_BUNDLE_PATH');
        assert.equal(existsSync(join(tmp.dir, 'escape')), false);
      });
    }
    for (const type of ['symlink', 'link', 'hardlink', 'dir', 'fifo']) {
      await t.test(`entry of type ${type} → FLEET_BUNDLE_PATH`, async () => {
        const f = file();
        const files = [...FILES, { path: 'lnk', data: '/etc/passwd', type }];
        craftBundle(f, { files, signers });
        await expectRefused(f, 'FLEET_BUNDLE_PATH');
      });
    }
    await t.test('app command outside the install dir → FLEET_BUNDLE_PATH', async () => {
      const f = file();
      craftBundle(f, { files: FILES, signers, manifest: manifestFor(FILES, { kind: 'app', app: { command: '../../bin/sh', args: [], env: {} } }) });
      await expectRefused(f, 'FLEET_BUNDLE_PATH');
    });
    await t.test('duplicate paths, and a path that is both file and dir → FLEET_BUNDLE_DUPLICATE_PATH', async () => {
      const f = file();
      craftBundle(f, { files: [...FILES, { path: 'etc/app.conf', data: 'other' }], signers });
      await expectRefused(f, 'FLEET_BUNDLE_DUPLICATE_PATH');
      const g = file();
      craftBundle(g, { files: [...FILES, { path: 'bin/app/x', data: 'x' }], signers });
      await expectRefused(g, 'FLEET_BUNDLE_DUPLICATE_PATH');
    });
    await t.test('oversized manifest → FLEET_BUNDLE_MANIFEST_TOO_LARGE before reading it', async () => {
      const f = file();
      // the lengths claim 2 MiB; the file ends right after them: refused from the length alone
      writeFileSync(f, Buffer.concat([encodePrefix(0), lens(2 * MAX_MANIFEST_BYTES, 100)]));
      await expectRefused(f, 'FLEET_BUNDLE_MANIFEST_TOO_LARGE');
      const g = file();
      writeFileSync(g, Buffer.concat([encodePrefix(0), lens(MAX_MANIFEST_BYTES + 1, 2), Buffer.alloc(MAX_MANIFEST_BYTES + 3, 0x20)]));
      await expectRefused(g, 'FLEET_BUNDLE_MANIFEST_TOO_LARGE');
    });
    await t.test('truncated file (in the payload, in the manifest, in the header) → FLEET_BUNDLE_TRUNCATED', async () => {
      const f = file();
      const bytes = craftBundle(f, { files: FILES, signers });
      truncateSync(f, bytes.length - 1);
      await expectRefused(f, 'FLEET_BUNDLE_TRUNCATED');
      truncateSync(f, 200);
      await expectRefused(f, 'FLEET_BUNDLE_TRUNCATED');
      truncateSync(f, 10);
      await expectRefused(f, 'FLEET_BUNDLE_TRUNCATED');
    });
    await t.test('bytes after the last file, not a bundle, bad signatures block → FLEET_BUNDLE_FORMAT', async () => {
      const f = file();
      craftBundle(f, { files: FILES, signers, trailing: Buffer.from('extra') });
      await expectRefused(f, 'FLEET_BUNDLE_FORMAT');
      const g = file();
      writeFileSync(g, 'PK\x03\x04 this is a zip file, not a bundle');
      await expectRefused(g, 'FLEET_BUNDLE_FORMAT');
      const h = file();
      const m = Buffer.from('{"a":1}');
      writeFileSync(h, Buffer.concat([encodePrefix(0), lens(m.length, 5), m, Buffer.from('nope!')]));
      await expectRefused(h, 'FLEET_BUNDLE_FORMAT');
    });
    await t.test('non-canonical manifest bytes (validly signed) → FLEET_BUNDLE_MANIFEST_INVALID', async () => {
      const f = file();
      craftBundle(f, { files: FILES, signers, manifestText: JSON.stringify(manifestFor(FILES), null, 1) });
      await expectRefused(f, 'FLEET_BUNDLE_MANIFEST_INVALID');
      const g = file();
      // a duplicate key that a first-wins parser would read differently
      const text = JSON.stringify(manifestFor(FILES)).replace('"name":"demo"', '"name":"demo","name":"other"');
      craftBundle(g, { files: FILES, signers, manifestText: text });
      await expectRefused(g, 'FLEET_BUNDLE_MANIFEST_INVALID');
      const h = file();
      craftBundle(h, { files: FILES, signers, manifest: manifestFor(FILES, { kind: 'app' }) });
      await expectRefused(h, 'FLEET_BUNDLE_MANIFEST_INVALID');
    });
    await t.test('a bundle path given as a symlink is not followed → FLEET_BUNDLE_FORMAT', async () => {
      const f = file();
      craftBundle(f, { files: FILES, signers });
      const link = join(tmp.dir, 'link.fltb');
      symlinkSync(f, link);
      await expectRefused(link, 'FLEET_BUNDLE_FORMAT', {}, tmp.dir);
    });
  } finally {
    tmp.cleanup();
  }
});

test('the file swapped or changed after verify: extractTo refuses and removes what it wrote', async () => {
  const tmp = tempDir();
  try {
    const f = join(tmp.dir, 'b.fltb');
    const bytes = craftBundle(f, { files: FILES, signers });
    mkdirSync(join(tmp.dir, 'releases'));
    const stage = join(tmp.dir, 'releases', 'new');

    // a payload byte of the last file changes in place: earlier files were already written
    let v = await verifyBundle(f, { trust: root, now: NOW });
    const fd = openSync(f, 'r+');
    writeSync(fd, Buffer.from([bytes[LAST_PAYLOAD_BYTE]! ^ 1]), 0, 1, LAST_PAYLOAD_BYTE);
    closeSync(fd);
    await assert.rejects(v.extractTo(stage), (e: unknown) => isFleetError(e, 'FLEET_BUNDLE_HASH'));
    assert.deepEqual(readdirSync(join(tmp.dir, 'releases')), []);

    // the file is replaced by another validly signed bundle of the same size
    writeFileSync(f, bytes);
    v = await verifyBundle(f, { trust: root, now: NOW });
    const other = manifestFor(FILES, { version: '1.0.1' });
    craftBundle(join(tmp.dir, 'other.fltb'), { files: FILES, signers, manifest: other });
    writeFileSync(f, readFileSync(join(tmp.dir, 'other.fltb')));
    await assert.rejects(v.extractTo(stage), (e: unknown) => isFleetError(e, 'FLEET_BUNDLE_CHANGED'));
    assert.deepEqual(readdirSync(join(tmp.dir, 'releases')), []);

    // the staging dir's parent does not exist
    writeFileSync(f, bytes);
    v = await verifyBundle(f, { trust: root, now: NOW });
    await assert.rejects(v.extractTo(join(tmp.dir, 'nope', 'new')), (e: unknown) => isFleetError(e, 'FLEET_BUNDLE_STAGING'));
    await v.extractTo(stage);
    assert.equal(readFileSync(join(stage, 'data/blob.bin')).length, 300_000);
  } finally {
    tmp.cleanup();
  }
});

test('buildBundle refuses links and bad manifests before writing anything', async () => {
  const tmp = tempDir();
  try {
    const src = join(tmp.dir, 'src');
    mkdirSync(src);
    writeFileSync(join(src, 'a'), 'a');
    symlinkSync('/etc/passwd', join(src, 'passwd'));
    const out = join(tmp.dir, 'x.fltb');
    const manifest = { name: 'x', kind: 'config' as const, version: '1', sequence: 1, expires: '2099-01-01T00:00:00Z', targets: {} };
    await assert.rejects(buildBundle({ out, dir: src, manifest }), (e: unknown) => isFleetError(e, 'FLEET_BUNDLE_PATH'));
    await assert.rejects(buildBundle({ out, files: [{ path: '../a', source: join(src, 'a') }], manifest }), (e: unknown) => isFleetError(e, 'FLEET_BUNDLE_PATH'));
    await assert.rejects(buildBundle({ out, files: [{ path: 'a', source: join(src, 'a') }], manifest: { ...manifest, sequence: -1 } }), (e: unknown) => isFleetError(e, 'FLEET_BUNDLE_MANIFEST_INVALID'));
    assert.deepEqual(readdirSync(tmp.dir).sort(), ['src']);
    // prefix, payload and encodeTail of the manifest are exactly what buildBundle wrote
    const ok = await buildBundle({ out, files: [{ path: 'a', source: join(src, 'a') }], manifest, keys: signers });
    const info = await inspectBundle(out);
    assert.deepEqual(Buffer.concat([encodePrefix(1), Buffer.from('a'), encodeTail(info.manifestBytes, info.signatures)]), readFileSync(out));
    assert.equal(info.tailOffset, 17);
    assert.equal(ok.size, statSync(out).size);
  } finally {
    tmp.cleanup();
  }
});
