import { test } from 'node:test';
import assert from 'node:assert/strict';
import { isFleetError } from '../../core/errors.ts';
import type { Sample } from '../../core/messages.ts';
import { parseCoapPacket, scanCoapDatagram } from '../../firmware-bridge/coap.ts';
import { decodeCompact, decodeSenmlCbor, decodeTelemetry, encodeCompact, encodeSenmlCbor } from '../../firmware-bridge/codecs.ts';
import { decodeFwChunkRequest, decodeMcuAck, decodeMcuHello, splitMacLine } from '../../firmware-bridge/frames.ts';
import { decodeSenmlJson, encodeSenmlJson } from '../../firmware-bridge/senml.ts';

/**
 * Fuzzing every decoder that reads MCU bytes from the network: random bytes and
 * mutations of valid payloads (bit flips, byte overwrites, truncation, duplication,
 * insertion). Each call must return or throw FleetError FLEET_MCU_DECODE/AUTH — never
 * anything else — and return promptly (each call's CPU time is held to a generous 1 s: a
 * super-linear blow-up fails; an endless loop is caught by the runner's timeout). Every byte
 * comes from the seeded PRNG: FLEETLET_FUZZ_SEED=<the printed seed> reproduces a failure.
 */
const ITER = Number(process.env.FUZZ_ITER ?? 4000);
const TABLE = [
  ['temperature', 'Cel'],
  ['humidity', '%RH'],
  ['door', ''],
] as const;
const SAMPLES: Sample[] = [
  { n: 'temperature', u: 'Cel', v: 21.37, t: 1_700_000_000_123 },
  { n: 'humidity', u: '%RH', v: 44, t: 1_700_000_001_000 },
  { n: 'door', vb: true, t: 1_700_000_002_000 },
];

// deterministic PRNG so a failure can be reproduced with the printed seed
const SEED = Number(process.env.FLEETLET_FUZZ_SEED ?? process.env.FUZZ_SEED ?? Date.now() % 1e9);
function rng(seed: number): () => number {
  let s = seed >>> 0 || 1;
  return () => {
    s ^= s << 13;
    s ^= s >>> 17;
    s ^= s << 5;
    return (s >>> 0) / 2 ** 32;
  };
}

/** `n` bytes from the PRNG */
function bytes(r: () => number, n: number): Buffer {
  const b = Buffer.alloc(n);
  for (let i = 0; i < n; i++) b[i] = Math.floor(r() * 256);
  return b;
}

function mutate(buf: Buffer, r: () => number): Buffer {
  let b = Buffer.from(buf);
  const n = 1 + Math.floor(r() * 4);
  for (let k = 0; k < n; k++) {
    const op = Math.floor(r() * 6);
    const at = Math.floor(r() * Math.max(1, b.length));
    if (op === 0 && b.length > 0) b[at] = b[at]! ^ (1 << Math.floor(r() * 8));
    else if (op === 1 && b.length > 0) b[at] = Math.floor(r() * 256);
    else if (op === 2) b = b.subarray(0, at);
    else if (op === 3) b = Buffer.concat([b.subarray(0, at), b.subarray(at, at + Math.floor(r() * 16)), b.subarray(at)]);
    else if (op === 4) b = Buffer.concat([b.subarray(0, at), bytes(r, 1 + Math.floor(r() * 8)), b.subarray(at)]);
    else if (b.length > 0) b[at] = [0x00, 0xff, 0x7f, 0x80, 0x9f, 0xbf, 0xf9, 0xfb, 0x1b, 0x5b, 0x7b][Math.floor(r() * 11)]!;
  }
  return b;
}

function check(name: string, fn: () => unknown, input: Buffer, seed: number): void {
  // CPU time, not wall time: a machine busy with other work must not fail a fast decode
  const t0 = process.cpuUsage();
  try {
    fn();
  } catch (err) {
    if (!isFleetError(err, 'FLEET_MCU_DECODE') && !isFleetError(err, 'FLEET_MCU_AUTH')) {
      assert.fail(`${name} threw ${(err as Error)?.constructor?.name}: ${(err as Error)?.message} for ${input.toString('hex').slice(0, 200)} (FLEETLET_FUZZ_SEED=${seed})`);
    }
  }
  const used = process.cpuUsage(t0);
  const ms = (used.user + used.system) / 1000;
  assert.ok(ms < 1000, `${name} took ${ms} ms of CPU on ${input.length} bytes: ${input.toString('hex').slice(0, 200)} (FLEETLET_FUZZ_SEED=${seed})`);
}

const decoders: Array<[string, (b: Buffer) => unknown, Buffer]> = [
  ['senml json', (b) => decodeSenmlJson(b), encodeSenmlJson(SAMPLES)],
  ['senml cbor', (b) => decodeSenmlCbor(b), encodeSenmlCbor(SAMPLES)],
  ['compact', (b) => decodeCompact(b, { sensors: TABLE }), encodeCompact(SAMPLES, { table: TABLE, inlineTable: true })],
  ['sniffed telemetry', (b) => decodeTelemetry(b, 'sniff', { sensors: TABLE }), encodeCompact(SAMPLES, { table: TABLE })],
  ['hello', (b) => decodeMcuHello(b), Buffer.from(JSON.stringify({ fw: '1.4.2', boot: 'ota', prev: '1.4.1', sleep: 300, sensors: TABLE }))],
  ['ack', (b) => decodeMcuAck(b), Buffer.from('{"id":"c-1","ok":false,"e":"nope","code":"X","r":[1,2]}')],
  ['fwreq', (b) => decodeFwChunkRequest(b), Buffer.from('{"n":12,"s":1024}')],
  ['mac line', (b) => splitMacLine(b), Buffer.from('c=1700000000000&m=0WUED2uBE-pTFwzSmMQbBA\n[]')],
];

for (const [name, fn, valid] of decoders) {
  test(`fuzz ${name}: ${ITER} random and ${ITER} mutated inputs only throw FleetError, promptly`, () => {
    fn(valid); // the seed input itself is valid
    const seed = SEED;
    const r = rng(seed);
    for (let i = 0; i < ITER; i++) {
      const rand = bytes(r, Math.floor(r() * 96));
      if (r() < 0.3 && rand.length > 0) rand[0] = [0x5b, 0x80 | Math.floor(r() * 32), 0xf1, 0x7b][Math.floor(r() * 4)]!;
      check(name, () => fn(rand), rand, seed);
      const m = mutate(valid, r);
      check(name, () => fn(m), m, seed);
    }
  });
}

test(`fuzz coap datagram parsers: ${ITER} random and mutated datagrams never throw`, () => {
  const seed = SEED;
  const r = rng(seed);
  const valid = Buffer.from('4402123463bb6d637502763106657370312d31017414633d31264d3d6162636465666768696a6b6c6d6e6f7071727374754b0f31ff5b5d', 'hex');
  for (let i = 0; i < ITER * 2; i++) {
    const input = i % 2 ? mutate(valid, r) : bytes(r, Math.floor(r() * 64));
    assert.doesNotThrow(() => {
      scanCoapDatagram(input);
      parseCoapPacket(input);
    }, `${input.toString('hex')} (FLEETLET_FUZZ_SEED=${seed})`);
  }
});
