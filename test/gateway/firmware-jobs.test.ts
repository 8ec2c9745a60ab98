import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { setTimeout as sleep } from 'node:timers/promises';
import { Level } from 'level';
import { FleetError } from '../../core/errors.ts';
import { createLogger } from '../../core/log.ts';
import type { McuHello } from '../../firmware-bridge/frames.ts';
import { FirmwareManager, type VerifyFirmware } from '../../gateway/firmware.ts';
import type { MailboxEntry } from '../../gateway/mailbox.ts';
import type { McuMeta, Relay } from '../../gateway/relay.ts';
import { tempDir, waitFor } from '../helpers.ts';

/**
 * The firmware job's state machine, driven directly: a real LevelDB and real files in a temp
 * dir, a controllable clock, and a stub relay (it records the `mcu.firmware` events and answers
 * what the MCU last reported) and mailbox (it records offers). The whole path through a real
 * gateway and hub is in firmware-lifecycle.test.ts and mcu-contract.test.ts.
 */

const sha256 = (b: Buffer) => createHash('sha256').update(b).digest('hex');
const image = (seed: number, n = 4000): Buffer => {
  const b = Buffer.alloc(n);
  for (let i = 0; i < n; i++) b[i] = (i * seed + 7) & 0xff;
  return b;
};

interface Rig {
  fm: FirmwareManager;
  dir: string;
  db: Level<string, string>;
  events: Array<{ mcu: string; data: Record<string, unknown> }>;
  /** the mailbox: offers by MCU, in order, withdrawn ones removed */
  mailbox: Map<string, Array<{ id: string; args: Record<string, unknown> }>>;
  meta: Map<string, McuMeta>;
  clock: { t: number };
  /** called before the floor of a bundle name is read (once per call) */
  onFloorRead: { fn: (() => Promise<void>) | null };
  /** the next offers into the mailbox fail (a full mailbox) while this is above 0 */
  failOffers: { n: number };
  /** a bundle file: `bytes` under the raw verifier (the file is the image), or prefixed (one image, several bundles) */
  bundle(name: string, bytes: Buffer): { url: string; sha256: string; size: number };
  desired(mcu: string, fw?: { version: string; url: string; sha256: string; size: number }): Promise<void>;
  /** `mcu` on 1.0.0 is offered 1.5.0 (bundle a.bin, image(3)); resolves once offered */
  offerA(mcu: string): Promise<void>;
  /** the mailbox entry of an offer, as the mailbox hands it to onAck / onExpired */
  entry(id: string): MailboxEntry;
  /** the mailbox expires an offer: onExpired, then the entry leaves it (service.ts) */
  expire(mcu: string, id: string): Promise<void>;
  hello(mcu: string, h: McuHello): Promise<void>;
  ack(mcu: string, ok: boolean): Promise<void>;
  fwEvents(mcu: string): string[];
  close(): Promise<void>;
}

/**
 * `verify`: the file minus its first `strip` bytes is the image (strip 1: several bundles of one
 * image); the bundle name and sequence come from `named` when given.
 */
async function rig(o: { strip?: number; named?: { name: string; sequence: number }; installTimeoutMs?: number; retryMinMs?: number; downloadIdleMs?: number; verify?: VerifyFirmware; tickMs?: number } = {}): Promise<Rig> {
  const tmp = tempDir('fleetlet-fwjobs-');
  const real = new Level<string, string>(join(tmp.dir, 'db'));
  await real.open();
  const onFloorRead: Rig['onFloorRead'] = { fn: null };
  const failOffers: Rig['failOffers'] = { n: 0 };
  // the real database; its get() can be held up once, to land a change in the middle of an offer
  const db = new Proxy(real, {
    get(target, prop, receiver) {
      if (prop === 'get') {
        return async (key: string) => {
          const hook = onFloorRead.fn;
          if (key.startsWith('fl!') && hook) {
            onFloorRead.fn = null;
            await hook();
          }
          return target.get(key);
        };
      }
      const v = Reflect.get(target, prop, receiver);
      return typeof v === 'function' ? v.bind(target) : v;
    },
  });
  const events: Rig['events'] = [];
  const mailbox: Rig['mailbox'] = new Map();
  const dropOffer = (mcu: string, id: string) => mailbox.set(mcu, (mailbox.get(mcu) ?? []).filter((e) => e.id !== id));
  const meta = new Map<string, McuMeta>();
  const clock = { t: 1_000_000 };
  const relay = {
    meta: (id: string) => meta.get(id),
    event: async (mcu: string, type: string, _sev: string, data: Record<string, unknown>) => {
      if (type === 'mcu.firmware') events.push({ mcu, data });
    },
  } as unknown as Relay;
  const verify: VerifyFirmware = o.verify ?? (async (file, expect) => ({ version: expect.version, image: readFileSync(file).subarray(o.strip ?? 0), ...(o.named ?? {}) }));
  const fm = await FirmwareManager.open({
    dir: join(tmp.dir, 'firmware'),
    db,
    relay,
    offer: async (mcu, cmd) => {
      if (failOffers.n > 0) {
        failOffers.n--;
        throw new FleetError('FLEET_MCU_MAILBOX_FULL', 'the mailbox is full');
      }
      const q = mailbox.get(mcu) ?? [];
      if (!q.some((e) => e.id === cmd.id)) q.push({ id: cmd.id, args: cmd.args });
      mailbox.set(mcu, q);
    },
    withdraw: async (mcu, id) => dropOffer(mcu, id),
    verify,
    gatewayId: 'gw-t',
    token: 't',
    log: createLogger({ name: 'fw-jobs', level: 'silent' }),
    now: () => clock.t,
    tickMs: o.tickMs ?? 20,
    installTimeoutMs: o.installTimeoutMs ?? 60_000,
    retryMinMs: o.retryMinMs ?? 60_000,
    ...(o.downloadIdleMs !== undefined ? { downloadIdleMs: o.downloadIdleMs } : {}),
  });
  const entry = (id: string) => ({ id, seq: 1, name: 'fw.update', args: {}, expiresAt: 0, queuedAt: 0 }) as MailboxEntry;
  const self: Rig = {
    fm,
    dir: tmp.dir,
    db: real,
    events,
    mailbox,
    meta,
    clock,
    onFloorRead,
    failOffers,
    bundle(name, bytes) {
      const file = join(tmp.dir, name);
      writeFileSync(file, bytes);
      return { url: pathToFileURL(file).href, sha256: sha256(bytes), size: bytes.length };
    },
    desired: (mcu, fw) => fm.desired(mcu, Buffer.from(JSON.stringify({ v: 1, rev: 1, ts: Date.now(), apps: {}, ...(fw ? { firmware: fw } : {}) }))),
    async offerA(mcu) {
      meta.set(mcu, { fw: '1.0.0' });
      await self.desired(mcu, { version: '1.5.0', ...self.bundle('a.bin', image(3)) });
      await waitFor(() => fm.state(mcu)?.state === 'offered', `${mcu} offered 1.5.0`);
    },
    entry,
    async expire(mcu, id) {
      await fm.onExpired(mcu, entry(id));
      dropOffer(mcu, id);
    },
    async hello(mcu, h) {
      meta.set(mcu, { ...meta.get(mcu), fw: h.fw, ...(h.hw !== undefined ? { hw: h.hw } : {}) });
      await fm.onHello(mcu, h);
    },
    async ack(mcu, ok) {
      const job = fm.state(mcu)!;
      // an acknowledged command leaves the mailbox (service.ts)
      dropOffer(mcu, job.offerId!);
      await fm.onAck(mcu, entry(job.offerId!), ok ? { id: job.offerId!, ok: true } : { id: job.offerId!, ok: false, e: 'no' });
    },
    fwEvents: (mcu) => events.filter((e) => e.mcu === mcu).map((e) => `${String(e.data.version)}:${String(e.data.state)}${e.data.cause ? `(${String(e.data.cause)})` : ''}`),
    async close() {
      fm.close();
      await real.close();
      tmp.cleanup();
    },
  };
  return self;
}

/** the raw-image verifier, for a bundle whose targets.deviceClass is esp32-s3 only */
const s3Only: VerifyFirmware = async (file, expect) => ({ version: expect.version, image: readFileSync(file), deviceClass: ['esp32-s3'] });

const persisted = async (r: Rig, mcu: string) => JSON.parse((await r.db.get(`f!${mcu}`))!) as { version: string; state: string };

test('firmware jobs (stub relay): a new target that arrives while the previous one is being offered wins; the replaced one is neither offered nor written back', async () => {
  const r = await rig({ named: { name: 'esp-fw', sequence: 3 } });
  try {
    r.meta.set('m1', { fw: '1.0.0' });
    const a = r.bundle('a.bin', image(3));
    const b = r.bundle('b.bin', image(5));
    // B comes while A's offer reads the anti-rollback floor (an await in the middle of the offer)
    r.onFloorRead.fn = async () => {
      void r.desired('m1', { version: '2.0.0', ...b });
      await sleep(50);
    };
    await r.desired('m1', { version: '1.5.0', ...a });
    await waitFor(() => r.fm.state('m1')?.version === '2.0.0' && r.fm.state('m1')?.state === 'offered', 'B offered');
    await sleep(100);
    assert.equal(r.fm.state('m1')?.version, '2.0.0');
    assert.deepEqual(r.mailbox.get('m1')?.map((e) => e.args.v), ['2.0.0'], 'only B waits in the mailbox');
    const stored = await persisted(r, 'm1');
    assert.deepEqual([stored.version, stored.state], ['2.0.0', 'offered'], 'B is what is written');
    // A may have been offered before B came (its turn came first), never after B's first word
    const ev = r.fwEvents('m1');
    const lastA = ev.map((e) => e.startsWith('1.5.0:')).lastIndexOf(true);
    assert.ok(lastA < ev.findIndex((e) => e.startsWith('2.0.0:')), `nothing about A after B: ${ev.join(', ')}`);
    assert.equal(r.fm.imageFor('m1')?.data.equals(image(5)), true, 'B is what is served');
  } finally {
    await r.close();
  }
});

test('firmware jobs (stub relay): a cancel that arrives while the offer is being made stands: nothing offered, failed (cancelled)', async () => {
  const r = await rig({ named: { name: 'esp-fw', sequence: 3 } });
  try {
    r.meta.set('m1', { fw: '1.0.0' });
    const a = r.bundle('a.bin', image(3));
    r.onFloorRead.fn = async () => {
      void r.desired('m1');
      await sleep(50);
    };
    await r.desired('m1', { version: '1.5.0', ...a });
    await waitFor(() => r.fm.state('m1')?.state === 'failed', 'cancelled');
    await sleep(100);
    assert.equal(r.fm.state('m1')?.cause, 'cancelled');
    assert.deepEqual(r.mailbox.get('m1') ?? [], [], 'no offer left in the mailbox');
    assert.equal(r.fm.imageFor('m1'), null, 'nothing served');
    assert.equal((await persisted(r, 'm1')).state, 'failed');
  } finally {
    await r.close();
  }
});

test('firmware jobs (stub relay): a bootloader rollback of the update a new target replaced fails that update, not the new target, which stays offered', async () => {
  const r = await rig();
  try {
    await r.offerA('m1');
    await r.ack('m1', true);
    assert.equal(r.fm.state('m1')?.state, 'installing');
    await r.desired('m1', { version: '2.0.0', ...r.bundle('b.bin', image(5)) });
    await waitFor(() => r.fm.state('m1')?.state === 'offered' && r.fm.state('m1')?.version === '2.0.0', 'B offered');
    // A did not confirm itself: the bootloader went back to 1.0.0
    await r.hello('m1', { fw: '1.0.0', boot: 'rollback', prev: '1.5.0' });
    assert.equal(r.fm.state('m1')?.state, 'offered', 'B is still offered');
    assert.deepEqual(r.mailbox.get('m1')?.map((e) => e.args.v), ['2.0.0']);
    assert.ok(r.fwEvents('m1').includes('1.5.0:failed(rollback)'), `A reported failed (rollback): ${r.fwEvents('m1').join(', ')}`);
    // a stray rollback report about some other version says nothing about B either
    await r.hello('m1', { fw: '1.0.0', boot: 'rollback', prev: '1.4.0' });
    assert.equal(r.fm.state('m1')?.state, 'offered');
    // B taken and booted: succeeded
    await r.ack('m1', true);
    await r.hello('m1', { fw: '2.0.0', boot: 'ota' });
    assert.equal(r.fm.state('m1')?.state, 'succeeded');
  } finally {
    await r.close();
  }
});

test('firmware jobs (stub relay): an offer that expires untaken is renewed under a new id; the MCU takes it when it comes back', async () => {
  const r = await rig();
  try {
    await r.offerA('m1');
    const first = r.fm.state('m1')!.offerId!;
    await r.expire('m1', first);
    const renewed = r.fm.state('m1')!.offerId!;
    assert.notEqual(renewed, first);
    assert.equal(r.fm.state('m1')?.state, 'offered', 'still offered, not failed');
    assert.deepEqual(r.mailbox.get('m1')?.map((e) => e.id), [renewed], 'the renewed offer waits in the mailbox');
    await r.ack('m1', true);
    await r.hello('m1', { fw: '1.5.0', boot: 'ota' });
    assert.equal(r.fm.state('m1')?.state, 'succeeded');
  } finally {
    await r.close();
  }
});

test('firmware jobs (stub relay): an MCU that took the image and never reports is failed (no_report) at its deadline, its image no longer held; a late hello on the target still succeeds', async () => {
  const r = await rig({ installTimeoutMs: 60_000 });
  try {
    await r.offerA('m1');
    await r.ack('m1', true);
    await sleep(100);
    assert.equal(r.fm.state('m1')?.state, 'installing', 'before the deadline');
    r.clock.t += 61_000;
    await waitFor(() => r.fm.state('m1')?.state === 'failed', 'failed at the deadline');
    assert.equal(r.fm.state('m1')?.cause, 'no_report');
    assert.ok(r.fwEvents('m1').includes('1.5.0:failed(no_report)'));
    await waitFor(() => !existsSync(join(r.dir, 'firmware', `${sha256(image(3))}.bin`)), 'the cached image pruned');
    await r.hello('m1', { fw: '1.5.0', boot: 'ota' });
    assert.equal(r.fm.state('m1')?.state, 'succeeded');
    assert.equal(r.fwEvents('m1').at(-1), '1.5.0:succeeded');
  } finally {
    await r.close();
  }
});

test('firmware jobs (stub relay): a failed preparation is tried again by the timer, and the same target with a corrected URL fetches from the new one', async () => {
  const r = await rig({ retryMinMs: 60_000 });
  try {
    r.meta.set('m1', { fw: '1.0.0' });
    const bytes = image(3);
    const good = r.bundle('a.bin', bytes);
    // not there yet: failed, retryable, retried a minute later
    const missing = { ...good, url: pathToFileURL(join(r.dir, 'late.bin')).href };
    await r.desired('m1', { version: '1.5.0', ...missing });
    await waitFor(() => r.fm.state('m1')?.state === 'failed', 'failed: no bundle');
    assert.equal(r.fm.state('m1')?.cause, 'preparation');
    writeFileSync(join(r.dir, 'late.bin'), bytes);
    await sleep(100);
    assert.equal(r.fm.state('m1')?.state, 'failed', 'not before its time');
    r.clock.t += 61_000;
    await waitFor(() => r.fm.state('m1')?.state === 'offered', 'offered by the automatic retry');

    // m2: a wrong URL, then the same bundle at a corrected one
    r.meta.set('m2', { fw: '1.0.0' });
    const other = r.bundle('c.bin', image(9));
    await r.desired('m2', { version: '1.6.0', ...other, url: pathToFileURL(join(r.dir, 'typo.bin')).href });
    await waitFor(() => r.fm.state('m2')?.state === 'failed', 'failed: wrong URL');
    await r.desired('m2', { version: '1.6.0', ...other });
    await waitFor(() => r.fm.state('m2')?.state === 'offered', 'offered from the corrected URL');
    assert.equal(r.fm.state('m2')?.url, other.url);
  } finally {
    await r.close();
  }
});

test('firmware jobs (stub relay): two bundles holding one image, prepared at the same time, are both offered (one cache write)', async () => {
  const r = await rig({ strip: 1 });
  try {
    const img = image(11, 200_000);
    const x = r.bundle('x.bundle', Buffer.concat([Buffer.from('X'), img]));
    const y = r.bundle('y.bundle', Buffer.concat([Buffer.from('Y'), img]));
    for (const id of ['m1', 'm2']) r.meta.set(id, { fw: '1.0.0' });
    await Promise.all([r.desired('m1', { version: '1.5.0', ...x }), r.desired('m2', { version: '1.5.0', ...y })]);
    await waitFor(() => ['m1', 'm2'].every((id) => r.fm.state(id)?.state !== 'fetching'), 'both prepared');
    assert.equal(r.fm.state('m1')?.state, 'offered', r.fm.state('m1')?.reason);
    assert.equal(r.fm.state('m2')?.state, 'offered', r.fm.state('m2')?.reason);
    assert.equal(sha256(readFileSync(join(r.dir, 'firmware', `${sha256(img)}.bin`))), sha256(img));
  } finally {
    await r.close();
  }
});

test('firmware jobs (stub relay): a download that stalls is given up after downloadIdleMs and resumed with a Range request, not bounded in total time', async () => {
  const bytes = image(13, 64 * 1024);
  const ranges: string[] = [];
  let first = true;
  // an artifact store that stalls after half of the first response, then answers Range requests
  const server = createServer((req, res) => {
    ranges.push(req.headers.range ?? '');
    const m = /^bytes=(\d+)-$/.exec(req.headers.range ?? '');
    if (first) {
      first = false;
      res.writeHead(200, { 'content-length': bytes.length });
      res.write(bytes.subarray(0, bytes.length / 2));
      return; // stalls: never ends
    }
    const from = m ? Number(m[1]) : 0;
    res.writeHead(m ? 206 : 200, { 'content-length': bytes.length - from });
    // slowly, but never idle for long: 16 pieces 100 ms apart, longer in all than the idle
    // limit (1 s: a stall of the machine shorter than ~900 ms does not look like an idle store)
    let at = from;
    const step = Math.ceil((bytes.length - from) / 16);
    const tick = setInterval(() => {
      res.write(bytes.subarray(at, Math.min(bytes.length, at + step)));
      at += step;
      if (at >= bytes.length) {
        clearInterval(tick);
        res.end();
      }
    }, 100);
  });
  await new Promise<void>((ok) => server.listen(0, '127.0.0.1', () => ok()));
  const r = await rig({ downloadIdleMs: 1000 });
  try {
    r.meta.set('m1', { fw: '1.0.0' });
    const url = `http://127.0.0.1:${(server.address() as AddressInfo).port}/a.bundle`;
    await r.desired('m1', { version: '1.5.0', url, sha256: sha256(bytes), size: bytes.length });
    await waitFor(() => r.fm.state('m1')?.state === 'offered', 'offered after the resumed download', 20_000);
    assert.equal(ranges.length, 2, `two requests: ${ranges.join(' | ')}`);
    assert.equal(ranges[1], `bytes=${bytes.length / 2}-`, 'the second resumed where the first stalled');
  } finally {
    server.closeAllConnections();
    await new Promise<void>((ok) => server.close(() => ok()));
    await r.close();
  }
});

test('firmware jobs (stub relay): a verifier extraction directory left by a crash is removed by the cache prune; one of a fetch under way is kept', async () => {
  const r = await rig();
  try {
    const stale = join(r.dir, 'firmware', `extract-${'ab'.repeat(32)}`);
    mkdirSync(stale);
    writeFileSync(join(stale, 'firmware.bin'), image(3));
    // a download under way: its bundle's extraction directory must stay
    const slow = createServer(() => undefined); // never answers
    await new Promise<void>((ok) => slow.listen(0, '127.0.0.1', () => ok()));
    const bytes = image(5);
    const busy = join(r.dir, 'firmware', `extract-${sha256(bytes)}`);
    mkdirSync(busy);
    try {
      r.meta.set('m1', { fw: '1.0.0' });
      await r.desired('m1', { version: '1.5.0', url: `http://127.0.0.1:${(slow.address() as AddressInfo).port}/b`, sha256: sha256(bytes), size: bytes.length });
      void r.fm.prune();
      await waitFor(() => !existsSync(stale), 'the stale extraction directory is gone');
      assert.equal(existsSync(busy), true, 'the one of the fetch under way is kept');
    } finally {
      slow.closeAllConnections();
      await new Promise<void>((ok) => slow.close(() => ok()));
    }
  } finally {
    await r.close();
  }
});

test('firmware jobs (stub relay): a bundle verified under a trust root rotated since is verified again before it is offered to another MCU (refused now: not offered); verified again and expired since: not offered either', async () => {
  let root = 'root-1';
  let trusted = true;
  let expires = Date.now() + 3_600_000;
  const verify: VerifyFirmware = Object.assign(
    async (file: string, expect: { version: string }) => {
      if (!trusted) throw new FleetError('FLEET_BUNDLE_UNKNOWN_KEY', 'no signature by a key of the trust root');
      return { version: expect.version, image: readFileSync(file), expires };
    },
    { trustVersion: () => root },
  );
  const r = await rig({ verify });
  try {
    const a = r.bundle('a.bin', image(3));
    for (const id of ['m1', 'm2', 'm3']) r.meta.set(id, { fw: '1.0.0' });
    await r.desired('m1', { version: '1.5.0', ...a });
    await waitFor(() => r.fm.state('m1')?.state === 'offered', 'offered under the first root');
    // the key that signed it is removed from the root
    root = 'root-2';
    trusted = false;
    await r.desired('m2', { version: '1.5.0', ...a });
    await waitFor(() => r.fm.state('m2')?.state === 'failed', 'not offered under the new root');
    assert.match(r.fm.state('m2')?.reason ?? '', /FLEET_BUNDLE_UNKNOWN_KEY/);
    assert.deepEqual(r.mailbox.get('m2') ?? [], []);
    // trusted again under the new root, but its manifest has expired since
    trusted = true;
    expires = Date.now() - 1;
    root = 'root-3';
    await r.desired('m3', { version: '1.5.0', ...a });
    await waitFor(() => r.fm.state('m3')?.state === 'failed', 'an expired bundle is not offered');
    assert.match(r.fm.state('m3')?.reason ?? '', /FLEET_BUNDLE_EXPIRED/);
  } finally {
    await r.close();
  }
});

test('firmware jobs (stub relay): a renewal that cannot be put in the mailbox keeps the expired offer for the next sweep (the job never names an offer no mailbox holds)', async () => {
  const r = await rig();
  try {
    await r.offerA('m1');
    const first = r.fm.state('m1')!.offerId!;
    const expired = r.entry(first);
    r.failOffers.n = 1;
    await assert.rejects(r.fm.onExpired('m1', expired), /FLEET_MCU_MAILBOX_FULL|full/);
    assert.equal(r.fm.state('m1')?.offerId, first, 'still the expired one: the sweep keeps it and tries again');
    // the next sweep: renewed
    await r.fm.onExpired('m1', expired);
    assert.notEqual(r.fm.state('m1')?.offerId, first);
    assert.ok(r.mailbox.get('m1')?.some((e) => e.id === r.fm.state('m1')?.offerId), 'the renewed offer is in the mailbox');
  } finally {
    await r.close();
  }
});

test('firmware jobs (stub relay): a download that fails (HTTP 404) after its job was cancelled leaves it cancelled: no retry, nothing offered', async () => {
  let release: (() => void) | null = null;
  const server = createServer((_req, res) => {
    // the artifact store answers 404 (not there yet: a failure worth retrying) once released
    release = () => res.writeHead(404).end();
  });
  await new Promise<void>((ok) => server.listen(0, '127.0.0.1', () => ok()));
  const r = await rig({ retryMinMs: 1000, downloadIdleMs: 60_000 });
  try {
    r.meta.set('m1', { fw: '1.0.0' });
    const bytes = image(7);
    await r.desired('m1', { version: '1.5.0', url: `http://127.0.0.1:${(server.address() as AddressInfo).port}/a`, sha256: sha256(bytes), size: bytes.length });
    await waitFor(() => release !== null, 'the download started');
    await r.desired('m1');
    assert.equal(r.fm.state('m1')?.cause, 'cancelled');
    release!();
    await sleep(300); // the failure reaches the job
    r.clock.t += 120_000; // past any automatic retry
    await sleep(200);
    assert.equal(r.fm.state('m1')?.state, 'failed');
    assert.equal(r.fm.state('m1')?.cause, 'cancelled', 'still cancelled, not a retried preparation failure');
    assert.equal(r.fm.state('m1')?.retryAt, undefined);
    assert.deepEqual(r.mailbox.get('m1') ?? [], []);
    assert.deepEqual(r.fwEvents('m1'), ['1.5.0:fetching', '1.5.0:failed(cancelled)']);
  } finally {
    server.closeAllConnections();
    await new Promise<void>((ok) => server.close(() => ok()));
    await r.close();
  }
});

test('firmware jobs (stub relay): an update replaced by a new target while the MCU installed it is reported failed (no_report) at its deadline if no hello decides it', async () => {
  const r = await rig({ installTimeoutMs: 60_000 });
  try {
    await r.offerA('m1');
    await r.ack('m1', true);
    await r.desired('m1', { version: '2.0.0', ...r.bundle('b.bin', image(5)) });
    await waitFor(() => r.fm.state('m1')?.state === 'offered' && r.fm.state('m1')?.version === '2.0.0', 'B offered');
    r.clock.t += 61_000;
    await waitFor(() => r.fwEvents('m1').includes('1.5.0:failed(no_report)'), 'A reported failed at its deadline');
    assert.equal(r.fm.state('m1')?.state, 'offered', 'B goes on');
    assert.equal(r.fm.state('m1')?.replaced, undefined);
  } finally {
    await r.close();
  }
});

test('firmware jobs (stub relay): a bundle whose targets.deviceClass leaves out the MCU\'s hardware class (its hello hw, or none) is not offered (cause target, FLEET_BUNDLE_TARGET); a hello reporting a listed class gets the offer', async () => {
  const r = await rig({ verify: s3Only });
  try {
    r.meta.set('m1', { fw: '1.0.0' }); // no hw: an MCU whose hello does not say
    await r.desired('m1', { version: '1.5.0', ...r.bundle('s3.bin', image(5)) });
    await waitFor(() => r.fm.state('m1')?.state === 'failed', 'refused');
    assert.equal(r.fm.state('m1')?.cause, 'target');
    assert.equal(r.fm.state('m1')?.code, 'FLEET_BUNDLE_TARGET');
    assert.equal(r.mailbox.get('m1')?.length ?? 0, 0, 'nothing offered');
    const refusals = () => r.fwEvents('m1').filter((e) => e === '1.5.0:failed(target)').length;
    assert.deepEqual(r.fwEvents('m1'), ['1.5.0:fetching', '1.5.0:failed(target)']);
    // another board: refused again
    await r.hello('m1', { fw: '1.0.0', boot: 'power_on', hw: 'esp32-c3' });
    await waitFor(() => refusals() === 2, 'judged again');
    assert.equal(r.fm.state('m1')?.state, 'failed');
    assert.match(r.fm.state('m1')?.reason ?? '', /is for esp32-s3; this MCU is esp32-c3/);
    // judged again on a new hw only: the timer does not retry a target failure
    r.clock.t += 3_600_000;
    await sleep(100);
    assert.equal(refusals(), 2);
    assert.equal(r.fm.state('m1')?.state, 'failed');
    // the right one: offered
    await r.hello('m1', { fw: '1.0.0', boot: 'power_on', hw: 'esp32-s3' });
    await waitFor(() => r.fm.state('m1')?.state === 'offered', 'offered once the board fits');
    assert.equal(r.mailbox.get('m1')?.length, 1);
  } finally {
    await r.close();
  }
});

test('firmware jobs (stub relay): a target refusal is judged again by the class it was refused for, not by the previous hello: a hello whose first handling was cut short (the relay had stored the new hw already) still gets the offer', async () => {
  const r = await rig({ verify: s3Only });
  try {
    r.meta.set('m1', { fw: '1.0.0', hw: 'esp32-c3' });
    await r.desired('m1', { version: '1.5.0', ...r.bundle('s3.bin', image(5)) });
    await waitFor(() => r.fm.state('m1')?.cause === 'target', 'refused for esp32-c3');
    // the relay took the new board from a hello whose firmware handling never ran (a crash
    // after the state save); the MCU's resent hello now finds it as the "previous" hw
    r.meta.set('m1', { fw: '1.0.0', hw: 'esp32-s3' });
    await r.fm.onHello('m1', { fw: '1.0.0', boot: 'power_on', hw: 'esp32-s3' });
    await waitFor(() => r.fm.state('m1')?.state === 'offered', 'offered');
  } finally {
    await r.close();
  }
});

test('firmware jobs (stub relay): standing offers are judged again when the trust root rotates: offered and transferring ones whose bundle no longer verifies are withdrawn and failed with the verification code; one whose bundle still verifies stands; a root that cannot be read withdraws nothing', async () => {
  let root = 'root-1';
  let rootBroken = false;
  const trusted = new Set<string>();
  let calls = 0;
  const verify: VerifyFirmware = Object.assign(
    async (file: string, expect: { version: string }) => {
      calls++;
      if (rootBroken) throw new FleetError('FLEET_BUNDLE_ROOT_INVALID', 'cannot read trust root: half written');
      const bytes = readFileSync(file);
      if (!trusted.has(sha256(bytes))) throw new FleetError('FLEET_BUNDLE_UNKNOWN_KEY', 'no signature by a key of the trust root');
      return { version: expect.version, image: bytes };
    },
    { trustVersion: () => root },
  );
  const r = await rig({ verify });
  try {
    const a = r.bundle('a.bin', image(3));
    const b = r.bundle('b.bin', image(5));
    trusted.add(a.sha256).add(b.sha256);
    for (const id of ['m1', 'm2', 'm3']) r.meta.set(id, { fw: '1.0.0' });
    await r.desired('m1', { version: '1.5.0', ...a });
    await r.desired('m2', { version: '1.5.0', ...a });
    await r.desired('m3', { version: '1.6.0', ...b });
    for (const id of ['m1', 'm2', 'm3']) await waitFor(() => r.fm.state(id)?.state === 'offered', `${id} offered under the first root`);
    r.fm.served('m2', 'mqtt', 512, 512);
    assert.equal(r.fm.state('m2')?.state, 'transferring');

    // the root file is being rewritten (unreadable): the offers' bundles are not the problem
    rootBroken = true;
    root = 'broken';
    const before = calls;
    await waitFor(() => calls >= before + 1, 'a pass tried the broken root');
    // not again under the same broken root (it is tried again once the root changes)
    await sleep(300); // 15 ticks
    assert.equal(calls, before + 1, 'one verification under the broken root, not one per tick');
    for (const id of ['m1', 'm3']) assert.equal(r.fm.state(id)?.state, 'offered', `${id} stands while the root cannot be read`);
    assert.equal(r.fm.state('m2')?.state, 'transferring');

    // rotated: the key that signed bundle a is gone, b is signed by a key still trusted
    rootBroken = false;
    trusted.delete(a.sha256);
    root = 'root-2';
    for (const id of ['m1', 'm2']) await waitFor(() => r.fm.state(id)?.state === 'failed', `${id} withdrawn`);
    for (const id of ['m1', 'm2']) {
      const s = r.fm.state(id)!;
      assert.equal(s.code, 'FLEET_BUNDLE_UNKNOWN_KEY');
      assert.equal(s.cause, 'preparation');
      assert.match(s.reason ?? '', /offer withdrawn/);
      assert.deepEqual(r.mailbox.get(id) ?? [], [], `${id}'s offer is out of the mailbox`);
      assert.equal(r.fm.imageFor(id), null, `${id} is served no more chunks`);
      assert.equal(r.fwEvents(id).at(-1), '1.5.0:failed(preparation)', 'the hub is told');
      assert.equal((await persisted(r, id)).state, 'failed');
    }
    await waitFor(() => r.fm.state('m3')?.trust === 'root-2', 'm3 verified again under the new root');
    assert.equal(r.fm.state('m3')?.state, 'offered');
    assert.equal(r.mailbox.get('m3')?.length, 1);
    // the same desired state again does not bring the untrusted bundle back
    await r.desired('m1', { version: '1.5.0', ...a });
    await sleep(100);
    assert.equal(r.fm.state('m1')?.state, 'failed');
  } finally {
    await r.close();
  }
});

test('firmware jobs (stub relay): a standing offer whose bundle manifest expires is withdrawn by the timer (FLEET_BUNDLE_EXPIRED), also while the trust root cannot be read', async () => {
  let expires = Date.now() + 3_600_000;
  let root = 'root-1';
  const verify: VerifyFirmware = Object.assign(
    async (file: string, expect: { version: string }) => {
      if (root === 'broken') throw new FleetError('FLEET_BUNDLE_ROOT_INVALID', 'cannot read trust root: half written');
      return { version: expect.version, image: readFileSync(file), expires };
    },
    { trustVersion: () => root },
  );
  const r = await rig({ verify });
  try {
    await r.offerA('m1');
    const first = r.fm.state('m1')!.offerId!;
    // the mailbox's offer expires untaken while the bundle is valid: renewed
    await r.expire('m1', first);
    assert.notEqual(r.fm.state('m1')?.offerId, first, 'renewed under a new id');
    // m2 is offered a bundle that expires in 3 s (time enough to verify and offer it first)
    expires = Date.now() + 3000;
    r.meta.set('m2', { fw: '1.0.0' });
    await r.desired('m2', { version: '1.6.0', ...r.bundle('b.bin', image(5)) });
    await waitFor(() => r.fm.state('m2')?.state === 'offered', 'm2 offered');
    // the root breaks: m1, judged first, cannot be verified again (and stands); m2's expiry
    // needs no root and is still checked
    root = 'broken';
    await waitFor(() => r.fm.state('m2')?.state === 'failed', 'withdrawn once expired', 15_000);
    assert.equal(r.fm.state('m2')?.code, 'FLEET_BUNDLE_EXPIRED');
    assert.deepEqual(r.mailbox.get('m2') ?? [], []);
    assert.equal(r.fm.state('m1')?.state, 'offered', 'm1\'s bundle has not expired');
  } finally {
    await r.close();
  }
});

test('firmware jobs (stub relay): a standing offer is withdrawn when a hello reports a hardware class its bundle is not for (cause target), and offered again when the MCU reports a listed class', async () => {
  const r = await rig({ verify: s3Only });
  try {
    r.meta.set('m1', { fw: '1.0.0', hw: 'esp32-s3' });
    await r.desired('m1', { version: '1.5.0', ...r.bundle('s3.bin', image(5)) });
    await waitFor(() => r.fm.state('m1')?.state === 'offered', 'offered to an esp32-s3');
    r.fm.served('m1', 'coap', 256, 256);
    // another board behind the same id
    await r.hello('m1', { fw: '1.0.0', boot: 'power_on', hw: 'esp32-c3' });
    assert.equal(r.fm.state('m1')?.state, 'failed');
    assert.equal(r.fm.state('m1')?.cause, 'target');
    assert.equal(r.fm.state('m1')?.code, 'FLEET_BUNDLE_TARGET');
    assert.deepEqual(r.mailbox.get('m1') ?? [], []);
    assert.equal(r.fm.imageFor('m1'), null);
    await r.hello('m1', { fw: '1.0.0', boot: 'power_on', hw: 'esp32-s3' });
    await waitFor(() => r.fm.state('m1')?.state === 'offered', 'offered again');
    assert.equal(r.mailbox.get('m1')?.length, 1);
  } finally {
    await r.close();
  }
});

test('firmware jobs (stub relay): an offer whose mailbox entry expires after its bundle did is withdrawn (FLEET_BUNDLE_EXPIRED), not renewed (timer held off: the mailbox sweep decides)', async () => {
  const expires = Date.now() + 3000;
  const r = await rig({ verify: async (file, expect) => ({ version: expect.version, image: readFileSync(file), expires }), tickMs: 3_600_000 });
  try {
    await r.offerA('m1');
    const first = r.fm.state('m1')!.offerId!;
    // the bundle still valid: the untaken offer is renewed
    await r.expire('m1', first);
    const second = r.fm.state('m1')!.offerId!;
    assert.notEqual(second, first, 'renewed under a new id');
    // past the manifest's expiry (the timer that would withdraw it does not run here)
    await sleep(Math.max(0, expires - Date.now()) + 50);
    await r.expire('m1', second);
    assert.equal(r.fm.state('m1')?.state, 'failed');
    assert.equal(r.fm.state('m1')?.code, 'FLEET_BUNDLE_EXPIRED');
    assert.deepEqual(r.mailbox.get('m1') ?? [], [], 'nothing renewed into the mailbox');
  } finally {
    await r.close();
  }
});

test('firmware jobs (stub relay): a failure of the gateway\'s own disk while verifying (FLEET_BUNDLE_STAGING; FLEET_BUNDLE_FORMAT caused by EMFILE) withdraws no standing offer and fails no new one for good: the offers stay, the preparation is tried again by the timer', async () => {
  let root = 'root-1';
  let fault: FleetError | null = null;
  let faulted = 0;
  const verify: VerifyFirmware = Object.assign(
    async (file: string, expect: { version: string }) => {
      if (fault) {
        faulted++;
        throw fault;
      }
      return { version: expect.version, image: readFileSync(file) };
    },
    { trustVersion: () => root },
  );
  const r = await rig({ verify, retryMinMs: 200 });
  try {
    await r.offerA('m1');
    const emfile = Object.assign(new Error('EMFILE: too many open files, open'), { code: 'EMFILE', syscall: 'open' });
    for (const f of [new FleetError('FLEET_BUNDLE_STAGING', 'cannot create staging directory: ENOSPC'), new FleetError('FLEET_BUNDLE_FORMAT', 'cannot open bundle: EMFILE', { cause: emfile })]) {
      fault = f;
      faulted = 0;
      root = `root-${f.code}`; // rotated: the standing offer is verified again, and hits the fault
      await waitFor(() => faulted >= 2, `${f.code}: two passes verified again and failed`);
      assert.equal(r.fm.state('m1')?.state, 'offered', `${f.code}: the offer stands`);
      assert.equal(r.mailbox.get('m1')?.length, 1);
    }
    // a new target prepared while the disk fails: failed, retryable, and retried by the timer
    r.meta.set('m2', { fw: '1.0.0' });
    await r.desired('m2', { version: '1.6.0', ...r.bundle('b.bin', image(5)) });
    await waitFor(() => r.fm.state('m2')?.state === 'failed', 'm2 failed while the disk fails');
    assert.equal(r.fm.state('m2')?.code, 'FLEET_BUNDLE_FORMAT');
    assert.ok(r.fm.state('m2')?.retryAt !== undefined, 'a retry is planned');
    fault = null; // the disk is back
    r.clock.t += 1000; // past the retry time (the rig's clock)
    await waitFor(() => r.fm.state('m2')?.state === 'offered', 'm2 offered on the retry', 15_000);
    await waitFor(() => r.fm.state('m1')?.trust === root, 'm1 verified under the current root', 15_000);
    assert.equal(r.fm.state('m1')?.state, 'offered');
  } finally {
    await r.close();
  }
});

test('firmware jobs (stub relay): a preparation that failed because the trust root could not be loaded is not tried again while the root stays as it was (past its retry time too), is tried at once when the root changes, and does not download its bundle again', async () => {
  let root = 'broken';
  let verifications = 0;
  const verify: VerifyFirmware = Object.assign(
    async (file: string, expect: { version: string }) => {
      verifications++;
      if (root === 'broken') throw new FleetError('FLEET_BUNDLE_ROOT_INVALID', 'cannot read trust root: EACCES');
      return { version: expect.version, image: readFileSync(file) };
    },
    { trustVersion: () => root },
  );
  const bytes = image(9);
  let downloads = 0;
  const server = createServer((_req, res) => {
    downloads++;
    res.writeHead(200, { 'content-length': String(bytes.length) }).end(bytes);
  });
  await new Promise<void>((ok) => server.listen(0, '127.0.0.1', () => ok()));
  const r = await rig({ verify, retryMinMs: 1000 });
  try {
    r.meta.set('m1', { fw: '1.0.0' });
    await r.desired('m1', { version: '1.5.0', url: `http://127.0.0.1:${(server.address() as AddressInfo).port}/b`, sha256: sha256(bytes), size: bytes.length });
    await waitFor(() => r.fm.state('m1')?.state === 'failed', 'failed on the trust root');
    assert.equal(r.fm.state('m1')?.code, 'FLEET_BUNDLE_ROOT_INVALID');
    assert.ok(r.fm.state('m1')?.retryAt !== undefined, 'retryable');
    assert.equal(downloads, 1);
    r.clock.t += 10 * 3_600_000; // far past any retry time
    await sleep(300); // 15 ticks
    assert.equal(verifications, 1, 'not tried again under the same root');
    assert.equal(r.fm.state('m1')?.state, 'failed');
    root = 'root-2'; // the operator fixes the root
    await waitFor(() => r.fm.state('m1')?.state === 'offered', 'offered once the root changed');
    assert.equal(downloads, 1, 'the bundle kept from the failed preparation, not downloaded again');
  } finally {
    await r.close();
    server.closeAllConnections();
    await new Promise<void>((ok) => server.close(() => ok()));
  }
});

test('firmware jobs (stub relay): a verdict reached under a trust root replaced while it was being verified does not count: the bundle is verified again under the new root (a key put back: offered)', async () => {
  let root = 'without-key';
  let calls = 0;
  let release: () => void = () => undefined;
  const held = new Promise<void>((ok) => (release = ok));
  const verify: VerifyFirmware = Object.assign(
    async (file: string, expect: { version: string }) => {
      const under = root; // the root as loaded when the verification starts
      if (++calls === 1) await held;
      if (under === 'without-key') throw new FleetError('FLEET_BUNDLE_UNKNOWN_KEY', 'no signature by a key of the trust root');
      return { version: expect.version, image: readFileSync(file) };
    },
    { trustVersion: () => root },
  );
  const r = await rig({ verify });
  try {
    r.meta.set('m1', { fw: '1.0.0' });
    await r.desired('m1', { version: '1.5.0', ...r.bundle('a.bin', image(3)) });
    await waitFor(() => calls === 1, 'the first verification under way');
    root = 'with-key';
    release();
    await waitFor(() => r.fm.state('m1')?.state === 'offered' || r.fm.state('m1')?.state === 'failed', 'decided');
    assert.equal(r.fm.state('m1')?.state, 'offered', `verified again under the new root: ${r.fm.state('m1')?.reason ?? ''}`);
    assert.equal(calls, 2);
  } finally {
    await r.close();
  }
});
