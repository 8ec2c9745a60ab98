import { createSocket } from 'node:dgram';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Agent, request as coapRequest } from 'coap';
import mqtt, { type MqttClient } from 'mqtt';
import { firmwareVerifier } from '../../cli/commands/gateway.ts';
import { deriveToken } from '../../core/credentials.ts';
import { decodeMessage } from '../../core/messages.ts';
import { writeSecretFile } from '../../core/secrets.ts';
import { deviceTopic } from '../../core/topics.ts';
import { mcuKey, signMcuMessage } from '../../firmware-bridge/auth.ts';
import { coapAuthQuery, coapPath } from '../../firmware-bridge/coap.ts';
import type { McuChannel } from '../../firmware-bridge/topics.ts';
import { GatewayConfigSchema, type GatewayConfig } from '../../gateway/config.ts';
import { startGateway, type GatewayExtras, type GatewayHandle, type VerifyFirmware } from '../../gateway/index.ts';
import { HubConfigSchema } from '../../hub/config.ts';
import { startHub, type HubHandle } from '../../hub/index.ts';
import { craftBundle, makeRoot, manifestFor, newKeys } from '../bundles/fixtures.ts';
import { tempDir, testLogger, waitFor } from '../helpers.ts';

/** Shared by the gateway feature and interop tests: a real hub and one gateway on port 0. */
export interface Seen {
  topic: string;
  payload: Buffer;
}

export interface Env {
  hub: HubHandle;
  gw: GatewayHandle;
  site: string;
  seen: Seen[];
  dir: string;
  gwDir: string;
  hubUrl: string;
  /** publishes and subscriptions the hub's ACL refused (from its log) */
  hubRefusals(): string[];
  /** another gateway gw-1 on the same state dir (after the first one stopped), with mcu overrides */
  start(overrides?: Partial<GatewayConfig['mcu']>, more?: MoreGatewayConfig): Promise<GatewayHandle>;
  restart(): Promise<GatewayHandle>;
}

/**
 * A raw-image "verifier" (mock of bundles/ verifyBundle, which the gateway must not
 * import; the CLI wires the real one): the bundle file *is* the image. Used by these
 * tests only, and named so.
 */
export const rawImageVerifierMock: VerifyFirmware = async (file, expect) => ({ version: expect.version, image: readFileSync(file) });

/**
 * Real firmware bundles for a gateway test: a trust root with one signing key, the verifier
 * the CLI wires (cli/commands/gateway.ts firmwareVerifier: signature, expiry, kind, then the
 * image extracted), and `bundle` to write a signed firmware bundle holding `image`.
 */
export function signedFirmware(): { extras: GatewayExtras; bundle(file: string, image: Buffer, version: string, sequence?: number): Buffer; cleanup(): void } {
  const [key] = newKeys(1);
  const tmp = tempDir('fleetlet-fw-trust-');
  const trustFile = join(tmp.dir, 'root.json');
  writeFileSync(trustFile, makeRoot([key!], 1).bytes);
  return {
    extras: { verifyFirmware: firmwareVerifier(trustFile, join(tmp.dir, 'work')) },
    bundle: (file, image, version, sequence = 1) => {
      const files = [{ path: 'firmware.bin', data: image }];
      return craftBundle(file, { files, manifest: manifestFor(files, { kind: 'firmware', name: 'esp32-fw', version, sequence }), signers: [key!.privateKey] });
    },
    cleanup: () => tmp.cleanup(),
  };
}


/** more of the gateway's config, merged in (given the hub, for settings that name its ports) */
export type MoreGatewayConfig = { outbox?: Record<string, unknown>; firmwareBaseUrl?: string };

export async function withEnv(fn: (env: Env) => Promise<void>, mcu: Partial<GatewayConfig['mcu']> = {}, extras: GatewayExtras = { verifyFirmware: rawImageVerifierMock }, gateway: MoreGatewayConfig | ((hub: HubHandle) => MoreGatewayConfig) = {}): Promise<void> {
  const tmp = tempDir();
  const hubLog = testLogger('hub');
  const hub = await startHub(HubConfigSchema.parse({ mqttPort: 0, httpPort: 0, stateDir: join(tmp.dir, 'hub') }), hubLog);
  const hubRefusals = () => hubLog.lines.filter((l) => /refused/.test(String(l.msg))).map((l) => `${String(l.msg)} ${String(l.topic)} ${String(l.why)}`);
  const hubUrl = `mqtt://127.0.0.1:${hub.mqttPort}`;
  // Everything the hub's broker accepts, in the order it accepts it. An in-process
  // subscription rather than an MQTT operator client: aedes 1.2 drops a QoS 1 message
  // for a client when it comes after a newer one from the same broker (its dedupe by
  // brokerCounter), so an MQTT subscriber does not reliably see every message.
  const seen: Seen[] = [];
  const collect = (packet: { topic: string; payload: Buffer | string }, cb: () => void) => {
    seen.push({ topic: packet.topic, payload: Buffer.from(packet.payload) });
    cb();
  };
  await new Promise<void>((r) => hub.broker.aedes.subscribe('fleet/v1/#', collect, r));
  const gwDir = join(tmp.dir, 'gateway');
  writeSecretFile(join(gwDir, 'token'), deriveToken(readFileSync(hub.fleetSecretFile, 'utf8').trim(), 'device', 'gw-1'));
  const gws: GatewayHandle[] = [];
  const start = async (overrides: Partial<GatewayConfig['mcu']> = {}, more: MoreGatewayConfig = {}) => {
    const config = GatewayConfigSchema.parse({ deviceId: 'gw-1', stateDir: gwDir, hub: { url: hubUrl, reconnectMs: 200 }, ...(typeof gateway === 'function' ? gateway(hub) : gateway), ...more, mcu: { mqttPort: 0, coapPort: 0, ...mcu, ...overrides }, http: { port: 0 } });
    const g = await startGateway(config, testLogger('gateway'), '0.0.0-test', extras);
    gws.push(g);
    return g;
  };
  try {
    const gw = await start();
    const site = readFileSync(gw.siteSecretFile, 'utf8').trim();
    await waitFor(() => gw.stats().hubConnected, 'gateway connected');
    await fn({ hub, gw, site, seen, dir: tmp.dir, gwDir, hubUrl, hubRefusals, start, restart: () => start() });
  } finally {
    for (const g of gws) await g.stop();
    await new Promise<void>((r) => hub.broker.aedes.unsubscribe('fleet/v1/#', collect, r));
    await hub.stop();
    tmp.cleanup();
  }
}

/**
 * The MCUs `ids` are registered for gw-1 at the hub and covered by the relay's subscription
 * to their downlink topics (its SUBACK came), so a command or desired state sent now reaches
 * the gateway (a fixed 300 ms wait was short on a loaded machine).
 */
export async function registered(env: Pick<Env, 'hub' | 'gw'>, ids: readonly string[]): Promise<void> {
  await waitFor(() => ids.every((id) => env.hub.broker.mcusOf('gw-1')?.has(id)), `${ids.join(', ')} registered`);
  const downlink = async () => Number(/^fleet_gateway_downlink_mcus (\d+)/m.exec(await (await fetch(`http://127.0.0.1:${env.gw.httpPort}/metrics`)).text())?.[1]);
  await waitFor(async () => (await downlink()) >= env.gw.stats().mcus, 'the relay subscribed for every MCU it knows');
}

export const of = <C extends 'reply' | 'events' | 'state' | 'telemetry' | 'logs'>(seen: Seen[], id: string, ch: C) => seen.filter((s) => s.topic === deviceTopic(id, ch)).map((s) => decodeMessage(ch, s.payload));

export function connectMcu(port: number, id: string, site: string): Promise<MqttClient> {
  return new Promise((resolve, reject) => {
    const c = mqtt.connect(`mqtt://127.0.0.1:${port}`, { clientId: id, username: id, password: mcuKey(site, id), reconnectPeriod: 0, connectTimeout: 5000 });
    c.once('connect', () => resolve(c));
    c.once('error', (err) => {
      c.end(true);
      reject(err);
    });
  });
}

let counter = Date.now();
/** A fresh MAC counter (above every earlier one in this process). */
export function nextCounter(): number {
  return ++counter;
}
/** One signed CoAP request (fresh socket); GETs carry the MAC over an empty payload. */
export function coap(port: number, site: string, id: string, resource: McuChannel, method: 'GET' | 'POST', payload: Buffer = Buffer.alloc(0), opts: { format?: number; block2?: number; extraQuery?: string; counter?: number } = {}): Promise<{ code: string; body: Buffer }> {
  // `counter`: a given one (a replay of an earlier message), else a fresh one
  const c = opts.counter ?? ++counter;
  const mac = signMcuMessage(mcuKey(site, id), id, resource, c, method === 'GET' ? Buffer.alloc(0) : payload);
  return new Promise((resolve, reject) => {
    const req = coapRequest({ host: '127.0.0.1', port, method, pathname: coapPath(id, resource), query: coapAuthQuery(c, mac) + (opts.extraQuery ?? ''), confirmable: true, agent: new Agent({ type: 'udp4' }) });
    if (opts.format !== undefined) req.setOption('Content-Format', opts.format);
    if (opts.block2 !== undefined) req.setOption('Block2', Buffer.from([(Math.log2(opts.block2) - 4) & 7]));
    req.on('response', (res) => resolve({ code: res.code, body: res.payload }));
    req.on('error', reject);
    req.on('timeout', reject);
    req.end(method === 'POST' ? payload : undefined);
  });
}

/** GET fw with an explicit Block2 option (one block), the way an MCU resumes. */
export function coapBlock(port: number, site: string, id: string, num: number, size: number, extraQuery = ''): Promise<{ code: string; body: Buffer }> {
  const c = ++counter;
  const mac = signMcuMessage(mcuKey(site, id), id, 'fw', c, Buffer.alloc(0));
  const szx = Math.log2(size) - 4;
  const v = (num << 4) | szx;
  const opt = v < 256 ? Buffer.from([v]) : Buffer.from([v >> 8, v & 0xff]);
  return new Promise((resolve, reject) => {
    const req = coapRequest({ host: '127.0.0.1', port, method: 'GET', pathname: coapPath(id, 'fw'), query: coapAuthQuery(c, mac) + extraQuery, confirmable: true, agent: new Agent({ type: 'udp4' }) });
    req.setOption('Block2', opt);
    req.on('response', (res) => resolve({ code: res.code, body: res.payload }));
    req.on('error', reject);
    req.on('timeout', reject); // the coap package's CON out of retransmissions
    req.end();
  });
}



/** A raw CoAP peer: a UDP socket on loopback that keeps every datagram it receives (`got`) and sends to the gateway's `port`. */
export async function udpPeer(port: number): Promise<{ got: Buffer[]; send(buf: Buffer): Promise<void>; close(): Promise<void> }> {
  const sock = createSocket('udp4');
  await new Promise<void>((r) => sock.bind(0, '127.0.0.1', () => r()));
  const got: Buffer[] = [];
  sock.on('message', (m) => got.push(m));
  return {
    got,
    send: (buf) => new Promise<void>((r, j) => sock.send(buf, port, '127.0.0.1', (err) => (err ? j(err) : r()))),
    close: () => new Promise<void>((r) => sock.close(() => r())),
  };
}
