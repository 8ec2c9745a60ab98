import assert from 'node:assert/strict';
import { connect, type Socket } from 'node:net';
import { test } from 'node:test';
import mqttPacket from 'mqtt-packet';
import { mqttFrame } from '../../core/mqtt-wire.ts';
import { waitFor } from '../helpers.ts';
import { leanRig, type LeanRig } from './lean-rig.ts';

/**
 * gateway/mqtt-lean.ts against MQTT 3.1.1 (OASIS 2014) where review s17 F7 found it off:
 * raw bytes, built here by hand (mqtt-packet refuses to generate most of them), over real
 * sockets on 127.0.0.1 to a LeanMqttServer on port 0 (lean-rig.ts). Each test names the
 * clause it checks.
 */

/** An MQTT string or binary field: 2-byte length, then the bytes [MQTT-1.5.3]. */
const field = (x: string | Buffer): Buffer => {
  const b = Buffer.isBuffer(x) ? x : Buffer.from(x);
  return Buffer.concat([Buffer.from([b.length >> 8, b.length & 0xff]), b]);
};
const packet = mqttFrame;
/** CONNECT with the given connect flags (0x02 = clean session), keep-alive 60 s, and `extra` after the client id. */
const connectRaw = (flags: number, id: string | Buffer, extra: Buffer[] = [], proto = 'MQTT', level = 4): Buffer =>
  packet(0x10, Buffer.concat([field(proto), Buffer.from([level, flags, 0, 60]), field(id), ...extra]));
const publish0 = (topic: string | Buffer, payload: string): Buffer => packet(0x30, Buffer.concat([field(topic), Buffer.from(payload)]));
const subscribe = (pid: number, filters: string[]): Buffer => packet(0x82, Buffer.concat([Buffer.from([pid >> 8, pid & 0xff]), ...filters.map((f) => Buffer.concat([field(f), Buffer.from([1])]))]));
const unsubscribe = (pid: number, filters: string[]): Buffer => packet(0xa2, Buffer.concat([Buffer.from([pid >> 8, pid & 0xff]), ...filters.map((f) => field(f))]));

interface Rig extends LeanRig {
  /** CONNECTs handed to authenticate, and filters handed to onSubscribe */
  counts: { authenticated: number; subscribed: number };
}

/** The shared rig (immediate store), counting authenticate and onSubscribe calls. */
async function rig(): Promise<Rig> {
  const counts = { authenticated: 0, subscribed: 0 };
  const l = await leanRig({}, 0, () => ({
    authenticate: (c) => {
      counts.authenticated++;
      return { rc: 0, id: c.clientId };
    },
    onSubscribe: () => {
      counts.subscribed++;
      return 1;
    },
  }));
  return { ...l, counts };
}

/** Write `bytes`, then collect everything the server sends until it closes the connection or `until` holds. */
async function exchange(port: number, bytes: Buffer, until: (got: Buffer) => boolean = () => false): Promise<{ got: Buffer; closed: boolean }> {
  const s: Socket = connect({ port, host: '127.0.0.1' });
  s.on('error', () => undefined);
  let got = Buffer.alloc(0);
  let closed = false;
  const done = new Promise<void>((r) => {
    s.on('data', (d) => {
      got = Buffer.concat([got, d]);
      if (until(got)) r();
    });
    s.once('close', () => {
      closed = true;
      r();
    });
  });
  await new Promise<void>((r) => s.once('connect', () => r()));
  s.write(bytes);
  await done;
  s.destroy();
  return { got, closed };
}

const CONNACK_OK = '20020000';

test('mqtt-lean [MQTT-3.1.2-22]: a CONNECT with the password flag but not the user name flag is malformed: closed without a CONNACK, never authenticated', async () => {
  const l = await rig();
  try {
    const r = await exchange(l.port, connectRaw(0x42, 'esp-1', [field('secret')]));
    assert.equal(r.closed, true);
    assert.equal(r.got.toString('hex'), '');
    assert.equal(l.counts.authenticated, 0);
    assert.deepEqual(l.events, ['malformed CONNECT password flag without user name flag [MQTT-3.1.2-22]']);
    // both flags: accepted
    const ok = await exchange(l.port, connectRaw(0xc2, 'esp-1', [field('esp-1'), field('secret')]), (g) => g.length >= 4);
    assert.equal(ok.got.toString('hex'), CONNACK_OK);
  } finally {
    await l.srv.close();
  }
});

test('mqtt-lean [MQTT-3.1.2-2]: "MQTT" with a protocol level other than 4 (3, 5, 6, 255) gets CONNACK 1 and is closed; "MQIsdp" level 3 (MQTT 3.1) is accepted', async () => {
  const l = await rig();
  try {
    for (const level of [3, 5, 6, 255]) {
      const r = await exchange(l.port, connectRaw(0x02, 'esp-1', [], 'MQTT', level));
      assert.equal(r.got.toString('hex'), '20020001', `level ${level}: CONNACK 1 (unacceptable protocol level)`);
      assert.equal(r.closed, true, `level ${level}: then closed`);
    }
    const old = await exchange(l.port, connectRaw(0x02, 'esp-1', [], 'MQIsdp', 3), (g) => g.length >= 4);
    assert.equal(old.got.toString('hex'), CONNACK_OK);
    assert.equal(l.counts.authenticated, 1, 'only the MQTT 3.1 CONNECT reached authenticate');
    assert.deepEqual(l.events, []);
  } finally {
    await l.srv.close();
  }
});

test('mqtt-lean [MQTT-2.3.1-1]: a SUBSCRIBE or UNSUBSCRIBE with packet id 0 is malformed: closed without SUBACK/UNSUBACK', async () => {
  const l = await rig();
  try {
    const sub = await exchange(l.port, Buffer.concat([connectRaw(0x02, 'esp-1'), subscribe(0, ['mcu/v1/esp-1/cmd'])]));
    assert.equal(sub.closed, true);
    assert.equal(sub.got.toString('hex'), CONNACK_OK, 'the CONNACK only');
    assert.equal(l.counts.subscribed, 0, 'no filter reached onSubscribe');
    const unsub = await exchange(l.port, Buffer.concat([connectRaw(0x02, 'esp-1'), unsubscribe(0, ['mcu/v1/esp-1/cmd'])]));
    assert.equal(unsub.closed, true);
    assert.equal(unsub.got.toString('hex'), CONNACK_OK, 'the CONNACK only');
    assert.deepEqual(l.events, ['malformed SUBSCRIBE packet id 0 [MQTT-2.3.1-1]', 'malformed UNSUBSCRIBE packet id 0 [MQTT-2.3.1-1]']);
    // a non-zero id: answered
    const ok = await exchange(l.port, Buffer.concat([connectRaw(0x02, 'esp-1'), subscribe(1, ['mcu/v1/esp-1/cmd']), unsubscribe(2, ['mcu/v1/esp-1/cmd'])]), (g) => g.length >= 4 + 5 + 4);
    assert.equal(ok.got.toString('hex'), CONNACK_OK + '9003000101' + 'b0020002');
  } finally {
    await l.srv.close();
  }
});

test('mqtt-lean [MQTT-3.8.4, MQTT-2.2.3]: a valid SUBSCRIBE with 130 filters gets its SUBACK (a 2-byte remaining length), one return code per filter; beyond 1,024 filters the packet is refused before any filter reaches onSubscribe', async () => {
  const l = await rig();
  try {
    const filters = Array.from({ length: 130 }, (_, i) => `mcu/v1/esp-1/f${i}`);
    const want = 4 + 3 + 2 + 130;
    const r = await exchange(l.port, Buffer.concat([connectRaw(0x02, 'esp-1'), subscribe(5, filters)]), (g) => g.length >= want);
    assert.equal(r.got.subarray(0, 4).toString('hex'), CONNACK_OK);
    assert.equal(r.got.length, want);
    // 132 = 0x84 0x01
    assert.equal(r.got.subarray(4, 7).toString('hex'), '908401');
    const parser = mqttPacket.parser({ protocolVersion: 4 });
    const got: mqttPacket.Packet[] = [];
    parser.on('packet', (p) => got.push(p));
    parser.parse(r.got);
    const suback = got[1] as mqttPacket.ISubackPacket;
    assert.equal(suback.cmd, 'suback');
    assert.equal(suback.messageId, 5);
    assert.deepEqual(suback.granted, Array(130).fill(1));
    assert.equal(l.counts.subscribed, 130);
    assert.deepEqual(l.events, []);

    // 1,025 one-character filters (4 bytes each: 4.1 KB, within the packet limit): refused whole
    const many = await exchange(l.port, Buffer.concat([connectRaw(0x02, 'esp-2'), subscribe(6, Array(1025).fill('a'))]));
    assert.equal(many.closed, true);
    assert.equal(many.got.toString('hex'), CONNACK_OK);
    assert.equal(l.counts.subscribed, 130, 'no filter of the refused packet reached onSubscribe');
    assert.deepEqual(l.events, ['malformed more than 1024 filters in one SUBSCRIBE']);
  } finally {
    await l.srv.close();
  }
});

test('mqtt-lean [MQTT-1.5.3]: a correctly encoded U+FFFD (and a BOM, kept as U+FEFF) is accepted in a string; ill-formed UTF-8 (overlong, surrogate, stray byte) and U+0000 are still refused', async () => {
  const topics: string[] = [];
  const l = await leanRig({}, 0, () => ({
    onPublish: (_c, p) => {
      topics.push(p.topic);
      return 'ack';
    },
  }));
  try {
    for (const ok of ['mcu/v1/esp-1/t\uFFFD', '\uFEFFmcu/v1/esp-1/t']) {
      const r = await exchange(l.port, Buffer.concat([connectRaw(0x02, 'esp-1'), publish0(Buffer.from(ok, 'utf8'), 'x'), packet(0xc0, Buffer.alloc(0))]), (g) => g.length >= 6);
      assert.equal(r.got.toString('hex'), CONNACK_OK + 'd000', `${JSON.stringify(ok)}: stored, and the PINGREQ behind it answered`);
    }
    assert.deepEqual(topics, ['mcu/v1/esp-1/t\uFFFD', '\uFEFFmcu/v1/esp-1/t']);
    // in the client id too: a CONNECT
    const id = await exchange(l.port, connectRaw(0x02, Buffer.from('esp-\uFFFD', 'utf8')), (g) => g.length >= 4);
    assert.equal(id.got.toString('hex'), CONNACK_OK);

    const bad = [
      Buffer.from([0x74, 0xc0, 0x80]), // overlong U+0000
      Buffer.from([0x74, 0xed, 0xa0, 0x80]), // U+D800, a surrogate
      Buffer.from([0x74, 0xff]), // never in UTF-8
      Buffer.from([0x74, 0xef, 0xbf]), // U+FFFD cut short
      Buffer.from([0x74, 0x00]), // U+0000 [MQTT-1.5.3-2]
    ];
    for (const t of bad) {
      const r = await exchange(l.port, Buffer.concat([connectRaw(0x02, 'esp-1'), publish0(t, 'x')]));
      assert.equal(r.closed, true, t.toString('hex'));
      assert.equal(r.got.toString('hex'), CONNACK_OK, t.toString('hex'));
    }
    assert.equal(topics.length, 2);
    assert.deepEqual(l.events, Array(bad.length).fill('malformed string is not well-formed UTF-8'));
  } finally {
    await l.srv.close();
  }
});

test('mqtt-lean [MQTT-4.7.3-1]: a PUBLISH with a zero-length topic (and an UNSUBSCRIBE with a zero-length filter) is malformed: closed, never handed to onPublish', async () => {
  const l = await rig();
  try {
    const r = await exchange(l.port, Buffer.concat([connectRaw(0x02, 'esp-1'), publish0('', 'x')]));
    assert.equal(r.closed, true);
    assert.equal(r.got.toString('hex'), CONNACK_OK);
    const u = await exchange(l.port, Buffer.concat([connectRaw(0x02, 'esp-1'), unsubscribe(3, [''])]));
    assert.equal(u.closed, true);
    assert.equal(u.got.toString('hex'), CONNACK_OK);
    assert.deepEqual(l.stored, []);
    assert.deepEqual(l.events, ['malformed PUBLISH with a zero-length topic [MQTT-4.7.3-1]', 'malformed UNSUBSCRIBE with a zero-length filter [MQTT-4.7.3-1]']);
  } finally {
    await l.srv.close();
  }
});
