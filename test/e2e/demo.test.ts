import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { tempDir } from '../helpers.ts';
import { runDemoUntilOnline } from './demo-run.ts';

test('demo (from source): everything comes online, Ctrl-C stops it all with nothing left behind', { timeout: 150_000 }, async () => {
  const tmp = tempDir('fleetlet-demo-');
  try {
    const out = await runDemoUntilOnline(process.execPath, ['--import', 'tsx', join(process.cwd(), 'cli/main.ts')], join(tmp.dir, 'state'));
    assert.equal(out.summary.online, 22, out.output);
    assert.equal(out.exitCode, 130, 'interrupted exit code');
    assert.deepEqual(out.leftovers, [], 'processes left behind');
  } finally {
    tmp.cleanup();
  }
});
