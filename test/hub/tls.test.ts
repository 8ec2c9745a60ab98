import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { isFleetError } from '../../core/errors.ts';
import { HubConfigSchema } from '../../hub/config.ts';
import { startHub } from '../../hub/index.ts';
import { makeCert, tempDir, testLogger } from '../helpers.ts';

const run = promisify(execFile);

/**
 * The hub's MQTT over TLS listener (config `tls`), with Mosquitto's clients as the peers:
 * an operator subscriber and a publisher over TLS trusting the hub's certificate; a client
 * trusting another certificate fails; a bad certificate path stops the start naming the key.
 */
test('hub TLS: mosquitto clients over TLS reach the broker; an untrusted certificate and bad cert/key paths are refused clearly', async () => {
  const tmp = tempDir();
  try {
    const good = makeCert(tmp.dir, 'hub');
    const other = makeCert(tmp.dir, 'other');
    const hub = await startHub(HubConfigSchema.parse({ mqttPort: 0, mqttsPort: 0, httpPort: 0, stateDir: join(tmp.dir, 'hub'), tls: good }), testLogger('hub'));
    try {
      assert.ok(hub.mqttsPort, 'a TLS port');
      const operator = readFileSync(hub.operatorTokenFile, 'utf8').trim();
      const base = (ca: string) => ['-h', '127.0.0.1', '-p', String(hub.mqttsPort), '--cafile', ca, '-u', 'operator', '-P', operator, '-V', 'mqttv311'];
      // subscriber waits for one retained message; the publisher sets it (desired state is an operator topic)
      // (retained: the subscriber gets it whether its SUBSCRIBE comes before or after the publish)
      await run('mosquitto_pub', [...base(good.cert), '-i', 'ops-pub', '-t', 'fleet/v1/d/dev-1/desired', '-q', '1', '-r', '-m', '{"v":1}'], { timeout: 15_000 });
      const { stdout } = await run('mosquitto_sub', [...base(good.cert), '-i', 'ops-sub', '-t', 'fleet/v1/d/dev-1/desired', '-C', '1', '-W', '10'], { timeout: 15_000 });
      assert.equal(stdout.trim(), '{"v":1}');
      // a client that trusts another certificate does not get through
      await assert.rejects(run('mosquitto_pub', [...base(other.cert), '-i', 'ops-x', '-t', 'fleet/v1/d/dev-1/desired', '-q', '1', '-m', 'x'], { timeout: 15_000 }));
    } finally {
      await hub.stop();
    }
    const bad = async (tls: { cert: string; key: string }, key: RegExp) => {
      const err = await startHub(HubConfigSchema.parse({ mqttPort: 0, httpPort: 0, stateDir: join(tmp.dir, 'bad'), tls }), testLogger('hub')).then(
        async (h) => {
          await h.stop();
          return null;
        },
        (e: unknown) => e,
      );
      assert.ok(isFleetError(err, 'FLEET_CONFIG_INVALID'), `FLEET_CONFIG_INVALID, got ${String(err)}`);
      assert.match((err as Error).message, key);
    };
    await bad({ cert: join(tmp.dir, 'missing.crt'), key: good.key }, /^tls\.cert: cannot read .*missing\.crt/);
    writeFileSync(join(tmp.dir, 'junk.key'), 'not a key');
    await bad({ cert: good.cert, key: join(tmp.dir, 'junk.key') }, /^tls\.key: .* is not a PEM private key/);
    await bad({ cert: good.cert, key: other.key }, /^tls\.cert and tls\.key: the key .* does not belong to the certificate/);
  } finally {
    tmp.cleanup();
  }
});
