import { test } from 'node:test';
import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { isFleetError } from '../../core/errors.ts';
import { verifyBundle } from '../../bundles/index.ts';
import { rng, tempDir } from '../helpers.ts';
import { craftBundle, makeRoot, newKeys, NOW } from './fixtures.ts';


test('fuzz: 400 mutated bundles (flipped, overwritten, inserted, removed bytes, truncation) are each refused with a FLEET_BUNDLE_* code, never a crash', async () => {
  const tmp = tempDir();
  try {
    const keys = newKeys(2);
    const { root } = makeRoot(keys, 2); // every signature matters: any change must be refused
    const f = join(tmp.dir, 'good.fltb');
    const good = craftBundle(f, {
      files: [
        { path: 'bin/app', data: '#!/bin/sh\necho hi\n', mode: 0o755 },
        { path: 'a/b/c.txt', data: 'x'.repeat(5000) },
        { path: 'empty', data: '' },
      ],
      signers: keys.map((k) => k.privateKey),
    });
    await verifyBundle(f, { trust: root, now: NOW });
    const seed = 0x5eed1234;
    const r = rng(seed);
    const codes = new Map<string, number>();
    for (let i = 0; i < 400; i++) {
      let b = Buffer.from(good);
      const op = r(5);
      const at = r(b.length);
      if (op === 0) b[at]! ^= 1 << r(8);
      else if (op === 1) b[at] = (b[at]! + 1 + r(255)) & 0xff;
      else if (op === 2) b = Buffer.concat([b.subarray(0, at), Buffer.from([r(256)]), b.subarray(at)]);
      else if (op === 3) b = Buffer.concat([b.subarray(0, at), b.subarray(at + 1 + r(8))]);
      else b = b.subarray(0, at);
      const mf = join(tmp.dir, 'm.fltb');
      writeFileSync(mf, b);
      try {
        await verifyBundle(mf, { trust: root, now: NOW });
        assert.fail(`iteration ${i} (seed ${seed}, op ${op} at ${at}): a mutated bundle verified`);
      } catch (err) {
        assert.ok(isFleetError(err) && err.code.startsWith('FLEET_BUNDLE_'), `iteration ${i} (seed ${seed}, op ${op} at ${at}): ${String(err)}`);
        codes.set(err.code, (codes.get(err.code) ?? 0) + 1);
      }
    }
    // the mutations reach every layer of the format
    for (const c of ['FLEET_BUNDLE_HASH', 'FLEET_BUNDLE_BAD_SIGNATURE', 'FLEET_BUNDLE_TRUNCATED', 'FLEET_BUNDLE_FORMAT']) assert.ok(codes.has(c), `${c} never seen: ${JSON.stringify([...codes])}`);
  } finally {
    tmp.cleanup();
  }
});
