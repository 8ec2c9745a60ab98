import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { closeSync, ftruncateSync, mkdirSync, openSync, readdirSync, readSync, statSync, writeFileSync, writeSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { isFleetError } from '../../core/errors.ts';
import { buildBundle, verifyBundle } from '../../bundles/index.ts';
import { tempDir } from '../helpers.ts';
import { makeRoot, newKeys, NOW } from './fixtures.ts';

const MiB = 1024 * 1024;

/**
 * A memory bound, not a speed assertion: a 200 MiB bundle (one sparse 192 MiB file with random
 * bytes at both ends, plus small files) verifies and extracts in a child process whose RSS stays
 * below 64 MiB above where it was once the API was loaded.
 */
test('a 200 MiB bundle verifies and extracts in bounded memory (RSS growth < 64 MiB)', async (t) => {
  const tmp = tempDir();
  try {
    const keys = newKeys(1);
    const { bytes: rootBytes } = makeRoot(keys, 1);
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

    // Measured in a fresh child process, so memory the build freed here cannot hide growth.
    writeFileSync(join(tmp.dir, 'root.json'), rootBytes);
    const script = [
      `import { loadTrustRoot, verifyBundle } from ${JSON.stringify(new URL('../../bundles/index.ts', import.meta.url).pathname)};`,
      'const [file, rootFile, stage, now] = process.argv.slice(-4);',
      'const trust = loadTrustRoot(rootFile);',
      'const start = process.memoryUsage().rss; let peak = start; let calls = 0;',
      'const sample = () => { peak = Math.max(peak, process.memoryUsage().rss); };',
      'const timer = setInterval(sample, 10);',
      'const v = await verifyBundle(file, { trust, now: Number(now), onProgress: () => { calls++; sample(); } });',
      'await v.extractTo(stage, { onProgress: sample });',
      'clearInterval(timer); sample();',
      'console.log(JSON.stringify({ start, peak, calls, sha256: v.sha256, size: v.size }));',
    ].join('\n');
    writeFileSync(join(tmp.dir, 'measure.mts'), script);
    const r = spawnSync(process.execPath, ['--import', 'tsx', join(tmp.dir, 'measure.mts'), out, join(tmp.dir, 'root.json'), join(tmp.dir, 'stage'), String(NOW)], { encoding: 'utf8', timeout: 120_000 });
    assert.equal(r.status, 0, r.stderr);
    const m = JSON.parse(r.stdout.trim().split('\n').at(-1)!) as { start: number; peak: number; calls: number; sha256: string; size: number };
    assert.equal(m.sha256, built.sha256);
    assert.equal(m.size, statSync(out).size);
    assert.ok(m.calls > 10, `progress was reported (${m.calls} calls)`);
    assert.equal(statSync(join(tmp.dir, 'stage', 'rootfs.img')).size, 192 * MiB);
    const growth = (m.peak - m.start) / MiB;
    t.diagnostic(`child RSS start ${(m.start / MiB).toFixed(1)} MiB, peak ${(m.peak / MiB).toFixed(1)} MiB, growth ${growth.toFixed(1)} MiB`);
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
