import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { encodeGatewayState, encodeGatewayStateNow, loadGatewayState, saveGatewayStateAsync, type GatewayStateSource } from '../../gateway/state.ts';
import type { McuMeta } from '../../gateway/relay.ts';
import { tempDir, testLogger } from '../helpers.ts';

// The gateway's state file (mcu-state.json) is encoded in chunks, a turn of the event loop
// between them (gateway/state.ts encodeGatewayState); the file must be what JSON.stringify of
// the whole state gives, and load back the same.

function fleet(n: number): { ids: string[]; replay: Map<string, [number, number]>; meta: Map<string, McuMeta>; floors: Map<string, number> } {
  const ids = Array.from({ length: n }, (_, i) => `esp32-${String(i).padStart(5, '0')}`);
  const replay = new Map(ids.map((id, i) => [id, [1000 + i, 0xffffffff - i] as [number, number]]));
  const meta = new Map(ids.filter((_, i) => i % 3 === 0).map((id, i): [string, McuMeta] => [id, { fw: `1.${i}.0`, boot: String(i), sleepS: i % 60 }]));
  // forgotten MCUs' counter floors
  const floors = new Map(Array.from({ length: Math.floor(n / 5) }, (_, i): [string, number] => [`gone-${i}`, 1_700_000_000_000 + i]));
  return { ids, replay, meta, floors };
}

const sourceOf = (f: ReturnType<typeof fleet>): GatewayStateSource => ({ mcus: () => f.ids[Symbol.iterator](), replay: () => f.replay.entries(), meta: () => f.meta.entries(), floors: () => f.floors.entries() });

for (const n of [0, 1, 499, 500, 501, 2345]) {
  test(`gateway state: ${n} MCUs encoded in chunks (and at once) give exactly JSON.stringify of the whole state`, async () => {
    const f = fleet(n);
    const text = await encodeGatewayState(sourceOf(f));
    assert.equal(text, JSON.stringify({ v: 1, mcus: f.ids, replay: Object.fromEntries(f.replay), meta: Object.fromEntries(f.meta), floors: Object.fromEntries(f.floors) }));
    assert.equal(encodeGatewayStateNow(sourceOf(f)), text, 'the synchronous encoding (at stop) is the same');
  });
}

test('gateway state: the encoding lets the event loop run between chunks, and the file written loads back the same', async () => {
  const f = fleet(2000);
  let turns = 0;
  let stop = false;
  const spin = () => {
    if (stop) return;
    turns++;
    setImmediate(spin);
  };
  setImmediate(spin);
  const text = await encodeGatewayState(sourceOf(f), 500);
  stop = true;
  // 2000 MCU ids, 2000 replay entries, 667 metas and 400 floors, 500 at a time: at least 9 turns in between
  assert.ok(turns >= 9, `other work ran in ${turns} turns during the encoding`);
  const tmp = tempDir();
  try {
    const file = join(tmp.dir, 'gw', 'mcu-state.json');
    await saveGatewayStateAsync(file, text);
    assert.equal(readFileSync(file, 'utf8'), text);
    const loaded = loadGatewayState(file, testLogger('gw'));
    assert.deepEqual(loaded.mcus, f.ids);
    assert.deepEqual(loaded.replay, Object.fromEntries(f.replay));
    assert.deepEqual(loaded.meta, Object.fromEntries(f.meta));
    assert.deepEqual(loaded.floors, Object.fromEntries(f.floors));
  } finally {
    tmp.cleanup();
  }
});
