import { mkdirSync } from 'node:fs';
import { Level } from 'level';
import { FleetError } from './errors.ts';

/** Open (creating) a LevelDB store at `dir`, with a clear error when it cannot be. */
export async function openStore<V = Buffer>(dir: string, valueEncoding: 'buffer' | 'json' | 'utf8' = 'buffer'): Promise<Level<string, V>> {
  try {
    mkdirSync(dir, { recursive: true, mode: 0o700 });
    const db = new Level<string, V>(dir, { valueEncoding });
    await db.open();
    return db;
  } catch (err) {
    throw new FleetError('FLEET_STORE', `cannot open store ${dir}: ${(err as Error).message}`, { cause: err });
  }
}
