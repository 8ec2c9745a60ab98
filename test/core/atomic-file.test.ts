import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync, readdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
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
      // the rename cannot happen (the target is a directory that is not empty): the data was
      // written to the temp file first, which must go, and the target must stay as it was
      const taken = join(tmp.dir, 'state', 'taken');
      mkdirSync(join(taken, 'inner'), { recursive: true });
      await assert.rejects(async () => write(taken, 'z'.repeat(1024 * 1024)), /EISDIR|ENOTEMPTY|EEXIST/);
      assert.deepEqual(readdirSync(taken), ['inner'], 'the target is intact');
      assert.deepEqual(readdirSync(join(tmp.dir, 'state')).sort(), ['taken', 'x.json'], 'no temp file left after the failure');
      assert.equal(readFileSync(file, 'utf8'), big, 'the other file is untouched');
    } finally {
      tmp.cleanup();
    }
  });
}

test('atomic file: temp files left by crashed writers of the same file are removed at the first write; a live writer’s and other files’ are kept', async () => {
  const tmp = tempDir();
  try {
    for (const [name, write] of [
      ['sync.json', async (f: string, d: string) => writeFileAtomicSync(f, d)],
      ['async.json', (f: string, d: string) => writeFileAtomic(f, d)],
    ] as const) {
      const file = join(tmp.dir, name);
      // a pid above Linux's pid_max (2^22) is no process; the parent (the test runner) is alive
      const dead = `${name}.9999999.tmp`;
      const live = `${name}.${process.ppid}.tmp`;
      for (const f of [dead, live, 'other.json.9999999.tmp', `${name}.notapid.tmp`]) writeFileSync(join(tmp.dir, f), 'left over');
      await write(file, 'x');
      const left = readdirSync(tmp.dir);
      assert.ok(!left.includes(dead), `${name}: a dead writer's temp file is removed`);
      assert.ok(left.includes(live), `${name}: a live writer's temp file is kept`);
      assert.ok(left.includes('other.json.9999999.tmp'), `${name}: another file's temp file is not this write's business`);
      assert.ok(left.includes(`${name}.notapid.tmp`), `${name}: a name that is not ours is kept`);
      assert.equal(readFileSync(file, 'utf8'), 'x');
    }
  } finally {
    tmp.cleanup();
  }
});
