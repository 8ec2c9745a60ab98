import { readFileSync } from 'node:fs';
import { writeFileAtomicSync } from '../core/atomic-file.ts';
import type { CommandReply } from '../core/messages.ts';

/**
 * Commands the agent has handled recently, so a repeat of one never runs it twice
 * (docs/topics.md#command-delivery). The hub stores commands and may send one again: at
 * every reconnect until the reply arrives, and at a backoff while the device stays online.
 *
 * Kept in `{stateDir}/commands-seen.json`, rewritten (temp file, fsync, rename) when a
 * command starts and when it ends, so an agent restart does not run a command again either:
 *  - `running` is written before the command runs. One still `running` when the agent
 *    starts was cut off by a crash or kill; a repeat of it is answered FLEET_COMMAND_INTERRUPTED
 *    and not run (it may or may not have taken effect: at most once, and the operator is told).
 *  - `done` keeps the reply; a repeat gets that reply sent again (cheap, and it helps when the
 *    first reply was lost, e.g. evicted from a full outbox). A result larger than
 *    MAX_STORED_RESULT bytes is not kept: the repeat's reply carries `{truncated: true}`.
 * An entry is forgotten once its command has expired (the hub sends nothing after
 * `expiresAt`, and an expired command is refused with FLEET_TIMEOUT anyway), and beyond
 * `max` entries the oldest finished ones go first.
 */
export type Reply = Omit<CommandReply, 'v' | 'mid'>;

interface Entry {
  id: string;
  expiresAt: number;
  state: 'running' | 'done';
  reply?: Reply;
}

export type Seen = { kind: 'new' } | { kind: 'running' } | { kind: 'done'; reply: Reply };

const MAX_STORED_RESULT = 4096;

export class SeenCommands {
  /** insertion order = order commands started */
  private readonly entries = new Map<string, Entry>();

  private constructor(
    private readonly file: string,
    private readonly max: number,
    private readonly now: () => number,
    private readonly onError: (err: unknown) => void,
  ) {}

  /** Load what an earlier run left (a missing or unreadable file is an empty set). */
  static load(file: string, opts: { max?: number; now?: () => number; onError?: (err: unknown) => void } = {}): SeenCommands {
    const s = new SeenCommands(file, opts.max ?? 1000, opts.now ?? Date.now, opts.onError ?? (() => undefined));
    let raw: unknown = [];
    try {
      raw = JSON.parse(readFileSync(file, 'utf8'));
    } catch {
      // first start, or a damaged file: nothing remembered
    }
    let cutOff = false;
    for (const e of Array.isArray(raw) ? (raw as Entry[]) : []) {
      if (typeof e?.id !== 'string' || typeof e.expiresAt !== 'number') continue;
      if (e.state === 'running') {
        cutOff = true;
        s.entries.set(e.id, { id: e.id, expiresAt: e.expiresAt, state: 'done', reply: interrupted(e.id) });
      } else if (e.state === 'done' && e.reply) s.entries.set(e.id, e);
    }
    if (cutOff) s.save();
    return s;
  }

  get size(): number {
    return this.entries.size;
  }

  /**
   * Called for every command that arrives. `new`: it is recorded as running (on disk before
   * this returns) and the caller runs it, then calls `finish`. Otherwise it is a repeat.
   */
  begin(id: string, expiresAt: number): Seen {
    const e = this.entries.get(id);
    if (e?.state === 'running') return { kind: 'running' };
    if (e?.state === 'done' && e.reply) return { kind: 'done', reply: e.reply };
    this.entries.set(id, { id, expiresAt, state: 'running' });
    this.save();
    return { kind: 'new' };
  }

  /** The command ran and `reply` is on its way (in the outbox). */
  finish(id: string, reply: Reply): void {
    const e = this.entries.get(id);
    if (!e) return;
    e.state = 'done';
    let kept = reply;
    if (reply.result !== undefined && Buffer.byteLength(JSON.stringify(reply.result) ?? '') > MAX_STORED_RESULT) kept = { ...reply, result: { truncated: true } };
    e.reply = kept;
    this.save();
  }

  private save(): void {
    const now = this.now();
    for (const [id, e] of this.entries) if (e.expiresAt <= now && e.state === 'done') this.entries.delete(id);
    // over the bound: oldest finished first; a running one only if nothing else is left
    for (const [id, e] of this.entries) {
      if (this.entries.size <= this.max) break;
      if (e.state === 'done') this.entries.delete(id);
    }
    for (const id of this.entries.keys()) {
      if (this.entries.size <= this.max) break;
      this.entries.delete(id);
    }
    // a failed write (disk full) leaves the memory copy in force: repeats are still
    // recognised until the agent restarts
    try {
      writeFileAtomicSync(this.file, JSON.stringify([...this.entries.values()]));
    } catch (err) {
      this.onError(err);
    }
  }
}

function interrupted(id: string): Reply {
  return { id, ok: false, error: { code: 'FLEET_COMMAND_INTERRUPTED', message: 'the agent restarted while it was running this command; it is not run again (it may or may not have taken effect)' } };
}
