import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { EventEmitter } from 'node:events';
import { chmodSync, copyFileSync, createWriteStream, existsSync, mkdirSync, readdirSync, renameSync, rmSync, statSync } from 'node:fs';
import type { IncomingMessage } from 'node:http';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { FleetError, toFleetError } from '../../core/errors.ts';
import type { Logger } from '../../core/log.ts';
import type { DesiredState } from '../../core/messages.ts';
import type { AppSpec } from '../config.ts';
import type { Supervisor } from '../supervisor.ts';
import type { UpdateConfig } from './config.ts';
import { download, sha256File, statfsFree } from './download.ts';
import { fsyncDir, readJson, readLink, switchSymlink, writeJsonAtomic } from './files.ts';
import { appSpecFor, Layout, META_FILE } from './layout.ts';
import { AFTER_SWITCH, isUpdateState, loopGuardApplies, RESUME, STATE_VERSION, TERMINAL, TRANSITIONS, type UpdateState } from './machine.ts';
import { advance, type Outcome } from './record.ts';
import type { ReleaseMeta, UpdateRecord, UpdateSource, VerifiedBundleLike, VerifyBundleFn } from './types.ts';

export interface UpdaterDeps {
  stateDir: string;
  config: UpdateConfig;
  log: Logger;
  supervisor: Supervisor;
  /** re-apply the supervisor's app list (the config's apps plus `updater.appSpecs()`) */
  applyApps(): Promise<void>;
  verify: VerifyBundleFn;
  /** this agent's version (the bundle targets' minAgentVersion, and whether desired.agent differs) */
  agentVersion: string;
  /** when this process started, ms since epoch (default from process.uptime()); self-update tells old binary from new by it */
  processStartedAt?: number;
  emitEvent(type: string, severity: 'info' | 'warning' | 'alert', data: Record<string, unknown>): unknown;
  /** Authorization header for artifact downloads from the hub */
  authorization?: () => string | undefined;
  /** the hub connection is up (agent self-update: the new agent must get connected) */
  connected?: () => boolean;
  /** whether a hub is configured at all (if not, self-update only needs the agent to start) */
  hubConfigured?: boolean;
  /** exit so the service manager restarts into the switched agent binary */
  exitForRestart?: () => void;
  /** free bytes on a filesystem (tests inject) */
  freeBytes?: (dir: string) => number;
  /** called after each state is persisted and before its action runs (tests use it to kill in a state) */
  onEnter?: (state: UpdateState, rec: Readonly<UpdateRecord>) => Promise<void> | void;
}

/** an update asked for and not started yet: the fields of its future record that the source sets */
type Request = Pick<UpdateRecord, 'source' | 'file' | 'url' | 'sha256' | 'size' | 'wantName' | 'wantKind'>;


const EVENT_FOR: Partial<Record<UpdateState, { type: string; severity: 'info' | 'warning' | 'alert' }>> = {
  committed: { type: 'update.committed', severity: 'info' },
  'rolled-back': { type: 'update.rolled-back', severity: 'alert' },
  failed: { type: 'update.failed', severity: 'warning' },
};

/**
 * The updater (docs/ota.md): takes bundles from the hub's desired state, the local API and
 * a watched directory, one at a time, through the state machine in machine.ts. Every state
 * is persisted (write-temp, fsync, rename) before its action runs; on start the resume
 * table decides what to do with whatever was persisted.
 */
export class Updater extends EventEmitter {
  readonly layout: Layout;
  private rec: UpdateRecord | null = null;
  private queue: Request[] = [];
  /** apps the hub installed that its latest desired state no longer names (removed between updates) */
  private removals: string[] = [];
  private running: Promise<void> | null = null;
  private stopped = false;
  private readonly ac = new AbortController();
  private watchTimer: NodeJS.Timeout | null = null;
  private retryTimer: NodeJS.Timeout | null = null;
  private again = false;
  private readonly watchSeen = new Map<string, string>();
  /** size:mtime of each watched file at the previous scan */
  private watchLastScan = new Map<string, string>();
  private scanning = false;
  /** when this process last (re)applied an app's spec: probation counts exits after it */
  private readonly appliedAt = new Map<string, number>();

  /** the supervisor's last 'unhealthy' verdict per app (it restarts the app right after) */
  private readonly unhealthy = new Map<string, { at: number; reason: string }>();
  private readonly onUnhealthy = (e: { app: string; reason: string }) => this.unhealthy.set(e.app, { at: Date.now(), reason: e.reason });

  constructor(private readonly d: UpdaterDeps) {
    super();
    this.layout = new Layout(d.stateDir);
    d.supervisor.on('unhealthy', this.onUnhealthy);
    for (const dir of [this.layout.downloads, this.layout.incoming]) mkdirSync(dir, { recursive: true });
    // before the supervisor first applies appSpecs(): a removal cut short by a crash is finished
    for (const name of this.layout.appDirs()) if (existsSync(join(this.layout.base('app', name), REMOVING))) this.dropAppDir(name);
  }

  // ---------------------------------------------------------------- public

  /** Specs of the apps the updater installed, from each app's `current` release. */
  appSpecs(): AppSpec[] {
    const out: AppSpec[] = [];
    for (const name of this.layout.installedApps()) {
      const rel = this.layout.currentRelease('app', name);
      const meta = rel ? this.layout.meta('app', name, rel) : null;
      if (rel && meta) out.push(appSpecFor(name, join(this.layout.releases('app', name), rel), meta));
    }
    return out;
  }

  /** The update in progress or the last one, and finished ones, newest first. */
  status(): { current: UpdateRecord | null; queued: number; history: UpdateRecord[] } {
    return { current: this.rec, queued: this.queue.length, history: readJson<UpdateRecord[]>(this.layout.historyFile, []) };
  }

  /** Resume whatever was persisted (resume table), then serve the queue and the watched dir. */
  async start(): Promise<void> {
    this.rec = this.loadRecord();
    const rec = this.rec;
    if (rec && RESUME[rec.state] === 'rerun') {
      rec.resumes++;
      rec.history.push({ state: rec.state, at: Date.now(), resumed: true });
      this.d.log.warn('resuming update after restart', { id: rec.id, state: rec.state, resumes: rec.resumes });
      if (loopGuardApplies(rec.state) && rec.resumes > this.d.config.maxResumes) {
        await this.transition(rec, { event: 'loop-detected', reason: `update resumed ${rec.resumes} times; abandoned (loop guard)`, code: 'FLEET_UPDATE_LOOP' });
      } else this.persist(rec);
    }
    for (const f of readdirSync(this.layout.incoming)) {
      const file = join(this.layout.incoming, f);
      if (f.endsWith('.bundle') && file !== rec?.file) this.queue.push({ source: 'upload', file });
      else if (f.endsWith('.part')) rmSync(file, { force: true });
    }
    const desired = readJson<DesiredState | null>(join(this.d.stateDir, 'desired.json'), null);
    if (desired) this.onDesired(desired);
    if (this.d.config.watchDir) {
      this.watchTimer = setInterval(() => void this.scanWatchDir().catch((err: unknown) => this.d.log.warn('watch dir scan failed', { err })), this.d.config.watchIntervalMs);
      void this.scanWatchDir().catch(() => undefined);
    }
    this.kick();
  }

  /**
   * The persisted record. One that cannot be read (or of an unknown version or state) is moved
   * aside and reported: the device keeps running whatever `current` points at, which is always
   * a complete release.
   */
  private loadRecord(): UpdateRecord | null {
    try {
      const rec = readJson<UpdateRecord | null>(this.layout.stateFile, null);
      if (rec === null) return null;
      if (rec.v !== STATE_VERSION || !isUpdateState(rec.state) || !Array.isArray(rec.history)) {
        throw new FleetError('FLEET_UPDATE_STATE', `update state record of version ${String(rec.v)} in state ${String(rec.state)} is not understood`);
      }
      return rec;
    } catch (err) {
      const aside = `${this.layout.stateFile}.bad-${Date.now()}`;
      try {
        renameSync(this.layout.stateFile, aside);
      } catch {
        // unreadable and immovable: the next write replaces it
      }
      this.d.log.error('update state unreadable; moved aside, the device stays on its current releases', { file: aside, err });
      void this.d.emitEvent('update.state-unreadable', 'alert', { file: aside, code: 'FLEET_UPDATE_STATE', message: (err as Error).message });
      return null;
    }
  }

  private readonly stopSignal = new Promise<void>((resolve) => this.ac.signal.addEventListener('abort', () => resolve(), { once: true }));
  private untilStopped(): Promise<void> {
    return this.stopSignal;
  }

  async stop(): Promise<void> {
    this.stopped = true;
    this.ac.abort();
    this.d.supervisor.off('unhealthy', this.onUnhealthy);
    if (this.watchTimer) clearInterval(this.watchTimer);
    if (this.retryTimer) clearTimeout(this.retryTimer);
    await this.running?.catch(() => undefined);
  }

  /** The hub's desired state: queue what differs from what is installed and was not refused before. */
  onDesired(desired: DesiredState): void {
    const refused = new Set(this.status().history.filter((h) => h.state !== 'committed' && h.sha256).map((h) => h.sha256));
    const want: Request[] = [];
    for (const [name, app] of Object.entries(desired.apps)) {
      if (!app.url || !app.sha256) continue;
      const rel = this.layout.currentRelease('app', name);
      if (rel && this.layout.meta('app', name, rel)?.sha256 === app.sha256) continue;
      if (refused.has(app.sha256) || this.rec?.sha256 === app.sha256) continue;
      const url = this.urlOrNull(app.url, name);
      if (url) want.push({ source: 'hub', url, sha256: app.sha256, ...(app.size !== undefined ? { size: app.size } : {}), wantName: name, wantKind: 'app', file: join(this.layout.downloads, `${app.sha256}.bundle`) });
    }
    const agent = desired.agent;
    const agentUrl = agent && agent.version !== this.d.agentVersion && !refused.has(agent.sha256) && this.rec?.sha256 !== agent.sha256 ? this.urlOrNull(agent.url, 'agent') : null;
    if (agent && agentUrl) {
      want.push({ source: 'hub', url: agentUrl, sha256: agent.sha256, ...(agent.size !== undefined ? { size: agent.size } : {}), wantKind: 'agent', file: join(this.layout.downloads, `${agent.sha256}.bundle`) });
    }
    // a newer desired state replaces what an older one queued
    this.queue = [...this.queue.filter((q) => q.source !== 'hub'), ...want];
    // reconcile: an app the hub installed and no longer names goes (uploads, the USB stick and
    // the config's own apps are not the hub's to remove)
    this.removals = this.layout.installedApps().filter((name) => !(name in desired.apps) && this.installedFromHub(name));
    this.kick();
  }

  /** A bundle uploaded through the local API: streamed to incoming/, bounded, then queued. */
  async acceptUpload(body: IncomingMessage): Promise<{ queued: string; size: number; sha256: string }> {
    const declared = Number(body.headers['content-length'] ?? 0);
    if (declared > this.d.config.maxBundleBytes) throw new FleetError('FLEET_HTTP_BODY_TOO_LARGE', `upload of ${declared} bytes exceeds update.maxBundleBytes`);
    const id = newId();
    const file = join(this.layout.incoming, `${id}.bundle`);
    const part = `${file}.part`;
    const out = createWriteStream(part, { mode: 0o600 });
    let size = 0;
    try {
      for await (const chunk of body as AsyncIterable<Buffer>) {
        size += chunk.length;
        if (size > this.d.config.maxBundleBytes) throw new FleetError('FLEET_HTTP_BODY_TOO_LARGE', `upload exceeds update.maxBundleBytes (${this.d.config.maxBundleBytes})`);
        if (!out.write(chunk)) await new Promise<void>((r) => out.once('drain', () => r()));
      }
      await new Promise<void>((resolve, reject) => out.end((err?: Error | null) => (err ? reject(err) : resolve())));
    } catch (err) {
      out.destroy();
      rmSync(part, { force: true });
      throw err;
    }
    renameSync(part, file);
    const sha256 = await sha256File(file);
    this.queue.push({ source: 'upload', file, sha256, size });
    this.kick();
    return { queued: id, size, sha256 };
  }

  /** Queue a bundle file already on the device (copied first: the source may go away). */
  queueFile(path: string, source: UpdateSource = 'upload'): string {
    const id = newId();
    const file = join(this.layout.incoming, `${id}.bundle`);
    copyFileSync(path, `${file}.part`);
    renameSync(`${file}.part`, file);
    this.queue.push({ source, file });
    this.kick();
    return id;
  }

  // ---------------------------------------------------------------- loop

  private kick(): void {
    if (this.stopped) return;
    if (this.running) {
      // the loop may be on its way out: look again when it is
      this.again = true;
      return;
    }
    this.again = false;
    let failed = false;
    this.running = this.loop()
      .catch((err: unknown) => {
        failed = true;
        this.d.log.error('updater loop failed; retrying in 1 s', { err });
      })
      .finally(() => {
        this.running = null;
        if (this.stopped) return;
        if (failed) this.retryTimer = setTimeout(() => this.kick(), 1000);
        else if (this.again || this.queue.length > 0) this.kick();
      });
  }

  private async loop(): Promise<void> {
    while (!this.stopped) {
      const rec = this.rec;
      if (rec && (!TERMINAL.has(rec.state) || !rec.reported)) {
        await this.drive(rec);
        continue;
      }
      const gone = this.removals.shift();
      if (gone !== undefined) {
        await this.removeApp(gone);
        continue;
      }
      const req = this.queue.shift();
      if (!req) return;
      await this.begin(req);
    }
  }

  private installedFromHub(name: string): boolean {
    const rel = this.layout.currentRelease('app', name);
    return rel !== null && this.layout.meta('app', name, rel)?.source === 'hub';
  }

  /**
   * Remove an app the hub's desired state no longer names: a marker first (a crash after it
   * finishes the removal at the next start, before any app starts), then the `current` link
   * goes, the supervisor stops the app, and its directory is deleted. The name's anti-rollback
   * floor stays: installing it again needs a sequence at least as high.
   */
  private async removeApp(name: string): Promise<void> {
    if (!this.installedFromHub(name) || (this.rec && !TERMINAL.has(this.rec.state) && this.rec.name === name)) return; // changed since it was queued
    const rel = this.layout.currentRelease('app', name);
    const version = rel ? (this.layout.meta('app', name, rel)?.version ?? null) : null;
    writeJsonAtomic(join(this.layout.base('app', name), REMOVING), { at: Date.now(), release: rel });
    rmSync(this.layout.currentLink('app', name), { force: true });
    fsyncDir(this.layout.base('app', name));
    await this.d.applyApps();
    this.dropAppDir(name);
    this.d.log.info('app removed: the desired state no longer names it', { name, version });
    void this.d.emitEvent('update.app-removed', 'info', { name, version, release: rel, reason: 'not in the desired state' });
  }

  private dropAppDir(name: string): void {
    rmSync(this.layout.currentLink('app', name), { force: true });
    rmSync(this.layout.base('app', name), { recursive: true, force: true });
  }

  private async begin(req: Request): Promise<void> {
    const prev = this.rec;
    const now = Date.now();
    const rec: UpdateRecord = {
      v: STATE_VERSION,
      id: newId(),
      state: prev?.state ?? 'idle',
      source: req.source,
      file: req.file,
      ...(req.url ? { url: req.url } : {}),
      ...(req.sha256 ? { sha256: req.sha256 } : {}),
      ...(req.size !== undefined ? { size: req.size } : {}),
      ...(req.wantName ? { wantName: req.wantName } : {}),
      ...(req.wantKind ? { wantKind: req.wantKind } : {}),
      history: [],
      resumes: 0,
      startedAt: now,
      updatedAt: now,
      reported: false,
    };
    if (!TERMINAL.has(rec.state)) rec.state = 'idle';
    this.rec = rec;
    this.d.log.info('update started', { id: rec.id, source: rec.source, url: rec.url, name: rec.wantName });
    await this.transition(rec, { event: 'start' });
  }

  /** Run the current state's action, then the transition its outcome selects, until at rest. */
  private async drive(rec: UpdateRecord): Promise<void> {
    while (!this.stopped) {
      if (TERMINAL.has(rec.state)) {
        if (!rec.reported) await this.report(rec);
        return;
      }
      let out: Outcome;
      try {
        out = await this.act(rec);
      } catch (err) {
        if (this.stopped) return;
        const fe = toFleetError(err);
        if (TRANSITIONS[rec.state].failure) out = { event: 'failure', reason: fe.message, code: fe.code };
        else {
          // committing and rolling-back have no way back: they are retried until they finish
          this.d.log.error('update step failed; retrying', { id: rec.id, state: rec.state, err: fe });
          await sleep(1000);
          out = { event: 'retry', reason: fe.message };
        }
      }
      if (this.stopped) return;
      await this.transition(rec, out);
    }
  }

  private async transition(rec: UpdateRecord, out: Outcome): Promise<void> {
    const from = rec.state;
    const to = advance(rec, out, this.layout);
    this.persist(rec);
    this.d.log.info('update state', { id: rec.id, from, to, event: out.event, reason: out.reason, name: rec.name });
    this.emit('state', to, rec);
    await this.d.onEnter?.(to, rec);
  }

  private persist(rec: UpdateRecord): void {
    writeJsonAtomic(this.layout.stateFile, rec);
  }

  // ---------------------------------------------------------------- actions

  private async act(rec: UpdateRecord): Promise<Outcome> {
    switch (rec.state) {
      case 'downloading':
        return this.doDownload(rec);
      case 'verifying':
        return this.doVerify(rec);
      case 'staging':
        return this.doStage(rec);
      case 'staged':
        return this.lockHeld(rec) ? { event: 'locked', reason: `lock ${this.lockPath(rec)} is held` } : { event: 'success' };
      case 'waiting-lock':
        while (this.lockHeld(rec)) {
          if (this.stopped) return { event: 'retry' };
          await sleep(this.d.config.lockPollMs);
        }
        return { event: 'success' };
      case 'switching':
        return this.doSwitch(rec);
      case 'probation':
        return rec.kind === 'agent' ? this.doAgentProbation(rec) : this.doProbation(rec);
      case 'committing':
        return this.doCommit(rec);
      case 'rolling-back':
        return this.doRollback(rec);
      case 'idle':
      case 'committed':
      case 'rolled-back':
      case 'failed':
        throw new Error(`no action in ${rec.state}`);
    }
  }

  private async doDownload(rec: UpdateRecord): Promise<Outcome> {
    if (existsSync(rec.file)) return { event: 'success' };
    // partial downloads of bundles the desired state no longer names take space for nothing
    for (const f of readdirSync(this.layout.downloads)) if (!rec.file.endsWith(`/${f}`) && f !== `${rec.file.slice(rec.file.lastIndexOf('/') + 1)}.part`) rmSync(join(this.layout.downloads, f), { force: true });
    if (!rec.url) throw new FleetError('FLEET_UPDATE_DOWNLOAD', `bundle file ${rec.file} is gone and there is no URL to fetch it again`);
    const auth = this.d.authorization?.();
    const c = this.d.config;
    const res = await download({
      url: rec.url,
      dest: rec.file,
      ...(rec.sha256 ? { sha256: rec.sha256 } : {}),
      ...(rec.size !== undefined ? { size: rec.size } : {}),
      ...(auth ? { authorization: auth } : {}),
      reserveBytes: c.reserveBytes,
      maxBytes: c.maxBundleBytes,
      attempts: c.downloadAttempts,
      backoffInitialMs: c.downloadBackoffMs,
      backoffMaxMs: c.downloadBackoffMaxMs,
      idleTimeoutMs: c.downloadIdleTimeoutMs,
      log: this.d.log,
      signal: this.ac.signal,
      freeBytes: this.d.freeBytes ?? statfsFree,
    });
    rec.size = res.size;
    return { event: 'success' };
  }

  private async verified(rec: UpdateRecord): Promise<VerifiedBundleLike> {
    const floors = readJson<Record<string, number>>(this.layout.floorsFile, {});
    const name = rec.name ?? rec.wantName;
    const floor = name !== undefined ? floors[name] : undefined;
    const vb = await this.d.verify(rec.file, { ...(floor !== undefined ? { floor } : {}), ...(rec.wantKind ? { kind: rec.wantKind } : {}) });
    const m = vb.manifest;
    const own = floors[m.name];
    // an upload names no bundle before it is read: the floor of the name it turns out to have applies too
    if (own !== undefined && m.sequence < own) throw new FleetError('FLEET_BUNDLE_ROLLBACK', `bundle ${m.name} has sequence ${m.sequence}, below the device floor ${own}`);
    return vb;
  }

  private async doVerify(rec: UpdateRecord): Promise<Outcome> {
    const st = statSync(rec.file);
    if (st.size > this.d.config.maxBundleBytes) throw new FleetError('FLEET_UPDATE_TOO_LARGE', `bundle of ${st.size} bytes exceeds update.maxBundleBytes`);
    const sha = await sha256File(rec.file);
    if (rec.sha256 && sha !== rec.sha256) {
      rmSync(rec.file, { force: true });
      throw new FleetError('FLEET_UPDATE_HASH_MISMATCH', `bundle sha256 ${sha}, expected ${rec.sha256}`);
    }
    rec.sha256 = sha;
    rec.size = st.size;
    const vb = await this.verified(rec);
    const m = vb.manifest;
    if (m.kind !== 'app' && m.kind !== 'agent') throw new FleetError('FLEET_UPDATE_UNSUPPORTED', `bundle kind ${m.kind} is not applied by the agent`);
    if (rec.wantName && m.name !== rec.wantName) throw new FleetError('FLEET_UPDATE_UNSUPPORTED', `desired state names ${rec.wantName} but the bundle is ${m.name}`);
    if (rec.wantKind && m.kind !== rec.wantKind) throw new FleetError('FLEET_UPDATE_UNSUPPORTED', `expected a bundle of kind ${rec.wantKind}, got ${m.kind}`);
    if (m.kind === 'app' && !/^[a-z0-9][a-z0-9-]{0,31}$/.test(m.name)) throw new FleetError('FLEET_UPDATE_UNSUPPORTED', `app name ${m.name} is not a valid supervised app name`);
    if (m.kind === 'app' && !m.app) throw new FleetError('FLEET_UPDATE_UNSUPPORTED', `app bundle ${m.name} has no app section`);
    if (m.kind === 'agent' && !this.layout.currentRelease('agent', m.name)) {
      throw new FleetError('FLEET_UPDATE_UNSUPPORTED', 'this agent does not run from <stateDir>/agent/current (install it with `fleetlet agent install`); self-update needs that layout to roll back');
    }
    rec.kind = m.kind;
    rec.name = m.name;
    rec.version = m.version;
    rec.sequence = m.sequence;
    rec.release = `${m.version}-s${m.sequence}`;
    const cur = this.layout.currentRelease(m.kind, m.name);
    if (cur && this.layout.meta(m.kind, m.name, cur)?.sha256 === sha) throw new FleetError('FLEET_UPDATE_UNSUPPORTED', `${m.name} ${m.version} is already the current release`);
    return { event: 'success' };
  }

  private async doStage(rec: UpdateRecord): Promise<Outcome> {
    const { kind, name, release } = need(rec);
    const releases = this.layout.releases(kind, name);
    const dir = join(releases, release);
    mkdirSync(releases, { recursive: true });
    // a release dir under its final name is complete (it is renamed into place last)
    if (existsSync(dir)) {
      if (this.layout.meta(kind, name, release)?.sha256 === rec.sha256 && readLink(this.layout.currentLink(kind, name)) !== dir) return { event: 'success' };
      if (readLink(this.layout.currentLink(kind, name)) === dir) throw new FleetError('FLEET_UPDATE_UNSUPPORTED', `release ${release} of ${name} is running; refusing to replace it in place`);
      rmSync(dir, { recursive: true, force: true });
    }
    const staging = join(releases, `.staging-${release}`);
    rmSync(staging, { recursive: true, force: true });
    const vb = await this.verified(rec);
    await vb.extractTo(staging);
    if (kind === 'agent') {
      const bin = join(staging, 'fleetlet');
      if (!existsSync(bin)) throw new FleetError('FLEET_UPDATE_UNSUPPORTED', 'agent bundle has no file named fleetlet');
      chmodSync(bin, 0o755);
    }
    if (existsSync(join(staging, META_FILE))) throw new FleetError('FLEET_UPDATE_UNSUPPORTED', `bundle may not contain ${META_FILE}`);
    const meta: ReleaseMeta = { name, kind, version: vb.manifest.version, sequence: vb.manifest.sequence, sha256: vb.sha256, ...(vb.manifest.app ? { app: vb.manifest.app } : {}), stagedAt: Date.now(), source: rec.source };
    writeJsonAtomic(join(staging, META_FILE), meta);
    renameSync(staging, dir);
    fsyncDir(releases);
    return { event: 'success' };
  }

  private lockPath(rec: UpdateRecord): string {
    const name = rec.name ?? '';
    return this.d.config.lockFile ? this.d.config.lockFile.replaceAll('{app}', name) : join(this.layout.base(rec.kind ?? 'app', name), 'update.lock');
  }

  private lockHeld(rec: UpdateRecord): boolean {
    return existsSync(this.lockPath(rec));
  }

  private async applyApps(): Promise<void> {
    await this.d.applyApps();
    const now = Date.now();
    for (const name of this.layout.installedApps()) this.appliedAt.set(name, now);
  }

  private async doSwitch(rec: UpdateRecord): Promise<Outcome> {
    const { kind, name, release } = need(rec);
    switchSymlink(this.layout.currentLink(kind, name), join(this.layout.releases(kind, name), release));
    this.writeReleaseRecord(rec, release, rec.previous ?? null);
    if (kind === 'agent') {
      rec.switchedAt = Date.now();
      rec.boots = 0;
      return { event: 'success' };
    }
    await this.applyApps();
    return { event: 'success' };
  }

  /** App probation: stays up (no exit, no crash loop), healthy when it has a check, and the optional check command passes. */
  private async doProbation(rec: UpdateRecord): Promise<Outcome> {
    const { name } = need(rec);
    if (!this.appliedAt.has(name)) await this.applyApps();
    const since = this.appliedAt.get(name) ?? Date.now();
    const end = Date.now() + this.d.config.probationMs;
    for (;;) {
      if (this.stopped) return { event: 'retry' };
      const bad = this.probationProblem(name, since);
      if (bad) return { event: 'failure', reason: bad, code: 'FLEET_UPDATE_PROBATION' };
      if (Date.now() >= end) break;
      await sleep(Math.min(50, Math.max(1, end - Date.now())));
    }
    const check = this.d.config.checkCommand;
    if (check) {
      const problem = await runCheck(check, join(this.layout.releases('app', name), need(rec).release), this.d.config.checkTimeoutMs, { FLEETLET_APP: name, FLEETLET_APP_VERSION: rec.version ?? '' });
      if (problem) return { event: 'failure', reason: `check command ${check.join(' ')}: ${problem}`, code: 'FLEET_UPDATE_PROBATION' };
      const late = this.probationProblem(name, since);
      if (late) return { event: 'failure', reason: late, code: 'FLEET_UPDATE_PROBATION' };
    }
    return { event: 'success' };
  }

  private probationProblem(name: string, since: number): string | null {
    const unhealthy = this.unhealthy.get(name);
    if (unhealthy && unhealthy.at >= since) return `app is unhealthy: ${unhealthy.reason}`;
    const app = this.d.supervisor.apps.get(name);
    if (!app) return 'app is not supervised';
    const s = app.status();
    if (s.state === 'crash-loop' || s.crashLoop) return 'app is in crash-loop';
    if (s.health.status === 'unhealthy') return `app is unhealthy: ${s.health.lastError ?? 'health check failing'}`;
    if (s.lastExit && s.lastExit.at >= since) {
      return `app exited during probation (${s.lastExit.signal ? `signal ${s.lastExit.signal}` : `code ${s.lastExit.code}`})${s.startError ? `: ${s.startError}` : ''}`;
    }
    return null;
  }

  /**
   * Agent probation. The old agent, right after the switch, exits so the service manager
   * starts the new binary; the new agent commits once it is up and connected (or just up
   * when no hub is configured). The boot check (selfupdate.ts) counts starts of the new
   * binary and restores the old one when the new never gets here.
   */
  private async doAgentProbation(rec: UpdateRecord): Promise<Outcome> {
    if (this.startedBeforeSwitch(rec)) {
      this.d.log.warn('agent switched to a new binary; exiting so the service manager starts it', { version: rec.version });
      this.d.exitForRestart?.();
      await this.untilStopped(); // the process is going away; stop() ends this wait
      return { event: 'retry' };
    }
    const deadline = (rec.switchedAt ?? Date.now()) + this.d.config.agentHealthyWithinS * 1000;
    while (!this.stopped) {
      if (!this.d.hubConfigured || this.d.connected?.()) return { event: 'success' };
      if (Date.now() > deadline) return { event: 'failure', reason: `new agent not connected within ${this.d.config.agentHealthyWithinS} s`, code: 'FLEET_UPDATE_PROBATION' };
      await sleep(200);
    }
    return { event: 'retry' };
  }

  /**
   * <base>/release.json: which release runs and which one ran before (for people and tools;
   * the `current` symlink is what the agent itself trusts).
   */
  private writeReleaseRecord(rec: UpdateRecord, current: string | null, previous: string | null): void {
    const { kind, name } = need(rec);
    writeJsonAtomic(join(this.layout.base(kind, name), 'release.json'), { current, previous, update: rec.id, state: rec.state, at: Date.now() });
  }

  /**
   * Whether this process is the agent that made the switch (the old binary): it started before
   * the switch. Every start after it runs `current`, the new binary. Versions cannot tell them
   * apart when a build is re-deployed under the same version.
   */
  private startedBeforeSwitch(rec: UpdateRecord): boolean {
    const started = this.d.processStartedAt ?? Date.now() - process.uptime() * 1000;
    return started < (rec.switchedAt ?? 0);
  }

  private async doCommit(rec: UpdateRecord): Promise<Outcome> {
    const { kind, name, release } = need(rec);
    this.writeReleaseRecord(rec, release, rec.previous ?? null);
    const floors = readJson<Record<string, number>>(this.layout.floorsFile, {});
    floors[name] = Math.max(floors[name] ?? 0, rec.sequence ?? 0);
    writeJsonAtomic(this.layout.floorsFile, floors);
    if (kind === 'agent') switchSymlink(this.layout.agentCommitted, join(this.layout.releases(kind, name), release));
    // keep the current release and the one before it; older ones go
    const keep = new Set([release, rec.previous ?? '']);
    const releases = this.layout.releases(kind, name);
    for (const r of readdirSync(releases)) if (!keep.has(r)) rmSync(join(releases, r), { recursive: true, force: true });
    rmSync(rec.file, { force: true });
    return { event: 'success' };
  }

  private async doRollback(rec: UpdateRecord): Promise<Outcome> {
    const { kind, name } = need(rec);
    const link = this.layout.currentLink(kind, name);
    if (rec.previous) switchSymlink(link, join(this.layout.releases(kind, name), rec.previous));
    else rmSync(link, { force: true }); // first install: back to nothing installed
    fsyncDir(this.layout.base(kind, name));
    this.writeReleaseRecord(rec, rec.previous ?? null, null);
    if (kind === 'agent') {
      if (!this.startedBeforeSwitch(rec)) {
        // this is the new binary giving up: record the outcome, then exit into the old one
        rec.rollbackDoneAt = Date.now();
        await this.transition(rec, { event: 'success' });
        this.d.exitForRestart?.();
        await this.untilStopped();
        return { event: 'retry' };
      }
      rec.rollbackDoneAt = Date.now();
      return { event: 'success' };
    }
    await this.applyApps();
    // the rollback is done when the old version runs again (and is healthy, if it has a check)
    const deadline = Date.now() + 30_000;
    while (rec.previous && Date.now() < deadline && !this.stopped) {
      const s = this.d.supervisor.apps.get(name)?.status();
      if (s?.state === 'running' && (s.health.status === 'none' || s.health.status === 'healthy')) break;
      await sleep(5);
    }
    rec.rollbackDoneAt = Date.now();
    return { event: 'success' };
  }

  private async report(rec: UpdateRecord): Promise<void> {
    const ev = EVENT_FOR[rec.state];
    if (ev) {
      await this.d.emitEvent(ev.type, ev.severity, {
        id: rec.id,
        name: rec.name ?? rec.wantName ?? null,
        kind: rec.kind ?? rec.wantKind ?? null,
        version: rec.version ?? null,
        previousVersion: rec.previousVersion ?? null,
        source: rec.source,
        ...(rec.reason ? { reason: rec.reason } : {}),
        ...(rec.code ? { code: rec.code } : {}),
        ...(rec.rollbackDecidedAt && rec.rollbackDoneAt ? { rollbackMs: rec.rollbackDoneAt - rec.rollbackDecidedAt } : {}),
        chain: rec.history.map((h) => h.state),
      });
    }
    // the bundle file goes before the record says "reported": a file left in incoming/ would be queued again
    if (rec.source !== 'hub' || rec.state !== 'committed') rmSync(rec.file, { force: true });
    const history = [{ ...rec, reported: true }, ...readJson<UpdateRecord[]>(this.layout.historyFile, []).filter((h) => h.id !== rec.id)].slice(0, this.d.config.historyLimit);
    writeJsonAtomic(this.layout.historyFile, history);
    rec.reported = true;
    this.persist(rec);
    if (rec.state === 'failed' && !AFTER_SWITCH.has(rec.history.at(-2)?.state ?? 'idle') && rec.kind && rec.name && rec.release) {
      // a release staged but never switched to is of no use
      const dir = join(this.layout.releases(rec.kind, rec.name), rec.release);
      if (readLink(this.layout.currentLink(rec.kind, rec.name)) !== dir && rec.previous !== rec.release) rmSync(dir, { recursive: true, force: true });
    }
    this.d.log.info('update finished', { id: rec.id, state: rec.state, name: rec.name, version: rec.version, reason: rec.reason });
    this.emit('finished', rec);
  }

  // ---------------------------------------------------------------- sources

  private urlOrNull(url: string, what: string): string | null {
    try {
      return this.resolveUrl(url);
    } catch (err) {
      this.d.log.error('desired state names a bundle URL the agent cannot use; skipped', { what, url, err });
      return null;
    }
  }

  private resolveUrl(url: string): string {
    if (/^https?:\/\//.test(url)) return url;
    if (!this.d.config.artifactBaseUrl) throw new FleetError('FLEET_UPDATE_DOWNLOAD', `bundle URL ${url} is relative and update.artifactBaseUrl is not set`);
    return new URL(url, this.d.config.artifactBaseUrl).toString();
  }

  /**
   * The newest bundle file in the watched dir that was not seen before. A file is taken only
   * once its size and mtime are the same on two scans in a row (a stick still being written
   * shows a growing file), and scans never overlap: hashing a large file can outlast the
   * interval, and two scans would race on the same file.
   */
  private async scanWatchDir(): Promise<void> {
    if (this.scanning) return;
    this.scanning = true;
    try {
      await this.scanWatchDirOnce();
    } finally {
      this.scanning = false;
    }
  }

  private async scanWatchDirOnce(): Promise<void> {
    const dir = this.d.config.watchDir;
    if (!dir || !existsSync(dir)) return;
    const files = readdirSync(dir)
      .filter((f) => f.endsWith('.bundle') || f.endsWith('.fltb'))
      .flatMap((f) => {
        const p = join(dir, f);
        try {
          const st = statSync(p);
          return st.isFile() ? [{ p, key: `${st.size}:${st.mtimeMs}`, mtime: st.mtimeMs, size: st.size }] : [];
        } catch {
          return []; // removed between readdir and stat (the stick was pulled)
        }
      })
      .sort((a, b) => b.mtime - a.mtime);
    const lastScan = this.watchLastScan;
    this.watchLastScan = new Map(files.map((f) => [f.p, f.key]));
    const refused = new Set(this.status().history.map((h) => h.sha256));
    for (const f of files) {
      if (this.watchSeen.get(f.p) === f.key) continue;
      if (f.size > this.d.config.maxBundleBytes) continue;
      // still being written (or first seen now): look again on the next scan; an older
      // complete file is not taken meanwhile, so the newest one still wins
      if (lastScan.get(f.p) !== f.key) return;
      const sha = await sha256File(f.p);
      this.watchSeen.set(f.p, f.key);
      if (refused.has(sha) || this.rec?.sha256 === sha || this.queue.some((q) => q.sha256 === sha)) continue;
      const installed = [...this.layout.installedApps().map((n) => this.layout.meta('app', n, this.layout.currentRelease('app', n) ?? '')?.sha256)];
      if (installed.includes(sha)) continue;
      this.d.log.info('bundle found in watched dir', { file: f.p });
      const id = newId();
      const file = join(this.layout.incoming, `${id}.bundle`);
      copyFileSync(f.p, `${file}.part`);
      renameSync(`${file}.part`, file);
      this.queue.push({ source: 'watch', file, sha256: sha });
      this.kick();
      return; // newest first: one at a time
    }
  }
}

/** marker file in apps/<name>/ while the app is being removed */
const REMOVING = '.removing';

function need(rec: UpdateRecord): { kind: string; name: string; release: string } {
  if (!rec.kind || !rec.name || !rec.release) throw new FleetError('FLEET_UPDATE_STATE', `update ${rec.id} in ${rec.state} has no verified manifest`);
  return { kind: rec.kind, name: rec.name, release: rec.release };
}

function newId(): string {
  return `u${Date.now().toString(36)}${randomBytes(3).toString('hex')}`;
}

/** Run the probation check command; null when it exits 0 in time. */
function runCheck(argv: readonly string[], cwd: string, timeoutMs: number, env: Record<string, string>): Promise<string | null> {
  return new Promise((resolve) => {
    const [cmd, ...args] = argv as [string, ...string[]];
    const child = spawn(cmd, args, { cwd, env: { ...process.env, ...env }, stdio: 'ignore', detached: true });
    const t = setTimeout(() => {
      try {
        process.kill(-(child.pid ?? 0), 'SIGKILL');
      } catch {
        // gone
      }
      resolve(`timed out after ${timeoutMs} ms`);
    }, timeoutMs);
    child.once('error', (err) => {
      clearTimeout(t);
      resolve(err.message);
    });
    child.once('exit', (code, signal) => {
      clearTimeout(t);
      resolve(code === 0 ? null : signal ? `killed by ${signal}` : `exit code ${code}`);
    });
  });
}
