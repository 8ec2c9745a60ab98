import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Encoder } from 'cbor-x';
import { isFleetError } from '../../core/errors.ts';
import type { Sample } from '../../core/messages.ts';
import { mcuKey, signMcuMessage } from '../../firmware-bridge/auth.ts';
import { decodeCompact, decodeSenmlCbor, decodeTelemetry, encodeCompact, encodeSenmlCbor, sniffTelemetryFormat, telemetryFormatOf } from '../../firmware-bridge/codecs.ts';
import { decodeFwChunk, decodeFwChunkRequest, decodeMcuAck, decodeMcuCommand, decodeMcuHello, encodeFwChunk, encodeMcuCommand, frameWithMac, hasMacLine, splitMacLine } from '../../firmware-bridge/frames.ts';
import { encodeSenmlJson } from '../../firmware-bridge/senml.ts';
import { blockOptionValue, buildCoapPacket, parseBlockOption, parseCoapPacket } from '../../firmware-bridge/coap.ts';

const NOW = 1_700_000_100_000;
const decodeErr = (err: unknown) => isFleetError(err, 'FLEET_MCU_DECODE');

test('senml cbor: the RFC 8428 §6 example with integer labels and a half float decodes (docs example)', () => {
  const ex = Buffer.from('81a4216b65737033322d303030312f006b74656d7065726174757265016343656c02f94d60', 'hex');
  assert.equal(ex.length, 37);
  assert.equal(sniffTelemetryFormat(ex), 'senml+cbor');
  assert.deepEqual(decodeTelemetry(ex, 'sniff', { now: NOW }), [{ n: 'esp32-0001/temperature', t: NOW, v: 21.5, u: 'Cel' }]);
});

test('senml cbor: encode → decode round-trips, base fields carry forward, text labels accepted', () => {
  const samples: Sample[] = [
    { n: 'temperature', u: 'Cel', v: 21.37, t: 1_700_000_000_123 },
    { n: 'door', vb: true, t: 1_700_000_001_123 },
    { n: 'state', vs: 'idle', t: 1_700_000_000_123 },
  ];
  assert.deepEqual(decodeSenmlCbor(encodeSenmlCbor(samples)), samples);
  // bt -3 and bv -5 carried to the second record
  const m = (o: Array<[number | string, unknown]>) => new Map(o);
  const pack = new Encoder({ mapsAsObjects: false, useRecords: false }).encode([m([[-3, 1_700_000_000], [-5, 10], [0, 'a'], [2, 1]]), m([['n', 'b'], ['v', 2]])]);
  assert.deepEqual(decodeSenmlCbor(pack), [
    { n: 'a', t: 1_700_000_000_000, v: 11 },
    { n: 'b', t: 1_700_000_000_000, v: 12 },
  ]);
});

test('senml cbor: malformed, tagged, nested, oversized and vd input is FLEET_MCU_DECODE', () => {
  const enc = new Encoder({ mapsAsObjects: false, useRecords: false });
  const cases: Array<[string, Buffer]> = [
    ['not an array', Buffer.from(enc.encode(new Map([[0, 'a']])))],
    ['a tag', Buffer.from('81c1a200616102f94d60', 'hex')],
    ['nested array value', Buffer.from(enc.encode([new Map<number, unknown>([[0, 'a'], [2, [1, 2]]])]))],
    ['vd (bytes)', Buffer.from(enc.encode([new Map<number, unknown>([[0, 'a'], [8, Buffer.from('xx')]])]))],
    ['truncated', Buffer.from('81a2006161', 'hex')],
    ['trailing bytes', Buffer.concat([Buffer.from(enc.encode([new Map<number, unknown>([[0, 'a'], [2, 1]])])), Buffer.from([0])])],
    ['array length 2^32', Buffer.from('9affffffff', 'hex')],
    ['integer beyond 2^53', Buffer.from('81a2006161021bffffffffffffffff', 'hex')],
    ['duplicate label', Buffer.from('81a300616102010202', 'hex')],
    ['must-understand text label', Buffer.from(enc.encode([new Map<number | string, unknown>([[0, 'a'], [2, 1], ['x_', 1]])]))],
    ['too many records', Buffer.from(enc.encode(Array.from({ length: 300 }, () => new Map<number, unknown>([[0, 'a'], [2, 1]]))))],
    ['indefinite string', Buffer.from('81a2007f616161ff0201', 'hex')],
    // the same label written twice, once in a longer head: cbor-x kept the last value
    ['duplicate label, non-preferred head', Buffer.from('81a3006161020118020 5'.replace(/ /g, ''), 'hex')],
    ['duplicate text label, 1- and 2-byte heads', Buffer.from('81a30061616176017818017605'.replace('7818017605', '78017605'), 'hex')],
    ['text that is not UTF-8', Buffer.from('81a2006161 0362fffe'.replace(/ /g, ''), 'hex')],
    ['__proto__ text label (must-understand, as in JSON)', Buffer.from(enc.encode([new Map<number | string, unknown>([[0, 'a'], [2, 1], ['__proto__', 1]])]))],
  ];
  for (const [name, buf] of cases) assert.throws(() => decodeSenmlCbor(buf, { now: NOW }), decodeErr, name);
  // a vs of 1,000 three-byte characters (3,000 bytes) passes, as in JSON
  const euro = '€'.repeat(1000);
  assert.deepEqual(decodeSenmlCbor(Buffer.from(enc.encode([new Map<number, unknown>([[0, 'a'], [3, euro]])])), { now: NOW }), [{ n: 'a', t: NOW, vs: euro }]);
  // the docs example (no base name)
  assert.deepEqual(decodeSenmlCbor(Buffer.from('81a3006b74656d7065726174757265016343656c02f94d60', 'hex'), { now: NOW }), [{ n: 'temperature', t: NOW, v: 21.5, u: 'Cel' }]);
});

test('compact: the docs example (14 bytes) decodes with the hello sensor table; inline table; relative time', () => {
  const table = [
    ['temperature', 'Cel'],
    ['door', ''],
  ] as const;
  const ex = Buffer.from('f1016553f100000041ac00000106', 'hex');
  assert.equal(ex.length, 14);
  assert.equal(sniffTelemetryFormat(ex), 'compact');
  assert.deepEqual(decodeCompact(ex, { sensors: table }), [
    { n: 'temperature', t: 1_700_000_000_000, v: 21.5, u: 'Cel' },
    { n: 'door', t: 1_700_000_000_000, vb: true },
  ]);
  // without a table the index is unknown: the MCU must send its hello again
  assert.throws(() => decodeCompact(ex), (err: unknown) => decodeErr(err) && /not in the sensor table/.test((err as Error).message));
  const samples: Sample[] = [
    { n: 'temperature', u: 'Cel', v: 21.5, t: 1_700_000_000_000 },
    { n: 'temperature', u: 'Cel', v: -40, t: 1_700_000_060_000 },
    { n: 'door', vb: false, t: 1_700_000_000_000 },
    { n: 'temperature', u: 'Cel', v: 123456.789, t: 1_700_000_000_000 },
    { n: 'temperature', u: 'Cel', v: 70000, t: 1_700_000_000_000 },
  ];
  const inline = encodeCompact(samples, { table, inlineTable: true });
  assert.deepEqual(decodeCompact(inline), samples);
  // no clock: times relative to the gateway's now
  const rel = encodeCompact([{ n: 'door', vb: true, t: 0 }], { table, noClock: true });
  assert.deepEqual(decodeCompact(rel, { sensors: table, now: NOW }), [{ n: 'door', vb: true, t: NOW }]);
  // centi type 7: 2137 = 21.37
  assert.deepEqual(decodeCompact(Buffer.from('f10000070859', 'hex'), { sensors: table, now: NOW }), [{ n: 'temperature', v: 21.37, u: 'Cel', t: NOW }]);
  for (const [name, hex] of [
    ['bad magic', 'f2000000'],
    ['unknown flag', 'f104'],
    ['relative base time', 'f10100000001'],
    ['truncated value', 'f100000041'],
    ['unknown type', 'f1000009'],
    ['NaN', 'f10000007fc00000'],
    ['empty table', 'f10200'],
  ] as const) {
    assert.throws(() => decodeCompact(Buffer.from(hex, 'hex'), { sensors: table, now: NOW }), decodeErr, name);
  }
});

test('format negotiation: CoAP Content-Format numbers and names; MQTT first byte', () => {
  assert.equal(telemetryFormatOf(110), 'senml+json');
  assert.equal(telemetryFormatOf('application/senml+json'), 'senml+json');
  assert.equal(telemetryFormatOf(112), 'senml+cbor');
  assert.equal(telemetryFormatOf('application/senml+cbor'), 'senml+cbor');
  assert.equal(telemetryFormatOf(65001), 'compact');
  assert.equal(telemetryFormatOf(undefined), 'sniff');
  assert.equal(telemetryFormatOf(0), null);
  assert.equal(sniffTelemetryFormat(Buffer.from(' \n[{"n":"a","v":1}]')), 'senml+json');
  assert.equal(sniffTelemetryFormat(Buffer.from('{}')), null);
  assert.equal(sniffTelemetryFormat(Buffer.alloc(0)), null);
  const json = encodeSenmlJson([{ n: 'a', v: 1, t: NOW }]);
  assert.deepEqual(decodeTelemetry(json, 'sniff'), [{ n: 'a', v: 1, t: NOW }]);
  assert.throws(() => decodeTelemetry(Buffer.from('hello'), 'sniff'), decodeErr);
});

test('frames: MAC line, commands (MAC with the MCU key, replay by seq), acks, hello, firmware chunks', () => {
  const key = mcuKey('site-secret-for-tests-000000000000', 'esp-1');
  const framed = frameWithMac(key, 'esp-1', 't', 42, Buffer.from('[]'));
  assert.ok(hasMacLine(framed));
  const f = splitMacLine(framed);
  assert.equal(f.counter, '42');
  assert.equal(f.mac, signMcuMessage(key, 'esp-1', 't', 42, Buffer.from('[]')));
  assert.equal(f.payload.toString(), '[]');
  assert.throws(() => splitMacLine(Buffer.from('c=1&m=short\n[]')), (e: unknown) => isFleetError(e, 'FLEET_MCU_AUTH'));
  // only a whole well-formed first line is a MAC line: a log may start with c=
  for (const plain of ['c=3 wifi reconnect\nboot ok\n', 'c=1&m=short\n[]', 'c=', `c=1&m=${'A'.repeat(22)}`, `c=1&m=${'A'.repeat(22)}x\n`]) assert.equal(hasMacLine(Buffer.from(plain)), false, plain);
  assert.equal(hasMacLine(Buffer.from(`c=1&m=${'A'.repeat(22)}\n`)), true);
  // the shape of one, but not a valid one (a non-canonical MAC, a counter of 17 digits): taken as one, and refused (auth)
  for (const bad of [`c=1&m=${'A'.repeat(21)}B\n[]`, `c=${'1'.repeat(17)}&m=${'A'.repeat(22)}\n[]`]) {
    assert.equal(hasMacLine(Buffer.from(bad)), true, bad);
    assert.throws(() => splitMacLine(Buffer.from(bad)), (e: unknown) => isFleetError(e, 'FLEET_MCU_AUTH'), bad);
  }
  assert.equal(hasMacLine(framed.subarray(0)), true, 'a view into a larger buffer');

  // the docs' test vector (docs/mcu-protocol.md "Commands")
  const docKey = mcuKey('example-site-secret-do-not-use-0001', 'esp32-0001');
  assert.equal(encodeMcuCommand(docKey, 'esp32-0001', 7, { id: 'c-17', n: 'set-interval', a: { s: 60 }, x: 1700003600 }).toString(), 'c=7&m=D6-r_vAbM8zCfKAeYrEf5w\n{"id":"c-17","n":"set-interval","a":{"s":60},"x":1700003600}');
  const cmd = { id: 'c-1', n: 'reboot', a: { delay: 5 }, x: 1_700_003_600 };
  const frame = encodeMcuCommand(key, 'esp-1', 7, cmd);
  assert.match(frame.toString(), /^c=7&m=[A-Za-z0-9_-]{22}\n\{"id":"c-1"/);
  assert.deepEqual(decodeMcuCommand(key, 'esp-1', frame), { seq: 7, cmd });
  // another MCU's key, or a changed byte: refused
  assert.throws(() => decodeMcuCommand(mcuKey('site-secret-for-tests-000000000000', 'esp-2'), 'esp-1', frame), (e: unknown) => isFleetError(e, 'FLEET_MCU_AUTH'));
  const tampered = Buffer.from(frame);
  tampered[tampered.length - 3] ^= 1;
  assert.throws(() => decodeMcuCommand(key, 'esp-1', tampered), (e: unknown) => isFleetError(e, 'FLEET_MCU_AUTH'));

  assert.deepEqual(decodeMcuAck(Buffer.from('{"id":"c-1","ok":true,"r":{"x":1}}')), { id: 'c-1', ok: true, r: { x: 1 } });
  assert.deepEqual(decodeMcuAck(Buffer.from('{"id":"c-1","ok":false,"e":"nope","code":"X"}')), { id: 'c-1', ok: false, e: 'nope', code: 'X' });
  for (const bad of ['{"ok":true}', '{"id":"a","ok":1}', '[]', 'x', JSON.stringify({ id: 'a', ok: true, r: 'x'.repeat(2000) })]) assert.throws(() => decodeMcuAck(Buffer.from(bad)), decodeErr, bad);

  assert.deepEqual(decodeMcuHello(Buffer.from('{"fw":"1.4.2","boot":"ota","prev":"1.4.1","sleep":300,"sensors":[["temperature","Cel"],["door",""]]}')), {
    fw: '1.4.2',
    boot: 'ota',
    prev: '1.4.1',
    sleep: 300,
    sensors: [
      ['temperature', 'Cel'],
      ['door', ''],
    ],
  });
  // an empty table is no table (the report is not refused for it); hw, the board
  assert.deepEqual(decodeMcuHello(Buffer.from('{"fw":"1.0.0","boot":"power_on","sensors":[],"hw":"esp32-s3-devkitc-1"}')), { fw: '1.0.0', boot: 'power_on', hw: 'esp32-s3-devkitc-1' });
  for (const hw of ['', '-x', 'a b', 'x'.repeat(65), 7, 'é']) assert.throws(() => decodeMcuHello(Buffer.from(JSON.stringify({ fw: '1.0.0', boot: 'power_on', hw }))), decodeErr, String(hw));
  for (const bad of ['{"boot":"ota"}', '{"fw":"1","boot":"nap"}', '{"fw":"1","boot":"ota","sleep":-1}', '{"fw":"1","boot":"ota","sensors":[["a b",""]]}', '{"fw":"","boot":"ota"}']) assert.throws(() => decodeMcuHello(Buffer.from(bad)), decodeErr, bad);

  const image = Buffer.alloc(100, 7);
  const sha = Buffer.alloc(32, 0xab);
  const req = decodeFwChunkRequest(Buffer.from('{"n":3,"s":32}'));
  const chunk = decodeFwChunk(encodeFwChunk({ data: image, sha256: sha }, req));
  assert.deepEqual({ n: chunk.n, size: chunk.size, shaPrefix: chunk.shaPrefix, len: chunk.data.length }, { n: 3, size: 100, shaPrefix: 'abababababababab', len: 4 });
  assert.equal(decodeFwChunk(encodeFwChunk(null, req)).size, 0);
  assert.throws(() => decodeFwChunkRequest(Buffer.from('{"n":0,"s":8}')), decodeErr);
});

test('coap packet codec: build → parse round trip, Block options (RFC 7959 §2.2)', () => {
  const pkt = { type: 0, code: 2, messageId: 0x1234, token: Buffer.from([1, 2, 3]), options: [{ number: 11, value: Buffer.from('mcu') }, { number: 27, value: blockOptionValue({ num: 5, more: true, size: 64 }) }, { number: 292, value: Buffer.from([9]) }], payload: Buffer.from('hi') };
  const back = parseCoapPacket(buildCoapPacket(pkt));
  assert.deepEqual(back, pkt);
  assert.deepEqual(parseBlockOption(blockOptionValue({ num: 5, more: true, size: 64 })), { num: 5, more: true, size: 64 });
  assert.equal(parseBlockOption(Buffer.from([0x0f])), null);
  assert.equal(parseCoapPacket(Buffer.from([0x40, 1, 0, 0, 0xff])), null);
});
