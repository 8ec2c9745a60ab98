import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { writeFileAtomic, writeFileAtomicSync } from '../../core/atomic-file.ts';
import { tempDir } from '../helpers.ts';

for (const [name, write] of [
  ['writeFileAtomicSync', async (f: string, d: string, o?: Parameters<typeof writeFileAtomicSync>[2]) => writeFileAtomicSync(f, d, o)],
  ['writeFileAtomic', writeFileAtomic],
] as const) {
  test(`${name}: creates the directory (0700) and the file (0600), replaces a file whole, leaves no temp file; a write that cannot happen throws and keeps the old file`, async () => {
    const tmp = tempDir();
    try {
      const file = join(tmp.dir, 'state', 'x.json');
      await write(file, 'first');
      assert.equal(readFileSync(file, 'utf8'), 'first');
      assert.equal(statSync(file).mode & 0o777, 0o600);
      assert.equal(statSync(join(tmp.dir, 'state')).mode & 0o777, 0o700);
      const big = 'y'.repeat(3 * 1024 * 1024);
      await write(file, big, { mode: 0o640, syncDir: true });
      assert.equal(readFileSync(file, 'utf8'), big);
      assert.equal(statSync(file).mode & 0o777, 0o640);
      assert.deepEqual(readdirSync(join(tmp.dir, 'state')), ['x.json'], 'no temp file left');
      // the target's directory is a file: nothing can be written, the error says so
      const blocked = join(tmp.dir, 'plain');
      writeFileSync(blocked, 'keep');
      await assert.rejects(async () => write(join(blocked, 'x.json'), 'z'), /ENOTDIR|EEXIST/);
      assert.equal(readFileSync(blocked, 'utf8'), 'keep');
      assert.equal(readFileSync(file, 'utf8'), big, 'the earlier file is intact');
    } finally {
      tmp.cleanup();
    }
  });
}
