import { test } from 'node:test';
import assert from 'node:assert/strict';
import { JsonScanner } from '../../core/json-scan.ts';
import { rng } from '../helpers.ts';

/**
 * JsonScanner.number against Number() of the same text, over numbers in JSON's grammar
 * written in many forms (signs, leading "0.", zeros after the point, up to 24 digits,
 * exponents): the same double (Object.is: -0 too), the whole text read, and where it says
 * `canonical`, String() of the value is the text itself (what the SenML transcoder relies on
 * when it copies a number's text). FLEETLET_FUZZ_SEED reruns one seed.
 */
test('number(): the value Number() gives, and "canonical" only where String() prints the text back', () => {
  const seed = Number(process.env.FLEETLET_FUZZ_SEED ?? 0x4e554d);
  const r = rng(seed);
  let canonical = 0;
  let fast = 0;
  for (let i = 0; i < 200_000; i++) {
    const sign = r(3) === 0 ? '-' : '';
    const int = r(4) === 0 ? '0' : String(1 + r(9)) + String(r(10 ** r(9))).slice(0, r(16));
    const frac = r(2) === 0 ? '' : `.${'0'.repeat(r(8))}${r(10 ** (1 + r(9)))}`;
    const exp = r(6) === 0 ? `${['e', 'E'][r(2)]}${['', '+', '-'][r(3)]}${r(25)}` : '';
    const text = sign + int + frac + exp;
    const p = new JsonScanner(`${text},`);
    const v = p.number();
    assert.equal(p.i, text.length, `seed ${seed}: ${text} read to ${p.i}`);
    assert.ok(Object.is(v, Number(text)), `seed ${seed}: ${text} gave ${v}, Number() ${Number(text)}`);
    if (p.canonical) {
      canonical++;
      assert.equal(String(v), text, `seed ${seed}: ${text} called canonical`);
    }
    if (!exp && text.replace(/[-.]/g, '').length <= 16) fast++;
  }
  // both rules are exercised
  assert.ok(canonical > 50_000 && fast > 50_000, `canonical ${canonical}, fast-path ${fast}`);
});

test('number(): not JSON numbers give NaN; strings and booleans as documented', () => {
  for (const t of ['', '-', '+1', '.5', '1.', '01x', 'e5', '-e5', '1e', '1e+', 'NaN', 'Infinity', '0x10']) {
    const p = new JsonScanner(t);
    const v = p.number();
    // these read "0" (JSON allows no leading zeros): the caller then meets "1" or "x" where
    // it wants "," or "}", and gives up
    if (t === '01x' || t === '0x10') assert.deepEqual([v, p.i], [0, 1]);
    else assert.ok(Number.isNaN(v), `${JSON.stringify(t)} gave ${v}`);
  }
  assert.equal(new JsonScanner('1e999').number(), Infinity);
  const s = new JsonScanner('"a b:c" "caf\u00e9" "x\\"y" "tab\tx"');
  assert.equal(s.string(), 'a b:c');
  s.ws();
  assert.equal(s.string(), null, 'non-ASCII gives up');
  assert.equal(new JsonScanner('"x\\"y"').string(), null, 'an escape gives up');
  assert.equal(new JsonScanner('"tab\tx"').string(), null, 'a raw control character gives up');
  assert.equal(new JsonScanner('true').boolean(), true);
  assert.equal(new JsonScanner('false').boolean(), false);
  assert.equal(new JsonScanner('nul').boolean(), null);
});
