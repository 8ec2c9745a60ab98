import { test } from 'node:test';
import assert from 'node:assert/strict';
import { encodeSenmlJson } from '../../firmware-bridge/senml.ts';
import { encodeReadingSenmlJson, readingSamples, type Reading } from '../../esp32-sim/reading.ts';

test('reading: the simulator\'s one-string SenML JSON is byte for byte what encodeSenmlJson writes for the same samples', () => {
  // a fixed pseudo-random sequence (LCG), so a failure names a reproducible reading
  let x = 12345;
  const rnd = () => ((x = (x * 1103515245 + 12345) % 2 ** 31) / 2 ** 31);
  const edge: Reading[] = [
    { t: 1_700_000_000_000, temperature: 10, humidity: 20, rssi: -95, uptime: 0, seq: 1 },
    { t: 1_700_000_000_001, temperature: 35, humidity: 90, rssi: -30, uptime: 86_400 * 365, seq: 2 ** 31 },
    { t: 1_763_812_345_678, temperature: 21.07, humidity: 55.5, rssi: -61, uptime: 12, seq: 9_007_199_254_740_991 },
    { t: 999, temperature: 0.1 + 0.2, humidity: 1e-7, rssi: -0, uptime: 1e21, seq: 0 },
  ];
  const readings = [...edge];
  for (let i = 0; i < 20_000; i++) {
    readings.push({
      t: 1_700_000_000_000 + Math.floor(rnd() * 1e11),
      temperature: Math.round((10 + rnd() * 25) * 100) / 100,
      humidity: Math.round((20 + rnd() * 70) * 10) / 10,
      rssi: -30 - Math.round(rnd() * 65),
      uptime: Math.floor(rnd() * 1e7),
      seq: Math.floor(rnd() * 1e9),
    });
  }
  for (const r of readings) {
    const fast = encodeReadingSenmlJson(r);
    const ref = encodeSenmlJson(readingSamples(r));
    assert.ok(fast.equals(ref), `${JSON.stringify(r)}:\n${fast.toString()}\n${ref.toString()}`);
  }
});
