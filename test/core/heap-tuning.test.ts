import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { SERVER_HEAP_GROWING_PERCENT, tuneServerHeap } from '../../core/heap-tuning.ts';

test('heap tuning: an operator-given --heap-growing-percent (command line or NODE_OPTIONS, either spelling) is left alone', () => {
  assert.equal(tuneServerHeap(['--heap-growing-percent=50'], undefined), null);
  assert.equal(tuneServerHeap([], '--max-old-space-size=512 --heap_growing_percent=30'), null);
  assert.equal(tuneServerHeap(['--heap-growing-percent', '50'], undefined), null);
});

test('heap tuning: otherwise it is set at run time (in a child process, so this one keeps its defaults), under a flag name this V8 knows; its effect is measured by the bench, not here', () => {
  const out = execFileSync(process.execPath, ['--import', 'tsx', '-e', "import('./core/heap-tuning.ts').then((m) => { const r = m.tuneServerHeap([], ''); process.stdout.write(String(r)); })"], { cwd: new URL('../../', import.meta.url).pathname, timeout: 60_000 }).toString();
  assert.equal(out, String(SERVER_HEAP_GROWING_PERCENT));
  // a flag name V8 does not know would be ignored with a warning: check the name against this V8
  const help = execFileSync(process.execPath, ['--v8-options'], { timeout: 60_000 }).toString();
  assert.match(help, /--heap-growing-percent/);
});
