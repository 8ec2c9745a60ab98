import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { deriveToken } from '../../core/credentials.ts';
import { writeSecretFile } from '../../core/secrets.ts';
import { mcuKey } from '../../firmware-bridge/auth.ts';
import { tempDir } from '../helpers.ts';
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

test('cli: gateway mcu-key and hub device-token do not make a secret in a state directory that has none (left out or mistyped) unless --create; then the key matches the gateway\'s', () => {
  const tmp = tempDir('fleetlet-provision-');
  try {
    const gw = join(tmp.dir, 'gw');
    const missing = cli('gateway', 'mcu-key', 'esp-1', '--state-dir', gw);
    assert.equal(missing.status, 1, missing.stderr);
    assert.match(missing.stderr, /FLEET_CONFIG_UNREADABLE: no secret at .*site\.secret: is the state directory .* --create/);
    assert.equal(missing.stdout, '', 'no key printed');
    assert.equal(existsSync(join(gw, 'site.secret')), false, 'nothing made');
    const made = cli('gateway', 'mcu-key', 'esp-1', '--state-dir', gw, '--create');
    assert.equal(made.status, 0, made.stderr);
    assert.match(made.stderr, /created a new site secret at /);
    // the same key again (the secret is read now), and it is the one a gateway on this state directory derives
    const again = cli('gateway', 'mcu-key', 'esp-1', '--state-dir', gw);
    assert.equal(again.status, 0, again.stderr);
    assert.equal(again.stdout, made.stdout);
    assert.equal(again.stdout.trim(), mcuKey(readFileSync(join(gw, 'site.secret'), 'utf8').trim(), 'esp-1'));

    const hub = join(tmp.dir, 'hub');
    const noHub = cli('hub', 'device-token', 'pi-1', '--state-dir', hub);
    assert.equal(noHub.status, 1, noHub.stderr);
    assert.match(noHub.stderr, /no secret at .*fleet\.secret/);
    assert.equal(existsSync(join(hub, 'fleet.secret')), false);
    const token = cli('hub', 'device-token', 'pi-1', '--state-dir', hub, '--create');
    assert.equal(token.status, 0, token.stderr);
    assert.equal(token.stdout.trim(), deriveToken(readFileSync(join(hub, 'fleet.secret'), 'utf8').trim(), 'device', 'pi-1'));
  } finally {
    tmp.cleanup();
  }
});

test('cli: a sim flag value runSim refuses (a CoAP chunk size that is not a power of two) is a usage error: FLEET_USAGE, exit 2', () => {
  const tmp = tempDir('fleetlet-simflag-');
  try {
    const secret = join(tmp.dir, 'site.secret');
    writeSecretFile(secret, 's'.repeat(43));
    const r = cli('sim', '--devices', '1', '--protocol', 'coap', '--fw-chunk-bytes', '100', '--duration-s', '1', '--site-secret-file', secret);
    assert.equal(r.status, 2, r.stderr);
    assert.match(r.stderr, /FLEET_USAGE: .*fwChunkBytes: must be 16\.\.1024, a power of two/);
  } finally {
    tmp.cleanup();
  }
});
