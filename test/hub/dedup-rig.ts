import { join } from 'node:path';
import { openStore } from '../../core/store.ts';
import { Deduplicator, type DedupOptions } from '../../hub/dedup.ts';
import { tempDir, testLogger } from '../helpers.ts';

// One rig for the deduplicator tests (dedup.test.ts, dedup-budget.test.ts): a real LevelDB in a temp dir.

export type Db = Awaited<ReturnType<typeof openStore<string>>>;

/** `open` opens a Deduplicator over a fresh handle of the same LevelDB; `handle` is that handle; `peek` reads the LevelDB while no Deduplicator has it open. */
export async function withDedup(
  fn: (open: (o?: Partial<DedupOptions>) => Promise<Deduplicator>, handle: () => Db, peek: <T>(f: (db: Db) => Promise<T>) => Promise<T>) => Promise<void>,
): Promise<void> {
  const tmp = tempDir();
  const dir = join(tmp.dir, 'dedup');
  let db: Db | undefined;
  try {
    await fn(
      async (o = {}) => Deduplicator.open((db = await openStore<string>(dir, 'utf8')), { window: 64, log: testLogger('dedup'), flushMs: 60_000, ...o }),
      () => db!,
      async (f) => {
        const h = await openStore<string>(dir, 'utf8');
        try {
          return await f(h);
        } finally {
          await h.close();
        }
      },
    );
  } finally {
    // a failed assertion leaves the last one open: close it, or the test process never exits
    if (db?.status === 'open') await db.close();
    tmp.cleanup();
  }
}
