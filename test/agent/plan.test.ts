import { test } from 'node:test';
import assert from 'node:assert/strict';
import { AppSpecSchema, type AppSpec } from '../../agent/config.ts';
import { planApps, type CurrentApp } from '../../agent/plan.ts';
import { backoffDelay, DEFAULT_BACKOFF } from '../../agent/backoff.ts';

const spec = (name: string, extra: Partial<AppSpec> = {}): AppSpec => AppSpecSchema.parse({ name, command: '/bin/true', ...extra });
const current = (...specs: AppSpec[]): Map<string, CurrentApp> => new Map(specs.map((s) => [s.name, { spec: s }]));

test('planApps: table of current → desired', () => {
  const cases: Array<{ name: string; cur: Map<string, CurrentApp>; want: AppSpec[]; steps: string[] }> = [
    { name: 'nothing to do', cur: current(), want: [], steps: [] },
    { name: 'start new', cur: current(), want: [spec('a'), spec('b')], steps: ['start a', 'start b'] },
    { name: 'stop removed', cur: current(spec('a'), spec('b')), want: [spec('b')], steps: ['stop a'] },
    { name: 'unchanged spec is left alone', cur: current(spec('a', { args: ['x'] })), want: [spec('a', { args: ['x'] })], steps: [] },
    { name: 'changed args replaces', cur: current(spec('a')), want: [spec('a', { args: ['--v2'] })], steps: ['replace a'] },
    { name: 'changed env replaces', cur: current(spec('a', { env: { A: '1' } })), want: [spec('a', { env: { A: '2' } })], steps: ['replace a'] },
    { name: 'stops come before starts', cur: current(spec('old')), want: [spec('new')], steps: ['stop old', 'start new'] },
  ];
  for (const c of cases) {
    const got = planApps(c.cur, c.want).map((s) => `${s.kind} ${s.kind === 'stop' ? s.name : s.spec.name}`);
    assert.deepEqual(got, c.steps, c.name);
  }
});

test('backoff: PM2-like schedule 100 ms x1.5 capped at 15 s', () => {
  const got = Array.from({ length: 14 }, (_, i) => backoffDelay(DEFAULT_BACKOFF, i));
  assert.deepEqual(got.slice(0, 5), [100, 150, 225, 338, 506]);
  assert.equal(got[13], 15_000);
  assert.ok(got.every((d, i) => i === 0 || d >= got[i - 1]!), 'non-decreasing');
});
