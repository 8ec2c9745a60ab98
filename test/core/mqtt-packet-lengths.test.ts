import { test } from 'node:test';
import assert from 'node:assert/strict';
import mqttPacket from 'mqtt-packet';
import { warmMqttPacketLengths } from '../../core/mqtt-packet-lengths.ts';

// Its own file: the runner gives each file a fresh process, so mqtt-packet's cache starts empty here.
test('mqtt-packet lengths: once warmed, the encodings it keeps for lengths below 16 KiB sit in a few adjacent pools, not one pool each', () => {
  // as in the gateway: its mqtt.js client (writeCache: false) switched the number cache off first
  mqttPacket.writeToStream.cacheNumbers = false;
  warmMqttPacketLengths();
  const pools = new Set<ArrayBufferLike>();
  let lengths = 0;
  for (let n = 0; n + 3 < 16_384; n += 7) {
    // other work takes from Node's shared Buffer pool between two packets, as in a running process
    Buffer.allocUnsafe(3000);
    const writes: Buffer[] = [];
    const sink = { write: (b: Buffer) => (writes.push(b), true) } as unknown as NodeJS.WritableStream;
    mqttPacket.writeToStream({ cmd: 'publish', topic: 'w', payload: Buffer.alloc(n), qos: 0, retain: false, dup: false }, sink);
    // fixed header byte, then the remaining length (3 + n) as mqtt-packet keeps it
    const len = writes[1]!;
    assert.equal(len[0]! & 0x7f, (3 + n) & 0x7f);
    pools.add(len.buffer);
    lengths++;
  }
  assert.ok(lengths > 2000);
  // 16,384 encodings of 8 bytes (4, aligned), with the 2-byte topic lengths written between
  // them (8 aligned), fill ~33 pools of 8 KiB; unwarmed, each length written here would have
  // taken a slice of whatever pool was current: ~1,200 pools (checked)
  assert.ok(pools.size <= 40, `${pools.size} pools hold the encodings`);
  // lengths 0 and 2 are warm too (a DISCONNECT; a PUBACK): written now, their encodings are
  // not slices of the pool in use now, as a new cache entry would be
  for (const [packet, rl] of [[{ cmd: 'disconnect' }, 0], [{ cmd: 'puback', messageId: 9 }, 2]] as const) {
    const now = Buffer.allocUnsafe(8);
    const write = (): Buffer[] => {
      const writes: Buffer[] = [];
      mqttPacket.writeToStream(packet, { write: (b: Buffer) => (writes.push(b), true) } as unknown as NodeJS.WritableStream);
      return writes;
    };
    const first = write();
    // the cached encoding is the same Buffer object every time it is written
    const len = write().find((b) => first.includes(b) && b.length === 1 && b[0] === rl);
    assert.ok(len, `remaining length ${rl} written from the cache`);
    assert.notEqual(len.buffer, now.buffer, `remaining length ${rl} was cached before`);
  }
});
