import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, spawn, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { createSocket } from 'node:dgram';
import { readFileSync, writeFileSync } from 'node:fs';
import { createConnection } from 'node:net';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { promisify } from 'node:util';
import { setTimeout as sleep } from 'node:timers/promises';
import type { CommandReply, LogBatch, TelemetryBatch } from '../../core/messages.ts';
import { mcuKey, signMcuMessage } from '../../firmware-bridge/auth.ts';
import { coapAuthQuery, coapPath } from '../../firmware-bridge/coap.ts';
import { decodeMcuCommand } from '../../firmware-bridge/frames.ts';
import type { McuChannel } from '../../firmware-bridge/topics.ts';
import { mcuTopic } from '../../firmware-bridge/topics.ts';
import { tempDir, waitFor } from '../helpers.ts';
import type { GatewayConfig } from '../../gateway/config.ts';
import { coap, nextCounter, of, registered, signedFirmware, withEnv } from './env.ts';

/**
 * Interop with real peers (Debian mosquitto-clients, libcoap3-bin's coap-client-notls,
 * prometheus' promtool) acting as MCUs against a real gateway and hub.
 */
const execFileP = promisify(execFile);
/** a peer's run, killed after 60 s (a peer that hangs, e.g. waiting for a PUBACK, fails the test instead of holding it) */
const run: typeof execFileP = ((file: string, args: string[], opts: Record<string, unknown> = {}) => execFileP(file, args, { timeout: 60_000, ...opts })) as typeof execFileP;

function coapUrl(port: number, site: string, id: string, resource: McuChannel, payload: Buffer = Buffer.alloc(0)): string {
  const c = nextCounter();
  return `coap://127.0.0.1:${port}${coapPath(id, resource)}?${coapAuthQuery(c, signMcuMessage(mcuKey(site, id), id, resource, c, payload))}`;
}

const mqttArgs = (port: number, site: string, id: string) => ['-h', '127.0.0.1', '-p', String(port), '-V', 'mqttv311', '-i', id, '-u', id, '-P', mcuKey(site, id), '-q', '1'];

test('interop: mosquitto_pub/mosquitto_sub as an MCU — telemetry reaches the hub, a hello is relayed, a command arrives and its ack becomes the reply', async () => {
  await withEnv(async ({ hub, gw, site, seen }) => {
    const id = 'esp-mosq';
    await run('mosquitto_pub', [...mqttArgs(gw.mqttPort, site, id), '-t', mcuTopic(id, 'hello'), '-m', '{"fw":"3.1.0","boot":"power_on"}']);
    await run('mosquitto_pub', [...mqttArgs(gw.mqttPort, site, id), '-t', mcuTopic(id, 't'), '-m', '[{"n":"temperature","u":"Cel","v":21.5}]']);
    await waitFor(() => of(seen, id, 'telemetry').length === 1, 'telemetry at the hub');
    assert.equal((of(seen, id, 'telemetry')[0] as TelemetryBatch).samples[0]?.v, 21.5);
    await waitFor(() => of(seen, id, 'state').some((s) => s.version === '3.1.0'), 'version at the hub');
    await registered({ hub, gw }, [id]);
    const cmd = await hub.sendCommand(id, 'ping', { n: 1 }, 60_000);
    // a wrong password is refused by the broker
    await assert.rejects(run('mosquitto_pub', ['-h', '127.0.0.1', '-p', String(gw.mqttPort), '-V', 'mqttv311', '-i', id, '-u', id, '-P', 'wrong', '-t', mcuTopic(id, 't'), '-m', '[]']), (e: { stderr?: string }) => {
      assert.match(e.stderr ?? '', /not authori[sz]ed|bad user ?name or password/i);
      return true;
    });
    const sub = await run('mosquitto_sub', [...mqttArgs(gw.mqttPort, site, id), '-t', mcuTopic(id, 'cmd'), '-C', '1', '-W', '10'], { encoding: 'buffer' });
    const frame = Buffer.from(sub.stdout).subarray(0, -1); // mosquitto_sub adds a newline
    const got = decodeMcuCommand(mcuKey(site, id), id, frame);
    assert.equal(got.cmd.id, cmd.id);
    await run('mosquitto_pub', [...mqttArgs(gw.mqttPort, site, id), '-t', mcuTopic(id, 'ack'), '-m', JSON.stringify({ id: cmd.id, ok: true, r: 'pong' })]);
    await waitFor(() => (of(seen, id, 'reply') as CommandReply[]).some((r) => r.id === cmd.id && r.result === 'pong'), 'reply at the hub');
  });
});

test('interop: coap-client-notls — Block2 firmware GET (of a signed bundle\'s image) at block sizes 16, 64, 256, 1024 gives the same sha256; Observe of the mailbox; a Block1 upload with a new token per block', async () => {
  const tmp = tempDir('fleetlet-interop-');
  const fw = signedFirmware();
  try {
    await withEnv(async ({ hub, gw, site, seen, dir }) => {
      const id = 'esp-lib';
      const image = Buffer.alloc(3000 + 77);
      for (let i = 0; i < image.length; i++) image[i] = (i * 131 + 17) & 0xff;
      const file = join(dir, 'fw.fbundle');
      const bundle = fw.bundle(file, image, '1.1.0');
      const sha = createHash('sha256').update(image).digest('hex');
      assert.equal((await coap(gw.coapPort, site, id, 'hello', 'POST', Buffer.from('{"fw":"1.0.0","boot":"power_on"}'))).code, '2.04');
      await registered({ hub, gw }, [id]);
      await hub.setDesired(id, { apps: {}, firmware: { version: '1.1.0', url: pathToFileURL(file).href, sha256: createHash('sha256').update(bundle).digest('hex'), size: bundle.length } });
      await waitFor(() => gw.firmwareState(id)?.state === 'offered', 'offered');

      for (const size of [16, 64, 256, 1024]) {
        const out = join(tmp.dir, `fw-${size}.bin`);
        await run('coap-client-notls', ['-m', 'get', '-b', String(size), '-o', out, '-B', '30', coapUrl(gw.coapPort, site, id, 'fw')]);
        assert.equal(createHash('sha256').update(readFileSync(out)).digest('hex'), sha, `block size ${size}`);
      }
      assert.equal(gw.firmwareState(id)?.state, 'transferring');

      // Observe the mailbox for up to 30 s (room for synced writes on a slow disk); the offer is there at once, a command follows after the ack
      const obs = spawn('coap-client-notls', ['-m', 'get', '-s', '30', '-B', '32', coapUrl(gw.coapPort, site, id, 'cmd')], { stdio: ['ignore', 'pipe', 'pipe'] });
      let out = '';
      obs.stdout.on('data', (d: Buffer) => (out += d.toString('latin1')));
      const exited = new Promise<number | null>((r) => obs.on('exit', (code) => r(code)));
      await waitFor(() => /"n":"fw.update"/.test(out), 'the offer notified');
      const offerId = /"id":"([^"]+)"/.exec(out)![1]!;
      const cmd = await hub.sendCommand(id, 'blink', {}, 60_000);
      assert.equal((await coap(gw.coapPort, site, id, 'ack', 'POST', Buffer.from(JSON.stringify({ id: offerId, ok: true })))).code, '2.04');
      await waitFor(() => out.includes(`"id":"${cmd.id}"`), 'the next command notified after the ack', 25_000);
      obs.kill();
      await exited;
      const frame = Buffer.from(out.slice(out.lastIndexOf('c=')).replace(/\n$/, ''), 'latin1');
      assert.equal(decodeMcuCommand(mcuKey(site, id), id, frame).cmd.id, cmd.id);

      // Block1 upload of a crash dump: libcoap sends a new token with every block
      const dump = Array.from({ length: 40 }, (_, i) => `backtrace frame ${i}: 0x400d${(i * 4660).toString(16).padStart(4, '0')}`).join('\n') + '\n';
      const dumpFile = join(tmp.dir, 'crash.txt');
      writeFileSync(dumpFile, dump);
      const res = await run('coap-client-notls', ['-m', 'post', '-b', '64', '-t', '0', '-f', dumpFile, '-B', '30', coapUrl(gw.coapPort, site, id, 'log', Buffer.from(dump))]);
      assert.doesNotMatch(res.stdout + res.stderr, /4\.\d\d|5\.\d\d/);
      await waitFor(() => of(seen, id, 'logs').length === 1, 'the upload at the hub as a log batch');
      const lines = (of(seen, id, 'logs')[0] as LogBatch).lines;
      assert.equal(lines.length, 40);
      assert.equal(lines[39]!.line, dump.split('\n')[39]);
      // a second upload with a wrong MAC is refused at the last block (4.01) and counted
      const bad = `coap://127.0.0.1:${gw.coapPort}${coapPath(id, 'log')}?c=${nextCounter()}&m=AAAAAAAAAAAAAAAAAAAAAA`;
      const refused = await run('coap-client-notls', ['-m', 'put', '-b', '64', '-f', dumpFile, '-B', '10', bad]).then(
        (r) => r.stdout + r.stderr,
        (e: { stdout?: string; stderr?: string }) => `${e.stdout ?? ''}${e.stderr ?? ''}`,
      );
      assert.match(refused, /4\.01/);
      assert.equal(of(seen, id, 'logs').length, 1);
    }, {}, fw.extras);
  } finally {
    fw.cleanup();
    tmp.cleanup();
  }
});

test('interop: malformed CoAP, MQTT, CBOR and SenML, replayed and forged messages are dropped and counted; the gateway stays up; promtool accepts /metrics', async () => {
  await withEnv(async ({ gw, site, seen }) => {
    const id = 'esp-bad';
    const udp = createSocket('udp4');
    const send = (b: Buffer) => new Promise<void>((r) => udp.send(b, gw.coapPort, '127.0.0.1', () => r()));
    for (let i = 0; i < 200; i++) await send(Buffer.from(Array.from({ length: 1 + (i % 40) }, (_, k) => (k * 97 + i * 13) & 0xff)));
    await send(Buffer.alloc(20_000, 0x41)); // oversized datagram
    await new Promise<void>((r) => udp.close(() => r()));

    // garbage on the MQTT port, before and after CONNECT
    for (const junk of [Buffer.from('GET / HTTP/1.1\r\n\r\n'), Buffer.from([0x10, 0xff, 0xff, 0xff, 0x7f]), Buffer.from([0x30, 0x02, 0x00])]) {
      const sock = createConnection(gw.mqttPort, '127.0.0.1');
      await new Promise<void>((r) => sock.on('connect', () => r()));
      sock.write(junk);
      await new Promise<void>((r) => {
        sock.on('close', () => r());
        sock.on('error', () => r());
        setTimeout(() => sock.destroy(), 500).unref();
      });
    }
    // malformed CBOR and SenML over MQTT (mosquitto_pub -f sends the bytes as they are)
    const tmp = tempDir('fleetlet-interop-');
    try {
      const cbor = join(tmp.dir, 'bad.cbor');
      writeFileSync(cbor, Buffer.from('9bffffffffffffffff', 'hex'));
      await run('mosquitto_pub', [...mqttArgs(gw.mqttPort, site, id), '-t', mcuTopic(id, 't'), '-f', cbor]);
      await run('mosquitto_pub', [...mqttArgs(gw.mqttPort, site, id), '-t', mcuTopic(id, 't'), '-m', '[{"n":"","v":"x"}]']);
      await run('mosquitto_pub', [...mqttArgs(gw.mqttPort, site, id), '-t', mcuTopic(id, 'hello'), '-m', '{"fw":1}']);
    } finally {
      tmp.cleanup();
    }
    // CoAP: forged MAC, replay, bad CBOR with a valid MAC
    const body = Buffer.from('[{"n":"a","v":1}]');
    const c = nextCounter();
    const url = (m: string) => `coap://127.0.0.1:${gw.coapPort}${coapPath(id, 't')}?c=${c}&m=${m}`;
    const good = signMcuMessage(mcuKey(site, id), id, 't', c, body);
    const forged = await run('coap-client-notls', ['-m', 'post', '-t', '110', '-e', body.toString(), '-B', '10', url('A'.repeat(22))]);
    assert.match(forged.stdout + forged.stderr, /4\.01|FLEET_MCU_AUTH/);
    await run('coap-client-notls', ['-m', 'post', '-t', '110', '-e', body.toString(), '-B', '10', url(good)]);
    const replay = await run('coap-client-notls', ['-m', 'post', '-t', '110', '-e', body.toString(), '-B', '10', url(good)]);
    assert.match(replay.stdout + replay.stderr, /4\.01|FLEET_MCU_REPLAY/);
    assert.equal((await coap(gw.coapPort, site, id, 't', 'POST', Buffer.from('a2ff', 'hex'), { format: 112 })).code, '4.00');

    // still up: a good message goes through
    assert.equal((await coap(gw.coapPort, site, id, 't', 'POST', Buffer.from('[{"n":"ok","v":2}]'))).code, '2.04');
    await waitFor(() => of(seen, id, 'telemetry').length === 2, 'the two good messages at the hub');
    const d = gw.stats().dropped;
    assert.ok((d.bad_request ?? 0) >= 100, `bad_request ${d.bad_request}`);
    assert.match(await (await fetch(`http://127.0.0.1:${gw.httpPort}/metrics`)).text(), /fleet_gateway_mcu_dropped_total\{protocol="mqtt",reason="bad_request"\} [1-9]/);
    assert.ok((d.too_large ?? 0) >= 2, `too_large ${d.too_large}`);
    assert.ok((d.decode ?? 0) >= 4, `decode ${d.decode}`);
    assert.ok((d.auth ?? 0) >= 1 && (d.replay ?? 0) >= 1);

    const page = await (await fetch(`http://127.0.0.1:${gw.httpPort}/metrics`)).text();
    const r = spawnSync('promtool', ['check', 'metrics'], { input: page, encoding: 'utf8' });
    if (r.error) throw r.error;
    assert.equal(r.status, 0, `${r.stdout}${r.stderr}`);
    assert.match(page, /fleet_gateway_mcu_dropped_total\{protocol="coap",reason="bad_request"\} \d+/);
  });
});

/**
 * `text` uploaded by coap-client-notls as MCU `id` (Block1, 1024-byte blocks, Content-Format
 * text) through a real gateway and hub; `check` gets the log batches once every line arrived.
 */
async function uploadedLog(id: string, text: string, mcu: Partial<GatewayConfig['mcu']>, check: (batches: LogBatch[]) => void): Promise<void> {
  const tmp = tempDir('fleetlet-upload-');
  try {
    await withEnv(async ({ gw, site, seen }) => {
      const file = join(tmp.dir, 'upload.log');
      writeFileSync(file, text);
      const res = await run('coap-client-notls', ['-m', 'post', '-b', '1024', '-t', '0', '-f', file, '-B', '120', coapUrl(gw.coapPort, site, id, 'log', Buffer.from(text))], { maxBuffer: 16 * 1024 * 1024 });
      assert.doesNotMatch(res.stdout + res.stderr, /4\.\d\d|5\.\d\d/);
      const lines = text.split('\n').length - 1;
      await waitFor(() => (of(seen, id, 'logs') as LogBatch[]).reduce((n, b) => n + b.lines.length, 0) === lines, 'every line at the hub', 60_000);
      check(of(seen, id, 'logs') as LogBatch[]);
    }, mcu);
  } finally {
    tmp.cleanup();
  }
}

test('interop: coap-client-notls uploads a 1.5 MiB log (Block1, 1024-byte blocks); it reaches the hub whole, in order, as several records each below the hub payload limit', async () => {
  // 40,000 lines (more than one record may hold) of about 40 characters: ~1.5 MiB
  const text = Array.from({ length: 40_000 }, (_, i) => `line ${String(i).padStart(6, '0')} ${'x'.repeat(28)}`).join('\n') + '\n';
  await uploadedLog('esp-biglog', text, { maxUploadBytes: 4 * 1024 * 1024 }, (batches) => {
    assert.ok(batches.length >= 4, `split into records (${batches.length})`);
    for (const b of batches) assert.ok(Buffer.byteLength(JSON.stringify(b)) < 1024 * 1024, 'each record below the hub payload limit');
    const lines = batches.flatMap((b) => b.lines.map((l) => l.line));
    assert.deepEqual(lines, text.split('\n').slice(0, -1), 'all lines, in order');
  });
});

test('interop: coap-client-notls uploads 400 KB of control characters (valid UTF-8, six bytes each once JSON-escaped); every record stays below the hub payload limit and the text arrives whole', async () => {
  const line = '\u0001'.repeat(99);
  const text = Array.from({ length: 4000 }, () => line).join('\n') + '\n';
  await uploadedLog('esp-ctrllog', text, { maxUploadBytes: 1024 * 1024, msgRate: 0 }, (batches) => {
    for (const b of batches) assert.ok(Buffer.byteLength(JSON.stringify(b)) < 512 * 1024, `each record well below the hub payload limit (${Buffer.byteLength(JSON.stringify(b))})`);
    assert.ok(batches.every((b) => b.lines.every((l) => l.line === line)));
  });
});
