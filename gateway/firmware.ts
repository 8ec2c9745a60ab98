import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { mkdir, open, readdir, readFile, rename, rm, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { Level } from 'level';
import { writeFileAtomic } from '../core/atomic-file.ts';
import { FleetError, isFleetError } from '../core/errors.ts';
import type { Logger } from '../core/log.ts';
import { decodeMessage, type DesiredArtifact } from '../core/messages.ts';
import type { McuAck, McuHello } from '../firmware-bridge/frames.ts';
import { LogThrottle } from './ingress.ts';
import type { MailboxEntry } from './mailbox.ts';
import type { McuProtocol, Relay } from './relay.ts';

/**
 * Checks a downloaded firmware bundle (signature, trust, kind firmware) and returns the
 * MCU image inside. Injected by the CLI (cli/commands/gateway.ts wires bundles/): the
 * gateway does not import bundles/ (layout rule, DESIGN.md).
 */
export type VerifyFirmware = ((file: string, expect: { version: string; sha256: string }) => Promise<{ version: string; image: Buffer | string; name?: string; sequence?: number; /** the manifest's expiry, ms since the epoch */ expires?: number; /** the manifest's targets.deviceClass: hardware classes the image is for (empty or absent: any) */ deviceClass?: string[] }>) & {
  /** names the trust root the verifier checks against now: a verification made under another one is made again before an offer */
  trustVersion?: () => string;
};

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
  /** a failed preparation that may succeed later (the artifact store away): tried again at this time (ms) */
  retryAt?: number;
  /** automatic retries so far (the wait doubles) */
  retries?: number;
  /** `installing`: a version report must come by this time (ms), else the update failed */
  deadline?: number;
  /** `failed`: what failed, a stable token (docs/mcu-protocol.md "Firmware updates") */
  cause?: FailureCause;
  /** `failed`: the stable error code */
  code?: string;
  /** offers renewed after they expired untaken (each under a new id) */
  renewals?: number;
  /** the MCU's hardware class this job was refused for (cause target; '' = none reported): a hello with another one judges it again */
  targetHw?: string;
  /** an update the MCU had taken (`installing`) when this target replaced it: its next hello decides that one too */
  replaced?: { version: string; bundleName?: string; sequence?: number; from?: string; deadline?: number };
  /** failed because the trust root could not be loaded (`FLEET_BUNDLE_ROOT_*`): the root's trustVersion() then; retried once it changes */
  failedTrust?: string;
  /** once verified: the trust root it was verified under (the verifier's trustVersion()), the manifest's expiry (ms) and hardware classes; a standing offer is judged again by them */
  trust?: string;
  expires?: number;
  deviceClass?: string[];
}

/** What an `mcu.firmware` event says of a job. */
type Reported = Pick<Job, 'state' | 'version' | 'from' | 'size' | 'progress' | 'reason' | 'cause' | 'code'>;

/** Why a firmware job failed: part of the `mcu.firmware` event contract. */
export type FailureCause = 'preparation' | 'cancelled' | 'refused' | 'rollback' | 'old_version' | 'no_report' | 'below_floor' | 'target';

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
  /** base URL (http or https) for bundle URLs in desired states that are paths, such as the hub's artifact store's `/api/v1/artifacts/{sha256}` */
  baseUrl?: string | undefined;
  token: string;
  log: Logger;
  /** largest image served, bytes (default 16 MiB) */
  maxImageBytes?: number;
  /** how long an offer waits in the mailbox, ms (default 7 days); an offer not taken by then is renewed while the desired state stands */
  offerTtlMs?: number;
  /** how long an MCU that took the image (`ok:true`) has to report the new version, ms (default 30 min; at least 3 of its declared sleep periods) */
  installTimeoutMs?: number;
  /** a failed preparation is tried again after this, ms, the wait doubling up to retryMaxMs (defaults 1 min, 1 h) */
  retryMinMs?: number;
  retryMaxMs?: number;
  /** a download attempt that receives nothing for this long is given up, ms (default 60 s; no bound on the whole transfer) */
  downloadIdleMs?: number;
  /** how often deadlines and retries are looked at, ms (default 5 s) */
  tickMs?: number;
  onBytes?: (protocol: McuProtocol, bytes: number) => void;
  now?: () => number;
}

const ACTIVE: ReadonlySet<FirmwareState> = new Set(['offered', 'transferring', 'installing']);

/** An offer the MCU has not taken yet (offered, or its image being fetched): it can still be withdrawn. */
const standing = (j: { state: FirmwareState }): boolean => j.state === 'offered' || j.state === 'transferring';

/** db keys of the per-name anti-rollback floors (jobs are under `f!`) */
const FLOOR_PREFIX = 'fl!';

interface Fetched {
  /** the firmware version the bundle holds */
  version: string;
  imageSha: string;
  size: number;
  name?: string;
  sequence?: number;
  /** the manifest's expiry, ms */
  expires?: number;
  /** the verifier's trustVersion() when it was verified */
  trust?: string;
  /** hardware classes the image is for (empty: any) */
  deviceClass?: string[];
}

/** bytes a bundle may have beyond its image (manifest, signatures, framing) */
const BUNDLE_OVERHEAD_BYTES = 1024 * 1024;

function expired(job: Job, at: number): FleetError {
  return new FleetError('FLEET_BUNDLE_EXPIRED', `firmware bundle ${job.bundleName ?? job.bundleSha.slice(0, 16)} ${job.version} has expired (${new Date(at).toISOString()})`);
}

/**
 * Codes that judge the bundle itself: the same bundle fails them again, whenever and
 * wherever it is checked. Not among them: the trust root's (FLEET_BUNDLE_ROOT_*: this
 * gateway's configuration), and the staging and re-read steps' (FLEET_BUNDLE_STAGING,
 * FLEET_BUNDLE_CHANGED: this gateway's disk, a full one or a file touched meanwhile).
 */
const VERDICT_CODES: ReadonlySet<string> = new Set([
  'FLEET_BUNDLE_BAD_SIGNATURE', 'FLEET_BUNDLE_UNKNOWN_KEY', 'FLEET_BUNDLE_THRESHOLD', 'FLEET_BUNDLE_EXPIRED', 'FLEET_BUNDLE_KIND', 'FLEET_BUNDLE_TARGET',
  'FLEET_BUNDLE_ROLLBACK', 'FLEET_BUNDLE_HASH', 'FLEET_BUNDLE_TRUNCATED', 'FLEET_BUNDLE_FORMAT', 'FLEET_BUNDLE_MANIFEST_INVALID', 'FLEET_BUNDLE_MANIFEST_TOO_LARGE',
  'FLEET_BUNDLE_PATH', 'FLEET_BUNDLE_DUPLICATE_PATH',
]);

/** An operating-system error (EMFILE, EIO, ENOSPC…) as the cause: the machine failed, not the bundle. */
function systemCause(fe: FleetError): boolean {
  const c = fe.cause as { code?: unknown; syscall?: unknown } | undefined;
  return typeof c?.code === 'string' && typeof c.syscall === 'string';
}

/** The bundle's own verification judged it (not this gateway's disk or trust root). */
function isBundleVerdict(fe: FleetError): boolean {
  return VERDICT_CODES.has(fe.code) && !systemCause(fe);
}

/** A preparation that would fail the same way again (the bundle's verdict, or its URL or size): not tried again by the timer. */
function isVerdict(fe: FleetError): boolean {
  return (fe.details as { permanent?: boolean } | undefined)?.permanent === true || isBundleVerdict(fe);
}

/**
 * MCU firmware relay: desired state → fetch (Range resume or file://) → sha256 → verify
 * (injected) → cache the image by its sha256 → offer through the mailbox → serve chunks
 * (ingresses call `imageFor`/`served`) → success only when the MCU reports the new
 * version in its hello; the old version after an ok ack, or a rollback of this version, is
 * failure.
 *
 * Every change of one MCU's job (a desired state, an ack, an expiry, a hello, the end of a
 * preparation, a deadline) runs in that MCU's turn (`serial`), one after another: none of
 * them sees another half done. Long waits (a download, reading the cache) happen outside the
 * turn, and what comes after them checks that the job is still the MCU's current one.
 */
export class FirmwareManager {
  private readonly jobs = new Map<string, Job>();
  private readonly images = new Map<string, ServedImage>();
  /** one fetch and verification per bundle sha256; `done` once it settled (only then may it be dropped) */
  private readonly fetches = new Map<string, { p: Promise<Fetched>; done: boolean; /** trustVersion() when it started */ trust: string | undefined }>();
  /** jobs whose run() is under way (the retained desired state coming again must not start a second) */
  private readonly running = new Set<Job>();
  /** images being written to the cache by a fetch, not yet named by its job (one write per image) */
  private readonly writing = new Map<string, Promise<void>>();
  /** each MCU's turn: the tail of its queued job changes */
  private readonly turns = new Map<string, Promise<unknown>>();
  /** desired states that could not be handled (a store error): handled again at the next tick */
  private readonly pendingDesired = new Map<string, Buffer>();
  /** desired states received per MCU (this run): a failed one is retried only if it is still the latest */
  private readonly desiredGen = new Map<string, number>();
  private readonly now: () => number;
  private readonly timer: NodeJS.Timeout;
  private readonly closeCtl = new AbortController();
  private pruning = false;
  private pruneAgain = false;
  private recheckingOffers = false;
  /** the trustVersion() the trust root failed to load under: standing offers wait for it to change (and it is logged once) */
  private rootBrokenUnder: string | undefined;
  /** a bundle that cannot be verified again now: logged once a minute per bundle, not per offer and tick */
  private readonly transientLog: LogThrottle;

  private constructor(private readonly opts: FirmwareManagerOptions) {
    this.now = opts.now ?? Date.now;
    this.transientLog = new LogThrottle(opts.log);
    this.timer = setInterval(() => this.tick(), opts.tickMs ?? 5000);
    this.timer.unref();
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
      // taken before this version had deadlines: counted from now
      if (job.state === 'installing' && job.deadline === undefined) job.deadline = fm.now() + fm.installTimeout(mcuId);
      // installing: the MCU has the image and is rebooting; its hello decides, no image needed
      if (!job.imageSha || !standing(job)) continue;
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

  /** Stop the deadline and retry timer and end downloads under way (the gateway is stopping). */
  close(): void {
    clearInterval(this.timer);
    this.closeCtl.abort();
  }

  private get closed(): boolean {
    return this.closeCtl.signal.aborted;
  }

  private get closing(): AbortSignal {
    return this.closeCtl.signal;
  }

  counts(): Record<'offered' | 'transferring' | 'installing' | 'succeeded' | 'failed' | 'fetching', number> {
    const c = { fetching: 0, offered: 0, transferring: 0, installing: 0, succeeded: 0, failed: 0 };
    for (const j of this.jobs.values()) c[j.state]++;
    return c;
  }

  state(mcuId: string): Readonly<Job> | undefined {
    return this.jobs.get(mcuId);
  }

  /** Run `change` in the MCU's turn: after every change queued for it before, never beside one. */
  private serial<T>(mcuId: string, change: () => Promise<T>): Promise<T> {
    const run = (this.turns.get(mcuId) ?? Promise.resolve()).then(change);
    const tail = run.catch(() => undefined);
    this.turns.set(mcuId, tail);
    void tail.then(() => {
      if (this.turns.get(mcuId) === tail) this.turns.delete(mcuId);
    });
    return run;
  }

  private current(mcuId: string, job: Job): boolean {
    return this.jobs.get(mcuId) === job;
  }

  /** Persist the MCU's current job; a job replaced meanwhile is not written over its successor. */
  private async save(mcuId: string, job: Job): Promise<void> {
    if (!this.current(mcuId, job)) return;
    await this.opts.db.put(`f!${mcuId}`, JSON.stringify(job), { sync: true });
  }

  private async report(mcuId: string, job: Reported, extra: Record<string, unknown> = {}): Promise<void> {
    const data: Record<string, unknown> = { state: job.state, version: job.version, ...extra };
    if (job.from !== undefined) data.from = job.from;
    if (job.size) data.progress = Math.min(1, job.progress / job.size);
    if (job.reason !== undefined) data.reason = job.reason;
    if (job.state === 'failed') {
      if (job.cause !== undefined) data.cause = job.cause;
      if (job.code !== undefined) data.code = job.code;
    }
    try {
      await this.opts.relay.event(mcuId, 'mcu.firmware', job.state === 'failed' ? 'warning' : 'info', data);
    } catch (err) {
      this.opts.log.warn('cannot queue a firmware event', { mcu: mcuId, err });
    }
  }

  /**
   * The desired state the hub published for an MCU. One that cannot be handled now (a store
   * error: the hub has it acknowledged all the same) is handled again at the next tick.
   */
  async desired(mcuId: string, payload: Buffer): Promise<void> {
    let fw: DesiredArtifact | undefined;
    try {
      fw = decodeMessage('desired', payload).firmware;
    } catch (err) {
      this.opts.log.warn('desired state from the hub is not valid; ignored', { mcu: mcuId, err });
      return;
    }
    this.pendingDesired.delete(mcuId);
    const gen = (this.desiredGen.get(mcuId) ?? 0) + 1;
    this.desiredGen.set(mcuId, gen);
    try {
      await this.serial(mcuId, () => this.desiredNow(mcuId, fw));
    } catch (err) {
      // kept for the next tick only while no newer desired state came meanwhile
      if (this.desiredGen.get(mcuId) === gen) this.pendingDesired.set(mcuId, payload);
      this.opts.log.error('cannot handle an MCU desired state now; trying again shortly', { mcu: mcuId, err });
    }
  }

  private async desiredNow(mcuId: string, fw: DesiredArtifact | undefined): Promise<void> {
    const cur = this.jobs.get(mcuId);
    if (!fw) {
      // no firmware wanted any more: an offer not yet taken is withdrawn (by fail)
      if (cur && (cur.state === 'fetching' || standing(cur))) {
        // the same target named again later starts over
        await this.fail(mcuId, cur, 'cancelled: the desired state no longer names firmware', { retryable: true, cause: 'cancelled' });
      } else if (cur?.retryAt !== undefined) {
        cur.retryAt = undefined; // a failed preparation is not tried again for a target no longer wanted
        await this.save(mcuId, cur);
      }
      return;
    }
    if (cur && cur.bundleSha === fw.sha256 && cur.version === fw.version) {
      // same target: resume where it was (after a restart, a fetch may need redoing); a
      // preparation that failed (the artifact store away, a full mailbox) is tried again: the
      // hub's retained desired state comes again when the gateway reconnects after an outage.
      // A corrected URL for the same bundle is taken (the old one may be what failed)
      const moved = cur.url !== fw.url;
      cur.url = fw.url;
      // a preparation that failed at the old URL (unsupported, unreadable, a wrong file) may
      // work at the new one, whatever made it fail; a verdict on the bundle itself (trust,
      // signature, the anti-rollback floor, the MCU's hardware class) holds for the same sha256
      const urlMayFix = moved && cur.cause === 'preparation' && !cur.code?.startsWith('FLEET_BUNDLE_');
      if (cur.state === 'failed' && (cur.retryable || urlMayFix)) {
        this.restart(cur);
        await this.save(mcuId, cur);
        await this.report(mcuId, cur);
      } else if (moved) await this.save(mcuId, cur);
      if (cur.state === 'fetching') void this.run(mcuId, cur);
      return;
    }
    const running = this.opts.relay.meta(mcuId)?.fw;
    const job: Job = { version: fw.version, bundleSha: fw.sha256, url: fw.url, state: 'fetching', progress: 0 };
    if (running !== undefined) job.from = running;
    if (fw.size !== undefined) job.size = fw.size;
    // an update the MCU has taken cannot be stopped: its hello still decides it, and says so
    if (cur?.state === 'installing') job.replaced = { version: cur.version, ...(cur.bundleName !== undefined && cur.sequence !== undefined ? { bundleName: cur.bundleName, sequence: cur.sequence } : {}), ...(cur.from !== undefined ? { from: cur.from } : {}), ...(cur.deadline !== undefined ? { deadline: cur.deadline } : {}) };
    else if (cur?.replaced) job.replaced = cur.replaced;
    // a new target: the previous offer, if the MCU has not taken it yet, must not stay at the
    // head of its mailbox (it would hold every command behind it, and name an image no longer served)
    if (cur && standing(cur)) await this.withdraw(mcuId, cur);
    this.jobs.set(mcuId, job);
    if (running === fw.version) {
      job.state = 'succeeded';
      await this.report(mcuId, job);
      await this.save(mcuId, job);
      return;
    }
    await this.save(mcuId, job);
    await this.report(mcuId, job);
    void this.prune();
    void this.run(mcuId, job);
  }

  /** A failed job starts its preparation over (its retry count is kept: the backoff goes on). */
  private restart(job: Job): void {
    job.state = 'fetching';
    job.failedTrust = undefined;
    job.reason = undefined;
    job.retryable = undefined;
    job.retryAt = undefined;
    job.cause = undefined;
    job.code = undefined;
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
      // under the trust root in force now (rotated since a fetch was made: a key removed, or
      // put back): nothing is offered, or refused, on the strength of another root's verdict
      const f = await this.fetchCurrent(job);
      if (f.expires !== undefined && f.expires <= Date.now()) throw new FleetError('FLEET_BUNDLE_EXPIRED', `firmware bundle ${f.name ?? job.bundleSha.slice(0, 16)} ${f.version} has expired`);
      // superseded, or cancelled, meanwhile
      if (!this.current(mcuId, job) || job.state !== 'fetching') return;
      // checked per job, not only by the fetch that verified the bundle first: another job may
      // name the same bundle with another version
      if (f.version !== job.version) throw new FleetError('FLEET_MCU_FIRMWARE', `the bundle holds firmware ${f.version}, the desired state says ${job.version}`, { details: { permanent: true } });
      // the MCU cannot tell an image for another board; the gateway can, from its hello
      const hw = this.opts.relay.meta(mcuId)?.hw;
      if (f.deviceClass && (hw === undefined || !f.deviceClass.includes(hw))) {
        job.targetHw = hw ?? '';
        throw new FleetError('FLEET_BUNDLE_TARGET', `firmware bundle ${f.name ?? job.bundleSha.slice(0, 16)} ${f.version} is for ${f.deviceClass.join(', ')}; this MCU is ${hw ?? 'of no known hardware class (its hello has no hw)'}`, { details: { target: 'deviceClass', want: f.deviceClass, have: hw ?? null } });
      }
      job.imageSha = f.imageSha;
      job.size = f.size;
      job.trust = f.trust;
      job.expires = f.expires;
      job.deviceClass = f.deviceClass;
      if (f.name !== undefined && f.sequence !== undefined) {
        job.bundleName = f.name;
        job.sequence = f.sequence;
      }
      // in memory before the offer, outside the MCU's turn (reading the cache, or fetching
      // again when it is gone, may take long); the run keeps the image from being pruned
      await this.ensureImage(job);
      await this.serial(mcuId, async () => {
        if (this.current(mcuId, job) && job.state === 'fetching') await this.offerNow(mcuId, job);
      });
    } catch (err) {
      await this.serial(mcuId, () => this.failPreparation(mcuId, job, err)).catch((e: unknown) => this.opts.log.error('cannot record an MCU firmware failure', { mcu: mcuId, err: e }));
    } finally {
      this.running.delete(job);
    }
  }

  private async failPreparation(mcuId: string, job: Job, err: unknown): Promise<void> {
    // only a job still being prepared: one cancelled or superseded meanwhile stays as it is
    // (a cancel must not turn into a retried failure that offers the firmware after all)
    if (!this.current(mcuId, job) || job.state !== 'fetching') return;
    // an I/O error (a full disk, a missing file) is this step's failure, with its stable code
    const fe = isFleetError(err) ? err : new FleetError('FLEET_MCU_FIRMWARE', `preparing the firmware failed: ${(err as Error)?.message ?? String(err)}`, { cause: err });
    this.opts.log.warn('MCU firmware could not be prepared', { mcu: mcuId, version: job.version, err: fe });
    // what the bundle itself fails (its signature, trust, the anti-rollback floor, its
    // version) fails again the same way: not tried again on every reconnect, nor by the timer
    const again = !isVerdict(fe);
    // the trust root cannot be loaded: tried again once it changes (a retry under the same
    // one fails the same way), not on the backoff
    job.failedTrust = fe.code.startsWith('FLEET_BUNDLE_ROOT') ? this.opts.verify?.trustVersion?.() : undefined;
    const cause: FailureCause = fe.code === 'FLEET_BUNDLE_ROLLBACK' ? 'below_floor' : fe.code === 'FLEET_BUNDLE_TARGET' ? 'target' : 'preparation';
    await this.fail(mcuId, job, `${fe.code}: ${fe.message}`, { retryable: again, retry: again, cause, code: fe.code, bestEffort: true });
  }

  /**
   * A job ends failed: reported to the hub (severity warning), then persisted (a crash in
   * between reports it twice at worst: the MCU's resent hello, or the next try, decides
   * again), its offer taken back out of the mailbox, and its image no longer kept for it.
   * `retry`: tried again by the timer, the wait doubling. `bestEffort`: a store that fails is
   * logged, not thrown (the callers that run on their own, with nobody to tell).
   */
  private async fail(mcuId: string, job: Job, reason: string, o: { retryable?: boolean; retry?: boolean; cause: FailureCause; code?: string; extra?: Record<string, unknown>; bestEffort?: boolean }): Promise<void> {
    if (!this.current(mcuId, job)) return;
    const offered = standing(job);
    job.state = 'failed';
    job.reason = reason.slice(0, 250);
    job.retryable = o.retryable || undefined;
    job.cause = o.cause;
    job.code = o.code ?? 'FLEET_MCU_FIRMWARE';
    job.deadline = undefined;
    if (o.retry) {
      job.retries = (job.retries ?? 0) + 1;
      const min = this.opts.retryMinMs ?? 60_000;
      job.retryAt = this.now() + Math.min(this.opts.retryMaxMs ?? 3_600_000, min * 2 ** Math.min(20, job.retries - 1));
    } else {
      job.retryAt = undefined;
      job.retries = undefined;
    }
    if (offered) await this.withdraw(mcuId, job);
    await this.report(mcuId, job, o.extra);
    if (o.bestEffort) {
      try {
        await this.save(mcuId, job);
      } catch (err) {
        this.opts.log.error('cannot persist an MCU firmware failure', { mcu: mcuId, err });
      }
    } else await this.save(mcuId, job);
    void this.prune();
  }

  /** The job's image in memory: from the cache, or (gone) fetched and verified again. Throws when it cannot be had. */
  private async ensureImage(job: Job): Promise<void> {
    const imageSha = job.imageSha!;
    try {
      await this.loadImage(job.version, imageSha);
    } catch {
      // gone from the cache: fetched and verified again (a fetch still under way is shared)
      if (this.fetches.get(job.bundleSha)?.done) this.fetches.delete(job.bundleSha);
      const f = await this.fetchOnce(job);
      if (f.imageSha !== imageSha) throw new FleetError('FLEET_MCU_FIRMWARE', `the bundle now holds image ${f.imageSha.slice(0, 16)}, not ${imageSha.slice(0, 16)}`);
    }
  }

  /**
   * Offer (in the MCU's turn, its image in memory); an MCU already on the version needs
   * nothing. Checks the anti-rollback floor now, for this job (it may have risen since the
   * bundle was verified). Throws when the job cannot be offered.
   */
  private async offerNow(mcuId: string, job: Job): Promise<void> {
    if (!job.imageSha) return;
    if (job.bundleName !== undefined && job.sequence !== undefined) {
      const floor = await this.floor(job.bundleName);
      if (floor !== null && job.sequence < floor) throw new FleetError('FLEET_BUNDLE_ROLLBACK', `firmware bundle ${job.bundleName} has sequence ${job.sequence}, below this gateway's floor ${floor}`);
    }
    const running = this.opts.relay.meta(mcuId)?.fw;
    if (running === job.version) {
      job.state = 'succeeded';
      await this.report(mcuId, job);
      await this.save(mcuId, job);
      return;
    }
    job.offerId = `fw-${job.version}-${job.imageSha.slice(0, 8)}`.slice(0, 64);
    job.state = 'offered';
    job.progress = 0;
    if (running !== undefined) job.from = running;
    job.reason = undefined;
    job.retryable = undefined;
    job.retries = undefined;
    await this.opts.offer(mcuId, this.offerCommand(job));
    await this.save(mcuId, job);
    await this.report(mcuId, job);
  }

  private offerCommand(job: Job): { id: string; name: string; args: Record<string, unknown>; expiresAt: number } {
    return { id: job.offerId!, name: 'fw.update', args: { v: job.version, sha256: job.imageSha, size: job.size }, expiresAt: this.now() + (this.opts.offerTtlMs ?? 7 * 24 * 3600 * 1000) };
  }

  /** how long an MCU that took the image has to report its version: the option, and at least 3 of its declared sleep periods */
  private installTimeout(mcuId: string): number {
    const sleepS = this.opts.relay.meta(mcuId)?.sleepS ?? 0;
    return Math.max(this.opts.installTimeoutMs ?? 30 * 60_000, 3 * sleepS * 1000);
  }

  /** One fetch and verification per bundle, shared by every MCU that wants it. */
  private fetchOnce(job: Job): Promise<Fetched> {
    const have = this.fetches.get(job.bundleSha);
    if (have) return have.p;
    const entry = { p: this.fetchAndVerify(job), done: false, trust: this.opts.verify?.trustVersion?.() };
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

  /**
   * fetchOnce, under the trust root in force now: a fetch made under another one (rotated
   * since it started: a key removed, or put back) counts for nothing, neither its success nor
   * its verdict; the bundle is verified again (cached: no download). A root that keeps
   * changing gets three tries, then the last result stands.
   */
  private async fetchCurrent(job: Job): Promise<Fetched> {
    const rootNow = () => this.opts.verify?.trustVersion?.();
    let last: { ok: true; f: Fetched } | { ok: false; err: unknown } | undefined;
    for (let i = 0; i < 3; i++) {
      const have = this.fetches.get(job.bundleSha);
      if (have && have.trust !== rootNow()) {
        if (!have.done) await have.p.catch(() => undefined);
        if (this.fetches.get(job.bundleSha) === have) this.fetches.delete(job.bundleSha);
      }
      const p = this.fetchOnce(job);
      const under = this.fetches.get(job.bundleSha)?.trust;
      try {
        const f = await p;
        if (f.trust === rootNow()) return f;
        last = { ok: true, f };
      } catch (err) {
        if (under === rootNow()) throw err;
        last = { ok: false, err };
      }
    }
    if (last?.ok) return last.f;
    throw last?.err;
  }

  private async fetchAndVerify(job: Job): Promise<Fetched> {
    if (!this.opts.verify) throw new FleetError('FLEET_MCU_FIRMWARE', 'this gateway has no firmware trust root configured (firmwareTrustFile); it cannot verify MCU firmware bundles'); // not permanent: configured and restarted, the same desired state works
    const bundle = join(this.opts.dir, `${job.bundleSha}.bundle`);
    if ((await sha256File(bundle).catch(() => '')) !== job.bundleSha) {
      await this.download(job.url, bundle);
      const got = await sha256File(bundle);
      if (got !== job.bundleSha) {
        await rm(bundle, { force: true });
        throw new FleetError('FLEET_MCU_FIRMWARE', `bundle sha256 is ${got}, the desired state says ${job.bundleSha}`, { details: { permanent: true } });
      }
    }
    // the version and the anti-rollback floor (MCUs cannot check it themselves: a bundle name's
    // sequence may not go below the highest one an MCU of this gateway has booted into) are
    // checked per job, in run and offerNow: this fetch is shared by every job naming the bundle
    const trust = this.opts.verify.trustVersion?.();
    const verified = await this.opts.verify(bundle, { version: job.version, sha256: job.bundleSha });
    const data = typeof verified.image === 'string' ? await readFile(verified.image) : verified.image;
    if (data.length === 0 || data.length > this.maxImageBytes) throw new FleetError('FLEET_MCU_FIRMWARE', `firmware image of ${data.length} bytes is empty or too large`, { details: { permanent: true } });
    const sha = createHash('sha256').update(data).digest();
    const imageSha = sha.toString('hex');
    // synced before it takes its name: after a crash the cache holds the whole image or none.
    // Two bundles holding the same image share one write (one temporary file per image name)
    let write = this.writing.get(imageSha);
    if (!write) {
      write = writeFileAtomic(join(this.opts.dir, `${imageSha}.bin`), data).finally(() => {
        // the job names it in the same turn as this fetch resolves, before a prune can look
        this.writing.delete(imageSha);
      });
      this.writing.set(imageSha, write);
    }
    await write;
    this.images.set(imageSha, { version: verified.version, data, sha256: sha });
    return {
      version: verified.version,
      imageSha,
      size: data.length,
      ...(verified.name !== undefined && verified.sequence !== undefined ? { name: verified.name, sequence: verified.sequence } : {}),
      ...(verified.expires !== undefined ? { expires: verified.expires } : {}),
      ...(trust !== undefined ? { trust } : {}),
      ...(verified.deviceClass !== undefined && verified.deviceClass.length > 0 ? { deviceClass: verified.deviceClass } : {}),
    };
  }

  private get maxImageBytes(): number {
    return this.opts.maxImageBytes ?? 16 * 1024 * 1024;
  }

  /** The anti-rollback floor of a firmware bundle name, or null when none was set. */
  async floor(name: string): Promise<number | null> {
    const v = await this.opts.db.get(`${FLOOR_PREFIX}${name}`);
    return v === undefined ? null : Number(v);
  }

  /** An MCU booted into a bundle's firmware: its sequence becomes the name's floor (never lowered). */
  private async raiseFloor(b: { bundleName?: string; sequence?: number }): Promise<void> {
    const name = b.bundleName;
    const seq = b.sequence;
    if (name === undefined || seq === undefined) return;
    const cur = await this.floor(name);
    if (cur !== null && cur >= seq) return;
    await this.opts.db.put(`${FLOOR_PREFIX}${name}`, String(seq), { sync: true });
    this.opts.log.info('MCU firmware floor raised', { name, sequence: seq });
    // offers of an older sequence not taken yet are below the floor now: taken back, failed
    // (each in its own MCU's turn, not awaited: this runs in the turn of the MCU that booted, and its own next target waits behind it)
    for (const [other, j] of this.jobs) {
      // (not the job that raised it; the MCU's own next target is checked like any other)
      if (j === b || j.bundleName !== name || j.sequence === undefined || j.sequence >= seq) continue;
      if (!standing(j)) continue;
      const verdict = new FleetError('FLEET_BUNDLE_ROLLBACK', `firmware bundle ${name} has sequence ${j.sequence}, below this gateway's floor ${seq} (raised while it was offered)`);
      void this.serial(other, () => this.withdrawStanding(other, j, verdict)).catch((err: unknown) => this.opts.log.warn('cannot withdraw an offer below the firmware floor', { mcu: other, err }));
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

  /** A path (the hub's artifact store answers uploads with one) against `baseUrl`; any other URL as it is. */
  private resolveUrl(url: string): string {
    if (!url.startsWith('/')) return url;
    // '//host/…' and '/\\host/…' are network-path references: another host, not a path
    if (url.startsWith('//') || url.startsWith('/\\')) throw new FleetError('FLEET_MCU_FIRMWARE', `firmware URL ${url.slice(0, 100)} names another host without a scheme; give an absolute http(s):// URL`, { details: { permanent: true } });
    // not permanent: the gateway's configuration, not the bundle, is what is missing; once
    // firmwareBaseUrl is set (and the gateway restarted) the same desired state works
    if (!this.opts.baseUrl) throw new FleetError('FLEET_MCU_FIRMWARE', `firmware URL ${url.slice(0, 100)} is a path and firmwareBaseUrl is not set (the hub's HTTP address, e.g. http://hub:8080); set it, or name the bundle by an absolute URL`);
    return new URL(url, this.opts.baseUrl).toString();
  }

  /**
   * file:// (tests, sites without an artifact store: a regular file only) or http(s) with Range
   * resume and the device token. Bounded: a bundle larger than an image plus its manifest is
   * refused as it arrives, and an attempt is given up after `downloadIdleMs` without a byte
   * (not after a fixed time: a large bundle over a slow site uplink takes what it takes). The
   * `.part` of a failed download stays for the automatic retry to resume.
   */
  private async download(given: string, dest: string): Promise<void> {
    const url = this.resolveUrl(given);
    const limit = this.maxImageBytes + BUNDLE_OVERHEAD_BYTES;
    const tooLarge = (n: number) => new FleetError('FLEET_MCU_FIRMWARE', `the firmware bundle at ${url.slice(0, 100)} exceeds ${limit} bytes (${n} or more)`, { details: { permanent: true } });
    if (url.startsWith('file://')) {
      const path = fileURLToPath(url);
      const st = await stat(path);
      // not a FIFO or a device: reading one could block the shared fetch for good, or never end
      if (!st.isFile()) throw new FleetError('FLEET_MCU_FIRMWARE', `${url.slice(0, 100)} is not a regular file`, { details: { permanent: true } });
      if (st.size > limit) throw tooLarge(st.size);
      await writeFile(dest, await readFile(path), { mode: 0o600 });
      return;
    }
    if (!/^https?:\/\//.test(url)) throw new FleetError('FLEET_MCU_FIRMWARE', `unsupported firmware URL ${url.slice(0, 100)}`, { details: { permanent: true } });
    const part = `${dest}.part`;
    const idleMs = this.opts.downloadIdleMs ?? 60_000;
    let lastErr: unknown;
    for (let attempt = 0; attempt < 5; attempt++) {
      const have = await stat(part).then((s) => s.size, () => 0);
      const ac = new AbortController();
      const idle = setTimeout(() => ac.abort(new Error(`no data for ${Math.round(idleMs / 1000)} s`)), idleMs);
      idle.unref();
      // the gateway stopping ends a download under way
      const onClose = () => ac.abort(new Error('the gateway is stopping'));
      this.closing.addEventListener('abort', onClose);
      try {
        const res = await fetch(url, { headers: { authorization: `Basic ${Buffer.from(`${this.opts.gatewayId}:${this.opts.token}`).toString('base64')}`, ...(have > 0 ? { range: `bytes=${have}-` } : {}) }, signal: ac.signal });
        idle.refresh();
        if (res.status >= 400 && res.status < 500 && res.status !== 416) throw new FleetError('FLEET_MCU_FIRMWARE', `artifact store answered HTTP ${res.status} for ${url}`);
        if (res.status === 416) {
          await rm(part, { force: true });
          continue;
        }
        if (!res.ok || !res.body) throw new Error(`HTTP ${res.status}`);
        const append = res.status === 206 && have > 0;
        let size = append ? have : 0;
        const fh = await open(part, append ? 'a' : 'w', 0o600);
        try {
          for await (const chunk of res.body) {
            idle.refresh();
            size += (chunk as Uint8Array).length;
            if (size > limit) throw tooLarge(size);
            await fh.write(chunk as Uint8Array);
          }
          await fh.sync();
        } finally {
          await fh.close();
        }
        await rename(part, dest);
        return;
      } catch (err) {
        if (err instanceof FleetError) {
          if ((err.details as { permanent?: boolean } | undefined)?.permanent) await rm(part, { force: true });
          throw err;
        }
        lastErr = ac.signal.aborted ? ac.signal.reason : err;
        if (this.closed) break;
        await new Promise((r) => setTimeout(r, 500 * 2 ** attempt).unref());
      } finally {
        clearTimeout(idle);
        this.closing.removeEventListener('abort', onClose);
      }
    }
    throw new FleetError('FLEET_MCU_FIRMWARE', `downloading ${url} failed: ${(lastErr as Error)?.message}`, { cause: lastErr });
  }

  /** The image offered to an MCU, while it may be fetching it. */
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
      void this.serial(mcuId, async () => {
        if (!this.current(mcuId, job) || (job.state !== 'transferring' && job.state !== 'installing')) return;
        await this.save(mcuId, job);
        await this.report(mcuId, job);
      }).catch((err: unknown) => this.opts.log.warn('cannot persist MCU firmware progress', { mcu: mcuId, err }));
    }
  }

  onAck(mcuId: string, entry: MailboxEntry, ack: McuAck): Promise<void> {
    return this.serial(mcuId, async () => {
      const job = this.jobs.get(mcuId);
      if (!job || job.offerId !== entry.id || !ACTIVE.has(job.state)) return;
      if (ack.ok) {
        if (job.state === 'installing') return;
        job.state = 'installing';
        job.deadline = this.now() + this.installTimeout(mcuId);
        await this.save(mcuId, job);
        void this.prune(); // it has the image: no need to keep it in memory for it
        return;
      }
      await this.fail(mcuId, job, `the MCU refused the image: ${ack.e ?? ack.code ?? 'no reason given'}`, { cause: 'refused' });
    });
  }

  /**
   * An offer the MCU did not take before it expired: the MCU has been away (a week in a
   * drawer, a seasonal site). The desired state still stands, so the offer is renewed: the
   * MCU converges when it comes back.
   */
  onExpired(mcuId: string, entry: MailboxEntry): Promise<void> {
    return this.serial(mcuId, async () => {
      const job = this.jobs.get(mcuId);
      if (!job || job.offerId !== entry.id || !standing(job)) return;
      // a bundle expired meanwhile is not offered again: withdrawn instead
      if (job.expires !== undefined && job.expires <= Date.now()) return this.withdrawStanding(mcuId, job, expired(job, job.expires));
      // under a new id: the expired entry is removed from the mailbox only after this returns
      // (the same id would be taken for it). An MCU that was fetching the image keeps its
      // download (the contract: a new offer of the same image resumes)
      // the job takes the new id only once the offer is in the mailbox: one that could not be
      // made (a full mailbox, the disk) keeps the expired entry and is tried at the next sweep
      const renewals = (job.renewals ?? 0) + 1;
      const offerId = `fw-${job.imageSha!.slice(0, 8)}-r${renewals}-${job.version}`.slice(0, 64);
      await this.opts.offer(mcuId, { ...this.offerCommand(job), id: offerId });
      job.renewals = renewals;
      job.offerId = offerId;
      await this.save(mcuId, job);
      this.opts.log.info('MCU firmware offer renewed (not taken before it expired)', { mcu: mcuId, version: job.version, offer: job.offerId });
    });
  }

  /** The version report after a boot decides an update in flight, or starts one that waited for it. */
  onHello(mcuId: string, hello: McuHello): Promise<void> {
    return this.serial(mcuId, () => this.helloNow(mcuId, hello));
  }

  private async helloNow(mcuId: string, hello: McuHello): Promise<void> {
    const job = this.jobs.get(mcuId);
    if (!job) return;
    // compared with the class the job was refused for, not with the previous hello: a hello
    // whose handling was cut short (a crash, a failed save) must not leave the job refused
    if (job.state === 'failed' && job.cause === 'target' && hello.hw !== undefined && hello.hw !== job.targetHw && hello.fw !== job.version) {
      // refused for the MCU's hardware class, which it now reports (first, or another): judged again
      job.state = 'fetching';
      job.reason = job.cause = job.code = job.retryAt = job.retries = job.retryable = job.targetHw = undefined;
      await this.save(mcuId, job);
      void this.run(mcuId, job);
      return;
    }
    const boot = { boot: hello.boot };
    const why = `boot ${hello.boot}${hello.err ? `: ${hello.err}` : ''}`;
    if (job.replaced) {
      // the update this target replaced while the MCU installed it: decided by this hello too
      const r = job.replaced;
      job.replaced = undefined;
      const ok = hello.fw === r.version;
      if (ok) await this.raiseFloor(r);
      const outcome: Reported = ok
        ? { state: 'succeeded', version: r.version, from: r.from, progress: 0 }
        : { state: 'failed', version: r.version, from: r.from, progress: 0, reason: `came back on ${hello.fw} (${why})`, cause: hello.boot === 'rollback' ? 'rollback' : 'old_version', code: 'FLEET_MCU_FIRMWARE' };
      await this.report(mcuId, outcome, boot);
      await this.save(mcuId, job);
    }
    // an offer standing for a hardware class the MCU no longer reports (another board behind
    // the same id, or a first hw): taken back, as a new target would be refused for it
    if (standing(job) && job.deviceClass && hello.hw !== undefined && !job.deviceClass.includes(hello.hw) && hello.fw !== job.version) {
      job.targetHw = hello.hw;
      await this.withdrawStanding(mcuId, job, new FleetError('FLEET_BUNDLE_TARGET', `firmware ${job.version} is for ${job.deviceClass.join(', ')}; this MCU now reports ${hello.hw}`, { details: { target: 'deviceClass', want: job.deviceClass, have: hello.hw } }));
      return;
    }
    if (ACTIVE.has(job.state) || (job.state === 'failed' && job.cause !== 'cancelled' && hello.fw === job.version)) {
      if (hello.fw === job.version) {
        // also a failed job whose MCU reports its version after all (its hello was late, its
        // ack was lost and the offer expired): it runs the target
        job.state = 'succeeded';
        job.reason = job.cause = job.code = job.deadline = job.retryAt = job.retries = job.retryable = undefined;
        await this.raiseFloor(job);
        await this.report(mcuId, job, boot);
        await this.save(mcuId, job);
        void this.prune();
        return;
      }
      // failed only when this update is the one that did not come up: the MCU took it
      // (installing), or its bootloader went back from this version. A rollback of another
      // version (one this target replaced, decided above) says nothing about this offer
      if (job.state === 'installing' || (hello.boot === 'rollback' && hello.prev === job.version)) {
        await this.fail(mcuId, job, `came back on ${hello.fw} (${why})`, { cause: hello.boot === 'rollback' ? 'rollback' : 'old_version', extra: boot });
      }
      return;
    }
    if (job.state === 'succeeded' && hello.fw !== job.version && job.imageSha) {
      if (hello.boot === 'rollback') {
        // booted into the target, then its bootloader went back (the new firmware did not confirm
        // itself in time): failed, and not offered again until the desired state changes
        await this.fail(mcuId, job, `rolled back to ${hello.fw} after booting ${job.version} (${why})`, { cause: 'rollback', extra: boot });
        return;
      }
      // it was on the target and is not any more (reflashed by hand): offer again (its image
      // may have to be fetched again: the run keeps the cache from pruning it meanwhile)
      job.state = 'fetching';
      await this.save(mcuId, job);
      void this.run(mcuId, job);
    }
  }

  /**
   * Standing offers (offered, transferring: the MCU has not taken the image) whose bundle's
   * manifest has expired since are withdrawn, every tick: no I/O, nothing to wait for.
   */
  private expireOffers(): void {
    const now = Date.now();
    for (const [mcuId, j] of this.jobs) {
      if (!standing(j) || j.expires === undefined || j.expires > now) continue;
      const expires = j.expires;
      void this.serial(mcuId, () => this.withdrawStanding(mcuId, j, expired(j, expires))).catch((err: unknown) => this.opts.log.warn('cannot withdraw an expired MCU firmware offer', { mcu: mcuId, err }));
    }
  }

  /**
   * Standing offers verified under another trust root than the current one (rotated since:
   * a key removed, or saved by a version that did not record it) are verified again, one
   * verification per bundle, in the background of the timer: one whose bundle no longer
   * verifies is withdrawn and failed, so no MCU goes on fetching it. Only a verdict on the
   * bundle withdraws (its signature, keys, hashes, format, expiry, kind: `isVerdict`); a
   * trust root that cannot be loaded (unreadable, invalid, expired) or a failure of this
   * gateway's own disk leaves the offers as they are, logged, and the next tick tries again.
   */
  private async recheckOffers(trust: string | undefined): Promise<void> {
    // a root that could not be loaded is tried again once it changes
    if (this.recheckingOffers || trust === undefined || this.closed || trust === this.rootBrokenUnder) return;
    // bundle sha256 → the standing offers naming it that were verified under another root
    const stale = new Map<string, Array<[string, Job]>>();
    for (const [mcuId, j] of this.jobs) {
      if (!standing(j) || j.trust === trust) continue;
      const list = stale.get(j.bundleSha) ?? [];
      list.push([mcuId, j]);
      stale.set(j.bundleSha, list);
    }
    if (stale.size === 0) {
      this.rootBrokenUnder = undefined; // (a root that changed since it failed)
      return;
    }
    this.recheckingOffers = true;
    try {
      for (const [bundleSha, all] of stale) {
        if (this.closed) return;
        // still standing and still unverified under this root (an earlier bundle of this pass,
        // the expiry sweep or a new target may have changed them): none left, nothing to fetch
        const offers = all.filter(([mcuId, j]) => this.current(mcuId, j) && standing(j) && j.trust !== trust);
        if (offers.length === 0) continue;
        let verdict: FleetError | undefined;
        let got: Fetched | undefined;
        try {
          got = await this.fetchCurrent(offers[0]![1]);
        } catch (err) {
          const fe = isFleetError(err) ? err : undefined;
          if (fe?.code.startsWith('FLEET_BUNDLE_ROOT')) {
            this.opts.log.error('the firmware trust root cannot be loaded; standing MCU firmware offers are not verified again until it changes (they stay offered)', { err: fe });
            this.rootBrokenUnder = trust;
            return;
          }
          // only the bundle's own verdict: a failure of fetching it again (a file:// path
          // overwritten since, the artifact store) judges the URL, not the bundle offered
          if (!fe || !isBundleVerdict(fe)) {
            this.transientLog.warn(bundleSha, 'cannot verify the bundle of standing MCU firmware offers again; they stay offered and it is tried again at the next tick', { bundle: bundleSha.slice(0, 16), offers: offers.length, examples: offers.slice(0, 3).map(([id]) => id), err });
            continue;
          }
          verdict = fe;
        }
        this.rootBrokenUnder = undefined;
        if (got && got.trust !== trust) continue; // rotated again meanwhile: the next tick
        for (const [mcuId, j] of offers) {
          let v = verdict;
          if (got) {
            if (got.imageSha !== j.imageSha || got.version !== j.version) v = new FleetError('FLEET_MCU_FIRMWARE', `the bundle now holds firmware ${got.version} (image ${got.imageSha.slice(0, 16)}), not ${j.version} (${j.imageSha?.slice(0, 16)})`, { details: { permanent: true } });
            else if (got.expires !== undefined && got.expires <= Date.now()) v = expired(j, got.expires);
            else {
              // in memory only (saved with the job's next change; after a restart the bundle
              // is verified once more): no synced write per MCU
              j.trust = got.trust;
              j.expires = got.expires;
              j.deviceClass = got.deviceClass;
              continue;
            }
          }
          const why = v!;
          await this.serial(mcuId, () => this.withdrawStanding(mcuId, j, why)).catch((err: unknown) => this.opts.log.warn('cannot withdraw an MCU firmware offer', { mcu: mcuId, err }));
        }
      }
    } catch (err) {
      this.opts.log.warn('cannot judge standing MCU firmware offers again', { err });
    } finally {
      this.recheckingOffers = false;
    }
  }

  /** An offer judged no longer valid (in the MCU's turn): withdrawn from the mailbox and failed with the verdict's code. */
  private async withdrawStanding(mcuId: string, job: Job, verdict: FleetError): Promise<void> {
    if (!this.current(mcuId, job) || !standing(job)) return;
    this.opts.log.warn('MCU firmware offer withdrawn', { mcu: mcuId, version: job.version, code: verdict.code, err: verdict });
    const cause: FailureCause = verdict.code === 'FLEET_BUNDLE_TARGET' ? 'target' : verdict.code === 'FLEET_BUNDLE_ROLLBACK' ? 'below_floor' : 'preparation';
    // the marker before the message: fail() keeps the first 250 characters
    await this.fail(mcuId, job, `${verdict.code} (offer withdrawn): ${verdict.message}`, { cause, code: verdict.code, bestEffort: true });
  }

  /** Deadlines of MCUs that took an image, automatic retries, desired states to handle again. */
  private tick(): void {
    const now = this.now();
    // the root file read once per tick (a read and a hash), for the offers and the retries
    const trust = this.opts.verify?.trustVersion?.();
    this.expireOffers();
    void this.recheckOffers(trust);
    for (const [mcuId, payload] of this.pendingDesired) {
      this.pendingDesired.delete(mcuId);
      void this.desired(mcuId, payload);
    }
    for (const [mcuId, j] of this.jobs) {
      const r = j.replaced;
      if (r?.deadline !== undefined && r.deadline <= now) {
        // the update a new target replaced while the MCU installed it: no hello decided it in time
        void this.serial(mcuId, async () => {
          if (!this.current(mcuId, j) || j.replaced !== r) return;
          j.replaced = undefined;
          await this.report(mcuId, { state: 'failed', version: r.version, from: r.from, progress: 0, reason: `no version report within ${Math.round(this.installTimeout(mcuId) / 60_000)} min of the MCU taking the image`, cause: 'no_report', code: 'FLEET_MCU_FIRMWARE' });
          await this.save(mcuId, j);
        }).catch((err: unknown) => this.opts.log.warn('cannot report a replaced MCU firmware update past its deadline', { mcu: mcuId, err }));
      }
      if (j.state === 'installing' && j.deadline !== undefined && j.deadline <= now) {
        void this.serial(mcuId, async () => {
          if (!this.current(mcuId, j) || j.state !== 'installing' || j.deadline === undefined || j.deadline > now) return;
          await this.fail(mcuId, j, `no version report within ${Math.round(this.installTimeout(mcuId) / 60_000)} min of the MCU taking the image (bricked, or its hello was lost; a later hello on ${j.version} still counts as success)`, { cause: 'no_report', bestEffort: true });
        }).catch((err: unknown) => this.opts.log.warn('cannot fail an MCU firmware update past its deadline', { mcu: mcuId, err }));
      } else if (j.state === 'failed' && j.retryAt !== undefined && (j.failedTrust !== undefined ? j.failedTrust !== trust : j.retryAt <= now)) {
        // (a job failed on the trust root waits for the root to change, then goes at once)
        void this.serial(mcuId, async () => {
          if (!this.current(mcuId, j) || j.state !== 'failed' || j.retryAt === undefined) return;
          if (j.failedTrust !== undefined ? j.failedTrust === trust : j.retryAt > now) return;
          this.restart(j);
          await this.save(mcuId, j);
          await this.report(mcuId, j);
          void this.run(mcuId, j);
        }).catch((err: unknown) => this.opts.log.warn('cannot retry an MCU firmware preparation', { mcu: mcuId, err }));
      }
    }
  }

  /**
   * sha256s of the bundles and images something needs: a job fetching or offering, a run
   * under way (a re-offer), a fetch not settled, an image being written. (`installing`: the
   * MCU has the image; its hello decides without it.)
   */
  private inUse(): Set<string> {
    const keep = new Set<string>(this.writing.keys());
    const need = (j: Job) => {
      keep.add(j.bundleSha);
      if (j.imageSha) keep.add(j.imageSha);
    };
    for (const j of this.jobs.values()) if (j.state === 'fetching' || standing(j)) need(j);
    for (const j of this.running) need(j);
    for (const [sha, f] of this.fetches) if (!f.done) keep.add(sha);
    return keep;
  }

  /** bundles an automatic retry will need: an interrupted download's `.part`, or a whole `.bundle` that failed after its download, is kept */
  private resumable(): Set<string> {
    const keep = new Set<string>();
    for (const j of this.jobs.values()) if (j.state === 'failed' && j.retryAt !== undefined) keep.add(j.bundleSha);
    return keep;
  }

  /**
   * Forget cached images no update in progress needs: in memory (up to maxImageBytes each)
   * and on disk (`.bin`, `.bundle`, a `.part` left by an interrupted download unless a retry
   * will resume it, and an extraction directory left by a crash), so a gateway that relays release after release does not keep them
   * all. A job that succeeded keeps nothing: offering it again (an MCU reflashed by hand)
   * fetches the bundle again.
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
          // extract-<bundle sha256>: the verifier's working directory (cli/commands/gateway.ts),
          // left behind by a crash during an extraction
          const m = /^([0-9a-f]{64})\.(bin|bundle|bundle\.part)$/.exec(f) ?? /^extract-([0-9a-f]{64})()$/.exec(f);
          if (!m) continue;
          keep = this.inUse();
          // the bundle of a preparation the timer tries again is kept too (whole or in part):
          // a failure after its download (the trust root, the disk) must not cost another one
          if (m[2] === 'bundle.part' || m[2] === 'bundle') for (const sha of this.resumable()) keep.add(sha);
          if (!keep.has(m[1]!)) await rm(join(this.opts.dir, f), { force: true, recursive: m[2] === '' }).catch(() => undefined);
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
