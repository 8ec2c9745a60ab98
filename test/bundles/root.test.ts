import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { isFleetError, type ErrorCode } from '../../core/errors.ts';
import { canonicalJson, createRootBytes, keyIdOf, loadTrustRoot, saveTrustRoot, updateTrustRoot, verifyBundle, verifyRootChain } from '../../bundles/index.ts';
import { tempDir } from '../helpers.ts';
import { craftBundle, FAR_FUTURE, makeRoot, manifestFor, newKeys, NOW } from './fixtures.ts';

const code = (c: ErrorCode) => (e: unknown) => {
  assert.ok(isFleetError(e, c), `expected ${c}, got ${isFleetError(e) ? e.code : String(e)}`);
  return true;
};

const [a, b, c, d, e] = newKeys(5);
const v1 = makeRoot([a!, b!, c!], 2);

function rootV2(signers: typeof a[], opts: { version?: number; threshold?: number; keys?: typeof a[] } = {}): Buffer {
  return createRootBytes({
    version: opts.version ?? 2,
    expires: FAR_FUTURE,
    threshold: opts.threshold ?? 2,
    keys: (opts.keys ?? [c!, d!, e!]).map((k) => k!.publicKey),
    signers: signers.map((k) => k!.privateKey),
  });
}

test('trust root: load, self-signature threshold, persistence', () => {
  const tmp = tempDir();
  try {
    const file = join(tmp.dir, 'root.json');
    writeFileSync(file, v1.bytes);
    const root = loadTrustRoot(file);
    assert.equal(root.version, 1);
    assert.equal(root.threshold, 2);
    assert.deepEqual([...root.keys.keys()].sort(), [a!, b!, c!].map((k) => keyIdOf(k!.publicKey)).sort());
    // signed by only one of its own keys: not a valid root
    writeFileSync(file, createRootBytes({ version: 1, expires: FAR_FUTURE, threshold: 2, keys: [a!.publicKey, b!.publicKey], signers: [a!.privateKey] }));
    assert.throws(() => loadTrustRoot(file), code('FLEET_BUNDLE_ROOT_THRESHOLD'));
    writeFileSync(file, '{"signed":{}}');
    assert.throws(() => loadTrustRoot(file), code('FLEET_BUNDLE_ROOT_INVALID'));
    assert.throws(() => loadTrustRoot(join(tmp.dir, 'missing.json')), code('FLEET_BUNDLE_ROOT_INVALID'));
    // a keyid that is not the hash of its key
    const parsed = JSON.parse(v1.bytes.toString()) as { signed: { keys: Record<string, unknown> } };
    const [id0] = Object.keys(parsed.signed.keys);
    parsed.signed.keys['0'.repeat(64)] = parsed.signed.keys[id0!];
    delete parsed.signed.keys[id0!];
    writeFileSync(file, JSON.stringify(parsed));
    assert.throws(() => loadTrustRoot(file), code('FLEET_BUNDLE_ROOT_INVALID'));

    saveTrustRoot(file, root);
    assert.deepEqual(readFileSync(file), v1.bytes);
    assert.equal(loadTrustRoot(file).version, 1);
  } finally {
    tmp.cleanup();
  }
});

test('root rotation: accepted with the old threshold and its own; refused otherwise', async () => {
  const tmp = tempDir();
  try {
    // rotate a, b out; c stays; d, e in. Signed by old a+b and new d+e (c counts for both).
    const good = rootV2([a!, b!, d!, e!]);
    const v2 = updateTrustRoot(v1.root, good);
    assert.equal(v2.version, 2);
    assert.equal(v2.keys.has(keyIdOf(a!.publicKey)), false);

    // c alone is in both roots: 1 old signature + 1 new → below both thresholds
    assert.throws(() => updateTrustRoot(v1.root, rootV2([c!, d!])), code('FLEET_BUNDLE_ROOT_THRESHOLD'));
    // old threshold met, new threshold not (only one new key signed)
    assert.throws(() => updateTrustRoot(v1.root, rootV2([a!, b!, d!], { threshold: 3 })), code('FLEET_BUNDLE_ROOT_THRESHOLD'));
    // new keys only: an attacker with new keys cannot rotate
    assert.throws(() => updateTrustRoot(v1.root, rootV2([d!, e!])), code('FLEET_BUNDLE_ROOT_THRESHOLD'));
    // one old key + the new ones
    assert.throws(() => updateTrustRoot(v1.root, rootV2([a!, d!, e!])), code('FLEET_BUNDLE_ROOT_THRESHOLD'));
    // versions must step by exactly one
    assert.throws(() => updateTrustRoot(v1.root, rootV2([a!, b!, d!, e!], { version: 3 })), code('FLEET_BUNDLE_ROOT_VERSION'));
    assert.throws(() => updateTrustRoot(v1.root, v1.bytes), code('FLEET_BUNDLE_ROOT_VERSION'));
    // a signature over other bytes: the signed part changed after signing
    const tampered = JSON.parse(good.toString()) as { signed: { expires: string } };
    tampered.signed.expires = '2100-01-01T00:00:00Z';
    assert.throws(() => updateTrustRoot(v1.root, Buffer.from(JSON.stringify(tampered))), code('FLEET_BUNDLE_ROOT_THRESHOLD'));

    // a chain v1 → v2 → v3 walks; skipping v2 does not
    const v3bytes = createRootBytes({ version: 3, expires: FAR_FUTURE, threshold: 1, keys: [e!.publicKey], signers: [d!.privateKey, e!.privateKey] });
    const v3 = verifyRootChain(v1.root, [good, v3bytes]);
    assert.equal(v3.version, 3);
    assert.throws(() => verifyRootChain(v1.root, [v3bytes]), code('FLEET_BUNDLE_ROOT_VERSION'));

    // after rotation, bundles by the removed keys are refused and by the new keys accepted
    const f = join(tmp.dir, 'b.fltb');
    const files = [{ path: 'x', data: 'x' }];
    craftBundle(f, { files, signers: [a!.privateKey, b!.privateKey] });
    await verifyBundle(f, { trust: v1.root, now: NOW });
    await assert.rejects(verifyBundle(f, { trust: v2, now: NOW }), code('FLEET_BUNDLE_UNKNOWN_KEY'));
    craftBundle(f, { files, signers: [d!.privateKey, e!.privateKey], manifest: manifestFor(files) });
    await verifyBundle(f, { trust: v2, now: NOW });
    // the persisted root is the exact accepted bytes
    const file = join(tmp.dir, 'root.json');
    saveTrustRoot(file, v2);
    assert.equal(loadTrustRoot(file).version, 2);
    assert.deepEqual(readFileSync(file), good);
    // signatures are over the canonical form of "signed"
    assert.ok(canonicalJson(v2.signed).startsWith('{"expires":'));
  } finally {
    tmp.cleanup();
  }
});

test('rotation works from an expired root (a device offline for years can catch up)', () => {
  const old = makeRoot([a!, b!], 2, 1, '2020-01-01T00:00:00Z');
  const next = createRootBytes({ version: 2, expires: FAR_FUTURE, threshold: 1, keys: [c!.publicKey], signers: [a!.privateKey, b!.privateKey, c!.privateKey] });
  assert.equal(updateTrustRoot(old.root, next).version, 2);
});
