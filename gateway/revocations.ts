import { closeSync, constants, fstatSync, openSync, readFileSync, readSync } from 'node:fs';
import { writeFileAtomicSync } from '../core/atomic-file.ts';
import { FleetError } from '../core/errors.ts';
import type { Logger } from '../core/log.ts';
import { decodeMessage } from '../core/messages.ts';
import { isDeviceId } from '../core/topics.ts';

/** the list file is checked for changes this often, ms (a stat call) */
const POLL_MS = 2000;
/** a larger file is not read (the previous list stays) */
const MAX_FILE_BYTES = 4 * 1024 * 1024;
/** most ids in the list: as many as a gateway can act for */
const MAX_IDS = 100_000;
/** The id a line of the list names ('' for a blank or comment line): `#` starts a comment. */
const idOfLine = (line: string): string => line.replace(/#.*/, '').trim();

/** invalid lines logged one by one; the rest as a count */
const MAX_BAD_LINES_LOGGED = 20;

/**
 * MCUs whose keys are revoked (docs/mcu-protocol.md "Revoking one MCU"). MCU keys are
 * derived from the site secret, so one key cannot be withdrawn by itself; this list is how a
 * single stolen or retired MCU is cut off without re-provisioning the others. It is a text
 * file, one MCU id per line, `#` starts a comment; the gateway reads it at start and again
 * whenever it changes (polled every 2 s), without a restart.
 *
 * A file that cannot be read, is too large or holds an invalid line is reported (logged with
 * the line) and loses nothing: at start an unreadable or oversized file stops the gateway
 * (FLEET_CONFIG_INVALID), later it keeps the list in force; an invalid line is skipped while
 * the valid ones apply. A file that does not exist is an empty list (the default: nothing
 * revoked).
 */
export class McuRevocations {
  private ids: ReadonlySet<string> = new Set();
  /** the MCUs revoked at the hub (setHubList), kept in `hubFile` for a start without the hub */
  private hubIds: ReadonlySet<string> = new Set();
  private hubFile: string | undefined;
  /** the connection the hub's list last came on, and its revision there */
  private hubConn = -1;
  private hubRev = -1;
  /** the file's stat when it was last read ('' = absent, null = not read yet) */
  private seen: string | null = null;
  private timer: NodeJS.Timeout | undefined;

  constructor(
    readonly file: string,
    private readonly log: Logger,
    /** called with the ids newly on a list after a change (their sessions are cut); atHub: on the hub's list */
    private readonly onRevoked: (ids: string[], atHub: boolean) => void = () => undefined,
  ) {}

  /**
   * Read the list and look for changes every 2 s. Our own poll rather than fs.watchFile:
   * its first stat is taken asynchronously, so a change made right after the start was never
   * seen; here what was read and the stat it is compared with are taken together.
   *
   * Throws FLEET_CONFIG_INVALID when the file exists but cannot be read as a list (not a
   * regular file, no permission, too large): a gateway must not start with every revoked MCU
   * let back in. A missing file is an empty list. Later, while running, the same problems are
   * logged and the list in force stays.
   */
  start(): void {
    const problem = this.poll();
    if (problem) throw new FleetError('FLEET_CONFIG_INVALID', `mcu.revokedFile ${this.file}: ${problem}; fix or remove it (a missing file revokes no MCU)`);
    this.timer = setInterval(() => this.poll(), POLL_MS);
    this.timer.unref();
  }

  stop(): void {
    clearInterval(this.timer);
  }

  has(mcuId: string): boolean {
    return this.ids.has(mcuId) || this.hubIds.has(mcuId);
  }

  /** MCUs revoked here or at the hub */
  get size(): number {
    let n = this.ids.size;
    for (const id of this.hubIds) if (!this.ids.has(id)) n++;
    return n;
  }

  /**
   * The hub's list as this gateway last received it, from `file` (written by setHubList), so a
   * gateway that starts while the hub is unreachable still refuses those MCUs. A missing file
   * is an empty list; one that cannot be read stops the start (FLEET_CONFIG_INVALID), as a
   * bad mcu.revokedFile does: deleting it starts without it, and the hub sends its list again
   * on connect.
   */
  loadHubList(file: string): void {
    this.hubFile = file;
    let text: string;
    try {
      text = readFileSync(file, 'utf8');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return;
      throw new FleetError('FLEET_CONFIG_INVALID', `${file}: ${(err as Error).message}`, { cause: err });
    }
    try {
      this.hubIds = new Set(decodeMessage('mcu-revocations', text).ids);
    } catch (err) {
      throw new FleetError('FLEET_CONFIG_INVALID', `${file} (the hub's MCU revocation list as last received): ${(err as Error).message}; delete it to start without it (the hub sends its list again on connect)`, { cause: err });
    }
  }

  /**
   * The hub's list arrived (retained MCU_REVOCATIONS_TOPIC: on every connection and change)
   * on connection `conn`. It replaces the previous one from the hub; MCUs newly on it are cut
   * off (onRevoked). On one connection a list older than the last (its `rev`) is ignored: the
   * retained copy the hub read for the SUBSCRIBE can arrive after a change published
   * meanwhile. A new connection's first list is taken whatever its revision (a hub whose clock
   * went back starts lower). A message that is not a valid list is logged and changes nothing.
   */
  setHubList(payload: Buffer, conn = 0): void {
    let next: Set<string>;
    let rev: number;
    try {
      const msg = decodeMessage('mcu-revocations', payload);
      next = new Set(msg.ids);
      rev = msg.rev;
    } catch (err) {
      this.log.error('the hub sent an MCU revocation list that is not valid; the previous one stays', { code: 'FLEET_MSG_INVALID', err });
      return;
    }
    if (conn === this.hubConn && rev <= this.hubRev) return;
    this.hubConn = conn;
    this.hubRev = rev;
    // whether the hub's list changed is judged on the hub's list alone: an id already on the
    // local list is still the hub's too (kept on disk, and in force when the site lifts its
    // own entry); cut off now are only the MCUs neither list had
    const newOnHub = [...next].filter((id) => !this.hubIds.has(id));
    const removed = [...this.hubIds].filter((id) => !next.has(id));
    if (newOnHub.length === 0 && removed.length === 0) return;
    const added = newOnHub.filter((id) => !this.ids.has(id));
    this.hubIds = next;
    if (this.hubFile !== undefined) {
      try {
        writeFileAtomicSync(this.hubFile, payload, { syncDir: true });
      } catch (err) {
        // in force now all the same; only a restart without the hub would miss it
        this.log.error('cannot keep the hub\'s MCU revocation list on disk', { code: 'FLEET_STORE', file: this.hubFile, err });
      }
    }
    this.log.info('MCU revocation list from the hub', { revoked: next.size, added: newOnHub.slice(0, 20), removed: removed.slice(0, 20) });
    if (added.length > 0) this.onRevoked(added, true);
  }

  /** Read the file again if it changed; returns what made it unreadable, if anything. */
  private poll(): string | undefined {
    let fd: number | undefined;
    try {
      // O_NONBLOCK: a FIFO at the path must not block the event loop in open or read
      fd = openSync(this.file, constants.O_RDONLY | constants.O_NONBLOCK);
      const st = fstatSync(fd);
      const sig = `${st.ino}:${st.size}:${st.mtimeMs}:${st.ctimeMs}`;
      if (sig === this.seen) return undefined;
      const reload = this.seen !== null;
      // changed within the last polls: read again next time too, since a rewrite of the same
      // size within one timestamp tick would leave this signature as it is (git's racy rule)
      this.seen = Date.now() - st.mtimeMs < 2 * POLL_MS ? `${sig}:racy` : sig;
      if (!st.isFile()) return this.unreadable('not a regular file', reload);
      if (st.size > MAX_FILE_BYTES) return this.unreadable(`${st.size} bytes, more than ${MAX_FILE_BYTES}`, reload);
      // at most MAX_FILE_BYTES + 1 bytes, whatever the file grew to since fstat
      const buf = Buffer.alloc(Math.min(st.size, MAX_FILE_BYTES) + 1);
      let n = 0;
      for (let r = -1; r !== 0 && n < buf.length; n += r) r = readSync(fd, buf, n, buf.length - n, n);
      if (n > MAX_FILE_BYTES) return this.unreadable(`more than ${MAX_FILE_BYTES} bytes`, reload);
      this.apply(buf.toString('utf8', 0, n), reload);
      return undefined;
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === 'ENOENT') {
        if (this.seen === '') return undefined;
        if (this.seen !== null && this.ids.size > 0) this.log.warn('revoked MCU list removed: no MCU is revoked now', { file: this.file, was: this.ids.size });
        this.seen = '';
        this.replace(new Set());
        return undefined;
      }
      const sig = `error:${code}`;
      if (sig === this.seen) return undefined;
      const reload = this.seen !== null;
      this.seen = sig;
      return this.unreadable((err as Error).message, reload);
    } finally {
      if (fd !== undefined) closeSync(fd);
    }
  }

  private unreadable(why: string, reload: boolean): string {
    if (reload) this.log.error('cannot read the revoked MCU list; the previous list stays', { code: 'FLEET_CONFIG_INVALID', file: this.file, why, revoked: this.ids.size });
    return why;
  }

  private apply(text: string, reload: boolean): void {
    const next = new Set<string>();
    const lines = text.split('\n');
    let bad = 0;
    for (let i = 0; i < lines.length; i++) {
      const id = idOfLine(lines[i]!);
      if (id === '') continue;
      if (!isDeviceId(id)) {
        // the first few by line; a file full of junk is one more line, not a flood
        if (++bad <= MAX_BAD_LINES_LOGGED) this.log.warn('revoked MCU list: not an MCU id; line skipped', { code: 'FLEET_CONFIG_INVALID', file: this.file, line: i + 1, text: (id as string).slice(0, 80) });
        continue;
      }
      if (next.size >= MAX_IDS) {
        this.log.error('revoked MCU list: more ids than a gateway can act for; the rest skipped', { code: 'FLEET_CONFIG_INVALID', file: this.file, line: i + 1, max: MAX_IDS });
        break;
      }
      next.add(id);
    }
    if (bad > MAX_BAD_LINES_LOGGED) this.log.warn('revoked MCU list: more lines skipped', { code: 'FLEET_CONFIG_INVALID', file: this.file, skipped: bad, logged: MAX_BAD_LINES_LOGGED });
    this.replace(next, reload || next.size > 0);
  }

  private replace(next: Set<string>, log = true): void {
    const added = [...next].filter((id) => !this.ids.has(id));
    const removed = [...this.ids].filter((id) => !next.has(id));
    this.ids = next;
    if (log && (added.length > 0 || removed.length > 0)) {
      this.log.info('revoked MCU list read', { file: this.file, revoked: next.size, added: added.slice(0, 20), removed: removed.slice(0, 20) });
    }
    if (added.length > 0) this.onRevoked(added, false);
  }
}

/**
 * Add ids to the revoked list file and take others off it (`fleetlet gateway revoke` /
 * `unrevoke`). Every other line (comments, other ids) stays as it is; an added id gets the date
 * as a comment. The new list replaces the old one atomically (a temp file renamed over it), so
 * a running gateway never reads a half-written list. Returns what changed.
 */
export function editRevokedList(file: string, add: readonly string[], remove: readonly string[], now = new Date()): { added: string[]; removed: string[] } {
  for (const id of [...add, ...remove]) if (!isDeviceId(id)) throw new FleetError('FLEET_DEVICE_ID_INVALID', `not an MCU id: ${JSON.stringify(String(id).slice(0, 80))}`);
  let text = '';
  try {
    text = readFileSync(file, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw new FleetError('FLEET_CONFIG_INVALID', `cannot read ${file}: ${(err as Error).message}`, { cause: err });
  }
  const drop = new Set(remove);
  const lines = text === '' ? [] : text.replace(/\n$/, '').split('\n');
  const removed = new Set<string>();
  const kept = lines.filter((l) => {
    const id = idOfLine(l);
    if (drop.has(id)) removed.add(id);
    return !drop.has(id);
  });
  const present = new Set(kept.map(idOfLine));
  const added: string[] = [];
  for (const id of add) {
    if (present.has(id) || drop.has(id)) continue;
    present.add(id);
    added.push(id);
    kept.push(`${id}  # revoked ${now.toISOString()}`);
  }
  if (added.length > 0 || removed.size > 0) writeFileAtomicSync(file, kept.length > 0 ? kept.join('\n') + '\n' : '', { syncDir: true });
  return { added, removed: [...removed] };
}
