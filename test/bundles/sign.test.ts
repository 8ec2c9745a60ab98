import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import * as ed from '@noble/ed25519';
import { createHash, createPublicKey } from 'node:crypto';
import { isFleetError } from '../../core/errors.ts';
import { generateKeyFiles, loadPrivateKey, loadPublicKey, signBytes, verifyBytes } from '../../bundles/sign.ts';
import { tempDir } from '../helpers.ts';

ed.hashes.sha512 = (m: Uint8Array) => new Uint8Array(createHash('sha512').update(m).digest());

test('bundle signatures: sign/verify; a flipped byte, another key, a bad signature length are refused', () => {
  const tmp = tempDir();
  try {
    const a = generateKeyFiles(join(tmp.dir, 'a'));
    const b = generateKeyFiles(join(tmp.dir, 'b'));
    assert.equal(statSync(a.privateFile).mode & 0o777, 0o600);
    const data = Buffer.from('{"name":"app","seq":1}');
    const sig = signBytes(loadPrivateKey(a.privateFile), data);
    verifyBytes(loadPublicKey(a.publicFile), data, sig);
    const tampered = Buffer.from(data);
    tampered[3] ^= 1;
    const invalid = (e: unknown) => isFleetError(e, 'FLEET_SIGNATURE_INVALID');
    assert.throws(() => verifyBytes(loadPublicKey(a.publicFile), tampered, sig), invalid);
    assert.throws(() => verifyBytes(loadPublicKey(b.publicFile), data, sig), invalid);
    assert.throws(() => verifyBytes(loadPublicKey(a.publicFile), data, sig.subarray(0, 63)), invalid);
    writeFileSync(join(tmp.dir, 'junk.pub'), 'not a key');
    assert.throws(() => loadPublicKey(join(tmp.dir, 'junk.pub')), (e: unknown) => isFleetError(e, 'FLEET_KEY_INVALID'));

    // @noble/ed25519 (RFC 8032 rules, zip215 off) agrees with node:crypto
    const raw = createPublicKey(readFileSync(a.publicFile)).export({ format: 'der', type: 'spki' }).subarray(-32);
    assert.equal(ed.verify(sig, data, raw, { zip215: false }), true);
    assert.equal(ed.verify(sig, tampered, raw, { zip215: false }), false);
  } finally {
    tmp.cleanup();
  }
});

test('bundle CLI: keygen, sign, verify; openssl verifies our signature (interop)', () => {
  const tmp = tempDir();
  try {
    const cli = (...args: string[]) => spawnSync(process.execPath, ['--import', 'tsx', 'cli/main.ts', 'bundle', ...args], { encoding: 'utf8', timeout: 60_000 });
    assert.equal(cli('keygen', '--out', join(tmp.dir, 'k')).status, 0);
    const file = join(tmp.dir, 'manifest.json');
    writeFileSync(file, '{"v":1}');
    assert.equal(cli('sign', '--key', join(tmp.dir, 'k.key'), file).status, 0);
    const ok = cli('verify', '--pub', join(tmp.dir, 'k.pub'), file, '--json');
    assert.equal(ok.status, 0, ok.stderr);
    assert.deepEqual(JSON.parse(ok.stdout), { file, ok: true });
    writeFileSync(file, '{"v":2}');
    const bad = cli('verify', '--pub', join(tmp.dir, 'k.pub'), file);
    assert.equal(bad.status, 1);
    assert.match(bad.stderr, /FLEET_SIGNATURE_INVALID/);
    assert.equal(cli('frobnicate').status, 2);
    assert.equal(cli('sign', '--nope').status, 2);

    writeFileSync(file, '{"v":1}');
    const out = execFileSync('openssl', ['pkeyutl', '-verify', '-pubin', '-inkey', join(tmp.dir, 'k.pub'), '-rawin', '-in', file, '-sigfile', `${file}.sig`], { encoding: 'utf8' });
    assert.match(out, /Signature Verified Successfully/);
  } finally {
    tmp.cleanup();
  }
});
