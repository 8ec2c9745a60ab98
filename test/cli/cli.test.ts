import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { COMMANDS } from '../../cli/commands/index.ts';

const cli = (...args: string[]) => spawnSync(process.execPath, ['--import', 'tsx', 'cli/main.ts', ...args], { encoding: 'utf8', timeout: 30_000 });

test('cli: --help works for every command; the top help lists the public ones', () => {
  const top = cli('--help');
  assert.equal(top.status, 0);
  for (const c of COMMANDS) {
    const r = cli(c.name, '--help');
    assert.equal(r.status, 0, `${c.name} --help: ${r.stderr}`);
    assert.match(r.stdout, new RegExp(`^fleetlet ${c.name} — `), c.name);
    assert.match(r.stdout, /--help/);
    if (!c.hidden) assert.match(top.stdout, new RegExp(`\\n  ${c.name} `), `${c.name} in top help`);
  }
});

test('cli: unknown command, unknown flag and bad flag value exit 2 with FLEET_USAGE', () => {
  for (const args of [['frobnicate'], ['hub', '--no-such-flag'], ['agent', '--api-port', 'eighty'], ['sim', '--devices', '-3'], ['hub', 'bogus-sub'], []]) {
    const r = cli(...args);
    assert.equal(r.status, 2, `${args.join(' ')}: ${r.stderr}`);
    if (args.length) assert.match(r.stderr, /FLEET_USAGE/, args.join(' '));
  }
});

test('cli: --version prints the version', () => {
  const r = cli('--version');
  assert.equal(r.status, 0);
  assert.match(r.stdout, /^fleetlet \d+\.\d+\.\d+/);
});
