import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { mkdir, open, readdir, readFile, rename, rm, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { Level } from 'level';
import { writeFileAtomic } from '../core/atomic-file.ts';
import { FleetError, toFleetError } from '../core/errors.ts';
import type { Logger } from '../core/log.ts';
import { decodeMessage, type DesiredArtifact } from '../core/messages.ts';
import type { McuAck, McuHello } from '../firmware-bridge/frames.ts';
import type { MailboxEntry } from './mailbox.ts';
import type { McuProtocol, Relay } from './relay.ts';

/**
 * Checks a downloaded firmware bundle (signature, trust, kind firmware) and returns the
 * MCU image inside. Injected by the CLI (cli/commands/gateway.ts wires bundles/): the
 * gateway does not import bundles/ (layout rule, DESIGN.md).
 */
export type VerifyFirmware = (file: string, expect: { version: string; sha256: string }) => Promise<{ version: string; image: Buffer | string; name?: string; sequence?: number }>;

/** Persisted per-MCU update state: names are a contract (docs/mcu-protocol.md "Firmware updates"). */
export type FirmwareState = 'fetching' | 'offered' | 'transferring' | 'installing' | 'succeeded' | 'failed';

interface Job {
  version: string;
  /** sha256 of the bundle, from the desired state */
  bundleSha: string;
  url: string;
  /** sha256 of the verified image, once known */
  imageSha?: string;
  /** bundle name and sequence, once verified (the anti-rollback floor is per name) */
  bundleName?: string;
  sequence?: number;
  size?: number;
  state: FirmwareState;
  /** firmware the MCU ran when the update started */
  from?: string;
  /** highest byte offset served */
  progress: number;
  offerId?: string;
  reason?: string;
  /** failed before the MCU took anything (the download, the verification, a full mailbox; or cancelled): the same desired state again starts over */
  retryable?: boolean;
}

export interface ServedImage {
  version: string;
  data: Buffer;
  sha256: Buffer;
}

export interface FirmwareManagerOptions {
  dir: string;
  db: Level<string, string>;
  relay: Relay;
  /** put a fw.update command into the MCU's mailbox */
  offer: (mcuId: string, cmd: { id: string; name: string; args: Record<string, unknown>; expiresAt: number }) => Promise<unknown>;
  /** take an offer back out of the MCU's mailbox (the target changed, or was removed) */
  withdraw?: (mcuId: string, id: string) => Promise<unknown>;
  verify?: VerifyFirmware | undefined;
  /** the gateway's device id and token: HTTP Basic credentials at the hub's artifact store */
  gatewayId: string;
  token: string;
  log: Logger;
  /** largest image served, bytes (default 16 MiB) */
  maxImageBytes?: number;
  /** how long an offer waits in the mailbox, ms (default 7 days) */
  offerTtlMs?: number;
  onBytes?: (protocol: McuProtocol, bytes: number) => void;
  now?: () => number;
}

const ACTIVE: ReadonlySet<FirmwareState> = new Set(['offered', 'transferring', 'installing']);

/** db keys of the per-name anti-rollback floors (jobs are under `f!`) */
const FLOOR_PREFIX = 'fl!';

interface Fetched {
  /** the firmware version the bundle holds */
  version: string;
  imageSha: string;
  size: number;
  name?: string;
  sequence?: number;
}

/**
 * MCU firmware relay: desired state → fetch (Range resume or file://) → sha256 → verify
 * (injected) → cache the image by its sha256 → offer through the mailbox → serve chunks
 * (ingresses call `imageFor`/`served`) → success only when the MCU reports the new
 * version in its hello; the old version after an ok ack, or a rollback boot, is failure.
 */
export class FirmwareManager {
  private readonly jobs = new Map<string, Job>();
  private readonly images = new Map<string, ServedImage>();
  /** one fetch and verification per bundle sha256; `done` once it settled (only then may it be dropped) */
  private readonly fetches = new Map<string, { p: Promise<Fetched>; done: boolean }>();
  /** jobs whose run() is under way (the retained desired state coming again must not start a second) */
  private readonly running = new Set<Job>();
  /** images being written to the cache by a fetch, not yet named by its job */
  private readonly writing = new Set<string>();
  private readonly now: () => number;
  private pruning = false;
  private pruneAgain = false;

  private constructor(private readonly opts: FirmwareManagerOptions) {
    this.now = opts.now ?? Date.now;
  }

  static async open(opts: FirmwareManagerOptions): Promise<FirmwareManager> {
    const fm = new FirmwareManager(opts);
    await mkdir(opts.dir, { recursive: true, mode: 0o700 });
    for await (const [key, value] of opts.db.iterator({ gte: 'f!', lt: 'f"' })) {
      try {
        fm.jobs.set(key.slice(2), JSON.parse(value) as Job);
      } catch {
        /* a damaged record: the next desired state starts over */
      }
    }
    for (const [mcuId, job] of fm.jobs) {
      // installing: the MCU has the image and is rebooting; its hello decides, no image needed
      if (!job.imageSha || (job.state !== 'offered' && job.state !== 'transferring')) continue;
      try {
        await fm.loadImage(job.version, job.imageSha);
      } catch (err) {
        // missing or damaged in the cache: fetched and verified again, then offered again (the
        // mailbox keeps one offer per id), rather than answering "no firmware" until the offer expires
        opts.log.warn('cached MCU firmware image missing or damaged; fetching the bundle again', { mcu: mcuId, version: job.version, err });
        job.state = 'fetching';
        void fm.run(mcuId, job);
      }
    }
    void fm.prune();
    return fm;
  }

  counts(): Record<'offered' | 'transferring' | 'installing' | 'succeeded' | 'failed' | 'fetching', number> {
    const c = { fetching: 0, offered: 0, transferring: 0, installing: 0, succeeded: 0, failed: 0 };
    for (const j of this.jobs.values()) c[j.state]++;
    return c;
  }

  state(mcuId: string): Readonly<Job> | undefined {
    return this.jobs.get(mcuId);
  }

  private async save(mcuId: string, job: Job): Promise<void> {
    this.jobs.set(mcuId, job);
    await this.opts.db.put(`f!${mcuId}`, JSON.stringify(job), { sync: true });
  }

  private async report(mcuId: string, job: Job, extra: Record<string, unknown> = {}): Promise<void> {
    const data: Record<string, unknown> = { state: job.state, version: job.version, ...extra };
    if (job.from !== undefined) data.from = job.from;
    if (job.size) data.progress = Math.min(1, job.progress / job.size);
    if (job.reason !== undefined) data.reason = job.reason;
    try {
      await this.opts.relay.event(mcuId, 'mcu.firmware', job.state === 'failed' ? 'warning' : 'info', data);
    } catch (err) {
      this.opts.log.warn('cannot queue a firmware event', { mcu: mcuId, err });
    }
  }

  /** The desired state the hub published for an MCU. */
  async desired(mcuId: string, payload: Buffer): Promise<void> {
    let fw: DesiredArtifact | undefined;
    try {
      fw = decodeMessage('desired', payload).firmware;
    } catch (err) {
      this.opts.log.warn('desired state from the hub is not valid; ignored', { mcu: mcuId, err });
      return;
    }
    const cur = this.jobs.get(mcuId);
    if (!fw) {
      // no firmware wanted any more: an offer not yet taken is withdrawn
      if (cur && (cur.state === 'fetching' || cur.state === 'offered' || cur.state === 'transferring')) {
        await this.withdraw(mcuId, cur);
        // the same target named again later starts over
        await this.fail(mcuId, cur, 'cancelled: the desired state no longer names firmware', { retryable: true });
      }
      return;
    }
    if (cur && cur.bundleSha === fw.sha256 && cur.version === fw.version) {
      // same target: resume where it was (after a restart, a fetch may need redoing); a
      // preparation that failed (the artifact store away, a full mailbox) is tried again: the
      // hub's retained desired state comes again when the gateway reconnects after an outage
      if (cur.state === 'failed' && cur.retryable) {
        cur.state = 'fetching';
        cur.reason = undefined;
        cur.retryable = undefined;
        await this.save(mcuId, cur);
        await this.report(mcuId, cur);
      }
      if (cur.state === 'fetching') void this.run(mcuId, cur);
      return;
    }
    // a new target: the previous offer, if the MCU has not taken it yet, must not stay at the
    // head of its mailbox (it would hold every command behind it, and name an image no longer served)
    if (cur && (cur.state === 'offered' || cur.state === 'transferring')) await this.withdraw(mcuId, cur);
    const running = this.opts.relay.meta(mcuId)?.fw;
    const job: Job = { version: fw.version, bundleSha: fw.sha256, url: fw.url, state: 'fetching', progress: 0 };
    if (running !== undefined) job.from = running;
    if (fw.size !== undefined) job.size = fw.size;
    if (running === fw.version) {
      job.state = 'succeeded';
      await this.save(mcuId, job);
      return;
    }
    await this.save(mcuId, job);
    await this.report(mcuId, job);
    void this.prune();
    void this.run(mcuId, job);
  }

  /** Take a job's offer out of the MCU's mailbox (nothing when it has none, or it is gone). */
  private async withdraw(mcuId: string, job: Job): Promise<void> {
    if (job.offerId === undefined || !this.opts.withdraw) return;
    try {
      await this.opts.withdraw(mcuId, job.offerId);
    } catch (err) {
      this.opts.log.warn('cannot withdraw a firmware offer from the mailbox', { mcu: mcuId, offer: job.offerId, err });
    }
  }

  /** Fetch, verify and offer; never rejects (a failure is the job's state, reported to the hub). */
  private async run(mcuId: string, job: Job): Promise<void> {
    if (this.running.has(job)) return;
    this.running.add(job);
    try {
      const f = await this.fetchOnce(job);
      // superseded, or cancelled, meanwhile
      if (this.jobs.get(mcuId) !== job || job.state !== 'fetching') return;
      // checked per job, not only by the fetch that verified the bundle first: another job may
      // name the same bundle with another version
      if (f.version !== job.version) throw new FleetError('FLEET_MCU_FIRMWARE', `the bundle holds firmware ${f.version}, the desired state says ${job.version}`);
      job.imageSha = f.imageSha;
      job.size = f.size;
      if (f.name !== undefined && f.sequence !== undefined) {
        job.bundleName = f.name;
        job.sequence = f.sequence;
      }
      await this.offerIfNeeded(mcuId, job);
    } catch (err) {
      await this.failPreparation(mcuId, job, err);
    } finally {
      this.running.delete(job);
    }
  }

  private async failPreparation(mcuId: string, job: Job, err: unknown): Promise<void> {
    if (this.jobs.get(mcuId) !== job) return;
    const fe = toFleetError(err);
    this.opts.log.warn('MCU firmware could not be prepared', { mcu: mcuId, version: job.version, err: fe });
    // what the bundle itself fails (its signature, trust, the anti-rollback floor) fails again
    // the same way: not retried on every reconnect (a download again, a failure event again)
    await this.fail(mcuId, job, `${fe.code}: ${fe.message}`, { retryable: !fe.code.startsWith('FLEET_BUNDLE_'), bestEffort: true });
  }

  /**
   * A job ends failed: persisted, reported to the hub (severity warning), and its image no
   * longer kept for it. `bestEffort`: a store that fails is logged, not thrown (the callers
   * that run on their own, with nobody to tell); otherwise it is thrown, as any store error.
   */
  private async fail(mcuId: string, job: Job, reason: string, o: { retryable?: boolean; extra?: Record<string, unknown>; bestEffort?: boolean } = {}): Promise<void> {
    job.state = 'failed';
    job.reason = reason.slice(0, 250);
    job.retryable = o.retryable || undefined;
    if (o.bestEffort) {
      try {
        await this.save(mcuId, job);
      } catch (err) {
        this.opts.log.error('cannot persist an MCU firmware failure', { mcu: mcuId, err });
      }
    } else await this.save(mcuId, job);
    await this.report(mcuId, job, o.extra);
    void this.prune();
  }

  /**
   * Offer once the image is ready; an MCU already on the version needs nothing. Checks the
   * anti-rollback floor now, for this job (it may have risen since the bundle was verified),
   * and makes sure the image is in memory (after a restart, a re-offer finds only the cache
   * on disk; when that is gone too, the bundle is fetched and verified again). Throws when the
   * job cannot be offered.
   */
  private async offerIfNeeded(mcuId: string, job: Job): Promise<void> {
    if (!job.imageSha) return;
    if (job.bundleName !== undefined && job.sequence !== undefined) {
      const floor = await this.floor(job.bundleName);
      if (floor !== null && job.sequence < floor) throw new FleetError('FLEET_BUNDLE_ROLLBACK', `firmware bundle ${job.bundleName} has sequence ${job.sequence}, below this gateway's floor ${floor}`);
    }
    try {
      await this.loadImage(job.version, job.imageSha);
    } catch {
      // gone from the cache: fetched and verified again (a fetch still under way is shared)
      if (this.fetches.get(job.bundleSha)?.done) this.fetches.delete(job.bundleSha);
      const f = await this.fetchOnce(job);
      if (f.imageSha !== job.imageSha) throw new FleetError('FLEET_MCU_FIRMWARE', `the bundle now holds image ${f.imageSha.slice(0, 16)}, not ${job.imageSha.slice(0, 16)}`);
    }
    const running = this.opts.relay.meta(mcuId)?.fw;
    if (running === job.version) {
      job.state = 'succeeded';
      await this.save(mcuId, job);
      await this.report(mcuId, job);
      return;
    }
    job.offerId = `fw-${job.version}-${job.imageSha.slice(0, 8)}`.slice(0, 64);
    job.state = 'offered';
    job.progress = 0;
    if (running !== undefined) job.from = running;
    job.reason = undefined;
    job.retryable = undefined;
    await this.opts.offer(mcuId, { id: job.offerId, name: 'fw.update', args: { v: job.version, sha256: job.imageSha, size: job.size }, expiresAt: this.now() + (this.opts.offerTtlMs ?? 7 * 24 * 3600 * 1000) });
    await this.save(mcuId, job);
    await this.report(mcuId, job);
  }

  /** One fetch and verification per bundle, shared by every MCU that wants it. */
  private fetchOnce(job: Job): Promise<Fetched> {
    const have = this.fetches.get(job.bundleSha);
    if (have) return have.p;
    const entry = { p: this.fetchAndVerify(job), done: false };
    this.fetches.set(job.bundleSha, entry);
    entry.p.then(
      () => {
        entry.done = true;
      },
      () => {
        entry.done = true;
        if (this.fetches.get(job.bundleSha) === entry) this.fetches.delete(job.bundleSha);
      },
    );
    return entry.p;
  }

  private async fetchAndVerify(job: Job): Promise<Fetched> {
    if (!this.opts.verify) throw new FleetError('FLEET_MCU_FIRMWARE', 'this gateway has no firmware trust root configured; it cannot verify MCU firmware bundles');
    const bundle = join(this.opts.dir, `${job.bundleSha}.bundle`);
    if ((await sha256File(bundle).catch(() => '')) !== job.bundleSha) {
      await this.download(job.url, bundle);
      const got = await sha256File(bundle);
      if (got !== job.bundleSha) {
        await rm(bundle, { force: true });
        throw new FleetError('FLEET_MCU_FIRMWARE', `bundle sha256 is ${got}, the desired state says ${job.bundleSha}`);
      }
    }
    // the version and the anti-rollback floor (MCUs cannot check it themselves: a bundle name's
    // sequence may not go below the highest one an MCU of this gateway has booted into) are
    // checked per job, in run and offerIfNeeded: this fetch is shared by every job naming the bundle
    const verified = await this.opts.verify(bundle, { version: job.version, sha256: job.bundleSha });
    const data = typeof verified.image === 'string' ? await readFile(verified.image) : verified.image;
    if (data.length === 0 || data.length > (this.opts.maxImageBytes ?? 16 * 1024 * 1024)) throw new FleetError('FLEET_MCU_FIRMWARE', `firmware image of ${data.length} bytes is empty or too large`);
    const sha = createHash('sha256').update(data).digest();
    const imageSha = sha.toString('hex');
    const file = join(this.opts.dir, `${imageSha}.bin`);
    // synced before it takes its name: after a crash the cache holds the whole image or none
    this.writing.add(imageSha);
    try {
      await writeFileAtomic(file, data);
    } finally {
      // the job names it in the same turn as this fetch resolves, before a prune can look
      this.writing.delete(imageSha);
    }
    this.images.set(imageSha, { version: verified.version, data, sha256: sha });
    return { version: verified.version, imageSha, size: data.length, ...(verified.name !== undefined && verified.sequence !== undefined ? { name: verified.name, sequence: verified.sequence } : {}) };
  }

  /** The anti-rollback floor of a firmware bundle name, or null when none was set. */
  async floor(name: string): Promise<number | null> {
    const v = await this.opts.db.get(`${FLOOR_PREFIX}${name}`);
    return v === undefined ? null : Number(v);
  }

  /** An MCU booted into a bundle's firmware: its sequence becomes the name's floor (never lowered). */
  private async raiseFloor(job: Job): Promise<void> {
    if (job.bundleName === undefined || job.sequence === undefined) return;
    const cur = await this.floor(job.bundleName);
    if (cur !== null && cur >= job.sequence) return;
    await this.opts.db.put(`${FLOOR_PREFIX}${job.bundleName}`, String(job.sequence), { sync: true });
    this.opts.log.info('MCU firmware floor raised', { name: job.bundleName, sequence: job.sequence });
    // offers of an older sequence not taken yet are below the floor now: taken back, failed
    for (const [mcuId, j] of this.jobs) {
      if (j === job || j.bundleName !== job.bundleName || j.sequence === undefined || j.sequence >= job.sequence) continue;
      if (j.state !== 'offered' && j.state !== 'transferring') continue;
      await this.withdraw(mcuId, j);
      await this.fail(mcuId, j, `FLEET_BUNDLE_ROLLBACK: firmware bundle ${j.bundleName} has sequence ${j.sequence}, below this gateway's floor ${job.sequence} (raised while it was offered)`, { bestEffort: true });
    }
  }

  private async loadImage(version: string, imageSha: string): Promise<ServedImage> {
    const have = this.images.get(imageSha);
    if (have) return have;
    const data = await readFile(join(this.opts.dir, `${imageSha}.bin`));
    const sha = createHash('sha256').update(data).digest();
    if (sha.toString('hex') !== imageSha) throw new FleetError('FLEET_MCU_FIRMWARE', `cached image ${imageSha} is damaged`);
    const img = { version, data, sha256: sha };
    this.images.set(imageSha, img);
    return img;
  }

  /** file:// (tests, sites without an artifact store) or http(s) with Range resume and the device token. */
  private async download(url: string, dest: string): Promise<void> {
    if (url.startsWith('file://')) {
      const data = await readFile(fileURLToPath(url));
      await writeFile(dest, data, { mode: 0o600 });
      return;
    }
    if (!/^https?:\/\//.test(url)) throw new FleetError('FLEET_MCU_FIRMWARE', `unsupported firmware URL ${url.slice(0, 100)}`);
    const part = `${dest}.part`;
    let lastErr: unknown;
    for (let attempt = 0; attempt < 5; attempt++) {
      const have = await stat(part).then((s) => s.size, () => 0);
      try {
        const res = await fetch(url, { headers: { authorization: `Basic ${Buffer.from(`${this.opts.gatewayId}:${this.opts.token}`).toString('base64')}`, ...(have > 0 ? { range: `bytes=${have}-` } : {}) }, signal: AbortSignal.timeout(60_000) });
        if (res.status >= 400 && res.status < 500 && res.status !== 416) throw new FleetError('FLEET_MCU_FIRMWARE', `artifact store answered HTTP ${res.status} for ${url}`);
        if (res.status === 416) {
          await rm(part, { force: true });
          continue;
        }
        if (!res.ok || !res.body) throw new Error(`HTTP ${res.status}`);
        const append = res.status === 206 && have > 0;
        const fh = await open(part, append ? 'a' : 'w', 0o600);
        try {
          for await (const chunk of res.body) await fh.write(chunk as Uint8Array);
          await fh.sync();
        } finally {
          await fh.close();
        }
        await rename(part, dest);
        return;
      } catch (err) {
        if (err instanceof FleetError) throw err;
        lastErr = err;
        await new Promise((r) => setTimeout(r, 500 * 2 ** attempt));
      }
    }
    throw new FleetError('FLEET_MCU_FIRMWARE', `downloading ${url} failed: ${(lastErr as Error)?.message}`, { cause: lastErr });
  }

  /** The image offered to an MCU, while an update is active. */
  imageFor(mcuId: string): ServedImage | null {
    const job = this.jobs.get(mcuId);
    if (!job || !job.imageSha || !ACTIVE.has(job.state)) return null;
    return this.images.get(job.imageSha) ?? null;
  }

  served(mcuId: string, protocol: McuProtocol, endOffset: number, bytes: number): void {
    this.opts.onBytes?.(protocol, bytes);
    // a request past the end of the image sent nothing: no progress
    if (bytes <= 0) return;
    const job = this.jobs.get(mcuId);
    if (!job || !ACTIVE.has(job.state)) return;
    const quarter = (p: number) => (job.size ? Math.floor((4 * p) / job.size) : 0);
    const before = quarter(job.progress);
    if (endOffset > job.progress) job.progress = endOffset;
    // progress to the hub when the first block goes out, then at 25, 50, 75 and 100 %, not per
    // block; a store that fails (a full disk) is logged: the block was served all the same
    if (job.state === 'offered' || quarter(job.progress) > before) {
      if (job.state === 'offered') job.state = 'transferring';
      this.save(mcuId, job).then(
        () => this.report(mcuId, job),
        (err: unknown) => this.opts.log.warn('cannot persist MCU firmware progress', { mcu: mcuId, err }),
      );
    }
  }

  async onAck(mcuId: string, entry: MailboxEntry, ack: McuAck): Promise<void> {
    const job = this.jobs.get(mcuId);
    if (!job || job.offerId !== entry.id || !ACTIVE.has(job.state)) return;
    if (ack.ok) {
      job.state = 'installing';
      await this.save(mcuId, job);
      return;
    }
    await this.fail(mcuId, job, `the MCU refused the image: ${ack.e ?? ack.code ?? 'no reason given'}`);
  }

  async onExpired(mcuId: string, entry: MailboxEntry): Promise<void> {
    const job = this.jobs.get(mcuId);
    if (!job || job.offerId !== entry.id || !ACTIVE.has(job.state) || job.state === 'installing') return;
    await this.fail(mcuId, job, 'the MCU did not take the update before the offer expired');
  }

  /** The version report after a boot decides an update in flight, or starts one that waited for it. */
  async onHello(mcuId: string, hello: McuHello, _previousFw: string | undefined): Promise<void> {
    const job = this.jobs.get(mcuId);
    if (!job) return;
    if (ACTIVE.has(job.state)) {
      if (hello.fw === job.version) {
        job.state = 'succeeded';
        job.reason = undefined;
        await this.raiseFloor(job);
        await this.save(mcuId, job);
        await this.report(mcuId, job, { boot: hello.boot });
        void this.prune();
        return;
      }
      if (job.state === 'installing' || hello.boot === 'rollback') {
        await this.fail(mcuId, job, `came back on ${hello.fw} (boot ${hello.boot}${hello.err ? `: ${hello.err}` : ''})`, { extra: { boot: hello.boot } });
      }
      return;
    }
    if (job.state === 'succeeded' && hello.fw !== job.version && job.imageSha) {
      if (hello.boot === 'rollback') {
        // booted into the target, then its bootloader went back (the new firmware did not confirm
        // itself in time): failed, and not offered again until the desired state changes
        await this.fail(mcuId, job, `rolled back to ${hello.fw} after booting ${job.version} (boot rollback${hello.err ? `: ${hello.err}` : ''})`, { extra: { boot: hello.boot } });
        return;
      }
      // it was on the target and is not any more (reflashed by hand): offer again (its image
      // may have to be fetched again: the run keeps the cache from pruning it meanwhile)
      if (this.running.has(job)) return;
      this.running.add(job);
      try {
        await this.offerIfNeeded(mcuId, job);
      } catch (err) {
        await this.failPreparation(mcuId, job, err);
      } finally {
        this.running.delete(job);
      }
    }
  }

  /** sha256s of the bundles and images something needs: a job fetching or offering, a run under way (a re-offer), a fetch not settled, an image being written */
  private inUse(): Set<string> {
    const keep = new Set<string>(this.writing);
    const need = (j: Job) => {
      keep.add(j.bundleSha);
      if (j.imageSha) keep.add(j.imageSha);
    };
    for (const j of this.jobs.values()) if (j.state === 'fetching' || ACTIVE.has(j.state)) need(j);
    for (const j of this.running) need(j);
    for (const [sha, f] of this.fetches) if (!f.done) keep.add(sha);
    return keep;
  }

  /**
   * Forget cached images no update in progress needs: in memory (up to maxImageBytes each)
   * and on disk (`.bin`, `.bundle` and a `.part` left by an interrupted download), so a
   * gateway that relays release after release does not keep them all. A job that succeeded
   * keeps nothing: offering it again (an MCU reflashed by hand) fetches the bundle again.
   */
  async prune(): Promise<void> {
    if (this.pruning) return void (this.pruneAgain = true);
    this.pruning = true;
    try {
      do {
        this.pruneAgain = false;
        const files = await readdir(this.opts.dir).catch(() => [] as string[]);
        // worked out after each await, never before: a job or a fetch may have started meanwhile
        let keep = this.inUse();
        for (const sha of this.images.keys()) if (!keep.has(sha)) this.images.delete(sha);
        for (const [sha, f] of this.fetches) if (f.done && !keep.has(sha)) this.fetches.delete(sha);
        for (const f of files) {
          const m = /^([0-9a-f]{64})\.(bin|bundle|bundle\.part)$/.exec(f);
          if (!m) continue;
          keep = this.inUse();
          if (!keep.has(m[1]!)) await rm(join(this.opts.dir, f), { force: true }).catch(() => undefined);
        }
      } while (this.pruneAgain);
    } catch (err) {
      this.opts.log.warn('cannot prune the MCU firmware cache', { err });
    } finally {
      this.pruning = false;
    }
  }
}

function sha256File(file: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const h = createHash('sha256');
    createReadStream(file)
      .on('data', (c) => h.update(c))
      .on('error', reject)
      .on('end', () => resolve(h.digest('hex')));
  });
}
