import { readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import mqtt from 'mqtt';
import { deriveToken } from '../../core/credentials.ts';
import { stopChild } from '../../core/proc.ts';
import { loadOrCreateSecret, writeSecretFile } from '../../core/secrets.ts';
import { parseTopic } from '../../core/topics.ts';
import type { TestContext } from 'node:test';
import type { SimHandle } from '../../esp32-sim/sim.ts';
import { Parts } from '../e2e/procs.ts';
import { tempDir } from '../helpers.ts';

export interface HubReady {
  mqttPort: number;
  httpPort: number;
  fleetSecretFile: string;
  operatorTokenFile: string;
}
export interface GatewayReady {
  mqttPort: number;
  coapPort: number;
  siteSecretFile: string;
}

/**
 * Hub and gateway as real child processes (`fleetlet hub`, `fleetlet gateway` from
 * source) on loopback, for the gateway fault tests and the sim tests. The gateway gets
 * a JSON config file so tests can tune reconnects, uplink and MCU settings.
 */
export class Stack {
  readonly parts: Parts;
  hub!: { child: import('node:child_process').ChildProcess; ready: HubReady };
  gw!: { child: import('node:child_process').ChildProcess; ready: GatewayReady };
  readonly siteSecretFile: string;
  readonly gwId: string;
  private hubStarts = 0;
  private gwStarts = 0;
  private gwConfigFile = '';

  constructor(
    readonly dir: string,
    gwId = 'gw-e2e',
  ) {
    this.parts = new Parts(dir);
    this.gwId = gwId;
    this.siteSecretFile = join(dir, 'cred', 'site.secret');
    loadOrCreateSecret(this.siteSecretFile);
  }

  get siteSecret(): string {
    return readFileSync(this.siteSecretFile, 'utf8').trim();
  }

  get hubUrl(): string {
    return `mqtt://127.0.0.1:${this.hub.ready.mqttPort}`;
  }

  /** Start (or restart, on the same port and state dir) the hub. */
  async startHub(mqttPort = 0): Promise<void> {
    this.hub = await this.parts.start<HubReady>(`hub-${++this.hubStarts}`, ['hub', '--mqtt-port', String(mqttPort), '--http-port', '0', '--state-dir', join(this.dir, 'hub')]);
  }

  async stopHub(): Promise<void> {
    await stopChild(this.hub.child, 10_000);
  }

  /** Start (or restart, on the same ports and state dir) the gateway; `extra` is merged into its config file. */
  async startGateway(extra: Record<string, unknown> = {}, ports?: { mqttPort: number; coapPort: number }): Promise<void> {
    if (this.gwStarts === 0) {
      const tokenFile = join(this.dir, 'cred', `${this.gwId}.token`);
      writeSecretFile(tokenFile, deriveToken(readFileSync(this.hub.ready.fleetSecretFile, 'utf8').trim(), 'device', this.gwId));
      this.gwConfigFile = join(this.dir, 'gateway.json');
      const config = {
        deviceId: this.gwId,
        stateDir: join(this.dir, 'gateway'),
        ...extra,
        hub: { url: this.hubUrl, tokenFile, reconnectMs: 200, reconnectMaxMs: 1000, ...((extra.hub as object | undefined) ?? {}) },
        mcu: { mqttPort: 0, coapPort: 0, siteSecretFile: this.siteSecretFile, ...((extra.mcu as object | undefined) ?? {}) },
      };
      writeFileSync(this.gwConfigFile, JSON.stringify(config, null, 2));
    }
    const args = ['gateway', '--config', this.gwConfigFile];
    if (ports) args.push('--mqtt-port', String(ports.mqttPort), '--coap-port', String(ports.coapPort));
    this.gw = await this.parts.start<GatewayReady>(`gateway-${++this.gwStarts}`, args);
  }

  async stop(): Promise<void> {
    await this.parts.stopAll();
  }

  /** The hub's operator HTTP API. */
  async api<T = unknown>(method: string, path: string, body?: unknown): Promise<{ status: number; body: T }> {
    const res = await fetch(`http://127.0.0.1:${this.hub.ready.httpPort}${path}`, {
      method,
      headers: { authorization: `Bearer ${readFileSync(this.hub.ready.operatorTokenFile, 'utf8').trim()}`, 'content-type': 'application/json' },
      ...(body !== undefined ? { body: JSON.stringify(body) } : {}),
    });
    return { status: res.status, body: (await res.json().catch(() => null)) as T };
  }
}

/** One telemetry message as the consumer saw it. */
export interface Seen {
  count: number;
  /** hub arrival time minus the sample time, ms (first arrival) */
  latencyMs: number;
}

/**
 * An operator consumer on the hub, subscribed to every device's telemetry, counting
 * each simulated reading by (device, seq) — the sim puts a `seq` sample in every
 * message — so losses and duplicates can be told apart.
 */
export class Consumer {
  readonly seen = new Map<string, Seen>();
  /** every state message per device, in order (retained ones first) */
  readonly states = new Map<string, Array<Record<string, unknown>>>();
  /** command replies per device */
  readonly replies = new Map<string, Array<{ id: string; ok: boolean; result?: unknown; error?: { code?: string; message?: string } }>>();
  /** events per device */
  readonly events = new Map<string, Array<{ type: string; data?: Record<string, unknown> }>>();
  messages = 0;
  client!: mqtt.MqttClient;

  static async connect(stack: Stack, clientId = 'e2e-consumer'): Promise<Consumer> {
    const c = new Consumer();
    c.client = mqtt.connect(stack.hubUrl, {
      clientId,
      clean: false, // the hub keeps the subscription and queues for it across a hub restart
      username: 'operator',
      password: readFileSync(stack.hub.ready.operatorTokenFile, 'utf8').trim(),
      reconnectPeriod: 300,
    });
    c.client.on('message', (topic, payload) => c.onMessage(topic, payload));
    c.client.on('error', () => undefined);
    await new Promise<void>((r) => c.client.once('connect', () => r()));
    await c.client.subscribeAsync(['fleet/v1/d/+/telemetry', 'fleet/v1/d/+/state', 'fleet/v1/d/+/reply', 'fleet/v1/d/+/events'], { qos: 1 });
    return c;
  }

  private onMessage(topic: string, payload: Buffer): void {
    const p = parseTopic(topic);
    if (!p) return;
    const push = <T>(m: Map<string, T[]>, v: T) => {
      const a = m.get(p.deviceId);
      if (a) a.push(v);
      else m.set(p.deviceId, [v]);
    };
    if (p.channel === 'state') return push(this.states, JSON.parse(payload.toString('utf8')) as Record<string, unknown>);
    if (p.channel === 'reply') return push(this.replies, JSON.parse(payload.toString('utf8')) as { id: string; ok: boolean });
    if (p.channel === 'events') return push(this.events, JSON.parse(payload.toString('utf8')) as { type: string });
    if (p.channel !== 'telemetry') return;
    const now = Date.now();
    this.messages++;
    const msg = JSON.parse(payload.toString('utf8')) as { samples: Array<{ n: string; v?: number; t: number }> };
    const seq = msg.samples.find((s) => s.n === 'seq');
    if (!seq) return;
    const key = `${p.deviceId}#${seq.v}`;
    const s = this.seen.get(key);
    if (s) s.count++;
    else this.seen.set(key, { count: 1, latencyMs: now - seq.t });
  }

  lastState(id: string): Record<string, unknown> | undefined {
    return this.states.get(id)?.at(-1);
  }

  /** readings seen from one device */
  readingsOf(id: string): number {
    let n = 0;
    for (const k of this.seen.keys()) if (k.startsWith(`${id}#`)) n++;
    return n;
  }

  /**
   * Wait until every key in `acked` was seen; give up after `maxMs`, or sooner once
   * nothing new has arrived for `quietMs` (then the rest is not coming).
   */
  async waitAll(acked: Set<string>, what: string, maxMs = 120_000, quietMs = 20_000): Promise<void> {
    const end = Date.now() + maxMs;
    let last = -1;
    let since = Date.now();
    for (;;) {
      if (this.missing(acked).length === 0) return;
      if (this.messages !== last) {
        last = this.messages;
        since = Date.now();
      }
      if (Date.now() > end || Date.now() - since > quietMs) throw new Error(`gave up waiting for ${what} (${Date.now() - since > quietMs ? `nothing new for ${quietMs} ms` : `${maxMs} ms`})`);
      await new Promise((r) => setTimeout(r, 100));
    }
  }

  duplicates(): string[] {
    return [...this.seen.entries()].filter(([, s]) => s.count > 1).map(([k, s]) => `${k}x${s.count}`);
  }

  missing(acked: Iterable<string>): string[] {
    const out: string[] = [];
    for (const k of acked) if (!this.seen.has(k)) out.push(k);
    return out;
  }

  async close(): Promise<void> {
    await this.client.endAsync(true);
  }
}

/**
 * For a failure message: what the consumer saw of the first few devices with missing
 * readings, and every line of the hub's and gateways' logs that names them.
 */
export function whyMissing(stack: Stack, consumer: Consumer, missing: string[]): string {
  const devices = [...new Set(missing.map((k) => k.split('#')[0]!))].slice(0, 3);
  const out: string[] = [];
  for (const id of devices) {
    const seqs = [...consumer.seen.keys()].filter((k) => k.startsWith(`${id}#`)).map((k) => Number(k.split('#')[1])).sort((a, b) => a - b);
    out.push(`${id}: missing ${missing.filter((k) => k.startsWith(`${id}#`)).join(',')}; seen ${seqs.length} readings, first ${seqs.slice(0, 8).join(',')}`);
  }
  for (const f of readdirSync(stack.dir).filter((f) => f.endsWith('.log'))) {
    const lines = readFileSync(join(stack.dir, f), 'utf8').split('\n').filter((l) => devices.some((id) => l.includes(id)) || /error|refus|denied|drop/i.test(l));
    if (lines.length) out.push(`--- ${f} (${lines.length} lines naming them or an error) ---`, ...lines.slice(0, 30));
  }
  return out.join('\n');
}

/**
 * What a fault test runs: a Stack (hub and gateway as processes) in a temp dir, the sims and
 * the hub consumer it starts; all stopped and removed when the test ends, failed or not.
 */
export function faultRig(t: TestContext, prefix: string): { stack: Stack; sims: SimHandle[]; connectConsumer(): Promise<Consumer> } {
  const tmp = tempDir(prefix);
  const stack = new Stack(tmp.dir);
  const sims: SimHandle[] = [];
  let consumer: Consumer | undefined;
  t.after(async () => {
    for (const s of sims) await s.stop().catch(() => undefined);
    await consumer?.close().catch(() => undefined);
    await stack.stop();
    tmp.cleanup();
  });
  return { stack, sims, connectConsumer: async () => (consumer = await Consumer.connect(stack)) };
}
