import { test } from 'node:test';
import assert from 'node:assert/strict';
import { crc32, crc32Table } from '../../core/crc32.ts';
import { bytesFrom, fuzzSeed, rng } from '../helpers.ts';

test('crc32: the check value of CRC-32/IEEE, and native and table agree on random ranges', () => {
  // the standard check value: CRC-32 of "123456789"
  assert.equal(crc32(Buffer.from('123456789')), 0xcbf43926);
  assert.equal(crc32Table(Buffer.from('123456789')), 0xcbf43926);
  assert.equal(crc32(Buffer.alloc(0)), 0);
  const fuzz = fuzzSeed();
  const r = rng(fuzz);
  for (let i = 0; i < 200; i++) {
    const b = bytesFrom(r, 1 + r(5000));
    const start = r(b.length);
    const end = start + r(b.length - start + 1);
    assert.equal(crc32(b, start, end), crc32Table(b, start, end), `length ${b.length}, ${start}..${end} (FLEETLET_FUZZ_SEED=${fuzz})`);
  }
});
