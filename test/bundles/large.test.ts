import { test } from 'node:test';
import assert from 'node:assert/strict';
import { closeSync, ftruncateSync, mkdirSync, openSync, readdirSync, readSync, statSync, writeSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { isFleetError } from '../../core/errors.ts';
import { buildBundle, verifyBundle } from '../../bundles/index.ts';
import { tempDir } from '../helpers.ts';
import { makeRoot, newKeys, NOW } from './fixtures.ts';

const MiB = 1024 * 1024;

/**
 * A memory bound, not a speed assertion: a 200 MiB bundle (one sparse 192 MiB file with random
 * bytes at both ends, plus small files) verifies and extracts while the process RSS stays below
 * 64 MiB above where it started.
 */
test('a 200 MiB bundle verifies and extracts in bounded memory (RSS growth < 64 MiB)', async (t) => {
  const tmp = tempDir();
  try {
    const keys = newKeys(1);
    const { root } = makeRoot(keys, 1);
    const src = join(tmp.dir, 'src');
    mkdirSync(src);
    const big = join(src, 'rootfs.img');
    const fd = openSync(big, 'w');
    writeSync(fd, randomBytes(MiB), 0, MiB, 0);
    ftruncateSync(fd, 192 * MiB);
    writeSync(fd, randomBytes(MiB), 0, MiB, 191 * MiB);
    closeSync(fd);
    for (let i = 0; i < 8; i++) {
      const f = openSync(join(src, `part${i}.bin`), 'w');
      writeSync(f, randomBytes(MiB));
      closeSync(f);
    }
    const out = join(tmp.dir, 'big.fltb');
    const built = await buildBundle({ out, dir: src, keys: [keys[0]!.privateKey], manifest: { name: 'rootfs', kind: 'firmware', version: '2.0.0', sequence: 1, expires: '2099-01-01T00:00:00Z', targets: {} } });
    assert.ok(built.size > 200 * MiB);

    global.gc?.();
    const start = process.memoryUsage().rss;
    let peak = start;
    const timer = setInterval(() => {
      peak = Math.max(peak, process.memoryUsage().rss);
    }, 10);
    let calls = 0;
    try {
      const v = await verifyBundle(out, { trust: root, now: NOW, onProgress: () => { calls++; peak = Math.max(peak, process.memoryUsage().rss); } });
      assert.equal(v.sha256, built.sha256);
      assert.equal(v.size, statSync(out).size);
      await v.extractTo(join(tmp.dir, 'stage'), { onProgress: () => { peak = Math.max(peak, process.memoryUsage().rss); } });
    } finally {
      clearInterval(timer);
    }
    assert.ok(calls > 10, `progress was reported (${calls} calls)`);
    assert.equal(statSync(join(tmp.dir, 'stage', 'rootfs.img')).size, 192 * MiB);
    const growth = (peak - start) / MiB;
    t.diagnostic(`RSS start ${(start / MiB).toFixed(1)} MiB, peak ${(peak / MiB).toFixed(1)} MiB, growth ${growth.toFixed(1)} MiB`);
    assert.ok(growth < 64, `RSS grew by ${growth.toFixed(1)} MiB`);
  } finally {
    tmp.cleanup();
  }
});

test('a 40 MiB bundle (hash worker path) with one flipped payload byte is refused with FLEET_BUNDLE_HASH, nothing extracted', async () => {
  const tmp = tempDir();
  try {
    const keys = newKeys(1);
    const { root } = makeRoot(keys, 1);
    const src = join(tmp.dir, 'src');
    mkdirSync(src);
    for (let i = 0; i < 5; i++) {
      const f = openSync(join(src, `part${i}.bin`), 'w');
      writeSync(f, randomBytes(8 * MiB));
      closeSync(f);
    }
    const out = join(tmp.dir, 'b.fltb');
    const built = await buildBundle({ out, dir: src, keys: [keys[0]!.privateKey], manifest: { name: 'fw', kind: 'firmware', version: '1', sequence: 1, expires: '2099-01-01T00:00:00Z', targets: {} } });
    const v = await verifyBundle(out, { trust: root, now: NOW });
    assert.equal(v.sha256, built.sha256);
    const fd = openSync(out, 'r+');
    const one = Buffer.alloc(1);
    readSync(fd, one, 0, 1, built.size - 20 * MiB);
    one[0]! ^= 0x80;
    writeSync(fd, one, 0, 1, built.size - 20 * MiB);
    closeSync(fd);
    await assert.rejects(verifyBundle(out, { trust: root, now: NOW }), (e: unknown) => isFleetError(e, 'FLEET_BUNDLE_HASH'));
    mkdirSync(join(tmp.dir, 'releases'));
    await assert.rejects(v.extractTo(join(tmp.dir, 'releases', 'x')), (e: unknown) => isFleetError(e, 'FLEET_BUNDLE_HASH'));
    assert.deepEqual(readdirSync(join(tmp.dir, 'releases')), []);
  } finally {
    tmp.cleanup();
  }
});
