import { test } from 'node:test';
import assert from 'node:assert/strict';
import { isFleetError } from '../../core/errors.ts';
import { SampleSchema, type Sample } from '../../core/messages.ts';
import { decodeSenmlJson, encodeSenmlJson, SENML_RELATIVE_TIME_LIMIT } from '../../firmware-bridge/senml.ts';
import { bytesFrom, fuzzSeed, rng } from '../helpers.ts';

const NOW = 1_700_000_000_000; // ms
const T0 = 1_700_000_100; // absolute Unix seconds (above 2^28)

test('senml: valid packs resolve base fields (RFC 8428 §4.6)', () => {
  const cases: Array<{ name: string; pack: unknown; want: Sample[] }> = [
    { name: 'one record, no time → now', pack: [{ n: 'temp', v: 21.5, u: 'Cel' }], want: [{ n: 'temp', v: 21.5, u: 'Cel', t: NOW }] },
    {
      name: 'base name + name, base time + time, absolute',
      pack: [{ bn: 'esp1:', bt: T0, n: 'temp', v: 1 }, { n: 'hum', t: 1.5, v: 2 }],
      want: [
        { n: 'esp1:temp', v: 1, t: T0 * 1000 },
        { n: 'esp1:hum', v: 2, t: T0 * 1000 + 1500 },
      ],
    },
    { name: 'relative time is an offset from now (§4.5.3)', pack: [{ n: 'x', v: 1, t: -10 }], want: [{ n: 'x', v: 1, t: NOW - 10_000 }] },
    { name: 'base unit carries forward, unit overrides', pack: [{ bu: '%RH', n: 'a', v: 1 }, { n: 'b', v: 2 }, { n: 'c', v: 3, u: 'Cel' }], want: [{ n: 'a', v: 1, u: '%RH', t: NOW }, { n: 'b', v: 2, u: '%RH', t: NOW }, { n: 'c', v: 3, u: 'Cel', t: NOW }] },
    { name: 'base value is added to value', pack: [{ bv: 100, n: 'a', v: 1 }, { n: 'b', v: -1 }], want: [{ n: 'a', v: 101, t: NOW }, { n: 'b', v: 99, t: NOW }] },
    { name: 'string and boolean values', pack: [{ n: 's', vs: 'on' }, { n: 'b', vb: false }], want: [{ n: 's', vs: 'on', t: NOW }, { n: 'b', vb: false, t: NOW }] },
    { name: 'bver 10 and unknown fields are fine (§4.4)', pack: [{ bver: 10, n: 'a', v: 0, foo: 'bar', ut: 5 }], want: [{ n: 'a', v: 0, t: NOW }] },
    { name: 'name from base name only', pack: [{ bn: 'urn:dev:mac:0024befffe804ff1', v: 3 }], want: [{ n: 'urn:dev:mac:0024befffe804ff1', v: 3, t: NOW }] },
    { name: 'empty pack', pack: [], want: [] },
  ];
  for (const c of cases) {
    const got = decodeSenmlJson(Buffer.from(JSON.stringify(c.pack)), { now: NOW });
    assert.deepEqual(got, c.want, c.name);
    for (const s of got) assert.ok(SampleSchema.safeParse(s).success, `${c.name}: output fits the fleet Sample schema`);
  }
});

test('senml: malformed input is refused with FLEET_MCU_DECODE and a clear message', () => {
  const long = 'a'.repeat(129);
  const cases: Array<{ name: string; payload: string | Buffer; match: RegExp; opts?: Parameters<typeof decodeSenmlJson>[1] }> = [
    { name: 'not JSON', payload: '[{"n":', match: /not JSON/ },
    { name: 'not UTF-8', payload: Buffer.from([0x5b, 0xff, 0xfe, 0x5d]), match: /UTF-8/ },
    { name: 'object instead of array', payload: '{"n":"a","v":1}', match: /must be an array/ },
    { name: 'record is not an object', payload: '[1]', match: /record 0: must be a map \(JSON object\)/ },
    { name: 'record is an array', payload: '[[]]', match: /record 0: must be a map \(JSON object\)/ },
    { name: 'too many records', payload: JSON.stringify(Array.from({ length: 3 }, () => ({ n: 'a', v: 1 }))), match: /3 records exceed the limit of 2/, opts: { maxRecords: 2 } },
    { name: 'too large', payload: JSON.stringify([{ n: 'a', vs: 'x'.repeat(200) }]), match: /exceeds 100/, opts: { maxBytes: 100 } },
    { name: 'no name', payload: '[{"v":1}]', match: /no name/ },
    { name: 'name too long', payload: JSON.stringify([{ n: long, v: 1 }]), match: /129 characters exceeds 128/ },
    { name: 'configured name limit', payload: JSON.stringify([{ n: 'abcdef', v: 1 }]), match: /exceeds 5/, opts: { maxNameLength: 5 } },
    { name: 'bad name characters', payload: '[{"n":"temp value","v":1}]', match: /characters outside/ },
    { name: 'name must start with letter or digit', payload: '[{"n":"-x","v":1}]', match: /characters outside/ },
    { name: 'no value', payload: '[{"n":"a"}]', match: /no value/ },
    { name: 'sum only', payload: '[{"n":"a","s":5}]', match: /no value/ },
    { name: 'two values', payload: '[{"n":"a","v":1,"vs":"x"}]', match: /more than one value/ },
    { name: 'data value', payload: '[{"n":"a","vd":"AAEC"}]', match: /"vd"/ },
    { name: 'must-understand field', payload: '[{"n":"a","v":1,"crit_":1}]', match: /must-understand field "crit_"/ },
    { name: 'newer SenML version', payload: '[{"bver":11,"n":"a","v":1}]', match: /unsupported SenML version 11/ },
    { name: 'string as number', payload: '[{"n":"a","v":"1"}]', match: /"v" must be a finite number/ },
    { name: 'overflow to Infinity', payload: '[{"n":"a","v":1e999}]', match: /"v" must be a finite number/ },
    { name: 'base time as string', payload: '[{"bt":"now","n":"a","v":1}]', match: /"bt" must be a finite number/ },
    { name: 'vb not boolean', payload: '[{"n":"a","vb":1}]', match: /"vb" must be a boolean/ },
    { name: 'bn not string', payload: '[{"bn":5,"n":"a","v":1}]', match: /"bn" must be a string/ },
    { name: 'string value too long', payload: JSON.stringify([{ n: 'a', vs: 'x'.repeat(1025) }]), match: /1025 characters exceeds 1024/ },
    { name: 'unit too long', payload: '[{"n":"a","v":1,"u":"abcdefghijklmnopq"}]', match: /unit/ },
    { name: 'time before the epoch', payload: JSON.stringify([{ n: 'a', v: 1, bt: -(NOW / 1000) - 100 }]), match: /time .* out of range/ },
    { name: 'time beyond year 9999', payload: JSON.stringify([{ n: 'a', v: 1, t: 1e15 }]), match: /out of range/ },
    { name: 'value + base value overflow', payload: '[{"bv":1.7e308,"n":"a","v":1.7e308}]', match: /overflows/ },
  ];
  for (const c of cases) {
    assert.throws(
      () => decodeSenmlJson(c.payload, { now: NOW, ...c.opts }),
      (err: unknown) => isFleetError(err, 'FLEET_MCU_DECODE') && c.match.test(err.message),
      c.name,
    );
  }
});

test('senml: the failing record is named in details', () => {
  try {
    decodeSenmlJson('[{"n":"a","v":1},{"n":"b"}]', { now: NOW });
    assert.fail('should throw');
  } catch (err) {
    assert.ok(isFleetError(err, 'FLEET_MCU_DECODE'));
    assert.deepEqual(err.details, { record: 1 });
  }
});

test('senml: encode → decode round-trips samples at ms precision', () => {
  const t = Date.UTC(2024, 4, 1, 12, 0, 0, 123);
  const samples: Sample[] = [
    { n: 'temperature', u: 'Cel', v: 21.37, t },
    { n: 'humidity', u: '%RH', v: 44.5, t: t + 1 },
    { n: 'door', vb: true, t: t + 999 },
    { n: 'fw', vs: '1.2.3', t: t + 60_001 },
  ];
  const wire = encodeSenmlJson(samples);
  assert.deepEqual(decodeSenmlJson(wire, { now: NOW }), samples);
  assert.deepEqual(decodeSenmlJson(encodeSenmlJson(samples, { baseName: 'esp-1:' }), { now: NOW }).map((s) => s.n), ['esp-1:temperature', 'esp-1:humidity', 'esp-1:door', 'esp-1:fw']);
  assert.equal(encodeSenmlJson([]).toString(), '[]');
  // absolute base time must stay above the relative-time threshold
  const first = (JSON.parse(wire.toString()) as Array<{ bt: number }>)[0]!;
  assert.ok(first.bt >= SENML_RELATIVE_TIME_LIMIT);
});

test('senml fuzz: random bytes and mutated packs only ever throw FLEET_MCU_DECODE', () => {
  const seed = JSON.stringify([{ bn: 'esp:', bt: T0, bu: 'Cel', n: 'temp', v: 21.5 }, { n: 'hum', u: '%RH', v: 40, t: 1 }, { n: 'on', vb: true }, { n: 'fw', vs: '1.0' }]);
  const alphabet = '[]{}",:0123456789.-+eE tfnulrabsvdu_\\';
  let thrown = 0;
  let decoded = 0;
  const check = (input: Buffer | string) => {
    try {
      const out = decodeSenmlJson(input, { now: NOW, maxRecords: 64 });
      decoded++;
      for (const s of out) assert.ok(SampleSchema.safeParse(s).success, `decoded sample fits the schema: ${JSON.stringify(s)}`);
    } catch (err) {
      thrown++;
      if (!isFleetError(err, 'FLEET_MCU_DECODE')) throw new Error(`non-FleetError for input ${JSON.stringify(String(input).slice(0, 200))} (FLEETLET_FUZZ_SEED=${fuzz}): ${String(err)}`);
    }
  };
  const fuzz = fuzzSeed();
  const r = rng(fuzz);
  for (let i = 0; i < 2000; i++) check(bytesFrom(r, r(64)));
  for (let i = 0; i < 5000; i++) {
    const chars = seed.split('');
    const edits = 1 + r(4);
    for (let e = 0; e < edits; e++) {
      const at = r(chars.length);
      const op = r(10);
      const ch = alphabet[r(alphabet.length)]!;
      if (op < 4) chars[at] = ch;
      else if (op < 7) chars.splice(at, 1);
      else chars.splice(at, 0, ch);
    }
    check(chars.join(''));
  }
  // deep nesting and big numbers are handled, not crashed on
  check('['.repeat(5000) + ']'.repeat(5000));
  check(`[{"n":"a","v":${'9'.repeat(400)}}]`);
  assert.ok(thrown > 0 && decoded > 0, `both outcomes exercised (thrown ${thrown}, decoded ${decoded})`);
});
