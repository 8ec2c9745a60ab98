import mqttPacket from 'mqtt-packet';

/** the largest MQTT remaining length mqtt-packet keeps the encoding of (writeToStream.js) */
const CACHED_LENGTHS = 16_384;
let warm = false;

/**
 * mqtt-packet (under mqtt.js and aedes) keeps, for good, the encoded remaining length of every
 * packet below 16 KiB it writes (writeToStream.js, varByteIntCache), each a 4-byte slice of
 * Node's shared 8 KiB Buffer pool made when that length is first written. Spread over a
 * process's life, each new length keeps the pool around it alive: a gateway relaying 10,000
 * MCUs held 2,603 such pools (21 MB) after a minute of varying batch sizes (a heap snapshot,
 * session 12), and could reach 16,384 pools (128 MB). Writing every length once, in one go,
 * puts them in ~33 adjacent pools instead (~256 KB; ~16 where mqtt-packet's number cache is
 * on, as in aedes). For the relays (gateway, hub), whose publish sizes vary without end; an
 * agent sends few distinct sizes and is left as it was (this costs ~1.7 MB of heap). Once per
 * process, ~70-130 ms.
 *
 * Call it after the process's mqtt.js clients exist: a client created with `writeCache: false`
 * (core/mqtt.ts) has switched mqtt-packet's number cache off, and the first packet written
 * with it on would build that cache (65,536 Buffers, ~6.5 MB).
 */
export function warmMqttPacketLengths(): void {
  if (warm) return;
  warm = true;
  const sink = { write: () => true } as unknown as NodeJS.WritableStream;
  const payload = Buffer.alloc(CACHED_LENGTHS);
  // an MQTT 3.1.1 DISCONNECT: remaining length 0; a PUBACK: 2; a QoS 0 PUBLISH on topic "w":
  // 3 + its payload (1 is left: no packet these processes write has it)
  mqttPacket.writeToStream({ cmd: 'disconnect' }, sink);
  mqttPacket.writeToStream({ cmd: 'puback', messageId: 1 }, sink);
  for (let n = 0; n + 3 < CACHED_LENGTHS; n++) {
    mqttPacket.writeToStream({ cmd: 'publish', topic: 'w', payload: payload.subarray(0, n), qos: 0, retain: false, dup: false }, sink);
  }
}
