import { test } from 'node:test';
import assert from 'node:assert/strict';
import { coapAuthQuery, coapPath, COAP_OPTION, parseCoapUrl, scanCoapDatagram } from '../../firmware-bridge/coap.ts';
import { mcuMayPublish, mcuMaySubscribe, mcuTopic, parseMcuTopic } from '../../firmware-bridge/topics.ts';
import { bytesFrom, fuzzSeed, rng } from '../helpers.ts';

test('topics: MCU topic layout and ACL predicates', () => {
  assert.equal(mcuTopic('esp-1', 't'), 'mcu/v1/esp-1/t');
  assert.throws(() => mcuTopic('a/b', 't'), /invalid device id/);
  assert.deepEqual(parseMcuTopic('mcu/v1/esp-1/t'), { mcuId: 'esp-1', channel: 't', direction: 'up' });
  assert.deepEqual(parseMcuTopic('mcu/v1/esp-1/cmd'), { mcuId: 'esp-1', channel: 'cmd', direction: 'down' });
  for (const t of ['mcu/v1/esp-1', 'mcu/v1/esp-1/x', 'mcu/v1/esp-1/t/extra', 'mcu/v2/esp-1/t', 'mcu/v1/+/t', 'fleet/v1/d/esp-1/telemetry', '']) assert.equal(parseMcuTopic(t), null, t);
  const pub: Array<[string, string, boolean]> = [
    ['esp-1', 'mcu/v1/esp-1/t', true],
    ['esp-1', 'mcu/v1/esp-2/t', false],
    ['esp-1', 'mcu/v1/esp-1/cmd', false], // down channel: the gateway's, not the MCU's
    ['esp-1', 'fleet/v1/d/esp-1/telemetry', false],
  ];
  for (const [id, topic, want] of pub) assert.equal(mcuMayPublish(id, topic), want, `publish ${id} ${topic}`);
  const sub: Array<[string, string, boolean]> = [
    ['esp-1', 'mcu/v1/esp-1/cmd', true],
    ['esp-1', 'mcu/v1/esp-1/#', true],
    ['esp-1', 'mcu/v1/esp-1/t', false],
    ['esp-1', 'mcu/v1/esp-2/cmd', false],
    ['esp-1', 'mcu/v1/+/cmd', false],
    ['esp-1', 'mcu/v1/#', false],
    ['esp-1', '#', false],
  ];
  for (const [id, filter, want] of sub) assert.equal(mcuMaySubscribe(id, filter), want, `subscribe ${id} ${filter}`);
});

test('coap: paths and auth query parse back; duplicates and strays are refused', () => {
  assert.equal(coapPath('esp-1', 't'), '/mcu/v1/esp-1/t');
  assert.deepEqual(parseCoapUrl(`${coapPath('esp-1', 't')}?${coapAuthQuery(5, 'abc')}`), { mcuId: 'esp-1', resource: 't', counter: '5', mac: 'abc' });
  assert.deepEqual(parseCoapUrl('/mcu/v1/esp-1/t'), { mcuId: 'esp-1', resource: 't', counter: null, mac: null });
  assert.deepEqual(parseCoapUrl('/mcu/v1/esp-1/t?c=1&c=2&m=x'), { mcuId: 'esp-1', resource: 't', counter: null, mac: 'x' });
  for (const u of ['/', '/mcu/v1/esp-1', '/mcu/v1/esp-1/fwreq', '/mcu/v1/esp-1/nope', '/mcu/v1/bad id/t', '/x/v1/esp-1/t', '/mcu/v1/esp-1/t/more', '/' + 'a'.repeat(600)]) assert.equal(parseCoapUrl(u), null, u);
});

/** A raw CoAP request: CON POST with Uri-Path "x", optionally Block1, and a payload. */
function datagram(block1: boolean): Buffer {
  const parts = [0x40, 0x02, 0x12, 0x34, 0xb1, 0x78];
  if (block1) parts.push(0xd3, 0x03, 0xff, 0xff, 0xf6); // option 27 (delta 16 = 13 + 3), 3 bytes
  parts.push(0xff, 0x68, 0x69);
  return Buffer.from(parts);
}

test('coap: the datagram scan finds options (RFC 7252 §3) and rejects malformed headers', () => {
  assert.deepEqual(scanCoapDatagram(datagram(false)), { type: 0, code: '0.02', options: [COAP_OPTION.URI_PATH], payloadLength: 2 });
  assert.deepEqual(scanCoapDatagram(datagram(true))?.options, [COAP_OPTION.URI_PATH, COAP_OPTION.BLOCK1]);
  assert.deepEqual(scanCoapDatagram(Buffer.from([0x60, 0x00, 0x00, 0x01])), { type: 2, code: '0.00', options: [], payloadLength: 0 }); // empty ACK
  const bad: Array<[string, number[]]> = [
    ['too short', [0x40, 0x02]],
    ['version 2', [0x80, 0x02, 0, 1]],
    ['token length 9', [0x49, 0x02, 0, 1, 1, 2, 3, 4, 5, 6, 7, 8, 9]],
    ['token longer than datagram', [0x48, 0x02, 0, 1, 1]],
    ['payload marker without payload', [0x40, 0x02, 0, 1, 0xff]],
    ['option length past the end', [0x40, 0x02, 0, 1, 0xb5, 0x78]],
    ['reserved delta 15', [0x40, 0x02, 0, 1, 0xf1, 0x78]],
    ['extended delta missing', [0x40, 0x02, 0, 1, 0xd1]],
  ];
  for (const [name, bytes] of bad) assert.equal(scanCoapDatagram(Buffer.from(bytes)), null, name);
});

test('coap fuzz: the scanner never throws on random or mutated datagrams', () => {
  const seed = datagram(true);
  const fuzz = fuzzSeed();
  const r = rng(fuzz);
  for (let i = 0; i < 20_000; i++) {
    let buf: Buffer;
    if (i % 2 === 0) buf = bytesFrom(r, r(40));
    else {
      buf = Buffer.from(seed);
      for (let e = 0; e < 3; e++) buf[r(buf.length)] = r(256);
    }
    const where = `${buf.toString('hex')} (FLEETLET_FUZZ_SEED=${fuzz})`;
    let info: ReturnType<typeof scanCoapDatagram>;
    assert.doesNotThrow(() => (info = scanCoapDatagram(buf)), where);
    if (info!) assert.ok(info.payloadLength <= buf.length && info.options.every((o) => o >= 0 && o <= 0xffff), where);
  }
});
