import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { deriveToken } from '../../core/credentials.ts';
import { isFleetError, type ErrorCode } from '../../core/errors.ts';
import { MAC_CHARS, MAX_FLOORS, mcuKey, McuKeys, parseCounter, ReplayGuard, signMcuMessage, verifyMcuMac, verifyMcuMessage } from '../../firmware-bridge/auth.ts';
import { bytesFrom, fuzzSeed, rng } from '../helpers.ts';

const SITE = 'site-secret-for-tests-0123456789';
const ID = 'esp-1';
const KEY = mcuKey(SITE, ID);
const PAYLOAD = Buffer.from('[{"n":"temp","v":21.5}]');

const code = (fn: () => unknown): ErrorCode | 'ok' => {
  try {
    fn();
    return 'ok';
  } catch (err) {
    if (isFleetError(err)) return err.code;
    throw err;
  }
};

test('auth: the MCU key is the MQTT credential derivation with the mcu label', () => {
  assert.equal(KEY, deriveToken(SITE, 'mcu', ID));
  assert.notEqual(KEY, mcuKey(SITE, 'esp-2'));
  assert.notEqual(KEY, deriveToken(SITE, 'device', ID));
});

test('auth: a signed message verifies; anything changed does not (table)', () => {
  const mac = signMcuMessage(KEY, ID, 't', 42, PAYLOAD);
  assert.equal(mac.length, MAC_CHARS);
  const flipped = Buffer.from(mac, 'base64url');
  flipped[0]! ^= 0x01;
  const cases: Array<{ name: string; key?: string; id?: string; counter?: number; payload?: Buffer; mac?: string | null; want: ErrorCode | 'ok' }> = [
    { name: 'genuine', want: 'ok' },
    { name: 'forged MAC (one bit)', mac: flipped.toString('base64url'), want: 'FLEET_MCU_AUTH' },
    { name: 'MAC of another message', mac: signMcuMessage(KEY, ID, 't', 43, PAYLOAD), want: 'FLEET_MCU_AUTH' },
    { name: 'tampered payload', payload: Buffer.from('[{"n":"temp","v":99.5}]'), want: 'FLEET_MCU_AUTH' },
    { name: 'tampered counter', counter: 43, want: 'FLEET_MCU_AUTH' },
    { name: 'other MCU id', id: 'esp-2', want: 'FLEET_MCU_AUTH' },
    { name: "other MCU's key", key: mcuKey(SITE, 'esp-2'), want: 'FLEET_MCU_AUTH' },
    { name: 'other site secret', key: mcuKey('another-site-secret-0123456789', ID), want: 'FLEET_MCU_AUTH' },
    { name: 'MAC missing', mac: null, want: 'FLEET_MCU_AUTH' },
    { name: 'MAC too short', mac: mac.slice(0, 21), want: 'FLEET_MCU_AUTH' },
    { name: 'MAC with padding', mac: mac + '==', want: 'FLEET_MCU_AUTH' },
    { name: 'MAC not base64url', mac: mac.slice(0, 21) + '+', want: 'FLEET_MCU_AUTH' },
    { name: 'full 32-byte HMAC instead of 16', mac: Buffer.alloc(32).toString('base64url'), want: 'FLEET_MCU_AUTH' },
  ];
  for (const c of cases) {
    const got = code(() => verifyMcuMac(c.key ?? KEY, c.id ?? ID, 't', c.counter ?? 42, c.payload ?? PAYLOAD, c.mac === undefined ? mac : c.mac));
    assert.equal(got, c.want, c.name);
  }
});

test('auth: counters on the wire are canonical positive decimals below 2^53', () => {
  const good: Array<[string, number]> = [['1', 1], ['42', 42], ['9007199254740991', Number.MAX_SAFE_INTEGER]];
  for (const [raw, n] of good) assert.equal(parseCounter(raw), n, raw);
  for (const raw of ['0', '-1', '01', '1.5', '1e3', '', ' 1', '0x10', '9007199254740992', '99999999999999999', null, undefined]) {
    assert.equal(code(() => parseCounter(raw)), 'FLEET_MCU_AUTH', String(raw));
  }
  assert.equal(code(() => signMcuMessage(KEY, ID, 't', 0, PAYLOAD)), 'FLEET_MCU_AUTH');
  assert.equal(code(() => signMcuMessage(KEY, 'bad/id', 't', 1, PAYLOAD)), 'FLEET_DEVICE_ID_INVALID');
});

test('auth: replay guard, strictly increasing (window 0)', () => {
  const g = new ReplayGuard({ window: 0 });
  const steps: Array<[number, ErrorCode | 'ok']> = [
    [5, 'ok'],
    [6, 'ok'],
    [6, 'FLEET_MCU_REPLAY'],
    [5, 'FLEET_MCU_REPLAY'],
    [1, 'FLEET_MCU_REPLAY'],
    [100, 'ok'],
    [99, 'FLEET_MCU_REPLAY'],
  ];
  for (const [c, want] of steps) assert.equal(code(() => g.accept(ID, c)), want, `counter ${c}`);
  assert.equal(g.high(ID), 100);
  // other MCUs have their own counters
  assert.equal(code(() => g.accept('esp-2', 1)), 'ok');
});

test('auth: replay guard with a window accepts reordered counters once each', () => {
  const g = new ReplayGuard({ window: 4 });
  const steps: Array<[number, ErrorCode | 'ok']> = [
    [10, 'ok'],
    [8, 'ok'], // 2 below the top, inside the window
    [8, 'FLEET_MCU_REPLAY'], // only once
    [10, 'FLEET_MCU_REPLAY'],
    [6, 'FLEET_MCU_REPLAY'], // 4 below: outside a window of 4
    [7, 'ok'],
    [9, 'ok'],
    [50, 'ok'], // a jump of more than 32 resets the bitmap
    [47, 'ok'],
    [46, 'FLEET_MCU_REPLAY'],
    [49, 'ok'],
    [49, 'FLEET_MCU_REPLAY'],
    [51, 'ok'],
    [47, 'FLEET_MCU_REPLAY'], // still remembered after the window moved by one
  ];
  for (const [c, want] of steps) assert.equal(code(() => g.accept(ID, c)), want, `counter ${c}`);
  const wide = new ReplayGuard({ window: 32 });
  wide.accept(ID, 1000);
  assert.equal(code(() => wide.accept(ID, 969)), 'ok'); // 31 below
  assert.equal(code(() => wide.accept(ID, 968)), 'FLEET_MCU_REPLAY'); // 32 below
  assert.equal(code(() => wide.accept(ID, 969)), 'FLEET_MCU_REPLAY');
  assert.throws(() => new ReplayGuard({ window: 33 }), RangeError);
});

test('auth: verifyMcuMessage checks the MAC before touching counters', () => {
  const g = new ReplayGuard({ window: 0 });
  const msg = (counter: number, mac?: string) => ({ key: KEY, mcuId: ID, resource: 't' as const, counter: String(counter), payload: PAYLOAD, mac: mac ?? signMcuMessage(KEY, ID, 't', counter, PAYLOAD) });
  assert.equal(verifyMcuMessage(g, msg(7)), 7);
  // an attacker without the key sends a huge counter: refused, and the MCU is not locked out
  assert.equal(code(() => verifyMcuMessage(g, msg(9_000_000_000, 'A'.repeat(22)))), 'FLEET_MCU_AUTH');
  assert.equal(g.high(ID), 7);
  assert.equal(code(() => verifyMcuMessage(g, msg(8))), 'ok');
  // a captured genuine message replayed
  assert.equal(code(() => verifyMcuMessage(g, msg(8))), 'FLEET_MCU_REPLAY');
  assert.equal(code(() => verifyMcuMessage(g, { ...msg(9), counter: '009' })), 'FLEET_MCU_AUTH');
  // only the canonical base64url of the MAC: the 15 strings differing in the last character's
  // unused bits decoded to the same bytes and verified too
  const mac10 = signMcuMessage(KEY, ID, 't', 10, PAYLOAD);
  const alphabet = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_';
  const last = alphabet.indexOf(mac10.at(-1)!);
  const variants = Array.from({ length: 16 }, (_, k) => mac10.slice(0, -1) + alphabet[(last & ~15) | k]).filter((m) => m !== mac10);
  assert.equal(variants.length, 15);
  for (const v of variants) assert.equal(Buffer.from(v, 'base64url').equals(Buffer.from(mac10, 'base64url')), true, 'same bytes');
  for (const v of variants) assert.equal(code(() => verifyMcuMessage(g, msg(10, v))), 'FLEET_MCU_AUTH', v);
  assert.equal(code(() => verifyMcuMessage(g, msg(10))), 'ok');
});

test('auth: replay state survives a snapshot/restore and never moves backwards', () => {
  const g = new ReplayGuard({ window: 0 });
  g.accept(ID, 50);
  g.accept('esp-2', 7);
  assert.equal(g.takeChanged(), true);
  assert.equal(g.takeChanged(), false);
  const snap = JSON.parse(JSON.stringify(g.snapshot())) as unknown;
  const h = new ReplayGuard({ window: 0 });
  h.accept(ID, 80); // newer than the snapshot
  const r = h.restore({ ...(snap as object), 'bad/id': [1, 1], 'esp-3': ['x', 1], 'esp-4': [5, -1] });
  assert.deepEqual(r, { restored: 2, skipped: 3 });
  assert.equal(h.high(ID), 80);
  assert.equal(h.high('esp-2'), 7);
  assert.equal(code(() => h.accept('esp-2', 7)), 'FLEET_MCU_REPLAY');
  assert.deepEqual(h.restore(null), { restored: 0, skipped: 0 });
  assert.deepEqual(h.restore([1, 2]), { restored: 0, skipped: 0 });
});

test('auth: the guard is bounded and refuses new MCUs beyond it', () => {
  const g = new ReplayGuard({ maxMcus: 2 });
  g.accept('a1', 1);
  g.accept('a2', 1);
  assert.equal(code(() => g.accept('a3', 1)), 'FLEET_FORBIDDEN');
  assert.equal(code(() => g.accept('a1', 2)), 'ok');
});

test('auth fuzz: random counters, MACs and payloads only ever throw FleetError', () => {
  const g = new ReplayGuard();
  const chars = 'abcXYZ019_-+/=. ';
  const fuzz = fuzzSeed();
  const r = rng(fuzz);
  const rnd = (n: number) => Array.from({ length: n }, () => chars[r(chars.length)]).join('');
  for (let i = 0; i < 3000; i++) {
    const counter = r(2) === 0 ? String(r(1e6)) : rnd(r(20));
    const mac = r(2) === 0 ? bytesFrom(r, 16).toString('base64url') : rnd(r(30));
    const got = code(() => verifyMcuMessage(g, { key: KEY, mcuId: ID, resource: 't', counter, payload: bytesFrom(r, r(50)), mac }));
    assert.ok(got === 'FLEET_MCU_AUTH', `random input must fail authentication, got ${got} for counter ${JSON.stringify(counter)}, mac ${JSON.stringify(mac)} (FLEETLET_FUZZ_SEED=${fuzz})`);
  }
  assert.equal(g.size, 0, 'no state was created by unauthenticated input');
});

test('auth: the test vector in docs/mcu-protocol.md (for firmware implementations)', () => {
  const key = mcuKey('example-site-secret-do-not-use-0001', 'esp32-0001');
  assert.equal(key, 'f94Wgn5oq0zlwIoAEjEEGFGNNKH_v1E53-ZUHpmXWZQ');
  const payload = Buffer.from('[{"bt":1700000000,"n":"temperature","u":"Cel","v":21.5}]');
  assert.equal(signMcuMessage(key, 'esp32-0001', 't', 1700000000000, payload), '0WUED2uBE-pTFwzSmMQbBA');
  const doc = readFileSync(new URL('../../docs/mcu-protocol.md', import.meta.url), 'utf8');
  for (const s of [key, '0WUED2uBE-pTFwzSmMQbBA', 'example-site-secret-do-not-use-0001']) assert.ok(doc.includes(s), `docs carry ${s}`);
});

test('auth: McuKeys gives the derived key, remembers only proven ids, and is bounded', () => {
  const keys = new McuKeys(SITE, 2);
  assert.equal(keys.get(ID), KEY);
  assert.equal(keys.size, 0, 'asking for a key remembers nothing (a made-up id fills no memory)');
  keys.prove(ID, keys.get(ID));
  keys.prove('esp-2', keys.get('esp-2'));
  keys.prove('esp-2', keys.get('esp-2'));
  assert.equal(keys.size, 2);
  keys.prove('esp-3', keys.get('esp-3'));
  assert.equal(keys.size, 2, 'at most max ids; the oldest proven goes first');
  // every id still gets its own key, remembered or derived again
  for (const id of [ID, 'esp-2', 'esp-3']) assert.equal(keys.get(id), mcuKey(SITE, id));
  assert.equal(code(() => keys.get('bad id')), 'FLEET_DEVICE_ID_INVALID');
});

test('replay guard: a forgotten MCU frees its slot but keeps its highest counter as a floor: its old counters stay replays, a higher one brings it back; floors persist and are bounded', () => {
  const g = new ReplayGuard({ window: 4, maxMcus: 2 });
  g.accept('esp-a', 100);
  g.accept('esp-a', 98);
  g.accept('esp-b', 5);
  g.forget('esp-a');
  assert.equal(g.size, 1, 'its slot is free');
  g.accept('esp-c', 1); // a new MCU takes the slot
  g.forget('esp-c');
  for (const c of [1, 50, 97, 98, 100]) assert.throws(() => g.check('esp-a', c), /FLEET_MCU_REPLAY|not above 100/, `counter ${c}`);
  assert.throws(() => g.accept('esp-a', 99), (e: unknown) => isFleetError(e, 'FLEET_MCU_REPLAY'));
  // persisted with the state and loaded into another guard
  const floors = Object.fromEntries(g.floorEntries());
  assert.deepEqual(floors, { 'esp-a': 100, 'esp-c': 1 });
  const h = new ReplayGuard({ window: 4, maxMcus: 2 });
  assert.deepEqual(h.restoreFloors({ ...floors, 'bad id!': 3, 'esp-d': -1 }), { restored: 2, skipped: 2 });
  assert.throws(() => h.accept('esp-a', 100), (e: unknown) => isFleetError(e, 'FLEET_MCU_REPLAY'));
  h.accept('esp-a', 101);
  assert.equal(h.high('esp-a'), 101);
  assert.deepEqual(Object.fromEntries(h.floorEntries()), { 'esp-c': 1 }, 'back with live state: no floor needed');
  // bounded: beyond MAX_FLOORS the longest forgotten goes first
  const many = new ReplayGuard({ maxMcus: 1 });
  for (let i = 0; i <= MAX_FLOORS; i++) {
    many.accept(`m${i}`, 7);
    many.forget(`m${i}`);
  }
  assert.equal([...many.floorEntries()].length, MAX_FLOORS);
  assert.doesNotThrow(() => many.check('m0', 1), 'the first forgotten one was dropped');
  assert.throws(() => many.check('m1', 7), (e: unknown) => isFleetError(e, 'FLEET_MCU_REPLAY'));
});
