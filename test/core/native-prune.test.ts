import assert from 'node:assert/strict';
import { readdirSync, utimesSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { pruneNativeDir } from '../../core/native.ts';
import { tempDir } from '../helpers.ts';

/**
 * The native directory (<state-dir>/native) after binaries with other addons ran there:
 * real files in a temp dir. The addon in use stays; other binaries' addons go; temporary
 * files of extractions go only once they are old enough that no process can still be
 * writing them, and so do other addons (another binary may be between writing and loading
 * one); files that are not ours stay.
 */
test('pruneNativeDir removes other binaries’ addons and extraction leftovers older than 10 minutes, never the addon in use, a younger addon or .tmp (another process may be loading or writing it), or a file not its own', () => {
  const tmp = tempDir();
  try {
    const dir = tmp.dir;
    const current = join(dir, 'classic-level-48843c7375f755db.node');
    const files = {
      current,
      older: join(dir, 'classic-level-0123456789abcdef.node'),
      olderStill: join(dir, 'classic-level-fedcba9876543210.node'),
      staleTmp: join(dir, 'classic-level-0123456789abcdef.node.4242.tmp'),
      freshTmp: join(dir, 'classic-level-48843c7375f755db.node.4343.tmp'),
      notOurs: join(dir, 'notes.txt'),
      lookalike: join(dir, 'classic-level-xyz.node'),
    };
    for (const f of Object.values(files)) writeFileSync(f, 'x');
    const now = Date.now();
    const hourAgo = new Date(now - 3_600_000);
    for (const f of [files.staleTmp, files.older, files.olderStill]) utimesSync(f, hourAgo, hourAgo);
    // another binary's addon written a minute ago: it may be about to load it
    const young = join(dir, 'classic-level-aaaaaaaaaaaaaaaa.node');
    writeFileSync(young, 'x');
    const minuteAgo = new Date(now - 60_000);
    utimesSync(young, minuteAgo, minuteAgo);
    // an old mtime on the addon in use changes nothing: it is kept by name
    utimesSync(files.current, hourAgo, hourAgo);

    const removed = pruneNativeDir(dir, current, now);
    assert.deepEqual(removed.sort(), ['classic-level-0123456789abcdef.node', 'classic-level-0123456789abcdef.node.4242.tmp', 'classic-level-fedcba9876543210.node']);
    assert.deepEqual(readdirSync(dir).sort(), ['classic-level-48843c7375f755db.node', 'classic-level-48843c7375f755db.node.4343.tmp', 'classic-level-aaaaaaaaaaaaaaaa.node', 'classic-level-xyz.node', 'notes.txt']);
    // again: nothing more to do
    assert.deepEqual(pruneNativeDir(dir, current, now), []);
    // a directory that does not exist: nothing, no throw
    assert.deepEqual(pruneNativeDir(join(dir, 'missing'), current, now), []);
  } finally {
    tmp.cleanup();
  }
});
