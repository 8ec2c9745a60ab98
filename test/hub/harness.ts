import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import mqtt, { type IClientOptions, type MqttClient } from 'mqtt';
import { deriveToken } from '../../core/credentials.ts';
import { encodeMessage } from '../../core/messages.ts';
import { HubConfigSchema, type HubConfig } from '../../hub/config.ts';
import type { DeadLetter } from '../../hub/dead-letters.ts';
import { startHub, type HubHandle } from '../../hub/index.ts';
import { tempDir, testLogger } from '../helpers.ts';

export interface HubCtx {
  secret: string;
  operator: string;
  url: string;
  http: string;
  /** what the hub logged (parsed JSON lines) */
  log: ReturnType<typeof testLogger>;
}

/** A real hub on free ports over a temp state dir (or `dir`), stopped and removed afterwards. */
export async function withHub(fn: (hub: HubHandle, ctx: HubCtx) => Promise<void>, dir?: string, config: Partial<HubConfig> = {}): Promise<void> {
  const tmp = dir ? { dir, cleanup: () => undefined } : tempDir();
  const log = testLogger('hub');
  const hub = await startHub(HubConfigSchema.parse({ mqttPort: 0, httpPort: 0, stateDir: tmp.dir, ...config }), log);
  try {
    await fn(hub, {
      log,
      secret: readFileSync(hub.fleetSecretFile, 'utf8').trim(),
      operator: readFileSync(hub.operatorTokenFile, 'utf8').trim(),
      url: `mqtt://127.0.0.1:${hub.mqttPort}`,
      http: `http://127.0.0.1:${hub.httpPort}`,
    });
  } finally {
    await hub.stop();
    tmp.cleanup();
  }
}

export function connect(url: string, clientId: string, username: string, password: string, extra: IClientOptions = {}): Promise<MqttClient> {
  return new Promise((resolve, reject) => {
    const c = mqtt.connect(url, { clientId, username, password, reconnectPeriod: 0, connectTimeout: 5000, ...extra });
    const failed = (err: Error) => {
      c.end(true);
      reject(err);
    };
    c.once('error', failed);
    c.once('connect', () => {
      // later errors (the hub going away) are the reconnect logic's business
      c.off('error', failed);
      c.on('error', () => undefined);
      resolve(c);
    });
  });
}

export function connectDevice(ctx: HubCtx, id: string, extra: IClientOptions = {}): Promise<MqttClient> {
  return connect(ctx.url, id, id, deriveToken(ctx.secret, 'device', id), extra);
}

export const telemetry = (mid: string) => encodeMessage({ v: 1, mid, ts: Date.now(), samples: [{ n: 'cpu.util', v: 12.5, u: '%', t: Date.now() }] });
export const event = (mid: string) => encodeMessage({ v: 1, mid, ts: Date.now(), type: 'test', severity: 'info' as const });
export const logs = (mid: string) => encodeMessage({ v: 1, mid, ts: Date.now(), lines: [{ t: Date.now(), app: 'a', stream: 'stdout' as const, line: 'hello' }] });

/** The value of one Prometheus sample (0 when absent), e.g. `fleet_hub_batches_total`. */
export async function metric(hub: HubHandle, sample: string): Promise<number> {
  const text = await (await fetch(`http://127.0.0.1:${hub.httpPort}/metrics`)).text();
  for (const line of text.split('\n')) {
    if (line.startsWith(`${sample} `)) return Number(line.slice(sample.length + 1));
  }
  return 0;
}

type StoreMethod = (this: unknown, ...args: unknown[]) => Promise<unknown>;

/**
 * Replace one method of aedes-persistence-level's store class, the real LevelDB store the hub
 * runs on, to inject a fault (slow or failing writes): `wrap` gets the original and returns
 * the replacement. Returns the undo, for a `finally` (tests in one file run one after another).
 */
export function patchStore(method: 'outgoingClearMessageId' | 'outgoingEnqueueCombi' | 'storeRetained', wrap: (orig: StoreMethod) => StoreMethod): () => void {
  const proto = (createRequire(import.meta.url)('aedes-persistence-level/asyncPersistence.js') as { prototype: Record<string, StoreMethod> }).prototype;
  const orig = proto[method]!;
  proto[method] = wrap(orig);
  return () => {
    proto[method] = orig;
  };
}

/**
 * The hub's dead letters through its API. The API answers once the dead letters being written
 * in the background are stored, so `records` counts every refusal the hub made before the call.
 */
export async function deadLetters(ctx: HubCtx, query = ''): Promise<{ records: number; evicted: number; deadLetters: DeadLetter[]; next: string | null }> {
  const res = await fetch(`${ctx.http}/api/v1/dead-letters${query}`, { headers: { authorization: `Bearer ${ctx.operator}` } });
  assert.equal(res.status, 200, await res.clone().text());
  return (await res.json()) as { records: number; evicted: number; deadLetters: DeadLetter[]; next: string | null };
}
