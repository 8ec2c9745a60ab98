import { createHash, createPrivateKey, createPublicKey, randomBytes, sign as cryptoSign, verify as cryptoVerify } from 'node:crypto';
import { rmSync } from 'node:fs';
import { createServer as createTcpServer, type AddressInfo } from 'node:net';
import { join, resolve } from 'node:path';
import type { Socket as UdpSocket } from 'node:dgram';
import { Aedes } from 'aedes';
import * as coap from 'coap';
import * as ed from '@noble/ed25519';
import { execa } from 'execa';
import mqtt from 'mqtt';
import cron from 'node-cron';
import si from 'systeminformation';
import { defineCommand, EXIT } from '../command.ts';
import { defaultStateDir } from '../../core/config.ts';
import { FleetError } from '../../core/errors.ts';
import { isSea, setNativeDir } from '../../core/native.ts';
import { openStore } from '../../core/store.ts';

/**
 * `fleetlet selftest` runs every third-party dependency once, inside whatever this
 * process is (the single executable or node + tsx). Bundling problems — a native addon
 * that did not travel, an optional module left out, `import.meta.url` empty in CJS —
 * only show when the code path runs, so each check takes its dependency's real path
 * rather than just importing it.
 */

interface Ctx {
  stateDir: string;
  /** cleanup that must run even when the check times out; run in reverse order */
  defer(fn: () => unknown): void;
}

interface Check {
  name: string;
  run(ctx: Ctx): Promise<string>;
}

interface Result {
  name: string;
  ok: boolean;
  ms: number;
  detail: string;
}

const CHECK_TIMEOUT_MS = 15_000;

function timeout<T>(ms: number, what: string): { promise: Promise<T>; cancel(): void } {
  let timer: NodeJS.Timeout | undefined;
  const promise = new Promise<T>((_resolve, reject) => {
    timer = setTimeout(() => reject(new FleetError('FLEET_TIMEOUT', `${what}: no result within ${ms} ms`)), ms);
  });
  return { promise, cancel: () => clearTimeout(timer) };
}

const levelCheck: Check = {
  name: 'level',
  async run(ctx) {
    // a fresh directory per run so a leftover store from an earlier crash cannot make this pass
    const dir = join(ctx.stateDir, `selftest-level-${process.pid}-${randomBytes(4).toString('hex')}`);
    ctx.defer(() => rmSync(dir, { recursive: true, force: true }));
    const value = randomBytes(16).toString('hex');
    const first = await openStore<string>(dir, 'utf8');
    ctx.defer(() => first.close());
    await first.put('selftest', value);
    await first.close();
    // the reopen is the point: it proves the data reached LevelDB's files, not a cache
    const second = await openStore<string>(dir, 'utf8');
    ctx.defer(() => second.close());
    const got = await second.get('selftest');
    await second.close();
    if (got !== value) throw new Error(`read back ${JSON.stringify(got)} after reopen, wrote ${JSON.stringify(value)}`);
    return `put/get across close+reopen; addon ${isSea() ? `from SEA asset under ${join(ctx.stateDir, 'native')}` : 'from node_modules'}`;
  },
};

const mqttCheck: Check = {
  name: 'mqtt',
  async run(ctx) {
    const broker = await Aedes.createBroker();
    ctx.defer(() => new Promise<void>((done) => broker.close(() => done())));
    const server = createTcpServer(broker.handle);
    ctx.defer(() => new Promise<void>((done) => server.close(() => done())));
    await new Promise<void>((done, fail) => {
      server.once('error', fail);
      server.listen(0, '127.0.0.1', () => done());
    });
    const port = (server.address() as AddressInfo).port;
    const client = await mqtt.connectAsync(`mqtt://127.0.0.1:${port}`, { reconnectPeriod: 0, connectTimeout: 5000, clientId: `selftest-${process.pid}` });
    ctx.defer(() => client.endAsync(true));
    const topic = `selftest/${process.pid}`;
    const payload = randomBytes(8).toString('hex');
    const received = new Promise<{ text: string; qos: number }>((done) => {
      client.on('message', (t, msg, packet) => {
        if (t === topic) done({ text: msg.toString(), qos: packet.qos });
      });
    });
    const granted = await client.subscribeAsync(topic, { qos: 1 });
    if (granted[0]?.qos !== 1) throw new Error(`subscription granted QoS ${String(granted[0]?.qos)}, wanted 1`);
    await client.publishAsync(topic, payload, { qos: 1 });
    const got = await received;
    if (got.text !== payload || got.qos !== 1) throw new Error(`received ${JSON.stringify(got)}, wanted ${payload} at QoS 1`);
    return `aedes broker on 127.0.0.1:${port}, QoS 1 publish/subscribe round trip`;
  },
};

const coapCheck: Check = {
  name: 'coap',
  async run(ctx) {
    const server = coap.createServer((req, res) => {
      res.setOption('Content-Format', 'text/plain');
      res.end(`echo:${req.url}`);
    });
    ctx.defer(() => new Promise<void>((done) => server.close(() => done())));
    await new Promise<void>((done, fail) => server.listen(0, '127.0.0.1', (err) => (err ? fail(err) : done())));
    const port = ((server._sock as UdpSocket).address() as AddressInfo).port;
    // a private agent: the global one would keep its socket for later requests
    const agent = new coap.Agent({ type: 'udp4' });
    // wait for the 'close' event, not close()'s callback: coap 1.5 never calls the callback
    // when the agent already closed its socket by itself after the last response
    ctx.defer(
      () =>
        new Promise<void>((done) => {
          agent.once('close', () => done());
          agent.close();
        }),
    );
    const body = await new Promise<string>((done, fail) => {
      const req = coap.request({ hostname: '127.0.0.1', port, pathname: '/selftest', method: 'GET', agent, confirmable: true });
      req.on('response', (res: coap.IncomingMessage) => {
        if (res.code !== '2.05') return fail(new Error(`response code ${res.code}, wanted 2.05`));
        done(res.payload.toString());
      });
      req.on('error', fail);
      req.end();
    });
    if (body !== 'echo:/selftest') throw new Error(`payload ${JSON.stringify(body)}, wanted "echo:/selftest"`);
    return `coap server on 127.0.0.1:${port}, confirmable GET round trip`;
  },
};

const ed25519Check: Check = {
  name: 'ed25519',
  async run() {
    // noble's synchronous API needs a SHA-512; node's is the obvious one to give it
    ed.hashes.sha512 = (m: Uint8Array) => new Uint8Array(createHash('sha512').update(m).digest());
    const secret = ed.utils.randomSecretKey();
    const pub = ed.getPublicKey(secret);
    const msg = new TextEncoder().encode(`fleetlet selftest ${Date.now()}`);
    const nobleSig = ed.sign(msg, secret);
    if (!ed.verify(nobleSig, msg, pub, { zip215: false })) throw new Error('@noble/ed25519 rejected its own signature');

    const b64 = (b: Uint8Array) => Buffer.from(b).toString('base64url');
    const jwk = { kty: 'OKP', crv: 'Ed25519', x: b64(pub) };
    const nodePriv = createPrivateKey({ key: { ...jwk, d: b64(secret) }, format: 'jwk' });
    const nodePub = createPublicKey({ key: jwk, format: 'jwk' });
    const nodeSig = cryptoSign(null, msg, nodePriv);
    // Ed25519 is deterministic: the two implementations must agree byte for byte,
    // which is what lets bundles be signed by one and verified by the other
    if (!Buffer.from(nobleSig).equals(nodeSig)) throw new Error('node:crypto and @noble/ed25519 signatures differ');
    if (!cryptoVerify(null, msg, nodePub, Buffer.from(nobleSig))) throw new Error('node:crypto rejected the @noble/ed25519 signature');
    const tampered = Buffer.from(nodeSig);
    tampered[0] = (tampered[0] ?? 0) ^ 1;
    if (cryptoVerify(null, msg, nodePub, tampered) || ed.verify(tampered, msg, pub, { zip215: false })) throw new Error('a tampered signature verified');
    return 'sign/verify with @noble/ed25519 and node:crypto, identical signatures, tampered one refused';
  },
};

const systeminformationCheck: Check = {
  name: 'systeminformation',
  async run() {
    const [os, cpu] = await Promise.all([si.osInfo(), si.cpu()]);
    if (!os.platform || !(cpu.cores > 0)) throw new Error(`implausible answer: platform ${JSON.stringify(os.platform)}, cores ${cpu.cores}`);
    return `${os.platform} ${os.distro} ${os.release} ${os.arch}, ${cpu.cores} cores`.replace(/\s+/g, ' ');
  },
};

const execaCheck: Check = {
  name: 'execa',
  async run() {
    const res = await execa('/bin/sh', ['-c', 'echo ok'], { timeout: 10_000 });
    if (res.exitCode !== 0 || res.stdout !== 'ok') throw new Error(`/bin/sh exited ${res.exitCode} with ${JSON.stringify(res.stdout)}`);
    return `/bin/sh -c 'echo ok' -> ${JSON.stringify(res.stdout)}`;
  },
};

const cronCheck: Check = {
  name: 'node-cron',
  async run(ctx) {
    const started = Date.now();
    let task: ReturnType<typeof cron.schedule> | undefined;
    // inline function on purpose: node-cron's "task file" form forks a file that does not exist inside the binary
    const ticked = new Promise<void>((done) => {
      task = cron.schedule('* * * * * *', () => done(), { name: `selftest-${process.pid}` });
    });
    ctx.defer(async () => {
      await task?.stop();
      await task?.destroy();
    });
    await ticked;
    return `every-second schedule ticked after ${Date.now() - started} ms, stopped`;
  },
};

export const CHECKS: readonly Check[] = [levelCheck, mqttCheck, coapCheck, ed25519Check, systeminformationCheck, execaCheck, cronCheck];

async function runCheck(check: Check, stateDir: string): Promise<Result> {
  const cleanups: (() => unknown)[] = [];
  const ctx: Ctx = { stateDir, defer: (fn) => cleanups.push(fn) };
  const t0 = performance.now();
  const limit = timeout<string>(CHECK_TIMEOUT_MS, check.name);
  let result: Result;
  try {
    const detail = await Promise.race([check.run(ctx), limit.promise]);
    result = { name: check.name, ok: true, ms: Math.round(performance.now() - t0), detail };
  } catch (err) {
    result = { name: check.name, ok: false, ms: Math.round(performance.now() - t0), detail: err instanceof Error ? err.message : String(err) };
  } finally {
    limit.cancel();
  }
  // cleanup after timing: closing brokers and sockets is not what the check measures.
  // Each cleanup gets its own bound so one stuck close cannot hang the whole selftest.
  for (const fn of cleanups.reverse()) {
    const bound = timeout<void>(5000, `${check.name} cleanup`);
    try {
      await Promise.race([Promise.resolve().then(fn), bound.promise]);
    } catch (err) {
      if (result.ok) result = { ...result, ok: false, detail: `cleanup failed: ${(err as Error).message}` };
    } finally {
      bound.cancel();
    }
  }
  return result;
}

function formatLine(r: Result): string {
  return `${(r.ok ? 'ok' : 'FAIL').padEnd(4)} ${r.name.padEnd(17)} ${`${r.ms}ms`.padStart(7)}  ${r.detail}`;
}

export const selftestCommand = defineCommand({
  name: 'selftest',
  summary: 'check that every bundled dependency works in this executable',
  usage: '[--state-dir <dir>] [--json]',
  help: {
    'state-dir':
      'directory for the test store and the extracted native addon (default: $FLEETLET_STATE_DIR/selftest, as root /var/lib/fleetlet/selftest, else ~/.local/state/fleetlet/selftest)',
    json: 'print one JSON object instead of one line per check',
  },
  options: {
    'state-dir': { type: 'string' },
    json: { type: 'boolean' },
  },
  async run({ values }) {
    const stateDir = resolve(typeof values['state-dir'] === 'string' ? values['state-dir'] : defaultStateDir('selftest'));
    // before the first store is opened: the addon is extracted under <state-dir>/native,
    // never /tmp, which hardened devices mount noexec
    setNativeDir(stateDir);
    const json = values.json === true;
    const results: Result[] = [];
    for (const check of CHECKS) {
      const r = await runCheck(check, stateDir);
      results.push(r);
      if (!json) process.stdout.write(formatLine(r) + '\n');
    }
    const failed = results.filter((r) => !r.ok);
    if (json) process.stdout.write(JSON.stringify({ ok: failed.length === 0, sea: isSea(), stateDir, checks: results }) + '\n');
    if (failed.length > 0) {
      throw new FleetError('FLEET_SELFTEST_FAILED', `${failed.length} of ${results.length} checks failed: ${failed.map((r) => r.name).join(', ')}`, {
        details: { failed: failed.map((r) => r.name) },
      });
    }
    return EXIT.OK;
  },
});
