import { readFileSync, statSync } from 'node:fs';
import type { Logger } from '../core/log.ts';
import { isDeviceId } from '../core/topics.ts';

/** the list file is checked for changes this often, ms (a stat call) */
const POLL_MS = 2000;
/** a larger file is not read (the previous list stays) */
const MAX_FILE_BYTES = 4 * 1024 * 1024;
/** most ids in the list: as many as a gateway can act for */
const MAX_IDS = 100_000;

/**
 * MCUs whose keys are revoked (docs/mcu-protocol.md "Revoking one MCU"). MCU keys are
 * derived from the site secret, so one key cannot be withdrawn by itself; this list is how a
 * single stolen or retired MCU is cut off without re-provisioning the others. It is a text
 * file, one MCU id per line, `#` starts a comment; the gateway reads it at start and again
 * whenever it changes (polled every 2 s), without a restart.
 *
 * A file that cannot be read, is too large or holds an invalid line is reported (logged with
 * the line) and loses nothing: an unreadable or oversized file keeps the previous list, and an
 * invalid line is skipped while the valid ones apply. A file that does not exist is an empty
 * list (the default: nothing revoked).
 */
export class McuRevocations {
  private ids: ReadonlySet<string> = new Set();
  /** the file's stat when it was last read ('' = absent, null = not read yet) */
  private seen: string | null = null;
  private timer: NodeJS.Timeout | undefined;

  constructor(
    readonly file: string,
    private readonly log: Logger,
    /** called with the ids newly on the list after a change (their sessions are cut) */
    private readonly onRevoked: (ids: string[]) => void = () => undefined,
  ) {}

  /**
   * Read the list and look for changes every 2 s. Our own poll rather than fs.watchFile:
   * its first stat is taken asynchronously, so a change made right after the start was never
   * seen; here what was read and the stat it is compared with are taken together.
   */
  start(): void {
    this.poll();
    this.timer = setInterval(() => this.poll(), POLL_MS);
    this.timer.unref();
  }

  stop(): void {
    clearInterval(this.timer);
  }

  has(mcuId: string): boolean {
    return this.ids.has(mcuId);
  }

  get size(): number {
    return this.ids.size;
  }

  private poll(): void {
    let sig = '';
    let size = 0;
    try {
      const st = statSync(this.file);
      sig = `${st.ino}:${st.size}:${st.mtimeMs}:${st.ctimeMs}`;
      size = st.size;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') sig = `error:${(err as NodeJS.ErrnoException).code}`;
    }
    if (sig === this.seen) return;
    const reload = this.seen !== null;
    this.seen = sig;
    this.load(reload, size);
  }

  private load(reload: boolean, size: number): void {
    let text: string;
    try {
      if (size > MAX_FILE_BYTES) {
        this.log.error('revoked MCU list too large; the previous list stays', { code: 'FLEET_CONFIG_INVALID', file: this.file, bytes: size, max: MAX_FILE_BYTES, revoked: this.ids.size });
        return;
      }
      text = readFileSync(this.file, 'utf8');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') {
        if (reload && this.ids.size > 0) this.log.warn('revoked MCU list removed: no MCU is revoked now', { file: this.file, was: this.ids.size });
        this.ids = new Set();
        return;
      }
      this.log.error('cannot read the revoked MCU list; the previous list stays', { code: 'FLEET_CONFIG_INVALID', file: this.file, err, revoked: this.ids.size });
      return;
    }
    const next = new Set<string>();
    const lines = text.split('\n');
    for (let i = 0; i < lines.length; i++) {
      const id = lines[i]!.replace(/#.*/, '').trim();
      if (id === '') continue;
      if (!isDeviceId(id)) {
        this.log.warn('revoked MCU list: not an MCU id; line skipped', { code: 'FLEET_CONFIG_INVALID', file: this.file, line: i + 1, text: (id as string).slice(0, 80) });
        continue;
      }
      if (next.size >= MAX_IDS) {
        this.log.error('revoked MCU list: more ids than a gateway can act for; the rest skipped', { code: 'FLEET_CONFIG_INVALID', file: this.file, line: i + 1, max: MAX_IDS });
        break;
      }
      next.add(id);
    }
    const added = [...next].filter((id) => !this.ids.has(id));
    const removed = [...this.ids].filter((id) => !next.has(id));
    this.ids = next;
    if (added.length > 0 || removed.length > 0) {
      this.log.info('revoked MCU list read', { file: this.file, revoked: next.size, added: added.slice(0, 20), removed: removed.slice(0, 20) });
    }
    if (added.length > 0) this.onRevoked(added);
  }
}
