import { execFileSync } from 'node:child_process';
import type { TestContext } from 'node:test';
import { chmodSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { createSocket } from 'node:dgram';
import { createServer, type AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { createLogger, type Logger } from '../core/log.ts';

/** A temp dir removed when the returned cleanup runs. */
export function tempDir(prefix = 'fleetlet-test-'): { dir: string; cleanup: () => void } {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  return { dir, cleanup: () => rmSync(dir, { recursive: true, force: true }) };
}

/** Logs collected in memory (tests assert on them; set FLEETLET_TEST_LOG=1 to also print). */
export function testLogger(name = 'test'): Logger & { lines: Array<Record<string, unknown>> } {
  const lines: Array<Record<string, unknown>> = [];
  const echo = process.env.FLEETLET_TEST_LOG === '1';
  const log = createLogger({ name, level: 'debug', write: (l) => { lines.push(JSON.parse(l) as Record<string, unknown>); if (echo) process.stderr.write(l); } });
  return Object.assign(log, { lines });
}

/** Poll `fn` until it returns a truthy value; fail with `what` after `timeoutMs`. */
export async function waitFor<T>(fn: () => T | Promise<T>, what: string, timeoutMs = 10_000, everyMs = 25): Promise<NonNullable<T>> {
  const deadline = Date.now() + timeoutMs;
  let last: unknown;
  while (Date.now() < deadline) {
    try {
      const v = await fn();
      if (v) return v as NonNullable<T>;
    } catch (err) {
      last = err;
    }
    await sleep(everyMs);
  }
  throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}${last ? `: ${String(last)}` : ''}`);
}

/** xorshift32: a reproducible stream of integers in [0, n) for fuzz and fault loops (print the seed on failure). */
export function rng(seed: number): (n: number) => number {
  let x = seed >>> 0 || 1;
  return (n) => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x % n;
  };
}

/**
 * A TCP server on loopback that closes every connection at once, counting them: a "hub" a
 * client keeps reconnecting to (every reconnect shows as a connection).
 */
export async function closingServer(): Promise<{ port: number; connections(): number; close(): Promise<void> }> {
  let n = 0;
  const server = createServer((s) => {
    n++;
    s.destroy();
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  return { port: (server.address() as AddressInfo).port, connections: () => n, close: () => new Promise<void>((r) => server.close(() => r())) };
}

/** The seed of a fuzz loop: FLEETLET_FUZZ_SEED (to replay a failure), else a new one; put it in every failure message. */
export function fuzzSeed(): number {
  return Number(process.env.FLEETLET_FUZZ_SEED ?? Date.now() % 1e9);
}

/** `n` bytes from an `rng` stream */
export function bytesFrom(r: (n: number) => number, n: number): Buffer {
  const b = Buffer.alloc(n);
  for (let i = 0; i < n; i++) b[i] = r(256);
  return b;
}

/** A self-signed P-256 certificate for 127.0.0.1 and localhost (SAN, so clients verify the host), made by openssl. */
export function makeCert(dir: string, name: string): { cert: string; key: string } {
  const cert = join(dir, `${name}.crt`);
  const key = join(dir, `${name}.key`);
  execFileSync('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', key, '-out', cert, '-days', '2', '-subj', `/CN=${name}`, '-addext', 'subjectAltName=IP:127.0.0.1,DNS:localhost'], { stdio: 'ignore' });
  chmodSync(key, 0o600);
  return { cert, key };
}

/**
 * A free loopback port outside the kernel's ephemeral range, for a server a test stops and
 * starts again on the same port (a hub outage, a gateway killed): a port 0 listener of a
 * test file running alongside could take a port of the ephemeral range while it is down.
 * `udp`: free for UDP too (a CoAP port).
 */
export async function stablePort(udp = false): Promise<number> {
  let [low, high] = [32768, 60999];
  try {
    const [l, h] = readFileSync('/proc/sys/net/ipv4/ip_local_port_range', 'utf8').trim().split(/\s+/).map(Number);
    if (l && h) [low, high] = [l, h];
  } catch {
    // not Linux: the usual default
  }
  // below the range, or above it when there is little room below
  const [from, to] = low - 1024 >= 2000 ? [Math.max(1024, low - 12_000), low] : [high + 1, Math.min(65536, high + 12_000)];
  if (to - from < 100) throw new Error(`no room outside the ephemeral port range ${low}-${high}`);
  for (let tries = 0; tries < 100; tries++) {
    const port = from + Math.floor(Math.random() * (to - from));
    const tcp = createServer();
    const tcpFree = await new Promise<boolean>((r) => {
      tcp.once('error', () => r(false));
      tcp.listen(port, '127.0.0.1', () => r(true));
    });
    if (tcpFree) await new Promise<void>((r) => tcp.close(() => r()));
    if (!tcpFree) continue;
    if (!udp) return port;
    const sock = createSocket('udp4');
    const udpFree = await new Promise<boolean>((r) => {
      sock.once('error', () => r(false));
      sock.bind(port, '127.0.0.1', () => r(true));
    });
    try {
      sock.close();
    } catch {
      // never bound
    }
    if (udpFree) return port;
  }
  throw new Error('no free port below the ephemeral range in 100 tries');
}

/**
 * Cleanups that run when the test ends, however it ends: the latest registered first, each once,
 * every one even when an earlier one threw (the first error is reported after the rest ran).
 * One t.after hook runs them, as Node 20 runs t.after hooks in the order registered and skips
 * the rest after one that throws.
 */
export function cleanups(t: TestContext): (fn: () => unknown) => void {
  const fns: Array<() => unknown> = [];
  t.after(async () => {
    const errors: unknown[] = [];
    for (let fn = fns.pop(); fn; fn = fns.pop()) {
      try {
        await fn();
      } catch (err) {
        errors.push(err);
      }
    }
    if (errors.length > 0) throw errors[0];
  });
  return (fn) => void fns.push(fn);
}
